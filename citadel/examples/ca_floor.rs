//! The per-certificate work the CA cannot avoid, as a plain loop for instruction counting
//! (`benches/profile/callgrind-ca.sh` runs it under callgrind twice, with N and 2N
//! iterations, and divides the difference by N).
//!
//! - `floor N`: N times one ECDSA P-256 verification of a real CSR's self-signature (over its
//!   real CertificationRequestInfo) plus one ECDSA P-256 signature over a real workload
//!   TBSCertificate, with ring (what rcgen and `VerifiedCsr` call).
//! - `issue N`: N times `rampart_citadel::issue` (PEM decode, CSR parse + verify, identity
//!   and TTL rules, template, rcgen + ring sign, post-issuance validation, PEM chain) after
//!   a cached bearer-token authentication: the in-process path without transport and audit.
//!
//! `cargo run --release -p rampart-citadel --example ca_floor -- floor 200`

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rampart_certs::jwt::JwtSigner;
use rampart_certs::{
    CertificateAuthority, KeyAlgorithm, PrivateKey, RootParams, SpiffeId, TrustDomain,
};
use rampart_citadel::{Authority, IssuePolicy, MaterialSource, TokenAuthenticator, issue};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair};
use x509_parser::prelude::{FromDer, X509Certificate};

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "floor".into());
    let n: usize = args
        .next()
        .map(|s| s.parse().expect("N: a number"))
        .unwrap_or(100);
    let td: TrustDomain = "cluster.local".parse().unwrap();
    let now = SystemTime::now();
    let id = SpiffeId::istio(&td, "bench", "load").unwrap();
    let csr_pem =
        rampart_certs::build_csr(&PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &id)
            .unwrap();
    let root = CertificateAuthority::self_signed_root(
        &RootParams::default(),
        PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        now,
    )
    .unwrap();
    match mode.as_str() {
        "floor" => floor(&root, &id, n),
        "issue" => issue_loop(&csr_pem, root, &td, n),
        other => panic!("mode {other:?}: floor or issue"),
    }
}

fn floor(root: &CertificateAuthority, id: &SpiffeId, n: usize) {
    let csr_der =
        rampart_certs::build_csr_der(&PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), id)
            .unwrap();
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&csr_der).unwrap();
    let info = csr.certification_request_info.raw.to_vec();
    let sig = csr.signature_value.data.to_vec();
    let csr_pub = signature::UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        csr.certification_request_info
            .subject_pki
            .subject_public_key
            .data
            .to_vec(),
    );
    // A real workload TBSCertificate, as the CA signs it.
    let spki = PrivateKey::generate(KeyAlgorithm::EcdsaP256)
        .unwrap()
        .public_key_spki_der();
    let leaf = root
        .issue_workload(&spki, id, Duration::from_secs(3600), SystemTime::now())
        .unwrap();
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).unwrap();
    let tbs = cert.tbs_certificate.as_ref().to_vec();
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let ca_key = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .unwrap();
    let (start, cpu_start) = (std::time::Instant::now(), own_cpu_seconds());
    for _ in 0..n {
        csr_pub.verify(black_box(&info), black_box(&sig)).unwrap();
        black_box(ca_key.sign(&rng, black_box(&tbs)).unwrap());
    }
    let (elapsed, cpu) = (start.elapsed(), own_cpu_seconds() - cpu_start);
    println!(
        "floor: {n} x (P-256 verify of a {}-byte CSR info + P-256 sign of a {}-byte TBS): \
         {:.1} us CPU each ({:.1} us wall clock)",
        info.len(),
        tbs.len(),
        cpu * 1e6 / n.max(1) as f64,
        elapsed.as_secs_f64() * 1e6 / n.max(1) as f64
    );
}

fn issue_loop(csr_pem: &str, root: CertificateAuthority, td: &TrustDomain, n: usize) {
    let now = SystemTime::now();
    let root_der = root.cert().clone();
    let authority = Authority::new(
        Arc::new(root),
        vec![root_der],
        td,
        MaterialSource::SelfSigned("/nonexistent".into()),
        [0; 32],
        now,
    )
    .unwrap();
    let policy = IssuePolicy {
        default_ttl: Duration::from_secs(86400),
        max_ttl: Duration::from_secs(90 * 86400),
        max_csr_bytes: 16 * 1024,
    };
    let jwt_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let signer = JwtSigner::new(&jwt_key, "k").unwrap();
    let mut issuers = HashMap::new();
    issuers.insert("iss".to_owned(), signer.jwks().unwrap());
    let tokens = TokenAuthenticator::new(issuers, "istio-ca", td);
    let secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let token = signer
        .sign(
            &serde_json::json!({"iss": "iss", "sub": "system:serviceaccount:bench:load",
            "aud": "istio-ca", "exp": secs + 3600}),
        )
        .unwrap();
    tokens.authenticate(&token, now).unwrap();
    for _ in 0..n {
        let now = SystemTime::now();
        let caller = tokens.authenticate(black_box(&token), now).unwrap();
        black_box(issue(&authority, &policy, black_box(csr_pem), 3600, &caller, now).unwrap());
    }
    println!("issue: {n} certificates");
}

/// This process's user + system CPU time so far, from `/proc/self/stat` (fields 14 and 15,
/// in USER_HZ ticks of 10 ms), as `rampart ca bench --pid` reads the CA's; 0 off Linux.
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (tick(11) + tick(12)) as f64 / 100.0
}
