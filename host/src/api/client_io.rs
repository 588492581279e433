//! The client's connections, each handing the first I/O error it meets to the client
//! ([`LastIoError`]: the latest so handed). A server that refuses a TLS 1.3 client certificate says so
//! with an alert after the client's side of the handshake is done; when the alert
//! arrives before hyper has sent the request, hyper reports only that the
//! connection "was not ready", and the reason would be lost.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};

/// The latest first I/O error of one of a client's connections, until taken.
#[derive(Clone, Default)]
pub struct LastIoError(Arc<Mutex<Option<String>>>);

impl LastIoError {
    fn keep(&self, e: &io::Error) {
        let text = e.to_string();
        *self.slot() = Some(text);
    }

    /// Takes the error kept, if any.
    pub fn take(&self) -> Option<String> {
        self.slot().take()
    }

    /// The slot; a panic while it was held left nothing half-written in an `Option`.
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connector whose connections keep their I/O errors in a [`LastIoError`].
#[derive(Clone)]
pub struct Recording<C> {
    /// The connector that makes the connections.
    pub inner: C,
    /// Where their errors go.
    pub last: LastIoError,
}

impl<C> tower_service::Service<Uri> for Recording<C>
where
    C: tower_service::Service<Uri>,
    C::Future: Send + 'static,
{
    type Response = Recorded<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let last = self.last.clone();
        Box::pin(async move {
            Ok(Recorded {
                io: connecting.await?,
                last,
                failed: false,
            })
        })
    }
}

/// A connection that hands its first I/O error to a [`LastIoError`] (what follows
/// it, a write to a closed socket, says less).
pub struct Recorded<T> {
    io: T,
    last: LastIoError,
    failed: bool,
}

impl<T> Recorded<T> {
    fn kept<R>(&mut self, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if let Poll::Ready(Err(e)) = &r {
            if !self.failed {
                self.failed = true;
                self.last.keep(e);
            }
        }
        r
    }
}

impl<T: Read + Unpin> Read for Recorded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        this.kept(r)
    }
}

impl<T: Write + Unpin> Write for Recorded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.kept(r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.kept(r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.kept(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.kept(r)
    }
}

impl<T: Connection> Connection for Recorded<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}
