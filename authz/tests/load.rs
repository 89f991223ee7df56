//! Loader behaviour: multi-document YAML, strict typing with field paths, one bad document
//! refused alone, other kinds skipped, absent vs empty kept apart, folders.

use std::collections::BTreeMap;

use rampart_authz::{
    Action, ApiVersion, Kind, LoadResult, MtlsMode, Problem, Resource, load_path, load_paths,
    load_str,
};

fn only_problem(result: &LoadResult) -> &Problem {
    assert_eq!(
        result.problems.len(),
        1,
        "expected exactly one problem, got {:#?}",
        result.problems
    );
    &result.problems[0]
}

fn ap(result: &LoadResult, i: usize) -> &rampart_authz::AuthorizationPolicy {
    match &result.resources[i] {
        Resource::AuthorizationPolicy(p) => p,
        other => panic!("resource {i} is {:?}", other.kind()),
    }
}

const GOOD_AP: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: good, namespace: foo}
spec:
  rules:
  - to: [{operation: {methods: [GET]}}]
";

#[test]
fn problem_display_names_file_document_field_and_reason() {
    let p = Problem {
        file: "a.yaml".into(),
        doc_index: 2,
        field_path: "spec.rules[0]".into(),
        reason: "bad".into(),
    };
    assert_eq!(p.to_string(), "a.yaml: document 2: spec.rules[0]: bad");
    let whole_file = Problem {
        file: "a.yaml".into(),
        doc_index: 0,
        field_path: String::new(),
        reason: "cannot read".into(),
    };
    assert_eq!(whole_file.to_string(), "a.yaml: cannot read");
}

#[test]
fn unknown_field_is_an_error_with_its_path() {
    // The classic typo `rule:` would make an allow-nothing policy in Istio (pruned field).
    let text = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: foo}
spec:
  rule:
  - {}
";
    let result = load_str("t.yaml", text);
    assert!(result.resources.is_empty());
    let p = only_problem(&result);
    assert_eq!(p.doc_index, 1);
    assert_eq!(p.field_path, "spec.rule");
    assert!(p.reason.starts_with("unknown field"), "{}", p.reason);
    assert!(
        p.reason.contains("rules"),
        "should list known fields: {}",
        p.reason
    );

    let nested = GOOD_AP.replace("methods: [GET]", "method: [GET]");
    let result = load_str("t.yaml", &nested);
    assert_eq!(
        only_problem(&result).field_path,
        "spec.rules[0].to[0].operation.method"
    );

    let top = format!("{GOOD_AP}specs: {{}}\n");
    assert_eq!(only_problem(&load_str("t.yaml", &top)).field_path, "specs");

    let meta = GOOD_AP.replace("namespace: foo", "namespace: foo, labelz: {}");
    assert_eq!(
        only_problem(&load_str("t.yaml", &meta)).field_path,
        "metadata.labelz"
    );
}

#[test]
fn wrong_types_are_errors_with_their_path() {
    let int_port = GOOD_AP.replace("methods: [GET]", "ports: [80]");
    let result = load_str("t.yaml", &int_port);
    let p = only_problem(&result);
    assert_eq!(p.field_path, "spec.rules[0].to[0].operation.ports[0]");
    assert!(p.reason.contains("wrong type"), "{}", p.reason);

    let scalar_rules = GOOD_AP.replace(
        "rules:\n  - to: [{operation: {methods: [GET]}}]",
        "rules: yes",
    );
    let result = load_str("t.yaml", &scalar_rules);
    assert_eq!(only_problem(&result).field_path, "spec.rules");

    let bad_bool = "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: ra}
spec: {jwtRules: [{issuer: x, forwardOriginalToken: maybe}]}
";
    let p = only_problem(&load_str("t.yaml", bad_bool)).clone();
    assert_eq!(p.field_path, "spec.jwtRules[0].forwardOriginalToken");
}

#[test]
fn a_bad_document_is_refused_alone() {
    let text = format!(
        "{GOOD_AP}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bad, namespace: foo}}\nspec: {{action: DENY}}\n---\n{}",
        GOOD_AP.replace("name: good", "name: good2")
    );
    let result = load_str("multi.yaml", &text);
    assert_eq!(result.resources.len(), 2);
    assert_eq!(ap(&result, 0).name(), "good");
    assert_eq!(ap(&result, 1).name(), "good2");
    assert_eq!(ap(&result, 1).origin.doc_index, 3);
    let p = only_problem(&result);
    assert_eq!(p.doc_index, 2);
    assert_eq!(p.field_path, "spec.rules");
    assert!(p.reason.contains("DENY action without `rules`"));
}

#[test]
fn a_yaml_syntax_error_is_refused_alone_with_its_line() {
    let text = format!("{GOOD_AP}---\nmetadata: [unclosed\n---\n{GOOD_AP}").replacen(
        "name: good",
        "name: first",
        1,
    );
    let result = load_str("syntax.yaml", &text);
    assert_eq!(result.resources.len(), 2, "{:?}", result.problems);
    let p = only_problem(&result);
    assert_eq!(p.doc_index, 2);
    assert!(p.reason.contains("YAML syntax error"), "{}", p.reason);
    // The error is reported at the file's line, not the document's, and only once.
    assert!(
        p.reason.contains("line 8") || p.reason.contains("line 9"),
        "{}",
        p.reason
    );
    assert_eq!(p.reason.matches("line").count(), 1, "{}", p.reason);
}

/// An error the parser words with its own (document-relative) position at the end: one
/// position is printed, the file's.
#[test]
fn a_yaml_syntax_error_in_a_later_document_has_one_line_number() {
    let text = format!(
        "{GOOD_AP}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: b, namespace: foo}}
spec:
  rules:
  - to: [{{operation: {{paths: [/a]}}}}
  - {{}}
"
    );
    let first = GOOD_AP.lines().count();
    let result = load_str("multi.yaml", &text);
    let p = only_problem(&result);
    assert_eq!(p.doc_index, 2);
    assert_eq!(p.reason.matches("line").count(), 1, "{}", p.reason);
    // The broken rule list is in the document's lines 6-7, the file's past GOOD_AP and `---`.
    let line: usize = p
        .reason
        .split("line ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a line number");
    assert!(
        line > first + 1,
        "{} (first document: {first} lines)",
        p.reason
    );
    // Twin: the same document alone reports its own line, smaller by the lines before it.
    let alone = load_str("one.yaml", text.split_once("---\n").unwrap().1);
    let q = only_problem(&alone);
    assert!(
        q.reason.contains(&format!("line {} ", line - first - 1)),
        "{} vs {}",
        q.reason,
        p.reason
    );
}

/// A `when` key Istio does not know is one problem at `.key` (not one per value list, and
/// not on `notValues` the rule does not have), with the known key it resembles.
#[test]
fn an_unknown_when_key_is_one_problem_at_its_key() {
    let ap = |when: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec:\n  rules: [{{when: [{when}]}}]\n"
        )
    };
    for (when, hint) in [
        (
            "{key: 'request.header[x-user]', values: [a]}",
            Some("request.headers[x-user]"),
        ),
        (
            "{key: source.principals, notValues: [a]}",
            Some("source.principal"),
        ),
        (
            "{key: 'Request.Auth.Claims[groups]', values: [a]}",
            Some("request.auth.claims[groups]"),
        ),
        ("{key: key1, values: [a], notValues: [b]}", None),
    ] {
        let r = load_str("t.yaml", &ap(when));
        assert_eq!(r.problems.len(), 1, "{when}: {:?}", r.problems);
        let p = &r.problems[0];
        assert_eq!(p.field_path, "spec.rules[0].when[0].key", "{when}");
        assert!(p.reason.contains("unknown attribute"), "{}", p.reason);
        match hint {
            Some(h) => assert!(
                p.reason.contains(&format!("did you mean {h}?")),
                "{}",
                p.reason
            ),
            None => assert!(!p.reason.contains("did you mean"), "{}", p.reason),
        }
    }
    // A huge unknown key (policy is untrusted input in Kubernetes mode) is refused the same
    // way, with no hint: no key Istio knows is anywhere near its length.
    let huge = format!("{{key: 'x{}', values: [a]}}", "y".repeat(200_000));
    let r = load_str("t.yaml", &ap(&huge));
    assert_eq!(r.problems.len(), 1);
    assert!(r.problems[0].reason.contains("unknown attribute"));
    assert!(!r.problems[0].reason.contains("did you mean"));
    // Twin: a known key with a bad value is reported at that value list, once.
    let r = load_str("t.yaml", &ap("{key: source.ip, values: [a.b.c.d]}"));
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    assert_eq!(r.problems[0].field_path, "spec.rules[0].when[0].values");
    let r = load_str(
        "t.yaml",
        &ap("{key: 'request.headers[x-user]', values: [a]}"),
    );
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn other_kinds_are_skipped_not_errors() {
    let text = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: httpbin}}\nspec: {{replicas: 1}}\n---\n{GOOD_AP}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: foo}}\n"
    );
    let result = load_str("mixed.yaml", &text);
    assert!(result.problems.is_empty(), "{:?}", result.problems);
    assert_eq!(result.resources.len(), 1);
    let kinds: Vec<&str> = result.skipped.iter().map(|s| s.kind.as_str()).collect();
    assert_eq!(kinds, ["Deployment", "Namespace"]);
    assert_eq!(result.skipped[0].name.as_deref(), Some("httpbin"));
    assert_eq!(result.skipped[1].origin.doc_index, 3);
}

#[test]
fn unsupported_security_versions_and_kinds_are_errors() {
    let alpha = GOOD_AP.replace("security.istio.io/v1", "security.istio.io/v1alpha1");
    let p = only_problem(&load_str("t.yaml", &alpha)).clone();
    assert_eq!(p.field_path, "apiVersion");
    let kind = GOOD_AP.replace("kind: AuthorizationPolicy", "kind: AuthorisationPolicy");
    let p = only_problem(&load_str("t.yaml", &kind)).clone();
    assert_eq!(p.field_path, "kind");
    let no_version = GOOD_AP.replace("security.istio.io/v1", "security.istio.io");
    assert_eq!(
        only_problem(&load_str("t.yaml", &no_version)).field_path,
        "apiVersion"
    );
    // A mistyped Istio group on one of our kinds is refused, not skipped (fail closed).
    let typo_group = GOOD_AP.replace("security.istio.io/v1", "securty.istio.io/v1");
    let p = only_problem(&load_str("t.yaml", &typo_group)).clone();
    assert_eq!(p.field_path, "apiVersion");
    assert!(p.reason.contains("belongs to API group"), "{p}");
    // Another project's kind of the same name is skipped.
    let linkerd = GOOD_AP.replace("security.istio.io/v1", "policy.linkerd.io/v1alpha1");
    let result = load_str("t.yaml", &linkerd);
    assert!(result.problems.is_empty() && result.skipped.len() == 1);
    let no_kind = "apiVersion: security.istio.io/v1\nmetadata: {name: x}\n";
    assert_eq!(
        only_problem(&load_str("t.yaml", no_kind)).field_path,
        "kind"
    );
    let scalar = "just a string\n";
    assert!(
        only_problem(&load_str("t.yaml", scalar))
            .reason
            .contains("not a Kubernetes object")
    );
}

#[test]
fn empty_documents_and_comments_are_not_resources() {
    let text = format!("# header\n---\n---\n# nothing here\n---\n{GOOD_AP}---\n");
    let result = load_str("t.yaml", &text);
    assert!(result.problems.is_empty(), "{:?}", result.problems);
    assert_eq!(result.resources.len(), 1);
    assert_eq!(result.resources[0].origin().doc_index, 3);
    assert!(load_str("empty.yaml", "").resources.is_empty());
}

#[test]
fn both_versions_load_to_the_same_model() {
    let v1beta1 = GOOD_AP.replace("security.istio.io/v1", "security.istio.io/v1beta1");
    let a = load_str("a", GOOD_AP);
    let b = load_str("b", &v1beta1);
    assert_eq!(a.resources[0].api_version(), ApiVersion::V1);
    assert_eq!(b.resources[0].api_version(), ApiVersion::V1beta1);
    assert_eq!(ap(&a, 0).spec, ap(&b, 0).spec);
}

#[test]
fn absent_and_empty_are_kept_apart() {
    let load_spec = |spec: &str| {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\n{spec}\n"
        );
        let result = load_str("t.yaml", &text);
        assert!(result.problems.is_empty(), "{spec}: {:?}", result.problems);
        ap(&result, 0).spec.clone()
    };
    let absent = load_spec("");
    let empty_spec = load_spec("spec: {}");
    let null_rules = load_spec("spec: {rules: ~}");
    let empty_rules = load_spec("spec: {rules: []}");
    let one_empty_rule = load_spec("spec: {rules: [{}]}");
    assert_eq!(absent, empty_spec);
    assert_eq!(absent.rules, None);
    assert_eq!(null_rules.rules, None, "null counts as absent");
    assert_eq!(empty_rules.rules, Some(vec![]));
    assert_eq!(one_empty_rule.rules.as_ref().map(Vec::len), Some(1));
    assert_eq!(absent.action(), Action::Allow);
    assert!(absent.rules().is_empty() && empty_rules.rules().is_empty());
    let r = &one_empty_rule.rules()[0];
    assert!(r.from.is_none() && r.to.is_none() && r.when.is_empty());

    // from: [] is refused (absent would mean any source), from absent is fine.
    let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{to: []}]}\n";
    assert!(
        only_problem(&load_str("t.yaml", text))
            .reason
            .contains("`to` must not be empty")
    );
}

#[test]
fn port_level_mtls_keys_may_be_integers_or_strings() {
    let text = "apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: pa, namespace: foo}
spec:
  selector: {matchLabels: {app: a}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: DISABLE}
    \"9090\": {mode: PERMISSIVE}
    9091: {}
";
    let result = load_str("pa.yaml", text);
    assert!(result.problems.is_empty(), "{:?}", result.problems);
    let Resource::PeerAuthentication(pa) = &result.resources[0] else {
        panic!("not a PA")
    };
    assert_eq!(pa.spec.mode(), MtlsMode::Strict);
    let ports: BTreeMap<u32, MtlsMode> = pa
        .spec
        .port_level_mtls
        .as_ref()
        .expect("ports")
        .iter()
        .map(|(p, m)| (*p, m.mode))
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([
            (8080, MtlsMode::Disable),
            (9090, MtlsMode::Permissive),
            (9091, MtlsMode::Unset)
        ])
    );
    // The same port twice (once as int, once as string) is refused.
    let dup = text.replace("\"9090\"", "\"8080\"");
    assert!(!load_str("pa.yaml", &dup).problems.is_empty());
}

#[test]
fn duplicate_names_are_refused() {
    let text = format!("{GOOD_AP}---\n{GOOD_AP}");
    let result = load_str("dup.yaml", &text);
    assert_eq!(result.resources.len(), 1);
    let p = only_problem(&result);
    assert_eq!(p.doc_index, 2);
    assert!(
        p.reason.contains("duplicate AuthorizationPolicy foo/good"),
        "{}",
        p.reason
    );
    // Same name in another namespace or another kind is fine.
    let other_ns = format!(
        "{GOOD_AP}---\n{}",
        GOOD_AP.replace("namespace: foo", "namespace: bar")
    );
    assert!(load_str("t.yaml", &other_ns).problems.is_empty());
}

#[test]
fn exported_objects_with_server_fields_load() {
    let text = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
  uid: 1b4c
  resourceVersion: \"123\"
  generation: 1
  creationTimestamp: \"2024-01-02T03:04:05Z\"
  managedFields: [{manager: kubectl}]
  annotations: {kubectl.kubernetes.io/last-applied-configuration: \"{}\"}
spec: {mtls: {mode: STRICT}}
status: {}
";
    let result = load_str("export.yaml", text);
    assert!(result.problems.is_empty(), "{:?}", result.problems);
    let meta = result.resources[0].metadata();
    assert_eq!(
        meta.creation_time().map(|t| t.unix_timestamp()),
        Some(1_704_164_645)
    );
    let bad_time = text.replace("2024-01-02T03:04:05Z", "yesterday");
    assert_eq!(
        only_problem(&load_str("t.yaml", &bad_time)).field_path,
        "metadata.creationTimestamp"
    );
}

#[test]
fn namespace_defaults_and_names_are_checked() {
    let no_ns = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {}\n";
    let result = load_str("t.yaml", no_ns);
    assert_eq!(result.resources[0].namespace(), "default");
    let no_name = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {namespace: foo}\nspec: {}\n";
    assert_eq!(
        only_problem(&load_str("t.yaml", no_name)).field_path,
        "metadata.name"
    );
    let bad_name = no_ns.replace("name: p", "name: Bad_Name");
    assert_eq!(
        only_problem(&load_str("t.yaml", &bad_name)).field_path,
        "metadata.name"
    );
}

#[test]
fn jwt_rule_fields_load_as_written() {
    let text = "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: ra, namespace: foo}
spec:
  selector: {matchLabels: {app: a}}
  jwtRules:
  - issuer: https://issuer.example
    audiences: [a, b]
    jwks_uri: https://issuer.example/jwks
    fromHeaders: [{name: x-jwt, prefix: \"Bearer \"}]
    fromParams: [tok]
    fromCookies: [session]
    outputPayloadToHeader: x-payload
    outputClaimToHeaders: [{header: x-sub, claim: sub}]
    forwardOriginalToken: true
    timeout: 1.5s
  - issuer: other
";
    let result = load_str("ra.yaml", text);
    assert!(result.problems.is_empty(), "{:?}", result.problems);
    let Resource::RequestAuthentication(ra) = &result.resources[0] else {
        panic!("not an RA")
    };
    let r = &ra.spec.rules()[0];
    assert_eq!(r.jwks_uri.as_deref(), Some("https://issuer.example/jwks"));
    assert_eq!(
        r.from_headers.as_ref().expect("headers")[0].prefix,
        "Bearer "
    );
    assert!(!r.uses_default_locations());
    assert!(r.forward_original_token);
    assert_eq!(r.timeout(), std::time::Duration::from_millis(1500));
    let d = &ra.spec.rules()[1];
    assert!(d.uses_default_locations());
    assert_eq!(d.timeout(), std::time::Duration::from_secs(5));
    assert!(!d.forward_original_token);
    // jwksUri and jwks_uri together: one field given twice.
    let both = text.replace(
        "    jwks_uri: https://issuer.example/jwks\n",
        "    jwks_uri: https://issuer.example/jwks\n    jwksUri: https://issuer.example/jwks\n",
    );
    assert!(!load_str("ra.yaml", &both).problems.is_empty());
}

/// `remoteIpBlocks`/`remote.ip` are the client's `X-Forwarded-For` claim: an ALLOW on them,
/// or a DENY's negated forms, are accepted with a warning that says so; a DENY on the
/// address itself and `ipBlocks` get none.
#[test]
fn forwarded_for_claims_are_warned_about() {
    let ap = |action: &str, rule: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\n\
             spec:\n  selector: {{matchLabels: {{app: a}}}}\n  action: {action}\n  rules: [{rule}]\n"
        )
    };
    let warned = |action: &str, rule: &str| -> Vec<(String, String)> {
        let r = load_str("t.yaml", &ap(action, rule));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.resources.len(), 1);
        r.warnings
            .iter()
            .filter(|w| w.reason.contains("X-Forwarded-For"))
            .map(|w| (w.field_path.clone(), w.reason.clone()))
            .collect()
    };
    let w = warned(
        "ALLOW",
        "{from: [{source: {remoteIpBlocks: [10.0.0.0/8]}}]}",
    );
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].0
            .ends_with("spec.rules[0].from[0].source.remoteIpBlocks"),
        "{w:?}"
    );
    assert!(w[0].1.contains("admits whoever claims"), "{w:?}");
    let w = warned("ALLOW", "{when: [{key: remote.ip, values: [10.0.0.0/8]}]}");
    assert!(w[0].0.ends_with("spec.rules[0].when[0]"), "{w:?}");
    let w = warned(
        "DENY",
        "{from: [{source: {notRemoteIpBlocks: [10.0.0.0/8]}}]}",
    );
    assert!(w[0].1.contains("escapes this DENY"), "{w:?}");
    // Twins: no warning.
    assert!(warned("DENY", "{from: [{source: {remoteIpBlocks: [10.0.0.0/8]}}]}").is_empty());
    assert!(warned("ALLOW", "{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}").is_empty());
    assert!(warned("DENY", "{when: [{key: remote.ip, values: [10.0.0.1]}]}").is_empty());
}

#[test]
fn warnings_do_not_refuse() {
    let text = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  selector: {}
  action: DENY
  rules: [{to: [{operation: {methods: [POST]}}]}]
";
    let result = load_str("t.yaml", text);
    assert!(result.problems.is_empty(), "{:?}", result.problems);
    assert_eq!(result.resources.len(), 1);
    let reasons: Vec<&str> = result.warnings.iter().map(|w| w.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("without labels")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("deny all traffic to TCP ports")),
        "{reasons:?}"
    );
    // With a port, no TCP warning.
    let with_port = text.replace("methods: [POST]", "methods: [POST], ports: [\"80\"]");
    let result = load_str("t.yaml", &with_port);
    assert!(
        !result
            .warnings
            .iter()
            .any(|w| w.reason.contains("TCP ports"))
    );
}

#[test]
fn folders_load_recursively_in_order_and_skip_other_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sub = dir.path().join("b-sub");
    std::fs::create_dir(&sub).expect("mkdir");
    std::fs::create_dir(dir.path().join(".hidden")).expect("mkdir");
    std::fs::write(dir.path().join("a.yaml"), GOOD_AP).expect("write");
    std::fs::write(sub.join("c.yml"), GOOD_AP.replace("name: good", "name: c")).expect("write");
    std::fs::write(dir.path().join("notes.txt"), "not yaml: [").expect("write");
    std::fs::write(dir.path().join(".hidden/x.yaml"), "broken: [").expect("write");
    std::fs::write(
        dir.path().join("z.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: z}\nspec: {mtls: {mode: NOPE}}\n",
    )
    .expect("write");
    let result = load_path(dir.path());
    let names: Vec<&str> = result.resources.iter().map(|r| r.name()).collect();
    assert_eq!(names, ["good", "c"]);
    let p = only_problem(&result);
    assert!(p.file.ends_with("z.yaml"), "{p}");
    assert_eq!(p.field_path, "spec.mtls.mode");
    assert!(p.reason.contains("Unsupported value: \"NOPE\""), "{p}");
    assert_eq!(result.resources[1].kind(), Kind::AuthorizationPolicy);
    assert!(result.resources[1].origin().file.ends_with("c.yml"));

    // Loading the same folder twice refuses the duplicates.
    let twice = load_paths(&[dir.path(), dir.path()]);
    assert_eq!(twice.resources.len(), 2);
    assert!(
        twice
            .problems
            .iter()
            .filter(|p| p.reason.contains("duplicate"))
            .count()
            == 2
    );

    let missing = load_path(&dir.path().join("nope.yaml"));
    let p = only_problem(&missing);
    assert_eq!(p.doc_index, 0);
    assert!(p.reason.contains("cannot read"), "{p}");
    assert!(missing.into_resources().is_err());
}

#[test]
fn dry_run_annotation_and_typed_accessors() {
    let text = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: shadow, namespace: foo, annotations: {istio.io/dry-run: \"True\"}}
spec: {action: DENY, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: not-dry, namespace: foo, annotations: {istio.io/dry-run: \"0\"}}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: plain, namespace: foo}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: pa, namespace: foo}
spec: {}
";
    let result = load_str("t.yaml", text);
    assert!(result.problems.is_empty(), "{:?}", result.problems);
    let dry: Vec<(&str, bool)> = result
        .authorization_policies()
        .map(|p| (p.name(), p.is_dry_run()))
        .collect();
    assert_eq!(
        dry,
        [("shadow", true), ("not-dry", false), ("plain", false)]
    );
    assert_eq!(result.peer_authentications().count(), 1);
    assert_eq!(result.request_authentications().count(), 0);
    assert_eq!(
        result
            .authorization_policies()
            .next()
            .map(|p| p.spec.action()),
        Some(Action::Deny)
    );
}

/// Values Istio accepts but that can never match what the proxy compares them with (or not
/// as written) load with a warning naming the file, document, policy, field and why; each
/// has a twin written the working way that gets none.
#[test]
fn values_that_never_match_are_warned_about() {
    let ap = |rule: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\n\
             spec:\n  selector: {{matchLabels: {{app: a}}}}\n  rules: [{rule}]\n"
        )
    };
    let warned = |rule: &str| -> Vec<String> {
        let r = load_str("t.yaml", &ap(rule));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.resources.len(), 1, "accepted, as Istio accepts it");
        r.warnings.iter().map(|w| w.to_string()).collect()
    };
    let cases = [
        (
            "{from: [{source: {principals: ['spiffe://cluster.local/ns/a/sa/b']}}]}",
            "{from: [{source: {principals: [cluster.local/ns/a/sa/b]}}]}",
            "spec.rules[0].from[0].source.principals[0]",
            "write \"cluster.local/ns/a/sa/b\"",
        ),
        (
            "{from: [{source: {notPrincipals: [x, 'spiffe://td/ns/a/sa/b']}}]}",
            "{from: [{source: {notPrincipals: [x, td/ns/a/sa/b]}}]}",
            "spec.rules[0].from[0].source.notPrincipals[1]",
            "never matches",
        ),
        (
            "{when: [{key: source.principal, values: ['spiffe://td/ns/a/sa/b']}]}",
            "{when: [{key: source.principal, values: [td/ns/a/sa/b]}]}",
            "spec.rules[0].when[0].values[0]",
            "without \"spiffe://\"",
        ),
        (
            "{from: [{source: {requestPrincipals: [alice]}}]}",
            "{from: [{source: {requestPrincipals: ['https://idp.example/alice']}}]}",
            "spec.rules[0].from[0].source.requestPrincipals[0]",
            "\"<iss>/<sub>\"",
        ),
        (
            "{from: [{source: {notRequestPrincipals: [idp]}}]}",
            "{from: [{source: {notRequestPrincipals: ['*', 'idp*']}}]}",
            "spec.rules[0].from[0].source.notRequestPrincipals[0]",
            "\"idp/*\"",
        ),
        (
            "{to: [{operation: {methods: [GET, get]}}]}",
            "{to: [{operation: {methods: [GET]}}]}",
            "spec.rules[0].to[0].operation.methods[1]",
            "answers 400",
        ),
        (
            "{to: [{operation: {notMethods: [Post]}}]}",
            "{to: [{operation: {notMethods: [POST, PURGE]}}]}",
            "spec.rules[0].to[0].operation.notMethods[0]",
            "write \"POST\"",
        ),
        (
            "{to: [{operation: {paths: ['/api/*/items']}}]}",
            "{to: [{operation: {paths: ['/api/{*}/items', '/api/*', '*/items', '*']}}]}",
            "spec.rules[0].to[0].operation.paths[0]",
            "write \"/api/{*}/items\"",
        ),
        (
            "{to: [{operation: {notPaths: ['/a*b']}}]}",
            "{to: [{operation: {notPaths: ['/a/{**}']}}]}",
            "spec.rules[0].to[0].operation.notPaths[0]",
            "literal character",
        ),
        // Both ends: Istio strips only the leading '*' (a suffix match of "/admin/*").
        (
            "{to: [{operation: {paths: ['*/admin/*']}}]}",
            "{to: [{operation: {paths: ['*/admin', '/admin/*', '/{*}/admin/{**}']}}]}",
            "spec.rules[0].to[0].operation.paths[0]",
            "ending in the literal \"/admin/*\"",
        ),
    ];
    for (bad, good, field, why) in cases {
        let w = warned(bad);
        assert_eq!(w.len(), 1, "{bad}: {w:?}");
        assert!(
            w[0].starts_with(&format!(
                "t.yaml: document 1: {field}: AuthorizationPolicy foo/p: "
            )) && w[0].contains(why),
            "{bad}: {w:?}"
        );
        assert_eq!(warned(good), Vec::<String>::new(), "{good}");
    }
}
