//! `StorageProfile`: CDI's per-StorageClass recommendations (access and volume modes, clone
//! strategy, DataImportCron source format). One per StorageClass, same name, cluster-scoped;
//! users edit `spec`, the controller publishes the effective values in `status`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// What an administrator sets for a StorageClass; unset members are detected or defaulted.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cdi.kubevirt.io",
    version = "v1beta1",
    kind = "StorageProfile",
    status = "StorageProfileStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "StorageProfile provides a CDI specific recommendation for storage parameters"
)]
#[serde(rename_all = "camelCase")]
pub struct StorageProfileSpec {
    /// Preferred clone method for volumes of this class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clone_strategy: Option<CDICloneStrategy>,
    /// Access/volume mode combinations the class supports, best first (at most 8).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub claim_property_sets: Option<Vec<ClaimPropertySet>>,
    /// Whether DataImportCrons keep their imports as PVCs or VolumeSnapshots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_import_cron_source_format: Option<DataImportCronSourceFormat>,
    /// VolumeSnapshotClass for snapshot clones; unset picks one by provisioner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_class: Option<String>,
}

/// What the controller computed for the StorageClass: the spec merged with detected values.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageProfileStatus {
    /// The StorageClass these values are for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// The StorageClass's provisioner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provisioner: Option<String>,
    /// Effective clone strategy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clone_strategy: Option<CDICloneStrategy>,
    /// Effective access/volume mode combinations, best first (at most 8).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub claim_property_sets: Option<Vec<ClaimPropertySet>>,
    /// Effective DataImportCron source format.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_import_cron_source_format: Option<DataImportCronSourceFormat>,
    /// Effective VolumeSnapshotClass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_class: Option<String>,
    /// `Recognized`: whether CDI knows the provisioner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<StorageProfileCondition>>,
}

/// A StorageProfile condition.
pub type StorageProfileCondition = Condition<StorageProfileConditionType>;

/// The condition types a StorageProfile reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum StorageProfileConditionType {
    /// The provisioner and its parameters are known to CDI.
    Recognized,
}

/// One supported combination of access modes and volume mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimPropertySet {
    /// Access modes (`ReadWriteOnce`, `ReadOnlyMany`, `ReadWriteMany`, `ReadWriteOncePod`;
    /// at most 4).
    #[schemars(length(max = 4))]
    pub access_modes: Vec<String>,
    /// `Filesystem` or `Block`. Upstream's field is a required pointer that marshals `null`
    /// when unset; absent and `null` mean the same, so it is omitted here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,
}

/// How CDI clones a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum CDICloneStrategy {
    /// Host-assisted copy through a source and a target pod (slowest, always works).
    #[serde(rename = "copy")]
    HostAssisted,
    /// Snapshot the source and restore it.
    #[serde(rename = "snapshot")]
    Snapshot,
    /// CSI volume cloning.
    #[serde(rename = "csi-clone")]
    CsiClone,
}

/// How a DataImportCron keeps its imported images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataImportCronSourceFormat {
    /// As PersistentVolumeClaims (the default).
    #[default]
    Pvc,
    /// As VolumeSnapshots.
    Snapshot,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{assert_round_trip, yaml_to_json};

    // Manifests from mission-requirements.md Part 3, copied verbatim.

    const Y18_BEFORE: &str = r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: StorageProfile
metadata:
  name: <unknown_provisioner_class>
# ...
spec: {}
status:
  provisioner: <unknown_provisioner>
  storageClass: <unknown_provisioner_class>
"#;

    const Y18_AFTER: &str = r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: StorageProfile
metadata:
  name: <unknown_provisioner_class>
# ...
spec:
  claimPropertySets:
  - accessModes:
    - ReadWriteOnce
    volumeMode:
      Filesystem
status:
  provisioner: <unknown_provisioner>
  storageClass: <unknown_provisioner_class>
"#;

    const Y19: &str = r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: StorageProfile
metadata:
  name: <provisioner_class>
# ...
spec:
  claimPropertySets:
  - accessModes:
    - ReadWriteOnce
    volumeMode:
      Filesystem
  cloneStrategy: csi-clone
status:
  provisioner: <provisioner>
  storageClass: <provisioner_class>
"#;

    const Y20: &str = r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: StorageProfile
metadata:
# ...
spec:
  dataImportCronSourceFormat: snapshot
"#;

    fn storage_profile(yaml: &str) -> StorageProfile {
        let value = yaml_to_json(yaml);
        let profile: StorageProfile = serde_json::from_value(value.clone()).expect("decodes");
        assert_round_trip(&value, &profile, &[]);
        profile
    }

    #[test]
    fn y18_before_editing() {
        let p = storage_profile(Y18_BEFORE);
        assert_eq!(
            p.metadata.name.as_deref(),
            Some("<unknown_provisioner_class>")
        );
        assert_eq!(p.spec, StorageProfileSpec::default());
        let status = p.status.as_ref().expect("status");
        assert_eq!(status.provisioner.as_deref(), Some("<unknown_provisioner>"));
        assert_eq!(
            status.storage_class.as_deref(),
            Some("<unknown_provisioner_class>")
        );
        assert_eq!(status.claim_property_sets, None);
    }

    #[test]
    fn y18_after_editing() {
        let p = storage_profile(Y18_AFTER);
        let sets = p
            .spec
            .claim_property_sets
            .as_ref()
            .expect("claimPropertySets");
        assert_eq!(
            sets,
            &[ClaimPropertySet {
                access_modes: vec!["ReadWriteOnce".into()],
                volume_mode: Some("Filesystem".into()),
            }]
        );
    }

    #[test]
    fn y19_clone_strategy() {
        let p = storage_profile(Y19);
        assert_eq!(p.spec.clone_strategy, Some(CDICloneStrategy::CsiClone));
        assert_eq!(p.spec.claim_property_sets.as_ref().map(Vec::len), Some(1));
        assert_eq!(
            p.status.and_then(|s| s.provisioner).as_deref(),
            Some("<provisioner>")
        );
    }

    #[test]
    fn y20_snapshot_source_format() {
        // The doc elides the metadata (`metadata:` then a comment, i.e. null); an object
        // without metadata is rejected, exactly as the API server rejects a nameless object.
        let value = yaml_to_json(Y20);
        assert!(value["metadata"].is_null());
        assert!(serde_json::from_value::<StorageProfile>(value.clone()).is_err());
        let spec: StorageProfileSpec =
            serde_json::from_value(value["spec"].clone()).expect("spec decodes");
        assert_eq!(
            spec.data_import_cron_source_format,
            Some(DataImportCronSourceFormat::Snapshot)
        );
        assert_round_trip(&value["spec"], &spec, &[]);
    }

    #[test]
    fn clone_strategies_spell_as_upstream() {
        for (strategy, wire) in [
            (CDICloneStrategy::HostAssisted, "copy"),
            (CDICloneStrategy::Snapshot, "snapshot"),
            (CDICloneStrategy::CsiClone, "csi-clone"),
        ] {
            assert_eq!(serde_json::to_value(strategy).expect("serialize"), wire);
        }
    }

    #[test]
    fn status_with_conditions_round_trips() {
        let p = storage_profile(
            r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: StorageProfile
metadata:
  name: local
spec: {}
status:
  storageClass: local
  provisioner: kubevirt.io.hostpath-provisioner
  cloneStrategy: snapshot
  snapshotClass: csi-snap
  dataImportCronSourceFormat: pvc
  claimPropertySets:
  - accessModes: [ReadWriteOnce]
    volumeMode: Filesystem
  - accessModes: [ReadWriteMany, ReadOnlyMany]
    volumeMode: Block
  conditions:
  - type: Recognized
    status: "True"
    lastTransitionTime: "2024-01-02T03:04:05Z"
"#,
        );
        let status = p.status.as_ref().expect("status");
        assert_eq!(status.clone_strategy, Some(CDICloneStrategy::Snapshot));
        assert_eq!(status.claim_property_sets.as_ref().map(Vec::len), Some(2));
        let conditions = status.conditions.as_ref().expect("conditions");
        assert_eq!(conditions[0].type_, StorageProfileConditionType::Recognized);
        assert!(conditions[0].is_true());
    }
}
