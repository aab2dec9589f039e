//! qemu-img interoperability matrix: images written by qemu-img (and qemu-io) in every format
//! and layout we claim, wrapped in every compression we unwrap, converted by us both from a
//! local path (random access) and as a stream, and checked against qemu-img's own raw output.
//!
//! For every case the checks are:
//! * the bytes equal `qemu-img convert -O raw` of the same (unwrapped) image, length included;
//! * the output allocates within 1% (plus 64 KiB for tiny images) of what qemu-img's raw output
//!   allocates: holes stay holes, data is not duplicated;
//! * the report names the right format, virtual size and compression layers;
//! * qcow2 and raw, compressed or not, convert without a byte of scratch space.
//!
//! One `#[test]` per format family; each builds its cases in a loop and reports every failing
//! case in one assertion message. Fixtures are generated in a temp dir at test time. Without
//! qemu-img the tests print `SKIPPED:` and return.

mod core_support;

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cdi_formats::convert::{ConvertOptions, ConvertReport, convert_path, convert_reader};
use cdi_formats::detect::Compression;
use cdi_formats::target::open_target;
use core_support::{allocated, have_qemu, qemu_img, qemu_io, random_bytes, run};

const MIB: u64 = 1 << 20;

/// Virtual size of the source disk: big enough for several L2 tables / grain tables / BAT
/// blocks at the smallest cluster sizes, small enough that the whole matrix stays quick.
const SOURCE_SIZE: u64 = 32 * MIB;

/// Allocation slack on top of 1%: one 64 KiB extent, so a few file-system blocks of metadata
/// rounding on a tiny image do not fail the comparison.
const ALLOC_SLACK: u64 = 64 << 10;

/// A compression or archive layer around an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wrapper {
    None,
    Gzip,
    Xz,
    Zstd,
    Tar,
    TarGz,
}

impl Wrapper {
    /// Wrappers applied to every image of a family.
    const EVERY_IMAGE: [Wrapper; 4] = [Wrapper::None, Wrapper::Gzip, Wrapper::Xz, Wrapper::Zstd];
    /// Wrappers applied to the first image of a family only (archives are rarer).
    const FIRST_IMAGE: [Wrapper; 2] = [Wrapper::Tar, Wrapper::TarGz];

    fn suffix(self) -> &'static str {
        match self {
            Wrapper::None => "",
            Wrapper::Gzip => ".gz",
            Wrapper::Xz => ".xz",
            Wrapper::Zstd => ".zst",
            Wrapper::Tar => ".tar",
            Wrapper::TarGz => ".tar.gz",
        }
    }

    fn compression(self) -> Vec<Compression> {
        match self {
            Wrapper::None | Wrapper::Tar => vec![],
            Wrapper::Gzip | Wrapper::TarGz => vec![Compression::Gzip],
            Wrapper::Xz => vec![Compression::Xz],
            Wrapper::Zstd => vec![Compression::Zstd],
        }
    }

    fn is_tar(self) -> bool {
        matches!(self, Wrapper::Tar | Wrapper::TarGz)
    }
}

/// One image as qemu wrote it, with qemu's raw rendering of it.
struct Image {
    name: String,
    /// qemu-img format name (`vpc` for VHD).
    qemu_format: &'static str,
    path: PathBuf,
    /// `qemu-img convert -O raw` of `path`: the expected bytes and allocation.
    reference: PathBuf,
    /// Converting it from a stream needs scratch space (random-access formats).
    needs_scratch_when_streamed: bool,
}

/// How the image reaches the converter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Path,
    Reader,
}

/// Text-like, highly compressible bytes.
fn text_bytes(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut line = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("cdi interop line {line:08} lorem ipsum dolor\n").as_bytes());
        line += 1;
    }
    out.truncate(len);
    out
}

/// The source disk: random regions, text, explicitly written zeroes (must become holes),
/// 4 KiB-granular alternation of data and zero, unaligned edges, a region written and then
/// discarded, untouched holes and a tail pattern.
fn make_source(dir: &Path) -> PathBuf {
    let path = dir.join("source.raw");
    let file = File::create(&path).expect("create source");
    file.set_len(SOURCE_SIZE).expect("size source");
    let put = |offset: u64, bytes: &[u8]| file.write_all_at(bytes, offset).expect("write source");
    put(0, &random_bytes(MIB as usize, 1));
    // [1, 2) MiB: hole.
    put(2 * MIB, &text_bytes(2 * MIB as usize));
    put(4 * MIB, &vec![0u8; MIB as usize]);
    for block in 0..(3 * MIB / 4096) {
        if block % 3 != 1 {
            put(5 * MIB + block * 4096, &random_bytes(4096, 100 + block));
        }
    }
    put(8 * MIB, &random_bytes(4 * MIB as usize, 2));
    // [12, 16) MiB: hole.
    put(
        16 * MIB + 1000,
        &random_bytes((3 * MIB / 2 - 300) as usize, 3),
    );
    put(20 * MIB, &[0x5a; 512]);
    put(24 * MIB + 4096, &text_bytes(MIB as usize + 12_345));
    put(SOURCE_SIZE - 64 * 1024, &[0xa5; 64 * 1024]);
    drop(file);
    // Written, then discarded: punches a hole where data used to be.
    qemu_io(&path, "raw", &["discard 8M 4M"]);
    path
}

/// A qcow2 written out of guest order by qemu-io (last region first), with real data from a
/// file, patterns, a compressed cluster run, zero writes and a discard after writing.
fn make_reverse_qcow2(dir: &Path, path: &Path) {
    let chunk = dir.join("chunk.bin");
    fs::write(&chunk, random_bytes(MIB as usize, 7)).expect("write chunk");
    let chunk = chunk.to_str().expect("utf-8 temp path");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
        .arg(path)
        .arg(SOURCE_SIZE.to_string()));
    let cmds = [
        format!("write -s {chunk} 30M 1M"),
        "write -P 0x3c 26M 2M".to_owned(),
        format!("write -s {chunk} 20M 1M"),
        "write -c -P 0x77 16M 1M".to_owned(),
        "write -P 0x11 12M 3M".to_owned(),
        format!("write -s {chunk} 6M 1M"),
        "write -z 6M 64k".to_owned(),
        "write -P 0x42 1M 512k".to_owned(),
        format!("write -s {chunk} 0 1M"),
        "discard 12M 2M".to_owned(),
    ];
    qemu_io(path, "qcow2", &cmds);
}

/// Build `name` with `qemu-img convert -O qemu_format <opts>` from the source and its reference.
fn converted(
    dir: &Path,
    source: &Path,
    name: &str,
    qemu_format: &'static str,
    opts: &[&str],
) -> Image {
    let path = dir.join(name);
    let mut args = vec!["convert", "-f", "raw", "-O", qemu_format];
    args.extend_from_slice(opts);
    qemu_img(&args, &[source, &path]);
    finish_image(dir, name, qemu_format, path)
}

fn finish_image(dir: &Path, name: &str, qemu_format: &'static str, path: PathBuf) -> Image {
    let reference = dir.join(format!("{name}.ref.raw"));
    qemu_img(
        &["convert", "-f", qemu_format, "-O", "raw"],
        &[&path, &reference],
    );
    let streamable = matches!(qemu_format, "raw" | "qcow2")
        || (qemu_format == "vmdk" && name.contains("stream"));
    let needs_scratch_when_streamed = !streamable;
    Image {
        name: name.to_owned(),
        qemu_format,
        path,
        reference,
        needs_scratch_when_streamed,
    }
}

/// Wrap `image` (a file in `dir`) and return the wrapped file.
fn wrap(dir: &Path, image: &Path, wrapper: Wrapper) -> PathBuf {
    let name = image
        .file_name()
        .and_then(|n| n.to_str())
        .expect("utf-8 name");
    let out = dir.join(format!("{name}{}", wrapper.suffix()));
    let compress = |tool: &str, args: &[&str]| {
        let input = File::open(image).expect("open image to compress");
        let output = File::create(&out).expect("create compressed file");
        let status = Command::new(tool)
            .args(args)
            .stdin(input)
            .stdout(output)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(status.success(), "{tool} {args:?} failed on {name}");
    };
    match wrapper {
        Wrapper::None => return image.to_path_buf(),
        Wrapper::Gzip => compress("gzip", &["-c", "-1"]),
        Wrapper::Xz => compress("xz", &["-c", "-0", "-T1"]),
        Wrapper::Zstd => compress("zstd", &["-c", "-q", "-3"]),
        Wrapper::Tar | Wrapper::TarGz => {
            let flags = if wrapper == Wrapper::Tar {
                "-cf"
            } else {
                "-czf"
            };
            run(Command::new("tar")
                .arg(flags)
                .arg(&out)
                .arg("-C")
                .arg(dir)
                .arg(name));
        }
    }
    out
}

/// First differing offset of two files, or a length mismatch.
fn first_difference(a: &Path, b: &Path) -> io::Result<Option<String>> {
    let (la, lb) = (fs::metadata(a)?.len(), fs::metadata(b)?.len());
    if la != lb {
        return Ok(Some(format!("length {la} vs {lb}")));
    }
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut offset = 0u64;
    while offset < la {
        let n = (la - offset).min(MIB) as usize;
        fa.read_exact(&mut ba[..n])?;
        fb.read_exact(&mut bb[..n])?;
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(format!(
                "first difference at byte {}",
                offset + i as u64
            )));
        }
        offset += n as u64;
    }
    Ok(None)
}

/// Convert one case and return what is wrong with the result, if anything.
fn check_case(
    dir: &Path,
    image: &Image,
    wrapper: Wrapper,
    wrapped: &Path,
    mode: Mode,
) -> Option<String> {
    let out = dir.join("out.raw");
    let _ = fs::remove_file(&out);
    let scratch = dir.join("scratch");
    fs::create_dir_all(&scratch).expect("scratch dir");
    // Scratch only where the format needs random access and the bytes are not a plain local
    // file: everything else must convert without it.
    let random_access_needs_copy = mode == Mode::Reader || wrapper != Wrapper::None;
    let opts = ConvertOptions {
        scratch_dir: (image.needs_scratch_when_streamed && random_access_needs_copy)
            .then(|| scratch.clone()),
        ..ConvertOptions::default()
    };
    let result = (|| -> Result<ConvertReport, String> {
        let mut target = open_target(&out).map_err(|e| format!("open_target: {e}"))?;
        match mode {
            Mode::Path => convert_path(wrapped, target.as_mut(), &opts),
            Mode::Reader => {
                let mut input = File::open(wrapped).map_err(|e| e.to_string())?;
                convert_reader(&mut input, target.as_mut(), &opts)
            }
        }
        .map_err(|e| format!("conversion failed: {e}"))
    })();
    let report = match result {
        Ok(report) => report,
        Err(e) => return Some(e),
    };
    let mut problems = Vec::new();
    match first_difference(&out, &image.reference) {
        Ok(None) => {}
        Ok(Some(diff)) => problems.push(format!("content differs from qemu-img: {diff}")),
        Err(e) => problems.push(format!("cannot compare: {e}")),
    }
    let (ours, theirs) = (allocated(&out), allocated(&image.reference));
    if ours.abs_diff(theirs) > theirs / 100 + ALLOC_SLACK {
        problems.push(format!(
            "allocates {ours} bytes, qemu-img's raw allocates {theirs}"
        ));
    }
    let expected_size = fs::metadata(&image.reference).map(|m| m.len()).unwrap_or(0);
    if report.virtual_size != expected_size {
        problems.push(format!(
            "report virtual_size {} != {expected_size}",
            report.virtual_size
        ));
    }
    if report.format.qemu_name() != image.qemu_format {
        problems.push(format!("report format {:?}", report.format));
    }
    if report.compression != wrapper.compression() {
        problems.push(format!("report compression {:?}", report.compression));
    }
    if report.from_tar != wrapper.is_tar() {
        problems.push(format!("report from_tar {}", report.from_tar));
    }
    if matches!(image.qemu_format, "raw" | "qcow2") && report.scratch_bytes != 0 {
        problems.push(format!("used {} scratch bytes", report.scratch_bytes));
    }
    let _ = fs::remove_file(&out);
    let _ = fs::remove_dir_all(&scratch);
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// Run every wrapper × mode over `images` and fail once, listing every failing case.
fn run_matrix(dir: &Path, images: &[Image]) {
    let mut failures = Vec::new();
    let mut cases = 0;
    for (index, image) in images.iter().enumerate() {
        let extra: &[Wrapper] = if index == 0 {
            &Wrapper::FIRST_IMAGE
        } else {
            &[]
        };
        for &wrapper in Wrapper::EVERY_IMAGE.iter().chain(extra) {
            let wrapped = wrap(dir, &image.path, wrapper);
            for mode in [Mode::Path, Mode::Reader] {
                cases += 1;
                if let Some(problem) = check_case(dir, image, wrapper, &wrapped, mode) {
                    failures.push(format!(
                        "{}{} ({mode:?}): {problem}",
                        image.name,
                        wrapper.suffix()
                    ));
                }
            }
            if wrapper != Wrapper::None {
                let _ = fs::remove_file(&wrapped);
            }
        }
    }
    println!("{cases} cases, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// Temp dir plus source, or `None` (after printing `SKIPPED:`) without qemu tools.
fn setup() -> Option<(tempfile::TempDir, PathBuf)> {
    if !have_qemu() {
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let source = make_source(dir.path());
    Some((dir, source))
}

#[test]
fn raw_matrix_matches_qemu_img() {
    let Some((dir, source)) = setup() else { return };
    let image = finish_image(dir.path(), "source.raw", "raw", source);
    run_matrix(dir.path(), &[image]);
}

#[test]
fn qcow2_matrix_matches_qemu_img() {
    let Some((dir, source)) = setup() else { return };
    let d = dir.path();
    let mut images = convert_all(
        d,
        &source,
        "qcow2",
        &[
            ("v3.qcow2", &["-o", "compat=1.1"]),
            ("v2.qcow2", &["-o", "compat=0.10"]),
            ("c512.qcow2", &["-o", "cluster_size=512"]),
            ("c2m.qcow2", &["-o", "cluster_size=2M"]),
            ("zlib.qcow2", &["-c"]),
            ("zstd.qcow2", &["-c", "-o", "compression_type=zstd"]),
            ("extl2.qcow2", &["-o", "extended_l2=on,cluster_size=128k"]),
        ],
    );
    let reverse = d.join("reverse.qcow2");
    make_reverse_qcow2(d, &reverse);
    images.push(finish_image(d, "reverse.qcow2", "qcow2", reverse));
    // Growing the disk reallocates the L1 table at the end of the file, after every data
    // cluster and L2 table: a stream converter must hold the data until the table arrives.
    let l1_last = converted(
        d,
        &source,
        "l1last.qcow2",
        "qcow2",
        &["-o", "cluster_size=4096"],
    );
    run(Command::new("qemu-img")
        .args(["resize", "-q", "-f", "qcow2"])
        .arg(&l1_last.path)
        .arg("+8M"));
    images.push(finish_image(d, "l1last.qcow2", "qcow2", l1_last.path));
    run_matrix(d, &images);
}

/// The source converted by qemu-img to `qemu_format`, one image per (file name, options).
fn convert_all(
    dir: &Path,
    source: &Path,
    qemu_format: &'static str,
    cases: &[(&str, &[&str])],
) -> Vec<Image> {
    cases
        .iter()
        .map(|&(name, opts)| converted(dir, source, name, qemu_format, opts))
        .collect()
}

/// The matrix over the source converted to `qemu_format` with each (file name, options).
fn family_matches(qemu_format: &'static str, cases: &[(&str, &[&str])]) {
    let Some((dir, source)) = setup() else { return };
    let images = convert_all(dir.path(), &source, qemu_format, cases);
    run_matrix(dir.path(), &images);
}

#[test]
fn vmdk_matrix_matches_qemu_img() {
    family_matches(
        "vmdk",
        &[
            ("stream.vmdk", &["-o", "subformat=streamOptimized"]),
            ("sparse.vmdk", &["-o", "subformat=monolithicSparse"]),
        ],
    );
}

#[test]
fn vhd_matrix_matches_qemu_img() {
    family_matches(
        "vpc",
        &[
            ("dynamic.vhd", &["-o", "subformat=dynamic,force_size=on"]),
            ("fixed.vhd", &["-o", "subformat=fixed,force_size=on"]),
        ],
    );
}

#[test]
fn vhdx_matrix_matches_qemu_img() {
    family_matches(
        "vhdx",
        &[
            ("dynamic.vhdx", &["-o", "subformat=dynamic"]),
            ("fixed.vhdx", &["-o", "subformat=fixed"]),
        ],
    );
}

#[test]
fn vdi_matrix_matches_qemu_img() {
    family_matches(
        "vdi",
        &[("dynamic.vdi", &[]), ("static.vdi", &["-o", "static=on"])],
    );
}
