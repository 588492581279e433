//! The servers cannot be held by clients that connect and never finish: 2,000
//! half-open sockets on loopback, slow bodies, idle keep-alive connections.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::api::server::Connections;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::site::{env, ADMIN};

/// Opens `n` connections that send half a request head and then nothing.
async fn half_open(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /v1/health HTTP/1.1\r\nX:").await.unwrap();
        out.push(s);
    }
    out
}

/// Times one request; it must succeed.
async fn timed(c: &Client, path: &str) -> Duration {
    let t = Instant::now();
    let _: serde_json::Value = c.get(path).await.unwrap();
    t.elapsed()
}

/// True once the server closed `s` (EOF or reset).
async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        // A 408 answer before the close counts as closed too.
        Ok(Ok(_)) => true,
        Err(_) => false,
    }
}

async fn holds_against_half_open_sockets(
    addr: SocketAddr,
    conns: &Connections,
    c: &Client,
    path: &str,
) {
    let loopback = "127.0.0.1".parse().unwrap();
    let mut sockets = half_open(addr, 2000).await;
    // Health and a real, authenticated request are answered at once.
    let health = timed(c, "/v1/health").await;
    let real = timed(c, path).await;
    assert!(
        health < Duration::from_secs(1) && real < Duration::from_secs(1),
        "{addr}: health took {health:?}, {path} took {real:?} behind 2,000 half-open sockets"
    );
    // The per-client cap held: the flood was trimmed oldest first.
    let held = conns.open_from(loopback);
    assert!(held <= 256, "{addr}: {held} connections from one address");
    let mut evicted = 0;
    for s in sockets.iter_mut().take(100) {
        if closed_by_server(s).await {
            evicted += 1;
        }
    }
    assert_eq!(
        evicted, 100,
        "{addr}: the oldest half-open sockets were kept"
    );
    // The newest ones go at the header-read timeout (1 s here).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let last = sockets.last_mut().unwrap();
    assert!(
        closed_by_server(last).await,
        "{addr}: a half-open socket outlived the header timeout"
    );
    drop(sockets);
    let end = Instant::now() + Duration::from_secs(5);
    while conns.open() > 2 {
        assert!(
            Instant::now() < end,
            "{addr}: {} connections stay open",
            conns.open()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_half_open_sockets_hold_neither_site_nor_agent() {
    gve::api::server::raise_fd_limit();
    let e = env(1, |c| {
        c.http.header_read_timeout_ms = 1000;
        c.http.max_connections_per_client = 256;
    })
    .await;
    holds_against_half_open_sockets(e.site.addr, &e.site.connections, &e.admin, "/v1/me").await;
    // The agent (its defaults: 10 s header timeout, 1,024 connections per client)
    // answers behind a flood too.
    let (agent, ac) = &e.agents[0];
    let mut sockets = half_open(agent.addr, 2000).await;
    let t = timed(ac, "/v1/vms").await;
    assert!(t < Duration::from_secs(1), "agent took {t:?}");
    assert!(agent.connections.open_from("127.0.0.1".parse().unwrap()) <= 1024);
    assert!(closed_by_server(&mut sockets[0]).await);
    drop(sockets);
    e.site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_is_answered_408_and_idle_connections_close() {
    let e = env(0, |c| c.http.header_read_timeout_ms = 1000).await;
    let mut s = TcpStream::connect(e.site.addr).await.unwrap();
    let head = format!(
        "POST /v1/users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\":"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let t = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(40), s.read(&mut buf))
        .await
        .expect("the server waited more than 40 s for a body")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(t.elapsed() >= Duration::from_secs(29), "{:?}", t.elapsed());

    // A kept-alive connection that goes quiet is closed at the header timeout.
    let mut k = TcpStream::connect(e.site.addr).await.unwrap();
    k.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = k.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        closed_by_server(&mut k).await,
        "an idle keep-alive connection stayed open"
    );
    e.site.stop().await;
}
