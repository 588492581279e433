//! Files: only granted directories, read-only unless granted writable, and no
//! symlinks made inside a grant.

use gve::plugin::{DirGrant, Grants};

use super::{bench, hostile};

fn grant(dir: &std::path::Path, writable: bool) -> Grants {
    Grants {
        directories: vec![DirGrant {
            host: dir.to_path_buf(),
            guest: "/data".into(),
            writable,
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn only_granted_directories_are_visible_and_read_only_by_default() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("hello.txt"), "from the host").unwrap();
    let b = bench(hostile(grant(data.path(), false))).await;
    assert_eq!(
        b.hostile.get_vm("file:/data/hello.txt").await.unwrap().name,
        "from the host"
    );
    assert!(b.hostile.get_vm("write:/data/new.txt").await.is_err());
    assert!(!data.path().join("new.txt").exists());
    for outside in [
        "file:/etc/passwd",
        "file:/data/../etc/passwd",
        "file:/data/../../../../etc/passwd",
        "file:/data/./../data/../etc/passwd",
    ] {
        assert!(
            b.hostile.get_vm(outside).await.is_err(),
            "{outside} was read"
        );
    }
    b.aftermath().await;
}

/// A symlink pointing outside a writable grant could be made inside it.
#[tokio::test]
async fn no_symlink_is_created_even_in_a_writable_grant() {
    let data = tempfile::tempdir().unwrap();
    let b = bench(hostile(grant(data.path(), true))).await;
    for target in ["/etc/passwd", "../../etc", "inside"] {
        let err = b
            .hostile
            .get_vm(&format!("symlink:/data:{target}"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not-permitted"), "{target}: {err}");
        assert!(
            std::fs::symlink_metadata(data.path().join("link")).is_err(),
            "a link to {target} was made"
        );
    }
    // Control: the grant is writable.
    b.hostile.get_vm("write:/data/new.txt").await.unwrap();
    assert!(data.path().join("new.txt").exists());
    b.aftermath().await;
}

#[tokio::test]
async fn plugin_sees_only_its_own_config() {
    let mut grants = Grants::default();
    grants.config.insert("region".into(), "eu-1".into());
    let b = bench(hostile(grants)).await;
    assert_eq!(
        b.hostile.get_vm("config:region").await.unwrap().name,
        "eu-1"
    );
    assert_eq!(
        b.hostile.get_vm("config:password").await.unwrap().name,
        "<unset>"
    );
    b.aftermath().await;
}
