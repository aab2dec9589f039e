//! The resumable byte stream between an async source and the blocking conversion.
//!
//! ```text
//!  ByteSource ──open(offset)──► pump (async task) ──bounded channel──► ChannelReader (Read)
//!                 ▲   break: reset, early EOF, idle watchdog            │ hash + count here,
//!                 └── Range + If-Range from the byte reached ◄──────────┘ below the decoders
//! ```
//!
//! The pump sends every byte exactly once in order, so decoders above the reader see one
//! continuous stream across resumes. When a server answers a resume with the whole object
//! (Range ignored, or the object changed per `If-Range`), the pump sends [`Item::Restart`]
//! and starts again from byte 0; the consumer then restarts its conversion from scratch.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::checksum::{Checksum, Hasher};
use crate::error::{ErrorKind, ImportError, Result};
use crate::progress::Progress;
use crate::source::{ByteSource, Opened};

/// Attempts to continue a broken transfer before failing (all but the first wait a backoff). Enough
/// for a flaky link, few enough that a dead server fails within minutes.
pub const MAX_RESUME_ATTEMPTS: u32 = 8;
/// A continuation that delivered this much forgives earlier failures, so a long transfer over
/// a link that drops now and then is not failed by the sum of unrelated drops.
pub const FAILURE_RESET_BYTES: u64 = 64 << 20;
/// Backoff before the second consecutive attempt; doubled per further failure. The first
/// attempt after a drop is immediate: a lone dropped connection (a proxy or load balancer
/// recycling it) is the common case, and the server is usually fine.
pub const RETRY_BACKOFF_START: Duration = Duration::from_secs(1);
/// Backoff cap.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A transfer that delivers no byte for this long is treated as broken (upstream's watchdog
/// cancels after 10 minutes; we resume instead).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Chunks buffered between the pump and the conversion. Chunks are at most a few hundred KiB,
/// so this bounds memory to a few MiB while letting the network run ahead of the disk.
pub const CHANNEL_DEPTH: usize = 16;

/// Retry and watchdog settings (defaults are the constants above; tests shrink them).
#[derive(Debug, Clone, Copy)]
pub struct TransferLimits {
    /// See [`MAX_RESUME_ATTEMPTS`].
    pub max_attempts: u32,
    /// See [`RETRY_BACKOFF_START`].
    pub backoff_start: Duration,
    /// See [`RETRY_BACKOFF_MAX`].
    pub backoff_max: Duration,
    /// See [`IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
}

impl Default for TransferLimits {
    fn default() -> Self {
        TransferLimits {
            max_attempts: MAX_RESUME_ATTEMPTS,
            backoff_start: RETRY_BACKOFF_START,
            backoff_max: RETRY_BACKOFF_MAX,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

impl TransferLimits {
    fn backoff(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let factor = 1u32 << attempt.saturating_sub(2).min(16);
        self.backoff_start
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// What travels from the pump to the reader.
#[derive(Debug)]
pub enum Item {
    /// The next bytes.
    Data(Bytes),
    /// The source starts over at byte 0; everything sent so far is void.
    Restart,
    /// The object ended cleanly.
    End,
    /// The transfer failed for good.
    Fail(ImportError),
}

/// What the pump did, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PumpStats {
    /// Successful continuations from the byte reached.
    pub resumes: u32,
    /// Times the source started over from byte 0.
    pub restarts: u32,
}

/// A channel sized by [`CHANNEL_DEPTH`].
pub fn channel() -> (mpsc::Sender<Item>, mpsc::Receiver<Item>) {
    mpsc::channel(CHANNEL_DEPTH)
}

enum Break {
    Broken(String),
    Stop,
}

/// Stream `first` (and continuations) into `tx` until the object ends, the retries run out,
/// `cancel` fires, or the reader goes away.
pub async fn pump(
    source: Arc<dyn ByteSource>,
    first: Opened,
    tx: mpsc::Sender<Item>,
    limits: TransferLimits,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> PumpStats {
    let mut stats = PumpStats::default();
    let mut offset = first.start;
    let mut total = first.total;
    let mut validator = first.validator.clone();
    let mut opened = first;
    let mut failures = 0u32;
    let mut offset_at_last_break = offset;
    loop {
        if let Some(t) = total {
            progress.set_total(t);
        }
        let cause = match stream_body(
            &mut opened,
            &tx,
            &limits,
            &progress,
            &cancel,
            &mut offset,
            total,
        )
        .await
        {
            Ok(()) => {
                let _ = tx.send(Item::End).await;
                return stats;
            }
            Err(Break::Stop) => return stats,
            Err(Break::Broken(cause)) => cause,
        };
        if offset.saturating_sub(offset_at_last_break) >= FAILURE_RESET_BYTES {
            failures = 0;
        }
        offset_at_last_break = offset;
        // Try to continue from `offset`.
        loop {
            failures += 1;
            if failures > limits.max_attempts {
                let of = total.map(|t| format!(" of {t}")).unwrap_or_default();
                let msg = format!(
                    "transfer failed at byte {offset}{of} after {} attempts to resume: {cause}",
                    limits.max_attempts
                );
                let _ = tx
                    .send(Item::Fail(ImportError::new(ErrorKind::Transfer, msg)))
                    .await;
                return stats;
            }
            tracing::warn!(offset, attempt = failures, %cause, "transfer broke; resuming");
            tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = tx.send(Item::Fail(cancelled())).await;
                    return stats;
                }
                _ = tokio::time::sleep(limits.backoff(failures)) => {}
            }
            match source.open(offset, validator.clone()).await {
                Ok(next) if next.start == offset && offset > 0 => {
                    stats.resumes += 1;
                    opened = next;
                    break;
                }
                Ok(next) if next.start == 0 => {
                    // Range ignored or the object changed: start over cleanly.
                    stats.restarts += 1;
                    progress.restart();
                    if tx.send(Item::Restart).await.is_err() {
                        return stats;
                    }
                    offset = 0;
                    total = next.total;
                    validator = next.validator.clone();
                    opened = next;
                    break;
                }
                Ok(next) => {
                    let msg = format!("resume at byte {offset} answered from byte {}", next.start);
                    let _ = tx
                        .send(Item::Fail(ImportError::new(ErrorKind::Transfer, msg)))
                        .await;
                    return stats;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "resume request failed");
                    continue;
                }
            }
        }
    }
}

fn cancelled() -> ImportError {
    ImportError::new(ErrorKind::Cancelled, "import cancelled before it completed")
}

async fn stream_body(
    opened: &mut Opened,
    tx: &mpsc::Sender<Item>,
    limits: &TransferLimits,
    progress: &Progress,
    cancel: &CancellationToken,
    offset: &mut u64,
    total: Option<u64>,
) -> std::result::Result<(), Break> {
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => {
                let _ = tx.send(Item::Fail(cancelled())).await;
                return Err(Break::Stop);
            }
            r = tokio::time::timeout(limits.idle_timeout, opened.stream.next()) => r,
        };
        match next {
            Err(_) => {
                return Err(Break::Broken(format!(
                    "no data for {:?}",
                    limits.idle_timeout
                )));
            }
            Ok(None) => {
                return match total {
                    Some(t) if *offset < t => Err(Break::Broken(format!(
                        "connection closed at byte {offset} of {t}"
                    ))),
                    _ => Ok(()),
                };
            }
            Ok(Some(Err(e))) => return Err(Break::Broken(e.to_string())),
            Ok(Some(Ok(chunk))) => {
                if chunk.is_empty() {
                    continue;
                }
                let n = chunk.len() as u64;
                if let Some(t) = total
                    && *offset + n > t
                {
                    let msg = format!("source sent more than its announced {t} bytes");
                    let _ = tx
                        .send(Item::Fail(ImportError::new(ErrorKind::Transfer, msg)))
                        .await;
                    return Err(Break::Stop);
                }
                let sent = tokio::select! {
                    _ = cancel.cancelled() => {
                        let _ = tx.try_send(Item::Fail(cancelled()));
                        return Err(Break::Stop);
                    }
                    r = tx.send(Item::Data(chunk)) => r,
                };
                if sent.is_err() {
                    // The reader is gone (conversion finished or failed).
                    return Err(Break::Stop);
                }
                *offset += n;
                progress.add(n);
            }
        }
    }
}

/// The blocking end: a `Read` over the pump's items that hashes and counts what it hands out.
pub struct ChannelReader {
    rx: mpsc::Receiver<Item>,
    buf: Bytes,
    checksum: Option<Checksum>,
    hasher: Option<Hasher>,
    bytes: u64,
    restart_pending: bool,
    ended: bool,
    failure: Option<ImportError>,
}

impl ChannelReader {
    /// A reader over `rx`, hashing with `checksum`'s algorithm when given.
    pub fn new(rx: mpsc::Receiver<Item>, checksum: Option<Checksum>) -> ChannelReader {
        let hasher = checksum.as_ref().map(Checksum::hasher);
        ChannelReader {
            rx,
            buf: Bytes::new(),
            checksum,
            hasher,
            bytes: 0,
            restart_pending: false,
            ended: false,
            failure: None,
        }
    }

    /// Consume a pending restart: true if the source started over, in which case the hash
    /// and count are reset and reading continues from the new byte 0.
    pub fn take_restart(&mut self) -> bool {
        if !self.restart_pending {
            return false;
        }
        self.restart_pending = false;
        self.hasher = self.checksum.as_ref().map(Checksum::hasher);
        self.bytes = 0;
        self.buf = Bytes::new();
        true
    }

    /// The transfer's own failure, if the stream stopped because of one (preferred over the
    /// decoder's "unexpected end of input" it caused).
    pub fn failure(&self) -> Option<&ImportError> {
        self.failure.as_ref()
    }

    /// Bytes handed out since the last (re)start.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// True once the source reported a clean end.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Stop receiving: the pump sees a closed channel and ends instead of waiting for a
    /// reader that will never read again.
    pub fn close(&mut self) {
        self.rx.close();
    }

    /// Read and hash whatever the consumer left unread, up to the clean end.
    pub fn drain(&mut self) -> io::Result<u64> {
        io::copy(self, &mut io::sink())
    }

    /// Verify the checksum over everything read (call after [`ChannelReader::drain`]).
    pub fn verify(&mut self) -> Result<()> {
        match (self.checksum.as_ref(), self.hasher.take()) {
            (Some(c), Some(h)) => c.verify(&h.finish_hex()),
            _ => Ok(()),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.buf.is_empty() {
                let n = out.len().min(self.buf.len());
                let chunk = self.buf.split_to(n);
                out[..n].copy_from_slice(&chunk);
                if let Some(h) = self.hasher.as_mut() {
                    h.update(&chunk);
                }
                self.bytes += n as u64;
                return Ok(n);
            }
            if self.ended || out.is_empty() {
                return Ok(0);
            }
            if self.restart_pending {
                return Err(io::Error::other("the source restarted from the beginning"));
            }
            if let Some(f) = &self.failure {
                return Err(io::Error::other(f.message().to_string()));
            }
            match self.rx.blocking_recv() {
                Some(Item::Data(b)) => self.buf = b,
                Some(Item::Restart) => self.restart_pending = true,
                Some(Item::End) => self.ended = true,
                Some(Item::Fail(e)) => self.failure = Some(e),
                None => {
                    self.failure = Some(ImportError::new(
                        ErrorKind::Transfer,
                        "transfer stopped unexpectedly",
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{BoxFuture, ByteStream};
    use std::sync::Mutex;

    /// A source over a byte vector whose bodies break at scripted offsets.
    struct Scripted {
        data: Vec<u8>,
        /// Each open cuts its body at the next entry (absolute offset).
        cuts: Mutex<Vec<u64>>,
        honour_range: bool,
        opens: Mutex<Vec<u64>>,
    }

    impl ByteSource for Scripted {
        fn open(&self, offset: u64, _v: Option<String>) -> BoxFuture<'_, Result<Opened>> {
            Box::pin(async move {
                self.opens.lock().unwrap().push(offset);
                let start = if self.honour_range { offset } else { 0 };
                let cut = {
                    let mut cuts = self.cuts.lock().unwrap();
                    if cuts.is_empty() {
                        self.data.len() as u64
                    } else {
                        cuts.remove(0)
                    }
                };
                let body: Vec<io::Result<Bytes>> = self.data[start as usize..cut as usize]
                    .chunks(1000)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                let stream: ByteStream = Box::pin(futures::stream::iter(body));
                Ok(Opened {
                    stream,
                    start,
                    total: Some(self.data.len() as u64),
                    validator: Some("\"v\"".into()),
                    content_type: None,
                })
            })
        }
        fn kind(&self) -> &'static str {
            "test"
        }
    }

    fn fast() -> TransferLimits {
        TransferLimits {
            max_attempts: 3,
            backoff_start: Duration::from_millis(1),
            backoff_max: Duration::from_millis(5),
            idle_timeout: Duration::from_secs(5),
        }
    }

    async fn run(
        src: Scripted,
        limits: TransferLimits,
    ) -> (Vec<u8>, u32, PumpStats, Option<ImportError>, Vec<u64>) {
        let src = Arc::new(src);
        let first = src.open(0, None).await.unwrap();
        let (tx, rx) = channel();
        let progress = Arc::new(Progress::default());
        let pump = tokio::spawn(pump(
            src.clone(),
            first,
            tx,
            limits,
            progress,
            CancellationToken::new(),
        ));
        let reader = tokio::task::spawn_blocking(move || {
            let mut r = ChannelReader::new(rx, None);
            let mut out = Vec::new();
            let mut restarts = 0;
            loop {
                match r.read_to_end(&mut out) {
                    Ok(_) => break,
                    Err(_) if r.take_restart() => {
                        restarts += 1;
                        out.clear();
                    }
                    Err(_) => break,
                }
            }
            (out, restarts, r.failure().cloned())
        });
        let (out, restarts, failure) = reader.await.unwrap();
        let stats = pump.await.unwrap();
        let opens = src.opens.lock().unwrap().clone();
        (out, restarts, stats, failure, opens)
    }

    fn data() -> Vec<u8> {
        (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resumes_from_the_byte_reached() {
        let d = data();
        let src = Scripted {
            data: d.clone(),
            cuts: Mutex::new(vec![30_000, 70_000]),
            honour_range: true,
            opens: Mutex::default(),
        };
        let (out, restarts, stats, failure, opens) = run(src, fast()).await;
        assert!(failure.is_none(), "{failure:?}");
        assert_eq!(out, d);
        assert_eq!(restarts, 0);
        assert_eq!(
            stats,
            PumpStats {
                resumes: 2,
                restarts: 0
            }
        );
        assert_eq!(opens, [0, 30_000, 70_000]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ignored_range_restarts_cleanly() {
        let d = data();
        let src = Scripted {
            data: d.clone(),
            cuts: Mutex::new(vec![40_000]),
            honour_range: false,
            opens: Mutex::default(),
        };
        let (out, restarts, stats, failure, _) = run(src, fast()).await;
        assert!(failure.is_none(), "{failure:?}");
        assert_eq!(out, d, "the consumer sees exactly one clean copy");
        assert_eq!(restarts, 1);
        assert_eq!(stats.restarts, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retries_are_bounded() {
        let d = data();
        // Every open breaks after 1000 more bytes... but only 3 attempts are allowed.
        let cuts = (1..=10).map(|i| i * 1000).collect();
        let src = Scripted {
            data: d,
            cuts: Mutex::new(cuts),
            honour_range: true,
            opens: Mutex::default(),
        };
        let limits = TransferLimits {
            max_attempts: 3,
            ..fast()
        };
        let (_, _, _, failure, opens) = run(src, limits).await;
        let failure = failure.expect("must fail");
        assert_eq!(failure.kind(), ErrorKind::Transfer);
        assert!(
            failure.to_string().contains("attempts to resume"),
            "{failure}"
        );
        assert!(opens.len() <= 1 + 10);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let l = TransferLimits::default();
        assert_eq!(l.backoff(1), Duration::ZERO);
        assert_eq!(l.backoff(2), Duration::from_secs(1));
        assert_eq!(l.backoff(3), Duration::from_secs(2));
        assert_eq!(l.backoff(20), RETRY_BACKOFF_MAX);
    }
}
