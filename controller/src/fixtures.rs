//! Test fixture: an order-independent fake Kubernetes API server behind a real `kube::Client`.
//!
//! A `tower::service_fn` over an in-memory object map answers what the reconcilers send: get,
//! list, create (uid, resourceVersion, claims start `Pending`), merge and JSON patches (also on
//! `/status`), replace and delete (honouring finalizers, like the API server). Every request is
//! logged so tests can assert what was (not) done; nothing depends on request order.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};

/// How long a watch request is held open before it ends empty.
const WATCH_HOLD: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Default)]
struct State {
    /// collection path (`api/v1/namespaces/ns/pods`) → name → object
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    log: Vec<String>,
    next: u64,
}

/// The fake API server.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

/// Where a request points.
struct Target {
    collection: String,
    /// `api/v1` or `apis/<group>/<version>`.
    base: String,
    resource: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let b = match segs.first() {
        Some(&"api") => 2,
        Some(&"apis") => 3,
        _ => return None,
    };
    let base = segs.get(..b)?.join("/");
    let rest = segs.get(b..)?;
    if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        Some(Target {
            collection: format!("{base}/namespaces/{}/{}", rest[1], rest[2]),
            base,
            resource: rest[2].to_string(),
            name: rest.get(3).map(|s| s.to_string()),
            sub: rest.get(4).map(|s| s.to_string()),
        })
    } else {
        Some(Target {
            collection: format!("{base}/{}", rest.first()?),
            base,
            resource: rest.first()?.to_string(),
            name: rest.get(1).map(|s| s.to_string()),
            sub: rest.get(2).map(|s| s.to_string()),
        })
    }
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}),
    )
}

/// RFC 7386 merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn finalizers_empty(obj: &Value) -> bool {
    obj["metadata"]["finalizers"]
        .as_array()
        .is_none_or(|f| f.is_empty())
}

impl FakeApi {
    /// A kube client talking to this fake.
    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let me = me.clone();
            async move { Ok::<_, std::convert::Infallible>(me.handle(req).await) }
        });
        kube::Client::new(svc, "default")
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Store `obj` at `collection` (e.g. `api/v1/namespaces/ns/persistentvolumeclaims`),
    /// filling in uid and resourceVersion when missing.
    pub fn put(&self, collection: &str, mut obj: Value) {
        let mut st = self.state();
        st.next += 1;
        let n = st.next;
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{n}"));
        }
        obj["metadata"]["resourceVersion"] = json!(n.to_string());
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        st.objects
            .entry(collection.to_string())
            .or_default()
            .insert(name, obj);
    }

    /// The stored object, if any.
    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.state().objects.get(collection)?.get(name).cloned()
    }

    /// Every object of a collection.
    pub fn list(&self, collection: &str) -> Vec<Value> {
        self.state()
            .objects
            .get(collection)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Events recorded in `ns` as (type, reason, note).
    pub fn events(&self, ns: &str) -> Vec<(String, String, String)> {
        self.list(&format!("apis/events.k8s.io/v1/namespaces/{ns}/events"))
            .into_iter()
            .map(|e| {
                let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
                (s("type"), s("reason"), s("note"))
            })
            .collect()
    }

    /// `METHOD path` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.state().log.clone()
    }

    fn changes(&self, path: &str, query: &str) -> Vec<u8> {
        let since: u64 = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let Some(t) = parse(path) else {
            return Vec::new();
        };
        let st = self.state();
        let mut out = Vec::new();
        for (c, objs) in &st.objects {
            let matches = *c == t.collection
                || (!t.collection.contains("/namespaces/")
                    && c.starts_with(&t.base)
                    && c.ends_with(&format!("/{}", t.resource)));
            if !matches {
                continue;
            }
            for o in objs.values() {
                let rv: u64 = o["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if rv > since {
                    let line = json!({"type": "MODIFIED", "object": o});
                    out.extend(serde_json::to_vec(&line).unwrap_or_default());
                    out.push(b'\n');
                }
            }
        }
        out
    }

    async fn handle(&self, req: Request<kube::client::Body>) -> Response<kube::client::Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        if query.contains("watch=true") {
            // A minimal change feed: hold the watch briefly, then send every object of the
            // watched collection(s) changed since the requested resourceVersion and end the
            // stream; the watcher re-watches from the newest version it saw.
            tokio::time::sleep(WATCH_HOLD).await;
            return Response::new(kube::client::Body::from(self.changes(&path, &query)));
        }
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body: Bytes = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let (code, value) = self.answer(&method, &path, &content_type, &body);
        self.state().log.push(format!("{method} {path}"));
        Response::builder()
            .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .header("content-type", "application/json")
            .body(kube::client::Body::from(
                serde_json::to_vec(&value).unwrap_or_default(),
            ))
            .unwrap_or_else(|_| Response::new(kube::client::Body::empty()))
    }

    fn answer(&self, method: &Method, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        let Some(t) = parse(path) else {
            return status(404, "NotFound", "unknown path");
        };
        let input: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let mut st = self.state();
        match (method.clone(), &t.name) {
            (Method::GET, Some(name)) => {
                match st.objects.get(&t.collection).and_then(|m| m.get(name)) {
                    Some(o) => (200, o.clone()),
                    None => status(404, "NotFound", &format!("{} {name} not found", t.resource)),
                }
            }
            (Method::GET, None) => {
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(c, _)| {
                        **c == t.collection
                            || (c.starts_with(&t.base)
                                && c.ends_with(&format!("/{}", t.resource))
                                && !t.collection.contains("/namespaces/"))
                    })
                    .flat_map(|(_, m)| m.values().cloned())
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": st.next.to_string()}, "items": items}),
                )
            }
            (Method::POST, None) => {
                let mut obj = input;
                let name = match obj["metadata"]["name"].as_str() {
                    Some(n) => n.to_string(),
                    None => match obj["metadata"]["generateName"].as_str() {
                        Some(g) => format!("{g}{}", st.next + 1),
                        None => return status(422, "Invalid", "name required"),
                    },
                };
                if st
                    .objects
                    .get(&t.collection)
                    .is_some_and(|m| m.contains_key(&name))
                {
                    return status(
                        409,
                        "AlreadyExists",
                        &format!("{} {name} already exists", t.resource),
                    );
                }
                st.next += 1;
                let n = st.next;
                obj["metadata"]["name"] = json!(name);
                obj["metadata"]["uid"] = json!(format!("uid-{n}"));
                obj["metadata"]["resourceVersion"] = json!(n.to_string());
                obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                if let Some(ns) = t
                    .collection
                    .split("/namespaces/")
                    .nth(1)
                    .and_then(|r| r.split('/').next())
                {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                if t.resource == "persistentvolumeclaims" && obj["status"].is_null() {
                    obj["status"] = json!({"phase": "Pending"});
                }
                st.objects
                    .entry(t.collection.clone())
                    .or_default()
                    .insert(name, obj.clone());
                (201, obj)
            }
            (Method::PATCH, Some(name)) | (Method::PUT, Some(name)) => {
                let Some(cur) = st
                    .objects
                    .get(&t.collection)
                    .and_then(|m| m.get(name))
                    .cloned()
                else {
                    return status(404, "NotFound", &format!("{} {name} not found", t.resource));
                };
                // A resourceVersion in the body pins the version the change was made against.
                let pinned = input["metadata"]["resourceVersion"].as_str();
                if pinned.is_some_and(|rv| Some(rv) != cur["metadata"]["resourceVersion"].as_str())
                {
                    return status(409, "Conflict", "the object has been modified");
                }
                let mut obj = cur;
                if *method == Method::PUT {
                    obj = input;
                } else if content_type.starts_with("application/json-patch+json") {
                    // Like the API server, a `test` for null passes on a missing path (kube's
                    // finalizer helper relies on it when adding the first finalizer).
                    let ops: Vec<Value> = input
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|op| {
                            !(op["op"] == "test"
                                && op["value"].is_null()
                                && obj.pointer(op["path"].as_str().unwrap_or("")).is_none())
                        })
                        .collect();
                    let Ok(p) = serde_json::from_value::<json_patch::Patch>(Value::Array(ops))
                    else {
                        return status(400, "BadRequest", "bad json patch");
                    };
                    if json_patch::patch(&mut obj, &p).is_err() {
                        return status(422, "Invalid", "json patch test failed");
                    }
                } else if t.sub.as_deref() == Some("status") {
                    let mut s = obj["status"].take();
                    merge(&mut s, &input["status"]);
                    obj["status"] = s;
                } else {
                    merge(&mut obj, &input);
                }
                st.next += 1;
                obj["metadata"]["resourceVersion"] = json!(st.next.to_string());
                let gone =
                    !obj["metadata"]["deletionTimestamp"].is_null() && finalizers_empty(&obj);
                let coll = st.objects.entry(t.collection.clone()).or_default();
                if gone {
                    coll.remove(name);
                } else {
                    coll.insert(name.clone(), obj.clone());
                }
                (200, obj)
            }
            (Method::DELETE, Some(name)) => {
                let Some(mut obj) = st
                    .objects
                    .get(&t.collection)
                    .and_then(|m| m.get(name))
                    .cloned()
                else {
                    return status(404, "NotFound", &format!("{} {name} not found", t.resource));
                };
                let coll = st.objects.entry(t.collection.clone()).or_default();
                if finalizers_empty(&obj) {
                    coll.remove(name);
                } else {
                    obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:01Z");
                    coll.insert(name.clone(), obj.clone());
                }
                (200, obj)
            }
            _ => status(405, "MethodNotAllowed", "unsupported"),
        }
    }
}
