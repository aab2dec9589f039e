//! What the agent knows about a pod → `PodStatus`, and the kubelet's rules for what happens
//! after a container exits (restart policy, reasons, termination message).
//!
//! All pure; the agent owns one [`PodRecord`] per pod and writes [`PodRecord::to_status`]
//! through `pods/{name}/status`.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::ip::HOST_IP;

/// The kubelet reads at most this much of a termination-message file.
pub const MAX_TERMINATION_MESSAGE_BYTES: usize =
    cdi_api::termination::MAX_TERMINATION_MESSAGE_BYTES;
/// `FallbackToLogsOnError`: the kubelet uses at most this many bytes of the log's tail …
pub const FALLBACK_LOG_BYTES: usize = 2048;
/// … and at most this many lines.
pub const FALLBACK_LOG_LINES: usize = 80;
/// Exit code the agent records for a container it could not start (the runtime's 128).
pub const START_ERROR_EXIT_CODE: i32 = 128;
/// Exit code recorded for a container lost to an agent restart (killed, as by SIGKILL).
pub const AGENT_RESTART_EXIT_CODE: i32 = 137;
/// Message of a container lost to an agent restart.
pub const AGENT_RESTART_MESSAGE: &str = "node agent restarted";

/// Pod phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not started yet (volumes, configuration).
    Pending,
    /// The container runs or is being restarted.
    Running,
    /// Terminal: exited 0 and will not restart.
    Succeeded,
    /// Terminal: failed and will not restart.
    Failed,
}

impl Phase {
    /// Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }

    /// Succeeded or Failed.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }

    /// From a stored status.
    pub fn parse(s: &str) -> Option<Phase> {
        Some(match s {
            "Pending" => Phase::Pending,
            "Running" => Phase::Running,
            "Succeeded" => Phase::Succeeded,
            "Failed" => Phase::Failed,
            _ => return None,
        })
    }
}

/// One finished run of the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    /// Exit code (128 + signal for a signalled process).
    pub exit_code: i32,
    /// Signal that ended it, if any.
    pub signal: Option<i32>,
    /// `Completed`, `Error`, `StartError`.
    pub reason: String,
    /// Termination message (file content, or log tail on error).
    pub message: Option<String>,
    /// When it started.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Timestamp,
}

impl Termination {
    /// A run that ended with `exit_code` (and `signal`), with the kubelet's reason.
    pub fn exited(
        exit_code: i32,
        signal: Option<i32>,
        message: Option<String>,
        started_at: Timestamp,
        finished_at: Timestamp,
    ) -> Self {
        Termination {
            exit_code,
            signal,
            reason: termination_reason(exit_code).into(),
            message,
            started_at: Some(started_at),
            finished_at,
        }
    }

    fn to_k8s(&self) -> ContainerStateTerminated {
        ContainerStateTerminated {
            exit_code: self.exit_code,
            signal: self.signal,
            reason: Some(self.reason.clone()),
            message: self.message.clone().filter(|m| !m.is_empty()),
            started_at: self.started_at.map(Time),
            finished_at: Some(Time(self.finished_at)),
            container_id: None,
        }
    }

    fn from_k8s(t: &ContainerStateTerminated) -> Self {
        Termination {
            exit_code: t.exit_code,
            signal: t.signal,
            reason: t.reason.clone().unwrap_or_default(),
            message: t.message.clone(),
            started_at: t.started_at.as_ref().map(|t| t.0),
            finished_at: t
                .finished_at
                .as_ref()
                .map(|t| t.0)
                .unwrap_or_else(Timestamp::now),
        }
    }
}

/// State of the one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Container {
    /// Not running: `ContainerCreating`, `CrashLoopBackOff`, `CreateContainerConfigError` …
    Waiting {
        /// Reason.
        reason: String,
        /// Message.
        message: Option<String>,
    },
    /// Running since.
    Running {
        /// Start time.
        started_at: Timestamp,
    },
    /// Ended (and, in a terminal pod, will not restart).
    Terminated(Termination),
}

/// The kubelet's `reason` for an exit code.
pub fn termination_reason(exit_code: i32) -> &'static str {
    if exit_code == 0 { "Completed" } else { "Error" }
}

/// What the restart policy says after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Start the container again.
    Restart,
    /// The pod succeeded.
    Succeeded,
    /// The pod failed.
    Failed,
}

/// `restartPolicy` (`Always`, `OnFailure`, `Never`; Kubernetes' default `Always`) applied to
/// an exit code.
pub fn after_exit(restart_policy: Option<&str>, exit_code: i32) -> AfterExit {
    match (restart_policy.unwrap_or("Always"), exit_code) {
        ("Always", _) => AfterExit::Restart,
        ("OnFailure", 0) | ("Never", 0) => AfterExit::Succeeded,
        ("OnFailure", _) => AfterExit::Restart,
        _ => AfterExit::Failed,
    }
}

/// The kubelet's termination message: the file's first 4096 bytes (cut at a character
/// boundary); with `FallbackToLogsOnError`, an empty file and a failed exit, the log's tail.
pub fn termination_message(
    file: &[u8],
    exit_code: i32,
    fallback_to_logs: bool,
    log_tail: impl FnOnce() -> Vec<u8>,
) -> Option<String> {
    let text = truncate_utf8(file, MAX_TERMINATION_MESSAGE_BYTES);
    if !text.is_empty() || exit_code == 0 || !fallback_to_logs {
        return (!text.is_empty()).then_some(text);
    }
    let tail = log_tail();
    let start = tail.len().saturating_sub(FALLBACK_LOG_BYTES);
    let text = String::from_utf8_lossy(&tail[start..]).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let keep = &lines[lines.len().saturating_sub(FALLBACK_LOG_LINES)..];
    let out = keep.join("\n");
    (!out.is_empty()).then_some(out)
}

fn truncate_utf8(bytes: &[u8], max: usize) -> String {
    let mut end = bytes.len().min(max);
    // Do not split a UTF-8 sequence: back up to a boundary (at most 3 bytes).
    while end > 0 && end < bytes.len() && (bytes[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The container's situation in a stored status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviousRun {
    /// Never started (or nothing recorded).
    None,
    /// Running: after an agent restart that run is lost.
    Running,
    /// Exited and waiting to be restarted: the next start is a restart.
    Restarting,
}

/// The status conditions this node reports, with their last transition.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cond {
    status: bool,
    reason: Option<String>,
    message: Option<String>,
    since: Timestamp,
}

/// Everything the agent knows about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    /// Phase.
    pub phase: Phase,
    /// Loopback address.
    pub pod_ip: Option<Ipv4Addr>,
    /// When the agent accepted the pod.
    pub start_time: Timestamp,
    /// The container.
    pub container: Container,
    /// Previous run, when restarted.
    pub last_state: Option<Termination>,
    /// Restarts so far.
    pub restart_count: i32,
    /// Readiness (probe passed, or running without probe).
    pub ready: bool,
    /// Container name and image, echoed in the status.
    pub name: String,
    /// Image.
    pub image: String,
    scheduled: Cond,
    ready_cond: Cond,
}

impl PodRecord {
    /// A pod just picked up: Pending, container creating.
    pub fn new(name: &str, image: &str, now: Timestamp) -> Self {
        let cond = |status: bool| Cond {
            status,
            reason: None,
            message: None,
            since: now,
        };
        PodRecord {
            phase: Phase::Pending,
            pod_ip: None,
            start_time: now,
            container: Container::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last_state: None,
            restart_count: 0,
            ready: false,
            name: name.into(),
            image: image.into(),
            scheduled: cond(true),
            ready_cond: cond(false),
        }
    }

    /// Continue from a status a previous agent wrote: keeps the start time, restart count
    /// and last state. `None` when the status has no container record of ours.
    pub fn resume(status: &PodStatus, name: &str, image: &str) -> Self {
        let mut r = PodRecord::new(name, image, Timestamp::now());
        if let Some(t) = &status.start_time {
            r.start_time = t.0;
        }
        if let Some(cs) = status.container_statuses.as_ref().and_then(|c| c.first()) {
            r.restart_count = cs.restart_count;
            r.last_state = cs
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .map(Termination::from_k8s);
        }
        r
    }

    /// What a stored status says about the container when a (new) agent picks the pod up.
    pub fn previous_run(status: &PodStatus) -> PreviousRun {
        let Some(cs) = status.container_statuses.as_ref().and_then(|c| c.first()) else {
            return PreviousRun::None;
        };
        let st = cs.state.as_ref();
        if st.and_then(|s| s.running.as_ref()).is_some() {
            return PreviousRun::Running;
        }
        let between_restarts = (st.and_then(|s| s.waiting.as_ref()).is_some()
            && cs.restart_count > 0)
            || (st.and_then(|s| s.terminated.as_ref()).is_some()
                && status.phase.as_deref() == Some("Running"));
        if between_restarts {
            PreviousRun::Restarting
        } else {
            PreviousRun::None
        }
    }

    /// Set scheduling: `Some(message)` while claims are unbound (the scheduler's
    /// `Unschedulable`), `None` once scheduled.
    pub fn set_unschedulable(&mut self, message: Option<String>, now: Timestamp) {
        let want = Cond {
            status: message.is_none(),
            reason: message.as_ref().map(|_| "Unschedulable".to_string()),
            message,
            since: now,
        };
        update_cond(&mut self.scheduled, want);
    }

    /// Set readiness.
    pub fn set_ready(&mut self, ready: bool, now: Timestamp) {
        self.ready = ready;
        let reason = match (ready, self.phase.is_terminal()) {
            (false, true) => Some("PodCompleted".to_string()),
            (false, false) if matches!(self.container, Container::Running { .. }) => None,
            (false, false) => Some("ContainersNotReady".to_string()),
            (true, _) => None,
        };
        let message = (reason.as_deref() == Some("ContainersNotReady"))
            .then(|| format!("containers with unready status: [{}]", self.name));
        update_cond(
            &mut self.ready_cond,
            Cond {
                status: ready,
                reason,
                message,
                since: now,
            },
        );
    }

    /// The container started.
    pub fn started(&mut self, now: Timestamp) {
        self.phase = Phase::Running;
        self.container = Container::Running { started_at: now };
        self.set_ready(false, now);
    }

    /// The container could not be created yet (`waiting`); the pod stays in its phase.
    pub fn waiting(&mut self, reason: &str, message: Option<String>, now: Timestamp) {
        self.container = Container::Waiting {
            reason: reason.into(),
            message,
        };
        self.set_ready(false, now);
    }

    /// The container exited; applies the restart policy. Returns what happens next; on
    /// `Restart` the caller waits its back-off (showing [`PodRecord::back_off`]) and calls
    /// [`PodRecord::restarting`] as it starts the next run.
    pub fn exited(&mut self, t: Termination, restart_policy: Option<&str>) -> AfterExit {
        let next = after_exit(restart_policy, t.exit_code);
        let now = t.finished_at;
        match next {
            AfterExit::Restart => {
                self.phase = Phase::Running;
                self.last_state = Some(t.clone());
                self.container = Container::Terminated(t);
            }
            AfterExit::Succeeded | AfterExit::Failed => {
                self.phase = if next == AfterExit::Succeeded {
                    Phase::Succeeded
                } else {
                    Phase::Failed
                };
                self.container = Container::Terminated(t);
            }
        }
        self.set_ready(false, now);
        next
    }

    /// Waiting out a restart back-off (the kubelet's `CrashLoopBackOff`).
    pub fn back_off(&mut self, delay: std::time::Duration, pod_name: &str) {
        self.container = Container::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: Some(format!(
                "back-off {}s restarting failed container={} pod={pod_name}",
                delay.as_secs_f64(),
                self.name
            )),
        };
    }

    /// A new run is starting after an exit.
    pub fn restarting(&mut self) {
        self.restart_count += 1;
    }

    /// The status to write.
    pub fn to_status(&self) -> PodStatus {
        let (state, started) = match &self.container {
            Container::Waiting { reason, message } => (
                ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.clone()),
                        message: message.clone(),
                    }),
                    ..Default::default()
                },
                false,
            ),
            Container::Running { started_at } => (
                ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(Time(*started_at)),
                    }),
                    ..Default::default()
                },
                true,
            ),
            Container::Terminated(t) => (
                ContainerState {
                    terminated: Some(t.to_k8s()),
                    ..Default::default()
                },
                false,
            ),
        };
        let cond = |type_: &str, c: &Cond| PodCondition {
            type_: type_.into(),
            status: if c.status { "True" } else { "False" }.into(),
            reason: c.reason.clone(),
            message: c.message.clone(),
            last_transition_time: Some(Time(c.since)),
            ..Default::default()
        };
        let initialized = Cond {
            status: true,
            reason: None,
            message: None,
            since: self.start_time,
        };
        let pod_ip = self.pod_ip.map(|ip| ip.to_string());
        PodStatus {
            phase: Some(self.phase.as_str().into()),
            conditions: Some(vec![
                cond("PodScheduled", &self.scheduled),
                cond("Initialized", &initialized),
                cond("ContainersReady", &self.ready_cond),
                cond("Ready", &self.ready_cond),
            ]),
            host_ip: Some(HOST_IP.to_string()),
            host_ips: Some(vec![k8s_openapi::api::core::v1::HostIP {
                ip: HOST_IP.to_string(),
            }]),
            pod_ip: pod_ip.clone(),
            pod_ips: pod_ip.map(|ip| vec![PodIP { ip }]),
            start_time: Some(Time(self.start_time)),
            container_statuses: Some(vec![ContainerStatus {
                name: self.name.clone(),
                image: self.image.clone(),
                image_id: String::new(),
                ready: self.ready,
                started: Some(started),
                restart_count: self.restart_count,
                state: Some(state),
                last_state: Some(ContainerState {
                    terminated: self.last_state.as_ref().map(Termination::to_k8s),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            qos_class: Some("BestEffort".into()),
            ..Default::default()
        }
    }
}

fn update_cond(cur: &mut Cond, want: Cond) {
    // The transition time moves only when the status flips, as in the kubelet.
    let since = if cur.status == want.status {
        cur.since
    } else {
        want.since
    };
    *cur = Cond { since, ..want };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn restart_policy_table() {
        use AfterExit::*;
        let cases = [
            (Some("Always"), 0, Restart),
            (Some("Always"), 3, Restart),
            (None, 0, Restart),
            (Some("OnFailure"), 0, Succeeded),
            (Some("OnFailure"), 1, Restart),
            (Some("Never"), 0, Succeeded),
            (Some("Never"), 2, Failed),
        ];
        for (policy, code, want) in cases {
            assert_eq!(after_exit(policy, code), want, "{policy:?} {code}");
        }
        assert_eq!(termination_reason(0), "Completed");
        assert_eq!(termination_reason(137), "Error");
    }

    #[test]
    fn termination_message_is_bounded_and_falls_back_to_logs() {
        let long = "é".repeat(3000); // 6000 bytes
        let msg = termination_message(long.as_bytes(), 1, false, Vec::new).unwrap();
        assert!(msg.len() <= MAX_TERMINATION_MESSAGE_BYTES && msg.len() >= 4094);
        assert!(msg.chars().all(|c| c == 'é'), "cut at a character boundary");
        assert_eq!(termination_message(b"", 1, false, || b"x".to_vec()), None);
        assert_eq!(termination_message(b"", 0, true, || b"x".to_vec()), None);
        let log: String = (0..200).map(|i| format!("line {i}\n")).collect();
        let tail = termination_message(b"", 2, true, || log.into_bytes()).unwrap();
        assert_eq!(tail.lines().count(), FALLBACK_LOG_LINES);
        assert!(tail.ends_with("line 199"));
        assert_eq!(
            termination_message(b"boom\n", 2, true, || b"log".to_vec()).as_deref(),
            Some("boom\n")
        );
    }

    #[test]
    fn crash_restart_then_success_status() {
        let mut r = PodRecord::new("importer", "img", ts(100));
        r.pod_ip = Some(Ipv4Addr::new(127, 1, 0, 9));
        let s = r.to_status();
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(
            cs.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("ContainerCreating")
        );
        assert_eq!(s.pod_ip.as_deref(), Some("127.1.0.9"));
        assert_eq!(s.pod_ips.as_ref().unwrap()[0].ip, "127.1.0.9");
        assert_eq!(s.host_ip.as_deref(), Some("127.0.0.1"));

        r.started(ts(101));
        r.set_ready(true, ts(102));
        let s = r.to_status();
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let ready = |s: &PodStatus| {
            s.conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == "Ready")
                .unwrap()
                .clone()
        };
        assert_eq!(ready(&s).status, "True");
        assert_eq!(ready(&s).last_transition_time, Some(Time(ts(102))));
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert!(cs.ready && cs.started == Some(true));

        let t = Termination::exited(3, None, Some("boom".into()), ts(101), ts(110));
        assert_eq!(r.exited(t, Some("OnFailure")), AfterExit::Restart);
        r.back_off(std::time::Duration::from_secs(10), "importer-x");
        let s = r.to_status();
        assert_eq!(
            s.phase.as_deref(),
            Some("Running"),
            "restarting pods stay Running"
        );
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        let w = cs.state.as_ref().unwrap().waiting.as_ref().unwrap();
        assert_eq!(w.reason.as_deref(), Some("CrashLoopBackOff"));
        let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!((last.exit_code, last.reason.as_deref()), (3, Some("Error")));
        assert_eq!(last.message.as_deref(), Some("boom"));
        assert_eq!(ready(&s).status, "False");

        r.restarting();
        r.started(ts(120));
        let t = Termination::exited(0, None, None, ts(120), ts(130));
        assert_eq!(r.exited(t, Some("OnFailure")), AfterExit::Succeeded);
        let s = r.to_status();
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(cs.restart_count, 1);
        let term = cs.state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(
            (term.exit_code, term.reason.as_deref()),
            (0, Some("Completed"))
        );
        assert_eq!(ready(&s).reason.as_deref(), Some("PodCompleted"));
    }

    #[test]
    fn never_fails_and_resume_keeps_counts() {
        let mut r = PodRecord::new("c", "img", ts(1));
        r.started(ts(2));
        let t = Termination::exited(2, None, None, ts(2), ts(3));
        assert_eq!(r.exited(t, Some("Never")), AfterExit::Failed);
        assert_eq!(r.to_status().phase.as_deref(), Some("Failed"));

        let mut r = PodRecord::new("c", "img", ts(1));
        r.started(ts(2));
        r.exited(
            Termination::exited(1, None, None, ts(2), ts(3)),
            Some("Always"),
        );
        r.restarting();
        r.started(ts(4));
        let stored = r.to_status();
        assert_eq!(PodRecord::previous_run(&stored), PreviousRun::Running);
        let resumed = PodRecord::resume(&stored, "c", "img");
        assert_eq!(resumed.restart_count, 1);
        assert_eq!(resumed.start_time, ts(1));
        assert_eq!(resumed.last_state.as_ref().unwrap().exit_code, 1);
        assert_eq!(
            PodRecord::previous_run(&PodRecord::new("c", "i", ts(1)).to_status()),
            PreviousRun::None
        );
        r.exited(
            Termination::exited(1, None, None, ts(4), ts(5)),
            Some("Always"),
        );
        r.back_off(std::time::Duration::from_secs(10), "p");
        assert_eq!(
            PodRecord::previous_run(&r.to_status()),
            PreviousRun::Restarting
        );
    }

    #[test]
    fn unschedulable_while_claims_are_unbound() {
        let mut r = PodRecord::new("c", "img", ts(1));
        r.set_unschedulable(
            Some("pod has unbound immediate PersistentVolumeClaims".into()),
            ts(2),
        );
        let s = r.to_status();
        let c = &s.conditions.as_ref().unwrap()[0];
        assert_eq!(
            (c.type_.as_str(), c.status.as_str()),
            ("PodScheduled", "False")
        );
        assert_eq!(c.reason.as_deref(), Some("Unschedulable"));
        r.set_unschedulable(None, ts(3));
        let s = r.to_status();
        let c = &s.conditions.as_ref().unwrap()[0];
        assert_eq!(c.status, "True");
        assert_eq!(c.last_transition_time, Some(Time(ts(3))));
    }
}
