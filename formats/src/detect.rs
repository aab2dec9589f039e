//! Format and compression detection from magic bytes.
//!
//! Detection is a chain: a compression layer is recognised and unwrapped, then the decoded
//! bytes are sniffed again, until a disk format (or raw) is found. A tar archive is unwrapped
//! the same way: its first regular file is the image and goes through the chain again.
//!
//! Only the first [`DETECT_HEAD_LEN`] bytes of each layer are looked at; they are read once and
//! replayed to whoever consumes the layer, so detection works on pipes and network bodies.

use std::io::{self, Read};

use serde::Serialize;

use crate::decompress;
use crate::error::{Error, Result};
use crate::limits::{DETECT_HEAD_LEN, MAX_COMPRESSION_LAYERS};

/// A compression or container layer wrapped around the disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// gzip, possibly several members.
    Gzip,
    /// xz.
    Xz,
    /// zstd, possibly several frames.
    Zstd,
    /// bzip2.
    Bzip2,
}

impl Compression {
    /// Lowercase name, as in file suffixes.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
        }
    }
}

/// The on-disk format of a virtual disk (after any compression is removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// Plain bytes (also what ISO images are converted as).
    Raw,
    /// ISO 9660; converted as raw.
    Iso,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware VMDK (sparse, streamOptimized, or a descriptor naming flat extents).
    Vmdk,
    /// VirtualBox VDI.
    Vdi,
    /// Microsoft VHD (fixed or dynamic).
    Vhd,
    /// Microsoft VHDX.
    Vhdx,
    /// A tar archive holding the disk image as its first regular file.
    Tar,
}

impl ImageFormat {
    /// Lowercase name as `qemu-img` spells the format (`vpc` for VHD).
    pub fn qemu_name(self) -> &'static str {
        match self {
            ImageFormat::Raw | ImageFormat::Iso | ImageFormat::Tar => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Vhd => "vpc",
            ImageFormat::Vhdx => "vhdx",
        }
    }

    /// Our lowercase name ("raw", "iso", "vhd", …), for messages and `cdi info`.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Iso => "iso",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Vhd => "vhd",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Tar => "tar",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the first bytes of a layer are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// A compression layer to unwrap.
    Compressed(Compression),
    /// A disk format, a tar archive, or raw when nothing matched.
    Format(ImageFormat),
}

/// `# Disk DescriptorFile`: the first line of a VMDK text descriptor.
const VMDK_DESCRIPTOR: &[u8] = b"# Disk DescriptorFile";

/// Classify a layer by its first bytes (`head` holds up to [`DETECT_HEAD_LEN`] of them).
///
/// Anything unrecognised is [`ImageFormat::Raw`], as upstream treats it; a short or empty head
/// is raw as well (an empty raw image is a valid, empty disk).
pub fn sniff(head: &[u8]) -> Sniffed {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(0, &[0x1f, 0x8b, 0x08]) {
        return Sniffed::Compressed(Compression::Gzip);
    }
    if at(0, &[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        return Sniffed::Compressed(Compression::Xz);
    }
    // A zstd frame, or a skippable frame (0x184D2A50..=0x184D2A5F, little endian) as `pzstd`
    // writes first.
    if at(0, &[0x28, 0xb5, 0x2f, 0xfd])
        || (head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18])
    {
        return Sniffed::Compressed(Compression::Zstd);
    }
    if at(0, b"BZh") && head.get(3).is_some_and(|b| (b'1'..=b'9').contains(b)) {
        return Sniffed::Compressed(Compression::Bzip2);
    }
    let format = if at(0, b"QFI\xfb") {
        ImageFormat::Qcow2
    } else if at(0, b"KDMV") || is_vmdk_descriptor(head) {
        ImageFormat::Vmdk
    } else if at(0x40, &[0x7f, 0x10, 0xda, 0xbe]) {
        ImageFormat::Vdi
    } else if at(0, b"conectix") {
        ImageFormat::Vhd
    } else if at(0, b"vhdxfile") {
        ImageFormat::Vhdx
    } else if at(257, b"ustar") {
        ImageFormat::Tar
    } else if at(0x8001, b"CD001") {
        ImageFormat::Iso
    } else {
        ImageFormat::Raw
    };
    Sniffed::Format(format)
}

/// True when `head` is a VMDK text descriptor (not a binary sparse extent). Leading blank
/// space is allowed, as the vmdk reader allows it.
pub fn is_vmdk_descriptor(head: &[u8]) -> bool {
    let start = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(head.len());
    head[start..].starts_with(VMDK_DESCRIPTOR)
}

/// Read up to `limit` bytes (fewer only at end of stream).
pub(crate) fn read_up_to(input: &mut dyn Read, limit: usize) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(limit);
    input.take(limit as u64).read_to_end(&mut head)?;
    Ok(head)
}

/// A reader that first replays bytes already read from `inner`.
pub(crate) struct Replay<'a> {
    head: Vec<u8>,
    pos: usize,
    inner: Box<dyn Read + 'a>,
}

impl<'a> Replay<'a> {
    pub(crate) fn new(head: Vec<u8>, inner: Box<dyn Read + 'a>) -> Self {
        Replay {
            head,
            pos: 0,
            inner,
        }
    }
}

impl Read for Replay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.head.len() {
            let n = buf.len().min(self.head.len() - self.pos);
            buf[..n].copy_from_slice(&self.head[self.pos..self.pos + n]);
            self.pos += n;
            if self.pos == self.head.len() {
                // The replayed bytes are not needed any more; give the memory back.
                self.head = Vec::new();
                self.pos = 0;
            }
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

/// The outcome of unwrapping every layer around a disk image.
pub struct Unwrapped<'a> {
    /// Compression layers, outermost first.
    pub compression: Vec<Compression>,
    /// True when the image was the first regular file of a tar archive.
    pub from_tar: bool,
    /// The disk format found under all layers.
    pub format: ImageFormat,
    /// The first bytes of the disk image (up to [`DETECT_HEAD_LEN`]).
    pub head: Vec<u8>,
    /// The disk image from byte 0 (the head is replayed).
    pub reader: Box<dyn Read + 'a>,
}

impl std::fmt::Debug for Unwrapped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unwrapped")
            .field("compression", &self.compression)
            .field("from_tar", &self.from_tar)
            .field("format", &self.format)
            .field("head_len", &self.head.len())
            .finish_non_exhaustive()
    }
}

/// Unwrap compression layers and a tar archive until a disk format is found.
///
/// At most [`MAX_COMPRESSION_LAYERS`] compression layers and one tar archive are unwrapped; a
/// nested archive or a deeper chain is refused.
pub fn unwrap_layers<'a>(input: Box<dyn Read + 'a>) -> Result<Unwrapped<'a>> {
    let mut reader = input;
    let mut compression = Vec::new();
    let mut from_tar = false;
    loop {
        let head = read_up_to(&mut reader, DETECT_HEAD_LEN)
            .map_err(|e| Error::io(layer_context("reading image header", &compression), e))?;
        let replay: Box<dyn Read + 'a> = Box::new(Replay::new(head.clone(), reader));
        match sniff(&head) {
            Sniffed::Compressed(c) => {
                if compression.len() >= MAX_COMPRESSION_LAYERS {
                    return Err(Error::limit(format!(
                        "more than {MAX_COMPRESSION_LAYERS} compression layers around the image"
                    )));
                }
                compression.push(c);
                reader = decompress::decoder(c, replay)?;
            }
            Sniffed::Format(ImageFormat::Tar) => {
                if from_tar {
                    return Err(Error::unsupported(
                        "tar archive inside a tar archive: the image must be a plain file",
                    ));
                }
                from_tar = true;
                reader = decompress::tar_first_file(replay)?;
            }
            Sniffed::Format(format) => {
                return Ok(Unwrapped {
                    compression,
                    from_tar,
                    format,
                    head,
                    reader: replay,
                });
            }
        }
    }
}

fn layer_context(what: &str, layers: &[Compression]) -> String {
    match layers.last() {
        Some(c) => format!("{what} (inside {} data)", c.name()),
        None => what.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut head = vec![0u8; offset + magic.len() + 16];
        head[offset..offset + magic.len()].copy_from_slice(magic);
        head
    }

    #[test]
    fn every_magic_is_recognised() {
        let cases: Vec<(Vec<u8>, Sniffed)> = vec![
            (
                at(0, &[0x1f, 0x8b, 8]),
                Sniffed::Compressed(Compression::Gzip),
            ),
            (at(0, b"\xfd7zXZ\0"), Sniffed::Compressed(Compression::Xz)),
            (
                at(0, &[0x28, 0xb5, 0x2f, 0xfd]),
                Sniffed::Compressed(Compression::Zstd),
            ),
            (
                at(0, &[0x5e, 0x2a, 0x4d, 0x18]),
                Sniffed::Compressed(Compression::Zstd),
            ),
            (at(0, b"BZh9"), Sniffed::Compressed(Compression::Bzip2)),
            (at(0, b"QFI\xfb"), Sniffed::Format(ImageFormat::Qcow2)),
            (at(0, b"KDMV"), Sniffed::Format(ImageFormat::Vmdk)),
            (
                at(0, b"# Disk DescriptorFile\n"),
                Sniffed::Format(ImageFormat::Vmdk),
            ),
            (
                at(0, b"\n  # Disk DescriptorFile\n"),
                Sniffed::Format(ImageFormat::Vmdk),
            ),
            (
                at(0x40, &[0x7f, 0x10, 0xda, 0xbe]),
                Sniffed::Format(ImageFormat::Vdi),
            ),
            (at(0, b"conectix"), Sniffed::Format(ImageFormat::Vhd)),
            (at(0, b"vhdxfile"), Sniffed::Format(ImageFormat::Vhdx)),
            (at(257, b"ustar\0"), Sniffed::Format(ImageFormat::Tar)),
            (at(0x8001, b"CD001"), Sniffed::Format(ImageFormat::Iso)),
            (vec![0u8; 4096], Sniffed::Format(ImageFormat::Raw)),
            (Vec::new(), Sniffed::Format(ImageFormat::Raw)),
            (b"BZh".to_vec(), Sniffed::Format(ImageFormat::Raw)),
        ];
        for (head, want) in cases {
            assert_eq!(
                sniff(&head),
                want,
                "head starting {:02x?}",
                &head[..head.len().min(8)]
            );
        }
    }

    #[test]
    fn truncated_magic_is_raw() {
        assert_eq!(sniff(b"QFI"), Sniffed::Format(ImageFormat::Raw));
        // ISO signature cut by the end of the head.
        let mut head = vec![0u8; 0x8003];
        head[0x8001..].copy_from_slice(b"CD");
        assert_eq!(sniff(&head), Sniffed::Format(ImageFormat::Raw));
    }

    #[test]
    fn replay_returns_head_then_rest() {
        let mut input: &[u8] = b"hello world";
        let head = read_up_to(&mut input, 5).unwrap();
        let mut r = Replay::new(head, Box::new(input));
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hello world");
    }

    #[test]
    fn empty_input_is_an_empty_raw_image() {
        let u = unwrap_layers(Box::new(io::empty())).unwrap();
        assert_eq!(u.format, ImageFormat::Raw);
        assert!(u.compression.is_empty() && !u.from_tar && u.head.is_empty());
    }
}
