//! RequestAuthentication at request time with real signed tokens: Istio's samples from the
//! corpus (`jwt/samples`, `jwt/e2e`; skipped with a message when the corpus is absent) and
//! tokens minted here with `rampart_certs::jwt` (ES256/EdDSA/RSA keys made at test time).

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use rampart_authz::{
    AuthnOutcome, Engine, FileJwksFetcher, HeaderMutation, HttpRequest, JwksCache, MeshConfig,
    NoExtAuthz, NoRemoteJwks, ReasonCode, Verdict, Workload,
};
use rampart_certs::jwt::JwtSigner;
use rampart_certs::{KeyAlgorithm, PrivateKey};
use serde_json::json;

fn now() -> SystemTime {
    SystemTime::now()
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// A RequestAuthentication in foo for httpbin with one jwtRule given as YAML flow fields.
fn ra(name: &str, rule: &str, jwks: &str) -> String {
    let indented: String = jwks.lines().map(|l| format!("        {l}\n")).collect();
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: {name}, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  jwtRules:\n  - {rule}\n    jwks: |\n{indented}---\n"
    )
}

fn get(path: &str) -> HttpRequest {
    HttpRequest::new("GET", path, "httpbin.foo")
}

fn bearer(token: &str) -> HttpRequest {
    get("/").with_header("Authorization", &format!("Bearer {token}"))
}

fn authn(e: &Engine, req: &HttpRequest, t: SystemTime) -> AuthnOutcome {
    e.authenticate_request(&httpbin(), req, t, &NoRemoteJwks)
}

fn status(o: &AuthnOutcome) -> u16 {
    match o {
        AuthnOutcome::Rejected { status, .. } => *status,
        _ => 200,
    }
}

fn reason(o: &AuthnOutcome) -> String {
    match o {
        AuthnOutcome::Rejected { reason, .. } => reason.clone(),
        other => format!("{other:?}"),
    }
}

struct Corpus {
    samples_jwks: String,
    e2e_jwks: String,
    dir: std::path::PathBuf,
}

impl Corpus {
    fn load() -> Option<Corpus> {
        let dir = corpus_dir()?.join("jwt");
        Some(Corpus {
            samples_jwks: std::fs::read_to_string(dir.join("samples/jwks.json")).unwrap(),
            e2e_jwks: std::fs::read_to_string(dir.join("e2e/jwks.json")).unwrap(),
            dir,
        })
    }
    fn sample(&self, name: &str) -> String {
        read_token(&self.dir.join("samples").join(name))
    }
    fn e2e(&self, name: &str) -> String {
        read_token(&self.dir.join("e2e/tokens").join(name))
    }
}

fn read_token(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap().trim().to_string()
}

#[test]
fn istio_sample_tokens_verify_and_expired_is_refused() {
    let Some(c) = Corpus::load() else { return };
    let e = engine(&ra(
        "demo",
        "issuer: testing@secure.istio.io",
        &c.samples_jwks,
    ));
    for tok in ["demo.jwt", "groups-scope.jwt"] {
        match authn(&e, &bearer(&c.sample(tok)), now()) {
            AuthnOutcome::Authenticated {
                principal,
                headers,
                policy,
                claims,
            } => {
                assert_eq!(
                    principal.as_deref(),
                    Some("testing@secure.istio.io/testing@secure.istio.io")
                );
                assert_eq!(policy.to_string(), "foo/demo");
                // forwardOriginalToken defaults to false: the header is removed.
                assert_eq!(
                    headers,
                    vec![HeaderMutation::Remove {
                        name: "authorization".into()
                    }]
                );
                if tok == "groups-scope.jwt" {
                    assert_eq!(claims.claims["scope"], json!(["scope1", "scope2"]));
                }
            }
            other => panic!("{tok}: {other:?}"),
        }
    }
    // The e2e issuer's expired token with its own JWKS: 401.
    let e = engine(&ra("e2e", "issuer: test-issuer-1@istio.io", &c.e2e_jwks));
    let ok = authn(&e, &bearer(&c.e2e("issuer1.jwt")), now());
    assert!(matches!(ok, AuthnOutcome::Authenticated { .. }), "{ok:?}");
    let expired = authn(&e, &bearer(&c.e2e("issuer1-expired.jwt")), now());
    assert_eq!(status(&expired), 401);
    assert!(reason(&expired).contains("expired"), "{}", reason(&expired));
    // ... but not before its exp (the `now` clock), nor within the 60 s skew.
    let exp = 1562182856;
    assert_eq!(
        status(&authn(
            &e,
            &bearer(&c.e2e("issuer1-expired.jwt")),
            at(exp - 10)
        )),
        200
    );
    assert_eq!(
        status(&authn(
            &e,
            &bearer(&c.e2e("issuer1-expired.jwt")),
            at(exp + 59)
        )),
        200
    );
    assert_eq!(
        status(&authn(
            &e,
            &bearer(&c.e2e("issuer1-expired.jwt")),
            at(exp + 61)
        )),
        401
    );
}

#[test]
fn wrong_key_unknown_issuer_malformed_tampered() {
    let Some(c) = Corpus::load() else { return };
    // Sample token verified against the e2e key set (same issuer name configured): 401.
    let e = engine(&ra("x", "issuer: testing@secure.istio.io", &c.e2e_jwks));
    let r = authn(&e, &bearer(&c.sample("demo.jwt")), now());
    assert_eq!(status(&r), 401, "{r:?}");
    // Issuer not configured.
    let e = engine(&ra("e2e", "issuer: test-issuer-1@istio.io", &c.e2e_jwks));
    let r = authn(&e, &bearer(&c.e2e("issuer2.jwt")), now());
    assert_eq!(status(&r), 401);
    assert!(reason(&r).contains("issuer is not configured"));
    // Istio's TokenInvalid literal.
    assert_eq!(status(&authn(&e, &bearer("TokenInvalid"), now())), 401);
    // Tampered payload (signature no longer matches).
    let t = c.e2e("issuer1.jwt");
    let parts: Vec<&str> = t.split('.').collect();
    let forged_claims =
        base64_url(br#"{"iss":"test-issuer-1@istio.io","sub":"admin","exp":4715782722}"#);
    let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
    let r = authn(&e, &bearer(&forged), now());
    assert_eq!(status(&r), 401, "{r:?}");
    assert!(reason(&r).contains("verification fails"));
    // No token at all: passes with no principal.
    assert_eq!(authn(&e, &get("/"), now()), AuthnOutcome::NoToken);
    // A non-Bearer Authorization header is not a token.
    let basic = get("/").with_header("Authorization", "Basic dXNlcjpwYXNz");
    assert_eq!(authn(&e, &basic, now()), AuthnOutcome::NoToken);
}

fn base64_url(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[test]
fn audiences() {
    let Some(c) = Corpus::load() else { return };
    let e = engine(
        &ra(
            "aud",
            "{issuer: test-issuer-1@istio.io, audiences: [foo]}",
            &c.e2e_jwks,
        )
        .replace(
            "  - {issuer: test-issuer-1@istio.io, audiences: [foo]}\n    jwks",
            "  - issuer: test-issuer-1@istio.io\n    audiences: [foo]\n    jwks",
        ),
    );
    assert_eq!(
        status(&authn(&e, &bearer(&c.e2e("issuer1-aud-foo.jwt")), now())),
        200
    );
    assert_eq!(
        status(&authn(
            &e,
            &bearer(&c.e2e("issuer1-aud-list-foo-buzz.jwt")),
            now()
        )),
        200
    );
    // Valid signature, no aud / other aud: 403, not 401.
    let r = authn(&e, &bearer(&c.e2e("issuer1.jwt")), now());
    assert_eq!(status(&r), 403);
    assert_eq!(reason(&r), "Audiences in Jwt are not allowed");
    let e = engine(&ra(
        "aud",
        "issuer: test-issuer-1@istio.io\n    audiences: [bar]",
        &c.e2e_jwks,
    ));
    assert_eq!(
        status(&authn(
            &e,
            &bearer(&c.e2e("issuer1-aud-list-foo-buzz.jwt")),
            now()
        )),
        403
    );
    // Through check(): 403 with the JWT reason code.
    let mut ctx = http("GET", "/").0;
    ctx.http = Some(bearer(&c.e2e("issuer1.jwt")));
    let d = e.check(&httpbin(), &ctx, now(), &NoRemoteJwks, &NoExtAuthz);
    assert_eq!(
        (d.decision, d.status, d.reason_code),
        (Verdict::Deny, 403, ReasonCode::JwtAudienceMismatch)
    );
}

#[test]
fn locations_and_outputs() {
    let Some(c) = Corpus::load() else { return };
    let tok = c.e2e("issuer1-nested-claims-2.jwt");
    // fromHeaders with a prefix; Authorization is then not looked at.
    let e = engine(&ra(
        "h",
        "issuer: test-issuer-1@istio.io\n    fromHeaders: [{name: x-jwt, prefix: 'Token '}]\n    outputPayloadToHeader: x-payload\n    outputClaimToHeaders: [{header: x-sub, claim: sub}, {header: x-nested, claim: nested.key2}, {header: x-none, claim: nope}]",
        &c.e2e_jwks,
    ));
    assert_eq!(authn(&e, &bearer(&tok), now()), AuthnOutcome::NoToken);
    let req = get("/").with_header("X-Jwt", &format!("Token {tok}"));
    match authn(&e, &req, now()) {
        AuthnOutcome::Authenticated { headers, .. } => {
            let payload = tok.split('.').nth(1).unwrap().to_string();
            assert_eq!(
                headers,
                vec![
                    HeaderMutation::Set {
                        name: "x-payload".into(),
                        value: payload
                    },
                    HeaderMutation::Set {
                        name: "x-sub".into(),
                        value: "sub-1".into()
                    },
                    HeaderMutation::Set {
                        name: "x-nested".into(),
                        value: "valueC".into()
                    },
                    HeaderMutation::Remove {
                        name: "x-jwt".into()
                    },
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    // Wrong prefix: not a token.
    let req = get("/").with_header("x-jwt", &format!("Bearer {tok}"));
    assert_eq!(authn(&e, &req, now()), AuthnOutcome::NoToken);
    // fromParams and fromCookies; forwardOriginalToken keeps the header.
    let e = engine(&ra(
        "p",
        "issuer: test-issuer-1@istio.io\n    fromParams: [token]\n    fromCookies: [session]\n    forwardOriginalToken: true",
        &c.e2e_jwks,
    ));
    let r = authn(&e, &get(&format!("/x?a=1&token={tok}")), now());
    assert!(
        matches!(&r, AuthnOutcome::Authenticated { headers, .. } if headers.is_empty()),
        "{r:?}"
    );
    let r = authn(
        &e,
        &get("/").with_header("Cookie", &format!("a=b; session={tok}")),
        now(),
    );
    assert!(matches!(r, AuthnOutcome::Authenticated { .. }), "{r:?}");
    assert_eq!(
        authn(&e, &get(&format!("/x?access_token={tok}")), now()),
        AuthnOutcome::NoToken
    );
    // Defaults: Authorization: Bearer and ?access_token=.
    let e = engine(&ra("d", "issuer: test-issuer-1@istio.io", &c.e2e_jwks));
    assert!(matches!(
        authn(&e, &get(&format!("/x?access_token={tok}")), now()),
        AuthnOutcome::Authenticated { .. }
    ));
    // One valid and one expired token: 401.
    let req = bearer(&tok);
    let req = HttpRequest {
        path: format!("/x?access_token={}", c.e2e("issuer1-expired.jwt")),
        ..req
    };
    assert_eq!(status(&authn(&e, &req, now())), 401);
    // CORS preflight skips JWT checks even with a bad token; a plain OPTIONS does not.
    let pre = HttpRequest::new("OPTIONS", "/", "h")
        .with_header("Origin", "https://a.example")
        .with_header("Access-Control-Request-Method", "GET")
        .with_header("Authorization", "Bearer TokenInvalid");
    assert_eq!(authn(&e, &pre, now()), AuthnOutcome::NoToken);
    let plain =
        HttpRequest::new("OPTIONS", "/", "h").with_header("Authorization", "Bearer TokenInvalid");
    assert_eq!(status(&authn(&e, &plain, now())), 401);
}

#[test]
fn merged_rules_from_several_policies_and_root_namespace() {
    let Some(c) = Corpus::load() else { return };
    let yaml = format!(
        "{}{}",
        ra("one", "issuer: test-issuer-1@istio.io", &c.e2e_jwks),
        ra("two", "issuer: test-issuer-2@istio.io", &c.e2e_jwks)
            .replace("namespace: foo", "namespace: istio-system")
            .replace("  selector: {matchLabels: {app: httpbin}}\n", "")
    );
    let e = engine(&yaml);
    for t in ["issuer1.jwt", "issuer2.jwt"] {
        assert_eq!(status(&authn(&e, &bearer(&c.e2e(t)), now())), 200, "{t}");
    }
    assert_eq!(
        status(&authn(&e, &bearer(&c.e2e("issuer3.jwt")), now())),
        401
    );
    // A workload elsewhere only gets the mesh-wide rule.
    let other = Workload::new("bar", [("app", "x")]);
    let r = e.authenticate_request(&other, &bearer(&c.e2e("issuer1.jwt")), now(), &NoRemoteJwks);
    assert_eq!(status(&r), 401);
}

#[test]
fn authentication_feeds_authorization() {
    let Some(c) = Corpus::load() else { return };
    let yaml = format!(
        "{}{}---\n{}",
        ra("e2e", "issuer: test-issuer-2@istio.io", &c.e2e_jwks),
        policy(
            "need-jwt",
            "ALLOW",
            "[{from: [{source: {requestPrincipals: ['test-issuer-2@istio.io/sub-2']}}], when: [{key: 'request.auth.claims[scope]', values: [read]}]}]"
        ),
        ""
    );
    let e = engine(&yaml);
    let check = |tok: Option<String>| {
        let mut ctx = http("GET", "/").0;
        if let Some(t) = tok {
            ctx.http = Some(bearer(&t));
        }
        e.check(&httpbin(), &ctx, now(), &NoRemoteJwks, &NoExtAuthz)
    };
    // scope "write read" is split on spaces, so `read` matches.
    let d = check(Some(c.e2e("issuer2-scope-write-read.jwt")));
    assert!(d.is_allowed(), "{}", d.summary());
    assert_eq!(
        d.headers,
        vec![HeaderMutation::Remove {
            name: "authorization".into()
        }]
    );
    // Valid token without the scope: 403 from authorization.
    let d = check(Some(c.e2e("issuer2.jwt")));
    assert_eq!((d.status, d.reason_code), (403, ReasonCode::NoAllowMatched));
    // No token: no request principal, 403.
    assert_eq!(check(None).status, 403);
    // Invalid token: 401 before authorization.
    let d = check(Some("a.b.c".into()));
    assert_eq!((d.status, d.reason_code), (401, ReasonCode::JwtInvalid));
}

// ---- tokens minted here: other algorithms, nbf, jwksUri cache -------------------------

fn signer(alg: KeyAlgorithm) -> JwtSigner {
    let key = PrivateKey::generate(alg).unwrap();
    JwtSigner::new(&key, "k1").unwrap()
}

fn jwks_text(s: &JwtSigner) -> String {
    s.jwks().unwrap().to_json().to_string()
}

#[test]
fn minted_tokens_every_family_and_time_rules() {
    let t0 = 1_900_000_000u64;
    for alg in [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
    ] {
        let s = signer(alg);
        let e = engine(&ra("m", "issuer: https://idp.example", &jwks_text(&s)));
        let tok = |claims: serde_json::Value| bearer(&s.sign(&claims).unwrap());
        let good = tok(json!({"iss": "https://idp.example", "sub": "u1", "exp": t0 + 100}));
        assert_eq!(status(&authn(&e, &good, at(t0))), 200, "{alg:?}");
        // nbf in the future beyond the skew: 401; within: fine.
        let nbf = tok(json!({"iss": "https://idp.example", "sub": "u1", "nbf": t0 + 120}));
        assert_eq!(status(&authn(&e, &nbf, at(t0))), 401, "{alg:?}");
        assert_eq!(status(&authn(&e, &nbf, at(t0 + 61))), 200, "{alg:?}");
        // Another key with the same kid: 401.
        let other = signer(alg);
        let forged = bearer(
            &other
                .sign(&json!({"iss": "https://idp.example", "sub": "u1"}))
                .unwrap(),
        );
        assert_eq!(status(&authn(&e, &forged, at(t0))), 401, "{alg:?}");
    }
}

struct MapFetcher(std::cell::RefCell<Result<String, String>>);

impl rampart_authz::JwksFetcher for MapFetcher {
    fn fetch(&self, _uri: &str, _t: Duration) -> Result<String, String> {
        self.0.borrow().clone()
    }
}

#[test]
fn jwks_uri_cache_fails_closed_then_keeps_last_good() {
    let s = signer(KeyAlgorithm::EcdsaP256);
    let yaml = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: foo}\nspec:\n  jwtRules:\n  - {issuer: https://idp.example, jwksUri: 'https://idp.example/jwks.json'}\n";
    let e = engine(yaml);
    let req = bearer(
        &s.sign(&json!({"iss": "https://idp.example", "sub": "u"}))
            .unwrap(),
    );
    let t = at(1_900_000_000);
    let mut cache = JwksCache::new(Duration::from_secs(600), Duration::from_secs(5));
    let fetcher = MapFetcher(std::cell::RefCell::new(Err("connection refused".into())));
    // First fetch fails: tokens refused, requests without a token pass.
    cache.refresh(&e, &fetcher, t);
    assert_eq!(
        status(&e.authenticate_request(&httpbin(), &req, t, &cache)),
        401
    );
    assert_eq!(
        e.authenticate_request(&httpbin(), &get("/"), t, &cache),
        AuthnOutcome::NoToken
    );
    assert!(cache.last_error("https://idp.example/jwks.json").is_some());
    // Not retried before the retry interval; then succeeds.
    *fetcher.0.borrow_mut() = Ok(jwks_text(&s));
    assert!(cache.due(&e, t + Duration::from_secs(1)).is_empty());
    cache.refresh(&e, &fetcher, t + Duration::from_secs(5));
    assert_eq!(
        status(&e.authenticate_request(&httpbin(), &req, t, &cache)),
        200
    );
    // A failed refresh, or a body that is not a JWKS, keeps the last good set.
    *fetcher.0.borrow_mut() = Ok("<html>oops</html>".into());
    cache.refresh(&e, &fetcher, t + Duration::from_secs(700));
    assert_eq!(
        status(&e.authenticate_request(&httpbin(), &req, t, &cache)),
        200
    );
    *fetcher.0.borrow_mut() = Ok(r#"{"keys": []}"#.into());
    cache.refresh(&e, &fetcher, t + Duration::from_secs(1400));
    assert_eq!(
        status(&e.authenticate_request(&httpbin(), &req, t, &cache)),
        200
    );
    // Local files for offline checks.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.json"), jwks_text(&s)).unwrap();
    let files = FileJwksFetcher {
        base_dir: Some(dir.path().to_path_buf()),
        overrides: [(
            "https://idp.example/jwks.json".to_string(),
            "keys.json".into(),
        )]
        .into(),
    };
    let mut cache = JwksCache::default();
    cache.refresh(&e, &files, t);
    assert_eq!(
        status(&e.authenticate_request(&httpbin(), &req, t, &cache)),
        200
    );
    let _ = MeshConfig::default();
}

/// A jwtRule with neither `jwks` nor `jwksUri` gets its keys by OpenID discovery of its
/// issuer, as in Istio: the engine names the issuer's configuration document to fetch (a
/// `discovery` fetch) and verifies with what is cached under it; an issuer that is not an
/// http(s) URL has no discovery and its tokens are refused (fail closed). Offline, the key
/// set may be mapped by the issuer.
#[test]
fn issuers_without_keys_are_found_by_openid_discovery() {
    use rampart_authz::openid_discovery_uri as doc;
    assert_eq!(
        doc("https://accounts.example.com").as_deref(),
        Some("https://accounts.example.com/.well-known/openid-configuration")
    );
    assert_eq!(
        doc("https://idp.example/tenant/v2.0/").as_deref(),
        Some("https://idp.example/tenant/v2.0/.well-known/openid-configuration")
    );
    for not_a_url in [
        "testing@secure.istio.io",
        "idp.example",
        "https://",
        "https:///path",
        "https://idp.example/?x=1",
        "https://idp.example/#f",
        "https://user@idp.example",
        "https://idp.example/a b",
        "ftp://idp.example",
    ] {
        assert_eq!(doc(not_a_url), None, "{not_a_url}");
    }

    let s = signer(KeyAlgorithm::EcdsaP256);
    let iss = "https://idp.example/tenant";
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: foo}}\nspec:\n  jwtRules:\n  - {{issuer: '{iss}'}}\n  - {{issuer: 'testing@secure.istio.io'}}\n"
    );
    let e = engine(&yaml);
    let fetches = e.jwks_uris();
    let config = "openid:https://idp.example/tenant/.well-known/openid-configuration";
    assert_eq!(fetches.len(), 1, "{fetches:?}");
    assert_eq!(fetches[0].uri, config);
    assert!(fetches[0].discovery);
    assert!(
        e.warnings()
            .iter()
            .any(|w| w.contains("testing@secure.istio.io") && w.contains("OpenID discovery")),
        "{:?}",
        e.warnings()
    );
    let t = at(1_900_000_000);
    let good = bearer(&s.sign(&json!({"iss": iss, "sub": "u"})).unwrap());
    // Nothing fetched yet: refused.
    let o = e.authenticate_request(&httpbin(), &good, t, &JwksCache::default());
    assert_eq!(status(&o), 401, "{o:?}");
    // The key set found through discovery (the proxy's fetcher does the two steps), mapped
    // offline by the issuer itself.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.json"), jwks_text(&s)).unwrap();
    let files = FileJwksFetcher {
        base_dir: Some(dir.path().to_path_buf()),
        overrides: [(iss.to_string(), "keys.json".into())].into(),
    };
    let mut cache = JwksCache::default();
    cache.refresh(&e, &files, t);
    assert_eq!(cache.last_error(config), None);
    let o = e.authenticate_request(&httpbin(), &good, t, &cache);
    assert!(matches!(o, AuthnOutcome::Authenticated { .. }), "{o:?}");
    // Negative twins: a token of another key, and of the issuer without discovery.
    let forged = bearer(
        &signer(KeyAlgorithm::EcdsaP256)
            .sign(&json!({"iss": iss, "sub": "u"}))
            .unwrap(),
    );
    assert_eq!(
        status(&e.authenticate_request(&httpbin(), &forged, t, &cache)),
        401
    );
    let no_discovery = bearer(
        &s.sign(&json!({"iss": "testing@secure.istio.io", "sub": "u"}))
            .unwrap(),
    );
    let o = e.authenticate_request(&httpbin(), &no_discovery, t, &cache);
    assert_eq!(status(&o), 401, "{o:?}");

    // A jwksUri naming the configuration document itself is another key set than the
    // discovered one, whichever policy comes first: the document is no JWKS, so only that
    // rule fails.
    let doc_url = config.strip_prefix("openid:").unwrap();
    let other_iss = "https://other.example";
    for (first, second) in [("a", "b"), ("b", "a")] {
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: {first}, namespace: foo}}\nspec:\n  jwtRules:\n  - {{issuer: '{other_iss}', jwksUri: '{doc_url}'}}\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: {second}, namespace: foo}}\nspec:\n  jwtRules:\n  - {{issuer: '{iss}'}}\n"
        );
        let e = engine(&yaml);
        let mut keys: Vec<String> = e.jwks_uris().into_iter().map(|f| f.uri).collect();
        keys.sort();
        assert_eq!(keys, [doc_url.to_string(), config.to_string()]);
        std::fs::write(
            dir.path().join("doc.json"),
            format!(r#"{{"issuer": "{iss}", "jwks_uri": "https://idp.example/k"}}"#),
        )
        .unwrap();
        let files = FileJwksFetcher {
            base_dir: Some(dir.path().to_path_buf()),
            overrides: [
                (iss.to_string(), "keys.json".into()),
                (doc_url.to_string(), "doc.json".into()),
            ]
            .into(),
        };
        let mut cache = JwksCache::default();
        cache.refresh(&e, &files, t);
        let o = e.authenticate_request(&httpbin(), &good, t, &cache);
        assert!(matches!(o, AuthnOutcome::Authenticated { .. }), "{o:?}");
        let by_doc = bearer(&s.sign(&json!({"iss": other_iss, "sub": "u"})).unwrap());
        assert_eq!(
            status(&e.authenticate_request(&httpbin(), &by_doc, t, &cache)),
            401
        );
    }
}

/// Envoy's jwt_authn, as Istio configures it, in the cases Rampart used to answer otherwise:
/// the prefix found anywhere in the header, audiences compared without scheme and trailing
/// slash, any rule for the issuer may accept the token (requires_any), a huge `exp`, an
/// empty CORS preflight; each with its negative twin.
#[test]
fn envoy_extraction_audiences_and_any_provider() {
    let t0 = 1_900_000_000u64;
    let s = signer(KeyAlgorithm::EcdsaP256);
    let tok = |s: &JwtSigner, claims: serde_json::Value| s.sign(&claims).unwrap();
    let iss = "https://idp.example";
    let e = engine(&ra("m", &format!("issuer: {iss}"), &jwks_text(&s)));
    let good = tok(&s, json!({"iss": iss, "sub": "u1", "exp": t0 + 100}));
    let forged = tok(
        &signer(KeyAlgorithm::EcdsaP256),
        json!({"iss": iss, "sub": "admin", "exp": t0 + 100}),
    );
    // The prefix anywhere: `Basic x, Bearer <token>` carries a token, checked as such.
    let in_list =
        |t: &str| get("/").with_header("Authorization", &format!("Basic eDp5, Bearer {t}"));
    assert_eq!(status(&authn(&e, &in_list(&forged), at(t0))), 401);
    assert_eq!(status(&authn(&e, &in_list(&good), at(t0))), 200);
    // A huge exp (past year 9999: an invalid date to the verifier) is a 401, not an
    // overflow panic in the request task; a far but valid one verifies.
    let far = tok(&s, json!({"iss": iss, "sub": "u1", "exp": i64::MAX}));
    assert_eq!(status(&authn(&e, &bearer(&far), at(t0))), 401);
    let far_ok = tok(
        &s,
        json!({"iss": iss, "sub": "u1", "exp": 250_000_000_000u64}),
    );
    assert_eq!(status(&authn(&e, &bearer(&far_ok), at(t0))), 200);
    let far_forged = format!(
        "{}.{}.{}",
        far.split('.').next().unwrap(),
        base64_url(format!(r#"{{"iss":"{iss}","exp":9223372036854775807}}"#).as_bytes()),
        far.split('.').nth(2).unwrap()
    );
    assert_eq!(status(&authn(&e, &bearer(&far_forged), at(t0))), 401);
    // A verified token that is not forwarded leaves the query too (each occurrence),
    // the other parameters kept byte for byte.
    match authn(&e, &get(&format!("/x?a=%41&access_token={good}&b")), at(t0)) {
        AuthnOutcome::Authenticated { headers, .. } => assert_eq!(
            headers,
            vec![HeaderMutation::RemoveQueryParam {
                name: "access_token".into()
            }]
        ),
        other => panic!("{other:?}"),
    }
    // The same token in the header and the query: removed from both.
    let both = bearer(&good);
    let both = HttpRequest {
        path: format!("/x?access_token={good}"),
        ..both
    };
    match authn(&e, &both, at(t0)) {
        AuthnOutcome::Authenticated { headers, .. } => assert_eq!(
            headers,
            vec![
                HeaderMutation::Remove {
                    name: "authorization".into()
                },
                HeaderMutation::RemoveQueryParam {
                    name: "access_token".into()
                }
            ]
        ),
        other => panic!("{other:?}"),
    }
    for (target, want) in [
        ("/x?a=%41&access_token=t&b", "/x?a=%41&b"),
        ("/x?access_token=t", "/x"),
        ("/x?access_token=t&access%5Ftoken=u&c=1#f", "/x?c=1#f"),
        ("/x?access_tokens=t", "/x?access_tokens=t"),
        ("/x", "/x"),
    ] {
        assert_eq!(
            rampart_authz::remove_query_param(target, "access_token"),
            want
        );
    }
    // A CORS preflight needs both headers non-empty to skip the JWT checks.
    let pre = |origin: &str| {
        HttpRequest::new("OPTIONS", "/", "h")
            .with_header("Origin", origin)
            .with_header("Access-Control-Request-Method", "GET")
            .with_header("Authorization", &format!("Bearer {forged}"))
    };
    assert_eq!(
        authn(&e, &pre("https://a.example"), at(t0)),
        AuthnOutcome::NoToken
    );
    assert_eq!(status(&authn(&e, &pre(""), at(t0))), 401);

    // Audiences without scheme and trailing slash.
    let e = engine(&ra(
        "a",
        &format!("issuer: {iss}\n    audiences: [api.example.com]"),
        &jwks_text(&s),
    ));
    for (aud, want) in [
        ("https://api.example.com/", 200),
        ("http://api.example.com", 200),
        ("api.example.com/", 200),
        ("https://api.example.org/", 403),
        ("api.example.com.evil", 403),
    ] {
        let t = tok(
            &s,
            json!({"iss": iss, "sub": "u1", "aud": aud, "exp": t0 + 100}),
        );
        assert_eq!(status(&authn(&e, &bearer(&t), at(t0))), want, "{aud}");
    }

    // Two policies for one issuer with other audiences: either accepts (Istio's
    // requires_any); neither: 403.
    let two = format!(
        "{}{}",
        ra(
            "a",
            &format!("issuer: {iss}\n    audiences: [svc-a]"),
            &jwks_text(&s)
        ),
        ra(
            "b",
            &format!("issuer: {iss}\n    audiences: [svc-b]"),
            &jwks_text(&s)
        ),
    );
    let e = engine(&two);
    for (aud, want) in [("svc-a", 200), ("svc-b", 200), ("svc-c", 403)] {
        let t = tok(
            &s,
            json!({"iss": iss, "sub": "u1", "aud": aud, "exp": t0 + 100}),
        );
        assert_eq!(status(&authn(&e, &bearer(&t), at(t0))), want, "{aud}");
    }
    // A key migration: the issuer's old and new key sets in two policies; a token of either
    // key verifies, one of a third key does not (401, not 403).
    let new_key = signer(KeyAlgorithm::EcdsaP256);
    let e = engine(&format!(
        "{}{}",
        ra("old", &format!("issuer: {iss}"), &jwks_text(&s)),
        ra("new", &format!("issuer: {iss}"), &jwks_text(&new_key)),
    ));
    for (signer, want) in [(&s, 200), (&new_key, 200)] {
        let t = tok(signer, json!({"iss": iss, "sub": "u1", "exp": t0 + 100}));
        assert_eq!(status(&authn(&e, &bearer(&t), at(t0))), want);
    }
    assert_eq!(status(&authn(&e, &bearer(&forged), at(t0))), 401);
    // An issuer-less rule (its keys unreachable here) does not capture the tokens of an
    // issuer with a rule of its own; a token of another issuer still meets only it: 401.
    let e = engine(&format!(
        "{}apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: any, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  jwtRules:\n  - jwksUri: https://keys.example/jwks.json\n---\n",
        ra("m", &format!("issuer: {iss}"), &jwks_text(&s)),
    ));
    assert_eq!(status(&authn(&e, &bearer(&good), at(t0))), 200);
    let stranger = tok(&s, json!({"iss": "https://other.example", "exp": t0 + 100}));
    assert_eq!(status(&authn(&e, &bearer(&stranger), at(t0))), 401);
}

/// Policy sees the request as the app will: headers written from the verified token
/// (`outputClaimToHeaders`) are there for a DENY or an ALLOW on them, and a token that is
/// not forwarded is gone (as Envoy's jwt_authn runs before RBAC).
#[test]
fn policy_sees_the_headers_authentication_writes() {
    let t0 = 1_900_000_000u64;
    let s = signer(KeyAlgorithm::EcdsaP256);
    let iss = "https://idp.example";
    let yaml = format!(
        "{}---\n{}---\n{}",
        ra(
            "out",
            &format!("issuer: {iss}\n    outputClaimToHeaders: [{{header: x-role, claim: role}}]"),
            &jwks_text(&s)
        ),
        policy(
            "no-guests",
            "DENY",
            "[{when: [{key: 'request.headers[x-role]', values: [guest]}]}]"
        ),
        policy(
            "no-token-header",
            "DENY",
            "[{when: [{key: 'request.headers[authorization]', values: ['*']}]}]"
        ),
    );
    let e = engine(&yaml);
    let check = |role: &str, forged_header: Option<&str>| {
        let t = s
            .sign(&json!({"iss": iss, "sub": "u1", "role": role, "exp": t0 + 100}))
            .unwrap();
        let mut ctx = http("GET", "/").0;
        let mut req = bearer(&t);
        if let Some(v) = forged_header {
            req = req.with_header("x-role", v);
        }
        ctx.http = Some(req);
        e.check(&httpbin(), &ctx, at(t0), &NoRemoteJwks, &NoExtAuthz)
    };
    let d = check("guest", None);
    assert_eq!(d.status, 403, "{}", d.summary());
    // The twin: an admin passes (and the Authorization header policy saw was already gone).
    let d = check("admin", None);
    assert!(d.is_allowed(), "{}", d.summary());
    assert!(d.headers.contains(&HeaderMutation::Set {
        name: "x-role".into(),
        value: "admin".into()
    }));
    // A client's own x-role is replaced by the token's, for policy as for the app.
    let d = check("guest", Some("admin"));
    assert_eq!(d.status, 403, "{}", d.summary());
}

/// Which refusal answers when several rules see tokens, as the `jwt_authn` configuration
/// istiod writes decides (checked against a real Envoy in tests/jwt_envoy_e2e.rs): the rules
/// sorted by issuer, the first rule whose tokens all verify wins and other rules' tokens are
/// not looked at; otherwise the first failing rule's error, unless it only says "another
/// issuer", and then the last real error.
#[test]
fn several_rules_answer_as_envoys_requirements() {
    let t0 = 1_900_000_000u64;
    let (a, b) = (
        signer(KeyAlgorithm::EcdsaP256),
        signer(KeyAlgorithm::EcdsaP256),
    );
    let one = "https://one.example";
    // Listed out of order on purpose: sorted, `one` (key a, audience foo) comes before `one`
    // (key b), then `three` (x-three), then `two` (x-two).
    let yaml = format!(
        "{}{}{}{}",
        ra(
            "p1",
            "issuer: https://two.example\n    fromHeaders: [{name: x-two}]",
            &jwks_text(&a)
        ),
        ra(
            "p2",
            &format!("issuer: {one}\n    audiences: [foo]"),
            &jwks_text(&a)
        ),
        ra(
            "p3",
            "issuer: https://three.example\n    fromHeaders: [{name: x-three}]",
            &jwks_text(&a)
        ),
        ra("p4", &format!("issuer: {one}"), &jwks_text(&b)),
    );
    let e = engine(&yaml);
    let tok = |s: &JwtSigner, claims: serde_json::Value| s.sign(&claims).unwrap();
    let good = tok(
        &a,
        json!({"iss": one, "sub": "u", "aud": "foo", "exp": t0 + 100}),
    );
    let bar_a = tok(
        &a,
        json!({"iss": one, "sub": "u", "aud": "bar", "exp": t0 + 100}),
    );
    let bar_b = tok(
        &b,
        json!({"iss": one, "sub": "u", "aud": "bar", "exp": t0 + 100}),
    );
    let expired = tok(
        &a,
        json!({"iss": one, "sub": "u", "aud": "foo", "exp": t0 - 100}),
    );
    let two = tok(
        &a,
        json!({"iss": "https://two.example", "sub": "t", "exp": t0 + 100}),
    );

    // The first `one` rule refuses the audience, the second has no key for it: 403 (the
    // first rule's error), where "401 unless every rule refused the audience" would say 401.
    let o = authn(&e, &bearer(&bar_a), at(t0));
    assert_eq!(
        (status(&o), reason(&o).as_str()),
        (403, "Audiences in Jwt are not allowed")
    );
    // The second `one` rule accepts what the first refused.
    assert_eq!(status(&authn(&e, &bearer(&bar_b), at(t0))), 200);
    // A key neither rule holds (a rotation): the first rule's 403 answers, and the detail
    // names the missing kid, the proxy's cue to refetch the key set.
    let rotated = JwtSigner::new(
        &PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        "k2",
    )
    .unwrap();
    let o = authn(
        &e,
        &bearer(&tok(
            &rotated,
            json!({"iss": one, "sub": "u", "aud": "bar", "exp": t0 + 100}),
        )),
        at(t0),
    );
    assert_eq!(status(&o), 403);
    assert!(
        reason(&o).starts_with("Audiences in Jwt are not allowed: another rule: ")
            && reason(&o).contains("no key with kid"),
        "{}",
        reason(&o)
    );
    // A good token for one rule; an expired token of the same issuer where only `two` looks
    // (`two` calls it another issuer's): the good rule decides, as Envoy's does.
    let req = bearer(&good).with_header("x-two", &expired);
    assert_eq!(status(&authn(&e, &req, at(t0))), 200);
    // The twin: with no good token anywhere, the bad one is refused.
    let req = get("/").with_header("x-two", &expired);
    let o = authn(&e, &req, at(t0));
    assert_eq!(
        (status(&o), reason(&o).as_str()),
        (401, "Jwt issuer is not configured")
    );
    // `two`'s token in Authorization: another issuer for both `one` rules.
    let o = authn(&e, &bearer(&two), at(t0));
    assert_eq!(
        (status(&o), reason(&o).as_str()),
        (401, "Jwt issuer is not configured")
    );
    // First failure "another issuer" (`one` rules see `two`'s token in Authorization), a
    // real error later (`three` sees an expired token): the real error answers.
    let req = bearer(&two).with_header("x-three", &expired);
    let o = authn(&e, &req, at(t0));
    assert_eq!(
        (status(&o), reason(&o).as_str()),
        (401, "Jwt issuer is not configured")
    );
    let three_expired = tok(
        &a,
        json!({"iss": "https://three.example", "sub": "u", "exp": t0 - 100}),
    );
    let req = bearer(&two).with_header("x-three", &three_expired);
    let o = authn(&e, &req, at(t0));
    assert_eq!((status(&o), reason(&o).as_str()), (401, "Jwt is expired"));
    // A first real error answers even when a later rule only saw another issuer's token.
    let req = bearer(&expired).with_header("x-three", &two);
    let o = authn(&e, &req, at(t0));
    assert_eq!((status(&o), reason(&o).as_str()), (401, "Jwt is expired"));
}

/// jwt_verify_lib's phrases for malformed tokens, in its order of checks.
#[test]
fn malformed_tokens_get_envoys_phrases() {
    let t0 = 1_900_000_000u64;
    let s = signer(KeyAlgorithm::EcdsaP256);
    let e = engine(&ra("p", "issuer: https://idp.example", &jwks_text(&s)));
    let b = |v: &str| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, v);
    let h = b(r#"{"alg":"ES256"}"#);
    let sig = b("sig");
    for (token, want) in [
        (
            format!("{h}.{}.", b("{}")),
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        ),
        (
            format!("{h}..{sig}"),
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        ),
        (
            format!("{}.{}.{sig}", b("[1]"), b("{}")),
            "Jwt header is an invalid JSON",
        ),
        (
            format!("{}.{}.{sig}", b(r#"{"alg":1}"#), b("{}")),
            "Jwt header [alg] field is required and must be a string",
        ),
        (
            format!("{}.{}.{sig}", b(r#"{"alg":"none"}"#), b("{}")),
            "Jwt header [alg] is not supported",
        ),
        (
            format!("{}.{}.{sig}", b(r#"{"alg":"ES256","kid":3}"#), b("{}")),
            "Jwt header [kid] field is not a string",
        ),
        (
            format!("{h}.{}.{sig}", b("nope")),
            "Jwt payload is an invalid JSON",
        ),
        (
            format!("{h}.{}.{sig}", b(r#"{"iss":5}"#)),
            "Jwt payload [iss] field is not a string",
        ),
        (
            format!("{h}.{}.{sig}", b(r#"{"exp":"soon"}"#)),
            "Jwt payload [exp] field is not an integer",
        ),
        (
            format!("{h}.{}.{sig}", b(r#"{"nbf":-1}"#)),
            "Jwt payload [nbf] field is not a positive 64 bit integer",
        ),
        (
            format!("{h}.{}.{sig}", b(r#"{"aud":[1]}"#)),
            "Jwt payload [aud] field is not a string or string list",
        ),
        (
            format!("{h}.{}.ab=c", b("{}")),
            "Jwt signature is an invalid Base64url encoded",
        ),
    ] {
        let o = authn(&e, &bearer(&token), at(t0));
        assert_eq!((status(&o), reason(&o)), (401, want.to_string()), "{token}");
    }
    // A well-formed token signed by another key named by its kid: the key set lacks it.
    let other = signer(KeyAlgorithm::EcdsaP384);
    let t = other
        .sign(&json!({"iss": "https://idp.example", "exp": t0 + 100}))
        .unwrap();
    let o = authn(&e, &bearer(&t), at(t0));
    assert_eq!(status(&o), 401);
    assert!(
        reason(&o).starts_with("Jwks doesn't have key to match kid or alg from Jwt"),
        "{}",
        reason(&o)
    );
}
