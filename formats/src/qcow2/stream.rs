//! One-pass qcow2 → raw extents: read the image front to back once, never seek, never hold the
//! whole image.
//!
//! The stream is consumed one host cluster at a time. Each cluster is, in turn:
//!
//! ```text
//!  cluster ─► metadata?   header / refcount table / L1 part → parse L1 entries (learn L2s)
//!         │               an L2 table we learnt → map guest clusters (zero ranges go out now)
//!         ├─► data?       a standard cluster already mapped → sink.data at once
//!         ├─► window      recent clusters stay while a compressed cluster that starts in them
//!         │               is unfinished; compressed ranges (any alignment, may share sectors,
//!         │               may span clusters) inflate once the stream passes their end
//!         └─► leaving the window: fully explained (metadata, mapped data, decoded compressed
//!                         bytes) or every table already seen → dropped; otherwise kept in
//!                         the spill (memory, then scratch) for a table still ahead
//! ```
//!
//! QEMU allocates every L2 table before the data it maps and packs compressed clusters back to
//! back, so in the images it writes the only bytes that pass before their table are compressed
//! clusters packed into the tail of a host cluster allocated before the next L2 table; those
//! clusters wait in the spill until that table arrives. Unexplained zero bytes count as free
//! space ([`free_runs`] says when that is safe), and refcount blocks (found through the
//! refcount table) and preallocated zero clusters are claimed as metadata, so nothing else is
//! held back: QEMU-written images stream without scratch space, holding a few clusters at most.
//!
//! Memory bound: the window (at most four clusters: an unfinished compressed range spans at
//! most two clusters plus a sector), the spill's memory budget ([`StreamContext::memory_budget`]),
//! pending mappings and held clusters (at most [`limits::QCOW2_STREAM_MAX_PENDING`] entries of
//! ≤ 64 bytes) and the L2 table list (at most [`limits::QCOW2_STREAM_MAX_L2_TABLES`] × 16
//! bytes). Exceeding the counts is a `LimitExceeded` error, never unbounded growth.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read};

use super::compressed::{self, DecodeError};
use super::disk::decode_error;
use super::header::{self, Header};
use super::table::{self, Cluster};
use crate::error::{Error, Result};
use crate::image::{ExtentSink, StreamContext};
use crate::limits;
use crate::spill::Spill;

/// Bytes read before the cluster size is known: the fixed header fields and then some.
const HEADER_PROBE_LEN: usize = 512;

/// High-water marks of one conversion, for tests that check the memory bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Peaks {
    /// Most clusters held in the spill at once (memory and scratch).
    pub spilled_clusters: usize,
    /// Most clusters in the window at once.
    pub window_clusters: usize,
}

/// Convert the qcow2 image in `input` (positioned at byte 0) into `sink`.
pub(crate) fn stream(
    input: &mut dyn Read,
    sink: &mut dyn ExtentSink,
    ctx: &mut StreamContext,
) -> Result<()> {
    stream_with_peaks(input, sink, ctx).map(|_| ())
}

/// [`stream`], also reporting how much it held back.
pub(crate) fn stream_with_peaks(
    input: &mut dyn Read,
    sink: &mut dyn ExtentSink,
    ctx: &mut StreamContext,
) -> Result<Peaks> {
    let first = read_first_cluster(input)?;
    let h = header::parse(&first)?;
    if let Some(name) = &h.backing_file {
        return Err(Error::unsupported(format!(
            "qcow2 image has a backing file ({name:?}); backing files are refused when streaming"
        )));
    }
    let spill = Spill::new(ctx.memory_budget, ctx.scratch_dir.clone());
    let mut s = Streamer::new(input, sink, h, spill, first.len() as u64);
    let result = s.run(first);
    ctx.scratch_bytes += s.spill.scratch_bytes();
    result.map(|()| s.peaks)
}

fn read_first_cluster(input: &mut dyn Read) -> Result<Vec<u8>> {
    let mut first = vec![0u8; HEADER_PROBE_LEN];
    let n = read_full(input, &mut first)?;
    first.truncate(n);
    let cs = header::cluster_size_hint(&first)? as usize;
    // cs ≥ 512 = HEADER_PROBE_LEN, so the probe never reads past the first cluster.
    if n == HEADER_PROBE_LEN && cs > n {
        first.resize(cs, 0);
        let m = read_full(input, &mut first[n..])?;
        first.truncate(n + m);
    }
    Ok(first)
}

/// Fill `buf` as far as the stream allows; fewer bytes only at end of stream.
fn read_full(input: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match input.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("reading qcow2 stream", e)),
        }
    }
    Ok(done)
}

/// Standard data clusters mapped ahead of the stream: `clusters` consecutive host clusters
/// starting at the map key hold consecutive guest clusters starting at `guest`.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Guest offset of the first cluster.
    guest: u64,
    /// Host clusters in the run (only runs with every unit allocated grow beyond one).
    clusters: u64,
    /// Allocated units (subclusters) of each cluster.
    alloc: u32,
}

/// A compressed cluster whose bytes the stream has not passed entirely yet.
#[derive(Debug, Clone, Copy)]
struct Job {
    /// First byte of the compressed data in the file.
    start: u64,
    /// Guest offset of the cluster.
    guest: u64,
}

/// A recent cluster of the stream.
#[derive(Debug)]
struct Held {
    /// Host offset.
    off: u64,
    /// The bytes (shorter than a cluster only at the end of the stream).
    data: Vec<u8>,
    /// Byte ranges known to belong to metadata, mapped clusters or decoded compressed data.
    covered: Vec<(u64, u64)>,
}

struct Streamer<'a> {
    input: &'a mut dyn Read,
    sink: &'a mut dyn ExtentSink,
    h: Header,
    cs: u64,
    /// Bytes consumed from the stream.
    pos: u64,
    /// L1 bytes (of the needed entries) parsed so far.
    l1_parsed: u64,
    /// L2 tables learnt from the L1 table, as (host offset, L1 index).
    l2_tables: Vec<(u64, u64)>,
    /// True once every needed L1 entry has been seen; `l2_tables` is then sorted by host.
    l1_done: bool,
    /// Next entry of `l2_tables` still ahead in the stream.
    l2_next: usize,
    runs: BTreeMap<u64, Run>,
    /// Unfinished compressed clusters by (end of range, sequence number).
    jobs: BTreeMap<(u64, u64), Job>,
    /// Start offsets of unfinished compressed clusters (a multiset).
    job_starts: BTreeMap<u64, u32>,
    seq: u64,
    window: VecDeque<Held>,
    /// Explained ranges of the clusters in the spill; a cluster whose every byte becomes
    /// explained is dropped from the spill early.
    spilled_cov: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Cluster buffers to reuse.
    free: Vec<Vec<u8>>,
    spill: Spill,
    /// A zero range not yet reported, to merge with the next one.
    zero_acc: Option<(u64, u64)>,
    /// Guest bytes reported so far.
    reported: u64,
    /// The highest refcount block the refcount table names: the image must reach past it.
    last_refblock: Option<u64>,
    peaks: Peaks,
}

impl<'a> Streamer<'a> {
    fn new(
        input: &'a mut dyn Read,
        sink: &'a mut dyn ExtentSink,
        h: Header,
        spill: Spill,
        pos: u64,
    ) -> Self {
        let cs = h.cluster_size();
        Streamer {
            input,
            sink,
            l1_done: h.l1_needed() == 0,
            h,
            cs,
            pos,
            l1_parsed: 0,
            l2_tables: Vec::new(),
            l2_next: 0,
            runs: BTreeMap::new(),
            jobs: BTreeMap::new(),
            job_starts: BTreeMap::new(),
            seq: 0,
            window: VecDeque::new(),
            spilled_cov: BTreeMap::new(),
            free: Vec::new(),
            spill,
            zero_acc: None,
            reported: 0,
            last_refblock: None,
            peaks: Peaks::default(),
        }
    }

    fn run(&mut self, first: Vec<u8>) -> Result<()> {
        self.sink.begin(Some(self.h.virtual_size))?;
        let mut data = first;
        loop {
            let full = data.len() as u64 == self.cs;
            if !data.is_empty() {
                let off = self.pos - data.len() as u64;
                self.accept(off, data)?;
            }
            if !full {
                break;
            }
            data = self
                .free
                .pop()
                .unwrap_or_else(|| vec![0u8; self.cs as usize]);
            data.resize(self.cs as usize, 0);
            let n = read_full(self.input, &mut data)?;
            data.truncate(n);
            self.pos += n as u64;
        }
        self.finish()
    }

    /// Handle the cluster at host offset `off` that the stream just passed.
    fn accept(&mut self, off: u64, data: Vec<u8>) -> Result<()> {
        let end = off + data.len() as u64;
        self.peaks.window_clusters = self.peaks.window_clusters.max(self.window.len() + 1);
        self.window.push_back(Held {
            off,
            data,
            covered: Vec::new(),
        });
        self.mark_static_metadata(off, end);
        self.parse_reftable_part(off, end);
        self.parse_l1_part(off, end)?;
        self.parse_l2_here(off)?;
        self.deliver_runs_here(off)?;
        self.finish_jobs_before(end, false)?;
        self.retire_window()?;
        self.peaks.spilled_clusters = self.peaks.spilled_clusters.max(self.spill.len());
        self.flush_zero()?;
        if self.all_tables_seen() {
            let bound = self
                .job_starts
                .keys()
                .next()
                .map_or(u64::MAX, |s| s - s % self.cs);
            self.spill.remove_below(bound);
            self.spilled_cov = self.spilled_cov.split_off(&bound);
        }
        Ok(())
    }

    fn all_tables_seen(&self) -> bool {
        self.l1_done && self.l2_next == self.l2_tables.len()
    }

    /// The header cluster, the refcount table and the whole L1 table are metadata.
    fn mark_static_metadata(&mut self, off: u64, end: u64) {
        let h = &self.h;
        let ranges = [
            (0, self.cs),
            (h.refcount_table_offset, h.refcount_table_end()),
            (h.l1_offset, h.l1_end()),
        ];
        for (a, b) in ranges {
            if a < end && off < b && a < b {
                self.cover(a.max(off), b.min(end));
            }
        }
    }

    /// Record `[a, b)` as explained in the window and spilled clusters it touches; spilled
    /// clusters that become fully explained are dropped.
    fn cover(&mut self, a: u64, b: u64) {
        for held in self.window.iter_mut() {
            let hend = held.off + held.data.len() as u64;
            if a < hend && held.off < b {
                held.covered.push((a.max(held.off), b.min(hend)));
            }
        }
        let cs = self.cs;
        let mut done = Vec::new();
        for (&k, ranges) in self.spilled_cov.range_mut(a - a % cs..b) {
            ranges.push((a.max(k), b.min(k + cs)));
            if covers(ranges, k, k + cs) {
                done.push(k);
            }
        }
        for k in done {
            self.spilled_cov.remove(&k);
            self.spill.discard(k);
        }
    }

    /// Parse the needed L1 entries inside the cluster at `[off, end)`.
    fn parse_l1_part(&mut self, off: u64, end: u64) -> Result<()> {
        let needed_end = self.h.l1_offset + self.h.l1_needed() * 8;
        if self.l1_done || end <= self.h.l1_offset || off >= needed_end {
            return Ok(());
        }
        let first = (off.max(self.h.l1_offset) - self.h.l1_offset) / 8;
        let last = (end.min(needed_end) - self.h.l1_offset) / 8;
        let held = self
            .window
            .back()
            .map(|h| h.data.clone())
            .unwrap_or_default();
        for index in first..last {
            let at = (self.h.l1_offset + index * 8 - off) as usize;
            let word = table::word(&held[at..at + 8], 0);
            match table::l1_entry(&self.h, word, index)? {
                Some(l2) => self.learn_l2(l2, index)?,
                None => {
                    let span = self.h.l2_span();
                    self.zero(index * span, span)?;
                }
            }
            self.l1_parsed = (index + 1) * 8;
        }
        if self.l1_parsed == self.h.l1_needed() * 8 {
            self.finish_l1()?;
        }
        Ok(())
    }

    /// Refcount blocks named by the refcount table inside `[off, end)` are metadata: claim
    /// them so they are not held back. (Only an optimisation; refcounts are not validated.)
    fn parse_reftable_part(&mut self, off: u64, end: u64) {
        let (start, stop) = (self.h.refcount_table_offset, self.h.refcount_table_end());
        if end <= start || off >= stop {
            return;
        }
        let first = (off.max(start) - start) / 8;
        let last = (end.min(stop) - start) / 8;
        let mut blocks = Vec::new();
        if let Some(held) = self.window.back() {
            for index in first..last {
                let at = (start + index * 8 - off) as usize;
                if let Some(block) =
                    table::refblock(&self.h, table::word(&held.data[at..at + 8], 0))
                {
                    blocks.push(block);
                }
            }
        }
        for block in blocks {
            self.last_refblock = self.last_refblock.max(Some(block));
            self.claim(block);
        }
    }

    fn learn_l2(&mut self, l2: u64, index: u64) -> Result<()> {
        if self.l2_tables.len() >= limits::QCOW2_STREAM_MAX_L2_TABLES {
            return Err(Error::limit(format!(
                "qcow2 stream: more than {} l2 tables; convert from a seekable file instead",
                limits::QCOW2_STREAM_MAX_L2_TABLES
            )));
        }
        self.l2_tables.push((l2, index));
        Ok(())
    }

    /// Every L2 table is known: process those the stream already passed, from the window or
    /// the spill.
    fn finish_l1(&mut self) -> Result<()> {
        self.l1_done = true;
        self.l2_tables.sort_unstable();
        while let Some(&(l2, _)) = self.l2_tables.get(self.l2_next) {
            if l2 >= self.pos {
                break;
            }
            let table = self.take_table(l2)?;
            self.parse_l2_group(l2, &table)?;
        }
        Ok(())
    }

    /// Parse the L2 table(s) at the cluster just passed, if one was expected there.
    fn parse_l2_here(&mut self, off: u64) -> Result<()> {
        if !self.l1_done
            || self
                .l2_tables
                .get(self.l2_next)
                .is_none_or(|&(l2, _)| l2 != off)
        {
            return Ok(());
        }
        let table = self
            .window
            .back()
            .map(|h| h.data.clone())
            .unwrap_or_default();
        self.parse_l2_group(off, &table)
    }

    /// Parse `table` for every L1 entry pointing at `l2` (normally one).
    fn parse_l2_group(&mut self, l2: u64, table: &[u8]) -> Result<()> {
        if (table.len() as u64) < self.cs {
            return Err(Error::truncated(format!(
                "qcow2 stream ended at {:#x} inside the l2 table at {l2:#x}",
                self.pos
            )));
        }
        self.cover(l2, l2 + self.cs);
        while let Some(&(host, index)) = self.l2_tables.get(self.l2_next) {
            if host != l2 {
                break;
            }
            self.l2_next += 1;
            self.parse_l2(table, index)?;
        }
        Ok(())
    }

    fn parse_l2(&mut self, table: &[u8], l1_index: u64) -> Result<()> {
        let (cs, vsize) = (self.cs, self.h.virtual_size);
        let base = l1_index * self.h.l2_span();
        for i in 0..self.h.l2_entries() {
            let guest = base + i * cs;
            if guest >= vsize {
                break;
            }
            match table::l2_at(&self.h, table, i, guest)? {
                Cluster::Compressed { host, len } => self.add_job(host, len, guest)?,
                Cluster::Standard { host, alloc, .. } => {
                    self.zero_units(guest, !alloc)?;
                    if alloc != 0 {
                        self.add_run(host, guest, alloc)?;
                    } else if host != 0 {
                        self.claim(host);
                    }
                }
            }
        }
        Ok(())
    }

    /// Report the units of the cluster at `guest` whose bit is set in `mask` as zero.
    fn zero_units(&mut self, guest: u64, mask: u32) -> Result<()> {
        let sub = self.h.subcluster_size();
        for i in 0..self.h.subclusters() {
            if mask & (1 << i) != 0 {
                self.zero(guest + u64::from(i) * sub, sub)?;
            }
        }
        Ok(())
    }

    fn check_pending(&self) -> Result<()> {
        let pending = self.runs.len() + self.jobs.len() + self.spill.len();
        if pending >= limits::QCOW2_STREAM_MAX_PENDING {
            return Err(Error::limit(format!(
                "qcow2 stream: more than {} clusters are mapped far from their data; convert \
                 from a seekable file instead",
                limits::QCOW2_STREAM_MAX_PENDING
            )));
        }
        Ok(())
    }

    /// A host cluster owned by a zero cluster (preallocated, never read): nothing waits for
    /// it, so it need not be held back. Claims that clash with other mappings are ignored.
    fn claim(&mut self, host: u64) {
        if host < self.pos {
            self.cover(host, host + self.cs);
            return;
        }
        let clash = self.runs.range(..=host).next_back();
        if clash.is_some_and(|(&k, run)| k + run.clusters * self.cs > host) {
            return;
        }
        if self.check_pending().is_ok() {
            // guest = host lets neighbouring claims merge into one run.
            self.runs.insert(
                host,
                Run {
                    guest: host,
                    clusters: 1,
                    alloc: 0,
                },
            );
        }
    }

    fn add_run(&mut self, host: u64, guest: u64, alloc: u32) -> Result<()> {
        if host < self.pos {
            let (bytes, held) = self.take_cluster(host, guest)?;
            self.deliver_cluster(host, &bytes, guest, alloc)?;
            if held {
                self.cover(host, host + self.cs);
            }
            return Ok(());
        }
        self.unclaim(host);
        if let Some((&k, prev)) = self.runs.range_mut(..=host).next_back() {
            let prev_end = k + prev.clusters * self.cs;
            if prev_end > host {
                return Err(Error::corrupt(format!(
                    "qcow2 host cluster {host:#x} is mapped twice (guest {:#x} and {guest:#x})",
                    prev.guest + (host - k)
                )));
            }
            let contiguous = prev_end == host && prev.guest + prev.clusters * self.cs == guest;
            if contiguous && prev.alloc == alloc {
                prev.clusters += 1;
                return Ok(());
            }
        }
        self.check_pending()?;
        self.runs.insert(
            host,
            Run {
                guest,
                clusters: 1,
                alloc,
            },
        );
        Ok(())
    }

    /// Drop a claim on `host` (claims only save memory; a mapping always wins).
    fn unclaim(&mut self, host: u64) {
        let Some((&k, run)) = self.runs.range(..=host).next_back() else {
            return;
        };
        let run = *run;
        if run.alloc != 0 || k + run.clusters * self.cs <= host {
            return;
        }
        self.runs.remove(&k);
        let before = (host - k) / self.cs;
        if before > 0 {
            self.runs.insert(
                k,
                Run {
                    clusters: before,
                    ..run
                },
            );
        }
        let after = run.clusters - before - 1;
        if after > 0 {
            let next = host + self.cs;
            self.runs.insert(
                next,
                Run {
                    guest: next,
                    clusters: after,
                    alloc: 0,
                },
            );
        }
    }

    fn add_job(&mut self, start: u64, len: u64, guest: u64) -> Result<()> {
        let end = start + len;
        if end <= self.pos {
            return self.finish_job(start, end, guest, false);
        }
        self.check_pending()?;
        self.seq += 1;
        self.jobs.insert((end, self.seq), Job { start, guest });
        *self.job_starts.entry(start).or_insert(0) += 1;
        Ok(())
    }

    /// Deliver the run cluster(s) starting at the cluster just passed.
    fn deliver_runs_here(&mut self, off: u64) -> Result<()> {
        let Some(entry) = self.runs.first_entry() else {
            return Ok(());
        };
        if *entry.key() != off {
            return Ok(());
        }
        let run = entry.remove();
        if run.clusters > 1 {
            let next = Run {
                guest: run.guest + self.cs,
                clusters: run.clusters - 1,
                ..run
            };
            self.runs.insert(off + self.cs, next);
        }
        let Some(held) = self.window.back_mut() else {
            return Ok(());
        };
        held.covered.push((off, off + self.cs));
        let data = std::mem::take(&mut held.data);
        let result = self.deliver_cluster(off, &data, run.guest, run.alloc);
        if let Some(held) = self.window.back_mut() {
            held.data = data;
        }
        result
    }

    /// Send the allocated units of one standard cluster (`bytes` start at host `host`).
    fn deliver_cluster(&mut self, host: u64, bytes: &[u8], guest: u64, alloc: u32) -> Result<()> {
        let (sub, vsize) = (self.h.subcluster_size(), self.h.virtual_size);
        for i in 0..self.h.subclusters() {
            let start = guest + u64::from(i) * sub;
            if alloc & (1 << i) == 0 || start >= vsize {
                continue;
            }
            let len = sub.min(vsize - start);
            let at = u64::from(i) * sub;
            let Some(piece) = bytes.get(at as usize..(at + len) as usize) else {
                return Err(Error::truncated(format!(
                    "qcow2 stream ended at {:#x} before the data cluster at {host:#x} was complete",
                    self.pos
                )));
            };
            self.sink.data(start, piece)?;
            self.reported += len;
        }
        Ok(())
    }

    /// Finish every compressed cluster whose range ends at or before `end`.
    fn finish_jobs_before(&mut self, end: u64, at_eof: bool) -> Result<()> {
        while let Some(entry) = self.jobs.first_entry() {
            let (job_end, _) = *entry.key();
            if job_end > end && !at_eof {
                break;
            }
            let job = entry.remove();
            if let Some(count) = self.job_starts.get_mut(&job.start) {
                *count -= 1;
                if *count == 0 {
                    self.job_starts.remove(&job.start);
                }
            }
            if job.start >= self.pos {
                return Err(Error::truncated(format!(
                    "qcow2 stream ended at {:#x} before the compressed cluster at {:#x}",
                    self.pos, job.start
                )));
            }
            self.finish_job(job.start, job_end.min(self.pos), job.guest, at_eof)?;
        }
        Ok(())
    }

    /// Inflate the compressed cluster at `[start, end)` (all passed) and report it.
    fn finish_job(&mut self, start: u64, end: u64, guest: u64, at_eof: bool) -> Result<()> {
        let packed = self.gather(start, end)?;
        let mut out = vec![0u8; self.cs as usize];
        let used = match compressed::decode(self.h.compression, &packed, &mut out) {
            Ok(used) => used,
            Err(DecodeError::ShortInput) if at_eof => {
                return Err(Error::truncated(format!(
                    "qcow2 stream ended at {:#x} inside the compressed cluster at {start:#x}",
                    self.pos
                )));
            }
            Err(e) => return Err(decode_error(e, start)),
        };
        let len = self.cs.min(self.h.virtual_size - guest);
        self.sink.data(guest, &out[..len as usize])?;
        self.reported += len;
        self.cover(start, start + used as u64);
        Ok(())
    }

    /// Copy `[start, end)` (already passed) out of the window and the spill.
    fn gather(&self, start: u64, end: u64) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity((end - start) as usize);
        let mut at = start;
        while at < end {
            let cluster = at - at % self.cs;
            let stop = end.min(cluster + self.cs);
            let (a, b) = ((at - cluster) as usize, (stop - cluster) as usize);
            match self.held(cluster) {
                Some(held) => out.extend_from_slice(clip(&held.data, a, b)),
                None => match self.spill.get(cluster)? {
                    Some(bytes) => out.extend_from_slice(clip(&bytes, a, b)),
                    None => return Err(discarded(at)),
                },
            }
            at = stop;
        }
        Ok(out)
    }

    fn held(&self, cluster: u64) -> Option<&Held> {
        let front = self.window.front()?.off;
        let index = cluster.checked_sub(front)? / self.cs;
        self.window.get(usize::try_from(index).ok()?)
    }

    /// The passed standard cluster at `host`, from the window or taken out of the spill; the
    /// flag says it came from the window.
    fn take_cluster(&mut self, host: u64, guest: u64) -> Result<(Vec<u8>, bool)> {
        if let Some(held) = self.held(host) {
            return Ok((held.data.clone(), true));
        }
        match self.spill.remove(host)? {
            Some(bytes) => {
                self.spilled_cov.remove(&host);
                Ok((bytes, false))
            }
            None => Err(Error::corrupt(format!(
                "qcow2 data cluster at {host:#x} for guest {guest:#x} overlaps metadata or \
                 another mapping"
            ))),
        }
    }

    /// The passed L2 table at `host`, from the window or taken out of the spill.
    fn take_table(&mut self, host: u64) -> Result<Vec<u8>> {
        if let Some(held) = self.held(host) {
            return Ok(held.data.clone());
        }
        match self.spill.remove(host)? {
            Some(bytes) => {
                self.spilled_cov.remove(&host);
                Ok(bytes)
            }
            None => Err(Error::corrupt(format!(
                "qcow2 l2 table at {host:#x} overlaps metadata or another mapping"
            ))),
        }
    }

    /// Drop or spill window clusters no unfinished compressed cluster needs.
    fn retire_window(&mut self) -> Result<()> {
        let lowest_needed = self.job_starts.keys().next().copied().unwrap_or(u64::MAX);
        while let Some(front) = self.window.front() {
            let end = front.off + front.data.len() as u64;
            if lowest_needed < end {
                break;
            }
            let Some(held) = self.window.pop_front() else {
                break;
            };
            let end = held.off + held.data.len() as u64;
            if !self.all_tables_seen() && !covers(&held.covered, held.off, end) {
                let free = free_runs(&held);
                if !explained(&held, &free) {
                    self.check_pending()?;
                    let what = format!("qcow2 cluster at {:#x}", held.off);
                    self.spill.insert(held.off, &held.data, &what)?;
                    let mut known = held.covered;
                    known.extend(free);
                    self.spilled_cov.insert(held.off, known);
                }
            }
            if self.free.is_empty() {
                self.free.push(held.data);
            }
        }
        Ok(())
    }

    /// Report `[start, start + len)` (clipped to the disk) as zero, merging neighbours.
    fn zero(&mut self, start: u64, len: u64) -> Result<()> {
        let vsize = self.h.virtual_size;
        if start >= vsize {
            return Ok(());
        }
        let end = start + len.min(vsize - start);
        match &mut self.zero_acc {
            Some((_, acc_end)) if *acc_end == start => *acc_end = end,
            _ => {
                self.flush_zero()?;
                self.zero_acc = Some((start, end));
            }
        }
        Ok(())
    }

    fn flush_zero(&mut self) -> Result<()> {
        if let Some((a, b)) = self.zero_acc.take() {
            self.sink.zero(a, b - a)?;
            self.reported += b - a;
        }
        Ok(())
    }

    /// End of stream: everything mapped must have arrived.
    fn finish(&mut self) -> Result<()> {
        self.flush_zero()?;
        let pos = self.pos;
        if !self.l1_done {
            return Err(Error::truncated(format!(
                "qcow2 stream ended at {pos:#x} before the l1 table at {:#x} was complete",
                self.h.l1_offset
            )));
        }
        if let Some(&(l2, _)) = self.l2_tables.get(self.l2_next) {
            return Err(Error::truncated(format!(
                "qcow2 stream ended at {pos:#x} before the l2 table at {l2:#x}"
            )));
        }
        if let Some((&host, _)) = self.runs.iter().find(|(_, run)| run.alloc != 0) {
            return Err(Error::truncated(format!(
                "qcow2 stream ended at {pos:#x} before the cluster at {host:#x}"
            )));
        }
        self.finish_jobs_before(u64::MAX, true)?;
        self.check_tables_reached()?;
        if self.reported != self.h.virtual_size {
            return Err(Error::corrupt(format!(
                "qcow2 stream reported {} of {} guest bytes",
                self.reported, self.h.virtual_size
            )));
        }
        Ok(())
    }

    /// Like the random-access reader, insist that the L1 and refcount tables lie in the image.
    fn check_tables_reached(&self) -> Result<()> {
        let h = &self.h;
        if h.l1_size > 0 && h.l1_end() > self.pos {
            return Err(Error::truncated(format!(
                "qcow2 stream ended at {:#x} before the end of the l1 table at {:#x}",
                self.pos, h.l1_offset
            )));
        }
        if h.refcount_table_bytes > 0 && h.refcount_table_end() > self.pos {
            return Err(Error::truncated(format!(
                "qcow2 stream ended at {:#x} before the end of the refcount table at {:#x}",
                self.pos, h.refcount_table_offset
            )));
        }
        // A cut that removes only clusters no mapping needs still leaves the image incomplete;
        // the refcount blocks (written as whole clusters) show how far it must reach.
        if let Some(block) = self.last_refblock
            && block + self.cs > self.pos
        {
            return Err(Error::truncated(format!(
                "qcow2 stream ended at {:#x} before the refcount block at {block:#x}",
                self.pos
            )));
        }
        Ok(())
    }
}

fn clip(data: &[u8], a: usize, b: usize) -> &[u8] {
    let b = b.min(data.len());
    data.get(a..b).unwrap_or_default()
}

fn discarded(at: u64) -> Error {
    Error::corrupt(format!(
        "qcow2 compressed data at {at:#x} overlaps metadata or data that was already consumed"
    ))
}

/// The parts of `held` no mapping explains but that no table still ahead can need: zero runs
/// in the unexplained bytes. QEMU allocates compressed data byte by byte without gaps and only
/// leaves the tail of a host cluster unused (when the next compressed cluster does not fit and
/// the following host cluster is taken), so unexplained zeroes are free space, with two
/// exceptions kept back: a run at the very start of the cluster may end compressed data that
/// began in the previous cluster, and a run of fewer than [`MIN_FREE_TAIL`] bytes at the end
/// may start compressed data that continues in the next cluster (a deflate stream can begin
/// with up to four zero bytes; a zstd frame begins with its magic). An interior run is free
/// whatever its length: data starting in it would overlap the explained bytes after it, or the
/// cluster still holds unexplained non-zero bytes and is kept anyway.
fn free_runs(held: &Held) -> Vec<(u64, u64)> {
    let (start, len) = (held.off, held.data.len());
    let mut runs = Vec::new();
    for (a, b) in gaps(&held.covered, start, start + len as u64) {
        let (a, b) = ((a - start) as usize, (b - start) as usize);
        let mut i = a;
        while i < b {
            if held.data[i] != 0 {
                i += 1;
                continue;
            }
            let run = i;
            while i < b && held.data[i] == 0 {
                i += 1;
            }
            let at_start = run == 0;
            let short_tail = i == len && len - run < MIN_FREE_TAIL;
            if !at_start && !short_tail {
                runs.push((start + run as u64, start + i as u64));
            }
        }
    }
    runs
}

/// The parts of `[start, end)` outside `ranges`.
fn gaps(ranges: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut ranges = ranges.to_vec();
    ranges.sort_unstable();
    let mut reach = start;
    let mut out = Vec::new();
    for (a, b) in ranges {
        if a > reach {
            out.push((reach, a.min(end)));
        }
        reach = reach.max(b);
        if reach >= end {
            break;
        }
    }
    if reach < end {
        out.push((reach, end));
    }
    out
}

/// True when no table still ahead can need any byte of `held`.
fn explained(held: &Held, free: &[(u64, u64)]) -> bool {
    let mut ranges = held.covered.clone();
    ranges.extend_from_slice(free);
    covers(&ranges, held.off, held.off + held.data.len() as u64)
}

/// Shortest zero run at the end of a cluster that [`free_runs`] treats as free space: no
/// compressed cluster starts with this many zero bytes.
const MIN_FREE_TAIL: usize = 5;

/// True when `ranges` (explained by metadata, a mapping or decoded data) cover `[start, end)`.
fn covers(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    gaps(ranges, start, end).is_empty()
}
