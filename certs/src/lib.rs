//! SPIFFE and X.509 primitives shared by every Rampart component.
//!
//! - [`TrustDomain`] and [`SpiffeId`]: validated exactly as the SPIFFE ID specification says.
//! - [`PrivateKey`]: made locally, never printed, zeroized on drop, written 0600 atomically.
//! - [`build_csr`] / [`VerifiedCsr`]: a CSR carries a public key and a requested SAN;
//!   nothing else from it is ever used.
//! - [`CertificateAuthority`]: roots, intermediates and workload leaves (DESIGN.md §1).
//! - [`verify_workload_chain`]: webpki path building against a [`TrustBundle`], then the
//!   X.509-SVID checks, returning the peer's [`SpiffeId`].
//! - [`refresh_at`]: rotation arithmetic on an injected clock.
//! - [`tls`]: the one crypto policy (rustls on ring, TLS 1.3 only) and SPIFFE verifiers.
//! - [`jwt`]: JWK sets, JWT verification for the algorithms Istio accepts, and token minting.
//!
//! One crypto backend: `ring` (through rcgen, rustls-webpki and directly).
#![warn(missing_docs)]

mod algs;
mod authority;
mod csr;
mod der;
mod error;
mod info;
pub mod jwt;
mod key;
mod pem;
mod rotation;
mod spiffe;
pub mod tls;
mod verify;

pub use self::{
    authority::{
        CLOCK_SKEW_BACKDATE, CertificateAuthority, DEFAULT_WORKLOAD_CERT_TTL, IntermediateParams,
        MAX_WORKLOAD_CERT_TTL, RootParams,
    },
    csr::{VerifiedCsr, build_csr, build_csr_der},
    error::Error,
    info::CertInfo,
    key::{KeyAlgorithm, PrivateKey, write_file_atomic},
    pem::{certs_to_pem, parse_certs_pem},
    rotation::{refresh_at, refresh_in},
    spiffe::{MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN, SpiffeId, TrustDomain},
    verify::{
        ChainError, TrustBundle, TrustDomainPolicy, Usage, verify_workload_cert,
        verify_workload_chain,
    },
};

/// DER certificate type used throughout (re-exported from `rustls-pki-types`).
pub use rustls_pki_types::CertificateDer;
