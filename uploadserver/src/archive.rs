//! Archive uploads (`/v1beta1/upload-archive`): a tar stream, possibly compressed, unpacked
//! into the volume's directory instead of converted into a disk image.
//!
//! Entries are unpacked into a staging directory next to the destination first (the tar crate
//! refuses `..` and absolute paths) and moved into place only when the whole archive was read,
//! so a failed or cut upload leaves the volume as it was.

use std::io::{self, Cursor, Read};
use std::path::Path;

use cdi_formats::detect::{Compression, ImageFormat, Sniffed, sniff};
use cdi_formats::{ConvertReport, Error};

/// Staging directory name inside the volume directory.
pub const STAGING_DIR: &str = ".cdi-archive-staging";
/// Compression layers tolerated around the tar stream (`.tar.gz` is one; more is abuse).
const MAX_LAYERS: usize = 2;
/// Bytes sniffed to recognise a layer: a tar header block.
const HEAD: usize = 512;

fn read_head(reader: &mut dyn Read) -> io::Result<Vec<u8>> {
    let mut head = vec![0u8; HEAD];
    let mut n = 0;
    while n < HEAD {
        match reader.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    head.truncate(n);
    Ok(head)
}

/// Unpack the (optionally gzip/xz/zstd/bzip2-compressed) tar stream `input` into `dir`.
pub fn extract(input: Box<dyn Read>, dir: &Path) -> Result<ConvertReport, Error> {
    let staging = dir.join(STAGING_DIR);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .map_err(|e| Error::io(format!("creating {}", staging.display()), e))?;
    let result = unpack(input, &staging).and_then(|report| {
        publish(&staging, dir)?;
        Ok(report)
    });
    let _ = std::fs::remove_dir_all(&staging);
    result
}

fn unpack(input: Box<dyn Read>, staging: &Path) -> Result<ConvertReport, Error> {
    let mut reader: Box<dyn Read> = input;
    let mut compression: Vec<Compression> = Vec::new();
    loop {
        let head = read_head(&mut reader).map_err(|e| Error::io("reading archive header", e))?;
        let replay: Box<dyn Read> = Box::new(Cursor::new(head.clone()).chain(reader));
        match sniff(&head) {
            Sniffed::Compressed(c) if compression.len() < MAX_LAYERS => {
                compression.push(c);
                reader = cdi_formats::decompress::decoder(c, replay)?;
            }
            Sniffed::Format(ImageFormat::Tar) => {
                reader = replay;
                break;
            }
            _ => return Err(Error::unsupported("archive upload is not a tar archive")),
        }
    }
    let mut counted = Counting {
        inner: reader,
        bytes: 0,
    };
    tar::Archive::new(&mut counted)
        .unpack(staging)
        .map_err(|e| Error::io("unpacking archive", e))?;
    // Read the end-of-archive padding and whatever follows to the end, so the stream's own end
    // (and its digest check) is reached before the upload counts as complete.
    io::copy(&mut counted, &mut io::sink()).map_err(|e| Error::io("reading archive end", e))?;
    Ok(ConvertReport {
        compression,
        from_tar: true,
        format: ImageFormat::Tar,
        virtual_size: 0,
        target_size: 0,
        input_bytes: counted.bytes,
        data_bytes: counted.bytes,
        zero_bytes: 0,
        scratch_bytes: 0,
        streamed: true,
    })
}

struct Counting<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

fn publish(staging: &Path, dir: &Path) -> Result<(), Error> {
    let entries =
        std::fs::read_dir(staging).map_err(|e| Error::io("listing unpacked archive", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing unpacked archive", e))?;
        let to = dir.join(entry.file_name());
        if let Ok(meta) = std::fs::symlink_metadata(&to) {
            let removed = if meta.is_dir() {
                std::fs::remove_dir_all(&to)
            } else {
                std::fs::remove_file(&to)
            };
            removed.map_err(|e| Error::io(format!("replacing {}", to.display()), e))?;
        }
        std::fs::rename(entry.path(), &to)
            .map_err(|e| Error::io(format!("moving {}", to.display()), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn tar_is_unpacked_into_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let tar = tar_with(&[("a.txt", b"hello"), ("sub/b.bin", &[7u8; 3000])]);
        let report = extract(Box::new(Cursor::new(tar)), dir.path()).unwrap();
        assert!(report.from_tar);
        assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"hello");
        assert_eq!(
            std::fs::read(dir.path().join("sub/b.bin")).unwrap(),
            vec![7u8; 3000]
        );
        assert!(!dir.path().join(STAGING_DIR).exists());
    }

    #[test]
    fn non_tar_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let err = extract(Box::new(Cursor::new(vec![1u8; 4096])), dir.path()).unwrap_err();
        assert_eq!(err.kind(), cdi_formats::ErrorKind::Unsupported);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn truncated_tar_publishes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let tar = tar_with(&[("a.txt", b"hello"), ("big.bin", &[1u8; 8192])]);
        let cut = tar[..tar.len() / 2].to_vec();
        assert!(extract(Box::new(Cursor::new(cut)), dir.path()).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
