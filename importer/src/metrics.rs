//! The progress metric on HTTPS `/metrics`, as upstream's importer serves it.
//!
//! `kubevirt_cdi_import_progress_total{ownerUID="<uid>"}` is a counter holding a percentage
//! (0–100, only ever increased). The certificate is self-signed and generated at start-up;
//! the control plane scrapes without verification, exactly as upstream's does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::error::{ErrorKind, ImportError, Result};
use crate::progress::Progress;

/// Metric name without the `_total` suffix prometheus-client appends to counters.
pub const PROGRESS_METRIC: &str = "kubevirt_cdi_import_progress";
/// Upstream's help text.
pub const PROGRESS_HELP: &str = "The import progress in percentage";

type Labels = Vec<(String, String)>;
type Percent = Counter<f64, AtomicU64>;

/// The registry with the progress counter of one owner.
pub struct ProgressMetrics {
    registry: Registry,
    family: Family<Labels, Percent>,
    labels: Labels,
    progress: Arc<Progress>,
}

impl ProgressMetrics {
    /// Metrics for `owner_uid` fed by `progress`.
    pub fn new(owner_uid: &str, progress: Arc<Progress>) -> ProgressMetrics {
        let mut registry = Registry::default();
        let family = Family::<Labels, Percent>::default();
        registry.register(PROGRESS_METRIC, PROGRESS_HELP, family.clone());
        let labels = vec![("ownerUID".to_string(), owner_uid.to_string())];
        // Present from the start with 0, so the first scrape already finds the series.
        let _ = family.get_or_create(&labels);
        ProgressMetrics {
            registry,
            family,
            labels,
            progress,
        }
    }

    /// Bring the counter up to the current percentage and render the text exposition.
    pub fn render(&self) -> String {
        let counter = self.family.get_or_create(&self.labels);
        let want = self.progress.percent();
        let have = counter.get();
        if want > have {
            counter.inc_by(want - have);
        }
        drop(counter);
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serve `metrics` on `https://addr/metrics` until the task is dropped; returns the bound
/// address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<ProgressMetrics>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    crate::tls::install_crypto_provider();
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).map_err(|e| {
            ImportError::new(
                ErrorKind::Io,
                format!("generating the metrics certificate: {e}"),
            )
        })?;
    let cert = certified.cert.der().clone();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| ImportError::new(ErrorKind::Io, format!("metrics TLS config: {e}")))?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| ImportError::io(format!("binding the metrics endpoint {addr}"), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| ImportError::io("metrics address", e))?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                                .body(Full::new(Bytes::from(metrics.render())))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"not found\n")))
                        };
                        Ok::<_, hyper::http::Error>(resp.unwrap_or_default())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_upstream_series_monotonically() {
        let p = Arc::new(Progress::default());
        let m = ProgressMetrics::new("uid-1", p.clone());
        let text = m.render();
        assert!(
            text.contains("# HELP kubevirt_cdi_import_progress The import progress in percentage"),
            "{text}"
        );
        assert!(
            text.contains("kubevirt_cdi_import_progress_total{ownerUID=\"uid-1\"} 0"),
            "{text}"
        );
        p.set_total(200);
        p.add(90);
        assert!(
            m.render().contains("{ownerUID=\"uid-1\"} 45"),
            "{}",
            m.render()
        );
        p.restart();
        assert!(
            m.render().contains("{ownerUID=\"uid-1\"} 45"),
            "never decreases"
        );
        p.complete();
        assert!(m.render().contains("{ownerUID=\"uid-1\"} 100"));
    }
}
