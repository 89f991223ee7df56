//! Untrusted token bytes → RequestAuthentication: parsing a token (in jwt_verify_lib's order),
//! judging it by several rules and combining their verdicts never panics, and every refusal
//! is a 401 or 403 with Envoy's phrase.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use rampart_authz::{
    AuthnOutcome, Engine, HttpRequest, MeshConfig, NoRemoteJwks, Workload, load_str,
};

/// One P-256 public key (no private key exists for it here: no token can verify, every path
/// up to the signature check runs).
const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let policy = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: foo}}\nspec:\n  jwtRules:\n  - {{issuer: https://a.example, audiences: [x], jwks: '{JWKS}'}}\n  - {{issuer: https://a.example, jwks: '{JWKS}', outputClaimToHeaders: [{{header: x-c, claim: c.d}}]}}\n  - {{issuer: https://b.example, jwks: '{JWKS}', fromHeaders: [{{name: x-jwt, prefix: 'T '}}], fromParams: [t], fromCookies: [s]}}\n"
    );
    let engine = Engine::new(
        load_str("fuzz.yaml", &policy).resources,
        MeshConfig::default(),
    );
    let w = Workload::new("foo", [("app", "a")]);
    let path = format!("/p?t={token}&access_token={token}");
    let req = HttpRequest::new("GET", &path, "a.foo")
        .with_header("authorization", &format!("Bearer {token}"))
        .with_header("x-jwt", &format!("T {token}"))
        .with_header("cookie", &format!("s={token}"));
    let now = UNIX_EPOCH + Duration::from_secs(1_900_000_000);
    match engine.authenticate_request(&w, &req, now, &NoRemoteJwks) {
        AuthnOutcome::Rejected { status, reason, .. } => {
            assert!(matches!(status, 401 | 403), "{status}");
            assert!(!reason.is_empty());
        }
        AuthnOutcome::NoToken | AuthnOutcome::Authenticated { .. } => {}
    }
});
