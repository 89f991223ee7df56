//! Template, sign, validate (SPIRE style). The CA decides every field of a workload
//! certificate in a [`WorkloadTemplate`]; an [`X509Signer`] turns it into a signed certificate
//! (today `rampart_certs::CertificateAuthority` with an in-memory key; a KMS or HSM signer can
//! implement the same trait); [`validate_issued`] checks the result before anyone sees it.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rampart_certs::timestamp::from_unix_secs as to_system_time;
use rampart_certs::{CertificateAuthority, SpiffeId};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

/// Everything the CA decided about one workload certificate. Only the public key comes from
/// the CSR; the identity comes from the authenticated caller.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadTemplate<'a> {
    /// DER SubjectPublicKeyInfo from the verified CSR.
    pub spki_der: &'a [u8],
    /// The identity the caller proved.
    pub id: &'a SpiffeId,
    /// Lifetime (capped by the signing certificate's not-after).
    pub ttl: Duration,
    /// Issuance time.
    pub now: SystemTime,
}

/// Something that signs certificates for a CA certificate: the seam where keys can move to a
/// KMS or HSM.
pub trait X509Signer: Send + Sync {
    /// The signing CA certificate.
    fn ca_cert(&self) -> &CertificateDer<'static>;

    /// The CA certificate first, then its issuers, the root last.
    fn chain_to_root(&self) -> Vec<CertificateDer<'static>>;

    /// Signs a workload certificate (DESIGN §1 profile) for `template`.
    fn sign_workload(
        &self,
        template: &WorkloadTemplate<'_>,
    ) -> Result<CertificateDer<'static>, rampart_certs::Error>;

    /// Signs a TLS server certificate (the CA's own serving certificate).
    fn sign_server(
        &self,
        spki_der: &[u8],
        dns: &[String],
        ips: &[IpAddr],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, rampart_certs::Error>;

    /// Signs a CRL for the signing CA certificate. Signers that cannot (the default) say so;
    /// the CA then publishes no CRL of its own and refuses revocation requests.
    fn sign_crl(
        &self,
        _params: &rampart_certs::CrlParams,
    ) -> Result<rampart_certs::Crl, rampart_certs::Error> {
        Err(rampart_certs::Error::Generation(
            "this signer cannot sign CRLs".into(),
        ))
    }
}

// === impl X509Signer for CertificateAuthority ===

impl X509Signer for CertificateAuthority {
    fn ca_cert(&self) -> &CertificateDer<'static> {
        self.cert()
    }

    fn chain_to_root(&self) -> Vec<CertificateDer<'static>> {
        CertificateAuthority::chain_to_root(self)
    }

    fn sign_workload(
        &self,
        t: &WorkloadTemplate<'_>,
    ) -> Result<CertificateDer<'static>, rampart_certs::Error> {
        self.issue_workload(t.spki_der, t.id, t.ttl, t.now)
    }

    fn sign_server(
        &self,
        spki_der: &[u8],
        dns: &[String],
        ips: &[IpAddr],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, rampart_certs::Error> {
        self.issue_server(spki_der, dns, ips, None, ttl, now)
    }

    fn sign_crl(
        &self,
        params: &rampart_certs::CrlParams,
    ) -> Result<rampart_certs::Crl, rampart_certs::Error> {
        CertificateAuthority::sign_crl(self, params)
    }
}

/// What the CA needs to know about its signing certificate to validate what it signed.
#[derive(Debug, Clone)]
pub struct SigningCertFacts {
    /// DER of the signing certificate's subject name.
    pub subject_raw: Vec<u8>,
    /// The signing certificate's not-after.
    pub not_after: SystemTime,
}

impl SigningCertFacts {
    /// Reads the facts from the signing certificate.
    pub fn of(ca: &CertificateDer<'_>) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(ca.as_ref()).map_err(|e| e.to_string())?;
        Ok(SigningCertFacts {
            subject_raw: cert.subject().as_raw().to_vec(),
            not_after: to_system_time(cert.validity().not_after.timestamp()),
        })
    }
}

/// What the validator read back from an issued certificate.
#[derive(Debug, Clone)]
pub struct IssuedFacts {
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// Not-after of the issued certificate.
    pub not_after: SystemTime,
}

/// Backdating of not-before tolerated by the validator (clock skew allowance of the profile).
const MAX_BACKDATE: Duration = Duration::from_secs(600);

/// Checks a freshly signed workload certificate against its template before it is returned:
/// same public key, exactly one URI SAN equal to the identity and no other SAN, not a CA,
/// issued by the signing certificate, lifetime within the template, a non-zero serial.
pub fn validate_issued(
    der: &CertificateDer<'_>,
    t: &WorkloadTemplate<'_>,
    ca: &SigningCertFacts,
) -> Result<IssuedFacts, String> {
    let (rest, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|e| format!("unparsable: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes".into());
    }
    if cert.public_key().raw != t.spki_der {
        return Err("public key differs from the CSR's".into());
    }
    if cert.issuer().as_raw() != ca.subject_raw.as_slice() {
        return Err("issuer differs from the signing certificate's subject".into());
    }
    let mut uris = 0usize;
    let mut saw_san = false;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                saw_san = true;
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) if *u == t.id.to_string() => uris += 1,
                        other => return Err(format!("unexpected SAN {other:?}")),
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => {
                return Err("issued certificate is a CA".into());
            }
            _ => {}
        }
    }
    if !saw_san || uris != 1 {
        return Err(format!(
            "expected exactly one URI SAN {}, found {uris}",
            t.id
        ));
    }
    let not_before = to_system_time(cert.validity().not_before.timestamp());
    let not_after = to_system_time(cert.validity().not_after.timestamp());
    if not_after > ca.not_after {
        return Err("not-after beyond the signing certificate's".into());
    }
    if not_after > t.now + t.ttl + Duration::from_secs(1) {
        return Err("lifetime longer than requested".into());
    }
    if not_before + MAX_BACKDATE < t.now || not_before > t.now + Duration::from_secs(1) {
        return Err("not-before too far from the issuance time".into());
    }
    let serial = cert.raw_serial();
    if serial.iter().all(|b| *b == 0) {
        return Err("zero serial".into());
    }
    Ok(IssuedFacts {
        serial_hex: rampart_certs::serial_hex(serial),
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_certs::{KeyAlgorithm, PrivateKey, RootParams};

    fn ca() -> CertificateAuthority {
        CertificateAuthority::self_signed_root(
            &RootParams::default(),
            PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
            SystemTime::now(),
        )
        .unwrap()
    }

    #[test]
    fn validator_accepts_what_matches_the_template_and_nothing_else() {
        let ca = ca();
        let facts = SigningCertFacts::of(ca.cert()).unwrap();
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let spki = key.public_key_spki_der();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let now = SystemTime::now();
        let t = WorkloadTemplate {
            spki_der: &spki,
            id: &id,
            ttl: Duration::from_secs(3600),
            now,
        };
        let der = ca.sign_workload(&t).unwrap();
        let ok = validate_issued(&der, &t, &facts).unwrap();
        assert_eq!(ok.serial_hex.len() % 2, 0);

        // Another key.
        let other_spki = PrivateKey::generate(KeyAlgorithm::EcdsaP256)
            .unwrap()
            .public_key_spki_der();
        let t2 = WorkloadTemplate {
            spki_der: &other_spki,
            ..t
        };
        assert!(
            validate_issued(&der, &t2, &facts)
                .unwrap_err()
                .contains("public key")
        );
        // Another identity.
        let other_id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/c").unwrap();
        let t3 = WorkloadTemplate { id: &other_id, ..t };
        assert!(
            validate_issued(&der, &t3, &facts)
                .unwrap_err()
                .contains("SAN")
        );
        // Longer than the template allows.
        let t4 = WorkloadTemplate {
            ttl: Duration::from_secs(60),
            ..t
        };
        assert!(
            validate_issued(&der, &t4, &facts)
                .unwrap_err()
                .contains("lifetime")
        );
        // Signed by someone else.
        let other_facts = SigningCertFacts::of(ca_other().cert()).unwrap();
        assert!(
            validate_issued(&der, &t, &other_facts)
                .unwrap_err()
                .contains("issuer")
        );
        // A CA certificate is never a valid workload certificate.
        assert!(validate_issued(ca.cert(), &t, &facts).is_err());
    }

    fn ca_other() -> CertificateAuthority {
        CertificateAuthority::self_signed_root(
            &RootParams {
                common_name: "Other".into(),
                ..RootParams::default()
            },
            PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
            SystemTime::now(),
        )
        .unwrap()
    }
}
