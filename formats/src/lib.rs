//! Disk-image formats for CDI: detect, decompress and convert any VM image into raw extents.
//!
//! Images are untrusted input. Every size or offset read from a header is checked against
//! [`limits`] before it is used, backing and external files are refused unless the caller opts
//! in, and a truncated or inconsistent image is an error, never zeroes.
//!
//! ```text
//!   bytes (file, stdin, HTTP body, upload body, registry layer)
//!     │
//!     ▼
//!   detect ──► decompress (gzip / xz / zstd / bzip2, repeated) ──► tar (first file)
//!     │
//!     ▼
//!   format ─┬─ raw / iso ───────────────► raw stream (zero-block detection) ─────┐
//!           ├─ qcow2 / vmdk-stream ─────► stream converter (one pass; spill) ──┤
//!           └─ vhd / vhdx / vdi / vmdk ─► spool to scratch ─► DiskImage ───────┤
//!                                                                            ▼
//!                               TargetSink (checks, zero detection) ─► writer thread ─► Target
//!                                                                      (file | block device)
//! ```
//!
//! The crate is synchronous (`std::io`), has no async runtime and no Kubernetes types; async
//! callers run it on a blocking thread. A conversion starts one scoped writer thread of its own
//! (`pipeline`), so reading and writing overlap; it ends before the conversion returns.

pub mod convert;
pub mod decompress;
pub mod detect;
pub mod error;
pub mod image;
pub mod info;
pub mod limits;
pub mod open;
mod pipeline;
pub mod qcow2;
pub mod raw;
pub mod read_at;
pub mod sink;
pub mod spill;
pub mod target;
#[cfg(test)]
mod testutil;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use convert::{ConvertOptions, ConvertReport, convert_path, convert_reader};
pub use detect::{Compression, ImageFormat};
pub use error::{Error, ErrorKind, Result};
pub use image::{
    BackingPolicy, DiskImage, Extent, ExtentKind, ExtentSink, FormatInfo, OpenOptions,
    StreamContext,
};
pub use info::{ImageInfo, probe_path, probe_reader};
pub use read_at::ReadAt;
pub use target::{BlockTarget, FileTarget, Preallocation, Target, open_target};
