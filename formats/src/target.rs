//! Where converted raw bytes land: a regular file (sparse) or a block device.

use std::io;

use serde::Serialize;

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
