//! qemu-img as the oracle: what we convert must compare equal (`qemu-img compare`) to the
//! source image, through the streaming and the random-access paths.
//!
//! Skips with `SKIPPED:` when qemu-img/qemu-io are missing (CI installs qemu-utils).

mod core_support;

use std::fs::File;
use std::path::Path;
use std::process::Command;

use cdi_formats::{
    BackingPolicy, ConvertOptions, ConvertReport, FileTarget, ImageFormat, Result, convert_path,
    convert_reader,
};
use core_support::*;

const MIB: usize = 1 << 20;

fn tools() -> bool {
    if have("qemu-img") && have("qemu-io") {
        return true;
    }
    println!("SKIPPED: qemu-img/qemu-io not installed");
    false
}

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

fn qemu_io(image: &Path, fmt: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(image));
}

/// A qcow2 image with data, a zero-flagged range and unallocated space.
fn make_qcow2(dir: &Path, name: &str, extra: &[&str]) -> std::path::PathBuf {
    let path = dir.join(name);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .args(extra)
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
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(
        40 * MIB,
        &[(0, 4096), (7 * MIB + 512, 300_000), (39 * MIB, MIB)],
    );
    let src = dir.path().join("src.raw");
    std::fs::write(&src, &img).unwrap();

    let ours = dir.path().join("ours.img");
    let r = stream_file(&src, &ours, &ConvertOptions::default()).unwrap();
    assert_eq!(r.format, ImageFormat::Raw);
    assert_same(&src, "raw", &ours);

    // Our holes are at least as good as qemu-img's default (-S 4k) sparseness.
    let theirs = dir.path().join("theirs.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&theirs));
    let (a, b) = (allocated(&ours), allocated(&theirs));
    assert!(a <= b + 64 * 1024, "we allocated {a} bytes, qemu-img {b}");

    // The same through the local-file path.
    let ours2 = dir.path().join("ours2.img");
    let mut target = FileTarget::create(&ours2).unwrap();
    convert_path(&src, &mut target, &ConvertOptions::default()).unwrap();
    assert_same(&src, "raw", &ours2);
}

#[test]
fn iso_passthrough_matches_qemu_img() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut iso = sparse_image(3 * MIB, &[(0x8000, 2048), (0x9000, 8192), (2 * MIB, 65536)]);
    iso[0x8000] = 1;
    iso[0x8001..0x8006].copy_from_slice(b"CD001");
    let src = dir.path().join("cd.iso");
    std::fs::write(&src, &iso).unwrap();
    let gz = dir.path().join("cd.iso.gz");
    std::fs::write(&gz, gzip(&iso)).unwrap();
    let out = dir.path().join("cd.img");
    let r = stream_file(&gz, &out, &ConvertOptions::default()).unwrap();
    assert_eq!(r.format, ImageFormat::Iso);
    assert_same(&src, "raw", &out);
}

/// Needs the qcow2 streamer (another helper's module).
#[test]
fn gzip_qcow2_streams_to_the_same_disk() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = make_qcow2(dir.path(), "disk.qcow2", &[]);
    let gz = dir.path().join("disk.qcow2.gz");
    std::fs::write(&gz, gzip(&std::fs::read(&q).unwrap())).unwrap();
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
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    std::fs::write(
        &raw,
        sparse_image(16 * MIB, &[(MIB, 2 * MIB), (9 * MIB, 4096)]),
    )
    .unwrap();
    let q = dir.path().join("c.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-c", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q));
    let zst = dir.path().join("c.qcow2.zst");
    std::fs::write(&zst, zstd(&std::fs::read(&q).unwrap())).unwrap();
    let out = dir.path().join("c.img");
    stream_file(&zst, &out, &ConvertOptions::default()).unwrap();
    assert_same(&q, "qcow2", &out);
}

/// A qcow2 overlay converted in place with its backing file allowed; needs qcow2::open.
#[test]
fn local_qcow2_with_allowed_backing_file_matches() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_qcow2(dir.path(), "base.qcow2", &[]);
    let top = dir.path().join("top.qcow2");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
        ])
        .arg(&top));
    qemu_io(&top, "qcow2", &["write -P 0x44 512k 1M"]);
    let out = dir.path().join("top.img");
    let mut target = FileTarget::create(&out).unwrap();
    let opts = ConvertOptions {
        backing: BackingPolicy::AllowRelativeTo(dir.path().to_path_buf()),
        ..Default::default()
    };
    let r = convert_path(&top, &mut target, &opts).unwrap();
    assert!(!r.streamed);
    assert_same(&top, "qcow2", &out);
}

/// Fixed VHD from a stream: the 512-byte footer is held back and dropped; as a local file it
/// is opened in place. With and without qemu's CHS rounding of the size.
#[test]
fn fixed_vhd_stream_drops_the_footer_and_file_opens_in_place() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, sparse_image(8 * MIB, &[(0, 4096), (5 * MIB, 70_000)])).unwrap();
    for (name, opts) in [
        ("forced", "subformat=fixed,force_size=on"),
        ("chs", "subformat=fixed"),
    ] {
        let vhd = dir.path().join(format!("{name}.vhd"));
        run(Command::new("qemu-img")
            .args(["convert", "-O", "vpc", "-o", opts])
            .arg(&raw)
            .arg(&vhd));
        let disk_len = std::fs::metadata(&vhd).unwrap().len() - 512;

        let out = dir.path().join(format!("{name}.stream.img"));
        let r = stream_file(&vhd, &out, &ConvertOptions::default()).unwrap();
        assert_eq!(r.format, ImageFormat::Vhd, "{name}");
        assert!(r.streamed, "{name}");
        assert_same(&vhd, "vpc", &out);
        assert_eq!(std::fs::metadata(&out).unwrap().len(), disk_len, "{name}");

        let out = dir.path().join(format!("{name}.file.img"));
        let mut target = FileTarget::create(&out).unwrap();
        let r = convert_path(&vhd, &mut target, &ConvertOptions::default()).unwrap();
        assert_eq!(r.format, ImageFormat::Vhd, "{name}");
        assert!(!r.streamed, "{name}");
        assert_same(&vhd, "vpc", &out);
    }
}

/// Dynamic VHD from a stream is spooled to scratch (removed afterwards). Needs vhd::open.
#[test]
fn dynamic_vhd_stream_spools_to_scratch() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    std::fs::write(
        &raw,
        sparse_image(8 * MIB, &[(MIB, 4096), (6 * MIB, 70_000)]),
    )
    .unwrap();
    let vhd = dir.path().join("dyn.vhd");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "vpc"])
        .arg(&raw)
        .arg(&vhd));
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let out = dir.path().join("dyn.img");
    let opts = ConvertOptions {
        scratch_dir: Some(scratch.clone()),
        ..Default::default()
    };
    let r = stream_file(&vhd, &out, &opts).unwrap();
    assert_eq!(r.format, ImageFormat::Vhd);
    assert!(!r.streamed && r.scratch_bytes > 0, "{r:?}");
    assert_same(&vhd, "vpc", &out);
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "scratch file left behind"
    );
}

/// Every random-access format: opened in place as a local file, spooled to scratch from a
/// gzip stream; sparse VMDK streams; a VMDK descriptor with a flat extent opens by
/// path. `probe_path` reports the virtual size for each.
#[test]
fn random_access_formats_convert_in_place_and_from_streams() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    std::fs::write(
        &raw,
        sparse_image(
            12 * MIB,
            &[(0, 4096), (3 * MIB + 512, 200_000), (11 * MIB, MIB)],
        ),
    )
    .unwrap();
    let cases: &[(&str, &str, &[&str], bool)] = &[
        ("vdi", "vdi", &[], false),
        ("vhdx", "vhdx", &[], false),
        // monolithicSparse has its grain tables before the grains: the vmdk streamer takes it.
        ("sparse.vmdk", "vmdk", &[], true),
    ];
    for &(name, fmt, extra, streamable) in cases {
        let img = dir.path().join(name);
        run(Command::new("qemu-img")
            .args(["convert", "-O", fmt])
            .args(extra)
            .arg(&raw)
            .arg(&img));

        let info = cdi_formats::probe_path(&img).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.format.virtual_size, Some(12 * MIB as u64), "{name}");
        assert_eq!(info.needs_scratch, !streamable, "{name}");

        let out = dir.path().join(format!("{name}.file.img"));
        let mut target = FileTarget::create(&out).unwrap();
        convert_path(&img, &mut target, &ConvertOptions::default())
            .unwrap_or_else(|e| panic!("{name} in place: {e}"));
        assert_same(&img, fmt, &out);

        let gz = dir.path().join(format!("{name}.gz"));
        std::fs::write(&gz, gzip(&std::fs::read(&img).unwrap())).unwrap();
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
            let scratch = dir.path().join(format!("{name}.scratch"));
            std::fs::create_dir(&scratch).unwrap();
            let opts = ConvertOptions {
                scratch_dir: Some(scratch.clone()),
                ..Default::default()
            };
            let r = stream_file(&gz, &out, &opts).unwrap_or_else(|e| panic!("{name} spool: {e}"));
            assert!(!r.streamed && r.scratch_bytes > 0, "{name}: {r:?}");
            assert_eq!(
                std::fs::read_dir(&scratch).unwrap().count(),
                0,
                "{name}: scratch left"
            );
        }
        assert_same(&img, fmt, &out);
    }

    // A descriptor naming a flat extent: only the local-file path can open its extent.
    let flat = dir.path().join("flat.vmdk");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "vmdk", "-o", "subformat=monolithicFlat"])
        .arg(&raw)
        .arg(&flat));
    let info = cdi_formats::probe_path(&flat).unwrap();
    assert_eq!(info.format.virtual_size, Some(12 * MIB as u64));
    let out = dir.path().join("flat.img");
    let mut target = FileTarget::create(&out).unwrap();
    let r = convert_path(&flat, &mut target, &ConvertOptions::default()).unwrap();
    assert_eq!(r.format, ImageFormat::Vmdk);
    assert_same(&flat, "vmdk", &out);
}

/// A streamOptimized VMDK as qemu-img writes it (tables near the start, no end-of-stream
/// marker): in place from a file, and streamed from gzip.
#[test]
fn qemu_stream_optimized_vmdk_converts_in_place_and_streamed() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    // Incompressible data so the last grain ends mid-sector, as with real disks.
    let data = sparse_image(20 * MIB, &[(0, 3_000_000), (10 * MIB, MIB)]);
    std::fs::write(&raw, data).unwrap();
    let img = dir.path().join("s.vmdk");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "vmdk", "-o", "subformat=streamOptimized"])
        .arg(&raw)
        .arg(&img));
    let out = dir.path().join("s.file.img");
    let mut target = FileTarget::create(&out).unwrap();
    convert_path(&img, &mut target, &ConvertOptions::default()).unwrap();
    assert_same(&img, "vmdk", &out);

    let gz = dir.path().join("s.vmdk.gz");
    std::fs::write(&gz, gzip(&std::fs::read(&img).unwrap())).unwrap();
    let out = dir.path().join("s.stream.img");
    let r = stream_file(&gz, &out, &ConvertOptions::default()).unwrap();
    assert!(r.streamed);
    assert_same(&img, "vmdk", &out);
}
