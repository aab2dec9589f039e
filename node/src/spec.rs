//! Pod spec → process spec: what a container runtime would do with an image, done for the
//! `cdi` multi-call binary on this host.
//!
//! Everything here is pure: the agent fetches the PVs, Secrets and ConfigMaps a pod needs and
//! hands them in. The generic part is **path translation**: a container sees its volumes at
//! its mount paths (`/data`, `/scratch`, `/etc/tls`, `/dev/cdi-block-volume`); a child process
//! sees the host. Every environment value and argument naming a mounted path (exactly, or below
//! it) is rewritten to the host path, and our workers' own path overrides
//! ([`cdi_api::env`]`::CDI_*`) are set, so a pod spec written for a cluster runs unchanged.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Component, Path, PathBuf};

use cdi_api::env as e;
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, Volume};

/// Default executable search path of children (a container image's usual `PATH`).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Variables of the agent's own environment a child inherits: logging and TLS trust settings
/// are the host's business, everything else comes from the pod spec.
pub const INHERITED_ENV: [&str; 4] = [
    "RUST_LOG",
    "RUST_BACKTRACE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];
/// Container port of the workers' metrics endpoint when the container names none.
pub const DEFAULT_METRICS_PORT: u16 = 8443;
/// Kubernetes' default `terminationMessagePath`.
pub const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// Prefix of the commands the `cdi` multi-call binary answers to (`cdi-importer`, …).
pub const MULTI_CALL_PREFIX: &str = "cdi-";

/// File names inside a pod's run directory.
pub mod layout {
    /// Stands for the container's `terminationMessagePath`.
    pub const TERMINATION_LOG: &str = "termination-log";
    /// stdout and stderr of every run of the container.
    pub const CONTAINER_LOG: &str = "container.log";
    /// Secret, ConfigMap and emptyDir volumes, one directory each.
    pub const VOLUMES: &str = "volumes";
    /// Parent of paths that must not exist (unmounted `/data`, `/scratch`, block device).
    pub const ABSENT: &str = "absent";
    /// `HOME` of the child.
    pub const HOME: &str = "home";
    /// `TMPDIR` of the child (a container's `/tmp` is its own).
    pub const TMP: &str = "tmp";
    /// The running child's pid and start time.
    pub const PID: &str = "pid";
}

/// A pod volume as this host provides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostVolume {
    /// A directory (Filesystem PV, Secret, ConfigMap, emptyDir, hostPath).
    Dir(PathBuf),
    /// A block device (Block PV).
    Device(PathBuf),
}

/// Which host executable runs a container `command[0]`, and under which `argv[0]`.
#[derive(Debug, Clone, Default)]
pub struct CommandMap {
    /// The `cdi` multi-call binary; answers every command named `cdi-<sub>` (by basename).
    pub cdi_exe: PathBuf,
    /// Other commands allowed to run, by exact `command[0]` (tests use `/bin/sh`). Empty in
    /// production: the agent runs our workers, not arbitrary images.
    pub host_commands: BTreeMap<String, PathBuf>,
}

impl CommandMap {
    /// `(executable, argv0)` for a container's `command[0]`.
    pub fn resolve(&self, command0: &str) -> Result<(PathBuf, OsString), SpecError> {
        if let Some(exe) = self.host_commands.get(command0) {
            return Ok((exe.clone(), OsString::from(command0)));
        }
        let base = Path::new(command0)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if base.len() > MULTI_CALL_PREFIX.len() && base.starts_with(MULTI_CALL_PREFIX) {
            return Ok((self.cdi_exe.clone(), OsString::from(base)));
        }
        Err(SpecError::UnsupportedCommand(command0.to_string()))
    }
}

/// Everything fetched from the API that a pod's process needs.
#[derive(Debug, Clone, Default)]
pub struct PodInputs {
    /// Volume name → host location (PVC volumes resolved through their PV).
    pub volumes: BTreeMap<String, HostVolume>,
    /// Secrets of the pod's namespace that exist, by name: key → bytes.
    pub secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// ConfigMaps of the pod's namespace that exist, by name: key → bytes.
    pub config_maps: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

/// How to start the container's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Executable on the host.
    pub program: PathBuf,
    /// `argv[0]` (the multi-call binary dispatches on it).
    pub argv0: OsString,
    /// Remaining arguments, paths translated.
    pub args: Vec<String>,
    /// The complete environment (nothing else is inherited).
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Host file standing for `terminationMessagePath`.
    pub termination_log: PathBuf,
}

/// Why a pod cannot be turned into a process (the kubelet's `CreateContainerConfigError`
/// family: the pod stays Pending and the agent retries).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The pod shape is outside what this node runs.
    #[error("{0}")]
    Unsupported(String),
    /// `command[0]` is neither a `cdi-*` command nor allowed on this host.
    #[error("command {0:?} is not provided on this node (only cdi-* commands run here)")]
    UnsupportedCommand(String),
    /// A Secret the pod needs does not exist.
    #[error("secret {0:?} not found")]
    MissingSecret(String),
    /// A ConfigMap the pod needs does not exist.
    #[error("configmap {0:?} not found")]
    MissingConfigMap(String),
    /// A key the pod needs is missing.
    #[error("couldn't find key {key} in {kind} {name}")]
    MissingKey {
        /// `Secret` or `ConfigMap`.
        kind: &'static str,
        /// Object name.
        name: String,
        /// Key.
        key: String,
    },
    /// A mount or device names no volume of the pod.
    #[error("volume {0:?} is not defined in the pod")]
    MissingVolume(String),
    /// A `subPath` that leaves its volume, or a mount of the wrong volume mode.
    #[error("invalid mount {mount}: {why}")]
    InvalidMount {
        /// Mount path.
        mount: String,
        /// Why.
        why: String,
    },
}

impl SpecError {
    /// The container `waiting.reason` the kubelet shows for this kind of failure.
    pub fn waiting_reason(&self) -> &'static str {
        match self {
            SpecError::Unsupported(_) | SpecError::UnsupportedCommand(_) => "RunContainerError",
            _ => "CreateContainerConfigError",
        }
    }
}

/// The one container this node runs: pods with init containers or several containers are
/// outside what CDI creates and are refused rather than half-run.
pub fn the_container(pod: &Pod) -> Result<&Container, SpecError> {
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| SpecError::Unsupported("pod has no spec".into()))?;
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(SpecError::Unsupported(
            "init containers are not supported by the cdi node".into(),
        ));
    }
    match spec.containers.as_slice() {
        [c] => Ok(c),
        _ => Err(SpecError::Unsupported(
            "the cdi node runs pods with exactly one container".into(),
        )),
    }
}

/// Build the process of `pod`'s container.
pub fn build_process(
    pod: &Pod,
    inputs: &PodInputs,
    run_dir: &Path,
    pod_ip: Ipv4Addr,
    commands: &CommandMap,
    agent_env: &dyn Fn(&str) -> Option<String>,
) -> Result<ProcessSpec, SpecError> {
    let c = the_container(pod)?;
    let command = c.command.clone().unwrap_or_default();
    let Some(command0) = command.first() else {
        return Err(SpecError::Unsupported(format!(
            "container {} has no command (image entrypoints are not known here)",
            c.name
        )));
    };
    let (program, argv0) = commands.resolve(command0)?;
    let termination_log = run_dir.join(layout::TERMINATION_LOG);
    let paths = path_map(pod, c, inputs, &termination_log)?;

    // Base environment, then envFrom, then env: later wins, as in the kubelet.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    env.insert(
        "HOME".into(),
        run_dir.join(layout::HOME).display().to_string(),
    );
    env.insert(
        "TMPDIR".into(),
        run_dir.join(layout::TMP).display().to_string(),
    );
    env.insert("HOSTNAME".into(), pod_name(pod).to_string());
    for k in INHERITED_ENV {
        if let Some(v) = agent_env(k) {
            env.insert(k.into(), v);
        }
    }
    for src in c.env_from.iter().flatten() {
        let prefix = src.prefix.clone().unwrap_or_default();
        if let Some(r) = &src.secret_ref {
            match inputs.secrets.get(&r.name) {
                Some(data) => {
                    for (k, v) in data {
                        env.insert(format!("{prefix}{k}"), lossy(v));
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(SpecError::MissingSecret(r.name.clone())),
            }
        }
        if let Some(r) = &src.config_map_ref {
            match inputs.config_maps.get(&r.name) {
                Some(data) => {
                    for (k, v) in data {
                        env.insert(format!("{prefix}{k}"), lossy(v));
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(SpecError::MissingConfigMap(r.name.clone())),
            }
        }
    }
    for var in c.env.iter().flatten() {
        if let Some(v) = env_value(pod, var, inputs, pod_ip)? {
            let v = expand(&v, &env);
            env.insert(var.name.clone(), v);
        }
    }
    for v in env.values_mut() {
        *v = paths.translate(v);
    }

    // Our workers' overrides: the container paths they default to are host paths here.
    let absent = run_dir.join(layout::ABSENT);
    let host_or_absent = |container_path: &str, absent_name: &str| {
        paths
            .exact(container_path)
            .unwrap_or_else(|| absent.join(absent_name))
            .display()
            .to_string()
    };
    env.insert(
        e::CDI_DATA_DIR.into(),
        host_or_absent(e::defaults::DATA_DIR, "data"),
    );
    env.insert(
        e::CDI_BLOCK_DEVICE.into(),
        host_or_absent(e::defaults::BLOCK_DEVICE, "block"),
    );
    env.insert(
        e::CDI_SCRATCH_DIR.into(),
        host_or_absent(e::defaults::SCRATCH_DIR, "scratch"),
    );
    env.insert(
        e::CDI_TERMINATION_LOG.into(),
        termination_log.display().to_string(),
    );
    env.insert(
        e::CDI_METRICS_ADDR.into(),
        format!("{pod_ip}:{}", metrics_port(c)),
    );
    // A pod's 0.0.0.0 is its own network namespace; here it is this pod's loopback address.
    env.insert(e::LISTEN_ADDRESS.into(), pod_ip.to_string());

    let args = command
        .iter()
        .skip(1)
        .chain(c.args.iter().flatten())
        .map(|a| paths.translate(&expand(a, &env)))
        .collect();
    let cwd = match &c.working_dir {
        Some(w) if !w.is_empty() => paths
            .exact(w)
            .or_else(|| Some(PathBuf::from(paths.translate(w))))
            .unwrap_or_default(),
        _ => run_dir.to_path_buf(),
    };
    Ok(ProcessSpec {
        program,
        argv0,
        args,
        env,
        cwd,
        termination_log,
    })
}

fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

fn lossy(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// The container port of the metrics endpoint: the one named `metrics`, else 8443.
pub fn metrics_port(c: &Container) -> u16 {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(DEFAULT_METRICS_PORT)
}

/// One variable's value; `None` when an optional source is missing (the variable is unset).
fn env_value(
    pod: &Pod,
    var: &EnvVar,
    inputs: &PodInputs,
    pod_ip: Ipv4Addr,
) -> Result<Option<String>, SpecError> {
    let Some(from) = &var.value_from else {
        return Ok(Some(var.value.clone().unwrap_or_default()));
    };
    if let Some(r) = &from.secret_key_ref {
        let optional = r.optional == Some(true);
        return match inputs.secrets.get(&r.name).map(|d| d.get(&r.key)) {
            Some(Some(v)) => Ok(Some(lossy(v))),
            _ if optional => Ok(None),
            None => Err(SpecError::MissingSecret(r.name.clone())),
            Some(None) => Err(SpecError::MissingKey {
                kind: "Secret",
                name: r.name.clone(),
                key: r.key.clone(),
            }),
        };
    }
    if let Some(r) = &from.config_map_key_ref {
        let optional = r.optional == Some(true);
        return match inputs.config_maps.get(&r.name).map(|d| d.get(&r.key)) {
            Some(Some(v)) => Ok(Some(lossy(v))),
            _ if optional => Ok(None),
            None => Err(SpecError::MissingConfigMap(r.name.clone())),
            Some(None) => Err(SpecError::MissingKey {
                kind: "ConfigMap",
                name: r.name.clone(),
                key: r.key.clone(),
            }),
        };
    }
    if let Some(f) = &from.field_ref {
        return field_value(pod, &f.field_path, pod_ip).map(Some);
    }
    Err(SpecError::Unsupported(format!(
        "env {}: only value, secretKeyRef, configMapKeyRef and fieldRef are supported",
        var.name
    )))
}

/// The downward API fields a kubelet resolves for `fieldRef`.
fn field_value(pod: &Pod, path: &str, pod_ip: Ipv4Addr) -> Result<String, SpecError> {
    let m = &pod.metadata;
    let spec = pod.spec.as_ref();
    let map_key = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix("['"))
            .and_then(|rest| rest.strip_suffix("']"))
    };
    let v = match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => Ipv4Addr::LOCALHOST.to_string(),
        _ => {
            if let Some(k) = map_key("metadata.labels") {
                m.labels
                    .as_ref()
                    .and_then(|l| l.get(k).cloned())
                    .unwrap_or_default()
            } else if let Some(k) = map_key("metadata.annotations") {
                m.annotations
                    .as_ref()
                    .and_then(|l| l.get(k).cloned())
                    .unwrap_or_default()
            } else {
                return Err(SpecError::Unsupported(format!(
                    "fieldRef {path} is not supported"
                )));
            }
        }
    };
    Ok(v)
}

/// The kubelet's `$(VAR)` expansion: a defined variable is substituted, `$$` escapes a `$`,
/// anything else stays as written.
pub fn expand(input: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Container path → host path for every mount, device and the termination message path.
#[derive(Debug, Clone, Default)]
pub struct PathMap {
    /// Longest container path first, so `/etc/tls` wins over `/etc`.
    entries: Vec<(String, PathBuf)>,
}

impl PathMap {
    fn insert(&mut self, container: &str, host: PathBuf) {
        let container = normalize(container);
        self.entries.retain(|(c, _)| *c != container);
        self.entries.push((container, host));
        self.entries
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
    }

    /// The host path of exactly this container path.
    pub fn exact(&self, container: &str) -> Option<PathBuf> {
        let container = normalize(container);
        self.entries
            .iter()
            .find(|(c, _)| *c == container)
            .map(|(_, h)| h.clone())
    }

    /// `value` with a leading mapped container path replaced by its host path; unchanged when
    /// it names no mapped path (a value equal to the path, or continuing with `/`).
    pub fn translate(&self, value: &str) -> String {
        for (c, h) in &self.entries {
            if c == "/" {
                continue;
            }
            if let Some(rest) = value.strip_prefix(c.as_str())
                && (rest.is_empty() || rest.starts_with('/'))
            {
                return format!("{}{rest}", h.display());
            }
        }
        value.to_string()
    }
}

/// `/etc/tls/` and `/etc/tls` are one mount path.
fn normalize(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() { "/".into() } else { t.into() }
}

/// A `subPath` stays inside its volume: relative, no `..`.
fn join_sub_path(base: &Path, sub: &str, mount: &str) -> Result<PathBuf, SpecError> {
    let rel = Path::new(sub);
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(SpecError::InvalidMount {
            mount: mount.into(),
            why: format!("subPath {sub:?} must be relative and stay inside the volume"),
        });
    }
    Ok(base.join(rel))
}

fn path_map(
    pod: &Pod,
    c: &Container,
    inputs: &PodInputs,
    termination_log: &Path,
) -> Result<PathMap, SpecError> {
    let mut map = PathMap::default();
    for m in c.volume_mounts.iter().flatten() {
        let host = match inputs.volumes.get(&m.name) {
            Some(HostVolume::Dir(d)) => d,
            Some(HostVolume::Device(_)) => {
                return Err(SpecError::InvalidMount {
                    mount: m.mount_path.clone(),
                    why: format!("volume {} is a block device; use volumeDevices", m.name),
                });
            }
            None => return Err(missing_volume(pod, &m.name)),
        };
        let host = match m.sub_path.as_deref() {
            Some(sub) if !sub.is_empty() => join_sub_path(host, sub, &m.mount_path)?,
            _ => host.clone(),
        };
        map.insert(&m.mount_path, host);
    }
    for d in c.volume_devices.iter().flatten() {
        match inputs.volumes.get(&d.name) {
            Some(HostVolume::Device(dev)) => map.insert(&d.device_path, dev.clone()),
            Some(HostVolume::Dir(_)) => {
                return Err(SpecError::InvalidMount {
                    mount: d.device_path.clone(),
                    why: format!("volume {} is a filesystem; use volumeMounts", d.name),
                });
            }
            None => return Err(missing_volume(pod, &d.name)),
        }
    }
    let tm = c
        .termination_message_path
        .as_deref()
        .filter(|p| !p.is_empty())
        .unwrap_or(DEFAULT_TERMINATION_MESSAGE_PATH);
    map.insert(tm, termination_log.to_path_buf());
    Ok(map)
}

fn missing_volume(pod: &Pod, name: &str) -> SpecError {
    let defined = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .is_some_and(|v| v.iter().any(|v| v.name == name));
    if defined {
        SpecError::Unsupported(format!("volume {name} has a type this node cannot provide"))
    } else {
        SpecError::MissingVolume(name.to_string())
    }
}

/// Files of a volume: path relative to the volume → content.
pub type VolumeFiles = Vec<(PathBuf, Vec<u8>)>;

/// Files of a Secret or ConfigMap volume. `None` for other volume types. A missing object is
/// an error unless the volume is optional (then: no files).
pub fn projected_files(v: &Volume, inputs: &PodInputs) -> Option<Result<VolumeFiles, SpecError>> {
    let (data, items, optional, missing) = if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        (
            inputs.secrets.get(&name),
            s.items.as_ref(),
            s.optional == Some(true),
            SpecError::MissingSecret(name),
        )
    } else if let Some(cm) = &v.config_map {
        (
            inputs.config_maps.get(&cm.name),
            cm.items.as_ref(),
            cm.optional == Some(true),
            SpecError::MissingConfigMap(cm.name.clone()),
        )
    } else {
        return None;
    };
    let Some(data) = data else {
        return Some(if optional {
            Ok(Vec::new())
        } else {
            Err(missing)
        });
    };
    let mut files = Vec::new();
    match items {
        Some(items) if !items.is_empty() => {
            for it in items {
                let Some(bytes) = data.get(&it.key) else {
                    if optional {
                        continue;
                    }
                    let (kind, name) = match &missing {
                        SpecError::MissingSecret(n) => ("Secret", n.clone()),
                        SpecError::MissingConfigMap(n) => ("ConfigMap", n.clone()),
                        _ => ("", String::new()),
                    };
                    return Some(Err(SpecError::MissingKey {
                        kind,
                        name,
                        key: it.key.clone(),
                    }));
                };
                match join_sub_path(Path::new(""), &it.path, &v.name) {
                    Ok(p) => files.push((p, bytes.clone())),
                    Err(err) => return Some(Err(err)),
                }
            }
        }
        _ => {
            for (k, bytes) in data {
                // Keys are validated by the API server; refuse anything path-like anyway.
                if k.contains('/') || k == ".." || k == "." {
                    continue;
                }
                files.push((PathBuf::from(k), bytes.clone()));
            }
        }
    }
    Some(Ok(files))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn importer_pod() -> Pod {
        pod(json!({
            "metadata": {"name": "importer-disk", "namespace": "ns1", "uid": "u-1",
                         "labels": {"app": "containerized-data-importer"},
                         "annotations": {"a/b": "c"}},
            "spec": {
                "restartPolicy": "OnFailure",
                "containers": [{
                    "name": "importer",
                    "image": "quay.io/kubevirt/cdi-importer",
                    "command": ["/usr/bin/cdi-importer"],
                    "args": ["-v=1", "--cert-dir", "/certs/ca.pem", "-alsologtostderr"],
                    "ports": [{"name": "metrics", "containerPort": 8443}],
                    "terminationMessagePath": "/dev/termination-log",
                    "env": [
                        {"name": "IMPORTER_SOURCE", "value": "http"},
                        {"name": "IMPORTER_ENDPOINT", "value": "http://x/$(IMPORTER_SOURCE).img"},
                        {"name": "ESCAPED", "value": "$$(IMPORTER_SOURCE) $(UNDEFINED)"},
                        {"name": "IMPORTER_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "accessKeyId"}}},
                        {"name": "OPTIONAL_MISSING", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": true}}},
                        {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                        {"name": "MY_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "MY_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "MY_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                        {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "MY_LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                        {"name": "MY_ANN", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['a/b']"}}},
                        {"name": "IMPORTER_CERT_DIR", "value": "/certs"},
                        {"name": "DATA_FILE", "value": "/data/disk.img"},
                        {"name": "NOT_A_MOUNT", "value": "/database"},
                        {"name": "TERM_LOG", "value": "/dev/termination-log"},
                        {"name": "CDI_DATA_DIR", "value": "/should/be/overridden"},
                        {"name": "LISTEN_ADDRESS", "value": "0.0.0.0"}
                    ],
                    "volumeMounts": [
                        {"name": "cdi-data-vol", "mountPath": "/data"},
                        {"name": "cdi-scratch-vol", "mountPath": "/scratch/"},
                        {"name": "cdi-cert-vol", "mountPath": "/certs"}
                    ]
                }],
                "volumes": [
                    {"name": "cdi-data-vol", "persistentVolumeClaim": {"claimName": "disk"}},
                    {"name": "cdi-scratch-vol", "persistentVolumeClaim": {"claimName": "disk-scratch"}},
                    {"name": "cdi-cert-vol", "configMap": {"name": "certs"}}
                ]
            }
        }))
    }

    fn inputs() -> PodInputs {
        let mut i = PodInputs::default();
        i.volumes
            .insert("cdi-data-vol".into(), HostVolume::Dir("/v/data-uid".into()));
        i.volumes.insert(
            "cdi-scratch-vol".into(),
            HostVolume::Dir("/v/scratch-uid".into()),
        );
        i.volumes.insert(
            "cdi-cert-vol".into(),
            HostVolume::Dir("/run/pods/u-1/volumes/cdi-cert-vol".into()),
        );
        i.secrets.insert(
            "creds".into(),
            BTreeMap::from([("accessKeyId".to_string(), b"AK".to_vec())]),
        );
        i.config_maps.insert(
            "settings".into(),
            BTreeMap::from([("mode".to_string(), b"fast".to_vec())]),
        );
        i
    }

    fn commands() -> CommandMap {
        CommandMap {
            cdi_exe: "/opt/cdi/bin/cdi".into(),
            host_commands: BTreeMap::new(),
        }
    }

    const IP: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 7);

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn importer_pod_becomes_a_multi_call_process_with_host_paths() {
        let run = Path::new("/run/pods/u-1");
        let p = build_process(&importer_pod(), &inputs(), run, IP, &commands(), &|k| {
            (k == "RUST_LOG").then(|| "debug".to_string())
        })
        .unwrap();
        assert_eq!(p.program, PathBuf::from("/opt/cdi/bin/cdi"));
        assert_eq!(p.argv0, OsString::from("cdi-importer"));
        assert_eq!(
            p.args,
            [
                "-v=1",
                "--cert-dir",
                "/run/pods/u-1/volumes/cdi-cert-vol/ca.pem",
                "-alsologtostderr"
            ]
        );
        let env = |k: &str| p.env.get(k).map(String::as_str);
        assert_eq!(env("IMPORTER_SOURCE"), Some("http"));
        assert_eq!(env("IMPORTER_ENDPOINT"), Some("http://x/http.img"));
        assert_eq!(env("ESCAPED"), Some("$(IMPORTER_SOURCE) $(UNDEFINED)"));
        assert_eq!(env("IMPORTER_ACCESS_KEY_ID"), Some("AK"));
        assert_eq!(env("OPTIONAL_MISSING"), None);
        assert_eq!(env("FROM_CM"), Some("fast"));
        assert_eq!(env("MY_NAME"), Some("importer-disk"));
        assert_eq!(env("MY_NS"), Some("ns1"));
        assert_eq!(env("MY_UID"), Some("u-1"));
        assert_eq!(env("MY_IP"), Some("127.1.0.7"));
        assert_eq!(env("MY_LABEL"), Some("containerized-data-importer"));
        assert_eq!(env("MY_ANN"), Some("c"));
        assert_eq!(
            env("IMPORTER_CERT_DIR"),
            Some("/run/pods/u-1/volumes/cdi-cert-vol")
        );
        assert_eq!(env("DATA_FILE"), Some("/v/data-uid/disk.img"));
        assert_eq!(env("NOT_A_MOUNT"), Some("/database"));
        assert_eq!(env("TERM_LOG"), Some("/run/pods/u-1/termination-log"));
        // Overrides: mounted paths, absent ones for what the pod does not mount.
        assert_eq!(env("CDI_DATA_DIR"), Some("/v/data-uid"));
        assert_eq!(env("CDI_SCRATCH_DIR"), Some("/v/scratch-uid"));
        assert_eq!(env("CDI_BLOCK_DEVICE"), Some("/run/pods/u-1/absent/block"));
        assert_eq!(
            env("CDI_TERMINATION_LOG"),
            Some("/run/pods/u-1/termination-log")
        );
        assert_eq!(env("CDI_METRICS_ADDR"), Some("127.1.0.7:8443"));
        assert_eq!(env("LISTEN_ADDRESS"), Some("127.1.0.7"));
        // Basics, and only the allowed part of the agent's environment.
        assert_eq!(env("PATH"), Some(DEFAULT_PATH));
        assert_eq!(env("HOSTNAME"), Some("importer-disk"));
        assert_eq!(env("RUST_LOG"), Some("debug"));
        assert_eq!(env("HOME"), Some("/run/pods/u-1/home"));
        assert_eq!(p.cwd, run);
        assert_eq!(p.termination_log, run.join("termination-log"));
    }

    #[test]
    fn upload_pod_block_device_and_tls_secret_paths() {
        let pod = pod(json!({
            "metadata": {"name": "cdi-upload-disk", "namespace": "ns1", "uid": "u-2"},
            "spec": {
                "containers": [{
                    "name": "cdi-upload-server",
                    "command": ["/usr/bin/cdi-uploadserver"],
                    "args": ["-v=3"],
                    "env": [
                        {"name": "TLS_KEY_FILE", "value": "/etc/tls/tls.key"},
                        {"name": "TLS_CERT_FILE", "value": "/etc/tls/tls.crt"},
                        {"name": "CLIENT_CERT_FILE", "value": "/etc/tls/ca.crt"},
                        {"name": "DESTINATION", "value": "/dev/cdi-block-volume"}
                    ],
                    "volumeMounts": [{"name": "tls", "mountPath": "/etc/tls/"},
                                     {"name": "etc", "mountPath": "/etc"}],
                    "volumeDevices": [{"name": "cdi-data-vol", "devicePath": "/dev/cdi-block-volume"}]
                }],
                "volumes": [
                    {"name": "cdi-data-vol", "persistentVolumeClaim": {"claimName": "disk"}},
                    {"name": "tls", "secret": {"secretName": "cdi-upload-disk"}},
                    {"name": "etc", "emptyDir": {}}
                ]
            }
        }));
        let mut i = PodInputs::default();
        i.volumes.insert(
            "cdi-data-vol".into(),
            HostVolume::Device("/dev/loop7".into()),
        );
        i.volumes
            .insert("tls".into(), HostVolume::Dir("/r/volumes/tls".into()));
        i.volumes
            .insert("etc".into(), HostVolume::Dir("/r/volumes/etc".into()));
        let p = build_process(&pod, &i, Path::new("/r"), IP, &commands(), &no_env).unwrap();
        assert_eq!(p.argv0, OsString::from("cdi-uploadserver"));
        assert_eq!(p.args, ["-v=3"]);
        let env = |k: &str| p.env.get(k).map(String::as_str);
        // The longest mount wins: /etc/tls, not /etc.
        assert_eq!(env("TLS_KEY_FILE"), Some("/r/volumes/tls/tls.key"));
        assert_eq!(env("TLS_CERT_FILE"), Some("/r/volumes/tls/tls.crt"));
        assert_eq!(env("CLIENT_CERT_FILE"), Some("/r/volumes/tls/ca.crt"));
        assert_eq!(env("DESTINATION"), Some("/dev/loop7"));
        assert_eq!(env("CDI_BLOCK_DEVICE"), Some("/dev/loop7"));
        assert_eq!(env("CDI_DATA_DIR"), Some("/r/absent/data"));
        assert_eq!(env("CDI_SCRATCH_DIR"), Some("/r/absent/scratch"));
        assert_eq!(env("CDI_TERMINATION_LOG"), Some("/r/termination-log"));
    }

    #[test]
    fn missing_inputs_are_config_errors_and_optional_ones_are_not() {
        let run = Path::new("/r");
        let mut i = inputs();
        i.secrets.clear();
        let err = build_process(&importer_pod(), &i, run, IP, &commands(), &no_env).unwrap_err();
        assert_eq!(err, SpecError::MissingSecret("creds".into()));
        assert_eq!(err.waiting_reason(), "CreateContainerConfigError");
        let mut i = inputs();
        i.config_maps.insert("settings".into(), BTreeMap::new());
        let err = build_process(&importer_pod(), &i, run, IP, &commands(), &no_env).unwrap_err();
        assert!(
            matches!(
                err,
                SpecError::MissingKey {
                    kind: "ConfigMap",
                    ..
                }
            ),
            "{err}"
        );
        let mut i = inputs();
        i.volumes.remove("cdi-scratch-vol");
        let err = build_process(&importer_pod(), &i, run, IP, &commands(), &no_env).unwrap_err();
        assert!(matches!(err, SpecError::Unsupported(_)), "{err}");
    }

    #[test]
    fn only_cdi_commands_and_allowed_host_commands_run() {
        let mut c = commands();
        assert_eq!(
            c.resolve("cdi-cloner").unwrap(),
            (
                PathBuf::from("/opt/cdi/bin/cdi"),
                OsString::from("cdi-cloner")
            )
        );
        assert!(matches!(
            c.resolve("/bin/sh"),
            Err(SpecError::UnsupportedCommand(_))
        ));
        assert!(c.resolve("/usr/bin/cdi-").is_err());
        assert!(c.resolve("/usr/bin/python").is_err());
        c.host_commands.insert("/bin/sh".into(), "/bin/sh".into());
        assert_eq!(
            c.resolve("/bin/sh").unwrap(),
            (PathBuf::from("/bin/sh"), OsString::from("/bin/sh"))
        );
    }

    #[test]
    fn sub_paths_stay_inside_their_volume() {
        let base = Path::new("/v");
        assert_eq!(
            join_sub_path(base, "a/b", "/m").unwrap(),
            PathBuf::from("/v/a/b")
        );
        for bad in ["../x", "/etc", "a/../../x"] {
            assert!(join_sub_path(base, bad, "/m").is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_volume_files_honour_items_and_optional() {
        let v: Volume = serde_json::from_value(json!({
            "name": "tls", "secret": {"secretName": "s", "items": [{"key": "k1", "path": "sub/one"}]}
        }))
        .unwrap();
        let mut i = PodInputs::default();
        assert_eq!(
            projected_files(&v, &i).unwrap().unwrap_err(),
            SpecError::MissingSecret("s".into())
        );
        i.secrets.insert(
            "s".into(),
            BTreeMap::from([
                ("k1".to_string(), b"one".to_vec()),
                ("k2".to_string(), b"two".to_vec()),
            ]),
        );
        assert_eq!(
            projected_files(&v, &i).unwrap().unwrap(),
            vec![(PathBuf::from("sub/one"), b"one".to_vec())]
        );
        let all: Volume = serde_json::from_value(json!({
            "name": "c", "configMap": {"name": "gone", "optional": true}
        }))
        .unwrap();
        assert_eq!(projected_files(&all, &i).unwrap().unwrap(), vec![]);
        let empty: Volume = serde_json::from_value(json!({"name": "e", "emptyDir": {}})).unwrap();
        assert!(projected_files(&empty, &i).is_none());
    }

    #[test]
    fn pods_beyond_one_plain_container_are_refused() {
        let two = pod(json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "a", "command": ["cdi-importer"]}, {"name": "b", "command": ["cdi-importer"]}]}}));
        assert!(matches!(
            the_container(&two),
            Err(SpecError::Unsupported(_))
        ));
        let no_cmd =
            pod(json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}}));
        let err = build_process(
            &no_cmd,
            &PodInputs::default(),
            Path::new("/r"),
            IP,
            &commands(),
            &no_env,
        )
        .unwrap_err();
        assert_eq!(err.waiting_reason(), "RunContainerError");
    }
}
