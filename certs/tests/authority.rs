//! The certificate profiles the CA issues (DESIGN.md §1) and what it refuses.

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use rampart_certs::{
    CLOCK_SKEW_BACKDATE, CertInfo, CertificateAuthority, Error, IntermediateParams, KeyAlgorithm,
    MAX_WORKLOAD_CERT_TTL, PrivateKey, RootParams, TrustBundle, Usage, parse_certs_pem,
    verify_workload_chain,
};
use x509_parser::prelude::*;

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn workload_profile() {
    let now = SystemTime::now();
    let root = root(now - HOUR);
    let leaf_key = key();
    let cert = root
        .issue_workload(&leaf_key.public_key_spki_der(), &id(SLEEP), 24 * HOUR, now)
        .unwrap();
    let (_, x) = X509Certificate::from_der(cert.as_ref()).unwrap();
    let (_, ca) = X509Certificate::from_der(root.cert().as_ref()).unwrap();

    assert_eq!(x.version(), X509Version::V3);
    assert!(x.subject().iter().next().is_none(), "empty subject");
    assert_eq!(x.issuer().as_raw(), ca.subject().as_raw());
    // Exactly one URI SAN, marked critical because the subject is empty.
    let san = x.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical);
    assert_eq!(san.value.general_names, vec![GeneralName::URI(SLEEP)]);
    // EKU serverAuth + clientAuth only.
    let eku = x.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!eku.any && !eku.code_signing && !eku.email_protection && eku.other.is_empty());
    // KU digitalSignature only, for an EC key.
    let ku = x.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.digital_signature() && !ku.value.key_encipherment());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    // Not a CA, explicitly.
    let bc = x.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && !bc.value.ca);
    // SKI present; AKI is the CA's SKI.
    let ski = x
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("SKI");
    assert!(!ski.is_empty());
    let ca_ski = ca
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("CA SKI");
    let aki = x
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("AKI");
    assert_eq!(aki, ca_ski);
    // Serial: positive, 128 random bits (16 bytes, 17 with a sign byte).
    let serial = x.raw_serial();
    assert!(
        serial.len() == 16 || (serial.len() == 17 && serial[0] == 0),
        "{serial:02x?}"
    );
    assert!(serial[0] & 0x80 == 0, "positive");
    // Validity: backdated 2 minutes, 24h lifetime from now.
    let info = CertInfo::parse(&cert).unwrap();
    assert_eq!(secs(info.not_before), secs(now - CLOCK_SKEW_BACKDATE));
    assert_eq!(secs(info.not_after), secs(now + 24 * HOUR));
    assert_eq!(info.uri_sans, vec![SLEEP.to_string()]);
    assert!(!info.is_ca);
    assert_eq!(info.sha256_fingerprint.len(), 64);
    // Displayed as its value, without the DER sign byte, as `openssl x509 -serial` does.
    let value = if serial.len() == 17 {
        &serial[1..]
    } else {
        serial
    };
    assert_eq!(info.serial_hex, hex::encode(value));
}

#[test]
fn rsa_subject_key_also_gets_key_encipherment() {
    let now = SystemTime::now();
    let root = root(now);
    let rsa = PrivateKey::generate(KeyAlgorithm::Rsa2048).unwrap();
    let cert = root
        .issue_workload(&rsa.public_key_spki_der(), &id(SLEEP), HOUR, now)
        .unwrap();
    let (_, x) = X509Certificate::from_der(cert.as_ref()).unwrap();
    let ku = x.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment());
    verify_workload_chain(
        &[cert],
        &bundle(&root),
        &local_policy(),
        now,
        Usage::ServerAuth,
    )
    .unwrap();
}

#[test]
fn validity_is_clamped_to_the_ca() {
    let now = SystemTime::now();
    let root = root(now);
    // Issued right at the CA's start: not-before is not moved before the CA's not-before.
    let cert = root
        .issue_workload(
            &key().public_key_spki_der(),
            &id(SLEEP),
            HOUR,
            root.not_before(),
        )
        .unwrap();
    let info = CertInfo::parse(&cert).unwrap();
    assert_eq!(info.not_before, root.not_before());

    // Issued near the CA's end: not-after is capped at the CA's not-after.
    let inter_key = key();
    let params = IntermediateParams {
        validity: 2 * HOUR,
        ..Default::default()
    };
    let inter_cert = root
        .issue_intermediate(&params, &inter_key.public_key_spki_der(), now)
        .unwrap();
    let inter = CertificateAuthority::new(inter_cert, inter_key, root.chain_to_root()).unwrap();
    let late = now + HOUR + HOUR / 2;
    let cert = inter
        .issue_workload(&key().public_key_spki_der(), &id(SLEEP), 24 * HOUR, late)
        .unwrap();
    assert_eq!(CertInfo::parse(&cert).unwrap().not_after, inter.not_after());

    // The intermediate is itself capped at the root's not-after.
    let long = IntermediateParams {
        validity: Duration::from_secs(100 * 365 * 24 * 3600),
        ..Default::default()
    };
    let k = key();
    let c = root
        .issue_intermediate(&long, &k.public_key_spki_der(), now)
        .unwrap();
    assert_eq!(CertInfo::parse(&c).unwrap().not_after, root.not_after());
}

#[test]
fn bad_lifetimes_and_times_are_refused() {
    let now = SystemTime::now();
    let root = root(now);
    let spki = key().public_key_spki_der();
    // twin: exactly the maximum is fine.
    root.issue_workload(&spki, &id(SLEEP), MAX_WORKLOAD_CERT_TTL, now)
        .unwrap();
    for ttl in [
        Duration::ZERO,
        MAX_WORKLOAD_CERT_TTL + Duration::from_secs(1),
    ] {
        assert!(
            matches!(
                root.issue_workload(&spki, &id(SLEEP), ttl, now),
                Err(Error::InvalidTtl { .. })
            ),
            "{ttl:?}"
        );
    }
    // The CA is not valid yet / any more.
    for at in [now - 2 * HOUR, root.not_after() + HOUR] {
        assert!(matches!(
            root.issue_workload(&spki, &id(SLEEP), HOUR, at),
            Err(Error::CaNotValid { .. })
        ));
    }
    // A subject key that is not a key.
    assert!(
        root.issue_workload(b"\x30\x00", &id(SLEEP), HOUR, now)
            .is_err()
    );
}

#[test]
fn serials_are_unique() {
    let now = SystemTime::now();
    let root = root(now);
    let spki = key().public_key_spki_der();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let c = root.issue_workload(&spki, &id(SLEEP), HOUR, now).unwrap();
        assert!(seen.insert(CertInfo::parse(&c).unwrap().serial_hex));
    }
}

#[test]
fn construction_refuses_mismatched_key_and_non_ca() {
    let now = SystemTime::now();
    let root = root(now);
    // twin: the right key loads.
    let k = key();
    let inter_cert = root
        .issue_intermediate(
            &IntermediateParams::default(),
            &k.public_key_spki_der(),
            now,
        )
        .unwrap();
    CertificateAuthority::new(inter_cert.clone(), k, root.chain_to_root()).unwrap();
    assert!(matches!(
        CertificateAuthority::new(inter_cert.clone(), key(), root.chain_to_root()),
        Err(Error::KeyMismatch)
    ));
    // A leaf is not a CA.
    let leaf_key = key();
    let leaf = root
        .issue_workload(&leaf_key.public_key_spki_der(), &id(SLEEP), HOUR, now)
        .unwrap();
    assert!(matches!(
        CertificateAuthority::new(leaf, leaf_key, root.chain_to_root()),
        Err(Error::NotACa(_))
    ));
    // A chain that does not lead from the certificate to the root is refused.
    let other = common::root(now);
    let k = key();
    let inter_cert = root
        .issue_intermediate(
            &IntermediateParams::default(),
            &k.public_key_spki_der(),
            now,
        )
        .unwrap();
    assert!(matches!(
        CertificateAuthority::new(inter_cert, k, other.chain_to_root()),
        Err(Error::InvalidCertificate(_))
    ));
}

#[test]
fn every_ca_key_algorithm_issues_verifiable_leaves() {
    let now = SystemTime::now();
    for alg in [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
        KeyAlgorithm::Rsa2048,
    ] {
        let ca = CertificateAuthority::self_signed_root(
            &RootParams::default(),
            PrivateKey::generate(alg).unwrap(),
            now,
        )
        .unwrap();
        assert_eq!(ca.key_algorithm(), alg);
        let chain = workload_chain(&ca, &id(SLEEP), HOUR, now);
        assert_eq!(
            verify_workload_chain(
                &chain,
                &bundle(&ca),
                &local_policy(),
                now,
                Usage::ClientAuth
            )
            .unwrap(),
            id(SLEEP),
            "{alg}"
        );
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Plug-in mode: an openssl-made root and intermediate (PrintableString names, SEC1 and
/// PKCS#1 key files) load, and what we issue chains to them.
#[test]
fn openssl_made_ca_material_loads_and_signs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("ext.cnf"),
        "[ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "root-key.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "root-key.pem",
            "-days",
            "30",
            "-subj",
            "/C=US/O=Example Org/CN=Example Root",
            "-out",
            "root-cert.pem",
        ],
    );
    openssl(d, &["genrsa", "-traditional", "-out", "ca-key.pem", "2048"]);
    openssl(
        d,
        &[
            "req",
            "-new",
            "-key",
            "ca-key.pem",
            "-subj",
            "/O=Example Org/CN=Example Intermediate",
            "-out",
            "ca.csr",
        ],
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "ca.csr",
            "-CA",
            "root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-CAcreateserial",
            "-days",
            "10",
            "-extfile",
            "ext.cnf",
            "-extensions",
            "ca",
            "-out",
            "ca-cert.pem",
        ],
    );
    let read = |name: &str| std::fs::read_to_string(d.join(name)).unwrap();
    assert!(read("root-key.pem").contains("BEGIN EC PRIVATE KEY"));
    assert!(read("ca-key.pem").contains("BEGIN RSA PRIVATE KEY"));

    // The SEC1 root key and the PKCS#1 intermediate key both import.
    let root_key = PrivateKey::from_pkcs8_pem(&read("root-key.pem")).unwrap();
    assert_eq!(root_key.algorithm(), KeyAlgorithm::EcdsaP256);
    let ca_key = PrivateKey::from_pkcs8_pem(&read("ca-key.pem")).unwrap();
    assert_eq!(ca_key.algorithm(), KeyAlgorithm::Rsa2048);

    let root_cert = parse_certs_pem(&read("root-cert.pem")).unwrap();
    let ca_cert = parse_certs_pem(&read("ca-cert.pem")).unwrap().remove(0);
    let ca = CertificateAuthority::new(ca_cert, ca_key, root_cert.clone()).unwrap();
    let now = SystemTime::now();
    let chain = workload_chain(&ca, &id(SLEEP), HOUR, now);
    let bundle = TrustBundle::from_der(root_cert).unwrap();
    assert_eq!(
        verify_workload_chain(&chain, &bundle, &local_policy(), now, Usage::ClientAuth).unwrap(),
        id(SLEEP)
    );
    // And openssl agrees.
    std::fs::write(d.join("leaf.pem"), rampart_certs::certs_to_pem(&chain[..1])).unwrap();
    std::fs::write(
        d.join("untrusted.pem"),
        rampart_certs::certs_to_pem(&chain[1..]),
    )
    .unwrap();
    openssl(
        d,
        &[
            "verify",
            "-CAfile",
            "root-cert.pem",
            "-untrusted",
            "untrusted.pem",
            "leaf.pem",
        ],
    );
}
