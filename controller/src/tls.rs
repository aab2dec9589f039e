//! The control plane's PKI: one CA under `DATA/pki/`, a server certificate for the listener,
//! per-run upload-server certificates and the proxy's client certificate.
//!
//! Keys never leave the data directory; files holding keys are mode 0600.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::reconcile::write_private;

/// Common name of our CA (the issuer is rebuilt from it and the key on restart).
const CA_CN: &str = "cdi-serve-ca";
/// Validity of the CA.
const CA_DAYS: i64 = 3650;
/// Validity of leaf certificates (the listener's is reissued on every start).
const LEAF_DAYS: i64 = 365;

/// Why PKI setup failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// File I/O failed.
    #[error("{path}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("generating certificate")]
    Rcgen(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A PEM certificate and its PEM key.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PEM).
    pub key_pem: String,
}

/// The CA of one data directory.
pub struct Ca {
    cert_pem: String,
    key: KeyPair,
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn set_validity(p: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks that disagree slightly.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
}

impl Ca {
    /// Load `dir/ca.crt` + `dir/ca.key`, creating them on first start.
    pub fn load_or_create(dir: &Path) -> Result<Ca, PkiError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        if cert_path.exists() && key_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            return Ok(Ca {
                cert_pem,
                key: KeyPair::from_pem(&key_pem)?,
            });
        }
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        set_validity(&mut params, CA_DAYS);
        let cert = params.self_signed(&key)?;
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
        std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// The CA certificate (what clients trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issue(
        &self,
        cn: &str,
        sans: &[&str],
        eku: ExtendedKeyUsagePurpose,
    ) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for s in sans {
            params
                .subject_alt_names
                .push(match s.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName((*s).try_into()?),
                });
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![eku];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        set_validity(&mut params, LEAF_DAYS);
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for `sans` (IPs or DNS names).
    pub fn issue_server(&self, sans: &[&str]) -> Result<Issued, PkiError> {
        let cn = sans.first().copied().unwrap_or("localhost");
        self.issue(cn, sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `cn`.
    pub fn issue_client(&self, cn: &str) -> Result<Issued, PkiError> {
        self.issue(cn, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// rustls server config for a PEM certificate and key.
pub fn server_config(issued: &Issued) -> Result<rustls::ServerConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("parsing server certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
        .map_err(|e| format!("parsing server key: {e}"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("server certificate: {e}"))?;
    // HTTP/1.1 only: with h2, answering a refused upload before reading its body resets the
    // stream, which clients (curl) report as a transport error instead of the status.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_persists_and_issues_verifiable_leaves() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(tmp.path()).unwrap();
        let again = Ca::load_or_create(tmp.path()).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
        let leaf = again.issue_server(&["127.0.0.1", "localhost"]).unwrap();
        assert!(server_config(&leaf).is_ok());
        let meta = std::fs::metadata(tmp.path().join("ca.key")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
        // The leaf chains to the CA: verify with openssl when present.
        if std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_ok()
        {
            std::fs::write(tmp.path().join("leaf.crt"), &leaf.cert_pem).unwrap();
            let out = std::process::Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(tmp.path().join("ca.crt"))
                .arg(tmp.path().join("leaf.crt"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
