//! The worker → control-plane contract: exit code plus a termination message.
//!
//! Exit 0 with one line of JSON ([`TerminationMessage`]) means the worker finished its job or
//! asks for something (scratch space); a non-zero exit with one line of plain text is a failure
//! the control plane retries. Upstream reads at most 4096 bytes of it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Upstream's bound on what the kubelet keeps of a termination message.
pub const MAX_TERMINATION_MESSAGE_BYTES: usize = 4096;

/// Message of a successful import.
pub const IMPORT_COMPLETE: &str = "Import Complete";
/// Message of a successful upload.
pub const UPLOAD_COMPLETE: &str = "Upload Complete";
/// Message of a successful clone target.
pub const CLONE_COMPLETE: &str = "Clone Complete";
/// Message when the upload server's deadline passed.
pub const DEADLINE_PASSED: &str = "Deadline Passed";

/// The JSON a worker writes on exit code 0. Field names and omission rules are upstream's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TerminationMessage {
    /// The worker needs a scratch volume and must be restarted with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch_space_required: Option<bool>,
    /// Preallocation was applied to the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preallocation_applied: Option<bool>,
    /// The upload server's deadline passed before an upload arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_passed: Option<bool>,
    /// Labels learnt from the source (registry image `*_KUBEVIRT_IO_*` env entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Human-readable outcome ("Import Complete").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl TerminationMessage {
    /// A message with just `message` set.
    pub fn with_message(message: impl Into<String>) -> Self {
        TerminationMessage {
            message: Some(message.into()),
            ..Default::default()
        }
    }

    /// One line of JSON within [`MAX_TERMINATION_MESSAGE_BYTES`]; labels are dropped (largest
    /// first) if they would push it over.
    pub fn to_line(&self) -> String {
        let mut msg = self.clone();
        loop {
            let line = serde_json::to_string(&msg).unwrap_or_else(|_| "{}".to_string());
            if line.len() <= MAX_TERMINATION_MESSAGE_BYTES {
                return line;
            }
            match msg.labels.as_mut() {
                Some(labels) if !labels.is_empty() => {
                    let largest = labels
                        .iter()
                        .max_by_key(|(k, v)| k.len() + v.len())
                        .map(|(k, _)| k.clone());
                    if let Some(k) = largest {
                        labels.remove(&k);
                    }
                }
                _ => {
                    msg.labels = None;
                    msg.message = msg.message.map(|m| truncate(&m, 1024));
                }
            }
        }
    }
}

/// The failure text a worker writes on a non-zero exit: the first line, bounded.
pub fn failure_line(error: &str) -> String {
    let first = error.lines().next().unwrap_or("").trim();
    truncate(first, MAX_TERMINATION_MESSAGE_BYTES)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Upstream's `simplifyKnownMessage`: capacity failures read the same however they surfaced.
pub fn simplify_known_message(message: &str) -> String {
    const CAPACITY_MARKERS: [&str; 4] = [
        "is larger than the reported available",
        "no space left on device",
        "file largest block is bigger than maxblock",
        "disk quota exceeded",
    ];
    let lower = message.to_ascii_lowercase();
    if CAPACITY_MARKERS.iter().any(|m| lower.contains(m)) {
        "DataVolume too small to contain image".to_string()
    } else {
        message.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_message_matches_upstream_shape() {
        let msg = TerminationMessage {
            preallocation_applied: Some(false),
            ..TerminationMessage::with_message(IMPORT_COMPLETE)
        };
        assert_eq!(
            msg.to_line(),
            r#"{"preallocationApplied":false,"message":"Import Complete"}"#
        );
    }

    #[test]
    fn scratch_request_round_trips() {
        let line = r#"{"scratchSpaceRequired":true}"#;
        let msg: TerminationMessage = serde_json::from_str(line).unwrap();
        assert_eq!(msg.scratch_space_required, Some(true));
        assert_eq!(msg.to_line(), line);
    }

    #[test]
    fn oversized_labels_are_dropped_to_fit() {
        let labels = (0..100)
            .map(|i| (format!("label-{i}"), "x".repeat(100)))
            .collect();
        let msg = TerminationMessage {
            labels: Some(labels),
            ..Default::default()
        };
        assert!(msg.to_line().len() <= MAX_TERMINATION_MESSAGE_BYTES);
    }

    #[test]
    fn failure_line_keeps_first_line() {
        assert_eq!(failure_line("boom\nstack"), "boom");
    }

    #[test]
    fn capacity_errors_are_simplified() {
        assert_eq!(
            simplify_known_message("write /data/disk.img: no space left on device"),
            "DataVolume too small to contain image"
        );
        assert_eq!(simplify_known_message("other"), "other");
    }
}
