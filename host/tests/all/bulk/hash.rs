//! Which tool hashes a staged copy in the guest: OpenSSL where the guest has one
//! that works, busybox's or coreutils' `sha256sum` otherwise. A staged copy's
//! verification is the guest's hashing of the whole file, so the faster tool is the
//! copy's speed (bench/results/bulk.md).

use gve_harness::Libvirtd;
use serde_json::json;

use super::{gone_within_30s, nothing_staged, put_known, stagings};
use crate::guest::{copy_out, exec, running_vm, text};

/// The guest's `openssl` replaced by a shell script `body` (`-` puts the real one
/// back, `none` leaves none).
fn openssl_is(body: &str) -> serde_json::Value {
    let line = match body {
        "-" => "mv -f /usr/bin/openssl.real /usr/bin/openssl".to_string(),
        "none" => "rm -f /usr/bin/openssl".to_string(),
        body => format!(
            "[ -e /usr/bin/openssl.real ] || mv /usr/bin/openssl /usr/bin/openssl.real; \
             printf '#!/bin/sh\\n{body}\\n' > /usr/bin/openssl; chmod 755 /usr/bin/openssl"
        ),
    };
    json!({ "argv": ["sh", "-c", line] })
}

/// A staged copy is hashed with the guest's `openssl` when it answers (one that
/// lies is believed, and the copy is refused as corrupt: so it is the one asked),
/// with `sha256sum` when it fails or is missing; both ways in and out, the
/// guest's SHA-256 is the file's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_copy_is_hashed_by_openssl_where_the_guest_has_it_and_by_sha256sum_where_not() {
    let lv = Libvirtd::start();
    let (agent, c, _dir) = crate::guest::agent(&lv, None).await;
    let vm = running_vm(&agent, &c, "bulk-hash", 256).await;
    let data: Vec<u8> = (0..(5usize << 20) + 3)
        .map(|i| (i.wrapping_mul(131) ^ (i >> 11)) as u8)
        .collect();
    let sha = super::hex(&data);
    let probe = exec(&c, &vm.id, json!({ "argv": ["openssl", "version"] })).await;
    assert!(
        text(&probe.stdout_b64).starts_with("OpenSSL 3"),
        "the test guest has OpenSSL: {probe:?}"
    );

    // A copy in, and back out when `out`, whole: the guest's SHA-256 is the data's.
    let whole = async |path: &str, out: bool| {
        let meta = put_known(&c, &vm.id, path, &data, &sha).await.unwrap();
        assert_eq!(meta.sha256, sha, "{path}");
        if out {
            let (size, got, _) = copy_out(&c, &vm.id, path).await;
            assert_eq!((size, got.as_str()), (data.len() as u64, sha.as_str()));
        }
    };

    // The real one.
    whole("/tmp/h/a.bin", true).await;

    // One that answers a wrong sum is the one asked: the copy is refused.
    exec(
        &c,
        &vm.id,
        openssl_is(&format!("echo {} *f", "0".repeat(64))),
    )
    .await;
    let e = put_known(&c, &vm.id, "/tmp/h/b.bin", &data, &sha)
        .await
        .unwrap_err();
    assert!(
        e.message
            .contains(&format!("the guest read SHA-256 {}", "0".repeat(64))),
        "{e}"
    );

    // One that fails, then none at all: sha256sum's sum, and the copies whole.
    exec(&c, &vm.id, openssl_is("exit 1")).await;
    whole("/tmp/h/c.bin", false).await;
    exec(&c, &vm.id, openssl_is("none")).await;
    whole("/tmp/h/d.bin", true).await;
    exec(&c, &vm.id, openssl_is("-")).await;

    // Every copy, in and out, went through a staged disk (the one refused too),
    // and none is left (a copy-out's once its body has ended).
    assert_eq!(stagings(&agent, "ok").await, 6.0);
    gone_within_30s(&lv, &vm.id).await;
    nothing_staged(&lv);
    agent.stop().await;
}
