//! The claim reconcilers: import (claims with the import endpoint/source annotations) and upload
//! (claims with `cdi.kubevirt.io/storage.upload.target`). They run the worker pod, its scratch
//! claim, and for uploads the Secret and Service, and mirror the pod's state into the claim's
//! annotations, which the DataVolume reconciler turns into status (upstream
//! `pkg/controller/import-controller.go`, `upload-controller.go`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use crate::builders::{self, UploadPodArgs};
use crate::context::{
    Context, controlled_by, create_or_get, delete_ignore_missing, patch_annotations, rfc3339_after,
};
use crate::decide::{self, CREATING_SCRATCH, EventSpec, reason};
use crate::error::Error;
use crate::model::ConfigView;
use crate::names::{self, UPLOAD_CLIENT_NAME, ann, pod as paths};

/// Upstream re-reads an unfinished import every 2 s.
const IMPORT_POLL: Duration = Duration::from_secs(2);
/// Wait before looking again at a claim another pod is using.
const IN_USE_RETRY: Duration = Duration::from_secs(10);
/// Safety resync of upload claims (pod changes normally wake us first).
const UPLOAD_RESYNC: Duration = Duration::from_secs(60);
/// Lifetime of an idle upload server: upstream ends upload pods before their per-pod
/// certificates need renewal (about 12 h with its default certificate settings); a new pod with
/// fresh certificates replaces it.
pub const UPLOAD_SERVER_DEADLINE: Duration = Duration::from_secs(12 * 3600);

/// Reconcile one claim (entry point for the kube-runtime controller).
pub async fn reconcile(
    pvc: Arc<PersistentVolumeClaim>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let key = crate::context::key_of(pvc.as_ref());
    let result = if decide::is_upload_claim(&pvc) {
        if pvc.annotations().contains_key(ann::CLONE_REQUEST) {
            Err(Error::Config(
                "PVC has both clone and upload annotations".into(),
            ))
        } else {
            reconcile_upload(&pvc, &ctx).await
        }
    } else if decide::is_import_claim(&pvc) {
        reconcile_import(&pvc, &ctx).await
    } else {
        Ok(Action::await_change())
    };
    if result.is_ok() {
        ctx.succeeded(&key);
    }
    result
}

fn ns_of(pvc: &PersistentVolumeClaim) -> String {
    pvc.namespace().unwrap_or_default()
}

/// Pods (other than our workers) that use the claim: importing into a claim a VM is using
/// would corrupt it.
async fn pods_using(ctx: &Context, pvc: &PersistentVolumeClaim) -> Result<Vec<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns_of(pvc));
    let name = pvc.name_any();
    let list = pods.list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| !matches!(decide::pod_phase(p), "Succeeded" | "Failed"))
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.volumes.as_ref())
                .is_some_and(|vols| {
                    vols.iter().any(|v| {
                        v.persistent_volume_claim
                            .as_ref()
                            .is_some_and(|c| c.claim_name == name)
                    })
                })
        })
        .collect())
}

async fn report_in_use(ctx: &Context, pvc: &PersistentVolumeClaim, users: &[Pod], reason: &str) {
    for p in users {
        let msg = format!(
            "pod {}/{} using PersistentVolumeClaim {}",
            p.namespace().unwrap_or_default(),
            p.name_any(),
            pvc.name_any()
        );
        ctx.publish(pvc, &EventSpec::warning(reason, msg)).await;
    }
}

fn scratch_volume_of(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()?
        .volumes
        .as_ref()?
        .iter()
        .find(|v| v.name == paths::SCRATCH_VOL)
        .and_then(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.clone())
}

/// Create the scratch claim of `pod` unless it exists; returns true when it was created (the
/// caller marks the claim's Bound condition "Creating scratch space").
async fn ensure_scratch(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    pod: &Pod,
    config: &ConfigView,
) -> Result<bool, Error> {
    let Some(name) = scratch_volume_of(pod) else {
        return Ok(false);
    };
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns_of(pvc));
    match api.get_opt(&name).await? {
        Some(existing) => {
            let pod_uid = pod.meta().uid.clone().unwrap_or_default();
            if existing.metadata.deletion_timestamp.is_some() {
                // The previous run's scratch claim is still going away; the new pod would wait
                // for it forever. Delete the pod and start over once it is gone.
                delete_ignore_missing(
                    &Api::<Pod>::namespaced(ctx.client.clone(), &ns_of(pvc)),
                    &pod.name_any(),
                )
                .await?;
                return Err(Error::NotControlled(format!(
                    "terminating scratch space found, deleting pod {}",
                    pod.name_any()
                )));
            }
            if !controlled_by(&existing, &pod_uid) {
                return Err(Error::NotControlled(format!(
                    "{name} scratch PVC not controlled by pod {}",
                    pod.name_any()
                )));
            }
            Ok(false)
        }
        None => {
            create_or_get(&api, &builders::scratch_pvc(pvc, pod, config)).await?;
            Ok(true)
        }
    }
}

fn mark_creating_scratch(anno: &mut BTreeMap<String, String>) {
    anno.insert(ann::BOUND_CONDITION.into(), "false".into());
    anno.insert(
        ann::BOUND_CONDITION_MESSAGE.into(),
        "Creating scratch space".into(),
    );
    anno.insert(ann::BOUND_CONDITION_REASON.into(), CREATING_SCRATCH.into());
}

/// Copy the CDI namespace's proxy CA ConfigMap next to the claim (owned by the pod), as
/// upstream's `copyImportProxyConfigMap` does, so the importer can mount it.
async fn copy_proxy_ca(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    pod: &Pod,
    config: &ConfigView,
) -> Result<(), Error> {
    let Some(cm_name) = config
        .status
        .import_proxy
        .as_ref()
        .and_then(|p| p.trusted_ca_proxy.clone())
        .filter(|c| !c.is_empty())
    else {
        return Ok(());
    };
    let src: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let Some(cm) = src.get_opt(&cm_name).await? else {
        return Ok(());
    };
    let dst: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns_of(pvc));
    let copy = ConfigMap {
        metadata: kube::core::ObjectMeta {
            name: Some(builders::import_proxy_config_map_name(&pvc.name_any())),
            namespace: pvc.namespace(),
            owner_references: Some(vec![builders::pod_owner_ref(pod)]),
            ..Default::default()
        },
        data: cm.data,
        ..Default::default()
    };
    create_or_get(&dst, &copy).await?;
    Ok(())
}

/// Upstream `ImportReconciler.reconcilePvc`.
async fn reconcile_import(pvc: &PersistentVolumeClaim, ctx: &Context) -> Result<Action, Error> {
    let ns = ns_of(pvc);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let anns = decide::annotations(pvc);
    let complete = decide::is_pvc_complete(pvc);
    let fatal = anns.get(ann::IMPORT_FATAL_ERROR).map(String::as_str) == Some("true");

    let Some(pod_name) = anns.get(ann::IMPORT_POD).cloned() else {
        if complete || pvc.metadata.deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
        // Name the pod first (the DataVolume reconciler waits for this annotation).
        let mut new = anns.clone();
        new.insert(
            ann::IMPORT_POD.into(),
            names::importer_pod_name(&pvc.name_any()),
        );
        if decide::requires_scratch(pvc) {
            new.insert(ann::REQUIRES_SCRATCH.into(), "true".into());
        }
        patch_annotations(&pvcs, pvc, &new).await?;
        return Ok(Action::requeue(Duration::ZERO));
    };
    let pod = pods.get_opt(&pod_name).await?;
    let pvc_uid = pvc.meta().uid.clone().unwrap_or_default();
    match pod {
        None => {
            if complete || fatal || pvc.metadata.deletion_timestamp.is_some() {
                return Ok(Action::await_change());
            }
            let users = pods_using(ctx, pvc).await?;
            if !users.is_empty() {
                report_in_use(ctx, pvc, &users, reason::IMPORT_TARGET_IN_USE).await;
                return Ok(Action::requeue(IN_USE_RETRY));
            }
            let config = ctx.cdi_config().await?;
            let scratch =
                decide::requires_scratch(pvc).then(|| names::scratch_pvc_name(&pvc.name_any()));
            let spec = builders::importer_pod(pvc, &ctx.worker, &config, scratch.as_deref())?;
            let created = match create_or_get(&pods, &spec).await {
                Ok(p) => p,
                Err(err) => {
                    let msg = format!("Error starting pod '{pod_name}': {err}");
                    ctx.publish(pvc, &EventSpec::warning(reason::ERR_STARTING_POD, msg))
                        .await;
                    return Err(err);
                }
            };
            if scratch.is_some() {
                let mut new = anns.clone();
                if ensure_scratch(ctx, pvc, &created, &config).await? {
                    mark_creating_scratch(&mut new);
                }
                new.insert(ann::REQUIRES_SCRATCH.into(), "false".into());
                patch_annotations(&pvcs, pvc, &new).await?;
            }
            Ok(Action::requeue(IMPORT_POLL))
        }
        Some(pod) => {
            if !controlled_by(&pod, &pvc_uid) {
                return Err(Error::NotControlled(format!(
                    "pod {pod_name} is not owned by PVC {}",
                    pvc.name_any()
                )));
            }
            if pvc.metadata.deletion_timestamp.is_some() {
                delete_ignore_missing(&pods, &pod_name).await?;
                return Ok(Action::await_change());
            }
            let config = ctx.cdi_config().await?;
            copy_proxy_ca(ctx, pvc, &pod, &config).await?;
            let mut step = decide::observe_import_pod(pvc, &pod);
            if step.create_scratch {
                if ensure_scratch(ctx, pvc, &pod, &config).await? {
                    mark_creating_scratch(&mut step.annotations);
                }
                step.annotations
                    .insert(ann::REQUIRES_SCRATCH.into(), "false".into());
            }
            let updated = patch_annotations(&pvcs, pvc, &step.annotations).await?;
            for ev in &step.events {
                ctx.publish(&updated, ev).await;
            }
            if step.delete_pod {
                delete_ignore_missing(&pods, &pod_name).await?;
            }
            Ok(if decide::is_pvc_complete(&updated) {
                Action::await_change()
            } else {
                Action::requeue(IMPORT_POLL)
            })
        }
    }
}

/// Upstream `UploadReconciler.Reconcile`.
async fn reconcile_upload(pvc: &PersistentVolumeClaim, ctx: &Context) -> Result<Action, Error> {
    let ns = ns_of(pvc);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let anns = decide::annotations(pvc);
    let pvc_uid = pvc.meta().uid.clone().unwrap_or_default();
    let resource = anns
        .get(ann::UPLOAD_POD)
        .cloned()
        .unwrap_or_else(|| names::upload_pod_name(&pvc.name_any()));

    if decide::is_pvc_complete(pvc) || pvc.metadata.deletion_timestamp.is_some() {
        // Done (or going away): the Service goes; the pod too unless it is to be kept.
        delete_ignore_missing(&services, &names::service_name(&resource)).await?;
        if let Some(pod) = pods.get_opt(&resource).await?
            && pod.metadata.deletion_timestamp.is_none()
            && decide::should_delete_pod(pvc)
        {
            delete_ignore_missing(&pods, &resource).await?;
        }
        return Ok(Action::await_change());
    }
    let Some(pod_name) = anns.get(ann::UPLOAD_POD).cloned() else {
        let mut new = anns.clone();
        new.insert(ann::UPLOAD_POD.into(), resource);
        patch_annotations(&pvcs, pvc, &new).await?;
        return Ok(Action::requeue(Duration::ZERO));
    };
    let config = ctx.cdi_config().await?;
    let pod = match pods.get_opt(&pod_name).await? {
        Some(p) if !controlled_by(&p, &pvc_uid) => {
            return Err(Error::NotControlled(format!(
                "{pod_name} pod not controlled by pvc {}",
                pvc.name_any()
            )));
        }
        Some(p) => p,
        None => {
            let users = pods_using(ctx, pvc).await?;
            if !users.is_empty() {
                report_in_use(ctx, pvc, &users, reason::UPLOAD_TARGET_IN_USE).await;
                return Ok(Action::requeue(IN_USE_RETRY));
            }
            let pki = ctx.pki().await?;
            let svc = names::service_name(&pod_name);
            let cert = pki.issue_server(&builders::upload_server_dns_names(&svc, &ns))?;
            let args = UploadPodArgs {
                name: pod_name.clone(),
                client_name: UPLOAD_CLIENT_NAME.into(),
                deadline: Some(rfc3339_after(UPLOAD_SERVER_DEADLINE)),
                scratch: Some(names::scratch_pvc_name(&pvc.name_any())),
            };
            let spec = builders::upload_pod(pvc, &ctx.worker, &config, &args);
            let created = match create_or_get(&pods, &spec).await {
                Ok(p) => p,
                Err(err) => {
                    let msg = format!("Error starting pod '{pod_name}': {err}");
                    ctx.publish(pvc, &EventSpec::warning(reason::ERR_STARTING_POD, msg))
                        .await;
                    return Err(err);
                }
            };
            // A running pod already has its certificates; only a fresh one needs the Secret.
            if decide::pod_phase(&created) != "Running" {
                let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
                let secret = builders::upload_secret(&created, &cert, &pki.client_ca_pem);
                create_or_get(&secrets, &secret).await?;
            }
            created
        }
    };
    let mut step = decide::observe_upload_pod(pvc, &pod);
    if ensure_scratch(ctx, pvc, &pod, &config).await? {
        mark_creating_scratch(&mut step.annotations);
    }
    let svc_name = names::service_name(&pod_name);
    let svc = match services.get_opt(&svc_name).await? {
        Some(s) => s,
        None => create_or_get(&services, &builders::upload_service(pvc, &pod_name)).await?,
    };
    if !controlled_by(&svc, &pvc_uid) {
        return Err(Error::NotControlled(format!(
            "{svc_name} service not controlled by pvc {}",
            pvc.name_any()
        )));
    }
    if step.delete_pod {
        delete_ignore_missing(&pods, &pod_name).await?;
    }
    let updated = patch_annotations(&pvcs, pvc, &step.annotations).await?;
    if updated.annotations() != pvc.annotations() && decide::is_pvc_complete(&updated) {
        ctx.publish(
            &updated,
            &EventSpec::normal(reason::UPLOAD_SUCCEEDED, "Upload Successful"),
        )
        .await;
    }
    Ok(Action::requeue(UPLOAD_RESYNC))
}
