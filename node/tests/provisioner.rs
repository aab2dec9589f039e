//! The local provisioner against the in-memory API: binding, reclaiming, sweeping; Block
//! when this host lets us attach loop devices.

mod common;

use std::path::Path;
use std::time::Duration;

use cdi_node::storage::{LOCAL_BLOCK_PROVISIONER, LOCAL_PROVISIONER, probe_loop_devices};
use cdi_node::{CancellationToken, NodeConfig, run_provisioner};
use common::Fake;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn classes(fake: &Fake) {
    fake.create(
        "storageclasses",
        json!({"metadata": {"name": "local",
                            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
               "provisioner": LOCAL_PROVISIONER, "reclaimPolicy": "Delete",
               "volumeBindingMode": "Immediate"}),
    );
    fake.create(
        "storageclasses",
        json!({"metadata": {"name": "local-block"}, "provisioner": LOCAL_BLOCK_PROVISIONER,
               "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"}),
    );
}

fn claim(name: &str, class: Option<&str>, mode: &str, size: &str) -> Value {
    let mut c = json!({"metadata": {"name": name, "namespace": "ns1"},
                       "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": mode,
                                "resources": {"requests": {"storage": size}}}});
    if let Some(class) = class {
        c["spec"]["storageClassName"] = json!(class);
    }
    c
}

fn start(
    fake: &Fake,
    tmp: &Path,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), cdi_node::NodeError>>,
) {
    let mut cfg = NodeConfig::new(tmp.join("data"), tmp.join("run")).unwrap();
    cfg.node_name = "node-a".into();
    cfg.resync_interval = Duration::from_millis(200);
    let shutdown = CancellationToken::new();
    let h = tokio::spawn(run_provisioner(fake.client(), cfg, shutdown.clone()));
    (shutdown, h)
}

async fn bound(fake: &Fake, name: &str) -> Value {
    fake.wait_for("claim bound", WAIT, |f| {
        f.get("persistentvolumeclaims", "ns1", name)
            .filter(|c| c["status"]["phase"] == "Bound")
    })
    .await
}

#[tokio::test]
async fn filesystem_claim_is_bound_to_a_host_path_volume_and_reclaimed() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = Fake::new();
    classes(&fake);
    // Storage left by a crash, named by no claim or volume.
    let orphan = tmp.path().join("data/volumes/0000dead-beef");
    std::fs::create_dir_all(&orphan).unwrap();
    let created = fake.create(
        "persistentvolumeclaims",
        claim("disk", None, "Filesystem", "2Gi"),
    );
    let uid = created["metadata"]["uid"].as_str().unwrap().to_string();
    let (shutdown, h) = start(&fake, tmp.path());

    let pvc = bound(&fake, "disk").await;
    let pv_name = format!("pvc-{uid}");
    assert_eq!(pvc["spec"]["volumeName"], pv_name.as_str());
    let ann = &pvc["metadata"]["annotations"];
    assert_eq!(ann["pv.kubernetes.io/bind-completed"], "yes");
    assert_eq!(ann["pv.kubernetes.io/bound-by-controller"], "yes");
    assert_eq!(
        ann["volume.kubernetes.io/storage-provisioner"],
        LOCAL_PROVISIONER
    );
    assert_eq!(pvc["status"]["capacity"]["storage"], "2Gi");
    assert_eq!(pvc["status"]["accessModes"][0], "ReadWriteOnce");

    let pv = fake
        .get("persistentvolumes", "", &pv_name)
        .expect("PV created");
    let dir = tmp.path().join("data/volumes").join(&uid);
    assert_eq!(pv["spec"]["hostPath"]["path"], dir.display().to_string());
    assert_eq!(pv["spec"]["hostPath"]["type"], "DirectoryOrCreate");
    assert_eq!(pv["spec"]["storageClassName"], "local");
    assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Delete");
    assert_eq!(pv["spec"]["claimRef"]["uid"], uid.as_str());
    assert_eq!(pv["spec"]["claimRef"]["name"], "disk");
    assert_eq!(pv["status"]["phase"], "Bound");
    assert_eq!(
        pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"],
        LOCAL_PROVISIONER
    );
    assert_eq!(
        pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"]
            [0],
        "node-a"
    );
    assert!(dir.is_dir());
    fake.wait_for("orphan swept", WAIT, |_| (!orphan.exists()).then_some(()))
        .await;

    // A claim of a class that is not ours, and one with a mode its class cannot serve, stay
    // unbound.
    fake.create(
        "persistentvolumeclaims",
        claim("foreign", Some("ebs"), "Filesystem", "1Gi"),
    );
    fake.create(
        "persistentvolumeclaims",
        claim("wrong-mode", Some("local"), "Block", "1Gi"),
    );

    // Deleting the claim releases the storage and the volume.
    std::fs::write(dir.join("disk.img"), b"data").unwrap();
    fake.remove("persistentvolumeclaims", "ns1", "disk");
    fake.wait_for("PV deleted", WAIT, |f| {
        f.get("persistentvolumes", "", &pv_name)
            .is_none()
            .then_some(())
    })
    .await;
    assert!(!dir.exists(), "storage removed");
    for name in ["foreign", "wrong-mode"] {
        let c = fake.get("persistentvolumeclaims", "ns1", name).unwrap();
        assert!(
            c["spec"]["volumeName"].is_null() && c["status"].is_null(),
            "{name}: {c}"
        );
    }
    shutdown.cancel();
    h.await.unwrap().unwrap();
}

#[tokio::test]
async fn storage_in_use_by_a_running_pod_outlives_its_claim() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = Fake::new();
    classes(&fake);
    let created = fake.create(
        "persistentvolumeclaims",
        claim("disk", None, "Filesystem", "1Gi"),
    );
    let uid = created["metadata"]["uid"].as_str().unwrap().to_string();
    fake.create(
        "pods",
        json!({"metadata": {"name": "importer-disk", "namespace": "ns1"},
               "spec": {"containers": [{"name": "c"}],
                        "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "disk"}}]},
               "status": {"phase": "Running"}}),
    );
    let (shutdown, h) = start(&fake, tmp.path());
    bound(&fake, "disk").await;
    fake.remove("persistentvolumeclaims", "ns1", "disk");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pv_name = format!("pvc-{uid}");
    assert!(
        fake.get("persistentvolumes", "", &pv_name).is_some(),
        "kept while the pod runs"
    );
    fake.patch(
        "pods",
        "ns1",
        "importer-disk",
        &json!({"status": {"phase": "Succeeded"}}),
    );
    fake.wait_for("PV deleted", WAIT, |f| {
        f.get("persistentvolumes", "", &pv_name)
            .is_none()
            .then_some(())
    })
    .await;
    shutdown.cancel();
    h.await.unwrap().unwrap();
}

#[tokio::test]
async fn block_claim_gets_a_loop_device_behind_a_stable_link() {
    let tmp = tempfile::tempdir().unwrap();
    if let Err(why) = probe_loop_devices(&tmp.path().join("probe")) {
        println!("SKIPPED: loop devices unavailable: {why}");
        return;
    }
    let fake = Fake::new();
    classes(&fake);
    let created = fake.create(
        "persistentvolumeclaims",
        claim("raw", Some("local-block"), "Block", "8Mi"),
    );
    let uid = created["metadata"]["uid"].as_str().unwrap().to_string();
    let (shutdown, h) = start(&fake, tmp.path());
    let pvc = bound(&fake, "raw").await;
    let pv = fake
        .get(
            "persistentvolumes",
            "",
            pvc["spec"]["volumeName"].as_str().unwrap(),
        )
        .unwrap();
    let link = tmp.path().join("data/volumes").join(&uid).join("dev");
    assert_eq!(pv["spec"]["local"]["path"], link.display().to_string());
    assert_eq!(pv["spec"]["volumeMode"], "Block");
    let dev = std::fs::canonicalize(&link).unwrap();
    assert!(
        dev.display().to_string().starts_with("/dev/loop"),
        "{}",
        dev.display()
    );
    let backing = tmp.path().join("data/volumes").join(&uid).join("block.img");
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), 8 << 20);

    // A lost attachment (as after a reboot) is restored behind the same link.
    cdi_node::storage::detach_loop(&dev).unwrap();
    fake.wait_for("re-attached", WAIT, |_| {
        (!cdi_node::storage::loop_devices_of(&backing).is_empty()).then_some(())
    })
    .await;
    let again = std::fs::canonicalize(&link).unwrap();
    assert_eq!(cdi_node::storage::loop_devices_of(&backing), vec![again]);

    fake.remove("persistentvolumeclaims", "ns1", "raw");
    fake.wait_for("storage released", WAIT, |_| {
        (!backing.exists()).then_some(())
    })
    .await;
    assert!(cdi_node::storage::loop_devices_of(&backing).is_empty());
    shutdown.cancel();
    h.await.unwrap().unwrap();
}
