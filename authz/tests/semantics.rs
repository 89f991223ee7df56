//! Table tests for the AuthorizationPolicy semantics of `field-reference.md` §0 and §3,
//! including the surprising rules. Each positive case has its negative twin.

mod common;

use common::*;
use rampart_authz::{
    Action, ENVOY_METADATA_UNSUPPORTED, ExtAuthz, MeshConfig, ReasonCode, RequestContext, Verdict,
    Workload, load_str,
};
use serde_json::json;

fn allow(rules: &str) -> rampart_authz::Engine {
    engine(&policy("p", "ALLOW", rules))
}

fn deny(rules: &str) -> rampart_authz::Engine {
    engine(&policy("p", "DENY", rules))
}

// ---- evaluation order and edge cases (§3.2) ------------------------------------------------

#[test]
fn no_policy_allows() {
    let e = engine("");
    let d = decide(&e, &httpbin(), &http("GET", "/"));
    assert_eq!(d.decision, Verdict::Allow);
    assert_eq!(d.reason_code, ReasonCode::NoAllowPolicy);
    assert_eq!(d.status, 200);
}

#[test]
fn empty_spec_allows_nothing() {
    let e = engine(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: foo}\nspec: {}\n",
    );
    let d = decide(&e, &httpbin(), &http("GET", "/"));
    assert_eq!(d.decision, Verdict::Deny);
    assert_eq!(d.status, 403);
    assert_eq!(d.reason_code, ReasonCode::NoAllowMatched);
    assert!(d.reason.contains("foo/allow-nothing"), "{}", d.reason);
    // ... also on TCP.
    assert!(!allowed(&e, &tcp(9000)));
    // A workload in another namespace is not affected.
    let other = Workload::new("bar", [("app", "httpbin")]);
    assert!(decide(&e, &other, &http("GET", "/")).is_allowed());
}

#[test]
fn empty_rule_allows_all_and_denies_all() {
    let e = allow("[{}]");
    let d = decide(&e, &httpbin(), &http("GET", "/x"));
    assert_eq!(d.decision, Verdict::Allow);
    assert_eq!(d.rule, Some(0));
    assert_eq!(d.policy.as_ref().unwrap().name, "p");
    let e = deny("[{}]");
    let d = decide(&e, &httpbin(), &http("GET", "/x"));
    assert_eq!(d.decision, Verdict::Deny);
    assert_eq!(d.reason_code, ReasonCode::DenyMatched);
    assert_eq!(d.action, Some(Action::Deny));
}

#[test]
fn deny_wins_over_allow() {
    let e = engine(&format!(
        "{}---\n{}",
        policy("a", "ALLOW", "[{}]"),
        policy("d", "DENY", "[{to: [{operation: {paths: [/admin]}}]}]")
    ));
    assert!(allowed(&e, &http("GET", "/x")));
    let d = decide(&e, &httpbin(), &http("GET", "/admin"));
    assert_eq!(d.decision, Verdict::Deny);
    assert_eq!(d.policy.unwrap().name, "d");
}

#[test]
fn allow_policies_need_a_match() {
    let e = allow("[{to: [{operation: {methods: [GET]}}]}]");
    assert!(allowed(&e, &http("GET", "/")));
    let d = decide(&e, &httpbin(), &http("POST", "/"));
    assert_eq!(d.reason_code, ReasonCode::NoAllowMatched);
}

#[test]
fn audit_never_changes_the_decision() {
    let e = engine(&format!(
        "{}---\n{}",
        policy("au", "AUDIT", "[{to: [{operation: {paths: [/a]}}]}]"),
        policy("al", "ALLOW", "[{to: [{operation: {paths: [/b]}}]}]")
    ));
    let d = decide(&e, &httpbin(), &http("GET", "/a"));
    assert_eq!(d.decision, Verdict::Deny);
    assert_eq!(d.audit.as_ref().unwrap().policy.name, "au");
    let d = decide(&e, &httpbin(), &http("GET", "/b"));
    assert!(d.is_allowed());
    assert!(d.audit.is_none());
    // AUDIT without rules is valid and never matches; alone it allows everything.
    let e = engine(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: au, namespace: foo}\nspec: {action: AUDIT}\n",
    );
    let d = decide(&e, &httpbin(), &http("GET", "/"));
    assert!(d.is_allowed() && d.audit.is_none());
}

#[test]
fn dry_run_is_reported_not_enforced() {
    let dry = |name: &str, action: &str, rules: &str| {
        policy(name, action, rules).replace(
            "namespace: foo}",
            "namespace: foo, annotations: {istio.io/dry-run: \"true\"}}",
        )
    };
    // Dry-run DENY: request passes, shadow deny reported.
    let e = engine(&dry("d", "DENY", "[{to: [{operation: {paths: [/deny]}}]}]"));
    let d = decide(&e, &httpbin(), &http("GET", "/deny"));
    assert!(d.is_allowed());
    assert_eq!(d.dry_run.deny.as_ref().unwrap().policy.name, "d");
    assert!(
        decide(&e, &httpbin(), &http("GET", "/x"))
            .dry_run
            .deny
            .is_none()
    );
    // Dry-run ALLOW only: no enforced ALLOW policy, so everything is allowed; the shadow
    // engine says what would happen.
    let e = engine(&dry(
        "a",
        "ALLOW",
        "[{to: [{operation: {paths: [/allow]}}]}]",
    ));
    let d = decide(&e, &httpbin(), &http("GET", "/other"));
    assert!(d.is_allowed());
    assert_eq!(d.reason_code, ReasonCode::NoAllowPolicy);
    assert_eq!(d.dry_run.allow.as_ref().unwrap().verdict, Verdict::Deny);
    let d = decide(&e, &httpbin(), &http("GET", "/allow"));
    assert_eq!(d.dry_run.allow.as_ref().unwrap().verdict, Verdict::Allow);
    // dry-run "false" is enforced (dry-run-mix).
    let e = engine(&format!(
        "{}---\n{}",
        dry("one", "ALLOW", "[{to: [{operation: {paths: [/allow]}}]}]"),
        policy("two", "ALLOW", "[{to: [{operation: {paths: [/another]}}]}]").replace(
            "namespace: foo}",
            "namespace: foo, annotations: {istio.io/dry-run: \"false\"}}"
        )
    ));
    assert!(!allowed(&e, &http("GET", "/allow")));
    assert!(allowed(&e, &http("GET", "/another")));
}

// ---- attachment (§0) -------------------------------------------------------------------

#[test]
fn selector_namespace_and_root_namespace() {
    let yaml = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-wide, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/ns]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: v2-only, namespace: foo}
spec: {selector: {matchLabels: {version: v2}}, action: DENY, rules: [{to: [{operation: {paths: [/v2]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh, namespace: istio-system}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/mesh]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-sel, namespace: istio-system}
spec: {selector: {matchLabels: {app: httpbin}}, action: DENY, rules: [{to: [{operation: {paths: [/meshsel]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other, namespace: bar}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/bar]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gw, namespace: foo}
spec: {action: DENY, targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw}], rules: [{}]}
";
    let e = engine(yaml);
    let w = httpbin();
    let denied = |w: &Workload, p: &str| !decide(&e, w, &http("GET", p)).is_allowed();
    assert!(denied(&w, "/ns"));
    assert!(!denied(&w, "/v2"), "selector version=v2 must not select v1");
    let v2 = Workload::new("foo", [("app", "httpbin"), ("version", "v2")]);
    assert!(denied(&v2, "/v2"));
    assert!(denied(&w, "/mesh"));
    assert!(denied(&w, "/meshsel"));
    let other_app = Workload::new("baz", [("app", "other")]);
    assert!(
        denied(&other_app, "/mesh"),
        "root policy applies in every namespace"
    );
    assert!(
        !denied(&other_app, "/meshsel"),
        "root selector still selects"
    );
    assert!(
        !denied(&w, "/bar"),
        "a policy of another namespace never applies"
    );
    assert!(
        !denied(&w, "/anything"),
        "targetRefs policies do not apply to sidecars"
    );
    let names: Vec<String> = e.policies_for(&w).iter().map(|p| p.to_string()).collect();
    assert_eq!(
        names,
        vec!["foo/ns-wide", "istio-system/mesh", "istio-system/mesh-sel"]
    );
}

#[test]
fn custom_root_namespace() {
    let yaml = policy("m", "DENY", "[{}]").replace("namespace: foo", "namespace: mesh-root");
    let yaml = yaml.replace("  selector: {matchLabels: {app: httpbin}}\n", "");
    let mesh = MeshConfig {
        root_namespace: "mesh-root".into(),
        ..MeshConfig::default()
    };
    assert!(
        !engine_with(&yaml, mesh)
            .authorize(&httpbin(), &http("GET", "/").0)
            .is_allowed()
    );
    assert!(
        engine(&yaml)
            .authorize(&httpbin(), &http("GET", "/").0)
            .is_allowed()
    );
}

// ---- rule logic (§3.1) -----------------------------------------------------------------

#[test]
fn rule_logic_or_and() {
    // from OR, to OR, when AND; fields in one source AND; values OR.
    let e = allow(
        "[{from: [{source: {ipBlocks: [1.1.1.1]}}, {source: {ipBlocks: [2.2.2.2]}}], to: [{operation: {methods: [GET], paths: [/a, /b]}}], when: [{key: 'request.headers[x]', values: ['1']}, {key: destination.port, values: ['8080']}]}]",
    );
    let ok = http("GET", "/b").ip("2.2.2.2").header("x", "1");
    assert!(allowed(&e, &ok));
    assert!(!allowed(&e, &ok.clone().ip("3.3.3.3")));
    assert!(!allowed(
        &e,
        &http("POST", "/b").ip("2.2.2.2").header("x", "1")
    ));
    assert!(!allowed(
        &e,
        &http("GET", "/c").ip("2.2.2.2").header("x", "1")
    ));
    assert!(!allowed(&e, &http("GET", "/b").ip("2.2.2.2")));
    assert!(!allowed(&e, &ok.port(9090)));
}

#[test]
fn value_and_not_value_on_one_field() {
    let e = allow("[{to: [{operation: {paths: [/api/*], notPaths: [/api/admin*]}}]}]");
    assert!(allowed(&e, &http("GET", "/api/x")));
    assert!(!allowed(&e, &http("GET", "/api/admin/x")));
    assert!(!allowed(&e, &http("GET", "/other")));
    let e = allow("[{when: [{key: 'request.headers[x]', values: [a*], notValues: [ab]}]}]");
    assert!(allowed(&e, &http("GET", "/").header("x", "ac")));
    assert!(!allowed(&e, &http("GET", "/").header("x", "ab")));
}

#[test]
fn not_forms_match_absent_attributes() {
    // Plaintext peer: notPrincipals/notNamespaces match, principals/namespaces don't.
    let e = allow("[{from: [{source: {notPrincipals: [cluster.local/ns/foo/sa/x]}}]}]");
    assert!(allowed(&e, &http("GET", "/")));
    let e = allow("[{from: [{source: {notNamespaces: [foo]}}]}]");
    assert!(allowed(&e, &http("GET", "/")));
    let e = allow("[{from: [{source: {namespaces: ['*']}}]}]");
    assert!(!allowed(&e, &http("GET", "/")));
    // No JWT: notRequestPrincipals matches, requestPrincipals ['*'] does not.
    let e = allow("[{from: [{source: {notRequestPrincipals: ['*']}}]}]");
    assert!(allowed(&e, &http("GET", "/")));
    assert!(!allowed(
        &e,
        &http("GET", "/").jwt(json!({"iss": "i", "sub": "s"}))
    ));
    let e = allow("[{from: [{source: {requestPrincipals: ['*']}}]}]");
    assert!(!allowed(&e, &http("GET", "/")));
    assert!(allowed(
        &e,
        &http("GET", "/").jwt(json!({"iss": "i", "sub": "s"}))
    ));
    // Missing header: notValues matches, values don't.
    let e = allow("[{when: [{key: 'request.headers[x-user]', notValues: [admin]}]}]");
    assert!(allowed(&e, &http("GET", "/")));
    assert!(!allowed(&e, &http("GET", "/").header("X-User", "admin")));
    // The classic: DENY with notPrincipals ['*'] denies plaintext, lets mTLS through.
    let e = deny("[{from: [{source: {notPrincipals: ['*']}}]}]");
    assert!(!allowed(&e, &http("GET", "/")));
    assert!(allowed(
        &e,
        &http("GET", "/").peer("spiffe://cluster.local/ns/a/sa/b")
    ));
}

// ---- source fields ---------------------------------------------------------------------

#[test]
fn principals_forms() {
    let peer = "spiffe://cluster.local/ns/ns1/sa/a";
    let cases: &[(&str, bool)] = &[
        ("cluster.local/ns/ns1/sa/a", true),
        ("cluster.local/ns/ns1/sa/b", false),
        ("cluster.local/ns/ns1/*", true),
        ("cluster.local/ns/ns2/*", false),
        ("*/sa/a", true),
        ("*/sa/b", false),
        ("*", true),
        // Written with spiffe://: silently never matches.
        ("spiffe://cluster.local/ns/ns1/sa/a", false),
        ("spiffe://*", false),
    ];
    for (v, want) in cases {
        let e = allow(&format!(
            "[{{from: [{{source: {{principals: ['{v}']}}}}]}}]"
        ));
        assert_eq!(
            allowed(&e, &http("GET", "/").peer(peer)),
            *want,
            "principals {v}"
        );
        // Plaintext never matches a positive principal.
        assert!(
            !allowed(&e, &http("GET", "/")),
            "principals {v} on plaintext"
        );
    }
}

#[test]
fn principal_in_alias_trust_domain_is_local() {
    let mesh = MeshConfig {
        trust_domain: "new-td".into(),
        trust_domain_aliases: vec!["old-td".into()],
        ..MeshConfig::default()
    };
    for written in [
        "cluster.local/ns/foo/sa/a",
        "new-td/ns/foo/sa/a",
        "old-td/ns/foo/sa/a",
    ] {
        let e = engine_with(
            &policy(
                "p",
                "ALLOW",
                &format!("[{{from: [{{source: {{principals: ['{written}']}}}}]}}]"),
            ),
            mesh.clone(),
        );
        for peer_td in ["new-td", "old-td"] {
            let r = http("GET", "/").peer(&format!("spiffe://{peer_td}/ns/foo/sa/a"));
            assert!(allowed(&e, &r), "{written} vs {peer_td}");
        }
        let r = http("GET", "/").peer("spiffe://evil-td/ns/foo/sa/a");
        assert!(!allowed(&e, &r), "{written} vs foreign domain");
    }
    // A foreign trust domain in a policy stays foreign.
    let e = engine_with(
        &policy(
            "p",
            "ALLOW",
            "[{from: [{source: {principals: [other/ns/foo/sa/a]}}]}]",
        ),
        mesh,
    );
    assert!(!allowed(
        &e,
        &http("GET", "/").peer("spiffe://new-td/ns/foo/sa/a")
    ));
    assert!(allowed(
        &e,
        &http("GET", "/").peer("spiffe://other/ns/foo/sa/a")
    ));
}

#[test]
fn namespaces_service_accounts_trust_domains() {
    let p = |ns: &str, sa: &str| {
        http("GET", "/").peer(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"))
    };
    let e = allow("[{from: [{source: {namespaces: [ns1, 'team-*', '*-prod']}}]}]");
    assert!(allowed(&e, &p("ns1", "x")));
    assert!(allowed(&e, &p("team-a", "x")));
    assert!(allowed(&e, &p("web-prod", "x")));
    assert!(!allowed(&e, &p("ns2", "x")));
    // serviceAccounts: ns/sa, or sa in the policy's namespace (foo).
    let e = allow("[{from: [{source: {serviceAccounts: [ns1/a, b]}}]}]");
    assert!(allowed(&e, &p("ns1", "a")));
    assert!(allowed(&e, &p("foo", "b")));
    assert!(!allowed(&e, &p("ns1", "b")));
    assert!(!allowed(&e, &p("foo", "a")));
    assert!(
        !allowed(&e, &p("ns1", "a-junk")),
        "no match on a longer name"
    );
    assert!(!allowed(&e, &http("GET", "/")), "plaintext");
    // trustDomains
    let e = allow("[{from: [{source: {trustDomains: [cluster.local]}}]}]");
    assert!(allowed(&e, &p("a", "b")));
    assert!(!allowed(
        &e,
        &http("GET", "/").peer("spiffe://other/ns/a/sa/b")
    ));
    let e = allow("[{from: [{source: {notTrustDomains: ['bad*']}}]}]");
    assert!(allowed(&e, &p("a", "b")));
    assert!(!allowed(
        &e,
        &http("GET", "/").peer("spiffe://bad.example/ns/a/sa/b")
    ));
}

#[test]
fn ip_blocks_and_remote_ip_blocks() {
    let e = allow("[{from: [{source: {ipBlocks: [10.0.0.0/8], notIpBlocks: [10.9.0.0/16]}}]}]");
    assert!(allowed(&e, &http("GET", "/").ip("10.1.2.3")));
    assert!(!allowed(&e, &http("GET", "/").ip("10.9.2.3")));
    assert!(!allowed(&e, &http("GET", "/").ip("192.168.0.1")));
    // remoteIpBlocks uses the original client IP; without one it is the peer IP.
    let e = allow("[{from: [{source: {remoteIpBlocks: [1.2.3.4]}}]}]");
    assert!(allowed(&e, &http("GET", "/").ip("1.2.3.4")));
    assert!(allowed(
        &e,
        &http("GET", "/").ip("10.0.0.1").remote("1.2.3.4")
    ));
    assert!(!allowed(
        &e,
        &http("GET", "/").ip("1.2.3.4").remote("5.5.5.5")
    ));
    let e = allow("[{from: [{source: {ipBlocks: ['2001:db8::/32']}}]}]");
    assert!(allowed(&e, &http("GET", "/").ip("2001:db8::1")));
    assert!(!allowed(&e, &http("GET", "/").ip("2001:db9::1")));
}

/// `remoteIpBlocks` and `remote.ip` take what an Istio sidecar takes (Envoy,
/// `use_remote_address: false`, no trusted hops): the last `X-Forwarded-For` entry when it
/// is an IP address, else the peer. `ipBlocks` is always the peer.
#[test]
fn remote_ip_is_the_last_forwarded_for_entry() {
    let gw = deny("[{from: [{source: {remoteIpBlocks: [203.0.113.0/24]}}]}]");
    let peer = || http("GET", "/").ip("10.0.0.7");
    // A gateway appended the client it saw: the DENY fires.
    assert!(!allowed(
        &gw,
        &peer().header("x-forwarded-for", "198.51.100.1, 203.0.113.9")
    ));
    assert!(!allowed(
        &gw,
        &peer().header("X-Forwarded-For", " 203.0.113.9 ")
    ));
    // Repeated headers are one list: the last header's last entry counts.
    assert!(!allowed(
        &gw,
        &peer()
            .header("x-forwarded-for", "198.51.100.1")
            .header("x-forwarded-for", "203.0.113.9")
    ));
    // Negative twins: an earlier entry, or no header, is not the client.
    assert!(allowed(
        &gw,
        &peer().header("x-forwarded-for", "203.0.113.9, 198.51.100.1")
    ));
    assert!(allowed(
        &gw,
        &peer()
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-for", "198.51.100.1")
    ));
    assert!(allowed(&gw, &peer()));
    // An unparsable last entry (a trailing comma, a port, a name) falls back to the peer.
    for bad in [
        "203.0.113.9,",
        "203.0.113.9:80",
        "[203.0.113.9]",
        "unknown",
        "",
    ] {
        assert!(
            allowed(&gw, &peer().header("x-forwarded-for", bad)),
            "{bad:?}"
        );
        assert!(
            !allowed(
                &gw,
                &http("GET", "/")
                    .ip("203.0.113.1")
                    .header("x-forwarded-for", bad)
            ),
            "{bad:?}: the peer's own address counts"
        );
    }
    // IPv6 and IPv4-mapped entries.
    let v6 = deny("[{from: [{source: {remoteIpBlocks: ['2001:db8::/32']}}]}]");
    assert!(!allowed(
        &v6,
        &peer().header("x-forwarded-for", "2001:db8::5")
    ));
    assert!(!allowed(
        &gw,
        &peer().header("x-forwarded-for", "::ffff:203.0.113.9")
    ));
    // `ipBlocks` never reads the header.
    let ip = deny("[{from: [{source: {ipBlocks: [203.0.113.0/24]}}]}]");
    assert!(allowed(
        &ip,
        &peer().header("x-forwarded-for", "203.0.113.9")
    ));
    // `remote.ip` in a condition is the same address.
    let when = deny("[{when: [{key: remote.ip, values: [203.0.113.0/24]}]}]");
    assert!(!allowed(
        &when,
        &peer().header("x-forwarded-for", "203.0.113.9")
    ));
    assert!(allowed(
        &when,
        &peer().header("x-forwarded-for", "198.51.100.1")
    ));
    // A TCP connection has no header: the peer.
    assert!(!allowed(&gw, &tcp(5432).ip("203.0.113.4")));
    assert!(allowed(&gw, &tcp(5432).ip("10.0.0.7")));
}

#[test]
fn request_principals_split_at_last_slash() {
    let tok = |iss: &str, sub: &str| http("GET", "/").jwt(json!({"iss": iss, "sub": sub}));
    let e = allow(
        "[{from: [{source: {requestPrincipals: ['https://accounts.example.com/a/user-1']}}]}]",
    );
    assert!(allowed(
        &e,
        &tok("https://accounts.example.com/a", "user-1")
    ));
    assert!(
        !allowed(&e, &tok("https://accounts.example.com", "a/user-1")),
        "split at the LAST /"
    );
    assert!(!allowed(&e, &http("GET", "/")), "no token");
    let e = allow("[{from: [{source: {requestPrincipals: ['iss/*']}}]}]");
    assert!(allowed(&e, &tok("iss", "anyone")));
    assert!(!allowed(&e, &tok("other", "anyone")));
    // A value without `/` matches iss exactly and an empty sub.
    let e = allow("[{from: [{source: {requestPrincipals: [iss]}}]}]");
    assert!(!allowed(&e, &tok("iss", "x")));
    assert!(allowed(&e, &tok("iss", "")));
    // when request.auth.principal uses the same rule.
    let e = allow("[{when: [{key: request.auth.principal, values: ['*@secure.istio.io/*']}]}]");
    assert!(
        !allowed(&e, &tok("testing@secure.istio.io", "x")),
        "*X/S: S is exact"
    );
    let e = allow("[{when: [{key: request.auth.principal, values: ['*@secure.istio.io/x']}]}]");
    assert!(allowed(&e, &tok("testing@secure.istio.io", "x")));
}

// ---- operation fields ------------------------------------------------------------------

#[test]
fn hosts_are_case_insensitive_and_port_sensitive() {
    let e = allow("[{to: [{operation: {hosts: [Example.COM, '*.svc.cluster.local']}}]}]");
    assert!(allowed(&e, &http("GET", "/").host("example.com")));
    assert!(allowed(&e, &http("GET", "/").host("EXAMPLE.com")));
    assert!(
        !allowed(&e, &http("GET", "/").host("example.com:8080")),
        "a :port is part of the value"
    );
    assert!(allowed(
        &e,
        &http("GET", "/").host("b.ns1.SVC.cluster.local")
    ));
    assert!(!allowed(
        &e,
        &http("GET", "/").host("b.ns1.svc.cluster.local.evil")
    ));
    let e = allow("[{to: [{operation: {notHosts: [bad.com]}}]}]");
    assert!(!allowed(&e, &http("GET", "/").host("BAD.com")));
}

#[test]
fn methods_are_case_sensitive() {
    let e = allow("[{to: [{operation: {methods: [GET]}}]}]");
    assert!(allowed(&e, &http("GET", "/")));
    assert!(!allowed(&e, &http("get", "/")));
}

#[test]
fn ports_and_not_ports() {
    let e = allow("[{to: [{operation: {ports: ['8080'], notPorts: ['9090']}}]}]");
    assert!(allowed(&e, &http("GET", "/").port(8080)));
    assert!(!allowed(&e, &http("GET", "/").port(9090)));
    assert!(!allowed(&e, &http("GET", "/").port(80)));
}

#[test]
fn paths_forms_and_templates() {
    let cases: &[(&str, &str, bool)] = &[
        ("/exact", "/exact", true),
        ("/exact", "/exact/", false),
        ("/exact", "/exact?q=1", true),
        ("/prefix/*", "/prefix/a/b", true),
        ("/prefix/*", "/prefix", false),
        ("*/suffix", "/a/suffix", true),
        ("*", "/", true),
        ("/a/{**}", "/a/", true),
        ("/a/{**}", "/a/b/c", true),
        ("/a/{**}", "/a", false),
        ("/a/{*}", "/a/b", true),
        ("/a/{*}", "/a/b/c", false),
        ("/a/{*}", "/a/", false),
        ("/{**}/cart", "/x/y/cart", true),
        ("/{**}/cart", "/cart", false),
    ];
    for (p, path, want) in cases {
        let e = allow(&format!("[{{to: [{{operation: {{paths: ['{p}']}}}}]}}]"));
        assert_eq!(
            allowed(&e, &http("GET", path)),
            *want,
            "paths {p} vs {path}"
        );
    }
}

// ---- when keys (§3.6) ------------------------------------------------------------------

#[test]
fn when_keys() {
    let w =
        |key: &str, vals: &str| allow(&format!("[{{when: [{{key: '{key}', values: {vals}}}]}}]"));
    let base = || {
        http("GET", "/p?x=1")
            .peer("spiffe://cluster.local/ns/ns1/sa/sa1")
            .ip("10.1.1.1")
            .remote("1.1.1.1")
            .dest_ip("10.0.0.10")
            .port(8080)
            .sni("b.example")
            .header("X-Token", "abc")
            .jwt(
                json!({"iss": "i", "sub": "s", "aud": ["a1", "a2"], "azp": "pres",
                        "groups": ["g1", "g2"], "nested": {"k": "v"}, "num": 7}),
            )
    };
    let table: &[(&str, &str, bool)] = &[
        ("request.headers[x-token]", "[abc]", true),
        ("request.headers[X-TOKEN]", "['a*']", true),
        ("request.headers[x-token]", "[nope]", false),
        ("request.headers[x-missing]", "['*']", false),
        ("request.headers[:method]", "[GET]", true),
        ("request.headers[:path]", "['/p?x=1']", true),
        ("request.headers[:authority]", "['*.cluster.local']", true),
        ("source.ip", "[10.1.0.0/16]", true),
        ("source.ip", "[1.1.1.1]", false),
        ("remote.ip", "[1.1.1.1]", true),
        ("source.namespace", "[ns1]", true),
        ("source.namespace", "[ns2]", false),
        ("source.principal", "[cluster.local/ns/ns1/sa/sa1]", true),
        (
            "source.principal",
            "[spiffe://cluster.local/ns/ns1/sa/sa1]",
            false,
        ),
        ("source.serviceAccount", "[ns1/sa1]", true),
        ("source.trustDomain", "[cluster.local]", true),
        ("request.auth.principal", "[i/s]", true),
        ("request.auth.audiences", "[a2]", true),
        ("request.auth.audiences", "[a3]", false),
        ("request.auth.presenter", "[pres]", true),
        ("request.auth.claims[groups]", "[g2]", true),
        ("request.auth.claims[groups]", "[g3]", false),
        ("request.auth.claims[nested][k]", "[v]", true),
        ("request.auth.claims[nested][x]", "['*']", false),
        ("request.auth.claims[num]", "['7']", false),
        ("destination.ip", "[10.0.0.10]", true),
        ("destination.port", "['8080']", true),
        ("destination.port", "['80']", false),
        ("connection.sni", "['*.example']", true),
    ];
    for (key, vals, want) in table {
        assert_eq!(allowed(&w(key, vals), &base()), *want, "when {key} {vals}");
    }
    // notValues on an absent JWT/SNI matches.
    let e = allow(
        "[{when: [{key: 'request.auth.claims[groups]', notValues: [admin]}, {key: connection.sni, notValues: [x]}]}]",
    );
    assert!(allowed(&e, &http("GET", "/")));
}

#[test]
fn space_delimited_scope_is_split_by_authentication() {
    // authorize() sees claims as authentication left them; check the list form.
    let e = allow("[{when: [{key: 'request.auth.claims[scope]', values: [read]}]}]");
    assert!(allowed(
        &e,
        &http("GET", "/").jwt(json!({"scope": ["write", "read"]}))
    ));
    assert!(!allowed(
        &e,
        &http("GET", "/").jwt(json!({"scope": "write read"}))
    ));
}

// ---- HTTP-only attributes on TCP ports (§3.4) ------------------------------------------

#[test]
fn tcp_drops_allow_rules_with_http_fields() {
    let e = allow(
        "[{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [ns1]}}], to: [{operation: {ports: ['80']}}]}]",
    );
    let peer = "spiffe://cluster.local/ns/ns1/sa/a";
    // HTTP: rule 0 matches GET.
    assert!(allowed(&e, &http("GET", "/").port(1)));
    // TCP: rule 0 is dropped (not "any method"); rule 1 still works.
    assert!(!allowed(&e, &tcp(1).peer(peer)));
    let d = decide(&e, &httpbin(), &tcp(80).peer(peer));
    assert!(d.is_allowed());
    assert_eq!(d.rule, Some(1));
    // An ALLOW policy whose rules are all HTTP-only denies all TCP.
    let e = allow("[{to: [{operation: {paths: [/x]}}]}]");
    let d = decide(&e, &httpbin(), &tcp(80));
    assert!(!d.is_allowed());
    assert!(d.reason.contains("HTTP-only"), "{}", d.reason);
}

#[test]
fn tcp_keeps_deny_rules_without_http_fields() {
    // DENY {methods: [POST]} denies ALL TCP traffic.
    let e = deny("[{to: [{operation: {methods: [POST]}}]}]");
    assert!(!allowed(&e, &tcp(9000)));
    assert!(allowed(&e, &http("GET", "/")));
    // DENY {requestPrincipals, ports: [80]} denies TCP on 80 only.
    let e =
        deny("[{from: [{source: {requestPrincipals: [x]}}], to: [{operation: {ports: ['80']}}]}]");
    assert!(!allowed(&e, &tcp(80)));
    assert!(allowed(&e, &tcp(81)));
    // notX HTTP fields are dropped too.
    let e = deny("[{to: [{operation: {notPaths: [/public], ports: ['81']}}]}]");
    assert!(!allowed(&e, &tcp(81)));
    assert!(allowed(&e, &http("GET", "/public").port(81)));
}

// ---- CUSTOM ----------------------------------------------------------------------------

struct Ext(bool);
impl ExtAuthz for Ext {
    fn check(&self, provider: &str, _: &Workload, _: &RequestContext) -> bool {
        assert_eq!(provider, "ext");
        self.0
    }
}

#[test]
fn custom_requires_a_known_provider_and_fails_closed() {
    let yaml = policy("c", "CUSTOM", "[{to: [{operation: {paths: [/ext]}}]}]").replace(
        "  action: CUSTOM\n",
        "  action: CUSTOM\n  provider: {name: ext}\n",
    );
    // Unknown provider: matching requests denied, others untouched.
    let e = engine(&yaml);
    let d = decide(&e, &httpbin(), &http("GET", "/ext"));
    assert_eq!(d.reason_code, ReasonCode::CustomProviderInvalid);
    assert!(d.reason.contains("\"ext\""));
    assert!(
        e.warnings().iter().any(|w| w.contains("not defined")),
        "{:?}",
        e.warnings()
    );
    assert!(allowed(&e, &http("GET", "/other")));
    // Known provider: the hook decides.
    let mesh = MeshConfig::from_yaml(
        "extensionProviders:\n- {name: ext, envoyExtAuthzGrpc: {service: authz.local, port: 9000}}\n",
    )
    .unwrap();
    let e = engine_with(&yaml, mesh.clone());
    let r = http("GET", "/ext");
    assert!(e.authorize_with(&httpbin(), &r.0, &Ext(true)).is_allowed());
    let d = e.authorize_with(&httpbin(), &r.0, &Ext(false));
    assert_eq!(d.reason_code, ReasonCode::CustomDenied);
    // No hook wired: fail closed.
    assert_eq!(
        e.authorize(&httpbin(), &r.0).reason_code,
        ReasonCode::CustomDenied
    );
    // Provider allows, DENY still applies.
    let e = engine_with(
        &format!(
            "{yaml}---\n{}",
            policy("d", "DENY", "[{to: [{operation: {paths: [/ext]}}]}]")
        ),
        mesh.clone(),
    );
    assert_eq!(
        e.authorize_with(&httpbin(), &r.0, &Ext(true)).reason_code,
        ReasonCode::DenyMatched
    );
    // check() runs CUSTOM first, as Istio's sidecar does (ext_authz before jwt_authn): with
    // a RequestAuthentication and a token that would be rejected, the provider's denial is
    // the answer...
    let ra = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: foo}\nspec:\n  selector: {matchLabels: {app: httpbin}}\n  jwtRules:\n  - issuer: https://idp.test\n    jwks: '{\"keys\": []}'\n";
    let e = engine_with(&format!("{yaml}---\n{ra}"), mesh.clone());
    let mut bad_token = http("GET", "/ext").0;
    if let Some(h) = bad_token.http.take() {
        bad_token.http = Some(h.with_header("authorization", "Bearer not-a-jwt"));
    }
    let now = std::time::SystemTime::now();
    let d = e.check(
        &httpbin(),
        &bad_token,
        now,
        &rampart_authz::NoRemoteJwks,
        &Ext(false),
    );
    assert_eq!((d.status, d.reason_code), (403, ReasonCode::CustomDenied));
    // ...and after its allow, the token is judged (401).
    let d = e.check(
        &httpbin(),
        &bad_token,
        now,
        &rampart_authz::NoRemoteJwks,
        &Ext(true),
    );
    assert_eq!((d.status, d.reason_code), (401, ReasonCode::JwtInvalid));
    // A path no CUSTOM rule matches: authentication alone.
    let mut other = bad_token.clone();
    if let Some(h) = other.http.as_mut() {
        h.path = "/other".into();
    }
    let d = e.check(
        &httpbin(),
        &other,
        now,
        &rampart_authz::NoRemoteJwks,
        &Ext(false),
    );
    assert_eq!(d.status, 401);

    // Two providers on one workload: fail closed.
    let mesh2 = MeshConfig::from_yaml(
        "extensionProviders:\n- {name: ext, envoyExtAuthzGrpc: {service: a.local, port: 9000}}\n- {name: ext2, envoyExtAuthzGrpc: {service: b.local, port: 9000}}\n",
    )
    .unwrap();
    let yaml2 = format!(
        "{yaml}---\n{}",
        policy("c2", "CUSTOM", "[{to: [{operation: {paths: [/other]}}]}]").replace(
            "  action: CUSTOM\n",
            "  action: CUSTOM\n  provider: {name: ext2}\n"
        )
    );
    let e = engine_with(&yaml2, mesh2);
    assert_eq!(
        e.authorize_with(&httpbin(), &r.0, &Ext(true)).reason_code,
        ReasonCode::CustomProviderInvalid
    );
    // A provider Istio's validation refuses (here a port out of range), or one that is no
    // authorization service: as if it were missing, naming why.
    for provider in [
        "{name: ext, envoyExtAuthzHttp: {service: authz.local, port: 999999}}",
        "{name: ext, prometheus: {}}",
    ] {
        let bad = MeshConfig::from_yaml(&format!("extensionProviders:\n- {provider}\n")).unwrap();
        let e = engine_with(&yaml, bad);
        let d = e.authorize_with(&httpbin(), &r.0, &Ext(true));
        assert_eq!(
            d.reason_code,
            ReasonCode::CustomProviderInvalid,
            "{provider}"
        );
        assert!(d.reason.contains("cannot be used"), "{}", d.reason);
        assert!(
            e.warnings()
                .iter()
                .any(|w| w.contains("foo/c") && w.contains("cannot be used")),
            "{:?}",
            e.warnings()
        );
        assert!(allowed(&e, &http("GET", "/other")));
    }
}

#[test]
fn decision_serializes_with_required_fields() {
    let e = deny("[{to: [{operation: {paths: [/admin]}}]}]");
    let d = decide(&e, &httpbin(), &http("GET", "/admin"));
    let v = serde_json::to_value(&d).unwrap();
    assert_eq!(v["decision"], "DENY");
    assert_eq!(v["status"], 403);
    assert_eq!(v["policy"]["namespace"], "foo");
    assert_eq!(v["policy"]["name"], "p");
    assert_eq!(v["rule"], 0);
    assert_eq!(v["action"], "DENY");
    assert!(v["reason"].as_str().unwrap().contains("foo/p"));
    assert_eq!(
        d.summary(),
        "DENY 403 foo/p rule 0: DENY policy foo/p rule 0 matched"
    );
}

// ---- robustness: the fuzz target's property on random YAML-ish input --------------------

mod robustness {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn any_yaml_loads_compiles_and_decides_without_panic(
            body in proptest::collection::vec(prop_oneof![
                Just("rules: [{}]".to_string()),
                Just("action: DENY".to_string()),
                Just("to: [{operation: {paths: ['/a/{**}', '*x', '/{*}']}}]".to_string()),
                Just("from: [{source: {principals: ['*'], notIpBlocks: [1.2.3.4/8]}}]".to_string()),
                Just("when: [{key: 'request.headers[x]', values: ['*']}]".to_string()),
                "[ -~]{0,12}",
            ], 0..6)
        ) {
            let text = format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: f, namespace: foo}}\nspec: {{{}}}\n",
                body.join(", ")
            );
            let loaded = rampart_authz::load_str("p.yaml", &text);
            let e = rampart_authz::Engine::new(loaded.resources, MeshConfig::default());
            for r in [http("GET", "/a//b/../c"), tcp(80), http("GET", "/%2e%2e/x").peer("spiffe://cluster.local/ns/a/sa/b")] {
                let d = e.authorize(&httpbin(), &r.0);
                prop_assert!(!d.reason.is_empty());
            }
        }
    }
}

// ---- experimental.envoy.filters.* (a deliberate difference from Istio) -------------------

/// Rampart has no Envoy dynamic metadata, so a condition on it could never match: a DENY
/// using it would never deny. Such a policy is refused at validation (ALLOW and DENY alike,
/// `values` or `notValues`), naming file, document, field path and reason.
#[test]
fn envoy_metadata_conditions_are_refused_for_allow_and_deny() {
    for action in ["DENY", "ALLOW", "AUDIT"] {
        for list in ["values", "notValues"] {
            let yaml = format!(
                "{}---\n{}",
                policy("ok", "ALLOW", "[{to: [{operation: {methods: [GET]}}]}]"),
                policy(
                    "meta",
                    action,
                    &format!(
                        "[{{to: [{{operation: {{methods: [GET]}}}}]}}, {{when: [{{key: connection.sni, values: [x]}}, {{key: 'experimental.envoy.filters.a.b[c]', {list}: [v]}}]}}]"
                    ),
                ),
            );
            let r = load_str("p.yaml", &yaml);
            assert_eq!(r.problems.len(), 1, "{action} {list}: {:?}", r.problems);
            let shown = r.problems[0].to_string();
            assert_eq!(
                shown,
                format!(
                    "p.yaml: document 2: spec.rules[1].when[1].key: {ENVOY_METADATA_UNSUPPORTED}"
                ),
                "{action} {list}"
            );
            // The rest of the file keeps working: the valid policy loaded, the other did not.
            assert_eq!(r.resources.len(), 1, "{action} {list}");
        }
    }
}

/// Negative twin: the same policies without the metadata condition load and enforce (the
/// DENY denies).
#[test]
fn same_policy_without_envoy_metadata_loads_and_denies() {
    let e = deny("[{when: [{key: 'request.headers[x-token]', values: [bad]}]}]");
    assert!(!allowed(&e, &http("GET", "/").header("x-token", "bad")));
    assert!(allowed(&e, &http("GET", "/").header("x-token", "good")));
}

// ---- explanations (rampart authz check) ------------------------------------------------------

fn explain(e: &rampart_authz::Engine, r: &Req) -> (rampart_authz::Decision, Vec<String>) {
    let keys = rampart_authz::JwksCache::default();
    let now = std::time::SystemTime::now();
    let d = e.check(&httpbin(), &r.0, now, &keys, &rampart_authz::NoExtAuthz);
    let why = e.explain(&httpbin(), &r.0, now, &keys, &d);
    (d, why)
}

/// A denial because no ALLOW rule matched says, for each rule, the first condition that
/// failed and what the request had there; never a header's value or the values a policy
/// lists for a header.
#[test]
fn a_denial_names_each_allow_rules_first_failing_condition() {
    let e = allow(
        "[{from: [{source: {principals: [cluster.local/ns/web/sa/frontend]}}], to: [{operation: {methods: [GET]}}]}, \
          {from: [{source: {requestPrincipals: ['https://idp/*']}}]}, \
          {to: [{operation: {methods: [GET, HEAD]}}]}, \
          {when: [{key: 'request.headers[x-token]', values: [s3cret]}]}, \
          {from: [{source: {principals: [a/ns/b/sa/c]}}, {source: {ipBlocks: [192.168.0.0/16]}}]}]",
    );
    let r = http("DELETE", "/items")
        .peer("spiffe://cluster.local/ns/x/sa/y")
        .header("x-token", "wrong-secret");
    let (d, why) = explain(&e, &r);
    assert_eq!(d.reason_code, ReasonCode::NoAllowMatched);
    assert_eq!(
        why,
        [
            "foo/p rule 0: from.source.principals: peer spiffe://cluster.local/ns/x/sa/y not in [cluster.local/ns/web/sa/frontend]",
            "foo/p rule 1: from.source.requestPrincipals: no JWT sent",
            "foo/p rule 2: to.operation.methods: DELETE not in [GET, HEAD]",
            "foo/p rule 3: when[0] request.headers[x-token]: the x-token header's value not in 1 listed value(s)",
            "foo/p rule 4: no `from` entry matched: from[0].source.principals: peer spiffe://cluster.local/ns/x/sa/y not in [a/ns/b/sa/c]; from[1].source.ipBlocks: peer address 10.0.1.1 not in [192.168.0.0/16]",
        ]
    );
    assert!(!why.concat().contains("secret"), "{why:?}");
    // A plaintext peer, a missing header and a matched notX.
    let e = allow(
        "[{from: [{source: {principals: ['*']}}]}, {when: [{key: 'request.headers[x-user]', values: ['*']}]}, {to: [{operation: {notPaths: ['/items*']}}]}]",
    );
    let (_, why) = explain(&e, &http("GET", "/items/1"));
    assert_eq!(
        why,
        [
            "foo/p rule 0: from.source.principals: no peer identity (plaintext)",
            "foo/p rule 1: when[0] request.headers[x-user]: no x-user header",
            "foo/p rule 2: to.operation.notPaths: path /items/1 is in [/items*]",
        ]
    );
    // Twin: a request a rule allows gets no explanation (the decision names the rule).
    let (d, why) = explain(&e, &http("GET", "/other"));
    assert_eq!(d.reason_code, ReasonCode::AllowMatched);
    assert!(why.is_empty(), "{why:?}");
    // spec: {} allows nothing, and says so.
    let e = engine(&policy("p", "ALLOW", "[]").replace("  rules: []\n", ""));
    let (_, why) = explain(&e, &http("GET", "/"));
    assert_eq!(why, ["foo/p: no rules (allows nothing)"]);
}

/// On a TCP port: ALLOW rules with HTTP-only fields are dropped, and a DENY that lost its
/// HTTP-only fields matches every connection; the explanation says which fields.
#[test]
fn tcp_explanations_name_the_dropped_http_fields() {
    let e =
        allow("[{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [web]}}]}]");
    let (d, why) = explain(&e, &tcp(5432).peer("spiffe://cluster.local/ns/x/sa/y"));
    assert_eq!(d.reason_code, ReasonCode::NoAllowMatched);
    assert_eq!(
        why,
        [
            "foo/p rule 0: dropped on this TCP port: it uses HTTP-only fields (to.operation.methods)",
            "foo/p rule 1: from.source.namespaces: peer spiffe://cluster.local/ns/x/sa/y not in [web]",
        ]
    );
    let e = deny("[{to: [{operation: {methods: [POST]}}]}]");
    let (d, why) = explain(&e, &tcp(5432));
    assert_eq!(d.reason_code, ReasonCode::DenyMatched);
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(
        why[0].starts_with("foo/p rule 0: its HTTP-only fields (to.operation.methods) were dropped on this TCP port"),
        "{why:?}"
    );
    // Twins: the same DENY over HTTP does not match a GET; a DENY on ports alone matched
    // on TCP with nothing dropped.
    let (d, why) = explain(&e, &http("GET", "/"));
    assert_eq!(d.reason_code, ReasonCode::NoAllowPolicy);
    assert!(why.is_empty(), "{why:?}");
    let e = deny("[{to: [{operation: {ports: ['5432']}}]}]");
    let (d, why) = explain(&e, &tcp(5432));
    assert_eq!(d.reason_code, ReasonCode::DenyMatched);
    assert!(why.is_empty(), "{why:?}");
}
