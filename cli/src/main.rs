//! `cdi`: one multi-call binary for every CDI component.
//!
//! Each crate contributes its own subcommands; this file only dispatches. Invoked through a
//! link named `cdi-<subcommand>` (e.g. `cdi-importer`), the binary runs that subcommand, so
//! container images can keep upstream's entry-point names.

mod convert;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Containerized Data Importer: get VM disk images into volumes.
#[derive(Debug, Parser)]
#[command(name = "cdi", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Formats(convert::Command),
    #[command(flatten)]
    Importer(cdi_importer::cli::Command),
    #[command(flatten)]
    UploadServer(cdi_uploadserver::cli::Command),
    #[command(flatten)]
    UploadProxy(cdi_uploadproxy::cli::Command),
    #[command(flatten)]
    Control(cdi_serve::cli::Command),
    #[command(flatten)]
    DvController(cdi_controller::cli::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(multi_call_args(std::env::args_os()));
    match cli.command {
        Command::Formats(c) => c.run(),
        Command::Importer(c) => c.run(),
        Command::UploadServer(c) => c.run(),
        Command::UploadProxy(c) => c.run(),
        Command::Control(c) => c.run(),
        Command::DvController(c) => c.run(),
    }
}

/// `cdi-importer ARGS` → `cdi importer ARGS`, for the subcommands that exist; any other name
/// (`cdi-linux-amd64`, a renamed download) runs as plain `cdi`.
fn multi_call_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.collect();
    let name = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("cdi")
        .to_string();
    if let Some(sub) = name.strip_prefix("cdi-")
        && is_subcommand(sub)
    {
        args.insert(1, OsString::from(sub));
    }
    args
}

fn is_subcommand(name: &str) -> bool {
    use clap::CommandFactory;
    Cli::command().find_subcommand(name).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dispatch(args: &[&str]) -> Vec<String> {
        multi_call_args(args.iter().map(OsString::from))
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn worker_names_dispatch_and_other_names_do_not() {
        assert_eq!(
            dispatch(&["/usr/bin/cdi-importer", "-v=1"]),
            ["/usr/bin/cdi-importer", "importer", "-v=1"]
        );
        assert_eq!(
            dispatch(&["cdi-uploadserver"]),
            ["cdi-uploadserver", "uploadserver"]
        );
        assert_eq!(
            dispatch(&["./cdi-linux-amd64", "--help"]),
            ["./cdi-linux-amd64", "--help"]
        );
        assert_eq!(dispatch(&["cdi", "serve"]), ["cdi", "serve"]);
    }
}
