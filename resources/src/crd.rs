//! The `CustomResourceDefinition`s CDI installs, generated from the types.
//!
//! kube-derive produces one single-version CRD per type; this module merges the served
//! `v1alpha1` versions into the `v1beta1` CRDs and aligns the subresources with upstream's CRDs
//! (`pkg/operator/resources/crds_generated.go`): only DataVolume and StorageProfile have the
//! status subresource, so the controller writes the others' status with the object.

use kube::core::CustomResourceExt;
use kube::core::crd::merge_crds;

use crate::CustomResourceDefinition;
use crate::{V1BETA1, v1alpha1, v1beta1};

/// Every CRD CDI owns: DataVolume (v1beta1 storage, v1alpha1 served), StorageProfile,
/// CDIConfig (v1beta1 storage, v1alpha1 served), DataSource and DataImportCron.
/// VolumeSnapshot is not among them: the CSI snapshotter installs it.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        data_volume_crd(),
        storage_profile_crd(),
        cdi_config_crd(),
        data_source_crd(),
        data_import_cron_crd(),
    ]
}

/// `datavolumes.cdi.kubevirt.io`, serving v1beta1 (storage) and v1alpha1.
pub fn data_volume_crd() -> CustomResourceDefinition {
    with_served_version(v1beta1::DataVolume::crd(), v1alpha1::DataVolume::crd())
}

/// `storageprofiles.cdi.kubevirt.io` (cluster-scoped).
pub fn storage_profile_crd() -> CustomResourceDefinition {
    v1beta1::StorageProfile::crd()
}

/// `cdiconfigs.cdi.kubevirt.io` (cluster-scoped), serving v1beta1 (storage) and v1alpha1,
/// without the status subresource as upstream.
pub fn cdi_config_crd() -> CustomResourceDefinition {
    let crd = with_served_version(v1beta1::CDIConfig::crd(), v1alpha1::CDIConfig::crd());
    without_status_subresource(crd)
}

/// `datasources.cdi.kubevirt.io`, without the status subresource as upstream.
pub fn data_source_crd() -> CustomResourceDefinition {
    without_status_subresource(v1beta1::DataSource::crd())
}

/// `dataimportcrons.cdi.kubevirt.io`, without the status subresource as upstream.
pub fn data_import_cron_crd() -> CustomResourceDefinition {
    without_status_subresource(v1beta1::DataImportCron::crd())
}

/// Adds the one version of `served` to `storage`'s CRD, with `storage` staying the storage
/// version.
fn with_served_version(
    storage: CustomResourceDefinition,
    served: CustomResourceDefinition,
) -> CustomResourceDefinition {
    // merge_crds only fails on inputs that are not single-version CRDs of one group, kind and
    // scope. Both come from derives in this crate with identical attributes (the tests check
    // the merged result), so the error branch is unreachable; keeping the storage-only CRD
    // there still yields an installable definition instead of a panic.
    merge_crds(vec![storage.clone(), served], V1BETA1).unwrap_or(storage)
}

/// Drops the status subresource kube-derive adds whenever a type has a status.
fn without_status_subresource(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        version.subresources = None;
    }
    crd
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinitionVersion;
    use serde_json::Value;

    fn by_name(name: &str) -> CustomResourceDefinition {
        crds()
            .into_iter()
            .find(|crd| crd.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{name} is not in crds()"))
    }

    fn version<'a>(
        crd: &'a CustomResourceDefinition,
        name: &str,
    ) -> &'a CustomResourceDefinitionVersion {
        crd.spec
            .versions
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no version {name}"))
    }

    /// `(name, served, storage)` of each version, sorted by name.
    fn versions(crd: &CustomResourceDefinition) -> Vec<(String, bool, bool)> {
        let mut versions: Vec<_> = crd
            .spec
            .versions
            .iter()
            .map(|v| (v.name.clone(), v.served, v.storage))
            .collect();
        versions.sort();
        versions
    }

    fn has_status_subresource(version: &CustomResourceDefinitionVersion) -> bool {
        version
            .subresources
            .as_ref()
            .is_some_and(|s| s.status.is_some())
    }

    #[test]
    fn crd_list_names_and_scopes() {
        let names: Vec<_> = crds()
            .iter()
            .map(|crd| {
                (
                    crd.metadata.name.clone().unwrap_or_default(),
                    crd.spec.scope.clone(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                (
                    "datavolumes.cdi.kubevirt.io".to_string(),
                    "Namespaced".to_string()
                ),
                ("storageprofiles.cdi.kubevirt.io".into(), "Cluster".into()),
                ("cdiconfigs.cdi.kubevirt.io".into(), "Cluster".into()),
                ("datasources.cdi.kubevirt.io".into(), "Namespaced".into()),
                (
                    "dataimportcrons.cdi.kubevirt.io".into(),
                    "Namespaced".into()
                ),
            ]
        );
        for crd in crds() {
            assert_eq!(crd.spec.group, crate::GROUP);
            let names = &crd.spec.names;
            let expected = format!("{}.{}", names.plural, crate::GROUP);
            assert_eq!(crd.metadata.name.as_deref(), Some(expected.as_str()));
            assert_eq!(
                names.singular.as_deref(),
                Some(names.kind.to_ascii_lowercase().as_str())
            );
        }
    }

    #[test]
    fn data_volume_crd_matches_upstream() {
        let crd = by_name("datavolumes.cdi.kubevirt.io");
        let names = &crd.spec.names;
        assert_eq!(names.kind, "DataVolume");
        assert_eq!(names.plural, "datavolumes");
        assert_eq!(
            names.short_names.as_deref(),
            Some(&["dv".to_string(), "dvs".to_string()][..])
        );
        assert_eq!(names.categories.as_deref(), Some(&["all".to_string()][..]));
        assert_eq!(
            versions(&crd),
            [
                ("v1alpha1".to_string(), true, false),
                ("v1beta1".to_string(), true, true)
            ]
        );
        for name in ["v1beta1", "v1alpha1"] {
            let v = version(&crd, name);
            assert!(has_status_subresource(v), "{name}");
            let columns: Vec<_> = v
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| (c.name.as_str(), c.type_.as_str(), c.json_path.as_str()))
                .collect();
            assert_eq!(
                columns,
                [
                    ("Phase", "string", ".status.phase"),
                    ("Progress", "string", ".status.progress"),
                    ("Restarts", "integer", ".status.restartCount"),
                    ("Age", "date", ".metadata.creationTimestamp"),
                ],
                "{name}"
            );
        }
        // Both versions have the same shape, so the same schema.
        assert_eq!(
            version(&crd, "v1beta1").schema,
            version(&crd, "v1alpha1").schema
        );
    }

    #[test]
    fn cdi_config_crd_matches_upstream() {
        let crd = by_name("cdiconfigs.cdi.kubevirt.io");
        assert_eq!(crd.spec.names.kind, "CDIConfig");
        assert_eq!(crd.spec.names.plural, "cdiconfigs");
        assert_eq!(crd.spec.names.short_names, None);
        assert_eq!(
            versions(&crd),
            [
                ("v1alpha1".to_string(), true, false),
                ("v1beta1".to_string(), true, true)
            ]
        );
        assert!(crd.spec.versions.iter().all(|v| !has_status_subresource(v)));
        assert_eq!(
            version(&crd, "v1beta1").schema,
            version(&crd, "v1alpha1").schema
        );
    }

    #[test]
    fn remaining_crds_match_upstream() {
        let profile = by_name("storageprofiles.cdi.kubevirt.io");
        assert_eq!(profile.spec.names.kind, "StorageProfile");
        assert_eq!(profile.spec.names.short_names, None);
        assert_eq!(versions(&profile), [("v1beta1".to_string(), true, true)]);
        assert!(has_status_subresource(version(&profile, "v1beta1")));

        let source = by_name("datasources.cdi.kubevirt.io");
        assert_eq!(
            source.spec.names.short_names.as_deref(),
            Some(&["das".to_string()][..])
        );
        assert_eq!(
            source.spec.names.categories.as_deref(),
            Some(&["all".to_string()][..])
        );
        assert_eq!(versions(&source), [("v1beta1".to_string(), true, true)]);
        assert!(!has_status_subresource(version(&source, "v1beta1")));
        assert_eq!(version(&source, "v1beta1").additional_printer_columns, None);

        let cron = by_name("dataimportcrons.cdi.kubevirt.io");
        assert_eq!(
            cron.spec.names.short_names.as_deref(),
            Some(&["dic".to_string(), "dics".to_string()][..])
        );
        assert_eq!(
            cron.spec.names.categories.as_deref(),
            Some(&["all".to_string()][..])
        );
        assert_eq!(versions(&cron), [("v1beta1".to_string(), true, true)]);
        let v = version(&cron, "v1beta1");
        assert!(!has_status_subresource(v));
        let columns: Vec<_> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| (c.name.as_str(), c.type_.as_str(), c.json_path.as_str()))
            .collect();
        assert_eq!(columns, [("Format", "string", ".status.sourceFormat")]);
    }

    #[test]
    fn snapshot_kinds_are_not_installed() {
        assert!(
            crds()
                .iter()
                .all(|crd| crd.spec.group != crate::snapshot::SNAPSHOT_GROUP)
        );
    }

    /// Kubernetes' structural-schema rules, as far as a generator can break them: no `$ref` or
    /// definitions, a `type` on every node (unless it is int-or-string or preserves unknown
    /// fields), no `properties` beside `additionalProperties`, and logical junctors only where
    /// int-or-string allows them.
    fn structural_violations(schema: &Value, path: &str, out: &mut Vec<String>) {
        let Some(node) = schema.as_object() else {
            out.push(format!("{path}: schema is not an object"));
            return;
        };
        for forbidden in ["$ref", "$defs", "definitions", "$schema"] {
            if node.contains_key(forbidden) {
                out.push(format!("{path}: has {forbidden}"));
            }
        }
        let flag = |key: &str| node.get(key) == Some(&Value::Bool(true));
        let int_or_string = flag("x-kubernetes-int-or-string");
        let preserves = flag("x-kubernetes-preserve-unknown-fields");
        if !node.contains_key("type") && !int_or_string && !preserves {
            out.push(format!("{path}: no type"));
        }
        if !int_or_string {
            for junctor in ["anyOf", "oneOf", "allOf", "not"] {
                if node.contains_key(junctor) {
                    out.push(format!("{path}: has {junctor}"));
                }
            }
        }
        if node.contains_key("properties") && node.contains_key("additionalProperties") {
            out.push(format!("{path}: properties beside additionalProperties"));
        }
        if let Some(properties) = node.get("properties").and_then(Value::as_object) {
            for (name, property) in properties {
                structural_violations(property, &format!("{path}.{name}"), out);
            }
        }
        if let Some(items) = node.get("items") {
            structural_violations(items, &format!("{path}[]"), out);
        }
        match node.get("additionalProperties") {
            Some(Value::Bool(_)) | None => {}
            Some(values) => structural_violations(values, &format!("{path}{{}}"), out),
        }
    }

    #[test]
    fn every_schema_is_structural() {
        let mut checked = 0;
        for crd in crds() {
            for v in &crd.spec.versions {
                let schema = v
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .expect("every version has a schema");
                let schema = serde_json::to_value(schema).expect("schema serializes");
                let root = format!("{}/{}", crd.spec.names.kind, v.name);
                let mut violations = Vec::new();
                structural_violations(&schema, &root, &mut violations);
                assert_eq!(violations, Vec::<String>::new(), "{root}");
                for key in ["spec", "status"] {
                    assert_eq!(schema["properties"][key]["type"], "object", "{root}.{key}");
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 7);
    }

    #[test]
    fn structural_checker_catches_violations() {
        // The checker must be able to fail, or the test above proves nothing.
        let bad = serde_json::json!({
            "type": "object",
            "properties": {
                "a": {"$ref": "#/definitions/A"},
                "b": {"anyOf": [{"type": "string"}, {"type": "integer"}], "type": "string"},
                "c": {"type": "array", "items": {"description": "untyped"}},
                "d": {"type": "object", "additionalProperties": {"properties": {}}},
                "e": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]},
                "f": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}}
            }
        });
        let mut violations = Vec::new();
        structural_violations(&bad, "x", &mut violations);
        assert_eq!(
            violations,
            [
                "x.a: has $ref",
                "x.a: no type",
                "x.b: has anyOf",
                "x.c[]: no type",
                "x.d{}: no type",
                "x.f: properties beside additionalProperties",
            ]
        );
    }

    #[test]
    fn schemas_carry_the_upstream_shape() {
        let crd = by_name("datavolumes.cdi.kubevirt.io");
        let schema = version(&crd, "v1beta1")
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref());
        let schema = serde_json::to_value(schema).expect("schema");
        let spec = &schema["properties"]["spec"]["properties"];
        for field in [
            "source",
            "sourceRef",
            "pvc",
            "storage",
            "priorityClassName",
            "contentType",
            "checkpoints",
            "finalCheckpoint",
            "preallocation",
        ] {
            assert!(spec.get(field).is_some(), "spec.{field}");
        }
        assert_eq!(
            spec["contentType"]["enum"],
            serde_json::json!(["kubevirt", "archive"])
        );
        let pvc_source = &spec["source"]["properties"]["pvc"];
        assert_eq!(
            pvc_source["required"],
            serde_json::json!(["name", "namespace"])
        );
        assert_eq!(schema["required"], serde_json::json!(["spec"]));

        let cron = by_name("dataimportcrons.cdi.kubevirt.io");
        let schema = version(&cron, "v1beta1")
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref());
        let schema = serde_json::to_value(schema).expect("schema");
        let template_meta =
            &schema["properties"]["spec"]["properties"]["template"]["properties"]["metadata"];
        // The template's labels and annotations must survive the API server's pruning.
        assert_eq!(template_meta["x-kubernetes-preserve-unknown-fields"], true);
        let imports = &schema["properties"]["status"]["properties"]["currentImports"]["items"];
        assert_eq!(
            imports["required"],
            serde_json::json!(["DataVolumeName", "Digest"])
        );

        let config = by_name("cdiconfigs.cdi.kubevirt.io");
        let schema = version(&config, "v1beta1")
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref());
        let schema = serde_json::to_value(schema).expect("schema");
        let spec = &schema["properties"]["spec"]["properties"];
        for field in [
            "uploadProxyURLOverride",
            "dataVolumeTTLSeconds",
            "tlsSecurityProfile",
        ] {
            assert!(spec.get(field).is_some(), "spec.{field}");
        }
        let proxy = &spec["importProxy"]["properties"];
        for field in ["HTTPProxy", "HTTPSProxy", "noProxy", "trustedCAProxy"] {
            assert!(proxy.get(field).is_some(), "importProxy.{field}");
        }
        let overhead = &spec["filesystemOverhead"]["properties"];
        assert_eq!(overhead["global"]["pattern"], v1beta1::PERCENT_PATTERN);
        assert_eq!(
            overhead["storageClass"]["additionalProperties"]["pattern"],
            v1beta1::PERCENT_PATTERN
        );
    }
}
