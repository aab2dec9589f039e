//! Where converted raw bytes land: a regular file (sparse) or a block device.
//!
//! A [`FileTarget`] is always a freshly created or truncated file, so a guest range that is never
//! written is a hole and reads as zeroes for free. A [`BlockTarget`] holds whatever the device
//! held before, so its zero ranges must really be zeroed (BLKZEROOUT, or zero buffers when the
//! device refuses the ioctl). Bytes of a device beyond the image are left alone, as upstream
//! does.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use serde::Serialize;

use crate::limits::IO_CHUNK;

/// How to allocate space that holds zeroes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Preallocation {
    /// Leave zero ranges as holes (files) or zero them cheaply (block devices).
    #[default]
    Off,
    /// `fallocate` the whole file so later guest writes cannot hit ENOSPC.
    Fallocate,
    /// Write real zeroes into every zero range (also forces allocation on thin storage).
    Full,
}

/// A destination for raw disk bytes.
///
/// Contract: converters call `write_all_at`/`write_zeroes` for guest ranges (each range at most
/// once), then `finish` exactly once. Nothing is durable until `finish` returns `Ok`.
pub trait Target: Send {
    /// `Some(size)` for fixed-size targets (block devices); `None` for files that take the
    /// size they are given.
    fn fixed_size(&self) -> Option<u64>;

    /// Announce the preallocation mode before the first write, for targets whose zeroing
    /// depends on it (a block device writes real zero buffers for `Full`). Default: nothing.
    fn set_preallocation(&mut self, _prealloc: Preallocation) {}

    /// Write guest bytes at `offset`.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Make `[offset, offset+len)` read back as zeroes as cheaply as the target allows: nothing
    /// on a freshly created file (it is a hole), BLKZEROOUT or explicit writes on a device.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()>;

    /// Set the final size (files), apply `prealloc`, and fsync. An import is complete only
    /// after this returns `Ok`.
    fn finish(&mut self, size: u64, prealloc: Preallocation) -> io::Result<()>;

    /// Human-readable location for messages ("/data/disk.img").
    fn describe(&self) -> String;
}

/// [`Target::write_all_at`] with the error every write path reports (`name` is the target's
/// description, taken once).
pub(crate) fn write_at(
    target: &mut dyn Target,
    name: &str,
    offset: u64,
    buf: &[u8],
) -> crate::error::Result<()> {
    target.write_all_at(buf, offset).map_err(|e| {
        crate::error::Error::io(
            format!("writing {} bytes at {offset} to {name}", buf.len()),
            e,
        )
    })
}

/// [`Target::write_zeroes`] with the error every zeroing path reports.
pub(crate) fn zero_at(
    target: &mut dyn Target,
    name: &str,
    offset: u64,
    len: u64,
) -> crate::error::Result<()> {
    target.write_zeroes(offset, len).map_err(|e| {
        crate::error::Error::io(format!("zeroing {offset}..{} of {name}", offset + len), e)
    })
}

/// Open the conversion target at `path`: a block device when `path` is one (opened
/// `O_WRONLY|O_EXCL`, never created), otherwise a regular file created or truncated to zero
/// length with mode 0660.
pub fn open_target(path: &Path) -> crate::error::Result<Box<dyn Target>> {
    let is_block = match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_block_device() => true,
        Ok(meta) if meta.is_file() => false,
        Ok(_) => {
            // A directory, pipe or character device (/dev/null) is no disk; opening a pipe for
            // writing would even block.
            return Err(crate::error::Error::new(
                crate::error::ErrorKind::InvalidInput,
                format!(
                    "target {} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => false,
        Err(err) => {
            return Err(crate::error::Error::io(
                format!("checking target {}", path.display()),
                err,
            ));
        }
    };
    if is_block {
        let t = BlockTarget::open(path).map_err(|e| {
            crate::error::Error::io(format!("opening block device {}", path.display()), e)
        })?;
        Ok(Box::new(t))
    } else {
        let t = FileTarget::create(path).map_err(|e| {
            crate::error::Error::io(format!("creating target file {}", path.display()), e)
        })?;
        Ok(Box::new(t))
    }
}

/// A regular file that starts empty, so unwritten ranges are holes.
#[derive(Debug)]
pub struct FileTarget {
    file: File,
    name: String,
}

impl FileTarget {
    /// Create `path` (mode 0660, as upstream's `disk.img`) or truncate an existing file to 0.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o660)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "target is not a regular file",
            ));
        }
        // Exactly 0660 whatever the umask or the old file's mode: the VM's qemu user reaches
        // the disk through its group, as with upstream's chmod of disk.img.
        file.set_permissions(std::fs::Permissions::from_mode(0o660))?;
        Ok(FileTarget {
            file,
            name: path.display().to_string(),
        })
    }

    /// Use an already open, writable file; it is truncated to 0 so the hole invariant holds.
    pub fn from_file(file: File, name: impl Into<String>) -> io::Result<Self> {
        file.set_len(0)?;
        Ok(FileTarget {
            file,
            name: name.into(),
        })
    }

    /// Write real zeroes into every hole below `size` (full preallocation).
    fn fill_holes(&mut self, size: u64) -> io::Result<()> {
        use rustix::fs::SeekFrom;
        let zeroes = vec![0u8; IO_CHUNK];
        let mut pos = 0u64;
        while pos < size {
            let hole = match rustix::fs::seek(&self.file, SeekFrom::Hole(pos)) {
                Ok(h) => h,
                // ENXIO: no hole at or after `pos` (cannot happen below EOF, but harmless).
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => return Err(e.into()),
            };
            if hole >= size {
                break;
            }
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(hole)) {
                Ok(d) => d.min(size),
                Err(rustix::io::Errno::NXIO) => size,
                Err(e) => return Err(e.into()),
            };
            let mut off = hole;
            while off < data {
                let n = usize::try_from(data - off)
                    .unwrap_or(IO_CHUNK)
                    .min(IO_CHUNK);
                self.file.write_all_at(&zeroes[..n], off)?;
                off += n as u64;
            }
            pos = data;
        }
        Ok(())
    }
}

impl Target for FileTarget {
    fn fixed_size(&self) -> Option<u64> {
        None
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_zeroes(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        // The file started empty and every range is written at most once: it is a hole.
        Ok(())
    }

    fn finish(&mut self, size: u64, prealloc: Preallocation) -> io::Result<()> {
        self.file.set_len(size)?;
        match prealloc {
            Preallocation::Off => {}
            Preallocation::Fallocate => {
                if size > 0 {
                    rustix::fs::fallocate(
                        &self.file,
                        rustix::fs::FallocateFlags::empty(),
                        0,
                        size,
                    )?;
                }
            }
            Preallocation::Full => self.fill_holes(size)?,
        }
        self.file.sync_all()
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

// BLKGETSIZE64 is `_IOR(0x12, 114, size_t)`.
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
// BLKZEROOUT is declared `_IO(0x12, 127)` in <linux/fs.h> even though it takes a pointer to
// `u64[2]` (start, length), so the request code carries no size: a "bad" ioctl in nix terms.
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// Sector granularity BLKZEROOUT requires for offset and length.
const SECTOR: u64 = 512;

/// A block device: fixed size, old content must be overwritten explicitly.
#[derive(Debug)]
pub struct BlockTarget {
    file: File,
    size: u64,
    name: String,
    /// True once BLKZEROOUT failed (or `Full` preallocation asked for real writes): zero ranges
    /// are written with zero buffers from then on.
    write_zero_buffers: bool,
}

impl BlockTarget {
    /// Open the device `O_WRONLY|O_EXCL` (no other opener may mount or use it meanwhile).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_EXCL)
            .open(path)?;
        Self::from_file(file, path.display().to_string())
    }

    /// Use an already open block device; its size comes from BLKGETSIZE64.
    pub fn from_file(file: File, name: impl Into<String>) -> io::Result<Self> {
        let mut size = 0u64;
        // SAFETY: `file` is an open descriptor for the duration of the call and `size` is a
        // valid, writable u64, which is what BLKGETSIZE64 stores into.
        unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
        Ok(BlockTarget {
            file,
            size,
            name: name.into(),
            write_zero_buffers: false,
        })
    }

    /// The device size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True while zero ranges are zeroed with BLKZEROOUT; false once the device refused it (or
    /// `Full` preallocation asked for real writes) and zero buffers are written instead.
    pub fn zeroes_by_ioctl(&self) -> bool {
        !self.write_zero_buffers
    }

    fn write_zero_buffers(&mut self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let zeroes = vec![0u8; usize::try_from(len).unwrap_or(IO_CHUNK).min(IO_CHUNK)];
        while offset < end {
            let n = usize::try_from(end - offset)
                .unwrap_or(IO_CHUNK)
                .min(zeroes.len());
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

impl Target for BlockTarget {
    fn fixed_size(&self) -> Option<u64> {
        Some(self.size)
    }

    fn set_preallocation(&mut self, prealloc: Preallocation) {
        if prealloc == Preallocation::Full {
            self.write_zero_buffers = true;
        }
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "zero range beyond the end of the device",
                )
            })?;
        if len == 0 {
            return Ok(());
        }
        if self.write_zero_buffers {
            return self.write_zero_buffers(offset, len);
        }
        // BLKZEROOUT works in whole sectors; the unaligned edges are written by hand.
        let start = offset.next_multiple_of(SECTOR).min(end);
        let stop = (end / SECTOR * SECTOR).max(start);
        if start > offset {
            self.write_zero_buffers(offset, start - offset)?;
        }
        if stop > start {
            let range = [start, stop - start];
            // SAFETY: `range` is a valid [u64; 2] that outlives the call; the descriptor is open.
            let res = unsafe { blkzeroout(self.file.as_raw_fd(), &range) };
            if res.is_err() {
                // Not every device or kernel supports it; zero buffers always work.
                self.write_zero_buffers = true;
                self.write_zero_buffers(start, stop - start)?;
            }
        }
        if end > stop {
            self.write_zero_buffers(stop, end - stop)?;
        }
        Ok(())
    }

    fn finish(&mut self, size: u64, _prealloc: Preallocation) -> io::Result<()> {
        if size > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "final size {size} is larger than the device ({} bytes)",
                    self.size
                ),
            ));
        }
        // A device cannot be resized and its tail beyond the image is left as it is; zero
        // ranges were already written for real when `Full` was requested.
        self.file.sync_all()
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn file_target_is_created_0660_and_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        std::fs::write(&p, vec![9u8; 8192]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut t = FileTarget::create(&p).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!((meta.len(), meta.mode() & 0o777), (0, 0o660));
        t.write_all_at(b"abc", 4096).unwrap();
        t.write_zeroes(0, 4096).unwrap();
        t.finish(10_000, Preallocation::Off).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 10_000);
        assert_eq!(&data[4096..4099], b"abc");
        assert!(data[..4096].iter().chain(&data[4099..]).all(|&b| b == 0));
    }

    #[test]
    fn non_file_targets_are_refused_without_touching_them() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_target(dir.path()).err().unwrap();
        assert_eq!(err.kind(), crate::error::ErrorKind::InvalidInput);
        let null = Path::new("/dev/null");
        if null.exists() {
            let before = std::fs::metadata(null).unwrap().mode();
            assert!(open_target(null).is_err());
            assert_eq!(std::fs::metadata(null).unwrap().mode(), before);
        }
    }

    #[test]
    fn full_preallocation_fills_every_hole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        let mut t = FileTarget::create(&p).unwrap();
        t.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        t.finish(3 << 20, Preallocation::Full).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert!(
            meta.blocks() * 512 >= 3 << 20,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        let data = std::fs::read(&p).unwrap();
        assert_eq!(&data[1 << 20..(1 << 20) + 4096], &[1u8; 4096][..]);
        assert_eq!(data.iter().filter(|&&b| b != 0).count(), 4096);
    }
}
