//! The controller's decisions, as pure functions of what it observed.
//!
//! - [`observe_import_pod`] / [`observe_upload_pod`]: worker pod state → the PVC annotations
//!   upstream mirrors (`storage.pod.phase`, `.restarts`, `condition.running*`, scratch and fatal
//!   flags) plus what to do with the pod (upstream `updatePvcFromPod`,
//!   `setAnnotationsFromPodWithPrefix`, `parseTerminationMessage`).
//! - [`dv_status`]: DataVolume + PVC → DataVolume `status` (phase, conditions, restart count,
//!   progress) and the events due (upstream `updateStatus`, `updateConditions`, `emitEvent`).
//! - progress scraping text, storage-class choice.
//!
//! Phase names, condition reasons and event texts are upstream's. Nothing here does I/O, so the
//! same rules are unit-tested here and drive the reconcilers in [`crate::reconcile`].

use std::collections::BTreeMap;

use cdi_api::termination::TerminationMessage;
use k8s_openapi::api::core::v1::{ContainerState, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;

use crate::model::{DvCondition, DvSpec, DvStatus, DvView};
use crate::names::ann;

/// DataVolume phase names.
pub mod phase {
    /// Not yet known.
    pub const UNSET: &str = "";
    /// No claim yet, or the claim is not bound.
    pub const PENDING: &str = "Pending";
    /// Claim bound, no worker yet.
    pub const PVC_BOUND: &str = "PVCBound";
    /// Importer scheduled.
    pub const IMPORT_SCHEDULED: &str = "ImportScheduled";
    /// Importer running (or between restarts).
    pub const IMPORT_IN_PROGRESS: &str = "ImportInProgress";
    /// Upload server scheduled.
    pub const UPLOAD_SCHEDULED: &str = "UploadScheduled";
    /// Upload server ready for data.
    pub const UPLOAD_READY: &str = "UploadReady";
    /// Waiting for a consumer (WaitForFirstConsumer class).
    pub const WAIT_FOR_FIRST_CONSUMER: &str = "WaitForFirstConsumer";
    /// Done.
    pub const SUCCEEDED: &str = "Succeeded";
    /// Permanent failure.
    pub const FAILED: &str = "Failed";
    /// Claim in an unknown phase.
    pub const UNKNOWN: &str = "Unknown";
}

/// Event reasons (upstream's constants).
pub mod reason {
    /// DataVolume import scheduled.
    pub const IMPORT_SCHEDULED: &str = "ImportScheduled";
    /// DataVolume import running.
    pub const IMPORT_IN_PROGRESS: &str = "ImportInProgress";
    /// DataVolume import failed (pod phase Failed).
    pub const IMPORT_FAILED: &str = "ImportFailed";
    /// DataVolume import done.
    pub const IMPORT_SUCCEEDED: &str = "ImportSucceeded";
    /// Upload server scheduled.
    pub const UPLOAD_SCHEDULED: &str = "UploadScheduled";
    /// Upload server ready.
    pub const UPLOAD_READY: &str = "UploadReady";
    /// Upload failed.
    pub const UPLOAD_FAILED: &str = "UploadFailed";
    /// Upload done.
    pub const UPLOAD_SUCCEEDED: &str = "UploadSucceeded";
    /// On the PVC: the importer container failed.
    pub const ERR_IMPORT_FAILED: &str = "ErrImportFailed";
    /// The claim cannot be rendered.
    pub const ERR_CLAIM_NOT_VALID: &str = "ErrClaimNotValid";
    /// A claim of that name exists and is not ours.
    pub const ERR_RESOURCE_EXISTS: &str = "ErrResourceExists";
    /// The claim is being deleted.
    pub const ERR_RESOURCE_MARKED_FOR_DELETION: &str = "ErrResourceMarkedForDeletion";
    /// The claim lost its volume.
    pub const ERR_CLAIM_LOST: &str = "ErrClaimLost";
    /// Another pod uses the claim.
    pub const IMPORT_TARGET_IN_USE: &str = "ImportTargetInUse";
    /// Another pod uses the claim.
    pub const UPLOAD_TARGET_IN_USE: &str = "UploadTargetInUse";
    /// Worker pod could not be created.
    pub const ERR_STARTING_POD: &str = "ErrStartingPod";
    /// The DataVolume asks for something this controller does not do.
    pub const UNSUPPORTED_SOURCE: &str = "UnsupportedSource";
    /// Claim bound.
    pub const BOUND: &str = "Bound";
}

/// Running-condition reasons.
pub mod running {
    /// Running=True (upstream's `PodRunningReason`).
    pub const POD_RUNNING: &str = "Pod is running";
    /// Image pull back-off of the worker image.
    pub const IMAGE_PULL_FAILED: &str = "ImagePullFailed";
    /// The importer needs scratch space.
    pub const SCRATCH_SPACE_REQUIRED: &str = "Scratch space required";
    /// Message paired with [`SCRATCH_SPACE_REQUIRED`].
    pub const SCRATCH_SPACE_REQUIRED_MESSAGE: &str = "scratch space required and none found";
    /// Checksum mismatch (fatal).
    pub const CHECKSUM_ERROR: &str = "ChecksumError";
    /// Prefix of every stream failure the importer reports.
    pub const IMAGE_PULL_FAILURE_TEXT: &str = "failed to pull image";
    /// Marker of a legacy plain-text success message that preallocated.
    pub const PREALLOCATION_APPLIED_TEXT: &str = "Preallocation applied";
}

/// Progress text before anything is known.
pub const PROGRESS_NA: &str = "N/A";
/// Progress text of a completed import.
pub const PROGRESS_DONE: &str = "100.0%";
/// Bound-condition reason while a scratch claim is created.
pub const CREATING_SCRATCH: &str = "CreatingScratchSpace";

/// What a DataVolume asks the controller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Run the importer with this `IMPORTER_SOURCE`.
    Import(&'static str),
    /// Run the upload server.
    Upload,
    /// Something this controller does not do (clone, DataSource, external population).
    Unsupported,
}

impl Operation {
    /// From a spec (validated or not).
    pub fn of(spec: &DvSpec) -> Operation {
        let Some(s) = spec.source.as_ref() else {
            return Operation::Unsupported;
        };
        if s.http.is_some() {
            Operation::Import("http")
        } else if s.s3.is_some() {
            Operation::Import("s3")
        } else if s.gcs.is_some() {
            Operation::Import("gcs")
        } else if s.registry.is_some() {
            Operation::Import("registry")
        } else if s.imageio.is_some() {
            Operation::Import("imageio")
        } else if s.vddk.is_some() {
            Operation::Import("vddk")
        } else if s.blank.is_some() {
            Operation::Import("none")
        } else if s.upload.is_some() {
            Operation::Upload
        } else {
            Operation::Unsupported
        }
    }
}

/// An event to publish about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSpec {
    /// Warning (else Normal).
    pub warning: bool,
    /// Reason.
    pub reason: String,
    /// Message (note).
    pub message: String,
}

impl EventSpec {
    /// A Normal event.
    pub fn normal(reason: &str, message: impl Into<String>) -> Self {
        EventSpec {
            warning: false,
            reason: reason.to_string(),
            message: message.into(),
        }
    }

    /// A Warning event.
    pub fn warning(reason: &str, message: impl Into<String>) -> Self {
        EventSpec {
            warning: true,
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

// ---- small PVC / pod accessors ------------------------------------------------------------

/// Annotations of a claim (empty map when none).
pub fn annotations(pvc: &PersistentVolumeClaim) -> BTreeMap<String, String> {
    pvc.metadata.annotations.clone().unwrap_or_default()
}

fn ann_of<'a>(pvc: &'a PersistentVolumeClaim, key: &str) -> Option<&'a str> {
    pvc.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// `status.phase` of a claim (`""` when unknown).
pub fn claim_phase(pvc: &PersistentVolumeClaim) -> &str {
    pvc.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// Volume mode of a claim (Filesystem when unset, as Kubernetes defaults it).
pub fn volume_mode(pvc: &PersistentVolumeClaim) -> &str {
    pvc.spec
        .as_ref()
        .and_then(|s| s.volume_mode.as_deref())
        .unwrap_or("Filesystem")
}

/// `spec.resources.requests.storage` of a claim, as written.
pub fn requested_size(pvc: &PersistentVolumeClaim) -> Option<String> {
    pvc.spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .map(|q| q.0.clone())
}

/// Upstream `IsPVCComplete`: the worker pod succeeded.
pub fn is_pvc_complete(pvc: &PersistentVolumeClaim) -> bool {
    ann_of(pvc, ann::POD_PHASE) == Some("Succeeded")
}

/// Upstream `ShouldDeletePod`: worker pods go after completion unless retained, and always
/// when they must be re-created (scratch, direct I/O) or the claim is going away.
pub fn should_delete_pod(pvc: &PersistentVolumeClaim) -> bool {
    ann_of(pvc, ann::POD_RETAIN_AFTER_COMPLETION) != Some("true")
        || ann_of(pvc, ann::REQUIRES_SCRATCH) == Some("true")
        || ann_of(pvc, ann::REQUIRES_DIRECT_IO) == Some("true")
        || pvc.metadata.deletion_timestamp.is_some()
}

/// Upstream `requiresScratchSpace`: archives and registry pulls always convert through scratch;
/// otherwise only when the importer asked for it.
pub fn requires_scratch(pvc: &PersistentVolumeClaim) -> bool {
    let by_kind = if ann_of(pvc, ann::CONTENT_TYPE) == Some("archive") {
        true
    } else {
        match ann_of(pvc, ann::SOURCE) {
            Some("glance") => true,
            Some("imageio") => ann_of(pvc, ann::CURRENT_CHECKPOINT).is_some_and(|c| !c.is_empty()),
            Some("registry") => ann_of(pvc, ann::REGISTRY_IMPORT_METHOD) != Some("node"),
            _ => false,
        }
    };
    by_kind || ann_of(pvc, ann::REQUIRES_SCRATCH) == Some("true")
}

/// Upstream `pvcRequiresWork`: a claim already populated for this DataVolume
/// (`storage.populatedFor`), or one it may adopt (its `allowClaimAdoption` annotation, else the
/// `DataVolumeClaimAdoption` feature gate; never a claim created for this very DataVolume), needs
/// no import.
pub fn requires_work(pvc: &PersistentVolumeClaim, dv: &DvView, adoption_gate: bool) -> bool {
    if ann_of(pvc, ann::POPULATED_FOR) == Some(dv.name()) {
        return false;
    }
    if ann_of(pvc, ann::CREATED_FOR_DATA_VOLUME) == Some(dv.uid()) {
        return true;
    }
    let allowed = match dv.annotation(ann::ALLOW_CLAIM_ADOPTION) {
        Some(v) => v == "true",
        None => adoption_gate,
    };
    !allowed
}

/// Whether the claim should be worked on by the import reconciler.
pub fn is_import_claim(pvc: &PersistentVolumeClaim) -> bool {
    ann_of(pvc, ann::ENDPOINT).is_some() || ann_of(pvc, ann::SOURCE).is_some()
}

/// Whether the claim is an upload target.
pub fn is_upload_claim(pvc: &PersistentVolumeClaim) -> bool {
    ann_of(pvc, ann::UPLOAD_REQUEST).is_some()
}

/// Upstream `GetSource`: unknown or missing values mean `http`.
pub fn import_source(pvc: &PersistentVolumeClaim) -> &'static str {
    match ann_of(pvc, ann::SOURCE) {
        Some("s3") => "s3",
        Some("gcs") => "gcs",
        Some("glance") => "glance",
        Some("none") => "none",
        Some("registry") => "registry",
        Some("imageio") => "imageio",
        Some("vddk") => "vddk",
        _ => "http",
    }
}

/// Phase of a pod (`""` when unknown).
pub fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// Upstream `isPodReady`: every container ready (and at least one).
pub fn is_pod_ready(pod: &Pod) -> bool {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
    !statuses.is_empty() && statuses.iter().all(|s| s.ready)
}

fn first_state(pod: &Pod) -> Option<(&ContainerState, Option<&ContainerState>)> {
    let cs = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    Some((cs.state.as_ref()?, cs.last_state.as_ref()))
}

/// Upstream `parseTerminationMessage`: the JSON message of a container that exited 0. `Err`
/// holds the raw text when it is not valid JSON.
pub fn termination_message(pod: &Pod) -> Result<Option<TerminationMessage>, String> {
    let Some((state, _)) = first_state(pod) else {
        return Ok(None);
    };
    match &state.terminated {
        Some(t) if t.exit_code == 0 => {
            let text = t.message.as_deref().unwrap_or("");
            serde_json::from_str(text)
                .map(Some)
                .map_err(|_| text.to_string())
        }
        _ => Ok(None),
    }
}

/// Upstream `simplifyKnownMessage` (shared with the workers).
pub fn simplify(message: &str) -> String {
    cdi_api::termination::simplify_known_message(message)
}

// ---- pod → PVC annotations ----------------------------------------------------------------

/// Upstream `setAnnotationsFromPodWithPrefix` for the Running condition: restarts, running
/// state, waiting reasons, termination messages. A container in `CrashLoopBackOff` is reported
/// with the message of its last termination (the kubelet keeps it in `lastState`), so the
/// failure that caused the back-off stays visible.
pub fn set_annotations_from_pod(
    anno: &mut BTreeMap<String, String>,
    pod: &Pod,
    term: Option<&TerminationMessage>,
) {
    let Some(statuses) = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_deref())
        .filter(|s| !s.is_empty())
    else {
        return;
    };
    let prefix = ann::RUNNING_CONDITION;
    let msg_key = ann::RUNNING_CONDITION_MESSAGE.to_string();
    let reason_key = ann::RUNNING_CONDITION_REASON.to_string();
    let ann_restarts: i32 = anno
        .get(ann::POD_RESTARTS)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    if statuses[0].restart_count >= ann_restarts {
        anno.insert(
            ann::POD_RESTARTS.into(),
            statuses[0].restart_count.to_string(),
        );
    }
    let running = statuses
        .iter()
        .all(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()));
    if running {
        anno.insert(prefix.into(), "true".into());
        anno.insert(msg_key, String::new());
        anno.insert(reason_key, running::POD_RUNNING.into());
        return;
    }
    anno.insert(prefix.into(), "false".into());
    for s in statuses {
        let waiting = s.state.as_ref().and_then(|st| st.waiting.as_ref());
        if s.started == Some(false)
            && let Some(w) = waiting
            && matches!(
                w.reason.as_deref(),
                Some("ImagePullBackOff" | "ErrImagePull" | "InvalidImageName")
            )
        {
            anno.insert(
                msg_key,
                format!("{}: {}", running::IMAGE_PULL_FAILURE_TEXT, s.image),
            );
            anno.insert(reason_key, running::IMAGE_PULL_FAILED.into());
            return;
        }
    }
    let state = statuses[0].state.clone().unwrap_or_default();
    if let Some(w) = &state.waiting {
        let reason = w.reason.as_deref().unwrap_or("");
        if reason != "CrashLoopBackOff" {
            anno.insert(msg_key, simplify(w.message.as_deref().unwrap_or("")));
            anno.insert(reason_key, reason.to_string());
            return;
        }
    }
    // In back-off the current state is Waiting; the failure is in the last termination.
    let terminated = state.terminated.clone().or_else(|| {
        statuses[0]
            .last_state
            .as_ref()
            .and_then(|l| l.terminated.clone())
    });
    let Some(t) = terminated else { return };
    let text = t.message.clone().unwrap_or_default();
    match term {
        Some(m) if state.terminated.is_some() => {
            if m.scratch_space_required == Some(true) {
                anno.insert(ann::REQUIRES_SCRATCH.into(), "true".into());
                anno.insert(msg_key, running::SCRATCH_SPACE_REQUIRED_MESSAGE.into());
                anno.insert(reason_key, running::SCRATCH_SPACE_REQUIRED.into());
                return;
            }
            if let Some(message) = &m.message {
                anno.insert(msg_key, message.clone());
            }
            if m.preallocation_applied == Some(true) {
                anno.insert(ann::PREALLOCATION_APPLIED.into(), "true".into());
            }
        }
        _ => {
            anno.insert(msg_key, simplify(text.trim()));
            if text.contains(running::PREALLOCATION_APPLIED_TEXT) {
                anno.insert(ann::PREALLOCATION_APPLIED.into(), "true".into());
            }
            if text.contains(running::IMAGE_PULL_FAILURE_TEXT) {
                anno.insert(reason_key, running::IMAGE_PULL_FAILED.into());
                return;
            }
        }
    }
    anno.insert(reason_key, t.reason.unwrap_or_default());
}

/// Checksum mismatches are the one failure upstream never retries.
fn is_checksum_failure(message: &str) -> bool {
    message.to_ascii_lowercase().contains("checksum mismatch")
}

/// What the import reconciler does after looking at the importer pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportStep {
    /// The claim's annotations as they should be.
    pub annotations: BTreeMap<String, String>,
    /// Events about the claim.
    pub events: Vec<EventSpec>,
    /// Delete the pod (done, fatal, or to re-create it with scratch space).
    pub delete_pod: bool,
    /// The pod waits for a scratch claim that must be created.
    pub create_scratch: bool,
}

/// Upstream `updatePvcFromPod` for an importer pod.
pub fn observe_import_pod(pvc: &PersistentVolumeClaim, pod: &Pod) -> ImportStep {
    let mut anno = annotations(pvc);
    let mut events = Vec::new();
    let term = termination_message(pod).ok().flatten();
    set_annotations_from_pod(&mut anno, pod, term.as_ref());

    // A checksum mismatch is reported with exit 0 (the importer removed the data) or, from
    // older workers, as a failure text; either way it is permanent.
    let fatal_text = term
        .as_ref()
        .and_then(|m| m.message.clone())
        .filter(|m| is_checksum_failure(m))
        .or_else(|| {
            first_state(pod)
                .and_then(|(st, last)| {
                    st.terminated
                        .as_ref()
                        .or(last.and_then(|l| l.terminated.as_ref()))
                })
                .filter(|t| t.exit_code != 0)
                .and_then(|t| t.message.clone())
                .filter(|m| is_checksum_failure(m))
        });
    if let Some(text) = &fatal_text
        && anno.get(ann::IMPORT_FATAL_ERROR).map(String::as_str) != Some("true")
    {
        anno.insert(ann::POD_PHASE.into(), "Failed".into());
        anno.insert(ann::IMPORT_FATAL_ERROR.into(), "true".into());
        anno.insert(ann::RUNNING_CONDITION.into(), "false".into());
        let line = simplify(cdi_api::termination::failure_line(text).as_str());
        anno.insert(ann::RUNNING_CONDITION_MESSAGE.into(), line.clone());
        anno.insert(
            ann::RUNNING_CONDITION_REASON.into(),
            running::CHECKSUM_ERROR.into(),
        );
        events.push(EventSpec::warning(reason::ERR_IMPORT_FAILED, line));
    }

    let scratch_required = term
        .as_ref()
        .is_some_and(|m| m.scratch_space_required == Some(true));
    let mut modifications = scratch_required;
    if let Some((state, last)) = first_state(pod) {
        let oom = [Some(state), last]
            .into_iter()
            .flatten()
            .filter_map(|s| s.terminated.as_ref())
            .any(|t| t.reason.as_deref() == Some("OOMKilled"));
        if oom {
            modifications = true;
            anno.insert(ann::REQUIRES_DIRECT_IO.into(), "true".into());
        }
        if let Some(t) = &state.terminated
            && t.exit_code > 0
        {
            events.push(EventSpec::warning(
                reason::ERR_IMPORT_FAILED,
                t.message.clone().unwrap_or_default(),
            ));
        }
    }
    let name = pod.metadata.name.clone().unwrap_or_default();
    anno.insert(ann::IMPORT_POD.into(), name);
    let fatal = anno.get(ann::IMPORT_FATAL_ERROR).map(String::as_str) == Some("true");
    if !modifications && !fatal {
        // With scratch (or direct I/O) required the pod may exit cleanly; mirroring that phase
        // would wrongly mark the import complete.
        anno.insert(ann::POD_PHASE.into(), pod_phase(pod).to_string());
    }
    let schedulable = !(anno.get(ann::POD_PHASE).map(String::as_str) == Some("Pending")
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable")));
    anno.insert(ann::POD_SCHEDULABLE.into(), schedulable.to_string());

    let mut with_updates = pvc.clone();
    with_updates.metadata.annotations = Some(anno.clone());
    let create_scratch = pod_phase(pod) == "Pending" && requires_scratch(&with_updates);
    if !create_scratch
        && anno.get(ann::BOUND_CONDITION_REASON).map(String::as_str) == Some(CREATING_SCRATCH)
    {
        anno.remove(ann::BOUND_CONDITION);
        anno.remove(ann::BOUND_CONDITION_MESSAGE);
        anno.remove(ann::BOUND_CONDITION_REASON);
        with_updates.metadata.annotations = Some(anno.clone());
    }
    let complete = is_pvc_complete(&with_updates);
    let delete_pod = if fatal {
        true
    } else if complete || modifications {
        if !modifications {
            events.push(EventSpec::normal(
                reason::IMPORT_SUCCEEDED,
                "Import Successful",
            ));
        }
        should_delete_pod(&with_updates)
    } else {
        false
    };
    ImportStep {
        annotations: anno,
        events,
        delete_pod,
        create_scratch,
    }
}

/// What the upload reconciler does after looking at the upload pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadStep {
    /// The claim's annotations as they should be.
    pub annotations: BTreeMap<String, String>,
    /// The server's deadline passed: delete the pod so a new one gets fresh certificates.
    pub delete_pod: bool,
}

/// Upstream upload `reconcilePVC` after the pod exists.
pub fn observe_upload_pod(pvc: &PersistentVolumeClaim, pod: &Pod) -> UploadStep {
    let mut anno = annotations(pvc);
    let term = termination_message(pod).ok().flatten();
    let deadline_passed = term
        .as_ref()
        .is_some_and(|m| m.deadline_passed == Some(true));
    if deadline_passed {
        anno.insert(ann::POD_PHASE.into(), String::new());
        anno.insert(ann::POD_READY.into(), "false".into());
    } else {
        anno.insert(ann::POD_PHASE.into(), pod_phase(pod).to_string());
        anno.insert(ann::POD_READY.into(), is_pod_ready(pod).to_string());
    }
    set_annotations_from_pod(&mut anno, pod, term.as_ref());
    UploadStep {
        annotations: anno,
        delete_pod: deadline_passed && pod.metadata.deletion_timestamp.is_none(),
    }
}

// ---- DataVolume status --------------------------------------------------------------------

/// Everything [`dv_status`] looks at.
#[derive(Debug, Clone)]
pub struct StatusInput<'a> {
    /// The DataVolume.
    pub dv: &'a DvView,
    /// What it asks for.
    pub op: Operation,
    /// Its claim, if one exists.
    pub pvc: Option<&'a PersistentVolumeClaim>,
    /// False when the claim already holds the data (populated for / adopted).
    pub requires_work: bool,
    /// Why no claim could be made: (reason, message) for the Bound condition.
    pub claim_error: Option<(&'a str, &'a str)>,
    /// Freshly scraped progress percentage.
    pub progress: Option<f64>,
    /// Current time, RFC 3339.
    pub now: &'a str,
}

/// The new status and the events due.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusOutcome {
    /// New status (equal to the old one when nothing changed).
    pub status: DvStatus,
    /// Events to publish after the status is written.
    pub events: Vec<EventSpec>,
}

/// Upstream `updateStatus` + `updateConditions` + `emitEvent` for import and upload
/// DataVolumes.
pub fn dv_status(input: &StatusInput<'_>) -> StatusOutcome {
    let old = input.dv.status.clone().unwrap_or_default();
    let mut st = old.clone();
    let cur_phase = old.phase.clone();
    let mut event: Option<EventSpec> = None;
    let mut bound_reason = "";
    let mut bound_message = "";

    if let Some((r, m)) = input.claim_error.filter(|_| input.pvc.is_none()) {
        st.phase = phase::UNSET.into();
        bound_reason = r;
        bound_message = m;
    } else if input.op == Operation::Unsupported {
        st.phase = phase::FAILED.into();
        bound_reason = reason::UNSUPPORTED_SOURCE;
        bound_message = "this controller does not support the DataVolume's source";
        event = Some(EventSpec::warning(bound_reason, bound_message));
    } else if input.pvc.is_none() {
        if st.phase.is_empty() {
            st.phase = phase::PENDING.into();
        }
    } else if let Some(pvc) = input
        .pvc
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        st.claim_name = pvc.metadata.name.clone();
        let pod_phase = ann_of(pvc, ann::POD_PHASE);
        if pod_phase == Some("Succeeded") && input.requires_work {
            op_phase(input.op, pvc, input.requires_work, &mut st, &mut event);
        } else {
            match claim_phase(pvc) {
                "Pending" => {
                    st.phase = if input.requires_work {
                        phase::PENDING
                    } else {
                        phase::SUCCEEDED
                    }
                    .into();
                }
                "Bound" => {
                    if matches!(
                        st.phase.as_str(),
                        phase::PENDING | phase::WAIT_FOR_FIRST_CONSUMER | phase::UNKNOWN
                    ) {
                        st.phase = phase::PVC_BOUND.into();
                    }
                    if input.requires_work {
                        op_phase(input.op, pvc, input.requires_work, &mut st, &mut event);
                    } else {
                        st.phase = phase::SUCCEEDED.into();
                    }
                }
                "Lost" => {
                    st.phase = phase::FAILED.into();
                    event = Some(EventSpec::warning(
                        reason::ERR_CLAIM_LOST,
                        format!("PVC {} lost", pvc.metadata.name.as_deref().unwrap_or("")),
                    ));
                }
                "" => {}
                _ => st.phase = phase::UNKNOWN.into(),
            }
        }
        if let Some(r) = ann_of(pvc, ann::POD_RESTARTS).and_then(|r| r.parse::<i32>().ok())
            && r >= 0
        {
            st.restart_count = r;
        }
        if st.progress.as_deref().unwrap_or("").is_empty() {
            st.progress = Some(PROGRESS_NA.into());
        }
        if let Some(p) = input.progress
            && st.phase != phase::SUCCEEDED
            && st.phase != phase::FAILED
        {
            st.progress = Some(progress_text(p));
        }
    }

    let original = old.conditions.clone();
    update_conditions(&mut st, input.pvc, bound_reason, bound_message, input.now);
    let mut events = Vec::new();
    if st != old {
        if let Some(ev) = event
            && cur_phase != st.phase
        {
            events.push(ev);
        }
        let bound_is_error = input.pvc.is_none() && input.claim_error.is_some();
        events.extend(condition_events(&st, &original, bound_is_error));
    }
    StatusOutcome { status: st, events }
}

/// Per-operation phase from the worker's mirrored pod phase (upstream's import/upload
/// `updateStatusPhase`).
fn op_phase(
    op: Operation,
    pvc: &PersistentVolumeClaim,
    requires_work: bool,
    st: &mut DvStatus,
    event: &mut Option<EventSpec>,
) {
    let name = pvc.metadata.name.as_deref().unwrap_or("");
    let pod_phase = ann_of(pvc, ann::POD_PHASE);
    let pod_ann = match op {
        Operation::Upload => ann::UPLOAD_POD,
        _ => ann::IMPORT_POD,
    };
    if pod_phase != Some("Succeeded") {
        let should_update =
            ann_of(pvc, pod_ann).is_some() && claim_phase(pvc) == "Bound" && requires_work;
        if !should_update {
            return;
        }
    }
    match op {
        Operation::Upload => {
            st.phase = phase::UPLOAD_SCHEDULED.into();
            match pod_phase {
                Some("Pending") => {
                    *event = Some(EventSpec::normal(
                        reason::UPLOAD_SCHEDULED,
                        format!("Upload into {name} scheduled"),
                    ));
                }
                Some("Running") if ann_of(pvc, ann::POD_READY) == Some("true") => {
                    st.phase = phase::UPLOAD_READY.into();
                    *event = Some(EventSpec::normal(
                        reason::UPLOAD_READY,
                        format!("Upload into {name} ready"),
                    ));
                }
                Some("Failed") => {
                    *event = Some(EventSpec::warning(
                        reason::UPLOAD_FAILED,
                        format!("Upload into {name} failed"),
                    ));
                }
                Some("Succeeded") => {
                    st.phase = phase::SUCCEEDED.into();
                    *event = Some(EventSpec::normal(
                        reason::UPLOAD_SUCCEEDED,
                        format!("Successfully uploaded into {name}"),
                    ));
                }
                _ => {}
            }
        }
        _ => {
            st.phase = phase::IMPORT_SCHEDULED.into();
            match pod_phase {
                Some("Pending") => {
                    *event = Some(EventSpec::normal(
                        reason::IMPORT_SCHEDULED,
                        format!("Import into {name} scheduled"),
                    ));
                }
                Some("Running") => {
                    st.phase = phase::IMPORT_IN_PROGRESS.into();
                    *event = Some(EventSpec::normal(
                        reason::IMPORT_IN_PROGRESS,
                        format!("Import into {name} in progress"),
                    ));
                }
                Some("Failed") => {
                    if ann_of(pvc, ann::IMPORT_FATAL_ERROR) == Some("true") {
                        st.phase = phase::FAILED.into();
                    }
                    *event = Some(EventSpec::warning(
                        reason::IMPORT_FAILED,
                        format!("Failed to import into PVC {name}"),
                    ));
                }
                Some("Succeeded") => {
                    st.phase = phase::SUCCEEDED.into();
                    st.progress = Some(PROGRESS_DONE.into());
                    *event = Some(EventSpec::normal(
                        reason::IMPORT_SUCCEEDED,
                        format!("Successfully imported into PVC {name}"),
                    ));
                }
                _ => {}
            }
        }
    }
}

fn find<'a>(conds: &'a [DvCondition], type_: &str) -> Option<&'a DvCondition> {
    conds.iter().find(|c| c.type_ == type_)
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// Upstream `updateCondition`: a status change moves the transition time; a message or reason
/// change only the heartbeat; otherwise nothing changes (so steady states write nothing).
pub fn update_condition(
    conds: &mut Vec<DvCondition>,
    type_: &str,
    status: &str,
    message: &str,
    reason: &str,
    now: &str,
) {
    if !conds.iter().any(|c| c.type_ == type_) {
        conds.push(DvCondition {
            type_: type_.to_string(),
            ..Default::default()
        });
    }
    let Some(c) = conds.iter_mut().find(|c| c.type_ == type_) else {
        return;
    };
    let (message, reason) = (non_empty(message), non_empty(reason));
    if c.status != status {
        c.last_transition_time = Some(now.to_string());
        c.last_heartbeat_time = Some(now.to_string());
        c.message = message;
        c.reason = reason;
    } else if c.message != message || c.reason != reason {
        c.message = message;
        c.reason = reason;
        c.last_heartbeat_time = Some(now.to_string());
    }
    c.status = status.to_string();
}

fn update_conditions(
    st: &mut DvStatus,
    pvc: Option<&PersistentVolumeClaim>,
    reason: &str,
    message: &str,
    now: &str,
) {
    let empty = BTreeMap::new();
    let anno = pvc
        .and_then(|p| p.metadata.annotations.as_ref())
        .unwrap_or(&empty);
    let ready = match st.phase.as_str() {
        phase::SUCCEEDED => "True",
        phase::UNKNOWN => "Unknown",
        _ => "False",
    };
    let conds = &mut st.conditions;
    // Bound.
    match pvc {
        Some(pvc) => {
            let name = pvc.metadata.name.as_deref().unwrap_or("");
            let pvc_cond = anno.get(ann::BOUND_CONDITION).map(|v| {
                let status = match v.to_ascii_lowercase().as_str() {
                    "true" => "True",
                    "false" => "False",
                    _ => "Unknown",
                };
                (
                    status,
                    anno.get(ann::BOUND_CONDITION_MESSAGE)
                        .cloned()
                        .unwrap_or_default(),
                    anno.get(ann::BOUND_CONDITION_REASON)
                        .cloned()
                        .unwrap_or_default(),
                )
            });
            let overridden = pvc_cond.as_ref().filter(|c| c.0 != "True");
            match claim_phase(pvc) {
                "Bound" => match overridden {
                    None => update_condition(
                        conds,
                        "Bound",
                        "True",
                        &format!("PVC {name} Bound"),
                        reason::BOUND,
                        now,
                    ),
                    Some((_, m, r)) => {
                        update_condition(conds, "Bound", "False", m, r, now);
                        update_condition(conds, "Ready", "False", "", "", now);
                    }
                },
                "Pending" => {
                    match overridden {
                        None => update_condition(
                            conds,
                            "Bound",
                            "False",
                            &format!("PVC {name} Pending"),
                            "Pending",
                            now,
                        ),
                        Some((_, m, r)) => update_condition(
                            conds,
                            "Bound",
                            "False",
                            &format!("target PVC {name} Pending and {m}"),
                            r,
                            now,
                        ),
                    }
                    update_condition(conds, "Ready", "False", "", "", now);
                }
                "Lost" => {
                    update_condition(conds, "Bound", "False", "Claim Lost", "ClaimLost", now);
                    update_condition(conds, "Ready", "False", "", "", now);
                }
                _ => {
                    update_condition(conds, "Bound", "False", "", "", now);
                    update_condition(conds, "Ready", "False", "", "", now);
                }
            }
        }
        None => {
            let message = if message.is_empty() {
                "No PVC found"
            } else {
                message
            };
            let reason = if reason.is_empty() {
                "NotFound"
            } else {
                reason
            };
            update_condition(conds, "Bound", "False", message, reason, now);
            update_condition(conds, "Ready", "False", "", "", now);
        }
    }
    // Ready.
    let (ready_msg, ready_reason) = if pvc.is_none() {
        (message, reason)
    } else {
        ("", "")
    };
    update_condition(conds, "Ready", ready, ready_msg, ready_reason, now);
    // Running.
    let get = |k: &str| anno.get(k).map(String::as_str).unwrap_or("");
    if anno.get(ann::POD_SCHEDULABLE).map(String::as_str) == Some("false") {
        update_condition(
            conds,
            "Running",
            "False",
            "Importer pod cannot be scheduled",
            "Unschedulable",
            now,
        );
    } else if let Some(v) = anno.get(ann::RUNNING_CONDITION) {
        let msg = get(ann::RUNNING_CONDITION_MESSAGE);
        let rsn = get(ann::RUNNING_CONDITION_REASON);
        match v.to_ascii_lowercase().as_str() {
            "true" => {
                update_condition(conds, "Running", "True", msg, rsn, now);
                update_condition(conds, "Ready", "False", "", "TransferRunning", now);
            }
            "false" => update_condition(conds, "Running", "False", msg, rsn, now),
            _ => update_condition(conds, "Running", "Unknown", msg, rsn, now),
        }
    } else {
        update_condition(
            conds,
            "Running",
            "False",
            get(ann::RUNNING_CONDITION_MESSAGE),
            get(ann::RUNNING_CONDITION_REASON),
            now,
        );
    }
}

/// Upstream `emitConditionEvent`: a Normal event when the Bound condition changes (a Warning
/// when it carries why no claim could be made); a Warning with the Running condition's reason
/// when a bound, not-ready, not-running DataVolume gets a new failure message (scratch-space
/// requests are not failures).
fn condition_events(
    st: &DvStatus,
    original: &[DvCondition],
    bound_is_error: bool,
) -> Vec<EventSpec> {
    let mut out = Vec::new();
    let cur_bound = find(&st.conditions, "Bound");
    if let Some(b) = cur_bound {
        let org = find(original, "Bound");
        let changed = org
            .is_none_or(|o| o.status != b.status || o.reason != b.reason || o.message != b.message);
        if changed && b.reason.is_some() {
            let r = b.reason.clone().unwrap_or_default();
            let m = b.message.clone().unwrap_or_default();
            out.push(if !bound_is_error {
                EventSpec::normal(&r, m)
            } else {
                EventSpec::warning(&r, m)
            });
        }
    }
    let (Some(ready), Some(bound), Some(run)) = (
        find(&st.conditions, "Ready"),
        cur_bound,
        find(&st.conditions, "Running"),
    ) else {
        return out;
    };
    let org_run = find(original, "Running");
    if ready.status == "False" && run.status == "False" && bound.status == "True" {
        let msg = run.message.clone().unwrap_or_default();
        if !msg.is_empty()
            && msg != running::SCRATCH_SPACE_REQUIRED_MESSAGE
            && org_run.is_none_or(|o| o.message.as_deref() != Some(msg.as_str()))
        {
            out.push(EventSpec::warning(run.reason.as_deref().unwrap_or(""), msg));
        }
    }
    out
}

// ---- progress -----------------------------------------------------------------------------

/// Metric names the progress scrape accepts (import and clone report the same way).
const PROGRESS_METRICS: [&str; 2] = [
    "kubevirt_cdi_import_progress_total",
    "kubevirt_cdi_clone_progress_total",
];

/// The progress percentage of `owner_uid` in a Prometheus text body; `None` if absent.
pub fn parse_progress(body: &str, owner_uid: &str) -> Option<f64> {
    let label = format!("{{ownerUID=\"{owner_uid}\"}}");
    body.lines().find_map(|line| {
        let rest = PROGRESS_METRICS
            .iter()
            .find_map(|m| line.strip_prefix(m)?.strip_prefix(label.as_str()))?;
        let v: f64 = rest.split_whitespace().next()?.parse().ok()?;
        (0.0..=100.0).contains(&v).then_some(v)
    })
}

/// `status.progress` text for a percentage (upstream's `"%.2f%%"`).
pub fn progress_text(pct: f64) -> String {
    format!("{pct:.2}%")
}

// ---- storage classes ----------------------------------------------------------------------

/// Pick the storage class for a claim that names none: the virt default (kubevirt content
/// only), else the Kubernetes default; among several defaults the newest, then by name
/// (upstream `GetPlatformDefaultStorageClass`).
pub fn default_class(classes: &[StorageClass], kubevirt_content: bool) -> Option<String> {
    let is = |c: &StorageClass, key: &str| {
        c.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .is_some_and(|v| v == "true")
    };
    let newest = |key: &str| {
        classes
            .iter()
            .filter(|c| is(c, key))
            .max_by(|a, b| {
                let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
                let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
                ta.cmp(&tb)
                    .then_with(|| b.metadata.name.cmp(&a.metadata.name))
            })
            .and_then(|c| c.metadata.name.clone())
    };
    if kubevirt_content && let Some(c) = newest(ann::DEFAULT_VIRT_STORAGE_CLASS) {
        return Some(c);
    }
    newest(ann::DEFAULT_STORAGE_CLASS)
}

#[cfg(test)]
mod tests;
