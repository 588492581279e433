//! How a granted outgoing request is sent: resolve, check every address against the
//! pinned answer, connect, TLS and HTTP handshakes, each under its own timeout.
//!
//! This replaces wasmtime's default sender, which resolves a second time at connect
//! (so the checked name and the connected address could differ), puts no timeout on
//! the TLS handshake and reads the authority after any `user@` part.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use wasmtime_wasi_http::{Error as HttpError, WasiBody};

use super::Target;

/// Timeouts of one request (already clamped to the plugin's budget).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// DNS, TCP connect, TLS handshake and HTTP handshake, each.
    pub connect: Duration,
    /// From the request sent to the response head.
    pub first_byte: Duration,
    /// Between two chunks of the response body.
    pub between_bytes: Duration,
    /// When the whole request, its body read to the end, must be over (the call
    /// that sent it ends soon after); `None`: no such bound.
    pub until: Option<tokio::time::Instant>,
}

/// Addresses each granted host name resolved to the first time it was used by this
/// plugin version; later answers may only narrow them (DNS rebinding cannot move a
/// grant to another address).
#[derive(Debug, Default)]
pub struct Pins(Mutex<HashMap<String, Pinned>>);

/// The pinned addresses of one authority.
#[derive(Debug)]
struct Pinned {
    ips: Vec<IpAddr>,
    warned: bool,
}

impl Pins {
    /// The addresses of `target` the plugin may connect to now.
    pub async fn resolve(
        &self,
        target: &Target,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, HttpError> {
        if let Ok(ip) = target
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(vec![SocketAddr::new(ip, target.port)]);
        }
        let answer: Vec<SocketAddr> = tokio::time::timeout(
            timeout,
            tokio::net::lookup_host((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| HttpError::DnsTimeout)?
        .map_err(|e| HttpError::DnsError {
            rcode: Some(e.to_string()),
            info_code: None,
        })?
        .collect();
        let mut pins = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let pinned = pins
            .entry(target.authority.clone())
            .or_insert_with(|| Pinned {
                ips: answer.iter().map(SocketAddr::ip).collect(),
                warned: false,
            });
        let allowed: Vec<SocketAddr> = answer
            .iter()
            .copied()
            .filter(|a| pinned.ips.contains(&a.ip()))
            .collect();
        if allowed.is_empty() {
            if !std::mem::replace(&mut pinned.warned, true) {
                tracing::warn!(
                    authority = target.authority,
                    now = ?answer,
                    pinned = ?pinned.ips,
                    "outgoing HTTP refused: the granted name now resolves elsewhere than when first used"
                );
            }
            return Err(HttpError::DestinationIpProhibited);
        }
        Ok(allowed)
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// TLS settings for plugin requests: the Mozilla root set.
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.into(),
            };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(roots).with_no_client_auth())
                .unwrap_or_else(|e| {
                    // The ring provider supports the default versions; this is unreachable
                    // in practice, but a panic here would take the agent down.
                    tracing::error!("TLS client config: {e}");
                    rustls::ClientConfig::builder()
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth()
                });
            Arc::new(config)
        })
        .clone()
}

/// Connects to the first of `addrs` that answers, then does TLS if asked.
async fn connect(
    target: &Target,
    addrs: &[SocketAddr],
    t: Duration,
) -> Result<Box<dyn Io>, HttpError> {
    let mut last = HttpError::ConnectionRefused;
    let mut stream = None;
    for addr in addrs {
        match tokio::time::timeout(t, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                // Requests go out as headers then body: without this, Nagle's
                // algorithm holds the body for the server's delayed ACK (40 ms).
                let _ = s.set_nodelay(true);
                stream = Some(s);
                break;
            }
            Ok(Err(e)) => last = HttpError::Connect(e),
            Err(_) => last = HttpError::ConnectionTimeout,
        }
    }
    let stream = stream.ok_or(last)?;
    if !target.tls {
        return Ok(Box::new(stream));
    }
    let bare = target.host.trim_start_matches('[').trim_end_matches(']');
    let name = match bare.parse::<IpAddr>() {
        Ok(ip) => rustls::pki_types::ServerName::from(ip),
        Err(_) => rustls::pki_types::ServerName::try_from(bare.to_string())?,
    };
    let config = target.trust.clone().unwrap_or_else(tls_config);
    let tls = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(t, tls.connect(name, stream)).await {
        Ok(Ok(s)) => Ok(Box::new(s)),
        Ok(Err(e)) => Err(tls_error(&target.authority, e)),
        Err(_) => Err(HttpError::ConnectionTimeout),
    }
}

/// A failed TLS handshake as the plugin sees it: a server whose certificate fails
/// verification is `TLS-certificate-error` (the plugin can say "not trusted"), an
/// alert from the server `TLS-alert-received`, anything else the I/O error. The
/// reason is logged for the operator: the plugin only gets the code.
fn tls_error(authority: &str, e: std::io::Error) -> HttpError {
    let reason = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match reason {
        Some(
            r @ (rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented),
        ) => {
            tracing::warn!(authority, "TLS server not trusted: {r}");
            HttpError::TlsCertificateError
        }
        Some(rustls::Error::AlertReceived(a)) => {
            tracing::warn!(authority, "TLS server sent an alert: {a:?}");
            HttpError::TlsAlertReceived {
                alert_id: None,
                alert_message: Some(format!("{a:?}")),
            }
        }
        _ => {
            tracing::warn!(authority, "TLS handshake failed: {e}");
            HttpError::Tls(e)
        }
    }
}

/// The connection's end, as wasmtime-wasi-http expects it.
pub type IoFuture = Box<dyn std::future::Future<Output = Result<(), HttpError>> + Send>;

/// Idle connections kept per authority (and scheme) for a plugin version.
pub const IDLE_PER_AUTHORITY: usize = 4;
/// Longest a connection waits idle for its next request.
pub const IDLE_FOR: Duration = Duration::from_secs(30);
/// Longest a pooled connection may take to say it is ready for the next request.
const READY_WAIT: Duration = Duration::from_millis(100);

type Sender = hyper::client::conn::http1::SendRequest<WasiBody>;

/// A connection whose driver runs in its own task; dropped, the connection ends.
struct Conn {
    sender: Sender,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connections whose last response was read to its end, kept for the next request
/// to the same authority (at most [`IDLE_PER_AUTHORITY`] each, for [`IDLE_FOR`]). A
/// connection goes back only once its response is read whole: one dropped or
/// abandoned earlier (a call that ended, a request never awaited) is closed.
#[derive(Default)]
pub struct Pool(Mutex<HashMap<String, Vec<(Conn, std::time::Instant)>>>);

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} idle)", self.idle())
    }
}

impl Pool {
    /// Connections idle now.
    pub fn idle(&self) -> usize {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.values().map(Vec::len).sum()
    }

    fn take(&self, key: &str) -> Option<Conn> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let list = m.get_mut(key)?;
        while let Some((c, since)) = list.pop() {
            if since.elapsed() < IDLE_FOR && !c.sender.is_closed() {
                return Some(c);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, key: String, c: Conn) {
        if c.sender.is_closed() {
            return;
        }
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let list = m.entry(key).or_default();
        list.retain(|(c, since)| since.elapsed() < IDLE_FOR && !c.sender.is_closed());
        if list.len() >= IDLE_PER_AUTHORITY {
            return;
        }
        list.push((c, std::time::Instant::now()));
        drop(m);
        // Close it if nothing takes it in time.
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(IDLE_FOR + Duration::from_secs(1)).await;
            if let Some(p) = pool.upgrade() {
                p.evict();
            }
        });
    }

    fn evict(&self) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for list in m.values_mut() {
            list.retain(|(c, since)| since.elapsed() < IDLE_FOR && !c.sender.is_closed());
        }
        m.retain(|_, l| !l.is_empty());
    }
}

/// Sends `request` to `target`, on an idle connection of `pool` when there is one.
/// `guard` is held until the response is read or dropped. Past `t.until` it fails
/// with `http-response-timeout`, and its body with `connection-read-timeout`.
pub async fn send<G: Send + 'static>(
    pins: &Pins,
    pool: &Arc<Pool>,
    target: Target,
    request: http::Request<WasiBody>,
    t: Timeouts,
    guard: G,
) -> Result<(http::Response<WasiBody>, IoFuture), HttpError> {
    let sending = send_within(pins, pool, target, request, t, guard);
    match t.until {
        Some(until) => tokio::time::timeout_at(until, sending)
            .await
            .map_err(|_| HttpError::HttpResponseTimeout)?,
        None => sending.await,
    }
}

async fn send_within<G: Send + 'static>(
    pins: &Pins,
    pool: &Arc<Pool>,
    target: Target,
    mut request: http::Request<WasiBody>,
    t: Timeouts,
    guard: G,
) -> Result<(http::Response<WasiBody>, IoFuture), HttpError> {
    // Origin form on the wire: the authority went into the Host header.
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    *request.uri_mut() = path.parse().map_err(|_| HttpError::HttpRequestUriInvalid)?;
    let key = format!(
        "{}://{}",
        if target.tls { "https" } else { "http" },
        target.authority
    );
    let guard: Box<dyn Send> = Box::new(guard);
    // An idle connection first; a request it could not send goes on the next one.
    while let Some(mut c) = pool.take(&key) {
        match tokio::time::timeout(READY_WAIT, c.sender.ready()).await {
            Ok(Ok(())) => {}
            _ => continue,
        }
        let sent = tokio::time::timeout(t.first_byte, c.sender.try_send_request(request)).await;
        match sent {
            Err(_) => return Err(HttpError::ConnectionReadTimeout),
            Ok(Ok(response)) => return Ok(respond(response, c, pool, key, t, guard)),
            Ok(Err(mut e)) => match e.take_message() {
                Some(r) => request = r,
                None => return Err(hyper_error(e.into_error())),
            },
        }
    }
    let addrs = pins.resolve(&target, t.connect).await?;
    let io = connect(&target, &addrs, t.connect).await?;
    let (sender, conn) = tokio::time::timeout(
        t.connect,
        hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(io)),
    )
    .await
    .map_err(|_| HttpError::ConnectionTimeout)??;
    let mut c = Conn {
        sender,
        task: tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("plugin HTTP connection ended: {e}");
            }
        }),
    };
    let response = tokio::time::timeout(t.first_byte, c.sender.send_request(request))
        .await
        .map_err(|_| HttpError::ConnectionReadTimeout)?
        .map_err(hyper_error)?;
    Ok(respond(response, c, pool, key, t, guard))
}

/// The response handed to the plugin: its body times out between chunks and at
/// `t.until`, holds the connection (and `guard`) until read, then gives the
/// connection back to `pool`.
fn respond(
    response: http::Response<hyper::body::Incoming>,
    conn: Conn,
    pool: &Arc<Pool>,
    key: String,
    t: Timeouts,
    guard: Box<dyn Send>,
) -> (http::Response<WasiBody>, IoFuture) {
    let between = t.between_bytes.max(Duration::from_millis(1));
    let pool = pool.clone();
    let response = response.map(|incoming| {
        use http_body_util::BodyExt;
        TimedBody {
            incoming,
            between,
            timer: Box::pin(tokio::time::sleep(between)),
            until: t.until.map(|u| Box::pin(tokio::time::sleep_until(u))),
            reuse: Some((conn, pool, key)),
            _guard: guard,
        }
        .boxed_unsync()
    });
    // The connection lives in its own task and in the body; nothing else to drive.
    let io: IoFuture = Box::new(async { Ok(()) });
    (response, io)
}

/// A hyper error as the plugin sees it: a server that closes the connection before
/// its answer is complete (it died, or was restarted) is `connection-terminated`,
/// which plugins treat as the server being unavailable, not as a protocol error.
fn hyper_error(e: hyper::Error) -> HttpError {
    if e.is_timeout() {
        HttpError::HttpResponseTimeout
    } else if e.is_incomplete_message()
        || e.is_canceled()
        || e.is_closed()
        || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
    {
        HttpError::ConnectionTerminated
    } else {
        e.into()
    }
}

/// A response body that fails when no chunk arrives for `between`, or when it is
/// not read to its end by `until`, and gives its connection back to the pool once
/// read to the end.
struct TimedBody {
    incoming: hyper::body::Incoming,
    between: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    until: Option<Pin<Box<tokio::time::Sleep>>>,
    reuse: Option<(Conn, Arc<Pool>, String)>,
    _guard: Box<dyn Send>,
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        // Past the call's end nothing more is handed over, even a body that keeps
        // coming (the connection is dropped with the body, not reused).
        if let Some(until) = self.until.as_mut() {
            if until.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout)));
            }
        }
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = tokio::time::Instant::now() + self.between;
                self.timer.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(hyper_error(e)))),
            Poll::Ready(None) => {
                if let Some((conn, pool, key)) = self.reuse.take() {
                    pool.put(key, conn);
                }
                Poll::Ready(None)
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str, port: u16) -> Target {
        Target {
            authority: format!("{host}:{port}"),
            host: host.into(),
            port,
            tls: false,
            trust: None,
        }
    }

    #[tokio::test]
    async fn a_granted_name_cannot_move_to_another_address() {
        let t = target("localhost", 8080);
        let fresh = Pins::default();
        let first = fresh.resolve(&t, Duration::from_secs(2)).await.unwrap();
        assert!(!first.is_empty());
        assert!(first.iter().all(|a| a.ip().is_loopback()), "{first:?}");
        // As if the name had pointed elsewhere when first used: today's answer is refused.
        let moved = Pins::default();
        moved.0.lock().unwrap().insert(
            "localhost:8080".into(),
            Pinned {
                ips: vec!["192.0.2.7".parse().unwrap()],
                warned: false,
            },
        );
        assert!(matches!(
            moved.resolve(&t, Duration::from_secs(2)).await,
            Err(HttpError::DestinationIpProhibited)
        ));
        // IP literals are connected to as written, never looked up.
        let lit = fresh
            .resolve(&target("[::1]", 80), Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(lit, vec!["[::1]:80".parse().unwrap()]);
    }
}
