//! The resource API: a Kubernetes API server for the kinds of [`Kind`], faithful enough that
//! kubectl and kube-rs clients (controllers, the node agent, the provisioner) work unchanged.
//!
//! Paths are Kubernetes paths: `/api/v1[/namespaces/{ns}]/{plural}[/{name}[/{sub}]]` for core
//! kinds, `/apis/{group}/{version}[/namespaces/{ns}]/{plural}[/{name}[/{sub}]]` for the others
//! (`cdi.kubevirt.io` serves `v1beta1`, and `v1alpha1` for DataVolumes and CDIConfigs, which
//! are stored once and presented with the requested version). Collections without a namespace
//! list all namespaces; creates need the namespaced URL.
//!
//! * GET: get, list (`labelSelector`, `fieldSelector`, `limit`/`continue`) and watch
//!   ([`crate::watch`]); `Accept: …;as=Table;v=v1;g=meta.k8s.io` answers with a Table
//!   ([`crate::table`]).
//! * POST: create (`generateName`, `dryRun=All`).
//! * PUT: replace, with optimistic concurrency on `metadata.resourceVersion`.
//! * PATCH: merge, JSON, strategic-merge and apply patches ([`crate::patch`]); a patch that
//!   does not pin a resource version is retried on conflicts, as kube-apiserver does.
//! * DELETE: `propagationPolicy` and `preconditions` (query or `DeleteOptions` body).
//! * Subresources: `/status` (get, replace, patch: only `.status` changes; writes to the main
//!   resource keep the stored status) and `pods/{name}/log`.
//!
//! Every write goes through the same checks: names at the door, the body against the URL, the
//! DataVolume validation, then the store's lifecycle rules (generation, finalizers). Store
//! calls run on the blocking pool, never on the async workers. `fieldValidation` and
//! `fieldManager` are accepted and not acted on: there are no schemas to validate against and
//! no managed fields. Errors are `Status` objects with Kubernetes' reasons and codes.
//! Discovery documents are in [`crate::discovery`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use cdi_api::names;
use cdi_resources::DataVolume;
use serde_json::{Value, json};

use crate::convert;
use crate::discovery;
use crate::patch::{self, PatchError, PatchType};
use crate::selector::{FieldSelector, LabelSelector, Selectors};
use crate::store::{AsyncStore, DeleteOptions, Deletion, Kind, Propagation, Store, StoreError};
use crate::table::{self, IncludeObject};
use crate::watch::{self, WatchParams};
use cdi_controller::validate::{self, Cause};

/// Largest request body accepted (manifests are small; this bounds memory per request).
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Attempts of a patch that does not pin a resource version before a conflict is returned: a
/// controller writing the same object at the same moment is retried over, as kube-apiserver
/// does, rather than failing a `kubectl patch`.
const PATCH_ATTEMPTS: usize = 5;

/// Random characters appended to `metadata.generateName` (as Kubernetes: 5 from an alphabet
/// without vowels, so generated names spell no words).
const GENERATE_NAME_SUFFIX_LEN: usize = 5;
const GENERATE_NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
/// Names tried for one `generateName` create before giving up with `AlreadyExists`.
const GENERATE_NAME_ATTEMPTS: usize = 5;

/// Most bytes of a pod log returned by one request (its tail): bounds memory per request for
/// long-running workers' logs.
pub const MAX_LOG_BYTES: u64 = 8 << 20;

/// Annotation through which the node agent tells where a pod's log file is.
pub const ANN_POD_LOG_PATH: &str = "cdi.kubevirt.io/node.logPath";

/// Longest name quoted in an error message (the rest is elided, so messages stay one line).
const MAX_QUOTED_NAME: usize = 64;

/// Shared state of the resource API.
pub struct ApiState {
    /// The object store.
    pub store: Arc<dyn Store>,
    /// When set, pod logs are served only from files under this directory.
    pub log_root: Option<PathBuf>,
}

fn short(name: &str) -> String {
    if name.chars().count() <= MAX_QUOTED_NAME {
        name.to_string()
    } else {
        format!(
            "{}…",
            name.chars().take(MAX_QUOTED_NAME).collect::<String>()
        )
    }
}

fn status_body(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    })
}

/// A Kubernetes `Status` error response.
pub fn status(code: StatusCode, reason: &str, message: &str, causes: &[Cause]) -> Response {
    let mut body = status_body(code, reason, message);
    if !causes.is_empty() {
        body["details"] = json!({"causes": causes.iter().map(|c| json!({
            "reason": "FieldValueInvalid", "field": c.field, "message": c.message})).collect::<Vec<_>>()});
    }
    json_response(code, &body)
}

fn status_details(code: StatusCode, reason: &str, message: &str, details: Value) -> Response {
    let mut body = status_body(code, reason, message);
    body["details"] = details;
    json_response(code, &body)
}

/// `plural.group` as Kubernetes names a resource in messages (`pods` for core).
fn resource_name(kind: Kind) -> String {
    match kind.group() {
        "" => kind.plural().to_string(),
        g => format!("{}.{g}", kind.plural()),
    }
}

fn not_found(kind: Kind, name: &str) -> Response {
    status_details(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} {:?} not found", resource_name(kind), short(name)),
        json!({"name": name, "group": kind.group(), "kind": kind.plural()}),
    )
}

/// The response for a store error about object `name` of `kind`.
pub fn store_error(e: StoreError, kind: Kind, name: &str) -> Response {
    let what = format!("{} {:?}", resource_name(kind), short(name));
    let details = json!({"name": name, "group": kind.group(), "kind": kind.plural()});
    match e {
        StoreError::NotFound => not_found(kind, name),
        StoreError::AlreadyExists => status_details(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{what} already exists"),
            details,
        ),
        StoreError::Conflict | StoreError::Precondition(_) => status_details(
            StatusCode::CONFLICT,
            "Conflict",
            &format!("Operation cannot be fulfilled on {what}: {e}"),
            details,
        ),
        StoreError::Invalid(m) => {
            let (field, message) = m.split_once(": ").unwrap_or(("metadata", m));
            invalid(
                kind,
                name,
                vec![Cause {
                    field: field.into(),
                    message: message.into(),
                }],
            )
        }
        StoreError::Expired { .. } => status(StatusCode::GONE, "Expired", &e.to_string(), &[]),
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

fn bad_request(message: &str) -> Response {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, &[])
}

fn method_not_allowed(message: &str) -> Response {
    status(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        &format!("the server does not allow this method on the requested resource: {message}"),
        &[],
    )
}

fn invalid(kind: Kind, name: &str, causes: Vec<Cause>) -> Response {
    let detail = causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect::<Vec<_>>()
        .join("; ");
    let qualified = match kind.group() {
        "" => kind.name().to_string(),
        g => format!("{}.{g}", kind.name()),
    };
    let message = format!("{qualified} {:?} is invalid: {detail}", short(name));
    status_details(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        &message,
        json!({"name": name, "group": kind.group(), "kind": kind.name(),
               "causes": causes.iter().map(|c| json!({
                   "reason": "FieldValueInvalid", "field": c.field, "message": c.message})).collect::<Vec<_>>()}),
    )
}

/// Reject requests without the admin bearer token (constant-time comparison). The scheme is
/// case-insensitive (`Bearer`, `bearer`), as HTTP auth schemes are.
pub async fn require_admin(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(rest)
        })
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

/// Health endpoints that need no credentials (`/readyz`, `/livez`; the upload proxy serves
/// `/healthz`).
pub fn health_router() -> axum::Router {
    let ok = || async { "ok" };
    axum::Router::new()
        .route("/readyz", axum::routing::get(ok))
        .route("/livez", axum::routing::get(ok))
}

/// The resource API router (mount behind [`require_admin`]). `extensions` serves paths of its
/// own (the upload token API); everything it does not answer falls through to the resources.
pub fn router(state: Arc<ApiState>, extensions: axum::Router) -> axum::Router {
    use axum::routing::get;
    let resources = axum::Router::new().fallback(handle).with_state(state);
    axum::Router::new()
        .route("/api", get(api_versions))
        .route(
            "/apis",
            get(|| async { json_ok(&discovery::api_group_list()) }),
        )
        .route(
            "/version",
            get(|| async { json_ok(&discovery::version_info()) }),
        )
        .route(
            "/openapi/v3",
            get(|| async { json_ok(&discovery::openapi_v3_root()) }),
        )
        .fallback_service(extensions.fallback_service(resources))
}

async fn api_versions(headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    json_ok(&discovery::api_versions(host))
}

fn json_ok(v: &Value) -> Response {
    json_response(StatusCode::OK, v)
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// A subresource of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    Status,
    Log,
}

#[derive(Debug, Clone)]
struct Target {
    kind: Kind,
    /// Group of the URL (`""` for core).
    group: String,
    /// Version of the URL.
    version: String,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<Sub>,
}

impl Target {
    /// `apiVersion` objects are presented with.
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn ns_str(&self) -> &str {
        self.ns.as_deref().unwrap_or_default()
    }

    fn name_str(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let namespaced_plural = |p: &str| Kind::from_plural(p).is_some_and(Kind::namespaced);
    let (ns, plural, name, sub) = match rest {
        ["namespaces", ns, plural] if namespaced_plural(plural) => (Some(*ns), *plural, None, None),
        ["namespaces", ns, plural, name] if namespaced_plural(plural) => {
            (Some(*ns), *plural, Some(*name), None)
        }
        ["namespaces", ns, plural, name, sub] if namespaced_plural(plural) => {
            (Some(*ns), *plural, Some(*name), Some(*sub))
        }
        [plural] => (None, *plural, None, None),
        [plural, name] => (None, *plural, Some(*name), None),
        [plural, name, sub] => (None, *plural, Some(*name), Some(*sub)),
        _ => return None,
    };
    let kind = Kind::from_plural(plural)?;
    if !discovery::serves(kind, group, version) {
        return None;
    }
    if (!kind.namespaced() && ns.is_some()) || (kind.namespaced() && ns.is_none() && name.is_some())
    {
        return None;
    }
    let sub = match sub {
        None => None,
        Some("status") if kind.has_status() => Some(Sub::Status),
        Some("log") if kind == Kind::Pod => Some(Sub::Log),
        Some(_) => return None,
    };
    Some(Target {
        kind,
        group: group.to_string(),
        version: version.to_string(),
        ns: ns.map(str::to_string),
        name: name.map(str::to_string),
        sub,
    })
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Not UTF-8.
    #[error("request body is not UTF-8")]
    NotUtf8,
    /// Neither JSON nor YAML.
    #[error("request body is neither JSON nor YAML: {0}")]
    Syntax(String),
    /// A protobuf body that cannot be decoded.
    #[error(transparent)]
    Protobuf(#[from] crate::protobuf::ProtoError),
}

/// The response to a body that could not be read: `415` for protobuf of kinds not decoded
/// here, `400` otherwise.
fn body_error(e: BodyError) -> Response {
    match e {
        BodyError::Protobuf(crate::protobuf::ProtoError::Unsupported(_)) => status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &e.to_string(),
            &[],
        ),
        other => bad_request(&other.to_string()),
    }
}

/// Parse a JSON, YAML or (for the kinds [`crate::protobuf`] decodes) protobuf body into one
/// object.
pub fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, BodyError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.starts_with(crate::protobuf::CONTENT_TYPE) {
        return Ok(crate::protobuf::decode(body)?);
    }
    let text = std::str::from_utf8(body).map_err(|_| BodyError::NotUtf8)?;
    // JSON first whatever the content type says: kube-rs sends server-side apply bodies as JSON
    // under `application/apply-patch+yaml`, and JSON is YAML anyway.
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        return Ok(v);
    }
    serde_saphyr::from_str::<Value>(text).map_err(|e| BodyError::Syntax(e.to_string()))
}

/// Query parameters (last value wins).
type Query = HashMap<String, String>;

fn parse_query(q: Option<&str>) -> Query {
    url::form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn flag(q: &Query, key: &str) -> bool {
    q.get(key).is_some_and(|v| v == "true" || v == "1")
}

fn dry_run(q: &Query) -> bool {
    q.get("dryRun").is_some_and(|v| v == "All")
}

/// Everything a request handler needs, owned (handlers run on the blocking pool).
struct Req {
    t: Target,
    q: Query,
    headers: HeaderMap,
    body: Bytes,
}

impl Req {
    fn table(&self) -> Option<IncludeObject> {
        let accept = self
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        table::wants_table(accept)
            .then(|| IncludeObject::parse(self.q.get("includeObject").map(String::as_str)))
    }

    /// One object as this request presents it: the URL's apiVersion, or a one-row Table.
    fn present(&self, code: StatusCode, obj: &Value) -> Response {
        let o = convert::present(self.t.kind, &self.t.api_version(), obj);
        match self.table() {
            Some(include) => {
                // Cells are computed from the stored form, whatever version was asked for.
                let mut t = table::table(
                    self.t.kind,
                    std::slice::from_ref(obj),
                    include,
                    crate::util::now_secs(),
                );
                t["metadata"] = json!({"resourceVersion": obj["metadata"]["resourceVersion"]});
                json_response(code, &t)
            }
            None => json_response(code, &o),
        }
    }
}

/// Discovery and OpenAPI documents under `/api/…` and `/apis/…` (the roots have routes).
fn discovery_response(path: &str) -> Option<Response> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let doc = match segs.as_slice() {
        ["api", v] => discovery::resource_list("", v),
        ["apis", g] => discovery::api_group(g),
        ["apis", g, v] => discovery::resource_list(g, v),
        ["openapi", "v3", rest @ ..] => discovery::openapi_v3_doc(&rest.join("/")),
        _ => None,
    }?;
    Some(json_ok(&doc))
}

async fn handle(
    State(st): State<Arc<ApiState>>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if method == Method::GET
        && let Some(r) = discovery_response(uri.path())
    {
        return r;
    }
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
    // Namespaces name directories and log files of workers: checked before anything else.
    if let Some(ns) = &t.ns
        && let Some(problem) = names::namespace_problem(ns)
    {
        return bad_request(&problem);
    }
    // As Kubernetes: namespaced objects are created only through a namespaced URL, so the
    // namespace that reaches the store is always the checked one from the path.
    if method == Method::POST && t.kind.namespaced() && t.ns.is_none() {
        return method_not_allowed(&format!(
            "create {} in a namespace (/namespaces/<ns>/{})",
            t.kind.plural(),
            t.kind.plural()
        ));
    }
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
    let req = Req {
        q: parse_query(uri.query()),
        t,
        headers,
        body,
    };
    let store = AsyncStore::new(Arc::clone(&st.store));
    let is_item = req.t.name.is_some();
    let op: fn(&dyn Store, &Req) -> Response = match (&method, is_item, req.t.sub) {
        (&Method::GET, false, _) if flag(&req.q, "watch") => {
            return start_watch(store, req).await;
        }
        (&Method::GET, true, Some(Sub::Log)) => {
            return pod_log(store, req, st.log_root.clone()).await;
        }
        (&Method::GET, false, _) => list,
        (&Method::GET, true, _) => get,
        (&Method::POST, false, None) => create,
        (&Method::PUT, true, Some(Sub::Status) | None) => replace,
        (&Method::PATCH, true, Some(Sub::Status) | None) => patch_object,
        (&Method::DELETE, true, None) => delete,
        (m, _, _) => {
            return method_not_allowed(&format!("{m} {}", uri.path()));
        }
    };
    let kind = req.t.kind;
    store
        .with(move |s| op(s, &req))
        .await
        .unwrap_or_else(|e| store_error(e, kind, ""))
}

fn selectors(q: &Query) -> Result<Selectors, Box<Response>> {
    let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| Box::new(bad_request(&e.to_string())))?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))
        .map_err(|e| Box::new(bad_request(&e.to_string())))?;
    Ok(Selectors { labels, fields })
}

/// `(namespace, name)` of an object: the order lists come in and `continue` resumes after.
fn list_key(o: &Value) -> (String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (s(&o["metadata"]["namespace"]), s(&o["metadata"]["name"]))
}

fn encode_continue(key: &(String, String)) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"ns": key.0, "name": key.1}).to_string())
}

fn decode_continue(token: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    let v: Value = serde_json::from_slice(&raw).ok()?;
    Some((
        v["ns"].as_str()?.to_string(),
        v["name"].as_str()?.to_string(),
    ))
}

fn list(store: &dyn Store, r: &Req) -> Response {
    let sel = match selectors(&r.q) {
        Ok(s) => s,
        Err(resp) => return *resp,
    };
    let (items, rv) = match store.list_at(r.t.kind, r.t.ns.as_deref()) {
        Ok(x) => x,
        Err(e) => return store_error(e, r.t.kind, ""),
    };
    let after = match r.q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => match decode_continue(c) {
            Some(k) => Some(k),
            None => return bad_request("invalid continue token"),
        },
        None => None,
    };
    let limit =
        r.q.get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0);
    let mut selected: Vec<Value> = items
        .into_iter()
        .filter(|o| after.as_ref().is_none_or(|a| list_key(o) > *a))
        .filter(|o| sel.matches(o))
        .collect();
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(limit) = limit
        && selected.len() > limit
    {
        let remaining = selected.len() - limit;
        selected.truncate(limit);
        if let Some(last) = selected.last() {
            meta["continue"] = json!(encode_continue(&list_key(last)));
            meta["remainingItemCount"] = json!(remaining);
        }
    }
    let api_version = r.t.api_version();
    let doc = match r.table() {
        Some(include) => {
            let mut t = table::table(r.t.kind, &selected, include, crate::util::now_secs());
            t["metadata"] = meta;
            t
        }
        None => {
            for o in &mut selected {
                *o = convert::present(r.t.kind, &api_version, o);
            }
            json!({"apiVersion": api_version, "kind": format!("{}List", r.t.kind.name()),
                   "metadata": meta, "items": selected})
        }
    };
    json_ok(&doc)
}

fn get(store: &dyn Store, r: &Req) -> Response {
    match store.get(r.t.kind, r.t.ns_str(), r.t.name_str()) {
        Ok(Some(o)) => r.present(StatusCode::OK, &o),
        Ok(None) => not_found(r.t.kind, r.t.name_str()),
        Err(e) => store_error(e, r.t.kind, r.t.name_str()),
    }
}

async fn start_watch(store: AsyncStore, r: Req) -> Response {
    let sel = match selectors(&r.q) {
        Ok(s) => s,
        Err(resp) => return *resp,
    };
    let resource_version = match r.q.get("resourceVersion").map(String::as_str) {
        None | Some("") => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => return bad_request(&format!("invalid resource version {v:?}")),
        },
    };
    let timeout =
        r.q.get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(std::time::Duration::from_secs)
            .unwrap_or(watch::DEFAULT_TIMEOUT);
    let p = WatchParams {
        kind: r.t.kind,
        ns: r.t.ns.clone(),
        api_version: r.t.api_version(),
        resource_version,
        send_initial_events: flag(&r.q, "sendInitialEvents"),
        bookmarks: flag(&r.q, "allowWatchBookmarks"),
        bookmark_interval: watch::BOOKMARK_INTERVAL,
        timeout,
        selectors: sel,
        table: r.table(),
    };
    watch::watch(store, p).await.unwrap_or_else(|e| e)
}

/// Normalise an incoming object for `kind` (path namespace, kind/apiVersion checks, secrets).
fn prepare(t: &Target, obj: Value) -> Result<Value, Box<Response>> {
    let kind = t.kind;
    let mut obj = convert::accept(kind, &t.api_version(), obj);
    let bad = |m: String| Box::new(bad_request(&m));
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
        let served = kind.versions().iter().any(|v| {
            av == if kind.group().is_empty() {
                v.to_string()
            } else {
                format!("{}/{v}", kind.group())
            }
        });
        if !served {
            return Err(bad(format!(
                "apiVersion {av:?} is not served for {}",
                kind.name()
            )));
        }
    }
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    if !kind.namespaced()
        && let Some(m) = obj["metadata"].as_object_mut()
    {
        m.remove("namespace");
    }
    if let Some(ns) = &t.ns {
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
        return Err(Box::new(invalid(
            kind,
            obj["metadata"]["name"].as_str().unwrap_or_default(),
            vec![Cause {
                field: "metadata.name".into(),
                message: "the only CDIConfig is named \"config\"".into(),
            }],
        )));
    }
    Ok(obj)
}

fn dv_of(obj: &Value) -> Result<DataVolume, Box<Response>> {
    serde_json::from_value(obj.clone())
        .map_err(|e| Box::new(bad_request(&format!("invalid DataVolume: {e}"))))
}

fn generated_name(prefix: &str) -> String {
    let bytes = crate::util::random_bytes(GENERATE_NAME_SUFFIX_LEN).unwrap_or_default();
    let suffix: String = bytes
        .iter()
        .map(|b| GENERATE_NAME_ALPHABET[*b as usize % GENERATE_NAME_ALPHABET.len()] as char)
        .collect();
    format!("{prefix}{suffix}")
}

/// What a new object starts with, by kind (the store assigns identity and generation).
fn defaults_for_create(kind: Kind, obj: &mut Value) {
    if kind.has_status()
        && let Some(m) = obj.as_object_mut()
    {
        // Status belongs to controllers: a create cannot set it.
        m.remove("status");
    }
    let phase = match kind {
        Kind::Pod | Kind::PersistentVolumeClaim | Kind::PersistentVolume => "Pending",
        Kind::Namespace => "Active",
        _ => return,
    };
    obj["status"] = json!({"phase": phase});
}

/// Kubernetes' DefaultStorageClass admission: a claim created without `storageClassName`
/// gets the default class (the newest, when several are marked default); `""` asks for no
/// class and is kept. Without a default class the field stays unset.
fn assign_default_class(store: &dyn Store, pvc: &mut Value) {
    if !pvc["spec"]["storageClassName"].is_null() {
        return;
    }
    let Ok(classes) = store.list(Kind::StorageClass, None) else {
        return;
    };
    let default = classes
        .iter()
        .filter(|c| c["metadata"]["annotations"][cdi_api::resources::ANN_DEFAULT_CLASS] == "true")
        .max_by_key(|c| {
            c["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        });
    if let Some(name) = default.and_then(|c| c["metadata"]["name"].as_str())
        && pvc["spec"].is_object()
    {
        pvc["spec"]["storageClassName"] = json!(name);
    }
}

/// Validate and create `obj` (already [`prepare`]d).
fn create_object(store: &dyn Store, r: &Req, mut obj: Value) -> Response {
    let kind = r.t.kind;
    let generate = obj["metadata"]["name"].as_str().is_none_or(str::is_empty)
        && obj["metadata"]["generateName"]
            .as_str()
            .is_some_and(|g| !g.is_empty());
    let prefix = obj["metadata"]["generateName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let max_len = if kind == Kind::DataVolume {
        names::MAX_DATAVOLUME_NAME_LEN
    } else {
        names::MAX_SUBDOMAIN_LEN
    };
    let ns = r.t.ns_str().to_string();
    for _ in 0..GENERATE_NAME_ATTEMPTS {
        if generate {
            obj["metadata"]["name"] = json!(generated_name(&prefix));
        }
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(problem) = names::name_problem(&name, max_len) {
            return invalid(
                kind,
                &name,
                vec![Cause {
                    field: "metadata.name".into(),
                    message: problem,
                }],
            );
        }
        if kind == Kind::DataVolume {
            let dv = match dv_of(&obj) {
                Ok(d) => d,
                Err(resp) => return *resp,
            };
            if let Err(causes) = validate::validate_create(&dv) {
                return invalid(kind, &name, causes);
            }
            if let Ok(Some(pvc)) = store.get(Kind::PersistentVolumeClaim, &ns, &name) {
                let owned_by_dv = pvc["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|r| r["kind"] == "DataVolume"));
                if !owned_by_dv {
                    return invalid(
                        kind,
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
        }
        if kind == Kind::PersistentVolumeClaim {
            assign_default_class(store, &mut obj);
        }
        let mut new = obj.clone();
        defaults_for_create(kind, &mut new);
        if dry_run(&r.q) {
            new["apiVersion"] = json!(kind.api_version());
            new["kind"] = json!(kind.name());
            new["metadata"]["creationTimestamp"] = json!(crate::util::now_rfc3339());
            new["metadata"]["generation"] = json!(1);
            return match store.get(kind, &ns, &name) {
                Ok(Some(_)) => store_error(StoreError::AlreadyExists, kind, &name),
                _ => r.present(StatusCode::CREATED, &new),
            };
        }
        match store.create(kind, new) {
            Ok(o) => return r.present(StatusCode::CREATED, &o),
            Err(StoreError::AlreadyExists) if generate => continue,
            Err(e) => return store_error(e, kind, &name),
        }
    }
    store_error(StoreError::AlreadyExists, kind, &prefix)
}

fn create(store: &dyn Store, r: &Req) -> Response {
    let obj = match parse_body(&r.headers, &r.body) {
        Ok(v) => v,
        Err(e) => return body_error(e),
    };
    match prepare(&r.t, obj) {
        Ok(o) => create_object(store, r, o),
        Err(resp) => *resp,
    }
}

/// A failed update: a store error (a conflict may be retried) or a finished response.
enum UpdateError {
    Store(StoreError),
    Response(Box<Response>),
}

impl UpdateError {
    fn into_response(self, kind: Kind, name: &str) -> Response {
        match self {
            UpdateError::Store(e) => store_error(e, kind, name),
            UpdateError::Response(r) => *r,
        }
    }
}

/// Validate and store `obj` as the new state of `existing`: through `/status` only the status
/// changes; through the main resource everything but the status (for kinds with a status
/// subresource).
fn update_object(
    store: &dyn Store,
    r: &Req,
    existing: &Value,
    mut obj: Value,
) -> Result<Value, UpdateError> {
    let t = &r.t;
    let name = t.name_str();
    if obj["metadata"]["name"].as_str().is_some_and(|n| n != name) {
        return Err(UpdateError::Response(Box::new(bad_request(
            "the name of the object does not match the name on the URL",
        ))));
    }
    obj["metadata"]["name"] = json!(name);
    if t.sub == Some(Sub::Status) {
        let mut new = existing.clone();
        new["status"] = obj["status"].take();
        new["metadata"]["resourceVersion"] = obj["metadata"]["resourceVersion"].take();
        obj = new;
    } else if t.kind.has_status() {
        obj["status"] = existing["status"].clone();
    }
    if obj["status"].is_null()
        && let Some(m) = obj.as_object_mut()
    {
        m.remove("status");
    }
    if t.kind == Kind::DataVolume && t.sub.is_none() {
        let (old, new) = match (dv_of(existing), dv_of(&obj)) {
            (Ok(o), Ok(n)) => (o, n),
            (Err(resp), _) | (_, Err(resp)) => return Err(UpdateError::Response(resp)),
        };
        if let Err(causes) = validate::validate_update(&old, &new) {
            return Err(UpdateError::Response(Box::new(invalid(
                t.kind, name, causes,
            ))));
        }
    }
    if dry_run(&r.q) {
        let want = obj["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        if !want.is_empty() && want != existing["metadata"]["resourceVersion"] {
            return Err(UpdateError::Store(StoreError::Conflict));
        }
        for f in [
            "uid",
            "creationTimestamp",
            "generation",
            "resourceVersion",
            "deletionTimestamp",
        ] {
            obj["metadata"][f] = existing["metadata"][f].clone();
        }
        return Ok(obj);
    }
    store.update(t.kind, obj).map_err(UpdateError::Store)
}

fn replace(store: &dyn Store, r: &Req) -> Response {
    let (kind, name) = (r.t.kind, r.t.name_str());
    let obj = match parse_body(&r.headers, &r.body) {
        Ok(v) => v,
        Err(e) => return body_error(e),
    };
    let obj = match prepare(&r.t, obj) {
        Ok(o) => o,
        Err(resp) => return *resp,
    };
    let existing = match store.get(kind, r.t.ns_str(), name) {
        Ok(Some(e)) => e,
        Ok(None) => return not_found(kind, name),
        Err(e) => return store_error(e, kind, name),
    };
    match update_object(store, r, &existing, obj) {
        Ok(o) => r.present(StatusCode::OK, &o),
        Err(e) => e.into_response(kind, name),
    }
}

fn patch_error(kind: Kind, name: &str, e: PatchError) -> Response {
    match e {
        PatchError::Parse(_) => bad_request(&e.to_string()),
        PatchError::Json(_) | PatchError::Strategic(_) => invalid(
            kind,
            name,
            vec![Cause {
                field: "patch".into(),
                message: e.to_string(),
            }],
        ),
    }
}

fn patch_object(store: &dyn Store, r: &Req) -> Response {
    let (kind, name) = (r.t.kind, r.t.name_str());
    let ct = r
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(ptype) = PatchType::from_content_type(ct) else {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!(
                "the body of the request was in an unknown format - accepted media types include: {}",
                PatchType::CONTENT_TYPES.join(", ")
            ),
            &[],
        );
    };
    let body: Value = match ptype {
        PatchType::Apply => match parse_body(&r.headers, &r.body) {
            Ok(v) => v,
            Err(e) => return body_error(e),
        },
        _ => match serde_json::from_slice(&r.body) {
            Ok(v) => v,
            Err(e) => return patch_error(kind, name, PatchError::Parse(e.to_string())),
        },
    };
    for _ in 0..PATCH_ATTEMPTS {
        let existing = match store.get(kind, r.t.ns_str(), name) {
            Ok(Some(e)) => e,
            Ok(None) if ptype == PatchType::Apply && r.t.sub.is_none() => {
                // Server-side apply creates what does not exist yet.
                let mut obj = body.clone();
                if obj.is_object() && obj["metadata"]["name"].is_null() {
                    obj["metadata"]["name"] = json!(name);
                }
                if obj["metadata"]["name"] != name {
                    return bad_request(
                        "the name of the object does not match the name on the URL",
                    );
                }
                return match prepare(&r.t, obj) {
                    Ok(o) => create_object(store, r, o),
                    Err(resp) => *resp,
                };
            }
            Ok(None) => return not_found(kind, name),
            Err(e) => return store_error(e, kind, name),
        };
        let mut patched = convert::present(kind, &r.t.api_version(), &existing);
        let applied = match ptype {
            PatchType::Merge => {
                patch::merge_patch(&mut patched, &body);
                Ok(())
            }
            PatchType::Json => patch::json_patch(&mut patched, &body),
            PatchType::Strategic => patch::strategic_merge(&mut patched, &body),
            PatchType::Apply => patch::apply(&mut patched, &body),
        };
        if let Err(e) = applied {
            return patch_error(kind, name, e);
        }
        let patched = match prepare(&r.t, patched) {
            Ok(p) => p,
            Err(resp) => return *resp,
        };
        let pinned =
            patched["metadata"]["resourceVersion"] != existing["metadata"]["resourceVersion"];
        match update_object(store, r, &existing, patched) {
            Ok(o) => return r.present(StatusCode::OK, &o),
            Err(UpdateError::Store(StoreError::Conflict)) if !pinned => continue,
            Err(e) => return e.into_response(kind, name),
        }
    }
    store_error(StoreError::Conflict, kind, name)
}

/// Delete options from the query and the `DeleteOptions` body.
fn delete_options(r: &Req) -> Result<DeleteOptions, Box<Response>> {
    let body: Value = if r.body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        parse_body(&r.headers, &r.body).map_err(|e| Box::new(body_error(e)))?
    };
    let policy = body["propagationPolicy"]
        .as_str()
        .map(str::to_string)
        .or_else(|| r.q.get("propagationPolicy").cloned());
    let orphan = body["orphanDependents"].as_bool().unwrap_or(false)
        || r.q.get("orphanDependents").is_some_and(|v| v == "true");
    let propagation = match policy.as_deref() {
        None | Some("") => {
            if orphan {
                Propagation::Orphan
            } else {
                Propagation::Background
            }
        }
        Some("Background") => Propagation::Background,
        Some("Foreground") => Propagation::Foreground,
        Some("Orphan") => Propagation::Orphan,
        Some(other) => {
            return Err(Box::new(bad_request(&format!(
                "invalid propagationPolicy {other:?}: use Background, Foreground or Orphan"
            ))));
        }
    };
    let pre = &body["preconditions"];
    Ok(DeleteOptions {
        propagation,
        uid: pre["uid"].as_str().map(str::to_string),
        resource_version: pre["resourceVersion"].as_str().map(str::to_string),
    })
}

fn delete(store: &dyn Store, r: &Req) -> Response {
    let (kind, name) = (r.t.kind, r.t.name_str());
    if kind == Kind::Namespace && name == "default" {
        return status_details(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "namespaces \"default\" is forbidden: this namespace may not be deleted",
            json!({"name": name, "kind": "namespaces"}),
        );
    }
    let opts = match delete_options(r) {
        Ok(o) => o,
        Err(resp) => return *resp,
    };
    if dry_run(&r.q) {
        return match store.get(kind, r.t.ns_str(), name) {
            Ok(Some(o)) => r.present(StatusCode::OK, &o),
            Ok(None) => not_found(kind, name),
            Err(e) => store_error(e, kind, name),
        };
    }
    match store.delete_with(kind, r.t.ns_str(), name, &opts) {
        Ok(Some(Deletion::Removed(o) | Deletion::Marked(o))) => r.present(StatusCode::OK, &o),
        Ok(None) => not_found(kind, name),
        Err(e) => store_error(e, kind, name),
    }
}

/// The last `lines` lines of `text` (all when `None`).
fn tail_lines(text: &str, lines: Option<usize>) -> &str {
    let Some(n) = lines else {
        return text;
    };
    if n == 0 {
        return "";
    }
    let body = text.strip_suffix('\n').unwrap_or(text);
    match body.rmatch_indices('\n').nth(n - 1) {
        Some((i, _)) => &text[i + 1..],
        None => text,
    }
}

/// Read at most [`MAX_LOG_BYTES`] from the end of `path`.
fn read_log_tail(path: &Path) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len > MAX_LOG_BYTES {
        f.seek(SeekFrom::Start(len - MAX_LOG_BYTES))?;
    }
    let mut buf = Vec::new();
    f.take(MAX_LOG_BYTES).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

async fn pod_log(store: AsyncStore, r: Req, root: Option<PathBuf>) -> Response {
    if flag(&r.q, "follow") {
        return bad_request("follow=true is not supported by cdi serve; omit -f");
    }
    let tail = match r.q.get("tailLines").map(|t| t.parse::<i64>()) {
        None => None,
        Some(Ok(n)) if n < 0 => None,
        Some(Ok(n)) => Some(n as usize),
        Some(Err(_)) => return bad_request("tailLines must be an integer"),
    };
    let res = store
        .with(move |s| {
            let (ns, name) = (r.t.ns_str(), r.t.name_str());
            let pod = match s.get(Kind::Pod, ns, name) {
                Ok(Some(p)) => p,
                Ok(None) => return not_found(Kind::Pod, name),
                Err(e) => return store_error(e, Kind::Pod, name),
            };
            let Some(path) = pod["metadata"]["annotations"][ANN_POD_LOG_PATH].as_str() else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("pod {name:?} has no log yet"),
                    &[],
                );
            };
            let path = PathBuf::from(path);
            let inside = match &root {
                Some(root) => path
                    .canonicalize()
                    .ok()
                    .zip(root.canonicalize().ok())
                    .is_some_and(|(p, r)| p.starts_with(r)),
                None => true,
            };
            if !inside {
                return status(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!("the log of pod {name:?} is outside the data directory"),
                    &[],
                );
            }
            match read_log_tail(&path) {
                Ok(text) => (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "text/plain")],
                    tail_lines(&text, tail).to_string(),
                )
                    .into_response(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("the log of pod {name:?} does not exist"),
                    &[],
                ),
                Err(e) => status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    &format!("reading the log of pod {name:?}: {e}"),
                    &[],
                ),
            }
        })
        .await;
    res.unwrap_or_else(|e| store_error(e, Kind::Pod, ""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;
    use tower::ServiceExt;

    #[test]
    fn paths_map_to_kinds() {
        let t =
            parse_path("/apis/cdi.kubevirt.io/v1beta1/namespaces/default/datavolumes/a").unwrap();
        assert_eq!(
            (t.kind, t.ns.as_deref(), t.name.as_deref()),
            (Kind::DataVolume, Some("default"), Some("a"))
        );
        let t = parse_path("/apis/cdi.kubevirt.io/v1alpha1/namespaces/x/datavolumes").unwrap();
        assert_eq!(t.api_version(), "cdi.kubevirt.io/v1alpha1");
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
        assert!(parse_path("/apis/cdi.kubevirt.io/v1alpha1/namespaces/x/datasources").is_none());
    }

    #[test]
    fn namespaces_subresources_and_new_kinds_parse() {
        let t = parse_path("/api/v1/namespaces/team").unwrap();
        assert_eq!((t.kind, t.name.as_deref()), (Kind::Namespace, Some("team")));
        let t = parse_path("/api/v1/namespaces/team/status").unwrap();
        assert_eq!((t.kind, t.sub), (Kind::Namespace, Some(Sub::Status)));
        let t = parse_path("/api/v1/namespaces/a/pods/p/log").unwrap();
        assert_eq!((t.kind, t.sub), (Kind::Pod, Some(Sub::Log)));
        let t =
            parse_path("/apis/cdi.kubevirt.io/v1beta1/namespaces/a/datavolumes/d/status").unwrap();
        assert_eq!(t.sub, Some(Sub::Status));
        assert!(parse_path("/api/v1/namespaces/a/configmaps/c/status").is_none());
        assert!(parse_path("/api/v1/namespaces/a/pods/p/exec").is_none());
        assert_eq!(
            parse_path("/api/v1/persistentvolumes/pv").unwrap().kind,
            Kind::PersistentVolume
        );
        assert_eq!(
            parse_path("/apis/snapshot.storage.k8s.io/v1/namespaces/a/volumesnapshots")
                .unwrap()
                .kind,
            Kind::VolumeSnapshot
        );
        assert_eq!(
            parse_path("/apis/coordination.k8s.io/v1/namespaces/a/leases/l")
                .unwrap()
                .kind,
            Kind::Lease
        );
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
        let t = parse_path("/api/v1/namespaces/default/secrets").unwrap();
        let v = prepare(&t, v).unwrap();
        assert_eq!(v["data"]["accessKeyId"], "YQ==");
        assert_eq!(v["metadata"]["namespace"], "default");
        assert_eq!(parse_body(&h, br#"{"a": 1}"#).unwrap()["a"], 1);
    }

    #[test]
    fn mismatched_namespace_and_kind_are_rejected() {
        let t = parse_path("/apis/cdi.kubevirt.io/v1beta1/namespaces/a/datavolumes").unwrap();
        assert!(prepare(&t, json!({"metadata": {"namespace": "b"}})).is_err());
        assert!(prepare(&t, json!({"kind": "Secret"})).is_err());
        assert!(prepare(&t, json!({"apiVersion": "v1"})).is_err());
        assert!(prepare(&t, json!({"apiVersion": cdi_api::resources::CDI_V1BETA1})).is_ok());
        assert!(prepare(&t, json!({"apiVersion": cdi_api::resources::CDI_V1ALPHA1})).is_ok());
    }

    #[test]
    fn log_tails() {
        assert_eq!(tail_lines("a\nb\nc\n", Some(2)), "b\nc\n");
        assert_eq!(tail_lines("a\nb\nc", Some(1)), "c");
        assert_eq!(tail_lines("a\nb\n", Some(5)), "a\nb\n");
        assert_eq!(tail_lines("a\nb\n", Some(0)), "");
        assert_eq!(tail_lines("a\nb\n", None), "a\nb\n");
    }

    #[test]
    fn continue_tokens_round_trip() {
        let k = ("ns".to_string(), "a.b".to_string());
        assert_eq!(decode_continue(&encode_continue(&k)), Some(k));
        assert_eq!(decode_continue("%%%"), None);
    }

    // ---- the router, in process ------------------------------------------------------------

    struct Api {
        app: axum::Router,
        store: Arc<dyn Store>,
        _dir: tempfile::TempDir,
    }

    fn api() -> Api {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let app = router(
            Arc::new(ApiState {
                store: Arc::clone(&store),
                log_root: Some(dir.path().to_path_buf()),
            }),
            axum::Router::new(),
        );
        Api {
            app,
            store,
            _dir: dir,
        }
    }

    impl Api {
        async fn call(&self, method: &str, path: &str, ct: &str, body: &str) -> (u16, Value) {
            let (code, _, text) = self
                .call_raw(method, path, ct, "application/json", body)
                .await;
            (code, serde_json::from_str(&text).unwrap_or(Value::Null))
        }

        async fn call_raw(
            &self,
            method: &str,
            path: &str,
            ct: &str,
            accept: &str,
            body: &str,
        ) -> (u16, String, String) {
            let req = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .header(header::CONTENT_TYPE, ct)
                .header(header::ACCEPT, accept)
                .body(Body::from(body.to_string()))
                .unwrap();
            let resp = self.app.clone().oneshot(req).await.unwrap();
            let code = resp.status().as_u16();
            let ct = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            (code, ct, String::from_utf8_lossy(&bytes).into_owned())
        }

        async fn json(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
            self.call(method, path, "application/json", &body.to_string())
                .await
        }
    }

    const CMS: &str = "/api/v1/namespaces/default/configmaps";
    const DVS: &str = "/apis/cdi.kubevirt.io/v1beta1/namespaces/default/datavolumes";

    fn blank_dv(name: &str) -> Value {
        json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
               "metadata": {"name": name},
               "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "8Mi"}}}}})
    }

    #[tokio::test]
    async fn discovery_documents_are_served() {
        let a = api();
        let (code, ct, body) = a
            .call_raw(
                "GET",
                "/apis",
                "",
                "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json",
                "",
            )
            .await;
        assert_eq!(code, 200);
        // The legacy document with a plain JSON content type makes client-go fall back.
        assert_eq!(ct, "application/json");
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["kind"],
            "APIGroupList"
        );
        let (code, v) = a.call("GET", "/api", "", "").await;
        assert_eq!((code, v["versions"][0].as_str()), (200, Some("v1")));
        let (_, v) = a.call("GET", "/api/v1", "", "").await;
        assert_eq!(v["kind"], "APIResourceList");
        let (_, v) = a.call("GET", "/apis/cdi.kubevirt.io", "", "").await;
        assert_eq!(v["preferredVersion"]["version"], "v1beta1");
        let (_, v) = a.call("GET", "/version", "", "").await;
        assert_eq!(v["gitVersion"], discovery::GIT_VERSION);
        let (_, v) = a.call("GET", "/openapi/v3", "", "").await;
        let url = v["paths"]["api/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap()
            .to_string();
        let (code, v) = a.call("GET", &url, "", "").await;
        assert_eq!((code, v["openapi"].as_str()), (200, Some("3.0.0")));
        let (code, _) = a.call("GET", "/openapi/v2", "", "").await;
        assert_eq!(code, 404);
    }

    #[tokio::test]
    async fn claims_without_a_class_get_the_default_one() {
        let a = api();
        const PVCS: &str = "/api/v1/namespaces/default/persistentvolumeclaims";
        const SCS: &str = "/apis/storage.k8s.io/v1/storageclasses";
        let pvc = |name: &str, class: Option<&str>| {
            let mut p = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": name},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}}});
            if let Some(c) = class {
                p["spec"]["storageClassName"] = json!(c);
            }
            p
        };
        // No default class yet: the field stays unset.
        let (code, o) = a.json("POST", PVCS, pvc("before", None)).await;
        assert_eq!(code, 201, "{o}");
        assert!(o["spec"]["storageClassName"].is_null(), "{o}");
        let (code, _) = a
            .json("POST", SCS, json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": {"name": "fast", "annotations": {cdi_api::resources::ANN_DEFAULT_CLASS: "true"}},
                "provisioner": "example.com/fast"}))
            .await;
        assert_eq!(code, 201);
        let (_, o) = a.json("POST", PVCS, pvc("unset", None)).await;
        assert_eq!(o["spec"]["storageClassName"], "fast");
        // An explicit class, and "" (no class), are kept.
        let (_, o) = a.json("POST", PVCS, pvc("named", Some("slow"))).await;
        assert_eq!(o["spec"]["storageClassName"], "slow");
        let (_, o) = a.json("POST", PVCS, pvc("none", Some(""))).await;
        assert_eq!(o["spec"]["storageClassName"], "");
    }

    #[tokio::test]
    async fn create_get_list_with_selectors_and_pages() {
        let a = api();
        for (name, app) in [("a", "web"), ("b", "db"), ("c", "web")] {
            let (code, o) = a
                .json("POST", CMS, json!({"metadata": {"name": name, "labels": {"app": app}}, "data": {"k": name}}))
                .await;
            assert_eq!(code, 201, "{o}");
            assert_eq!(o["metadata"]["generation"], 1);
        }
        let (_, l) = a
            .call("GET", &format!("{CMS}?labelSelector=app%3Dweb"), "", "")
            .await;
        let names: Vec<&str> = l["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(l["kind"], "ConfigMapList");
        assert!(
            l["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                >= 3
        );
        let (_, l) = a
            .call(
                "GET",
                &format!("{CMS}?fieldSelector=metadata.name!%3Da"),
                "",
                "",
            )
            .await;
        assert_eq!(l["items"].as_array().unwrap().len(), 2);
        let (code, _) = a
            .call("GET", &format!("{CMS}?labelSelector=app+in+(web"), "", "")
            .await;
        assert_eq!(code, 400);
        // Pages of two.
        let (_, p1) = a.call("GET", &format!("{CMS}?limit=2"), "", "").await;
        assert_eq!(p1["items"].as_array().unwrap().len(), 2);
        let token = p1["metadata"]["continue"].as_str().unwrap();
        assert_eq!(p1["metadata"]["remainingItemCount"], 1);
        let (_, p2) = a
            .call("GET", &format!("{CMS}?limit=2&continue={token}"), "", "")
            .await;
        assert_eq!(p2["items"][0]["metadata"]["name"], "c");
        assert!(p2["metadata"]["continue"].is_null());
        // generateName.
        let (code, o) = a
            .json("POST", CMS, json!({"metadata": {"generateName": "gen-"}}))
            .await;
        assert_eq!(code, 201);
        let n = o["metadata"]["name"].as_str().unwrap();
        assert!(
            n.starts_with("gen-") && n.len() == 4 + GENERATE_NAME_SUFFIX_LEN,
            "{n}"
        );
        // Dry run stores nothing.
        let (code, _) = a
            .call(
                "POST",
                &format!("{CMS}?dryRun=All"),
                "application/json",
                r#"{"metadata":{"name":"dry"}}"#,
            )
            .await;
        assert_eq!(code, 201);
        let (code, st) = a.call("GET", &format!("{CMS}/dry"), "", "").await;
        assert_eq!(code, 404);
        assert_eq!(
            st["details"],
            json!({"name": "dry", "group": "", "kind": "configmaps"})
        );
        assert_eq!(st["message"], "configmaps \"dry\" not found");
        // Duplicates.
        let (code, st) = a
            .json("POST", CMS, json!({"metadata": {"name": "a"}}))
            .await;
        assert_eq!((code, st["reason"].as_str()), (409, Some("AlreadyExists")));
    }

    #[tokio::test]
    async fn patches_of_each_type() {
        let a = api();
        a.json(
            "POST",
            CMS,
            json!({"metadata": {"name": "c", "labels": {"a": "1"}}, "data": {"x": "1", "y": "2"}}),
        )
        .await;
        let item = format!("{CMS}/c");
        let (code, o) = a
            .call(
                "PATCH",
                &item,
                "application/merge-patch+json",
                r#"{"data":{"y":null,"z":"3"}}"#,
            )
            .await;
        assert_eq!(code, 200, "{o}");
        assert_eq!(o["data"], json!({"x": "1", "z": "3"}));
        let (code, o) = a
            .call(
                "PATCH",
                &item,
                "application/json-patch+json",
                r#"[{"op":"replace","path":"/data/x","value":"9"}]"#,
            )
            .await;
        assert_eq!((code, &o["data"]["x"]), (200, &json!("9")));
        let (code, st) = a
            .call(
                "PATCH",
                &item,
                "application/json-patch+json",
                r#"[{"op":"test","path":"/data/x","value":"0"}]"#,
            )
            .await;
        assert_eq!((code, st["reason"].as_str()), (422, Some("Invalid")));
        let (code, o) = a
            .call(
                "PATCH",
                &item,
                "application/strategic-merge-patch+json",
                r#"{"metadata":{"labels":{"b":"2"}}}"#,
            )
            .await;
        assert_eq!(code, 200);
        assert_eq!(o["metadata"]["labels"], json!({"a": "1", "b": "2"}));
        let (code, o) = a
            .call(
                "PATCH",
                &format!("{CMS}/applied?fieldManager=me&force=true"),
                "application/apply-patch+yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\ndata:\n  k: v\n",
            )
            .await;
        assert_eq!(code, 201, "{o}");
        let (code, o) = a
            .call(
                "PATCH",
                &format!("{CMS}/applied?fieldManager=me"),
                "application/apply-patch+yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\ndata:\n  k2: v2\n",
            )
            .await;
        assert_eq!(code, 200);
        assert_eq!(o["data"], json!({"k": "v", "k2": "v2"}));
        let (code, st) = a.call("PATCH", &item, "application/xml", "<x/>").await;
        assert_eq!(
            (code, st["reason"].as_str()),
            (415, Some("UnsupportedMediaType"))
        );
        // A patch pinning a stale version conflicts instead of being retried.
        let (code, st) = a
            .call(
                "PATCH",
                &item,
                "application/merge-patch+json",
                r#"{"metadata":{"resourceVersion":"1"},"data":{"q":"1"}}"#,
            )
            .await;
        assert_eq!((code, st["reason"].as_str()), (409, Some("Conflict")));
        // Patches cannot move an object.
        let (code, _) = a
            .call(
                "PATCH",
                &item,
                "application/merge-patch+json",
                r#"{"metadata":{"namespace":"other"}}"#,
            )
            .await;
        assert_eq!(code, 400);
        let (code, _) = a
            .call(
                "PATCH",
                &format!("{CMS}/missing"),
                "application/merge-patch+json",
                "{}",
            )
            .await;
        assert_eq!(code, 404);
    }

    #[tokio::test]
    async fn status_is_written_only_through_the_subresource() {
        let a = api();
        let (code, dv) = a.json("POST", DVS, blank_dv("d")).await;
        assert_eq!(code, 201, "{dv}");
        assert!(dv["status"].is_null(), "a create cannot set status");
        let item = format!("{DVS}/d");
        let (code, o) = a
            .call(
                "PATCH",
                &format!("{item}/status"),
                "application/merge-patch+json",
                r#"{"status":{"phase":"Succeeded"},"spec":{"x":1}}"#,
            )
            .await;
        assert_eq!(code, 200, "{o}");
        assert_eq!(o["status"]["phase"], "Succeeded");
        assert!(
            o["spec"]["x"].is_null(),
            "the status subresource changes only status"
        );
        assert_eq!(o["metadata"]["generation"], 1);
        let (code, o) = a
            .call(
                "PATCH",
                &item,
                "application/merge-patch+json",
                r#"{"status":{"phase":"Failed"},"metadata":{"labels":{"l":"v"}}}"#,
            )
            .await;
        assert_eq!(code, 200, "{o}");
        assert_eq!(
            o["status"]["phase"], "Succeeded",
            "the main resource keeps the status"
        );
        assert_eq!(o["metadata"]["labels"]["l"], "v");
        // PUT on /status with the object read back.
        let mut whole = o.clone();
        whole["status"]["phase"] = json!("Paused");
        let (code, o) = a.json("PUT", &format!("{item}/status"), whole).await;
        assert_eq!((code, &o["status"]["phase"]), (200, &json!("Paused")));
        // The DataVolume validation runs on every write path.
        let (code, st) = a
            .call(
                "PATCH",
                &item,
                "application/merge-patch+json",
                r#"{"spec":{"source":{"http":{"url":"http://x"},"blank":null}}}"#,
            )
            .await;
        assert_eq!(
            (code, st["reason"].as_str()),
            (422, Some("Invalid")),
            "{st}"
        );
        // v1alpha1 presents the same object with its own apiVersion.
        let (_, o) = a
            .call(
                "GET",
                "/apis/cdi.kubevirt.io/v1alpha1/namespaces/default/datavolumes/d",
                "",
                "",
            )
            .await;
        assert_eq!(o["apiVersion"], "cdi.kubevirt.io/v1alpha1");
    }

    #[tokio::test]
    async fn deletes_with_finalizers_options_and_protection() {
        let a = api();
        a.json(
            "POST",
            CMS,
            json!({"metadata": {"name": "f", "finalizers": ["x/y"]}}),
        )
        .await;
        let (code, o) = a.call("DELETE", &format!("{CMS}/f"), "", "").await;
        assert_eq!(code, 200);
        assert!(o["metadata"]["deletionTimestamp"].is_string());
        let (code, _) = a
            .call(
                "PATCH",
                &format!("{CMS}/f"),
                "application/merge-patch+json",
                r#"{"metadata":{"finalizers":null}}"#,
            )
            .await;
        assert_eq!(code, 200);
        let (code, _) = a.call("GET", &format!("{CMS}/f"), "", "").await;
        assert_eq!(code, 404);
        a.json("POST", CMS, json!({"metadata": {"name": "p"}}))
            .await;
        let (code, st) = a
            .call(
                "DELETE",
                &format!("{CMS}/p"),
                "application/json",
                r#"{"kind":"DeleteOptions","apiVersion":"v1","preconditions":{"uid":"nope"}}"#,
            )
            .await;
        assert_eq!((code, st["reason"].as_str()), (409, Some("Conflict")));
        let (code, _) = a
            .call(
                "DELETE",
                &format!("{CMS}/p?propagationPolicy=Sideways"),
                "",
                "",
            )
            .await;
        assert_eq!(code, 400);
        let (code, _) = a
            .call(
                "DELETE",
                &format!("{CMS}/p?propagationPolicy=Orphan"),
                "",
                "",
            )
            .await;
        assert_eq!(code, 200);
        let (code, _) = a.call("DELETE", "/api/v1/namespaces/default", "", "").await;
        assert_eq!(code, 403);
        let (code, _) = a.call("DELETE", CMS, "", "").await;
        assert_eq!(code, 405);
    }

    #[tokio::test]
    async fn tables_for_kubectl() {
        let a = api();
        a.json("POST", DVS, blank_dv("d")).await;
        let accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";
        let (code, _, body) = a.call_raw("GET", DVS, "", accept, "").await;
        assert_eq!(code, 200);
        let t: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(t["kind"], "Table");
        let cols: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(cols, ["Name", "Phase", "Progress", "Restarts", "Age"]);
        assert_eq!(t["rows"][0]["cells"][0], "d");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert!(t["metadata"]["resourceVersion"].is_string());
        let (_, _, body) = a
            .call_raw(
                "GET",
                &format!("{DVS}/d?includeObject=Object"),
                "",
                accept,
                "",
            )
            .await;
        let t: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(t["rows"][0]["object"]["kind"], "DataVolume");
    }

    #[tokio::test]
    async fn pod_logs_come_from_the_annotated_file() {
        let a = api();
        let log = a._dir.path().join("p.log");
        std::fs::write(&log, "one\ntwo\nthree\n").unwrap();
        let pods = "/api/v1/namespaces/default/pods";
        let (code, pod) = a
            .json("POST", pods, json!({"metadata": {"name": "p", "annotations": {ANN_POD_LOG_PATH: log}},
                                        "spec": {"containers": [{"name": "c"}]}, "status": {"phase": "Running"}}))
            .await;
        assert_eq!(code, 201);
        assert_eq!(
            pod["status"]["phase"], "Pending",
            "a create starts pods Pending"
        );
        let (code, _, text) = a
            .call_raw("GET", &format!("{pods}/p/log?tailLines=2"), "", "*/*", "")
            .await;
        assert_eq!((code, text.as_str()), (200, "two\nthree\n"));
        let (code, _, _) = a
            .call_raw("GET", &format!("{pods}/p/log?follow=true"), "", "*/*", "")
            .await;
        assert_eq!(code, 400);
        a.json("POST", pods, json!({"metadata": {"name": "q"}}))
            .await;
        let (code, st) = a.call("GET", &format!("{pods}/q/log"), "", "").await;
        assert_eq!((code, st["kind"].as_str()), (404, Some("Status")));
        a.json(
            "POST",
            pods,
            json!({"metadata": {"name": "r", "annotations": {ANN_POD_LOG_PATH: "/etc/passwd"}}}),
        )
        .await;
        let (code, _) = a.call("GET", &format!("{pods}/r/log"), "", "").await;
        assert_eq!(code, 403);
        drop(a.store);
    }

    #[tokio::test]
    async fn protobuf_bodies_of_typed_clients() {
        let a = api();
        // `kubectl create secret generic s2 --from-literal=k=v`, as kubectl 1.32 sends it.
        let body: &[u8] = &[
            0x6b, 0x38, 0x73, 0x00, 0x0a, 0x0c, 0x0a, 0x02, 0x76, 0x31, 0x12, 0x06, 0x53, 0x65,
            0x63, 0x72, 0x65, 0x74, 0x12, 0x1e, 0x0a, 0x12, 0x0a, 0x02, 0x73, 0x32, 0x12, 0x00,
            0x1a, 0x00, 0x22, 0x00, 0x2a, 0x00, 0x32, 0x00, 0x38, 0x00, 0x42, 0x00, 0x12, 0x06,
            0x0a, 0x01, 0x6b, 0x12, 0x01, 0x76, 0x1a, 0x00, 0x1a, 0x00, 0x22, 0x00,
        ];
        let send = |path: &str, body: Vec<u8>| {
            let req = axum::http::Request::builder()
                .method("POST")
                .uri(path)
                .header(header::CONTENT_TYPE, crate::protobuf::CONTENT_TYPE)
                .header(
                    header::ACCEPT,
                    "application/vnd.kubernetes.protobuf,application/json",
                )
                .body(Body::from(body))
                .unwrap();
            a.app.clone().oneshot(req)
        };
        let resp = send("/api/v1/namespaces/default/secrets", body.to_vec())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        let (_, s) = a
            .call("GET", "/api/v1/namespaces/default/secrets/s2", "", "")
            .await;
        assert_eq!(s["data"]["k"], "dg==");
        // The same envelope claiming to be a Pod: refused with 415, not misread.
        let pod = [
            &body[..5],
            &[0x09],
            &body[6..10],
            b"\x12\x03Pod",
            &body[18..],
        ]
        .concat();
        let resp = send("/api/v1/namespaces/default/pods", pod).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[tokio::test]
    async fn events_are_served_in_both_groups() {
        let a = api();
        let v1 = "/apis/events.k8s.io/v1/namespaces/default/events";
        let (code, e) = a
            .json("POST", v1, json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
                "metadata": {"generateName": "dv-"}, "regarding": {"kind": "DataVolume", "name": "dv"},
                "note": "n", "reason": "R", "type": "Normal", "action": "A",
                "reportingController": "c", "reportingInstance": "i", "eventTime": "2026-01-01T00:00:00.000000Z"}))
            .await;
        assert_eq!(code, 201, "{e}");
        assert_eq!(e["apiVersion"], "events.k8s.io/v1");
        assert_eq!(e["note"], "n");
        let name = e["metadata"]["name"].as_str().unwrap().to_string();
        let (code, e) = a
            .call(
                "PATCH",
                &format!("{v1}/{name}"),
                "application/merge-patch+json",
                r#"{"series":{"count":2,"lastObservedTime":"2026-01-01T00:01:00.000000Z"}}"#,
            )
            .await;
        assert_eq!((code, &e["series"]["count"]), (200, &json!(2)));
        let (_, core) = a
            .call(
                "GET",
                "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Ddv",
                "",
                "",
            )
            .await;
        let item = &core["items"][0];
        assert_eq!(item["apiVersion"], "v1");
        assert_eq!(item["message"], "n");
        assert_eq!(item["reportingComponent"], "c");
    }

    #[tokio::test]
    async fn watch_from_a_version_over_http() {
        let a = api();
        let (_, o) = a
            .json("POST", CMS, json!({"metadata": {"name": "w"}}))
            .await;
        let rv = o["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        a.call(
            "PATCH",
            &format!("{CMS}/w"),
            "application/merge-patch+json",
            r#"{"data":{"a":"1"}}"#,
        )
        .await;
        let (code, _, body) = a
            .call_raw(
                "GET",
                &format!("{CMS}?watch=1&resourceVersion={rv}&timeoutSeconds=1"),
                "",
                "application/json",
                "",
            )
            .await;
        assert_eq!(code, 200);
        let events: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["type"], "MODIFIED");
        let (code, _) = a
            .call(
                "GET",
                &format!("{CMS}?watch=true&resourceVersion=abc"),
                "",
                "",
            )
            .await;
        assert_eq!(code, 400);
    }
}
