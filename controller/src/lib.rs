//! The DataVolume controller, written with kube-rs: the same code runs against a Kubernetes
//! cluster and against `cdi serve`'s Kubernetes-compatible API server.
//!
//! ```text
//!   DataVolume ──(datavolume reconciler)──► PersistentVolumeClaim  (owner: DataVolume)
//!       ▲ status                                 │ annotations (import endpoint/source | upload target)
//!       │                                        ▼
//!       └──── claim annotations ◄──(claim reconciler)──► importer-<pvc> pod   (owner: claim)
//!             pod.phase, restarts,                       cdi-upload-<pvc> pod, Secret, Service
//!             condition.running*                         <pvc>-scratch claim (owner: pod)
//!
//!   StorageClass ──(storage reconcilers)──► StorageProfile + status   (owner: class)
//!                                           CDIConfig status (overhead per class, scratch class)
//! ```
//!
//! - [`decide`], [`validate`] and [`builders`] are pure and unit-tested: what to do, whether a
//!   DataVolume is admissible, and every object the controller creates.
//! - [`reconcile`] holds the reconcilers; [`run`] wires them into kube-runtime
//!   `Controller`s with graceful shutdown.
//! - Nothing here knows whether it talks to a cluster or to `cdi serve`: pods are reached
//!   through `status.podIP`, storage through claims.

#![deny(missing_docs)]

pub mod builders;
pub mod cli;
pub mod context;
pub mod decide;
pub mod error;
pub mod model;
pub mod names;
pub mod pki;
pub mod reconcile;
pub mod upload;
pub mod validate;

#[cfg(test)]
mod fixtures;

use std::sync::Arc;
use std::time::Duration;

use cdi_resources::{CDIConfig, DataVolume, StorageProfile};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource};
use tokio_util::sync::CancellationToken;

pub use context::Context;
pub use error::Error;
pub use validate::{Cause, validate_create, validate_update};

/// Image used when neither the configuration nor `CDI_IMAGE` names one.
pub const DEFAULT_IMAGE: &str = "cdi:latest";
/// Environment variable naming the worker image.
pub const IMAGE_ENV: &str = "CDI_IMAGE";
/// Default CDI namespace (where the upload PKI lives).
pub const DEFAULT_NAMESPACE: &str = "cdi";
/// A conflict means our copy was stale; a fresh read shortly after usually succeeds.
const CONFLICT_RETRY: Duration = Duration::from_millis(500);

/// Static controller settings.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// CDI namespace: holds the upload PKI Secrets and the import proxy CA ConfigMap.
    pub namespace: String,
    /// The one CDI image, for importer and upload-server pods.
    pub image: String,
    /// Pull policy of worker pods.
    pub pull_policy: String,
    /// `-v=<n>` of the workers.
    pub verbosity: u8,
    /// Cancel to stop the controllers gracefully (reconciles in flight finish first).
    pub shutdown: CancellationToken,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            namespace: DEFAULT_NAMESPACE.to_string(),
            image: std::env::var(IMAGE_ENV)
                .ok()
                .filter(|i| !i.is_empty())
                .unwrap_or_else(|| DEFAULT_IMAGE.to_string()),
            pull_policy: "IfNotPresent".to_string(),
            verbosity: 1,
            shutdown: CancellationToken::new(),
        }
    }
}

/// kube-runtime's error policy: retry with doubling back-off per object (conflicts at once).
fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    if err.is_conflict() {
        return Action::requeue(CONFLICT_RETRY);
    }
    let key = context::key_of(obj.as_ref());
    let attempt = ctx.failed(&key);
    let delay = error::backoff(attempt);
    tracing::warn!(object = %key, error = %err, kind = err.label(), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// A `Send + Sync` future resolving when `token` is cancelled (what `graceful_shutdown_on`
/// needs; the token's own future is not `Sync`).
fn shutdown_trigger(
    token: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send + Sync {
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    tokio::spawn(async move {
        token.cancelled().await;
        let _ = tx.send(());
    });
    async move {
        let _ = rx.await;
    }
}

/// Run the controllers until `config.shutdown` is cancelled (or their watches end).
pub async fn run(client: Client, config: ControllerConfig) -> Result<(), Error> {
    let shutdown = config.shutdown.clone();
    let ctx = Arc::new(Context::new(client.clone(), config));
    let worker_objects = watcher::Config::default().labels(&format!(
        "{}={}",
        names::label::APP,
        names::label::APP_VALUE
    ));

    let dv_controller = Controller::new(
        Api::<DataVolume>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown_trigger(shutdown.clone()))
    .run(reconcile::datavolume::reconcile, error_policy, ctx.clone())
    .for_each(|res| async move {
        if let Err(err) = res {
            tracing::debug!(error = %err, "datavolume controller");
        }
    });

    let claim_controller = Controller::new(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Pod>::all(client.clone()), worker_objects.clone())
    .owns(Api::<Service>::all(client.clone()), worker_objects)
    .graceful_shutdown_on(shutdown_trigger(shutdown.clone()))
    .run(reconcile::claim::reconcile, error_policy, ctx.clone())
    .for_each(|res| async move {
        if let Err(err) = res {
            tracing::debug!(error = %err, "claim controller");
        }
    });

    let profile_controller = Controller::new(
        Api::<StorageClass>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<StorageProfile>::all(client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown_trigger(shutdown.clone()))
    .run(
        reconcile::storage::reconcile_class,
        error_policy,
        ctx.clone(),
    )
    .for_each(|res| async move {
        if let Err(err) = res {
            tracing::debug!(error = %err, "storage profile controller");
        }
    });
    let config_controller = Controller::new(
        Api::<CDIConfig>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(
        Api::<StorageClass>::all(client.clone()),
        watcher::Config::default(),
        |_| Some(ObjectRef::new(context::CONFIG_NAME)),
    )
    .graceful_shutdown_on(shutdown_trigger(shutdown))
    .run(reconcile::storage::reconcile_config, error_policy, ctx)
    .for_each(|res| async move {
        if let Err(err) = res {
            tracing::debug!(error = %err, "config controller");
        }
    });
    tokio::join!(
        dv_controller,
        claim_controller,
        profile_controller,
        config_controller
    );
    Ok(())
}
