//! qemu-img as the oracle: images made by qemu-img/qemu-io at test time, converted by us
//! (random access and streaming) and by `qemu-img convert -O raw`, compared byte for byte.
//! Streaming must need no scratch space for any of them.

use std::path::Path;
use std::sync::Arc;

use crate::error::ErrorKind;
use crate::image::{BackingPolicy, OpenOptions, StreamContext};
use crate::testutil::{
    CheckingSink, have_tools, open_file, p, qemu_convert, qemu_img, qemu_io, qemu_raw, read_all,
};

/// Memory the stream converter may hold back in these tests: QEMU-written images only hold a
/// few clusters around L2-table boundaries, so a small budget proves they need no scratch.
const ORACLE_BUDGET: usize = 4 << 20;

macro_rules! require_qemu {
    () => {
        if !have_tools(&["qemu-img", "qemu-io"]) {
            return;
        }
    };
}

/// Deterministic bytes: 64 KiB blocks cycling through random, a repeated byte, zeroes, and
/// half random / half zero.
fn cycling_raw(size: usize, seed: u64) -> Vec<u8> {
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

/// `qemu-img create -q -f qcow2 <args> img [size]`.
fn create(img: &Path, args: &[&str], size: Option<&str>) {
    let mut all = vec!["create", "-q", "-f", "qcow2"];
    all.extend_from_slice(args);
    all.push(p(img));
    all.extend(size);
    qemu_img(&all);
}

/// Open `image` (a qcow2 file) with `backing`.
fn open_with(image: &Path, backing: BackingPolicy) -> crate::Result<Box<dyn crate::DiskImage>> {
    let file = std::fs::File::open(image).unwrap();
    super::open(Arc::new(file), &OpenOptions { backing })
}

/// Stream `image` (a qcow2 file) into a fresh [`CheckingSink`] with `ctx`.
fn stream_file(image: &Path, ctx: &mut StreamContext) -> crate::Result<CheckingSink> {
    let mut input = std::io::BufReader::new(std::fs::File::open(image).unwrap());
    let mut sink = CheckingSink::default();
    super::stream(&mut input, &mut sink, ctx)?;
    Ok(sink)
}

/// With backing files allowed relative to `dir`, `overlay` reads like qemu-img's view of it.
fn assert_overlay_reads_like_qemu(overlay: &Path, dir: &Path) {
    let allowed = BackingPolicy::AllowRelativeTo(dir.to_path_buf());
    let mut disk = open_with(overlay, allowed).unwrap();
    assert!(
        read_all(&mut *disk).unwrap() == qemu_raw(overlay, "qcow2"),
        "overlay differs"
    );
}

/// Compare our random-access copy and our stream with qemu-img's raw output; streaming must
/// not touch scratch space.
fn check_against_qemu(image: &Path) {
    let want = qemu_raw(image, "qcow2");
    let mut disk = open_file(super::open, image).unwrap();
    assert!(
        read_all(&mut *disk).unwrap() == want,
        "random access differs from qemu-img"
    );

    let scratch = tempfile::tempdir().unwrap();
    let mut ctx = StreamContext::new(Some(scratch.path().to_path_buf()));
    ctx.memory_budget = ORACLE_BUDGET;
    let sink = stream_file(image, &mut ctx).unwrap();
    assert!(sink.finish() == want, "stream differs from qemu-img");
    assert_eq!(ctx.scratch_bytes, 0, "qemu-made image needed scratch space");
}

/// `qemu-img create` with `args` and `size`, then the qemu-io `cmds`: we read and stream it
/// like qemu-img does.
fn created_image_matches<S: AsRef<str>>(args: &[&str], size: &str, cmds: &[S]) {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    create(&img, args, Some(size));
    qemu_io(&img, "qcow2", cmds);
    check_against_qemu(&img);
}

/// [`cycling_raw`] of `size` and `seed` through `qemu-img convert` with `args`, then the
/// qemu-io `cmds`: we read and stream it like qemu-img does.
fn converted_image_matches(size: usize, seed: u64, args: &[&str], cmds: &[&str]) {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_convert(
        dir.path(),
        &cycling_raw(size, seed),
        "qcow2",
        args,
        "img.qcow2",
    );
    if !cmds.is_empty() {
        qemu_io(&img, "qcow2", cmds);
    }
    check_against_qemu(&img);
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
    created_image_matches(&[], "32M", &busy_writes());
}

#[test]
fn qemu_v2_image_matches() {
    created_image_matches(&["-o", "compat=0.10"], "32M", &busy_writes());
}

#[test]
fn qemu_512_byte_clusters_match() {
    converted_image_matches(
        8 << 20,
        1,
        &["-o", "cluster_size=512"],
        &["write -P 0x5e 3M 3k", "discard 5M 64k"],
    );
}

#[test]
fn qemu_2m_clusters_match() {
    converted_image_matches(
        16 << 20,
        2,
        &["-o", "cluster_size=2M"],
        &["write -z 4M 2M", "write -P 0x7 9M 4k"],
    );
}

#[test]
fn qemu_zlib_compressed_image_matches() {
    converted_image_matches(24 << 20, 3, &["-c"], &[]);
}

#[test]
fn qemu_zstd_compressed_image_matches() {
    converted_image_matches(24 << 20, 4, &["-c", "-o", "compression_type=zstd"], &[]);
}

#[test]
fn qemu_compressed_with_many_l2_tables_matches() {
    // 4 KiB clusters: each L2 table maps 2 MiB, so compressed data crosses 8 table boundaries.
    converted_image_matches(16 << 20, 5, &["-c", "-o", "cluster_size=4k"], &[]);
}

#[test]
fn qemu_compressed_image_holds_back_at_most_a_few_clusters() {
    require_qemu!();
    // 4 KiB clusters and 32 L2 tables: at every table boundary QEMU starts the next table's
    // first compressed cluster in the previous host cluster, before the table. Those bytes
    // wait in the spill only until the table arrives, so the spill never grows with the image.
    let dir = tempfile::tempdir().unwrap();
    let raw = cycling_raw(64 << 20, 8);
    let args = ["-c", "-o", "cluster_size=4k"];
    let img = qemu_convert(dir.path(), &raw, "qcow2", &args, "img.qcow2");
    let mut input = std::io::BufReader::new(std::fs::File::open(&img).unwrap());
    let mut sink = CheckingSink::default();
    let mut ctx = StreamContext::new(None);
    let peaks = super::stream::stream_with_peaks(&mut input, &mut sink, &mut ctx).unwrap();
    assert!(sink.finish() == raw, "stream differs from the source");
    println!("held back at most: {peaks:?}");
    assert!(peaks.spilled_clusters <= 4, "spill grew to {peaks:?}");
    assert!(peaks.window_clusters <= 4, "window grew to {peaks:?}");
}

#[test]
fn qemu_compressed_writes_in_reverse_order_match() {
    let cmds: Vec<String> = (0..16u64)
        .rev()
        .map(|i| format!("write -c -P {:#x} {} 4k", 0x60 + i, i * (512 << 10)))
        .collect();
    created_image_matches(&["-o", "cluster_size=4k"], "8M", &cmds);
}

#[test]
fn qemu_extended_l2_image_matches() {
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
    created_image_matches(&["-o", "extended_l2=on,cluster_size=128k"], "16M", &cmds);
}

#[test]
fn qemu_metadata_preallocated_image_matches() {
    created_image_matches(
        &["-o", "preallocation=metadata"],
        "16M",
        &["write -P 0x21 5M 100k", "write -z 1M 64k"],
    );
}

#[test]
fn qemu_luks_image_is_refused() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("luks.qcow2");
    create(
        &img,
        &[
            "--object",
            "secret,id=sec0,data=pass",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
        ],
        Some("8M"),
    );
    let err = open_with(&img, BackingPolicy::Deny).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.message().contains("encrypted (luks)"), "{err}");
    let err = stream_file(&img, &mut StreamContext::new(None)).unwrap_err();
    assert!(err.message().contains("encrypted (luks)"), "{err}");
}

#[test]
fn qemu_backing_overlay_is_refused_by_default_and_read_when_allowed() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("ov.qcow2");
    create(&base, &[], Some("16M"));
    qemu_io(
        &base,
        "qcow2",
        &["write -P 0x61 0 4M", "write -P 0x62 8M 1M"],
    );
    create(&overlay, &["-b", "base.qcow2", "-F", "qcow2"], None);
    qemu_io(
        &overlay,
        "qcow2",
        &["write -P 0x71 1M 64k", "write -z 8M 4k"],
    );

    let err = open_with(&overlay, BackingPolicy::Deny).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.message().contains("backing file (\"base.qcow2\")"),
        "{err}"
    );
    let err = stream_file(&overlay, &mut StreamContext::new(None)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);

    assert_overlay_reads_like_qemu(&overlay, dir.path());
}

#[test]
fn qemu_raw_backing_is_read_when_allowed() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, cycling_raw(4 << 20, 6)).unwrap();
    let overlay = dir.path().join("ov.qcow2");
    create(&overlay, &["-b", "base.raw", "-F", "raw"], Some("6M"));
    qemu_io(&overlay, "qcow2", &["write -P 0x72 64k 8k"]);
    assert_overlay_reads_like_qemu(&overlay, dir.path());
}

#[test]
fn qemu_compressed_image_cut_short_fails_to_stream() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_convert(
        dir.path(),
        &cycling_raw(8 << 20, 7),
        "qcow2",
        &["-c"],
        "img.qcow2",
    );
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
        let mut sink = CheckingSink::default();
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
    create(&dir.path().join("l0.qcow2"), &[], Some("1M"));
    for i in 1..=depth {
        let below = format!("l{}.qcow2", i - 1);
        let this = dir.path().join(format!("l{i}.qcow2"));
        create(&this, &["-b", &below, "-F", "qcow2"], None);
    }
    let top = dir.path().join(format!("l{depth}.qcow2"));
    let allowed = BackingPolicy::AllowRelativeTo(dir.path().to_path_buf());
    let err = open_with(&top, allowed).unwrap_err();
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
    create(&img, &["-o", "cluster_size=4k"], Some("64M"));
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0x31 60M 4k", "write -P 0x32 4k 8k"],
    );
    qemu_img(&["resize", "-q", "--shrink", p(&img), "8M"]);
    check_against_qemu(&img);
}

#[test]
fn qemu_one_tib_sparse_image_streams_and_maps_quickly() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.qcow2");
    create(&img, &[], Some("1T"));
    let tib = 1u64 << 40;
    let writes = [(0u64, 0x51u8), (500 << 30, 0x52), (tib - (64 << 10), 0x53)];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(off, pat)| format!("write -P {pat:#x} {off} 64k"))
        .collect();
    qemu_io(&img, "qcow2", &cmds);

    // The checking sink keeps only data reports, so the 1 TiB disk fits; it checks that every
    // byte is reported once.
    let sink = stream_file(&img, &mut StreamContext::new(None)).unwrap();
    assert_eq!(sink.size, Some(tib));
    assert_eq!(sink.reported(), tib);
    for (off, pat) in writes {
        let got = sink.data.get(&off).expect("data at a written offset");
        assert!(
            got.len() == 64 << 10 && got.iter().all(|&b| b == pat),
            "bad data at {off:#x}"
        );
    }
    assert_eq!(sink.data.len(), 3);

    let mut disk = open_file(super::open, &img).unwrap();
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
