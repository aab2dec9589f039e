//! Registry source: `docker://host[:port]/repo[:tag|@sha256:…]`, pulled with plain reqwest.
//!
//! Resolves the reference (Docker v2 / OCI manifests and indexes, picking the architecture
//! from `IMPORTER_REGISTRY_IMAGE_ARCHITECTURE` or this host's), authenticates with basic auth
//! or the Docker bearer-token flow, refuses bootc images, and streams the layers base-first:
//! each blob goes through the resumable pump, is decompressed (gzip/zstd/plain) and read as
//! a tar; the first regular, non-whiteout entry under `disk/` goes straight into the formats
//! engine. Nothing but the target is written: the image never lands on disk. Each blob is
//! verified against its sha256 digest before the import counts as done.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path};
use std::sync::Arc;

use cdi_formats::ConvertReport;
use reqwest::StatusCode;
use reqwest::header::{self, HeaderValue};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::ByteSource;
use super::http::{HttpAuth, HttpSource, status_error};
use crate::checksum::Checksum;
use crate::error::{ErrorKind, ImportError, Result};
use crate::import::ImportRequest;
use crate::progress::Progress;
use crate::tls::{build_client, describe_error};
use crate::transfer::{self, ChannelReader};

/// Media types we ask for, in order of preference.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";
/// Largest manifest or config we read (real ones are a few KiB).
const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Default registry for references without a host (Docker Hub).
const DOCKER_HUB: &str = "registry-1.docker.io";

/// What a registry import produced.
pub struct RegistryOutcome {
    /// The conversion report of the disk file.
    pub report: ConvertReport,
    /// Labels from the image config's `*_KUBEVIRT_IO_*` environment.
    pub labels: BTreeMap<String, String>,
    /// Bytes read from the layer that held the disk.
    pub bytes_read: u64,
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]`.
    pub registry: String,
    /// Repository path.
    pub repo: String,
    /// Tag or `sha256:…` digest.
    pub reference: String,
}

impl ImageRef {
    /// Parse `docker://host[:port]/repo[:tag|@digest]`.
    pub fn parse(s: &str) -> Result<ImageRef> {
        let rest = s.strip_prefix("docker://").ok_or_else(|| {
            ImportError::config(format!("registry URL must start with docker://: {s}"))
        })?;
        let (name, reference) = match rest.split_once('@') {
            Some((n, d)) => (n, d.to_string()),
            None => {
                let slash = rest.rfind('/').unwrap_or(0);
                match rest[slash..].rfind(':') {
                    Some(i) => (&rest[..slash + i], rest[slash + i + 1..].to_string()),
                    None => (rest, "latest".to_string()),
                }
            }
        };
        let (first, remainder) = name.split_once('/').unwrap_or(("", name));
        let has_host = first.contains('.') || first.contains(':') || first == "localhost";
        let (registry, repo) = if has_host {
            (first.to_string(), remainder.to_string())
        } else if name.contains('/') {
            (DOCKER_HUB.to_string(), name.to_string())
        } else {
            (DOCKER_HUB.to_string(), format!("library/{name}"))
        };
        if repo.is_empty() || reference.is_empty() {
            return Err(ImportError::config(format!("invalid image reference {s}")));
        }
        Ok(ImageRef {
            registry,
            repo,
            reference,
        })
    }
}

/// Go's name for this host's architecture.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// `PREFIX_KUBEVIRT_IO_SUFFIX=v` → `prefix.kubevirt.io/suffix` (upstream's label rule).
pub fn env_labels(env: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in env {
        let Some((k, v)) = entry.split_once('=') else {
            continue;
        };
        let Some((prefix, suffix)) = k.split_once("_KUBEVIRT_IO_") else {
            continue;
        };
        let label = format!(
            "{}.kubevirt.io/{}",
            prefix.replace('_', ".").to_lowercase(),
            suffix.replace('_', "-").to_lowercase()
        );
        out.insert(label, v.to_string());
    }
    out
}

/// The entry name of a disk file in a layer: a regular file under `disk/`, not a whiteout.
pub fn disk_entry(path: &Path) -> bool {
    let comps: Vec<Component> = path
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    if comps.iter().any(|c| !matches!(c, Component::Normal(_))) {
        return false; // absolute or `..`: never
    }
    matches!(comps.first(), Some(Component::Normal(d)) if *d == "disk")
        && comps.len() >= 2
        && !comps
            .iter()
            .any(|c| c.as_os_str().to_string_lossy().starts_with(".wh."))
}

struct Registry {
    client: reqwest::Client,
    base: Url,
    image: ImageRef,
    auth: Option<HeaderValue>,
    basic: Option<(String, String)>,
}

impl Registry {
    async fn get(&mut self, path: &str, accept: Option<&str>) -> Result<reqwest::Response> {
        let url = self
            .base
            .join(path)
            .map_err(|e| ImportError::config(format!("{e}")))?;
        for _ in 0..2 {
            let mut rb = self.client.get(url.clone());
            if let Some(a) = accept {
                rb = rb.header(header::ACCEPT, a);
            }
            if let Some(auth) = &self.auth {
                rb = rb.header(header::AUTHORIZATION, auth.clone());
            }
            let resp = rb
                .send()
                .await
                .map_err(|e| ImportError::connect(describe_error(&e)))?;
            if resp.status() != StatusCode::UNAUTHORIZED
                || self.auth.is_some() && self.basic.is_none()
            {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            if self.auth.is_some() {
                return Ok(resp); // credentials were tried and refused
            }
            self.auth = Some(self.authenticate(&challenge).await?);
        }
        Err(ImportError::connect("registry authentication failed"))
    }

    async fn authenticate(&self, challenge: &str) -> Result<HeaderValue> {
        let basic = || {
            use base64::Engine as _;
            let (u, p) = self.basic.clone().unwrap_or_default();
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            HeaderValue::from_str(&format!("Basic {token}"))
                .map_err(|_| ImportError::config("invalid credentials"))
        };
        let lower = challenge.to_ascii_lowercase();
        if lower.starts_with("basic") {
            if self.basic.is_none() {
                return Err(ImportError::connect(
                    "registry requires credentials (accessKeyId/secretKey)",
                ));
            }
            return basic();
        }
        if !lower.starts_with("bearer") {
            return Err(ImportError::connect(format!(
                "unsupported registry auth challenge {challenge:?}"
            )));
        }
        let params: BTreeMap<String, String> = challenge[6..]
            .split(',')
            .filter_map(|kv| kv.trim().split_once('='))
            .map(|(k, v)| {
                (
                    k.trim().to_ascii_lowercase(),
                    v.trim().trim_matches('"').to_string(),
                )
            })
            .collect();
        let realm = params
            .get("realm")
            .ok_or_else(|| ImportError::connect("bearer challenge without realm"))?;
        let mut url = Url::parse(realm)
            .map_err(|e| ImportError::connect(format!("bad token realm {realm}: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = params.get("service") {
                q.append_pair("service", s);
            }
            let scope = params
                .get("scope")
                .cloned()
                .unwrap_or_else(|| format!("repository:{}:pull", self.image.repo));
            q.append_pair("scope", &scope);
        }
        let mut rb = self.client.get(url);
        if self.basic.is_some() {
            rb = rb.header(header::AUTHORIZATION, basic()?);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| ImportError::connect(describe_error(&e)))?;
        if !resp.status().is_success() {
            return Err(ImportError::connect(format!(
                "token request failed: {}",
                resp.status()
            )));
        }
        let body: Value = resp
            .json()
            .await
            .map_err(|e| ImportError::connect(format!("token response: {e}")))?;
        let token = body["token"]
            .as_str()
            .or(body["access_token"].as_str())
            .unwrap_or_default();
        HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| ImportError::connect("invalid token"))
    }

    async fn json(&mut self, path: &str, accept: Option<&str>) -> Result<Value> {
        let resp = self.get(path, accept).await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(200, resp.status()).context(format!("GET {path}")));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ImportError::connect(describe_error(&e)))?;
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ImportError::new(
                ErrorKind::Image,
                format!("{path} is larger than {MAX_MANIFEST_BYTES} bytes"),
            ));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ImportError::new(ErrorKind::Image, format!("{path}: invalid JSON: {e}")))
    }
}

/// Import the disk of the image `reference` into the request's destination.
pub async fn import_image(
    reference: &str,
    req: &ImportRequest,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<RegistryOutcome> {
    let image = ImageRef::parse(reference)?;
    let client = build_client(&req.tls)?;
    let base = Url::parse(&format!("https://{}/", image.registry))
        .map_err(|e| ImportError::config(format!("{e}")))?;
    let basic = req
        .credentials
        .as_ref()
        .map(|c| (c.user.clone(), c.password.clone()));
    let mut reg = Registry {
        client,
        base,
        image: image.clone(),
        auth: None,
        basic,
    };
    let want_arch = req
        .architecture
        .clone()
        .unwrap_or_else(|| host_architecture().to_string());

    let manifest_path = format!("v2/{}/manifests/{}", image.repo, image.reference);
    let mut manifest = match reg.json(&manifest_path, Some(ACCEPT)).await {
        // An insecure registry may speak plain HTTP (upstream's insecureRegistries).
        Err(e) if req.tls.insecure && e.kind() == ErrorKind::Connect && reg.auth.is_none() => {
            tracing::warn!(error = %e, "HTTPS failed on an insecure registry; trying plain HTTP");
            reg.base = Url::parse(&format!("http://{}/", image.registry))
                .map_err(|e| ImportError::config(format!("{e}")))?;
            reg.json(&manifest_path, Some(ACCEPT)).await?
        }
        other => other?,
    };
    if let Some(list) = manifest["manifests"].as_array() {
        let entry = list
            .iter()
            .find(|m| {
                m["platform"]["architecture"].as_str() == Some(want_arch.as_str())
                    && m["platform"]["os"].as_str().is_none_or(|os| os == "linux")
            })
            .ok_or_else(|| {
                ImportError::new(
                    ErrorKind::Image,
                    format!("image index has no manifest for architecture {want_arch}"),
                )
            })?;
        let digest = entry["digest"].as_str().unwrap_or_default().to_string();
        manifest = reg
            .json(
                &format!("v2/{}/manifests/{digest}", image.repo),
                Some(ACCEPT),
            )
            .await?;
    }
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let config = reg
        .json(&format!("v2/{}/blobs/{config_digest}", image.repo), None)
        .await?;
    let labels = &config["config"]["Labels"];
    if labels["containers.bootc"].as_str() == Some("1")
        || labels["ostree.bootable"].as_str() == Some("1")
    {
        return Err(ImportError::new(
            ErrorKind::Image,
            "bootc image detected: bootable container images cannot be imported as disks",
        ));
    }
    if req.architecture.is_some()
        && let Some(arch) = config["architecture"].as_str().filter(|a| *a != want_arch)
    {
        return Err(ImportError::new(
            ErrorKind::Image,
            format!("image architecture {arch} does not match {want_arch}"),
        ));
    }
    let env: Vec<String> = config["config"]["Env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let layers: Vec<(String, u64)> = manifest["layers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|l| {
                    (
                        l["digest"].as_str().unwrap_or_default().to_string(),
                        l["size"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();

    let opts = crate::import::convert_options_for(req)?;
    let dest = crate::import::dest_path_of(&req.dest).to_path_buf();
    for (digest, size) in layers {
        let hex = digest.strip_prefix("sha256:").ok_or_else(|| {
            ImportError::new(
                ErrorKind::Image,
                format!("unsupported layer digest {digest}"),
            )
        })?;
        let checksum = Checksum::parse(&format!("sha256:{hex}"))?;
        let url = reg
            .base
            .join(&format!("v2/{}/blobs/{digest}", image.repo))
            .map_err(|e| ImportError::config(format!("{e}")))?;
        let mut auth = HttpAuth::default();
        if let Some(a) = &reg.auth {
            auth.secret_headers.push((header::AUTHORIZATION, a.clone()));
        }
        let source: Arc<dyn ByteSource> = Arc::new(HttpSource::new(reg.client.clone(), url, auth)?);
        let opened = source.open(0, None).await?;
        progress.set_total(size);
        let (tx, rx) = transfer::channel();
        let pump = tokio::spawn(transfer::pump(
            source,
            opened,
            tx,
            req.limits,
            progress.clone(),
            cancel.child_token(),
        ));
        let opts = opts.clone();
        let dest = dest.clone();
        let (result, mut reader) = tokio::task::spawn_blocking(move || {
            let mut reader = ChannelReader::new(rx, Some(checksum));
            let r = convert_layer(&mut reader, &dest, &opts);
            (r, reader)
        })
        .await
        .map_err(|e| ImportError::new(ErrorKind::Io, format!("layer thread failed: {e}")))?;
        reader.close();
        let _ = pump.await;
        match result {
            Ok(Some(report)) => {
                return Ok(RegistryOutcome {
                    report,
                    labels: env_labels(&env),
                    bytes_read: ChannelReader::bytes(&reader),
                });
            }
            Ok(None) => continue,
            Err(e) => {
                if let crate::import::Destination::File(p) = &req.dest {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e);
            }
        }
    }
    Err(ImportError::new(
        ErrorKind::Image,
        "no disk image found under disk/ in any layer",
    ))
}

/// Read one layer: convert its disk entry if it has one (`Some`), else `None`. The whole blob
/// is read and its digest verified either way.
fn convert_layer(
    reader: &mut ChannelReader,
    dest: &Path,
    opts: &cdi_formats::ConvertOptions,
) -> Result<Option<ConvertReport>> {
    loop {
        let result = (|| -> Result<Option<ConvertReport>> {
            let (_, decoded) = crate::decompress::unwrap(&mut *reader)
                .map_err(|e| ImportError::io("reading layer", e))?;
            let mut archive = tar::Archive::new(decoded);
            let entries = archive
                .entries()
                .map_err(|e| ImportError::new(ErrorKind::Image, format!("layer tar: {e}")))?;
            for entry in entries {
                let mut entry = entry
                    .map_err(|e| ImportError::new(ErrorKind::Image, format!("layer tar: {e}")))?;
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let path = entry
                    .path()
                    .map_err(|e| ImportError::new(ErrorKind::Image, format!("layer tar: {e}")))?
                    .into_owned();
                if !disk_entry(&path) {
                    continue;
                }
                let mut target = cdi_formats::target::open_target(dest)?;
                let report = cdi_formats::convert::convert_reader(
                    &mut entry as &mut dyn Read,
                    target.as_mut(),
                    opts,
                )?;
                return Ok(Some(report));
            }
            Ok(None)
        })();
        if reader.take_restart() {
            continue;
        }
        let out = match result {
            Ok(r) => r,
            Err(e) => return Err(reader.failure().cloned().unwrap_or(e)),
        };
        match reader.drain() {
            Ok(_) => {}
            Err(_) if reader.take_restart() => continue,
            Err(e) => {
                return Err(reader
                    .failure()
                    .cloned()
                    .unwrap_or_else(|| ImportError::io("reading layer", e)));
            }
        }
        reader.verify().map_err(|e| {
            ImportError::new(ErrorKind::Transfer, format!("layer digest mismatch: {e}"))
        })?;
        return Ok(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse() {
        let r = ImageRef::parse("docker://127.0.0.1:5000/kubevirt/cirros:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repo.as_str(), r.reference.as_str()),
            ("127.0.0.1:5000", "kubevirt/cirros", "v1")
        );
        let r = ImageRef::parse("docker://quay.io/containerdisks/centos@sha256:abc").unwrap();
        assert_eq!(r.reference, "sha256:abc");
        let r = ImageRef::parse("docker://kubevirt/fedora").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repo.as_str(), r.reference.as_str()),
            (DOCKER_HUB, "kubevirt/fedora", "latest")
        );
        let r = ImageRef::parse("docker://busybox").unwrap();
        assert_eq!(r.repo, "library/busybox");
        assert!(ImageRef::parse("http://x/y").is_err());
    }

    #[test]
    fn labels_follow_upstream_rule() {
        let l = env_labels(&[
            "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small".into(),
            "PATH=/bin".into(),
        ]);
        assert_eq!(
            l.get("instancetype.kubevirt.io/default-instancetype")
                .map(String::as_str),
            Some("u1.small")
        );
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn disk_entries_are_path_safe() {
        assert!(disk_entry(Path::new("disk/disk.qcow2")));
        assert!(disk_entry(Path::new("./disk/disk.img")));
        assert!(!disk_entry(Path::new("disk/.wh.disk.img")));
        assert!(!disk_entry(Path::new("etc/passwd")));
        assert!(!disk_entry(Path::new("disk/../etc/passwd")));
        assert!(!disk_entry(Path::new("/disk/x")));
        assert!(!disk_entry(Path::new("disk")));
    }
}
