//! Raw (and ISO) images from a stream: copy the bytes, let the sink find zero blocks.
//!
//! A raw stream's size is known only at its end, so the sink is begun with `None` and checks
//! the target capacity as data arrives. A fixed VHD is a raw disk followed by a 512-byte
//! footer; the last 512 bytes are therefore held back until the end of the stream and, if a
//! footer recognizer accepts them, never reach the disk.

use std::io::{self, Read};

use crate::error::{Error, Result};
use crate::image::{ExtentSink, FormatInfo};
use crate::limits::IO_CHUNK;

/// Size of a VHD footer.
pub const VHD_FOOTER_LEN: usize = 512;

/// Recognises a fixed-VHD footer in the last 512 bytes of a stream.
pub type FooterCheck<'f> = &'f dyn Fn(&[u8; VHD_FOOTER_LEN]) -> Option<FormatInfo>;

/// What a raw stream turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawOutcome {
    /// Guest bytes written (the disk size).
    pub len: u64,
    /// The fixed-VHD footer that ended the stream and was dropped, if any.
    pub vhd_footer: Option<FormatInfo>,
}

/// Fill `buf` from `input`; fewer bytes only at the end of the stream.
pub(crate) fn read_full(input: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Copy a raw image from `input` (positioned at byte 0) into `sink`.
///
/// `known_len` is the image size when the caller knows it (a local file): the sink can then
/// refuse a too-small target before anything is written, and checks that exactly that many
/// bytes arrive. With `footer`, the last 512 bytes are checked with it and dropped when
/// recognised (only for streams of unknown length; a file's footer is found by its caller).
pub fn stream(
    input: &mut dyn Read,
    out: &mut dyn ExtentSink,
    footer: Option<FooterCheck<'_>>,
    known_len: Option<u64>,
) -> Result<RawOutcome> {
    let footer = if known_len.is_some() { None } else { footer };
    out.begin(known_len)?;
    let hold = if footer.is_some() { VHD_FOOTER_LEN } else { 0 };
    // One chunk plus the held-back tail: chunks stay IO_CHUNK-aligned in guest offsets.
    let cap = IO_CHUNK + hold;
    let mut buf = sized(out.take_buffer()?, cap);
    let mut tail = [0u8; VHD_FOOTER_LEN];
    let mut held = 0usize;
    let mut offset = 0u64;
    loop {
        let n = read_full(input, &mut buf[held..cap])
            .map_err(|e| Error::io(format!("reading image data at {}", offset + held as u64), e))?;
        let filled = held + n;
        if filled < cap {
            // End of stream: `buf[..filled]` is the rest.
            let mut vhd_footer = None;
            let mut data_len = filled;
            if let Some(check) = footer
                && filled >= VHD_FOOTER_LEN
            {
                tail.copy_from_slice(&buf[filled - VHD_FOOTER_LEN..filled]);
                if let Some(info) = check(&tail) {
                    data_len = filled - VHD_FOOTER_LEN;
                    let disk = offset + data_len as u64;
                    if let Some(size) = info.virtual_size
                        && size != disk
                    {
                        return Err(Error::corrupt(format!(
                            "fixed vhd footer says the disk has {size} bytes but {disk} bytes \
                             precede it"
                        )));
                    }
                    vhd_footer = Some(info);
                }
            }
            out.data_buffer(offset, buf, data_len)?;
            return Ok(RawOutcome {
                len: offset + data_len as u64,
                vhd_footer,
            });
        }
        let emit = filled - hold;
        // The held-back tail moves to the front of the next buffer.
        tail[..hold].copy_from_slice(&buf[emit..filled]);
        out.data_buffer(offset, buf, emit)?;
        offset += emit as u64;
        buf = sized(out.take_buffer()?, cap);
        buf[..hold].copy_from_slice(&tail[..hold]);
        held = hold;
    }
}

/// `buf` with at least `len` bytes.
fn sized(mut buf: Vec<u8>, len: usize) -> Vec<u8> {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    buf
}

/// A local raw (or ISO) file read in place, holes and all: the file system says where its data
/// is (`SEEK_DATA`/`SEEK_HOLE`), so a sparse source's holes become zero ranges without being
/// read, as `qemu-img convert` does. Data runs are still scanned for zero blocks by the sink.
pub struct RawFile {
    format: crate::detect::ImageFormat,
    /// For `lseek`; reads go through `src` so they are counted.
    file: std::fs::File,
    src: std::sync::Arc<dyn crate::read_at::ReadAt>,
    size: u64,
    /// False once the file system refused `SEEK_DATA`: everything then reads as data.
    seekable: bool,
}

impl std::fmt::Debug for RawFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawFile")
            .field("format", &self.format)
            .field("size", &self.size)
            .field("seekable", &self.seekable)
            .finish_non_exhaustive()
    }
}

impl RawFile {
    /// `file` opened for reading, `size` bytes long; reads go through `src` (the same file).
    pub fn new(
        format: crate::detect::ImageFormat,
        file: std::fs::File,
        src: std::sync::Arc<dyn crate::read_at::ReadAt>,
        size: u64,
    ) -> Self {
        RawFile {
            format,
            file,
            src,
            size,
            seekable: true,
        }
    }

    /// Where the next data at or after `offset` starts (`size` when none), or `None` when the
    /// file system cannot tell.
    fn next_data(&self, offset: u64) -> Option<u64> {
        use nix::unistd::{Whence, lseek};
        let at = i64::try_from(offset).ok()?;
        match lseek(&self.file, at, Whence::SeekData) {
            Ok(pos) => u64::try_from(pos).ok(),
            // No data after `offset`: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => Some(self.size),
            Err(_) => None,
        }
    }

    fn next_hole(&self, offset: u64) -> Option<u64> {
        use nix::unistd::{Whence, lseek};
        let at = i64::try_from(offset).ok()?;
        lseek(&self.file, at, Whence::SeekHole)
            .ok()
            .and_then(|pos| u64::try_from(pos).ok())
    }
}

impl crate::image::DiskImage for RawFile {
    fn format(&self) -> crate::detect::ImageFormat {
        self.format
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn extent(&mut self, offset: u64, max_len: u64) -> Result<crate::image::Extent> {
        use crate::image::{Extent, ExtentKind};
        let left = self.size.saturating_sub(offset).min(max_len);
        if left == 0 {
            return Ok(Extent {
                len: 0,
                kind: ExtentKind::Data,
            });
        }
        let data = |len: u64| Extent {
            len,
            kind: ExtentKind::Data,
        };
        if !self.seekable {
            return Ok(data(left));
        }
        let Some(next_data) = self.next_data(offset) else {
            self.seekable = false;
            return Ok(data(left));
        };
        if next_data > offset {
            return Ok(Extent {
                len: (next_data - offset).min(left),
                kind: ExtentKind::Zero,
            });
        }
        // Data at `offset`; it runs to the next hole (the end of the file at the latest). A
        // file that changed under us only shortens or lengthens a run; never zero-length.
        let hole = self.next_hole(offset).unwrap_or(self.size);
        Ok(data(hole.saturating_sub(offset).clamp(1, left)))
    }

    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.src
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(format!("reading image data at {offset}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::ImageFormat;

    /// Records everything a producer sends, for checking byte-exact output.
    #[derive(Default)]
    struct Collect {
        begun: Option<Option<u64>>,
        bytes: Vec<u8>,
    }

    impl ExtentSink for Collect {
        fn begin(&mut self, virtual_size: Option<u64>) -> Result<()> {
            self.begun = Some(virtual_size);
            Ok(())
        }
        fn data(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
            assert_eq!(offset, self.bytes.len() as u64, "raw data arrives in order");
            self.bytes.extend_from_slice(buf);
            Ok(())
        }
        fn zero(&mut self, _offset: u64, _len: u64) -> Result<()> {
            panic!("raw streams report data only; the sink finds zeroes");
        }
    }

    fn footer_marker(tail: &[u8; VHD_FOOTER_LEN]) -> Option<FormatInfo> {
        tail.starts_with(b"conectix").then(|| FormatInfo {
            format: ImageFormat::Vhd,
            virtual_size: None,
            cluster_size: None,
            subformat: Some("fixed".into()),
            backing_file: None,
            streamable: true,
        })
    }

    fn image(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 253) as u8).collect()
    }

    #[test]
    fn copies_every_byte_for_sizes_around_chunk_edges() {
        for len in [
            0,
            1,
            511,
            512,
            513,
            IO_CHUNK - 1,
            IO_CHUNK,
            IO_CHUNK + 1,
            2 * IO_CHUNK + 700,
        ] {
            let data = image(len);
            for check in [None, Some(&footer_marker as FooterCheck<'_>)] {
                let mut sink = Collect::default();
                let out = stream(&mut &data[..], &mut sink, check, None).unwrap();
                assert_eq!(out.len, len as u64);
                assert_eq!(out.vhd_footer, None);
                assert_eq!(sink.bytes, data, "len {len}");
                assert_eq!(sink.begun, Some(None));
            }
        }
    }

    #[test]
    fn fixed_vhd_footer_is_held_back_and_dropped() {
        for len in [0, 4096, IO_CHUNK - 100, IO_CHUNK, 3 * IO_CHUNK] {
            let mut data = image(len);
            let mut footer = [0u8; VHD_FOOTER_LEN];
            footer[..8].copy_from_slice(b"conectix");
            data.extend_from_slice(&footer);
            let mut sink = Collect::default();
            let out = stream(&mut &data[..], &mut sink, Some(&footer_marker), None).unwrap();
            assert_eq!(out.len, len as u64);
            assert_eq!(out.vhd_footer.map(|i| i.format), Some(ImageFormat::Vhd));
            assert_eq!(sink.bytes, &data[..len]);
            // Without the check the footer is data like any other.
            let mut sink = Collect::default();
            let out = stream(&mut &data[..], &mut sink, None, None).unwrap();
            assert_eq!(out.len, (len + VHD_FOOTER_LEN) as u64);
        }
    }

    #[test]
    fn lent_buffers_give_the_same_disk_as_copies() {
        use crate::sink::TargetSink;
        use crate::target::{FileTarget, Target};
        let dir = tempfile::tempdir().unwrap();
        for len in [
            0,
            700,
            IO_CHUNK - 1,
            IO_CHUNK,
            IO_CHUNK + 1,
            3 * IO_CHUNK + 4096,
        ] {
            let mut data = image(len);
            // A zero stretch across a chunk edge.
            let z = len.min(IO_CHUNK + 8192);
            data[len.min(IO_CHUNK - 8192)..z].fill(0);
            let mut with_footer = data.clone();
            let mut footer = [0u8; VHD_FOOTER_LEN];
            footer[..8].copy_from_slice(b"conectix");
            with_footer.extend_from_slice(&footer);
            for (input, check) in [
                (&data, None),
                (&with_footer, Some(&footer_marker as FooterCheck<'_>)),
            ] {
                for piped in [false, true] {
                    let path = dir.path().join(format!("{len}-{piped}"));
                    let mut t = FileTarget::create(&path).unwrap();
                    let out = if piped {
                        std::thread::scope(|s| {
                            let mut sink = TargetSink::pipelined(s, &mut t, None).unwrap();
                            let out = stream(&mut &input[..], &mut sink, check, None);
                            sink.finish().unwrap();
                            out
                        })
                    } else {
                        let mut sink = TargetSink::new(&mut t, None).unwrap();
                        let out = stream(&mut &input[..], &mut sink, check, None);
                        sink.finish().unwrap();
                        out
                    }
                    .unwrap();
                    assert_eq!(out.len, len as u64);
                    assert_eq!(out.vhd_footer.is_some(), check.is_some());
                    t.finish(out.len, crate::target::Preallocation::Off)
                        .unwrap();
                    assert_eq!(
                        std::fs::read(&path).unwrap(),
                        data,
                        "len {len} piped {piped}"
                    );
                }
            }
        }
    }

    #[test]
    fn footer_size_disagreeing_with_data_is_corrupt() {
        let mut data = image(8192);
        data.extend_from_slice(b"conectix");
        data.resize(8192 + VHD_FOOTER_LEN, 0);
        let lying = |t: &[u8; VHD_FOOTER_LEN]| {
            footer_marker(t).map(|mut i| {
                i.virtual_size = Some(1 << 30);
                i
            })
        };
        let err = stream(&mut &data[..], &mut Collect::default(), Some(&lying), None).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Corrupt);
    }
    #[test]
    fn local_sparse_raw_skips_holes_and_gives_the_same_disk() {
        use crate::convert::{ConvertOptions, convert_path};
        use crate::target::FileTarget;
        use std::os::unix::fs::FileExt;
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("sparse.raw");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 * MIB).unwrap();
        // Two data islands in a 64 MiB hole.
        let island = image(3 * MIB as usize + 5000);
        f.write_all_at(&island, 5 * MIB).unwrap();
        f.write_all_at(&island[..700_000], 40 * MIB + 123).unwrap();
        drop(f);
        let expected = std::fs::read(&src).unwrap();

        let out = dir.path().join("out.raw");
        let mut t = FileTarget::create(&out).unwrap();
        let report = convert_path(&src, &mut t, &ConvertOptions::default()).unwrap();
        assert_eq!(report.format, ImageFormat::Raw);
        assert_eq!(report.virtual_size, 64 * MIB);
        assert_eq!(std::fs::read(&out).unwrap(), expected);
        // Where the file system reports holes (every Linux one the tests run on), only the
        // data islands are read, in whole file-system blocks.
        let probe = std::fs::File::open(&src).unwrap();
        let reports_holes =
            nix::unistd::lseek(&probe, 0, nix::unistd::Whence::SeekData) == Ok(5 * MIB as i64);
        if reports_holes {
            assert!(
                report.input_bytes < 8 * MIB,
                "holes were read: {} bytes",
                report.input_bytes
            );
        } else {
            println!("SKIPPED hole check: this file system does not report holes");
        }
        // Holes in the source are holes in the output.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&out).unwrap().blocks() * 512 < 16 * MIB);
    }
}
