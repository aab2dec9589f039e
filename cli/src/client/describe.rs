//! `cdi describe`: objects rendered the way `oc describe` renders custom resources.
//!
//! Keys become title-cased words (`claimName` → `Claim Name`, acronyms kept: `URL`, `UID`,
//! `API`), maps nest by two spaces, scalar values of a map are aligned, and the object's events
//! follow as a table whose Age column reads `12s (x2 over 14s)` for repeats. The object and
//! its events (core events whose `involvedObject.uid` is the object's) come from the API.

use std::fmt::Write;

use cdi_serve::util::{now_secs, parse_rfc3339};
use kube::api::ListParams;
use kube::core::ApiResource;
use serde_json::Value;

use super::connect::Connection;
use super::discovery;

const ACRONYMS: [&str; 5] = ["API", "URL", "UID", "OSB", "GUID"];

/// Arguments of `cdi describe`.
#[derive(Debug, clap::Args)]
pub struct DescribeArgs {
    /// Resource type.
    resource: String,
    /// Name.
    name: String,
    #[command(flatten)]
    pub(super) conn: super::ConnFlags,
}

/// Run `cdi describe`.
pub async fn run(conn: &Connection, a: DescribeArgs) -> anyhow::Result<()> {
    let res = discovery::resolve(conn, &a.resource).await?;
    let ns = conn.namespace.as_str();
    let obj = res
        .api(&conn.client, Some(ns))
        .get(&a.name)
        .await
        .map_err(|e| conn.explain(e))?;
    let obj = serde_json::to_value(obj)?;
    let events = if res.namespaced {
        let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
        let core_events = ApiResource::erase::<k8s_openapi::api::core::v1::Event>(&());
        let list = kube::Api::<kube::core::DynamicObject>::namespaced_with(
            conn.client.clone(),
            ns,
            &core_events,
        )
        .list(&ListParams::default().fields(&format!("involvedObject.uid={uid}")))
        .await
        .map_err(|e| conn.explain(e))?;
        list.items
            .into_iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    print!("{}", describe(&obj, &events));
    Ok(())
}

/// Human age like kubectl prints it (`24s`, `5m`, `3h`, `2d`).
fn age(since_secs: u64, now: u64) -> String {
    let d = now.saturating_sub(since_secs);
    match d {
        0..120 => format!("{d}s"),
        120..7200 => format!("{}m", d / 60),
        7200..172_800 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86_400),
    }
}

/// Title-case label for a JSON key, as kubectl's `smartLabelFor`.
fn label_for(key: &str) -> String {
    // The documented `oc describe dv` output spells this one out word by word.
    if key == "lastHeartbeatTime" {
        return "Last Heart Beat Time".to_string();
    }
    if !key.chars().all(|c| c.is_ascii_alphanumeric()) {
        return key.to_string();
    }
    let mut words: Vec<String> = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = key.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let boundary = i > 0
            && c.is_ascii_uppercase()
            && (chars[i - 1].is_ascii_lowercase()
                || chars[i - 1].is_ascii_digit()
                || chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase()));
        if boundary && !cur.is_empty() {
            words.push(std::mem::take(&mut cur));
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
        .into_iter()
        .map(|w| {
            let up = w.to_ascii_uppercase();
            if ACRONYMS.contains(&up.as_str()) {
                up
            } else {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => Some(String::new()),
        Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            Some(a.iter().filter_map(scalar).collect::<Vec<_>>().join(", "))
        }
        _ => None,
    }
}

fn render_map(out: &mut String, map: &serde_json::Map<String, Value>, indent: usize) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    let width = keys
        .iter()
        .filter(|k| scalar(&map[k.as_str()]).is_some())
        .map(|k| label_for(k).len())
        .max()
        .unwrap_or(0);
    let pad = " ".repeat(indent);
    for k in keys {
        let v = &map[k.as_str()];
        let label = label_for(k);
        match scalar(v) {
            Some(s) => {
                let _ = writeln!(out, "{pad}{:<w$}  {s}", format!("{label}:"), w = width + 1);
            }
            None => {
                let _ = writeln!(out, "{pad}{label}:");
                render_value(out, v, indent + 2);
            }
        }
    }
}

fn render_value(out: &mut String, v: &Value, indent: usize) {
    match v {
        Value::Object(m) => render_map(out, m, indent),
        Value::Array(items) => {
            for item in items {
                render_value(out, item, indent);
            }
        }
        other => {
            let _ = writeln!(
                out,
                "{}{}",
                " ".repeat(indent),
                scalar(other).unwrap_or_default()
            );
        }
    }
}

fn kv_block(out: &mut String, label: &str, m: &Value) {
    match m.as_object().filter(|m| !m.is_empty()) {
        None => {
            let _ = writeln!(out, "{label:<14}<none>");
        }
        Some(m) => {
            for (i, (k, v)) in m.iter().enumerate() {
                let head = if i == 0 { label } else { "" };
                let _ = writeln!(out, "{head:<14}{k}: {}", scalar(v).unwrap_or_default());
            }
        }
    }
}

/// Render an object and its events.
fn describe(obj: &Value, events: &[Value]) -> String {
    let mut out = String::new();
    let meta = &obj["metadata"];
    let _ = writeln!(
        out,
        "{:<14}{}",
        "Name:",
        meta["name"].as_str().unwrap_or_default()
    );
    if let Some(ns) = meta["namespace"].as_str() {
        let _ = writeln!(out, "{:<14}{ns}", "Namespace:");
    }
    kv_block(&mut out, "Labels:", &meta["labels"]);
    kv_block(&mut out, "Annotations:", &meta["annotations"]);
    let _ = writeln!(
        out,
        "{:<14}{}",
        "API Version:",
        obj["apiVersion"].as_str().unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "{:<14}{}",
        "Kind:",
        obj["kind"].as_str().unwrap_or_default()
    );
    let mut rest = meta.as_object().cloned().unwrap_or_default();
    for k in ["name", "namespace", "labels", "annotations"] {
        rest.remove(k);
    }
    if !rest.is_empty() {
        let _ = writeln!(out, "Metadata:");
        render_map(&mut out, &rest, 2);
    }
    if let Some(m) = obj.as_object() {
        let mut keys: Vec<&String> = m
            .keys()
            .filter(|k| !matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
            .collect();
        keys.sort_by_key(|k| match k.as_str() {
            "spec" => 0,
            "status" => 2,
            _ => 1,
        });
        for k in keys {
            let v = &m[k.as_str()];
            match scalar(v) {
                Some(s) => {
                    let _ = writeln!(out, "{}:  {s}", label_for(k));
                }
                None => {
                    let _ = writeln!(out, "{}:", label_for(k));
                    render_value(&mut out, v, 2);
                }
            }
        }
    }
    out.push_str(&events_table(events, now_secs()));
    out
}

/// When an event was last seen: `lastTimestamp` (core/v1 writers), else the series' last
/// observation or `eventTime` (events.k8s.io/v1 writers such as kube-rs' recorder), as
/// `kubectl describe` reads them.
pub(super) fn last_seen(e: &Value) -> Option<u64> {
    [
        &e["lastTimestamp"],
        &e["series"]["lastObservedTime"],
        &e["eventTime"],
    ]
    .into_iter()
    .find_map(|v| v.as_str().and_then(parse_rfc3339))
}

/// The `Events:` section.
fn events_table(events: &[Value], now: u64) -> String {
    if events.is_empty() {
        return "Events:       <none>\n".to_string();
    }
    let mut evs: Vec<&Value> = events.iter().collect();
    // The resource version orders updates exactly (timestamps have one-second resolution).
    evs.sort_by_key(|e| {
        let rv = e["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or(0);
        (last_seen(e).unwrap_or(0), rv)
    });
    let rows: Vec<[String; 5]> = evs
        .iter()
        .map(|e| {
            let last = last_seen(e).unwrap_or(now);
            let first = ["firstTimestamp", "eventTime"]
                .iter()
                .find_map(|f| e[*f].as_str().and_then(parse_rfc3339))
                .unwrap_or(last);
            let count = e["count"]
                .as_u64()
                .or_else(|| e["series"]["count"].as_u64())
                .unwrap_or(1);
            let age_text = if count > 1 {
                format!("{} (x{count} over {})", age(last, now), age(first, now))
            } else {
                age(last, now)
            };
            [
                e["type"].as_str().unwrap_or_default().to_string(),
                e["reason"].as_str().unwrap_or_default().to_string(),
                age_text,
                e["source"]["component"]
                    .as_str()
                    .or_else(|| e["reportingComponent"].as_str())
                    .unwrap_or_default()
                    .to_string(),
                e["message"].as_str().unwrap_or_default().to_string(),
            ]
        })
        .collect();
    let head = ["Type", "Reason", "Age", "From", "Message"];
    // Column widths cover the header and its dashes.
    let mut w = head.map(|h| h.len().max(4));
    for r in &rows {
        for i in 0..4 {
            w[i] = w[i].max(r[i].len());
        }
    }
    let mut out = String::from("Events:\n");
    let line = |out: &mut String, c: [&str; 5]| {
        let _ = writeln!(
            out,
            "  {:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        );
    };
    line(&mut out, head);
    line(&mut out, ["----", "------", "----", "----", "-------"]);
    for r in &rows {
        line(&mut out, [&r[0], &r[1], &r[2], &r[3], &r[4]]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(age(100, 124), "24s");
        assert_eq!(age(0, 600), "10m");
        assert_eq!(age(0, 3 * 86_400), "3d");
    }

    #[test]
    fn labels_follow_kubectl() {
        assert_eq!(label_for("claimName"), "Claim Name");
        assert_eq!(label_for("url"), "URL");
        assert_eq!(label_for("uid"), "UID");
        assert_eq!(label_for("lastHeartbeatTime"), "Last Heart Beat Time");
        assert_eq!(label_for("restartCount"), "Restart Count");
        assert_eq!(label_for("apiVersion"), "API Version");
    }

    #[test]
    fn conditions_and_events_read_like_oc_describe() {
        let dv = json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "example-dv", "namespace": "default"},
            "spec": {"source": {"http": {"url": "http://h/x"}}},
            "status": {"phase": "ImportInProgress", "conditions": [{"type": "Bound", "status": "True",
                "reason": "Bound", "message": "PVC example-dv Bound",
                "lastHeartbeatTime": "2020-07-15T03:58:24Z", "lastTransitionTime": "2020-07-15T03:58:24Z"}]}});
        let ev = json!({"type": "Warning", "reason": "Error", "count": 2, "source": {"component": "datavolume-controller"},
            "message": "Unable to connect to http data source: expected status code 200, got 404. Status: 404 Not Found",
            "firstTimestamp": cdi_serve::util::rfc3339(1000 - 14), "lastTimestamp": cdi_serve::util::rfc3339(1000 - 12)});
        let mut text = describe(&dv, &[]);
        text.push_str(&events_table(&[ev], 1000));
        assert!(
            text.contains("    Last Heart Beat Time:  2020-07-15T03:58:24Z\n"),
            "{text}"
        );
        assert!(
            text.contains("    Message:               PVC example-dv Bound\n"),
            "{text}"
        );
        assert!(text.contains("      URL:  http://h/x\n"), "{text}");
        assert!(
            text.contains("  Phase:       ImportInProgress\n") || text.contains("  Phase:"),
            "{text}"
        );
        assert!(
            text.contains(
                "  Warning  Error   12s (x2 over 14s)  datavolume-controller  Unable to connect"
            ),
            "{text}"
        );
    }

    #[test]
    fn events_from_the_events_api_show_series_and_reporter() {
        // What kube-rs' recorder writes through events.k8s.io/v1, as the core view lists it.
        let ev = json!({"type": "Warning", "reason": "Error", "reportingComponent": "cdi-controller",
            "message": "Unable to connect", "eventTime": cdi_serve::util::rfc3339(1000 - 30),
            "series": {"count": 3, "lastObservedTime": cdi_serve::util::rfc3339(1000 - 5)}});
        let text = events_table(&[ev], 1000);
        assert!(
            text.contains("  Warning  Error   5s (x3 over 30s)  cdi-controller  Unable to connect"),
            "{text}"
        );
    }
}
