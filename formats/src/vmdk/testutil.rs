//! Test helpers shared by the vmdk, vhd, vhdx and vdi tests: a qemu-img oracle, a raw fixture
//! with data, patterns and holes, a full read through `DiskImage`, and a sink that checks every
//! guest byte is reported exactly once.

use std::path::Path;
use std::process::Command;

use crate::error::Result;
use crate::image::{DiskImage, ExtentKind, ExtentSink};

/// True when `qemu-img` runs; otherwise prints the skip line the test policy asks for.
pub(crate) fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("SKIPPED: qemu-img is not installed");
    }
    ok
}

/// Run `qemu-img` with `args`, panicking with its stderr on failure.
pub(crate) fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Convert `image` (format `fmt`) to raw with qemu-img and return the bytes.
pub(crate) fn qemu_raw(image: &Path, fmt: &str) -> Vec<u8> {
    let out = image.with_extension("oracle.raw");
    qemu_img(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        image.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

/// Deterministic pseudo-random bytes (xorshift64), so failures reproduce.
fn noise(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for b in buf {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
}

/// Size of the standard fixture: 20 MiB plus 12 KiB, so it is not a multiple of any grain,
/// block or cluster size.
pub(crate) const MIXED_SIZE: u64 = (20 << 20) + (12 << 10);

/// Write a raw image of [`MIXED_SIZE`] with random runs, repeated patterns and zero gaps,
/// with boundaries that are not block aligned.
pub(crate) fn write_mixed_raw(path: &Path) {
    let size = MIXED_SIZE as usize;
    let mut data = vec![0u8; size];
    let mib = 1 << 20;
    // (start, len, what): 0 = random, otherwise a repeated byte.
    let runs: &[(usize, usize, u8)] = &[
        (0, mib, 0),
        (3 * mib, 100_000, 0xab),
        (5 * mib + 4096, 2 * mib + 12_345, 0),
        (9 * mib + 512, 512, 0x11),
        (12 * mib, 3 * mib, 0),
        (16 * mib + 70_000, 1_000, 0x5a),
        (size - 8192, 8192, 0),
    ];
    for (i, &(start, len, what)) in runs.iter().enumerate() {
        let piece = &mut data[start..start + len];
        if what == 0 {
            noise(piece, 0x9e37_79b9_7f4a_7c15 ^ i as u64);
        } else {
            piece.fill(what);
        }
    }
    std::fs::write(path, data).unwrap();
}

/// Read the whole disk through `extent` and `read_exact_at`, with odd lengths so run and read
/// boundaries fall inside grains and blocks. Zero runs are checked against the data too.
pub(crate) fn read_all(img: &mut dyn DiskImage) -> Result<Vec<u8>> {
    let size = usize::try_from(img.virtual_size()).unwrap();
    let mut out = vec![0u8; size];
    let mut pos = 0u64;
    while (pos as usize) < size {
        let ext = img.extent(pos, 3 * (1 << 20) + 512)?;
        assert!(ext.len > 0, "extent at {pos} has length 0");
        let end = (pos + ext.len) as usize;
        if ext.kind == ExtentKind::Data {
            let mut at = pos as usize;
            while at < end {
                let n = (end - at).min(777_777);
                img.read_exact_at(&mut out[at..at + n], at as u64)?;
                at += n;
            }
        }
        pos = end as u64;
    }
    Ok(out)
}

/// A sink that keeps the guest bytes and fails on any byte reported twice or never.
#[derive(Default)]
pub(crate) struct CheckingSink {
    pub size: Option<u64>,
    data: Vec<u8>,
    seen: Vec<bool>,
}

impl CheckingSink {
    fn mark(&mut self, offset: u64, len: u64) {
        let start = offset as usize;
        let end = start + len as usize;
        assert!(
            end <= self.seen.len(),
            "range {start}..{end} is past the disk end {}",
            self.seen.len()
        );
        let first_dup = self.seen[start..end].iter().position(|s| *s);
        assert!(
            first_dup.is_none(),
            "byte {} reported twice",
            start + first_dup.unwrap_or(0)
        );
        self.seen[start..end].fill(true);
    }

    /// The disk, after checking every byte was reported.
    pub(crate) fn finish(self) -> Vec<u8> {
        let missing = self.seen.iter().position(|s| !*s);
        assert!(
            missing.is_none(),
            "byte {} was never reported",
            missing.unwrap_or(0)
        );
        self.data
    }
}

impl ExtentSink for CheckingSink {
    fn begin(&mut self, virtual_size: Option<u64>) -> Result<()> {
        assert!(self.size.is_none(), "begin called twice");
        let size = virtual_size.expect("size known up front");
        self.size = Some(size);
        self.data = vec![0u8; size as usize];
        self.seen = vec![false; size as usize];
        Ok(())
    }

    fn data(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.mark(offset, buf.len() as u64);
        self.data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.mark(offset, len);
        Ok(())
    }
}

/// Compare two disks and name the first differing byte instead of dumping megabytes.
pub(crate) fn assert_same_disk(ours: &[u8], oracle: &[u8]) {
    assert_eq!(ours.len(), oracle.len(), "disk sizes differ");
    let diff = ours.iter().zip(oracle).position(|(a, b)| a != b);
    assert!(
        diff.is_none(),
        "disks differ first at byte {}",
        diff.unwrap_or(0)
    );
}

/// Walk up to 256 extents (and read up to 64 KiB of each) of an image that may be hostile,
/// without assuming its claimed size fits in memory. Errors are fine; panics and zero-length
/// runs inside the disk are not.
pub(crate) fn exercise(img: &mut dyn DiskImage) {
    let size = img.virtual_size();
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0u64;
    for _ in 0..256 {
        if pos >= size {
            return;
        }
        let Ok(ext) = img.extent(pos, 1 << 20) else {
            return;
        };
        assert!(
            ext.len > 0 && ext.len <= 1 << 20,
            "bad run length {} at {pos}",
            ext.len
        );
        let n = ext.len.min(buf.len() as u64) as usize;
        let _ = img.read_exact_at(&mut buf[..n], pos);
        pos += ext.len;
    }
}

/// A sink for hostile streams: checks every report lies inside the announced size, keeps
/// nothing.
#[derive(Default)]
pub(crate) struct BoundsSink {
    size: Option<u64>,
}

impl ExtentSink for BoundsSink {
    fn begin(&mut self, virtual_size: Option<u64>) -> Result<()> {
        self.size = virtual_size;
        Ok(())
    }

    fn data(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.zero(offset, buf.len() as u64)
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        let size = self.size.expect("begin before data");
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= size),
            "{offset}+{len} past {size}"
        );
        Ok(())
    }
}
