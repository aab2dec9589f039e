//! The DataVolume controller's decisions, free of storage and process details.
//!
//! Everything here is a pure function of what was observed (claim state, worker outcome,
//! configuration) so the same rules drive the embedded backend and a future Kubernetes one.
//! Phase names, condition reasons and event texts are upstream's.

use std::time::Duration;

use cdi_api::resources::{Condition, DataVolumeSpec};
use cdi_api::termination::{self, TerminationMessage};

/// Phase names.
pub mod phase {
    /// No claim yet.
    pub const PENDING: &str = "Pending";
    /// Claim bound, no worker yet.
    pub const PVC_BOUND: &str = "PVCBound";
    /// Importer about to start.
    pub const IMPORT_SCHEDULED: &str = "ImportScheduled";
    /// Importer running (or between restarts).
    pub const IMPORT_IN_PROGRESS: &str = "ImportInProgress";
    /// Upload server about to start.
    pub const UPLOAD_SCHEDULED: &str = "UploadScheduled";
    /// Upload server listening.
    pub const UPLOAD_READY: &str = "UploadReady";
    /// Done.
    pub const SUCCEEDED: &str = "Succeeded";
    /// Fatal failure.
    pub const FAILED: &str = "Failed";
}

/// What a DataVolume asks the controller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Run the importer with this `IMPORTER_SOURCE`.
    Import(&'static str),
    /// Run the upload server.
    Upload,
}

impl Operation {
    /// From a validated spec.
    pub fn of(spec: &DataVolumeSpec) -> Option<Operation> {
        let s = spec.source.as_ref()?;
        if s.http.is_some() {
            Some(Operation::Import("http"))
        } else if s.s3.is_some() {
            Some(Operation::Import("s3"))
        } else if s.registry.is_some() {
            Some(Operation::Import("registry"))
        } else if s.blank.is_some() {
            Some(Operation::Import("none"))
        } else if s.upload.is_some() {
            Some(Operation::Upload)
        } else {
            None
        }
    }

    /// Phase while waiting for the worker.
    pub fn scheduled_phase(self) -> &'static str {
        match self {
            Operation::Import(_) => phase::IMPORT_SCHEDULED,
            Operation::Upload => phase::UPLOAD_SCHEDULED,
        }
    }

    /// Phase while the worker runs (and between its restarts).
    pub fn running_phase(self) -> &'static str {
        match self {
            Operation::Import(_) => phase::IMPORT_IN_PROGRESS,
            Operation::Upload => phase::UPLOAD_READY,
        }
    }

    /// Event (reason, message) on entering `phase` for claim `pvc`.
    pub fn phase_event(self, phase: &str, pvc: &str) -> Option<(&'static str, String)> {
        let ev = match (self, phase) {
            (Operation::Import(_), phase::IMPORT_SCHEDULED) => {
                ("ImportScheduled", format!("Import into {pvc} scheduled"))
            }
            (Operation::Import(_), phase::IMPORT_IN_PROGRESS) => {
                ("ImportInProgress", format!("Import into {pvc} in progress"))
            }
            (Operation::Import(_), phase::SUCCEEDED) => (
                "ImportSucceeded",
                format!("Successfully imported into PVC {pvc}"),
            ),
            (Operation::Import(_), phase::FAILED) => {
                ("ImportFailed", format!("Failed to import into PVC {pvc}"))
            }
            (Operation::Upload, phase::UPLOAD_SCHEDULED) => {
                ("UploadScheduled", format!("Upload into {pvc} scheduled"))
            }
            (Operation::Upload, phase::UPLOAD_READY) => {
                ("UploadReady", format!("Upload into {pvc} ready"))
            }
            (Operation::Upload, phase::SUCCEEDED) => (
                "UploadSucceeded",
                format!("Successfully uploaded into {pvc}"),
            ),
            (Operation::Upload, phase::FAILED) => {
                ("UploadFailed", format!("Failed to upload into PVC {pvc}"))
            }
            _ => return None,
        };
        Some(ev)
    }
}

/// How a worker run ended, as the runner observed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    /// Contents of the termination log (possibly empty).
    pub termination: String,
}

/// What the controller does next after a worker run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The volume is complete.
    Completed {
        /// Message for the Running condition ("Import Complete").
        message: String,
        /// The worker preallocated the target.
        preallocation_applied: bool,
    },
    /// Rerun with a scratch directory (does not count as a restart).
    ScratchRequired,
    /// Restart after back-off; the DataVolume stays in progress.
    Retry {
        /// Condition reason.
        reason: &'static str,
        /// Condition / event message.
        message: String,
    },
    /// Give up: the DataVolume goes Failed.
    Fatal {
        /// Condition reason.
        reason: &'static str,
        /// Condition / event message.
        message: String,
    },
}

/// Checksum mismatches are the one failure upstream never retries.
fn is_checksum_failure(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains("checksum mismatch") || lower.contains("checksum does not match")
}

/// Classify a worker exit (upstream `parseTerminationMessage` plus the DV controller rules).
pub fn classify(exit: &ExitStatus) -> Outcome {
    let text = exit.termination.trim();
    match exit.code {
        Some(0) => match serde_json::from_str::<TerminationMessage>(text) {
            Ok(msg) if msg.scratch_space_required == Some(true) => Outcome::ScratchRequired,
            Ok(msg) if msg.deadline_passed == Some(true) => Outcome::Retry {
                reason: "Error",
                message: termination::DEADLINE_PASSED.to_string(),
            },
            Ok(msg) => {
                let message = msg.message.clone().unwrap_or_default();
                if is_checksum_failure(&message) {
                    return Outcome::Fatal {
                        reason: "ChecksumError",
                        message,
                    };
                }
                Outcome::Completed {
                    message: if message.is_empty() {
                        termination::IMPORT_COMPLETE.to_string()
                    } else {
                        message
                    },
                    preallocation_applied: msg.preallocation_applied == Some(true),
                }
            }
            // Exit 0 without a parseable message means we cannot know the volume is whole:
            // never report success for it.
            Err(_) => Outcome::Retry {
                reason: "Error",
                message: format!(
                    "worker exited 0 without a valid termination message: {}",
                    termination::failure_line(text)
                ),
            },
        },
        code => {
            let line = termination::failure_line(text);
            let message = if line.is_empty() {
                match code {
                    Some(c) => format!("worker exited with code {c}"),
                    None => "worker was killed by a signal".to_string(),
                }
            } else {
                termination::simplify_known_message(&line)
            };
            if is_checksum_failure(&message) {
                Outcome::Fatal {
                    reason: "ChecksumError",
                    message,
                }
            } else if message
                .to_ascii_lowercase()
                .starts_with("failed to pull image")
            {
                Outcome::Retry {
                    reason: "ImagePullFailed",
                    message,
                }
            } else {
                Outcome::Retry {
                    reason: "Error",
                    message,
                }
            }
        }
    }
}

/// Kubelet's restart back-off: base, doubling per restart, capped.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Delay before restart number `restarts` (1-based) with back-off base `base`.
pub fn backoff(restarts: u32, base: Duration) -> Duration {
    let shift = restarts.saturating_sub(1).min(16);
    base.saturating_mul(1u32 << shift).min(MAX_BACKOFF)
}

/// Set condition `type_`; returns true when status, reason or message changed (an event and a
/// new transition time are due).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: &str,
) -> bool {
    let opt = |s: &str| {
        if s.is_empty() {
            None
        } else {
            Some(s.to_string())
        }
    };
    let new = Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        last_heartbeat_time: Some(now.to_string()),
        last_transition_time: Some(now.to_string()),
        reason: opt(reason),
        message: opt(message),
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let changed =
                c.status != new.status || c.reason != new.reason || c.message != new.message;
            c.last_heartbeat_time = new.last_heartbeat_time;
            if changed {
                c.status = new.status;
                c.reason = new.reason;
                c.message = new.message;
                c.last_transition_time = new.last_transition_time;
            }
            changed
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// Ready condition for a phase: True iff Succeeded; reason `TransferRunning` while a worker runs.
pub fn ready_condition(phase: &str) -> (&'static str, &'static str) {
    match phase {
        phase::SUCCEEDED => ("True", ""),
        phase::IMPORT_IN_PROGRESS | phase::UPLOAD_READY => ("False", "TransferRunning"),
        _ => ("False", ""),
    }
}

/// Reason of Running=True (upstream's `podRunningReason`).
pub const POD_RUNNING: &str = "Pod is running";

/// Parse the progress metric of `owner_uid` from a Prometheus text body; `None` if absent.
pub fn parse_progress(body: &str, owner_uid: &str) -> Option<f64> {
    let prefixes = [
        format!("kubevirt_cdi_import_progress_total{{ownerUID=\"{owner_uid}\"}} "),
        format!("kubevirt_cdi_clone_progress_total{{ownerUID=\"{owner_uid}\"}} "),
    ];
    body.lines().find_map(|line| {
        prefixes
            .iter()
            .find_map(|p| line.strip_prefix(p.as_str()))
            .and_then(|v| {
                let v: f64 = v.split_whitespace().next()?.parse().ok()?;
                (0.0..=100.0).contains(&v).then_some(v)
            })
    })
}

/// `status.progress` text for a percentage (upstream's `"%.2f%%"`).
pub fn progress_text(pct: f64) -> String {
    format!("{pct:.2}%")
}

/// Progress text of a completed volume.
pub const PROGRESS_DONE: &str = "100.0%";
/// Progress text before anything is known.
pub const PROGRESS_NA: &str = "N/A";

/// Size of the claim to create for a DataVolume: `spec.pvc` verbatim; `spec.storage` inflated by
/// filesystem overhead (Filesystem mode only).
pub fn claim_size(requested: u64, from_storage_api: bool, filesystem: bool, overhead: f64) -> u64 {
    if from_storage_api && filesystem {
        cdi_api::overhead::required_space(overhead, requested)
    } else {
        requested
    }
}

/// A storage class as the class-selection rule sees it.
#[derive(Debug, Clone)]
pub struct ClassInfo {
    /// Class name.
    pub name: String,
    /// Carries the Kubernetes default annotation.
    pub is_default: bool,
    /// Carries the virtualization default annotation.
    pub is_virt_default: bool,
    /// Creation time (seconds), newest default wins.
    pub created: u64,
}

/// Pick the storage class: the requested one, else the virt default (kubevirt content only),
/// else the Kubernetes default; among several defaults the newest, then by name.
pub fn choose_class(
    requested: Option<&str>,
    classes: &[ClassInfo],
    kubevirt_content: bool,
) -> Option<String> {
    if let Some(r) = requested.filter(|r| !r.is_empty()) {
        return Some(r.to_string());
    }
    let newest = |f: &dyn Fn(&ClassInfo) -> bool| {
        classes
            .iter()
            .filter(|c| f(c))
            .max_by(|a, b| a.created.cmp(&b.created).then_with(|| b.name.cmp(&a.name)))
            .map(|c| c.name.clone())
    };
    if kubevirt_content && let Some(c) = newest(&|c| c.is_virt_default) {
        return Some(c);
    }
    newest(&|c| c.is_default)
}

/// Scratch class: CDIConfig's if it exists, else the default class, else the target's class.
pub fn scratch_class(configured: Option<&str>, classes: &[ClassInfo], target: &str) -> String {
    if let Some(c) = configured.filter(|c| classes.iter().any(|k| k.name == *c)) {
        return c.to_string();
    }
    choose_class(None, classes, false).unwrap_or_else(|| target.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32, t: &str) -> ExitStatus {
        ExitStatus {
            code: Some(code),
            termination: t.to_string(),
        }
    }

    #[test]
    fn success_scratch_and_failures_are_classified() {
        assert_eq!(
            classify(&exit(
                0,
                r#"{"preallocationApplied":true,"message":"Import Complete"}"#
            )),
            Outcome::Completed {
                message: "Import Complete".into(),
                preallocation_applied: true
            }
        );
        assert_eq!(
            classify(&exit(0, r#"{"scratchSpaceRequired":true}"#)),
            Outcome::ScratchRequired
        );
        let msg = "Unable to connect to http data source: expected status code 200, got 404. Status: 404 Not Found";
        assert_eq!(
            classify(&exit(1, &format!("{msg}\nmore"))),
            Outcome::Retry {
                reason: "Error",
                message: msg.into()
            }
        );
        assert!(matches!(
            classify(&exit(1, "checksum mismatch: expected sha256:aa")),
            Outcome::Fatal {
                reason: "ChecksumError",
                ..
            }
        ));
        assert!(matches!(
            classify(&exit(1, "failed to pull image: eof")),
            Outcome::Retry {
                reason: "ImagePullFailed",
                ..
            }
        ));
        assert_eq!(
            classify(&exit(1, "write: no space left on device")),
            Outcome::Retry {
                reason: "Error",
                message: "DataVolume too small to contain image".into()
            }
        );
    }

    #[test]
    fn exit_zero_without_message_is_never_success() {
        assert!(matches!(classify(&exit(0, "")), Outcome::Retry { .. }));
        assert!(matches!(
            classify(&ExitStatus {
                code: None,
                termination: String::new()
            }),
            Outcome::Retry { .. }
        ));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_secs(10);
        assert_eq!(backoff(1, b), Duration::from_secs(10));
        assert_eq!(backoff(2, b), Duration::from_secs(20));
        assert_eq!(backoff(4, b), Duration::from_secs(80));
        assert_eq!(backoff(30, b), MAX_BACKOFF);
    }

    #[test]
    fn conditions_change_only_on_content() {
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            "Running",
            "True",
            POD_RUNNING,
            "",
            "t1"
        ));
        assert!(!set_condition(
            &mut c,
            "Running",
            "True",
            POD_RUNNING,
            "",
            "t2"
        ));
        assert_eq!(c[0].last_transition_time.as_deref(), Some("t1"));
        assert_eq!(c[0].last_heartbeat_time.as_deref(), Some("t2"));
        assert!(set_condition(
            &mut c, "Running", "False", "Error", "boom", "t3"
        ));
        assert_eq!(c[0].last_transition_time.as_deref(), Some("t3"));
    }

    #[test]
    fn progress_is_scraped_for_the_owner_only() {
        let body = "# HELP x\nkubevirt_cdi_import_progress_total{ownerUID=\"other\"} 99\n\
                    kubevirt_cdi_import_progress_total{ownerUID=\"u1\"} 45.3412\n";
        assert_eq!(parse_progress(body, "u1"), Some(45.3412));
        assert_eq!(progress_text(45.3412), "45.34%");
        assert_eq!(parse_progress(body, "u2"), None);
    }

    #[test]
    fn storage_api_inflates_by_overhead() {
        assert_eq!(claim_size(1 << 30, true, true, 0.055), 1_132_797_625);
        assert_eq!(claim_size(1 << 30, false, true, 0.055), 1 << 30);
        assert_eq!(claim_size(1 << 30, true, false, 0.055), 1 << 30);
    }

    #[test]
    fn class_choice_prefers_request_then_virt_then_newest_default() {
        let classes = vec![
            ClassInfo {
                name: "local".into(),
                is_default: true,
                is_virt_default: false,
                created: 1,
            },
            ClassInfo {
                name: "fast".into(),
                is_default: true,
                is_virt_default: false,
                created: 5,
            },
            ClassInfo {
                name: "virt".into(),
                is_default: false,
                is_virt_default: true,
                created: 0,
            },
        ];
        assert_eq!(
            choose_class(Some("x"), &classes, true).as_deref(),
            Some("x")
        );
        assert_eq!(choose_class(None, &classes, true).as_deref(), Some("virt"));
        assert_eq!(choose_class(None, &classes, false).as_deref(), Some("fast"));
        assert_eq!(choose_class(None, &[], false), None);
        assert_eq!(scratch_class(Some("nope"), &classes, "t"), "fast");
        assert_eq!(scratch_class(Some("local"), &classes, "t"), "local");
        assert_eq!(scratch_class(None, &[], "t"), "t");
    }

    #[test]
    fn phase_events_use_upstream_texts() {
        let op = Operation::Import("http");
        assert_eq!(
            op.phase_event(phase::IMPORT_SCHEDULED, "p").unwrap().1,
            "Import into p scheduled"
        );
        assert_eq!(Operation::Upload.running_phase(), phase::UPLOAD_READY);
        assert_eq!(ready_condition(phase::SUCCEEDED), ("True", ""));
    }
}
