//! Resource shapes of the CDI API (DataVolume and the objects around it), Kubernetes-style.
//!
//! Only what the control plane reads is typed; everything else a user sends is kept verbatim in
//! `extra` maps so objects round-trip through the store unchanged. Field names follow upstream's
//! `cdi.kubevirt.io/v1beta1` types (`v1alpha1` documents decode into the same structs).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// API group of CDI resources.
pub const CDI_GROUP: &str = "cdi.kubevirt.io";
/// Storage version of CDI resources.
pub const CDI_V1BETA1: &str = "cdi.kubevirt.io/v1beta1";
/// Older version still accepted for DataVolumes.
pub const CDI_V1ALPHA1: &str = "cdi.kubevirt.io/v1alpha1";
/// Annotation marking the default storage class.
pub const ANN_DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
/// Annotation marking the default virtualization storage class (preferred for VM disks).
pub const ANN_DEFAULT_VIRT_CLASS: &str = "storageclass.kubevirt.io/is-default-virt-class";
/// Event source component of the DataVolume controller.
pub const DV_CONTROLLER: &str = "datavolume-controller";

/// `metadata` of every object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name.
    #[serde(default)]
    pub name: String,
    /// Namespace (namespaced kinds only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Unique id assigned on create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Optimistic-concurrency token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// RFC 3339 creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<Value>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Owners (the DataVolume owns its claim).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
    /// Anything else, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// An owner reference.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    /// Owner API version.
    pub api_version: String,
    /// Owner kind.
    pub kind: String,
    /// Owner name.
    pub name: String,
    /// Owner uid.
    pub uid: String,
    /// Whether the owner is the managing controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<bool>,
}

/// A DataVolume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataVolume {
    /// `cdi.kubevirt.io/v1beta1` (or `v1alpha1`).
    #[serde(default)]
    pub api_version: String,
    /// `DataVolume`.
    #[serde(default)]
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Desired state; immutable after creation.
    #[serde(default)]
    pub spec: DataVolumeSpec,
    /// Observed state, written by the controller only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DataVolumeStatus>,
}

/// `spec` of a DataVolume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSpec {
    /// Where the data comes from (exactly one variant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<DataVolumeSource>,
    /// Reference to a DataSource instead of `source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ref: Option<Value>,
    /// Raw claim spec, used verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<ClaimSpec>,
    /// Claim spec completed from the StorageProfile, size inflated by filesystem overhead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<ClaimSpec>,
    /// `kubevirt` (default) or `archive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Preallocate the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preallocation: Option<bool>,
    /// Anything else (priorityClassName, checkpoints, …), kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// `spec.source`: one of the variants may be set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSource {
    /// HTTP(S) import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// S3 import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<HttpSource>,
    /// GCS import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcs: Option<HttpSource>,
    /// Registry import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistrySource>,
    /// Clone from a PVC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<ObjectRef>,
    /// Clone from a snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<ObjectRef>,
    /// Upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<Value>,
    /// Blank disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<Value>,
    /// oVirt imageio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imageio: Option<Value>,
    /// VMware VDDK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vddk: Option<Value>,
}

impl DataVolumeSource {
    /// Names of the variants that are set, in API order.
    pub fn variants(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let set = [
            ("http", self.http.is_some()),
            ("s3", self.s3.is_some()),
            ("gcs", self.gcs.is_some()),
            ("registry", self.registry.is_some()),
            ("pvc", self.pvc.is_some()),
            ("snapshot", self.snapshot.is_some()),
            ("upload", self.upload.is_some()),
            ("blank", self.blank.is_some()),
            ("imageio", self.imageio.is_some()),
            ("vddk", self.vddk.is_some()),
        ];
        for (name, is_set) in set {
            if is_set {
                v.push(name);
            }
        }
        v
    }
}

/// HTTP, S3 and GCS sources share this shape (S3/GCS use a subset).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// Source URL.
    #[serde(default)]
    pub url: String,
    /// Secret with `accessKeyId` / `secretKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// ConfigMap with CA certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_config_map: Option<String>,
    /// Extra request headers (`Name: value`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_headers: Vec<String>,
    /// Secrets holding extra headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_extra_headers: Vec<String>,
    /// `algo:hex` checksum of the downloaded bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Skip TLS verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
}

/// Registry source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrySource {
    /// `docker://…` or `oci-archive://…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// ImageStream name (node pull only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_stream: Option<String>,
    /// `pod` or `node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_method: Option<String>,
    /// Credentials Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// CA ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_config_map: Option<String>,
    /// Platform selection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Value>,
}

/// A namespaced object reference.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// Namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `spec.pvc` / `spec.storage` and a PVC's `spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimSpec {
    /// Access modes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_modes: Vec<String>,
    /// Requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Storage class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// `Filesystem` or `Block`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,
    /// Anything else (selector, dataSource, volumeName, …), kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl ClaimSpec {
    /// `resources.requests.storage` as the text the user wrote (numbers are rendered).
    pub fn requested_storage(&self) -> Option<String> {
        let v = self.resources.as_ref()?.requests.get("storage")?;
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// `resources` of a claim.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// Requests (`storage`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, Value>,
    /// Limits.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, Value>,
}

/// `status` of a DataVolume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeStatus {
    /// Phase (`Pending`, `ImportInProgress`, `Succeeded`, …).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase: String,
    /// `"N/A"`, `"45.34%"`, `"100.0%"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Worker restarts so far.
    #[serde(default)]
    pub restart_count: u32,
    /// Name of the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// Bound, Running, Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A status condition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Bound`, `Running`, `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False`, `Unknown`.
    pub status: String,
    /// Last time the condition was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<String>,
    /// Last time `status`, `reason` or `message` changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// Machine-readable reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1alpha1_blank_manifest_decodes() {
        let json = serde_json::json!({
            "apiVersion": "cdi.kubevirt.io/v1alpha1", "kind": "DataVolume",
            "metadata": {"name": "blank-image-datavolume"},
            "spec": {"source": {"blank": {}}, "pvc": {"accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "500Mi"}}}}
        });
        let dv: DataVolume = serde_json::from_value(json).unwrap();
        assert_eq!(dv.spec.source.unwrap().variants(), vec!["blank"]);
        assert_eq!(
            dv.spec.pvc.unwrap().requested_storage().as_deref(),
            Some("500Mi")
        );
    }

    #[test]
    fn unknown_fields_round_trip() {
        let json = serde_json::json!({"metadata": {"name": "a", "generation": 3},
            "spec": {"priorityClassName": "p", "source": {"upload": {}}}});
        let dv: DataVolume = serde_json::from_value(json).unwrap();
        let back = serde_json::to_value(&dv).unwrap();
        assert_eq!(back["metadata"]["generation"], 3);
        assert_eq!(back["spec"]["priorityClassName"], "p");
    }
}
