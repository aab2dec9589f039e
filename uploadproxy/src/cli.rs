//! `cdi uploadproxy`: the upload proxy as a standalone TLS server with a static volume table.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use cdi_pki::{CertPair, ClientAuth, ServerTrust};
use cdi_token::TokenVerifier;

use crate::{ProxyState, StaticResolver, UploadTarget};

/// Subcommands this crate contributes to the `cdi` binary.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Upload proxy: check upload tokens and stream uploads to upload servers over mTLS.
    Uploadproxy(ProxyArgs),
}

impl Command {
    /// Run the subcommand.
    pub fn run(self) -> ExitCode {
        match self {
            Command::Uploadproxy(args) => match args.run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            },
        }
    }
}

/// Settings of `cdi uploadproxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Server certificate (PEM).
    #[arg(long, env = "SERVER_CERT_FILE")]
    tls_cert: PathBuf,
    /// Server key (PEM).
    #[arg(long, env = "SERVER_KEY_FILE")]
    tls_key: PathBuf,
    /// Token public key file (PEM; a private key file also works).
    #[arg(long, conflicts_with = "token_public_key_pem")]
    token_key_file: Option<PathBuf>,
    /// Token public key as PEM text (upstream's APISERVER_PUBLIC_KEY).
    #[arg(long, env = "APISERVER_PUBLIC_KEY", hide_env_values = true)]
    token_public_key_pem: Option<String>,
    /// Client certificate presented to upload servers (PEM).
    #[arg(long, env = "UPLOAD_CLIENT_CERT_FILE")]
    client_cert: PathBuf,
    /// Client key (PEM).
    #[arg(long, env = "UPLOAD_CLIENT_KEY_FILE")]
    client_key: PathBuf,
    /// CA bundle upload-server certificates must chain to.
    #[arg(long)]
    upload_server_ca: PathBuf,
    /// A volume: `NS/PVC=https://127.0.0.1:PORT` (append `#archive` for archive volumes).
    #[arg(long = "target", value_name = "NS/PVC=URL")]
    targets: Vec<String>,
    /// Name checked in upload-server certificates (default: the URL's host).
    #[arg(long)]
    server_name: Option<String>,
}

/// Parse `NS/PVC=URL[#archive]`.
pub fn parse_target(
    spec: &str,
    server_name: Option<&str>,
) -> anyhow::Result<(String, String, UploadTarget)> {
    let (key, url) = spec
        .split_once('=')
        .ok_or_else(|| anyhow!("--target {spec:?}: expected NS/PVC=URL"))?;
    let (ns, pvc) = key
        .split_once('/')
        .ok_or_else(|| anyhow!("--target {spec:?}: expected NS/PVC"))?;
    if ns.is_empty() || pvc.is_empty() {
        bail!("--target {spec:?}: empty namespace or volume name");
    }
    let (url, archive) = match url.strip_suffix("#archive") {
        Some(u) => (u, true),
        None => (url, false),
    };
    let url: url::Url = url.parse().with_context(|| format!("--target {spec:?}"))?;
    let host = url
        .host_str()
        .ok_or_else(|| anyhow!("--target {spec:?}: URL has no host"))?;
    let server_name = server_name
        .unwrap_or(host)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((
        ns.to_string(),
        pvc.to_string(),
        UploadTarget {
            url,
            server_name,
            archive,
        },
    ))
}

impl ProxyArgs {
    fn run(self) -> anyhow::Result<()> {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .try_init();
        cdi_pki::install_default_provider();
        let verifier = match (&self.token_key_file, &self.token_public_key_pem) {
            (Some(path), _) => TokenVerifier::from_key_file(path)?,
            (None, Some(pem)) => TokenVerifier::from_public_pem(pem)?,
            (None, None) => bail!("give --token-key-file or APISERVER_PUBLIC_KEY"),
        };
        let mut resolver = StaticResolver::default();
        for spec in &self.targets {
            let (ns, pvc, target) = parse_target(spec, self.server_name.as_deref())?;
            resolver.insert(&ns, &pvc, target);
        }
        let ca = std::fs::read_to_string(&self.upload_server_ca)
            .with_context(|| format!("reading {}", self.upload_server_ca.display()))?;
        let client = CertPair::read_files(&self.client_cert, &self.client_key)?;
        let client_tls = cdi_pki::client_config(ServerTrust::Ca(&ca), Some(&client))?;
        let server = CertPair::read_files(&self.tls_cert, &self.tls_key)?;
        let server_tls = cdi_pki::server_config(&server, ClientAuth::None)?;
        let state = ProxyState {
            verifier,
            resolver: Arc::new(resolver),
            client_tls: Arc::new(client_tls),
        };
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(self.listen)
                .await
                .with_context(|| format!("listening on {}", self.listen))?;
            eprintln!("upload proxy listening on {}", listener.local_addr()?);
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            cdi_pki::serve::serve_tls(
                listener,
                Arc::new(server_tls),
                crate::router(state),
                shutdown,
            )
            .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_spec_parses() {
        let (ns, pvc, t) = parse_target("default/disk=https://127.0.0.1:9443", None).unwrap();
        assert_eq!((ns.as_str(), pvc.as_str()), ("default", "disk"));
        assert_eq!(t.server_name, "127.0.0.1");
        assert!(!t.archive);
    }

    #[test]
    fn archive_suffix_marks_archive_volumes() {
        let (_, _, t) =
            parse_target("ns/a=https://localhost:1#archive", Some("up.example")).unwrap();
        assert!(t.archive);
        assert_eq!(t.server_name, "up.example");
    }

    #[test]
    fn malformed_target_is_refused() {
        assert!(parse_target("nopvc=https://x", None).is_err());
        assert!(parse_target("ns/p", None).is_err());
    }
}
