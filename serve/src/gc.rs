//! The garbage collector: owner references and namespaces, as kube-controller-manager's
//! garbage-collector and namespace controllers handle them.
//!
//! A pass takes one consistent snapshot of the store and deletes
//!
//! * every object all of whose `metadata.ownerReferences` name uids that no longer exist
//!   (owners of kinds this server does not serve are never presumed gone, as Kubernetes cannot
//!   look them up either); an object that still has one live owner stays;
//! * every namespaced object whose Namespace is gone (namespace deletion).
//!
//! Deletes go through [`Store::delete_with`] with the snapshot's uid and resource version as
//! preconditions, so an object changed since the snapshot is left for the next pass, and
//! dependents with finalizers are only marked. Each removal is a change the collector sees, so
//! chains of owners are collected transitively, pass after pass. Passes run when something is
//! deleted, and every [`RESYNC_INTERVAL`] in case the change feed lagged.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::store::{DeleteOptions, Kind, Store, StoreError};

/// Full pass interval when nothing was deleted; catches removals a lagging feed dropped.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(60);

/// Delay after a deletion before the pass: coalesces the burst of a cascading delete.
const SETTLE: Duration = Duration::from_millis(50);

/// Whether an owner reference points at a kind served here (else its owner cannot be looked
/// up, and is presumed to exist).
fn served_owner(r: &Value) -> bool {
    let (group, _) = r["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .rsplit_once('/')
        .unwrap_or(("", ""));
    r["kind"]
        .as_str()
        .and_then(Kind::from_name)
        .is_some_and(|k| k.group() == group)
}

/// An object a pass deletes, with the uid and resource version it had in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Garbage {
    /// Kind.
    pub kind: Kind,
    /// Namespace (`""` for cluster kinds).
    pub ns: String,
    /// Name.
    pub name: String,
    /// uid in the snapshot.
    pub uid: String,
    /// resourceVersion in the snapshot.
    pub rv: String,
}

/// What one pass would delete, from a snapshot.
pub fn garbage(objects: &[(Kind, Value)]) -> Vec<Garbage> {
    let uids: HashSet<&str> = objects
        .iter()
        .filter_map(|(_, o)| o["metadata"]["uid"].as_str())
        .collect();
    let namespaces: HashSet<&str> = objects
        .iter()
        .filter(|(k, _)| *k == Kind::Namespace)
        .filter_map(|(_, o)| o["metadata"]["name"].as_str())
        .collect();
    let mut out = Vec::new();
    for (kind, o) in objects {
        let meta = &o["metadata"];
        if !meta["deletionTimestamp"].is_null() {
            continue;
        }
        let orphaned_namespace = kind.namespaced()
            && meta["namespace"]
                .as_str()
                .is_some_and(|ns| !namespaces.contains(ns));
        let owners_gone = meta["ownerReferences"].as_array().is_some_and(|refs| {
            !refs.is_empty()
                && refs.iter().all(|r| {
                    served_owner(r) && !r["uid"].as_str().is_some_and(|u| uids.contains(u))
                })
        });
        if orphaned_namespace || owners_gone {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            out.push(Garbage {
                kind: *kind,
                ns: s(&meta["namespace"]),
                name: s(&meta["name"]),
                uid: s(&meta["uid"]),
                rv: s(&meta["resourceVersion"]),
            });
        }
    }
    out
}

/// One pass; returns how many objects it deleted or marked.
pub fn collect(store: &dyn Store) -> Result<usize, StoreError> {
    let (objects, _) = store.list_all()?;
    let mut n = 0;
    for Garbage {
        kind,
        ns,
        name,
        uid,
        rv,
    } in garbage(&objects)
    {
        let opts = DeleteOptions {
            uid: Some(uid),
            resource_version: Some(rv),
            ..Default::default()
        };
        match store.delete_with(kind, &ns, &name, &opts) {
            Ok(Some(_)) => {
                tracing::info!(kind = kind.name(), namespace = %ns, name = %name, "garbage collected");
                n += 1;
            }
            // Gone or changed since the snapshot: the next pass decides again.
            Ok(None) | Err(StoreError::Precondition(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Run the collector forever: a pass at start, after deletions and every [`RESYNC_INTERVAL`].
pub async fn run(store: Arc<dyn Store>) {
    let mut rx = store.watch();
    loop {
        let s = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || collect(s.as_ref())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "garbage collection failed"),
            Err(e) => tracing::warn!(error = %e, "garbage collection task failed"),
        }
        let deadline = tokio::time::Instant::now() + RESYNC_INTERVAL;
        loop {
            use tokio::sync::broadcast::error::RecvError;
            let ev = tokio::select! {
                ev = rx.recv() => Some(ev),
                _ = tokio::time::sleep_until(deadline) => None,
            };
            match ev {
                Some(Ok(ev)) if ev.event_type != "DELETED" => continue,
                // A deletion, the resync time, or a lag that may have dropped deletions.
                Some(Ok(_)) | Some(Err(RecvError::Lagged(_))) | None => break,
                Some(Err(RecvError::Closed)) => return,
            }
        }
        tokio::time::sleep(SETTLE).await;
        // The pass about to run covers everything already queued.
        while rx.try_recv().is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;
    use serde_json::json;

    fn owned(kind: &str, name: &str, owner: &Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "default", "ownerReferences": [{
            "apiVersion": owner["apiVersion"], "kind": owner["kind"],
            "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]}]}, "kind": kind})
    }

    #[test]
    fn dependents_are_collected_transitively() {
        let s = SqliteStore::in_memory().unwrap();
        let dv = s
            .create(
                Kind::DataVolume,
                json!({"metadata": {"name": "dv", "namespace": "default"}, "spec": {}}),
            )
            .unwrap();
        let pvc = s
            .create(
                Kind::PersistentVolumeClaim,
                owned("PersistentVolumeClaim", "dv", &dv),
            )
            .unwrap();
        let pod = s.create(Kind::Pod, owned("Pod", "importer", &pvc)).unwrap();
        let mut held = owned("ConfigMap", "held", &pod);
        held["metadata"]["finalizers"] = json!(["example.com/keep"]);
        s.create(Kind::ConfigMap, held).unwrap();
        assert_eq!(
            collect(&s).unwrap(),
            0,
            "nothing to collect while owners live"
        );
        s.delete(Kind::DataVolume, "default", "dv").unwrap();
        assert_eq!(collect(&s).unwrap(), 1);
        assert!(
            s.get(Kind::PersistentVolumeClaim, "default", "dv")
                .unwrap()
                .is_none()
        );
        assert_eq!(collect(&s).unwrap(), 1);
        assert!(s.get(Kind::Pod, "default", "importer").unwrap().is_none());
        // A dependent with finalizers is marked, not removed, and not marked twice.
        assert_eq!(collect(&s).unwrap(), 1);
        let held = s.get(Kind::ConfigMap, "default", "held").unwrap().unwrap();
        assert!(held["metadata"]["deletionTimestamp"].is_string());
        assert_eq!(collect(&s).unwrap(), 0);
    }

    #[test]
    fn live_or_unknown_owners_keep_dependents() {
        let s = SqliteStore::in_memory().unwrap();
        let a = s
            .create(
                Kind::ConfigMap,
                json!({"metadata": {"name": "a", "namespace": "default"}}),
            )
            .unwrap();
        let b = s
            .create(
                Kind::ConfigMap,
                json!({"metadata": {"name": "b", "namespace": "default"}}),
            )
            .unwrap();
        let mut two = owned("Secret", "two", &a);
        two["metadata"]["ownerReferences"]
            .as_array_mut()
            .unwrap()
            .push(json!({"apiVersion": "v1", "kind": "ConfigMap", "name": "b", "uid": b["metadata"]["uid"]}));
        s.create(Kind::Secret, two).unwrap();
        let vm = json!({"metadata": {"name": "vm-disk", "namespace": "default", "ownerReferences": [
            {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "vm", "uid": "not-here"}]}});
        s.create(Kind::Secret, vm).unwrap();
        s.delete(Kind::ConfigMap, "default", "a").unwrap();
        assert_eq!(collect(&s).unwrap(), 0);
        assert!(s.get(Kind::Secret, "default", "two").unwrap().is_some());
        assert!(s.get(Kind::Secret, "default", "vm-disk").unwrap().is_some());
        s.delete(Kind::ConfigMap, "default", "b").unwrap();
        assert_eq!(collect(&s).unwrap(), 1);
        assert!(s.get(Kind::Secret, "default", "two").unwrap().is_none());
    }

    #[test]
    fn deleting_a_namespace_deletes_its_objects() {
        let s = SqliteStore::in_memory().unwrap();
        s.create(
            Kind::ConfigMap,
            json!({"metadata": {"name": "a", "namespace": "team"}}),
        )
        .unwrap();
        s.create(
            Kind::ConfigMap,
            json!({"metadata": {"name": "a", "namespace": "default"}}),
        )
        .unwrap();
        s.delete(Kind::Namespace, "", "team").unwrap();
        assert_eq!(collect(&s).unwrap(), 1);
        assert!(s.get(Kind::ConfigMap, "team", "a").unwrap().is_none());
        assert!(s.get(Kind::ConfigMap, "default", "a").unwrap().is_some());
    }

    #[tokio::test]
    async fn the_task_collects_after_a_deletion() {
        let s: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
        let owner = s
            .create(
                Kind::ConfigMap,
                json!({"metadata": {"name": "o", "namespace": "default"}}),
            )
            .unwrap();
        s.create(Kind::Secret, owned("Secret", "d", &owner))
            .unwrap();
        let task = tokio::spawn(run(Arc::clone(&s)));
        s.delete(Kind::ConfigMap, "default", "o").unwrap();
        let mut gone = false;
        for _ in 0..100 {
            if s.get(Kind::Secret, "default", "d").unwrap().is_none() {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        assert!(gone, "the dependent was collected");
    }
}
