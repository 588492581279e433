//! A small HTTP/1.1 server on hyper: one task per connection, graceful stop, and
//! limits that keep any one client from holding it: a header-read timeout (which is
//! also the idle keep-alive timeout: hyper arms it whenever a connection waits for
//! its next request head), a cap on header size, a cap on open connections per
//! service and per client address, and body-read timeouts in the body readers
//! ([`super::read_json`], the streamed copies).
//!
//! At a cap, the oldest connection that is not in the middle of a request (a
//! half-open or idle one) is closed to make room; only when every connection is busy
//! is the new one refused. A flood of half-open sockets therefore cannot lock out a
//! client that sends a whole request.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use super::{Body, Response};

/// Something that answers requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request; errors are already turned into responses.
    fn handle(&self, req: hyper::Request<Incoming>) -> impl Future<Output = Response> + Send;
}

/// The limits a service holds its clients to (`[http]` in the site's and agent's
/// config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct HttpLimits {
    /// A request head must arrive within this long, counted from when the
    /// connection starts waiting for it (so also the idle keep-alive timeout), ms.
    pub header_read_timeout_ms: u64,
    /// Largest request head, bytes.
    pub max_header_bytes: usize,
    /// Open connections per service.
    pub max_connections: usize,
    /// Open connections per client address.
    pub max_connections_per_client: usize,
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits {
            header_read_timeout_ms: 10_000,
            max_header_bytes: 64 * 1024,
            max_connections: 4096,
            max_connections_per_client: 1024,
        }
    }
}

impl HttpLimits {
    /// Checks the values; says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let in_range = |name: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err(format!(
                    "http.{name} must be between {lo} and {hi}, not {v}"
                ))
            } else {
                Ok(())
            }
        };
        in_range(
            "header-read-timeout-ms",
            self.header_read_timeout_ms,
            100,
            600_000,
        )?;
        in_range(
            "max-header-bytes",
            self.max_header_bytes as u64,
            4096,
            1 << 20,
        )?;
        in_range("max-connections", self.max_connections as u64, 1, 1 << 20)?;
        in_range(
            "max-connections-per-client",
            self.max_connections_per_client as u64,
            1,
            self.max_connections as u64,
        )
    }
}

/// The longest a request body may pause between two pieces before the request
/// fails (JSON bodies are also bounded in total by this, from their first byte).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Resolves on Ctrl-C or SIGTERM.
pub async fn until_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
    }
}

/// One open connection as the tracker sees it.
struct Conn {
    peer: IpAddr,
    /// Requests in progress (until their response body ends).
    busy: Arc<AtomicUsize>,
    abort: Option<AbortHandle>,
}

#[derive(Default)]
struct Table {
    next: u64,
    /// By age: the oldest connection has the smallest key.
    open: BTreeMap<u64, Conn>,
    per_client: HashMap<IpAddr, usize>,
}

/// The open connections of one service, with its caps.
pub struct Connections {
    limits: HttpLimits,
    table: Mutex<Table>,
}

impl Connections {
    /// A tracker enforcing `limits`.
    pub fn new(limits: HttpLimits) -> Arc<Connections> {
        Arc::new(Connections {
            limits,
            table: Mutex::new(Table::default()),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    /// Connections open now from `peer`.
    pub fn open_from(&self, peer: IpAddr) -> usize {
        self.lock().per_client.get(&peer).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes room for a connection from `peer` and records it; `None` when every
    /// connection in the way is busy (the new one is refused).
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<(u64, Arc<AtomicUsize>)> {
        let mut t = self.lock();
        if t.per_client.get(&peer).copied().unwrap_or(0) >= self.limits.max_connections_per_client
            && !evict_oldest_idle(&mut t, Some(peer))
        {
            return None;
        }
        if t.open.len() >= self.limits.max_connections && !evict_oldest_idle(&mut t, None) {
            return None;
        }
        let id = t.next;
        t.next += 1;
        let busy = Arc::new(AtomicUsize::new(0));
        t.open.insert(
            id,
            Conn {
                peer,
                busy: busy.clone(),
                abort: None,
            },
        );
        *t.per_client.entry(peer).or_default() += 1;
        Some((id, busy))
    }

    fn set_abort(&self, id: u64, abort: AbortHandle) {
        let mut t = self.lock();
        match t.open.get_mut(&id) {
            Some(c) => c.abort = Some(abort),
            // Already gone (evicted before its task was known): end it now.
            None => abort.abort(),
        }
    }

    fn remove(&self, id: u64) {
        let mut t = self.lock();
        forget(&mut t, id);
    }
}

fn forget(t: &mut Table, id: u64) -> Option<Conn> {
    let c = t.open.remove(&id)?;
    if let Some(n) = t.per_client.get_mut(&c.peer) {
        *n -= 1;
        if *n == 0 {
            t.per_client.remove(&c.peer);
        }
    }
    Some(c)
}

/// Closes the oldest connection (of `peer`, or of anyone) with no request in
/// progress; false when there is none.
fn evict_oldest_idle(t: &mut Table, peer: Option<IpAddr>) -> bool {
    let victim = t
        .open
        .iter()
        .find(|(_, c)| peer.is_none_or(|p| c.peer == p) && c.busy.load(Ordering::Acquire) == 0)
        .map(|(id, _)| *id);
    let Some(id) = victim else { return false };
    if let Some(c) = forget(t, id) {
        if let Some(a) = c.abort {
            a.abort();
        }
    }
    tracing::debug!(conn = id, "closed an idle connection to admit a new one");
    true
}

/// Removes a connection from its tracker when its task ends or is aborted.
struct Registered {
    conns: Arc<Connections>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns.remove(self.id);
    }
}

/// Counts a request as in progress until its response body is dropped.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(n: &Arc<AtomicUsize>) -> Busy {
        n.fetch_add(1, Ordering::AcqRel);
        Busy(n.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection marked busy while it is sent.
struct BusyBody {
    inner: Body,
    _busy: Busy,
}

impl hyper::body::Body for BusyBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `handler` on `listener` (over TLS when `tls` is given) until `stop`
/// resolves, within `conns`' limits; then open connections are closed too (a stopped service does not keep answering
/// on kept-alive connections).
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    conns: Arc<Connections>,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let limits = conns.limits;
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // Forget connections that ended.
        while connections.try_join_next().is_some() {}
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // No Nagle: an event stream's frames and a response's last bytes go out
        // as written, not after the peer's delayed ACK (up to 40 ms each).
        let _ = stream.set_nodelay(true);
        let Some((id, busy)) = conns.admit(peer.ip()) else {
            tracing::warn!(%peer, "connection refused: every connection in the way is busy");
            drop(stream);
            continue;
        };
        let registered = Registered {
            conns: conns.clone(),
            id,
        };
        let handler = handler.clone();
        let tls = tls.clone();
        let abort = connections.spawn(async move {
            let _registered = registered;
            let Some(cfg) = tls else {
                return serve_conn(stream, handler, busy, limits, peer).await;
            };
            // The handshake is held to the header timeout too.
            let handshake = tokio_rustls::TlsAcceptor::from(cfg).accept(stream);
            let timeout = Duration::from_millis(limits.header_read_timeout_ms);
            match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(s)) => serve_conn(s, handler, busy, limits, peer).await,
                Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
        conns.set_abort(id, abort);
    }
    connections.abort_all();
    // Wait until every connection's task is gone (and what it held, released).
    while connections.join_next().await.is_some() {}
}

/// A server started by [`spawn`].
pub struct Running {
    /// The accept loop; it ends after `stop` fires and its connections are gone.
    pub task: tokio::task::JoinHandle<()>,
    /// Its open connections.
    pub connections: Arc<Connections>,
    /// Fire to stop it.
    pub stop: tokio::sync::oneshot::Sender<()>,
}

/// Starts serving `handler` on `listener` within `limits`, over TLS when `tls` is
/// given (the site's and the agent's one way to start their HTTP side).
pub fn spawn<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    limits: HttpLimits,
    tls: Option<&super::tls::TlsConfig>,
) -> Result<Running, super::tls::TlsError> {
    let tls = tls.map(|t| t.server_config()).transpose()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let connections = Connections::new(limits);
    let task = tokio::spawn(serve(listener, handler, connections.clone(), tls, async {
        let _ = stopped.await;
    }));
    Ok(Running {
        task,
        connections,
        stop,
    })
}

/// Serves HTTP/1.1 on one connection (plain or TLS).
async fn serve_conn<H, I>(
    io: I,
    handler: Arc<H>,
    busy: Arc<AtomicUsize>,
    limits: HttpLimits,
    peer: SocketAddr,
) where
    H: Handler,
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let handler = handler.clone();
        let guard = Busy::new(&busy);
        async move {
            let resp = handler.handle(req).await;
            let resp = resp.map(|inner| {
                BusyBody {
                    inner,
                    _busy: guard,
                }
                .boxed()
            });
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
        .max_header_size(limits.max_header_bytes);
    if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(%peer, "connection ended: {e}");
    }
}

/// Raises this process's soft limit on open files to its hard limit (as servers
/// that hold many connections do), so caps, not the default 1024, decide.
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}
