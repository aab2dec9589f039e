//! Hand-built qcow2 images: one test per hostile case or a table of same-shaped cases.

use std::io::Write;
use std::sync::Arc;

use crate::error::ErrorKind;
use crate::image::{BackingPolicy, DiskImage, ExtentKind, ExtentSink, OpenOptions, StreamContext};
use crate::limits;
use crate::testutil::{CheckingSink, assert_err, check_cases, open_bytes, read_all, stream_to_vec};

fn stream_bytes(image: &[u8], ctx: &mut StreamContext) -> crate::Result<Vec<u8>> {
    stream_to_vec(super::stream, &mut &image[..], ctx)
}

fn open_copy(image: Vec<u8>) -> crate::Result<Vec<u8>> {
    read_all(&mut *open_bytes(super::open, image)?)
}

fn ctx() -> StreamContext {
    StreamContext::new(None)
}

// ---------------------------------------------------------------------------------------------
// Image builder.

/// L2 entry: standard cluster at `host`.
fn std_entry(host: u64) -> u64 {
    host | 1 << 63
}

/// L2 entry: zero cluster (v3).
const ZERO_ENTRY: u64 = 1;

/// L2 entry: compressed data at `host`, `len` bytes long.
fn compressed_entry(cluster_bits: u32, host: u64, len: u64) -> u64 {
    let shift = 62 - (cluster_bits - 8);
    let sectors = (host + len - 1) / 512 - host / 512;
    1 << 62 | sectors << shift | host
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8))
        .collect()
}

/// A qcow2 file under construction: v3 header in cluster 0, refcount table in cluster 1, L1
/// table in cluster 2 (sized for the virtual size), everything else appended.
struct Img {
    cs: u64,
    file: Vec<u8>,
}

impl Img {
    fn new(bits: u32, vsize: u64) -> Img {
        let cs = 1u64 << bits;
        let mut img = Img {
            cs,
            file: vec![0; 3 * cs as usize],
        };
        let span = cs * (cs / 8);
        img.file[..4].copy_from_slice(b"QFI\xfb");
        img.set32(4, 3); // version
        img.set32(20, bits); // cluster_bits
        img.set64(24, vsize); // size
        img.set32(36, vsize.div_ceil(span) as u32); // l1_size
        img.set64(40, 2 * cs); // l1_table_offset
        img.set64(48, cs); // refcount_table_offset
        img.set32(56, 1); // refcount_table_clusters
        img.set32(96, 4); // refcount_order
        img.set32(100, 112); // header_length (compression_type + padding)
        img
    }

    fn set32(&mut self, off: usize, v: u32) {
        self.file[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn set64(&mut self, off: usize, v: u64) {
        self.file[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }

    /// Append a cluster (padded) and return its offset.
    fn cluster(&mut self, data: &[u8]) -> u64 {
        let off = self.file.len() as u64;
        self.file.extend_from_slice(data);
        self.file.resize((off + self.cs) as usize, 0);
        off
    }

    /// Append raw bytes (no padding) and return their offset.
    fn bytes(&mut self, data: &[u8]) -> u64 {
        let off = self.file.len() as u64;
        self.file.extend_from_slice(data);
        off
    }

    fn pad(&mut self) {
        let len = (self.file.len() as u64).next_multiple_of(self.cs);
        self.file.resize(len as usize, 0);
    }

    fn l1(&mut self, index: usize, l2: u64) {
        self.set64(2 * self.cs as usize + index * 8, l2);
    }

    /// Append an L2 table with `entries` (index, word) and return its offset.
    fn l2(&mut self, entries: &[(usize, u64)]) -> u64 {
        let mut table = vec![0u8; self.cs as usize];
        for &(i, w) in entries {
            table[i * 8..i * 8 + 8].copy_from_slice(&w.to_be_bytes());
        }
        self.cluster(&table)
    }

    /// Write an L2 table at an existing offset.
    fn l2_at(&mut self, at: u64, entries: &[(usize, u64)]) {
        for &(i, w) in entries {
            self.set64(at as usize + i * 8, w);
        }
    }
}

/// 4 KiB clusters, 3 L1 entries: guest clusters 0 (data), 1 (zero flag), 2 (compressed),
/// 5 (data), 511 (data), L1[1] unallocated, L1[2] → one data cluster at guest cluster 1027,
/// the last one. Returns the image and the expected guest bytes.
fn sample() -> (Vec<u8>, Vec<u8>) {
    let bits = 12;
    let cs = 4096usize;
    let span = cs * 512;
    let vsize = 2 * span + 4 * cs;
    let mut img = Img::new(bits, vsize as u64);
    let mut want = vec![0u8; vsize];
    let l2a = img.l2(&[]);
    let l2b = img.l2(&[]);
    img.l1(0, l2a | 1 << 63);
    img.l1(2, l2b | 1 << 63);
    let mut entries = vec![(1usize, ZERO_ENTRY)];
    for (guest_cluster, seed) in [(0usize, 1u8), (5, 2), (511, 3)] {
        let data = pattern(seed, cs);
        want[guest_cluster * cs..(guest_cluster + 1) * cs].copy_from_slice(&data);
        entries.push((guest_cluster, std_entry(img.cluster(&data))));
    }
    let comp = pattern(9, cs);
    want[2 * cs..3 * cs].copy_from_slice(&comp);
    let packed = deflate(&comp);
    let at = img.bytes(&packed);
    entries.push((2, compressed_entry(bits, at, packed.len() as u64)));
    img.pad();
    img.l2_at(l2a, &entries);
    let last = pattern(7, cs);
    want[2 * span + 3 * cs..].copy_from_slice(&last);
    let host = img.cluster(&last);
    img.l2_at(l2b, &[(3, std_entry(host))]);
    (img.file, want)
}

// ---------------------------------------------------------------------------------------------
// Valid images.

#[test]
fn sample_image_reads_identically_by_open_and_stream() {
    let (image, want) = sample();
    assert_eq!(open_copy(image.clone()).unwrap(), want);
    let mut ctx = ctx();
    assert_eq!(stream_bytes(&image, &mut ctx).unwrap(), want);
    assert_eq!(ctx.scratch_bytes, 0);
}

#[test]
fn extents_merge_and_classify_clusters() {
    let (image, _) = sample();
    let mut disk = open_bytes(super::open, image).unwrap();
    let first = disk.extent(0, u64::MAX).unwrap();
    assert_eq!((first.len, first.kind), (4096, ExtentKind::Data));
    let zero = disk.extent(4096, u64::MAX).unwrap();
    assert_eq!((zero.len, zero.kind), (4096, ExtentKind::Zero));
    let comp = disk.extent(8192, u64::MAX).unwrap();
    assert_eq!((comp.len, comp.kind), (4096, ExtentKind::Data));
    let hole = disk.extent(6 * 4096, u64::MAX).unwrap();
    assert_eq!((hole.len, hole.kind), (505 * 4096, ExtentKind::Zero));
    let capped = disk.extent(6 * 4096, 100).unwrap();
    assert_eq!(capped.len, 100);
    let end = disk.extent(disk.virtual_size(), 10).unwrap();
    assert_eq!(end.len, 0);
}

#[test]
fn probe_reports_version_cluster_size_and_size() {
    let (image, _) = sample();
    let info = super::probe(&image[..4096]).unwrap();
    assert_eq!(info.subformat.as_deref(), Some("v3"));
    assert_eq!(info.cluster_size, Some(4096));
    assert_eq!(info.virtual_size, Some(2 * 4096 * 512 + 4 * 4096));
    assert!(info.streamable);
    assert_eq!(info.backing_file, None);
}

#[test]
fn dirty_bit_is_fine_for_reading() {
    let (mut image, want) = sample();
    image[79] |= 1; // incompatible bit 0
    assert_eq!(open_copy(image.clone()).unwrap(), want);
    assert_eq!(stream_bytes(&image, &mut ctx()).unwrap(), want);
}

#[test]
fn zstd_compressed_cluster_reads() {
    let mut img = Img::new(12, 8192);
    img.file[79] |= 1 << 3; // incompatible bit 3: compression type
    img.file[104] = 1; // zstd
    let data = pattern(4, 4096);
    let packed = zstd::bulk::compress(&data, 3).unwrap();
    let l2 = img.l2(&[]);
    img.l1(0, l2);
    let at = img.bytes(&packed);
    img.pad();
    img.l2_at(l2, &[(1, compressed_entry(12, at, packed.len() as u64))]);
    let mut want = vec![0u8; 4096];
    want.extend_from_slice(&data);
    assert_eq!(open_copy(img.file.clone()).unwrap(), want);
    assert_eq!(stream_bytes(&img.file, &mut ctx()).unwrap(), want);
}

#[test]
fn extended_l2_subclusters_read_as_allocated_zero_or_unallocated() {
    let bits = 14; // 16 KiB clusters, 512-byte subclusters
    let cs = 1usize << bits;
    let mut img = Img::new(bits, 2 * cs as u64);
    img.file[79] |= 1 << 4; // incompatible bit 4: extended L2
    let data = pattern(5, cs);
    let l2 = img.l2(&[]);
    img.l1(0, l2);
    let host = img.cluster(&data);
    // Subclusters 0 and 2 allocated, 1 zero, the rest unallocated; cluster 1 all zero.
    let bitmap: u64 = 0b101 | (0b010 << 32);
    img.l2_at(
        l2,
        &[(0, std_entry(host)), (1, bitmap), (3, 0xffff_ffff << 32)],
    );
    let mut want = vec![0u8; 2 * cs];
    want[..512].copy_from_slice(&data[..512]);
    want[1024..1536].copy_from_slice(&data[1024..1536]);
    assert_eq!(open_copy(img.file.clone()).unwrap(), want);
    assert_eq!(stream_bytes(&img.file, &mut ctx()).unwrap(), want);
}

#[test]
fn virtual_size_not_a_cluster_multiple_reports_the_tail_once() {
    let mut img = Img::new(12, 4096 + 1000);
    let data = pattern(6, 4096);
    let l2 = img.l2(&[]);
    img.l1(0, l2);
    let host = img.cluster(&data);
    img.l2_at(l2, &[(1, std_entry(host))]);
    let mut want = vec![0u8; 4096];
    want.extend_from_slice(&data[..1000]);
    assert_eq!(open_copy(img.file.clone()).unwrap(), want);
    assert_eq!(stream_bytes(&img.file, &mut ctx()).unwrap(), want);
}

#[test]
fn l1_larger_than_needed_is_read_up_to_the_virtual_size() {
    // QEMU leaves a longer L1 after shrinking or saving VM state; entries past the disk end
    // never map guest data and are ignored.
    let (mut image, want) = sample();
    image[36..40].copy_from_slice(&8u32.to_be_bytes());
    image[2 * 4096 + 5 * 8..2 * 4096 + 6 * 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
    assert_eq!(open_copy(image.clone()).unwrap(), want);
    assert_eq!(stream_bytes(&image, &mut ctx()).unwrap(), want);
}

// ---------------------------------------------------------------------------------------------
// Streaming with data ahead of its table.

/// Data clusters first, then the L2 table mapping them (QEMU never writes this order).
fn data_before_table() -> (Vec<u8>, Vec<u8>) {
    let mut img = Img::new(12, 16 * 4096);
    let mut want = vec![0u8; 16 * 4096];
    let mut entries = Vec::new();
    for (i, guest) in [9usize, 2, 14, 3].into_iter().enumerate() {
        let data = pattern(i as u8 + 20, 4096);
        want[guest * 4096..(guest + 1) * 4096].copy_from_slice(&data);
        entries.push((guest, std_entry(img.cluster(&data))));
    }
    let comp = pattern(40, 4096);
    want[5 * 4096..6 * 4096].copy_from_slice(&comp);
    let packed = deflate(&comp);
    let at = img.bytes(&packed);
    img.pad();
    entries.push((5, compressed_entry(12, at, packed.len() as u64)));
    let l2 = img.l2(&entries);
    img.l1(0, l2);
    (img.file, want)
}

#[test]
fn data_before_its_table_spills_to_scratch_and_streams_correctly() {
    let (image, want) = data_before_table();
    let dir = tempfile::tempdir().unwrap();
    let mut ctx = StreamContext::new(Some(dir.path().to_path_buf()));
    ctx.memory_budget = 4096;
    assert_eq!(stream_bytes(&image, &mut ctx).unwrap(), want);
    assert!(ctx.scratch_bytes > 0, "nothing was spilled to scratch");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "scratch file left behind"
    );
}

#[test]
fn data_before_its_table_within_the_memory_budget_needs_no_scratch() {
    let (image, want) = data_before_table();
    let mut ctx = ctx();
    assert_eq!(stream_bytes(&image, &mut ctx).unwrap(), want);
    assert_eq!(ctx.scratch_bytes, 0);
}

#[test]
fn data_before_its_table_without_scratch_dir_is_scratch_space_required() {
    let (image, _) = data_before_table();
    let mut ctx = ctx();
    ctx.memory_budget = 4096;
    assert_err(
        stream_bytes(&image, &mut ctx),
        ErrorKind::ScratchSpaceRequired,
        "scratch space",
    );
}

#[test]
fn l1_table_at_the_end_streams_from_the_spill() {
    let (image, want) = sample();
    // Move the L1 table (cluster 2) to the end of the file.
    let mut moved = image.clone();
    let l1 = image[2 * 4096..3 * 4096].to_vec();
    let new_off = moved.len() as u64;
    moved.extend_from_slice(&l1);
    moved[2 * 4096..3 * 4096].fill(0);
    moved[40..48].copy_from_slice(&new_off.to_be_bytes());
    assert_eq!(open_copy(moved.clone()).unwrap(), want);
    assert_eq!(stream_bytes(&moved, &mut ctx()).unwrap(), want);
}

#[test]
fn same_host_cluster_mapped_twice_is_corrupt_when_streaming() {
    let mut img = Img::new(12, 4 * 4096);
    let l2 = img.l2(&[]);
    img.l1(0, l2);
    let host = img.cluster(&pattern(1, 4096));
    img.l2_at(l2, &[(0, std_entry(host)), (2, std_entry(host))]);
    assert_err(
        stream_bytes(&img.file, &mut ctx()),
        ErrorKind::Corrupt,
        "mapped twice",
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals.

#[test]
fn backing_file_is_refused_by_default() {
    let (mut image, _) = sample();
    image[512..522].copy_from_slice(b"base.qcow2");
    image[8..16].copy_from_slice(&512u64.to_be_bytes());
    image[16..20].copy_from_slice(&10u32.to_be_bytes());
    let info = super::probe(&image[..4096]).unwrap();
    assert_eq!(info.backing_file.as_deref(), Some("base.qcow2"));
    assert_err(
        open_bytes(super::open, image.clone()),
        ErrorKind::Unsupported,
        "backing file (\"base.qcow2\")",
    );
    assert_err(
        stream_bytes(&image, &mut ctx()),
        ErrorKind::Unsupported,
        "backing file",
    );
}

#[test]
fn backing_file_with_parent_dir_is_refused_even_when_allowed() {
    let (mut image, _) = sample();
    image[512..525].copy_from_slice(b"../etc/passwd");
    image[8..16].copy_from_slice(&512u64.to_be_bytes());
    image[16..20].copy_from_slice(&13u32.to_be_bytes());
    let opts = OpenOptions {
        backing: BackingPolicy::AllowRelativeTo(std::env::temp_dir()),
    };
    let err = super::open(Arc::new(image), &opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.message().contains("not a plain relative path"), "{err}");
}

/// An image with one L2 table whose only entry `entry` makes (it may append what the entry
/// maps), and the errors that must follow: from `extent` or, when `on_read`, only from reading
/// the mapped cluster; and from streaming. Each as (kind, text the message contains).
struct BadEntry {
    vsize: u64,
    entry: fn(&mut Img) -> (usize, u64),
    on_read: bool,
    disk: (ErrorKind, &'static str),
    stream: (ErrorKind, &'static str),
}

/// A single bad L2 entry fails the random-access and the streaming paths.
#[test]
fn bad_l2_entries_are_refused_by_open_and_stream() {
    use ErrorKind::{Corrupt, Truncated};
    let cases = [
        (
            "data cluster past eof",
            BadEntry {
                vsize: 4 * 4096,
                entry: |img| (1, std_entry(img.file.len() as u64 + 8 * 4096)),
                on_read: false,
                disk: (Corrupt, "outside the file"),
                stream: (Truncated, "before the cluster"),
            },
        ),
        (
            "compressed cluster past eof",
            BadEntry {
                vsize: 4 * 4096,
                entry: |img| (0, compressed_entry(12, img.file.len() as u64 + 100, 300)),
                on_read: false,
                disk: (Corrupt, "outside the file"),
                stream: (Truncated, "before the compressed cluster"),
            },
        ),
        (
            "compressed cluster with garbage",
            BadEntry {
                vsize: 2 * 4096,
                entry: |img| (0, compressed_entry(12, img.cluster(&[0xff; 4096]), 600)),
                on_read: true,
                disk: (Corrupt, "compressed cluster at"),
                stream: (Corrupt, "compressed cluster at"),
            },
        ),
        (
            "compressed cluster of the wrong size",
            BadEntry {
                vsize: 2 * 4096,
                entry: |img| {
                    let packed = deflate(&[3u8; 1000]);
                    let at = img.bytes(&packed);
                    img.pad();
                    (0, compressed_entry(12, at, packed.len() as u64))
                },
                on_read: true,
                disk: (Corrupt, "1000 bytes instead of 4096"),
                stream: (Corrupt, "instead of 4096"),
            },
        ),
    ];
    check_cases(cases, |case| {
        let mut img = Img::new(12, case.vsize);
        let l2 = img.l2(&[]);
        img.l1(0, l2);
        let entry = (case.entry)(&mut img);
        img.l2_at(l2, &[entry]);
        let mut disk = open_bytes(super::open, img.file.clone()).unwrap();
        let (kind, text) = case.disk;
        if case.on_read {
            let mut buf = vec![0u8; 4096];
            assert_err(disk.read_exact_at(&mut buf, 0), kind, text);
        } else {
            assert_err(disk.extent(0, u64::MAX), kind, text);
        }
        let (kind, text) = case.stream;
        assert_err(stream_bytes(&img.file, &mut ctx()), kind, text);
    });
}

/// Where opening an image must fail.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// `open` itself.
    Open,
    /// Reading the disk after a successful `open`.
    Read,
}

/// A change to [`sample`] and the errors it must cause: opening (or reading) and, unless
/// `None`, streaming, each as (kind, text the message contains).
struct Refusal {
    edit: fn(&mut Vec<u8>),
    stage: Stage,
    open: (ErrorKind, &'static str),
    stream: Option<(ErrorKind, &'static str)>,
}

impl Refusal {
    /// Opening (or reading) and streaming fail alike.
    fn same(edit: fn(&mut Vec<u8>), stage: Stage, kind: ErrorKind, text: &'static str) -> Self {
        Refusal {
            edit,
            stage,
            open: (kind, text),
            stream: Some((kind, text)),
        }
    }
}

/// Both paths refuse each damaged or unsupported variant of [`sample`].
#[test]
fn sample_variants_are_refused_by_open_and_stream() {
    use ErrorKind::{Corrupt, LimitExceeded, Truncated, Unsupported};
    use Stage::{Open, Read};
    let cases = [
        (
            "external data file",
            Refusal::same(
                |image| image[79] |= 1 << 2,
                Open,
                Unsupported,
                "external data file",
            ),
        ),
        (
            "aes encryption",
            Refusal::same(|image| image[35] = 1, Open, Unsupported, "encrypted (aes)"),
        ),
        (
            "luks encryption",
            Refusal::same(|image| image[35] = 2, Open, Unsupported, "encrypted (luks)"),
        ),
        (
            "unknown incompatible bits are listed",
            Refusal {
                edit: |image| {
                    image[78] |= 1 << 1; // bit 9
                    image[79] |= 1 << 5; // bit 5
                },
                stage: Open,
                open: (Unsupported, "unknown incompatible features: bit 5, bit 9"),
                stream: Some((Unsupported, "bit 5, bit 9")),
            },
        ),
        (
            "corrupt bit",
            Refusal::same(|image| image[79] |= 1 << 1, Open, Corrupt, "marked corrupt"),
        ),
        (
            "cluster_bits 8",
            Refusal::same(|image| image[23] = 8, Open, Corrupt, "cluster_bits 8"),
        ),
        (
            "cluster_bits 22",
            Refusal::same(|image| image[23] = 22, Open, Unsupported, "cluster_bits 22"),
        ),
        (
            "l1 table past eof",
            Refusal {
                edit: |image| {
                    let past = image.len() as u64 + 4096;
                    image[40..48].copy_from_slice(&past.to_be_bytes());
                },
                stage: Open,
                open: (Corrupt, "l1 table at"),
                stream: Some((Truncated, "before the l1 table")),
            },
        ),
        (
            "l2 table past eof",
            Refusal {
                edit: |image| {
                    let past = image.len() as u64;
                    image[2 * 4096..2 * 4096 + 8].copy_from_slice(&past.to_be_bytes());
                },
                stage: Open,
                open: (Corrupt, "l2 table at"),
                stream: Some((Truncated, "before the l2 table")),
            },
        ),
        (
            "huge virtual size",
            Refusal::same(
                |image| {
                    image[24..32].copy_from_slice(&(limits::MAX_VIRTUAL_SIZE + 1).to_be_bytes());
                },
                Open,
                LimitExceeded,
                "virtual size",
            ),
        ),
        (
            "l1 size beyond the limit",
            Refusal::same(
                |image| {
                    let entries = (limits::QCOW2_MAX_L1_BYTES / 8 + 1) as u32;
                    image[36..40].copy_from_slice(&entries.to_be_bytes());
                },
                Open,
                LimitExceeded,
                "l1 table of",
            ),
        ),
        (
            "l1 smaller than the virtual size needs",
            Refusal {
                edit: |image| image[36..40].copy_from_slice(&2u32.to_be_bytes()),
                stage: Open,
                open: (Corrupt, "needs 3"),
                stream: None,
            },
        ),
        (
            "header extension overrun",
            Refusal {
                edit: |image| {
                    image[112..116].copy_from_slice(&0x1234_5678u32.to_be_bytes());
                    image[116..120].copy_from_slice(&5000u32.to_be_bytes());
                },
                stage: Open,
                open: (Corrupt, "overruns the header area"),
                stream: Some((Corrupt, "overruns")),
            },
        ),
        (
            "l2 entry with reserved bits",
            Refusal::same(
                |image| {
                    let l2a = 3 * 4096 + 5 * 8; // entry for guest cluster 5
                    image[l2a] |= 0x01; // bit 56
                },
                Read,
                Corrupt,
                "reserved bits",
            ),
        ),
        (
            "l1 entry with reserved bits",
            Refusal::same(
                |image| image[2 * 4096 + 7] |= 0x02, // bit 1
                Open,
                Corrupt,
                "l1 entry 0",
            ),
        ),
        (
            "zero flag in a v2 image",
            Refusal::same(
                |image| image[4..8].copy_from_slice(&2u32.to_be_bytes()),
                Read,
                Corrupt,
                "v2 image",
            ),
        ),
    ];
    check_cases(cases, |case| {
        let (mut image, _) = sample();
        (case.edit)(&mut image);
        let (kind, text) = case.open;
        match case.stage {
            Stage::Open => assert_err(open_bytes(super::open, image.clone()), kind, text),
            Stage::Read => assert_err(open_copy(image.clone()), kind, text),
        };
        if let Some((kind, text)) = case.stream {
            assert_err(stream_bytes(&image, &mut ctx()), kind, text);
        }
    });
}

/// `probe` refuses each variant of [`sample`] from its first cluster alone.
#[test]
fn sample_variants_are_refused_by_probe() {
    type Edit = fn(&mut Vec<u8>);
    let cases: [(&str, (Edit, ErrorKind, &str)); 3] = [
        (
            "external data file extension names the file",
            (
                |image| {
                    image[112..116].copy_from_slice(&0x4441_5441u32.to_be_bytes());
                    image[116..120].copy_from_slice(&8u32.to_be_bytes());
                    image[120..128].copy_from_slice(b"data.raw");
                },
                ErrorKind::Unsupported,
                "(\"data.raw\")",
            ),
        ),
        (
            "unknown incompatible bit is named from the feature table",
            (
                |image| {
                    image[79] |= 1 << 6;
                    image[112..116].copy_from_slice(&0x6803_f857u32.to_be_bytes());
                    image[116..120].copy_from_slice(&48u32.to_be_bytes());
                    image[120] = 0; // incompatible
                    image[121] = 6; // bit 6
                    image[122..131].copy_from_slice(b"teleports");
                },
                ErrorKind::Unsupported,
                "bit 6 (teleports)",
            ),
        ),
        (
            "header length beyond the cluster",
            (
                |image| image[100..104].copy_from_slice(&8192u32.to_be_bytes()),
                ErrorKind::Corrupt,
                "exceeds the cluster size",
            ),
        ),
    ];
    check_cases(cases, |(edit, kind, text)| {
        let (mut image, _) = sample();
        edit(&mut image);
        assert_err(super::probe(&image[..4096]), kind, text);
    });
}

#[test]
fn not_qcow2_is_corrupt() {
    assert_err(
        super::probe(b"QFI\xfa and more"),
        ErrorKind::Corrupt,
        "bad magic",
    );
}

#[test]
fn truncated_stream_always_fails() {
    let (image, _) = sample();
    let len = image.len();
    let mut cuts: Vec<usize> = (0..len).step_by(61).collect();
    cuts.extend([1, 100, 4095, 4096, 4097, len - 4096, len - 1]);
    for cut in cuts {
        let result = stream_bytes(&image[..cut], &mut ctx());
        let err = result.expect_err(&format!("stream cut at {cut} succeeded"));
        assert_eq!(err.kind(), ErrorKind::Truncated, "cut at {cut}: {err}");
    }
}

#[test]
fn truncated_stream_inside_data_names_the_cluster() {
    let (image, _) = sample();
    let cut = image.len() - 2048;
    assert_err(
        stream_bytes(&image[..cut], &mut ctx()),
        ErrorKind::Truncated,
        "stream ended at",
    );
}

/// Like [`read_all`] but stops at the first error instead of asserting.
fn copy_disk_lenient(disk: &mut dyn DiskImage) -> crate::Result<()> {
    let size = disk.virtual_size();
    let mut off = 0;
    let mut buf = vec![0u8; 1 << 16];
    while off < size {
        let ext = disk.extent(off, 1 << 16)?;
        if ext.len == 0 {
            return Ok(());
        }
        disk.read_exact_at(&mut buf[..ext.len as usize], off)?;
        off += ext.len;
    }
    Ok(())
}

#[test]
fn absolute_backing_file_is_refused_even_when_allowed() {
    let (mut image, _) = sample();
    image[512..523].copy_from_slice(b"/etc/passwd");
    image[8..16].copy_from_slice(&512u64.to_be_bytes());
    image[16..20].copy_from_slice(&11u32.to_be_bytes());
    let opts = OpenOptions {
        backing: BackingPolicy::AllowRelativeTo(std::env::temp_dir()),
    };
    let err = super::open(Arc::new(image), &opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.message().contains("not a plain relative path"), "{err}");
}

/// Hands out the stream in small, uneven pieces, like a network body.
struct Chunky<'a> {
    data: &'a [u8],
    step: usize,
}

impl std::io::Read for Chunky<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.step = self.step % 7 + 1;
        let n = buf.len().min(self.data.len()).min(self.step * 97);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn stream_from_short_reads_matches() {
    let (image, want) = data_before_table();
    let mut sink = CheckingSink::default();
    let mut input = Chunky {
        data: &image,
        step: 0,
    };
    super::stream(&mut input, &mut sink, &mut ctx()).unwrap();
    assert_eq!(sink.finish(), want);
}

struct NullSink;

impl ExtentSink for NullSink {
    fn begin(&mut self, _: Option<u64>) -> crate::Result<()> {
        Ok(())
    }
    fn data(&mut self, _: u64, _: &[u8]) -> crate::Result<()> {
        Ok(())
    }
    fn zero(&mut self, _: u64, _: u64) -> crate::Result<()> {
        Ok(())
    }
}

/// Random byte changes (a third of them in the header) and cuts: every outcome is an error or
/// a result, never a panic, an overflow or a runaway allocation.
#[test]
fn random_corruption_never_panics() {
    let images = [sample().0, data_before_table().0];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..3000 {
        let mut bytes = images[round % 2].clone();
        let n = 1 + next() % 6;
        for _ in 0..n {
            let r = next();
            let at = if r % 3 == 0 {
                (r >> 8) as usize % 128
            } else {
                (r >> 8) as usize % bytes.len()
            };
            bytes[at] = (next() >> 32) as u8;
        }
        if next() % 5 == 0 {
            let cut = next() as usize % bytes.len();
            bytes.truncate(cut);
        }
        let mut input = &bytes[..];
        let _ = super::stream(&mut input, &mut NullSink, &mut ctx());
        if let Ok(mut disk) = open_bytes(super::open, bytes) {
            let _ = copy_disk_lenient(&mut *disk);
        }
    }
}

/// Raw deflate of `data` whose encoding is exactly `len` bytes: a stored (uncompressed)
/// first block of adjustable length, then the rest compressed.
fn deflate_exact(data: &[u8], len: usize) -> Vec<u8> {
    for n in 0..data.len() {
        let rest = deflate(&data[n..]);
        if 5 + n + rest.len() == len {
            let mut out = vec![0u8]; // BFINAL=0, BTYPE=00 (stored)
            out.extend_from_slice(&(n as u16).to_le_bytes());
            out.extend_from_slice(&(!(n as u16)).to_le_bytes());
            out.extend_from_slice(&data[..n]);
            out.extend_from_slice(&rest);
            return out;
        }
    }
    panic!("no stored-block split gives {len} bytes");
}

/// Two L2 tables; host cluster A holds guest cluster 0 (mapped by the first table) compressed
/// into exactly `k_len` bytes, followed at `A + k_len` by `tail` and whatever follows.
fn two_tables_sharing_a_cluster(k_len: usize, tail: &[u8]) -> (Vec<u8>, Img, u64) {
    let cs = 4096usize;
    let span = cs * 512;
    let mut img = Img::new(12, 2 * span as u64);
    let k_data = vec![0x42u8; cs];
    let mut want = vec![0u8; 2 * span];
    want[..cs].copy_from_slice(&k_data);
    let l2a = img.l2(&[]);
    img.l1(0, l2a);
    let a = img.bytes(&deflate_exact(&k_data, k_len));
    img.bytes(tail);
    img.l2_at(l2a, &[(0, compressed_entry(12, a, k_len as u64))]);
    (want, img, a)
}

#[test]
fn unused_zero_tail_of_a_compressed_cluster_is_not_held_back() {
    // Host cluster A: guest cluster 0 compressed, then 96 unused zero bytes; the second L2
    // table comes later and maps a standard cluster after it. Nothing needs A's tail.
    let (mut want, mut img, _) = two_tables_sharing_a_cluster(4000, &[0u8; 96]);
    let l2b = img.l2(&[]);
    img.l1(1, l2b);
    let data = pattern(3, 4096);
    let host = img.cluster(&data);
    img.l2_at(l2b, &[(0, std_entry(host))]);
    want[4096 * 512..4096 * 513].copy_from_slice(&data);
    let mut sink = CheckingSink::default();
    let mut input = &img.file[..];
    let peaks = super::stream::stream_with_peaks(&mut input, &mut sink, &mut ctx()).unwrap();
    assert_eq!(sink.finish(), want);
    assert_eq!(peaks.spilled_clusters, 0);
}

#[test]
fn compressed_cluster_starting_with_zero_bytes_across_a_table_boundary_streams() {
    // Host cluster A: guest cluster 0 compressed (first table) in its first 4093 bytes, then
    // the first 3 bytes of guest cluster 512's compressed data (second table, further on),
    // which start with an empty stored block "00 00 00 ff ff" and continue in cluster A+1.
    // Those 3 zero bytes must be held back, not taken for free space.
    let j_data = pattern(8, 4096);
    let mut j = vec![0, 0, 0, 0xff, 0xff];
    j.extend_from_slice(&deflate(&j_data));
    let (mut want, mut img, a) = two_tables_sharing_a_cluster(4093, &j);
    img.pad();
    let l2b = img.l2(&[]);
    img.l1(1, l2b);
    img.l2_at(l2b, &[(0, compressed_entry(12, a + 4093, j.len() as u64))]);
    want[4096 * 512..4096 * 513].copy_from_slice(&j_data);
    assert_eq!(open_copy(img.file.clone()).unwrap(), want);
    assert_eq!(stream_bytes(&img.file, &mut ctx()).unwrap(), want);
}

#[test]
fn refcount_blocks_and_a_data_cluster_named_by_the_refcount_table_still_stream() {
    // The refcount table names cluster 3 (the first L2 table: claimed, then parsed) and the
    // data cluster after it (a stale entry). A mapping always beats a refcount claim.
    let (mut image, want) = sample();
    image[4096..4104].copy_from_slice(&(3u64 * 4096).to_be_bytes());
    image[4104..4112].copy_from_slice(&(5u64 * 4096).to_be_bytes());
    let mut sink = CheckingSink::default();
    let mut input = &image[..];
    let peaks = super::stream::stream_with_peaks(&mut input, &mut sink, &mut ctx()).unwrap();
    assert_eq!(sink.finish(), want);
    assert_eq!(peaks.spilled_clusters, 0);
}

#[test]
fn empty_disk_streams_and_opens() {
    let img = Img::new(12, 0);
    assert_eq!(open_copy(img.file.clone()).unwrap(), Vec::<u8>::new());
    assert_eq!(
        stream_bytes(&img.file, &mut ctx()).unwrap(),
        Vec::<u8>::new()
    );
}

#[test]
fn stream_reads_the_input_to_its_end() {
    // Callers may hash the stream while we read it, so unneeded trailing bytes (snapshot
    // tables, freed clusters) are read too.
    let (mut image, want) = sample();
    image.extend_from_slice(&[0x77; 3 * 4096 + 100]);
    let mut input = &image[..];
    let mut sink = CheckingSink::default();
    super::stream(&mut input, &mut sink, &mut ctx()).unwrap();
    assert_eq!(sink.finish(), want);
    assert!(input.is_empty(), "{} bytes left unread", input.len());
}

#[test]
fn stream_cut_after_the_last_needed_byte_but_before_a_refcount_block_fails() {
    // Append a refcount block after everything the guest needs and name it in the refcount
    // table; cutting it off loses no guest data but leaves the image incomplete.
    let (mut image, _) = sample();
    let block = image.len() as u64;
    image.extend_from_slice(&[0u8; 4096]);
    image[4096..4104].copy_from_slice(&block.to_be_bytes());
    let cut = &image[..block as usize + 100];
    assert_err(
        stream_bytes(cut, &mut ctx()),
        ErrorKind::Truncated,
        "refcount block",
    );
    assert_err(
        open_bytes(super::open, cut.to_vec()),
        ErrorKind::Corrupt,
        "refcount block at",
    );
}
