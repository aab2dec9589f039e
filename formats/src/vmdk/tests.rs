//! VMDK tests: qemu-img oracle round trips, then hostile images built in code.

use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::testutil::{
    build_sparse, build_sparse_tables_last, build_stream_optimized, expected_disk,
    sparse_with_parent, zlib,
};
use super::*;
use crate::error::ErrorKind;
use crate::image::StreamContext;
use crate::testutil::{
    BoundsSink, CheckingSink, MIXED_SIZE, Msg, assert_err, assert_reads_like_qemu, assert_refused,
    assert_same_disk, assert_streams_like_qemu, check_cases, check_open_refuses, edited, exercise,
    have_tools, mixed_reads_like_qemu, mixed_streams_like_qemu, open_bytes, qemu_io, qemu_mixed,
    qemu_raw, read_all, stream_to_vec,
};

/// [`crate::testutil::mixed_raw`] converted by qemu-img to vmdk with `-o options`.
fn qemu_vmdk(dir: &Path, options: &str) -> PathBuf {
    qemu_mixed(dir, "vmdk", &["-o", options], "img.vmdk")
}

fn read_bytes(bytes: Vec<u8>) -> Result<Vec<u8>> {
    read_all(&mut *open_bytes(open, bytes)?)
}

fn stream_bytes(bytes: &[u8]) -> Result<Vec<u8>> {
    stream_to_vec(stream, &mut &bytes[..], &mut StreamContext::new(None))
}

fn open_descriptor(path: &Path) -> Result<Box<dyn DiskImage>> {
    open_descriptor_path(path, &OpenOptions::default())
}

// ---- qemu-img oracle ----

#[test]
fn monolithic_sparse_reads_like_qemu_img() {
    mixed_reads_like_qemu(open, "vmdk", &["-o", "subformat=monolithicSparse"]);
}

#[test]
fn monolithic_sparse_streams_like_qemu_img() {
    mixed_streams_like_qemu(stream, "vmdk", &["-o", "subformat=monolithicSparse"]);
}

#[test]
fn stream_optimized_reads_like_qemu_img() {
    mixed_reads_like_qemu(open, "vmdk", &["-o", "subformat=streamOptimized"]);
}

#[test]
fn stream_optimized_streams_like_qemu_img() {
    mixed_streams_like_qemu(stream, "vmdk", &["-o", "subformat=streamOptimized"]);
}

/// A descriptor qemu-img writes (with its extent files) reads by path like qemu-img's raw
/// conversion.
fn descriptor_reads_like_qemu_img(subformat: &str) {
    if !have_tools(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vmdk(dir.path(), &format!("subformat={subformat}"));

    let ours = read_all(&mut *open_descriptor(&image).unwrap()).unwrap();

    assert_same_disk(&ours, &qemu_raw(&image, "vmdk"));
}

#[test]
fn monolithic_flat_descriptor_reads_like_qemu_img() {
    descriptor_reads_like_qemu_img("monolithicFlat");
}

#[test]
fn two_gb_max_extent_sparse_descriptor_reads_like_qemu_img() {
    descriptor_reads_like_qemu_img("twoGbMaxExtentSparse");
}

/// monolithicSparse with `zeroed_grain=on`, then qemu-io zero writes over data grains, so
/// some grain table entries hold the "zero grain" marker (1). `None` without the tools.
fn zeroed_grain_vmdk() -> Option<(tempfile::TempDir, PathBuf)> {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vmdk(dir.path(), "subformat=monolithicSparse,zeroed_grain=on");
    qemu_io(&image, "vmdk", &["write -z 0 128k", "write -z 16M 64k"]);
    Some((dir, image))
}

#[test]
fn zeroed_grains_read_like_qemu_img() {
    let Some((_dir, image)) = zeroed_grain_vmdk() else {
        return;
    };
    assert_reads_like_qemu(open, &image, "vmdk");
}

#[test]
fn zeroed_grains_stream_like_qemu_img() {
    let Some((_dir, image)) = zeroed_grain_vmdk() else {
        return;
    };
    assert_streams_like_qemu(stream, &image, "vmdk");
}

#[test]
fn probe_reports_stream_optimized_as_streamable() {
    if !have_tools(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vmdk(dir.path(), "subformat=streamOptimized");
    let head = std::fs::read(&image).unwrap();

    let info = probe(&head[..64 << 10]).unwrap();

    assert_eq!(
        (
            info.virtual_size,
            info.subformat.as_deref(),
            info.streamable,
            info.cluster_size
        ),
        (Some(MIXED_SIZE), Some("streamOptimized"), true, Some(65536))
    );
}

#[test]
fn probe_reports_flat_descriptor_size_and_type() {
    if !have_tools(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vmdk(dir.path(), "subformat=monolithicFlat");
    let head = std::fs::read(&image).unwrap();

    let info = probe(&head).unwrap();

    assert_eq!(
        (
            info.virtual_size,
            info.subformat.as_deref(),
            info.streamable
        ),
        (Some(MIXED_SIZE), Some("monolithicFlat"), false)
    );
}

// ---- images built in code ----

/// Built images whose every guest byte is known: read through `open` and streamed.
#[test]
fn built_images_read_and_stream_grains_and_holes() {
    let sparse = [(0, 0x11), (5, 0x22), (63, 0x33)];
    let cases = [
        (
            "sparse",
            (
                build_sparse(&sparse.map(|(i, f)| (i as u32, f))),
                expected_disk(&sparse),
            ),
        ),
        (
            // The stream reader steps past the table markers; `open` reads the footer.
            "streamOptimized with a footer",
            (
                build_stream_optimized(&[(1, zlib(&[7u8; 4096])), (40, zlib(&[9u8; 4096]))]),
                expected_disk(&[(1, 7), (40, 9)]),
            ),
        ),
    ];
    check_cases(cases, |(img, expected)| {
        assert_eq!(read_bytes(img.clone()).unwrap(), expected, "read");
        assert_eq!(stream_bytes(&img).unwrap(), expected, "streamed");
    });
}

#[test]
fn stream_optimized_grains_out_of_order_need_scratch() {
    let img = build_stream_optimized(&[(40, zlib(&[9u8; 4096])), (1, zlib(&[7u8; 4096]))]);

    let err = stream_bytes(&img).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::ScratchSpaceRequired, "{err}");
}

/// The message for the built image with one bad compressed grain.
const BAD_GRAIN: Msg = Msg::Is("vmdk compressed grain for guest sector 8 has invalid zlib data");

#[test]
fn bad_compressed_grain_is_corrupt_when_read() {
    let img = build_stream_optimized(&[(1, b"this is not zlib data".to_vec())]);
    let mut disk = open_bytes(open, img).unwrap();
    let mut buf = vec![0u8; 4096];

    assert_refused(
        disk.read_exact_at(&mut buf, 4096),
        ErrorKind::Corrupt,
        BAD_GRAIN,
    );
}

#[test]
fn bad_compressed_grain_is_corrupt_when_streamed() {
    let img = build_stream_optimized(&[(1, b"this is not zlib data".to_vec())]);

    assert_refused(stream_bytes(&img), ErrorKind::Corrupt, BAD_GRAIN);
}

#[test]
fn stream_cut_before_its_last_grain_is_truncated() {
    // Two one-sector grains, then the end-of-stream marker: cutting the last grain and the
    // marker ends the stream on a marker boundary, which only the grain tables expose.
    let mut img = build_stream_optimized(&[(1, zlib(&[7u8; 4096])), (2, zlib(&[9u8; 4096]))]);
    img.truncate(img.len() - 1024);

    let err = stream_bytes(&img).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Truncated, "{err}");
}

#[test]
fn stream_without_end_marker_after_its_last_grain_is_complete() {
    // qemu-img ends streamOptimized files right after the last grain at times.
    let mut img = build_stream_optimized(&[(1, zlib(&[7u8; 4096]))]);
    img.truncate(img.len() - 512);

    assert!(stream_bytes(&img).is_ok());
}

/// Damaged sparse headers and tables that `open` refuses.
#[test]
fn damaged_sparse_images_are_refused_by_open() {
    check_open_refuses(
        open,
        [
            (
                "grain directory past eof",
                (
                    edited(build_sparse(&[(0, 1)]), |img| {
                        img[56..64].copy_from_slice(&1_000_000u64.to_le_bytes()); // gdOffset
                    }),
                    ErrorKind::Corrupt,
                    Msg::Starts("vmdk grain directory at file offset 512000000"),
                ),
            ),
            (
                "grain table past eof",
                (
                    edited(build_sparse(&[(0, 1)]), |img| {
                        img[512..516].copy_from_slice(&5000u32.to_le_bytes()); // GD[0]
                    }),
                    ErrorKind::Corrupt,
                    Msg::Starts("vmdk grain directory entry 0 points at a grain table"),
                ),
            ),
            (
                "huge capacity",
                (
                    edited(build_sparse(&[]), |img| {
                        img[12..20].copy_from_slice(&(1u64 << 40).to_le_bytes()); // 512 TiB
                    }),
                    ErrorKind::LimitExceeded,
                    Msg::Any,
                ),
            ),
        ],
    );
}

#[test]
fn grain_past_eof_is_corrupt_when_read() {
    let mut img = build_sparse(&[(0, 1)]);
    img[1024..1028].copy_from_slice(&4000u32.to_le_bytes()); // GT[0] -> past the end
    let mut disk = open_bytes(open, img).unwrap();
    let mut buf = vec![0u8; 512];

    assert_err(
        disk.read_exact_at(&mut buf, 0),
        ErrorKind::Corrupt,
        "grain 0 at file offset 2048000 lies past the end",
    );
}

#[test]
fn truncated_sparse_image_is_truncated_when_streamed() {
    let mut img = build_sparse(&[(0, 1), (1, 2)]);
    img.truncate(img.len() - 100);

    let err = stream_bytes(&img).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Truncated, "{err}");
}

#[test]
fn unknown_version_is_unsupported() {
    let mut img = build_sparse(&[]);
    img[4..8].copy_from_slice(&4u32.to_le_bytes());

    assert_refused(
        probe(&img),
        ErrorKind::Unsupported,
        Msg::Is("vmdk sparse version 4 is not supported"),
    );
}

#[test]
fn descriptor_through_read_at_is_unsupported() {
    let text =
        b"# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"x-flat.vmdk\" 0\n"
            .to_vec();

    assert_refused(
        open_bytes(open, text),
        ErrorKind::Unsupported,
        Msg::Is("vmdk descriptor references external extent files; convert it from a local path"),
    );
}

/// Descriptors (with the files they name) that `open_descriptor_path` refuses.
#[test]
fn bad_descriptors_are_refused_by_path() {
    struct Case {
        /// Files written first (relative to a temp dir).
        files: &'static [(&'static str, &'static [u8])],
        /// Where the descriptor goes, and its text.
        descriptor: &'static str,
        text: Vec<u8>,
        kind: ErrorKind,
        msg: Msg,
    }
    let mut over_limit = b"# Disk DescriptorFile\n".to_vec();
    over_limit.resize(limits::MAX_DESCRIPTOR_BYTES as usize + 1, b'#');
    let cases = [
        (
            "extent in a parent dir",
            Case {
                files: &[("secret", &[0u8; 4096])],
                descriptor: "inner/disk.vmdk",
                text: b"# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"../secret\" 0\n"
                    .to_vec(),
                kind: ErrorKind::Unsupported,
                msg: Msg::Is("vmdk extent file name \"../secret\" must be a relative path without '..'"),
            },
        ),
        (
            "absolute extent",
            Case {
                files: &[],
                descriptor: "disk.vmdk",
                text: b"# Disk DescriptorFile\nRW 8 FLAT \"/etc/passwd\" 0\n".to_vec(),
                kind: ErrorKind::Unsupported,
                msg: Msg::Any,
            },
        ),
        (
            "descriptor over the limit",
            Case {
                files: &[],
                descriptor: "disk.vmdk",
                text: over_limit,
                kind: ErrorKind::LimitExceeded,
                msg: Msg::Any,
            },
        ),
        (
            "flat extent shorter than declared",
            Case {
                files: &[("d-flat.vmdk", &[0u8; 2048])],
                descriptor: "d.vmdk",
                text: b"# Disk DescriptorFile\nRW 8 FLAT \"d-flat.vmdk\" 0\n".to_vec(),
                kind: ErrorKind::Corrupt,
                msg: Msg::Any,
            },
        ),
    ];
    check_cases(cases, |case| {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in case.files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let desc = dir.path().join(case.descriptor);
        std::fs::create_dir_all(desc.parent().unwrap()).unwrap();
        std::fs::write(&desc, &case.text).unwrap();

        assert_refused(open_descriptor(&desc), case.kind, case.msg);
    });
}

#[test]
fn sparse_image_with_parent_is_unsupported() {
    let err = open_bytes(open, sparse_with_parent()).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
}

#[test]
fn sparse_image_with_parent_is_unsupported_when_streamed() {
    let err = stream_bytes(&sparse_with_parent()).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
}

#[test]
fn sparse_with_tables_after_grains_reads_randomly() {
    let img = build_sparse_tables_last(&[(3, 0x44), (9, 0x55)]);

    let ours = read_bytes(img).unwrap();

    assert_eq!(ours, expected_disk(&[(3, 0x44), (9, 0x55)]));
}

#[test]
fn sparse_with_tables_after_grains_needs_scratch_to_stream() {
    let img = build_sparse_tables_last(&[(3, 0x44), (9, 0x55)]);

    let err = stream_bytes(&img).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::ScratchSpaceRequired, "{err}");
}

#[test]
fn probe_reports_sparse_with_tables_after_grains_as_not_streamable() {
    let img = build_sparse_tables_last(&[(3, 0x44)]);

    let info = probe(&img).unwrap();

    assert_eq!(
        (info.subformat.as_deref(), info.streamable),
        (Some("monolithicSparse"), false)
    );
}

#[test]
fn fragmented_sparse_map_beyond_the_budget_needs_scratch() {
    let img = build_sparse(&[(0, 1), (2, 2), (4, 3), (6, 4)]);
    let mut sink = CheckingSink::default();
    let mut ctx = StreamContext::new(None);
    ctx.memory_budget = 64; // room for two runs

    let err = stream(&mut &img[..], &mut sink, &mut ctx).unwrap_err();

    assert_eq!(
        (err.kind(), sink.size),
        (ErrorKind::ScratchSpaceRequired, None)
    );
}

/// Apply `edits` (position modulo `len`, value) to the first `len` bytes of `img`.
fn mutate(mut img: Vec<u8>, len: usize, edits: &[(usize, u8)]) -> Vec<u8> {
    for &(pos, value) in edits {
        img[pos % len] = value;
    }
    img
}

fn survive(img: Vec<u8>) {
    let _ = probe(&img);
    let mut sink = BoundsSink::default();
    let _ = stream(&mut &img[..], &mut sink, &mut StreamContext::new(None));
    if let Ok(mut disk) = open_bytes(open, img) {
        exercise(&mut *disk);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn mutated_sparse_metadata_never_panics(edits in prop::collection::vec((0usize..3072, any::<u8>()), 1..8)) {
        // Header, GD and GT live in the first 3 KiB.
        survive(mutate(build_sparse(&[(0, 1), (7, 2)]), 3072, &edits));
    }

    #[test]
    fn mutated_stream_optimized_never_panics(edits in prop::collection::vec((0usize..1 << 20, any::<u8>()), 1..8)) {
        let img = build_stream_optimized(&[(1, zlib(&[7u8; 4096])), (40, zlib(&[9u8; 4096]))]);
        let len = img.len();
        survive(mutate(img, len, &edits));
    }
}

#[test]
fn descriptor_with_several_extents_reads_across_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.bin"), [1u8; 4096]).unwrap();
    std::fs::write(dir.path().join("b.bin"), [[9u8; 512], [2u8; 512]].concat()).unwrap();
    let desc = dir.path().join("d.vmdk");
    let text = "# Disk DescriptorFile\ncreateType=\"twoGbMaxExtentFlat\"\n\
                RW 8 FLAT \"a.bin\" 0\nRW 2 ZERO\nRW 1 FLAT \"./b.bin\" 1\n";
    std::fs::write(&desc, text).unwrap();
    let mut disk = open_descriptor(&desc).unwrap();
    let mut buf = vec![0u8; 5632];

    disk.read_exact_at(&mut buf, 0).unwrap();

    let expected = [vec![1u8; 4096], vec![0u8; 1024], vec![2u8; 512]].concat();
    assert_eq!(buf, expected);
}
