//! qemu-img as the oracle: make fixtures and compare what we wrote with what qemu reads.
//!
//! ```text
//! qemu::create_pattern_raw(&raw, 64 << 20)?;      // data + holes, deterministic
//! qemu::convert(&raw, "raw", &qcow2, "qcow2")?;   // qemu-img convert -f raw -O qcow2
//! qemu::assert_same_image(&target, &qcow2);       // qemu-img compare -f raw target vs source
//! ```

use std::io;
use std::path::Path;
use std::process::Command;

use crate::run;

/// Write a raw image of `size` bytes with a deterministic mix of data and zero ranges, via
/// `qemu-img create` plus `qemu-io` pattern writes (so there are real holes).
pub fn create_pattern_raw(path: &Path, size: u64) -> io::Result<()> {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(path)
        .arg(size.to_string()))?;
    // Data every fourth MiB with a changing pattern, plus a partial block near the end.
    let mut cmds = Vec::new();
    let mib = 1u64 << 20;
    let mut off = 0u64;
    let mut pattern = 1u8;
    while off + mib <= size {
        cmds.push(format!(
            "write -P {pattern} {off} {}",
            mib / 2 + 4096 * u64::from(pattern % 7)
        ));
        off += 4 * mib;
        pattern = pattern.wrapping_add(37).max(1);
    }
    if size > 8192 {
        cmds.push(format!("write -P 0xa5 {} 4096", size - 8192));
    }
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in &cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(path);
    run(&mut cmd).map(|_| ())
}

/// `qemu-img convert -f from -O to src dst` (extra args before the paths).
pub fn convert(src: &Path, from: &str, dst: &Path, to: &str, extra: &[&str]) -> io::Result<()> {
    run(Command::new("qemu-img")
        .args(["convert", "-f", from, "-O", to])
        .args(extra)
        .arg(src)
        .arg(dst))
    .map(|_| ())
}

/// `qemu-img compare` of a raw target against `source` (format probed); `Ok(())` when
/// identical, else an error with qemu's explanation.
pub fn compare_raw(target: &Path, source: &Path) -> io::Result<()> {
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw"])
        .arg(target)
        .arg(source))
    .map(|_| ())
}

/// Panic unless the raw `target` holds the guest data of `source` (qemu-img compare: a longer
/// target must be zero beyond the source's size).
pub fn assert_same_image(target: &Path, source: &Path) {
    if let Err(e) = compare_raw(target, source) {
        panic!(
            "{} differs from {}: {e}",
            target.display(),
            source.display()
        );
    }
}

/// Virtual size of an image as qemu-img reports it.
pub fn virtual_size(path: &Path) -> io::Result<u64> {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let key = "\"virtual-size\":";
    let at = text
        .find(key)
        .ok_or_else(|| io::Error::other("no virtual-size in qemu-img info"))?;
    let digits: String = text[at + key.len()..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits
        .parse()
        .map_err(|_| io::Error::other("bad virtual-size in qemu-img info"))
}

/// The usual fixture set in `dir`: a patterned raw image of `size` bytes and its qcow2 and
/// qcow2.gz forms (gzip via the `gzip` CLI).
pub struct Fixtures {
    /// Raw image.
    pub raw: std::path::PathBuf,
    /// qcow2 of the same data.
    pub qcow2: std::path::PathBuf,
    /// gzip of the qcow2.
    pub qcow2_gz: std::path::PathBuf,
}

/// Create [`Fixtures`] under `dir`.
pub fn fixtures(dir: &Path, size: u64) -> io::Result<Fixtures> {
    std::fs::create_dir_all(dir)?;
    let raw = dir.join("disk.img");
    let qcow2 = dir.join("disk.qcow2");
    let qcow2_gz = dir.join("disk.qcow2.gz");
    create_pattern_raw(&raw, size)?;
    convert(&raw, "raw", &qcow2, "qcow2", &[])?;
    let gz = run(Command::new("gzip").arg("-c").arg(&qcow2))?;
    std::fs::write(&qcow2_gz, gz.stdout)?;
    Ok(Fixtures {
        raw,
        qcow2,
        qcow2_gz,
    })
}
