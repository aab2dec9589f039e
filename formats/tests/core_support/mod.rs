//! Helpers shared by the conversion tests (fixtures built in code, external tools probed).

#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

/// Deterministic pseudo-random bytes (xorshift64*), so fixtures need no checked-in data and do
/// not compress. The seed is mixed first, so neighbouring seeds give different streams.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A raw image of `size` bytes, zero except for random data in `regions` (offset, len).
pub fn sparse_image(size: usize, regions: &[(usize, usize)]) -> Vec<u8> {
    let mut img = vec![0u8; size];
    for (i, &(off, len)) in regions.iter().enumerate() {
        img[off..off + len].copy_from_slice(&random_bytes(len, 0x9e37_79b9 + i as u64));
    }
    img
}

/// Bytes the file system allocated for `path`.
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// True when `tool --version` runs.
pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// True when qemu-img and qemu-io run; otherwise prints the skip line the test policy asks for.
pub fn have_qemu() -> bool {
    if have("qemu-img") && have("qemu-io") {
        return true;
    }
    println!("SKIPPED: qemu-img/qemu-io not installed (apt-get install qemu-utils)");
    false
}

/// Run a command and require success.
pub fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// `qemu-img <args> <paths>`.
pub fn qemu_img(args: &[&str], paths: &[&Path]) {
    run(Command::new("qemu-img").args(args).args(paths));
}

/// `qemu-io -f fmt -c <cmd>... image`.
pub fn qemu_io<S: AsRef<str>>(image: &Path, fmt: &str, cmds: &[S]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.arg("-c").arg(cmd.as_ref());
    }
    run(c.arg(image));
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

pub fn xz(data: &[u8]) -> Vec<u8> {
    let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 1);
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 1).unwrap()
}

pub fn bzip2(data: &[u8]) -> Vec<u8> {
    let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// A ustar archive: directories (`None`) and files, in order.
pub fn tar(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, content) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        match content {
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, name, std::io::empty()).unwrap();
            }
            Some(data) => {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}
