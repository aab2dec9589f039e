//! Content type `archive`: a (possibly compressed) tar extracted into the data directory.
//!
//! The archive is untrusted. Entries with absolute paths or `..` components, links whose
//! target leaves the directory, paths that would pass through a symlink leading outside, and
//! device nodes or FIFOs are refused: the whole import fails and nothing outside the data
//! directory is ever touched. Permissions are kept (minus set-id bits), ownership is not
//! (upstream: `tar --preserve-permissions --no-same-owner`).

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use crate::decompress;
use crate::error::{ErrorKind, ImportError, Result};

/// Most entries we extract: a guard against archives of millions of empty files exhausting
/// inodes; real data-volume archives hold far fewer.
pub const MAX_ARCHIVE_ENTRIES: u64 = 1_000_000;

/// What an extraction produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchiveReport {
    /// Regular files written.
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Links created.
    pub links: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

fn unsafe_entry(msg: String) -> ImportError {
    ImportError::new(ErrorKind::UnsafeArchive, msg)
}

/// A relative path made only of normal components, or an error naming the entry.
pub fn clean_relative(path: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(unsafe_entry(format!(
                    "archive entry {} contains '..'",
                    path.display()
                )));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_entry(format!(
                    "archive entry {} is an absolute path",
                    path.display()
                )));
            }
        }
    }
    Ok(out)
}

/// Where a symlink at `link` (relative to the root) pointing to `target` lands, relative to
/// the root; `None` when it leaves the root.
pub fn resolve_link(link: &Path, target: &Path) -> Option<PathBuf> {
    if target.has_root() {
        return None;
    }
    let mut stack: Vec<std::ffi::OsString> = link
        .parent()
        .map(|p| {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(n) => Some(n.to_os_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for c in target.components() {
        match c {
            Component::Normal(n) => stack.push(n.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => {
                stack.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(stack.iter().collect())
}

/// Create (or check) the directories leading to `rel` under `root` without ever following a
/// symlink out of `root`; returns the absolute parent.
fn safe_parent(root: &Path, rel: &Path) -> Result<PathBuf> {
    let mut cur = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    let real = fs::canonicalize(&cur)
                        .map_err(|e| ImportError::io(format!("resolving {}", cur.display()), e))?;
                    if !real.starts_with(root) {
                        return Err(unsafe_entry(format!(
                            "archive entry {} passes through a link leaving the data directory",
                            rel.display()
                        )));
                    }
                    cur = real;
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(unsafe_entry(format!(
                        "archive entry {} needs {} to be a directory",
                        rel.display(),
                        cur.display()
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&cur)
                        .map_err(|e| ImportError::io(format!("creating {}", cur.display()), e))?;
                }
                Err(e) => return Err(ImportError::io(format!("checking {}", cur.display()), e)),
            }
        }
    }
    Ok(cur)
}

/// Extract the tar stream `input` (gzip/zstd/xz/bzip2 or plain) into `dir`.
pub fn extract(input: &mut dyn Read, dir: &Path) -> Result<ArchiveReport> {
    let root = fs::canonicalize(dir)
        .map_err(|e| ImportError::io(format!("opening {}", dir.display()), e))?;
    let (_, reader) =
        decompress::unwrap(input).map_err(|e| ImportError::io("reading the archive", e))?;
    let mut archive = tar::Archive::new(reader);
    let mut report = ArchiveReport::default();
    let entries = archive.entries().map_err(|e| bad_tar(&e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad_tar(&e))?;
        if report.files + report.dirs + report.links >= MAX_ARCHIVE_ENTRIES {
            return Err(ImportError::new(
                ErrorKind::Image,
                format!("archive has more than {MAX_ARCHIVE_ENTRIES} entries"),
            ));
        }
        let raw_path = entry.path().map_err(|e| bad_tar(&e))?.into_owned();
        let rel = clean_relative(&raw_path)?;
        if rel.as_os_str().is_empty() {
            continue; // "./" itself
        }
        let kind = entry.header().entry_type();
        match kind {
            EntryType::Directory => {
                let parent = safe_parent(&root, &rel)?;
                let path = parent.join(rel.file_name().unwrap_or_default());
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        return Err(unsafe_entry(format!(
                            "archive directory {} replaces a file or link",
                            rel.display()
                        )));
                    }
                    Err(_) => fs::create_dir(&path)
                        .map_err(|e| ImportError::io(format!("creating {}", path.display()), e))?,
                }
                if let Ok(mode) = entry.header().mode() {
                    let _ = fs::set_permissions(
                        &path,
                        fs::Permissions::from_mode((mode & 0o777) | 0o700),
                    );
                }
                report.dirs += 1;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let parent = safe_parent(&root, &rel)?;
                let path = parent.join(rel.file_name().unwrap_or_default());
                remove_non_dir(&path)?;
                let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode | 0o200)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(|e| ImportError::io(format!("creating {}", path.display()), e))?;
                report.bytes +=
                    io::copy(&mut entry, &mut file).map_err(|e| copy_error(&path, e))?;
                file.sync_all()
                    .map_err(|e| ImportError::io(format!("syncing {}", path.display()), e))?;
                let _ = fs::set_permissions(&path, fs::Permissions::from_mode(mode));
                report.files += 1;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad_tar(&e))?
                    .unwrap_or_default()
                    .into_owned();
                if resolve_link(&rel, &target).is_none() {
                    return Err(unsafe_entry(format!(
                        "archive link {} -> {} leaves the data directory",
                        rel.display(),
                        target.display()
                    )));
                }
                let parent = safe_parent(&root, &rel)?;
                let path = parent.join(rel.file_name().unwrap_or_default());
                remove_non_dir(&path)?;
                std::os::unix::fs::symlink(&target, &path)
                    .map_err(|e| ImportError::io(format!("creating link {}", path.display()), e))?;
                report.links += 1;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad_tar(&e))?
                    .unwrap_or_default()
                    .into_owned();
                let target_rel = clean_relative(&target)?;
                let parent = safe_parent(&root, &rel)?;
                let path = parent.join(rel.file_name().unwrap_or_default());
                let source = safe_parent(&root, &target_rel)?
                    .join(target_rel.file_name().unwrap_or_default());
                let meta = fs::symlink_metadata(&source).map_err(|e| {
                    ImportError::io(format!("hard link target {}", target.display()), e)
                })?;
                if !meta.is_file() {
                    return Err(unsafe_entry(format!(
                        "archive hard link {} does not point to a regular file",
                        rel.display()
                    )));
                }
                remove_non_dir(&path)?;
                fs::hard_link(&source, &path).map_err(|e| {
                    ImportError::io(format!("creating hard link {}", path.display()), e)
                })?;
                report.links += 1;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                return Err(unsafe_entry(format!(
                    "archive entry {} is a device node or FIFO, which is not allowed",
                    rel.display()
                )));
            }
            // pax/GNU metadata entries are consumed by the tar crate; anything else is skipped.
            _ => {}
        }
    }
    Ok(report)
}

fn remove_non_dir(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(unsafe_entry(format!(
            "archive entry {} replaces a directory",
            path.display()
        ))),
        Ok(_) => fs::remove_file(path)
            .map_err(|e| ImportError::io(format!("replacing {}", path.display()), e)),
        Err(_) => Ok(()),
    }
}

fn bad_tar(e: &io::Error) -> ImportError {
    // Transfer failures travel as io errors; the caller prefers the transfer's own error.
    ImportError::new(ErrorKind::Image, format!("reading the tar archive: {e}"))
}

fn copy_error(path: &Path, e: io::Error) -> ImportError {
    if e.raw_os_error().is_some() {
        ImportError::io(format!("writing {}", path.display()), e)
    } else {
        bad_tar(&e)
    }
}

/// Remove everything inside `dir` (after a checksum mismatch or a failed extraction).
pub fn clear_dir(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    /// Write a raw name into the header, bypassing the tar crate's own path checks, the way
    /// a hostile archive would.
    fn raw_name(h: &mut tar::Header, name: &str) {
        let bytes = &mut h.as_old_mut().name;
        bytes.fill(0);
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
    }

    fn extract_bytes(data: &[u8]) -> (tempfile::TempDir, Result<ArchiveReport>) {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        fs::create_dir(&data_dir).unwrap();
        let r = extract(&mut &data[..], &data_dir);
        (dir, r)
    }

    #[test]
    fn extracts_files_dirs_and_inside_links() {
        let data = tar_with(|b| {
            let mut h = header(EntryType::Directory, 0);
            b.append_data(&mut h, "sub/", &[][..]).unwrap();
            let mut h = header(EntryType::Regular, 5);
            b.append_data(&mut h, "sub/a.txt", &b"hello"[..]).unwrap();
            let mut h = header(EntryType::Symlink, 0);
            b.append_link(&mut h, "link", "sub/a.txt").unwrap();
        });
        let (dir, r) = extract_bytes(&data);
        let r = r.unwrap();
        assert_eq!((r.files, r.dirs, r.links, r.bytes), (1, 1, 1, 5));
        assert_eq!(fs::read(dir.path().join("data/link")).unwrap(), b"hello");
    }

    #[test]
    fn refuses_parent_components() {
        let data = tar_with(|b| {
            let mut h = header(EntryType::Regular, 1);
            raw_name(&mut h, "../escape.txt");
            b.append(&h, &b"x"[..]).unwrap();
        });
        let (dir, r) = extract_bytes(&data);
        assert_eq!(r.unwrap_err().kind(), ErrorKind::UnsafeArchive);
        assert!(!dir.path().join("escape.txt").exists());
    }

    #[test]
    fn refuses_absolute_paths() {
        let data = tar_with(|b| {
            let mut h = header(EntryType::Regular, 1);
            raw_name(&mut h, "/tmp/cdi-absolute-escape");
            b.append(&h, &b"x"[..]).unwrap();
        });
        let (_dir, r) = extract_bytes(&data);
        assert_eq!(r.unwrap_err().kind(), ErrorKind::UnsafeArchive);
    }

    #[test]
    fn refuses_links_out_and_writes_through_them() {
        let data = tar_with(|b| {
            let mut h = header(EntryType::Symlink, 0);
            b.append_link(&mut h, "out", "../../").unwrap();
        });
        let (_dir, r) = extract_bytes(&data);
        assert_eq!(r.unwrap_err().kind(), ErrorKind::UnsafeArchive);

        let data = tar_with(|b| {
            let mut h = header(EntryType::Symlink, 0);
            b.append_link(&mut h, "abs", "/etc").unwrap();
        });
        let (_dir, r) = extract_bytes(&data);
        assert_eq!(r.unwrap_err().kind(), ErrorKind::UnsafeArchive);
    }

    #[test]
    fn refuses_device_nodes() {
        let data = tar_with(|b| {
            let mut h = header(EntryType::Char, 0);
            b.append_data(&mut h, "dev-null", &[][..]).unwrap();
        });
        let (_dir, r) = extract_bytes(&data);
        let err = r.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnsafeArchive);
        assert!(err.to_string().contains("device node"), "{err}");
    }

    #[test]
    fn link_resolution() {
        assert_eq!(
            resolve_link(Path::new("a/b"), Path::new("../c")),
            Some(PathBuf::from("c"))
        );
        assert_eq!(resolve_link(Path::new("a"), Path::new("../c")), None);
        assert_eq!(resolve_link(Path::new("a"), Path::new("/c")), None);
        assert!(clean_relative(Path::new("./x/./y")).is_ok());
    }
}
