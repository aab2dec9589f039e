//! S3 source: one object at a path-style URL `http(s)://host[:port]/bucket/key`, signed with
//! SigV4 (static keys) or fetched anonymously.
//!
//! Upstream's region rule is kept: `s3.<region>.amazonaws.com` gives the region, any other
//! host gives its first DNS label (`minio.example.com` → `minio`); plain `s3.amazonaws.com` is
//! `us-east-1`. Requests are plain GET/HEAD with `Range` for resumes, signed per request with
//! the `aws-sigv4` crate and sent by our shared reqwest client (same CA, proxy and TLS
//! settings as HTTP sources).

use std::time::SystemTime;

use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use url::Url;

use super::http::{Credentials, interpret_get};
use super::{BoxFuture, ByteSource, Opened};
use crate::error::{ErrorKind, ImportError, Result};
use crate::tls::describe_error;

/// Region when the host names none (AWS's default).
pub const DEFAULT_REGION: &str = "us-east-1";

/// Longest S3 error body we read for its `<Code>`/`<Message>`.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// A parsed S3 object location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// `scheme://host[:port]`.
    pub endpoint: Url,
    /// Bucket.
    pub bucket: String,
    /// Object key (may contain `/`).
    pub key: String,
    /// Signing region.
    pub region: String,
}

impl S3Location {
    /// Parse upstream's endpoint form `http(s)://host[:port]/bucket/key…`.
    pub fn from_url(url: &Url) -> Result<S3Location> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ImportError::config(format!(
                "S3 endpoint must be http(s): {url}"
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| ImportError::config(format!("no host in {url}")))?;
        let path = url.path().trim_start_matches('/');
        let (bucket, key) = path
            .split_once('/')
            .filter(|(b, k)| !b.is_empty() && !k.is_empty())
            .ok_or_else(|| ImportError::config(format!("S3 URL {url} must be …/bucket/key")))?;
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let mut endpoint = url.clone();
        endpoint.set_path("");
        endpoint.set_query(None);
        endpoint.set_fragment(None);
        Ok(S3Location {
            endpoint,
            bucket: decode(bucket),
            key: decode(key),
            region: region_for_host(host),
        })
    }

    /// `s3://bucket/key` against an explicit endpoint (`cdi import --s3-endpoint`).
    pub fn from_s3_uri(uri: &str, endpoint: &Url) -> Result<S3Location> {
        let rest = uri
            .strip_prefix("s3://")
            .ok_or_else(|| ImportError::config(format!("not an s3:// URI: {uri}")))?;
        let mut url = endpoint.clone();
        url.set_path(&format!("/{rest}"));
        S3Location::from_url(&url)
    }

    /// The object URL (path style, key segments percent-encoded once).
    pub fn object_url(&self) -> Url {
        let mut url = self.endpoint.clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.clear().push(&self.bucket).extend(self.key.split('/'));
        }
        url
    }
}

/// Upstream's region rule.
pub fn region_for_host(host: &str) -> String {
    let labels: Vec<&str> = host.split('.').collect();
    if host.ends_with(".amazonaws.com") && labels.len() >= 4 && labels[0] == "s3" {
        return labels[1].to_string();
    }
    if host == "s3.amazonaws.com" {
        return DEFAULT_REGION.to_string();
    }
    labels
        .first()
        .filter(|l| !l.is_empty())
        .map_or_else(|| DEFAULT_REGION.to_string(), |l| l.to_string())
}

/// The S3 source.
pub struct S3Source {
    client: reqwest::Client,
    loc: S3Location,
    credentials: Option<Credentials>,
}

impl S3Source {
    /// A source for the object at `url` (upstream's endpoint form).
    pub fn new(
        client: reqwest::Client,
        url: &Url,
        credentials: Option<Credentials>,
    ) -> Result<S3Source> {
        Ok(S3Source {
            client,
            loc: S3Location::from_url(url)?,
            credentials,
        })
    }

    /// Where the object is.
    pub fn location(&self) -> &S3Location {
        &self.loc
    }

    /// SigV4 headers for `method url` carrying `headers`.
    pub fn sign(&self, method: &Method, url: &Url, headers: &HeaderMap) -> Result<HeaderMap> {
        let mut out = HeaderMap::new();
        let Some(creds) = &self.credentials else {
            return Ok(out);
        };
        let identity = aws_credential_types::Credentials::new(
            creds.user.clone(),
            creds.password.clone(),
            None,
            None,
            "cdi-importer",
        )
        .into();
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.loc.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| ImportError::config(format!("S3 signing parameters: {e}")))?
            .into();
        let host = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        let mut pairs: Vec<(String, String)> = vec![("host".into(), host)];
        for (n, v) in headers {
            if let Ok(v) = v.to_str() {
                pairs.push((n.as_str().to_string(), v.to_string()));
            }
        }
        let signable = SignableRequest::new(
            method.as_str(),
            url.as_str(),
            pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            SignableBody::UnsignedPayload,
        )
        .map_err(|e| ImportError::config(format!("S3 request cannot be signed: {e}")))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| ImportError::config(format!("S3 signing failed: {e}")))?
            .into_parts();
        for (name, value) in instructions.headers() {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                out.insert(n, v);
            }
        }
        Ok(out)
    }

    async fn send(&self, method: Method, extra: HeaderMap) -> Result<reqwest::Response> {
        let url = self.loc.object_url();
        let signed = self.sign(&method, &url, &extra)?;
        let mut headers = extra;
        headers.extend(signed);
        self.client
            .request(method, url)
            .headers(headers)
            .send()
            .await
            .map_err(|e| ImportError::connect(describe_error(&e)))
    }

    async fn error_from(&self, resp: reqwest::Response) -> ImportError {
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BODY)]).to_string();
        let tag = |name: &str| {
            let open = format!("<{name}>");
            let close = format!("</{name}>");
            let a = text.find(&open)? + open.len();
            let b = text[a..].find(&close)? + a;
            Some(text[a..b].to_string())
        };
        let mut msg = format!(
            "expected status code 200, got {}. Status: {status}",
            status.as_u16()
        );
        if let Some(code) = tag("Code") {
            msg.push_str(&format!(": {code}"));
            if let Some(m) = tag("Message") {
                msg.push_str(&format!(": {m}"));
            }
        }
        ImportError::connect(format!(
            "s3 object {}/{}: {msg}",
            self.loc.bucket, self.loc.key
        ))
    }
}

impl ByteSource for S3Source {
    fn open(&self, offset: u64, validator: Option<String>) -> BoxFuture<'_, Result<Opened>> {
        Box::pin(async move {
            let mut extra = HeaderMap::new();
            if offset > 0 {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-")) {
                    extra.insert(reqwest::header::RANGE, v);
                }
                if let Some(v) = validator
                    .as_deref()
                    .and_then(|v| HeaderValue::from_str(v).ok())
                {
                    extra.insert(reqwest::header::IF_RANGE, v);
                }
            }
            let resp = self.send(Method::GET, extra).await?;
            if !matches!(resp.status(), StatusCode::OK | StatusCode::PARTIAL_CONTENT) {
                return Err(self.error_from(resp).await);
            }
            interpret_get(resp, offset).map_err(|e| match e.kind() {
                ErrorKind::Connect => e.context("s3"),
                _ => e,
            })
        })
    }

    fn probe_len(&self) -> BoxFuture<'_, Option<u64>> {
        Box::pin(async move {
            let resp = self.send(Method::HEAD, HeaderMap::new()).await.ok()?;
            if resp.status() != StatusCode::OK {
                return None;
            }
            resp.headers()
                .get(reqwest::header::CONTENT_LENGTH)?
                .to_str()
                .ok()?
                .parse()
                .ok()
        })
    }

    fn kind(&self) -> &'static str {
        "s3"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_rules_match_upstream() {
        assert_eq!(region_for_host("s3.eu-west-1.amazonaws.com"), "eu-west-1");
        assert_eq!(region_for_host("s3.amazonaws.com"), "us-east-1");
        assert_eq!(region_for_host("minio.example.com"), "minio");
        assert_eq!(region_for_host("127.0.0.1"), "127");
    }

    #[test]
    fn parses_path_style_urls() {
        let loc = S3Location::from_url(
            &Url::parse("http://127.0.0.1:9000/images/os/disk%20a.qcow2").unwrap(),
        )
        .unwrap();
        assert_eq!(loc.bucket, "images");
        assert_eq!(loc.key, "os/disk a.qcow2");
        assert_eq!(loc.endpoint.as_str(), "http://127.0.0.1:9000/");
        assert_eq!(
            loc.object_url().as_str(),
            "http://127.0.0.1:9000/images/os/disk%20a.qcow2"
        );
        assert!(S3Location::from_url(&Url::parse("http://h/bucket-only").unwrap()).is_err());
        let loc = S3Location::from_s3_uri(
            "s3://b/k/x.img",
            &Url::parse("https://s3.us-west-2.amazonaws.com").unwrap(),
        )
        .unwrap();
        assert_eq!(
            (loc.bucket.as_str(), loc.key.as_str(), loc.region.as_str()),
            ("b", "k/x.img", "us-west-2")
        );
    }

    #[test]
    fn signing_adds_sigv4_headers_only_with_credentials() {
        crate::tls::install_crypto_provider();
        let url = Url::parse("http://127.0.0.1:9000/b/k").unwrap();
        let anon = S3Source::new(reqwest::Client::new(), &url, None).unwrap();
        assert!(
            anon.sign(&Method::GET, &url, &HeaderMap::new())
                .unwrap()
                .is_empty()
        );
        let creds = Credentials {
            user: "AKID".into(),
            password: "secret".into(),
        };
        let s = S3Source::new(reqwest::Client::new(), &url, Some(creds)).unwrap();
        let h = s.sign(&Method::GET, &url, &HeaderMap::new()).unwrap();
        let auth = h.get("authorization").unwrap().to_str().unwrap();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKID/"),
            "{auth}"
        );
        assert!(auth.contains("/127/s3/aws4_request"), "{auth}");
        assert_eq!(h.get("x-amz-content-sha256").unwrap(), "UNSIGNED-PAYLOAD");
        assert!(h.contains_key("x-amz-date"));
    }
}
