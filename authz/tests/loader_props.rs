//! Property tests for the loader (the stable-toolchain twin of the `yaml_policy` fuzz target):
//! arbitrary text and mutated policies never panic, and whatever is accepted is valid and
//! carries a real origin.

use proptest::prelude::*;
use rampart_authz::{load_str, validate};

const SEEDS: &[&str] = &[
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: foo}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {principals: [\"cluster.local/ns/x/sa/y\"], ipBlocks: [10.0.0.0/8]}}]\n    to: [{operation: {paths: [\"/a/{*}/b/{**}\"], ports: [\"80\"]}}]\n    when: [{key: \"request.headers[x-a]\", values: [\"*\"]}]\n",
    "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: a}}\n  mtls: {mode: STRICT}\n  portLevelMtls: {8080: {mode: DISABLE}}\n",
    "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r}\nspec:\n  jwtRules:\n  - issuer: x\n    jwksUri: https://x/jwks\n    fromHeaders: [{name: a, prefix: \"Bearer \"}]\n    timeout: 5s\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: foo}\n",
];

fn check(text: &str) {
    let result = load_str("prop.yaml", text);
    for r in &result.resources {
        assert!(r.origin().doc_index >= 1);
        assert!(
            validate(r).errors.is_empty(),
            "accepted but invalid: {text:?}"
        );
    }
    for p in &result.problems {
        assert!(p.doc_index >= 1, "{p}");
        assert!(!p.reason.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,400}") {
        check(&text);
    }

    #[test]
    fn yaml_shaped_text_never_panics(text in "([-a-zA-Z:{}\\[\\],\"'*/ \n#&!|>0-9.~]{0,30}\n){0,12}") {
        check(&text);
    }

    #[test]
    fn mutated_policies_never_panic(
        seed in 0..SEEDS.len(),
        edits in proptest::collection::vec((0usize..400, any::<u8>()), 1..6),
    ) {
        let mut bytes = SEEDS[seed].as_bytes().to_vec();
        for (at, b) in edits {
            let i = at % bytes.len();
            bytes[i] = b;
        }
        if let Ok(text) = String::from_utf8(bytes) {
            check(&text);
        }
    }
}

#[test]
fn seeds_are_valid() {
    for seed in SEEDS {
        let result = load_str("seed.yaml", seed);
        assert!(result.problems.is_empty(), "{:?}", result.problems);
        assert!(!result.resources.is_empty());
    }
}

#[test]
fn hostile_yaml_is_refused_not_fatal() {
    // Deep nesting, alias bombs and document storms hit the parser's budgets and are refused.
    let deep = format!("a: {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
    check(&deep);
    assert!(!load_str("deep.yaml", &deep).problems.is_empty());
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 0..9 {
        let prev = if i == 0 {
            "a".to_string()
        } else {
            format!("l{}", i - 1)
        };
        bomb.push_str(&format!("l{i}: &l{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
    }
    check(&bomb);
    assert!(!load_str("bomb.yaml", &bomb).problems.is_empty());
    let storm = "---\n".repeat(20_000);
    check(&storm);
}
