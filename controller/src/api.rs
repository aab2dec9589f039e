//! The resource API: Kubernetes-style paths, object shapes and `Status` errors over the store.
//!
//! Paths: `/api/v1/namespaces/{ns}/{persistentvolumeclaims|events|secrets|configmaps}[/{name}]`,
//! `/apis/cdi.kubevirt.io/{v1beta1|v1alpha1}/namespaces/{ns}/datavolumes[/{name}]`,
//! `/apis/cdi.kubevirt.io/v1beta1/{storageprofiles|cdiconfigs}[/{name}]`,
//! `/apis/storage.k8s.io/v1/storageclasses[/{name}]`; collections without a namespace list
//! all namespaces. Verbs: GET (list/get), POST (create), PUT (replace, optimistic concurrency
//! on `metadata.resourceVersion`), DELETE. Bodies are JSON or YAML.
//!
//! Watch: `GET <collection>?watch=true` streams newline-delimited JSON
//! `{"type":"ADDED|MODIFIED|DELETED","object":{…}}`, starting with an `ADDED` line per existing
//! object; the stream ends if the watcher falls too far behind, and clients simply re-watch.
//! `fieldSelector=a.b=v[,c=w]` filters lists and watches on exact field values.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cdi_api::resources::{CDI_V1ALPHA1, DataVolume};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::store::{Kind, Store, StoreError};
use crate::validate::{self, Cause};

/// Largest request body accepted (manifests are small; this bounds memory per request).
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Shared state of the resource API.
pub struct ApiState {
    /// The object store.
    pub store: Arc<dyn Store>,
}

/// A Kubernetes `Status` error response.
pub fn status(code: StatusCode, reason: &str, message: &str, causes: &[Cause]) -> Response {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    if !causes.is_empty() {
        body["details"] = json!({"causes": causes.iter().map(|c| json!({
            "reason": "FieldValueInvalid", "field": c.field, "message": c.message})).collect::<Vec<_>>()});
    }
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn store_error(e: StoreError, kind: Kind, name: &str) -> Response {
    let what = format!("{}.{} {name:?}", kind.plural(), kind.group());
    match e {
        StoreError::NotFound => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{what} not found"),
            &[],
        ),
        StoreError::AlreadyExists => status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{what} already exists"),
            &[],
        ),
        StoreError::Conflict => status(
            StatusCode::CONFLICT,
            "Conflict",
            &format!("Operation cannot be fulfilled on {what}: {e}"),
            &[],
        ),
        StoreError::Invalid(m) => status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", m, &[]),
        other => {
            tracing::error!(error = %other, "store failure");
            status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "internal store error",
                &[],
            )
        }
    }
}

/// Reject requests without the admin bearer token (constant-time comparison).
pub async fn require_admin(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t) if crate::util::constant_time_eq(t.as_bytes(), token.as_bytes()) => {
            next.run(req).await
        }
        _ => status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized: a valid admin bearer token is required",
            &[],
        ),
    }
}

/// The resource API router (mount behind [`require_admin`]).
pub fn router(state: Arc<ApiState>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(state)
}

#[derive(Debug)]
struct Target {
    kind: Kind,
    ns: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (ns, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return None,
    };
    let kind = Kind::from_plural(plural)?;
    if kind.group() != group {
        return None;
    }
    let version_ok = match group {
        "cdi.kubevirt.io" => {
            version == "v1beta1"
                || (version == "v1alpha1" && matches!(kind, Kind::DataVolume | Kind::CdiConfig))
        }
        _ => version == "v1",
    };
    if !version_ok
        || (!kind.namespaced() && ns.is_some())
        || (kind.namespaced() && ns.is_none() && name.is_some())
    {
        return None;
    }
    Some(Target {
        kind,
        ns: ns.map(str::to_string),
        name: name.map(str::to_string),
    })
}

/// Parse a JSON or YAML body into one object.
pub fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, String> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let text = std::str::from_utf8(body).map_err(|_| "request body is not UTF-8".to_string())?;
    if !ct.contains("yaml")
        && let Ok(v) = serde_json::from_str::<Value>(text)
    {
        return Ok(v);
    }
    serde_saphyr::from_str::<Value>(text)
        .map_err(|e| format!("request body is neither JSON nor YAML: {e}"))
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| {
            url::form_urlencoded::parse(format!("x={v}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
    })
}

fn field_value<'a>(obj: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(obj, |v, seg| &v[seg])
}

fn matches_selector(obj: &Value, selector: &[(String, String)]) -> bool {
    selector
        .iter()
        .all(|(path, want)| match field_value(obj, path) {
            Value::String(s) => s == want,
            Value::Null => want.is_empty(),
            other => serde_json::from_str::<Value>(want).is_ok_and(|w| w == *other),
        })
}

fn parse_selector(s: Option<String>) -> Vec<(String, String)> {
    s.map(|s| {
        s.split(',')
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.trim_end_matches('=').to_string(), v.to_string()))
            })
            .collect()
    })
    .unwrap_or_default()
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

async fn handle(
    State(st): State<Arc<ApiState>>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(t) = parse_path(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!(
                "the server could not find the requested resource {}",
                uri.path()
            ),
            &[],
        );
    };
    let store = st.store.as_ref();
    let ns = t.ns.clone().unwrap_or_default();
    // Namespaces name directories and log files of workers: same rules as object names.
    if t.ns.is_some() && !validate::valid_name(&ns) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("invalid namespace {ns:?}: must be a lowercase DNS-1123 name"),
            &[],
        );
    }
    let selector = parse_selector(query_param(uri.query(), "fieldSelector"));
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                "request body too large",
                &[],
            );
        }
    };
    match (method, t.name.clone()) {
        (Method::GET, None) => {
            if query_param(uri.query(), "watch").is_some_and(|w| w == "true" || w == "1") {
                return watch(st.clone(), t, selector);
            }
            let items = match store.list(t.kind, t.ns.as_deref()) {
                Ok(i) => i
                    .into_iter()
                    .filter(|o| matches_selector(o, &selector))
                    .collect::<Vec<_>>(),
                Err(e) => return store_error(e, t.kind, ""),
            };
            let rv = store.resource_version().unwrap_or(0);
            json_response(
                StatusCode::OK,
                &json!({"apiVersion": t.kind.api_version(), "kind": format!("{}List", t.kind.name()),
                        "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
            )
        }
        (Method::GET, Some(name)) => match store.get(t.kind, &ns, &name) {
            Ok(Some(o)) => json_response(StatusCode::OK, &o),
            Ok(None) => store_error(StoreError::NotFound, t.kind, &name),
            Err(e) => store_error(e, t.kind, &name),
        },
        (Method::POST, None) => create(store, &t, &headers, &body),
        (Method::PUT, Some(name)) => replace(store, &t, &name, &headers, &body),
        (Method::DELETE, Some(name)) => match store.delete(t.kind, &ns, &name) {
            Ok(Some(o)) => json_response(StatusCode::OK, &o),
            Ok(None) => store_error(StoreError::NotFound, t.kind, &name),
            Err(e) => store_error(e, t.kind, &name),
        },
        (m, _) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("{m} is not supported on {}", uri.path()),
            &[],
        ),
    }
}

/// Normalise an incoming object for `kind` (path namespace, kind/apiVersion checks, secrets).
fn prepare(kind: Kind, ns: Option<&str>, mut obj: Value) -> Result<Value, Box<Response>> {
    let bad = |m: String| Box::new(status(StatusCode::BAD_REQUEST, "BadRequest", &m, &[]));
    if !obj.is_object() {
        return Err(bad("the body must be a single object".into()));
    }
    if let Some(k) = obj["kind"].as_str()
        && k != kind.name()
    {
        return Err(bad(format!(
            "kind {k:?} does not match the {} endpoint",
            kind.plural()
        )));
    }
    if let Some(av) = obj["apiVersion"].as_str() {
        let ok = av == kind.api_version()
            || (matches!(kind, Kind::DataVolume | Kind::CdiConfig) && av == CDI_V1ALPHA1);
        if !ok {
            return Err(bad(format!(
                "apiVersion {av:?} is not served for {}",
                kind.name()
            )));
        }
    }
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    if let Some(ns) = ns {
        match obj["metadata"]["namespace"].as_str() {
            Some(n) if n != ns => {
                return Err(bad(format!(
                    "the namespace of the object ({n}) does not match the namespace on the request ({ns})"
                )));
            }
            _ => obj["metadata"]["namespace"] = json!(ns),
        }
    }
    if kind == Kind::Secret
        && let Some(sd) = obj.as_object_mut().and_then(|o| o.remove("stringData"))
    {
        use base64::Engine;
        if !obj["data"].is_object() {
            obj["data"] = json!({});
        }
        if let Some(m) = sd.as_object() {
            for (k, v) in m {
                obj["data"][k] = json!(
                    base64::engine::general_purpose::STANDARD
                        .encode(v.as_str().unwrap_or_default())
                );
            }
        }
    }
    if kind == Kind::CdiConfig && obj["metadata"]["name"] != crate::config::CONFIG_NAME {
        return Err(Box::new(status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "the only CDIConfig is named \"config\"",
            &[],
        )));
    }
    Ok(obj)
}

fn dv_of(obj: &Value) -> Result<DataVolume, Box<Response>> {
    serde_json::from_value(obj.clone()).map_err(|e| {
        Box::new(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("invalid DataVolume: {e}"),
            &[],
        ))
    })
}

fn invalid(kind: Kind, name: &str, causes: Vec<Cause>) -> Response {
    let detail = causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect::<Vec<_>>()
        .join("; ");
    status(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        &format!("{} {name:?} is invalid: {detail}", kind.name()),
        &causes,
    )
}

fn create(store: &dyn Store, t: &Target, headers: &HeaderMap, body: &Bytes) -> Response {
    let obj = match parse_body(headers, body) {
        Ok(v) => v,
        Err(m) => return status(StatusCode::BAD_REQUEST, "BadRequest", &m, &[]),
    };
    let mut obj = match prepare(t.kind, t.ns.as_deref(), obj) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    match t.kind {
        Kind::DataVolume => {
            let dv = match dv_of(&obj) {
                Ok(d) => d,
                Err(r) => return *r,
            };
            if let Err(causes) = validate::validate_create(&dv) {
                return invalid(t.kind, &name, causes);
            }
            let ns = t.ns.as_deref().unwrap_or_default();
            if let Ok(Some(pvc)) = store.get(Kind::PersistentVolumeClaim, ns, &name) {
                let owned_by_dv = pvc["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|r| r["kind"] == "DataVolume"));
                if !owned_by_dv {
                    return invalid(
                        t.kind,
                        &name,
                        vec![Cause {
                            field: "metadata.name".into(),
                            message: format!(
                                "PVC {name} already exists and is not owned by a DataVolume"
                            ),
                        }],
                    );
                }
            }
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        Kind::StorageProfile | Kind::CdiConfig | Kind::PersistentVolumeClaim => {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        _ => {}
    }
    if !validate::valid_name(&name) {
        return invalid(
            t.kind,
            &name,
            vec![Cause {
                field: "metadata.name".into(),
                message: "must be a lowercase DNS-1123 subdomain".into(),
            }],
        );
    }
    match store.create(t.kind, obj) {
        Ok(o) => json_response(StatusCode::CREATED, &o),
        Err(e) => store_error(e, t.kind, &name),
    }
}

fn replace(
    store: &dyn Store,
    t: &Target,
    name: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let obj = match parse_body(headers, body) {
        Ok(v) => v,
        Err(m) => return status(StatusCode::BAD_REQUEST, "BadRequest", &m, &[]),
    };
    let mut obj = match prepare(t.kind, t.ns.as_deref(), obj) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    if obj["metadata"]["name"].as_str().is_some_and(|n| n != name) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the name of the object does not match the name on the URL",
            &[],
        );
    }
    obj["metadata"]["name"] = json!(name);
    let ns = t.ns.as_deref().unwrap_or_default();
    let existing = match store.get(t.kind, ns, name) {
        Ok(Some(e)) => e,
        Ok(None) => return store_error(StoreError::NotFound, t.kind, name),
        Err(e) => return store_error(e, t.kind, name),
    };
    if t.kind == Kind::DataVolume {
        let (old, new) = match (dv_of(&existing), dv_of(&obj)) {
            (Ok(o), Ok(n)) => (o, n),
            (Err(r), _) | (_, Err(r)) => return *r,
        };
        if let Err(causes) = validate::validate_update(&old, &new) {
            return invalid(t.kind, name, causes);
        }
    }
    // Status belongs to the controller; users replace spec and metadata only.
    if matches!(
        t.kind,
        Kind::DataVolume | Kind::StorageProfile | Kind::CdiConfig | Kind::PersistentVolumeClaim
    ) {
        obj["status"] = existing["status"].clone();
        if obj["status"].is_null()
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
    }
    // Owner references of controller-made objects survive a user's replace.
    if obj["metadata"]["ownerReferences"].is_null()
        && !existing["metadata"]["ownerReferences"].is_null()
    {
        obj["metadata"]["ownerReferences"] = existing["metadata"]["ownerReferences"].clone();
    }
    match store.update(t.kind, obj) {
        Ok(o) => json_response(StatusCode::OK, &o),
        Err(e) => store_error(e, t.kind, name),
    }
}

fn watch(st: Arc<ApiState>, t: Target, selector: Vec<(String, String)>) -> Response {
    // Subscribe before listing so no change falls between the two.
    let rx = st.store.watch();
    let initial = match st.store.list(t.kind, t.ns.as_deref()) {
        Ok(i) => i,
        Err(e) => return store_error(e, t.kind, ""),
    };
    let sel = selector.clone();
    let first = futures::stream::iter(
        initial
            .into_iter()
            .filter(move |o| matches_selector(o, &sel))
            .map(|o| {
                Ok::<_, std::convert::Infallible>(Bytes::from(format!(
                    "{}\n",
                    json!({"type": "ADDED", "object": o})
                )))
            }),
    );
    let kind = t.kind;
    let ns = t.ns.clone();
    let rest = futures::stream::unfold(rx, move |mut rx| {
        let ns = ns.clone();
        let selector = selector.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        if ev.kind != kind
                            || ns
                                .as_deref()
                                .is_some_and(|n| ev.object["metadata"]["namespace"] != n)
                            || !matches_selector(&ev.object, &selector)
                        {
                            continue;
                        }
                        let line =
                            format!("{}\n", json!({"type": ev.event_type, "object": ev.object}));
                        return Some((Ok(Bytes::from(line)), rx));
                    }
                    // Lagged or closed: end the stream; the client re-watches from a fresh list.
                    Err(_) => return None,
                }
            }
        }
    });
    let body = Body::from_stream(first.chain(rest));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_kinds() {
        let t =
            parse_path("/apis/cdi.kubevirt.io/v1beta1/namespaces/default/datavolumes/a").unwrap();
        assert_eq!(
            (t.kind, t.ns.as_deref(), t.name.as_deref()),
            (Kind::DataVolume, Some("default"), Some("a"))
        );
        assert!(parse_path("/apis/cdi.kubevirt.io/v1alpha1/namespaces/x/datavolumes").is_some());
        assert_eq!(
            parse_path("/api/v1/namespaces/x/persistentvolumeclaims")
                .unwrap()
                .kind,
            Kind::PersistentVolumeClaim
        );
        assert_eq!(
            parse_path("/apis/storage.k8s.io/v1/storageclasses/local")
                .unwrap()
                .kind,
            Kind::StorageClass
        );
        assert_eq!(
            parse_path("/apis/cdi.kubevirt.io/v1beta1/cdiconfigs/config")
                .unwrap()
                .kind,
            Kind::CdiConfig
        );
        assert!(parse_path("/apis/cdi.kubevirt.io/v1beta1/namespaces/x/storageprofiles").is_none());
        assert!(parse_path("/api/v1/namespaces/x/datavolumes").is_none());
        assert!(parse_path("/apis/cdi.kubevirt.io/v2/namespaces/x/datavolumes").is_none());
    }

    #[test]
    fn yaml_and_json_bodies_parse() {
        let h = HeaderMap::new();
        let v = parse_body(
            &h,
            b"apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  accessKeyId: a\n",
        )
        .unwrap();
        assert_eq!(v["metadata"]["name"], "s");
        let v = prepare(Kind::Secret, Some("default"), v).unwrap();
        assert_eq!(v["data"]["accessKeyId"], "YQ==");
        assert_eq!(v["metadata"]["namespace"], "default");
        assert_eq!(parse_body(&h, br#"{"a": 1}"#).unwrap()["a"], 1);
    }

    #[test]
    fn field_selectors_match() {
        let o = json!({"involvedObject": {"name": "dv"}, "count": 2});
        assert!(matches_selector(
            &o,
            &parse_selector(Some("involvedObject.name=dv".into()))
        ));
        assert!(!matches_selector(
            &o,
            &parse_selector(Some("involvedObject.name=x".into()))
        ));
        assert!(matches_selector(
            &o,
            &parse_selector(Some("count=2".into()))
        ));
    }

    #[test]
    fn mismatched_namespace_and_kind_are_rejected() {
        assert!(
            prepare(
                Kind::DataVolume,
                Some("a"),
                json!({"metadata": {"namespace": "b"}})
            )
            .is_err()
        );
        assert!(prepare(Kind::DataVolume, Some("a"), json!({"kind": "Secret"})).is_err());
        assert!(
            prepare(
                Kind::DataVolume,
                Some("a"),
                json!({"apiVersion": cdi_api::resources::CDI_V1BETA1})
            )
            .is_ok()
        );
    }
}
