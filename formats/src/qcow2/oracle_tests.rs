//! qemu-img as the oracle: images made by qemu-img/qemu-io at test time, converted by us
//! (random access and streaming) and by `qemu-img convert -O raw`, compared byte for byte.
//! Streaming must need no scratch space for any of them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::tests::{MemSink, copy_disk};
use crate::error::ErrorKind;
use crate::image::{BackingPolicy, OpenOptions, StreamContext};

/// Memory the stream converter may hold back in these tests: QEMU-written images only hold a
/// few clusters around L2-table boundaries, so a small budget proves they need no scratch.
const ORACLE_BUDGET: usize = 4 << 20;

fn have_qemu() -> bool {
    let ok = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    ok("qemu-img") && ok("qemu-io")
}

macro_rules! require_qemu {
    () => {
        if !have_qemu() {
            println!("SKIPPED: qemu-img/qemu-io not installed");
            return;
        }
    };
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_img(args: &[&str]) {
    run(Command::new("qemu-img").args(args));
}

fn qemu_io(image: &Path, cmds: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(image));
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Deterministic bytes: 64 KiB blocks cycling through random, a repeated byte, zeroes, and
/// half random / half zero.
fn mixed_raw(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = vec![0u8; size];
    for (i, block) in out.chunks_mut(64 << 10).enumerate() {
        let random_len = match i % 4 {
            0 => block.len(),
            1 => {
                block.fill(i as u8 | 1);
                0
            }
            2 => 0,
            _ => block.len() / 2,
        };
        for b in &mut block[..random_len] {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = (state >> 24) as u8;
        }
    }
    out
}

/// A qcow2 image from `raw` via `qemu-img convert` with extra `args`.
fn convert_from_raw(dir: &Path, raw: &[u8], args: &[&str]) -> PathBuf {
    let src = dir.join("src.raw");
    std::fs::write(&src, raw).unwrap();
    let out = dir.join("img.qcow2");
    let mut all = vec!["convert", "-f", "raw", "-O", "qcow2"];
    all.extend_from_slice(args);
    all.extend([p(&src), p(&out)]);
    qemu_img(&all);
    out
}

/// qemu-img's view of the guest.
fn oracle_raw(image: &Path) -> Vec<u8> {
    let out = image.with_extension("oracle.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", p(image), p(&out)]);
    std::fs::read(out).unwrap()
}

/// Compare our random-access copy and our stream with qemu-img's raw output; streaming must
/// not touch scratch space.
fn check_against_qemu(image: &Path) {
    let want = oracle_raw(image);
    let file = std::fs::File::open(image).unwrap();
    let mut disk = super::open(Arc::new(file), &OpenOptions::default()).unwrap();
    assert!(
        copy_disk(&mut *disk).unwrap() == want,
        "random access differs from qemu-img"
    );

    let scratch = tempfile::tempdir().unwrap();
    let mut ctx = StreamContext::new(Some(scratch.path().to_path_buf()));
    ctx.memory_budget = ORACLE_BUDGET;
    let mut sink = MemSink::default();
    let mut input = std::io::BufReader::new(std::fs::File::open(image).unwrap());
    super::stream(&mut input, &mut sink, &mut ctx).unwrap();
    assert!(sink.finish() == want, "stream differs from qemu-img");
    assert_eq!(ctx.scratch_bytes, 0, "qemu-made image needed scratch space");
}

/// Pattern writes, zero writes and discards, issued from the end of the disk backwards.
fn busy_writes() -> Vec<String> {
    let mut cmds = Vec::new();
    for i in (0..12u64).rev() {
        let off = i * (2 << 20) + i * 4096;
        cmds.push(format!("write -P {:#x} {off} {}", 0x10 + i, 96 << 10));
    }
    cmds.extend(
        [
            "write -P 0xab 1M 64k",
            "write -z 1040k 32k",
            "write -P 0xcd 30M 1M",
            "discard 30M 256k",
            "write -P 0x22 0 512",
            "write -P 0x33 20M 4k",
            "write -z 8M 2M",
            "write -P 0x44 31M 1M",
        ]
        .map(String::from),
    );
    cmds
}

#[test]
fn qemu_v3_image_written_out_of_order_matches() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "32M"]);
    qemu_io(&img, &busy_writes());
    check_against_qemu(&img);
}

#[test]
fn qemu_v2_image_matches() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        p(&img),
        "32M",
    ]);
    qemu_io(&img, &busy_writes());
    check_against_qemu(&img);
}

#[test]
fn qemu_512_byte_clusters_match() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = convert_from_raw(
        dir.path(),
        &mixed_raw(8 << 20, 1),
        &["-o", "cluster_size=512"],
    );
    qemu_io(
        &img,
        &["write -P 0x5e 3M 3k".into(), "discard 5M 64k".into()],
    );
    check_against_qemu(&img);
}

#[test]
fn qemu_2m_clusters_match() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = convert_from_raw(
        dir.path(),
        &mixed_raw(16 << 20, 2),
        &["-o", "cluster_size=2M"],
    );
    qemu_io(
        &img,
        &["write -z 4M 2M".into(), "write -P 0x7 9M 4k".into()],
    );
    check_against_qemu(&img);
}

#[test]
fn qemu_zlib_compressed_image_matches() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = convert_from_raw(dir.path(), &mixed_raw(24 << 20, 3), &["-c"]);
    check_against_qemu(&img);
}

#[test]
fn qemu_zstd_compressed_image_matches() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let raw = mixed_raw(24 << 20, 4);
    let img = convert_from_raw(dir.path(), &raw, &["-c", "-o", "compression_type=zstd"]);
    check_against_qemu(&img);
}

#[test]
fn qemu_compressed_with_many_l2_tables_matches() {
    require_qemu!();
    // 4 KiB clusters: each L2 table maps 2 MiB, so compressed data crosses 8 table boundaries.
    let dir = tempfile::tempdir().unwrap();
    let img = convert_from_raw(
        dir.path(),
        &mixed_raw(16 << 20, 5),
        &["-c", "-o", "cluster_size=4k"],
    );
    check_against_qemu(&img);
}

#[test]
fn qemu_compressed_image_holds_back_at_most_a_few_clusters() {
    require_qemu!();
    // 4 KiB clusters and 32 L2 tables: at every table boundary QEMU starts the next table's
    // first compressed cluster in the previous host cluster, before the table. Those bytes
    // wait in the spill only until the table arrives, so the spill never grows with the image.
    let dir = tempfile::tempdir().unwrap();
    let raw = mixed_raw(64 << 20, 8);
    let img = convert_from_raw(dir.path(), &raw, &["-c", "-o", "cluster_size=4k"]);
    let mut input = std::io::BufReader::new(std::fs::File::open(&img).unwrap());
    let mut sink = MemSink::default();
    let mut ctx = StreamContext::new(None);
    let peaks = super::stream::stream_with_peaks(&mut input, &mut sink, &mut ctx).unwrap();
    assert!(sink.finish() == raw, "stream differs from the source");
    println!("held back at most: {peaks:?}");
    assert!(peaks.spilled_clusters <= 4, "spill grew to {peaks:?}");
    assert!(peaks.window_clusters <= 4, "window grew to {peaks:?}");
}

#[test]
fn qemu_compressed_writes_in_reverse_order_match() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        p(&img),
        "8M",
    ]);
    let cmds: Vec<String> = (0..16u64)
        .rev()
        .map(|i| format!("write -c -P {:#x} {} 4k", 0x60 + i, i * (512 << 10)))
        .collect();
    qemu_io(&img, &cmds);
    check_against_qemu(&img);
}

#[test]
fn qemu_extended_l2_image_matches() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=128k",
        p(&img),
        "16M",
    ]);
    let cmds = [
        "write -P 0x11 0 4k",
        "write -P 0x12 12k 4k",
        "write -P 0x13 1M 128k",
        "write -z 1056k 8k",
        "write -P 0x14 15M 4k",
        "discard 1M 4k",
        "write -z 6M 512k",
        "write -P 0x15 7M 20k",
    ];
    qemu_io(&img, &cmds.map(String::from));
    check_against_qemu(&img);
}

#[test]
fn qemu_metadata_preallocated_image_matches() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        p(&img),
        "16M",
    ]);
    qemu_io(
        &img,
        &["write -P 0x21 5M 100k".into(), "write -z 1M 64k".into()],
    );
    check_against_qemu(&img);
}

#[test]
fn qemu_luks_image_is_refused() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=sec0,data=pass",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        p(&img),
        "8M",
    ]);
    let file = std::fs::File::open(&img).unwrap();
    let err = super::open(Arc::new(file), &OpenOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.message().contains("encrypted (luks)"), "{err}");
    let mut input = std::fs::File::open(&img).unwrap();
    let err = super::stream(
        &mut input,
        &mut MemSink::default(),
        &mut StreamContext::new(None),
    )
    .unwrap_err();
    assert!(err.message().contains("encrypted (luks)"), "{err}");
}

#[test]
fn qemu_backing_overlay_is_refused_by_default_and_read_when_allowed() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("ov.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "16M"]);
    qemu_io(
        &base,
        &["write -P 0x61 0 4M".into(), "write -P 0x62 8M 1M".into()],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&overlay),
    ]);
    qemu_io(
        &overlay,
        &["write -P 0x71 1M 64k".into(), "write -z 8M 4k".into()],
    );

    let open = |policy| {
        let file = std::fs::File::open(&overlay).unwrap();
        super::open(Arc::new(file), &OpenOptions { backing: policy })
    };
    let err = open(BackingPolicy::Deny).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.message().contains("backing file (\"base.qcow2\")"),
        "{err}"
    );
    let mut input = std::fs::File::open(&overlay).unwrap();
    let err = super::stream(
        &mut input,
        &mut MemSink::default(),
        &mut StreamContext::new(None),
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);

    let mut disk = open(BackingPolicy::AllowRelativeTo(dir.path().to_path_buf())).unwrap();
    assert!(
        copy_disk(&mut *disk).unwrap() == oracle_raw(&overlay),
        "overlay differs"
    );
}

#[test]
fn qemu_raw_backing_is_read_when_allowed() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, mixed_raw(4 << 20, 6)).unwrap();
    let overlay = dir.path().join("ov.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&overlay),
        "6M",
    ]);
    qemu_io(&overlay, &["write -P 0x72 64k 8k".into()]);
    let file = std::fs::File::open(&overlay).unwrap();
    let opts = OpenOptions {
        backing: BackingPolicy::AllowRelativeTo(dir.path().to_path_buf()),
    };
    let mut disk = super::open(Arc::new(file), &opts).unwrap();
    assert!(
        copy_disk(&mut *disk).unwrap() == oracle_raw(&overlay),
        "overlay differs"
    );
}

#[test]
fn qemu_compressed_image_cut_short_fails_to_stream() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = convert_from_raw(dir.path(), &mixed_raw(8 << 20, 7), &["-c"]);
    let bytes = std::fs::read(&img).unwrap();
    let len = bytes.len();
    for cut in [
        len / 8,
        len / 4,
        len / 2,
        3 * len / 4,
        len - 4096,
        len - 600,
    ] {
        let mut sink = MemSink::default();
        let mut input = &bytes[..cut];
        let result = super::stream(&mut input, &mut sink, &mut StreamContext::new(None));
        let err = result.expect_err(&format!("cut at {cut} of {len} streamed successfully"));
        assert_eq!(err.kind(), ErrorKind::Truncated, "cut at {cut}: {err}");
        assert!(err.message().contains("stream ended at"), "{err}");
    }
}

#[test]
fn qemu_backing_chain_deeper_than_the_limit_is_refused() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let depth = crate::limits::MAX_BACKING_CHAIN_DEPTH + 1;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        p(&dir.path().join("l0.qcow2")),
        "1M",
    ]);
    for i in 1..=depth {
        let below = format!("l{}.qcow2", i - 1);
        let this = dir.path().join(format!("l{i}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &below,
            "-F",
            "qcow2",
            p(&this),
        ]);
    }
    let top = std::fs::File::open(dir.path().join(format!("l{depth}.qcow2"))).unwrap();
    let opts = OpenOptions {
        backing: BackingPolicy::AllowRelativeTo(dir.path().to_path_buf()),
    };
    let err = super::open(Arc::new(top), &opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LimitExceeded);
    assert!(
        err.message().contains("backing chain is deeper than"),
        "{err}"
    );
}

#[test]
fn qemu_shrunk_image_with_a_longer_l1_matches() {
    require_qemu!();
    // `qemu-img resize --shrink` keeps the L1 table's length: 32 entries for an 8 MiB disk that
    // needs 4. Refusing a longer-than-needed L1 would refuse QEMU's own images.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        p(&img),
        "64M",
    ]);
    qemu_io(
        &img,
        &["write -P 0x31 60M 4k".into(), "write -P 0x32 4k 8k".into()],
    );
    qemu_img(&["resize", "-q", "--shrink", p(&img), "8M"]);
    check_against_qemu(&img);
}

/// Keeps only data reports (and checks that every byte is reported once), for disks too big
/// to hold in memory.
#[derive(Default)]
struct SparseSink {
    size: u64,
    data: std::collections::BTreeMap<u64, Vec<u8>>,
    seen: std::collections::BTreeMap<u64, u64>,
}

impl SparseSink {
    fn mark(&mut self, off: u64, len: u64) {
        if let Some((_, &end)) = self.seen.range(..off + len).next_back() {
            assert!(end <= off, "bytes at {off:#x} reported twice");
        }
        self.seen.insert(off, off + len);
    }

    fn reported(&self) -> u64 {
        self.seen.iter().map(|(a, b)| b - a).sum()
    }
}

impl crate::image::ExtentSink for SparseSink {
    fn begin(&mut self, size: Option<u64>) -> crate::Result<()> {
        self.size = size.unwrap();
        Ok(())
    }

    fn data(&mut self, off: u64, buf: &[u8]) -> crate::Result<()> {
        self.mark(off, buf.len() as u64);
        self.data.insert(off, buf.to_vec());
        Ok(())
    }

    fn zero(&mut self, off: u64, len: u64) -> crate::Result<()> {
        self.mark(off, len);
        Ok(())
    }
}

#[test]
fn qemu_one_tib_sparse_image_streams_and_maps_quickly() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "1T"]);
    let tib = 1u64 << 40;
    let writes = [(0u64, 0x51u8), (500 << 30, 0x52), (tib - (64 << 10), 0x53)];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(off, pat)| format!("write -P {pat:#x} {off} 64k"))
        .collect();
    qemu_io(&img, &cmds);

    let mut sink = SparseSink::default();
    let mut input = std::io::BufReader::new(std::fs::File::open(&img).unwrap());
    let mut ctx = StreamContext::new(None);
    super::stream(&mut input, &mut sink, &mut ctx).unwrap();
    assert_eq!(sink.size, tib);
    assert_eq!(sink.reported(), tib);
    for (off, pat) in writes {
        let got = sink.data.get(&off).expect("data at a written offset");
        assert!(
            got.len() == 64 << 10 && got.iter().all(|&b| b == pat),
            "bad data at {off:#x}"
        );
    }
    assert_eq!(sink.data.len(), 3);

    let file = std::fs::File::open(&img).unwrap();
    let mut disk = super::open(Arc::new(file), &OpenOptions::default()).unwrap();
    let (mut off, mut data, mut calls) = (0u64, 0u64, 0);
    while off < tib {
        let ext = disk.extent(off, u64::MAX).unwrap();
        if ext.kind == crate::image::ExtentKind::Data {
            data += ext.len;
        }
        off += ext.len;
        calls += 1;
    }
    assert_eq!(data, 3 * (64 << 10));
    assert!(calls < 4000, "{calls} extent calls for three data runs");
}
