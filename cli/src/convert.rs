//! `cdi convert` and `cdi info` (being written).

use std::process::ExitCode;

/// Format subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {}

impl Command {
    /// Run the subcommand.
    pub fn run(self) -> ExitCode {
        match self {}
    }
}
