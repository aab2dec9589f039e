//! `cdi.kubevirt.io/v1beta1`, the storage version of every kind CDI owns.
//!
//! One module per kind; everything is re-exported here so that callers write
//! `cdi_resources::v1beta1::DataVolumeSpec` the way upstream's Go code writes
//! `cdiv1.DataVolumeSpec`.

mod cdi_config;
mod condition;
mod data_import_cron;
mod data_source;
mod data_volume;
mod storage_profile;

pub use cdi_config::*;
pub use condition::*;
pub use data_import_cron::*;
pub use data_source::*;
pub use data_volume::*;
pub use storage_profile::*;
