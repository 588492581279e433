//! What a conformance case is: a name, the capability group it proves, what it
//! needs, and the check itself.

use std::future::Future;
use std::pin::Pin;

use gve::plugin::bindings::types::Capabilities;
use serde::{Deserialize, Serialize};

use crate::ctx::{Ctx, Failure};

/// The future a case's check returns.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Failure>> + Send + 'a>>;

/// What a case needs to run.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    /// Every driver must pass it; never skipped.
    Mandatory,
    /// Runs when the driver declares all of these capabilities; skipped otherwise.
    Declared(Capabilities),
    /// Runs when the driver declares these and the target has a second host.
    SecondHost(Capabilities),
    /// Runs when the driver declares these and the target names a template.
    Template(Capabilities),
    /// Runs when the driver declares the first set and not the second (to check the
    /// host refuses what the driver left out).
    Undeclared(Capabilities, Capabilities),
    /// Runs when the driver declares these and the target has guest operations (the
    /// driver declares `guest-native`, or a guest plugin was given).
    Guest(Capabilities),
    /// Runs when the driver declares these, exports `gve:hypervisor/bulk` (capability
    /// `bulk-copy`) and the target has guest operations.
    Bulk(Capabilities),
    /// Runs when the driver does not export `gve:hypervisor/bulk`.
    NoBulk,
}

/// What the target offers beyond the driver's session.
#[derive(Debug, Clone, Copy, Default)]
pub struct Has {
    /// A second host to migrate to.
    pub second_host: bool,
    /// A template to create and clone from.
    pub template: bool,
    /// Guest operations (exec, file copy) on its VMs.
    pub guest: bool,
    /// The driver exports `gve:hypervisor/bulk`.
    pub bulk: bool,
}

/// One conformance case.
pub struct Case {
    /// Unique name, `<group>.<what>`.
    pub name: &'static str,
    /// The capability group it proves (`core`, `create`, `start`, ...).
    pub group: &'static str,
    /// What it checks, one line.
    pub about: &'static str,
    /// What it needs.
    pub need: Need,
    /// The check.
    pub check: for<'a> fn(&'a Ctx) -> CheckFuture<'a>,
}

/// How a case ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "message", rename_all = "kebab-case")]
pub enum Outcome {
    /// It held.
    Pass,
    /// It did not; why.
    Fail(String),
    /// It did not run; why.
    Skip(String),
}

impl Outcome {
    /// `PASS`, `FAIL` or `SKIP`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Fail(_) => "FAIL",
            Outcome::Skip(_) => "SKIP",
        }
    }
}

impl Need {
    /// The capabilities it needs declared.
    pub fn capabilities(&self) -> Capabilities {
        match *self {
            Need::Mandatory | Need::NoBulk => Capabilities::empty(),
            Need::Declared(c)
            | Need::SecondHost(c)
            | Need::Template(c)
            | Need::Guest(c)
            | Need::Bulk(c) => c,
            Need::Undeclared(c, _) => c,
        }
    }

    /// Why a case with this need does not run on a driver declaring `declared`
    /// against a target with `has` (a second host, a template, guest operations);
    /// `None` when it runs.
    pub fn skip_reason(&self, declared: Capabilities, has: Has) -> Option<String> {
        let missing = self.capabilities() & !declared;
        if missing != Capabilities::empty() {
            return Some(format!(
                "the driver does not declare {}",
                gve::plugin::contract::capability_names(missing).join(", ")
            ));
        }
        match self {
            Need::Undeclared(_, absent) if declared.intersects(*absent) => Some(format!(
                "the driver declares {}",
                gve::plugin::contract::capability_names(*absent).join(", ")
            )),
            Need::SecondHost(_) if !has.second_host => {
                Some("needs a second host (--second-host or --destination-host)".into())
            }
            Need::Template(_) if !has.template => Some("needs a template (--template)".into()),
            // No way into its guests at all: nothing a guest plugin could use.
            Need::Guest(_)
                if !declared
                    .intersects(Capabilities::GUEST_NATIVE | Capabilities::GUEST_AGENT_CHANNEL) =>
            {
                Some("the driver does not declare guest-native or guest-agent-channel".into())
            }
            Need::Bulk(_) if !has.bulk => {
                Some("the driver does not export gve:hypervisor/bulk (bulk-copy)".into())
            }
            Need::NoBulk if has.bulk => {
                Some("the driver exports gve:hypervisor/bulk (bulk-copy)".into())
            }
            Need::Guest(_) | Need::Bulk(_) if !has.guest => Some(
                "needs guest operations: the driver does not declare guest-native and no guest plugin was given (--guest-plugin)"
                    .into(),
            ),
            _ => None,
        }
    }
}
