//! Istio's sample JWKS and tokens (`conformance/istio/jwt/`): the valid ones verify with the
//! claims Istio documents for them, the expired one is refused.
//!
//! The corpus is read from `../shared/conformance` beside the checkout root, or from
//! `RAMPART_CONFORMANCE_DIR` (the `conformance` folder, or its `istio` folder). CI always
//! has it; where it is absent these tests say so and skip.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rampart_certs::jwt::{self, DEFAULT_LEEWAY, Jwks, JwtError, Validation};
use serde_json::Value;

fn istio_jwt_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("RAMPART_CONFORMANCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance"),
    };
    let candidates = [base.join("istio/jwt"), base.join("jwt")];
    let found = candidates
        .into_iter()
        .find(|d| d.join("e2e/jwks.json").is_file());
    if found.is_none() {
        eprintln!(
            "SKIPPED: Istio conformance corpus not found under {} (set RAMPART_CONFORMANCE_DIR)",
            base.display()
        );
    }
    found
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Check every token listed in `<set>/tokens.json` against `<set>/jwks.json`.
fn check_set(set: &Path) -> usize {
    let jwks = Jwks::parse(&read(&set.join("jwks.json"))).unwrap();
    assert!(jwks.skipped().is_empty(), "{:?}", jwks.skipped());
    let index: Value = serde_json::from_str(&read(&set.join("tokens.json"))).unwrap();
    // Istio's sample kids are the RFC 7638 thumbprints of their keys.
    assert_eq!(
        jwks.keys()[0].kid(),
        Some(jwks.keys()[0].thumbprint().as_str())
    );
    assert_eq!(index["kid"].as_str(), jwks.keys()[0].kid());

    let mut checked = 0;
    for entry in index["tokens"].as_array().unwrap() {
        let Some(file) = entry["file"].as_str() else {
            // Istio's `TokenInvalid`: not a JWT at all; must be refused (Istio: 401).
            let literal = entry["literal"].as_str().unwrap();
            assert!(matches!(
                jwt::verify(literal, &jwks, SystemTime::now(), DEFAULT_LEEWAY),
                Err(JwtError::Malformed { .. })
            ));
            checked += 1;
            continue;
        };
        let token = read(&set.join(file));
        let token = token.trim();
        let payload = &entry["payload"];
        let exp = payload["exp"].as_u64().unwrap();
        let iat = payload["iat"].as_u64().unwrap();
        let at_issue = UNIX_EPOCH + Duration::from_secs(iat);
        let after_expiry = UNIX_EPOCH + Duration::from_secs(exp + 61);

        // Every token verifies when checked at its issue time...
        let jwt = jwt::verify(token, &jwks, at_issue, DEFAULT_LEEWAY)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(jwt.header().algorithm().as_str(), entry["header"]["alg"]);
        assert_eq!(jwt.issuer(), payload["iss"].as_str(), "{file}");
        assert_eq!(jwt.subject(), payload["sub"].as_str(), "{file}");
        assert_eq!(&Value::Object(jwt.claims().clone()), payload, "{file}");
        if let Some(principal) = entry["request_principal"].as_str() {
            let made = format!("{}/{}", jwt.issuer().unwrap(), jwt.subject().unwrap());
            assert_eq!(made, principal, "{file}");
        }
        match &payload["aud"] {
            Value::Null => assert!(jwt.audiences().is_empty()),
            Value::String(a) => assert_eq!(jwt.audiences(), std::slice::from_ref(a)),
            Value::Array(a) => assert_eq!(jwt.audiences().len(), a.len()),
            other => panic!("{file}: aud {other}"),
        }
        // ...and is refused past its expiry plus the 60 s skew.
        assert!(matches!(
            jwt::verify(token, &jwks, after_expiry, DEFAULT_LEEWAY),
            Err(JwtError::Expired { .. })
        ));

        // Today: valid ones verify, the one marked expired is refused as expired.
        let today = jwt::verify(token, &jwks, SystemTime::now(), DEFAULT_LEEWAY);
        if entry["expired"].as_bool() == Some(true) {
            assert!(
                matches!(today, Err(JwtError::Expired { .. })),
                "{file}: {today:?}"
            );
        } else {
            assert!(today.is_ok(), "{file}: {today:?}");
        }

        // A flipped signature bit is refused.
        let (input, sig) = token.rsplit_once('.').unwrap();
        let mut sig = sig.to_owned().into_bytes();
        sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
        let tampered = format!("{input}.{}", String::from_utf8(sig).unwrap());
        assert_eq!(
            jwt::verify(&tampered, &jwks, at_issue, DEFAULT_LEEWAY).unwrap_err(),
            JwtError::BadSignature,
            "{file}"
        );
        checked += 1;
    }
    checked
}

#[test]
fn istio_sample_tokens_verify_and_the_expired_one_is_refused() {
    let Some(dir) = istio_jwt_dir() else { return };
    let e2e = check_set(&dir.join("e2e"));
    let samples = check_set(&dir.join("samples"));
    assert!(e2e >= 14 && samples >= 2, "e2e {e2e}, samples {samples}");
}

#[test]
fn istio_sample_tokens_against_the_wrong_key_set_or_policy_are_refused() {
    let Some(dir) = istio_jwt_dir() else { return };
    let e2e_jwks = Jwks::parse(&read(&dir.join("e2e/jwks.json"))).unwrap();
    let demo = read(&dir.join("samples/demo.jwt"));
    // demo.jwt's kid is not in the e2e set.
    assert!(matches!(
        jwt::verify(demo.trim(), &e2e_jwks, SystemTime::now(), DEFAULT_LEEWAY),
        Err(JwtError::UnknownKid { .. })
    ));

    let aud_foo = read(&dir.join("e2e/tokens/issuer1-aud-foo.jwt"));
    let aud_list = read(&dir.join("e2e/tokens/issuer1-aud-list-foo-buzz.jwt"));
    let policy = |aud: &str| Validation {
        issuer: Some("test-issuer-1@istio.io".into()),
        audiences: vec![aud.into()],
        ..Validation::default()
    };
    let now = SystemTime::now();
    assert!(policy("foo").verify(aud_foo.trim(), &e2e_jwks, now).is_ok());
    assert!(
        policy("buzz")
            .verify(aud_list.trim(), &e2e_jwks, now)
            .is_ok()
    );
    assert!(matches!(
        policy("bar").verify(aud_foo.trim(), &e2e_jwks, now),
        Err(JwtError::AudienceMismatch { .. })
    ));
    let issuer2 = read(&dir.join("e2e/tokens/issuer2.jwt"));
    assert!(matches!(
        policy("foo").verify(issuer2.trim(), &e2e_jwks, now),
        Err(JwtError::IssuerMismatch { .. })
    ));
}
