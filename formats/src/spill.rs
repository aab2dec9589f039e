//! A holding area for bytes that streamed past before anyone knew they were needed.
//!
//! Stream converters (qcow2, streamOptimized vmdk) read an image once, front to back. Data can
//! arrive before the table that maps it; such bytes wait here, keyed by their offset in the
//! image file ("host offset"), until a table claims them or the converter knows nobody will.
//!
//! ```text
//!   insert(key, bytes) ──► memory (while the budget lasts) ──► scratch file (append-only)
//!   get(key) / remove(key) / remove_below(bound) ◄── index: key → memory | (file offset, len)
//! ```
//!
//! API contract:
//! - [`Spill::new`] takes the memory budget in bytes and an optional scratch directory.
//! - [`Spill::insert`] stores a copy of `bytes` under `key` (keys are unique; inserting an
//!   existing key is an error). Entries stay in memory while the total fits the budget; later
//!   ones are appended to one scratch file, created lazily in the scratch directory under a
//!   unique name and unlinked at once, so it disappears when the spill is dropped or the process
//!   dies. With no scratch directory, exceeding the budget is an
//!   [`ErrorKind::ScratchSpaceRequired`] error whose message starts "scratch space required: ".
//! - [`Spill::get`] copies an entry out; [`Spill::remove`] takes it out and frees its memory
//!   (file space is not reused: the file only grows, bounded by the image size);
//!   [`Spill::discard`] drops one entry unread; [`Spill::remove_below`] drops every entry whose
//!   key is below a bound.
//! - [`Spill::scratch_bytes`] counts bytes written to the scratch file; callers add it to
//!   [`crate::image::StreamContext::scratch_bytes`].
//!
//! Memory use: the entries kept in memory (at most the budget, plus one entry that is being
//! moved) plus about 48 bytes of index per entry.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, ErrorKind, Result};

/// Attempts at finding an unused scratch file name before giving up. Names combine the process
/// id, a counter and the clock, so a collision means a stale file from an earlier process with
/// the same id; a handful of retries skips those.
const SCRATCH_NAME_ATTEMPTS: u32 = 16;

/// Distinguishes scratch files created by one process.
static SCRATCH_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Where one entry's bytes live.
#[derive(Debug)]
enum Slot {
    /// Held in memory.
    Memory(Vec<u8>),
    /// Appended to the scratch file at `offset`.
    File { offset: u64, len: usize },
}

/// Bytes keyed by host offset, in memory up to a budget and then in a scratch file.
#[derive(Debug)]
pub struct Spill {
    budget: usize,
    scratch_dir: Option<PathBuf>,
    index: BTreeMap<u64, Slot>,
    memory_bytes: usize,
    file: Option<File>,
    file_len: u64,
    scratch_bytes: u64,
}

impl Spill {
    /// An empty spill holding up to `memory_budget` bytes in memory, then writing to a file in
    /// `scratch_dir` (or failing with `ScratchSpaceRequired` when there is none).
    pub fn new(memory_budget: usize, scratch_dir: Option<PathBuf>) -> Self {
        Spill {
            budget: memory_budget,
            scratch_dir,
            index: BTreeMap::new(),
            memory_bytes: 0,
            file: None,
            file_len: 0,
            scratch_bytes: 0,
        }
    }

    /// Store a copy of `bytes` under `key`. `what` names the bytes for the error message when
    /// scratch space is needed but missing ("qcow2 cluster at 0x30000").
    pub fn insert(&mut self, key: u64, bytes: &[u8], what: &dyn std::fmt::Display) -> Result<()> {
        if self.index.contains_key(&key) {
            return Err(Error::corrupt(format!(
                "{what}: stored twice (key {key:#x})"
            )));
        }
        let fits = self
            .memory_bytes
            .checked_add(bytes.len())
            .is_some_and(|t| t <= self.budget);
        let slot = if fits {
            self.memory_bytes += bytes.len();
            Slot::Memory(bytes.to_vec())
        } else {
            self.append_to_file(bytes, what)?
        };
        self.index.insert(key, slot);
        Ok(())
    }

    /// True when an entry is stored under `key`.
    pub fn contains(&self, key: u64) -> bool {
        self.index.contains_key(&key)
    }

    /// A copy of the entry under `key`, if any.
    pub fn get(&self, key: u64) -> Result<Option<Vec<u8>>> {
        match self.index.get(&key) {
            None => Ok(None),
            Some(Slot::Memory(bytes)) => Ok(Some(bytes.clone())),
            Some(Slot::File { offset, len }) => self.read_file(*offset, *len).map(Some),
        }
    }

    /// Take the entry under `key` out of the spill.
    pub fn remove(&mut self, key: u64) -> Result<Option<Vec<u8>>> {
        match self.index.remove(&key) {
            None => Ok(None),
            Some(Slot::Memory(bytes)) => {
                self.memory_bytes -= bytes.len();
                Ok(Some(bytes))
            }
            Some(Slot::File { offset, len }) => self.read_file(offset, len).map(Some),
        }
    }

    /// Drop the entry under `key` without reading it back; true if there was one.
    pub fn discard(&mut self, key: u64) -> bool {
        match self.index.remove(&key) {
            None => false,
            Some(Slot::Memory(bytes)) => {
                self.memory_bytes -= bytes.len();
                true
            }
            Some(Slot::File { .. }) => true,
        }
    }

    /// Drop every entry whose key is below `bound`.
    pub fn remove_below(&mut self, bound: u64) {
        let kept = self.index.split_off(&bound);
        let dropped = std::mem::replace(&mut self.index, kept);
        for slot in dropped.into_values() {
            if let Slot::Memory(bytes) = slot {
                self.memory_bytes -= bytes.len();
            }
        }
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes currently held in memory.
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }

    /// Bytes written to the scratch file so far.
    pub fn scratch_bytes(&self) -> u64 {
        self.scratch_bytes
    }

    fn append_to_file(&mut self, bytes: &[u8], what: &dyn std::fmt::Display) -> Result<Slot> {
        if self.file.is_none() {
            let Some(dir) = self.scratch_dir.as_deref() else {
                return Err(Error::new(
                    ErrorKind::ScratchSpaceRequired,
                    format!(
                        "scratch space required: {what} arrived before the table mapping it \
                         and the memory budget of {} bytes is used up",
                        self.budget
                    ),
                ));
            };
            self.file = Some(create_scratch_file(dir)?);
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| Error::corrupt("scratch file vanished"))?;
        let offset = self.file_len;
        file.write_all(bytes)
            .map_err(|e| Error::io("writing scratch file", e))?;
        let len64 = bytes.len() as u64;
        self.file_len += len64;
        self.scratch_bytes += len64;
        Ok(Slot::File {
            offset,
            len: bytes.len(),
        })
    }

    fn read_file(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| Error::corrupt("scratch file missing"))?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| Error::io("reading scratch file", e))?;
        Ok(buf)
    }
}

/// Create a uniquely named file in `dir` and unlink it at once: the open handle keeps it alive,
/// and nothing is left behind when the handle closes, however the process ends.
fn create_scratch_file(dir: &Path) -> Result<File> {
    let pid = std::process::id();
    for _ in 0..SCRATCH_NAME_ATTEMPTS {
        let n = SCRATCH_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = dir.join(format!(".cdi-spill-{pid}-{n}-{nanos:08x}"));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => {
                std::fs::remove_file(&path)
                    .map_err(|e| Error::io(format!("unlinking {}", path.display()), e))?;
                return Ok(file);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Error::io(
                    format!("creating scratch file in {}", dir.display()),
                    e,
                ));
            }
        }
    }
    Err(Error::new(
        ErrorKind::Io,
        format!(
            "could not find an unused scratch file name in {}",
            dir.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn what() -> &'static str {
        "test bytes"
    }

    #[test]
    fn entries_within_budget_stay_in_memory() {
        let mut spill = Spill::new(1024, None);
        spill.insert(0x1000, &[7u8; 512], &what()).unwrap();
        assert_eq!(spill.get(0x1000).unwrap(), Some(vec![7u8; 512]));
        assert_eq!(spill.memory_bytes(), 512);
        assert_eq!(spill.scratch_bytes(), 0);
    }

    #[test]
    fn over_budget_without_scratch_dir_is_scratch_space_required() {
        let mut spill = Spill::new(100, None);
        let err = spill.insert(0, &[1u8; 200], &what()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ScratchSpaceRequired);
        assert!(
            err.message()
                .starts_with("scratch space required: test bytes"),
            "{err}"
        );
    }

    #[test]
    fn over_budget_goes_to_scratch_file_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(100, Some(dir.path().to_path_buf()));
        spill.insert(10, &[1u8; 60], &what()).unwrap();
        spill.insert(20, &[2u8; 60], &what()).unwrap();
        spill.insert(30, &[3u8; 70], &what()).unwrap();
        assert_eq!(spill.scratch_bytes(), 130);
        assert_eq!(spill.remove(20).unwrap(), Some(vec![2u8; 60]));
        assert_eq!(spill.get(30).unwrap(), Some(vec![3u8; 70]));
        assert_eq!(spill.get(10).unwrap(), Some(vec![1u8; 60]));
        assert_eq!(spill.len(), 2);
    }

    #[test]
    fn scratch_file_leaves_no_name_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(0, Some(dir.path().to_path_buf()));
        spill.insert(1, b"abc", &what()).unwrap();
        let names = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(names, 0);
        assert_eq!(spill.get(1).unwrap(), Some(b"abc".to_vec()));
    }

    #[test]
    fn remove_below_drops_lower_keys_and_frees_memory() {
        let mut spill = Spill::new(1 << 20, None);
        for key in [1u64, 5, 9] {
            spill.insert(key, &[0u8; 10], &what()).unwrap();
        }
        spill.remove_below(6);
        assert!(!spill.contains(1));
        assert!(!spill.contains(5));
        assert!(spill.contains(9));
        assert_eq!(spill.memory_bytes(), 10);
    }

    #[test]
    fn discard_drops_an_entry_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(4, Some(dir.path().to_path_buf()));
        spill.insert(1, b"ab", &what()).unwrap();
        spill.insert(2, b"cdef", &what()).unwrap();
        assert!(spill.discard(1));
        assert!(spill.discard(2));
        assert!(!spill.discard(2));
        assert!(spill.is_empty());
        assert_eq!(spill.memory_bytes(), 0);
    }

    #[test]
    fn duplicate_key_is_refused() {
        let mut spill = Spill::new(1 << 20, None);
        spill.insert(4, b"x", &what()).unwrap();
        let err = spill.insert(4, b"y", &what()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }
}
