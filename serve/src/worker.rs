//! Running workers (importer, upload server) and reading how they ended.
//!
//! [`WorkerRunner`] is the seam a Kubernetes backend replaces with "create a pod and watch its
//! container status". [`ProcessRunner`] runs them as child processes of the current executable
//! (`cdi importer`, `cdi uploadserver`) with upstream's environment contract; the outcome is the
//! exit code plus the file named by `CDI_TERMINATION_LOG`.

use std::path::PathBuf;
use std::process::Stdio;

use futures::future::BoxFuture;

use crate::decide::ExitStatus;

/// Which worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerKind {
    /// `cdi importer`.
    Importer,
    /// `cdi uploadserver`.
    UploadServer,
}

impl WorkerKind {
    /// Subcommand name.
    pub fn subcommand(self) -> &'static str {
        match self {
            WorkerKind::Importer => "importer",
            WorkerKind::UploadServer => "uploadserver",
        }
    }
}

/// Everything needed to start one worker run.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Which worker.
    pub kind: WorkerKind,
    /// Environment (the whole contract; nothing else is relied on).
    pub env: Vec<(String, String)>,
    /// Where the worker writes its termination message.
    pub termination_log: PathBuf,
    /// Where stdout/stderr go.
    pub log_file: PathBuf,
}

/// A started worker.
pub trait Worker: Send {
    /// OS process id, when there is one.
    fn pid(&self) -> Option<u32>;
    /// Wait for the end and collect the outcome.
    fn wait(&mut self) -> BoxFuture<'_, ExitStatus>;
    /// Stop it (and wait until it is gone).
    fn kill(&mut self) -> BoxFuture<'_, ()>;
    /// Where it writes its termination message, when that is a file the controller can read
    /// before the exit (an upload server writes "Upload Complete" there, then answers late
    /// clients 409 for a short grace before it exits).
    fn termination_log(&self) -> Option<PathBuf> {
        None
    }
}

/// The upload server's success message, once written, while the process may still be in its
/// completion grace: the volume is complete and synced when the line exists, so the controller
/// need not wait for the exit. `None` until then, and for any other message.
pub fn upload_completed_early(termination_log: &std::path::Path) -> Option<ExitStatus> {
    let termination = read_termination(termination_log);
    let msg: cdi_api::termination::TerminationMessage =
        serde_json::from_str(termination.trim()).ok()?;
    (msg.message.as_deref() == Some(cdi_api::termination::UPLOAD_COMPLETE)
        && msg.deadline_passed != Some(true))
    .then_some(ExitStatus {
        code: Some(0),
        termination,
    })
}

/// Starts workers.
pub trait WorkerRunner: Send + Sync {
    /// Start one run.
    fn start(&self, spec: WorkerSpec) -> std::io::Result<Box<dyn Worker>>;
}

/// Runs workers as child processes of `exe`.
pub struct ProcessRunner {
    exe: PathBuf,
}

impl ProcessRunner {
    /// Workers are `exe <subcommand>`.
    pub fn new(exe: PathBuf) -> Self {
        ProcessRunner { exe }
    }
}

/// Contract variables without a common prefix.
const CONTRACT_VARS: [&str; 15] = [
    cdi_api::env::OWNER_UID,
    cdi_api::env::FILESYSTEM_OVERHEAD,
    cdi_api::env::INSECURE_TLS,
    cdi_api::env::PREALLOCATION,
    cdi_api::env::TLS_KEY_FILE,
    cdi_api::env::TLS_CERT_FILE,
    cdi_api::env::CLIENT_CERT_FILE,
    cdi_api::env::CLIENT_NAME,
    cdi_api::env::DESTINATION,
    cdi_api::env::UPLOAD_IMAGE_SIZE,
    cdi_api::env::DEADLINE,
    cdi_api::env::LISTEN_ADDRESS,
    cdi_api::env::LISTEN_PORT,
    "http_proxy",
    "https_proxy",
];

struct ChildWorker {
    child: tokio::process::Child,
    termination_log: PathBuf,
}

impl WorkerRunner for ProcessRunner {
    fn start(&self, spec: WorkerSpec) -> std::io::Result<Box<dyn Worker>> {
        // A stale message from an earlier run must never be read as this run's outcome.
        match std::fs::remove_file(&spec.termination_log) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        if let Some(dir) = spec.log_file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_file)?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        // The contract is exactly `spec.env`: nothing of ours leaks in from the environment
        // `cdi serve` itself was started with.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("IMPORTER_")
                || k.starts_with("CDI_")
                || CONTRACT_VARS.contains(&k.as_ref())
            {
                cmd.env_remove(k.as_ref());
            }
        }
        cmd.arg(spec.kind.subcommand())
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                // If `cdi serve` dies (even by SIGKILL) its workers die too, so a restarted
                // control plane never races an orphan writing the same volume.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn()?;
        Ok(Box::new(ChildWorker {
            child,
            termination_log: spec.termination_log,
        }))
    }
}

impl Worker for ChildWorker {
    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn wait(&mut self) -> BoxFuture<'_, ExitStatus> {
        Box::pin(async move {
            let code = match self.child.wait().await {
                Ok(st) => st.code(),
                Err(_) => None,
            };
            let termination = read_termination(&self.termination_log);
            ExitStatus { code, termination }
        })
    }

    fn kill(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Already exited is fine.
            let _ = self.child.kill().await;
        })
    }

    fn termination_log(&self) -> Option<PathBuf> {
        Some(self.termination_log.clone())
    }
}

/// Read at most the upstream bound of a termination log.
fn read_termination(path: &std::path::Path) -> String {
    use std::io::Read;
    let mut buf = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f
            .take(cdi_api::termination::MAX_TERMINATION_MESSAGE_BYTES as u64)
            .read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Kill a worker left from a previous run of `cdi serve` if the pid still names one of ours.
pub fn kill_stale(pid: u32, exe: &std::path::Path) {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let mut args = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned());
    let prog = args.next().unwrap_or_default();
    let sub = args.next().unwrap_or_default();
    let ours = std::path::Path::new(&prog) == exe || prog.ends_with("/cdi") || prog == "cdi";
    if ours && (sub == "importer" || sub == "uploadserver") {
        let Ok(p) = i32::try_from(pid) else { return };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdi_api::termination::{DEADLINE_PASSED, TerminationMessage, UPLOAD_COMPLETE};

    #[test]
    fn only_the_upload_complete_line_ends_an_upload_early() {
        let tmp = tempfile::tempdir().unwrap();
        let term = tmp.path().join("term");
        assert!(upload_completed_early(&term).is_none(), "no file yet");
        std::fs::write(&term, "").unwrap();
        assert!(upload_completed_early(&term).is_none(), "empty");
        let done = TerminationMessage::with_message(UPLOAD_COMPLETE).to_line();
        std::fs::write(&term, &done).unwrap();
        let exit = upload_completed_early(&term).expect("complete");
        assert_eq!(exit.code, Some(0));
        assert_eq!(exit.termination, done);
        for other in [
            TerminationMessage {
                deadline_passed: Some(true),
                ..TerminationMessage::with_message(DEADLINE_PASSED)
            }
            .to_line(),
            TerminationMessage::with_message("Import Complete").to_line(),
            "Saving stream failed: boom".to_string(),
        ] {
            std::fs::write(&term, &other).unwrap();
            assert!(upload_completed_early(&term).is_none(), "{other}");
        }
    }

    #[tokio::test]
    async fn exit_code_and_termination_log_are_collected() {
        let tmp = tempfile::tempdir().unwrap();
        let script = tmp.path().join("fake");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"$1 failed: $MSG\" > \"$CDI_TERMINATION_LOG\"\nexit 3\n",
        )
        .unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(&script).unwrap().permissions(),
            0o755,
        );
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let term = tmp.path().join("term");
        std::fs::write(&term, "stale").unwrap();
        let runner = ProcessRunner::new(script);
        let spec = WorkerSpec {
            kind: WorkerKind::Importer,
            env: vec![
                ("MSG".into(), "boom".into()),
                ("CDI_TERMINATION_LOG".into(), term.display().to_string()),
            ],
            termination_log: term,
            log_file: tmp.path().join("log"),
        };
        let mut w = runner.start(spec).unwrap();
        assert!(w.pid().is_some());
        let st = w.wait().await;
        assert_eq!(st.code, Some(3));
        assert_eq!(st.termination.trim(), "importer failed: boom");
    }
}
