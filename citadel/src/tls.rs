//! TLS for the CA, built on the shared crypto policy (`rampart_certs::tls`: ring, TLS 1.3
//! only, explicit suites and groups, no session resumption) with ALPN `h2`. The serving
//! certificate and the client-certificate trust bundle both follow the active authority
//! (swapped atomically on reload). A client certificate is optional (bearer-token callers
//! have none), but one that is presented must be a SPIFFE workload certificate of our trust
//! domain chaining to the bundle, or the handshake fails.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rampart_certs::tls::{PROTOCOL_VERSIONS, ServerAuth, SpiffeClientVerifier};
use rampart_certs::{PrivateKey, TrustBundle, TrustDomainPolicy};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};

use crate::error::CitadelError;

/// The crypto provider (the shared policy's).
pub fn provider() -> Arc<CryptoProvider> {
    rampart_certs::tls::provider()
}

/// Builds a rustls signing key from our key type.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKey,
) -> Result<CertifiedKey, CitadelError> {
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.secret_pkcs8_der().to_vec()));
    let signing = provider().key_provider.load_private_key(der)?;
    Ok(CertifiedKey::new(chain, signing))
}

/// The serving certificate, swappable.
#[derive(Debug)]
pub struct ServingCert {
    current: ArcSwap<CertifiedKey>,
}

impl ServingCert {
    /// Starts with `key`.
    pub fn new(key: CertifiedKey) -> Self {
        ServingCert {
            current: ArcSwap::from_pointee(key),
        }
    }

    /// Replaces the certificate for new handshakes.
    pub fn set(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }

    /// The current certificate chain.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().cert.clone()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Verifies optional client certificates (SPIFFE, our trust domain) against the current
/// trust bundle.
pub struct DynamicClientVerifier {
    current: ArcSwap<SpiffeClientVerifier>,
    trust_domains: TrustDomainPolicy,
    schemes: Vec<SignatureScheme>,
}

impl std::fmt::Debug for DynamicClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamicClientVerifier")
            .field("current", &self.current.load())
            .finish()
    }
}

impl DynamicClientVerifier {
    /// Verifies against `bundle`, accepting peers of `trust_domains`.
    pub fn new(bundle: &TrustBundle, trust_domains: TrustDomainPolicy) -> Self {
        let v = SpiffeClientVerifier::optional(bundle.clone(), trust_domains.clone());
        let schemes = v.supported_verify_schemes();
        DynamicClientVerifier {
            current: ArcSwap::from_pointee(v),
            trust_domains,
            schemes,
        }
    }

    /// Switches to `bundle` for new handshakes.
    pub fn set_bundle(&self, bundle: &TrustBundle) {
        self.current.store(Arc::new(SpiffeClientVerifier::optional(
            bundle.clone(),
            self.trust_domains.clone(),
        )));
    }
}

impl ClientCertVerifier for DynamicClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current
            .load()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// The server configuration: the shared policy, ALPN h2, dynamic certificate and client
/// verifier, no session resumption (every connection re-verifies its client certificate, so a
/// root removed from the bundle cannot be bypassed by resuming a session).
pub fn server_config(
    serving: Arc<ServingCert>,
    verifier: Arc<DynamicClientVerifier>,
) -> Result<rustls::ServerConfig, CitadelError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
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
