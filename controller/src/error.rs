//! The controller's one error type and how each error is retried.

use std::time::Duration;

/// What can go wrong in a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An object could not be (de)serialized into the controller's view.
    #[error("decoding {kind}: {source}")]
    Decode {
        /// Kind being decoded.
        kind: &'static str,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The claim cannot be rendered or the worker pod cannot be built.
    #[error(transparent)]
    Claim(#[from] crate::builders::ClaimError),
    /// Certificates could not be loaded or issued.
    #[error("upload PKI: {0}")]
    Pki(String),
    /// A claim of the DataVolume's name exists and is not ours.
    #[error("Resource {0:?} already exists and is not managed by DataVolume")]
    ResourceExists(String),
    /// The claim is being deleted.
    #[error("Resource {0:?} marked for deletion")]
    MarkedForDeletion(String),
    /// An object the reconciler relies on is not controlled by the expected owner.
    #[error("{0}")]
    NotControlled(String),
    /// Adding or removing the DataVolume finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The controller was started without a required piece of configuration.
    #[error("configuration: {0}")]
    Config(String),
}

impl From<cdi_pki::PkiError> for Error {
    fn from(e: cdi_pki::PkiError) -> Self {
        Error::Pki(e.to_string())
    }
}

/// Longest wait before an erroring object is retried.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// First retry delay after an error.
pub const BASE_BACKOFF: Duration = Duration::from_secs(1);

impl Error {
    /// Short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Decode { .. } => "decode",
            Error::Claim(_) => "claim",
            Error::Pki(_) => "pki",
            Error::ResourceExists(_) => "resource_exists",
            Error::MarkedForDeletion(_) => "marked_for_deletion",
            Error::NotControlled(_) => "not_controlled",
            Error::Finalizer(_) => "finalizer",
            Error::Config(_) => "config",
        }
    }

    /// Whether a conflict (stale resourceVersion) caused it: retried at once, not backed off.
    pub fn is_conflict(&self) -> bool {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::Kube(kube::Error::Api(e)) => e.code == 409,
            Error::Finalizer(f) => match f.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.is_conflict(),
                F::AddFinalizer(kube::Error::Api(e)) | F::RemoveFinalizer(kube::Error::Api(e)) => {
                    e.code == 409
                }
                _ => false,
            },
            _ => false,
        }
    }
}

/// Delay before retry number `attempt` (1-based): doubling from [`BASE_BACKOFF`], capped.
pub fn backoff(attempt: u32) -> Duration {
    let shift = attempt.saturating_sub(1).min(16);
    BASE_BACKOFF.saturating_mul(1u32 << shift).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
