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
    pub(crate) since: SystemTime,
}

impl ListenerStatus {
    pub(crate) fn json(&self) -> serde_json::Value {
        json!({
            "listener": self.what,
            "address": self.addr.to_string(),
            "state": if self.error.is_some() { "failed" } else { "listening" },
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
