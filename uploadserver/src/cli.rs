//! `cdi uploadserver`: run one upload server from upstream's environment (flags override).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow};
use cdi_api::env;
use cdi_api::termination::{DEADLINE_PASSED, TerminationMessage, failure_line};
use cdi_pki::{CertPair, ClientAuth};

use crate::server::{COMPLETED_GRACE, Outcome, RESUME_WINDOW, Settings, UploadServer};

/// Upstream's client name for uploads through the proxy.
pub const DEFAULT_CLIENT_NAME: &str = "client.upload-server.cdi.kubevirt.io";
/// Upstream's default listen port.
pub const DEFAULT_PORT: u16 = 8443;

/// Subcommands this crate contributes to the `cdi` binary.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Per-volume upload server: receive one image over mutual TLS into DESTINATION.
    Uploadserver(Args),
}

impl Command {
    /// Run the subcommand.
    pub fn run(self) -> ExitCode {
        match self {
            Command::Uploadserver(args) => args.run(),
        }
    }
}

/// Settings of `cdi uploadserver`; every flag also reads upstream's environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Server certificate (PEM).
    #[arg(long, env = env::TLS_CERT_FILE)]
    tls_cert_file: PathBuf,
    /// Server private key (PEM).
    #[arg(long, env = env::TLS_KEY_FILE)]
    tls_key_file: PathBuf,
    /// CA bundle client certificates must chain to.
    #[arg(long, env = env::CLIENT_CERT_FILE)]
    client_cert_file: PathBuf,
    /// Required client-certificate common name.
    #[arg(long, env = env::CLIENT_NAME, default_value = DEFAULT_CLIENT_NAME)]
    client_name: String,
    /// Image file or block device (default: $CDI_DATA_DIR/disk.img, else /data/disk.img).
    #[arg(long, env = env::DESTINATION)]
    destination: Option<PathBuf>,
    /// Filesystem-volume directory (our override of upstream's /data).
    #[arg(long, env = env::CDI_DATA_DIR)]
    data_dir: Option<PathBuf>,
    /// Requested size (Kubernetes quantity).
    #[arg(long, env = env::UPLOAD_IMAGE_SIZE)]
    image_size: Option<String>,
    /// Filesystem overhead fraction ("0.06").
    #[arg(long, env = env::FILESYSTEM_OVERHEAD)]
    filesystem_overhead: Option<String>,
    /// "true" to preallocate the image.
    #[arg(long, env = env::PREALLOCATION)]
    preallocation: Option<String>,
    /// RFC 3339 time after which an unused server exits.
    #[arg(long, env = env::DEADLINE)]
    deadline: Option<String>,
    /// Listen address (upstream default 0.0.0.0).
    #[arg(long, env = env::LISTEN_ADDRESS)]
    listen_address: Option<String>,
    /// Listen port (default 8443).
    #[arg(long, env = env::LISTEN_PORT)]
    listen_port: Option<String>,
    /// Scratch directory for formats that need one.
    #[arg(long, env = env::CDI_SCRATCH_DIR)]
    scratch_dir: Option<PathBuf>,
    /// Termination-message file (default /dev/termination-log).
    #[arg(long, env = env::CDI_TERMINATION_LOG)]
    termination_log: Option<PathBuf>,
    /// Seconds an interrupted upload may be resumed (tests shorten it).
    #[arg(long, env = "CDI_UPLOAD_RESUME_WINDOW_SECS", hide = true)]
    resume_window_secs: Option<u64>,
    /// Upstream's `-v=N` log verbosity, which pod specs pass: accepted; the log level comes
    /// from `RUST_LOG`.
    #[arg(short = 'v', hide = true)]
    verbosity: Option<u8>,
    /// Milliseconds the server keeps answering 409 after success before it exits (tests
    /// lengthen it on busy machines; a supervisor that reads the termination log may set 0).
    #[arg(long, env = "CDI_UPLOAD_COMPLETED_GRACE_MS", hide = true)]
    completed_grace_ms: Option<u64>,
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl Args {
    fn run(self) -> ExitCode {
        let _ = tracing_subscriber_init();
        let termination_log = self
            .termination_log
            .clone()
            .unwrap_or_else(|| PathBuf::from(env::defaults::TERMINATION_LOG));
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(rt) => rt,
            Err(e) => return fail(&termination_log, &format!("starting runtime: {e}")),
        };
        match runtime.block_on(self.serve(&termination_log)) {
            Ok(Outcome::Completed(msg)) => {
                // Normally written already when the completion grace started; writing the same
                // line again covers a shutdown that came first (deadline).
                write_termination(&termination_log, &msg.to_line());
                ExitCode::SUCCESS
            }
            Ok(Outcome::Running) => {
                let msg = TerminationMessage {
                    deadline_passed: Some(true),
                    ..TerminationMessage::with_message(DEADLINE_PASSED)
                };
                eprintln!("deadline passed before an upload completed");
                write_termination(&termination_log, &msg.to_line());
                ExitCode::SUCCESS
            }
            Ok(Outcome::Failed(line)) => fail(&termination_log, &line),
            Err(e) => fail(&termination_log, &format!("{e:#}")),
        }
    }

    fn settings(&self) -> anyhow::Result<Settings> {
        let destination = match &self.destination {
            Some(d) if !d.as_os_str().is_empty() => d.clone(),
            _ => self
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(env::defaults::DATA_DIR))
                .join(env::defaults::DISK_IMAGE_NAME),
        };
        let image_size = non_empty(&self.image_size)
            .map(|s| cdi_api::Quantity::parse(s).map(|q| q.bytes()))
            .transpose()
            .context(env::UPLOAD_IMAGE_SIZE)?;
        let overhead = match non_empty(&self.filesystem_overhead) {
            None => 0.0,
            Some(s) => cdi_api::overhead::parse_overhead(s).ok_or_else(|| {
                anyhow!(
                    "{}: {s:?} is not a fraction in [0, 1)",
                    env::FILESYSTEM_OVERHEAD
                )
            })?,
        };
        Ok(Settings {
            destination,
            image_size,
            overhead,
            preallocation: non_empty(&self.preallocation)
                .is_some_and(|s| s.eq_ignore_ascii_case("true")),
            scratch_dir: self
                .scratch_dir
                .clone()
                .filter(|p| !p.as_os_str().is_empty()),
            client_name: self.client_name.clone(),
            resume_window: self
                .resume_window_secs
                .map_or(RESUME_WINDOW, Duration::from_secs),
        })
    }

    async fn serve(self, termination_log: &Path) -> anyhow::Result<Outcome> {
        cdi_pki::install_default_provider();
        let settings = self.settings()?;
        let deadline = non_empty(&self.deadline).map(parse_deadline).transpose()?;
        let pair = CertPair::read_files(&self.tls_cert_file, &self.tls_key_file)?;
        let client_ca = std::fs::read_to_string(&self.client_cert_file).with_context(|| {
            format!(
                "{}: {}",
                env::CLIENT_CERT_FILE,
                self.client_cert_file.display()
            )
        })?;
        let tls = cdi_pki::server_config(&pair, ClientAuth::Optional(&client_ca))?;
        let ip: IpAddr = non_empty(&self.listen_address)
            .unwrap_or("0.0.0.0")
            .parse()
            .with_context(|| format!("{} is not an IP address", env::LISTEN_ADDRESS))?;
        let port = match non_empty(&self.listen_port) {
            None => DEFAULT_PORT,
            Some(p) => p
                .parse()
                .with_context(|| format!("{}: {p:?}", env::LISTEN_PORT))?,
        };
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, port))
            .await
            .with_context(|| format!("listening on {ip}:{port}"))?;
        eprintln!(
            "upload server listening on {}, destination {}",
            listener.local_addr()?,
            settings.destination.display()
        );
        let grace = self
            .completed_grace_ms
            .map_or(COMPLETED_GRACE, Duration::from_millis);
        let server = UploadServer::new(settings);
        let router = server.router();
        let mut outcome = server.outcome();
        let srv = server.clone();
        let log = termination_log.to_path_buf();
        let shutdown = async move {
            let finished = async move {
                let end = outcome
                    .wait_for(|o| *o != Outcome::Running)
                    .await
                    .map(|o| o.clone());
                if let Ok(Outcome::Completed(msg)) = end {
                    // Report success at once, then keep answering 409 for a moment (see
                    // COMPLETED_GRACE). Failures end the server immediately, like upstream.
                    write_termination(&log, &msg.to_line());
                    tracing::info!(?grace, "upload complete; answering 409 until exit");
                    tokio::time::sleep(grace).await;
                }
            };
            match deadline {
                Some(at) => {
                    let wait = at
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO);
                    tokio::select! {
                        () = finished => {}
                        () = tokio::time::sleep(wait) => srv.close().await,
                    }
                }
                None => {
                    finished.await;
                }
            }
        };
        cdi_pki::serve::serve_tls(listener, Arc::new(tls), router, shutdown).await?;
        let end = server.outcome().borrow().clone();
        Ok(end)
    }
}

fn parse_deadline(s: &str) -> anyhow::Result<SystemTime> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("{}: {s:?} is not an RFC 3339 time", env::DEADLINE))?;
    Ok(SystemTime::from(t))
}

fn write_termination(path: &Path, line: &str) {
    if let Err(e) = std::fs::write(path, line) {
        eprintln!("writing termination message to {}: {e}", path.display());
    }
}

fn fail(termination_log: &Path, message: &str) -> ExitCode {
    let line = failure_line(message);
    eprintln!("{line}");
    write_termination(termination_log, &line);
    ExitCode::FAILURE
}

/// Logs go to stderr (`RUST_LOG` filters, default `info`); a subscriber the binary installed
/// already wins.
fn tracing_subscriber_init() -> Result<(), ()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .try_init()
        .map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_parses_rfc3339() {
        let t = parse_deadline("2030-01-02T03:04:05Z").unwrap();
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs, 1_893_553_445);
    }

    #[test]
    fn bad_deadline_is_an_error() {
        assert!(parse_deadline("tomorrow").is_err());
    }

    #[test]
    fn upstream_pod_args_parse() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: Command,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "cdi",
            "uploadserver",
            "-v=1",
            "--tls-cert-file=c",
            "--tls-key-file=k",
            "--client-cert-file=ca",
        ])
        .unwrap();
        let Command::Uploadserver(args) = cli.cmd;
        assert_eq!(args.verbosity, Some(1));
    }
}
