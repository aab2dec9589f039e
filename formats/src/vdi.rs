//! vdi support (placeholder signatures; the implementation is being written).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::{DiskImage, FormatInfo, OpenOptions};
use crate::read_at::ReadAt;

/// Parse the header at the start of the image (`head` holds up to
/// [`crate::limits::DETECT_HEAD_LEN`] bytes) without reading anything else.
pub fn probe(_head: &[u8]) -> Result<FormatInfo> {
    Err(Error::unsupported("vdi support is being written"))
}

/// Open the image for random access.
pub fn open(_src: Arc<dyn ReadAt>, _opts: &OpenOptions) -> Result<Box<dyn DiskImage>> {
    Err(Error::unsupported("vdi support is being written"))
}
