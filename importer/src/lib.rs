//! The importer: stream a disk image (or archive) from a source into a volume.
//!
//! ```text
//!  source (http · s3 · registry layer · file) ──► pump: resume, watchdog, backoff (async)
//!      ──bounded channel──► ChannelReader: checksum + byte count (blocking thread)
//!      ──► cdi_formats::convert_reader: detect, decompress, convert ──► Target
//! ```
//!
//! Two front ends share [`import::run_import`]: `cdi import` ([`cli`]) for people and
//! `cdi importer` ([`pod`]) for the control plane.
//!
//! # `cdi importer` environment contract
//!
//! Upstream's variables ([`cdi_api::env`]), read exactly as upstream's importer reads them:
//!
//! | variable | meaning |
//! |---|---|
//! | `IMPORTER_SOURCE` | `http` (default), `s3`, `registry`, `none` (blank) |
//! | `IMPORTER_ENDPOINT` | URL: `http(s)://…` (also `file://…`), S3 `http(s)://host/bucket/key`, `docker://…` |
//! | `IMPORTER_CONTENTTYPE` | `kubevirt` (default) or `archive` |
//! | `IMPORTER_IMAGE_SIZE` | requested size, a Kubernetes quantity |
//! | `FILESYSTEM_OVERHEAD` | fraction, e.g. `0.06` (`0` for block) |
//! | `PREALLOCATION` | `true`/`false` (anything else: exit 1) |
//! | `INSECURE_TLS` | `true` skips TLS verification |
//! | `IMPORTER_ACCESS_KEY_ID`, `IMPORTER_SECRET_KEY` | basic auth / S3 keys / registry credentials |
//! | `IMPORTER_CERT_DIR`, `IMPORTER_PROXY_CERT_DIR` | CA directories (every non-dot file a PEM bundle) |
//! | `IMPORTER_EXTRA_HEADER_<n>` | extra headers `Name: value`, in order of `n` |
//! | `IMPORTER_CHECKSUM` | `algo:hex` over the downloaded bytes |
//! | `IMPORTER_REGISTRY_IMAGE_ARCHITECTURE` | architecture picked from a multi-arch image |
//! | `OWNER_UID` | `ownerUID` label of the progress metric |
//! | `http_proxy`, `https_proxy`, `no_proxy` | proxies |
//!
//! Our path overrides (so the embedded control plane runs the importer as a child process;
//! each defaults to upstream's fixed path):
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `CDI_DATA_DIR` | `/data` | filesystem volume: image at `<dir>/disk.img`, archives extracted into it |
//! | `CDI_BLOCK_DEVICE` | `/dev/cdi-block-volume` | block volume; used when it exists (it wins over the data dir) |
//! | `CDI_SCRATCH_DIR` | `/scratch` | scratch space; absent directory = no scratch |
//! | `CDI_TERMINATION_LOG` | `/dev/termination-log` | where the termination message goes |
//! | `CDI_METRICS_ADDR` | `0.0.0.0:8443` | HTTPS progress metrics; `off` disables |
//! | `CDI_EXTRA_HEADERS_DIR` | `/extraheaders` | secret extra headers, one `Name: value` per non-dot file |
//!
//! Exit codes and termination messages: see [`pod`].

pub mod archive;
pub mod checksum;
pub mod cli;
pub mod decompress;
pub mod error;
pub mod import;
pub mod metrics;
pub mod phase;
pub mod pod;
pub mod progress;
pub mod source;
pub mod tls;
pub mod transfer;

pub use error::{ErrorKind, ImportError};
pub use import::{ContentType, Destination, ImportOutcome, ImportRequest, SourceSpec, run_import};
