//! Claim provisioning: where a PersistentVolumeClaim's bytes live on this host.
//!
//! [`ClaimProvisioner`] is the seam a Kubernetes backend replaces with "create the PVC and let
//! the CSI driver bind it". [`LocalProvisioner`] implements the `local` Filesystem class (one
//! directory per claim under `DATA/volumes/<claim uid>/`, holding `disk.img`) and the
//! `local-block` class on the host primitives of [`cdi_node::storage`], their one home.

use std::path::{Path, PathBuf};

/// The built-in classes and their provisioners; defined once, in the node crate.
pub use cdi_node::storage::{
    LOCAL_BLOCK_CLASS, LOCAL_BLOCK_PROVISIONER, LOCAL_CLASS, LOCAL_PROVISIONER,
};
use cdi_node::storage::{StorageError, VolumeStore};

/// StorageClass annotation saying why the Block class cannot provision on this host.
pub const ANN_CLASS_UNAVAILABLE: &str = "cdi.kubevirt.io/storage.class.unavailable";

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
    /// The host storage primitives failed (loop devices, invalid uid, I/O).
    #[error("provisioning claim storage")]
    Storage(#[from] StorageError),
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

/// The `local` and `local-block` classes over [`cdi_node::storage::VolumeStore`]: a directory
/// per claim, and for Block a loop device over a preallocated file in it.
pub struct LocalProvisioner {
    volumes: VolumeStore,
}

impl LocalProvisioner {
    /// Claims live under `root`.
    pub fn new(root: &Path) -> std::io::Result<Self> {
        let volumes = VolumeStore::new(root).map_err(|e| match e {
            StorageError::Io { source, .. } => source,
            other => std::io::Error::other(other),
        })?;
        Ok(LocalProvisioner { volumes })
    }
}

/// Whether this host lets us attach loop devices; `Err` says why not.
pub fn probe_loop_devices(scratch: &Path) -> Result<(), String> {
    cdi_node::storage::probe_loop_devices(scratch).map_err(|e| e.to_string())
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
        if block {
            let (_link, dev) = self.volumes.create_block(&req.uid, req.capacity)?;
            return Ok(ProvisionedClaim {
                data_dir: None,
                block_device: Some(dev),
            });
        }
        Ok(ProvisionedClaim {
            data_dir: Some(self.volumes.create_filesystem(&req.uid)?),
            block_device: None,
        })
    }

    fn release(&self, uid: &str) -> Result<(), ProvisionError> {
        Ok(self.volumes.release(uid)?)
    }

    fn provisioned(&self) -> Vec<String> {
        self.volumes.provisioned()
    }

    fn used_bytes(&self, uid: &str) -> Option<u64> {
        self.volumes.used_bytes(uid)
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
