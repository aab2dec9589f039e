//! Names the controller shares with upstream CDI: annotation and label keys (the de-facto
//! internal API between the DataVolume, import and upload reconcilers), worker paths, and the
//! naming rules for derived objects (`importer-<pvc>`, `cdi-upload-<pvc>`, `<pvc>-scratch`).
//!
//! The spellings are upstream's (`pkg/controller/common/util.go`, `pkg/common/common.go`) so a
//! claim prepared by upstream CDI, or a tool that reads these annotations, works unchanged.

/// Annotation keys on PVCs (and a few on DataVolumes and pods): `cdi_resources::annotations`
/// under the controller's short names, plus the few keys that crate does not define.
pub mod ann {
    pub use cdi_resources::annotations::ANN_CREATED_BY as CREATED_BY;
    /// Set on objects created by the upload controller.
    pub const CREATED_BY_UPLOAD: &str = "cdi.kubevirt.io/storage.createdByUploadController";
    pub use cdi_resources::annotations::ANN_ALLOW_CLAIM_ADOPTION as ALLOW_CLAIM_ADOPTION;
    pub use cdi_resources::annotations::ANN_BACKING_FILE as BACKING_FILE;
    pub use cdi_resources::annotations::ANN_BOUND_CONDITION as BOUND_CONDITION;
    pub use cdi_resources::annotations::ANN_BOUND_CONDITION_MESSAGE as BOUND_CONDITION_MESSAGE;
    pub use cdi_resources::annotations::ANN_BOUND_CONDITION_REASON as BOUND_CONDITION_REASON;
    pub use cdi_resources::annotations::ANN_CERT_CONFIG_MAP as CERT_CONFIG_MAP;
    pub use cdi_resources::annotations::ANN_CHECKSUM as CHECKSUM;
    pub use cdi_resources::annotations::ANN_CONTENT_TYPE as CONTENT_TYPE;
    pub use cdi_resources::annotations::ANN_CREATED_FOR_DATA_VOLUME as CREATED_FOR_DATA_VOLUME;
    pub use cdi_resources::annotations::ANN_CURRENT_CHECKPOINT as CURRENT_CHECKPOINT;
    pub use cdi_resources::annotations::ANN_DISK_ID as DISK_ID;
    pub use cdi_resources::annotations::ANN_ENDPOINT as ENDPOINT;
    pub use cdi_resources::annotations::ANN_EXTRA_HEADERS as EXTRA_HEADERS;
    pub use cdi_resources::annotations::ANN_FINAL_CHECKPOINT as FINAL_CHECKPOINT;
    pub use cdi_resources::annotations::ANN_IMPORT_FATAL_ERROR as IMPORT_FATAL_ERROR;
    pub use cdi_resources::annotations::ANN_IMPORT_POD as IMPORT_POD;
    pub use cdi_resources::annotations::ANN_INSECURE_SKIP_VERIFY as INSECURE_SKIP_VERIFY;
    pub use cdi_resources::annotations::ANN_POD_PHASE as POD_PHASE;
    pub use cdi_resources::annotations::ANN_POD_READY as POD_READY;
    pub use cdi_resources::annotations::ANN_POD_RESTARTS as POD_RESTARTS;
    pub use cdi_resources::annotations::ANN_POD_RETAIN_AFTER_COMPLETION as POD_RETAIN_AFTER_COMPLETION;
    pub use cdi_resources::annotations::ANN_POD_SCHEDULABLE as POD_SCHEDULABLE;
    pub use cdi_resources::annotations::ANN_POD_SERVICE_ACCOUNT as POD_SERVICE_ACCOUNT;
    pub use cdi_resources::annotations::ANN_POPULATED_FOR as POPULATED_FOR;
    pub use cdi_resources::annotations::ANN_PREALLOCATION_APPLIED as PREALLOCATION_APPLIED;
    pub use cdi_resources::annotations::ANN_PREALLOCATION_REQUESTED as PREALLOCATION_REQUESTED;
    pub use cdi_resources::annotations::ANN_PREVIOUS_CHECKPOINT as PREVIOUS_CHECKPOINT;
    pub use cdi_resources::annotations::ANN_PRIORITY_CLASS_NAME as PRIORITY_CLASS_NAME;
    pub use cdi_resources::annotations::ANN_REGISTRY_IMAGE_ARCHITECTURE as REGISTRY_IMAGE_ARCHITECTURE;
    pub use cdi_resources::annotations::ANN_REGISTRY_IMAGE_STREAM as REGISTRY_IMAGE_STREAM;
    pub use cdi_resources::annotations::ANN_REGISTRY_IMPORT_METHOD as REGISTRY_IMPORT_METHOD;
    pub use cdi_resources::annotations::ANN_REQUIRES_DIRECT_IO as REQUIRES_DIRECT_IO;
    pub use cdi_resources::annotations::ANN_REQUIRES_SCRATCH as REQUIRES_SCRATCH;
    pub use cdi_resources::annotations::ANN_RUNNING_CONDITION as RUNNING_CONDITION;
    pub use cdi_resources::annotations::ANN_RUNNING_CONDITION_MESSAGE as RUNNING_CONDITION_MESSAGE;
    pub use cdi_resources::annotations::ANN_RUNNING_CONDITION_REASON as RUNNING_CONDITION_REASON;
    pub use cdi_resources::annotations::ANN_SECRET as SECRET;
    pub use cdi_resources::annotations::ANN_SECRET_EXTRA_HEADERS as SECRET_EXTRA_HEADERS;
    pub use cdi_resources::annotations::ANN_SOURCE as SOURCE;
    pub use cdi_resources::annotations::ANN_SOURCE_RUNNING_CONDITION as SOURCE_RUNNING_CONDITION;
    pub use cdi_resources::annotations::ANN_THUMBPRINT as THUMBPRINT;
    pub use cdi_resources::annotations::ANN_UPLOAD_POD as UPLOAD_POD;
    pub use cdi_resources::annotations::ANN_UPLOAD_REQUEST as UPLOAD_REQUEST;
    pub use cdi_resources::annotations::ANN_UUID as UUID;
    /// Pod network attachment (copied to worker pods).
    pub const POD_NETWORK: &str = "k8s.v1.cni.cncf.io/networks";
    /// Multus default network (copied to worker pods).
    pub const POD_MULTUS_DEFAULT_NETWORK: &str = "v1.multus-cni.io/default-network";
    /// Istio sidecar injection (copied; default `false`).
    pub const POD_SIDECAR_ISTIO: &str = "sidecar.istio.io/inject";
    /// Linkerd injection (copied; default `disabled`).
    pub const POD_SIDECAR_LINKERD: &str = "linkerd.io/inject";
    /// OVN: ports open on the default network (upload pods).
    pub const OPEN_DEFAULT_PORTS: &str = "k8s.ovn.org/open-default-ports";
    /// On a StorageClass: why it cannot provision here.
    pub use cdi_resources::annotations::ANN_CLASS_UNAVAILABLE as CLASS_UNAVAILABLE;
    pub use cdi_resources::annotations::ANN_CLONE_REQUEST as CLONE_REQUEST;
    pub use cdi_resources::annotations::ANN_DEFAULT_STORAGE_CLASS as DEFAULT_STORAGE_CLASS;
    pub use cdi_resources::annotations::ANN_DEFAULT_VIRT_STORAGE_CLASS as DEFAULT_VIRT_STORAGE_CLASS;
    /// On a StorageProfile: the smallest size the class provisions.
    pub const MINIMUM_SUPPORTED_PVC_SIZE: &str = "cdi.kubevirt.io/minimumSupportedPvcSize";
}

/// Label keys and values.
pub mod label {
    /// `app` on every object CDI creates.
    pub const APP: &str = "app";
    /// Value of [`APP`].
    pub const APP_VALUE: &str = "containerized-data-importer";
    /// Component label key.
    pub const COMPONENT: &str = "cdi.kubevirt.io";
    /// Component value of importer pods.
    pub const IMPORTER: &str = "importer";
    /// Component value of upload server objects.
    pub const UPLOAD_SERVER: &str = "cdi-upload-server";
    /// Marks pods that serve the progress metric.
    pub const PROMETHEUS: &str = "prometheus.cdi.kubevirt.io";
    /// UID of the upload target claim, on upload pods.
    pub const UPLOAD_TARGET: &str = "cdi.kubevirt.io/uploadTarget";
    /// Service selector label of upload pods.
    pub const SERVICE: &str = "service";
    /// Suppresses the PV-filling-up alert on claims CDI fills to the brim.
    pub const FILLING_UP_SUPPRESS: &str = "alerts.k8s.io/KubePersistentVolumeFillingUp";
    /// Value of [`FILLING_UP_SUPPRESS`].
    pub const FILLING_UP_SUPPRESS_VALUE: &str = "disabled";
    /// Scratch claims are not worth backing up.
    pub const EXCLUDE_FROM_VELERO_BACKUP: &str = "velero.io/exclude-from-backup";
}

/// Paths and volume names inside worker pods (upstream's; the image keeps them).
pub mod pod {
    /// Volume name of the target claim.
    pub const DATA_VOL: &str = "cdi-data-vol";
    /// Volume name of the scratch claim.
    pub const SCRATCH_VOL: &str = "cdi-scratch-vol";
    /// Volume name of the source CA ConfigMap.
    pub const CERT_VOL: &str = "cdi-cert-vol";
    /// Volume name of the proxy CA ConfigMap.
    pub const PROXY_CERT_VOL: &str = "cdi-proxy-cert-vol";
    /// Volume name of the GCS credentials Secret.
    pub const SECRET_VOL: &str = "cdi-secret-vol";
    /// Volume name of the upload server's TLS Secret.
    pub const TLS_VOL: &str = "tls-config";
    /// Filesystem target mount.
    pub const DATA_DIR: &str = "/data";
    /// Block target device.
    pub const BLOCK_PATH: &str = "/dev/cdi-block-volume";
    /// Scratch mount.
    pub const SCRATCH_DIR: &str = "/scratch";
    /// Source CA mount.
    pub const CERT_DIR: &str = "/certs";
    /// Proxy CA mount.
    pub const PROXY_CERT_DIR: &str = "/proxycerts/";
    /// Secret extra headers mount root (`/extraheaders/<i>`).
    pub const SECRET_EXTRA_HEADERS_DIR: &str = "/extraheaders";
    /// GCS credentials mount.
    pub const GOOGLE_CREDENTIALS_DIR: &str = "/google";
    /// GCS credentials file.
    pub const GOOGLE_CREDENTIALS_FILE: &str = "/google/credentials.json";
    /// Upload server TLS mount.
    pub const TLS_DIR: &str = "/etc/tls/";
    /// Where the kubelet reads the termination message.
    pub const TERMINATION_LOG: &str = "/dev/termination-log";
    /// Container name of the importer.
    pub const IMPORTER_NAME: &str = "importer";
    /// Container name of the upload server.
    pub const UPLOAD_SERVER_NAME: &str = "cdi-upload-server";
    /// Entry point of the importer in the CDI image.
    pub const IMPORTER_COMMAND: &str = "/usr/bin/cdi-importer";
    /// Entry point of the upload server in the CDI image.
    pub const UPLOAD_SERVER_COMMAND: &str = "/usr/bin/cdi-uploadserver";
    /// Metrics (importer) and upload (upload server) port.
    pub const WORKER_PORT: i32 = 8443;
    /// uid/gid of the `qemu` user worker pods run as (upstream's `QemuSubGid`).
    pub const QEMU_UID: i64 = 107;
}

/// Client-certificate common name the upload server requires of the upload proxy.
pub const UPLOAD_CLIENT_NAME: &str = "client.upload-server.cdi.kubevirt.io";

/// Prefix of importer pod names.
pub const IMPORTER_POD_PREFIX: &str = "importer";
/// Prefix of upload pod (and Secret and Service) names.
pub const UPLOAD_POD_PREFIX: &str = "cdi-upload";
/// Suffix of scratch claim names.
pub const SCRATCH_SUFFIX: &str = "scratch";

/// Longest object name (DNS-1123 subdomain).
const MAX_RESOURCE_NAME: usize = 253;
/// Longest Service name / label value (DNS-1035 label).
const MAX_LABEL_NAME: usize = 63;
/// Length of `-<8 hex digits>-` that the shortener inserts.
const HASH_PART: usize = 10;

/// FNV-1a 32-bit, as openshift's `naming.GetName` hashes.
fn fnv32a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Byte-safe prefix of an ASCII-ish name.
fn prefix(s: &str, n: usize) -> &str {
    let mut end = n.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `<base>-<suffix>` shortened to `max` with a hash, as upstream's `naming.GetName`.
fn get_name(base: &str, suffix: &str, max: usize) -> String {
    let name = format!("{base}-{suffix}");
    if name.len() <= max {
        return name;
    }
    match max.checked_sub(HASH_PART + suffix.len()) {
        Some(base_len) => format!("{}-{:08x}-{suffix}", prefix(base, base_len), fnv32a(base)),
        None => {
            let short = format!(
                "{}-{:08x}",
                prefix(base, max.saturating_sub(9)),
                fnv32a(&name)
            );
            prefix(&short, max).to_string()
        }
    }
}

/// `<prefix>-<name>` within the object-name limit (upstream's `naming.GetResourceName`).
pub fn resource_name(prefix: &str, name: &str) -> String {
    get_name(prefix, name, MAX_RESOURCE_NAME)
}

/// A Service name / label value for a resource name (dots become dashes, at most 63).
pub fn service_name(resource_name: &str) -> String {
    let base = resource_name.replace('.', "-");
    if base.len() <= MAX_LABEL_NAME {
        return base;
    }
    get_name(&base, "cdi", MAX_LABEL_NAME)
}

/// Default importer pod name of a claim.
pub fn importer_pod_name(pvc: &str) -> String {
    resource_name(IMPORTER_POD_PREFIX, pvc)
}

/// Default upload pod name of a claim (also its Secret's and, shortened, its Service's).
pub fn upload_pod_name(pvc: &str) -> String {
    resource_name(UPLOAD_POD_PREFIX, pvc)
}

/// Scratch claim name of a claim.
pub fn scratch_pvc_name(pvc: &str) -> String {
    resource_name(pvc, SCRATCH_SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_plain_concatenations() {
        assert_eq!(importer_pod_name("fedora"), "importer-fedora");
        assert_eq!(upload_pod_name("up"), "cdi-upload-up");
        assert_eq!(scratch_pvc_name("fedora"), "fedora-scratch");
        assert_eq!(service_name("cdi-upload-a.b"), "cdi-upload-a-b");
    }

    #[test]
    fn long_names_are_shortened_with_a_stable_hash() {
        let long = "a".repeat(60);
        let svc = service_name(&upload_pod_name(&long));
        assert!(svc.len() <= 63, "{svc}");
        assert!(svc.ends_with("-cdi"));
        assert_eq!(svc, service_name(&upload_pod_name(&long)));
        let pvc = "b".repeat(250);
        let scratch = scratch_pvc_name(&pvc);
        assert!(
            scratch.len() <= 253 && scratch.ends_with("-scratch"),
            "{scratch}"
        );
        // FNV-1a reference value.
        assert_eq!(fnv32a("a"), 0xe40c_292c);
    }
}
