//! Debian's `docker-registry` (distribution 2.8) over TLS with htpasswd, and images pushed to
//! it with umoci + skopeo (no Docker engine).
//!
//! ```text
//! let reg = Registry::start(&work.join("reg"), &pki, Some(("user", "pass")))?;
//! reg.host;                                  // "127.0.0.1:PORT"
//! reg.push_disk(&qcow2, "kubevirt/disk:v1", &PushOptions::default())?;
//! // → docker://127.0.0.1:PORT/kubevirt/disk:v1 with /disk/<file name> in a gzip layer
//! ```
//!
//! `PushOptions` picks the architecture, extra config `Env` entries, the layer compression
//! (`zstd: true` recompresses with skopeo's `--dest-compress --dest-compress-format zstd`) and Docker schema 2 instead of
//! OCI (`docker_v2s2`). The registry listens on 127.0.0.1 only and stops when dropped.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::pki::TestPki;
use crate::{KillOnDrop, STARTUP_TIMEOUT, free_port, run, wait_for_port};

/// A running registry.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub host: String,
    /// Basic-auth credentials, if enabled.
    pub auth: Option<(String, String)>,
    /// CA directory clients (and skopeo) trust.
    pub ca_dir: PathBuf,
    /// Plain HTTP, no TLS (an "insecure registry").
    plain: bool,
    work: PathBuf,
    _child: KillOnDrop,
}

/// How to build and push an image.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// `architecture` of the image config (default amd64).
    pub architecture: Option<String>,
    /// Extra `KEY=value` config environment entries.
    pub env: Vec<String>,
    /// `key=value` image config labels.
    pub labels: Vec<String>,
    /// zstd instead of gzip layers.
    pub zstd: bool,
    /// Docker schema 2 manifest instead of OCI.
    pub docker_v2s2: bool,
}

impl Registry {
    /// Start the registry with TLS from `pki` and optional htpasswd auth.
    pub fn start(
        workdir: &Path,
        pki: &TestPki,
        auth: Option<(&str, &str)>,
    ) -> io::Result<Registry> {
        fs::create_dir_all(workdir.join("data"))?;
        let auth_block = match auth {
            Some((user, pass)) => {
                let out = run(Command::new("htpasswd").args(["-Bbn", user, pass]))?;
                fs::write(workdir.join("htpasswd"), out.stdout)?;
                format!(
                    "auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
                    workdir.join("htpasswd").display()
                )
            }
            None => String::new(),
        };
        Self::start_with(
            workdir,
            pki,
            auth_block,
            auth.map(|(u, p)| (u.to_string(), p.to_string())),
        )
    }

    /// Start the registry with distribution's `silly` auth: it answers
    /// `401 WWW-Authenticate: Bearer realm=<realm>,service=test-registry,scope=…` and accepts
    /// any `Authorization` header, so clients run the full token flow against `realm` (a file
    /// served by nginx behind basic auth works). `creds` are what pushes use.
    pub fn start_token(
        workdir: &Path,
        pki: &TestPki,
        realm: &str,
        creds: (&str, &str),
    ) -> io::Result<Registry> {
        fs::create_dir_all(workdir.join("data"))?;
        let auth_block =
            format!("auth:\n  silly:\n    realm: {realm}\n    service: test-registry\n");
        Self::start_with(
            workdir,
            pki,
            auth_block,
            Some((creds.0.to_string(), creds.1.to_string())),
        )
    }

    /// Start the registry on plain HTTP without auth: what upstream calls an insecure
    /// registry (`insecureRegistries` in the CDIConfig).
    pub fn start_plain(workdir: &Path) -> io::Result<Registry> {
        fs::create_dir_all(workdir.join("data"))?;
        Self::launch(workdir, String::new(), None, workdir.to_path_buf(), true)
    }

    fn start_with(
        workdir: &Path,
        pki: &TestPki,
        auth_block: String,
        auth: Option<(String, String)>,
    ) -> io::Result<Registry> {
        let tls = format!(
            "  tls:\n    certificate: {}\n    key: {}\n{auth_block}",
            pki.server_cert.display(),
            pki.server_key.display(),
        );
        Self::launch(workdir, tls, auth, pki.ca_dir.clone(), false)
    }

    fn launch(
        workdir: &Path,
        http_extra: String,
        auth: Option<(String, String)>,
        ca_dir: PathBuf,
        plain: bool,
    ) -> io::Result<Registry> {
        let port = free_port();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n{http_extra}",
            workdir.join("data").display(),
        );
        let conf = workdir.join("registry.yml");
        fs::write(&conf, config)?;
        let log = fs::File::create(workdir.join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let child = KillOnDrop(child);
        wait_for_port(port, STARTUP_TIMEOUT)?;
        Ok(Registry {
            host: format!("127.0.0.1:{port}"),
            auth,
            ca_dir,
            plain,
            work: workdir.to_path_buf(),
            _child: child,
        })
    }

    /// Build an image holding `disk` as `/disk/<file name>` and push it as `repo_tag`.
    pub fn push_disk(&self, disk: &Path, repo_tag: &str, opts: &PushOptions) -> io::Result<String> {
        let name = repo_tag.replace(['/', ':'], "_");
        let layout = self.work.join(format!("oci-{name}"));
        let _ = fs::remove_dir_all(&layout);
        let image = format!("{}:v1", layout.display());
        run(Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout))?;
        run(Command::new("umoci").args(["new", "--image", &image]))?;
        let rootfs = self.work.join(format!("rootfs-{name}"));
        let _ = fs::remove_dir_all(&rootfs);
        fs::create_dir_all(rootfs.join("disk"))?;
        let file_name = disk
            .file_name()
            .ok_or_else(|| io::Error::other("disk has no file name"))?;
        let copied = rootfs.join("disk").join(file_name);
        fs::copy(disk, &copied)?;
        // A per-tag mtime makes every pushed layer unique, so skopeo never reuses a blob
        // (with its old compression) that an earlier push left in the registry.
        let stamp = 1_000_000_000
            + repo_tag
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
                % 100_000_000;
        run(Command::new("touch")
            .arg("-d")
            .arg(format!("@{stamp}"))
            .arg(&copied))?;
        run(Command::new("umoci")
            .args(["insert", "--image", &image])
            .arg(rootfs.join("disk"))
            .arg("/disk"))?;
        let mut cfg = Command::new("umoci");
        cfg.args(["config", "--image", &image, "--config.user", "107:107"]);
        cfg.args([
            "--architecture",
            opts.architecture.as_deref().unwrap_or("amd64"),
        ]);
        for e in &opts.env {
            cfg.args(["--config.env", e]);
        }
        for l in &opts.labels {
            cfg.args(["--config.label", l]);
        }
        run(&mut cfg)?;
        let mut copy = Command::new("skopeo");
        copy.arg("copy");
        if self.plain {
            copy.arg("--dest-tls-verify=false");
        } else {
            copy.arg("--dest-cert-dir").arg(&self.ca_dir);
        }
        if let Some((u, p)) = &self.auth {
            copy.args(["--dest-creds", &format!("{u}:{p}")]);
        }
        if opts.zstd {
            copy.args(["--dest-compress", "--dest-compress-format", "zstd"]);
        }
        if opts.docker_v2s2 {
            copy.args(["--format", "v2s2"]);
        }
        let target = format!("docker://{}/{repo_tag}", self.host);
        copy.arg(format!("oci:{image}")).arg(&target);
        run(&mut copy)?;
        Ok(target)
    }

    /// Publish an OCI image index `repo:index_tag` over already pushed `repo:<tag>` images,
    /// one entry per `(tag, architecture)`; returns its docker:// URL.
    pub fn push_index(
        &self,
        repo: &str,
        entries: &[(&str, &str)],
        index_tag: &str,
    ) -> io::Result<String> {
        let mut manifests = Vec::new();
        for (tag, arch) in entries {
            let mut inspect = Command::new("skopeo");
            inspect
                .args(["inspect", "--raw", "--cert-dir"])
                .arg(&self.ca_dir);
            if let Some((u, p)) = &self.auth {
                inspect.args(["--creds", &format!("{u}:{p}")]);
            }
            let raw = run(inspect.arg(format!("docker://{}/{repo}:{tag}", self.host)))?.stdout;
            let digest_file = self.work.join("manifest.json");
            fs::write(&digest_file, &raw)?;
            let sum = run(Command::new("sha256sum").arg(&digest_file))?.stdout;
            let hex = String::from_utf8_lossy(&sum)
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            let text = String::from_utf8_lossy(&raw).to_string();
            let media = if text.contains("application/vnd.docker.distribution.manifest.v2+json") {
                "application/vnd.docker.distribution.manifest.v2+json"
            } else {
                "application/vnd.oci.image.manifest.v1+json"
            };
            manifests.push(format!(
                r#"{{"mediaType":"{media}","digest":"sha256:{hex}","size":{},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#,
                raw.len()
            ));
        }
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
            manifests.join(",")
        );
        let index_file = self.work.join("index.json");
        fs::write(&index_file, index)?;
        let mut put = Command::new("curl");
        put.args(["-sf", "-X", "PUT", "--cacert"])
            .arg(self.ca_dir.join("ca.crt"));
        if let Some((u, p)) = &self.auth {
            put.args(["-u", &format!("{u}:{p}")]);
        }
        put.args([
            "-H",
            "Content-Type: application/vnd.oci.image.index.v1+json",
            "--data-binary",
        ])
        .arg(format!("@{}", index_file.display()))
        .arg(format!(
            "https://{}/v2/{repo}/manifests/{index_tag}",
            self.host
        ));
        run(&mut put)?;
        Ok(format!("docker://{}/{repo}:{index_tag}", self.host))
    }
}
