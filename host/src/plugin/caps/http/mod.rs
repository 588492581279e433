//! HTTP capability: outgoing wasi:http requests, allowed only to the `host:port`
//! authorities the operator granted.
//!
//! - The authority is parsed strictly: `http` or `https` only, no `user@` part, the
//!   scheme's default port when none is given; it must equal a grant.
//! - The check runs before any DNS lookup or connection, and the address connected to
//!   is the one checked: a granted name's addresses are pinned at its first use by a
//!   plugin version ([`connect::Pins`]).
//! - DNS, TCP connect, TLS and HTTP handshakes each have a timeout of at most half
//!   the call budget and 10 s, so a silent server fails the request with a timeout
//!   the plugin sees, well before the call's own deadline; first-byte and
//!   between-bytes timeouts are clamped to the call budget (wasmtime's defaults are
//!   600 s).
//! - The whole request, through the last byte of its response body, ends
//!   [`crate::plugin::limits::HOST_WAIT_KEEP`] before the deadline of the call that
//!   sent it, whatever its timeouts: a server that trickles its answer fails it
//!   with a timeout the plugin sees, not the call with the sandbox's stop. A
//!   response (or its body) kept into a later call fails at its first read.
//! - Connections are kept alive: one whose response was read to its end waits (at
//!   most [`connect::IDLE_FOR`], [`connect::IDLE_PER_AUTHORITY`] per authority) for
//!   the plugin's next request to the same authority; anything abandoned is closed.
//! - Budgets per instance: requests in flight (`max-http-requests`; one more fails
//!   with `connection-limit-reached`) and header sets alive (`max-http-header-sets`,
//!   each at most 64 KiB; one more stops the call).

pub mod connect;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Linker, Resource};
use wasmtime::StoreContextMut;
use wasmtime_wasi_http::p2::bindings::http::types::HostFields;
use wasmtime_wasi_http::{
    Error as HttpError, FieldMap, RequestOptions, WasiBody, WasiHttpHooks, WasiHttpView,
};

use crate::plugin::budget;
use crate::plugin::limits::EntryDeadline;
use crate::plugin::state::HostState;

/// Longest a DNS lookup, TCP connect, TLS or HTTP handshake may take, each.
pub const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(10);

/// Largest chunk of a request body the host buffers per request being sent
/// (wasmtime's default is 1 MiB).
pub const OUTGOING_BODY_CHUNK: usize = 64 * 1024;

/// Refused requests logged per instance; later refusals are only counted.
const REFUSALS_LOGGED: usize = 8;

/// Where a checked request goes.
#[derive(Debug, Clone)]
pub struct Target {
    /// The granted `host:port` it matched.
    pub authority: String,
    /// Host name or IP literal (IPv6 in brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Whether it is `https`.
    pub tls: bool,
    /// How its TLS server is verified when the operator said so (else the public
    /// web roots).
    pub trust: Option<Arc<rustls::ClientConfig>>,
}

/// The allow-list and budgets lent to one plugin instance.
#[derive(Clone, Debug)]
pub struct HttpPolicy {
    plugin: Arc<str>,
    allowed: Arc<Vec<String>>,
    trust: Arc<BTreeMap<String, Arc<rustls::ClientConfig>>>,
    pins: Arc<connect::Pins>,
    pool: Arc<connect::Pool>,
    max_timeout: Duration,
    max_in_flight: usize,
    in_flight: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    /// The deadline of the instance's current entry.
    deadline: EntryDeadline,
}

/// Counts one request in flight until dropped (when its response is read or dropped).
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HttpPolicy {
    /// A policy allowing exactly `allowed` (lower-case `host:port`), verifying TLS
    /// servers by `trust` where it names the authority, shared by the instances of
    /// one plugin version.
    pub fn new(
        plugin: Arc<str>,
        allowed: Vec<String>,
        trust: BTreeMap<String, Arc<rustls::ClientConfig>>,
        max_timeout: Duration,
        max_in_flight: u32,
    ) -> HttpPolicy {
        HttpPolicy {
            plugin,
            allowed: Arc::new(allowed),
            trust: Arc::new(trust),
            pins: Arc::default(),
            pool: Arc::default(),
            max_timeout,
            max_in_flight: max_in_flight as usize,
            in_flight: Arc::default(),
            refused: Arc::default(),
            deadline: EntryDeadline::default(),
        }
    }

    /// The policy of one new instance: same grants and pins, its own counters, and
    /// the deadline of its entries (`deadline`, its limiter's).
    pub fn for_instance(&self, deadline: EntryDeadline) -> HttpPolicy {
        HttpPolicy {
            in_flight: Arc::default(),
            refused: Arc::default(),
            deadline,
            ..self.clone()
        }
    }

    /// Requests of this instance whose connection is still open.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Where `uri` goes, if it is allowed; otherwise why not.
    pub fn target(&self, uri: &http::Uri) -> Result<Target, &'static str> {
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("only http and https are allowed"),
        };
        let authority = uri.authority().ok_or("the request has no authority")?;
        if authority.as_str().contains('@') {
            return Err("an authority with a user@ part is refused");
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let host = authority.host().to_ascii_lowercase();
        let key = format!("{host}:{port}");
        if !self.allowed.contains(&key) {
            return Err("authority not granted");
        }
        Ok(Target {
            trust: self.trust.get(&key).cloned(),
            authority: key,
            host,
            port,
            tls,
        })
    }

    /// Is a request to `uri` allowed?
    pub fn allows(&self, uri: &http::Uri) -> bool {
        self.target(uri).is_ok()
    }

    fn timeouts(&self, options: Option<RequestOptions>) -> connect::Timeouts {
        let max = self.max_timeout;
        let clamp = |t: Option<Duration>, ceiling: Duration| t.map_or(ceiling, |t| t.min(ceiling));
        let o = options.unwrap_or_default();
        connect::Timeouts {
            connect: clamp(o.connect_timeout, (max / 2).min(CONNECT_TIMEOUT_MAX)),
            first_byte: clamp(o.first_byte_timeout, max),
            between_bytes: clamp(o.between_bytes_timeout, max),
            until: self
                .deadline
                .wait_until()
                .map(tokio::time::Instant::from_std),
        }
    }

    fn refuse(&self, uri: &http::Uri, why: &str) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed);
        if n < REFUSALS_LOGGED {
            tracing::warn!(plugin = &*self.plugin, uri = %uri, "outgoing HTTP refused: {why}");
        } else if n == REFUSALS_LOGGED {
            tracing::warn!(
                plugin = &*self.plugin,
                "further refused HTTP requests of this instance are not logged"
            );
        }
    }
}

type ResponseFuture = Box<
    dyn Future<Output = wasmtime_wasi_http::Result<(http::Response<WasiBody>, connect::IoFuture)>>
        + Send,
>;

impl WasiHttpHooks for HttpPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> ResponseFuture {
        let target = match self.target(request.uri()) {
            Ok(t) => t,
            Err(why) => {
                self.refuse(request.uri(), why);
                return Box::new(async { Err(HttpError::HttpRequestDenied) });
            }
        };
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.refuse(request.uri(), "too many requests in flight");
            return Box::new(async { Err(HttpError::ConnectionLimitReached) });
        }
        let guard = InFlight(self.in_flight.clone());
        let timeouts = self.timeouts(options);
        let pins = self.pins.clone();
        let pool = self.pool.clone();
        Box::new(async move { connect::send(&pins, &pool, target, request, timeouts, guard).await })
    }

    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        OUTGOING_BODY_CHUNK
    }

    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        1
    }
}

/// Checks the header-set budget before a new `fields` is made.
fn header_set_budget(state: &mut HostState) -> wasmtime::Result<()> {
    let limit = state.limits.max_http_header_sets;
    if budget::holdings(state).http_header_sets >= limit as usize {
        return Err(state
            .limiter
            .over_budget(budget::HTTP_HEADER_SETS, u64::from(limit)));
    }
    Ok(())
}

/// Puts the header-set budget in front of the three ways a plugin makes `fields`
/// (the linker must already hold wasi:http; these definitions shadow its own).
pub fn add_budgets(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance("wasi:http/types@0.2.12")?;
    types.func_wrap(
        "[constructor]fields",
        |mut store: StoreContextMut<'_, HostState>, (): ()| {
            let state = store.data_mut();
            header_set_budget(state)?;
            Ok((HostFields::new(&mut state.http())?,))
        },
    )?;
    types.func_wrap(
        "[static]fields.from-list",
        |mut store: StoreContextMut<'_, HostState>, (entries,): (Vec<(String, Vec<u8>)>,)| {
            let state = store.data_mut();
            header_set_budget(state)?;
            let mut view = state.http();
            let r = match HostFields::from_list(&mut view, entries) {
                Ok(f) => Ok(f),
                Err(e) => Err(
                    wasmtime_wasi_http::p2::bindings::http::types::Host::convert_header_error(
                        &mut view, e,
                    )?,
                ),
            };
            Ok((r,))
        },
    )?;
    types.func_wrap(
        "[method]fields.clone",
        |mut store: StoreContextMut<'_, HostState>, (this,): (Resource<FieldMap>,)| {
            let state = store.data_mut();
            header_set_budget(state)?;
            Ok((HostFields::clone(&mut state.http(), this)?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str]) -> HttpPolicy {
        HttpPolicy::new(
            "t".into(),
            allowed.iter().map(|s| s.to_string()).collect(),
            BTreeMap::new(),
            Duration::from_secs(5),
            4,
        )
    }

    #[test]
    fn allow_list_uses_default_ports_and_ignores_case() {
        let p = policy(&["example.org:443", "127.0.0.1:8080"]);
        assert!(p.allows(&"https://Example.org/sdk".parse().unwrap()));
        assert!(!p.allows(&"http://example.org/sdk".parse().unwrap()));
        assert!(p.allows(&"http://127.0.0.1:8080/x".parse().unwrap()));
        assert!(!p.allows(&"http://127.0.0.1:8081/x".parse().unwrap()));
        assert!(!p.allows(&"http://evil.example.org.attacker:443/".parse().unwrap()));
        let t = p.timeouts(None);
        assert_eq!(t.first_byte, Duration::from_secs(5));
        assert_eq!(t.connect, Duration::from_millis(2_500));
    }

    #[test]
    fn userinfo_other_schemes_and_spellings_are_refused() {
        let p = policy(&["127.0.0.1:37078", "[::1]:80"]);
        for uri in [
            "http://127.0.0.1:37079@127.0.0.1:37078/",
            "http://user@127.0.0.1:37078/",
            "ftp://127.0.0.1:37078/",
            "http://127.1:37078/",
            "http://2130706433:37078/",
            "http://0x7f000001:37078/",
            "http://localhost:37078/",
            "http://127.0.0.1.:37078/",
            "http://[::ffff:127.0.0.1]:37078/",
        ] {
            let uri: http::Uri = uri.parse().unwrap();
            assert!(!p.allows(&uri), "{uri} was allowed");
        }
        assert!(p.allows(&"http://127.0.0.1:37078/x".parse().unwrap()));
        assert!(p.allows(&"http://[::1]/x".parse().unwrap()));
    }

    #[test]
    fn connect_timeouts_are_capped_below_the_budget() {
        let p = HttpPolicy::new(
            "t".into(),
            vec![],
            BTreeMap::new(),
            Duration::from_secs(60),
            4,
        );
        let t = p.timeouts(Some(RequestOptions {
            connect_timeout: Some(Duration::from_secs(600)),
            first_byte_timeout: None,
            between_bytes_timeout: Some(Duration::from_secs(1)),
        }));
        assert_eq!(t.connect, CONNECT_TIMEOUT_MAX);
        assert_eq!(t.first_byte, Duration::from_secs(60));
        assert_eq!(t.between_bytes, Duration::from_secs(1));
    }
}
