//! Upload wiring of the embedded control plane: the upload proxy's view of the store.
//!
//! `cdi serve` mounts `cdi-apiserver`'s `UploadTokenRequest` router behind the admin token and
//! `cdi-uploadproxy`'s router (upload-token authenticated) on its listener; [`StoreResolver`]
//! tells the proxy where a volume's upload server listens.

use std::sync::Arc;

use cdi_uploadproxy::{ResolveError, UploadTarget, UploadTargetResolver};
use futures::future::BoxFuture;

use crate::reconcile::{
    ANN_CONTENT_TYPE, ANN_POD_PHASE, ANN_POD_READY, ANN_UPLOAD_PORT, ANN_UPLOAD_TARGET,
};
use crate::store::{Kind, Store};

/// Resolves upload targets from PVC annotations the controller maintains.
pub struct StoreResolver {
    /// The store.
    pub store: Arc<dyn Store>,
}

impl UploadTargetResolver for StoreResolver {
    fn resolve<'a>(
        &'a self,
        namespace: &'a str,
        pvc: &'a str,
    ) -> BoxFuture<'a, Result<UploadTarget, ResolveError>> {
        Box::pin(async move {
            let obj = self
                .store
                .get(Kind::PersistentVolumeClaim, namespace, pvc)
                .map_err(|e| ResolveError::Other(e.to_string()))?
                .ok_or(ResolveError::NotFound)?;
            let anns = &obj["metadata"]["annotations"];
            if anns.get(ANN_UPLOAD_TARGET).is_none() {
                return Err(ResolveError::NotUploadTarget);
            }
            if anns[ANN_POD_PHASE] == "Succeeded" {
                return Err(ResolveError::AlreadyComplete);
            }
            let port = anns[ANN_UPLOAD_PORT]
                .as_str()
                .and_then(|p| p.parse::<u16>().ok());
            match (port, anns[ANN_POD_READY] == "true") {
                (Some(port), true) => {
                    let url = url::Url::parse(&format!("https://127.0.0.1:{port}"))
                        .map_err(|e| ResolveError::Other(e.to_string()))?;
                    Ok(UploadTarget {
                        url,
                        server_name: "127.0.0.1".into(),
                        archive: anns[ANN_CONTENT_TYPE] == "archive",
                    })
                }
                _ => Err(ResolveError::NotReady(format!(
                    "upload server for {namespace}/{pvc} is not running"
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;
    use serde_json::json;

    #[tokio::test]
    async fn resolver_follows_pvc_annotations() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
        let r = StoreResolver {
            store: Arc::clone(&store),
        };
        assert_eq!(r.resolve("default", "x").await, Err(ResolveError::NotFound));
        let mut pvc = store
            .create(
                Kind::PersistentVolumeClaim,
                json!({"metadata": {"name": "x", "namespace": "default", "annotations": {}}}),
            )
            .unwrap();
        assert_eq!(
            r.resolve("default", "x").await,
            Err(ResolveError::NotUploadTarget)
        );
        pvc["metadata"]["annotations"] = json!({ANN_UPLOAD_TARGET: "", ANN_POD_READY: "false"});
        let pvc = store.update(Kind::PersistentVolumeClaim, pvc).unwrap();
        assert!(matches!(
            r.resolve("default", "x").await,
            Err(ResolveError::NotReady(_))
        ));
        let mut p = pvc;
        p["metadata"]["annotations"] =
            json!({ANN_UPLOAD_TARGET: "", ANN_POD_READY: "true", ANN_UPLOAD_PORT: "4431"});
        let p = store.update(Kind::PersistentVolumeClaim, p).unwrap();
        let t = r.resolve("default", "x").await.unwrap();
        assert_eq!(t.url.as_str(), "https://127.0.0.1:4431/");
        let mut p = p;
        p["metadata"]["annotations"][ANN_POD_PHASE] = json!("Succeeded");
        store.update(Kind::PersistentVolumeClaim, p).unwrap();
        assert_eq!(
            r.resolve("default", "x").await,
            Err(ResolveError::AlreadyComplete)
        );
    }
}
