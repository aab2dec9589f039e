//! qcow2 (QEMU copy-on-write v2 and v3): header probe, random access and one-pass streaming.
//!
//! ```text
//!   header.rs      first cluster → validated Header (refusals happen here)
//!   table.rs       L1 / L2 entries → Cluster { Standard (subclusters) | Compressed }
//!   compressed.rs  raw deflate / zstd → exactly one cluster
//!   disk.rs        ReadAt → DiskImage (L2 LRU, backing chain when allowed)
//!   stream.rs      Read → ExtentSink in one pass (window + spill for data before its table)
//! ```
//!
//! Supported: versions 2 and 3, clusters of 512 B to 2 MiB, zlib and zstd compressed clusters,
//! zero clusters, extended L2 entries (subclusters), dirty images. Snapshots are ignored (only
//! the active L1 table is read). Refused, each with its own message: backing files (unless the
//! caller allows them for random access), external data files, encryption (AES, LUKS), unknown
//! incompatible features, the corrupt bit, and every table or cluster outside the file
//! (qemu-img reads zeroes there; a cut-short image is an error here).
//!
//! An L1 table longer than the virtual size needs is accepted and its extra entries ignored:
//! `qemu-img resize --shrink` and saved VM state leave such tables, and the extra entries never
//! map guest data. Its length is still bounded by [`crate::limits::QCOW2_MAX_L1_BYTES`].

mod compressed;
mod disk;
mod header;
mod stream;
mod table;

#[cfg(test)]
mod oracle_tests;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use crate::detect::ImageFormat;
use crate::error::Result;
use crate::image::{DiskImage, ExtentSink, FormatInfo, OpenOptions, StreamContext};
use crate::read_at::ReadAt;

/// Parse the header at the start of the image (`head` holds up to
/// [`crate::limits::DETECT_HEAD_LEN`] bytes) without reading anything else.
///
/// Fails for images no conversion accepts (encryption, external data file, unknown
/// incompatible features, corrupt bit, bad geometry); a backing file is reported in
/// [`FormatInfo::backing_file`] for the caller to judge.
pub fn probe(head: &[u8]) -> Result<FormatInfo> {
    let h = header::parse(head)?;
    Ok(FormatInfo {
        format: ImageFormat::Qcow2,
        virtual_size: Some(h.virtual_size),
        cluster_size: Some(h.cluster_size()),
        subformat: Some(h.subformat().to_string()),
        backing_file: h.backing_file.clone(),
        streamable: true,
    })
}

/// Open the image for random access. A backing file is refused unless `opts.backing` allows
/// it; then it is opened (qcow2 or raw, relative to the given directory, no absolute paths or
/// `..`, at most [`crate::limits::MAX_BACKING_CHAIN_DEPTH`] deep).
pub fn open(src: Arc<dyn ReadAt>, opts: &OpenOptions) -> Result<Box<dyn DiskImage>> {
    disk::open(src, opts, 0)
}

/// Convert the image in one sequential pass. `input` is positioned at byte 0 of the
/// (decompressed) image. Backing files are always refused here. Data that arrives before the
/// table mapping it waits in memory up to `ctx.memory_budget`, then in `ctx.scratch_dir`
/// (counted in `ctx.scratch_bytes`); without a scratch directory that is a
/// `ScratchSpaceRequired` error.
pub fn stream(
    input: &mut dyn std::io::Read,
    sink: &mut dyn ExtentSink,
    ctx: &mut StreamContext,
) -> Result<()> {
    stream::stream(input, sink, ctx)
}
