//! Rotation arithmetic: when to refresh a certificate and how long to back off.
//!
//! Pure functions of the certificate's validity and `now`, so they can be tested without
//! clocks (SPIRE `rotationutil`, ztunnel `refresh_at`).

use std::time::{Duration, SystemTime};

/// When to renew a certificate, as a delay from `now`.
///
/// The lifetime used is the one the agent can actually use: from the later of the
/// certificate's not-before and the moment it was received, to its not-after. A CA backdates
/// not-before for clock skew (minutes, typically); with a TTL of a few seconds, basing the
/// schedule on the backdated start would put the refresh point in the past and cause a
/// refresh storm. The delay is never shorter than `min_interval`.
///
/// `grace_ratio` is Istio's `SECRET_GRACE_PERIOD_RATIO`: renew when that fraction of the
/// lifetime remains. `jitter` in `[0, 1)` moves the refresh earlier by that fraction of the
/// grace window, spreading a fleet's renewals.
pub fn refresh_delay(
    not_before: SystemTime,
    not_after: SystemTime,
    received_at: SystemTime,
    now: SystemTime,
    grace_ratio: f64,
    jitter: f64,
    min_interval: Duration,
) -> Duration {
    let start = not_before.max(received_at).min(not_after);
    let at = rampart_certs::refresh_at(start, not_after, grace_ratio, jitter);
    at.duration_since(now)
        .unwrap_or(Duration::ZERO)
        .max(min_interval)
}

/// Capped exponential backoff for CA errors. Reset after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

// === impl Backoff ===

impl Backoff {
    /// A backoff starting at `initial`, doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The delay before the next attempt, with `jitter` in `[0, 1)` taking up to half of it
    /// off (so many agents failing together do not retry in lockstep).
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let off = base.mul_f64(jitter.clamp(0.0, 0.999) * 0.5);
        base - off
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// A uniformly distributed number in `[0, 1)` from the system CSPRNG (ring).
pub(crate) fn random_unit() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn half_lifetime_without_backdating() {
        // 100 s cert received at its not-before: renew after 50 s.
        let d = refresh_delay(t(0), t(100), t(0), t(0), 0.5, 0.0, Duration::from_secs(1));
        assert_eq!(d, Duration::from_secs(50));
    }

    #[test]
    fn backdated_short_ttl_does_not_storm() {
        // 10 s TTL, not-before backdated by 5 minutes: the naive schedule (half of 310 s after
        // not-before) is 145 s in the past. We must wait half of the 10 s we really have.
        let nb = t(0);
        let received = t(300);
        let na = t(310);
        let d = refresh_delay(
            nb,
            na,
            received,
            received,
            0.5,
            0.0,
            Duration::from_millis(500),
        );
        assert_eq!(d, Duration::from_secs(5));
    }

    #[test]
    fn never_in_the_past_and_floored() {
        // A cert that is about to expire (received late): the delay is floored.
        let d = refresh_delay(t(0), t(10), t(9), t(20), 0.5, 0.0, Duration::from_secs(1));
        assert_eq!(d, Duration::from_secs(1));
    }

    #[test]
    fn jitter_moves_earlier_within_grace_window() {
        let plain = refresh_delay(t(0), t(1000), t(0), t(0), 0.5, 0.0, Duration::ZERO);
        let jittered = refresh_delay(t(0), t(1000), t(0), t(0), 0.5, 0.5, Duration::ZERO);
        assert!(jittered < plain, "{jittered:?} < {plain:?}");
        // never earlier than the start of the lifetime
        assert!(jittered > Duration::ZERO);
    }

    #[test]
    fn backoff_doubles_and_caps_then_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(700));
        let seq: Vec<_> = (0..5).map(|_| b.next_delay(0.0)).collect();
        assert_eq!(
            seq,
            [100, 200, 400, 700, 700]
                .map(Duration::from_millis)
                .to_vec()
        );
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(100));
        // jitter only shortens, by at most half
        let d = b.next_delay(0.99);
        assert!(d >= Duration::from_millis(100) && d < Duration::from_millis(200));
    }

    #[test]
    fn random_unit_in_range() {
        for _ in 0..100 {
            let r = random_unit();
            assert!((0.0..1.0).contains(&r));
        }
    }
}
