//! A throw-away PKI for TLS test servers.
//!
//! ```text
//! let pki = TestPki::generate(&workdir.join("pki"))?;
//! // pki.ca_cert: PEM CA certificate clients trust (also alone in pki.ca_dir, which is what
//! //   `IMPORTER_CERT_DIR` / `--cert-dir` / `skopeo --cert-dir` expect)
//! // pki.server_cert / pki.server_key: PEM pair for DNS:localhost and IP:127.0.0.1
//! ```
//!
//! Generated with the openssl CLI (RSA-2048, valid two days), so every server we start (nginx,
//! docker-registry) reads the files exactly as in production.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA plus one server certificate signed by it.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// Directory holding all files.
    pub dir: PathBuf,
    /// CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// CA private key (PEM).
    pub ca_key: PathBuf,
    /// Server certificate for `localhost` and `127.0.0.1` (PEM).
    pub server_cert: PathBuf,
    /// Server private key (PEM).
    pub server_key: PathBuf,
    /// A directory that contains only `ca.crt` (a CA directory for clients).
    pub ca_dir: PathBuf,
}

impl TestPki {
    /// Create the CA and the server certificate in `dir` (created if needed).
    pub fn generate(dir: &Path) -> io::Result<TestPki> {
        fs::create_dir_all(dir)?;
        let p = |name: &str| dir.join(name).into_os_string();
        openssl(&[
            "req".into(),
            "-x509".into(),
            "-newkey".into(),
            "rsa:2048".into(),
            "-nodes".into(),
            "-days".into(),
            "2".into(),
            "-subj".into(),
            "/CN=cdi-test-ca".into(),
            "-keyout".into(),
            p("ca.key"),
            "-out".into(),
            p("ca.crt"),
        ])?;
        openssl(&[
            "req".into(),
            "-newkey".into(),
            "rsa:2048".into(),
            "-nodes".into(),
            "-subj".into(),
            "/CN=localhost".into(),
            "-keyout".into(),
            p("server.key"),
            "-out".into(),
            p("server.csr"),
        ])?;
        fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )?;
        openssl(&[
            "x509".into(),
            "-req".into(),
            "-days".into(),
            "2".into(),
            "-CAcreateserial".into(),
            "-in".into(),
            p("server.csr"),
            "-CA".into(),
            p("ca.crt"),
            "-CAkey".into(),
            p("ca.key"),
            "-out".into(),
            p("server.crt"),
            "-extfile".into(),
            p("ext.cnf"),
        ])?;
        let p = |name: &str| dir.join(name);
        let ca_dir = p("ca-dir");
        fs::create_dir_all(&ca_dir)?;
        fs::copy(p("ca.crt"), ca_dir.join("ca.crt"))?;
        Ok(TestPki {
            dir: dir.to_path_buf(),
            ca_cert: p("ca.crt"),
            ca_key: p("ca.key"),
            server_cert: p("server.crt"),
            server_key: p("server.key"),
            ca_dir,
        })
    }
}

fn openssl(args: &[OsString]) -> io::Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    crate::run(&mut cmd).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_chain_that_verifies() {
        if !crate::have("openssl") {
            crate::skip("openssl is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate(dir.path()).unwrap();
        let out = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&pki.ca_cert)
            .arg(&pki.server_cert)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
