//! HTTP plumbing shared by the site and agent services: request/response types,
//! JSON bodies with a size cap, bearer-token authentication, and errors mapped to
//! status codes with a JSON body `{"error": {"kind", "message"}}`.

pub mod client;
pub mod client_io;
pub mod page;
pub mod server;
pub use crate::tls;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::plugin::{ErrorKind, PluginError};

/// The body of every response: a whole buffer or a stream (file downloads).
pub type Body = BoxBody<Bytes, std::io::Error>;

/// The response type of every handler.
pub type Response = hyper::Response<Body>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Largest JSON request body accepted, bytes.
pub const MAX_JSON_BODY: usize = 1 << 20;

/// Longest long-poll (`wait-ms`), ms.
pub const MAX_WAIT_MS: u64 = 60_000;

/// Most records one listing returns (`limit`).
pub const MAX_LIST: u64 = 100_000;

/// An error as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({kind})")]
pub struct ApiError {
    /// The contract's error kind (or `unauthorized`, `not-found` for routes).
    pub kind: String,
    /// What went wrong, with the object involved.
    pub message: String,
    /// HTTP status.
    #[serde(skip)]
    pub status: u16,
    /// When to try again, seconds (sent as `Retry-After` with a 429 or 503).
    #[serde(skip)]
    pub retry_after_s: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct ErrorBody {
    error: ApiError,
}

impl ApiError {
    /// An error with an explicit status and kind.
    pub fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            kind: kind.to_string(),
            message: message.into(),
            status: status.as_u16(),
            retry_after_s: None,
        }
    }

    /// This error, telling the client to retry after `seconds`.
    pub fn retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after_s = Some(seconds);
        self
    }

    /// 400 with kind `invalid-argument`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid-argument", message)
    }

    /// 401: no or wrong credentials.
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        )
    }

    /// 404 for a path no route serves.
    pub fn no_route(method: &Method, path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no such endpoint: {method} {path}"),
        )
    }

    /// The status code for a contract error kind.
    pub fn status_of(kind: ErrorKind) -> StatusCode {
        match kind {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::AlreadyExists | ErrorKind::InvalidState => StatusCode::CONFLICT,
            ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::Denied => StatusCode::FORBIDDEN,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Backend => StatusCode::BAD_GATEWAY,
        }
    }

    /// The JSON response for this error.
    pub fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry = self.retry_after_s;
        let mut r = json_response(status, &ErrorBody { error: self });
        if let Some(s) = retry {
            r.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from(s),
            );
        }
        r
    }

    /// Parses an error response body (for clients).
    pub fn from_body(status: u16, body: &[u8]) -> ApiError {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(mut b) => {
                b.error.status = status;
                b.error
            }
            Err(_) => ApiError {
                kind: "backend".into(),
                message: format!("HTTP {status}: {}", String::from_utf8_lossy(body).trim()),
                status,
                retry_after_s: None,
            },
        }
    }
}

impl From<PluginError> for ApiError {
    fn from(e: PluginError) -> ApiError {
        let kind = e.kind();
        ApiError::new(ApiError::status_of(kind), kind.as_str(), e.to_string())
    }
}

/// A `200` with a YAML document (the OpenAPI documents).
pub fn yaml(doc: &'static str) -> Result<Response, ApiError> {
    hyper::Response::builder()
        .header(hyper::header::CONTENT_TYPE, "application/yaml")
        .body(full(doc))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e.to_string()))
}

/// `200` with a text body of `content_type` (metrics).
pub fn text(content_type: &'static str, body: String) -> Response {
    let mut r = hyper::Response::new(full(body));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// A body whose frames come from a channel (a task producing a download);
/// an `Err` frame cuts the response.
pub fn channel_body(
    rx: tokio::sync::mpsc::Receiver<Result<hyper::body::Frame<Bytes>, std::io::Error>>,
) -> Body {
    ChannelBody { rx }.boxed()
}

/// The longest a download waits for its client to take the next frame (at most
/// [`FRAME`] bytes) before it is cut, so a client that stops reading frees what
/// the download holds (a plugin instance, the VM's guest turn, a staged disk).
pub const BODY_WRITE_TIMEOUT: std::time::Duration = server::BODY_READ_TIMEOUT;

/// Most bytes in one frame of a [`Feed`]'s body.
pub const FRAME: usize = 256 << 10;

/// A body fed piece by piece from a task: the task's half.
pub struct Feed {
    tx: tokio::sync::mpsc::Sender<Result<hyper::body::Frame<Bytes>, std::io::Error>>,
    stall: Option<std::time::Duration>,
}

impl Feed {
    /// Sends one piece (in frames of at most [`FRAME`] bytes); false when the
    /// reader left or, for a response, took no frame for [`BODY_WRITE_TIMEOUT`]
    /// (the producer should stop).
    pub async fn data(&self, mut piece: Bytes) -> bool {
        while !piece.is_empty() {
            let frame = piece.split_to(piece.len().min(FRAME));
            let send = self.tx.send(Ok(hyper::body::Frame::data(frame)));
            let sent = match self.stall {
                None => send.await.is_ok(),
                Some(stall) => match tokio::time::timeout(stall, send).await {
                    Ok(r) => r.is_ok(),
                    Err(_) => {
                        tracing::info!("a download's client took nothing for {stall:?}; cut");
                        false
                    }
                },
            };
            if !sent {
                return false;
            }
        }
        true
    }

    /// Cuts the body with `why` (the reader sees the connection fail).
    pub async fn fail(&self, why: String) {
        let send = self.tx.send(Err(std::io::Error::other(why)));
        let _ = tokio::time::timeout(BODY_WRITE_TIMEOUT, send).await;
    }
}

/// A streamed response body and the [`Feed`] a task fills it through: at most one
/// frame waits between the two, and a client that takes none for
/// [`BODY_WRITE_TIMEOUT`] is cut.
pub fn feed() -> (Feed, Body) {
    feed_with(Some(BODY_WRITE_TIMEOUT))
}

/// A streamed request body (sent to another service, which bounds how long it
/// waits before reading, e.g. for a VM's guest turn) and its [`Feed`].
pub fn request_feed() -> (Feed, Body) {
    feed_with(None)
}

fn feed_with(stall: Option<std::time::Duration>) -> (Feed, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    (Feed { tx, stall }, channel_body(rx))
}

struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Result<hyper::body::Frame<Bytes>, std::io::Error>>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx)
    }
}

/// 202 with `value`, naming where what it started is followed (`Location: at`).
pub fn accepted_at<T: Serialize + ?Sized>(value: &T, at: &str) -> Response {
    let mut resp = json_response(StatusCode::ACCEPTED, value);
    if let Ok(v) = hyper::header::HeaderValue::from_str(at) {
        resp.headers_mut().insert(hyper::header::LOCATION, v);
    }
    resp
}

/// The id of what a 202 answer started ([`accepted_at`]): its `Location`
/// without `prefix`; none for any other answer.
pub fn accepted_id(resp: &Response, prefix: &str) -> Option<String> {
    if resp.status() != StatusCode::ACCEPTED {
        return None;
    }
    let at = resp.headers().get(hyper::header::LOCATION)?.to_str().ok()?;
    at.strip_prefix(prefix).map(str::to_string)
}

/// A JSON response.
pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_vec_pretty(value).unwrap_or_else(|e| {
        format!(
            "{{\"error\":{{\"kind\":\"backend\",\"message\":\"cannot encode response: {e}\"}}}}"
        )
        .into_bytes()
    });
    hyper::Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .unwrap_or_else(|_| hyper::Response::new(full(Bytes::new())))
}

/// 200 with a JSON body.
pub fn ok<T: Serialize + ?Sized>(value: &T) -> Result<Response, ApiError> {
    Ok(json_response(StatusCode::OK, value))
}

/// Runs `work` on its own task and waits for it: hyper drops a handler whose
/// client closed the connection, even after sending the whole request, and work
/// that records a start must also record its end. `what` names it in the 500 a
/// failed task gives.
pub async fn detached<T: Send + 'static>(
    what: &str,
    work: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "backend",
            format!("the {what} task failed: {e}"),
        )
    })?
}

/// Reads a JSON body of at most [`MAX_JSON_BODY`] bytes into `T`; errors say what is wrong.
pub async fn read_json<T: DeserializeOwned>(body: Incoming) -> Result<T, ApiError> {
    parse_json(&read_small_body(body).await?)
}

/// The next piece of a streamed request body, waiting at most
/// [`server::BODY_READ_TIMEOUT`] for it; `None` at its end.
pub async fn next_frame<B>(body: &mut B) -> Option<Result<hyper::body::Frame<Bytes>, String>>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    match tokio::time::timeout(server::BODY_READ_TIMEOUT, body.frame()).await {
        Err(_) => Some(Err(format!(
            "no data for {} s",
            server::BODY_READ_TIMEOUT.as_secs()
        ))),
        Ok(f) => f.map(|r| r.map_err(|e| e.to_string())),
    }
}

/// A whole request body of at most [`MAX_JSON_BODY`] bytes, within
/// [`server::BODY_READ_TIMEOUT`].
pub async fn read_small_body(body: Incoming) -> Result<Bytes, ApiError> {
    let timeout = server::BODY_READ_TIMEOUT;
    let bytes = tokio::time::timeout(timeout, Limited::new(body, MAX_JSON_BODY).collect())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs()
                ),
            )
        })?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid-argument",
                    format!("the request body is larger than {MAX_JSON_BODY} bytes"),
                )
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
        })?
        .to_bytes();
    Ok(bytes)
}

/// Parses a JSON request body into `T`; an error names the field at fault
/// (`main-memory-mib: invalid value: integer ...`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            ApiError::bad_request(format!("malformed JSON body: {inner}"))
        } else {
            ApiError::bad_request(format!("{path}: {inner}"))
        }
    })
}

/// `value` of field `field` if it lies in `lo..=hi`, else a 400 naming the field
/// and the range.
pub fn in_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    lo: T,
    hi: T,
) -> Result<T, ApiError> {
    if value < lo || value > hi {
        return Err(ApiError::bad_request(format!(
            "{field} must be between {lo} and {hi}, not {value}"
        )));
    }
    Ok(value)
}

/// Checks `Authorization: Bearer <token>` against `expected` in constant time.
pub fn check_bearer<B>(req: &hyper::Request<B>, expected: &str) -> Result<(), ApiError> {
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(ApiError::unauthorized)?;
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

/// Compares two byte strings without an early exit on the first difference.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of query parameter `name` in `uri`, percent-decoded (`+` is a space).
pub fn query_param(uri: &hyper::Uri, name: &str) -> Result<Option<String>, ApiError> {
    let Some(q) = uri.query() else {
        return Ok(None);
    };
    for kv in q.split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if percent_decode(k)? == name {
            return percent_decode(v).map(Some);
        }
    }
    Ok(None)
}

/// Query parameter `name` as a number in `lo..=hi` (`default` when absent); a 400
/// names the parameter and its range otherwise.
pub fn query_u64(
    uri: &hyper::Uri,
    name: &str,
    default: u64,
    lo: u64,
    hi: u64,
) -> Result<u64, ApiError> {
    match query_param(uri, name)? {
        None => Ok(default),
        Some(v) => {
            let n = v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!(
                    "{name} must be a whole number between {lo} and {hi}, not '{v}'"
                ))
            })?;
            in_range(name, n, lo, hi)
        }
    }
}

/// A file mode given as 1-4 octal digits (`0644`), default 0644; anything else
/// (signs, spaces, values above 7777) is a 400.
pub fn parse_mode(v: Option<&str>) -> Result<u32, ApiError> {
    let Some(m) = v else { return Ok(0o644) };
    if m.is_empty() || m.len() > 4 || !m.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(ApiError::bad_request(format!(
            "mode '{m}' is not 1-4 octal digits (0-7777)"
        )));
    }
    u32::from_str_radix(m, 8).map_err(|_| ApiError::bad_request(format!("mode '{m}' is not octal")))
}

/// Decodes `%XX` escapes and `+`; refuses malformed escapes and non-UTF-8 results.
pub fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bad = || ApiError::bad_request(format!("malformed percent-encoding in '{s}'"));
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3).ok_or_else(bad)?;
                let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// Percent-encodes `s` for use as a query value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits a path into its non-empty segments.
pub fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_round_trip_through_json() {
        let e = ApiError::from(PluginError::NotLoaded("kvm".into()));
        assert_eq!(e.status, 404);
        let resp = e.clone().into_response();
        assert_eq!(resp.status(), 404);
        let body = serde_json::to_vec(&ErrorBody { error: e.clone() }).unwrap();
        assert_eq!(ApiError::from_body(404, &body), e);
        assert_eq!(ApiError::from_body(502, b"oops").kind, "backend");
    }

    #[test]
    fn query_values_round_trip_through_percent_encoding() {
        let v = "/tmp/a b+c%d/é";
        let uri: hyper::Uri = format!("/x?path={}&mode=644", percent_encode(v))
            .parse()
            .unwrap();
        assert_eq!(query_param(&uri, "path").unwrap().as_deref(), Some(v));
        assert_eq!(query_param(&uri, "mode").unwrap().as_deref(), Some("644"));
        assert_eq!(query_param(&uri, "none").unwrap(), None);
        let bad: hyper::Uri = "/x?path=%zz".parse().unwrap();
        assert_eq!(query_param(&bad, "path").unwrap_err().status, 400);
    }

    #[test]
    fn bearer_check() {
        let req = hyper::Request::builder()
            .header("authorization", "Bearer s3cret")
            .body(())
            .unwrap();
        assert!(check_bearer(&req, "s3cret").is_ok());
        assert!(check_bearer(&req, "s3cre").is_err());
        let anon = hyper::Request::builder().body(()).unwrap();
        assert_eq!(check_bearer(&anon, "s3cret").unwrap_err().status, 401);
    }
}
