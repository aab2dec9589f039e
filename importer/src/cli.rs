//! The subcommands this crate contributes to `cdi`: `cdi importer` (the pod entry point) and
//! `cdi import` (the same engine for people at a terminal).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use url::Url;

use crate::checksum::Checksum;
use crate::error::{ErrorKind, ImportError, Result};
use crate::import::{
    ContentType, Destination, ImportOutcome, ImportRequest, SourceSpec, run_import,
};
use crate::progress::Progress;
use crate::source::http::Credentials;
use crate::source::s3::S3Location;
use crate::tls::TlsOptions;

/// Subcommands this crate contributes to the `cdi` binary.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Importer pod entry point: configured by upstream's environment variables
    /// (IMPORTER_SOURCE, IMPORTER_ENDPOINT, …; see the cdi-importer crate docs).
    Importer(ImporterArgs),
    /// Import a disk image (or archive) from a URL, S3, a registry or a file into a raw
    /// image file, block device or directory.
    Import(Box<ImportArgs>),
}

/// `cdi importer` takes no options of its own; upstream's `-v=N -alsologtostderr` flags are
/// accepted and ignored so existing pod specs keep working.
#[derive(Debug, clap::Args)]
pub struct ImporterArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    legacy_flags: Vec<String>,
}

/// Arguments of `cdi import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// http(s)://…, s3://bucket/key (with --s3-endpoint), docker://host/repo[:tag|@digest],
    /// file:///path or a local path, or `blank`.
    pub source: String,
    /// Raw image file to write, block device, or directory (content type archive).
    pub dest: PathBuf,
    /// Size of the resulting disk (e.g. 10Gi); defaults to the image's virtual size.
    #[arg(long)]
    pub size: Option<String>,
    /// Expected checksum of the downloaded bytes, ALGO:HEX (md5, sha1, sha256, sha512).
    #[arg(long)]
    pub checksum: Option<String>,
    /// Extra CA certificate (PEM bundle) to trust; repeatable.
    #[arg(long = "ca-cert")]
    pub ca_cert: Vec<PathBuf>,
    /// Directory of CA certificates (every non-dot file is a PEM bundle); repeatable.
    #[arg(long = "cert-dir")]
    pub cert_dir: Vec<PathBuf>,
    /// Skip TLS certificate verification.
    #[arg(long)]
    pub insecure: bool,
    /// User name (HTTP basic auth, registry) or S3 access key id.
    #[arg(long = "access-key-id")]
    pub access_key_id: Option<String>,
    /// Password or S3 secret key.
    #[arg(long = "secret-key")]
    pub secret_key: Option<String>,
    /// Extra request header 'Name: value'; repeatable.
    #[arg(long = "header")]
    pub header: Vec<String>,
    /// kubevirt (a disk image, the default) or archive (a tar extracted into DEST).
    #[arg(long = "content-type", default_value = "kubevirt")]
    pub content_type: String,
    /// Preallocate the target.
    #[arg(long)]
    pub preallocation: bool,
    /// Scratch directory for formats that need random access (vhd, vhdx, vdi, …).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// S3 endpoint for s3:// sources (e.g. http://127.0.0.1:9000).
    #[arg(long = "s3-endpoint")]
    pub s3_endpoint: Option<String>,
    /// Architecture to pick from a multi-arch registry image (default: this host's).
    #[arg(long = "arch")]
    pub arch: Option<String>,
}

impl Command {
    /// Run the subcommand.
    pub fn run(self) -> ExitCode {
        crate::tls::install_crypto_provider();
        match self {
            Command::Importer(_) => {
                init_tracing("info");
                crate::pod::run()
            }
            Command::Import(args) => {
                init_tracing("warn");
                run_cli(*args)
            }
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Turn `cdi import` arguments into a request.
pub fn request_from_args(args: &ImportArgs) -> Result<ImportRequest> {
    let content_type = match args.content_type.as_str() {
        "kubevirt" => ContentType::Kubevirt,
        "archive" => ContentType::Archive,
        other => {
            return Err(ImportError::config(format!(
                "unknown content type {other:?} (kubevirt, archive)"
            )));
        }
    };
    let s = args.source.as_str();
    let source = if s == "blank" {
        SourceSpec::Blank
    } else if s.starts_with("http://") || s.starts_with("https://") {
        SourceSpec::Http(
            Url::parse(s).map_err(|e| ImportError::config(format!("invalid URL {s:?}: {e}")))?,
        )
    } else if s.starts_with("s3://") {
        let endpoint = args
            .s3_endpoint
            .as_deref()
            .unwrap_or("https://s3.amazonaws.com");
        let endpoint = Url::parse(endpoint)
            .map_err(|e| ImportError::config(format!("invalid --s3-endpoint {endpoint:?}: {e}")))?;
        SourceSpec::S3(S3Location::from_s3_uri(s, &endpoint)?.object_url())
    } else if s.starts_with("docker://") {
        SourceSpec::Registry(s.to_string())
    } else if let Some(rest) = s.strip_prefix("file://") {
        SourceSpec::File(PathBuf::from(rest))
    } else if std::path::Path::new(s).exists() {
        SourceSpec::File(PathBuf::from(s))
    } else {
        return Err(ImportError::config(format!(
            "unknown source {s:?}: expected http(s)://, s3://, docker://, file:// or blank"
        )));
    };
    let is_block = std::fs::metadata(&args.dest)
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false);
    let dest = if is_block {
        Destination::Block(args.dest.clone())
    } else if content_type == ContentType::Archive {
        std::fs::create_dir_all(&args.dest)
            .map_err(|e| ImportError::io(format!("creating {}", args.dest.display()), e))?;
        Destination::Dir(args.dest.clone())
    } else {
        Destination::File(args.dest.clone())
    };
    let image_size = args
        .size
        .as_deref()
        .map(|q| {
            cdi_api::quantity::parse_bytes(q)
                .map_err(|e| ImportError::config(format!("invalid --size {q:?}: {e}")))
        })
        .transpose()?;
    let credentials = args.access_key_id.clone().map(|user| Credentials {
        user,
        password: args.secret_key.clone().unwrap_or_default(),
    });
    Ok(ImportRequest {
        content_type,
        image_size,
        preallocation: args.preallocation,
        scratch_dir: args.scratch.clone(),
        checksum: args.checksum.as_deref().map(Checksum::parse).transpose()?,
        credentials,
        tls: TlsOptions {
            ca_dirs: args.cert_dir.clone(),
            ca_files: args.ca_cert.clone(),
            insecure: args.insecure,
        },
        headers: args.header.clone(),
        architecture: args.arch.clone(),
        ..ImportRequest::new(source, dest)
    })
}

fn run_cli(args: ImportArgs) -> ExitCode {
    let req = match request_from_args(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cdi import: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cdi import: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tty = std::io::stderr().is_terminal();
    let progress = Arc::new(Progress::default());
    let result = runtime.block_on(async {
        let cancel = CancellationToken::new();
        crate::pod::spawn_signal_handler(cancel.clone());
        let ticker = tty.then(|| tokio::spawn(progress_line(progress.clone())));
        let r = run_import(req, progress.clone(), cancel).await;
        if let Some(t) = ticker {
            t.abort();
            eprint!("\r\x1b[K");
        }
        r
    });
    runtime.shutdown_background();
    match result {
        Ok(outcome) => {
            eprintln!("{}", summary(&args, &outcome, &progress));
            ExitCode::SUCCESS
        }
        Err(e) => {
            let hint = match e.kind() {
                ErrorKind::ScratchRequired => " (pass --scratch DIR)",
                _ => "",
            };
            eprintln!("cdi import: {e}{hint}");
            ExitCode::FAILURE
        }
    }
}

/// Human-readable bytes (binary units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

async fn progress_line(progress: Arc<Progress>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let read = progress.bytes();
        let total = progress.total();
        let secs = progress.elapsed_secs().max(0.001);
        let rate = read as f64 / secs;
        let mut line = format!("{} read, {}/s", human_bytes(read), human_bytes(rate as u64));
        if total > 0 {
            line = format!(
                "{} of {}",
                line.replacen(" read", "", 1),
                human_bytes(total)
            );
            line.push_str(&format!(" ({:.1}%)", progress.percent()));
            if rate > 0.0 && total > read {
                line.push_str(&format!(", ETA {:.0}s", (total - read) as f64 / rate));
            }
        }
        eprint!("\r\x1b[K{line}");
    }
}

fn summary(args: &ImportArgs, o: &ImportOutcome, p: &Progress) -> String {
    let secs = p.elapsed_secs();
    let mut s = format!("imported {} -> {}", args.source, args.dest.display());
    if let Some(r) = &o.report {
        let comp: Vec<String> = r
            .compression
            .iter()
            .map(|c| format!("{c:?}").to_lowercase())
            .collect();
        let fmt = format!("{:?}", r.format).to_lowercase();
        let wrapped = if comp.is_empty() {
            fmt
        } else {
            format!("{fmt} in {}", comp.join("+"))
        };
        s.push_str(&format!(": {wrapped}, disk {}", human_bytes(r.target_size)));
    }
    if let Some(a) = &o.archive {
        s.push_str(&format!(
            ": {} files, {} dirs, {} links",
            a.files, a.dirs, a.links
        ));
    }
    s.push_str(&format!(
        ", {} read in {secs:.1}s",
        human_bytes(o.bytes_read)
    ));
    if o.stats.resumes > 0 || o.stats.restarts > 0 {
        s.push_str(&format!(
            " ({} resumes, {} restarts)",
            o.stats.resumes, o.stats.restarts
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    fn import_args(argv: &[&str]) -> ImportArgs {
        let mut full = vec!["cdi", "import"];
        full.extend_from_slice(argv);
        match Cli::parse_from(full).command {
            Command::Import(a) => *a,
            Command::Importer(_) => unreachable!(),
        }
    }

    #[test]
    fn importer_accepts_upstream_flags() {
        let cli = Cli::parse_from(["cdi", "importer", "-v=3", "-alsologtostderr"]);
        assert!(matches!(cli.command, Command::Importer(_)));
    }

    #[test]
    fn sources_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("disk.img");
        let d = dest.to_str().unwrap();
        let r =
            request_from_args(&import_args(&["https://h/x.qcow2", d, "--size", "1Gi"])).unwrap();
        assert!(matches!(r.source, SourceSpec::Http(_)));
        assert_eq!(r.image_size, Some(1 << 30));
        let r = request_from_args(&import_args(&[
            "s3://b/k.img",
            d,
            "--s3-endpoint",
            "http://127.0.0.1:9000",
        ]))
        .unwrap();
        assert_eq!(
            r.source,
            SourceSpec::S3(Url::parse("http://127.0.0.1:9000/b/k.img").unwrap())
        );
        let r = request_from_args(&import_args(&["blank", d, "--size", "1M"])).unwrap();
        assert_eq!(r.source, SourceSpec::Blank);
        let r = request_from_args(&import_args(&["file:///etc/hostname", d])).unwrap();
        assert_eq!(r.source, SourceSpec::File("/etc/hostname".into()));
        assert!(request_from_args(&import_args(&["gopher://x", d])).is_err());
        let r = request_from_args(&import_args(&["docker://127.0.0.1:5000/a/b:v1", d])).unwrap();
        assert!(matches!(r.source, SourceSpec::Registry(_)));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
