//! What a run found, and its forms: a human summary, JSON and JUnit XML.

use std::fmt::Write as _;

use gve::plugin::bindings::types::DriverInfo;
use gve::plugin::PluginSummary;
use serde::{Deserialize, Serialize};

use crate::case::{Case, Outcome};

/// One case's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CaseReport {
    /// Case name.
    pub name: String,
    /// Capability group.
    pub group: String,
    /// What it checks.
    pub about: String,
    /// Whether every driver must pass it.
    pub mandatory: bool,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// How long it took, cleanup included.
    pub millis: u64,
}

impl CaseReport {
    /// The result of `case`.
    pub fn new(case: &Case, outcome: Outcome, millis: u64) -> CaseReport {
        CaseReport {
            name: case.name.into(),
            group: case.group.into(),
            about: case.about.into(),
            mandatory: crate::runner::mandatory(&case.need),
            outcome,
            millis,
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// Driver name.
    pub driver: String,
    /// Driver version.
    pub version: String,
    /// Hypervisor kind.
    pub hypervisor_kind: String,
    /// Capabilities it declares.
    pub declared: Vec<String>,
    /// The endpoint it ran against.
    pub endpoint: String,
    /// What the host said it is (`kind version on platform`).
    pub proven_against: String,
    /// The guest plugin the guest cases ran through, when the driver has no native
    /// guest operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_plugin: Option<String>,
    /// The target's label, when one driver is proven on several kinds of target
    /// (`vCenter`, `ESXi`): the matrix shows a column per label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The run's id (in the names of what it made).
    pub run: String,
    /// When it finished, Unix ms.
    pub finished: u64,
    /// Remarks about the target.
    pub notes: Vec<String>,
    /// Every case, in running order.
    pub cases: Vec<CaseReport>,
    /// Operation latencies, when run in benchmark mode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bench: Vec<crate::bench::Latency>,
}

impl Report {
    /// The driver's name and version, and the target's label if any.
    pub fn title(&self) -> String {
        match &self.label {
            Some(l) => format!("{} {} ({l})", self.driver, self.version),
            None => format!("{} {}", self.driver, self.version),
        }
    }

    /// An empty report for a loaded driver.
    pub fn new(summary: &PluginSummary, info: &DriverInfo, endpoint: &str) -> Report {
        Report {
            driver: summary.name.clone(),
            version: summary.version.clone(),
            hypervisor_kind: info.hypervisor_kind.clone(),
            declared: gve::plugin::contract::capability_names(info.capabilities),
            endpoint: endpoint.into(),
            proven_against: String::new(),
            guest_plugin: None,
            label: None,
            run: String::new(),
            finished: 0,
            notes: Vec::new(),
            cases: Vec::new(),
            bench: Vec::new(),
        }
    }

    /// Adds a case result.
    pub fn push(&mut self, c: CaseReport) {
        self.cases.push(c);
    }

    /// (passed, failed, skipped).
    pub fn counts(&self) -> (usize, usize, usize) {
        let n = |f: fn(&Outcome) -> bool| self.cases.iter().filter(|c| f(&c.outcome)).count();
        (
            n(|o| matches!(o, Outcome::Pass)),
            n(|o| matches!(o, Outcome::Fail(_))),
            n(|o| matches!(o, Outcome::Skip(_))),
        )
    }

    /// Whether nothing failed.
    pub fn passed(&self) -> bool {
        self.counts().1 == 0
    }

    /// The human summary: one line per case, failures with their reason.
    pub fn human(&self) -> String {
        let mut out = format!(
            "{} {} ({}) against {} [{}], run {}\n",
            self.driver,
            self.version,
            self.hypervisor_kind,
            self.endpoint,
            self.proven_against,
            self.run
        );
        if let Some(g) = &self.guest_plugin {
            let _ = writeln!(out, "guest operations through {g}");
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        for c in &self.cases {
            let _ = write!(
                out,
                "{} {:<48} {:>6} ms",
                c.outcome.label(),
                c.name,
                c.millis
            );
            match &c.outcome {
                Outcome::Pass => out.push('\n'),
                Outcome::Fail(m) | Outcome::Skip(m) => {
                    let _ = writeln!(out, "  {m}");
                }
            }
        }
        let (p, f, s) = self.counts();
        let _ = writeln!(out, "{p} passed, {f} failed, {s} skipped");
        if !self.bench.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<20} {:>7} {:>10} {:>10} {:>6}",
                "operation", "samples", "p50 ms", "p99 ms", "failed"
            );
            for l in &self.bench {
                let _ = writeln!(
                    out,
                    "{:<20} {:>7} {:>10.3} {:>10.3} {:>6}",
                    l.op, l.samples, l.p50_ms, l.p99_ms, l.failed
                );
            }
        }
        out
    }

    /// JUnit XML, one test suite, one test case per case.
    pub fn junit(&self) -> String {
        let (_, f, s) = self.counts();
        let total_ms: u64 = self.cases.iter().map(|c| c.millis).sum();
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            out,
            "<testsuite name=\"gve-conformance {}\" tests=\"{}\" failures=\"{f}\" skipped=\"{s}\" time=\"{:.3}\">",
            xml(&self.driver),
            self.cases.len(),
            total_ms as f64 / 1000.0
        );
        for c in &self.cases {
            let _ = write!(
                out,
                "  <testcase classname=\"{}.{}\" name=\"{}\" time=\"{:.3}\"",
                xml(&self.driver),
                xml(&c.group),
                xml(&c.name),
                c.millis as f64 / 1000.0
            );
            match &c.outcome {
                Outcome::Pass => out.push_str("/>\n"),
                Outcome::Fail(m) => {
                    let _ = writeln!(
                        out,
                        ">\n    <failure message=\"{}\"/>\n  </testcase>",
                        xml(m)
                    );
                }
                Outcome::Skip(m) => {
                    let _ = writeln!(
                        out,
                        ">\n    <skipped message=\"{}\"/>\n  </testcase>",
                        xml(m)
                    );
                }
            }
        }
        out.push_str("</testsuite>\n");
        out
    }
}

/// `s` escaped for an XML attribute.
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::xml;

    #[test]
    fn xml_attributes_are_escaped() {
        assert_eq!(xml("a<b & \"c\"\u{1}"), "a&lt;b &amp; &quot;c&quot;");
    }
}
