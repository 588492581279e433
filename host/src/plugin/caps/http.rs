//! HTTP capability: outgoing wasi:http requests, allowed only to the `host:port`
//! authorities the operator granted. The check runs before any DNS lookup or
//! connection, and the connect / first-byte / between-bytes timeouts are clamped to
//! the plugin's call budget (wasmtime's defaults are 600 s).
//!
//! Known limit: a granted host *name* is resolved at connect time, so a name whose DNS
//! answer changes (rebinding) reaches whatever it resolves to. Grant IP addresses or
//! names under the operator's control.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// The allow-list hook lent to one plugin.
#[derive(Clone, Debug)]
pub struct HttpPolicy {
    plugin: Arc<str>,
    allowed: Arc<Vec<String>>,
    max_timeout: Duration,
}

impl HttpPolicy {
    /// A policy allowing exactly `allowed` (lower-case `host:port`).
    pub fn new(plugin: Arc<str>, allowed: Vec<String>, max_timeout: Duration) -> HttpPolicy {
        HttpPolicy {
            plugin,
            allowed: Arc::new(allowed),
            max_timeout,
        }
    }

    /// The `host:port` a request goes to, with the scheme's default port.
    pub fn authority_of(uri: &http::Uri) -> Option<String> {
        let authority = uri.authority()?;
        let port =
            authority
                .port_u16()
                .unwrap_or(if uri.scheme() == Some(&http::uri::Scheme::HTTP) {
                    80
                } else {
                    443
                });
        Some(format!("{}:{port}", authority.host().to_ascii_lowercase()))
    }

    /// Is a request to `uri` allowed?
    pub fn allows(&self, uri: &http::Uri) -> bool {
        Self::authority_of(uri).is_some_and(|a| self.allowed.contains(&a))
    }

    fn clamp(&self, options: Option<RequestOptions>) -> RequestOptions {
        let max = self.max_timeout;
        let clamp = |t: Option<Duration>| Some(t.map_or(max, |t| t.min(max)));
        let o = options.unwrap_or_default();
        RequestOptions {
            connect_timeout: clamp(o.connect_timeout),
            first_byte_timeout: clamp(o.first_byte_timeout),
            between_bytes_timeout: clamp(o.between_bytes_timeout),
        }
    }
}

type ResponseFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<WasiBody>,
                Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for HttpPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> ResponseFuture {
        if !self.allows(request.uri()) {
            tracing::warn!(
                plugin = &*self.plugin,
                uri = %request.uri(),
                "outgoing HTTP refused: authority not granted"
            );
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        let options = self.clamp(options);
        Box::new(async move {
            use http_body_util::BodyExt;
            let (res, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            Ok((
                res.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_uses_default_ports_and_ignores_case() {
        let p = HttpPolicy::new(
            "t".into(),
            vec!["example.org:443".into(), "127.0.0.1:8080".into()],
            Duration::from_secs(5),
        );
        assert!(p.allows(&"https://Example.org/sdk".parse().unwrap()));
        assert!(!p.allows(&"http://example.org/sdk".parse().unwrap()));
        assert!(p.allows(&"http://127.0.0.1:8080/x".parse().unwrap()));
        assert!(!p.allows(&"http://127.0.0.1:8081/x".parse().unwrap()));
        assert!(!p.allows(&"http://evil.example.org.attacker:443/".parse().unwrap()));
        let o = p.clamp(None);
        assert_eq!(o.connect_timeout, Some(Duration::from_secs(5)));
    }
}
