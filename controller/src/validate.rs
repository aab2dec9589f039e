//! DataVolume admission, as upstream's `datavolume-validate` webhook decides it.
//!
//! Pure functions over the typed DataVolume returning field causes; `cdi serve`'s API server and
//! an admission webhook both turn them into a 422 `Status` / a denied `AdmissionResponse`.
//! Sources this controller cannot run (clones, DataSource references, gcs, imageio, vddk,
//! registry node pull) are refused here with a message saying so, rather than accepted and left
//! pending forever.

use cdi_api::names;
use cdi_api::quantity::parse_bytes;
use k8s_openapi::api::core::v1::PersistentVolumeClaimSpec;
use serde::Serialize;

use crate::model::{DvSpec, DvView, HttpSource};

/// Upstream's minimum claim size: KubeVirt does not accept disks smaller than 1 MiB.
pub const MIN_PVC_SIZE: u64 = 1 << 20;

const ACCESS_MODES: [&str; 4] = [
    "ReadWriteOnce",
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOncePod",
];

/// One reason a DataVolume is rejected: the field path and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// JSON path of the offending field (`spec.source`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn cause(field: &str, message: impl Into<String>) -> Cause {
    Cause {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Validate a DataVolume on create (any serializable DataVolume: the typed
/// `cdi_resources::DataVolume` of either served version, or a dynamic object).
pub fn validate_create<T: Serialize>(dv: &T) -> Result<(), Vec<Cause>> {
    match DvView::from_object(dv) {
        Ok(view) => validate_view(&view),
        Err(e) => Err(vec![cause("", format!("malformed DataVolume: {e}"))]),
    }
}

/// Validate a DataVolume update: the spec is immutable except the multi-stage checkpoint
/// fields.
pub fn validate_update<T: Serialize>(old: &T, new: &T) -> Result<(), Vec<Cause>> {
    let (old, new) = match (DvView::from_object(old), DvView::from_object(new)) {
        (Ok(o), Ok(n)) => (o, n),
        (Err(e), _) | (_, Err(e)) => {
            return Err(vec![cause("", format!("malformed DataVolume: {e}"))]);
        }
    };
    let strip = |s: &DvSpec| DvSpec {
        checkpoints: None,
        final_checkpoint: None,
        ..s.clone()
    };
    if strip(&old.spec) != strip(&new.spec) {
        return Err(vec![cause(
            "spec",
            format!(
                "Cannot update spec for DataVolume {}: the spec is immutable after creation",
                new.name()
            ),
        )]);
    }
    Ok(())
}

/// Validate a decoded DataVolume.
pub fn validate_view(dv: &DvView) -> Result<(), Vec<Cause>> {
    let mut causes = Vec::new();
    let api = dv.api_version.as_str();
    if !api.is_empty() && api != "cdi.kubevirt.io/v1beta1" && api != "cdi.kubevirt.io/v1alpha1" {
        causes.push(cause(
            "apiVersion",
            format!("unsupported apiVersion {api:?} for DataVolume"),
        ));
    }
    if let Some(problem) = names::name_problem(dv.name(), names::MAX_DATAVOLUME_NAME_LEN) {
        causes.push(cause("metadata.name", format!("DataVolume {problem}")));
    }
    validate_spec(&dv.spec, &mut causes);
    if causes.is_empty() {
        Ok(())
    } else {
        Err(causes)
    }
}

fn has_external_population(c: &PersistentVolumeClaimSpec) -> bool {
    c.data_source.is_some() || c.data_source_ref.is_some()
}

fn validate_spec(spec: &DvSpec, causes: &mut Vec<Cause>) {
    let claim = match (&spec.pvc, &spec.storage) {
        (Some(_), Some(_)) => {
            causes.push(cause(
                "spec",
                "Duplicate storage definition, both target storage and target pvc defined",
            ));
            None
        }
        (None, None) => {
            causes.push(cause(
                "spec",
                "Missing Data volume PVC: one of spec.pvc or spec.storage is required",
            ));
            None
        }
        (Some(p), None) => {
            validate_claim("spec.pvc", p, true, causes);
            Some(p)
        }
        (None, Some(s)) => {
            validate_claim("spec.storage", s, false, causes);
            Some(s)
        }
    };
    if let Some(c) = claim {
        if let Some(sc) = &c.storage_class_name
            && !sc.is_empty()
            && !names::is_dns1123_subdomain(sc)
        {
            causes.push(cause(
                "storageClassName",
                "storage class name must be a DNS-1123 subdomain of at most 253 characters",
            ));
        }
        if has_external_population(c) {
            causes.push(cause(
                "spec",
                "external population (dataSource/dataSourceRef) is not supported by this controller",
            ));
            return;
        }
    }

    let content_type = spec.content_type.as_deref().unwrap_or("");
    if !matches!(content_type, "" | "kubevirt" | "archive") {
        causes.push(cause(
            "spec.contentType",
            format!("ContentType {content_type:?} is invalid: must be kubevirt or archive"),
        ));
    }

    match (&spec.source, &spec.source_ref) {
        (Some(_), Some(_)) => {
            causes.push(cause(
                "spec",
                "Data volume should have either Source or SourceRef, not both",
            ));
            return;
        }
        (None, Some(r)) => {
            if r.kind != "DataSource" {
                causes.push(cause(
                    "spec.sourceRef.kind",
                    format!(
                        "Unsupported sourceRef kind {:?}: only DataSource is valid",
                        r.kind
                    ),
                ));
            } else if r.name.is_empty() {
                causes.push(cause("spec.sourceRef.name", "sourceRef name is missing"));
            } else {
                causes.push(cause(
                    "spec.sourceRef",
                    "sourceRef is not supported yet by this controller; use spec.source instead",
                ));
            }
            return;
        }
        (None, None) => {
            causes.push(cause(
                "spec.source",
                "Missing Data volume source: spec.source is required",
            ));
            return;
        }
        (Some(_), None) => {}
    }
    let Some(source) = &spec.source else { return };
    let variants = source.variants();
    match variants.len() {
        0 => causes.push(cause(
            "spec.source",
            "Missing Data volume source: spec.source names no source type",
        )),
        1 => {}
        _ => causes.push(cause(
            "spec.source",
            format!("Multiple Data volume sources: {}", variants.join(", ")),
        )),
    }
    if variants.len() != 1 {
        return;
    }
    match variants[0] {
        "http" => {
            if let Some(h) = &source.http {
                validate_url("spec.source.http.url", &h.url, &["http", "https"], causes);
                validate_checksum(h, causes);
            }
        }
        "s3" => {
            if let Some(h) = &source.s3 {
                validate_url(
                    "spec.source.s3.url",
                    &h.url,
                    &["http", "https", "s3"],
                    causes,
                );
                if h.checksum.is_some() {
                    causes.push(cause(
                        "spec.source.s3.checksum",
                        "checksum is only supported for http sources",
                    ));
                }
            }
        }
        "registry" => {
            if let Some(r) = &source.registry {
                if content_type == "archive" {
                    causes.push(cause(
                        "spec.contentType",
                        "ContentType must be kubevirt when Source is Registry",
                    ));
                }
                match (&r.url, &r.image_stream) {
                    (Some(u), None) => validate_url(
                        "spec.source.registry.url",
                        u,
                        &["docker", "oci-archive"],
                        causes,
                    ),
                    (None, Some(_)) => causes.push(cause(
                        "spec.source.registry.imageStream",
                        "imageStream sources need pullMethod node, which this controller does not support",
                    )),
                    _ => causes.push(cause(
                        "spec.source.registry",
                        "Source registry should have either url or imageStream, exactly one",
                    )),
                }
                match r.pull_method.as_deref() {
                    None | Some("" | "pod") => {}
                    Some("node") => causes.push(cause(
                        "spec.source.registry.pullMethod",
                        "pullMethod node is not supported by this controller",
                    )),
                    Some(pm) => causes.push(cause(
                        "spec.source.registry.pullMethod",
                        format!("ImportMethod {pm} is not supported"),
                    )),
                }
            }
        }
        "blank" => {
            if content_type == "archive" {
                causes.push(cause(
                    "spec.contentType",
                    "SourceType cannot be blank and the contentType be archive",
                ));
            }
        }
        "upload" => {}
        "pvc" | "snapshot" => causes.push(cause(
            &format!("spec.source.{}", variants[0]),
            "cloning is not supported yet by this controller",
        )),
        other => causes.push(cause(
            &format!("spec.source.{other}"),
            format!("{other} sources are not supported by this controller"),
        )),
    }
}

fn requested_storage(c: &PersistentVolumeClaimSpec) -> Option<String> {
    c.resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .map(|q| q.0.clone())
}

fn validate_claim(
    field: &str,
    c: &PersistentVolumeClaimSpec,
    exactly_one_mode: bool,
    causes: &mut Vec<Cause>,
) {
    let modes = c.access_modes.as_deref().unwrap_or_default();
    if exactly_one_mode && modes.is_empty() {
        causes.push(cause(
            &format!("{field}.accessModes"),
            "Required value: at least 1 access mode is required",
        ));
    }
    if exactly_one_mode && modes.len() > 1 {
        causes.push(cause(
            &format!("{field}.accessModes"),
            "PVC multiple accessModes: exactly one is allowed in spec.pvc",
        ));
    }
    for m in modes {
        if !ACCESS_MODES.contains(&m.as_str()) {
            causes.push(cause(
                &format!("{field}.accessModes"),
                format!("Unsupported value: {m:?}"),
            ));
        }
    }
    if let Some(vm) = &c.volume_mode
        && !matches!(vm.as_str(), "Filesystem" | "Block" | "FromStorageProfile")
    {
        causes.push(cause(
            &format!("{field}.volumeMode"),
            format!("Unsupported volumeMode {vm:?}"),
        ));
    }
    let size_field = format!("{field}.resources.requests.storage");
    match requested_storage(c) {
        None => causes.push(cause(&size_field, "PVC size is missing")),
        Some(text) => match parse_bytes(&text) {
            Err(_) => causes.push(cause(&size_field, format!("invalid quantity {text:?}"))),
            Ok(0) => causes.push(cause(
                &size_field,
                "PVC size can't be equal or less than zero",
            )),
            Ok(n) if n < MIN_PVC_SIZE => causes.push(cause(
                &size_field,
                format!("PVC size {text} is smaller than the minimum of 1Mi"),
            )),
            Ok(_) => {}
        },
    }
}

fn validate_url(field: &str, url: &str, schemes: &[&str], causes: &mut Vec<Cause>) {
    match url::Url::parse(url) {
        Err(e) => causes.push(cause(field, format!("{url:?} is not a valid URL: {e}"))),
        Ok(u) if !schemes.contains(&u.scheme()) => causes.push(cause(
            field,
            format!(
                "unsupported URL scheme {:?} in {url:?}: expected {}",
                u.scheme(),
                schemes.join(" or ")
            ),
        )),
        Ok(_) => {}
    }
}

/// Hex digest length of each checksum algorithm upstream accepts.
fn digest_len(algo: &str) -> Option<usize> {
    match algo {
        "md5" => Some(32),
        "sha1" => Some(40),
        "sha256" => Some(64),
        "sha512" => Some(128),
        _ => None,
    }
}

fn validate_checksum(h: &HttpSource, causes: &mut Vec<Cause>) {
    let Some(sum) = &h.checksum else { return };
    let field = "spec.source.http.checksum";
    let Some((algo, hex)) = sum.split_once(':') else {
        causes.push(cause(
            field,
            format!("invalid checksum {sum:?}: expected algorithm:hex, e.g. sha256:…"),
        ));
        return;
    };
    match digest_len(algo) {
        None => causes.push(cause(
            field,
            format!("unsupported checksum algorithm {algo:?}: use md5, sha1, sha256 or sha512"),
        )),
        Some(n) if hex.len() != n || !hex.chars().all(|c| c.is_ascii_hexdigit()) => {
            causes.push(cause(
                field,
                format!("invalid {algo} checksum: expected {n} hex digits"),
            ))
        }
        Some(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn dv(spec: Value) -> Value {
        json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "dv"}, "spec": spec})
    }

    fn messages(r: Result<(), Vec<Cause>>) -> String {
        r.err()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.message)
            .collect::<Vec<_>>()
            .join("|")
    }

    fn storage() -> Value {
        json!({"resources": {"requests": {"storage": "1Gi"}}})
    }

    #[test]
    fn valid_http_upload_and_blank_pass() {
        let sum = format!("sha256:{}", "a".repeat(64));
        let http = dv(
            json!({"source": {"http": {"url": "http://h/x.qcow2", "checksum": sum}},
            "storage": storage()}),
        );
        assert_eq!(validate_create(&http), Ok(()));
        let blank = dv(
            json!({"source": {"blank": {}}, "pvc": {"accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "500Mi"}}}}),
        );
        assert_eq!(validate_create(&blank), Ok(()));
        let upload = dv(json!({"source": {"upload": {}}, "storage": storage()}));
        assert_eq!(validate_create(&upload), Ok(()));
    }

    #[test]
    fn exactly_one_source() {
        let m = messages(validate_create(&dv(
            json!({"source": {"http": {"url": "http://h/x"},
            "registry": {"url": "docker://x"}}, "storage": storage()}),
        )));
        assert!(
            m.contains("Multiple Data volume sources: http, registry"),
            "{m}"
        );
        let m = messages(validate_create(&dv(json!({"storage": storage()}))));
        assert!(m.contains("Missing Data volume source"), "{m}");
    }

    #[test]
    fn exactly_one_storage_definition() {
        let m = messages(validate_create(&dv(
            json!({"source": {"blank": {}}, "storage": storage(), "pvc": storage()}),
        )));
        assert!(m.contains("Duplicate storage definition"), "{m}");
        let m = messages(validate_create(&dv(json!({"source": {"blank": {}}}))));
        assert!(m.contains("Missing Data volume PVC"), "{m}");
    }

    #[test]
    fn sizes_below_one_mebibyte_are_rejected() {
        let m = messages(validate_create(&dv(json!({"source": {"blank": {}},
            "storage": {"resources": {"requests": {"storage": "1Ki"}}}}))));
        assert!(m.contains("minimum of 1Mi"), "{m}");
        let m = messages(validate_create(&dv(
            json!({"source": {"blank": {}}, "storage": {}}),
        )));
        assert!(m.contains("PVC size is missing"), "{m}");
    }

    #[test]
    fn url_scheme_and_checksum_syntax() {
        let m = messages(validate_create(&dv(
            json!({"source": {"http": {"url": "ftp://h/x"}}, "storage": storage()}),
        )));
        assert!(m.contains("unsupported URL scheme \"ftp\""), "{m}");
        let m = messages(validate_create(&dv(
            json!({"source": {"http": {"url": "http://h/x",
            "checksum": "sha256:abc"}}, "storage": storage()}),
        )));
        assert!(m.contains("expected 64 hex digits"), "{m}");
        let m = messages(validate_create(&dv(
            json!({"source": {"http": {"url": "http://h/x",
            "checksum": "crc:00"}}, "storage": storage()}),
        )));
        assert!(m.contains("unsupported checksum algorithm"), "{m}");
    }

    #[test]
    fn registry_rules() {
        let m = messages(validate_create(&dv(json!({"source": {"registry":
            {"url": "docker://r/i", "pullMethod": "node"}}, "storage": storage()}))));
        assert!(m.contains("pullMethod node"), "{m}");
        let m = messages(validate_create(&dv(json!({"source": {"registry":
            {"url": "http://r/i"}}, "storage": storage()}))));
        assert!(m.contains("unsupported URL scheme"), "{m}");
        let m = messages(validate_create(&dv(json!({"source": {"registry":
            {"url": "docker://r/i"}}, "contentType": "archive", "storage": storage()}))));
        assert!(m.contains("must be kubevirt"), "{m}");
    }

    #[test]
    fn blank_archive_source_ref_and_clones_rejected() {
        let m = messages(validate_create(&dv(json!({"source": {"blank": {}},
            "contentType": "archive", "storage": storage()}))));
        assert!(m.contains("blank and the contentType be archive"), "{m}");
        let m = messages(validate_create(&dv(
            json!({"sourceRef": {"kind": "DataSource",
            "name": "fedora"}, "storage": storage()}),
        )));
        assert!(m.contains("sourceRef is not supported yet"), "{m}");
        let m = messages(validate_create(&dv(
            json!({"source": {"pvc": {"namespace": "a",
            "name": "b"}}, "storage": storage()}),
        )));
        assert!(m.contains("cloning is not supported"), "{m}");
    }

    #[test]
    fn pvc_needs_one_access_mode_and_names_are_dns() {
        let m = messages(validate_create(&dv(json!({"source": {"blank": {}},
            "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}))));
        assert!(m.contains("at least 1 access mode"), "{m}");
        let bad_name = |name: &str| {
            let mut d = dv(json!({"source": {"blank": {}}, "storage": storage()}));
            d["metadata"]["name"] = json!(name);
            messages(validate_create(&d))
        };
        assert!(bad_name("Bad_Name").contains("DNS-1123"));
        assert!(bad_name("a..b").contains("DNS-1123"));
        assert!(bad_name(&"a".repeat(64)).contains("at most 63"));
        assert!(bad_name("fedora-dv.1").is_empty());
    }

    #[test]
    fn typed_resources_of_both_versions_are_validated() {
        let good = dv(json!({"source": {"http": {"url": "http://h/x"}}, "storage": storage()}));
        let typed: cdi_resources::DataVolume = serde_json::from_value(good.clone()).unwrap();
        assert_eq!(validate_create(&typed), Ok(()));
        let mut alpha = good;
        alpha["apiVersion"] = json!("cdi.kubevirt.io/v1alpha1");
        let typed: cdi_resources::v1alpha1::DataVolume = serde_json::from_value(alpha).unwrap();
        assert_eq!(validate_create(&typed), Ok(()));
        let bad = dv(
            json!({"source": {"http": {"url": "http://h/x"}, "blank": {}}, "storage": storage()}),
        );
        let typed: cdi_resources::DataVolume = serde_json::from_value(bad).unwrap();
        assert!(messages(validate_create(&typed)).contains("Multiple Data volume sources"));
    }

    #[test]
    fn spec_is_immutable_except_checkpoints() {
        let a = dv(json!({"source": {"blank": {}}, "storage": storage()}));
        let mut b = a.clone();
        assert_eq!(validate_update(&a, &b), Ok(()));
        b["spec"]["finalCheckpoint"] = json!(true);
        assert_eq!(validate_update(&a, &b), Ok(()));
        b["spec"]["preallocation"] = json!(true);
        assert!(messages(validate_update(&a, &b)).contains("immutable"));
    }
}
