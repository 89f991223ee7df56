//! The crate's error type. Chain verification has its own, [`crate::ChainError`].

use std::path::PathBuf;

/// Everything that can go wrong in `rampart-certs` outside chain verification.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A SPIFFE ID did not follow the SPIFFE ID specification.
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    InvalidSpiffeId {
        /// The rejected input (truncated to 128 bytes).
        input: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// A trust domain name did not follow the SPIFFE ID specification.
    #[error("invalid trust domain {input:?}: {reason}")]
    InvalidTrustDomain {
        /// The rejected input (truncated to 128 bytes).
        input: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// A private key could not be parsed or is of a kind we do not support.
    #[error("invalid private key: {0}")]
    InvalidKey(String),
    /// Generating a private key failed.
    #[error("key generation failed: {0}")]
    KeyGeneration(String),
    /// PEM text could not be decoded, or held a section of the wrong kind.
    #[error("invalid PEM: {0}")]
    InvalidPem(String),
    /// PEM text held no certificate.
    #[error("no certificate found in PEM input")]
    NoCertificate,
    /// A certificate could not be parsed.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// A certificate signing request could not be parsed.
    #[error("invalid CSR: {0}")]
    InvalidCsr(String),
    /// A CSR's self-signature did not verify with the public key it carries.
    #[error("CSR signature does not verify with the CSR's own public key")]
    CsrSignatureInvalid,
    /// A CSR or key uses a signature or key algorithm we do not accept.
    #[error("unsupported algorithm: {0}")]
    UnsupportedAlgorithm(String),
    /// A CSR did not ask for exactly one URI SAN holding a SPIFFE ID.
    #[error("CSR must request exactly one URI SAN, found {found}")]
    CsrUriSanCount {
        /// How many URI SANs the CSR requested.
        found: usize,
    },
    /// The CA's private key does not belong to its certificate.
    #[error("CA private key does not match the CA certificate's public key")]
    KeyMismatch,
    /// A certificate given as a CA is not a CA (no basicConstraints cA=true or no keyCertSign).
    #[error("certificate is not a CA: {0}")]
    NotACa(String),
    /// The CA certificate is outside its validity period at the requested time.
    #[error(
        "CA certificate is not valid at the requested time (valid {not_before} .. {not_after})"
    )]
    CaNotValid {
        /// The CA's not-before, RFC 3339.
        not_before: String,
        /// The CA's not-after, RFC 3339.
        not_after: String,
    },
    /// A requested certificate lifetime is zero or above the allowed maximum.
    #[error("requested lifetime {requested_secs}s is not in 1s..={max_secs}s")]
    InvalidTtl {
        /// Requested lifetime in seconds.
        requested_secs: u64,
        /// The maximum allowed, in seconds.
        max_secs: u64,
    },
    /// A name given for a certificate (DNS SAN, common name) was invalid.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A freshly issued certificate failed our own post-issuance check (a bug or a CA
    /// certificate whose encoding we cannot reproduce).
    #[error("issued certificate failed validation: {0}")]
    IssuedCertificateInvalid(String),
    /// Building or signing a certificate failed inside the certificate library.
    #[error("certificate generation failed: {0}")]
    Generation(String),
    /// A trust bundle held no usable root.
    #[error("trust bundle holds no certificate")]
    EmptyTrustBundle,
    /// A certificate in a trust bundle cannot be used as a trust anchor.
    #[error("trust bundle certificate #{index} is not usable as a trust anchor: {reason}")]
    InvalidTrustAnchor {
        /// Position in the bundle (0-based).
        index: usize,
        /// Why.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

pub(crate) fn truncate(input: &str) -> String {
    const MAX: usize = 128;
    if input.len() <= MAX {
        return input.to_owned();
    }
    let mut end = MAX;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &input[..end])
}
