//! Releases owed: an unregistered agent's release from its registration
//! (`DELETE /v1/site` on the agent) is recorded in the transaction that removes
//! the agent, and forgotten once the agent took it (or answered that it serves
//! another registration, or keeps no site record), or after 7 days (given up).
//! Until then the site sends it again now and then, so an agent that was down
//! when it was unregistered, or whose release a crash cut off, does not keep
//! naming this site. The entry keeps the registration's sealed secret as long.

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use super::{all, encode, storage, Store, StoreError, Txn};
use crate::site::model::AgentRec;

/// "agent id\0registered ms" → the release owed to that registration.
pub(super) const RELEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("releases_owed");

/// A release owed to an unregistered agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OwedRelease {
    /// The registration as it was when removed (URL, sealed secret, pin, time).
    pub agent: AgentRec,
    /// When it was unregistered (Unix ms).
    pub since_ms: u64,
}

impl OwedRelease {
    /// Its key: one per registration.
    pub fn key(&self) -> String {
        format!("{}\0{}", self.agent.id, self.agent.registered_ms)
    }
}

impl Txn<'_> {
    /// Records the release `owed`.
    pub fn owe_release(&mut self, owed: &OwedRelease) -> Result<(), StoreError> {
        let mut t = self.txn.open_table(RELEASES).map_err(storage)?;
        t.insert(owed.key().as_str(), encode(owed)?.as_slice())
            .map_err(storage)?;
        Ok(())
    }
}

impl Store {
    /// Every release owed.
    pub fn owed_releases(&self) -> Result<Vec<OwedRelease>, StoreError> {
        self.read(|r| all(&r.open_table(RELEASES).map_err(storage)?))
    }

    /// Forgets the release owed under `key` (the agent took it, or it was given up).
    pub fn settle_release(&self, key: &str) -> Result<(), StoreError> {
        self.write(|t| {
            let mut table = t.txn.open_table(RELEASES).map_err(storage)?;
            table.remove(key).map_err(storage)?;
            Ok(())
        })
    }
}
