//! The one error type of the formats crate.
//!
//! Leaf modules build an [`Error`] with a stable [`ErrorKind`] and a lowercase, one-line message
//! that names what failed and where (offsets, sizes). Callers classify on the kind only: the
//! importer maps it to a CDI condition and termination message, the upload server to an HTTP
//! status, the CLI to an exit line. The message is never parsed.

use std::fmt;
use std::io;

/// What went wrong, in the terms a caller acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading the source or writing the target failed (not the image's fault).
    Io,
    /// The target file system or device ran out of space.
    NoSpace,
    /// The stream ended before the image was complete (truncated download or upload).
    Truncated,
    /// The image contradicts its own format (bad magic in a table, overlapping metadata,
    /// offsets outside the file, invalid compressed data).
    Corrupt,
    /// A well-formed image that uses a feature we refuse: backing file, external data file,
    /// encryption, unknown incompatible feature bits, differencing disks.
    Unsupported,
    /// A header value beyond a named limit in [`crate::limits`] (size bombs, absurd tables).
    LimitExceeded,
    /// The image's virtual size does not fit the target.
    TargetTooSmall,
    /// Conversion needs scratch space (the stream must be spooled or clusters arrived before
    /// the table mapping them and exceeded the memory budget) and none was given.
    ScratchSpaceRequired,
    /// The caller asked for something inconsistent (bad option combination).
    InvalidInput,
}

impl ErrorKind {
    /// A short stable label, for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::Truncated => "truncated",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::LimitExceeded => "limit_exceeded",
            ErrorKind::TargetTooSmall => "target_too_small",
            ErrorKind::ScratchSpaceRequired => "scratch_space_required",
            ErrorKind::InvalidInput => "invalid_input",
        }
    }
}

/// A classified conversion error with a one-line, human-readable message.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<io::Error>,
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind`; `message` is lowercase, one line, no trailing period.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Shorthand for [`ErrorKind::Corrupt`].
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// Shorthand for [`ErrorKind::LimitExceeded`].
    pub fn limit(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::LimitExceeded, message)
    }

    /// Shorthand for [`ErrorKind::Truncated`].
    pub fn truncated(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Truncated, message)
    }

    /// Wraps an I/O error met while doing `what` ("reading l2 table at 0x30000").
    ///
    /// `ENOSPC`/`EDQUOT` become [`ErrorKind::NoSpace`], an unexpected EOF becomes
    /// [`ErrorKind::Truncated`]; everything else is [`ErrorKind::Io`].
    pub fn io(what: impl Into<String>, err: io::Error) -> Self {
        let kind = classify_io(&err);
        let what = what.into();
        // An `Error` we created ourselves may travel inside an io::Error (decoders, readers
        // that return io::Result); unwrap it so the original kind and message survive.
        if err.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            let inner = err.into_inner().and_then(|b| b.downcast::<Error>().ok());
            if let Some(inner) = inner {
                return *inner;
            }
            return Error::new(ErrorKind::Io, what);
        }
        Error {
            kind,
            message: what,
            source: Some(err),
        }
    }

    /// The stable classification.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without the I/O cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefix the message with context, keeping the kind ("qcow2: …").
    pub fn context(mut self, prefix: impl fmt::Display) -> Self {
        self.message = format!("{prefix}: {}", self.message);
        self
    }

    /// Turn into an `io::Error` that [`Error::io`] unwraps again, for code paths whose
    /// signatures are `io::Result` (a `Read` impl, for example).
    pub fn into_io(self) -> io::Error {
        let kind = match self.kind {
            ErrorKind::Truncated => io::ErrorKind::UnexpectedEof,
            ErrorKind::NoSpace => io::ErrorKind::StorageFull,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

fn classify_io(err: &io::Error) -> ErrorKind {
    match err.raw_os_error() {
        Some(code) if code == nix::libc::ENOSPC || code == nix::libc::EDQUOT => {
            return ErrorKind::NoSpace;
        }
        _ => {}
    }
    match err.kind() {
        io::ErrorKind::UnexpectedEof => ErrorKind::Truncated,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => ErrorKind::NoSpace,
        _ => ErrorKind::Io,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line: the message, then the OS cause if there is one.
        match &self.source {
            Some(src) => write!(f, "{}: {src}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_classified_as_no_space() {
        let err = Error::io(
            "writing target",
            io::Error::from_raw_os_error(nix::libc::ENOSPC),
        );
        assert_eq!(err.kind(), ErrorKind::NoSpace);
    }

    #[test]
    fn unexpected_eof_is_truncation() {
        let err = Error::io("reading", io::Error::from(io::ErrorKind::UnexpectedEof));
        assert_eq!(err.kind(), ErrorKind::Truncated);
    }

    #[test]
    fn error_round_trips_through_io_error() {
        let original = Error::unsupported("qcow2 image has a backing file");
        let back = Error::io("reading", original.into_io());
        assert_eq!(back.kind(), ErrorKind::Unsupported);
        assert_eq!(back.to_string(), "qcow2 image has a backing file");
    }
}
