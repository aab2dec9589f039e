//! Progress of one import: bytes read from the source against its size.
//!
//! Shared between the transfer (which counts), the metrics endpoint (which publishes a
//! percentage that only ever grows, as upstream's counter) and the CLI's progress line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counters of one import.
#[derive(Debug)]
pub struct Progress {
    read: AtomicU64,
    total: AtomicU64,
    /// Highest percentage published so far, as `f64` bits (monotonic).
    published: AtomicU64,
    /// Bytes fetched more than once (resumes overlap nothing, restarts re-fetch everything).
    refetched: AtomicU64,
    started: Instant,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            read: AtomicU64::new(0),
            total: AtomicU64::new(0),
            published: AtomicU64::new(0f64.to_bits()),
            refetched: AtomicU64::new(0),
            started: Instant::now(),
        }
    }
}

impl Progress {
    /// Count `n` bytes received.
    pub fn add(&self, n: u64) {
        self.read.fetch_add(n, Ordering::Relaxed);
    }

    /// The source's size, when known.
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    /// The source restarted from byte 0: what was read counts as re-fetched.
    pub fn restart(&self) {
        let was = self.read.swap(0, Ordering::Relaxed);
        self.refetched.fetch_add(was, Ordering::Relaxed);
    }

    /// Bytes read in the current pass.
    pub fn bytes(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Size of the source (0 = unknown).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Bytes fetched again because a server ignored a resume.
    pub fn refetched(&self) -> u64 {
        self.refetched.load(Ordering::Relaxed)
    }

    /// Seconds since the import started.
    pub fn elapsed_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The percentage to publish: `read/total`, never lower than before, 0 while the size is
    /// unknown, and capped below 100 until [`Progress::complete`].
    pub fn percent(&self) -> f64 {
        let total = self.total();
        let now = if total > 0 {
            (self.bytes() as f64 * 100.0 / total as f64).min(99.99)
        } else {
            0.0
        };
        self.raise(now)
    }

    /// The import completed: 100%.
    pub fn complete(&self) {
        self.raise(100.0);
    }

    fn raise(&self, value: f64) -> f64 {
        let mut current = self.published.load(Ordering::Relaxed);
        loop {
            let old = f64::from_bits(current);
            if value <= old {
                return old;
            }
            match self.published.compare_exchange(
                current,
                value.to_bits(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return value,
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentage_is_monotonic_across_restarts() {
        let p = Progress::default();
        assert_eq!(p.percent(), 0.0);
        p.set_total(1000);
        p.add(500);
        assert_eq!(p.percent(), 50.0);
        p.restart();
        p.add(100);
        assert_eq!(p.percent(), 50.0, "never goes back");
        assert_eq!(p.refetched(), 500);
        p.add(900);
        assert!(p.percent() < 100.0, "100 only on completion");
        p.complete();
        assert_eq!(p.percent(), 100.0);
    }
}
