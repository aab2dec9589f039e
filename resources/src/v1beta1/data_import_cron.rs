//! `DataImportCron`: polls a registry image (or a PVC) on a cron schedule, imports each new
//! digest as a DataVolume from `template`, points its managed DataSource at the newest import
//! and garbage-collects old ones.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, DataImportCronSourceFormat, DataVolumeSourcePVC, DataVolumeTemplate};

/// What to import, how often, and what to keep.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cdi.kubevirt.io",
    version = "v1beta1",
    kind = "DataImportCron",
    namespaced,
    shortname = "dic",
    shortname = "dics",
    category = "all",
    status = "DataImportCronStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "DataImportCron defines a cron job for recurring polling/importing disk images as PVCs into a golden image namespace",
    printcolumn(
        name = "Format",
        type_ = "string",
        json_path = ".status.sourceFormat",
        description = "The format in which created sources are saved"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DataImportCronSpec {
    /// The DataVolume each import is made from (source `registry` or `pvc`).
    pub template: DataVolumeTemplate,
    /// Standard five-field cron schedule; empty means no polling.
    pub schedule: String,
    /// Whether old imports are deleted after a new one (`Outdated`, the default) or kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub garbage_collect: Option<DataImportCronGarbageCollect>,
    /// How many imports garbage collection keeps (upstream's default is 3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imports_to_keep: Option<i32>,
    /// Name of the DataSource (same namespace) this cron keeps pointed at the newest import.
    pub managed_data_source: String,
    /// Whether the DataVolumes and DataSource outlive the cron (`All`, the default) or not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_policy: Option<DataImportCronRetentionPolicy>,
    /// ServiceAccount used to authorize creating the DataVolumes (PVC sources).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub service_account_name: Option<String>,
}

/// Garbage-collection mode of a DataImportCron.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DataImportCronGarbageCollect {
    /// Delete imports beyond `importsToKeep` once a newer one succeeded.
    #[default]
    Outdated,
    /// Never delete imports.
    Never,
}

/// What happens to a DataImportCron's DataVolumes and DataSource when it is deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DataImportCronRetentionPolicy {
    /// Keep them (upstream documents this as "RetainAll").
    #[default]
    All,
    /// Delete them with the cron.
    None,
}

/// Imports in flight and the last result.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataImportCronStatus {
    /// The import in progress (upstream supports one at a time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_imports: Option<Vec<ImportStatus>>,
    /// The PVC of the last successful import.
    #[serde(rename = "lastImportedPVC", skip_serializing_if = "Option::is_none")]
    pub last_imported_pvc: Option<DataVolumeSourcePVC>,
    /// When the source was last polled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_execution_timestamp: Option<Time>,
    /// When the last import finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_import_timestamp: Option<Time>,
    /// Whether imports are kept as PVCs or snapshots (from the StorageProfile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_format: Option<DataImportCronSourceFormat>,
    /// `Progressing` and `UpToDate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<DataImportCronCondition>>,
}

/// One import in progress. Upstream's JSON keys are capitalised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ImportStatus {
    /// The DataVolume doing the import.
    #[serde(rename = "DataVolumeName")]
    pub data_volume_name: String,
    /// Digest of the image being imported (`sha256:…`, or `uid:…` for PVC sources).
    #[serde(rename = "Digest")]
    pub digest: String,
}

/// A DataImportCron condition.
pub type DataImportCronCondition = Condition<DataImportCronConditionType>;

/// The condition types a DataImportCron reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DataImportCronConditionType {
    /// An import is running.
    Progressing,
    /// The newest digest has been imported.
    UpToDate,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{assert_round_trip, yaml_to_json};
    use crate::v1beta1::RegistryPullMethod;

    // The docs show DataImportCrons only as HyperConverged `dataImportCronTemplates[]` entries
    // ({metadata, spec, status}); those are copied verbatim (mission-requirements.md) and each
    // entry is decoded as a DataImportCron.

    const Y21: &str = r#"
apiVersion: hco.kubevirt.io/v1beta1
kind: HyperConverged
metadata:
  name: kubevirt-hyperconverged
spec:
  dataImportCronTemplates:
    - metadata:
        name: rhel8-image-cron
      spec:
        template:
          spec:
            storageClassName: <new_storage_class>
        schedule: "0 */12 * * *"
        managedDataSource: <data_source>
# ...
"#;

    const Y22: &str = r#"
apiVersion: hco.kubevirt.io/v1beta1
kind: HyperConverged
metadata:
  name: kubevirt-hyperconverged
spec:
  dataImportCronTemplates:
    - metadata:
        name: centos7-image-cron
        annotations:
          cdi.kubevirt.io/storage.bind.immediate.requested: "true"
      spec:
        schedule: "0 */12 * * *"
        template:
          spec:
            source:
              registry:
                url: docker://quay.io/containerdisks/centos:7-2009
            storage:
              resources:
                requests:
                  storage: 10Gi
        managedDataSource: centos7
        retentionPolicy: "None"
"#;

    const Y25: &str = r#"
apiVersion: hco.kubevirt.io/v1beta1
kind: HyperConverged
metadata:
  name: kubevirt-hyperconverged
spec:
# ...
status:
# ...
  dataImportCronTemplates:
  - metadata:
      annotations:
        cdi.kubevirt.io/storage.bind.immediate.requested: "true"
      name: centos-7-image-cron
    spec:
      garbageCollect: Outdated
      managedDataSource: centos7
      schedule: 55 8/12 * * *
      template:
        metadata: {}
        spec:
          source:
            registry:
              url: docker://quay.io/containerdisks/centos:7-2009
          storage:
            resources:
              requests:
                storage: 30Gi
        status: {}
    status:
      commonTemplate: true
# ...
  - metadata:
      annotations:
        cdi.kubevirt.io/storage.bind.immediate.requested: "true"
      name: user-defined-dic
    spec:
      garbageCollect: Outdated
      managedDataSource: user-defined-centos-stream8
      schedule: 55 8/12 * * *
      template:
        metadata: {}
        spec:
          source:
            registry:
              pullMethod: node
              url: docker://quay.io/containerdisks/centos-stream:8
          storage:
            resources:
              requests:
                storage: 30Gi
        status: {}
    status: {}
# ...
"#;

    /// Y38, verbatim: the runbook's excerpt of a DataImportCron's template (`source.registry.url`
    /// and `storage`, flattened by the doc).
    const Y38: &str = r#"
url: docker://.../cdi-func-test-tinycore
storage:
  resources:
    requests:
      storage: 5Gi
  storageClassName: rook-ceph-block
"#;

    /// Decodes the HyperConverged entries at `pointer` as DataImportCrons and checks each
    /// round trip; the entries carry no `apiVersion`/`kind`, which the resource type always
    /// writes, so those two are compared separately.
    fn hco_entries(yaml: &str, pointer: &str, pruned: &[&[&str]]) -> Vec<DataImportCron> {
        let hco = yaml_to_json(yaml);
        let entries = hco
            .pointer(pointer)
            .and_then(|v| v.as_array())
            .expect("entries");
        assert_eq!(entries.len(), pruned.len());
        entries
            .iter()
            .zip(pruned)
            .map(|(entry, pruned)| {
                let cron: DataImportCron =
                    serde_json::from_value(entry.clone()).expect("decodes as DataImportCron");
                let mut with_type = entry.clone();
                with_type["apiVersion"] = "cdi.kubevirt.io/v1beta1".into();
                with_type["kind"] = "DataImportCron".into();
                assert_round_trip(&with_type, &cron, pruned);
                cron
            })
            .collect()
    }

    #[test]
    fn y21_storage_class_override_is_misplaced() {
        // The doc sets storageClassName on the template's spec; it belongs in `storage`.
        let crons = hco_entries(
            Y21,
            "/spec/dataImportCronTemplates",
            &[&["/spec/template/spec/storageClassName"]],
        );
        let spec = &crons[0].spec;
        assert_eq!(crons[0].metadata.name.as_deref(), Some("rhel8-image-cron"));
        assert_eq!(spec.schedule, "0 */12 * * *");
        assert_eq!(spec.managed_data_source, "<data_source>");
        assert_eq!(spec.template.spec.storage, None);
        assert_eq!(spec.template.spec.source, None);
    }

    #[test]
    fn y22_custom_boot_source() {
        let crons = hco_entries(Y22, "/spec/dataImportCronTemplates", &[&[]]);
        let cron = &crons[0];
        let annotations = cron.metadata.annotations.as_ref().expect("annotations");
        assert_eq!(
            annotations[crate::annotations::ANN_IMMEDIATE_BINDING],
            "true"
        );
        assert_eq!(
            cron.spec.retention_policy,
            Some(DataImportCronRetentionPolicy::None)
        );
        assert_eq!(cron.spec.managed_data_source, "centos7");
        let registry = cron
            .spec
            .template
            .spec
            .source
            .as_ref()
            .and_then(|s| s.registry.as_ref());
        assert_eq!(
            registry.and_then(|r| r.url.as_deref()),
            Some("docker://quay.io/containerdisks/centos:7-2009")
        );
    }

    #[test]
    fn y25_system_and_custom_templates() {
        // `status.commonTemplate` is HyperConverged's, not a DataImportCron status field.
        let crons = hco_entries(
            Y25,
            "/status/dataImportCronTemplates",
            &[&["/status/commonTemplate"], &[]],
        );
        assert_eq!(
            crons[0].spec.garbage_collect,
            Some(DataImportCronGarbageCollect::Outdated)
        );
        assert_eq!(crons[0].spec.schedule, "55 8/12 * * *");
        assert_eq!(crons[0].status, Some(DataImportCronStatus::default()));
        let template = &crons[1].spec.template;
        assert_eq!(template.metadata, Some(Default::default()));
        assert_eq!(template.status, Some(Default::default()));
        let registry = template
            .spec
            .source
            .as_ref()
            .and_then(|s| s.registry.as_ref());
        assert_eq!(
            registry.and_then(|r| r.pull_method),
            Some(RegistryPullMethod::Node)
        );
        assert_eq!(
            crons[1].spec.managed_data_source,
            "user-defined-centos-stream8"
        );
    }

    #[test]
    fn y38_runbook_excerpt_storage() {
        // The excerpt flattens `source.registry.url` next to `storage`; decoded as a
        // DataVolume spec, the stray `url` is dropped and `storage` is intact.
        let value = yaml_to_json(Y38);
        let spec: crate::v1beta1::DataVolumeSpec =
            serde_json::from_value(value.clone()).expect("decodes");
        assert_round_trip(&value, &spec, &["/url"]);
        let storage = spec.storage.as_ref().expect("storage");
        assert_eq!(
            storage.storage_class_name.as_deref(),
            Some("rook-ceph-block")
        );
    }

    #[test]
    fn status_uses_upstream_json_names() {
        let yaml = r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataImportCron
metadata:
  name: fedora-image-cron
  namespace: golden-images
spec:
  template:
    spec:
      source:
        registry:
          url: docker://quay.io/containerdisks/fedora:latest
      storage:
        resources:
          requests:
            storage: 5Gi
  schedule: "30 1 * * 1"
  importsToKeep: 2
  garbageCollect: Never
  managedDataSource: fedora
  serviceAccountName: cron-sa
status:
  currentImports:
  - DataVolumeName: fedora-0123456789ab
    Digest: sha256:0123456789abcdef
  lastImportedPVC:
    namespace: golden-images
    name: fedora-0123456789ab
  lastExecutionTimestamp: "2024-05-01T01:30:00Z"
  lastImportTimestamp: "2024-05-01T01:35:12Z"
  sourceFormat: snapshot
  conditions:
  - type: UpToDate
    status: "True"
    reason: UpToDate
  - type: Progressing
    status: "False"
    reason: NoImport
"#;
        let value = yaml_to_json(yaml);
        let cron: DataImportCron = serde_json::from_value(value.clone()).expect("decodes");
        assert_round_trip(&value, &cron, &[]);
        let status = cron.status.as_ref().expect("status");
        let current = &status.current_imports.as_ref().expect("currentImports")[0];
        assert_eq!(current.data_volume_name, "fedora-0123456789ab");
        assert_eq!(current.digest, "sha256:0123456789abcdef");
        assert_eq!(
            status.last_imported_pvc.as_ref().map(|p| p.name.as_str()),
            Some("fedora-0123456789ab")
        );
        assert_eq!(
            status.source_format,
            Some(DataImportCronSourceFormat::Snapshot)
        );
        let conditions = status.conditions.as_ref().expect("conditions");
        assert_eq!(conditions[0].type_, DataImportCronConditionType::UpToDate);
        assert_eq!(cron.spec.imports_to_keep, Some(2));
        assert_eq!(
            cron.spec.garbage_collect,
            Some(DataImportCronGarbageCollect::Never)
        );
    }
}
