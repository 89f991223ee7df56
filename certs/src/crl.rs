//! Certificate revocation lists (RFC 5280 §5): sign one for a CA, parse them, and hold a
//! validated [`CrlSet`] for chain verification.
//!
//! - [`CertificateAuthority::sign_crl`] signs a CRL from [`CrlParams`] (serials, revocation
//!   times, reason codes, crlNumber, thisUpdate/nextUpdate). The authority key identifier
//!   repeats the CA certificate's subject key identifier, so OpenSSL matches it to the CA.
//! - [`Crl::from_der`] / [`parse_crls`] parse without trusting: a parsed [`Crl`] says what
//!   it claims, nothing more. Delta CRLs, partitioned CRLs (issuing distribution point) and
//!   CRLs with critical extensions we do not know are refused, never half-understood.
//! - [`CrlSet::new`] keeps a CRL only after its signature verifies with the public key of
//!   the one issuer certificate (among those given) whose subject is the CRL's issuer, that
//!   issuer may sign CRLs, and the CRL is current. Each refusal is a distinct [`CrlError`].
//! - Lookups ([`CrlSet::revoked`], [`CrlSet::covers`]) key on the issuer's subject **and**
//!   public key, so a CRL never speaks for another CA that happens to share a name.
//!
//! Chain verification with a set: [`verify_workload_chain_with_revocation`](crate::verify_workload_chain_with_revocation).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use rustls_pki_types::pem::{PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::authority::CertificateAuthority;
use crate::error::Error;
use crate::info::{serial_hex, sha256_hex, system_time};

/// How far a CRL's thisUpdate may lie in the future (clock skew between CA and reader).
pub const CRL_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Largest CRL we parse (DER bytes): a CRL is a list of serials, not a database.
pub const MAX_CRL_BYTES: usize = 4 << 20;

/// RFC 5280 §5.3.1 CRLReason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RevocationReason {
    /// unspecified (0).
    Unspecified,
    /// keyCompromise (1): the key is known or suspected stolen.
    KeyCompromise,
    /// cACompromise (2).
    CaCompromise,
    /// affiliationChanged (3).
    AffiliationChanged,
    /// superseded (4).
    Superseded,
    /// cessationOfOperation (5).
    CessationOfOperation,
    /// certificateHold (6).
    CertificateHold,
    /// removeFromCRL (8).
    RemoveFromCrl,
    /// privilegeWithdrawn (9).
    PrivilegeWithdrawn,
    /// aACompromise (10).
    AaCompromise,
}

const REASONS: &[(RevocationReason, u8, &str)] = &[
    (RevocationReason::Unspecified, 0, "unspecified"),
    (RevocationReason::KeyCompromise, 1, "keyCompromise"),
    (RevocationReason::CaCompromise, 2, "cACompromise"),
    (
        RevocationReason::AffiliationChanged,
        3,
        "affiliationChanged",
    ),
    (RevocationReason::Superseded, 4, "superseded"),
    (
        RevocationReason::CessationOfOperation,
        5,
        "cessationOfOperation",
    ),
    (RevocationReason::CertificateHold, 6, "certificateHold"),
    (RevocationReason::RemoveFromCrl, 8, "removeFromCRL"),
    (
        RevocationReason::PrivilegeWithdrawn,
        9,
        "privilegeWithdrawn",
    ),
    (RevocationReason::AaCompromise, 10, "aACompromise"),
];

impl RevocationReason {
    /// The RFC 5280 code.
    pub fn code(self) -> u8 {
        REASONS
            .iter()
            .find(|(r, _, _)| *r == self)
            .map_or(0, |(_, c, _)| *c)
    }

    /// The reason for an RFC 5280 code (7 and above 10 are not defined).
    pub fn from_code(code: u8) -> Option<RevocationReason> {
        REASONS
            .iter()
            .find(|(_, c, _)| *c == code)
            .map(|(r, _, _)| *r)
    }

    /// The RFC 5280 name, as OpenSSL spells it (`keyCompromise`).
    pub fn name(self) -> &'static str {
        REASONS
            .iter()
            .find(|(r, _, _)| *r == self)
            .map_or("unspecified", |(_, _, n)| n)
    }

    fn rcgen(self) -> rcgen::RevocationReason {
        use rcgen::RevocationReason as R;
        match self {
            RevocationReason::Unspecified => R::Unspecified,
            RevocationReason::KeyCompromise => R::KeyCompromise,
            RevocationReason::CaCompromise => R::CaCompromise,
            RevocationReason::AffiliationChanged => R::AffiliationChanged,
            RevocationReason::Superseded => R::Superseded,
            RevocationReason::CessationOfOperation => R::CessationOfOperation,
            RevocationReason::CertificateHold => R::CertificateHold,
            RevocationReason::RemoveFromCrl => R::RemoveFromCrl,
            RevocationReason::PrivilegeWithdrawn => R::PrivilegeWithdrawn,
            RevocationReason::AaCompromise => R::AaCompromise,
        }
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RevocationReason {
    type Err = String;

    /// Accepts the RFC 5280 name in any case (`keyCompromise`, `keycompromise`,
    /// `key-compromise`) or the numeric code.
    fn from_str(s: &str) -> Result<Self, String> {
        let norm: String = s
            .trim()
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect::<String>()
            .to_ascii_lowercase();
        if let Ok(code) = norm.parse::<u8>() {
            return RevocationReason::from_code(code)
                .ok_or_else(|| format!("revocation reason code {code} is not defined"));
        }
        REASONS
            .iter()
            .find(|(_, _, n)| n.to_ascii_lowercase() == norm)
            .map(|(r, _, _)| *r)
            .ok_or_else(|| {
                format!(
                    "unknown revocation reason {s:?}: expected one of {}",
                    REASONS
                        .iter()
                        .map(|(_, _, n)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}

/// One revoked certificate in a CRL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedCert {
    /// Serial number, lowercase hex of its value (as [`serial_hex`] and `openssl x509
    /// -serial` print it, without the DER sign byte).
    pub serial_hex: String,
    /// When it was revoked.
    pub revoked_at: SystemTime,
    /// Why, if the CRL says.
    pub reason: Option<RevocationReason>,
}

/// What to put in a CRL signed by [`CertificateAuthority::sign_crl`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrlParams {
    /// Issue time.
    pub this_update: SystemTime,
    /// When the next CRL will be issued at the latest; readers treat the CRL as stale after.
    pub next_update: SystemTime,
    /// The CRL number: must increase with every CRL the CA issues.
    pub crl_number: u64,
    /// The revoked certificates (serials as hex; see [`RevokedCert::serial_hex`]).
    pub revoked: Vec<RevokedCert>,
}

/// Why a CRL was refused. Each variant names one condition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CrlError {
    /// The input held no CRL at all.
    #[error("no CRL found in the input")]
    NoCrl,
    /// The PEM text is broken or holds a section that is not an `X509 CRL`.
    #[error("invalid CRL PEM: {0}")]
    Pem(String),
    /// The CRL ends before its own length says (a cut-off file or download).
    #[error("CRL is truncated: {0}")]
    Truncated(String),
    /// The bytes are not a DER CRL.
    #[error("malformed CRL: {0}")]
    Malformed(String),
    /// A CRL feature we do not implement, refused rather than misread.
    #[error("unsupported CRL: {0}")]
    Unsupported(String),
    /// No issuer certificate given has the CRL's issuer as its subject.
    #[error("CRL issued by {issuer:?}, which is none of the CA certificates it may speak for")]
    UnknownIssuer {
        /// The CRL's issuer name.
        issuer: String,
    },
    /// The CRL's signature does not verify with its issuer's public key (signed by another
    /// key, or altered).
    #[error("CRL signature does not verify with the key of {issuer:?} (wrong signer or altered)")]
    BadSignature {
        /// The CRL's issuer name.
        issuer: String,
    },
    /// The issuer certificate's key usage does not allow signing CRLs.
    #[error("{issuer:?} may not sign CRLs (keyUsage lacks cRLSign)")]
    IssuerNotCrlSigner {
        /// The issuer name.
        issuer: String,
    },
    /// The CRL is past its nextUpdate: its issuer stopped vouching for it.
    #[error("CRL of {issuer:?} expired at {} (now {})", crate::info::rfc3339_of(*next_update), crate::info::rfc3339_of(*now))]
    Expired {
        /// The CRL's issuer name.
        issuer: String,
        /// Its nextUpdate.
        next_update: SystemTime,
        /// The time of the check.
        now: SystemTime,
    },
    /// The CRL's thisUpdate lies further in the future than clock skew explains.
    #[error("CRL of {issuer:?} is not valid yet (thisUpdate {})", crate::info::rfc3339_of(*this_update))]
    NotYetValid {
        /// The CRL's issuer name.
        issuer: String,
        /// Its thisUpdate.
        this_update: SystemTime,
    },
    /// Two CRLs for the same issuer certificate.
    #[error("more than one CRL for {issuer:?}")]
    Duplicate {
        /// The issuer name.
        issuer: String,
    },
    /// A CA certificate the set must cover has no CRL in it.
    #[error("no CRL for CA certificate {subject:?} (serial {serial})")]
    NotCovered {
        /// The CA certificate's subject.
        subject: String,
        /// Its serial, hex.
        serial: String,
    },
    /// An issuer certificate could not be parsed.
    #[error("issuer certificate: {0}")]
    Certificate(String),
}

// === parsing ===

/// A parsed CRL. Parsing proves nothing about who signed it: see [`CrlSet`].
#[derive(Clone)]
pub struct Crl {
    der: CertificateRevocationListDer<'static>,
    issuer_name: Vec<u8>,
    issuer: String,
    this_update: SystemTime,
    next_update: SystemTime,
    crl_number: Option<String>,
    /// Keyed by the serial's value bytes (DER sign byte stripped).
    revoked: BTreeMap<Vec<u8>, RevokedCert>,
}

impl fmt::Debug for Crl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Crl")
            .field("issuer", &self.issuer)
            .field("crl_number", &self.crl_number)
            .field("this_update", &crate::info::rfc3339_of(self.this_update))
            .field("next_update", &crate::info::rfc3339_of(self.next_update))
            .field("revoked", &self.revoked.len())
            .finish()
    }
}

impl PartialEq for Crl {
    fn eq(&self, other: &Self) -> bool {
        self.der == other.der
    }
}

impl Eq for Crl {}

/// The value bytes of a DER INTEGER's content: leading zero bytes dropped (one kept for 0).
fn serial_value(raw: &[u8]) -> &[u8] {
    let pad = raw
        .iter()
        .take_while(|b| **b == 0)
        .count()
        .min(raw.len().saturating_sub(1));
    &raw[pad..]
}

/// Parses a serial given as hex (`openssl x509 -serial` output: optional `serial=` or `0x`,
/// optional colons, any case) into its value bytes.
pub fn parse_serial_hex(s: &str) -> Result<Vec<u8>, String> {
    let t = s.trim();
    let t = t.strip_prefix("serial=").unwrap_or(t);
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let digits: String = t.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || digits.len() > 40 {
        return Err(format!("serial {s:?}: expected 1 to 40 hex digits"));
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let bytes = hex::decode(&padded).map_err(|e| format!("serial {s:?}: {e}"))?;
    Ok(serial_value(&bytes).to_vec())
}

/// The content of a DER TLV (tag and length stripped), or the input if it is not one.
pub(crate) fn der_content(tlv: &[u8]) -> &[u8] {
    let Some(&len0) = tlv.get(1) else {
        return tlv;
    };
    let (start, len) = if len0 < 0x80 {
        (2usize, usize::from(len0))
    } else {
        let n = usize::from(len0 & 0x7f);
        if n == 0 || n > 4 || tlv.len() < 2 + n {
            return tlv;
        }
        let len = tlv[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (2 + n, len)
    };
    tlv.get(start..start.saturating_add(len)).unwrap_or(tlv)
}

fn time_of(t: x509_parser::time::ASN1Time) -> SystemTime {
    system_time(t.timestamp())
}

const OID_AUTHORITY_KEY_ID: &str = "2.5.29.35";
const OID_CRL_NUMBER: &str = "2.5.29.20";
const OID_DELTA_CRL: &str = "2.5.29.27";
const OID_ISSUING_DP: &str = "2.5.29.28";
const OID_REASON: &str = "2.5.29.21";
const OID_INVALIDITY_DATE: &str = "2.5.29.24";
const OID_CERT_ISSUER: &str = "2.5.29.29";

impl Crl {
    /// Parses one DER CRL (and nothing after it).
    pub fn from_der(der: &[u8]) -> Result<Crl, CrlError> {
        if der.len() > MAX_CRL_BYTES {
            return Err(CrlError::Unsupported(format!(
                "{} bytes is larger than the {MAX_CRL_BYTES} bytes we accept",
                der.len()
            )));
        }
        let (rest, crl) = CertificateRevocationList::from_der(der).map_err(|e| match e {
            x509_parser::nom::Err::Incomplete(_) => {
                CrlError::Truncated("input ends inside the CRL".into())
            }
            other => {
                // A definite length longer than the input is a cut-off CRL too.
                if declared_len(der).is_some_and(|l| l > der.len()) {
                    CrlError::Truncated(format!(
                        "{} of {} bytes",
                        der.len(),
                        declared_len(der).unwrap_or(0)
                    ))
                } else {
                    CrlError::Malformed(other.to_string())
                }
            }
        })?;
        if !rest.is_empty() {
            return Err(CrlError::Malformed(format!(
                "{} trailing bytes after the CRL",
                rest.len()
            )));
        }
        let tbs = &crl.tbs_cert_list;
        if tbs.version.is_some_and(|v| v.0 != 1) {
            return Err(CrlError::Unsupported(format!(
                "CRL version {}",
                tbs.version.map_or(0, |v| v.0 + 1)
            )));
        }
        if tbs.signature != crl.signature_algorithm {
            return Err(CrlError::Malformed(
                "the signature algorithm inside and outside the signed part differ".into(),
            ));
        }
        let issuer = tbs.issuer.to_string();
        for ext in tbs.extensions() {
            let oid = ext.oid.to_id_string();
            match oid.as_str() {
                OID_DELTA_CRL => {
                    return Err(CrlError::Unsupported("delta CRLs are not supported".into()));
                }
                OID_ISSUING_DP => {
                    return Err(CrlError::Unsupported(
                        "partitioned CRLs (issuingDistributionPoint) are not supported".into(),
                    ));
                }
                OID_AUTHORITY_KEY_ID | OID_CRL_NUMBER => {}
                _ if ext.critical => {
                    return Err(CrlError::Unsupported(format!(
                        "unknown critical CRL extension {oid}"
                    )));
                }
                _ => {}
            }
            if let ParsedExtension::ParseError { error } = ext.parsed_extension() {
                return Err(CrlError::Malformed(format!("extension {oid}: {error}")));
            }
        }
        let next_update = crl.next_update().ok_or_else(|| {
            CrlError::Unsupported("CRL without nextUpdate (it would never go stale)".into())
        })?;
        let crl_number = crl.crl_number().map(|n| hex::encode(n.to_bytes_be()));
        let mut revoked = BTreeMap::new();
        for entry in crl.iter_revoked_certificates() {
            for ext in entry.extensions() {
                let oid = ext.oid.to_id_string();
                match oid.as_str() {
                    OID_CERT_ISSUER => {
                        return Err(CrlError::Unsupported(
                            "indirect CRLs (certificateIssuer entries) are not supported".into(),
                        ));
                    }
                    OID_REASON | OID_INVALIDITY_DATE => {}
                    _ if ext.critical => {
                        return Err(CrlError::Unsupported(format!(
                            "unknown critical CRL entry extension {oid}"
                        )));
                    }
                    _ => {}
                }
                if let ParsedExtension::ParseError { error } = ext.parsed_extension() {
                    return Err(CrlError::Malformed(format!(
                        "entry extension {oid}: {error}"
                    )));
                }
            }
            let value = serial_value(entry.raw_serial()).to_vec();
            let reason = entry
                .reason_code()
                .and_then(|(_, code)| RevocationReason::from_code(code.0));
            revoked.entry(value.clone()).or_insert(RevokedCert {
                serial_hex: serial_hex(&value),
                revoked_at: time_of(entry.revocation_date),
                reason,
            });
        }
        Ok(Crl {
            der: CertificateRevocationListDer::from(der.to_vec()),
            issuer_name: der_content(tbs.issuer.as_raw()).to_vec(),
            issuer,
            this_update: time_of(tbs.this_update),
            next_update: time_of(next_update),
            crl_number,
            revoked,
        })
    }

    /// The DER encoding.
    pub fn der(&self) -> &CertificateRevocationListDer<'static> {
        &self.der
    }

    /// The CRL as one PEM `X509 CRL` section.
    pub fn to_pem(&self) -> String {
        crate::pem::encode_pem("X509 CRL", self.der.as_ref())
    }

    /// The issuer name (RFC 4514-style string).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// thisUpdate.
    pub fn this_update(&self) -> SystemTime {
        self.this_update
    }

    /// nextUpdate.
    pub fn next_update(&self) -> SystemTime {
        self.next_update
    }

    /// The crlNumber as lowercase hex, if present.
    pub fn crl_number_hex(&self) -> Option<&str> {
        self.crl_number.as_deref()
    }

    /// The revoked certificates, by serial.
    pub fn revoked_certs(&self) -> impl Iterator<Item = &RevokedCert> {
        self.revoked.values()
    }

    /// The entry for a serial (DER INTEGER content or value bytes), if revoked.
    pub fn find_serial(&self, serial: &[u8]) -> Option<&RevokedCert> {
        self.revoked.get(serial_value(serial))
    }

    /// Whether the CRL is past its nextUpdate at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.next_update
    }

    /// Checks the CRL's signature with `issuer`'s public key, that `issuer`'s subject is
    /// the CRL's issuer, and that `issuer` may sign CRLs.
    pub fn verify_signature(&self, issuer: &CertificateDer<'_>) -> Result<(), CrlError> {
        let (_, cert) = X509Certificate::from_der(issuer.as_ref())
            .map_err(|e| CrlError::Certificate(e.to_string()))?;
        if der_content(cert.subject().as_raw()) != self.issuer_name.as_slice() {
            return Err(CrlError::UnknownIssuer {
                issuer: self.issuer.clone(),
            });
        }
        if let Ok(Some(ku)) = cert.key_usage()
            && !ku.value.crl_sign()
        {
            return Err(CrlError::IssuerNotCrlSigner {
                issuer: self.issuer.clone(),
            });
        }
        let (_, crl) = CertificateRevocationList::from_der(self.der.as_ref())
            .map_err(|e| CrlError::Malformed(e.to_string()))?;
        crl.verify_signature(cert.public_key())
            .map_err(|_| CrlError::BadSignature {
                issuer: self.issuer.clone(),
            })
    }
}

/// The total length a DER TLV's header declares (header included), if readable.
fn declared_len(der: &[u8]) -> Option<usize> {
    let &len0 = der.get(1)?;
    if len0 < 0x80 {
        return Some(2 + usize::from(len0));
    }
    let n = usize::from(len0 & 0x7f);
    if !(1..=4).contains(&n) || der.len() < 2 + n {
        return None;
    }
    let len = der[2..2 + n]
        .iter()
        .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    Some(2 + n + len)
}

/// Parses CRLs from PEM (`X509 CRL` sections; any other section is an error) or from one
/// DER CRL. At least one CRL is required.
pub fn parse_crls(input: &[u8]) -> Result<Vec<Crl>, CrlError> {
    if input.first() == Some(&0x30) {
        return Ok(vec![Crl::from_der(input)?]);
    }
    let mut out = Vec::new();
    for section in <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(input) {
        let (kind, der) = section.map_err(|e| match e {
            rustls_pki_types::pem::Error::MissingSectionEnd { .. } => {
                CrlError::Truncated("PEM section has no END line".into())
            }
            other => CrlError::Pem(other.to_string()),
        })?;
        if kind != SectionKind::Crl {
            return Err(CrlError::Pem(format!(
                "expected only X509 CRL sections, found {kind:?}"
            )));
        }
        out.push(Crl::from_der(&der)?);
    }
    if out.is_empty() {
        return Err(CrlError::NoCrl);
    }
    Ok(out)
}

/// [`parse_crls`] on PEM text.
pub fn parse_crls_pem(pem: &str) -> Result<Vec<Crl>, CrlError> {
    parse_crls(pem.as_bytes())
}

/// Concatenated PEM of `crls`, in order.
pub fn crls_to_pem(crls: &[Crl]) -> String {
    crls.iter().map(Crl::to_pem).collect()
}

// === signing ===

impl CertificateAuthority {
    /// Signs a CRL for this CA's certificate. The CA certificate must allow cRLSign (those
    /// `rampart certs` makes do).
    pub fn sign_crl(&self, params: &CrlParams) -> Result<Crl, Error> {
        let odt = |t: SystemTime| {
            let secs = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            time::OffsetDateTime::from_unix_timestamp(secs)
                .map_err(|e| Error::Generation(format!("CRL time: {e}")))
        };
        let x509 = crate::info::parse_x509(self.cert())?;
        if let Ok(Some(ku)) = x509.key_usage()
            && !ku.value.crl_sign()
        {
            return Err(Error::NotACa("keyUsage lacks cRLSign".into()));
        }
        // The CRL's authority key identifier must equal the CA's subject key identifier
        // (OpenSSL matches on it); keep the CA's own value, whatever method made it.
        let ski = x509
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            });
        let mut revoked = Vec::with_capacity(params.revoked.len());
        for r in &params.revoked {
            let value = parse_serial_hex(&r.serial_hex).map_err(Error::Generation)?;
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&value),
                revocation_time: odt(r.revoked_at)?,
                reason_code: r.reason.map(RevocationReason::rcgen),
                invalidity_date: None,
            });
        }
        let p = CertificateRevocationListParams {
            this_update: odt(params.this_update)?,
            next_update: odt(params.next_update)?,
            crl_number: SerialNumber::from_slice(&params.crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: match ski {
                Some(ski) => KeyIdMethod::PreSpecified(ski),
                None => KeyIdMethod::Sha256,
            },
        };
        let der = self.sign_crl_params(&p)?;
        Crl::from_der(&der)
            .map_err(|e| Error::IssuedCertificateInvalid(format!("our own CRL: {e}")))
    }
}

// === the validated set ===

#[derive(Clone)]
struct Entry {
    crl: Crl,
    /// Issuer subject, DER content (no outer tag), as webpki reports names.
    issuer_name: Vec<u8>,
    /// Issuer SubjectPublicKeyInfo, DER content (no outer tag), as webpki trust anchors hold it.
    issuer_spki: Vec<u8>,
}

/// What [`CrlSet::new`] does with a CRL past its nextUpdate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CrlExpiry {
    /// Refuse it ([`CrlError::Expired`]).
    #[default]
    Refuse,
    /// Keep it (its revocations stay in force); the caller reports it
    /// ([`CrlSet::expired`]).
    Keep,
}

/// CRLs whose signatures were verified against known issuer certificates, one per issuer.
/// Cheap to clone (share it in an `Arc` for verifiers).
#[derive(Clone, Default)]
pub struct CrlSet {
    entries: Vec<Entry>,
    etag: String,
}

impl fmt::Debug for CrlSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrlSet")
            .field("etag", &self.etag)
            .field(
                "crls",
                &self.entries.iter().map(|e| &e.crl).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl PartialEq for CrlSet {
    fn eq(&self, other: &Self) -> bool {
        self.etag == other.etag
    }
}

impl Eq for CrlSet {}

fn cert_keys(cert: &CertificateDer<'_>) -> Result<(Vec<u8>, Vec<u8>, String, String), CrlError> {
    let (_, x) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| CrlError::Certificate(e.to_string()))?;
    Ok((
        der_content(x.subject().as_raw()).to_vec(),
        der_content(x.public_key().raw).to_vec(),
        x.subject().to_string(),
        serial_hex(x.raw_serial()),
    ))
}

impl CrlSet {
    /// A set holding no CRL (covers nothing).
    pub fn empty() -> CrlSet {
        CrlSet::default()
    }

    /// Validates `crls` against `issuers` (the CA certificates they may speak for) at
    /// `now`: each CRL must be issued and signed by one of them, current (see
    /// [`CrlExpiry`]), and no two CRLs may be for the same issuer certificate.
    pub fn new(
        crls: Vec<Crl>,
        issuers: &[CertificateDer<'_>],
        now: SystemTime,
        expiry: CrlExpiry,
    ) -> Result<CrlSet, CrlError> {
        let keys: Vec<_> = issuers.iter().map(cert_keys).collect::<Result<_, _>>()?;
        let mut entries: Vec<Entry> = Vec::with_capacity(crls.len());
        for crl in crls {
            let mut last = CrlError::UnknownIssuer {
                issuer: crl.issuer.clone(),
            };
            let mut found = None;
            for (cert, (name, spki, _, _)) in issuers.iter().zip(&keys) {
                if *name != crl.issuer_name {
                    continue;
                }
                match crl.verify_signature(cert) {
                    Ok(()) => {
                        found = Some((name.clone(), spki.clone()));
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let (issuer_name, issuer_spki) = found.ok_or(last)?;
            if crl.this_update > now + CRL_CLOCK_SKEW {
                return Err(CrlError::NotYetValid {
                    issuer: crl.issuer.clone(),
                    this_update: crl.this_update,
                });
            }
            if expiry == CrlExpiry::Refuse && crl.is_expired(now) {
                return Err(CrlError::Expired {
                    issuer: crl.issuer.clone(),
                    next_update: crl.next_update,
                    now,
                });
            }
            if entries
                .iter()
                .any(|e| e.issuer_name == issuer_name && e.issuer_spki == issuer_spki)
            {
                return Err(CrlError::Duplicate {
                    issuer: crl.issuer.clone(),
                });
            }
            entries.push(Entry {
                crl,
                issuer_name,
                issuer_spki,
            });
        }
        Ok(CrlSet::from_entries(entries))
    }

    fn from_entries(entries: Vec<Entry>) -> CrlSet {
        let mut all = Vec::new();
        for e in &entries {
            all.extend_from_slice(&(e.crl.der.len() as u64).to_be_bytes());
            all.extend_from_slice(e.crl.der.as_ref());
        }
        let etag = if entries.is_empty() {
            String::new()
        } else {
            sha256_hex(&all)[..32].to_owned()
        };
        CrlSet { entries, etag }
    }

    /// [`CrlSet::new`] on PEM text (or one DER CRL).
    pub fn from_pem(
        pem: &str,
        issuers: &[CertificateDer<'_>],
        now: SystemTime,
        expiry: CrlExpiry,
    ) -> Result<CrlSet, CrlError> {
        CrlSet::new(parse_crls_pem(pem)?, issuers, now, expiry)
    }

    /// [`CrlSet::new`] on DER CRLs (as `rampart.ca.v1.Revocation/GetCrls` returns them).
    pub fn from_ders<D: AsRef<[u8]>>(
        ders: &[D],
        issuers: &[CertificateDer<'_>],
        now: SystemTime,
        expiry: CrlExpiry,
    ) -> Result<CrlSet, CrlError> {
        let crls = ders
            .iter()
            .map(|d| Crl::from_der(d.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        CrlSet::new(crls, issuers, now, expiry)
    }

    /// Refuses the set unless every certificate in `cas` has a CRL in it (Istio's rule for
    /// `ca-crl.pem`: one CRL per CA certificate of the chain).
    pub fn require_coverage(&self, cas: &[CertificateDer<'_>]) -> Result<(), CrlError> {
        for ca in cas {
            let (name, spki, subject, serial) = cert_keys(ca)?;
            if self.lookup(&name, &spki).is_none() {
                return Err(CrlError::NotCovered { subject, serial });
            }
        }
        Ok(())
    }

    /// This set with `other`'s CRLs added; for an issuer both cover, `other`'s CRL wins.
    pub fn merged_with(&self, other: &CrlSet) -> CrlSet {
        let mut entries: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| other.lookup(&e.issuer_name, &e.issuer_spki).is_none())
            .cloned()
            .collect();
        entries.extend(other.entries.iter().cloned());
        CrlSet::from_entries(entries)
    }

    pub(crate) fn lookup(&self, issuer_name: &[u8], issuer_spki: &[u8]) -> Option<&Crl> {
        self.entries
            .iter()
            .find(|e| e.issuer_name == issuer_name && e.issuer_spki == issuer_spki)
            .map(|e| &e.crl)
    }

    /// The CRL for issuer certificate `issuer`, if the set has one.
    pub fn crl_for(&self, issuer: &CertificateDer<'_>) -> Option<&Crl> {
        let (name, spki, _, _) = cert_keys(issuer).ok()?;
        self.lookup(&name, &spki)
    }

    /// Whether the set has a CRL for issuer certificate `issuer`.
    pub fn covers(&self, issuer: &CertificateDer<'_>) -> bool {
        self.crl_for(issuer).is_some()
    }

    /// The revocation entry of serial `serial` (DER INTEGER content or value bytes) issued by
    /// `issuer`, if revoked.
    pub fn revoked(&self, issuer: &CertificateDer<'_>, serial: &[u8]) -> Option<&RevokedCert> {
        self.crl_for(issuer)?.find_serial(serial)
    }

    /// The CRLs, in order.
    pub fn crls(&self) -> impl Iterator<Item = &Crl> {
        self.entries.iter().map(|e| &e.crl)
    }

    /// How many CRLs the set holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the set holds no CRL.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The CRLs past their nextUpdate at `now`.
    pub fn expired(&self, now: SystemTime) -> Vec<&Crl> {
        self.crls().filter(|c| c.is_expired(now)).collect()
    }

    /// The earliest nextUpdate in the set.
    pub fn next_update(&self) -> Option<SystemTime> {
        self.crls().map(Crl::next_update).min()
    }

    /// The CRLs as concatenated PEM.
    pub fn to_pem(&self) -> String {
        self.crls().map(Crl::to_pem).collect()
    }

    /// The CRLs as DER.
    pub fn ders(&self) -> Vec<CertificateRevocationListDer<'static>> {
        self.crls().map(|c| c.der.clone()).collect()
    }

    /// A short content hash of the set (empty for an empty set): equal sets have equal etags.
    pub fn etag(&self) -> &str {
        &self.etag
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TestPki;

    fn crl_params(now: SystemTime, revoked: &[(&str, Option<RevocationReason>)]) -> CrlParams {
        CrlParams {
            this_update: now,
            next_update: now + Duration::from_secs(600),
            crl_number: 7,
            revoked: revoked
                .iter()
                .map(|(s, r)| RevokedCert {
                    serial_hex: (*s).into(),
                    revoked_at: now,
                    reason: *r,
                })
                .collect(),
        }
    }

    #[test]
    fn reason_names_round_trip() {
        for (r, code, name) in REASONS {
            assert_eq!(r.code(), *code);
            assert_eq!(RevocationReason::from_code(*code), Some(*r));
            assert_eq!(name.parse::<RevocationReason>().unwrap(), *r);
            assert_eq!(r.to_string(), *name);
        }
        assert_eq!(
            "key-compromise".parse::<RevocationReason>().unwrap(),
            RevocationReason::KeyCompromise
        );
        assert_eq!(
            "1".parse::<RevocationReason>().unwrap(),
            RevocationReason::KeyCompromise
        );
        assert!("7".parse::<RevocationReason>().is_err());
        assert!("stolen".parse::<RevocationReason>().is_err());
    }

    #[test]
    fn serial_hex_forms() {
        assert_eq!(parse_serial_hex("0A").unwrap(), vec![0x0a]);
        assert_eq!(parse_serial_hex("serial=00C3D7").unwrap(), vec![0xc3, 0xd7]);
        assert_eq!(parse_serial_hex("c3:d7").unwrap(), vec![0xc3, 0xd7]);
        assert_eq!(parse_serial_hex("0xabc").unwrap(), vec![0x0a, 0xbc]);
        assert!(parse_serial_hex("").is_err());
        assert!(parse_serial_hex("xyz").is_err());
    }

    #[test]
    fn signed_crl_parses_and_validates_with_its_issuer_only() {
        let pki = TestPki::new("cluster.local");
        let now = SystemTime::now();
        let leaf = pki.workload("a", "b").chain;
        let serial = crate::CertInfo::parse(&leaf[0]).unwrap().serial_hex;
        let crl = pki
            .intermediate
            .sign_crl(&crl_params(
                now,
                &[(&serial, Some(RevocationReason::KeyCompromise))],
            ))
            .unwrap();
        assert_eq!(crl.crl_number_hex(), Some("07"));
        let entry = crl.revoked_certs().next().unwrap();
        assert_eq!(entry.serial_hex, serial);
        assert_eq!(entry.reason, Some(RevocationReason::KeyCompromise));
        let again = parse_crls_pem(&crl.to_pem()).unwrap();
        assert_eq!(again, vec![crl.clone()]);

        let inter = pki.intermediate.cert().clone();
        let set = CrlSet::new(
            vec![crl.clone()],
            std::slice::from_ref(&inter),
            now,
            CrlExpiry::Refuse,
        )
        .unwrap();
        assert!(set.covers(&inter));
        assert!(!set.covers(pki.root.cert()));
        let raw = crate::info::parse_x509(&leaf[0])
            .unwrap()
            .raw_serial()
            .to_vec();
        assert_eq!(set.revoked(&inter, &raw).unwrap().serial_hex, serial);
        assert!(set.revoked(&inter, &[0x01, 0x02]).is_none());

        // Negative twin: the same CRL offered for the root only.
        let err = CrlSet::new(
            vec![crl],
            &[pki.root.cert().clone()],
            now,
            CrlExpiry::Refuse,
        )
        .unwrap_err();
        assert!(matches!(err, CrlError::UnknownIssuer { .. }), "{err}");
    }

    #[test]
    fn wrong_signer_is_bad_signature() {
        let pki = TestPki::new("cluster.local");
        let other = TestPki::new("cluster.local"); // same subject names, different keys
        let now = SystemTime::now();
        let forged = other.intermediate.sign_crl(&crl_params(now, &[])).unwrap();
        let err = CrlSet::new(
            vec![forged],
            &[pki.intermediate.cert().clone()],
            now,
            CrlExpiry::Refuse,
        )
        .unwrap_err();
        assert!(matches!(err, CrlError::BadSignature { .. }), "{err}");
        let good = pki.intermediate.sign_crl(&crl_params(now, &[])).unwrap();
        CrlSet::new(
            vec![good],
            &[pki.intermediate.cert().clone()],
            now,
            CrlExpiry::Refuse,
        )
        .unwrap();
    }

    #[test]
    fn expired_refused_or_kept_as_asked() {
        let pki = TestPki::new("cluster.local");
        let then = SystemTime::now() - Duration::from_secs(3600);
        let crl = pki.intermediate.sign_crl(&crl_params(then, &[])).unwrap();
        let now = SystemTime::now();
        let issuers = [pki.intermediate.cert().clone()];
        let err = CrlSet::new(vec![crl.clone()], &issuers, now, CrlExpiry::Refuse).unwrap_err();
        assert!(matches!(err, CrlError::Expired { .. }), "{err}");
        let kept = CrlSet::new(vec![crl.clone()], &issuers, now, CrlExpiry::Keep).unwrap();
        assert_eq!(kept.expired(now).len(), 1);
        // Twin: the same CRL checked while current is accepted.
        CrlSet::new(
            vec![crl],
            &issuers,
            then + Duration::from_secs(1),
            CrlExpiry::Refuse,
        )
        .unwrap();
    }

    #[test]
    fn truncated_garbage_and_wrong_pem_are_named() {
        let pki = TestPki::new("cluster.local");
        let crl = pki
            .intermediate
            .sign_crl(&crl_params(SystemTime::now(), &[("0a", None)]))
            .unwrap();
        let der = crl.der().as_ref();
        let err = Crl::from_der(&der[..der.len() - 10]).unwrap_err();
        assert!(matches!(err, CrlError::Truncated(_)), "{err}");
        let pem = crl.to_pem();
        let cut = &pem[..pem.len() / 2];
        assert!(matches!(
            parse_crls_pem(cut).unwrap_err(),
            CrlError::Truncated(_)
        ));
        assert!(matches!(
            Crl::from_der(b"\x30\x03\x02\x01\x01").unwrap_err(),
            CrlError::Malformed(_)
        ));
        assert!(matches!(
            parse_crls_pem("hello").unwrap_err(),
            CrlError::NoCrl
        ));
        let cert_pem = crate::certs_to_pem(&[pki.root.cert().clone()]);
        assert!(matches!(
            parse_crls_pem(&cert_pem).unwrap_err(),
            CrlError::Pem(_)
        ));
        let mut trailing = der.to_vec();
        trailing.push(0);
        assert!(matches!(
            Crl::from_der(&trailing).unwrap_err(),
            CrlError::Malformed(_)
        ));
        // Twin: the whole thing parses.
        Crl::from_der(der).unwrap();
    }

    #[test]
    fn duplicate_and_coverage() {
        let pki = TestPki::new("cluster.local");
        let now = SystemTime::now();
        let a = pki.intermediate.sign_crl(&crl_params(now, &[])).unwrap();
        let b = pki
            .intermediate
            .sign_crl(&crl_params(now, &[("01", None)]))
            .unwrap();
        let r = pki.root.sign_crl(&crl_params(now, &[])).unwrap();
        let issuers = [pki.intermediate.cert().clone(), pki.root.cert().clone()];
        let err = CrlSet::new(vec![a.clone(), b], &issuers, now, CrlExpiry::Refuse).unwrap_err();
        assert!(matches!(err, CrlError::Duplicate { .. }), "{err}");
        let partial = CrlSet::new(vec![a.clone()], &issuers, now, CrlExpiry::Refuse).unwrap();
        let err = partial.require_coverage(&issuers).unwrap_err();
        assert!(matches!(err, CrlError::NotCovered { .. }), "{err}");
        let full = CrlSet::new(vec![a, r], &issuers, now, CrlExpiry::Refuse).unwrap();
        full.require_coverage(&issuers).unwrap();
        assert_ne!(full.etag(), partial.etag());
        assert_eq!(full.merged_with(&partial).len(), 2);
    }
}
