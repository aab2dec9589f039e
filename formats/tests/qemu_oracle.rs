//! qemu-img as the oracle: what we convert must compare equal (`qemu-img compare`) to the
//! source image, through the streaming and the random-access paths.
//!
//! Skips with `SKIPPED:` when qemu-img/qemu-io are missing (CI installs qemu-utils).

mod core_support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use cdi_formats::{
    BackingPolicy, ConvertOptions, ConvertReport, FileTarget, ImageFormat, Result, convert_path,
    convert_reader,
};
use core_support::*;

const MIB: usize = 1 << 20;

/// `qemu-img compare` exit status 0 means identical guest content.
fn assert_same(src: &Path, src_fmt: &str, out: &Path) {
    let res = Command::new("qemu-img")
        .args(["compare", "-f", src_fmt, "-F", "raw"])
        .arg(src)
        .arg(out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "qemu-img compare {} {}: {}{}",
        src.display(),
        out.display(),
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
}

/// Convert `path`'s bytes as a stream (`&mut dyn Read`, as stdin arrives).
fn stream_file(path: &Path, dst: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    let mut target = FileTarget::create(dst).unwrap();
    let mut input = File::open(path).unwrap();
    let input: &mut dyn std::io::Read = &mut input;
    convert_reader(input, &mut target, opts)
}

/// Convert the local file at `path` (random access where the format needs it).
fn convert_file(path: &Path, dst: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    let mut target = FileTarget::create(dst).unwrap();
    convert_path(path, &mut target, opts)
}

/// A temp dir holding `src.raw`, a raw disk of `size` bytes with random data in `regions`;
/// `None` (after the skip line) without qemu-img/qemu-io.
fn with_raw(size: usize, regions: &[(usize, usize)]) -> Option<(tempfile::TempDir, PathBuf)> {
    if !have_qemu() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("src.raw");
    std::fs::write(&path, sparse_image(size, regions)).unwrap();
    Some((dir, path))
}

/// Stream `path` with a scratch directory `dir/name`: the format needs it (the report says
/// so), and the scratch file is gone afterwards.
fn stream_spooled(path: &Path, out: &Path, dir: &Path, name: &str) -> ConvertReport {
    let scratch = dir.join(name);
    std::fs::create_dir(&scratch).unwrap();
    let opts = ConvertOptions {
        scratch_dir: Some(scratch.clone()),
        ..Default::default()
    };
    let r = stream_file(path, out, &opts).unwrap_or_else(|e| panic!("{name} spool: {e}"));
    assert!(!r.streamed && r.scratch_bytes > 0, "{name}: {r:?}");
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "{name}: scratch file left behind"
    );
    r
}

/// `path` gzip-compressed next to it, as `<path>.gz`.
fn gzip_file(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".gz");
    let gz = PathBuf::from(name);
    std::fs::write(&gz, gzip(&std::fs::read(path).unwrap())).unwrap();
    gz
}

/// A 64 MiB qcow2 image with data, a zero-flagged range and unallocated space.
fn make_qcow2(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("64M"));
    qemu_io(
        &path,
        "qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 10M 64k",
            "write -z 20M 1M",
            "write -P 0x33 63M 4k",
        ],
    );
    path
}

#[test]
fn raw_passthrough_matches_qemu_img() {
    let Some((dir, src)) = with_raw(
        40 * MIB,
        &[(0, 4096), (7 * MIB + 512, 300_000), (39 * MIB, MIB)],
    ) else {
        return;
    };

    let ours = dir.path().join("ours.img");
    let r = stream_file(&src, &ours, &ConvertOptions::default()).unwrap();
    assert_eq!(r.format, ImageFormat::Raw);
    assert_same(&src, "raw", &ours);

    // Our holes are at least as good as qemu-img's default (-S 4k) sparseness.
    let theirs = dir.path().join("theirs.img");
    qemu_img(&["convert", "-f", "raw", "-O", "raw"], &[&src, &theirs]);
    let (a, b) = (allocated(&ours), allocated(&theirs));
    assert!(a <= b + 64 * 1024, "we allocated {a} bytes, qemu-img {b}");

    // The same through the local-file path.
    let ours2 = dir.path().join("ours2.img");
    convert_file(&src, &ours2, &ConvertOptions::default()).unwrap();
    assert_same(&src, "raw", &ours2);
}

#[test]
fn iso_passthrough_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut iso = sparse_image(3 * MIB, &[(0x8000, 2048), (0x9000, 8192), (2 * MIB, 65536)]);
    iso[0x8000] = 1;
    iso[0x8001..0x8006].copy_from_slice(b"CD001");
    let src = dir.path().join("cd.iso");
    std::fs::write(&src, &iso).unwrap();
    let gz = gzip_file(&src);
    let out = dir.path().join("cd.img");
    let r = stream_file(&gz, &out, &ConvertOptions::default()).unwrap();
    assert_eq!(r.format, ImageFormat::Iso);
    assert_same(&src, "raw", &out);
}

/// Needs the qcow2 streamer (another helper's module).
#[test]
fn gzip_qcow2_streams_to_the_same_disk() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = make_qcow2(dir.path(), "disk.qcow2");
    let gz = gzip_file(&q);
    let out = dir.path().join("disk.img");
    let r = stream_file(&gz, &out, &ConvertOptions::default()).unwrap();
    assert_eq!(r.format, ImageFormat::Qcow2);
    assert_eq!(r.virtual_size, 64 * MIB as u64);
    assert!(r.streamed);
    assert_same(&q, "qcow2", &out);
}

/// Compressed clusters inside a zstd-compressed file; needs the qcow2 streamer.
#[test]
fn zstd_of_compressed_qcow2_streams_to_the_same_disk() {
    let Some((dir, raw)) = with_raw(16 * MIB, &[(MIB, 2 * MIB), (9 * MIB, 4096)]) else {
        return;
    };
    let q = dir.path().join("c.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2"], &[&raw, &q]);
    let zst = dir.path().join("c.qcow2.zst");
    std::fs::write(&zst, zstd(&std::fs::read(&q).unwrap())).unwrap();
    let out = dir.path().join("c.img");
    stream_file(&zst, &out, &ConvertOptions::default()).unwrap();
    assert_same(&q, "qcow2", &out);
}

/// A qcow2 overlay converted in place with its backing file allowed; needs qcow2::open.
#[test]
fn local_qcow2_with_allowed_backing_file_matches() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_qcow2(dir.path(), "base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
        ],
        &[&top],
    );
    qemu_io(&top, "qcow2", &["write -P 0x44 512k 1M"]);
    let out = dir.path().join("top.img");
    let opts = ConvertOptions {
        backing: BackingPolicy::AllowRelativeTo(dir.path().to_path_buf()),
        ..Default::default()
    };
    let r = convert_file(&top, &out, &opts).unwrap();
    assert!(!r.streamed);
    assert_same(&top, "qcow2", &out);
}

/// Fixed VHD from a stream: the 512-byte footer is held back and dropped; as a local file it
/// is opened in place. With and without qemu's CHS rounding of the size.
#[test]
fn fixed_vhd_stream_drops_the_footer_and_file_opens_in_place() {
    let Some((dir, raw)) = with_raw(8 * MIB, &[(0, 4096), (5 * MIB, 70_000)]) else {
        return;
    };
    for (name, opts) in [
        ("forced", "subformat=fixed,force_size=on"),
        ("chs", "subformat=fixed"),
    ] {
        let vhd = dir.path().join(format!("{name}.vhd"));
        qemu_img(&["convert", "-O", "vpc", "-o", opts], &[&raw, &vhd]);
        let disk_len = std::fs::metadata(&vhd).unwrap().len() - 512;

        let out = dir.path().join(format!("{name}.stream.img"));
        let r = stream_file(&vhd, &out, &ConvertOptions::default()).unwrap();
        assert_eq!(r.format, ImageFormat::Vhd, "{name}");
        assert!(r.streamed, "{name}");
        assert_same(&vhd, "vpc", &out);
        assert_eq!(std::fs::metadata(&out).unwrap().len(), disk_len, "{name}");

        let out = dir.path().join(format!("{name}.file.img"));
        let r = convert_file(&vhd, &out, &ConvertOptions::default()).unwrap();
        assert_eq!(r.format, ImageFormat::Vhd, "{name}");
        assert!(!r.streamed, "{name}");
        assert_same(&vhd, "vpc", &out);
    }
}

/// Dynamic VHD from a stream is spooled to scratch (removed afterwards). Needs vhd::open.
#[test]
fn dynamic_vhd_stream_spools_to_scratch() {
    let Some((dir, raw)) = with_raw(8 * MIB, &[(MIB, 4096), (6 * MIB, 70_000)]) else {
        return;
    };
    let vhd = dir.path().join("dyn.vhd");
    qemu_img(&["convert", "-O", "vpc"], &[&raw, &vhd]);
    let out = dir.path().join("dyn.img");
    let r = stream_spooled(&vhd, &out, dir.path(), "scratch");
    assert_eq!(r.format, ImageFormat::Vhd);
    assert_same(&vhd, "vpc", &out);
}

/// Every random-access format: opened in place as a local file, spooled to scratch from a
/// gzip stream; sparse VMDK streams; a VMDK descriptor with a flat extent opens by
/// path. `probe_path` reports the virtual size for each.
#[test]
fn random_access_formats_convert_in_place_and_from_streams() {
    let Some((dir, raw)) = with_raw(
        12 * MIB,
        &[(0, 4096), (3 * MIB + 512, 200_000), (11 * MIB, MIB)],
    ) else {
        return;
    };
    let cases: &[(&str, &str, &[&str], bool)] = &[
        ("vdi", "vdi", &[], false),
        ("vhdx", "vhdx", &[], false),
        // monolithicSparse has its grain tables before the grains: the vmdk streamer takes it.
        ("sparse.vmdk", "vmdk", &[], true),
    ];
    for &(name, fmt, extra, streamable) in cases {
        let img = dir.path().join(name);
        let mut args = vec!["convert", "-O", fmt];
        args.extend_from_slice(extra);
        qemu_img(&args, &[&raw, &img]);

        let info = cdi_formats::probe_path(&img).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.format.virtual_size, Some(12 * MIB as u64), "{name}");
        assert_eq!(info.needs_scratch, !streamable, "{name}");

        let out = dir.path().join(format!("{name}.file.img"));
        convert_file(&img, &out, &ConvertOptions::default())
            .unwrap_or_else(|e| panic!("{name} in place: {e}"));
        assert_same(&img, fmt, &out);

        let gz = gzip_file(&img);
        let out = dir.path().join(format!("{name}.stream.img"));
        let err = stream_file(&gz, &out, &ConvertOptions::default());
        if streamable {
            let r = err.unwrap_or_else(|e| panic!("{name} stream: {e}"));
            assert!(r.streamed && r.scratch_bytes == 0, "{name}: {r:?}");
        } else {
            assert_eq!(
                err.unwrap_err().kind(),
                cdi_formats::ErrorKind::ScratchSpaceRequired,
                "{name}"
            );
            stream_spooled(&gz, &out, dir.path(), &format!("{name}.scratch"));
        }
        assert_same(&img, fmt, &out);
    }

    // A descriptor naming a flat extent: only the local-file path can open its extent.
    let flat = dir.path().join("flat.vmdk");
    qemu_img(
        &["convert", "-O", "vmdk", "-o", "subformat=monolithicFlat"],
        &[&raw, &flat],
    );
    let info = cdi_formats::probe_path(&flat).unwrap();
    assert_eq!(info.format.virtual_size, Some(12 * MIB as u64));
    let out = dir.path().join("flat.img");
    let r = convert_file(&flat, &out, &ConvertOptions::default()).unwrap();
    assert_eq!(r.format, ImageFormat::Vmdk);
    assert_same(&flat, "vmdk", &out);
}

/// A streamOptimized VMDK as qemu-img writes it (tables near the start, no end-of-stream
/// marker): in place from a file, and streamed from gzip.
#[test]
fn qemu_stream_optimized_vmdk_converts_in_place_and_streamed() {
    // Incompressible data so the last grain ends mid-sector, as with real disks.
    let Some((dir, raw)) = with_raw(20 * MIB, &[(0, 3_000_000), (10 * MIB, MIB)]) else {
        return;
    };
    let img = dir.path().join("s.vmdk");
    qemu_img(
        &["convert", "-O", "vmdk", "-o", "subformat=streamOptimized"],
        &[&raw, &img],
    );
    let out = dir.path().join("s.file.img");
    convert_file(&img, &out, &ConvertOptions::default()).unwrap();
    assert_same(&img, "vmdk", &out);

    let gz = gzip_file(&img);
    let out = dir.path().join("s.stream.img");
    let r = stream_file(&gz, &out, &ConvertOptions::default()).unwrap();
    assert!(r.streamed);
    assert_same(&img, "vmdk", &out);
}
