//! DataVolume admission, as upstream's `datavolume-validate` webhook decides it.
//!
//! Pure functions over the typed spec; the API layer turns the returned causes into a 422
//! `Status` body. Sources this control plane cannot run yet (clones, DataSource references,
//! imageio, vddk, gcs) are refused here with a message saying so, rather than accepted and left
//! pending forever.

use cdi_api::names;
use cdi_api::quantity::parse_bytes;
use cdi_api::resources::{ClaimSpec, DataVolume, DataVolumeSpec, HttpSource};

/// Upstream's minimum claim size (smaller requests are rejected).
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

/// Validate a DataVolume on create.
pub fn validate_create(dv: &DataVolume) -> Result<(), Vec<Cause>> {
    let mut causes = Vec::new();
    let api = dv.api_version.as_str();
    if !api.is_empty()
        && api != cdi_api::resources::CDI_V1BETA1
        && api != cdi_api::resources::CDI_V1ALPHA1
    {
        causes.push(cause(
            "apiVersion",
            format!("unsupported apiVersion {api:?} for DataVolume"),
        ));
    }
    if let Some(problem) = names::name_problem(&dv.metadata.name, names::MAX_DATAVOLUME_NAME_LEN) {
        causes.push(cause("metadata.name", format!("DataVolume {problem}")));
    }
    validate_spec(&dv.spec, &mut causes);
    if causes.is_empty() {
        Ok(())
    } else {
        Err(causes)
    }
}

/// Validate a DataVolume update: the spec is immutable.
pub fn validate_update(old: &DataVolume, new: &DataVolume) -> Result<(), Vec<Cause>> {
    if old.spec != new.spec {
        return Err(vec![cause(
            "spec",
            format!(
                "Cannot update spec for DataVolume {}: the spec is immutable after creation",
                new.metadata.name
            ),
        )]);
    }
    Ok(())
}

fn validate_spec(spec: &DataVolumeSpec, causes: &mut Vec<Cause>) {
    // Storage definition.
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
    if let Some(c) = claim
        && let Some(sc) = &c.storage_class_name
        && !names::is_dns1123_subdomain(sc)
    {
        causes.push(cause(
            "storageClassName",
            "storage class name must be a DNS-1123 subdomain of at most 253 characters",
        ));
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
            let kind = r.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            if kind != "DataSource" {
                causes.push(cause(
                    "spec.sourceRef.kind",
                    format!("Unsupported sourceRef kind {kind:?}: only DataSource is valid"),
                ));
            } else if r
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .is_empty()
            {
                causes.push(cause("spec.sourceRef.name", "sourceRef name is missing"));
            } else {
                causes.push(cause(
                    "spec.sourceRef",
                    "sourceRef is not supported yet: this control plane has no DataSources; use spec.source instead",
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
                validate_url("spec.source.s3.url", &h.url, &["http", "https"], causes);
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
                    (Some(u), None) => validate_url("spec.source.registry.url", u, &["docker", "oci-archive"], causes),
                    (None, Some(_)) => causes.push(cause(
                        "spec.source.registry.imageStream",
                        "imageStream sources need pullMethod node, which this control plane does not support",
                    )),
                    _ => causes.push(cause("spec.source.registry", "Source registry should have either url or imageStream, exactly one")),
                }
                if let Some(pm) = &r.pull_method
                    && !matches!(pm.as_str(), "" | "pod" | "node")
                {
                    causes.push(cause(
                        "spec.source.registry.pullMethod",
                        format!("ImportMethod {pm} is not supported"),
                    ));
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
            "cloning is not supported yet by this control plane",
        )),
        other => causes.push(cause(
            &format!("spec.source.{other}"),
            format!("{other} sources are not supported by this control plane"),
        )),
    }
}

fn validate_claim(field: &str, c: &ClaimSpec, exactly_one_mode: bool, causes: &mut Vec<Cause>) {
    if exactly_one_mode && c.access_modes.is_empty() {
        causes.push(cause(
            &format!("{field}.accessModes"),
            "Required value: at least 1 access mode is required",
        ));
    }
    if exactly_one_mode && c.access_modes.len() > 1 {
        causes.push(cause(
            &format!("{field}.accessModes"),
            "PVC multiple accessModes: exactly one is allowed in spec.pvc",
        ));
    }
    for m in &c.access_modes {
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
    match c.requested_storage() {
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
    use serde_json::json;

    fn dv(spec: serde_json::Value) -> DataVolume {
        serde_json::from_value(
            json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "dv"}, "spec": spec}),
        )
        .unwrap()
    }

    fn messages(r: Result<(), Vec<Cause>>) -> String {
        r.err()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.message)
            .collect::<Vec<_>>()
            .join("|")
    }

    fn storage() -> serde_json::Value {
        json!({"resources": {"requests": {"storage": "1Gi"}}})
    }

    #[test]
    fn valid_http_and_blank_pass() {
        assert!(
            validate_create(&dv(json!({"source": {"http": {"url": "http://h/x.qcow2",
            "checksum": format!("sha256:{}", "a".repeat(64))}}, "storage": storage()})))
            .is_ok()
        );
        assert!(
            validate_create(&dv(
                json!({"source": {"blank": {}}, "pvc": {"accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "500Mi"}}}})
            ))
            .is_ok()
        );
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
        assert!(
            messages(validate_create(&dv(json!({"storage": storage()}))))
                .contains("Missing Data volume source")
        );
    }

    #[test]
    fn exactly_one_storage_definition() {
        let m = messages(validate_create(&dv(
            json!({"source": {"blank": {}}, "storage": storage(), "pvc": storage()}),
        )));
        assert!(m.contains("Duplicate storage definition"), "{m}");
        assert!(
            messages(validate_create(&dv(json!({"source": {"blank": {}}}))))
                .contains("Missing Data volume PVC")
        );
    }

    #[test]
    fn sizes_below_one_mebibyte_are_rejected() {
        let m = messages(validate_create(&dv(json!({"source": {"blank": {}},
            "storage": {"resources": {"requests": {"storage": "1Ki"}}}}))));
        assert!(m.contains("minimum of 1Mi"), "{m}");
        assert!(
            messages(validate_create(&dv(
                json!({"source": {"blank": {}}, "storage": {}})
            )))
            .contains("PVC size is missing")
        );
    }

    #[test]
    fn url_scheme_and_checksum_syntax() {
        let m = messages(validate_create(&dv(
            json!({"source": {"http": {"url": "ftp://h/x"}}, "storage": storage()}),
        )));
        assert!(m.contains("unsupported URL scheme \"ftp\""), "{m}");
        let m = messages(validate_create(&dv(
            json!({"source": {"http": {"url": "http://h/x", "checksum": "sha256:abc"}},
            "storage": storage()}),
        )));
        assert!(m.contains("expected 64 hex digits"), "{m}");
        let m = messages(validate_create(&dv(
            json!({"source": {"http": {"url": "http://h/x", "checksum": "crc:00"}},
            "storage": storage()}),
        )));
        assert!(m.contains("unsupported checksum algorithm"), "{m}");
    }

    #[test]
    fn blank_archive_and_source_ref_rejected() {
        let m = messages(validate_create(&dv(
            json!({"source": {"blank": {}}, "contentType": "archive", "storage": storage()}),
        )));
        assert!(m.contains("blank and the contentType be archive"), "{m}");
        let m = messages(validate_create(&dv(
            json!({"sourceRef": {"kind": "DataSource", "name": "fedora"}, "storage": storage()}),
        )));
        assert!(m.contains("sourceRef is not supported yet"), "{m}");
    }

    #[test]
    fn pvc_needs_one_access_mode_and_names_are_dns() {
        let m = messages(validate_create(&dv(
            json!({"source": {"blank": {}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}}),
        )));
        assert!(m.contains("at least 1 access mode"), "{m}");
        let bad_name = |name: &str| {
            let mut d = dv(json!({"source": {"blank": {}}, "storage": storage()}));
            d.metadata.name = name.to_string();
            messages(validate_create(&d))
        };
        assert!(bad_name("Bad_Name").contains("DNS-1123"));
        assert!(bad_name("a..b").contains("DNS-1123"));
        assert!(bad_name(&"a".repeat(64)).contains("at most 63"));
        assert!(bad_name("fedora-dv.1").is_empty());
    }

    #[test]
    fn spec_is_immutable() {
        let a = dv(json!({"source": {"blank": {}}, "storage": storage()}));
        let mut b = a.clone();
        assert!(validate_update(&a, &b).is_ok());
        b.spec.preallocation = Some(true);
        assert!(messages(validate_update(&a, &b)).contains("immutable"));
    }
}
