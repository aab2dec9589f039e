//! `DataVolume`: a PersistentVolumeClaim together with where its data comes from.
//!
//! The spec says where the bytes come from (`source` or `sourceRef`) and what claim to make
//! (`pvc`, used verbatim, or `storage`, which CDI completes from the StorageProfile); the status
//! mirrors the claim and the worker (`phase`, `progress`, `restartCount`, conditions).

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaimSpec, TypedLocalObjectReference, TypedObjectReference,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// The desired DataVolume: its data source and the claim to populate.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
// The printer columns repeat `type_ = "string"`, which the lint takes for a duplicated
// attribute; they are separate columns.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "cdi.kubevirt.io",
    version = "v1beta1",
    kind = "DataVolume",
    namespaced,
    shortname = "dv",
    shortname = "dvs",
    category = "all",
    status = "DataVolumeStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "DataVolume is an abstraction on top of PersistentVolumeClaims to allow easy population of those PersistentVolumeClaims with relation to VirtualMachines",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "The phase the data volume is in"
    ),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress",
        description = "Transfer progress in percentage if known, N/A otherwise"
    ),
    printcolumn(
        name = "Restarts",
        type_ = "integer",
        json_path = ".status.restartCount",
        description = "The number of times the transfer has been restarted."
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSpec {
    /// Where the data comes from; exactly one member should be set (checked by validation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<DataVolumeSource>,
    /// Indirect source: a DataSource that names the PVC or snapshot to clone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ref: Option<DataVolumeSourceRef>,
    /// A claim spec used verbatim (the older form; `storage` is the one CDI completes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PersistentVolumeClaimSpec>,
    /// The requested storage, completed by CDI from the StorageProfile and defaults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,
    /// Priority class of the importer, cloner and upload pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Service account of the importer and upload pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// What the imported bytes are: a disk image (`kubevirt`, the default) or a tar archive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<DataVolumeContentType>,
    /// Stages of a multi-stage (warm) import.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<Vec<DataVolumeCheckpoint>>,
    /// Whether the current checkpoint is the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_checkpoint: Option<bool>,
    /// Allocate the target's storage in advance; unset defers to CDIConfig.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preallocation: Option<bool>,
}

/// Upstream's `StorageSpec`: a claim spec whose gaps CDI fills in (access modes and volume mode
/// from the StorageProfile, size from the source for clones, filesystem overhead).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Desired access modes (`ReadWriteOnce`, `ReadOnlyMany`, `ReadWriteMany`,
    /// `ReadWriteOncePod`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_modes: Option<Vec<String>>,
    /// Label query over volumes to consider for binding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Requested (and limited) size; upstream's field is a non-pointer struct, kept optional
    /// here so that an absent `resources` and an empty `resources: {}` both round-trip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<VolumeResourceRequirements>,
    /// Binding reference to a specific PersistentVolume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_name: Option<String>,
    /// StorageClass of the claim; unset means the default (virt) class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// `Filesystem`, `Block`, or `FromStorageProfile` (CDI picks the mode from the profile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,
    /// An existing snapshot, PVC or populator object to create the volume from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_source: Option<TypedLocalObjectReference>,
    /// Like `dataSource`, but any non-core object and cross-namespace references are allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_source_ref: Option<TypedObjectReference>,
}

/// Special `storage.volumeMode`: let CDI choose the mode from the matching StorageProfile.
pub const VOLUME_MODE_FROM_STORAGE_PROFILE: &str = "FromStorageProfile";

/// One stage of a multi-stage (warm migration) import.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DataVolumeCheckpoint {
    /// Snapshot identifier of the previous checkpoint.
    pub previous: String,
    /// Snapshot identifier created for this checkpoint.
    pub current: String,
}

/// What the transferred bytes are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataVolumeContentType {
    /// A disk image (raw, qcow2, vmdk, …), converted to raw in the target.
    #[default]
    Kubevirt,
    /// A tar archive extracted into the target filesystem.
    Archive,
}

/// The source of a DataVolume's data. Every member is optional so that a manifest with none or
/// several decodes; exactly-one is a validation rule, not a shape rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSource {
    /// Import over HTTP(S).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<DataVolumeSourceHTTP>,
    /// Import from an S3-compatible object store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3: Option<DataVolumeSourceS3>,
    /// Import from Google Cloud Storage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gcs: Option<DataVolumeSourceGCS>,
    /// Import a container disk from a registry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<DataVolumeSourceRegistry>,
    /// Clone an existing PVC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pvc: Option<DataVolumeSourcePVC>,
    /// Wait for an upload through the upload proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload: Option<DataVolumeSourceUpload>,
    /// Create a blank raw image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blank: Option<DataVolumeBlankImage>,
    /// Import a disk from oVirt's imageio.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imageio: Option<DataVolumeSourceImageIO>,
    /// Import a disk from VMware through VDDK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vddk: Option<DataVolumeSourceVDDK>,
    /// Restore an existing VolumeSnapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<DataVolumeSourceSnapshot>,
}

impl DataVolumeSource {
    /// Names of the members that are set, in declaration order; validation wants exactly one.
    pub fn set_kinds(&self) -> Vec<&'static str> {
        let members = [
            ("http", self.http.is_some()),
            ("s3", self.s3.is_some()),
            ("gcs", self.gcs.is_some()),
            ("registry", self.registry.is_some()),
            ("pvc", self.pvc.is_some()),
            ("upload", self.upload.is_some()),
            ("blank", self.blank.is_some()),
            ("imageio", self.imageio.is_some()),
            ("vddk", self.vddk.is_some()),
            ("snapshot", self.snapshot.is_some()),
        ];
        members
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(name, _)| name)
            .collect()
    }
}

/// HTTP(S) source, with optional basic-auth Secret, CA ConfigMap and extra headers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSourceHTTP {
    /// URL of the image.
    pub url: String,
    /// Secret with `accessKeyId` (user) and `secretKey` (password).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// ConfigMap holding the CA bundle for the server's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_config_map: Option<String>,
    /// Extra `Name: value` headers sent with every request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_headers: Option<Vec<String>>,
    /// Secrets each holding one extra header that must not appear in the spec.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_extra_headers: Option<Vec<String>>,
    /// Expected checksum of the file, `algorithm:hex` (md5, sha1, sha256, sha512).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Skip verification of the server's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
}

/// S3 source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSourceS3 {
    /// URL of the object (`https://host/bucket/key` or `s3://…`).
    pub url: String,
    /// Secret with `accessKeyId` and `secretKey`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// ConfigMap holding the CA bundle for the endpoint's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_config_map: Option<String>,
}

/// Google Cloud Storage source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSourceGCS {
    /// URL of the object.
    pub url: String,
    /// Secret with the service-account credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
}

/// Registry source: a container disk by URL or OpenShift ImageStream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSourceRegistry {
    /// Image reference with scheme (`docker://…` or `oci-archive://…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// ImageStream name to import instead of a URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_stream: Option<String>,
    /// `pod` (the importer pulls) or `node` (the kubelet pulls into its cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull_method: Option<RegistryPullMethod>,
    /// Secret with registry credentials (`accessKeyId`, `secretKey`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// ConfigMap holding the registry's CA bundle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_config_map: Option<String>,
    /// Platform to pick from a multi-architecture image index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformOptions>,
}

/// Registry URL scheme of images in a registry.
pub const REGISTRY_SCHEME_DOCKER: &str = "docker";
/// Registry URL scheme of an OCI archive.
pub const REGISTRY_SCHEME_OCI_ARCHIVE: &str = "oci-archive";

/// How a registry image is pulled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RegistryPullMethod {
    /// The importer pod pulls the image itself (the default).
    #[default]
    Pod,
    /// The node's container runtime pulls it and the importer reads the cached layers.
    Node,
}

/// Minimum runtime requirements an image must meet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlatformOptions {
    /// Target CPU architecture (e.g. `amd64`, `arm64`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
}

/// Clone source: an existing PVC.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DataVolumeSourcePVC {
    /// Namespace of the source PVC.
    pub namespace: String,
    /// Name of the source PVC.
    pub name: String,
}

/// Snapshot source: an existing VolumeSnapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DataVolumeSourceSnapshot {
    /// Namespace of the source VolumeSnapshot.
    pub namespace: String,
    /// Name of the source VolumeSnapshot.
    pub name: String,
}

/// Upload source (no parameters: the data arrives through the upload proxy).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DataVolumeSourceUpload {}

/// Blank source (no parameters: a zero-filled raw image of the claim's size).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DataVolumeBlankImage {}

/// oVirt imageio source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSourceImageIO {
    /// URL of the ovirt-engine.
    pub url: String,
    /// ID of the disk to import.
    #[serde(rename = "diskId")]
    pub disk_id: String,
    /// Secret with the engine credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// ConfigMap holding the engine's CA certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_config_map: Option<String>,
    /// Skip verification of the engine's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
}

/// VMware VDDK source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSourceVDDK {
    /// URL of the vCenter or ESXi host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// UUID of the virtual machine the backing file belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Path of the virtual disk to copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Certificate thumbprint of the host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thumbprint: Option<String>,
    /// Secret with the host's user name and password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// ConfigMap holding the host's CA certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_config_map: Option<String>,
    /// Image carrying the VDDK library (overrides the `v2v-vmware` ConfigMap).
    #[serde(rename = "initImageURL", skip_serializing_if = "Option::is_none")]
    pub init_image_url: Option<String>,
    /// ConfigMap with extra arguments for the VDDK library.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_args: Option<String>,
}

/// Indirect source reference (`spec.sourceRef`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DataVolumeSourceRef {
    /// Kind of the referenced object; only `DataSource` is supported.
    pub kind: String,
    /// Namespace of the referenced object; defaults to the DataVolume's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the referenced object.
    pub name: String,
}

/// The one `sourceRef.kind` upstream supports.
pub const SOURCE_REF_KIND_DATA_SOURCE: &str = "DataSource";

/// Observed state of a DataVolume.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeStatus {
    /// Name of the PVC that holds the data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// Where the DataVolume is in its life.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<DataVolumePhase>,
    /// Transfer progress, `"45.20%"`, or `"N/A"` when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// How often the populating pod has restarted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_count: Option<i32>,
    /// `Ready`, `Bound` and `Running`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<DataVolumeCondition>>,
}

impl DataVolumeStatus {
    /// The condition of the given type, if present.
    pub fn condition(&self, type_: DataVolumeConditionType) -> Option<&DataVolumeCondition> {
        self.conditions
            .as_deref()?
            .iter()
            .find(|c| c.type_ == type_)
    }
}

/// A DataVolume condition.
pub type DataVolumeCondition = Condition<DataVolumeConditionType>;

/// The condition types a DataVolume reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DataVolumeConditionType {
    /// The data is in place and the volume can be consumed.
    Ready,
    /// The underlying PVC is bound.
    Bound,
    /// The import, upload or clone worker is running.
    Running,
}

/// Upstream's `DataVolumePhase` values (the empty "unset" phase is an absent `phase`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DataVolumePhase {
    /// No claim yet, or waiting for something before work can start.
    Pending,
    /// The claim is bound; the operation has not reported yet.
    PVCBound,
    /// The importer pod is created but not running.
    ImportScheduled,
    /// The importer is transferring.
    ImportInProgress,
    /// A clone is scheduled.
    CloneScheduled,
    /// A host-assisted clone is transferring.
    CloneInProgress,
    /// Snapshotting the source for a smart clone.
    SnapshotForSmartCloneInProgress,
    /// Restoring the target from the source snapshot.
    CloneFromSnapshotSourceInProgress,
    /// Creating the target PVC of a smart clone.
    SmartClonePVCInProgress,
    /// A CSI volume clone is in progress.
    CSICloneInProgress,
    /// The target PVC is being expanded.
    ExpansionInProgress,
    /// The populated PVC is being moved to the target namespace.
    NamespaceTransferInProgress,
    /// The upload server pod is created but not ready.
    UploadScheduled,
    /// The upload server accepts data.
    UploadReady,
    /// The claim waits for a consumer pod (WaitForFirstConsumer storage class).
    WaitForFirstConsumer,
    /// A populator will fill the claim once it is scheduled.
    PendingPopulation,
    /// The data is in place.
    Succeeded,
    /// The operation failed for good.
    Failed,
    /// The state cannot be determined.
    Unknown,
    /// A multi-stage import waits for its next checkpoint.
    Paused,
    /// The populator prepares the target claim.
    PrepClaimInProgress,
    /// The populated volume is rebound to the target claim.
    RebindInProgress,
}

impl DataVolumePhase {
    /// Every phase, in upstream's declaration order.
    pub const ALL: [Self; 22] = [
        Self::Pending,
        Self::PVCBound,
        Self::ImportScheduled,
        Self::ImportInProgress,
        Self::CloneScheduled,
        Self::CloneInProgress,
        Self::SnapshotForSmartCloneInProgress,
        Self::CloneFromSnapshotSourceInProgress,
        Self::SmartClonePVCInProgress,
        Self::CSICloneInProgress,
        Self::ExpansionInProgress,
        Self::NamespaceTransferInProgress,
        Self::UploadScheduled,
        Self::UploadReady,
        Self::WaitForFirstConsumer,
        Self::PendingPopulation,
        Self::Succeeded,
        Self::Failed,
        Self::Unknown,
        Self::Paused,
        Self::PrepClaimInProgress,
        Self::RebindInProgress,
    ];

    /// The wire spelling, identical to the variant name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::PVCBound => "PVCBound",
            Self::ImportScheduled => "ImportScheduled",
            Self::ImportInProgress => "ImportInProgress",
            Self::CloneScheduled => "CloneScheduled",
            Self::CloneInProgress => "CloneInProgress",
            Self::SnapshotForSmartCloneInProgress => "SnapshotForSmartCloneInProgress",
            Self::CloneFromSnapshotSourceInProgress => "CloneFromSnapshotSourceInProgress",
            Self::SmartClonePVCInProgress => "SmartClonePVCInProgress",
            Self::CSICloneInProgress => "CSICloneInProgress",
            Self::ExpansionInProgress => "ExpansionInProgress",
            Self::NamespaceTransferInProgress => "NamespaceTransferInProgress",
            Self::UploadScheduled => "UploadScheduled",
            Self::UploadReady => "UploadReady",
            Self::WaitForFirstConsumer => "WaitForFirstConsumer",
            Self::PendingPopulation => "PendingPopulation",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Unknown => "Unknown",
            Self::Paused => "Paused",
            Self::PrepClaimInProgress => "PrepClaimInProgress",
            Self::RebindInProgress => "RebindInProgress",
        }
    }

    /// Whether the phase is final (`Succeeded` or `Failed`).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

impl std::fmt::Display for DataVolumePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A DataVolume as a template: inside a DataImportCron (`spec.template`) or a KubeVirt
/// VirtualMachine (`spec.dataVolumeTemplates[]`). `apiVersion`, `kind` and `metadata` are
/// optional there, so this is a plain struct rather than the DataVolume resource.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeTemplate {
    /// `cdi.kubevirt.io/v1beta1` when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// `DataVolume` when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name, labels and annotations of the DataVolumes made from the template.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "embedded_object_meta_schema")]
    pub metadata: Option<ObjectMeta>,
    /// The DataVolume spec to instantiate.
    pub spec: DataVolumeSpec,
    /// Status as written in the template (normally `{}`); never acted upon.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<DataVolumeStatus>,
}

/// Schema of an embedded `metadata`: an object whose fields are kept as given. A bare
/// `type: object` (what upstream's CRD has) would let the API server prune the template's
/// labels and annotations.
pub(crate) fn embedded_object_meta_schema(
    _generator: &mut schemars::SchemaGenerator,
) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{assert_round_trip, yaml_to_json};
    use kube::core::Resource;

    // Manifests from mission-requirements.md Part 3, copied verbatim (Y-numbers as there).

    const Y11: &str = r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: <datavolume>
spec:
  source:
    pvc:
      namespace: "<source_namespace>"
      name: "<my_vm_disk>"
  storage: {}
"#;

    const Y17: &str = r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: blank-image-datavolume
spec:
  source:
    blank: {}
  storage:
    resources:
      requests:
        storage: <2Gi>
  storageClassName: "<storage_class>"
"#;

    const Y29: &str = r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: preallocated-datavolume
spec:
  source:
  registry:
    url: <image_url>
  storage:
    resources:
      requests:
        storage: 1Gi
# ...
"#;

    const Y30: &str = r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: datavolume-example
  annotations:
    v1.multus-cni.io/default-network: bridge-network
# ...
"#;

    // VirtualMachines whose `spec.dataVolumeTemplates[]` are DataVolume templates. The
    // templates are verbatim; the VirtualMachine's own `spec.template` (KubeVirt's part, not
    // decoded here) is left out.
    const Y1: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  labels:
    app: <vm_name>
  name: <vm_name>
spec:
  dataVolumeTemplates:
  - apiVersion: cdi.kubevirt.io/v1beta1
    kind: DataVolume
    metadata:
      name: <vm_name>
    spec:
      sourceRef:
        kind: DataSource
        name: rhel9
        namespace: openshift-virtualization-os-images
      storage:
        resources:
          requests:
            storage: 30Gi
  running: false
"#;

    const Y2: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: rhel-9-minimal
spec:
  dataVolumeTemplates:
    - metadata:
        name: rhel-9-minimal-volume
      spec:
        sourceRef:
          kind: DataSource
          name: rhel9
          namespace: openshift-virtualization-os-images
        storage: {}
  instancetype:
    name: u1.medium
"#;

    const Y3: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: example-vm
  namespace: example-namespace
spec:
  dataVolumeTemplates:
    - metadata:
        name: example-vm-volume
      spec:
        sourceRef:
          kind: DataSource
          name: rhel9
          namespace: openshift-virtualization-os-images
        storage:
          resources: {}
  instancetype:
    name: u1.medium
"#;

    const Y7: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  creationTimestamp: null
  labels:
    kubevirt.io/vm: vm-fedora-datavolume
  name: vm-fedora-datavolume
spec:
  dataVolumeTemplates:
  - metadata:
      creationTimestamp: null
      name: fedora-dv
    spec:
      storage:
        resources:
          requests:
            storage: 10Gi
        storageClassName: <storage_class>
      source:
        registry:
          url: "docker://kubevirt/fedora-cloud-container-disk-demo:latest"
        secretRef: data-source-secret
        certConfigMap: tls-certs
    status: {}
  running: true
"#;

    const Y8: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  creationTimestamp: null
  labels:
    kubevirt.io/vm: vm-fedora-datavolume
  name: vm-fedora-datavolume
spec:
  dataVolumeTemplates:
  - metadata:
      creationTimestamp: null
      name: fedora-dv
    spec:
      storage:
        resources:
          requests:
            storage: 10Gi
        storageClassName: <storage_class>
      source:
        http:
          url: "https://mirror.arizona.edu/fedora/linux/releases/35/Cloud/x86_64/images/Fedora-Cloud-Base-35-1.2.x86_64.qcow2"
        registry:
          url: "docker://kubevirt/fedora-cloud-container-disk-demo:latest"
          secretRef: data-source-secret
          certConfigMap: tls-certs
    status: {}
  running: true
"#;

    const Y12: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  labels:
    kubevirt.io/vm: vm-dv-clone
  name: vm-dv-clone
spec:
  running: false
  dataVolumeTemplates:
    - metadata:
        name: favorite-clone
      spec:
        storage:
          accessModes:
            - ReadWriteOnce
          resources:
            requests:
              storage: 2Gi
        source:
          pvc:
            namespace: <source_namespace>
            name: "<source_pvc>"
"#;

    /// Decodes a manifest as a DataVolume and checks it serializes back to the same JSON,
    /// less the pointers the docs misplaced (which any API server would prune too).
    fn data_volume(yaml: &str, pruned: &[&str]) -> DataVolume {
        let value = yaml_to_json(yaml);
        let dv: DataVolume = serde_json::from_value(value.clone()).expect("decodes as DataVolume");
        assert_round_trip(&value, &dv, pruned);
        dv
    }

    /// The single `spec.dataVolumeTemplates[]` entry of a VirtualMachine manifest.
    fn vm_template(yaml: &str, pruned: &[&str]) -> DataVolumeTemplate {
        let vm = yaml_to_json(yaml);
        let templates = vm["spec"]["dataVolumeTemplates"]
            .as_array()
            .expect("templates");
        assert_eq!(templates.len(), 1);
        let value = templates[0].clone();
        let template: DataVolumeTemplate =
            serde_json::from_value(value.clone()).expect("decodes as a DataVolume template");
        assert_round_trip(&value, &template, pruned);
        template
    }

    fn requested_storage(storage: &StorageSpec) -> Option<&str> {
        let requests = storage.resources.as_ref()?.requests.as_ref()?;
        Some(requests.get("storage")?.0.as_str())
    }

    #[test]
    fn y11_pvc_clone() {
        let dv = data_volume(Y11, &[]);
        assert_eq!(dv.metadata.name.as_deref(), Some("<datavolume>"));
        let source = dv.spec.source.as_ref().expect("source");
        assert_eq!(source.set_kinds(), ["pvc"]);
        let pvc = source.pvc.as_ref().expect("pvc");
        assert_eq!(pvc.namespace, "<source_namespace>");
        assert_eq!(pvc.name, "<my_vm_disk>");
        assert_eq!(dv.spec.storage, Some(StorageSpec::default()));
        assert!(dv.status.is_none());
    }

    #[test]
    fn y17_blank_drops_the_misplaced_storage_class() {
        // The doc puts storageClassName beside `storage`; the type has no such field there.
        let dv = data_volume(Y17, &["/spec/storageClassName"]);
        let source = dv.spec.source.as_ref().expect("source");
        assert_eq!(source.blank, Some(DataVolumeBlankImage {}));
        let storage = dv.spec.storage.as_ref().expect("storage");
        assert_eq!(requested_storage(storage), Some("<2Gi>"));
        assert_eq!(storage.storage_class_name, None);
    }

    #[test]
    fn y29_preallocated_keeps_its_flaws_visible() {
        // `source:` is empty (null) and `registry:` sits at spec level; no preallocation key.
        let dv = data_volume(Y29, &["/spec/registry"]);
        assert_eq!(dv.spec.source, None);
        assert_eq!(dv.spec.preallocation, None);
        let storage = dv.spec.storage.as_ref().expect("storage");
        assert_eq!(requested_storage(storage), Some("1Gi"));
    }

    #[test]
    fn y30_annotations_need_a_spec() {
        // The excerpt elides the spec; a DataVolume without one is not a DataVolume (upstream's
        // CRD requires `spec` too), but the metadata part is what the doc is about.
        let value = yaml_to_json(Y30);
        let err = serde_json::from_value::<DataVolume>(value.clone()).expect_err("no spec");
        assert!(err.to_string().contains("spec"), "{err}");
        let mut with_spec = value;
        with_spec["spec"] = serde_json::json!({});
        let dv = data_volume(&serde_json::to_string(&with_spec).expect("json"), &[]);
        let annotations = dv.metadata.annotations.as_ref().expect("annotations");
        assert_eq!(
            annotations["v1.multus-cni.io/default-network"],
            "bridge-network"
        );
    }

    #[test]
    fn y1_template_with_type_meta_and_source_ref() {
        let t = vm_template(Y1, &[]);
        assert_eq!(t.api_version.as_deref(), Some("cdi.kubevirt.io/v1beta1"));
        assert_eq!(t.kind.as_deref(), Some("DataVolume"));
        let source_ref = t.spec.source_ref.as_ref().expect("sourceRef");
        assert_eq!(source_ref.kind, SOURCE_REF_KIND_DATA_SOURCE);
        assert_eq!(source_ref.name, "rhel9");
        assert_eq!(
            source_ref.namespace.as_deref(),
            Some("openshift-virtualization-os-images")
        );
        let storage = t.spec.storage.as_ref().expect("storage");
        assert_eq!(requested_storage(storage), Some("30Gi"));
    }

    #[test]
    fn y2_y3_templates_with_empty_storage() {
        let t = vm_template(Y2, &[]);
        assert_eq!(
            t.metadata.and_then(|m| m.name).as_deref(),
            Some("rhel-9-minimal-volume")
        );
        assert_eq!(t.spec.storage, Some(StorageSpec::default()));

        let t = vm_template(Y3, &[]);
        let storage = t.spec.storage.as_ref().expect("storage");
        // `resources: {}` is present and empty, which is not the same as absent.
        assert_eq!(
            storage.resources,
            Some(VolumeResourceRequirements::default())
        );
        assert_eq!(requested_storage(storage), None);
    }

    #[test]
    fn y7_registry_template_drops_source_level_credentials() {
        // secretRef/certConfigMap sit beside `registry:` in the doc; upstream has them inside.
        let t = vm_template(
            Y7,
            &["/spec/source/secretRef", "/spec/source/certConfigMap"],
        );
        let registry = t
            .spec
            .source
            .as_ref()
            .and_then(|s| s.registry.as_ref())
            .expect("registry");
        assert_eq!(
            registry.url.as_deref(),
            Some("docker://kubevirt/fedora-cloud-container-disk-demo:latest")
        );
        assert_eq!(registry.secret_ref, None);
        assert_eq!(t.status, Some(DataVolumeStatus::default()));
        let storage = t.spec.storage.as_ref().expect("storage");
        assert_eq!(
            storage.storage_class_name.as_deref(),
            Some("<storage_class>")
        );
    }

    #[test]
    fn y8_two_sources_decode_so_validation_can_reject_them() {
        let t = vm_template(Y8, &[]);
        let source = t.spec.source.as_ref().expect("source");
        assert_eq!(source.set_kinds(), ["http", "registry"]);
        let registry = source.registry.as_ref().expect("registry");
        assert_eq!(registry.secret_ref.as_deref(), Some("data-source-secret"));
        assert_eq!(registry.cert_config_map.as_deref(), Some("tls-certs"));
        assert!(
            source
                .http
                .as_ref()
                .expect("http")
                .url
                .ends_with("x86_64.qcow2")
        );
    }

    #[test]
    fn y12_clone_template() {
        let t = vm_template(Y12, &[]);
        let pvc = t
            .spec
            .source
            .as_ref()
            .and_then(|s| s.pvc.as_ref())
            .expect("pvc");
        assert_eq!(
            (pvc.namespace.as_str(), pvc.name.as_str()),
            ("<source_namespace>", "<source_pvc>")
        );
        let storage = t.spec.storage.as_ref().expect("storage");
        assert_eq!(
            storage.access_modes.as_deref(),
            Some(&["ReadWriteOnce".to_string()][..])
        );
        assert_eq!(requested_storage(storage), Some("2Gi"));
    }

    #[test]
    fn status_with_every_field_round_trips() {
        let yaml = r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: fedora
  namespace: default
  creationTimestamp: "2020-07-15T03:58:20Z"
spec:
  contentType: archive
  priorityClassName: high
  serviceAccountName: importer
  preallocation: true
  finalCheckpoint: false
  checkpoints:
  - previous: ""
    current: snap-1
  source:
    http:
      url: https://example.com/disk.qcow2.xz
      secretRef: creds
      certConfigMap: ca
      extraHeaders: ["X-A: 1"]
      secretExtraHeaders: [hdr]
      checksum: sha256:00ff
      insecureSkipVerify: false
  pvc:
    accessModes: [ReadWriteOnce]
    volumeMode: Block
    resources:
      requests:
        storage: 10Gi
status:
  claimName: fedora
  phase: ImportInProgress
  progress: 45.20%
  restartCount: 2
  conditions:
  - type: Bound
    status: "True"
    lastHeartbeatTime: "2020-07-15T03:58:24Z"
    lastTransitionTime: "2020-07-15T03:58:24Z"
    message: PVC win10-rootdisk Bound
    reason: Bound
  - type: Running
    status: "False"
    lastHeartbeatTime: "2020-07-15T04:31:39Z"
    lastTransitionTime: "2020-07-15T04:31:39Z"
    message: Import Complete
    reason: Completed
  - type: Ready
    status: Unknown
"#;
        let dv = data_volume(yaml, &[]);
        assert_eq!(dv.spec.content_type, Some(DataVolumeContentType::Archive));
        assert_eq!(
            dv.spec.pvc.as_ref().and_then(|p| p.volume_mode.as_deref()),
            Some("Block")
        );
        let status = dv.status.as_ref().expect("status");
        assert_eq!(status.phase, Some(DataVolumePhase::ImportInProgress));
        assert_eq!(status.progress.as_deref(), Some("45.20%"));
        assert_eq!(status.restart_count, Some(2));
        let bound = status
            .condition(DataVolumeConditionType::Bound)
            .expect("Bound");
        assert!(bound.is_true());
        assert_eq!(bound.reason.as_deref(), Some("Bound"));
        let running = status
            .condition(DataVolumeConditionType::Running)
            .expect("Running");
        assert_eq!(running.status, crate::v1beta1::ConditionStatus::False);
        let ready = status
            .condition(DataVolumeConditionType::Ready)
            .expect("Ready");
        assert_eq!(ready.status, crate::v1beta1::ConditionStatus::Unknown);
        assert_eq!(ready.last_transition_time, None);
    }

    #[test]
    fn every_source_kind_decodes_with_upstream_field_names() {
        let source: DataVolumeSource = serde_json::from_value(serde_json::json!({
            "s3": {"url": "s3://b/k", "secretRef": "s", "certConfigMap": "c"},
            "gcs": {"url": "gs://b/k", "secretRef": "g"},
            "registry": {"imageStream": "is", "pullMethod": "node", "platform": {"architecture": "arm64"}},
            "upload": {},
            "imageio": {"url": "https://engine", "diskId": "d1", "insecureSkipVerify": true},
            "vddk": {"url": "https://vc", "uuid": "u", "backingFile": "[ds] vm.vmdk",
                     "thumbprint": "aa:bb", "initImageURL": "quay.io/vddk", "extraArgs": "cm"},
            "snapshot": {"namespace": "ns", "name": "snap"}
        }))
        .expect("sources");
        assert_eq!(
            source.set_kinds(),
            [
                "s3", "gcs", "registry", "upload", "imageio", "vddk", "snapshot"
            ]
        );
        let registry = source.registry.as_ref().expect("registry");
        assert_eq!(registry.pull_method, Some(RegistryPullMethod::Node));
        assert_eq!(
            source.imageio.as_ref().map(|i| i.disk_id.as_str()),
            Some("d1")
        );
        let vddk = source.vddk.as_ref().expect("vddk");
        assert_eq!(vddk.init_image_url.as_deref(), Some("quay.io/vddk"));
        let back = serde_json::to_value(&source).expect("serialize");
        assert_eq!(back["vddk"]["initImageURL"], "quay.io/vddk");
        assert_eq!(back["imageio"]["diskId"], "d1");
    }

    #[test]
    fn phases_spell_as_upstream() {
        for phase in DataVolumePhase::ALL {
            let json = serde_json::to_value(phase).expect("serialize");
            assert_eq!(json, phase.as_str());
            assert_eq!(phase.to_string(), phase.as_str());
            let back: DataVolumePhase = serde_json::from_value(json).expect("deserialize");
            assert_eq!(back, phase);
        }
        assert!(DataVolumePhase::Failed.is_terminal());
        assert!(!DataVolumePhase::Paused.is_terminal());
        assert!(serde_json::from_value::<DataVolumePhase>("Importing".into()).is_err());
    }

    #[test]
    fn new_data_volume_serializes_type_meta() {
        let dv = DataVolume::new(
            "blank",
            DataVolumeSpec {
                source: Some(DataVolumeSource {
                    blank: Some(DataVolumeBlankImage {}),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        let json = serde_json::to_value(&dv).expect("serialize");
        assert_eq!(json["apiVersion"], "cdi.kubevirt.io/v1beta1");
        assert_eq!(json["kind"], "DataVolume");
        assert_eq!(json["spec"], serde_json::json!({"source": {"blank": {}}}));
        assert!(json.get("status").is_none());
        assert_eq!(DataVolume::plural(&()), "datavolumes");
    }
}
