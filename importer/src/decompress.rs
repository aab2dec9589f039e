//! Sniff-and-unwrap one compression layer in front of a stream (tar archives and registry
//! layers; disk images go through the formats engine, which does its own detection).

use std::io::{BufReader, Read};

/// Bytes needed to recognise every supported magic.
const MAGIC_LEN: usize = 6;
/// Read buffer in front of the decoders.
const READ_BUFFER: usize = 256 * 1024;

/// Which compression a stream starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// No recognised compression.
    None,
    /// gzip (possibly several members).
    Gzip,
    /// zstd.
    Zstd,
    /// xz.
    Xz,
    /// bzip2.
    Bzip2,
}

/// Recognise a compression magic at the start of `head`.
pub fn sniff(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Compression::Xz
    } else if head.starts_with(b"BZh") {
        Compression::Bzip2
    } else {
        Compression::None
    }
}

/// `input`, decompressed if it starts with a known magic.
pub fn unwrap<'a>(mut input: impl Read + 'a) -> std::io::Result<(Compression, Box<dyn Read + 'a>)> {
    // Read the magic fully even if the source hands out tiny chunks.
    let mut head = Vec::with_capacity(MAGIC_LEN);
    while head.len() < MAGIC_LEN {
        let mut byte = [0u8; MAGIC_LEN];
        let n = input.read(&mut byte[..MAGIC_LEN - head.len()])?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&byte[..n]);
    }
    let kind = sniff(&head);
    let buffered = BufReader::with_capacity(READ_BUFFER, std::io::Cursor::new(head).chain(input));
    let reader: Box<dyn Read + 'a> = match kind {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?),
        Compression::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(buffered)),
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(buffered)),
    };
    Ok((kind, reader))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn gzip_and_zstd_round_trip() {
        let data = b"hello tar world".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let gz = gz.finish().unwrap();
        let (kind, mut r) = unwrap(&gz[..]).unwrap();
        assert_eq!(kind, Compression::Gzip);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);

        let zst = zstd::encode_all(&data[..], 1).unwrap();
        let (kind, mut r) = unwrap(&zst[..]).unwrap();
        assert_eq!(kind, Compression::Zstd);
        out.clear();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);

        let (kind, _) = unwrap(&data[..]).unwrap();
        assert_eq!(kind, Compression::None);
    }
}
