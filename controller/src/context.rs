//! What every reconcile shares: the client, the configuration, the event recorder, the upload
//! PKI (loaded on first use), the progress scraper and per-object failure counts for back-off.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdi_resources::CDIConfig;
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};

use crate::ControllerConfig;
use crate::builders::Worker;
use crate::decide::EventSpec;
use crate::error::Error;
use crate::model::ConfigView;
use crate::pki::UploadPki;

/// Name of the CDIConfig singleton.
pub const CONFIG_NAME: &str = "config";
/// Reporting controller of our events (upstream's deployment name).
pub const REPORTER: &str = "cdi-controller";
/// Upstream scrapes worker metrics with a 2 s budget; a slow worker must not stall reconciles.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Shared reconcile state.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Static configuration.
    pub config: ControllerConfig,
    /// How worker pods run the image.
    pub worker: Worker,
    recorder: Recorder,
    scraper: Option<reqwest::Client>,
    pki: tokio::sync::OnceCell<Arc<UploadPki>>,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context for `config`.
    pub fn new(client: Client, config: ControllerConfig) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: REPORTER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        // Workers serve metrics with a self-signed certificate; upstream scrapes them with
        // verification off. This client is used for nothing else.
        let scraper = cdi_pki::client_config(cdi_pki::ServerTrust::Insecure, None)
            .ok()
            .and_then(|tls| {
                reqwest::Client::builder()
                    .use_preconfigured_tls(tls)
                    .timeout(SCRAPE_TIMEOUT)
                    .no_proxy()
                    .build()
                    .ok()
            });
        let worker = Worker {
            image: config.image.clone(),
            pull_policy: config.pull_policy.clone(),
            verbosity: config.verbosity,
        };
        Context {
            client,
            config,
            worker,
            recorder,
            scraper,
            pki: tokio::sync::OnceCell::new(),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a failed reconcile of `key`; returns the attempt number.
    pub fn failed(&self, key: &str) -> u32 {
        let mut f = self.failures();
        let n = f.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// Forget the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        self.failures().remove(key);
    }

    /// The effective CDIConfig (defaults when it does not exist yet).
    pub async fn cdi_config(&self) -> Result<ConfigView, Error> {
        let api: Api<CDIConfig> = Api::all(self.client.clone());
        match api.get_opt(CONFIG_NAME).await? {
            Some(c) => ConfigView::from_object(&c).map_err(|source| Error::Decode {
                kind: "CDIConfig",
                source,
            }),
            None => Ok(ConfigView::default()),
        }
    }

    /// The upload PKI, loaded or created in the CDI namespace on first use.
    pub async fn pki(&self) -> Result<Arc<UploadPki>, Error> {
        self.pki
            .get_or_try_init(|| async {
                crate::pki::load_or_create(&self.client, &self.config.namespace)
                    .await
                    .map(Arc::new)
            })
            .await
            .cloned()
    }

    /// Publish an event about `obj`; failures are logged, never fatal (events are advisory).
    pub async fn publish<K: Resource<DynamicType = ()>>(&self, obj: &K, ev: &EventSpec) {
        let reference: ObjectReference = obj.object_ref(&());
        let event = Event {
            type_: if ev.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: ev.reason.clone(),
            note: Some(ev.message.clone()),
            action: ev.reason.clone(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(reason = %ev.reason, error = %err, "publishing event failed");
        }
    }

    /// Scrape `https://<podIP>:8443/metrics` of a running worker for the progress of
    /// `owner_uid`; `None` when the pod has no IP yet, the scrape fails or reports nothing.
    pub async fn scrape_progress(&self, pod: &Pod, owner_uid: &str) -> Option<f64> {
        let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        let url = format!("https://{host}:{}/metrics", crate::names::pod::WORKER_PORT);
        let body = self.scraper.as_ref()?.get(&url).send().await.ok()?;
        let text = body.error_for_status().ok()?.text().await.ok()?;
        crate::decide::parse_progress(&text, owner_uid)
    }
}

/// `namespace/name` of an object, for logs and failure counts.
pub fn key_of<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or(""),
        obj.meta().name.as_deref().unwrap_or("")
    )
}

/// Whether `obj` has a controller owner reference with `uid`.
pub fn controlled_by<K: Resource>(obj: &K, uid: &str) -> bool {
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && r.uid == uid)
}

/// Whether `obj` has any controller owner.
pub fn has_controller<K: Resource>(obj: &K) -> bool {
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true))
}

/// JSON merge patch turning annotations `old` into `new` (`null` removes a key); `None` when
/// they are equal.
pub fn annotation_patch(
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Option<Value> {
    let mut m = serde_json::Map::new();
    for (k, v) in new {
        if old.get(k) != Some(v) {
            m.insert(k.clone(), json!(v));
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            m.insert(k.clone(), Value::Null);
        }
    }
    (!m.is_empty()).then(|| json!({"metadata": {"annotations": m}}))
}

/// Bring a claim's annotations to `new` with one merge patch; returns the patched claim.
///
/// The patch carries the claim's `resourceVersion`: it is a diff against the copy the
/// reconciler saw, so if the claim changed since (a cache behind our own last write), the API
/// server answers 409 and the reconcile runs again on a fresh copy instead of leaving a mix of
/// old and new annotations.
pub async fn patch_annotations(
    api: &Api<PersistentVolumeClaim>,
    pvc: &PersistentVolumeClaim,
    new: &BTreeMap<String, String>,
) -> Result<PersistentVolumeClaim, Error> {
    let old = pvc.metadata.annotations.clone().unwrap_or_default();
    match annotation_patch(&old, new) {
        Some(mut p) => {
            if let Some(rv) = pvc.resource_version() {
                p["metadata"]["resourceVersion"] = json!(rv);
            }
            Ok(api
                .patch(&pvc.name_any(), &PatchParams::default(), &Patch::Merge(&p))
                .await?)
        }
        None => Ok(pvc.clone()),
    }
}

/// Create `obj`; if it already exists, read the existing one.
pub async fn create_or_get<K>(api: &Api<K>, obj: &K) -> Result<K, Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(o) => Ok(o),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            Ok(api.get(obj.meta().name.as_deref().unwrap_or("")).await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Delete `name`, treating "already gone" as done.
pub async fn delete_ignore_missing<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Current time as Kubernetes writes it (RFC 3339, seconds, UTC).
pub fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// RFC 3339 (seconds, UTC) of now + `d`.
pub fn rfc3339_after(d: Duration) -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    now.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs))
        .unwrap_or(now)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}
