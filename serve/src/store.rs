//! The object store: Kubernetes-shaped JSON objects with resource versions, a change feed and
//! the object lifecycle an apiserver enforces.
//!
//! [`Store`] is the seam a Kubernetes backend replaces (it would be the apiserver); the
//! embedded control plane uses [`SqliteStore`], one SQLite database in WAL mode under the data
//! directory, so a crash loses nothing that was acknowledged.
//!
//! Lifecycle rules live here, below every writer (the resource API and the built-in
//! controller alike): `uid`, `creationTimestamp` and `metadata.generation` (1 on create, +1 when
//! anything but metadata and status changes) are the store's; an update that changes nothing
//! writes nothing; deleting an object with `metadata.finalizers` only marks it
//! (`deletionTimestamp`), and the update that empties its finalizers removes it; creating an
//! object in a namespace that has no Namespace object creates that Namespace.
//!
//! Every change gets its own resource version and is published in commit order, both on a live
//! feed ([`Store::watch`]) and into a bounded history ([`Store::watch_from`]) from which a
//! watcher that knows the last version it saw resumes without re-listing.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::util::{new_uid, now_rfc3339};

/// Capacity of the live change feed; a watcher that falls further behind loses its stream
/// and re-watches (from the history, or by re-listing).
const WATCH_BUFFER: usize = 1024;

/// Changes kept for watches that resume from a resource version. kube-runtime re-watches
/// from the last version it saw after every stream end (server timeout, lag, reconnect);
/// the gap to cover is seconds to minutes of changes on one host, where the busiest writer is
/// the DataVolume progress update (one per worker every few seconds). 4096 changes is far more
/// than such a gap; older versions answer `410 Expired` and the client re-lists.
pub const WATCH_HISTORY: usize = 4096;

/// Bytes of serialized objects (after and before each change) the history keeps at most.
/// A burst of large objects (pods with long specs, 100 DataVolumes applied at once) would
/// otherwise hold 4096 changes of several KiB each, twice: the control plane's memory target
/// is 64 MiB at 100 DataVolumes. 8 MiB still covers thousands of typical changes.
pub const WATCH_HISTORY_BYTES: usize = 8 << 20;

/// The resource kinds the control plane serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `cdi.kubevirt.io` DataVolume (namespaced).
    DataVolume,
    /// Core PersistentVolumeClaim (namespaced).
    PersistentVolumeClaim,
    /// `storage.k8s.io` StorageClass (cluster).
    StorageClass,
    /// `cdi.kubevirt.io` StorageProfile (cluster).
    StorageProfile,
    /// `cdi.kubevirt.io` CDIConfig (cluster singleton `config`).
    CdiConfig,
    /// Core Event (namespaced).
    Event,
    /// Core Secret (namespaced).
    Secret,
    /// Core ConfigMap (namespaced).
    ConfigMap,
    /// Core Pod (namespaced); run by the node agent as child processes.
    Pod,
    /// Core Service (namespaced).
    Service,
    /// Core PersistentVolume (cluster).
    PersistentVolume,
    /// Core Namespace (cluster).
    Namespace,
    /// `cdi.kubevirt.io` DataSource (namespaced).
    DataSource,
    /// `cdi.kubevirt.io` DataImportCron (namespaced).
    DataImportCron,
    /// `snapshot.storage.k8s.io` VolumeSnapshot (namespaced).
    VolumeSnapshot,
    /// `snapshot.storage.k8s.io` VolumeSnapshotClass (cluster).
    VolumeSnapshotClass,
    /// `coordination.k8s.io` Lease (namespaced; leader election).
    Lease,
}

/// `cdi.kubevirt.io`.
pub use cdi_api::resources::CDI_GROUP;
/// `storage.k8s.io`.
pub const STORAGE_GROUP: &str = "storage.k8s.io";
/// `snapshot.storage.k8s.io`.
pub const SNAPSHOT_GROUP: &str = "snapshot.storage.k8s.io";
/// `coordination.k8s.io`.
pub const COORDINATION_GROUP: &str = "coordination.k8s.io";

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 17] = [
        Kind::DataVolume,
        Kind::PersistentVolumeClaim,
        Kind::StorageClass,
        Kind::StorageProfile,
        Kind::CdiConfig,
        Kind::Event,
        Kind::Secret,
        Kind::ConfigMap,
        Kind::Pod,
        Kind::Service,
        Kind::PersistentVolume,
        Kind::Namespace,
        Kind::DataSource,
        Kind::DataImportCron,
        Kind::VolumeSnapshot,
        Kind::VolumeSnapshotClass,
        Kind::Lease,
    ];

    /// `kind` field value.
    pub fn name(self) -> &'static str {
        match self {
            Kind::DataVolume => "DataVolume",
            Kind::PersistentVolumeClaim => "PersistentVolumeClaim",
            Kind::StorageClass => "StorageClass",
            Kind::StorageProfile => "StorageProfile",
            Kind::CdiConfig => "CDIConfig",
            Kind::Event => "Event",
            Kind::Secret => "Secret",
            Kind::ConfigMap => "ConfigMap",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::PersistentVolume => "PersistentVolume",
            Kind::Namespace => "Namespace",
            Kind::DataSource => "DataSource",
            Kind::DataImportCron => "DataImportCron",
            Kind::VolumeSnapshot => "VolumeSnapshot",
            Kind::VolumeSnapshotClass => "VolumeSnapshotClass",
            Kind::Lease => "Lease",
        }
    }

    /// URL plural.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::DataVolume => "datavolumes",
            Kind::PersistentVolumeClaim => "persistentvolumeclaims",
            Kind::StorageClass => "storageclasses",
            Kind::StorageProfile => "storageprofiles",
            Kind::CdiConfig => "cdiconfigs",
            Kind::Event => "events",
            Kind::Secret => "secrets",
            Kind::ConfigMap => "configmaps",
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::PersistentVolume => "persistentvolumes",
            Kind::Namespace => "namespaces",
            Kind::DataSource => "datasources",
            Kind::DataImportCron => "dataimportcrons",
            Kind::VolumeSnapshot => "volumesnapshots",
            Kind::VolumeSnapshotClass => "volumesnapshotclasses",
            Kind::Lease => "leases",
        }
    }

    /// URL singular (the kind in lower case, as Kubernetes derives it).
    pub fn singular(self) -> String {
        self.name().to_ascii_lowercase()
    }

    /// Kind from its URL plural.
    pub fn from_plural(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.plural() == s)
    }

    /// Kind from its `kind` field value.
    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Whether objects live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(
            self,
            Kind::StorageClass
                | Kind::StorageProfile
                | Kind::CdiConfig
                | Kind::PersistentVolume
                | Kind::Namespace
                | Kind::VolumeSnapshotClass
        )
    }

    /// API group (`""` for core).
    pub fn group(self) -> &'static str {
        match self {
            Kind::DataVolume
            | Kind::StorageProfile
            | Kind::CdiConfig
            | Kind::DataSource
            | Kind::DataImportCron => CDI_GROUP,
            Kind::StorageClass => STORAGE_GROUP,
            Kind::VolumeSnapshot | Kind::VolumeSnapshotClass => SNAPSHOT_GROUP,
            Kind::Lease => COORDINATION_GROUP,
            Kind::PersistentVolumeClaim
            | Kind::Event
            | Kind::Secret
            | Kind::ConfigMap
            | Kind::Pod
            | Kind::Service
            | Kind::PersistentVolume
            | Kind::Namespace => "",
        }
    }

    /// Version objects are stored in (the group's preferred version).
    pub fn version(self) -> &'static str {
        if self.group() == CDI_GROUP {
            "v1beta1"
        } else {
            "v1"
        }
    }

    /// Versions served for this kind, preferred first.
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            // The docs still show v1alpha1 DataVolumes and CDIConfigs; same shape, served too.
            Kind::DataVolume | Kind::CdiConfig => &["v1beta1", "v1alpha1"],
            k if k.group() == CDI_GROUP => &["v1beta1"],
            _ => &["v1"],
        }
    }

    /// `apiVersion` objects are stored and served with.
    pub fn api_version(self) -> &'static str {
        match self.group() {
            CDI_GROUP => "cdi.kubevirt.io/v1beta1",
            STORAGE_GROUP => "storage.k8s.io/v1",
            SNAPSHOT_GROUP => "snapshot.storage.k8s.io/v1",
            COORDINATION_GROUP => "coordination.k8s.io/v1",
            _ => "v1",
        }
    }

    /// Whether the kind has a `/status` subresource: its status is written only there, and
    /// writes to the main resource keep the stored status.
    pub fn has_status(self) -> bool {
        matches!(
            self,
            Kind::DataVolume
                | Kind::PersistentVolumeClaim
                | Kind::PersistentVolume
                | Kind::Pod
                | Kind::Service
                | Kind::Namespace
                | Kind::StorageProfile
                | Kind::CdiConfig
                | Kind::DataSource
                | Kind::DataImportCron
                | Kind::VolumeSnapshot
        )
    }
}

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Updated (including being marked for deletion).
    Modified,
    /// Removed.
    Deleted,
}

impl EventType {
    /// The watch event `type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change of the store. Cheap to clone: the history, the live feed and every watcher
/// share one serialized copy of the object, written once when the change is published (a
/// parsed `Value` tree takes several times the memory of its text, and watchers send text).
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// Kind of the object.
    pub kind: Kind,
    /// `ADDED`, `MODIFIED` or `DELETED` (see [`EventType::as_str`]).
    pub event_type: &'static str,
    /// Namespace of the object (`""` for cluster-scoped kinds).
    pub namespace: Arc<str>,
    /// The object after the change as compact JSON, its `apiVersion` the kind's stored
    /// version; for deletions, the last state with the deletion's resource version, as
    /// Kubernetes reports it.
    pub object: Arc<str>,
    /// Resource version of this change.
    pub rv: u64,
    /// For `MODIFIED`: the object before the change as compact JSON (lets a filtered watch
    /// tell objects that start or stop matching its selectors).
    pub previous: Option<Arc<str>>,
}

impl WatchEvent {
    /// The object after the change, parsed.
    pub fn object_value(&self) -> Value {
        parse_published(&self.object)
    }

    /// The object before a `MODIFIED` change, parsed.
    pub fn previous_value(&self) -> Option<Value> {
        self.previous.as_deref().map(parse_published)
    }

    /// Bytes the history holds for this change.
    fn size(&self) -> usize {
        self.object.len() + self.previous.as_ref().map_or(0, |p| p.len())
    }
}

/// Parse JSON this store serialized itself (so it cannot fail short of a bug).
fn parse_published(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// Serialize a changed object for the feed, its `apiVersion` the kind's stored version (what
/// a watch in that version sends unchanged).
fn publishable(kind: Kind, mut obj: Value) -> Arc<str> {
    obj["apiVersion"] = json!(kind.api_version());
    Arc::from(obj.to_string())
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Optimistic concurrency check failed.
    #[error(
        "the object has been modified; please apply your changes to the latest version and try again"
    )]
    Conflict,
    /// A delete precondition (uid or resourceVersion) did not hold.
    #[error("Precondition failed: {0}")]
    Precondition(String),
    /// The database failed.
    #[error("database error")]
    Db(#[from] rusqlite::Error),
    /// Create of an existing object.
    #[error("already exists")]
    AlreadyExists,
    /// An object the store refuses (bad name, forbidden lifecycle change).
    #[error("invalid object: {0}")]
    Invalid(&'static str),
    /// Update of a missing object.
    #[error("not found")]
    NotFound,
    /// A stored body failed to parse.
    #[error("corrupt stored object")]
    Json(#[from] serde_json::Error),
    /// A watch asked for changes older than the kept history.
    #[error("too old resource version: {requested} ({oldest})")]
    Expired {
        /// The version asked for.
        requested: u64,
        /// The oldest version the history can resume from.
        oldest: u64,
    },
    /// The blocking task running the store call failed (panicked or was cancelled).
    #[error("store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Cascading behaviour of a delete (`DeleteOptions.propagationPolicy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Propagation {
    /// Remove the object now; the garbage collector removes its dependents.
    #[default]
    Background,
    /// Kubernetes removes dependents first; here treated like [`Propagation::Background`].
    Foreground,
    /// Remove the object and strip its uid from its dependents' owner references.
    Orphan,
}

/// Options of [`Store::delete_with`].
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    /// Cascading behaviour.
    pub propagation: Propagation,
    /// Delete only if the object has this uid.
    pub uid: Option<String>,
    /// Delete only if the object has this resource version.
    pub resource_version: Option<String>,
}

/// Outcome of a delete of an existing object.
#[derive(Debug, Clone)]
pub enum Deletion {
    /// The object is gone; its last state.
    Removed(Value),
    /// The object has finalizers: it is marked with `deletionTimestamp` and stays until an
    /// update empties them; its current state.
    Marked(Value),
}

impl Deletion {
    /// The object either way.
    pub fn into_object(self) -> Value {
        match self {
            Deletion::Removed(o) | Deletion::Marked(o) => o,
        }
    }
}

/// Changes after a resource version, then the live feed (see [`Store::watch_from`]).
pub struct Replay {
    /// Changes after the requested version, oldest first.
    pub events: Vec<WatchEvent>,
    /// Changes after the last of `events` (subscribed atomically with reading them).
    pub live: broadcast::Receiver<WatchEvent>,
}

/// Storage of API objects. Namespace is `""` for cluster-scoped kinds.
pub trait Store: Send + Sync {
    /// One object.
    fn get(&self, kind: Kind, ns: &str, name: &str) -> Result<Option<Value>, StoreError>;
    /// All objects of a kind, in one namespace or (None) all.
    fn list(&self, kind: Kind, ns: Option<&str>) -> Result<Vec<Value>, StoreError>;
    /// [`Store::list`] and the store's resource version of that same snapshot.
    fn list_at(&self, kind: Kind, ns: Option<&str>) -> Result<(Vec<Value>, u64), StoreError>;
    /// Every object of every kind, and the resource version of that snapshot.
    fn list_all(&self) -> Result<(Vec<(Kind, Value)>, u64), StoreError>;
    /// Create; assigns uid, resourceVersion, generation and creationTimestamp (creating the
    /// object's Namespace if it has none).
    fn create(&self, kind: Kind, obj: Value) -> Result<Value, StoreError>;
    /// Replace; if `metadata.resourceVersion` is set it must match the stored one. Returns the
    /// stored object (unchanged, without a write, if nothing changed). Emptying the finalizers
    /// of an object marked for deletion removes it.
    fn update(&self, kind: Kind, obj: Value) -> Result<Value, StoreError>;
    /// Delete with options; `None` when there is no such object.
    fn delete_with(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Option<Deletion>, StoreError>;
    /// Delete (background propagation, no preconditions); returns the object, removed or
    /// marked for deletion when it has finalizers.
    fn delete(&self, kind: Kind, ns: &str, name: &str) -> Result<Option<Value>, StoreError> {
        Ok(self
            .delete_with(kind, ns, name, &DeleteOptions::default())?
            .map(Deletion::into_object))
    }
    /// Current resource version of the whole store.
    fn resource_version(&self) -> Result<u64, StoreError>;
    /// Subscribe to changes made after this call.
    fn watch(&self) -> broadcast::Receiver<WatchEvent>;
    /// Changes after resource version `rv` from the kept history, and the live feed after
    /// them; [`StoreError::Expired`] when the history no longer reaches back to `rv`.
    fn watch_from(&self, rv: u64) -> Result<Replay, StoreError>;
}

/// Store calls that may wait on the blocking pool at once. SQLite runs one call at a time
/// (one connection behind a mutex), so more threads would only queue on that mutex; each
/// extra thread costs a stack and, with glibc, possibly a malloc arena of its own.
const STORE_THREADS: usize = 4;

/// Admission to the blocking pool for store calls (see [`STORE_THREADS`]).
static STORE_CALLS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(STORE_THREADS);

/// A [`Store`] for async code: every call runs on tokio's blocking pool, so SQLite (which
/// blocks on disk and on its lock) never stalls the runtime's worker threads.
#[derive(Clone)]
pub struct AsyncStore(Arc<dyn Store>);

impl AsyncStore {
    /// Wrap a store.
    pub fn new(store: Arc<dyn Store>) -> Self {
        AsyncStore(store)
    }

    /// The synchronous store (for code already on a blocking thread).
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.0
    }

    /// Run `f` against the store on the blocking pool.
    pub async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = Arc::clone(&self.0);
        // The semaphore is never closed, so a permit always comes.
        let _permit = STORE_CALLS.acquire().await.ok();
        tokio::task::spawn_blocking(move || f(store.as_ref())).await?
    }

    /// Run `f` (which cannot fail as a store call: it maps errors itself) on the blocking pool.
    pub async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> T + Send + 'static,
    {
        let store = Arc::clone(&self.0);
        // The semaphore is never closed, so a permit always comes.
        let _permit = STORE_CALLS.acquire().await.ok();
        Ok(tokio::task::spawn_blocking(move || f(store.as_ref())).await?)
    }
}

/// The published side of the store: live feed and bounded history, changed only while the
/// connection lock is held so both see changes in commit order.
struct Feed {
    live: broadcast::Sender<WatchEvent>,
    history: VecDeque<WatchEvent>,
    /// Sum of [`WatchEvent::size`] over `history`.
    history_bytes: usize,
    /// Changes up to this version are not in `history` (dropped, or made before this process
    /// opened the database); a watch can resume from this version or later.
    horizon: u64,
}

/// [`Store`] on SQLite.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    feed: Mutex<Feed>,
}

/// A change made inside a transaction, published after it commits.
struct Change {
    kind: Kind,
    event_type: EventType,
    object: Value,
    rv: u64,
    previous: Option<Value>,
}

impl SqliteStore {
    /// Open (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// A database in memory (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        // WAL keeps readers and the single writer out of each other's way and makes each
        // committed write durable without rewriting the whole file.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS objects (
                kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
                rv INTEGER NOT NULL, body TEXT NOT NULL,
                PRIMARY KEY (kind, namespace, name));
             CREATE TABLE IF NOT EXISTS seq (id INTEGER PRIMARY KEY CHECK (id = 1), rv INTEGER NOT NULL);
             INSERT OR IGNORE INTO seq (id, rv) VALUES (1, 0);",
        )?;
        let rv: i64 = conn.query_row("SELECT rv FROM seq WHERE id = 1", [], |r| r.get(0))?;
        let (live, _) = broadcast::channel(WATCH_BUFFER);
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            feed: Mutex::new(Feed {
                live,
                history: VecDeque::new(),
                history_bytes: 0,
                horizon: rv as u64,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (it has its own
        // transactions), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_feed(&self) -> MutexGuard<'_, Feed> {
        // The feed is only appended to; a panic elsewhere cannot leave it half-written.
        self.feed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publish committed changes. Called with the connection lock held, so changes are
    /// published in resource-version order.
    fn publish(&self, changes: Vec<Change>) {
        let mut feed = self.lock_feed();
        for c in changes {
            let namespace = Arc::from(c.object["metadata"]["namespace"].as_str().unwrap_or(""));
            let ev = WatchEvent {
                kind: c.kind,
                event_type: c.event_type.as_str(),
                namespace,
                object: publishable(c.kind, c.object),
                rv: c.rv,
                previous: c.previous.map(|p| publishable(c.kind, p)),
            };
            while !feed.history.is_empty()
                && (feed.history.len() >= WATCH_HISTORY
                    || feed.history_bytes + ev.size() > WATCH_HISTORY_BYTES)
            {
                if let Some(old) = feed.history.pop_front() {
                    feed.history_bytes -= old.size();
                    feed.horizon = old.rv;
                }
            }
            feed.history_bytes += ev.size();
            feed.history.push_back(ev.clone());
            // No subscribers is fine.
            let _ = feed.live.send(ev);
        }
    }

    /// Run `f` in one transaction and publish its changes once committed.
    fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>, &mut Vec<Change>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let mut changes = Vec::new();
        let out = f(&tx, &mut changes)?;
        tx.commit()?;
        self.publish(changes);
        Ok(out)
    }
}

fn next_rv(tx: &rusqlite::Transaction<'_>) -> Result<u64, StoreError> {
    tx.execute("UPDATE seq SET rv = rv + 1 WHERE id = 1", [])?;
    let rv: i64 = tx.query_row("SELECT rv FROM seq WHERE id = 1", [], |r| r.get(0))?;
    Ok(rv as u64)
}

fn read_row(
    conn: &Connection,
    kind: Kind,
    ns: &str,
    name: &str,
) -> Result<Option<Value>, StoreError> {
    let body: Option<String> = conn
        .query_row(
            "SELECT body FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
            params![kind.name(), ns, name],
            |r| r.get(0),
        )
        .optional()?;
    Ok(match body {
        Some(b) => Some(serde_json::from_str(&b)?),
        None => None,
    })
}

fn insert_row(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    ns: &str,
    name: &str,
    rv: u64,
    obj: &Value,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO objects (kind, namespace, name, rv, body) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![kind.name(), ns, name, rv as i64, obj.to_string()],
    )?;
    Ok(())
}

fn update_row(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    ns: &str,
    name: &str,
    rv: u64,
    obj: &Value,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE objects SET rv = ?4, body = ?5 WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
        params![kind.name(), ns, name, rv as i64, obj.to_string()],
    )?;
    Ok(())
}

fn delete_row(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    ns: &str,
    name: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
        params![kind.name(), ns, name],
    )?;
    Ok(())
}

/// `(namespace, name)` of an object of `kind`.
pub fn key_of(kind: Kind, obj: &Value) -> Result<(String, String), StoreError> {
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // The API checks names at the door with a precise message; this is the last line of
    // defence, since names reach file paths of workers.
    if !cdi_api::names::is_dns1123_subdomain(&name) {
        return Err(StoreError::Invalid(
            "metadata.name must be a lowercase DNS-1123 subdomain",
        ));
    }
    let ns = if kind.namespaced() {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !cdi_api::names::is_dns1123_label(&ns) {
            return Err(StoreError::Invalid(
                "metadata.namespace must be a lowercase DNS-1123 label",
            ));
        }
        ns
    } else {
        String::new()
    };
    Ok((ns, name))
}

/// Everything but metadata and status: what `metadata.generation` counts changes of.
pub fn generation_content(obj: &Value) -> Value {
    match obj.as_object() {
        Some(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "metadata" | "status" | "apiVersion" | "kind")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        None => Value::Null,
    }
}

fn finalizers(obj: &Value) -> Vec<&str> {
    obj["metadata"]["finalizers"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Fields of `metadata` only the store sets; copied from the stored object on update.
const SYSTEM_METADATA: [&str; 5] = [
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
];

/// A new object's metadata as the store assigns it.
fn stamp_new(kind: Kind, obj: &mut Value, rv: u64) {
    obj["apiVersion"] = json!(kind.api_version());
    obj["kind"] = json!(kind.name());
    if let Some(m) = obj["metadata"].as_object_mut() {
        for f in SYSTEM_METADATA {
            m.remove(f);
        }
    }
    let meta = &mut obj["metadata"];
    meta["uid"] = json!(new_uid());
    meta["resourceVersion"] = json!(rv.to_string());
    meta["creationTimestamp"] = json!(now_rfc3339());
    meta["generation"] = json!(1);
}

/// Bring `obj` (an update of `stored`) to what would be stored, apart from its resource
/// version: system metadata from `stored`, generation bumped when the content changed.
fn carry_system_fields(kind: Kind, stored: &Value, obj: &mut Value) {
    obj["apiVersion"] = json!(kind.api_version());
    obj["kind"] = json!(kind.name());
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    let generation = stored["metadata"]["generation"].as_u64().unwrap_or(1);
    let changed = generation_content(stored) != generation_content(obj);
    let Some(meta) = obj["metadata"].as_object_mut() else {
        return;
    };
    for f in SYSTEM_METADATA {
        match stored["metadata"].get(f) {
            Some(v) => meta.insert(f.to_string(), v.clone()),
            None => meta.remove(f),
        };
    }
    meta.insert(
        "generation".into(),
        json!(if changed { generation + 1 } else { generation }),
    );
    meta.insert(
        "resourceVersion".into(),
        stored["metadata"]["resourceVersion"].clone(),
    );
}

/// Remove `uid` from the owner references of `obj`; whether it had one.
fn strip_owner(obj: &mut Value, uid: &str) -> bool {
    let Some(refs) = obj["metadata"]["ownerReferences"].as_array_mut() else {
        return false;
    };
    let before = refs.len();
    refs.retain(|r| r["uid"] != uid);
    let changed = refs.len() != before;
    if refs.is_empty()
        && let Some(m) = obj["metadata"].as_object_mut()
    {
        m.remove("ownerReferences");
    }
    changed
}

impl SqliteStore {
    fn ensure_namespace(
        tx: &rusqlite::Transaction<'_>,
        ns: &str,
        changes: &mut Vec<Change>,
    ) -> Result<(), StoreError> {
        if read_row(tx, Kind::Namespace, "", ns)?.is_some() {
            return Ok(());
        }
        let rv = next_rv(tx)?;
        let mut obj = json!({"metadata": {"name": ns}, "spec": {}, "status": {"phase": "Active"}});
        stamp_new(Kind::Namespace, &mut obj, rv);
        insert_row(tx, Kind::Namespace, "", ns, rv, &obj)?;
        changes.push(Change {
            kind: Kind::Namespace,
            event_type: EventType::Added,
            object: obj,
            rv,
            previous: None,
        });
        Ok(())
    }

    /// Strip `uid` from every dependent's owner references (orphaning them).
    fn orphan_dependents(
        tx: &rusqlite::Transaction<'_>,
        uid: &str,
        changes: &mut Vec<Change>,
    ) -> Result<(), StoreError> {
        let rows: Vec<(String, String, String, String)> = {
            // The uid appearing anywhere in the body is a cheap superset of "referenced as an
            // owner"; each candidate is checked properly below.
            let mut stmt = tx.prepare(
                "SELECT kind, namespace, name, body FROM objects WHERE instr(body, ?1) > 0",
            )?;
            let rows = stmt.query_map(params![uid], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        for (kind, ns, name, body) in rows {
            let Some(kind) = Kind::from_name(&kind) else {
                continue;
            };
            let mut obj: Value = serde_json::from_str(&body)?;
            let before = obj.clone();
            if obj["metadata"]["uid"] == uid || !strip_owner(&mut obj, uid) {
                continue;
            }
            let rv = next_rv(tx)?;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            update_row(tx, kind, &ns, &name, rv, &obj)?;
            changes.push(Change {
                kind,
                event_type: EventType::Modified,
                object: obj,
                rv,
                previous: Some(before),
            });
        }
        Ok(())
    }
}

impl Store for SqliteStore {
    fn get(&self, kind: Kind, ns: &str, name: &str) -> Result<Option<Value>, StoreError> {
        read_row(&self.lock(), kind, ns, name)
    }

    fn list(&self, kind: Kind, ns: Option<&str>) -> Result<Vec<Value>, StoreError> {
        Ok(self.list_at(kind, ns)?.0)
    }

    fn list_at(&self, kind: Kind, ns: Option<&str>) -> Result<(Vec<Value>, u64), StoreError> {
        let conn = self.lock();
        let mut out = Vec::new();
        let mut stmt = conn.prepare_cached(
            "SELECT body FROM objects WHERE kind = ?1 AND (?2 IS NULL OR namespace = ?2)
             ORDER BY namespace, name",
        )?;
        let rows = stmt.query_map(params![kind.name(), ns], |r| r.get::<_, String>(0))?;
        for row in rows {
            out.push(serde_json::from_str(&row?)?);
        }
        let rv: i64 = conn.query_row("SELECT rv FROM seq WHERE id = 1", [], |r| r.get(0))?;
        Ok((out, rv as u64))
    }

    fn list_all(&self) -> Result<(Vec<(Kind, Value)>, u64), StoreError> {
        let conn = self.lock();
        let mut out = Vec::new();
        let mut stmt = conn.prepare_cached("SELECT kind, body FROM objects")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (kind, body) = row?;
            // Rows of kinds this version does not know (a newer database) are skipped.
            if let Some(kind) = Kind::from_name(&kind) {
                out.push((kind, serde_json::from_str(&body)?));
            }
        }
        let rv: i64 = conn.query_row("SELECT rv FROM seq WHERE id = 1", [], |r| r.get(0))?;
        Ok((out, rv as u64))
    }

    fn create(&self, kind: Kind, mut obj: Value) -> Result<Value, StoreError> {
        let (ns, name) = key_of(kind, &obj)?;
        self.write(|tx, changes| {
            if read_row(tx, kind, &ns, &name)?.is_some() {
                return Err(StoreError::AlreadyExists);
            }
            if kind.namespaced() {
                Self::ensure_namespace(tx, &ns, changes)?;
            }
            let rv = next_rv(tx)?;
            stamp_new(kind, &mut obj, rv);
            insert_row(tx, kind, &ns, &name, rv, &obj)?;
            changes.push(Change {
                kind,
                event_type: EventType::Added,
                object: obj.clone(),
                rv,
                previous: None,
            });
            Ok(obj)
        })
    }

    fn update(&self, kind: Kind, mut obj: Value) -> Result<Value, StoreError> {
        let (ns, name) = key_of(kind, &obj)?;
        self.write(|tx, changes| {
            let Some(stored) = read_row(tx, kind, &ns, &name)? else {
                return Err(StoreError::NotFound);
            };
            let want = obj["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            if !want.is_empty() && want != stored["metadata"]["resourceVersion"] {
                return Err(StoreError::Conflict);
            }
            let deleting = !stored["metadata"]["deletionTimestamp"].is_null();
            if deleting {
                let old = finalizers(&stored);
                if finalizers(&obj).iter().any(|f| !old.contains(f)) {
                    return Err(StoreError::Invalid(
                        "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted",
                    ));
                }
            }
            carry_system_fields(kind, &stored, &mut obj);
            if obj == stored {
                // Nothing changed: no write, no event, same resource version (as Kubernetes).
                return Ok(stored);
            }
            let rv = next_rv(tx)?;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            if deleting && finalizers(&obj).is_empty() {
                delete_row(tx, kind, &ns, &name)?;
                changes.push(Change {
                    kind,
                    event_type: EventType::Deleted,
                    object: obj.clone(),
                    rv,
                    previous: None,
                });
            } else {
                update_row(tx, kind, &ns, &name, rv, &obj)?;
                changes.push(Change {
                    kind,
                    event_type: EventType::Modified,
                    object: obj.clone(),
                    rv,
                    previous: Some(stored),
                });
            }
            Ok(obj)
        })
    }

    fn delete_with(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Option<Deletion>, StoreError> {
        self.write(|tx, changes| {
            let Some(mut obj) = read_row(tx, kind, ns, name)? else {
                return Ok(None);
            };
            let uid = obj["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if let Some(want) = &opts.uid
                && *want != uid
            {
                return Err(StoreError::Precondition(format!(
                    "UID in precondition: {want}, UID in object meta: {uid}"
                )));
            }
            if let Some(want) = &opts.resource_version
                && obj["metadata"]["resourceVersion"] != want.as_str()
            {
                return Err(StoreError::Precondition(format!(
                    "ResourceVersion in precondition: {want}, ResourceVersion in object meta: {}",
                    obj["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                )));
            }
            if opts.propagation == Propagation::Orphan && !uid.is_empty() {
                Self::orphan_dependents(tx, &uid, changes)?;
            }
            if !finalizers(&obj).is_empty() {
                if obj["metadata"]["deletionTimestamp"].is_null() {
                    let before = obj.clone();
                    let rv = next_rv(tx)?;
                    obj["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                    obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                    update_row(tx, kind, ns, name, rv, &obj)?;
                    changes.push(Change {
                        kind,
                        event_type: EventType::Modified,
                        object: obj.clone(),
                        rv,
                        previous: Some(before),
                    });
                }
                return Ok(Some(Deletion::Marked(obj)));
            }
            let rv = next_rv(tx)?;
            delete_row(tx, kind, ns, name)?;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            changes.push(Change {
                kind,
                event_type: EventType::Deleted,
                object: obj.clone(),
                rv,
                previous: None,
            });
            Ok(Some(Deletion::Removed(obj)))
        })
    }

    fn resource_version(&self) -> Result<u64, StoreError> {
        let conn = self.lock();
        let rv: i64 = conn.query_row("SELECT rv FROM seq WHERE id = 1", [], |r| r.get(0))?;
        Ok(rv as u64)
    }

    fn watch(&self) -> broadcast::Receiver<WatchEvent> {
        self.lock_feed().live.subscribe()
    }

    fn watch_from(&self, rv: u64) -> Result<Replay, StoreError> {
        let feed = self.lock_feed();
        if rv < feed.horizon {
            return Err(StoreError::Expired {
                requested: rv,
                oldest: feed.horizon,
            });
        }
        let events = feed.history.iter().filter(|e| e.rv > rv).cloned().collect();
        Ok(Replay {
            events,
            live: feed.live.subscribe(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dv(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "default"}, "spec": {}})
    }

    fn store() -> SqliteStore {
        SqliteStore::in_memory().unwrap()
    }

    #[test]
    fn create_assigns_identity_and_rejects_duplicates() {
        let s = store();
        let o = s.create(Kind::DataVolume, dv("a")).unwrap();
        // rv 1 went to the Namespace created for it.
        assert_eq!(o["metadata"]["resourceVersion"], "2");
        assert_eq!(o["metadata"]["generation"], 1);
        assert_eq!(o["kind"], "DataVolume");
        assert!(o["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
        assert!(matches!(
            s.create(Kind::DataVolume, dv("a")),
            Err(StoreError::AlreadyExists)
        ));
    }

    #[test]
    fn creating_in_a_new_namespace_creates_the_namespace_once() {
        let s = store();
        let mut rx = s.watch();
        let mut o = dv("a");
        o["metadata"]["namespace"] = json!("team");
        s.create(Kind::DataVolume, o.clone()).unwrap();
        o["metadata"]["name"] = json!("b");
        s.create(Kind::DataVolume, o).unwrap();
        let ns = s.list(Kind::Namespace, None).unwrap();
        assert_eq!(ns.len(), 1);
        assert_eq!(ns[0]["metadata"]["name"], "team");
        assert_eq!(ns[0]["status"]["phase"], "Active");
        let first = rx.try_recv().unwrap();
        assert_eq!(
            (first.kind, first.event_type, first.rv),
            (Kind::Namespace, "ADDED", 1)
        );
        assert_eq!(rx.try_recv().unwrap().rv, 2);
        assert_eq!(rx.try_recv().unwrap().rv, 3);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn stale_resource_version_conflicts() {
        let s = store();
        let o = s.create(Kind::DataVolume, dv("a")).unwrap();
        let mut first = o.clone();
        first["spec"]["x"] = json!(1);
        s.update(Kind::DataVolume, first).unwrap();
        let mut stale = o;
        stale["spec"]["x"] = json!(2);
        assert!(matches!(
            s.update(Kind::DataVolume, stale),
            Err(StoreError::Conflict)
        ));
    }

    #[test]
    fn generation_counts_content_changes_only() {
        let s = store();
        let o = s.create(Kind::DataVolume, dv("a")).unwrap();
        let mut u = o.clone();
        u["status"] = json!({"phase": "Pending"});
        let u = s.update(Kind::DataVolume, u).unwrap();
        assert_eq!(u["metadata"]["generation"], 1);
        let mut u2 = u.clone();
        u2["metadata"]["labels"] = json!({"a": "b"});
        let u2 = s.update(Kind::DataVolume, u2).unwrap();
        assert_eq!(u2["metadata"]["generation"], 1);
        let mut u3 = u2.clone();
        u3["spec"]["source"] = json!({"blank": {}});
        // A client cannot set the generation, uid or creation time.
        u3["metadata"]["generation"] = json!(40);
        u3["metadata"]["uid"] = json!("forged");
        let u3 = s.update(Kind::DataVolume, u3).unwrap();
        assert_eq!(u3["metadata"]["generation"], 2);
        assert_eq!(u3["metadata"]["uid"], o["metadata"]["uid"]);
        assert_eq!(u3["status"]["phase"], "Pending");
    }

    #[test]
    fn an_update_that_changes_nothing_writes_nothing() {
        let s = store();
        let o = s.create(Kind::DataVolume, dv("a")).unwrap();
        let mut rx = s.watch();
        let same = s.update(Kind::DataVolume, o.clone()).unwrap();
        assert_eq!(
            same["metadata"]["resourceVersion"],
            o["metadata"]["resourceVersion"]
        );
        assert!(rx.try_recv().is_err());
        assert_eq!(s.resource_version().unwrap(), 2);
    }

    #[test]
    fn watch_sees_changes_and_delete_returns_object() {
        let s = store();
        let mut rx = s.watch();
        s.create(Kind::DataVolume, dv("a")).unwrap();
        assert_eq!(rx.try_recv().unwrap().kind, Kind::Namespace);
        assert_eq!(rx.try_recv().unwrap().event_type, "ADDED");
        assert!(
            s.delete(Kind::DataVolume, "default", "a")
                .unwrap()
                .is_some()
        );
        let del = rx.try_recv().unwrap();
        assert_eq!(del.event_type, "DELETED");
        // The deletion carries its own resource version, so a watcher resumes after it.
        assert_eq!(del.rv, 3);
        assert_eq!(del.object_value()["metadata"]["resourceVersion"], "3");
        assert_eq!(&*del.namespace, "default");
        assert!(s.get(Kind::DataVolume, "default", "a").unwrap().is_none());
        assert_eq!(s.list(Kind::DataVolume, None).unwrap().len(), 0);
    }

    #[test]
    fn watch_from_replays_history_then_goes_live() {
        let s = store();
        s.create(Kind::DataVolume, dv("a")).unwrap();
        let b = s.create(Kind::DataVolume, dv("b")).unwrap();
        let mut b2 = b.clone();
        b2["spec"]["x"] = json!(1);
        s.update(Kind::DataVolume, b2).unwrap();
        let mut r = s.watch_from(2).unwrap();
        let got: Vec<(u64, &str)> = r.events.iter().map(|e| (e.rv, e.event_type)).collect();
        assert_eq!(got, vec![(3, "ADDED"), (4, "MODIFIED")]);
        assert!(r.live.try_recv().is_err());
        s.delete(Kind::DataVolume, "default", "a").unwrap();
        assert_eq!(r.live.try_recv().unwrap().rv, 5);
        // From the current version: nothing to replay.
        assert!(s.watch_from(5).unwrap().events.is_empty());
    }

    #[test]
    fn watch_from_before_the_history_expires() {
        let s = store();
        s.create(
            Kind::ConfigMap,
            json!({"metadata": {"name": "c", "namespace": "default"}, "data": {}}),
        )
        .unwrap();
        for i in 0..WATCH_HISTORY {
            let mut c = s.get(Kind::ConfigMap, "default", "c").unwrap().unwrap();
            c["data"]["i"] = json!(i.to_string());
            s.update(Kind::ConfigMap, c).unwrap();
        }
        let now = s.resource_version().unwrap();
        assert_eq!(now as usize, WATCH_HISTORY + 2);
        // The oldest kept change is now+1-WATCH_HISTORY; resuming just before it still works.
        let oldest_resumable = now - WATCH_HISTORY as u64;
        assert_eq!(
            s.watch_from(oldest_resumable).unwrap().events.len(),
            WATCH_HISTORY
        );
        assert!(matches!(
            s.watch_from(oldest_resumable - 1),
            Err(StoreError::Expired { requested, oldest }) if requested == oldest_resumable - 1 && oldest == oldest_resumable
        ));
    }

    #[test]
    fn history_is_bounded_by_bytes() {
        let s = store();
        let big = "x".repeat(64 << 10);
        let n = 3 * WATCH_HISTORY_BYTES / big.len();
        for i in 0..n {
            s.create(
                Kind::ConfigMap,
                json!({"metadata": {"name": format!("c{i}"), "namespace": "default"}, "data": {"d": big}}),
            )
            .unwrap();
        }
        let feed = s.lock_feed();
        assert!(feed.history_bytes <= WATCH_HISTORY_BYTES);
        assert_eq!(
            feed.history_bytes,
            feed.history.iter().map(WatchEvent::size).sum::<usize>()
        );
        // Roughly a third of the changes are still there; the rest expired.
        assert!(feed.history.len() > n / 4 && feed.history.len() < n / 2);
        let oldest = feed.horizon;
        drop(feed);
        assert!(s.watch_from(oldest).is_ok());
        assert!(matches!(
            s.watch_from(oldest - 1),
            Err(StoreError::Expired { .. })
        ));
    }

    #[test]
    fn published_objects_carry_the_stored_version() {
        let s = store();
        let mut rx = s.watch();
        let mut o = dv("a");
        o["apiVersion"] = json!("cdi.kubevirt.io/v1alpha1");
        s.create(Kind::DataVolume, o).unwrap();
        let ev = rx.try_recv().unwrap();
        let ev = if ev.kind == Kind::Namespace {
            rx.try_recv().unwrap()
        } else {
            ev
        };
        assert_eq!(ev.object_value()["apiVersion"], "cdi.kubevirt.io/v1beta1");
        assert_eq!(ev.object_value()["metadata"]["name"], "a");
    }

    #[test]
    fn history_starts_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        SqliteStore::open(&path)
            .unwrap()
            .create(Kind::DataVolume, dv("a"))
            .unwrap();
        let s = SqliteStore::open(&path).unwrap();
        assert!(matches!(s.watch_from(1), Err(StoreError::Expired { .. })));
        assert!(s.watch_from(2).unwrap().events.is_empty());
    }

    #[test]
    fn finalizers_hold_deletion_until_emptied() {
        let s = store();
        let mut o = dv("a");
        o["metadata"]["finalizers"] = json!(["example.com/hold"]);
        s.create(Kind::DataVolume, o).unwrap();
        let mut rx = s.watch();
        let Some(Deletion::Marked(marked)) = s
            .delete_with(Kind::DataVolume, "default", "a", &DeleteOptions::default())
            .unwrap()
        else {
            panic!("an object with finalizers is marked, not removed");
        };
        assert!(marked["metadata"]["deletionTimestamp"].is_string());
        assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 0);
        assert_eq!(rx.try_recv().unwrap().event_type, "MODIFIED");
        // Deleting again changes nothing.
        s.delete(Kind::DataVolume, "default", "a").unwrap();
        assert!(rx.try_recv().is_err());
        // No new finalizers once deletion started.
        let mut more = marked.clone();
        more["metadata"]["finalizers"] = json!(["example.com/hold", "example.com/other"]);
        assert!(matches!(
            s.update(Kind::DataVolume, more),
            Err(StoreError::Invalid(_))
        ));
        // The deletion timestamp cannot be cleared by an update.
        let mut keep = marked.clone();
        keep["metadata"]["deletionTimestamp"] = Value::Null;
        keep["spec"]["x"] = json!(1);
        let kept = s.update(Kind::DataVolume, keep).unwrap();
        assert!(kept["metadata"]["deletionTimestamp"].is_string());
        assert_eq!(rx.try_recv().unwrap().event_type, "MODIFIED");
        let mut release = kept;
        release["metadata"]["finalizers"] = json!([]);
        s.update(Kind::DataVolume, release).unwrap();
        assert_eq!(rx.try_recv().unwrap().event_type, "DELETED");
        assert!(s.get(Kind::DataVolume, "default", "a").unwrap().is_none());
    }

    #[test]
    fn delete_preconditions_and_orphaning() {
        let s = store();
        let owner = s.create(Kind::DataVolume, dv("a")).unwrap();
        let uid = owner["metadata"]["uid"].as_str().unwrap().to_string();
        let pvc = json!({"metadata": {"name": "a", "namespace": "default", "ownerReferences": [
            {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "name": "a", "uid": uid}]}});
        s.create(Kind::PersistentVolumeClaim, pvc).unwrap();
        let wrong_uid = DeleteOptions {
            uid: Some("other".into()),
            ..Default::default()
        };
        assert!(matches!(
            s.delete_with(Kind::DataVolume, "default", "a", &wrong_uid),
            Err(StoreError::Precondition(_))
        ));
        let stale_rv = DeleteOptions {
            resource_version: Some("1".into()),
            ..Default::default()
        };
        assert!(matches!(
            s.delete_with(Kind::DataVolume, "default", "a", &stale_rv),
            Err(StoreError::Precondition(_))
        ));
        let orphan = DeleteOptions {
            propagation: Propagation::Orphan,
            uid: Some(uid),
            ..Default::default()
        };
        assert!(matches!(
            s.delete_with(Kind::DataVolume, "default", "a", &orphan)
                .unwrap(),
            Some(Deletion::Removed(_))
        ));
        let pvc = s
            .get(Kind::PersistentVolumeClaim, "default", "a")
            .unwrap()
            .unwrap();
        assert!(pvc["metadata"]["ownerReferences"].is_null());
    }

    #[test]
    fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        SqliteStore::open(&path)
            .unwrap()
            .create(Kind::DataVolume, dv("a"))
            .unwrap();
        let s = SqliteStore::open(&path).unwrap();
        assert!(s.get(Kind::DataVolume, "default", "a").unwrap().is_some());
        assert_eq!(s.resource_version().unwrap(), 2);
    }

    #[tokio::test]
    async fn async_store_runs_calls_off_the_runtime() {
        let s = AsyncStore::new(Arc::new(store()));
        s.run(|s| s.create(Kind::DataVolume, dv("a")))
            .await
            .unwrap();
        let got = s
            .run(|s| s.get(Kind::DataVolume, "default", "a"))
            .await
            .unwrap();
        assert!(got.is_some());
    }
}
