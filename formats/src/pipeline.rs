//! A writer thread between the [`TargetSink`](crate::sink::TargetSink) and its [`Target`], so
//! reading, parsing and zero detection overlap with writing.
//!
//! A conversion from the page cache into a file or device is two kernel copies per byte (read
//! into our buffer, write out of it). Done on one thread they add up; with the writes on their
//! own thread the two copies run on two cores, as `qemu-img convert -W` does with its
//! coroutines. The producer stages guest writes and zero ranges, in order, into [`Batch`]es
//! backed by a fixed pool of [`PIPELINE_BUFFERS`] buffers of [`IO_CHUNK`] bytes; the writer
//! applies each batch in order and hands the buffer back. Memory is bounded by the pool
//! whatever the image size, and the producer blocks when the writer falls behind.
//!
//! The first write error stops the writer. The producer sees it on its next call (or when it
//! waits for a buffer) and at [`Pipeline::finish`], with the message and kind the direct path
//! would have given; nothing after a failed write is reported as written.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::thread::{Scope, ScopedJoinHandle};

use crate::error::{Error, ErrorKind, Result};
use crate::limits::{IO_CHUNK, PIPELINE_BATCH_ITEMS, PIPELINE_BUFFERS};
use crate::raw::VHD_FOOTER_LEN;
use crate::target::{Target, write_at, zero_at};

/// Length of a pool buffer: one [`IO_CHUNK`] plus room for the fixed-VHD footer a raw stream
/// holds back, so that stream can lend whole buffers and still write `IO_CHUNK`-aligned chunks.
/// Copied writes fill only the first `IO_CHUNK` bytes.
pub(crate) const BUFFER_LEN: usize = IO_CHUNK + VHD_FOOTER_LEN;

/// One target operation inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    /// Write `buf[start..end]` at guest `offset`.
    Data {
        offset: u64,
        start: usize,
        end: usize,
    },
    /// `Target::write_zeroes(offset, len)`.
    Zero { offset: u64, len: u64 },
}

/// Operations applied in order, with the bytes their writes refer to.
#[derive(Debug, Default)]
struct Batch {
    /// [`BUFFER_LEN`] bytes, allocated once; stale contents beyond `filled` are never written.
    buf: Vec<u8>,
    /// Bytes of `buf` used by copied writes.
    filled: usize,
    items: Vec<Item>,
}

/// The producer's end of a writer thread that owns the target for the length of a scope.
pub(crate) struct Pipeline<'scope> {
    /// Full batches to the writer; `None` once closed.
    ops: Option<SyncSender<Batch>>,
    /// Emptied batches from the writer.
    free: Receiver<Batch>,
    /// Batches created so far (at most [`PIPELINE_BUFFERS`]).
    allocated: usize,
    /// The batch being filled.
    current: Option<Batch>,
    /// True while the current batch's buffer is lent to the producer ([`Pipeline::take_buffer`]).
    lent: bool,
    /// Set by the writer when a write failed, so the producer stops early.
    failed: Arc<AtomicBool>,
    /// Set by the producer when it gives up, so the writer stops applying queued batches.
    cancel: Arc<AtomicBool>,
    writer: Option<ScopedJoinHandle<'scope, Result<()>>>,
    /// The writer's error once it was reported, for every later call.
    reported: Option<(ErrorKind, String)>,
}

impl<'scope> Pipeline<'scope> {
    /// Start a writer thread in `scope` that owns `target` until [`Pipeline::finish`].
    pub(crate) fn spawn<'env>(
        scope: &'scope Scope<'scope, 'env>,
        target: &'scope mut dyn Target,
    ) -> Self {
        let (ops_tx, ops_rx) = mpsc::sync_channel(PIPELINE_BUFFERS);
        let (free_tx, free_rx) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let cancel = Arc::new(AtomicBool::new(false));
        let (w_failed, w_cancel) = (failed.clone(), cancel.clone());
        let writer = std::thread::Builder::new()
            .name("cdi-writer".into())
            .spawn_scoped(scope, move || {
                let res = run_writer(target, &ops_rx, &free_tx, &w_cancel);
                if res.is_err() {
                    w_failed.store(true, Ordering::Release);
                }
                res
            });
        // Spawning fails only when the system is out of threads or memory; the conversion
        // cannot go on then, and `join` reports it.
        let writer = writer.ok();
        Pipeline {
            ops: Some(ops_tx),
            free: free_rx,
            allocated: 0,
            current: None,
            lent: false,
            failed,
            cancel,
            writer,
            reported: None,
        }
    }

    /// Queue a write of `data` at guest `offset` (copied into the pool).
    pub(crate) fn write(&mut self, mut offset: u64, mut data: &[u8]) -> Result<()> {
        self.check()?;
        while !data.is_empty() {
            let batch = self.batch()?;
            let room = IO_CHUNK.min(batch.buf.len()).saturating_sub(batch.filled);
            if room == 0 || batch.items.len() >= PIPELINE_BATCH_ITEMS {
                self.send()?;
                continue;
            }
            let n = room.min(data.len());
            let start = batch.filled;
            batch.buf[start..start + n].copy_from_slice(&data[..n]);
            batch.filled += n;
            push_data(&mut batch.items, offset, start, start + n);
            offset += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// Queue `Target::write_zeroes(offset, len)`.
    pub(crate) fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check()?;
        // A lent buffer's batch stays open until `seal` (its writes still refer to it); it
        // holds at most two items per zero-detection block anyway.
        if !self.lent
            && self
                .current
                .as_ref()
                .is_some_and(|b| b.items.len() >= PIPELINE_BATCH_ITEMS)
        {
            self.send()?;
        }
        let batch = self.batch()?;
        batch.items.push(Item::Zero { offset, len });
        Ok(())
    }

    /// A buffer of [`BUFFER_LEN`] bytes (old contents) for the producer to fill and give back
    /// with [`Pipeline::give_back`]; avoids the copy of [`Pipeline::write`].
    pub(crate) fn take_buffer(&mut self) -> Result<Vec<u8>> {
        self.check()?;
        if self.current.is_some() {
            self.send()?;
        }
        let buf = std::mem::take(&mut self.batch()?.buf);
        self.lent = true;
        Ok(buf)
    }

    /// Return the buffer lent by [`Pipeline::take_buffer`]; writes into it are then queued
    /// with [`Pipeline::write_lent`] and go out with [`Pipeline::seal`].
    pub(crate) fn give_back(&mut self, buf: Vec<u8>) {
        match self.current.as_mut() {
            Some(batch) if self.lent => {
                // Copied writes must not go into it after the lent bytes.
                batch.filled = buf.len();
                batch.buf = buf;
            }
            // No batch waits for it (an error in between): keep it for the next one.
            _ => {
                self.current = Some(Batch {
                    buf,
                    filled: 0,
                    items: Vec::new(),
                });
            }
        }
    }

    /// Queue a write of `buf[start..end]` of the given-back buffer at guest `offset`.
    pub(crate) fn write_lent(&mut self, offset: u64, start: usize, end: usize) -> Result<()> {
        self.check()?;
        let batch = self.batch()?;
        push_data(&mut batch.items, offset, start, end);
        Ok(())
    }

    /// Send the batch holding the lent buffer, so later copies start a fresh one.
    pub(crate) fn seal(&mut self) -> Result<()> {
        if self.lent {
            self.lent = false;
            self.send()?;
        }
        Ok(())
    }

    /// Send what is staged, wait until the writer applied everything, and report its first
    /// error. The target is the caller's again once this returns.
    pub(crate) fn finish(mut self) -> Result<()> {
        self.check()?;
        if self.current.as_ref().is_some_and(|b| !b.items.is_empty()) {
            self.send()?;
        }
        self.ops = None;
        self.join()
    }

    /// Fail fast once the writer has failed.
    fn check(&mut self) -> Result<()> {
        if let Some((kind, msg)) = &self.reported {
            return Err(Error::new(*kind, msg.clone()));
        }
        if self.failed.load(Ordering::Acquire) {
            return self.join();
        }
        Ok(())
    }

    /// The batch being filled, taking one from the pool when there is none.
    fn batch(&mut self) -> Result<&mut Batch> {
        if self.current.is_none() {
            let mut batch = match self.free.try_recv() {
                Ok(b) => b,
                Err(TryRecvError::Empty) if self.allocated < PIPELINE_BUFFERS => {
                    self.allocated += 1;
                    Batch {
                        buf: vec![0u8; BUFFER_LEN],
                        filled: 0,
                        items: Vec::new(),
                    }
                }
                // Every buffer is with the writer: wait for one.
                Err(TryRecvError::Empty) => match self.free.recv() {
                    Ok(b) => b,
                    Err(_) => return Err(self.join_err()),
                },
                Err(TryRecvError::Disconnected) => return Err(self.join_err()),
            };
            if batch.buf.len() < BUFFER_LEN {
                // A lent buffer that never came back (the producer failed in between).
                batch.buf.resize(BUFFER_LEN, 0);
            }
            self.current = Some(batch);
        }
        Ok(self.current.get_or_insert_with(Batch::default))
    }

    fn send(&mut self) -> Result<()> {
        self.lent = false;
        let Some(batch) = self.current.take() else {
            return Ok(());
        };
        let sent = match &self.ops {
            Some(ops) => ops.send(batch).is_ok(),
            None => false,
        };
        if sent { Ok(()) } else { Err(self.join_err()) }
    }

    /// The writer stopped early: its error, or a generic one if it somehow has none.
    fn join_err(&mut self) -> Error {
        match self.join() {
            Err(e) => e,
            Ok(()) => self.remember(Error::new(
                ErrorKind::Io,
                "the target writer stopped before the conversion ended",
            )),
        }
    }

    /// Wait for the writer thread and take its result (only once).
    fn join(&mut self) -> Result<()> {
        if let Some((kind, msg)) = &self.reported {
            return Err(Error::new(*kind, msg.clone()));
        }
        self.ops = None;
        let Some(writer) = self.writer.take() else {
            return Err(self.remember(Error::new(
                ErrorKind::Io,
                "could not start the target writer thread",
            )));
        };
        match writer.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.remember(e)),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    fn remember(&mut self, e: Error) -> Error {
        self.reported = Some((e.kind(), e.message().to_string()));
        e
    }
}

impl Drop for Pipeline<'_> {
    fn drop(&mut self) {
        if self.writer.is_some() {
            // Given up without `finish`: the conversion failed, so queued writes are moot. The
            // scope joins the thread.
            self.cancel.store(true, Ordering::Release);
        }
    }
}

/// Append a write, extending the previous one when it continues it in guest and buffer.
fn push_data(items: &mut Vec<Item>, offset: u64, start: usize, end: usize) {
    if let Some(Item::Data {
        offset: o,
        start: s,
        end: e,
    }) = items.last_mut()
        && *e == start
        && *o + (*e - *s) as u64 == offset
    {
        *e = end;
        return;
    }
    items.push(Item::Data { offset, start, end });
}

/// The writer thread: apply batches in order until the producer closes the channel or a
/// write fails.
fn run_writer(
    target: &mut dyn Target,
    ops: &Receiver<Batch>,
    free: &Sender<Batch>,
    cancel: &AtomicBool,
) -> Result<()> {
    let name = target.describe();
    for mut batch in ops {
        if cancel.load(Ordering::Acquire) {
            return Ok(());
        }
        for item in batch.items.drain(..) {
            match item {
                Item::Data { offset, start, end } => {
                    let bytes = batch.buf.get(start..end).unwrap_or_default();
                    write_at(target, &name, offset, bytes)?;
                }
                Item::Zero { offset, len } => zero_at(target, &name, offset, len)?,
            }
        }
        batch.filled = 0;
        // The producer may be gone (it gave up); the buffer is then simply dropped.
        let _ = free.send(batch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Mutex;

    use super::*;
    use crate::target::Preallocation;

    /// Records operations; fails the write at `fail_at`, can be slowed down.
    #[derive(Default)]
    struct Recorder {
        ops: Vec<(char, u64, Vec<u8>)>,
        fail_at: Option<u64>,
        delay_ms: u64,
        /// Writes applied so far, visible while the writer thread owns the recorder.
        applied: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Target for Recorder {
        fn fixed_size(&self) -> Option<u64> {
            None
        }
        fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            std::thread::sleep(std::time::Duration::from_millis(self.delay_ms));
            if self.fail_at == Some(offset) {
                return Err(io::Error::from_raw_os_error(nix::libc::ENOSPC));
            }
            self.ops.push(('w', offset, buf.to_vec()));
            self.applied.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.ops.push(('z', offset, len.to_le_bytes().to_vec()));
            Ok(())
        }
        fn finish(&mut self, _size: u64, _prealloc: Preallocation) -> io::Result<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "recorder".into()
        }
    }

    #[test]
    fn operations_arrive_in_order_and_contiguous_writes_merge() {
        let mut t = Recorder::default();
        std::thread::scope(|s| {
            let mut p = Pipeline::spawn(s, &mut t);
            p.write(0, &[1; 100]).unwrap();
            p.write(100, &[2; 50]).unwrap(); // continues the first write
            p.zero(150, 10).unwrap();
            p.write(160, &[3; 10]).unwrap();
            p.write(1000, &[4; 10]).unwrap(); // not contiguous in guest
            p.finish().unwrap();
        });
        let mut first = vec![1u8; 100];
        first.extend_from_slice(&[2; 50]);
        assert_eq!(
            t.ops,
            vec![
                ('w', 0, first),
                ('z', 150, 10u64.to_le_bytes().to_vec()),
                ('w', 160, vec![3; 10]),
                ('w', 1000, vec![4; 10]),
            ]
        );
    }

    #[test]
    fn large_writes_span_buffers_and_lent_buffers_are_not_copied_twice() {
        let mut t = Recorder::default();
        let big: Vec<u8> = (0..3 * IO_CHUNK + 17).map(|i| (i % 251) as u8).collect();
        std::thread::scope(|s| {
            let mut p = Pipeline::spawn(s, &mut t);
            p.write(0, &big).unwrap();
            let mut buf = p.take_buffer().unwrap();
            assert_eq!(buf.len(), BUFFER_LEN);
            buf[..300].fill(9);
            p.give_back(buf);
            p.write_lent(big.len() as u64, 0, 100).unwrap();
            p.write_lent(big.len() as u64 + 200, 200, 300).unwrap();
            p.seal().unwrap();
            p.write(5 << 20, &[7; 5]).unwrap();
            p.finish().unwrap();
        });
        let mut image = Vec::new();
        for (kind, off, bytes) in &t.ops {
            assert_eq!(*kind, 'w');
            let end = *off as usize + bytes.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            image[*off as usize..end].copy_from_slice(bytes);
        }
        assert_eq!(&image[..big.len()], &big[..]);
        assert_eq!(&image[big.len()..big.len() + 100], &[9u8; 100][..]);
        assert_eq!(&image[big.len() + 100..big.len() + 200], &[0u8; 100][..]);
        assert_eq!(&image[big.len() + 200..big.len() + 300], &[9u8; 100][..]);
        assert_eq!(&image[5 << 20..], &[7u8; 5][..]);
        // Each write is at most one buffer.
        assert!(t.ops.iter().all(|(_, _, b)| b.len() <= IO_CHUNK));
    }

    #[test]
    fn a_failed_write_is_reported_on_a_later_call_and_at_finish() {
        let mut t = Recorder {
            fail_at: Some(IO_CHUNK as u64),
            ..Default::default()
        };
        let chunk = vec![5u8; IO_CHUNK];
        std::thread::scope(|s| {
            let mut p = Pipeline::spawn(s, &mut t);
            let mut first_err = None;
            for i in 0..(4 * PIPELINE_BUFFERS) as u64 {
                if let Err(e) = p.write(i * IO_CHUNK as u64, &chunk) {
                    first_err = Some(e);
                    break;
                }
            }
            let err = first_err.expect("the producer must see the failure before finish");
            assert_eq!(err.kind(), ErrorKind::NoSpace);
            assert_eq!(
                err.message(),
                format!("writing {IO_CHUNK} bytes at {IO_CHUNK} to recorder")
            );
            // Every later call, and finish, fail the same way.
            assert_eq!(p.zero(0, 1).unwrap_err().kind(), ErrorKind::NoSpace);
            assert_eq!(p.finish().unwrap_err().kind(), ErrorKind::NoSpace);
        });
        // Nothing after the failed write was applied.
        assert!(t.ops.iter().all(|(_, off, _)| *off < IO_CHUNK as u64));
    }

    #[test]
    fn error_in_the_last_batch_is_reported_by_finish() {
        let mut t = Recorder {
            fail_at: Some(42),
            ..Default::default()
        };
        std::thread::scope(|s| {
            let mut p = Pipeline::spawn(s, &mut t);
            p.write(42, b"x").unwrap();
            let err = p.finish().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::NoSpace);
        });
    }

    #[test]
    fn buffers_in_flight_are_bounded() {
        // A slow writer: the producer must block instead of allocating more buffers.
        let mut t = Recorder {
            delay_ms: 2,
            ..Default::default()
        };
        let chunk = vec![1u8; IO_CHUNK];
        let peak = Mutex::new(0usize);
        std::thread::scope(|s| {
            let mut p = Pipeline::spawn(s, &mut t);
            for i in 0..(6 * PIPELINE_BUFFERS) as u64 {
                p.write(i * IO_CHUNK as u64, &chunk).unwrap();
                let mut peak = peak.lock().unwrap();
                *peak = (*peak).max(p.allocated);
            }
            p.finish().unwrap();
        });
        assert_eq!(*peak.lock().unwrap(), PIPELINE_BUFFERS);
        assert_eq!(t.ops.len(), 6 * PIPELINE_BUFFERS);
    }

    #[test]
    fn finish_waits_for_every_write() {
        let mut t = Recorder {
            delay_ms: 5,
            ..Default::default()
        };
        let applied = t.applied.clone();
        std::thread::scope(|s| {
            let mut p = Pipeline::spawn(s, &mut t);
            for i in 0..20u64 {
                // Separate guest ranges in separate batches.
                p.write(i * 2 * IO_CHUNK as u64, &[1u8; 10]).unwrap();
                p.take_buffer().map(|b| p.give_back(b)).unwrap();
                p.seal().unwrap();
            }
            p.finish().unwrap();
            // Still inside the scope (which would join the thread anyway): `finish` itself
            // waited for the slow writer.
            assert_eq!(applied.load(Ordering::SeqCst), 20);
        });
        assert_eq!(t.ops.iter().filter(|o| o.0 == 'w').count(), 20);
    }

    #[test]
    fn dropping_without_finish_stops_the_writer() {
        let mut t = Recorder {
            delay_ms: 100,
            ..Default::default()
        };
        let chunk = vec![1u8; IO_CHUNK];
        std::thread::scope(|s| {
            let mut p = Pipeline::spawn(s, &mut t);
            // Sends PIPELINE_BUFFERS - 1 full batches; the writer sleeps in the first write.
            for i in 0..PIPELINE_BUFFERS as u64 {
                p.write(i * IO_CHUNK as u64, &chunk).unwrap();
            }
            drop(p);
        });
        // At most the batch in progress was applied; the queued ones were skipped.
        assert!(t.ops.len() <= 1, "{} writes", t.ops.len());
    }
}
