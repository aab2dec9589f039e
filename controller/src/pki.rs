//! The upload path's certificate authorities, kept in Secrets of the CDI namespace.
//!
//! ```text
//!   Secret cdi-uploadserver-signer          (tls.crt, tls.key)  signs each upload pod's server cert
//!   Secret cdi-uploadserver-client-signer   (tls.crt, tls.key)  signs the proxy's client cert
//!   Secret cdi-uploadserver-client-cert     (tls.crt, tls.key)  CN client.upload-server.cdi.kubevirt.io
//!   ConfigMap cdi-uploadserver-signer-bundle         (ca-bundle.crt)  what the proxy trusts
//!   ConfigMap cdi-uploadserver-client-signer-bundle  (ca-bundle.crt)  what upload servers trust
//! ```
//!
//! Names and keys are upstream's (`pkg/operator/resources/cert`), so the cluster's upload
//! proxy and `cdi serve`'s embedded one read the same objects. Each object is loaded, or created
//! when absent; a concurrent creator wins and its object is re-read, so two controllers never
//! end up with different CAs.

use std::collections::BTreeMap;

use cdi_pki::{Ca, CertPair};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PostParams};
use kube::core::ObjectMeta;

use crate::error::Error;
use crate::names::{UPLOAD_CLIENT_NAME, label};

/// Secret of the CA that signs upload servers' certificates.
pub const SERVER_SIGNER_SECRET: &str = "cdi-uploadserver-signer";
/// Secret of the CA that signs the upload proxy's client certificate.
pub const CLIENT_SIGNER_SECRET: &str = "cdi-uploadserver-client-signer";
/// Secret of the upload proxy's client certificate.
pub const CLIENT_CERT_SECRET: &str = "cdi-uploadserver-client-cert";
/// ConfigMap of the server signer's certificate (what the proxy trusts).
pub const SERVER_SIGNER_BUNDLE: &str = "cdi-uploadserver-signer-bundle";
/// ConfigMap of the client signer's certificate (what upload servers trust).
pub const CLIENT_SIGNER_BUNDLE: &str = "cdi-uploadserver-client-signer-bundle";
/// Key of the bundle in those ConfigMaps.
pub const BUNDLE_KEY: &str = "ca-bundle.crt";
/// Common name of the server signer CA.
const SERVER_SIGNER_CN: &str = "cdi-uploadserver-signer";
/// Common name of the client signer CA.
const CLIENT_SIGNER_CN: &str = "cdi-uploadserver-client-signer";

/// The loaded upload PKI.
pub struct UploadPki {
    /// Signs upload servers' certificates.
    pub server_ca: Ca,
    /// PEM of the CA client certificates must chain to (goes into each pod's `ca.crt`).
    pub client_ca_pem: String,
}

impl std::fmt::Debug for UploadPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadPki").finish_non_exhaustive()
    }
}

impl UploadPki {
    /// A server certificate for an upload Service.
    pub fn issue_server(&self, dns: &[String]) -> Result<CertPair, Error> {
        let names: Vec<&str> = dns.iter().map(String::as_str).collect();
        Ok(self.server_ca.issue_server(&names, &[])?)
    }
}

/// A `kubernetes.io/tls` Secret holding `pair`, labelled as CDI's.
pub fn tls_secret(ns: &str, name: &str, pair: &CertPair) -> Secret {
    let b = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            labels: Some(BTreeMap::from([(
                label::APP.to_string(),
                label::APP_VALUE.to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            ("tls.crt".to_string(), b(&pair.cert_pem)),
            ("tls.key".to_string(), b(&pair.key_pem)),
        ])),
        type_: Some("kubernetes.io/tls".into()),
        ..Default::default()
    }
}

/// The key pair of a `kubernetes.io/tls` Secret, when both halves are present.
pub fn pair_of(secret: &Secret) -> Option<CertPair> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|s| !s.is_empty())
    };
    Some(CertPair {
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
    })
}

/// Load the Secret `name`, or create it from `make()`; on a creation race the winner's is used.
async fn load_or_create_secret(
    api: &Api<Secret>,
    ns: &str,
    name: &str,
    make: impl FnOnce() -> Result<CertPair, Error>,
) -> Result<CertPair, Error> {
    if let Some(s) = api.get_opt(name).await? {
        return pair_of(&s)
            .ok_or_else(|| Error::Pki(format!("Secret {ns}/{name} has no tls.crt/tls.key")));
    }
    let pair = make()?;
    match api
        .create(&PostParams::default(), &tls_secret(ns, name, &pair))
        .await
    {
        Ok(_) => Ok(pair),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = api.get(name).await?;
            pair_of(&s)
                .ok_or_else(|| Error::Pki(format!("Secret {ns}/{name} has no tls.crt/tls.key")))
        }
        Err(e) => Err(e.into()),
    }
}

fn ca_pair(ca: &Ca) -> CertPair {
    CertPair {
        cert_pem: ca.cert_pem().to_string(),
        key_pem: ca.key_pem(),
    }
}

async fn ensure_bundle(api: &Api<ConfigMap>, ns: &str, name: &str, pem: &str) -> Result<(), Error> {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            labels: Some(BTreeMap::from([(
                label::APP.to_string(),
                label::APP_VALUE.to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(BUNDLE_KEY.to_string(), pem.to_string())])),
        ..Default::default()
    };
    match api.get_opt(name).await? {
        Some(existing)
            if existing
                .data
                .as_ref()
                .and_then(|d| d.get(BUNDLE_KEY))
                .is_some_and(|b| b.contains(pem.trim())) =>
        {
            Ok(())
        }
        Some(_) => {
            api.replace(name, &PostParams::default(), &cm).await?;
            Ok(())
        }
        None => match api.create(&PostParams::default(), &cm).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        },
    }
}

/// Load or create the signer CAs, the proxy's client certificate and the bundles in `ns`.
pub async fn load_or_create(client: &kube::Client, ns: &str) -> Result<UploadPki, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let server_pair = load_or_create_secret(&secrets, ns, SERVER_SIGNER_SECRET, || {
        Ok(ca_pair(&Ca::generate(SERVER_SIGNER_CN)?))
    })
    .await?;
    let server_ca = Ca::from_pem(&server_pair.cert_pem, &server_pair.key_pem)?;
    let client_pair = load_or_create_secret(&secrets, ns, CLIENT_SIGNER_SECRET, || {
        Ok(ca_pair(&Ca::generate(CLIENT_SIGNER_CN)?))
    })
    .await?;
    let client_ca = Ca::from_pem(&client_pair.cert_pem, &client_pair.key_pem)?;
    load_or_create_secret(&secrets, ns, CLIENT_CERT_SECRET, || {
        Ok(client_ca.issue_client(UPLOAD_CLIENT_NAME)?)
    })
    .await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    ensure_bundle(&cms, ns, SERVER_SIGNER_BUNDLE, server_ca.cert_pem()).await?;
    ensure_bundle(&cms, ns, CLIENT_SIGNER_BUNDLE, client_ca.cert_pem()).await?;
    Ok(UploadPki {
        server_ca,
        client_ca_pem: client_pair.cert_pem,
    })
}
