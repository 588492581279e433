//! Every conformance case, grouped by the capability it proves. The order is the
//! order they run in.

mod bulk;
mod clone;
mod core;
mod guest;
mod lifecycle;
mod migrate;
mod power;

use crate::case::Case;

/// All cases, in running order.
pub fn all() -> Vec<Case> {
    let mut cases = Vec::new();
    cases.extend(core::cases());
    cases.extend(lifecycle::cases());
    cases.extend(power::cases());
    cases.extend(clone::cases());
    cases.extend(migrate::cases());
    cases.extend(guest::cases());
    cases.extend(bulk::cases());
    cases
}
