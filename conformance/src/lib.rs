//! # gve-conformance
//!
//! Proves a hypervisor driver against a real host, through the real plugin host and
//! the contract itself (shaped like csi-sanity, and like Nova's driver test case run
//! against every driver). A library for tests and the `gve-conformance` CLI (also
//! reachable as `gve conformance`).
//!
//! Each [`Case`] belongs to a capability group and is mandatory, or needs declared
//! capabilities, or needs something of the target (a second host, a template). A
//! declared capability that fails is a FAIL; an undeclared one is a SKIP with the
//! reason; a mandatory case is never skipped. Cases check semantics (state read back
//! from the hypervisor, the contract's answers to repeated operations, error kinds),
//! clean up what they made even when they fail, and name what they make
//! `gvc-<run>-<what>` so two runs on one host never collide and a run touches no VM
//! it did not make.

pub mod bench;
pub mod case;
pub mod cases;
pub mod ctx;
pub mod matrix;
pub mod report;
pub mod runner;

pub use case::{Case, Need, Outcome};
pub use ctx::{Ctx, Failure};
pub use report::{CaseReport, Report};
pub use runner::{run, run_loaded, Options, Target};
