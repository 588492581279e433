//! A fault-injecting HTTP proxy in front of one service: it forwards every request,
//! except those its rule picks, which it holds (until the rule changes) or refuses
//! with `503`. Tests use it to stop a job at an exact point of its conversation with
//! an agent.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Picks requests by method and path (with its query).
pub type Pick = Arc<dyn Fn(&Method, &str) -> bool + Send + Sync>;

/// What the proxy does with the requests its rule picks.
#[derive(Clone)]
pub enum Rule {
    /// Forward everything.
    Pass,
    /// Hold picked requests until the rule changes, then act on the new rule.
    Hold(Pick),
    /// Answer picked requests `503 unavailable` at once.
    Refuse(Pick),
}

/// A rule's pick from a closure.
pub fn pick(f: impl Fn(&Method, &str) -> bool + Send + Sync + 'static) -> Pick {
    Arc::new(f)
}

type Body = BoxBody<Bytes, hyper::Error>;

struct Shared {
    target: SocketAddr,
    rule: Mutex<Rule>,
    held: AtomicUsize,
    client: Client<HttpConnector, Incoming>,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `target` that forwards everything.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            target,
            rule: Mutex::new(Rule::Pass),
            held: AtomicUsize::new(0),
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Proxy { addr, shared, task }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the rule; held requests act on the new one.
    pub fn set(&self, rule: Rule) {
        *self.shared.rule.lock().unwrap() = rule;
    }

    /// How many requests are being held now.
    pub fn held(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Waits up to `within` until at least one request is held.
    pub async fn wait_held(&self, within: Duration) {
        let end = tokio::time::Instant::now() + within;
        while self.held() == 0 {
            assert!(
                tokio::time::Instant::now() < end,
                "no request was held within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// One request counted in a count of held ones while it lives.
struct Held<'a>(&'a AtomicUsize);

impl<'a> Held<'a> {
    fn new(count: &'a AtomicUsize) -> Held<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Held(count)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(s: Arc<Shared>, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    // Counted as held while it waits, until it goes on or its client goes away
    // (hyper then drops this future: a held request whose client died is never
    // forwarded).
    let mut holding: Option<Held> = None;
    loop {
        let rule = s.rule.lock().unwrap().clone();
        match rule {
            Rule::Hold(p) if p(req.method(), &path) => {
                holding.get_or_insert_with(|| Held::new(&s.held));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Rule::Refuse(p) if p(req.method(), &path) => {
                drop(holding);
                let body =
                    r#"{"error":{"kind":"unavailable","message":"refused by the test's proxy"}}"#;
                return Ok(answer(StatusCode::SERVICE_UNAVAILABLE, body.into()));
            }
            _ => break,
        }
    }
    drop(holding);
    *req.uri_mut() = format!("http://{}{path}", s.target).parse().unwrap();
    Ok(match s.client.request(req).await {
        Ok(resp) => resp.map(|b| b.boxed()),
        Err(e) => answer(
            StatusCode::BAD_GATEWAY,
            format!(r#"{{"error":{{"kind":"unavailable","message":"proxy: {e}"}}}}"#),
        ),
    })
}
