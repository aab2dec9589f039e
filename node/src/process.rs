//! Child processes of pods: start in their own process group, record identity for crash
//! recovery, stop with SIGTERM → grace → SIGKILL.
//!
//! A pid alone is not an identity (pids are reused), so each run directory records the pid
//! *and* the process start time from `/proc/<pid>/stat`; a leftover is killed only when both
//! still match.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::spec::{ProcessSpec, layout};

/// Longest grace a deletion gets before SIGKILL, whatever `terminationGracePeriodSeconds`
/// says: the agent's shutdown and a user's `kubectl delete` should not hang for hours.
pub const MAX_TERMINATION_GRACE: Duration = Duration::from_secs(60);
/// Grace when the pod does not say (Kubernetes' default `terminationGracePeriodSeconds`).
pub const DEFAULT_TERMINATION_GRACE: Duration = Duration::from_secs(30);

/// Identity of a running child: pid plus start time (clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidRecord {
    /// Process id (and process group id: children lead their own group).
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`.
    pub start_time: u64,
}

/// Start time of a live process, from `/proc/<pid>/stat`.
pub fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or ')': fields are
    // counted after the last ')'. Field 3 (state) is the first after it; start time is 22.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Write the child's identity into its run directory.
pub fn write_pid_record(run_dir: &Path, rec: PidRecord) -> std::io::Result<()> {
    let path = run_dir.join(layout::PID);
    let tmp = run_dir.join(format!("{}.tmp", layout::PID));
    std::fs::write(&tmp, format!("{} {}\n", rec.pid, rec.start_time))?;
    std::fs::rename(tmp, path)
}

/// Read a recorded identity (`None` when absent or unreadable).
pub fn read_pid_record(run_dir: &Path) -> Option<PidRecord> {
    let text = std::fs::read_to_string(run_dir.join(layout::PID)).ok()?;
    let mut it = text.split_whitespace();
    Some(PidRecord {
        pid: it.next()?.parse().ok()?,
        start_time: it.next()?.parse().ok()?,
    })
}

/// Forget the recorded identity (the process is gone).
pub fn clear_pid_record(run_dir: &Path) {
    let _ = std::fs::remove_file(run_dir.join(layout::PID));
}

/// Kill the process group a previous agent recorded in `run_dir`, if that very process still
/// runs. Returns whether a record existed (the pod's container was lost either way).
pub fn kill_leftover(run_dir: &Path) -> bool {
    let Some(rec) = read_pid_record(run_dir) else {
        return false;
    };
    if rec.pid > 1 && proc_start_time(rec.pid) == Some(rec.start_time) {
        tracing::info!(pid = rec.pid, dir = %run_dir.display(), "killing a leftover pod process");
        // The group (what the pod started) and the process itself, should it have left
        // its group.
        let _ = killpg(Pid::from_raw(rec.pid), Signal::SIGKILL);
        let _ = nix::sys::signal::kill(Pid::from_raw(rec.pid), Signal::SIGKILL);
    }
    clear_pid_record(run_dir);
    true
}

/// A started container process.
#[derive(Debug)]
pub struct Running {
    child: tokio::process::Child,
    pid: i32,
    run_dir: PathBuf,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code; 128 + signal when signalled (as container runtimes report).
    pub code: i32,
    /// Signal, when signalled.
    pub signal: Option<i32>,
}

/// Start `spec` with stdout/stderr appended to `log_file`, in a new process group.
pub fn spawn(spec: &ProcessSpec, run_dir: &Path, log_file: &Path) -> std::io::Result<Running> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)?;
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.arg0(&spec.argv0)
        .args(&spec.args)
        .env_clear()
        .envs(&spec.env)
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own group: stopping the pod stops everything it started, as a container does.
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            // If the agent dies (even by SIGKILL) its pods die too, so a restarted agent never
            // races an orphan writing the same volume. The signal follows the spawning *thread*:
            // spawn only from async tasks (runtime worker threads live as long as the agent),
            // never from `spawn_blocking`/`block_in_place` threads, which may exit early.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn()?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| std::io::Error::other("spawned child has no pid"))?;
    if let Some(start_time) = proc_start_time(pid) {
        write_pid_record(run_dir, PidRecord { pid, start_time })?;
    }
    Ok(Running {
        child,
        pid,
        run_dir: run_dir.to_path_buf(),
    })
}

impl Running {
    /// Process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Wait for the end; then kill what is left of its group (a container's processes end
    /// with its main process).
    pub async fn wait(&mut self) -> Exit {
        let exit = match self.child.wait().await {
            Ok(st) => to_exit(st),
            Err(err) => {
                tracing::warn!(pid = self.pid, error = %err, "waiting for a pod process");
                Exit {
                    code: 255,
                    signal: None,
                }
            }
        };
        self.reap_group();
        exit
    }

    fn reap_group(&self) {
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        clear_pid_record(&self.run_dir);
    }

    /// SIGTERM the group, wait up to `grace`, then SIGKILL; the exit.
    pub async fn stop(&mut self, grace: Duration) -> Exit {
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGTERM);
        let grace = grace.min(MAX_TERMINATION_GRACE);
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(exit) => exit,
            Err(_) => {
                let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
                self.wait().await
            }
        }
    }
}

fn to_exit(st: std::process::ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(code), _) => Exit { code, signal: None },
        (None, Some(sig)) => Exit {
            code: 128 + sig,
            signal: Some(sig),
        },
        (None, None) => Exit {
            code: 255,
            signal: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn sh(script: &str, dir: &Path) -> ProcessSpec {
        ProcessSpec {
            program: "/bin/sh".into(),
            argv0: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: BTreeMap::from([("PATH".to_string(), "/usr/bin:/bin".to_string())]),
            cwd: dir.to_path_buf(),
            termination_log: dir.join("t"),
        }
    }

    #[test]
    fn start_time_of_self_is_readable_and_stable() {
        let me = i32::try_from(std::process::id()).unwrap();
        let a = proc_start_time(me).unwrap();
        assert_eq!(proc_start_time(me), Some(a));
        assert_eq!(proc_start_time(i32::MAX), None);
    }

    #[tokio::test]
    async fn exit_codes_signals_records_and_stop() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("log");
        let mut r = spawn(
            &sh("echo hi; echo err >&2; exit 3", tmp.path()),
            tmp.path(),
            &log,
        )
        .unwrap();
        assert_eq!(
            r.wait().await,
            Exit {
                code: 3,
                signal: None
            }
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hi\nerr\n");
        assert!(read_pid_record(tmp.path()).is_none(), "cleared on exit");

        // A shell that ignores SIGTERM is killed after the grace.
        let script = "trap '' TERM; touch trapped; sleep 30";
        let mut r = spawn(&sh(script, tmp.path()), tmp.path(), &log).unwrap();
        while !tmp.path().join("trapped").exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rec = read_pid_record(tmp.path()).unwrap();
        assert_eq!(rec.pid, r.pid());
        let exit = r.stop(Duration::from_millis(300)).await;
        assert_eq!(exit.signal, Some(9));
        assert_eq!(exit.code, 137);

        let mut r = spawn(&sh("sleep 30", tmp.path()), tmp.path(), &log).unwrap();
        let exit = r.stop(Duration::from_secs(5)).await;
        assert_eq!(exit.signal, Some(15));
    }

    #[tokio::test]
    async fn leftovers_are_killed_only_when_their_identity_matches() {
        let tmp = tempfile::tempdir().unwrap();
        // A record naming this test process with a wrong start time must not kill it.
        let me = i32::try_from(std::process::id()).unwrap();
        let real = proc_start_time(me).unwrap();
        write_pid_record(
            tmp.path(),
            PidRecord {
                pid: me,
                start_time: real + 1,
            },
        )
        .unwrap();
        assert!(kill_leftover(tmp.path()));
        assert!(read_pid_record(tmp.path()).is_none());
        assert!(!kill_leftover(tmp.path()), "no record, nothing to do");

        // A genuine leftover (spawned, then "forgotten" by its agent) is killed.
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let start_time = proc_start_time(pid).unwrap();
        write_pid_record(tmp.path(), PidRecord { pid, start_time }).unwrap();
        assert!(kill_leftover(tmp.path()));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(9));
    }
}
