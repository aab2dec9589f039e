//! Who may upload now: the admission rules of the upload server as a pure function.
//!
//! ```text
//!            POST                 body complete        converted + synced
//!   Idle ───────────► Receiving ────────────────► Finishing ───────────────► Done (409)
//!    ▲  ▲                │  body cut (raw path)      │ failure
//!    │  │                ▼                           │
//!    │  │  timeout   Interrupted ◄── resume POST ────┘ (back to Idle: client may retry)
//!    │  └──────────────  │  (Upload-Offset: N)
//!    └── failure ────────┘  new POST without offset: abandon, start over
//! ```
//!
//! Upstream: 503 while an upload or background processing runs, 409 once done, and a failed
//! upload returns the server to idle. The `Interrupted` state and the offset rules are ours.

use axum::http::StatusCode;

/// The 409 text once the image is complete (clients match it to tell a lost 200 from a
/// conflicting offset).
pub const COMPLETED: &str = cdi_api::upload::ALREADY_COMPLETED;
/// The 503 text while an upload runs.
pub const BUSY: &str = "an upload is already in progress";
/// The 503 text once the server stops taking requests.
pub const CLOSING: &str = "upload server is shutting down";

/// The state as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseKind {
    /// Nothing in progress.
    Idle,
    /// A request is feeding the converter.
    Receiving,
    /// A body was cut; the converter waits for the rest (`offset` bytes received so far).
    Interrupted {
        /// Bytes of the body the converter has received.
        offset: u64,
    },
    /// All bytes received; conversion finishing (sync response pending or async background).
    Finishing,
    /// The image is complete.
    Done,
    /// The server is shutting down (deadline): nothing new starts.
    Closing,
}

/// What to do with a new upload request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Start a fresh upload.
    Start,
    /// Continue the interrupted upload with this request's body.
    Resume,
    /// Abandon the interrupted upload (its data is removed), then start a fresh one.
    Restart,
    /// Refuse with this status and message; `offset` goes into `Upload-Offset` when known.
    Reject {
        /// HTTP status.
        status: StatusCode,
        /// Plain-text reason.
        message: String,
        /// The resumable offset, when an upload is interrupted.
        offset: Option<u64>,
    },
}

fn reject(status: StatusCode, message: impl Into<String>, offset: Option<u64>) -> Admission {
    Admission::Reject {
        status,
        message: message.into(),
        offset,
    }
}

/// Decide on a request carrying `Upload-Offset: requested` (None when absent) for a path that
/// supports resuming (`resumable`: the raw paths) or not (form and archive paths).
pub fn admit(phase: PhaseKind, requested: Option<u64>, resumable: bool) -> Admission {
    if requested.is_some() && !resumable {
        return reject(
            StatusCode::BAD_REQUEST,
            "Upload-Offset is only supported on raw upload paths",
            None,
        );
    }
    match phase {
        PhaseKind::Done => reject(StatusCode::CONFLICT, COMPLETED, None),
        PhaseKind::Receiving | PhaseKind::Finishing => {
            reject(StatusCode::SERVICE_UNAVAILABLE, BUSY, None)
        }
        PhaseKind::Closing => reject(StatusCode::SERVICE_UNAVAILABLE, CLOSING, None),
        PhaseKind::Idle => match requested {
            None | Some(0) => Admission::Start,
            Some(n) => reject(
                StatusCode::CONFLICT,
                format!("no interrupted upload to resume at offset {n}; start again from 0"),
                Some(0),
            ),
        },
        PhaseKind::Interrupted { offset } => match requested {
            None => Admission::Restart,
            Some(n) if n == offset => Admission::Resume,
            Some(n) => reject(
                StatusCode::CONFLICT,
                format!("upload offset mismatch: server has {offset} bytes, request starts at {n}"),
                Some(offset),
            ),
        },
    }
}

/// Answer to an offset query (`GET`/`HEAD /v1beta1/upload-offset`): the offset to resume
/// at, or a status and reason why there is none.
pub fn offset_query(phase: PhaseKind) -> Result<u64, (StatusCode, &'static str)> {
    match phase {
        PhaseKind::Idle => Ok(0),
        PhaseKind::Interrupted { offset } => Ok(offset),
        PhaseKind::Receiving | PhaseKind::Finishing => Err((StatusCode::SERVICE_UNAVAILABLE, BUSY)),
        PhaseKind::Closing => Err((StatusCode::SERVICE_UNAVAILABLE, CLOSING)),
        PhaseKind::Done => Err((StatusCode::CONFLICT, COMPLETED)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(a: Admission) -> StatusCode {
        match a {
            Admission::Reject { status, .. } => status,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn idle_server_starts_an_upload() {
        assert_eq!(admit(PhaseKind::Idle, None, true), Admission::Start);
    }

    #[test]
    fn busy_server_answers_503() {
        assert_eq!(
            status(admit(PhaseKind::Receiving, None, true)),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status(admit(PhaseKind::Finishing, None, false)),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn finished_server_answers_409() {
        assert_eq!(
            status(admit(PhaseKind::Done, None, true)),
            StatusCode::CONFLICT
        );
    }

    #[test]
    fn matching_offset_resumes() {
        assert_eq!(
            admit(PhaseKind::Interrupted { offset: 42 }, Some(42), true),
            Admission::Resume
        );
    }

    #[test]
    fn mismatched_offset_is_a_conflict_that_tells_the_offset() {
        let a = admit(PhaseKind::Interrupted { offset: 42 }, Some(10), true);
        assert!(matches!(
            a,
            Admission::Reject {
                status: StatusCode::CONFLICT,
                offset: Some(42),
                ..
            }
        ));
    }

    #[test]
    fn post_without_offset_restarts_an_interrupted_upload() {
        assert_eq!(
            admit(PhaseKind::Interrupted { offset: 42 }, None, true),
            Admission::Restart
        );
    }

    #[test]
    fn resume_on_idle_server_is_refused() {
        assert_eq!(
            status(admit(PhaseKind::Idle, Some(5), true)),
            StatusCode::CONFLICT
        );
    }

    #[test]
    fn offset_on_form_path_is_a_bad_request() {
        assert_eq!(
            status(admit(PhaseKind::Idle, Some(5), false)),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn offset_query_reports_interrupted_offset() {
        assert_eq!(offset_query(PhaseKind::Interrupted { offset: 7 }), Ok(7));
        assert_eq!(offset_query(PhaseKind::Idle), Ok(0));
        assert_eq!(
            offset_query(PhaseKind::Done),
            Err((StatusCode::CONFLICT, COMPLETED))
        );
        assert_eq!(
            offset_query(PhaseKind::Receiving).unwrap_err().0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
