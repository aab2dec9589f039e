//! The shared test kit: real servers started on 127.0.0.1 for end-to-end tests.
//!
//! Every module starts one kind of server from a per-test work directory and stops it when the
//! handle is dropped, so a failing test never leaves a process behind:
//!
//! * [`pki`]: a throw-away CA and a server certificate for `localhost`/`127.0.0.1` (openssl CLI).
//! * [`nginx`]: nginx-light serving a directory over HTTP and HTTPS, with Range support, a
//!   basic-auth area and redirects.
//! * [`fault`]: an in-process HTTP server of our own that misbehaves on purpose (drops the
//!   connection, answers 5xx, trickles, lies about lengths, ignores Range, redirects forever).
//! * [`registry`]: Debian's `docker-registry` over TLS with htpasswd, images built with umoci
//!   and pushed with skopeo.
//! * [`s3`]: a SigV4-verifying S3 server (moto in a cached virtualenv).
//! * [`qemu`]: qemu-img helpers used as the oracle.
//! * [`serve`]: `cdi serve` itself, with its client commands and raw API requests.
//!
//! Tests that cannot run their component call [`skip`] and return; CI installs everything, so a
//! skip there is a bug.

pub mod fault;
pub mod nginx;
pub mod pki;
pub mod qemu;
pub mod registry;
pub mod s3;
pub mod serve;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Root of the Cargo workspace (the directory holding `tests/`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The `cdi` binary under test: `$CDI_BIN`, else `<workspace>/target/debug/cdi`.
///
/// Panics with instructions when it does not exist: end-to-end tests must not silently test a
/// stale or missing binary.
pub fn cdi_bin() -> PathBuf {
    let path = match std::env::var_os("CDI_BIN") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("target").join("debug").join("cdi"),
    };
    assert!(
        path.is_file(),
        "cdi binary not found at {}: build it with `cargo build --bin cdi` and/or set CDI_BIN",
        path.display()
    );
    path
}

/// Whether `cmd` is an executable on `PATH` (or in the sbin directories, where Debian puts
/// nginx and friends even when `PATH` lacks them).
pub fn have(cmd: &str) -> bool {
    find_program(cmd).is_some()
}

/// Full path of `cmd` found on `PATH`, `/usr/sbin` or `/sbin`.
pub fn find_program(cmd: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")];
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(cmd))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Announce that a test cannot run its real component; the test then returns.
pub fn skip(reason: &str) {
    println!("SKIPPED: {reason}");
    eprintln!("SKIPPED: {reason}");
}

/// True when every program in `tools` is installed; otherwise prints a `SKIPPED:` line naming
/// the missing ones (CI installs them all, so a skip there is a bug).
pub fn have_all(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        skip(&format!("not installed: {}", missing.join(", ")));
    }
    missing.is_empty()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// How long servers get to start listening before a test gives up.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Wait until something accepts TCP connections on `127.0.0.1:port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> std::io::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("nothing listens on 127.0.0.1:{port} after {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run a command to completion; an error carries its stderr.
pub fn run(cmd: &mut std::process::Command) -> std::io::Result<std::process::Output> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// A child process that is killed (and reaped) when dropped.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
