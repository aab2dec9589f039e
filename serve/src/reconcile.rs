//! The DataVolume controller loop: claims, workers, status, events.
//!
//! One task per DataVolume in flight ("drive") walks it from claim creation through worker runs
//! to a terminal phase; [`Controller::run`] starts drives, cancels them when their DataVolume
//! disappears, and garbage-collects claims and storage left by deleted DataVolumes or a crash.
//! All storage and process effects go through [`ClaimProvisioner`] and [`WorkerRunner`]; all
//! decisions come from [`crate::decide`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdi_api::env as e;
use cdi_api::resources::{DV_CONTROLLER, DataVolume, DataVolumeStatus};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Effective};
use crate::decide::{self, ExitStatus, Operation, Outcome, phase};
use crate::storage::{ClaimProvisioner, ClaimRequest, ProvisionedClaim};
use crate::store::{Kind, Store, StoreError};
use crate::util::{new_uid, now_rfc3339};
use crate::worker::{Worker, WorkerKind, WorkerRunner, WorkerSpec, upload_completed_early};

/// How often progress is scraped and the upload server probed (upstream scrapes every ~2 s).
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Periodic resync even without store changes (retries of pending DataVolumes).
const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// How long a cancelled drive may take to stop its worker before cleanup proceeds anyway.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of an upload server run before it exits and is restarted with fresh certificates.
const UPLOAD_DEADLINE: Duration = Duration::from_secs(12 * 3600);

/// PVC annotation: pid of the worker process (to kill a stale one after a crash).
pub const ANN_WORKER_PID: &str = "cdi.kubevirt.io/storage.pod.pid";
/// PVC annotation: mirrored worker phase.
pub const ANN_POD_PHASE: &str = "cdi.kubevirt.io/storage.pod.phase";
/// PVC annotation: mirrored restart count.
pub const ANN_POD_RESTARTS: &str = "cdi.kubevirt.io/storage.pod.restarts";
/// PVC annotation: the worker asked for scratch space.
pub const ANN_REQUIRES_SCRATCH: &str = "cdi.kubevirt.io/storage.import.requiresScratch";
/// PVC annotation: upload server is listening and ready.
pub const ANN_POD_READY: &str = "cdi.kubevirt.io/storage.pod.ready";
/// PVC annotation: marks an upload target.
pub const ANN_UPLOAD_TARGET: &str = "cdi.kubevirt.io/storage.upload.target";
/// PVC annotation: content type.
pub const ANN_CONTENT_TYPE: &str = "cdi.kubevirt.io/storage.contentType";
/// PVC annotation: loopback port of the upload server (embedded backend only).
pub const ANN_UPLOAD_PORT: &str = "cdi.kubevirt.io/storage.upload.localPort";
/// PVC annotation: the loop device backing a Block claim (embedded backend only).
pub const ANN_LOCAL_DEVICE: &str = "cdi.kubevirt.io/storage.local.device";
/// PVC annotation: preallocation applied.
pub const ANN_PREALLOCATION: &str = "cdi.kubevirt.io/storage.preallocation";
/// Label on every object the controller creates.
const LABEL_APP: (&str, &str) = ("app", "containerized-data-importer");

/// Upload-server TLS material the controller hands to upload workers.
#[derive(Clone)]
pub struct UploadTls {
    /// Issues a server certificate for 127.0.0.1; returns (cert PEM, key PEM).
    pub issue_server: Arc<dyn Fn() -> Result<(String, String), String> + Send + Sync>,
    /// CA bundle client certificates must chain to (PEM).
    pub client_ca_pem: String,
}

/// Static controller settings.
#[derive(Clone)]
pub struct ControllerConfig {
    /// Data directory of `cdi serve` (run files and logs go below it).
    pub data_dir: PathBuf,
    /// Back-off base of worker restarts.
    pub backoff_base: Duration,
    /// Upload support (None: upload DataVolumes wait with a clear condition).
    pub upload: Option<UploadTls>,
}

struct Active {
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

/// The DataVolume controller.
pub struct Controller {
    store: Arc<dyn Store>,
    claims: Arc<dyn ClaimProvisioner>,
    runner: Arc<dyn WorkerRunner>,
    cfg: ControllerConfig,
    active: Mutex<HashMap<String, Active>>,
    scraper: reqwest::Client,
}

/// An event to record after a status write.
type Ev = (&'static str, &'static str, String);

impl Controller {
    /// A controller over the given seams.
    pub fn new(
        store: Arc<dyn Store>,
        claims: Arc<dyn ClaimProvisioner>,
        runner: Arc<dyn WorkerRunner>,
        cfg: ControllerConfig,
    ) -> Arc<Self> {
        // Workers serve metrics with a self-signed certificate; upstream scrapes with
        // verification off and a 2 s timeout.
        let scraper = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .unwrap_or_default();
        Arc::new(Controller {
            store,
            claims,
            runner,
            cfg,
            active: Mutex::new(HashMap::new()),
            scraper,
        })
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<String, Active>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kill workers a previous run of `cdi serve` left behind (normally the parent-death signal
    /// already did).
    pub fn kill_stale_workers(&self) {
        let exe = std::env::current_exe().unwrap_or_default();
        for pvc in self
            .store
            .list(Kind::PersistentVolumeClaim, None)
            .unwrap_or_default()
        {
            if let Some(pid) = pvc["metadata"]["annotations"][ANN_WORKER_PID]
                .as_str()
                .and_then(|p| p.parse().ok())
            {
                crate::worker::kill_stale(pid, &exe);
            }
        }
    }

    /// Run forever.
    pub async fn run(self: Arc<Self>) {
        let mut rx = self.store.watch();
        loop {
            if let Err(err) = self.reconcile_all().await {
                tracing::warn!(error = %err, "reconcile failed");
            }
            tokio::select! {
                _ = rx.recv() => {
                    // Coalesce a burst of changes into one pass.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(RESYNC_INTERVAL) => {}
            }
        }
    }

    async fn reconcile_all(self: &Arc<Self>) -> Result<(), StoreError> {
        config::refresh(self.store.as_ref())?;
        let dvs = self.store.list(Kind::DataVolume, None)?;
        let mut live = HashSet::new();
        for v in &dvs {
            let Ok(dv) = serde_json::from_value::<DataVolume>(v.clone()) else {
                continue;
            };
            let uid = dv.metadata.uid.clone().unwrap_or_default();
            live.insert(uid.clone());
            let ph = dv.status.as_ref().map(|s| s.phase.as_str()).unwrap_or("");
            if ph == phase::SUCCEEDED || ph == phase::FAILED {
                continue;
            }
            let mut active = self.active();
            active.retain(|_, a| !a.handle.is_finished());
            if !active.contains_key(&uid) {
                let cancel = CancellationToken::new();
                let me = Arc::clone(self);
                let c = cancel.clone();
                let ns = dv.metadata.namespace.clone().unwrap_or_default();
                let name = dv.metadata.name.clone();
                let u = uid.clone();
                let handle = tokio::spawn(async move {
                    if let Err(err) = me.drive(&ns, &name, &u, c).await {
                        tracing::warn!(namespace = %ns, name = %name, error = %err, "datavolume drive failed");
                    }
                });
                active.insert(uid, Active { cancel, handle });
            }
        }
        // DataVolumes that are gone: stop their workers first, then free their claims.
        let gone: Vec<Active> = {
            let mut active = self.active();
            let keys: Vec<String> = active
                .keys()
                .filter(|k| !live.contains(*k))
                .cloned()
                .collect();
            keys.into_iter().filter_map(|k| active.remove(&k)).collect()
        };
        for a in gone {
            a.cancel.cancel();
            let _ = tokio::time::timeout(STOP_TIMEOUT, a.handle).await;
        }
        let pvcs = self.store.list(Kind::PersistentVolumeClaim, None)?;
        let mut pvc_uids = HashSet::new();
        for pvc in &pvcs {
            let owner = pvc["metadata"]["ownerReferences"]
                .as_array()
                .and_then(|o| o.iter().find(|r| r["kind"] == "DataVolume"))
                .and_then(|r| r["uid"].as_str());
            let ns = pvc["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = pvc["metadata"]["name"].as_str().unwrap_or_default();
            if let Some(owner) = owner
                && !live.contains(owner)
            {
                self.store.delete(Kind::PersistentVolumeClaim, ns, name)?;
                continue;
            }
            pvc_uids.insert(
                pvc["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        for uid in self.claims.provisioned() {
            if !pvc_uids.contains(&uid)
                && let Err(err) = self.claims.release(&uid)
            {
                tracing::warn!(claim = %uid, error = %err, "releasing claim storage failed");
            }
        }
        Ok(())
    }

    // ---- store helpers -------------------------------------------------------------------

    fn load_dv(&self, ns: &str, name: &str, uid: &str) -> Result<Option<DataVolume>, StoreError> {
        let Some(v) = self.store.get(Kind::DataVolume, ns, name)? else {
            return Ok(None);
        };
        let dv: DataVolume = serde_json::from_value(v)?;
        Ok((dv.metadata.uid.as_deref() == Some(uid)).then_some(dv))
    }

    /// Read-modify-write of a DataVolume's status; the closure may queue events, which are
    /// recorded after the write. Returns false when the DataVolume is gone.
    fn update_status(
        &self,
        ns: &str,
        name: &str,
        uid: &str,
        f: impl Fn(&mut DataVolumeStatus, &mut Vec<Ev>, &str),
    ) -> Result<bool, StoreError> {
        for _ in 0..10 {
            let Some(dv) = self.load_dv(ns, name, uid)? else {
                return Ok(false);
            };
            let mut st = dv.status.clone().unwrap_or_default();
            let mut evs = Vec::new();
            let now = now_rfc3339();
            f(&mut st, &mut evs, &now);
            let (ready, reason) = decide::ready_condition(&st.phase);
            decide::set_condition(&mut st.conditions, "Ready", ready, reason, "", &now);
            if dv.status.as_ref() == Some(&st) && evs.is_empty() {
                return Ok(true);
            }
            let mut v = serde_json::to_value(&dv)?;
            v["status"] = serde_json::to_value(&st)?;
            match self.store.update(Kind::DataVolume, v) {
                Ok(_) => {
                    for (t, reason, msg) in evs {
                        self.event(ns, name, uid, t, reason, &msg)?;
                    }
                    return Ok(true);
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict)
    }

    /// Record an event about a DataVolume; a repeat of the same reason and message bumps the
    /// count (kubectl's "(x2 over 14s)").
    fn event(
        &self,
        ns: &str,
        dv: &str,
        uid: &str,
        type_: &str,
        reason: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let now = now_rfc3339();
        for mut ev in self.store.list(Kind::Event, Some(ns))? {
            if ev["involvedObject"]["uid"] == uid
                && ev["reason"] == reason
                && ev["message"] == message
            {
                let count = ev["count"].as_u64().unwrap_or(1) + 1;
                ev["count"] = json!(count);
                ev["lastTimestamp"] = json!(now);
                ev["metadata"]["resourceVersion"] = Value::Null;
                self.store.update(Kind::Event, ev)?;
                return Ok(());
            }
        }
        let name = format!("{dv}.{}", &new_uid().replace('-', "")[..16]);
        self.store.create(
            Kind::Event,
            json!({
                "metadata": {"name": name, "namespace": ns},
                "involvedObject": {"apiVersion": cdi_api::resources::CDI_V1BETA1, "kind": "DataVolume",
                                   "name": dv, "namespace": ns, "uid": uid},
                "reason": reason, "message": message, "type": type_,
                "source": {"component": DV_CONTROLLER},
                "count": 1, "firstTimestamp": now, "lastTimestamp": now,
                "reportingComponent": DV_CONTROLLER,
            }),
        )?;
        Ok(())
    }

    fn annotate_pvc(
        &self,
        ns: &str,
        name: &str,
        set: &[(&str, Option<String>)],
    ) -> Result<(), StoreError> {
        for _ in 0..10 {
            let Some(mut pvc) = self.store.get(Kind::PersistentVolumeClaim, ns, name)? else {
                return Ok(());
            };
            let anns = &mut pvc["metadata"]["annotations"];
            if !anns.is_object() {
                *anns = json!({});
            }
            for (k, v) in set {
                match v {
                    Some(v) => anns[*k] = json!(v),
                    None => {
                        if let Some(m) = anns.as_object_mut() {
                            m.remove(*k);
                        }
                    }
                }
            }
            match self.store.update(Kind::PersistentVolumeClaim, pvc) {
                Err(StoreError::Conflict) => continue,
                r => return r.map(|_| ()),
            }
        }
        Err(StoreError::Conflict)
    }

    // ---- the per-DataVolume drive ----------------------------------------------------------

    async fn drive(
        self: &Arc<Self>,
        ns: &str,
        name: &str,
        uid: &str,
        cancel: CancellationToken,
    ) -> Result<(), StoreError> {
        let Some(dv) = self.load_dv(ns, name, uid)? else {
            return Ok(());
        };
        let Some(op) = Operation::of(&dv.spec) else {
            self.update_status(ns, name, uid, |st, evs, now| {
                st.phase = phase::FAILED.into();
                let msg = "DataVolume source is not supported by this control plane";
                if decide::set_condition(&mut st.conditions, "Running", "False", "Error", msg, now)
                {
                    evs.push(("Warning", "Error", msg.into()));
                }
            })?;
            return Ok(());
        };
        if dv.status.as_ref().is_none_or(|s| s.phase.is_empty()) {
            self.update_status(ns, name, uid, |st, _, now| {
                st.phase = phase::PENDING.into();
                st.progress = Some(decide::PROGRESS_NA.into());
                decide::set_condition(
                    &mut st.conditions,
                    "Bound",
                    "False",
                    "NotFound",
                    "No PVC found",
                    now,
                );
                decide::set_condition(&mut st.conditions, "Running", "False", "", "", now);
            })?;
        }
        let Some(claim) = self.ensure_claim(&dv, op)? else {
            return Ok(());
        };
        self.run_workers(&dv, op, claim, cancel).await
    }

    /// Create, provision and bind the DataVolume's claim. `None` when it cannot be done yet (the
    /// status and events say why).
    fn ensure_claim(&self, dv: &DataVolume, op: Operation) -> Result<Option<Claim>, StoreError> {
        let ns = dv.metadata.namespace.clone().unwrap_or_default();
        let name = dv.metadata.name.clone();
        let uid = dv.metadata.uid.clone().unwrap_or_default();
        let eff = config::effective(
            self.store
                .get(Kind::CdiConfig, "", config::CONFIG_NAME)?
                .as_ref(),
        );
        let classes = self.store.list(Kind::StorageClass, None)?;
        let infos = config::class_infos(&classes);
        let (spec, storage_api) = match (&dv.spec.pvc, &dv.spec.storage) {
            (Some(p), _) => (p.clone(), false),
            (None, Some(s)) => (s.clone(), true),
            (None, None) => return Ok(None),
        };
        let pending = |msg: String, reason: &'static str| -> Result<Option<Claim>, StoreError> {
            self.update_status(&ns, &name, &uid, |st, evs, now| {
                st.phase = phase::PENDING.into();
                decide::set_condition(&mut st.conditions, "Bound", "False", "Pending", &msg, now);
                if !evs.iter().any(|e| e.2 == msg) {
                    evs.push(("Warning", reason, msg.clone()));
                }
            })?;
            Ok(None)
        };

        let existing = self.store.get(Kind::PersistentVolumeClaim, &ns, &name)?;
        let pvc = match existing {
            Some(p) => {
                let owned = p["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|r| r["uid"] == uid.as_str()));
                if !owned {
                    return pending(
                        format!("Resource {name} already exists and is not managed by DataVolume"),
                        "ErrResourceExists",
                    );
                }
                p
            }
            None => {
                let content = dv
                    .spec
                    .content_type
                    .clone()
                    .unwrap_or_else(|| "kubevirt".into());
                let Some(class) = decide::choose_class(
                    spec.storage_class_name.as_deref(),
                    &infos,
                    content != "archive",
                ) else {
                    return pending(
                        "DataVolume.storage spec is missing accessMode and no storageClass to choose profile.".into(),
                        "ErrClaimNotValid",
                    );
                };
                if !classes
                    .iter()
                    .any(|c| c["metadata"]["name"] == class.as_str())
                {
                    return pending(
                        format!("storage class {class:?} not found"),
                        "ErrStorageClassNotFound",
                    );
                }
                let profile = self
                    .store
                    .get(Kind::StorageProfile, "", &class)?
                    .unwrap_or_default();
                let first_set = &profile["status"]["claimPropertySets"][0];
                let volume_mode = match spec.volume_mode.as_deref() {
                    Some(m) if m != "FromStorageProfile" => m.to_string(),
                    _ => first_set["volumeMode"]
                        .as_str()
                        .unwrap_or("Filesystem")
                        .to_string(),
                };
                let volume_mode = if content == "archive" {
                    "Filesystem".to_string()
                } else {
                    volume_mode
                };
                let access_modes = if spec.access_modes.is_empty() {
                    match first_set["accessModes"].as_array() {
                        Some(a) if !a.is_empty() => Value::Array(a.clone()),
                        _ => {
                            return pending(
                                format!(
                                    "DataVolume.storage spec is missing accessMode and volumeMode, cannot get access mode from StorageProfile {class}"
                                ),
                                "ErrClaimNotValid",
                            );
                        }
                    }
                } else {
                    json!(spec.access_modes)
                };
                let requested = spec
                    .requested_storage()
                    .and_then(|t| cdi_api::quantity::parse_bytes(&t).ok())
                    .unwrap_or(0);
                let size = decide::claim_size(
                    requested,
                    storage_api,
                    volume_mode == "Filesystem",
                    eff.overhead(&class),
                );
                let mut anns = BTreeMap::new();
                anns.insert(ANN_CONTENT_TYPE.to_string(), content.clone());
                match op {
                    Operation::Import(src) => {
                        anns.insert(
                            "cdi.kubevirt.io/storage.import.source".into(),
                            src.to_string(),
                        );
                        if let Some(ep) = endpoint(dv) {
                            anns.insert("cdi.kubevirt.io/storage.import.endpoint".into(), ep);
                        }
                    }
                    Operation::Upload => {
                        anns.insert(ANN_UPLOAD_TARGET.into(), String::new());
                    }
                }
                let prealloc = dv.spec.preallocation.unwrap_or(eff.preallocation);
                anns.insert(
                    "cdi.kubevirt.io/storage.preallocation.requested".into(),
                    prealloc.to_string(),
                );
                for (k, v) in &dv.metadata.annotations {
                    anns.entry(k.clone()).or_insert_with(|| v.clone());
                }
                let mut labels = dv.metadata.labels.clone();
                labels.insert(LABEL_APP.0.into(), LABEL_APP.1.into());
                let obj = json!({
                    "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": anns,
                        "ownerReferences": [{"apiVersion": cdi_api::resources::CDI_V1BETA1, "kind": "DataVolume",
                            "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]},
                    "spec": {"accessModes": access_modes, "resources": {"requests": {"storage": size.to_string()}},
                             "storageClassName": class, "volumeMode": volume_mode},
                    "status": {"phase": "Pending"},
                });
                match self.store.create(Kind::PersistentVolumeClaim, obj) {
                    Ok(p) => p,
                    Err(StoreError::AlreadyExists) => return Ok(None),
                    Err(e) => return Err(e),
                }
            }
        };
        let pvc_uid = pvc["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let class = pvc["spec"]["storageClassName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let volume_mode = pvc["spec"]["volumeMode"]
            .as_str()
            .unwrap_or("Filesystem")
            .to_string();
        let size: u64 = pvc["spec"]["resources"]["requests"]["storage"]
            .as_str()
            .and_then(|s| cdi_api::quantity::parse_bytes(s).ok())
            .unwrap_or(0);
        let req = ClaimRequest {
            uid: pvc_uid.clone(),
            class: class.clone(),
            volume_mode: volume_mode.clone(),
            capacity: size,
        };
        let provisioned = match self.claims.provision(&req) {
            Ok(p) => p,
            Err(err) => {
                return pending(
                    format!("PVC {name} Pending: {err}"),
                    "ErrProvisioningFailed",
                );
            }
        };
        let device = provisioned
            .block_device
            .as_ref()
            .map(|d| d.display().to_string());
        let device_changed = device.is_some()
            && pvc["metadata"]["annotations"][ANN_LOCAL_DEVICE].as_str() != device.as_deref();
        if pvc["status"]["phase"] != "Bound" || device_changed {
            let mut p = pvc.clone();
            p["status"] = json!({"phase": "Bound", "accessModes": pvc["spec"]["accessModes"],
                                 "capacity": {"storage": size.to_string()}});
            p["spec"]["volumeName"] = json!(format!("pvc-{pvc_uid}"));
            if let Some(d) = &device {
                // Recorded so an operator (and a restarted control plane) can see which loop
                // device backs the claim.
                if !p["metadata"]["annotations"].is_object() {
                    p["metadata"]["annotations"] = json!({});
                }
                p["metadata"]["annotations"][ANN_LOCAL_DEVICE] = json!(d);
            }
            self.store.update(Kind::PersistentVolumeClaim, p)?;
        }
        let bound_msg = format!("PVC {name} Bound");
        self.update_status(&ns, &name, &uid, |st, evs, now| {
            st.claim_name = Some(name.clone());
            if st.phase.is_empty() || st.phase == phase::PENDING {
                st.phase = phase::PVC_BOUND.into();
            }
            if decide::set_condition(
                &mut st.conditions,
                "Bound",
                "True",
                "Bound",
                &bound_msg,
                now,
            ) {
                evs.push(("Normal", "Bound", bound_msg.clone()));
            }
        })?;
        Ok(Some(Claim {
            ns,
            name,
            uid,
            pvc_uid,
            class,
            volume_mode,
            size,
            provisioned,
            eff,
        }))
    }

    async fn run_workers(
        self: &Arc<Self>,
        dv: &DataVolume,
        op: Operation,
        claim: Claim,
        cancel: CancellationToken,
    ) -> Result<(), StoreError> {
        let (ns, name, uid) = (claim.ns.as_str(), claim.name.as_str(), claim.uid.as_str());
        let run_dir = self.cfg.data_dir.join("run").join(uid);
        let _ = std::fs::create_dir_all(&run_dir);
        let mut need_scratch = matches!(op, Operation::Upload)
            || self
                .store
                .get(Kind::PersistentVolumeClaim, ns, name)?
                .is_some_and(|p| p["metadata"]["annotations"][ANN_REQUIRES_SCRATCH] == "true");
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let sched = op.scheduled_phase();
            self.update_status(ns, name, uid, |st, evs, _| {
                if st.phase == phase::PENDING || st.phase == phase::PVC_BOUND || st.phase.is_empty()
                {
                    st.phase = sched.into();
                    if let Some((r, m)) = op.phase_event(sched, name) {
                        evs.push(("Normal", r, m));
                    }
                }
            })?;
            if matches!(op, Operation::Upload) && self.cfg.upload.is_none() {
                let msg = "uploads are not available in this build of cdi serve";
                self.update_status(ns, name, uid, |st, evs, now| {
                    if decide::set_condition(
                        &mut st.conditions,
                        "Running",
                        "False",
                        "UploadUnavailable",
                        msg,
                        now,
                    ) {
                        evs.push(("Warning", "UploadUnavailable", msg.into()));
                    }
                })?;
                cancel.cancelled().await;
                return Ok(());
            }
            let scratch = if need_scratch {
                Some(self.ensure_scratch(&claim)?)
            } else {
                None
            };
            let spec = match self.worker_spec(dv, op, &claim, &run_dir, scratch.as_ref()) {
                Ok(s) => s,
                Err(msg) => {
                    self.fail_attempt(&claim, op, "Error", &msg, &cancel)
                        .await?;
                    continue;
                }
            };
            let metrics = spec.1.clone();
            let upload_port = spec.2;
            let mut worker = match self.runner.start(spec.0) {
                Ok(w) => w,
                Err(err) => {
                    self.fail_attempt(
                        &claim,
                        op,
                        "Error",
                        &format!("starting worker: {err}"),
                        &cancel,
                    )
                    .await?;
                    continue;
                }
            };
            self.annotate_pvc(
                ns,
                name,
                &[
                    (ANN_WORKER_PID, worker.pid().map(|p| p.to_string())),
                    (ANN_POD_PHASE, Some("Running".into())),
                    (ANN_POD_READY, Some("false".into())),
                    (ANN_UPLOAD_PORT, upload_port.map(|p| p.to_string())),
                ],
            )?;
            if let Operation::Import(_) = op {
                self.mark_running(&claim, op)?;
            }
            let exit = tokio::select! {
                exit = self.watch_worker(worker.as_mut(), &claim, op, metrics, upload_port) => exit,
                _ = cancel.cancelled() => {
                    worker.kill().await;
                    return Ok(());
                }
            };
            self.annotate_pvc(
                ns,
                name,
                &[
                    (ANN_WORKER_PID, None),
                    (ANN_POD_READY, Some("false".into())),
                ],
            )?;
            match decide::classify(&exit) {
                Outcome::Completed {
                    message,
                    preallocation_applied,
                } => {
                    self.release_scratch(&claim)?;
                    self.annotate_pvc(
                        ns,
                        name,
                        &[
                            (ANN_POD_PHASE, Some("Succeeded".into())),
                            (ANN_PREALLOCATION, Some(preallocation_applied.to_string())),
                            (ANN_UPLOAD_PORT, None),
                        ],
                    )?;
                    self.update_status(ns, name, uid, |st, evs, now| {
                        st.phase = phase::SUCCEEDED.into();
                        st.progress = Some(decide::PROGRESS_DONE.into());
                        decide::set_condition(
                            &mut st.conditions,
                            "Running",
                            "False",
                            "Completed",
                            &message,
                            now,
                        );
                        if let Some((r, m)) = op.phase_event(phase::SUCCEEDED, name) {
                            evs.push(("Normal", r, m));
                        }
                    })?;
                    let _ = std::fs::remove_dir_all(&run_dir);
                    return Ok(());
                }
                Outcome::ScratchRequired => {
                    need_scratch = true;
                    self.annotate_pvc(ns, name, &[(ANN_REQUIRES_SCRATCH, Some("true".into()))])?;
                    self.update_status(ns, name, uid, |st, _, now| {
                        // Upstream suppresses the event for this one.
                        decide::set_condition(
                            &mut st.conditions,
                            "Running",
                            "False",
                            "Scratch space required",
                            "",
                            now,
                        );
                    })?;
                }
                Outcome::Retry { reason, message } => {
                    self.fail_attempt(&claim, op, reason, &message, &cancel)
                        .await?;
                }
                Outcome::Fatal { reason, message } => {
                    self.release_scratch(&claim)?;
                    // A volume that failed verification must not be mistaken for data.
                    if let Some(dir) = &claim.provisioned.data_dir {
                        let _ = std::fs::remove_file(dir.join(e::defaults::DISK_IMAGE_NAME));
                    }
                    self.annotate_pvc(
                        ns,
                        name,
                        &[
                            (ANN_POD_PHASE, Some("Failed".into())),
                            (ANN_UPLOAD_PORT, None),
                        ],
                    )?;
                    self.update_status(ns, name, uid, |st, evs, now| {
                        st.phase = phase::FAILED.into();
                        if decide::set_condition(
                            &mut st.conditions,
                            "Running",
                            "False",
                            reason,
                            &message,
                            now,
                        ) {
                            evs.push(("Warning", reason, message.clone()));
                        }
                        if let Some((r, m)) = op.phase_event(phase::FAILED, name) {
                            evs.push(("Warning", r, m));
                        }
                    })?;
                    return Ok(());
                }
            }
        }
    }

    fn mark_running(&self, claim: &Claim, op: Operation) -> Result<(), StoreError> {
        let running = op.running_phase();
        self.update_status(&claim.ns, &claim.name, &claim.uid, |st, evs, now| {
            if st.phase != running {
                st.phase = running.into();
                if let Some((r, m)) = op.phase_event(running, &claim.name) {
                    evs.push(("Normal", r, m));
                }
            }
            decide::set_condition(
                &mut st.conditions,
                "Running",
                "True",
                decide::POD_RUNNING,
                "",
                now,
            );
        })?;
        Ok(())
    }

    /// Wait for the worker while scraping progress (import) or probing readiness (upload).
    async fn watch_worker(
        &self,
        worker: &mut dyn Worker,
        claim: &Claim,
        op: Operation,
        metrics: Option<String>,
        upload_port: Option<u16>,
    ) -> ExitStatus {
        let mut ready = false;
        let early_log = match op {
            Operation::Upload => worker.termination_log(),
            _ => None,
        };
        let poll = async {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut last_scrape = std::time::Instant::now();
            loop {
                tick.tick().await;
                // Ready means listening, as upstream's readiness probe on the pod.
                if let (Operation::Upload, Some(port), false) = (op, upload_port, ready)
                    && tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .is_ok()
                {
                    ready = true;
                    let _ = self.annotate_pvc(
                        &claim.ns,
                        &claim.name,
                        &[(ANN_POD_READY, Some("true".into()))],
                    );
                    let _ = self.mark_running(claim, op);
                }
                if let Some(addr) = &metrics
                    && last_scrape.elapsed() >= POLL_INTERVAL
                {
                    last_scrape = std::time::Instant::now();
                    self.scrape(addr, claim).await;
                }
                if let Some(exit) = early_log.as_deref().and_then(upload_completed_early) {
                    return exit;
                }
            }
        };
        tokio::select! {
            exit = worker.wait() => exit,
            exit = poll => exit,
        }
    }

    async fn scrape(&self, addr: &str, claim: &Claim) {
        let url = format!("https://{addr}/metrics");
        let Ok(resp) = self.scraper.get(&url).send().await else {
            return;
        };
        let Ok(body) = resp.text().await else { return };
        if let Some(pct) = decide::parse_progress(&body, &claim.uid) {
            let text = decide::progress_text(pct);
            let _ = self.update_status(&claim.ns, &claim.name, &claim.uid, |st, _, _| {
                if st.phase != phase::SUCCEEDED {
                    st.progress = Some(text.clone());
                }
            });
        }
    }

    /// A failed run: count the restart, report it, back off.
    async fn fail_attempt(
        &self,
        claim: &Claim,
        op: Operation,
        reason: &'static str,
        message: &str,
        cancel: &CancellationToken,
    ) -> Result<(), StoreError> {
        let running = op.running_phase();
        let counter = std::sync::atomic::AtomicU32::new(0);
        self.update_status(&claim.ns, &claim.name, &claim.uid, |st, evs, now| {
            st.restart_count += 1;
            counter.store(st.restart_count, std::sync::atomic::Ordering::Relaxed);
            // Upstream keeps the operation phase on failed attempts (only fatal errors fail).
            if st.phase != running && matches!(op, Operation::Import(_)) {
                st.phase = running.into();
            }
            decide::set_condition(&mut st.conditions, "Running", "False", reason, message, now);
            evs.push(("Warning", reason, message.to_string()));
        })?;
        let restarts = counter.load(std::sync::atomic::Ordering::Relaxed);
        self.annotate_pvc(
            &claim.ns,
            &claim.name,
            &[
                (ANN_POD_PHASE, Some("Failed".into())),
                (ANN_POD_RESTARTS, Some(restarts.to_string())),
            ],
        )?;
        let delay = decide::backoff(restarts, self.cfg.backoff_base);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => {}
        }
        Ok(())
    }

    fn ensure_scratch(&self, claim: &Claim) -> Result<PathBuf, StoreError> {
        let name = format!("{}-scratch", claim.name);
        let classes = config::class_infos(&self.store.list(Kind::StorageClass, None)?);
        let class =
            decide::scratch_class(claim.eff.scratch_class.as_deref(), &classes, &claim.class);
        let pvc = match self.store.get(Kind::PersistentVolumeClaim, &claim.ns, &name)? {
            Some(p) => p,
            None => self.store.create(
                Kind::PersistentVolumeClaim,
                json!({
                    "metadata": {"name": name, "namespace": claim.ns, "labels": {LABEL_APP.0: LABEL_APP.1},
                        "ownerReferences": [{"apiVersion": cdi_api::resources::CDI_V1BETA1, "kind": "DataVolume",
                            "name": claim.name, "uid": claim.uid, "controller": false}]},
                    "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem", "storageClassName": class,
                             "resources": {"requests": {"storage": claim.size.to_string()}}},
                    "status": {"phase": "Bound", "capacity": {"storage": claim.size.to_string()}},
                }),
            )?,
        };
        let uid = pvc["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let req = ClaimRequest {
            uid,
            class,
            volume_mode: "Filesystem".into(),
            capacity: claim.size,
        };
        match self.claims.provision(&req) {
            Ok(ProvisionedClaim {
                data_dir: Some(d), ..
            }) => Ok(d),
            _ => Err(StoreError::Invalid(
                "scratch storage class cannot provision a Filesystem volume",
            )),
        }
    }

    fn release_scratch(&self, claim: &Claim) -> Result<(), StoreError> {
        let name = format!("{}-scratch", claim.name);
        if let Some(p) = self
            .store
            .delete(Kind::PersistentVolumeClaim, &claim.ns, &name)?
        {
            let _ = self
                .claims
                .release(p["metadata"]["uid"].as_str().unwrap_or_default());
        }
        self.annotate_pvc(&claim.ns, &claim.name, &[(ANN_REQUIRES_SCRATCH, None)])
    }

    /// The worker's environment: upstream's contract plus our path overrides. Returns the
    /// spec, the metrics address and the upload port.
    fn worker_spec(
        &self,
        dv: &DataVolume,
        op: Operation,
        claim: &Claim,
        run_dir: &std::path::Path,
        scratch: Option<&PathBuf>,
    ) -> Result<(WorkerSpec, Option<String>, Option<u16>), String> {
        let mut env: Vec<(String, String)> = Vec::new();
        let mut put = |k: &str, v: String| env.push((k.to_string(), v));
        let filesystem = claim.volume_mode == "Filesystem";
        let overhead = if filesystem {
            claim.eff.overhead(&claim.class)
        } else {
            0.0
        };
        let prealloc = dv.spec.preallocation.unwrap_or(claim.eff.preallocation);
        let term = run_dir.join("termination-log");
        let content = dv
            .spec
            .content_type
            .clone()
            .unwrap_or_else(|| "kubevirt".into());
        let absent = run_dir.join("absent");
        match &claim.provisioned.data_dir {
            Some(d) => put(e::CDI_DATA_DIR, d.display().to_string()),
            None => put(e::CDI_DATA_DIR, absent.join("data").display().to_string()),
        }
        // Paths that must not exist are given explicitly: the worker decides volume mode and
        // scratch availability by existence, and upstream's defaults (`/dev/cdi-block-volume`,
        // `/scratch`) might exist on this host.
        match &claim.provisioned.block_device {
            Some(b) => put(e::CDI_BLOCK_DEVICE, b.display().to_string()),
            None => put(
                e::CDI_BLOCK_DEVICE,
                absent.join("block").display().to_string(),
            ),
        }
        match scratch {
            Some(s) => put(e::CDI_SCRATCH_DIR, s.display().to_string()),
            None => put(
                e::CDI_SCRATCH_DIR,
                absent.join("scratch").display().to_string(),
            ),
        }
        put(e::CDI_TERMINATION_LOG, term.display().to_string());
        put(e::FILESYSTEM_OVERHEAD, overhead_env(overhead));
        put(e::PREALLOCATION, prealloc.to_string());
        let log_file = self
            .cfg
            .data_dir
            .join("logs")
            .join(format!("{}_{}.log", claim.ns, claim.name));
        match op {
            Operation::Import(source) => {
                let port =
                    free_port().map_err(|err| format!("no free port for worker metrics: {err}"))?;
                let metrics = format!("127.0.0.1:{port}");
                put(e::CDI_METRICS_ADDR, metrics.clone());
                put(e::IMPORTER_SOURCE, source.to_string());
                put(e::IMPORTER_ENDPOINT, endpoint(dv).unwrap_or_default());
                put(e::IMPORTER_CONTENTTYPE, content);
                put(e::IMPORTER_IMAGE_SIZE, claim.size.to_string());
                put(e::OWNER_UID, claim.uid.clone());
                let src = dv.spec.source.clone().unwrap_or_default();
                let (secret, certs, insecure) =
                    if let Some(h) = src.http.as_ref().or(src.s3.as_ref()) {
                        if let Some(sum) = &h.checksum {
                            put(e::IMPORTER_CHECKSUM, sum.clone());
                        }
                        for (i, hdr) in h.extra_headers.iter().enumerate() {
                            put(
                                &format!("{}{i}", e::IMPORTER_EXTRA_HEADER_PREFIX),
                                hdr.clone(),
                            );
                        }
                        let mut n = h.extra_headers.len();
                        for sname in &h.secret_extra_headers {
                            for v in self.secret_values(&claim.ns, sname)?.into_values() {
                                put(&format!("{}{n}", e::IMPORTER_EXTRA_HEADER_PREFIX), v);
                                n += 1;
                            }
                        }
                        (
                            h.secret_ref.clone(),
                            h.cert_config_map.clone(),
                            h.insecure_skip_verify.unwrap_or(false),
                        )
                    } else if let Some(r) = &src.registry {
                        let url = r.url.clone().unwrap_or_default();
                        let host = url
                            .split("://")
                            .nth(1)
                            .and_then(|rest| rest.split('/').next())
                            .unwrap_or("");
                        let insecure = claim.eff.insecure_registries.iter().any(|h| h == host);
                        (r.secret_ref.clone(), r.cert_config_map.clone(), insecure)
                    } else {
                        (None, None, false)
                    };
                put(e::INSECURE_TLS, insecure.to_string());
                if let Some(sname) = secret {
                    let data = self.secret_values(&claim.ns, &sname)?;
                    put(
                        e::IMPORTER_ACCESS_KEY_ID,
                        data.get("accessKeyId").cloned().unwrap_or_default(),
                    );
                    put(
                        e::IMPORTER_SECRET_KEY,
                        data.get("secretKey").cloned().unwrap_or_default(),
                    );
                }
                if let Some(cm) = certs {
                    let dir = run_dir.join("certs");
                    self.write_config_map(&claim.ns, &cm, &dir)?;
                    put(e::IMPORTER_CERT_DIR, dir.display().to_string());
                }
                let proxy = &claim.eff.import_proxy;
                for (key, var) in [
                    ("HTTPProxy", "http_proxy"),
                    ("HTTPSProxy", "https_proxy"),
                    ("noProxy", "no_proxy"),
                ] {
                    if let Some(v) = proxy[key].as_str().filter(|v| !v.is_empty()) {
                        put(var, v.to_string());
                    }
                }
                let spec = WorkerSpec {
                    kind: WorkerKind::Importer,
                    env,
                    termination_log: term,
                    log_file,
                };
                Ok((spec, Some(metrics), None))
            }
            Operation::Upload => {
                let Some(up) = &self.cfg.upload else {
                    return Err("uploads are not available".into());
                };
                let (cert, key) = (up.issue_server)()?;
                let tls = run_dir.join("tls");
                std::fs::create_dir_all(&tls)
                    .map_err(|err| format!("creating {}: {err}", tls.display()))?;
                let write = |n: &str, body: &str| -> Result<String, String> {
                    let p = tls.join(n);
                    write_private(&p, body.as_bytes())
                        .map_err(|err| format!("writing {}: {err}", p.display()))?;
                    Ok(p.display().to_string())
                };
                let port = free_port()
                    .map_err(|err| format!("no free port for the upload server: {err}"))?;
                put(e::TLS_CERT_FILE, write("tls.crt", &cert)?);
                put(e::TLS_KEY_FILE, write("tls.key", &key)?);
                put(e::CLIENT_CERT_FILE, write("ca.crt", &up.client_ca_pem)?);
                put(e::CLIENT_NAME, UPLOAD_CLIENT_NAME.into());
                let dest = match (&claim.provisioned.block_device, &claim.provisioned.data_dir) {
                    (Some(b), _) => b.display().to_string(),
                    (None, Some(d)) => d.join(e::defaults::DISK_IMAGE_NAME).display().to_string(),
                    (None, None) => return Err("claim has no storage".into()),
                };
                put(e::DESTINATION, dest);
                put(e::UPLOAD_IMAGE_SIZE, claim.size.to_string());
                let deadline =
                    crate::util::rfc3339(crate::util::now_secs() + UPLOAD_DEADLINE.as_secs());
                put(e::DEADLINE, deadline);
                put(e::LISTEN_ADDRESS, "127.0.0.1".into());
                put(e::LISTEN_PORT, port.to_string());
                let spec = WorkerSpec {
                    kind: WorkerKind::UploadServer,
                    env,
                    termination_log: term,
                    log_file,
                };
                Ok((spec, None, Some(port)))
            }
        }
    }

    fn secret_values(&self, ns: &str, name: &str) -> Result<BTreeMap<String, String>, String> {
        use base64::Engine;
        let s = self
            .store
            .get(Kind::Secret, ns, name)
            .map_err(|err| format!("reading secret {name}: {err}"))?
            .ok_or_else(|| format!("secret {ns}/{name} not found"))?;
        let mut out = BTreeMap::new();
        if let Some(m) = s["data"].as_object() {
            for (k, v) in m {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap_or_default())
                    .map_err(|_| format!("secret {name} key {k} is not valid base64"))?;
                out.insert(k.clone(), String::from_utf8_lossy(&raw).into_owned());
            }
        }
        Ok(out)
    }

    fn write_config_map(&self, ns: &str, name: &str, dir: &std::path::Path) -> Result<(), String> {
        let cm = self
            .store
            .get(Kind::ConfigMap, ns, name)
            .map_err(|err| format!("reading configmap {name}: {err}"))?
            .ok_or_else(|| format!("configmap {ns}/{name} not found"))?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|err| format!("creating {}: {err}", dir.display()))?;
        if let Some(m) = cm["data"].as_object() {
            for (k, v) in m {
                if k.contains('/') || k.starts_with('.') {
                    return Err(format!("configmap {name} has an unsafe key {k:?}"));
                }
                std::fs::write(dir.join(k), v.as_str().unwrap_or_default())
                    .map_err(|err| format!("writing configmap key {k}: {err}"))?;
            }
        }
        Ok(())
    }
}

/// Client-certificate CN the upload server requires of the proxy (upstream's).
pub const UPLOAD_CLIENT_NAME: &str = "client.upload-server.cdi.kubevirt.io";

/// Facts about a DataVolume's bound claim that worker runs need.
struct Claim {
    ns: String,
    name: String,
    uid: String,
    #[allow(dead_code)]
    pvc_uid: String,
    class: String,
    volume_mode: String,
    size: u64,
    provisioned: ProvisionedClaim,
    eff: Effective,
}

fn endpoint(dv: &DataVolume) -> Option<String> {
    let s = dv.spec.source.as_ref()?;
    if let Some(h) = s.http.as_ref().or(s.s3.as_ref()) {
        return Some(h.url.clone());
    }
    s.registry.as_ref().and_then(|r| r.url.clone())
}

fn overhead_env(o: f64) -> String {
    config::overhead_text(o)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Write a file readable only by us (keys, tokens).
pub fn write_private(path: &std::path::Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(body)?;
    f.sync_all()
}
