//! `cdi convert` and `cdi info` through the real binary: pipes, spilling to scratch, exit codes,
//! block-device targets, size checks, hostile images and the JSON outputs.
//!
//! qemu-img is the oracle (it writes the fixtures and renders the expected raw bytes). Tests
//! that need qemu tools or loop devices print `SKIPPED:` and return when those are missing.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cdi_tests::{cdi_bin, have, qemu, run, skip};

const MIB: u64 = 1 << 20;

/// Exit code of `cdi convert` when the conversion needs scratch space and none was given.
const EXIT_SCRATCH_REQUIRED: i32 = 3;

/// Virtual size of the ordinary test image: several L2 tables' worth at 64 KiB clusters is not
/// needed here, only enough data and holes to notice a wrong byte or a missing hole.
const IMAGE_SIZE: u64 = 16 * MIB;

fn have_tools(tools: &[&str]) -> bool {
    match tools.iter().find(|tool| !have(tool)) {
        Some(missing) => {
            skip(&format!("{missing} is not installed"));
            false
        }
        None => true,
    }
}

/// Deterministic incompressible bytes (xorshift64*).
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
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

/// A 16 MiB qcow2 with pattern data and holes, plus qemu-img's raw rendering of it.
fn qcow2_fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let raw = dir.join("source.raw");
    qemu::create_pattern_raw(&raw, IMAGE_SIZE).expect("pattern raw");
    // Some incompressible data too, so the compressed variants are not trivially small.
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .expect("open raw");
    file.write_all_at(&random_bytes(9, MIB as usize), 2 * MIB)
        .expect("random region");
    drop(file);
    let qcow2 = dir.join("disk.qcow2");
    qemu::convert(&raw, "raw", &qcow2, "qcow2", &[]).expect("qemu-img convert to qcow2");
    let expected = dir.join("expected.raw");
    qemu::convert(&qcow2, "qcow2", &expected, "raw", &[]).expect("qemu-img convert to raw");
    (qcow2, expected)
}

/// A qcow2 whose L1 table sits after all its L2 tables and data: written with 4 KiB clusters,
/// then grown, which makes qemu reallocate the L1 table at the end of the file. Streamed, every
/// data cluster arrives before the table that maps it.
fn l1_at_end_fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let qcow2 = dir.join("l1-last.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"])
        .arg(&qcow2)
        .arg("16M"))
    .expect("qemu-img create");
    let chunk = dir.join("chunk.bin");
    fs::write(&chunk, random_bytes(5, 2 * MIB as usize)).expect("chunk");
    let chunk = chunk.display().to_string();
    run(Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args(["-c", &format!("write -s {chunk} 0 2M")])
        .args(["-c", &format!("write -s {chunk} 6M 2M")])
        .args(["-c", "write -P 0x6b 12M 2M"])
        .arg(&qcow2))
    .expect("qemu-io writes");
    run(Command::new("qemu-img")
        .args(["resize", "-q", "-f", "qcow2"])
        .arg(&qcow2)
        .arg("+8M"))
    .expect("qemu-img resize");
    let header = fs::read(&qcow2).expect("read qcow2");
    let l1_offset = u64::from_be_bytes(header[40..48].try_into().expect("8 bytes"));
    assert!(
        l1_offset >= 6 * MIB,
        "fixture broken: L1 table at {l1_offset}, expected after the data (qemu changed?)"
    );
    let expected = dir.join("l1-last.expected.raw");
    qemu::convert(&qcow2, "qcow2", &expected, "raw", &[]).expect("qemu-img convert to raw");
    (qcow2, expected)
}

/// Run `cdi <args>` with `input` fed through a real pipe (`cat input | cdi …`).
fn cdi_from_pipe(input: &Path, args: &[&str]) -> Output {
    let mut cat = Command::new("cat")
        .arg(input)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn cat");
    let stdout = cat.stdout.take().expect("cat stdout");
    let out = Command::new(cdi_bin())
        .args(args)
        .stdin(stdout)
        .output()
        .expect("run cdi");
    let _ = cat.wait();
    out
}

fn cdi(args: &[&str]) -> Output {
    Command::new(cdi_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cdi")
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn describe(out: &Output) -> String {
    format!(
        "status {}, stdout: {}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

fn assert_success(out: &Output) {
    assert!(out.status.success(), "cdi failed: {}", describe(out));
}

/// The last JSON object line on stdout (`--report json`, `--output json`).
fn json_line(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line on stdout: {}", describe(out)));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
}

/// Failure with exactly one non-empty line on stderr.
fn assert_one_line_failure(out: &Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what}: cdi succeeded: {}",
        describe(out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one stderr line, got {stderr:?}"
    );
    stderr
}

/// Byte-compare two files, including length.
fn assert_same_bytes(ours: &Path, expected: &Path) {
    let (a, b) = (
        fs::read(ours).expect("read output"),
        fs::read(expected).expect("read expected"),
    );
    assert_eq!(
        a.len(),
        b.len(),
        "{} length differs from qemu-img's raw output",
        ours.display()
    );
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "{} differs from qemu-img's raw output at byte {i}",
            ours.display()
        );
    }
}

#[test]
fn qcow2_from_pipe_equals_qemu_img() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (qcow2, expected) = qcow2_fixture(dir.path());
    let out_path = dir.path().join("out.raw");

    let out = cdi_from_pipe(
        &qcow2,
        &["convert", "-", path_arg(&out_path), "--report", "json"],
    );

    assert_success(&out);
    assert_same_bytes(&out_path, &expected);
    let report = json_line(&out);
    assert_eq!(report["format"], "qcow2", "report: {report}");
    assert_eq!(report["scratch_bytes"], 0, "report: {report}");
    assert_eq!(report["virtual_size"], IMAGE_SIZE, "report: {report}");
}

#[test]
fn qcow2_gz_from_pipe_equals_qemu_img_without_scratch() {
    if !have_tools(&["qemu-img", "qemu-io", "gzip"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (qcow2, expected) = qcow2_fixture(dir.path());
    run(Command::new("gzip").arg("-k").arg(&qcow2)).expect("gzip");
    let gz = dir.path().join("disk.qcow2.gz");
    let out_path = dir.path().join("out.raw");

    let out = cdi_from_pipe(
        &gz,
        &["convert", "-", path_arg(&out_path), "--report", "json"],
    );

    assert_success(&out);
    assert_same_bytes(&out_path, &expected);
    let report = json_line(&out);
    assert_eq!(
        report["compression"],
        serde_json::json!(["gzip"]),
        "report: {report}"
    );
    assert_eq!(report["format"], "qcow2", "report: {report}");
    assert_eq!(report["scratch_bytes"], 0, "report: {report}");
    assert_eq!(report["streamed"], true, "report: {report}");
}

#[test]
fn out_of_order_stream_spills_to_scratch_and_is_correct() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (qcow2, expected) = l1_at_end_fixture(dir.path());
    let scratch = dir.path().join("scratch");
    fs::create_dir(&scratch).expect("scratch dir");
    let out_path = dir.path().join("out.raw");

    let out = cdi_from_pipe(
        &qcow2,
        &[
            "convert",
            "-",
            path_arg(&out_path),
            "--scratch",
            path_arg(&scratch),
            "--memory-budget",
            "1048576",
            "--report",
            "json",
        ],
    );

    assert_success(&out);
    assert_same_bytes(&out_path, &expected);
    let report = json_line(&out);
    let scratch_bytes = report["scratch_bytes"]
        .as_u64()
        .expect("scratch_bytes is a number");
    assert!(
        scratch_bytes > 0,
        "a 1 MiB budget must spill 6 MiB of early data: {report}"
    );
}

#[test]
fn out_of_order_stream_without_scratch_exits_3() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (qcow2, _) = l1_at_end_fixture(dir.path());
    let out_path = dir.path().join("out.raw");

    let out = cdi_from_pipe(
        &qcow2,
        &[
            "convert",
            "-",
            path_arg(&out_path),
            "--memory-budget",
            "1048576",
        ],
    );

    let stderr = assert_one_line_failure(&out, "spill without scratch");
    assert_eq!(
        out.status.code(),
        Some(EXIT_SCRATCH_REQUIRED),
        "{}",
        describe(&out)
    );
    assert!(
        stderr.to_lowercase().contains("scratch space required"),
        "message should say scratch space is required: {stderr:?}"
    );
}

#[test]
fn vhdx_from_pipe_without_scratch_exits_3() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (qcow2, _) = qcow2_fixture(dir.path());
    let vhdx = dir.path().join("disk.vhdx");
    qemu::convert(&qcow2, "qcow2", &vhdx, "vhdx", &[]).expect("qemu-img convert to vhdx");
    let out_path = dir.path().join("out.raw");

    let out = cdi_from_pipe(&vhdx, &["convert", "-", path_arg(&out_path)]);

    let stderr = assert_one_line_failure(&out, "vhdx without scratch");
    assert_eq!(
        out.status.code(),
        Some(EXIT_SCRATCH_REQUIRED),
        "{}",
        describe(&out)
    );
    assert!(
        stderr.to_lowercase().contains("scratch"),
        "message names scratch: {stderr:?}"
    );
}

#[test]
fn vhdx_from_pipe_with_scratch_equals_qemu_img() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (qcow2, expected) = qcow2_fixture(dir.path());
    let vhdx = dir.path().join("disk.vhdx");
    qemu::convert(&qcow2, "qcow2", &vhdx, "vhdx", &[]).expect("qemu-img convert to vhdx");
    let scratch = dir.path().join("scratch");
    fs::create_dir(&scratch).expect("scratch dir");
    let out_path = dir.path().join("out.raw");

    let out = cdi_from_pipe(
        &vhdx,
        &[
            "convert",
            "-",
            path_arg(&out_path),
            "--scratch",
            path_arg(&scratch),
        ],
    );

    assert_success(&out);
    assert_same_bytes(&out_path, &expected);
}

/// A loop device over a file, detached when dropped (also when the test panics).
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(backing: &Path) -> Result<LoopDevice, String> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup refused: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(LoopDevice {
            path: PathBuf::from(path),
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

#[test]
fn block_device_target_holds_exactly_the_image_over_old_garbage() {
    if !have_tools(&["qemu-img", "qemu-io", "losetup"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (qcow2, expected) = qcow2_fixture(dir.path());
    // The device is bigger than the image and full of garbage, as a reused volume would be.
    let backing = dir.path().join("device.img");
    let mut file = File::create(&backing).expect("device backing");
    let garbage = vec![0xeeu8; MIB as usize];
    for _ in 0..(2 * IMAGE_SIZE / MIB) {
        file.write_all(&garbage).expect("fill garbage");
    }
    file.sync_all().expect("sync backing");
    drop(file);
    let device = match LoopDevice::attach(&backing) {
        Ok(device) => device,
        Err(reason) => {
            skip(&reason);
            return;
        }
    };

    let out = cdi(&["convert", path_arg(&qcow2), path_arg(&device.path)]);

    assert_success(&out);
    let mut written = vec![0u8; IMAGE_SIZE as usize];
    File::open(&device.path)
        .and_then(|mut dev| dev.read_exact(&mut written))
        .expect("read back the device");
    let expected = fs::read(&expected).expect("expected raw");
    if let Some(i) = written.iter().zip(&expected).position(|(x, y)| x != y) {
        panic!(
            "device differs from qemu-img's raw output at byte {i} (0x{:02x})",
            written[i]
        );
    }
}

#[test]
fn target_size_smaller_than_image_fails_without_a_complete_looking_file() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (qcow2, _) = qcow2_fixture(dir.path());
    let out_path = dir.path().join("out.raw");

    let out = cdi(&[
        "convert",
        path_arg(&qcow2),
        path_arg(&out_path),
        "--target-size",
        "1Mi",
    ]);

    let stderr = assert_one_line_failure(&out, "target too small");
    let lower = stderr.to_lowercase();
    assert!(
        lower.contains("too small") || lower.contains("larger than"),
        "message should say the target is too small: {stderr:?}"
    );
    let left = fs::metadata(&out_path).map(|m| m.len()).ok();
    assert!(
        left.is_none_or(|len| len == 0),
        "a failed conversion left a {left:?}-byte destination behind"
    );
}

#[test]
fn qcow2_with_backing_file_is_refused() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, _) = qcow2_fixture(dir.path());
    let overlay = dir.path().join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&overlay))
    .expect("create overlay");
    let out_path = dir.path().join("out.raw");

    let out = cdi(&["convert", path_arg(&overlay), path_arg(&out_path)]);

    let stderr = assert_one_line_failure(&out, "backing file");
    assert!(
        stderr.to_lowercase().contains("backing"),
        "message names the backing file: {stderr:?}"
    );
}

#[test]
fn luks_encrypted_qcow2_is_refused() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let luks = dir.path().join("luks.qcow2");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=password",
        ])
        .args(["-o", "encrypt.format=luks,encrypt.key-secret=sec0"])
        .arg(&luks)
        .arg("8M"))
    .expect("create luks qcow2");
    let out_path = dir.path().join("out.raw");

    let out = cdi(&["convert", path_arg(&luks), path_arg(&out_path)]);

    assert_one_line_failure(&out, "luks qcow2");
}

#[test]
fn truncated_qcow2_is_refused() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (qcow2, _) = qcow2_fixture(dir.path());
    let bytes = fs::read(&qcow2).expect("read qcow2");
    let cut = dir.path().join("cut.qcow2");
    fs::write(&cut, &bytes[..bytes.len() * 6 / 10]).expect("write truncated");
    let out_path = dir.path().join("out.raw");

    let from_file = cdi(&["convert", path_arg(&cut), path_arg(&out_path)]);
    let from_pipe = cdi_from_pipe(&cut, &["convert", "-", path_arg(&out_path)]);

    assert_one_line_failure(&from_file, "truncated qcow2 from a file");
    assert_one_line_failure(&from_pipe, "truncated qcow2 from a pipe");
}

#[test]
fn info_json_describes_qcow2_gz() {
    if !have_tools(&["qemu-img", "qemu-io", "gzip"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (qcow2, _) = qcow2_fixture(dir.path());
    run(Command::new("gzip").arg("-k").arg(&qcow2)).expect("gzip");
    let gz = dir.path().join("disk.qcow2.gz");

    let out = cdi(&["info", path_arg(&gz), "--output", "json"]);

    assert_success(&out);
    let info = json_line(&out);
    assert_eq!(
        info["compression"],
        serde_json::json!(["gzip"]),
        "info: {info}"
    );
    // The format block may be nested (`format: {format, virtual_size, …}`) or flat.
    let format = if info["format"].is_object() {
        &info["format"]
    } else {
        &info
    };
    let name = if info["format"].is_object() {
        &format["format"]
    } else {
        &info["format"]
    };
    assert_eq!(name, "qcow2", "info: {info}");
    assert_eq!(format["virtual_size"], IMAGE_SIZE, "info: {info}");
}
