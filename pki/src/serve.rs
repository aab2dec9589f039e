//! Serving an axum router over TLS with the peer's verified certificate chain attached.
//!
//! axum's own `serve` has no TLS; this is the one accept loop the upload server, the standalone
//! upload proxy and (if it likes) the control plane use. Each request carries the client's
//! certificates (already verified by rustls against the configured CA) as a
//! [`PeerCertificates`] extension, so handlers can check the common name the way upstream's
//! upload server does.
//!
//! Shutdown is graceful: when the `shutdown` future completes the listener closes, in-flight
//! requests finish (the upload server relies on this to deliver its final `200` before it
//! exits), and idle keep-alive connections are closed.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// A TLS handshake that has not finished by then is dropped (slowloris protection; a real
/// client completes it in milliseconds).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upstream's `ReadHeaderTimeout`: request headers must arrive within 10 s.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful shutdown waits for in-flight requests before giving up on them.
/// Sized for the final response of an upload (already computed when shutdown starts).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The client's certificate chain as presented in the TLS handshake (leaf first). Only present
/// when the client sent one; rustls has verified it against the server's client CA.
#[derive(Debug, Clone, Default)]
pub struct PeerCertificates(pub Arc<Vec<CertificateDer<'static>>>);

impl PeerCertificates {
    /// Common names of the leaf certificate.
    pub fn common_names(&self) -> Vec<String> {
        self.0
            .first()
            .map(|leaf| crate::peer_common_names(leaf))
            .unwrap_or_default()
    }
}

/// Serve `router` on `listener` over TLS until `shutdown` completes, then drain.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!("tls handshake with {remote} failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!("tls handshake with {remote} timed out");
                    return;
                }
            };
            let peer = PeerCertificates(Arc::new(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.to_vec())
                    .unwrap_or_default(),
            ));
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(peer.clone());
                let router = router.clone();
                async move {
                    Ok::<_, Infallible>(router.oneshot(req).await.unwrap_or_else(|e| match e {}))
                }
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!("connection from {remote} ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing anyway");
    }
    Ok(())
}
