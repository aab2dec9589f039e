//! Microsoft VHDX: fixed and dynamic disks. Differencing disks and dirty logs are refused.
//!
//! Spec: Microsoft "VHDX Format Specification v1.0" (headers, region table, metadata, BAT);
//! QEMU's `block/vhdx.c` is the oracle the tests compare with.
//!
//! ```text
//!  0      64K     128K    192K     256K            (1 MiB aligned regions)
//!  ┌──────┬───────┬───────┬────────┬────────┬──── log ─┬── BAT ──┬─ metadata ─┬─ blocks … ┐
//!  │ ident│ hdr 1 │ hdr 2 │ rtab 1 │ rtab 2 │          │ u64 LE  │ table+items│           │
//!  └──────┴───────┴───────┴────────┴────────┴──────────┴─────────┴────────────┴───────────┘
//!  BAT: one entry per payload block, and after every `chunk_ratio` of them one sector-bitmap
//!  entry (unused without a parent). Entry = state (bits 0-2) | file offset in MiB (bits 20-63).
//! ```
//!
//! All structures are little-endian and CRC-32C protected. The header with the higher sequence
//! number among the valid ones wins. Unlike qemu, a BAT entry pointing outside the file is an
//! error.

use std::fmt;
use std::sync::Arc;

use crate::detect::ImageFormat;
use crate::error::{Error, Result};
use crate::image::{DiskImage, Extent, ExtentKind, FormatInfo, OpenOptions};
use crate::limits;
use crate::read_at::ReadAt;
use crate::vhd::TablePager;

/// File type identifier at offset 0.
const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// The two header copies and their size.
const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
const HEADER_LEN: usize = 4 << 10;
/// The two region table copies and their size.
const REGION_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
const REGION_TABLE_LEN: usize = 64 << 10;
/// Entry counts the spec allows in the region table and the metadata table.
const MAX_TABLE_ENTRIES: u32 = 2047;
/// Size of the metadata table at the start of the metadata region.
const METADATA_TABLE_LEN: usize = 64 << 10;
/// Block sizes the spec allows: 1 MiB to 256 MiB, powers of two.
const MIN_BLOCK: u64 = 1 << 20;
const MAX_BLOCK: u64 = 256 << 20;
/// BAT entry states.
const PAYLOAD_NOT_PRESENT: u64 = 0;
const PAYLOAD_UNDEFINED: u64 = 1;
const PAYLOAD_ZERO: u64 = 2;
const PAYLOAD_UNMAPPED: u64 = 3;
const PAYLOAD_FULLY_PRESENT: u64 = 6;
/// Log entries are made of 4 KiB sectors and start on one.
const LOG_SECTOR: u64 = 4 << 10;
/// Bytes of a log entry header that identify it.
const LOG_ENTRY_HEADER_LEN: usize = 64;
/// Blocks examined by one `extent` call (callers merge adjacent runs).
const EXTENT_SCAN_BLOCKS: u64 = 4096;

/// A GUID in its on-disk (mixed-endian) byte order.
const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

const REGION_BAT: [u8; 16] = guid(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
const REGION_METADATA: [u8; 16] = guid(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
const META_FILE_PARAMETERS: [u8; 16] = guid(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
const META_VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
const META_LOGICAL_SECTOR_SIZE: [u8; 16] = guid(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
const META_PHYSICAL_SECTOR_SIZE: [u8; 16] = guid(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
const META_PAGE83: [u8; 16] = guid(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
const META_PARENT_LOCATOR: [u8; 16] = guid(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
/// File parameters flag: the disk has a parent.
const FLAG_HAS_PARENT: u32 = 1 << 1;

fn le16(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
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

/// CRC-32C of `b` with the checksum field at 4..8 taken as zero.
fn crc_with_zero_field(b: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&b[..4]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &b[8..])
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

/// Parse the header at the start of the image (`head` holds up to
/// [`crate::limits::DETECT_HEAD_LEN`] bytes) without reading anything else.
///
/// Only the file identifier lies in the first 64 KiB; the size and block size are learnt by
/// [`open`], so `virtual_size` is `None` here.
pub fn probe(head: &[u8]) -> Result<FormatInfo> {
    if !head.starts_with(FILE_SIGNATURE) {
        return Err(Error::corrupt(
            "vhdx file identifier 'vhdxfile' not found at offset 0",
        ));
    }
    Ok(FormatInfo {
        format: ImageFormat::Vhdx,
        virtual_size: None,
        cluster_size: None,
        subformat: None,
        backing_file: None,
        streamable: false,
    })
}

/// Open the image for random access.
pub fn open(src: Arc<dyn ReadAt>, _opts: &OpenOptions) -> Result<Box<dyn DiskImage>> {
    let file_size = src.size().map_err(|e| Error::io("reading vhdx size", e))?;
    let mut ident = [0u8; 8];
    read_in_file(&*src, file_size, &mut ident, 0, "vhdx file identifier")?;
    if &ident != FILE_SIGNATURE {
        return Err(Error::corrupt(
            "vhdx file identifier 'vhdxfile' not found at offset 0",
        ));
    }
    check_headers(&*src, file_size)?;
    let (bat_region, meta_region) = read_region_table(&*src, file_size)?;
    let meta = read_metadata(&*src, file_size, meta_region)?;
    let chunk_ratio = (1u64 << 23) * meta.logical_sector / meta.block_size;
    let data_blocks = meta.virtual_size.div_ceil(meta.block_size);
    let bat_entries = data_blocks + data_blocks.saturating_sub(1) / chunk_ratio;
    if bat_entries * 8 > bat_region.1 {
        return Err(Error::corrupt(format!(
            "vhdx BAT region of {} bytes is too small for the {bat_entries} entries the disk needs",
            bat_region.1
        )));
    }
    let bat = TablePager::new(bat_region.0, bat_entries, 8, |b| le64(b, 0), "vhdx BAT");
    Ok(Box::new(VhdxImage {
        src,
        file_size,
        virtual_size: meta.virtual_size,
        block_size: meta.block_size,
        chunk_ratio,
        bat,
    }))
}

/// Validate both headers, pick the current one and refuse a dirty log.
fn check_headers(src: &dyn ReadAt, file_size: u64) -> Result<()> {
    let mut best: Option<(u64, Vec<u8>)> = None;
    for off in HEADER_OFFSETS {
        let mut h = vec![0u8; HEADER_LEN];
        read_in_file(src, file_size, &mut h, off, "vhdx header")?;
        // Layout: signature "head" 0, checksum 4, sequence 8, file write guid 16,
        // data write guid 32, log guid 48, log version 64, version 66, log length 68,
        // log offset 72.
        if &h[..4] != b"head" || le32(&h, 4) != crc_with_zero_field(&h) {
            continue;
        }
        let seq = le64(&h, 8);
        if best.as_ref().is_none_or(|(s, _)| seq > *s) {
            best = Some((seq, h));
        }
    }
    let (_, h) = best
        .ok_or_else(|| Error::corrupt("vhdx has no valid header (both header checksums fail)"))?;
    let version = le16(&h, 66);
    if version != 1 {
        return Err(Error::unsupported(format!(
            "vhdx version {version} is not supported"
        )));
    }
    let log_guid = &h[48..64];
    if log_guid.iter().any(|b| *b != 0)
        && log_has_entries(
            src,
            file_size,
            log_guid,
            le64(&h, 72),
            u64::from(le32(&h, 68)),
        )?
    {
        return Err(Error::unsupported(
            "vhdx has a dirty log; open it once with hyper-v or qemu-img to replay it",
        ));
    }
    Ok(())
}

/// True when the log region holds an entry stamped with `log_guid` (signature, guid and CRC
/// valid): such an entry may not have been applied yet, and replaying it would need write
/// access. A non-zero log GUID with no such entry is a clean log (qemu opens those too).
fn log_has_entries(
    src: &dyn ReadAt,
    file_size: u64,
    log_guid: &[u8],
    log_offset: u64,
    log_length: u64,
) -> Result<bool> {
    if log_offset
        .checked_add(log_length)
        .is_none_or(|end| end > file_size)
    {
        return Err(Error::corrupt(format!(
            "vhdx log at file offset {log_offset} ({log_length} bytes) lies past the end of the file ({file_size} bytes)"
        )));
    }
    let mut head = [0u8; LOG_ENTRY_HEADER_LEN];
    let mut pos = 0;
    while pos + LOG_SECTOR <= log_length {
        read_in_file(
            src,
            file_size,
            &mut head,
            log_offset + pos,
            "vhdx log entry",
        )?;
        // Layout: signature "loge" 0, checksum 4, entry length 8, tail 12, sequence 16,
        // descriptor count 24, reserved 28, log guid 32..48, flushed/last file offsets.
        let entry_len = u64::from(le32(&head, 8));
        if &head[..4] == b"loge" && &head[32..48] == log_guid {
            let plausible = entry_len >= LOG_SECTOR
                && entry_len.is_multiple_of(LOG_SECTOR)
                && pos + entry_len <= log_length;
            if !plausible {
                pos += LOG_SECTOR;
                continue;
            }
            if entry_len > limits::VHDX_MAX_LOG_ENTRY_BYTES {
                // Too large to verify in memory: assume it is real rather than skip a replay.
                return Ok(true);
            }
            let mut entry = vec![0u8; usize::try_from(entry_len).unwrap_or(0)];
            read_in_file(
                src,
                file_size,
                &mut entry,
                log_offset + pos,
                "vhdx log entry",
            )?;
            if le32(&entry, 4) == crc_with_zero_field(&entry) {
                return Ok(true);
            }
        }
        pos += LOG_SECTOR;
    }
    Ok(false)
}

/// The BAT and metadata regions as (file offset, length), from the first valid region table.
fn read_region_table(src: &dyn ReadAt, file_size: u64) -> Result<((u64, u64), (u64, u64))> {
    let mut table = vec![0u8; REGION_TABLE_LEN];
    let mut found = false;
    for off in REGION_OFFSETS {
        read_in_file(src, file_size, &mut table, off, "vhdx region table")?;
        // Layout: signature "regi" 0, checksum 4, entry count 8, reserved 12, entries from 16
        // (guid 16 bytes, file offset u64, length u32, required u32).
        if &table[..4] == b"regi" && le32(&table, 4) == crc_with_zero_field(&table) {
            found = true;
            break;
        }
    }
    if !found {
        return Err(Error::corrupt(
            "vhdx has no valid region table (both checksums fail)",
        ));
    }
    let count = le32(&table, 8);
    if count > MAX_TABLE_ENTRIES {
        return Err(Error::corrupt(format!(
            "vhdx region table claims {count} entries (at most {MAX_TABLE_ENTRIES})"
        )));
    }
    let (mut bat, mut meta) = (None, None);
    for i in 0..count as usize {
        let e = &table[16 + i * 32..16 + (i + 1) * 32];
        let offset = le64(e, 16);
        let length = u64::from(le32(e, 24));
        let required = le32(e, 28) & 1 != 0;
        if offset.checked_add(length).is_none_or(|end| end > file_size) {
            return Err(Error::corrupt(format!(
                "vhdx region {i} at file offset {offset} ({length} bytes) overruns the file ({file_size} bytes)"
            )));
        }
        match <[u8; 16]>::try_from(&e[..16]).unwrap_or_default() {
            REGION_BAT => bat = Some((offset, length)),
            REGION_METADATA => meta = Some((offset, length)),
            _ if required => {
                return Err(Error::unsupported(format!(
                    "vhdx has an unknown required region {i}"
                )));
            }
            _ => {}
        }
    }
    match (bat, meta) {
        (Some(b), Some(m)) => Ok((b, m)),
        _ => Err(Error::corrupt(
            "vhdx region table lacks the BAT or metadata region",
        )),
    }
}

/// The metadata items conversion needs.
struct Metadata {
    block_size: u64,
    virtual_size: u64,
    logical_sector: u64,
}

fn read_metadata(
    src: &dyn ReadAt,
    file_size: u64,
    (region, region_len): (u64, u64),
) -> Result<Metadata> {
    if region_len < METADATA_TABLE_LEN as u64 {
        return Err(Error::corrupt(format!(
            "vhdx metadata region of {region_len} bytes is smaller than its table"
        )));
    }
    let mut table = vec![0u8; METADATA_TABLE_LEN];
    read_in_file(src, file_size, &mut table, region, "vhdx metadata table")?;
    // Layout: signature "metadata" 0, reserved 8, entry count u16 10, reserved 12..32,
    // entries from 32 (item guid 16 bytes, offset u32, length u32, flags u32, reserved u32).
    if &table[..8] != b"metadata" {
        return Err(Error::corrupt(
            "vhdx metadata table has no 'metadata' signature",
        ));
    }
    let count = u32::from(le16(&table, 10));
    if count > MAX_TABLE_ENTRIES {
        return Err(Error::corrupt(format!(
            "vhdx metadata table claims {count} entries (at most {MAX_TABLE_ENTRIES})"
        )));
    }
    let (mut params, mut size, mut sector) = (None, None, None);
    for i in 0..count as usize {
        let e = &table[32 + i * 32..32 + (i + 1) * 32];
        let id = <[u8; 16]>::try_from(&e[..16]).unwrap_or_default();
        let offset = u64::from(le32(e, 16));
        let length = u64::from(le32(e, 20));
        let required = le32(e, 24) & 4 != 0;
        if offset + length > region_len {
            return Err(Error::corrupt(format!(
                "vhdx metadata item {i} ({length} bytes at {offset}) overruns its {region_len} byte region"
            )));
        }
        let read_item = |n: usize| -> Result<Vec<u8>> {
            if length < n as u64 {
                return Err(Error::corrupt(format!(
                    "vhdx metadata item {i} is {length} bytes, expected {n}"
                )));
            }
            let mut v = vec![0u8; n];
            read_in_file(
                src,
                file_size,
                &mut v,
                region + offset,
                "vhdx metadata item",
            )?;
            Ok(v)
        };
        match id {
            META_FILE_PARAMETERS => {
                let v = read_item(8)?;
                params = Some((u64::from(le32(&v, 0)), le32(&v, 4)));
            }
            META_VIRTUAL_DISK_SIZE => size = Some(le64(&read_item(8)?, 0)),
            META_LOGICAL_SECTOR_SIZE => sector = Some(u64::from(le32(&read_item(4)?, 0))),
            META_PHYSICAL_SECTOR_SIZE | META_PAGE83 => {}
            META_PARENT_LOCATOR => {
                return Err(Error::unsupported(
                    "vhdx differencing disks (with a parent) are not supported",
                ));
            }
            _ if required => {
                return Err(Error::unsupported(format!(
                    "vhdx has an unknown required metadata item {i}"
                )));
            }
            _ => {}
        }
    }
    let (block_size, flags) =
        params.ok_or_else(|| Error::corrupt("vhdx metadata lacks the file parameters"))?;
    let virtual_size =
        size.ok_or_else(|| Error::corrupt("vhdx metadata lacks the virtual disk size"))?;
    let logical_sector =
        sector.ok_or_else(|| Error::corrupt("vhdx metadata lacks the logical sector size"))?;
    if flags & FLAG_HAS_PARENT != 0 {
        return Err(Error::unsupported(
            "vhdx differencing disks (with a parent) are not supported",
        ));
    }
    if !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(Error::corrupt(format!(
            "vhdx block size {block_size} is not a power of two between 1 MiB and 256 MiB"
        )));
    }
    if logical_sector != 512 && logical_sector != 4096 {
        return Err(Error::corrupt(format!(
            "vhdx logical sector size {logical_sector} is not 512 or 4096"
        )));
    }
    if virtual_size > limits::MAX_VIRTUAL_SIZE {
        return Err(Error::limit(format!(
            "vhdx virtual size of {virtual_size} bytes is more than the {} byte limit",
            limits::MAX_VIRTUAL_SIZE
        )));
    }
    Ok(Metadata {
        block_size,
        virtual_size,
        logical_sector,
    })
}

/// A VHDX opened for random access.
struct VhdxImage {
    src: Arc<dyn ReadAt>,
    file_size: u64,
    virtual_size: u64,
    block_size: u64,
    chunk_ratio: u64,
    bat: TablePager,
}

impl fmt::Debug for VhdxImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VhdxImage")
            .field("virtual_size", &self.virtual_size)
            .field("block_size", &self.block_size)
            .finish()
    }
}

impl VhdxImage {
    /// File offset of payload block `index`, or `None` when it reads as zeroes.
    fn block_data(&mut self, index: u64) -> Result<Option<u64>> {
        let entry = self
            .bat
            .get(&*self.src, self.file_size, index + index / self.chunk_ratio)?;
        match entry & 7 {
            PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => Ok(None),
            PAYLOAD_FULLY_PRESENT => {
                let start = entry >> 20 << 20;
                let needed = self
                    .block_size
                    .min(self.virtual_size - index * self.block_size);
                if start
                    .checked_add(needed)
                    .is_none_or(|end| end > self.file_size)
                {
                    return Err(Error::corrupt(format!(
                        "vhdx block {index} at file offset {start} lies past the end of the file ({} bytes)",
                        self.file_size
                    )));
                }
                Ok(Some(start))
            }
            state => Err(Error::corrupt(format!(
                "vhdx BAT entry for block {index} has invalid state {state}"
            ))),
        }
    }
}

impl DiskImage for VhdxImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Vhdx
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
        let mut pos = offset;
        let mut kind = None;
        let mut scanned = 0;
        while pos < end && scanned < EXTENT_SCAN_BLOCKS {
            let index = pos / self.block_size;
            let this = if self.block_data(index)?.is_some() {
                ExtentKind::Data
            } else {
                ExtentKind::Zero
            };
            if kind.is_some_and(|k| k != this) {
                break;
            }
            kind = Some(this);
            pos = ((index + 1) * self.block_size).min(end);
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
                format!("read at {offset} past the end of the vhdx disk"),
            ));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / self.block_size;
            let within = pos % self.block_size;
            let n = usize::try_from((self.block_size - within).min((buf.len() - done) as u64))
                .unwrap_or(0);
            let piece = &mut buf[done..done + n];
            match self.block_data(index)? {
                None => piece.fill(0),
                Some(start) => read_in_file(
                    &*self.src,
                    self.file_size,
                    piece,
                    start + within,
                    "vhdx block",
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
        Msg, assert_refused, check_open_refuses, edited, exercise, have_tools,
        mixed_reads_like_qemu, open_bytes, open_file, p, qemu_img, qemu_io, read_all,
    };
    use proptest::prelude::*;

    #[test]
    fn dynamic_vhdx_reads_like_qemu_img() {
        mixed_reads_like_qemu(open, "vhdx", &["-o", "subformat=dynamic"]);
    }

    #[test]
    fn fixed_vhdx_reads_like_qemu_img() {
        mixed_reads_like_qemu(open, "vhdx", &["-o", "subformat=fixed"]);
    }

    #[test]
    fn block_after_a_sector_bitmap_entry_reads_what_qemu_io_wrote() {
        if !have_tools(&["qemu-img", "qemu-io"]) {
            return;
        }
        // 1 MiB blocks with 512-byte sectors: chunk ratio 4096, one bitmap entry after 4096
        // payload entries, so a disk over 4 GiB crosses it. Sparse, so the file stays small.
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("big.vhdx");
        qemu_img(&[
            "create",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            p(&image),
            "4100M",
        ]);
        qemu_io(
            &image,
            "vhdx",
            &["write -P 0x5a 4294967296 1M", "write -P 0x17 1M 4096"],
        );
        let mut disk = open_file(open, &image).unwrap();
        let mut ours = vec![0u8; 2 << 20];

        disk.read_exact_at(&mut ours, 4294967296 - (1 << 20))
            .unwrap();

        let mut expected = vec![0u8; 2 << 20];
        expected[1 << 20..].fill(0x5a);
        assert_eq!(ours, expected);
    }

    // ---- images built in code ----

    const MIB: usize = 1 << 20;

    fn put_crc(b: &mut [u8]) {
        let crc = crc_with_zero_field(b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
    }

    fn header(seq: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[..4].copy_from_slice(b"head"); // signature
        h[8..16].copy_from_slice(&seq.to_le_bytes()); // sequence number
        h[66..68].copy_from_slice(&1u16.to_le_bytes()); // version
        h[68..72].copy_from_slice(&(MIB as u32).to_le_bytes()); // log length
        h[72..80].copy_from_slice(&(MIB as u64).to_le_bytes()); // log offset
        put_crc(&mut h);
        h
    }

    /// A 4 MiB dynamic disk with 1 MiB blocks: log at 1 MiB, BAT at 2 MiB, metadata at 3 MiB,
    /// blocks from 4 MiB. `blocks` lists (index, fill byte).
    fn build(blocks: &[(usize, u8)], block_size: u32) -> Vec<u8> {
        let mut img = vec![0u8; 4 * MIB];
        img[..8].copy_from_slice(FILE_SIGNATURE);
        img[64 << 10..(64 << 10) + HEADER_LEN].copy_from_slice(&header(1));
        img[128 << 10..(128 << 10) + HEADER_LEN].copy_from_slice(&header(2));
        let mut rt = vec![0u8; REGION_TABLE_LEN];
        rt[..4].copy_from_slice(b"regi"); // signature
        rt[8..12].copy_from_slice(&2u32.to_le_bytes()); // entry count
        for (i, (id, off)) in [(REGION_BAT, 2 * MIB), (REGION_METADATA, 3 * MIB)]
            .into_iter()
            .enumerate()
        {
            let e = 16 + i * 32;
            rt[e..e + 16].copy_from_slice(&id); // region guid
            rt[e + 16..e + 24].copy_from_slice(&(off as u64).to_le_bytes()); // file offset
            rt[e + 24..e + 28].copy_from_slice(&(MIB as u32).to_le_bytes()); // length
            rt[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes()); // required
        }
        put_crc(&mut rt);
        img[192 << 10..256 << 10].copy_from_slice(&rt);
        img[256 << 10..320 << 10].copy_from_slice(&rt);
        let m = 3 * MIB;
        img[m..m + 8].copy_from_slice(b"metadata"); // signature
        img[m + 10..m + 12].copy_from_slice(&3u16.to_le_bytes()); // entry count
        let items: [([u8; 16], Vec<u8>); 3] = [
            (
                META_FILE_PARAMETERS,
                [block_size.to_le_bytes(), 0u32.to_le_bytes()].concat(),
            ),
            (
                META_VIRTUAL_DISK_SIZE,
                (4 * MIB as u64).to_le_bytes().to_vec(),
            ),
            (META_LOGICAL_SECTOR_SIZE, 512u32.to_le_bytes().to_vec()),
        ];
        for (i, (id, value)) in items.iter().enumerate() {
            let e = m + 32 + i * 32;
            let item_off = (64 << 10) + i * 8;
            img[e..e + 16].copy_from_slice(id); // item guid
            img[e + 16..e + 20].copy_from_slice(&(item_off as u32).to_le_bytes()); // offset
            img[e + 20..e + 24].copy_from_slice(&(value.len() as u32).to_le_bytes()); // length
            img[e + 24..e + 28].copy_from_slice(&4u32.to_le_bytes()); // flags: required
            img[m + item_off..m + item_off + value.len()].copy_from_slice(value);
        }
        for (n, &(index, fill)) in blocks.iter().enumerate() {
            let file_off = 4 * MIB + n * MIB;
            let entry = file_off as u64 | PAYLOAD_FULLY_PRESENT;
            img[2 * MIB + index * 8..2 * MIB + index * 8 + 8].copy_from_slice(&entry.to_le_bytes());
            img.extend(std::iter::repeat_n(fill, MIB));
        }
        img
    }

    fn read_bytes(bytes: Vec<u8>) -> Result<Vec<u8>> {
        read_all(&mut *open_bytes(open, bytes)?)
    }

    #[test]
    fn built_vhdx_maps_blocks_and_holes() {
        let img = build(&[(0, 3), (2, 4)], MIB as u32);
        let mut expected = vec![0u8; 4 * MIB];
        expected[..MIB].fill(3);
        expected[2 * MIB..3 * MIB].fill(4);

        let ours = read_bytes(img).unwrap();

        assert_eq!(ours, expected);
    }

    #[test]
    fn newer_valid_header_wins_over_damaged_one() {
        let mut img = build(&[(1, 9)], MIB as u32);
        img[(128 << 10) + 100] ^= 1; // damage header 2 (the newer one)

        let ours = read_bytes(img).unwrap();

        assert_eq!(&ours[MIB..MIB + 4], &[9, 9, 9, 9]);
    }

    fn set_log_guid(img: &mut [u8]) {
        for base in [64usize << 10, 128 << 10] {
            img[base + 48] = 0x42; // log guid
            put_crc(&mut img[base..base + HEADER_LEN]);
        }
    }

    #[test]
    fn log_guid_without_log_entries_opens() {
        let mut img = build(&[(1, 9)], MIB as u32);
        set_log_guid(&mut img);

        let ours = read_bytes(img).unwrap();

        assert_eq!(&ours[MIB..MIB + 4], &[9, 9, 9, 9]);
    }

    /// An empty disk with 1 MiB blocks after `edit`.
    fn empty_edited(edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        edited(build(&[], MIB as u32), edit)
    }

    /// Damaged or unsupported images that `open` refuses.
    #[test]
    fn bad_images_are_refused_by_open() {
        check_open_refuses(
            open,
            [
                (
                    "both header checksums fail",
                    (
                        empty_edited(|img| {
                            img[(64 << 10) + 100] ^= 1;
                            img[(128 << 10) + 100] ^= 1;
                        }),
                        ErrorKind::Corrupt,
                        Msg::Is("vhdx has no valid header (both header checksums fail)"),
                    ),
                ),
                (
                    "region table overrun",
                    (
                        empty_edited(|img| {
                            for base in [192usize << 10, 256 << 10] {
                                let e = base + 16 + 32 + 24; // metadata region length
                                img[e..e + 4].copy_from_slice(&(64 * MIB as u32).to_le_bytes());
                                put_crc(&mut img[base..base + REGION_TABLE_LEN]);
                            }
                        }),
                        ErrorKind::Corrupt,
                        Msg::Starts("vhdx region 1 at file offset 3145728"),
                    ),
                ),
                (
                    "block size 0",
                    (
                        build(&[], 0),
                        ErrorKind::Corrupt,
                        Msg::Is(
                            "vhdx block size 0 is not a power of two between 1 MiB and 256 MiB",
                        ),
                    ),
                ),
                (
                    "block size not a power of two",
                    (build(&[], 3 * MIB as u32), ErrorKind::Corrupt, Msg::Any),
                ),
                (
                    "differencing vhdx",
                    (
                        empty_edited(|img| {
                            let params = 3 * MIB + (64 << 10) + 4; // file parameters flags
                            img[params..params + 4].copy_from_slice(&FLAG_HAS_PARENT.to_le_bytes());
                        }),
                        ErrorKind::Unsupported,
                        Msg::Is("vhdx differencing disks (with a parent) are not supported"),
                    ),
                ),
                (
                    "dirty log",
                    (
                        empty_edited(|img| {
                            set_log_guid(img);
                            let entry = MIB + 8192; // a log entry in the log region (1 MiB..2 MiB)
                            img[entry..entry + 4].copy_from_slice(b"loge"); // signature
                            img[entry + 8..entry + 12].copy_from_slice(&4096u32.to_le_bytes()); // entry length
                            img[entry + 16..entry + 24].copy_from_slice(&7u64.to_le_bytes()); // sequence number
                            img[entry + 32] = 0x42; // log guid, matching the header's
                            put_crc(&mut img[entry..entry + 4096]);
                        }),
                        ErrorKind::Unsupported,
                        Msg::Is(
                            "vhdx has a dirty log; open it once with hyper-v or qemu-img to replay it",
                        ),
                    ),
                ),
                (
                    "huge virtual size",
                    (
                        empty_edited(|img| {
                            let size = 3 * MIB + (64 << 10) + 8; // virtual disk size item
                            img[size..size + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
                        }),
                        ErrorKind::LimitExceeded,
                        Msg::Any,
                    ),
                ),
                (
                    "truncated",
                    (
                        empty_edited(|img| img.truncate(100 << 10)),
                        ErrorKind::Corrupt,
                        Msg::Any,
                    ),
                ),
            ],
        );
    }

    #[test]
    fn block_past_eof_is_corrupt_when_read() {
        let mut img = build(&[], MIB as u32);
        let entry = (512u64 << 20) | PAYLOAD_FULLY_PRESENT; // block 0 at 512 MiB
        img[2 * MIB..2 * MIB + 8].copy_from_slice(&entry.to_le_bytes());
        let mut disk = open_bytes(open, img).unwrap();
        let mut buf = vec![0u8; 512];

        assert_refused(
            disk.read_exact_at(&mut buf, 0),
            ErrorKind::Corrupt,
            Msg::Starts("vhdx block 0 at file offset 536870912"),
        );
    }

    #[test]
    fn probe_recognises_the_file_identifier() {
        let img = build(&[], MIB as u32);

        let info = probe(&img[..64 << 10]).unwrap();

        assert_eq!(info.format, ImageFormat::Vhdx);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn mutated_vhdx_tables_never_panic(
            edits in prop::collection::vec((0usize..512, any::<u8>(), any::<bool>()), 1..8),
        ) {
            // The BAT (2 MiB) and the metadata table and items (3 MiB, 3 MiB + 64 KiB) are not
            // checksummed, so mutations there reach the parser.
            let mut img = build(&[(0, 3), (2, 4)], MIB as u32);
            for &(pos, value, in_bat) in &edits {
                let at = if in_bat {
                    2 * MIB + pos % 64
                } else if pos < 256 {
                    3 * MIB + pos
                } else {
                    3 * MIB + (64 << 10) + pos % 32
                };
                img[at] = value;
            }
            let _ = probe(&img);
            if let Ok(mut disk) = open_bytes(open, img) {
                exercise(&mut *disk);
            }
        }
    }
}
