//! Spec builders: the objects the controller creates, as pure functions returning
//! `k8s-openapi` values.
//!
//! | builder | upstream |
//! |---|---|
//! | [`target_pvc`] | `renderPvcSpec` + `newPersistentVolumeClaim` + `Update*Annotations` |
//! | [`scratch_pvc`] | `newScratchPersistentVolumeClaimSpec` + `createScratchPersistentVolumeClaim` |
//! | [`importer_pod`] | `makeImporterPodSpec` + `makeImportEnv` |
//! | [`upload_pod`] | `makeUploadPodSpec` |
//! | [`upload_service`] | `makeUploadServiceSpec` |
//! | [`upload_secret`] | `ensureCertSecret` |
//!
//! Inputs that upstream reads from the API on the way (CDIConfig status, the StorageProfile,
//! the chosen storage class) are parameters here, so every field can be unit-tested.

use std::collections::BTreeMap;

use cdi_api::env as e;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, Probe, SeccompProfile,
    Secret, SecretKeySelector, SecretVolumeSource, SecurityContext, Service, ServicePort,
    ServiceSpec, Volume, VolumeDevice, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::decide::{self, requested_size, volume_mode};
use crate::model::{ConfigView, DvView, ProfileView};
use crate::names::{self, ann, label, pod as paths};

/// The worker image and how pods run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    /// The one CDI image (importer and upload server entry points).
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    pub pull_policy: String,
    /// `-v=<n>` passed to the workers.
    pub verbosity: u8,
}

/// Why a claim cannot be rendered from a DataVolume (event `ErrClaimNotValid`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// Neither `spec.pvc` nor `spec.storage`.
    #[error("DataVolume spec is missing: one of spec.pvc or spec.storage is required")]
    NoStorage,
    /// Archive content on a Block volume.
    #[error("ContentType Archive cannot have block volumeMode")]
    ArchiveOnBlock,
    /// No storage class given and none is default.
    #[error("DataVolume.storage spec is missing accessMode and no storageClass to choose profile")]
    NoStorageClass,
    /// The StorageProfile offers no access modes.
    #[error(
        "DataVolume.storage spec is missing accessMode and volumeMode, cannot get access mode from StorageProfile {0}"
    )]
    NoAccessModes(String),
    /// No size requested.
    #[error("PVC Spec is not valid - missing storage size")]
    NoSize,
    /// Unparseable or too small size.
    #[error("PVC Spec is not valid - {0}")]
    BadSize(String),
    /// The claim's import annotations are incomplete.
    #[error("annotation {0:?} is missing on the claim")]
    MissingAnnotation(&'static str),
}

fn controller_ref(api_version: &str, kind: &str, name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: api_version.to_string(),
        kind: kind.to_string(),
        name: name.to_string(),
        uid: uid.to_string(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Controller reference to a DataVolume.
pub fn dv_owner_ref(dv: &DvView) -> OwnerReference {
    controller_ref("cdi.kubevirt.io/v1beta1", "DataVolume", dv.name(), dv.uid())
}

/// Controller reference to a claim (upstream `MakePVCOwnerReference`).
pub fn pvc_owner_ref(pvc: &PersistentVolumeClaim) -> OwnerReference {
    controller_ref(
        "v1",
        "PersistentVolumeClaim",
        pvc.metadata.name.as_deref().unwrap_or(""),
        pvc.metadata.uid.as_deref().unwrap_or(""),
    )
}

/// Controller reference to a pod (upstream `MakePodOwnerReference`).
pub fn pod_owner_ref(pod: &Pod) -> OwnerReference {
    controller_ref(
        "v1",
        "Pod",
        pod.metadata.name.as_deref().unwrap_or(""),
        pod.metadata.uid.as_deref().unwrap_or(""),
    )
}

fn storage_request(spec: &PersistentVolumeClaimSpec) -> Option<String> {
    spec.resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .map(|q| q.0.clone())
}

fn set_storage_request(spec: &mut PersistentVolumeClaimSpec, bytes: u64) {
    let res = spec
        .resources
        .get_or_insert_with(VolumeResourceRequirements::default);
    res.requests
        .get_or_insert_with(BTreeMap::new)
        .insert("storage".into(), Quantity(bytes.to_string()));
}

/// The claim spec for a DataVolume: `spec.pvc` verbatim, or `spec.storage` completed from the
/// StorageProfile (access and volume modes from `claimPropertySets`) and inflated by the
/// filesystem overhead (upstream `renderPvcSpec`). `class` is the storage class to use when
/// `spec.storage` names none (the caller picks the default class).
pub fn render_claim_spec(
    dv: &DvView,
    class: Option<&str>,
    profile: Option<&ProfileView>,
    config: &ConfigView,
) -> Result<PersistentVolumeClaimSpec, ClaimError> {
    if let Some(pvc) = &dv.spec.pvc {
        return Ok(pvc.clone());
    }
    let mut spec = dv.spec.storage.clone().ok_or(ClaimError::NoStorage)?;
    if spec.volume_mode.as_deref() == Some("FromStorageProfile") {
        spec.volume_mode = None;
    }
    if dv.spec.content_type() == "archive" {
        if spec.volume_mode.as_deref() == Some("Block") {
            return Err(ClaimError::ArchiveOnBlock);
        }
        spec.volume_mode = Some("Filesystem".into());
    }
    let class = spec
        .storage_class_name
        .clone()
        .filter(|c| !c.is_empty())
        .or_else(|| class.map(str::to_string));
    let access_modes = spec.access_modes.clone().unwrap_or_default();
    if class.is_none() && access_modes.is_empty() {
        return Err(ClaimError::NoStorageClass);
    }
    if let Some(class) = &class {
        spec.storage_class_name = Some(class.clone());
        let sets = profile
            .map(|p| p.status.claim_property_sets.as_slice())
            .unwrap_or_default();
        match (spec.volume_mode.is_none(), access_modes.is_empty()) {
            (true, true) => {
                let first = sets
                    .first()
                    .filter(|s| !s.access_modes.is_empty())
                    .ok_or_else(|| ClaimError::NoAccessModes(class.clone()))?;
                spec.access_modes = Some(first.access_modes.clone());
                spec.volume_mode = first.volume_mode.clone();
            }
            (false, true) => {
                let mode = spec.volume_mode.clone();
                let set = sets
                    .iter()
                    .find(|s| s.volume_mode == mode && !s.access_modes.is_empty())
                    .ok_or_else(|| ClaimError::NoAccessModes(class.clone()))?;
                spec.access_modes = Some(set.access_modes.clone());
            }
            (true, false) => {
                // Optional: a set sharing an access mode gives the mode, else the default.
                spec.volume_mode = sets
                    .iter()
                    .find(|s| s.access_modes.iter().any(|m| access_modes.contains(m)))
                    .and_then(|s| s.volume_mode.clone());
            }
            (false, false) => {}
        }
    }
    let text = storage_request(&spec).ok_or(ClaimError::NoSize)?;
    let size = cdi_api::quantity::parse_bytes(&text)
        .map_err(|err| ClaimError::BadSize(format!("storage size {text:?}: {err}")))?;
    if size < crate::validate::MIN_PVC_SIZE {
        return Err(ClaimError::BadSize(
            "storage size should be at least 1MiB".into(),
        ));
    }
    let mut inflated = if spec.volume_mode.as_deref().unwrap_or("Filesystem") == "Filesystem" {
        let overhead = config.overhead_for(class.as_deref());
        let overhead = cdi_api::overhead::parse_overhead(&overhead).unwrap_or(0.0);
        cdi_api::overhead::required_space(overhead, size)
    } else {
        size
    };
    if let Some(min) = profile
        .and_then(|p| p.metadata.annotations.as_ref())
        .and_then(|a| a.get(ann::MINIMUM_SUPPORTED_PVC_SIZE))
        .and_then(|m| cdi_api::quantity::parse_bytes(m).ok())
    {
        inflated = inflated.max(min);
    }
    set_storage_request(&mut spec, inflated);
    Ok(spec)
}

/// Source annotations of an import DataVolume (upstream `Update{HTTP,S3,GCS,Registry,…}Annotations`).
fn source_annotations(dv: &DvView, anns: &mut BTreeMap<String, String>) {
    let Some(src) = &dv.spec.source else { return };
    let mut put = |k: &str, v: &str| {
        anns.insert(k.to_string(), v.to_string());
    };
    let opt = |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty()).map(str::to_string);
    if let Some(h) = &src.http {
        put(ann::ENDPOINT, &h.url);
        put(ann::SOURCE, "http");
        if let Some(s) = opt(&h.secret_ref) {
            put(ann::SECRET, &s);
        }
        if let Some(c) = opt(&h.cert_config_map) {
            put(ann::CERT_CONFIG_MAP, &c);
        }
        if let Some(c) = opt(&h.checksum) {
            put(ann::CHECKSUM, &c);
        }
        if h.insecure_skip_verify == Some(true) {
            put(ann::INSECURE_SKIP_VERIFY, "true");
        }
        for (i, hdr) in h.extra_headers.iter().enumerate() {
            put(&format!("{}.{i}", ann::EXTRA_HEADERS), hdr);
        }
        for (i, hdr) in h.secret_extra_headers.iter().enumerate() {
            put(&format!("{}.{i}", ann::SECRET_EXTRA_HEADERS), hdr);
        }
    } else if let Some(h) = &src.s3 {
        put(ann::ENDPOINT, &h.url);
        put(ann::SOURCE, "s3");
        if let Some(s) = opt(&h.secret_ref) {
            put(ann::SECRET, &s);
        }
        if let Some(c) = opt(&h.cert_config_map) {
            put(ann::CERT_CONFIG_MAP, &c);
        }
    } else if let Some(h) = &src.gcs {
        put(ann::ENDPOINT, &h.url);
        put(ann::SOURCE, "gcs");
        if let Some(s) = opt(&h.secret_ref) {
            put(ann::SECRET, &s);
        }
    } else if let Some(r) = &src.registry {
        put(ann::SOURCE, "registry");
        if let Some(m) = opt(&r.pull_method) {
            put(ann::REGISTRY_IMPORT_METHOD, &m);
        }
        if let Some(u) = opt(&r.url) {
            put(ann::ENDPOINT, &u);
        } else if let Some(is) = opt(&r.image_stream) {
            put(ann::ENDPOINT, &is);
            put(ann::REGISTRY_IMAGE_STREAM, "true");
        }
        if let Some(s) = opt(&r.secret_ref) {
            put(ann::SECRET, &s);
        }
        if let Some(c) = opt(&r.cert_config_map) {
            put(ann::CERT_CONFIG_MAP, &c);
        }
        if let Some(a) = r.platform.as_ref().and_then(|p| opt(&p.architecture)) {
            put(ann::REGISTRY_IMAGE_ARCHITECTURE, &a);
        }
    } else if let Some(i) = &src.imageio {
        put(ann::ENDPOINT, &i.url);
        put(ann::SOURCE, "imageio");
        put(ann::DISK_ID, &i.disk_id);
        if let Some(s) = opt(&i.secret_ref) {
            put(ann::SECRET, &s);
        }
        if let Some(c) = opt(&i.cert_config_map) {
            put(ann::CERT_CONFIG_MAP, &c);
        }
        if i.insecure_skip_verify == Some(true) {
            put(ann::INSECURE_SKIP_VERIFY, "true");
        }
    } else if let Some(v) = &src.vddk {
        put(ann::ENDPOINT, &v.url);
        put(ann::SOURCE, "vddk");
        put(ann::SECRET, &v.secret_ref);
        put(ann::BACKING_FILE, &v.backing_file);
        put(ann::UUID, &v.uuid);
        put(ann::THUMBPRINT, &v.thumbprint);
    } else if src.blank.is_some() {
        put(ann::SOURCE, "none");
    } else if src.upload.is_some() {
        put(ann::UPLOAD_REQUEST, "");
    }
}

/// The target claim of a DataVolume: named like it, in its namespace, with upstream's labels
/// and annotations and a controller reference to the DataVolume.
pub fn target_pvc(
    dv: &DvView,
    class: Option<&str>,
    profile: Option<&ProfileView>,
    config: &ConfigView,
) -> Result<PersistentVolumeClaim, ClaimError> {
    let spec = render_claim_spec(dv, class, profile, config)?;
    let mut labels = BTreeMap::from([(label::APP.to_string(), label::APP_VALUE.to_string())]);
    if spec.volume_mode.as_deref().unwrap_or("Filesystem") == "Filesystem" {
        labels.insert(
            label::FILLING_UP_SUPPRESS.into(),
            label::FILLING_UP_SUPPRESS_VALUE.into(),
        );
    }
    for (k, v) in dv.metadata.labels.iter().flatten() {
        labels.insert(k.clone(), v.clone());
    }
    let mut anns: BTreeMap<String, String> = dv.metadata.annotations.clone().unwrap_or_default();
    // Upstream's "delayed" annotation: only set once the DataVolume succeeded.
    anns.remove(ann::POPULATED_FOR);
    anns.insert(ann::POD_RESTARTS.into(), "0".into());
    anns.insert(ann::CONTENT_TYPE.into(), dv.spec.content_type().into());
    if let Some(p) = dv
        .spec
        .priority_class_name
        .as_deref()
        .filter(|p| !p.is_empty())
    {
        anns.insert(ann::PRIORITY_CLASS_NAME.into(), p.into());
    }
    if let Some(s) = dv
        .spec
        .service_account_name
        .as_deref()
        .filter(|s| !s.is_empty())
    {
        anns.insert(ann::POD_SERVICE_ACCOUNT.into(), s.into());
    }
    let prealloc = dv.spec.preallocation.unwrap_or(config.status.preallocation);
    anns.insert(ann::PREALLOCATION_REQUESTED.into(), prealloc.to_string());
    anns.insert(ann::CREATED_FOR_DATA_VOLUME.into(), dv.uid().into());
    source_annotations(dv, &mut anns);
    Ok(PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(dv.name().to_string()),
            namespace: Some(dv.namespace().to_string()),
            labels: Some(labels),
            annotations: Some(anns),
            owner_references: Some(vec![dv_owner_ref(dv)]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// Storage class of a scratch claim: CDIConfig's `scratchSpaceStorageClass`, else the
/// target's class (upstream `GetScratchPvcStorageClass`).
pub fn scratch_class(pvc: &PersistentVolumeClaim, config: &ConfigView) -> Option<String> {
    config
        .status
        .scratch_space_storage_class
        .clone()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            pvc.spec
                .as_ref()
                .and_then(|s| s.storage_class_name.clone())
                .filter(|c| !c.is_empty())
        })
}

/// The scratch claim `<pvc>-scratch` of a worker pod: Filesystem, RWO, owned by the pod, big
/// enough for the image the target can hold plus the scratch class's own overhead.
pub fn scratch_pvc(
    pvc: &PersistentVolumeClaim,
    pod: &Pod,
    config: &ConfigView,
) -> PersistentVolumeClaim {
    let name = names::scratch_pvc_name(pvc.metadata.name.as_deref().unwrap_or(""));
    let class = scratch_class(pvc, config);
    let mut anns = BTreeMap::new();
    // kubevirt.io annotations travel, CDI's would start another import on the scratch claim.
    for (k, v) in pvc.metadata.annotations.iter().flatten() {
        if k.contains("kubevirt.io") && !k.contains("cdi.kubevirt.io") {
            anns.insert(k.clone(), v.clone());
        }
    }
    let size = requested_size(pvc)
        .and_then(|s| cdi_api::quantity::parse_bytes(&s).ok())
        .unwrap_or(0);
    let parse = |o: String| cdi_api::overhead::parse_overhead(&o).unwrap_or(0.0);
    let target_overhead = if volume_mode(pvc) == "Filesystem" {
        parse(
            config.overhead_for(
                pvc.spec
                    .as_ref()
                    .and_then(|s| s.storage_class_name.as_deref()),
            ),
        )
    } else {
        0.0
    };
    let scratch_overhead = parse(config.overhead_for(class.as_deref()));
    let expected = cdi_api::overhead::usable_space(target_overhead, size);
    let raw = cdi_api::overhead::required_space(scratch_overhead, expected);
    let bytes = raw.div_ceil(cdi_api::overhead::ALIGN) * cdi_api::overhead::ALIGN;
    let mut spec = PersistentVolumeClaimSpec {
        access_modes: Some(vec!["ReadWriteOnce".into()]),
        storage_class_name: class,
        ..Default::default()
    };
    set_storage_request(&mut spec, bytes);
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: pvc.metadata.namespace.clone(),
            labels: Some(BTreeMap::from([
                (label::APP.to_string(), label::APP_VALUE.to_string()),
                (
                    label::EXCLUDE_FROM_VELERO_BACKUP.to_string(),
                    "true".to_string(),
                ),
            ])),
            annotations: Some(anns),
            owner_references: Some(vec![pod_owner_ref(pod)]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_string(),
                key: key.to_string(),
                optional: None,
            }),
            ..Default::default()
        }),
    }
}

fn pvc_ann<'a>(pvc: &'a PersistentVolumeClaim, key: &str) -> &'a str {
    pvc.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
        .unwrap_or("")
}

/// Annotation values whose keys start with `prefix.` ordered by their numeric suffix (upstream
/// iterates a Go map here, so its order is random; ours is the DataVolume's).
fn indexed(pvc: &PersistentVolumeClaim, prefix: &str) -> Vec<String> {
    let mut v: Vec<(u64, String)> = pvc
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter_map(|(k, val)| {
            let idx = k.strip_prefix(prefix)?.strip_prefix('.')?.parse().ok()?;
            Some((idx, val.clone()))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, s)| s).collect()
}

/// Upstream `IsInsecureTLS` + the insecureSkipVerify annotation.
fn insecure_tls(pvc: &PersistentVolumeClaim, config: &ConfigView) -> bool {
    let source = pvc_ann(pvc, ann::SOURCE);
    if (source == "http" || source == "imageio")
        && pvc_ann(pvc, ann::INSECURE_SKIP_VERIFY) == "true"
    {
        return true;
    }
    let Ok(url) = url::Url::parse(pvc_ann(pvc, ann::ENDPOINT)) else {
        return false;
    };
    if url.scheme() != "docker" {
        return false;
    }
    let host = match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => return false,
    };
    config.spec.insecure_registries.contains(&host)
}

/// UID of the progress metric's `ownerUID` label: the DataVolume's when the claim has exactly
/// one owner, else the claim's (upstream `getOwnerUID`).
pub fn owner_uid(pvc: &PersistentVolumeClaim) -> String {
    match pvc.metadata.owner_references.as_deref() {
        Some([one]) => one.uid.clone(),
        _ => pvc.metadata.uid.clone().unwrap_or_default(),
    }
}

/// The importer's environment, in upstream's order (`makeImportEnv`).
pub fn import_env(
    pvc: &PersistentVolumeClaim,
    config: &ConfigView,
) -> Result<Vec<EnvVar>, ClaimError> {
    let source = decide::import_source(pvc);
    let none = source == "none";
    let endpoint = pvc_ann(pvc, ann::ENDPOINT);
    if !none && endpoint.is_empty() {
        return Err(ClaimError::MissingAnnotation(ann::ENDPOINT));
    }
    let content_type = match pvc_ann(pvc, ann::CONTENT_TYPE) {
        "archive" => "archive",
        _ => "kubevirt",
    };
    let class = pvc
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref());
    let overhead = if volume_mode(pvc) == "Filesystem" {
        config.overhead_for(class)
    } else {
        "0".to_string()
    };
    let prealloc = pvc_ann(pvc, ann::PREALLOCATION_REQUESTED) == "true";
    let proxy = config.status.import_proxy.clone().unwrap_or_default();
    let import_only = !none;
    // A blank image has no source: upstream leaves every source variable empty for it.
    let val = |k: &str| -> String {
        if none {
            String::new()
        } else {
            pvc_ann(pvc, k).to_string()
        }
    };
    let proxy_val = |v: &Option<String>| -> String {
        if import_only {
            v.clone().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let cache_mode = if pvc_ann(pvc, ann::REQUIRES_DIRECT_IO) == "true" {
        "TRYNONE"
    } else {
        ""
    };
    let mut vars = vec![
        env(e::IMPORTER_SOURCE, source),
        env(e::IMPORTER_ENDPOINT, if none { "" } else { endpoint }),
        env(e::IMPORTER_CONTENTTYPE, content_type),
        env(
            e::IMPORTER_IMAGE_SIZE,
            requested_size(pvc).unwrap_or_default(),
        ),
        env(e::OWNER_UID, owner_uid(pvc)),
        env(e::FILESYSTEM_OVERHEAD, overhead),
        env(
            e::INSECURE_TLS,
            (import_only && insecure_tls(pvc, config)).to_string(),
        ),
        env("IMPORTER_DISK_ID", val(ann::DISK_ID)),
        env("IMPORTER_UUID", val(ann::UUID)),
        env("IMPORTER_PULL_METHOD", ""),
        env("IMPORTER_READY_FILE", ""),
        env("IMPORTER_DONE_FILE", ""),
        env("IMPORTER_BACKING_FILE", val(ann::BACKING_FILE)),
        env("IMPORTER_THUMBPRINT", val(ann::THUMBPRINT)),
        env("http_proxy", proxy_val(&proxy.http_proxy)),
        env("https_proxy", proxy_val(&proxy.https_proxy)),
        env("no_proxy", proxy_val(&proxy.no_proxy)),
        env("IMPORTER_CURRENT_CHECKPOINT", val(ann::CURRENT_CHECKPOINT)),
        env(
            "IMPORTER_PREVIOUS_CHECKPOINT",
            val(ann::PREVIOUS_CHECKPOINT),
        ),
        env("IMPORTER_FINAL_CHECKPOINT", val(ann::FINAL_CHECKPOINT)),
        env(e::PREALLOCATION, prealloc.to_string()),
        env("CACHE_MODE", cache_mode),
        env(
            e::IMPORTER_REGISTRY_IMAGE_ARCHITECTURE,
            val(ann::REGISTRY_IMAGE_ARCHITECTURE),
        ),
        env(e::IMPORTER_CHECKSUM, val(ann::CHECKSUM)),
    ];
    let secret = val(ann::SECRET);
    if !secret.is_empty() && source != "gcs" {
        vars.push(secret_env(
            e::IMPORTER_ACCESS_KEY_ID,
            &secret,
            "accessKeyId",
        ));
        vars.push(secret_env(e::IMPORTER_SECRET_KEY, &secret, "secretKey"));
    }
    if !secret.is_empty() && source == "gcs" {
        vars.push(env(
            "GOOGLE_APPLICATION_CREDENTIALS",
            paths::GOOGLE_CREDENTIALS_FILE,
        ));
    }
    if !val(ann::CERT_CONFIG_MAP).is_empty() {
        vars.push(env(e::IMPORTER_CERT_DIR, paths::CERT_DIR));
    }
    if import_only
        && proxy
            .trusted_ca_proxy
            .as_deref()
            .is_some_and(|c| !c.is_empty())
    {
        vars.push(env(e::IMPORTER_PROXY_CERT_DIR, paths::PROXY_CERT_DIR));
    }
    if import_only {
        for (i, h) in indexed(pvc, ann::EXTRA_HEADERS).into_iter().enumerate() {
            vars.push(env(&format!("{}{i}", e::IMPORTER_EXTRA_HEADER_PREFIX), h));
        }
    }
    Ok(vars)
}

/// Name of the copy of the CDI namespace's proxy CA ConfigMap in the claim's namespace.
pub fn import_proxy_config_map_name(pvc: &str) -> String {
    names::resource_name("import-proxy-cm", pvc)
}

/// Upstream `CopyAllowedAnnotations`: network, sidecar and pod-setting annotations travel from
/// the claim to its worker pods (sidecar injection defaults to off).
fn allowed_annotations(pvc: &PersistentVolumeClaim, into: &mut BTreeMap<String, String>) {
    let allowed = [
        (ann::POD_NETWORK, ""),
        (ann::POD_SIDECAR_ISTIO, "false"),
        (ann::POD_SIDECAR_LINKERD, "disabled"),
        (ann::PRIORITY_CLASS_NAME, ""),
        (ann::POD_SERVICE_ACCOUNT, ""),
        (ann::POD_MULTUS_DEFAULT_NETWORK, ""),
    ];
    for (key, default) in allowed {
        let v = match pvc.metadata.annotations.as_ref().and_then(|a| a.get(key)) {
            Some(v) => v.as_str(),
            None => default,
        };
        if !v.is_empty() {
            into.insert(key.to_string(), v.to_string());
        }
    }
}

/// Upstream `SetRestrictedSecurityContext`: the restricted Pod Security profile, running as
/// the qemu user; fsGroup only when something is mounted.
fn restrict(spec: &mut PodSpec) {
    let mut has_mounts = false;
    for c in spec
        .init_containers
        .iter_mut()
        .flatten()
        .chain(spec.containers.iter_mut())
    {
        c.security_context = Some(SecurityContext {
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            allow_privilege_escalation: Some(false),
            run_as_non_root: Some(true),
            run_as_user: Some(paths::QEMU_UID),
            ..Default::default()
        });
        has_mounts |= c.volume_mounts.as_ref().is_some_and(|m| !m.is_empty());
    }
    spec.security_context = Some(PodSecurityContext {
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        fs_group: has_mounts.then_some(paths::QEMU_UID),
        ..Default::default()
    });
}

fn claim_volume(name: &str, claim: &str) -> Volume {
    Volume {
        name: name.to_string(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.to_string(),
            read_only: Some(false),
        }),
        ..Default::default()
    }
}

fn config_map_volume(name: &str, cm: &str) -> Volume {
    Volume {
        name: name.to_string(),
        config_map: Some(ConfigMapVolumeSource {
            name: cm.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_string()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        ..Default::default()
    }
}

/// Mount (Filesystem) or device (Block) of the target claim.
fn data_target(pvc: &PersistentVolumeClaim, c: &mut Container) {
    if volume_mode(pvc) == "Block" {
        c.volume_devices = Some(vec![VolumeDevice {
            name: paths::DATA_VOL.into(),
            device_path: paths::BLOCK_PATH.into(),
        }]);
    } else {
        c.volume_mounts
            .get_or_insert_with(Vec::new)
            .push(mount(paths::DATA_VOL, paths::DATA_DIR));
    }
}

fn worker_container(name: &str, command: &str, worker: &Worker, config: &ConfigView) -> Container {
    Container {
        name: name.to_string(),
        image: Some(worker.image.clone()),
        image_pull_policy: Some(worker.pull_policy.clone()),
        command: Some(vec![command.to_string()]),
        args: Some(vec![format!("-v={}", worker.verbosity)]),
        termination_message_path: Some(paths::TERMINATION_LOG.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        resources: config.status.default_pod_resource_requirements.clone(),
        ..Default::default()
    }
}

/// The importer pod of a claim (upstream `makeImporterPodSpec`). `scratch` names the scratch
/// claim to mount at `/scratch`, if one is needed.
pub fn importer_pod(
    pvc: &PersistentVolumeClaim,
    worker: &Worker,
    config: &ConfigView,
    scratch: Option<&str>,
) -> Result<Pod, ClaimError> {
    let pvc_name = pvc.metadata.name.clone().unwrap_or_default();
    let pod_name = match pvc_ann(pvc, ann::IMPORT_POD) {
        "" => names::importer_pod_name(&pvc_name),
        n => n.to_string(),
    };
    let source = decide::import_source(pvc);
    let mut c = worker_container(
        paths::IMPORTER_NAME,
        paths::IMPORTER_COMMAND,
        worker,
        config,
    );
    c.env = Some(import_env(pvc, config)?);
    c.ports = Some(vec![ContainerPort {
        name: Some("metrics".into()),
        container_port: paths::WORKER_PORT,
        protocol: Some("TCP".into()),
        ..Default::default()
    }]);
    data_target(pvc, &mut c);
    let mut volumes = vec![claim_volume(paths::DATA_VOL, &pvc_name)];
    let mut mounts = Vec::new();
    if let Some(s) = scratch {
        mounts.push(mount(paths::SCRATCH_VOL, paths::SCRATCH_DIR));
        volumes.push(claim_volume(paths::SCRATCH_VOL, s));
    }
    let cert_cm = pvc_ann(pvc, ann::CERT_CONFIG_MAP);
    let none = source == "none";
    if !none && !cert_cm.is_empty() {
        mounts.push(mount(paths::CERT_VOL, paths::CERT_DIR));
        volumes.push(config_map_volume(paths::CERT_VOL, cert_cm));
    }
    let proxy_ca = config
        .status
        .import_proxy
        .as_ref()
        .and_then(|p| p.trusted_ca_proxy.as_deref())
        .is_some_and(|c| !c.is_empty());
    if !none && proxy_ca {
        mounts.push(mount(paths::PROXY_CERT_VOL, paths::PROXY_CERT_DIR));
        volumes.push(config_map_volume(
            paths::PROXY_CERT_VOL,
            &import_proxy_config_map_name(&pvc_name),
        ));
    }
    let secret = pvc_ann(pvc, ann::SECRET);
    if !none && source == "gcs" && !secret.is_empty() {
        mounts.push(mount(paths::SECRET_VOL, paths::GOOGLE_CREDENTIALS_DIR));
        volumes.push(secret_volume(paths::SECRET_VOL, secret));
    }
    if !none {
        for (i, s) in indexed(pvc, ann::SECRET_EXTRA_HEADERS).iter().enumerate() {
            let vol = format!("cdi-secret-extra-headers-vol-{i}");
            mounts.push(mount(
                &vol,
                &format!("{}/{i}", paths::SECRET_EXTRA_HEADERS_DIR),
            ));
            volumes.push(secret_volume(&vol, s));
        }
    }
    c.volume_mounts.get_or_insert_with(Vec::new).extend(mounts);
    if c.volume_mounts.as_ref().is_some_and(Vec::is_empty) {
        c.volume_mounts = None;
    }
    let mut labels = BTreeMap::from([
        (label::APP.to_string(), label::APP_VALUE.to_string()),
        (label::COMPONENT.to_string(), label::IMPORTER.to_string()),
        (label::PROMETHEUS.to_string(), "true".to_string()),
    ]);
    for (k, v) in pvc.metadata.labels.iter().flatten() {
        labels.insert(k.clone(), v.clone());
    }
    let mut anns = BTreeMap::from([(ann::CREATED_BY.to_string(), "yes".to_string())]);
    allowed_annotations(pvc, &mut anns);
    let mut spec = worker_pod_spec(pvc, config, c, volumes);
    restrict(&mut spec);
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name),
            namespace: pvc.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(anns),
            owner_references: Some(vec![pvc_owner_ref(pvc)]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

fn worker_pod_spec(
    pvc: &PersistentVolumeClaim,
    config: &ConfigView,
    container: Container,
    volumes: Vec<Volume>,
) -> PodSpec {
    let opt = |k: &str| Some(pvc_ann(pvc, k).to_string()).filter(|s| !s.is_empty());
    PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        restart_policy: Some("OnFailure".into()),
        priority_class_name: opt(ann::PRIORITY_CLASS_NAME),
        service_account_name: opt(ann::POD_SERVICE_ACCOUNT),
        image_pull_secrets: config.status.image_pull_secrets.clone(),
        // Namespaces with many Services would otherwise inject enough variables to break exec
        // ("argument list too long").
        enable_service_links: Some(false),
        ..Default::default()
    }
}

/// What an upload pod needs besides the claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadPodArgs {
    /// Pod (and Secret) name.
    pub name: String,
    /// Client-certificate common name the server requires.
    pub client_name: String,
    /// RFC 3339 time after which an idle server exits so a fresh one gets new certificates.
    pub deadline: Option<String>,
    /// Scratch claim name (`<pvc>-scratch`).
    pub scratch: Option<String>,
}

/// The upload server pod of a claim (upstream `makeUploadPodSpec`).
pub fn upload_pod(
    pvc: &PersistentVolumeClaim,
    worker: &Worker,
    config: &ConfigView,
    args: &UploadPodArgs,
) -> Pod {
    let pvc_name = pvc.metadata.name.clone().unwrap_or_default();
    let svc = names::service_name(&args.name);
    let class = pvc
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref());
    let block = volume_mode(pvc) == "Block";
    let overhead = if block {
        "0".to_string()
    } else {
        config.overhead_for(class)
    };
    let tls = |f: &str| format!("{}{f}", paths::TLS_DIR);
    let mut vars = vec![
        env(e::TLS_KEY_FILE, tls("tls.key")),
        env(e::TLS_CERT_FILE, tls("tls.crt")),
        env(e::CLIENT_CERT_FILE, tls("ca.crt")),
        env(e::FILESYSTEM_OVERHEAD, overhead),
        env(
            e::UPLOAD_IMAGE_SIZE,
            requested_size(pvc).unwrap_or_default(),
        ),
        env(e::CLIENT_NAME, args.client_name.clone()),
        env(
            e::PREALLOCATION,
            (pvc_ann(pvc, ann::PREALLOCATION_REQUESTED) == "true").to_string(),
        ),
    ];
    if let Some(d) = &args.deadline {
        vars.push(env(e::DEADLINE, d.clone()));
    }
    let mut c = worker_container(
        paths::UPLOAD_SERVER_NAME,
        paths::UPLOAD_SERVER_COMMAND,
        worker,
        config,
    );
    c.readiness_probe = Some(Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz".into()),
            port: IntOrString::Int(paths::WORKER_PORT),
            scheme: Some("HTTPS".into()),
            ..Default::default()
        }),
        initial_delay_seconds: Some(2),
        period_seconds: Some(5),
        ..Default::default()
    });
    c.volume_mounts = Some(vec![mount(paths::TLS_VOL, paths::TLS_DIR)]);
    if block {
        vars.push(env(e::DESTINATION, paths::BLOCK_PATH));
    }
    c.env = Some(vars);
    data_target(pvc, &mut c);
    let mut volumes = vec![
        secret_volume(paths::TLS_VOL, &args.name),
        claim_volume(paths::DATA_VOL, &pvc_name),
    ];
    if let Some(s) = &args.scratch {
        c.volume_mounts
            .get_or_insert_with(Vec::new)
            .push(mount(paths::SCRATCH_VOL, paths::SCRATCH_DIR));
        volumes.push(claim_volume(paths::SCRATCH_VOL, s));
    }
    let labels = BTreeMap::from([
        (label::APP.to_string(), label::APP_VALUE.to_string()),
        (
            label::COMPONENT.to_string(),
            label::UPLOAD_SERVER.to_string(),
        ),
        (label::SERVICE.to_string(), svc),
        (
            label::UPLOAD_TARGET.to_string(),
            pvc.metadata.uid.clone().unwrap_or_default(),
        ),
    ]);
    let mut anns = BTreeMap::from([
        (ann::CREATED_BY_UPLOAD.to_string(), "yes".to_string()),
        (
            ann::OPEN_DEFAULT_PORTS.to_string(),
            format!(r#"[{{"protocol":"tcp","port":{}}}]"#, paths::WORKER_PORT),
        ),
    ]);
    allowed_annotations(pvc, &mut anns);
    let mut spec = worker_pod_spec(pvc, config, c, volumes);
    restrict(&mut spec);
    Pod {
        metadata: ObjectMeta {
            name: Some(args.name.clone()),
            namespace: pvc.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(anns),
            owner_references: Some(vec![pvc_owner_ref(pvc)]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The headless Service in front of an upload pod, owned by the claim.
pub fn upload_service(pvc: &PersistentVolumeClaim, pod_name: &str) -> Service {
    let name = names::service_name(pod_name);
    Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: pvc.metadata.namespace.clone(),
            annotations: Some(BTreeMap::from([(
                ann::CREATED_BY_UPLOAD.to_string(),
                "yes".to_string(),
            )])),
            labels: Some(BTreeMap::from([
                (label::APP.to_string(), label::APP_VALUE.to_string()),
                (
                    label::COMPONENT.to_string(),
                    label::UPLOAD_SERVER.to_string(),
                ),
            ])),
            owner_references: Some(vec![pvc_owner_ref(pvc)]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            ports: Some(vec![ServicePort {
                protocol: Some("TCP".into()),
                port: paths::WORKER_PORT,
                target_port: Some(IntOrString::Int(paths::WORKER_PORT)),
                ..Default::default()
            }]),
            selector: Some(BTreeMap::from([(label::SERVICE.to_string(), name)])),
            ..Default::default()
        }),
        status: None,
    }
}

/// DNS names the upload server's certificate covers: `<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc`.
pub fn upload_server_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
    ]
}

/// The upload pod's TLS Secret (named like the pod, owned by it): its server key pair and the
/// CA bundle client certificates must chain to.
pub fn upload_secret(pod: &Pod, server: &cdi_pki::CertPair, client_ca_pem: &str) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: pod.metadata.name.clone(),
            namespace: pod.metadata.namespace.clone(),
            annotations: Some(BTreeMap::from([(
                ann::CREATED_BY_UPLOAD.to_string(),
                "yes".to_string(),
            )])),
            labels: Some(BTreeMap::from([
                (label::APP.to_string(), label::APP_VALUE.to_string()),
                (
                    label::COMPONENT.to_string(),
                    label::UPLOAD_SERVER.to_string(),
                ),
            ])),
            owner_references: Some(vec![pod_owner_ref(pod)]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            ("tls.key".to_string(), bytes(&server.key_pem)),
            ("tls.crt".to_string(), bytes(&server.cert_pem)),
            ("ca.crt".to_string(), bytes(client_ca_pem)),
        ])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
