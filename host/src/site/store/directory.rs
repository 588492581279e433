//! Users and agents, listed a page at a time in name order, so an admin's
//! listing reads one page's worth of records however many the site holds.

use std::ops::Bound;

use redb::ReadableTable;
use serde::de::DeserializeOwned;

use super::{decode, storage, Page, Store, StoreError, AGENTS, USERS};
use crate::site::model::{AgentRec, User};

/// Up to `limit` records of a table keyed by name, after key `after`, in key order.
fn page_after<T: DeserializeOwned>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    after: Option<&str>,
    limit: usize,
) -> Result<Page<T>, StoreError> {
    let lo = after.map_or(Bound::Unbounded, Bound::Excluded);
    let mut items = Vec::new();
    for row in t.range::<&str>((lo, Bound::Unbounded)).map_err(storage)? {
        if items.len() == limit {
            return Ok(Page { items, more: true });
        }
        let (k, v) = row.map_err(storage)?;
        items.push(decode(k.value(), v.value())?);
    }
    Ok(Page { items, more: false })
}

impl Store {
    /// Up to `limit` users named after `after`, in name order.
    pub fn users_page(&self, after: Option<&str>, limit: usize) -> Result<Page<User>, StoreError> {
        self.read(|r| page_after(&r.open_table(USERS).map_err(storage)?, after, limit))
    }

    /// Up to `limit` agents with ids after `after`, in id order.
    pub fn agents_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<AgentRec>, StoreError> {
        self.read(|r| page_after(&r.open_table(AGENTS).map_err(storage)?, after, limit))
    }
}
