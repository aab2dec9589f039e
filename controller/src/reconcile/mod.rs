//! The reconcilers kube-runtime drives: [`datavolume`] (DataVolume → claim, status),
//! [`claim`] (claim → importer or upload-server pod, mirrored state) and [`storage`]
//! (StorageClass → StorageProfile status, CDIConfig status).

pub mod claim;
pub mod datavolume;
pub mod storage;

#[cfg(test)]
mod tests;
