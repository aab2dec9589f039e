//! Filesystem-overhead arithmetic, exactly as upstream computes it.
//!
//! The control plane inflates a requested size so the file system's own metadata fits
//! ([`required_space`]); the worker shrinks the space it finds back to what the disk image may
//! use ([`usable_space`]). Both align to 1 MiB.

/// Upstream's alignment for both directions.
pub const ALIGN: u64 = 1 << 20;

/// Upstream's default global overhead as CDIConfig reports it.
pub const DEFAULT_OVERHEAD: &str = "0.055";

/// `round_down(ceil(avail / (1 + overhead)), 1 MiB)`.
pub fn usable_space(overhead: f64, available: u64) -> u64 {
    let raw = (available as f64 / (1.0 + overhead)).ceil() as u64;
    raw / ALIGN * ALIGN
}

/// `ceil(round_up(size, 1 MiB) * (1 + overhead))`.
pub fn required_space(overhead: f64, size: u64) -> u64 {
    let aligned = size.div_ceil(ALIGN) * ALIGN;
    (aligned as f64 * (1.0 + overhead)).ceil() as u64
}

/// Parse an overhead string ("0.06"); it must lie in `[0, 1)`.
pub fn parse_overhead(s: &str) -> Option<f64> {
    let v: f64 = s.trim().parse().ok()?;
    (0.0..1.0).contains(&v).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_space_rounds_down_to_mebibytes() {
        assert_eq!(usable_space(0.0, (10 << 20) + 5), 10 << 20);
        assert_eq!(usable_space(0.06, 1 << 30), 966 << 20);
    }

    #[test]
    fn required_space_inflates_aligned_size() {
        assert_eq!(required_space(0.0, 1), 1 << 20);
        assert_eq!(required_space(0.06, 1 << 30), 1_138_166_334);
    }

    #[test]
    fn overhead_must_be_a_fraction() {
        assert_eq!(parse_overhead("0.06"), Some(0.06));
        assert_eq!(parse_overhead("1.5"), None);
        assert_eq!(parse_overhead("x"), None);
    }
}
