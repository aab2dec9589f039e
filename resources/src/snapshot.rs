//! `snapshot.storage.k8s.io/v1` `VolumeSnapshot` and `VolumeSnapshotClass`, typed so that the
//! controller can create and watch snapshots (smart clones, snapshot-format DataImportCrons,
//! `source.snapshot`). The CSI external-snapshotter owns these CRDs; CDI never installs them,
//! so they are not in [`crate::crds`].

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the snapshot kinds.
pub const SNAPSHOT_GROUP: &str = "snapshot.storage.k8s.io";
/// The snapshot kinds' version.
pub const SNAPSHOT_VERSION: &str = "v1";
/// `apiVersion` of the snapshot kinds.
pub const SNAPSHOT_API_VERSION: &str = "snapshot.storage.k8s.io/v1";

/// What to snapshot and with which class.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshot",
    namespaced,
    shortname = "vs",
    status = "VolumeSnapshotStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "VolumeSnapshot is a user's request for either creating a point-in-time snapshot of a persistent volume, or binding to a pre-existing snapshot."
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSpec {
    /// The PVC to snapshot, or the pre-existing content to bind; exactly one is set.
    pub source: VolumeSnapshotSource,
    /// VolumeSnapshotClass to use; unset picks the default class of the driver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
}

/// Source of a VolumeSnapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSource {
    /// PVC (same namespace) to take a snapshot of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
    /// Pre-provisioned VolumeSnapshotContent to bind to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content_name: Option<String>,
}

/// Observed state of a VolumeSnapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotStatus {
    /// The VolumeSnapshotContent this snapshot is bound to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound_volume_snapshot_content_name: Option<String>,
    /// When the storage system took the snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// Whether a volume can be restored from the snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Minimum size of a volume restored from the snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<Quantity>,
    /// The last error creating the snapshot, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
    /// The group snapshot this snapshot belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_name: Option<String>,
}

impl VolumeSnapshotStatus {
    /// Whether the snapshot can be restored from (`readyToUse: true`).
    pub fn is_ready(&self) -> bool {
        self.ready_to_use == Some(true)
    }
}

/// An error reported by the snapshot controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VolumeSnapshotError {
    /// When the error happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// What went wrong (may be logged; no secrets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The fields of a VolumeSnapshotClass, which sit at the top level of the object (it has no
/// `spec`).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshotClass",
    shortname = "vsclass",
    shortname = "vsclasses",
    no_spec,
    derive = "PartialEq",
    doc = "VolumeSnapshotClass specifies parameters that a underlying storage system uses when creating a volume snapshot."
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotClassFields {
    /// CSI driver that handles snapshots of this class; matches a StorageClass's provisioner.
    pub driver: String,
    /// Whether the content and the storage snapshot go when the VolumeSnapshot is deleted.
    pub deletion_policy: DeletionPolicy,
    /// Driver-specific parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<BTreeMap<String, String>>,
}

/// What happens to a snapshot's content when the VolumeSnapshot is deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Delete the content and the storage-side snapshot.
    #[default]
    Delete,
    /// Keep both.
    Retain,
}

/// Annotation marking the default VolumeSnapshotClass of a driver.
pub const ANN_DEFAULT_SNAPSHOT_CLASS: &str = "snapshot.storage.kubernetes.io/is-default-class";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{assert_round_trip, yaml_to_json};
    use kube::core::Resource;

    #[test]
    fn snapshot_round_trips() {
        let yaml = r#"
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: fedora-0123456789ab
  namespace: golden-images
spec:
  source:
    persistentVolumeClaimName: fedora-0123456789ab
  volumeSnapshotClassName: csi-rbdplugin-snapclass
status:
  boundVolumeSnapshotContentName: snapcontent-1
  creationTime: "2024-05-01T01:36:00Z"
  readyToUse: true
  restoreSize: 5Gi
  error:
    time: "2024-05-01T01:35:59Z"
    message: transient
"#;
        let value = yaml_to_json(yaml);
        let vs: VolumeSnapshot = serde_json::from_value(value.clone()).expect("decodes");
        assert_round_trip(&value, &vs, &[]);
        assert_eq!(
            vs.spec.source.persistent_volume_claim_name.as_deref(),
            Some("fedora-0123456789ab")
        );
        let status = vs.status.as_ref().expect("status");
        assert!(status.is_ready());
        assert_eq!(
            status.restore_size.as_ref().map(|q| q.0.as_str()),
            Some("5Gi")
        );
        assert_eq!(VolumeSnapshot::api_version(&()), SNAPSHOT_API_VERSION);
        assert_eq!(VolumeSnapshot::plural(&()), "volumesnapshots");
    }

    /// Y10 (mission-requirements.md): the doc elides everything but `driver`; metadata and
    /// deletionPolicy (both required) are added here.
    #[test]
    fn y10_snapshot_class_fields_sit_at_the_top_level() {
        let yaml = r#"
kind: VolumeSnapshotClass
apiVersion: snapshot.storage.k8s.io/v1
driver: openshift-storage.rbd.csi.ceph.com
metadata:
  name: ocs-storagecluster-rbdplugin-snapclass
deletionPolicy: Delete
parameters:
  clusterID: openshift-storage
"#;
        let value = yaml_to_json(yaml);
        let class: VolumeSnapshotClass = serde_json::from_value(value.clone()).expect("decodes");
        assert_round_trip(&value, &class, &[]);
        assert_eq!(class.spec.driver, "openshift-storage.rbd.csi.ceph.com");
        assert_eq!(class.spec.deletion_policy, DeletionPolicy::Delete);
        assert_eq!(VolumeSnapshotClass::plural(&()), "volumesnapshotclasses");
    }
}
