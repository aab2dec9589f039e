//! `cdi serve`: the subcommand this crate contributes to the `cdi` binary. The client commands
//! that talk to it (`apply`, `get`, …) live in the `cdi` binary's crate, on `kube::Client`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cdi_api::client::{CDI_HOME, DEFAULT_DATA_DIR, DEFAULT_LISTEN};

/// Subcommands this crate contributes to the `cdi` binary.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the embedded control plane: resource API, controller and workers on one host.
    Serve(ServeArgs),
}

/// Arguments of `cdi serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Data directory: database, PKI, volumes and the admin's kubeconfig [default: $CDI_HOME,
    /// else ./cdi-data].
    // No clap default: `cdi --data-dir DIR serve` names it before the subcommand, and that
    // must win over $CDI_HOME (see `Command::with_data_dir`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port; see DATA_DIR/server.url).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: std::net::SocketAddr,
    /// First worker-restart back-off (doubles per restart, capped at 5m), e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    restart_backoff: Duration,
}

/// A duration flag that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum DurationError {
    /// The number part is not a number.
    #[error("invalid duration {0:?}")]
    Number(String),
    /// The unit is none of ms, s, m, h.
    #[error("invalid duration unit in {0:?} (use ms, s, m or h)")]
    Unit(String),
}

/// Parse `500ms`, `10s`, `5m`, `1h` (or bare seconds).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| DurationError::Number(s.to_string()))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(DurationError::Unit(s.to_string())),
    };
    Ok(Duration::from_secs_f64(secs))
}

impl Command {
    /// The data directory given before the subcommand (`cdi --data-dir DIR serve`), used when
    /// `serve` has no `--data-dir` of its own.
    pub fn with_data_dir(self, outer: Option<PathBuf>) -> Command {
        match self {
            Command::Serve(mut a) => {
                a.data_dir = a.data_dir.or(outer);
                Command::Serve(a)
            }
        }
    }

    /// Run the subcommand (the caller provides the async runtime).
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Serve(a) => {
                init_tracing();
                // Absolute: the node agent runs pods in working directories of their own, and
                // they receive paths under the data directory.
                let dir = data_dir(a.data_dir, std::env::var_os(CDI_HOME));
                let data_dir = std::path::absolute(&dir)
                    .with_context(|| format!("resolving the data directory {}", dir.display()))?;
                crate::serve::serve(crate::serve::ServeOptions {
                    data_dir,
                    listen: a.listen,
                    backoff_base: a.restart_backoff,
                })
                .await
            }
        }
    }
}

/// `--data-dir`, else `$CDI_HOME`, else `./cdi-data`.
fn data_dir(flag: Option<PathBuf>, cdi_home: Option<std::ffi::OsString>) -> PathBuf {
    flag.or_else(|| cdi_home.map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(matches!(parse_duration("5x"), Err(DurationError::Unit(_))));
        assert!(matches!(
            parse_duration("x5s"),
            Err(DurationError::Number(_))
        ));
    }

    #[test]
    fn data_dir_flag_wins_over_cdi_home_over_the_default() {
        assert_eq!(
            data_dir(Some("/a".into()), Some("/b".into())),
            PathBuf::from("/a")
        );
        assert_eq!(data_dir(None, Some("/b".into())), PathBuf::from("/b"));
        assert_eq!(data_dir(None, None), PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[test]
    fn data_dir_after_serve_wins_over_the_one_before() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(subcommand)]
            command: Command,
        }
        let Command::Serve(a) = Cli::parse_from(["cdi", "serve", "--data-dir", "/inner"])
            .command
            .with_data_dir(Some("/outer".into()));
        assert_eq!(a.data_dir, Some(PathBuf::from("/inner")));
        let Command::Serve(a) = Cli::parse_from(["cdi", "serve"])
            .command
            .with_data_dir(Some("/outer".into()));
        assert_eq!(a.data_dir, Some(PathBuf::from("/outer")));
    }
}
