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
    }
}
