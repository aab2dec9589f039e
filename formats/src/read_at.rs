//! Positioned, read-only byte storage that random-access format readers open images from.
//!
//! Implemented for local files (and, through the importer, for HTTP range requests and spooled
//! scratch files) and for byte slices in tests and fuzzing.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Random-access bytes an image is read from.
///
/// Contract: `read_exact_at` fills `buf` completely or fails; a read that reaches past
/// [`ReadAt::size`] fails with `io::ErrorKind::UnexpectedEof` (format readers turn that into a
/// "table outside the file" error rather than reading zeroes, unlike qemu-img).
pub trait ReadAt: Send + Sync {
    /// Length of the storage in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fill `buf` from `offset`; never short.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = self.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> io::Result<u64> {
        self.as_slice().size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for std::sync::Arc<T> {
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

fn eof() -> io::Error {
    io::Error::from(io::ErrorKind::UnexpectedEof)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_read_past_end_is_unexpected_eof() {
        let data = vec![1u8, 2, 3];
        let mut buf = [0u8; 2];
        let err = data.read_exact_at(&mut buf, 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn slice_read_inside_returns_bytes() {
        let data = vec![1u8, 2, 3];
        let mut buf = [0u8; 2];
        data.read_exact_at(&mut buf, 1).unwrap();
        assert_eq!(buf, [2, 3]);
    }
}
