//! The client commands — `apply`, `get`, `describe`, `delete`, `wait` and `image-upload` —
//! on `kube::Client`, so they work against `cdi serve` (through the kubeconfig it writes into
//! its data directory) and against a cluster alike.
//!
//! [`connect`] turns the connection flags into a client, [`discovery`] turns resource names
//! into API resources, and each command uses kube's dynamic API (`Api<DynamicObject>`).

mod apply;
pub mod connect;
mod describe;
mod discovery;
mod get;
mod wait;

use kube::api::DeleteParams;

pub use connect::ConnFlags;
use connect::{Connection, status_code};

/// The client subcommands of `cdi`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create or update resources from YAML or JSON manifests (multi-document).
    Apply(apply::ApplyArgs),
    /// List resources or show one (`dv`, `pvc`, `sc`, `storageprofile`, `events`, …).
    Get(get::GetArgs),
    /// Show a resource with its conditions and events, like `oc describe`.
    Describe(describe::DescribeArgs),
    /// Delete resources.
    Delete(DeleteArgs),
    /// Wait until a resource meets a condition.
    Wait(wait::WaitArgs),
    /// Upload a disk image into a new or existing DataVolume (virtctl image-upload).
    ImageUpload(crate::image_upload::ImageUploadArgs),
}

/// Arguments of `cdi delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Resource type.
    resource: String,
    /// Names.
    #[arg(required = true)]
    names: Vec<String>,
    #[command(flatten)]
    conn: ConnFlags,
}

impl Command {
    /// The connection flags after the subcommand, the outer ones filling in.
    pub fn merged_conn_flags(&self, outer: ConnFlags) -> ConnFlags {
        let inner = match self {
            Command::Apply(a) => a.conn.clone(),
            Command::Get(a) => a.conn.clone(),
            Command::Describe(a) => a.conn.clone(),
            Command::Delete(a) => a.conn.clone(),
            Command::Wait(a) => a.conn.clone(),
            Command::ImageUpload(a) => a.conn_flags(),
        };
        inner.or(outer)
    }

    /// Run the command; `outer` are the connection flags given before the subcommand.
    pub async fn run(self, outer: ConnFlags) -> anyhow::Result<()> {
        let conn = connect::connect(&self.merged_conn_flags(outer)).await?;
        match self {
            Command::Apply(a) => apply::run(&conn, a).await,
            Command::Get(a) => get::run(&conn, a).await,
            Command::Describe(a) => describe::run(&conn, a).await,
            Command::Delete(a) => delete(&conn, a).await,
            Command::Wait(a) => wait::run(&conn, a).await,
            Command::ImageUpload(a) => a.upload(&conn).await,
        }
    }
}

/// `cdi delete TYPE NAME…`: `kind "name" deleted` per object, errors per line.
async fn delete(conn: &Connection, a: DeleteArgs) -> anyhow::Result<()> {
    let res = discovery::resolve(conn, &a.resource).await?;
    let api = res.api(&conn.client, Some(&conn.namespace));
    let mut not_found = 0;
    let mut failed = 0;
    for name in &a.names {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => println!("{} \"{name}\" deleted", res.qualified_kind()),
            Err(e) => {
                if status_code(&e) == Some(404) {
                    not_found += 1;
                }
                failed += 1;
                eprintln!("error: {:#}", conn.explain(e));
            }
        }
    }
    match (failed, not_found, a.names.len()) {
        (0, _, _) => Ok(()),
        (1, 1, 1) => Err(anyhow::anyhow!("not found")),
        _ => Err(anyhow::anyhow!("some deletions failed")),
    }
}
