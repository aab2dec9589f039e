//! Annotation and label keys that form upstream CDI's internal contract.
//!
//! The DataVolume controller, the worker pods and the claims talk through these keys (most of
//! them on the PVC); external tools (KubeVirt, HCO, `virtctl`) read and write some of them, so
//! the spellings are upstream's, byte for byte (`pkg/controller/common/util.go`,
//! `pkg/common/common.go`, the populator and DataImportCron controllers).

/// Prefix of CDI's own annotation and label keys.
pub const CDI_PREFIX: &str = "cdi.kubevirt.io";

// --- import source (PVC annotations the controller sets for the importer pod) ---

/// Import source kind: `http`, `s3`, `gcs`, `registry`, `imageio`, `vddk`, `none`, `glance`.
pub const ANN_SOURCE: &str = "cdi.kubevirt.io/storage.import.source";
/// Import source URL (or ImageStream name for registry imports).
pub const ANN_ENDPOINT: &str = "cdi.kubevirt.io/storage.import.endpoint";
/// Secret with the source credentials.
pub const ANN_SECRET: &str = "cdi.kubevirt.io/storage.import.secretName";
/// ConfigMap with the source's CA bundle.
pub const ANN_CERT_CONFIG_MAP: &str = "cdi.kubevirt.io/storage.import.certConfigMap";
/// `"true"`: skip TLS verification of the source.
pub const ANN_INSECURE_SKIP_VERIFY: &str = "cdi.kubevirt.io/storage.import.insecureSkipVerify";
/// Prefix of the extra HTTP headers (`<prefix>.<i>`).
pub const ANN_EXTRA_HEADERS: &str = "cdi.kubevirt.io/storage.import.extraHeaders";
/// Prefix of the Secret-held extra HTTP headers (`<prefix>.<i>`).
pub const ANN_SECRET_EXTRA_HEADERS: &str = "cdi.kubevirt.io/storage.import.secretExtraHeaders";
/// Expected checksum of an HTTP source, `algorithm:hex`.
pub const ANN_CHECKSUM: &str = "cdi.kubevirt.io/storage.import.checksum";
/// Registry pull method, `pod` or `node`.
pub const ANN_REGISTRY_IMPORT_METHOD: &str = "cdi.kubevirt.io/storage.import.registryImportMethod";
/// `"true"` when the endpoint names an ImageStream.
pub const ANN_REGISTRY_IMAGE_STREAM: &str = "cdi.kubevirt.io/storage.import.registryImageStream";
/// Architecture to pick from a multi-architecture registry image.
pub const ANN_REGISTRY_IMAGE_ARCHITECTURE: &str =
    "cdi.kubevirt.io/storage.import.registryImageArchitecture";
/// imageio disk ID.
pub const ANN_DISK_ID: &str = "cdi.kubevirt.io/storage.import.diskId";
/// VDDK virtual machine UUID.
pub const ANN_UUID: &str = "cdi.kubevirt.io/storage.import.uuid";
/// VDDK backing file.
pub const ANN_BACKING_FILE: &str = "cdi.kubevirt.io/storage.import.backingFile";
/// VDDK host certificate thumbprint.
pub const ANN_THUMBPRINT: &str = "cdi.kubevirt.io/storage.import.vddk.thumbprint";
/// Image with the VDDK library.
pub const ANN_VDDK_INIT_IMAGE_URL: &str = "cdi.kubevirt.io/storage.pod.vddk.initimageurl";
/// ConfigMap with extra VDDK arguments.
pub const ANN_VDDK_EXTRA_ARGS: &str = "cdi.kubevirt.io/storage.pod.vddk.extraargs";
/// VDDK library version the importer reported.
pub const ANN_VDDK_VERSION: &str = "cdi.kubevirt.io/storage.pod.vddk.version";
/// ESXi host the importer connected to.
pub const ANN_VDDK_HOST_CONNECTION: &str = "cdi.kubevirt.io/storage.pod.vddk.host";
/// Content type of the claim's data, `kubevirt` or `archive`.
pub const ANN_CONTENT_TYPE: &str = "cdi.kubevirt.io/storage.contentType";

// --- multi-stage import ---

/// Checkpoint the current stage starts from.
pub const ANN_PREVIOUS_CHECKPOINT: &str = "cdi.kubevirt.io/storage.checkpoint.previous";
/// Checkpoint the current stage copies up to.
pub const ANN_CURRENT_CHECKPOINT: &str = "cdi.kubevirt.io/storage.checkpoint.current";
/// `"true"` when the current checkpoint is the last.
pub const ANN_FINAL_CHECKPOINT: &str = "cdi.kubevirt.io/storage.checkpoint.final";
/// Prefix of the per-checkpoint "copied" markers (`<prefix>.<id>`).
pub const ANN_CHECKPOINTS_COPIED: &str = "cdi.kubevirt.io/storage.checkpoint.copied";
/// ID of the pod that ran the current stage.
pub const ANN_CURRENT_POD_ID: &str = "cdi.kubevirt.io/storage.checkpoint.pod.id";
/// `"true"` once every stage is done.
pub const ANN_MULTI_STAGE_IMPORT_DONE: &str = "cdi.kubevirt.io/storage.checkpoint.done";

// --- worker pods ---

/// Name of the importer pod of a claim.
pub const ANN_IMPORT_POD: &str = "cdi.kubevirt.io/storage.import.importPodName";
/// Name of the upload server pod of a claim.
pub const ANN_UPLOAD_POD: &str = "cdi.kubevirt.io/storage.uploadPodName";
/// Name of the source pod of a host-assisted clone.
pub const ANN_CLONE_SOURCE_POD: &str = "cdi.kubevirt.io/storage.sourceClonePodName";
/// Mirrored phase of the worker pod (`Pending`, `Running`, `Succeeded`, `Failed`).
pub const ANN_POD_PHASE: &str = "cdi.kubevirt.io/storage.pod.phase";
/// `"true"` when the worker pod is ready (upload server accepting data).
pub const ANN_POD_READY: &str = "cdi.kubevirt.io/storage.pod.ready";
/// Restart count of the worker pod; becomes `status.restartCount`.
pub const ANN_POD_RESTARTS: &str = "cdi.kubevirt.io/storage.pod.restarts";
/// `"false"` when the worker pod cannot be scheduled.
pub const ANN_POD_SCHEDULABLE: &str = "cdi.kubevirt.io/storage.pod.schedulable";
/// `"true"`: keep worker pods (and the prime claim) after completion, for debugging.
pub const ANN_POD_RETAIN_AFTER_COMPLETION: &str =
    "cdi.kubevirt.io/storage.pod.retainAfterCompletion";
/// Priority class of the worker pods.
pub const ANN_PRIORITY_CLASS_NAME: &str = "cdi.kubevirt.io/storage.pod.priorityclassname";
/// Service account of the worker pods.
pub const ANN_POD_SERVICE_ACCOUNT: &str = "cdi.kubevirt.io/storage.pod.serviceAccountName";
/// `"true"` when the importer needs scratch space (formats that cannot be streamed).
pub const ANN_REQUIRES_SCRATCH: &str = "cdi.kubevirt.io/storage.import.requiresScratch";
/// `"true"` when the importer must write with direct I/O.
pub const ANN_REQUIRES_DIRECT_IO: &str = "cdi.kubevirt.io/storage.import.requiresDirectIo";
/// `"true"` when an import failed in a way retries cannot fix (the DataVolume goes `Failed`).
pub const ANN_IMPORT_FATAL_ERROR: &str = "cdi.kubevirt.io/storage.import.fatalError";
/// Transfer progress reported by a populator, copied to `status.progress`.
pub const ANN_POPULATOR_PROGRESS: &str = "cdi.kubevirt.io/storage.populator.progress";

// --- mirrored conditions ---

/// Status of the `Running` condition (`"true"`/`"false"`).
pub const ANN_RUNNING_CONDITION: &str = "cdi.kubevirt.io/storage.condition.running";
/// Message of the `Running` condition.
pub const ANN_RUNNING_CONDITION_MESSAGE: &str = "cdi.kubevirt.io/storage.condition.running.message";
/// Reason of the `Running` condition.
pub const ANN_RUNNING_CONDITION_REASON: &str = "cdi.kubevirt.io/storage.condition.running.reason";
/// Status of the `Bound` condition when the claim's own binding is not the whole story.
pub const ANN_BOUND_CONDITION: &str = "cdi.kubevirt.io/storage.condition.bound";
/// Message of the `Bound` condition.
pub const ANN_BOUND_CONDITION_MESSAGE: &str = "cdi.kubevirt.io/storage.condition.bound.message";
/// Reason of the `Bound` condition.
pub const ANN_BOUND_CONDITION_REASON: &str = "cdi.kubevirt.io/storage.condition.bound.reason";
/// Status of the clone source pod's `Running` condition.
pub const ANN_SOURCE_RUNNING_CONDITION: &str = "cdi.kubevirt.io/storage.condition.source.running";
/// Message of the clone source pod's `Running` condition.
pub const ANN_SOURCE_RUNNING_CONDITION_MESSAGE: &str =
    "cdi.kubevirt.io/storage.condition.source.running.message";
/// Reason of the clone source pod's `Running` condition.
pub const ANN_SOURCE_RUNNING_CONDITION_REASON: &str =
    "cdi.kubevirt.io/storage.condition.source.running.reason";

// --- claims, binding, preallocation, upload ---

/// `"true"`: bind the claim now even on a WaitForFirstConsumer class.
pub const ANN_IMMEDIATE_BINDING: &str = "cdi.kubevirt.io/storage.bind.immediate.requested";
/// Preallocation asked for (`"true"`/`"false"`).
pub const ANN_PREALLOCATION_REQUESTED: &str = "cdi.kubevirt.io/storage.preallocation.requested";
/// `"true"` once the worker preallocated the target.
pub const ANN_PREALLOCATION_APPLIED: &str = "cdi.kubevirt.io/storage.preallocation";
/// Marks a claim as the target of an upload.
pub const ANN_UPLOAD_REQUEST: &str = "cdi.kubevirt.io/storage.upload.target";
/// Name of the upload client allowed to talk to the upload server (mTLS common name).
pub const ANN_UPLOAD_CLIENT_NAME: &str = "cdi.kubevirt.io/uploadClientName";
/// Name of the DataVolume a claim is already populated for (adoption).
pub const ANN_POPULATED_FOR: &str = "cdi.kubevirt.io/storage.populatedFor";
/// `"true"` on a DataVolume whose claim was populated outside CDI.
pub const ANN_PRE_POPULATED: &str = "cdi.kubevirt.io/storage.prePopulated";
/// `"true"`: the DataVolume may adopt an existing claim of its name.
pub const ANN_ALLOW_CLAIM_ADOPTION: &str = "cdi.kubevirt.io/allowClaimAdoption";
/// `"yes"` on objects the controller created.
pub const ANN_CREATED_BY: &str = "cdi.kubevirt.io/storage.createdByController";
/// UID of the DataVolume a claim was created for.
pub const ANN_CREATED_FOR_DATA_VOLUME: &str = "cdi.kubevirt.io/createdForDataVolume";
/// `"true"`: populate through the volume populators rather than the legacy flow.
pub const ANN_USE_POPULATOR: &str = "cdi.kubevirt.io/storage.usePopulator";
/// Kind of the populator a claim uses.
pub const ANN_POPULATOR_KIND: &str = "cdi.kubevirt.io/storage.populator.kind";
/// Name of the prime claim (PVC') a populator fills before rebinding.
pub const ANN_PVC_PRIME_NAME: &str = "cdi.kubevirt.io/storage.populator.pvcPrime";
/// Node the scheduler picked for a WaitForFirstConsumer claim (Kubernetes' key).
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

// --- clone ---

/// Clone method used: `copy`, `snapshot` or `csi-clone`.
pub const ANN_CLONE_TYPE: &str = "cdi.kubevirt.io/cloneType";
/// Why a clone fell back to host-assisted copy.
pub const ANN_CLONE_FALLBACK_REASON: &str = "cdi.kubevirt.io/cloneFallbackReason";
/// Phase of a populator clone.
pub const ANN_CLONE_PHASE: &str = "cdi.kubevirt.io/clonePhase";
/// Last error of a populator clone.
pub const ANN_CLONE_ERROR: &str = "cdi.kubevirt.io/cloneError";
/// Namespace of the source of a populator clone.
pub const ANN_DATA_SOURCE_NAMESPACE: &str = "cdi.kubevirt.io/dataSourceNamespace";
/// Source of a host-assisted clone, `namespace/name`.
pub const ANN_CLONE_REQUEST: &str = "k8s.io/CloneRequest";
/// `"true"` on a clone target once the copy is done.
pub const ANN_CLONE_OF: &str = "k8s.io/CloneOf";
/// Cross-namespace clone token.
pub const ANN_CLONE_TOKEN: &str = "cdi.kubevirt.io/storage.clone.token";
/// Long-lived clone token the controller issues after authorization.
pub const ANN_EXTENDED_CLONE_TOKEN: &str = "cdi.kubevirt.io/storage.extended.clone.token";
/// Clone strategy override on a StorageClass.
pub const ANN_CLONE_STRATEGY: &str = "cdi.kubevirt.io/clone-strategy";

// --- StorageProfile and StorageClass ---

/// Smallest claim size a StorageProfile's provisioner accepts.
pub const ANN_MINIMUM_SUPPORTED_PVC_SIZE: &str = "cdi.kubevirt.io/minimumSupportedPvcSize";
/// `"true"` on a StorageProfile: DataImportCron imports use ReadWriteOnce.
pub const ANN_USE_READ_WRITE_ONCE_FOR_DATA_IMPORT_CRON: &str =
    "cdi.kubevirt.io/useReadWriteOnceForDataImportCron";
/// VolumeSnapshotClass for DataImportCron snapshots, on a StorageProfile.
pub const ANN_SNAPSHOT_CLASS_FOR_DATA_IMPORT_CRON: &str =
    "cdi.kubevirt.io/snapshotClassForDataImportCron";
/// `"true"` on the cluster's default StorageClass (Kubernetes' key).
pub const ANN_DEFAULT_STORAGE_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
/// `"true"` on the default StorageClass for virtual-machine disks (preferred over the cluster
/// default for `kubevirt` content).
pub const ANN_DEFAULT_VIRT_STORAGE_CLASS: &str = "storageclass.kubevirt.io/is-default-virt-class";
/// On a StorageClass: why its provisioner cannot provision on this host (`cdi serve` sets it on
/// `local-block` without loop devices); the class's StorageProfile then offers nothing.
pub const ANN_CLASS_UNAVAILABLE: &str = "cdi.kubevirt.io/storage.class.unavailable";

// --- DataImportCron ---

/// Digest the poller found; a new import starts when it differs from the current one.
pub const ANN_SOURCE_DESIRED_DIGEST: &str = "cdi.kubevirt.io/storage.import.sourceDesiredDigest";
/// Docker reference resolved from an ImageStream.
pub const ANN_IMAGE_STREAM_DOCKER_REF: &str = "cdi.kubevirt.io/storage.import.imageStreamDockerRef";
/// Next poll time of a controller-polled source (RFC 3339).
pub const ANN_NEXT_CRON_TIME: &str = "cdi.kubevirt.io/storage.import.nextCronTime";
/// Last poll time (RFC 3339).
pub const ANN_LAST_CRON_TIME: &str = "cdi.kubevirt.io/storage.import.lastCronTime";
/// Last time an import was used; garbage collection keeps the newest.
pub const ANN_LAST_USE_TIME: &str = "cdi.kubevirt.io/storage.import.lastUseTime";
/// StorageClass the cron's imports were made on.
pub const ANN_IMPORT_STORAGE_CLASS: &str = "cdi.kubevirt.io/storage.import.storageClass";
/// Volume mode of the imported source, on a snapshot-format import.
pub const ANN_SOURCE_VOLUME_MODE: &str = "cdi.kubevirt.io/storage.import.sourceVolumeMode";
/// Advised restore size of a snapshot-format import.
pub const ANN_ADVISED_RESTORE_SIZE: &str = "cdi.kubevirt.io/storage.import.advisedRestoreSize";

// --- events ---

/// Name of the object events about a claim should be reported on.
pub const ANN_EVENT_SOURCE: &str = "cdi.kubevirt.io/events.source";
/// Kind of that object.
pub const ANN_EVENT_SOURCE_KIND: &str = "cdi.kubevirt.io/events.source.kind";

// --- labels ---

/// Label key CDI puts on every object it creates (value [`CDI_LABEL_VALUE`]).
pub const CDI_LABEL_KEY: &str = "app";
/// Value of [`CDI_LABEL_KEY`].
pub const CDI_LABEL_VALUE: &str = "containerized-data-importer";
/// Label selector for everything CDI created, `app=containerized-data-importer`.
pub const CDI_LABEL_SELECTOR: &str = "app=containerized-data-importer";
/// Component label (`cdi.kubevirt.io=<component>`).
pub const CDI_COMPONENT_LABEL: &str = "cdi.kubevirt.io";
/// Name of the DataImportCron responsible for the labelled object.
pub const LABEL_DATA_IMPORT_CRON: &str = "cdi.kubevirt.io/dataImportCron";
/// Namespace of that DataImportCron.
pub const LABEL_DATA_IMPORT_CRON_NS: &str = "cdi.kubevirt.io/dataImportCronNs";
/// `"true"`: delete the object when its DataImportCron is deleted (retention `None`).
pub const LABEL_DATA_IMPORT_CRON_CLEANUP: &str = "cdi.kubevirt.io/dataImportCron.cleanup";
/// Marks DataImportCron poller pods.
pub const LABEL_DATA_IMPORT_CRON_POLLER: &str = "cdi.kubevirt.io/dataImportCronPoller";
/// UID of the upload target claim, on upload server pods and services.
pub const LABEL_UPLOAD_TARGET: &str = "cdi.kubevirt.io/uploadTarget";
/// `"true"`: the PVC mutating webhook renders this claim from its StorageProfile.
pub const LABEL_APPLY_STORAGE_PROFILE: &str = "cdi.kubevirt.io/applyStorageProfile";
/// Prometheus scrape marker on worker pods (value `"true"`).
pub const LABEL_PROMETHEUS: &str = "prometheus.cdi.kubevirt.io";
/// Keeps Velero from backing up scratch and prime claims (value `"true"`).
pub const LABEL_EXCLUDE_FROM_VELERO_BACKUP: &str = "velero.io/exclude-from-backup";
/// Silences KubePersistentVolumeFillingUp on CDI's claims (value `"disabled"`).
pub const LABEL_KUBE_PV_FILLING_UP_SUPPRESS: &str = "alerts.k8s.io/KubePersistentVolumeFillingUp";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdi_keys_carry_the_group_prefix_and_are_valid_label_keys() {
        let cdi_keys = [
            ANN_SOURCE,
            ANN_ENDPOINT,
            ANN_CONTENT_TYPE,
            ANN_IMPORT_POD,
            ANN_UPLOAD_POD,
            ANN_POD_PHASE,
            ANN_POD_RESTARTS,
            ANN_POD_RETAIN_AFTER_COMPLETION,
            ANN_RUNNING_CONDITION,
            ANN_UPLOAD_REQUEST,
            ANN_IMMEDIATE_BINDING,
            ANN_PREALLOCATION_REQUESTED,
            ANN_CLONE_TYPE,
            ANN_CLONE_FALLBACK_REASON,
            LABEL_DATA_IMPORT_CRON,
            LABEL_DATA_IMPORT_CRON_CLEANUP,
        ];
        for key in cdi_keys {
            let (prefix, name) = key.split_once('/').expect("prefixed key");
            assert_eq!(prefix, CDI_PREFIX, "{key}");
            // Kubernetes: the name part is at most 63 characters of [A-Za-z0-9._-].
            assert!(name.len() <= 63, "{key}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
                "{key}"
            );
        }
        assert_eq!(
            CDI_LABEL_SELECTOR,
            format!("{CDI_LABEL_KEY}={CDI_LABEL_VALUE}")
        );
    }
}
