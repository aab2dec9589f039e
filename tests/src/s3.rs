//! A SigV4-verifying S3 server for tests: moto (PyPI) in a cached virtualenv.
//!
//! ```text
//! let s3 = S3Server::start(&work.join("s3"))?;   // moto_server on 127.0.0.1:PORT
//! s3.create_bucket("images")?;
//! s3.put_object("images", "os/disk.qcow2", &path)?;
//! s3.endpoint;                 // "http://127.0.0.1:PORT"
//! s3.object_url("images", "os/disk.qcow2");   // path-style URL (upstream's S3 endpoint form)
//! (s3.access_key.as_str(), s3.secret_key.as_str());   // valid keys; anything else → 403
//! ```
//!
//! moto checks no signatures by default. Started with `INITIAL_NO_AUTH_ACTION_COUNT=3`, the
//! first three calls (IAM create-user, create-access-key, put-user-policy, made here) are free
//! and every later request must carry a valid SigV4 signature: a wrong secret gets
//! `SignatureDoesNotMatch`, an anonymous request 403. Buckets and uploads are done with
//! boto3 using the created keys.
//!
//! The virtualenv lives in `$CDI_TEST_CACHE/moto-venv` (default `~/.cache/cdi-tests`); it
//! is created with `pip install 'moto[server]' boto3` if missing (`.ci/run` prepares it).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{KillOnDrop, STARTUP_TIMEOUT, free_port, run, wait_for_port};

/// Cache directory of test tooling.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CDI_TEST_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("cdi-tests")
}

/// The moto virtualenv, created on first use.
pub fn moto_venv() -> io::Result<PathBuf> {
    let venv = cache_dir().join("moto-venv");
    if venv.join("bin").join("moto_server").is_file() && venv.join("bin").join("python").is_file() {
        return Ok(venv);
    }
    std::fs::create_dir_all(cache_dir())?;
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin").join("pip")).args([
        "install",
        "-q",
        "moto[server]",
        "boto3",
    ]))?;
    Ok(venv)
}

/// A running moto server; dropped → stopped.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Access key id accepted by the server.
    pub access_key: String,
    /// Its secret.
    pub secret_key: String,
    python: PathBuf,
    _child: KillOnDrop,
}

const SETUP_SCRIPT: &str = r#"
import boto3, sys
ep = sys.argv[1]
iam = boto3.client("iam", endpoint_url=ep, region_name="us-east-1",
                   aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam.create_user(UserName="cdi")
key = iam.create_access_key(UserName="cdi")["AccessKey"]
iam.put_user_policy(UserName="cdi", PolicyName="all", PolicyDocument=
    '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}')
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;

const S3_SCRIPT: &str = r#"
import boto3, sys
from botocore.config import Config
ep, ak, sk, op, bucket = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1", aws_access_key_id=ak,
                  aws_secret_access_key=sk, config=Config(s3={"addressing_style": "path"}))
if op == "mb":
    s3.create_bucket(Bucket=bucket)
elif op == "put":
    s3.upload_file(sys.argv[7], bucket, sys.argv[6])
"#;

impl S3Server {
    /// Start moto on a free port with signature checking on.
    pub fn start(workdir: &Path) -> io::Result<S3Server> {
        let venv = moto_venv()?;
        std::fs::create_dir_all(workdir)?;
        let port = free_port();
        let log = std::fs::File::create(workdir.join("moto.log"))?;
        let child = Command::new(venv.join("bin").join("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let child = KillOnDrop(child);
        wait_for_port(port, STARTUP_TIMEOUT)?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let python = venv.join("bin").join("python");
        let out = run(Command::new(&python)
            .arg("-c")
            .arg(SETUP_SCRIPT)
            .arg(&endpoint))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut parts = text.split_whitespace();
        let (Some(ak), Some(sk)) = (parts.next(), parts.next()) else {
            return Err(io::Error::other(format!("moto setup printed {text:?}")));
        };
        Ok(S3Server {
            endpoint,
            access_key: ak.to_string(),
            secret_key: sk.to_string(),
            python,
            _child: child,
        })
    }

    /// Create a bucket.
    pub fn create_bucket(&self, bucket: &str) -> io::Result<()> {
        run(Command::new(&self.python).arg("-c").arg(S3_SCRIPT).args([
            &self.endpoint,
            &self.access_key,
            &self.secret_key,
            "mb",
            bucket,
        ]))
        .map(|_| ())
    }

    /// Upload `file` as `bucket/key`.
    pub fn put_object(&self, bucket: &str, key: &str, file: &Path) -> io::Result<()> {
        run(Command::new(&self.python)
            .arg("-c")
            .arg(S3_SCRIPT)
            .args([
                &self.endpoint,
                &self.access_key,
                &self.secret_key,
                "put",
                bucket,
                key,
            ])
            .arg(file))
        .map(|_| ())
    }

    /// Path-style URL of an object.
    pub fn object_url(&self, bucket: &str, key: &str) -> String {
        format!("{}/{bucket}/{key}", self.endpoint)
    }
}
