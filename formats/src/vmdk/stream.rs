//! One-pass VMDK conversion from a non-seekable stream.
//!
//! Two layouts stream without scratch space:
//! - **streamOptimized**: every grain carries its guest sector in its marker, so grains are
//!   emitted as they arrive; grain-table, grain-directory and footer markers are skipped
//!   (the footer's magic is checked) until the end-of-stream marker.
//! - **monolithicSparse with the tables first** (qemu-img's and VMware's layout): the grain
//!   directory and all grain tables are read into a run-length map, then the grains are read
//!   in file order.
//!
//! Anything else (tables after their grains, grains out of guest order in a stream-optimized
//! file, a map larger than the memory budget) fails with `ScratchSpaceRequired` so the caller
//! can spool the image and use the random-access reader.

use std::io::Read;

use super::SECTOR;
use super::descriptor::{Descriptor, looks_like_descriptor};
use super::sparse::{GD_AT_END, GRAIN_MARKER_LEN, MARKER_FOOTER, SparseHeader, inflate_grain};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{ExtentSink, StreamContext};
use crate::limits;

/// Metadata marker types of the stream-optimized layout.
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;

/// Convert a VMDK sparse extent in one sequential pass. `input` is positioned at byte 0.
pub fn stream(
    input: &mut dyn Read,
    sink: &mut dyn ExtentSink,
    ctx: &mut StreamContext,
) -> Result<()> {
    let mut r = SeqReader {
        inner: input,
        pos: 0,
        discard: Vec::new(),
        pending: None,
    };
    let mut head = [0u8; SECTOR as usize];
    r.read_exact(&mut head, "vmdk header")?;
    if looks_like_descriptor(&head) {
        return Err(Error::unsupported(
            "vmdk descriptor references external extent files; convert it from a local path",
        ));
    }
    let header = SparseHeader::parse(&head)?;
    refuse_parent(&mut r, &header)?;
    if header.compressed() {
        stream_optimized(&mut r, &header, sink)
    } else {
        stream_sparse(&mut r, &header, sink, ctx)
    }
}

/// Read the embedded descriptor and refuse a child disk: its unallocated grains belong to a
/// parent we do not have, so converting it alone would silently produce the wrong disk.
fn refuse_parent(r: &mut SeqReader<'_>, h: &SparseHeader) -> Result<()> {
    let Some((offset, len)) = h.descriptor_range() else {
        return Ok(());
    };
    if offset < r.pos {
        return Err(Error::corrupt(format!(
            "vmdk embedded descriptor at byte {offset} overlaps the header"
        )));
    }
    r.skip_to(offset, "vmdk metadata before the descriptor")?;
    let mut text =
        vec![0u8; usize::try_from(len).map_err(|_| Error::limit("vmdk descriptor too large"))?];
    r.read_exact(&mut text, "the vmdk embedded descriptor")?;
    match Descriptor::parse(&text)?.parent_hint {
        Some(parent) => Err(Error::unsupported(format!(
            "vmdk has a parent disk ({parent:?}); backing files are not supported"
        ))),
        None => Ok(()),
    }
}

/// Sequential reader that knows its position and reports truncation with context.
struct SeqReader<'a> {
    inner: &'a mut dyn Read,
    pos: u64,
    /// Buffer for skipped bytes, allocated on the first skip and reused.
    discard: Vec<u8>,
    /// A byte read ahead by [`SeqReader::at_eof`].
    pending: Option<u8>,
}

impl SeqReader<'_> {
    /// True when the input has no more bytes. Peeks one byte; a byte that is there is kept
    /// in `pending` and handed out by the next read.
    fn at_eof(&mut self) -> Result<bool> {
        if self.pending.is_some() {
            return Ok(false);
        }
        let mut one = [0u8; 1];
        loop {
            match self.inner.read(&mut one) {
                Ok(0) => return Ok(true),
                Ok(_) => {
                    self.pending = Some(one[0]);
                    return Ok(false);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("reading the vmdk stream", e)),
            }
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let mut done = 0;
        if let (Some(byte), Some(first)) = (self.pending, buf.first_mut()) {
            *first = byte;
            self.pending = None;
            done = 1;
        }
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(Error::truncated(format!(
                        "vmdk stream ended at byte {} while reading {what}",
                        self.pos + done as u64
                    )));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(format!("reading {what} from the vmdk stream"), e)),
            }
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Discard bytes up to `target` (which must not be behind the current position).
    fn skip_to(&mut self, target: u64, what: &str) -> Result<()> {
        if self.pos >= target {
            return Ok(());
        }
        let mut discard = std::mem::take(&mut self.discard);
        discard.resize(limits::IO_CHUNK, 0);
        let mut result = Ok(());
        while self.pos < target && result.is_ok() {
            let n = usize::try_from((target - self.pos).min(limits::IO_CHUNK as u64))
                .unwrap_or(limits::IO_CHUNK);
            result = self.read_exact(&mut discard[..n], what);
        }
        self.discard = discard;
        result
    }
}

fn le32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn needs_scratch(message: String) -> Error {
    Error::new(ErrorKind::ScratchSpaceRequired, message)
}

fn stream_optimized(
    r: &mut SeqReader<'_>,
    h: &SparseHeader,
    sink: &mut dyn ExtentSink,
) -> Result<()> {
    let capacity = h.capacity_bytes();
    let grain = h.grain_bytes();
    let grain_len = usize::try_from(grain).map_err(|_| Error::limit("vmdk grain too large"))?;
    sink.begin(Some(capacity))?;
    // Grains start after the metadata the header accounts for (header, descriptor and, in
    // qemu-img's layout, the preallocated tables).
    let start = h
        .overhead
        .checked_mul(SECTOR)
        .ok_or_else(|| Error::corrupt("vmdk overhead overflows"))?;
    // qemu-img writes the grain directory and tables at the start (inside the overhead) and
    // may end the file right after the last grain, without an end-of-stream marker. Learn
    // from those tables which grain comes last, so such an end can be told from a truncation.
    let start = start.max(SECTOR);
    let last_grain = if h.gd_offset != GD_AT_END
        && h.gd_offset < h.overhead
        && start - r.pos <= limits::STREAM_MEMORY_BUDGET as u64
    {
        let base = r.pos;
        let mut meta = vec![0u8; usize::try_from(start - base).unwrap_or(0)];
        r.read_exact(&mut meta, "vmdk grain directory and tables")?;
        last_allocated_grain(&meta, base, h)?
    } else {
        r.skip_to(start, "vmdk metadata before the first grain")?;
        None
    };
    let mut sector = [0u8; SECTOR as usize];
    let mut compressed = Vec::new();
    let mut out = vec![0u8; grain_len];
    // Everything below `cursor` has been reported to the sink.
    let mut cursor = 0u64;
    // qemu-img ends streamOptimized files with the footer and no end-of-stream marker, so a
    // clean end of input right after the footer is a complete image; anywhere else it is a
    // truncation.
    let mut footer_seen = false;
    loop {
        let marker_at = r.pos;
        if (footer_seen || last_grain.is_some()) && r.at_eof()? {
            match last_grain {
                Some(last) if !footer_seen && cursor <= last * grain => {
                    return Err(Error::truncated(format!(
                        "vmdk stream ended at byte {marker_at} before the grain at guest byte {}",
                        last * grain
                    )));
                }
                _ => break,
            }
        }
        r.read_exact(
            &mut sector,
            "a vmdk marker (the stream ended before its end-of-stream marker)",
        )?;
        let val = le64(&sector, 0);
        let size = u64::from(le32(&sector, 8));
        if size == 0 {
            let kind = le32(&sector, 12);
            let body = val.checked_mul(SECTOR).ok_or_else(|| {
                Error::corrupt(format!(
                    "vmdk marker at byte {marker_at} claims {val} sectors"
                ))
            })?;
            match kind {
                MARKER_EOS => break,
                MARKER_GT | MARKER_GD => {
                    r.skip_to(r.pos.saturating_add(body), "vmdk grain table")?
                }
                MARKER_FOOTER => {
                    if val == 0 {
                        return Err(Error::corrupt(format!(
                            "vmdk footer marker at byte {marker_at} has no footer"
                        )));
                    }
                    r.read_exact(&mut sector, "vmdk footer")?;
                    SparseHeader::parse(&sector).map_err(|e| e.context("vmdk footer"))?;
                    r.skip_to(r.pos.saturating_add(body - SECTOR), "vmdk footer")?;
                    footer_seen = true;
                }
                other => {
                    return Err(Error::corrupt(format!(
                        "vmdk marker at byte {marker_at} has unknown type {other}"
                    )));
                }
            }
            continue;
        }
        // A grain: lba (sectors), compressed size, zlib data, padded to a sector.
        let lba = val;
        if size > 2 * grain {
            return Err(Error::corrupt(format!(
                "vmdk compressed grain for sector {lba} claims {size} bytes of data"
            )));
        }
        let total = (GRAIN_MARKER_LEN as u64 + size).div_ceil(SECTOR) * SECTOR;
        let total = usize::try_from(total).map_err(|_| Error::limit("vmdk grain too large"))?;
        compressed.clear();
        compressed.extend_from_slice(&sector);
        compressed.resize(total, 0);
        r.read_exact(
            &mut compressed[SECTOR as usize..],
            "a vmdk compressed grain",
        )?;
        let data_end = GRAIN_MARKER_LEN + usize::try_from(size).unwrap_or(0);
        if !lba.is_multiple_of(h.grain) || lba >= h.capacity {
            return Err(Error::corrupt(format!(
                "vmdk grain at byte {marker_at} names sector {lba}, which is not a grain start inside the {} sector disk",
                h.capacity
            )));
        }
        let got = inflate_grain(&compressed[GRAIN_MARKER_LEN..data_end], &mut out, lba)?;
        let guest = lba * SECTOR;
        let needed = grain.min(capacity - guest);
        if (got as u64) < needed {
            return Err(Error::corrupt(format!(
                "vmdk compressed grain for sector {lba} inflates to {got} bytes, less than the {needed} the disk needs"
            )));
        }
        if guest < cursor {
            return Err(needs_scratch(format!(
                "vmdk stream grain for sector {lba} arrives after guest byte {cursor} was written; grains out of order need the image spooled to scratch space"
            )));
        }
        if guest > cursor {
            sink.zero(cursor, guest - cursor)?;
        }
        sink.data(guest, &out[..usize::try_from(needed).unwrap_or(0)])?;
        cursor = guest + needed;
    }
    if cursor < capacity {
        sink.zero(cursor, capacity - cursor)?;
    }
    Ok(())
}

/// Index of the last grain the grain tables mark as allocated, from the metadata bytes
/// `meta` that start at file byte `base`. `None` when nothing is allocated or the tables lie
/// outside `meta` (then only an end-of-stream marker or footer ends the stream).
fn last_allocated_grain(meta: &[u8], base: u64, h: &SparseHeader) -> Result<Option<u64>> {
    let slice = |sector: u64, len: u64| -> Option<&[u8]> {
        let start = usize::try_from(sector.checked_mul(SECTOR)?.checked_sub(base)?).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        meta.get(start..end)
    };
    let Some(gd) = slice(h.gd_offset, h.gd_entries() * 4) else {
        return Ok(None);
    };
    let per_gt = u64::from(h.gtes_per_gt);
    let mut last = None;
    for (gd_index, entry) in gd.chunks_exact(4).enumerate() {
        let gt_sector = u64::from(le32(entry, 0));
        if gt_sector == 0 {
            continue;
        }
        let Some(gt) = slice(gt_sector, per_gt * 4) else {
            return Ok(None);
        };
        for (gt_index, gte) in gt.chunks_exact(4).enumerate() {
            // 0 = unallocated, 1 = zero grain (with the zero-grain flag); neither is sent.
            if le32(gte, 0) > 1 {
                last = Some(gd_index as u64 * per_gt + gt_index as u64);
            }
        }
    }
    Ok(last)
}

/// A run of grains contiguous both in the file and in the guest.
#[derive(Debug, Clone, Copy)]
struct DataRun {
    file_sector: u64,
    guest_grain: u64,
    grains: u64,
}

fn stream_sparse(
    r: &mut SeqReader<'_>,
    h: &SparseHeader,
    sink: &mut dyn ExtentSink,
    ctx: &mut StreamContext,
) -> Result<()> {
    let capacity = h.capacity_bytes();
    let grain = h.grain_bytes();
    if h.gd_offset == GD_AT_END {
        return Err(Error::corrupt(
            "vmdk sparse extent without markers puts its grain directory at the end",
        ));
    }
    let gd_off = h.gd_offset.checked_mul(SECTOR).ok_or_else(|| {
        Error::corrupt(format!(
            "vmdk grain directory offset {} overflows",
            h.gd_offset
        ))
    })?;
    if gd_off < r.pos {
        return Err(needs_scratch(format!(
            "vmdk grain directory at byte {gd_off} comes before the header and descriptor end; this layout needs scratch space"
        )));
    }
    // The map must fit the memory budget: each entry is one run of data or zeroes.
    let max_runs = (ctx.memory_budget / std::mem::size_of::<DataRun>()).max(1);
    r.skip_to(gd_off, "vmdk metadata before the grain directory")?;
    let mut raw = vec![
        0u8;
        usize::try_from(h.gd_entries() * 4)
            .map_err(|_| Error::limit("vmdk grain directory too large"))?
    ];
    r.read_exact(&mut raw, "the vmdk grain directory")?;
    let per_gt = u64::from(h.gtes_per_gt);
    let mut tables: Vec<(u64, u64)> = Vec::new(); // (file sector, gd index)
    let mut zeros: Vec<(u64, u64)> = Vec::new(); // guest byte ranges (start, end)
    let push_zero = |zeros: &mut Vec<(u64, u64)>, start: u64, end: u64| {
        let end = end.min(capacity);
        if start >= end {
            return;
        }
        match zeros.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => zeros.push((start, end)),
        }
    };
    for (i, c) in raw.chunks_exact(4).enumerate() {
        let entry = u64::from(le32(c, 0));
        let gd_index = i as u64;
        if entry == 0 {
            let span = h.gt_coverage() * SECTOR;
            push_zero(&mut zeros, gd_index * span, (gd_index + 1) * span);
        } else {
            tables.push((entry, gd_index));
        }
    }
    drop(raw);
    if tables.len() > max_runs {
        return Err(needs_scratch(format!(
            "vmdk grain directory lists {} grain tables, beyond the streaming memory budget",
            tables.len()
        )));
    }
    tables.sort_unstable();
    let mut runs: Vec<DataRun> = Vec::new();
    let mut gt_raw = vec![0u8; usize::try_from(per_gt * 4).unwrap_or(0)];
    let mut prev_sector = None;
    for &(sector, gd_index) in &tables {
        if prev_sector == Some(sector) {
            return Err(Error::corrupt(format!(
                "vmdk grain directory names the grain table at sector {sector} twice"
            )));
        }
        prev_sector = Some(sector);
        let off = sector * SECTOR;
        if off < r.pos {
            return Err(needs_scratch(format!(
                "vmdk grain table at byte {off} comes before the grain directory; this layout needs scratch space"
            )));
        }
        r.skip_to(off, "vmdk metadata before a grain table")?;
        r.read_exact(&mut gt_raw, "a vmdk grain table")?;
        for (j, c) in gt_raw.chunks_exact(4).enumerate() {
            let index = gd_index * per_gt + j as u64;
            let guest = index * grain;
            if guest >= capacity {
                break;
            }
            let entry = u64::from(le32(c, 0));
            if entry == 0 || (entry == 1 && h.zero_grain()) {
                push_zero(&mut zeros, guest, guest + grain);
                continue;
            }
            match runs.last_mut() {
                Some(last)
                    if last.file_sector + last.grains * h.grain == entry
                        && last.guest_grain + last.grains == index =>
                {
                    last.grains += 1;
                }
                _ => runs.push(DataRun {
                    file_sector: entry,
                    guest_grain: index,
                    grains: 1,
                }),
            }
        }
        if runs.len() + zeros.len() > max_runs {
            return Err(needs_scratch(format!(
                "vmdk grain map has more than {max_runs} runs, beyond the streaming memory budget"
            )));
        }
    }
    runs.sort_unstable_by_key(|run| run.file_sector);
    // Check the whole layout before writing anything, so a refusal leaves the target untouched.
    let mut next_free = r.pos;
    for run in &runs {
        let off = run.file_sector * SECTOR;
        if off < next_free {
            return Err(needs_scratch(format!(
                "vmdk grain at byte {off} comes before its grain table or overlaps another grain; this layout needs scratch space"
            )));
        }
        next_free = off + run.grains * grain;
    }
    sink.begin(Some(capacity))?;
    for &(start, end) in &zeros {
        sink.zero(start, end - start)?;
    }
    drop(zeros);
    let grains_per_chunk = (limits::IO_CHUNK as u64 / grain).max(1);
    let mut buf = vec![0u8; usize::try_from(grains_per_chunk * grain).unwrap_or(limits::IO_CHUNK)];
    for run in &runs {
        r.skip_to(run.file_sector * SECTOR, "vmdk data before a grain")?;
        let mut done = 0;
        while done < run.grains {
            let n = grains_per_chunk.min(run.grains - done);
            let guest = (run.guest_grain + done) * grain;
            // The disk's last grain may extend past the capacity; only its guest part must
            // be in the file (as for random access), and nothing of the run follows it.
            let len = usize::try_from((n * grain).min(capacity - guest)).unwrap_or(0);
            r.read_exact(&mut buf[..len], "a vmdk grain")?;
            sink.data(guest, &buf[..len])?;
            if (len as u64) < n * grain {
                break;
            }
            done += n;
        }
    }
    Ok(())
}
