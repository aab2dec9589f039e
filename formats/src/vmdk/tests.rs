//! VMDK tests: qemu-img oracle round trips, then hostile images built in code.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use flate2::Compression;
use flate2::write::ZlibEncoder;
use proptest::prelude::*;

use super::testutil::{
    BoundsSink, CheckingSink, assert_same_disk, exercise, have_qemu_img, qemu_img, qemu_raw,
    read_all, write_mixed_raw,
};
use super::*;
use crate::error::ErrorKind;
use crate::image::StreamContext;

fn convert_to_vmdk(dir: &Path, subformat: &str) -> std::path::PathBuf {
    let raw = dir.join("src.raw");
    write_mixed_raw(&raw);
    let out = dir.join(format!("{subformat}.vmdk"));
    let opt = format!("subformat={subformat}");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        &opt,
        raw.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    out
}

fn open_file(path: &Path) -> Result<Box<dyn DiskImage>> {
    open(Arc::new(File::open(path).unwrap()), &OpenOptions::default())
}

fn stream_file(path: &Path) -> Result<Vec<u8>> {
    let mut input = std::io::BufReader::new(File::open(path).unwrap());
    let mut sink = CheckingSink::default();
    stream(&mut input, &mut sink, &mut StreamContext::new(None))?;
    Ok(sink.finish())
}

// ---- qemu-img oracle ----

#[test]
fn monolithic_sparse_reads_like_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = convert_to_vmdk(dir.path(), "monolithicSparse");

    let ours = read_all(&mut *open_file(&image).unwrap()).unwrap();

    assert_same_disk(&ours, &qemu_raw(&image, "vmdk"));
}

#[test]
fn monolithic_sparse_streams_like_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = convert_to_vmdk(dir.path(), "monolithicSparse");

    let ours = stream_file(&image).unwrap();

    assert_same_disk(&ours, &qemu_raw(&image, "vmdk"));
}

#[test]
fn stream_optimized_reads_like_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = convert_to_vmdk(dir.path(), "streamOptimized");

    let ours = read_all(&mut *open_file(&image).unwrap()).unwrap();

    assert_same_disk(&ours, &qemu_raw(&image, "vmdk"));
}

#[test]
fn stream_optimized_streams_like_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = convert_to_vmdk(dir.path(), "streamOptimized");

    let ours = stream_file(&image).unwrap();

    assert_same_disk(&ours, &qemu_raw(&image, "vmdk"));
}

#[test]
fn monolithic_flat_descriptor_reads_like_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = convert_to_vmdk(dir.path(), "monolithicFlat");

    let ours =
        read_all(&mut *open_descriptor_path(&image, &OpenOptions::default()).unwrap()).unwrap();

    assert_same_disk(&ours, &qemu_raw(&image, "vmdk"));
}

#[test]
fn two_gb_max_extent_sparse_descriptor_reads_like_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = convert_to_vmdk(dir.path(), "twoGbMaxExtentSparse");

    let ours =
        read_all(&mut *open_descriptor_path(&image, &OpenOptions::default()).unwrap()).unwrap();

    assert_same_disk(&ours, &qemu_raw(&image, "vmdk"));
}

/// monolithicSparse with `zeroed_grain=on`, then qemu-io zero writes over data grains, so
/// some grain table entries hold the "zero grain" marker (1).
fn zeroed_grain_vmdk(dir: &Path) -> Option<std::path::PathBuf> {
    let raw = dir.join("src.raw");
    write_mixed_raw(&raw);
    let out = dir.join("zg.vmdk");
    let out_s = out.to_str().unwrap();
    let opt = "subformat=monolithicSparse,zeroed_grain=on";
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        opt,
        raw.to_str().unwrap(),
        out_s,
    ]);
    let io = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "vmdk",
            "-c",
            "write -z 0 128k",
            "-c",
            "write -z 16M 64k",
            out_s,
        ])
        .output();
    if !io.is_ok_and(|o| o.status.success()) {
        println!("SKIPPED: qemu-io is not available");
        return None;
    }
    Some(out)
}

#[test]
fn zeroed_grains_read_like_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(image) = zeroed_grain_vmdk(dir.path()) else {
        return;
    };

    let ours = read_all(&mut *open_file(&image).unwrap()).unwrap();

    assert_same_disk(&ours, &qemu_raw(&image, "vmdk"));
}

#[test]
fn zeroed_grains_stream_like_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(image) = zeroed_grain_vmdk(dir.path()) else {
        return;
    };

    let ours = stream_file(&image).unwrap();

    assert_same_disk(&ours, &qemu_raw(&image, "vmdk"));
}

#[test]
fn probe_reports_stream_optimized_as_streamable() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = convert_to_vmdk(dir.path(), "streamOptimized");
    let head = std::fs::read(&image).unwrap();

    let info = probe(&head[..64 << 10]).unwrap();

    assert_eq!(
        (
            info.virtual_size,
            info.subformat.as_deref(),
            info.streamable,
            info.cluster_size
        ),
        (
            Some(testutil::MIXED_SIZE),
            Some("streamOptimized"),
            true,
            Some(65536)
        )
    );
}

#[test]
fn probe_reports_flat_descriptor_size_and_type() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = convert_to_vmdk(dir.path(), "monolithicFlat");
    let head = std::fs::read(&image).unwrap();

    let info = probe(&head).unwrap();

    assert_eq!(
        (
            info.virtual_size,
            info.subformat.as_deref(),
            info.streamable
        ),
        (Some(testutil::MIXED_SIZE), Some("monolithicFlat"), false)
    );
}

// ---- images built in code ----

/// Grain size of the built images: 8 sectors (4 KiB), so tiny images have several grains.
const GRAIN_SECTORS: u64 = 8;

/// A sparse header: flags, capacity and the table/metadata offsets (all in sectors).
fn header(flags: u32, capacity: u64, gd_offset: u64, overhead: u64) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[0..4].copy_from_slice(b"KDMV"); // magic
    h[4..8].copy_from_slice(&1u32.to_le_bytes()); // version
    h[8..12].copy_from_slice(&flags.to_le_bytes()); // flags
    h[12..20].copy_from_slice(&capacity.to_le_bytes()); // capacity
    h[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes()); // grainSize
    h[44..48].copy_from_slice(&512u32.to_le_bytes()); // numGTEsPerGT
    h[56..64].copy_from_slice(&gd_offset.to_le_bytes()); // gdOffset
    h[64..72].copy_from_slice(&overhead.to_le_bytes()); // overHead
    h[73..77].copy_from_slice(b"\n \r\n"); // newline check characters
    h[77..79].copy_from_slice(&1u16.to_le_bytes()); // compressAlgorithm (deflate)
    h
}

/// monolithicSparse: header, GD at sector 1, one GT at sectors 2..6, grains from sector 6.
/// `grains` lists (guest grain index, fill byte); capacity is 64 grains (256 KiB).
fn build_sparse(grains: &[(u32, u8)]) -> Vec<u8> {
    let mut img = header(1, 64 * GRAIN_SECTORS, 1, 6);
    img.resize(6 * 512, 0);
    img[512..516].copy_from_slice(&2u32.to_le_bytes()); // GD[0] -> GT at sector 2
    for (n, &(index, fill)) in grains.iter().enumerate() {
        let sector = 6 + n as u32 * GRAIN_SECTORS as u32;
        let gte = 1024 + index as usize * 4;
        img[gte..gte + 4].copy_from_slice(&sector.to_le_bytes());
        img.extend(std::iter::repeat_n(fill, 4096));
    }
    img
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut enc = ZlibEncoder::new(Vec::new(), Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Pad to a whole sector.
fn pad(v: &mut Vec<u8>) {
    v.resize(v.len().div_ceil(512) * 512, 0);
}

fn metadata_marker(sectors: u64, kind: u32) -> Vec<u8> {
    let mut m = vec![0u8; 512];
    m[0..8].copy_from_slice(&sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// VMware's streamOptimized layout: header with the grain directory "at end", grains with
/// markers, then GT marker + GT, GD marker + GD, footer marker + footer, end-of-stream.
/// `grains` lists (guest grain index, zlib payload); capacity is 64 grains.
fn build_stream_optimized(grains: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let flags = 1 | (1 << 16) | (1 << 17);
    let capacity = 64 * GRAIN_SECTORS;
    let mut img = header(flags, capacity, u64::MAX, 1);
    let mut gt = vec![0u8; 2048];
    for (index, payload) in grains {
        let sector = (img.len() / 512) as u32;
        gt[*index as usize * 4..*index as usize * 4 + 4].copy_from_slice(&sector.to_le_bytes());
        img.extend_from_slice(&(index * GRAIN_SECTORS).to_le_bytes()); // lba
        img.extend_from_slice(&(payload.len() as u32).to_le_bytes()); // size
        img.extend_from_slice(payload);
        pad(&mut img);
    }
    img.extend(metadata_marker(4, 1));
    let gt_sector = (img.len() / 512) as u32;
    img.extend_from_slice(&gt);
    img.extend(metadata_marker(1, 2));
    let gd_sector = (img.len() / 512) as u64;
    let mut gd = gt_sector.to_le_bytes().to_vec();
    pad(&mut gd);
    img.extend(gd);
    img.extend(metadata_marker(1, 3));
    img.extend(header(flags, capacity, gd_sector, 1));
    img.extend(metadata_marker(0, 0));
    img
}

fn open_bytes(bytes: Vec<u8>) -> Result<Box<dyn DiskImage>> {
    open(Arc::new(bytes), &OpenOptions::default())
}

fn stream_bytes(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut sink = CheckingSink::default();
    stream(&mut &bytes[..], &mut sink, &mut StreamContext::new(None))?;
    Ok(sink.finish())
}

fn expected_disk(grains: &[(u64, u8)]) -> Vec<u8> {
    let mut disk = vec![0u8; 64 * 4096];
    for &(index, fill) in grains {
        disk[index as usize * 4096..(index as usize + 1) * 4096].fill(fill);
    }
    disk
}

#[test]
fn built_sparse_image_reads_grains_and_holes() {
    let img = build_sparse(&[(0, 0x11), (5, 0x22), (63, 0x33)]);

    let ours = read_all(&mut *open_bytes(img).unwrap()).unwrap();

    assert_eq!(ours, expected_disk(&[(0, 0x11), (5, 0x22), (63, 0x33)]));
}

#[test]
fn built_sparse_image_streams_grains_and_holes() {
    let img = build_sparse(&[(0, 0x11), (5, 0x22), (63, 0x33)]);

    let ours = stream_bytes(&img).unwrap();

    assert_eq!(ours, expected_disk(&[(0, 0x11), (5, 0x22), (63, 0x33)]));
}

#[test]
fn footer_stream_optimized_reads_through_the_footer() {
    let img = build_stream_optimized(&[(1, zlib(&[7u8; 4096])), (40, zlib(&[9u8; 4096]))]);

    let ours = read_all(&mut *open_bytes(img).unwrap()).unwrap();

    assert_eq!(ours, expected_disk(&[(1, 7), (40, 9)]));
}

#[test]
fn footer_stream_optimized_streams_past_table_markers() {
    let img = build_stream_optimized(&[(1, zlib(&[7u8; 4096])), (40, zlib(&[9u8; 4096]))]);

    let ours = stream_bytes(&img).unwrap();

    assert_eq!(ours, expected_disk(&[(1, 7), (40, 9)]));
}

#[test]
fn stream_optimized_grains_out_of_order_need_scratch() {
    let img = build_stream_optimized(&[(40, zlib(&[9u8; 4096])), (1, zlib(&[7u8; 4096]))]);

    let err = stream_bytes(&img).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::ScratchSpaceRequired, "{err}");
}

#[test]
fn bad_compressed_grain_is_corrupt_when_read() {
    let img = build_stream_optimized(&[(1, b"this is not zlib data".to_vec())]);
    let mut disk = open_bytes(img).unwrap();
    let mut buf = vec![0u8; 4096];

    let err = disk.read_exact_at(&mut buf, 4096).unwrap_err();

    assert_eq!(
        (err.kind(), err.message()),
        (
            ErrorKind::Corrupt,
            "vmdk compressed grain for guest sector 8 has invalid zlib data"
        )
    );
}

#[test]
fn bad_compressed_grain_is_corrupt_when_streamed() {
    let img = build_stream_optimized(&[(1, b"this is not zlib data".to_vec())]);

    let err = stream_bytes(&img).unwrap_err();

    assert_eq!(
        (err.kind(), err.message()),
        (
            ErrorKind::Corrupt,
            "vmdk compressed grain for guest sector 8 has invalid zlib data"
        )
    );
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

#[test]
fn grain_directory_past_eof_is_corrupt() {
    let mut img = build_sparse(&[(0, 1)]);
    img[56..64].copy_from_slice(&1_000_000u64.to_le_bytes()); // gdOffset far past the end

    let err = open_bytes(img).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(
        err.message()
            .starts_with("vmdk grain directory at file offset 512000000"),
        "{err}"
    );
}

#[test]
fn grain_table_past_eof_is_corrupt() {
    let mut img = build_sparse(&[(0, 1)]);
    img[512..516].copy_from_slice(&5000u32.to_le_bytes()); // GD[0] -> past the end

    let err = open_bytes(img).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(
        err.message()
            .starts_with("vmdk grain directory entry 0 points at a grain table"),
        "{err}"
    );
}

#[test]
fn grain_past_eof_is_corrupt_when_read() {
    let mut img = build_sparse(&[(0, 1)]);
    img[1024..1028].copy_from_slice(&4000u32.to_le_bytes()); // GT[0] -> past the end
    let mut disk = open_bytes(img).unwrap();
    let mut buf = vec![0u8; 512];

    let err = disk.read_exact_at(&mut buf, 0).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(
        err.message()
            .contains("grain 0 at file offset 2048000 lies past the end"),
        "{err}"
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
fn huge_capacity_is_limit_exceeded() {
    let mut img = build_sparse(&[]);
    img[12..20].copy_from_slice(&(1u64 << 40).to_le_bytes()); // 512 TiB in sectors

    let err = open_bytes(img).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::LimitExceeded, "{err}");
}

#[test]
fn unknown_version_is_unsupported() {
    let mut img = build_sparse(&[]);
    img[4..8].copy_from_slice(&4u32.to_le_bytes());

    let err = probe(&img).unwrap_err();

    assert_eq!(
        (err.kind(), err.message()),
        (
            ErrorKind::Unsupported,
            "vmdk sparse version 4 is not supported"
        )
    );
}

#[test]
fn descriptor_through_read_at_is_unsupported() {
    let text =
        b"# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"x-flat.vmdk\" 0\n"
            .to_vec();

    let err = open_bytes(text).unwrap_err();

    assert_eq!(
        (err.kind(), err.message()),
        (
            ErrorKind::Unsupported,
            "vmdk descriptor references external extent files; convert it from a local path"
        )
    );
}

#[test]
fn descriptor_with_parent_dir_extent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), [0u8; 4096]).unwrap();
    let inner = dir.path().join("inner");
    std::fs::create_dir(&inner).unwrap();
    let desc = inner.join("disk.vmdk");
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"../secret\" 0\n",
    )
    .unwrap();

    let err = open_descriptor_path(&desc, &OpenOptions::default()).unwrap_err();

    assert_eq!(
        (err.kind(), err.message()),
        (
            ErrorKind::Unsupported,
            "vmdk extent file name \"../secret\" must be a relative path without '..'"
        )
    );
}

#[test]
fn descriptor_with_absolute_extent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let desc = dir.path().join("disk.vmdk");
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\nRW 8 FLAT \"/etc/passwd\" 0\n",
    )
    .unwrap();

    let err = open_descriptor_path(&desc, &OpenOptions::default()).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
}

#[test]
fn descriptor_over_the_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let desc = dir.path().join("disk.vmdk");
    let mut text = b"# Disk DescriptorFile\n".to_vec();
    text.resize(limits::MAX_DESCRIPTOR_BYTES as usize + 1, b'#');
    std::fs::write(&desc, text).unwrap();

    let err = open_descriptor_path(&desc, &OpenOptions::default()).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::LimitExceeded, "{err}");
}

#[test]
fn descriptor_flat_extent_shorter_than_declared_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d-flat.vmdk"), [0u8; 2048]).unwrap();
    let desc = dir.path().join("d.vmdk");
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\nRW 8 FLAT \"d-flat.vmdk\" 0\n",
    )
    .unwrap();

    let err = open_descriptor_path(&desc, &OpenOptions::default()).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
}

fn sparse_with_parent() -> Vec<u8> {
    let mut img = header(1, 64 * GRAIN_SECTORS, 3, 8);
    img[28..36].copy_from_slice(&1u64.to_le_bytes()); // descriptorOffset
    img[36..44].copy_from_slice(&1u64.to_le_bytes()); // descriptorSize
    let mut desc =
        b"# Disk DescriptorFile\nparentCID=12345678\nparentFileNameHint=\"base.vmdk\"\n".to_vec();
    desc.resize(512, 0);
    img.extend(desc);
    img.resize(8 * 512, 0);
    img
}

#[test]
fn sparse_image_with_parent_is_unsupported() {
    let img = sparse_with_parent();

    let err = open_bytes(img).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
}

#[test]
fn sparse_image_with_parent_is_unsupported_when_streamed() {
    let img = sparse_with_parent();

    let err = stream_bytes(&img).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
}

/// monolithicSparse with the tables after the grains: header, grains from sector 1, then the
/// GD and one GT. Valid for random access, not streamable without scratch space.
fn build_sparse_tables_last(grains: &[(u32, u8)]) -> Vec<u8> {
    let gd_sector = 1 + grains.len() as u64 * GRAIN_SECTORS;
    let mut img = header(1, 64 * GRAIN_SECTORS, gd_sector, 1);
    for &(_, fill) in grains {
        img.extend(std::iter::repeat_n(fill, 4096));
    }
    let mut gd = (gd_sector as u32 + 1).to_le_bytes().to_vec();
    pad(&mut gd);
    img.extend(gd);
    let mut gt = vec![0u8; 2048];
    for (n, &(index, _)) in grains.iter().enumerate() {
        let sector = 1 + n as u32 * GRAIN_SECTORS as u32;
        gt[index as usize * 4..index as usize * 4 + 4].copy_from_slice(&sector.to_le_bytes());
    }
    img.extend(gt);
    img
}

#[test]
fn sparse_with_tables_after_grains_reads_randomly() {
    let img = build_sparse_tables_last(&[(3, 0x44), (9, 0x55)]);

    let ours = read_all(&mut *open_bytes(img).unwrap()).unwrap();

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
    if let Ok(mut disk) = open_bytes(img) {
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
    let mut disk = open_descriptor_path(&desc, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 5632];

    disk.read_exact_at(&mut buf, 0).unwrap();

    let expected = [vec![1u8; 4096], vec![0u8; 1024], vec![2u8; 512]].concat();
    assert_eq!(buf, expected);
}
