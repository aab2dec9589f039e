//! The [`ExtentSink`] that writes converted guest bytes into a [`Target`].
//!
//! Every converter (raw stream, qcow2/vmdk streamers, the random-access copy loop) reports guest
//! ranges here. The sink enforces what the target can take before anything is written, turns
//! all-zero blocks inside data into zero ranges (holes on files), merges adjacent zero ranges so a
//! block device sees few large BLKZEROOUT calls, and counts what it did.

use crate::error::{Error, ErrorKind, Result};
use crate::image::ExtentSink;
use crate::limits::{MAX_VIRTUAL_SIZE, ZERO_DETECT_BLOCK};
use crate::target::Target;

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
    target: &'t mut dyn Target,
    /// Bytes the target may hold: the requested size, else the device size; `None` for a file
    /// without a requested size (it takes the image's size).
    capacity: Option<u64>,
    begun: bool,
    totals: SinkTotals,
    /// A zero range not yet passed to the target, merged with the next adjacent one.
    pending_zero: Option<(u64, u64)>,
    /// Debug builds check the "each byte once" contract of converters.
    #[cfg(debug_assertions)]
    seen: std::collections::BTreeMap<u64, u64>,
}

impl std::fmt::Debug for TargetSink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetSink")
            .field("target", &self.target.describe())
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
        let capacity = match (target_size, target.fixed_size()) {
            (Some(want), Some(device)) if want > device => {
                return Err(Error::new(
                    ErrorKind::TargetTooSmall,
                    format!(
                        "requested target size {want} is larger than the device {} ({device} \
                         bytes)",
                        target.describe()
                    ),
                ));
            }
            (Some(want), _) => Some(want),
            (None, device) => device,
        };
        Ok(TargetSink {
            target,
            capacity,
            begun: false,
            totals: SinkTotals::default(),
            pending_zero: None,
            #[cfg(debug_assertions)]
            seen: std::collections::BTreeMap::new(),
        })
    }

    /// Flush pending zeroes and check that every announced byte was reported.
    pub fn finish(mut self) -> Result<SinkTotals> {
        self.flush_zero()?;
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
        self.target.describe()
    }

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
            self.target.write_zeroes(start, end - start).map_err(|e| {
                Error::io(
                    format!("zeroing {}..{end} of {}", start, self.target.describe()),
                    e,
                )
            })?;
        }
        Ok(())
    }

    fn write_data(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.totals.data_bytes += buf.len() as u64;
        self.target.write_all_at(buf, offset).map_err(|e| {
            Error::io(
                format!(
                    "writing {} bytes at {offset} to {}",
                    buf.len(),
                    self.target.describe()
                ),
                e,
            )
        })
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
        // Walk blocks aligned to absolute guest offsets, so a skipped block is a whole
        // file-system block (a real hole), and write each run of non-zero blocks at once.
        let block = ZERO_DETECT_BLOCK as u64;
        let mut pos = 0usize;
        let mut run_start = 0usize;
        let mut in_data = false;
        while pos < buf.len() {
            let abs = offset + pos as u64;
            let to_boundary = (block - abs % block) as usize;
            let n = to_boundary.min(buf.len() - pos);
            let zero = is_zero(&buf[pos..pos + n]);
            if zero && in_data {
                self.write_data(offset + run_start as u64, &buf[run_start..pos])?;
                in_data = false;
            }
            if zero {
                self.zero_range(abs, n as u64)?;
            } else if !in_data {
                run_start = pos;
                in_data = true;
            }
            pos += n;
        }
        if in_data {
            self.write_data(offset + run_start as u64, &buf[run_start..])?;
        }
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.admit(offset, len)?;
        self.zero_range(offset, len)
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
