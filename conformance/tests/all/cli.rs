//! The CLI: list, run with reports, and the support matrix with its staleness check.

use std::process::Command;

use crate::support::memory_target;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gve-conformance"))
}

#[test]
fn list_names_every_case_with_its_need() {
    let out = cli().arg("list").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("core.info") && text.contains("mandatory"),
        "{text}"
    );
    assert!(
        text.contains("needs create+start+shutdown+destroy"),
        "{text}"
    );
}

#[test]
fn run_writes_reports_and_the_matrix_check_catches_a_stale_file() {
    let t = memory_target();
    let dir = tempfile::tempdir().unwrap();
    let reports = dir.path().join("memory");
    let out = cli()
        .args(["run", "--plugin"])
        .arg(&t.bundle)
        .args(["--endpoint", &t.endpoint, "--template", "alpine-3"])
        .args(["--second-host", t.second_host.as_deref().unwrap()])
        .arg("--report")
        .arg(&reports)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("PASS core.info"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(json["driver"], "memory");
    let junit = std::fs::read_to_string(reports.join("junit.xml")).unwrap();
    assert!(
        junit.contains("<testsuite name=\"gve-conformance memory\""),
        "{junit}"
    );

    let md = dir.path().join("matrix.md");
    let matrix = |check: bool| {
        let mut c = cli();
        c.arg("matrix")
            .arg(reports.join("report.json"))
            .arg("--out")
            .arg(&md);
        if check {
            c.arg("--check");
        }
        c.output().unwrap()
    };
    assert!(matrix(false).status.success());
    let table = std::fs::read_to_string(&md).unwrap();
    assert!(table.contains("| start | ✓ |"), "{table}");
    assert!(matrix(true).status.success());
    std::fs::write(&md, table.replace("✓", "✗")).unwrap();
    let stale = matrix(true);
    assert_eq!(stale.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&stale.stderr).contains("stale"));

    // A filter picks cases; bad usage is exit 2.
    let out = cli()
        .args(["run", "--plugin"])
        .arg(&t.bundle)
        .args(["--endpoint", &t.endpoint, "--run", "^core\\."])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("create.reads-back"), "{text}");
    let bad = cli()
        .args(["run", "--plugin", "/nonexistent", "--endpoint", "x"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
