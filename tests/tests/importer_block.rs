//! Imports into a real block device (a loop device), as a Block-mode volume.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use cdi_importer::progress::Progress;
use cdi_importer::{Destination, ErrorKind, ImportRequest, SourceSpec, run_import};
use cdi_tests::{have, qemu, skip};
use tokio_util::sync::CancellationToken;

/// A loop device over a file; detached when dropped (also when the test fails).
struct Loop(PathBuf);

impl Loop {
    fn attach(backing: &Path, size: u64) -> Option<Loop> {
        std::fs::File::create(backing).ok()?.set_len(size).ok()?;
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        Some(Loop(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim(),
        )))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_device_targets() {
    for tool in ["losetup", "qemu-img", "qemu-io", "gzip"] {
        if !have(tool) {
            skip(&format!("{tool} is not installed"));
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let fx = qemu::fixtures(&tmp.path().join("img"), 16 << 20).unwrap();
    let Some(dev) = Loop::attach(&tmp.path().join("big.img"), 32 << 20) else {
        skip("losetup cannot attach a loop device here");
        return;
    };
    // Dirty the device first so the zero ranges of the image must really be zeroed.
    std::fs::write(&dev.0, vec![0xeeu8; 32 << 20]).unwrap();
    let req = ImportRequest::new(
        SourceSpec::File(fx.qcow2_gz.clone()),
        Destination::Block(dev.0.clone()),
    );
    run_import(req, Arc::new(Progress::default()), CancellationToken::new())
        .await
        .unwrap();
    // The guest data must match; the device's tail beyond the image is not the image's
    // business (upstream's qemu-img convert leaves it alone too).
    let written = std::fs::read(&dev.0).unwrap();
    let expected = std::fs::read(&fx.raw).unwrap();
    assert_eq!(written.len(), 32 << 20);
    assert!(
        written[..expected.len()] == expected[..],
        "guest data differs from qemu's view of the image"
    );

    // Too small a device is refused before anything is written.
    let Some(small) = Loop::attach(&tmp.path().join("small.img"), 8 << 20) else {
        skip("losetup cannot attach a second loop device");
        return;
    };
    std::fs::write(&small.0, vec![0x5au8; 8 << 20]).unwrap();
    let req = ImportRequest::new(
        SourceSpec::File(fx.qcow2.clone()),
        Destination::Block(small.0.clone()),
    );
    let err = run_import(req, Arc::new(Progress::default()), CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Capacity, "{err}");
    let after = std::fs::read(&small.0).unwrap();
    assert!(
        after.iter().all(|b| *b == 0x5a),
        "nothing was written to the device"
    );

    // Blank with preallocation zeroes the device.
    let mut req = ImportRequest::new(SourceSpec::Blank, Destination::Block(small.0.clone()));
    req.preallocation = true;
    run_import(req, Arc::new(Progress::default()), CancellationToken::new())
        .await
        .unwrap();
    let after = std::fs::read(&small.0).unwrap();
    assert!(
        after.iter().all(|b| *b == 0),
        "preallocated blank block volume reads as zeroes"
    );
}
