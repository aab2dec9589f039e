//! The per-volume upload server (`cdi uploadserver`): receives one disk image over mutual TLS
//! and streams it straight into the volume.
//!
//! ```text
//!  proxy ──mTLS (CN = CLIENT_NAME)──► POST /v1beta1/upload[-async|-form|-form-async]
//!                                        │ body frames (raw, or the multipart "file" part)
//!                                        ▼
//!                     feed channel (FEED_DEPTH chunks, backpressure)  + running Content-Digest
//!                                        │ spawn_blocking
//!                                        ▼
//!                     cdi_formats::convert_reader ─► open_target(DESTINATION)
//! ```
//!
//! Contract with the control plane (upstream's, `pkg/uploadserver/uploadserver.go`):
//!
//! * Environment: `TLS_CERT_FILE`, `TLS_KEY_FILE`, `CLIENT_CERT_FILE` (CA of client certs),
//!   `CLIENT_NAME`, `DESTINATION`, `UPLOAD_IMAGE_SIZE`, `FILESYSTEM_OVERHEAD`, `PREALLOCATION`,
//!   `DEADLINE` (RFC 3339), `LISTEN_ADDRESS`/`LISTEN_PORT`, plus our `CDI_SCRATCH_DIR`,
//!   `CDI_TERMINATION_LOG`, `CDI_DATA_DIR` (see [`cdi_api::env`]).
//! * `GET /healthz` → `OK`. Upload paths: POST only (404 otherwise; `HEAD` on async paths is
//!   an unauthenticated 200 probe); a client certificate chaining to the CA with common name
//!   `CLIENT_NAME` (else 401); 503 while an upload runs, 409 once done.
//! * Sync paths answer 200 after the image is converted and synced; async paths once every
//!   byte is received and decoded, finishing in the background. Failures: 400 for capacity
//!   ([`server::CAPACITY_MESSAGE`]), 500 otherwise; partial data is removed and the server is
//!   idle again so the client can retry.
//! * Success: `{"preallocationApplied":…,"message":"Upload Complete"}` goes to the termination
//!   log at once; the server keeps answering 409 for [`server::COMPLETED_GRACE`] (so a client
//!   whose 200 was lost learns that its upload is done) and then exits 0. Deadline: exit 0
//!   with `deadlinePassed`.
//!   Background (async) failure: exit 1 with the failure line.
//!
//! Beyond upstream:
//!
//! * **Integrity.** `Content-Digest: sha-256=:…:` (or `sha-512`, RFC 9530) over the body is
//!   verified before success; a mismatch is a 400 and the data is removed ([`digest`]).
//! * **Resume.** When a raw body is cut, the conversion waits (blocked on the feed) for
//!   [`server::RESUME_WINDOW`]. `GET|HEAD /v1beta1/upload-offset` answers
//!   `Upload-Offset: N` (bytes received; 503 while a request is still feeding, 409 "upload
//!   already completed" once done); `POST /v1beta1/upload[-async]` with
//!   `Upload-Offset: N` sends the rest. A POST without the header starts over from zero; a
//!   wrong offset is 409 with the right one in `Upload-Offset` ([`state`]).
//! * Archive (`/v1beta1/upload-archive`): a tar stream (optionally compressed) unpacked into
//!   the destination's directory through a staging directory ([`archive`]).
//! * `x-cdi-content-type: *-clone` is refused (no host-assisted clone through this server).

pub mod archive;
pub mod cli;
pub mod digest;
pub mod feed;
pub mod server;
pub mod state;

pub use server::{Outcome, Settings, UploadServer};
