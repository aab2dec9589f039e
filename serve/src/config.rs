//! Cluster-level configuration objects: CDIConfig, StorageClasses and StorageProfiles.
//!
//! The effective values (what `status` reports and what the DataVolume controller uses) are
//! computed here from the stored specs, as upstream's config and storage-profile controllers do.

use std::collections::BTreeMap;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::storage::{
    ANN_CLASS_UNAVAILABLE, LOCAL_BLOCK_CLASS, LOCAL_BLOCK_PROVISIONER, LOCAL_CLASS,
    LOCAL_PROVISIONER,
};
use crate::store::{Kind, Store, StoreError};

/// Name of the CDIConfig singleton.
pub const CONFIG_NAME: &str = "config";

/// Effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    /// Global filesystem overhead.
    pub global_overhead: f64,
    /// Per-class overrides.
    pub class_overhead: BTreeMap<String, f64>,
    /// `spec.scratchSpaceStorageClass`.
    pub scratch_class: Option<String>,
    /// `spec.preallocation` (default for DVs that do not say).
    pub preallocation: bool,
    /// `spec.importProxy`.
    pub import_proxy: Value,
    /// `spec.insecureRegistries`.
    pub insecure_registries: Vec<String>,
}

impl Effective {
    /// Overhead applying to `class`.
    pub fn overhead(&self, class: &str) -> f64 {
        self.class_overhead
            .get(class)
            .copied()
            .unwrap_or(self.global_overhead)
    }
}

fn default_overhead() -> f64 {
    cdi_api::overhead::parse_overhead(cdi_api::overhead::DEFAULT_OVERHEAD).unwrap_or(0.055)
}

/// Effective configuration from a CDIConfig object (or defaults when absent). Invalid overhead
/// strings fall back to the default, as upstream's config controller does.
pub fn effective(cfg: Option<&Value>) -> Effective {
    let spec = cfg.map(|c| &c["spec"]).cloned().unwrap_or(Value::Null);
    let parse = |v: &Value| v.as_str().and_then(cdi_api::overhead::parse_overhead);
    let global_overhead =
        parse(&spec["filesystemOverhead"]["global"]).unwrap_or_else(default_overhead);
    let mut class_overhead = BTreeMap::new();
    if let Some(m) = spec["filesystemOverhead"]["storageClass"].as_object() {
        for (k, v) in m {
            if let Some(o) = parse(v) {
                class_overhead.insert(k.clone(), o);
            }
        }
    }
    Effective {
        global_overhead,
        class_overhead,
        scratch_class: spec["scratchSpaceStorageClass"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        preallocation: spec["preallocation"].as_bool().unwrap_or(false),
        import_proxy: spec["importProxy"].clone(),
        insecure_registries: spec["insecureRegistries"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Render an overhead fraction the way CDIConfig status shows it.
pub fn overhead_text(o: f64) -> String {
    let s = format!("{o:.4}");
    let s = s.trim_end_matches('0');
    if s.ends_with('.') {
        format!("{s}0")
    } else {
        s.to_string()
    }
}

/// CDIConfig `status` for the effective config and the existing classes.
pub fn config_status(eff: &Effective, classes: &[ClassInfo]) -> Value {
    let per_class: serde_json::Map<String, Value> = classes
        .iter()
        .map(|c| (c.name.clone(), json!(overhead_text(eff.overhead(&c.name)))))
        .collect();
    let scratch = scratch_class(eff.scratch_class.as_deref(), classes, "");
    let mut st = json!({
        "filesystemOverhead": {"global": overhead_text(eff.global_overhead), "storageClass": per_class},
        "preallocation": eff.preallocation,
    });
    if !scratch.is_empty() {
        st["scratchSpaceStorageClass"] = json!(scratch);
    }
    if !eff.import_proxy.is_null() {
        st["importProxy"] = eff.import_proxy.clone();
    }
    if !eff.insecure_registries.is_empty() {
        st["insecureRegistries"] = json!(eff.insecure_registries);
    }
    st
}

/// StorageProfile `status` for a class.
pub fn profile_status(class: &Value, profile_spec: &Value) -> Value {
    let name = class["metadata"]["name"].as_str().unwrap_or_default();
    let provisioner = class["provisioner"].as_str().unwrap_or_default();
    let known = provisioner == LOCAL_PROVISIONER || provisioner == LOCAL_BLOCK_PROVISIONER;
    let unavailable = class["metadata"]["annotations"]
        .get(ANN_CLASS_UNAVAILABLE)
        .is_some();
    let mode = if provisioner == LOCAL_BLOCK_PROVISIONER {
        "Block"
    } else {
        "Filesystem"
    };
    let mut st = json!({"storageClass": name, "provisioner": provisioner});
    let sets = match profile_spec["claimPropertySets"].as_array() {
        Some(s) if !s.is_empty() => Some(Value::Array(s.clone())),
        // We only recognise our own provisioners; for others the status stays empty until an
        // admin sets claimPropertySets, as upstream does for unknown provisioners. An
        // unavailable class offers nothing.
        _ if known && !unavailable => {
            Some(json!([{"accessModes": ["ReadWriteOnce"], "volumeMode": mode}]))
        }
        _ => None,
    };
    if let Some(s) = sets {
        st["claimPropertySets"] = s;
    }
    let strategy =
        profile_spec["cloneStrategy"]
            .as_str()
            .unwrap_or(if known { "copy" } else { "" });
    if !strategy.is_empty() {
        st["cloneStrategy"] = json!(strategy);
    }
    st["dataImportCronSourceFormat"] = json!(
        profile_spec["dataImportCronSourceFormat"]
            .as_str()
            .unwrap_or("pvc")
    );
    st
}

/// A storage class as the class-selection rule sees it.
#[derive(Debug, Clone)]
pub struct ClassInfo {
    /// Class name.
    pub name: String,
    /// Carries the Kubernetes default annotation.
    pub is_default: bool,
    /// Carries the virtualization default annotation.
    pub is_virt_default: bool,
    /// Creation time (seconds), newest default wins.
    pub created: u64,
}

/// Pick the storage class: the requested one, else the virt default (kubevirt content only),
/// else the Kubernetes default; among several defaults the newest, then by name.
pub fn choose_class(
    requested: Option<&str>,
    classes: &[ClassInfo],
    kubevirt_content: bool,
) -> Option<String> {
    if let Some(r) = requested.filter(|r| !r.is_empty()) {
        return Some(r.to_string());
    }
    let newest = |f: &dyn Fn(&ClassInfo) -> bool| {
        classes
            .iter()
            .filter(|c| f(c))
            .max_by(|a, b| a.created.cmp(&b.created).then_with(|| b.name.cmp(&a.name)))
            .map(|c| c.name.clone())
    };
    if kubevirt_content && let Some(c) = newest(&|c| c.is_virt_default) {
        return Some(c);
    }
    newest(&|c| c.is_default)
}

/// Scratch class: CDIConfig's if it exists, else the default class, else the target's class.
pub fn scratch_class(configured: Option<&str>, classes: &[ClassInfo], target: &str) -> String {
    if let Some(c) = configured.filter(|c| classes.iter().any(|k| k.name == *c)) {
        return c.to_string();
    }
    choose_class(None, classes, false).unwrap_or_else(|| target.to_string())
}

/// Class facts for the selection rules.
pub fn class_infos(classes: &[Value]) -> Vec<ClassInfo> {
    classes
        .iter()
        .map(|c| {
            let ann = &c["metadata"]["annotations"];
            ClassInfo {
                name: c["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                is_default: ann[cdi_api::resources::ANN_DEFAULT_CLASS] == "true",
                is_virt_default: ann[cdi_api::resources::ANN_DEFAULT_VIRT_CLASS] == "true",
                created: c["metadata"]["creationTimestamp"]
                    .as_str()
                    .and_then(crate::util::parse_rfc3339)
                    .unwrap_or(0),
            }
        })
        .collect()
}

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

/// Bring CDIConfig status and one StorageProfile per class up to date; drop profiles of
/// deleted classes.
pub fn refresh(store: &dyn Store) -> Result<(), StoreError> {
    let classes = store.list(Kind::StorageClass, None)?;
    let infos = class_infos(&classes);
    if let Some(mut cfg) = store.get(Kind::CdiConfig, "", CONFIG_NAME)? {
        let st = config_status(&effective(Some(&cfg)), &infos);
        if cfg["status"] != st {
            cfg["status"] = st;
            match store.update(Kind::CdiConfig, cfg) {
                Ok(_) | Err(StoreError::Conflict) => {}
                Err(e) => return Err(e),
            }
        }
    }
    for class in &classes {
        let name = class["metadata"]["name"].as_str().unwrap_or_default();
        match store.get(Kind::StorageProfile, "", name)? {
            None => {
                let st = profile_status(class, &Value::Null);
                match store.create(
                    Kind::StorageProfile,
                    json!({"metadata": {"name": name}, "spec": {}, "status": st}),
                ) {
                    Ok(_) | Err(StoreError::AlreadyExists) => {}
                    Err(e) => return Err(e),
                }
            }
            Some(mut p) => {
                let st = profile_status(class, &p["spec"]);
                if p["status"] != st {
                    p["status"] = st;
                    match store.update(Kind::StorageProfile, p) {
                        Ok(_) | Err(StoreError::Conflict) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
    for p in store.list(Kind::StorageProfile, None)? {
        let name = p["metadata"]["name"].as_str().unwrap_or_default();
        if !infos.iter().any(|c| c.name == name) {
            store.delete(Kind::StorageProfile, "", name)?;
        }
    }
    Ok(())
}

/// A change burst is folded into one status pass after this pause.
const REFRESH_SETTLE: Duration = Duration::from_millis(50);
/// Statuses are recomputed at least this often even without changes (a failed pass retries).
const REFRESH_RESYNC: Duration = Duration::from_secs(30);

fn touches_config(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::StorageClass | Kind::StorageProfile | Kind::CdiConfig
    )
}

/// Keep CDIConfig and StorageProfile status current: one [`refresh`] per burst of changes to
/// classes, profiles or the config, off the async threads.
pub async fn run(store: Arc<dyn Store>) {
    use tokio::sync::broadcast::error::RecvError;
    let mut rx = store.watch();
    loop {
        let s = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || refresh(s.as_ref())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "refreshing CDIConfig and StorageProfile status")
            }
            Err(e) => tracing::warn!(error = %e, "status refresh task failed"),
        }
        let deadline = tokio::time::Instant::now() + REFRESH_RESYNC;
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => Some(ev),
                _ = tokio::time::sleep_until(deadline) => None,
            };
            match ev {
                Some(Ok(ev)) if !touches_config(ev.kind) => continue,
                Some(Ok(_)) | Some(Err(RecvError::Lagged(_))) | None => break,
                Some(Err(RecvError::Closed)) => return,
            }
        }
        tokio::time::sleep(REFRESH_SETTLE).await;
        while rx.try_recv().is_ok() {}
    }
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
    let client = ca.issue_client(cdi_controller::names::UPLOAD_CLIENT_NAME)?;
    let mut stored = Vec::new();
    for (name, pair) in [
        (pki::SERVER_SIGNER_SECRET, &ca_pair),
        (pki::CLIENT_SIGNER_SECRET, &ca_pair),
        (pki::CLIENT_CERT_SECRET, &client),
    ] {
        let existing = match store.get(Kind::Secret, ns, name)? {
            Some(s) => s,
            None => {
                let secret = serde_json::to_value(pki::tls_secret(ns, name, pair))
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

    #[test]
    fn class_choice_prefers_request_then_virt_then_newest_default() {
        let classes = vec![
            ClassInfo {
                name: "local".into(),
                is_default: true,
                is_virt_default: false,
                created: 1,
            },
            ClassInfo {
                name: "fast".into(),
                is_default: true,
                is_virt_default: false,
                created: 5,
            },
            ClassInfo {
                name: "virt".into(),
                is_default: false,
                is_virt_default: true,
                created: 0,
            },
        ];
        assert_eq!(
            choose_class(Some("x"), &classes, true).as_deref(),
            Some("x")
        );
        assert_eq!(choose_class(None, &classes, true).as_deref(), Some("virt"));
        assert_eq!(choose_class(None, &classes, false).as_deref(), Some("fast"));
        assert_eq!(choose_class(None, &[], false), None);
        assert_eq!(scratch_class(Some("nope"), &classes, "t"), "fast");
        assert_eq!(scratch_class(Some("local"), &classes, "t"), "local");
        assert_eq!(scratch_class(None, &[], "t"), "t");
    }

    use crate::store::SqliteStore;

    #[test]
    fn defaults_and_overrides() {
        let e = effective(None);
        assert_eq!(e.global_overhead, 0.055);
        let cfg = json!({"spec": {"filesystemOverhead": {"global": "0.07", "storageClass": {"fast": "0.04", "bad": "2"}},
            "scratchSpaceStorageClass": "fast", "preallocation": true}});
        let e = effective(Some(&cfg));
        assert_eq!(e.overhead("fast"), 0.04);
        assert_eq!(e.overhead("bad"), 0.07);
        assert_eq!(e.overhead("local"), 0.07);
        assert!(e.preallocation);
        assert_eq!(overhead_text(0.055), "0.055");
        assert_eq!(overhead_text(0.07), "0.07");
        assert_eq!(overhead_text(0.0), "0.0");
    }

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
        assert_eq!(names, ["default", "team"]);
        assert!(crate::gc::garbage(&s.list_all().unwrap().0).is_empty());
    }

    #[test]
    fn bootstrap_then_refresh_creates_profile_and_status() {
        let s = SqliteStore::in_memory().unwrap();
        bootstrap(&s, Some("losetup: permission denied")).unwrap();
        refresh(&s).unwrap();
        let b = s
            .get(Kind::StorageProfile, "", "local-block")
            .unwrap()
            .unwrap();
        assert!(
            b["status"]["claimPropertySets"].is_null(),
            "unavailable class offers nothing"
        );
        bootstrap(&s, None).unwrap();
        refresh(&s).unwrap();
        let b = s
            .get(Kind::StorageProfile, "", "local-block")
            .unwrap()
            .unwrap();
        assert_eq!(b["status"]["claimPropertySets"][0]["volumeMode"], "Block");
        let p = s.get(Kind::StorageProfile, "", "local").unwrap().unwrap();
        assert_eq!(
            p["status"]["claimPropertySets"][0]["volumeMode"],
            "Filesystem"
        );
        assert_eq!(p["status"]["cloneStrategy"], "copy");
        let c = s.get(Kind::CdiConfig, "", "config").unwrap().unwrap();
        assert_eq!(c["status"]["filesystemOverhead"]["global"], "0.055");
        assert_eq!(
            c["status"]["filesystemOverhead"]["storageClass"]["local"],
            "0.055"
        );
        assert_eq!(c["status"]["scratchSpaceStorageClass"], "local");
    }
}
