//! Issue 16 part 3: a 1 GiB file into and out of a running kvm guest through gve's
//! staged-disk path (agent → kvm plugin: a raw disk streamed through libvirt and
//! attached live; the guest `dd`s it and hashes it) against the same mechanism done
//! by hand on the bench's own libvirt connection (volume upload/download through
//! libvirt streams, `virsh attach-disk`, the guest's `dd` and SHA-256 through
//! qemu-ga, with OpenSSL as gve's guest scripts hash where the guest has it), with
//! and without the in-guest hash, and against the guest agent's own
//! file commands on a small file (what gve used before). The guest's file lives on
//! an ext2 filesystem on its own disk (`/data`): tmpfs would hold it in guest RAM.
//!
//! `bash bench/run.sh bulk` (GVE_BULK_ROUNDS rounds, default 3) writes
//! `bench/results/bulk.md`.

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use gve::agent::model::FileMeta;
use gve_harness::Libvirtd;
use hyper::Method;
use serde_json::json;
use sha2::{Digest, Sha256};
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

/// The guest's SHA-256 by hand: OpenSSL, as gve's guest scripts take it where the
/// guest has it (the test guest does).
const HASH: &str = "openssl dgst -sha256 -r";

const TOKEN: &str = "bench-token-0123456789abcdef";
const SIZE: usize = 1 << 30;
const UNIT: usize = 4 << 20;

/// Guest shell that sets `dev` to the disk with serial `rawbulk` (the guest names
/// hot-plugged disks in its own order, not by libvirt's target name).
const FIND: &str = "i=0; dev=; while [ -z \"$dev\" ]; do for s in /sys/block/*/serial; do \
     [ \"$(cat $s)\" = rawbulk ] && { d=${s%/serial}; dev=/dev/${d##*/}; }; done; \
     [ -n \"$dev\" ] || { i=$((i+1)); [ $i -lt 200 ] || exit 3; sleep 0.05; }; done; ";

fn mibps(d: Duration) -> f64 {
    (SIZE >> 20) as f64 / d.as_secs_f64()
}

/// Runs `sh -c script` in the guest through raw qemu-ga; panics unless it exits 0.
fn sh(raw: &common::Raw, script: &str) -> String {
    let s = raw.exec("/bin/sh", &["-c", script]);
    let out = |k: &str| {
        use base64::Engine as _;
        let b = s[k].as_str().unwrap_or("");
        String::from_utf8_lossy(&base64::engine::general_purpose::STANDARD.decode(b).unwrap())
            .into_owned()
    };
    assert_eq!(
        s["exitcode"],
        0,
        "{script}: {} {}",
        out("out-data"),
        out("err-data")
    );
    out("out-data")
}

/// The raw way in: a volume written through a libvirt stream, attached by hand,
/// `dd` in the guest (and `sha256sum` when `verify`).
fn raw_in(
    lv: &Libvirtd,
    conn: &virt::connect::Connect,
    raw: &common::Raw,
    data: &[u8],
    verify: bool,
) -> Duration {
    let t = Instant::now();
    let pool = virt::storage_pool::StoragePool::lookup_by_name(conn, "gve").unwrap();
    let cap = data.len().div_ceil(UNIT) * UNIT;
    let xml = format!("<volume><name>raw-in.raw</name><capacity unit='bytes'>{cap}</capacity><target><format type='raw'/></target></volume>");
    let vol = StorageVol::create_xml(&pool, &xml, 0).unwrap();
    for (i, piece) in data.chunks(8 << 20).enumerate() {
        let st = Stream::new(conn, 0).unwrap();
        vol.upload(&st, (i * (8 << 20)) as u64, piece.len() as u64, 0)
            .unwrap();
        let mut sent = 0;
        while sent < piece.len() {
            sent += st.send(&piece[sent..]).unwrap();
        }
        st.finish().unwrap();
    }
    let path = vol.get_path().unwrap();
    let dom = raw.dom.get_name().unwrap();
    lv.virsh(&[
        "attach-disk",
        &dom,
        &path,
        "vdc",
        "--live",
        "--subdriver",
        "raw",
        "--serial",
        "rawbulk",
    ]);
    let n = cap / UNIT;
    let attached = t.elapsed();
    let script = format!(
        "{FIND}dd if=$dev of=/data/raw.tmp bs=4M count={n} iflag=direct oflag=direct 2>/dev/null && truncate -s {} /data/raw.tmp",
        data.len()
    );
    sh(raw, &script);
    let copied = t.elapsed();
    if verify {
        let out = sh(raw, &format!("{HASH} /data/raw.tmp"));
        assert!(out.starts_with(&hex::encode(Sha256::digest(data))), "{out}");
    }
    let took = t.elapsed();
    eprintln!(
        "raw in: upload + attach {:.1} s, guest dd {:.1} s, guest hash {:.1} s",
        attached.as_secs_f64(),
        (copied - attached).as_secs_f64(),
        (took - copied).as_secs_f64()
    );
    sh(raw, "rm -f /data/raw.tmp");
    lv.virsh(&["detach-disk", &dom, "vdc", "--live"]);
    vol.delete(0).unwrap();
    took
}

/// The raw way out: `dd` of the guest file onto an attached volume (and
/// `sha256sum` when `verify`), read back through a libvirt stream.
fn raw_out(
    lv: &Libvirtd,
    conn: &virt::connect::Connect,
    raw: &common::Raw,
    want: &str,
    verify: bool,
) -> Duration {
    let t = Instant::now();
    let pool = virt::storage_pool::StoragePool::lookup_by_name(conn, "gve").unwrap();
    let xml = format!("<volume><name>raw-out.raw</name><capacity unit='bytes'>{SIZE}</capacity><target><format type='raw'/></target></volume>");
    let vol = StorageVol::create_xml(&pool, &xml, 0).unwrap();
    let path = vol.get_path().unwrap();
    let dom = raw.dom.get_name().unwrap();
    lv.virsh(&[
        "attach-disk",
        &dom,
        &path,
        "vdc",
        "--live",
        "--subdriver",
        "raw",
        "--serial",
        "rawbulk",
    ]);
    let attached = t.elapsed();
    sh(
        raw,
        &format!("{FIND}dd if=/data/in.bin of=$dev bs=4M conv=sync oflag=direct 2>/dev/null"),
    );
    let copied = t.elapsed();
    let out = if verify {
        sh(raw, &format!("{HASH} /data/in.bin"))
    } else {
        String::new()
    };
    let hashed = t.elapsed();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut at = 0usize;
    while at < SIZE {
        let st = Stream::new(conn, 0).unwrap();
        let want_n = (SIZE - at).min(buf.len());
        vol.download(&st, at as u64, want_n as u64, 0).unwrap();
        let mut got = 0;
        while got < want_n {
            let n = st.recv(&mut buf[got..want_n]).unwrap();
            assert!(n > 0);
            got += n;
        }
        let _ = st.finish();
        h.update(&buf[..want_n]);
        at += want_n;
    }
    let took = t.elapsed();
    eprintln!(
        "raw out: attach {:.1} s, guest dd {:.1} s, guest hash {:.1} s, download {:.1} s",
        attached.as_secs_f64(),
        (copied - attached).as_secs_f64(),
        (hashed - copied).as_secs_f64(),
        (took - hashed).as_secs_f64()
    );
    assert_eq!(hex::encode(h.finalize()), want);
    if verify {
        assert!(out.starts_with(want), "{out}");
    }
    lv.virsh(&["detach-disk", &dom, "vdc", "--live"]);
    vol.delete(0).unwrap();
    took
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds: usize = std::env::var("GVE_BULK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let status = std::process::Command::new("bash")
        .arg(gve_harness::root().join("scripts/build-plugins.sh"))
        .status()
        .unwrap();
    assert!(status.success());
    let lv = Libvirtd::start();
    let (agent, c, _agent_dir) = common::kvm_guest_agent(&lv, TOKEN, |_| {}).await;
    let op: gve::agent::model::Operation = c
        .call(Method::POST, "/v1/vms", Some(&json!({ "name": "bulk", "template": "tiny", "main-memory-mib": 512, "disk-mib": 2600 })))
        .await
        .unwrap();
    let op: gve::agent::model::Operation = c
        .get(&format!("/v1/operations/{}?wait-ms=60000", op.id))
        .await
        .unwrap();
    let vm = op.result.expect("the VM");
    let _: gve::agent::model::Operation = c
        .call(
            Method::POST,
            &format!("/v1/vms/{}/start", vm.id),
            Some(&json!({})),
        )
        .await
        .unwrap();
    let conn = virt::connect::Connect::open(Some(&lv.uri)).unwrap();
    let raw = common::Raw {
        dom: virt::domain::Domain::lookup_by_name(&conn, &vm.name).unwrap(),
        calls: Default::default(),
    };
    let up = Instant::now();
    while raw
        .dom
        .qemu_agent_command(r#"{"execute":"guest-ping"}"#, 2, 0)
        .is_err()
    {
        assert!(
            up.elapsed() < Duration::from_secs(90),
            "qemu-ga never answered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The VM's own disk (a qcow2 overlay grown to 2600 MiB) becomes /data: the
    // file and a raw copy's temporary file fit.
    sh(
        &raw,
        "mke2fs -q -F /dev/vda && mkdir -p /data && mount /dev/vda /data && df -m /data",
    );

    let data: Vec<u8> = (0..SIZE)
        .map(|i| ((i * 2_654_435_761) >> 13) as u8)
        .collect();
    let sha = hex::encode(Sha256::digest(&data));
    let body = bytes::Bytes::from(data.clone());
    let (mut gin, mut gout, mut rin, mut rout, mut rin_nv, mut rout_nv) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for round in 0..rounds {
        let t = Instant::now();
        let meta: FileMeta = c
            .put_stream(
                &format!("/v1/vms/{}/files?path=/data/in.bin", vm.id),
                &[("x-gve-sha256", sha.clone())],
                gve::api::full(body.clone()),
            )
            .await
            .unwrap();
        gin.push(t.elapsed());
        assert_eq!(meta.sha256, sha);
        eprintln!("gve in: {:.1} s", gin[round].as_secs_f64());
        let t = Instant::now();
        let resp = c
            .get_stream(&format!("/v1/vms/{}/files?path=/data/in.bin", vm.id))
            .await
            .unwrap();
        let mut b = resp.into_body();
        let mut h = Sha256::new();
        let mut n = 0usize;
        use http_body_util::BodyExt;
        while let Some(f) = b.frame().await {
            if let Ok(d) = f.unwrap().into_data() {
                n += d.len();
                h.update(&d);
            }
        }
        gout.push(t.elapsed());
        eprintln!("gve out: {:.1} s", gout[round].as_secs_f64());
        assert_eq!((n, hex::encode(h.finalize())), (SIZE, sha.clone()));
        // The agent releases its disk once the last byte is out.
        tokio::time::sleep(Duration::from_secs(6)).await;
        rin.push(raw_in(&lv, &conn, &raw, &data, true));
        rout.push(raw_out(&lv, &conn, &raw, &sha, true));
        rin_nv.push(raw_in(&lv, &conn, &raw, &data, false));
        rout_nv.push(raw_out(&lv, &conn, &raw, &sha, false));
        eprintln!(
            "round {round}: gve in {:.0} out {:.0}; raw verified in {:.0} out {:.0}; raw unverified in {:.0} out {:.0} MiB/s",
            mibps(gin[round]), mibps(gout[round]), mibps(rin[round]), mibps(rout[round]), mibps(rin_nv[round]), mibps(rout_nv[round])
        );
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    // The in-guest hash alone, for where the time goes, and busybox's beside it.
    let t = Instant::now();
    sh(&raw, &format!("{HASH} /data/in.bin"));
    let hash = t.elapsed();
    let t = Instant::now();
    sh(&raw, "sha256sum /data/in.bin");
    let busybox = t.elapsed();
    let t = Instant::now();
    sh(
        &raw,
        "dd if=/data/in.bin of=/dev/null bs=4M iflag=direct 2>/dev/null",
    );
    let read = t.elapsed();

    let med = |v: &Vec<Duration>| common::quartiles(v.clone());
    let row = |name: &str, v: &Vec<Duration>| {
        let (m, q1, q3) = med(v);
        format!(
            "| {name} | {:.0} MiB/s ({:.1} s) | {:.0}-{:.0} |\n",
            mibps(m),
            m.as_secs_f64(),
            mibps(q3),
            mibps(q1)
        )
    };
    let mut out = format!(
        "# Bulk copy: 1 GiB into and out of a running kvm guest\n\n\
         `bench/bulk.rs` on {}, {} cores, TCG guest (1 vCPU, 512 MiB; the file on ext2 on its own disk). \
         {rounds} rounds; median (IQR). gve: `PUT`/`GET /v1/vms/{{id}}/files` on the agent, verified \
         (SHA-256 computed in the guest, equal to the agent's). Raw: the same mechanism by hand on the \
         bench's own libvirt connection.\n\n| path | median | IQR (MiB/s) |\n|---|---|---|\n",
        common::today(),
        common::cores()
    );
    out += &row("gve in, verified in the guest", &gin);
    out += &row("gve out, verified in the guest", &gout);
    out += &row("raw in, verified in the guest", &rin);
    out += &row("raw out, verified in the guest", &rout);
    out += &row("raw in, not verified", &rin_nv);
    out += &row("raw out, not verified", &rout_nv);
    out += &format!(
        "\nIn the guest alone: `{HASH}` of the 1 GiB file {:.1} s ({:.0} MiB/s), busybox `sha256sum` {:.1} s ({:.0} MiB/s); an O_DIRECT read of it {:.1} s.\n",
        hash.as_secs_f64(),
        mibps(hash),
        busybox.as_secs_f64(),
        mibps(busybox),
        read.as_secs_f64()
    );
    println!("{out}");
    std::fs::write(gve_harness::root().join("bench/results/bulk.md"), out).unwrap();
    agent.stop().await;
}
