//! Rate limits for log lines a peer can cause: one peer must not be able to fill the disk or
//! drown the log with lines it provokes on purpose.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most one line per `every`, process-wide; the lines dropped meanwhile are counted and
/// reported with the next one that passes.
#[derive(Debug)]
pub(crate) struct LogThrottle {
    every: Duration,
    /// One more than the milliseconds since [`base`] from which the next line may pass (0:
    /// any time).
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

fn base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

// === impl LogThrottle ===

impl LogThrottle {
    pub(crate) const fn new(every: Duration) -> Self {
        LogThrottle {
            every,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log now, `n` lines having been dropped since the last one; `None`: drop it.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = u64::try_from(base().elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        let every = u64::try_from(self.every.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_add(1) >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(every).saturating_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// At most one line per `every` for one stream (not shared between tasks).
#[derive(Debug)]
pub(crate) struct StreamThrottle {
    every: Duration,
    next: Option<Instant>,
    suppressed: u64,
}

// === impl StreamThrottle ===

impl StreamThrottle {
    pub(crate) fn new(every: Duration) -> Self {
        StreamThrottle {
            every,
            next: None,
            suppressed: 0,
        }
    }

    /// As [`LogThrottle::allow`], at `now`.
    pub(crate) fn allow_at(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|n| now < n) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// `s` cut to at most `max` characters (on a character boundary), with `...` when cut.
pub(crate) fn truncated(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => std::borrow::Cow::Borrowed(s),
        Some((at, _)) => std::borrow::Cow::Owned(format!("{}...", &s[..at])),
    }
}

/// The delay before the next `accept` after an error (out of descriptors, say): 5 ms doubling
/// to 1 s, reset by a success, so a listener whose accept keeps failing sleeps instead of
/// spinning (and logging) in a loop.
#[derive(Debug)]
pub(crate) struct AcceptBackoff {
    next: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff { next: Self::FIRST }
    }
}

// === impl AcceptBackoff ===

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    /// An accept succeeded.
    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// An accept failed: how long to wait before the next one.
    pub(crate) fn failed(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        now
    }
}

/// Accept errors, logged at WARN at most once per 10 s per kind of listener.
pub(crate) fn log_accept_error(
    throttle: &LogThrottle,
    what: &str,
    e: &std::io::Error,
    retry_in: Duration,
) {
    match throttle.allow() {
        Some(dropped) => tracing::warn!(
            error = %e,
            ?retry_in,
            dropped,
            "{what} accept failed (at most one such line per 10 s; `dropped` counts those left out)"
        ),
        None => tracing::debug!(error = %e, ?retry_in, "{what} accept failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_and_the_dropped_ones_are_counted() {
        let t = LogThrottle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(t.allow(), None);
        }
        // Twin: a zero period lets every line through.
        let t = LogThrottle::new(Duration::ZERO);
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), Some(0));
        let mut s = StreamThrottle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(s.allow_at(t0), Some(0));
        assert_eq!(s.allow_at(t0 + Duration::from_secs(1)), None);
        assert_eq!(s.allow_at(t0 + Duration::from_secs(9)), None);
        assert_eq!(s.allow_at(t0 + Duration::from_secs(10)), Some(2));
    }

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut b = AcceptBackoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| b.failed()).collect();
        assert_eq!(waits[0], Duration::from_millis(5));
        assert_eq!(waits[1], Duration::from_millis(10));
        assert_eq!(waits[9], Duration::from_secs(1));
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        // 1,000 failures in a row wait ~1,000 s in all, not a busy loop.
        let total: Duration = (0..1000).map(|_| b.failed()).sum();
        assert!(total >= Duration::from_secs(990), "{total:?}");
        // Twin: a success starts over at 5 ms.
        b.reset();
        assert_eq!(b.failed(), Duration::from_millis(5));
    }

    #[test]
    fn truncation_keeps_short_text_and_cuts_on_characters() {
        assert_eq!(truncated("abc", 3), "abc");
        assert_eq!(truncated("abcd", 3), "abc...");
        assert_eq!(truncated("ééé", 2), "éé...");
    }
}
