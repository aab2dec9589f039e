//! The subcommand this crate contributes to `cdi`: `cdi controller` runs the DataVolume
//! controller alone against a cluster (in-cluster config, `KUBECONFIG`, or `--kubeconfig`).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::{ControllerConfig, DEFAULT_NAMESPACE};

/// Subcommands this crate contributes to the `cdi` binary.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the DataVolume controller (import and upload) against a Kubernetes API server.
    Controller(ControllerArgs),
}

/// Arguments of `cdi controller`.
#[derive(Debug, clap::Args)]
pub struct ControllerArgs {
    /// Kubeconfig file (default: in-cluster configuration, then $KUBECONFIG, then ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// CDI namespace (upload PKI Secrets, import proxy CA ConfigMap).
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Worker image for importer and upload-server pods (default: $CDI_IMAGE, else cdi:latest).
    #[arg(long)]
    pub image: Option<String>,
    /// Pull policy of worker pods.
    #[arg(long, default_value = "IfNotPresent")]
    pub pull_policy: String,
    /// Worker verbosity (`-v=<n>`).
    #[arg(long, default_value_t = 1)]
    pub verbosity: u8,
}

impl Command {
    /// Run the subcommand.
    pub fn run(self) -> ExitCode {
        let Command::Controller(args) = self;
        init_tracing();
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("cdi controller: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        match runtime.block_on(run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cdi controller: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Errors of the command-line wiring.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("client configuration: {0}")]
    Client(#[from] kube::Error),
    #[error("client configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error(transparent)]
    Controller(#[from] crate::Error),
}

async fn run(args: ControllerArgs) -> Result<(), CliError> {
    let client_config = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                CliError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|source| CliError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    let client = kube::Client::try_from(client_config)?;
    let mut config = ControllerConfig {
        namespace: args.namespace,
        pull_policy: args.pull_policy,
        verbosity: args.verbosity,
        ..ControllerConfig::default()
    };
    if let Some(image) = args.image {
        config.image = image;
    }
    let shutdown = config.shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    crate::run(client, config).await?;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
