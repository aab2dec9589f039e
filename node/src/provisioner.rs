//! The local provisioner: binds PersistentVolumeClaims of the built-in storage classes, as an
//! external-provisioner with its CSI driver (and the PV controller's binding half) do on a
//! cluster.
//!
//! Level-triggered: reflector stores of PVCs, PVs, StorageClasses and Pods are kept by
//! watches; after every batch of events (and every resync interval) one pass
//!
//! 1. provisions each unbound claim of a class with one of our provisioners (`Immediate`, or
//!    `WaitForFirstConsumer` once a pod uses the claim or a node was selected): storage under
//!    `<data-root>/volumes/<pvc uid>/`, a PersistentVolume `pvc-<pvc uid>` bound to the claim,
//!    then the claim bound to it;
//! 2. releases the storage of our PVs whose claim is gone (reclaim policy `Delete`) and deletes
//!    the PV — unless a running pod still uses the claim name (the `pvc-protection` rule);
//! 3. sweeps storage directories that neither a PV nor a claim names (crash leftovers) and
//!    re-attaches loop devices of Block PVs whose device went away (after a reboot).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, LocalVolumeSource, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeClaimStatus, PersistentVolumeSpec, Pod, VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::storage::{LOCAL_BLOCK_PROVISIONER, LOCAL_PROVISIONER, StorageError, VolumeStore};
use crate::{NodeConfig, NodeError};

/// PV annotation naming the provisioner that created it.
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// PVC annotation: binding finished.
pub const ANN_BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
/// PVC annotation: the binding was made by a controller, not by the user.
pub const ANN_BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
/// PVC annotation: which provisioner serves the claim.
pub const ANN_STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
/// The same, older spelling (upstream CDI still reads it).
pub const ANN_BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
/// PVC annotation set by the scheduler for `WaitForFirstConsumer` claims.
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// StorageClass annotation marking the default class.
pub const ANN_DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
/// Node label local PVs are pinned by.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// Wait after an event before a pass, so a burst of events makes one pass.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Volume mode of a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeMode {
    /// A directory.
    Filesystem,
    /// A block device.
    Block,
}

impl VolumeMode {
    /// Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeMode::Filesystem => "Filesystem",
            VolumeMode::Block => "Block",
        }
    }
}

/// What to provision for a claim.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Claim uid (names the storage and the PV).
    pub uid: String,
    /// Claim namespace.
    pub namespace: String,
    /// Claim name.
    pub name: String,
    /// The class (explicit or default).
    pub class: String,
    /// Our provisioner serving it.
    pub provisioner: String,
    /// Mode.
    pub mode: VolumeMode,
    /// Requested capacity as written.
    pub capacity: Quantity,
    /// Requested capacity in bytes.
    pub bytes: u64,
    /// Access modes of the claim.
    pub access_modes: Vec<String>,
}

/// Why a claim of one of our classes cannot be provisioned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No parsable `resources.requests.storage`.
    #[error("claim has no valid storage request: {0}")]
    BadRequest(String),
    /// The class cannot serve the requested mode.
    #[error("storage class {class} ({provisioner}) cannot provision {mode} volumes")]
    WrongMode {
        /// Class.
        class: String,
        /// Provisioner.
        provisioner: String,
        /// Requested mode.
        mode: &'static str,
    },
}

/// Name of the PV provisioned for claim `uid`.
pub fn pv_name(uid: &str) -> String {
    format!("pvc-{uid}")
}

/// Whether `p` is one of ours.
pub fn is_ours(provisioner: &str) -> bool {
    provisioner == LOCAL_PROVISIONER || provisioner == LOCAL_BLOCK_PROVISIONER
}

/// The class a claim gets: its `storageClassName`, or the default class when unset (the
/// newest, when several claim to be default, as the API server picks). `""` means no class.
pub fn class_of<'a>(
    pvc: &PersistentVolumeClaim,
    classes: &'a [std::sync::Arc<StorageClass>],
) -> Option<&'a StorageClass> {
    let spec = pvc.spec.as_ref()?;
    match spec.storage_class_name.as_deref() {
        Some("") => None,
        Some(name) => classes
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .map(|c| c.as_ref()),
        None => classes
            .iter()
            .filter(|c| {
                c.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANN_DEFAULT_CLASS))
                    .is_some_and(|v| v == "true")
            })
            .max_by(|a, b| {
                a.metadata
                    .creation_timestamp
                    .cmp(&b.metadata.creation_timestamp)
            })
            .map(|c| c.as_ref()),
    }
}

/// Whether a pod that is not finished uses claim `name` in namespace `ns`.
fn used_by_live_pod(pods: &[std::sync::Arc<Pod>], ns: &str, name: &str) -> bool {
    pods.iter().any(|p| {
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        p.metadata.namespace.as_deref() == Some(ns)
            && !matches!(phase, Some("Succeeded" | "Failed"))
            && p.spec.as_ref().is_some_and(|s| {
                s.volumes.iter().flatten().any(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|c| c.claim_name == name)
                })
            })
    })
}

/// Decide whether (and what) to provision for `pvc`. `Ok(None)`: not ours, already bound,
/// or waiting for a consumer.
pub fn plan(
    pvc: &PersistentVolumeClaim,
    classes: &[std::sync::Arc<StorageClass>],
    pods: &[std::sync::Arc<Pod>],
) -> Result<Option<Plan>, PlanError> {
    let Some(spec) = pvc.spec.as_ref() else {
        return Ok(None);
    };
    let m = &pvc.metadata;
    if m.deletion_timestamp.is_some()
        || spec.volume_name.as_deref().is_some_and(|v| !v.is_empty())
        || pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
        // Populated or cloned claims are someone else's to fill: a populator binds a prime
        // claim and hands the PV over; our storage cannot clone.
        || spec.data_source.is_some()
        || spec.data_source_ref.is_some()
    {
        return Ok(None);
    }
    let Some(class) = class_of(pvc, classes) else {
        return Ok(None);
    };
    if !is_ours(&class.provisioner) {
        return Ok(None);
    }
    let (ns, name) = (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    );
    if class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer") {
        let selected = m
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(ANN_SELECTED_NODE));
        if !selected && !used_by_live_pod(pods, &ns, &name) {
            return Ok(None);
        }
    }
    let mode = match spec.volume_mode.as_deref() {
        Some("Block") => VolumeMode::Block,
        _ => VolumeMode::Filesystem,
    };
    let block_class = class.provisioner == LOCAL_BLOCK_PROVISIONER;
    if (mode == VolumeMode::Block) != block_class {
        return Err(PlanError::WrongMode {
            class: class.metadata.name.clone().unwrap_or_default(),
            provisioner: class.provisioner.clone(),
            mode: mode.as_str(),
        });
    }
    let capacity = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .cloned()
        .ok_or_else(|| PlanError::BadRequest("no resources.requests.storage".into()))?;
    let bytes = cdi_api::quantity::parse_bytes(&capacity.0)
        .map_err(|e| PlanError::BadRequest(format!("{}: {e}", capacity.0)))?;
    Ok(Some(Plan {
        uid: m.uid.clone().unwrap_or_default(),
        namespace: ns,
        name,
        class: class.metadata.name.clone().unwrap_or_default(),
        provisioner: class.provisioner.clone(),
        mode,
        capacity,
        bytes,
        access_modes: spec.access_modes.clone().unwrap_or_default(),
    }))
}

/// Where a provisioned claim's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// Filesystem: the directory (PV `spec.hostPath`).
    Dir(std::path::PathBuf),
    /// Block: the stable device link (PV `spec.local`).
    DeviceLink(std::path::PathBuf),
}

/// The PersistentVolume for a plan, bound to its claim.
pub fn build_pv(plan: &Plan, backing: &Backing, node_name: &str) -> PersistentVolume {
    let (host_path, local) = match backing {
        Backing::Dir(d) => (
            Some(HostPathVolumeSource {
                path: d.display().to_string(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            None,
        ),
        Backing::DeviceLink(l) => (
            None,
            Some(LocalVolumeSource {
                path: l.display().to_string(),
                fs_type: None,
            }),
        ),
    };
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(pv_name(&plan.uid)),
            annotations: Some(BTreeMap::from([(
                ANN_PROVISIONED_BY.to_string(),
                plan.provisioner.clone(),
            )])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([(
                "storage".to_string(),
                plan.capacity.clone(),
            )])),
            access_modes: Some(plan.access_modes.clone()),
            volume_mode: Some(plan.mode.as_str().into()),
            storage_class_name: Some(plan.class.clone()),
            persistent_volume_reclaim_policy: Some("Delete".into()),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(plan.namespace.clone()),
                name: Some(plan.name.clone()),
                uid: Some(plan.uid.clone()),
                ..Default::default()
            }),
            host_path,
            local,
            // Local volumes must name their node; the one node here.
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: HOSTNAME_LABEL.into(),
                            operator: "In".into(),
                            values: Some(vec![node_name.to_string()]),
                        }]),
                        match_fields: None,
                    }],
                }),
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// Merge patch binding a claim to its PV (spec and annotations).
pub fn pvc_binding_patch(plan: &Plan) -> serde_json::Value {
    json!({
        "metadata": {"annotations": {
            ANN_BIND_COMPLETED: "yes",
            ANN_BOUND_BY_CONTROLLER: "yes",
            ANN_STORAGE_PROVISIONER: plan.provisioner,
            ANN_BETA_STORAGE_PROVISIONER: plan.provisioner,
        }},
        "spec": {"volumeName": pv_name(&plan.uid)},
    })
}

/// The bound claim's status.
pub fn pvc_bound_status(plan: &Plan) -> PersistentVolumeClaimStatus {
    PersistentVolumeClaimStatus {
        phase: Some("Bound".into()),
        capacity: Some(BTreeMap::from([(
            "storage".to_string(),
            plan.capacity.clone(),
        )])),
        access_modes: Some(plan.access_modes.clone()),
        ..Default::default()
    }
}

/// Run the provisioner until `shutdown` is cancelled.
pub async fn run_provisioner(
    client: Client,
    cfg: NodeConfig,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let volumes = VolumeStore::new(&cfg.volumes_dir())?;
    let (pvcs, pvc_w) = reflector::store::<PersistentVolumeClaim>();
    let (pvs, pv_w) = reflector::store::<PersistentVolume>();
    let (classes, class_w) = reflector::store::<StorageClass>();
    let (pods, pod_w) = reflector::store::<Pod>();
    let cfgw = watcher::Config::default();
    // Each stream yields `true` when its store finished an initial listing.
    fn init_done<K>(ev: &Result<Event<K>, watcher::Error>) -> bool {
        matches!(ev, Ok(Event::InitDone))
    }
    let s1 = reflector::reflector(
        pvc_w,
        watcher::watcher(Api::all(client.clone()), cfgw.clone()),
    )
    .default_backoff()
    .map(|e| (0usize, init_done(&e)));
    let s2 = reflector::reflector(
        pv_w,
        watcher::watcher(Api::all(client.clone()), cfgw.clone()),
    )
    .default_backoff()
    .map(|e| (1, init_done(&e)));
    let s3 = reflector::reflector(
        class_w,
        watcher::watcher(Api::all(client.clone()), cfgw.clone()),
    )
    .default_backoff()
    .map(|e| (2, init_done(&e)));
    let s4 = reflector::reflector(pod_w, watcher::watcher(Api::all(client.clone()), cfgw))
        .default_backoff()
        .map(|e| (3, init_done(&e)));
    let mut events = futures::stream::select_all([s1.boxed(), s2.boxed(), s3.boxed(), s4.boxed()]);
    let mut listed = [false; 4];
    let p = Provisioner {
        client,
        cfg,
        volumes,
        pvcs,
        pvs,
        classes,
        pods,
    };
    let mut warned = HashSet::new();
    loop {
        let resync = tokio::time::sleep(p.cfg.resync_interval);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            ev = events.next() => match ev {
                None => return Ok(()),
                Some((i, done)) => {
                    listed[i] |= done;
                    // Coalesce a burst of events into one pass.
                    tokio::time::sleep(DEBOUNCE).await;
                    while let Some(Some((i, done))) = events.next().now_or_never() {
                        listed[i] |= done;
                    }
                }
            },
            _ = resync => {}
        }
        // A pass over partial stores would take live volumes for orphans.
        if listed.iter().all(|l| *l) {
            p.pass(&mut warned).await;
        }
    }
}

struct Provisioner {
    client: Client,
    cfg: NodeConfig,
    volumes: VolumeStore,
    pvcs: Store<PersistentVolumeClaim>,
    pvs: Store<PersistentVolume>,
    classes: Store<StorageClass>,
    pods: Store<Pod>,
}

/// Why one claim or volume could not be handled in this pass (retried in the next).
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

impl Provisioner {
    async fn pass(&self, warned: &mut HashSet<String>) {
        let classes = self.classes.state();
        let pods = self.pods.state();
        let pvcs = self.pvcs.state();
        for pvc in &pvcs {
            let key = pvc.metadata.uid.clone().unwrap_or_default();
            match plan(pvc, &classes, &pods) {
                Ok(None) => {}
                Ok(Some(plan)) => {
                    if let Err(err) = self.provision(&plan).await {
                        tracing::warn!(namespace = %plan.namespace, claim = %plan.name, error = %err, "provisioning failed");
                    }
                }
                Err(err) => {
                    if warned.insert(key) {
                        tracing::warn!(namespace = ?pvc.metadata.namespace, claim = ?pvc.metadata.name, error = %err, "cannot provision claim");
                    }
                }
            }
        }
        let live_claims: HashSet<String> =
            pvcs.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        let pvs = self.pvs.state();
        let mut pv_claims = HashSet::new();
        for pv in &pvs {
            let ours = pv
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANN_PROVISIONED_BY))
                .is_some_and(|p| is_ours(p));
            if !ours {
                continue;
            }
            let spec = pv.spec.clone().unwrap_or_default();
            let claim = spec.claim_ref.clone().unwrap_or_default();
            let uid = claim.uid.clone().unwrap_or_default();
            pv_claims.insert(uid.clone());
            if live_claims.contains(&uid) {
                if spec.volume_mode.as_deref() == Some("Block")
                    && let Err(err) = self.reattach(&uid)
                {
                    tracing::warn!(volume = ?pv.metadata.name, error = %err, "re-attaching a block volume");
                }
                continue;
            }
            if spec.persistent_volume_reclaim_policy.as_deref() != Some("Delete") {
                continue;
            }
            let (ns, name) = (
                claim.namespace.unwrap_or_default(),
                claim.name.unwrap_or_default(),
            );
            let same_name_claim = pvcs.iter().any(|p| {
                p.metadata.namespace.as_deref() == Some(ns.as_str())
                    && p.metadata.name.as_deref() == Some(name.as_str())
            });
            if !same_name_claim && used_by_live_pod(&pods, &ns, &name) {
                // Like pvc-protection: a running pod still has the volume.
                continue;
            }
            if let Err(err) = self.reclaim(pv, &uid).await {
                tracing::warn!(volume = ?pv.metadata.name, error = %err, "releasing a volume");
            }
        }
        for uid in self.volumes.provisioned() {
            if !live_claims.contains(&uid) && !pv_claims.contains(&uid) {
                tracing::info!(claim = %uid, "removing storage no volume or claim names");
                if let Err(err) = self.volumes.release(&uid) {
                    tracing::warn!(claim = %uid, error = %err, "sweeping storage");
                }
            }
        }
    }

    fn reattach(&self, uid: &str) -> Result<(), StorageError> {
        let link = self.volumes.block_link(uid)?;
        if std::fs::canonicalize(&link).is_err() || !is_attached(&link) {
            let dev = self.volumes.ensure_block_attached(uid)?;
            tracing::info!(claim = %uid, device = %dev.display(), "re-attached block volume");
        }
        Ok(())
    }

    async fn provision(&self, plan: &Plan) -> Result<(), StepError> {
        let backing = match plan.mode {
            VolumeMode::Filesystem => Backing::Dir(self.volumes.create_filesystem(&plan.uid)?),
            VolumeMode::Block => {
                let (link, _dev) = self.volumes.create_block(&plan.uid, plan.bytes)?;
                Backing::DeviceLink(link)
            }
        };
        let pv = build_pv(plan, &backing, &self.cfg.node_name);
        let pv_api: Api<PersistentVolume> = Api::all(self.client.clone());
        let name = pv_name(&plan.uid);
        match pv_api.create(&PostParams::default(), &pv).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(err) => return Err(err.into()),
        }
        pv_api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Bound"}})),
            )
            .await?;
        let pvc_api: Api<PersistentVolumeClaim> =
            Api::namespaced(self.client.clone(), &plan.namespace);
        pvc_api
            .patch(
                &plan.name,
                &PatchParams::default(),
                &Patch::Merge(pvc_binding_patch(plan)),
            )
            .await?;
        pvc_api
            .patch_status(
                &plan.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": pvc_bound_status(plan)})),
            )
            .await?;
        tracing::info!(namespace = %plan.namespace, claim = %plan.name, volume = %name, "claim bound");
        Ok(())
    }

    async fn reclaim(&self, pv: &PersistentVolume, uid: &str) -> Result<(), StepError> {
        self.volumes.release(uid)?;
        let name = pv.meta().name.clone().unwrap_or_default();
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(err) => return Err(err.into()),
        }
        tracing::info!(volume = %name, "volume released");
        Ok(())
    }
}

/// Whether a device link points at a loop device still backed by a file.
fn is_attached(link: &Path) -> bool {
    let Ok(dev) = std::fs::canonicalize(link) else {
        return false;
    };
    let Some(name) = dev.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    std::fs::metadata(format!("/sys/block/{name}/loop/backing_file")).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pvc(v: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(v).unwrap()
    }

    fn classes() -> Vec<Arc<StorageClass>> {
        let c = |v: serde_json::Value| Arc::new(serde_json::from_value::<StorageClass>(v).unwrap());
        vec![
            c(
                json!({"metadata": {"name": "local", "annotations": {ANN_DEFAULT_CLASS: "true"}},
                     "provisioner": LOCAL_PROVISIONER, "volumeBindingMode": "Immediate"}),
            ),
            c(json!({"metadata": {"name": "local-block"}, "provisioner": LOCAL_BLOCK_PROVISIONER})),
            c(
                json!({"metadata": {"name": "wffc"}, "provisioner": LOCAL_PROVISIONER,
                     "volumeBindingMode": "WaitForFirstConsumer"}),
            ),
            c(json!({"metadata": {"name": "other"}, "provisioner": "ebs.csi.aws.com"})),
        ]
    }

    fn claim(class: Option<&str>, mode: &str) -> PersistentVolumeClaim {
        let mut spec = json!({"accessModes": ["ReadWriteOnce"], "volumeMode": mode,
                              "resources": {"requests": {"storage": "1Gi"}}});
        if let Some(c) = class {
            spec["storageClassName"] = json!(c);
        }
        pvc(json!({"metadata": {"name": "disk", "namespace": "ns1", "uid": "0a-1"}, "spec": spec}))
    }

    #[test]
    fn plans_follow_class_mode_and_binding_state() {
        let cl = classes();
        let p = plan(&claim(None, "Filesystem"), &cl, &[]).unwrap().unwrap();
        assert_eq!(p.class, "local", "the default class");
        assert_eq!(p.bytes, 1 << 30);
        assert_eq!(p.mode, VolumeMode::Filesystem);
        let p = plan(&claim(Some("local-block"), "Block"), &cl, &[])
            .unwrap()
            .unwrap();
        assert_eq!(p.provisioner, LOCAL_BLOCK_PROVISIONER);
        assert!(matches!(
            plan(&claim(Some("local-block"), "Filesystem"), &cl, &[]),
            Err(PlanError::WrongMode { .. })
        ));
        assert!(matches!(
            plan(&claim(Some("local"), "Block"), &cl, &[]),
            Err(PlanError::WrongMode { .. })
        ));
        assert_eq!(
            plan(&claim(Some("other"), "Filesystem"), &cl, &[]),
            Ok(None)
        );
        assert_eq!(plan(&claim(Some(""), "Filesystem"), &cl, &[]), Ok(None));
        assert_eq!(
            plan(&claim(Some("missing"), "Filesystem"), &cl, &[]),
            Ok(None)
        );
        let mut bound = claim(None, "Filesystem");
        bound.spec.as_mut().unwrap().volume_name = Some("pv-x".into());
        assert_eq!(plan(&bound, &cl, &[]), Ok(None));
        let mut populated = claim(None, "Filesystem");
        populated.spec.as_mut().unwrap().data_source_ref = Some(
            serde_json::from_value(
                json!({"apiGroup": "cdi.kubevirt.io", "kind": "VolumeImportSource", "name": "s"}),
            )
            .unwrap(),
        );
        assert_eq!(plan(&populated, &cl, &[]), Ok(None));
        let mut no_size = claim(None, "Filesystem");
        no_size.spec.as_mut().unwrap().resources = None;
        assert!(matches!(
            plan(&no_size, &cl, &[]),
            Err(PlanError::BadRequest(_))
        ));
    }

    #[test]
    fn wait_for_first_consumer_binds_once_a_pod_uses_the_claim() {
        let cl = classes();
        let c = claim(Some("wffc"), "Filesystem");
        assert_eq!(plan(&c, &cl, &[]), Ok(None));
        let pod = |ns: &str, phase: &str| {
            Arc::new(serde_json::from_value::<Pod>(json!({
                "metadata": {"name": "importer-disk", "namespace": ns},
                "spec": {"containers": [], "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "disk"}}]},
                "status": {"phase": phase}
            })).unwrap())
        };
        assert_eq!(plan(&c, &cl, &[pod("other-ns", "Pending")]), Ok(None));
        assert_eq!(plan(&c, &cl, &[pod("ns1", "Succeeded")]), Ok(None));
        assert!(plan(&c, &cl, &[pod("ns1", "Pending")]).unwrap().is_some());
        let mut selected = c.clone();
        selected.metadata.annotations = Some(BTreeMap::from([(
            ANN_SELECTED_NODE.to_string(),
            "n".to_string(),
        )]));
        assert!(plan(&selected, &cl, &[]).unwrap().is_some());
    }

    #[test]
    fn pv_and_claim_binding_objects() {
        let cl = classes();
        let p = plan(&claim(None, "Filesystem"), &cl, &[]).unwrap().unwrap();
        let pv = build_pv(&p, &Backing::Dir("/d/volumes/0a-1".into()), "node1");
        assert_eq!(pv.metadata.name.as_deref(), Some("pvc-0a-1"));
        assert_eq!(
            pv.metadata.annotations.as_ref().unwrap()[ANN_PROVISIONED_BY],
            LOCAL_PROVISIONER
        );
        let s = pv.spec.as_ref().unwrap();
        assert_eq!(s.capacity.as_ref().unwrap()["storage"].0, "1Gi");
        assert_eq!(
            s.access_modes.as_deref(),
            Some(&["ReadWriteOnce".to_string()][..])
        );
        assert_eq!(s.volume_mode.as_deref(), Some("Filesystem"));
        assert_eq!(s.storage_class_name.as_deref(), Some("local"));
        assert_eq!(
            s.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
        let cr = s.claim_ref.as_ref().unwrap();
        assert_eq!(
            (
                cr.namespace.as_deref(),
                cr.name.as_deref(),
                cr.uid.as_deref()
            ),
            (Some("ns1"), Some("disk"), Some("0a-1"))
        );
        let hp = s.host_path.as_ref().unwrap();
        assert_eq!(
            (hp.path.as_str(), hp.type_.as_deref()),
            ("/d/volumes/0a-1", Some("DirectoryOrCreate"))
        );
        assert!(s.local.is_none());
        let term = &s
            .node_affinity
            .as_ref()
            .unwrap()
            .required
            .as_ref()
            .unwrap()
            .node_selector_terms[0];
        let req = &term.match_expressions.as_ref().unwrap()[0];
        assert_eq!(
            (req.key.as_str(), req.operator.as_str()),
            (HOSTNAME_LABEL, "In")
        );
        assert_eq!(req.values.as_deref(), Some(&["node1".to_string()][..]));

        let b = plan(&claim(Some("local-block"), "Block"), &cl, &[])
            .unwrap()
            .unwrap();
        let pv = build_pv(
            &b,
            &Backing::DeviceLink("/d/volumes/0a-1/dev".into()),
            "node1",
        );
        let s = pv.spec.as_ref().unwrap();
        assert_eq!(s.local.as_ref().unwrap().path, "/d/volumes/0a-1/dev");
        assert!(s.host_path.is_none());
        assert_eq!(s.volume_mode.as_deref(), Some("Block"));

        let patch = pvc_binding_patch(&p);
        assert_eq!(patch["spec"]["volumeName"], "pvc-0a-1");
        let ann = &patch["metadata"]["annotations"];
        assert_eq!(ann[ANN_BIND_COMPLETED], "yes");
        assert_eq!(ann[ANN_BOUND_BY_CONTROLLER], "yes");
        assert_eq!(ann[ANN_STORAGE_PROVISIONER], LOCAL_PROVISIONER);
        let st = pvc_bound_status(&p);
        assert_eq!(st.phase.as_deref(), Some("Bound"));
        assert_eq!(st.capacity.as_ref().unwrap()["storage"].0, "1Gi");
        assert_eq!(st.access_modes.as_ref().unwrap()[0], "ReadWriteOnce");
    }
}
