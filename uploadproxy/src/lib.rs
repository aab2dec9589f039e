//! The upload proxy: checks an upload token, finds the volume's upload server, and streams the
//! request to it over mutual TLS.
//!
//! ```text
//!  client ──HTTPS, Authorization: Bearer <token>──► router(ProxyState)
//!     │ 400 no/odd bearer · 401 bad signature/expired/issuer · 400 wrong operation/resource
//!     ▼
//!  resolver.resolve(ns, pvc)  (NotReady → poll every 1 s for READY_WAIT, then 503)
//!     │ 503 (HTML-escaped reason): not found · not an upload target · already complete
//!     ▼
//!  hyper http1 client over tokio-rustls (client cert CN client.upload-server.cdi.kubevirt.io,
//!  server CA pinned) ──► https://127.0.0.1:PORT/<same path>  (archive volumes: upload-archive)
//!     body streamed frame by frame (no buffering; a cut client body aborts the upstream request)
//! ```
//!
//! Mounting: [`router`] returns an `axum::Router` that the control plane (`cdi serve`) merges into
//! its HTTPS listener; it authenticates with the upload token only (no admin token). The
//! standalone `cdi uploadproxy` serves the same router with a static resolver.
//!
//! Paths: `/v1beta1/{upload, upload-async, upload-form, upload-form-async}`, the same under
//! `/v1alpha1/`, our `/v1beta1/upload-offset` (resume protocol, see `cdi-uploadserver`), and
//! `/healthz`. Every response carries permissive CORS headers and `OPTIONS` preflights are
//! answered, so a browser page can upload. Unlike upstream, `x-cdi-content-type` from outside
//! is dropped (it would switch the upload server to its clone path).

pub mod cli;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use cdi_token::{TokenError, TokenVerifier};
use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

/// How long the proxy waits for an upload server to become ready (upstream: 10 s).
pub const READY_WAIT: Duration = Duration::from_secs(10);
/// Interval between readiness checks while waiting (upstream: 1 s).
pub const READY_POLL: Duration = Duration::from_secs(1);
/// Connecting to an upload server (TCP + TLS) must not take longer than this; it runs on the
/// same host or cluster network.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A refused request's body is still read (and dropped) for this long after the answer went
/// out. A client streaming a large body without `Expect: 100-continue` (virtctl does) whose
/// connection is closed with its data unread gets a reset while still sending and loses the
/// answer with it; reading on a little longer, as nginx's lingering close does, lets the
/// answer arrive. The answer itself does not wait.
pub const REFUSED_BODY_LINGER: Duration = Duration::from_secs(2);
/// At most this much of a refused body is read (loopback moves it in well under the linger).
pub const REFUSED_BODY_MAX: u64 = 256 << 20;

/// Where an upload for a volume goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadTarget {
    /// Base URL of the upload server, e.g. `https://127.0.0.1:PORT`.
    pub url: url::Url,
    /// Name the upload server's certificate is checked against (a DNS name or an IP).
    pub server_name: String,
    /// Archive volume: every upload path is rewritten to `upload-archive`.
    pub archive: bool,
}

/// Why a volume cannot take an upload (all 503 at the proxy, as upstream).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The volume does not exist.
    #[error("rejecting Upload Request for PVC that doesn't exist")]
    NotFound,
    /// The volume exists but is not an upload volume.
    #[error("PVC is not an upload target")]
    NotUploadTarget,
    /// The upload already succeeded.
    #[error(
        "rejecting Upload Request for PVC that {}",
        cdi_api::upload::ALREADY_FINISHED
    )]
    AlreadyComplete,
    /// The upload server is not ready (yet); the proxy keeps polling for [`READY_WAIT`].
    #[error("upload server is not ready: {0}")]
    NotReady(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// Finds the upload server of a volume. Implemented by the control plane (its store) and by
/// [`StaticResolver`].
pub trait UploadTargetResolver: Send + Sync {
    /// Resolve `namespace/pvc` to its upload server.
    fn resolve<'a>(
        &'a self,
        namespace: &'a str,
        pvc: &'a str,
    ) -> BoxFuture<'a, Result<UploadTarget, ResolveError>>;
}

/// A fixed table of volumes (the standalone proxy, tests).
#[derive(Debug, Clone, Default)]
pub struct StaticResolver {
    targets: std::collections::HashMap<(String, String), UploadTarget>,
}

impl StaticResolver {
    /// Add `namespace/pvc` → `target`.
    pub fn insert(&mut self, namespace: &str, pvc: &str, target: UploadTarget) {
        self.targets
            .insert((namespace.to_string(), pvc.to_string()), target);
    }
}

impl UploadTargetResolver for StaticResolver {
    fn resolve<'a>(
        &'a self,
        namespace: &'a str,
        pvc: &'a str,
    ) -> BoxFuture<'a, Result<UploadTarget, ResolveError>> {
        let found = self
            .targets
            .get(&(namespace.to_string(), pvc.to_string()))
            .cloned();
        Box::pin(async move { found.ok_or(ResolveError::NotFound) })
    }
}

/// What the proxy router needs.
#[derive(Clone)]
pub struct ProxyState {
    /// Checks upload tokens.
    pub verifier: TokenVerifier,
    /// Finds upload servers.
    pub resolver: Arc<dyn UploadTargetResolver>,
    /// TLS to upload servers: trusts their CA, presents the proxy's client certificate.
    pub client_tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ProxyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyState").finish_non_exhaustive()
    }
}

/// Upload paths the proxy exposes (per API version); archive is chosen by the volume.
pub const UPLOAD_PATHS: [&str; 4] = ["upload", "upload-async", "upload-form", "upload-form-async"];
/// Resume-protocol offset query path (ours).
pub const OFFSET_PATH: &str = "upload-offset";

/// Request headers allowed in CORS preflights.
const CORS_ALLOW_HEADERS: &str = "Authorization, Content-Type, Content-Length, Content-Digest, \
                                  Upload-Offset, Accept, Origin, X-Requested-With, User-Agent";
/// Response headers a browser page may read.
const CORS_EXPOSE_HEADERS: &str = "Upload-Offset";

/// The proxy router (see the crate docs). It checks upload tokens itself and needs no other
/// authentication.
pub fn router(state: ProxyState) -> Router {
    let state = Arc::new(state);
    let mut router = Router::new().route("/healthz", get(|| async { "OK" }));
    for version in ["v1beta1", "v1alpha1"] {
        for name in UPLOAD_PATHS.iter().chain([&OFFSET_PATH]) {
            router = router.route(&format!("/{version}/{name}"), any(proxy));
        }
    }
    router.with_state(state).layer(middleware::from_fn(cors))
}

async fn cors(req: Request, next: Next) -> Response {
    let mut resp = if req.method() == Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(CORS_ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(CORS_EXPOSE_HEADERS),
    );
    resp
}

/// Escape text for inclusion in an HTML page (upstream escapes proxy errors against XSS).
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn text(status: StatusCode, message: &str) -> Response {
    let mut r = (status, html_escape(message)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Extract the bearer token: upstream accepts `Bearer <[A-Za-z0-9-._~+/]+=*>` case-insensitively.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    let body = token.trim_end_matches('=');
    let ok = !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
    ok.then_some(token)
}

/// The status a token failure maps to: 401 for authentication failures, 400 for the rest.
pub fn token_status(err: &TokenError) -> StatusCode {
    if err.is_unauthorized() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::BAD_REQUEST
    }
}

/// Wait for the volume's upload server: `NotReady` is polled every [`READY_POLL`] until
/// `wait` has passed; every other failure is final at once.
pub async fn resolve_ready(
    resolver: &dyn UploadTargetResolver,
    namespace: &str,
    pvc: &str,
    wait: Duration,
) -> Result<UploadTarget, ResolveError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match resolver.resolve(namespace, pvc).await {
            Err(ResolveError::NotReady(why))
                if tokio::time::Instant::now() + READY_POLL <= deadline =>
            {
                tracing::debug!("upload server of {namespace}/{pvc} not ready: {why}");
                tokio::time::sleep(READY_POLL).await;
            }
            other => return other,
        }
    }
}

fn resolve_message(err: &ResolveError, namespace: &str, pvc: &str) -> String {
    match err {
        ResolveError::NotFound => {
            format!("rejecting Upload Request for PVC {namespace}/{pvc} that doesn't exist")
        }
        ResolveError::NotUploadTarget => format!("PVC {namespace}/{pvc} is not an upload target"),
        ResolveError::AlreadyComplete => {
            format!(
                "rejecting Upload Request for PVC {namespace}/{pvc} that {}",
                cdi_api::upload::ALREADY_FINISHED
            )
        }
        ResolveError::NotReady(why) => {
            format!("upload server of PVC {namespace}/{pvc} is not ready: {why}")
        }
        ResolveError::Other(why) => format!("PVC {namespace}/{pvc}: {why}"),
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) are not forwarded, nor the token, nor upstream's
/// clone switch.
const DROPPED_HEADERS: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "host",
    "authorization",
    "x-cdi-content-type",
    "transfer-encoding",
];

/// Answer `status` at once and read what the client still sends for a moment (see
/// [`REFUSED_BODY_LINGER`]).
fn refuse(req: Request, status: StatusCode, message: &str) -> Response {
    let mut body = req.into_body().into_data_stream();
    tokio::spawn(async move {
        let mut read = 0u64;
        let _ = tokio::time::timeout(REFUSED_BODY_LINGER, async {
            while let Some(Ok(chunk)) = futures::StreamExt::next(&mut body).await {
                read += chunk.len() as u64;
                if read > REFUSED_BODY_MAX {
                    break;
                }
            }
        })
        .await;
    });
    text(status, message)
}

async fn proxy(State(state): State<Arc<ProxyState>>, req: Request) -> Response {
    let Some(token) = bearer_token(req.headers()) else {
        return refuse(
            req,
            StatusCode::BAD_REQUEST,
            "missing or malformed Authorization: Bearer header",
        );
    };
    let claims = match state.verifier.verify(token) {
        Ok(c) => c,
        Err(e) => return refuse(req, token_status(&e), &e.to_string()),
    };
    if let Err(e) = claims.check_upload() {
        return refuse(req, StatusCode::BAD_REQUEST, &e.to_string());
    }
    let (ns, pvc) = (claims.namespace.as_str(), claims.name.as_str());
    let target = match resolve_ready(state.resolver.as_ref(), ns, pvc, READY_WAIT).await {
        Ok(t) => t,
        Err(e) => {
            let message = resolve_message(&e, ns, pvc);
            return refuse(req, StatusCode::SERVICE_UNAVAILABLE, &message);
        }
    };
    match forward(&state, &target, req).await {
        Ok(resp) => resp,
        Err(e) => text(
            StatusCode::BAD_GATEWAY,
            &format!("error in upload-proxy: {e}"),
        ),
    }
}

/// The upstream path for `path` on `target` (archive volumes go to `upload-archive`).
pub fn upstream_path(path: &str, archive: bool) -> String {
    if archive && !path.ends_with(OFFSET_PATH) {
        let version = if path.contains("alpha") {
            "v1alpha1"
        } else {
            "v1beta1"
        };
        return format!("/{version}/upload-archive");
    }
    path.to_string()
}

async fn forward(
    state: &ProxyState,
    target: &UploadTarget,
    req: Request,
) -> Result<Response, String> {
    let host = target
        .url
        .host_str()
        .ok_or("upload server URL has no host")?
        .to_string();
    let port = target.url.port_or_known_default().unwrap_or(443);
    let server_name = ServerName::try_from(target.server_name.clone())
        .map_err(|e| format!("bad server name {:?}: {e}", target.server_name))?;
    let connector = tokio_rustls::TlsConnector::from(state.client_tls.clone());
    let connect = async {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("tls to upload server: {e}"))
    };
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| "connecting to upload server timed out".to_string())??;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("upload server connection: {e}");
        }
    });

    let (parts, body) = req.into_parts();
    let path = upstream_path(parts.uri.path(), target.archive);
    let uri: Uri = path.parse().map_err(|e| format!("bad path: {e}"))?;
    let mut out = http::Request::builder()
        .method(parts.method.clone())
        .uri(uri);
    for (name, value) in &parts.headers {
        if !DROPPED_HEADERS.contains(&name.as_str()) {
            out = out.header(name, value);
        }
    }
    out = out.header(header::HOST, target.server_name.as_str());
    if !parts.headers.contains_key(header::USER_AGENT) {
        // Upstream sends an empty User-Agent rather than Go's default.
        out = out.header(header::USER_AGENT, "");
    }
    let out = out.body(body).map_err(|e| e.to_string())?;
    let resp = sender.send_request(out).await.map_err(|e| e.to_string())?;
    let (mut parts, body) = resp.into_parts();
    for name in ["connection", "keep-alive", "transfer-encoding"] {
        parts.headers.remove(HeaderName::from_static(name));
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn bearer_is_case_insensitive() {
        assert_eq!(
            bearer_token(&auth("bearer abc.def-ghi")),
            Some("abc.def-ghi")
        );
        assert_eq!(bearer_token(&auth("Bearer abc")), Some("abc"));
    }

    #[test]
    fn other_schemes_and_odd_tokens_are_refused() {
        assert_eq!(bearer_token(&auth("Basic dXNlcjpwYXNz")), None);
        assert_eq!(bearer_token(&auth("Bearer a<b")), None);
        assert_eq!(bearer_token(&auth("Bearer")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn token_failures_map_to_upstream_statuses() {
        assert_eq!(token_status(&TokenError::Expired), StatusCode::UNAUTHORIZED);
        assert_eq!(
            token_status(&TokenError::BadSignature),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            token_status(&TokenError::WrongIssuer),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            token_status(&TokenError::Malformed("x".into())),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            token_status(&TokenError::MissingTarget),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            html_escape("<script>alert('x')</script>&"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;"
        );
    }

    #[test]
    fn archive_volumes_get_the_archive_path() {
        assert_eq!(
            upstream_path("/v1beta1/upload-form-async", true),
            "/v1beta1/upload-archive"
        );
        assert_eq!(
            upstream_path("/v1alpha1/upload", true),
            "/v1alpha1/upload-archive"
        );
        assert_eq!(upstream_path("/v1beta1/upload", false), "/v1beta1/upload");
    }

    struct Flaky(std::sync::atomic::AtomicU32);

    impl UploadTargetResolver for Flaky {
        fn resolve<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<UploadTarget, ResolveError>> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                if n < 2 {
                    Err(ResolveError::NotReady("pod starting".into()))
                } else {
                    Ok(UploadTarget {
                        url: "https://127.0.0.1:1".parse().unwrap(),
                        server_name: "127.0.0.1".into(),
                        archive: false,
                    })
                }
            })
        }
    }

    #[tokio::test]
    async fn not_ready_is_polled_until_ready() {
        let r = Flaky(0.into());
        assert!(resolve_ready(&r, "ns", "p", READY_WAIT).await.is_ok());
    }

    #[tokio::test]
    async fn not_ready_gives_up_after_the_wait() {
        let r = Flaky(0.into());
        let res = resolve_ready(&r, "ns", "p", Duration::from_millis(1500)).await;
        assert!(matches!(res, Err(ResolveError::NotReady(_))));
    }

    #[tokio::test]
    async fn missing_volume_is_final_at_once() {
        let r = StaticResolver::default();
        assert_eq!(
            resolve_ready(&r, "ns", "p", READY_WAIT).await,
            Err(ResolveError::NotFound)
        );
    }
}
