//! Server-side tables (`meta.k8s.io/v1` `Table`): what `kubectl get` prints.
//!
//! kubectl asks for `Accept: application/json;as=Table;v=v1;g=meta.k8s.io` and prints the
//! columns the server chooses; for custom resources those are the CRD's printer columns, for
//! built-in kinds kube-apiserver's printers. This module is both for the kinds served here:
//! the columns, the cell texts (kubectl's pod status rules, ages as `kubectl` shows them) and
//! the row's object (`PartialObjectMetadata`, the full object or none, per `includeObject`).

use serde_json::{Value, json};

use crate::store::Kind;
use crate::util::parse_rfc3339;

/// `includeObject` of a table request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IncludeObject {
    /// No object in the rows.
    None,
    /// `PartialObjectMetadata` (the default).
    #[default]
    Metadata,
    /// The whole object.
    Object,
}

impl IncludeObject {
    /// Parse the query value (unknown values mean the default).
    pub fn parse(s: Option<&str>) -> IncludeObject {
        match s {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// Whether an `Accept` header asks for a `meta.k8s.io/v1` Table.
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').any(|media| {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        params.contains(&"as=Table")
            && params.contains(&"g=meta.k8s.io")
            && params.contains(&"v=v1")
    })
}

struct Col {
    name: &'static str,
    ty: &'static str,
    format: &'static str,
    priority: u8,
    description: &'static str,
}

const fn col(name: &'static str, ty: &'static str, description: &'static str) -> Col {
    Col {
        name,
        ty,
        format: "",
        priority: 0,
        description,
    }
}

const fn wide(name: &'static str, description: &'static str) -> Col {
    Col {
        name,
        ty: "string",
        format: "",
        priority: 1,
        description,
    }
}

const NAME: Col = Col {
    name: "Name",
    ty: "string",
    format: "name",
    priority: 0,
    description: "Name must be unique within a namespace.",
};
const AGE: Col = col(
    "Age",
    "string",
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
);

fn columns(kind: Kind) -> Vec<Col> {
    match kind {
        Kind::DataVolume => vec![
            NAME,
            col("Phase", "string", "The phase the data volume is in"),
            col(
                "Progress",
                "string",
                "Transfer progress in percentage if known, N/A otherwise",
            ),
            col(
                "Restarts",
                "integer",
                "The number of times the transfer has been restarted.",
            ),
            AGE,
        ],
        Kind::PersistentVolumeClaim => vec![
            NAME,
            col("Status", "string", "The phase of the claim."),
            col(
                "Volume",
                "string",
                "The binding reference to the PersistentVolume backing this claim.",
            ),
            col(
                "Capacity",
                "string",
                "The actual resources of the underlying volume.",
            ),
            col(
                "Access Modes",
                "string",
                "The actual access modes the volume backing the claim has.",
            ),
            col(
                "StorageClass",
                "string",
                "Name of the StorageClass required by the claim.",
            ),
            AGE,
            wide(
                "VolumeMode",
                "Whether the volume is a filesystem or a raw block device.",
            ),
        ],
        Kind::PersistentVolume => vec![
            NAME,
            col("Capacity", "string", "The capacity of the volume."),
            col(
                "Access Modes",
                "string",
                "All ways the volume can be mounted.",
            ),
            col(
                "Reclaim Policy",
                "string",
                "What happens to the volume when released from its claim.",
            ),
            col("Status", "string", "The phase of the volume."),
            col("Claim", "string", "The claim bound to the volume."),
            col(
                "StorageClass",
                "string",
                "Name of the StorageClass the volume belongs to.",
            ),
            col("Reason", "string", "Why the volume is in its phase."),
            AGE,
            wide(
                "VolumeMode",
                "Whether the volume is a filesystem or a raw block device.",
            ),
        ],
        Kind::Pod => vec![
            NAME,
            col(
                "Ready",
                "string",
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            col(
                "Status",
                "string",
                "The aggregate status of the containers in this pod.",
            ),
            col(
                "Restarts",
                "string",
                "The number of times the containers in this pod have been restarted.",
            ),
            AGE,
            wide("IP", "IP address allocated to the pod."),
            wide("Node", "Name of the node this pod runs on."),
        ],
        Kind::Service => vec![
            NAME,
            col("Type", "string", "How the service is exposed."),
            col("Cluster-IP", "string", "The IP address of the service."),
            col(
                "External-IP",
                "string",
                "External IP addresses of the service.",
            ),
            col("Port(s)", "string", "The ports the service exposes."),
            AGE,
            wide("Selector", "Pods this service routes traffic to."),
        ],
        Kind::Event => vec![
            col(
                "Last Seen",
                "string",
                "The time at which the most recent occurrence of this event was recorded.",
            ),
            col("Type", "string", "Type of this event (Normal, Warning)."),
            col("Reason", "string", "Why the action was taken."),
            col("Object", "string", "The object this event is about."),
            wide("Source", "The component reporting this event."),
            col(
                "Message",
                "string",
                "A human-readable description of the status of this operation.",
            ),
            wide(
                "First Seen",
                "The time at which the event was first recorded.",
            ),
            wide("Count", "The number of times this event has occurred."),
            Col {
                priority: 1,
                ..NAME
            },
        ],
        Kind::StorageClass => vec![
            NAME,
            col(
                "Provisioner",
                "string",
                "The provisioner of volumes of this class.",
            ),
            col(
                "ReclaimPolicy",
                "string",
                "What happens to volumes of this class when released.",
            ),
            col(
                "VolumeBindingMode",
                "string",
                "When volumes of this class are bound.",
            ),
            col(
                "AllowVolumeExpansion",
                "string",
                "Whether volumes of this class can be expanded.",
            ),
            AGE,
        ],
        Kind::Namespace => vec![
            NAME,
            col("Status", "string", "The phase of the namespace."),
            AGE,
        ],
        Kind::DataSource => vec![
            NAME,
            col("Ready", "string", "The Ready condition of the data source."),
            col(
                "Source",
                "string",
                "The PVC or snapshot the data source points to.",
            ),
            AGE,
        ],
        Kind::DataImportCron => vec![
            NAME,
            col("Schedule", "string", "When imports run (cron syntax)."),
            col(
                "DataSource",
                "string",
                "The DataSource the imports keep up to date.",
            ),
            col("Last Import", "string", "When the last import finished."),
            AGE,
        ],
        Kind::VolumeSnapshot => vec![
            NAME,
            col(
                "ReadyToUse",
                "string",
                "Whether the snapshot can be used to restore a volume.",
            ),
            col(
                "SourcePVC",
                "string",
                "The claim the snapshot is taken from.",
            ),
            col(
                "RestoreSize",
                "string",
                "Minimum size of a volume restored from the snapshot.",
            ),
            col(
                "SnapshotClass",
                "string",
                "The VolumeSnapshotClass of the snapshot.",
            ),
            AGE,
        ],
        Kind::VolumeSnapshotClass => vec![
            NAME,
            col(
                "Driver",
                "string",
                "The CSI driver taking snapshots of this class.",
            ),
            col(
                "DeletionPolicy",
                "string",
                "What happens to snapshot contents when the snapshot is deleted.",
            ),
            AGE,
        ],
        Kind::Secret => vec![
            NAME,
            col("Type", "string", "The type of the secret."),
            col("Data", "integer", "The number of entries in the secret."),
            AGE,
        ],
        Kind::ConfigMap => vec![
            NAME,
            col(
                "Data",
                "integer",
                "The number of entries in the config map.",
            ),
            AGE,
        ],
        Kind::Lease => vec![
            NAME,
            col("Holder", "string", "The current holder of the lease."),
            AGE,
        ],
        Kind::StorageProfile | Kind::CdiConfig => vec![NAME, AGE],
    }
}

/// kubectl's human duration (`apimachinery/pkg/util/duration.HumanDuration`).
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = secs / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let d = (hours / 24) % 365;
        return if d == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{d}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

/// Age of an RFC 3339 timestamp as kubectl shows it, `<unknown>` when absent.
fn since(ts: &Value, now: u64) -> String {
    match ts.as_str().and_then(parse_rfc3339) {
        Some(t) => human_duration(now as i64 - t as i64),
        None => "<unknown>".into(),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn or_none(v: String) -> String {
    if v.is_empty() { "<none>".into() } else { v }
}

fn short_mode(m: &str) -> &str {
    match m {
        "ReadWriteOnce" => "RWO",
        "ReadOnlyMany" => "ROX",
        "ReadWriteMany" => "RWX",
        "ReadWriteOncePod" => "RWOP",
        other => other,
    }
}

/// Bytes as a Kubernetes-style binary quantity when exact (`2Gi`), else plain bytes.
fn human_bytes(n: u64) -> String {
    for (suffix, unit) in [
        ("Ti", 1u64 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ] {
        if n >= unit && n.is_multiple_of(unit) {
            return format!("{}{suffix}", n / unit);
        }
    }
    n.to_string()
}

fn access_modes(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|m| short_mode(m.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// A capacity as stored: byte counts shown as exact binary quantities (`2Gi`).
fn quantity(v: &Value) -> String {
    match v {
        Value::String(q) => match q.parse::<u64>() {
            Ok(n) => human_bytes(n),
            Err(_) => q.clone(),
        },
        Value::Number(n) => n.as_u64().map(human_bytes).unwrap_or_default(),
        _ => String::new(),
    }
}

fn condition<'a>(o: &'a Value, t: &str) -> &'a Value {
    o["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == t))
        .unwrap_or(&Value::Null)
}

/// The pod's STATUS and READY cells and its restart count, by kubectl's `printPod` rules.
pub fn pod_status(pod: &Value) -> (String, String, u64) {
    let st = &pod["status"];
    let total = pod["spec"]["containers"].as_array().map_or(0, Vec::len);
    let mut reason = s(&st["phase"]);
    if let Some(r) = st["reason"].as_str().filter(|r| !r.is_empty()) {
        reason = r.to_string();
    }
    let mut restarts = 0;
    let mut ready = 0;
    let mut initializing = false;
    let inits = st["initContainerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let init_total = pod["spec"]["initContainers"].as_array().map_or(0, Vec::len);
    for (i, c) in inits.iter().enumerate() {
        restarts += c["restartCount"].as_u64().unwrap_or(0);
        let term = &c["state"]["terminated"];
        let wait_reason = c["state"]["waiting"]["reason"].as_str().unwrap_or_default();
        if term.is_object() && term["exitCode"].as_i64() == Some(0) {
            continue;
        }
        if term.is_object() {
            reason = match term["reason"].as_str().filter(|r| !r.is_empty()) {
                Some(r) => format!("Init:{r}"),
                None => match term["signal"].as_i64().filter(|s| *s != 0) {
                    Some(sig) => format!("Init:Signal:{sig}"),
                    None => format!("Init:ExitCode:{}", term["exitCode"].as_i64().unwrap_or(0)),
                },
            };
        } else if !wait_reason.is_empty() && wait_reason != "PodInitializing" {
            reason = format!("Init:{wait_reason}");
        } else {
            reason = format!("Init:{i}/{init_total}");
        }
        initializing = true;
        break;
    }
    if !initializing {
        restarts = 0;
        let mut has_running = false;
        let statuses = st["containerStatuses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for c in statuses.iter().rev() {
            restarts += c["restartCount"].as_u64().unwrap_or(0);
            let state = &c["state"];
            let waiting = state["waiting"]["reason"].as_str().unwrap_or_default();
            let term = &state["terminated"];
            if !waiting.is_empty() {
                reason = waiting.to_string();
            } else if let Some(r) = term["reason"].as_str().filter(|r| !r.is_empty()) {
                reason = r.to_string();
            } else if term.is_object() {
                reason = match term["signal"].as_i64().filter(|s| *s != 0) {
                    Some(sig) => format!("Signal:{sig}"),
                    None => format!("ExitCode:{}", term["exitCode"].as_i64().unwrap_or(0)),
                };
            } else if c["ready"] == true && state["running"].is_object() {
                has_running = true;
                ready += 1;
            }
        }
        if reason == "Completed" && has_running {
            reason = if condition(pod, "Ready")["status"] == "True" {
                "Running".into()
            } else {
                "NotReady".into()
            };
        }
    }
    if !pod["metadata"]["deletionTimestamp"].is_null() {
        reason = if st["reason"] == "NodeLost" {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    (reason, format!("{ready}/{total}"), restarts)
}

fn service_ports(svc: &Value) -> String {
    let ports: Vec<String> = svc["spec"]["ports"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let proto = p["protocol"].as_str().unwrap_or("TCP");
                    match p["nodePort"].as_u64() {
                        Some(np) => format!("{}:{np}/{proto}", s(&p["port"])),
                        None => format!("{}/{proto}", s(&p["port"])),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    or_none(ports.join(","))
}

fn service_external_ips(svc: &Value) -> String {
    let mut ips: Vec<String> = svc["spec"]["externalIPs"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    if let Some(ing) = svc["status"]["loadBalancer"]["ingress"].as_array() {
        ips.extend(ing.iter().map(|i| {
            i["ip"]
                .as_str()
                .or(i["hostname"].as_str())
                .unwrap_or_default()
                .to_string()
        }));
    }
    if ips.is_empty() && svc["spec"]["type"] == "LoadBalancer" {
        return "<pending>".into();
    }
    or_none(ips.join(","))
}

fn map_text(v: &Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", s(v)))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn cells(kind: Kind, o: &Value, now: u64) -> Vec<Value> {
    let name = json!(s(&o["metadata"]["name"]));
    let age = json!(since(&o["metadata"]["creationTimestamp"], now));
    let st = &o["status"];
    match kind {
        Kind::DataVolume => vec![
            name,
            json!(s(&st["phase"])),
            json!(if st["progress"].is_null() {
                "N/A".into()
            } else {
                s(&st["progress"])
            }),
            json!(st["restartCount"].as_u64().unwrap_or(0)),
            age,
        ],
        Kind::PersistentVolumeClaim => vec![
            name,
            json!(s(&st["phase"])),
            json!(s(&o["spec"]["volumeName"])),
            json!(quantity(&st["capacity"]["storage"])),
            json!(access_modes(&st["accessModes"])),
            json!(or_unset(s(&o["spec"]["storageClassName"]))),
            age,
            json!(s(&o["spec"]["volumeMode"])),
        ],
        Kind::PersistentVolume => {
            let claim = match o["spec"]["claimRef"]["name"].as_str() {
                Some(n) => format!("{}/{n}", s(&o["spec"]["claimRef"]["namespace"])),
                None => String::new(),
            };
            vec![
                name,
                json!(quantity(&o["spec"]["capacity"]["storage"])),
                json!(access_modes(&o["spec"]["accessModes"])),
                json!(s(&o["spec"]["persistentVolumeReclaimPolicy"])),
                json!(s(&st["phase"])),
                json!(claim),
                json!(s(&o["spec"]["storageClassName"])),
                json!(s(&st["reason"])),
                age,
                json!(s(&o["spec"]["volumeMode"])),
            ]
        }
        Kind::Pod => {
            let (status, ready, restarts) = pod_status(o);
            vec![
                name,
                json!(ready),
                json!(status),
                json!(restarts.to_string()),
                age,
                json!(or_none(s(&st["podIP"]))),
                json!(or_none(s(&o["spec"]["nodeName"]))),
            ]
        }
        Kind::Service => vec![
            name,
            json!(o["spec"]["type"].as_str().unwrap_or("ClusterIP")),
            json!(or_none(s(&o["spec"]["clusterIP"]))),
            json!(service_external_ips(o)),
            json!(service_ports(o)),
            age,
            json!(or_none(map_text(&o["spec"]["selector"]))),
        ],
        Kind::Event => {
            let last = if o["lastTimestamp"].is_string() {
                since(&o["lastTimestamp"], now)
            } else {
                since(&o["eventTime"], now)
            };
            let obj = format!(
                "{}/{}",
                s(&o["involvedObject"]["kind"]).to_ascii_lowercase(),
                s(&o["involvedObject"]["name"])
            );
            vec![
                json!(last),
                json!(s(&o["type"])),
                json!(s(&o["reason"])),
                json!(obj),
                json!(s(&o["source"]["component"])),
                json!(s(&o["message"])),
                json!(since(&o["firstTimestamp"], now)),
                json!(o["count"].as_u64().unwrap_or(1)),
                name,
            ]
        }
        Kind::StorageClass => {
            let mut n = s(&o["metadata"]["name"]);
            if o["metadata"]["annotations"][cdi_api::resources::ANN_DEFAULT_CLASS] == "true" {
                n.push_str(" (default)");
            }
            vec![
                json!(n),
                json!(s(&o["provisioner"])),
                json!(o["reclaimPolicy"].as_str().unwrap_or("Delete")),
                json!(o["volumeBindingMode"].as_str().unwrap_or("Immediate")),
                json!(
                    o["allowVolumeExpansion"]
                        .as_bool()
                        .unwrap_or(false)
                        .to_string()
                ),
                age,
            ]
        }
        Kind::Namespace => vec![name, json!(s(&st["phase"])), age],
        Kind::DataSource => {
            let src = &o["spec"]["source"];
            let source = if let Some(n) = src["pvc"]["name"].as_str() {
                format!("pvc/{}/{n}", s(&src["pvc"]["namespace"]))
            } else if let Some(n) = src["snapshot"]["name"].as_str() {
                format!("snapshot/{}/{n}", s(&src["snapshot"]["namespace"]))
            } else {
                String::new()
            };
            vec![
                name,
                json!(s(&condition(o, "Ready")["status"])),
                json!(source),
                age,
            ]
        }
        Kind::DataImportCron => vec![
            name,
            json!(s(&o["spec"]["schedule"])),
            json!(s(&o["spec"]["managedDataSource"])),
            json!(if st["lastImportTimestamp"].is_string() {
                since(&st["lastImportTimestamp"], now)
            } else {
                String::new()
            }),
            age,
        ],
        Kind::VolumeSnapshot => {
            let src = &o["spec"]["source"];
            vec![
                name,
                json!(s(&st["readyToUse"])),
                json!(s(&src["persistentVolumeClaimName"])),
                json!(quantity(&st["restoreSize"])),
                json!(s(&o["spec"]["volumeSnapshotClassName"])),
                age,
            ]
        }
        Kind::VolumeSnapshotClass => vec![
            name,
            json!(s(&o["driver"])),
            json!(s(&o["deletionPolicy"])),
            age,
        ],
        Kind::Secret => vec![
            name,
            json!(o["type"].as_str().unwrap_or("Opaque")),
            json!(o["data"].as_object().map_or(0, |m| m.len())),
            age,
        ],
        Kind::ConfigMap => {
            let n = o["data"].as_object().map_or(0, |m| m.len())
                + o["binaryData"].as_object().map_or(0, |m| m.len());
            vec![name, json!(n), age]
        }
        Kind::Lease => vec![name, json!(s(&o["spec"]["holderIdentity"])), age],
        Kind::StorageProfile | Kind::CdiConfig => vec![name, age],
    }
}

fn or_unset(v: String) -> String {
    if v.is_empty() { "<unset>".into() } else { v }
}

/// The row object for `include`.
fn row_object(o: &Value, include: IncludeObject) -> Option<Value> {
    match include {
        IncludeObject::None => None,
        IncludeObject::Object => Some(o.clone()),
        IncludeObject::Metadata => Some(json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": o["metadata"],
        })),
    }
}

/// A `Table` of `items` (without list metadata; the caller adds `metadata`).
pub fn table(kind: Kind, items: &[Value], include: IncludeObject, now: u64) -> Value {
    let defs: Vec<Value> = columns(kind)
        .iter()
        .map(|c| {
            json!({"name": c.name, "type": c.ty, "format": c.format,
                   "description": c.description, "priority": c.priority})
        })
        .collect();
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut row = json!({"cells": cells(kind, o, now)});
            if let Some(obj) = row_object(o, include) {
                row["object"] = obj;
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": defs,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rfc3339;

    const NOW: u64 = 1_800_000_000;

    fn cells_of(kind: Kind, o: Value) -> Vec<Value> {
        let t = table(kind, &[o], IncludeObject::Metadata, NOW);
        assert_eq!(
            t["columnDefinitions"].as_array().unwrap().len(),
            t["rows"][0]["cells"].as_array().unwrap().len(),
            "one cell per column"
        );
        t["rows"][0]["cells"].as_array().unwrap().clone()
    }

    #[test]
    fn accept_headers_asking_for_tables() {
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
        assert!(!wants_table(
            "application/json;as=Table;v=v1beta1;g=meta.k8s.io"
        ));
    }

    #[test]
    fn quantities_render() {
        assert_eq!(human_bytes(2 << 30), "2Gi");
        assert_eq!(human_bytes(1_132_797_625), "1132797625");
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 120), "3h2m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
        assert_eq!(human_duration(100 * 86400), "100d");
        assert_eq!(human_duration(-5), "<invalid>");
    }

    #[test]
    fn datavolume_rows_show_phase_progress_restarts() {
        let c = cells_of(
            Kind::DataVolume,
            json!({"metadata": {"name": "dv", "creationTimestamp": rfc3339(NOW - 90)},
                   "status": {"phase": "ImportInProgress", "progress": "45.00%", "restartCount": 2}}),
        );
        assert_eq!(
            c,
            vec![
                json!("dv"),
                json!("ImportInProgress"),
                json!("45.00%"),
                json!(2),
                json!("90s")
            ]
        );
        let c = cells_of(Kind::DataVolume, json!({"metadata": {"name": "new"}}));
        assert_eq!(c[2], "N/A");
        assert_eq!(c[4], "<unknown>");
    }

    #[test]
    fn pvc_and_pv_rows() {
        let c = cells_of(
            Kind::PersistentVolumeClaim,
            json!({"metadata": {"name": "p"}, "spec": {"volumeName": "pv-1", "storageClassName": "local", "volumeMode": "Filesystem"},
                   "status": {"phase": "Bound", "capacity": {"storage": "2147483648"}, "accessModes": ["ReadWriteOnce"]}}),
        );
        assert_eq!(
            &c[..6],
            &[
                json!("p"),
                json!("Bound"),
                json!("pv-1"),
                json!("2Gi"),
                json!("RWO"),
                json!("local")
            ]
        );
        assert_eq!(c[7], "Filesystem");
        let c = cells_of(
            Kind::PersistentVolume,
            json!({"metadata": {"name": "pv-1"}, "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                   "persistentVolumeReclaimPolicy": "Delete", "claimRef": {"namespace": "ns", "name": "p"}, "storageClassName": "local"},
                   "status": {"phase": "Bound"}}),
        );
        assert_eq!(
            &c[..7],
            &[
                json!("pv-1"),
                json!("1Gi"),
                json!("RWX"),
                json!("Delete"),
                json!("Bound"),
                json!("ns/p"),
                json!("local")
            ]
        );
    }

    #[test]
    fn pod_status_follows_kubectl() {
        let pod = |statuses: Value, phase: &str| {
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]},
                   "status": {"phase": phase, "containerStatuses": statuses}})
        };
        let running = pod(
            json!([{"name": "c", "ready": true, "restartCount": 1, "state": {"running": {}}}]),
            "Running",
        );
        assert_eq!(pod_status(&running), ("Running".into(), "1/1".into(), 1));
        let done = pod(
            json!([{"name": "c", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]),
            "Succeeded",
        );
        assert_eq!(pod_status(&done).0, "Completed");
        let failed = pod(
            json!([{"name": "c", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]),
            "Failed",
        );
        assert_eq!(pod_status(&failed).0, "Error");
        let sig = pod(
            json!([{"name": "c", "state": {"terminated": {"exitCode": 137, "signal": 9}}}]),
            "Failed",
        );
        assert_eq!(pod_status(&sig).0, "Signal:9");
        let crash = pod(
            json!([{"name": "c", "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]),
            "Running",
        );
        assert_eq!(
            pod_status(&crash),
            ("CrashLoopBackOff".into(), "0/1".into(), 4)
        );
        let pending = pod(json!(null), "Pending");
        assert_eq!(pod_status(&pending), ("Pending".into(), "0/1".into(), 0));
        let mut term = running.clone();
        term["metadata"]["deletionTimestamp"] = json!(rfc3339(NOW));
        assert_eq!(pod_status(&term).0, "Terminating");
        let init = json!({"metadata": {"name": "p"}, "spec": {"initContainers": [{"name": "i"}], "containers": [{"name": "c"}]},
                          "status": {"phase": "Pending", "initContainerStatuses": [{"name": "i", "state": {"running": {}}}]}});
        assert_eq!(pod_status(&init).0, "Init:0/1");
    }

    #[test]
    fn events_classes_and_services() {
        let c = cells_of(
            Kind::Event,
            json!({"metadata": {"name": "e"}, "lastTimestamp": rfc3339(NOW - 30), "type": "Normal", "reason": "Bound",
                   "involvedObject": {"kind": "DataVolume", "name": "dv"}, "message": "ok", "count": 3}),
        );
        assert_eq!(
            &c[..4],
            &[
                json!("30s"),
                json!("Normal"),
                json!("Bound"),
                json!("datavolume/dv")
            ]
        );
        assert_eq!(c[5], "ok");
        let c = cells_of(
            Kind::StorageClass,
            json!({"metadata": {"name": "local", "annotations": {cdi_api::resources::ANN_DEFAULT_CLASS: "true"}},
                   "provisioner": "p", "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate", "allowVolumeExpansion": false}),
        );
        assert_eq!(
            &c[..5],
            &[
                json!("local (default)"),
                json!("p"),
                json!("Delete"),
                json!("Immediate"),
                json!("false")
            ]
        );
        let c = cells_of(
            Kind::Service,
            json!({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "clusterIP": "10.0.0.1",
                   "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]}}),
        );
        assert_eq!(
            &c[..5],
            &[
                json!("s"),
                json!("NodePort"),
                json!("10.0.0.1"),
                json!("<none>"),
                json!("80:30080/TCP,53/UDP")
            ]
        );
    }

    #[test]
    fn rows_carry_the_object_asked_for() {
        let o = json!({"metadata": {"name": "c", "namespace": "ns"}, "data": {"a": "1"}});
        let t = table(
            Kind::ConfigMap,
            std::slice::from_ref(&o),
            IncludeObject::Metadata,
            NOW,
        );
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["rows"][0]["object"]["metadata"]["namespace"], "ns");
        assert!(t["rows"][0]["object"]["data"].is_null());
        let t = table(
            Kind::ConfigMap,
            std::slice::from_ref(&o),
            IncludeObject::Object,
            NOW,
        );
        assert_eq!(t["rows"][0]["object"], o);
        let t = table(Kind::ConfigMap, &[o], IncludeObject::None, NOW);
        assert!(t["rows"][0].get("object").is_none());
        assert_eq!(t["rows"][0]["cells"][1], 1);
    }
}
