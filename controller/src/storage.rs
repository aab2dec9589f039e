//! Claim provisioning: where a PersistentVolumeClaim's bytes live on this host.
//!
//! [`ClaimProvisioner`] is the seam a Kubernetes backend replaces with "create the PVC and let
//! the CSI driver bind it". [`LocalProvisioner`] implements the `local` Filesystem class: one
//! directory per claim under `DATA/volumes/<claim uid>/`, holding `disk.img`.

use std::path::{Path, PathBuf};

/// Name of the built-in Filesystem storage class.
pub const LOCAL_CLASS: &str = "local";
/// Provisioner name the built-in classes report.
pub const LOCAL_PROVISIONER: &str = "cdi.kubevirt.io/local";
/// Name of the built-in Block storage class (loop devices over preallocated files).
pub const LOCAL_BLOCK_CLASS: &str = "local-block";
/// Provisioner of the Block class.
pub const LOCAL_BLOCK_PROVISIONER: &str = "cdi.kubevirt.io/local-block";
/// StorageClass annotation saying why the Block class cannot provision on this host.
pub const ANN_CLASS_UNAVAILABLE: &str = "cdi.kubevirt.io/storage.class.unavailable";
/// Backing file of a Block claim inside its directory.
const BLOCK_BACKING_FILE: &str = "block.img";

/// What to provision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// Claim uid (stable identity of the backing storage).
    pub uid: String,
    /// Storage class.
    pub class: String,
    /// `Filesystem` or `Block`.
    pub volume_mode: String,
    /// Capacity in bytes.
    pub capacity: u64,
}

/// Where a provisioned claim can be reached by workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionedClaim {
    /// Filesystem mode: the directory mounted as upstream's `/data`.
    pub data_dir: Option<PathBuf>,
    /// Block mode: the device.
    pub block_device: Option<PathBuf>,
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The class cannot serve this request.
    #[error("storage class {class:?} cannot provision {volume_mode} volumes")]
    Unsupported {
        /// Class name.
        class: String,
        /// Requested mode.
        volume_mode: String,
    },
    /// Host I/O failed.
    #[error("provisioning claim storage at {path}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Creates and removes the storage behind claims.
pub trait ClaimProvisioner: Send + Sync {
    /// Provision (idempotent: an existing claim's storage is reused as is).
    fn provision(&self, req: &ClaimRequest) -> Result<ProvisionedClaim, ProvisionError>;
    /// Remove a claim's storage and everything in it (idempotent).
    fn release(&self, uid: &str) -> Result<(), ProvisionError>;
    /// Uids of claims that have storage (to sweep orphans after a crash).
    fn provisioned(&self) -> Vec<String>;
    /// Bytes currently used by a claim (for `describe`).
    fn used_bytes(&self, uid: &str) -> Option<u64>;
}

/// The `local` class: a directory per claim.
pub struct LocalProvisioner {
    root: PathBuf,
}

impl LocalProvisioner {
    /// Claims live under `root`.
    pub fn new(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(LocalProvisioner {
            root: root.to_path_buf(),
        })
    }

    fn dir(&self, uid: &str) -> Option<PathBuf> {
        // uids are ours (hex and dashes); refuse anything that could escape the root.
        let safe = !uid.is_empty() && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        safe.then(|| self.root.join(uid))
    }
}

/// Run `losetup` with `args`; stdout on success, stderr as the error.
fn losetup(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("losetup")
        .args(args)
        .output()
        .map_err(|e| format!("running losetup: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "losetup {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Loop devices currently backed by `file`.
fn loop_devices_of(file: &Path) -> Vec<PathBuf> {
    let Ok(text) = losetup(&["-j", &file.display().to_string()]) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(':').next())
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Whether this host lets us attach loop devices; `Err` says why not.
pub fn probe_loop_devices(scratch: &Path) -> Result<(), String> {
    std::fs::create_dir_all(scratch).map_err(|e| format!("creating {}: {e}", scratch.display()))?;
    let file = scratch.join("loop-probe.img");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(1 << 20))
        .map_err(|e| format!("creating {}: {e}", file.display()))?;
    let result = losetup(&["--find", "--show", &file.display().to_string()])
        .and_then(|dev| losetup(&["-d", &dev]).map(|_| ()));
    let _ = std::fs::remove_file(&file);
    result
}

impl LocalProvisioner {
    fn provision_block(
        &self,
        dir: &Path,
        req: &ClaimRequest,
    ) -> Result<ProvisionedClaim, ProvisionError> {
        let file = dir.join(BLOCK_BACKING_FILE);
        let io_err = |source: std::io::Error| ProvisionError::Io {
            path: file.clone(),
            source,
        };
        if !file.exists() {
            let f = std::fs::File::create(&file).map_err(io_err)?;
            // Preallocate: a Block volume's capacity must really be there, as a disk's is.
            rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, req.capacity)
                .map_err(|e| io_err(e.into()))?;
        }
        if let Some(dev) = loop_devices_of(&file).into_iter().next() {
            return Ok(ProvisionedClaim {
                data_dir: None,
                block_device: Some(dev),
            });
        }
        let dev = losetup(&["--find", "--show", &file.display().to_string()])
            .map_err(|m| io_err(std::io::Error::other(m)))?;
        Ok(ProvisionedClaim {
            data_dir: None,
            block_device: Some(PathBuf::from(dev)),
        })
    }
}

impl ClaimProvisioner for LocalProvisioner {
    fn provision(&self, req: &ClaimRequest) -> Result<ProvisionedClaim, ProvisionError> {
        let block = req.class == LOCAL_BLOCK_CLASS;
        if (req.volume_mode == "Block") != block {
            return Err(ProvisionError::Unsupported {
                class: req.class.clone(),
                volume_mode: req.volume_mode.clone(),
            });
        }
        let Some(dir) = self.dir(&req.uid) else {
            return Err(ProvisionError::Io {
                path: self.root.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "invalid claim uid"),
            });
        };
        std::fs::create_dir_all(&dir).map_err(|source| ProvisionError::Io {
            path: dir.clone(),
            source,
        })?;
        if block {
            return self.provision_block(&dir, req);
        }
        Ok(ProvisionedClaim {
            data_dir: Some(dir),
            block_device: None,
        })
    }

    fn release(&self, uid: &str) -> Result<(), ProvisionError> {
        let Some(dir) = self.dir(uid) else {
            return Ok(());
        };
        // Detach before deleting the backing file, or the device keeps the space.
        for dev in loop_devices_of(&dir.join(BLOCK_BACKING_FILE)) {
            losetup(&["-d", &dev.display().to_string()]).map_err(|m| ProvisionError::Io {
                path: dev.clone(),
                source: std::io::Error::other(m),
            })?;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ProvisionError::Io { path: dir, source }),
        }
    }

    fn provisioned(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect()
    }

    fn used_bytes(&self, uid: &str) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let img = self.dir(uid)?.join(cdi_api::env::defaults::DISK_IMAGE_NAME);
        std::fs::metadata(img).ok().map(|m| m.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provision_release_and_sweep() {
        let tmp = tempfile::tempdir().unwrap();
        let p = LocalProvisioner::new(tmp.path()).unwrap();
        let req = ClaimRequest {
            uid: "ab-12".into(),
            class: LOCAL_CLASS.into(),
            volume_mode: "Filesystem".into(),
            capacity: 1 << 20,
        };
        let c = p.provision(&req).unwrap();
        let dir = c.data_dir.unwrap();
        std::fs::write(dir.join("disk.img"), b"x").unwrap();
        assert_eq!(p.provisioned(), vec!["ab-12".to_string()]);
        p.release("ab-12").unwrap();
        assert!(!dir.exists());
        p.release("ab-12").unwrap();
        assert!(p.release("../etc").is_ok());
        let block = ClaimRequest {
            volume_mode: "Block".into(),
            ..req.clone()
        };
        assert!(matches!(
            p.provision(&block),
            Err(ProvisionError::Unsupported { .. })
        ));
        let fs_on_block_class = ClaimRequest {
            class: LOCAL_BLOCK_CLASS.into(),
            ..req
        };
        assert!(matches!(
            p.provision(&fs_on_block_class),
            Err(ProvisionError::Unsupported { .. })
        ));
    }
}
