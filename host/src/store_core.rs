//! What the site's store and the agent's registry share beyond redb itself:
//! sequence tables (events, audit) trimmed by age, and retention run in bounded
//! batches, one transaction each, so a large backlog never holds the writer long.

use redb::{ReadableTable, Table};
use serde::Deserialize;

/// Records removed per retention transaction.
pub const BATCH: usize = 1024;

/// The time of a sequence record (every event and audit entry has one).
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Stamp {
    at_ms: u64,
}

/// Removes up to `limit` of the oldest records of a sequence table whose
/// `at-ms` is before `before_ms`, stopping at the first newer one (sequence
/// order is time order); how many went.
pub fn trim_older(
    table: &mut Table<'_, u64, &[u8]>,
    before_ms: u64,
    limit: usize,
) -> Result<usize, String> {
    let mut last = None;
    let mut n = 0;
    for row in table.range::<u64>(..).map_err(|e| e.to_string())? {
        let (k, v) = row.map_err(|e| e.to_string())?;
        // A record that cannot be read has no time: it goes with its older neighbours.
        let at = serde_json::from_slice::<Stamp>(v.value()).map_or(0, |s| s.at_ms);
        if at >= before_ms || n >= limit {
            break;
        }
        last = Some(k.value());
        n += 1;
    }
    if let Some(last) = last {
        table
            .retain_in(..=last, |_, _| false)
            .map_err(|e| e.to_string())?;
    }
    Ok(n)
}

/// Runs `batch(BATCH)` until it removes fewer than a batch or fails (logged,
/// naming `what`); how many went in all.
pub fn in_batches<E: std::fmt::Display>(
    what: &str,
    mut batch: impl FnMut(usize) -> Result<usize, E>,
) -> usize {
    let mut total = 0;
    loop {
        match batch(BATCH) {
            Ok(n) => {
                total += n;
                if n < BATCH {
                    break;
                }
            }
            Err(e) => {
                tracing::error!("removing {what} past their retention: {e}");
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(removed = total, "{what} past their retention removed");
    }
    total
}
