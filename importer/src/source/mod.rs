//! Byte sources: where the image bytes come from.
//!
//! Every source is a [`ByteSource`]: it can open its object from any offset, which is all the
//! resume logic in [`crate::transfer`] needs. HTTP(S), S3 and registry blobs implement it with
//! `Range` requests; local files with a seek.

pub mod file;
pub mod http;
pub mod registry;
pub mod s3;

use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;

use crate::error::Result;

/// A boxed future (sources are used as trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A body as a stream of chunks.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// An opened body.
pub struct Opened {
    /// The bytes from `start` on.
    pub stream: ByteStream,
    /// Offset of the first byte of `stream` in the object: the requested offset when the
    /// server honoured the range, 0 when it sent the whole object again.
    pub start: u64,
    /// Total size of the object, when known.
    pub total: Option<u64>,
    /// A validator for resuming (`ETag`, else `Last-Modified`), sent back as `If-Range`.
    pub validator: Option<String>,
    /// `Content-Type` of the response, when given.
    pub content_type: Option<String>,
}

/// Something that can serve an object's bytes from any offset.
pub trait ByteSource: Send + Sync {
    /// Open the object at `offset`. With `validator`, the server must send the whole object
    /// (`start == 0`) if it changed since the validator was issued.
    fn open(&self, offset: u64, validator: Option<String>) -> BoxFuture<'_, Result<Opened>>;

    /// Size of the object if the source can tell without a body (HEAD); failures are not
    /// errors (upstream ignores a failed HEAD too).
    fn probe_len(&self) -> BoxFuture<'_, Option<u64>> {
        Box::pin(async { None })
    }

    /// For messages: "http data source", "s3 data source" …
    fn kind(&self) -> &'static str;
}
