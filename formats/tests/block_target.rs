//! Conversion onto a real block device: a loop device over a file in a temp directory.
//!
//! Needs root and a free loop device; prints `SKIPPED:` when `losetup` is refused.

mod core_support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cdi_formats::{
    BlockTarget, ConvertOptions, ErrorKind, Preallocation, Target, convert_path, convert_reader,
};
use core_support::*;

const MIB: usize = 1 << 20;
const GARBAGE: u8 = 0xaa;

/// A loop device detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    /// Attach `backing`; `None` when losetup is not allowed here.
    fn attach(backing: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .ok()?;
        if !out.status.success() {
            println!(
                "SKIPPED: losetup refused: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let dev = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
        Some(Loop { dev })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A device of `size` bytes full of garbage, so zero ranges must really be zeroed.
fn garbage_device(dir: &Path, size: usize) -> Option<Loop> {
    let backing = dir.join("backing.img");
    std::fs::write(&backing, vec![GARBAGE; size]).unwrap();
    Loop::attach(&backing)
}

#[test]
fn raw_stream_onto_block_device_zeroes_old_garbage_and_leaves_the_tail() {
    for prealloc in [Preallocation::Off, Preallocation::Full] {
        let dir = tempfile::tempdir().unwrap();
        let Some(lo) = garbage_device(dir.path(), 8 * MIB) else {
            return;
        };
        // 6 MiB image: data, a long zero run, data, an unaligned zero tail.
        let img = sparse_image(6 * MIB, &[(0, 8192), (4 * MIB + 512, 100_000)]);
        let mut target = BlockTarget::open(&lo.dev).unwrap();
        assert_eq!(target.fixed_size(), Some(8 * MIB as u64));
        let opts = ConvertOptions {
            preallocation: prealloc,
            ..Default::default()
        };
        let report = convert_reader(&mut &img[..], &mut target, &opts).unwrap();
        drop(target);
        assert_eq!(report.virtual_size, img.len() as u64);
        assert_eq!(report.target_size, 8 * MIB as u64);

        let dev = std::fs::read(&lo.dev).unwrap();
        assert_eq!(dev.len(), 8 * MIB);
        assert!(
            dev[..img.len()] == img[..],
            "{prealloc:?}: device differs from the image"
        );
        assert!(
            dev[img.len()..].iter().all(|&b| b == GARBAGE),
            "{prealloc:?}: the device tail beyond the image must be left alone"
        );
    }
}

#[test]
fn image_larger_than_device_is_refused_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let Some(lo) = garbage_device(dir.path(), 4 * MIB) else {
        return;
    };
    let src = dir.path().join("big.img");
    std::fs::write(&src, random_bytes(5 * MIB, 5)).unwrap();
    let mut target = BlockTarget::open(&lo.dev).unwrap();
    let err = convert_path(&src, &mut target, &ConvertOptions::default()).unwrap_err();
    drop(target);
    assert_eq!(err.kind(), ErrorKind::TargetTooSmall, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("reported available storage {}", 4 * MIB))
    );
    assert!(
        std::fs::read(&lo.dev)
            .unwrap()
            .iter()
            .all(|&b| b == GARBAGE),
        "device was written"
    );

    // A requested size beyond the device is refused as well.
    let mut target = BlockTarget::open(&lo.dev).unwrap();
    let opts = ConvertOptions {
        target_size: Some(5 * MIB as u64),
        ..Default::default()
    };
    let err = convert_reader(&mut &b"x"[..], &mut target, &opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TargetTooSmall, "{err}");
}

#[test]
fn block_device_is_opened_exclusively() {
    let dir = tempfile::tempdir().unwrap();
    let Some(lo) = garbage_device(dir.path(), MIB) else {
        return;
    };
    let first = BlockTarget::open(&lo.dev).unwrap();
    let second = BlockTarget::open(&lo.dev);
    assert!(
        second.is_err(),
        "a second O_EXCL open of the device must fail"
    );
    drop(first);
}

#[test]
fn write_zeroes_handles_unaligned_edges() {
    let dir = tempfile::tempdir().unwrap();
    let Some(lo) = garbage_device(dir.path(), MIB) else {
        return;
    };
    let mut target = BlockTarget::open(&lo.dev).unwrap();
    target.write_zeroes(100, 70_000).unwrap();
    // Loop devices implement BLKZEROOUT; a wrong request number would show up as a fallback.
    assert!(
        target.zeroes_by_ioctl(),
        "BLKZEROOUT was refused by the loop device"
    );
    target.finish(MIB as u64, Preallocation::Off).unwrap();
    drop(target);
    let dev = std::fs::read(&lo.dev).unwrap();
    assert!(dev[..100].iter().all(|&b| b == GARBAGE));
    assert!(dev[100..70_100].iter().all(|&b| b == 0));
    assert!(dev[70_100..].iter().all(|&b| b == GARBAGE));
    // A range past the end of the device is an error, not a silent short write.
    let mut target = BlockTarget::open(&lo.dev).unwrap();
    assert!(target.write_zeroes(MIB as u64 - 10, 20).is_err());
    let mut one = [0u8; 1];
    File::open(&lo.dev)
        .unwrap()
        .read_exact_at(&mut one, MIB as u64 - 1)
        .unwrap();
    assert_eq!(one[0], GARBAGE);
}
