//! Table-driven SPIFFE ID tests. Every case names the rule of SPIFFE-ID §2 it exercises.

use super::*;

/// (input, expected: Ok((trust domain, path)) or Err(substring of the reason)).
type Case = (
    &'static str,
    Result<(&'static str, &'static str), &'static str>,
);

const CASES: &[Case] = &[
    // --- valid ---
    ("spiffe://example.org", Ok(("example.org", ""))),
    (
        "spiffe://example.org/workload",
        Ok(("example.org", "/workload")),
    ),
    (
        "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        Ok(("cluster.local", "/ns/default/sa/bookinfo-productpage")),
    ),
    ("spiffe://a/b", Ok(("a", "/b"))),
    ("spiffe://td-with-dash/p", Ok(("td-with-dash", "/p"))),
    (
        "spiffe://td_with_underscore/p",
        Ok(("td_with_underscore", "/p")),
    ),
    ("spiffe://0123456789/p", Ok(("0123456789", "/p"))),
    (
        "spiffe://example.org/Upper/Case/Path",
        Ok(("example.org", "/Upper/Case/Path")),
    ),
    (
        "spiffe://example.org/with.dot",
        Ok(("example.org", "/with.dot")),
    ),
    ("spiffe://example.org/...", Ok(("example.org", "/..."))),
    (
        "spiffe://example.org/.hidden",
        Ok(("example.org", "/.hidden")),
    ),
    (
        "spiffe://example.org/a-b_c.d",
        Ok(("example.org", "/a-b_c.d")),
    ),
    (
        "spiffe://example.org/a/b/c/d/e/f/g",
        Ok(("example.org", "/a/b/c/d/e/f/g")),
    ),
    (
        "spiffe://x.y.z.example.org/p",
        Ok(("x.y.z.example.org", "/p")),
    ),
    ("spiffe://example.org/0", Ok(("example.org", "/0"))),
    ("spiffe://.../p", Ok(("...", "/p"))),
    // --- scheme ---
    ("", Err("empty")),
    ("example.org/workload", Err("scheme")),
    ("http://example.org/workload", Err("scheme")),
    ("SPIFFE://example.org/workload", Err("scheme")),
    ("Spiffe://example.org/workload", Err("scheme")),
    ("spiffe:/example.org/workload", Err("scheme")),
    ("spiffe:example.org", Err("scheme")),
    (" spiffe://example.org/w", Err("scheme")),
    // --- trust domain ---
    ("spiffe://", Err("trust domain is empty")),
    ("spiffe:///workload", Err("trust domain is empty")),
    ("spiffe://Example.org/w", Err("lowercase")),
    ("spiffe://EXAMPLE.ORG", Err("lowercase")),
    ("spiffe://example.org:8080/w", Err("port")),
    ("spiffe://user@example.org/w", Err("userinfo")),
    ("spiffe://user:pass@example.org/w", Err("port")),
    ("spiffe://exa%6dple.org/w", Err("percent")),
    ("spiffe://exa mple.org/w", Err("limited to a-z")),
    ("spiffe://exa+mple.org/w", Err("limited to a-z")),
    ("spiffe://例え.jp/w", Err("limited to a-z")),
    ("spiffe://[::1]/w", Err("limited to a-z")),
    // --- path ---
    ("spiffe://example.org/", Err("must not end with '/'")),
    (
        "spiffe://example.org/workload/",
        Err("must not end with '/'"),
    ),
    ("spiffe://example.org//workload", Err("empty segment")),
    ("spiffe://example.org/a//b", Err("empty segment")),
    ("spiffe://example.org/.", Err("'.' or '..'")),
    ("spiffe://example.org/..", Err("'.' or '..'")),
    ("spiffe://example.org/a/./b", Err("'.' or '..'")),
    ("spiffe://example.org/a/../b", Err("'.' or '..'")),
    ("spiffe://example.org/a%20b", Err("percent")),
    ("spiffe://example.org/a b", Err("limited to a-z, A-Z")),
    ("spiffe://example.org/a:b", Err("limited to a-z, A-Z")),
    ("spiffe://example.org/a@b", Err("limited to a-z, A-Z")),
    ("spiffe://example.org/é", Err("limited to a-z, A-Z")),
    ("spiffe://example.org/a\\b", Err("limited to a-z, A-Z")),
    // --- query, fragment ---
    ("spiffe://example.org/w?x=1", Err("query")),
    ("spiffe://example.org?x=1", Err("query")),
    ("spiffe://example.org/w#frag", Err("fragment")),
    ("spiffe://example.org#frag", Err("fragment")),
];

#[test]
fn spiffe_id_table() {
    assert!(CASES.len() >= 40, "the issue asks for at least 40 cases");
    let mut failures = Vec::new();
    for (input, want) in CASES {
        let got = SpiffeId::parse(input);
        match (want, &got) {
            (Ok((td, path)), Ok(id)) => {
                if id.trust_domain().as_str() != *td || id.path() != *path {
                    failures.push(format!(
                        "{input:?}: parsed as ({}, {})",
                        id.trust_domain(),
                        id.path()
                    ));
                }
                if id.to_string() != *input {
                    failures.push(format!("{input:?}: displays as {id}"));
                }
                // Round trip through Display and FromStr.
                let again: SpiffeId = id.to_string().parse().expect("round trip");
                assert_eq!(&again, id);
            }
            (Err(reason), Err(e)) => {
                if !e.to_string().contains(reason) {
                    failures.push(format!("{input:?}: error {e} does not mention {reason:?}"));
                }
            }
            (Ok(_), Err(e)) => failures.push(format!("{input:?}: rejected: {e}")),
            (Err(reason), Ok(id)) => {
                failures.push(format!("{input:?}: accepted as {id}, want {reason:?}"))
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn length_limits() {
    // Exactly 2048 bytes is allowed; one more is not.
    let prefix = "spiffe://example.org/";
    let ok = format!("{prefix}{}", "a".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
    assert_eq!(ok.len(), 2048);
    SpiffeId::parse(&ok).expect("2048 bytes is allowed");
    let long = format!("{ok}b");
    let err = SpiffeId::parse(&long).unwrap_err().to_string();
    assert!(err.contains("2048"), "{err}");
    // Error messages never echo megabytes of input.
    assert!(err.len() < 400, "{err}");

    let td = "a".repeat(MAX_TRUST_DOMAIN_LEN);
    SpiffeId::parse(&format!("spiffe://{td}/w")).expect("255-byte trust domain");
    let err = SpiffeId::parse(&format!("spiffe://{td}a/w")).unwrap_err();
    assert!(err.to_string().contains("255"), "{err}");
}

#[test]
fn trust_domain_parsing() {
    assert_eq!(
        TrustDomain::new("cluster.local").unwrap().as_str(),
        "cluster.local"
    );
    assert_eq!(
        TrustDomain::new("spiffe://cluster.local").unwrap().as_str(),
        "cluster.local"
    );
    for bad in [
        "",
        "Cluster.local",
        "a:1",
        "spiffe://a/b",
        "a/b",
        "a b",
        "spiffe://",
    ] {
        assert!(TrustDomain::new(bad).is_err(), "{bad:?} accepted");
    }
    let td: TrustDomain = "example.org".parse().unwrap();
    assert_eq!(td.id().to_string(), "spiffe://example.org");
}

#[test]
fn istio_form() {
    let td = TrustDomain::new("cluster.local").unwrap();
    let id = SpiffeId::istio(&td, "default", "sleep").unwrap();
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
    assert_eq!(id.namespace(), Some("default"));
    assert_eq!(id.service_account(), Some("sleep"));
    assert!(id.is_istio());

    // Parsed IDs of the same shape get the same accessors.
    let parsed = SpiffeId::parse("spiffe://td/ns/foo/sa/bar").unwrap();
    assert_eq!(
        (parsed.namespace(), parsed.service_account()),
        (Some("foo"), Some("bar"))
    );
    assert_eq!(parsed.istio_parts(), Some(("foo", "bar")));

    // Other shapes are valid SPIFFE IDs but not Istio identities.
    for other in [
        "spiffe://td",
        "spiffe://td/ns/foo",
        "spiffe://td/ns/foo/sa",
        "spiffe://td/ns/foo/sa/bar/extra",
        "spiffe://td/sa/bar/ns/foo",
        "spiffe://td/NS/foo/SA/bar",
        "spiffe://td/ns/a/b/sa/bar",
    ] {
        let id = SpiffeId::parse(other).unwrap();
        assert_eq!(id.namespace(), None, "{other}");
        assert_eq!(id.service_account(), None, "{other}");
        assert_eq!(id.istio_parts(), None, "{other}");
    }

    // Bad namespace or service account segments are refused.
    for (ns, sa) in [
        ("", "sa"),
        ("ns", ""),
        ("a/b", "sa"),
        ("ns", ".."),
        ("n s", "sa"),
        ("ns", "sa?x"),
    ] {
        assert!(
            SpiffeId::istio(&td, ns, sa).is_err(),
            "{ns:?} {sa:?} accepted"
        );
    }
}

#[test]
fn alias_rewrite_and_serde() {
    let id = SpiffeId::parse("spiffe://old.example/ns/a/sa/b").unwrap();
    let td = TrustDomain::new("new.example").unwrap();
    assert_eq!(
        id.with_trust_domain(&td).unwrap().to_string(),
        "spiffe://new.example/ns/a/sa/b"
    );

    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(json, "\"spiffe://old.example/ns/a/sa/b\"");
    let back: SpiffeId = serde_json::from_str(&json).unwrap();
    assert_eq!(back, id);
    assert!(serde_json::from_str::<SpiffeId>("\"spiffe://a/\"").is_err());
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn segment() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._-]{1,12}".prop_filter("not . or ..", |s| s != "." && s != "..")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Anything accepted prints back to exactly the input (the fuzz target's property).
        #[test]
        fn accepted_input_round_trips(s in "spiffe://[a-zA-Z0-9.:@%_/?#-]{0,40}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.to_string(), s.clone());
                prop_assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
            }
        }

        /// IDs built from valid parts always parse, to the same parts.
        #[test]
        fn valid_parts_always_parse(
            td in "[a-z0-9._-]{1,20}",
            segs in proptest::collection::vec(segment(), 0..6),
        ) {
            let path: String = segs.iter().map(|s| format!("/{s}")).collect();
            let s = format!("spiffe://{td}{path}");
            let id = SpiffeId::parse(&s).unwrap();
            prop_assert_eq!(id.trust_domain().as_str(), td.as_str());
            prop_assert_eq!(id.path(), path.as_str());
        }

        /// Arbitrary text never panics the parser.
        #[test]
        fn never_panics(s in any::<String>()) {
            let _ = SpiffeId::parse(&s);
            let _ = TrustDomain::new(&s);
        }
    }
}
