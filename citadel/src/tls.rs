//! TLS for the CA, built on the shared crypto policy (`rampart_certs::tls`: ring, TLS 1.3
//! only, explicit suites and groups, no session resumption) with ALPN `h2`. The serving
//! certificate (a [`CertStore`]) follows the active authority, swapped atomically on reload.
//!
//! A client certificate is optional (bearer-token callers have none). One that is presented
//! must prove possession of its key in the handshake (`rampart_certs::tls::danger::
//! DeferredClientVerifier`); whether it is a SPIFFE workload certificate of our trust domain
//! chaining to the bundle in force is decided per request by `rampart_certs`'
//! `SpiffeClientVerifier::verify_chain` (`CaState::client_identity`), so a caller with a foreign or expired
//! certificate gets `UNAUTHENTICATED` with the reason instead of a failed handshake (which a
//! gRPC client reports only as `UNAVAILABLE`). Istio's CA refuses such callers in the
//! handshake; the outcome (no certificate) is the same.

use std::sync::Arc;

use rampart_certs::tls::danger::DeferredClientVerifier;
use rampart_certs::tls::{CertStore, ServerAuth};
use rampart_certs::{PrivateKey, TrustBundle};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;

use crate::error::CitadelError;

/// The process-wide crypto provider (ring, our suites and groups).
pub fn provider() -> Arc<CryptoProvider> {
    rampart_certs::tls::provider()
}

/// Our chain and key, ready for rustls (which checks that the key matches the leaf).
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKey,
) -> Result<Arc<CertifiedKey>, CitadelError> {
    rampart_certs::tls::certified_key(chain, key)
        .map_err(|e| CitadelError::Config(format!("CA serving certificate: {e}")))
}

/// The server configuration: the shared policy, ALPN h2, the rotating serving certificate,
/// client certificates checked per request (see the module docs), no session resumption.
pub fn server_config(serving: Arc<CertStore>) -> Result<rustls::ServerConfig, CitadelError> {
    let verifier = Arc::new(DeferredClientVerifier::new());
    let mut cfg = rampart_certs::tls::server_config_with(serving, Some(verifier))
        .map_err(|e| CitadelError::Config(format!("TLS server configuration: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A client configuration for talking to the CA (tests, load generator, tools): the shared
/// policy, the CA verified by name or IP against `bundle`, ALPN h2, optionally a client
/// certificate.
pub fn client_config(
    bundle: &TrustBundle,
    client_cert: Option<(Vec<CertificateDer<'static>>, &PrivateKey)>,
) -> Result<rustls::ClientConfig, CitadelError> {
    let mut cfg = rampart_certs::tls::client_config(
        ServerAuth::Dns {
            bundle: bundle.clone(),
        },
        client_cert,
    )
    .map_err(|e| CitadelError::Config(format!("TLS client configuration: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}
