//! The proxy's `GET /mtls` answer: per inbound port, plaintext vs mutual-TLS connections and
//! requests since the proxy started and over a recent window, and who sent plaintext. The
//! proxy serializes it and `rampart mtls-report` reads it, with these types on both sides.
//!
//! ```json
//! {"workload": "api/backend", "ports": [{"port": 8080, "protocol": "http", "mode": "PERMISSIVE",
//!   "since_start": {"mtls_connections": 10, "plaintext_connections": 2, "mtls_requests": 50, "plaintext_requests": 3, "plaintext_refused": 0},
//!   "recent": {"window_seconds": 300, "mtls_connections": 1, "plaintext_connections": 0, "mtls_requests": 4, "plaintext_requests": 0, "plaintext_refused": 0},
//!   "plaintext_sources": [{"ip": "127.0.0.1", "connections": 2, "requests": 3, "refused": 0, "last_seen_unix": 1790000000}]}]}
//! ```

use serde::{Deserialize, Serialize};

/// One proxy's answer.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct MtlsReport {
    /// The workload, `namespace/name`.
    pub workload: String,
    /// Its inbound ports in force.
    pub ports: Vec<PortMtls>,
}

/// One inbound port.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct PortMtls {
    /// The workload port.
    pub port: u16,
    /// Its protocol (`http`, `http2`, `grpc`, `tcp`).
    #[serde(default)]
    pub protocol: String,
    /// The PeerAuthentication mode in force (`STRICT`, `PERMISSIVE`, `DISABLE`).
    pub mode: String,
    /// Counters since the proxy started.
    pub since_start: MtlsCounters,
    /// Counters over the recent window.
    pub recent: RecentMtls,
    /// The plaintext senders remembered (the most recently seen, bounded).
    #[serde(default)]
    pub plaintext_sources: Vec<PlaintextSource>,
}

/// Connections and requests, mutual TLS vs plaintext.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
pub struct MtlsCounters {
    /// Connections that completed a mutual-TLS handshake.
    pub mtls_connections: u64,
    /// Connections that stayed plaintext.
    pub plaintext_connections: u64,
    /// Requests over mutual TLS.
    pub mtls_requests: u64,
    /// Plaintext requests.
    pub plaintext_requests: u64,
    /// Plaintext connections and requests refused because the port is STRICT (not in the
    /// two plaintext counts above; absent from proxies older than 2026-12-07).
    #[serde(default)]
    pub plaintext_refused: u64,
}

impl MtlsCounters {
    /// Whether any plaintext connection or request was counted, refused ones included: on a
    /// port switched back from STRICT, the clients it refused still speak plaintext.
    pub fn plaintext(&self) -> bool {
        self.plaintext_connections > 0 || self.plaintext_requests > 0 || self.plaintext_refused > 0
    }

    /// Whether anything at all was counted.
    pub fn any(&self) -> bool {
        self.plaintext() || self.mtls_connections > 0 || self.mtls_requests > 0
    }
}

/// The counters of the recent window, with its length.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub struct RecentMtls {
    /// How far back the window reaches.
    pub window_seconds: u64,
    /// The counters.
    #[serde(flatten)]
    pub counters: MtlsCounters,
}

/// A peer that sent plaintext.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct PlaintextSource {
    /// Its IP address.
    pub ip: String,
    /// Plaintext connections from it.
    pub connections: u64,
    /// Plaintext requests from it.
    pub requests: u64,
    /// Its plaintext connections and requests refused by STRICT (not in the two above;
    /// absent from proxies older than 2026-12-07).
    #[serde(default)]
    pub refused: u64,
    /// When it was last seen (Unix seconds).
    pub last_seen_unix: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The module docs' example is the wire form, both ways.
    #[test]
    fn the_documented_answer_round_trips() {
        let text = r#"{"workload": "api/backend", "ports": [{"port": 8080, "protocol": "http", "mode": "PERMISSIVE",
          "since_start": {"mtls_connections": 10, "plaintext_connections": 2, "mtls_requests": 50, "plaintext_requests": 3, "plaintext_refused": 0},
          "recent": {"window_seconds": 300, "mtls_connections": 1, "plaintext_connections": 0, "mtls_requests": 4, "plaintext_requests": 0, "plaintext_refused": 0},
          "plaintext_sources": [{"ip": "127.0.0.1", "connections": 2, "requests": 3, "refused": 0, "last_seen_unix": 1790000000}]}]}"#;
        let r: MtlsReport = serde_json::from_str(text).unwrap();
        assert_eq!(r.ports[0].since_start.plaintext_requests, 3);
        assert_eq!(r.ports[0].recent.counters.mtls_requests, 4);
        assert!(r.ports[0].since_start.plaintext() && !r.ports[0].recent.counters.plaintext());
        let again: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(
            again,
            serde_json::from_str::<serde_json::Value>(text).unwrap()
        );
        // An older proxy's answer, without `plaintext_refused`, reads as none refused.
        let old = text
            .replace(", \"plaintext_refused\": 0", "")
            .replace(", \"refused\": 0", "");
        assert!(!old.contains("refused"));
        let r: MtlsReport = serde_json::from_str(&old).unwrap();
        assert_eq!(r.ports[0].since_start.plaintext_refused, 0);
        // A port without its counters is not an answer.
        assert!(
            serde_json::from_str::<MtlsReport>(
                r#"{"workload": "a/b", "ports": [{"port": 1, "mode": "PERMISSIVE"}]}"#
            )
            .is_err()
        );
    }
}
