//! Shared pieces of the fuzz targets: bounded walks over a random-access image, a counting
//! extent sink for the stream converters, and a `Vec`-backed [`Target`] for the whole pipeline.
//!
//! Every helper caps the work a single input can cause (virtual size, extents visited, bytes
//! read), so a tiny input that legitimately describes a huge disk makes the fuzzer move on
//! instead of timing out or running out of memory. Those caps are fuzzing limits, not product
//! limits: the product's own bounds live in `cdi_formats::limits` and are what we exercise.

use std::io;
use std::sync::Arc;

use cdi_formats::error::{Error, ErrorKind, Result};
use cdi_formats::image::{DiskImage, ExtentKind, ExtentSink, OpenOptions, StreamContext};
use cdi_formats::read_at::ReadAt;
use cdi_formats::target::{Preallocation, Target};

/// Largest virtual disk the pipeline target materialises. 64 MiB keeps one input well under
/// libFuzzer's default 2 GiB RSS limit even with decoder windows on top.
pub const MAX_FUZZ_DISK: u64 = 64 << 20;

/// Extents visited per random-access walk: enough to cross several L2 tables / grain tables /
/// BAT blocks, few enough that a disk of a million tiny extents cannot stall the fuzzer.
pub const MAX_EXTENTS: usize = 4096;

/// Bytes decoded per random-access walk. Reading is where decompression and table lookups
/// happen; 16 MiB lets a walk touch every cluster of a small image.
pub const MAX_READ_BYTES: u64 = 16 << 20;

/// Largest single read issued during a walk (one qcow2 2 MiB cluster fits).
const READ_CHUNK: u64 = 2 << 20;

/// Guest bytes a stream converter may report before the counting sink stops it: decompression
/// bombs inside an image (a few KiB of zstd can claim gigabytes) would otherwise only cost time.
pub const MAX_STREAM_BYTES: u64 = 256 << 20;

/// Memory budget handed to stream converters: small, so out-of-order data reaches the
/// "no scratch space" path quickly instead of buffering 32 MiB per input.
pub const FUZZ_MEMORY_BUDGET: usize = 1 << 20;

/// A format's random-access entry point (`qcow2::open`, `vmdk::open`, …).
pub type OpenFn = fn(Arc<dyn ReadAt>, &OpenOptions) -> Result<Box<dyn DiskImage>>;

/// A format's one-pass stream converter (`qcow2::stream`, `vmdk::stream`).
pub type StreamFn = fn(&mut dyn io::Read, &mut dyn ExtentSink, &mut StreamContext) -> Result<()>;

/// Open `data` with `open` and walk it: extents from offset 0 onwards and bounded reads of the
/// data extents. Errors are expected and ignored; panics, hangs and overflows are the findings.
pub fn open_and_walk(data: &[u8], open: OpenFn) {
    let src: Arc<dyn ReadAt> = Arc::new(data.to_vec());
    let Ok(mut image) = open(src, &OpenOptions::default()) else {
        return;
    };
    let _ = walk(image.as_mut());
}

/// Walk extents and read data of an opened image, within the caps above.
pub fn walk(image: &mut dyn DiskImage) -> Result<()> {
    let size = image.virtual_size();
    let mut buf = Vec::new();
    let mut offset = 0u64;
    let mut read_budget = MAX_READ_BYTES;
    for _ in 0..MAX_EXTENTS {
        if offset >= size {
            break;
        }
        let extent = image.extent(offset, size - offset)?;
        assert!(
            extent.len > 0,
            "extent of length 0 at {offset} inside a {size}-byte disk"
        );
        assert!(
            extent.len <= size - offset,
            "extent at {offset} of {} bytes runs past the {size}-byte disk",
            extent.len
        );
        if extent.kind == ExtentKind::Data && read_budget > 0 {
            let len = extent.len.min(READ_CHUNK).min(read_budget);
            buf.resize(len as usize, 0);
            image.read_exact_at(&mut buf, offset)?;
            read_budget -= len;
        }
        offset += extent.len;
    }
    // A read at the very end must be refused or served, never panic.
    if size > 0 {
        let mut last = [0u8; 1];
        let _ = image.read_exact_at(&mut last, size - 1);
    }
    Ok(())
}

/// An [`ExtentSink`] that checks the sink contract (every byte once, nothing past the announced
/// size) and counts, without storing anything.
#[derive(Debug, Default)]
pub struct CountingSink {
    size: Option<u64>,
    began: bool,
    /// Guest bytes reported as data.
    pub data_bytes: u64,
    /// Guest bytes reported as zero.
    pub zero_bytes: u64,
}

impl CountingSink {
    fn check(&mut self, offset: u64, len: u64) -> Result<()> {
        assert!(self.began, "sink used before begin()");
        let end = offset.checked_add(len).expect("extent end overflows u64");
        if let Some(size) = self.size {
            assert!(
                end <= size,
                "extent [{offset}, {end}) past the announced size {size}"
            );
        }
        if self.data_bytes + self.zero_bytes > MAX_STREAM_BYTES {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                "fuzz stream cap reached",
            ));
        }
        Ok(())
    }

    /// Total bytes reported; equals the virtual size after a successful conversion.
    pub fn total(&self) -> u64 {
        self.data_bytes + self.zero_bytes
    }

    /// The size announced in `begin`.
    pub fn announced(&self) -> Option<u64> {
        self.size
    }
}

impl ExtentSink for CountingSink {
    fn begin(&mut self, virtual_size: Option<u64>) -> Result<()> {
        assert!(!self.began, "begin() called twice");
        self.began = true;
        self.size = virtual_size;
        Ok(())
    }

    fn data(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.data_bytes += buf.len() as u64;
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.zero_bytes += len;
        Ok(())
    }
}

/// Run a stream converter over `data` into a [`CountingSink`] without scratch space; on success
/// the converter must have reported exactly the announced virtual size.
pub fn stream_into_counter(data: &[u8], stream: StreamFn) {
    let mut input = data;
    let mut sink = CountingSink::default();
    let mut ctx = StreamContext::new(None);
    ctx.memory_budget = FUZZ_MEMORY_BUDGET;
    if stream(&mut input, &mut sink, &mut ctx).is_ok() {
        if let Some(size) = sink.announced() {
            assert_eq!(
                sink.total(),
                size,
                "stream converter reported {} of {size} bytes",
                sink.total()
            );
        }
        assert_eq!(
            ctx.scratch_bytes, 0,
            "scratch bytes counted without a scratch directory"
        );
    }
}

/// A file-like [`Target`] in memory, capped at [`MAX_FUZZ_DISK`].
#[derive(Debug, Default)]
pub struct VecTarget {
    /// The disk as written so far.
    pub bytes: Vec<u8>,
    /// Whether `finish` succeeded.
    pub finished: bool,
}

fn too_big() -> io::Error {
    io::Error::other("fuzz target disk cap reached")
}

impl VecTarget {
    fn reserve_to(&mut self, end: u64) -> io::Result<()> {
        if end > MAX_FUZZ_DISK {
            return Err(too_big());
        }
        if end as usize > self.bytes.len() {
            self.bytes.resize(end as usize, 0);
        }
        Ok(())
    }
}

impl Target for VecTarget {
    fn fixed_size(&self) -> Option<u64> {
        None
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        assert!(!self.finished, "write after finish");
        let end = offset.checked_add(buf.len() as u64).ok_or_else(too_big)?;
        self.reserve_to(end)?;
        self.bytes[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        assert!(!self.finished, "write after finish");
        let end = offset.checked_add(len).ok_or_else(too_big)?;
        if end > MAX_FUZZ_DISK {
            return Err(too_big());
        }
        // Only what already exists needs clearing; bytes past the end read as zero anyway.
        let have = self.bytes.len() as u64;
        if offset < have {
            self.bytes[offset as usize..end.min(have) as usize].fill(0);
        }
        Ok(())
    }

    fn finish(&mut self, size: u64, _prealloc: Preallocation) -> io::Result<()> {
        assert!(!self.finished, "finish called twice");
        if size > MAX_FUZZ_DISK {
            return Err(too_big());
        }
        self.bytes.resize(size as usize, 0);
        self.finished = true;
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}
