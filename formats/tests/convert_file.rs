//! Conversion into file targets: holes, sizes, compression chains, tar, preallocation, errors.

mod core_support;

use std::fs::File;
use std::path::Path;

use cdi_formats::{
    Compression, ConvertOptions, ConvertReport, ErrorKind, FileTarget, ImageFormat, Preallocation,
    Result, convert_path, convert_reader, open_target,
};
use core_support::*;

const MIB: usize = 1 << 20;

fn convert_bytes(bytes: &[u8], dst: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    let mut target = FileTarget::create(dst).unwrap();
    // Through `&mut dyn Read`, as stdin or an HTTP body arrives.
    let mut input: &[u8] = bytes;
    convert_reader(&mut input, &mut target, opts)
}

#[test]
fn raw_stream_with_zero_runs_produces_holes() {
    let dir = tempfile::tempdir().unwrap();
    let regions = [
        (0, 3 * 4096),
        (5 * MIB, MIB),
        (17 * MIB + 4096, 8192),
        (31 * MIB, MIB),
    ];
    let img = sparse_image(32 * MIB, &regions);
    let dst = dir.path().join("disk.img");
    let report = convert_bytes(&img, &dst, &ConvertOptions::default()).unwrap();

    assert_eq!(std::fs::read(&dst).unwrap(), img);
    let needed: u64 = regions.iter().map(|&(_, l)| l as u64).sum();
    assert_eq!(report.data_bytes, needed);
    assert_eq!(report.zero_bytes, img.len() as u64 - needed);
    assert_eq!(report.virtual_size, img.len() as u64);
    assert_eq!(report.target_size, img.len() as u64);
    assert_eq!(report.input_bytes, img.len() as u64);
    assert!(report.streamed);
    assert_eq!(report.format, ImageFormat::Raw);
    // The file system may round up to its block size, but never allocates the zero runs.
    let alloc = allocated(&dst);
    assert!(
        alloc >= needed && alloc <= needed + 64 * 1024,
        "allocated {alloc} bytes for {needed} bytes of data"
    );
}

#[test]
fn empty_and_tiny_raw_inputs_are_valid_disks() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("empty.img");
    let r = convert_bytes(&[], &dst, &ConvertOptions::default()).unwrap();
    assert_eq!((r.virtual_size, r.target_size), (0, 0));
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 0);

    let opts = ConvertOptions {
        target_size: Some(MIB as u64),
        ..Default::default()
    };
    let r = convert_bytes(b"boot", &dst, &opts).unwrap();
    assert_eq!((r.virtual_size, r.target_size), (4, MIB as u64));
    let out = std::fs::read(&dst).unwrap();
    assert_eq!(out.len(), MIB);
    assert_eq!(&out[..4], b"boot");
    assert!(out[4..].iter().all(|&b| b == 0));
}

#[test]
fn compression_chains_and_tar_are_unwrapped() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(3 * MIB + 512, &[(4096, 70_000), (2 * MIB, 5000)]);
    let in_tar = tar(&[
        ("./", None),
        ("./images/", None),
        ("./images/disk.img", Some(&img)),
    ]);
    let cases: Vec<(&str, Vec<u8>, Vec<Compression>, bool)> = vec![
        ("raw.gz", gzip(&img), vec![Compression::Gzip], false),
        ("raw.xz", xz(&img), vec![Compression::Xz], false),
        ("raw.zst", zstd(&img), vec![Compression::Zstd], false),
        ("raw.bz2", bzip2(&img), vec![Compression::Bzip2], false),
        (
            "raw.gz.xz",
            xz(&gzip(&img)),
            vec![Compression::Xz, Compression::Gzip],
            false,
        ),
        ("img.tar", in_tar.clone(), vec![], true),
        ("img.tar.gz", gzip(&in_tar), vec![Compression::Gzip], true),
        ("img.tar.xz", xz(&in_tar), vec![Compression::Xz], true),
        (
            "tar of img.zst",
            tar(&[("d.zst", Some(&zstd(&img)))]),
            vec![Compression::Zstd],
            true,
        ),
    ];
    for (name, bytes, chain, from_tar) in cases {
        let dst = dir.path().join(format!("{name}.out"));
        let r = convert_bytes(&bytes, &dst, &ConvertOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(std::fs::read(&dst).unwrap(), img, "{name}");
        assert_eq!(r.compression, chain, "{name}");
        assert_eq!(r.from_tar, from_tar, "{name}");
        assert_eq!(r.input_bytes, bytes.len() as u64, "{name}");
        assert_eq!(r.virtual_size, img.len() as u64, "{name}");
    }
}

#[test]
fn too_many_compression_layers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = b"disk".to_vec();
    for _ in 0..5 {
        bytes = gzip(&bytes);
    }
    let err = convert_bytes(&bytes, &dir.path().join("o"), &ConvertOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LimitExceeded, "{err}");
}

#[test]
fn truncated_compressed_input_fails() {
    let dir = tempfile::tempdir().unwrap();
    let img = random_bytes(2 * MIB, 7);
    for (name, full) in [
        ("gz", gzip(&img)),
        ("xz", xz(&img)),
        ("tar", tar(&[("d", Some(&img))])),
    ] {
        // Cut inside the compressed data or the tar entry (not just tar's end padding).
        let cut = &full[..full.len() - 20_000];
        let err =
            convert_bytes(cut, &dir.path().join(name), &ConvertOptions::default()).unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::Truncated | ErrorKind::Corrupt),
            "{name}: {err} ({:?})",
            err.kind()
        );
    }
}

#[test]
fn target_too_small_is_refused_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, random_bytes(3 * MIB, 3)).unwrap();
    let dst = dir.path().join("dst.img");
    let mut target = open_target(&dst).unwrap();
    let opts = ConvertOptions {
        target_size: Some(2 * MIB as u64),
        ..Default::default()
    };
    // A local raw file has a known size: refused up front, nothing written.
    let err = convert_path(&src, target.as_mut(), &opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TargetTooSmall);
    assert_eq!(
        err.to_string(),
        format!(
            "virtual image size {} is larger than the reported available storage {}. A larger \
             PVC is required",
            3 * MIB,
            2 * MIB
        )
    );
    let meta = std::fs::metadata(&dst).unwrap();
    assert_eq!((meta.len(), allocated(&dst)), (0, 0));

    // A stream of unknown size fails as soon as data passes the target size.
    let err = convert_reader(&mut File::open(&src).unwrap(), target.as_mut(), &opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TargetTooSmall, "{err}");
    assert!(
        err.to_string().contains("A larger PVC is required"),
        "{err}"
    );
}

#[test]
fn convert_path_copies_raw_and_iso_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut iso = sparse_image(2 * MIB, &[(0x8000, 2048), (MIB, 4096)]);
    iso[0x8001..0x8006].copy_from_slice(b"CD001");
    let src = dir.path().join("cd.iso");
    std::fs::write(&src, &iso).unwrap();
    let dst = dir.path().join("cd.img");
    let mut target = open_target(&dst).unwrap();
    let r = convert_path(&src, target.as_mut(), &ConvertOptions::default()).unwrap();
    assert_eq!(r.format, ImageFormat::Iso);
    assert_eq!(r.input_bytes, iso.len() as u64);
    assert_eq!(std::fs::read(&dst).unwrap(), iso);
}

#[test]
fn preallocation_allocates_the_whole_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(8 * MIB, &[(MIB, 4096)]);
    let size = 12 * MIB as u64;
    for mode in [
        Preallocation::Fallocate,
        Preallocation::Full,
        Preallocation::Off,
    ] {
        let dst = dir.path().join(format!("{mode:?}.img"));
        let opts = ConvertOptions {
            preallocation: mode,
            target_size: Some(size),
            ..Default::default()
        };
        convert_bytes(&img, &dst, &opts).unwrap();
        let out = std::fs::read(&dst).unwrap();
        assert_eq!(out.len() as u64, size);
        assert_eq!(&out[..img.len()], &img[..]);
        assert!(out[img.len()..].iter().all(|&b| b == 0));
        let alloc = allocated(&dst);
        if mode == Preallocation::Off {
            assert!(alloc < MIB as u64, "{mode:?}: {alloc}");
        } else {
            assert!(
                alloc >= size,
                "{mode:?}: only {alloc} of {size} bytes allocated"
            );
        }
    }
}

#[test]
fn stream_of_random_access_format_needs_scratch() {
    let dir = tempfile::tempdir().unwrap();
    // Only the detection matters here: a VHD's "conectix" cookie at byte 0.
    let mut vhd = vec![0u8; 4096];
    vhd[..8].copy_from_slice(b"conectix");
    let err = convert_bytes(
        &gzip(&vhd),
        &dir.path().join("o"),
        &ConvertOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ScratchSpaceRequired);
    assert!(
        err.to_string()
            .starts_with("scratch space required: vhd images need random access"),
        "{err}"
    );
}

/// ENOSPC on the target is `NoSpace`. Needs a tmpfs mount (root); skipped otherwise.
#[test]
fn full_target_file_system_is_no_space() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("SKIPPED: cannot mount a tmpfs (needs root)");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&mnt);
    let img = random_bytes(4 * MIB, 11);
    let err = convert_bytes(&img, &mnt.join("disk.img"), &ConvertOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
}

#[test]
fn a_pipe_given_as_a_path_is_read_as_a_stream() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if !made.is_ok_and(|s| s.success()) {
        println!("SKIPPED: mkfifo not available");
        return;
    }
    let img = sparse_image(2 * MIB, &[(4096, 10_000)]);
    let gz = gzip(&img);
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::write(fifo, gz).unwrap())
    };
    let dst = dir.path().join("out.img");
    let mut target = open_target(&dst).unwrap();
    let r = convert_path(&fifo, target.as_mut(), &ConvertOptions::default()).unwrap();
    writer.join().unwrap();
    assert_eq!(r.compression, vec![Compression::Gzip]);
    assert_eq!(std::fs::read(&dst).unwrap(), img);
}

#[test]
fn vmdk_descriptor_from_a_stream_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let text = b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
createType=\"monolithicFlat\"\n\nRW 2048 FLAT \"disk-flat.vmdk\" 0\n";
    let opts = ConvertOptions {
        scratch_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let err = convert_bytes(text, &dir.path().join("o"), &opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("local path"), "{err}");
}
