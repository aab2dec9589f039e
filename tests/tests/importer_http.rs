//! End-to-end imports over HTTP(S) through the importer library, against nginx and the fault
//! server started on 127.0.0.1. Every image is checked against qemu-img.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cdi_importer::checksum::Checksum;
use cdi_importer::progress::Progress;
use cdi_importer::source::http::Credentials;
use cdi_importer::transfer::TransferLimits;
use cdi_importer::{
    ContentType, Destination, ErrorKind, ImportError, ImportOutcome, ImportRequest, SourceSpec,
    run_import,
};
use cdi_tests::fault::{FaultPlan, FaultServer};
use cdi_tests::nginx::{Nginx, NginxOptions};
use cdi_tests::pki::TestPki;
use cdi_tests::qemu::{self, Fixtures};
use cdi_tests::{have, skip};
use tokio_util::sync::CancellationToken;
use url::Url;

const IMAGE_SIZE: u64 = 24 << 20;

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    fx: Fixtures,
    pki: TestPki,
    nginx: Nginx,
}

fn setup() -> Option<Env> {
    for tool in [
        "nginx", "qemu-img", "qemu-io", "openssl", "htpasswd", "gzip",
    ] {
        if !have(tool) {
            skip(&format!("{tool} is not installed"));
            return None;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let www = dir.join("www");
    let fx = qemu::fixtures(&www, IMAGE_SIZE).unwrap();
    let pki = TestPki::generate(&dir.join("pki")).unwrap();
    let nginx = Nginx::start(
        NginxOptions {
            root: www,
            basic_auth: Some(("user".into(), "s3cret".into())),
            tls: Some(pki.clone()),
            ..Default::default()
        },
        &dir.join("nginx"),
    )
    .unwrap();
    Some(Env {
        _tmp: tmp,
        dir,
        fx,
        pki,
        nginx,
    })
}

fn http(url: &str, dest: &Path) -> ImportRequest {
    ImportRequest::new(
        SourceSpec::Http(Url::parse(url).unwrap()),
        Destination::File(dest.into()),
    )
}

fn fast_limits() -> TransferLimits {
    TransferLimits {
        max_attempts: 4,
        backoff_start: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        idle_timeout: Duration::from_secs(2),
    }
}

async fn import(req: ImportRequest) -> Result<ImportOutcome, ImportError> {
    run_import(req, Arc::new(Progress::default()), CancellationToken::new()).await
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_raw_qcow2_and_qcow2_gz_match_qemu() {
    let Some(env) = setup() else { return };
    // (served file, what qemu-img reads as the same guest data)
    for (name, served, oracle) in [
        ("disk.img", &env.fx.raw, &env.fx.raw),
        ("disk.qcow2", &env.fx.qcow2, &env.fx.qcow2),
        ("disk.qcow2.gz", &env.fx.qcow2_gz, &env.fx.qcow2),
    ] {
        let dest = env.dir.join(format!("out-{name}.raw"));
        let outcome = import(http(&env.nginx.url(name), &dest)).await.unwrap();
        qemu::assert_same_image(&dest, oracle);
        assert_eq!(
            std::fs::metadata(&dest).unwrap().len(),
            IMAGE_SIZE,
            "{name}"
        );
        assert_eq!(outcome.message.message.as_deref(), Some("Import Complete"));
        assert_eq!(
            outcome.bytes_read,
            std::fs::metadata(served).unwrap().len(),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_the_test_ca_and_an_unknown_ca() {
    let Some(env) = setup() else { return };
    let dest = env.dir.join("tls.raw");
    let mut req = http(&env.nginx.https("disk.qcow2"), &dest);
    req.tls.ca_dirs = vec![env.pki.ca_dir.clone()];
    import(req).await.unwrap();
    qemu::assert_same_image(&dest, &env.fx.qcow2);

    let err = import(http(
        &env.nginx.https("disk.qcow2"),
        &env.dir.join("tls2.raw"),
    ))
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("Unable to connect to http data source:"),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");
    assert!(!env.dir.join("tls2.raw").exists());

    // INSECURE_TLS skips verification.
    let mut req = http(&env.nginx.https("disk.img"), &env.dir.join("tls3.raw"));
    req.tls.insecure = true;
    import(req).await.unwrap();
    qemu::assert_same_image(&env.dir.join("tls3.raw"), &env.fx.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_and_a_wrong_password() {
    let Some(env) = setup() else { return };
    let dest = env.dir.join("auth.raw");
    let mut req = http(&env.nginx.url("private/disk.qcow2"), &dest);
    req.credentials = Some(Credentials {
        user: "user".into(),
        password: "s3cret".into(),
    });
    import(req).await.unwrap();
    qemu::assert_same_image(&dest, &env.fx.qcow2);

    let mut req = http(
        &env.nginx.url("private/disk.qcow2"),
        &env.dir.join("auth2.raw"),
    );
    req.credentials = Some(Credentials {
        user: "user".into(),
        password: "wrong".into(),
    });
    let err = import(req).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Unable to connect to http data source: expected status code 200, got 401. Status: 401 \
         Unauthorized"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_has_upstreams_message() {
    let Some(env) = setup() else { return };
    let err = import(http(&env.nginx.url("missing.img"), &env.dir.join("nf.raw")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect);
    assert_eq!(
        err.to_string(),
        "Unable to connect to http data source: expected status code 200, got 404. Status: 404 \
         Not Found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_keep_credentials_on_their_origin() {
    let Some(env) = setup() else { return };
    // Same origin: nginx's /redirect/private/… → /private/…, which needs the credentials again.
    let dest = env.dir.join("redir.raw");
    let mut req = http(&env.nginx.url("redirect/private/disk.qcow2"), &dest);
    req.credentials = Some(Credentials {
        user: "user".into(),
        password: "s3cret".into(),
    });
    req.secret_headers = vec!["X-Secret: hush".into()];
    req.headers = vec!["X-Test: visible".into()];
    import(req).await.unwrap();
    qemu::assert_same_image(&dest, &env.fx.qcow2);

    // Cross origin: the fault server on port A redirects to another fault server on port B.
    let target = FaultServer::start(&env.fx.qcow2, FaultPlan::default()).unwrap();
    let bouncer = FaultServer::start(
        &env.fx.qcow2,
        FaultPlan {
            redirect_to: Some(target.url("disk.qcow2")),
            ..Default::default()
        },
    )
    .unwrap();
    let dest = env.dir.join("cross.raw");
    let mut req = http(&bouncer.url("disk.qcow2"), &dest);
    req.credentials = Some(Credentials {
        user: "user".into(),
        password: "s3cret".into(),
    });
    req.secret_headers = vec!["X-Secret: hush".into()];
    req.headers = vec!["X-Test: visible".into()];
    import(req).await.unwrap();
    qemu::assert_same_image(&dest, &env.fx.qcow2);
    let first = &bouncer.requests()[0];
    assert!(
        first.header("authorization").is_some(),
        "the origin gets the credentials"
    );
    assert_eq!(first.header("x-secret"), Some("hush"));
    let followed = target.requests();
    assert!(!followed.is_empty());
    for r in &followed {
        assert_eq!(
            r.header("authorization"),
            None,
            "credentials leaked to another origin"
        );
        assert_eq!(
            r.header("x-secret"),
            None,
            "secret header leaked to another origin"
        );
        assert_eq!(r.header("x-test"), Some("visible"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksums_are_verified_and_a_mismatch_removes_the_data() {
    let Some(env) = setup() else { return };
    let good = format!("sha256:{}", sha256(&env.fx.qcow2_gz));
    let dest = env.dir.join("sum.raw");
    let mut req = http(&env.nginx.url("disk.qcow2.gz"), &dest);
    req.checksum = Some(Checksum::parse(&good).unwrap());
    import(req).await.unwrap();
    qemu::assert_same_image(&dest, &env.fx.qcow2);

    let bad = format!("sha256:{}", "0".repeat(64));
    let mut req = http(&env.nginx.url("disk.qcow2.gz"), &dest);
    req.checksum = Some(Checksum::parse(&bad).unwrap());
    let err = import(req).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ChecksumMismatch);
    let msg = err.to_string();
    assert!(
        msg.starts_with("Unable to process data: checksum validation failed: checksum mismatch: expected sha256:0000"),
        "{msg}"
    );
    assert!(msg.contains(&format!("calculated {good}")), "{msg}");
    assert!(!dest.exists(), "the written data must be removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_at_30_and_70_percent_are_resumed_without_refetching() {
    let Some(env) = setup() else { return };
    let len = std::fs::metadata(&env.fx.qcow2).unwrap().len();
    let server = FaultServer::start(
        &env.fx.qcow2,
        FaultPlan {
            drop_at: vec![len * 3 / 10, len * 7 / 10],
            ..Default::default()
        },
    )
    .unwrap();
    let dest = env.dir.join("resume.raw");
    let mut req = http(&server.url("disk.qcow2"), &dest);
    req.limits = fast_limits();
    req.checksum = Some(Checksum::parse(&format!("sha256:{}", sha256(&env.fx.qcow2))).unwrap());
    let outcome = import(req).await.unwrap();
    qemu::assert_same_image(&dest, &env.fx.qcow2);
    assert_eq!(outcome.stats.resumes, 2);
    assert_eq!(outcome.stats.restarts, 0);
    assert_eq!(server.body_bytes_sent(), len, "no byte was fetched twice");
    let gets: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .collect();
    assert_eq!(gets.len(), 3);
    assert_eq!(
        gets[1].header("range"),
        Some(format!("bytes={}-", len * 3 / 10).as_str())
    );
    assert_eq!(
        gets[2].header("range"),
        Some(format!("bytes={}-", len * 7 / 10).as_str())
    );
    assert!(
        gets[1].header("if-range").is_some(),
        "resumes carry If-Range"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_range_restarts_the_conversion_cleanly() {
    let Some(env) = setup() else { return };
    let len = std::fs::metadata(&env.fx.qcow2_gz).unwrap().len();
    let server = FaultServer::start(
        &env.fx.qcow2_gz,
        FaultPlan {
            drop_at: vec![len * 4 / 10],
            ignore_range: true,
            ..Default::default()
        },
    )
    .unwrap();
    let dest = env.dir.join("restart.raw");
    let mut req = http(&server.url("disk.qcow2.gz"), &dest);
    req.limits = fast_limits();
    req.checksum = Some(Checksum::parse(&format!("sha256:{}", sha256(&env.fx.qcow2_gz))).unwrap());
    let outcome = import(req).await.unwrap();
    qemu::assert_same_image(&dest, &env.fx.qcow2);
    assert_eq!(outcome.stats.restarts, 1);
    assert_eq!(
        server.body_bytes_sent(),
        len + len * 4 / 10,
        "restarted from byte 0 once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_transfer_is_resumed_by_the_watchdog() {
    let Some(env) = setup() else { return };
    let len = std::fs::metadata(&env.fx.raw).unwrap().len();
    let server = FaultServer::start(
        &env.fx.raw,
        FaultPlan {
            stall_at: Some(len / 2),
            ..Default::default()
        },
    )
    .unwrap();
    let dest = env.dir.join("stall.raw");
    let mut req = http(&server.url("disk.img"), &dest);
    req.limits = TransferLimits {
        idle_timeout: Duration::from_millis(700),
        ..fast_limits()
    };
    let outcome = import(req).await.unwrap();
    qemu::assert_same_image(&dest, &env.fx.raw);
    assert_eq!(outcome.stats.resumes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_fails_after_bounded_retries() {
    let Some(env) = setup() else { return };
    let len = std::fs::metadata(&env.fx.raw).unwrap().len();
    // Every response is cut shortly after it starts: far more drops than attempts allowed.
    let drops = (1..200).map(|i| i * (len / 200)).collect();
    let server = FaultServer::start(
        &env.fx.raw,
        FaultPlan {
            drop_at: drops,
            ..Default::default()
        },
    )
    .unwrap();
    let dest = env.dir.join("dead.raw");
    let mut req = http(&server.url("disk.img"), &dest);
    req.limits = fast_limits();
    let err = import(req).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transfer);
    assert!(err.is_retryable());
    assert!(err.to_string().contains("attempts to resume"), "{err}");
    assert!(!dest.exists(), "partial data is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_html_pages_are_refused() {
    let Some(env) = setup() else { return };
    let s = FaultServer::start(
        &env.fx.raw,
        FaultPlan {
            status: Some(503),
            ..Default::default()
        },
    )
    .unwrap();
    let err = import(http(&s.url("disk.img"), &env.dir.join("e.raw")))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("expected status code 200, got 503. Status: 503 Service Unavailable"),
        "{err}"
    );
    let s = FaultServer::start(
        &env.fx.raw,
        FaultPlan {
            html_error: true,
            ..Default::default()
        },
    )
    .unwrap();
    let err = import(http(&s.url("disk.img"), &env.dir.join("h.raw")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("HTML page"), "{err}");
    let s = FaultServer::start(
        &env.fx.raw,
        FaultPlan {
            redirect_to: Some("/loop".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let err = import(http(&s.url("disk.img"), &env.dir.join("r.raw")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("too many redirects"), "{err}");
    // A Content-Length larger than the body is a broken transfer, never a short image.
    let s = FaultServer::start(
        &env.fx.raw,
        FaultPlan {
            content_length_delta: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    let mut req = http(&s.url("disk.img"), &env.dir.join("cl.raw"));
    req.limits = TransferLimits {
        max_attempts: 1,
        ..fast_limits()
    };
    let err = import(req).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transfer, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_too_small_is_refused_before_writing() {
    let Some(env) = setup() else { return };
    let dest = env.dir.join("small.raw");
    let mut req = http(&env.nginx.url("disk.qcow2"), &dest);
    req.image_size = Some(8 << 20);
    let err = import(req).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Capacity, "{err}");
    assert!(!dest.exists(), "nothing may be left behind");

    // With enough room the image is grown to the usable size of the request.
    let mut req = http(&env.nginx.url("disk.qcow2"), &dest);
    req.image_size = Some(64 << 20);
    import(req).await.unwrap();
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 64 << 20);
    qemu::assert_same_image(&dest, &env.fx.qcow2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sources_and_blank_disks() {
    let Some(env) = setup() else { return };
    let dest = env.dir.join("file.raw");
    let req = ImportRequest::new(
        SourceSpec::File(env.fx.qcow2_gz.clone()),
        Destination::File(dest.clone()),
    );
    import(req).await.unwrap();
    qemu::assert_same_image(&dest, &env.fx.qcow2);

    let blank = env.dir.join("blank.img");
    let mut req = ImportRequest::new(SourceSpec::Blank, Destination::File(blank.clone()));
    req.image_size = Some(100 << 20);
    req.overhead = 0.055;
    let out = import(req).await.unwrap();
    assert_eq!(out.phases.len(), 3);
    let meta = std::fs::metadata(&blank).unwrap();
    assert_eq!(
        meta.len(),
        cdi_api::overhead::usable_space(0.055, 100 << 20)
    );
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < meta.len() / 10,
        "a blank disk is sparse"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_never_reports_success() {
    let Some(env) = setup() else { return };
    let server = FaultServer::start(
        &env.fx.raw,
        FaultPlan {
            trickle: Some((64 * 1024, Duration::from_millis(20))),
            ..Default::default()
        },
    )
    .unwrap();
    let dest = env.dir.join("cancel.raw");
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_import(
        http(&server.url("disk.img"), &dest),
        Arc::new(Progress::default()),
        cancel.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel.cancel();
    let err = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    assert!(!dest.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_are_extracted_and_escapes_refused() {
    let Some(env) = setup() else { return };
    if !have("tar") {
        skip("tar is not installed");
        return;
    }
    let src = env.dir.join("tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/a.txt"), b"alpha").unwrap();
    std::fs::write(src.join("b.bin"), vec![9u8; 100_000]).unwrap();
    let www = env.nginx.root.clone();
    let ok = std::process::Command::new("tar")
        .arg("-czf")
        .arg(www.join("tree.tar.gz"))
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(ok.success());
    let data = env.dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut req = ImportRequest::new(
        SourceSpec::Http(Url::parse(&env.nginx.url("tree.tar.gz")).unwrap()),
        Destination::Dir(data.clone()),
    );
    req.content_type = ContentType::Archive;
    let out = import(req).await.unwrap();
    assert_eq!(std::fs::read(data.join("sub/a.txt")).unwrap(), b"alpha");
    assert_eq!(
        std::fs::read(data.join("b.bin")).unwrap(),
        vec![9u8; 100_000]
    );
    assert_eq!(out.archive.unwrap().files, 2);

    // An escaping archive made by GNU tar itself (-P keeps the leading ../).
    std::fs::write(env.dir.join("evil.txt"), b"evil").unwrap();
    let ok = std::process::Command::new("tar")
        .arg("-cPf")
        .arg(www.join("evil.tar"))
        .arg("-C")
        .arg(&data)
        .arg("../evil.txt")
        .status()
        .unwrap();
    assert!(ok.success());
    std::fs::remove_file(env.dir.join("evil.txt")).unwrap();
    let data2 = env.dir.join("data2");
    std::fs::create_dir_all(&data2).unwrap();
    let mut req = ImportRequest::new(
        SourceSpec::Http(Url::parse(&env.nginx.url("evil.tar")).unwrap()),
        Destination::Dir(data2.clone()),
    );
    req.content_type = ContentType::Archive;
    let err = import(req).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnsafeArchive, "{err}");
    assert!(!env.dir.join("evil.txt").exists(), "nothing escaped");
    assert_eq!(
        std::fs::read_dir(&data2).unwrap().count(),
        0,
        "nothing left behind"
    );

    // Archives cannot target block volumes.
    let mut req = ImportRequest::new(
        SourceSpec::Http(Url::parse(&env.nginx.url("tree.tar.gz")).unwrap()),
        Destination::Block("/dev/null".into()),
    );
    req.content_type = ContentType::Archive;
    assert_eq!(import(req).await.unwrap_err().kind(), ErrorKind::Config);
}
