//! Helpers shared by the format modules' unit tests: qemu-img/qemu-io as the oracle, a raw
//! fixture with data, patterns and holes, whole-disk reads through [`DiskImage`], sinks that
//! check the [`ExtentSink`] contract, and a runner for table-driven cases.
//!
//! Integration tests (`formats/tests/`) cannot see this module; they share
//! `formats/tests/core_support` instead.

use std::collections::BTreeMap;
use std::io::Read;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::image::{DiskImage, ExtentKind, ExtentSink, OpenOptions, StreamContext};
use crate::read_at::ReadAt;

/// A format's random-access entry point (`vhd::open`, `qcow2::open`, ...).
pub(crate) type OpenFn = fn(Arc<dyn ReadAt>, &OpenOptions) -> Result<Box<dyn DiskImage>>;

/// A format's one-pass entry point (`vmdk::stream`, `qcow2::stream`).
pub(crate) type StreamFn = fn(&mut dyn Read, &mut dyn ExtentSink, &mut StreamContext) -> Result<()>;

// ---------------------------------------------------------------------------------------------
// External tools.

/// True when every tool in `tools` runs; otherwise prints the skip line the test policy asks
/// for, naming the first missing one.
pub(crate) fn have_tools(tools: &[&str]) -> bool {
    for tool in tools {
        let runs = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !runs {
            println!("SKIPPED: {tool} is not installed");
            return false;
        }
    }
    true
}

/// Run `cmd`, panicking with its output when it fails.
pub(crate) fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `qemu-img` with `args`.
pub(crate) fn qemu_img(args: &[&str]) {
    run(Command::new("qemu-img").args(args));
}

/// Run `qemu-io -f fmt -c <cmd>...` on `image`.
pub(crate) fn qemu_io<S: AsRef<str>>(image: &Path, fmt: &str, cmds: &[S]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", fmt]);
    for c in cmds {
        cmd.arg("-c").arg(c.as_ref());
    }
    run(cmd.arg(image));
}

/// A temp path as a tool argument.
pub(crate) fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// Write `raw` to `dir/src.raw` and convert it with `qemu-img convert -O fmt <options>` to
/// `dir/name`.
pub(crate) fn qemu_convert(
    dir: &Path,
    raw: &[u8],
    fmt: &str,
    options: &[&str],
    name: &str,
) -> PathBuf {
    let src = dir.join("src.raw");
    std::fs::write(&src, raw).unwrap();
    let out = dir.join(name);
    let mut args = vec!["convert", "-f", "raw", "-O", fmt];
    args.extend_from_slice(options);
    args.extend([p(&src), p(&out)]);
    qemu_img(&args);
    out
}

/// The oracle: `image` (format `fmt`) converted to raw by qemu-img.
pub(crate) fn qemu_raw(image: &Path, fmt: &str) -> Vec<u8> {
    let out = image.with_extension("oracle.raw");
    qemu_img(&["convert", "-f", fmt, "-O", "raw", p(image), p(&out)]);
    std::fs::read(out).unwrap()
}

/// Read `image` through `open` and compare it with qemu-img's raw conversion; returns ours.
pub(crate) fn assert_reads_like_qemu(open: OpenFn, image: &Path, fmt: &str) -> Vec<u8> {
    let ours = read_all(&mut *open_file(open, image).unwrap()).unwrap();
    assert_same_disk(&ours, &qemu_raw(image, fmt));
    ours
}

/// Stream `image` through `stream` and compare it with qemu-img's raw conversion.
pub(crate) fn assert_streams_like_qemu(stream: StreamFn, image: &Path, fmt: &str) {
    let mut input = std::io::BufReader::new(std::fs::File::open(image).unwrap());
    let ours = stream_to_vec(stream, &mut input, &mut StreamContext::new(None)).unwrap();
    assert_same_disk(&ours, &qemu_raw(image, fmt));
}

/// [`mixed_raw`] converted by qemu-img to `fmt` with `options`, read through `open` and
/// compared with qemu-img's raw conversion; returns ours. `None` (after the skip line) without
/// qemu-img.
pub(crate) fn mixed_reads_like_qemu(open: OpenFn, fmt: &str, options: &[&str]) -> Option<Vec<u8>> {
    if !have_tools(&["qemu-img"]) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_mixed(dir.path(), fmt, options, &format!("img.{fmt}"));
    Some(assert_reads_like_qemu(open, &image, fmt))
}

/// Like [`mixed_reads_like_qemu`], through the one-pass `stream`.
pub(crate) fn mixed_streams_like_qemu(stream: StreamFn, fmt: &str, options: &[&str]) {
    if !have_tools(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_mixed(dir.path(), fmt, options, &format!("img.{fmt}"));
    assert_streams_like_qemu(stream, &image, fmt);
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

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

/// A raw disk of [`MIXED_SIZE`] with random runs, repeated patterns and zero gaps, with
/// boundaries that are not block aligned.
pub(crate) fn mixed_raw() -> Vec<u8> {
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
    data
}

/// [`mixed_raw`] converted by qemu-img to `fmt` with `options`, at `dir/name`.
pub(crate) fn qemu_mixed(dir: &Path, fmt: &str, options: &[&str], name: &str) -> PathBuf {
    qemu_convert(dir, &mixed_raw(), fmt, options, name)
}

// ---------------------------------------------------------------------------------------------
// Reading disks.

/// Open the file at `path` with `open` and default options.
pub(crate) fn open_file(open: OpenFn, path: &Path) -> Result<Box<dyn DiskImage>> {
    open(
        Arc::new(std::fs::File::open(path).unwrap()),
        &OpenOptions::default(),
    )
}

/// Open an image held in memory with `open` and default options.
pub(crate) fn open_bytes(open: OpenFn, bytes: Vec<u8>) -> Result<Box<dyn DiskImage>> {
    open(Arc::new(bytes), &OpenOptions::default())
}

/// Read the whole disk through `extent` and `read_exact_at`, with odd lengths so run and read
/// boundaries fall inside grains, blocks and clusters. Zero runs are read too and must read as
/// zeroes.
pub(crate) fn read_all(img: &mut dyn DiskImage) -> Result<Vec<u8>> {
    let size = usize::try_from(img.virtual_size()).unwrap();
    let mut out = vec![0u8; size];
    let mut pos = 0usize;
    while pos < size {
        let ext = img.extent(pos as u64, 3 * (1 << 20) + 512)?;
        assert!(ext.len > 0, "extent at {pos} has length 0");
        let end = pos + ext.len as usize;
        let mut at = pos;
        while at < end {
            let n = (end - at).min(777_777);
            img.read_exact_at(&mut out[at..at + n], at as u64)?;
            at += n;
        }
        if ext.kind == ExtentKind::Zero {
            let nonzero = out[pos..end].iter().position(|&b| b != 0);
            assert!(
                nonzero.is_none(),
                "zero extent {pos}..{end} reads non-zero at {}",
                pos + nonzero.unwrap_or(0)
            );
        }
        pos = end;
    }
    Ok(out)
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

// ---------------------------------------------------------------------------------------------
// Sinks.

/// Records what a producer reports and checks the [`ExtentSink`] contract: `begin` first and
/// once, with a known size; no empty report, none past the end; every guest byte exactly once.
/// Data is kept per report, so a sparse 1 TiB disk fits in memory.
#[derive(Debug, Default)]
pub(crate) struct CheckingSink {
    /// The size given to `begin`; `None` until then.
    pub(crate) size: Option<u64>,
    /// Data reports by offset, as reported.
    pub(crate) data: BTreeMap<u64, Vec<u8>>,
    /// Reported ranges, merged: start → end.
    seen: BTreeMap<u64, u64>,
}

impl CheckingSink {
    fn mark(&mut self, off: u64, len: u64) {
        let size = self.size.expect("report before begin");
        assert!(len > 0, "empty report at {off:#x}");
        let end = off + len;
        assert!(
            end <= size,
            "report {off:#x}+{len:#x} beyond size {size:#x}"
        );
        if let Some((&a, &b)) = self.seen.range(..end).next_back() {
            assert!(
                b <= off,
                "bytes {off:#x}..{end:#x} reported twice (overlap {a:#x}..{b:#x})"
            );
        }
        let (mut start, mut stop) = (off, end);
        if let Some((&a, &b)) = self.seen.range(..=off).next_back()
            && b == off
        {
            self.seen.remove(&a);
            start = a;
        }
        if let Some(b) = self.seen.remove(&end) {
            stop = b;
        }
        self.seen.insert(start, stop);
    }

    /// Bytes reported so far, data and zero.
    pub(crate) fn reported(&self) -> u64 {
        self.seen.iter().map(|(a, b)| b - a).sum()
    }

    /// The guest disk, after checking that every byte was reported.
    pub(crate) fn finish(self) -> Vec<u8> {
        let size = self.size.expect("begin never called");
        if size > 0 {
            assert_eq!(
                self.seen.len(),
                1,
                "gaps in the reported ranges: {:x?}",
                self.seen
            );
            assert_eq!(
                self.seen.get(&0),
                Some(&size),
                "not every byte was reported"
            );
        }
        let mut disk = vec![0u8; size as usize];
        for (off, buf) in self.data {
            disk[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
        }
        disk
    }
}

impl ExtentSink for CheckingSink {
    fn begin(&mut self, virtual_size: Option<u64>) -> Result<()> {
        assert!(self.size.is_none(), "begin called twice");
        self.size = Some(virtual_size.expect("size known up front"));
        Ok(())
    }

    fn data(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.mark(offset, buf.len() as u64);
        self.data.insert(offset, buf.to_vec());
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.mark(offset, len);
        Ok(())
    }
}

/// Run `stream` from `input` into a [`CheckingSink`] and return the guest disk.
pub(crate) fn stream_to_vec(
    stream: StreamFn,
    input: &mut dyn Read,
    ctx: &mut StreamContext,
) -> Result<Vec<u8>> {
    let mut sink = CheckingSink::default();
    stream(input, &mut sink, ctx)?;
    Ok(sink.finish())
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

// ---------------------------------------------------------------------------------------------
// Errors and table-driven cases.

/// Unwrap the error of `result` and check its kind and that its message contains `text`.
pub(crate) fn assert_err(
    result: Result<impl std::fmt::Debug>,
    kind: ErrorKind,
    text: &str,
) -> Error {
    let err = result.expect_err("expected an error");
    assert_eq!(err.kind(), kind, "wrong kind for: {err}");
    assert!(
        err.message().contains(text),
        "{err:?} does not mention {text:?}"
    );
    err
}

/// What an error message must look like.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Msg {
    /// Any message (only the kind is checked).
    Any,
    /// The message starts with this.
    Starts(&'static str),
    /// The message is exactly this.
    Is(&'static str),
}

/// Unwrap the error of `result` and check its kind and message.
pub(crate) fn assert_refused(result: Result<impl std::fmt::Debug>, kind: ErrorKind, msg: Msg) {
    let err = result.expect_err("expected an error");
    assert_eq!(err.kind(), kind, "wrong kind for: {err}");
    match msg {
        Msg::Any => {}
        Msg::Starts(prefix) => assert!(err.message().starts_with(prefix), "{err}"),
        Msg::Is(text) => assert_eq!(err.message(), text),
    }
}

/// `img` after `edit` changed it in place.
pub(crate) fn edited(mut img: Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    edit(&mut img);
    img
}

/// Check that `open` refuses every case's image with the case's error kind and message.
pub(crate) fn check_open_refuses(
    open: OpenFn,
    cases: impl IntoIterator<Item = (&'static str, (Vec<u8>, ErrorKind, Msg))>,
) {
    check_cases(cases, |(img, kind, msg)| {
        assert_refused(open_bytes(open, img), kind, msg);
    });
}

/// Run `check` on every named case, then fail once naming every case that failed (each
/// failure's panic message is printed as it happens), so one broken case hides no other.
pub(crate) fn check_cases<C>(
    cases: impl IntoIterator<Item = (&'static str, C)>,
    check: impl Fn(C),
) {
    let mut failed = Vec::new();
    let mut count = 0;
    for (name, case) in cases {
        count += 1;
        if catch_unwind(AssertUnwindSafe(|| check(case))).is_err() {
            println!("case {name:?} failed (panic above)");
            failed.push(name);
        }
    }
    assert!(count > 0, "no cases");
    assert!(
        failed.is_empty(),
        "{} of {count} cases failed: {failed:?}",
        failed.len()
    );
}
