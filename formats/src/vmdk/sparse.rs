//! Hosted sparse extents (`KDMV`): header parsing, grain lookup and grain reads.
//!
//! The grain directory is loaded at open (bounded by [`limits::VMDK_MAX_GD_BYTES`]); grain tables
//! are read when first needed and kept in a small cache.

use std::collections::HashMap;
use std::sync::Arc;

use flate2::{Decompress, FlushDecompress, Status};

use super::SECTOR;
use super::descriptor::Descriptor;
use crate::error::{Error, Result};
use crate::image::{Extent, ExtentKind};
use crate::limits;
use crate::read_at::ReadAt;

/// `KDMV` read as a little-endian u32.
pub(crate) const SPARSE_MAGIC: u32 = 0x564d_444b;
/// Header flag: the newline-detection characters are valid and must be checked.
const FLAG_NL_DETECT: u32 = 1 << 0;
/// Header flag: grain table entry 1 means "zero grain".
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Header flag: grains are compressed.
const FLAG_COMPRESSED: u32 = 1 << 16;
/// Header flag: grains and metadata are preceded by markers (streamOptimized).
const FLAG_MARKERS: u32 = 1 << 17;
/// `gd_offset` value meaning "the grain directory is found through the footer".
pub(crate) const GD_AT_END: u64 = u64::MAX;
/// `compressAlgorithm` for deflate (zlib), the only one defined.
const COMPRESSION_DEFLATE: u16 = 1;
/// The grain table entry meaning "zero grain" when [`FLAG_ZERO_GRAIN`] is set.
const GTE_ZERO: u32 = 1;
/// Bytes of a grain marker before the compressed data: lba (u64) and size (u32).
pub(crate) const GRAIN_MARKER_LEN: usize = 12;
/// Metadata marker type of the footer (stream-optimized layout).
pub(crate) const MARKER_FOOTER: u32 = 3;
/// Grain tables kept in memory: 256 × 2 KiB = 512 KiB covers 8 GiB of guest space at the
/// standard geometry, plenty for the converter's sequential walk.
const GT_CACHE_TABLES: usize = 256;
/// Grains examined by one `extent` call; callers merge adjacent runs, so a bound keeps each
/// call cheap on huge sparse disks.
const EXTENT_SCAN_GRAINS: u64 = 4096;

/// The fields of the 512-byte sparse extent header that conversion uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    /// Disk size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain: u64,
    pub desc_offset: u64,
    pub desc_size: u64,
    pub gtes_per_gt: u32,
    pub gd_offset: u64,
    /// Sectors of metadata before the first grain.
    pub overhead: u64,
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn le16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

impl SparseHeader {
    /// Parse and validate a header sector.
    pub(crate) fn parse(b: &[u8]) -> Result<SparseHeader> {
        if b.len() < SECTOR as usize {
            return Err(Error::truncated(format!(
                "vmdk header is {} bytes, shorter than 512",
                b.len()
            )));
        }
        // Layout: magic 0, version 4, flags 8, capacity 12, grainSize 20, descriptorOffset 28,
        // descriptorSize 36, numGTEsPerGT 44, rgdOffset 48, gdOffset 56, overHead 64,
        // uncleanShutdown 72, newline check chars 73..77, compressAlgorithm 77.
        if le32(b, 0) != SPARSE_MAGIC {
            return Err(Error::corrupt("vmdk sparse header has no KDMV magic"));
        }
        let h = SparseHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            gtes_per_gt: le32(b, 44),
            gd_offset: le64(b, 56),
            overhead: le64(b, 64),
        };
        if !(1..=3).contains(&h.version) {
            return Err(Error::unsupported(format!(
                "vmdk sparse version {} is not supported",
                h.version
            )));
        }
        if h.flags & FLAG_NL_DETECT != 0 && b[73..77] != *b"\n \r\n" {
            return Err(Error::corrupt(
                "vmdk header newline check characters are damaged (was the file transferred in text mode?)",
            ));
        }
        if h.capacity
            .checked_mul(SECTOR)
            .is_none_or(|s| s > limits::MAX_VIRTUAL_SIZE)
        {
            return Err(super::too_big(h.capacity));
        }
        if h.grain == 0 {
            return Err(Error::corrupt("vmdk grain size is 0"));
        }
        if h.grain > limits::VMDK_MAX_GRAIN_BYTES / SECTOR {
            return Err(Error::limit(format!(
                "vmdk grain of {} sectors is larger than the {} byte limit",
                h.grain,
                limits::VMDK_MAX_GRAIN_BYTES
            )));
        }
        if h.gtes_per_gt == 0 || h.gtes_per_gt > 512 {
            return Err(Error::corrupt(format!(
                "vmdk grain tables of {} entries (must be 1..=512)",
                h.gtes_per_gt
            )));
        }
        if h.flags & FLAG_COMPRESSED != 0 {
            let algo = le16(b, 77);
            if algo != COMPRESSION_DEFLATE {
                return Err(Error::unsupported(format!(
                    "vmdk compression algorithm {algo} is not supported"
                )));
            }
            if h.flags & FLAG_MARKERS == 0 {
                return Err(Error::unsupported(
                    "vmdk compressed grains without markers are not supported",
                ));
            }
        }
        if h.desc_size
            .checked_mul(SECTOR)
            .is_none_or(|s| s > limits::MAX_DESCRIPTOR_BYTES)
        {
            return Err(Error::limit(format!(
                "vmdk embedded descriptor of {} sectors is more than the {} byte limit",
                h.desc_size,
                limits::MAX_DESCRIPTOR_BYTES
            )));
        }
        let gd_bytes = h.gd_entries() * 4;
        if gd_bytes > limits::VMDK_MAX_GD_BYTES {
            return Err(Error::limit(format!(
                "vmdk grain directory of {gd_bytes} bytes is more than the {} byte limit",
                limits::VMDK_MAX_GD_BYTES
            )));
        }
        Ok(h)
    }

    pub(crate) fn capacity_bytes(&self) -> u64 {
        self.capacity * SECTOR
    }

    pub(crate) fn grain_bytes(&self) -> u64 {
        self.grain * SECTOR
    }

    pub(crate) fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    pub(crate) fn zero_grain(&self) -> bool {
        self.flags & FLAG_ZERO_GRAIN != 0
    }

    /// Guest sectors one grain table covers (never 0: both factors were checked).
    pub(crate) fn gt_coverage(&self) -> u64 {
        self.grain * u64::from(self.gtes_per_gt)
    }

    /// Number of grain directory entries the capacity needs.
    pub(crate) fn gd_entries(&self) -> u64 {
        self.capacity.div_ceil(self.gt_coverage())
    }

    /// What `createType` a header of this shape normally has, for when the descriptor is
    /// not at hand.
    pub(crate) fn default_create_type(&self) -> &'static str {
        if self.compressed() {
            "streamOptimized"
        } else {
            "monolithicSparse"
        }
    }

    /// Byte range of the embedded descriptor, if there is one.
    pub(crate) fn descriptor_range(&self) -> Option<(u64, u64)> {
        if self.desc_offset == 0 || self.desc_size == 0 {
            return None;
        }
        Some((
            self.desc_offset.checked_mul(SECTOR)?,
            self.desc_size * SECTOR,
        ))
    }

    /// True when the stream converter can convert this layout in one pass: markers carry each
    /// grain's address, or the grain directory sits in the metadata area before the grains.
    pub(crate) fn streamable(&self) -> bool {
        if self.compressed() {
            return true;
        }
        self.gd_offset != GD_AT_END && self.gd_offset < self.overhead
    }
}

/// Where a grain's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GrainLoc {
    /// Reads as zeroes (unallocated or an explicit zero grain).
    Zero,
    /// Stored at this sector of the extent file.
    At(u64),
}

/// Read `buf` at `off`, refusing (as corrupt) anything that reaches past the end of the file.
pub(crate) fn read_in_file(
    src: &dyn ReadAt,
    file_size: u64,
    buf: &mut [u8],
    off: u64,
    what: &str,
) -> Result<()> {
    let len = buf.len() as u64;
    if off.checked_add(len).is_none_or(|end| end > file_size) {
        return Err(Error::corrupt(format!(
            "{what} at file offset {off} ({len} bytes) lies past the end of the file ({file_size} bytes)"
        )));
    }
    src.read_exact_at(buf, off)
        .map_err(|e| Error::io(format!("reading {what} at file offset {off}"), e))
}

/// Inflate one zlib-compressed grain into `out`; returns the number of bytes produced.
pub(crate) fn inflate_grain(data: &[u8], out: &mut [u8], lba: u64) -> Result<usize> {
    let mut z = Decompress::new(true);
    let bad = || {
        Error::corrupt(format!(
            "vmdk compressed grain for guest sector {lba} has invalid zlib data"
        ))
    };
    match z.decompress(data, out, FlushDecompress::Finish) {
        Ok(Status::StreamEnd) => usize::try_from(z.total_out()).map_err(|_| bad()),
        Ok(_) if z.total_out() as usize == out.len() => Err(Error::corrupt(format!(
            "vmdk compressed grain for guest sector {lba} inflates to more than one grain"
        ))),
        _ => Err(bad()),
    }
}

/// A hosted sparse extent opened for random access.
pub(crate) struct SparseExtent {
    src: Arc<dyn ReadAt>,
    file_size: u64,
    header: SparseHeader,
    /// Grain directory: sector of each grain table, 0 when the table is not allocated.
    gd: Vec<u32>,
    gt_cache: HashMap<u64, Arc<[u32]>>,
    /// The last inflated compressed grain (index, bytes), so sequential reads inflate once.
    grain_cache: Option<(u64, Vec<u8>)>,
    /// Parent named by the embedded descriptor.
    pub descriptor_parent: Option<String>,
    name: String,
}

impl SparseExtent {
    /// Open and validate a sparse extent; `name` is used in error messages.
    pub(crate) fn open(src: Arc<dyn ReadAt>, name: &str) -> Result<SparseExtent> {
        let file_size = src
            .size()
            .map_err(|e| Error::io(format!("reading size of {name}"), e))?;
        if file_size < SECTOR {
            return Err(Error::truncated(format!(
                "vmdk {name} is {file_size} bytes, shorter than its header"
            )));
        }
        let mut sector = [0u8; SECTOR as usize];
        read_in_file(&*src, file_size, &mut sector, 0, "vmdk header")?;
        let mut header = SparseHeader::parse(&sector)?;
        if header.gd_offset == GD_AT_END {
            header = read_footer(&*src, file_size)?;
        }
        let mut descriptor_parent = None;
        if let Some((off, len)) = header.descriptor_range() {
            let mut text = vec![
                0u8;
                usize::try_from(len)
                    .map_err(|_| Error::limit("vmdk descriptor too large"))?
            ];
            read_in_file(&*src, file_size, &mut text, off, "vmdk embedded descriptor")?;
            descriptor_parent = Descriptor::parse(&text)?.parent_hint;
        }
        let gd_len = usize::try_from(header.gd_entries() * 4)
            .map_err(|_| Error::limit("vmdk grain directory too large"))?;
        let gd_off = header.gd_offset.checked_mul(SECTOR).ok_or_else(|| {
            Error::corrupt(format!(
                "vmdk grain directory offset {} overflows",
                header.gd_offset
            ))
        })?;
        let mut raw = vec![0u8; gd_len];
        read_in_file(&*src, file_size, &mut raw, gd_off, "vmdk grain directory")?;
        let gd: Vec<u32> = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        let gt_bytes = u64::from(header.gtes_per_gt) * 4;
        for (i, &entry) in gd.iter().enumerate() {
            let off = u64::from(entry) * SECTOR;
            if entry != 0 && off + gt_bytes > file_size {
                return Err(Error::corrupt(format!(
                    "vmdk grain directory entry {i} points at a grain table at file offset {off}, past the end of the file ({file_size} bytes)"
                )));
            }
        }
        Ok(SparseExtent {
            src,
            file_size,
            header,
            gd,
            gt_cache: HashMap::new(),
            grain_cache: None,
            descriptor_parent,
            name: name.to_string(),
        })
    }

    pub(crate) fn capacity_bytes(&self) -> u64 {
        self.header.capacity_bytes()
    }

    fn grain_table(&mut self, gd_index: u64) -> Result<Option<Arc<[u32]>>> {
        let entry = usize::try_from(gd_index)
            .ok()
            .and_then(|i| self.gd.get(i))
            .copied()
            .unwrap_or(0);
        if entry == 0 {
            return Ok(None);
        }
        if let Some(gt) = self.gt_cache.get(&gd_index) {
            return Ok(Some(gt.clone()));
        }
        let mut raw = vec![0u8; self.header.gtes_per_gt as usize * 4];
        read_in_file(
            &*self.src,
            self.file_size,
            &mut raw,
            u64::from(entry) * SECTOR,
            "vmdk grain table",
        )?;
        let gt: Arc<[u32]> = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        if self.gt_cache.len() >= GT_CACHE_TABLES {
            self.gt_cache.clear();
        }
        self.gt_cache.insert(gd_index, gt.clone());
        Ok(Some(gt))
    }

    /// Where guest grain `index` lives.
    fn lookup(&mut self, index: u64) -> Result<GrainLoc> {
        let per_gt = u64::from(self.header.gtes_per_gt);
        let Some(gt) = self.grain_table(index / per_gt)? else {
            return Ok(GrainLoc::Zero);
        };
        let entry = gt
            .get(usize::try_from(index % per_gt).unwrap_or(usize::MAX))
            .copied()
            .unwrap_or(0);
        if entry == 0 || (entry == GTE_ZERO && self.header.zero_grain()) {
            return Ok(GrainLoc::Zero);
        }
        let off = u64::from(entry) * SECTOR;
        let grain = self.header.grain_bytes();
        let needed = if self.header.compressed() {
            GRAIN_MARKER_LEN as u64
        } else {
            grain.min(self.capacity_bytes() - index * grain)
        };
        if off + needed > self.file_size {
            return Err(Error::corrupt(format!(
                "vmdk {}: grain {index} at file offset {off} lies past the end of the file ({} bytes)",
                self.name, self.file_size
            )));
        }
        Ok(GrainLoc::At(u64::from(entry)))
    }

    /// The run starting at extent offset `within` (< capacity), at most `max` bytes.
    pub(crate) fn extent(&mut self, within: u64, max: u64) -> Result<Extent> {
        let grain = self.header.grain_bytes();
        let per_gt = u64::from(self.header.gtes_per_gt);
        let end = within.saturating_add(max).min(self.capacity_bytes());
        let mut index = within / grain;
        let mut pos = within;
        let mut kind = None;
        let mut scanned = 0;
        while pos < end && scanned < EXTENT_SCAN_GRAINS {
            let gd_index = index / per_gt;
            let (this, next) = if self.grain_table(gd_index)?.is_none() {
                // A missing grain table: the whole table's span is zero at once.
                (ExtentKind::Zero, (gd_index + 1) * per_gt)
            } else {
                let k = match self.lookup(index)? {
                    GrainLoc::Zero => ExtentKind::Zero,
                    GrainLoc::At(_) => ExtentKind::Data,
                };
                (k, index + 1)
            };
            match kind {
                None => kind = Some(this),
                Some(k) if k != this => break,
                Some(_) => {}
            }
            index = next;
            pos = index.saturating_mul(grain).min(end);
            scanned += 1;
        }
        Ok(Extent {
            len: pos - within,
            kind: kind.unwrap_or(ExtentKind::Zero),
        })
    }

    /// Guest bytes of this extent at `within`.
    pub(crate) fn read_exact_at(&mut self, out: &mut [u8], within: u64) -> Result<()> {
        let grain = self.header.grain_bytes();
        let mut done = 0usize;
        while done < out.len() {
            let pos = within + done as u64;
            let index = pos / grain;
            let in_grain = pos % grain;
            let n = usize::try_from((grain - in_grain).min((out.len() - done) as u64)).unwrap_or(0);
            let piece = &mut out[done..done + n];
            match self.lookup(index)? {
                GrainLoc::Zero => piece.fill(0),
                GrainLoc::At(sector) if !self.header.compressed() => {
                    read_in_file(
                        &*self.src,
                        self.file_size,
                        piece,
                        sector * SECTOR + in_grain,
                        "vmdk grain",
                    )?;
                }
                GrainLoc::At(sector) => {
                    let bytes = self.inflated(index, sector)?;
                    let start = usize::try_from(in_grain).unwrap_or(usize::MAX);
                    let src = bytes.get(start..start + n).ok_or_else(|| {
                        Error::corrupt(format!("vmdk compressed grain at sector {sector} is shorter than the disk needs"))
                    })?;
                    piece.copy_from_slice(src);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// The inflated bytes of compressed grain `index` stored at `sector`.
    fn inflated(&mut self, index: u64, sector: u64) -> Result<&[u8]> {
        if self.grain_cache.as_ref().is_none_or(|(i, _)| *i != index) {
            let grain = usize::try_from(self.header.grain_bytes()).unwrap_or(0);
            let mut marker = [0u8; GRAIN_MARKER_LEN];
            let off = sector * SECTOR;
            read_in_file(
                &*self.src,
                self.file_size,
                &mut marker,
                off,
                "vmdk grain marker",
            )?;
            let size = u64::from(le32(&marker, 8));
            if size == 0 || size > 2 * self.header.grain_bytes() {
                return Err(Error::corrupt(format!(
                    "vmdk compressed grain at sector {sector} claims {size} bytes of data"
                )));
            }
            let mut data = vec![0u8; usize::try_from(size).unwrap_or(0)];
            read_in_file(
                &*self.src,
                self.file_size,
                &mut data,
                off + GRAIN_MARKER_LEN as u64,
                "vmdk compressed grain",
            )?;
            let mut buf = vec![0u8; grain];
            let got = inflate_grain(&data, &mut buf, index * self.header.grain)?;
            let needed = self
                .header
                .grain_bytes()
                .min(self.capacity_bytes() - index * self.header.grain_bytes());
            if (got as u64) < needed {
                return Err(Error::corrupt(format!(
                    "vmdk compressed grain at sector {sector} inflates to {got} bytes, less than the {needed} the disk needs"
                )));
            }
            self.grain_cache = Some((index, buf));
        }
        Ok(self
            .grain_cache
            .as_ref()
            .map(|(_, b)| b.as_slice())
            .unwrap_or(&[]))
    }
}

/// The footer of a stream-optimized extent whose header says "grain directory at end":
/// footer marker at `size - 1536`, footer header at `size - 1024`, end-of-stream at `size - 512`.
fn read_footer(src: &dyn ReadAt, file_size: u64) -> Result<SparseHeader> {
    if file_size < 3 * SECTOR {
        return Err(Error::corrupt(
            "vmdk grain directory is at the end but the file has no footer",
        ));
    }
    let mut tail = [0u8; 3 * SECTOR as usize];
    read_in_file(
        src,
        file_size,
        &mut tail,
        file_size - 3 * SECTOR,
        "vmdk footer",
    )?;
    if le32(&tail, 8) != 0 || le32(&tail, 12) != MARKER_FOOTER {
        return Err(Error::corrupt(
            "vmdk footer marker is missing at the end of the file",
        ));
    }
    let footer = SparseHeader::parse(&tail[SECTOR as usize..2 * SECTOR as usize])
        .map_err(|e| e.context("vmdk footer"))?;
    if footer.gd_offset == GD_AT_END {
        return Err(Error::corrupt(
            "vmdk footer does not give the grain directory offset",
        ));
    }
    Ok(footer)
}
