//! Decoders for the compression layers (gzip, xz, zstd, bzip2) and the tar unwrapper.
//!
//! Every decoder handles concatenated members/streams/frames, since parallel compressors
//! (`pigz`, `pixz`, `pzstd`, `pbzip2`) and `cat a.gz b.gz` produce them. Decoder errors are
//! classified here: invalid compressed data is [`ErrorKind::Corrupt`], a stream that stops
//! inside a member is [`ErrorKind::Truncated`]; errors of the underlying reader pass through.

use std::io::{self, BufRead, BufReader, Read};

use crate::detect::Compression;
use crate::error::{Error, ErrorKind, Result};
use crate::limits::IO_CHUNK;

/// Threads the xz decoder may use. liblzma decodes blocks in parallel only when the encoder
/// recorded block sizes (`xz -T`); two threads double throughput there and stay within the
/// two cores an importer pod usually gets.
const XZ_THREADS: u32 = 2;

/// Memory the xz decoder may use for threads before it falls back to one thread. Parallel
/// decoding holds whole blocks per thread (`xz -T` at the default preset: 24 MiB blocks, and
/// measured 57 MiB peak RSS for the whole conversion with two threads). 32 MiB keeps the
/// process under the 64 MiB target next to a full streaming budget: images compressed with
/// smaller blocks decode in parallel, default `xz -T` output decodes on one thread.
const XZ_MEMLIMIT_THREADING: u64 = 32 << 20;

/// Memory beyond which the xz decoder gives up. `xz -9` needs 65 MiB (64 MiB dictionary);
/// 256 MiB leaves room for custom presets while refusing absurd dictionaries from hostile
/// headers.
const XZ_MEMLIMIT_STOP: u64 = 256 << 20;

/// Largest pax extended header we parse while looking for the image in a tar. Real ones are a
/// few hundred bytes (path, times, size); a larger one is hostile.
const MAX_PAX_HEADER: u64 = 1 << 20;

/// A decoder for `layer` reading compressed bytes from `input`.
pub fn decoder<'a>(layer: Compression, input: Box<dyn Read + 'a>) -> Result<Box<dyn Read + 'a>> {
    // Errors of the reader below (a dropped connection) are tagged before the decoder sees
    // them, so they keep their kind instead of being taken for invalid compressed data.
    let input: Box<dyn Read + 'a> = Box::new(TagInput {
        layer,
        inner: input,
    });
    let inner: Box<dyn Read + 'a> = match layer {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
        Compression::Xz => Box::new(XzMulti::new(BufReader::with_capacity(IO_CHUNK, input))?),
        Compression::Zstd => {
            let dec = zstd::stream::read::Decoder::new(input)
                .map_err(|e| Error::io("starting zstd decoder", e))?;
            Box::new(dec)
        }
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(input)),
    };
    Ok(Box::new(Classify { layer, inner }))
}

/// Wraps the compressed input's own errors in our [`Error`] (keeping their kind).
struct TagInput<'a> {
    layer: Compression,
    inner: Box<dyn Read + 'a>,
}

impl Read for TagInput<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
                e
            } else {
                Error::io(format!("reading {} input", self.layer.name()), e).into_io()
            }
        })
    }
}

/// Turns a decoder's io errors into our kinds, naming the layer.
struct Classify<'a> {
    layer: Compression,
    inner: Box<dyn Read + 'a>,
}

impl Read for Classify<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| classify(self.layer, e))
    }
}

fn classify(layer: Compression, err: io::Error) -> io::Error {
    // Our own errors (from a reader below) and OS errors keep their meaning.
    if err.get_ref().is_some_and(|inner| inner.is::<Error>()) || err.raw_os_error().is_some() {
        return err;
    }
    let name = layer.name();
    let ours = match err.kind() {
        io::ErrorKind::UnexpectedEof => {
            Error::truncated(format!("{name} stream ends before its end marker"))
        }
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::Other => {
            Error::corrupt(format!("invalid {name} data: {err}"))
        }
        _ => return err,
    };
    ours.into_io()
}

/// xz with liblzma's multithreaded decoder, across concatenated streams.
///
/// The threaded decoder has no "concatenated" flag in the bindings, so each stream gets a fresh
/// decoder; stream padding (zero bytes in multiples of four) between streams is skipped.
struct XzMulti<R: BufRead> {
    decoder: Option<liblzma::bufread::XzDecoder<R>>,
}

impl<R: BufRead> XzMulti<R> {
    fn new(input: R) -> Result<Self> {
        Ok(XzMulti {
            decoder: Some(Self::stream_decoder(input)?),
        })
    }

    fn stream_decoder(input: R) -> Result<liblzma::bufread::XzDecoder<R>> {
        let stream = liblzma::stream::MtStreamBuilder::new()
            .threads(XZ_THREADS)
            .memlimit_threading(XZ_MEMLIMIT_THREADING)
            .memlimit_stop(XZ_MEMLIMIT_STOP)
            .decoder()
            .map_err(|e| Error::new(ErrorKind::Io, format!("starting xz decoder: {e}")))?;
        Ok(liblzma::bufread::XzDecoder::new_stream(input, stream))
    }

    /// After a stream ended: skip padding; true when another stream follows.
    fn next_stream_follows(input: &mut R) -> io::Result<bool> {
        let mut padding = 0u64;
        loop {
            let buf = input.fill_buf()?;
            if buf.is_empty() {
                if !padding.is_multiple_of(4) {
                    return Err(Error::corrupt(
                        "invalid xz data: stream padding is not a multiple of 4",
                    )
                    .into_io());
                }
                return Ok(false);
            }
            let zeros = buf.iter().take_while(|&&b| b == 0).count();
            let more = zeros < buf.len();
            input.consume(zeros);
            padding += zeros as u64;
            if more {
                if !padding.is_multiple_of(4) {
                    return Err(Error::corrupt(
                        "invalid xz data: stream padding is not a multiple of 4",
                    )
                    .into_io());
                }
                return Ok(true);
            }
        }
    }
}

impl<R: BufRead> Read for XzMulti<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let Some(dec) = self.decoder.as_mut() else {
                return Ok(0);
            };
            let n = dec.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            // End of one xz stream: is another one concatenated?
            let Some(dec) = self.decoder.take() else {
                return Ok(0);
            };
            let mut input = dec.into_inner();
            if !Self::next_stream_follows(&mut input)? {
                return Ok(0);
            }
            self.decoder = Some(Self::stream_decoder(input).map_err(Error::into_io)?);
        }
    }
}

/// The content of the first regular file in the tar archive `input`.
///
/// Directories, links, pax and GNU long-name headers before it are skipped (images are often
/// packed as `./` then `./disk.img`). A pax `size` record overrides the header size, for images
/// over 8 GiB written in the POSIX format.
pub fn tar_first_file<'a>(mut input: Box<dyn Read + 'a>) -> Result<Box<dyn Read + 'a>> {
    let mut pax_size: Option<u64> = None;
    let mut header = [0u8; 512];
    loop {
        read_block(&mut input, &mut header)?;
        if header.iter().all(|&b| b == 0) {
            return Err(Error::corrupt("tar archive holds no regular file"));
        }
        verify_checksum(&header)?;
        let size = octal_or_binary(&header[124..136])
            .ok_or_else(|| Error::corrupt("tar header has an invalid size field"))?;
        match header[156] {
            b'0' | 0 | b'7' => {
                let size = pax_size.take().unwrap_or(size);
                return Ok(Box::new(TarEntry {
                    inner: input,
                    remaining: size,
                    drained: false,
                }));
            }
            b'x' => {
                if size > MAX_PAX_HEADER {
                    return Err(Error::limit(format!(
                        "tar pax header of {size} bytes exceeds {MAX_PAX_HEADER}"
                    )));
                }
                let mut data = vec![0u8; padded(size)? as usize];
                input
                    .read_exact(&mut data)
                    .map_err(|e| Error::io("reading tar pax header", e))?;
                data.truncate(size as usize);
                if let Some(s) = pax_record(&data, "size") {
                    let s = s
                        .parse::<u64>()
                        .map_err(|_| Error::corrupt("tar pax header has an invalid size"))?;
                    pax_size = Some(s);
                }
            }
            b'S' => {
                return Err(Error::unsupported("tar entry is a GNU sparse file"));
            }
            _ => {
                // Directory, link, global pax header, GNU long name, device: skip its content.
                skip(&mut input, padded(size)?)?;
                if header[156] != b'g' {
                    // A pax `x` header applies to the next entry only, even a skipped one.
                    pax_size = None;
                }
            }
        }
    }
}

fn read_block(input: &mut dyn Read, block: &mut [u8; 512]) -> Result<()> {
    input
        .read_exact(block)
        .map_err(|e| Error::io("reading tar header", e))
}

fn skip(input: &mut dyn Read, len: u64) -> Result<()> {
    let copied = io::copy(&mut input.take(len), &mut io::sink())
        .map_err(|e| Error::io("skipping tar entry", e))?;
    if copied < len {
        return Err(Error::truncated("tar archive ends inside an entry"));
    }
    Ok(())
}

fn padded(size: u64) -> Result<u64> {
    size.checked_next_multiple_of(512)
        .ok_or_else(|| Error::corrupt("tar entry size overflows"))
}

fn verify_checksum(header: &[u8; 512]) -> Result<()> {
    let stored = octal_or_binary(&header[148..156])
        .ok_or_else(|| Error::corrupt("tar header has an invalid checksum field"))?;
    let sum: u64 = header
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    if sum != stored {
        return Err(Error::corrupt(format!(
            "tar header checksum mismatch (stored {stored}, computed {sum})"
        )));
    }
    Ok(())
}

/// A numeric tar field: octal text (NUL/space padded) or GNU base-256 (high bit set).
fn octal_or_binary(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // Base-256: the remaining bits big-endian; negative values are nonsense for sizes.
        if field[0] & 0x40 != 0 {
            return None;
        }
        let mut v: u64 = u64::from(field[0] & 0x3f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let text = field.split(|&b| b == 0).next()?;
    let text = std::str::from_utf8(text).ok()?.trim_matches(' ');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// The value of `key` in pax records ("<len> key=value\n" …).
fn pax_record<'d>(mut data: &'d [u8], key: &str) -> Option<&'d str> {
    while !data.is_empty() {
        let space = data.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&data[..space]).ok()?.parse().ok()?;
        if len <= space || len > data.len() {
            return None;
        }
        let record = std::str::from_utf8(&data[space + 1..len]).ok()?;
        let record = record.strip_suffix('\n').unwrap_or(record);
        if let Some((k, v)) = record.split_once('=')
            && k == key
        {
            return Some(v);
        }
        data = &data[len..];
    }
    None
}

/// The bytes of one tar entry; ending early is truncation, not a short image.
///
/// At the end of the entry the rest of the archive is read and discarded, so the layers
/// around the archive reach their end and verify their checksums (a `.tar.gz` CRC).
struct TarEntry<'a> {
    inner: Box<dyn Read + 'a>,
    remaining: u64,
    drained: bool,
}

impl Read for TarEntry<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.remaining == 0 {
            if !self.drained {
                io::copy(&mut self.inner, &mut io::sink())?;
                self.drained = true;
            }
            return Ok(0);
        }
        let want = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(Error::truncated(format!(
                "tar archive ends {} bytes before the end of the image",
                self.remaining
            ))
            .into_io());
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn read_all(mut r: Box<dyn Read + '_>) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        r.read_to_end(&mut out)
            .map_err(|e| Error::io("reading", e))?;
        Ok(out)
    }

    fn sample() -> Vec<u8> {
        (0..200_000u32).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn gzip_multi_member_decodes_all_members() {
        let mut data = Vec::new();
        for part in [&b"first "[..], b"second"] {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(part).unwrap();
            data.extend(enc.finish().unwrap());
        }
        let out = read_all(decoder(Compression::Gzip, Box::new(&data[..])).unwrap()).unwrap();
        assert_eq!(out, b"first second");
    }

    #[test]
    fn xz_concatenated_streams_with_padding_decode() {
        let mut data = Vec::new();
        for part in [&b"one "[..], b"two"] {
            let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 1);
            enc.write_all(part).unwrap();
            data.extend(enc.finish().unwrap());
            data.extend([0u8; 4]);
        }
        let out = read_all(decoder(Compression::Xz, Box::new(&data[..])).unwrap()).unwrap();
        assert_eq!(out, b"one two");
    }

    #[test]
    fn xz_multi_block_stream_decodes() {
        // A parallel encoder with small blocks gives a stream the threaded decoder splits.
        let stream = liblzma::stream::MtStreamBuilder::new()
            .threads(2)
            .block_size(64 << 10)
            .preset(1)
            .encoder()
            .unwrap();
        let mut enc = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
        enc.write_all(&sample()).unwrap();
        let data = enc.finish().unwrap();
        let out = read_all(decoder(Compression::Xz, Box::new(&data[..])).unwrap()).unwrap();
        assert_eq!(out, sample());
    }

    #[test]
    fn zstd_multi_frame_and_bzip2_multi_stream_decode() {
        let mut z = zstd::encode_all(&b"ab"[..], 1).unwrap();
        z.extend(zstd::encode_all(&b"cd"[..], 1).unwrap());
        let out = read_all(decoder(Compression::Zstd, Box::new(&z[..])).unwrap()).unwrap();
        assert_eq!(out, b"abcd");

        let mut b = Vec::new();
        for part in [&b"xy"[..], b"zw"] {
            let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            enc.write_all(part).unwrap();
            b.extend(enc.finish().unwrap());
        }
        let out = read_all(decoder(Compression::Bzip2, Box::new(&b[..])).unwrap()).unwrap();
        assert_eq!(out, b"xyzw");
    }

    #[test]
    fn truncated_streams_are_truncated_or_corrupt_never_short_success() {
        let data = sample();
        let gz = {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&data).unwrap();
            enc.finish().unwrap()
        };
        let xz = {
            let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 1);
            enc.write_all(&data).unwrap();
            enc.finish().unwrap()
        };
        // zstd frames carry a checksum only when the encoder adds one (the CLI does by
        // default); without it, damaged literals cannot be detected by any decoder.
        let zst = {
            let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
            enc.include_checksum(true).unwrap();
            enc.write_all(&data).unwrap();
            enc.finish().unwrap()
        };
        let bz = {
            let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            enc.write_all(&data).unwrap();
            enc.finish().unwrap()
        };
        for (layer, full) in [
            (Compression::Gzip, gz),
            (Compression::Xz, xz),
            (Compression::Zstd, zst),
            (Compression::Bzip2, bz),
        ] {
            let cut = &full[..full.len() / 2];
            let err = read_all(decoder(layer, Box::new(cut)).unwrap())
                .map(|v| v.len())
                .unwrap_err();
            assert!(
                matches!(err.kind(), ErrorKind::Truncated | ErrorKind::Corrupt),
                "{layer:?}: {err} ({:?})",
                err.kind()
            );
            let mut garbage = full.clone();
            let mid = garbage.len() / 2;
            garbage[mid..mid + 64].fill(0x55);
            let err = read_all(decoder(layer, Box::new(&garbage[..])).unwrap())
                .map(|v| v.len())
                .unwrap_err();
            assert!(
                matches!(err.kind(), ErrorKind::Corrupt | ErrorKind::Truncated),
                "{layer:?}: {err} ({:?})",
                err.kind()
            );
        }
    }

    /// Fails with a non-OS error after `ok` bytes, as an HTTP body does on a dropped
    /// connection.
    struct Failing<'d> {
        data: &'d [u8],
        ok: usize,
    }

    impl Read for Failing<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.ok == 0 {
                return Err(io::Error::other("connection reset by peer"));
            }
            let n = buf.len().min(self.ok).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            self.ok -= n;
            Ok(n)
        }
    }

    #[test]
    fn input_errors_keep_their_kind_through_every_decoder() {
        let data = sample();
        let gz = {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&data).unwrap();
            enc.finish().unwrap()
        };
        let xz = {
            let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 1);
            enc.write_all(&data).unwrap();
            enc.finish().unwrap()
        };
        let zst = zstd::encode_all(&data[..], 1).unwrap();
        let bz = {
            let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            enc.write_all(&data).unwrap();
            enc.finish().unwrap()
        };
        for (layer, full) in [
            (Compression::Gzip, gz),
            (Compression::Xz, xz),
            (Compression::Zstd, zst),
            (Compression::Bzip2, bz),
        ] {
            let input = Failing {
                data: &full,
                ok: full.len() / 2,
            };
            let err = read_all(decoder(layer, Box::new(input)).unwrap())
                .map(|v| v.len())
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Io, "{layer:?}: {err}");
            assert!(
                err.to_string().contains("connection reset"),
                "{layer:?}: {err}"
            );
        }
    }

    fn tar_with(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, content) in entries {
            let mut h = tar::Header::new_ustar();
            match content {
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, name, io::empty()).unwrap();
                }
                Some(data) => {
                    h.set_size(data.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, name, *data).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn tar_skips_directories_and_takes_first_file() {
        let t = tar_with(&[
            ("./", None),
            ("./sub/", None),
            ("./sub/disk.img", Some(b"IMAGE")),
            ("other", Some(b"no")),
        ]);
        let out = read_all(tar_first_file(Box::new(&t[..])).unwrap()).unwrap();
        assert_eq!(out, b"IMAGE");
    }

    #[test]
    fn tar_pax_size_and_long_names_are_handled() {
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("{}/disk.img", "d".repeat(150));
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        // A name over 100 bytes makes the builder emit a GNU long-name entry first.
        b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        let t = b.into_inner().unwrap();
        let out = read_all(tar_first_file(Box::new(&t[..])).unwrap()).unwrap();
        assert_eq!(out, b"abc");

        // A pax header whose size record differs from the ustar field wins.
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("size", &b"4"[..])]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(4);
        h.set_mode(0o644);
        b.append_data(&mut h, "x", &b"wxyz"[..]).unwrap();
        let t = b.into_inner().unwrap();
        let out = read_all(tar_first_file(Box::new(&t[..])).unwrap()).unwrap();
        assert_eq!(out, b"wxyz");
        assert_eq!(pax_record(b"11 size=42\n", "size"), Some("42"));
    }

    #[test]
    fn tar_truncated_entry_and_empty_archive_fail() {
        let t = tar_with(&[("disk.img", Some(&[7u8; 2000]))]);
        let err = read_all(tar_first_file(Box::new(&t[..1200])).unwrap()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Truncated);

        let t = tar_with(&[("dir/", None)]);
        let err = tar_first_file(Box::new(&t[..])).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Corrupt);

        let mut t = tar_with(&[("disk.img", Some(b"data"))]);
        t[0] ^= 0x01;
        let err = tar_first_file(Box::new(&t[..])).err().unwrap();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn numeric_fields_parse_octal_and_base256() {
        assert_eq!(octal_or_binary(b"00000001750\0"), Some(1000));
        assert_eq!(octal_or_binary(b"          \0 "), Some(0));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[7] = 0x02; // 2 << 32
        assert_eq!(octal_or_binary(&big), Some(2 << 32));
        assert_eq!(octal_or_binary(b"12x\0"), None);
    }
}
