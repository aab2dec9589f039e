//! Readiness probes, as the kubelet runs them against a pod's IP.
//!
//! `httpGet` sends one HTTP/1.1 request (over TLS without verification for scheme HTTPS, as
//! the kubelet does) and passes on a 2xx/3xx status; `tcpSocket` passes when a connection
//! opens. `exec` and `grpc` probes are not supported and count as passing once the process
//! runs, which is also what a container without a readiness probe gets.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Kubernetes' default `periodSeconds`.
const DEFAULT_PERIOD: Duration = Duration::from_secs(10);
/// Kubernetes' default `timeoutSeconds`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Kubernetes' default `failureThreshold`.
const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// Enough of a response to hold its status line.
const MAX_STATUS_LINE: usize = 1024;

/// A readiness check the agent can run.
#[derive(Debug, Clone)]
pub enum Check {
    /// `httpGet`.
    Http {
        /// TLS (no verification) or plain.
        https: bool,
        /// Port on the pod IP.
        port: u16,
        /// Request path.
        path: String,
    },
    /// `tcpSocket`.
    Tcp {
        /// Port on the pod IP.
        port: u16,
    },
}

/// A container's readiness probe, resolved.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// What to check.
    pub check: Check,
    /// Before the first check.
    pub initial_delay: Duration,
    /// Between checks.
    pub period: Duration,
    /// Per check.
    pub timeout: Duration,
    /// Consecutive failures that make a ready container unready.
    pub failure_threshold: u32,
}

fn secs(v: Option<i32>, default: Duration) -> Duration {
    match v {
        Some(s) if s > 0 => Duration::from_secs(u64::try_from(s).unwrap_or(1)),
        _ => default,
    }
}

fn port(c: &Container, p: &IntOrString) -> Option<u16> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok()),
    }
}

/// The container's readiness probe, when it has one this node can run.
pub fn readiness(c: &Container) -> Option<Readiness> {
    let p: &Probe = c.readiness_probe.as_ref()?;
    let check = if let Some(h) = &p.http_get {
        Check::Http {
            https: h.scheme.as_deref() == Some("HTTPS"),
            port: port(c, &h.port)?,
            path: h
                .path
                .clone()
                .filter(|p| !p.is_empty())
                .unwrap_or("/".into()),
        }
    } else if let Some(t) = &p.tcp_socket {
        Check::Tcp {
            port: port(c, &t.port)?,
        }
    } else {
        return None;
    };
    Some(Readiness {
        check,
        initial_delay: secs(p.initial_delay_seconds, Duration::ZERO),
        period: secs(p.period_seconds, DEFAULT_PERIOD),
        timeout: secs(p.timeout_seconds, DEFAULT_TIMEOUT),
        failure_threshold: p
            .failure_threshold
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_FAILURE_THRESHOLD),
    })
}

/// Runs checks; holds the TLS client configuration (no verification: pods serve self-signed
/// certificates, and the kubelet does not verify either).
#[derive(Clone)]
pub struct Prober {
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prober")
    }
}

/// The prober's TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the probe TLS client: {0}")]
pub struct ProberError(#[from] cdi_pki::PkiError);

impl Prober {
    /// A prober.
    pub fn new() -> Result<Self, ProberError> {
        let cfg = cdi_pki::client_config(cdi_pki::ServerTrust::Insecure, None)?;
        Ok(Prober {
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        })
    }

    /// One check against `ip`; whether it passed.
    pub async fn check(&self, ip: IpAddr, check: &Check, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.check_inner(ip, check))
            .await
            .unwrap_or(false)
    }

    async fn check_inner(&self, ip: IpAddr, check: &Check) -> bool {
        let port = match check {
            Check::Http { port, .. } | Check::Tcp { port } => *port,
        };
        let Ok(tcp) = tokio::net::TcpStream::connect(SocketAddr::new(ip, port)).await else {
            return false;
        };
        let Check::Http { https, path, .. } = check else {
            return true;
        };
        if *https {
            let name = rustls::pki_types::ServerName::IpAddress(ip.into());
            match self.tls.connect(name, tcp).await {
                Ok(tls) => http_get(tls, ip, port, path).await,
                Err(_) => false,
            }
        } else {
            http_get(tcp, ip, port, path).await
        }
    }
}

/// Send `GET path` and judge the status line: 200–399 passes, as in the kubelet.
async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    ip: IpAddr,
    port: u16,
    path: &str,
) -> bool {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < MAX_STATUS_LINE {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let code: Option<u16> = line
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok());
    matches!(code, Some(200..=399))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn upload_server_probe_is_resolved_with_defaults() {
        let c: Container = serde_json::from_value(json!({
            "name": "s",
            "ports": [{"name": "https", "containerPort": 8443}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "https", "scheme": "HTTPS"},
                               "initialDelaySeconds": 2, "periodSeconds": 5}
        }))
        .unwrap();
        let r = readiness(&c).unwrap();
        assert!(
            matches!(&r.check, Check::Http { https: true, port: 8443, path } if path == "/healthz")
        );
        assert_eq!(r.initial_delay, Duration::from_secs(2));
        assert_eq!(r.period, Duration::from_secs(5));
        assert_eq!(r.timeout, DEFAULT_TIMEOUT);
        assert_eq!(r.failure_threshold, 3);
        let none: Container = serde_json::from_value(json!({"name": "s"})).unwrap();
        assert!(readiness(&none).is_none());
    }

    #[tokio::test]
    async fn http_and_tcp_checks_against_a_local_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let status = if req.starts_with("GET /healthz ") {
                    "200 OK"
                } else {
                    "503 No"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let p = Prober::new().unwrap();
        let ip = IpAddr::from([127, 0, 0, 1]);
        let t = Duration::from_secs(2);
        let http = |path: &str| Check::Http {
            https: false,
            port,
            path: path.into(),
        };
        assert!(p.check(ip, &http("/healthz"), t).await);
        assert!(!p.check(ip, &http("/other"), t).await);
        assert!(p.check(ip, &Check::Tcp { port }, t).await);
        // TLS to a plain server fails the check rather than hanging.
        let tls = Check::Http {
            https: true,
            port,
            path: "/healthz".into(),
        };
        assert!(!p.check(ip, &tls, t).await);
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(!p.check(ip, &Check::Tcp { port: dead }, t).await);
    }

    #[tokio::test]
    async fn https_check_accepts_an_untrusted_certificate() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = cdi_pki::Ca::load_or_create(tmp.path(), "probe-test-ca").unwrap();
        let pair = ca.issue_server(&["upload"], &[]).unwrap();
        let cfg = cdi_pki::server_config(&pair, cdi_pki::ClientAuth::None).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = buf[..n].starts_with(b"GET /healthz ");
                let status = if ok { "200 OK" } else { "404 Not Found" };
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
                let _ = s.shutdown().await;
            }
        });
        let p = Prober::new().unwrap();
        let ip = IpAddr::from([127, 0, 0, 1]);
        let check = |path: &str| Check::Http {
            https: true,
            port,
            path: path.into(),
        };
        assert!(
            p.check(ip, &check("/healthz"), Duration::from_secs(5))
                .await
        );
        assert!(!p.check(ip, &check("/nope"), Duration::from_secs(5)).await);
    }
}
