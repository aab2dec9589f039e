//! `cdi image-upload`: virtctl's `image-upload`, against `cdi serve` or a cluster.
//!
//! ```text
//!  kube::Client (the connection flags: kubeconfig, --server, --token, …)
//!    POST …/cdi.kubevirt.io/v1beta1/namespaces/{ns}/datavolumes          (unless --no-create)
//!    GET  …/datavolumes/{name} until status.phase == UploadReady        (--wait-secs)
//!    POST …/upload.cdi.kubevirt.io/v1beta1/namespaces/{ns}/uploadtokenrequests
//!  reqwest, to the upload proxy (--uploadproxy-url, default: the API server's URL, where
//!  `cdi serve` mounts its proxy):
//!    POST {uploadproxy}/v1beta1/upload   Authorization: Bearer <upload token>
//!         Content-Length, Content-Digest: sha-256=:…:   (progress on stderr)
//!      connection lost → GET /v1beta1/upload-offset (again while 503: the server has not
//!                        seen the cut yet) → POST the rest with Upload-Offset: N
//!                        409 / 503 "already finished uploading" after the whole body went
//!                        out: the answer was lost, the upload is complete
//!  kube::Client:
//!    GET  …/datavolumes/{name} until status.phase == Succeeded
//! ```
//!
//! The upload proxy's certificate is checked against the CA the API server's is checked
//! against (the kubeconfig's, or `--certificate-authority`): `cdi serve` serves both on one
//! listener. Without one, the system's roots apply. `pvc NAME` also creates a DataVolume (its
//! PVC has the same name): `cdi serve` manages volumes through DataVolumes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use cdi_pki::ServerTrust;
use futures::StreamExt;
use kube::Api;
use kube::api::PostParams;
use kube::core::{ApiResource, DynamicObject};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::client::ConnFlags;
use crate::client::connect::Connection;

/// Attempts to continue an upload after the connection dropped.
pub const RESUME_ATTEMPTS: u32 = 5;
/// Interval between DataVolume phase checks.
const POLL: Duration = Duration::from_secs(1);
/// After a drop, how long the offset is asked for while the answer is "busy": the server only
/// notices the cut when its side of the connection fails, which may take a moment behind a
/// proxy (and a restarted proxy needs a moment to come back).
const OFFSET_WAIT: Duration = Duration::from_secs(30);
/// Interval between offset queries while waiting.
const OFFSET_POLL: Duration = Duration::from_millis(250);
/// Interval between progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Read size for hashing and sending the image.
const CHUNK: usize = 1 << 20;
/// Plural of `UploadTokenRequest` in its API group.
const UPLOAD_TOKEN_REQUESTS: &str = "uploadtokenrequests";

/// Which object `image-upload` targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    /// A DataVolume.
    Dv,
    /// A PVC (created through a DataVolume of the same name).
    Pvc,
}

/// `cdi image-upload` flags (virtctl's names).
#[derive(Debug, Clone, clap::Args)]
pub struct ImageUploadArgs {
    /// `dv` or `pvc`.
    kind: Option<TargetKind>,
    /// Name of the DataVolume/PVC.
    name: Option<String>,
    /// Image file to upload.
    #[arg(long)]
    image_path: PathBuf,
    /// Size of the volume to create (e.g. 10Gi).
    #[arg(long)]
    size: Option<String>,
    /// Upload into an existing volume.
    #[arg(long)]
    no_create: bool,
    /// Do not verify the certificates of the API server and the upload proxy.
    #[arg(long)]
    insecure: bool,
    /// Upload proxy base URL (default: the API server's URL).
    #[arg(long)]
    uploadproxy_url: Option<String>,
    /// Storage class of the new volume.
    #[arg(long)]
    storage_class: Option<String>,
    /// Access mode of the new volume.
    #[arg(long)]
    access_mode: Option<String>,
    /// Volume mode of the new volume (Filesystem or Block).
    #[arg(long)]
    volume_mode: Option<String>,
    /// Seconds to wait for the volume to become ready and to finish.
    #[arg(long, default_value_t = 300)]
    wait_secs: u64,
    /// Bind the volume immediately (WaitForFirstConsumer storage).
    #[arg(long)]
    force_bind: bool,
    /// Legacy: name of a PVC to create.
    #[arg(long)]
    pvc_name: Option<String>,
    /// Legacy: size of that PVC.
    #[arg(long)]
    pvc_size: Option<String>,
    /// Legacy: name of the DataVolume.
    #[arg(long)]
    dv_name: Option<String>,
    #[command(flatten)]
    conn: ConnFlags,
}

impl ImageUploadArgs {
    /// The connection flags given after the subcommand; `--insecure` also skips the API
    /// server's certificate check, as it did before the API calls went through kube.
    pub fn conn_flags(&self) -> ConnFlags {
        let mut conn = self.conn.clone();
        conn.insecure_skip_tls_verify |= self.insecure;
        conn
    }

    fn target(&self) -> anyhow::Result<(String, Option<String>)> {
        let name = self
            .name
            .clone()
            .or_else(|| self.pvc_name.clone())
            .or_else(|| self.dv_name.clone())
            .ok_or_else(|| {
                anyhow!("name the volume: image-upload dv NAME (or --pvc-name/--dv-name)")
            })?;
        let size = self.size.clone().or_else(|| self.pvc_size.clone());
        if !self.no_create && size.is_none() {
            bail!("--size is required to create a volume (or pass --no-create)");
        }
        Ok((name, if self.no_create { None } else { size }))
    }

    /// Run the command over `conn`.
    pub async fn upload(self, conn: &Connection) -> anyhow::Result<()> {
        let (name, create_size) = self.target()?;
        let http = http_client(conn, self.insecure)?;
        let api = VolumeApi::new(conn);
        let ns = &conn.namespace;
        let file_len = tokio::fs::metadata(&self.image_path)
            .await
            .with_context(|| format!("{}", self.image_path.display()))?
            .len();

        if let Some(size) = &create_size {
            api.create_dv(&name, size, &self).await?;
            eprintln!("DataVolume {ns}/{name} created");
        }
        let deadline = Instant::now() + Duration::from_secs(self.wait_secs);
        api.wait_phase(&name, &["UploadReady"], deadline).await?;
        eprintln!("computing sha-256 of {}", self.image_path.display());
        let digest = sha256_file(&self.image_path).await?;
        let proxy = self
            .uploadproxy_url
            .clone()
            .unwrap_or_else(|| conn.server.clone());
        let proxy = proxy.trim_end_matches('/').to_string();

        let mut offset = 0u64;
        let mut attempt = 0;
        // Whether an earlier attempt handed every byte to the connection: only then can an
        // "already completed" answer be about this upload (its 200 was lost).
        let mut sent_everything = false;
        loop {
            let token = api.upload_token(&name).await?;
            match send(
                &http,
                &proxy,
                &token,
                &self.image_path,
                offset,
                file_len,
                &digest,
            )
            .await
            {
                Ok(()) => break,
                Err(SendError::Rejected(status, body)) if already_completed(status, &body) => {
                    accept_completion(sent_everything, status, &body)?;
                    break;
                }
                Err(SendError::Rejected(status, body)) => {
                    bail!("upload refused: {status}: {}", body.trim())
                }
                Err(SendError::Connection { error, all_sent }) if attempt < RESUME_ATTEMPTS => {
                    attempt += 1;
                    sent_everything |= all_sent;
                    eprintln!(
                        "\nconnection lost ({error}); resuming (attempt {attempt}/{RESUME_ATTEMPTS})"
                    );
                    match resume_point(&http, &proxy, &token).await {
                        Ok(ResumePoint::At(n)) if n <= file_len => {
                            offset = n;
                            eprintln!("server has {offset} bytes; sending the rest");
                        }
                        Ok(ResumePoint::At(n)) => {
                            bail!("server reports {n} bytes received of a {file_len}-byte image")
                        }
                        Ok(ResumePoint::Completed(status, body)) => {
                            accept_completion(sent_everything, status, &body)?;
                            break;
                        }
                        Err(e) => {
                            // An upload server without the offset protocol (upstream's), or
                            // one that gave up waiting: start over, as virtctl would.
                            eprintln!("cannot resume ({e:#}); starting over");
                            offset = 0;
                        }
                    }
                }
                Err(SendError::Connection { error, .. }) => bail!("upload failed: {error}"),
            }
        }
        eprintln!("\nupload complete; waiting for processing");
        api.wait_phase(
            &name,
            &["Succeeded"],
            deadline.max(Instant::now() + Duration::from_secs(self.wait_secs)),
        )
        .await?;
        eprintln!("DataVolume {ns}/{name} Succeeded");
        Ok(())
    }
}

/// The HTTP client for the upload proxy: HTTP/1.1 (the resume protocol counts body bytes on
/// one connection), trusting what the API connection trusts.
fn http_client(conn: &Connection, insecure: bool) -> anyhow::Result<reqwest::Client> {
    let trust = match (&conn.root_certs, insecure || conn.insecure) {
        (_, true) => Some(cdi_pki::client_config(ServerTrust::Insecure, None)?),
        (Some(ders), false) => {
            let pem = pem_bundle(ders);
            Some(cdi_pki::client_config(ServerTrust::Ca(&pem), None)?)
        }
        (None, false) => None,
    };
    let builder = match trust {
        Some(tls) => reqwest::Client::builder().use_preconfigured_tls(tls),
        None => reqwest::Client::builder().http1_only(),
    };
    Ok(builder.build()?)
}

/// DER certificates as one PEM bundle.
fn pem_bundle(ders: &[Vec<u8>]) -> String {
    /// PEM's line length for base64 bodies (RFC 7468).
    const PEM_LINE: usize = 64;
    let mut pem = String::new();
    for der in ders {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(PEM_LINE) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem
}

/// The API calls of an upload: DataVolumes and upload tokens in the connection's namespace.
struct VolumeApi<'a> {
    conn: &'a Connection,
    dvs: Api<DynamicObject>,
    dv_resource: ApiResource,
    tokens: Api<DynamicObject>,
    token_resource: ApiResource,
}

impl<'a> VolumeApi<'a> {
    fn new(conn: &'a Connection) -> VolumeApi<'a> {
        let dv_resource = ApiResource::erase::<cdi_resources::DataVolume>(&());
        let token_resource = ApiResource {
            group: cdi_apiserver::GROUP.to_string(),
            version: cdi_apiserver::VERSION.to_string(),
            api_version: cdi_apiserver::GROUP_VERSION.to_string(),
            kind: cdi_apiserver::KIND.to_string(),
            plural: UPLOAD_TOKEN_REQUESTS.to_string(),
        };
        let ns = conn.namespace.as_str();
        VolumeApi {
            conn,
            dvs: Api::namespaced_with(conn.client.clone(), ns, &dv_resource),
            dv_resource,
            tokens: Api::namespaced_with(conn.client.clone(), ns, &token_resource),
            token_resource,
        }
    }

    async fn create_dv(
        &self,
        name: &str,
        size: &str,
        args: &ImageUploadArgs,
    ) -> anyhow::Result<()> {
        let mut storage = json!({"resources": {"requests": {"storage": size}}});
        if let Some(sc) = &args.storage_class {
            storage["storageClassName"] = json!(sc);
        }
        if let Some(m) = &args.access_mode {
            storage["accessModes"] = json!([m]);
        }
        if let Some(m) = &args.volume_mode {
            storage["volumeMode"] = json!(m);
        }
        let mut dv = DynamicObject::new(name, &self.dv_resource)
            .within(&self.conn.namespace)
            .data(json!({"spec": {"source": {"upload": {}}, "storage": storage}}));
        if args.force_bind {
            dv.metadata.annotations = Some(
                [(
                    cdi_resources::annotations::ANN_IMMEDIATE_BINDING.to_string(),
                    "true".to_string(),
                )]
                .into(),
            );
        }
        self.dvs
            .create(&PostParams::default(), &dv)
            .await
            .map_err(|e| self.conn.explain(e))
            .with_context(|| format!("creating DataVolume {name}"))?;
        Ok(())
    }

    async fn phase(&self, name: &str) -> anyhow::Result<String> {
        let dv = self
            .dvs
            .get(name)
            .await
            .map_err(|e| self.conn.explain(e))
            .with_context(|| format!("reading DataVolume {name}"))?;
        Ok(dv.data["status"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    async fn wait_phase(&self, name: &str, want: &[&str], deadline: Instant) -> anyhow::Result<()> {
        loop {
            let phase = self.phase(name).await?;
            if want.contains(&phase.as_str()) {
                return Ok(());
            }
            if phase == "Failed" {
                bail!("DataVolume {name} failed");
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out waiting for DataVolume {name} to reach {want:?} (phase {phase:?})"
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn upload_token(&self, name: &str) -> anyhow::Result<String> {
        let req = DynamicObject::new(name, &self.token_resource)
            .within(&self.conn.namespace)
            .data(json!({"spec": {"pvcName": name}}));
        let answer = self
            .tokens
            .create(&PostParams::default(), &req)
            .await
            .map_err(|e| self.conn.explain(e))
            .context("requesting upload token")?;
        answer.data["status"]["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("upload token response has no status.token"))
    }
}

async fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(h.finalize())
    ))
}

enum SendError {
    /// The server answered with this status and text.
    Rejected(reqwest::StatusCode, String),
    /// The exchange broke off; `all_sent` when every byte of the body had been handed over.
    Connection { error: String, all_sent: bool },
}

/// Whether an answer says the volume's upload is already complete: the upload server's 409
/// or, once the control plane has seen the server exit, the proxy's 503.
fn already_completed(status: reqwest::StatusCode, body: &str) -> bool {
    (status == reqwest::StatusCode::CONFLICT && body.contains(cdi_api::upload::ALREADY_COMPLETED))
        || (status == reqwest::StatusCode::SERVICE_UNAVAILABLE
            && body.contains(cdi_api::upload::ALREADY_FINISHED))
}

/// An "already completed" answer is success only when this client sent the whole image
/// before the connection dropped (its 200 was lost); otherwise someone else filled the volume.
fn accept_completion(
    sent_everything: bool,
    status: reqwest::StatusCode,
    body: &str,
) -> anyhow::Result<()> {
    if !sent_everything {
        bail!(
            "the volume was completed by another upload: {status}: {}",
            body.trim()
        );
    }
    eprintln!(
        "the server already has the whole image (its answer was lost): {status}: {}",
        body.trim()
    );
    Ok(())
}

async fn send(
    http: &reqwest::Client,
    proxy: &str,
    token: &str,
    path: &std::path::Path,
    offset: u64,
    total: u64,
    digest: &str,
) -> Result<(), SendError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| SendError::Rejected(reqwest::StatusCode::BAD_REQUEST, e.to_string()))?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(|e| SendError::Rejected(reqwest::StatusCode::BAD_REQUEST, e.to_string()))?;
    let started = Instant::now();
    let mut sent = offset;
    let mut last = Instant::now();
    let handed_over = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(offset));
    let counter = handed_over.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, CHUNK).inspect(move |chunk| {
        if let Ok(c) = chunk {
            sent += c.len() as u64;
            counter.store(sent, std::sync::atomic::Ordering::Relaxed);
            if last.elapsed() >= PROGRESS_EVERY || sent == total {
                last = Instant::now();
                let rate =
                    (sent - offset) as f64 / started.elapsed().as_secs_f64().max(0.001) / 1048576.0;
                eprint!(
                    "\r{} / {} MiB ({:.1}%) {rate:.1} MiB/s   ",
                    sent >> 20,
                    total >> 20,
                    sent as f64 * 100.0 / total.max(1) as f64
                );
            }
        }
    });
    let mut req = http
        .post(format!("{proxy}/v1beta1/upload"))
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_LENGTH, total - offset)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .header("Content-Digest", digest)
        .body(reqwest::Body::wrap_stream(stream));
    if offset > 0 {
        req = req.header("Upload-Offset", offset);
    }
    let all_sent = || handed_over.load(std::sync::atomic::Ordering::Relaxed) == total;
    let resp = req.send().await.map_err(|e| SendError::Connection {
        error: error_chain(&e),
        all_sent: all_sent(),
    })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body = resp.text().await.unwrap_or_default();
    if status == reqwest::StatusCode::INTERNAL_SERVER_ERROR && body.contains("Upload-Offset") {
        // The upload server saw the body cut (e.g. a proxy in between dropped) and waits.
        return Err(SendError::Connection {
            error: body.trim().to_string(),
            all_sent: false,
        });
    }
    Err(SendError::Rejected(status, body))
}

/// `error: cause: cause`, as reqwest hides the interesting part in the sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Where to continue after a drop.
#[derive(Debug, PartialEq, Eq)]
enum ResumePoint {
    /// The server holds this many bytes of the body and waits for the rest.
    At(u64),
    /// The upload is already complete (status and text of the answer).
    Completed(reqwest::StatusCode, String),
}

/// Ask for the offset, again while the answer is "busy" or the proxy cannot reach the server
/// (for at most [`OFFSET_WAIT`]).
async fn resume_point(
    http: &reqwest::Client,
    proxy: &str,
    token: &str,
) -> anyhow::Result<ResumePoint> {
    let deadline = Instant::now() + OFFSET_WAIT;
    loop {
        let last = match http
            .get(format!("{proxy}/v1beta1/upload-offset"))
            .bearer_auth(token)
            .send()
            .await
        {
            Ok(resp) => {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                if let Some(point) = classify_offset_answer(status, &body)? {
                    return Ok(point);
                }
                format!("{status}: {}", body.trim())
            }
            Err(e) => error_chain(&e),
        };
        if Instant::now() + OFFSET_POLL > deadline {
            bail!("offset query: {last}");
        }
        tokio::time::sleep(OFFSET_POLL).await;
    }
}

/// The meaning of an offset-query answer: a resume point, `None` to ask again (busy, or the
/// proxy cannot reach the server), or an error.
fn classify_offset_answer(
    status: reqwest::StatusCode,
    body: &str,
) -> anyhow::Result<Option<ResumePoint>> {
    if status.is_success() {
        let n = body
            .trim()
            .parse()
            .with_context(|| format!("offset query answered {:?}", body.trim()))?;
        return Ok(Some(ResumePoint::At(n)));
    }
    if already_completed(status, body) {
        return Ok(Some(ResumePoint::Completed(
            status,
            body.trim().to_string(),
        )));
    }
    match status {
        reqwest::StatusCode::SERVICE_UNAVAILABLE | reqwest::StatusCode::BAD_GATEWAY => Ok(None),
        _ => bail!("offset query: {status}: {}", body.trim()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ImageUploadArgs,
    }

    #[test]
    fn virtctl_style_arguments_parse() {
        let cli = Cli::parse_from([
            "x",
            "dv",
            "disk",
            "--size",
            "1Gi",
            "--image-path",
            "/i.qcow2",
            "-n",
            "ns",
        ]);
        let (name, size) = cli.args.target().unwrap();
        assert_eq!((name.as_str(), size.as_deref()), ("disk", Some("1Gi")));
    }

    #[test]
    fn legacy_flags_parse() {
        let cli = Cli::parse_from([
            "x",
            "--pvc-name",
            "p",
            "--pvc-size",
            "2Gi",
            "--image-path",
            "/i",
        ]);
        assert_eq!(
            cli.args.target().unwrap(),
            ("p".to_string(), Some("2Gi".to_string()))
        );
    }

    #[test]
    fn offset_answers_are_classified() {
        use reqwest::StatusCode as S;
        assert_eq!(
            classify_offset_answer(S::OK, "4096\n").unwrap(),
            Some(ResumePoint::At(4096))
        );
        assert_eq!(
            classify_offset_answer(S::SERVICE_UNAVAILABLE, "an upload is already in progress")
                .unwrap(),
            None,
            "busy: the server has not seen the cut yet"
        );
        assert!(matches!(
            classify_offset_answer(S::CONFLICT, "upload already completed").unwrap(),
            Some(ResumePoint::Completed(S::CONFLICT, _))
        ));
        assert!(matches!(
            classify_offset_answer(
                S::SERVICE_UNAVAILABLE,
                "rejecting Upload Request for PVC default/d that already finished uploading"
            )
            .unwrap(),
            Some(ResumePoint::Completed(S::SERVICE_UNAVAILABLE, _))
        ));
        assert!(classify_offset_answer(S::NOT_FOUND, "").is_err());
        assert!(classify_offset_answer(S::OK, "lots").is_err());
    }

    #[test]
    fn completion_counts_only_after_the_whole_body_went_out() {
        let s = reqwest::StatusCode::CONFLICT;
        assert!(accept_completion(true, s, cdi_api::upload::ALREADY_COMPLETED).is_ok());
        assert!(accept_completion(false, s, cdi_api::upload::ALREADY_COMPLETED).is_err());
        assert!(!already_completed(
            s,
            "upload offset mismatch: server has 4 bytes"
        ));
    }

    #[test]
    fn der_certificates_round_trip_through_the_pem_bundle() {
        let ca = cdi_pki::Ca::generate("test-ca").unwrap();
        let der = |pem: &str| -> Vec<Vec<u8>> {
            cdi_pki::parse_certs(pem)
                .unwrap()
                .into_iter()
                .map(|c| c.to_vec())
                .collect()
        };
        let ders = der(ca.cert_pem());
        let twice = [ders[0].clone(), ders[0].clone()];
        assert_eq!(der(&pem_bundle(&twice)), twice);
    }

    #[test]
    fn creating_needs_a_size() {
        let cli = Cli::parse_from(["x", "dv", "disk", "--image-path", "/i"]);
        assert!(cli.args.target().is_err());
        let cli = Cli::parse_from(["x", "dv", "disk", "--no-create", "--image-path", "/i"]);
        assert_eq!(cli.args.target().unwrap(), ("disk".to_string(), None));
    }
}
