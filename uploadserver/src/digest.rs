//! `Content-Digest` (RFC 9530) for upload bodies: parse what the client claims, hash what
//! arrives, compare before reporting success.
//!
//! Upstream has no end-to-end integrity check for uploads (issues #467, #4104); we accept the
//! standard header with `sha-256` and `sha-512`:
//!
//! ```text
//! Content-Digest: sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:
//! ```
//!
//! The digest covers the request body exactly as sent (compressed bytes for a `.qcow2.gz`),
//! across resumed requests.

use base64::Engine;
use sha2::{Digest as _, Sha256, Sha512};

/// A supported digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// `sha-256`.
    Sha256,
    /// `sha-512`.
    Sha512,
}

impl Algorithm {
    /// The RFC 9530 registry name.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha-256",
            Algorithm::Sha512 => "sha-512",
        }
    }
}

/// An expected digest from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedDigest {
    /// Algorithm.
    pub algorithm: Algorithm,
    /// Raw digest bytes.
    pub value: Vec<u8>,
}

/// Why a `Content-Digest` header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// Not a structured-field dictionary of byte sequences.
    #[error("malformed Content-Digest header: {0}")]
    Malformed(String),
    /// Only algorithms we do not implement.
    #[error("Content-Digest names no supported algorithm (use sha-256 or sha-512)")]
    Unsupported,
}

/// Parse a `Content-Digest` header value. Unknown algorithms are skipped (RFC 9530 §6); when
/// several supported ones are given, the strongest is used.
pub fn parse_content_digest(value: &str) -> Result<ExpectedDigest, DigestError> {
    let mut best: Option<ExpectedDigest> = None;
    for member in value.split(',') {
        let member = member.trim();
        if member.is_empty() {
            continue;
        }
        let (key, val) = member
            .split_once('=')
            .ok_or_else(|| DigestError::Malformed(format!("member {member:?} has no value")))?;
        let key = key.trim().to_ascii_lowercase();
        let val = val.trim();
        // Parameters (";foo=bar") are allowed by the syntax and carry nothing for us.
        let val = val.split(';').next().unwrap_or(val).trim();
        let b64 = val
            .strip_prefix(':')
            .and_then(|v| v.strip_suffix(':'))
            .ok_or_else(|| DigestError::Malformed(format!("{key} is not a :byte-sequence:")))?;
        let algorithm = match key.as_str() {
            "sha-256" => Algorithm::Sha256,
            "sha-512" => Algorithm::Sha512,
            _ => continue,
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| DigestError::Malformed(format!("{key}: {e}")))?;
        let want_len = match algorithm {
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        };
        if bytes.len() != want_len {
            return Err(DigestError::Malformed(format!(
                "{key} has {} bytes, expected {want_len}",
                bytes.len()
            )));
        }
        let candidate = ExpectedDigest {
            algorithm,
            value: bytes,
        };
        if best
            .as_ref()
            .is_none_or(|b| b.algorithm == Algorithm::Sha256)
        {
            best = Some(candidate);
        }
    }
    best.ok_or(DigestError::Unsupported)
}

/// Format a digest as a `Content-Digest` header value.
pub fn format_content_digest(algorithm: Algorithm, value: &[u8]) -> String {
    format!(
        "{}=:{}:",
        algorithm.name(),
        base64::engine::general_purpose::STANDARD.encode(value)
    )
}

/// Running hash over a body.
#[derive(Clone)]
pub enum Hasher {
    /// SHA-256 state.
    Sha256(Sha256),
    /// SHA-512 state.
    Sha512(Sha512),
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hasher({})", self.algorithm().name())
    }
}

impl Hasher {
    /// A fresh hasher for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Hasher::Sha256(_) => Algorithm::Sha256,
            Hasher::Sha512(_) => Algorithm::Sha512,
        }
    }

    /// Feed bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// The digest so far (the state is not consumed).
    pub fn finalize(&self) -> Vec<u8> {
        match self {
            Hasher::Sha256(h) => h.clone().finalize().to_vec(),
            Hasher::Sha512(h) => h.clone().finalize().to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9530 Appendix D example: sha-256 of `{"hello": "world"}`.
    const RFC_EXAMPLE: &str = "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:";

    #[test]
    fn rfc_example_matches_our_hash() {
        let want = parse_content_digest(RFC_EXAMPLE).unwrap();
        let mut h = Hasher::new(want.algorithm);
        h.update(b"{\"hello\": \"world\"}");
        assert_eq!(h.finalize(), want.value);
    }

    #[test]
    fn unknown_algorithms_are_skipped() {
        let v = format!("md5=:AAAA:, {RFC_EXAMPLE}");
        assert_eq!(
            parse_content_digest(&v).unwrap().algorithm,
            Algorithm::Sha256
        );
    }

    #[test]
    fn sha512_is_preferred() {
        let h512 = format_content_digest(Algorithm::Sha512, &[7u8; 64]);
        let v = format!("{RFC_EXAMPLE}, {h512}");
        assert_eq!(
            parse_content_digest(&v).unwrap().algorithm,
            Algorithm::Sha512
        );
    }

    #[test]
    fn only_unknown_algorithms_is_unsupported() {
        assert_eq!(
            parse_content_digest("md5=:AAAA:"),
            Err(DigestError::Unsupported)
        );
    }

    #[test]
    fn bare_hex_is_malformed() {
        assert!(matches!(
            parse_content_digest("sha-256=abcd"),
            Err(DigestError::Malformed(_))
        ));
    }

    #[test]
    fn wrong_length_is_malformed() {
        assert!(matches!(
            parse_content_digest("sha-256=:AAAA:"),
            Err(DigestError::Malformed(_))
        ));
    }

    #[test]
    fn format_round_trips() {
        let v = format_content_digest(Algorithm::Sha256, &[1u8; 32]);
        assert_eq!(parse_content_digest(&v).unwrap().value, vec![1u8; 32]);
    }

    #[test]
    fn hasher_is_incremental() {
        let mut a = Hasher::new(Algorithm::Sha256);
        a.update(b"hello ");
        let mid = a.finalize();
        a.update(b"world");
        let mut b = Hasher::new(Algorithm::Sha256);
        b.update(b"hello world");
        assert_ne!(mid, b.finalize());
        assert_eq!(a.finalize(), b.finalize());
    }
}
