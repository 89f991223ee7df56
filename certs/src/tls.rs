//! The one crypto-policy module: every rustls configuration in Rampart is built here.
//!
//! - **Provider**: rustls over ring, TLS 1.3 only, cipher suites `TLS13_AES_128_GCM_SHA256`,
//!   `TLS13_AES_256_GCM_SHA384`, `TLS13_CHACHA20_POLY1305_SHA256`, key exchange
//!   [`X25519MLKEM768`] (post-quantum hybrid, preferred) then X25519, secp256r1, secp384r1.
//!   TLS 1.2 is never offered nor accepted.
//! - **Compliance policy** ([`CompliancePolicy`], Istio's `COMPLIANCE_POLICY`): `pqc` offers
//!   and accepts `X25519MLKEM768` only, so a classical-only peer is refused
//!   ([`kx_refusal`] says why). Process-wide, set once at start
//!   ([`set_compliance_policy`]) before any configuration is built.
//! - **SPIFFE verifiers**: [`SpiffeServerVerifier`] and [`SpiffeClientVerifier`] accept a
//!   peer whose chain passes [`verify_workload_chain`](crate::verify_workload_chain) against a [`TrustBundle`] and a
//!   [`TrustDomainPolicy`] (the SAN is the identity; the TLS server name is not used), and
//!   keep rustls's own handshake-signature checks with this provider's algorithms.
//! - **DNS verifier**: [`dns_server_verifier`] for dialing a server by name or IP (node
//!   agents dialing the CA at `istiod.istio-system.svc` or `127.0.0.1`): webpki's verifier
//!   with this provider, rooted in a bundle.
//! - [`peer_spiffe_id`] reads the verified peer's SPIFFE ID from a connection.
//! - [`danger`]: verifiers that leave part of the check to the caller (the CA's deferred
//!   client verifier), kept apart as rustls keeps its own `danger` modules.
//!
//! ALPN is the caller's: set `alpn_protocols` on the returned configuration (`h2` for gRPC).
//! Session resumption and 0-RTT are off, so every connection re-verifies its peer.
//!
//! Rotation without rebuilding configurations: [`CertStore`] holds our current certificate
//! (empty until the first one arrives: handshakes fail, never fall back), and the SPIFFE
//! verifiers' `set_trust` swaps the bundle; build with [`server_config_with`] /
//! [`client_config_with`] and keep the `Arc`s. The plain [`server_config`] /
//! [`client_config`] are for fixed material.
//!
//! Revocation: the SPIFFE verifiers' `set_revocation` installs a
//! [`RevocationCheck`] (a validated [`CrlSet`](crate::CrlSet) and the unknown-status policy);
//! from the next handshake on a revoked leaf or intermediate is refused with
//! [`PeerError::Chain`]`(`[`ChainError::Revoked`]`)` naming serial and issuer. `None` (the
//! default) checks nothing.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, PeerIncompatible, PeerMisbehaved, RootCertStore, ServerConfig, SignatureScheme,
    SupportedProtocolVersion,
};

use crate::timestamp::{from_unix_time as to_system, to_unix_time as to_unix};
use crate::{
    CertInfo, ChainError, PrivateKey, RevocationCheck, SpiffeId, TrustBundle, TrustDomainPolicy,
    Usage, verify_workload_cert_with_revocation,
};

/// The only protocol version: TLS 1.3.
pub static PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

pub mod danger;
mod pq;

pub use pq::{
    CLIENT_SHARE_LEN, MLKEM768_CIPHERTEXT_LEN, MLKEM768_ENCAPS_KEY_LEN, SERVER_SHARE_LEN,
    SHARED_SECRET_LEN, X25519_PUBLIC_LEN, X25519MLKEM768, X25519MlKem768,
};

/// Which key-exchange groups TLS endpoints offer and accept, as Istio's
/// `COMPLIANCE_POLICY` environment variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CompliancePolicy {
    /// `X25519MLKEM768` preferred, then X25519, secp256r1, secp384r1.
    #[default]
    Default,
    /// `pqc`: `X25519MLKEM768` only; a classical-only peer is refused.
    Pqc,
}

impl CompliancePolicy {
    /// Parse a setting: `pqc`, or empty for the default. Anything else (including Istio's
    /// `fips-140-2`, which Rampart does not implement) is refused, naming the values known.
    pub fn parse(s: &str) -> Result<CompliancePolicy, String> {
        match s.trim() {
            "" => Ok(CompliancePolicy::Default),
            "pqc" => Ok(CompliancePolicy::Pqc),
            other => Err(format!(
                "unknown compliance policy {other:?}: expected \"pqc\" or empty"
            )),
        }
    }

    /// The setting's name (`pqc`, or empty for the default).
    pub fn as_str(self) -> &'static str {
        match self {
            CompliancePolicy::Default => "",
            CompliancePolicy::Pqc => "pqc",
        }
    }
}

static POLICY: AtomicU8 = AtomicU8::new(0);

/// Set the process-wide compliance policy for configurations built from now on (set it at
/// start, before any listener or client is built).
pub fn set_compliance_policy(policy: CompliancePolicy) {
    let v = match policy {
        CompliancePolicy::Default => 0,
        CompliancePolicy::Pqc => 1,
    };
    POLICY.store(v, Ordering::SeqCst);
}

/// The process-wide compliance policy ([`set_compliance_policy`]).
pub fn compliance_policy() -> CompliancePolicy {
    match POLICY.load(Ordering::SeqCst) {
        0 => CompliancePolicy::Default,
        _ => CompliancePolicy::Pqc,
    }
}

/// The rustls crypto provider every Rampart configuration uses, under the process-wide
/// [`compliance_policy`]; see [`provider_for`].
pub fn provider() -> Arc<CryptoProvider> {
    provider_for(compliance_policy())
}

/// The rustls crypto provider under `policy`: ring, the three TLS 1.3 cipher suites, and the
/// groups `X25519MLKEM768`, X25519, secp256r1, secp384r1 in that preference order (only
/// `X25519MLKEM768` under [`CompliancePolicy::Pqc`]).
pub fn provider_for(policy: CompliancePolicy) -> Arc<CryptoProvider> {
    let kx_groups = match policy {
        CompliancePolicy::Default => vec![
            X25519MLKEM768,
            ring::kx_group::X25519,
            ring::kx_group::SECP256R1,
            ring::kx_group::SECP384R1,
        ],
        CompliancePolicy::Pqc => vec![X25519MLKEM768],
    };
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups,
        ..ring::default_provider()
    })
}

/// Why a handshake failed, when the reason is the key exchange: a peer with no group in
/// common (under `pqc`, a classical-only peer), or a server picking a group we did not offer.
pub fn kx_refusal(err: &rustls::Error) -> Option<String> {
    let policy = compliance_policy();
    let why = match err {
        rustls::Error::PeerIncompatible(PeerIncompatible::NoKxGroupsInCommon)
        | rustls::Error::PeerMisbehaved(
            PeerMisbehaved::SelectedUnofferedKxGroup
            | PeerMisbehaved::IllegalHelloRetryRequestWithUnofferedNamedGroup,
        ) => "peer has no key exchange group in common with us",
        rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure)
            if policy == CompliancePolicy::Pqc =>
        {
            "peer sent handshake_failure (it may not support X25519MLKEM768)"
        }
        _ => return None,
    };
    Some(match policy {
        CompliancePolicy::Pqc => format!(
            "{why}: compliance policy pqc requires X25519MLKEM768 and refuses classical-only key exchange ({err})"
        ),
        CompliancePolicy::Default => {
            format!("{why}: we offer X25519MLKEM768, X25519, secp256r1, secp384r1 ({err})")
        }
    })
}

/// The key-exchange group a finished handshake used (e.g. `X25519MLKEM768`), for logs.
pub fn negotiated_group(conn: &CommonState) -> Option<String> {
    conn.negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()))
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    ring::default_provider().signature_verification_algorithms
}

// === errors ===

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// No certificate was given for our own identity.
    #[error("no certificate chain given")]
    EmptyChain,
    /// rustls refused the configuration (for example the key does not match the leaf).
    #[error("TLS configuration refused: {0}")]
    Config(#[from] rustls::Error),
    /// The trust bundle cannot be used as a set of roots for name verification.
    #[error("trust bundle unusable for server name verification: {0}")]
    UnusableBundle(String),
}

/// Why a peer's certificate was refused during a handshake, when rustls has no error of
/// its own for the condition. Carried inside `rustls::Error::InvalidCertificate(
/// CertificateError::Other(..))`; read it back with [`peer_error`].
///
/// Expiry, unknown issuer, bad signature, bad encoding and wrong EKU are reported with
/// rustls's own `CertificateError` variants instead, so the peer gets the matching alert.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The chain failed a SPIFFE check (no or several URI SANs, foreign trust domain, a CA
    /// or certificate-signing leaf, ...).
    #[error("peer certificate refused: {0}")]
    Chain(ChainError),
    /// The peer proved an identity, but not one we were told to expect.
    #[error("peer identity {found} is not the expected {}", list(expected))]
    UnexpectedIdentity {
        /// The identities that would have been accepted.
        expected: Vec<SpiffeId>,
        /// The identity the peer proved.
        found: SpiffeId,
    },
}

fn list(ids: &[SpiffeId]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" or ")
}

/// The [`PeerError`] inside a rustls handshake error, if that is what refused the peer.
pub fn peer_error(err: &rustls::Error) -> Option<&PeerError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<PeerError>()
        }
        _ => None,
    }
}

/// Map a chain refusal onto rustls's error, keeping rustls's variants where they exist.
fn refusal(err: ChainError) -> rustls::Error {
    let cert_err = match err {
        ChainError::UnknownIssuer => CertificateError::UnknownIssuer,
        ChainError::BadSignature => CertificateError::BadSignature,
        ChainError::BadEncoding(_) => CertificateError::BadEncoding,
        ChainError::Expired { not_after, now } => CertificateError::ExpiredContext {
            time: to_unix(now),
            not_after: to_unix(not_after),
        },
        ChainError::NotYetValid { not_before, now } => CertificateError::NotValidYetContext {
            time: to_unix(now),
            not_before: to_unix(not_before),
        },
        ChainError::WrongUsage(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(PeerError::Chain(other)))),
    };
    rustls::Error::InvalidCertificate(cert_err)
}

/// Never reached (TLS 1.2 is not enabled); refuses rather than trusts if it ever were.
fn tls12_refused() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not supported".into())
}

/// A bundle and trust-domain policy that can be replaced while configurations using them
/// stay in place (root rotation): the next handshake sees the new value.
struct Trust(
    RwLock<Arc<(TrustBundle, TrustDomainPolicy)>>,
    RwLock<Option<Arc<RevocationCheck>>>,
);

impl Trust {
    fn new(bundle: TrustBundle, trust_domains: TrustDomainPolicy) -> Trust {
        Trust(
            RwLock::new(Arc::new((bundle, trust_domains))),
            RwLock::new(None),
        )
    }

    fn revocation(&self) -> Option<Arc<RevocationCheck>> {
        self.1
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_revocation(&self, check: Option<RevocationCheck>) {
        *self.1.write().unwrap_or_else(PoisonError::into_inner) = check.map(Arc::new);
    }

    fn get(&self) -> Arc<(TrustBundle, TrustDomainPolicy)> {
        // A poisoned lock still holds a whole value (writers only swap an Arc).
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, bundle: TrustBundle, trust_domains: TrustDomainPolicy) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new((bundle, trust_domains));
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<SpiffeId, rustls::Error> {
        self.check(end_entity, intermediates, to_system(now), usage)
            .map_err(refusal)
    }

    /// The chain check itself, for handshakes ([`Trust::verify`]) and deferred checks.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: SystemTime,
        usage: Usage,
    ) -> Result<SpiffeId, ChainError> {
        let trust = self.get();
        let revocation = self.revocation();
        verify_workload_cert_with_revocation(
            end_entity,
            intermediates,
            &trust.0,
            &trust.1,
            now,
            usage,
            revocation.as_deref(),
        )
    }
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let trust = self.get();
        f.debug_struct("Trust")
            .field("bundle", &trust.0)
            .field("trust_domains", &trust.1)
            .field("revocation", &self.revocation())
            .finish()
    }
}

// === impl SpiffeServerVerifier ===

/// Verifies a TLS server as a SPIFFE workload: its chain must pass
/// [`verify_workload_chain`](crate::verify_workload_chain) (EKU serverAuth) and, when `expected` is not empty, its SPIFFE
/// ID must be one of them. The TLS server name (SNI) plays no part: Istio's SNI is a
/// routing key (`outbound_.<port>_._.<host>`), the identity is the URI SAN.
pub struct SpiffeServerVerifier {
    trust: Trust,
    expected: Vec<SpiffeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("trust", &self.trust)
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl SpiffeServerVerifier {
    /// A verifier accepting servers that chain to `bundle`, from a trust domain
    /// `trust_domains` accepts, and (if `expected` is not empty) whose ID is in `expected`.
    pub fn new(
        bundle: TrustBundle,
        trust_domains: TrustDomainPolicy,
        expected: Vec<SpiffeId>,
    ) -> SpiffeServerVerifier {
        SpiffeServerVerifier {
            trust: Trust::new(bundle, trust_domains),
            expected,
            algorithms: algorithms(),
        }
    }

    /// Replace the bundle and trust-domain policy; later handshakes use them.
    pub fn set_trust(&self, bundle: TrustBundle, trust_domains: TrustDomainPolicy) {
        self.trust.set(bundle, trust_domains);
    }

    /// Install (or with `None` remove) revocation checking; later handshakes use it.
    pub fn set_revocation(&self, check: Option<RevocationCheck>) {
        self.trust.set_revocation(check);
    }

    /// The revocation checking in force, if any.
    pub fn revocation(&self) -> Option<Arc<RevocationCheck>> {
        self.trust.revocation()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self
            .trust
            .verify(end_entity, intermediates, now, Usage::ServerAuth)?;
        if !self.expected.is_empty() && !self.expected.contains(&id) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PeerError::UnexpectedIdentity {
                    expected: self.expected.clone(),
                    found: id,
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
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

// === impl SpiffeClientVerifier ===

/// Verifies TLS clients as SPIFFE workloads (EKU clientAuth); a client certificate is
/// required (mesh mTLS). The CA, whose token callers have no certificate, checks client
/// chains after the handshake with [`SpiffeClientVerifier::verify_chain`] (see
/// [`danger::DeferredClientVerifier`]).
pub struct SpiffeClientVerifier {
    trust: Trust,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

impl SpiffeClientVerifier {
    /// A verifier that requires a client certificate.
    pub fn required(bundle: TrustBundle, trust_domains: TrustDomainPolicy) -> Self {
        SpiffeClientVerifier {
            trust: Trust::new(bundle, trust_domains),
            algorithms: algorithms(),
        }
    }

    /// Replace the bundle and trust-domain policy; later handshakes use them.
    pub fn set_trust(&self, bundle: TrustBundle, trust_domains: TrustDomainPolicy) {
        self.trust.set(bundle, trust_domains);
    }

    /// Install (or with `None` remove) revocation checking; later handshakes use it.
    pub fn set_revocation(&self, check: Option<RevocationCheck>) {
        self.trust.set_revocation(check);
    }

    /// The revocation checking in force, if any.
    pub fn revocation(&self) -> Option<Arc<RevocationCheck>> {
        self.trust.revocation()
    }

    /// The chain check a handshake makes (leaf first, EKU clientAuth, the trust in force),
    /// for a server that deferred it ([`danger::DeferredClientVerifier`]): the client's
    /// SPIFFE ID, or why its certificate is refused.
    pub fn verify_chain(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<SpiffeId, ChainError> {
        let (leaf, intermediates) = chain.split_first().ok_or(ChainError::EmptyChain)?;
        self.trust
            .check(leaf, intermediates, now, Usage::ClientAuth)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: workloads hold exactly one identity, and hints would list our roots.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust
            .verify(end_entity, intermediates, now, Usage::ClientAuth)?;
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

// === DNS verification ===

/// A server verifier that checks the server's DNS name or IP address against its
/// certificate's SANs (webpki, this provider), rooted in `bundle`. For clients that dial a
/// server by name, such as a node agent dialing the CA.
pub fn dns_server_verifier(bundle: &TrustBundle) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let roots = RootCertStore {
        roots: bundle.anchors().to_vec(),
    };
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::UnusableBundle(e.to_string()))?;
    Ok(verifier)
}

// === configurations ===

/// Whether and how a server asks for client certificates.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ClientAuth {
    /// No client certificate is asked for.
    None,
    /// A SPIFFE client certificate chaining to the bundle is required (mesh mTLS).
    Required {
        /// Roots client certificates must chain to.
        bundle: TrustBundle,
        /// Trust domains accepted.
        trust_domains: TrustDomainPolicy,
    },
}

/// How a client verifies the server.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ServerAuth {
    /// The server is a SPIFFE workload; see [`SpiffeServerVerifier`].
    Spiffe {
        /// Roots the server must chain to.
        bundle: TrustBundle,
        /// Trust domains accepted.
        trust_domains: TrustDomainPolicy,
        /// Accepted server identities; empty accepts any identity the rest allows.
        expected: Vec<SpiffeId>,
    },
    /// The server is checked by DNS name or IP; see [`dns_server_verifier`].
    Dns {
        /// Roots the server must chain to.
        bundle: TrustBundle,
    },
}

fn key_der(key: &PrivateKey) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.secret_pkcs8_der().to_vec()))
}

/// A server configuration presenting `chain` (leaf first) with `key`, TLS 1.3 only.
/// rustls checks that `key` matches the leaf.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKey,
    client_auth: ClientAuth,
) -> Result<ServerConfig, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::EmptyChain);
    }
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?;
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Required {
            bundle,
            trust_domains,
        } => builder.with_client_cert_verifier(Arc::new(SpiffeClientVerifier::required(
            bundle,
            trust_domains,
        ))),
    };
    let mut config = builder.with_single_cert(chain, key_der(key))?;
    no_server_resumption(&mut config);
    Ok(config)
}

/// [`server_config`] with a client verifier of the caller's (one it keeps, e.g. to install
/// revocation checking with [`SpiffeClientVerifier::set_revocation`]).
pub fn server_config_with_client_verifier(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKey,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<ServerConfig, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::EmptyChain);
    }
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der(key))?;
    no_server_resumption(&mut config);
    Ok(config)
}

/// Session resumption would restore a peer's identity without re-running the verifier, so
/// a session could outlive its certificate or a root removed from the bundle. Off: every
/// connection verifies the peer's chain.
fn no_server_resumption(config: &mut ServerConfig) {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
}

/// A client configuration verifying the server as `server_auth` says and, when `identity`
/// is given, presenting that chain (leaf first) and key. TLS 1.3 only.
pub fn client_config(
    server_auth: ServerAuth,
    identity: Option<(Vec<CertificateDer<'static>>, &PrivateKey)>,
) -> Result<ClientConfig, TlsError> {
    let verifier: Arc<dyn ServerCertVerifier> = match server_auth {
        ServerAuth::Spiffe {
            bundle,
            trust_domains,
            expected,
        } => Arc::new(SpiffeServerVerifier::new(bundle, trust_domains, expected)),
        ServerAuth::Dns { bundle } => dns_server_verifier(&bundle)?,
    };
    client_config_with_verifier(verifier, identity)
}

/// [`client_config`] with any server verifier (one of this module's, normally).
pub fn client_config_with_verifier(
    verifier: Arc<dyn ServerCertVerifier>,
    identity: Option<(Vec<CertificateDer<'static>>, &PrivateKey)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((chain, _)) if chain.is_empty() => return Err(TlsError::EmptyChain),
        Some((chain, key)) => builder.with_client_auth_cert(chain, key_der(key))?,
    };
    // See `no_server_resumption`.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

// === rotating certificates ===

/// Our own certificate and key, loaded for rustls with this module's provider. rustls
/// checks the key matches the leaf.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKey,
) -> Result<Arc<CertifiedKey>, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::EmptyChain);
    }
    Ok(Arc::new(CertifiedKey::from_der(
        chain,
        key_der(key),
        &provider(),
    )?))
}

/// Our current certificate, replaceable while configurations using it stay in place
/// (rotation). Empty until the first [`CertStore::set`]: until then handshakes fail (a
/// server has nothing to present; a client sends no certificate), never fall back.
#[derive(Default)]
pub struct CertStore(RwLock<Option<Arc<CertifiedKey>>>);

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Option<Result<SpiffeId, ChainError>> = self.current().map(|ck| {
            ck.end_entity_cert()
                .map_err(|_| ChainError::EmptyChain)
                .and_then(leaf_spiffe_id)
        });
        f.debug_tuple("CertStore").field(&ids).finish()
    }
}

impl CertStore {
    /// An empty store.
    pub fn new() -> CertStore {
        CertStore::default()
    }

    /// Present `key` from the next handshake on.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some(key);
    }

    /// What is presented now.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.current().is_some()
    }
}

/// A server configuration (this module's policy) whose certificate comes from `certs`
/// (e.g. a [`CertStore`]) and whose client certificates, if asked for, are checked by
/// `client_verifier` (e.g. a shared [`SpiffeClientVerifier`] whose trust is rotated).
pub fn server_config_with(
    certs: Arc<dyn ResolvesServerCert>,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<ServerConfig, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?;
    let mut config = match client_verifier {
        None => builder.with_no_client_auth(),
        Some(verifier) => builder.with_client_cert_verifier(verifier),
    }
    .with_cert_resolver(certs);
    no_server_resumption(&mut config);
    Ok(config)
}

/// A client configuration (this module's policy) verifying servers with `verifier` and
/// presenting the certificate `certs` resolves, if any.
pub fn client_config_with(
    verifier: Arc<dyn ServerCertVerifier>,
    certs: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match certs {
        None => builder.with_no_client_auth(),
        Some(certs) => builder.with_client_cert_resolver(certs),
    };
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

// === peer identity ===

/// The SPIFFE ID in a certificate's single URI SAN. Does **not** verify the certificate:
/// use it on certificates a verifier of this module already accepted.
pub fn leaf_spiffe_id(leaf: &CertificateDer<'_>) -> Result<SpiffeId, ChainError> {
    let info = CertInfo::parse(leaf).map_err(|e| ChainError::BadEncoding(e.to_string()))?;
    match info.uri_sans.as_slice() {
        [] => Err(ChainError::NoSpiffeId),
        [uri] => SpiffeId::parse(uri).map_err(|e| ChainError::InvalidSpiffeId {
            uri: uri.chars().take(256).collect(),
            reason: e.to_string(),
        }),
        more => Err(ChainError::MultipleUriSans { count: more.len() }),
    }
}

/// The verified peer's SPIFFE ID after a handshake on a connection built from this
/// module's configurations; `None` when the peer sent no certificate (plaintext-equivalent
/// identity, e.g. a CA caller authenticating with a token).
///
/// Works on `rustls::ServerConnection`/`ClientConnection` (they deref to `CommonState`),
/// and on tokio-rustls streams through `get_ref().1`.
pub fn peer_spiffe_id(conn: &CommonState) -> Result<Option<SpiffeId>, ChainError> {
    match conn.peer_certificates() {
        None | Some([]) => Ok(None),
        Some([leaf, ..]) => leaf_spiffe_id(leaf).map(Some),
    }
}
