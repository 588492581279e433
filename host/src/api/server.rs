//! A small HTTP/1.1 server on hyper: one task per connection, graceful stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::Response;

/// Something that answers requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request; errors are already turned into responses.
    fn handle(&self, req: hyper::Request<Incoming>) -> impl Future<Output = Response> + Send;
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn until_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
    }
}

/// Serves `handler` on `listener` until `stop` resolves; then open connections are
/// closed too (a stopped service does not keep answering on kept-alive connections).
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
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
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, std::convert::Infallible>(handler.handle(req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
    connections.abort_all();
}
