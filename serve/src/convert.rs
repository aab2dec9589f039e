//! Version conversion: one stored object, presented in the version a request names.
//!
//! Most kinds are served in versions of the same shape (DataVolume `v1beta1` and `v1alpha1`):
//! only `apiVersion` changes. Events are also served as `events.k8s.io/v1`, the API
//! kube-runtime's event recorder writes; its fields are renamed from core/v1's as Kubernetes
//! converts them (`regarding` is `involvedObject`, `note` is `message`, the `deprecated*`
//! fields are core's `source`, `firstTimestamp`, `lastTimestamp` and `count`,
//! `reportingController` is `reportingComponent`).

use serde_json::{Value, json};

use crate::store::Kind;

/// The `events.k8s.io/v1` group version.
pub const EVENTS_V1: &str = "events.k8s.io/v1";

/// `(events.k8s.io/v1 field, core/v1 field)`.
const EVENT_FIELDS: [(&str, &str); 6] = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];
const REPORTING: (&str, &str) = ("reportingController", "reportingComponent");

fn rename(obj: &mut Value, pairs: impl Iterator<Item = (&'static str, &'static str)>) {
    let Some(m) = obj.as_object_mut() else {
        return;
    };
    for (from, to) in pairs {
        if let Some(v) = m.remove(from) {
            m.insert(to.to_string(), v);
        }
    }
}

/// A stored object as `api_version` presents it.
pub fn present(kind: Kind, api_version: &str, obj: &Value) -> Value {
    let mut o = obj.clone();
    if kind == Kind::Event && api_version == EVENTS_V1 {
        rename(
            &mut o,
            EVENT_FIELDS
                .into_iter()
                .chain([REPORTING])
                .map(|(v1, core)| (core, v1)),
        );
    }
    o["apiVersion"] = json!(api_version);
    o
}

/// An incoming object in `api_version` as it is stored.
pub fn accept(kind: Kind, api_version: &str, obj: Value) -> Value {
    let mut o = obj;
    if kind == Kind::Event && api_version == EVENTS_V1 {
        if o["apiVersion"] == EVENTS_V1 {
            o["apiVersion"] = json!(kind.api_version());
        }
        rename(&mut o, EVENT_FIELDS.into_iter().chain([REPORTING]));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_between_versions() {
        let v1 = json!({"apiVersion": EVENTS_V1, "kind": "Event",
            "metadata": {"generateName": "dv-", "namespace": "default"},
            "regarding": {"kind": "DataVolume", "name": "dv"}, "note": "Import done", "reason": "Done",
            "type": "Normal", "action": "Import", "reportingController": "cdi", "reportingInstance": "cdi-0",
            "eventTime": "2026-01-01T00:00:00.000000Z", "series": {"count": 2, "lastObservedTime": "2026-01-01T00:01:00.000000Z"}});
        let core = accept(Kind::Event, EVENTS_V1, v1.clone());
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "dv");
        assert_eq!(core["message"], "Import done");
        assert_eq!(core["reportingComponent"], "cdi");
        assert!(core["note"].is_null() && core["regarding"].is_null());
        assert_eq!(core["series"]["count"], 2);
        assert_eq!(present(Kind::Event, EVENTS_V1, &core), v1);
        // The core version is left as it is.
        assert_eq!(present(Kind::Event, "v1", &core), core);
    }

    #[test]
    fn same_shape_versions_change_only_api_version() {
        let dv = json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "spec": {"a": 1}});
        let alpha = present(Kind::DataVolume, "cdi.kubevirt.io/v1alpha1", &dv);
        assert_eq!(alpha["apiVersion"], "cdi.kubevirt.io/v1alpha1");
        assert_eq!(alpha["spec"], dv["spec"]);
        assert_eq!(
            accept(Kind::DataVolume, "cdi.kubevirt.io/v1alpha1", alpha.clone()),
            alpha
        );
    }
}
