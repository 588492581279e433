//! Answers: what a plugin returns is bounded and checked before the host keeps it.

use gve::plugin::{ErrorKind, Grants, PluginError};

use super::{bench, bench_on, hostile};

fn refused(err: &PluginError, needle: &str) {
    assert!(
        matches!(err, PluginError::Answer { plugin, .. } if plugin == "hostile"),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Backend);
    assert!(err.to_string().contains(needle), "{err}");
}

/// A 32 MiB error message used to be stored verbatim in operation records.
#[tokio::test]
async fn a_huge_error_message_is_cut() {
    let b = bench(hostile(Grants::default())).await;
    let err = b.hostile.get_vm("error:33554432").await.unwrap_err();
    let text = err.to_string();
    assert!(text.len() < 5_000, "{} bytes", text.len());
    assert!(
        text.contains("more bytes cut]"),
        "{}",
        &text[text.len() - 80..]
    );
    assert_eq!(err.kind(), ErrorKind::Backend);
    b.aftermath().await;
}

#[tokio::test]
async fn vm_ids_that_break_the_grammar_refuse_the_listing() {
    let b = bench_on(hostile(Grants::default()), "ids:bad").await;
    let err = b.hostile.list_vms().await.unwrap_err();
    refused(&err, "VM id \"\" is not");
    let err = b.hostile.host_info().await.unwrap_err();
    refused(&err, "free memory");
    b.aftermath().await;
}

#[tokio::test]
async fn duplicate_ids_refuse_the_listing() {
    let b = bench_on(hostile(Grants::default()), "ids:dupes").await;
    refused(&b.hostile.list_vms().await.unwrap_err(), "listed twice");
    b.aftermath().await;
}

/// 20,000 invented VMs per listing used to become 40,000 events per pass (now
/// one pass records at most 1,000); a listing may hold 200,000.
#[tokio::test]
async fn oversized_listings_and_fields_are_refused() {
    let b = bench_on(hostile(Grants::default()), "many:200001").await;
    refused(&b.hostile.list_vms().await.unwrap_err(), "200001 records");
    b.aftermath().await;
    drop(b);
    // The limit itself is fine.
    let b = bench_on(hostile(Grants::default()), "many:200000").await;
    assert_eq!(b.hostile.list_vms().await.unwrap().len(), 200_000);
    drop(b);
    let b = bench_on(hostile(Grants::default()), "huge:2").await;
    refused(
        &b.hostile.list_vms().await.unwrap_err(),
        "the name is 2097152 bytes",
    );
    b.aftermath().await;
}
