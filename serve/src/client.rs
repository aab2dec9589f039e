//! HTTPS client of the resource API used by the CLI commands.

use cdi_api::client::ClientConfig;
use futures::StreamExt;
use serde_json::Value;

use crate::store::Kind;

/// An API failure as the CLI reports it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The server answered with a `Status` error.
    #[error("{message}")]
    Status {
        /// HTTP status code.
        code: u16,
        /// `reason` of the Status body.
        reason: String,
        /// `message` of the Status body.
        message: String,
    },
    /// The request did not get an answer.
    #[error("cannot reach cdi serve at {server}: {detail}")]
    Transport {
        /// Server URL.
        server: String,
        /// What went wrong.
        detail: String,
    },
}

impl ApiError {
    /// HTTP status code, if the server answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            ApiError::Status { code, .. } => Some(*code),
            ApiError::Transport { .. } => None,
        }
    }
}

/// Resource API client.
pub struct Client {
    http: reqwest::Client,
    server: String,
    token: String,
}

/// Collection path of `kind` (namespace ignored for cluster kinds; `None` lists all).
pub fn collection_path(kind: Kind, ns: Option<&str>) -> String {
    let prefix = match kind.group() {
        "" => "/api/v1".to_string(),
        g => format!(
            "/apis/{g}/{}",
            kind.api_version().rsplit('/').next().unwrap_or("v1")
        ),
    };
    match (kind.namespaced(), ns) {
        (true, Some(ns)) => format!("{prefix}/namespaces/{ns}/{}", kind.plural()),
        _ => format!("{prefix}/{}", kind.plural()),
    }
}

/// Item path.
pub fn item_path(kind: Kind, ns: &str, name: &str) -> String {
    format!("{}/{name}", collection_path(kind, Some(ns)))
}

impl Client {
    /// A client for `cfg` (trusting only `cfg.ca_cert` when given).
    pub fn new(cfg: &ClientConfig) -> Result<Client, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = reqwest::Client::builder().no_proxy();
        if let Some(ca) = &cfg.ca_cert {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("reading CA certificate {}: {e}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("parsing CA certificate {}: {e}", ca.display()))?;
            b = b.tls_certs_only([cert]);
        }
        let http = b
            .build()
            .map_err(|e| format!("building HTTP client: {e}"))?;
        Ok(Client {
            http,
            server: cfg.server.clone(),
            token: cfg.token.clone(),
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, ApiError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let code = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| self.transport(e))?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if (200..300).contains(&code) {
            return Ok(body);
        }
        Err(ApiError::Status {
            code,
            reason: body["reason"].as_str().unwrap_or_default().to_string(),
            message: body["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("HTTP {code}: {}", text.trim())),
        })
    }

    fn transport(&self, e: reqwest::Error) -> ApiError {
        let mut detail = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            detail = format!("{detail}: {s}");
            src = s.source();
        }
        ApiError::Transport {
            server: self.server.clone(),
            detail,
        }
    }

    /// GET.
    pub async fn get(&self, path: &str) -> Result<Value, ApiError> {
        self.send(self.http.get(format!("{}{path}", self.server)))
            .await
    }

    /// POST a JSON object.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ApiError> {
        self.send(self.http.post(format!("{}{path}", self.server)).json(body))
            .await
    }

    /// PUT a JSON object.
    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, ApiError> {
        self.send(self.http.put(format!("{}{path}", self.server)).json(body))
            .await
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> Result<Value, ApiError> {
        self.send(self.http.delete(format!("{}{path}", self.server)))
            .await
    }

    /// Watch a collection; `f` sees every (type, object) and returns true to stop. Returns when
    /// `f` stopped (true) or the server ended the stream (false).
    pub async fn watch(
        &self,
        path: &str,
        query: &str,
        mut f: impl FnMut(&str, &Value) -> bool,
    ) -> Result<bool, ApiError> {
        let url = format!("{}{path}?watch=true{query}", self.server);
        let resp = self
            .http
            .get(url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        if !resp.status().is_success() {
            let code = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            return Err(ApiError::Status {
                code,
                reason: body["reason"].as_str().unwrap_or_default().to_string(),
                message: body["message"]
                    .as_str()
                    .unwrap_or("watch failed")
                    .to_string(),
            });
        }
        let mut stream = resp.bytes_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.transport(e))?;
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                if let Ok(ev) = serde_json::from_slice::<Value>(&line)
                    && f(ev["type"].as_str().unwrap_or_default(), &ev["object"])
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_kubernetes_paths() {
        assert_eq!(
            item_path(Kind::DataVolume, "default", "a"),
            "/apis/cdi.kubevirt.io/v1beta1/namespaces/default/datavolumes/a"
        );
        assert_eq!(
            collection_path(Kind::PersistentVolumeClaim, Some("ns")),
            "/api/v1/namespaces/ns/persistentvolumeclaims"
        );
        assert_eq!(
            collection_path(Kind::StorageClass, Some("ns")),
            "/apis/storage.k8s.io/v1/storageclasses"
        );
        assert_eq!(
            item_path(Kind::CdiConfig, "", "config"),
            "/apis/cdi.kubevirt.io/v1beta1/cdiconfigs/config"
        );
    }
}
