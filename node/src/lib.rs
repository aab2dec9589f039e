//! The embedded node of `cdi serve`: the two pieces a cluster's kubelet and CSI driver provide,
//! for one host, talking to the API only through a [`kube::Client`].
//!
//! * [`run_node_agent`] — a tiny kubelet. It watches Pods and runs each one's container as a
//!   child process of the `cdi` multi-call binary (`cdi-importer`, `cdi-uploadserver` …),
//!   with the pod's volumes translated to host paths ([`spec`]), its own loopback IP
//!   ([`ip`]), the kubelet's restart back-off ([`backoff`]), readiness probes ([`probe`]) and
//!   status ([`status`]); deletion stops the process group; a restarted agent kills what a
//!   previous one left running ([`process`]).
//! * [`run_provisioner`] — the local provisioner. It binds PersistentVolumeClaims of the
//!   built-in classes `local` (a directory per claim) and `local-block` (a loop device over a
//!   preallocated file) by creating PersistentVolumes, and releases the storage when the
//!   claim goes ([`provisioner`], host primitives in [`storage`]).
//!
//! Upstream's controller creates the same Pods and PVCs on a cluster; nothing here is
//! specific to how our controller builds them.

pub mod agent;
pub mod backoff;
pub mod ip;
pub mod probe;
pub mod process;
pub mod provisioner;
pub mod spec;
pub mod status;
pub mod storage;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub use agent::run_node_agent;
pub use provisioner::run_provisioner;
pub use tokio_util::sync::CancellationToken;

/// Annotation the agent sets on each pod: the host file holding its container log (the API
/// server serves `kubectl logs` from it).
pub const ANN_LOG_PATH: &str = "cdi.kubevirt.io/node.logPath";
/// Directory under the run root holding one directory per pod uid.
pub const PODS_DIR: &str = "pods";
/// Node name used when the host name cannot be read.
pub const FALLBACK_NODE_NAME: &str = "localhost";

/// Configuration of the node agent and the provisioner.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Name of this node (PV node affinity, `spec.nodeName` field references).
    pub node_name: String,
    /// Volumes live under `<data_root>/volumes/<claim uid>/`.
    pub data_root: PathBuf,
    /// Pods run in `<run_root>/pods/<pod uid>/` (logs, termination log, Secret volumes).
    pub run_root: PathBuf,
    /// The `cdi` multi-call binary that runs every `cdi-*` container command.
    pub cdi_exe: PathBuf,
    /// Other container commands allowed to run, by exact `command[0]` → host executable.
    /// Empty in production (tests allow `/bin/sh`).
    pub host_commands: BTreeMap<String, PathBuf>,
    /// First restart back-off (the kubelet's 10 s; `cdi serve --restart-backoff` and tests
    /// shorten it). The cap is 30× this.
    pub restart_backoff_base: Duration,
    /// How often the provisioner re-examines everything even without events (sweeps orphans,
    /// retries failures).
    pub resync_interval: Duration,
}

/// Default provisioner resync.
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(30);

impl NodeConfig {
    /// Defaults for a data root and a run root: this executable as the `cdi` binary, the
    /// kubelet's back-off, the host name as node name.
    pub fn new(data_root: PathBuf, run_root: PathBuf) -> Result<Self, NodeError> {
        let cdi_exe = std::env::current_exe().map_err(|source| NodeError::Io {
            path: PathBuf::from("/proc/self/exe"),
            source,
        })?;
        let node_name = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| FALLBACK_NODE_NAME.to_string());
        Ok(NodeConfig {
            node_name,
            data_root,
            run_root,
            cdi_exe,
            host_commands: BTreeMap::new(),
            restart_backoff_base: backoff::DEFAULT_RESTART_BACKOFF_BASE,
            resync_interval: DEFAULT_RESYNC_INTERVAL,
        })
    }

    /// `<data_root>/volumes`.
    pub fn volumes_dir(&self) -> PathBuf {
        self.data_root.join(storage::VOLUMES_DIR)
    }

    /// `<run_root>/pods`.
    pub fn pods_dir(&self) -> PathBuf {
        self.run_root.join(PODS_DIR)
    }
}

/// Why the agent or the provisioner stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Host I/O on the node's own directories failed.
    #[error("{path}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Storage primitives failed.
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    /// The probe client could not be built.
    #[error(transparent)]
    Prober(#[from] probe::ProberError),
    /// The API server refused a request the agent cannot do without.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}
