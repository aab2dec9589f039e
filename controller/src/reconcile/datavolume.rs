//! The DataVolume reconciler: renders and creates the target claim (or adopts one that may be
//! adopted), and maps claim and worker state to the DataVolume's `status`.
//!
//! A finalizer (`cdi.kubevirt.io/dataVolumeFinalizer`) lets a deleted DataVolume delete its
//! worker pods first, so the claim is released at once instead of waiting for garbage
//! collection to reach the pods through the claim; everything else goes through owner
//! references (DataVolume → claim → pods, Services, Secrets, scratch claims).

use std::sync::Arc;
use std::time::Duration;

use cdi_resources::{DataVolume, StorageProfile};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::builders::{self, ClaimError};
use crate::context::{Context, controlled_by, delete_ignore_missing, has_controller, now_rfc3339};
use crate::decide::{self, EventSpec, Operation, StatusInput, phase, reason};
use crate::error::Error;
use crate::model::{DvView, ProfileView};
use crate::names::{self, ann};

/// The DataVolume finalizer (upstream's name for its DataVolume finalizer).
pub const FINALIZER: &str = "cdi.kubevirt.io/dataVolumeFinalizer";
/// CDIConfig feature gate allowing DataVolumes to adopt existing claims.
pub const CLAIM_ADOPTION_GATE: &str = "DataVolumeClaimAdoption";
/// Upstream re-reads progress every 2 s while a worker runs.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// Safety resync of non-terminal DataVolumes (claim and pod changes normally wake us first).
const RESYNC: Duration = Duration::from_secs(60);

/// Reconcile one DataVolume (entry point for the kube-runtime controller).
pub async fn reconcile(dv: Arc<DataVolume>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = dv.namespace().unwrap_or_default();
    let api: Api<DataVolume> = Api::namespaced(ctx.client.clone(), &ns);
    let key = crate::context::key_of(dv.as_ref());
    let c = ctx.clone();
    let result = finalizer(&api, FINALIZER, dv, |event| async move {
        match event {
            FinalizerEvent::Apply(dv) => apply(dv, c).await,
            FinalizerEvent::Cleanup(dv) => cleanup(dv, c).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() {
        ctx.succeeded(&key);
    }
    result
}

fn view(dv: &DataVolume) -> Result<DvView, Error> {
    DvView::from_object(dv).map_err(|source| Error::Decode {
        kind: "DataVolume",
        source,
    })
}

/// Pick the storage class a `spec.storage` claim gets when it names none.
async fn default_class(ctx: &Context, dv: &DvView) -> Result<Option<String>, Error> {
    let named = dv
        .spec
        .storage
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .filter(|c| !c.is_empty());
    if named.is_some() || dv.spec.storage.is_none() {
        return Ok(named);
    }
    let classes: Api<StorageClass> = Api::all(ctx.client.clone());
    let list = classes.list(&Default::default()).await?;
    Ok(decide::default_class(
        &list.items,
        dv.spec.content_type() == "kubevirt",
    ))
}

/// Render the claim for `dv`; `Ok(Err)` is a rendering problem to report, not to retry.
async fn render(
    ctx: &Context,
    dv: &DvView,
    config: &crate::model::ConfigView,
) -> Result<Result<PersistentVolumeClaim, ClaimError>, Error> {
    let class = default_class(ctx, dv).await?;
    let profile = match (&class, &dv.spec.storage) {
        (Some(c), Some(_)) => {
            let api: Api<StorageProfile> = Api::all(ctx.client.clone());
            match api.get_opt(c).await? {
                Some(p) => Some(
                    ProfileView::from_object(&p).map_err(|source| Error::Decode {
                        kind: "StorageProfile",
                        source,
                    })?,
                ),
                None => None,
            }
        }
        _ => None,
    };
    Ok(builders::target_pvc(
        dv,
        class.as_deref(),
        profile.as_ref(),
        config,
    ))
}

/// An existing claim of the DataVolume's name: ours, adoptable (then adopted), or refused.
async fn check_existing(
    ctx: &Context,
    dv: &DataVolume,
    v: &DvView,
    p: PersistentVolumeClaim,
    gate: bool,
    pvcs: &Api<PersistentVolumeClaim>,
) -> Result<PersistentVolumeClaim, Error> {
    let name = v.name().to_string();
    if p.metadata.deletion_timestamp.is_some() {
        let err = Error::MarkedForDeletion(name);
        ctx.publish(
            dv,
            &EventSpec::warning(reason::ERR_RESOURCE_MARKED_FOR_DELETION, err.to_string()),
        )
        .await;
        return Err(err);
    }
    if controlled_by(&p, v.uid()) {
        return Ok(p);
    }
    // Only a claim nobody controls, that already holds this DataVolume's data or may be
    // adopted, becomes ours; anything else is someone else's volume.
    if !has_controller(&p) && !decide::requires_work(&p, v, gate) {
        let mut refs = p.metadata.owner_references.clone().unwrap_or_default();
        refs.push(builders::dv_owner_ref(v));
        let patch = json!({"metadata": {"ownerReferences": refs}});
        return Ok(pvcs
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?);
    }
    let err = Error::ResourceExists(name);
    ctx.publish(
        dv,
        &EventSpec::warning(reason::ERR_RESOURCE_EXISTS, err.to_string()),
    )
    .await;
    Err(err)
}

async fn apply(dv: Arc<DataVolume>, ctx: Arc<Context>) -> Result<Action, Error> {
    let v = view(&dv)?;
    let ns = v.namespace().to_string();
    let name = v.name().to_string();
    let op = Operation::of(&v.spec);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let config = ctx.cdi_config().await?;
    let gate = config.feature_gate(CLAIM_ADOPTION_GATE);

    let existing = if op == Operation::Unsupported {
        None
    } else {
        pvcs.get_opt(&name).await?
    };
    let mut claim_error: Option<String> = None;
    let pvc = match existing {
        None if op == Operation::Unsupported => None,
        None => match render(&ctx, &v, &config).await? {
            Ok(new) => match pvcs.create(&PostParams::default(), &new).await {
                Ok(created) => Some(created),
                // Someone created it between our read and write: look again shortly.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    return Ok(Action::requeue(Duration::from_millis(200)));
                }
                Err(e) => return Err(e.into()),
            },
            Err(e) => {
                claim_error = Some(e.to_string());
                None
            }
        },
        Some(p) => Some(check_existing(&ctx, &dv, &v, p, gate, &pvcs).await?),
    };
    let requires_work = pvc
        .as_ref()
        .is_none_or(|p| decide::requires_work(p, &v, gate));
    let progress = match (&pvc, op) {
        (Some(p), Operation::Import(_))
            if p.annotations().get(ann::POD_PHASE).map(String::as_str) == Some("Running") =>
        {
            worker_progress(&ctx, p).await
        }
        _ => None,
    };
    let now = now_rfc3339();
    let claim_error_ref = claim_error
        .as_deref()
        .map(|m| (reason::ERR_CLAIM_NOT_VALID, m));
    let outcome = decide::dv_status(&StatusInput {
        dv: &v,
        op,
        pvc: pvc.as_ref(),
        requires_work,
        claim_error: claim_error_ref,
        progress,
        now: &now,
    });
    if Some(&outcome.status) != v.status.as_ref() {
        let api: Api<DataVolume> = Api::namespaced(ctx.client.clone(), &ns);
        let mut status = serde_json::to_value(&outcome.status).map_err(|source| Error::Decode {
            kind: "DataVolume status",
            source,
        })?;
        // Upstream's unset phase is an absent field; null removes a stale one.
        if outcome.status.phase.is_empty() {
            status["phase"] = serde_json::Value::Null;
        }
        let patch = json!({ "status": status });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    for ev in &outcome.events {
        ctx.publish(dv.as_ref(), ev).await;
    }
    Ok(match outcome.status.phase.as_str() {
        phase::SUCCEEDED | phase::FAILED => Action::await_change(),
        phase::IMPORT_IN_PROGRESS => Action::requeue(PROGRESS_INTERVAL),
        _ => Action::requeue(RESYNC),
    })
}

/// Progress of the importer pod of `pvc`, if it runs and reports one.
async fn worker_progress(ctx: &Context, pvc: &PersistentVolumeClaim) -> Option<f64> {
    let pod_name = pvc.annotations().get(ann::IMPORT_POD)?.clone();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), pvc.namespace().as_deref()?);
    let pod = pods.get_opt(&pod_name).await.ok()??;
    if decide::pod_phase(&pod) != "Running" {
        return None;
    }
    ctx.scrape_progress(&pod, &builders::owner_uid(pvc)).await
}

/// The DataVolume is being deleted: remove the worker pods of its claim now, so the claim
/// (and its volume) is released without waiting for the garbage collector.
async fn cleanup(dv: Arc<DataVolume>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = dv.namespace().unwrap_or_default();
    let name = dv.name_any();
    let uid = dv.meta().uid.clone().unwrap_or_default();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(pvc) = pvcs.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    if !controlled_by(&pvc, &uid) {
        return Ok(Action::await_change());
    }
    let pvc_uid = pvc.metadata.uid.clone().unwrap_or_default();
    let anns = pvc.annotations();
    let candidates = [
        anns.get(ann::IMPORT_POD)
            .cloned()
            .unwrap_or_else(|| names::importer_pod_name(&name)),
        anns.get(ann::UPLOAD_POD)
            .cloned()
            .unwrap_or_else(|| names::upload_pod_name(&name)),
    ];
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    for pod_name in candidates {
        if let Some(pod) = pods.get_opt(&pod_name).await?
            && controlled_by(&pod, &pvc_uid)
        {
            delete_ignore_missing(&pods, &pod_name).await?;
        }
    }
    Ok(Action::await_change())
}
