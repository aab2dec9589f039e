//! The condition shape shared by CDI's kinds (upstream's `DataVolumeCondition` and the
//! `ConditionState` inlined into the StorageProfile, DataSource and DataImportCron conditions).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One condition of an object: its type, status, reason and message, and when it last changed
/// and was last confirmed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition<T> {
    /// Which condition this is (for a DataVolume: `Ready`, `Bound` or `Running`).
    #[serde(rename = "type")]
    pub type_: T,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// When `status` last changed. Upstream marshals an unset time as `null`; absent and
    /// `null` both mean unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// When the controller last confirmed this condition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Machine-readable reason for the last transition (e.g. `Bound`, `Completed`, `Error`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail of the last transition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl<T> Condition<T> {
    /// A condition with the given type and status and nothing else set.
    pub fn new(type_: T, status: ConditionStatus) -> Self {
        Self {
            type_,
            status,
            last_transition_time: None,
            last_heartbeat_time: None,
            reason: None,
            message: None,
        }
    }

    /// Whether the condition's status is `True`.
    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Kubernetes' `ConditionStatus`: the three values every condition's `status` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The controller cannot tell.
    Unknown,
}

impl ConditionStatus {
    /// The wire spelling (`"True"`, `"False"`, `"Unknown"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}
