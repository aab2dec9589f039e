//! `cdi serve` and the client commands (`apply`, `get`, `describe`, `delete`, `wait`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cdi_api::client::{ClientFlags, DEFAULT_DATA_DIR, DEFAULT_LISTEN};
use serde_json::{Value, json};

use crate::client::{ApiError, Client, collection_path, item_path};
use crate::store::Kind;
use crate::util::{age, now_secs, parse_rfc3339};

/// Subcommands this crate contributes to the `cdi` binary.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the embedded control plane: resource API, controller and workers on one host.
    Serve(ServeArgs),
    /// Create or update resources from YAML or JSON manifests (multi-document).
    Apply(ApplyArgs),
    /// List resources or show one (`dv`, `pvc`, `storageclass`, `storageprofile`, `cdiconfig`, …).
    Get(GetArgs),
    /// Show a resource with its conditions and events, like `oc describe`.
    Describe(DescribeArgs),
    /// Delete a resource.
    Delete(DeleteArgs),
    /// Wait until a resource meets a condition.
    Wait(WaitArgs),
}

/// Arguments of `cdi serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Data directory (database, PKI, volumes).
    #[arg(long, env = cdi_api::client::CDI_HOME, default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Address to listen on (port 0 picks a free port; see DATA_DIR/server.url).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: std::net::SocketAddr,
    /// First worker-restart back-off (doubles per restart, capped at 5m), e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    restart_backoff: Duration,
}

/// Connection flags shared by the client commands.
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    /// Server URL (default: DATA_DIR/server.url).
    #[arg(long, global = true)]
    server: Option<String>,
    /// Bearer token (default: DATA_DIR/admin.token).
    #[arg(long, global = true)]
    token: Option<String>,
    /// CA certificate to trust (default: DATA_DIR/pki/ca.crt).
    #[arg(long, global = true)]
    ca_cert: Option<PathBuf>,
    /// Data directory of `cdi serve` (default: $CDI_HOME, else ./cdi-data).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Namespace.
    #[arg(short = 'n', long, global = true, default_value = "default")]
    namespace: String,
}

/// Arguments of `cdi apply`.
#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// Manifest file (`-` for stdin).
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<String>,
    #[command(flatten)]
    conn: Conn,
}

/// Arguments of `cdi get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Resource type.
    resource: String,
    /// Name (all when omitted).
    name: Option<String>,
    /// Output format: yaml, json or wide.
    #[arg(short = 'o', long)]
    output: Option<String>,
    /// List across all namespaces.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    #[command(flatten)]
    conn: Conn,
}

/// Arguments of `cdi describe`.
#[derive(Debug, clap::Args)]
pub struct DescribeArgs {
    /// Resource type.
    resource: String,
    /// Name.
    name: String,
    #[command(flatten)]
    conn: Conn,
}

/// Arguments of `cdi delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Resource type.
    resource: String,
    /// Names.
    #[arg(required = true)]
    names: Vec<String>,
    #[command(flatten)]
    conn: Conn,
}

/// Arguments of `cdi wait`.
#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// Resource type.
    resource: String,
    /// Name.
    name: String,
    /// `condition=Ready`, `condition=Running=False`, `phase=Succeeded` or `delete`.
    #[arg(long = "for")]
    for_: String,
    /// Give up after this long (e.g. 30s, 5m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    conn: Conn,
}

/// Parse `500ms`, `10s`, `5m`, `1h` (or bare seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Resource-type names the CLI accepts.
pub fn kind_of(resource: &str) -> Option<Kind> {
    let r = resource.to_ascii_lowercase();
    let r = r.split('.').next().unwrap_or(&r).to_string();
    Some(match r.as_str() {
        "dv" | "dvs" | "datavolume" | "datavolumes" => Kind::DataVolume,
        "pvc" | "pvcs" | "persistentvolumeclaim" | "persistentvolumeclaims" => {
            Kind::PersistentVolumeClaim
        }
        "sc" | "storageclass" | "storageclasses" => Kind::StorageClass,
        "storageprofile" | "storageprofiles" => Kind::StorageProfile,
        "cdiconfig" | "cdiconfigs" => Kind::CdiConfig,
        "ev" | "event" | "events" => Kind::Event,
        "secret" | "secrets" => Kind::Secret,
        "cm" | "configmap" | "configmaps" => Kind::ConfigMap,
        "po" | "pod" | "pods" => Kind::Pod,
        "svc" | "service" | "services" => Kind::Service,
        "pv" | "persistentvolume" | "persistentvolumes" => Kind::PersistentVolume,
        "ns" | "namespace" | "namespaces" => Kind::Namespace,
        "das" | "datasource" | "datasources" => Kind::DataSource,
        "dic" | "dics" | "dataimportcron" | "dataimportcrons" => Kind::DataImportCron,
        "vs" | "volumesnapshot" | "volumesnapshots" => Kind::VolumeSnapshot,
        "vsclass" | "vsclasses" | "volumesnapshotclass" | "volumesnapshotclasses" => {
            Kind::VolumeSnapshotClass
        }
        "lease" | "leases" => Kind::Lease,
        _ => return None,
    })
}

fn kind_from_manifest(kind: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.name() == kind)
}

impl Command {
    /// Run the subcommand.
    pub fn run(self) -> ExitCode {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("error: starting the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let result = rt.block_on(async {
            match self {
                Command::Serve(a) => {
                    init_tracing();
                    crate::serve::serve(crate::serve::ServeOptions {
                        data_dir: a.data_dir,
                        listen: a.listen,
                        backoff_base: a.restart_backoff,
                    })
                    .await
                    .map_err(|e| format!("{e:#}"))
                }
                Command::Apply(a) => apply(a).await,
                Command::Get(a) => get(a).await,
                Command::Describe(a) => describe(a).await,
                Command::Delete(a) => delete(a).await,
                Command::Wait(a) => wait(a).await,
            }
        });
        // `cdi serve` stops its pods before returning; anything else gets a short grace.
        rt.shutdown_timeout(Duration::from_secs(5));
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn connect(c: &Conn) -> Result<Client, String> {
    let flags = ClientFlags {
        server: c.server.clone(),
        token: c.token.clone(),
        ca_cert: c.ca_cert.clone(),
        data_dir: c.data_dir.clone(),
    };
    Client::new(&flags.resolve()?)
}

fn resource_kind(resource: &str) -> Result<Kind, String> {
    kind_of(resource).ok_or_else(|| format!("the server doesn't have a resource type {resource:?}"))
}

fn display_name(kind: Kind) -> String {
    match kind.group() {
        "" => kind.name().to_ascii_lowercase(),
        g => format!("{}.{g}", kind.name().to_ascii_lowercase()),
    }
}

/// Split a manifest stream into objects (YAML multi-document or JSON; `List` kinds expanded).
pub fn parse_manifests(text: &str) -> Result<Vec<Value>, String> {
    let docs: Vec<Value> = match serde_json::from_str::<Value>(text) {
        Ok(v) => vec![v],
        Err(_) => serde_saphyr::from_multiple::<Value>(text)
            .map_err(|e| format!("parsing manifest: {e}"))?,
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

async fn apply(a: ApplyArgs) -> Result<(), String> {
    let client = connect(&a.conn)?;
    let mut failed = false;
    for f in &a.files {
        let text = if f == "-" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .map_err(|e| format!("reading stdin: {e}"))?;
            s
        } else {
            std::fs::read_to_string(f).map_err(|e| format!("reading {f}: {e}"))?
        };
        for obj in parse_manifests(&text)? {
            if let Err(e) = apply_one(&client, &a.conn.namespace, obj).await {
                eprintln!("error: {e}");
                failed = true;
            }
        }
    }
    if failed {
        Err("some objects were not applied".into())
    } else {
        Ok(())
    }
}

async fn apply_one(client: &Client, default_ns: &str, mut obj: Value) -> Result<(), String> {
    let kind_name = obj["kind"].as_str().unwrap_or_default().to_string();
    let kind =
        kind_from_manifest(&kind_name).ok_or_else(|| format!("unsupported kind {kind_name:?}"))?;
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ns = if kind.namespaced() {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or(default_ns)
            .to_string();
        obj["metadata"]["namespace"] = json!(ns);
        ns
    } else {
        String::new()
    };
    let what = format!("{}/{name}", display_name(kind));
    match client.get(&item_path(kind, &ns, &name)).await {
        Err(e) if e.code() == Some(404) => {
            client
                .post(&collection_path(kind, Some(&ns)), &obj)
                .await
                .map_err(|e| e.to_string())?;
            println!("{what} created");
        }
        Err(e) => return Err(e.to_string()),
        Ok(existing) => {
            // Merge onto the stored object: the user's spec/data and metadata labels and
            // annotations win; identity and status stay.
            let mut merged = existing.clone();
            for (k, v) in obj.as_object().into_iter().flatten() {
                if !matches!(k.as_str(), "metadata" | "status" | "apiVersion" | "kind") {
                    merged[k] = v.clone();
                }
            }
            for k in ["labels", "annotations"] {
                if let Some(m) = obj["metadata"][k].as_object() {
                    for (lk, lv) in m {
                        merged["metadata"][k][lk] = lv.clone();
                    }
                }
            }
            if merged == existing {
                println!("{what} unchanged");
                return Ok(());
            }
            client
                .put(&item_path(kind, &ns, &name), &merged)
                .await
                .map_err(|e| e.to_string())?;
            println!("{what} configured");
        }
    }
    Ok(())
}

async fn get(a: GetArgs) -> Result<(), String> {
    let kind = resource_kind(&a.resource)?;
    let client = connect(&a.conn)?;
    let ns = a.conn.namespace.as_str();
    let output = a.output.as_deref().unwrap_or("");
    let items = match &a.name {
        Some(n) => vec![
            client
                .get(&item_path(kind, ns, n))
                .await
                .map_err(|e| e.to_string())?,
        ],
        None => {
            let path = collection_path(kind, if a.all_namespaces { None } else { Some(ns) });
            let list = client.get(&path).await.map_err(|e| e.to_string())?;
            list["items"].as_array().cloned().unwrap_or_default()
        }
    };
    let mut items = items;
    if kind == Kind::Event {
        // Oldest first, as kubectl sorts events; the resource version orders same-second ones.
        items.sort_by_key(|e| {
            let t = e["lastTimestamp"]
                .as_str()
                .and_then(parse_rfc3339)
                .unwrap_or(0);
            let rv = e["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|r| r.parse::<u64>().ok());
            (t, rv.unwrap_or(0))
        });
    }
    let single = a.name.is_some();
    let doc = if single {
        items.first().cloned().unwrap_or(Value::Null)
    } else {
        json!({"apiVersion": "v1", "kind": "List", "items": items})
    };
    match output {
        "json" => println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default()),
        "yaml" => print!(
            "{}",
            serde_saphyr::to_string(&doc).map_err(|e| format!("rendering YAML: {e}"))?
        ),
        "" | "wide" => {
            if items.is_empty() {
                if kind.namespaced() && !a.all_namespaces {
                    eprintln!("No resources found in {ns} namespace.");
                } else {
                    eprintln!("No resources found");
                }
                return Ok(());
            }
            print!(
                "{}",
                table(kind, &items, output == "wide", a.all_namespaces)
            );
        }
        other => {
            return Err(format!(
                "unknown output format {other:?} (use yaml, json or wide)"
            ));
        }
    }
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Table rows like kubectl prints them.
pub fn table(kind: Kind, items: &[Value], wide: bool, with_ns: bool) -> String {
    let now = now_secs();
    let age_of = |o: &Value| {
        o["metadata"]["creationTimestamp"]
            .as_str()
            .and_then(parse_rfc3339)
            .map(|t| age(t, now))
            .unwrap_or_default()
    };
    let (mut head, rows): (Vec<&str>, Vec<Vec<String>>) = match kind {
        Kind::DataVolume => {
            let mut h = vec!["NAME", "PHASE", "PROGRESS", "RESTARTS", "AGE"];
            if wide {
                h.extend(["SOURCE", "CLAIM"]);
            }
            let rows = items
                .iter()
                .map(|o| {
                    let st = &o["status"];
                    let mut r = vec![
                        s(&o["metadata"]["name"]),
                        s(&st["phase"]),
                        s(&st["progress"]),
                        st["restartCount"].as_u64().unwrap_or(0).to_string(),
                        age_of(o),
                    ];
                    if wide {
                        let src = o["spec"]["source"]
                            .as_object()
                            .and_then(|m| m.keys().next().cloned())
                            .unwrap_or_default();
                        r.extend([src, s(&st["claimName"])]);
                    }
                    r
                })
                .collect();
            (h, rows)
        }
        Kind::PersistentVolumeClaim => {
            let mut h = vec![
                "NAME",
                "STATUS",
                "VOLUME",
                "CAPACITY",
                "ACCESS MODES",
                "STORAGECLASS",
                "AGE",
            ];
            if wide {
                h.push("VOLUMEMODE");
            }
            let rows = items
                .iter()
                .map(|o| {
                    let modes = o["status"]["accessModes"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|m| short_mode(m.as_str().unwrap_or_default()))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    let cap = o["status"]["capacity"]["storage"]
                        .as_str()
                        .and_then(|c| c.parse::<u64>().ok())
                        .map(human_bytes)
                        .unwrap_or_default();
                    let mut r = vec![
                        s(&o["metadata"]["name"]),
                        s(&o["status"]["phase"]),
                        s(&o["spec"]["volumeName"]),
                        cap,
                        modes,
                        s(&o["spec"]["storageClassName"]),
                        age_of(o),
                    ];
                    if wide {
                        r.push(s(&o["spec"]["volumeMode"]));
                    }
                    r
                })
                .collect();
            (h, rows)
        }
        Kind::StorageClass => (
            vec![
                "NAME",
                "PROVISIONER",
                "RECLAIMPOLICY",
                "VOLUMEBINDINGMODE",
                "ALLOWVOLUMEEXPANSION",
                "AGE",
            ],
            items
                .iter()
                .map(|o| {
                    let mut n = s(&o["metadata"]["name"]);
                    if o["metadata"]["annotations"][cdi_api::resources::ANN_DEFAULT_CLASS] == "true"
                    {
                        n.push_str(" (default)");
                    }
                    vec![
                        n,
                        s(&o["provisioner"]),
                        s(&o["reclaimPolicy"]),
                        s(&o["volumeBindingMode"]),
                        s(&o["allowVolumeExpansion"]),
                        age_of(o),
                    ]
                })
                .collect(),
        ),
        Kind::Event => (
            vec!["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"],
            items
                .iter()
                .map(|o| {
                    let last = o["lastTimestamp"]
                        .as_str()
                        .and_then(parse_rfc3339)
                        .map(|t| age(t, now))
                        .unwrap_or_default();
                    let obj = format!(
                        "{}/{}",
                        s(&o["involvedObject"]["kind"]).to_ascii_lowercase(),
                        s(&o["involvedObject"]["name"])
                    );
                    vec![last, s(&o["type"]), s(&o["reason"]), obj, s(&o["message"])]
                })
                .collect(),
        ),
        _ => (
            vec!["NAME", "AGE"],
            items
                .iter()
                .map(|o| vec![s(&o["metadata"]["name"]), age_of(o)])
                .collect(),
        ),
    };
    let mut rows = rows;
    if with_ns && kind.namespaced() {
        head.insert(0, "NAMESPACE");
        for (r, o) in rows.iter_mut().zip(items) {
            r.insert(0, s(&o["metadata"]["namespace"]));
        }
    }
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let n = cells.len();
        let text: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == n {
                    c
                } else {
                    format!("{c:<width$}", width = w[i])
                }
            })
            .collect();
        out.push_str(text.join("   ").trim_end());
        out.push('\n');
    };
    line(head.iter().map(|h| h.to_string()).collect(), &mut out);
    for r in rows {
        line(r, &mut out);
    }
    out
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
pub fn human_bytes(n: u64) -> String {
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

async fn describe(a: DescribeArgs) -> Result<(), String> {
    let kind = resource_kind(&a.resource)?;
    let client = connect(&a.conn)?;
    let ns = a.conn.namespace.as_str();
    let obj = client
        .get(&item_path(kind, ns, &a.name))
        .await
        .map_err(|e| e.to_string())?;
    let events = if kind.namespaced() {
        let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
        let path = format!(
            "{}?fieldSelector=involvedObject.uid={uid}",
            collection_path(Kind::Event, Some(ns))
        );
        client.get(&path).await.map_err(|e| e.to_string())?["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    print!("{}", crate::describe::describe(&obj, &events));
    Ok(())
}

async fn delete(a: DeleteArgs) -> Result<(), String> {
    let kind = resource_kind(&a.resource)?;
    let client = connect(&a.conn)?;
    let mut failed = None;
    for name in &a.names {
        match client
            .delete(&item_path(kind, &a.conn.namespace, name))
            .await
        {
            Ok(_) => println!("{} \"{name}\" deleted", display_name(kind)),
            Err(e) => {
                eprintln!("error: {e}");
                failed = Some(e);
            }
        }
    }
    match failed {
        None => Ok(()),
        Some(ApiError::Status { code: 404, .. }) if a.names.len() == 1 => Err("not found".into()),
        Some(_) => Err("some deletions failed".into()),
    }
}

/// What `cdi wait --for` waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitFor {
    /// A condition with a status (default `True`).
    Condition(String, String),
    /// `status.phase`.
    Phase(String),
    /// The object is gone.
    Delete,
}

/// Parse `--for`.
pub fn parse_wait_for(s: &str) -> Result<WaitFor, String> {
    if s == "delete" {
        return Ok(WaitFor::Delete);
    }
    if let Some(rest) = s.strip_prefix("condition=") {
        let (c, st) = rest.split_once('=').unwrap_or((rest, "True"));
        return Ok(WaitFor::Condition(c.to_string(), st.to_string()));
    }
    if let Some(p) = s
        .strip_prefix("phase=")
        .or_else(|| s.strip_prefix("jsonpath={.status.phase}="))
    {
        return Ok(WaitFor::Phase(p.to_string()));
    }
    Err(format!(
        "unrecognized --for {s:?}: use condition=NAME[=STATUS], phase=PHASE or delete"
    ))
}

/// Whether `obj` (None: deleted) satisfies `w`.
pub fn satisfied(w: &WaitFor, obj: Option<&Value>) -> bool {
    match (w, obj) {
        (WaitFor::Delete, None) => true,
        (WaitFor::Delete, Some(_)) | (_, None) => false,
        (WaitFor::Phase(p), Some(o)) => o["status"]["phase"] == p.as_str(),
        (WaitFor::Condition(c, st), Some(o)) => {
            o["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter().any(|x| {
                    x["type"]
                        .as_str()
                        .is_some_and(|t| t.eq_ignore_ascii_case(c))
                        && x["status"] == st.as_str()
                })
            })
        }
    }
}

async fn wait(a: WaitArgs) -> Result<(), String> {
    let kind = resource_kind(&a.resource)?;
    let w = parse_wait_for(&a.for_)?;
    let client = connect(&a.conn)?;
    let ns = a.conn.namespace.clone();
    let what = format!("{}/{}", kind.plural(), a.name);
    let run = async {
        loop {
            let current = match client.get(&item_path(kind, &ns, &a.name)).await {
                Ok(o) => Some(o),
                Err(e) if e.code() == Some(404) => None,
                Err(e) => return Err(e.to_string()),
            };
            if current.is_none() && w != WaitFor::Delete {
                return Err(format!("{what} not found"));
            }
            if satisfied(&w, current.as_ref()) {
                return Ok(());
            }
            let q = format!("&fieldSelector=metadata.name={}", a.name);
            let done = client
                .watch(&collection_path(kind, Some(&ns)), &q, |t, o| {
                    if t == "DELETED" {
                        satisfied(&w, None)
                    } else {
                        satisfied(&w, Some(o))
                    }
                })
                .await;
            match done {
                Ok(true) => return Ok(()),
                // Stream ended (server restart or lag): re-check and re-watch.
                Ok(false) | Err(ApiError::Transport { .. }) => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    match tokio::time::timeout(a.timeout, run).await {
        Ok(Ok(())) => {
            println!(
                "{} condition met",
                display_name(kind)
                    .split('.')
                    .next()
                    .map(|k| format!("{k}/{}", a.name))
                    .unwrap_or(what.clone())
            );
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("timed out waiting for the condition on {what}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("5x").is_err());
    }

    #[test]
    fn resource_names_resolve() {
        assert_eq!(kind_of("dv"), Some(Kind::DataVolume));
        assert_eq!(
            kind_of("datavolumes.cdi.kubevirt.io"),
            Some(Kind::DataVolume)
        );
        assert_eq!(kind_of("storageclass"), Some(Kind::StorageClass));
        assert_eq!(kind_of("po"), Some(Kind::Pod));
        assert_eq!(kind_of("dic"), Some(Kind::DataImportCron));
        assert_eq!(kind_of("replicaset"), None);
    }

    #[test]
    fn multi_document_manifests_split() {
        let docs = parse_manifests("---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: a\n---\n# c\n---\nkind: ConfigMap\nmetadata:\n  name: b\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1]["kind"], "ConfigMap");
    }

    #[test]
    fn wait_conditions() {
        let o = json!({"status": {"phase": "Succeeded", "conditions": [{"type": "Ready", "status": "True"}]}});
        assert!(satisfied(
            &parse_wait_for("condition=Ready").unwrap(),
            Some(&o)
        ));
        assert!(!satisfied(
            &parse_wait_for("condition=Ready=False").unwrap(),
            Some(&o)
        ));
        assert!(satisfied(
            &parse_wait_for("phase=Succeeded").unwrap(),
            Some(&o)
        ));
        assert!(satisfied(&WaitFor::Delete, None));
        assert!(parse_wait_for("bogus").is_err());
    }

    #[test]
    fn quantities_render() {
        assert_eq!(human_bytes(2 << 30), "2Gi");
        assert_eq!(human_bytes(1_132_797_625), "1132797625");
    }
}
