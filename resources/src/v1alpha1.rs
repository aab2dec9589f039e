//! `cdi.kubevirt.io/v1alpha1`: the older `DataVolume` and `CDIConfig` versions that the docs
//! still apply (`spec.pvc` DataVolumes, `oc edit cdiconfig/config`).
//!
//! Upstream dropped these versions; we serve them (not as storage version) because users copy
//! those manifests. The shapes are the v1beta1 ones, so each spec is a transparent wrapper that
//! dereferences to its v1beta1 spec, the status types are shared, and conversion in either
//! direction is the identity on spec and status (only `apiVersion` changes).

use std::ops::{Deref, DerefMut};

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::v1beta1;

/// The v1alpha1 DataVolume spec: the v1beta1 spec under another version. Field access goes
/// through `Deref` (`dv.spec.source`).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
// The printer columns repeat `type_ = "string"`, which the lint takes for a duplicated
// attribute; they are separate columns.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "cdi.kubevirt.io",
    version = "v1alpha1",
    kind = "DataVolume",
    namespaced,
    shortname = "dv",
    shortname = "dvs",
    category = "all",
    status = "v1beta1::DataVolumeStatus",
    storage = false,
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
#[serde(transparent)]
pub struct DataVolumeSpec(pub v1beta1::DataVolumeSpec);

/// The v1alpha1 CDIConfig spec: the v1beta1 spec under another version.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "cdi.kubevirt.io",
    version = "v1alpha1",
    kind = "CDIConfig",
    plural = "cdiconfigs",
    singular = "cdiconfig",
    status = "v1beta1::CDIConfigStatus",
    storage = false,
    derive = "PartialEq",
    derive = "Default",
    doc = "CDIConfig provides a user configuration for CDI"
)]
#[serde(transparent)]
pub struct CDIConfigSpec(pub v1beta1::CDIConfigSpec);

/// Implements the wrapper plumbing and the identity conversions for one kind.
///
/// The schema is the v1beta1 spec's own (not derived, which would put this wrapper's doc
/// comment into it), so both served versions validate exactly alike.
macro_rules! same_shape_as_v1beta1 {
    ($kind:ident, $spec:ident) => {
        impl JsonSchema for $spec {
            fn inline_schema() -> bool {
                <v1beta1::$spec as JsonSchema>::inline_schema()
            }

            fn schema_name() -> std::borrow::Cow<'static, str> {
                <v1beta1::$spec as JsonSchema>::schema_name()
            }

            fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
                <v1beta1::$spec as JsonSchema>::json_schema(generator)
            }
        }

        impl Deref for $spec {
            type Target = v1beta1::$spec;

            fn deref(&self) -> &Self::Target {
                &self.0
            }
        }

        impl DerefMut for $spec {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.0
            }
        }

        impl From<v1beta1::$spec> for $spec {
            fn from(spec: v1beta1::$spec) -> Self {
                Self(spec)
            }
        }

        impl From<$spec> for v1beta1::$spec {
            fn from(spec: $spec) -> Self {
                spec.0
            }
        }

        impl From<$kind> for v1beta1::$kind {
            fn from(old: $kind) -> Self {
                Self {
                    metadata: old.metadata,
                    spec: old.spec.0,
                    status: old.status,
                }
            }
        }

        impl From<v1beta1::$kind> for $kind {
            fn from(new: v1beta1::$kind) -> Self {
                Self {
                    metadata: new.metadata,
                    spec: $spec(new.spec),
                    status: new.status,
                }
            }
        }
    };
}

same_shape_as_v1beta1!(DataVolume, DataVolumeSpec);
same_shape_as_v1beta1!(CDIConfig, CDIConfigSpec);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{assert_round_trip, yaml_to_json};

    // Manifests from mission-requirements.md Part 3, copied verbatim.

    const Y46: &str = r#"
apiVersion: cdi.kubevirt.io/v1alpha1
kind: DataVolume
metadata:
  name: <upload-datavolume>
spec:
  source:
      upload: {}
  pvc:
    accessModes:
      - ReadWriteOnce
    resources:
      requests:
        storage: <2Gi>
"#;

    const Y47: &str = r#"
apiVersion: cdi.kubevirt.io/v1alpha1
kind: DataVolume
metadata:
  name: <clone-datavolume>
spec:
  source:
    pvc:
      name: "<source-vm-disk>"
      namespace: "<source-namespace>"
  pvc:
    accessModes:
      - ReadWriteOnce
    selector:
      matchLabels:
        node: node01
    resources:
      requests:
        storage: <10Gi>
"#;

    const Y48: &str = r#"
apiVersion: cdi.kubevirt.io/v1alpha1
kind: DataVolume
metadata:
  name: blank-image-datavolume
spec:
  source:
      blank: {}
  pvc:
    # Optional: Set the storage class or omit to accept the default
    # storageClassName: "hostpath"
    accessModes:
      - ReadWriteOnce
    resources:
      requests:
        storage: 500Mi
"#;

    /// Y50 is shown as `oc edit` output mixing `describe` and YAML (`API Version:`, `...`
    /// lines, which YAML reads as document ends); this is its evident content.
    const Y50_REBUILT: &str = r#"
apiVersion: cdi.kubevirt.io/v1alpha1
kind: CDIConfig
metadata:
  name: config
spec:
  scratchSpaceStorageClass: "<storage_class>"
"#;

    fn data_volume(yaml: &str) -> DataVolume {
        let value = yaml_to_json(yaml);
        let dv: DataVolume = serde_json::from_value(value.clone()).expect("decodes");
        assert_round_trip(&value, &dv, &[]);
        dv
    }

    fn requested(dv: &DataVolume) -> Option<&str> {
        let requests = dv
            .spec
            .pvc
            .as_ref()?
            .resources
            .as_ref()?
            .requests
            .as_ref()?;
        Some(requests.get("storage")?.0.as_str())
    }

    #[test]
    fn y46_upload() {
        let dv = data_volume(Y46);
        assert_eq!(dv.metadata.name.as_deref(), Some("<upload-datavolume>"));
        assert_eq!(
            dv.spec.source.as_ref().map(|s| s.set_kinds()),
            Some(vec!["upload"])
        );
        assert_eq!(requested(&dv), Some("<2Gi>"));
        let pvc = dv.spec.pvc.as_ref().expect("pvc");
        assert_eq!(
            pvc.access_modes.as_deref(),
            Some(&["ReadWriteOnce".to_string()][..])
        );
    }

    #[test]
    fn y47_clone_with_selector() {
        let dv = data_volume(Y47);
        let source = dv
            .spec
            .source
            .as_ref()
            .and_then(|s| s.pvc.as_ref())
            .expect("pvc source");
        assert_eq!(source.name, "<source-vm-disk>");
        assert_eq!(source.namespace, "<source-namespace>");
        let selector = dv
            .spec
            .pvc
            .as_ref()
            .and_then(|p| p.selector.as_ref())
            .expect("selector");
        assert_eq!(
            selector.match_labels.as_ref().map(|l| l["node"].as_str()),
            Some("node01")
        );
        assert_eq!(requested(&dv), Some("<10Gi>"));
    }

    #[test]
    fn y48_blank() {
        let dv = data_volume(Y48);
        assert_eq!(
            dv.spec.source.as_ref().map(|s| s.set_kinds()),
            Some(vec!["blank"])
        );
        assert_eq!(
            dv.spec
                .pvc
                .as_ref()
                .and_then(|p| p.storage_class_name.as_deref()),
            None
        );
        assert_eq!(requested(&dv), Some("500Mi"));
    }

    #[test]
    fn y50_scratch_storage_class() {
        let value = yaml_to_json(Y50_REBUILT);
        let config: CDIConfig = serde_json::from_value(value.clone()).expect("decodes");
        assert_round_trip(&value, &config, &[]);
        assert_eq!(
            config.metadata.name.as_deref(),
            Some(v1beta1::CDI_CONFIG_NAME)
        );
        assert_eq!(
            config.spec.scratch_space_storage_class.as_deref(),
            Some("<storage_class>")
        );
    }

    #[test]
    fn conversion_is_identity_on_spec_and_status() {
        let mut old = data_volume(Y47);
        old.status = Some(v1beta1::DataVolumeStatus {
            phase: Some(v1beta1::DataVolumePhase::CloneInProgress),
            progress: Some("12.00%".into()),
            ..Default::default()
        });
        let new: v1beta1::DataVolume = old.clone().into();
        let old_json = serde_json::to_value(&old).expect("serialize");
        let mut new_json = serde_json::to_value(&new).expect("serialize");
        assert_eq!(new_json["apiVersion"], "cdi.kubevirt.io/v1beta1");
        new_json["apiVersion"] = old_json["apiVersion"].clone();
        assert_eq!(new_json, old_json);
        let back: DataVolume = new.into();
        assert_eq!(back, old);

        let config: CDIConfig = serde_json::from_value(yaml_to_json(Y50_REBUILT)).expect("decodes");
        let beta: v1beta1::CDIConfig = config.clone().into();
        assert_eq!(beta.spec, config.spec.0);
        assert_eq!(CDIConfig::from(beta), config);
    }

    #[test]
    fn v1alpha1_documents_also_decode_as_v1beta1() {
        // The API server stores v1beta1; a v1alpha1 body must decode there unchanged.
        let value = yaml_to_json(Y46);
        let beta: v1beta1::DataVolume = serde_json::from_value(value).expect("decodes");
        assert_eq!(beta.spec, data_volume(Y46).spec.0);
    }
}
