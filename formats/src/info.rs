//! What an image is, learnt without converting it (`cdi info`, pre-checks).
//!
//! For formats with a header the answer comes from the first bytes. A raw stream has no
//! header: its size is its length, so [`probe_reader`] reads a raw image to the end to count it
//! (and to see whether it ends in a fixed-VHD footer). [`probe_path`] uses the file size and
//! opens formats whose size is not in the first bytes (VHDX, fixed VHD).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::detect::{self, Compression, ImageFormat, Sniffed};
use crate::error::{Error, Result};
use crate::image::{FormatInfo, OpenOptions};
use crate::limits::{DETECT_HEAD_LEN, IO_CHUNK};
use crate::open::{open_image, probe_format};
use crate::raw::{VHD_FOOTER_LEN, read_full};

/// Everything detection learns about an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    /// Compression layers, outermost first.
    pub compression: Vec<Compression>,
    /// True when the image is the first regular file of a tar archive.
    pub from_tar: bool,
    /// The disk format and what its header says.
    pub format: FormatInfo,
    /// True when converting this image from a stream needs scratch space (the format needs
    /// random access). A local, uncompressed file is opened in place instead and needs none.
    pub needs_scratch: bool,
}

/// Detect an image arriving as a stream.
///
/// Reads through compression and tar to the disk header. A raw (or ISO) image is read to its
/// end to learn its size, which costs a full pass over the input; other formats stop after the
/// first [`DETECT_HEAD_LEN`] bytes of the image.
pub fn probe_reader(input: &mut dyn Read) -> Result<ImageInfo> {
    let layers = detect::unwrap_layers(Box::new(input))?;
    let mut reader = layers.reader;
    let format = match probe_format(layers.format, &layers.head)? {
        Some(info) => info,
        None => raw_info(layers.format, &mut reader)?,
    };
    Ok(ImageInfo {
        compression: layers.compression,
        from_tar: layers.from_tar,
        needs_scratch: !format.streamable,
        format,
    })
}

/// Detect a local image file; sizes missing from the header come from opening the image.
pub fn probe_path(path: &Path) -> Result<ImageInfo> {
    let mut file =
        File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("reading metadata of {}", path.display()), e))?;
    if !meta.is_file() {
        // Pipes and devices have no usable length: probe them as streams.
        return probe_reader(&mut file);
    }
    let size = meta.len();
    let mut head = vec![
        0u8;
        usize::try_from(size)
            .unwrap_or(DETECT_HEAD_LEN)
            .min(DETECT_HEAD_LEN)
    ];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io(format!("reading the header of {}", path.display()), e))?;
    let format = match detect::sniff(&head) {
        Sniffed::Compressed(_) | Sniffed::Format(ImageFormat::Tar) => {
            return probe_reader(&mut file);
        }
        Sniffed::Format(format @ (ImageFormat::Raw | ImageFormat::Iso)) => {
            let mut tail = [0u8; VHD_FOOTER_LEN];
            let footer = if size >= VHD_FOOTER_LEN as u64 {
                file.read_exact_at(&mut tail, size - VHD_FOOTER_LEN as u64)
                    .map_err(|e| Error::io(format!("reading the end of {}", path.display()), e))?;
                fixed_footer(&tail)
            } else {
                None
            };
            match footer {
                Some(mut info) => {
                    if info.virtual_size.is_none() {
                        info.virtual_size = Some(size - VHD_FOOTER_LEN as u64);
                    }
                    info
                }
                None => plain(format, size),
            }
        }
        Sniffed::Format(ImageFormat::Vmdk) if detect::is_vmdk_descriptor(&head) => {
            let mut info = probe_format(ImageFormat::Vmdk, &head)?
                .ok_or_else(|| Error::corrupt("vmdk descriptor has no header"))?;
            if info.virtual_size.is_none() {
                let image = crate::vmdk::open_descriptor_path(path, &OpenOptions::default())?;
                info.virtual_size = Some(image.virtual_size());
            }
            info
        }
        Sniffed::Format(format) => {
            let mut info = probe_format(format, &head)?
                .ok_or_else(|| Error::corrupt(format!("{format} image has no header")))?;
            if info.virtual_size.is_none() {
                let image = open_image(format, Arc::new(file), &OpenOptions::default())?;
                info.virtual_size = Some(image.virtual_size());
            }
            info
        }
    };
    Ok(ImageInfo {
        compression: Vec::new(),
        from_tar: false,
        needs_scratch: !format.streamable,
        format,
    })
}

/// A raw or ISO image of `size` bytes.
fn plain(format: ImageFormat, size: u64) -> FormatInfo {
    FormatInfo {
        format,
        virtual_size: Some(size),
        cluster_size: None,
        subformat: None,
        backing_file: None,
        streamable: true,
    }
}

/// Count a raw stream to its end, keeping the last 512 bytes to look for a fixed-VHD footer.
fn raw_info(format: ImageFormat, reader: &mut dyn Read) -> Result<FormatInfo> {
    let mut buf = vec![0u8; IO_CHUNK];
    let mut tail = [0u8; VHD_FOOTER_LEN];
    let mut total = 0u64;
    loop {
        let n = read_full(reader, &mut buf)
            .map_err(|e| Error::io(format!("reading image data at {total}"), e))?;
        if n == 0 {
            break;
        }
        // Keep the last 512 bytes seen so far (a short final read may straddle chunks).
        if n >= VHD_FOOTER_LEN {
            tail.copy_from_slice(&buf[n - VHD_FOOTER_LEN..n]);
        } else {
            tail.copy_within(n.., 0);
            tail[VHD_FOOTER_LEN - n..].copy_from_slice(&buf[..n]);
        }
        total += n as u64;
        if n < buf.len() {
            break;
        }
    }
    if total >= VHD_FOOTER_LEN as u64
        && let Some(mut info) = fixed_footer(&tail)
    {
        if info.virtual_size.is_none() {
            info.virtual_size = Some(total - VHD_FOOTER_LEN as u64);
        }
        return Ok(info);
    }
    Ok(plain(format, total))
}

/// The fixed-VHD footer check shared with conversion.
fn fixed_footer(tail: &[u8; VHD_FOOTER_LEN]) -> Option<FormatInfo> {
    crate::convert::vhd_fixed_footer(tail)
}

#[cfg(test)]
mod tests {
    use std::io::{self, Write};

    use super::*;

    fn probe_bytes(bytes: &[u8]) -> Result<ImageInfo> {
        probe_reader(&mut io::Cursor::new(bytes))
    }

    #[test]
    fn raw_stream_is_counted_to_the_end() {
        let data = vec![3u8; IO_CHUNK + 1234];
        let info = probe_bytes(&data).unwrap();
        assert_eq!(info.format.format, ImageFormat::Raw);
        assert_eq!(info.format.virtual_size, Some(data.len() as u64));
        assert!(!info.needs_scratch);
    }

    #[test]
    fn compressed_iso_reports_the_chain_and_size() {
        let mut iso = vec![0u8; 0x9000];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&iso).unwrap();
        let gz = enc.finish().unwrap();
        let zst = zstd::encode_all(&gz[..], 1).unwrap();
        let info = probe_bytes(&zst).unwrap();
        assert_eq!(info.compression, vec![Compression::Zstd, Compression::Gzip]);
        assert_eq!(info.format.format, ImageFormat::Iso);
        assert_eq!(info.format.virtual_size, Some(0x9000));
    }

    #[test]
    fn path_probe_uses_the_file_size_for_raw() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        std::fs::write(&p, vec![1u8; 5000]).unwrap();
        let info = probe_path(&p).unwrap();
        assert_eq!(info.format.virtual_size, Some(5000));
        assert_eq!(info.format.format, ImageFormat::Raw);
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(probe_path(&empty).unwrap().format.virtual_size, Some(0));
    }
}
