//! `cdi image-upload` against a real `cdi serve`: creates the DataVolume, waits for
//! UploadReady, gets a token, uploads through the embedded proxy into a real upload server
//! process, waits for Succeeded. qemu-img checks the volume.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cdi_tests::{KillOnDrop, cdi_bin, have, qemu, skip};

/// Volume and image size: small, the data path has its own tests.
const IMAGE_SIZE: u64 = 8 << 20;

fn start_serve(dir: &Path) -> KillOnDrop {
    std::fs::create_dir_all(dir).unwrap();
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let child = Command::new(cdi_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--restart-backoff",
            "1s",
            "--data-dir",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.join("server.url").exists() {
        assert!(Instant::now() < deadline, "cdi serve did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    KillOnDrop(child)
}

fn volume_image(dir: &Path) -> Option<PathBuf> {
    let vols = std::fs::read_dir(dir.join("volumes")).ok()?;
    vols.filter_map(Result::ok)
        .map(|e| e.path().join("disk.img"))
        .find(|p| p.exists())
}

#[test]
fn upload_image_upload_creates_dv_and_uploads_qcow2_gz() {
    if !have("qemu-img") || !have("qemu-io") {
        skip("qemu-img/qemu-io are not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fx = qemu::fixtures(&tmp.path().join("img"), IMAGE_SIZE).unwrap();
    let data = tmp.path().join("serve");
    let _serve = start_serve(&data);
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
    let _serve = start_serve(&data);
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
