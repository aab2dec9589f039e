//! The conversion entry points: any image (file or stream) into a [`Target`].
//!
//! ```text
//!  convert_reader: Read ─► unwrap layers ─┬─ raw/iso ───► raw::stream ────────────────┐
//!                                         ├─ qcow2, vmdk streamOptimized ─► stream ──┤
//!                                         └─ vhd/vhdx/vdi/vmdk ─► spool ─► open ─────┤
//!  convert_path:   file ─┬─ vhd/vhdx/vdi/vmdk, qcow2 with backing ─► open in place ──┤
//!                        └─ everything else ─► convert_reader ───────────────────────┤
//!                                                              TargetSink ─► Target ◄┘
//! ```
//!
//! The sink is pipelined: target writes run on a writer thread (the `pipeline` module) while
//! this thread reads, parses and detects zeroes, and [`TargetSink::finish`] waits for the last
//! write before the target is sized and synced.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::detect::{self, Compression, ImageFormat, Sniffed};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{BackingPolicy, DiskImage, ExtentSink, OpenOptions, StreamContext};
use crate::limits::{DETECT_HEAD_LEN, IO_CHUNK, ZERO_DETECT_BLOCK};
use crate::open::{CountingReadAt, CountingReader, copy_image, open_image};
use crate::raw::{self, VHD_FOOTER_LEN};
use crate::read_at::ReadAt;
use crate::sink::{TargetSink, is_zero};
use crate::target::{Preallocation, Target};
use crate::{qcow2, vmdk};

/// What the caller wants from a conversion.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// Final size of the raw disk. `None`: the image's virtual size (files) or the device size.
    /// An image larger than this is refused before anything is written.
    pub target_size: Option<u64>,
    /// Allocation of zero ranges.
    pub preallocation: Preallocation,
    /// Scratch directory for spooling or spilling; `None` makes such a need a
    /// `ScratchSpaceRequired` error.
    pub scratch_dir: Option<PathBuf>,
    /// Override of [`crate::limits::STREAM_MEMORY_BUDGET`] (tests force spilling with a tiny one).
    pub memory_budget: Option<usize>,
    /// Backing-file policy (only honoured for local files).
    pub backing: BackingPolicy,
}

/// What a conversion did.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    /// Compression layers unwrapped, outermost first.
    pub compression: Vec<Compression>,
    /// True when the image came out of a tar archive.
    pub from_tar: bool,
    /// The disk format.
    pub format: ImageFormat,
    /// The image's virtual size.
    pub virtual_size: u64,
    /// Final size of the target.
    pub target_size: u64,
    /// Bytes read from the outermost (possibly compressed) input. Streams are read once to
    /// their end; an image opened in place counts every positioned read, so metadata read
    /// twice counts twice (files a VMDK descriptor or backing chain names are not counted).
    pub input_bytes: u64,
    /// Guest bytes written as data.
    pub data_bytes: u64,
    /// Guest bytes handled as zero (holes or zeroing).
    pub zero_bytes: u64,
    /// Bytes written to the scratch directory: spilled clusters of a streaming converter, or
    /// the non-zero blocks of a spooled image (zero blocks stay holes in the spool file).
    pub scratch_bytes: u64,
    /// True when the conversion ran as one sequential pass.
    pub streamed: bool,
}

/// Convert an image arriving as a byte stream (stdin, HTTP body, upload) into `target`.
///
/// Compression layers and a tar archive are unwrapped on the fly. Raw, ISO, qcow2 and
/// streamOptimized VMDK convert in one sequential pass; formats that need random access (VHD,
/// VHDX, VDI, other VMDKs) are spooled to `opts.scratch_dir` first and fail with
/// [`ErrorKind::ScratchSpaceRequired`] without one. The input is read to its end, so the
/// integrity checks of the compression layers run even when the image ends early.
pub fn convert_reader(
    input: &mut dyn Read,
    target: &mut dyn Target,
    opts: &ConvertOptions,
) -> Result<ConvertReport> {
    convert_stream(input, target, opts, None)
}

/// [`convert_reader`], plus the input length when the input is a local file: an uncompressed
/// raw image then has a known size that the target is checked against before any write.
fn convert_stream(
    input: &mut dyn Read,
    target: &mut dyn Target,
    opts: &ConvertOptions,
    input_len: Option<u64>,
) -> Result<ConvertReport> {
    let input_bytes = Arc::new(AtomicU64::new(0));
    let counted = CountingReader::new(input, input_bytes.clone());
    let layers = detect::unwrap_layers(Box::new(counted))?;
    let compression = layers.compression.clone();
    let from_tar = layers.from_tar;

    target.set_preallocation(opts.preallocation);
    // Only the outermost bytes have the file's length.
    let known_len = input_len.filter(|_| compression.is_empty() && !from_tar);
    let (done, totals) = std::thread::scope(|scope| {
        let mut sink = TargetSink::pipelined(scope, &mut *target, opts.target_size)?;
        let done = convert_layers(
            layers.format,
            &layers.head,
            layers.reader,
            &mut sink,
            opts,
            known_len,
        )?;
        Ok::<_, Error>((done, sink.finish()?))
    })?;
    let virtual_size = totals.virtual_size.unwrap_or(done.raw_len);
    let target_size = finish_target(target, opts, virtual_size)?;
    Ok(ConvertReport {
        compression,
        from_tar,
        format: done.format,
        virtual_size,
        target_size,
        input_bytes: input_bytes.load(Ordering::Relaxed),
        data_bytes: totals.data_bytes,
        zero_bytes: totals.zero_bytes,
        scratch_bytes: done.scratch_bytes,
        streamed: done.streamed,
    })
}

/// Convert a local image file into `target`.
///
/// Uncompressed formats that need random access (VHD including fixed VHD recognised by its
/// footer, VHDX, VDI, every sparse VMDK, a VMDK descriptor with its extent files, and qcow2 when
/// `opts.backing` allows backing files) are opened in place, without scratch space. Everything
/// else goes through [`convert_reader`].
pub fn convert_path(
    path: &Path,
    target: &mut dyn Target,
    opts: &ConvertOptions,
) -> Result<ConvertReport> {
    let mut file =
        File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("reading metadata of {}", path.display()), e))?;
    if !meta.is_file() {
        // A pipe (`<(curl …)`, /dev/stdin) or a device has no usable length: read it as a stream.
        return convert_reader(&mut file, target, opts);
    }
    let file_size = meta.len();
    let head_len = usize::try_from(file_size)
        .unwrap_or(DETECT_HEAD_LEN)
        .min(DETECT_HEAD_LEN);
    let mut head = vec![0u8; head_len];
    FileExt::read_exact_at(&file, &mut head, 0)
        .map_err(|e| Error::io(format!("reading the header of {}", path.display()), e))?;

    let open_opts = OpenOptions {
        backing: opts.backing.clone(),
    };
    let in_place = match detect::sniff(&head) {
        Sniffed::Format(f @ (ImageFormat::Vhd | ImageFormat::Vhdx | ImageFormat::Vdi)) => {
            Some(InPlace::Open(f))
        }
        Sniffed::Format(ImageFormat::Vmdk) if detect::is_vmdk_descriptor(&head) => {
            Some(InPlace::VmdkDescriptor)
        }
        // Every sparse VMDK, streamOptimized included: a local file needs no one-pass order.
        Sniffed::Format(ImageFormat::Vmdk) => Some(InPlace::Open(ImageFormat::Vmdk)),
        Sniffed::Format(ImageFormat::Qcow2) if opts.backing != BackingPolicy::Deny => {
            Some(InPlace::Open(ImageFormat::Qcow2))
        }
        Sniffed::Format(f @ (ImageFormat::Raw | ImageFormat::Iso)) => {
            let mut tail = [0u8; VHD_FOOTER_LEN];
            let fixed_vhd = file_size >= VHD_FOOTER_LEN as u64 && {
                FileExt::read_exact_at(&file, &mut tail, file_size - VHD_FOOTER_LEN as u64)
                    .map_err(|e| Error::io(format!("reading the end of {}", path.display()), e))?;
                vhd_fixed_footer(&tail).is_some()
            };
            Some(if fixed_vhd {
                InPlace::Open(ImageFormat::Vhd)
            } else {
                InPlace::Raw(f)
            })
        }
        _ => None,
    };
    let Some(in_place) = in_place else {
        return convert_stream(&mut file, target, opts, Some(file_size));
    };

    let input_bytes = Arc::new(AtomicU64::new(0));
    let (format, mut image) = match in_place {
        InPlace::Raw(format) => {
            let seeker = file
                .try_clone()
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            let src: Arc<dyn ReadAt> =
                Arc::new(CountingReadAt::new(Arc::new(file), input_bytes.clone()));
            let image: Box<dyn DiskImage> =
                Box::new(raw::RawFile::new(format, seeker, src, file_size));
            (format, image)
        }
        InPlace::Open(format) => {
            let src: Arc<dyn ReadAt> =
                Arc::new(CountingReadAt::new(Arc::new(file), input_bytes.clone()));
            (format, open_image(format, src, &open_opts)?)
        }
        InPlace::VmdkDescriptor => {
            // The vmdk reader opens the descriptor's extent files itself; their reads are not
            // counted in `input_bytes`.
            (
                ImageFormat::Vmdk,
                vmdk::open_descriptor_path(path, &open_opts)?,
            )
        }
    };
    target.set_preallocation(opts.preallocation);
    let totals = std::thread::scope(|scope| {
        let mut sink = TargetSink::pipelined(scope, &mut *target, opts.target_size)?;
        copy_image(image.as_mut(), &mut sink)?;
        sink.finish()
    })?;
    let virtual_size = image.virtual_size();
    let target_size = finish_target(target, opts, virtual_size)?;
    Ok(ConvertReport {
        compression: Vec::new(),
        from_tar: false,
        format,
        virtual_size,
        target_size,
        input_bytes: input_bytes.load(Ordering::Relaxed),
        data_bytes: totals.data_bytes,
        zero_bytes: totals.zero_bytes,
        scratch_bytes: 0,
        streamed: false,
    })
}

/// How [`convert_path`] opens a file it does not stream.
enum InPlace {
    /// Raw or ISO: read in place so the source's holes are skipped, not read.
    Raw(ImageFormat),
    Open(ImageFormat),
    VmdkDescriptor,
}

/// The fixed-VHD footer check (a fixed VHD is raw data followed by a 512-byte footer).
pub(crate) fn vhd_fixed_footer(tail: &[u8; VHD_FOOTER_LEN]) -> Option<crate::image::FormatInfo> {
    crate::vhd::fixed_footer(tail)
}

/// What converting the innermost layer did.
struct Converted {
    format: ImageFormat,
    /// Bytes of a raw stream (its virtual size); 0 for formats with a header size.
    raw_len: u64,
    scratch_bytes: u64,
    streamed: bool,
}

fn convert_layers(
    format: ImageFormat,
    head: &[u8],
    mut reader: Box<dyn Read + '_>,
    sink: &mut TargetSink<'_>,
    opts: &ConvertOptions,
    known_len: Option<u64>,
) -> Result<Converted> {
    let mut ctx = StreamContext::new(opts.scratch_dir.clone());
    if let Some(budget) = opts.memory_budget {
        ctx.memory_budget = budget;
    }
    let converted = match format {
        ImageFormat::Raw | ImageFormat::Iso => {
            let out = raw::stream(&mut reader, sink, Some(&vhd_fixed_footer), known_len)?;
            let format = if out.vhd_footer.is_some() {
                ImageFormat::Vhd
            } else {
                format
            };
            Converted {
                format,
                raw_len: out.len,
                scratch_bytes: 0,
                streamed: true,
            }
        }
        ImageFormat::Qcow2 => {
            qcow2::stream(&mut reader, sink, &mut ctx)?;
            Converted {
                format,
                raw_len: 0,
                scratch_bytes: ctx.scratch_bytes,
                streamed: true,
            }
        }
        ImageFormat::Vmdk if detect::is_vmdk_descriptor(head) => {
            return Err(Error::unsupported(
                "a vmdk descriptor names separate extent files, which a stream does not carry; \
                 convert it from a local path",
            ));
        }
        ImageFormat::Vmdk if vmdk::probe(head)?.streamable => {
            vmdk::stream(&mut reader, sink, &mut ctx)?;
            Converted {
                format,
                raw_len: 0,
                scratch_bytes: ctx.scratch_bytes,
                streamed: true,
            }
        }
        ImageFormat::Vmdk | ImageFormat::Vhd | ImageFormat::Vhdx | ImageFormat::Vdi => {
            let scratch_bytes = spool_and_copy(format, &mut reader, sink, opts)?;
            Converted {
                format,
                raw_len: 0,
                scratch_bytes,
                streamed: false,
            }
        }
        ImageFormat::Tar => {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "tar archive was not unwrapped",
            ));
        }
    };
    drain(&mut reader)?;
    Ok(converted)
}

/// Read the rest of the input so decoders verify their trailing checksums (a gzip CRC, an xz
/// index) and a truncated download is an error even when the image itself was complete.
fn drain(reader: &mut dyn Read) -> Result<()> {
    io::copy(reader, &mut io::sink()).map_err(|e| Error::io("reading the end of the input", e))?;
    Ok(())
}

/// Write the stream to an unlinked file in the scratch directory, then convert it with the
/// format's random-access reader. Returns the bytes written to scratch (zero blocks are left
/// as holes and not counted).
fn spool_and_copy(
    format: ImageFormat,
    reader: &mut dyn Read,
    sink: &mut dyn ExtentSink,
    opts: &ConvertOptions,
) -> Result<u64> {
    let Some(dir) = opts.scratch_dir.as_deref() else {
        return Err(Error::new(
            ErrorKind::ScratchSpaceRequired,
            format!(
                "scratch space required: {format} images need random access; give a scratch \
                 directory or a local file"
            ),
        ));
    };
    let file = scratch_file(dir)?;
    let mut buf = vec![0u8; IO_CHUNK];
    let mut offset = 0u64;
    let mut written = 0u64;
    loop {
        let n = raw::read_full(reader, &mut buf)
            .map_err(|e| Error::io(format!("reading {format} image at {offset}"), e))?;
        if n == 0 {
            break;
        }
        for (i, block) in buf[..n].chunks(ZERO_DETECT_BLOCK).enumerate() {
            if is_zero(block) {
                continue;
            }
            let at = offset + (i * ZERO_DETECT_BLOCK) as u64;
            FileExt::write_all_at(&file, block, at)
                .map_err(|e| Error::io(format!("writing scratch file in {}", dir.display()), e))?;
            written += block.len() as u64;
        }
        offset += n as u64;
    }
    file.set_len(offset)
        .map_err(|e| Error::io(format!("sizing scratch file in {}", dir.display()), e))?;
    let mut image: Box<dyn DiskImage> =
        open_image(format, Arc::new(file), &OpenOptions::default())?;
    copy_image(image.as_mut(), sink)?;
    Ok(written)
}

/// A new file in `dir`, already unlinked so it disappears however the process ends.
fn scratch_file(dir: &Path) -> Result<File> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = dir.join(format!(
        ".cdi-spool-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&name)
        .map_err(|e| Error::io(format!("creating scratch file in {}", dir.display()), e))?;
    std::fs::remove_file(&name)
        .map_err(|e| Error::io(format!("unlinking scratch file {}", name.display()), e))?;
    Ok(file)
}

/// Size, preallocate and sync the target; returns its final size.
fn finish_target(target: &mut dyn Target, opts: &ConvertOptions, virtual_size: u64) -> Result<u64> {
    let size = match target.fixed_size() {
        Some(device) => device,
        None => opts.target_size.unwrap_or(virtual_size),
    };
    target
        .finish(size, opts.preallocation)
        .map_err(|e| Error::io(format!("finishing {}", target.describe()), e))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::target::FileTarget;

    #[test]
    fn scratch_file_is_unlinked_but_usable() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = scratch_file(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        f.write_all(b"spool").unwrap();
        let mut back = [0u8; 5];
        FileExt::read_exact_at(&f, &mut back, 0).unwrap();
        assert_eq!(&back, b"spool");
    }

    #[test]
    fn final_size_is_the_requested_size_else_the_image_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.img");
        let mut t = FileTarget::create(&p).unwrap();
        assert_eq!(
            finish_target(&mut t, &ConvertOptions::default(), 4096).unwrap(),
            4096
        );
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4096);
        let opts = ConvertOptions {
            target_size: Some(1 << 20),
            ..Default::default()
        };
        let mut t = FileTarget::create(&p).unwrap();
        assert_eq!(finish_target(&mut t, &opts, 4096).unwrap(), 1 << 20);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
    }

    #[test]
    fn spooled_formats_without_scratch_fail_before_reading_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = FileTarget::create(&dir.path().join("o")).unwrap();
        let mut sink = TargetSink::new(&mut t, None).unwrap();
        let mut input: &[u8] = &[7u8; 100];
        let err = spool_and_copy(
            ImageFormat::Vdi,
            &mut input,
            &mut sink,
            &ConvertOptions::default(),
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ScratchSpaceRequired);
        assert_eq!(
            input.len(),
            100,
            "nothing may be consumed before the refusal"
        );
    }
}
