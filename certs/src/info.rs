//! Read-only facts about a certificate, for display, metrics and checks.

use std::net::IpAddr;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::error::Error;
/// Seconds since the Unix epoch (possibly negative) as a `SystemTime`, for this crate's
/// certificate and CRL parsers (`crate::timestamp` is the one implementation).
pub(crate) use crate::timestamp::from_unix_secs as system_time;

/// What a certificate says, parsed once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number as lowercase hex of its value (see [`serial_hex`]), as
    /// `openssl x509 -serial` prints it. The CA's audit log uses the same form.
    pub serial_hex: String,
    /// Subject distinguished name (RFC 4514-style string).
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// basicConstraints cA=true.
    pub is_ca: bool,
    /// URI subject alternative names, in order.
    pub uri_sans: Vec<String>,
    /// DNS subject alternative names, in order.
    pub dns_sans: Vec<String>,
    /// IP address subject alternative names, in order.
    pub ip_sans: Vec<IpAddr>,
    /// SHA-256 of the DER, lowercase hex.
    pub sha256_fingerprint: String,
}

impl CertInfo {
    /// Parses a DER certificate.
    pub fn parse(cert: &CertificateDer<'_>) -> Result<CertInfo, Error> {
        let x509 = parse_x509(cert)?;
        let mut uri_sans = Vec::new();
        let mut dns_sans = Vec::new();
        let mut ip_sans = Vec::new();
        if let Some(san) = x509
            .subject_alternative_name()
            .map_err(|e| Error::InvalidCertificate(format!("subjectAltName: {e}")))?
        {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => uri_sans.push((*u).to_owned()),
                    GeneralName::DNSName(d) => dns_sans.push((*d).to_owned()),
                    GeneralName::IPAddress(b) => {
                        if let Some(ip) = ip_from_bytes(b) {
                            ip_sans.push(ip);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(CertInfo {
            serial_hex: serial_hex(x509.raw_serial()),
            subject: x509.subject().to_string(),
            issuer: x509.issuer().to_string(),
            not_before: system_time(x509.validity().not_before.timestamp()),
            not_after: system_time(x509.validity().not_after.timestamp()),
            is_ca: x509.is_ca(),
            uri_sans,
            dns_sans,
            ip_sans,
            sha256_fingerprint: sha256_hex(cert.as_ref()),
        })
    }
}

pub(crate) fn parse_x509<'a>(cert: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, Error> {
    let (rest, x509) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| Error::InvalidCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::InvalidCertificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    Ok(x509)
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
        _ => None,
    }
}

pub(crate) use crate::timestamp::rfc3339 as rfc3339_of;

/// Lowercase hex of a certificate serial number's value, from the DER INTEGER's content
/// bytes: the `00` sign byte a DER encoder adds when the top bit is set is dropped, so the
/// result matches `openssl x509 -serial` (in lowercase) whatever the value.
pub fn serial_hex(der_integer_content: &[u8]) -> String {
    let pad = der_integer_content
        .iter()
        .take_while(|b| **b == 0)
        .count()
        .min(der_integer_content.len().saturating_sub(1));
    hex::encode(&der_integer_content[pad..])
}

#[cfg(test)]
mod tests {
    #[test]
    fn serial_hex_drops_only_the_der_sign_byte() {
        assert_eq!(super::serial_hex(&[0x00, 0xc3, 0xd7]), "c3d7");
        assert_eq!(super::serial_hex(&[0x12, 0x00]), "1200");
        assert_eq!(super::serial_hex(&[0x00]), "00");
    }
}
