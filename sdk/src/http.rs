//! A small blocking HTTP/1.1 client over `wasi:http` (the manifest must request `http`,
//! and the operator must grant the authorities the plugin talks to).
//!
//! ```no_run
//! # fn demo() -> gve_sdk::Result<()> {
//! use gve_sdk::http::Request;
//! let resp = Request::new("POST", "https://vcenter.example.org/sdk")
//!     .header("content-type", "text/xml")
//!     .body(b"<Envelope/>".to_vec())
//!     .send()?;
//! assert_eq!(resp.status, 200);
//! # Ok(()) }
//! ```
//!
//! Errors follow the contract: a request the host's policy refuses, or to a TLS
//! server whose certificate the host does not trust, is [`Error::Denied`] naming the
//! URL; refused, unreachable or timed-out connections and
//! DNS failures are [`Error::Unavailable`]; a response that does not arrive in time is
//! [`Error::Timeout`]; anything else is [`Error::Backend`].

use core::time::Duration;

use wasi::clocks::monotonic_clock;
use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use wasi::io::poll::{poll, Pollable};
use wasi::io::streams::{InputStream, OutputStream, StreamError};

use crate::deadline;
use crate::error::{Error, Result};

/// The timeout a [`Request`] uses unless [`Request::timeout`] sets another.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a request leaves of the call's budget for the plugin to act on its outcome.
const CALL_KEEP: Duration = Duration::from_millis(500);
/// The shortest timeout a request is sent with when the call's budget bounds it.
const MIN_REQUEST: Duration = Duration::from_millis(100);
/// How far past [`CALL_KEEP`] from the call's end a timeout still counts as the
/// budget's doing (the time the host and plugin take to report it).
const AT_THE_END: Duration = Duration::from_millis(250);

/// Bytes asked for per read of the response body.
const READ_CHUNK: u64 = 64 * 1024;

/// An HTTP request being built.
#[derive(Debug, Clone)]
pub struct Request {
    method: String,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    timeout: Duration,
    /// The timeout is what was left of the call's budget, not the one asked for.
    cut: bool,
    /// Time kept of the call's budget beyond [`CALL_KEEP`] ([`Request::keep`]).
    kept: Duration,
}

/// A complete HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (lower-case, as the host reports them) and values, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The whole body.
    pub body: Vec<u8>,
}

impl Request {
    /// A request with `method` (`GET`, `POST`, ... or any token) to an `http://` or
    /// `https://` URL.
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Request {
        Request {
            method: method.into(),
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            cut: false,
            kept: Duration::ZERO,
        }
    }

    /// A `GET` request.
    pub fn get(url: impl Into<String>) -> Request {
        Request::new("GET", url)
    }

    /// A `POST` request.
    pub fn post(url: impl Into<String>) -> Request {
        Request::new("POST", url)
    }

    /// Adds a header (repeatable).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Request {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    /// Sets the connect, first-byte and between-bytes timeouts.
    pub fn timeout(mut self, timeout: Duration) -> Request {
        self.timeout = timeout;
        self
    }

    /// Keeps `time` of the call's budget for what must follow the request (a clean-up
    /// after its failure): its timeouts end that much earlier than they otherwise
    /// would ([`Request::send`]).
    pub fn keep(mut self, time: Duration) -> Request {
        self.kept = time;
        self
    }

    /// Sends the request and reads the whole response. A body is sent with a
    /// `content-length` header (computed unless the request sets one), never chunked.
    ///
    /// Each of the request's timeouts (connect, first byte, between bytes; the host
    /// applies them per phase) is at most what is left of the plugin's call less
    /// half a second and what [`Request::keep`] set aside
    /// ([`crate::deadline::bounded`]), and so is the whole request, from its body
    /// sent to its response read (a server that trickles its answer ends it there,
    /// whatever the timeouts). So a server that stops answering, or answers too
    /// slowly, ends the request with an error the plugin can act on rather than
    /// the call being stopped by the host. A timeout that ran into that bound fails
    /// with [`crate::deadline::over_budget`]'s `timeout`; a request is not sent
    /// with under 0.6 s of the call left beyond what [`Request::keep`] set aside.
    pub fn send(mut self) -> Result<Response> {
        let asked = self.timeout;
        let limit = deadline::bounded(asked, CALL_KEEP + self.kept);
        if limit >= asked {
            return self.send_now();
        }
        if limit < MIN_REQUEST {
            return Err(deadline::over_budget(format!(
                "HTTP request to {} not sent: {} ms of the call were left, {} ms of them \
                 kept for what follows",
                self.url,
                deadline::remaining().as_millis(),
                (CALL_KEEP + self.kept).as_millis()
            )));
        }
        self.timeout = limit;
        self.cut = true;
        self.send_now()
    }

    /// The error of `code`. A timeout is [`deadline::over_budget`]'s when the
    /// request's timeouts were cut to the call's budget and the call is now at its
    /// end; otherwise (a connect phase has a shorter cap of its own on the host) it
    /// is the server's, as [`map_error`] says.
    fn fail(&self, code: ErrorCode) -> Error {
        use ErrorCode as C;
        let timed_out = matches!(
            code,
            C::DnsTimeout
                | C::ConnectionTimeout
                | C::ConnectionReadTimeout
                | C::ConnectionWriteTimeout
                | C::HttpResponseTimeout
        );
        let end = CALL_KEEP + self.kept + AT_THE_END;
        if self.cut && timed_out && deadline::remaining() <= end {
            return deadline::over_budget(format!(
                "HTTP request to {}: no response within {} ms, what was left of the call \
                 ({code:?})",
                self.url,
                self.timeout.as_millis()
            ));
        }
        map_error(&self.url, code)
    }

    fn send_now(self) -> Result<Response> {
        let url = Url::parse(&self.url)?;
        let bad = |what: &str| {
            Error::invalid_argument(format!("HTTP request to {}: invalid {what}", self.url))
        };
        let mut header_list = self.headers.clone();
        let sized = header_list
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
        let has_body = !self.body.is_empty()
            || matches!(
                self.method.to_ascii_uppercase().as_str(),
                "POST" | "PUT" | "PATCH"
            );
        if has_body && !sized {
            // Send a sized body rather than a chunked one: not every server takes chunks.
            header_list.push((
                "content-length".into(),
                self.body.len().to_string().into_bytes(),
            ));
        }
        let headers =
            Fields::from_list(&header_list).map_err(|e| bad(&format!("header ({e:?})")))?;
        let request = OutgoingRequest::new(headers);
        request
            .set_method(&method(&self.method))
            .map_err(|()| bad("method"))?;
        request
            .set_scheme(Some(&url.scheme))
            .map_err(|()| bad("scheme"))?;
        request
            .set_authority(Some(url.authority))
            .map_err(|()| bad("authority"))?;
        request
            .set_path_with_query(Some(url.path_with_query))
            .map_err(|()| bad("path"))?;
        let body = request.body().map_err(|()| bad("body"))?;

        let options = RequestOptions::new();
        let ns = Some(u64::try_from(self.timeout.as_nanos()).unwrap_or(u64::MAX));
        // A host may refuse to honour an option; the request still goes out.
        let _ = options.set_connect_timeout(ns);
        let _ = options.set_first_byte_timeout(ns);
        let _ = options.set_between_bytes_timeout(ns);

        // The whole request ends within what is left of the call less what is kept.
        let until = Until::new(&self.url, CALL_KEEP + self.kept);
        let pending = outgoing_handler::handle(request, Some(options)).map_err(|c| self.fail(c))?;
        let fail = |c| self.fail(c);
        let written = write_body(&self.url, &until, &fail, body, &self.body);

        until.wait(&pending.subscribe())?;
        let outcome = pending.get();
        if let Err(e) = written {
            // A failed write usually has its real cause in the response.
            return Err(match outcome {
                Some(Ok(Err(code))) => self.fail(code),
                _ => e,
            });
        }
        let response = match outcome {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(self.fail(code)),
            Some(Err(())) => {
                return Err(Error::backend(format!(
                    "HTTP request to {}: response taken twice",
                    self.url
                )))
            }
            None => {
                return Err(Error::backend(format!(
                    "HTTP request to {}: no response after waiting",
                    self.url
                )))
            }
        };
        let status = response.status();
        let headers = response.headers().entries();
        let incoming = response.consume().map_err(|()| {
            Error::backend(format!(
                "HTTP request to {}: response body unavailable",
                self.url
            ))
        })?;
        let body = read_body(&self.url, &until, &fail, &incoming)?;
        drop(IncomingBody::finish(incoming));
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

impl Response {
    /// The first value of header `name` (case-insensitive), if present and UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| core::str::from_utf8(v).ok())
    }

    /// True for a 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as UTF-8 text; invalid UTF-8 is a [`Error::Backend`].
    pub fn text(&self) -> Result<&str> {
        core::str::from_utf8(&self.body)
            .map_err(|e| Error::backend(format!("HTTP response body is not UTF-8: {e}")))
    }
}

/// Maps a `wasi:http` error code of one request onto the contract's error.
type Fail<'a> = dyn Fn(ErrorCode) -> Error + 'a;

/// The instant by which a whole request must end: waits on the host end there.
struct Until<'a> {
    url: &'a str,
    within: Duration,
    timer: Pollable,
}

impl<'a> Until<'a> {
    /// What is left of the call, less `keep`, from now.
    fn new(url: &'a str, keep: Duration) -> Until<'a> {
        let within = deadline::bounded(Duration::MAX, keep);
        let ns = u64::try_from(within.as_nanos()).unwrap_or(u64::MAX);
        let timer = monotonic_clock::subscribe_instant(monotonic_clock::now().saturating_add(ns));
        Until { url, within, timer }
    }

    /// Waits until `p` is ready; the call's `timeout` when the instant comes first.
    fn wait(&self, p: &Pollable) -> Result<()> {
        if poll(&[p, &self.timer]).contains(&0) {
            return self.check();
        }
        Err(self.passed())
    }

    /// The call's `timeout` once the instant has passed (a body that is always
    /// ready to read never waits, so each pass asks).
    fn check(&self) -> Result<()> {
        if self.timer.ready() {
            return Err(self.passed());
        }
        Ok(())
    }

    fn passed(&self) -> Error {
        deadline::over_budget(format!(
            "HTTP request to {}: not done within {} ms, what was left of the call",
            self.url,
            self.within.as_millis()
        ))
    }
}

fn write_body(
    url: &str,
    until: &Until<'_>,
    fail: &Fail<'_>,
    body: OutgoingBody,
    bytes: &[u8],
) -> Result<()> {
    {
        let stream = body.write().map_err(|()| {
            Error::backend(format!("HTTP request to {url}: body stream unavailable"))
        })?;
        write_all(url, until, fail, &stream, bytes)?;
    }
    OutgoingBody::finish(body, None).map_err(fail)
}

/// Writes and flushes `bytes`, each wait for the stream bounded by `until`.
fn write_all(
    url: &str,
    until: &Until<'_>,
    fail: &Fail<'_>,
    stream: &OutputStream,
    mut bytes: &[u8],
) -> Result<()> {
    if bytes.is_empty() {
        // Nothing to flush (a body-less request's stream may be closed already).
        return Ok(());
    }
    let ready = stream.subscribe();
    let error = |e| stream_error(url, fail, e);
    while !bytes.is_empty() {
        until.wait(&ready)?;
        let n = stream.check_write().map_err(error)?;
        // As much as the host takes now (its own chunk size).
        let n = usize::try_from(n).unwrap_or(usize::MAX).min(bytes.len());
        if n > 0 {
            stream.write(&bytes[..n]).map_err(error)?;
            bytes = &bytes[n..];
        }
    }
    // A body written to its `content-length` may be closed by the host as soon
    // as it is whole: closed then means sent.
    match stream.flush() {
        Err(StreamError::Closed) => return Ok(()),
        other => other.map_err(error)?,
    }
    until.wait(&ready)?;
    match stream.check_write() {
        Ok(_) | Err(StreamError::Closed) => Ok(()),
        Err(e) => Err(error(e)),
    }
}

fn read_body(
    url: &str,
    until: &Until<'_>,
    fail: &Fail<'_>,
    incoming: &IncomingBody,
) -> Result<Vec<u8>> {
    let stream: InputStream = incoming.stream().map_err(|()| {
        Error::backend(format!(
            "HTTP request to {url}: response body stream unavailable"
        ))
    })?;
    let ready = stream.subscribe();
    let mut body = Vec::new();
    loop {
        until.check()?;
        match stream.read(READ_CHUNK) {
            Ok(chunk) if chunk.is_empty() => until.wait(&ready)?,
            Ok(chunk) => body.extend_from_slice(&chunk),
            Err(StreamError::Closed) => return Ok(body),
            Err(e) => return Err(stream_error(url, fail, e)),
        }
    }
}

fn stream_error(url: &str, fail: &Fail<'_>, e: StreamError) -> Error {
    match e {
        StreamError::Closed => {
            Error::backend(format!("HTTP request to {url}: stream closed early"))
        }
        StreamError::LastOperationFailed(io) => match wasi::http::types::http_error_code(&io) {
            Some(code) => fail(code),
            // A body's error may come without its code (wasmtime 48 hands on only its
            // text, then a backtrace): its first line says what happened.
            None => {
                let text = io.to_debug_string();
                let what = text.lines().next().unwrap_or_default();
                if what.contains("timeout") {
                    fail(ErrorCode::HttpResponseTimeout)
                } else {
                    Error::backend(format!("HTTP request to {url}: {what}"))
                }
            }
        },
    }
}

/// Maps a `wasi:http` error code onto the contract's error, naming the URL.
pub fn map_error(url: &str, code: ErrorCode) -> Error {
    use ErrorCode as C;
    match code {
        C::HttpRequestDenied | C::DestinationIpProhibited => Error::denied(format!(
            "HTTP request to {url} denied by the host's policy ({code:?})"
        )),
        C::DnsTimeout
        | C::DnsError(_)
        | C::DestinationNotFound
        | C::DestinationUnavailable
        | C::DestinationIpUnroutable
        | C::ConnectionRefused
        | C::ConnectionTerminated
        | C::ConnectionTimeout
        | C::ConnectionReadTimeout
        | C::ConnectionWriteTimeout
        | C::ConnectionLimitReached => {
            Error::unavailable(format!("HTTP request to {url}: cannot connect ({code:?})"))
        }
        C::TlsCertificateError => Error::denied(format!(
            "HTTP request to {url}: the server's TLS certificate is not trusted (not the pinned \
             certificate, or not signed by the granted CA or a public root); nothing was sent"
        )),
        C::HttpResponseTimeout => {
            Error::timeout(format!("HTTP request to {url}: no response in time"))
        }
        other => Error::backend(format!("HTTP request to {url} failed: {other:?}")),
    }
}

fn method(m: &str) -> Method {
    match m.to_ascii_uppercase().as_str() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "CONNECT" => Method::Connect,
        "OPTIONS" => Method::Options,
        "TRACE" => Method::Trace,
        "PATCH" => Method::Patch,
        _ => Method::Other(m.to_string()),
    }
}

/// The parts of an `http(s)://authority/path?query` URL.
struct Url<'a> {
    scheme: Scheme,
    authority: &'a str,
    path_with_query: &'a str,
}

impl<'a> Url<'a> {
    fn parse(url: &'a str) -> Result<Url<'a>> {
        let bad = |why: &str| Error::invalid_argument(format!("URL {url:?} {why}"));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("has no scheme"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            _ => return Err(bad("is not http:// or https://")),
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if authority.is_empty() || authority.contains('@') {
            return Err(bad("needs a host (and no user info)"));
        }
        let tail = tail.split('#').next().unwrap_or("");
        let path_with_query = match tail {
            "" => "/",
            t if t.starts_with('?') => return Err(bad("needs a path before its query")),
            t => t,
        };
        Ok(Url {
            scheme,
            authority,
            path_with_query,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        let u = Url::parse("https://h.example:8443/sdk/x?a=1#frag").unwrap();
        assert!(matches!(u.scheme, Scheme::Https));
        assert_eq!(
            (u.authority, u.path_with_query),
            ("h.example:8443", "/sdk/x?a=1")
        );
        let u = Url::parse("http://127.0.0.1:80").unwrap();
        assert_eq!((u.authority, u.path_with_query), ("127.0.0.1:80", "/"));
        assert!(Url::parse("ftp://x/").is_err());
        assert!(Url::parse("http:///x").is_err());
        assert!(Url::parse("http://u:p@x/").is_err());
    }

    #[test]
    fn error_codes_map_to_contract_errors() {
        let e = map_error("http://x/", ErrorCode::HttpRequestDenied);
        assert!(
            matches!(&e, Error::Denied(m) if m.contains("http://x/")),
            "{e}"
        );
        assert_eq!(
            map_error("u", ErrorCode::ConnectionRefused).kind(),
            "unavailable"
        );
        assert_eq!(
            map_error("u", ErrorCode::HttpProtocolError).kind(),
            "backend"
        );
    }
}
