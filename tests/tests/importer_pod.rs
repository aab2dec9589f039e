//! The `cdi importer` pod contract and the `cdi import` CLI, run as the real binary against
//! servers on 127.0.0.1: environment in, termination message + exit code + metrics out.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cdi_tests::fault::{ConnectProxy, FaultPlan, FaultServer};
use cdi_tests::nginx::{Nginx, NginxOptions};
use cdi_tests::pki::TestPki;
use cdi_tests::qemu::{self, Fixtures};
use cdi_tests::{cdi_bin, free_port, have, have_all, skip};

const IMAGE_SIZE: u64 = 16 << 20;

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    fx: Fixtures,
}

fn setup() -> Option<Env> {
    for tool in ["qemu-img", "qemu-io", "gzip", "curl"] {
        if !have(tool) {
            skip(&format!("{tool} is not installed"));
            return None;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let fx = qemu::fixtures(&dir.join("www"), IMAGE_SIZE).unwrap();
    Some(Env { _tmp: tmp, dir, fx })
}

/// A `cdi importer` command with a clean environment and every path inside `work`.
fn importer(work: &Path, vars: &[(&str, &str)]) -> Command {
    let data = work.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut cmd = Command::new(cdi_bin());
    cmd.arg("importer")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CDI_DATA_DIR", &data)
        .env("CDI_BLOCK_DEVICE", work.join("no-block-device"))
        .env("CDI_SCRATCH_DIR", work.join("no-scratch"))
        .env("CDI_TERMINATION_LOG", work.join("termination-log"))
        .env("CDI_METRICS_ADDR", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

fn termination(work: &Path) -> String {
    std::fs::read_to_string(work.join("termination-log"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn run(mut cmd: Command) -> Output {
    cmd.output().unwrap()
}

fn scrape(port: u16) -> Option<f64> {
    let out = Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "2",
            &format!("https://127.0.0.1:{port}/metrics"),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("kubevirt_cdi_import_progress_total{ownerUID=\"uid-42\"}"))?;
    line.rsplit(' ').next()?.parse().ok()
}

#[test]
fn importer_pod_imports_reports_and_serves_progress() {
    let Some(env) = setup() else { return };
    // Trickled so the metrics endpoint can be watched mid-transfer.
    let server = FaultServer::start(
        &env.fx.raw,
        FaultPlan {
            trickle: Some((256 * 1024, Duration::from_millis(40))),
            ..Default::default()
        },
    )
    .unwrap();
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut cmd = importer(
        &env.dir,
        &[
            ("IMPORTER_SOURCE", "http"),
            ("IMPORTER_ENDPOINT", &server.url("disk.img")),
            ("IMPORTER_CONTENTTYPE", "kubevirt"),
            ("IMPORTER_IMAGE_SIZE", "32Mi"),
            ("FILESYSTEM_OVERHEAD", "0"),
            ("PREALLOCATION", "false"),
            ("INSECURE_TLS", "false"),
            ("OWNER_UID", "uid-42"),
            ("CDI_METRICS_ADDR", &metrics),
            ("IMPORTER_EXTRA_HEADER_0", "X-Test: pod"),
        ],
    );
    let mut child = cmd.spawn().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        if let Some(v) = scrape(port) {
            seen.push(v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        termination(&env.dir),
        r#"{"preallocationApplied":false,"message":"Import Complete"}"#
    );
    let disk = env.dir.join("data/disk.img");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 32 << 20);
    qemu::assert_same_image(&disk, &env.fx.raw);
    assert!(
        seen.iter().any(|v| *v > 0.0 && *v < 100.0),
        "progress seen mid-transfer: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "progress is monotonic: {seen:?}"
    );
    assert_eq!(server.requests()[0].header("x-test"), Some("pod"));
}

#[test]
fn importer_pod_checksum_mismatch_is_final_and_removes_data() {
    let Some(env) = setup() else { return };
    let server = FaultServer::start(&env.fx.qcow2, FaultPlan::default()).unwrap();
    let out = run(importer(
        &env.dir,
        &[
            ("IMPORTER_ENDPOINT", &server.url("disk.qcow2")),
            ("IMPORTER_CHECKSUM", &format!("md5:{}", "0".repeat(32))),
        ],
    ));
    assert_eq!(
        out.status.code(),
        Some(0),
        "exit 0 so the pod does not restart-loop"
    );
    let msg = termination(&env.dir);
    assert!(
        msg.starts_with(r#"{"message":"Unable to process data: checksum validation failed: checksum mismatch: expected md5:0000"#),
        "{msg}"
    );
    assert!(!env.dir.join("data/disk.img").exists());
}

#[test]
fn importer_pod_failures_exit_1_with_one_line() {
    let Some(env) = setup() else { return };
    let server = FaultServer::start(
        &env.fx.qcow2,
        FaultPlan {
            status: Some(404),
            ..Default::default()
        },
    )
    .unwrap();
    let out = run(importer(
        &env.dir,
        &[
            ("IMPORTER_SOURCE", "http"),
            ("IMPORTER_ENDPOINT", &server.url("x")),
        ],
    ));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        termination(&env.dir),
        "Unable to connect to http data source: expected status code 200, got 404. Status: 404 Not Found"
    );
    let out = run(importer(
        &env.dir,
        &[
            ("PREALLOCATION", "sometimes"),
            ("IMPORTER_ENDPOINT", "http://x/"),
        ],
    ));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        termination(&env.dir).contains("PREALLOCATION"),
        "{}",
        termination(&env.dir)
    );
}

#[test]
fn importer_pod_sigterm_stops_without_claiming_success() {
    let Some(env) = setup() else { return };
    let server = FaultServer::start(
        &env.fx.raw,
        FaultPlan {
            trickle: Some((64 * 1024, Duration::from_millis(50))),
            ..Default::default()
        },
    )
    .unwrap();
    let child = importer(&env.dir, &[("IMPORTER_ENDPOINT", &server.url("disk.img"))])
        .spawn()
        .unwrap();
    // Wait until the transfer is well under way.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.body_bytes_sent() < 512 * 1024 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.body_bytes_sent() > 0);
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let msg = termination(&env.dir);
    assert!(!msg.contains("Import Complete"), "{msg}");
    assert!(msg.contains("cancelled"), "{msg}");
    assert!(server.body_bytes_sent() < std::fs::metadata(&env.fx.raw).unwrap().len());
    assert!(
        !env.dir.join("data/disk.img").exists(),
        "partial data is removed"
    );
}

#[test]
fn importer_pod_blank_and_archive() {
    let Some(env) = setup() else { return };
    let out = run(importer(
        &env.dir,
        &[
            ("IMPORTER_SOURCE", "none"),
            ("IMPORTER_IMAGE_SIZE", "100Mi"),
            ("FILESYSTEM_OVERHEAD", "0.055"),
        ],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        termination(&env.dir),
        r#"{"preallocationApplied":false,"message":"Import Complete"}"#
    );
    let size = std::fs::metadata(env.dir.join("data/disk.img"))
        .unwrap()
        .len();
    assert_eq!(size, cdi_api::overhead::usable_space(0.055, 100 << 20));

    let out = run(importer(
        &env.dir,
        &[
            ("IMPORTER_SOURCE", "none"),
            ("IMPORTER_CONTENTTYPE", "archive"),
        ],
    ));
    assert_eq!(out.status.code(), Some(1));
    assert!(termination(&env.dir).contains("Cannot create empty disk with content type archive"));
}

#[test]
fn importer_pod_asks_for_scratch_when_the_format_needs_it() {
    let Some(env) = setup() else { return };
    let vhdx = env.dir.join("disk.vhdx");
    qemu::convert(&env.fx.raw, "raw", &vhdx, "vhdx", &[]).unwrap();
    let server = FaultServer::start(&vhdx, FaultPlan::default()).unwrap();
    let out = run(importer(
        &env.dir,
        &[("IMPORTER_ENDPOINT", &server.url("disk.vhdx"))],
    ));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let msg = termination(&env.dir);
    assert!(msg.contains(r#""scratchSpaceRequired":true"#), "{msg}");
    assert!(!msg.contains("Import Complete"), "{msg}");
    assert!(!env.dir.join("data/disk.img").exists());

    let scratch = env.dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut cmd = importer(&env.dir, &[("IMPORTER_ENDPOINT", &server.url("disk.vhdx"))]);
    cmd.env("CDI_SCRATCH_DIR", &scratch);
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        termination(&env.dir),
        r#"{"preallocationApplied":false,"message":"Import Complete"}"#
    );
    qemu::assert_same_image(&env.dir.join("data/disk.img"), &env.fx.raw);
}

#[test]
fn cdi_import_cli_summary_and_errors() {
    let Some(env) = setup() else { return };
    let server = FaultServer::start(&env.fx.qcow2_gz, FaultPlan::default()).unwrap();
    let sum = {
        let out = Command::new("sha256sum")
            .arg(&env.fx.qcow2_gz)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let dest = env.dir.join("cli.raw");
    let out = Command::new(cdi_bin())
        .args(["import", &server.url("disk.qcow2.gz")])
        .arg(&dest)
        .args([
            "--checksum",
            &format!("sha256:{sum}"),
            "--header",
            "X-Test: cli",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "quiet one-line summary when not a terminal: {stderr}"
    );
    assert!(stderr.starts_with("imported "), "{stderr}");
    assert!(stderr.contains("qcow2 in gzip"), "{stderr}");
    qemu::assert_same_image(&dest, &env.fx.qcow2);
    assert_eq!(
        server.requests().last().unwrap().header("x-test"),
        Some("cli")
    );

    let out = Command::new(cdi_bin())
        .args(["import", &server.url("disk.qcow2.gz")])
        .arg(env.dir.join("cli2.raw"))
        .args(["--checksum", &format!("sha256:{}", "1".repeat(64))])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"));
    assert!(!env.dir.join("cli2.raw").exists());

    // Local files and blank disks.
    let out = Command::new(cdi_bin())
        .args(["import", &format!("file://{}", env.fx.qcow2.display())])
        .arg(env.dir.join("cli3.raw"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    qemu::assert_same_image(&env.dir.join("cli3.raw"), &env.fx.qcow2);
    let out = Command::new(cdi_bin())
        .args(["import", "blank"])
        .arg(env.dir.join("b.raw"))
        .args(["--size", "8Mi"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(env.dir.join("b.raw")).unwrap().len(),
        8 << 20
    );
}

/// The proxy variables upstream sets on importer pods from the CDIConfig's `importProxy`:
/// `HTTP_PROXY` carries the request (the host need not resolve), `NO_PROXY` exempts a host.
#[test]
fn importer_pod_honours_http_proxy_and_no_proxy() {
    let Some(env) = setup() else { return };
    // The fault server answers any request target, absolute-form included: a forward proxy
    // that happens to hold the image.
    let proxy = FaultServer::start(&env.fx.raw, FaultPlan::default()).unwrap();
    let proxy_url = proxy.url("");
    let endpoint = "http://disk.invalid/images/disk.img";
    let vars = |no_proxy: &'static str| {
        vec![
            ("IMPORTER_SOURCE", "http"),
            ("IMPORTER_ENDPOINT", endpoint),
            ("IMPORTER_CONTENTTYPE", "kubevirt"),
            ("IMPORTER_IMAGE_SIZE", "16Mi"),
            ("FILESYSTEM_OVERHEAD", "0"),
            ("HTTP_PROXY", proxy_url.as_str()),
            ("NO_PROXY", no_proxy),
        ]
    };
    let work = env.dir.join("via-proxy");
    let out = run(importer(&work, &vars("example.org")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    qemu::assert_same_image(&work.join("data/disk.img"), &env.fx.raw);
    let reqs = proxy.requests();
    assert!(!reqs.is_empty());
    assert!(
        reqs.iter().all(|r| r.path == endpoint),
        "absolute-form requests to the proxy: {:?}",
        reqs.iter().map(|r| &r.path).collect::<Vec<_>>()
    );

    // Exempted: the importer goes direct, the name does not resolve, nothing is reported done.
    let work = env.dir.join("no-proxy");
    let out = run(importer(&work, &vars("disk.invalid")));
    assert!(!out.status.success());
    assert_eq!(proxy.requests().len(), reqs.len(), "the proxy was bypassed");
    assert!(!termination(&work).contains("Import Complete"));
}

/// `HTTPS_PROXY`: an HTTPS endpoint is reached through a `CONNECT` tunnel, TLS end to end with
/// the endpoint (the CA from `IMPORTER_CERT_DIR` still verifies it).
#[test]
fn importer_pod_tunnels_https_through_https_proxy() {
    let Some(env) = setup() else { return };
    if !have_all(&["nginx", "openssl"]) {
        return;
    }
    let pki = TestPki::generate(&env.dir.join("pki")).unwrap();
    let www = env.dir.join("www");
    let nginx = Nginx::start(
        NginxOptions {
            root: www,
            tls: Some(pki.clone()),
            ..Default::default()
        },
        &env.dir.join("nginx"),
    )
    .unwrap();
    let proxy = ConnectProxy::start().unwrap();
    let endpoint = nginx.https("disk.qcow2");
    let work = env.dir.join("tunnel");
    let out = run(importer(
        &work,
        &[
            ("IMPORTER_SOURCE", "http"),
            ("IMPORTER_ENDPOINT", &endpoint),
            ("IMPORTER_CONTENTTYPE", "kubevirt"),
            ("IMPORTER_IMAGE_SIZE", "16Mi"),
            ("FILESYSTEM_OVERHEAD", "0"),
            ("IMPORTER_CERT_DIR", pki.ca_dir.to_str().unwrap()),
            ("HTTPS_PROXY", &proxy.url()),
        ],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    qemu::assert_same_image(&work.join("data/disk.img"), &env.fx.raw);
    let host = endpoint
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let tunnels = proxy.tunnels();
    assert!(
        !tunnels.is_empty() && tunnels.iter().all(|t| *t == host),
        "tunnels {tunnels:?}, wanted {host}"
    );
}
