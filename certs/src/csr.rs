//! Certificate signing requests: build one (URI SAN only), and parse + verify one.
//!
//! A CA must use nothing from a CSR but its public key (and, as information, the SAN it
//! asks for): rcgen's `CertificateSigningRequestParams::from_der` copies the requested
//! extensions, so we parse with x509-parser and verify the self-signature with ring
//! ourselves, over the exact CertificationRequestInfo bytes.

use rustls_pki_types::pem::{PemObject, SectionKind};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::algs::SpkiKind;
use crate::error::Error;
use crate::key::PrivateKey;
use crate::spiffe::SpiffeId;

/// Builds a PEM CSR for `id`, signed by `key`: an empty subject, one URI SAN, nothing else.
pub fn build_csr(key: &PrivateKey, id: &SpiffeId) -> Result<String, Error> {
    Ok(crate::pem::csr_to_pem(&build_csr_der(key, id)?))
}

/// Builds a DER CSR for `id` (see [`build_csr`]).
pub fn build_csr_der(key: &PrivateKey, id: &SpiffeId) -> Result<Vec<u8>, Error> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(id.to_string())
        .map_err(|e| Error::Generation(e.to_string()))?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params
        .serialize_request(key.rcgen_pair())
        .map_err(|e| Error::Generation(e.to_string()))?;
    Ok(csr.der().to_vec())
}

/// A CSR whose self-signature verified. Holds only what a CA may use: the public key, and
/// the URI SANs it asked for (informational: the CA decides the identity).
#[derive(Clone, Debug)]
pub struct VerifiedCsr {
    spki: Vec<u8>,
    uris: Vec<String>,
}

// === impl VerifiedCsr ===

impl VerifiedCsr {
    /// Parses a PEM CSR (`CERTIFICATE REQUEST`; the legacy `NEW CERTIFICATE REQUEST` label
    /// is accepted too) and verifies it.
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        let der = csr_der_from_pem(pem)?;
        Self::from_der(&der)
    }

    /// Parses a DER CSR and verifies its self-signature.
    pub fn from_der(der: &[u8]) -> Result<Self, Error> {
        let (rest, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| Error::InvalidCsr(e.to_string()))?;
        if !rest.is_empty() {
            return Err(Error::InvalidCsr("trailing bytes after the CSR".into()));
        }
        let info = &csr.certification_request_info;
        let spki = &info.subject_pki;
        let kind = SpkiKind::of(spki)?;
        let verifier = kind.ring_verifier(&csr.signature_algorithm)?;
        if csr.signature_value.unused_bits != 0 {
            return Err(Error::CsrSignatureInvalid);
        }
        ring::signature::UnparsedPublicKey::new(verifier, spki.subject_public_key.data.as_ref())
            .verify(info.raw, csr.signature_value.data.as_ref())
            .map_err(|_| Error::CsrSignatureInvalid)?;

        // URI SANs from every extensionRequest attribute and every SAN extension in it, so
        // a CSR cannot hide a second identity in a second attribute.
        let mut uris = Vec::new();
        for attr in info.iter_attributes() {
            let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
                continue;
            };
            for ext in &req.extensions {
                let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() else {
                    continue;
                };
                for name in &san.general_names {
                    if let GeneralName::URI(uri) = name {
                        uris.push((*uri).to_owned());
                    }
                }
            }
        }
        Ok(Self {
            spki: spki.raw.to_vec(),
            uris,
        })
    }

    /// The requester's public key, DER SubjectPublicKeyInfo exactly as in the CSR.
    pub fn public_key_spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// The URI SANs the CSR asked for, in order (informational).
    pub fn requested_uris(&self) -> &[String] {
        &self.uris
    }

    /// The one SPIFFE ID the CSR asks for: exactly one URI SAN that parses.
    pub fn requested_spiffe_id(&self) -> Result<SpiffeId, Error> {
        match self.uris.as_slice() {
            [one] => SpiffeId::parse(one),
            other => Err(Error::CsrUriSanCount { found: other.len() }),
        }
    }
}

fn csr_der_from_pem(pem: &str) -> Result<Vec<u8>, Error> {
    for section in <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(pem.as_bytes()) {
        let (kind, der) = section.map_err(|e| Error::InvalidPem(e.to_string()))?;
        if kind == SectionKind::Csr {
            return Ok(der);
        }
    }
    // pki-types does not know the legacy label; accept it by hand.
    let legacy = "-----BEGIN NEW CERTIFICATE REQUEST-----";
    if let Some(start) = pem.find(legacy) {
        let body = &pem[start + legacy.len()..];
        if let Some(end) = body.find("-----END NEW CERTIFICATE REQUEST-----") {
            let b64: String = body[..end].split_whitespace().collect();
            return base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
                .map_err(|e| Error::InvalidPem(format!("legacy CSR: {e}")));
        }
    }
    Err(Error::InvalidPem("no CERTIFICATE REQUEST section".into()))
}
