//! `algo:hex` checksums over the downloaded bytes (before any decompression), as upstream's
//! `spec.source.http.checksum`.

use md5::Digest as _;

use crate::error::{ImportError, Result};

/// A supported digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// MD5 (32 hex digits).
    Md5,
    /// SHA-1 (40).
    Sha1,
    /// SHA-256 (64).
    Sha256,
    /// SHA-512 (128).
    Sha512,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "md5",
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Md5 => 32,
            Algorithm::Sha1 => 40,
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// An expected checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    /// Algorithm.
    pub algorithm: Algorithm,
    /// Lower-case hex digest.
    pub hex: String,
}

impl Checksum {
    /// Parse `algo:hex` (trimmed, case-insensitive), checking the digest length and digits.
    pub fn parse(s: &str) -> Result<Checksum> {
        let s = s.trim().to_ascii_lowercase();
        let (algo, hex) = s.split_once(':').ok_or_else(|| {
            ImportError::config(format!("invalid checksum {s:?}: expected algo:hex"))
        })?;
        let algorithm = match algo {
            "md5" => Algorithm::Md5,
            "sha1" => Algorithm::Sha1,
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => {
                return Err(ImportError::config(format!(
                    "invalid checksum: unsupported algorithm {other:?} (md5, sha1, sha256, sha512)"
                )));
            }
        };
        if hex.len() != algorithm.hex_len() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ImportError::config(format!(
                "invalid checksum: {algo} needs {} hex digits",
                algorithm.hex_len()
            )));
        }
        Ok(Checksum {
            algorithm,
            hex: hex.to_string(),
        })
    }

    /// A hasher for this algorithm.
    pub fn hasher(&self) -> Hasher {
        Hasher::new(self.algorithm)
    }

    /// Compare with a finished digest; the error is upstream's wording, which the control plane
    /// recognises by its `checksum mismatch` substring.
    pub fn verify(&self, calculated_hex: &str) -> Result<()> {
        if calculated_hex == self.hex {
            return Ok(());
        }
        let name = self.algorithm.name();
        Err(ImportError::new(
            crate::error::ErrorKind::ChecksumMismatch,
            format!(
                "checksum validation failed: checksum mismatch: expected {name}:{}, calculated \
                 {name}:{calculated_hex}",
                self.hex
            ),
        ))
    }
}

impl std::fmt::Display for Checksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

/// A running digest.
pub enum Hasher {
    /// MD5.
    Md5(md5::Md5),
    /// SHA-1.
    Sha1(sha1::Sha1),
    /// SHA-256.
    Sha256(sha2::Sha256),
    /// SHA-512.
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// A fresh digest.
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Md5 => Hasher::Md5(md5::Md5::new()),
            Algorithm::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    /// Feed bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// Lower-case hex of the digest.
    pub fn finish_hex(self) -> String {
        match self {
            Hasher::Md5(h) => hex::encode(h.finalize()),
            Hasher::Sha1(h) => hex::encode(h.finalize()),
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn parses_and_normalises() {
        let c = Checksum::parse(
            " SHA256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855 ",
        )
        .unwrap();
        assert_eq!(c.algorithm, Algorithm::Sha256);
        assert_eq!(
            c.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "sha256",
            "crc32:abcd",
            "md5:xyz",
            "sha1:00",
            "md5:zz112233445566778899aabbccddeeff",
        ] {
            assert_eq!(
                Checksum::parse(bad).unwrap_err().kind(),
                ErrorKind::Config,
                "{bad}"
            );
        }
    }

    #[test]
    fn digests_match_known_values() {
        let cases = [
            ("md5:900150983cd24fb0d6963f7d28e17f72", "abc"),
            ("sha1:a9993e364706816aba3e25717850c26c9cd0d89d", "abc"),
            (
                "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                "abc",
            ),
        ];
        for (spec, input) in cases {
            let c = Checksum::parse(spec).unwrap();
            let mut h = c.hasher();
            h.update(input.as_bytes());
            c.verify(&h.finish_hex()).unwrap();
        }
    }

    #[test]
    fn mismatch_uses_upstream_wording() {
        let c = Checksum::parse("md5:00000000000000000000000000000000").unwrap();
        let mut h = c.hasher();
        h.update(b"abc");
        let err = c.verify(&h.finish_hex()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ChecksumMismatch);
        assert!(
            err.to_string()
                .contains("checksum mismatch: expected md5:0000"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("calculated md5:900150983cd24fb0d6963f7d28e17f72")
        );
    }
}
