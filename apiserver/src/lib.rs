//! The CDI API server surface that is not CRUD: `UploadTokenRequest` and its discovery
//! documents, as an axum router the control plane mounts.
//!
//! ```text
//!  POST /apis/upload.cdi.kubevirt.io/v1beta1/namespaces/{ns}/uploadtokenrequests
//!       {"apiVersion":"upload.cdi.kubevirt.io/v1beta1","kind":"UploadTokenRequest",
//!        "metadata":{"name":"x"},"spec":{"pvcName":"disk"}}
//!    → 200, the same object with "status":{"token":"<PS256 JWT, 5 min>"}
//!  GET  /apis · /apis/upload.cdi.kubevirt.io · /apis/upload.cdi.kubevirt.io/v1beta1
//! ```
//!
//! **The router does not authenticate.** Upstream puts it behind the aggregated-API front proxy
//! and a SubjectAccessReview; here the mounting server (`cdi serve`) wraps it with its
//! admin-token check. Like upstream, the PVC is not checked here (nothing is persisted); the
//! upload proxy checks it when the token is used.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cdi_token::{Operation, TokenSigner, UPLOAD_TOKEN_TTL};
use serde_json::{Value, json};

/// API group of upload tokens.
pub const GROUP: &str = "upload.cdi.kubevirt.io";
/// Served version.
pub const VERSION: &str = "v1beta1";
/// `group/version`.
pub const GROUP_VERSION: &str = "upload.cdi.kubevirt.io/v1beta1";
/// Kind of the request object.
pub const KIND: &str = "UploadTokenRequest";

/// What the router needs: the token signer.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// Signs upload tokens.
    pub signer: Arc<TokenSigner>,
}

/// The router (see the crate docs). Unauthenticated: wrap it.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/apis", get(api_group_list))
        .route(&format!("/apis/{GROUP}"), get(api_group))
        .route(&format!("/apis/{GROUP_VERSION}"), get(resource_list))
        .route(
            &format!("/apis/{GROUP_VERSION}/namespaces/{{ns}}/uploadtokenrequests"),
            post(create_token),
        )
        .with_state(state)
}

fn group_doc() -> Value {
    json!({
        "name": GROUP,
        "versions": [{"groupVersion": GROUP_VERSION, "version": VERSION}],
        "preferredVersion": {"groupVersion": GROUP_VERSION, "version": VERSION},
    })
}

async fn api_group_list() -> Json<Value> {
    Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_doc()]}))
}

async fn api_group() -> Json<Value> {
    let mut doc = group_doc();
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Json(doc)
}

async fn resource_list() -> Json<Value> {
    Json(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": GROUP_VERSION,
        "resources": [{
            "name": "uploadtokenrequests",
            "singularName": "uploadtokenrequest",
            "namespaced": true,
            "kind": KIND,
            "verbs": ["create"],
        }],
    }))
}

/// A Kubernetes `Status` failure.
fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    (code, Json(body)).into_response()
}

async fn create_token(
    State(state): State<ApiState>,
    Path(ns): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let mut obj: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "body is not a JSON object",
            );
        }
    };
    if let Some(kind) = obj.get("kind").and_then(Value::as_str)
        && kind != KIND
    {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("kind must be {KIND}, not {kind}"),
        );
    }
    if let Some(body_ns) = obj.pointer("/metadata/namespace").and_then(Value::as_str)
        && !body_ns.is_empty()
        && body_ns != ns
    {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("metadata.namespace {body_ns:?} does not match the URL namespace {ns:?}"),
        );
    }
    let pvc = obj
        .pointer("/spec/pvcName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if pvc.is_empty() {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "spec.pvcName is required",
        );
    }
    let token = match state
        .signer
        .issue(Operation::Upload, &ns, &pvc, UPLOAD_TOKEN_TTL)
    {
        Ok(t) => t,
        Err(e) => {
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                &e.to_string(),
            );
        }
    };
    obj["apiVersion"] = json!(GROUP_VERSION);
    obj["kind"] = json!(KIND);
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]["namespace"] = json!(ns);
    obj["status"] = json!({ "token": token });
    let mut resp = (StatusCode::OK, Json(obj)).into_response();
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    fn state() -> ApiState {
        let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let pem =
            rsa::pkcs8::EncodePrivateKey::to_pkcs8_pem(&key, rsa::pkcs8::LineEnding::LF).unwrap();
        ApiState {
            signer: Arc::new(TokenSigner::from_private_pem(&pem).unwrap()),
        }
    }

    async fn call(state: &ApiState, method: &str, uri: &str, body: &str) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = router(state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    const PATH: &str = "/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/ns1/uploadtokenrequests";

    #[tokio::test]
    async fn token_request_returns_a_token_for_the_pvc() {
        let st = state();
        let body = r#"{"apiVersion":"upload.cdi.kubevirt.io/v1beta1","kind":"UploadTokenRequest","metadata":{"name":"x"},"spec":{"pvcName":"disk"}}"#;
        let (code, obj) = call(&st, "POST", PATH, body).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(obj["spec"]["pvcName"], "disk");
        let token = obj["status"]["token"].as_str().unwrap();
        let claims = st.signer.verifier().verify(token).unwrap();
        assert_eq!(
            (claims.namespace.as_str(), claims.name.as_str()),
            ("ns1", "disk")
        );
        assert!(claims.check_upload().is_ok());
    }

    #[tokio::test]
    async fn missing_pvc_name_is_invalid() {
        let (code, obj) = call(&state(), "POST", PATH, r#"{"spec":{}}"#).await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(obj["kind"], "Status");
    }

    #[tokio::test]
    async fn garbage_body_is_a_bad_request() {
        assert_eq!(
            call(&state(), "POST", PATH, "nope").await.0,
            StatusCode::BAD_REQUEST
        );
    }

    #[tokio::test]
    async fn discovery_lists_the_resource() {
        let st = state();
        let (code, obj) = call(&st, "GET", "/apis/upload.cdi.kubevirt.io/v1beta1", "").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(obj["resources"][0]["name"], "uploadtokenrequests");
        let (_, groups) = call(&st, "GET", "/apis", "").await;
        assert_eq!(groups["groups"][0]["name"], "upload.cdi.kubevirt.io");
    }
}
