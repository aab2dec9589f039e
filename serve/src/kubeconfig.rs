//! `<data-dir>/kubeconfig`: lets kubectl and kube-rs clients reach `cdi serve` as they would a
//! cluster (`export KUBECONFIG=<data-dir>/kubeconfig`).
//!
//! One cluster `cdi` (the server URL and its CA inline), one user `admin` (the admin token),
//! one context `cdi` in namespace `default`, current. Rewritten on every start because the
//! listening port can change; 0600 since it holds the admin token.

use std::path::Path;

use base64::Engine;
use cdi_api::client::KUBECONFIG_FILE;
use serde_json::json;

/// Name of the cluster, the context and (as `admin`) the user.
pub const CONTEXT: &str = "cdi";
const USER: &str = "admin";

/// Why the kubeconfig could not be written.
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    /// Rendering YAML failed.
    #[error("rendering the kubeconfig: {0}")]
    Render(String),
    /// Writing the file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
}

/// The kubeconfig document.
pub fn render(server: &str, ca_pem: &str, token: &str) -> Result<String, KubeconfigError> {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": USER, "user": {"token": token}}],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": USER, "namespace": "default"}}],
        "current-context": CONTEXT,
        "preferences": {},
    });
    serde_saphyr::to_string(&doc).map_err(|e| KubeconfigError::Render(e.to_string()))
}

/// Write `<dir>/kubeconfig` (0600, replaced atomically); returns its path.
pub fn write(
    dir: &Path,
    server: &str,
    ca_pem: &str,
    token: &str,
) -> Result<std::path::PathBuf, KubeconfigError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(KUBECONFIG_FILE);
    let tmp = dir.join(format!("{KUBECONFIG_FILE}.tmp"));
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| KubeconfigError::Io { path: p, source }
    };
    let text = render(server, ca_pem, token)?;
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn kubeconfig_names_server_ca_token_and_context() {
        let dir = tempfile::tempdir().unwrap();
        let pem = "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n";
        let path = write(dir.path(), "https://127.0.0.1:8443", pem, "t0k").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let v: serde_json::Value =
            serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["current-context"], "cdi");
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:8443"
        );
        let ca = v["clusters"][0]["cluster"]["certificate-authority-data"]
            .as_str()
            .unwrap();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(ca)
                .unwrap(),
            pem.as_bytes()
        );
        assert_eq!(v["users"][0]["user"]["token"], "t0k");
        assert_eq!(v["contexts"][0]["context"]["namespace"], "default");
        // Rewritten on the next start (the port changed).
        write(dir.path(), "https://127.0.0.1:9443", pem, "t0k").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("9443") && !text.contains("8443"));
    }
}
