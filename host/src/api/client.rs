//! A JSON client for the gve HTTP APIs (used by the CLI and by the site to reach agents).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::ApiError;

/// A client bound to one service URL and token.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: HyperClient<HttpConnector, Full<Bytes>>,
}

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:7070`).
    pub fn new(base: &str, token: Option<String>) -> Result<Client, ApiError> {
        if !base.starts_with("http://") {
            return Err(ApiError::bad_request(format!(
                "URL '{base}' must start with http://"
            )));
        }
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: HyperClient::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// Sends a request with an optional JSON body and decodes the JSON answer.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method.clone()).uri(&url);
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let bytes = match body {
            Some(b) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                serde_json::to_vec(b)
                    .map_err(|e| ApiError::bad_request(format!("cannot encode request: {e}")))?
            }
            None => Vec::new(),
        };
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| ApiError::bad_request(format!("bad request for {url}: {e}")))?;
        let resp = self.http.request(req).await.map_err(|e| {
            ApiError::new(
                hyper::StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("{method} {url}: {e}"),
            )
        })?;
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
        if !status.is_success() {
            return Err(ApiError::from_body(status.as_u16(), &body));
        }
        let body: &[u8] = if body.is_empty() { b"null" } else { &body };
        serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                status,
                "backend",
                format!("{method} {url}: unexpected answer: {e}"),
            )
        })
    }

    /// GET and decode.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.call::<(), T>(Method::GET, path, None).await
    }
}
