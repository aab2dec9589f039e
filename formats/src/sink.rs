//! The [`ExtentSink`] that writes converted guest bytes into a [`Target`].
//!
//! Every converter (raw stream, qcow2/vmdk streamers, the random-access copy loop) reports guest
//! ranges here. The sink enforces what the target can take before anything is written, turns
//! all-zero blocks inside data into zero ranges (holes on files), merges adjacent zero ranges so a
//! block device sees few large BLKZEROOUT calls, and counts what it did.
//!
//! A sink made with [`TargetSink::pipelined`] hands the target operations to a writer thread
//! (the `pipeline` module) so the converter keeps reading while earlier data is written; the
//! checks, zero detection and totals stay here on the converter's thread, and a write error
//! comes back from the next call or from [`TargetSink::finish`].

use std::thread::Scope;

use crate::error::{Error, ErrorKind, Result};
use crate::image::ExtentSink;
use crate::limits::{MAX_VIRTUAL_SIZE, ZERO_DETECT_BLOCK};
use crate::pipeline::{BUFFER_LEN, Pipeline};
use crate::target::{Target, write_at, zero_at};

/// What the sink saw, handed back by [`TargetSink::finish`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkTotals {
    /// The size announced by `begin`, if any.
    pub virtual_size: Option<u64>,
    /// Bytes written as data.
    pub data_bytes: u64,
    /// Bytes handled as zero (reported zero ranges plus zero blocks found in data).
    pub zero_bytes: u64,
    /// One past the highest guest offset reported.
    pub end: u64,
}

/// Writes guest ranges into a target, within its capacity.
pub struct TargetSink<'t> {
    out: Out<'t>,
    /// The target's description, for messages.
    name: String,
    /// Bytes the target may hold: the requested size, else the device size; `None` for a file
    /// without a requested size (it takes the image's size).
    capacity: Option<u64>,
    begun: bool,
    totals: SinkTotals,
    /// A zero range not yet passed to the target, merged with the next adjacent one.
    pending_zero: Option<(u64, u64)>,
    /// The buffer lent by [`TargetSink::take_buffer`] when there is no writer thread.
    spare: Vec<u8>,
    /// Zero-detection segments of the current buffer: (zero, start, end).
    segments: Vec<(bool, usize, usize)>,
    /// Debug builds check the "each byte once" contract of converters.
    #[cfg(debug_assertions)]
    seen: std::collections::BTreeMap<u64, u64>,
}

/// Where the sink's target operations go.
enum Out<'t> {
    /// Straight into the target, on the caller's thread.
    Direct(&'t mut dyn Target),
    /// To a writer thread that owns the target until `finish`.
    Piped(Pipeline<'t>),
    /// After `finish` took the writer.
    Closed,
}

/// A call after `finish`, which the API's ownership rules out.
fn closed() -> Error {
    Error::new(ErrorKind::InvalidInput, "sink used after finish")
}

impl std::fmt::Debug for TargetSink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetSink")
            .field("target", &self.name)
            .field("capacity", &self.capacity)
            .field("totals", &self.totals)
            .finish_non_exhaustive()
    }
}

/// Upstream's `ErrLargerPVCRequired` wording, which users and tests recognise.
pub fn larger_pvc_required(virtual_size: u64, available: u64) -> Error {
    Error::new(
        ErrorKind::TargetTooSmall,
        format!(
            "virtual image size {virtual_size} is larger than the reported available storage \
             {available}. A larger PVC is required"
        ),
    )
}

impl<'t> TargetSink<'t> {
    /// A sink into `target`. `target_size` is the requested final size; on a block device it
    /// must fit the device.
    pub fn new(target: &'t mut dyn Target, target_size: Option<u64>) -> Result<Self> {
        let capacity = capacity(target, target_size)?;
        let name = target.describe();
        Ok(Self::with_out(Out::Direct(target), name, capacity))
    }

    /// A sink into `target` whose writes run on a writer thread in `scope`, overlapping with
    /// the converter. The target is back with the caller when `scope` ends; call
    /// [`TargetSink::finish`] first, which waits for every write.
    pub fn pipelined<'env>(
        scope: &'t Scope<'t, 'env>,
        target: &'t mut dyn Target,
        target_size: Option<u64>,
    ) -> Result<Self> {
        let capacity = capacity(target, target_size)?;
        let name = target.describe();
        Ok(Self::with_out(
            Out::Piped(Pipeline::spawn(scope, target)),
            name,
            capacity,
        ))
    }

    fn with_out(out: Out<'t>, name: String, capacity: Option<u64>) -> Self {
        TargetSink {
            out,
            name,
            capacity,
            begun: false,
            totals: SinkTotals::default(),
            pending_zero: None,
            spare: Vec::new(),
            segments: Vec::new(),
            #[cfg(debug_assertions)]
            seen: std::collections::BTreeMap::new(),
        }
    }

    /// Flush pending zeroes, wait for every write, and check that every announced byte was
    /// reported.
    pub fn finish(mut self) -> Result<SinkTotals> {
        self.flush_zero()?;
        if let Out::Piped(pipe) = std::mem::replace(&mut self.out, Out::Closed) {
            pipe.finish()?;
        }
        if let Some(size) = self.totals.virtual_size {
            let covered = self.totals.data_bytes + self.totals.zero_bytes;
            if covered != size {
                return Err(Error::corrupt(format!(
                    "conversion covered {covered} of {size} bytes of the virtual disk"
                )));
            }
        }
        Ok(self.totals)
    }

    /// The target, for messages.
    pub fn describe(&self) -> String {
        self.name.clone()
    }

    /// Split `buf` (guest bytes at `offset`) into runs of zero and non-zero blocks aligned to
    /// absolute guest offsets, so a skipped block is a whole file-system block (a real hole).
    fn scan(&mut self, offset: u64, buf: &[u8]) -> Vec<(bool, usize, usize)> {
        let mut segments = std::mem::take(&mut self.segments);
        segments.clear();
        let block = ZERO_DETECT_BLOCK as u64;
        let mut pos = 0usize;
        while pos < buf.len() {
            let abs = offset + pos as u64;
            let to_boundary = (block - abs % block) as usize;
            let n = to_boundary.min(buf.len() - pos);
            let zero = is_zero(&buf[pos..pos + n]);
            match segments.last_mut() {
                Some((z, _, end)) if *z == zero => *end = pos + n,
                _ => segments.push((zero, pos, pos + n)),
            }
            pos += n;
        }
        segments
    }
}

/// What the target can hold: the requested size, which must fit a device, else the device
/// size; `None` for a file without a requested size.
fn capacity(target: &dyn Target, target_size: Option<u64>) -> Result<Option<u64>> {
    Ok(match (target_size, target.fixed_size()) {
        (Some(want), Some(device)) if want > device => {
            return Err(Error::new(
                ErrorKind::TargetTooSmall,
                format!(
                    "requested target size {want} is larger than the device {} ({device} bytes)",
                    target.describe()
                ),
            ));
        }
        (Some(want), _) => Some(want),
        (None, device) => device,
    })
}

impl TargetSink<'_> {
    /// Check `[offset, offset+len)` before touching the target.
    fn admit(&mut self, offset: u64, len: u64) -> Result<u64> {
        if !self.begun {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "converter wrote before begin()",
            ));
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::corrupt(format!("guest range at {offset} overflows")))?;
        if let Some(size) = self.totals.virtual_size {
            if end > size {
                return Err(Error::corrupt(format!(
                    "guest range {offset}..{end} is beyond the virtual size {size}"
                )));
            }
        } else if let Some(cap) = self.capacity
            && end > cap
        {
            // Size unknown up front (raw stream): refuse as soon as data passes the target.
            return Err(Error::new(
                ErrorKind::TargetTooSmall,
                format!(
                    "virtual image size is larger than the reported available storage {cap} \
                     (image data continues past byte {cap}). A larger PVC is required"
                ),
            ));
        } else if end > MAX_VIRTUAL_SIZE {
            return Err(Error::limit(format!(
                "image is larger than the {MAX_VIRTUAL_SIZE}-byte limit"
            )));
        }
        #[cfg(debug_assertions)]
        self.mark_seen(offset, end)?;
        self.totals.end = self.totals.end.max(end);
        Ok(end)
    }

    #[cfg(debug_assertions)]
    fn mark_seen(&mut self, start: u64, end: u64) -> Result<()> {
        if start == end {
            return Ok(());
        }
        let overlap = |s: u64, e: u64| s < end && start < e;
        if let Some((&s, &e)) = self.seen.range(..end).next_back()
            && overlap(s, e)
        {
            return Err(Error::corrupt(format!(
                "guest range {start}..{end} reported twice (overlaps {s}..{e})"
            )));
        }
        // Merge with neighbours so a sequential producer keeps one entry.
        let mut new_start = start;
        let mut new_end = end;
        if let Some((&s, &e)) = self.seen.range(..=start).next_back()
            && e == start
        {
            new_start = s;
            self.seen.remove(&s);
        }
        if let Some(e) = self.seen.remove(&end) {
            new_end = e;
        }
        self.seen.insert(new_start, new_end);
        Ok(())
    }

    fn zero_range(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.totals.zero_bytes += len;
        match &mut self.pending_zero {
            Some((_, end)) if *end == offset => *end += len,
            _ => {
                self.flush_zero()?;
                self.pending_zero = Some((offset, offset + len));
            }
        }
        Ok(())
    }

    fn flush_zero(&mut self) -> Result<()> {
        if let Some((start, end)) = self.pending_zero.take() {
            match &mut self.out {
                Out::Direct(target) => zero_at(*target, &self.name, start, end - start)?,
                Out::Piped(pipe) => pipe.zero(start, end - start)?,
                Out::Closed => return Err(closed()),
            }
        }
        Ok(())
    }

    /// Carry out the `(zero, start, end)` runs that [`TargetSink::scan`] found in the chunk at
    /// `offset`: zero runs become zero ranges, data runs go to `write(self, at, start, end)`.
    /// Stops at the first error.
    fn apply(
        &mut self,
        offset: u64,
        segments: &[(bool, usize, usize)],
        mut write: impl FnMut(&mut Self, u64, usize, usize) -> Result<()>,
    ) -> Result<()> {
        for &(zero, start, end) in segments {
            let at = offset + start as u64;
            if zero {
                self.zero_range(at, (end - start) as u64)?;
            } else {
                write(self, at, start, end)?;
            }
        }
        Ok(())
    }

    fn write_data(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.totals.data_bytes += buf.len() as u64;
        match &mut self.out {
            Out::Direct(target) => write_at(*target, &self.name, offset, buf),
            Out::Piped(pipe) => pipe.write(offset, buf),
            Out::Closed => Err(closed()),
        }
    }
}

impl ExtentSink for TargetSink<'_> {
    fn begin(&mut self, virtual_size: Option<u64>) -> Result<()> {
        if self.begun {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "converter called begin() twice",
            ));
        }
        if let Some(size) = virtual_size {
            if size > MAX_VIRTUAL_SIZE {
                return Err(Error::limit(format!(
                    "virtual size {size} exceeds the {MAX_VIRTUAL_SIZE}-byte limit"
                )));
            }
            if let Some(cap) = self.capacity
                && size > cap
            {
                return Err(larger_pvc_required(size, cap));
            }
        }
        self.totals.virtual_size = virtual_size;
        self.begun = true;
        Ok(())
    }

    fn data(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.admit(offset, buf.len() as u64)?;
        // Each run of non-zero blocks is written at once; zero runs become zero ranges.
        let segments = self.scan(offset, buf);
        let res = self.apply(offset, &segments, |s, at, start, end| {
            s.write_data(at, &buf[start..end])
        });
        self.segments = segments;
        res
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.admit(offset, len)?;
        self.zero_range(offset, len)
    }

    /// At least [`IO_CHUNK`](crate::limits::IO_CHUNK) bytes (a little more: room for a raw
    /// stream's held-back footer). On a pipelined sink the buffer itself goes to the writer.
    fn take_buffer(&mut self) -> Result<Vec<u8>> {
        match &mut self.out {
            Out::Piped(pipe) => pipe.take_buffer(),
            _ => {
                let mut buf = std::mem::take(&mut self.spare);
                buf.resize(BUFFER_LEN, 0);
                Ok(buf)
            }
        }
    }

    fn data_buffer(&mut self, offset: u64, buf: Vec<u8>, len: usize) -> Result<()> {
        let len = len.min(buf.len());
        if !matches!(self.out, Out::Piped(_)) {
            let res = self.data(offset, &buf[..len]);
            self.spare = buf;
            return res;
        }
        self.admit(offset, len as u64)?;
        let segments = self.scan(offset, &buf[..len]);
        if let Out::Piped(pipe) = &mut self.out {
            pipe.give_back(buf);
        }
        let res = self.apply(offset, &segments, |s, at, start, end| {
            s.totals.data_bytes += (end - start) as u64;
            match &mut s.out {
                Out::Piped(pipe) => pipe.write_lent(at, start, end),
                _ => Ok(()),
            }
        });
        self.segments = segments;
        res?;
        match &mut self.out {
            Out::Piped(pipe) => pipe.seal(),
            _ => Ok(()),
        }
    }
}

/// A block of zeroes to compare against.
static ZEROES: [u8; ZERO_DETECT_BLOCK] = [0; ZERO_DETECT_BLOCK];

/// True when every byte is zero. Compares against a zero block, which is a `memcmp` in the
/// standard library: fast even in debug builds, where a byte loop of ours would be slow.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(ZERO_DETECT_BLOCK)
        .all(|c| c == &ZEROES[..c.len()])
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::limits::IO_CHUNK;
    use crate::target::Preallocation;

    /// A target that records calls, for checking what the sink does.
    #[derive(Default)]
    struct Recorder {
        fixed: Option<u64>,
        writes: Vec<(u64, usize)>,
        zeroes: Vec<(u64, u64)>,
    }

    impl Target for Recorder {
        fn fixed_size(&self) -> Option<u64> {
            self.fixed
        }
        fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.writes.push((offset, buf.len()));
            Ok(())
        }
        fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.zeroes.push((offset, len));
            Ok(())
        }
        fn finish(&mut self, _size: u64, _prealloc: Preallocation) -> io::Result<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "recorder".into()
        }
    }

    const B: usize = ZERO_DETECT_BLOCK;

    #[test]
    fn zero_blocks_in_data_become_merged_zero_ranges() {
        let mut t = Recorder {
            fixed: Some(1 << 20),
            ..Default::default()
        };
        let mut buf = vec![0u8; 6 * B];
        buf[B] = 1; // block 1 data
        buf[4 * B + 7] = 2; // block 4 data
        let totals = {
            let mut s = TargetSink::new(&mut t, None).unwrap();
            s.begin(Some(8 * B as u64)).unwrap();
            s.data(0, &buf).unwrap();
            s.zero(6 * B as u64, 2 * B as u64).unwrap();
            s.finish().unwrap()
        };
        assert_eq!(t.writes, vec![(B as u64, B), (4 * B as u64, B)]);
        assert_eq!(
            t.zeroes,
            vec![
                (0, B as u64),
                (2 * B as u64, 2 * B as u64),
                (5 * B as u64, 3 * B as u64)
            ]
        );
        assert_eq!(totals.data_bytes, 2 * B as u64);
        assert_eq!(totals.zero_bytes, 6 * B as u64);
    }

    #[test]
    fn zero_detection_follows_absolute_alignment() {
        let mut t = Recorder::default();
        {
            let mut s = TargetSink::new(&mut t, None).unwrap();
            s.begin(None).unwrap();
            // Starts mid-block: the first 100 bytes finish block 0 (zero), then a full zero
            // block, then data.
            let mut buf = vec![0u8; 100 + 2 * B];
            buf[100 + B] = 9;
            s.data(B as u64 - 100, &buf).unwrap();
            s.finish().unwrap();
        }
        assert_eq!(t.writes, vec![(2 * B as u64, B)]);
        assert_eq!(t.zeroes, vec![(B as u64 - 100, 100 + B as u64)]);
    }

    #[test]
    fn too_large_image_is_refused_before_any_write() {
        let mut t = Recorder {
            fixed: Some(1000),
            ..Default::default()
        };
        let mut s = TargetSink::new(&mut t, None).unwrap();
        let err = s.begin(Some(1001)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TargetTooSmall);
        assert_eq!(
            err.to_string(),
            "virtual image size 1001 is larger than the reported available storage 1000. A \
             larger PVC is required"
        );
        drop(s);
        // Requested size above the device size.
        let err = TargetSink::new(&mut t, Some(2000)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TargetTooSmall);
    }

    #[test]
    fn unknown_size_stream_fails_when_data_passes_capacity() {
        let mut t = Recorder::default();
        let mut s = TargetSink::new(&mut t, Some(2 * B as u64)).unwrap();
        s.begin(None).unwrap();
        s.data(0, &vec![1u8; 2 * B]).unwrap();
        let err = s.data(2 * B as u64, &[1u8]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TargetTooSmall);
    }

    #[test]
    fn gaps_and_overruns_are_errors() {
        let mut t = Recorder::default();
        let mut s = TargetSink::new(&mut t, None).unwrap();
        s.begin(Some(100)).unwrap();
        s.data(0, &[1u8; 50]).unwrap();
        assert_eq!(s.zero(90, 20).unwrap_err().kind(), ErrorKind::Corrupt);
        let err = s.finish().unwrap_err();
        assert!(err.to_string().contains("covered 50 of 100"), "{err}");
    }

    #[cfg(debug_assertions)]
    #[test]
    fn overlapping_ranges_are_caught_in_debug_builds() {
        let mut t = Recorder::default();
        let mut s = TargetSink::new(&mut t, None).unwrap();
        s.begin(Some(100)).unwrap();
        s.zero(10, 20).unwrap();
        s.zero(0, 10).unwrap();
        s.zero(30, 10).unwrap();
        assert_eq!(s.seen.len(), 1);
        assert_eq!(
            s.data(35, &[1u8; 10]).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        assert_eq!(s.zero(0, 1).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    /// A target holding its bytes in memory; starts as 0xEE so zeroing is visible. Writes at
    /// or past `fail_from` fail with ENOSPC.
    struct Memory {
        bytes: Vec<u8>,
        fail_from: u64,
    }

    impl Memory {
        fn new(len: usize) -> Self {
            Memory {
                bytes: vec![0xEE; len],
                fail_from: u64::MAX,
            }
        }
    }

    impl Target for Memory {
        fn fixed_size(&self) -> Option<u64> {
            Some(self.bytes.len() as u64)
        }
        fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            if offset + buf.len() as u64 > self.fail_from {
                return Err(io::Error::from_raw_os_error(nix::libc::ENOSPC));
            }
            let at = offset as usize;
            self.bytes[at..at + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.bytes[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn finish(&mut self, _size: u64, _prealloc: Preallocation) -> io::Result<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    /// Guest bytes with data, zero blocks and unaligned edges, fed through every entry point.
    fn feed(s: &mut TargetSink<'_>, image: &[u8]) -> Result<()> {
        s.begin(Some(image.len() as u64))?;
        // Small copied pieces, an unaligned one among them.
        let mut pos = 0usize;
        for len in [100, 4000, 2 * B - 4100, 3 * B] {
            s.data(pos as u64, &image[pos..pos + len])?;
            pos += len;
        }
        // A reported zero range (the image is zero there).
        s.zero(pos as u64, B as u64)?;
        pos += B;
        // Lent buffers, the last one partly filled.
        while pos < image.len() {
            let mut buf = s.take_buffer()?;
            let n = buf.len().min(image.len() - pos);
            buf[..n].copy_from_slice(&image[pos..pos + n]);
            s.data_buffer(pos as u64, buf, n)?;
            pos += n;
        }
        Ok(())
    }

    fn sample_image() -> Vec<u8> {
        let len = 3 * IO_CHUNK + 5 * B + 123;
        let mut image: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
        image[5 * B..6 * B].fill(0); // the reported zero range
        image[B..2 * B].fill(0);
        image[IO_CHUNK + 3 * B..IO_CHUNK + 9 * B].fill(0);
        image[3 * IO_CHUNK..].fill(0);
        image
    }

    #[test]
    fn pipelined_sink_writes_what_the_direct_sink_writes() {
        let image = sample_image();
        let mut direct = Memory::new(image.len());
        let direct_totals = {
            let mut s = TargetSink::new(&mut direct, None).unwrap();
            feed(&mut s, &image).unwrap();
            s.finish().unwrap()
        };
        let mut piped = Memory::new(image.len());
        let piped_totals = std::thread::scope(|scope| {
            let mut s = TargetSink::pipelined(scope, &mut piped, None).unwrap();
            feed(&mut s, &image).unwrap();
            s.finish().unwrap()
        });
        assert_eq!(direct.bytes, image);
        assert_eq!(piped.bytes, image);
        assert_eq!(piped_totals, direct_totals);
        assert_eq!(
            piped_totals.data_bytes + piped_totals.zero_bytes,
            image.len() as u64
        );
    }

    #[test]
    fn pipelined_sink_reports_a_failed_write_like_the_direct_one() {
        let image = sample_image();
        for piped in [false, true] {
            let mut t = Memory::new(image.len());
            t.fail_from = 2 * IO_CHUNK as u64;
            let err = if piped {
                std::thread::scope(|scope| {
                    let mut s = TargetSink::pipelined(scope, &mut t, None).unwrap();
                    feed(&mut s, &image).and_then(|()| s.finish().map(|_| ()))
                })
            } else {
                let mut s = TargetSink::new(&mut t, None).unwrap();
                feed(&mut s, &image).and_then(|()| s.finish().map(|_| ()))
            }
            .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::NoSpace, "piped {piped}");
            assert!(
                err.message().starts_with("writing ") && err.message().ends_with(" to memory"),
                "piped {piped}: {err}"
            );
            // Nothing at or past the failure point was written.
            assert!(t.bytes[2 * IO_CHUNK..].iter().all(|&b| b == 0xEE || b == 0));
        }
    }

    #[test]
    fn is_zero_checks_every_byte() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[17] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[]));
    }
}
