//! The client's connections, each keeping its I/O errors (the last one met) for the client
//! ([`LastIoError`]). A server that refuses a TLS 1.3 client certificate says so
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

/// The last I/O error one of a client's connections met, until taken.
#[derive(Clone, Default)]
pub struct LastIoError(Arc<Mutex<Option<String>>>);

impl LastIoError {
    fn keep(&self, e: &io::Error) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(e.to_string());
        }
    }

    /// Takes the error kept, if any.
    pub fn take(&self) -> Option<String> {
        self.0.lock().ok()?.take()
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
            })
        })
    }
}

/// A connection that keeps its I/O errors in a [`LastIoError`].
pub struct Recorded<T> {
    io: T,
    last: LastIoError,
}

impl<T> Recorded<T> {
    fn kept<R>(&self, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if let Poll::Ready(Err(e)) = &r {
            self.last.keep(e);
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
