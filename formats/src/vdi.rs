//! VirtualBox VDI: normal (dynamic) and fixed images. Differencing and undo images are refused.
//!
//! Spec: VirtualBox's `VDICore.h` header layout as implemented by QEMU's `block/vdi.c`, whose
//! checks we follow.
//!
//! ```text
//!  ┌ text + header (512) ┬ block map: u32 LE per block ┬ blocks (1 MiB each) … ┐
//!  map entry = index of the block in the data area; 0xffffffff = not allocated,
//!  0xfffffffe = discarded (reads as zero).
//! ```
//! Unlike qemu, a block map entry pointing outside the file is an error, not zeroes.

use std::fmt;
use std::sync::Arc;

use crate::detect::ImageFormat;
use crate::error::{Error, Result};
use crate::image::{DiskImage, Extent, ExtentKind, FormatInfo, OpenOptions};
use crate::limits;
use crate::read_at::ReadAt;
use crate::vhd::TablePager;

/// `signature` at 0x40.
const VDI_SIGNATURE: u32 = 0xbeda_107f;
/// The only header version written by VirtualBox since 2.x (1.1), and the only one qemu reads.
const VDI_VERSION_1_1: u32 = 0x0001_0001;
/// Image types.
const TYPE_NORMAL: u32 = 1;
const TYPE_FIXED: u32 = 2;
const TYPE_UNDO: u32 = 3;
const TYPE_DIFF: u32 = 4;
/// Block map entries that read as zeroes.
const BLOCK_UNALLOCATED: u64 = 0xffff_ffff;
const BLOCK_DISCARDED: u64 = 0xffff_fffe;
/// The block size every VDI uses (and the only one qemu accepts).
const BLOCK_SIZE: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// Bytes of the header we parse (the pre-header text plus the 1.1 header, padded).
const HEADER_LEN: usize = 512;
/// Blocks examined by one `extent` call (callers merge adjacent runs).
const EXTENT_SCAN_BLOCKS: u64 = 4096;

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

/// The header fields conversion uses, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    image_type: u32,
    offset_bmap: u64,
    offset_data: u64,
    disk_size: u64,
    blocks_in_image: u64,
}

impl Header {
    fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_LEN {
            return Err(Error::truncated(format!(
                "vdi header is {} bytes, shorter than 512",
                b.len()
            )));
        }
        // Layout: text 0..0x40, signature 0x40, version 0x44, header size 0x48, image type 0x4c,
        // flags 0x50, description 0x54, block map offset 0x154, data offset 0x158,
        // geometry 0x15c..0x168, sector size 0x168, disk size 0x170, block size 0x178,
        // block extra 0x17c, blocks in image 0x180, blocks allocated 0x184, uuids 0x188..0x1c8
        // (image, last snapshot, link, parent).
        if le32(b, 0x40) != VDI_SIGNATURE {
            return Err(Error::corrupt(
                "vdi signature 0xbeda107f not found at offset 0x40",
            ));
        }
        let version = le32(b, 0x44);
        if version != VDI_VERSION_1_1 {
            return Err(Error::unsupported(format!(
                "vdi header version {}.{} is not supported",
                version >> 16,
                version & 0xffff
            )));
        }
        let image_type = le32(b, 0x4c);
        match image_type {
            TYPE_NORMAL | TYPE_FIXED => {}
            TYPE_DIFF | TYPE_UNDO => {
                return Err(Error::unsupported(
                    "vdi differencing (snapshot) images are not supported",
                ));
            }
            other => {
                return Err(Error::unsupported(format!(
                    "vdi image type {other} is not supported"
                )));
            }
        }
        if b[0x1a8..0x1b8].iter().any(|x| *x != 0) || b[0x1b8..0x1c8].iter().any(|x| *x != 0) {
            return Err(Error::unsupported(
                "vdi image names a parent (link or parent uuid set); differencing images are not supported",
            ));
        }
        let h = Header {
            image_type,
            offset_bmap: u64::from(le32(b, 0x154)),
            offset_data: u64::from(le32(b, 0x158)),
            // VBoxManage convertfromraw can write odd sizes; qemu drops the partial sector.
            disk_size: le64(b, 0x170) / SECTOR * SECTOR,
            blocks_in_image: u64::from(le32(b, 0x180)),
        };
        if !h.offset_bmap.is_multiple_of(SECTOR) || !h.offset_data.is_multiple_of(SECTOR) {
            return Err(Error::corrupt(format!(
                "vdi block map offset {} or data offset {} is not sector aligned",
                h.offset_bmap, h.offset_data
            )));
        }
        let sector_size = le32(b, 0x168);
        if u64::from(sector_size) != SECTOR {
            return Err(Error::unsupported(format!(
                "vdi sector size {sector_size} is not supported"
            )));
        }
        let block_size = u64::from(le32(b, 0x178));
        if block_size != BLOCK_SIZE {
            return Err(Error::unsupported(format!(
                "vdi block size {block_size} is not supported (only 1 MiB)"
            )));
        }
        let block_extra = le32(b, 0x17c);
        if block_extra != 0 {
            return Err(Error::unsupported(format!(
                "vdi block extra data ({block_extra} bytes) is not supported"
            )));
        }
        if h.disk_size > limits::MAX_VIRTUAL_SIZE {
            return Err(Error::limit(format!(
                "vdi disk size of {} bytes is more than the {} byte limit",
                h.disk_size,
                limits::MAX_VIRTUAL_SIZE
            )));
        }
        if h.disk_size > h.blocks_in_image * BLOCK_SIZE {
            return Err(Error::corrupt(format!(
                "vdi disk size of {} bytes is more than the {} blocks of its block map hold",
                h.disk_size, h.blocks_in_image
            )));
        }
        Ok(h)
    }

    /// Blocks the guest size needs (the map may have more entries; they are never read).
    fn blocks(&self) -> u64 {
        self.disk_size.div_ceil(BLOCK_SIZE)
    }
}

/// Parse the header at the start of the image (`head` holds up to
/// [`crate::limits::DETECT_HEAD_LEN`] bytes) without reading anything else.
pub fn probe(head: &[u8]) -> Result<FormatInfo> {
    let h = Header::parse(head)?;
    Ok(FormatInfo {
        format: ImageFormat::Vdi,
        virtual_size: Some(h.disk_size),
        cluster_size: Some(BLOCK_SIZE),
        subformat: Some(
            if h.image_type == TYPE_FIXED {
                "fixed"
            } else {
                "dynamic"
            }
            .to_string(),
        ),
        backing_file: None,
        streamable: false,
    })
}

/// Open the image for random access.
pub fn open(src: Arc<dyn ReadAt>, _opts: &OpenOptions) -> Result<Box<dyn DiskImage>> {
    let file_size = src.size().map_err(|e| Error::io("reading vdi size", e))?;
    if file_size < HEADER_LEN as u64 {
        return Err(Error::truncated(format!(
            "vdi file is {file_size} bytes, shorter than its header"
        )));
    }
    let mut head = [0u8; HEADER_LEN];
    src.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io("reading vdi header", e))?;
    let h = Header::parse(&head)?;
    let map_bytes = h.blocks() * 4;
    if h.offset_bmap
        .checked_add(map_bytes)
        .is_none_or(|end| end > file_size)
    {
        return Err(Error::corrupt(format!(
            "vdi block map at file offset {} ({map_bytes} bytes) lies past the end of the file ({file_size} bytes)",
            h.offset_bmap
        )));
    }
    let map = TablePager::new(
        h.offset_bmap,
        h.blocks(),
        4,
        |b| u64::from(le32(b, 0)),
        "vdi block map",
    );
    Ok(Box::new(VdiImage {
        src,
        file_size,
        header: h,
        map,
    }))
}

/// A VDI opened for random access.
struct VdiImage {
    src: Arc<dyn ReadAt>,
    file_size: u64,
    header: Header,
    map: TablePager,
}

impl fmt::Debug for VdiImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VdiImage")
            .field("header", &self.header)
            .finish()
    }
}

impl VdiImage {
    /// File offset of block `index`'s data, or `None` when it reads as zeroes.
    fn block_data(&mut self, index: u64) -> Result<Option<u64>> {
        let entry = self.map.get(&*self.src, self.file_size, index)?;
        if entry == BLOCK_UNALLOCATED || entry == BLOCK_DISCARDED {
            return Ok(None);
        }
        let start = entry
            .checked_mul(BLOCK_SIZE)
            .and_then(|o| o.checked_add(self.header.offset_data));
        let needed = BLOCK_SIZE.min(self.header.disk_size - index * BLOCK_SIZE);
        match start {
            Some(start) if start + needed <= self.file_size => Ok(Some(start)),
            _ => Err(Error::corrupt(format!(
                "vdi block {index} maps to data block {entry}, past the end of the file ({} bytes)",
                self.file_size
            ))),
        }
    }
}

impl DiskImage for VdiImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Vdi
    }

    fn virtual_size(&self) -> u64 {
        self.header.disk_size
    }

    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent> {
        let size = self.header.disk_size;
        if offset >= size || max_len == 0 {
            return Ok(Extent {
                len: 0,
                kind: ExtentKind::Data,
            });
        }
        let end = offset.saturating_add(max_len).min(size);
        let mut pos = offset;
        let mut kind = None;
        let mut scanned = 0;
        while pos < end && scanned < EXTENT_SCAN_BLOCKS {
            let index = pos / BLOCK_SIZE;
            let this = if self.block_data(index)?.is_some() {
                ExtentKind::Data
            } else {
                ExtentKind::Zero
            };
            if kind.is_some_and(|k| k != this) {
                break;
            }
            kind = Some(this);
            pos = ((index + 1) * BLOCK_SIZE).min(end);
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
            .is_none_or(|e| e > self.header.disk_size)
        {
            return Err(Error::new(
                crate::error::ErrorKind::InvalidInput,
                format!("read at {offset} past the end of the vdi disk"),
            ));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / BLOCK_SIZE;
            let within = pos % BLOCK_SIZE;
            let n =
                usize::try_from((BLOCK_SIZE - within).min((buf.len() - done) as u64)).unwrap_or(0);
            let piece = &mut buf[done..done + n];
            match self.block_data(index)? {
                None => piece.fill(0),
                Some(start) => self
                    .src
                    .read_exact_at(piece, start + within)
                    .map_err(|e| Error::io(format!("reading vdi block {index}"), e))?,
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
        mixed_reads_like_qemu, open_bytes, qemu_mixed, read_all,
    };
    use proptest::prelude::*;

    #[test]
    fn dynamic_vdi_reads_like_qemu_img() {
        mixed_reads_like_qemu(open, "vdi", &[]);
    }

    #[test]
    fn static_vdi_reads_like_qemu_img() {
        mixed_reads_like_qemu(open, "vdi", &["-o", "static=on"]);
    }

    #[test]
    fn probe_reports_static_vdi_as_fixed() {
        if !have_tools(&["qemu-img"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = qemu_mixed(dir.path(), "vdi", &["-o", "static=on"], "img.vdi");
        let head = std::fs::read(&image).unwrap();

        let info = probe(&head[..64 << 10]).unwrap();

        assert_eq!(
            (info.virtual_size, info.subformat.as_deref()),
            (Some(MIXED_SIZE), Some("fixed"))
        );
    }

    // ---- images built in code ----

    /// Header of a normal VDI with `blocks` blocks: map at 512, data at 4096.
    fn header(image_type: u32, blocks: u32) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..40].copy_from_slice(b"<<< Oracle VM VirtualBox Disk Image >>>\n"); // text
        h[0x40..0x44].copy_from_slice(&VDI_SIGNATURE.to_le_bytes()); // signature
        h[0x44..0x48].copy_from_slice(&VDI_VERSION_1_1.to_le_bytes()); // version
        h[0x48..0x4c].copy_from_slice(&0x190u32.to_le_bytes()); // header size
        h[0x4c..0x50].copy_from_slice(&image_type.to_le_bytes()); // image type
        h[0x154..0x158].copy_from_slice(&512u32.to_le_bytes()); // block map offset
        h[0x158..0x15c].copy_from_slice(&4096u32.to_le_bytes()); // data offset
        h[0x168..0x16c].copy_from_slice(&512u32.to_le_bytes()); // sector size
        h[0x170..0x178].copy_from_slice(&(u64::from(blocks) << 20).to_le_bytes()); // disk size
        h[0x178..0x17c].copy_from_slice(&(1u32 << 20).to_le_bytes()); // block size
        h[0x180..0x184].copy_from_slice(&blocks.to_le_bytes()); // blocks in image
        h[0x188] = 1; // image uuid (non-zero)
        h
    }

    /// A 4-block image whose block map is `map`; data block n is filled with n + 1.
    fn build(map: [u32; 4], data_blocks: u8) -> Vec<u8> {
        let mut img = header(TYPE_NORMAL, 4);
        for entry in map {
            img.extend(entry.to_le_bytes());
        }
        img.resize(4096, 0);
        for n in 0..data_blocks {
            img.extend(std::iter::repeat_n(n + 1, 1 << 20));
        }
        img
    }

    #[test]
    fn built_vdi_maps_blocks_and_holes() {
        let img = build([1, 0xffff_ffff, 0, 0xffff_fffe], 2);
        let mut expected = vec![0u8; 4 << 20];
        expected[..1 << 20].fill(2);
        expected[2 << 20..3 << 20].fill(1);

        let ours = read_all(&mut *open_bytes(open, img).unwrap()).unwrap();

        assert_eq!(ours, expected);
    }

    #[test]
    fn block_map_entry_past_eof_is_corrupt() {
        let img = build([0, 7, 0xffff_ffff, 0xffff_ffff], 1);
        let mut disk = open_bytes(open, img).unwrap();
        let mut buf = vec![0u8; 4096];

        assert_refused(
            disk.read_exact_at(&mut buf, 1 << 20),
            ErrorKind::Corrupt,
            Msg::Starts("vdi block 1 maps to data block 7, past the end"),
        );
    }

    /// An empty 4-block image (no data blocks) after `edit`.
    fn empty_edited(edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        edited(build([0xffff_ffff; 4], 0), edit)
    }

    /// Damaged or unsupported headers that `open` refuses.
    #[test]
    fn bad_headers_are_refused_by_open() {
        check_open_refuses(
            open,
            [
                (
                    "block map past eof",
                    (
                        empty_edited(|img| {
                            img[0x154..0x158].copy_from_slice(&(1u32 << 30).to_le_bytes()); // block map offset
                        }),
                        ErrorKind::Corrupt,
                        Msg::Starts("vdi block map at file offset 1073741824"),
                    ),
                ),
                (
                    "differencing image",
                    (
                        empty_edited(|img| img[..512].copy_from_slice(&header(TYPE_DIFF, 4))),
                        ErrorKind::Unsupported,
                        Msg::Is("vdi differencing (snapshot) images are not supported"),
                    ),
                ),
                (
                    "parent uuid",
                    (
                        empty_edited(|img| img[0x1b8] = 9), // parent uuid
                        ErrorKind::Unsupported,
                        Msg::Any,
                    ),
                ),
                (
                    "disk larger than the block map",
                    (
                        empty_edited(|img| {
                            img[0x170..0x178].copy_from_slice(&(5u64 << 20).to_le_bytes()); // disk size: 5 blocks
                        }),
                        ErrorKind::Corrupt,
                        Msg::Any,
                    ),
                ),
                (
                    "huge disk size",
                    (
                        empty_edited(|img| {
                            img[0x170..0x178].copy_from_slice(&(1u64 << 50).to_le_bytes()); // 1 PiB
                        }),
                        ErrorKind::LimitExceeded,
                        Msg::Any,
                    ),
                ),
                (
                    "odd block size",
                    (
                        empty_edited(|img| {
                            img[0x178..0x17c].copy_from_slice(&(2u32 << 20).to_le_bytes()); // 2 MiB blocks
                        }),
                        ErrorKind::Unsupported,
                        Msg::Any,
                    ),
                ),
                (
                    "truncated",
                    (
                        empty_edited(|img| img.truncate(200)),
                        ErrorKind::Truncated,
                        Msg::Any,
                    ),
                ),
            ],
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn mutated_vdi_never_panics(edits in prop::collection::vec((0usize..4096, any::<u8>()), 1..8)) {
            // Header and block map live in the first 4 KiB.
            let mut img = build([1, 0xffff_ffff, 0, 0xffff_fffe], 2);
            for &(pos, value) in &edits {
                img[pos] = value;
            }
            let _ = probe(&img);
            if let Ok(mut disk) = open_bytes(open, img) {
                exercise(&mut *disk);
            }
        }
    }
}
