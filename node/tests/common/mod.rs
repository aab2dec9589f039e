//! An in-memory Kubernetes API for driving the agent and the provisioner through a real
//! `kube::Client`: list, watch (streamed newline-delimited events from a resource version),
//! get, create, JSON merge patch (main resource and `/status`), delete (pods gracefully, as
//! the API server does). Every request is recorded.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{Value, json};
use tokio::sync::watch;

type Body = UnsyncBoxBody<Bytes, Infallible>;
type Key = (String, String, String); // plural, namespace ("" = cluster), name

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub body: Option<Value>,
}

#[derive(Debug, Clone)]
struct Logged {
    rv: u64,
    plural: String,
    ns: String,
    kind: &'static str,
    obj: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<Logged>,
    requests: Vec<Recorded>,
}

/// The fake API server.
#[derive(Clone)]
pub struct Fake {
    state: Arc<Mutex<State>>,
    rv_tx: Arc<watch::Sender<u64>>,
}

fn kind_of(plural: &str) -> (&'static str, &'static str) {
    match plural {
        "pods" => ("v1", "Pod"),
        "persistentvolumeclaims" => ("v1", "PersistentVolumeClaim"),
        "persistentvolumes" => ("v1", "PersistentVolume"),
        "secrets" => ("v1", "Secret"),
        "configmaps" => ("v1", "ConfigMap"),
        "storageclasses" => ("storage.k8s.io/v1", "StorageClass"),
        other => panic!("fake API: unknown resource {other}"),
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed_unsync())
        .expect("response")
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

impl Fake {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(0);
        Fake {
            state: Arc::new(Mutex::new(State::default())),
            rv_tx: Arc::new(tx),
        }
    }

    /// A client talking to this fake.
    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.handle(req).await) }
        });
        kube::Client::new(svc, "default")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Store an object as the API server would on create (uid, resourceVersion, timestamps).
    pub fn create(&self, plural: &str, mut obj: Value) -> Value {
        let mut st = self.lock();
        let out = Self::insert(&mut st, plural, &mut obj, true);
        drop(st);
        self.bump();
        out.expect("create")
    }

    fn insert(st: &mut State, plural: &str, obj: &mut Value, fresh: bool) -> Result<Value, ()> {
        let (api_version, kind) = kind_of(plural);
        obj["apiVersion"] = json!(api_version);
        obj["kind"] = json!(kind);
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = obj["metadata"]["name"].as_str().expect("name").to_string();
        let key = (plural.to_string(), ns.clone(), name);
        if fresh && st.objects.contains_key(&key) {
            return Err(());
        }
        if obj["metadata"]["uid"].is_null() {
            st.uid += 1;
            obj["metadata"]["uid"] =
                json!(format!("{:08x}-0000-4000-8000-{:012x}", st.uid, st.uid));
        }
        if obj["metadata"]["creationTimestamp"].is_null() {
            obj["metadata"]["creationTimestamp"] = json!(now());
        }
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let kind = if st.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert(key, obj.clone());
        let rv = st.rv;
        st.log.push(Logged {
            rv,
            plural: plural.into(),
            ns,
            kind,
            obj: obj.clone(),
        });
        Ok(obj.clone())
    }

    fn bump(&self) {
        let rv = self.lock().rv;
        self.rv_tx.send_replace(rv);
    }

    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(plural.into(), ns.into(), name.into()))
            .cloned()
    }

    pub fn list(&self, plural: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|(k, _)| k.0 == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Merge-patch an object directly (as another controller would).
    pub fn patch(&self, plural: &str, ns: &str, name: &str, patch: &Value) {
        let mut st = self.lock();
        let mut obj = st
            .objects
            .get(&(plural.into(), ns.into(), name.into()))
            .cloned()
            .expect("object to patch");
        merge(&mut obj, patch);
        let _ = Self::insert(&mut st, plural, &mut obj, false);
        drop(st);
        self.bump();
    }

    /// Remove an object outright (DELETED event).
    pub fn remove(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let mut st = self.lock();
        let obj = st
            .objects
            .remove(&(plural.into(), ns.into(), name.into()))?;
        st.rv += 1;
        let rv = st.rv;
        st.log.push(Logged {
            rv,
            plural: plural.into(),
            ns: ns.into(),
            kind: "DELETED",
            obj: obj.clone(),
        });
        drop(st);
        self.bump();
        Some(obj)
    }

    /// Delete a pod as `kubectl delete` does: set its deletionTimestamp.
    pub fn delete_gracefully(&self, ns: &str, name: &str, grace: i64) {
        self.patch(
            "pods",
            ns,
            name,
            &json!({"metadata": {"deletionTimestamp": now(), "deletionGracePeriodSeconds": grace}}),
        );
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Poll until `f` returns `Some`, or panic after `timeout` with `what`.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Fake) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; requests: {:#?}",
                    self.requests()
                        .iter()
                        .map(|r| format!("{} {}", r.method, r.path))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn handle(&self, req: Request<kube::client::Body>) -> Response<Body> {
        let method = req.method().clone();
        let uri = req.uri().clone();
        let query: BTreeMap<String, String> = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let bytes = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let body: Option<Value> = serde_json::from_slice(&bytes).ok();
        self.lock().requests.push(Recorded {
            method: method.clone(),
            path: uri.path().to_string(),
            body: body.clone(),
        });
        let segs: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
        let rest: &[&str] = match segs.as_slice() {
            ["api", "v1", rest @ ..] => rest,
            ["apis", _, _, rest @ ..] => rest,
            _ => return status(StatusCode::NOT_FOUND, "NotFound", "no such path"),
        };
        let (ns, rest): (Option<&str>, &[&str]) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(*ns), rest),
            other => (None, other),
        };
        let (plural, name, sub) = match rest {
            [p] => (*p, None, None),
            [p, n] => (*p, Some(*n), None),
            [p, n, s] => (*p, Some(*n), Some(*s)),
            _ => return status(StatusCode::NOT_FOUND, "NotFound", "no such path"),
        };
        match (method.clone(), name) {
            (Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                let from = query
                    .get("resourceVersion")
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                self.watch(plural, ns, from)
            }
            (Method::GET, None) => {
                let st = self.lock();
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| k.0 == plural && ns.is_none_or(|n| k.1 == n))
                    .map(|(_, v)| v.clone())
                    .collect();
                let (api_version, kind) = kind_of(plural);
                json_response(
                    StatusCode::OK,
                    &json!({"apiVersion": api_version, "kind": format!("{kind}List"),
                            "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
                )
            }
            (Method::GET, Some(n)) => match self.get(plural, ns.unwrap_or_default(), n) {
                Some(o) => json_response(StatusCode::OK, &o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{plural} {n:?} not found"),
                ),
            },
            (Method::POST, None) => {
                let mut obj = body.unwrap_or_default();
                if let Some(ns) = ns {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                let mut st = self.lock();
                let res = Self::insert(&mut st, plural, &mut obj, true);
                drop(st);
                self.bump();
                match res {
                    Ok(o) => json_response(StatusCode::CREATED, &o),
                    Err(()) => status(StatusCode::CONFLICT, "AlreadyExists", "already exists"),
                }
            }
            (Method::PATCH, Some(n)) => {
                let ns = ns.unwrap_or_default();
                let Some(mut obj) = self.get(plural, ns, n) else {
                    return status(StatusCode::NOT_FOUND, "NotFound", "not found");
                };
                let mut patch = body.unwrap_or_default();
                // The API server takes only status through /status and ignores it elsewhere.
                if sub == Some("status") {
                    patch = json!({"status": patch["status"].clone()});
                } else if let Some(p) = patch.as_object_mut() {
                    p.remove("status");
                }
                merge(&mut obj, &patch);
                let mut st = self.lock();
                let o = Self::insert(&mut st, plural, &mut obj, false).expect("update");
                drop(st);
                self.bump();
                json_response(StatusCode::OK, &o)
            }
            (Method::DELETE, Some(n)) => {
                let ns = ns.unwrap_or_default();
                let Some(obj) = self.get(plural, ns, n) else {
                    return status(StatusCode::NOT_FOUND, "NotFound", "not found");
                };
                let params = body.unwrap_or_default();
                if let Some(uid) = params["preconditions"]["uid"].as_str()
                    && obj["metadata"]["uid"].as_str() != Some(uid)
                {
                    return status(StatusCode::CONFLICT, "Conflict", "uid precondition failed");
                }
                let grace = params["gracePeriodSeconds"]
                    .as_i64()
                    .or_else(|| query.get("gracePeriodSeconds").and_then(|g| g.parse().ok()));
                if plural == "pods" && grace != Some(0) {
                    self.delete_gracefully(ns, n, grace.unwrap_or(30));
                    return json_response(
                        StatusCode::OK,
                        &self.get(plural, ns, n).unwrap_or_default(),
                    );
                }
                let o = self.remove(plural, ns, n).unwrap_or_default();
                json_response(StatusCode::OK, &o)
            }
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "not supported by the fake",
            ),
        }
    }

    fn watch(&self, plural: &str, ns: Option<&str>, from: u64) -> Response<Body> {
        struct Cursor {
            fake: Fake,
            rx: watch::Receiver<u64>,
            after: u64,
            plural: String,
            ns: Option<String>,
            pending: VecDeque<Bytes>,
        }
        let cursor = Cursor {
            fake: self.clone(),
            rx: self.rv_tx.subscribe(),
            after: from,
            plural: plural.into(),
            ns: ns.map(str::to_string),
            pending: VecDeque::new(),
        };
        let stream = futures::stream::unfold(cursor, |mut c| async move {
            loop {
                if let Some(b) = c.pending.pop_front() {
                    return Some((Ok::<_, Infallible>(http_body::Frame::data(b)), c));
                }
                c.rx.borrow_and_update();
                {
                    let st = c.fake.lock();
                    let after = c.after;
                    for e in st.log.iter().filter(|e| e.rv > after) {
                        c.after = e.rv;
                        if e.plural == c.plural && c.ns.as_deref().is_none_or(|n| n == e.ns) {
                            let line = json!({"type": e.kind, "object": e.obj}).to_string() + "\n";
                            c.pending.push_back(Bytes::from(line));
                        }
                    }
                }
                if c.pending.is_empty() && c.rx.changed().await.is_err() {
                    return None;
                }
            }
        });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(StreamBody::new(stream).boxed_unsync())
            .expect("response")
    }
}
