//! Istio's and Envoy's security advisories as a checklist for the policy engine.
//!
//! Each test names the advisory class it guards against and checks both directions: the
//! request the advisory was about is handled safely, and its harmless twin still gets the
//! ordinary answer. The proxy-level twins (what reaches the app) live in the end-to-end tests;
//! here the engine alone decides, so the cases can be exhaustive and fast.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use rampart_authz::{AuthnOutcome, HttpRequest, NoRemoteJwks, Workload};
use rampart_certs::jwt::JwtSigner;
use rampart_certs::{KeyAlgorithm, PrivateKey};
use serde_json::json;

fn allow(rules: &str) -> rampart_authz::Engine {
    engine(&policy("p", "ALLOW", rules))
}

fn deny(rules: &str) -> rampart_authz::Engine {
    engine(&policy("p", "DENY", rules))
}

// ---- paths ----------------------------------------------------------------------------

/// Fragments (CVE-2021-39156, ISTIO-SECURITY-2021-008): `/admin#x` is the resource `/admin`.
/// A DENY on `/admin` must not be slipped by appending a fragment, and a fragment must not
/// make an ALLOW on a public prefix cover a different resource.
#[test]
fn fragment_does_not_escape_a_path_rule() {
    let e = deny("[{to: [{operation: {paths: [/admin, '/admin/*']}}]}]");
    for p in ["/admin#x", "/admin#", "/admin/#/../x", "/admin?q=1#f"] {
        assert!(
            !allowed(&e, &http("GET", p)),
            "{p} slipped past DENY /admin"
        );
    }
    assert!(allowed(&e, &http("GET", "/public#admin")), "twin: /public");

    let e = allow("[{to: [{operation: {paths: ['/public/*']}}]}]");
    assert!(
        !allowed(&e, &http("GET", "/public/../admin#x")),
        "dot segments are resolved before the ALLOW is judged"
    );
    assert!(allowed(&e, &http("GET", "/public/a#x")), "twin: /public/a");
}

/// Path-normalization bypasses (CVE-2019-9900/9901, CVE-2021-31920): dot segments, doubled
/// slashes and escaped slashes do not get a request past a DENY on the resource they name,
/// under the mesh's default normalization.
#[test]
fn encoded_and_dotted_paths_do_not_escape_a_deny() {
    let e = deny("[{to: [{operation: {paths: ['/admin', '/admin/*']}}]}]");
    for p in [
        "/admin",
        "/./admin",
        "/x/../admin",
        "/admin/",
        "/%61dmin",
        "/x/%2e%2e/admin",
        "/admin/./users",
    ] {
        assert!(
            !allowed(&e, &http("GET", p)),
            "{p} slipped past DENY /admin"
        );
    }
    assert!(
        allowed(&e, &http("GET", "/administrator")),
        "twin: another resource"
    );
    assert!(
        allowed(&e, &http("GET", "/x/admin")),
        "twin: another resource"
    );
}

// ---- hosts and methods ----------------------------------------------------------------

/// Host matching is case-insensitive (CVE-2021-39155, ISTIO-SECURITY-2021-008): an upper-case
/// Host does not slip past a DENY written in lower case, nor the other way round.
#[test]
fn host_case_does_not_escape_a_deny() {
    let e = deny("[{to: [{operation: {hosts: [admin.example.com]}}]}]");
    for h in [
        "admin.example.com",
        "ADMIN.example.com",
        "Admin.Example.Com",
    ] {
        assert!(!allowed(&e, &http("GET", "/").host(h)), "{h}");
    }
    assert!(
        allowed(&e, &http("GET", "/").host("www.example.com")),
        "twin"
    );
}

/// Methods compare as Envoy compares them: exactly, since HTTP methods are case-sensitive
/// (RFC 9110 §9.1). So the safe way to forbid a method is an ALLOW list: a lower-case
/// spelling is then a different method that the ALLOW does not cover.
#[test]
fn method_case_is_exact_so_allow_lists_are_safe() {
    let e = allow("[{to: [{operation: {methods: [GET, HEAD]}}]}]");
    assert!(allowed(&e, &http("GET", "/")));
    for m in ["get", "Get", "POST", "post", "DELETE", "GET "] {
        assert!(
            !allowed(&e, &http(m, "/")),
            "method {m:?} passed an ALLOW of GET/HEAD"
        );
    }
}

// ---- principals -----------------------------------------------------------------------

/// Principals are compared literally, never as a regular expression, so a `.` in a trust
/// domain matches only a `.` (the class of bug where a principal was turned into a regex
/// without escaping).
#[test]
fn principal_metacharacters_are_literal() {
    let e = allow("[{from: [{source: {principals: ['cluster.local/ns/foo/sa/bar']}}]}]");
    assert!(allowed(
        &e,
        &http("GET", "/").peer("spiffe://cluster.local/ns/foo/sa/bar")
    ));
    for p in [
        "spiffe://clusterXlocal/ns/foo/sa/bar",
        "spiffe://cluster.local/ns/foo/sa/barx",
        "spiffe://cluster.local/ns/foo/sa/ba",
        "spiffe://cluster.local/ns/foo/sa/bar/x",
        "spiffe://evil.cluster.local/ns/foo/sa/bar",
    ] {
        assert!(!allowed(&e, &http("GET", "/").peer(p)), "{p} matched");
    }
    // A principal with regex syntax in it matches itself only.
    let e = allow("[{from: [{source: {principals: ['td/ns/a.+/sa/(b|c)']}}]}]");
    assert!(!allowed(
        &e,
        &http("GET", "/").peer("spiffe://td/ns/ab/sa/b")
    ));
    assert!(!allowed(
        &e,
        &http("GET", "/").peer("spiffe://td/ns/axx/sa/c")
    ));
}

/// requestPrincipals are `iss/sub` split at the last slash; metacharacters are literal.
#[test]
fn request_principal_metacharacters_are_literal() {
    let e = allow("[{from: [{source: {requestPrincipals: ['https://idp.example/u.1']}}]}]");
    let tok = |iss: &str, sub: &str| http("GET", "/").jwt(json!({"iss": iss, "sub": sub}));
    assert!(allowed(&e, &tok("https://idp.example", "u.1")));
    assert!(!allowed(&e, &tok("https://idp.example", "uX1")));
    assert!(!allowed(&e, &tok("https://idpXexample", "u.1")));
    assert!(
        !allowed(&e, &http("GET", "/")),
        "no token, no request principal"
    );
}

// ---- repeated headers -----------------------------------------------------------------

/// Repeated headers (CVE-2026-26308): Envoy matched the values joined with `,`, so
/// `x-role: user` + `x-role: admin` slipped past a DENY on `admin` while the app read
/// `admin`. A repeated header must never help a request: a DENY matches if any single value
/// (or the joined value) does; an ALLOW only if every single value (or the joined value)
/// does; `notValues` reads the other way round.
#[test]
fn repeated_headers_never_help_a_request() {
    let two = |a: &str, b: &str| http("GET", "/").header("x-role", a).header("X-Role", b);

    // DENY on a value: any copy triggers it, in either order.
    let e = deny("[{when: [{key: 'request.headers[x-role]', values: [admin]}]}]");
    assert!(!allowed(&e, &two("user", "admin")), "the CVE request");
    assert!(!allowed(&e, &two("admin", "user")));
    assert!(!allowed(&e, &http("GET", "/").header("x-role", "admin")));
    assert!(allowed(&e, &two("user", "guest")), "twin: no copy is admin");
    let e = deny("[{when: [{key: 'request.headers[x-role]', values: ['*min']}]}]");
    assert!(
        !allowed(&e, &two("admin", "user")),
        "suffix on the first copy"
    );

    // DENY on presence: any copy, even an empty one.
    let e = deny("[{when: [{key: 'request.headers[x-debug]', values: ['*']}]}]");
    assert!(!allowed(
        &e,
        &http("GET", "/")
            .header("x-debug", "")
            .header("x-debug", "1")
    ));
    assert!(
        allowed(&e, &http("GET", "/").header("x-other", "1")),
        "twin"
    );

    // DENY with notValues: a trusted copy does not excuse an untrusted one.
    let e = deny("[{when: [{key: 'request.headers[x-env]', notValues: [prod]}]}]");
    assert!(!allowed(&e, &two("prod", "dev")));
    assert!(
        allowed(&e, &http("GET", "/").header("x-env", "prod")),
        "twin"
    );

    // ALLOW on a value: every copy must have it.
    let e = allow("[{when: [{key: 'request.headers[x-role]', values: [admin]}]}]");
    assert!(allowed(&e, &http("GET", "/").header("x-role", "admin")));
    assert!(allowed(&e, &two("admin", "admin")));
    assert!(
        !allowed(&e, &two("guest", "admin")),
        "a second copy cannot add a role"
    );
    assert!(!allowed(&e, &two("admin", "guest")));

    // ALLOW with notValues: no copy may have the refused value.
    let e = allow("[{when: [{key: 'request.headers[x-role]', notValues: [banned]}]}]");
    assert!(allowed(&e, &two("user", "guest")));
    assert!(!allowed(&e, &two("user", "banned")));

    // A policy written for the joined form still matches it.
    let e = allow("[{when: [{key: 'request.headers[x-pair]', values: ['a,b']}]}]");
    assert!(allowed(
        &e,
        &http("GET", "/").header("x-pair", "a").header("x-pair", "b")
    ));
}

// ---- JWT ------------------------------------------------------------------------------

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn signer() -> JwtSigner {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    JwtSigner::new(&key, "k1").unwrap()
}

fn ra_engine(s: &JwtSigner) -> rampart_authz::Engine {
    let jwks = s.jwks().unwrap().to_json().to_string();
    engine(&format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: ra, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  jwtRules:\n  - issuer: https://idp.example\n    jwks: '{jwks}'\n"
    ))
}

fn authn_status(e: &rampart_authz::Engine, req: &HttpRequest, t: SystemTime) -> u16 {
    match e.authenticate_request(&httpbin(), req, t, &NoRemoteJwks) {
        AuthnOutcome::Rejected { status, .. } => status,
        _ => 200,
    }
}

fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Unsigned tokens (`alg: none`) and tokens whose header names another algorithm than the
/// key's are refused, whatever their claims say.
#[test]
fn unsigned_and_alg_confused_tokens_are_refused() {
    let s = signer();
    let e = ra_engine(&s);
    let t0 = 1_900_000_000u64;
    let claims = json!({"iss": "https://idp.example", "sub": "u", "exp": t0 + 100});
    let good = s.sign(&claims).unwrap();
    let req = |tok: &str| {
        HttpRequest::new("GET", "/", "h").with_header("authorization", &format!("Bearer {tok}"))
    };
    assert_eq!(
        authn_status(&e, &req(&good), at(t0)),
        200,
        "twin: a signed token"
    );

    let body = b64(claims.to_string().as_bytes());
    for header in [
        json!({"alg": "none"}),
        json!({"alg": "none", "kid": "k1"}),
        json!({"alg": "HS256", "kid": "k1"}),
        json!({"alg": "RS256", "kid": "k1"}),
    ] {
        let h = b64(header.to_string().as_bytes());
        let sig = good.rsplit('.').next().unwrap();
        for tok in [format!("{h}.{body}."), format!("{h}.{body}.{sig}")] {
            assert_eq!(authn_status(&e, &req(&tok), at(t0)), 401, "{header}");
        }
    }
}

/// Two tokens in one request (two Authorization headers, or a header and a query
/// parameter): never let the good one vouch for the other. Istio refuses a request that
/// carries more than one token in its locations; we must at least never accept a bad one.
#[test]
fn a_bad_second_token_is_not_carried_by_a_good_one() {
    let s = signer();
    let e = ra_engine(&s);
    let t0 = 1_900_000_000u64;
    let good = s
        .sign(&json!({"iss": "https://idp.example", "sub": "u", "exp": t0 + 100}))
        .unwrap();
    let forged = signer()
        .sign(&json!({"iss": "https://idp.example", "sub": "admin", "exp": t0 + 100}))
        .unwrap();
    let two = HttpRequest::new("GET", "/", "h")
        .with_header("authorization", &format!("Bearer {good}"))
        .with_header("authorization", &format!("Bearer {forged}"));
    assert_eq!(authn_status(&e, &two, at(t0)), 401);
    let two = HttpRequest::new("GET", &format!("/?access_token={forged}"), "h")
        .with_header("authorization", &format!("Bearer {good}"));
    assert_eq!(authn_status(&e, &two, at(t0)), 401);
    let one =
        HttpRequest::new("GET", "/", "h").with_header("authorization", &format!("Bearer {good}"));
    assert_eq!(authn_status(&e, &one, at(t0)), 200, "twin");
}

/// A token whose issuer no rule names is 401, not "no token" (which an ALLOW without
/// requestPrincipals would let through), as Envoy's jwt_authn with Istio's config does.
#[test]
fn unknown_issuer_is_rejected_not_ignored() {
    let s = signer();
    let e = ra_engine(&s);
    let t0 = 1_900_000_000u64;
    let tok = s
        .sign(&json!({"iss": "https://other.example", "sub": "u", "exp": t0 + 100}))
        .unwrap();
    let req =
        HttpRequest::new("GET", "/", "h").with_header("authorization", &format!("Bearer {tok}"));
    assert_eq!(authn_status(&e, &req, at(t0)), 401);
    let w = Workload::new("bar", [("app", "other")]);
    assert!(
        !matches!(
            e.authenticate_request(&w, &req, at(t0), &NoRemoteJwks),
            AuthnOutcome::Rejected { .. }
        ),
        "twin: a workload no RequestAuthentication selects ignores the token"
    );
}

/// JWT output headers (`outputPayloadToHeader`, `outputClaimToHeaders`) may not name a
/// header that frames, routes or authenticates the request: a claim written to
/// `content-length` or `host` would let whoever mints tokens reshape requests at the app.
#[test]
fn jwt_output_headers_may_not_frame_or_route_requests() {
    let ra = |fields: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: ra, namespace: foo}}\nspec:\n  jwtRules:\n  - issuer: https://idp.example\n    jwksUri: https://idp.example/jwks\n{fields}"
        )
    };
    for bad in [
        "Host",
        "content-length",
        "Transfer-Encoding",
        "authorization",
        "x-forwarded-client-cert",
    ] {
        for (fields, at) in [
            (
                format!("    outputPayloadToHeader: {bad}\n"),
                "outputPayloadToHeader",
            ),
            (
                format!("    outputClaimToHeaders: [{{header: {bad}, claim: sub}}]\n"),
                "outputClaimToHeaders[0].header",
            ),
        ] {
            let r = rampart_authz::load_str("ra.yaml", &ra(&fields));
            let all = format!("{:?}", r.problems);
            assert!(
                r.problems.iter().any(|p| p.to_string().contains(at)),
                "{bad} at {at} accepted: {all}"
            );
        }
    }
    // Twin: an ordinary header name is fine.
    let r = rampart_authz::load_str(
        "ra.yaml",
        &ra(
            "    outputPayloadToHeader: x-jwt-payload\n    outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]\n",
        ),
    );
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

// ---- addresses --------------------------------------------------------------------------

/// An IPv4 client of a dual-stack (`[::]`) listener is seen as `::ffff:a.b.c.d`: IPv4
/// ranges in `ipBlocks` and `source.ip` must still cover it, or a DENY on them is slipped
/// by connecting to the IPv6 wildcard. Twin: an address outside the range passes.
#[test]
fn ipv4_mapped_clients_meet_ipv4_ranges() {
    let e = deny(
        "[{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}, {when: [{key: source.ip, values: [192.168.0.0/16]}]}]",
    );
    let from = |ip: &str| {
        let mut r = http("GET", "/");
        r.0.source.ip = Some(ip.parse().unwrap());
        r
    };
    for ip in ["::ffff:10.1.2.3", "10.1.2.3", "::ffff:192.168.4.5"] {
        assert!(!allowed(&e, &from(ip)), "{ip} slipped past the DENY");
    }
    for ip in ["::ffff:11.1.2.3", "11.1.2.3", "fd00::10:1:2:3"] {
        assert!(allowed(&e, &from(ip)), "twin: {ip}");
    }
}
