//! TLS for the CA: TLS 1.3 only with the ring provider, ALPN `h2`; the serving certificate
//! and the client-certificate trust bundle both follow the active authority (swapped
//! atomically on reload). A client certificate is optional (bearer-token callers have none),
//! but when one is presented it must chain to the trust bundle or the handshake fails.
//!
//! Until the shared crypto-policy module (`rampart_certs::tls`) lands, the policy is spelled
//! out here: the three TLS 1.3 suites, X25519 and P-256.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rampart_certs::{PrivateKey, TrustBundle};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, ring as ring_provider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};

use crate::error::CitadelError;

/// The crypto provider: ring, TLS 1.3 suites only, X25519 and P-256 key exchange.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            ring_provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ring_provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ring_provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![
            ring_provider::kx_group::X25519,
            ring_provider::kx_group::SECP256R1,
        ],
        ..ring_provider::default_provider()
    })
}

fn root_store(bundle: &TrustBundle) -> Result<RootCertStore, CitadelError> {
    let mut store = RootCertStore::empty();
    for root in bundle.roots() {
        store.add(root.clone())?;
    }
    Ok(store)
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

struct VerifierHolder(Arc<dyn ClientCertVerifier>);

/// Verifies optional client certificates against the current trust bundle.
pub struct DynamicClientVerifier {
    current: ArcSwap<VerifierHolder>,
    schemes: Vec<SignatureScheme>,
}

impl std::fmt::Debug for DynamicClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DynamicClientVerifier")
    }
}

impl DynamicClientVerifier {
    /// Verifies against `bundle`.
    pub fn new(bundle: &TrustBundle) -> Result<Self, CitadelError> {
        let v = Self::build(bundle)?;
        let schemes = v.supported_verify_schemes();
        Ok(DynamicClientVerifier {
            current: ArcSwap::from_pointee(VerifierHolder(v)),
            schemes,
        })
    }

    /// Switches to `bundle` for new handshakes.
    pub fn set_bundle(&self, bundle: &TrustBundle) -> Result<(), CitadelError> {
        let v = Self::build(bundle)?;
        self.current.store(Arc::new(VerifierHolder(v)));
        Ok(())
    }

    fn build(bundle: &TrustBundle) -> Result<Arc<dyn ClientCertVerifier>, CitadelError> {
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(bundle)?), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| CitadelError::Tls(rustls::Error::General(e.to_string())))
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
            .0
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
            .0
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// The server configuration: TLS 1.3, ALPN h2, dynamic certificate and client verifier.
pub fn server_config(
    serving: Arc<ServingCert>,
    verifier: Arc<DynamicClientVerifier>,
) -> Result<rustls::ServerConfig, CitadelError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A client configuration for talking to the CA (tests, load generator, tools): TLS 1.3,
/// ALPN h2, the CA verified against `bundle`, optionally a client certificate.
pub fn client_config(
    bundle: &TrustBundle,
    client_cert: Option<(Vec<CertificateDer<'static>>, &PrivateKey)>,
) -> Result<rustls::ClientConfig, CitadelError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(bundle)?);
    let mut cfg = match client_cert {
        Some((chain, key)) => {
            let der =
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.secret_pkcs8_der().to_vec()));
            builder.with_client_auth_cert(chain, der)?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}
