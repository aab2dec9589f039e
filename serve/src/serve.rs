//! `cdi serve`: one process holding the store and its Kubernetes API (HTTPS, bearer token),
//! and — as clients of that API through `kube::Client`, exactly as on a cluster — the
//! DataVolume controller ([`cdi_controller`]), the node agent and the local provisioner
//! ([`cdi_node`]).
//!
//! First start lays out the data directory: `cdi.db` (SQLite, WAL), `pki/ca.crt` + `ca.key`,
//! `pki/server.crt` + `server.key`, `pki/token.key` (upload-token signing key), `admin.token`
//! (0600), `server.url`, `kubeconfig` (0600, rewritten on every start), `volumes/<claim uid>/`
//! and `run/pods/<pod uid>/` (logs, termination messages, Secret volumes of pods).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cdi_api::client::{ADMIN_TOKEN_FILE, SERVER_URL_FILE};

use crate::api::{self, ApiState};
use crate::store::{SqliteStore, Store};
use crate::util::write_private;

/// Token signing key (RSA, PKCS#8; its public half is written beside it).
pub const TOKEN_KEY_FILE: &str = "pki/token.key";
/// Admin token length in random bytes (hex-encoded on disk).
const ADMIN_TOKEN_BYTES: usize = 32;

/// Settings of `cdi serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Listen address (port 0 picks a free port; `server.url` tells clients which).
    pub listen: SocketAddr,
    /// Worker restart back-off base.
    pub backoff_base: Duration,
}

/// How long the node agent gets to stop its pods after SIGTERM: their own grace (capped by
/// the agent) plus a little; the agent logs what did not stop in time.
const SHUTDOWN_GRACE: Duration =
    Duration::from_secs(cdi_node::process::MAX_TERMINATION_GRACE.as_secs() + 10);

fn load_or_create_token(path: &Path) -> anyhow::Result<String> {
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let bytes = crate::util::random_bytes(ADMIN_TOKEN_BYTES)
        .context("reading random bytes for the admin token")?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(path, format!("{token}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(token)
}

fn write_atomic(path: &Path, body: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body)?;
    std::fs::rename(tmp, path)
}

/// The SQLite database (objects, Secrets included) inside the data directory.
pub const DB_FILE: &str = "cdi.db";
/// Mode of the data directory: it holds credentials, keys and volumes, so only the user
/// running `cdi serve` may enter it.
const DATA_DIR_MODE: u32 = 0o700;
/// Mode of every file holding secrets (the database and its WAL/SHM companions, keys, tokens).
const PRIVATE_FILE_MODE: u32 = 0o600;

/// Create (or tighten) the data directory so that nothing in it is readable by other local
/// users: the directory 0700, the database and its `-wal`/`-shm` files 0600, and a process
/// umask of 077 so every file created later (logs, certificates, volumes) starts private.
fn make_private_data_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DATA_DIR_MODE)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    // An existing directory keeps its old mode through create(): tighten it explicitly.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DATA_DIR_MODE))
        .with_context(|| format!("making {} private", dir.display()))?;
    // SQLite gives the WAL and SHM files the database file's mode, so the database is created
    // 0600 before SQLite first opens it; files from older versions are tightened.
    let db = dir.join(DB_FILE);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(PRIVATE_FILE_MODE)
        .open(&db)
        .with_context(|| format!("creating {}", db.display()))?;
    for suffix in ["", "-wal", "-shm"] {
        let f = dir.join(format!("{DB_FILE}{suffix}"));
        if f.exists() {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))
                .with_context(|| format!("making {} private", f.display()))?;
        }
    }
    Ok(())
}

/// Subject of the CA `cdi serve` creates in its data directory.
const CA_COMMON_NAME: &str = "cdi-serve-ca";

/// glibc malloc arenas `cdi serve` may use. glibc gives a thread that finds the heap busy an
/// arena of its own, up to 8 per core, and memory freed into one arena is not reused by the
/// others: with the blocking pool's threads serving the store, RSS reached 2.5× the live heap
/// (bench s8: 163 MiB for 100 DataVolumes). Two arenas keep it within the 64 MiB target.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENAS: libc::c_int = 2;

/// Apply [`MALLOC_ARENAS`] (before the API's threads allocate; arenas are made lazily).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; glibc serializes it internally and it
    // affects arenas created afterwards. No pointer is passed.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}

/// Run `cdi serve` until SIGINT/SIGTERM.
pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    limit_malloc_arenas();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = &opts.data_dir;
    make_private_data_dir(dir)?;
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.join(DB_FILE)).context("opening the store")?);
    let block_unavailable = crate::storage::probe_loop_devices(&dir.join("run"))
        .err()
        .map(|e| e.to_string());
    if let Some(why) = &block_unavailable {
        tracing::warn!(reason = %why, "storage class local-block is unavailable");
    }
    crate::config::bootstrap(store.as_ref(), block_unavailable.as_deref())
        .context("creating built-in objects")?;
    let ca = Arc::new(
        cdi_pki::Ca::load_or_create(&dir.join("pki"), CA_COMMON_NAME).context("loading the CA")?,
    );
    let token = load_or_create_token(&dir.join(ADMIN_TOKEN_FILE))?;

    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("listening on {}", opts.listen))?;
    let addr = listener.local_addr()?;
    let mut ips = vec![std::net::IpAddr::from([127, 0, 0, 1])];
    if !ips.contains(&addr.ip()) {
        ips.push(addr.ip());
    }
    let server_cert = ca
        .issue_server(&["localhost"], &ips)
        .context("issuing the server certificate")?;
    server_cert
        .write_files(&dir.join("pki/server.crt"), &dir.join("pki/server.key"))
        .context("writing the server certificate")?;
    let tls_cfg = cdi_pki::server_config(&server_cert, cdi_pki::ClientAuth::None)
        .context("building the server's TLS configuration")?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_cfg));

    // The upload PKI the controller reads from the CDI namespace is this data directory's CA,
    // so the embedded proxy can trust upload servers and present a client certificate they
    // accept from the first request on.
    let upload_creds = crate::config::bootstrap_upload_pki(store.as_ref(), &ca)
        .context("creating the upload PKI")?;
    let client_tls = cdi_pki::client_config(
        cdi_pki::ServerTrust::Ca(&upload_creds.server_ca_pem),
        Some(&upload_creds.client),
    )
    .context("building the proxy's TLS client")?;
    let signer = Arc::new(
        cdi_token::TokenSigner::load_or_generate(&dir.join(TOKEN_KEY_FILE))
            .context("loading the token signing key")?,
    );

    // Owner references and namespace deletion, as Kubernetes' garbage collector.
    tokio::spawn(crate::gc::run(Arc::clone(&store)));

    let kubeconfig =
        crate::kubeconfig::write(dir, &format!("https://{addr}"), ca.cert_pem(), &token)
            .context("writing the kubeconfig")?;
    let admin = axum::middleware::from_fn_with_state(Arc::new(token.clone()), api::require_admin);
    let resources = api::router(
        Arc::new(ApiState {
            store: Arc::clone(&store),
            log_root: Some(dir.clone()),
        }),
        cdi_apiserver::router(cdi_apiserver::ApiState {
            signer: Arc::clone(&signer),
        }),
    )
    .layer(admin);
    let kube = in_process_client(resources.clone(), &token)?;
    // The proxy paths authenticate with upload tokens, not the admin token; it also serves
    // `/healthz`.
    let proxy = cdi_uploadproxy::router(cdi_uploadproxy::ProxyState {
        verifier: signer.verifier(),
        resolver: Arc::new(cdi_controller::upload::KubeResolver {
            client: kube.clone(),
        }),
        client_tls: Arc::new(client_tls),
    });
    let app = proxy.merge(api::health_router()).merge(resources);

    write_atomic(&dir.join(SERVER_URL_FILE), &format!("https://{addr}\n"))?;
    tracing::info!(%addr, data_dir = %dir.display(), "cdi serve listening");
    eprintln!(
        "cdi serve: listening on https://{addr} (data dir {})",
        dir.display()
    );
    eprintln!(
        "cdi serve: kubectl and other Kubernetes clients: export KUBECONFIG={}",
        kubeconfig.display()
    );

    let accept = async move {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    };
    tokio::spawn(accept);

    // The same controller `cdi controller` runs on a cluster, and the node this host provides.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let controller = tokio::spawn(cdi_controller::run(
        kube.clone(),
        cdi_controller::ControllerConfig {
            shutdown: shutdown.clone(),
            ..Default::default()
        },
    ));
    let mut node = cdi_node::NodeConfig::new(dir.clone(), dir.join("run"))
        .context("configuring the node agent")?;
    node.restart_backoff_base = opts.backoff_base;
    let mut agent = tokio::spawn(cdi_node::run_node_agent(
        kube.clone(),
        node.clone(),
        shutdown.clone(),
    ));
    let mut provisioner = tokio::spawn(cdi_node::run_provisioner(kube, node, shutdown.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Any part stopping on its own is a failure of the whole: stop the rest and say why.
    let (mut agent_done, mut provisioner_done) = (false, false);
    let failed = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        r = controller => Some(format!("the DataVolume controller stopped: {}", outcome(r))),
        r = &mut agent => {
            agent_done = true;
            Some(format!("the node agent stopped: {}", outcome(r)))
        }
        r = &mut provisioner => {
            provisioner_done = true;
            Some(format!("the local provisioner stopped: {}", outcome(r)))
        }
    };
    shutdown.cancel();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        if !agent_done {
            let _ = agent.await;
        }
        if !provisioner_done {
            let _ = provisioner.await;
        }
    })
    .await;
    match failed {
        Some(why) => anyhow::bail!(why),
        None => Ok(()),
    }
}

fn outcome<E: std::fmt::Display>(r: Result<Result<(), E>, tokio::task::JoinError>) -> String {
    match r {
        Ok(Ok(())) => "its watches ended".to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    }
}

/// A `kube::Client` of this process's own API that calls the API router in memory: the same
/// handlers, admission and admin-token check as over HTTPS, without a TLS connection per watch
/// (a controller, a node agent and a provisioner hold a dozen watches and, under load, as many
/// pooled connections again, each with buffers on both ends). The controller and the node
/// use nothing but this client, as they would on a cluster; kubectl and `cdi` reach the same
/// router over HTTPS through the kubeconfig.
fn in_process_client(api: axum::Router, token: &str) -> anyhow::Result<kube::Client> {
    let bearer = http::HeaderValue::from_str(&format!("Bearer {token}"))
        .context("the admin token is not a valid header value")?;
    let svc = tower::ServiceBuilder::new()
        .map_request(move |mut req: http::Request<kube::client::Body>| {
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, bearer.clone());
            req
        })
        .service(api);
    Ok(kube::Client::new(svc, "default"))
}
