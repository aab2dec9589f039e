//! Certificates and TLS configuration for the upload path: a file-backed CA, server and client
//! certificates it issues, and the rustls configurations that use them.
//!
//! ```text
//!   Ca::load_or_create(dir, cn)          dir/ca.crt, dir/ca.key (0600); created when absent
//!     ├─ issue_server(dns, ips) ─► CertPair   (serverAuth; SANs = dns + ips)
//!     └─ issue_client(cn)       ─► CertPair   (clientAuth; CN = cn, what the upload server checks)
//!
//!   server_config(pair, ClientAuth::{None | Optional(ca) | Required(ca)})   ─► rustls::ServerConfig
//!   client_config(ca | insecure, Option<client pair>)                       ─► rustls::ClientConfig
//! ```
//!
//! Keys are ECDSA P-256 (rcgen with ring); every configuration is built with the ring provider
//! explicitly, so nothing here depends on a process-wide default provider. Binaries still call
//! [`install_default_provider`] once for libraries (reqwest) that use the default.
//!
//! The upload server uses [`ClientAuth::Optional`] like upstream (`VerifyClientCertIfGiven`):
//! the handshake verifies any certificate presented against the CA, and the request handler then
//! demands one whose common name is `CLIENT_NAME` ([`peer_common_names`]), so the
//! unauthenticated capability probe (`HEAD` on the async paths) and `/healthz` still work.

pub mod serve;

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// File name of the CA certificate inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// CA lifetime. Long, because every issued certificate dies with it and the embedded control
/// plane has no rotation of the root yet; leaves are short-lived instead.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Lifetime of issued server and client certificates. Upstream rotates leaf certificates about
/// daily and ends upload pods at a deadline derived from them; a year keeps a long-running
/// `cdi serve` simple while the control plane derives upload-server deadlines from it.
pub const LEAF_VALIDITY_DAYS: i64 = 365;
/// Certificates are valid from slightly in the past so clock skew between processes on
/// different hosts does not reject a fresh certificate.
const BACKDATE: time::Duration = time::Duration::minutes(5);

/// What can go wrong creating or loading certificates and TLS configs.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Certificate or key generation/parsing failed.
    #[error("certificate: {0}")]
    Cert(String),
    /// A PEM input held no certificate or key.
    #[error("{0}")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Tls(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn cert_err(e: rcgen::Error) -> PkiError {
    PkiError::Cert(e.to_string())
}

/// A PEM certificate (chain) and its PEM private key.
#[derive(Clone, PartialEq, Eq)]
pub struct CertPair {
    /// Certificate in PEM.
    pub cert_pem: String,
    /// PKCS#8 private key in PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for CertPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPair")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl CertPair {
    /// Write the certificate (mode 0644) and key (mode 0600) files, creating parent directories.
    pub fn write_files(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_file(cert_path, self.cert_pem.as_bytes(), 0o644)?;
        write_file(key_path, self.key_pem.as_bytes(), 0o600)
    }

    /// Read a pair from files.
    pub fn read_files(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        Ok(CertPair {
            cert_pem: fs::read_to_string(cert_path).map_err(io_err(cert_path))?,
            key_pem: fs::read_to_string(key_path).map_err(io_err(key_path))?,
        })
    }
}

/// A certificate authority whose certificate and key live in a directory.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Load `dir/ca.crt` + `dir/ca.key`, or create a self-signed CA named `common_name` there
    /// (directory created, key mode 0600) when the certificate does not exist yet.
    pub fn load_or_create(dir: &Path, common_name: &str) -> Result<Ca, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if cert_path.exists() {
            let pair = CertPair::read_files(&cert_path, &key_path)?;
            return Ca::from_pem(&pair.cert_pem, &pair.key_pem);
        }
        let ca = Ca::generate(common_name)?;
        let key_pem = ca.issuer.key().serialize_pem();
        // Key first: a crash in between leaves no certificate without its key.
        write_file(&key_path, key_pem.as_bytes(), 0o600)?;
        write_file(&cert_path, ca.cert_pem.as_bytes(), 0o644)?;
        Ok(ca)
    }

    /// A new in-memory CA (tests, throw-away PKIs).
    pub fn generate(common_name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key).map_err(cert_err)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(cert_err)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(cert_err)?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            issuer,
        })
    }

    /// The CA certificate in PEM (what clients and servers trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key in PEM (for callers that persist it elsewhere).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A server certificate for `dns` names and `ips` (the first DNS name, else the first IP,
    /// is also the common name).
    pub fn issue_server(&self, dns: &[&str], ips: &[IpAddr]) -> Result<CertPair, PkiError> {
        let mut sans = Vec::new();
        for d in dns {
            sans.push(SanType::DnsName((*d).try_into().map_err(cert_err)?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let cn = dns
            .first()
            .map(|d| d.to_string())
            .or_else(|| ips.first().map(|i| i.to_string()));
        let mut params = CertificateParams::default();
        params.distinguished_name = name(cn.as_deref().unwrap_or("server"));
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        self.sign(params)
    }

    /// A client certificate whose subject common name is `common_name` (for uploads upstream's
    /// `client.upload-server.cdi.kubevirt.io`).
    pub fn issue_client(&self, common_name: &str) -> Result<CertPair, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<CertPair, PkiError> {
        set_validity(&mut params, LEAF_VALIDITY_DAYS);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::days(days);
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    // `mode` only applies to new files; an existing key file must not stay world-readable.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Install ring as the process-wide rustls provider; a second call (or another library having
/// done it) is fine.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM bundle.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| PkiError::Pem(format!("bad certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::Pem("no certificate in PEM input".into()));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM input.
pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Pem(format!("no usable private key in PEM input: {e}")))
}

fn roots(ca_pem: &str) -> Result<RootCertStore, PkiError> {
    let mut store = RootCertStore::empty();
    for cert in parse_certs(ca_pem)? {
        store
            .add(cert)
            .map_err(|e| PkiError::Tls(format!("CA certificate: {e}")))?;
    }
    Ok(store)
}

/// Whether and how a server asks for client certificates.
#[derive(Debug, Clone, Copy)]
pub enum ClientAuth<'a> {
    /// No client certificates.
    None,
    /// A certificate, if presented, must chain to this CA bundle (PEM); anonymous clients are
    /// let through the handshake and the application decides (upstream's upload server).
    Optional(&'a str),
    /// Every client must present a certificate chaining to this CA bundle (PEM).
    Required(&'a str),
}

/// ALPN protocols servers offer: HTTP/1.1 only. Upload bodies are long single streams that
/// gain nothing from HTTP/2, and with HTTP/2 an early error answer (a refused token, an image
/// too large for the volume, sent before the body is read) reaches curl as a stream reset
/// instead of the status. Callers that want h2 can set `alpn_protocols` on the returned config.
const SERVER_ALPN: [&[u8]; 1] = [b"http/1.1"];

/// A rustls server configuration presenting `pair`.
pub fn server_config(
    pair: &CertPair,
    client_auth: ClientAuth<'_>,
) -> Result<ServerConfig, PkiError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Optional(ca) | ClientAuth::Required(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider());
            let verifier = if matches!(client_auth, ClientAuth::Optional(_)) {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier.build().map_err(|e| PkiError::Tls(e.to_string()))?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(parse_certs(&pair.cert_pem)?, parse_key(&pair.key_pem)?)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    config.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// How a client decides to trust a server.
#[derive(Debug, Clone, Copy)]
pub enum ServerTrust<'a> {
    /// Only certificates chaining to this CA bundle (PEM).
    Ca(&'a str),
    /// Anything (`--insecure`): the server's identity is not verified at all.
    Insecure,
}

/// A rustls client configuration, optionally presenting a client certificate. ALPN is left
/// empty (HTTP/1.1), which every server here speaks.
pub fn client_config(
    trust: ServerTrust<'_>,
    client: Option<&CertPair>,
) -> Result<ClientConfig, PkiError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let builder = match trust {
        ServerTrust::Ca(ca) => builder.with_root_certificates(roots(ca)?),
        ServerTrust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider()))),
    };
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some(pair) => builder
            .with_client_auth_cert(parse_certs(&pair.cert_pem)?, parse_key(&pair.key_pem)?)
            .map_err(|e| PkiError::Tls(e.to_string())),
    }
}

/// The `--insecure` verifier: accepts any server certificate but still checks that the
/// handshake signatures are valid for the certificate presented.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Subject common names of a DER certificate (empty when it does not parse). Used on peer
/// certificates that rustls has already verified against the CA.
pub fn peer_common_names(cert_der: &[u8]) -> Vec<String> {
    match x509_parser::parse_x509_certificate(cert_der) {
        Ok((_, cert)) => cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string))
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use rustls::{ClientConnection, ServerConnection};

    use super::*;

    /// Run a handshake between two in-memory connections; Err carries the first failure.
    fn handshake(
        server: ServerConfig,
        client: ClientConfig,
        name: &str,
    ) -> Result<ServerConnection, rustls::Error> {
        let mut s = ServerConnection::new(Arc::new(server))?;
        let mut c = ClientConnection::new(
            Arc::new(client),
            ServerName::try_from(name.to_string()).unwrap(),
        )?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            if !s.is_handshaking() && !c.is_handshaking() {
                return Ok(s);
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn mutual_tls_handshake_succeeds_and_exposes_client_cn() {
        let ca = Ca::generate("test-ca").unwrap();
        let server = ca
            .issue_server(&["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
            .unwrap();
        let client = ca
            .issue_client("client.upload-server.cdi.kubevirt.io")
            .unwrap();
        let s = handshake(
            server_config(&server, ClientAuth::Required(ca.cert_pem())).unwrap(),
            client_config(ServerTrust::Ca(ca.cert_pem()), Some(&client)).unwrap(),
            "127.0.0.1",
        )
        .unwrap();
        let peer = s.peer_certificates().unwrap();
        assert_eq!(
            peer_common_names(&peer[0]),
            vec!["client.upload-server.cdi.kubevirt.io"]
        );
    }

    #[test]
    fn server_of_another_ca_is_refused() {
        let ca = Ca::generate("test-ca").unwrap();
        let other = Ca::generate("other-ca").unwrap();
        let server = other.issue_server(&["localhost"], &[]).unwrap();
        let err = handshake(
            server_config(&server, ClientAuth::None).unwrap(),
            client_config(ServerTrust::Ca(ca.cert_pem()), None).unwrap(),
            "localhost",
        );
        assert!(err.is_err());
    }

    #[test]
    fn insecure_client_accepts_any_server() {
        let other = Ca::generate("other-ca").unwrap();
        let server = other.issue_server(&["localhost"], &[]).unwrap();
        let res = handshake(
            server_config(&server, ClientAuth::None).unwrap(),
            client_config(ServerTrust::Insecure, None).unwrap(),
            "localhost",
        );
        assert!(res.is_ok());
    }

    #[test]
    fn required_client_auth_refuses_anonymous_clients() {
        let ca = Ca::generate("test-ca").unwrap();
        let server = ca.issue_server(&["localhost"], &[]).unwrap();
        let res = handshake(
            server_config(&server, ClientAuth::Required(ca.cert_pem())).unwrap(),
            client_config(ServerTrust::Ca(ca.cert_pem()), None).unwrap(),
            "localhost",
        );
        assert!(res.is_err());
    }

    #[test]
    fn optional_client_auth_lets_anonymous_clients_in() {
        let ca = Ca::generate("test-ca").unwrap();
        let server = ca.issue_server(&["localhost"], &[]).unwrap();
        let s = handshake(
            server_config(&server, ClientAuth::Optional(ca.cert_pem())).unwrap(),
            client_config(ServerTrust::Ca(ca.cert_pem()), None).unwrap(),
            "localhost",
        )
        .unwrap();
        assert!(s.peer_certificates().is_none());
    }

    #[test]
    fn optional_client_auth_still_refuses_foreign_client_certs() {
        let ca = Ca::generate("test-ca").unwrap();
        let other = Ca::generate("other-ca").unwrap();
        let server = ca.issue_server(&["localhost"], &[]).unwrap();
        let client = other
            .issue_client("client.upload-server.cdi.kubevirt.io")
            .unwrap();
        let res = handshake(
            server_config(&server, ClientAuth::Optional(ca.cert_pem())).unwrap(),
            client_config(ServerTrust::Ca(ca.cert_pem()), Some(&client)).unwrap(),
            "localhost",
        );
        assert!(res.is_err());
    }

    #[test]
    fn ca_is_persisted_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(&dir.path().join("pki"), "cdi-ca").unwrap();
        let key_mode = fs::metadata(dir.path().join("pki/ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);
        let again = Ca::load_or_create(&dir.path().join("pki"), "ignored").unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
        // A certificate issued by the reloaded CA is trusted by the original's certificate.
        let server = again.issue_server(&["localhost"], &[]).unwrap();
        let res = handshake(
            server_config(&server, ClientAuth::None).unwrap(),
            client_config(ServerTrust::Ca(ca.cert_pem()), None).unwrap(),
            "localhost",
        );
        assert!(res.is_ok());
    }

    #[test]
    fn cert_pair_files_have_private_key_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test-ca").unwrap();
        let pair = ca.issue_client("c").unwrap();
        let (crt, key) = (dir.path().join("a/tls.crt"), dir.path().join("a/tls.key"));
        pair.write_files(&crt, &key).unwrap();
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(CertPair::read_files(&crt, &key).unwrap(), pair);
    }
}
