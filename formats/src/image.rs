//! The random-access view of a virtual disk, and the sink that sequential converters feed.
//!
//! Two shapes of conversion share these types:
//!
//! ```text
//!  random access:  ReadAt ─► open_image() ─► DiskImage::extent()/read_exact_at() ─┐
//!                                                                                 ├─► ExtentSink ─► Target
//!  streaming:      Read ─► format stream converter (one pass, no seeking) ───────┘
//! ```
//!
//! Both end in an [`ExtentSink`]: "these guest bytes are data", "this guest range is zero".

use std::fmt;

use crate::detect::ImageFormat;
use crate::error::Result;

/// What backs a run of guest-visible bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExtentKind {
    /// Bytes must be read (they may still happen to be zero; the sink detects that).
    Data,
    /// The range reads as zeroes (unallocated, zero cluster, sparse hole).
    Zero,
}

/// A run of guest bytes that all behave the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes; more than 0 unless the offset is at the end of the disk.
    pub len: u64,
    /// How the run is backed.
    pub kind: ExtentKind,
}

/// A read-only virtual disk as the guest sees it.
pub trait DiskImage: Send + fmt::Debug {
    /// The on-disk format.
    fn format(&self) -> ImageFormat;

    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;

    /// What backs the run starting at `offset`, at most `max_len` bytes long.
    ///
    /// Returns `len == 0` only when `offset >= virtual_size()`. Adjacent calls may return runs
    /// of the same kind; callers merge.
    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent>;

    /// Guest bytes at `offset`, decoded (compressed clusters inflated); never short.
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// Where converters send guest content.
///
/// Contract for every producer (random-access copy loop and stream converters alike): call
/// [`ExtentSink::begin`] once with the virtual size before anything else, then report every
/// byte of `[0, virtual_size)` exactly once, as data or zero, in any order.
pub trait ExtentSink {
    /// Announce the guest size before the first write. The sink checks it against the target
    /// and fails with `TargetTooSmall` before anything is written. `None` means the size is only
    /// known at the end (raw streams); the sink then checks as data arrives.
    fn begin(&mut self, virtual_size: Option<u64>) -> Result<()>;

    /// Guest bytes at `offset`. The sink skips zero blocks within `buf`.
    fn data(&mut self, offset: u64, buf: &[u8]) -> Result<()>;

    /// The guest range reads as zeroes.
    fn zero(&mut self, offset: u64, len: u64) -> Result<()>;

    /// A buffer to read guest bytes into and pass back through [`ExtentSink::data_buffer`];
    /// stale contents, any length (callers resize it). A sink that owns write buffers lends
    /// one, so the bytes reach the target without the copy [`ExtentSink::data`] makes; the
    /// default hands out a fresh one.
    fn take_buffer(&mut self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }

    /// [`ExtentSink::data`] for a buffer from [`ExtentSink::take_buffer`]: `buf[..len]` holds
    /// the guest bytes at `offset`.
    fn data_buffer(&mut self, offset: u64, buf: Vec<u8>, len: usize) -> Result<()> {
        self.data(offset, &buf[..len.min(buf.len())])
    }
}

/// Whether a format reader may open files an image names (qcow2/vmdk backing files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BackingPolicy {
    /// Refuse images with a backing file (the default: images are untrusted and a backing
    /// path could name any file on the host).
    #[default]
    Deny,
    /// Follow backing files, resolved relative to this directory, up to
    /// [`crate::limits::MAX_BACKING_CHAIN_DEPTH`] deep. Only for local files the caller trusts.
    AllowRelativeTo(std::path::PathBuf),
}

/// Options for opening an image for random access.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Backing-file policy.
    pub backing: BackingPolicy,
}

/// What a header says about an image, learnt without converting it (`cdi info`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FormatInfo {
    /// The format.
    pub format: ImageFormat,
    /// Guest-visible size, when the header carries it (raw streams: unknown until the end).
    pub virtual_size: Option<u64>,
    /// Cluster, grain or block size, where the format has one.
    pub cluster_size: Option<u64>,
    /// Sub-format or version ("v3", "streamOptimized", "dynamic").
    pub subformat: Option<String>,
    /// Backing file named by the image, if any (conversion refuses it by default).
    pub backing_file: Option<String>,
    /// True when the format converts in one sequential pass without scratch space.
    pub streamable: bool,
}

/// State a streaming converter may use: the scratch directory for spilling, the memory budget,
/// and counters the caller reports.
#[derive(Debug, Clone)]
pub struct StreamContext {
    /// Where to spill data that arrived before its mapping; `None` means spilling is an error
    /// (`ScratchSpaceRequired`).
    pub scratch_dir: Option<std::path::PathBuf>,
    /// Bytes of out-of-order data held in memory before spilling.
    pub memory_budget: usize,
    /// Bytes written to scratch so far (reported in the conversion summary and benchmarks).
    pub scratch_bytes: u64,
}

impl StreamContext {
    /// A context with the default memory budget.
    pub fn new(scratch_dir: Option<std::path::PathBuf>) -> Self {
        StreamContext {
            scratch_dir,
            memory_budget: crate::limits::STREAM_MEMORY_BUDGET,
            scratch_bytes: 0,
        }
    }
}
