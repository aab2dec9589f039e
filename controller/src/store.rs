//! The object store: Kubernetes-shaped JSON objects with resource versions and a change feed.
//!
//! [`Store`] is the seam a Kubernetes backend replaces (it would be the apiserver); the
//! embedded control plane uses [`SqliteStore`], one SQLite database in WAL mode under the data
//! directory, so a crash loses nothing that was acknowledged.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::util::{new_uid, now_rfc3339};

/// Capacity of the change feed; a watcher that falls further behind re-lists.
const WATCH_BUFFER: usize = 1024;

/// The resource kinds the control plane serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 8] = [
        Kind::DataVolume,
        Kind::PersistentVolumeClaim,
        Kind::StorageClass,
        Kind::StorageProfile,
        Kind::CdiConfig,
        Kind::Event,
        Kind::Secret,
        Kind::ConfigMap,
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
        }
    }

    /// Kind from its URL plural.
    pub fn from_plural(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.plural() == s)
    }

    /// Whether objects live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(
            self,
            Kind::StorageClass | Kind::StorageProfile | Kind::CdiConfig
        )
    }

    /// API group (`""` for core).
    pub fn group(self) -> &'static str {
        match self {
            Kind::DataVolume | Kind::StorageProfile | Kind::CdiConfig => "cdi.kubevirt.io",
            Kind::StorageClass => "storage.k8s.io",
            _ => "",
        }
    }

    /// `apiVersion` objects are stored and served with.
    pub fn api_version(self) -> &'static str {
        match self.group() {
            "cdi.kubevirt.io" => "cdi.kubevirt.io/v1beta1",
            "storage.k8s.io" => "storage.k8s.io/v1",
            _ => "v1",
        }
    }
}

/// One change of the store.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// Kind of the object.
    pub kind: Kind,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub event_type: &'static str,
    /// The object after the change (before it, for deletions).
    pub object: Value,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Optimistic concurrency check failed.
    #[error(
        "the object has been modified; please apply your changes to the latest version and try again"
    )]
    Conflict,
    /// The database failed.
    #[error("database error")]
    Db(#[from] rusqlite::Error),
    /// Create of an existing object.
    #[error("already exists")]
    AlreadyExists,
    /// An object without a usable name.
    #[error("invalid object: {0}")]
    Invalid(&'static str),
    /// Update of a missing object.
    #[error("not found")]
    NotFound,
    /// A stored body failed to parse.
    #[error("corrupt stored object")]
    Json(#[from] serde_json::Error),
}

/// Storage of API objects. Namespace is `""` for cluster-scoped kinds.
pub trait Store: Send + Sync {
    /// One object.
    fn get(&self, kind: Kind, ns: &str, name: &str) -> Result<Option<Value>, StoreError>;
    /// All objects of a kind, in one namespace or (None) all.
    fn list(&self, kind: Kind, ns: Option<&str>) -> Result<Vec<Value>, StoreError>;
    /// Create; assigns uid, resourceVersion and creationTimestamp.
    fn create(&self, kind: Kind, obj: Value) -> Result<Value, StoreError>;
    /// Replace; if `metadata.resourceVersion` is set it must match the stored one.
    fn update(&self, kind: Kind, obj: Value) -> Result<Value, StoreError>;
    /// Delete; returns the deleted object.
    fn delete(&self, kind: Kind, ns: &str, name: &str) -> Result<Option<Value>, StoreError>;
    /// Current resource version of the whole store.
    fn resource_version(&self) -> Result<u64, StoreError>;
    /// Subscribe to changes made after this call.
    fn watch(&self) -> broadcast::Receiver<WatchEvent>;
}

/// [`Store`] on SQLite.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    feed: broadcast::Sender<WatchEvent>,
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
        let (feed, _) = broadcast::channel(WATCH_BUFFER);
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            feed,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (it has its own
        // transactions), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self, kind: Kind, event_type: &'static str, object: &Value) {
        // No subscribers is fine.
        let _ = self.feed.send(WatchEvent {
            kind,
            event_type,
            object: object.clone(),
        });
    }
}

fn next_rv(tx: &rusqlite::Transaction<'_>) -> Result<u64, StoreError> {
    tx.execute("UPDATE seq SET rv = rv + 1 WHERE id = 1", [])?;
    let rv: i64 = tx.query_row("SELECT rv FROM seq WHERE id = 1", [], |r| r.get(0))?;
    Ok(rv as u64)
}

/// `(namespace, name)` of an object of `kind`.
pub fn key_of(kind: Kind, obj: &Value) -> Result<(String, String), StoreError> {
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if name.is_empty() {
        return Err(StoreError::Invalid("metadata.name is required"));
    }
    let ns = if kind.namespaced() {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if ns.is_empty() {
            return Err(StoreError::Invalid("metadata.namespace is required"));
        }
        ns
    } else {
        String::new()
    };
    Ok((ns, name))
}

impl Store for SqliteStore {
    fn get(&self, kind: Kind, ns: &str, name: &str) -> Result<Option<Value>, StoreError> {
        let conn = self.lock();
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

    fn list(&self, kind: Kind, ns: Option<&str>) -> Result<Vec<Value>, StoreError> {
        let conn = self.lock();
        let mut out = Vec::new();
        let mut stmt = conn.prepare(
            "SELECT body FROM objects WHERE kind = ?1 AND (?2 IS NULL OR namespace = ?2)
             ORDER BY namespace, name",
        )?;
        let rows = stmt.query_map(params![kind.name(), ns], |r| r.get::<_, String>(0))?;
        for row in rows {
            out.push(serde_json::from_str(&row?)?);
        }
        Ok(out)
    }

    fn create(&self, kind: Kind, mut obj: Value) -> Result<Value, StoreError> {
        let (ns, name) = key_of(kind, &obj)?;
        {
            let mut conn = self.lock();
            let tx = conn.transaction()?;
            let exists: Option<i64> = tx
                .query_row(
                    "SELECT rv FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                    params![kind.name(), ns, name],
                    |r| r.get(0),
                )
                .optional()?;
            if exists.is_some() {
                return Err(StoreError::AlreadyExists);
            }
            let rv = next_rv(&tx)?;
            obj["apiVersion"] = json!(kind.api_version());
            obj["kind"] = json!(kind.name());
            let meta = &mut obj["metadata"];
            meta["uid"] = json!(new_uid());
            meta["resourceVersion"] = json!(rv.to_string());
            meta["creationTimestamp"] = json!(now_rfc3339());
            tx.execute(
                "INSERT INTO objects (kind, namespace, name, rv, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![kind.name(), ns, name, rv as i64, obj.to_string()],
            )?;
            tx.commit()?;
        }
        self.notify(kind, "ADDED", &obj);
        Ok(obj)
    }

    fn update(&self, kind: Kind, mut obj: Value) -> Result<Value, StoreError> {
        let (ns, name) = key_of(kind, &obj)?;
        {
            let mut conn = self.lock();
            let tx = conn.transaction()?;
            let stored: Option<String> = tx
                .query_row(
                    "SELECT body FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                    params![kind.name(), ns, name],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(stored) = stored else {
                return Err(StoreError::NotFound);
            };
            let stored: Value = serde_json::from_str(&stored)?;
            let want = obj["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            if !want.is_empty() && want != stored["metadata"]["resourceVersion"] {
                return Err(StoreError::Conflict);
            }
            let rv = next_rv(&tx)?;
            obj["apiVersion"] = json!(kind.api_version());
            obj["kind"] = json!(kind.name());
            let meta = &mut obj["metadata"];
            meta["uid"] = stored["metadata"]["uid"].clone();
            meta["creationTimestamp"] = stored["metadata"]["creationTimestamp"].clone();
            meta["resourceVersion"] = json!(rv.to_string());
            tx.execute(
                "UPDATE objects SET rv = ?4, body = ?5 WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                params![kind.name(), ns, name, rv as i64, obj.to_string()],
            )?;
            tx.commit()?;
        }
        self.notify(kind, "MODIFIED", &obj);
        Ok(obj)
    }

    fn delete(&self, kind: Kind, ns: &str, name: &str) -> Result<Option<Value>, StoreError> {
        let obj = {
            let mut conn = self.lock();
            let tx = conn.transaction()?;
            let stored: Option<String> = tx
                .query_row(
                    "SELECT body FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                    params![kind.name(), ns, name],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(stored) = stored else {
                return Ok(None);
            };
            next_rv(&tx)?;
            tx.execute(
                "DELETE FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                params![kind.name(), ns, name],
            )?;
            tx.commit()?;
            serde_json::from_str::<Value>(&stored)?
        };
        self.notify(kind, "DELETED", &obj);
        Ok(Some(obj))
    }

    fn resource_version(&self) -> Result<u64, StoreError> {
        let conn = self.lock();
        let rv: i64 = conn.query_row("SELECT rv FROM seq WHERE id = 1", [], |r| r.get(0))?;
        Ok(rv as u64)
    }

    fn watch(&self) -> broadcast::Receiver<WatchEvent> {
        self.feed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dv(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "default"}, "spec": {}})
    }

    #[test]
    fn create_assigns_identity_and_rejects_duplicates() {
        let s = SqliteStore::in_memory().unwrap();
        let o = s.create(Kind::DataVolume, dv("a")).unwrap();
        assert_eq!(o["metadata"]["resourceVersion"], "1");
        assert_eq!(o["kind"], "DataVolume");
        assert!(matches!(
            s.create(Kind::DataVolume, dv("a")),
            Err(StoreError::AlreadyExists)
        ));
    }

    #[test]
    fn stale_resource_version_conflicts() {
        let s = SqliteStore::in_memory().unwrap();
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
    fn watch_sees_changes_and_delete_returns_object() {
        let s = SqliteStore::in_memory().unwrap();
        let mut rx = s.watch();
        s.create(Kind::DataVolume, dv("a")).unwrap();
        assert_eq!(rx.try_recv().unwrap().event_type, "ADDED");
        assert!(
            s.delete(Kind::DataVolume, "default", "a")
                .unwrap()
                .is_some()
        );
        assert_eq!(rx.try_recv().unwrap().event_type, "DELETED");
        assert!(s.get(Kind::DataVolume, "default", "a").unwrap().is_none());
        assert_eq!(s.list(Kind::DataVolume, None).unwrap().len(), 0);
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
        assert_eq!(s.resource_version().unwrap(), 1);
    }
}
