use serde_json::{Value, json};

use super::*;

fn pvc(anns: Value, phase: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": "dv", "namespace": "ns", "uid": "pvc-uid", "annotations": anns,
            "ownerReferences": [{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                "name": "dv", "uid": "dv-uid", "controller": true}]},
        "spec": {"resources": {"requests": {"storage": "1Gi"}}},
        "status": {"phase": phase},
    }))
    .unwrap()
}

fn pod(phase: &str, status: Value) -> Pod {
    let mut st = json!({"phase": phase});
    if let Some(m) = status.as_object() {
        for (k, v) in m {
            st[k] = v.clone();
        }
    }
    serde_json::from_value(json!({
        "metadata": {"name": "importer-dv", "namespace": "ns", "uid": "pod-uid"},
        "status": st,
    }))
    .unwrap()
}

fn terminated(code: i32, message: &str, reason: &str, restarts: i32) -> Value {
    json!({"containerStatuses": [{"name": "importer", "image": "cdi:latest", "imageID": "",
        "ready": false, "restartCount": restarts,
        "state": {"terminated": {"exitCode": code, "message": message, "reason": reason}}}]})
}

fn dv(phase: &str) -> DvView {
    serde_json::from_value(json!({
        "metadata": {"name": "dv", "namespace": "ns", "uid": "dv-uid"},
        "spec": {"source": {"http": {"url": "http://h/x"}}, "storage": {}},
        "status": if phase.is_empty() { Value::Null } else { json!({"phase": phase}) },
    }))
    .unwrap()
}

fn cond<'a>(st: &'a DvStatus, t: &str) -> &'a DvCondition {
    st.conditions.iter().find(|c| c.type_ == t).unwrap()
}

#[test]
fn running_pod_sets_running_annotations() {
    let p = pod(
        "Running",
        json!({"containerStatuses": [{"name": "importer", "image": "i", "imageID": "",
            "ready": true, "restartCount": 2, "state": {"running": {}}}]}),
    );
    let step = observe_import_pod(&pvc(json!({}), "Bound"), &p);
    let a = &step.annotations;
    assert_eq!(a[ann::POD_PHASE], "Running");
    assert_eq!(a[ann::POD_RESTARTS], "2");
    assert_eq!(a[ann::RUNNING_CONDITION], "true");
    assert_eq!(a[ann::RUNNING_CONDITION_REASON], "Pod is running");
    assert_eq!(a[ann::IMPORT_POD], "importer-dv");
    assert_eq!(a[ann::POD_SCHEDULABLE], "true");
    assert!(!step.delete_pod);
}

#[test]
fn success_deletes_pod_unless_retained() {
    let msg = r#"{"preallocationApplied":true,"message":"Import Complete"}"#;
    let p = pod("Succeeded", terminated(0, msg, "Completed", 0));
    let step = observe_import_pod(&pvc(json!({}), "Bound"), &p);
    assert_eq!(step.annotations[ann::POD_PHASE], "Succeeded");
    assert_eq!(
        step.annotations[ann::RUNNING_CONDITION_MESSAGE],
        "Import Complete"
    );
    assert_eq!(step.annotations[ann::RUNNING_CONDITION_REASON], "Completed");
    assert_eq!(step.annotations[ann::PREALLOCATION_APPLIED], "true");
    assert!(step.delete_pod);
    assert!(step.events.iter().any(|e| e.reason == "ImportSucceeded"));
    let kept = observe_import_pod(
        &pvc(json!({ann::POD_RETAIN_AFTER_COMPLETION: "true"}), "Bound"),
        &p,
    );
    assert!(!kept.delete_pod);
}

#[test]
fn scratch_request_restarts_without_marking_complete() {
    let p = pod(
        "Succeeded",
        terminated(0, r#"{"scratchSpaceRequired":true}"#, "Completed", 0),
    );
    let step = observe_import_pod(
        &pvc(json!({ann::POD_RETAIN_AFTER_COMPLETION: "true"}), "Bound"),
        &p,
    );
    assert_eq!(step.annotations[ann::REQUIRES_SCRATCH], "true");
    assert_eq!(
        step.annotations[ann::RUNNING_CONDITION_REASON],
        "Scratch space required"
    );
    assert!(!step.annotations.contains_key(ann::POD_PHASE));
    // Even a retained pod goes: it must be re-created with /scratch.
    assert!(step.delete_pod);
    assert!(!step.events.iter().any(|e| e.reason == "ImportSucceeded"));
}

#[test]
fn checksum_mismatch_is_fatal() {
    let msg = r#"{"message":"Unable to process data: checksum mismatch: expected sha256:aa"}"#;
    let p = pod("Succeeded", terminated(0, msg, "Completed", 0));
    let step = observe_import_pod(&pvc(json!({}), "Bound"), &p);
    let a = &step.annotations;
    assert_eq!(a[ann::IMPORT_FATAL_ERROR], "true");
    assert_eq!(a[ann::POD_PHASE], "Failed");
    assert_eq!(a[ann::RUNNING_CONDITION_REASON], "ChecksumError");
    assert!(step.delete_pod);
    assert!(
        step.events
            .iter()
            .any(|e| e.reason == "ErrImportFailed" && e.warning)
    );
}

#[test]
fn crash_loop_reports_last_failure_and_counts_restarts() {
    let p = pod(
        "Running",
        json!({"containerStatuses": [{"name": "importer", "image": "i", "imageID": "",
            "ready": false, "restartCount": 3,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                "message": "Unable to connect to http data source: expected status code 200, got 404"}}}]}),
    );
    let step = observe_import_pod(&pvc(json!({ann::POD_RESTARTS: "2"}), "Bound"), &p);
    let a = &step.annotations;
    assert_eq!(a[ann::POD_RESTARTS], "3");
    assert_eq!(a[ann::RUNNING_CONDITION], "false");
    assert_eq!(a[ann::RUNNING_CONDITION_REASON], "Error");
    assert!(a[ann::RUNNING_CONDITION_MESSAGE].contains("got 404"));
    assert_eq!(a[ann::POD_PHASE], "Running");
    assert!(!step.delete_pod);
}

#[test]
fn capacity_failures_are_simplified_and_retried() {
    let p = pod(
        "Running",
        terminated(
            1,
            "write /data/disk.img: no space left on device",
            "Error",
            1,
        ),
    );
    let step = observe_import_pod(&pvc(json!({}), "Bound"), &p);
    assert_eq!(
        step.annotations[ann::RUNNING_CONDITION_MESSAGE],
        "DataVolume too small to contain image"
    );
    assert!(!step.annotations.contains_key(ann::IMPORT_FATAL_ERROR));
    assert!(step.events.iter().any(|e| e.reason == "ErrImportFailed"));
}

#[test]
fn image_pull_back_off_of_the_worker_image() {
    let p = pod(
        "Pending",
        json!({"containerStatuses": [{"name": "importer", "image": "cdi:bad", "imageID": "",
            "ready": false, "restartCount": 0, "started": false,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "nope"}}}]}),
    );
    let mut a = BTreeMap::new();
    set_annotations_from_pod(&mut a, &p, None);
    assert_eq!(a[ann::RUNNING_CONDITION_REASON], "ImagePullFailed");
    assert_eq!(
        a[ann::RUNNING_CONDITION_MESSAGE],
        "failed to pull image: cdi:bad"
    );
}

#[test]
fn upload_deadline_resets_phase_and_deletes_pod() {
    let p = pod(
        "Succeeded",
        terminated(
            0,
            r#"{"deadlinePassed":true,"message":"Deadline Passed"}"#,
            "Completed",
            0,
        ),
    );
    let step = observe_upload_pod(&pvc(json!({ann::UPLOAD_REQUEST: ""}), "Bound"), &p);
    assert_eq!(step.annotations[ann::POD_PHASE], "");
    assert_eq!(step.annotations[ann::POD_READY], "false");
    assert!(step.delete_pod);
    let done = pod(
        "Succeeded",
        terminated(0, r#"{"message":"Upload Complete"}"#, "Completed", 0),
    );
    let step = observe_upload_pod(&pvc(json!({ann::UPLOAD_REQUEST: ""}), "Bound"), &done);
    assert_eq!(step.annotations[ann::POD_PHASE], "Succeeded");
    assert_eq!(
        step.annotations[ann::RUNNING_CONDITION_MESSAGE],
        "Upload Complete"
    );
    assert!(!step.delete_pod);
}

fn status(dv: &DvView, op: Operation, pvc: Option<&PersistentVolumeClaim>) -> StatusOutcome {
    dv_status(&StatusInput {
        dv,
        op,
        pvc,
        requires_work: true,
        claim_error: None,
        progress: None,
        now: "t1",
    })
}

#[test]
fn no_claim_is_pending_with_not_found() {
    let out = status(&dv(""), Operation::Import("http"), None);
    assert_eq!(out.status.phase, "Pending");
    let b = cond(&out.status, "Bound");
    assert_eq!(
        (b.status.as_str(), b.reason.as_deref(), b.message.as_deref()),
        ("False", Some("NotFound"), Some("No PVC found"))
    );
    assert_eq!(cond(&out.status, "Ready").status, "False");
    assert_eq!(cond(&out.status, "Running").status, "False");
}

#[test]
fn bound_claim_moves_through_import_phases_with_events() {
    let claim = pvc(json!({ann::IMPORT_POD: "importer-dv"}), "Bound");
    let out = status(&dv("Pending"), Operation::Import("http"), Some(&claim));
    assert_eq!(out.status.phase, "ImportScheduled");
    assert_eq!(out.status.claim_name.as_deref(), Some("dv"));
    assert_eq!(out.status.progress.as_deref(), Some("N/A"));
    let b = cond(&out.status, "Bound");
    assert_eq!(b.message.as_deref(), Some("PVC dv Bound"));
    assert!(out.events.iter().any(|e| e.reason == "Bound" && !e.warning));

    let running = pvc(
        json!({ann::IMPORT_POD: "importer-dv", ann::POD_PHASE: "Running",
            ann::RUNNING_CONDITION: "true", ann::RUNNING_CONDITION_REASON: "Pod is running",
            ann::POD_RESTARTS: "1"}),
        "Bound",
    );
    let mut d = dv("ImportScheduled");
    d.status = Some(out.status.clone());
    let out = dv_status(&StatusInput {
        dv: &d,
        op: Operation::Import("http"),
        pvc: Some(&running),
        requires_work: true,
        claim_error: None,
        progress: Some(45.3412),
        now: "t2",
    });
    assert_eq!(out.status.phase, "ImportInProgress");
    assert_eq!(out.status.progress.as_deref(), Some("45.34%"));
    assert_eq!(out.status.restart_count, 1);
    let r = cond(&out.status, "Running");
    assert_eq!(
        (r.status.as_str(), r.reason.as_deref()),
        ("True", Some("Pod is running"))
    );
    assert_eq!(
        cond(&out.status, "Ready").reason.as_deref(),
        Some("TransferRunning")
    );
    assert!(out.events.contains(&EventSpec::normal(
        "ImportInProgress",
        "Import into dv in progress"
    )));

    let done = pvc(
        json!({ann::IMPORT_POD: "importer-dv", ann::POD_PHASE: "Succeeded",
            ann::RUNNING_CONDITION: "false", ann::RUNNING_CONDITION_MESSAGE: "Import Complete",
            ann::RUNNING_CONDITION_REASON: "Completed"}),
        "Bound",
    );
    d.status = Some(out.status);
    let out = status(&d, Operation::Import("http"), Some(&done));
    assert_eq!(out.status.phase, "Succeeded");
    assert_eq!(out.status.progress.as_deref(), Some("100.0%"));
    assert_eq!(cond(&out.status, "Ready").status, "True");
    assert!(out.events.contains(&EventSpec::normal(
        "ImportSucceeded",
        "Successfully imported into PVC dv"
    )));
    // A steady state writes nothing and says nothing.
    d.status = Some(out.status.clone());
    let again = status(&d, Operation::Import("http"), Some(&done));
    assert_eq!(again.status, out.status);
    assert!(again.events.is_empty());
}

#[test]
fn fatal_failure_fails_the_datavolume_and_warns_once() {
    let failed = pvc(
        json!({ann::IMPORT_POD: "importer-dv", ann::POD_PHASE: "Failed",
            ann::IMPORT_FATAL_ERROR: "true", ann::RUNNING_CONDITION: "false",
            ann::RUNNING_CONDITION_MESSAGE: "checksum mismatch",
            ann::RUNNING_CONDITION_REASON: "ChecksumError"}),
        "Bound",
    );
    let out = status(
        &dv("ImportInProgress"),
        Operation::Import("http"),
        Some(&failed),
    );
    assert_eq!(out.status.phase, "Failed");
    assert!(
        out.events
            .iter()
            .any(|e| e.reason == "ImportFailed" && e.warning)
    );
    assert!(
        out.events
            .iter()
            .any(|e| e.reason == "ChecksumError" && e.message == "checksum mismatch")
    );
}

#[test]
fn retried_failure_keeps_phase_and_counts_restarts() {
    let retrying = pvc(
        json!({ann::IMPORT_POD: "importer-dv", ann::POD_PHASE: "Running",
            ann::POD_RESTARTS: "4", ann::RUNNING_CONDITION: "false",
            ann::RUNNING_CONDITION_MESSAGE: "got 404", ann::RUNNING_CONDITION_REASON: "Error"}),
        "Bound",
    );
    let out = status(
        &dv("ImportInProgress"),
        Operation::Import("http"),
        Some(&retrying),
    );
    assert_eq!(out.status.phase, "ImportInProgress");
    assert_eq!(out.status.restart_count, 4);
    assert!(
        out.events
            .iter()
            .any(|e| e.reason == "Error" && e.message == "got 404")
    );
}

#[test]
fn upload_phases_follow_pod_readiness() {
    let sched = pvc(
        json!({ann::UPLOAD_REQUEST: "", ann::UPLOAD_POD: "cdi-upload-dv",
            ann::POD_PHASE: "Running", ann::POD_READY: "false"}),
        "Bound",
    );
    let out = status(&dv("PVCBound"), Operation::Upload, Some(&sched));
    assert_eq!(out.status.phase, "UploadScheduled");
    let ready = pvc(
        json!({ann::UPLOAD_REQUEST: "", ann::UPLOAD_POD: "cdi-upload-dv",
            ann::POD_PHASE: "Running", ann::POD_READY: "true"}),
        "Bound",
    );
    let out = status(&dv("UploadScheduled"), Operation::Upload, Some(&ready));
    assert_eq!(out.status.phase, "UploadReady");
    assert!(
        out.events
            .contains(&EventSpec::normal("UploadReady", "Upload into dv ready"))
    );
    let done = pvc(
        json!({ann::UPLOAD_REQUEST: "", ann::UPLOAD_POD: "cdi-upload-dv",
            ann::POD_PHASE: "Succeeded"}),
        "Bound",
    );
    let out = status(&dv("UploadReady"), Operation::Upload, Some(&done));
    assert_eq!(out.status.phase, "Succeeded");
}

#[test]
fn claim_errors_and_lost_claims() {
    let out = dv_status(&StatusInput {
        dv: &dv(""),
        op: Operation::Import("http"),
        pvc: None,
        requires_work: true,
        claim_error: Some(("ErrClaimNotValid", "no storage class")),
        progress: None,
        now: "t",
    });
    assert_eq!(out.status.phase, "");
    assert_eq!(
        cond(&out.status, "Bound").reason.as_deref(),
        Some("ErrClaimNotValid")
    );
    assert!(
        out.events
            .contains(&EventSpec::warning("ErrClaimNotValid", "no storage class"))
    );
    let lost = pvc(json!({}), "Lost");
    let out = status(
        &dv("ImportInProgress"),
        Operation::Import("http"),
        Some(&lost),
    );
    assert_eq!(out.status.phase, "Failed");
    assert!(
        out.events
            .contains(&EventSpec::warning("ErrClaimLost", "PVC dv lost"))
    );
}

#[test]
fn populated_or_adoptable_claims_succeed_without_work() {
    let d = dv("");
    let populated = pvc(json!({ann::POPULATED_FOR: "dv"}), "Bound");
    assert!(!requires_work(&populated, &d, false));
    let ours = pvc(json!({ann::CREATED_FOR_DATA_VOLUME: "dv-uid"}), "Bound");
    assert!(requires_work(&ours, &d, true));
    let foreign = pvc(json!({}), "Bound");
    assert!(requires_work(&foreign, &d, false));
    assert!(!requires_work(&foreign, &d, true));
    let out = dv_status(&StatusInput {
        dv: &d,
        op: Operation::Import("http"),
        pvc: Some(&populated),
        requires_work: false,
        claim_error: None,
        progress: None,
        now: "t",
    });
    assert_eq!(out.status.phase, "Succeeded");
}

#[test]
fn conditions_change_times_only_on_change() {
    let mut c = Vec::new();
    update_condition(&mut c, "Running", "True", "", "Pod is running", "t1");
    update_condition(&mut c, "Running", "True", "", "Pod is running", "t2");
    assert_eq!(c[0].last_transition_time.as_deref(), Some("t1"));
    assert_eq!(c[0].last_heartbeat_time.as_deref(), Some("t1"));
    update_condition(&mut c, "Running", "True", "x", "Pod is running", "t3");
    assert_eq!(c[0].last_transition_time.as_deref(), Some("t1"));
    assert_eq!(c[0].last_heartbeat_time.as_deref(), Some("t3"));
    update_condition(&mut c, "Running", "False", "boom", "Error", "t4");
    assert_eq!(c[0].last_transition_time.as_deref(), Some("t4"));
}

#[test]
fn progress_is_scraped_for_the_owner_only() {
    let body = "# HELP x\nkubevirt_cdi_import_progress_total{ownerUID=\"other\"} 99\n\
                kubevirt_cdi_import_progress_total{ownerUID=\"u1\"} 45.3412\n";
    assert_eq!(parse_progress(body, "u1"), Some(45.3412));
    assert_eq!(parse_progress(body, "u2"), None);
    assert_eq!(progress_text(45.3412), "45.34%");
}

#[test]
fn default_class_prefers_virt_then_newest_default() {
    let class = |name: &str, anns: Value, created: &str| -> StorageClass {
        serde_json::from_value(json!({"metadata": {"name": name, "annotations": anns,
            "creationTimestamp": created}, "provisioner": "p"}))
        .unwrap()
    };
    let classes = vec![
        class(
            "old",
            json!({ann::DEFAULT_STORAGE_CLASS: "true"}),
            "2024-01-01T00:00:00Z",
        ),
        class(
            "new",
            json!({ann::DEFAULT_STORAGE_CLASS: "true"}),
            "2025-01-01T00:00:00Z",
        ),
        class(
            "virt",
            json!({ann::DEFAULT_VIRT_STORAGE_CLASS: "true"}),
            "2020-01-01T00:00:00Z",
        ),
    ];
    assert_eq!(default_class(&classes, true).as_deref(), Some("virt"));
    assert_eq!(default_class(&classes, false).as_deref(), Some("new"));
    assert_eq!(default_class(&[], false), None);
}

#[test]
fn scratch_rules() {
    assert!(requires_scratch(&pvc(
        json!({ann::CONTENT_TYPE: "archive"}),
        "Bound"
    )));
    assert!(requires_scratch(&pvc(
        json!({ann::SOURCE: "registry"}),
        "Bound"
    )));
    assert!(!requires_scratch(&pvc(
        json!({ann::SOURCE: "http"}),
        "Bound"
    )));
    assert!(requires_scratch(&pvc(
        json!({ann::SOURCE: "http", ann::REQUIRES_SCRATCH: "true"}),
        "Bound"
    )));
}
