//! `cdi serve` end to end: the real binary as the control plane, the CLI as the client, nginx
//! as the HTTP source and qemu-img as the oracle.
//!
//! Each test runs its own `cdi serve` on 127.0.0.1 (free port, `--restart-backoff 1s` so retries
//! are observable quickly) over its own data directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cdi_tests::nginx::{Nginx, NginxOptions};
use cdi_tests::qemu::{self, Fixtures};
use cdi_tests::serve::Serve;
use cdi_tests::{have, skip};
use serde_json::Value;

const IMAGE_SIZE: u64 = 16 << 20;
/// Bytes per second nginx serves `/slow/` at (long enough to kill things mid-import).
const SLOW_RATE: &str = "1m";

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    fx: Fixtures,
    nginx: Nginx,
}

fn setup() -> Option<Env> {
    for tool in ["qemu-img", "qemu-io", "gzip", "curl", "nginx"] {
        if !have(tool) {
            skip(&format!("{tool} is not installed"));
            return None;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let www = dir.join("www");
    let fx = qemu::fixtures(&www, IMAGE_SIZE).unwrap();
    // A larger raw image served slowly, to act on imports while they run.
    qemu::create_pattern_raw(&www.join("big.img"), 48 << 20).unwrap();
    let extra = format!(
        "location /slow/ {{ alias {}/; limit_rate {SLOW_RATE}; }}",
        www.display()
    );
    let nginx = Nginx::start(
        NginxOptions {
            root: www,
            extra_server_config: Some(extra),
            ..Default::default()
        },
        &dir.join("nginx"),
    )
    .unwrap();
    Some(Env {
        _tmp: tmp,
        dir,
        fx,
        nginx,
    })
}

fn http_dv(name: &str, url: &str, size: &str) -> String {
    format!(
        "apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata:\n  name: {name}\nspec:\n  source:\n    http:\n      url: \"{url}\"\n  storage:\n    resources:\n      requests:\n        storage: {size}\n"
    )
}

fn condition<'a>(dv: &'a Value, t: &str) -> &'a Value {
    dv["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == t))
        .unwrap_or(&Value::Null)
}

/// Y8 of the requirements (HTTP-import VM template): its doc bug (two sources) is rejected; the
/// same template with the registry source removed, URL pointed at nginx, imports a qcow2.gz.
#[test]
fn serve_http_import_example_manifest() {
    let Some(env) = setup() else { return };
    let s = Serve::start(&env.dir.join("cdi"));
    let y8 = format!(
        "apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata:\n  creationTimestamp: null\n  name: fedora-dv\nspec:\n  storage:\n    resources:\n      requests:\n        storage: 10Gi\n    storageClassName: local\n  source:\n    http:\n      url: \"{}\"\n    registry:\n      url: \"docker://kubevirt/fedora-cloud-container-disk-demo:latest\"\n      secretRef: data-source-secret\n      certConfigMap: tls-certs\n",
        env.nginx.url("disk.qcow2.gz")
    );
    let out = s.apply(&y8);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Multiple Data volume sources: http, registry"),
        "{err}"
    );

    let fixed = y8.split("    registry:").next().unwrap().to_string();
    let out = s.apply(&fixed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.ok(&[
        "wait",
        "dv",
        "fedora-dv",
        "--for",
        "condition=Ready",
        "--timeout",
        "120s",
    ]);
    let dv = s.get("dv", "fedora-dv").unwrap();
    assert_eq!(dv["status"]["phase"], "Succeeded");
    assert_eq!(dv["status"]["progress"], "100.0%");
    assert_eq!(condition(&dv, "Running")["reason"], "Completed");
    assert_eq!(condition(&dv, "Bound")["message"], "PVC fedora-dv Bound");
    // storage API: the claim is inflated by the 5.5% default overhead.
    let pvc = s.get("pvc", "fedora-dv").unwrap();
    assert_eq!(
        pvc["spec"]["resources"]["requests"]["storage"],
        cdi_api::overhead::required_space(0.055, 10 << 30).to_string()
    );
    assert_eq!(pvc["metadata"]["ownerReferences"][0]["kind"], "DataVolume");
    qemu::assert_same_image(&s.disk("fedora-dv"), &env.fx.qcow2);
    // Applying the same manifest again changes nothing.
    let again = s.apply(&fixed);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("unchanged"),
        "{again:?}"
    );
}

/// Y48 (v1alpha1 blank) and Y17 (v1beta1 blank) apply unchanged but for placeholders.
#[test]
fn serve_blank_example_manifests() {
    let Some(env) = setup() else { return };
    let s = Serve::start(&env.dir.join("cdi"));
    let y48 = "apiVersion: cdi.kubevirt.io/v1alpha1\nkind: DataVolume\nmetadata:\n  name: blank-image-datavolume\nspec:\n  source:\n      blank: {}\n  pvc:\n    # Optional: Set the storage class or omit to accept the default\n    # storageClassName: \"hostpath\"\n    accessModes:\n      - ReadWriteOnce\n    resources:\n      requests:\n        storage: 500Mi\n";
    let y17 = "apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata:\n  name: blank-v1beta1\nspec:\n  source:\n    blank: {}\n  storage:\n    resources:\n      requests:\n        storage: 2Gi\n  storageClassName: \"local\"\n";
    for m in [y48, y17] {
        let out = s.apply(m);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    s.ok(&[
        "wait",
        "dv",
        "blank-image-datavolume",
        "--for",
        "condition=Ready",
        "--timeout",
        "60s",
    ]);
    s.ok(&[
        "wait",
        "dv",
        "blank-v1beta1",
        "--for",
        "phase=Succeeded",
        "--timeout",
        "60s",
    ]);
    // spec.pvc is used verbatim; the worker keeps the overhead free inside it.
    let disk = s.disk("blank-image-datavolume");
    let want = cdi_api::overhead::usable_space(0.055, 500 << 20);
    assert_eq!(qemu::virtual_size(&disk).unwrap(), want);
    let zero = env.dir.join("zero.img");
    Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&zero)
        .arg(want.to_string())
        .status()
        .unwrap();
    qemu::assert_same_image(&disk, &zero);
    // spec.storage is inflated, so the full 2Gi is usable.
    assert_eq!(
        qemu::virtual_size(&s.disk("blank-v1beta1")).unwrap(),
        2 << 30
    );
    let table = s.ok(&["get", "dv"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("blank-image-datavolume   Succeeded   100.0%"),
        "{table}"
    );
}

/// `cdi describe dv` reads like `oc describe dv`.
#[test]
fn serve_describe_reads_like_oc_describe() {
    let Some(env) = setup() else { return };
    let s = Serve::start(&env.dir.join("cdi"));
    let out = s.apply(&http_dv("example-dv", &env.nginx.url("disk.qcow2"), "64Mi"));
    assert!(out.status.success());
    s.wait_phase("example-dv", "Succeeded", Duration::from_secs(90));
    let text = s.ok(&["describe", "dv", "example-dv"]);
    for want in [
        "Name:         example-dv\n",
        "Namespace:    default\n",
        "Kind:         DataVolume\n",
        "  Conditions:\n",
        "    Last Heart Beat Time:  ",
        "    Message:               PVC example-dv Bound\n",
        "    Reason:                Bound\n",
        "    Type:                  Bound\n",
        "    Message:               Import Complete\n",
        "    Reason:                Completed\n",
        "  Phase:",
        "Events:\n",
        "cdi-controller  PVC example-dv Bound",
        "cdi-controller  Successfully imported into PVC example-dv",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let header = text
        .lines()
        .skip_while(|l| *l != "Events:")
        .nth(1)
        .unwrap_or_default();
    let cols: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(cols, ["Type", "Reason", "Age", "From", "Message"], "{text}");
}

/// A 404 URL: the event carries the worker's message, Running=False with reason Error, and
/// restarts keep counting (the DataVolume never goes Failed).
#[test]
fn serve_http_404_retries_with_growing_restart_count() {
    let Some(env) = setup() else { return };
    let s = Serve::start(&env.dir.join("cdi"));
    assert!(
        s.apply(&http_dv(
            "missing",
            &env.nginx.url("no-such-image.qcow2"),
            "64Mi"
        ))
        .status
        .success()
    );
    // Between attempts the pod runs again (Running=True) for a moment: wait for a failed one.
    let dv = s.wait_dv(
        "missing",
        Duration::from_secs(60),
        "restartCount >= 2 with Running=False",
        |dv| {
            dv["status"]["restartCount"].as_u64().unwrap_or(0) >= 2
                && condition(dv, "Running")["status"] == "False"
        },
    );
    let running = condition(&dv, "Running");
    assert_eq!(running["status"], "False");
    assert_eq!(running["reason"], "Error");
    let msg = running["message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("Unable to connect to http data source") && msg.contains("404"),
        "{msg}"
    );
    assert_eq!(dv["status"]["phase"], "ImportInProgress");
    let later = s.wait_dv(
        "missing",
        Duration::from_secs(60),
        "restartCount >= 3",
        |d| d["status"]["restartCount"].as_u64().unwrap_or(0) >= 3,
    );
    assert_ne!(later["status"]["phase"], "Failed");
    let text = s.ok(&["describe", "dv", "missing"]);
    assert!(text.contains("Warning  Error"), "{text}");
    assert!(text.contains("(x"), "repeated failures are counted: {text}");
    assert!(text.contains("404"), "{text}");
}

/// A checksum mismatch is fatal: Failed, no retries, no data left behind.
#[test]
fn serve_checksum_mismatch_fails() {
    let Some(env) = setup() else { return };
    let s = Serve::start(&env.dir.join("cdi"));
    let m = format!(
        "apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata:\n  name: badsum\nspec:\n  source:\n    http:\n      url: \"{}\"\n      checksum: \"sha256:{}\"\n  storage:\n    resources:\n      requests:\n        storage: 64Mi\n",
        env.nginx.url("disk.qcow2"),
        "0".repeat(64)
    );
    assert!(s.apply(&m).status.success());
    let dv = s.wait_phase("badsum", "Failed", Duration::from_secs(90));
    assert_eq!(dv["status"]["restartCount"], 0);
    let running = condition(&dv, "Running");
    assert_eq!(running["reason"], "ChecksumError");
    assert!(
        running["message"]
            .as_str()
            .unwrap_or_default()
            .contains("checksum mismatch"),
        "{running}"
    );
    assert!(
        !s.disk("badsum").exists(),
        "a volume that failed verification keeps no data"
    );
    // A malformed checksum never gets that far.
    let out = s.apply(
        &m.replace("name: badsum", "name: badsyntax")
            .replace(&"0".repeat(64), "xyz"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected 64 hex digits"));
}

/// Killing `cdi serve` mid-import and starting it again finishes the import correctly.
#[test]
fn serve_restart_mid_import_finishes() {
    let Some(env) = setup() else { return };
    let dir = env.dir.join("cdi");
    let mut s = Serve::start(&dir);
    assert!(
        s.apply(&http_dv("survivor", &env.nginx.url("slow/big.img"), "64Mi"))
            .status
            .success()
    );
    s.wait_phase("survivor", "ImportInProgress", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(3));
    let before = s.get("dv", "survivor").unwrap();
    assert_ne!(before["status"]["phase"], "Succeeded");
    s.kill();
    let s = Serve::start(&dir);
    let dv = s.wait_phase("survivor", "Succeeded", Duration::from_secs(180));
    assert_eq!(dv["status"]["progress"], "100.0%");
    qemu::assert_same_image(&s.disk("survivor"), &env.dir.join("www").join("big.img"));
    // Succeeded survives another restart untouched.
    drop(s);
    let s = Serve::start(&dir);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        s.get("dv", "survivor").unwrap()["status"]["phase"],
        "Succeeded"
    );
}

/// Deleting a DataVolume mid-import stops the worker and frees its claim and space.
#[test]
fn serve_delete_mid_import_frees_space() {
    let Some(env) = setup() else { return };
    let s = Serve::start(&env.dir.join("cdi"));
    assert!(
        s.apply(&http_dv("doomed", &env.nginx.url("slow/big.img"), "64Mi"))
            .status
            .success()
    );
    s.wait_phase("doomed", "ImportInProgress", Duration::from_secs(30));
    // Progress is scraped from the worker's metrics while it runs ("12.34%").
    let dv = s.wait_dv(
        "doomed",
        Duration::from_secs(20),
        "a progress percentage",
        |dv| {
            dv["status"]["progress"]
                .as_str()
                .is_some_and(|p| p.ends_with('%') && p != "100.0%")
        },
    );
    let pct: f64 = dv["status"]["progress"]
        .as_str()
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap();
    assert!((0.0..100.0).contains(&pct), "{pct}");
    let disk = s.disk("doomed");
    let claim_dir = disk.parent().unwrap().to_path_buf();
    assert!(claim_dir.exists());
    // The node agent records each pod's process in its run directory.
    let pod = s
        .get("pod", "importer-doomed")
        .expect("importer pod exists");
    let pod_uid = pod["metadata"]["uid"].as_str().unwrap();
    let record = std::fs::read_to_string(s.dir.join("run/pods").join(pod_uid).join("pid"))
        .expect("the importer's pid record");
    let pid: u32 = record.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.contains("importer")),
        "pid {pid} is not the importer"
    );
    let out = s.ok(&["delete", "dv", "doomed"]);
    assert!(out.contains("deleted"), "{out}");
    // The importer pod is deleted with the default grace period (30 s), as on a cluster; the
    // importer itself stops at once on SIGTERM, but a loaded machine may take a while.
    let deadline = Instant::now() + Duration::from_secs(60);
    while claim_dir.exists() || s.get("pvc", "doomed").is_some() {
        if Instant::now() >= deadline {
            let ps = Command::new("ps")
                .args(["-eo", "pid,ppid,stat,args"])
                .output()
                .unwrap();
            panic!(
                "claim not freed: {}\n--- ps ---\n{}\n--- pods ---\n{}\n--- pvc ---\n{}\n--- events ---\n{}",
                s.log(),
                String::from_utf8_lossy(&ps.stdout),
                String::from_utf8_lossy(&s.cdi(&["get", "pods", "-o", "yaml"]).stdout),
                String::from_utf8_lossy(&s.cdi(&["get", "pvc", "-o", "yaml"]).stdout),
                String::from_utf8_lossy(&s.cdi(&["get", "events"]).stdout),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let alive = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.contains("importer"));
    assert!(!alive, "importer {pid} still running after delete");
    assert!(s.get("dv", "doomed").is_none());
}

/// Five imports at once all finish with the right bytes.
#[test]
fn serve_five_imports_at_once() {
    let Some(env) = setup() else { return };
    let s = Serve::start(&env.dir.join("cdi"));
    let mut all = String::new();
    for i in 0..5 {
        let src = if i % 2 == 0 {
            "disk.qcow2"
        } else {
            "disk.qcow2.gz"
        };
        all.push_str("---\n");
        all.push_str(&http_dv(&format!("many-{i}"), &env.nginx.url(src), "64Mi"));
    }
    let out = s.apply(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("created")
            .count(),
        5
    );
    for i in 0..5 {
        let name = format!("many-{i}");
        s.wait_phase(&name, "Succeeded", Duration::from_secs(180));
        qemu::assert_same_image(&s.disk(&name), &env.fx.raw);
    }
}

/// Nothing is reachable without the admin token; a forged one is refused too.
#[test]
fn serve_refuses_missing_or_forged_token() {
    if !have("curl") {
        skip("curl is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = Serve::start(&tmp.path().join("cdi"));
    let url = std::fs::read_to_string(s.dir.join("server.url"))
        .unwrap()
        .trim()
        .to_string();
    let ca = s.dir.join("pki/ca.crt");
    let token = std::fs::read_to_string(s.dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let meta = std::fs::metadata(s.dir.join("admin.token")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    let path = format!("{url}/apis/cdi.kubevirt.io/v1beta1/namespaces/default/datavolumes");
    let curl = |auth: Option<&str>| {
        let mut c = Command::new("curl");
        c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&ca)
            .arg(&path);
        if let Some(a) = auth {
            c.args(["-H", &format!("Authorization: Bearer {a}")]);
        }
        String::from_utf8(c.output().unwrap().stdout).unwrap()
    };
    assert_eq!(curl(None), "401");
    let mut forged = token.clone();
    forged.replace_range(0..1, if token.starts_with('a') { "b" } else { "a" });
    assert_eq!(curl(Some(&forged)), "401");
    assert_eq!(curl(Some("")), "401");
    assert_eq!(curl(Some(&token)), "200");
    let out = s.cdi(&["get", "dv", "--token", &forged]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthorized"));
}

/// Validation and optimistic concurrency through the real API: sourceRef, immutable spec,
/// stale resourceVersion.
#[test]
fn serve_rejects_invalid_and_conflicting_writes() {
    if !have("curl") {
        skip("curl is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = Serve::start(&tmp.path().join("cdi"));
    let y1 = "apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata:\n  name: fedora\nspec:\n  sourceRef:\n    kind: DataSource\n    name: fedora\n    namespace: openshift-virtualization-os-images\n  storage:\n    resources:\n      requests:\n        storage: 30Gi\n";
    let out = s.apply(y1);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sourceRef is not supported yet"));

    assert!(s.apply("apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata:\n  name: b\nspec:\n  source:\n    blank: {}\n  storage:\n    resources:\n      requests:\n        storage: 8Mi\n").status.success());
    let out = s.apply("apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata:\n  name: b\nspec:\n  source:\n    blank: {}\n  storage:\n    resources:\n      requests:\n        storage: 16Mi\n");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("immutable"),
        "{out:?}"
    );

    let url = std::fs::read_to_string(s.dir.join("server.url"))
        .unwrap()
        .trim()
        .to_string();
    let token = std::fs::read_to_string(s.dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let mut cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}});
    let put = |body: &Value, method: &str, path: &str| -> (String, Value) {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "-X", method, "--cacert"])
            .arg(s.dir.join("pki/ca.crt"))
            .args([
                "-H",
                &format!("Authorization: Bearer {token}"),
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body.to_string(),
            ])
            .arg(format!("{url}{path}"))
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (
            code.to_string(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    };
    let (code, created) = put(&cm, "POST", "/api/v1/namespaces/default/configmaps");
    assert_eq!(code, "201");
    cm["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"].clone();
    cm["data"]["a"] = "2".into();
    let (code, _) = put(&cm, "PUT", "/api/v1/namespaces/default/configmaps/c");
    assert_eq!(code, "200");
    cm["data"]["a"] = "3".into();
    let (code, status) = put(&cm, "PUT", "/api/v1/namespaces/default/configmaps/c");
    assert_eq!(code, "409");
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "Conflict");
}

/// Y46 (v1alpha1 upload DataVolume) applies unchanged but for placeholders; an UploadTokenRequest
/// and a plain HTTPS upload through the embedded proxy fill it.
#[test]
fn serve_upload_example_manifest() {
    let Some(env) = setup() else { return };
    let s = Serve::start(&env.dir.join("cdi"));
    let y46 = "apiVersion: cdi.kubevirt.io/v1alpha1\nkind: DataVolume\nmetadata:\n  name: upload-datavolume\nspec:\n  source:\n      upload: {}\n  pvc:\n    accessModes:\n      - ReadWriteOnce\n    resources:\n      requests:\n        storage: 2Gi\n";
    let out = s.apply(y46);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.ok(&[
        "wait",
        "dv",
        "upload-datavolume",
        "--for",
        "phase=UploadReady",
        "--timeout",
        "60s",
    ]);
    let dv = s.get("dv", "upload-datavolume").unwrap();
    assert_eq!(condition(&dv, "Running")["status"], "True");

    let url = std::fs::read_to_string(s.dir.join("server.url"))
        .unwrap()
        .trim()
        .to_string();
    let admin = std::fs::read_to_string(s.dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let ca = s.dir.join("pki/ca.crt");
    let token_req = r#"{"apiVersion":"upload.cdi.kubevirt.io/v1beta1","kind":"UploadTokenRequest","metadata":{"name":"t"},"spec":{"pvcName":"upload-datavolume"}}"#;
    let token_url =
        format!("{url}/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/default/uploadtokenrequests");
    // The token endpoint is an admin call.
    let anon = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&ca)
        .args([
            "-H",
            "Content-Type: application/json",
            "--data",
            token_req,
            &token_url,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&anon.stdout), "401", "{anon:?}");
    let out = Command::new("curl")
        .args(["-s", "--fail", "--cacert"])
        .arg(&ca)
        .args([
            "-H",
            &format!("Authorization: Bearer {admin}"),
            "-H",
            "Content-Type: application/json",
        ])
        .args(["--data", token_req, &token_url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let resp: Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = resp["status"]["token"].as_str().unwrap().to_string();

    let tiny = env.dir.join("tiny.bin");
    std::fs::write(&tiny, b"x").unwrap();
    // Refusals are checked with a one-byte body: the proxy answers before reading a body, and
    // curl reports a reset instead of the status when it is still sending a large one.
    let upload = |token: &str, file: &Path| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&ca)
            .args([
                "-H",
                &format!("Authorization: Bearer {token}"),
                "--data-binary",
            ])
            .arg(format!("@{}", file.display()))
            .arg(format!("{url}/v1beta1/upload"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The admin token is not an upload token.
    let refused = upload(&admin, &tiny);
    assert!(
        refused == "400" || refused == "401",
        "admin token accepted by the proxy: {refused}"
    );
    assert_eq!(upload(&token, &env.fx.qcow2), "200");
    let dv = s.wait_phase("upload-datavolume", "Succeeded", Duration::from_secs(60));
    assert_eq!(condition(&dv, "Running")["reason"], "Completed");
    qemu::assert_same_image(&s.disk("upload-datavolume"), &env.fx.qcow2);
    // A finished upload volume takes no more uploads.
    assert_eq!(upload(&token, &tiny), "503");
    assert!(
        s.get("pvc", "upload-datavolume-scratch").is_none(),
        "scratch claim is deleted afterwards"
    );
}

/// The `local-block` class: a loop device over a preallocated file, written through the block
/// path, detached and removed on delete.
#[test]
fn serve_block_class_imports_and_detaches() {
    let Some(env) = setup() else { return };
    let s = Serve::start(&env.dir.join("cdi"));
    let sc = s
        .get("storageclass", "local-block")
        .expect("local-block class exists");
    if let Some(why) =
        sc["metadata"]["annotations"]["cdi.kubevirt.io/storage.class.unavailable"].as_str()
    {
        skip(&format!("loop devices are not available here: {why}"));
        return;
    }
    let m = format!(
        "apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata:\n  name: blockdv\nspec:\n  source:\n    http:\n      url: \"{}\"\n  storage:\n    volumeMode: Block\n    storageClassName: local-block\n    resources:\n      requests:\n        storage: 64Mi\n",
        env.nginx.url("disk.qcow2")
    );
    assert!(s.apply(&m).status.success());
    s.wait_phase("blockdv", "Succeeded", Duration::from_secs(120));
    let pvc = s.get("pvc", "blockdv").unwrap();
    assert_eq!(pvc["spec"]["volumeMode"], "Block");
    // Block claims are not inflated by filesystem overhead.
    assert_eq!(
        pvc["spec"]["resources"]["requests"]["storage"],
        (64u64 << 20).to_string()
    );
    let uid = pvc["metadata"]["uid"].as_str().unwrap().to_string();
    let backing = s.dir.join("volumes").join(&uid).join("block.img");
    let dev = String::from_utf8(
        Command::new("losetup")
            .arg("-j")
            .arg(&backing)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let dev = dev.split(':').next().unwrap_or_default().trim().to_string();
    assert!(
        dev.starts_with("/dev/loop"),
        "no loop device for {}: {dev:?}",
        backing.display()
    );
    // The PersistentVolume names the device (through the claim's stable link to it).
    let pv_name = pvc["spec"]["volumeName"].as_str().expect("claim is bound");
    let pv = s.get("pv", pv_name).expect("the claim's PersistentVolume");
    let link = pv["spec"]["local"]["path"]
        .as_str()
        .expect("a local volume");
    assert_eq!(
        std::fs::canonicalize(link).unwrap(),
        Path::new(&dev),
        "{pv}"
    );
    // The device holds the image; beyond it, the (fresh) device reads as zeros.
    qemu::assert_same_image(Path::new(&dev), &env.fx.qcow2);
    s.ok(&["delete", "dv", "blockdv"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while backing.exists() {
        assert!(
            Instant::now() < deadline,
            "block claim not freed: {}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let still = String::from_utf8(
        Command::new("losetup")
            .arg("-j")
            .arg(&backing)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        still.trim().is_empty(),
        "loop device still attached: {still}"
    );
}

/// Lazy scratch: a VHD needs random access, the importer asks for scratch space, the controller
/// provisions a scratch claim of the target's size, reruns without counting a restart, and
/// deletes the scratch claim afterwards.
#[test]
fn serve_lazy_scratch_for_vhd() {
    let Some(env) = setup() else { return };
    let s = Serve::start(&env.dir.join("cdi"));
    let vhd = env.dir.join("www").join("disk.vhd");
    qemu::convert(&env.fx.raw, "raw", &vhd, "vpc", &[]).unwrap();
    assert!(
        s.apply(&http_dv("vhd", &env.nginx.url("disk.vhd"), "64Mi"))
            .status
            .success()
    );
    let dv = s.wait_phase("vhd", "Succeeded", Duration::from_secs(120));
    assert_eq!(
        dv["status"]["restartCount"], 0,
        "a scratch request is not a restart"
    );
    qemu::assert_same_image(&s.disk("vhd"), &vhd);
    assert!(
        s.get("pvc", "vhd-scratch").is_none(),
        "scratch claim deleted afterwards"
    );
    // The provisioner frees the scratch claim's storage once its volume is released.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let claims = std::fs::read_dir(s.dir.join("volumes")).unwrap().count();
        if claims == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{claims} claims' storage remains, want only the target's: {}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
