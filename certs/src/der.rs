//! The few DER encodings we write by hand: wrapping PKCS#1 and SEC1 keys as PKCS#8.

use x509_parser::der_parser::ber::BerObjectContent;
use x509_parser::der_parser::der::parse_der;

use crate::error::Error;

/// DER of OID 1.2.840.113549.1.1.1 (rsaEncryption).
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// DER of OID 1.2.840.10045.2.1 (id-ecPublicKey).
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    push_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

fn pkcs8(alg_id_content: &[u8], key: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00]; // version 0
    body.extend(tlv(0x30, alg_id_content));
    body.extend(tlv(0x04, key));
    let out = tlv(0x30, &body);
    zeroize::Zeroize::zeroize(&mut body);
    out
}

/// Wraps a PKCS#1 RSAPrivateKey as PKCS#8 PrivateKeyInfo.
pub(crate) fn pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    let mut alg = tlv(0x06, OID_RSA_ENCRYPTION);
    alg.extend_from_slice(&[0x05, 0x00]);
    pkcs8(&alg, pkcs1)
}

/// Wraps a SEC1 ECPrivateKey (which must name its curve) as PKCS#8 PrivateKeyInfo.
pub(crate) fn sec1_to_pkcs8(sec1: &[u8]) -> Result<Vec<u8>, Error> {
    let bad = |why: &str| Error::InvalidKey(format!("SEC1 EC key: {why}"));
    let (_, obj) = parse_der(sec1).map_err(|_| bad("not DER"))?;
    let BerObjectContent::Sequence(items) = &obj.content else {
        return Err(bad("not a SEQUENCE"));
    };
    // parameters [0] EXPLICIT ECParameters (a named curve OID).
    let curve = items
        .iter()
        .find(|o| o.header.is_contextspecific() && o.header.tag().0 == 0)
        .ok_or_else(|| bad("the curve parameters are missing"))?;
    let inner = match &curve.content {
        BerObjectContent::Unknown(any) => any.data,
        _ => return Err(bad("unexpected curve parameters")),
    };
    let (_, oid) = parse_der(inner).map_err(|_| bad("curve parameters are not DER"))?;
    let BerObjectContent::OID(oid) = &oid.content else {
        return Err(bad("curve parameters are not a named curve"));
    };
    let mut alg = tlv(0x06, OID_EC_PUBLIC_KEY);
    alg.extend(tlv(0x06, oid.as_bytes()));
    Ok(pkcs8(&alg, sec1))
}
