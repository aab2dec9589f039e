//! The upload proxy's view of the Kubernetes API: which upload server takes a claim's upload.
//!
//! Upstream's proxy reads the claim's annotations (is it an upload target, is the upload pod
//! ready, did it already succeed) and then dials the upload Service. We dial the pod's
//! `status.podIP` directly — the same object the Service selects — and check the server's
//! certificate against the Service's DNS name, so one resolver serves a cluster and `cdi serve`.

use cdi_uploadproxy::{ResolveError, UploadTarget, UploadTargetResolver};
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::Api;

use crate::builders::upload_server_dns_names;
use crate::names::{self, ann, pod};

/// Finds a claim's upload server through its annotations and its upload pod.
#[derive(Clone)]
pub struct KubeResolver {
    /// Client of the API holding the claims and pods.
    pub client: kube::Client,
}

impl std::fmt::Debug for KubeResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeResolver").finish_non_exhaustive()
    }
}

fn api_error(e: kube::Error) -> ResolveError {
    ResolveError::Other(format!("Kubernetes API: {e}"))
}

/// The target for a claim with `annotations` whose upload pod is `upload_pod`, or why none.
pub fn target_of(
    namespace: &str,
    pvc: &PersistentVolumeClaim,
    upload_pod: Option<&Pod>,
) -> Result<UploadTarget, ResolveError> {
    let anns = pvc.metadata.annotations.clone().unwrap_or_default();
    if !anns.contains_key(ann::UPLOAD_REQUEST) {
        return Err(ResolveError::NotUploadTarget);
    }
    if anns.get(ann::POD_PHASE).map(String::as_str) == Some("Succeeded") {
        return Err(ResolveError::AlreadyComplete);
    }
    let name = pvc.metadata.name.as_deref().unwrap_or_default();
    let not_ready = || {
        ResolveError::NotReady(format!(
            "upload server for {namespace}/{name} is not running"
        ))
    };
    if anns.get(ann::POD_READY).map(String::as_str) != Some("true") {
        return Err(not_ready());
    }
    let pod_name = anns
        .get(ann::UPLOAD_POD)
        .cloned()
        .unwrap_or_else(|| names::upload_pod_name(name));
    let ip = upload_pod
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty())
        .ok_or_else(not_ready)?;
    let host = match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
        Ok(v4) => v4.to_string(),
        Err(_) => return Err(ResolveError::Other(format!("pod {pod_name} has IP {ip:?}"))),
    };
    let url = url::Url::parse(&format!("https://{host}:{}", pod::WORKER_PORT))
        .map_err(|e| ResolveError::Other(e.to_string()))?;
    let service = names::service_name(&pod_name);
    let server_name = upload_server_dns_names(&service, namespace)
        .pop()
        .unwrap_or(service);
    Ok(UploadTarget {
        url,
        server_name,
        archive: anns.get(ann::CONTENT_TYPE).map(String::as_str) == Some("archive"),
    })
}

impl UploadTargetResolver for KubeResolver {
    fn resolve<'a>(
        &'a self,
        namespace: &'a str,
        pvc: &'a str,
    ) -> BoxFuture<'a, Result<UploadTarget, ResolveError>> {
        Box::pin(async move {
            let claims: Api<PersistentVolumeClaim> =
                Api::namespaced(self.client.clone(), namespace);
            let claim = claims
                .get_opt(pvc)
                .await
                .map_err(api_error)?
                .ok_or(ResolveError::NotFound)?;
            let pod_name = claim
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ann::UPLOAD_POD).cloned())
                .unwrap_or_else(|| names::upload_pod_name(pvc));
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let upload_pod = pods.get_opt(&pod_name).await.map_err(api_error)?;
            target_of(namespace, &claim, upload_pod.as_ref())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claim(anns: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(
            json!({"metadata": {"name": "up", "namespace": "ns", "annotations": anns}}),
        )
        .unwrap()
    }

    fn pod_with_ip(ip: &str) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "cdi-upload-up"}, "status": {"podIP": ip}}),
        )
        .unwrap()
    }

    #[test]
    fn claims_resolve_through_their_ready_upload_pod() {
        let p = pod_with_ip("127.1.0.7");
        assert_eq!(
            target_of("ns", &claim(json!({})), Some(&p)),
            Err(ResolveError::NotUploadTarget)
        );
        let waiting = claim(json!({ann::UPLOAD_REQUEST: "", ann::POD_READY: "false"}));
        assert!(matches!(
            target_of("ns", &waiting, Some(&p)),
            Err(ResolveError::NotReady(_))
        ));
        let ready = claim(json!({ann::UPLOAD_REQUEST: "", ann::POD_READY: "true"}));
        assert!(matches!(
            target_of("ns", &ready, None),
            Err(ResolveError::NotReady(_))
        ));
        let t = target_of("ns", &ready, Some(&p)).unwrap();
        assert_eq!(t.url.as_str(), "https://127.1.0.7:8443/");
        assert_eq!(t.server_name, "cdi-upload-up.ns.svc");
        assert!(!t.archive);
        let archive = claim(json!({ann::UPLOAD_REQUEST: "", ann::POD_READY: "true",
            ann::CONTENT_TYPE: "archive"}));
        assert!(target_of("ns", &archive, Some(&p)).unwrap().archive);
        let done = claim(json!({ann::UPLOAD_REQUEST: "", ann::POD_PHASE: "Succeeded"}));
        assert_eq!(
            target_of("ns", &done, Some(&p)),
            Err(ResolveError::AlreadyComplete)
        );
    }
}
