//! SPIFFE and X.509 primitives shared by every Rampart component.
//!
//! - [`TrustDomain`] and [`SpiffeId`]: validated exactly as the SPIFFE ID specification says.
//! - [`PrivateKey`]: made locally, never printed, zeroized on drop, written 0600 atomically.
//! - [`build_csr`] / [`VerifiedCsr`]: a CSR carries a public key and a requested SAN;
//!   nothing else from it is ever used.
//! - [`CertificateAuthority`]: roots, intermediates and workload leaves (DESIGN.md §1).
//! - [`verify_workload_chain`]: webpki path building against a [`TrustBundle`], then the
//!   X.509-SVID checks, returning the peer's [`SpiffeId`].
//! - [`CrlSet`]: certificate revocation lists, signed ([`CertificateAuthority::sign_crl`]),
//!   parsed and validated against their issuers; [`verify_workload_chain_with_revocation`]
//!   refuses revoked leaves and intermediates.
//! - [`refresh_at`]: rotation arithmetic on an injected clock.
//! - [`tls`]: the one crypto policy (rustls on ring, TLS 1.3 only) and SPIFFE verifiers.
//! - [`jwt`]: JWK sets, JWT verification for the algorithms Istio accepts, and token minting.
//!
//! One crypto backend: `ring` (through rcgen, rustls-webpki and directly).
//!
//! The whole flow, CA to peer:
//!
//! ```
//! use std::time::SystemTime;
//! use rampart_certs::*;
//!
//! let now = SystemTime::now();
//! // The CA: a self-signed root (or `CertificateAuthority::new` for plug-in material).
//! let ca = CertificateAuthority::self_signed_root(
//!     &RootParams::default(),
//!     PrivateKey::generate(KeyAlgorithm::EcdsaP256)?,
//!     now,
//! )?;
//!
//! // The workload makes its key locally and sends only a CSR.
//! let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/sleep".parse()?;
//! let key = PrivateKey::generate(KeyAlgorithm::default())?;
//! let csr_pem = build_csr(&key, &id)?;
//!
//! // The CA verifies the CSR's signature and uses only its public key; the identity
//! // comes from the authenticated caller (here: the same `id`).
//! let csr = VerifiedCsr::from_pem(&csr_pem)?;
//! assert_eq!(csr.requested_spiffe_id()?, id);
//! let leaf = ca.issue_workload(csr.public_key_spki_der(), &id, DEFAULT_WORKLOAD_CERT_TTL, now)?;
//!
//! // A peer verifies the chain against its bundle and learns the SPIFFE ID.
//! let bundle = TrustBundle::from_pem(&certs_to_pem(&[ca.root().clone()]))?;
//! let policy = TrustDomainPolicy::local("cluster.local".parse()?);
//! let peer = verify_workload_chain(&[leaf.clone()], &bundle, &policy, now, Usage::ClientAuth)?;
//! assert_eq!(peer, id);
//!
//! // The workload renews at half its lifetime (minus jitter the caller draws).
//! let info = CertInfo::parse(&leaf)?;
//! let renew = refresh_at(info.not_before, info.not_after, 0.5, 0.0);
//! assert!(renew > now && renew < info.not_after);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod algs;
mod authority;
mod crl;
mod csr;
mod der;
mod error;
mod info;
pub mod jwt;
mod key;
mod pem;
mod rotation;
mod spiffe;
pub mod timestamp;
pub mod tls;
mod verify;

#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

pub use self::{
    algs::SpkiKind,
    authority::{
        CLOCK_SKEW_BACKDATE, CertificateAuthority, DEFAULT_WORKLOAD_CERT_TTL, IntermediateParams,
        MAX_BACKDATE_FRACTION, MAX_WORKLOAD_CERT_TTL, RootParams, clock_skew_backdate,
    },
    crl::{
        CRL_CLOCK_SKEW, Crl, CrlError, CrlExpiry, CrlParams, CrlSet, MAX_CRL_BYTES,
        RevocationReason, RevokedCert, crls_to_pem, parse_crls, parse_crls_pem, parse_serial_hex,
    },
    csr::{VerifiedCsr, build_csr, build_csr_der},
    error::Error,
    info::{CertInfo, serial_hex},
    key::{KeyAlgorithm, PrivateKey, write_file_atomic},
    pem::{certs_to_pem, parse_certs_pem},
    rotation::{refresh_at, refresh_in},
    spiffe::{MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN, SpiffeId, TrustDomain},
    verify::{
        ChainError, RevocationCheck, TrustBundle, TrustDomainPolicy, UnknownStatus, Usage,
        verify_workload_cert, verify_workload_cert_with_revocation, verify_workload_chain,
        verify_workload_chain_with_revocation,
    },
};

/// DER certificate type used throughout (re-exported from `rustls-pki-types`).
pub use rustls_pki_types::CertificateDer;
