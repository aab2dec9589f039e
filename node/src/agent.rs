//! The node agent: a tiny kubelet running Pod objects as child processes.
//!
//! One watcher feeds a reflector store of all Pods; after every event the agent compares the
//! store with its per-pod tasks: new pods get a task, known pods get their latest object, pods
//! that left the store are told they are gone. Each task owns its pod's lifecycle: address,
//! volumes, process, restarts, probes, status, and deletion (see [`PodWorker`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, PodStatus, Secret,
};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::RestartBackoff;
use crate::ip::IpAllocator;
use crate::probe::{Prober, Readiness};
use crate::process::{self, Running};
use crate::spec::{self, CommandMap, HostVolume, PodInputs, ProcessSpec, layout};
use crate::status::{self, AfterExit, PodRecord, PreviousRun, Termination};
use crate::{ANN_LOG_PATH, NodeConfig, NodeError};

/// How often a pod waiting for its claims or configuration is looked at again (the kubelet
/// retries volume setup on a similar cadence).
pub const PREPARE_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Attempts at writing one status before giving up until the next change.
const STATUS_WRITE_ATTEMPTS: u32 = 5;
/// First pause between status write attempts (doubling).
const STATUS_WRITE_RETRY: Duration = Duration::from_millis(200);
/// How long agent shutdown waits for its pods beyond their own grace.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(5);
/// Scheduler message while a pod's claims are not bound yet.
const UNBOUND_MESSAGE: &str =
    "0/1 nodes are available: pod has unbound immediate PersistentVolumeClaims";

/// What a pod task sees of its pod.
#[derive(Debug, Clone)]
struct PodView {
    pod: Arc<Pod>,
    /// Left the API (deleted outright, or never coming back after a relist).
    gone: bool,
}

/// Why a pod task stops looking after its process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// `deletionTimestamp` set: stop, clean up, finish the deletion.
    Deleted,
    /// The object is gone: stop and clean up.
    Gone,
    /// The agent shuts down: stop, keep the run directory for the next agent.
    Shutdown,
}

/// State shared by all pod tasks.
struct Shared {
    client: Client,
    cfg: NodeConfig,
    commands: CommandMap,
    ips: Mutex<IpAllocator>,
    prober: Prober,
    /// Pods whose process a previous agent left behind (killed at start-up).
    recovered: Mutex<HashSet<String>>,
}

impl Shared {
    fn ips(&self) -> std::sync::MutexGuard<'_, IpAllocator> {
        self.ips.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct PodTask {
    tx: watch::Sender<PodView>,
    handle: tokio::task::JoinHandle<()>,
}

/// Run the node agent until `shutdown` is cancelled; then every pod process is stopped (their
/// pods keep their last status; the next agent reports those runs as lost and applies the
/// restart policy).
pub async fn run_node_agent(
    client: Client,
    cfg: NodeConfig,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let pods_dir = cfg.pods_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&pods_dir)
        .map_err(|source| NodeError::Io {
            path: pods_dir.clone(),
            source,
        })?;
    let recovered = recover_leftovers(&pods_dir);
    let shared = Arc::new(Shared {
        client: client.clone(),
        commands: CommandMap {
            cdi_exe: cfg.cdi_exe.clone(),
            host_commands: cfg.host_commands.clone(),
        },
        cfg,
        ips: Mutex::new(IpAllocator::starting_at(random_offset())),
        prober: Prober::new()?,
        recovered: Mutex::new(recovered),
    });

    let (reader, writer) = reflector::store::<Pod>();
    let events = reflector::reflector(
        writer,
        watcher::watcher(Api::<Pod>::all(client), watcher::Config::default()),
    )
    .default_backoff();
    futures::pin_mut!(events);
    let mut tasks: HashMap<String, PodTask> = HashMap::new();
    let mut synced = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = events.next() => match ev {
                None => break,
                Some(Ok(Event::InitDone)) => {
                    if !synced {
                        synced = true;
                        sweep_run_dirs(&pods_dir, &reader);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => tracing::warn!(error = %err, "watching pods"),
            },
        }
        if synced {
            sync(&reader, &mut tasks, &shared, &shutdown);
        }
    }
    // Stop every pod, each within its own grace.
    shutdown.cancel();
    let handles: Vec<_> = tasks.into_values().map(|t| t.handle).collect();
    let all = futures::future::join_all(handles);
    if tokio::time::timeout(process::MAX_TERMINATION_GRACE + SHUTDOWN_SLACK, all)
        .await
        .is_err()
    {
        tracing::warn!("pod processes did not stop in time");
    }
    Ok(())
}

/// Kill processes a previous agent left running; the uids of their pods.
fn recover_leftovers(pods_dir: &Path) -> HashSet<String> {
    let mut out = HashSet::new();
    for entry in std::fs::read_dir(pods_dir).into_iter().flatten().flatten() {
        if process::kill_leftover(&entry.path())
            && let Ok(uid) = entry.file_name().into_string()
        {
            out.insert(uid);
        }
    }
    out
}

/// Run directories of pods that no longer exist (deleted while no agent ran).
fn sweep_run_dirs(pods_dir: &Path, reader: &Store<Pod>) {
    let live: HashSet<String> = reader
        .state()
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    for entry in std::fs::read_dir(pods_dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !live.contains(&name) {
            tracing::info!(uid = %name, "removing the run directory of a pod that is gone");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Bring the per-pod tasks in line with the store.
fn sync(
    reader: &Store<Pod>,
    tasks: &mut HashMap<String, PodTask>,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) {
    tasks.retain(|_, t| !t.handle.is_finished());
    let pods = reader.state();
    // Addresses recorded by a previous agent are claimed before any new pod picks one.
    for p in &pods {
        let uid = p.metadata.uid.as_deref().unwrap_or_default();
        let st = p.status.as_ref();
        let terminal = st
            .and_then(|s| s.phase.as_deref())
            .and_then(status::Phase::parse)
            .is_some_and(status::Phase::is_terminal);
        if !tasks.contains_key(uid)
            && !terminal
            && let Some(ip) = st
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        {
            let _ = shared.ips().allocate(uid, Some(ip), |_| true);
        }
    }
    let mut seen = HashSet::new();
    for p in pods {
        let Some(uid) = p.metadata.uid.clone() else {
            continue;
        };
        seen.insert(uid.clone());
        match tasks.get(&uid) {
            Some(t) => {
                t.tx.send_replace(PodView {
                    pod: p,
                    gone: false,
                });
            }
            None => {
                let (tx, rx) = watch::channel(PodView {
                    pod: p,
                    gone: false,
                });
                let worker = PodWorker::new(Arc::clone(shared), rx, shutdown.child_token());
                let handle = tokio::spawn(worker.run());
                tasks.insert(uid, PodTask { tx, handle });
            }
        }
    }
    for (uid, t) in tasks.iter() {
        if !seen.contains(uid) {
            t.tx.send_modify(|v| v.gone = true);
        }
    }
}

/// Resolves when the pod is being deleted, is gone, or the agent shuts down. Cancel-safe.
async fn ended(rx: &mut watch::Receiver<PodView>, shutdown: &CancellationToken) -> End {
    loop {
        {
            let v = rx.borrow_and_update();
            if v.gone {
                return End::Gone;
            }
            if v.pod.metadata.deletion_timestamp.is_some() {
                return End::Deleted;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return End::Shutdown,
            r = rx.changed() => if r.is_err() { return End::Shutdown },
        }
    }
}

/// Outcome of supervising one run.
enum RunEnd {
    Exited(process::Exit),
    Ended(End),
}

/// Why a pod cannot start yet.
struct NotReady {
    /// The scheduler's verdict, while claims are unbound.
    unschedulable: Option<String>,
    /// Container waiting reason.
    reason: &'static str,
    /// Detail.
    message: String,
}

/// One pod's lifecycle.
struct PodWorker {
    shared: Arc<Shared>,
    rx: watch::Receiver<PodView>,
    shutdown: CancellationToken,
    uid: String,
    name: String,
    api: Api<Pod>,
    run_dir: PathBuf,
    record: PodRecord,
    written: Option<PodStatus>,
    backoff: RestartBackoff,
    /// Where the current run's output starts in the pod's log (the log keeps every run's
    /// output; a fallback termination message comes from this run's only).
    log_start: u64,
}

impl PodWorker {
    fn new(shared: Arc<Shared>, rx: watch::Receiver<PodView>, shutdown: CancellationToken) -> Self {
        let pod = Arc::clone(&rx.borrow().pod);
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let api = Api::namespaced(shared.client.clone(), &ns);
        let run_dir = shared.cfg.pods_dir().join(&uid);
        let (cname, image) = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
            .unwrap_or_default();
        let backoff = RestartBackoff::new(shared.cfg.restart_backoff_base);
        PodWorker {
            shared,
            rx,
            shutdown,
            uid,
            name,
            api,
            run_dir,
            record: PodRecord::new(&cname, &image, Timestamp::now()),
            log_start: 0,
            written: None,
            backoff,
        }
    }

    fn pod(&self) -> Arc<Pod> {
        Arc::clone(&self.rx.borrow().pod)
    }

    fn restart_policy(&self) -> Option<String> {
        self.pod()
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
    }

    async fn run(mut self) {
        let end = self.live().await;
        self.shared.ips().release(&self.uid);
        match end {
            End::Shutdown => {}
            End::Deleted | End::Gone => {
                if let Err(err) = std::fs::remove_dir_all(&self.run_dir)
                    && err.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(pod = %self.name, error = %err, "removing the run directory");
                }
                if end == End::Deleted {
                    self.finish_deletion().await;
                }
            }
        }
    }

    /// The kubelet's last word: the process is gone, so the object may go now.
    async fn finish_deletion(&self) {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match self.api.delete(&self.name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(err) => tracing::warn!(pod = %self.name, error = %err, "deleting pod"),
        }
    }

    async fn wait_for(&mut self, d: Duration) -> Option<End> {
        tokio::select! {
            _ = tokio::time::sleep(d) => None,
            e = ended(&mut self.rx, &self.shutdown) => Some(e),
        }
    }

    /// Write the record's status if it changed (retrying briefly; a pod that is gone ends it).
    async fn write_status(&mut self) {
        let st = self.record.to_status();
        if self.written.as_ref() == Some(&st) {
            return;
        }
        let patch = Patch::Merge(json!({ "status": &st }));
        let mut pause = STATUS_WRITE_RETRY;
        for attempt in 1..=STATUS_WRITE_ATTEMPTS {
            match self
                .api
                .patch_status(&self.name, &PatchParams::default(), &patch)
                .await
            {
                Ok(_) => {
                    self.written = Some(st);
                    return;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => return,
                Err(err) if attempt == STATUS_WRITE_ATTEMPTS => {
                    tracing::warn!(pod = %self.name, error = %err, "writing pod status");
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
    }

    fn log_file(&self) -> PathBuf {
        self.run_dir.join(layout::CONTAINER_LOG)
    }

    async fn set_log_annotation(&self) {
        let path = self.log_file().display().to_string();
        let has = self
            .pod()
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANN_LOG_PATH))
            .is_some_and(|p| *p == path);
        if has {
            return;
        }
        let patch = Patch::Merge(json!({"metadata": {"annotations": {ANN_LOG_PATH: path}}}));
        if let Err(err) = self
            .api
            .patch(&self.name, &PatchParams::default(), &patch)
            .await
        {
            tracing::warn!(pod = %self.name, error = %err, "annotating the pod's log path");
        }
    }

    fn make_run_dir(&self) -> std::io::Result<()> {
        // Secret volumes live here: private to the agent's user.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.run_dir)?;
        for sub in [layout::HOME, layout::TMP, layout::VOLUMES] {
            std::fs::create_dir_all(self.run_dir.join(sub))?;
        }
        Ok(())
    }

    async fn live(&mut self) -> End {
        let pod = self.pod();
        if pod.metadata.deletion_timestamp.is_some() {
            // Nothing of ours runs for it: finish the deletion at once.
            return End::Deleted;
        }
        let st = pod.status.clone().unwrap_or_default();
        let phase = st.phase.as_deref().and_then(status::Phase::parse);
        if phase.is_some_and(status::Phase::is_terminal) {
            return ended(&mut self.rx, &self.shutdown).await;
        }
        let (cname, image) = (self.record.name.clone(), self.record.image.clone());
        self.record = PodRecord::resume(&st, &cname, &image);
        let preferred = st.pod_ip.as_deref().and_then(|ip| ip.parse().ok());
        let ports = pod_ports(&self.pod());
        let allocated = self
            .shared
            .ips()
            .allocate(&self.uid, preferred, |ip| crate::ip::ports_free(ip, &ports));
        match allocated {
            Ok(ip) => self.record.pod_ip = Some(ip),
            Err(err) => {
                self.record
                    .waiting("ContainerCreating", Some(err.to_string()), Timestamp::now());
                self.write_status().await;
                return ended(&mut self.rx, &self.shutdown).await;
            }
        }
        if let Err(err) = self.make_run_dir() {
            tracing::warn!(pod = %self.name, error = %err, "creating the run directory");
        }
        self.set_log_annotation().await;

        let recovered = self
            .shared
            .recovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.uid);
        let previous = PodRecord::previous_run(&st);
        let mut restart_pending = previous == PreviousRun::Restarting;
        if recovered || previous == PreviousRun::Running {
            // The run a previous agent supervised is lost: report it as a failed run and let
            // the restart policy decide (OnFailure restarts it, which resumes an import).
            let started_at = st
                .container_statuses
                .as_ref()
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.running.as_ref())
                .and_then(|r| r.started_at.as_ref())
                .map(|t| t.0)
                .unwrap_or(self.record.start_time);
            let t = Termination {
                exit_code: status::AGENT_RESTART_EXIT_CODE,
                signal: None,
                reason: "Error".into(),
                message: Some(status::AGENT_RESTART_MESSAGE.into()),
                started_at: Some(started_at),
                finished_at: Timestamp::now(),
            };
            match self.record.exited(t, self.restart_policy().as_deref()) {
                AfterExit::Restart => restart_pending = true,
                AfterExit::Succeeded | AfterExit::Failed => {
                    self.write_status().await;
                    self.shared.ips().release(&self.uid);
                    return ended(&mut self.rx, &self.shutdown).await;
                }
            }
        }
        self.write_status().await;

        loop {
            let spec = loop {
                match self.prepare().await {
                    Ok(spec) => break spec,
                    Err(nr) => {
                        let now = Timestamp::now();
                        self.record.set_unschedulable(nr.unschedulable, now);
                        self.record.waiting(nr.reason, Some(nr.message), now);
                        self.write_status().await;
                        if let Some(end) = self.wait_for(PREPARE_RETRY_INTERVAL).await {
                            return end;
                        }
                    }
                }
            };
            self.record.set_unschedulable(None, Timestamp::now());
            if restart_pending {
                self.record.restarting();
            }
            let started = Instant::now();
            let started_at = Timestamp::now();
            let outcome = self.run_once(&spec).await;
            let t = match outcome {
                Ok(RunEnd::Ended(end)) => return end,
                Ok(RunEnd::Exited(exit)) => {
                    let message = self.termination_message(&spec, exit.code);
                    Termination::exited(
                        exit.code,
                        exit.signal,
                        message,
                        started_at,
                        Timestamp::now(),
                    )
                }
                Err(err) => Termination {
                    exit_code: status::START_ERROR_EXIT_CODE,
                    signal: None,
                    reason: "StartError".into(),
                    message: Some(err.to_string()),
                    started_at: Some(started_at),
                    finished_at: Timestamp::now(),
                },
            };
            tracing::info!(pod = %self.name, exit_code = t.exit_code, "pod container exited");
            match self.record.exited(t, self.restart_policy().as_deref()) {
                AfterExit::Succeeded | AfterExit::Failed => {
                    self.write_status().await;
                    self.shared.ips().release(&self.uid);
                    return ended(&mut self.rx, &self.shutdown).await;
                }
                AfterExit::Restart => {
                    let delay = self.backoff.next_delay(started.elapsed());
                    if !delay.is_zero() {
                        self.record.back_off(delay, &self.name);
                        self.write_status().await;
                        if let Some(end) = self.wait_for(delay).await {
                            return end;
                        }
                    }
                    restart_pending = true;
                }
            }
        }
    }

    fn termination_message(&self, spec: &ProcessSpec, exit_code: i32) -> Option<String> {
        let file = read_prefix(&spec.termination_log, status::MAX_TERMINATION_MESSAGE_BYTES);
        let fallback = self
            .pod()
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.termination_message_policy.as_deref())
            == Some("FallbackToLogsOnError");
        status::termination_message(&file, exit_code, fallback, || {
            read_tail(&self.log_file(), self.log_start, status::FALLBACK_LOG_BYTES)
        })
    }

    /// Start the process and look after it until it exits or the pod ends.
    async fn run_once(&mut self, spec: &ProcessSpec) -> Result<RunEnd, std::io::Error> {
        // Each run gets a fresh termination log, as each container gets its own file.
        match std::fs::remove_file(&spec.termination_log) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.log_start = std::fs::metadata(self.log_file()).map_or(0, |m| m.len());
        let mut running = process::spawn(spec, &self.run_dir, &self.log_file())?;
        tracing::info!(pod = %self.name, pid = running.pid(), "pod container started");
        let now = Timestamp::now();
        self.record.started(now);
        let pod = self.pod();
        let readiness = spec::the_container(&pod)
            .ok()
            .and_then(crate::probe::readiness);
        if readiness.is_none() {
            self.record.set_ready(true, now);
        }
        self.write_status().await;
        let end = self.supervise(&mut running, readiness).await;
        if let RunEnd::Ended(_) = end {
            let grace = grace_period(&self.pod());
            running.stop(grace).await;
        }
        Ok(end)
    }

    async fn supervise(&mut self, running: &mut Running, readiness: Option<Readiness>) -> RunEnd {
        let ip = self.record.pod_ip.map(std::net::IpAddr::V4);
        let start = tokio::time::Instant::now();
        let mut next_probe = readiness.as_ref().map(|r| start + r.initial_delay);
        let mut failures = 0u32;
        loop {
            // Without a probe the sleep branch is disabled; its deadline is never awaited.
            let probe_at = next_probe.unwrap_or(start);
            tokio::select! {
                exit = running.wait() => return RunEnd::Exited(exit),
                end = ended(&mut self.rx, &self.shutdown) => return RunEnd::Ended(end),
                _ = tokio::time::sleep_until(probe_at), if next_probe.is_some() => {
                    let (Some(r), Some(ip)) = (readiness.as_ref(), ip) else { continue };
                    let ok = self.shared.prober.check(ip, &r.check, r.timeout).await;
                    let ready = if ok {
                        failures = 0;
                        true
                    } else {
                        failures += 1;
                        self.record.ready && failures < r.failure_threshold
                    };
                    if ready != self.record.ready {
                        self.record.set_ready(ready, Timestamp::now());
                        self.write_status().await;
                    }
                    next_probe = Some(tokio::time::Instant::now() + r.period);
                }
            }
        }
    }

    /// Resolve volumes and configuration and build the process.
    async fn prepare(&mut self) -> Result<ProcessSpec, NotReady> {
        let pod = self.pod();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let client = self.shared.client.clone();
        let mut inputs = PodInputs::default();
        let mut unbound = Vec::new();
        for v in spec.volumes.iter().flatten() {
            if let Some(c) = &v.persistent_volume_claim {
                match claim_volume(&client, &ns, &c.claim_name).await {
                    Ok(hv) => {
                        inputs.volumes.insert(v.name.clone(), hv);
                    }
                    Err(ClaimWait::Unbound(m)) => unbound.push(m),
                    Err(ClaimWait::Mount(m)) => {
                        return Err(NotReady {
                            unschedulable: None,
                            reason: "ContainerCreating",
                            message: m,
                        });
                    }
                }
            } else if v.empty_dir.is_some() {
                let dir = self.run_dir.join(layout::VOLUMES).join(&v.name);
                if let Err(err) = std::fs::create_dir_all(&dir) {
                    return Err(mount_error(&v.name, &err));
                }
                inputs.volumes.insert(v.name.clone(), HostVolume::Dir(dir));
            } else if let Some(h) = &v.host_path {
                inputs
                    .volumes
                    .insert(v.name.clone(), HostVolume::Dir(PathBuf::from(&h.path)));
            }
        }
        if !unbound.is_empty() {
            return Err(NotReady {
                unschedulable: Some(UNBOUND_MESSAGE.into()),
                reason: "ContainerCreating",
                message: unbound.join("; "),
            });
        }
        let (secrets, config_maps) = referenced_objects(&pod);
        for name in secrets {
            match Api::<Secret>::namespaced(client.clone(), &ns)
                .get_opt(&name)
                .await
            {
                Ok(Some(s)) => {
                    inputs.secrets.insert(name, secret_data(&s));
                }
                Ok(None) => {}
                Err(err) => return Err(api_wait(&err)),
            }
        }
        for name in config_maps {
            match Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .get_opt(&name)
                .await
            {
                Ok(Some(c)) => {
                    inputs.config_maps.insert(name, config_map_data(&c));
                }
                Ok(None) => {}
                Err(err) => return Err(api_wait(&err)),
            }
        }
        for v in spec.volumes.iter().flatten() {
            let Some(files) = spec::projected_files(v, &inputs) else {
                continue;
            };
            let files = files.map_err(|e| NotReady {
                unschedulable: None,
                reason: "ContainerCreating",
                message: format!("MountVolume.SetUp failed for volume {:?}: {e}", v.name),
            })?;
            let dir = self.run_dir.join(layout::VOLUMES).join(&v.name);
            materialise(&dir, &files).map_err(|e| mount_error(&v.name, &e))?;
            inputs.volumes.insert(v.name.clone(), HostVolume::Dir(dir));
        }
        let ip = self.record.pod_ip.unwrap_or(Ipv4Addr::LOCALHOST);
        spec::build_process(
            &pod,
            &inputs,
            &self.run_dir,
            ip,
            &self.shared.commands,
            &|k| std::env::var(k).ok(),
        )
        .map_err(|e| NotReady {
            unschedulable: None,
            reason: e.waiting_reason(),
            message: e.to_string(),
        })
    }
}

fn mount_error(volume: &str, err: &std::io::Error) -> NotReady {
    NotReady {
        unschedulable: None,
        reason: "ContainerCreating",
        message: format!("MountVolume.SetUp failed for volume {volume:?}: {err}"),
    }
}

fn api_wait(err: &kube::Error) -> NotReady {
    NotReady {
        unschedulable: None,
        reason: "ContainerCreating",
        message: format!("reading pod configuration: {err}"),
    }
}

/// `terminationGracePeriodSeconds` (or the deletion's own grace), capped.
fn grace_period(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .and_then(|s| u64::try_from(s).ok());
    secs.map(Duration::from_secs)
        .unwrap_or(process::DEFAULT_TERMINATION_GRACE)
        .min(process::MAX_TERMINATION_GRACE)
}

/// Why a claim cannot be used yet.
enum ClaimWait {
    /// Not bound (or not there): the scheduler would wait.
    Unbound(String),
    /// Bound, but its volume cannot be set up.
    Mount(String),
}

/// PVC → PV → where its bytes are on this host.
async fn claim_volume(client: &Client, ns: &str, claim: &str) -> Result<HostVolume, ClaimWait> {
    let pvc = match Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .get_opt(claim)
        .await
    {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err(ClaimWait::Unbound(format!(
                "persistentvolumeclaim {claim:?} not found"
            )));
        }
        Err(err) => return Err(ClaimWait::Mount(format!("reading claim {claim}: {err}"))),
    };
    let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let Some(pv_name) = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|n| bound && !n.is_empty())
    else {
        return Err(ClaimWait::Unbound(format!(
            "persistentvolumeclaim {claim:?} is not bound"
        )));
    };
    let pv = match Api::<PersistentVolume>::all(client.clone())
        .get_opt(&pv_name)
        .await
    {
        Ok(Some(pv)) => pv,
        Ok(None) => {
            return Err(ClaimWait::Unbound(format!(
                "persistentvolume {pv_name:?} of claim {claim:?} not found"
            )));
        }
        Err(err) => return Err(ClaimWait::Mount(format!("reading volume {pv_name}: {err}"))),
    };
    let spec = pv.spec.unwrap_or_default();
    let block = spec.volume_mode.as_deref() == Some("Block");
    if block {
        let Some(path) = spec.local.map(|l| l.path) else {
            return Err(ClaimWait::Mount(format!(
                "block volume {pv_name} has no local path"
            )));
        };
        // The PV names a stable symlink; the worker gets the device itself.
        return std::fs::canonicalize(&path)
            .map(HostVolume::Device)
            .map_err(|e| ClaimWait::Mount(format!("block device {path} of {pv_name}: {e}")));
    }
    match (spec.host_path, spec.local) {
        (Some(h), _) => Ok(HostVolume::Dir(PathBuf::from(h.path))),
        (None, Some(l)) => Ok(HostVolume::Dir(PathBuf::from(l.path))),
        (None, None) => Err(ClaimWait::Mount(format!(
            "volume {pv_name} is neither hostPath nor local"
        ))),
    }
}

/// Names of the Secrets and ConfigMaps a pod refers to (volumes, env, envFrom).
fn referenced_objects(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let mut secrets = Vec::new();
    let mut cms = Vec::new();
    let Some(spec) = pod.spec.as_ref() else {
        return (secrets, cms);
    };
    for v in spec.volumes.iter().flatten() {
        if let Some(n) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secrets.push(n);
        }
        if let Some(c) = &v.config_map {
            cms.push(c.name.clone());
        }
    }
    for c in &spec.containers {
        for e in c.env.iter().flatten() {
            if let Some(f) = &e.value_from {
                if let Some(r) = &f.secret_key_ref {
                    secrets.push(r.name.clone());
                }
                if let Some(r) = &f.config_map_key_ref {
                    cms.push(r.name.clone());
                }
            }
        }
        for f in c.env_from.iter().flatten() {
            if let Some(r) = &f.secret_ref {
                secrets.push(r.name.clone());
            }
            if let Some(r) = &f.config_map_ref {
                cms.push(r.name.clone());
            }
        }
    }
    secrets.sort();
    secrets.dedup();
    cms.sort();
    cms.dedup();
    (secrets, cms)
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    // stringData is write-only on a real API server; a lenient one may keep it.
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

fn config_map_data(c: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = c
        .binary_data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in c.data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

/// Write a Secret/ConfigMap volume afresh: files 0600 in a 0700 directory.
fn materialise(dir: &Path, files: &[(PathBuf, Vec<u8>)]) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true).mode(0o700);
    b.create(dir)?;
    for (rel, bytes) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            b.create(parent)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        std::io::Write::write_all(&mut f, bytes)?;
    }
    Ok(())
}

fn read_prefix(path: &Path, max: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(max as u64).read_to_end(&mut buf);
    }
    buf
}

/// The ports a pod's container listens on: its declared ports and the metrics port.
fn pod_ports(pod: &Pod) -> Vec<u16> {
    let Ok(c) = spec::the_container(pod) else {
        return Vec::new();
    };
    let mut ports: Vec<u16> = c
        .ports
        .iter()
        .flatten()
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    ports.push(spec::metrics_port(c));
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// A start for the address round that differs between agents (time and process id).
fn random_offset() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id().wrapping_mul(2_654_435_761)
}

fn read_tail(path: &Path, from: u64, max: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(max as u64).max(from)));
        let _ = f.read_to_end(&mut buf);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secret_volumes_are_private_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stale"), b"old").unwrap();
        materialise(
            &dir,
            &[
                ("tls.key".into(), b"KEY".to_vec()),
                ("sub/ca.crt".into(), b"CA".to_vec()),
            ],
        )
        .unwrap();
        assert_eq!(std::fs::read(dir.join("tls.key")).unwrap(), b"KEY");
        assert_eq!(std::fs::read(dir.join("sub/ca.crt")).unwrap(), b"CA");
        assert!(!dir.join("stale").exists(), "rewritten afresh");
        let mode = std::fs::metadata(dir.join("tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn grace_is_the_pods_own_and_capped() {
        let mut pod = Pod::default();
        assert_eq!(grace_period(&pod), process::DEFAULT_TERMINATION_GRACE);
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            termination_grace_period_seconds: Some(3),
            ..Default::default()
        });
        assert_eq!(grace_period(&pod), Duration::from_secs(3));
        pod.metadata.deletion_grace_period_seconds = Some(100_000);
        assert_eq!(grace_period(&pod), process::MAX_TERMINATION_GRACE);
    }

    #[test]
    fn referenced_objects_cover_volumes_env_and_env_from() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c",
                "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s1", "key": "k"}}},
                        {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "c1", "key": "k"}}}],
                "envFrom": [{"secretRef": {"name": "s2"}}, {"configMapRef": {"name": "c1"}}]}],
                "volumes": [{"name": "v", "secret": {"secretName": "s1"}},
                            {"name": "w", "configMap": {"name": "c2"}}]}
        }))
        .unwrap();
        let (s, c) = referenced_objects(&pod);
        assert_eq!(s, ["s1", "s2"]);
        assert_eq!(c, ["c1", "c2"]);
    }

    #[test]
    fn log_tail_reads_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("log");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read_tail(&f, 0, 4), b"6789");
        // Only the current run's output: it started at byte 8.
        assert_eq!(read_tail(&f, 8, 4), b"89");
        assert_eq!(read_prefix(&f, 4), b"0123");
        assert!(read_tail(&tmp.path().join("none"), 0, 4).is_empty());
    }
}
