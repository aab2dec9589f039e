//! `cdi image-upload` against a real `cdi serve`: creates the DataVolume, waits for
//! UploadReady, gets a token, uploads through the embedded proxy into a real upload server
//! process, waits for Succeeded. qemu-img checks the volume.
//!
//! The resume tests put a [`FaultProxy`] (a TCP relay; TLS passes through) between the client
//! and `cdi serve` that cuts the upload connection once, and count the bytes it forwarded to
//! tell a resumed upload from a restarted one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cdi_tests::fault::{FaultProxy, ProxyFault};
use cdi_tests::serve::Serve;
use cdi_tests::{cdi_bin, have_all, qemu};

/// Volume and image size: small, the data path has its own tests.
const IMAGE_SIZE: u64 = 8 << 20;

fn volume_image(dir: &Path) -> Option<PathBuf> {
    let vols = std::fs::read_dir(dir.join("volumes")).ok()?;
    vols.filter_map(Result::ok)
        .map(|e| e.path().join("disk.img"))
        .find(|p| p.exists())
}

#[test]
fn upload_image_upload_creates_dv_and_uploads_qcow2_gz() {
    if !have_all(&["qemu-img", "qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fx = qemu::fixtures(&tmp.path().join("img"), IMAGE_SIZE).unwrap();
    let data = tmp.path().join("serve");
    let _serve = Serve::start(&data);
    let out = Command::new(cdi_bin())
        .args([
            "image-upload",
            "dv",
            "disk",
            "--size",
            "8Mi",
            "--wait-secs",
            "120",
            "--image-path",
        ])
        .arg(&fx.qcow2_gz)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "image-upload failed: {stderr}");
    assert!(stderr.contains("Succeeded"), "{stderr}");
    let image = volume_image(&data).expect("volume image exists");
    let oracle = tmp.path().join("oracle.raw");
    qemu::convert(&fx.qcow2, "qcow2", &oracle, "raw", &[]).unwrap();
    // The volume may be larger than the image (filesystem overhead rounding): compare the
    // image's bytes and the rest must be zero.
    let ok = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&image)
        .arg(&oracle)
        .status()
        .unwrap();
    assert!(ok.success(), "volume differs from qemu-img's conversion");
}

#[test]
fn upload_image_upload_into_missing_volume_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("serve");
    let _serve = Serve::start(&data);
    let img = tmp.path().join("x.raw");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let out = Command::new(cdi_bin())
        .args([
            "image-upload",
            "dv",
            "nope",
            "--no-create",
            "--wait-secs",
            "5",
            "--image-path",
        ])
        .arg(&img)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope"), "{stderr}");
}

/// The port `cdi serve` listens on (from `server.url` in its data directory).
fn serve_port(data: &Path) -> u16 {
    let url = std::fs::read_to_string(data.join("server.url")).unwrap();
    url.trim()
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in server.url {url:?}"))
}

/// `cdi image-upload dv NAME` of `image` into a new volume of `size`, uploading through
/// `uploadproxy` (API calls go straight to `cdi serve`).
fn image_upload(data: &Path, name: &str, size: &str, image: &Path, uploadproxy: &str) -> Output {
    Command::new(cdi_bin())
        .args(["image-upload", "dv", name, "--size", size])
        .args(["--wait-secs", "120", "--uploadproxy-url", uploadproxy])
        .arg("--image-path")
        .arg(image)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap()
}

/// The byte count of the "server has N bytes" line the client prints when it resumes.
fn resumed_at(stderr: &str) -> Option<u64> {
    let at = stderr.find("server has ")? + "server has ".len();
    stderr[at..].split_whitespace().next()?.parse().ok()
}

/// Compare the volume (raw, possibly longer) with `oracle` (raw) under qemu-img.
fn assert_volume_is(data: &Path, oracle: &Path) {
    let image = volume_image(data).expect("volume image exists");
    let ok = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&image)
        .arg(oracle)
        .status()
        .unwrap();
    assert!(ok.success(), "volume differs from {}", oracle.display());
}

/// Upload `image` through a relay that cuts the connection once at half of the image's size;
/// the client must resume at the server's offset, not start over.
fn resume_after_a_cut_at_half(image: &Path, size: &str, oracle: &Path, data: &Path) {
    let _serve = Serve::start(data);
    let len = std::fs::metadata(image).unwrap().len();
    let relay = FaultProxy::start(
        serve_port(data),
        ProxyFault {
            cut_request_at: Some(len / 2),
            ..Default::default()
        },
    )
    .unwrap();
    let out = image_upload(
        data,
        "disk",
        size,
        image,
        &format!("https://127.0.0.1:{}", relay.port),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "image-upload failed: {stderr}");
    assert_eq!(relay.cuts(), 1, "the relay cut the upload once: {stderr}");
    assert!(stderr.contains("resuming (attempt 1/"), "{stderr}");
    let offset = resumed_at(&stderr).unwrap_or_else(|| panic!("no resume offset in {stderr}"));
    assert!(
        offset > 0 && offset <= len / 2,
        "resumed at {offset} of {len}: {stderr}"
    );
    // A restart would send the first half twice: 1.5 × the image. A resume sends the image
    // once plus what was in flight at the cut, TLS framing and a few small requests.
    let up = relay.bytes_up();
    println!(
        "image {len} bytes, cut at {}, resumed at {offset}, {up} bytes relayed",
        len / 2
    );
    assert!(
        up < len + len / 2,
        "{up} bytes relayed for a {len}-byte image: restarted rather than resumed"
    );
    assert!(
        up >= len,
        "{up} bytes relayed cannot carry a {len}-byte image"
    );
    assert_volume_is(data, oracle);
}

#[test]
fn upload_image_upload_resumes_raw_after_a_drop_at_half() {
    if !have_all(&["qemu-img", "qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("disk.raw");
    qemu::create_pattern_raw(&raw, 16 << 20).unwrap();
    resume_after_a_cut_at_half(&raw, "16Mi", &raw, &tmp.path().join("serve"));
}

#[test]
fn upload_image_upload_resumes_qcow2_through_the_streaming_decoder() {
    if !have_all(&["qemu-img", "qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("disk.raw");
    qemu::create_pattern_raw(&raw, 64 << 20).unwrap();
    let qcow2 = tmp.path().join("disk.qcow2");
    qemu::convert(&raw, "raw", &qcow2, "qcow2", &[]).unwrap();
    resume_after_a_cut_at_half(&qcow2, "64Mi", &raw, &tmp.path().join("serve"));
}

#[test]
fn upload_image_upload_learns_completion_when_the_answer_is_lost() {
    if !have_all(&["qemu-img", "qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("disk.raw");
    qemu::create_pattern_raw(&raw, IMAGE_SIZE).unwrap();
    let data = tmp.path().join("serve");
    let _serve = Serve::start(&data);
    let len = std::fs::metadata(&raw).unwrap().len();
    // Every byte reaches the server; the 200 that follows is swallowed and the connection cut.
    let relay = FaultProxy::start(
        serve_port(&data),
        ProxyFault {
            lose_response_after: Some(len),
            ..Default::default()
        },
    )
    .unwrap();
    let out = image_upload(
        &data,
        "disk",
        "8Mi",
        &raw,
        &format!("https://127.0.0.1:{}", relay.port),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert!(out.status.success(), "image-upload failed: {stderr}");
    assert_eq!(relay.cuts(), 1, "the relay swallowed one answer: {stderr}");
    assert!(
        stderr.contains("already has the whole image"),
        "the client learnt completion from the server: {stderr}"
    );
    assert!(
        relay.bytes_up() < len + len / 2,
        "the image was not sent again: {} bytes relayed; {stderr}",
        relay.bytes_up()
    );
    assert_volume_is(&data, &raw);
}

/// `POST` JSON or a body with curl against `cdi serve`; returns (status, body).
fn serve_curl(data: &Path, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--cacert"])
        .arg(data.join("pki").join("ca.crt"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn upload_finished_volume_is_refused_by_the_proxy_with_503() {
    if !have_all(&["qemu-img", "qemu-io", "curl"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("disk.raw");
    qemu::create_pattern_raw(&raw, IMAGE_SIZE).unwrap();
    let data = tmp.path().join("serve");
    let _serve = Serve::start(&data);
    let url = std::fs::read_to_string(data.join("server.url")).unwrap();
    let url = url.trim().trim_end_matches('/');
    let out = image_upload(&data, "disk", "8Mi", &raw, url);
    assert!(
        out.status.success(),
        "image-upload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The DataVolume is Succeeded: a fresh token still verifies, but the proxy sees the
    // finished volume (upstream: 503 "... already finished uploading").
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let request = r#"{"apiVersion":"upload.cdi.kubevirt.io/v1beta1","kind":"UploadTokenRequest","metadata":{"name":"disk","namespace":"default"},"spec":{"pvcName":"disk"}}"#;
    let (code, body) = serve_curl(
        &data,
        &[
            "-H",
            &format!("Authorization: Bearer {}", admin.trim()),
            "-H",
            "Content-Type: application/json",
            "--data",
            request,
            &format!(
                "{url}/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/default/uploadtokenrequests"
            ),
        ],
    );
    assert!((200..300).contains(&code), "token request: {code} {body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = token["status"]["token"].as_str().expect("status.token");
    let auth = format!("Authorization: Bearer {token}");
    let (code, body) = serve_curl(
        &data,
        &[
            "-H",
            &auth,
            "--data-binary",
            &format!("@{}", raw.display()),
            &format!("{url}/v1beta1/upload"),
        ],
    );
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("already finished uploading"), "{body}");
    let (code, body) = serve_curl(
        &data,
        &["-H", &auth, &format!("{url}/v1beta1/upload-offset")],
    );
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("already finished uploading"), "{body}");
    assert_volume_is(&data, &raw);
}
