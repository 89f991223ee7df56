//! Rotation arithmetic: when to renew a certificate. Pure functions of their inputs; the
//! caller supplies the clock and the randomness.

use std::time::{Duration, SystemTime};

/// When to start renewing a certificate valid from `not_before` to `not_after`.
///
/// Renewal starts when the remaining lifetime falls to `grace_ratio` of the whole lifetime
/// (Istio's `SECRET_GRACE_PERIOD_RATIO`, default 0.5), i.e. at
/// `not_after - grace_ratio * lifetime`. `jitter` in `[0, 1)` moves that point earlier by
/// that fraction of the grace window, so many workloads issued together do not renew
/// together; the caller draws it at random. The result is clamped to
/// `[not_before, not_after]`. Out-of-range or non-finite inputs are clamped
/// (`grace_ratio` to `[0, 1]`, `jitter` to `[0, 1)`); an empty or inverted validity
/// returns `not_before` (renew now).
pub fn refresh_at(
    not_before: SystemTime,
    not_after: SystemTime,
    grace_ratio: f64,
    jitter: f64,
) -> SystemTime {
    let Ok(lifetime) = not_after.duration_since(not_before) else {
        return not_before;
    };
    if lifetime.is_zero() {
        return not_before;
    }
    let grace = if grace_ratio.is_finite() {
        grace_ratio.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 0.999_999)
    } else {
        0.0
    };
    let window = lifetime.mul_f64(grace);
    let early = window + window.mul_f64(jitter);
    if early >= lifetime {
        return not_before;
    }
    not_after - early
}

/// How long from `now` until [`refresh_at`]; zero if that time has passed.
pub fn refresh_in(
    now: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
    grace_ratio: f64,
    jitter: f64,
) -> Duration {
    refresh_at(not_before, not_after, grace_ratio, jitter)
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn half_life_without_jitter() {
        assert_eq!(refresh_at(t(1000), t(2000), 0.5, 0.0), t(1500));
        assert_eq!(refresh_at(t(0), t(86400), 0.5, 0.0), t(43200));
    }

    #[test]
    fn grace_ratio_moves_the_point() {
        assert_eq!(refresh_at(t(0), t(1000), 0.2, 0.0), t(800));
        assert_eq!(refresh_at(t(0), t(1000), 0.0, 0.0), t(1000));
        assert_eq!(refresh_at(t(0), t(1000), 1.0, 0.0), t(0));
    }

    #[test]
    fn jitter_moves_earlier_within_bounds() {
        // grace 0.2 => window 200s; jitter 0.5 => 100s earlier.
        assert_eq!(refresh_at(t(0), t(1000), 0.2, 0.5), t(700));
        let latest = refresh_at(t(0), t(1000), 0.5, 0.0);
        for j in [0.0, 0.1, 0.5, 0.9, 0.999] {
            let r = refresh_at(t(0), t(1000), 0.5, j);
            assert!(r <= latest && r >= t(0), "{j}");
        }
    }

    #[test]
    fn odd_inputs_are_clamped() {
        assert_eq!(refresh_at(t(2000), t(1000), 0.5, 0.0), t(2000));
        assert_eq!(refresh_at(t(1000), t(1000), 0.5, 0.0), t(1000));
        assert_eq!(refresh_at(t(0), t(1000), f64::NAN, f64::NAN), t(500));
        assert_eq!(refresh_at(t(0), t(1000), -3.0, 7.0), t(1000));
        assert_eq!(refresh_at(t(0), t(1000), 9.0, 0.0), t(0));
    }

    #[test]
    fn refresh_in_counts_from_now() {
        assert_eq!(
            refresh_in(t(1200), t(1000), t(2000), 0.5, 0.0),
            Duration::from_secs(300)
        );
        assert_eq!(
            refresh_in(t(1900), t(1000), t(2000), 0.5, 0.0),
            Duration::ZERO
        );
    }
}
