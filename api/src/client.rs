//! The data directory of `cdi serve` as its clients see it.
//!
//! `cdi serve --data-dir DIR` writes `DIR/kubeconfig` (0600: server URL, CA and the admin
//! token), `DIR/server.url` and `DIR/admin.token` (0600) on start. The `cdi` client commands
//! read `DIR/kubeconfig` like any kubeconfig; the directory is `--data-dir`, else `$CDI_HOME`,
//! else `./cdi-data`.

/// Environment variable naming the data directory of `cdi serve`.
pub const CDI_HOME: &str = "CDI_HOME";
/// Data directory when nothing else is said.
pub const DEFAULT_DATA_DIR: &str = "./cdi-data";
/// Address `cdi serve` listens on by default (loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
/// File under the data dir holding the admin's kubeconfig.
pub const KUBECONFIG_FILE: &str = "kubeconfig";
/// File under the data dir holding the server URL (for scripts that want only the URL).
pub const SERVER_URL_FILE: &str = "server.url";
/// File under the data dir holding the admin token (for scripts and `curl`).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
