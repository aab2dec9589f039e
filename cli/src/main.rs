//! `cdi`: one multi-call binary for every CDI component, and the Kubernetes client commands.
//!
//! Each crate contributes its own subcommands; this file only dispatches. Invoked through a
//! link named `cdi-<subcommand>` (e.g. `cdi-importer`), the binary runs that subcommand, so
//! container images can keep upstream's entry-point names. The client commands (`apply`,
//! `get`, `describe`, `delete`, `wait`, `image-upload`) live here, in [`client`], and take
//! their connection flags before or after the subcommand (`cdi --server URL get dv`).

mod client;
mod convert;
mod image_upload;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Containerized Data Importer: get VM disk images into volumes.
#[derive(Debug, Parser)]
#[command(name = "cdi", version, about, propagate_version = true)]
struct Cli {
    /// Connection flags of the client commands, given before the subcommand (`cdi serve`
    /// takes `--data-dir` from here too).
    #[command(flatten)]
    conn: client::ConnFlags,
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
    Client(client::Command),
    #[command(flatten)]
    DvController(cdi_controller::cli::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(multi_call_args(std::env::args_os()));
    if let Err(e) = check_outer_flags(&cli) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match cli.command {
        Command::Client(c) => block_on(c.run(cli.conn)),
        Command::Control(c) => block_on(c.with_data_dir(cli.conn.data_dir).run()),
        Command::Formats(c) => c.run(),
        Command::Importer(c) => c.run(),
        Command::UploadServer(c) => c.run(),
        Command::UploadProxy(c) => c.run(),
        Command::DvController(c) => c.run(),
    }
}

/// Connection flags before a subcommand that is no client command would be ignored silently;
/// `cdi serve` takes only `--data-dir` from there.
fn check_outer_flags(cli: &Cli) -> anyhow::Result<()> {
    let outer = match &cli.command {
        Command::Client(_) => return Ok(()),
        Command::Control(_) => client::ConnFlags {
            data_dir: None,
            ..cli.conn.clone()
        },
        _ => cli.conn.clone(),
    };
    anyhow::ensure!(
        outer.is_empty(),
        "connection flags before this subcommand apply only to the client commands (apply, \
         get, describe, delete, wait, image-upload); give the subcommand's own flags after it"
    );
    Ok(())
}

/// How long stray tasks may run on after a command's future finished (`cdi serve` stops its
/// pods before returning; a client command has nothing left running).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Run an async command on a fresh multi-threaded runtime: exit 0, or `error: …` and 1.
fn block_on(command: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(command);
    rt.shutdown_timeout(SHUTDOWN_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
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
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// The merged connection flags of a client command line.
    fn conn_of(args: &[&str]) -> client::ConnFlags {
        let cli = parse(args);
        match cli.command {
            Command::Client(c) => c.merged_conn_flags(cli.conn),
            other => panic!("{args:?} is not a client command: {other:?}"),
        }
    }

    #[test]
    fn command_tree_passes_clap_debug_asserts() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_builds_for_the_top_level_and_workers_sharing_flag_names() {
        for args in [
            &["cdi", "--help"][..],
            &["cdi", "uploadserver", "--help"],
            &["cdi", "controller", "--help"],
            &["cdi", "get", "--help"],
            &["cdi", "serve", "--help"],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp, "{args:?}");
        }
    }

    #[test]
    fn server_before_the_subcommand() {
        let conn = conn_of(&["cdi", "--server", "https://h:1", "get", "dv"]);
        assert_eq!(conn.server.as_deref(), Some("https://h:1"));
    }

    #[test]
    fn server_after_the_subcommand() {
        let conn = conn_of(&["cdi", "get", "dv", "--server", "https://h:1"]);
        assert_eq!(conn.server.as_deref(), Some("https://h:1"));
        let conn = conn_of(&["cdi", "-s", "https://h:2", "get", "dv"]);
        assert_eq!(conn.server.as_deref(), Some("https://h:2"));
    }

    #[test]
    fn namespace_after_the_subcommand_wins() {
        let conn = conn_of(&["cdi", "-n", "x", "get", "dv", "-n", "y"]);
        assert_eq!(conn.namespace.as_deref(), Some("y"));
        let conn = conn_of(&["cdi", "-n", "x", "get", "dv"]);
        assert_eq!(conn.namespace.as_deref(), Some("x"));
    }

    #[test]
    fn ca_cert_is_an_alias_of_certificate_authority() {
        let conn = conn_of(&["cdi", "apply", "-f", "m.yaml", "--ca-cert", "/ca.crt"]);
        assert_eq!(conn.certificate_authority, Some("/ca.crt".into()));
        let conn = conn_of(&[
            "cdi",
            "--certificate-authority",
            "/ca.crt",
            "wait",
            "dv",
            "a",
            "--for",
            "delete",
        ]);
        assert_eq!(conn.certificate_authority, Some("/ca.crt".into()));
    }

    #[test]
    fn image_upload_takes_the_connection_flags_and_insecure_covers_the_api() {
        let conn = conn_of(&[
            "cdi",
            "--data-dir",
            "/d",
            "image-upload",
            "dv",
            "disk",
            "--image-path",
            "/i",
            "--size",
            "1Gi",
            "--insecure",
            "-n",
            "ns",
        ]);
        assert_eq!(conn.data_dir, Some("/d".into()));
        assert_eq!(conn.namespace.as_deref(), Some("ns"));
        assert!(conn.insecure_skip_tls_verify);
    }

    #[test]
    fn serve_takes_the_data_dir_from_before_the_subcommand() {
        let cli = parse(&["cdi", "--data-dir", "/outer", "serve"]);
        assert!(check_outer_flags(&cli).is_ok());
        let Command::Control(c) = cli.command else {
            panic!("not serve")
        };
        let cdi_serve::cli::Command::Serve(a) = c.with_data_dir(cli.conn.data_dir);
        assert_eq!(a.data_dir, Some("/outer".into()));
    }

    #[test]
    fn workers_keep_their_own_flags_of_the_same_names() {
        let cli = parse(&[
            "cdi",
            "controller",
            "--kubeconfig",
            "/k",
            "--namespace",
            "cdi",
        ]);
        assert!(matches!(cli.command, Command::DvController(_)));
        assert!(cli.conn.is_empty());
        assert!(check_outer_flags(&cli).is_ok());
    }

    #[test]
    fn outer_connection_flags_are_refused_where_they_would_be_ignored() {
        let cli = parse(&["cdi", "--server", "https://h:1", "serve"]);
        assert!(check_outer_flags(&cli).is_err());
        let cli = parse(&["cdi", "--namespace", "x", "info", "disk.img"]);
        assert!(check_outer_flags(&cli).is_err());
        let cli = parse(&["cdi", "info", "disk.img"]);
        assert!(check_outer_flags(&cli).is_ok());
    }

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
