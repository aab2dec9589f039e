//! `DataSource`: a named, stable pointer to the current golden image (a PVC, a VolumeSnapshot,
//! or one other DataSource), which DataVolumes reference through `spec.sourceRef`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, DataVolumeSourcePVC, DataVolumeSourceSnapshot};

/// What the DataSource points at.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cdi.kubevirt.io",
    version = "v1beta1",
    kind = "DataSource",
    namespaced,
    shortname = "das",
    category = "all",
    status = "DataSourceStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "DataSource references an import/clone source for a DataVolume"
)]
#[serde(rename_all = "camelCase")]
pub struct DataSourceSpec {
    /// The referenced source; exactly one member should be set.
    pub source: DataSourceSource,
}

/// A DataSource's source: a PVC, a VolumeSnapshot, or another DataSource (depth at most 1).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataSourceSource {
    /// A PVC to clone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pvc: Option<DataVolumeSourcePVC>,
    /// A VolumeSnapshot to restore.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<DataVolumeSourceSnapshot>,
    /// Another DataSource, resolved into `status.source`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_source: Option<DataSourceRefSourceDataSource>,
}

/// Reference from one DataSource to another.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DataSourceRefSourceDataSource {
    /// Namespace of the referenced DataSource.
    pub namespace: String,
    /// Name of the referenced DataSource.
    pub name: String,
}

/// The resolved source and readiness.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataSourceStatus {
    /// The source after following a `dataSource` reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<DataSourceSource>,
    /// `Ready`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<DataSourceCondition>>,
}

/// A DataSource condition.
pub type DataSourceCondition = Condition<DataSourceConditionType>;

/// The condition types a DataSource reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DataSourceConditionType {
    /// The source exists and can be cloned.
    Ready,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{assert_round_trip, yaml_to_json};

    // The docs show no DataSource manifest, only references to one (Y1-Y3:
    // `rhel9` in `openshift-virtualization-os-images`); this is that object as upstream's
    // DataImportCron controller maintains it.
    const RHEL9: &str = r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataSource
metadata:
  name: rhel9
  namespace: openshift-virtualization-os-images
  labels:
    cdi.kubevirt.io/dataImportCron: rhel9-image-cron
spec:
  source:
    pvc:
      name: rhel9-a1b2c3d4e5f6
      namespace: openshift-virtualization-os-images
status:
  source:
    pvc:
      name: rhel9-a1b2c3d4e5f6
      namespace: openshift-virtualization-os-images
  conditions:
  - type: Ready
    status: "True"
    reason: Ready
    message: DataSource is ready to be consumed
    lastHeartbeatTime: "2024-05-01T10:00:00Z"
    lastTransitionTime: "2024-05-01T10:00:00Z"
"#;

    #[test]
    fn golden_image_data_source_round_trips() {
        let value = yaml_to_json(RHEL9);
        let ds: DataSource = serde_json::from_value(value.clone()).expect("decodes");
        assert_round_trip(&value, &ds, &[]);
        let pvc = ds.spec.source.pvc.as_ref().expect("pvc");
        assert_eq!(pvc.name, "rhel9-a1b2c3d4e5f6");
        let status = ds.status.as_ref().expect("status");
        assert_eq!(status.source.as_ref(), Some(&ds.spec.source));
        let ready = &status.conditions.as_ref().expect("conditions")[0];
        assert_eq!(ready.type_, DataSourceConditionType::Ready);
        assert!(ready.is_true());
    }

    #[test]
    fn snapshot_and_data_source_references_decode() {
        let source: DataSourceSource = serde_json::from_value(serde_json::json!({
            "snapshot": {"namespace": "os-images", "name": "fedora-snap"},
            "dataSource": {"namespace": "os-images", "name": "fedora"}
        }))
        .expect("decodes");
        assert_eq!(
            source.snapshot.as_ref().map(|s| s.name.as_str()),
            Some("fedora-snap")
        );
        assert_eq!(
            source.data_source.as_ref().map(|d| d.name.as_str()),
            Some("fedora")
        );
        assert_eq!(source.pvc, None);
    }
}
