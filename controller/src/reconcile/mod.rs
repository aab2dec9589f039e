//! The reconcilers kube-runtime drives: [`datavolume`] (DataVolume → claim, status) and
//! [`claim`] (claim → importer or upload-server pod, mirrored state).

pub mod claim;
pub mod datavolume;

#[cfg(test)]
mod tests;
