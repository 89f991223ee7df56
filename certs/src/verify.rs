//! Trust bundles and SPIFFE chain verification.
//!
//! [`verify_workload_chain`] runs webpki path building (the bundle's roots are the trust
//! anchors, the rest of the presented chain are intermediates, the EKU must match the
//! peer's role), then the X.509-SVID checks webpki does not know about: the leaf carries
//! exactly one URI SAN, it is a valid SPIFFE ID, its key usage has digitalSignature and
//! not keyCertSign/cRLSign, and its trust domain is accepted by the [`TrustDomainPolicy`].
//!
//! [`verify_workload_chain_with_revocation`] adds revocation: every certificate of the path
//! webpki built (the leaf and each intermediate; not the trust anchor) is looked up in a
//! validated [`CrlSet`] under its issuer (subject name and public key). A listed serial is
//! refused as [`ChainError::Revoked`] naming serial and issuer. A certificate whose issuer
//! has no CRL in the set, or whose CRL is past its nextUpdate, has *unknown* status:
//! [`UnknownStatus::Allow`] (the default, as Istio and ztunnel) accepts it,
//! [`UnknownStatus::Deny`] refuses it as [`ChainError::RevocationStatusUnknown`]. An expired
//! CRL's entries stay revoked under both policies.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use x509_parser::extensions::GeneralName;

use crate::crl::{CrlSet, RevocationReason, der_content};
use crate::error::Error;
use crate::info::{parse_x509, rfc3339_of, serial_hex, sha256_hex};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::timestamp::from_unix_time as unix_to_system;

/// A set of trusted root certificates (several during root rotation).
#[derive(Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for root in &self.roots {
            let subject = parse_x509(root)
                .map(|x| x.subject().to_string())
                .unwrap_or_default();
            list.entry(&format_args!(
                "{subject} sha256:{}",
                &sha256_hex(root.as_ref())[..16]
            ));
        }
        list.finish()
    }
}

impl PartialEq for TrustBundle {
    fn eq(&self, other: &Self) -> bool {
        self.roots == other.roots
    }
}

impl Eq for TrustBundle {}

// === impl TrustBundle ===

impl TrustBundle {
    /// Parses a PEM bundle of one or more root certificates.
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        Self::from_der(crate::pem::parse_certs_pem(pem)?)
    }

    /// Builds a bundle from DER certificates. Duplicates are dropped; every certificate
    /// must be usable as a trust anchor.
    pub fn from_der(certs: Vec<CertificateDer<'static>>) -> Result<Self, Error> {
        let mut roots: Vec<CertificateDer<'static>> = Vec::with_capacity(certs.len());
        let mut anchors = Vec::with_capacity(certs.len());
        for (index, cert) in certs.into_iter().enumerate() {
            if roots.contains(&cert) {
                continue;
            }
            parse_x509(&cert).map_err(|e| Error::InvalidTrustAnchor {
                index,
                reason: e.to_string(),
            })?;
            let anchor = webpki::anchor_from_trusted_cert(&cert)
                .map_err(|e| Error::InvalidTrustAnchor {
                    index,
                    reason: e.to_string(),
                })?
                .to_owned();
            anchors.push(anchor);
            roots.push(cert);
        }
        if roots.is_empty() {
            return Err(Error::EmptyTrustBundle);
        }
        Ok(Self { roots, anchors })
    }

    /// The root certificates, in the order given.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as webpki trust anchors.
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The bundle as PEM, roots in order.
    pub fn to_pem(&self) -> String {
        crate::pem::certs_to_pem(&self.roots)
    }

    /// The union of two bundles (ours first), for overlap during root rotation.
    pub fn merge(&self, other: &TrustBundle) -> TrustBundle {
        let mut out = self.clone();
        for (root, anchor) in other.roots.iter().zip(&other.anchors) {
            if !out.roots.contains(root) {
                out.roots.push(root.clone());
                out.anchors.push(anchor.clone());
            }
        }
        out
    }
}

/// Which trust domains a peer may come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustDomainPolicy {
    /// Our own trust domain.
    pub local: TrustDomain,
    /// Other trust domains treated as local (Istio's `trustDomainAliases`).
    pub aliases: Vec<TrustDomain>,
    /// Accept any trust domain the bundle vouches for.
    pub allow_any: bool,
}

impl TrustDomainPolicy {
    /// Accept only `local`.
    pub fn local(local: TrustDomain) -> Self {
        Self {
            local,
            aliases: Vec::new(),
            allow_any: false,
        }
    }

    /// Accept `local` and the given aliases.
    pub fn with_aliases(local: TrustDomain, aliases: Vec<TrustDomain>) -> Self {
        Self {
            local,
            aliases,
            allow_any: false,
        }
    }

    /// Whether a peer from `td` is accepted.
    pub fn accepts(&self, td: &TrustDomain) -> bool {
        self.allow_any || *td == self.local || self.aliases.contains(td)
    }

    /// Whether `td` is the local domain or one of its aliases (treated as local for policy).
    pub fn is_local(&self, td: &TrustDomain) -> bool {
        *td == self.local || self.aliases.contains(td)
    }
}

/// The role the peer's certificate is checked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// The peer is a TLS client (we are the server): EKU clientAuth.
    ClientAuth,
    /// The peer is a TLS server (we are the client): EKU serverAuth.
    ServerAuth,
}

/// Why a presented chain was refused. Each variant names one condition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// No certificate was presented.
    #[error("no certificate presented")]
    EmptyChain,
    /// A certificate could not be decoded.
    #[error("bad certificate encoding: {0}")]
    BadEncoding(String),
    /// The chain does not lead to any root in the trust bundle.
    #[error("certificate is not issued by a trusted root (unknown issuer)")]
    UnknownIssuer,
    /// A signature in the chain does not verify.
    #[error("a signature in the chain does not verify")]
    BadSignature,
    /// A signature algorithm in the chain is not supported.
    #[error("unsupported signature algorithm in the chain")]
    UnsupportedSignatureAlgorithm,
    /// A certificate in the chain has expired.
    #[error("certificate expired (not after {not_after:?}, now {now:?})")]
    Expired {
        /// The certificate's not-after.
        not_after: SystemTime,
        /// The verification time.
        now: SystemTime,
    },
    /// A certificate in the chain is not valid yet.
    #[error("certificate not valid yet (not before {not_before:?}, now {now:?})")]
    NotYetValid {
        /// The certificate's not-before.
        not_before: SystemTime,
        /// The verification time.
        now: SystemTime,
    },
    /// The leaf is a CA certificate (basicConstraints cA=true).
    #[error("a CA certificate was presented as the leaf")]
    CaUsedAsLeaf,
    /// The leaf's key usage allows signing certificates or CRLs (X.509-SVID forbids it).
    #[error("leaf key usage allows keyCertSign or cRLSign")]
    LeafCanSignCertificates,
    /// The leaf's key usage is missing or lacks digitalSignature (X.509-SVID requires it).
    #[error("leaf key usage is missing or lacks digitalSignature")]
    LeafLacksDigitalSignature,
    /// A certificate used as an issuer is not a CA.
    #[error("an end-entity certificate was used as an issuer")]
    LeafUsedAsCa,
    /// The leaf's extended key usage does not allow the required role.
    #[error("extended key usage does not allow {0:?}")]
    WrongUsage(Usage),
    /// The leaf has no URI SAN, so no SPIFFE ID.
    #[error("leaf has no URI SAN (no SPIFFE ID)")]
    NoSpiffeId,
    /// The leaf has more than one URI SAN (X.509-SVID allows exactly one).
    #[error("leaf has {count} URI SANs; exactly one is allowed")]
    MultipleUriSans {
        /// How many URI SANs the leaf has.
        count: usize,
    },
    /// The leaf's URI SAN is not a valid SPIFFE ID.
    #[error("leaf URI SAN {uri:?} is not a valid SPIFFE ID: {reason}")]
    InvalidSpiffeId {
        /// The URI SAN (truncated).
        uri: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The peer's trust domain is neither ours, an alias, nor allowed.
    #[error("peer trust domain {trust_domain} is not accepted (local {local})")]
    ForeignTrustDomain {
        /// The peer's trust domain.
        trust_domain: TrustDomain,
        /// Our trust domain.
        local: TrustDomain,
    },
    /// The chain was refused for another reason webpki reported.
    #[error("chain rejected: {0}")]
    Rejected(String),
    /// A certificate of the chain (the leaf or an intermediate) is on its issuer's CRL.
    #[error("certificate serial {serial} issued by {issuer:?} is revoked ({}, since {})", reason.map_or("no reason given", RevocationReason::name), rfc3339_of(*revoked_at))]
    Revoked {
        /// The revoked certificate's serial, lowercase hex.
        serial: String,
        /// Its issuer's name.
        issuer: String,
        /// Its subject (the SPIFFE ID for a leaf, the name for an intermediate).
        subject: String,
        /// The CRL's reason code, if any.
        reason: Option<RevocationReason>,
        /// The revocation time the CRL gives.
        revoked_at: SystemTime,
    },
    /// Revocation status unknown under [`UnknownStatus::Deny`].
    #[error("revocation status of serial {serial} issued by {issuer:?} is unknown: {why}")]
    RevocationStatusUnknown {
        /// The certificate's serial, lowercase hex.
        serial: String,
        /// Its issuer's name.
        issuer: String,
        /// No CRL for the issuer, or its CRL expired.
        why: String,
    },
}

/// What to do with a certificate whose issuer has no current CRL in the set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownStatus {
    /// Accept it (Istio's and ztunnel's behaviour; the default).
    #[default]
    Allow,
    /// Refuse it: every issuer in a chain must be covered by a current CRL.
    Deny,
}

impl std::str::FromStr for UnknownStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "allow" | "" => Ok(UnknownStatus::Allow),
            "deny" => Ok(UnknownStatus::Deny),
            other => Err(format!(
                "unknown revocation status policy {other:?}: expected \"allow\" or \"deny\""
            )),
        }
    }
}

/// Revocation checking for chain verification: a validated [`CrlSet`] and the policy for
/// issuers it does not cover.
#[derive(Clone, Debug, Default)]
pub struct RevocationCheck {
    /// The CRLs.
    pub crls: std::sync::Arc<CrlSet>,
    /// Unknown status: allow (default) or deny.
    pub unknown: UnknownStatus,
}

impl RevocationCheck {
    /// Checking against `crls` with `unknown` for issuers it does not cover.
    pub fn new(crls: CrlSet, unknown: UnknownStatus) -> Self {
        RevocationCheck {
            crls: std::sync::Arc::new(crls),
            unknown,
        }
    }
}

#[allow(deprecated)] // webpki may still return the unit variants.
fn map_webpki(e: webpki::Error, usage: Usage) -> ChainError {
    use webpki::Error as W;
    match e {
        W::UnknownIssuer => ChainError::UnknownIssuer,
        W::CertExpired { time, not_after } => ChainError::Expired {
            not_after: unix_to_system(not_after),
            now: unix_to_system(time),
        },
        W::CertNotValidYet { time, not_before } => ChainError::NotYetValid {
            not_before: unix_to_system(not_before),
            now: unix_to_system(time),
        },
        W::CaUsedAsEndEntity => ChainError::CaUsedAsLeaf,
        W::EndEntityUsedAsCa => ChainError::LeafUsedAsCa,
        W::InvalidSignatureForPublicKey => ChainError::BadSignature,
        W::UnsupportedSignatureAlgorithm
        | W::UnsupportedSignatureAlgorithmContext(_)
        | W::UnsupportedSignatureAlgorithmForPublicKey
        | W::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            ChainError::UnsupportedSignatureAlgorithm
        }
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) => ChainError::WrongUsage(usage),
        W::BadDer | W::BadDerTime | W::TrailingData(_) => ChainError::BadEncoding(e.to_string()),
        other => ChainError::Rejected(other.to_string()),
    }
}

/// Checks every certificate of a verified path but the anchor against the CRLs.
fn check_path(
    path: &webpki::VerifiedPath<'_>,
    check: &RevocationCheck,
    now: SystemTime,
) -> Result<(), ChainError> {
    let mut certs: Vec<&webpki::Cert<'_>> = vec![path.end_entity()];
    certs.extend(path.intermediate_certificates());
    for (i, cert) in certs.iter().enumerate() {
        // The issuer: the next certificate of the path, or the trust anchor.
        let spki_owned;
        let (issuer_name, issuer_spki): (&[u8], &[u8]) = match certs.get(i + 1) {
            Some(next) => {
                spki_owned = next.subject_public_key_info();
                (next.subject(), der_content(spki_owned.as_ref()))
            }
            None => (
                path.anchor().subject.as_ref(),
                path.anchor().subject_public_key_info.as_ref(),
            ),
        };
        let crl = check.crls.lookup(issuer_name, issuer_spki);
        if let Some(entry) = crl.and_then(|c| c.find_serial(cert.serial())) {
            let (issuer, subject) = names_of(cert);
            return Err(ChainError::Revoked {
                serial: entry.serial_hex.clone(),
                issuer,
                subject,
                reason: entry.reason,
                revoked_at: entry.revoked_at,
            });
        }
        if check.unknown == UnknownStatus::Deny {
            let why = match crl {
                None => "no CRL for its issuer".to_owned(),
                Some(c) if c.is_expired(now) => {
                    format!(
                        "its issuer's CRL expired at {}",
                        rfc3339_of(c.next_update())
                    )
                }
                Some(_) => continue,
            };
            return Err(ChainError::RevocationStatusUnknown {
                serial: serial_hex(cert.serial()),
                issuer: names_of(cert).0,
                why,
            });
        }
    }
    Ok(())
}

/// (issuer, subject) of a certificate for messages: the subject is its URI SAN if it has
/// one (a workload), its subject name otherwise.
fn names_of(cert: &webpki::Cert<'_>) -> (String, String) {
    let der = cert.der();
    match parse_x509(&der) {
        Ok(x) => {
            let uri = x.subject_alternative_name().ok().flatten().and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
            });
            (
                x.issuer().to_string(),
                uri.unwrap_or_else(|| x.subject().to_string()),
            )
        }
        Err(_) => (String::new(), String::new()),
    }
}

/// Verifies a presented chain (leaf first) against `bundle` at `now` for `usage`, and
/// returns the peer's SPIFFE ID. See the module docs for every check.
pub fn verify_workload_chain(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    policy: &TrustDomainPolicy,
    now: SystemTime,
    usage: Usage,
) -> Result<SpiffeId, ChainError> {
    verify_workload_chain_with_revocation(chain, bundle, policy, now, usage, None)
}

/// [`verify_workload_chain`], then the revocation check of the module docs when
/// `revocation` is given.
pub fn verify_workload_chain_with_revocation(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    policy: &TrustDomainPolicy,
    now: SystemTime,
    usage: Usage,
    revocation: Option<&RevocationCheck>,
) -> Result<SpiffeId, ChainError> {
    let (leaf, intermediates) = chain.split_first().ok_or(ChainError::EmptyChain)?;
    verify_workload_cert_with_revocation(
        leaf,
        intermediates,
        bundle,
        policy,
        now,
        usage,
        revocation,
    )
}

/// [`verify_workload_chain`] with the leaf and the intermediates given separately, as
/// rustls hands them to a certificate verifier.
pub fn verify_workload_cert(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    policy: &TrustDomainPolicy,
    now: SystemTime,
    usage: Usage,
) -> Result<SpiffeId, ChainError> {
    verify_workload_cert_with_revocation(leaf, intermediates, bundle, policy, now, usage, None)
}

/// [`verify_workload_cert`] with the revocation check of the module docs when `revocation`
/// is given.
pub fn verify_workload_cert_with_revocation(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    policy: &TrustDomainPolicy,
    now: SystemTime,
    usage: Usage,
    revocation: Option<&RevocationCheck>,
) -> Result<SpiffeId, ChainError> {
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| map_webpki(e, usage))?;
    let since_epoch = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| ChainError::Rejected("verification time before 1970".into()))?;
    let eku = match usage {
        Usage::ClientAuth => webpki::KeyUsage::client_auth(),
        Usage::ServerAuth => webpki::KeyUsage::server_auth(),
    };
    let path = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            bundle.anchors(),
            intermediates,
            UnixTime::since_unix_epoch(since_epoch),
            eku,
            None,
            None,
        )
        .map_err(|e| map_webpki(e, usage))?;
    if let Some(check) = revocation {
        check_path(&path, check, now)?;
    }

    let x509 = parse_x509(leaf).map_err(|e| ChainError::BadEncoding(e.to_string()))?;
    if x509.is_ca() {
        return Err(ChainError::CaUsedAsLeaf);
    }
    let ku = x509
        .key_usage()
        .map_err(|e| ChainError::BadEncoding(format!("keyUsage: {e}")))?;
    // X.509-SVID: a leaf's key usage includes digitalSignature and excludes keyCertSign
    // and cRLSign (a missing extension counts as lacking digitalSignature, as go-spiffe
    // treats it).
    match ku {
        Some(ku) if ku.value.key_cert_sign() || ku.value.crl_sign() => {
            return Err(ChainError::LeafCanSignCertificates);
        }
        Some(ku) if ku.value.digital_signature() => {}
        _ => return Err(ChainError::LeafLacksDigitalSignature),
    }
    let mut uris = Vec::new();
    if let Some(san) = x509
        .subject_alternative_name()
        .map_err(|e| ChainError::BadEncoding(format!("subjectAltName: {e}")))?
    {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push(*u);
            }
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(ChainError::NoSpiffeId),
        [one] => *one,
        more => return Err(ChainError::MultipleUriSans { count: more.len() }),
    };
    let id = SpiffeId::parse(uri).map_err(|e| ChainError::InvalidSpiffeId {
        uri: crate::error::truncate(uri),
        reason: e.to_string(),
    })?;
    if !policy.accepts(id.trust_domain()) {
        return Err(ChainError::ForeignTrustDomain {
            trust_domain: id.trust_domain().clone(),
            local: policy.local.clone(),
        });
    }
    Ok(id)
}
