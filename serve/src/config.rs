//! What `cdi serve` lays out on first start, as a cluster's installer would: the built-in
//! StorageClasses (`local`, `local-block`), the CDIConfig singleton, the `default` and `cdi`
//! Namespaces, and the upload PKI Secrets. Their statuses (StorageProfiles, CDIConfig) are
//! the controller's ([`cdi_controller::reconcile::storage`]).

use serde_json::json;

use crate::storage::{
    ANN_CLASS_UNAVAILABLE, LOCAL_BLOCK_CLASS, LOCAL_BLOCK_PROVISIONER, LOCAL_CLASS,
    LOCAL_PROVISIONER,
};
use crate::store::{Kind, Store, StoreError};

/// Name of the CDIConfig singleton.
pub const CONFIG_NAME: &str = "config";

/// Create the built-in objects on first start (never overwrites an admin's edits). The Block
/// class is marked unavailable (annotation with the reason) when `block_unavailable` says so.
pub fn bootstrap(store: &dyn Store, block_unavailable: Option<&str>) -> Result<(), StoreError> {
    ensure_namespaces(store)?;
    let mut block = match store.get(Kind::StorageClass, "", LOCAL_BLOCK_CLASS)? {
        Some(c) => c,
        None => store.create(
            Kind::StorageClass,
            json!({
                "metadata": {"name": LOCAL_BLOCK_CLASS},
                "provisioner": LOCAL_BLOCK_PROVISIONER,
                "reclaimPolicy": "Delete",
                "volumeBindingMode": "Immediate",
                "allowVolumeExpansion": false,
            }),
        )?,
    };
    let want = block_unavailable.map(|r| json!(r));
    if block["metadata"]["annotations"].get(ANN_CLASS_UNAVAILABLE) != want.as_ref() {
        if !block["metadata"]["annotations"].is_object() {
            block["metadata"]["annotations"] = json!({});
        }
        match want {
            Some(r) => block["metadata"]["annotations"][ANN_CLASS_UNAVAILABLE] = r,
            None => {
                if let Some(m) = block["metadata"]["annotations"].as_object_mut() {
                    m.remove(ANN_CLASS_UNAVAILABLE);
                }
            }
        }
        store.update(Kind::StorageClass, block)?;
    }
    if store.get(Kind::StorageClass, "", LOCAL_CLASS)?.is_none() {
        store.create(
            Kind::StorageClass,
            json!({
                "metadata": {"name": LOCAL_CLASS, "annotations": {cdi_api::resources::ANN_DEFAULT_CLASS: "true"}},
                "provisioner": LOCAL_PROVISIONER,
                "reclaimPolicy": "Delete",
                "volumeBindingMode": "Immediate",
                "allowVolumeExpansion": false,
            }),
        )?;
    }
    if store.get(Kind::CdiConfig, "", CONFIG_NAME)?.is_none() {
        store.create(
            Kind::CdiConfig,
            json!({"metadata": {"name": CONFIG_NAME}, "spec": {}}),
        )?;
    }
    Ok(())
}

/// The namespace every client defaults to.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Create Namespace `default` and a Namespace for every namespace that holds objects but has
/// none (databases from before Namespaces were objects): the garbage collector deletes the
/// objects of namespaces that do not exist.
pub fn ensure_namespaces(store: &dyn Store) -> Result<(), StoreError> {
    let (objects, _) = store.list_all()?;
    let mut wanted: std::collections::BTreeSet<String> = objects
        .iter()
        .filter(|(k, _)| k.namespaced())
        .filter_map(|(_, o)| o["metadata"]["namespace"].as_str().map(str::to_string))
        .collect();
    wanted.insert(DEFAULT_NAMESPACE.to_string());
    wanted.insert(cdi_controller::DEFAULT_NAMESPACE.to_string());
    for ns in wanted {
        if store.get(Kind::Namespace, "", &ns)?.is_none() {
            match store.create(
                Kind::Namespace,
                json!({"metadata": {"name": ns}, "spec": {}, "status": {"phase": "Active"}}),
            ) {
                Ok(_) | Err(StoreError::AlreadyExists) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Why the upload PKI could not be laid out.
#[derive(Debug, thiserror::Error)]
pub enum PkiBootstrapError {
    /// Reading or writing the Secrets failed.
    #[error("upload PKI Secrets: {0}")]
    Store(#[from] StoreError),
    /// Issuing the proxy's client certificate failed.
    #[error("upload PKI: {0}")]
    Pki(#[from] cdi_pki::PkiError),
    /// A Secret exists without a usable key pair.
    #[error("Secret {0} has no tls.crt/tls.key")]
    Unusable(String),
}

/// What the embedded upload proxy needs: the CA upload servers' certificates chain to, and
/// its own client key pair.
#[derive(Debug, Clone)]
pub struct ProxyCredentials {
    /// PEM of the server signer CA.
    pub server_ca_pem: String,
    /// The proxy's client certificate and key.
    pub client: cdi_pki::CertPair,
}

/// Lay out the upload PKI the controller reads (see [`cdi_controller::pki`]) in the CDI
/// namespace, signed by `ca`, unless Secrets of those names are already there (an earlier
/// start, or an admin's); return what the proxy needs from whatever is stored.
pub fn bootstrap_upload_pki(
    store: &dyn Store,
    ca: &cdi_pki::Ca,
) -> Result<ProxyCredentials, PkiBootstrapError> {
    use cdi_controller::pki;
    let ns = cdi_controller::DEFAULT_NAMESPACE;
    let ca_pair = cdi_pki::CertPair {
        cert_pem: ca.cert_pem().to_string(),
        key_pem: ca.key_pem(),
    };
    let mut stored = Vec::new();
    for name in [
        pki::SERVER_SIGNER_SECRET,
        pki::CLIENT_SIGNER_SECRET,
        pki::CLIENT_CERT_SECRET,
    ] {
        let existing = match store.get(Kind::Secret, ns, name)? {
            Some(s) => s,
            None => {
                // Only a missing Secret costs a key pair: later starts reuse what is stored.
                let pair = if name == pki::CLIENT_CERT_SECRET {
                    ca.issue_client(cdi_controller::names::UPLOAD_CLIENT_NAME)?
                } else {
                    ca_pair.clone()
                };
                let secret = serde_json::to_value(pki::tls_secret(ns, name, &pair))
                    .map_err(StoreError::from)?;
                match store.create(Kind::Secret, secret) {
                    Ok(s) => s,
                    Err(StoreError::AlreadyExists) => store
                        .get(Kind::Secret, ns, name)?
                        .ok_or(StoreError::NotFound)?,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let unusable = || PkiBootstrapError::Unusable(format!("{ns}/{name}"));
        let secret: k8s_openapi::api::core::v1::Secret =
            serde_json::from_value(existing).map_err(|_| unusable())?;
        stored.push(pki::pair_of(&secret).ok_or_else(unusable)?);
    }
    let client = stored.pop().ok_or(StoreError::NotFound)?;
    let server_ca_pem = stored.swap_remove(0).cert_pem;
    Ok(ProxyCredentials {
        server_ca_pem,
        client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    #[test]
    fn bootstrap_creates_default_and_missing_namespaces() {
        let s = SqliteStore::in_memory().unwrap();
        s.create(
            Kind::ConfigMap,
            json!({"metadata": {"name": "c", "namespace": "team"}}),
        )
        .unwrap();
        // As a database from before Namespaces were objects: objects, no Namespace.
        s.delete(Kind::Namespace, "", "team").unwrap();
        bootstrap(&s, None).unwrap();
        let names: Vec<String> = s
            .list(Kind::Namespace, None)
            .unwrap()
            .iter()
            .map(|n| n["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["cdi", "default", "team"]);
        assert!(crate::gc::garbage(&s.list_all().unwrap().0).is_empty());
    }

    #[test]
    fn bootstrap_marks_the_block_class_unavailable_and_back() {
        let s = SqliteStore::in_memory().unwrap();
        bootstrap(&s, Some("losetup: permission denied")).unwrap();
        let unavailable = |s: &SqliteStore| {
            s.get(Kind::StorageClass, "", LOCAL_BLOCK_CLASS)
                .unwrap()
                .unwrap()["metadata"]["annotations"][ANN_CLASS_UNAVAILABLE]
                .clone()
        };
        assert_eq!(unavailable(&s), "losetup: permission denied");
        bootstrap(&s, None).unwrap();
        assert!(unavailable(&s).is_null());
        let local = s.get(Kind::StorageClass, "", LOCAL_CLASS).unwrap().unwrap();
        assert_eq!(local["provisioner"], LOCAL_PROVISIONER);
        assert!(s.get(Kind::CdiConfig, "", CONFIG_NAME).unwrap().is_some());
    }
}
