//! Random access to a qcow2 image: guest offset → L1 → L2 → host bytes, with a small L2 cache,
//! inflated compressed clusters and an optional backing chain.
//!
//! Unlike qemu-img, which reads zeroes past the end of the file, every table and data cluster
//! must lie inside the file ([`ReadAt::size`]); the one exception is the last sector of a
//! compressed cluster, which QEMU itself leaves short at the end of the file.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::compressed::{self, DecodeError};
use super::header::{self, Header};
use super::table::{self, Cluster};
use crate::detect::ImageFormat;
use crate::error::{Error, ErrorKind, Result};
use crate::image::{BackingPolicy, DiskImage, Extent, ExtentKind, OpenOptions};
use crate::limits;
use crate::read_at::ReadAt;

/// L2 tables kept decoded in memory. Sequential conversion touches one table at a time; a few
/// more absorb the back-and-forth of random reads. 16 tables are at most 32 MiB with 2 MiB
/// clusters and 1 MiB with the default 64 KiB.
const L2_CACHE_TABLES: usize = 16;

/// What backs a guest range that shares one granule (cluster or subcluster).
#[derive(Debug, Clone, Copy)]
enum Piece {
    /// Stored bytes at this host offset (for the start of the requested range).
    Data(u64),
    /// Inside the compressed cluster starting at guest offset `cluster`.
    Compressed { host: u64, len: u64, cluster: u64 },
    /// Reads as zeroes.
    Zero,
    /// Not allocated here: the backing file, or zeroes without one.
    Unallocated,
}

/// An open qcow2 image.
pub(crate) struct Qcow2Disk {
    src: Arc<dyn ReadAt>,
    file_size: u64,
    h: Header,
    /// Host offsets of the L2 tables for the L1 entries the virtual size needs (0: none).
    l1: Vec<u64>,
    /// Most recently used first.
    cache: Vec<(u64, Vec<u8>)>,
    /// The last inflated compressed cluster, keyed by its host offset.
    inflated: Option<(u64, Vec<u8>)>,
    backing: Option<Box<dyn DiskImage>>,
}

impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("virtual_size", &self.h.virtual_size)
            .field("cluster_size", &self.h.cluster_size())
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

/// Open `src` as qcow2; `depth` counts the images above it in a backing chain.
pub(crate) fn open(
    src: Arc<dyn ReadAt>,
    opts: &OpenOptions,
    depth: usize,
) -> Result<Box<dyn DiskImage>> {
    let file_size = src
        .size()
        .map_err(|e| Error::io("reading qcow2 image size", e))?;
    let head = read_first_cluster(&*src, file_size)?;
    let h = header::parse(&head)?;
    let backing = match &h.backing_file {
        None => None,
        Some(name) => Some(open_backing(&h, name, &opts.backing, depth)?),
    };
    check_inside(&h, file_size)?;
    check_refblocks(&*src, &h, file_size)?;
    let l1 = read_l1(&*src, &h, file_size)?;
    Ok(Box::new(Qcow2Disk {
        src,
        file_size,
        h,
        l1,
        cache: Vec::new(),
        inflated: None,
        backing,
    }))
}

fn read_first_cluster(src: &dyn ReadAt, file_size: u64) -> Result<Vec<u8>> {
    let mut probe = vec![0u8; file_size.min(512) as usize];
    src.read_exact_at(&mut probe, 0)
        .map_err(|e| Error::io("reading qcow2 header", e))?;
    let cs = header::cluster_size_hint(&probe)?;
    let mut head = vec![0u8; file_size.min(cs) as usize];
    src.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io("reading qcow2 header", e))?;
    Ok(head)
}

fn check_inside(h: &Header, file_size: u64) -> Result<()> {
    if h.l1_size > 0 && h.l1_end() > file_size {
        return Err(Error::corrupt(format!(
            "qcow2 l1 table at {:#x} ({} bytes) is outside the file (size {file_size})",
            h.l1_offset,
            h.l1_size * 8
        )));
    }
    if h.refcount_table_bytes > 0 && h.refcount_table_end() > file_size {
        return Err(Error::corrupt(format!(
            "qcow2 refcount table at {:#x} ({} bytes) is outside the file (size {file_size})",
            h.refcount_table_offset, h.refcount_table_bytes
        )));
    }
    Ok(())
}

/// Every refcount block the refcount table names must lie inside the file (else the file was
/// cut short). Bounded: the table is at most [`limits::QCOW2_MAX_REFCOUNT_TABLE_BYTES`].
fn check_refblocks(src: &dyn ReadAt, h: &Header, file_size: u64) -> Result<()> {
    let mut raw = vec![0u8; h.refcount_table_bytes as usize];
    src.read_exact_at(&mut raw, h.refcount_table_offset)
        .map_err(|e| {
            Error::io(
                format!(
                    "reading qcow2 refcount table at {:#x}",
                    h.refcount_table_offset
                ),
                e,
            )
        })?;
    for i in 0..raw.len() / 8 {
        if let Some(block) = table::refblock(h, table::word(&raw, i))
            && block + h.cluster_size() > file_size
        {
            return Err(Error::corrupt(format!(
                "qcow2 refcount block at {block:#x} is outside the file (size {file_size})"
            )));
        }
    }
    Ok(())
}

fn read_l1(src: &dyn ReadAt, h: &Header, file_size: u64) -> Result<Vec<u64>> {
    let needed = h.l1_needed();
    // Bounded: needed ≤ l1_size ≤ QCOW2_MAX_L1_BYTES / 8 (checked by header::parse).
    let mut raw = vec![0u8; (needed * 8) as usize];
    src.read_exact_at(&mut raw, h.l1_offset)
        .map_err(|e| Error::io(format!("reading qcow2 l1 table at {:#x}", h.l1_offset), e))?;
    let mut l1 = Vec::with_capacity(needed as usize);
    for i in 0..needed as usize {
        let l2 = table::l1_entry(h, table::word(&raw, i), i as u64)?.unwrap_or(0);
        if l2 != 0 && l2 + h.cluster_size() > file_size {
            return Err(Error::corrupt(format!(
                "qcow2 l2 table at {l2:#x} (l1 entry {i}) is outside the file (size {file_size})"
            )));
        }
        l1.push(l2);
    }
    Ok(l1)
}

/// Resolve and open the backing file the policy allows, or refuse it.
fn open_backing(
    h: &Header,
    name: &str,
    policy: &BackingPolicy,
    depth: usize,
) -> Result<Box<dyn DiskImage>> {
    let dir = match policy {
        BackingPolicy::Deny => {
            return Err(Error::unsupported(format!(
                "qcow2 image has a backing file ({name:?}); backing files are refused"
            )));
        }
        BackingPolicy::AllowRelativeTo(dir) => dir,
    };
    if depth + 1 > limits::MAX_BACKING_CHAIN_DEPTH {
        return Err(Error::limit(format!(
            "qcow2 backing chain is deeper than {} images",
            limits::MAX_BACKING_CHAIN_DEPTH
        )));
    }
    let path = backing_path(dir, name)?;
    let file = std::fs::File::open(&path)
        .map_err(|e| Error::io(format!("opening backing file {}", path.display()), e))?;
    let src: Arc<dyn ReadAt> = Arc::new(file);
    let is_qcow2 = match h.backing_format.as_deref() {
        Some("qcow2") => true,
        Some("raw") => false,
        Some(other) => {
            return Err(Error::unsupported(format!(
                "qcow2 backing file format {other:?} is not supported (only qcow2 and raw)"
            )));
        }
        None => has_qcow2_magic(&*src)?,
    };
    if !is_qcow2 {
        return Ok(Box::new(RawBacking::new(src)?));
    }
    // The backing file's own backing file is resolved next to it, still inside `dir`.
    let next_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.clone());
    let opts = OpenOptions {
        backing: BackingPolicy::AllowRelativeTo(next_dir),
    };
    open(src, &opts, depth + 1).map_err(|e| e.context(format!("backing file {name:?}")))
}

/// `dir/name`, refusing absolute names and `..` so a hostile image cannot name arbitrary files.
fn backing_path(dir: &Path, name: &str) -> Result<PathBuf> {
    let rel = Path::new(name);
    let escapes = rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if name.is_empty() || escapes {
        return Err(Error::unsupported(format!(
            "qcow2 backing file name {name:?} is not a plain relative path"
        )));
    }
    Ok(dir.join(rel))
}

fn has_qcow2_magic(src: &dyn ReadAt) -> Result<bool> {
    let size = src
        .size()
        .map_err(|e| Error::io("reading backing file size", e))?;
    if size < 4 {
        return Ok(false);
    }
    let mut magic = [0u8; 4];
    src.read_exact_at(&mut magic, 0)
        .map_err(|e| Error::io("reading backing file", e))?;
    Ok(magic == header::MAGIC)
}

impl Qcow2Disk {
    /// Make the L2 table at `host` the first cache entry.
    fn load_l2(&mut self, host: u64) -> Result<()> {
        if let Some(pos) = self.cache.iter().position(|(off, _)| *off == host) {
            let hit = self.cache.remove(pos);
            self.cache.insert(0, hit);
        } else {
            let mut buf = vec![0u8; self.h.cluster_size() as usize];
            self.src
                .read_exact_at(&mut buf, host)
                .map_err(|e| Error::io(format!("reading qcow2 l2 table at {host:#x}"), e))?;
            self.cache.truncate(L2_CACHE_TABLES - 1);
            self.cache.insert(0, (host, buf));
        }
        Ok(())
    }

    /// What backs guest `offset`, and where that granule ends (clipped to the virtual size).
    fn locate(&mut self, offset: u64) -> Result<(Piece, u64)> {
        let (span, cs, vsize) = (self.h.l2_span(), self.h.cluster_size(), self.h.virtual_size);
        let l1_index = (offset / span) as usize;
        let l2_host = self.l1[l1_index];
        if l2_host == 0 {
            return Ok((
                Piece::Unallocated,
                ((l1_index as u64 + 1) * span).min(vsize),
            ));
        }
        let cluster = offset - offset % cs;
        let index = (offset % span) / cs;
        self.load_l2(l2_host)?;
        let entry = table::l2_at(&self.h, &self.cache[0].1, index, cluster)?;
        match entry {
            Cluster::Compressed { host, len } => {
                if host >= self.file_size {
                    return Err(Error::corrupt(format!(
                        "qcow2 compressed cluster at {host:#x} for guest offset {cluster:#x} is \
                         outside the file (size {})",
                        self.file_size
                    )));
                }
                Ok((
                    Piece::Compressed { host, len, cluster },
                    (cluster + cs).min(vsize),
                ))
            }
            Cluster::Standard { host, alloc, zero } => {
                let sub = self.h.subcluster_size();
                let i = ((offset - cluster) / sub) as u32;
                let start = cluster + u64::from(i) * sub;
                let end = (start + sub).min(vsize);
                let piece = if alloc & (1 << i) != 0 {
                    self.check_data(host + (start - cluster), end - start, start)?;
                    Piece::Data(host + (offset - cluster))
                } else if zero & (1 << i) != 0 {
                    Piece::Zero
                } else {
                    Piece::Unallocated
                };
                Ok((piece, end))
            }
        }
    }

    fn check_data(&self, host: u64, len: u64, guest: u64) -> Result<()> {
        if host.checked_add(len).is_none_or(|end| end > self.file_size) {
            return Err(Error::corrupt(format!(
                "qcow2 data cluster at {host:#x} for guest offset {guest:#x} is outside the file \
                 (size {})",
                self.file_size
            )));
        }
        Ok(())
    }

    /// Inflate the compressed cluster at `host` into the one-cluster cache.
    fn inflate(&mut self, host: u64, len: u64) -> Result<&[u8]> {
        if self.inflated.as_ref().is_none_or(|(off, _)| *off != host) {
            let end = (host + len).min(self.file_size);
            let mut packed = vec![0u8; (end - host) as usize];
            self.src.read_exact_at(&mut packed, host).map_err(|e| {
                Error::io(format!("reading qcow2 compressed cluster at {host:#x}"), e)
            })?;
            let mut out = vec![0u8; self.h.cluster_size() as usize];
            compressed::decode(self.h.compression, &packed, &mut out)
                .map_err(|e| decode_error(e, host))?;
            self.inflated = Some((host, out));
        }
        Ok(self
            .inflated
            .as_ref()
            .map(|(_, buf)| buf.as_slice())
            .unwrap_or_default())
    }

    fn backing_extent(&mut self, offset: u64, len: u64) -> Result<Extent> {
        let Some(backing) = self.backing.as_mut() else {
            return Ok(Extent {
                len,
                kind: ExtentKind::Zero,
            });
        };
        let bsize = backing.virtual_size();
        if offset >= bsize {
            return Ok(Extent {
                len,
                kind: ExtentKind::Zero,
            });
        }
        let ext = backing.extent(offset, len.min(bsize - offset))?;
        if ext.len == 0 {
            return Ok(Extent {
                len,
                kind: ExtentKind::Zero,
            });
        }
        Ok(Extent {
            len: ext.len.min(len),
            kind: ext.kind,
        })
    }

    fn read_backing(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(backing) = self.backing.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = backing.virtual_size();
        let inside = bsize.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        if !head.is_empty() {
            backing.read_exact_at(head, offset)?;
        }
        tail.fill(0);
        Ok(())
    }
}

/// Map a decode failure to an error naming the cluster.
pub(crate) fn decode_error(err: DecodeError, host: u64) -> Error {
    match err {
        DecodeError::ShortInput => Error::corrupt(format!(
            "qcow2 compressed cluster at {host:#x} ends before its data is complete"
        )),
        DecodeError::Invalid(why) => {
            Error::corrupt(format!("qcow2 compressed cluster at {host:#x}: {why}"))
        }
    }
}

impl DiskImage for Qcow2Disk {
    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.h.virtual_size
    }

    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent> {
        let vsize = self.h.virtual_size;
        if offset >= vsize || max_len == 0 {
            return Ok(Extent {
                len: 0,
                kind: ExtentKind::Data,
            });
        }
        let limit = offset + max_len.min(vsize - offset);
        let mut pos = offset;
        let mut kind = None;
        while pos < limit {
            let (piece, end) = self.locate(pos)?;
            let end = end.min(limit);
            let (k, stop) = match piece {
                Piece::Data(_) | Piece::Compressed { .. } => (ExtentKind::Data, end),
                Piece::Zero => (ExtentKind::Zero, end),
                Piece::Unallocated => {
                    let ext = self.backing_extent(pos, end - pos)?;
                    (ext.kind, pos + ext.len)
                }
            };
            if kind.is_some_and(|prev| prev != k) {
                break;
            }
            kind = Some(k);
            pos = stop;
        }
        Ok(Extent {
            len: pos - offset,
            kind: kind.unwrap_or(ExtentKind::Zero),
        })
    }

    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let vsize = self.h.virtual_size;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > vsize)
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "read of {} bytes at {offset:#x} is beyond the disk end {vsize}",
                    buf.len()
                ),
            ));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (piece, end) = self.locate(pos)?;
            let mut n = ((end - pos) as usize).min(buf.len() - done);
            if let Piece::Data(host) = piece {
                // Clusters that follow each other in the file too go out in one read: a
                // QEMU-written image mostly stores guest order, so a 1 MiB request is one
                // syscall instead of one per cluster.
                while done + n < buf.len() {
                    let next = pos + n as u64;
                    match self.locate(next)? {
                        (Piece::Data(h), e) if h == host + n as u64 => {
                            n += ((e - next) as usize).min(buf.len() - done - n);
                        }
                        _ => break,
                    }
                }
            }
            let out = &mut buf[done..done + n];
            match piece {
                Piece::Data(host) => self.src.read_exact_at(out, host).map_err(|e| {
                    Error::io(format!("reading qcow2 data cluster at {host:#x}"), e)
                })?,
                Piece::Compressed { host, len, cluster } => {
                    let at = (pos - cluster) as usize;
                    out.copy_from_slice(&self.inflate(host, len)?[at..at + n]);
                }
                Piece::Zero => out.fill(0),
                Piece::Unallocated => self.read_backing(out, pos)?,
            }
            done += n;
        }
        Ok(())
    }
}

/// A raw backing file: every byte is data.
#[derive(Clone)]
struct RawBacking {
    src: Arc<dyn ReadAt>,
    size: u64,
}

impl std::fmt::Debug for RawBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawBacking")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl RawBacking {
    fn new(src: Arc<dyn ReadAt>) -> Result<Self> {
        let size = src
            .size()
            .map_err(|e| Error::io("reading backing file size", e))?;
        Ok(RawBacking { src, size })
    }
}

impl DiskImage for RawBacking {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent> {
        Ok(Extent {
            len: max_len.min(self.size.saturating_sub(offset)),
            kind: ExtentKind::Data,
        })
    }

    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.src
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(format!("reading raw backing file at {offset:#x}"), e))
    }
}
