//! A request body cut into fixed-size pieces for a sink (a guest upload, a staged
//! disk), hashed on the way: the one chunker of every copy into a guest.

use std::future::Future;

use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use crate::api::ApiError;

/// Where the pieces go.
pub(super) trait Sink: Send {
    /// Takes the piece that starts at byte `at` of the body.
    fn put(&mut self, at: u64, piece: &[u8]) -> impl Future<Output = Result<(), ApiError>> + Send;
}

/// Reads `body` to its end and hands it to `sink` in `size`-byte pieces (the last
/// may be shorter); returns the bytes' SHA-256 (hex) and count. A body that fails
/// or stalls is an error naming `path` and how far it got.
pub(super) async fn pieces(
    mut body: Incoming,
    path: &str,
    size: usize,
    sink: &mut impl Sink,
) -> Result<(String, u64), ApiError> {
    let mut hasher = Sha256::new();
    let mut buf: Vec<u8> = Vec::with_capacity(size);
    let (mut received, mut at) = (0u64, 0u64);
    while let Some(frame) = crate::api::next_frame(&mut body).await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request(format!(
                "the upload of {path} stopped after {received} bytes: {e}; nothing was written"
            ))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received += data.len() as u64;
        hasher.update(&data);
        let mut rest: &[u8] = &data;
        while !rest.is_empty() {
            let take = rest.len().min(size - buf.len());
            buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if buf.len() == size {
                sink.put(at, &buf).await?;
                at += buf.len() as u64;
                buf.clear();
            }
        }
    }
    if !buf.is_empty() {
        sink.put(at, &buf).await?;
    }
    Ok((hex::encode(hasher.finalize()), received))
}
