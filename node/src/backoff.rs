//! The kubelet's container restart back-off ("CrashLoopBackOff").
//!
//! The first restart after a failure is immediate; each further one waits `base`, then twice
//! as long, up to `base × 30` (10 s → 5 min with the kubelet's base). A container that ran
//! for twice the cap before failing starts the schedule over, as the kubelet forgets
//! back-off entries not touched for that long.

use std::time::Duration;

/// The kubelet's initial back-off.
pub const DEFAULT_RESTART_BACKOFF_BASE: Duration = Duration::from_secs(10);
/// Cap of the back-off as a multiple of the base (the kubelet's 10 s → 300 s).
pub const MAX_BACKOFF_FACTOR: u32 = 30;

/// Restart delays of one container.
#[derive(Debug, Clone)]
pub struct RestartBackoff {
    base: Duration,
    current: Option<Duration>,
}

impl RestartBackoff {
    /// A fresh schedule starting at `base`.
    pub fn new(base: Duration) -> Self {
        RestartBackoff {
            base,
            current: None,
        }
    }

    /// The longest delay.
    pub fn cap(&self) -> Duration {
        self.base * MAX_BACKOFF_FACTOR
    }

    /// How long to wait before the next restart of a container that just failed after
    /// running for `ran_for`.
    pub fn next_delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.cap() * 2 {
            self.current = None;
        }
        match self.current {
            None => {
                self.current = Some(self.base);
                Duration::ZERO
            }
            Some(d) => {
                self.current = Some((d * 2).min(self.cap()));
                d
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_schedule_immediate_then_doubling_to_the_cap() {
        let mut b = RestartBackoff::new(DEFAULT_RESTART_BACKOFF_BASE);
        let got: Vec<u64> = (0..9)
            .map(|_| b.next_delay(Duration::from_secs(1)).as_secs())
            .collect();
        assert_eq!(got, [0, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn long_runs_reset_and_the_base_scales() {
        let mut b = RestartBackoff::new(Duration::from_secs(1));
        assert_eq!(b.cap(), Duration::from_secs(30));
        for _ in 0..4 {
            b.next_delay(Duration::ZERO);
        }
        assert_eq!(b.next_delay(Duration::ZERO), Duration::from_secs(8));
        assert_eq!(
            b.next_delay(Duration::from_secs(60)),
            Duration::ZERO,
            "reset"
        );
        assert_eq!(b.next_delay(Duration::ZERO), Duration::from_secs(1));
    }
}
