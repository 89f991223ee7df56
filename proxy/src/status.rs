//! What the proxy reports about itself that no configuration holds: whether its listeners
//! are up (and each one's state), and the last refused update. Written by the listeners and
//! the update loop, read by the admin endpoint.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use serde_json::json;

/// One line of `/config_dump` `listeners`.
#[derive(Clone, Debug)]
pub(crate) struct ListenerStatus {
    pub(crate) what: String,
    /// The address listened on (the bound one: a configured port 0 shows the port taken).
    pub(crate) addr: SocketAddr,
    /// `None` when listening; else why not.
    pub(crate) error: Option<String>,
    /// Not bound on purpose (its address is one the process holds for another duty).
    pub(crate) skipped: bool,
    pub(crate) since: SystemTime,
}

impl ListenerStatus {
    pub(crate) fn json(&self) -> serde_json::Value {
        json!({
            "listener": self.what,
            "address": self.addr.to_string(),
            "state": match (&self.error, self.skipped) {
                (None, _) => "listening",
                (Some(_), true) => "skipped",
                (Some(_), false) => "failed",
            },
            "error": self.error,
            "since": rampart_certs::timestamp::rfc3339(self.since),
        })
    }
}

/// The proxy's self-report.
#[derive(Default)]
pub(crate) struct Status {
    listeners_up: AtomicBool,
    listeners: Mutex<Vec<ListenerStatus>>,
    last_refusal: Mutex<Option<(SystemTime, Vec<String>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Status {
    /// Whether the start-up binds are done.
    pub(crate) fn listeners_up(&self) -> bool {
        self.listeners_up.load(Ordering::SeqCst)
    }

    pub(crate) fn set_listeners(&self, v: Vec<ListenerStatus>) {
        *lock(&self.listeners) = v;
        self.listeners_up.store(true, Ordering::SeqCst);
    }

    pub(crate) fn listeners(&self) -> Vec<ListenerStatus> {
        lock(&self.listeners).clone()
    }

    /// Record a refused update (`None`: the last update was accepted).
    pub(crate) fn set_refusal(&self, r: Option<Vec<String>>) {
        *lock(&self.last_refusal) = r.map(|p| (SystemTime::now(), p));
    }

    pub(crate) fn last_refusal(&self) -> Option<(SystemTime, Vec<String>)> {
        lock(&self.last_refusal).clone()
    }
}

/// The control-plane connection of a proxy fed by `--control-plane` (Kubernetes mode):
/// whether its config stream is up, how many pushes it received and refused. Written by the
/// stream task, rendered in `/stats/prometheus`.
#[derive(Debug, Default)]
pub struct ControlPlaneStatus {
    connected: AtomicBool,
    pushes: std::sync::atomic::AtomicU64,
    nacks: std::sync::atomic::AtomicU64,
    connects: std::sync::atomic::AtomicU64,
}

impl ControlPlaneStatus {
    pub(crate) fn set_connected(&self, up: bool) {
        if up {
            self.connects.fetch_add(1, Ordering::Relaxed);
        }
        self.connected.store(up, Ordering::SeqCst);
    }

    pub(crate) fn pushed(&self, accepted: bool) {
        self.pushes.fetch_add(1, Ordering::Relaxed);
        if !accepted {
            self.nacks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the config stream is up now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Pushes received (accepted or not).
    pub fn pushes(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }

    /// Pushes refused (NACKed).
    pub fn nacks(&self) -> u64 {
        self.nacks.load(Ordering::Relaxed)
    }

    /// The Prometheus lines.
    pub(crate) fn render(&self) -> String {
        format!(
            "# HELP rampart_proxy_control_plane_connected Whether the config stream to the control plane is up.\n\
             # TYPE rampart_proxy_control_plane_connected gauge\n\
             rampart_proxy_control_plane_connected {}\n\
             # HELP rampart_proxy_control_plane_connects_total Config streams opened.\n\
             # TYPE rampart_proxy_control_plane_connects_total counter\n\
             rampart_proxy_control_plane_connects_total {}\n\
             # HELP rampart_proxy_control_plane_pushes_total Config pushes received.\n\
             # TYPE rampart_proxy_control_plane_pushes_total counter\n\
             rampart_proxy_control_plane_pushes_total {}\n\
             # HELP rampart_proxy_control_plane_nacks_total Config pushes refused (NACK); the last good configuration kept serving.\n\
             # TYPE rampart_proxy_control_plane_nacks_total counter\n\
             rampart_proxy_control_plane_nacks_total {}\n",
            u8::from(self.connected()),
            self.connects.load(Ordering::Relaxed),
            self.pushes(),
            self.nacks(),
        )
    }
}
