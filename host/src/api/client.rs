//! A client for the gve HTTP APIs (used by the CLI and by the site to reach agents):
//! JSON calls, and streamed uploads and downloads for files.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::client_io::{LastIoError, Recording};
use super::{full, ApiError, Body};

/// How long a JSON call waits for its answer (long polls ask for at most 60 s).
pub const JSON_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// An error with its causes (a TLS refusal hides two levels down).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = c.source();
    }
    out
}

/// A client bound to one service URL and token.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: HyperClient<Recording<HttpsConnector<HttpConnector>>, Body>,
    /// What the connections' last I/O error was (a TLS alert hyper may not report).
    last_io: LastIoError,
}

/// A paged listing read with [`Client::get_pages_unless`].
#[derive(Debug)]
pub enum Listing<T> {
    /// The listing still has the tag the caller gave.
    Unchanged,
    /// Every item, and the first page's entity tag if it had one.
    Changed {
        /// The items, in the listing's order.
        items: Vec<T>,
        /// The `ETag` of the first page.
        tag: Option<String>,
    },
}

/// A paged listing handed over page by page ([`Client::get_pages_each`]).
#[derive(Debug)]
pub enum Paged {
    /// The listing still has the tag the caller gave.
    Unchanged,
    /// Every page was handed over.
    Read {
        /// The `ETag` of the first page.
        tag: Option<String>,
    },
}

impl Client {
    /// A client for `base` (`http://127.0.0.1:7070`; `https://` needs
    /// [`Client::with_tls`] and a fingerprint or CA to verify the server by).
    pub fn new(base: &str, token: Option<String>) -> Result<Client, ApiError> {
        Client::with_tls(base, token, &super::tls::ClientTls::default())
    }

    /// A client for `base` that verifies an `https://` server as `tls` says.
    pub fn with_tls(
        base: &str,
        token: Option<String>,
        tls: &super::tls::ClientTls,
    ) -> Result<Client, ApiError> {
        let https = base.starts_with("https://");
        if !https && !base.starts_with("http://") {
            return Err(ApiError::bad_request(format!(
                "URL '{base}' must start with http:// or https://"
            )));
        }
        if https && tls.fingerprint.is_none() && tls.ca.is_none() {
            return Err(ApiError::bad_request(format!(
                "{base}: an https URL needs the server's certificate fingerprint (--fingerprint, GVE_FINGERPRINT) or a CA (--ca, GVE_CA)"
            )));
        }
        let config = tls
            .client_config()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        // No Nagle: a request's small writes go out at once, not after an ACK
        // that a delayed-ACK peer holds back up to 40 ms.
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let last_io = LastIoError::default();
        let connector = Recording {
            inner: connector,
            last: last_io.clone(),
        };
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: HyperClient::builder(TokioExecutor::new()).build(connector),
            last_io,
        })
    }

    /// The service URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request; answers non-2xx statuses with the decoded error.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Body,
    ) -> Result<hyper::Response<Incoming>, ApiError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method.clone()).uri(&url);
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req
            .body(body)
            .map_err(|e| ApiError::bad_request(format!("bad request for {url}: {e}")))?;
        // Only this request's connections' errors (best effort, see below).
        self.last_io.take();
        let resp = self.http.request(req).await.map_err(|e| {
            let mut why = chain(&e);
            // A connection that failed before the request went out: hyper says only
            // that, and the connection's own error (a TLS alert) says why. Another
            // connection of this client failing at the same moment could be named
            // instead; it is context, never the status. (A connector's own failure
            // carries its cause in the chain already.)
            if why.contains("not ready") {
                if let Some(io) = self.last_io.take().filter(|io| !why.contains(io)) {
                    why.push_str(": ");
                    why.push_str(&io);
                }
            }
            let hint = if why.contains("CertificateRequired") {
                " (the server admits only clients presenting a certificate it lists, and \
                 this client presented none)"
            } else if why.contains("AccessDenied") {
                " (the server admits only clients presenting a certificate it lists, and \
                 does not list the one this client presented)"
            } else {
                ""
            };
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("{method} {url}: {why}{hint}"),
            )
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after_s = resp
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut e = ApiError::from_body(status.as_u16(), &body);
        e.retry_after_s = retry_after_s;
        Err(e)
    }

    /// Reads a whole JSON answer.
    async fn decode<T: DeserializeOwned>(
        method: &Method,
        url: &str,
        resp: hyper::Response<Incoming>,
    ) -> Result<T, ApiError> {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| {
                ApiError::new(
                    status,
                    "unavailable",
                    format!("{method} {url}: reading the answer: {e}"),
                )
            })?
            .to_bytes();
        let body: &[u8] = if body.is_empty() { b"null" } else { &body };
        serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                status,
                "backend",
                format!("{method} {url}: unexpected answer: {e}"),
            )
        })
    }

    /// Sends a request with an optional JSON body and decodes the JSON answer.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        self.call_with(method, path, body, &[]).await
    }

    /// [`Client::call`] with extra headers (e.g. `Idempotency-Key`).
    pub async fn call_with<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        extra: &[(&str, String)],
    ) -> Result<T, ApiError> {
        let (mut headers, bytes) = match body {
            Some(b) => (
                vec![("content-type", "application/json".to_string())],
                serde_json::to_vec(b)
                    .map_err(|e| ApiError::bad_request(format!("cannot encode request: {e}")))?,
            ),
            None => (Vec::new(), Vec::new()),
        };
        headers.extend(extra.iter().cloned());
        // A JSON call that gets no answer in time fails rather than hangs (file
        // streams have no such limit: their answer comes after the whole body).
        let url = format!("{}{path}", self.base);
        let resp = tokio::time::timeout(
            JSON_TIMEOUT,
            self.send(method.clone(), path, &headers, full(bytes)),
        )
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("{method} {url}: no answer within {JSON_TIMEOUT:?}"),
            )
        })??;
        Self::decode(&method, &format!("{}{path}", self.base), resp).await
    }

    /// GET and decode.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    /// GET of a paged listing: follows its `next` links until the last page or
    /// until `max` items were read (then the first `max`).
    pub async fn get_pages<T: DeserializeOwned>(
        &self,
        path: &str,
        max: usize,
    ) -> Result<Vec<T>, ApiError> {
        match self.get_pages_unless(path, max, None).await? {
            Listing::Changed { items, .. } => Ok(items),
            // Only a conditional read is answered `Unchanged`; never taken for empty.
            Listing::Unchanged => Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "backend",
                format!(
                    "GET {}{path}: 304 to a request that named no tag",
                    self.base
                ),
            )),
        }
    }

    /// [`Client::get_pages`], unless the listing still has entity tag `tag`
    /// (sent as `If-None-Match` with the first page; a 304 answers `Unchanged`).
    pub async fn get_pages_unless<T: DeserializeOwned>(
        &self,
        path: &str,
        max: usize,
        tag: Option<&str>,
    ) -> Result<Listing<T>, ApiError> {
        let mut items: Vec<T> = Vec::new();
        let read = self
            .get_pages_each(path, max, tag, |page| items.extend(page))
            .await?;
        Ok(match read {
            Paged::Unchanged => Listing::Unchanged,
            Paged::Read { tag, .. } => Listing::Changed { items, tag },
        })
    }

    /// [`Client::get_pages_unless`], handing each page to `each` as it is read
    /// instead of gathering them: what the caller keeps of a long listing is up
    /// to it.
    pub async fn get_pages_each<T: DeserializeOwned>(
        &self,
        path: &str,
        max: usize,
        tag: Option<&str>,
        mut each: impl FnMut(Vec<T>),
    ) -> Result<Paged, ApiError> {
        let mut read = 0usize;
        let mut first_tag = None;
        let mut next = Some(path.to_string());
        while let Some(path) = next.take() {
            let url = format!("{}{path}", self.base);
            let conditional: Vec<(&str, String)> = match (tag, first_tag.is_none()) {
                (Some(t), true) => vec![("if-none-match", t.to_string())],
                _ => Vec::new(),
            };
            let resp = tokio::time::timeout(
                JSON_TIMEOUT,
                self.send(Method::GET, &path, &conditional, full(Bytes::new())),
            )
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("GET {url}: no answer within {JSON_TIMEOUT:?}"),
                )
            })?;
            let resp = match resp {
                Err(e)
                    if e.status == StatusCode::NOT_MODIFIED.as_u16() && !conditional.is_empty() =>
                {
                    return Ok(Paged::Unchanged)
                }
                r => r?,
            };
            if first_tag.is_none() {
                first_tag = Some(
                    resp.headers()
                        .get(hyper::header::ETAG)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string),
                );
            }
            // Only a path on the same service is followed, and never the same
            // page twice in a row (a server looping on one link ends the listing).
            next =
                super::page::next_link(resp.headers()).filter(|n| n.starts_with('/') && *n != path);
            let mut page: Vec<T> = Self::decode(&Method::GET, &url, resp).await?;
            if page.is_empty() {
                break;
            }
            page.truncate(max - read);
            read += page.len();
            each(page);
            if read >= max {
                break;
            }
        }
        Ok(Paged::Read {
            tag: first_tag.flatten(),
        })
    }

    /// Streams `body` with PUT to `path` and decodes the JSON answer.
    pub async fn put_stream<T: DeserializeOwned>(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: Body,
    ) -> Result<T, ApiError> {
        let resp = self.send(Method::PUT, path, headers, body).await?;
        Self::decode(&Method::PUT, &format!("{}{path}", self.base), resp).await
    }

    /// GET whose successful answer is returned unread, to be streamed.
    pub async fn get_stream(&self, path: &str) -> Result<hyper::Response<Incoming>, ApiError> {
        self.get_stream_with(path, &[]).await
    }

    /// [`Client::get_stream`] with extra headers (e.g. `Last-Event-ID`).
    pub async fn get_stream_with(
        &self,
        path: &str,
        headers: &[(&str, String)],
    ) -> Result<hyper::Response<Incoming>, ApiError> {
        self.send(Method::GET, path, headers, full(Bytes::new()))
            .await
    }
}
