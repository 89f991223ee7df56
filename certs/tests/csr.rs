//! CSRs: our own round trip, interop with openssl, spoofed CSRs, and proof that a CA uses
//! nothing from a CSR but its public key.

mod common;

use std::time::SystemTime;

use common::*;
use rampart_certs::{Error, KeyAlgorithm, PrivateKey, VerifiedCsr, build_csr, build_csr_der};
use x509_parser::prelude::*;

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";

fn replace_once(haystack: &mut [u8], needle: &[u8], with: &[u8]) {
    assert_eq!(needle.len(), with.len());
    let at = haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present");
    haystack[at..at + needle.len()].copy_from_slice(with);
}

#[test]
fn round_trip_for_every_key_algorithm() {
    for alg in [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
        KeyAlgorithm::Rsa2048,
    ] {
        let key = PrivateKey::generate(alg).unwrap();
        let pem = build_csr(&key, &id(SLEEP)).unwrap();
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{alg}"
        );
        let csr = VerifiedCsr::from_pem(&pem).unwrap();
        assert_eq!(
            csr.public_key_spki_der(),
            key.public_key_spki_der(),
            "{alg}"
        );
        assert_eq!(csr.requested_uris(), [SLEEP.to_string()]);
        assert_eq!(csr.requested_spiffe_id().unwrap(), id(SLEEP));
    }
}

#[test]
fn openssl_made_csr_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let key_path = dir.path().join("key.pem");
    key.write_pem_file(&key_path).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["req", "-new", "-key"])
        .arg(&key_path)
        .args(["-subj", "/O=ignored/CN=ignored", "-addext"])
        .arg(format!("subjectAltName=URI:{SLEEP}"))
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csr = VerifiedCsr::from_pem(std::str::from_utf8(&out.stdout).unwrap()).unwrap();
    assert_eq!(csr.requested_spiffe_id().unwrap(), id(SLEEP));
    assert_eq!(csr.public_key_spki_der(), key.public_key_spki_der());
}

#[test]
fn tampered_signature_is_refused() {
    let key = key();
    let der = build_csr_der(&key, &id(SLEEP)).unwrap();
    // twin: untouched, it verifies.
    VerifiedCsr::from_der(&der).unwrap();
    // The signature is the last element: flip a bit in its final byte.
    let mut bad = der.clone();
    let n = bad.len();
    bad[n - 1] ^= 0x01;
    assert!(matches!(
        VerifiedCsr::from_der(&bad),
        Err(Error::CsrSignatureInvalid)
    ));
}

#[test]
fn spoofed_identity_is_refused() {
    // Someone edits the requested SAN after signing (same length, so the DER stays valid).
    let key = key();
    let mut der = build_csr_der(&key, &id(SLEEP)).unwrap();
    replace_once(&mut der, b"sa/sleep", b"sa/admin");
    assert!(matches!(
        VerifiedCsr::from_der(&der),
        Err(Error::CsrSignatureInvalid)
    ));
}

#[test]
fn someone_elses_public_key_is_refused() {
    // A CSR signed by our key but claiming the victim's public key: proof of possession fails.
    let ours = key();
    let victim = key();
    let mut der = build_csr_der(&ours, &id(SLEEP)).unwrap();
    replace_once(
        &mut der,
        &ours.public_key_spki_der(),
        &victim.public_key_spki_der(),
    );
    assert!(matches!(
        VerifiedCsr::from_der(&der),
        Err(Error::CsrSignatureInvalid)
    ));
}

#[test]
fn garbage_is_refused() {
    assert!(matches!(
        VerifiedCsr::from_der(b"\x30\x03\x02\x01\x00"),
        Err(Error::InvalidCsr(_))
    ));
    assert!(VerifiedCsr::from_der(&[]).is_err());
    assert!(VerifiedCsr::from_pem("no pem here").is_err());
    let mut der = build_csr_der(&key(), &id(SLEEP)).unwrap();
    der.push(0);
    assert!(matches!(
        VerifiedCsr::from_der(&der),
        Err(Error::InvalidCsr(_))
    ));
}

#[test]
fn uri_san_count_must_be_one() {
    let pair = rcgen::KeyPair::generate().unwrap();
    for (sans, want) in [
        (vec![], 0usize),
        (vec![uri(SLEEP), uri("spiffe://cluster.local/ns/a/sa/b")], 2),
    ] {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = sans;
        let pem = p.serialize_request(&pair).unwrap().pem().unwrap();
        let csr = VerifiedCsr::from_pem(&pem).unwrap();
        match csr.requested_spiffe_id() {
            Err(Error::CsrUriSanCount { found }) => assert_eq!(found, want),
            other => panic!("want CsrUriSanCount({want}), got {other:?}"),
        }
    }
}

/// A CSR asking to be a CA, to sign certificates, for code signing, for a DNS name and
/// with a private extension gets none of it: only its key and (via the caller) its SPIFFE
/// ID make it into the certificate.
#[test]
fn requested_extensions_are_never_copied() {
    let now = SystemTime::now();
    let ca = root(now);
    let pair = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
    p.subject_alt_names.push(uri(SLEEP));
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
    p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 4, 1, 99999, 1],
        vec![0x05, 0x00],
    )];
    let pem = p.serialize_request(&pair).unwrap().pem().unwrap();

    let csr = VerifiedCsr::from_pem(&pem).unwrap();
    assert_eq!(csr.requested_uris(), [SLEEP.to_string()]);
    let id = csr.requested_spiffe_id().unwrap();
    let cert = ca
        .issue_workload(csr.public_key_spki_der(), &id, HOUR, now)
        .unwrap();

    let (_, x509) = X509Certificate::from_der(cert.as_ref()).unwrap();
    assert_eq!(x509.public_key().raw, csr.public_key_spki_der());
    assert!(!x509.is_ca());
    let bc = x509
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca);
    let ku = x509.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    let eku = x509.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.code_signing);
    let san = x509.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(san.general_names, vec![GeneralName::URI(SLEEP)]);
    let private = x509_parser::der_parser::oid!(1.3.6.1.4.1.99999.1);
    assert!(x509.extensions().iter().all(|e| e.oid != private));
}

/// A second extensionRequest attribute cannot smuggle in a second identity: either the
/// CSR is refused outright or both URIs are seen (and "exactly one" then fails).
#[test]
fn second_extension_request_attribute_is_seen() {
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        assert!(content.len() < 128);
        let mut v = vec![tag, content.len() as u8];
        v.extend_from_slice(content);
        v
    }
    let admin = b"spiffe://cluster.local/ns/kube-system/sa/admin";
    let general_names = tlv(0x30, &tlv(0x86, admin));
    let mut ext = tlv(0x06, &[0x55, 0x1d, 0x11]); // subjectAltName
    ext.extend(tlv(0x04, &general_names));
    let values = tlv(0x31, &tlv(0x30, &tlv(0x30, &ext)));

    let pair = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![uri(SLEEP)];
    let attr = rcgen::Attribute {
        oid: &[1, 2, 840, 113549, 1, 9, 14],
        values,
    };
    let pem = p
        .serialize_request_with_attributes(&pair, vec![attr])
        .unwrap()
        .pem()
        .unwrap();
    match VerifiedCsr::from_pem(&pem) {
        Err(Error::InvalidCsr(_)) => {}
        Err(other) => panic!("unexpected error {other}"),
        Ok(csr) => {
            assert_eq!(csr.requested_uris().len(), 2, "{:?}", csr.requested_uris());
            assert!(matches!(
                csr.requested_spiffe_id(),
                Err(Error::CsrUriSanCount { found: 2 })
            ));
        }
    }
}
