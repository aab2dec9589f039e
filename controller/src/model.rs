//! The controller's view of CDI's own kinds: the fields of DataVolume, CDIConfig and
//! StorageProfile it reads and writes, decoded from the typed resources' JSON.
//!
//! The typed kinds live in `cdi-resources`; the controller reads them through these views (one
//! JSON round trip per reconcile) so that its decisions depend only on upstream's wire format,
//! not on how that crate models optional fields or enums. Everything here is plain data.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaimSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// A DataVolume as the controller sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DvView {
    /// `apiVersion` (checked by admission).
    #[serde(default)]
    pub api_version: String,
    /// Object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Desired state.
    #[serde(default)]
    pub spec: DvSpec,
    /// Observed state.
    #[serde(default)]
    pub status: Option<DvStatus>,
}

impl DvView {
    /// Decode any serializable DataVolume (typed resource, dynamic object, JSON).
    pub fn from_object<T: Serialize>(obj: &T) -> Result<DvView, serde_json::Error> {
        serde_json::from_value(serde_json::to_value(obj)?)
    }

    /// Name.
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    /// Namespace.
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or_default()
    }

    /// UID.
    pub fn uid(&self) -> &str {
        self.metadata.uid.as_deref().unwrap_or_default()
    }

    /// An annotation.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    }

    /// Current phase (`""` before the first status write).
    pub fn phase(&self) -> &str {
        self.status.as_ref().map(|s| s.phase.as_str()).unwrap_or("")
    }
}

/// `spec` of a DataVolume (upstream `DataVolumeSpec`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DvSpec {
    /// Where the data comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<DvSource>,
    /// A DataSource reference instead of `source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ref: Option<SourceRef>,
    /// Claim spec used verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PersistentVolumeClaimSpec>,
    /// Claim spec completed from the StorageProfile (same JSON shape as a claim spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<PersistentVolumeClaimSpec>,
    /// `kubevirt` (default) or `archive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Priority class of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Service account of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Preallocate the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preallocation: Option<bool>,
    /// Multi-stage import checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<Vec<serde_json::Value>>,
    /// Multi-stage import: the last checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_checkpoint: Option<bool>,
}

impl DvSpec {
    /// Content type, defaulting like upstream's `GetContentType`.
    pub fn content_type(&self) -> &str {
        match self.content_type.as_deref() {
            Some("archive") => "archive",
            _ => "kubevirt",
        }
    }
}

/// `spec.source` (exactly one member is set on a valid DataVolume).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DvSource {
    /// HTTP(S) import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// S3 import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<HttpSource>,
    /// Google Cloud Storage import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcs: Option<HttpSource>,
    /// Registry import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistrySource>,
    /// Clone from a PVC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<ObjectRef>,
    /// Clone from a VolumeSnapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<ObjectRef>,
    /// Upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<serde_json::Value>,
    /// Blank disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<serde_json::Value>,
    /// oVirt imageio import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imageio: Option<ImageioSource>,
    /// VMware VDDK import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vddk: Option<VddkSource>,
}

impl DvSource {
    /// Names of the members that are set, in upstream's order.
    pub fn variants(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut push = |set: bool, name| {
            if set {
                v.push(name);
            }
        };
        push(self.http.is_some(), "http");
        push(self.s3.is_some(), "s3");
        push(self.gcs.is_some(), "gcs");
        push(self.registry.is_some(), "registry");
        push(self.pvc.is_some(), "pvc");
        push(self.snapshot.is_some(), "snapshot");
        push(self.upload.is_some(), "upload");
        push(self.blank.is_some(), "blank");
        push(self.imageio.is_some(), "imageio");
        push(self.vddk.is_some(), "vddk");
        v
    }
}

/// `http`, `s3` and `gcs` sources (s3 and gcs use a subset of the fields).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// Source URL.
    #[serde(default)]
    pub url: String,
    /// Credentials Secret (`accessKeyId`, `secretKey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// ConfigMap of CA certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_config_map: Option<String>,
    /// Extra request headers (`Name: value`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_headers: Vec<String>,
    /// Secrets holding extra headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_extra_headers: Vec<String>,
    /// `algo:hex` of the downloaded bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Skip TLS verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
}

/// `registry` source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrySource {
    /// `docker://…` or `oci-archive://…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// OpenShift ImageStream name (node pull only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_stream: Option<String>,
    /// `pod` (default) or `node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_method: Option<String>,
    /// Registry credentials Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// ConfigMap of CA certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_config_map: Option<String>,
    /// Platform selection in an image index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// `registry.platform`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    /// e.g. `arm64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
}

/// `imageio` source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageioSource {
    /// oVirt engine URL.
    #[serde(default)]
    pub url: String,
    /// Disk id.
    #[serde(default)]
    pub disk_id: String,
    /// Credentials Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// CA ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_config_map: Option<String>,
    /// Skip TLS verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
}

/// `vddk` source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VddkSource {
    /// vCenter/ESXi URL.
    #[serde(default)]
    pub url: String,
    /// VM UUID.
    #[serde(default)]
    pub uuid: String,
    /// Disk path.
    #[serde(default)]
    pub backing_file: String,
    /// Certificate thumbprint.
    #[serde(default)]
    pub thumbprint: String,
    /// Credentials Secret.
    #[serde(default)]
    pub secret_ref: String,
}

/// `source.pvc` / `source.snapshot` / `sourceRef`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// Namespace.
    #[serde(default)]
    pub namespace: String,
    /// Name.
    #[serde(default)]
    pub name: String,
}

/// `spec.sourceRef`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceRef {
    /// Must be `DataSource`.
    #[serde(default)]
    pub kind: String,
    /// Namespace (defaults to the DataVolume's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name.
    #[serde(default)]
    pub name: String,
}

/// `status` of a DataVolume (upstream `DataVolumeStatus`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DvStatus {
    /// Name of the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// Phase (`""`, upstream's unset phase, is written as an absent field).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase: String,
    /// `N/A`, `12.34%` or `100.0%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Worker restarts.
    #[serde(default)]
    pub restart_count: i32,
    /// Ready, Bound, Running.
    #[serde(default)]
    pub conditions: Vec<DvCondition>,
}

/// One DataVolume condition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DvCondition {
    /// `Ready`, `Bound` or `Running`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False`, `Unknown`.
    pub status: String,
    /// RFC 3339 time of the last status change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// RFC 3339 time of the last update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<String>,
    /// Machine-readable reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What the controller reads of the CDIConfig singleton's `status` (upstream's config
/// controller computes it from the spec and the storage classes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStatus {
    /// Effective filesystem overhead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem_overhead: Option<FilesystemOverhead>,
    /// Storage class for scratch claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch_space_storage_class: Option<String>,
    /// Default preallocation.
    #[serde(default)]
    pub preallocation: bool,
    /// Proxy for imports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_proxy: Option<ImportProxy>,
    /// Worker pod resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_pod_resource_requirements: Option<ResourceRequirements>,
    /// Pull secrets for worker images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<k8s_openapi::api::core::v1::LocalObjectReference>>,
}

/// What the controller reads of CDIConfig `spec` (insecure registries and feature gates are
/// not mirrored into status upstream).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigSpec {
    /// Registries (host\[:port\]) reached without TLS verification.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Enabled feature gates (`DataVolumeClaimAdoption`, …).
    #[serde(default)]
    pub feature_gates: Vec<String>,
}

/// CDIConfig as the controller sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigView {
    /// Spec.
    #[serde(default)]
    pub spec: ConfigSpec,
    /// Status.
    #[serde(default)]
    pub status: ConfigStatus,
}

impl ConfigView {
    /// Decode any serializable CDIConfig.
    pub fn from_object<T: Serialize>(obj: &T) -> Result<ConfigView, serde_json::Error> {
        serde_json::from_value(serde_json::to_value(obj)?)
    }

    /// Filesystem overhead for `class` as its string form (`"0.055"`), like upstream's
    /// `GetFilesystemOverheadForStorageClass`: per-class value, else global, else `"0"`.
    pub fn overhead_for(&self, class: Option<&str>) -> String {
        let Some(fo) = &self.status.filesystem_overhead else {
            return "0".to_string();
        };
        if let Some(c) = class
            && let Some(v) = fo.storage_class.get(c)
        {
            return v.clone();
        }
        fo.global.clone().unwrap_or_else(|| "0".to_string())
    }

    /// Whether a feature gate is on.
    pub fn feature_gate(&self, gate: &str) -> bool {
        self.spec.feature_gates.iter().any(|g| g == gate)
    }
}

/// `status.filesystemOverhead`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FilesystemOverhead {
    /// Global value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global: Option<String>,
    /// Per storage class.
    #[serde(default)]
    pub storage_class: BTreeMap<String, String>,
}

/// `status.importProxy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImportProxy {
    /// `HTTPProxy`.
    #[serde(rename = "HTTPProxy", default, skip_serializing_if = "Option::is_none")]
    pub http_proxy: Option<String>,
    /// `HTTPSProxy`.
    #[serde(
        rename = "HTTPSProxy",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub https_proxy: Option<String>,
    /// `noProxy`.
    #[serde(rename = "noProxy", default, skip_serializing_if = "Option::is_none")]
    pub no_proxy: Option<String>,
    /// `trustedCAProxy`: ConfigMap (in the CDI namespace) of proxy CA certificates.
    #[serde(
        rename = "trustedCAProxy",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub trusted_ca_proxy: Option<String>,
}

/// One `claimPropertySets` entry of a StorageProfile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimPropertySet {
    /// Access modes.
    #[serde(default)]
    pub access_modes: Vec<String>,
    /// Volume mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,
}

/// StorageProfile as the controller sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileView {
    /// Metadata (annotations carry the minimum supported size).
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Status.
    #[serde(default)]
    pub status: ProfileStatus,
}

impl ProfileView {
    /// Decode any serializable StorageProfile.
    pub fn from_object<T: Serialize>(obj: &T) -> Result<ProfileView, serde_json::Error> {
        serde_json::from_value(serde_json::to_value(obj)?)
    }
}

/// `status` of a StorageProfile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileStatus {
    /// Recommended access/volume modes, best first.
    #[serde(default)]
    pub claim_property_sets: Vec<ClaimPropertySet>,
}
