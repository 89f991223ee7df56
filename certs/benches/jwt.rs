//! Cost of verifying a workload token (what the CA pays per bearer-authenticated request and
//! the proxy per request with a JWT), beside the raw ring signature verification it wraps.
//!
//! `cargo bench -p rampart-certs --bench jwt -- --measurement-time 3 --warm-up-time 1`

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use rampart_certs::jwt::{self, IssuerSet, Jwks, JwtSigner, Validation};
use rampart_certs::{KeyAlgorithm, PrivateKey};
use ring::signature::{self, KeyPair as _};
use serde_json::json;
use x509_parser::prelude::FromDer as _;

fn claims() -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({
        "iss": "https://issuer.example",
        "sub": "system:serviceaccount:ns1:sa1",
        "aud": "istio-ca",
        "iat": now,
        "exp": now + 3600,
        "kubernetes.io": {"namespace": "ns1", "serviceaccount": {"name": "sa1"}},
    })
}

fn bench_verify(c: &mut Criterion) {
    let mut group = c.benchmark_group("jwt");
    for alg in [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::Ed25519,
        KeyAlgorithm::Rsa2048,
    ] {
        let key = PrivateKey::generate(alg).unwrap();
        let signer = JwtSigner::with_thumbprint_kid(&key).unwrap();
        let token = signer.sign(&claims()).unwrap();
        let jwks = Jwks::from_json(&signer.jwks().unwrap().to_json().to_string()).unwrap();
        let mut issuers = IssuerSet::new();
        issuers.insert(
            "https://issuer.example",
            jwks.clone(),
            Validation {
                audiences: vec!["istio-ca".into()],
                require_expiration: true,
                ..Validation::default()
            },
        );
        let name = signer.algorithm().as_str();
        let now = SystemTime::now();
        group.bench_function(format!("verify/{name}"), |b| {
            b.iter(|| jwt::verify(black_box(&token), &jwks, now, jwt::DEFAULT_LEEWAY).unwrap())
        });
        group.bench_function(format!("issuer_set+service_account/{name}"), |b| {
            b.iter(|| {
                issuers
                    .verify(black_box(&token), now)
                    .unwrap()
                    .service_account()
                    .unwrap()
            })
        });
        group.bench_function(format!("sign/{name}"), |b| {
            b.iter(|| signer.sign(black_box(&claims())).unwrap())
        });

        // The raw ring verification of the same signature over the same bytes.
        let (input, sig) = token.rsplit_once('.').unwrap();
        let sig = base64_decode(sig);
        let spki = key.public_key_spki_der();
        let raw = raw_public_key(alg, &key, &spki);
        let verifier: &'static dyn signature::VerificationAlgorithm = match alg {
            KeyAlgorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_FIXED,
            KeyAlgorithm::Ed25519 => &signature::ED25519,
            _ => &signature::RSA_PKCS1_2048_8192_SHA256,
        };
        group.bench_function(format!("ring_verify_only/{name}"), |b| {
            b.iter(|| {
                signature::UnparsedPublicKey::new(verifier, &raw)
                    .verify(black_box(input.as_bytes()), &sig)
                    .unwrap()
            })
        });
    }
    group.finish();
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

/// The public key in the form ring's `UnparsedPublicKey` takes for each algorithm.
fn raw_public_key(alg: KeyAlgorithm, key: &PrivateKey, spki: &[u8]) -> Vec<u8> {
    let rng = ring::rand::SystemRandom::new();
    match alg {
        KeyAlgorithm::EcdsaP256 => signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            key.secret_pkcs8_der(),
            &rng,
        )
        .unwrap()
        .public_key()
        .as_ref()
        .to_vec(),
        KeyAlgorithm::Ed25519 => {
            signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(key.secret_pkcs8_der())
                .unwrap()
                .public_key()
                .as_ref()
                .to_vec()
        }
        _ => {
            // RSA: ring takes the PKCS#1 RSAPublicKey, the BIT STRING inside the SPKI.
            let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).unwrap();
            parsed.subject_public_key.data.to_vec()
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = bench_verify
}
criterion_main!(benches);
