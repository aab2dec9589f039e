//! The typed Kubernetes resources of CDI, shared by the controller, the embedded API server, the
//! CLI and the deploy generator.
//!
//! Field names and JSON spellings follow upstream's Go types
//! (`containerized-data-importer-api/pkg/apis/core/v1beta1/types.go`); every field upstream marks
//! `omitempty` is an `Option` here, so the documentation's manifests decode unchanged and
//! serialize back to the same JSON. Validation beyond shape (exactly one source, immutable spec)
//! belongs to the callers; these types only carry the data.
//!
//! - [`v1beta1`]: the storage version of every kind CDI owns.
//! - [`v1alpha1`]: the older `DataVolume` and `CDIConfig` versions the docs still apply, with
//!   identical shapes and identity conversions.
//! - [`snapshot`]: `VolumeSnapshot`/`VolumeSnapshotClass`, which CDI uses but does not install.
//! - [`annotations`]: the annotation and label keys that form upstream's internal contract.
//! - [`crds`]: the `CustomResourceDefinition`s CDI installs.
//!
//! This crate pulls in `kube` without its client or TLS stack, so depending on it stays cheap;
//! `k8s_openapi` and the `kube::core` pieces are re-exported so that users need no version pins
//! of their own.

pub mod annotations;
mod crd;
pub mod snapshot;
pub mod v1alpha1;
pub mod v1beta1;

pub use crd::{
    cdi_config_crd, crds, data_import_cron_crd, data_source_crd, data_volume_crd,
    storage_profile_crd,
};
pub use v1beta1::{CDIConfig, DataImportCron, DataSource, DataVolume, StorageProfile};

/// The `k8s-openapi` this crate is built against (API level `v1_33`), so callers need no pin.
pub use k8s_openapi;
/// `CustomResourceDefinition`, the type [`crds`] returns.
pub use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
/// The pieces of `kube-core` a user of these resources needs: metadata, the `Resource` traits,
/// dynamic objects, lists, scopes and CRD helpers.
pub use kube::core::{
    ApiResource, ClusterResourceScope, CustomResourceExt, DynamicObject, GroupVersionKind,
    ListMeta, NamespaceResourceScope, ObjectList, ObjectMeta, Resource, ResourceExt, TypeMeta,
    crd::merge_crds,
};

/// API group of every kind CDI owns.
pub const GROUP: &str = "cdi.kubevirt.io";
/// The storage version of CDI's kinds.
pub const V1BETA1: &str = "v1beta1";
/// The older version still served for `DataVolume` and `CDIConfig` (storage is `v1beta1`).
pub const V1ALPHA1: &str = "v1alpha1";
/// `apiVersion` of the storage version.
pub const API_VERSION_V1BETA1: &str = "cdi.kubevirt.io/v1beta1";
/// `apiVersion` of the older served version.
pub const API_VERSION_V1ALPHA1: &str = "cdi.kubevirt.io/v1alpha1";
/// Versions of `cdi.kubevirt.io` the control plane serves, storage version first.
pub const SERVED_VERSIONS: [&str; 2] = [V1BETA1, V1ALPHA1];

/// Splits an `apiVersion` into group and version (`"v1"` is the core group, `""`).
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.rsplit_once('/') {
        Some((group, version)) => (group, version),
        None => ("", api_version),
    }
}

/// Whether `api_version` names a version of `cdi.kubevirt.io` that is served.
pub fn is_served_cdi_api_version(api_version: &str) -> bool {
    let (group, version) = split_api_version(api_version);
    group == GROUP && SERVED_VERSIONS.contains(&version)
}

#[cfg(test)]
mod test_support;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_version_constants_agree_with_the_derived_types() {
        assert_eq!(DataVolume::api_version(&()), API_VERSION_V1BETA1);
        assert_eq!(v1alpha1::DataVolume::api_version(&()), API_VERSION_V1ALPHA1);
        assert_eq!(DataVolume::group(&()), GROUP);
        assert_eq!(CDIConfig::version(&()), V1BETA1);
        assert_eq!(v1alpha1::CDIConfig::version(&()), V1ALPHA1);
        assert_eq!(format!("{GROUP}/{V1BETA1}"), API_VERSION_V1BETA1);
        assert_eq!(format!("{GROUP}/{V1ALPHA1}"), API_VERSION_V1ALPHA1);
    }

    #[test]
    fn api_versions_split_and_match() {
        assert_eq!(
            split_api_version("cdi.kubevirt.io/v1beta1"),
            ("cdi.kubevirt.io", "v1beta1")
        );
        assert_eq!(split_api_version("v1"), ("", "v1"));
        assert!(is_served_cdi_api_version(API_VERSION_V1ALPHA1));
        assert!(is_served_cdi_api_version(API_VERSION_V1BETA1));
        assert!(!is_served_cdi_api_version("cdi.kubevirt.io/v1"));
        assert!(!is_served_cdi_api_version(
            "snapshot.storage.k8s.io/v1beta1"
        ));
        assert!(!is_served_cdi_api_version("v1beta1"));
    }
}
