//! Resource names as kubectl takes them — `dv`, `datavolumes`, `DataVolume`,
//! `datavolumes.cdi.kubevirt.io`, `datavolumes.v1beta1.cdi.kubevirt.io`, `pvc`, `sc`, `ev` —
//! resolved through the server's discovery documents (`/api/v1`, `/apis`,
//! `/apis/<group>/<version>`), short names included, so the same command works against
//! `cdi serve` and a cluster.
//!
//! Like kubectl's RESTMapper, the core group is searched first, then the other groups in the
//! server's order, each at its preferred version: `events` is core `v1` events even though
//! `events.k8s.io` serves the same name. The groups are only asked for when core has no match.
//! kube's own `discovery` module is not used because its `ApiResource` drops short and
//! singular names.

use std::collections::HashMap;

use anyhow::anyhow;
use futures::future::join_all;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{APIGroup, APIResourceList};
use kube::Api;
use kube::core::{ApiResource, DynamicObject};

use super::connect::Connection;

/// One resource type the server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// Group, version, kind and plural, as kube's dynamic API takes them.
    pub api: ApiResource,
    /// Namespaced (else cluster-scoped).
    pub namespaced: bool,
    singular: String,
    short_names: Vec<String>,
}

impl Resource {
    /// The resources of one discovery document (subresources such as `pods/log` left out).
    fn from_list(list: &APIResourceList) -> Vec<Resource> {
        let (group, version) = match list.group_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), list.group_version.clone()),
        };
        list.resources
            .iter()
            .filter(|r| !r.name.contains('/'))
            .map(|r| Resource {
                api: ApiResource {
                    group: group.clone(),
                    version: version.clone(),
                    api_version: list.group_version.clone(),
                    kind: r.kind.clone(),
                    plural: r.name.clone(),
                },
                namespaced: r.namespaced,
                // Older servers leave singularName empty; kubectl then uses the kind.
                singular: if r.singular_name.is_empty() {
                    r.kind.to_ascii_lowercase()
                } else {
                    r.singular_name.clone()
                },
                short_names: r.short_names.clone().unwrap_or_default(),
            })
            .collect()
    }

    /// Whether `name` (lower case, without group) names this resource.
    fn answers_to(&self, name: &str) -> bool {
        self.api.plural == name
            || self.singular == name
            || self.api.kind.eq_ignore_ascii_case(name)
            || self.short_names.iter().any(|s| s == name)
    }

    /// The dynamic API for this resource in `namespace` (ignored for cluster-scoped ones;
    /// `None`: all namespaces).
    pub fn api(&self, client: &kube::Client, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) if self.namespaced => Api::namespaced_with(client.clone(), ns, &self.api),
            _ => Api::all_with(client.clone(), &self.api),
        }
    }

    /// How kubectl names the type in messages: `datavolume.cdi.kubevirt.io`,
    /// `persistentvolumeclaim`.
    pub fn qualified_kind(&self) -> String {
        let kind = self.api.kind.to_ascii_lowercase();
        if self.api.group.is_empty() {
            kind
        } else {
            format!("{kind}.{}", self.api.group)
        }
    }
}

/// A resource name split as kubectl reads it: the name, then a group or `version.group`.
#[derive(Debug, PartialEq, Eq)]
struct Wanted {
    name: String,
    qualifier: Option<String>,
}

impl Wanted {
    fn parse(text: &str) -> Wanted {
        let text = text.to_ascii_lowercase();
        match text.split_once('.') {
            Some((name, qualifier)) => Wanted {
                name: name.to_string(),
                qualifier: Some(qualifier.to_string()),
            },
            None => Wanted {
                name: text,
                qualifier: None,
            },
        }
    }

    /// The version of `group` to look in: its preferred one, or the one the qualifier names;
    /// `None` when the qualifier rules the group out.
    fn version_in(&self, group: &APIGroup) -> Option<String> {
        let preferred = group
            .preferred_version
            .as_ref()
            .or(group.versions.first())
            .map(|v| v.version.clone());
        match &self.qualifier {
            None => preferred,
            Some(q) if *q == group.name => preferred,
            Some(q) => group
                .versions
                .iter()
                .find(|v| *q == format!("{}.{}", v.version, group.name))
                .map(|v| v.version.clone()),
        }
    }
}

/// The first resource `wanted` names, in discovery order.
fn find<'a>(resources: &'a [Resource], wanted: &Wanted) -> Option<&'a Resource> {
    resources.iter().find(|r| r.answers_to(&wanted.name))
}

/// The resource type `name` stands for on this server.
pub async fn resolve(conn: &Connection, name: &str) -> anyhow::Result<Resource> {
    let wanted = Wanted::parse(name);
    let client = &conn.client;
    if wanted.qualifier.is_none() {
        let versions = client
            .list_core_api_versions()
            .await
            .map_err(|e| conn.explain(e))?;
        let version = versions.versions.first().map_or("v1", String::as_str);
        let core = client
            .list_core_api_resources(version)
            .await
            .map_err(|e| conn.explain(e))?;
        if let Some(r) = find(&Resource::from_list(&core), &wanted) {
            return Ok(r.clone());
        }
    }
    let groups = client
        .list_api_groups()
        .await
        .map_err(|e| conn.explain(e))?;
    let group_versions: Vec<String> = groups
        .groups
        .iter()
        .filter_map(|g| Some(format!("{}/{}", g.name, wanted.version_in(g)?)))
        .collect();
    // One request per group, concurrently: a cluster serves dozens of groups.
    let lists = join_all(
        group_versions
            .iter()
            .map(|gv| client.list_api_group_resources(gv)),
    )
    .await;
    let mut resources = Vec::new();
    let mut unreachable = Vec::new();
    for (gv, list) in group_versions.iter().zip(lists) {
        match list {
            Ok(list) => resources.extend(Resource::from_list(&list)),
            // A broken aggregated API (metrics, say) must not hide every other group.
            Err(e) => unreachable.push(format!("{gv}: {}", conn.explain(e))),
        }
    }
    find(&resources, &wanted).cloned().ok_or_else(|| {
        let mut msg = format!("the server doesn't have a resource type {name:?}");
        if !unreachable.is_empty() {
            msg.push_str(&format!(
                " (discovery failed for {})",
                unreachable.join("; ")
            ));
        }
        anyhow!(msg)
    })
}

/// Resolves manifests' `apiVersion` + `kind`, asking for each group version's document once.
#[derive(Default)]
pub struct KindResolver {
    known: HashMap<String, Vec<Resource>>,
}

impl KindResolver {
    /// The resource serving `kind` at `api_version`.
    pub async fn resolve(
        &mut self,
        conn: &Connection,
        api_version: &str,
        kind: &str,
    ) -> anyhow::Result<Resource> {
        if !self.known.contains_key(api_version) {
            let list = if api_version.contains('/') {
                conn.client.list_api_group_resources(api_version).await
            } else {
                conn.client.list_core_api_resources(api_version).await
            };
            let resources = match list {
                Ok(list) => Resource::from_list(&list),
                Err(e) if super::connect::status_code(&e) == Some(404) => Vec::new(),
                Err(e) => return Err(conn.explain(e)),
            };
            self.known.insert(api_version.to_string(), resources);
        }
        self.known
            .get(api_version)
            .into_iter()
            .flatten()
            .find(|r| r.api.kind == kind)
            .cloned()
            .ok_or_else(|| anyhow!("no matches for kind {kind:?} in version {api_version:?}"))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn list(doc: serde_json::Value) -> Vec<Resource> {
        Resource::from_list(&serde_json::from_value(doc).unwrap())
    }

    fn cdi_v1beta1() -> Vec<Resource> {
        list(
            json!({"groupVersion": "cdi.kubevirt.io/v1beta1", "resources": [
                {"name": "datavolumes", "singularName": "datavolume", "namespaced": true,
                 "kind": "DataVolume", "verbs": ["get"], "shortNames": ["dv", "dvs"]},
                {"name": "datavolumes/status", "singularName": "", "namespaced": true,
                 "kind": "DataVolume", "verbs": ["get"]},
                {"name": "cdiconfigs", "singularName": "", "namespaced": false,
                 "kind": "CDIConfig", "verbs": ["get"]},
            ]}),
        )
    }

    #[test]
    fn names_short_names_singulars_and_kinds_resolve() {
        let resources = cdi_v1beta1();
        for name in [
            "dv",
            "dvs",
            "datavolume",
            "datavolumes",
            "DataVolume",
            "DATAVOLUMES",
        ] {
            let r = find(&resources, &Wanted::parse(name)).unwrap();
            assert_eq!(r.api.plural, "datavolumes", "{name}");
            assert_eq!(r.api.api_version, "cdi.kubevirt.io/v1beta1");
            assert!(r.namespaced);
        }
        assert!(find(&resources, &Wanted::parse("replicaset")).is_none());
    }

    #[test]
    fn subresources_are_not_resources_and_empty_singulars_fall_back_to_the_kind() {
        let resources = cdi_v1beta1();
        assert_eq!(resources.len(), 2);
        let config = find(&resources, &Wanted::parse("cdiconfig")).unwrap();
        assert!(!config.namespaced);
        assert_eq!(config.qualified_kind(), "cdiconfig.cdi.kubevirt.io");
    }

    #[test]
    fn core_resources_have_no_group() {
        let core = list(json!({"groupVersion": "v1", "resources": [
            {"name": "persistentvolumeclaims", "singularName": "persistentvolumeclaim",
             "namespaced": true, "kind": "PersistentVolumeClaim", "verbs": ["get"],
             "shortNames": ["pvc"]}]}));
        let pvc = find(&core, &Wanted::parse("pvc")).unwrap();
        assert_eq!(pvc.api.group, "");
        assert_eq!(pvc.api.api_version, "v1");
        assert_eq!(pvc.qualified_kind(), "persistentvolumeclaim");
    }

    #[test]
    fn a_qualifier_picks_the_group_and_optionally_the_version() {
        let group: APIGroup = serde_json::from_value(json!({"name": "cdi.kubevirt.io",
            "versions": [{"groupVersion": "cdi.kubevirt.io/v1beta1", "version": "v1beta1"},
                         {"groupVersion": "cdi.kubevirt.io/v1alpha1", "version": "v1alpha1"}],
            "preferredVersion": {"groupVersion": "cdi.kubevirt.io/v1beta1", "version": "v1beta1"}}))
        .unwrap();
        let w = Wanted::parse("datavolumes.cdi.kubevirt.io");
        assert_eq!(w.name, "datavolumes");
        assert_eq!(w.version_in(&group).as_deref(), Some("v1beta1"));
        let w = Wanted::parse("dv.v1alpha1.cdi.kubevirt.io");
        assert_eq!(w.version_in(&group).as_deref(), Some("v1alpha1"));
        assert_eq!(Wanted::parse("dv.storage.k8s.io").version_in(&group), None);
        assert_eq!(
            Wanted::parse("dv").version_in(&group).as_deref(),
            Some("v1beta1")
        );
    }
}
