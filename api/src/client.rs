//! Where CLI commands find the `cdi serve` they talk to: server URL, admin token, CA file.
//!
//! `cdi serve --data-dir DIR` writes `DIR/server.url`, `DIR/admin.token` (mode 0600) and
//! `DIR/pki/ca.crt` on start. Every client command resolves, in order: explicit flag,
//! environment variable, file under the data directory (`--data-dir`, `$CDI_HOME`, else
//! `./cdi-data`).

use std::path::{Path, PathBuf};

/// Environment variable naming the data directory of `cdi serve`.
pub const CDI_HOME: &str = "CDI_HOME";
/// Environment variable with the server URL.
pub const CDI_SERVER: &str = "CDI_SERVER";
/// Environment variable with the bearer token.
pub const CDI_TOKEN: &str = "CDI_TOKEN";
/// Environment variable with the CA certificate path.
pub const CDI_CA_CERT: &str = "CDI_CA_CERT";
/// Data directory when nothing else is said.
pub const DEFAULT_DATA_DIR: &str = "./cdi-data";
/// Address `cdi serve` listens on by default (loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
/// File under the data dir holding the server URL.
pub const SERVER_URL_FILE: &str = "server.url";
/// File under the data dir holding the admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// File under the data dir holding the CA certificate clients trust.
pub const CA_CERT_FILE: &str = "pki/ca.crt";

/// Resolved connection settings of a client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Base URL, e.g. `https://127.0.0.1:8443`.
    pub server: String,
    /// Bearer token.
    pub token: String,
    /// CA certificate to trust (PEM file); `None` uses the system roots.
    pub ca_cert: Option<PathBuf>,
}

/// Flags a client command was given (all optional).
#[derive(Debug, Clone, Default)]
pub struct ClientFlags {
    /// `--server`.
    pub server: Option<String>,
    /// `--token`.
    pub token: Option<String>,
    /// `--ca-cert`.
    pub ca_cert: Option<PathBuf>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
}

impl ClientFlags {
    /// Resolve flags, environment and data-dir files into a config.
    pub fn resolve(&self) -> Result<ClientConfig, String> {
        let data_dir = self
            .data_dir
            .clone()
            .or_else(|| std::env::var_os(CDI_HOME).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let server = match self
            .server
            .clone()
            .or_else(|| std::env::var(CDI_SERVER).ok())
        {
            Some(s) => s,
            None => read_trimmed(&data_dir.join(SERVER_URL_FILE))
                .unwrap_or_else(|| format!("https://{DEFAULT_LISTEN}")),
        };
        let token = match self.token.clone().or_else(|| std::env::var(CDI_TOKEN).ok()) {
            Some(t) => t,
            None => read_trimmed(&data_dir.join(ADMIN_TOKEN_FILE)).ok_or_else(|| {
                format!(
                    "no token: pass --token, set {CDI_TOKEN}, or point --data-dir at the \
                     directory of 'cdi serve' (looked for {})",
                    data_dir.join(ADMIN_TOKEN_FILE).display()
                )
            })?,
        };
        let ca_cert = self
            .ca_cert
            .clone()
            .or_else(|| std::env::var_os(CDI_CA_CERT).map(PathBuf::from))
            .or_else(|| Some(data_dir.join(CA_CERT_FILE)).filter(|p| p.exists()));
        Ok(ClientConfig {
            server: server.trim_end_matches('/').to_string(),
            token,
            ca_cert,
        })
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_flags_win() {
        let flags = ClientFlags {
            server: Some("https://h:1/".into()),
            token: Some("t".into()),
            ca_cert: Some("/ca.crt".into()),
            data_dir: Some("/nonexistent".into()),
        };
        let cfg = flags.resolve().unwrap();
        assert_eq!(cfg.server, "https://h:1");
        assert_eq!(cfg.token, "t");
        assert_eq!(cfg.ca_cert, Some(PathBuf::from("/ca.crt")));
    }

    #[test]
    fn data_dir_files_are_read() {
        let dir = std::env::temp_dir().join(format!("cdi-client-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("pki")).unwrap();
        std::fs::write(dir.join(SERVER_URL_FILE), "https://127.0.0.1:9999\n").unwrap();
        std::fs::write(dir.join(ADMIN_TOKEN_FILE), "secret\n").unwrap();
        std::fs::write(dir.join(CA_CERT_FILE), "pem").unwrap();
        let flags = ClientFlags {
            data_dir: Some(dir.clone()),
            ..Default::default()
        };
        let cfg = flags.resolve().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(cfg.server, "https://127.0.0.1:9999");
        assert_eq!(cfg.token, "secret");
        assert_eq!(cfg.ca_cert, Some(dir.join(CA_CERT_FILE)));
    }
}
