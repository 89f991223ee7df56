//! Mapping between X.509 algorithm identifiers and ring / rcgen algorithms.

use ring::signature as sig;
use x509_parser::oid_registry as oids;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};

use crate::error::Error;

/// The kinds of subject public key we accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpkiKind {
    /// ECDSA on P-256.
    EcP256,
    /// ECDSA on P-384.
    EcP384,
    /// Ed25519.
    Ed25519,
    /// RSA (PKCS #1 rsaEncryption).
    Rsa,
}

impl SpkiKind {
    /// Classifies a parsed SubjectPublicKeyInfo.
    pub fn of(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, Error> {
        let alg = &spki.algorithm.algorithm;
        if *alg == oids::OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| x509_parser::der_parser::asn1_rs::Oid::try_from(p).ok())
                .ok_or_else(|| {
                    Error::UnsupportedAlgorithm("EC public key without a named curve".into())
                })?;
            if curve == oids::OID_EC_P256 {
                Ok(SpkiKind::EcP256)
            } else if curve == oids::OID_NIST_EC_P384 {
                Ok(SpkiKind::EcP384)
            } else {
                Err(Error::UnsupportedAlgorithm(format!("EC curve {curve}")))
            }
        } else if *alg == oids::OID_SIG_ED25519 {
            Ok(SpkiKind::Ed25519)
        } else if *alg == oids::OID_PKCS1_RSAENCRYPTION {
            Ok(SpkiKind::Rsa)
        } else {
            Err(Error::UnsupportedAlgorithm(format!(
                "public key algorithm {alg}"
            )))
        }
    }

    /// The kind of public key a private key of `alg` has.
    pub(crate) fn of_key(alg: crate::KeyAlgorithm) -> Self {
        use crate::KeyAlgorithm as K;
        match alg {
            K::EcdsaP256 => SpkiKind::EcP256,
            K::EcdsaP384 => SpkiKind::EcP384,
            K::Ed25519 => SpkiKind::Ed25519,
            K::Rsa2048 | K::Rsa3072 | K::Rsa4096 => SpkiKind::Rsa,
        }
    }

    /// The rcgen algorithm whose key OIDs describe this kind of public key.
    pub(crate) fn rcgen_alg(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            SpkiKind::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            SpkiKind::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            SpkiKind::Ed25519 => &rcgen::PKCS_ED25519,
            SpkiKind::Rsa => &rcgen::PKCS_RSA_SHA256,
        }
    }

    /// The ring verification algorithm for a signature of `sig_alg` made by this key kind.
    pub fn ring_verifier(
        self,
        sig_alg: &AlgorithmIdentifier<'_>,
    ) -> Result<&'static dyn sig::VerificationAlgorithm, Error> {
        let oid = &sig_alg.algorithm;
        let found: Option<&'static dyn sig::VerificationAlgorithm> = match self {
            SpkiKind::EcP256 if *oid == oids::OID_SIG_ECDSA_WITH_SHA256 => {
                Some(&sig::ECDSA_P256_SHA256_ASN1)
            }
            SpkiKind::EcP256 if *oid == oids::OID_SIG_ECDSA_WITH_SHA384 => {
                Some(&sig::ECDSA_P256_SHA384_ASN1)
            }
            SpkiKind::EcP384 if *oid == oids::OID_SIG_ECDSA_WITH_SHA256 => {
                Some(&sig::ECDSA_P384_SHA256_ASN1)
            }
            SpkiKind::EcP384 if *oid == oids::OID_SIG_ECDSA_WITH_SHA384 => {
                Some(&sig::ECDSA_P384_SHA384_ASN1)
            }
            SpkiKind::Ed25519 if *oid == oids::OID_SIG_ED25519 => Some(&sig::ED25519),
            SpkiKind::Rsa if *oid == oids::OID_PKCS1_SHA256WITHRSA => {
                Some(&sig::RSA_PKCS1_2048_8192_SHA256)
            }
            SpkiKind::Rsa if *oid == oids::OID_PKCS1_SHA384WITHRSA => {
                Some(&sig::RSA_PKCS1_2048_8192_SHA384)
            }
            SpkiKind::Rsa if *oid == oids::OID_PKCS1_SHA512WITHRSA => {
                Some(&sig::RSA_PKCS1_2048_8192_SHA512)
            }
            _ => None,
        };
        found.ok_or_else(|| {
            Error::UnsupportedAlgorithm(format!("signature algorithm {oid} with a {self:?} key"))
        })
    }
}
