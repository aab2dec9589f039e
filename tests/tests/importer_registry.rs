//! Registry imports through the importer library against Debian's docker-registry over TLS
//! with basic auth; images built with umoci and pushed with skopeo.

use std::sync::Arc;

use cdi_importer::progress::Progress;
use cdi_importer::source::http::Credentials;
use cdi_importer::{Destination, ErrorKind, ImportError, ImportRequest, SourceSpec, run_import};
use cdi_tests::nginx::{Nginx, NginxOptions};
use cdi_tests::pki::TestPki;
use cdi_tests::registry::{PushOptions, Registry};
use cdi_tests::{have, have_all, qemu, skip};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_basic_auth_over_tls_gzip_zstd_and_docker_v2() {
    for tool in [
        "docker-registry",
        "umoci",
        "skopeo",
        "htpasswd",
        "openssl",
        "qemu-img",
        "qemu-io",
        "gzip",
    ] {
        if !have(tool) {
            skip(&format!("{tool} is not installed"));
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let fx = qemu::fixtures(&tmp.path().join("img"), 16 << 20).unwrap();
    let pki = TestPki::generate(&tmp.path().join("pki")).unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), &pki, Some(("tester", "s3cret"))).unwrap();
    let creds = Some(Credentials {
        user: "tester".into(),
        password: "s3cret".into(),
    });
    let cases = [
        (
            "kubevirt/gzip:v1",
            PushOptions {
                env: vec!["INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small".into()],
                ..Default::default()
            },
        ),
        (
            "kubevirt/zstd:v1",
            PushOptions {
                zstd: true,
                ..Default::default()
            },
        ),
        (
            "kubevirt/docker:v1",
            PushOptions {
                docker_v2s2: true,
                ..Default::default()
            },
        ),
    ];
    for (i, (repo, opts)) in cases.iter().enumerate() {
        let url = reg.push_disk(&fx.qcow2, repo, opts).unwrap();
        let raw = std::process::Command::new("skopeo")
            .args(["inspect", "--raw", "--creds", "tester:s3cret", "--cert-dir"])
            .arg(&reg.ca_dir)
            .arg(&url)
            .output()
            .unwrap();
        let manifest = String::from_utf8_lossy(&raw.stdout).to_string();
        if opts.zstd {
            assert!(manifest.contains("zstd"), "layer is zstd: {manifest}");
        }
        if opts.docker_v2s2 {
            assert!(
                manifest.contains("application/vnd.docker.distribution.manifest.v2+json"),
                "{manifest}"
            );
        }
        let dest = tmp.path().join(format!("reg{i}.raw"));
        let mut req =
            ImportRequest::new(SourceSpec::Registry(url), Destination::File(dest.clone()));
        req.credentials = creds.clone();
        req.tls.ca_dirs = vec![reg.ca_dir.clone()];
        req.architecture = Some("amd64".into());
        let out = run_import(req, Arc::new(Progress::default()), CancellationToken::new())
            .await
            .unwrap();
        qemu::assert_same_image(&dest, &fx.qcow2);
        if i == 0 {
            let labels = out.message.labels.unwrap_or_default();
            assert_eq!(
                labels
                    .get("instancetype.kubevirt.io/default-instancetype")
                    .map(String::as_str),
                Some("u1.small")
            );
        }
    }

    // A multi-arch index: amd64 holds the qcow2, arm64 the raw image; the requested
    // architecture decides which disk lands in the target.
    reg.push_disk(&fx.qcow2, "kubevirt/multi:amd64", &PushOptions::default())
        .unwrap();
    let arm = PushOptions {
        architecture: Some("arm64".into()),
        ..Default::default()
    };
    reg.push_disk(&fx.raw, "kubevirt/multi:arm64", &arm)
        .unwrap();
    let multi = reg
        .push_index(
            "kubevirt/multi",
            &[("amd64", "amd64"), ("arm64", "arm64")],
            "latest",
        )
        .unwrap();
    for (arch, oracle) in [("amd64", &fx.qcow2), ("arm64", &fx.raw)] {
        let dest = tmp.path().join(format!("multi-{arch}.raw"));
        let mut req = ImportRequest::new(
            SourceSpec::Registry(multi.clone()),
            Destination::File(dest.clone()),
        );
        req.credentials = creds.clone();
        req.tls.ca_dirs = vec![reg.ca_dir.clone()];
        req.architecture = Some(arch.into());
        run_import(req, Arc::new(Progress::default()), CancellationToken::new())
            .await
            .unwrap();
        qemu::assert_same_image(&dest, oracle);
        let picked = std::fs::read(&dest).unwrap();
        assert_eq!(picked.len() as u64, 16 << 20);
    }

    // The same through the pod contract: labels travel in the termination message.
    let work = tmp.path().join("pod");
    std::fs::create_dir_all(work.join("data")).unwrap();
    let out = std::process::Command::new(cdi_tests::cdi_bin())
        .arg("importer")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("IMPORTER_SOURCE", "registry")
        .env(
            "IMPORTER_ENDPOINT",
            format!("docker://{}/kubevirt/gzip:v1", reg.host),
        )
        .env("IMPORTER_ACCESS_KEY_ID", "tester")
        .env("IMPORTER_SECRET_KEY", "s3cret")
        .env("IMPORTER_CERT_DIR", &reg.ca_dir)
        .env("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE", "amd64")
        .env("CDI_DATA_DIR", work.join("data"))
        .env("CDI_BLOCK_DEVICE", work.join("none"))
        .env("CDI_SCRATCH_DIR", work.join("none"))
        .env("CDI_TERMINATION_LOG", work.join("termination-log"))
        .env("CDI_METRICS_ADDR", "off")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let term = std::fs::read_to_string(work.join("termination-log")).unwrap();
    assert_eq!(
        term.trim(),
        r#"{"preallocationApplied":false,"labels":{"instancetype.kubevirt.io/default-instancetype":"u1.small"},"message":"Import Complete"}"#
    );
    qemu::assert_same_image(&work.join("data/disk.img"), &fx.qcow2);

    // Wrong password: a clear connect error.
    let url = format!("docker://{}/kubevirt/gzip:v1", reg.host);
    let mut req = ImportRequest::new(
        SourceSpec::Registry(url.clone()),
        Destination::File(tmp.path().join("x.raw")),
    );
    req.credentials = Some(Credentials {
        user: "tester".into(),
        password: "nope".into(),
    });
    req.tls.ca_dirs = vec![reg.ca_dir.clone()];
    let err = run_import(req, Arc::new(Progress::default()), CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    assert!(err.to_string().contains("401"), "{err}");

    // An architecture the image does not have.
    let mut req = ImportRequest::new(
        SourceSpec::Registry(url),
        Destination::File(tmp.path().join("y.raw")),
    );
    req.credentials = creds;
    req.tls.ca_dirs = vec![reg.ca_dir.clone()];
    req.architecture = Some("s390x".into());
    let err = run_import(req, Arc::new(Progress::default()), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("s390x"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_bearer_token_flow() {
    for tool in [
        "docker-registry",
        "umoci",
        "skopeo",
        "htpasswd",
        "openssl",
        "nginx",
        "qemu-img",
        "qemu-io",
        "gzip",
    ] {
        if !have(tool) {
            skip(&format!("{tool} is not installed"));
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let fx = qemu::fixtures(&tmp.path().join("img"), 8 << 20).unwrap();
    let pki = TestPki::generate(&tmp.path().join("pki")).unwrap();
    // The token endpoint: a static token behind nginx basic auth.
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(
        www.join("token"),
        r#"{"token":"t0k3n","access_token":"t0k3n","expires_in":300}"#,
    )
    .unwrap();
    let nginx = Nginx::start(
        NginxOptions {
            root: www,
            basic_auth: Some(("tester".into(), "s3cret".into())),
            tls: Some(pki.clone()),
            ..Default::default()
        },
        &tmp.path().join("nginx"),
    )
    .unwrap();
    let realm = nginx.https("private/token");
    let reg =
        Registry::start_token(&tmp.path().join("reg"), &pki, &realm, ("tester", "s3cret")).unwrap();
    let url = reg
        .push_disk(&fx.qcow2, "kubevirt/token:v1", &PushOptions::default())
        .unwrap();
    let dest = tmp.path().join("token.raw");
    let mut req = ImportRequest::new(SourceSpec::Registry(url), Destination::File(dest.clone()));
    req.credentials = Some(Credentials {
        user: "tester".into(),
        password: "s3cret".into(),
    });
    req.tls.ca_dirs = vec![reg.ca_dir.clone()];
    run_import(req, Arc::new(Progress::default()), CancellationToken::new())
        .await
        .unwrap();
    qemu::assert_same_image(&dest, &fx.qcow2);
    let log = nginx.access_log_text();
    assert!(
        log.lines().any(|l| l.contains("GET /private/token?")
            && l.contains("scope=repository%3Akubevirt%2Ftoken%3Apull")
            && l.contains(" 200 ")
            && l.contains("user=\"tester\"")),
        "token fetched with the basic credentials: {log}"
    );
}

/// A plain-HTTP registry, its work dir and fixtures; `None` (skip printed) without the tools.
fn plain_registry() -> Option<(tempfile::TempDir, qemu::Fixtures, Registry)> {
    if !have_all(&["docker-registry", "umoci", "skopeo", "qemu-img", "qemu-io"]) {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fx = qemu::fixtures(&tmp.path().join("img"), 16 << 20).unwrap();
    let reg = Registry::start_plain(&tmp.path().join("reg")).unwrap();
    Some((tmp, fx, reg))
}

/// Import `url` into the file `dest` with default settings, optionally insecure.
async fn import(url: &str, dest: &std::path::Path, insecure: bool) -> Result<(), ImportError> {
    let mut req = ImportRequest::new(
        SourceSpec::Registry(url.to_string()),
        Destination::File(dest.to_path_buf()),
    );
    req.tls.insecure = insecure;
    run_import(req, Arc::new(Progress::default()), CancellationToken::new())
        .await
        .map(|_| ())
}

/// A registry on plain HTTP (upstream's `insecureRegistries`): refused unless the import is
/// marked insecure, then fetched over HTTP after the HTTPS attempt fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_plain_http_only_when_insecure() {
    let Some((tmp, fx, reg)) = plain_registry() else {
        return;
    };
    let url = reg
        .push_disk(&fx.qcow2, "kubevirt/plain:v1", &PushOptions::default())
        .unwrap();

    let dest = tmp.path().join("secure.raw");
    let err = import(&url, &dest, false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    assert!(
        !dest.exists() || std::fs::metadata(&dest).unwrap().len() == 0,
        "nothing written"
    );

    let dest = tmp.path().join("insecure.raw");
    import(&url, &dest, true).await.unwrap();
    qemu::assert_same_image(&dest, &fx.qcow2);
}

/// Bootable container images (bootc/ostree labels) are refused before any layer is fetched,
/// as upstream does, with a final error that names the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_bootc_images_are_refused() {
    let Some((tmp, fx, reg)) = plain_registry() else {
        return;
    };
    for (tag, label) in [
        ("kubevirt/bootc:v1", "containers.bootc=1"),
        ("kubevirt/ostree:v1", "ostree.bootable=1"),
    ] {
        let url = reg
            .push_disk(
                &fx.qcow2,
                tag,
                &PushOptions {
                    labels: vec![label.into()],
                    ..Default::default()
                },
            )
            .unwrap();
        let dest = tmp.path().join("bootc.raw");
        let err = import(&url, &dest, true).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Image, "{label}: {err}");
        assert!(err.to_string().contains("bootc image detected"), "{err}");
        assert!(
            !dest.exists() || std::fs::metadata(&dest).unwrap().len() == 0,
            "{label}: nothing written"
        );
    }
}
