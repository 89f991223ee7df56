//! A signing CA: certificate + key (+ its chain to the root), and the certificate profiles
//! it issues (DESIGN.md §1).
//!
//! Everything expensive (parsing the CA certificate, preparing rcgen's `Issuer` and the
//! signing key) happens once in [`CertificateAuthority::new`]; issuing a workload
//! certificate is then one template fill and one signature. At construction the authority
//! also issues a probe certificate and verifies it with webpki against its own
//! certificate, so a CA whose name or key encoding we cannot reproduce is refused up front
//! rather than producing certificates that do not chain.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::algs::SpkiKind;
use crate::error::Error;
use crate::info::{parse_x509, system_time};
use crate::key::PrivateKey;
use crate::spiffe::SpiffeId;
use crate::timestamp::{from_offset_date_time as to_system, rfc3339, to_offset_date_time as odt};

/// Default lifetime of a workload certificate (Istio's `DEFAULT_WORKLOAD_CERT_TTL`).
pub const DEFAULT_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest workload certificate lifetime we issue (Istio's `MAX_WORKLOAD_CERT_TTL`);
/// longer requests are refused.
pub const MAX_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// The most not-before is moved into the past to absorb clock skew: 2 minutes, Istio's
/// `ClockSkewGracePeriod` (never before the CA's own not-before, and never more than
/// [`MAX_BACKDATE_FRACTION`] of the lifetime: see [`clock_skew_backdate`]).
pub const CLOCK_SKEW_BACKDATE: Duration = Duration::from_secs(2 * 60);
/// The backdate is at most this fraction of the certificate's lifetime (1/10).
pub const MAX_BACKDATE_FRACTION: u32 = 10;

/// How far not-before is backdated for a certificate living `ttl`: [`CLOCK_SKEW_BACKDATE`],
/// but at most a tenth of `ttl`. A short-lived certificate must not look half used up the
/// moment it is issued: renewing at not-before + half the lifetime (ztunnel, Istio's agent)
/// would otherwise renew a 60 s certificate at once, again and again.
pub fn clock_skew_backdate(ttl: Duration) -> Duration {
    CLOCK_SKEW_BACKDATE.min(ttl / MAX_BACKDATE_FRACTION)
}

/// Parameters of a self-signed root CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootParams {
    /// Subject common name.
    pub common_name: String,
    /// Subject organization.
    pub organization: String,
    /// Lifetime from issuance.
    pub validity: Duration,
}

impl Default for RootParams {
    fn default() -> Self {
        Self {
            common_name: "Rampart Root CA".into(),
            organization: "Rampart".into(),
            validity: Duration::from_secs(10 * 365 * 24 * 3600),
        }
    }
}

/// Parameters of an intermediate CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntermediateParams {
    /// Subject common name.
    pub common_name: String,
    /// Subject organization.
    pub organization: String,
    /// Lifetime from issuance (capped at the issuer's not-after).
    pub validity: Duration,
    /// basicConstraints pathLenConstraint; `None` for unconstrained.
    pub path_len: Option<u8>,
}

impl Default for IntermediateParams {
    fn default() -> Self {
        Self {
            common_name: "Rampart Intermediate CA".into(),
            organization: "Rampart".into(),
            validity: Duration::from_secs(2 * 365 * 24 * 3600),
            path_len: Some(0),
        }
    }
}

/// The CA key as rcgen's signer. Private so rcgen's traits stay out of our public API.
struct CaKey(PrivateKey);

impl rcgen::PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        rcgen::PublicKeyData::der_bytes(self.0.rcgen_pair())
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        rcgen::PublicKeyData::algorithm(self.0.rcgen_pair())
    }
}

impl rcgen::SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        rcgen::SigningKey::sign(self.0.rcgen_pair(), msg)
    }
}

/// A subject public key taken from SPKI DER, for rcgen.
struct SubjectKey<'a> {
    alg: &'static rcgen::SignatureAlgorithm,
    raw: std::borrow::Cow<'a, [u8]>,
    kind: SpkiKind,
}

impl<'a> SubjectKey<'a> {
    fn from_spki(spki_der: &'a [u8]) -> Result<Self, Error> {
        let (rest, spki) = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| Error::InvalidKey(format!("subject public key: {e}")))?;
        if !rest.is_empty() {
            return Err(Error::InvalidKey(
                "trailing bytes after the subject public key".into(),
            ));
        }
        let kind = SpkiKind::of(&spki)?;
        if spki.subject_public_key.unused_bits != 0 {
            return Err(Error::InvalidKey(
                "public key BIT STRING has unused bits".into(),
            ));
        }
        let key = Self {
            alg: kind.rcgen_alg(),
            raw: spki.subject_public_key.data,
            kind,
        };
        // rcgen re-encodes the SPKI from (algorithm, key bits); insist that gives back
        // exactly what we were given, so the certificate certifies the very same bytes.
        let encoded = rcgen::PublicKeyData::subject_public_key_info(&key);
        if encoded != spki_der {
            return Err(Error::InvalidKey(
                "subject public key is not in canonical DER form".into(),
            ));
        }
        Ok(key)
    }
}

impl rcgen::PublicKeyData for SubjectKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

/// A CA certificate and its key, ready to sign.
pub struct CertificateAuthority {
    cert: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    issuer: Issuer<'static, CaKey>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    rng: SystemRandom,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .field("key", &"[secret key elided]")
            .finish()
    }
}

fn gen_err(e: rcgen::Error) -> Error {
    Error::Generation(e.to_string())
}

fn dn(common_name: &str, organization: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if !organization.is_empty() {
        dn.push(DnType::OrganizationName, organization);
    }
    if !common_name.is_empty() {
        dn.push(DnType::CommonName, common_name);
    }
    dn
}

fn ia5(s: &str) -> Result<rcgen::string::Ia5String, Error> {
    rcgen::string::Ia5String::try_from(s).map_err(|e| Error::InvalidName {
        name: s.to_owned(),
        reason: e.to_string(),
    })
}

fn random_serial(rng: &SystemRandom) -> Result<SerialNumber, Error> {
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes)
        .map_err(|_| Error::Generation("random source failed".into()))?;
    // rcgen encodes the serial as a positive INTEGER (prefixing 0x00 when the top bit is
    // set), so all 128 bits stay random and the value is positive.
    Ok(SerialNumber::from_slice(&bytes))
}

// === impl CertificateAuthority ===

impl CertificateAuthority {
    /// Loads a CA. `chain` is the issuer chain after `cert` (root last; empty when `cert`
    /// is itself a self-signed root). Checks that `cert` is a CA allowed to sign
    /// certificates, that `key` is its key, that each chain link names and is signed by the
    /// next, and that certificates it issues verify against it.
    pub fn new(
        cert: CertificateDer<'static>,
        key: PrivateKey,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<Self, Error> {
        let x509 = parse_x509(&cert)?;
        match x509
            .basic_constraints()
            .map_err(|e| Error::InvalidCertificate(format!("basicConstraints: {e}")))?
        {
            Some(bc) if bc.value.ca => {}
            _ => return Err(Error::NotACa("basicConstraints cA is not set".into())),
        }
        let ku = x509
            .key_usage()
            .map_err(|e| Error::InvalidCertificate(format!("keyUsage: {e}")))?;
        if ku.is_some_and(|ku| !ku.value.key_cert_sign()) {
            return Err(Error::NotACa("keyUsage lacks keyCertSign".into()));
        }
        // The key must be the certificate's key.
        let spki = x509.public_key();
        let kind = SpkiKind::of(spki)?;
        if kind != SpkiKind::of_key(key.algorithm())
            || spki.subject_public_key.data.as_ref() != key.public_key_raw()
        {
            return Err(Error::KeyMismatch);
        }
        // rcgen re-encodes our subject name as the issuer name of what we sign; it handles
        // one attribute per RDN only.
        for rdn in x509.subject().iter() {
            if rdn.iter().count() != 1 {
                return Err(Error::InvalidCertificate(
                    "CA subject has a multi-valued or empty RDN, which we cannot re-encode".into(),
                ));
            }
        }
        let not_before = odt(system_time(x509.validity().not_before.timestamp()));
        let not_after = odt(system_time(x509.validity().not_after.timestamp()));
        if not_after <= not_before {
            return Err(Error::InvalidCertificate(
                "CA validity period is empty".into(),
            ));
        }

        // Chain links: each certificate names and is signed by the next.
        let mut child = x509;
        for (i, parent_der) in chain.iter().enumerate() {
            let parent = parse_x509(parent_der)?;
            if child.issuer().as_raw() != parent.subject().as_raw() {
                return Err(Error::InvalidCertificate(format!(
                    "chain certificate #{i} ({}) is not the issuer of the one before it ({})",
                    parent.subject(),
                    child.issuer()
                )));
            }
            child
                .verify_signature(Some(parent.public_key()))
                .map_err(|e| {
                    Error::InvalidCertificate(format!(
                        "chain certificate #{i} did not sign the one before it: {e}"
                    ))
                })?;
            child = parent;
        }
        drop(child);

        let issuer = Issuer::from_ca_cert_der(&cert, CaKey(key))
            .map_err(|e| Error::InvalidCertificate(format!("cannot use as issuer: {e}")))?;
        let ca = Self {
            cert,
            chain,
            issuer,
            not_before,
            not_after,
            rng: SystemRandom::new(),
        };
        ca.self_check()?;
        Ok(ca)
    }

    /// Makes a self-signed root CA with `key`, valid from `now` (backdated for clock
    /// skew) for `params.validity`.
    pub fn self_signed_root(
        params: &RootParams,
        key: PrivateKey,
        now: SystemTime,
    ) -> Result<Self, Error> {
        if params.validity.is_zero() {
            return Err(Error::InvalidTtl {
                requested_secs: 0,
                max_secs: u64::MAX,
            });
        }
        let rng = SystemRandom::new();
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(&params.common_name, &params.organization);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = odt(now
            .checked_sub(clock_skew_backdate(params.validity))
            .unwrap_or(now));
        p.not_after = odt(now.checked_add(params.validity).ok_or(Error::InvalidTtl {
            requested_secs: params.validity.as_secs(),
            max_secs: u64::MAX,
        })?);
        p.serial_number = Some(random_serial(&rng)?);
        let signer = CaKey(key);
        let cert = p.self_signed(&signer).map_err(gen_err)?;
        Self::new(cert.der().clone(), signer.into_key(), Vec::new())
    }

    /// This CA's certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate followed by its issuer chain; the root is last.
    pub fn chain_to_root(&self) -> Vec<CertificateDer<'static>> {
        let mut out = Vec::with_capacity(1 + self.chain.len());
        out.push(self.cert.clone());
        out.extend(self.chain.iter().cloned());
        out
    }

    /// The root at the end of the chain (the CA certificate itself for a root).
    pub fn root(&self) -> &CertificateDer<'static> {
        self.chain.last().unwrap_or(&self.cert)
    }

    /// The CA certificate's not-before.
    pub fn not_before(&self) -> SystemTime {
        to_system(self.not_before)
    }

    /// The CA certificate's not-after: nothing issued outlives it.
    pub fn not_after(&self) -> SystemTime {
        to_system(self.not_after)
    }

    /// The CA's key algorithm.
    pub fn key_algorithm(&self) -> crate::KeyAlgorithm {
        self.issuer.key().0.algorithm()
    }

    /// Issues an intermediate CA certificate for `subject_key_spki`.
    pub fn issue_intermediate(
        &self,
        params: &IntermediateParams,
        subject_key_spki: &[u8],
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, Error> {
        let subject = SubjectKey::from_spki(subject_key_spki)?;
        let (not_before, not_after) = self.window(now, params.validity, None)?;
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(&params.common_name, &params.organization);
        p.is_ca = IsCa::Ca(match params.path_len {
            Some(n) => BasicConstraints::Constrained(n),
            None => BasicConstraints::Unconstrained,
        });
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before;
        p.not_after = not_after;
        p.serial_number = Some(random_serial(&self.rng)?);
        self.sign(&p, &subject)
    }

    /// Issues a workload certificate (DESIGN.md §1): empty subject, exactly one URI SAN
    /// (`id`), EKU serverAuth + clientAuth, KU digitalSignature (+ keyEncipherment for an
    /// RSA subject key), basicConstraints cA=false, SKI/AKI, a 128-bit random serial,
    /// not-before backdated by [`clock_skew_backdate`] (never before the CA's), not-after
    /// `now + ttl` capped at the CA's not-after. `ttl` above [`MAX_WORKLOAD_CERT_TTL`] or
    /// zero is refused.
    pub fn issue_workload(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, Error> {
        let subject = SubjectKey::from_spki(spki_der)?;
        let (not_before, not_after) = self.window(now, ttl, Some(MAX_WORKLOAD_CERT_TTL))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(ia5(&id.to_string())?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = leaf_key_usages(subject.kind);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before;
        p.not_after = not_after;
        p.serial_number = Some(random_serial(&self.rng)?);
        self.sign(&p, &subject)
    }

    /// Issues a server certificate (e.g. the CA's own serving certificate): DNS and IP
    /// SANs, optionally a SPIFFE ID URI SAN; EKU serverAuth + clientAuth; not a CA.
    pub fn issue_server(
        &self,
        spki_der: &[u8],
        dns: &[String],
        ips: &[IpAddr],
        uri: Option<&SpiffeId>,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, Error> {
        let subject = SubjectKey::from_spki(spki_der)?;
        let (not_before, not_after) = self.window(now, ttl, None)?;
        let mut sans = Vec::with_capacity(dns.len() + ips.len() + 1);
        for name in dns {
            let dns_name = rustls_pki_types::DnsName::try_from(name.as_str()).map_err(|e| {
                Error::InvalidName {
                    name: name.clone(),
                    reason: e.to_string(),
                }
            })?;
            sans.push(SanType::DnsName(ia5(dns_name.as_ref())?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        if let Some(id) = uri {
            sans.push(SanType::URI(ia5(&id.to_string())?));
        }
        if sans.is_empty() {
            return Err(Error::InvalidName {
                name: String::new(),
                reason: "a server certificate needs at least one DNS, IP or URI name".into(),
            });
        }
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        if let Some(first) = dns.first() {
            p.distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        p.subject_alt_names = sans;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = leaf_key_usages(subject.kind);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before;
        p.not_after = not_after;
        p.serial_number = Some(random_serial(&self.rng)?);
        self.sign(&p, &subject)
    }

    /// The validity window for something issued at `now` for `ttl`.
    fn window(
        &self,
        now: SystemTime,
        ttl: Duration,
        max: Option<Duration>,
    ) -> Result<(OffsetDateTime, OffsetDateTime), Error> {
        if ttl.is_zero() || max.is_some_and(|m| ttl > m) {
            return Err(Error::InvalidTtl {
                requested_secs: ttl.as_secs(),
                max_secs: max.unwrap_or(Duration::MAX).as_secs(),
            });
        }
        let now_odt = odt(now);
        if now_odt < self.not_before || now_odt >= self.not_after {
            return Err(Error::CaNotValid {
                not_before: rfc3339(to_system(self.not_before)),
                not_after: rfc3339(to_system(self.not_after)),
            });
        }
        let not_before =
            odt(now.checked_sub(clock_skew_backdate(ttl)).unwrap_or(now)).max(self.not_before);
        let not_after = now
            .checked_add(ttl)
            .map(odt)
            .unwrap_or(self.not_after)
            .min(self.not_after);
        Ok((not_before, not_after))
    }

    fn sign(
        &self,
        params: &CertificateParams,
        subject: &SubjectKey<'_>,
    ) -> Result<CertificateDer<'static>, Error> {
        let cert = params.signed_by(subject, &self.issuer).map_err(gen_err)?;
        Ok(cert.der().clone())
    }

    /// Issues a probe leaf and verifies it against this CA with webpki.
    fn self_check(&self) -> Result<(), Error> {
        let probe_key = PrivateKey::generate(crate::KeyAlgorithm::EcdsaP256)?;
        let id = SpiffeId::parse("spiffe://probe.invalid/self-check")?;
        let mid = self.not_before + (self.not_after - self.not_before) / 2;
        let at = to_system(mid);
        let leaf = self.issue_workload(
            &probe_key.public_key_spki_der(),
            &id,
            Duration::from_secs(60),
            at,
        )?;
        let anchor = webpki::anchor_from_trusted_cert(&self.cert)
            .map_err(|e| Error::IssuedCertificateInvalid(format!("CA as anchor: {e}")))?;
        let ee = webpki::EndEntityCert::try_from(&leaf)
            .map_err(|e| Error::IssuedCertificateInvalid(e.to_string()))?;
        let time = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
            mid.unix_timestamp().max(0) as u64,
        ));
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| {
            Error::IssuedCertificateInvalid(format!(
                "a probe certificate does not verify against the CA certificate: {e}"
            ))
        })?;
        Ok(())
    }
}

impl CertificateAuthority {
    /// Signs a CRL with this CA's key (rcgen checks the CA may sign CRLs).
    pub(crate) fn sign_crl_params(
        &self,
        params: &rcgen::CertificateRevocationListParams,
    ) -> Result<Vec<u8>, Error> {
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|e| Error::Generation(format!("signing the CRL: {e}")))?;
        Ok(crl.der().to_vec())
    }
}

impl CaKey {
    fn into_key(self) -> PrivateKey {
        self.0
    }
}

fn leaf_key_usages(kind: SpkiKind) -> Vec<KeyUsagePurpose> {
    if kind == SpkiKind::Rsa {
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ]
    } else {
        vec![KeyUsagePurpose::DigitalSignature]
    }
}

#[cfg(test)]
mod backdate_tests {
    use super::*;

    #[test]
    fn backdate_is_two_minutes_at_most_and_a_tenth_of_short_lifetimes() {
        let s = Duration::from_secs;
        assert_eq!(clock_skew_backdate(s(24 * 3600)), s(120));
        assert_eq!(
            clock_skew_backdate(s(20 * 60)),
            s(120),
            "a tenth is exactly 2 min"
        );
        assert_eq!(clock_skew_backdate(s(60)), s(6));
        assert_eq!(clock_skew_backdate(s(10)), s(1));
        assert_eq!(clock_skew_backdate(Duration::ZERO), Duration::ZERO);
        // Renewal at not-before + half the lifetime (ztunnel) is never due at issuance: with
        // a backdate of b <= ttl/10 the refresh point is now + ttl/2 - b/2 >= now + 0.45 ttl.
        for ttl in [1u64, 10, 60, 600, 3600, 24 * 3600, 90 * 24 * 3600].map(s) {
            let back = clock_skew_backdate(ttl);
            let life = ttl + back;
            let renew_after_issue = (life / 2).checked_sub(back).expect("renewal in the future");
            assert!(
                renew_after_issue >= ttl * 45 / 100,
                "{ttl:?}: {renew_after_issue:?}"
            );
        }
        // Negative twin: the old fixed 5 minutes renewed a 60 s certificate on receipt.
        let (ttl, back) = (s(60), s(300));
        assert!((ttl + back) / 2 < back);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{TrustBundle, TrustDomainPolicy, Usage, verify_workload_chain};

    #[test]
    fn root_issues_a_workload_that_verifies() {
        let now = SystemTime::now();
        let root_key = PrivateKey::generate(crate::KeyAlgorithm::EcdsaP256).unwrap();
        let ca =
            CertificateAuthority::self_signed_root(&RootParams::default(), root_key, now).unwrap();
        let leaf_key = PrivateKey::generate(crate::KeyAlgorithm::EcdsaP256).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/sleep").unwrap();
        let csr = crate::VerifiedCsr::from_pem(&crate::build_csr(&leaf_key, &id).unwrap()).unwrap();
        assert_eq!(csr.requested_spiffe_id().unwrap(), id);
        let leaf = ca
            .issue_workload(
                csr.public_key_spki_der(),
                &id,
                DEFAULT_WORKLOAD_CERT_TTL,
                now,
            )
            .unwrap();
        let bundle = TrustBundle::from_der(vec![ca.root().clone()]).unwrap();
        let policy = TrustDomainPolicy::local(id.trust_domain().clone());
        let got = verify_workload_chain(&[leaf], &bundle, &policy, now, Usage::ClientAuth).unwrap();
        assert_eq!(got, id);
    }
}
