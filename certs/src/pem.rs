//! PEM in and out. Decoding uses `rustls-pki-types` (`PemObject`); encoding is ours.

use base64::Engine as _;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::{PemObject, SectionKind};

use crate::error::Error;

/// Encodes `der` as one PEM section with the given label, 64 base64 characters a line.
pub(crate) fn encode_pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Parses every `CERTIFICATE` section of a PEM text, in order. At least one is required;
/// a section of any other kind (a private key, a CSR) is an error, so a key pasted into a
/// certificate file is caught rather than ignored.
pub fn parse_certs_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let mut certs = Vec::new();
    for section in <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(pem.as_bytes()) {
        let (kind, der) = section.map_err(|e| Error::InvalidPem(e.to_string()))?;
        if kind != SectionKind::Certificate {
            return Err(Error::InvalidPem(format!(
                "expected only CERTIFICATE sections, found {kind:?}"
            )));
        }
        certs.push(CertificateDer::from(der));
    }
    if certs.is_empty() {
        return Err(Error::NoCertificate);
    }
    Ok(certs)
}

/// Encodes certificates as concatenated PEM `CERTIFICATE` sections, in the given order.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|c| encode_pem("CERTIFICATE", c.as_ref()))
        .collect()
}

/// Encodes a CSR as PEM (`CERTIFICATE REQUEST`).
pub(crate) fn csr_to_pem(der: &[u8]) -> String {
    encode_pem("CERTIFICATE REQUEST", der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_order() {
        let a = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let b = CertificateDer::from(vec![0x30u8; 200]);
        let pem = certs_to_pem(&[a.clone(), b.clone()]);
        for line in pem.lines() {
            assert!(line.len() <= 64);
        }
        assert_eq!(parse_certs_pem(&pem).unwrap(), vec![a, b]);
    }

    #[test]
    fn refusals() {
        assert!(matches!(parse_certs_pem(""), Err(Error::NoCertificate)));
        assert!(matches!(
            parse_certs_pem("just text\n"),
            Err(Error::NoCertificate)
        ));
        let key = encode_pem("PRIVATE KEY", &[1, 2, 3]);
        assert!(matches!(parse_certs_pem(&key), Err(Error::InvalidPem(_))));
        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(parse_certs_pem(broken).is_err());
        let unterminated = "-----BEGIN CERTIFICATE-----\nMAMCAQE=\n";
        assert!(parse_certs_pem(unterminated).is_err());
    }
}
