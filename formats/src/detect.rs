//! Format and compression detection from magic bytes.
//!
//! Detection is a chain: a compression layer is recognised and unwrapped, then the decoded
//! bytes are sniffed again, until a disk format (or raw) is found.

use serde::Serialize;

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
}
