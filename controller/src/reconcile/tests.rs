//! Reconciler scenarios against the fake API server ([`crate::fixtures`]): each test seeds
//! objects, runs one or more reconciles and checks the objects and events that result.

use std::sync::Arc;

use cdi_resources::DataVolume;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use serde_json::{Value, json};

use crate::fixtures::FakeApi;
use crate::names::ann;
use crate::{Context, ControllerConfig};

const NS: &str = "vms";
const DVS: &str = "apis/cdi.kubevirt.io/v1beta1/namespaces/vms/datavolumes";
const PVCS: &str = "api/v1/namespaces/vms/persistentvolumeclaims";
const PODS: &str = "api/v1/namespaces/vms/pods";

fn setup() -> (FakeApi, Arc<Context>) {
    let api = FakeApi::default();
    api.put(
        "apis/storage.k8s.io/v1/storageclasses",
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "local", "annotations":
                {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "cdi.kubevirt.io/local"}),
    );
    api.put(
        "apis/cdi.kubevirt.io/v1beta1/storageprofiles",
        json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "StorageProfile",
            "metadata": {"name": "local"}, "spec": {},
            "status": {"claimPropertySets": [{"accessModes": ["ReadWriteOnce"],
                "volumeMode": "Filesystem"}]}}),
    );
    api.put(
        "apis/cdi.kubevirt.io/v1beta1/cdiconfigs",
        json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "CDIConfig",
            "metadata": {"name": "config"}, "spec": {},
            "status": {"filesystemOverhead": {"global": "0.055"}}}),
    );
    let config = ControllerConfig {
        image: "cdi:test".into(),
        ..ControllerConfig::default()
    };
    let ctx = Arc::new(Context::new(api.client(), config));
    (api, ctx)
}

fn seed_dv(api: &FakeApi, source: Value, extra_meta: Value) {
    let mut dv = json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "fedora", "namespace": NS, "uid": "dv-uid"},
        "spec": {"source": source, "storage": {"resources": {"requests": {"storage": "1Gi"}}}}});
    for (k, v) in extra_meta.as_object().into_iter().flatten() {
        dv["metadata"][k] = v.clone();
    }
    api.put(DVS, dv);
}

fn dv_of(api: &FakeApi) -> Arc<DataVolume> {
    Arc::new(serde_json::from_value(api.get(DVS, "fedora").expect("datavolume")).unwrap())
}

fn pvc_of(api: &FakeApi) -> Arc<PersistentVolumeClaim> {
    Arc::new(serde_json::from_value(api.get(PVCS, "fedora").expect("claim")).unwrap())
}

async fn reconcile_dv(api: &FakeApi, ctx: &Arc<Context>) -> Result<(), crate::Error> {
    super::datavolume::reconcile(dv_of(api), ctx.clone())
        .await
        .map(|_| ())
}

async fn reconcile_claim(api: &FakeApi, ctx: &Arc<Context>) -> Result<(), crate::Error> {
    super::claim::reconcile(pvc_of(api), ctx.clone())
        .await
        .map(|_| ())
}

/// A claim as the DataVolume reconciler leaves it, bound, with the importer pod named.
fn seed_bound_claim(api: &FakeApi, extra: Value) {
    let mut anns = json!({ann::ENDPOINT: "http://h/f.qcow2", ann::SOURCE: "http",
        ann::CONTENT_TYPE: "kubevirt", ann::POD_RESTARTS: "0",
        ann::CREATED_FOR_DATA_VOLUME: "dv-uid", ann::IMPORT_POD: "importer-fedora"});
    for (k, v) in extra.as_object().into_iter().flatten() {
        anns[k] = v.clone();
    }
    api.put(
        PVCS,
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "fedora", "namespace": NS, "uid": "pvc-uid", "annotations": anns,
                "ownerReferences": [{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                    "name": "fedora", "uid": "dv-uid", "controller": true, "blockOwnerDeletion": true}]},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local",
                "volumeMode": "Filesystem", "resources": {"requests": {"storage": "1132462080"}}},
            "status": {"phase": "Bound"}}),
    );
}

fn seed_importer_pod(api: &FakeApi, phase: &str, statuses: Value) {
    api.put(
        PODS,
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "importer-fedora", "namespace": NS, "uid": "pod-uid",
                "labels": {"app": "containerized-data-importer"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "name": "fedora", "uid": "pvc-uid", "controller": true}]},
            "spec": {"containers": [{"name": "importer", "image": "cdi:test"}],
                "volumes": [{"name": "cdi-data-vol", "persistentVolumeClaim": {"claimName": "fedora"}}]},
            "status": {"phase": phase, "containerStatuses": statuses}}),
    );
}

fn terminated(code: i32, message: &str, reason: &str) -> Value {
    json!([{"name": "importer", "image": "cdi:test", "imageID": "", "ready": false,
        "restartCount": 0, "state": {"terminated": {"exitCode": code, "message": message,
        "reason": reason}}}])
}

fn annotation(obj: &Value, key: &str) -> Option<String> {
    obj["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_string)
}

fn has_event(api: &FakeApi, reason: &str) -> bool {
    api.events(NS).iter().any(|(_, r, _)| r == reason)
}

#[tokio::test]
async fn dv_created_creates_claim_with_annotations_owner_and_finalizer() {
    let (api, ctx) = setup();
    seed_dv(
        &api,
        json!({"http": {"url": "http://h/f.qcow2", "secretRef": "creds"}}),
        json!({"annotations": {ann::POD_RETAIN_AFTER_COMPLETION: "true"}}),
    );
    // First pass adds the finalizer, the second does the work.
    reconcile_dv(&api, &ctx).await.unwrap();
    let dv = api.get(DVS, "fedora").unwrap();
    assert_eq!(
        dv["metadata"]["finalizers"],
        json!(["cdi.kubevirt.io/dataVolumeFinalizer"])
    );
    reconcile_dv(&api, &ctx).await.unwrap();

    let pvc = api.get(PVCS, "fedora").expect("claim created");
    assert_eq!(
        annotation(&pvc, ann::ENDPOINT).as_deref(),
        Some("http://h/f.qcow2")
    );
    assert_eq!(annotation(&pvc, ann::SOURCE).as_deref(), Some("http"));
    assert_eq!(annotation(&pvc, ann::SECRET).as_deref(), Some("creds"));
    assert_eq!(
        annotation(&pvc, ann::CONTENT_TYPE).as_deref(),
        Some("kubevirt")
    );
    assert_eq!(
        annotation(&pvc, ann::POD_RETAIN_AFTER_COMPLETION).as_deref(),
        Some("true")
    );
    assert_eq!(
        annotation(&pvc, ann::CREATED_FOR_DATA_VOLUME).as_deref(),
        Some("dv-uid")
    );
    let owner = &pvc["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "DataVolume");
    assert_eq!(owner["uid"], "dv-uid");
    assert_eq!(owner["controller"], true);
    assert_eq!(pvc["spec"]["storageClassName"], "local");
    assert_eq!(pvc["spec"]["accessModes"], json!(["ReadWriteOnce"]));
    assert_eq!(
        pvc["spec"]["resources"]["requests"]["storage"],
        "1132797625"
    );

    let dv = api.get(DVS, "fedora").unwrap();
    assert_eq!(dv["status"]["phase"], "Pending");
    assert_eq!(dv["status"]["claimName"], "fedora");
    let bound = dv["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Bound")
        .unwrap()
        .clone();
    assert_eq!(bound["message"], "PVC fedora Pending");
    assert!(has_event(&api, "Pending"));
}

#[tokio::test]
async fn existing_unowned_claim_is_not_adopted() {
    let (api, ctx) = setup();
    seed_dv(
        &api,
        json!({"blank": {}}),
        json!({"finalizers": ["cdi.kubevirt.io/dataVolumeFinalizer"]}),
    );
    api.put(
        PVCS,
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "fedora", "namespace": NS, "uid": "other"},
            "spec": {"accessModes": ["ReadWriteOnce"]}, "status": {"phase": "Bound"}}),
    );
    let err = reconcile_dv(&api, &ctx).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("already exists and is not managed by DataVolume"),
        "{err}"
    );
    let pvc = api.get(PVCS, "fedora").unwrap();
    assert!(pvc["metadata"]["ownerReferences"].is_null());
    assert!(has_event(&api, "ErrResourceExists"));
    assert!(api.get(DVS, "fedora").unwrap()["status"].is_null());
}

#[tokio::test]
async fn claim_populated_for_the_dv_is_adopted_and_succeeds() {
    let (api, ctx) = setup();
    seed_dv(
        &api,
        json!({"blank": {}}),
        json!({"finalizers": ["cdi.kubevirt.io/dataVolumeFinalizer"]}),
    );
    api.put(
        PVCS,
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "fedora", "namespace": NS, "uid": "other",
                "annotations": {ann::POPULATED_FOR: "fedora"}},
            "spec": {"accessModes": ["ReadWriteOnce"]}, "status": {"phase": "Bound"}}),
    );
    reconcile_dv(&api, &ctx).await.unwrap();
    let pvc = api.get(PVCS, "fedora").unwrap();
    assert_eq!(pvc["metadata"]["ownerReferences"][0]["uid"], "dv-uid");
    assert_eq!(
        api.get(DVS, "fedora").unwrap()["status"]["phase"],
        "Succeeded"
    );
    assert!(api.list(PODS).is_empty());
}

#[tokio::test]
async fn import_claim_gets_pod_name_then_pod() {
    let (api, ctx) = setup();
    seed_bound_claim(&api, json!({}));
    // Remove the pod name so the reconciler has to name it first.
    let mut pvc = api.get(PVCS, "fedora").unwrap();
    pvc["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(ann::IMPORT_POD);
    api.put(PVCS, pvc);
    reconcile_claim(&api, &ctx).await.unwrap();
    let pvc = api.get(PVCS, "fedora").unwrap();
    assert_eq!(
        annotation(&pvc, ann::IMPORT_POD).as_deref(),
        Some("importer-fedora")
    );
    assert!(api.list(PODS).is_empty());

    reconcile_claim(&api, &ctx).await.unwrap();
    let pod = api.get(PODS, "importer-fedora").expect("importer pod");
    assert_eq!(pod["metadata"]["ownerReferences"][0]["uid"], "pvc-uid");
    assert_eq!(pod["spec"]["restartPolicy"], "OnFailure");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "cdi:test");
    assert_eq!(c["command"], json!(["/usr/bin/cdi-importer"]));
    let env = c["env"].as_array().unwrap();
    let get = |n: &str| env.iter().find(|e| e["name"] == n).unwrap()["value"].clone();
    assert_eq!(get("IMPORTER_SOURCE"), "http");
    assert_eq!(get("OWNER_UID"), "dv-uid");
    assert_eq!(get("FILESYSTEM_OVERHEAD"), "0.055");
    // No scratch for a plain HTTP import.
    assert!(api.get(PVCS, "fedora-scratch").is_none());
}

#[tokio::test]
async fn registry_import_gets_a_scratch_claim_owned_by_the_pod() {
    let (api, ctx) = setup();
    seed_bound_claim(
        &api,
        json!({ann::SOURCE: "registry", ann::ENDPOINT: "docker://r/i"}),
    );
    reconcile_claim(&api, &ctx).await.unwrap();
    let pod = api.get(PODS, "importer-fedora").expect("importer pod");
    let vols = pod["spec"]["volumes"].as_array().unwrap();
    assert!(
        vols.iter()
            .any(|v| v["persistentVolumeClaim"]["claimName"] == "fedora-scratch")
    );
    let scratch = api.get(PVCS, "fedora-scratch").expect("scratch claim");
    assert_eq!(scratch["metadata"]["ownerReferences"][0]["kind"], "Pod");
    assert_eq!(
        scratch["metadata"]["ownerReferences"][0]["uid"],
        pod["metadata"]["uid"]
    );
    let pvc = api.get(PVCS, "fedora").unwrap();
    assert_eq!(
        annotation(&pvc, ann::BOUND_CONDITION_REASON).as_deref(),
        Some("CreatingScratchSpace")
    );
    assert_eq!(
        annotation(&pvc, ann::REQUIRES_SCRATCH).as_deref(),
        Some("false")
    );
}

#[tokio::test]
async fn scratch_request_recreates_pod_with_scratch() {
    let (api, ctx) = setup();
    seed_bound_claim(&api, json!({}));
    seed_importer_pod(
        &api,
        "Succeeded",
        terminated(0, r#"{"scratchSpaceRequired":true}"#, "Completed"),
    );
    reconcile_claim(&api, &ctx).await.unwrap();
    assert!(api.get(PODS, "importer-fedora").is_none(), "pod deleted");
    let pvc = api.get(PVCS, "fedora").unwrap();
    assert_eq!(
        annotation(&pvc, ann::REQUIRES_SCRATCH).as_deref(),
        Some("true")
    );
    assert_ne!(
        annotation(&pvc, ann::POD_PHASE).as_deref(),
        Some("Succeeded")
    );
    reconcile_claim(&api, &ctx).await.unwrap();
    let pod = api.get(PODS, "importer-fedora").expect("re-created pod");
    let mounts = pod["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap();
    assert!(mounts.iter().any(|m| m["mountPath"] == "/scratch"));
    assert!(api.get(PVCS, "fedora-scratch").is_some());
}

#[tokio::test]
async fn checksum_failure_fails_the_datavolume() {
    let (api, ctx) = setup();
    seed_dv(
        &api,
        json!({"http": {"url": "http://h/f.qcow2"}}),
        json!({"finalizers": ["cdi.kubevirt.io/dataVolumeFinalizer"]}),
    );
    seed_bound_claim(&api, json!({}));
    let msg = r#"{"message":"Unable to process data: checksum mismatch: expected sha256:aa"}"#;
    seed_importer_pod(&api, "Succeeded", terminated(0, msg, "Completed"));
    reconcile_claim(&api, &ctx).await.unwrap();
    let pvc = api.get(PVCS, "fedora").unwrap();
    assert_eq!(
        annotation(&pvc, ann::IMPORT_FATAL_ERROR).as_deref(),
        Some("true")
    );
    assert!(
        api.get(PODS, "importer-fedora").is_none(),
        "fatal: pod deleted"
    );
    assert!(has_event(&api, "ErrImportFailed"));

    reconcile_dv(&api, &ctx).await.unwrap();
    let dv = api.get(DVS, "fedora").unwrap();
    assert_eq!(dv["status"]["phase"], "Failed");
    let running = dv["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Running")
        .unwrap()
        .clone();
    assert_eq!(running["reason"], "ChecksumError");
    assert!(has_event(&api, "ImportFailed"));
    // Once failed, no new pod is started.
    reconcile_claim(&api, &ctx).await.unwrap();
    assert!(api.get(PODS, "importer-fedora").is_none());
}

#[tokio::test]
async fn restarts_are_counted_and_the_failure_reported() {
    let (api, ctx) = setup();
    seed_dv(
        &api,
        json!({"http": {"url": "http://h/f.qcow2"}}),
        json!({"finalizers": ["cdi.kubevirt.io/dataVolumeFinalizer"]}),
    );
    seed_bound_claim(&api, json!({}));
    seed_importer_pod(
        &api,
        "Running",
        json!([{"name": "importer", "image": "cdi:test", "imageID": "", "ready": false,
            "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                "message": "Unable to connect to http data source: expected status code 200, got 404"}}}]),
    );
    reconcile_claim(&api, &ctx).await.unwrap();
    assert!(
        api.get(PODS, "importer-fedora").is_some(),
        "retried by the kubelet, not deleted"
    );
    reconcile_dv(&api, &ctx).await.unwrap();
    let dv = api.get(DVS, "fedora").unwrap();
    assert_eq!(dv["status"]["phase"], "ImportInProgress");
    assert_eq!(dv["status"]["restartCount"], 3);
    let events = api.events(NS);
    assert!(
        events
            .iter()
            .any(|(t, r, n)| t == "Warning" && r == "Error" && n.contains("got 404")),
        "{events:?}"
    );
}

#[tokio::test]
async fn success_deletes_pod_and_dv_succeeds() {
    let (api, ctx) = setup();
    seed_dv(
        &api,
        json!({"http": {"url": "http://h/f.qcow2"}}),
        json!({"finalizers": ["cdi.kubevirt.io/dataVolumeFinalizer"]}),
    );
    seed_bound_claim(&api, json!({}));
    seed_importer_pod(
        &api,
        "Succeeded",
        terminated(
            0,
            r#"{"preallocationApplied":false,"message":"Import Complete"}"#,
            "Completed",
        ),
    );
    reconcile_claim(&api, &ctx).await.unwrap();
    assert!(api.get(PODS, "importer-fedora").is_none());
    let pvc = api.get(PVCS, "fedora").unwrap();
    assert_eq!(
        annotation(&pvc, ann::POD_PHASE).as_deref(),
        Some("Succeeded")
    );
    reconcile_dv(&api, &ctx).await.unwrap();
    let dv = api.get(DVS, "fedora").unwrap();
    assert_eq!(dv["status"]["phase"], "Succeeded");
    assert_eq!(dv["status"]["progress"], "100.0%");
    assert!(has_event(&api, "ImportSucceeded"));
}

#[tokio::test]
async fn retained_pod_is_kept_after_success() {
    let (api, ctx) = setup();
    seed_bound_claim(&api, json!({ann::POD_RETAIN_AFTER_COMPLETION: "true"}));
    seed_importer_pod(
        &api,
        "Succeeded",
        terminated(0, r#"{"message":"Import Complete"}"#, "Completed"),
    );
    reconcile_claim(&api, &ctx).await.unwrap();
    assert!(api.get(PODS, "importer-fedora").is_some());
    assert_eq!(
        annotation(&api.get(PVCS, "fedora").unwrap(), ann::POD_PHASE).as_deref(),
        Some("Succeeded")
    );
}

#[tokio::test]
async fn deleted_dv_loses_pods_then_finalizer() {
    let (api, ctx) = setup();
    seed_dv(
        &api,
        json!({"http": {"url": "http://h/f.qcow2"}}),
        json!({"finalizers": ["cdi.kubevirt.io/dataVolumeFinalizer"],
            "deletionTimestamp": "2026-01-01T00:00:00Z"}),
    );
    seed_bound_claim(&api, json!({}));
    seed_importer_pod(&api, "Running", json!([]));
    reconcile_dv(&api, &ctx).await.unwrap();
    assert!(
        api.get(PODS, "importer-fedora").is_none(),
        "worker pod deleted"
    );
    // Finalizer removed; the (fake) API server then lets the DataVolume go.
    assert!(api.get(DVS, "fedora").is_none());
    let reqs = api.requests();
    let delete_pod = reqs
        .iter()
        .position(|r| r == "DELETE /api/v1/namespaces/vms/pods/importer-fedora");
    let patch_dv = reqs
        .iter()
        .position(|r| r == "PATCH /apis/cdi.kubevirt.io/v1beta1/namespaces/vms/datavolumes/fedora");
    assert!(
        delete_pod.is_some() && patch_dv.is_some() && delete_pod < patch_dv,
        "{reqs:?}"
    );
}

#[tokio::test]
async fn upload_claim_gets_pki_pod_secret_service_and_scratch() {
    let (api, ctx) = setup();
    api.put(
        PVCS,
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "fedora", "namespace": NS, "uid": "pvc-uid",
                "annotations": {ann::UPLOAD_REQUEST: "", ann::CONTENT_TYPE: "kubevirt"},
                "ownerReferences": [{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                    "name": "fedora", "uid": "dv-uid", "controller": true}]},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local",
                "resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": "Bound"}}),
    );
    reconcile_claim(&api, &ctx).await.unwrap();
    assert_eq!(
        annotation(&api.get(PVCS, "fedora").unwrap(), ann::UPLOAD_POD).as_deref(),
        Some("cdi-upload-fedora")
    );
    reconcile_claim(&api, &ctx).await.unwrap();
    for s in [
        "cdi-uploadserver-signer",
        "cdi-uploadserver-client-signer",
        "cdi-uploadserver-client-cert",
    ] {
        assert!(api.get("api/v1/namespaces/cdi/secrets", s).is_some(), "{s}");
    }
    assert!(
        api.get(
            "api/v1/namespaces/cdi/configmaps",
            "cdi-uploadserver-signer-bundle"
        )
        .is_some()
    );
    let pod = api.get(PODS, "cdi-upload-fedora").expect("upload pod");
    assert_eq!(pod["metadata"]["labels"]["service"], "cdi-upload-fedora");
    let secret = api
        .get("api/v1/namespaces/vms/secrets", "cdi-upload-fedora")
        .expect("tls secret");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["kind"], "Pod");
    for k in ["tls.key", "tls.crt", "ca.crt"] {
        assert!(secret["data"][k].is_string(), "{k}");
    }
    let svc = api
        .get("api/v1/namespaces/vms/services", "cdi-upload-fedora")
        .expect("service");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["metadata"]["ownerReferences"][0]["uid"], "pvc-uid");
    assert!(api.get(PVCS, "fedora-scratch").is_some());
    // The pod is pending: the claim says so.
    let pvc = api.get(PVCS, "fedora").unwrap();
    assert_eq!(annotation(&pvc, ann::POD_READY).as_deref(), Some("false"));
}

#[tokio::test]
async fn run_drives_a_datavolume_and_stops_on_shutdown() {
    let (api, _) = setup();
    seed_dv(
        &api,
        json!({"http": {"url": "http://h/f.qcow2"}}),
        json!({}),
    );
    let config = ControllerConfig {
        image: "cdi:test".into(),
        ..ControllerConfig::default()
    };
    let shutdown = config.shutdown.clone();
    let task = tokio::spawn(crate::run(api.client(), config));
    // The DataVolume controller adds its finalizer and creates the claim; the claim
    // controller names the importer pod and starts it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while api.get(PODS, "importer-fedora").is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            api.requests()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let dv = api.get(DVS, "fedora").unwrap();
    assert_eq!(
        dv["metadata"]["finalizers"],
        json!(["cdi.kubevirt.io/dataVolumeFinalizer"])
    );
    assert!(api.get(PVCS, "fedora").is_some());
    shutdown.cancel();
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
    assert!(
        matches!(stopped, Ok(Ok(Ok(())))),
        "run did not stop: {stopped:?}"
    );
}

/// controller-rs style: a `tower_test` mock answering the exact requests, in order, of a
/// DataVolume whose name is taken by someone else's claim.
#[tokio::test]
async fn foreign_claim_requests_in_order() {
    use http::{Request, Response};
    use http_body_util::BodyExt;
    use kube::client::Body;

    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = Arc::new(Context::new(
        kube::Client::new(mock, "default"),
        ControllerConfig::default(),
    ));
    let dv: DataVolume = serde_json::from_value(json!({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "fedora", "namespace": NS, "uid": "dv-uid",
            "finalizers": ["cdi.kubevirt.io/dataVolumeFinalizer"]},
        "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}}}))
    .unwrap();
    let verifier = tokio::spawn(async move {
        let respond =
            |send: tower_test::mock::SendResponse<Response<Body>>, code: u16, body: Value| {
                send.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap(),
                );
            };
        let (req, send) = handle.next_request().await.expect("config read");
        assert_eq!(req.method(), http::Method::GET);
        assert_eq!(
            req.uri().path(),
            "/apis/cdi.kubevirt.io/v1beta1/cdiconfigs/config"
        );
        respond(
            send,
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "not found"}),
        );
        let (req, send) = handle.next_request().await.expect("claim read");
        assert_eq!(
            req.uri().path(),
            "/api/v1/namespaces/vms/persistentvolumeclaims/fedora"
        );
        respond(
            send,
            200,
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "fedora", "namespace": NS, "uid": "theirs",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                    "name": "db", "uid": "sts", "controller": true}]},
            "status": {"phase": "Bound"}}),
        );
        let (req, send) = handle.next_request().await.expect("event");
        assert_eq!(req.method(), http::Method::POST);
        assert_eq!(
            req.uri().path(),
            "/apis/events.k8s.io/v1/namespaces/vms/events"
        );
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let ev: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(ev["reason"], "ErrResourceExists");
        assert_eq!(ev["type"], "Warning");
        assert_eq!(
            ev["note"],
            "Resource \"fedora\" already exists and is not managed by DataVolume"
        );
        assert_eq!(ev["regarding"]["kind"], "DataVolume");
        respond(send, 201, ev);
        // Nothing else: no status write, no claim update (None: the client is gone).
        let more =
            tokio::time::timeout(std::time::Duration::from_millis(200), handle.next_request())
                .await;
        if let Ok(Some((req, _))) = more {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    });
    let err = super::datavolume::reconcile(Arc::new(dv), ctx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    verifier.await.unwrap();
}

/// A reconcile working from a stale copy of the claim (the cache behind our own last write)
/// must not leave a mix of old and new annotations: its patch is pinned to the version it
/// saw, the API answers 409, and kube-runtime retries on a fresh copy.
#[tokio::test]
async fn claim_annotations_from_a_stale_copy_conflict() {
    let (api, ctx) = setup();
    seed_bound_claim(&api, json!({}));
    let stale = pvc_of(&api);
    // Someone (our previous reconcile) changed the claim since `stale` was read.
    let mut fresh = api.get(PVCS, "fedora").unwrap();
    fresh["metadata"]["annotations"][ann::RUNNING_CONDITION] = json!("true");
    api.put(PVCS, fresh);
    seed_importer_pod(
        &api,
        "Succeeded",
        terminated(0, r#"{"message": "Import Complete"}"#, "Completed"),
    );
    let err = super::claim::reconcile(stale, ctx.clone())
        .await
        .expect_err("a stale base conflicts");
    assert!(err.is_conflict(), "{err}");
    // On the fresh copy the same reconcile succeeds and the condition is consistent.
    reconcile_claim(&api, &ctx).await.unwrap();
    let pvc = api.get(PVCS, "fedora").unwrap();
    assert_eq!(
        annotation(&pvc, ann::RUNNING_CONDITION).as_deref(),
        Some("false")
    );
    assert_eq!(
        annotation(&pvc, ann::RUNNING_CONDITION_MESSAGE).as_deref(),
        Some("Import Complete")
    );
}

/// The storage reconcilers publish a StorageProfile per class (owned by it) and CDIConfig
/// status from the classes.
#[tokio::test]
async fn storage_profiles_and_config_status_are_published() {
    let (api, ctx) = setup();
    let class: k8s_openapi::api::storage::v1::StorageClass = serde_json::from_value(
        api.get("apis/storage.k8s.io/v1/storageclasses", "local")
            .unwrap(),
    )
    .unwrap();
    super::storage::reconcile_class(Arc::new(class), ctx.clone())
        .await
        .unwrap();
    let p = api
        .get("apis/cdi.kubevirt.io/v1beta1/storageprofiles", "local")
        .unwrap();
    assert_eq!(p["status"]["provisioner"], "cdi.kubevirt.io/local");
    assert_eq!(
        p["status"]["claimPropertySets"][0]["volumeMode"],
        "Filesystem"
    );
    assert_eq!(p["status"]["cloneStrategy"], "copy");
    let cfg: cdi_resources::CDIConfig = serde_json::from_value(
        api.get("apis/cdi.kubevirt.io/v1beta1/cdiconfigs", "config")
            .unwrap(),
    )
    .unwrap();
    super::storage::reconcile_config(Arc::new(cfg), ctx.clone())
        .await
        .unwrap();
    let c = api
        .get("apis/cdi.kubevirt.io/v1beta1/cdiconfigs", "config")
        .unwrap();
    assert_eq!(
        c["status"]["filesystemOverhead"]["storageClass"]["local"],
        "0.055"
    );
    assert_eq!(c["status"]["scratchSpaceStorageClass"], "local");
}
