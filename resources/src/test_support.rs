//! Helpers for the manifest tests: YAML to JSON as an API server would see it, and the
//! round-trip comparison.

use serde::Serialize;
use serde_json::Value;

/// Parses one YAML document into JSON, the way `kubectl` sends it.
pub fn yaml_to_json(yaml: &str) -> Value {
    serde_saphyr::from_str(yaml).expect("test manifest is valid YAML")
}

/// Removes `null` members recursively: an explicit `null` and an absent field mean the same to
/// the API (`creationTimestamp: null`, an empty `source:`), and the types serialize neither.
pub fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Removes the member at a JSON pointer, which must exist.
pub fn remove_pointer(value: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
    let removed = value
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .and_then(|map| map.remove(key));
    assert!(removed.is_some(), "{pointer} is not in the manifest");
}

/// Asserts that `typed` serializes to `original`, less `pruned` (fields the docs misplaced,
/// which the types do not have and an API server would prune) and less `null`s.
pub fn assert_round_trip<T: Serialize>(original: &Value, typed: &T, pruned: &[&str]) {
    let mut expected = original.clone();
    for pointer in pruned {
        remove_pointer(&mut expected, pointer);
    }
    strip_nulls(&mut expected);
    let actual = serde_json::to_value(typed).expect("typed value serializes");
    assert_eq!(
        actual, expected,
        "round trip changed the manifest:\nactual:   {actual}\nexpected: {expected}"
    );
}
