//! The node agent: SDS and SPIFFE Workload API server, CA client and rotation.
//!
//! Per workload identity the agent makes an ECDSA P-256 key in-process, sends only a CSR to
//! the Istio-compatible CA (TLS verified against the configured root, bearer token read from
//! a file at each request), checks what comes back (chain, SAN, key, validity) before using
//! it, and serves it to Envoy over SDS and to SPIFFE clients over the Workload API, renewing
//! at the grace ratio and pushing every change to every open stream. See
//! `docs/NODE_AGENT.md`.

mod agent;
mod caclient;
mod client;
mod config;
mod conn;
mod crl;
mod error;
mod files;
mod manager;
mod metrics;
mod rotation;
mod sds;
mod state;
mod throttle;
mod uds;
mod uds_authority;
mod verify;
mod workload_api;

pub use self::{
    agent::{Agent, RunningAgent, serve_sds},
    caclient::{BoxFuture, CertificateSigner, CrlPoll, CrlSource, IstioCaClient, SignRequest},
    client::{SecretKind, ServedSecret, connect_unix, decode_secret, fetch_secrets},
    config::{
        AgentConfig, CaConfig, DEFAULT_CA_SERVER_NAME, DEFAULT_GRACE_RATIO, DEFAULT_SDS_SOCKET,
        RotationConfig, WorkloadConfig, identity_from_token, resolve_identity,
    },
    crl::DEFAULT_CRL_POLL_INTERVAL,
    error::Error,
    files::{CA_CRL_FILE, CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE},
    manager::Clock,
    metrics::Metrics,
    rotation::{Backoff, refresh_delay},
    sds::SdsService,
    state::{Bundle, SecretStore, ServedCrls, Snapshot, Svid},
    uds::{MAX_SOCKET_PATH, SocketGuard, bind_path_len, bind_unix},
    workload_api::WorkloadApiService,
};

/// Entry points for the fuzz targets in `node-agent/fuzz` (feature `fuzzing`); not part of
/// the supported API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// The HTTP/2 `:authority` rewrite applied to a Unix-socket client's bytes, fed as the
    /// given socket reads and then end of stream.
    pub fn authority_rewrite(chunks: &[&[u8]]) -> std::io::Result<Vec<u8>> {
        crate::uds_authority::rewrite_chunks(chunks)
    }
}
