//! Discovery documents: how kubectl and kube-rs learn what this server serves.
//!
//! * `/api` (`APIVersions`), `/api/v1` and `/apis/<group>/<version>` (`APIResourceList`:
//!   names, kinds, verbs, short names, categories, `/status` and `pods/log` subresources),
//!   `/apis` (`APIGroupList`) and `/apis/<group>` (`APIGroup`);
//! * `/version` (`version.Info`);
//! * `/openapi/v3` and `/openapi/v3/<prefix>/<group>/<version>`: a minimal OpenAPI 3 document
//!   per group version with one PATCH operation per kind. kubectl reads it for two decisions:
//!   a PATCH operation that lists the `fieldValidation` parameter makes `kubectl apply`
//!   validate on the server (`fieldValidation=Strict`) instead of downloading `/openapi/v2`
//!   schemas, and a PATCH body list *without* `application/strategic-merge-patch+json` makes
//!   kubectl compute patches from its built-in types (or a JSON merge patch for custom
//!   resources) rather than from schemas this document does not carry.
//!
//! Aggregated discovery (`Accept: …;as=APIGroupDiscoveryList`) is not served: answering with
//! the legacy documents and `Content-Type: application/json` makes client-go fall back to
//! them.

use serde_json::{Value, json};

use crate::store::Kind;

/// The Kubernetes version this server claims in `/version` (and the OpenAPI `info`).
pub const GIT_VERSION: &str = "v1.33.0-cdi";
const MAJOR: &str = "1";
const MINOR: &str = "33";

/// Verbs of every served resource.
const VERBS: [&str; 7] = [
    "create", "delete", "get", "list", "patch", "update", "watch",
];
/// Verbs of `/status` subresources.
const STATUS_VERBS: [&str; 3] = ["get", "patch", "update"];

impl Kind {
    /// kubectl short names.
    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::DataVolume => &["dv", "dvs"],
            Kind::PersistentVolumeClaim => &["pvc"],
            Kind::PersistentVolume => &["pv"],
            Kind::Pod => &["po"],
            Kind::Service => &["svc"],
            Kind::Namespace => &["ns"],
            Kind::StorageClass => &["sc"],
            Kind::ConfigMap => &["cm"],
            Kind::Event => &["ev"],
            Kind::DataImportCron => &["dic", "dics"],
            Kind::DataSource => &["das"],
            Kind::VolumeSnapshot => &["vs"],
            Kind::VolumeSnapshotClass => &["vsclass", "vsclasses"],
            Kind::StorageProfile | Kind::CdiConfig | Kind::Secret | Kind::Lease => &[],
        }
    }

    /// Resource categories (`kubectl get all` lists the `all` category).
    pub fn categories(self) -> &'static [&'static str] {
        match self {
            Kind::DataVolume
            | Kind::DataSource
            | Kind::DataImportCron
            | Kind::Pod
            | Kind::Service => &["all"],
            _ => &[],
        }
    }
}

/// Kinds also served in another group: `(group, version, kind)`. The object is stored once and
/// converted on the way in and out ([`crate::convert`]).
const ALIASES: [(&str, &str, Kind); 1] = [("events.k8s.io", "v1", Kind::Event)];

/// Whether `kind` is served at `group`/`version`.
pub fn serves(kind: Kind, group: &str, version: &str) -> bool {
    (kind.group() == group && kind.versions().contains(&version))
        || ALIASES
            .iter()
            .any(|(g, v, k)| *k == kind && *g == group && *v == version)
}

/// Served API groups other than core, with their versions (preferred first).
pub fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for k in Kind::ALL {
        let g = k.group();
        if g.is_empty() {
            continue;
        }
        let entry = match out.iter_mut().find(|(name, _)| *name == g) {
            Some(e) => e,
            None => {
                out.push((g, Vec::new()));
                let last = out.len() - 1;
                &mut out[last]
            }
        };
        for v in k.versions() {
            if !entry.1.contains(v) {
                entry.1.push(v);
            }
        }
    }
    for (g, v, _) in ALIASES {
        match out.iter_mut().find(|(name, _)| *name == g) {
            Some(e) if !e.1.contains(&v) => e.1.push(v),
            Some(_) => {}
            None => out.push((g, vec![v])),
        }
    }
    out.push((cdi_apiserver::GROUP, vec![cdi_apiserver::VERSION]));
    out
}

/// Kinds served at `group`/`version`.
pub fn kinds_at(group: &str, version: &str) -> Vec<Kind> {
    Kind::ALL
        .into_iter()
        .filter(|k| serves(*k, group, version))
        .collect()
}

fn group_doc(name: &str, versions: &[&str]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({
        "name": name,
        "versions": vs,
        "preferredVersion": {"groupVersion": format!("{name}/{}", versions[0]), "version": versions[0]},
    })
}

/// `/apis`.
pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups().iter().map(|(g, vs)| group_doc(g, vs)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`, or `None` for groups not served here.
pub fn api_group(group: &str) -> Option<Value> {
    let (g, vs) = groups().into_iter().find(|(g, _)| *g == group)?;
    let mut doc = group_doc(g, &vs);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

/// `/api`.
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// `/api/v1` (group `""`) or `/apis/<group>/<version>`; `None` when not served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let kinds = kinds_at(group, version);
    if kinds.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for k in kinds {
        let mut r = json!({
            "name": k.plural(),
            "singularName": k.singular(),
            "namespaced": k.namespaced(),
            "kind": k.name(),
            "verbs": VERBS,
        });
        if !k.short_names().is_empty() {
            r["shortNames"] = json!(k.short_names());
        }
        if !k.categories().is_empty() {
            r["categories"] = json!(k.categories());
        }
        resources.push(r);
        if k.has_status() {
            resources.push(json!({
                "name": format!("{}/status", k.plural()),
                "singularName": "",
                "namespaced": k.namespaced(),
                "kind": k.name(),
                "verbs": STATUS_VERBS,
            }));
        }
        if k == Kind::Pod {
            resources.push(json!({
                "name": "pods/log", "singularName": "", "namespaced": true, "kind": "Pod", "verbs": ["get"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }))
}

/// `/version`.
pub fn version_info() -> Value {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    json!({
        "major": MAJOR,
        "minor": MINOR,
        "gitVersion": GIT_VERSION,
        "gitCommit": env!("CARGO_PKG_VERSION"),
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "n/a (Rust)",
        "compiler": "rustc",
        "platform": format!("{}/{arch}", std::env::consts::OS),
    })
}

/// The OpenAPI v3 path prefix of a group version (`api/v1`, `apis/<group>/<version>`).
fn openapi_prefix(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// Stands in for a content hash: the documents change only with the server's version.
const OPENAPI_HASH: &str = concat!("cdi-", env!("CARGO_PKG_VERSION"));

/// `/openapi/v3`: where each group version's document is.
pub fn openapi_v3_root() -> Value {
    let mut paths = serde_json::Map::new();
    let mut gvs = vec![("", "v1")];
    for (g, vs) in groups() {
        if g == cdi_apiserver::GROUP {
            continue;
        }
        gvs.extend(vs.into_iter().map(|v| (g, v)));
    }
    for (g, v) in gvs {
        let prefix = openapi_prefix(g, v);
        paths.insert(
            prefix.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{prefix}?hash={OPENAPI_HASH}")}),
        );
    }
    json!({"paths": paths})
}

fn query_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": "string", "uniqueItems": true}})
}

/// `/openapi/v3/<prefix>` (`api/v1`, `apis/<group>/<version>`); `None` when not served.
pub fn openapi_v3_doc(prefix: &str) -> Option<Value> {
    let (group, version) = match prefix.trim_matches('/').split('/').collect::<Vec<_>>()[..] {
        ["api", v] => ("", v),
        ["apis", g, v] => (g, v),
        _ => return None,
    };
    let kinds = kinds_at(group, version);
    if kinds.is_empty() {
        return None;
    }
    let params = vec![
        query_param(
            "dryRun",
            "When present, indicates that modifications should not be persisted.",
        ),
        query_param(
            "fieldManager",
            "A name associated with the actor or entity that is making these changes.",
        ),
        query_param(
            "fieldValidation",
            "How the server handles fields it does not recognize: Ignore, Warn or Strict.",
        ),
        query_param("force", "Force is going to \"force\" Apply requests."),
    ];
    // Deliberately without strategic-merge-patch+json (see the module docs).
    let body_types = [
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/apply-patch+yaml",
    ];
    let content: serde_json::Map<String, Value> = body_types
        .iter()
        .map(|t| (t.to_string(), json!({"schema": {"type": "object"}})))
        .collect();
    let mut paths = serde_json::Map::new();
    for k in kinds {
        let base = if k.namespaced() {
            format!("/{prefix}/namespaces/{{namespace}}/{}/{{name}}", k.plural())
        } else {
            format!("/{prefix}/{}/{{name}}", k.plural())
        };
        let gvk = json!({"group": group, "version": version, "kind": k.name()});
        let op = |suffix: &str| {
            json!({
                "description": format!("partially update the specified {}{suffix}", k.name()),
                "operationId": format!("patch{}{}", k.name(), if suffix.is_empty() { "" } else { "Status" }),
                "parameters": params,
                "requestBody": {"content": content, "required": true},
                "responses": {"200": {"description": "OK"}, "201": {"description": "Created"}},
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": gvk,
            })
        };
        paths.insert(base.clone(), json!({"patch": op("")}));
        if k.has_status() {
            paths.insert(format!("{base}/status"), json!({"patch": op(" status")}));
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CDI_GROUP;

    fn resource<'a>(list: &'a Value, name: &str) -> &'a Value {
        list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} is listed"))
    }

    #[test]
    fn cdi_group_prefers_v1beta1_and_serves_v1alpha1_datavolumes() {
        let g = api_group(CDI_GROUP).unwrap();
        assert_eq!(g["preferredVersion"]["version"], "v1beta1");
        assert_eq!(g["versions"].as_array().unwrap().len(), 2);
        let alpha = resource_list(CDI_GROUP, "v1alpha1").unwrap();
        let names: Vec<&str> = alpha["resources"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["name"].as_str())
            .filter(|n| !n.contains('/'))
            .collect();
        assert_eq!(names, ["datavolumes", "cdiconfigs"]);
        let beta = resource_list(CDI_GROUP, "v1beta1").unwrap();
        let dv = resource(&beta, "datavolumes");
        assert_eq!(dv["shortNames"], json!(["dv", "dvs"]));
        assert_eq!(dv["namespaced"], true);
        assert_eq!(dv["singularName"], "datavolume");
        assert_eq!(
            resource(&beta, "datavolumes/status")["verbs"],
            json!(STATUS_VERBS)
        );
        assert_eq!(
            resource(&beta, "dataimportcrons")["shortNames"],
            json!(["dic", "dics"])
        );
        assert!(resource_list(CDI_GROUP, "v2").is_none());
    }

    #[test]
    fn core_and_other_groups() {
        let core = resource_list("", "v1").unwrap();
        assert_eq!(core["groupVersion"], "v1");
        assert_eq!(resource(&core, "persistentvolumes")["namespaced"], false);
        assert_eq!(resource(&core, "pods")["shortNames"], json!(["po"]));
        assert_eq!(resource(&core, "pods/log")["verbs"], json!(["get"]));
        assert_eq!(resource(&core, "namespaces")["shortNames"], json!(["ns"]));
        let list = api_group_list();
        let names: Vec<&str> = list["groups"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|g| g["name"].as_str())
            .collect();
        for g in [
            CDI_GROUP,
            "storage.k8s.io",
            "snapshot.storage.k8s.io",
            "coordination.k8s.io",
            "upload.cdi.kubevirt.io",
        ] {
            assert!(names.contains(&g), "{g} in /apis");
        }
        assert!(names.contains(&"events.k8s.io"));
        let ev = resource_list("events.k8s.io", "v1").unwrap();
        assert_eq!(resource(&ev, "events")["kind"], "Event");
        assert!(serves(Kind::Event, "events.k8s.io", "v1"));
        assert!(!serves(Kind::ConfigMap, "events.k8s.io", "v1"));
        let snap = resource_list("snapshot.storage.k8s.io", "v1").unwrap();
        assert_eq!(
            resource(&snap, "volumesnapshotclasses")["namespaced"],
            false
        );
        assert_eq!(
            resource(&snap, "volumesnapshots")["shortNames"],
            json!(["vs"])
        );
    }

    #[test]
    fn openapi_advertises_field_validation_without_strategic_patches() {
        let root = openapi_v3_root();
        let url = root["paths"]["apis/cdi.kubevirt.io/v1beta1"]["serverRelativeURL"]
            .as_str()
            .unwrap();
        assert!(url.starts_with("/openapi/v3/apis/cdi.kubevirt.io/v1beta1?hash="));
        assert!(root["paths"]["api/v1"].is_object());
        let doc = openapi_v3_doc("apis/cdi.kubevirt.io/v1beta1").unwrap();
        let patch = &doc["paths"]["/apis/cdi.kubevirt.io/v1beta1/namespaces/{namespace}/datavolumes/{name}"]
            ["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "DataVolume"
        );
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );
        assert!(
            patch["requestBody"]["content"]["application/strategic-merge-patch+json"].is_null()
        );
        assert!(openapi_v3_doc("apis/nope/v1").is_none());
    }
}
