//! `cdi apply -f`: create or update the objects of YAML/JSON manifests (multi-document, `List`
//! kinds expanded).
//!
//! Each object goes to the resource its `apiVersion` and `kind` name on this server. A missing
//! object is created (`created`); an existing one gets the manifest's top-level fields (spec,
//! data, …) and its labels and annotations merged over what is stored, and is replaced only
//! when that changes something (`configured`, else `unchanged`). Identity, status and other
//! metadata stay as the server has them.

use anyhow::{Context, anyhow, bail};
use kube::api::PostParams;
use kube::core::DynamicObject;
use serde_json::{Value, json};

use super::connect::{Connection, status_code};
use super::discovery::KindResolver;

/// Arguments of `cdi apply`.
#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// Manifest file (`-` for stdin).
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<String>,
    #[command(flatten)]
    pub(super) conn: super::ConnFlags,
}

/// Run `cdi apply`: every object is tried; failures are reported one per line.
pub async fn run(conn: &Connection, a: ApplyArgs) -> anyhow::Result<()> {
    let mut kinds = KindResolver::default();
    let mut failed = false;
    for f in &a.files {
        let text = if f == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading stdin")?
        } else {
            std::fs::read_to_string(f).with_context(|| format!("reading {f}"))?
        };
        for obj in parse_manifests(&text)? {
            if let Err(e) = apply_one(conn, &mut kinds, obj).await {
                eprintln!("error: {e:#}");
                failed = true;
            }
        }
    }
    if failed {
        bail!("some objects were not applied");
    }
    Ok(())
}

/// Split a manifest stream into objects (YAML multi-document or JSON; `List` kinds expanded).
fn parse_manifests(text: &str) -> anyhow::Result<Vec<Value>> {
    let docs: Vec<Value> = match serde_json::from_str::<Value>(text) {
        Ok(v) => vec![v],
        Err(_) => serde_saphyr::from_multiple::<Value>(text).context("parsing manifest")?,
    };
    let mut out = Vec::new();
    for d in docs {
        if d.is_null() {
            continue;
        }
        if d["kind"].as_str().is_some_and(|k| k.ends_with("List"))
            && let Some(items) = d["items"].as_array()
        {
            out.extend(items.iter().cloned());
        } else {
            out.push(d);
        }
    }
    Ok(out)
}

async fn apply_one(
    conn: &Connection,
    kinds: &mut KindResolver,
    mut obj: Value,
) -> anyhow::Result<()> {
    let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_string();
    let kind = obj["kind"].as_str().unwrap_or_default().to_string();
    if api_version.is_empty() || kind.is_empty() {
        bail!("an object has no apiVersion or kind");
    }
    let res = kinds.resolve(conn, &api_version, &kind).await?;
    let name = obj["metadata"]["name"]
        .as_str()
        .ok_or_else(|| anyhow!("a {kind} has no metadata.name"))?
        .to_string();
    let ns = if res.namespaced {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or(&conn.namespace)
            .to_string();
        obj["metadata"]["namespace"] = json!(ns);
        Some(ns)
    } else {
        None
    };
    let api = res.api(&conn.client, ns.as_deref());
    let what = format!("{}/{name}", res.qualified_kind());
    let pp = PostParams::default();
    match api.get(&name).await {
        Err(e) if status_code(&e) == Some(404) => {
            let obj: DynamicObject = serde_json::from_value(obj).context("reading the object")?;
            api.create(&pp, &obj).await.map_err(|e| conn.explain(e))?;
            println!("{what} created");
        }
        Err(e) => return Err(conn.explain(e)),
        Ok(existing) => {
            let existing = serde_json::to_value(existing)?;
            let merged = merge_for_update(&existing, &obj);
            if merged == existing {
                println!("{what} unchanged");
                return Ok(());
            }
            let merged: DynamicObject = serde_json::from_value(merged)?;
            api.replace(&name, &pp, &merged)
                .await
                .map_err(|e| conn.explain(e))?;
            println!("{what} configured");
        }
    }
    Ok(())
}

/// The stored object with the manifest's top-level fields and its labels and annotations put
/// over it; identity, status and other metadata stay as stored.
fn merge_for_update(existing: &Value, manifest: &Value) -> Value {
    let mut merged = existing.clone();
    for (k, v) in manifest.as_object().into_iter().flatten() {
        if !matches!(k.as_str(), "metadata" | "status" | "apiVersion" | "kind") {
            merged[k] = v.clone();
        }
    }
    for k in ["labels", "annotations"] {
        if let Some(m) = manifest["metadata"][k].as_object() {
            for (lk, lv) in m {
                merged["metadata"][k][lk] = lv.clone();
            }
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_manifests_split() {
        let docs = parse_manifests("---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: a\n---\n# c\n---\nkind: ConfigMap\nmetadata:\n  name: b\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1]["kind"], "ConfigMap");
    }

    #[test]
    fn lists_expand_into_their_items() {
        let docs = parse_manifests(
            r#"{"apiVersion": "v1", "kind": "List", "items": [{"kind": "Secret"}, {"kind": "Pod"}]}"#,
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1]["kind"], "Pod");
    }

    #[test]
    fn an_unchanged_manifest_merges_into_the_stored_object() {
        let stored = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "uid": "u", "resourceVersion": "3", "labels": {"a": "1"}},
            "data": {"k": "v"}});
        let manifest = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "labels": {"a": "1"}}, "data": {"k": "v"}});
        assert_eq!(merge_for_update(&stored, &manifest), stored);
    }

    #[test]
    fn a_changed_manifest_replaces_fields_and_merges_labels() {
        let stored = json!({"metadata": {"name": "c", "uid": "u", "labels": {"a": "1"}},
            "data": {"k": "v", "old": "x"}, "status": {"phase": "Bound"}});
        let manifest = json!({"metadata": {"name": "c", "labels": {"b": "2"}},
            "data": {"k": "w"}, "status": {"phase": "Lost"}});
        let merged = merge_for_update(&stored, &manifest);
        assert_eq!(merged["data"], json!({"k": "w"}));
        assert_eq!(merged["metadata"]["labels"], json!({"a": "1", "b": "2"}));
        assert_eq!(merged["metadata"]["uid"], "u");
        assert_eq!(merged["status"]["phase"], "Bound");
    }
}
