//! CDIConfig and StorageProfile status, as upstream's config and storage-profile controllers
//! publish them: the effective configuration (defaults filled in, per-class filesystem
//! overhead, scratch class) and, per StorageClass, a StorageProfile with the access and volume
//! modes the class offers. The DataVolume reconciler reads both.
//!
//! The computations are pure functions over the objects' JSON; [`reconcile_class`] and
//! [`reconcile_config`] write their results through `/status`. A StorageProfile is owned by
//! its StorageClass, so the garbage collector removes it with the class.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cdi_resources::{CDIConfig, StorageProfile};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::ObjectMeta;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::context::{CONFIG_NAME, Context, create_or_get};
use crate::error::Error;
use crate::names::ann;

/// Provisioners whose capabilities CDI knows, with the access and volume modes they offer,
/// best first (upstream keeps a larger table in `pkg/storagecapabilities`; other provisioners
/// get an empty status until an admin sets `claimPropertySets`, as upstream does for unknown
/// ones). These are the local provisioners of `cdi serve`.
const KNOWN_PROVISIONERS: [(&str, &str); 2] = [
    ("cdi.kubevirt.io/local", "Filesystem"),
    ("cdi.kubevirt.io/local-block", "Block"),
];

/// Statuses are recomputed this often even without changes (a missed event heals).
const RESYNC: Duration = Duration::from_secs(300);

fn known_mode(provisioner: &str) -> Option<&'static str> {
    KNOWN_PROVISIONERS
        .iter()
        .find(|(p, _)| *p == provisioner)
        .map(|(_, m)| *m)
}

fn parse_time(s: &str) -> Option<u64> {
    s.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .and_then(|t| u64::try_from(t.as_second()).ok())
}

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
    st
}

/// StorageProfile `status` for a class.
pub fn profile_status(class: &Value, profile_spec: &Value) -> Value {
    let name = class["metadata"]["name"].as_str().unwrap_or_default();
    let provisioner = class["provisioner"].as_str().unwrap_or_default();
    let mode = known_mode(provisioner);
    let unavailable = class["metadata"]["annotations"]
        .get(ann::CLASS_UNAVAILABLE)
        .is_some();
    let mut st = json!({"storageClass": name, "provisioner": provisioner});
    let sets = match profile_spec["claimPropertySets"].as_array() {
        Some(s) if !s.is_empty() => Some(Value::Array(s.clone())),
        // Known provisioners offer their modes; for others the status stays empty until an
        // admin sets claimPropertySets. A class marked unavailable offers nothing.
        _ => match mode {
            Some(m) if !unavailable => {
                Some(json!([{"accessModes": ["ReadWriteOnce"], "volumeMode": m}]))
            }
            _ => None,
        },
    };
    if let Some(s) = sets {
        st["claimPropertySets"] = s;
    }
    let strategy = profile_spec["cloneStrategy"]
        .as_str()
        .unwrap_or(if mode.is_some() { "copy" } else { "" });
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
                is_default: ann[ann::DEFAULT_STORAGE_CLASS] == "true",
                is_virt_default: ann[ann::DEFAULT_VIRT_STORAGE_CLASS] == "true",
                created: c["metadata"]["creationTimestamp"]
                    .as_str()
                    .and_then(parse_time)
                    .unwrap_or(0),
            }
        })
        .collect()
}

/// A JSON merge patch turning `current` into `want` (RFC 7386: absent members become `null`,
/// objects recurse, anything else is replaced).
pub fn merge_diff(current: &Value, want: &Value) -> Value {
    match (current.as_object(), want.as_object()) {
        (Some(cur), Some(new)) => {
            let mut patch = serde_json::Map::new();
            for k in cur.keys().filter(|k| !new.contains_key(*k)) {
                patch.insert(k.clone(), Value::Null);
            }
            for (k, v) in new {
                match cur.get(k) {
                    Some(old) if old == v => {}
                    Some(old) => {
                        patch.insert(k.clone(), merge_diff(old, v));
                    }
                    None => {
                        patch.insert(k.clone(), v.clone());
                    }
                }
            }
            Value::Object(patch)
        }
        _ => want.clone(),
    }
}

fn to_json<T: serde::Serialize>(kind: &'static str, v: &T) -> Result<Value, Error> {
    serde_json::to_value(v).map_err(|source| Error::Decode { kind, source })
}

/// Bring `status` of `name` (through `api`) to `want`, when it differs.
async fn write_status<K>(
    api: &Api<K>,
    name: &str,
    current: &Value,
    want: &Value,
) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if current == want {
        return Ok(());
    }
    let patch = json!({"status": merge_diff(current, want)});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// The StorageProfile a class gets: same name, owned by the class, empty spec.
fn new_profile(class: &StorageClass) -> StorageProfile {
    let mut p = StorageProfile::new(&class.name_any(), Default::default());
    p.metadata = ObjectMeta {
        name: Some(class.name_any()),
        owner_references: class.controller_owner_ref(&()).map(|mut r| {
            // The class does not control the profile's content; it only carries it away.
            r.controller = None;
            r.block_owner_deletion = None;
            vec![r]
        }),
        ..Default::default()
    };
    p
}

/// One StorageClass: its StorageProfile exists and its status is current.
pub async fn reconcile_class(class: Arc<StorageClass>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = class.name_any();
    let profiles: Api<StorageProfile> = Api::all(ctx.client.clone());
    let fresh = new_profile(&class);
    let profile = match profiles.get_opt(&name).await? {
        // Profiles written before they were owned by their class (older `cdi serve` data
        // directories) are adopted, so they go with the class.
        Some(p) if p.owner_references().is_empty() && fresh.metadata.owner_references.is_some() => {
            let patch = json!({"metadata": {"ownerReferences": fresh.metadata.owner_references}});
            profiles
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?
        }
        Some(p) => p,
        None => create_or_get(&profiles, &fresh).await?,
    };
    let want = profile_status(
        &to_json("StorageClass", class.as_ref())?,
        &to_json("StorageProfile", &profile.spec)?,
    );
    let current = to_json("StorageProfile", &profile.status)?;
    write_status(&profiles, &name, &current, &want).await?;
    Ok(Action::requeue(RESYNC))
}

/// The CDIConfig singleton: status from its spec and the existing classes.
pub async fn reconcile_config(cfg: Arc<CDIConfig>, ctx: Arc<Context>) -> Result<Action, Error> {
    if cfg.name_any() != CONFIG_NAME {
        return Ok(Action::await_change());
    }
    let classes: Api<StorageClass> = Api::all(ctx.client.clone());
    let list = classes.list(&ListParams::default()).await?;
    let classes: Vec<Value> = list
        .items
        .iter()
        .map(|c| to_json("StorageClass", c))
        .collect::<Result<_, _>>()?;
    let cfg_json = to_json("CDIConfig", cfg.as_ref())?;
    let want = config_status(&effective(Some(&cfg_json)), &class_infos(&classes));
    let current = to_json("CDIConfig", &cfg.status)?;
    let api: Api<CDIConfig> = Api::all(ctx.client.clone());
    write_status(&api, CONFIG_NAME, &current, &want).await?;
    Ok(Action::requeue(RESYNC))
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
    fn profiles_offer_known_modes_unless_unavailable_or_overridden() {
        let class = |prov: &str, anns: Value| json!({"metadata": {"name": "c", "annotations": anns}, "provisioner": prov});
        let st = profile_status(&class("cdi.kubevirt.io/local", json!({})), &Value::Null);
        assert_eq!(st["claimPropertySets"][0]["volumeMode"], "Filesystem");
        assert_eq!(st["cloneStrategy"], "copy");
        assert_eq!(st["dataImportCronSourceFormat"], "pvc");
        let block = class("cdi.kubevirt.io/local-block", json!({}));
        assert_eq!(
            profile_status(&block, &Value::Null)["claimPropertySets"][0]["volumeMode"],
            "Block"
        );
        let gone = class(
            "cdi.kubevirt.io/local-block",
            json!({ann::CLASS_UNAVAILABLE: "losetup: permission denied"}),
        );
        assert!(profile_status(&gone, &Value::Null)["claimPropertySets"].is_null());
        // Unknown provisioners: nothing until the admin says (mission Y18).
        let unknown = profile_status(&class("example.com/x", json!({})), &Value::Null);
        assert!(unknown["claimPropertySets"].is_null() && unknown["cloneStrategy"].is_null());
        let set = json!({"claimPropertySets": [{"accessModes": ["ReadWriteMany"], "volumeMode": "Block"}],
            "cloneStrategy": "snapshot"});
        let admin = profile_status(&class("example.com/x", json!({})), &set);
        assert_eq!(admin["claimPropertySets"], set["claimPropertySets"]);
        assert_eq!(admin["cloneStrategy"], "snapshot");
    }

    #[test]
    fn config_status_covers_every_class() {
        let classes = vec![
            json!({"metadata": {"name": "local", "creationTimestamp": "2026-01-01T00:00:00Z",
                "annotations": {ann::DEFAULT_STORAGE_CLASS: "true"}}}),
            json!({"metadata": {"name": "fast", "creationTimestamp": "2026-01-02T00:00:00Z"}}),
        ];
        let cfg = json!({"spec": {"filesystemOverhead": {"storageClass": {"fast": "0.1"}}}});
        let st = config_status(&effective(Some(&cfg)), &class_infos(&classes));
        assert_eq!(st["filesystemOverhead"]["global"], "0.055");
        assert_eq!(st["filesystemOverhead"]["storageClass"]["local"], "0.055");
        assert_eq!(st["filesystemOverhead"]["storageClass"]["fast"], "0.1");
        assert_eq!(st["scratchSpaceStorageClass"], "local");
        assert_eq!(st["preallocation"], false);
    }

    #[test]
    fn merge_diff_removes_what_is_gone() {
        let cur = json!({"a": 1, "b": {"x": 1, "y": 2}, "c": [1]});
        let want = json!({"b": {"x": 1}, "c": [2], "d": "new"});
        let patch = merge_diff(&cur, &want);
        assert_eq!(
            patch,
            json!({"a": null, "b": {"y": null}, "c": [2], "d": "new"})
        );
        let mut applied = cur.clone();
        json_patch::merge(&mut applied, &patch);
        assert_eq!(applied, want);
    }
}
