//! `CDIConfig`: the cluster-wide user configuration of CDI (singleton named `config`).
//!
//! Users set `spec`; the controller publishes the effective values (defaults filled in, upload
//! proxy URL discovered) in `status`, which the workers and the DataVolume controller read.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{LocalObjectReference, ResourceRequirements};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Name of the one CDIConfig the controller reads.
pub const CDI_CONFIG_NAME: &str = "config";

/// The user's configuration.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cdi.kubevirt.io",
    version = "v1beta1",
    kind = "CDIConfig",
    plural = "cdiconfigs",
    singular = "cdiconfig",
    status = "CDIConfigStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "CDIConfig provides a user configuration for CDI"
)]
#[serde(rename_all = "camelCase")]
pub struct CDIConfigSpec {
    /// URL clients should use to reach the upload proxy, instead of the discovered one.
    #[serde(
        rename = "uploadProxyURLOverride",
        skip_serializing_if = "Option::is_none"
    )]
    pub upload_proxy_url_override: Option<String>,
    /// Proxy settings passed to importer pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub import_proxy: Option<ImportProxy>,
    /// StorageClass for scratch space; else the default class, else the target's class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scratch_space_storage_class: Option<String>,
    /// Requests and limits of CDI's worker pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_resource_requirements: Option<ResourceRequirements>,
    /// Enabled feature gates (e.g. `HonorWaitForFirstConsumer`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature_gates: Option<Vec<String>>,
    /// Whether the PVC mutating webhook completes claims from StorageProfiles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_pvc_rendering: Option<WebhookPvcRenderingPolicy>,
    /// Space reserved for filesystem overhead on Filesystem-mode volumes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem_overhead: Option<FilesystemOverhead>,
    /// Default of `DataVolume.spec.preallocation`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preallocation: Option<bool>,
    /// Registries reached without TLS verification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure_registries: Option<Vec<String>>,
    /// Deprecated upstream (removed in v1.62): seconds after completion before a DataVolume
    /// was garbage collected. Kept so existing objects decode.
    #[serde(
        rename = "dataVolumeTTLSeconds",
        skip_serializing_if = "Option::is_none"
    )]
    pub data_volume_ttl_seconds: Option<i32>,
    /// TLS ciphers and minimum version for CDI's servers.
    #[serde(rename = "tlsSecurityProfile", skip_serializing_if = "Option::is_none")]
    pub tls_security_profile: Option<TLSSecurityProfile>,
    /// Pull secrets for CDI's worker images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// Log verbosity of CDI's components.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_verbosity: Option<i32>,
}

/// The effective configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CDIConfigStatus {
    /// URL of the upload proxy (override, or discovered from an Ingress/Route).
    #[serde(rename = "uploadProxyURL", skip_serializing_if = "Option::is_none")]
    pub upload_proxy_url: Option<String>,
    /// CA certificate of the upload proxy.
    #[serde(rename = "uploadProxyCA", skip_serializing_if = "Option::is_none")]
    pub upload_proxy_ca: Option<String>,
    /// Effective importer proxy settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub import_proxy: Option<ImportProxy>,
    /// Effective scratch-space StorageClass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scratch_space_storage_class: Option<String>,
    /// Effective requests and limits of worker pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_pod_resource_requirements: Option<ResourceRequirements>,
    /// Effective filesystem overhead, global and per class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem_overhead: Option<FilesystemOverhead>,
    /// Effective preallocation default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preallocation: Option<bool>,
    /// Effective pull secrets of worker images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
}

/// Importer proxy settings. The JSON names are upstream's (`HTTPProxy`, `HTTPSProxy`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ImportProxy {
    /// Proxy URL for HTTP requests; empty means unset.
    #[serde(rename = "HTTPProxy", skip_serializing_if = "Option::is_none")]
    pub http_proxy: Option<String>,
    /// Proxy URL for HTTPS requests; empty means unset.
    #[serde(rename = "HTTPSProxy", skip_serializing_if = "Option::is_none")]
    pub https_proxy: Option<String>,
    /// Comma-separated host names and CIDRs reached without the proxy.
    #[serde(rename = "noProxy", skip_serializing_if = "Option::is_none")]
    pub no_proxy: Option<String>,
    /// ConfigMap (in CDI's namespace) with the CA bundle of the proxy.
    #[serde(rename = "trustedCAProxy", skip_serializing_if = "Option::is_none")]
    pub trusted_ca_proxy: Option<String>,
}

/// Space reserved on Filesystem-mode volumes for the filesystem itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FilesystemOverhead {
    /// Fraction used by classes without their own value (e.g. `"0.055"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global: Option<Percent>,
    /// Per-StorageClass fractions, overriding `global`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<BTreeMap<String, Percent>>,
}

/// A fraction in `[0, 1]` written as a string (`"0.07"` is 7 %), as upstream's `Percent`.
/// The schema carries upstream's pattern; the arithmetic lives in `cdi-api`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Percent(pub String);

/// Upstream's `Percent` pattern: `0`, `0.` with up to three decimals, or `1`.
pub const PERCENT_PATTERN: &str = r"^(0(?:\.\d{1,3})?|1)$";

impl Percent {
    /// The fraction as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Percent {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl JsonSchema for Percent {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Percent".into()
    }

    fn json_schema(_generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": PERCENT_PATTERN,
        })
    }
}

/// Whether the PVC mutating webhook renders claims from StorageProfiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum WebhookPvcRenderingPolicy {
    /// The webhook completes labelled PVCs (upstream's default).
    Enabled,
    /// Only PVCs made for DataVolumes are rendered, by the controller.
    Disabled,
}

/// TLS settings for CDI's servers, as OpenShift's `TLSSecurityProfile`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TLSSecurityProfile {
    /// Which profile applies; only `custom` carries parameters.
    #[serde(rename = "type")]
    pub type_: TLSProfileType,
    /// Mozilla's "old" profile (no parameters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old: Option<PredefinedTLSProfile>,
    /// Mozilla's "intermediate" profile (no parameters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intermediate: Option<PredefinedTLSProfile>,
    /// Mozilla's "modern" profile (no parameters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modern: Option<PredefinedTLSProfile>,
    /// User-chosen ciphers and minimum version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom: Option<TLSProfileSpec>,
}

/// Marker of a predefined TLS profile (upstream's empty `OldTLSProfile` and siblings).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PredefinedTLSProfile {}

/// The TLS profile kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum TLSProfileType {
    /// Mozilla "old": TLS 1.0 and broad ciphers.
    Old,
    /// Mozilla "intermediate": TLS 1.2.
    Intermediate,
    /// Mozilla "modern": TLS 1.3 only.
    Modern,
    /// `custom` gives the ciphers and version.
    Custom,
}

/// Ciphers and minimum protocol version of a custom TLS profile.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TLSProfileSpec {
    /// Cipher names, OpenSSL spelling for TLS ≤ 1.2 and IANA spelling for 1.3.
    pub ciphers: Vec<String>,
    /// `VersionTLS10` … `VersionTLS13`.
    #[serde(rename = "minTLSVersion")]
    pub min_tls_version: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{assert_round_trip, yaml_to_json};

    /// Y26 (mission-requirements.md), verbatim: a CDIConfig `spec` excerpt.
    const Y26: &str = r#"
# ...
spec:
  filesystemOverhead:
    global: "<new_global_value>"
    storageClass:
      <storage_class_name>: "<new_value_for_this_storage_class>"
"#;

    #[test]
    fn y26_filesystem_overhead_excerpt() {
        let value = yaml_to_json(Y26);
        let spec: CDIConfigSpec = serde_json::from_value(value["spec"].clone()).expect("spec");
        assert_round_trip(&value["spec"], &spec, &[]);
        let overhead = spec
            .filesystem_overhead
            .as_ref()
            .expect("filesystemOverhead");
        assert_eq!(
            overhead.global.as_ref().map(Percent::as_str),
            Some("<new_global_value>")
        );
        let per_class = overhead.storage_class.as_ref().expect("storageClass");
        assert_eq!(
            per_class["<storage_class_name>"].as_str(),
            "<new_value_for_this_storage_class>"
        );
    }

    #[test]
    fn full_config_round_trips_with_upstream_json_names() {
        let yaml = r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: CDIConfig
metadata:
  name: config
spec:
  uploadProxyURLOverride: https://cdi-uploadproxy.example.com
  importProxy:
    HTTPProxy: http://proxy:3128
    HTTPSProxy: http://proxy:3128
    noProxy: .cluster.local,10.0.0.0/8
    trustedCAProxy: proxy-ca
  scratchSpaceStorageClass: local
  podResourceRequirements:
    limits:
      cpu: 750m
      memory: 600M
    requests:
      cpu: 100m
      memory: 60M
  featureGates: [HonorWaitForFirstConsumer]
  webhookPvcRendering: Disabled
  filesystemOverhead:
    global: "0.07"
    storageClass:
      mystorageclass: "0.04"
  preallocation: true
  insecureRegistries: ["private-registry-example-1:5000"]
  dataVolumeTTLSeconds: -1
  tlsSecurityProfile:
    type: Custom
    custom:
      ciphers: [ECDHE-RSA-AES128-GCM-SHA256]
      minTLSVersion: VersionTLS12
  imagePullSecrets:
  - name: pull
  logVerbosity: 3
status:
  uploadProxyURL: https://cdi-uploadproxy.example.com
  uploadProxyCA: "-----BEGIN CERTIFICATE-----"
  importProxy:
    HTTPProxy: http://proxy:3128
  scratchSpaceStorageClass: local
  defaultPodResourceRequirements:
    requests:
      cpu: "0"
  filesystemOverhead:
    global: "0.055"
    storageClass:
      local: "0.055"
  preallocation: false
  imagePullSecrets:
  - name: pull
"#;
        let value = yaml_to_json(yaml);
        let config: CDIConfig = serde_json::from_value(value.clone()).expect("decodes");
        assert_round_trip(&value, &config, &[]);
        let spec = &config.spec;
        let proxy = spec.import_proxy.as_ref().expect("importProxy");
        assert_eq!(proxy.http_proxy.as_deref(), Some("http://proxy:3128"));
        assert_eq!(proxy.trusted_ca_proxy.as_deref(), Some("proxy-ca"));
        assert_eq!(spec.data_volume_ttl_seconds, Some(-1));
        let tls = spec.tls_security_profile.as_ref().expect("tls");
        assert_eq!(tls.type_, TLSProfileType::Custom);
        assert_eq!(
            tls.custom.as_ref().map(|c| c.min_tls_version.as_str()),
            Some("VersionTLS12")
        );
        let status = config.status.as_ref().expect("status");
        assert_eq!(
            status.upload_proxy_url.as_deref(),
            Some("https://cdi-uploadproxy.example.com")
        );
        assert_eq!(status.preallocation, Some(false));
    }

    #[test]
    fn percent_schema_carries_upstreams_pattern() {
        // The API server enforces the pattern; the schema must carry it as upstream's CRD does.
        let schema = serde_json::to_value(schemars::schema_for!(Percent)).expect("schema");
        assert_eq!(schema["pattern"], PERCENT_PATTERN);
        assert_eq!(schema["type"], "string");
    }
}
