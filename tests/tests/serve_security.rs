//! `cdi serve` against a hostile local user and hostile requests: names and namespaces are
//! checked at the door (nothing reaches a path outside the data directory), and nothing in the
//! data directory — the database holding Secrets above all — is readable by another user.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use cdi_tests::serve::Serve;
use cdi_tests::{have, skip};
use serde_json::{Value, json};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn blank_dv(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"source": {"blank": {}},
                    "storage": {"resources": {"requests": {"storage": "8Mi"}}}}})
}

/// The traversal reported against `cdi serve`: a create on the all-namespaces collection with
/// `metadata.namespace: ../../../../x/evil` was accepted and the worker log landed outside the
/// data directory. Every variant is now refused before it reaches the store, with Kubernetes'
/// status codes, and nothing is created anywhere.
#[test]
fn serve_refuses_traversing_namespaces_and_bad_names() {
    if !have("curl") {
        skip("curl is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = Serve::start(&tmp.path().join("a/b/c/d/cdi"));
    let evil_ns = "../../../../x/evil";

    // Creates only through a namespaced URL (as Kubernetes: 405 on the cluster-wide one).
    let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "p", "namespace": evil_ns},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "8Mi"}}}});
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "s", "namespace": evil_ns}, "stringData": {"secretKey": "x"}});
    for (path, body) in [
        (
            "/apis/cdi.kubevirt.io/v1beta1/datavolumes",
            blank_dv(evil_ns, "evil"),
        ),
        ("/api/v1/persistentvolumeclaims", pvc.clone()),
        ("/api/v1/secrets", secret.clone()),
    ] {
        let (code, status) = s.request("POST", path, Some(&body));
        assert_eq!(code, 405, "POST {path}: {status}");
        assert_eq!(status["reason"], "MethodNotAllowed", "{status}");
    }

    // A namespace in the URL must be a DNS-1123 label; the body must agree with the URL.
    for ns in ["a..b", "A", "a.b", &"n".repeat(64)] {
        let (code, status) = s.request(
            "POST",
            &format!("/apis/cdi.kubevirt.io/v1beta1/namespaces/{ns}/datavolumes"),
            Some(&blank_dv(ns, "dv")),
        );
        assert_eq!(code, 400, "namespace {ns:?}: {status}");
        assert!(
            status["message"]
                .as_str()
                .unwrap()
                .contains("DNS-1123 label"),
            "{status}"
        );
    }
    let (code, _) = s.request(
        "POST",
        "/apis/cdi.kubevirt.io/v1beta1/namespaces/default/datavolumes",
        Some(&blank_dv(evil_ns, "dv")),
    );
    assert_eq!(code, 400);

    // Names: DNS-1123 subdomains; DataVolumes at most 63 characters (they name pods).
    let dvs = "/apis/cdi.kubevirt.io/v1beta1/namespaces/default/datavolumes";
    for (name, want) in [
        ("a..b", "DNS-1123 subdomain"),
        ("../x", "DNS-1123 subdomain"),
        (&"d".repeat(64), "at most 63"),
        (&"d".repeat(253), "at most 63"),
    ] {
        let (code, status) = s.request("POST", dvs, Some(&blank_dv("default", name)));
        assert_eq!(code, 422, "name {name:?}: {status}");
        let msg = status["message"].as_str().unwrap();
        assert!(msg.contains(want), "{msg}");
        assert!(
            !msg.contains('\n') && msg.len() < 400,
            "one short line: {msg}"
        );
    }
    let mut long_pvc = pvc.clone();
    long_pvc["metadata"] = json!({"name": "p".repeat(254)});
    let (code, _) = s.request(
        "POST",
        "/api/v1/namespaces/default/persistentvolumeclaims",
        Some(&long_pvc),
    );
    assert_eq!(code, 422);
    let mut bad_secret = secret.clone();
    bad_secret["metadata"] = json!({"name": "../../s"});
    let (code, _) = s.request(
        "POST",
        "/api/v1/namespaces/default/secrets",
        Some(&bad_secret),
    );
    assert_eq!(code, 422);

    // A 63-character name is fine and its DataVolume completes.
    let ok_name = "d".repeat(63);
    let (code, status) = s.request("POST", dvs, Some(&blank_dv("default", &ok_name)));
    assert_eq!(code, 201, "{status}");
    s.wait_phase(&ok_name, "Succeeded", std::time::Duration::from_secs(60));

    // Nothing was stored but that one, and nothing was written outside the data directory.
    for path in [
        "/apis/cdi.kubevirt.io/v1beta1/datavolumes",
        "/api/v1/persistentvolumeclaims",
        "/api/v1/secrets",
    ] {
        let (code, list) = s.request("GET", path, None);
        assert_eq!(code, 200);
        for item in list["items"].as_array().unwrap() {
            // `cdi` is CDI's own namespace: `cdi serve` keeps the upload PKI Secrets there.
            let ns = item["metadata"]["namespace"].as_str().unwrap_or_default();
            assert!(ns == "default" || ns == "cdi", "{item}");
        }
    }
    let mut outside = Vec::new();
    walk(tmp.path(), &mut |p| {
        if !p.starts_with(&s.dir) && p.is_file() {
            outside.push(p.to_path_buf());
        }
    });
    assert!(
        outside.is_empty(),
        "files outside the data dir: {outside:?}"
    );
    assert!(!tmp.path().join("x").exists() && !tmp.path().join("a/x").exists());
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            f(&p);
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&p, f);
            }
        }
    }
}

/// The database holds Secrets (S3 keys, registry passwords): it was 0644 in a 0755 directory.
/// Now the data directory is 0700 and everything `cdi serve` creates in it is private; a data
/// directory left open by an older version is tightened on start; user `nobody` reads nothing.
#[test]
fn serve_data_dir_and_database_are_private() {
    if !have("curl") {
        skip("curl is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cdi");
    let mut s = Serve::start(&dir);
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
        "stringData": {"accessKeyId": "AKIDEXAMPLE", "secretKey": "very-secret-value"}});
    let (code, _) = s.request("POST", "/api/v1/namespaces/default/secrets", Some(&secret));
    assert_eq!(code, 201);
    let (code, _) = s.request(
        "POST",
        "/apis/cdi.kubevirt.io/v1beta1/namespaces/default/datavolumes",
        Some(&blank_dv("default", "blank")),
    );
    assert_eq!(code, 201);
    s.wait_phase("blank", "Succeeded", std::time::Duration::from_secs(60));

    assert_eq!(mode(&dir), 0o700);
    for f in ["cdi.db", "cdi.db-wal", "cdi.db-shm"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    // Nothing cdi serve made is readable by other users (public certificates aside: they are
    // public, and the 0700 directory closes them anyway); files holding secrets are 0600.
    // Volume images keep upstream's 0660 for fsGroup on a cluster; the directory guards them.
    let mut open = Vec::new();
    walk(&dir, &mut |p| {
        let name = p.file_name().unwrap().to_string_lossy();
        if name == "serve.log" || name.starts_with("manifest-") || name.ends_with(".crt") {
            return;
        }
        let secret = name.starts_with("cdi.db")
            || name.ends_with(".key")
            || name.ends_with(".token")
            || name == "kubeconfig";
        if mode(p) & 0o007 != 0 || (secret && p.is_file() && mode(p) != 0o600) {
            open.push(format!("{} {:o}", p.display(), mode(p)));
        }
    });
    assert!(open.is_empty(), "readable by others: {open:?}");

    // An older data directory (0755, database 0644) is tightened on the next start.
    s.kill();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.join("cdi.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let s = Serve::start(&dir);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("cdi.db")), 0o600);
    let (code, _) = s.request("GET", "/api/v1/namespaces/default/secrets/s3-creds", None);
    assert_eq!(code, 200, "the Secret survives the restart");

    // The reported attack, as user nobody: read the database and grep for the key.
    let root = is_root();
    if !root || !have("setpriv") {
        skip("not root or no setpriv: cannot run a command as user nobody");
        return;
    }
    // Let nobody reach the data directory's parent, so only the data directory's own mode
    // stands in the way (as in a world-readable home).
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for target in [
        dir.join("cdi.db"),
        dir.join("cdi.db-wal"),
        dir.join("admin.token"),
    ] {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "grep",
                "-c",
                "very-secret",
            ])
            .arg(&target)
            .output()
            .unwrap();
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "nobody read {}: {out:?}",
            target.display()
        );
    }
    // Even with the directory opened up by hand, the files themselves stay closed.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(dir.join("cdi.db"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "nobody read cdi.db: {out:?}");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
