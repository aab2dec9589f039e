//! nginx-light as the HTTP(S) file server of end-to-end tests.
//!
//! ```text
//! let pki = TestPki::generate(&work.join("pki"))?;
//! let nginx = Nginx::start(
//!     NginxOptions {
//!         root: www.clone(),
//!         basic_auth: Some(("user".into(), "pass".into())),
//!         tls: Some(pki),
//!         ..Default::default()
//!     },
//!     &work.join("nginx"),
//! )?;
//! nginx.http_url;             // "http://127.0.0.1:PORT"
//! nginx.https_url;            // "https://localhost:PORT" (empty without `tls`)
//! nginx.url("disk.qcow2");    // http_url + "/disk.qcow2"
//! nginx.access_log_text();    // one line per request, format below
//! ```
//!
//! Served on both listeners:
//! * `/<name>`: files under `root`, with `Range` (206) and `Accept-Ranges: bytes`;
//! * `/private/<name>`: the same files behind basic auth (`basic_auth`; 401 without it);
//! * `/redirect/<name>`: `302` to `/<name>`.
//!
//! nginx runs in the foreground (`daemon off`, `master_process off`) from a config in the work
//! directory, listening on 127.0.0.1 only; `start` returns once both ports accept connections,
//! and dropping the handle kills it. Access-log lines look like
//! `"GET /disk.img HTTP/1.1" 206 1048576 range="bytes=0-" user="user" xtest="…"`
//! (`xtest` is the request's `X-Test` header, for extra-header tests).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::pki::TestPki;
use crate::{KillOnDrop, STARTUP_TIMEOUT, find_program, free_port, run, wait_for_port};

/// What to serve and how.
#[derive(Debug, Clone, Default)]
pub struct NginxOptions {
    /// Directory served at `/`.
    pub root: PathBuf,
    /// `(user, password)` required under `/private/`.
    pub basic_auth: Option<(String, String)>,
    /// Also serve HTTPS with this PKI's server certificate.
    pub tls: Option<TestPki>,
    /// Extra directives placed inside both `server` blocks (e.g. more `location`s).
    pub extra_server_config: Option<String>,
}

/// A running nginx; dropped → stopped.
#[derive(Debug)]
pub struct Nginx {
    /// `http://127.0.0.1:PORT`.
    pub http_url: String,
    /// `https://localhost:PORT` when TLS was requested, else empty.
    pub https_url: String,
    /// HTTP port.
    pub http_port: u16,
    /// HTTPS port (0 without TLS).
    pub https_port: u16,
    /// Directory served.
    pub root: PathBuf,
    /// The access log.
    pub access_log: PathBuf,
    /// The error log.
    pub error_log: PathBuf,
    _child: KillOnDrop,
}

/// Attempts at picking free ports before giving up (another test may grab a port between
/// `free_port` and nginx's bind).
const START_ATTEMPTS: usize = 5;

impl Nginx {
    /// Start nginx serving `opts.root`, with its config, logs and temp dirs under `workdir`.
    pub fn start(opts: NginxOptions, workdir: &Path) -> io::Result<Nginx> {
        let nginx = find_program("nginx")
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "nginx is not installed"))?;
        fs::create_dir_all(workdir.join("tmp"))?;
        let htpasswd = workdir.join("htpasswd");
        match &opts.basic_auth {
            Some((user, pass)) => {
                run(Command::new("htpasswd")
                    .arg("-c")
                    .arg("-b")
                    .arg(&htpasswd)
                    .arg(user)
                    .arg(pass))?;
            }
            // No user can match an empty file: /private/ then always answers 401.
            None => fs::write(&htpasswd, "")?,
        }
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(&nginx, &opts, workdir, &htpasswd) {
                Ok(n) => return Ok(n),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("nginx did not start")))
    }

    fn try_start(
        nginx: &Path,
        opts: &NginxOptions,
        w: &Path,
        htpasswd: &Path,
    ) -> io::Result<Nginx> {
        let http_port = free_port();
        let https_port = if opts.tls.is_some() { free_port() } else { 0 };
        let root = fs::canonicalize(&opts.root)?;
        let root_s = root.display().to_string();
        let w_s = w.display().to_string();
        let locations = format!(
            "root {root_s};\n\
             location /private/ {{ auth_basic cdi; auth_basic_user_file {htpasswd}; alias {root_s}/; }}\n\
             location ~ ^/redirect/(.*)$ {{ return 302 /$1; }}\n\
             {extra}\n",
            htpasswd = htpasswd.display(),
            extra = opts.extra_server_config.as_deref().unwrap_or(""),
        );
        let tls_server = match &opts.tls {
            Some(pki) => format!(
                "server {{ listen 127.0.0.1:{https_port} ssl; ssl_certificate {}; \
                 ssl_certificate_key {}; {locations} }}\n",
                pki.server_cert.display(),
                pki.server_key.display()
            ),
            None => String::new(),
        };
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n\
             error_log {w_s}/error.log info;\npid {w_s}/nginx.pid;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
               log_format cdi '\"$request\" $status $body_bytes_sent range=\"$http_range\" \
             user=\"$remote_user\" xtest=\"$http_x_test\"';\n\
               access_log {w_s}/access.log cdi;\n\
               client_body_temp_path {w_s}/tmp/body; proxy_temp_path {w_s}/tmp/proxy;\n\
               fastcgi_temp_path {w_s}/tmp/fastcgi; uwsgi_temp_path {w_s}/tmp/uwsgi;\n\
               scgi_temp_path {w_s}/tmp/scgi;\n\
               default_type application/octet-stream;\n\
               sendfile on;\n\
               server {{ listen 127.0.0.1:{http_port}; {locations} }}\n\
               {tls_server}\
             }}\n"
        );
        let conf_path = w.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(w)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut child = KillOnDrop(child);
        let ports = [http_port, https_port];
        for port in ports.into_iter().filter(|p| *p != 0) {
            if let Err(e) = wait_for_port(port, STARTUP_TIMEOUT) {
                let log = fs::read_to_string(w.join("error.log")).unwrap_or_default();
                let _ = child.0.kill();
                return Err(io::Error::other(format!("nginx did not start: {e}; {log}")));
            }
            if let Ok(Some(status)) = child.0.try_wait() {
                return Err(io::Error::other(format!("nginx exited: {status}")));
            }
        }
        Ok(Nginx {
            http_url: format!("http://127.0.0.1:{http_port}"),
            https_url: if https_port != 0 {
                format!("https://localhost:{https_port}")
            } else {
                String::new()
            },
            http_port,
            https_port,
            root,
            access_log: w.join("access.log"),
            error_log: w.join("error.log"),
            _child: child,
        })
    }

    /// `http_url/path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.http_url, path.trim_start_matches('/'))
    }

    /// `https_url/path`.
    pub fn https(&self, path: &str) -> String {
        format!("{}/{}", self.https_url, path.trim_start_matches('/'))
    }

    /// The access log so far (nginx writes each line when the request completes).
    pub fn access_log_text(&self) -> String {
        fs::read_to_string(&self.access_log).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curl(args: &[&str]) -> String {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    #[test]
    fn serves_ranges_auth_redirects_and_tls() {
        if !crate::have("nginx") || !crate::have("curl") || !crate::have("htpasswd") {
            crate::skip("nginx, curl or htpasswd is not installed");
            return;
        }
        let work = tempfile::tempdir().unwrap();
        let www = work.path().join("www");
        fs::create_dir_all(&www).unwrap();
        fs::write(www.join("f.bin"), vec![7u8; 4096]).unwrap();
        let pki = TestPki::generate(&work.path().join("pki")).unwrap();
        let ca = pki.ca_cert.display().to_string();
        let n = Nginx::start(
            NginxOptions {
                root: www,
                basic_auth: Some(("u".into(), "p".into())),
                tls: Some(pki),
                ..Default::default()
            },
            &work.path().join("nginx"),
        )
        .unwrap();
        assert_eq!(curl(&[&n.url("f.bin")]), "200");
        assert_eq!(curl(&["-r", "0-511", &n.url("f.bin")]), "206");
        assert_eq!(curl(&[&n.url("private/f.bin")]), "401");
        assert_eq!(curl(&["-u", "u:p", &n.url("private/f.bin")]), "200");
        assert_eq!(curl(&[&n.url("redirect/f.bin")]), "302");
        assert_eq!(curl(&["-L", &n.url("redirect/f.bin")]), "200");
        assert_eq!(curl(&["--cacert", &ca, &n.https("f.bin")]), "200");
        assert_eq!(curl(&[&n.https("f.bin")]), "000", "unknown CA must fail");
        assert!(n.access_log_text().contains("range=\"bytes=0-511\""));
    }
}
