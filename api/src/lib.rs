//! CDI's domain vocabulary, free of Kubernetes client code.
//!
//! Shared by the workers (importer, upload server), the embedded control plane and the CLI:
//! Kubernetes quantities, the worker termination-message contract, environment-variable names
//! and the filesystem-overhead arithmetic.

pub mod client;
pub mod env;
pub mod names;
pub mod overhead;
pub mod quantity;
pub mod resources;
pub mod termination;
pub mod upload;

pub use quantity::{Quantity, QuantityError};
pub use termination::TerminationMessage;
