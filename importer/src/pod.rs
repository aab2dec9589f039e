//! `cdi importer`: the pod entry point, driven entirely by upstream's environment.
//!
//! Reads the variables listed in the crate docs, runs one import, writes the termination
//! message and picks the exit code:
//!
//! | outcome | termination log | exit |
//! |---|---|---|
//! | success | `{"preallocationApplied":…,"message":"Import Complete"[,"labels":…]}` | 0 |
//! | scratch needed, none mounted | `{"scratchSpaceRequired":true,"preallocationApplied":false,"message":"scratch space required and none found"}` | 0 |
//! | checksum mismatch (data removed) | `{"message":"Unable to process data: checksum validation failed: checksum mismatch: …"}` | 0 |
//! | any other failure | first line of the error, plain text | 1 |

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use cdi_api::env;
use cdi_api::termination::{TerminationMessage, failure_line};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::checksum::Checksum;
use crate::error::{ErrorKind, ImportError, Result};
use crate::import::{ContentType, Destination, ImportRequest, SourceSpec, run_import};
use crate::metrics::{ProgressMetrics, serve};
use crate::progress::Progress;
use crate::source::http::Credentials;
use crate::tls::TlsOptions;

/// Our override of upstream's secret extra-header mount (`/extraheaders`): every non-dot file
/// below it (one level of directories, as Secrets are mounted) holds one `Name: value` header.
pub const CDI_EXTRA_HEADERS_DIR: &str = "CDI_EXTRA_HEADERS_DIR";
/// Upstream's secret extra-header mount.
pub const DEFAULT_EXTRA_HEADERS_DIR: &str = "/extraheaders";
/// After SIGTERM, how long the import may take to unwind before the pod gives up on it
/// (kubelet's default grace period is 30 s; leave time to write the termination message).
pub const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(20);
/// Message written with `scratchSpaceRequired` (upstream's running-condition text).
pub const SCRATCH_REQUIRED_MESSAGE: &str = "scratch space required and none found";

/// Everything the pod entry point derives from its environment.
#[derive(Debug)]
pub struct PodConfig {
    /// The import to run.
    pub request: ImportRequest,
    /// Where the termination message goes.
    pub termination_log: PathBuf,
    /// Metrics listen address; `None` when disabled.
    pub metrics_addr: Option<SocketAddr>,
    /// Label of the progress metric.
    pub owner_uid: String,
}

fn var(lookup: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    lookup(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn parse_bool(name: &str, value: Option<String>) -> Result<bool> {
    match value.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Ok(false),
        Some("true" | "1" | "t") => Ok(true),
        Some("false" | "0" | "f") => Ok(false),
        Some(other) => Err(ImportError::config(format!(
            "invalid {name} value {other:?}: expected true or false"
        ))),
    }
}

/// Build the pod configuration from an environment lookup (tests pass a map).
pub fn config_from_env(lookup: &dyn Fn(&str) -> Option<String>) -> Result<PodConfig> {
    let data_dir = PathBuf::from(
        var(lookup, env::CDI_DATA_DIR).unwrap_or_else(|| env::defaults::DATA_DIR.into()),
    );
    let block = PathBuf::from(
        var(lookup, env::CDI_BLOCK_DEVICE).unwrap_or_else(|| env::defaults::BLOCK_DEVICE.into()),
    );
    let scratch = PathBuf::from(
        var(lookup, env::CDI_SCRATCH_DIR).unwrap_or_else(|| env::defaults::SCRATCH_DIR.into()),
    );
    let termination_log = PathBuf::from(
        var(lookup, env::CDI_TERMINATION_LOG)
            .unwrap_or_else(|| env::defaults::TERMINATION_LOG.into()),
    );
    let metrics_addr = match var(lookup, env::CDI_METRICS_ADDR).as_deref() {
        Some("off") => None,
        other => {
            let text = other.unwrap_or(env::defaults::METRICS_ADDR);
            Some(text.parse().map_err(|_| {
                ImportError::config(format!("invalid {} {text:?}", env::CDI_METRICS_ADDR))
            })?)
        }
    };
    let content_type = match var(lookup, env::IMPORTER_CONTENTTYPE).as_deref() {
        None | Some("kubevirt") => ContentType::Kubevirt,
        Some("archive") => ContentType::Archive,
        Some(other) => {
            return Err(ImportError::config(format!(
                "unknown content type {other:?}"
            )));
        }
    };
    let endpoint = var(lookup, env::IMPORTER_ENDPOINT).unwrap_or_default();
    let source_kind = var(lookup, env::IMPORTER_SOURCE).unwrap_or_else(|| "http".into());
    let parse_url = |s: &str| {
        Url::parse(s).map_err(|e| ImportError::config(format!("invalid endpoint {s:?}: {e}")))
    };
    let source = match source_kind.as_str() {
        "http" => {
            let url = parse_url(&endpoint)?;
            if url.scheme() == "file" {
                SourceSpec::File(
                    url.to_file_path()
                        .map_err(|_| ImportError::config(format!("invalid file URL {url}")))?,
                )
            } else {
                SourceSpec::Http(url)
            }
        }
        "s3" => SourceSpec::S3(parse_url(&endpoint)?),
        "registry" => SourceSpec::Registry(endpoint),
        "none" | "blank" => SourceSpec::Blank,
        other => return Err(ImportError::config(format!("Unknown data source: {other}"))),
    };
    // Volume mode is decided by the block device's existence, as upstream does.
    let dest = if block.exists() {
        Destination::Block(block)
    } else if content_type == ContentType::Archive {
        Destination::Dir(data_dir)
    } else {
        Destination::File(data_dir.join(env::defaults::DISK_IMAGE_NAME))
    };
    let image_size = match var(lookup, env::IMPORTER_IMAGE_SIZE) {
        Some(q) => Some(cdi_api::quantity::parse_bytes(&q).map_err(|e| {
            ImportError::config(format!("invalid {} {q:?}: {e}", env::IMPORTER_IMAGE_SIZE))
        })?),
        None => None,
    };
    let overhead = match var(lookup, env::FILESYSTEM_OVERHEAD) {
        Some(o) => cdi_api::overhead::parse_overhead(&o).ok_or_else(|| {
            ImportError::config(format!("invalid {} {o:?}", env::FILESYSTEM_OVERHEAD))
        })?,
        None => 0.0,
    };
    let preallocation = parse_bool(env::PREALLOCATION, var(lookup, env::PREALLOCATION))?;
    let insecure = parse_bool(env::INSECURE_TLS, var(lookup, env::INSECURE_TLS))?;
    let checksum = var(lookup, env::IMPORTER_CHECKSUM)
        .map(|c| Checksum::parse(&c))
        .transpose()?;
    let credentials = match (
        var(lookup, env::IMPORTER_ACCESS_KEY_ID),
        var(lookup, env::IMPORTER_SECRET_KEY),
    ) {
        (Some(user), Some(password)) => Some(Credentials { user, password }),
        (Some(user), None) => Some(Credentials {
            user,
            password: String::new(),
        }),
        _ => None,
    };
    let mut ca_dirs = Vec::new();
    for name in [env::IMPORTER_CERT_DIR, env::IMPORTER_PROXY_CERT_DIR] {
        if let Some(d) = var(lookup, name) {
            ca_dirs.push(PathBuf::from(d));
        }
    }
    let scratch_dir = scratch.is_dir().then_some(scratch);
    let secret_dir = PathBuf::from(
        var(lookup, CDI_EXTRA_HEADERS_DIR).unwrap_or_else(|| DEFAULT_EXTRA_HEADERS_DIR.into()),
    );
    let request = ImportRequest {
        content_type,
        image_size,
        overhead,
        preallocation,
        scratch_dir,
        checksum,
        credentials,
        tls: TlsOptions {
            ca_dirs,
            ca_files: Vec::new(),
            insecure,
        },
        headers: extra_headers(lookup),
        secret_headers: secret_headers(&secret_dir)?,
        architecture: var(lookup, env::IMPORTER_REGISTRY_IMAGE_ARCHITECTURE),
        ..ImportRequest::new(source, dest)
    };
    Ok(PodConfig {
        request,
        termination_log,
        metrics_addr,
        owner_uid: var(lookup, env::OWNER_UID).unwrap_or_default(),
    })
}

/// `IMPORTER_EXTRA_HEADER_<n>` values ordered by `n`.
fn extra_headers(lookup: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let mut found = BTreeMap::new();
    for (k, _) in std::env::vars() {
        if let Some(n) = k
            .strip_prefix(env::IMPORTER_EXTRA_HEADER_PREFIX)
            .and_then(|n| n.parse::<u32>().ok())
            && let Some(v) = var(lookup, &k)
        {
            found.insert(n, v);
        }
    }
    // Lookups that are not the process environment (tests) are probed by index.
    for n in 0..64u32 {
        if let Some(v) = var(lookup, &format!("{}{n}", env::IMPORTER_EXTRA_HEADER_PREFIX)) {
            found.entry(n).or_insert(v);
        }
    }
    found.into_values().collect()
}

/// Headers from the secret mount: every non-dot file, one level of subdirectories deep.
fn secret_headers(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    paths.sort();
    for p in paths {
        let files: Vec<PathBuf> = if p.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(&p)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                        .map(|e| e.path())
                        .filter(|p| p.is_file())
                        .collect()
                })
                .unwrap_or_default();
            inner.sort();
            inner
        } else {
            vec![p]
        };
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| {
                ImportError::config(format!("reading secret header {}: {e}", f.display()))
            })?;
            let line = text.trim();
            if !line.is_empty() {
                out.push(line.to_string());
            }
        }
    }
    Ok(out)
}

/// What the pod writes and how it exits, for an import result.
pub fn termination(result: &Result<TerminationMessage>) -> (String, ExitCode) {
    match result {
        Ok(msg) => (msg.to_line(), ExitCode::SUCCESS),
        Err(e) if e.kind() == ErrorKind::ScratchRequired => {
            let msg = TerminationMessage {
                scratch_space_required: Some(true),
                preallocation_applied: Some(false),
                ..TerminationMessage::with_message(SCRATCH_REQUIRED_MESSAGE)
            };
            (msg.to_line(), ExitCode::SUCCESS)
        }
        Err(e) if e.kind() == ErrorKind::ChecksumMismatch => (
            TerminationMessage::with_message(failure_line(e.message())).to_line(),
            ExitCode::SUCCESS,
        ),
        Err(e) => (failure_line(e.message()), ExitCode::FAILURE),
    }
}

fn write_termination(path: &Path, line: &str) {
    if let Err(e) = std::fs::write(path, format!("{line}\n")) {
        tracing::error!(path = %path.display(), error = %e, "cannot write the termination message");
    }
}

/// Entry point of `cdi importer`.
pub fn run() -> ExitCode {
    let lookup = |k: &str| std::env::var(k).ok();
    let config = match config_from_env(&lookup) {
        Ok(c) => c,
        Err(e) => {
            let term = std::env::var(env::CDI_TERMINATION_LOG)
                .unwrap_or_else(|_| env::defaults::TERMINATION_LOG.into());
            let line = failure_line(e.message());
            eprintln!("{line}");
            write_termination(Path::new(&term), &line);
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let line = format!("Unable to start the importer runtime: {e}");
            write_termination(&config.termination_log, &line);
            return ExitCode::FAILURE;
        }
    };
    let termination_log = config.termination_log.clone();
    let result = runtime.block_on(run_pod(config));
    let (line, code) = termination(&result);
    match &result {
        Ok(_) => tracing::info!("{line}"),
        Err(e) => tracing::error!(kind = ?e.kind(), "{line}"),
    }
    eprintln!("{line}");
    write_termination(&termination_log, &line);
    // The runtime may still hold the metrics server and a stalled connection; don't wait.
    runtime.shutdown_background();
    code
}

async fn run_pod(config: PodConfig) -> Result<TerminationMessage> {
    let progress = Arc::new(Progress::default());
    let mut metrics_task = None;
    if let Some(addr) = config.metrics_addr {
        let metrics = Arc::new(ProgressMetrics::new(&config.owner_uid, progress.clone()));
        match serve(addr, metrics).await {
            Ok((bound, task)) => {
                tracing::info!(%bound, "serving progress metrics");
                metrics_task = Some(task);
            }
            Err(e) => tracing::warn!(error = %e, "progress metrics unavailable"),
        }
    }
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone());
    let watchdog = cancel.clone();
    let outcome = tokio::select! {
        r = run_import(config.request, progress, cancel) => r,
        // A stop request must end the process even if some I/O refuses to return.
        _ = async {
            watchdog.cancelled().await;
            tokio::time::sleep(CANCEL_GRACE).await;
        } => Err(ImportError::new(
            ErrorKind::Cancelled,
            "Unable to process data: import cancelled before it completed",
        )),
    };
    if let Some(t) = metrics_task {
        t.abort();
    }
    outcome.map(|o| o.message)
}

/// SIGTERM / SIGINT cancel the import: the transfer stops, partial data is discarded, and the
/// pod reports a failure, never "Import Complete".
pub fn spawn_signal_handler(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::warn!("SIGTERM: stopping the import"),
            _ = int.recv() => tracing::warn!("SIGINT: stopping the import"),
        }
        cancel.cancel();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Result<PodConfig> {
        let map: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        config_from_env(&move |k: &str| map.get(k).cloned())
    }

    #[test]
    fn upstream_environment_maps_to_a_request() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().display().to_string();
        let c = cfg(&[
            (env::IMPORTER_SOURCE, "http"),
            (env::IMPORTER_ENDPOINT, "https://example.com/disk.qcow2"),
            (env::IMPORTER_IMAGE_SIZE, "1Gi"),
            (env::FILESYSTEM_OVERHEAD, "0.06"),
            (env::PREALLOCATION, "true"),
            (
                env::IMPORTER_CHECKSUM,
                "md5:900150983cd24fb0d6963f7d28e17f72",
            ),
            (env::IMPORTER_ACCESS_KEY_ID, "user"),
            (env::IMPORTER_SECRET_KEY, "pass"),
            ("IMPORTER_EXTRA_HEADER_1", "X-B: 2"),
            ("IMPORTER_EXTRA_HEADER_0", "X-A: 1"),
            (env::CDI_DATA_DIR, &data),
            (env::CDI_BLOCK_DEVICE, "/nonexistent/block"),
            (env::CDI_SCRATCH_DIR, "/nonexistent/scratch"),
            (env::CDI_TERMINATION_LOG, "/tmp/t"),
            (env::CDI_METRICS_ADDR, "127.0.0.1:0"),
            (env::OWNER_UID, "uid-7"),
        ])
        .unwrap();
        let r = &c.request;
        assert_eq!(
            r.source,
            SourceSpec::Http(Url::parse("https://example.com/disk.qcow2").unwrap())
        );
        assert_eq!(r.dest, Destination::File(dir.path().join("disk.img")));
        assert_eq!(r.image_size, Some(1 << 30));
        assert_eq!(r.overhead, 0.06);
        assert!(r.preallocation);
        assert!(r.checksum.is_some());
        assert_eq!(r.credentials.as_ref().unwrap().user, "user");
        assert_eq!(r.headers, ["X-A: 1", "X-B: 2"]);
        assert_eq!(r.scratch_dir, None, "missing scratch mount means none");
        assert_eq!(c.owner_uid, "uid-7");
        assert_eq!(c.metrics_addr, Some("127.0.0.1:0".parse().unwrap()));
    }

    #[test]
    fn block_device_wins_when_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("block");
        std::fs::write(&dev, b"").unwrap();
        let c = cfg(&[
            (env::IMPORTER_SOURCE, "none"),
            (env::CDI_BLOCK_DEVICE, dev.to_str().unwrap()),
            (env::CDI_METRICS_ADDR, "off"),
        ])
        .unwrap();
        assert_eq!(c.request.dest, Destination::Block(dev));
        assert_eq!(c.request.source, SourceSpec::Blank);
        assert_eq!(c.metrics_addr, None);
    }

    #[test]
    fn bad_values_are_config_errors() {
        assert!(cfg(&[(env::PREALLOCATION, "maybe")]).is_err());
        assert!(
            cfg(&[(env::IMPORTER_SOURCE, "gopher")])
                .unwrap_err()
                .to_string()
                .contains("Unknown data source")
        );
        assert!(
            cfg(&[
                (env::IMPORTER_ENDPOINT, "http://x/y"),
                (env::IMPORTER_CHECKSUM, "sha256:xyz")
            ])
            .is_err()
        );
    }

    #[test]
    fn termination_shapes() {
        let ok = Ok(TerminationMessage::with_message("Import Complete"));
        assert_eq!(termination(&ok).0, r#"{"message":"Import Complete"}"#);
        let scratch = Err(ImportError::new(ErrorKind::ScratchRequired, "x"));
        let (line, _) = termination(&scratch);
        assert!(line.contains(r#""scratchSpaceRequired":true"#), "{line}");
        assert!(!line.contains("Import Complete"));
        let sum = Err(ImportError::new(
            ErrorKind::ChecksumMismatch,
            "Unable to process data: checksum mismatch: a\nb",
        ));
        let (line, code) = termination(&sum);
        assert_eq!(
            line,
            r#"{"message":"Unable to process data: checksum mismatch: a"}"#
        );
        assert_eq!(code, ExitCode::SUCCESS);
        let fail = Err(ImportError::connect(
            "Unable to connect to http data source: boom",
        ));
        let (line, code) = termination(&fail);
        assert_eq!(line, "Unable to connect to http data source: boom");
        assert_eq!(code, ExitCode::FAILURE);
    }
}
