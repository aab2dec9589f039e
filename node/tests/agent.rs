//! The node agent against the in-memory API, with real child processes (`/bin/sh`, allowed
//! through the test-only host command list).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cdi_node::{CancellationToken, NodeConfig, run_node_agent};
use common::Fake;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

struct Env {
    fake: Fake,
    tmp: tempfile::TempDir,
    data: PathBuf,
    run: PathBuf,
    shutdown: CancellationToken,
    agent: tokio::task::JoinHandle<Result<(), cdi_node::NodeError>>,
}

fn config(tmp: &Path) -> NodeConfig {
    let mut cfg = NodeConfig::new(tmp.join("data"), tmp.join("run")).unwrap();
    cfg.host_commands = ["/bin/sh", "/usr/bin/python3"]
        .into_iter()
        .map(|c| (c.to_string(), PathBuf::from(c)))
        .collect::<BTreeMap<_, _>>();
    cfg.restart_backoff_base = Duration::from_millis(300);
    cfg
}

/// A fake API holding a bound claim `disk` (PV `pv-disk` → a temp dir) and a secret `tls`;
/// `setup` may add more before the agent starts.
async fn start(setup: impl FnOnce(&Fake, &Path)) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("volume");
    std::fs::create_dir_all(&data).unwrap();
    let fake = Fake::new();
    fake.create(
        "persistentvolumes",
        json!({"metadata": {"name": "pv-disk"},
               "spec": {"hostPath": {"path": data.display().to_string()}, "volumeMode": "Filesystem",
                        "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"]}}),
    );
    fake.create(
        "persistentvolumeclaims",
        json!({"metadata": {"name": "disk", "namespace": "ns1"},
               "spec": {"volumeName": "pv-disk", "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "1Gi"}}},
               "status": {"phase": "Bound"}}),
    );
    fake.create(
        "secrets",
        json!({"metadata": {"name": "tls", "namespace": "ns1"},
               "data": {"tls.key": "S0VZ", "user": "YWxpY2U="}}), // "KEY", "alice"
    );
    setup(&fake, tmp.path());
    let cfg = config(tmp.path());
    let run = cfg.run_root.clone();
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(run_node_agent(fake.client(), cfg, shutdown.clone()));
    Env {
        fake,
        tmp,
        data,
        run,
        shutdown,
        agent,
    }
}

/// A pod running `script` under `/bin/sh -c`, with the claim at `/data` and the secret at
/// `/etc/tls`.
fn sh_pod(name: &str, policy: &str, script: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "ns1"},
        "spec": {
            "restartPolicy": policy,
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "worker",
                "image": "quay.io/kubevirt/cdi-importer:test",
                "command": ["/bin/sh"],
                "args": ["-c", script],
                "env": [
                    {"name": "DEST", "value": "/data/disk.img"},
                    {"name": "KEY_FILE", "value": "/etc/tls/tls.key"},
                    {"name": "USER_NAME", "valueFrom": {"secretKeyRef": {"name": "tls", "key": "user"}}},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
                ],
                "volumeMounts": [{"name": "data", "mountPath": "/data"},
                                 {"name": "tls", "mountPath": "/etc/tls"}]
            }],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "disk"}},
                        {"name": "tls", "secret": {"secretName": "tls"}}]
        }
    })
}

fn container_status(pod: &Value) -> &Value {
    &pod["status"]["containerStatuses"][0]
}

fn condition<'a>(pod: &'a Value, t: &str) -> &'a Value {
    pod["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == t))
        .unwrap_or(&Value::Null)
}

fn status_patches(fake: &Fake, name: &str) -> Vec<Value> {
    fake.requests()
        .into_iter()
        .filter(|r| {
            r.method == http::Method::PATCH && r.path.ends_with(&format!("/pods/{name}/status"))
        })
        .filter_map(|r| r.body)
        .collect()
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes; /proc/<pid>/stat field 3 says which.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// Shut the agent down; the temporary directory lives on with the returned guard.
async fn stop(env: Env) -> tempfile::TempDir {
    env.shutdown.cancel();
    tokio::time::timeout(WAIT, env.agent)
        .await
        .expect("agent stops")
        .unwrap()
        .unwrap();
    env.tmp
}

#[tokio::test]
async fn failed_run_restarts_with_its_message_in_last_state_then_succeeds() {
    let env = start(|_, _| {}).await;
    let script = r#"
        echo "run as $USER_NAME in $POD at $IP, key $(cat "$KEY_FILE")" > "$DEST"
        if [ -e "$CDI_DATA_DIR/ran-once" ]; then echo "Import Complete" > "$CDI_TERMINATION_LOG"; exit 0; fi
        touch "$CDI_DATA_DIR/ran-once"
        echo "Unable to connect to http data source" > "$CDI_TERMINATION_LOG"
        echo "some log line"
        exit 3
    "#;
    env.fake
        .create("pods", sh_pod("importer-disk", "OnFailure", script));
    let pod = env
        .fake
        .wait_for("pod Succeeded", WAIT, |f| {
            f.get("pods", "ns1", "importer-disk")
                .filter(|p| p["status"]["phase"] == "Succeeded")
        })
        .await;
    let cs = container_status(&pod);
    assert_eq!(cs["restartCount"], 1);
    assert_eq!(cs["name"], "worker");
    assert_eq!(cs["image"], "quay.io/kubevirt/cdi-importer:test");
    let last = &cs["lastState"]["terminated"];
    assert_eq!(last["exitCode"], 3);
    assert_eq!(last["reason"], "Error");
    assert_eq!(last["message"], "Unable to connect to http data source\n");
    let term = &cs["state"]["terminated"];
    assert_eq!(term["exitCode"], 0);
    assert_eq!(term["reason"], "Completed");
    assert_eq!(term["message"], "Import Complete\n");
    assert!(term["startedAt"].is_string() && term["finishedAt"].is_string());
    assert_eq!(condition(&pod, "Ready")["status"], "False");
    assert_eq!(condition(&pod, "Ready")["reason"], "PodCompleted");

    // It ran with its volumes translated to host paths and its own loopback address.
    let ip = pod["status"]["podIP"].as_str().unwrap().to_string();
    assert!(ip.starts_with("127.1."), "{ip}");
    assert_eq!(pod["status"]["hostIP"], "127.0.0.1");
    assert_eq!(pod["status"]["podIPs"][0]["ip"], ip.as_str());
    let written = std::fs::read_to_string(env.data.join("disk.img")).unwrap();
    assert_eq!(
        written,
        format!("run as alice in importer-disk at {ip}, key KEY\n")
    );

    // The phases went Pending → Running → Succeeded.
    let phases: Vec<String> = status_patches(&env.fake, "importer-disk")
        .iter()
        .filter_map(|p| p["status"]["phase"].as_str().map(str::to_string))
        .collect();
    let first = |ph: &str| {
        phases
            .iter()
            .position(|p| p == ph)
            .unwrap_or_else(|| panic!("{ph} in {phases:?}"))
    };
    assert!(first("Pending") < first("Running") && first("Running") < first("Succeeded"));

    // Logs are appended across runs, and the pod says where they are.
    let uid = pod["metadata"]["uid"].as_str().unwrap();
    let log = env.run.join("pods").join(uid).join("container.log");
    assert_eq!(
        pod["metadata"]["annotations"]["cdi.kubevirt.io/node.logPath"],
        log.display().to_string()
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "some log line\n");

    // Deleting a finished pod removes its run directory and finishes the deletion.
    env.fake.delete_gracefully("ns1", "importer-disk", 30);
    env.fake
        .wait_for("pod removed", WAIT, |f| {
            f.get("pods", "ns1", "importer-disk")
                .is_none()
                .then_some(())
        })
        .await;
    assert!(!env.run.join("pods").join(uid).exists());
    stop(env).await;
}

#[tokio::test]
async fn readiness_follows_an_http_probe_on_the_pod_ip() {
    let python = Path::new("/usr/bin/python3");
    if !python.exists() {
        println!("SKIPPED: /usr/bin/python3 is not installed");
        return;
    }
    let env = start(|_, _| {}).await;
    let mut cfg_pod = sh_pod("web", "Always", "");
    let c = &mut cfg_pod["spec"]["containers"][0];
    c["command"] = json!(["/usr/bin/python3"]);
    // `$(IP)` is expanded from the container's own env, as the kubelet does.
    c["args"] = json!(["-m", "http.server", "--bind", "$(IP)", "8443"]);
    c["ports"] = json!([{"name": "http", "containerPort": 8443}]);
    c["readinessProbe"] = json!({"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1});
    env.fake.create("pods", cfg_pod);
    let pod = env
        .fake
        .wait_for("pod Ready", WAIT, |f| {
            f.get("pods", "ns1", "web")
                .filter(|p| condition(p, "Ready")["status"] == "True")
        })
        .await;
    assert_eq!(container_status(&pod)["ready"], true);
    assert_eq!(condition(&pod, "ContainersReady")["status"], "True");
    // Before the server answered, the pod was running but not ready.
    let not_ready_while_running = status_patches(&env.fake, "web").iter().any(|p| {
        p["status"]["phase"] == "Running" && p["status"]["containerStatuses"][0]["ready"] == false
    });
    assert!(not_ready_while_running);
    // The server really listens on the pod's own address.
    let ip = pod["status"]["podIP"].as_str().unwrap();
    tokio::net::TcpStream::connect((ip, 8443)).await.unwrap();
    stop(env).await;
}

#[tokio::test]
async fn crash_loop_back_off_is_shown_between_restarts_and_never_fails() {
    let env = start(|_, _| {}).await;
    env.fake
        .create("pods", sh_pod("always-fails", "Always", "exit 7"));
    env.fake
        .wait_for("CrashLoopBackOff", WAIT, |f| {
            status_patches(f, "always-fails").into_iter().find(|p| {
                p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                    == "CrashLoopBackOff"
            })
        })
        .await;
    let pod = env
        .fake
        .wait_for("restartCount 2", WAIT, |f| {
            f.get("pods", "ns1", "always-fails")
                .filter(|p| container_status(p)["restartCount"].as_i64() >= Some(2))
        })
        .await;
    assert_eq!(
        pod["status"]["phase"], "Running",
        "a crash-looping pod stays Running"
    );
    assert_eq!(
        container_status(&pod)["lastState"]["terminated"]["exitCode"],
        7
    );

    env.fake.create("pods", sh_pod("never", "Never", "exit 2"));
    let pod = env
        .fake
        .wait_for("pod Failed", WAIT, |f| {
            f.get("pods", "ns1", "never")
                .filter(|p| p["status"]["phase"] == "Failed")
        })
        .await;
    let cs = container_status(&pod);
    assert_eq!(cs["restartCount"], 0);
    assert_eq!(cs["state"]["terminated"]["exitCode"], 2);
    assert_eq!(cs["state"]["terminated"]["reason"], "Error");
    stop(env).await;
}

#[tokio::test]
async fn deletion_stops_the_process_and_removes_the_pod() {
    let env = start(|_, _| {}).await;
    // `$$` is the kubelet's escape for `$`: the shell sees `$$`.
    let script = r#"echo $$$$ > "$CDI_DATA_DIR/pid"; exec sleep 300"#;
    env.fake.create("pods", sh_pod("server", "Always", script));
    let pod = env
        .fake
        .wait_for("pod Ready", WAIT, |f| {
            f.get("pods", "ns1", "server")
                .filter(|p| condition(p, "Ready")["status"] == "True")
        })
        .await;
    assert_eq!(pod["status"]["phase"], "Running");
    assert_eq!(container_status(&pod)["started"], true);
    assert!(container_status(&pod)["state"]["running"]["startedAt"].is_string());
    let pid: i32 = env
        .fake
        .wait_for("pid file", WAIT, |_| {
            std::fs::read_to_string(env.data.join("pid"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .await;
    assert!(alive(pid));
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    let run_dir = env.run.join("pods").join(&uid);
    assert!(run_dir.join("volumes/tls/tls.key").exists());

    env.fake.delete_gracefully("ns1", "server", 5);
    env.fake
        .wait_for("pod removed", WAIT, |f| {
            f.get("pods", "ns1", "server").is_none().then_some(())
        })
        .await;
    assert!(!alive(pid), "the process is gone before the pod object");
    assert!(!run_dir.exists(), "run directory removed");
    let delete = env
        .fake
        .requests()
        .into_iter()
        .find(|r| r.method == http::Method::DELETE)
        .expect("the agent deleted the pod");
    assert_eq!(delete.body.unwrap()["gracePeriodSeconds"], 0);
    stop(env).await;
}

#[tokio::test]
async fn pods_wait_for_unbound_claims_and_missing_secrets() {
    let env = start(|fake, _| {
        fake.create(
            "persistentvolumeclaims",
            json!({"metadata": {"name": "later", "namespace": "ns1"},
                   "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}),
        );
    })
    .await;
    let mut pod = sh_pod("waits", "OnFailure", "exit 0");
    pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = json!("later");
    env.fake.create("pods", pod);
    let pod = env
        .fake
        .wait_for("Unschedulable", WAIT, |f| {
            f.get("pods", "ns1", "waits")
                .filter(|p| condition(p, "PodScheduled")["reason"] == "Unschedulable")
        })
        .await;
    assert_eq!(pod["status"]["phase"], "Pending");
    assert_eq!(
        container_status(&pod)["state"]["waiting"]["reason"],
        "ContainerCreating"
    );

    // Bind it (as the provisioner would): the pod runs to completion.
    env.fake.patch(
        "persistentvolumeclaims",
        "ns1",
        "later",
        &json!({"spec": {"volumeName": "pv-disk"}, "status": {"phase": "Bound"}}),
    );
    let pod = env
        .fake
        .wait_for("pod Succeeded", WAIT, |f| {
            f.get("pods", "ns1", "waits")
                .filter(|p| p["status"]["phase"] == "Succeeded")
        })
        .await;
    assert_eq!(condition(&pod, "PodScheduled")["status"], "True");

    // A missing secret key is a configuration error until it appears.
    let mut pod = sh_pod("needs-key", "OnFailure", "exit 0");
    pod["spec"]["containers"][0]["env"][2]["valueFrom"]["secretKeyRef"]["key"] = json!("absent");
    env.fake.create("pods", pod);
    env.fake
        .wait_for("CreateContainerConfigError", WAIT, |f| {
            f.get("pods", "ns1", "needs-key").filter(|p| {
                container_status(p)["state"]["waiting"]["reason"] == "CreateContainerConfigError"
            })
        })
        .await;
    env.fake.patch(
        "secrets",
        "ns1",
        "tls",
        &json!({"data": {"absent": "eA=="}}),
    );
    env.fake
        .wait_for("pod Succeeded", WAIT, |f| {
            f.get("pods", "ns1", "needs-key")
                .filter(|p| p["status"]["phase"] == "Succeeded")
        })
        .await;
    stop(env).await;
}

#[tokio::test]
async fn a_restarted_agent_kills_leftovers_and_reports_the_lost_run() {
    // A "previous agent" left a process behind and the pod's status says Running.
    use std::os::unix::process::CommandExt;
    let leftover = std::process::Command::new("/bin/sleep")
        .arg("300")
        .process_group(0)
        .spawn()
        .unwrap();
    let leftover_pid = i32::try_from(leftover.id()).unwrap();
    let env = start(|fake, tmp| {
        let mut pod = sh_pod("resumed", "OnFailure", "exit 0");
        pod["status"] = json!({"phase": "Running", "podIP": "127.1.9.9",
            "containerStatuses": [{"name": "worker", "image": "i", "ready": true, "restartCount": 0,
                                   "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]});
        let created = fake.create("pods", pod);
        let uid = created["metadata"]["uid"].as_str().unwrap();
        let dir = tmp.join("run/pods").join(uid);
        std::fs::create_dir_all(&dir).unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{leftover_pid}/stat")).unwrap();
        let start_time = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .nth(19)
            .unwrap()
            .to_string();
        std::fs::write(dir.join("pid"), format!("{leftover_pid} {start_time}\n")).unwrap();
        // And a run directory of a pod that no longer exists.
        std::fs::create_dir_all(tmp.join("run/pods/00000000-dead")).unwrap();
    })
    .await;
    let pod = env
        .fake
        .wait_for("resumed pod Succeeded", WAIT, |f| {
            f.get("pods", "ns1", "resumed")
                .filter(|p| p["status"]["phase"] == "Succeeded")
        })
        .await;
    let cs = container_status(&pod);
    assert_eq!(cs["restartCount"], 1);
    assert_eq!(cs["lastState"]["terminated"]["reason"], "Error");
    assert_eq!(
        cs["lastState"]["terminated"]["message"],
        "node agent restarted"
    );
    assert_eq!(
        pod["status"]["podIP"], "127.1.9.9",
        "the recorded address is kept"
    );
    let mut leftover = leftover;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        leftover.wait().unwrap().signal(),
        Some(9),
        "leftover killed"
    );
    assert!(!env.run.join("pods/00000000-dead").exists());
    stop(env).await;
}

#[tokio::test]
async fn shutdown_stops_running_pods() {
    let env = start(|_, _| {}).await;
    let script = r#"echo $$$$ > "$CDI_DATA_DIR/pid"; exec sleep 300"#;
    env.fake.create("pods", sh_pod("long", "Always", script));
    let pid: i32 = env
        .fake
        .wait_for("pid file", WAIT, |_| {
            std::fs::read_to_string(env.data.join("pid"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .await;
    assert!(alive(pid));
    let run = env.run.clone();
    let _tmp = stop(env).await;
    assert!(!alive(pid));
    // The run directory stays for the next agent (logs), without a pid record.
    let dirs: Vec<_> = std::fs::read_dir(run.join("pods"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(dirs.len(), 1);
    assert!(!dirs[0].path().join("pid").exists());
}
