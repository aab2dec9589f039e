//! Command-line entry points of this component (placeholder until its issue lands).

use std::process::ExitCode;

/// Subcommands this crate contributes to the `cdi` binary.
#[derive(Debug, clap::Subcommand)]
pub enum Command {}

impl Command {
    /// Run the subcommand.
    pub fn run(self) -> ExitCode {
        match self {}
    }
}
