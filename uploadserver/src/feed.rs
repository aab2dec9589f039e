//! The async → sync bridge: request body chunks travel over a bounded channel to the blocking
//! thread where the formats engine reads them as a plain `std::io::Read`.
//!
//! ```text
//!   request body (async) ──Feed::send──► [ FEED_DEPTH chunks ] ──FeedReader::read──► convert_reader
//!                          backpressure: send waits while the converter is behind
//! ```
//!
//! End of stream is an explicit [`Msg::End`], never the channel closing: if the sending side
//! disappears (the request was dropped, the server is shutting down) the reader reports a
//! truncated stream, so a partial raw image can never pass as a complete one. While an upload
//! is interrupted and waiting to be resumed, nobody sends and the converter simply blocks in
//! `read`; the resumed request continues feeding the same channel.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

/// Chunks in flight between the request and the converter. Body frames are at most a few
/// hundred KiB, so this bounds the bridge to a few MiB per upload while letting network and
/// disk overlap.
pub const FEED_DEPTH: usize = 8;

/// One message to the converter.
#[derive(Debug)]
pub enum Msg {
    /// Body bytes.
    Data(Bytes),
    /// The body is complete (and its digest, if any, verified).
    End,
    /// Give up: the reader fails with this message (digest mismatch, abandoned resume).
    Abort(String),
}

/// The sending half, owned by whoever currently feeds the upload.
#[derive(Debug, Clone)]
pub struct Feed {
    tx: mpsc::Sender<Msg>,
    eof: Arc<EofSignal>,
}

/// Set when the converter has read [`Msg::End`]: every byte has been decoded and only the
/// target's finish (resize, preallocation, fsync) remains.
#[derive(Debug, Default)]
pub struct EofSignal {
    seen: AtomicBool,
    notify: Notify,
}

impl EofSignal {
    /// Wait until the converter has consumed the end of the stream.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.seen.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn set(&self) {
        self.seen.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

/// A closed feed: the converter is gone (it failed or finished early).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConverterGone;

impl Feed {
    /// Send a message, waiting while the channel is full.
    pub async fn send(&self, msg: Msg) -> Result<(), ConverterGone> {
        self.tx.send(msg).await.map_err(|_| ConverterGone)
    }

    /// The end-of-stream signal of this feed's reader.
    pub fn eof(&self) -> Arc<EofSignal> {
        self.eof.clone()
    }
}

/// The reading half, handed to the converter thread.
#[derive(Debug)]
pub struct FeedReader {
    rx: mpsc::Receiver<Msg>,
    current: Bytes,
    ended: bool,
    eof: Arc<EofSignal>,
}

/// A connected feed and reader.
pub fn channel() -> (Feed, FeedReader) {
    let (tx, rx) = mpsc::channel(FEED_DEPTH);
    let eof = Arc::new(EofSignal::default());
    (
        Feed {
            tx,
            eof: eof.clone(),
        },
        FeedReader {
            rx,
            current: Bytes::new(),
            ended: false,
            eof,
        },
    )
}

impl Read for FeedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.current.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Msg::Data(b)) => self.current = b,
                Some(Msg::End) => {
                    self.ended = true;
                    self.eof.set();
                    return Ok(0);
                }
                Some(Msg::Abort(reason)) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, reason));
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upload stream ended before the client finished sending",
                    ));
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(mut r: FeedReader) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    #[tokio::test]
    async fn explicit_end_is_eof() {
        let (feed, reader) = channel();
        let eof = feed.eof();
        let t = tokio::task::spawn_blocking(move || read_all(reader));
        feed.send(Msg::Data(Bytes::from_static(b"abc")))
            .await
            .unwrap();
        feed.send(Msg::Data(Bytes::from_static(b"def")))
            .await
            .unwrap();
        feed.send(Msg::End).await.unwrap();
        eof.wait().await;
        assert_eq!(t.await.unwrap().unwrap(), b"abcdef");
    }

    #[tokio::test]
    async fn dropped_feed_is_truncation_not_eof() {
        let (feed, reader) = channel();
        let t = tokio::task::spawn_blocking(move || read_all(reader));
        feed.send(Msg::Data(Bytes::from_static(b"abc")))
            .await
            .unwrap();
        drop(feed);
        let err = t.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn abort_fails_the_reader_with_the_reason() {
        let (feed, reader) = channel();
        let t = tokio::task::spawn_blocking(move || read_all(reader));
        feed.send(Msg::Abort("digest mismatch".into()))
            .await
            .unwrap();
        assert!(
            t.await
                .unwrap()
                .unwrap_err()
                .to_string()
                .contains("digest mismatch")
        );
    }

    #[tokio::test]
    async fn send_fails_once_the_reader_is_gone() {
        let (feed, reader) = channel();
        drop(reader);
        assert_eq!(feed.send(Msg::End).await, Err(ConverterGone));
    }
}
