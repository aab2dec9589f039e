//! The one factory for random-access images, and the copy loop that turns a [`DiskImage`] into
//! sink calls.
//!
//! Random access is used for local files and for streams spooled to scratch: the loop asks the
//! image what backs each run ([`DiskImage::extent`]), reads data runs in [`IO_CHUNK`] pieces and
//! reports zero runs without reading anything.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::detect::ImageFormat;
use crate::error::{Error, Result};
use crate::image::{DiskImage, ExtentKind, ExtentSink, FormatInfo, OpenOptions};
use crate::limits::IO_CHUNK;
use crate::read_at::ReadAt;
use crate::{qcow2, vdi, vhd, vhdx, vmdk};

/// Open `src` as an image of `format` for random access.
///
/// Raw and ISO images have no reader here: they are copied as streams. A tar archive is
/// unwrapped before this point.
pub fn open_image(
    format: ImageFormat,
    src: Arc<dyn ReadAt>,
    opts: &OpenOptions,
) -> Result<Box<dyn DiskImage>> {
    match format {
        ImageFormat::Qcow2 => qcow2::open(src, opts),
        ImageFormat::Vmdk => vmdk::open(src, opts),
        ImageFormat::Vdi => vdi::open(src, opts),
        ImageFormat::Vhd => vhd::open(src, opts),
        ImageFormat::Vhdx => vhdx::open(src, opts),
        ImageFormat::Raw | ImageFormat::Iso | ImageFormat::Tar => Err(Error::new(
            crate::error::ErrorKind::InvalidInput,
            format!("{format} images are copied as streams, not opened"),
        )),
    }
}

/// What the header in `head` says, for formats that have one; `None` for raw, ISO and tar.
pub fn probe_format(format: ImageFormat, head: &[u8]) -> Result<Option<FormatInfo>> {
    let info = match format {
        ImageFormat::Qcow2 => qcow2::probe(head)?,
        ImageFormat::Vmdk => vmdk::probe(head)?,
        ImageFormat::Vdi => vdi::probe(head)?,
        ImageFormat::Vhd => vhd::probe(head)?,
        ImageFormat::Vhdx => vhdx::probe(head)?,
        ImageFormat::Raw | ImageFormat::Iso | ImageFormat::Tar => return Ok(None),
    };
    Ok(Some(info))
}

/// Report every byte of `image` to `sink`: data runs read in [`IO_CHUNK`] pieces, zero runs as
/// zero ranges. Calls `sink.begin` with the virtual size first.
pub fn copy_image(image: &mut dyn DiskImage, sink: &mut dyn ExtentSink) -> Result<()> {
    let size = image.virtual_size();
    sink.begin(Some(size))?;
    let mut offset = 0u64;
    while offset < size {
        let extent = image.extent(offset, size - offset)?;
        if extent.len == 0 {
            return Err(Error::corrupt(format!(
                "{} reader returned an empty extent at {offset} below the virtual size {size}",
                image.format()
            )));
        }
        let len = extent.len.min(size - offset);
        match extent.kind {
            ExtentKind::Zero => sink.zero(offset, len)?,
            ExtentKind::Data => {
                let end = offset + len;
                let mut pos = offset;
                while pos < end {
                    let n = usize::try_from(end - pos).unwrap_or(IO_CHUNK).min(IO_CHUNK);
                    // The sink's own buffer when it lends one: read straight into it.
                    let mut buf = sink.take_buffer()?;
                    if buf.len() < n {
                        buf.resize(n, 0);
                    }
                    image.read_exact_at(&mut buf[..n], pos)?;
                    sink.data_buffer(pos, buf, n)?;
                    pos += n as u64;
                }
            }
        }
        offset += len;
    }
    Ok(())
}

/// A [`ReadAt`] that counts the bytes read through it (the report's `input_bytes`).
pub struct CountingReadAt<R: ReadAt + ?Sized> {
    count: Arc<AtomicU64>,
    inner: Arc<R>,
}

impl<R: ReadAt + ?Sized> CountingReadAt<R> {
    /// Wrap `inner`; `count` grows by every byte read.
    pub fn new(inner: Arc<R>, count: Arc<AtomicU64>) -> Self {
        CountingReadAt { count, inner }
    }
}

impl<R: ReadAt + ?Sized> ReadAt for CountingReadAt<R> {
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)?;
        self.count.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// A [`std::io::Read`] that counts the bytes read through it.
pub struct CountingReader<R> {
    count: Arc<AtomicU64>,
    inner: R,
}

impl<R> CountingReader<R> {
    /// Wrap `inner`; `count` grows by every byte read.
    pub fn new(inner: R, count: Arc<AtomicU64>) -> Self {
        CountingReader { count, inner }
    }
}

impl<R: io::Read> io::Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Extent;

    /// An in-memory image: `map` gives each 4 KiB block as data (`Some(byte)`) or zero.
    #[derive(Debug)]
    struct Blocks {
        map: Vec<Option<u8>>,
        max_extent: u64,
    }

    const BS: u64 = 4096;

    impl DiskImage for Blocks {
        fn format(&self) -> ImageFormat {
            ImageFormat::Qcow2
        }
        fn virtual_size(&self) -> u64 {
            self.map.len() as u64 * BS
        }
        fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent> {
            let i = (offset / BS) as usize;
            let Some(first) = self.map.get(i) else {
                return Ok(Extent {
                    len: 0,
                    kind: ExtentKind::Zero,
                });
            };
            let kind = if first.is_some() {
                ExtentKind::Data
            } else {
                ExtentKind::Zero
            };
            let mut end = i + 1;
            while end < self.map.len() && self.map[end].is_some() == first.is_some() {
                end += 1;
            }
            let len = (end as u64 * BS - offset).min(max_len).min(self.max_extent);
            Ok(Extent { len, kind })
        }
        fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
            for (k, b) in buf.iter_mut().enumerate() {
                let i = ((offset + k as u64) / BS) as usize;
                *b = self.map[i].ok_or_else(|| Error::corrupt("read of a zero block"))?;
            }
            Ok(())
        }
    }

    #[derive(Default)]
    struct Collect {
        size: Option<u64>,
        data: Vec<(u64, u64)>,
        zero: Vec<(u64, u64)>,
    }

    impl ExtentSink for Collect {
        fn begin(&mut self, virtual_size: Option<u64>) -> Result<()> {
            self.size = virtual_size;
            Ok(())
        }
        fn data(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
            self.data.push((offset, buf.len() as u64));
            Ok(())
        }
        fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
            self.zero.push((offset, len));
            Ok(())
        }
    }

    #[test]
    fn copy_loop_reads_data_runs_and_reports_zero_runs() {
        let mut img = Blocks {
            map: vec![None, Some(1), Some(2), None, None, Some(3)],
            max_extent: u64::MAX,
        };
        let mut sink = Collect::default();
        copy_image(&mut img, &mut sink).unwrap();
        assert_eq!(sink.size, Some(6 * BS));
        assert_eq!(sink.data, vec![(BS, 2 * BS), (5 * BS, BS)]);
        assert_eq!(sink.zero, vec![(0, BS), (3 * BS, 2 * BS)]);
    }

    #[test]
    fn long_data_runs_are_read_in_chunks() {
        let blocks = (IO_CHUNK as u64 * 2 + BS) / BS;
        let mut img = Blocks {
            map: vec![Some(7); blocks as usize],
            max_extent: u64::MAX,
        };
        let mut sink = Collect::default();
        copy_image(&mut img, &mut sink).unwrap();
        assert!(sink.data.iter().all(|&(_, l)| l <= IO_CHUNK as u64));
        assert_eq!(sink.data.iter().map(|&(_, l)| l).sum::<u64>(), blocks * BS);
    }

    #[test]
    fn an_empty_extent_inside_the_disk_is_corrupt() {
        let mut img = Blocks {
            map: vec![Some(1); 2],
            max_extent: 0,
        };
        let err = copy_image(&mut img, &mut Collect::default()).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Corrupt);
    }
}
