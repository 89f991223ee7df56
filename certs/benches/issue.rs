//! The CA hot path beside its floor, in the same run:
//!
//! - `ring_p256_sign_verify`: one raw ring ECDSA P-256 signature plus one verification
//!   (the cryptographic work the CA cannot avoid: check the CSR, sign the certificate);
//! - `csr_verify_and_issue`: `VerifiedCsr::from_pem` + `CertificateAuthority::issue_workload`
//!   (PEM decode, CSR parse, self-signature check, template, DER encoding, signature).
//!
//! Run: `cargo bench -p rampart-certs --bench issue -- --measurement-time 3 --warm-up-time 1`

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use rampart_certs::{
    CertificateAuthority, KeyAlgorithm, PrivateKey, RootParams, SpiffeId, VerifiedCsr, build_csr,
};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ca_hot_path");

    // Floor: raw ring sign + verify over a certificate-sized message.
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .unwrap();
    let msg = vec![0x5au8; 400];
    let sig = pair.sign(&rng, &msg).unwrap();
    let public = signature::UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        pair.public_key().as_ref().to_vec(),
    );
    g.bench_function("ring_p256_sign_verify", |b| {
        b.iter(|| {
            public.verify(black_box(&msg), sig.as_ref()).unwrap();
            black_box(pair.sign(&rng, black_box(&msg)).unwrap());
        })
    });

    // The CA path.
    let now = SystemTime::now();
    let ca = CertificateAuthority::self_signed_root(
        &RootParams::default(),
        PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        now,
    )
    .unwrap();
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/sleep").unwrap();
    let workload_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr_pem = build_csr(&workload_key, &id).unwrap();
    let ttl = Duration::from_secs(24 * 3600);
    g.bench_function("csr_verify_and_issue", |b| {
        b.iter(|| {
            let csr = VerifiedCsr::from_pem(black_box(&csr_pem)).unwrap();
            let requested = csr.requested_spiffe_id().unwrap();
            black_box(
                ca.issue_workload(csr.public_key_spki_der(), &requested, ttl, now)
                    .unwrap(),
            );
        })
    });

    // The two halves, each beside its own floor.
    g.bench_function("ring_p256_verify", |b| {
        b.iter(|| public.verify(black_box(&msg), sig.as_ref()).unwrap())
    });
    g.bench_function("csr_verify", |b| {
        b.iter(|| black_box(VerifiedCsr::from_pem(black_box(&csr_pem)).unwrap()))
    });
    g.bench_function("ring_p256_sign", |b| {
        b.iter(|| black_box(pair.sign(&rng, black_box(&msg)).unwrap()))
    });
    let spki = workload_key.public_key_spki_der();
    g.bench_function("issue_workload", |b| {
        b.iter(|| black_box(ca.issue_workload(black_box(&spki), &id, ttl, now).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
