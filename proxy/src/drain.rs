//! Draining: in-flight tracking and the signal that tells connections to finish.
//!
//! One [`Drain`] per proxy. Every connection task (and every CONNECT tunnel, which outlives
//! its HTTP exchange) holds a [`Guard`] while it runs; [`Drain::start_and_wait`] flips the
//! signal (listeners stop accepting, HTTP connections finish the request in flight and
//! close) and waits until no guard is left or the deadline passes.
//!
//! A listener that is removed or moved drains only its own connections: its accept loop runs
//! each connection inside [`CONN_DRAIN`], a per-listener signal that also fires on proxy
//! shutdown; [`Drain::conn_signal`] picks the right one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

tokio::task_local! {
    /// Set around each accepted connection's task: becomes `true` (or its sender is dropped)
    /// when the connection should drain, because its listener was removed or moved, or the
    /// proxy is shutting down.
    pub(crate) static CONN_DRAIN: watch::Receiver<bool>;
}

/// The proxy's drain state (cheap to clone; all clones share it).
#[derive(Clone)]
pub(crate) struct Drain {
    inner: Arc<Inner>,
}

struct Inner {
    signal: watch::Sender<bool>,
    inflight: AtomicUsize,
    idle: Notify,
}

/// Counts one task as in flight until dropped.
pub(crate) struct Guard(Arc<Inner>);

impl Default for Drain {
    fn default() -> Self {
        Drain {
            inner: Arc::new(Inner {
                signal: watch::channel(false).0,
                inflight: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }
}

impl Drain {
    /// Count a task as in flight until the guard drops.
    pub(crate) fn enter(&self) -> Guard {
        self.inner.inflight.fetch_add(1, Ordering::SeqCst);
        Guard(self.inner.clone())
    }

    /// Tasks in flight now.
    pub(crate) fn inflight(&self) -> usize {
        self.inner.inflight.load(Ordering::SeqCst)
    }

    /// The proxy-wide signal: `true` once draining started.
    pub(crate) fn signal(&self) -> watch::Receiver<bool> {
        self.inner.signal.subscribe()
    }

    /// The signal the current connection task should obey: its listener's, else the
    /// proxy's.
    pub(crate) fn conn_signal(&self) -> watch::Receiver<bool> {
        CONN_DRAIN
            .try_with(watch::Receiver::clone)
            .unwrap_or_else(|_| self.signal())
    }

    /// Start draining and wait until nothing is in flight or `deadline` passed; `true` when
    /// everything finished.
    pub(crate) async fn start_and_wait(&self, deadline: Duration) -> bool {
        tracing::info!(
            inflight = self.inflight(),
            "draining: no new connections; finishing in-flight work"
        );
        self.inner.signal.send_replace(true);
        let deadline = tokio::time::sleep(deadline);
        tokio::pin!(deadline);
        loop {
            let notified = self.inner.idle.notified();
            if self.inflight() == 0 {
                tracing::info!("drained");
                return true;
            }
            tokio::select! {
                () = notified => {}
                () = &mut deadline => {
                    tracing::warn!(inflight = self.inflight(), "drain deadline reached; closing the rest");
                    return false;
                }
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_guards_then_reports_done() {
        let d = Drain::default();
        let g = d.enter();
        let mut sig = d.signal();
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { d2.start_and_wait(Duration::from_secs(10)).await });
        sig.changed().await.unwrap();
        assert!(*sig.borrow(), "the signal fires before the wait");
        assert!(!waiter.is_finished());
        drop(g);
        assert!(
            waiter.await.unwrap(),
            "finished once the last guard dropped"
        );
    }

    #[tokio::test]
    async fn deadline_ends_the_wait() {
        let d = Drain::default();
        let _g = d.enter();
        assert!(!d.start_and_wait(Duration::from_millis(50)).await);
        assert_eq!(d.inflight(), 1);
    }

    #[tokio::test]
    async fn a_connection_obeys_its_listener_signal() {
        let d = Drain::default();
        let (tx, rx) = watch::channel(false);
        let d2 = d.clone();
        let conn = CONN_DRAIN.scope(rx, async move {
            let mut s = d2.conn_signal();
            s.changed().await.is_ok()
        });
        let t = tokio::spawn(conn);
        tx.send(true).unwrap();
        assert!(t.await.unwrap());
        assert!(!*d.signal().borrow(), "the proxy itself is not draining");
    }
}
