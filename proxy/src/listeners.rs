//! The proxy's data-plane listeners, reconciled with the configuration in force.
//!
//! Every successful reload of the mesh folder calls [`Listeners::reconcile`]: listeners the
//! workload no longer declares stop accepting (their open connections drain: HTTP connections
//! finish the request in flight and close, TCP streams run to their end), listeners whose
//! address changed are rebound, new ones are bound. Listeners are keyed by what they serve
//! (workload port, the outbound HTTP proxy, an upstream's listen address), never by position,
//! so reordering `workloads.yaml` moves nothing.
//!
//! A listener that cannot be bound after start-up (address in use, ...) does not take the
//! proxy down: the failure is logged with the address and the workload, shown in
//! `/config_dump` (`listeners`) and `/ready` (still 200: the other listeners serve), and the
//! bind is retried on every later reload and on every folder poll (2 s). At start-up a bind
//! failure is still fatal ([`crate::Error::Bind`]): a proxy that cannot open what it was
//! started for says so at once.
//!
//! A listener whose address the process already holds for something else (the app-probe
//! listener of an injected Pod: [`crate::ProxyOptions::reserved`]) is skipped, never bound:
//! a Service whose `targetPort` is 15020 would otherwise make the proxy of every Pod it
//! selects fail at start. Istio's sidecar leaves its own ports to its agent in the same
//! way. The skip is logged once, shown in `/config_dump` (`state: skipped`, with the
//! reason) and re-evaluated on every reload.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::config::Config;
use crate::drain::{CONN_DRAIN, Drain};
use crate::edge::{Budget, Budgets};
use crate::inbound::Inbound;
use crate::outbound::Outbound;
use crate::status::{ListenerStatus, Status};

/// A data-plane listener, named by what it serves (never by position in the registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Listener {
    /// The inbound listener of this workload port.
    Inbound(u16),
    /// The outbound HTTP proxy.
    Outbound,
    /// The upstream whose `listen` address this is.
    Upstream(SocketAddr),
}

/// Where accepted connections go, and what accepting needs.
pub(crate) struct Handlers {
    pub(crate) inbound: Arc<Inbound>,
    pub(crate) outbound: Arc<Outbound>,
    pub(crate) budgets: Arc<Budgets>,
    pub(crate) drain: Drain,
    pub(crate) status: Arc<Status>,
    pub(crate) workload_key: String,
}

/// Accept until the proxy shuts down or `close` fires (listener removed or moved); then the
/// socket closes and this listener's connections are told to drain.
async fn accept_loop(
    h: Arc<Handlers>,
    l: TcpListener,
    kind: Listener,
    mut close: watch::Receiver<bool>,
) {
    let mut stop = h.drain.signal();
    let (drain_tx, drain_rx) = watch::channel(false);
    loop {
        let (tcp, peer) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
            _ = close.changed() => break,
        };
        let budget = match kind {
            Listener::Inbound(_) => Budget::Inbound,
            Listener::Outbound | Listener::Upstream(_) => Budget::Outbound,
        };
        let Some(permit) = h.budgets.acquire(budget) else {
            tracing::warn!(%peer, listener = budget.as_str(), "connection limit reached; closing new connection");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // One span per connection: every line it logs names the workload, the listener,
        // both addresses and (once the handshake proves it) the peer's identity.
        let span = tracing::info_span!(
            "conn",
            workload = %h.workload_key,
            listener = budget.as_str(),
            local = %tcp.local_addr().map_or_else(|_| "-".into(), |a| a.to_string()),
            remote = %peer,
            peer_id = tracing::field::Empty,
        );
        let h = h.clone();
        let conn = async move {
            let _g = h.drain.enter();
            // Each kind's future boxed on its own: the task is then sized for the kind it
            // runs, not for the largest of the three (an upstream-port relay would otherwise
            // carry room for the inbound TLS + HTTP server state, idle or not).
            match kind {
                Listener::Inbound(port) => {
                    Box::pin(crate::inbound::conn(&h.inbound, port, tcp, peer)).await
                }
                Listener::Outbound => {
                    Box::pin(crate::outbound::http_conn(&h.outbound, tcp, peer)).await
                }
                Listener::Upstream(listen) => {
                    Box::pin(crate::outbound::upstream_conn(&h.outbound, listen, tcp)).await
                }
            }
            drop(permit);
        };
        tokio::spawn(CONN_DRAIN.scope(drain_rx.clone(), conn.instrument(span)));
    }
    let _ = drain_tx.send(true);
}

/// What the configuration asks for: each listener, its address, and a description.
fn desired(cfg: &Config) -> BTreeMap<Listener, (SocketAddr, String)> {
    let mut out = BTreeMap::new();
    for p in &cfg.me.ports {
        out.insert(
            Listener::Inbound(p.port),
            (
                p.inbound,
                format!("inbound port {} ({})", p.port, p.protocol.as_str()),
            ),
        );
    }
    if let Some(a) = cfg.me.proxy.outbound {
        out.insert(Listener::Outbound, (a, "outbound HTTP proxy".to_string()));
    }
    for u in &cfg.me.upstreams {
        out.insert(
            Listener::Upstream(u.listen),
            (u.listen, format!("upstream {}:{}", u.service, u.port)),
        );
    }
    out
}

/// One listener accepting connections.
struct Running {
    addr: SocketAddr,
    /// Where it listens (differs from `addr` only for a configured port 0).
    bound: SocketAddr,
    what: String,
    since: SystemTime,
    /// Setting or dropping it stops the accept loop, which closes the socket and tells the
    /// listener's connections to drain.
    close: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A listener the configuration asks for that could not be bound.
#[derive(Clone)]
struct Failed {
    addr: SocketAddr,
    what: String,
    error: String,
    since: SystemTime,
}

/// Whether a listener on `a` and one on `b` cannot both be bound: the same port, and the
/// same IP or either one a wildcard (which takes the port on every address).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// A bind failure at start-up: which listener, where, why.
pub(crate) struct BindFailure {
    pub(crate) addr: SocketAddr,
    pub(crate) what: String,
    pub(crate) source: std::io::Error,
}

/// The data-plane listeners of one proxy (owned by the folder watcher after start-up).
#[derive(Default)]
pub(crate) struct Listeners {
    running: HashMap<Listener, Running>,
    failed: BTreeMap<Listener, Failed>,
    /// Addresses this process listens on for other duties, and what for.
    reserved: Vec<(SocketAddr, String)>,
    /// Listeners not bound because their address overlaps a reserved one (never retried:
    /// re-evaluated at every reload).
    skipped: BTreeMap<Listener, Failed>,
}

/// How long a stopped accept loop may take to release its socket before a rebind.
const STOP_WAIT: Duration = Duration::from_secs(2);

impl Listeners {
    /// Bind everything `cfg` asks for, but what overlaps `reserved`; the first failure is
    /// returned (start-up is strict).
    pub(crate) async fn start(
        h: &Arc<Handlers>,
        cfg: &Config,
        reserved: Vec<(SocketAddr, String)>,
    ) -> Result<Listeners, BindFailure> {
        let mut l = Listeners {
            reserved,
            ..Listeners::default()
        };
        for (key, (addr, what)) in desired(cfg) {
            if l.skip(&h.workload_key, key, addr, &what) {
                continue;
            }
            match TcpListener::bind(addr).await {
                Ok(tcp) => l.spawn(h, key, addr, what, tcp),
                Err(source) => return Err(BindFailure { addr, what, source }),
            }
        }
        l.publish(&h.status);
        Ok(l)
    }

    /// Whether some listener the configuration asks for is not bound (skipped ones aside:
    /// a retry cannot bind them).
    pub(crate) fn has_failed(&self) -> bool {
        !self.failed.is_empty()
    }

    /// Record `key` as skipped when `addr` overlaps a reserved address (logged when it
    /// starts to be, or the reason changes); else forget any earlier skip of it.
    fn skip(&mut self, workload: &str, key: Listener, addr: SocketAddr, what: &str) -> bool {
        let Some((taken, by)) = self.reserved.iter().find(|(r, _)| overlaps(*r, addr)) else {
            self.skipped.remove(&key);
            return false;
        };
        let error = format!(
            "not bound: {taken} is this proxy's {by}; a Service targetPort or workload port \
             {} is not served here (move the app to another port)",
            addr.port()
        );
        if self
            .skipped
            .get(&key)
            .is_none_or(|f| f.addr != addr || f.error != error)
        {
            tracing::warn!(%workload, listener = %what, address = %addr, reason = %error,
                "listener skipped");
            self.skipped.insert(
                key,
                Failed {
                    addr,
                    what: what.to_string(),
                    error,
                    since: SystemTime::now(),
                },
            );
        }
        true
    }

    /// Make the listeners match `cfg`: stop removed ones, rebind moved ones, bind new ones
    /// and retry failed ones. Never fails: a bind failure is logged and recorded.
    pub(crate) async fn reconcile(&mut self, h: &Arc<Handlers>, cfg: &Config) {
        let want = desired(cfg);
        let workload = &h.workload_key;
        // 1. Stop what is gone or moves (first, so a moved address can be reused at once).
        let stale: Vec<Listener> = self
            .running
            .iter()
            .filter(|(k, r)| want.get(k).is_none_or(|(a, _)| *a != r.addr))
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            let Some(r) = self.running.remove(&key) else {
                continue;
            };
            match want.get(&key) {
                Some((to, _)) => tracing::info!(
                    %workload, listener = %r.what, from = %r.addr, to = %to,
                    "listener moves: stopped accepting on the old address; its open connections drain"
                ),
                None => tracing::info!(
                    %workload, listener = %r.what, address = %r.addr,
                    "listener removed from workloads.yaml: stopped accepting; its open connections drain"
                ),
            }
            let _ = r.close.send(true);
            if tokio::time::timeout(STOP_WAIT, r.task).await.is_err() {
                tracing::warn!(%workload, address = %r.addr, "accept loop slow to stop");
            }
        }
        self.failed.retain(|k, _| want.contains_key(k));
        self.skipped.retain(|k, _| want.contains_key(k));
        // 2. Bind what is new, moved, or failed before.
        for (key, (addr, what)) in want {
            if let Some(r) = self.running.get_mut(&key) {
                r.what = what; // the protocol may have changed
                continue;
            }
            if self.skip(workload, key, addr, &what) {
                self.failed.remove(&key);
                continue;
            }
            match TcpListener::bind(addr).await {
                Ok(tcp) => {
                    if let Some(f) = self.failed.remove(&key) {
                        tracing::info!(%workload, listener = %what, address = %addr,
                            previous_error = %f.error, "listening now (an earlier bind had failed)");
                    } else {
                        tracing::info!(%workload, listener = %what, address = %addr, "listening (live registry edit)");
                    }
                    self.spawn(h, key, addr, what, tcp);
                }
                Err(e) => {
                    let error = e.to_string();
                    let same = self
                        .failed
                        .get(&key)
                        .is_some_and(|f| f.addr == addr && f.error == error);
                    if same {
                        tracing::debug!(%workload, listener = %what, address = %addr, %error, "bind retry failed");
                    } else {
                        tracing::error!(
                            %workload, listener = %what, address = %addr, %error,
                            "cannot listen on {addr} for {what} of {workload}: {error}; the other listeners keep serving; retried on every reload and folder poll"
                        );
                        self.failed.insert(
                            key,
                            Failed {
                                addr,
                                what,
                                error,
                                since: SystemTime::now(),
                            },
                        );
                    }
                }
            }
        }
        self.publish(&h.status);
    }

    fn spawn(
        &mut self,
        h: &Arc<Handlers>,
        key: Listener,
        addr: SocketAddr,
        what: String,
        tcp: TcpListener,
    ) {
        let (close, close_rx) = watch::channel(false);
        let bound = tcp.local_addr().unwrap_or(addr);
        let task = tokio::spawn(accept_loop(h.clone(), tcp, key, close_rx));
        self.running.insert(
            key,
            Running {
                addr,
                bound,
                what,
                since: SystemTime::now(),
                close,
                task,
            },
        );
    }

    /// Copy the state for the admin endpoint.
    fn publish(&self, status: &Status) {
        let mut v: Vec<(Listener, ListenerStatus)> = self
            .running
            .iter()
            .map(|(k, r)| {
                (
                    *k,
                    ListenerStatus {
                        what: r.what.clone(),
                        addr: r.bound,
                        error: None,
                        skipped: false,
                        since: r.since,
                    },
                )
            })
            .chain(
                self.failed
                    .iter()
                    .map(|e| (e, false))
                    .chain(self.skipped.iter().map(|e| (e, true)))
                    .map(|((k, f), skipped)| {
                        (
                            *k,
                            ListenerStatus {
                                what: f.what.clone(),
                                addr: f.addr,
                                error: Some(f.error.clone()),
                                skipped,
                                since: f.since,
                            },
                        )
                    }),
            )
            .collect();
        v.sort_by_key(|(k, _)| *k);
        status.set_listeners(v.into_iter().map(|(_, s)| s).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::overlaps;

    #[test]
    fn overlapping_addresses() {
        let a = |s: &str| s.parse().unwrap();
        assert!(overlaps(a("10.0.0.5:15020"), a("10.0.0.5:15020")));
        assert!(overlaps(a("0.0.0.0:15020"), a("10.0.0.5:15020")));
        assert!(overlaps(a("10.0.0.5:15020"), a("[::]:15020")));
        assert!(!overlaps(a("10.0.0.5:15020"), a("10.0.0.5:15021")));
        assert!(!overlaps(a("127.0.0.1:15020"), a("10.0.0.5:15020")));
        // Port 0 takes some free port: never the reserved one.
        assert!(!overlaps(a("10.0.0.5:0"), a("10.0.0.5:0")));
    }
}
