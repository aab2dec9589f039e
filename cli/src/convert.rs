//! `cdi convert` and `cdi info`: the formats engine on local files, stdin and block devices.
//!
//! Exit status: 0 on success; 1 with one line `cdi convert: <reason>` on stderr on failure;
//! 3 when the image needs scratch space and none was given (retry with `--scratch DIR`).
//! A file target created by a failed run is removed, so no partial image is left behind
//! looking complete; a block device is left as it is.

use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cdi_formats::{
    BackingPolicy, ConvertOptions, ConvertReport, ErrorKind, ImageInfo, Preallocation,
};

/// Exit status when the image needs scratch space and none was given.
const EXIT_SCRATCH_REQUIRED: u8 = 3;

/// Format subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Convert a disk image (raw, ISO, qcow2, vmdk, vhd, vhdx, vdi; plain, compressed with
    /// gzip, xz, zstd or bzip2, or inside a tar archive) to a raw disk in a file or on a block
    /// device.
    Convert(ConvertArgs),
    /// Show what an image is: compression, format, sizes, and whether it streams.
    Info(InfoArgs),
}

/// Arguments of `cdi convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Source image: a path, or `-` for standard input.
    src: PathBuf,
    /// Destination: a file (created or overwritten) or a block device.
    dst: PathBuf,
    /// Final size of the raw disk as a Kubernetes quantity (e.g. 10Gi); an image larger than
    /// this is refused before anything is written. Default: the image's virtual size (files)
    /// or the device size.
    #[arg(long, value_name = "SIZE", value_parser = parse_quantity)]
    target_size: Option<u64>,
    /// How zero ranges are allocated.
    #[arg(long, value_enum, default_value_t = PreallocArg::Off)]
    preallocation: PreallocArg,
    /// Scratch directory for images that need random access when read from a stream.
    #[arg(long, value_name = "DIR")]
    scratch: Option<PathBuf>,
    /// Follow backing files of a local image, resolved relative to SRC's directory.
    #[arg(long)]
    allow_backing_file: bool,
    /// Memory budget of the streaming converters in bytes (tests force spilling with it).
    #[arg(long, hide = true, value_name = "BYTES")]
    memory_budget: Option<usize>,
    /// Print the conversion report on stdout.
    #[arg(long, value_enum)]
    report: Option<ReportFormat>,
}

/// Arguments of `cdi info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Image: a path, or `-` for standard input.
    src: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = InfoFormat::Text)]
    output: InfoFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PreallocArg {
    Off,
    Fallocate,
    Full,
}

impl From<PreallocArg> for Preallocation {
    fn from(p: PreallocArg) -> Self {
        match p {
            PreallocArg::Off => Preallocation::Off,
            PreallocArg::Fallocate => Preallocation::Fallocate,
            PreallocArg::Full => Preallocation::Full,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ReportFormat {
    Json,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum InfoFormat {
    Text,
    Json,
}

fn parse_quantity(text: &str) -> Result<u64, String> {
    cdi_api::quantity::parse_bytes(text).map_err(|e| e.to_string())
}

impl Command {
    /// Run the subcommand.
    pub fn run(self) -> ExitCode {
        match self {
            Command::Convert(args) => match convert(&args) {
                Ok(report) => {
                    if let Some(ReportFormat::Json) = args.report {
                        match serde_json::to_string(&report) {
                            Ok(line) => println!("{line}"),
                            Err(e) => return fail("convert", ErrorKind::Io, &e.to_string()),
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail("convert", e.kind(), &e.to_string()),
            },
            Command::Info(args) => match info(&args.src) {
                Ok(info) => {
                    let out = match args.output {
                        InfoFormat::Json => serde_json::to_string(&info).map(|s| s + "\n"),
                        InfoFormat::Text => Ok(render_info(&info)),
                    };
                    match out {
                        Ok(text) => {
                            // A closed stdout (`| head`) is not worth a panic.
                            let _ = io::stdout().write_all(text.as_bytes());
                            ExitCode::SUCCESS
                        }
                        Err(e) => fail("info", ErrorKind::Io, &e.to_string()),
                    }
                }
                Err(e) => fail("info", e.kind(), &e.to_string()),
            },
        }
    }
}

fn fail(cmd: &str, kind: ErrorKind, reason: &str) -> ExitCode {
    eprintln!("cdi {cmd}: {reason}");
    ExitCode::from(exit_status(kind))
}

/// 3 tells scripts to retry with `--scratch`; every other failure is 1.
fn exit_status(kind: ErrorKind) -> u8 {
    if kind == ErrorKind::ScratchSpaceRequired {
        EXIT_SCRATCH_REQUIRED
    } else {
        1
    }
}

fn is_stdin(src: &Path) -> bool {
    src.as_os_str() == "-"
}

fn convert(args: &ConvertArgs) -> cdi_formats::Result<ConvertReport> {
    let backing = if args.allow_backing_file {
        if is_stdin(&args.src) {
            return Err(cdi_formats::Error::new(
                ErrorKind::InvalidInput,
                "--allow-backing-file needs a source file, not standard input",
            ));
        }
        let dir = match args.src.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        BackingPolicy::AllowRelativeTo(dir)
    } else {
        BackingPolicy::Deny
    };
    let opts = ConvertOptions {
        target_size: args.target_size,
        preallocation: args.preallocation.into(),
        scratch_dir: args.scratch.clone(),
        memory_budget: args.memory_budget,
        backing,
    };
    refuse_same_file(&args.src, &args.dst)?;

    let mut target = cdi_formats::open_target(&args.dst)?;
    // The file the target really is (through symlinks), for cleanup after a failure.
    let created = std::fs::canonicalize(&args.dst)
        .ok()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()));
    let result = if is_stdin(&args.src) {
        cdi_formats::convert_reader(&mut io::stdin().lock(), target.as_mut(), &opts)
    } else {
        cdi_formats::convert_path(&args.src, target.as_mut(), &opts)
    };
    drop(target);
    if result.is_err()
        && let Some(file) = created
    {
        // Never leave a partial image that looks like a finished one. Block devices are
        // left as they are.
        let _ = std::fs::remove_file(file);
    }
    result
}

/// Converting a file onto itself would truncate the source before reading it.
fn refuse_same_file(src: &Path, dst: &Path) -> cdi_formats::Result<()> {
    if is_stdin(src) {
        return Ok(());
    }
    if let (Ok(a), Ok(b)) = (std::fs::metadata(src), std::fs::metadata(dst))
        && a.dev() == b.dev()
        && a.ino() == b.ino()
    {
        return Err(cdi_formats::Error::new(
            ErrorKind::InvalidInput,
            format!(
                "source and destination are the same file ({})",
                dst.display()
            ),
        ));
    }
    Ok(())
}

fn info(src: &Path) -> cdi_formats::Result<ImageInfo> {
    if is_stdin(src) {
        cdi_formats::probe_reader(&mut io::stdin().lock())
    } else {
        cdi_formats::probe_path(src)
    }
}

fn render_info(info: &ImageInfo) -> String {
    let f = &info.format;
    let compression = if info.compression.is_empty() {
        "none".to_string()
    } else {
        info.compression
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let format = match &f.subformat {
        Some(sub) => format!("{} ({sub})", f.format.name()),
        None => f.format.name().to_string(),
    };
    let size = match f.virtual_size {
        Some(v) => format!("{v} bytes ({})", human(v)),
        None => "unknown".to_string(),
    };
    let mut out = String::new();
    out.push_str(&format!("compression: {compression}\n"));
    out.push_str(&format!(
        "tar archive: {}\n",
        if info.from_tar { "yes" } else { "no" }
    ));
    out.push_str(&format!("format: {format}\n"));
    out.push_str(&format!("virtual size: {size}\n"));
    if let Some(c) = f.cluster_size {
        out.push_str(&format!("cluster size: {c}\n"));
    }
    out.push_str(&format!(
        "backing file: {}\n",
        f.backing_file.as_deref().unwrap_or("none")
    ));
    let conversion = if info.needs_scratch {
        "needs scratch space when streamed (random access)"
    } else {
        "streamable (single pass, no scratch)"
    };
    out.push_str(&format!("conversion: {conversion}\n"));
    out
}

/// `10 GiB`, `1.5 MiB`: binary units, one decimal.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_use_binary_units() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(10 << 30), "10.0 GiB");
        assert_eq!(human(1536 << 10), "1.5 MiB");
    }

    fn args(src: &Path, dst: &Path) -> ConvertArgs {
        ConvertArgs {
            src: src.to_path_buf(),
            dst: dst.to_path_buf(),
            target_size: None,
            preallocation: PreallocArg::Off,
            scratch: None,
            allow_backing_file: false,
            memory_budget: None,
            report: None,
        }
    }

    #[test]
    fn failed_conversion_removes_the_file_it_created() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        std::fs::write(&src, vec![1u8; 3 << 20]).unwrap();
        let dst = dir.path().join("dst.img");
        // An existing file is overwritten, so on failure it is a partial image too.
        std::fs::write(&dst, b"old").unwrap();
        let mut a = args(&src, &dst);
        a.target_size = Some(1 << 20);
        let err = convert(&a).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TargetTooSmall);
        assert!(!dst.exists(), "partial target left behind");

        a.target_size = None;
        let report = convert(&a).unwrap();
        assert_eq!(report.virtual_size, 3 << 20);
        assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
    }

    #[test]
    fn failure_through_a_symlink_removes_the_real_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        std::fs::write(&src, vec![1u8; 3 << 20]).unwrap();
        let real = dir.path().join("real.img");
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let mut a = args(&src, &link);
        a.target_size = Some(1 << 20);
        assert!(convert(&a).is_err());
        assert!(
            !real.exists(),
            "partial target behind the symlink left behind"
        );
    }

    #[test]
    fn converting_a_file_onto_itself_is_refused_without_touching_it() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("disk.img");
        std::fs::write(&src, b"precious").unwrap();
        let err = convert(&args(&src, &src)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert_eq!(std::fs::read(&src).unwrap(), b"precious");
    }

    #[test]
    fn scratch_required_has_its_own_exit_status() {
        assert_eq!(exit_status(ErrorKind::ScratchSpaceRequired), 3);
        assert_eq!(exit_status(ErrorKind::Corrupt), 1);
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("d.vhd");
        let mut vhd = vec![0u8; 4096];
        vhd[..8].copy_from_slice(b"conectix");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &vhd).unwrap();
        std::fs::write(&src, enc.finish().unwrap()).unwrap();
        let err = convert(&args(&src, &dir.path().join("o"))).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ScratchSpaceRequired, "{err}");
    }

    #[test]
    fn info_text_names_format_size_and_streaming() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("disk.img");
        std::fs::write(&src, vec![0u8; 2 << 20]).unwrap();
        let text = render_info(&info(&src).unwrap());
        assert!(text.contains("format: raw\n"), "{text}");
        assert!(
            text.contains("virtual size: 2097152 bytes (2.0 MiB)\n"),
            "{text}"
        );
        assert!(text.contains("conversion: streamable"), "{text}");
    }

    #[test]
    fn quantities_parse_kubernetes_suffixes() {
        assert_eq!(parse_quantity("10Gi"), Ok(10 << 30));
        assert!(parse_quantity("ten").is_err());
    }
}
