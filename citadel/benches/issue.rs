//! The in-process issuance path beside the raw crypto it cannot avoid, in the same run.
//!
//! - `raw_ring/verify_csr_sig+sign_cert`: one ECDSA P-256 signature verification (the CSR's
//!   self-signature) plus one ECDSA P-256 signature (the certificate), with ring directly.
//! - `citadel/authn+issue`: bearer-token authentication (cached, as for a caller that reuses
//!   its token) + parse and verify the CSR + identity and TTL policy + template + sign +
//!   validate the result + PEM-encode the chain. Everything CreateCertificate does except the
//!   transport and the audit fsync.
//!
//! `cargo bench -p rampart-citadel --bench issue -- --measurement-time 3 --warm-up-time 1`

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group, criterion_main};
use rampart_certs::jwt::JwtSigner;
use rampart_certs::{
    CertificateAuthority, KeyAlgorithm, PrivateKey, RootParams, SpiffeId, TrustDomain,
};
use rampart_citadel::{Authority, IssuePolicy, MaterialSource, TokenAuthenticator, issue};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};

fn bench(c: &mut Criterion) {
    let td: TrustDomain = "cluster.local".parse().unwrap();
    let now = SystemTime::now();

    // Raw crypto: what any CA must do per certificate.
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let ca_key = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .unwrap();
    let pkcs8b =
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let csr_key = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8b.as_ref(),
        &rng,
    )
    .unwrap();
    let csr_info = vec![0x5a_u8; 180]; // about the size of a CertificationRequestInfo
    let tbs = vec![0xa5_u8; 420]; // about the size of a workload TBSCertificate
    let csr_sig = csr_key.sign(&rng, &csr_info).unwrap();
    let csr_pub = signature::UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        csr_key.public_key().as_ref().to_vec(),
    );

    // Citadel.
    let root = CertificateAuthority::self_signed_root(
        &RootParams::default(),
        PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        now,
    )
    .unwrap();
    let root_der = root.cert().clone();
    let authority = Authority::new(
        Arc::new(root),
        vec![root_der],
        &td,
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
    let tokens = TokenAuthenticator::new(issuers, "istio-ca", &td);
    let secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let token = signer
        .sign(
            &serde_json::json!({"iss": "iss", "sub": "system:serviceaccount:default:web",
            "aud": "istio-ca", "exp": secs + 3600}),
        )
        .unwrap();
    let id = SpiffeId::istio(&td, "default", "web").unwrap();
    let csr =
        rampart_certs::build_csr(&PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &id)
            .unwrap();
    tokens.authenticate(&token, now).unwrap();

    let mut g = c.benchmark_group("issuance");
    g.bench_function("raw_ring/verify_csr_sig+sign_cert", |b| {
        b.iter(|| {
            csr_pub
                .verify(black_box(&csr_info), csr_sig.as_ref())
                .unwrap();
            black_box(ca_key.sign(&rng, black_box(&tbs)).unwrap());
        })
    });
    g.bench_function("citadel/authn+issue", |b| {
        b.iter(|| {
            let now = SystemTime::now();
            let caller = tokens.authenticate(black_box(&token), now).unwrap();
            black_box(issue(&authority, &policy, black_box(&csr), 3600, &caller, now).unwrap());
        })
    });
    g.bench_function("citadel/authn+issue(uncached token)", |b| {
        b.iter(|| {
            let now = SystemTime::now();
            let fresh = TokenAuthenticator::new(
                [("iss".to_owned(), signer.jwks().unwrap())]
                    .into_iter()
                    .collect(),
                "istio-ca",
                &td,
            );
            let caller = fresh.authenticate(black_box(&token), now).unwrap();
            black_box(issue(&authority, &policy, black_box(&csr), 3600, &caller, now).unwrap());
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
