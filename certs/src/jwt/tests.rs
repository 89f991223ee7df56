//! Unit tests for the jwt module: every algorithm round-trips, and every refusal has a test.

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature;
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::{Value, json};

use super::jwk::B64;
use super::sign::{Signer, SignerKind};
use super::*;

const NOW: u64 = 1_800_000_000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

fn claims() -> Value {
    json!({
        "iss": "https://issuer.example",
        "sub": "system:serviceaccount:ns1:sa1",
        "aud": "istio-ca",
        "iat": NOW - 10,
        "exp": NOW + 3600,
    })
}

fn ec_pkcs8(alg: &'static signature::EcdsaSigningAlgorithm) -> Vec<u8> {
    signature::EcdsaKeyPair::generate_pkcs8(alg, &SystemRandom::new())
        .unwrap()
        .as_ref()
        .to_vec()
}

fn ed_pkcs8() -> Vec<u8> {
    signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .unwrap()
        .as_ref()
        .to_vec()
}

/// An RSA PKCS#8 key made by `openssl genpkey` (ring cannot generate RSA keys).
fn openssl_rsa_pkcs8(bits: u32) -> Vec<u8> {
    openssl_genpkey(&[
        "-algorithm",
        "RSA",
        "-pkeyopt",
        &format!("rsa_keygen_bits:{bits}"),
    ])
}

fn openssl_pkcs8(algorithm: &str) -> Vec<u8> {
    openssl_genpkey(&["-algorithm", algorithm])
}

fn openssl_genpkey(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .output()
        .expect("openssl must be installed to make RSA test keys");
    assert!(out.status.success(), "openssl genpkey failed: {out:?}");
    PrivatePkcs8KeyDer::from_pem_slice(&out.stdout)
        .expect("openssl wrote a PKCS#8 PEM key")
        .secret_pkcs8_der()
        .to_vec()
}

fn rsa_pkcs8() -> &'static [u8] {
    static KEY: OnceLock<Vec<u8>> = OnceLock::new();
    KEY.get_or_init(|| openssl_rsa_pkcs8(2048))
}

fn other_rsa_pkcs8() -> &'static [u8] {
    static KEY: OnceLock<Vec<u8>> = OnceLock::new();
    KEY.get_or_init(|| openssl_rsa_pkcs8(2048))
}

fn signer(kind: SignerKind) -> Signer {
    let der = match kind {
        SignerKind::EcdsaP256 => ec_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING),
        SignerKind::EcdsaP384 => ec_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING),
        SignerKind::Ed25519 => ed_pkcs8(),
        SignerKind::Rsa => rsa_pkcs8().to_vec(),
    };
    Signer::from_pkcs8(kind, &der).unwrap()
}

/// Build a token with an arbitrary header and sign it with an RSA key using any RSA
/// encoding (ring signs RS*/PS*; `Signer` only makes RS256).
fn rsa_token(
    header: &Value,
    claims: &Value,
    encoding: &'static dyn signature::RsaEncoding,
) -> String {
    let kp = signature::RsaKeyPair::from_pkcs8(rsa_pkcs8()).unwrap();
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let mut sig = vec![0; kp.public().modulus_len()];
    kp.sign(encoding, &SystemRandom::new(), input.as_bytes(), &mut sig)
        .unwrap();
    format!("{input}.{}", B64.encode(sig))
}

fn rsa_jwks(kid: &str) -> Jwks {
    Signer::from_pkcs8(SignerKind::Rsa, rsa_pkcs8())
        .unwrap()
        .jwks(kid)
        .unwrap()
}

/// A token with the given header and payload, and a garbage signature.
fn unsigned(header: &Value, payload: &Value) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(payload.to_string()),
        B64.encode([7u8; 64])
    )
}

fn assert_no_token_echo(err: &JwtError, token: &str) {
    let shown = format!("{err} {err:?}");
    for segment in token.split('.').filter(|s| s.len() > 8) {
        assert!(!shown.contains(segment), "error echoes the token: {shown}");
    }
}

// === round trips ===

#[test]
fn every_signer_round_trips_through_its_published_jwks() {
    for (kind, alg) in [
        (SignerKind::EcdsaP256, Algorithm::Es256),
        (SignerKind::EcdsaP384, Algorithm::Es384),
        (SignerKind::Ed25519, Algorithm::EdDsa),
        (SignerKind::Rsa, Algorithm::Rs256),
    ] {
        let s = signer(kind);
        assert_eq!(s.algorithm(), alg);
        let token = s.sign(&claims(), "k1").unwrap();
        // Through JSON, as a peer would see it.
        let published = s.jwks("k1").unwrap().to_json();
        let jwks = Jwks::from_json(&published.to_string()).unwrap();
        assert_eq!(jwks.keys()[0].algorithm(), Some(alg));
        assert_eq!(jwks.keys()[0].key_use(), Some("sig"));
        let jwt = verify(&token, &jwks, now(), DEFAULT_LEEWAY).unwrap();
        assert_eq!(jwt.header().algorithm(), alg);
        assert_eq!(jwt.header().kid(), Some("k1"));
        assert_eq!(jwt.header().typ(), Some("JWT"));
        assert_eq!(jwt.verified_by_kid(), Some("k1"));
        assert_eq!(jwt.issuer(), Some("https://issuer.example"));
        assert_eq!(jwt.subject(), Some("system:serviceaccount:ns1:sa1"));
        assert_eq!(jwt.audiences(), ["istio-ca"]);
        assert_eq!(
            jwt.expires_at(),
            Some(UNIX_EPOCH + Duration::from_secs(NOW + 3600))
        );
        assert_eq!(
            jwt.issued_at(),
            Some(UNIX_EPOCH + Duration::from_secs(NOW - 10))
        );
        assert_eq!(jwt.not_before(), None);
        assert_eq!(jwt.claims()["aud"], "istio-ca");
        assert_eq!(jwt.payload_base64url(), token.split('.').nth(1).unwrap());
    }
}

#[test]
fn every_rsa_algorithm_verifies() {
    let jwks = Jwks::from_json(
        &json!({"keys": [rsa_jwks("r").keys()[0].clone().to_json()
            .as_object().unwrap().iter()
            .filter(|(k, _)| *k != "alg")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<serde_json::Map<_, _>>()]})
        .to_string(),
    )
    .unwrap();
    assert_eq!(jwks.keys()[0].algorithm(), None);
    for (alg, encoding) in [
        (
            "RS256",
            &signature::RSA_PKCS1_SHA256 as &'static dyn signature::RsaEncoding,
        ),
        ("RS384", &signature::RSA_PKCS1_SHA384),
        ("RS512", &signature::RSA_PKCS1_SHA512),
        ("PS256", &signature::RSA_PSS_SHA256),
        ("PS384", &signature::RSA_PSS_SHA384),
        ("PS512", &signature::RSA_PSS_SHA512),
    ] {
        let token = rsa_token(&json!({"alg": alg, "kid": "r"}), &claims(), encoding);
        let jwt =
            verify(&token, &jwks, now(), DEFAULT_LEEWAY).unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(jwt.header().algorithm().as_str(), alg);
        // The same signature under another hash/padding label must fail.
        let relabeled = rsa_token(
            &json!({"alg": if alg.starts_with("RS") { "PS256" } else { "RS256" }, "kid": "r"}),
            &claims(),
            encoding,
        );
        let lied = format!(
            "{}.{}",
            relabeled.rsplit_once('.').unwrap().0,
            token.rsplit('.').next().unwrap()
        );
        assert_eq!(
            verify(&lied, &jwks, now(), DEFAULT_LEEWAY).unwrap_err(),
            JwtError::BadSignature,
            "{alg}"
        );
    }
}

#[test]
fn jwk_alg_restricts_the_key() {
    // The published key says alg RS256: a PS256 token signed by the same key is refused.
    let jwks = rsa_jwks("r");
    let token = rsa_token(
        &json!({"alg": "PS256", "kid": "r"}),
        &claims(),
        &signature::RSA_PSS_SHA256,
    );
    assert_eq!(
        verify(&token, &jwks, now(), DEFAULT_LEEWAY).unwrap_err(),
        JwtError::NoMatchingKey { alg: "PS256" }
    );
}

// === signature failures ===

#[test]
fn tampered_payload_and_signature_are_refused() {
    for kind in [
        SignerKind::EcdsaP256,
        SignerKind::EcdsaP384,
        SignerKind::Ed25519,
        SignerKind::Rsa,
    ] {
        let s = signer(kind);
        let jwks = s.jwks("k").unwrap();
        let token = s.sign(&claims(), "k").unwrap();
        let (head, sig) = token.rsplit_once('.').unwrap();

        let mut other_claims = claims();
        other_claims["sub"] = "system:serviceaccount:kube-system:admin".into();
        let forged_payload = format!(
            "{}.{}.{sig}",
            head.split('.').next().unwrap(),
            B64.encode(other_claims.to_string())
        );
        let err = verify(&forged_payload, &jwks, now(), DEFAULT_LEEWAY).unwrap_err();
        assert_eq!(err, JwtError::BadSignature, "{kind:?}");
        assert_no_token_echo(&err, &forged_payload);

        let mut bytes = B64.decode(sig).unwrap();
        bytes[3] ^= 1;
        let flipped = format!("{head}.{}", B64.encode(&bytes));
        assert_eq!(
            verify(&flipped, &jwks, now(), DEFAULT_LEEWAY).unwrap_err(),
            JwtError::BadSignature,
            "{kind:?}"
        );

        let truncated = format!("{head}.{}", B64.encode(&bytes[..bytes.len() - 1]));
        assert_eq!(
            verify(&truncated, &jwks, now(), DEFAULT_LEEWAY).unwrap_err(),
            JwtError::BadSignature,
            "{kind:?}"
        );
    }
}

#[test]
fn a_token_from_another_key_with_the_same_kid_is_refused() {
    let trusted = signer(SignerKind::EcdsaP256);
    let attacker = signer(SignerKind::EcdsaP256);
    let token = attacker.sign(&claims(), "k").unwrap();
    assert_eq!(
        verify(&token, &trusted.jwks("k").unwrap(), now(), DEFAULT_LEEWAY).unwrap_err(),
        JwtError::BadSignature
    );
    let rsa_attacker = Signer::from_pkcs8(SignerKind::Rsa, other_rsa_pkcs8()).unwrap();
    let token = rsa_attacker.sign(&claims(), "r").unwrap();
    assert_eq!(
        verify(&token, &rsa_jwks("r"), now(), DEFAULT_LEEWAY).unwrap_err(),
        JwtError::BadSignature
    );
}

#[test]
fn algorithm_and_key_type_must_fit() {
    // An ES256 token against RSA keys, an RSA token against EC keys.
    let ec = signer(SignerKind::EcdsaP256);
    let token = ec.sign(&claims(), "k").unwrap();
    assert_eq!(
        verify(&token, &rsa_jwks("k"), now(), DEFAULT_LEEWAY).unwrap_err(),
        JwtError::NoMatchingKey { alg: "ES256" }
    );
    let rsa = Signer::from_pkcs8(SignerKind::Rsa, rsa_pkcs8()).unwrap();
    let token = rsa.sign(&claims(), "k").unwrap();
    assert_eq!(
        verify(&token, &ec.jwks("k").unwrap(), now(), DEFAULT_LEEWAY).unwrap_err(),
        JwtError::NoMatchingKey { alg: "RS256" }
    );
    // An ES384 header over a P-256 key (curve confusion).
    let p384 = signer(SignerKind::EcdsaP384);
    let token = p384.sign(&claims(), "k").unwrap();
    assert_eq!(
        verify(&token, &ec.jwks("k").unwrap(), now(), DEFAULT_LEEWAY).unwrap_err(),
        JwtError::NoMatchingKey { alg: "ES384" }
    );
}

// === algorithms refused ===

#[test]
fn alg_none_hmac_and_unknown_algorithms_are_refused() {
    let jwks = rsa_jwks("r");
    for none in ["none", "None", "NONE"] {
        let token = format!(
            "{}.{}.",
            B64.encode(json!({"alg": none}).to_string()),
            B64.encode(claims().to_string())
        );
        assert_eq!(
            verify(&token, &jwks, now(), DEFAULT_LEEWAY).unwrap_err(),
            JwtError::UnsecuredToken
        );
    }

    // The classic confusion attack: HS256 keyed with the RSA public key's JSON.
    let secret = jwks.to_json().to_string();
    let header = B64.encode(json!({"alg": "HS256", "kid": "r"}).to_string());
    let payload = B64.encode(claims().to_string());
    let input = format!("{header}.{payload}");
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()),
        input.as_bytes(),
    );
    let token = format!("{input}.{}", B64.encode(tag));
    assert!(matches!(
        verify(&token, &jwks, now(), DEFAULT_LEEWAY).unwrap_err(),
        JwtError::SymmetricAlgorithm { alg } if alg == "\"HS256\""
    ));
    for alg in ["HS384", "HS512"] {
        let token = unsigned(&json!({"alg": alg}), &claims());
        assert!(matches!(
            verify(&token, &jwks, now(), DEFAULT_LEEWAY).unwrap_err(),
            JwtError::SymmetricAlgorithm { .. }
        ));
    }
    for alg in ["ES512", "RS1", "rs256", "EdDSA25519", ""] {
        let token = unsigned(&json!({"alg": alg}), &claims());
        assert!(
            matches!(
                verify(&token, &jwks, now(), DEFAULT_LEEWAY).unwrap_err(),
                JwtError::UnsupportedAlgorithm { .. }
            ),
            "{alg}"
        );
    }
}

#[test]
fn crit_headers_are_refused() {
    let token = rsa_token(
        &json!({"alg": "RS256", "kid": "r", "crit": ["b64"], "b64": false}),
        &claims(),
        &signature::RSA_PKCS1_SHA256,
    );
    assert_eq!(
        verify(&token, &rsa_jwks("r"), now(), DEFAULT_LEEWAY).unwrap_err(),
        JwtError::CriticalHeader
    );
}

// === key selection ===

#[test]
fn kid_selects_the_key_and_an_unknown_kid_is_refused() {
    let a = signer(SignerKind::EcdsaP256);
    let b = signer(SignerKind::EcdsaP256);
    let keys = vec![
        a.public_jwk().unwrap().with_kid("a"),
        b.public_jwk().unwrap().with_kid("b"),
    ];
    let jwks = Jwks::from_keys(keys).unwrap();
    let jwt = verify(
        &b.sign(&claims(), "b").unwrap(),
        &jwks,
        now(),
        DEFAULT_LEEWAY,
    )
    .unwrap();
    assert_eq!(jwt.verified_by_kid(), Some("b"));

    let token = b.sign(&claims(), "c").unwrap();
    let err = verify(&token, &jwks, now(), DEFAULT_LEEWAY).unwrap_err();
    assert_eq!(
        err,
        JwtError::UnknownKid {
            kid: "\"c\"".into()
        }
    );
    assert_no_token_echo(&err, &token);

    // Right kid, wrong key: b's token claiming kid "a" fails (a's key only is tried).
    let token = b.sign(&claims(), "a").unwrap();
    assert_eq!(
        verify(&token, &jwks, now(), DEFAULT_LEEWAY).unwrap_err(),
        JwtError::BadSignature
    );
}

#[test]
fn without_kid_every_fitting_key_is_tried() {
    let a = signer(SignerKind::EcdsaP256);
    let b = signer(SignerKind::EcdsaP256);
    let jwks = Jwks::from_keys(vec![
        a.public_jwk().unwrap().with_kid("a"),
        b.public_jwk().unwrap().with_kid("b"),
    ])
    .unwrap();
    // Strip the kid from b's token by re-signing a header without one.
    let header = B64.encode(json!({"alg": "ES256"}).to_string());
    let payload = B64.encode(claims().to_string());
    let input = format!("{header}.{payload}");
    let kp = match &b {
        Signer::Ecdsa(kp, _) => kp,
        _ => unreachable!(),
    };
    let sig = kp.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    let token = format!("{input}.{}", B64.encode(sig.as_ref()));
    let jwt = verify(&token, &jwks, now(), DEFAULT_LEEWAY).unwrap();
    assert_eq!(jwt.verified_by_kid(), Some("b"));
    assert_eq!(jwt.header().kid(), None);
}

#[test]
fn a_token_kid_falls_back_to_keys_without_kid() {
    // Envoy tries keys that have no kid when none carries the token's kid.
    let s = signer(SignerKind::Ed25519);
    let jwks = Jwks::from_keys(vec![s.public_jwk().unwrap()]).unwrap();
    let jwt = verify(
        &s.sign(&claims(), "whatever").unwrap(),
        &jwks,
        now(),
        DEFAULT_LEEWAY,
    )
    .unwrap();
    assert_eq!(jwt.verified_by_kid(), None);
}

// === time ===

fn token_with(claims: Value) -> (String, Jwks) {
    let s = signer(SignerKind::EcdsaP256);
    (s.sign(&claims, "k").unwrap(), s.jwks("k").unwrap())
}

#[test]
fn expiry_honours_the_leeway_like_envoy() {
    let at = |exp: u64| {
        let mut c = claims();
        c["exp"] = exp.into();
        token_with(c)
    };
    // Within the default 60 s skew.
    let (token, jwks) = at(NOW - 60);
    assert!(verify(&token, &jwks, now(), DEFAULT_LEEWAY).is_ok());
    // One second past it.
    let (token, jwks) = at(NOW - 61);
    let err = verify(&token, &jwks, now(), DEFAULT_LEEWAY).unwrap_err();
    assert_eq!(
        err,
        JwtError::Expired {
            exp: NOW - 61,
            leeway_secs: 60
        }
    );
    assert_no_token_echo(&err, &token);
    // No leeway: exp == now is still valid (Envoy: expired when now > exp), exp < now not.
    let (token, jwks) = at(NOW);
    assert!(verify(&token, &jwks, now(), Duration::ZERO).is_ok());
    let (token, jwks) = at(NOW - 1);
    assert!(matches!(
        verify(&token, &jwks, now(), Duration::ZERO),
        Err(JwtError::Expired { .. })
    ));
    // Sub-second `now` is truncated to whole seconds.
    let (token, jwks) = at(NOW);
    assert!(
        verify(
            &token,
            &jwks,
            now() + Duration::from_millis(999),
            Duration::ZERO
        )
        .is_ok()
    );
}

#[test]
fn not_before_honours_the_leeway() {
    let at = |nbf: u64| {
        let mut c = claims();
        c["nbf"] = nbf.into();
        token_with(c)
    };
    let (token, jwks) = at(NOW + 60);
    assert!(verify(&token, &jwks, now(), DEFAULT_LEEWAY).is_ok());
    let (token, jwks) = at(NOW + 61);
    assert_eq!(
        verify(&token, &jwks, now(), DEFAULT_LEEWAY).unwrap_err(),
        JwtError::NotYetValid {
            nbf: NOW + 61,
            leeway_secs: 60
        }
    );
    let (token, jwks) = at(NOW + 1);
    assert!(matches!(
        verify(&token, &jwks, now(), Duration::ZERO),
        Err(JwtError::NotYetValid { .. })
    ));
}

#[test]
fn wrong_typed_registered_claims_are_refused_after_the_signature() {
    for (claim, value, name) in [
        ("exp", json!("tomorrow"), "exp"),
        ("exp", json!(-1), "exp"),
        ("exp", json!(1e300), "exp"),
        ("nbf", json!(true), "nbf"),
        ("iat", json!([1]), "iat"),
        ("iss", json!(5), "iss"),
        ("sub", json!({"a": 1}), "sub"),
        ("aud", json!(7), "aud"),
        ("aud", json!(["a", 7]), "aud"),
        ("jti", json!(1), "jti"),
    ] {
        let mut c = claims();
        c[claim] = value;
        let (token, jwks) = token_with(c);
        match verify(&token, &jwks, now(), DEFAULT_LEEWAY) {
            Err(JwtError::InvalidClaim { claim, .. }) => assert_eq!(claim, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    // A fractional NumericDate is fine.
    let mut c = claims();
    c["exp"] = json!((NOW + 10) as f64 + 0.5);
    let (token, jwks) = token_with(c);
    let jwt = verify(&token, &jwks, now(), Duration::ZERO).unwrap();
    assert_eq!(
        jwt.expires_at(),
        Some(UNIX_EPOCH + Duration::from_secs(NOW + 10))
    );
}

// === malformed ===

#[test]
fn malformed_tokens_are_refused_without_echo() {
    let s = signer(SignerKind::EcdsaP256);
    let jwks = s.jwks("k").unwrap();
    let good = s.sign(&claims(), "k").unwrap();
    let (h, rest) = good.split_once('.').unwrap();
    let (p, sig) = rest.split_once('.').unwrap();
    let cases: Vec<(String, TokenPart)> = vec![
        (String::new(), TokenPart::Token),
        (format!("{h}.{p}"), TokenPart::Token),
        (format!("{h}.{p}.{sig}.x"), TokenPart::Token),
        (format!("{h}.{p}.{sig}.x.y"), TokenPart::Token),
        (format!("{h}=.{p}.{sig}"), TokenPart::Header),
        (format!("{h}.{p}=.{sig}"), TokenPart::Payload),
        (format!("{h}.{p}.{sig}="), TokenPart::Signature),
        // A standard-base64 character where base64url is required. (Replacing the `-`/`_`
        // a signature happens to contain would leave about one signature in 15 unchanged.)
        (format!("{h}.{p}.+{}", &sig[1..]), TokenPart::Signature),
        (format!("{h}.{p}."), TokenPart::Signature),
        (
            format!("{}.{p}.{sig}", B64.encode("[1]")),
            TokenPart::Header,
        ),
        (
            format!("{}.{p}.{sig}", B64.encode("{not json")),
            TokenPart::Header,
        ),
        (format!("{}.{p}.{sig}", B64.encode("{}")), TokenPart::Header),
        (
            format!("{}.{p}.{sig}", B64.encode(r#"{"alg":1}"#)),
            TokenPart::Header,
        ),
        (
            format!("{}.{p}.{sig}", B64.encode(r#"{"alg":"ES256","kid":3}"#)),
            TokenPart::Header,
        ),
        (
            format!("{h}.{}.{sig}", B64.encode("\"str\"")),
            TokenPart::Payload,
        ),
        (format!("{h}.{}.{sig}", B64.encode("{")), TokenPart::Payload),
        (
            format!("{h}.{p}.{}", "A".repeat(MAX_TOKEN_LEN)),
            TokenPart::Token,
        ),
    ];
    for (token, part) in cases {
        let err = verify(&token, &jwks, now(), DEFAULT_LEEWAY).unwrap_err();
        match &err {
            JwtError::Malformed { part: got, .. } => {
                assert_eq!(*got, part, "{token:.80}: {err}");
            }
            other => panic!("{token:.80}: expected Malformed, got {other:?}"),
        }
        assert_no_token_echo(&err, &token);
    }
}

// === policy ===

#[test]
fn validation_checks_issuer_audiences_and_expiry_presence() {
    let policy = Validation {
        issuer: Some("https://issuer.example".into()),
        audiences: vec!["istio-ca".into(), "other".into()],
        ..Validation::default()
    };
    assert_eq!(policy.leeway, Duration::from_secs(60));
    let s = signer(SignerKind::Ed25519);
    let jwks = s.jwks("k").unwrap();
    let run = |c: Value| policy.verify(&s.sign(&c, "k").unwrap(), &jwks, now());

    // aud as a string and as an array.
    assert!(run(claims()).is_ok());
    let mut c = claims();
    c["aud"] = json!(["x", "istio-ca"]);
    assert_eq!(run(c).unwrap().audiences(), ["x", "istio-ca"]);

    let mut c = claims();
    c["aud"] = json!(["x", "y"]);
    assert_eq!(
        run(c).unwrap_err(),
        JwtError::AudienceMismatch {
            expected: vec!["istio-ca".into(), "other".into()],
            found: vec!["\"x\"".into(), "\"y\"".into()],
        }
    );
    let mut c = claims();
    c["aud"] = json!("istio-ca-evil");
    assert!(matches!(run(c), Err(JwtError::AudienceMismatch { .. })));
    let mut c = claims();
    c.as_object_mut().unwrap().remove("aud");
    assert!(matches!(run(c), Err(JwtError::AudienceMismatch { .. })));

    let mut c = claims();
    c["iss"] = "https://evil.example".into();
    assert_eq!(
        run(c).unwrap_err(),
        JwtError::IssuerMismatch {
            expected: "https://issuer.example".into(),
            found: "\"https://evil.example\"".into()
        }
    );
    let mut c = claims();
    c.as_object_mut().unwrap().remove("iss");
    assert!(matches!(run(c), Err(JwtError::IssuerMismatch { .. })));

    // No exp: accepted by default (as Envoy), refused when required.
    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    let jwt = run(c.clone()).unwrap();
    assert_eq!(jwt.expires_at(), None);
    let strict = Validation {
        require_expiration: true,
        ..policy.clone()
    };
    assert_eq!(strict.check(&jwt).unwrap_err(), JwtError::MissingExpiration);

    // Empty audiences accept any or none.
    let open = Validation::default();
    let mut c = claims();
    c.as_object_mut().unwrap().remove("aud");
    assert!(open.verify(&s.sign(&c, "k").unwrap(), &jwks, now()).is_ok());
    // The policy's leeway is the one used.
    let mut c = claims();
    c["exp"] = (NOW - 30).into();
    let token = s.sign(&c, "k").unwrap();
    assert!(open.verify(&token, &jwks, now()).is_ok());
    let tight = Validation {
        leeway: Duration::from_secs(10),
        ..Validation::default()
    };
    assert!(matches!(
        tight.verify(&token, &jwks, now()),
        Err(JwtError::Expired { .. })
    ));
}

#[test]
fn unverified_issuer_is_readable_before_verification() {
    let s = signer(SignerKind::EcdsaP256);
    let token = s.sign(&claims(), "k").unwrap();
    let parsed = UnverifiedJwt::parse(&token).unwrap();
    assert_eq!(parsed.unverified_issuer(), Some("https://issuer.example"));
    assert_eq!(parsed.header().kid(), Some("k"));
    let shown = format!("{parsed:?}");
    assert!(!shown.contains(token.split('.').nth(1).unwrap()), "{shown}");
}

#[test]
fn service_account_from_sub_or_kubernetes_claims() {
    let s = signer(SignerKind::EcdsaP256);
    let jwks = s.jwks("k").unwrap();
    let account = |c: Value| {
        verify(&s.sign(&c, "k").unwrap(), &jwks, now(), DEFAULT_LEEWAY)
            .unwrap()
            .service_account()
    };
    let want = ServiceAccount {
        namespace: "ns1".into(),
        name: "sa1".into(),
    };
    assert_eq!(account(claims()).unwrap(), want);

    let k8s = json!({"namespace": "ns1", "serviceaccount": {"name": "sa1", "uid": "u"}});
    let mut c = claims();
    c["sub"] = "someone".into();
    c["kubernetes.io"] = k8s.clone();
    assert_eq!(account(c).unwrap(), want);
    let mut c = claims();
    c["kubernetes.io"] = k8s;
    assert_eq!(account(c).unwrap(), want);

    let mut c = claims();
    c["kubernetes.io"] = json!({"namespace": "ns2", "serviceaccount": {"name": "sa1"}});
    assert_eq!(account(c).unwrap_err(), JwtError::ConflictingServiceAccount);

    for sub in [
        "system:serviceaccount:ns1",
        "system:serviceaccount::sa",
        "system:serviceaccount:ns1:",
        "system:serviceaccount:ns1:sa:extra",
        "system:serviceaccount:NS:sa",
        "system:serviceaccount:ns/x:sa",
        "system:serviceaccount:ns:sa/../x",
    ] {
        let mut c = claims();
        c["sub"] = sub.into();
        assert!(
            matches!(account(c), Err(JwtError::MissingServiceAccount { .. })),
            "{sub}"
        );
    }
    let mut c = claims();
    c["sub"] = "user@example.com".into();
    assert!(matches!(
        account(c),
        Err(JwtError::MissingServiceAccount { .. })
    ));
    let mut c = claims();
    c["sub"] = "user".into();
    c["kubernetes.io"] = json!({"namespace": "ns1"});
    assert!(matches!(
        account(c),
        Err(JwtError::MissingServiceAccount { .. })
    ));
}

// === key sets ===

#[test]
fn unusable_keys_are_skipped_with_reasons() {
    let good = signer(SignerKind::EcdsaP256).jwks("good").unwrap().keys()[0].to_json();
    let mut off_curve = good.clone();
    off_curve["kid"] = "off-curve".into();
    off_curve["y"] = B64.encode([1u8; 32]).into();
    let mut private = good.clone();
    private["kid"] = "private".into();
    private["d"] = B64.encode([1u8; 32]).into();
    let mut enc = good.clone();
    enc["kid"] = "enc".into();
    enc["use"] = "enc".into();
    let mut wrong_alg = good.clone();
    wrong_alg["kid"] = "wrong-alg".into();
    wrong_alg["alg"] = "RS256".into();
    let mut short = good.clone();
    short["kid"] = "short".into();
    short["x"] = B64.encode([1u8; 31]).into();
    let mut weak_n = vec![0xC5u8; 128];
    weak_n[127] |= 1;
    let doc = json!({"keys": [
        {"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"},
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {"kty": "OKP", "crv": "X25519", "kid": "x25519", "x": B64.encode([9u8; 32])},
        {"kty": "RSA", "kid": "weak", "n": B64.encode(&weak_n), "e": "AQAB"},
        {"kty": "RSA", "kid": "even-e", "n": B64.encode([0xC5u8; 256]), "e": "AQAA"},
        {"kty": "PQC", "kid": "future"},
        "not an object",
        off_curve, private, enc, wrong_alg, short,
        good,
    ]});
    let jwks = Jwks::from_json(&doc.to_string()).unwrap();
    assert_eq!(jwks.keys().len(), 1);
    assert_eq!(jwks.keys()[0].kid(), Some("good"));
    let skipped: Vec<_> = jwks
        .skipped()
        .iter()
        .map(|s| (s.kid.clone().unwrap_or_default(), s.reason.clone()))
        .collect();
    let reason = |kid: &str| {
        skipped
            .iter()
            .find(|(k, _)| k == kid)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{kid} not skipped: {skipped:?}"))
    };
    assert!(reason("p521").contains("P-521"));
    assert!(reason("hmac").contains("oct"));
    assert!(reason("x25519").contains("X25519"));
    assert!(reason("weak").contains("1024 bits"), "{}", reason("weak"));
    assert!(reason("even-e").contains("exponent"));
    assert!(reason("future").contains("PQC"));
    assert!(reason("off-curve").contains("not on its curve"));
    assert!(reason("private").contains("private"));
    assert!(reason("enc").contains("not sig"));
    assert!(reason("wrong-alg").contains("does not fit"));
    assert!(reason("short").contains("32 bytes"));
    assert_eq!(jwks.skipped().len(), 12);
    assert!(jwks.skipped()[6].reason.contains("not a JSON object"));
}

#[test]
fn a_key_set_with_no_usable_key_is_an_error() {
    let err = Jwks::from_json(r#"{"keys": [{"kty": "oct", "kid": "h", "k": "AA"}]}"#).unwrap_err();
    match err {
        JwtError::NoUsableKeys { skipped } => {
            assert_eq!(skipped.len(), 1);
            assert!(skipped[0].contains("kid \"h\""), "{skipped:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        Jwks::from_json(r#"{"keys": []}"#),
        Err(JwtError::NoUsableKeys { .. })
    ));
    for bad in [
        "",
        "[]",
        "{",
        r#"{"keys": {}}"#,
        r#"{"issuer": "x"}"#,
        "garbage",
    ] {
        assert!(
            matches!(Jwks::parse(bad), Err(JwtError::InvalidKeySet { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn a_single_jwk_and_pem_public_keys_are_accepted() {
    let s = signer(SignerKind::EcdsaP384);
    let jwk = s.public_jwk().unwrap().with_kid("one");
    let jwks = Jwks::parse(&jwk.to_json().to_string()).unwrap();
    assert_eq!(jwks.keys(), [jwk]);
    let token = s.sign(&claims(), "one").unwrap();
    assert!(verify(&token, &jwks, now(), DEFAULT_LEEWAY).is_ok());

    // PEM public keys from openssl, for each key type; the kid is the thumbprint.
    let dir = tempfile::tempdir().unwrap();
    for (name, der, kind) in [
        ("rsa", rsa_pkcs8().to_vec(), SignerKind::Rsa),
        (
            "p256",
            ec_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING),
            SignerKind::EcdsaP256,
        ),
        (
            "p384",
            ec_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING),
            SignerKind::EcdsaP384,
        ),
        // openssl reads only PKCS#8 v1 Ed25519 keys, not ring's v2: let openssl make it.
        ("ed25519", openssl_pkcs8("ed25519"), SignerKind::Ed25519),
    ] {
        let path = dir.path().join(format!("{name}.der"));
        std::fs::write(&path, &der).unwrap();
        let out = Command::new("openssl")
            .args(["pkey", "-inform", "DER", "-pubout", "-in"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {out:?}");
        let pem = String::from_utf8(out.stdout).unwrap();
        let jwks = Jwks::parse(&pem).unwrap_or_else(|e| panic!("{name}: {e}"));
        let s = Signer::from_pkcs8(kind, &der).unwrap();
        let expected = s.public_jwk().unwrap();
        assert_eq!(jwks.keys()[0].thumbprint(), expected.thumbprint(), "{name}");
        assert_eq!(jwks.keys()[0].kid(), Some(expected.thumbprint().as_str()));
        let token = s.sign(&claims(), &expected.thumbprint()).unwrap();
        assert!(
            verify(&token, &jwks, now(), DEFAULT_LEEWAY).is_ok(),
            "{name}"
        );
    }

    // A private key PEM is refused outright.
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(ed_pkcs8())
    );
    assert!(matches!(
        Jwks::parse(&pem),
        Err(JwtError::InvalidKeySet { reason }) if reason.contains("private key")
    ));
}

#[test]
fn weak_rsa_pem_keys_are_skipped() {
    let der = {
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:1024",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        out.stdout
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weak.pem");
    std::fs::write(&path, der).unwrap();
    let out = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&path)
        .output()
        .unwrap();
    let err = Jwks::parse(std::str::from_utf8(&out.stdout).unwrap()).unwrap_err();
    assert!(
        matches!(&err, JwtError::NoUsableKeys { skipped } if skipped[0].contains("1024 bits")),
        "{err}"
    );
}

#[test]
fn thumbprint_matches_rfc_7638_example() {
    // RFC 7638 §3.1.
    let jwk = Jwk::from_json(&json!({
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29"
    }))
    .unwrap();
    assert_eq!(
        jwk.thumbprint(),
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    );
}

#[test]
fn signing_refuses_non_object_claims_and_wrong_keys() {
    let s = signer(SignerKind::Ed25519);
    assert_eq!(
        s.sign(&json!("claims"), "k").unwrap_err(),
        JwtError::ClaimsNotObject
    );
    let p256 = ec_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING);
    assert!(matches!(
        Signer::from_pkcs8(SignerKind::EcdsaP384, &p256),
        Err(JwtError::UnusableSigningKey { .. })
    ));
    assert!(matches!(
        Signer::from_pkcs8(SignerKind::Rsa, &p256),
        Err(JwtError::UnusableSigningKey { .. })
    ));
}

#[test]
fn es256_signatures_are_raw_r_s_and_der_signatures_are_refused() {
    let der = ec_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING);
    let s = Signer::from_pkcs8(SignerKind::EcdsaP256, &der).unwrap();
    let jwks = s.jwks("k").unwrap();
    let token = s.sign(&claims(), "k").unwrap();
    let sig = B64.decode(token.rsplit('.').next().unwrap()).unwrap();
    assert_eq!(sig.len(), 64);
    let p384 = signer(SignerKind::EcdsaP384);
    let token384 = p384.sign(&claims(), "k").unwrap();
    let sig = B64.decode(token384.rsplit('.').next().unwrap()).unwrap();
    assert_eq!(sig.len(), 96);

    // The same key signing with an ASN.1 DER signature (as a naive signer would) is refused.
    let asn1 = signature::EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &der,
        &SystemRandom::new(),
    )
    .unwrap();
    let input = token.rsplit_once('.').unwrap().0;
    let der_sig = asn1.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    let der_token = format!("{input}.{}", B64.encode(der_sig.as_ref()));
    assert_eq!(
        verify(&der_token, &jwks, now(), DEFAULT_LEEWAY).unwrap_err(),
        JwtError::BadSignature
    );
}

#[test]
fn private_key_api_round_trips_every_key_algorithm() {
    use crate::{KeyAlgorithm, PrivateKey};
    for alg in [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
        KeyAlgorithm::Rsa2048,
    ] {
        let key = PrivateKey::generate(alg).unwrap();
        let kid = key_thumbprint(&key).unwrap();
        assert_eq!(
            Jwk::from_spki_der(&key.public_key_spki_der())
                .unwrap()
                .thumbprint(),
            kid,
            "{alg}"
        );
        let token = sign(&claims(), &key, &kid).unwrap();
        let jwks = Jwks::from_json(&jwks_for(&key, &kid).unwrap().to_string()).unwrap();
        assert_eq!(jwks.keys()[0].kid(), Some(kid.as_str()));
        let jwt = verify(&token, &jwks, now(), DEFAULT_LEEWAY).unwrap();
        assert_eq!(jwt.header().algorithm(), signing_algorithm(alg), "{alg}");
        assert_eq!(public_jwk(&key).unwrap().thumbprint(), kid);

        let signer = JwtSigner::with_thumbprint_kid(&key).unwrap();
        assert_eq!(signer.kid(), kid);
        let shown = format!("{signer:?}");
        assert!(shown.contains("elided"), "{shown}");
        // Another key of the same algorithm does not verify this key's tokens.
        let other = PrivateKey::generate(alg).unwrap();
        let other_jwks = Jwks::from_json(&jwks_for(&other, &kid).unwrap().to_string()).unwrap();
        assert_eq!(
            verify(
                &signer.sign(&claims()).unwrap(),
                &other_jwks,
                now(),
                DEFAULT_LEEWAY
            )
            .unwrap_err(),
            JwtError::BadSignature,
            "{alg}"
        );
    }
}

// === robustness ===

fn shared_ec() -> &'static (Signer, Jwks) {
    static KEY: OnceLock<(Signer, Jwks)> = OnceLock::new();
    KEY.get_or_init(|| {
        let s = signer(SignerKind::EcdsaP256);
        let jwks = s.jwks("k").unwrap();
        (s, jwks)
    })
}

proptest::proptest! {
    #[test]
    fn arbitrary_text_never_verifies_or_panics(text in "[A-Za-z0-9_.=+/-]{0,300}") {
        let (_, jwks) = shared_ec();
        proptest::prop_assert!(verify(&text, jwks, now(), DEFAULT_LEEWAY).is_err());
    }

    #[test]
    fn arbitrary_segments_never_verify_or_panic(
        alg in proptest::sample::select(vec!["ES256", "ES384", "RS256", "PS512", "EdDSA", "none", "HS256", "x"]),
        kid in proptest::option::of("[a-z]{0,3}"),
        extra in proptest::collection::vec(0u8..=255, 0..40),
        payload in proptest::collection::vec(0u8..=255, 0..80),
        sig in proptest::collection::vec(0u8..=255, 0..100),
    ) {
        let (_, jwks) = shared_ec();
        let mut header = json!({"alg": alg});
        if let Some(kid) = kid {
            header["kid"] = kid.into();
        }
        // Header as JSON, or as raw bytes; payload as raw bytes or a JSON object.
        for h in [header.to_string().into_bytes(), extra.clone()] {
            for p in [payload.clone(), claims().to_string().into_bytes()] {
                let token = format!("{}.{}.{}", B64.encode(&h), B64.encode(&p), B64.encode(&sig));
                let result = verify(&token, jwks, now(), DEFAULT_LEEWAY);
                proptest::prop_assert!(result.is_err());
                let err = result.unwrap_err();
                for segment in token.split('.').filter(|s| s.len() > 8) {
                    proptest::prop_assert!(!err.to_string().contains(segment));
                }
            }
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_signed_token_is_refused(index in 0usize..1000, bit in 0u8..8) {
        let (s, jwks) = shared_ec();
        let token = s.sign(&claims(), "k").unwrap();
        let mut bytes = token.clone().into_bytes();
        let i = index % bytes.len();
        bytes[i] ^= 1 << bit;
        // base64url has no two spellings of the same bytes (strict decoding), so any change
        // either breaks the encoding or changes what was signed.
        if let Some(mutated) = String::from_utf8(bytes).ok().filter(|m| *m != token) {
            proptest::prop_assert!(verify(&mutated, jwks, now(), DEFAULT_LEEWAY).is_err());
        }
    }

    #[test]
    fn arbitrary_key_sets_never_panic(text in "\\PC{0,200}") {
        let _ = Jwks::parse(&text);
    }
}

#[test]
fn issuer_set_picks_the_key_set_by_issuer_and_refuses_unknown_issuers() {
    let a = signer(SignerKind::EcdsaP256);
    let b = signer(SignerKind::Ed25519);
    let mut set = IssuerSet::new();
    assert!(set.is_empty());
    let ca_policy = Validation {
        audiences: vec!["istio-ca".into()],
        require_expiration: true,
        ..Validation::default()
    };
    set.insert("https://a.example", a.jwks("a").unwrap(), ca_policy.clone());
    set.insert("https://b.example", b.jwks("b").unwrap(), ca_policy);
    assert_eq!(
        set.issuers().collect::<Vec<_>>(),
        ["https://a.example", "https://b.example"]
    );
    let with_iss = |iss: Option<&str>| {
        let mut c = claims();
        match iss {
            Some(iss) => c["iss"] = iss.into(),
            None => {
                c.as_object_mut().unwrap().remove("iss");
            }
        }
        c
    };
    let token = a.sign(&with_iss(Some("https://a.example")), "a").unwrap();
    assert_eq!(
        set.verify(&token, now()).unwrap().issuer(),
        Some("https://a.example")
    );
    let token = b.sign(&with_iss(Some("https://b.example")), "b").unwrap();
    assert!(set.verify(&token, now()).is_ok());

    // A's key claiming to be issuer B: B's keys are used, so the signature fails.
    let token = a.sign(&with_iss(Some("https://b.example")), "b").unwrap();
    assert!(matches!(
        set.verify(&token, now()),
        Err(JwtError::NoMatchingKey { .. } | JwtError::BadSignature)
    ));
    let token = a
        .sign(&with_iss(Some("https://evil.example")), "a")
        .unwrap();
    assert_eq!(
        set.verify(&token, now()).unwrap_err(),
        JwtError::UnknownIssuer {
            issuer: "\"https://evil.example\"".into()
        }
    );
    let token = a.sign(&with_iss(None), "a").unwrap();
    assert_eq!(
        set.verify(&token, now()).unwrap_err(),
        JwtError::UnknownIssuer {
            issuer: "(none)".into()
        }
    );
    // The per-issuer policy applies: wrong audience, missing exp.
    let mut c = with_iss(Some("https://a.example"));
    c["aud"] = "other".into();
    assert!(matches!(
        set.verify(&a.sign(&c, "a").unwrap(), now()),
        Err(JwtError::AudienceMismatch { .. })
    ));
    let mut c = with_iss(Some("https://a.example"));
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        set.verify(&a.sign(&c, "a").unwrap(), now()).unwrap_err(),
        JwtError::MissingExpiration
    );
}

#[test]
fn rfc_example_public_keys_parse() {
    // RFC 7515 A.3 (P-256), RFC 8037 A.2 (Ed25519): the fixed keys of the jwt fuzz target.
    let set = Jwks::from_json(
        r#"{"keys":[
        {"kty":"EC","crv":"P-256","kid":"ec",
         "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
         "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
        {"kty":"OKP","crv":"Ed25519","kid":"ed",
         "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#,
    )
    .unwrap();
    assert_eq!(set.keys().len(), 2, "{:?}", set.skipped());
    assert_eq!(set.keys()[0].key_type(), KeyType::EcP256);
    // RFC 8037 A.3 gives this key's thumbprint.
    assert_eq!(
        set.keys()[1].thumbprint(),
        "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    );
}
