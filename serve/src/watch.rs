//! Watch streams (`GET <collection>?watch=true`) as kube-runtime and kubectl use them.
//!
//! The body is newline-delimited JSON `{"type": …, "object": …}`:
//!
//! * without `resourceVersion` (or `0`), or with `sendInitialEvents=true`: an `ADDED` event per
//!   current object first, then changes; with `sendInitialEvents=true` a `BOOKMARK` annotated
//!   `k8s.io/initial-events-end: "true"` marks the end of the initial events;
//! * with `resourceVersion=N`: the changes after `N`, replayed from the store's history; when the
//!   history no longer reaches back to `N`, one `ERROR` event carrying a `410 Expired` Status,
//!   and the stream ends (the client re-lists);
//! * `allowWatchBookmarks=true`: a `BOOKMARK` (only `metadata.resourceVersion`) every
//!   [`BOOKMARK_INTERVAL`], so a watcher with narrow selectors still advances the version it
//!   would resume from;
//! * the stream ends after `timeoutSeconds` (default [`DEFAULT_TIMEOUT`]) or when the watcher
//!   falls more than the live feed's capacity behind; clients re-watch.
//!
//! With selectors, a change that makes an object start matching is sent as `ADDED` and one that
//! makes it stop matching as `DELETED`, as Kubernetes does.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::selector::Selectors;
use crate::store::{AsyncStore, Kind, StoreError, WatchEvent};
use crate::table::{self, IncludeObject};

/// Interval of `BOOKMARK` events. kube-runtime uses them only to advance the version it resumes
/// from; one every half minute keeps a quiet watch resumable well within the store's history
/// while costing nothing.
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(30);

/// Server-side end of a watch that did not ask for `timeoutSeconds`. Kubernetes ends watches
/// after 30–60 minutes so that load rebalances and dead clients are dropped; clients re-watch
/// from their last version, which costs nothing here.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Annotation of the bookmark that ends the initial events of `sendInitialEvents=true`.
pub const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// What a watch request asked for.
#[derive(Debug, Clone)]
pub struct WatchParams {
    /// Kind watched.
    pub kind: Kind,
    /// Namespace (None: all).
    pub ns: Option<String>,
    /// `apiVersion` objects are presented with (the URL's group/version).
    pub api_version: String,
    /// `resourceVersion` (None for unset; `Some(0)` for "any").
    pub resource_version: Option<u64>,
    /// `sendInitialEvents=true`.
    pub send_initial_events: bool,
    /// `allowWatchBookmarks=true`.
    pub bookmarks: bool,
    /// Interval of bookmarks ([`BOOKMARK_INTERVAL`]; shorter in tests).
    pub bookmark_interval: Duration,
    /// `timeoutSeconds`, else [`DEFAULT_TIMEOUT`].
    pub timeout: Duration,
    /// `labelSelector` and `fieldSelector`.
    pub selectors: Selectors,
    /// `Some` when the client asked for Table rows.
    pub table: Option<IncludeObject>,
}

/// A `Status` object for an error event or response.
fn expired_status(e: &StoreError) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": e.to_string(), "reason": "Expired", "code": 410,
    })
}

struct Stream {
    p: WatchParams,
    live: broadcast::Receiver<WatchEvent>,
    /// Version of the last change this stream has seen (sent or filtered out).
    last_rv: u64,
    next_bookmark: Instant,
    deadline: Instant,
}

impl Stream {
    fn in_scope(&self, ev: &WatchEvent) -> bool {
        ev.kind == self.p.kind && self.p.ns.as_deref().is_none_or(|n| *ev.namespace == *n)
    }

    /// The line to send for `ev`, if any (selectors applied as Kubernetes does).
    fn line_for(&self, ev: &WatchEvent) -> Option<Bytes> {
        if !self.in_scope(ev) {
            return None;
        }
        let sel = &self.p.selectors;
        // Objects are parsed only when something must look inside them.
        let mut parsed = None;
        let event_type = if sel.is_empty() {
            ev.event_type
        } else {
            let obj = parsed.insert(ev.object_value());
            let now = sel.matches(obj);
            match ev.event_type {
                "MODIFIED" => {
                    let before = ev.previous_value().map_or(now, |p| sel.matches(&p));
                    match (before, now) {
                        (true, true) => "MODIFIED",
                        (false, true) => "ADDED",
                        (true, false) => "DELETED",
                        (false, false) => return None,
                    }
                }
                t if now => t,
                _ => return None,
            }
        };
        if self.p.table.is_none() && self.p.api_version == self.p.kind.api_version() {
            // The published text already is this watch's form.
            return Some(raw_line(event_type, &ev.object));
        }
        let obj = parsed.unwrap_or_else(|| ev.object_value());
        Some(self.event_line(event_type, &obj))
    }

    fn event_line(&self, event_type: &str, obj: &Value) -> Bytes {
        let obj = present(obj, &self.p);
        line(event_type, &obj)
    }

    fn bookmark(&self, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": self.last_rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({INITIAL_EVENTS_END: "true"});
        }
        line(
            "BOOKMARK",
            &json!({"kind": self.p.kind.name(), "apiVersion": self.p.api_version, "metadata": meta}),
        )
    }
}

/// What woke a watch stream up.
enum Step {
    Event(Result<WatchEvent, broadcast::error::RecvError>),
    Timeout,
    Bookmark,
}

fn line(event_type: &str, obj: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": event_type, "object": obj})))
}

/// [`line`] for an object already serialized.
fn raw_line(event_type: &str, object: &str) -> Bytes {
    Bytes::from(format!(
        "{{\"type\":\"{event_type}\",\"object\":{object}}}\n"
    ))
}

/// An object as this watch presents it: the URL's apiVersion, or a one-row Table.
fn present(obj: &Value, p: &WatchParams) -> Value {
    match p.table {
        // Cells are computed from the stored form, whatever version was asked for.
        Some(include) => table::table(
            p.kind,
            std::slice::from_ref(obj),
            include,
            crate::util::now_secs(),
        ),
        None => crate::convert::present(p.kind, &p.api_version, obj),
    }
}

fn stream_response(chunks: impl futures::Stream<Item = Bytes> + Send + 'static) -> Response {
    use futures::StreamExt;
    let body = Body::from_stream(chunks.map(Ok::<_, std::convert::Infallible>));
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache, private"),
        ],
        body,
    )
        .into_response()
}

/// Start a watch; `Err` holds an error response for failures before the stream starts.
pub async fn watch(store: AsyncStore, p: WatchParams) -> Result<Response, Response> {
    use futures::StreamExt;
    let initial_mode = p.send_initial_events || matches!(p.resource_version, None | Some(0));
    let kind = p.kind;
    let ns = p.ns.clone();
    let from = p.resource_version.unwrap_or(0);
    let start = store
        .run(move |s| {
            if initial_mode {
                let (items, rv) = s.list_at(kind, ns.as_deref())?;
                Ok((items, rv, s.watch_from(rv)?))
            } else {
                Ok((Vec::new(), from, s.watch_from(from)?))
            }
        })
        .await;
    let (initial, start_rv, replay) = match start {
        Ok(x) => x,
        Err(e @ StoreError::Expired { .. }) => {
            // As Kubernetes: the HTTP status is 200 and the error is the stream's only event.
            let ev = line("ERROR", &expired_status(&e));
            return Ok(stream_response(futures::stream::iter([ev])));
        }
        Err(e) => return Err(crate::api::store_error(e, kind, "")),
    };
    let now = Instant::now();
    let mut st = Stream {
        live: replay.live,
        last_rv: start_rv,
        next_bookmark: now + p.bookmark_interval,
        deadline: now + p.timeout,
        p,
    };
    let mut first: Vec<Bytes> = initial
        .iter()
        .filter(|o| st.p.selectors.matches(o))
        .map(|o| st.event_line("ADDED", o))
        .collect();
    if st.p.send_initial_events {
        first.push(st.bookmark(true));
    }
    for ev in &replay.events {
        if ev.rv <= st.last_rv {
            continue;
        }
        if let Some(l) = st.line_for(ev) {
            first.push(l);
        }
        st.last_rv = ev.rv;
    }
    let rest = futures::stream::unfold(st, |mut st| async move {
        loop {
            let bookmark_at = st.next_bookmark;
            let deadline = st.deadline;
            let bookmarks = st.p.bookmarks;
            let step = tokio::select! {
                ev = st.live.recv() => Step::Event(ev),
                _ = tokio::time::sleep_until(deadline) => Step::Timeout,
                _ = tokio::time::sleep_until(bookmark_at), if bookmarks => Step::Bookmark,
            };
            match step {
                Step::Event(Ok(ev)) => {
                    if ev.rv <= st.last_rv {
                        continue;
                    }
                    st.last_rv = ev.rv;
                    if let Some(l) = st.line_for(&ev) {
                        return Some((l, st));
                    }
                }
                // Lagged or closed: end the stream; the client re-watches.
                Step::Event(Err(_)) | Step::Timeout => return None,
                Step::Bookmark => {
                    st.next_bookmark = Instant::now() + st.p.bookmark_interval;
                    let b = st.bookmark(false);
                    return Some((b, st));
                }
            }
        }
    });
    Ok(stream_response(futures::stream::iter(first).chain(rest)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::LabelSelector;
    use crate::store::{SqliteStore, Store};
    use futures::StreamExt;
    use std::sync::Arc;

    fn params(rv: Option<u64>) -> WatchParams {
        WatchParams {
            kind: Kind::ConfigMap,
            ns: Some("default".into()),
            api_version: "v1".into(),
            resource_version: rv,
            send_initial_events: false,
            bookmarks: false,
            bookmark_interval: BOOKMARK_INTERVAL,
            timeout: Duration::from_secs(5),
            selectors: Selectors::default(),
            table: None,
        }
    }

    fn cm(name: &str, labels: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "default", "labels": labels}, "data": {}})
    }

    async fn lines(resp: Response, n: usize) -> Vec<Value> {
        let mut body = resp.into_body().into_data_stream();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while out.len() < n {
            let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(60), body.next()).await
            else {
                break;
            };
            buf.extend_from_slice(&chunk.unwrap());
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let l: Vec<u8> = buf.drain(..=pos).collect();
                out.push(serde_json::from_slice(&l).unwrap());
            }
        }
        out
    }

    async fn started(store: AsyncStore, p: WatchParams) -> Response {
        match watch(store, p).await {
            Ok(r) => r,
            Err(r) => panic!("watch refused: {}", r.status()),
        }
    }

    fn setup() -> (Arc<SqliteStore>, AsyncStore) {
        let s = Arc::new(SqliteStore::in_memory().unwrap());
        let a = AsyncStore::new(s.clone());
        (s, a)
    }

    #[tokio::test]
    async fn initial_events_then_changes() {
        let (s, a) = setup();
        s.create(Kind::ConfigMap, cm("a", json!({}))).unwrap();
        let mut p = params(None);
        p.send_initial_events = true;
        let resp = started(a, p).await;
        s.create(Kind::ConfigMap, cm("b", json!({}))).unwrap();
        let got = lines(resp, 3).await;
        assert_eq!(got[0]["type"], "ADDED");
        assert_eq!(got[0]["object"]["metadata"]["name"], "a");
        assert_eq!(got[1]["type"], "BOOKMARK");
        assert_eq!(
            got[1]["object"]["metadata"]["annotations"][INITIAL_EVENTS_END],
            "true"
        );
        assert_eq!(got[1]["object"]["metadata"]["resourceVersion"], "2");
        assert_eq!(got[2]["type"], "ADDED");
        assert_eq!(got[2]["object"]["metadata"]["name"], "b");
    }

    #[tokio::test]
    async fn resume_from_a_version_replays_only_later_changes() {
        let (s, a) = setup();
        s.create(Kind::ConfigMap, cm("a", json!({}))).unwrap();
        let rv = s.resource_version().unwrap();
        s.create(Kind::ConfigMap, cm("b", json!({}))).unwrap();
        s.delete(Kind::ConfigMap, "default", "a").unwrap();
        let got = lines(started(a, params(Some(rv))).await, 2).await;
        let summary: Vec<(String, String)> = got
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap().to_string(),
                    e["object"]["metadata"]["name"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [("ADDED".into(), "b".into()), ("DELETED".into(), "a".into())]
        );
    }

    #[tokio::test]
    async fn too_old_versions_get_one_expired_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        SqliteStore::open(&path)
            .unwrap()
            .create(Kind::ConfigMap, cm("a", json!({})))
            .unwrap();
        // A restart forgets the history: version 1 is now too old.
        let a = AsyncStore::new(Arc::new(SqliteStore::open(&path).unwrap()));
        let got = lines(started(a, params(Some(1))).await, 2).await;
        assert_eq!(got.len(), 1, "the stream ends after the error");
        assert_eq!(got[0]["type"], "ERROR");
        assert_eq!(got[0]["object"]["code"], 410);
        assert_eq!(got[0]["object"]["reason"], "Expired");
    }

    #[tokio::test]
    async fn selectors_turn_label_changes_into_added_and_deleted() {
        let (s, a) = setup();
        let mut p = params(None);
        p.selectors.labels = LabelSelector::parse("app=web").unwrap();
        let resp = started(a, p).await;
        let o = s
            .create(Kind::ConfigMap, cm("a", json!({"app": "db"})))
            .unwrap();
        let mut o2 = o.clone();
        o2["metadata"]["labels"]["app"] = json!("web");
        let o2 = s.update(Kind::ConfigMap, o2).unwrap();
        let mut o3 = o2.clone();
        o3["data"]["x"] = json!("1");
        let o3 = s.update(Kind::ConfigMap, o3).unwrap();
        let mut o4 = o3.clone();
        o4["metadata"]["labels"]["app"] = json!("db");
        s.update(Kind::ConfigMap, o4).unwrap();
        let got = lines(resp, 3).await;
        let types: Vec<&str> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["ADDED", "MODIFIED", "DELETED"]);
    }

    #[tokio::test]
    async fn bookmarks_and_timeouts() {
        let (s, a) = setup();
        s.create(Kind::ConfigMap, cm("a", json!({}))).unwrap();
        let mut p = params(Some(s.resource_version().unwrap()));
        p.bookmarks = true;
        p.bookmark_interval = Duration::from_millis(300);
        p.timeout = Duration::from_millis(450);
        // Another kind's change advances the version the bookmark reports.
        s.create(
            Kind::Secret,
            json!({"metadata": {"name": "x", "namespace": "default"}}),
        )
        .unwrap();
        let got = lines(started(a, p).await, 3).await;
        assert_eq!(
            got.len(),
            1,
            "one bookmark, then the timeout ends the stream"
        );
        assert_eq!(got[0]["type"], "BOOKMARK");
        assert_eq!(got[0]["object"]["kind"], "ConfigMap");
        assert_eq!(got[0]["object"]["metadata"]["resourceVersion"], "3");
    }

    #[tokio::test]
    async fn table_watches_send_rows() {
        let (s, a) = setup();
        let mut p = params(None);
        p.table = Some(IncludeObject::Metadata);
        s.create(Kind::ConfigMap, cm("a", json!({}))).unwrap();
        let got = lines(started(a, p).await, 1).await;
        assert_eq!(got[0]["object"]["kind"], "Table");
        assert_eq!(got[0]["object"]["rows"][0]["cells"][0], "a");
    }
}
