use serde_json::{Value, json};

use super::*;
use crate::model::{ClaimPropertySet, DvView, ProfileStatus};

fn dv(spec: Value) -> DvView {
    serde_json::from_value(json!({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "fedora", "namespace": "vms", "uid": "dv-uid",
            "labels": {"team": "a"},
            "annotations": {"cdi.kubevirt.io/storage.pod.retainAfterCompletion": "true",
                "cdi.kubevirt.io/storage.populatedFor": "fedora"}},
        "spec": spec,
    }))
    .unwrap()
}

fn config() -> ConfigView {
    serde_json::from_value(json!({
        "spec": {"insecureRegistries": ["reg.local:5000"]},
        "status": {
            "filesystemOverhead": {"global": "0.055", "storageClass": {"fast": "0.1"}},
            "scratchSpaceStorageClass": "scratchy",
            "preallocation": false,
            "importProxy": {"HTTPProxy": "http://proxy:3128", "HTTPSProxy": "http://proxy:3129",
                "noProxy": ".local"},
            "defaultPodResourceRequirements": {"limits": {"cpu": "750m", "memory": "600M"},
                "requests": {"cpu": "100m", "memory": "60M"}},
        },
    }))
    .unwrap()
}

fn profile(mode: &str) -> ProfileView {
    ProfileView {
        metadata: Default::default(),
        status: ProfileStatus {
            claim_property_sets: vec![ClaimPropertySet {
                access_modes: vec!["ReadWriteMany".into()],
                volume_mode: Some(mode.into()),
            }],
        },
    }
}

fn worker() -> Worker {
    Worker {
        image: "quay.io/cdi/cdi:v1".into(),
        pull_policy: "IfNotPresent".into(),
        verbosity: 3,
    }
}

fn size(pvc: &PersistentVolumeClaim) -> String {
    requested_size(pvc).unwrap()
}

fn anns(pvc: &PersistentVolumeClaim) -> BTreeMap<String, String> {
    pvc.metadata.annotations.clone().unwrap()
}

#[test]
fn storage_api_is_completed_from_profile_and_inflated() {
    let d = dv(json!({"source": {"http": {"url": "https://h/f.qcow2"}},
        "storage": {"resources": {"requests": {"storage": "1Gi"}}}}));
    let pvc = target_pvc(&d, Some("fast"), Some(&profile("Filesystem")), &config()).unwrap();
    let spec = pvc.spec.as_ref().unwrap();
    assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(
        spec.access_modes.as_deref(),
        Some(&["ReadWriteMany".to_string()][..])
    );
    assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
    // ceil(1 GiB * 1.1), the per-class overhead.
    assert_eq!(size(&pvc), "1181116007");
    let block = target_pvc(&d, Some("fast"), Some(&profile("Block")), &config()).unwrap();
    assert_eq!(size(&block), "1073741824");
    assert!(
        !block
            .metadata
            .labels
            .as_ref()
            .unwrap()
            .contains_key(label::FILLING_UP_SUPPRESS)
    );
}

#[test]
fn pvc_api_is_used_verbatim() {
    let d = dv(
        json!({"source": {"blank": {}}, "pvc": {"accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "1Gi"}}, "storageClassName": "x"}}),
    );
    let pvc = target_pvc(&d, None, None, &config()).unwrap();
    assert_eq!(size(&pvc), "1Gi");
    assert_eq!(pvc.spec.unwrap().storage_class_name.as_deref(), Some("x"));
}

#[test]
fn claim_rendering_errors() {
    let d = dv(
        json!({"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}}),
    );
    assert_eq!(
        target_pvc(&d, None, None, &config()).unwrap_err(),
        ClaimError::NoStorageClass
    );
    assert_eq!(
        target_pvc(&d, Some("c"), None, &config()).unwrap_err(),
        ClaimError::NoAccessModes("c".into())
    );
    let archive = dv(
        json!({"source": {"http": {"url": "http://h/a.tar"}}, "contentType": "archive",
        "storage": {"volumeMode": "Block", "resources": {"requests": {"storage": "1Gi"}}}}),
    );
    assert_eq!(
        target_pvc(&archive, Some("c"), Some(&profile("Block")), &config()).unwrap_err(),
        ClaimError::ArchiveOnBlock
    );
}

#[test]
fn target_claim_metadata_is_upstreams() {
    let d = dv(
        json!({"source": {"http": {"url": "https://h/f.qcow2", "secretRef": "creds",
        "certConfigMap": "ca", "checksum": "sha256:ab", "insecureSkipVerify": true,
        "extraHeaders": ["X-A: 1", "X-B: 2"], "secretExtraHeaders": ["hdrs"]}},
        "priorityClassName": "high", "preallocation": true,
        "storage": {"resources": {"requests": {"storage": "1Gi"}}}}),
    );
    let pvc = target_pvc(&d, Some("fast"), Some(&profile("Filesystem")), &config()).unwrap();
    assert_eq!(pvc.metadata.name.as_deref(), Some("fedora"));
    assert_eq!(pvc.metadata.namespace.as_deref(), Some("vms"));
    let owner = &pvc.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
        ("DataVolume", "fedora", "dv-uid")
    );
    assert_eq!(owner.api_version, "cdi.kubevirt.io/v1beta1");
    assert_eq!(
        (owner.controller, owner.block_owner_deletion),
        (Some(true), Some(true))
    );
    let labels = pvc.metadata.labels.clone().unwrap();
    assert_eq!(labels["app"], "containerized-data-importer");
    assert_eq!(labels["team"], "a");
    assert_eq!(labels[label::FILLING_UP_SUPPRESS], "disabled");
    let a = anns(&pvc);
    assert_eq!(a[ann::ENDPOINT], "https://h/f.qcow2");
    assert_eq!(a[ann::SOURCE], "http");
    assert_eq!(a[ann::SECRET], "creds");
    assert_eq!(a[ann::CERT_CONFIG_MAP], "ca");
    assert_eq!(a[ann::CHECKSUM], "sha256:ab");
    assert_eq!(a[ann::INSECURE_SKIP_VERIFY], "true");
    assert_eq!(a["cdi.kubevirt.io/storage.import.extraHeaders.0"], "X-A: 1");
    assert_eq!(a["cdi.kubevirt.io/storage.import.extraHeaders.1"], "X-B: 2");
    assert_eq!(
        a["cdi.kubevirt.io/storage.import.secretExtraHeaders.0"],
        "hdrs"
    );
    assert_eq!(a[ann::CONTENT_TYPE], "kubevirt");
    assert_eq!(a[ann::POD_RESTARTS], "0");
    assert_eq!(a[ann::PRIORITY_CLASS_NAME], "high");
    assert_eq!(a[ann::PREALLOCATION_REQUESTED], "true");
    assert_eq!(a[ann::CREATED_FOR_DATA_VOLUME], "dv-uid");
    assert_eq!(a[ann::POD_RETAIN_AFTER_COMPLETION], "true");
    assert!(!a.contains_key(ann::POPULATED_FOR), "delayed annotation");
    let up = target_pvc(
        &dv(json!({"source": {"upload": {}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}})),
        Some("fast"),
        Some(&profile("Filesystem")),
        &config(),
    )
    .unwrap();
    assert_eq!(anns(&up)[ann::UPLOAD_REQUEST], "");
    assert!(!anns(&up).contains_key(ann::SOURCE));
    let blank = target_pvc(
        &dv(json!({"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}})),
        Some("fast"),
        Some(&profile("Filesystem")),
        &config(),
    )
    .unwrap();
    assert_eq!(anns(&blank)[ann::SOURCE], "none");
}

/// A claim as the DataVolume reconciler created it and the API server stored it.
fn claim(extra: Value, mode: &str) -> PersistentVolumeClaim {
    let mut a = json!({ann::ENDPOINT: "https://h/f.qcow2", ann::SOURCE: "http",
        ann::CONTENT_TYPE: "kubevirt", ann::PREALLOCATION_REQUESTED: "false",
        ann::IMPORT_POD: "importer-fedora"});
    for (k, v) in extra.as_object().unwrap() {
        a[k] = v.clone();
    }
    serde_json::from_value(json!({
        "metadata": {"name": "fedora", "namespace": "vms", "uid": "pvc-uid",
            "labels": {"app": "containerized-data-importer", "team": "a"},
            "annotations": a,
            "ownerReferences": [{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                "name": "fedora", "uid": "dv-uid", "controller": true}]},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
            "volumeMode": mode, "resources": {"requests": {"storage": "1181116007"}}},
    }))
    .unwrap()
}

fn env_map(c: &Container) -> Vec<(String, Option<String>)> {
    c.env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect()
}

#[test]
fn importer_env_is_upstreams_make_import_env() {
    let pvc = claim(
        json!({ann::SECRET: "creds", ann::CERT_CONFIG_MAP: "ca",
        ann::CHECKSUM: "sha256:ab", "cdi.kubevirt.io/storage.import.extraHeaders.1": "X-B: 2",
        "cdi.kubevirt.io/storage.import.extraHeaders.0": "X-A: 1"}),
        "Filesystem",
    );
    let env = import_env(&pvc, &config()).unwrap();
    let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "IMPORTER_SOURCE",
            "IMPORTER_ENDPOINT",
            "IMPORTER_CONTENTTYPE",
            "IMPORTER_IMAGE_SIZE",
            "OWNER_UID",
            "FILESYSTEM_OVERHEAD",
            "INSECURE_TLS",
            "IMPORTER_DISK_ID",
            "IMPORTER_UUID",
            "IMPORTER_PULL_METHOD",
            "IMPORTER_READY_FILE",
            "IMPORTER_DONE_FILE",
            "IMPORTER_BACKING_FILE",
            "IMPORTER_THUMBPRINT",
            "http_proxy",
            "https_proxy",
            "no_proxy",
            "IMPORTER_CURRENT_CHECKPOINT",
            "IMPORTER_PREVIOUS_CHECKPOINT",
            "IMPORTER_FINAL_CHECKPOINT",
            "PREALLOCATION",
            "CACHE_MODE",
            "IMPORTER_REGISTRY_IMAGE_ARCHITECTURE",
            "IMPORTER_CHECKSUM",
            "IMPORTER_ACCESS_KEY_ID",
            "IMPORTER_SECRET_KEY",
            "IMPORTER_CERT_DIR",
            "IMPORTER_EXTRA_HEADER_0",
            "IMPORTER_EXTRA_HEADER_1",
        ]
    );
    let get = |n: &str| env.iter().find(|e| e.name == n).unwrap();
    assert_eq!(get("IMPORTER_SOURCE").value.as_deref(), Some("http"));
    assert_eq!(
        get("IMPORTER_IMAGE_SIZE").value.as_deref(),
        Some("1181116007")
    );
    assert_eq!(get("OWNER_UID").value.as_deref(), Some("dv-uid"));
    assert_eq!(get("FILESYSTEM_OVERHEAD").value.as_deref(), Some("0.1"));
    assert_eq!(get("INSECURE_TLS").value.as_deref(), Some("false"));
    assert_eq!(
        get("http_proxy").value.as_deref(),
        Some("http://proxy:3128")
    );
    assert_eq!(get("IMPORTER_CHECKSUM").value.as_deref(), Some("sha256:ab"));
    assert_eq!(get("IMPORTER_CERT_DIR").value.as_deref(), Some("/certs"));
    assert_eq!(
        get("IMPORTER_EXTRA_HEADER_0").value.as_deref(),
        Some("X-A: 1")
    );
    let key = get("IMPORTER_ACCESS_KEY_ID").value_from.as_ref().unwrap();
    let sel = key.secret_key_ref.as_ref().unwrap();
    assert_eq!(
        (sel.name.as_str(), sel.key.as_str()),
        ("creds", "accessKeyId")
    );
    assert!(get("IMPORTER_ACCESS_KEY_ID").value.is_none());
    let sel = get("IMPORTER_SECRET_KEY")
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(sel.key, "secretKey");
}

#[test]
fn block_insecure_registry_and_blank_env() {
    let reg = claim(
        json!({ann::SOURCE: "registry", ann::ENDPOINT: "docker://reg.local:5000/img"}),
        "Block",
    );
    let env = import_env(&reg, &config()).unwrap();
    let get = |n: &str| {
        env.iter()
            .find(|e| e.name == n)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(get("FILESYSTEM_OVERHEAD").as_deref(), Some("0"));
    assert_eq!(get("INSECURE_TLS").as_deref(), Some("true"));
    let blank = claim(
        json!({ann::SOURCE: "none", ann::ENDPOINT: "ignored"}),
        "Filesystem",
    );
    let env = import_env(&blank, &config()).unwrap();
    let get = |n: &str| {
        env.iter()
            .find(|e| e.name == n)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(get("IMPORTER_SOURCE").as_deref(), Some("none"));
    assert_eq!(get("IMPORTER_ENDPOINT").as_deref(), Some(""));
    assert_eq!(get("http_proxy").as_deref(), Some(""));
    let mut missing = claim(json!({}), "Filesystem");
    missing
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .remove(ann::ENDPOINT);
    assert_eq!(
        import_env(&missing, &config()).unwrap_err(),
        ClaimError::MissingAnnotation(ann::ENDPOINT)
    );
}

#[test]
fn importer_pod_shape_filesystem_with_scratch_and_certs() {
    let pvc = claim(
        json!({ann::CERT_CONFIG_MAP: "ca", ann::PRIORITY_CLASS_NAME: "high",
        "cdi.kubevirt.io/storage.import.secretExtraHeaders.0": "hdrs"}),
        "Filesystem",
    );
    let pod = importer_pod(&pvc, &worker(), &config(), Some("fedora-scratch")).unwrap();
    let meta = &pod.metadata;
    assert_eq!(meta.name.as_deref(), Some("importer-fedora"));
    assert_eq!(meta.namespace.as_deref(), Some("vms"));
    let labels = meta.labels.clone().unwrap();
    assert_eq!(labels["app"], "containerized-data-importer");
    assert_eq!(labels["cdi.kubevirt.io"], "importer");
    assert_eq!(labels["prometheus.cdi.kubevirt.io"], "true");
    assert_eq!(labels["team"], "a");
    let a = meta.annotations.clone().unwrap();
    assert_eq!(a[ann::CREATED_BY], "yes");
    assert_eq!(a["sidecar.istio.io/inject"], "false");
    assert_eq!(a["linkerd.io/inject"], "disabled");
    assert_eq!(a[ann::PRIORITY_CLASS_NAME], "high");
    let owner = &meta.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (
            owner.api_version.as_str(),
            owner.kind.as_str(),
            owner.name.as_str(),
            owner.uid.as_str()
        ),
        ("v1", "PersistentVolumeClaim", "fedora", "pvc-uid")
    );
    assert_eq!(
        (owner.controller, owner.block_owner_deletion),
        (Some(true), Some(true))
    );
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
    assert_eq!(spec.enable_service_links, Some(false));
    assert_eq!(spec.priority_class_name.as_deref(), Some("high"));
    let psc = spec.security_context.as_ref().unwrap();
    assert_eq!(psc.fs_group, Some(107));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    let c = &spec.containers[0];
    assert_eq!(c.name, "importer");
    assert_eq!(c.image.as_deref(), Some("quay.io/cdi/cdi:v1"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(
        c.command.as_deref(),
        Some(&["/usr/bin/cdi-importer".to_string()][..])
    );
    assert_eq!(c.args.as_deref(), Some(&["-v=3".to_string()][..]));
    assert_eq!(
        c.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    assert_eq!(
        c.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    let port = &c.ports.as_ref().unwrap()[0];
    assert_eq!(
        (
            port.name.as_deref(),
            port.container_port,
            port.protocol.as_deref()
        ),
        (Some("metrics"), 8443, Some("TCP"))
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.run_as_user, Some(107));
    let res = c.resources.as_ref().unwrap();
    assert_eq!(res.limits.as_ref().unwrap()["cpu"].0, "750m");
    let mounts: Vec<(&str, &str)> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert_eq!(
        mounts,
        [
            ("cdi-data-vol", "/data"),
            ("cdi-scratch-vol", "/scratch"),
            ("cdi-cert-vol", "/certs"),
            ("cdi-secret-extra-headers-vol-0", "/extraheaders/0"),
        ]
    );
    assert!(c.volume_devices.is_none());
    let vols = spec.volumes.as_ref().unwrap();
    assert_eq!(
        vols[0].persistent_volume_claim.as_ref().unwrap().claim_name,
        "fedora"
    );
    assert_eq!(
        vols[1].persistent_volume_claim.as_ref().unwrap().claim_name,
        "fedora-scratch"
    );
    assert_eq!(vols[2].config_map.as_ref().unwrap().name, "ca");
    assert_eq!(
        vols[3].secret.as_ref().unwrap().secret_name.as_deref(),
        Some("hdrs")
    );
    assert!(env_map(c).iter().any(|(n, _)| n == "IMPORTER_CERT_DIR"));
}

#[test]
fn importer_pod_block_without_scratch() {
    let pvc = claim(json!({}), "Block");
    let pod = importer_pod(&pvc, &worker(), &config(), None).unwrap();
    let spec = pod.spec.as_ref().unwrap();
    let c = &spec.containers[0];
    let dev = &c.volume_devices.as_ref().unwrap()[0];
    assert_eq!(
        (dev.name.as_str(), dev.device_path.as_str()),
        ("cdi-data-vol", "/dev/cdi-block-volume")
    );
    assert!(c.volume_mounts.is_none());
    assert_eq!(spec.volumes.as_ref().unwrap().len(), 1);
    // No mounts: no fsGroup (upstream sets it only when something is mounted).
    assert_eq!(spec.security_context.as_ref().unwrap().fs_group, None);
}

#[test]
fn scratch_claim_is_owned_by_the_pod_and_sized_for_the_image() {
    let pvc = claim(json!({"kubevirt.io/os": "fedora"}), "Filesystem");
    let mut pod = importer_pod(&pvc, &worker(), &config(), Some("fedora-scratch")).unwrap();
    pod.metadata.uid = Some("pod-uid".into());
    let s = scratch_pvc(&pvc, &pod, &config());
    assert_eq!(s.metadata.name.as_deref(), Some("fedora-scratch"));
    let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Pod", "pod-uid")
    );
    let a = s.metadata.annotations.clone().unwrap();
    assert_eq!(a["kubevirt.io/os"], "fedora");
    assert!(!a.keys().any(|k| k.contains("cdi.kubevirt.io")));
    let labels = s.metadata.labels.clone().unwrap();
    assert_eq!(labels["velero.io/exclude-from-backup"], "true");
    let spec = s.spec.as_ref().unwrap();
    assert_eq!(spec.storage_class_name.as_deref(), Some("scratchy"));
    assert_eq!(
        spec.access_modes.as_deref(),
        Some(&["ReadWriteOnce".to_string()][..])
    );
    let bytes: u64 = requested_size(&s).unwrap().parse().unwrap();
    assert_eq!(bytes % (1 << 20), 0);
    // usable(0.1, 1181116007) = 1024 MiB, inflated by the scratch class's global 0.055.
    assert_eq!(bytes, 1_133_510_656);
}

#[test]
fn upload_pod_service_and_secret() {
    let pvc = claim(
        json!({ann::UPLOAD_REQUEST: "", ann::PREALLOCATION_REQUESTED: "true"}),
        "Filesystem",
    );
    let args = UploadPodArgs {
        name: "cdi-upload-fedora".into(),
        client_name: crate::names::UPLOAD_CLIENT_NAME.into(),
        deadline: Some("2030-01-01T00:00:00Z".into()),
        scratch: Some("fedora-scratch".into()),
    };
    let mut pod = upload_pod(&pvc, &worker(), &config(), &args);
    let meta = &pod.metadata;
    assert_eq!(meta.name.as_deref(), Some("cdi-upload-fedora"));
    let labels = meta.labels.clone().unwrap();
    assert_eq!(labels["cdi.kubevirt.io"], "cdi-upload-server");
    assert_eq!(labels["service"], "cdi-upload-fedora");
    assert_eq!(labels["cdi.kubevirt.io/uploadTarget"], "pvc-uid");
    let a = meta.annotations.clone().unwrap();
    assert_eq!(a[ann::CREATED_BY_UPLOAD], "yes");
    assert_eq!(
        a["k8s.ovn.org/open-default-ports"],
        r#"[{"protocol":"tcp","port":8443}]"#
    );
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
    let c = &spec.containers[0];
    assert_eq!(
        c.command.as_deref(),
        Some(&["/usr/bin/cdi-uploadserver".to_string()][..])
    );
    assert_eq!(
        env_map(c),
        [
            ("TLS_KEY_FILE", "/etc/tls/tls.key"),
            ("TLS_CERT_FILE", "/etc/tls/tls.crt"),
            ("CLIENT_CERT_FILE", "/etc/tls/ca.crt"),
            ("FILESYSTEM_OVERHEAD", "0.1"),
            ("UPLOAD_IMAGE_SIZE", "1181116007"),
            ("CLIENT_NAME", "client.upload-server.cdi.kubevirt.io"),
            ("PREALLOCATION", "true"),
            ("DEADLINE", "2030-01-01T00:00:00Z"),
        ]
        .map(|(n, v)| (n.to_string(), Some(v.to_string())))
    );
    let probe = c.readiness_probe.as_ref().unwrap();
    let get = probe.http_get.as_ref().unwrap();
    assert_eq!(get.path.as_deref(), Some("/healthz"));
    assert_eq!(get.port, IntOrString::Int(8443));
    assert_eq!(get.scheme.as_deref(), Some("HTTPS"));
    assert_eq!(
        (probe.initial_delay_seconds, probe.period_seconds),
        (Some(2), Some(5))
    );
    let mounts: Vec<(&str, &str)> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert_eq!(
        mounts,
        [
            ("tls-config", "/etc/tls/"),
            ("cdi-data-vol", "/data"),
            ("cdi-scratch-vol", "/scratch")
        ]
    );
    assert_eq!(
        spec.volumes.as_ref().unwrap()[0]
            .secret
            .as_ref()
            .unwrap()
            .secret_name
            .as_deref(),
        Some("cdi-upload-fedora")
    );

    let block = upload_pod(
        &claim(json!({ann::UPLOAD_REQUEST: ""}), "Block"),
        &worker(),
        &config(),
        &args,
    );
    let bc = &block.spec.as_ref().unwrap().containers[0];
    assert!(env_map(bc).contains(&("DESTINATION".into(), Some("/dev/cdi-block-volume".into()))));
    assert!(env_map(bc).contains(&("FILESYSTEM_OVERHEAD".into(), Some("0".into()))));

    let svc = upload_service(&pvc, "cdi-upload-fedora");
    assert_eq!(svc.metadata.name.as_deref(), Some("cdi-upload-fedora"));
    let sspec = svc.spec.as_ref().unwrap();
    assert_eq!(sspec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(
        sspec.selector.clone().unwrap()["service"],
        "cdi-upload-fedora"
    );
    let port = &sspec.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.port, port.target_port.clone()),
        (8443, Some(IntOrString::Int(8443)))
    );
    assert_eq!(
        svc.metadata.owner_references.as_ref().unwrap()[0].uid,
        "pvc-uid"
    );

    pod.metadata.uid = Some("pod-uid".into());
    let pair = cdi_pki::CertPair {
        cert_pem: "CERT".into(),
        key_pem: "KEY".into(),
    };
    let secret = upload_secret(&pod, &pair, "CA");
    assert_eq!(secret.metadata.name.as_deref(), Some("cdi-upload-fedora"));
    assert_eq!(
        secret.metadata.owner_references.as_ref().unwrap()[0].kind,
        "Pod"
    );
    let data = secret.data.unwrap();
    assert_eq!(data["tls.key"].0, b"KEY");
    assert_eq!(data["tls.crt"].0, b"CERT");
    assert_eq!(data["ca.crt"].0, b"CA");
    assert_eq!(
        upload_server_dns_names("cdi-upload-fedora", "vms"),
        [
            "cdi-upload-fedora",
            "cdi-upload-fedora.vms",
            "cdi-upload-fedora.vms.svc"
        ]
    );
}
