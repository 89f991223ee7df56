//! Verifiers that do **not** check the whole peer certificate in the handshake, leaving it
//! to the caller. As with rustls's own `danger` modules: nothing here is for mesh mTLS, and
//! a connection accepted with one of these carries no verified identity until the caller
//! has checked it.

use rustls::DigitallySignedStruct;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DistinguishedName, SignatureScheme};

use super::{algorithms, tls12_refused};

/// Asks for a client certificate, accepts its absence, and checks in the handshake only that
/// a client that sends one holds its key (the TLS 1.3 `CertificateVerify` signature, with
/// the algorithms of [`SpiffeClientVerifier`](super::SpiffeClientVerifier)). The chain itself is **not** checked: the
/// server must judge it with
/// [`SpiffeClientVerifier::verify_chain`](super::SpiffeClientVerifier::verify_chain) before using anything
/// it says.
///
/// For the CA: bearer-token callers have no certificate, and a caller whose certificate is
/// foreign or expired should get `UNAUTHENTICATED` with the reason rather than a failed
/// handshake (which gRPC clients report only as `UNAVAILABLE`).
#[derive(Debug)]
pub struct DeferredClientVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl DeferredClientVerifier {
    /// With this provider's signature algorithms.
    pub fn new() -> Self {
        DeferredClientVerifier {
            algorithms: algorithms(),
        }
    }
}

impl Default for DeferredClientVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientCertVerifier for DeferredClientVerifier {
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
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Deferred: the server calls `SpiffeClientVerifier::verify_chain` before any use.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
