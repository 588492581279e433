//! `--wait` against a stand-in site whose event stream misbehaves: it must be
//! resumed with `Last-Event-ID`, or replaced by polling.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::gve;

/// A stand-in site for `gve job wait`: its event stream drops after the first event
/// (then must be resumed with `Last-Event-ID`), or is refused (then the job must
/// be polled).
#[derive(Default)]
struct FakeSite {
    /// `Last-Event-ID` of each event-stream request.
    streams: Vec<Option<String>>,
    /// Job reads so far.
    gets: usize,
    /// The stream delivered the terminal event.
    done: bool,
}

fn fake_job(state: &str, error: Value) -> String {
    json!({
        "id": "job-1", "owner": "alice", "kind": "exec", "vm": "vm-1", "params": {},
        "state": state, "result": if state == "succeeded" { json!({ "ok": true }) } else { Value::Null },
        "error": error, "created-ms": 1, "updated-ms": 2,
    })
    .to_string()
}

fn sse_chunk(seq: u64, state: &str, message: &str) -> String {
    let data = json!({ "seq": seq, "job": "job-1", "owner": "alice", "state": state, "message": message, "at-ms": 1 });
    let ev = format!("id: {seq}\nevent: job\ndata: {data}\n\n");
    format!("{:x}\r\n{ev}\r\n", ev.len())
}

async fn fake_site(refuse_streams: bool) -> (String, Arc<Mutex<FakeSite>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = Arc::new(Mutex::new(FakeSite::default()));
    let shared = state.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let st = shared.clone();
            tokio::spawn(async move {
                let (mut head, mut buf) = (Vec::new(), [0u8; 1024]);
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                let last = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("last-event-id")
                        .then(|| v.trim().to_string())
                });
                let reply = |status: &str, body: String| {
                    format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
                };
                if !path.ends_with("/events") {
                    let body = {
                        let mut f = st.lock().unwrap();
                        f.gets += 1;
                        match (refuse_streams, f.gets, f.done) {
                            (false, _, true) => fake_job("succeeded", Value::Null),
                            (false, _, false) | (true, 1, _) => fake_job("queued", Value::Null),
                            (true, 2 | 3, _) => fake_job("running", Value::Null),
                            _ => fake_job(
                                "failed",
                                json!({ "kind": "invalid-state", "message": "boom" }),
                            ),
                        }
                    };
                    let _ = sock.write_all(reply("200 OK", body).as_bytes()).await;
                    return;
                }
                if refuse_streams {
                    let body =
                        json!({ "error": { "kind": "backend", "message": "no streams here" } });
                    let _ = sock
                        .write_all(reply("500 Internal Server Error", body.to_string()).as_bytes())
                        .await;
                    return;
                }
                let first = {
                    let mut f = st.lock().unwrap();
                    f.streams.push(last.clone());
                    last.is_none()
                };
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = sock
                    .write_all(sse_chunk(1, "queued", "q-msg").as_bytes())
                    .await;
                if first {
                    // Dropped mid-stream, without the last chunk.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return;
                }
                let _ = sock
                    .write_all(sse_chunk(2, "running", "r-msg").as_bytes())
                    .await;
                st.lock().unwrap().done = true;
                let _ = sock
                    .write_all(sse_chunk(3, "succeeded", "s-msg").as_bytes())
                    .await;
                let _ = sock.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    (url, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_wait_resumes_a_dropped_event_stream_with_last_event_id() {
    let (u, state) = fake_site(false).await;
    let r = gve(&u, "t", &["job", "wait", "job-1", "-o", "json"])
        .await
        .ok();
    assert_eq!(r.json()["state"], "succeeded", "{}", r.out);
    assert_eq!(
        state.lock().unwrap().streams,
        [None, Some("1".to_string())],
        "{}",
        r.err
    );
    // Each change shown once, though the resumed stream repeated the first.
    for m in ["q-msg", "r-msg", "s-msg"] {
        assert_eq!(r.err.matches(m).count(), 1, "{m}: {}", r.err);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_wait_polls_when_the_event_stream_is_refused_and_exits_with_the_job_error() {
    let (u, state) = fake_site(true).await;
    let r = gve(&u, "t", &["job", "wait", "job-1"]).await;
    assert_eq!(r.code, 6, "invalid-state is a conflict: {}", r.err);
    assert!(
        r.err.contains("running") && r.err.contains("failed"),
        "{}",
        r.err
    );
    assert!(
        r.err
            .contains("error: job job-1 failed: boom (invalid-state)"),
        "{}",
        r.err
    );
    assert!(state.lock().unwrap().gets >= 4);
}
