//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic merge patch and
//! a simplified server-side apply.
//!
//! Strategic merge patch is what kubectl's client-side `apply`, `patch` and `edit` send for
//! built-in kinds. It is a merge patch except that some lists are merged item by item, keyed by
//! a field (`containers` by `name`, `conditions` by `type`, `ownerReferences` by `uid`, …), and
//! that it carries directives: `$patch: replace|delete|merge` on maps and list items,
//! `$retainKeys`, `$deleteFromPrimitiveList/<list>` and `$setElementOrder/<list>` (ordering
//! hints, applied when present). Which lists are keyed comes from the field name
//! ([`merge_key`]), a table of the Kubernetes types' `patchMergeKey` tags for the kinds served
//! here; every other list is replaced, as in a merge patch.
//!
//! Server-side apply is simplified: the applied object is merged into the stored one with the
//! strategic rules (no managed fields, no conflicts between field managers).

use serde_json::{Map, Value};

/// The patch types the API accepts, by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/json-patch+json`.
    Json,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/apply-patch+yaml` (server-side apply).
    Apply,
}

impl PatchType {
    /// The patch type of a `Content-Type` header value (parameters ignored).
    pub fn from_content_type(ct: &str) -> Option<PatchType> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/json-patch+json" => Some(PatchType::Json),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }

    /// Every accepted `Content-Type`, for error messages and discovery.
    pub const CONTENT_TYPES: [&'static str; 4] = [
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/apply-patch+yaml",
    ];
}

/// A patch that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The body is not the JSON (or YAML) the patch type needs.
    #[error("the patch body does not parse: {0}")]
    Parse(String),
    /// A JSON patch operation failed (a `test` that does not hold, a missing path, …).
    #[error("the JSON patch failed: {0}")]
    Json(#[from] json_patch::PatchError),
    /// A strategic-merge directive that cannot be honoured.
    #[error("invalid strategic merge patch: {0}")]
    Strategic(String),
}

/// RFC 7386: `null` deletes, objects merge recursively, everything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// RFC 6902 on `target` (unchanged when any operation fails).
///
/// As in the Kubernetes API server, `test` for `null` succeeds on a path that does not exist:
/// clients (kube-runtime's finalizer helper among them) write "test /metadata/finalizers is
/// null, then add it" to create a list only when nobody else did.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let ops: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| PatchError::Parse(e.to_string()))?;
    let mut work = target.clone();
    for op in ops.0 {
        if let json_patch::PatchOperation::Test(t) = &op
            && t.value.is_null()
            && work.pointer(t.path.as_str()).is_none()
        {
            continue;
        }
        json_patch::patch(&mut work, &[op])?;
    }
    *target = work;
    Ok(())
}

/// The key lists under `field` are merged by in a strategic merge patch (the `patchMergeKey`
/// of the Kubernetes types), or `None` when such lists are replaced.
pub fn merge_key(field: &str, items: &[&Value]) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets" => "name",
        "hostAliases" => "ip",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        // Container ports are keyed by containerPort, Service ports by port.
        "ports" => {
            if items.iter().any(|i| i.get("containerPort").is_some()) {
                "containerPort"
            } else {
                "port"
            }
        }
        "conditions" => "type",
        "ownerReferences" => "uid",
        _ => return None,
    })
}

/// Lists of scalars a strategic merge patch unions instead of replacing.
fn is_merged_primitive_list(field: &str) -> bool {
    field == "finalizers"
}

const DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const DELETE_FROM_PRIMITIVE: &str = "$deleteFromPrimitiveList/";
const SET_ELEMENT_ORDER: &str = "$setElementOrder/";

/// Apply a strategic merge patch to `target`.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    match patch {
        Value::Object(p) => {
            merge_map(target, p)?;
            Ok(())
        }
        _ => Err(PatchError::Strategic(
            "the patch must be a JSON object".into(),
        )),
    }
}

fn merge_map(target: &mut Value, patch: &Map<String, Value>) -> Result<(), PatchError> {
    match patch.get(DIRECTIVE).and_then(Value::as_str) {
        Some("replace") => {
            let mut p = patch.clone();
            p.remove(DIRECTIVE);
            *target = Value::Object(p);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(PatchError::Strategic(format!(
                "unknown $patch directive {other:?}"
            )));
        }
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(t) = target.as_object_mut() else {
        return Ok(());
    };
    if let Some(keep) = patch.get(RETAIN_KEYS).and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, pv) in patch {
        if k == DIRECTIVE || k == RETAIN_KEYS || k.starts_with(SET_ELEMENT_ORDER) {
            continue;
        }
        if let Some(list) = k.strip_prefix(DELETE_FROM_PRIMITIVE) {
            if let (Some(Value::Array(items)), Some(gone)) = (t.get_mut(list), pv.as_array()) {
                items.retain(|i| !gone.contains(i));
            }
            continue;
        }
        match pv {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(pm) => {
                let entry = t.entry(k.clone()).or_insert(Value::Null);
                merge_map(entry, pm)?;
                if entry.is_null() {
                    t.remove(k);
                }
            }
            Value::Array(pl) => {
                let merged = merge_list(k, t.get(k), pl)?;
                t.insert(k.clone(), merged);
            }
            other => {
                t.insert(k.clone(), other.clone());
            }
        }
    }
    // Ordering hints: keyed items listed in `$setElementOrder/<list>` come in that order.
    for (k, pv) in patch {
        let Some(list) = k.strip_prefix(SET_ELEMENT_ORDER) else {
            continue;
        };
        if let (Some(Value::Array(items)), Some(order)) = (t.get_mut(list), pv.as_array()) {
            reorder(list, items, order);
        }
    }
    Ok(())
}

fn reorder(field: &str, items: &mut [Value], order: &[Value]) {
    let refs: Vec<&Value> = order.iter().collect();
    let position = |item: &Value| -> usize {
        let found = match merge_key(field, &refs) {
            Some(key) => order.iter().position(|o| o.get(key) == item.get(key)),
            None => order.iter().position(|o| o == item),
        };
        found.unwrap_or(usize::MAX)
    };
    // Stable: items not named in the order keep their relative place at the end.
    items.sort_by_key(|i| position(i));
}

fn merge_list(field: &str, current: Option<&Value>, patch: &[Value]) -> Result<Value, PatchError> {
    let cur: Vec<Value> = current
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // `[{"$patch": "replace"}, …items]` replaces the list with the other items.
    if patch
        .iter()
        .any(|i| i.get(DIRECTIVE).and_then(Value::as_str) == Some("replace"))
    {
        return Ok(Value::Array(
            patch
                .iter()
                .filter(|i| i.get(DIRECTIVE).is_none())
                .cloned()
                .collect(),
        ));
    }
    if is_merged_primitive_list(field) {
        let mut out = cur;
        for p in patch {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
        return Ok(Value::Array(out));
    }
    let all: Vec<&Value> = cur.iter().chain(patch.iter()).collect();
    let Some(key) = merge_key(field, &all) else {
        return Ok(Value::Array(patch.to_vec()));
    };
    if !patch.iter().all(Value::is_object) {
        return Ok(Value::Array(patch.to_vec()));
    }
    let mut out = cur;
    for p in patch {
        let Some(id) = p.get(key) else {
            return Err(PatchError::Strategic(format!(
                "an item of {field} has no merge key {key:?}"
            )));
        };
        let pos = out.iter().position(|c| c.get(key) == Some(id));
        let delete = p.get(DIRECTIVE).and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                out.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => {
                if let Some(pm) = p.as_object() {
                    merge_map(&mut out[i], pm)?;
                }
            }
            (None, false) => {
                let mut item = Value::Null;
                if let Some(pm) = p.as_object() {
                    merge_map(&mut item, pm)?;
                }
                out.push(item);
            }
        }
    }
    Ok(Value::Array(out))
}

/// Simplified server-side apply: merge the applied configuration into the stored object
/// (strategic rules; fields the applied object does not mention are kept).
pub fn apply(target: &mut Value, applied: &Value) -> Result<(), PatchError> {
    strategic_merge(target, applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_types_map_to_patch_types() {
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchType::Merge)
        );
        assert_eq!(
            PatchType::from_content_type("application/strategic-merge-patch+json"),
            Some(PatchType::Strategic)
        );
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml"),
            Some(PatchType::Apply)
        );
        assert_eq!(PatchType::from_content_type("application/json"), None);
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        // The RFC's own example.
        let mut t = json!({"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"},
                           "tags": ["example", "sample"], "content": "This will be unchanged"});
        merge_patch(
            &mut t,
            &json!({"title": "Hello!", "phoneNumber": "+01-555-555-5555",
                    "author": {"familyName": null}, "tags": ["example"]}),
        );
        assert_eq!(
            t,
            json!({"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"],
                   "content": "This will be unchanged", "phoneNumber": "+01-555-555-5555"})
        );
    }

    #[test]
    fn json_patch_applies_and_fails_atomically() {
        let mut t = json!({"data": {"a": "1"}, "list": [1, 2]});
        json_patch(
            &mut t,
            &json!([{"op": "replace", "path": "/data/a", "value": "2"},
                    {"op": "add", "path": "/list/-", "value": 3},
                    {"op": "remove", "path": "/list/0"}]),
        )
        .unwrap();
        assert_eq!(t, json!({"data": {"a": "2"}, "list": [2, 3]}));
        let before = t.clone();
        let err = json_patch(
            &mut t,
            &json!([{"op": "add", "path": "/data/b", "value": "x"},
                    {"op": "test", "path": "/data/a", "value": "nope"}]),
        );
        assert!(err.is_err());
        assert_eq!(t, before);
        assert!(json_patch(&mut t, &json!({"op": "add"})).is_err());
        // kube-runtime's finalizer helper: test-null-then-add on a missing list.
        let add = json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
                         {"op": "add", "path": "/metadata/finalizers", "value": ["f"]}]);
        let mut o = json!({"metadata": {"name": "x"}});
        json_patch(&mut o, &add).unwrap();
        assert_eq!(o["metadata"]["finalizers"], json!(["f"]));
        // ... and it fails once the list exists, leaving the object alone.
        let before = o.clone();
        assert!(json_patch(&mut o, &add).is_err());
        assert_eq!(o, before);
    }

    #[test]
    fn strategic_merge_merges_named_lists_by_key() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
            {"name": "b", "image": "y"}]}});
        strategic_merge(
            &mut pod,
            &json!({"spec": {"containers": [
                {"name": "a", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]},
                {"name": "b", "$patch": "delete"},
                {"name": "c", "image": "z"}]}}),
        )
        .unwrap();
        assert_eq!(
            pod,
            json!({"spec": {"containers": [
                {"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}]},
                {"name": "c", "image": "z"}]}})
        );
    }

    #[test]
    fn strategic_merge_keys_conditions_owners_and_ports() {
        let mut o = json!({"metadata": {"ownerReferences": [{"uid": "1", "name": "a"}], "finalizers": ["x"]},
                           "status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "Bound", "status": "True"}]},
                           "spec": {"ports": [{"port": 80, "name": "http"}]}});
        strategic_merge(
            &mut o,
            &json!({"metadata": {"ownerReferences": [{"uid": "2", "name": "b"}], "finalizers": ["y"]},
                    "status": {"conditions": [{"type": "Ready", "status": "True"}]},
                    "spec": {"ports": [{"port": 443, "name": "https"}]}}),
        )
        .unwrap();
        assert_eq!(
            o["metadata"]["ownerReferences"].as_array().unwrap().len(),
            2
        );
        assert_eq!(o["metadata"]["finalizers"], json!(["x", "y"]));
        assert_eq!(
            o["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}, {"type": "Bound", "status": "True"}])
        );
        assert_eq!(o["spec"]["ports"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn strategic_merge_replaces_unkeyed_lists_and_honours_directives() {
        let mut o = json!({"spec": {"accessModes": ["ReadWriteOnce"], "m": {"a": 1, "b": 2}},
                           "metadata": {"finalizers": ["x", "y"], "labels": {"a": "1"}}});
        strategic_merge(
            &mut o,
            &json!({"spec": {"accessModes": ["ReadWriteMany"], "m": {"$patch": "replace", "c": 3}},
                    "metadata": {"$deleteFromPrimitiveList/finalizers": ["x"], "labels": {"a": null}}}),
        )
        .unwrap();
        assert_eq!(
            o,
            json!({"spec": {"accessModes": ["ReadWriteMany"], "m": {"c": 3}},
                   "metadata": {"finalizers": ["y"], "labels": {}}})
        );
        let mut o = json!({"spec": {"strategy": {"type": "A", "rollingUpdate": {"x": 1}}}});
        strategic_merge(
            &mut o,
            &json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}),
        )
        .unwrap();
        assert_eq!(o, json!({"spec": {"strategy": {"type": "Recreate"}}}));
        assert!(strategic_merge(&mut o, &json!({"spec": {"$patch": "explode"}})).is_err());
        assert!(strategic_merge(&mut o, &json!([1])).is_err());
    }

    #[test]
    fn strategic_merge_applies_element_order_hints() {
        // What kubectl's three-way patch sends when an env var is added in the middle.
        let mut o = json!({"env": [{"name": "A", "value": "1"}, {"name": "C", "value": "3"}]});
        strategic_merge(
            &mut o,
            &json!({"$setElementOrder/env": [{"name": "A"}, {"name": "B"}, {"name": "C"}],
                    "env": [{"name": "B", "value": "2"}]}),
        )
        .unwrap();
        let names: Vec<&str> = o["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["A", "B", "C"]);
    }

    #[test]
    fn apply_keeps_fields_the_applied_object_does_not_mention() {
        let mut stored = json!({"metadata": {"name": "c", "uid": "u", "labels": {"a": "1"}},
                                "data": {"x": "1", "y": "2"}});
        apply(
            &mut stored,
            &json!({"metadata": {"name": "c", "labels": {"b": "2"}}, "data": {"x": "9"}}),
        )
        .unwrap();
        assert_eq!(
            stored,
            json!({"metadata": {"name": "c", "uid": "u", "labels": {"a": "1", "b": "2"}},
                   "data": {"x": "9", "y": "2"}})
        );
    }
}
