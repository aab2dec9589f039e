//! HTTP(S) source: `HEAD` for the size, `GET` (with `Range` + `If-Range` to resume) for the body.
//!
//! Redirects are followed here, not by the client, so the credentials (basic auth from
//! `accessKeyId`/`secretKey`, secret extra headers) are only ever sent to the origin the user
//! gave them for: a redirect to another scheme, host or port gets the plain extra headers only.

use std::sync::Mutex;

use futures::TryStreamExt;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use url::Url;

use super::{BoxFuture, ByteSource, Opened};
use crate::error::{ErrorKind, ImportError, Result};
use crate::tls::describe_error;

/// Redirect hops followed before giving up (browsers use ~20; images rarely need more than 2).
pub const MAX_REDIRECTS: usize = 10;

/// Basic-auth credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User (`accessKeyId`).
    pub user: String,
    /// Password (`secretKey`).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.user)
    }
}

/// Parse a `Name: value` header (split at the first colon).
pub fn parse_header(line: &str) -> Result<(HeaderName, HeaderValue)> {
    let (name, value) = line.split_once(':').ok_or_else(|| {
        ImportError::config(format!("invalid header {line:?}: expected 'Name: value'"))
    })?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| ImportError::config(format!("invalid header name {:?}", name.trim())))?;
    let value = HeaderValue::from_str(value.trim())
        .map_err(|_| ImportError::config(format!("invalid value for header {name}")))?;
    Ok((name, value))
}

/// True when `b` has the same scheme, host and port as `a`: only then may credentials meant
/// for `a` be sent to `b`.
pub fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str().map(str::to_ascii_lowercase) == b.host_str().map(str::to_ascii_lowercase)
        && a.port_or_known_default() == b.port_or_known_default()
}

/// What an HTTP source sends.
#[derive(Debug, Clone, Default)]
pub struct HttpAuth {
    /// Basic auth, same origin only.
    pub credentials: Option<Credentials>,
    /// Extra headers sent everywhere.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Secret extra headers, same origin only.
    pub secret_headers: Vec<(HeaderName, HeaderValue)>,
}

/// An HTTP(S) URL.
pub struct HttpSource {
    client: reqwest::Client,
    url: Url,
    auth: HttpAuth,
    /// Where the last redirect chain ended, so resumes skip the hops.
    resolved: Mutex<Option<Url>>,
}

impl HttpSource {
    /// A source for `url` using `client` (built by [`crate::tls::build_client`]).
    pub fn new(client: reqwest::Client, url: Url, auth: HttpAuth) -> Result<HttpSource> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ImportError::config(format!(
                "unsupported URL scheme in {url}"
            )));
        }
        Ok(HttpSource {
            client,
            url,
            auth,
            resolved: Mutex::new(None),
        })
    }

    /// The headers for a request to `target` (credentials only on the original origin).
    pub fn headers_for(&self, target: &Url) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in &self.auth.headers {
            map.append(n.clone(), v.clone());
        }
        if same_origin(&self.url, target) {
            for (n, v) in &self.auth.secret_headers {
                map.append(n.clone(), v.clone());
            }
            if let Some(c) = &self.auth.credentials {
                let token = base64_basic(&c.user, &c.password);
                if let Ok(v) = HeaderValue::from_str(&format!("Basic {token}")) {
                    map.insert(header::AUTHORIZATION, v);
                }
            }
        }
        map
    }

    /// Send `method` with `extra` headers, following redirects ourselves.
    async fn send(&self, method: Method, extra: &HeaderMap) -> Result<reqwest::Response> {
        let start = self
            .resolved
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| self.url.clone());
        let mut target = start;
        for _ in 0..=MAX_REDIRECTS {
            let mut headers = self.headers_for(&target);
            for (n, v) in extra {
                headers.insert(n.clone(), v.clone());
            }
            let resp = self
                .client
                .request(method.clone(), target.clone())
                .headers(headers)
                .send()
                .await
                .map_err(|e| ImportError::connect(describe_error(&e)))?;
            if resp.status().is_redirection()
                && let Some(loc) = resp.headers().get(header::LOCATION)
            {
                let loc = loc.to_str().map_err(|_| {
                    ImportError::connect("redirect with an invalid Location header")
                })?;
                target = target.join(loc).map_err(|e| {
                    ImportError::connect(format!("redirect to invalid URL {loc:?}: {e}"))
                })?;
                continue;
            }
            if let Ok(mut r) = self.resolved.lock() {
                *r = Some(target);
            }
            return Ok(resp);
        }
        Err(ImportError::connect(format!(
            "too many redirects (more than {MAX_REDIRECTS}) from {}",
            self.url
        )))
    }
}

/// Upstream's wording for an unexpected status.
pub fn status_error(expected: u16, got: StatusCode) -> ImportError {
    ImportError::connect(format!(
        "expected status code {expected}, got {}. Status: {got}",
        got.as_u16()
    ))
}

/// A strong `ETag`, else `Last-Modified`: what `If-Range` may carry.
pub fn validator(headers: &HeaderMap) -> Option<String> {
    let etag = headers.get(header::ETAG).and_then(|v| v.to_str().ok());
    if let Some(tag) = etag.filter(|t| !t.starts_with("W/")) {
        return Some(tag.to_string());
    }
    headers
        .get(header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `Content-Range: bytes a-b/total` → (a, total).
pub fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, _) = range.split_once('-')?;
    Some((a.trim().parse().ok()?, total.trim().parse().ok()))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The body of `resp` as an [`Opened`] starting at `start`.
pub fn opened_from(resp: reqwest::Response, start: u64, total: Option<u64>) -> Opened {
    let validator = validator(resp.headers());
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let stream = resp
        .bytes_stream()
        .map_err(|e| std::io::Error::other(describe_error(&e)));
    Opened {
        stream: Box::pin(stream),
        start,
        total,
        validator,
        content_type,
    }
}

/// Interpret the response to a (possibly ranged) GET.
pub fn interpret_get(resp: reqwest::Response, offset: u64) -> Result<Opened> {
    let status = resp.status();
    match status {
        StatusCode::OK => {
            let total = content_length(resp.headers());
            Ok(opened_from(resp, 0, total))
        }
        StatusCode::PARTIAL_CONTENT if offset > 0 => {
            let cr = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok());
            match cr.and_then(parse_content_range) {
                Some((start, total)) if start == offset => Ok(opened_from(resp, start, total)),
                _ => Err(ImportError::new(
                    ErrorKind::Transfer,
                    format!(
                        "server answered a resume at byte {offset} with an unusable Content-Range {cr:?}"
                    ),
                )),
            }
        }
        other => Err(status_error(200, other)),
    }
}

fn base64_basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

impl ByteSource for HttpSource {
    fn open(&self, offset: u64, validator: Option<String>) -> BoxFuture<'_, Result<Opened>> {
        Box::pin(async move {
            let mut extra = HeaderMap::new();
            if offset > 0 {
                let range = HeaderValue::from_str(&format!("bytes={offset}-"))
                    .map_err(|_| ImportError::config("invalid range"))?;
                extra.insert(header::RANGE, range);
                if let Some(v) = validator
                    .as_deref()
                    .and_then(|v| HeaderValue::from_str(v).ok())
                {
                    extra.insert(header::IF_RANGE, v);
                }
            }
            let resp = self.send(Method::GET, &extra).await?;
            interpret_get(resp, offset)
        })
    }

    fn probe_len(&self) -> BoxFuture<'_, Option<u64>> {
        Box::pin(async move {
            let resp = self.send(Method::HEAD, &HeaderMap::new()).await.ok()?;
            if resp.status() != StatusCode::OK {
                return None;
            }
            content_length(resp.headers())
        })
    }

    fn kind(&self) -> &'static str {
        "http"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(url: &str) -> HttpSource {
        crate::tls::install_crypto_provider();
        let auth = HttpAuth {
            credentials: Some(Credentials {
                user: "u".into(),
                password: "p".into(),
            }),
            headers: vec![parse_header("X-Test: plain").unwrap()],
            secret_headers: vec![parse_header("X-Secret: s3cret").unwrap()],
        };
        HttpSource::new(reqwest::Client::new(), Url::parse(url).unwrap(), auth).unwrap()
    }

    #[test]
    fn credentials_stay_with_their_origin() {
        let s = source("https://images.example.com/disk.img");
        let same = s.headers_for(&Url::parse("https://images.example.com:443/other").unwrap());
        assert!(same.contains_key(header::AUTHORIZATION));
        assert_eq!(same.get("x-secret").unwrap(), "s3cret");
        for other in [
            "https://cdn.example.com/disk.img",
            "http://images.example.com/disk.img",
            "https://images.example.com:8443/disk.img",
        ] {
            let h = s.headers_for(&Url::parse(other).unwrap());
            assert!(!h.contains_key(header::AUTHORIZATION), "{other}");
            assert!(!h.contains_key("x-secret"), "{other}");
            assert_eq!(h.get("x-test").unwrap(), "plain", "{other}");
        }
    }

    #[test]
    fn headers_split_at_the_first_colon() {
        let (n, v) = parse_header("Authorization: Bearer a:b").unwrap();
        assert_eq!(n, header::AUTHORIZATION);
        assert_eq!(v, "Bearer a:b");
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: x").is_err());
    }

    #[test]
    fn status_message_has_upstream_shape() {
        let e = status_error(200, StatusCode::NOT_FOUND);
        assert_eq!(
            e.to_string(),
            "expected status code 200, got 404. Status: 404 Not Found"
        );
    }

    #[test]
    fn content_range_and_validators() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((100, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        let mut h = HeaderMap::new();
        h.insert(header::ETAG, HeaderValue::from_static("W/\"weak\""));
        h.insert(
            header::LAST_MODIFIED,
            HeaderValue::from_static("Wed, 21 Oct 2026 07:28:00 GMT"),
        );
        assert_eq!(
            validator(&h).as_deref(),
            Some("Wed, 21 Oct 2026 07:28:00 GMT")
        );
        h.insert(header::ETAG, HeaderValue::from_static("\"strong\""));
        assert_eq!(validator(&h).as_deref(), Some("\"strong\""));
    }

    #[test]
    fn only_http_schemes() {
        let r = HttpSource::new(
            reqwest::Client::new(),
            Url::parse("ftp://x/y").unwrap(),
            HttpAuth::default(),
        );
        assert!(r.is_err());
    }
}
