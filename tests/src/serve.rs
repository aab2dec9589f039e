//! `cdi serve` as a test fixture: the real binary on 127.0.0.1 (free port, `--restart-backoff
//! 1s` so retries are observable quickly) over its own data directory, killed on drop, and the
//! `cdi` client commands and raw HTTPS requests pointed at it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{KillOnDrop, cdi_bin};

/// A running `cdi serve` (killed on drop).
pub struct Serve {
    /// The data directory.
    pub dir: PathBuf,
    child: Option<KillOnDrop>,
}

impl Serve {
    /// Start `cdi serve` over `dir` and wait until it answers.
    pub fn start(dir: &Path) -> Serve {
        let _ = std::fs::remove_file(dir.join("server.url"));
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("serve.log"))
            .unwrap();
        let child = Command::new(cdi_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--restart-backoff",
                "1s",
                "--data-dir",
            ])
            .arg(dir)
            .env_remove("CDI_HOME")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn cdi serve");
        let s = Serve {
            dir: dir.to_path_buf(),
            child: Some(KillOnDrop(child)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if s.dir.join("server.url").exists() && s.cdi(&["get", "sc"]).status.success() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "cdi serve did not come up: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything `cdi serve` printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    /// SIGKILL the server (a crash, as far as it can tell).
    pub fn kill(&mut self) {
        self.child = None;
    }

    /// Run a `cdi` client command against this server.
    pub fn cdi(&self, args: &[&str]) -> Output {
        Command::new(cdi_bin())
            .args(args)
            .arg("--data-dir")
            .arg(&self.dir)
            .env_remove("CDI_HOME")
            .output()
            .expect("run cdi")
    }

    /// Run a `cdi` client command that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cdi(args);
        assert!(
            out.status.success(),
            "cdi {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `cdi apply -f` a manifest given as text.
    pub fn apply(&self, manifest: &str) -> Output {
        let path = self.dir.join(format!("manifest-{}.yaml", rand_suffix()));
        std::fs::write(&path, manifest).unwrap();
        self.cdi(&["apply", "-f", path.to_str().unwrap()])
    }

    /// `cdi get KIND NAME -o json`, or `None` when it fails.
    pub fn get(&self, kind: &str, name: &str) -> Option<Value> {
        let out = self.cdi(&["get", kind, name, "-o", "json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// Wait until `f` holds for DataVolume `name`; panics with describe and logs on timeout.
    pub fn wait_dv(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        f: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(dv) = self.get("dv", name)
                && f(&dv)
            {
                return dv;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what} on dv/{name}: {}\n--- describe ---\n{}\n--- serve log ---\n{}\n--- worker log ---\n{}",
                    self.get("dv", name)
                        .map(|d| d.to_string())
                        .unwrap_or_default(),
                    String::from_utf8_lossy(&self.cdi(&["describe", "dv", name]).stdout),
                    self.log(),
                    std::fs::read_to_string(
                        self.dir.join("logs").join(format!("default_{name}.log"))
                    )
                    .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Wait until DataVolume `name` reaches `phase`.
    pub fn wait_phase(&self, name: &str, phase: &str, timeout: Duration) -> Value {
        self.wait_dv(name, timeout, phase, |dv| dv["status"]["phase"] == phase)
    }

    /// `disk.img` of the claim bound to `pvc`.
    pub fn disk(&self, pvc: &str) -> PathBuf {
        let pvc = self.get("pvc", pvc).expect("pvc exists");
        let uid = pvc["metadata"]["uid"].as_str().unwrap();
        self.dir.join("volumes").join(uid).join("disk.img")
    }
}

fn rand_suffix() -> String {
    format!(
        "{:x}",
        Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id()) ^ rand_nanos()
    )
}

fn rand_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Serve {
    /// The server's base URL (`https://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.url"))
            .expect("server.url")
            .trim()
            .to_string()
    }

    /// The admin bearer token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_string()
    }

    /// A raw request with the admin token through curl: `(status code, parsed JSON body or
    /// Null)`. `body` is sent as JSON when given.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut c = Command::new("curl");
        c.args(["-s", "-w", "\n%{http_code}", "-X", method, "--cacert"])
            .arg(self.dir.join("pki/ca.crt"))
            .args(["-H", &format!("Authorization: Bearer {}", self.token())]);
        if let Some(b) = body {
            c.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &b.to_string(),
            ]);
        }
        let out = c
            .arg(format!("{}{path}", self.url()))
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }
}
