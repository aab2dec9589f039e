//! kubectl against `cdi serve`: the real binary as the API server, `/usr/bin/kubectl` as the
//! client through the kubeconfig `cdi serve` writes, and the documentation's example manifests
//! applied unchanged (placeholders aside).
//!
//! Each test runs its own `cdi serve` on 127.0.0.1 over its own data directory; kubectl's
//! discovery cache lives in that directory too, so nothing leaks between tests or into $HOME.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cdi_tests::serve::Serve;
use cdi_tests::{KillOnDrop, have, skip};
use serde_json::Value;

const KUBECTL: &str = "/usr/bin/kubectl";

/// Y17 of the requirements (blank DataVolume, v1beta1) with its placeholders `<2Gi>` and
/// `<storage_class>` filled in; `storageClassName` stays where the docs put it.
const Y17_BLANK_V1BETA1: &str = r#"apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: blank-image-datavolume
spec:
  source:
    blank: {}
  storage:
    resources:
      requests:
        storage: 2Gi
  storageClassName: "local"
"#;

/// Y48 of the requirements (blank DataVolume, v1alpha1), verbatim.
const Y48_BLANK_V1ALPHA1: &str = r#"apiVersion: cdi.kubevirt.io/v1alpha1
kind: DataVolume
metadata:
  name: blank-image-datavolume
spec:
  source:
      blank: {}
  pvc:
    # Optional: Set the storage class or omit to accept the default
    # storageClassName: "hostpath"
    accessModes:
      - ReadWriteOnce
    resources:
      requests:
        storage: 500Mi
"#;

/// Y6 of the requirements (credentials Secret), verbatim.
const Y6_SECRET: &str = r#"apiVersion: v1
kind: Secret
metadata:
  name: data-source-secret
  labels:
    app: containerized-data-importer
type: Opaque
data:
  accessKeyId: ""
  secretKey: ""
"#;

const CONFIGMAP: &str = r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  mode: fast
  level: "1"
"#;

struct Env {
    _tmp: tempfile::TempDir,
    s: Serve,
}

fn setup() -> Option<Env> {
    if !Path::new(KUBECTL).exists() {
        skip("kubectl is not installed at /usr/bin/kubectl");
        return None;
    }
    if !have("curl") {
        skip("curl is not installed");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = Serve::start(&tmp.path().join("cdi"));
    Some(Env { _tmp: tmp, s })
}

fn kubectl_cmd(s: &Serve, args: &[&str]) -> Command {
    let mut c = Command::new(KUBECTL);
    c.args(args)
        .env("KUBECONFIG", s.dir.join("kubeconfig"))
        .env("KUBECACHEDIR", s.dir.join("kube-cache"))
        .env("HOME", &s.dir)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null());
    c
}

fn kubectl(s: &Serve, args: &[&str]) -> Output {
    kubectl_cmd(s, args).output().expect("run kubectl")
}

/// kubectl that must succeed; its stdout.
fn ok(s: &Serve, args: &[&str]) -> String {
    let out = kubectl(s, args);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed:\n{}{}\n--- serve log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn manifest(s: &Serve, name: &str, text: &str) -> PathBuf {
    let p = s.dir.join(format!("{name}.yaml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn table_rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// `kubectl api-resources`, `apply` (twice: create, then patch), `get` in every output,
/// `wait`, `describe`, `patch`, `delete` with garbage collection of the claim.
#[test]
fn kubectl_drives_datavolumes_end_to_end() {
    let Some(env) = setup() else { return };
    let s = &env.s;

    let kubeconfig = s.dir.join("kubeconfig");
    assert!(
        s.log()
            .contains(&format!("export KUBECONFIG={}", kubeconfig.display())),
        "the startup log says how to use the kubeconfig: {}",
        s.log()
    );

    let res = ok(s, &["api-resources"]);
    let dv_line = res
        .lines()
        .find(|l| l.starts_with("datavolumes "))
        .unwrap_or_else(|| panic!("datavolumes listed: {res}"));
    assert!(dv_line.contains("dv,dvs"), "{dv_line}");
    assert!(dv_line.contains("cdi.kubevirt.io/v1beta1"), "{dv_line}");
    assert!(dv_line.contains("DataVolume"), "{dv_line}");
    for (name, short) in [
        ("persistentvolumeclaims", "pvc"),
        ("dataimportcrons", "dic,dics"),
        ("pods", "po"),
    ] {
        assert!(
            res.lines()
                .any(|l| l.starts_with(&format!("{name} ")) && l.contains(short)),
            "{name} with {short}: {res}"
        );
    }

    // Apply: the documentation's manifests, unchanged but for the placeholders.
    let y17 = manifest(s, "y17", Y17_BLANK_V1BETA1);
    let y48 = manifest(s, "y48", Y48_BLANK_V1ALPHA1);
    let y6 = manifest(s, "y6", Y6_SECRET);
    let cm = manifest(s, "cm", CONFIGMAP);
    let out = ok(s, &["apply", "-f", y17.to_str().unwrap()]);
    assert!(
        out.contains("datavolume.cdi.kubevirt.io/blank-image-datavolume created"),
        "{out}"
    );
    let out = ok(s, &["apply", "-n", "alpha", "-f", y48.to_str().unwrap()]);
    assert!(out.contains("blank-image-datavolume created"), "{out}");
    let out = ok(
        s,
        &[
            "apply",
            "-f",
            y6.to_str().unwrap(),
            "-f",
            cm.to_str().unwrap(),
        ],
    );
    assert!(out.contains("secret/data-source-secret created"), "{out}");
    assert!(out.contains("configmap/settings created"), "{out}");
    // The second apply computes a patch against the last-applied configuration.
    let out = ok(
        s,
        &[
            "apply",
            "-f",
            y17.to_str().unwrap(),
            "-f",
            y6.to_str().unwrap(),
        ],
    );
    assert!(out.contains("blank-image-datavolume unchanged"), "{out}");
    assert!(out.contains("secret/data-source-secret unchanged"), "{out}");
    let out = ok(s, &["apply", "-n", "alpha", "-f", y48.to_str().unwrap()]);
    assert!(out.contains("unchanged"), "{out}");
    let changed = Y6_SECRET.replace(
        "app: containerized-data-importer",
        "app: containerized-data-importer\n    tier: storage",
    );
    let y6b = manifest(s, "y6b", &changed);
    let out = ok(s, &["apply", "-f", y6b.to_str().unwrap()]);
    assert!(
        out.contains("secret/data-source-secret configured"),
        "{out}"
    );
    let labels = ok(
        s,
        &[
            "get",
            "secret",
            "data-source-secret",
            "-o",
            "jsonpath={.metadata.labels.tier}",
        ],
    );
    assert_eq!(labels, "storage");

    // Wait for the phase and for the Ready condition.
    let out = ok(
        s,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "dv/blank-image-datavolume",
            "--timeout=60s",
        ],
    );
    assert!(out.contains("condition met"), "{out}");
    let out = ok(
        s,
        &[
            "wait",
            "--for=condition=Ready",
            "dv/blank-image-datavolume",
            "--timeout=60s",
        ],
    );
    assert!(out.contains("condition met"), "{out}");
    ok(
        s,
        &[
            "wait",
            "-n",
            "alpha",
            "--for=jsonpath={.status.phase}=Succeeded",
            "datavolume/blank-image-datavolume",
            "--timeout=60s",
        ],
    );

    // get: table, wide, yaml, json, jsonpath.
    let out = ok(s, &["get", "dv"]);
    let rows = table_rows(&out);
    assert_eq!(
        rows[0],
        ["NAME", "PHASE", "PROGRESS", "RESTARTS", "AGE"],
        "{out}"
    );
    assert_eq!(
        rows[1][..3],
        ["blank-image-datavolume", "Succeeded", "100.0%"],
        "{out}"
    );
    let out = ok(s, &["get", "dv", "blank-image-datavolume", "-o", "wide"]);
    assert!(
        out.starts_with("NAME") && out.contains("Succeeded"),
        "{out}"
    );
    let out = ok(s, &["get", "dvs", "-A"]);
    assert!(
        out.starts_with("NAMESPACE") && out.contains("alpha"),
        "{out}"
    );
    let yaml = ok(s, &["get", "dv", "blank-image-datavolume", "-o", "yaml"]);
    assert!(
        yaml.contains("kind: DataVolume") && yaml.contains("phase: Succeeded"),
        "{yaml}"
    );
    let json: Value = serde_json::from_str(&ok(
        s,
        &["get", "dv", "blank-image-datavolume", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(json["metadata"]["generation"], 1);
    let uid = json["metadata"]["uid"].as_str().unwrap().to_string();
    let phase = ok(
        s,
        &[
            "get",
            "dv",
            "blank-image-datavolume",
            "-o",
            "jsonpath={.status.phase}",
        ],
    );
    assert_eq!(phase, "Succeeded");
    let alpha: Value = serde_json::from_str(&ok(
        s,
        &[
            "get",
            "datavolumes.v1alpha1.cdi.kubevirt.io",
            "-n",
            "alpha",
            "blank-image-datavolume",
            "-o",
            "json",
        ],
    ))
    .unwrap();
    assert_eq!(alpha["apiVersion"], "cdi.kubevirt.io/v1alpha1");

    // describe shows the object and its events.
    let out = ok(s, &["describe", "dv", "blank-image-datavolume"]);
    assert!(
        out.contains("Name:") && out.contains("blank-image-datavolume"),
        "{out}"
    );
    assert!(out.contains("Events:"), "{out}");
    assert!(
        out.contains("Succeeded") || out.contains("ImportSucceeded"),
        "{out}"
    );
    let events_section = out.split("Events:").nth(1).unwrap_or_default();
    assert!(
        !events_section.trim().starts_with("<none>"),
        "events are listed: {out}"
    );

    // Several kinds at once.
    let out = ok(s, &["get", "pvc,events"]);
    assert!(
        out.contains("persistentvolumeclaim/blank-image-datavolume"),
        "{out}"
    );
    assert!(out.contains("Bound"), "{out}");
    assert!(out.contains("datavolume/blank-image-datavolume"), "{out}");
    let out = ok(s, &["get", "sc"]);
    assert!(out.contains("(default)"), "{out}");
    let out = ok(s, &["get", "ns"]);
    assert!(
        out.contains("default") && out.contains("alpha") && out.contains("Active"),
        "{out}"
    );

    // patch: merge and json on a ConfigMap.
    ok(
        s,
        &[
            "patch",
            "configmap",
            "settings",
            "--type=merge",
            "-p",
            r#"{"data":{"mode":"slow"}}"#,
        ],
    );
    ok(
        s,
        &[
            "patch",
            "cm",
            "settings",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/data/level"}]"#,
        ],
    );
    ok(
        s,
        &[
            "patch",
            "cm",
            "settings",
            "-p",
            r#"{"metadata":{"labels":{"patched":"yes"}}}"#,
        ],
    );
    let data: Value =
        serde_json::from_str(&ok(s, &["get", "cm", "settings", "-o", "json"])).unwrap();
    assert_eq!(data["data"], serde_json::json!({"mode": "slow"}));
    assert_eq!(data["metadata"]["labels"]["patched"], "yes");
    let bad = kubectl(
        s,
        &[
            "patch",
            "cm",
            "settings",
            "--type=json",
            "-p",
            r#"[{"op":"test","path":"/data/mode","value":"x"}]"#,
        ],
    );
    assert!(!bad.status.success());

    // delete: the DataVolume goes, and its claim with it (owner reference).
    let out = ok(s, &["delete", "dv", "blank-image-datavolume"]);
    assert!(out.contains("deleted"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pvcs = ok(
            s,
            &["get", "pvc", "-o", "jsonpath={.items[*].metadata.name}"],
        );
        let dvs = ok(s, &["get", "dv", "-o", "jsonpath={.items[*].metadata.uid}"]);
        if pvcs.trim().is_empty() && !dvs.contains(&uid) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "claim not collected: pvcs={pvcs:?} dvs={dvs:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let gone = kubectl(s, &["get", "dv", "blank-image-datavolume"]);
    assert!(!gone.status.success());
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("NotFound"),
        "{gone:?}"
    );
}

/// `kubectl get -w` prints a change made while it watches.
#[test]
fn kubectl_get_watch_sees_changes() {
    let Some(env) = setup() else { return };
    let s = &env.s;
    let cm = manifest(s, "cm", CONFIGMAP);
    ok(s, &["apply", "-f", cm.to_str().unwrap()]);
    let out_path = s.dir.join("watch.out");
    let out_file = std::fs::File::create(&out_path).unwrap();
    let child = kubectl_cmd(s, &["get", "cm", "-w", "--output-watch-events"])
        .stdout(out_file)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = KillOnDrop(child);
    let read = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let until = |what: &str, f: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f(&read()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                read()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    until("the initial listing", &|o| o.contains("settings"));
    ok(s, &["create", "configmap", "fresh", "--from-literal=a=b"]);
    until("the new ConfigMap", &|o| {
        o.lines()
            .any(|l| l.contains("ADDED") && l.contains("fresh"))
    });
    ok(
        s,
        &[
            "patch",
            "cm",
            "settings",
            "--type=merge",
            "-p",
            r#"{"data":{"extra":"1"}}"#,
        ],
    );
    until("the change", &|o| {
        o.lines()
            .any(|l| l.contains("MODIFIED") && l.contains("settings"))
    });
    ok(s, &["delete", "cm", "fresh"]);
    until("the deletion", &|o| {
        o.lines()
            .any(|l| l.contains("DELETED") && l.contains("fresh"))
    });
}

/// A watch from a resource version older than the server's history gets one `410 Expired`
/// error event; a watch from a recent one replays only what came after it.
#[test]
fn watch_from_too_old_resource_version_expires() {
    let Some(mut env) = setup() else { return };
    let cms = "/api/v1/namespaces/default/configmaps";
    let (code, created) = env.s.request(
        "POST",
        cms,
        Some(&serde_json::json!({"metadata": {"name": "before"}})),
    );
    assert_eq!(code, 201, "{created}");
    let old_rv = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    // A later change, so that `old_rv` is older than the version the store restarts at.
    let (code, _) = env.s.request(
        "POST",
        cms,
        Some(&serde_json::json!({"metadata": {"name": "between"}})),
    );
    assert_eq!(code, 201);
    // A restart starts the history afresh: versions before it are too old to resume from.
    env.s.kill();
    let dir = env.s.dir.clone();
    env.s = Serve::start(&dir);
    let (code, ev) = env.s.request(
        "GET",
        &format!("{cms}?watch=true&resourceVersion={old_rv}&timeoutSeconds=5"),
        None,
    );
    assert_eq!(code, 200);
    assert_eq!(ev["type"], "ERROR", "{ev}");
    assert_eq!(ev["object"]["code"], 410, "{ev}");
    assert_eq!(ev["object"]["reason"], "Expired", "{ev}");

    // From the current version: the next change only.
    let (_, list) = env.s.request("GET", cms, None);
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, _) = env.s.request(
        "POST",
        cms,
        Some(&serde_json::json!({"metadata": {"name": "after"}})),
    );
    assert_eq!(code, 201);
    let (code, ev) = env.s.request(
        "GET",
        &format!("{cms}?watch=1&resourceVersion={rv}&timeoutSeconds=2"),
        None,
    );
    assert_eq!(code, 200);
    assert_eq!(ev["type"], "ADDED", "{ev}");
    assert_eq!(ev["object"]["metadata"]["name"], "after", "{ev}");

    // kubectl works against the restarted server too.
    let out = ok(&env.s, &["get", "cm", "before", "after", "-o", "name"]);
    assert_eq!(out, "configmap/before\nconfigmap/after\n");
}

/// The objects the controller creates are plain Kubernetes objects: a blank DataVolume asking to
/// keep its importer pod leaves `importer-<name>` `Succeeded`, visible with `get pods`,
/// `get pods,pvc,events` and `logs`, and its claim is bound to a PersistentVolume.
#[test]
fn kubectl_shows_the_retained_importer_pod() {
    let Some(env) = setup() else { return };
    let s = &env.s;
    let dv = manifest(
        s,
        "kept",
        "apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata:\n  name: kept\n  annotations:\n    cdi.kubevirt.io/storage.pod.retainAfterCompletion: \"true\"\nspec:\n  source:\n    blank: {}\n  storage:\n    resources:\n      requests:\n        storage: 16Mi\n",
    );
    ok(s, &["apply", "-f", dv.to_str().unwrap()]);
    let out = ok(
        s,
        &["wait", "--for=condition=Ready", "dv/kept", "--timeout=90s"],
    );
    assert!(out.contains("condition met"), "{out}");
    let phase = ok(
        s,
        &[
            "get",
            "pod",
            "importer-kept",
            "-o",
            "jsonpath={.status.phase}",
        ],
    );
    assert_eq!(phase, "Succeeded");
    let pods = ok(s, &["get", "pods"]);
    assert!(
        table_rows(&pods)
            .iter()
            .any(|r| r.first().map(String::as_str) == Some("importer-kept")),
        "{pods}"
    );
    let all = ok(s, &["get", "pods,pvc,events"]);
    assert!(
        all.contains("pod/importer-kept") && all.contains("persistentvolumeclaim/kept"),
        "{all}"
    );
    let pv = ok(
        s,
        &["get", "pvc", "kept", "-o", "jsonpath={.spec.volumeName}"],
    );
    assert!(!pv.is_empty(), "the claim is bound");
    let bound = ok(
        s,
        &["get", "pv", &pv, "-o", "jsonpath={.spec.claimRef.name}"],
    );
    assert_eq!(bound, "kept");
    let logs = kubectl(s, &["logs", "importer-kept"]);
    assert!(logs.status.success(), "{logs:?}");
}

/// The controller publishes a StorageProfile per StorageClass and the CDIConfig status, as
/// upstream's storage-profile and config controllers do; a new class gets its profile, a
/// deleted one loses it.
#[test]
fn kubectl_sees_storage_profiles_and_config_status() {
    let Some(env) = setup() else { return };
    let s = &env.s;
    let out = ok(
        s,
        &[
            "wait",
            "--for=jsonpath={.status.claimPropertySets[0].volumeMode}=Filesystem",
            "storageprofile/local",
            "--timeout=30s",
        ],
    );
    assert!(out.contains("condition met"), "{out}");
    assert_eq!(
        ok(
            s,
            &[
                "get",
                "storageprofile",
                "local",
                "-o",
                "jsonpath={.status.cloneStrategy}"
            ]
        ),
        "copy"
    );
    let out = ok(
        s,
        &[
            "wait",
            "--for=jsonpath={.status.filesystemOverhead.global}=0.055",
            "cdiconfig/config",
            "--timeout=30s",
        ],
    );
    assert!(out.contains("condition met"), "{out}");
    let sc = manifest(
        s,
        "sc",
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: other\nprovisioner: example.com/unknown\n",
    );
    ok(s, &["apply", "-f", sc.to_str().unwrap()]);
    ok(
        s,
        &[
            "wait",
            "--for=jsonpath={.status.provisioner}=example.com/unknown",
            "storageprofile/other",
            "--timeout=30s",
        ],
    );
    // Unknown provisioners offer nothing until an admin says (upstream's behaviour).
    assert_eq!(
        ok(
            s,
            &[
                "get",
                "storageprofile",
                "other",
                "-o",
                "jsonpath={.status.claimPropertySets}"
            ]
        ),
        ""
    );
    ok(
        s,
        &[
            "wait",
            "--for=jsonpath={.status.filesystemOverhead.storageClass.other}=0.055",
            "cdiconfig/config",
            "--timeout=30s",
        ],
    );
    ok(s, &["delete", "storageclass", "other"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while kubectl(s, &["get", "storageprofile", "other"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "profile outlived its class");
        std::thread::sleep(Duration::from_millis(200));
    }
}
