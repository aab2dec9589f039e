//! qcow2 support (placeholder signatures; the implementation is being written).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::{DiskImage, FormatInfo, OpenOptions};
use crate::read_at::ReadAt;

/// Parse the header at the start of the image (`head` holds up to
/// [`crate::limits::DETECT_HEAD_LEN`] bytes) without reading anything else.
pub fn probe(_head: &[u8]) -> Result<FormatInfo> {
    Err(Error::unsupported("qcow2 support is being written"))
}

/// Open the image for random access.
pub fn open(_src: Arc<dyn ReadAt>, _opts: &OpenOptions) -> Result<Box<dyn DiskImage>> {
    Err(Error::unsupported("qcow2 support is being written"))
}

/// Convert the image in one sequential pass. `input` is positioned at byte 0 of the
/// (decompressed) image.
pub fn stream(
    _input: &mut dyn std::io::Read,
    _sink: &mut dyn crate::image::ExtentSink,
    _ctx: &mut crate::image::StreamContext,
) -> Result<()> {
    Err(Error::unsupported("qcow2 streaming is being written"))
}
