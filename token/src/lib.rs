//! Upload and clone tokens: PS256 JWS with upstream CDI's claims, as pure functions.
//!
//! The API server ([`TokenSigner::issue`]) mints a token for one PVC; the upload proxy
//! ([`TokenVerifier::verify`]) checks it before forwarding a byte. The wire format is
//! upstream's (`pkg/token/token.go`), so tokens interoperate with upstream tooling:
//!
//! ```text
//! header  {"alg":"PS256","typ":"JWT"}
//! claims  {"iss":"cdi-apiserver","iat":…,"nbf":…,"exp":iat+300,
//!          "operation":"Upload","name":"<pvc>","namespace":"<ns>",
//!          "resource":{"group":"","version":"v1","resource":"persistentvolumeclaims"},
//!          "params":{…}}            // params only when non-empty (clone tokens)
//! ```
//!
//! Verification checks the signature, the issuer and the time claims with
//! [`LEEWAY`] of clock skew; the caller then checks operation and resource
//! ([`Claims::check_upload`]), because what a token is *for* is policy, not cryptography.
//!
//! Keys are RSA-2048. [`TokenSigner::load_or_generate`] reads a PEM private key (PKCS#8 or
//! PKCS#1) or creates one (PKCS#8, mode 0600) when the file is absent, and writes the public
//! key next to it (`<key>.pub`) so a standalone proxy can be pointed at it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use serde::{Deserialize, Serialize};

/// Issuer of every token (`iss`), upstream's value.
pub const ISSUER: &str = "cdi-apiserver";
/// Lifetime of an upload token: upstream's 5 minutes. Long enough to start an upload (the
/// token is checked once, when the request arrives), short enough that a leaked one is useless.
pub const UPLOAD_TOKEN_TTL: Duration = Duration::from_secs(5 * 60);
/// Clock skew tolerated on `nbf`/`exp`, upstream's 10 seconds (control plane and proxy may run
/// on different hosts).
pub const LEEWAY: Duration = Duration::from_secs(10);
/// RSA modulus size of generated keys (upstream's `cdi-api-signing-key`).
pub const KEY_BITS: usize = 2048;

/// What a token authorizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operation {
    /// Upload into a PVC.
    Upload,
    /// Clone from a source PVC or snapshot.
    Clone,
}

/// Kubernetes `GroupVersionResource`, as upstream serializes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GroupVersionResource {
    /// API group ("" for core).
    #[serde(default)]
    pub group: String,
    /// API version.
    #[serde(default)]
    pub version: String,
    /// Plural resource name.
    #[serde(default)]
    pub resource: String,
}

impl GroupVersionResource {
    /// Core `v1` `persistentvolumeclaims`, the resource of upload tokens.
    pub fn pvcs() -> Self {
        GroupVersionResource {
            group: String::new(),
            version: "v1".into(),
            resource: "persistentvolumeclaims".into(),
        }
    }

    /// `snapshot.storage.k8s.io/v1` `volumesnapshots` (snapshot clone sources).
    pub fn volume_snapshots() -> Self {
        GroupVersionResource {
            group: "snapshot.storage.k8s.io".into(),
            version: "v1".into(),
            resource: "volumesnapshots".into(),
        }
    }
}

/// The claims of a token: registered time/issuer claims plus upstream's private ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer, always [`ISSUER`].
    pub iss: String,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Not before.
    pub nbf: u64,
    /// Expiry.
    pub exp: u64,
    /// What the token is for.
    pub operation: Operation,
    /// Resource name (the PVC).
    #[serde(default)]
    pub name: String,
    /// Namespace of the resource.
    #[serde(default)]
    pub namespace: String,
    /// Kind of resource.
    #[serde(default)]
    pub resource: GroupVersionResource,
    /// Extra parameters (clone: `targetNamespace`, `targetName`, `uid`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
}

impl Claims {
    /// The upstream proxy's policy for upload tokens: operation `Upload`, non-empty name and
    /// namespace, resource `persistentvolumeclaims`. A violation is a 400 at the proxy.
    pub fn check_upload(&self) -> Result<(), TokenError> {
        if self.operation != Operation::Upload {
            return Err(TokenError::WrongOperation(self.operation));
        }
        if self.name.is_empty() || self.namespace.is_empty() {
            return Err(TokenError::MissingTarget);
        }
        if self.resource.resource != "persistentvolumeclaims" {
            return Err(TokenError::WrongResource(self.resource.resource.clone()));
        }
        Ok(())
    }
}

/// Why a token, a key or signing was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token is not a compact JWS of our shape (bad base64/JSON, missing claims).
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The signature does not verify with our key, or the algorithm is not PS256.
    #[error("token signature is invalid")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iss` is not [`ISSUER`].
    #[error("token issuer is not {ISSUER}")]
    WrongIssuer,
    /// The token is for another operation.
    #[error("token is for operation {0:?}, not Upload")]
    WrongOperation(Operation),
    /// The token names no resource or namespace.
    #[error("token does not name a volume and namespace")]
    MissingTarget,
    /// The token is for another kind of resource.
    #[error("token is for resource {0:?}, not persistentvolumeclaims")]
    WrongResource(String),
    /// A key file could not be read, parsed, generated or written.
    #[error("signing key {path}: {message}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Signing failed (should not happen with a valid key).
    #[error("signing token: {0}")]
    Signing(String),
}

impl TokenError {
    /// Whether this is an authentication failure (401 at the proxy) rather than a malformed or
    /// misdirected request (400).
    pub fn is_unauthorized(&self) -> bool {
        matches!(
            self,
            TokenError::BadSignature
                | TokenError::Expired
                | TokenError::NotYetValid
                | TokenError::WrongIssuer
        )
    }
}

/// Mints tokens with the control plane's private key.
#[derive(Clone)]
pub struct TokenSigner {
    encoding: EncodingKey,
    public_pem: String,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner").finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// Read the RSA private key at `key_path`, or generate one there (mode 0600, parents
    /// created) when the file does not exist. The public key is (re)written to `<key>.pub`.
    pub fn load_or_generate(key_path: &Path) -> Result<Self, TokenError> {
        let key_err = |message: String| TokenError::Key {
            path: key_path.to_path_buf(),
            message,
        };
        let private = match std::fs::read_to_string(key_path) {
            Ok(pem) => parse_private_key(&pem).map_err(key_err)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, KEY_BITS)
                    .map_err(|e| key_err(format!("generating RSA key: {e}")))?;
                let pem = key
                    .to_pkcs8_pem(LineEnding::LF)
                    .map_err(|e| key_err(format!("encoding key: {e}")))?;
                write_private(key_path, pem.as_bytes()).map_err(|e| key_err(e.to_string()))?;
                key
            }
            Err(e) => return Err(key_err(e.to_string())),
        };
        let signer = Self::from_rsa_key(&private).map_err(key_err)?;
        std::fs::write(public_key_path(key_path), &signer.public_pem)
            .map_err(|e| key_err(format!("writing public key: {e}")))?;
        Ok(signer)
    }

    /// A signer from a PEM private key held in memory (tests, secrets passed by value).
    pub fn from_private_pem(pem: &str) -> Result<Self, TokenError> {
        let key = parse_private_key(pem).map_err(|message| TokenError::Key {
            path: PathBuf::from("<memory>"),
            message,
        })?;
        Self::from_rsa_key(&key).map_err(|message| TokenError::Key {
            path: PathBuf::from("<memory>"),
            message,
        })
    }

    fn from_rsa_key(key: &rsa::RsaPrivateKey) -> Result<Self, String> {
        // jsonwebtoken takes RSA keys as PKCS#1 DER.
        let der = key
            .to_pkcs1_der()
            .map_err(|e| format!("encoding key: {e}"))?;
        let public_pem = key
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| format!("encoding public key: {e}"))?;
        let encoding = EncodingKey::from_rsa_der(der.as_bytes());
        Ok(TokenSigner {
            encoding,
            public_pem,
        })
    }

    /// The public key (SPKI PEM) verifiers need.
    pub fn public_key_pem(&self) -> &str {
        &self.public_pem
    }

    /// A verifier for tokens of this signer.
    pub fn verifier(&self) -> TokenVerifier {
        // The PEM was produced by us a moment ago; parsing cannot fail.
        TokenVerifier::from_public_pem(&self.public_pem)
            .unwrap_or_else(|e| unreachable!("own public key does not parse: {e}"))
    }

    /// An upload or clone token for `namespace/name` valid for `ttl` from now, with the
    /// resource upstream uses for the operation (PVCs) and no params.
    pub fn issue(
        &self,
        operation: Operation,
        namespace: &str,
        name: &str,
        ttl: Duration,
    ) -> Result<String, TokenError> {
        let now = now_secs();
        self.sign(&Claims {
            iss: ISSUER.into(),
            iat: now,
            nbf: now,
            exp: now + ttl.as_secs(),
            operation,
            name: name.into(),
            namespace: namespace.into(),
            resource: GroupVersionResource::pvcs(),
            params: BTreeMap::new(),
        })
    }

    /// Sign arbitrary claims (clone tokens with params, tests).
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        jsonwebtoken::encode(&Header::new(Algorithm::PS256), claims, &self.encoding)
            .map_err(|e| TokenError::Signing(e.to_string()))
    }
}

/// Checks tokens against the control plane's public key. Cheap to clone.
#[derive(Clone)]
pub struct TokenVerifier {
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier").finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// A verifier from an RSA public key in PEM (SPKI `PUBLIC KEY` or PKCS#1 `RSA PUBLIC KEY`,
    /// upstream's `APISERVER_PUBLIC_KEY`).
    pub fn from_public_pem(pem: &str) -> Result<Self, TokenError> {
        let decoding = DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| TokenError::Key {
            path: PathBuf::from("<public key>"),
            message: e.to_string(),
        })?;
        let mut validation = Validation::new(Algorithm::PS256);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss"]);
        Ok(TokenVerifier {
            decoding,
            validation,
        })
    }

    /// A verifier from a public key file, or a private key file (its public half is used).
    pub fn from_key_file(path: &Path) -> Result<Self, TokenError> {
        let key_err = |message: String| TokenError::Key {
            path: path.to_path_buf(),
            message,
        };
        let pem = std::fs::read_to_string(path).map_err(|e| key_err(e.to_string()))?;
        if pem.contains("PRIVATE KEY") {
            let key = parse_private_key(&pem).map_err(key_err)?;
            let public = key
                .to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .map_err(|e| key_err(e.to_string()))?;
            return Self::from_public_pem(&public);
        }
        Self::from_public_pem(&pem)
    }

    /// Verify signature, issuer and time claims; returns the claims. Operation and resource are
    /// the caller's policy ([`Claims::check_upload`]).
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                JwtErrorKind::InvalidSignature | JwtErrorKind::InvalidAlgorithm => {
                    TokenError::BadSignature
                }
                JwtErrorKind::ExpiredSignature => TokenError::Expired,
                JwtErrorKind::ImmatureSignature => TokenError::NotYetValid,
                JwtErrorKind::InvalidIssuer => TokenError::WrongIssuer,
                _ => TokenError::Malformed(e.to_string()),
            })
    }
}

/// Where [`TokenSigner::load_or_generate`] writes the public key of `key_path`.
pub fn public_key_path(key_path: &Path) -> PathBuf {
    let mut name = key_path.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

fn parse_private_key(pem: &str) -> Result<rsa::RsaPrivateKey, String> {
    rsa::RsaPrivateKey::from_pkcs8_pem(pem)
        .or_else(|_| rsa::RsaPrivateKey::from_pkcs1_pem(pem))
        .map_err(|e| format!("not an RSA private key in PEM (PKCS#8 or PKCS#1): {e}"))
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;

    /// Key generation costs about a second in debug builds; the tests share one key.
    fn signer() -> &'static TokenSigner {
        static SIGNER: OnceLock<TokenSigner> = OnceLock::new();
        SIGNER.get_or_init(|| {
            let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, KEY_BITS).unwrap();
            TokenSigner::from_rsa_key(&key).unwrap()
        })
    }

    fn claims(now: u64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            iat: now,
            nbf: now,
            exp: now + 300,
            operation: Operation::Upload,
            name: "disk".into(),
            namespace: "default".into(),
            resource: GroupVersionResource::pvcs(),
            params: BTreeMap::new(),
        }
    }

    #[test]
    fn issued_upload_token_verifies_with_upstream_claims() {
        let token = signer()
            .issue(Operation::Upload, "ns1", "pvc1", UPLOAD_TOKEN_TTL)
            .unwrap();
        let got = signer().verifier().verify(&token).unwrap();
        assert_eq!(
            (got.operation, got.namespace.as_str(), got.name.as_str()),
            (Operation::Upload, "ns1", "pvc1")
        );
        assert_eq!(got.exp - got.iat, 300);
        assert!(got.check_upload().is_ok());
    }

    #[test]
    fn wire_format_is_upstreams() {
        let token = signer()
            .issue(Operation::Upload, "ns", "p", UPLOAD_TOKEN_TTL)
            .unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        use base64_decode as d;
        let header: serde_json::Value = serde_json::from_slice(&d(parts[0])).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&d(parts[1])).unwrap();
        assert_eq!(header["alg"], "PS256");
        assert_eq!(body["iss"], "cdi-apiserver");
        assert_eq!(body["operation"], "Upload");
        assert_eq!(
            body["resource"],
            serde_json::json!({"group":"","version":"v1","resource":"persistentvolumeclaims"})
        );
        assert!(body.get("params").is_none());
    }

    fn base64_decode(s: &str) -> Vec<u8> {
        // Minimal URL-safe base64 decoder, so the test does not trust the library it checks.
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for c in s.bytes() {
            let v = alphabet.iter().position(|&a| a == c).unwrap() as u32;
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }

    #[test]
    fn expired_token_is_rejected() {
        let now = now_secs();
        let mut c = claims(now - 400);
        c.exp = now - 20;
        let token = signer().sign(&c).unwrap();
        assert!(matches!(
            signer().verifier().verify(&token),
            Err(TokenError::Expired)
        ));
    }

    #[test]
    fn expiry_within_leeway_is_accepted() {
        let now = now_secs();
        let mut c = claims(now - 400);
        c.exp = now - 5;
        let token = signer().sign(&c).unwrap();
        assert!(signer().verifier().verify(&token).is_ok());
    }

    #[test]
    fn future_token_is_not_yet_valid() {
        let c = claims(now_secs() + 60);
        let token = signer().sign(&c).unwrap();
        assert!(matches!(
            signer().verifier().verify(&token),
            Err(TokenError::NotYetValid)
        ));
    }

    #[test]
    fn wrong_issuer_is_rejected() {
        let mut c = claims(now_secs());
        c.iss = "someone-else".into();
        let token = signer().sign(&c).unwrap();
        let err = signer().verifier().verify(&token).unwrap_err();
        assert!(matches!(err, TokenError::WrongIssuer));
        assert!(err.is_unauthorized());
    }

    #[test]
    fn token_of_another_key_is_a_bad_signature() {
        let other = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, KEY_BITS).unwrap();
        let other = TokenSigner::from_rsa_key(&other).unwrap();
        let token = other
            .issue(Operation::Upload, "ns", "p", UPLOAD_TOKEN_TTL)
            .unwrap();
        assert!(matches!(
            signer().verifier().verify(&token),
            Err(TokenError::BadSignature)
        ));
    }

    #[test]
    fn tampered_claims_are_a_bad_signature() {
        let token = signer()
            .issue(Operation::Upload, "ns", "p", UPLOAD_TOKEN_TTL)
            .unwrap();
        let forged_body = signer()
            .issue(Operation::Upload, "ns", "other", UPLOAD_TOKEN_TTL)
            .unwrap();
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = forged_body.split('.').nth(1).unwrap();
        let forged = parts.join(".");
        // Same header and signature, another volume's claims.
        assert!(matches!(
            signer().verifier().verify(&forged),
            Err(TokenError::BadSignature)
        ));
    }

    #[test]
    fn unsigned_token_is_refused() {
        // alg "none": header {"alg":"none"} and an empty signature.
        let token = "eyJhbGciOiJub25lIn0.eyJpc3MiOiJjZGktYXBpc2VydmVyIn0.";
        let err = signer().verifier().verify(token).unwrap_err();
        assert!(!matches!(err, TokenError::Expired));
    }

    #[test]
    fn garbage_is_malformed() {
        let err = signer().verifier().verify("not-a-token").unwrap_err();
        assert!(matches!(err, TokenError::Malformed(_)));
        assert!(!err.is_unauthorized());
    }

    #[test]
    fn clone_token_fails_upload_policy() {
        let token = signer()
            .issue(Operation::Clone, "ns", "p", UPLOAD_TOKEN_TTL)
            .unwrap();
        let claims = signer().verifier().verify(&token).unwrap();
        assert!(matches!(
            claims.check_upload(),
            Err(TokenError::WrongOperation(Operation::Clone))
        ));
    }

    #[test]
    fn snapshot_resource_fails_upload_policy() {
        let mut c = claims(now_secs());
        c.resource = GroupVersionResource::volume_snapshots();
        assert!(matches!(
            c.check_upload(),
            Err(TokenError::WrongResource(_))
        ));
    }

    #[test]
    fn empty_name_fails_upload_policy() {
        let mut c = claims(now_secs());
        c.name.clear();
        assert!(matches!(c.check_upload(), Err(TokenError::MissingTarget)));
    }

    #[test]
    fn params_are_serialized_when_present() {
        let mut c = claims(now_secs());
        c.operation = Operation::Clone;
        c.params.insert("targetName".into(), "t".into());
        let token = signer().sign(&c).unwrap();
        let got = signer().verifier().verify(&token).unwrap();
        assert_eq!(got.params.get("targetName").map(String::as_str), Some("t"));
    }

    #[test]
    fn key_is_generated_persisted_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/token.key");
        let first = TokenSigner::load_or_generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let second = TokenSigner::load_or_generate(&path).unwrap();
        let token = first
            .issue(Operation::Upload, "ns", "p", UPLOAD_TOKEN_TTL)
            .unwrap();
        assert!(second.verifier().verify(&token).is_ok());
        let from_pub = TokenVerifier::from_key_file(&public_key_path(&path)).unwrap();
        assert!(from_pub.verify(&token).is_ok());
        let from_priv = TokenVerifier::from_key_file(&path).unwrap();
        assert!(from_priv.verify(&token).is_ok());
    }
}
