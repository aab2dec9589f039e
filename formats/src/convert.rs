//! The conversion entry points: any image (file or stream) into a [`Target`].

use std::path::PathBuf;

use serde::Serialize;

use crate::detect::{Compression, ImageFormat};
use crate::image::BackingPolicy;
use crate::target::Preallocation;

/// What the caller wants from a conversion.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// Final size of the raw disk. `None`: the image's virtual size (files) or the device size.
    /// An image larger than this is refused before anything is written.
    pub target_size: Option<u64>,
    /// Allocation of zero ranges.
    pub preallocation: Preallocation,
    /// Scratch directory for spooling or spilling; `None` makes such a need a
    /// `ScratchSpaceRequired` error.
    pub scratch_dir: Option<PathBuf>,
    /// Override of [`crate::limits::STREAM_MEMORY_BUDGET`] (tests force spilling with a tiny one).
    pub memory_budget: Option<usize>,
    /// Backing-file policy (only honoured for local files).
    pub backing: BackingPolicy,
}

/// What a conversion did.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    /// Compression layers unwrapped, outermost first.
    pub compression: Vec<Compression>,
    /// True when the image came out of a tar archive.
    pub from_tar: bool,
    /// The disk format.
    pub format: ImageFormat,
    /// The image's virtual size.
    pub virtual_size: u64,
    /// Final size of the target.
    pub target_size: u64,
    /// Bytes read from the (possibly compressed) input.
    pub input_bytes: u64,
    /// Guest bytes written as data.
    pub data_bytes: u64,
    /// Guest bytes handled as zero (holes or zeroing).
    pub zero_bytes: u64,
    /// Bytes written to the scratch directory.
    pub scratch_bytes: u64,
    /// True when the conversion ran as one sequential pass.
    pub streamed: bool,
}
