//! The importer's one error type: a stable kind plus a one-line message.
//!
//! The kind decides the outcome once, in [`ImportError::outcome`]: which termination message
//! the pod writes and whether it exits 0 (done or fatal, no restart) or 1 (retry).

use std::fmt;

use cdi_formats::ErrorKind as FormatKind;

/// What went wrong, in the terms the control plane acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad configuration (environment, arguments, URL).
    Config,
    /// The source could not be reached or refused the first request (DNS, TCP, TLS, HTTP
    /// status, authentication).
    Connect,
    /// The transfer broke and could not be resumed within the retry budget.
    Transfer,
    /// The downloaded bytes do not match the requested checksum (fatal, never retried).
    ChecksumMismatch,
    /// The image does not fit the target, or the target ran out of space.
    Capacity,
    /// Conversion needs a scratch directory and none is mounted.
    ScratchRequired,
    /// The image itself is bad or uses something we refuse.
    Image,
    /// An archive entry tried to escape the data directory or create a device node.
    UnsafeArchive,
    /// The import was asked to stop (SIGTERM).
    Cancelled,
    /// Local I/O failed (target, scratch, data directory).
    Io,
}

/// An import failure.
#[derive(Debug, Clone)]
pub struct ImportError {
    kind: ErrorKind,
    message: String,
}

/// Result alias of this crate.
pub type Result<T, E = ImportError> = std::result::Result<T, E>;

impl ImportError {
    /// A new error; `message` is one lowercase line without a trailing period.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ImportError {
            kind,
            message: message.into(),
        }
    }

    /// Shorthand for [`ErrorKind::Config`].
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    /// Shorthand for [`ErrorKind::Connect`].
    pub fn connect(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Connect, message)
    }

    /// Shorthand for [`ErrorKind::Io`].
    pub fn io(what: impl fmt::Display, err: std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(code) if code == nix::libc::ENOSPC || code == nix::libc::EDQUOT => {
                ErrorKind::Capacity
            }
            _ => ErrorKind::Io,
        };
        Self::new(kind, format!("{what}: {err}"))
    }

    /// The stable classification.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefix the message, keeping the kind.
    pub fn context(mut self, prefix: impl fmt::Display) -> Self {
        self.message = format!("{prefix}: {}", self.message);
        self
    }

    /// True when a pod restart could plausibly succeed (exit 1); false for outcomes the
    /// control plane must treat as final.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self.kind,
            ErrorKind::ChecksumMismatch | ErrorKind::ScratchRequired
        )
    }
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ImportError {}

impl From<cdi_formats::Error> for ImportError {
    fn from(err: cdi_formats::Error) -> Self {
        let kind = match err.kind() {
            FormatKind::NoSpace | FormatKind::TargetTooSmall => ErrorKind::Capacity,
            FormatKind::ScratchSpaceRequired => ErrorKind::ScratchRequired,
            FormatKind::Truncated => ErrorKind::Transfer,
            FormatKind::Io => ErrorKind::Io,
            FormatKind::InvalidInput => ErrorKind::Config,
            _ => ErrorKind::Image,
        };
        ImportError::new(kind, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_kinds_map_to_outcomes() {
        let e: ImportError =
            cdi_formats::Error::new(FormatKind::TargetTooSmall, "image is larger").into();
        assert_eq!(e.kind(), ErrorKind::Capacity);
        let e: ImportError = cdi_formats::Error::new(FormatKind::ScratchSpaceRequired, "x").into();
        assert_eq!(e.kind(), ErrorKind::ScratchRequired);
        assert!(!e.is_retryable());
        let e: ImportError = cdi_formats::Error::truncated("stream ended").into();
        assert_eq!(e.kind(), ErrorKind::Transfer);
        assert!(e.is_retryable());
    }

    #[test]
    fn enospc_is_a_capacity_error() {
        let e = ImportError::io(
            "writing",
            std::io::Error::from_raw_os_error(nix::libc::ENOSPC),
        );
        assert_eq!(e.kind(), ErrorKind::Capacity);
    }
}
