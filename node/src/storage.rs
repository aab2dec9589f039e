//! Host-level storage primitives of the built-in storage classes: the one home of the on-disk
//! layout and of loop-device handling (what a CSI driver's node plugin does on a cluster).
//!
//! Every claim's storage lives in `<data-root>/volumes/<claim uid>/`:
//!
//! * `local` (Filesystem): the directory itself is the volume (upstream's `/data`);
//! * `local-block` (Block): `block.img`, a preallocated file, attached to a loop device, and
//!   `dev`, a symlink to that device. The symlink is the stable path a PersistentVolume
//!   records (`spec.local.path` is immutable), so a re-attach after a reboot only moves the
//!   link.
//!
//! Loop devices are driven through the `losetup` CLI, which knows the host's loop-control
//! conventions better than a hand-rolled ioctl sequence would.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Name of the built-in Filesystem storage class.
pub const LOCAL_CLASS: &str = "local";
/// Provisioner of the Filesystem class.
pub const LOCAL_PROVISIONER: &str = "cdi.kubevirt.io/local";
/// Name of the built-in Block storage class (loop devices over preallocated files).
pub const LOCAL_BLOCK_CLASS: &str = "local-block";
/// Provisioner of the Block class.
pub const LOCAL_BLOCK_PROVISIONER: &str = "cdi.kubevirt.io/local-block";
/// Directory under the data root holding one directory per claim.
pub const VOLUMES_DIR: &str = "volumes";
/// Backing file of a Block claim inside its directory.
pub const BLOCK_BACKING_FILE: &str = "block.img";
/// Symlink to the loop device of a Block claim inside its directory.
pub const BLOCK_DEVICE_LINK: &str = "dev";
/// Size of the file `probe_loop_devices` attaches: the smallest a loop device takes happily.
const PROBE_FILE_BYTES: u64 = 1 << 20;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Host I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `losetup` could not be run at all.
    #[error("running losetup: {0}")]
    LosetupSpawn(#[source] std::io::Error),
    /// `losetup` ran and failed.
    #[error("losetup {args}: {stderr}")]
    Losetup {
        /// Arguments given.
        args: String,
        /// What it said.
        stderr: String,
    },
    /// A claim uid that could escape the volumes directory.
    #[error("invalid claim uid {0:?}")]
    InvalidUid(String),
}

impl StorageError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
        move |source| StorageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Run `losetup` with `args`; its trimmed stdout on success.
fn losetup(args: &[&str]) -> Result<String, StorageError> {
    let out = std::process::Command::new("losetup")
        .args(args)
        .output()
        .map_err(StorageError::LosetupSpawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(StorageError::Losetup {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Loop devices currently backed by `file` (none when `losetup` is unavailable).
pub fn loop_devices_of(file: &Path) -> Vec<PathBuf> {
    let Ok(text) = losetup(&["-j", &file.display().to_string()]) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(':').next())
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Attach `file` to a free loop device; the device path.
pub fn attach_loop(file: &Path) -> Result<PathBuf, StorageError> {
    losetup(&["--find", "--show", &file.display().to_string()]).map(PathBuf::from)
}

/// Detach a loop device.
pub fn detach_loop(device: &Path) -> Result<(), StorageError> {
    losetup(&["-d", &device.display().to_string()]).map(|_| ())
}

/// Whether this host lets us attach loop devices (root, `/dev/loop-control`, `losetup`);
/// the error says why not. `scratch` holds a small probe file for the moment of the test.
pub fn probe_loop_devices(scratch: &Path) -> Result<(), StorageError> {
    std::fs::create_dir_all(scratch).map_err(StorageError::io(scratch))?;
    let file = scratch.join("loop-probe.img");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(PROBE_FILE_BYTES))
        .map_err(StorageError::io(&file))?;
    let result = attach_loop(&file).and_then(|dev| detach_loop(&dev));
    let _ = std::fs::remove_file(&file);
    result
}

/// Claim uids are Kubernetes uids (hex and dashes); anything else could name a path outside
/// the volumes directory.
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// The volumes directory: one directory per claim uid.
#[derive(Debug, Clone)]
pub struct VolumeStore {
    root: PathBuf,
}

impl VolumeStore {
    /// Claims live under `root` (normally `<data-root>/volumes`), created if missing.
    pub fn new(root: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(root).map_err(StorageError::io(root))?;
        Ok(VolumeStore {
            root: root.to_path_buf(),
        })
    }

    /// The volumes directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A claim's directory, or `None` for a uid that is not a plain uid.
    pub fn dir(&self, uid: &str) -> Option<PathBuf> {
        valid_uid(uid).then(|| self.root.join(uid))
    }

    fn checked_dir(&self, uid: &str) -> Result<PathBuf, StorageError> {
        self.dir(uid)
            .ok_or_else(|| StorageError::InvalidUid(uid.to_string()))
    }

    /// The stable symlink naming a Block claim's device.
    pub fn block_link(&self, uid: &str) -> Result<PathBuf, StorageError> {
        Ok(self.checked_dir(uid)?.join(BLOCK_DEVICE_LINK))
    }

    /// Create (or reuse) a Filesystem claim's directory; the directory.
    pub fn create_filesystem(&self, uid: &str) -> Result<PathBuf, StorageError> {
        let dir = self.checked_dir(uid)?;
        std::fs::create_dir_all(&dir).map_err(StorageError::io(&dir))?;
        Ok(dir)
    }

    /// Create (or reuse) a Block claim: preallocate `capacity` bytes, attach a loop device and
    /// point the `dev` link at it. Returns the link (stable) and the device (current).
    pub fn create_block(
        &self,
        uid: &str,
        capacity: u64,
    ) -> Result<(PathBuf, PathBuf), StorageError> {
        let dir = self.checked_dir(uid)?;
        std::fs::create_dir_all(&dir).map_err(StorageError::io(&dir))?;
        let file = dir.join(BLOCK_BACKING_FILE);
        if !file.exists() {
            // Build under a temporary name so a crash never leaves a short file that a later
            // call would take for the finished one.
            let tmp = dir.join(format!("{BLOCK_BACKING_FILE}.tmp"));
            let f = std::fs::File::create(&tmp).map_err(StorageError::io(&tmp))?;
            // Preallocate: a Block volume's capacity must really be there, as a disk's is.
            rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, capacity)
                .map_err(|e| StorageError::io(&tmp)(e.into()))?;
            std::fs::rename(&tmp, &file).map_err(StorageError::io(&file))?;
        }
        let dev = self.ensure_block_attached(uid)?;
        Ok((dir.join(BLOCK_DEVICE_LINK), dev))
    }

    /// Make sure a Block claim's file is attached and its `dev` link points at the device
    /// (after a reboot the old device is gone); the device.
    pub fn ensure_block_attached(&self, uid: &str) -> Result<PathBuf, StorageError> {
        let dir = self.checked_dir(uid)?;
        let file = dir.join(BLOCK_BACKING_FILE);
        if !file.exists() {
            return Err(StorageError::Io {
                path: file,
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let dev = match loop_devices_of(&file).into_iter().next() {
            Some(dev) => dev,
            None => attach_loop(&file)?,
        };
        let link = dir.join(BLOCK_DEVICE_LINK);
        if std::fs::read_link(&link).ok().as_deref() != Some(dev.as_path()) {
            // Replace atomically: a reader sees the old or the new link, never none.
            let tmp = dir.join(format!("{BLOCK_DEVICE_LINK}.tmp"));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&dev, &tmp).map_err(StorageError::io(&tmp))?;
            std::fs::rename(&tmp, &link).map_err(StorageError::io(&link))?;
        }
        Ok(dev)
    }

    /// Remove a claim's storage and everything in it (idempotent; an invalid uid owns nothing).
    pub fn release(&self, uid: &str) -> Result<(), StorageError> {
        let Some(dir) = self.dir(uid) else {
            return Ok(());
        };
        // Detach before deleting the backing file, or the device keeps the space.
        for dev in loop_devices_of(&dir.join(BLOCK_BACKING_FILE)) {
            detach_loop(&dev)?;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StorageError::Io { path: dir, source }),
        }
    }

    /// Uids of claims that have storage (to sweep orphans after a crash).
    pub fn provisioned(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut uids: Vec<String> = rd
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| valid_uid(n))
            .collect();
        uids.sort();
        uids
    }

    /// Bytes allocated on the host to a Filesystem claim's `disk.img` (`None` for Block
    /// claims, whose backing file is preallocated and so always "full").
    pub fn used_bytes(&self, uid: &str) -> Option<u64> {
        let img = self.dir(uid)?.join(cdi_api::env::defaults::DISK_IMAGE_NAME);
        std::fs::metadata(img).ok().map(|m| m.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filesystem_claim_lifecycle() {
        let tmp = tempfile::tempdir().unwrap();
        let v = VolumeStore::new(&tmp.path().join(VOLUMES_DIR)).unwrap();
        let dir = v.create_filesystem("ab-12").unwrap();
        assert_eq!(dir, tmp.path().join("volumes/ab-12"));
        assert_eq!(v.create_filesystem("ab-12").unwrap(), dir, "idempotent");
        std::fs::write(dir.join("disk.img"), vec![1u8; 8192]).unwrap();
        assert!(v.used_bytes("ab-12").unwrap() >= 8192);
        assert_eq!(v.provisioned(), vec!["ab-12".to_string()]);
        v.release("ab-12").unwrap();
        assert!(!dir.exists());
        v.release("ab-12").unwrap();
        assert!(v.provisioned().is_empty());
    }

    #[test]
    fn uids_that_could_escape_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let v = VolumeStore::new(tmp.path()).unwrap();
        for bad in ["", "..", "../etc", "a/b", "x y"] {
            assert!(v.dir(bad).is_none(), "{bad:?}");
            assert!(matches!(
                v.create_filesystem(bad),
                Err(StorageError::InvalidUid(_))
            ));
            assert!(v.release(bad).is_ok());
        }
        std::fs::create_dir(tmp.path().join("not-a-uid")).unwrap();
        assert!(
            v.provisioned().is_empty(),
            "foreign directories are not claims"
        );
    }

    #[test]
    fn block_claim_lifecycle_when_loop_devices_work() {
        let tmp = tempfile::tempdir().unwrap();
        if let Err(why) = probe_loop_devices(tmp.path()) {
            println!("SKIPPED: loop devices unavailable: {why}");
            return;
        }
        let v = VolumeStore::new(&tmp.path().join(VOLUMES_DIR)).unwrap();
        let (link, dev) = v.create_block("cd-34", 4 << 20).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), dev);
        let file = tmp.path().join("volumes/cd-34").join(BLOCK_BACKING_FILE);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 4 << 20);
        assert_eq!(
            v.create_block("cd-34", 4 << 20).unwrap().1,
            dev,
            "idempotent"
        );
        // A reboot loses the attachment: the link must follow the new device.
        detach_loop(&dev).unwrap();
        let again = v.ensure_block_attached("cd-34").unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), again);
        v.release("cd-34").unwrap();
        assert!(loop_devices_of(&file).is_empty());
        assert!(!file.exists());
    }
}
