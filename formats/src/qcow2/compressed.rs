//! Inflating one compressed cluster: raw deflate (QEMU's "zlib") or one zstd frame.
//!
//! The stored range of a compressed cluster ends on a sector boundary and may hold the start of
//! the next compressed cluster after this one's data, so decoding stops once the stream or
//! frame ends and reports how many input bytes it used. The output must be exactly one cluster.

use flate2::{Decompress, FlushDecompress, Status};
use zstd::stream::raw::{Decoder as ZstdDecoder, InBuffer, Operation, OutBuffer};

use super::header::Compression;

/// Why a compressed cluster did not decode.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// The input ended before the cluster was complete (the range was cut short, e.g. at EOF).
    ShortInput,
    /// The data is not valid or does not decode to exactly one cluster.
    Invalid(String),
}

/// Decode `input` into `out` (one cluster). Returns the input bytes used.
pub(crate) fn decode(
    kind: Compression,
    input: &[u8],
    out: &mut [u8],
) -> Result<usize, DecodeError> {
    match kind {
        Compression::Zlib => inflate(input, out),
        Compression::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<usize, DecodeError> {
    let mut d = Decompress::new(false);
    let (mut used, mut made) = (0usize, 0usize);
    let mut ended = false;
    while made < out.len() {
        let status = d
            .decompress(&input[used..], &mut out[made..], FlushDecompress::None)
            .map_err(|e| DecodeError::Invalid(format!("invalid deflate data: {e}")))?;
        let (now_used, now_made) = (d.total_in() as usize, d.total_out() as usize);
        let progressed = now_used != used || now_made != made;
        (used, made) = (now_used, now_made);
        if status == Status::StreamEnd {
            ended = true;
            break;
        }
        if !progressed {
            return Err(stalled(used, input.len(), made));
        }
    }
    if made < out.len() {
        return Err(too_short(made, out.len()));
    }
    if !ended {
        // QEMU accepts a full cluster without the end marker, but never more than a cluster.
        let mut probe = [0u8; 1];
        let before = d.total_out();
        let _ = d.decompress(&input[used..], &mut probe, FlushDecompress::None);
        if d.total_out() != before {
            return Err(DecodeError::Invalid(format!(
                "compressed data decodes to more than {} bytes",
                out.len()
            )));
        }
    }
    Ok(used)
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<usize, DecodeError> {
    let mut dec =
        ZstdDecoder::new().map_err(|e| DecodeError::Invalid(format!("zstd decoder: {e}")))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let (used, made) = (inb.pos(), outb.pos());
        let hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| DecodeError::Invalid(format!("invalid zstd data: {e}")))?;
        if hint == 0 {
            break;
        }
        if inb.pos() == used && outb.pos() == made {
            if outb.pos() == outb.capacity() {
                return Err(DecodeError::Invalid(format!(
                    "compressed data decodes to more than {} bytes",
                    outb.capacity()
                )));
            }
            return Err(stalled(inb.pos(), input.len(), outb.pos()));
        }
    }
    let (used, made) = (inb.pos(), outb.pos());
    if made < outb.capacity() {
        return Err(too_short(made, outb.capacity()));
    }
    Ok(used)
}

fn stalled(used: usize, available: usize, made: usize) -> DecodeError {
    if used >= available {
        DecodeError::ShortInput
    } else {
        DecodeError::Invalid(format!(
            "compressed data stopped decoding after {made} bytes"
        ))
    }
}

fn too_short(made: usize, want: usize) -> DecodeError {
    DecodeError::Invalid(format!(
        "compressed data decodes to {made} bytes instead of {want}"
    ))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn deflate_cluster_decodes_and_reports_bytes_used() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut packed = deflate(&data);
        let used_len = packed.len();
        packed.extend_from_slice(&[0xee; 300]); // the next cluster's bytes in the same sector
        let mut out = vec![0u8; 4096];
        let used = decode(Compression::Zlib, &packed, &mut out).unwrap();
        assert_eq!(used, used_len);
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_cluster_decodes_and_ignores_trailing_bytes() {
        let data = vec![0x5au8; 8192];
        let mut packed = zstd::bulk::compress(&data, 3).unwrap();
        let used_len = packed.len();
        packed.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3]);
        let mut out = vec![0u8; 8192];
        let used = decode(Compression::Zstd, &packed, &mut out).unwrap();
        assert_eq!(used, used_len);
        assert_eq!(out, data);
    }

    #[test]
    fn deflate_of_a_smaller_cluster_is_invalid() {
        let packed = deflate(&[1u8; 1000]);
        let mut out = vec![0u8; 4096];
        let err = decode(Compression::Zlib, &packed, &mut out).unwrap_err();
        assert!(matches!(err, DecodeError::Invalid(m) if m.contains("1000 bytes instead of 4096")));
    }

    #[test]
    fn deflate_of_a_larger_cluster_is_invalid() {
        let packed = deflate(&[1u8; 8192]);
        let mut out = vec![0u8; 4096];
        let err = decode(Compression::Zlib, &packed, &mut out).unwrap_err();
        assert!(matches!(err, DecodeError::Invalid(m) if m.contains("more than 4096")));
    }

    #[test]
    fn cut_deflate_stream_is_short_input() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 253) as u8).collect();
        let packed = deflate(&data);
        let mut out = vec![0u8; 4096];
        let err = decode(Compression::Zlib, &packed[..packed.len() / 2], &mut out).unwrap_err();
        assert_eq!(err, DecodeError::ShortInput);
    }

    #[test]
    fn garbage_is_invalid_not_a_panic() {
        let mut out = vec![0u8; 4096];
        assert!(decode(Compression::Zlib, &[0xff; 64], &mut out).is_err());
        assert!(decode(Compression::Zstd, &[0xff; 64], &mut out).is_err());
    }
}
