//! Unwrap one compression layer in front of a stream (tar archives and registry layers; disk
//! images go through the formats engine's whole detection chain instead). Sniffing and the
//! decoders are the formats engine's, so every compression it knows is known here too.

use std::io::{BufReader, Read};

use cdi_formats::detect::{Sniffed, sniff};

pub use cdi_formats::Compression;

/// Bytes needed to recognise every compression magic (xz's is the longest).
const MAGIC_LEN: usize = 6;
/// Read buffer in front of the decoders.
const READ_BUFFER: usize = 256 * 1024;

/// `input`, decompressed if it starts with a known compression magic (`None`: plain).
pub fn unwrap<'a>(
    mut input: impl Read + 'a,
) -> std::io::Result<(Option<Compression>, Box<dyn Read + 'a>)> {
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
    let kind = match sniff(&head) {
        Sniffed::Compressed(c) => Some(c),
        Sniffed::Format(_) => None,
    };
    let buffered = BufReader::with_capacity(READ_BUFFER, std::io::Cursor::new(head).chain(input));
    let reader: Box<dyn Read + 'a> = match kind {
        None => Box::new(buffered),
        Some(c) => cdi_formats::decompress::decoder(c, Box::new(buffered))
            .map_err(cdi_formats::Error::into_io)?,
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
        assert_eq!(kind, Some(Compression::Gzip));
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);

        let zst = zstd::encode_all(&data[..], 1).unwrap();
        let (kind, mut r) = unwrap(&zst[..]).unwrap();
        assert_eq!(kind, Some(Compression::Zstd));
        out.clear();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);

        let (kind, _) = unwrap(&data[..]).unwrap();
        assert_eq!(kind, None);
    }
}
