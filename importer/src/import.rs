//! One import, start to finish: the phase machine driving a source into a target.
//!
//! The async side (sources, the resumable pump, cancellation) runs on tokio; the conversion
//! runs on one blocking thread fed through [`crate::transfer::ChannelReader`]. Errors come out
//! with upstream's prefixes already applied: `Unable to connect to <kind> data source: …` for
//! failures while opening the source, `Unable to process data: …` for everything after.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cdi_api::termination::{IMPORT_COMPLETE, TerminationMessage};
use cdi_formats::{ConvertOptions, ConvertReport, Preallocation};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::archive::{self, ArchiveReport};
use crate::checksum::Checksum;
use crate::error::{ErrorKind, ImportError, Result};
use crate::phase::{Machine, Phase, Plan};
use crate::progress::Progress;
use crate::source::file::FileSource;
use crate::source::http::{Credentials, HttpAuth, HttpSource, parse_header};
use crate::source::s3::S3Source;
use crate::source::{ByteSource, Opened};
use crate::tls::{TlsOptions, build_client};
use crate::transfer::{self, ChannelReader, PumpStats, TransferLimits};

/// Where the bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// An `http(s)://` URL.
    Http(Url),
    /// A local file.
    File(PathBuf),
    /// S3 object at a path-style URL `http(s)://host[:port]/bucket/key`.
    S3(Url),
    /// A `docker://` image reference.
    Registry(String),
    /// A blank disk.
    Blank,
}

/// What the bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentType {
    /// A disk image, converted to raw.
    #[default]
    Kubevirt,
    /// A tar archive extracted into a directory.
    Archive,
}

/// Where the result goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A raw image file (created or truncated).
    File(PathBuf),
    /// A block device.
    Block(PathBuf),
    /// A directory (archives).
    Dir(PathBuf),
}

/// Everything one import needs.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    /// Source.
    pub source: SourceSpec,
    /// Content type.
    pub content_type: ContentType,
    /// Destination.
    pub dest: Destination,
    /// Requested volume size (`IMPORTER_IMAGE_SIZE`); `None` keeps the image's own size.
    pub image_size: Option<u64>,
    /// Filesystem overhead fraction (`FILESYSTEM_OVERHEAD`).
    pub overhead: f64,
    /// Preallocate the target.
    pub preallocation: bool,
    /// Scratch directory, if one is mounted.
    pub scratch_dir: Option<PathBuf>,
    /// Expected checksum of the downloaded bytes.
    pub checksum: Option<Checksum>,
    /// Basic auth / S3 keys / registry credentials.
    pub credentials: Option<Credentials>,
    /// Trust settings.
    pub tls: TlsOptions,
    /// Extra headers (`Name: value`).
    pub headers: Vec<String>,
    /// Secret extra headers (`Name: value`), sent to the source's origin only.
    pub secret_headers: Vec<String>,
    /// Architecture to pick from a multi-arch registry index.
    pub architecture: Option<String>,
    /// Retry and watchdog settings.
    pub limits: TransferLimits,
}

impl ImportRequest {
    /// A request with defaults for everything but source and destination.
    pub fn new(source: SourceSpec, dest: Destination) -> ImportRequest {
        ImportRequest {
            source,
            content_type: ContentType::Kubevirt,
            dest,
            image_size: None,
            overhead: 0.0,
            preallocation: false,
            scratch_dir: None,
            checksum: None,
            credentials: None,
            tls: TlsOptions::default(),
            headers: Vec::new(),
            secret_headers: Vec::new(),
            architecture: None,
            limits: TransferLimits::default(),
        }
    }
}

/// A successful import.
#[derive(Debug, Clone)]
pub struct ImportOutcome {
    /// What the pod writes to its termination log.
    pub message: TerminationMessage,
    /// The conversion report (disk images).
    pub report: Option<ConvertReport>,
    /// The extraction report (archives).
    pub archive: Option<ArchiveReport>,
    /// Resumes and restarts of the transfer.
    pub stats: PumpStats,
    /// Bytes read from the source in the final pass.
    pub bytes_read: u64,
    /// Phases walked, in order.
    pub phases: Vec<Phase>,
}

/// Run one import. `progress` is updated as bytes arrive; `cancel` stops it (no success is
/// reported for a cancelled import).
pub async fn run_import(
    req: ImportRequest,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<ImportOutcome> {
    let kind = source_kind(&req.source);
    let plan = plan_for(&req)?;
    let mut machine = Machine::new(plan);
    let mut phases = vec![machine.current()];
    let mut state = State::default();
    while !machine.is_complete() {
        let phase = machine.current();
        tracing::info!(%phase, "import phase");
        let step = execute(phase, &req, &mut state, &progress, &cancel).await;
        if let Err(e) = step {
            if cancel.is_cancelled() && e.kind() != ErrorKind::ChecksumMismatch {
                return Err(ImportError::new(
                    ErrorKind::Cancelled,
                    "Unable to process data: import cancelled before it completed",
                ));
            }
            return Err(match phase {
                Phase::Info => e.context(format!("Unable to connect to {kind} data source")),
                _ => e.context("Unable to process data"),
            });
        }
        let next = machine.advance().map_err(|e| {
            ImportError::new(ErrorKind::Io, format!("Unable to process data: {}", e.0))
        })?;
        phases.push(next);
    }
    progress.complete();
    let labels = (!state.labels.is_empty()).then(|| state.labels.clone());
    let message = TerminationMessage {
        preallocation_applied: Some(req.preallocation),
        labels,
        ..TerminationMessage::with_message(IMPORT_COMPLETE)
    };
    Ok(ImportOutcome {
        message,
        report: state.report,
        archive: state.archive,
        stats: state.stats,
        bytes_read: state.bytes_read,
        phases,
    })
}

/// What phases hand to each other.
#[derive(Default)]
struct State {
    source: Option<Arc<dyn ByteSource>>,
    opened: Option<Opened>,
    reader: Option<ChannelReader>,
    report: Option<ConvertReport>,
    archive: Option<ArchiveReport>,
    stats: PumpStats,
    bytes_read: u64,
    labels: std::collections::BTreeMap<String, String>,
    pump: Option<tokio::task::JoinHandle<PumpStats>>,
}

fn source_kind(s: &SourceSpec) -> &'static str {
    match s {
        SourceSpec::Http(_) => "http",
        SourceSpec::File(_) => "file",
        SourceSpec::S3(_) => "s3",
        SourceSpec::Registry(_) => "registry",
        SourceSpec::Blank => "blank",
    }
}

/// The route through the phases, refusing combinations upstream refuses.
pub fn plan_for(req: &ImportRequest) -> Result<Plan> {
    let archive = req.content_type == ContentType::Archive;
    match (&req.source, archive, &req.dest) {
        (SourceSpec::Blank, true, _) => Err(ImportError::config(
            "Cannot create empty disk with content type archive",
        )),
        (SourceSpec::Blank, false, Destination::Dir(_)) => Err(ImportError::config(
            "a blank disk needs a file or block destination",
        )),
        (SourceSpec::Blank, false, _) => Ok(Plan::Blank),
        (SourceSpec::Registry(_), true, _) => Err(ImportError::config(
            "registry imports require content type kubevirt",
        )),
        (_, true, Destination::Dir(_)) => Ok(Plan::Archive),
        (_, true, Destination::Block(_)) => Err(ImportError::config(
            "ContentType Archive cannot have block volumeMode",
        )),
        (_, true, Destination::File(_)) => Err(ImportError::config(
            "content type archive needs a directory destination",
        )),
        (_, false, Destination::Dir(_)) => Err(ImportError::config(
            "a disk image needs a file or block destination",
        )),
        (_, false, _) => Ok(Plan::DiskImage),
    }
}

async fn execute(
    phase: Phase,
    req: &ImportRequest,
    st: &mut State,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<()> {
    match phase {
        Phase::Info => info(req, st, progress).await,
        Phase::Convert => match &req.source {
            SourceSpec::Registry(reference) => {
                let out =
                    crate::source::registry::import_image(reference, req, progress, cancel).await?;
                st.report = Some(out.report);
                st.labels = out.labels;
                st.bytes_read = out.bytes_read;
                Ok(())
            }
            _ => convert(req, st, progress, cancel).await,
        },
        Phase::Transfer => transfer_archive(req, st, progress, cancel).await,
        Phase::Resize => match req.source {
            SourceSpec::Blank => blank(req).await,
            _ => finish_disk(req, st),
        },
        Phase::Complete => Ok(()),
    }
}

fn build_source(req: &ImportRequest) -> Result<Arc<dyn ByteSource>> {
    match &req.source {
        SourceSpec::Http(url) => {
            let client = build_client(&req.tls)?;
            let auth = HttpAuth {
                credentials: req.credentials.clone(),
                headers: req
                    .headers
                    .iter()
                    .map(|h| parse_header(h))
                    .collect::<Result<_>>()?,
                secret_headers: req
                    .secret_headers
                    .iter()
                    .map(|h| parse_header(h))
                    .collect::<Result<_>>()?,
            };
            Ok(Arc::new(HttpSource::new(client, url.clone(), auth)?))
        }
        SourceSpec::File(path) => Ok(Arc::new(FileSource::new(path.clone()))),
        SourceSpec::S3(url) => {
            let client = build_client(&req.tls)?;
            Ok(Arc::new(S3Source::new(
                client,
                url,
                req.credentials.clone(),
            )?))
        }
        SourceSpec::Registry(_) | SourceSpec::Blank => {
            Err(ImportError::config("this source has no byte stream"))
        }
    }
}

async fn info(req: &ImportRequest, st: &mut State, progress: &Arc<Progress>) -> Result<()> {
    if matches!(req.source, SourceSpec::Blank | SourceSpec::Registry(_)) {
        return Ok(());
    }
    let source = build_source(req)?;
    if let Some(len) = source.probe_len().await {
        progress.set_total(len);
    }
    let opened = source.open(0, None).await?;
    if let Some(total) = opened.total {
        progress.set_total(total);
    }
    if req.content_type == ContentType::Kubevirt
        && let Some(ct) = &opened.content_type
        && ct.to_ascii_lowercase().starts_with("text/html")
    {
        return Err(ImportError::connect(format!(
            "the server answered with an HTML page (Content-Type: {ct}), not a disk image"
        )));
    }
    st.source = Some(source);
    st.opened = Some(opened);
    Ok(())
}

/// Start the pump for the opened source and hand back the blocking reader.
fn start_pump(
    req: &ImportRequest,
    st: &mut State,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<ChannelReader> {
    let source = st
        .source
        .clone()
        .ok_or_else(|| ImportError::config("source not opened"))?;
    let opened = st
        .opened
        .take()
        .ok_or_else(|| ImportError::config("source not opened"))?;
    let (tx, rx) = transfer::channel();
    st.pump = Some(tokio::spawn(transfer::pump(
        source,
        opened,
        tx,
        req.limits,
        progress.clone(),
        cancel.child_token(),
    )));
    Ok(ChannelReader::new(rx, req.checksum.clone()))
}

/// Free bytes of the file system holding `path`.
pub fn available_space(path: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| ImportError::io(format!("statfs {}", path.display()), e.into()))?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Upstream's target size for a file: `min(requested, usable(overhead, min(free, requested)))`.
pub fn file_target_size(requested: Option<u64>, free: u64, overhead: f64) -> Option<u64> {
    let requested = requested?;
    let available = free.min(requested);
    Some(requested.min(cdi_api::overhead::usable_space(overhead, available)))
}

fn convert_options(req: &ImportRequest) -> Result<ConvertOptions> {
    let (target_size, preallocation) = match &req.dest {
        Destination::File(path) => {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let free = available_space(dir)?;
            let prealloc = if req.preallocation {
                Preallocation::Fallocate
            } else {
                Preallocation::Off
            };
            (
                file_target_size(req.image_size, free, req.overhead),
                prealloc,
            )
        }
        Destination::Block(_) => {
            let prealloc = if req.preallocation {
                Preallocation::Full
            } else {
                Preallocation::Off
            };
            (None, prealloc)
        }
        Destination::Dir(_) => (None, Preallocation::Off),
    };
    let scratch_dir = req.scratch_dir.clone().filter(|d| d.is_dir());
    Ok(ConvertOptions {
        target_size,
        preallocation,
        scratch_dir,
        ..Default::default()
    })
}

/// The conversion options a request implies (target size, preallocation, scratch).
pub fn convert_options_for(req: &ImportRequest) -> Result<ConvertOptions> {
    convert_options(req)
}

/// The path of a destination.
pub fn dest_path_of(dest: &Destination) -> &Path {
    dest_path(dest)
}

fn dest_path(dest: &Destination) -> &Path {
    match dest {
        Destination::File(p) | Destination::Block(p) | Destination::Dir(p) => p,
    }
}

/// Remove a partial or rejected image file (block devices cannot be removed).
fn discard_target(dest: &Destination) {
    if let Destination::File(p) = dest {
        let _ = std::fs::remove_file(p);
    }
}

/// Convert everything `reader` yields into the target at `path`, starting over when the
/// source restarts. Runs on a blocking thread.
pub fn convert_blocking(
    reader: &mut ChannelReader,
    path: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertReport> {
    loop {
        let mut target = cdi_formats::target::open_target(path)?;
        let result = cdi_formats::convert::convert_reader(reader, target.as_mut(), opts);
        drop(target);
        if reader.take_restart() {
            tracing::warn!("source restarted from byte 0; converting again");
            continue;
        }
        let report = match result {
            Ok(r) => r,
            Err(e) => return Err(reader.failure().cloned().unwrap_or_else(|| e.into())),
        };
        match reader.drain() {
            Ok(_) => return Ok(report),
            Err(_) if reader.take_restart() => continue,
            Err(e) => {
                return Err(reader
                    .failure()
                    .cloned()
                    .unwrap_or_else(|| ImportError::io("reading the rest of the source", e)));
            }
        }
    }
}

async fn convert(
    req: &ImportRequest,
    st: &mut State,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<()> {
    let opts = convert_options(req)?;
    let mut reader = start_pump(req, st, progress, cancel)?;
    let path = dest_path(&req.dest).to_path_buf();
    let joined = tokio::task::spawn_blocking(move || {
        let r = convert_blocking(&mut reader, &path, &opts);
        (r, reader)
    })
    .await
    .map_err(|e| ImportError::new(ErrorKind::Io, format!("conversion thread failed: {e}")))?;
    let (result, mut reader) = joined;
    reader.close();
    if let Some(pump) = st.pump.take() {
        st.stats = pump.await.unwrap_or_default();
    }
    match result {
        Ok(report) => {
            st.bytes_read = reader.bytes();
            st.report = Some(report);
            st.reader = Some(reader);
            Ok(())
        }
        Err(e) => {
            discard_target(&req.dest);
            Err(e)
        }
    }
}

/// Resize phase of disk images: the checksum verdict, then permissions.
fn finish_disk(req: &ImportRequest, st: &mut State) -> Result<()> {
    if let Some(reader) = st.reader.as_mut()
        && let Err(e) = reader.verify()
    {
        discard_target(&req.dest);
        return Err(e);
    }
    if let Destination::File(p) = &req.dest {
        use std::os::unix::fs::PermissionsExt;
        // Upstream leaves the image group-readable/writable for the qemu group (fsGroup 107).
        let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o660));
    }
    Ok(())
}

async fn transfer_archive(
    req: &ImportRequest,
    st: &mut State,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<()> {
    let dir = dest_path(&req.dest).to_path_buf();
    let mut reader = start_pump(req, st, progress, cancel)?;
    let joined = tokio::task::spawn_blocking(move || {
        let r = (|| loop {
            let result = archive::extract(&mut reader, &dir);
            if reader.take_restart() {
                archive::clear_dir(&dir)
                    .map_err(|e| ImportError::io("clearing the data directory", e))?;
                continue;
            }
            let report = match result {
                Ok(r) => r,
                Err(e) => return Err(reader.failure().cloned().unwrap_or(e)),
            };
            match reader.drain() {
                Ok(_) => {}
                Err(_) if reader.take_restart() => {
                    archive::clear_dir(&dir)
                        .map_err(|e| ImportError::io("clearing the data directory", e))?;
                    continue;
                }
                Err(e) => {
                    return Err(reader
                        .failure()
                        .cloned()
                        .unwrap_or_else(|| ImportError::io("reading the rest of the archive", e)));
                }
            }
            reader.verify()?;
            return Ok(report);
        })();
        (r, reader)
    })
    .await
    .map_err(|e| ImportError::new(ErrorKind::Io, format!("extraction thread failed: {e}")))?;
    let (result, mut reader) = joined;
    reader.close();
    if let Some(pump) = st.pump.take() {
        st.stats = pump.await.unwrap_or_default();
    }
    match result {
        Ok(report) => {
            st.bytes_read = reader.bytes();
            st.archive = Some(report);
            Ok(())
        }
        Err(e) => {
            // Nothing half-extracted or unverified stays behind.
            let _ = archive::clear_dir(dest_path(&req.dest));
            Err(e)
        }
    }
}

async fn blank(req: &ImportRequest) -> Result<()> {
    let req = req.clone();
    tokio::task::spawn_blocking(move || blank_blocking(&req))
        .await
        .map_err(|e| ImportError::new(ErrorKind::Io, format!("blank thread failed: {e}")))?
}

fn blank_blocking(req: &ImportRequest) -> Result<()> {
    match &req.dest {
        Destination::File(path) => {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let free = available_space(dir)?;
            let size = file_target_size(req.image_size, free, req.overhead).ok_or_else(|| {
                ImportError::config("a blank disk needs a size (IMPORTER_IMAGE_SIZE / --size)")
            })?;
            let mut target = cdi_formats::target::open_target(path)?;
            let prealloc = if req.preallocation {
                Preallocation::Fallocate
            } else {
                Preallocation::Off
            };
            target.set_preallocation(prealloc);
            target
                .finish(size, prealloc)
                .map_err(|e| ImportError::io(format!("creating {}", path.display()), e))?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
            Ok(())
        }
        Destination::Block(path) => {
            if !req.preallocation {
                return Ok(());
            }
            let mut target = cdi_formats::target::open_target(path)?;
            let device = target.fixed_size().unwrap_or(0);
            let size = req.image_size.map_or(device, |s| s.min(device));
            target.set_preallocation(Preallocation::Full);
            target
                .write_zeroes(0, size)
                .map_err(|e| ImportError::io(format!("zeroing {}", path.display()), e))?;
            target
                .finish(device, Preallocation::Off)
                .map_err(|e| ImportError::io(format!("syncing {}", path.display()), e))?;
            Ok(())
        }
        Destination::Dir(_) => Err(ImportError::config(
            "a blank disk needs a file or block destination",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(source: SourceSpec, ct: ContentType, dest: Destination) -> ImportRequest {
        ImportRequest {
            content_type: ct,
            ..ImportRequest::new(source, dest)
        }
    }

    #[test]
    fn plans_follow_upstream_rules() {
        let http = SourceSpec::Http(Url::parse("http://x/y").unwrap());
        let file = Destination::File("/d/disk.img".into());
        let dir = Destination::Dir("/d".into());
        let block = Destination::Block("/dev/x".into());
        assert_eq!(
            plan_for(&req(http.clone(), ContentType::Kubevirt, file.clone())).unwrap(),
            Plan::DiskImage
        );
        assert_eq!(
            plan_for(&req(http.clone(), ContentType::Archive, dir.clone())).unwrap(),
            Plan::Archive
        );
        assert!(plan_for(&req(http.clone(), ContentType::Archive, block.clone())).is_err());
        assert!(plan_for(&req(SourceSpec::Blank, ContentType::Archive, file.clone())).is_err());
        assert_eq!(
            plan_for(&req(SourceSpec::Blank, ContentType::Kubevirt, block)).unwrap(),
            Plan::Blank
        );
        assert!(
            plan_for(&req(
                SourceSpec::Registry("docker://x/y".into()),
                ContentType::Archive,
                dir
            ))
            .is_err()
        );
    }

    #[test]
    fn file_size_uses_upstream_usable_space() {
        // Plenty of room: the requested size minus nothing (usable of requested, 1 MiB aligned).
        assert_eq!(
            file_target_size(Some(1 << 30), 100 << 30, 0.0),
            Some(1 << 30)
        );
        // With overhead the usable part of the request is smaller.
        assert_eq!(
            file_target_size(Some(1 << 30), 100 << 30, 0.06),
            Some(966 << 20)
        );
        // Less free space than requested: bounded by what is free.
        assert_eq!(
            file_target_size(Some(1 << 30), 512 << 20, 0.0),
            Some(512 << 20)
        );
        assert_eq!(file_target_size(None, 1 << 30, 0.06), None);
    }
}
