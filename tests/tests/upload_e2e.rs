//! The upload path end to end: real `cdi uploadserver` and `cdi uploadproxy` processes over
//! TLS on 127.0.0.1, driven with curl the way virtctl drives upstream, qemu-img as the oracle.
//!
//! Each test builds its own throw-away PKI (cdi-pki), token key (cdi-token) and work directory.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cdi_pki::Ca;
use cdi_tests::{KillOnDrop, STARTUP_TIMEOUT, cdi_bin, free_port, have, qemu, skip, wait_for_port};
use cdi_token::{Claims, GroupVersionResource, ISSUER, Operation, TokenSigner, UPLOAD_TOKEN_TTL};

const CLIENT_NAME: &str = "client.upload-server.cdi.kubevirt.io";
const IMAGE_SIZE: u64 = 8 << 20;
/// How long a test waits for an upload server to exit after success.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let ca = Ca::load_or_create(&dir.join("ca"), "upload-test-ca").unwrap();
        let server = ca
            .issue_server(&["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
            .unwrap();
        server
            .write_files(&dir.join("server.crt"), &dir.join("server.key"))
            .unwrap();
        let client = ca.issue_client(CLIENT_NAME).unwrap();
        client
            .write_files(&dir.join("client.crt"), &dir.join("client.key"))
            .unwrap();
        let other = Ca::generate("stranger-ca").unwrap();
        let stranger = other.issue_client(CLIENT_NAME).unwrap();
        stranger
            .write_files(&dir.join("stranger.crt"), &dir.join("stranger.key"))
            .unwrap();
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        if name == "ca.crt" {
            self.dir.join("ca").join("ca.crt")
        } else {
            self.dir.join(name)
        }
    }
}

struct UploadServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl UploadServer {
    fn start(pki: &Pki, dir: &Path, size: &str, extra: &[(&str, &str)]) -> UploadServer {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let mut cmd = Command::new(cdi_bin());
        cmd.arg("uploadserver")
            .env("TLS_CERT_FILE", pki.p("server.crt"))
            .env("TLS_KEY_FILE", pki.p("server.key"))
            .env("CLIENT_CERT_FILE", pki.p("ca.crt"))
            .env("CLIENT_NAME", CLIENT_NAME)
            .env("DESTINATION", dir.join("disk.img"))
            .env("UPLOAD_IMAGE_SIZE", size)
            .env("FILESYSTEM_OVERHEAD", "0")
            .env("LISTEN_ADDRESS", "127.0.0.1")
            .env("LISTEN_PORT", port.to_string())
            .env("CDI_TERMINATION_LOG", dir.join("termination-log"))
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        wait_for_port(port, STARTUP_TIMEOUT).unwrap();
        UploadServer {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn disk(&self) -> PathBuf {
        self.dir.join("disk.img")
    }

    /// Wait for the process to exit; returns its exit code and termination message.
    fn wait_exit(&mut self) -> (i32, String) {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let msg =
                    std::fs::read_to_string(self.dir.join("termination-log")).unwrap_or_default();
                return (status.code().unwrap_or(-1), msg);
            }
            assert!(
                Instant::now() < deadline,
                "upload server did not exit; log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for UploadServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Proxy {
    child: KillOnDrop,
    port: u16,
}

impl Proxy {
    fn start(pki: &Pki, key: &Path, targets: &[String], dir: &Path) -> Proxy {
        let port = free_port();
        let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
        let mut cmd = Command::new(cdi_bin());
        cmd.arg("uploadproxy")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--tls-cert")
            .arg(pki.p("server.crt"))
            .arg("--tls-key")
            .arg(pki.p("server.key"))
            .arg("--token-key-file")
            .arg(key)
            .arg("--client-cert")
            .arg(pki.p("client.crt"))
            .arg("--client-key")
            .arg(pki.p("client.key"))
            .arg("--upload-server-ca")
            .arg(pki.p("ca.crt"))
            .stdout(Stdio::null())
            .stderr(log);
        for t in targets {
            cmd.arg("--target").arg(t);
        }
        let child = KillOnDrop(cmd.spawn().unwrap());
        wait_for_port(port, STARTUP_TIMEOUT).unwrap();
        Proxy { child, port }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A proxy whose one volume, `default/disk`, is `server`.
    fn for_disk(env: &Env, server: &UploadServer) -> Proxy {
        Proxy::start(
            &env.pki,
            &env.key,
            &[format!("default/disk={}", server.url())],
            &env.dir,
        )
    }
}

/// One curl request; returns (status, body). `args` come after the common TLS options.
fn curl(pki: &Pki, client_cert: bool, args: &[&str]) -> (u16, String) {
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "300", "-o"])
        .arg(out_file.path())
        .args(["-w", "%{http_code}", "--cacert"])
        .arg(pki.p("ca.crt"));
    if client_cert {
        cmd.arg("--cert")
            .arg(pki.p("client.crt"))
            .arg("--key")
            .arg(pki.p("client.key"));
    }
    let out = cmd.args(args).output().unwrap();
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let body = std::fs::read_to_string(out_file.path()).unwrap_or_default();
    if code == 0 {
        // No HTTP exchange: say why (curl's error) instead of an empty body.
        return (0, format!("{body}{}", String::from_utf8_lossy(&out.stderr)));
    }
    (code, body)
}

fn prerequisites() -> bool {
    for tool in ["curl", "qemu-img", "qemu-io"] {
        if !have(tool) {
            skip(&format!("{tool} is not installed"));
            return false;
        }
    }
    true
}

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pki: Pki,
    signer: TokenSigner,
    key: PathBuf,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let pki = Pki::new(&dir.join("pki"));
    let key = dir.join("token.key");
    let signer = TokenSigner::load_or_generate(&key).unwrap();
    Env {
        _tmp: tmp,
        dir,
        pki,
        signer,
        key,
    }
}

fn token(env: &Env, ns: &str, pvc: &str) -> String {
    env.signer
        .issue(Operation::Upload, ns, pvc, UPLOAD_TOKEN_TTL)
        .unwrap()
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

fn assert_completed(server: &mut UploadServer) {
    let (code, msg) = server.wait_exit();
    assert_eq!(code, 0, "exit code; log: {}", server.log());
    assert!(
        msg.contains("\"message\":\"Upload Complete\""),
        "termination message {msg:?}"
    );
}

/// The headers virtctl's Go client puts on its requests (`net/http` adds `User-Agent` and
/// `Accept-Encoding`; virtctl sets `Authorization`, and `Content-Type` plus `Content-Length` on
/// the POST). Go sends no `Expect: 100-continue`, so curl's is switched off.
fn virtctl_headers(token: &str) -> Vec<String> {
    vec![
        bearer(token),
        "User-Agent: Go-http-client/1.1".into(),
        "Accept-Encoding: gzip".into(),
        "Expect:".into(),
    ]
}

/// Run curl with `headers` (each as `-H`) before `args`.
fn curl_with(pki: &Pki, headers: &[String], args: &[&str]) -> (u16, String) {
    let mut all: Vec<&str> = Vec::new();
    for h in headers {
        all.push("-H");
        all.push(h);
    }
    all.extend_from_slice(args);
    curl(pki, false, &all)
}

#[test]
fn upload_virtctl_and_form_request_sequences_replayed_with_curl() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let fx = qemu::fixtures(&env.dir.join("img"), IMAGE_SIZE).unwrap();
    let oracle = env.dir.join("oracle.raw");
    qemu::convert(&fx.qcow2, "qcow2", &oracle, "raw", &[]).unwrap();
    let names = ["async", "sync", "alpha", "form", "form-async"];
    let mut servers: Vec<UploadServer> = names
        .iter()
        .map(|n| UploadServer::start(&env.pki, &env.dir.join(n), "8Mi", &[]))
        .collect();
    let targets: Vec<String> = names
        .iter()
        .zip(&servers)
        .map(|(n, s)| format!("default/{n}={}", s.url()))
        .collect();
    let proxy = Proxy::start(&env.pki, &env.key, &targets, &env.dir);
    let base = proxy.url();
    let length = |p: &Path| format!("Content-Length: {}", std::fs::metadata(p).unwrap().len());

    // virtctl image-upload (current): HEAD {proxy}/v1beta1/upload-async with the token; on 200
    // POST the raw file there; the answer comes once the data is in, the rest in background.
    let h = virtctl_headers(&token(&env, "default", "async"));
    let async_url = format!("{base}/v1beta1/upload-async");
    let (code, body) = curl_with(&env.pki, &h, &["-I", &async_url]);
    assert_eq!(code, 200, "async probe: {body}");
    let data = format!("@{}", fx.raw.display());
    let mut post = h.clone();
    post.push("Content-Type: application/octet-stream".into());
    post.push(length(&fx.raw));
    let (code, body) = curl_with(&env.pki, &post, &["--data-binary", &data, &async_url]);
    assert_eq!(code, 200, "async upload: {body}");

    // A proxy without the async path makes virtctl fall back to the synchronous
    // {proxy}/v1beta1/upload, which answers after conversion.
    let mut post = virtctl_headers(&token(&env, "default", "sync"));
    post.push("Content-Type: application/octet-stream".into());
    post.push(length(&fx.qcow2));
    let data = format!("@{}", fx.qcow2.display());
    let (code, body) = curl_with(
        &env.pki,
        &post,
        &["--data-binary", &data, &format!("{base}/v1beta1/upload")],
    );
    assert_eq!(code, 200, "sync upload: {body}");

    // Older virtctl releases: the same on /v1alpha1/.
    let h = virtctl_headers(&token(&env, "default", "alpha"));
    let alpha_url = format!("{base}/v1alpha1/upload-async");
    assert_eq!(curl_with(&env.pki, &h, &["-I", &alpha_url]).0, 200);
    let mut post = h.clone();
    post.push("Content-Type: application/octet-stream".into());
    post.push(length(&fx.qcow2_gz));
    let data = format!("@{}", fx.qcow2_gz.display());
    let (code, body) = curl_with(&env.pki, &post, &["--data-binary", &data, &alpha_url]);
    assert_eq!(code, 200, "v1alpha1 upload: {body}");

    // A browser page (the web console): multipart/form-data with the image in part "file",
    // sync and async, from another origin.
    for (name, path, file) in [
        ("form", "upload-form", &fx.qcow2_gz),
        ("form-async", "upload-form-async", &fx.raw),
    ] {
        let h = vec![
            bearer(&token(&env, "default", name)),
            "Origin: https://console.example".into(),
        ];
        let part = format!("file=@{};type=application/octet-stream", file.display());
        let (code, body) = curl_with(
            &env.pki,
            &h,
            &["-F", &part, &format!("{base}/v1beta1/{path}")],
        );
        assert_eq!(code, 200, "{path}: {body}");
    }

    for (name, server) in names.iter().zip(servers.iter_mut()) {
        assert_completed(server);
        let source = match *name {
            "async" | "form-async" => &fx.raw,
            _ => &oracle,
        };
        qemu::assert_same_image(&server.disk(), source);
    }
}

#[test]
fn upload_async_qcow2_and_form_qcow2_gz_match_qemu_img() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let fx = qemu::fixtures(&env.dir.join("img"), IMAGE_SIZE).unwrap();
    let mut s1 = UploadServer::start(&env.pki, &env.dir.join("s1"), "8Mi", &[]);
    let mut s2 = UploadServer::start(&env.pki, &env.dir.join("s2"), "8Mi", &[]);
    let proxy = Proxy::start(
        &env.pki,
        &env.key,
        &[
            format!("default/a={}", s1.url()),
            format!("default/b={}", s2.url()),
        ],
        &env.dir,
    );
    // virtctl's capability probe.
    let (code, _) = curl(
        &env.pki,
        false,
        &[
            "-I",
            "-H",
            &bearer(&token(&env, "default", "a")),
            &format!("{}/v1beta1/upload-async", proxy.url()),
        ],
    );
    assert_eq!(code, 200);
    let oracle = env.dir.join("oracle.raw");
    qemu::convert(&fx.qcow2, "qcow2", &oracle, "raw", &[]).unwrap();

    let data = format!("@{}", fx.qcow2.display());
    let (code, body) = curl(
        &env.pki,
        false,
        &[
            "-X",
            "POST",
            "-H",
            &bearer(&token(&env, "default", "a")),
            "--data-binary",
            &data,
            &format!("{}/v1beta1/upload-async", proxy.url()),
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert_completed(&mut s1);
    qemu::assert_same_image(&s1.disk(), &oracle);

    let form = format!("file=@{}", fx.qcow2_gz.display());
    let (code, body) = curl(
        &env.pki,
        false,
        &[
            "-H",
            &bearer(&token(&env, "default", "b")),
            "-F",
            "note=ignored",
            "-F",
            &form,
            &format!("{}/v1beta1/upload-form", proxy.url()),
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert_completed(&mut s2);
    qemu::assert_same_image(&s2.disk(), &oracle);
}

#[test]
fn upload_tokens_are_checked_by_the_proxy() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let mut server = UploadServer::start(&env.pki, &env.dir.join("s1"), "8Mi", &[]);
    let proxy = Proxy::for_disk(&env, &server);
    let url = format!("{}/v1beta1/upload", proxy.url());
    let post = |auth: Option<String>| {
        let mut args = vec![
            "-X".to_string(),
            "POST".into(),
            "--data-binary".into(),
            "x".into(),
        ];
        if let Some(a) = auth {
            args.push("-H".into());
            args.push(a);
        }
        args.push(url.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&env.pki, false, &args)
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |op: Operation, name: &str, iat: u64, exp: u64| Claims {
        iss: ISSUER.into(),
        iat,
        nbf: iat,
        exp,
        operation: op,
        name: name.into(),
        namespace: "default".into(),
        resource: GroupVersionResource::pvcs(),
        params: Default::default(),
    };
    let stranger = TokenSigner::load_or_generate(&env.dir.join("stranger.key")).unwrap();

    let (code, body) = post(None);
    assert_eq!(code, 400, "no Authorization: {body}");
    assert_eq!(
        post(Some("Authorization: Basic dXNlcjpwYXNz".into())).0,
        400,
        "not Bearer"
    );
    let forged = stranger
        .issue(Operation::Upload, "default", "disk", UPLOAD_TOKEN_TTL)
        .unwrap();
    assert_eq!(post(Some(bearer(&forged))).0, 401, "forged");
    let expired = env
        .signer
        .sign(&claims(Operation::Upload, "disk", now - 900, now - 600))
        .unwrap();
    assert_eq!(post(Some(bearer(&expired))).0, 401, "expired");
    let mut wrong_iss = claims(Operation::Upload, "disk", now, now + 300);
    wrong_iss.iss = "someone".into();
    assert_eq!(
        post(Some(bearer(&env.signer.sign(&wrong_iss).unwrap()))).0,
        401,
        "issuer"
    );
    let clone = env
        .signer
        .issue(Operation::Clone, "default", "disk", UPLOAD_TOKEN_TTL)
        .unwrap();
    assert_eq!(post(Some(bearer(&clone))).0, 400, "clone token");
    let (code, body) = post(Some(bearer(&token(&env, "default", "other"))));
    assert_eq!(code, 503, "token for another volume: {body}");
    assert!(body.contains("doesn&#39;t exist"), "{body}");
    let (code, body) = post(Some(bearer(&token(&env, "elsewhere", "disk"))));
    assert_eq!(
        code, 503,
        "token for that name in another namespace: {body}"
    );
    let (code, body) = post(Some(bearer(&token(
        &env,
        "default",
        "<script>alert(1)</script>",
    ))));
    assert_eq!(code, 503);
    assert!(
        body.contains("&lt;script&gt;") && !body.contains("<script>"),
        "{body}"
    );
    // A refused client that is already streaming a large body (no `Expect: 100-continue`, like
    // virtctl) gets the status and the reason, and the proxy does not wait for the body.
    let big = env.dir.join("big.raw");
    std::fs::write(&big, vec![0x5a_u8; 48 << 20]).unwrap();
    let big_arg = big.to_str().unwrap().to_string();
    for (auth, want) in [
        (bearer(&forged), 401),
        (bearer(&token(&env, "default", "other")), 503),
    ] {
        let (code, body) = curl(
            &env.pki,
            false,
            &[
                "-H", &auth, "-H", "Expect:", "-T", &big_arg, "-X", "POST", &url,
            ],
        );
        assert_eq!(code, want, "large body refused: {body}");
        assert!(!body.is_empty(), "the refusal carries its reason");
    }
    // None of that reached the upload server.
    assert!(server.running());
    assert!(!server.disk().exists());
}

#[test]
fn upload_server_demands_the_client_certificate() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let mut server = UploadServer::start(&env.pki, &env.dir.join("s1"), "8Mi", &[]);
    let url = format!("{}/v1beta1/upload", server.url());
    let (code, _) = curl(&env.pki, false, &["-X", "POST", "--data-binary", "x", &url]);
    assert_eq!(code, 401, "no client certificate");
    let (code, _) = curl(
        &env.pki,
        false,
        &[
            "--cert",
            env.pki.p("stranger.crt").to_str().unwrap(),
            "--key",
            env.pki.p("stranger.key").to_str().unwrap(),
            "-X",
            "POST",
            "--data-binary",
            "x",
            &url,
        ],
    );
    assert_eq!(code, 0, "a certificate of another CA fails the handshake");
    let (code, _) = curl(
        &env.pki,
        false,
        &["-I", &format!("{}/v1beta1/upload-async", server.url())],
    );
    assert_eq!(code, 200, "HEAD probe on async paths");
    let (code, _) = curl(&env.pki, true, &[&url]);
    assert_eq!(code, 404, "GET is not an upload");
    let (code, body) = curl(&env.pki, false, &[&format!("{}/healthz", server.url())]);
    assert_eq!((code, body.as_str()), (200, "OK"));
    assert!(server.running());
}

#[test]
fn upload_busy_server_answers_503_and_too_large_image_400() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let fx = qemu::fixtures(&env.dir.join("img"), IMAGE_SIZE).unwrap();
    let mut server = UploadServer::start(&env.pki, &env.dir.join("s1"), "4Mi", &[]);
    let url = format!("{}/v1beta1/upload", server.url());
    // A qcow2 whose virtual size exceeds the volume is refused from its header, before the body.
    let data = format!("@{}", fx.qcow2.display());
    let (code, body) = curl(
        &env.pki,
        true,
        &["-X", "POST", "--data-binary", &data, &url],
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("effective image size is larger than the reported available storage"),
        "{body}"
    );
    assert!(!server.disk().exists(), "partial data removed");

    // A slow upload keeps the server busy.
    let mut slow = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--limit-rate", "512K", "--cacert"])
        .arg(env.pki.p("ca.crt"))
        .arg("--cert")
        .arg(env.pki.p("client.crt"))
        .arg("--key")
        .arg(env.pki.p("client.key"))
        .args([
            "-X",
            "POST",
            "--data-binary",
            &format!("@{}", fx.raw.display()),
            &url,
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (code, body) = curl(&env.pki, true, &["-X", "POST", "--data-binary", "x", &url]);
    assert_eq!(code, 503, "{body}");
    // The same through the proxy, with a body large enough that curl is still sending when
    // the answer comes.
    let proxy = Proxy::for_disk(&env, &server);
    let (code, body) = curl(
        &env.pki,
        false,
        &[
            "-H",
            &bearer(&token(&env, "default", "disk")),
            "--data-binary",
            &format!("@{}", fx.raw.display()),
            &format!("{}/v1beta1/upload", proxy.url()),
        ],
    );
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("an upload is already in progress"), "{body}");
    let _ = slow.kill();
    let _ = slow.wait();
    assert!(server.running());
}

#[test]
fn upload_wrong_digest_is_refused_and_right_digest_completes() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let fx = qemu::fixtures(&env.dir.join("img"), IMAGE_SIZE).unwrap();
    let mut server = UploadServer::start(&env.pki, &env.dir.join("s1"), "8Mi", &[]);
    let proxy = Proxy::for_disk(&env, &server);
    let url = format!("{}/v1beta1/upload", proxy.url());
    let data = format!("@{}", fx.qcow2_gz.display());
    let wrong = format!("Content-Digest: sha-256=:{}:", "A".repeat(43) + "=");
    let (code, body) = curl(
        &env.pki,
        false,
        &[
            "-H",
            &bearer(&token(&env, "default", "disk")),
            "-H",
            &wrong,
            "--data-binary",
            &data,
            &url,
        ],
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("Content-Digest mismatch"), "{body}");
    assert!(
        !server.disk().exists(),
        "data of a mismatching upload is removed"
    );
    assert!(server.running());

    let sha = sha256_b64(&fx.qcow2_gz);
    let right = format!("Content-Digest: sha-256=:{sha}:");
    let (code, body) = curl(
        &env.pki,
        false,
        &[
            "-H",
            &bearer(&token(&env, "default", "disk")),
            "-H",
            &right,
            "--data-binary",
            &data,
            &url,
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert_completed(&mut server);
    let oracle = env.dir.join("oracle.raw");
    qemu::convert(&fx.qcow2, "qcow2", &oracle, "raw", &[]).unwrap();
    qemu::assert_same_image(&server.disk(), &oracle);
}

fn sha256_b64(path: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl dgst -sha256 -binary '{}' | base64 -w0",
            path.display()
        ))
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Start curl streaming a POST body from its stdin with the full Content-Length, feed it
/// `first` bytes of `file`, then kill it: the body is cut at exactly that point.
fn cut_upload(
    pki: &Pki,
    url: &str,
    headers: &[String],
    file: &Path,
    first: usize,
    client_cert: bool,
) {
    let data = std::fs::read(file).unwrap();
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "/dev/null", "--cacert"])
        .arg(pki.p("ca.crt"));
    if client_cert {
        cmd.arg("--cert")
            .arg(pki.p("client.crt"))
            .arg("--key")
            .arg(pki.p("client.key"));
    }
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    let mut child = cmd
        .args(["-X", "POST", "-T", "-", "-H"])
        .arg(format!("Content-Length: {}", data.len()))
        .arg(url)
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&data[..first]).unwrap();
    stdin.flush().unwrap();
    // Let curl push what it has through TLS (and the proxy) before the connection dies.
    std::thread::sleep(Duration::from_secs(2));
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_offset(pki: &Pki, url: &str, headers: &[String], client_cert: bool, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut args: Vec<&str> = Vec::new();
        for h in headers {
            args.push("-H");
            args.push(h);
        }
        args.push(url);
        let (code, body) = curl(pki, client_cert, &args);
        let got: u64 = body.trim().parse().unwrap_or(0);
        if code == 200 && got == want {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "offset query: {code} {body:?}, wanted {want}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn upload_completed_server_answers_409_until_it_exits() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let fx = qemu::fixtures(&env.dir.join("img"), IMAGE_SIZE).unwrap();
    // A longer grace than the default half second, so the checks below fit on a busy machine.
    let mut server = UploadServer::start(
        &env.pki,
        &env.dir.join("s1"),
        "8Mi",
        &[("CDI_UPLOAD_COMPLETED_GRACE_MS", "6000")],
    );
    let proxy = Proxy::for_disk(&env, &server);
    let auth = bearer(&token(&env, "default", "disk"));
    let upload = format!("{}/v1beta1/upload", proxy.url());
    let data = format!("@{}", fx.raw.display());
    let (code, body) = curl(
        &env.pki,
        false,
        &["-H", &auth, "--data-binary", &data, &upload],
    );
    assert_eq!(code, 200, "{body}");
    let done = Instant::now();
    // Completion is reported at once, while the server still answers.
    let msg = std::fs::read_to_string(server.dir.join("termination-log")).unwrap_or_default();
    assert!(
        msg.contains("\"message\":\"Upload Complete\""),
        "termination message written before the exit: {msg:?}"
    );
    assert!(server.running(), "the server answers for a grace period");

    // A client whose 200 was lost retries, or asks where to resume: 409, through the proxy
    // and directly.
    let offset = format!("{}/v1beta1/upload-offset", proxy.url());
    let direct_upload = format!("{}/v1beta1/upload-async", server.url());
    let direct_offset = format!("{}/v1beta1/upload-offset", server.url());
    let answers = [
        curl(
            &env.pki,
            false,
            &["-H", &auth, "--data-binary", &data, &upload],
        ),
        curl(&env.pki, false, &["-H", &auth, &offset]),
        curl(&env.pki, true, &["--data-binary", "more", &direct_upload]),
        curl(&env.pki, true, &[&direct_offset]),
    ];
    assert!(
        done.elapsed() < Duration::from_secs(6),
        "checks took longer than the grace; the answers below may be from a dead server"
    );
    for (i, (code, body)) in answers.iter().enumerate() {
        assert_eq!(*code, 409, "request {i}: {body}");
    }
    for (i, (_, body)) in answers.iter().enumerate() {
        assert!(
            body.contains("upload already completed"),
            "request {i}: {body}"
        );
    }
    assert_completed(&mut server);
    let lingered = done.elapsed();
    assert!(
        lingered >= Duration::from_secs(5),
        "exited {lingered:?} after success, before the grace"
    );
    qemu::assert_same_image(&server.disk(), &fx.raw);
}

#[test]
fn upload_cut_at_half_then_retried_from_zero() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let fx = qemu::fixtures(&env.dir.join("img"), IMAGE_SIZE).unwrap();
    let mut server = UploadServer::start(&env.pki, &env.dir.join("s1"), "8Mi", &[]);
    let url = format!("{}/v1beta1/upload", server.url());
    let half = (IMAGE_SIZE / 2) as usize;
    cut_upload(&env.pki, &url, &[], &fx.raw, half, true);
    assert!(server.running());
    // Upstream's behaviour: simply POST everything again.
    let data = format!("@{}", fx.raw.display());
    let (code, body) = curl(
        &env.pki,
        true,
        &["-X", "POST", "--data-binary", &data, &url],
    );
    assert_eq!(code, 200, "{body}");
    assert_completed(&mut server);
    qemu::assert_same_image(&server.disk(), &fx.raw);
}

#[test]
fn upload_cut_at_half_then_resumed_through_proxy() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let fx = qemu::fixtures(&env.dir.join("img"), IMAGE_SIZE).unwrap();
    let mut server = UploadServer::start(&env.pki, &env.dir.join("s1"), "8Mi", &[]);
    let proxy = Proxy::for_disk(&env, &server);
    let auth = vec![bearer(&token(&env, "default", "disk"))];
    let sha = sha256_b64(&fx.raw);
    let mut headers = auth.clone();
    headers.push(format!("Content-Digest: sha-256=:{sha}:"));
    let url = format!("{}/v1beta1/upload", proxy.url());
    let half = (IMAGE_SIZE / 2) as usize;
    cut_upload(&env.pki, &url, &headers, &fx.raw, half, false);

    let offset = wait_offset(
        &env.pki,
        &format!("{}/v1beta1/upload-offset", proxy.url()),
        &auth,
        false,
        half as u64,
    );
    let rest = env.dir.join("rest.bin");
    std::fs::write(&rest, &std::fs::read(&fx.raw).unwrap()[offset as usize..]).unwrap();
    // A wrong offset is a conflict that names the right one.
    let (code, _) = curl(
        &env.pki,
        false,
        &[
            "-H",
            &headers[0],
            "-H",
            "Upload-Offset: 1",
            "--data-binary",
            "x",
            &url,
        ],
    );
    assert_eq!(code, 409);
    let data = format!("@{}", rest.display());
    let off = format!("Upload-Offset: {offset}");
    let (code, body) = curl(
        &env.pki,
        false,
        &[
            "-H",
            &headers[0],
            "-H",
            &headers[1],
            "-H",
            &off,
            "--data-binary",
            &data,
            &url,
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert_completed(&mut server);
    qemu::assert_same_image(&server.disk(), &fx.raw);
}

#[test]
fn upload_interrupted_and_abandoned_after_the_resume_window() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let fx = qemu::fixtures(&env.dir.join("img"), IMAGE_SIZE).unwrap();
    let mut server = UploadServer::start(
        &env.pki,
        &env.dir.join("s1"),
        "8Mi",
        &[("CDI_UPLOAD_RESUME_WINDOW_SECS", "2")],
    );
    let url = format!("{}/v1beta1/upload", server.url());
    cut_upload(&env.pki, &url, &[], &fx.raw, 1 << 20, true);
    std::thread::sleep(Duration::from_secs(3));
    let (code, body) = curl(
        &env.pki,
        true,
        &[&format!("{}/v1beta1/upload-offset", server.url())],
    );
    assert_eq!((code, body.trim()), (200, "0"), "abandoned: back to idle");
    assert!(!server.disk().exists(), "abandoned data is removed");
    assert!(server.running());
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Size of each concurrent upload: more than [`PEAK_RSS_LIMIT_KIB`], so a proxy or server that
/// held an image (or a large part of it) in memory would break the limit.
const CONCURRENT_IMAGE: u64 = 80 << 20;
/// The memory target per process (proxy and each upload server), from the product principles.
const PEAK_RSS_LIMIT_KIB: u64 = 64 << 10;

#[test]
fn upload_ten_concurrent_volumes_with_bounded_memory() {
    if !prerequisites() {
        return;
    }
    let env = env();
    // Dense data (no holes to skip): every byte crosses the proxy and lands on disk.
    let src = env.dir.join("dense.raw");
    let out = Command::new("head")
        .args(["-c", &CONCURRENT_IMAGE.to_string(), "/dev/urandom"])
        .output()
        .unwrap();
    std::fs::write(&src, out.stdout).unwrap();
    let mut servers: Vec<UploadServer> = (0..10)
        .map(|i| UploadServer::start(&env.pki, &env.dir.join(format!("s{i}")), "80Mi", &[]))
        .collect();
    let targets: Vec<String> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| format!("default/v{i}={}", s.url()))
        .collect();
    let proxy = Proxy::start(&env.pki, &env.key, &targets, &env.dir);
    // Sample VmHWM (peak RSS) of the proxy (index 0) and the servers while they live.
    let mut pids: Vec<u32> = vec![proxy.child.0.id()];
    pids.extend(servers.iter().map(|s| s.child.id()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_sampling = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = vec![0u64; pids.len()];
        while !stop_sampling.load(std::sync::atomic::Ordering::SeqCst) {
            for (i, pid) in pids.iter().enumerate() {
                if let Some(kib) = peak_rss_kib(*pid) {
                    peak[i] = peak[i].max(kib);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    });
    let uploads: Vec<_> = (0..10)
        .map(|i| {
            let tok = token(&env, "default", &format!("v{i}"));
            Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                .arg(env.pki.p("ca.crt"))
                .args(["-H", &bearer(&tok), "-X", "POST", "-T"])
                .arg(&src)
                .arg(format!("{}/v1beta1/upload", proxy.url()))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for u in uploads {
        let out = u.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    }
    for s in &mut servers {
        assert_completed(s);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak = sampler.join().unwrap();
    println!(
        "peak RSS (KiB) of the proxy: {}, of the 10 upload servers: {:?}",
        peak[0],
        &peak[1..]
    );
    assert!(
        peak.iter().all(|&kib| kib > 0),
        "every process was sampled: {peak:?}"
    );
    for (i, kib) in peak.iter().enumerate() {
        let who = if i == 0 {
            "proxy".to_string()
        } else {
            format!("upload server {}", i - 1)
        };
        assert!(
            *kib <= PEAK_RSS_LIMIT_KIB,
            "{who} peaked at {kib} KiB with ten {} MiB uploads in flight",
            CONCURRENT_IMAGE >> 20
        );
    }
    for s in &servers {
        qemu::assert_same_image(&s.disk(), &src);
    }
}

#[test]
fn upload_sparse_4gib_raw_through_proxy_stays_sparse() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let src = env.dir.join("sparse.raw");
    let size: u64 = 4 << 30;
    Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&src)
        .arg(size.to_string())
        .status()
        .unwrap();
    Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0x33 3G 1M",
        ])
        .arg(&src)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    let mut server = UploadServer::start(&env.pki, &env.dir.join("s1"), "4Gi", &[]);
    let proxy = Proxy::start(
        &env.pki,
        &env.key,
        &[format!("default/big={}", server.url())],
        &env.dir,
    );
    let url = format!("{}/v1beta1/upload", proxy.url());
    // -T streams from disk (curl's --data-binary would load 4 GiB into memory).
    let (code, body) = curl(
        &env.pki,
        false,
        &[
            "-H",
            &bearer(&token(&env, "default", "big")),
            "-X",
            "POST",
            "-T",
            &src.display().to_string(),
            &url,
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert_completed(&mut server);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(server.disk()).unwrap();
    assert_eq!(meta.len(), size);
    let allocated = meta.blocks() * 512;
    println!("4 GiB sparse upload: {allocated} bytes allocated");
    assert!(allocated < 64 << 20, "target allocation {allocated} bytes");
    qemu::assert_same_image(&server.disk(), &src);
}

#[test]
fn upload_deadline_ends_an_unused_server() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let out = Command::new("date")
        .args(["-u", "-d", "+2 seconds", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    let deadline = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut server = UploadServer::start(
        &env.pki,
        &env.dir.join("s1"),
        "8Mi",
        &[("DEADLINE", deadline.as_str())],
    );
    let (code, msg) = server.wait_exit();
    assert_eq!(code, 0, "{}", server.log());
    assert_eq!(
        msg,
        r#"{"deadlinePassed":true,"message":"Deadline Passed"}"#
    );
}

#[test]
fn upload_proxy_strips_the_clone_content_type() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let fx = qemu::fixtures(&env.dir.join("img"), IMAGE_SIZE).unwrap();
    let mut server = UploadServer::start(&env.pki, &env.dir.join("s1"), "8Mi", &[]);
    let data = format!("@{}", fx.raw.display());
    let clone = "x-cdi-content-type: filesystem-clone";
    // Straight to the upload server the clone switch is refused ...
    let direct = format!("{}/v1beta1/upload", server.url());
    let (code, body) = curl(
        &env.pki,
        true,
        &["-H", clone, "--data-binary", &data, &direct],
    );
    assert_eq!(code, 400, "{body}");
    // ... and through the proxy it never arrives: a plain upload.
    let proxy = Proxy::for_disk(&env, &server);
    let url = format!("{}/v1beta1/upload", proxy.url());
    let (code, body) = curl(
        &env.pki,
        false,
        &[
            "-H",
            &bearer(&token(&env, "default", "disk")),
            "-H",
            clone,
            "--data-binary",
            &data,
            &url,
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert_completed(&mut server);
    qemu::assert_same_image(&server.disk(), &fx.raw);
}

#[test]
fn upload_proxy_answers_cors_preflight() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let proxy = Proxy::start(&env.pki, &env.key, &[], &env.dir);
    let out = Command::new("curl")
        .args(["-sS", "-i", "-X", "OPTIONS", "--cacert"])
        .arg(env.pki.p("ca.crt"))
        .args([
            "-H",
            "Origin: https://console.example",
            "-H",
            "Access-Control-Request-Method: POST",
        ])
        .args([
            "-H",
            "Access-Control-Request-Headers: authorization,content-type",
        ])
        .arg(format!("{}/v1beta1/upload", proxy.url()))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 204"), "{head}");
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    assert!(
        head.contains("access-control-allow-headers: authorization"),
        "{head}"
    );
}

#[test]
fn upload_archive_volume_is_routed_to_the_archive_path_and_unpacked() {
    if !prerequisites() || !have("tar") {
        skip("tar is not installed");
        return;
    }
    let env = env();
    let src = env.dir.join("tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("readme.txt"), "archive content\n").unwrap();
    std::fs::write(src.join("sub/data.bin"), vec![0x42u8; 100_000]).unwrap();
    let tgz = env.dir.join("tree.tar.gz");
    let ok = Command::new("tar")
        .arg("-czf")
        .arg(&tgz)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(ok.success());
    let mut server = UploadServer::start(&env.pki, &env.dir.join("s1"), "8Mi", &[]);
    let proxy = Proxy::start(
        &env.pki,
        &env.key,
        &[format!("default/arc={}#archive", server.url())],
        &env.dir,
    );
    let data = format!("@{}", tgz.display());
    let (code, body) = curl(
        &env.pki,
        false,
        &[
            "-H",
            &bearer(&token(&env, "default", "arc")),
            "--data-binary",
            &data,
            &format!("{}/v1beta1/upload", proxy.url()),
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert_completed(&mut server);
    let vol = env.dir.join("s1");
    assert_eq!(
        std::fs::read_to_string(vol.join("readme.txt")).unwrap(),
        "archive content\n"
    );
    assert_eq!(
        std::fs::read(vol.join("sub/data.bin")).unwrap(),
        vec![0x42u8; 100_000]
    );
}
