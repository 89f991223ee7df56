//! Istio's translation of a MeshConfig extension provider into Envoy's ext_authz filter, from
//! the conformance corpus (`authz-builder/http/custom-*-provider*-out2.yaml`, the filter
//! istiod writes for the providers the corpus README lists), held against what Rampart parses
//! from the same provider: service and port (the filter's `outbound|PORT||HOST` cluster),
//! timeout, failOpen, statusOnError, the body settings, and for HTTP providers the path prefix
//! and the header lists (compared by what they match, on a set of names). Skipped with a
//! message when the corpus is absent.

mod common;

use std::time::Duration;

use rampart_authz::{ExtAuthzBody, ExtAuthzKind, MeshConfig, header_pattern_matches};
use serde_json::Value;

/// The corpus README's `default` providers, as a MeshConfig would give them.
const GRPC: &str = r#"extensionProviders:
- name: default
  envoyExtAuthzGrpc:
    service: foo/my-custom-ext-authz.foo.svc.cluster.local
    port: 9000
    timeout: 2ms
    failOpen: true
    statusOnError: "403"
    includeRequestBodyInCheck: {maxRequestBytes: 4096, allowPartialMessage: true}
"#;

const GRPC_NO_NAMESPACE: &str = r#"extensionProviders:
- name: default
  envoyExtAuthzGrpc:
    service: my-custom-ext-authz.foo.svc.cluster.local
    port: 9000
    failOpen: true
    statusOnError: "403"
"#;

const HTTP: &str = r#"extensionProviders:
- name: default
  envoyExtAuthzHttp:
    service: foo/my-custom-ext-authz.foo.svc.cluster.local
    port: 9000
    timeout: 10s
    failOpen: true
    statusOnError: "403"
    pathPrefix: /check
    includeRequestHeadersInCheck: [x-custom-id, x-prefix-*, "*-suffix"]
    includeAdditionalHeadersInCheck: {x-header-1: value-1, x-header-2: value-2}
    includeRequestBodyInCheck: {maxRequestBytes: 2048, allowPartialMessage: true, packAsBytes: true}
    headersToUpstreamOnAllow: [Authorization, x-prefix-*, "*-suffix"]
    headersToDownstreamOnDeny: [Set-cookie, x-prefix-*, "*-suffix"]
    headersToDownstreamOnAllow: [Set-cookie, x-prefix-*, "*-suffix"]
"#;

const BAD: &str = r#"extensionProviders:
- name: default
  envoyExtAuthzHttp:
    service: foo/my-custom-ext-authz
    port: 999999
    pathPrefix: check
    statusOnError: "999"
"#;

/// Names the header lists are compared on.
const NAMES: [&str; 10] = [
    "x-custom-id",
    "X-Custom-Id",
    "x-custom",
    "x-prefix-a",
    "a-suffix",
    "A-SUFFIX",
    "authorization",
    "set-cookie",
    "cookie",
    "x-other",
];

fn filter(name: &str) -> Option<Value> {
    let dir = common::corpus_dir()?;
    let text = std::fs::read_to_string(dir.join("authz-builder/http").join(name)).unwrap();
    Some(serde_saphyr::from_str::<Value>(&text).unwrap()["typedConfig"].clone())
}

/// Whether an Envoy `StringMatcher` list (`patterns`) matches `name`.
fn envoy_matches(patterns: &Value, name: &str) -> bool {
    patterns.as_array().unwrap().iter().any(|p| {
        let case = |s: &str| {
            if p["ignoreCase"] == true {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        let n = case(name);
        if let Some(e) = p["exact"].as_str() {
            n == case(e)
        } else if let Some(pre) = p["prefix"].as_str() {
            n.starts_with(&case(pre))
        } else if let Some(suf) = p["suffix"].as_str() {
            n.ends_with(&case(suf))
        } else {
            panic!("unexpected matcher {p}")
        }
    })
}

fn seconds(v: &Value) -> Duration {
    Duration::from_secs_f64(
        v.as_str()
            .and_then(|s| s.strip_suffix('s'))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("duration {v}")),
    )
}

/// Envoy's `StatusCode` enum names the corpus uses.
fn status(v: &Value) -> u16 {
    match v["code"].as_str() {
        Some("Forbidden") => 403,
        other => panic!("status {other:?}"),
    }
}

fn body(v: &Value) -> Option<ExtAuthzBody> {
    v.get("withRequestBody").map(|b| ExtAuthzBody {
        max_bytes: u32::try_from(b["maxRequestBytes"].as_u64().unwrap()).unwrap(),
        allow_partial: b["allowPartialMessage"] == true,
        pack_as_bytes: b["packAsBytes"] == true,
    })
}

#[test]
fn grpc_providers_translate_as_istiod_translates_them() {
    for (yaml, out) in [
        (GRPC, "custom-grpc-provider-out2.yaml"),
        (
            GRPC_NO_NAMESPACE,
            "custom-grpc-provider-no-namespace-out2.yaml",
        ),
    ] {
        let Some(f) = filter(out) else { return };
        let m = MeshConfig::from_yaml(yaml).unwrap();
        let p = m.provider("default").unwrap().authz.as_ref().unwrap();
        assert_eq!(p.kind, ExtAuthzKind::Grpc, "{out}");
        let svc = &f["grpcService"];
        assert_eq!(
            svc["envoyGrpc"]["clusterName"],
            format!("outbound|{}||{}", p.port, p.host),
            "{out}"
        );
        assert_eq!(svc["envoyGrpc"]["authority"], p.host.as_str(), "{out}");
        // Istio's default timeout is 600 s; the filter then carries it.
        if let Some(t) = svc.get("timeout") {
            assert_eq!(seconds(t), p.timeout, "{out}");
        }
        assert_eq!(f["failureModeAllow"] == true, p.fail_open, "{out}");
        assert_eq!(status(&f["statusOnError"]), p.status_on_error, "{out}");
        assert_eq!(body(&f), p.body, "{out}");
    }
}

#[test]
fn http_providers_translate_as_istiod_translates_them() {
    let Some(f) = filter("custom-http-provider-out2.yaml") else {
        return;
    };
    let m = MeshConfig::from_yaml(HTTP).unwrap();
    let p = m.provider("default").unwrap().authz.as_ref().unwrap();
    let ExtAuthzKind::Http(h) = &p.kind else {
        panic!("an HTTP provider")
    };
    let svc = &f["httpService"];
    assert_eq!(
        svc["serverUri"]["cluster"],
        format!("outbound|{}||{}", p.port, p.host)
    );
    assert_eq!(svc["serverUri"]["uri"], format!("http://{}", p.host));
    assert_eq!(seconds(&svc["serverUri"]["timeout"]), p.timeout);
    assert_eq!(svc["pathPrefix"], h.path_prefix.as_str());
    assert_eq!(f["failureModeAllow"] == true, p.fail_open);
    assert_eq!(status(&f["statusOnError"]), p.status_on_error);
    assert_eq!(body(&f), p.body);
    let added: Vec<(String, String)> = svc["authorizationRequest"]["headersToAdd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["key"].as_str().unwrap().to_string(),
                h["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(added, h.additional_headers);
    let answer = &svc["authorizationResponse"];
    for (envoy, ours, what) in [
        (
            &f["allowedHeaders"]["patterns"],
            &h.request_headers,
            "request",
        ),
        (
            &answer["allowedUpstreamHeaders"]["patterns"],
            &h.upstream_on_allow,
            "upstream on allow",
        ),
        (
            &answer["allowedClientHeaders"]["patterns"],
            &h.downstream_on_deny,
            "downstream on deny",
        ),
        (
            &answer["allowedClientHeadersOnSuccess"]["patterns"],
            &h.downstream_on_allow,
            "downstream on allow",
        ),
    ] {
        for n in NAMES {
            assert_eq!(
                envoy_matches(envoy, n),
                header_pattern_matches(ours, n),
                "{what} headers, {n}"
            );
        }
    }
}

#[test]
fn the_bad_provider_is_unusable() {
    if common::corpus_dir().is_none() {
        return;
    }
    let m = MeshConfig::from_yaml(BAD).unwrap();
    let why = m.provider("default").unwrap().authz.as_ref().unwrap_err();
    assert!(why.contains("default"), "{why}");
}
