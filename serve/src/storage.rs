//! The built-in storage classes as the API server's bootstrap sees them: their names and
//! provisioners (defined once, in [`cdi_node::storage`], whose provisioner binds their claims)
//! and whether this host can offer the Block class at all.

use std::path::Path;

/// The built-in classes and their provisioners; defined once, in the node crate.
pub use cdi_node::storage::{
    LOCAL_BLOCK_CLASS, LOCAL_BLOCK_PROVISIONER, LOCAL_CLASS, LOCAL_PROVISIONER,
};

/// StorageClass annotation saying why the Block class cannot provision on this host.
pub use cdi_resources::annotations::ANN_CLASS_UNAVAILABLE;

/// Whether this host lets us attach loop devices; `Err` says why not.
pub fn probe_loop_devices(scratch: &Path) -> Result<(), cdi_node::storage::StorageError> {
    cdi_node::storage::probe_loop_devices(scratch)
}
