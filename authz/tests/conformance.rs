//! Conformance with Istio's validation, over the shared corpus in
//! `../shared/conformance/istio/` (relative to the workspace root; override with
//! `RAMPART_CONFORMANCE_DIR`). The corpus is never copied into this repository; where it is
//! absent these tests say so plainly and pass without checking anything.
//!
//! * Valid inputs (must load with no problem): `crd-validation/*-valid.yaml`,
//!   `examples/*.yaml`, `authz-builder/{http,tcp}/*-in.yaml`, `ambient-rbac-convert/*-in.yaml`.
//!   One deliberate difference from Istio (docs/AUTHZ.md): a document with a `when` key
//!   `experimental.envoy.filters.*` is refused (Rampart has no Envoy dynamic metadata, so the
//!   condition could never match and a DENY using it would never deny). Such refusals are
//!   counted apart and must name that reason at a `.key` field of a document that really uses
//!   the key; every other document must still load.
//! * Invalid inputs (every document refused, with the expected reason):
//!   `crd-validation/*-invalid.yaml` (each document carries `_err:` with a substring of
//!   Istio's message; the key is stripped before loading) and every row of `invalid-cases.md`.

use std::path::{Path, PathBuf};

use rampart_authz::{ENVOY_METADATA_UNSUPPORTED, Kind, LoadResult, load_path, load_str};

fn corpus_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("RAMPART_CONFORMANCE_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/istio"),
    };
    if dir.join("invalid-cases.md").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "conformance corpus MISSING at {} (set RAMPART_CONFORMANCE_DIR): conformance NOT checked",
            dir.display()
        );
        None
    }
}

fn files_in(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&keep))
        .collect();
    files.sort();
    files
}

/// Every file of the corpus that holds valid input.
fn valid_files(corpus: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    files.extend(files_in(&corpus.join("crd-validation"), |n| {
        n.ends_with("-valid.yaml")
    }));
    files.extend(files_in(&corpus.join("examples"), |n| n.ends_with(".yaml")));
    for sub in [
        "authz-builder/http",
        "authz-builder/tcp",
        "ambient-rbac-convert",
    ] {
        files.extend(files_in(&corpus.join(sub), |n| n.ends_with("-in.yaml")));
    }
    files
}

#[test]
fn every_valid_input_loads() {
    let Some(corpus) = corpus_dir() else { return };
    let files = valid_files(&corpus);
    assert!(
        files.len() >= 60,
        "expected the whole corpus, found {} files",
        files.len()
    );
    let mut failures = Vec::new();
    let mut resources = 0;
    let mut skipped = 0;
    let mut deliberate = 0;
    for file in &files {
        let result: LoadResult = load_path(file);
        let text = std::fs::read_to_string(file).unwrap();
        let mut only_deliberate = !result.problems.is_empty();
        for p in &result.problems {
            if p.reason == ENVOY_METADATA_UNSUPPORTED
                && p.field_path.ends_with(".key")
                && text.contains("experimental.envoy.filters.")
            {
                deliberate += 1;
            } else {
                only_deliberate = false;
                failures.push(p.to_string());
            }
        }
        if result.resources.is_empty() && !only_deliberate {
            failures.push(format!("{}: no resource loaded", file.display()));
        }
        resources += result.resources.len();
        skipped += result.skipped.len();
    }
    println!(
        "conformance: valid inputs: {} files, {} resources loaded, {} other-kind documents skipped, {} problems, {} refused on purpose (experimental.envoy.filters.*)",
        files.len(),
        resources,
        skipped,
        failures.len(),
        deliberate
    );
    assert!(
        failures.is_empty(),
        "valid inputs refused:\n{}",
        failures.join("\n")
    );
}

#[test]
fn analyzer_example_skips_other_kinds() {
    let Some(corpus) = corpus_dir() else { return };
    let result = load_path(&corpus.join("examples/analyzer-authorizationpolicies.yaml"));
    assert!(result.problems.is_empty(), "{:?}", result.problems);
    assert!(result.skipped.iter().any(|s| s.kind == "Deployment"));
    assert!(result.skipped.iter().any(|s| s.kind == "Namespace"));
    assert!(
        result
            .resources
            .iter()
            .all(|r| r.kind() == Kind::AuthorizationPolicy)
    );
}

/// One `_err`-annotated document of `crd-validation/*-invalid.yaml`.
struct CrdCase {
    file: String,
    text: String,
    expected: String,
}

/// Splits a crd-validation invalid file into its documents, taking `_err:` out of each.
fn crd_invalid_cases(path: &Path) -> Vec<CrdCase> {
    let text = std::fs::read_to_string(path).expect("read crd invalid file");
    let mut cases = Vec::new();
    for doc in text.split("\n---") {
        let mut expected = None;
        let mut body = String::new();
        for line in doc.lines() {
            if let Some(err) = line.strip_prefix("_err:") {
                let err = err.trim();
                let err = err
                    .strip_prefix('\'')
                    .and_then(|e| e.strip_suffix('\''))
                    .or_else(|| err.strip_prefix('"').and_then(|e| e.strip_suffix('"')))
                    .unwrap_or(err);
                expected = Some(err.to_string());
            } else {
                body.push_str(line);
                body.push('\n');
            }
        }
        if let Some(expected) = expected {
            cases.push(CrdCase {
                file: path.display().to_string(),
                text: body,
                expected,
            });
        }
    }
    cases
}

/// One row of `invalid-cases.md`.
struct MdCase {
    id: String,
    yaml: String,
    reason: String,
}

fn md_invalid_cases(corpus: &Path) -> Vec<MdCase> {
    let text = std::fs::read_to_string(corpus.join("invalid-cases.md")).expect("read md");
    let mut cases = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("| ") else {
            continue;
        };
        let Some((id, rest)) = rest.split_once(" | ") else {
            continue;
        };
        if !(id.starts_with("ap-")
            || id.starts_with("ra-")
            || id.starts_with("pa-")
            || id.starts_with("gen-"))
        {
            continue;
        }
        let Some((_layer, rest)) = rest.split_once(" | `") else {
            panic!("row {id}: no YAML column");
        };
        let Some((yaml, reason)) = rest.split_once("` | ") else {
            panic!("row {id}: YAML column not closed");
        };
        cases.push(MdCase {
            id: id.to_string(),
            yaml: yaml.to_string(),
            reason: reason.trim_end_matches(" |").to_string(),
        });
    }
    cases
}

/// Our expected reason substring for each row of invalid-cases.md (the cause Istio names,
/// in Istio's words where the table gives them).
fn expected_reason(id: &str) -> &'static str {
    match id {
        "ap-01" => "DENY action without `rules` is meaningless",
        "ap-02" => "CUSTOM action without `rules` is meaningless",
        "ap-03" | "ap-04" => "`provider.name` must not be empty",
        "ap-05" => "`provider` must not be with non CUSTOM action, found ALLOW",
        "ap-06" => "From.Namespaces is currently not supported with CUSTOM action",
        "ap-07" => "request.auth.claims[a] is currently not supported with CUSTOM action",
        "ap-08" => "Unsupported value: \"REJECT\"",
        "ap-09" => "only one of targetRefs or workloadSelector can be set",
        "ap-10" => "wildcard is not supported in selector",
        "ap-11" => "wildcard is not supported in selector",
        "ap-12" => "empty key is not supported in selector",
        "ap-13" => "cross namespace referencing is not supported",
        "ap-14" => "targetRef name must be set",
        "ap-15" => "targetRef must be to one of",
        "ap-16" => "targetRef must be to one of",
        "ap-17" => "should match",
        "ap-18" => "`from.source` must not be nil, found at rule 0",
        "ap-19" => "`from.source` must not be empty, found at rule 0",
        "ap-20" => "`to.operation` must not be nil, found at rule 0",
        "ap-21" => "`to.operation` must not be empty, found at rule 0",
        "ap-22" => "`from` must not be empty, found at rule 0",
        "ap-23" => "`rule` must not be nil, found at rule 0",
        "ap-24" => "cannot set serviceAccounts with namespaces or principals, found at rule 0",
        "ap-25" => "empty value not allowed, found in Principals",
        "ap-26" => "empty value not allowed, found in ServiceAccounts",
        "ap-27" => "wildcard not allowed, found in ServiceAccounts",
        "ap-28" => "expected format 'serviceAccount' or 'namespace/serviceAccount'",
        "ap-29" => "found empty namespace",
        "ap-30" => "may not have more than 16 values",
        "ap-31" => "wildcard is only allowed at the start or end, found in TrustDomains",
        "ap-32" => "at most one wildcard is allowed, found in TrustDomains",
        "ap-33" => "trust domain must not contain '/', found in TrustDomains",
        "ap-34" => "bad IP address (ip1)",
        "ap-35" => "bad CIDR range (10.0.0.0/33)",
        "ap-36" => "bad port (port1)",
        "ap-37" => "bad port (65536)",
        "ap-38" => "{**} is not the last operator",
        "ap-39" => "Contains '{' or '}' beyond a supported path template",
        "ap-40" => "Contains segment * with invalid string literal",
        "ap-41" => "`key` must not be empty",
        "ap-42" => "at least one of `values` or `notValues` must be set for key source.principal",
        "ap-43" => "unknown attribute: key1",
        "ap-44" => "invalid `value` for `key` source.ip: bad IP address (a.b.c.d)",
        "ap-45" => "invalid `notValue` for `key` source.ip: bad IP address (a.b.c.d)",
        "ap-46" => "empty value not allowed, found in request.headers[:authority]",
        "ap-47" => "bad key (request.headers[]): should have format a[b]",
        "ap-48" => "bad port (x)",
        "ap-49" => "attribute destination.labels[app] is replaced by the workload selector",
        "ap-50" => "attribute destination.namespace is replaced by the metadata.namespace",
        "ap-51" => "deprecated attribute destination.user: only supported in v1alpha1",
        "ap-52" => "found empty serviceAccount",
        "ap-53" => "wildcard is only allowed at the start or end",
        "ap-54" => "has annotation istio.io/dry-run with invalid value (foo)",
        "ap-55" => {
            "the annotation istio.io/dry-run currently only supports action ALLOW/DENY, found action AUDIT"
        }
        "ap-56" => "must have at most 63 characters",
        "ra-01" => "issuer or jwksUri must be non-empty string",
        "ra-02" => "must not be null",
        "ra-03" => "audience must be non-empty string",
        "ra-04" => "URI scheme \"\" is not supported",
        "ra-05" => "invalid port \":not-a-number\" after host",
        "ra-06" => "jwks parse error",
        "ra-07" => "only one of jwks or jwksUri can be set",
        "ra-08" => "location header name must be non-empty string",
        "ra-09" => "location query must be non-empty string",
        "ra-10" => "cookie name must be non-empty string",
        "ra-11" => "outputClaimToHeaders header and claim value must be non-empty string",
        "ra-12" => "header name abc%123 is not a valid header name",
        "ra-13" => "duration must be greater than 1ms",
        "ra-14" => "spaceDelimitedClaims[0] must be non-empty string",
        "ra-15" => "Unsupported value: \"MANDATORY\"",
        "ra-16" => "issuer in body should be at least 1 chars long",
        "ra-17" => "only one of targetRefs or workloadSelector can be set",
        "ra-18" => "empty key is not supported in selector",
        "ra-19" => {
            "foo/ra-19 has unsupported annotation istio.io/dry-run, please remove the annotation"
        }
        "pa-01" => "Unsupported value: \"BLAH\"",
        "pa-02" | "pa-03" => "mesh/namespace peer authentication cannot have port level mTLS",
        "pa-04" => "port level mTLS, if defined, must have at least one element",
        "pa-05" | "pa-06" => "port must be in range 1..65535",
        "pa-07" => "type conversion error from string to int",
        "pa-08" => "wildcard is not supported in selector",
        "pa-09" => "has unsupported annotation istio.io/dry-run, please remove the annotation",
        "gen-01" => "\"internal.istio.io/webhook-always-reject\" annotation found, rejecting",
        "gen-02" => {
            "\"internal.istio.io/parent-namespace\" annotation found, this may not be set by users"
        }
        _ => "",
    }
}

/// Our expected reason substring for an `_err` of a crd-validation file, where our wording
/// follows the webhook rather than the apiserver.
fn crd_expected(err: &str) -> &str {
    match err {
        "Cannot set serviceAccounts with namespaces or principals" => {
            "cannot set serviceAccounts with namespaces or principals"
        }
        "type conversion error from" => "type conversion error from string to int",
        "portLevelMtls requires selector" => {
            "mesh/namespace peer authentication cannot have port level mTLS"
        }
        "spec.portLevelMtls in body should have at least 1 properties" => {
            "port level mTLS, if defined, must have at least one element"
        }
        "port must be between 1-65535" => "port must be in range 1..65535",
        "only one of targetRefs or selector can be set" => "only one of",
        "spec.targetRef.name: Required value" => "targetRef name must be set",
        "cross namespace referencing is not currently supported" => {
            "cross namespace referencing is not supported"
        }
        "spec.targetRef.group in body should match" => "group in body should match",
        "spec.targetRef.kind in body should match" => "kind in body should match",
        "spec.jwtRules[0] in body must be of type object" => "must not be null",
        "audiences[0] in body should be at least 1 chars long" => {
            "audience must be non-empty string"
        }
        "url must have scheme" => "url must have scheme http:// or https://",
        "spec.jwtRules[0].fromHeaders[0].name: Required value"
        | "spec.jwtRules[0].fromHeaders[0].name in body should be at least 1 chars long" => {
            "location header name must be non-empty string"
        }
        "fromParams[0] in body should be at least 1 chars long" => {
            "location query must be non-empty string"
        }
        "fromCookies[0] in body should be at least 1 chars long" => {
            "cookie name must be non-empty string"
        }
        "spec.jwtRules[0].outputClaimToHeaders[0] in body must be of type object" => {
            "must not be null"
        }
        "spec.jwtRules[0].outputClaimToHeaders[0].claim in body should be at least 1 chars long"
        | "header in body should be at least 1 chars long" => {
            "outputClaimToHeaders header and claim value must be non-empty string"
        }
        "header in body should match" => "is not a valid header name",
        "must be a valid duration greater than" => "invalid duration",
        "spaceDelimitedClaims[0] in body should be at least 1 chars long" => {
            "spaceDelimitedClaims[0] must be non-empty string"
        }
        other => other,
    }
}

#[test]
fn every_invalid_case_is_refused_with_its_reason() {
    let Some(corpus) = corpus_dir() else { return };
    let mut failures = Vec::new();
    let mut refused = 0;
    let mut total = 0;

    let md = md_invalid_cases(&corpus);
    assert!(
        md.len() >= 80,
        "expected every row of invalid-cases.md, found {}",
        md.len()
    );
    for case in &md {
        total += 1;
        let expected = expected_reason(&case.id);
        assert!(
            !expected.is_empty(),
            "no expectation written for {}",
            case.id
        );
        let result = load_str(&case.id, &case.yaml);
        let lines: Vec<String> = result.problems.iter().map(|p| p.to_string()).collect();
        if !result.resources.is_empty() || result.problems.is_empty() {
            failures.push(format!("{}: ACCEPTED (Istio: {})", case.id, case.reason));
        } else if !lines.iter().any(|l| l.contains(expected)) {
            failures.push(format!(
                "{}: refused, but not with {expected:?}: {}",
                case.id,
                lines.join(" | ")
            ));
        } else {
            refused += 1;
        }
    }

    for file in files_in(&corpus.join("crd-validation"), |n| {
        n.ends_with("-invalid.yaml")
    }) {
        for case in crd_invalid_cases(&file) {
            total += 1;
            let expected = crd_expected(&case.expected);
            let result = load_str(&case.file, &case.text);
            let lines: Vec<String> = result.problems.iter().map(|p| p.to_string()).collect();
            if !result.resources.is_empty() || result.problems.is_empty() {
                failures.push(format!(
                    "{}: ACCEPTED (Istio: {})",
                    case.file, case.expected
                ));
            } else if !lines.iter().any(|l| l.contains(expected)) {
                failures.push(format!(
                    "{}: refused, but not with {expected:?}: {}",
                    case.file,
                    lines.join(" | ")
                ));
            } else {
                refused += 1;
            }
        }
    }
    println!("conformance: invalid cases refused with the expected reason: {refused}/{total}");
    assert!(
        failures.is_empty(),
        "invalid cases:\n{}",
        failures.join("\n")
    );
}
