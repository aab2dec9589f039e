//! `cdi get`: kubectl's `get` for one resource type.
//!
//! Tables are the server's: the request asks for a `meta.k8s.io/v1` `Table` (as kubectl
//! does), so the columns are whatever the server prints for the type — CRD printer columns on
//! a cluster, `cdi serve`'s own for its kinds. This module only lays them out: columns of
//! priority 0 (all with `-o wide`), a NAMESPACE column with `-A`, aligned as kubectl's
//! tabwriter aligns them. `-o json|yaml` print the objects (a `List` without a name).

use anyhow::{Context, anyhow, bail};
use kube::api::ListParams;
use serde_json::{Value, json};

use super::connect::Connection;
use super::discovery::{self, Resource};

/// What kubectl sends to get a Table.
const TABLE_ACCEPT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";
/// kubectl's tabwriter: a column is at least this wide, padding included…
const TABWRITER_MIN_WIDTH: usize = 6;
/// …and separated from the next by this many spaces.
const TABWRITER_PADDING: usize = 3;

/// Arguments of `cdi get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Resource type (`dv`, `pvc`, `datavolumes.cdi.kubevirt.io`, …).
    resource: String,
    /// Name (all when omitted).
    name: Option<String>,
    /// Output format: wide, json or yaml.
    #[arg(short = 'o', long)]
    output: Option<String>,
    /// List across all namespaces.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    #[command(flatten)]
    pub(super) conn: super::ConnFlags,
}

/// `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Table { wide: bool },
    Json,
    Yaml,
}

impl Output {
    fn parse(o: Option<&str>) -> anyhow::Result<Output> {
        Ok(match o.unwrap_or_default() {
            "" => Output::Table { wide: false },
            "wide" => Output::Table { wide: true },
            "json" => Output::Json,
            "yaml" => Output::Yaml,
            other => bail!("unknown output format {other:?} (use wide, json or yaml)"),
        })
    }
}

/// Run `cdi get`.
pub async fn run(conn: &Connection, a: GetArgs) -> anyhow::Result<()> {
    let output = Output::parse(a.output.as_deref())?;
    let res = discovery::resolve(conn, &a.resource).await?;
    // A name is looked up in the namespace, as before `-A` was given.
    let all = a.all_namespaces && a.name.is_none() && res.namespaced;
    let ns = (!all).then_some(conn.namespace.as_str());
    match output {
        Output::Table { wide } => {
            let table = fetch_table(conn, &res, ns, a.name.as_deref()).await?;
            let mut rows = table["rows"].as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                match ns {
                    Some(ns) if res.namespaced => {
                        eprintln!("No resources found in {ns} namespace.")
                    }
                    _ => eprintln!("No resources found"),
                }
                return Ok(());
            }
            if is_event(&res) {
                rows.sort_by_key(|r| event_order(&r["object"]));
            }
            print!(
                "{}",
                render_table(&table["columnDefinitions"], &rows, wide, all)
            );
        }
        Output::Json | Output::Yaml => {
            let api = res.api(&conn.client, ns);
            let doc = match &a.name {
                Some(name) => {
                    serde_json::to_value(api.get(name).await.map_err(|e| conn.explain(e))?)?
                }
                None => {
                    let list = api
                        .list(&ListParams::default())
                        .await
                        .map_err(|e| conn.explain(e))?;
                    let mut items = list
                        .items
                        .into_iter()
                        .map(|o| Ok(typed(serde_json::to_value(o)?, &res)))
                        .collect::<Result<Vec<_>, serde_json::Error>>()?;
                    if is_event(&res) {
                        items.sort_by_key(event_order);
                    }
                    json!({"apiVersion": "v1", "kind": "List", "items": items})
                }
            };
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                let mut yaml = serde_saphyr::to_string(&doc).context("rendering YAML")?;
                // The renderer may leave the last line open; a shell prompt would follow it.
                if !yaml.ends_with('\n') {
                    yaml.push('\n');
                }
                print!("{yaml}");
            }
        }
    }
    Ok(())
}

/// List items carry no apiVersion and kind on the wire; kubectl fills them in.
fn typed(mut item: Value, res: &Resource) -> Value {
    if item.get("apiVersion").is_none() {
        item["apiVersion"] = json!(res.api.api_version);
    }
    if item.get("kind").is_none() {
        item["kind"] = json!(res.api.kind);
    }
    item
}

fn is_event(res: &Resource) -> bool {
    res.api.kind == "Event"
}

/// Events oldest first, as kubectl's users read them; the resource version orders events of
/// the same second.
fn event_order(e: &Value) -> (u64, u64) {
    let rv = e["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    (super::describe::last_seen(e).unwrap_or(0), rv)
}

/// The server's Table for a list (or one object). Events come with their whole objects, to
/// be sorted by time.
async fn fetch_table(
    conn: &Connection,
    res: &Resource,
    ns: Option<&str>,
    name: Option<&str>,
) -> anyhow::Result<Value> {
    let mut url = res.api(&conn.client, ns).resource_url().to_string();
    if let Some(name) = name {
        url.push('/');
        url.push_str(name);
    }
    if is_event(res) {
        url.push_str("?includeObject=Object");
    }
    let req = http::Request::get(&url)
        .header(http::header::ACCEPT, TABLE_ACCEPT)
        .body(Vec::new())
        .with_context(|| format!("building the request for {url}"))?;
    let table: Value = conn
        .client
        .request(req)
        .await
        .map_err(|e| conn.explain(e))?;
    if table["kind"] != "Table" {
        return Err(anyhow!(
            "the server answered {url} with a {} instead of a Table",
            table["kind"].as_str().unwrap_or("document")
        ));
    }
    Ok(table)
}

/// A cell as kubectl prints it: strings as they are, a missing value as `<none>`.
fn cell_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "<none>".to_string(),
        other => other.to_string(),
    }
}

/// The table's text: upper-case headers, the columns kubectl would show, NAMESPACE first when
/// listing across namespaces.
fn render_table(columns: &Value, rows: &[Value], wide: bool, with_namespace: bool) -> String {
    let columns = columns.as_array().map(Vec::as_slice).unwrap_or_default();
    let shown: Vec<usize> = columns
        .iter()
        .enumerate()
        .filter(|(_, c)| wide || c["priority"].as_u64().unwrap_or(0) == 0)
        .map(|(i, _)| i)
        .collect();
    let mut lines: Vec<Vec<String>> = Vec::with_capacity(rows.len() + 1);
    let mut header: Vec<String> = shown
        .iter()
        .map(|&i| cell_text(&columns[i]["name"]).to_uppercase())
        .collect();
    if with_namespace {
        header.insert(0, "NAMESPACE".to_string());
    }
    lines.push(header);
    for row in rows {
        let cells = row["cells"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut line: Vec<String> = shown
            .iter()
            .map(|&i| cells.get(i).map(cell_text).unwrap_or_default())
            .collect();
        if with_namespace {
            let ns = row["object"]["metadata"]["namespace"].as_str();
            line.insert(0, ns.unwrap_or_default().to_string());
        }
        lines.push(line);
    }
    align(&lines)
}

/// kubectl's tabwriter: every column but the last padded to its widest cell plus
/// [`TABWRITER_PADDING`], at least [`TABWRITER_MIN_WIDTH`].
fn align(lines: &[Vec<String>]) -> String {
    let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            let widest = lines
                .iter()
                .filter_map(|l| l.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0);
            (widest + TABWRITER_PADDING).max(TABWRITER_MIN_WIDTH)
        })
        .collect();
    let mut out = String::new();
    for line in lines {
        let mut text = String::new();
        for (i, cell) in line.iter().enumerate() {
            text.push_str(cell);
            if i + 1 < line.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dv_table() -> Value {
        json!({"kind": "Table", "columnDefinitions": [
            {"name": "Name", "type": "string", "priority": 0},
            {"name": "Phase", "type": "string", "priority": 0},
            {"name": "Progress", "type": "string", "priority": 0},
            {"name": "Restarts", "type": "integer", "priority": 0},
            {"name": "Age", "type": "string", "priority": 0},
            {"name": "Claim", "type": "string", "priority": 1},
        ], "rows": [
            {"cells": ["blank-image-datavolume", "Succeeded", "100.0%", 0, "5s", "blank-image-datavolume"],
             "object": {"metadata": {"name": "blank-image-datavolume", "namespace": "default"}}},
            {"cells": ["b", "Pending", "N/A", 12, "2m", null],
             "object": {"metadata": {"name": "b", "namespace": "alpha"}}},
        ]})
    }

    #[test]
    fn priority_zero_columns_align_like_kubectl() {
        let t = dv_table();
        let text = render_table(
            &t["columnDefinitions"],
            t["rows"].as_array().unwrap(),
            false,
            false,
        );
        assert_eq!(
            text,
            "NAME                     PHASE       PROGRESS   RESTARTS   AGE\n\
             blank-image-datavolume   Succeeded   100.0%     0          5s\n\
             b                        Pending     N/A        12         2m\n"
        );
    }

    #[test]
    fn wide_adds_the_other_columns_and_all_namespaces_the_namespace() {
        let t = dv_table();
        let text = render_table(
            &t["columnDefinitions"],
            t["rows"].as_array().unwrap(),
            true,
            true,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "NAMESPACE",
                "NAME",
                "PHASE",
                "PROGRESS",
                "RESTARTS",
                "AGE",
                "CLAIM"
            ]
        );
        assert!(
            lines[1].starts_with("default     blank-image-datavolume"),
            "{text}"
        );
        assert!(lines[2].ends_with("2m    <none>"), "{text}");
    }

    #[test]
    fn narrow_columns_keep_the_minimum_width() {
        let text = align(&[vec!["A".into(), "B".into()], vec!["x".into(), "y".into()]]);
        assert_eq!(text, "A     B\nx     y\n");
    }

    #[test]
    fn output_formats_parse() {
        assert_eq!(Output::parse(None).unwrap(), Output::Table { wide: false });
        assert_eq!(
            Output::parse(Some("wide")).unwrap(),
            Output::Table { wide: true }
        );
        assert_eq!(Output::parse(Some("yaml")).unwrap(), Output::Yaml);
        assert!(Output::parse(Some("jsonpath={.x}")).is_err());
    }

    #[test]
    fn events_sort_oldest_first_then_by_resource_version() {
        let mut evs = [
            json!({"metadata": {"resourceVersion": "9"}, "lastTimestamp": "2020-07-15T03:58:25Z"}),
            json!({"metadata": {"resourceVersion": "7"}, "lastTimestamp": "2020-07-15T03:58:24Z"}),
            json!({"metadata": {"resourceVersion": "5"}, "eventTime": "2020-07-15T03:58:24Z"}),
        ];
        evs.sort_by_key(event_order);
        let rvs: Vec<&str> = evs
            .iter()
            .map(|e| e["metadata"]["resourceVersion"].as_str().unwrap())
            .collect();
        assert_eq!(rvs, ["5", "7", "9"]);
    }
}
