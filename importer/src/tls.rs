//! One HTTP client configuration for every network source: trust, proxies, timeouts.
//!
//! Trust follows upstream: the system roots plus every non-dot file in the source's CA
//! directory (`IMPORTER_CERT_DIR`) and the proxy's (`IMPORTER_PROXY_CERT_DIR`), each a PEM
//! bundle; `INSECURE_TLS` turns verification off. Proxies come from `http_proxy`,
//! `https_proxy` and `no_proxy`. Redirects are never followed by the client: sources follow
//! them themselves so credentials stay with the origin they were meant for.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{ImportError, Result};

/// Time allowed to establish a TCP + TLS connection. The idle watchdog covers the body.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// `User-Agent` of every request.
pub const USER_AGENT: &str = concat!("cdi-importer/", env!("CARGO_PKG_VERSION"));

/// TLS and trust settings.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Directories whose non-dot files are PEM bundles to trust (source and proxy CA dirs).
    pub ca_dirs: Vec<PathBuf>,
    /// Single PEM files to trust.
    pub ca_files: Vec<PathBuf>,
    /// Skip certificate verification.
    pub insecure: bool,
}

/// Install ring as the process-wide rustls provider (once; later calls are no-ops).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Every PEM file the options name: non-dot regular files of each directory, sorted, then the
/// single files.
pub fn ca_files(opts: &TlsOptions) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for dir in &opts.ca_dirs {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            ImportError::config(format!("reading CA directory {}: {e}", dir.display()))
        })?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        files.extend(found);
    }
    files.extend(opts.ca_files.iter().cloned());
    Ok(files)
}

fn load_bundle(path: &Path) -> Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path)
        .map_err(|e| ImportError::config(format!("reading CA file {}: {e}", path.display())))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| ImportError::config(format!("parsing CA file {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ImportError::config(format!(
            "no PEM certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// The client all HTTP-based sources share.
pub fn build_client(opts: &TlsOptions) -> Result<reqwest::Client> {
    install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .tls_backend_rustls();
    let mut certs = Vec::new();
    for file in ca_files(opts)? {
        certs.extend(load_bundle(&file)?);
    }
    if !certs.is_empty() {
        builder = builder.tls_certs_merge(certs);
    }
    if opts.insecure {
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    builder
        .build()
        .map_err(|e| ImportError::config(format!("building the HTTP client: {e}")))
}

/// One line describing a reqwest error with its causes ("error sending request: … invalid
/// peer certificate: UnknownIssuer").
pub fn describe_error(err: &reqwest::Error) -> String {
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_files_are_ignored_and_order_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.pem"), "x").unwrap();
        std::fs::write(dir.path().join("a.crt"), "x").unwrap();
        std::fs::write(dir.path().join(".hidden"), "x").unwrap();
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        let files = ca_files(&TlsOptions {
            ca_dirs: vec![dir.path().into()],
            ..Default::default()
        })
        .unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["a.crt", "b.pem"]);
    }

    #[test]
    fn a_file_without_certificates_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
        let err = build_client(&TlsOptions {
            ca_dirs: vec![dir.path().into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }
}
