//! Microsoft VHD (qemu-img's `vpc`): fixed and dynamic disks. Differencing disks are refused.
//!
//! Spec: Microsoft "Virtual Hard Disk Image Format Specification" (footer, dynamic disk header,
//! block allocation table); QEMU's `block/vpc.c` decides the guest size, which we match.
//!
//! ```text
//!  fixed:    ┌──────────── raw guest bytes ────────────┬─ footer (512) ─┐
//!  dynamic:  ┌ footer copy ┬ dyn header (1024) ┬ BAT ┬ [bitmap|block] … ┬ footer ┐
//!  BAT entry (u32 BE) = sector of a block's sector bitmap; 0xffffffff = not allocated.
//! ```
//!
//! All fields are big-endian. Like qemu, reads ignore the per-block sector bitmaps: an allocated
//! block is read whole. Unlike qemu, a table or block outside the file is an error.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::detect::ImageFormat;
use crate::error::{Error, Result};
use crate::image::{DiskImage, Extent, ExtentKind, FormatInfo, OpenOptions};
use crate::limits;
use crate::read_at::ReadAt;

/// Bytes of the footer (and of its copy at the start of a dynamic disk).
const FOOTER_LEN: usize = 512;
/// Footer cookie.
const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Dynamic disk header cookie.
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// Bytes of the dynamic disk header.
const DYN_HEADER_LEN: usize = 1024;
/// Disk types in the footer.
const DISK_FIXED: u32 = 2;
const DISK_DYNAMIC: u32 = 3;
const DISK_DIFFERENCING: u32 = 4;
/// BAT entry of a block that is not allocated.
const BAT_UNUSED: u32 = 0xffff_ffff;
/// Sectors of the largest CHS geometry (65535 × 16 × 255). A disk with this geometry is larger
/// than CHS can express, so its size comes from the footer even for CHS-sized creators.
const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
const SECTOR: u64 = 512;
/// Blocks examined by one `extent` call (callers merge adjacent runs).
const EXTENT_SCAN_BLOCKS: u64 = 4096;
/// The unit a fixed disk is walked in: its data is raw, so any size works; 2 MiB matches the
/// dynamic default block.
const BLOCK_OF_FIXED: u64 = 2 << 20;

/// The footer fields conversion uses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Footer {
    data_offset: u64,
    current_size: u64,
    cylinders: u16,
    heads: u8,
    sectors_per_track: u8,
    disk_type: u32,
    creator_app: [u8; 4],
}

fn be32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// One's complement of the byte sum, skipping the checksum field at `field`.
fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |acc, (_, v)| acc.wrapping_add(u32::from(*v)));
    !sum
}

impl Footer {
    /// Parse a footer; `None` when the cookie is absent, an error when the checksum is wrong.
    fn parse(b: &[u8]) -> Result<Option<Footer>> {
        if b.len() < FOOTER_LEN || &b[..8] != FOOTER_COOKIE {
            return Ok(None);
        }
        let b = &b[..FOOTER_LEN];
        // Layout: cookie 0, features 8, version 12, data offset 16, timestamp 24,
        // creator app 28, creator version 32, creator OS 36, original size 40,
        // current size 48, geometry 56 (cyl u16, heads u8, sectors u8), type 60, checksum 64.
        let stored = be32(b, 64);
        let computed = checksum(b, 64);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "vhd footer checksum is 0x{stored:08x}, expected 0x{computed:08x}"
            )));
        }
        Ok(Some(Footer {
            data_offset: be64(b, 16),
            current_size: be64(b, 48),
            cylinders: u16::from_be_bytes([b[56], b[57]]),
            heads: b[58],
            sectors_per_track: b[59],
            disk_type: be32(b, 60),
            creator_app: [b[28], b[29], b[30], b[31]],
        }))
    }

    /// The guest size as qemu computes it: Virtual PC and qemu's own `qemu` creator size disks
    /// by CHS geometry, everyone else (Hyper-V, `qem2`, Xen, Azure, disk2vhd) by `current_size`;
    /// a disk at the maximum geometry always uses `current_size`.
    fn virtual_size(&self) -> Result<u64> {
        let chs =
            u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track);
        let use_chs = matches!(&self.creator_app, b"vpc " | b"qemu") && chs != MAX_GEOMETRY_SECTORS;
        let size = if use_chs {
            chs * SECTOR
        } else {
            self.current_size / SECTOR * SECTOR
        };
        if size > limits::MAX_VIRTUAL_SIZE {
            return Err(Error::limit(format!(
                "vhd virtual size of {size} bytes is more than the {} byte limit",
                limits::MAX_VIRTUAL_SIZE
            )));
        }
        Ok(size)
    }

    fn refuse_differencing(&self) -> Result<()> {
        match self.disk_type {
            DISK_FIXED | DISK_DYNAMIC => Ok(()),
            DISK_DIFFERENCING => Err(Error::unsupported(
                "vhd differencing disks (with a parent) are not supported",
            )),
            other => Err(Error::unsupported(format!(
                "vhd disk type {other} is not supported"
            ))),
        }
    }
}

/// Recognise the 512-byte footer at the end of a *fixed* VHD (which has no header at offset
/// 0). Returns `None` unless the cookie, checksum and disk type all say "fixed VHD".
pub fn fixed_footer(tail: &[u8; 512]) -> Option<FormatInfo> {
    let footer = Footer::parse(tail).ok()??;
    if footer.disk_type != DISK_FIXED {
        return None;
    }
    Some(FormatInfo {
        format: ImageFormat::Vhd,
        virtual_size: Some(footer.virtual_size().ok()?),
        cluster_size: None,
        subformat: Some("fixed".to_string()),
        backing_file: None,
        // Raw bytes followed by the footer: converted in one pass by holding back 512 bytes.
        streamable: true,
    })
}

/// Parse the header at the start of the image (`head` holds up to
/// [`crate::limits::DETECT_HEAD_LEN`] bytes) without reading anything else: the footer copy
/// at offset 0 of a dynamic disk.
pub fn probe(head: &[u8]) -> Result<FormatInfo> {
    let footer = Footer::parse(head)?
        .ok_or_else(|| Error::corrupt("vhd footer cookie 'conectix' not found at offset 0"))?;
    footer.refuse_differencing()?;
    let virtual_size = footer.virtual_size()?;
    let dynamic = footer.disk_type == DISK_DYNAMIC;
    let cluster_size = usize::try_from(footer.data_offset)
        .ok()
        .and_then(|off| head.get(off..off.checked_add(DYN_HEADER_LEN)?))
        .filter(|h| &h[..8] == DYN_COOKIE)
        .map(|h| u64::from(be32(h, 32)));
    Ok(FormatInfo {
        format: ImageFormat::Vhd,
        virtual_size: Some(virtual_size),
        cluster_size: if dynamic { cluster_size } else { None },
        subformat: Some(if dynamic { "dynamic" } else { "fixed" }.to_string()),
        backing_file: None,
        streamable: !dynamic,
    })
}

/// Open the image for random access (fixed or dynamic).
pub fn open(src: Arc<dyn ReadAt>, _opts: &OpenOptions) -> Result<Box<dyn DiskImage>> {
    let file_size = src.size().map_err(|e| Error::io("reading vhd size", e))?;
    if file_size < FOOTER_LEN as u64 {
        return Err(Error::truncated(format!(
            "vhd file is {file_size} bytes, shorter than its footer"
        )));
    }
    let mut buf = [0u8; FOOTER_LEN];
    read_in_file(&*src, file_size, &mut buf, 0, "vhd footer copy")?;
    let head = Footer::parse(&buf)?;
    let footer = match head {
        Some(f) if f.disk_type != DISK_FIXED => f,
        _ => {
            read_in_file(
                &*src,
                file_size,
                &mut buf,
                file_size - FOOTER_LEN as u64,
                "vhd footer",
            )?;
            Footer::parse(&buf)?
                .ok_or_else(|| Error::corrupt("vhd footer cookie 'conectix' not found"))?
        }
    };
    footer.refuse_differencing()?;
    let virtual_size = footer.virtual_size()?;
    if footer.disk_type == DISK_FIXED {
        let data = file_size - FOOTER_LEN as u64;
        if virtual_size > data {
            return Err(Error::corrupt(format!(
                "vhd fixed disk holds {data} bytes of data, less than its {virtual_size} byte size"
            )));
        }
        return Ok(Box::new(VhdImage {
            src,
            file_size,
            virtual_size,
            layout: Layout::Fixed,
        }));
    }
    let dynamic = Dynamic::open(&src, file_size, &footer, virtual_size)?;
    Ok(Box::new(VhdImage {
        src,
        file_size,
        virtual_size,
        layout: Layout::Dynamic(dynamic),
    }))
}

/// Read `buf` at `off`, refusing (as corrupt) anything past the end of the file.
fn read_in_file(
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

/// A table of fixed-width entries read page by page on demand (BAT, VDI block map), so a huge
/// table never sits in memory whole.
pub(crate) struct TablePager {
    offset: u64,
    entries: u64,
    entry_bytes: usize,
    decode: fn(&[u8]) -> u64,
    what: &'static str,
    pages: HashMap<u64, Arc<[u64]>>,
}

/// Entries per page: 4 KiB of u32 entries, one read per page.
const PAGE_ENTRIES: u64 = 1024;
/// Pages kept: 256 × 1024 entries covers 256 Ki blocks (512 GiB of 2 MiB VHD blocks), ≤ 2 MiB.
const PAGES_CACHED: usize = 256;

impl TablePager {
    /// A table of `entries` entries at file `offset`; the caller has checked it lies in the file.
    pub(crate) fn new(
        offset: u64,
        entries: u64,
        entry_bytes: usize,
        decode: fn(&[u8]) -> u64,
        what: &'static str,
    ) -> Self {
        TablePager {
            offset,
            entries,
            entry_bytes,
            decode,
            what,
            pages: HashMap::new(),
        }
    }

    /// Entry `index` (< entries).
    pub(crate) fn get(&mut self, src: &dyn ReadAt, file_size: u64, index: u64) -> Result<u64> {
        let page = index / PAGE_ENTRIES;
        if !self.pages.contains_key(&page) {
            let first = page * PAGE_ENTRIES;
            let count = PAGE_ENTRIES.min(self.entries.saturating_sub(first));
            let width = self.entry_bytes as u64;
            let mut raw = vec![0u8; usize::try_from(count * width).unwrap_or(0)];
            read_in_file(
                src,
                file_size,
                &mut raw,
                self.offset + first * width,
                self.what,
            )?;
            let decoded: Arc<[u64]> = raw
                .chunks_exact(self.entry_bytes)
                .map(self.decode)
                .collect();
            if self.pages.len() >= PAGES_CACHED {
                self.pages.clear();
            }
            self.pages.insert(page, decoded);
        }
        let entries = self
            .pages
            .get(&page)
            .ok_or_else(|| Error::corrupt(format!("{} page missing", self.what)))?;
        entries
            .get(usize::try_from(index - page * PAGE_ENTRIES).unwrap_or(usize::MAX))
            .copied()
            .ok_or_else(|| Error::corrupt(format!("{} index {index} out of range", self.what)))
    }
}

/// Dynamic-disk geometry and its block allocation table.
struct Dynamic {
    block_size: u64,
    /// Bytes of the sector bitmap in front of each block.
    bitmap_bytes: u64,
    bat: TablePager,
}

impl Dynamic {
    fn open(
        src: &Arc<dyn ReadAt>,
        file_size: u64,
        footer: &Footer,
        virtual_size: u64,
    ) -> Result<Dynamic> {
        let mut h = [0u8; DYN_HEADER_LEN];
        read_in_file(
            &**src,
            file_size,
            &mut h,
            footer.data_offset,
            "vhd dynamic disk header",
        )?;
        // Layout: cookie 0, data offset 8, table offset 16, header version 24,
        // max table entries 28, block size 32, checksum 36, parent uuid 40, …
        if &h[..8] != DYN_COOKIE {
            return Err(Error::corrupt(format!(
                "vhd dynamic disk header at file offset {} has no 'cxsparse' cookie",
                footer.data_offset
            )));
        }
        let stored = be32(&h, 36);
        let computed = checksum(&h, 36);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "vhd dynamic disk header checksum is 0x{stored:08x}, expected 0x{computed:08x}"
            )));
        }
        let table_offset = be64(&h, 16);
        let max_entries = u64::from(be32(&h, 28));
        let block_size = u64::from(be32(&h, 32));
        if block_size < SECTOR || !block_size.is_power_of_two() {
            return Err(Error::corrupt(format!(
                "vhd block size {block_size} is not a power of two of at least 512"
            )));
        }
        let blocks = virtual_size.div_ceil(block_size);
        if max_entries < blocks {
            return Err(Error::corrupt(format!(
                "vhd block table has {max_entries} entries, fewer than the {blocks} the {virtual_size} byte disk needs"
            )));
        }
        if table_offset
            .checked_add(blocks * 4)
            .is_none_or(|end| end > file_size)
        {
            return Err(Error::corrupt(format!(
                "vhd block allocation table at file offset {table_offset} ({} bytes) lies past the end of the file ({file_size} bytes)",
                blocks * 4
            )));
        }
        let bitmap_bytes = (block_size / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR;
        Ok(Dynamic {
            block_size,
            bitmap_bytes,
            bat: TablePager::new(
                table_offset,
                blocks,
                4,
                |b| u64::from(be32(b, 0)),
                "vhd block allocation table",
            ),
        })
    }
}

enum Layout {
    Fixed,
    Dynamic(Dynamic),
}

/// A fixed or dynamic VHD opened for random access.
struct VhdImage {
    src: Arc<dyn ReadAt>,
    file_size: u64,
    virtual_size: u64,
    layout: Layout,
}

impl fmt::Debug for VhdImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.layout {
            Layout::Fixed => "fixed",
            Layout::Dynamic(_) => "dynamic",
        };
        f.debug_struct("VhdImage")
            .field("virtual_size", &self.virtual_size)
            .field("layout", &kind)
            .finish()
    }
}

impl VhdImage {
    /// File offset of the data of block `index`, or `None` when the block is not allocated.
    /// For a fixed disk every "block" is the raw data at its own offset.
    fn block_data(&mut self, index: u64) -> Result<Option<u64>> {
        let Layout::Dynamic(d) = &mut self.layout else {
            return Ok(Some(index * BLOCK_OF_FIXED));
        };
        let entry = d.bat.get(&*self.src, self.file_size, index)?;
        if entry == u64::from(BAT_UNUSED) {
            return Ok(None);
        }
        let start = entry * SECTOR + d.bitmap_bytes;
        let needed = d.block_size.min(self.virtual_size - index * d.block_size);
        if start + needed > self.file_size {
            return Err(Error::corrupt(format!(
                "vhd block {index} at file offset {start} lies past the end of the file ({} bytes)",
                self.file_size
            )));
        }
        Ok(Some(start))
    }
}

impl DiskImage for VhdImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Vhd
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent> {
        if offset >= self.virtual_size || max_len == 0 {
            return Ok(Extent {
                len: 0,
                kind: ExtentKind::Data,
            });
        }
        let end = offset.saturating_add(max_len).min(self.virtual_size);
        let block_size = match &self.layout {
            Layout::Fixed => {
                return Ok(Extent {
                    len: end - offset,
                    kind: ExtentKind::Data,
                });
            }
            Layout::Dynamic(d) => d.block_size,
        };
        let mut pos = offset;
        let mut kind = None;
        let mut scanned = 0;
        while pos < end && scanned < EXTENT_SCAN_BLOCKS {
            let index = pos / block_size;
            let this = if self.block_data(index)?.is_some() {
                ExtentKind::Data
            } else {
                ExtentKind::Zero
            };
            if kind.is_some_and(|k| k != this) {
                break;
            }
            kind = Some(this);
            pos = ((index + 1) * block_size).min(end);
            scanned += 1;
        }
        Ok(Extent {
            len: pos - offset,
            kind: kind.unwrap_or(ExtentKind::Zero),
        })
    }

    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.virtual_size)
        {
            return Err(Error::new(
                crate::error::ErrorKind::InvalidInput,
                format!("read at {offset} past the end of the vhd disk"),
            ));
        }
        let block_size = match &self.layout {
            Layout::Fixed => {
                return read_in_file(&*self.src, self.file_size, buf, offset, "vhd data");
            }
            Layout::Dynamic(d) => d.block_size,
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / block_size;
            let within = pos % block_size;
            let n =
                usize::try_from((block_size - within).min((buf.len() - done) as u64)).unwrap_or(0);
            let piece = &mut buf[done..done + n];
            match self.block_data(index)? {
                None => piece.fill(0),
                Some(start) => read_in_file(
                    &*self.src,
                    self.file_size,
                    piece,
                    start + within,
                    "vhd block",
                )?,
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::testutil::{
        MIXED_SIZE, Msg, assert_refused, check_open_refuses, edited, exercise, have_tools,
        mixed_reads_like_qemu, open_bytes, qemu_mixed, qemu_raw, read_all,
    };
    use proptest::prelude::*;

    #[test]
    fn dynamic_vhd_reads_like_qemu_img() {
        mixed_reads_like_qemu(open, "vpc", &["-o", "subformat=dynamic"]);
    }

    #[test]
    fn fixed_vhd_reads_like_qemu_img() {
        mixed_reads_like_qemu(open, "vpc", &["-o", "subformat=fixed"]);
    }

    #[test]
    fn force_size_vhd_uses_current_size_like_qemu_img() {
        // force_size=on makes qemu write creator "qem2" and the exact size, not the CHS one.
        let options = ["-o", "subformat=dynamic,force_size=on"];
        if let Some(ours) = mixed_reads_like_qemu(open, "vpc", &options) {
            assert_eq!(ours.len() as u64, MIXED_SIZE);
        }
    }

    /// The file qemu-img writes for [`crate::testutil::mixed_raw`] with `subformat`, and
    /// qemu-img's size of its disk. `None` without qemu-img.
    fn qemu_vhd(subformat: &str) -> Option<(tempfile::TempDir, Vec<u8>, u64)> {
        if !have_tools(&["qemu-img"]) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let opt = format!("subformat={subformat}");
        let image = qemu_mixed(dir.path(), "vpc", &["-o", &opt], "img.vhd");
        let size = qemu_raw(&image, "vpc").len() as u64;
        Some((dir, std::fs::read(&image).unwrap(), size))
    }

    #[test]
    fn fixed_footer_recognises_qemu_fixed_vhd() {
        let Some((_dir, bytes, size)) = qemu_vhd("fixed") else {
            return;
        };
        let tail: [u8; 512] = bytes[bytes.len() - 512..].try_into().unwrap();

        let info = fixed_footer(&tail).unwrap();

        assert_eq!(info.virtual_size, Some(size));
    }

    #[test]
    fn probe_reports_dynamic_block_size() {
        let Some((_dir, bytes, size)) = qemu_vhd("dynamic") else {
            return;
        };

        let info = probe(&bytes[..64 << 10]).unwrap();

        assert_eq!(
            (
                info.virtual_size,
                info.subformat.as_deref(),
                info.cluster_size
            ),
            (Some(size), Some("dynamic"), Some(2 << 20))
        );
    }

    // ---- images built in code ----

    /// A footer with a valid checksum: creator "win " (size from `current_size`).
    fn footer(disk_type: u32, size: u64, data_offset: u64) -> Vec<u8> {
        let mut f = vec![0u8; 512];
        f[0..8].copy_from_slice(FOOTER_COOKIE); // cookie
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // format version
        f[16..24].copy_from_slice(&data_offset.to_be_bytes()); // data offset
        f[28..32].copy_from_slice(b"win "); // creator application
        f[40..48].copy_from_slice(&size.to_be_bytes()); // original size
        f[48..56].copy_from_slice(&size.to_be_bytes()); // current size
        f[60..64].copy_from_slice(&disk_type.to_be_bytes()); // disk type
        let sum = checksum(&f, 64);
        f[64..68].copy_from_slice(&sum.to_be_bytes()); // checksum
        f
    }

    /// Dynamic disk of 8 blocks of 4 KiB: footer copy, header at 512, BAT at 1536, blocks
    /// (512-byte bitmap + 4 KiB data) from 2048, footer. `blocks` lists (index, fill byte).
    fn build_dynamic(blocks: &[(u32, u8)]) -> Vec<u8> {
        let size = 8 * 4096;
        let mut img = footer(DISK_DYNAMIC, size, 512);
        let mut h = vec![0u8; 1024];
        h[0..8].copy_from_slice(DYN_COOKIE); // cookie
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes()); // data offset (unused)
        h[16..24].copy_from_slice(&1536u64.to_be_bytes()); // table offset
        h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // header version
        h[28..32].copy_from_slice(&8u32.to_be_bytes()); // max table entries
        h[32..36].copy_from_slice(&4096u32.to_be_bytes()); // block size
        let sum = checksum(&h, 36);
        h[36..40].copy_from_slice(&sum.to_be_bytes()); // checksum
        img.extend(h);
        let mut bat = vec![0xffu8; 512];
        for (n, &(index, _)) in blocks.iter().enumerate() {
            let sector = 4 + n as u32 * 9;
            bat[index as usize * 4..index as usize * 4 + 4].copy_from_slice(&sector.to_be_bytes());
        }
        img.extend(bat);
        for &(_, fill) in blocks {
            img.extend([0xffu8; 512]); // sector bitmap
            img.extend([fill; 4096]);
        }
        img.extend(footer(DISK_DYNAMIC, size, 512));
        img
    }

    /// Recompute the checksum of the dynamic header at 512 after an edit.
    fn reseal_dynamic_header(img: &mut [u8]) {
        let sum = checksum(&img[512..1536], 36);
        img[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
    }

    #[test]
    fn built_dynamic_vhd_reads_blocks_and_holes() {
        let img = build_dynamic(&[(1, 0xaa), (7, 0xbb)]);
        let mut expected = vec![0u8; 8 * 4096];
        expected[4096..8192].fill(0xaa);
        expected[7 * 4096..].fill(0xbb);

        let ours = read_all(&mut *open_bytes(open, img).unwrap()).unwrap();

        assert_eq!(ours, expected);
    }

    #[test]
    fn built_fixed_vhd_reads_data_before_footer() {
        let mut img = vec![0x42u8; 8192];
        img.extend(footer(DISK_FIXED, 8192, u64::MAX));

        let ours = read_all(&mut *open_bytes(open, img).unwrap()).unwrap();

        assert_eq!(ours, vec![0x42u8; 8192]);
    }

    #[test]
    fn bad_footer_checksum_is_corrupt() {
        let mut img = build_dynamic(&[]);
        img[40] ^= 1; // original size changes, checksum does not

        assert_refused(
            probe(&img),
            ErrorKind::Corrupt,
            Msg::Starts("vhd footer checksum is 0x"),
        );
    }

    #[test]
    fn fixed_footer_with_bad_checksum_is_not_recognised() {
        let mut tail: [u8; 512] = footer(DISK_FIXED, 8192, u64::MAX).try_into().unwrap();
        tail[48] ^= 1;

        assert_eq!(fixed_footer(&tail), None);
    }

    /// Damaged or unsupported images that `open` refuses.
    #[test]
    fn bad_images_are_refused_by_open() {
        let mut short_fixed = vec![0u8; 4096];
        short_fixed.extend(footer(DISK_FIXED, 8192, u64::MAX));
        check_open_refuses(
            open,
            [
                (
                    "fixed vhd shorter than its size",
                    (short_fixed, ErrorKind::Corrupt, Msg::Any),
                ),
                (
                    "differencing vhd",
                    (
                        edited(build_dynamic(&[]), |img| {
                            img[..512].copy_from_slice(&footer(DISK_DIFFERENCING, 8 * 4096, 512));
                        }),
                        ErrorKind::Unsupported,
                        Msg::Is("vhd differencing disks (with a parent) are not supported"),
                    ),
                ),
                (
                    "bat past eof",
                    (
                        edited(build_dynamic(&[]), |img| {
                            img[512 + 16..512 + 24].copy_from_slice(&1_000_000u64.to_be_bytes()); // table offset
                            reseal_dynamic_header(img);
                        }),
                        ErrorKind::Corrupt,
                        Msg::Starts("vhd block allocation table at file offset 1000000"),
                    ),
                ),
                (
                    "block size not a power of two",
                    (
                        edited(build_dynamic(&[]), |img| {
                            img[512 + 32..512 + 36].copy_from_slice(&3000u32.to_be_bytes()); // block size
                            reseal_dynamic_header(img);
                        }),
                        ErrorKind::Corrupt,
                        Msg::Is("vhd block size 3000 is not a power of two of at least 512"),
                    ),
                ),
                (
                    "truncated",
                    (
                        edited(build_dynamic(&[(0, 1)]), |img| img.truncate(300)),
                        ErrorKind::Truncated,
                        Msg::Any,
                    ),
                ),
            ],
        );
    }

    #[test]
    fn block_past_eof_is_corrupt_when_read() {
        let mut img = build_dynamic(&[(2, 1)]);
        img[1536 + 8..1536 + 12].copy_from_slice(&90_000u32.to_be_bytes()); // BAT[2] -> far away
        let mut disk = open_bytes(open, img).unwrap();
        let mut buf = vec![0u8; 512];

        assert_refused(
            disk.read_exact_at(&mut buf, 2 * 4096),
            ErrorKind::Corrupt,
            Msg::Starts("vhd block 2 at file offset"),
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn mutated_dynamic_vhd_never_panics(edits in prop::collection::vec((0usize..2048, any::<u8>()), 1..8)) {
            // Footer copy, dynamic header and BAT live in the first 2 KiB; the checksums are
            // recomputed so the mutations reach the parser behind them.
            let mut img = build_dynamic(&[(1, 0xaa), (7, 0xbb)]);
            for &(pos, value) in &edits {
                img[pos] = value;
            }
            let sum = checksum(&img[..512], 64);
            img[64..68].copy_from_slice(&sum.to_be_bytes());
            reseal_dynamic_header(&mut img);
            let _ = probe(&img);
            if let Ok(mut disk) = open_bytes(open, img) {
                exercise(&mut *disk);
            }
        }
    }
}
