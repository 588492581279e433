//! Hostile plugins, one module per attack family. Every attack fails only its own
//! call, with an error naming the plugin and the cause; afterwards a well-behaved
//! plugin in the same host answers within 100 ms and the process's descriptors and
//! resident memory are back near where they were ([`Bench::aftermath`]).
//!
//! The family's tests take one lock, so the process-wide numbers they compare are
//! not moved by another hostile test; the tolerances absorb what other areas' tests
//! do meanwhile, and sit far below what each attack did before it was contained
//! (thousands of descriptors, hundreds of MiB).

mod answers;
mod cpu;
mod descriptors;
mod files;
mod frozen_guest;
mod logs;
mod long_calls;
mod memory;
mod network;

use std::time::{Duration, Instant};

use gve::plugin::{DriverSession, Grants, PluginHost, PluginSpec};

use crate::support::{host, no_creds, spec};

/// Most descriptors the process may have gained across an attack.
const FD_SLACK: i64 = 200;
/// Most resident memory the process may have gained across an attack, KiB.
const RSS_SLACK_KIB: i64 = 160 << 10;

/// The process's descriptor count and resident memory.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    fds: i64,
    rss_kib: i64,
}

/// Measures the process now.
pub fn usage() -> Usage {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count() as i64;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    Usage { fds, rss_kib }
}

/// A host with the hostile plugin and a well-behaved one loaded, holding the
/// family's lock.
pub struct Bench {
    pub host: PluginHost,
    pub hostile: DriverSession,
    pub calm: DriverSession,
    pub before: Usage,
    _dir: tempfile::TempDir,
    _lock: tokio::sync::MutexGuard<'static, ()>,
}

static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Loads `hostile` with `spec` (opened on `endpoint`) and the `memory` example driver.
pub async fn bench_on(sp: PluginSpec, endpoint: &str) -> Bench {
    let lock = LOCK.lock().await;
    let (host, dir) = host();
    host.load(sp).await.unwrap();
    host.load(spec("memory", Grants::default())).await.unwrap();
    let hostile = host
        .open_driver("hostile", endpoint, no_creds())
        .await
        .unwrap();
    let calm = host
        .open_driver("memory", "memory:calm", no_creds())
        .await
        .unwrap();
    calm.host_info().await.unwrap();
    Bench {
        before: usage(),
        host,
        hostile,
        calm,
        _dir: dir,
        _lock: lock,
    }
}

/// [`bench_on`] with the hostile plugin's default endpoint.
pub async fn bench(sp: PluginSpec) -> Bench {
    bench_on(sp, "anywhere").await
}

/// Grants of libvirt's in-process test driver only.
pub fn libvirt_test_grant() -> Grants {
    Grants {
        libvirt: vec!["test:///default".into()],
        ..Default::default()
    }
}

/// The hostile plugin's spec with `grants` and default limits.
pub fn hostile(grants: Grants) -> PluginSpec {
    spec("hostile", grants)
}

impl Bench {
    /// The checks after an attack: the well-behaved plugin answers within 100 ms,
    /// the hostile plugin's next ordinary call works, and descriptors and memory are
    /// back within slack.
    pub async fn aftermath(&self) {
        let t = Instant::now();
        self.calm
            .host_info()
            .await
            .expect("the calm plugin answers");
        let took = t.elapsed();
        assert!(
            took < Duration::from_millis(100),
            "the calm plugin took {took:?}"
        );
        let vm = self
            .hostile
            .get_vm("ordinary")
            .await
            .expect("the next ordinary call works");
        assert_eq!(vm.name, "ordinary");
        let now = usage();
        assert!(
            now.fds - self.before.fds < FD_SLACK,
            "descriptors {} -> {}",
            self.before.fds,
            now.fds
        );
        assert!(
            now.rss_kib - self.before.rss_kib < RSS_SLACK_KIB,
            "resident memory {} -> {} KiB",
            self.before.rss_kib,
            now.rss_kib
        );
    }
}

/// Loopback test servers for the network and descriptor families; each stops by
/// itself after 30 s.
pub mod servers {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// A server that counts connections and answers 200 to each.
    pub fn counting() -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(30);
            while Instant::now() < end {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        c.fetch_add(1, Ordering::SeqCst);
                        stream.set_nonblocking(false).unwrap();
                        stream
                            .set_read_timeout(Some(Duration::from_secs(2)))
                            .unwrap();
                        let mut buf = [0u8; 4096];
                        let _ = stream.read(&mut buf);
                        let _ = stream.write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        (port, count)
    }

    /// A server that answers 200 to every request of a connection, keeping it open
    /// (HTTP/1.1 keep-alive); counts connections accepted and still open.
    pub struct KeepAlive {
        /// Its port.
        pub port: u16,
        /// Connections accepted so far.
        pub accepted: Arc<AtomicUsize>,
        /// Connections the client has not closed.
        pub open: Arc<AtomicUsize>,
        /// Requests answered.
        pub requests: Arc<AtomicUsize>,
    }

    /// Listens on a loopback port for 30 s, handing each connection (blocking) to
    /// `serve` on a thread of its own; returns the port.
    fn serve_each(serve: impl Fn(TcpStream) + Send + Sync + Clone + 'static) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(30);
            while Instant::now() < end {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        let serve = serve.clone();
                        std::thread::spawn(move || serve(stream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        port
    }

    impl KeepAlive {
        /// Starts one; it stops accepting after 30 s.
        pub fn start() -> KeepAlive {
            let (accepted, open, requests) = (Arc::default(), Arc::default(), Arc::default());
            let (a, o, r): (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>) = (
                Arc::clone(&accepted),
                Arc::clone(&open),
                Arc::clone(&requests),
            );
            let port = serve_each(move |mut stream| {
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                stream
                    .set_read_timeout(Some(Duration::from_secs(40)))
                    .unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..i + 4);
                        r.fetch_add(1, Ordering::SeqCst);
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                    }
                }
                o.fetch_sub(1, Ordering::SeqCst);
            });
            KeepAlive {
                port,
                accepted,
                open,
                requests,
            }
        }
    }

    /// A server that answers each connection's request with a chunked body of one
    /// byte every 100 ms (never pausing long enough for a between-bytes timeout),
    /// for at most 20 s; counts the connections the client closed while it sent.
    pub struct Trickle {
        /// Its port.
        pub port: u16,
        /// Connections whose client went away before the body's end.
        pub cut: Arc<AtomicUsize>,
    }

    impl Trickle {
        /// Starts one; it stops accepting after 30 s.
        pub fn start() -> Trickle {
            let cut = Arc::new(AtomicUsize::new(0));
            let c = cut.clone();
            let port = serve_each(move |mut stream| {
                stream
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if stream.write_all(head).is_err() {
                    return;
                }
                for _ in 0..200 {
                    std::thread::sleep(Duration::from_millis(100));
                    if stream.write_all(b"1\r\nx\r\n").is_err() {
                        c.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
                let _ = stream.write_all(b"0\r\n\r\n");
            });
            Trickle { port, cut }
        }
    }

    /// A server that accepts connections and never says anything.
    pub struct Silent {
        /// Its port.
        pub port: u16,
        accepted: Arc<Mutex<Vec<TcpStream>>>,
    }

    impl Silent {
        /// Starts one.
        pub fn start() -> Silent {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            listener.set_nonblocking(true).unwrap();
            let accepted = Arc::new(Mutex::new(Vec::new()));
            let a = accepted.clone();
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(30);
                while Instant::now() < end {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(true).unwrap();
                            a.lock().unwrap().push(stream);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
                a.lock().unwrap().clear();
            });
            Silent { port, accepted }
        }

        /// Connections accepted so far.
        pub fn accepted(&self) -> usize {
            self.accepted.lock().unwrap().len()
        }

        /// Accepted connections the client has not closed.
        pub fn open(&self) -> usize {
            let mut buf = [0u8; 1024];
            self.accepted
                .lock()
                .unwrap()
                .iter()
                .filter(|s| loop {
                    let mut stream: &TcpStream = s;
                    match stream.read(&mut buf) {
                        Ok(0) => break false,
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
                        Err(_) => break false,
                    }
                })
                .count()
        }
    }
}
