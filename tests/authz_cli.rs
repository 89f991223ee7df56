//! `rampart authz check --config DIR --request FILE [--output json]`: explains a decision for
//! a hypothetical request (decision, status, policy, rule, reason), including JWT outcomes,
//! PeerAuthentication STRICT and the mesh's path normalization.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: ns1}
spec:
  selector: {matchLabels: {app: b}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/ns1/sa/sleep]}}]
    to: [{operation: {methods: [GET], paths: ['/api/*']}}]
  - from: [{source: {requestPrincipals: ['https://idp.example/*']}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: ns1}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ['/api/admin', '/api/admin/*']}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict-db, namespace: ns1}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: idp, namespace: ns1}
spec:
  jwtRules:
  - issuer: https://idp.example
    jwksUri: https://idp.example/.well-known/jwks.json
    outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]
";

fn rampart(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(args)
        .output()
        .expect("run rampart")
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(mesh: Option<&str>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("config")).unwrap();
        std::fs::write(dir.path().join("config/policies.yaml"), POLICIES).unwrap();
        if let Some(m) = mesh {
            std::fs::write(dir.path().join("config/mesh.yaml"), m).unwrap();
        }
        Fixture { dir }
    }
    fn config(&self) -> PathBuf {
        self.dir.path().join("config")
    }
    fn request(&self, name: &str, yaml: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, yaml).unwrap();
        p
    }
    /// `rampart authz check --config <this config> --request REQ` (text output).
    fn check(&self, req: &Path) -> Output {
        let config = self.config();
        rampart(&[
            "authz",
            "check",
            "--config",
            config.to_str().unwrap(),
            "--request",
            req.to_str().unwrap(),
        ])
    }

    fn check_json(&self, req: &Path, extra: &[&str]) -> Value {
        let out = check_json_output(&self.config(), req, extra);
        assert!(
            out.status.success(),
            "exit {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }
}

/// `rampart authz check --config CONFIG --request REQ --output json EXTRA...`
fn check_json_output(config: &Path, req: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "authz",
        "check",
        "--config",
        config.to_str().unwrap(),
        "--request",
        req.to_str().unwrap(),
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    rampart(&args)
}

fn req(principal: Option<&str>, method: &str, path: &str, extra: &str) -> String {
    let source = match principal {
        Some(p) => format!("{{principal: {p}, ip: 10.0.1.1}}"),
        None => "{ip: 10.0.1.1}".to_string(),
    };
    format!(
        "destination: {{namespace: ns1, labels: {{app: b}}, ip: 10.0.0.10, port: 18080}}\nsource: {source}\nprotocol: http\nrequest: {{method: {method}, path: '{path}', host: b.ns1.svc.cluster.local, headers: {{}}{extra}}}\n"
    )
}

#[test]
fn allow_and_deny_are_explained_in_json() {
    let f = Fixture::new(None);
    let sleep = "spiffe://cluster.local/ns/ns1/sa/sleep";
    let v = f.check_json(
        &f.request("ok.yaml", &req(Some(sleep), "GET", "/api/items", "")),
        &[],
    );
    assert_eq!(v["decision"], "ALLOW");
    assert_eq!(v["status"], 200);
    assert_eq!(v["policy"]["namespace"], "ns1");
    assert_eq!(v["policy"]["name"], "allow-sleep");
    assert_eq!(v["rule"], 0);
    assert!(v["reason"].as_str().unwrap().contains("ns1/allow-sleep"));
    assert_eq!(v["mtls"]["mode"], "PERMISSIVE");

    let v = f.check_json(
        &f.request(
            "admin.yaml",
            &req(Some(sleep), "GET", "/api/admin/users", ""),
        ),
        &[],
    );
    assert_eq!(v["decision"], "DENY");
    assert_eq!(v["status"], 403);
    assert_eq!(v["policy"]["name"], "no-admin");
    assert_eq!(v["rule"], 0);

    // Negative twins: other identity, other method, plaintext.
    for (p, m) in [
        (Some("spiffe://cluster.local/ns/ns1/sa/other"), "GET"),
        (Some(sleep), "POST"),
        (None, "GET"),
    ] {
        let v = f.check_json(&f.request("no.yaml", &req(p, m, "/api/items", "")), &[]);
        assert_eq!(v["decision"], "DENY", "{p:?} {m}");
        assert_eq!(v["status"], 403);
        assert_eq!(v["reason_code"], "no_allow_matched");
    }
    // `spiffe://` written in a policy never matches: the request file principal is the URI.
    let v = f.check_json(
        &f.request("dots.yaml", &req(Some(sleep), "GET", "/api/x/../admin", "")),
        &[],
    );
    assert_eq!(v["decision"], "DENY", "BASE normalization resolves ..");
    assert_eq!(v["normalized_path"], "/api/admin");
}

#[test]
fn text_output_and_exit_code_flag() {
    let f = Fixture::new(None);
    let r = f.request("admin.yaml", &req(None, "GET", "/api/admin", ""));
    let args = |extra: &[&str]| {
        let mut a = vec![
            "authz".to_string(),
            "check".into(),
            "--config".into(),
            f.config().display().to_string(),
            "--request".into(),
            r.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let a = args(&[]);
    let out = rampart(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("DENY 403 ns1/no-admin rule 0:"), "{text}");
    assert!(
        text.contains("mTLS: PERMISSIVE (no PeerAuthentication applies: Istio's default)"),
        "{text}"
    );
    let a = args(&["--exit-code"]);
    let out = rampart(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn strict_peer_authentication_refuses_plaintext() {
    let f = Fixture::new(None);
    let plain = "destination: {namespace: ns1, labels: {app: db}, port: 5432}\nsource: {ip: 10.0.1.1}\nprotocol: tcp\n";
    let v = f.check_json(&f.request("db.yaml", plain), &[]);
    assert_eq!(v["decision"], "DENY");
    assert_eq!(v["reason_code"], "mtls_required");
    assert_eq!(v["policy"]["name"], "strict-db");
    assert_eq!(v["mtls"]["mode"], "STRICT");
    // The text names the policy that set the mode, and at which level.
    let out = f.check(&f.request("db.yaml", plain));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("mTLS: STRICT (") && text.contains("PeerAuthentication ns1/strict-db)"),
        "{text}"
    );
    // With a client certificate the connection reaches authorization, where the namespace-wide
    // DENY on paths (HTTP-only) loses its paths on a TCP port and so denies all TCP, as Istio.
    let mtls = "destination: {namespace: ns1, labels: {app: db}, port: 5432}\nsource: {principal: spiffe://cluster.local/ns/ns1/sa/app}\nprotocol: tcp\n";
    let v = f.check_json(&f.request("db2.yaml", mtls), &[]);
    assert_eq!(v["decision"], "DENY");
    assert_eq!(v["reason_code"], "deny_matched");
    assert_eq!(v["policy"]["name"], "no-admin");
    // Over HTTP the same identity passes that DENY (no ALLOW policy selects db).
    let http = "destination: {namespace: ns1, labels: {app: db}, port: 5432}\nsource: {principal: spiffe://cluster.local/ns/ns1/sa/app}\nrequest: {path: /q}\n";
    let v = f.check_json(&f.request("db3.yaml", http), &[]);
    assert_eq!(v["decision"], "ALLOW");
}

#[test]
fn mesh_yaml_sets_normalization() {
    let f = Fixture::new(Some(
        "pathNormalization: {normalization: MERGE_SLASHES}\ncaAddress: 127.0.0.1:15012\n",
    ));
    let sleep = "spiffe://cluster.local/ns/ns1/sa/sleep";
    let v = f.check_json(
        &f.request("s.yaml", &req(Some(sleep), "GET", "/api//admin", "")),
        &[],
    );
    assert_eq!(v["decision"], "DENY");
    assert_eq!(v["normalized_path"], "/api/admin");
    // Under the default BASE the same request is not caught by the DENY policy.
    let f = Fixture::new(None);
    let v = f.check_json(
        &f.request("s.yaml", &req(Some(sleep), "GET", "/api//admin", "")),
        &[],
    );
    assert_eq!(v["decision"], "ALLOW");
}

#[test]
fn jwt_outcomes_with_local_jwks() {
    use rampart_certs::jwt::JwtSigner;
    use rampart_certs::{KeyAlgorithm, PrivateKey};
    let f = Fixture::new(None);
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let s = JwtSigner::new(&key, "k1").unwrap();
    let jwks = f.dir.path().join("jwks.json");
    std::fs::write(&jwks, s.jwks().unwrap().to_json().to_string()).unwrap();
    let map = format!(
        "https://idp.example/.well-known/jwks.json={}",
        jwks.display()
    );
    let token = s
        .sign(&serde_json::json!({"iss": "https://idp.example", "sub": "alice", "exp": 1_900_000_000}))
        .unwrap();
    let now = "\nnow: 2026-11-21T00:00:00Z\n";
    let with_jwt = |t: &str| format!("{}{now}", req(None, "GET", "/x", &format!(", jwt: {t}")));
    // Valid token: request principal https://idp.example/alice matches rule 1.
    let v = f.check_json(
        &f.request("j.yaml", &with_jwt(&token)),
        &["--jwks-file", &map],
    );
    assert_eq!(v["decision"], "ALLOW", "{v}");
    assert_eq!(v["rule"], 1);
    assert_eq!(v["authn"]["principal"], "https://idp.example/alice");
    // Bad token: 401 before authorization.
    let v = f.check_json(
        &f.request("j.yaml", &with_jwt("a.b.c")),
        &["--jwks-file", &map],
    );
    assert_eq!(
        (v["decision"].as_str(), v["status"].as_u64()),
        (Some("DENY"), Some(401))
    );
    // Clock after exp: 401 "expired".
    let late = with_jwt(&token).replace("2026-11-21", "2031-01-01");
    let v = f.check_json(&f.request("j.yaml", &late), &["--jwks-file", &map]);
    assert_eq!(v["status"], 401);
    assert!(v["reason"].as_str().unwrap().contains("expired"), "{v}");
    // No local JWKS for the URI: fail closed (401) for the token, naming the URI (the check
    // never fetches), with a warning on stderr ...
    let v = f.check_json(&f.request("j.yaml", &with_jwt(&token)), &[]);
    assert_eq!(v["status"], 401);
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.contains("https://idp.example/.well-known/jwks.json")
            && reason.contains("remote JWKS are not fetched here"),
        "{v}"
    );
    let config = f.config();
    let out = rampart(&[
        "authz",
        "check",
        "--config",
        config.to_str().unwrap(),
        "--request",
        f.dir.path().join("j.yaml").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: jwksUri https://idp.example/.well-known/jwks.json")
            && err.contains("use --jwks-file"),
        "{err}"
    );
    // ... while a request without a token passes authentication (no principal) and is denied
    // by authorization instead.
    let v = f.check_json(
        &f.request("n.yaml", &format!("{}{now}", req(None, "GET", "/x", ""))),
        &[],
    );
    assert_eq!(v["status"], 403);
    assert_eq!(v["authn"]["outcome"], "no_token");
    // A client's own copy of a JWT output header is removed, as the proxy removes it, and
    // the output says so.
    let forged = req(None, "GET", "/x", "").replace("headers: {}", "headers: {x-jwt-sub: admin}");
    let v = f.check_json(&f.request("f.yaml", &format!("{forged}{now}")), &[]);
    let notes = v["notes"].to_string();
    assert!(
        notes.contains("x-jwt-sub") && notes.contains("verified token"),
        "{v}"
    );
}

#[test]
fn bad_input_exits_2_and_bad_documents_are_reported() {
    let f = Fixture::new(None);
    let r = f.request(
        "bad.yaml",
        "destination: {namespace: ns1, port: 80}\nsoruce: {}\n",
    );
    let out = f.check(&r);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = rampart(&[
        "authz",
        "check",
        "--config",
        "/nonexistent",
        "--request",
        r.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    // A request naming its source in the form policies write (no `spiffe://`) names no
    // peer identity: refused, with the form to write. Its twin (the URI) is judged.
    let r = f.request(
        "p.yaml",
        &req(Some("cluster.local/ns/ns1/sa/sleep"), "GET", "/api/x", ""),
    );
    let out = f.check(&r);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("source.principal")
            && err.contains("write \"spiffe://cluster.local/ns/ns1/sa/sleep\""),
        "{err}"
    );
    let r = f.request(
        "p.yaml",
        &req(
            Some("spiffe://cluster.local/ns/ns1/sa/sleep"),
            "GET",
            "/api/x",
            "",
        ),
    );
    assert_eq!(f.check(&r).status.code(), Some(0));
}

/// A folder with a document the proxy refuses (here `path:` for `paths:`) is refused whole,
/// as the proxy refuses it and keeps serving its last good configuration: no verdict is
/// given for a state that never serves, exit 2. Its twin, the typo fixed, is judged.
#[test]
fn a_configuration_the_proxy_refuses_is_not_judged() {
    let f = Fixture::new(None);
    let broken = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: ns1}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {path: [/api/items]}}]}]\n";
    std::fs::write(f.config().join("broken.yaml"), broken).unwrap();
    let r = f.request("ok.yaml", &req(None, "GET", "/api/items", ""));
    for out in [f.check(&r), check_json_output(&f.config(), &r, &[])] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            out.stdout.is_empty(),
            "no verdict: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            err.contains(
                "broken.yaml: document 1: spec.rules[0].to[0].operation.path: unknown field"
            ),
            "{err}"
        );
        assert!(
            err.contains("the proxy would refuse this configuration"),
            "{err}"
        );
    }
    std::fs::write(
        f.config().join("broken.yaml"),
        broken.replace("path:", "paths:"),
    )
    .unwrap();
    let v = f.check_json(&r, &[]);
    assert_eq!(v["decision"], "DENY");
    assert_eq!(v["policy"]["name"], "x");
}

/// Policy-load warnings reach `authz check` too (here a principal written with
/// `spiffe://`, which never matches); the jwksUri warning names its URI once.
#[test]
fn load_warnings_are_printed_and_the_jwks_uri_once() {
    let f = Fixture::new(None);
    std::fs::write(
        f.config().join("scheme.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: scheme, namespace: ns1}\nspec:\n  selector: {matchLabels: {app: c}}\n  rules: [{from: [{source: {principals: ['spiffe://cluster.local/ns/ns1/sa/sleep']}}]}]\n",
    )
    .unwrap();
    let out = f.check(&f.request("ok.yaml", &req(None, "GET", "/api/items", "")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("scheme.yaml: document 1: spec.rules[0].from[0].source.principals[0]: AuthorizationPolicy ns1/scheme:")
            && err.contains("write \"cluster.local/ns/ns1/sa/sleep\""),
        "{err}"
    );
    let uri = "https://idp.example/.well-known/jwks.json";
    assert_eq!(err.matches(uri).count(), 1, "{err}");
    // Twin: without that policy, no principal warning.
    std::fs::remove_file(f.config().join("scheme.yaml")).unwrap();
    let out = f.check(&f.request("ok.yaml", &req(None, "GET", "/api/items", "")));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("principals["));
}

/// The text output echoes who asks on which port, names AUDIT and dry-run policies (which
/// `considered` leaves out) and says what dry-run policies would do in words, not JSON.
#[test]
fn text_output_names_the_source_and_the_policies_that_do_not_decide() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(
        config.join("p.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: audit-all, namespace: ns1}\nspec: {action: AUDIT, rules: [{}]}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: try-deny, namespace: ns1, annotations: {istio.io/dry-run: 'true'}}\nspec: {action: DENY, rules: [{to: [{operation: {methods: [GET]}}]}]}\n",
    )
    .unwrap();
    let r = dir.path().join("r.yaml");
    std::fs::write(
        &r,
        req(
            Some("spiffe://cluster.local/ns/ns1/sa/sleep"),
            "GET",
            "/x",
            "",
        ),
    )
    .unwrap();
    let out = rampart(&[
        "authz",
        "check",
        "--config",
        config.to_str().unwrap(),
        "--request",
        r.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("ALLOW 200"), "{text}");
    assert!(
        text.contains("source: spiffe://cluster.local/ns/ns1/sa/sleep at 10.0.1.1; destination port 18080 (http)"),
        "{text}"
    );
    assert!(text.contains("considered: none"), "{text}");
    assert!(
        text.contains("not enforced (AUDIT, dry-run): ns1/audit-all, ns1/try-deny"),
        "{text}"
    );
    assert!(
        text.contains("audit: ns1/audit-all rule 0 matched"),
        "{text}"
    );
    assert!(
        text.contains("dry-run: DENY ns1/try-deny rule 0 would deny"),
        "{text}"
    );
    assert!(!text.contains('{'), "no raw JSON: {text}");
    // Twin: a POST meets no dry-run rule, and a plaintext source is said so.
    std::fs::write(&r, req(None, "POST", "/x", "")).unwrap();
    let out = rampart(&[
        "authz",
        "check",
        "--config",
        config.to_str().unwrap(),
        "--request",
        r.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("dry-run:"), "{text}");
    assert!(
        text.contains("source: plaintext peer at 10.0.1.1"),
        "{text}"
    );
}

/// A folder whose mesh config is spelled `mesh.yml` is refused by name, as the proxy refuses
/// it (its settings would otherwise be lost, and the file read as a policy).
#[test]
fn a_mesh_yml_is_refused_by_name() {
    let f = Fixture::new(None);
    std::fs::write(f.config().join("mesh.yml"), "trustDomain: example.org\n").unwrap();
    let r = f.request("ok.yaml", &req(None, "GET", "/api/x", ""));
    let out = f.check(&r);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("mesh.yml: the mesh config is read from mesh.yaml only"),
        "{err}"
    );
}

/// The quickstart's mesh folder, as `rampart up` runs it, is a `--config` as it is: its
/// `workloads.yaml` is not read as policy (no spurious "document ignored"), and its
/// `mesh.yaml` (MERGE_SLASHES) applies, so `//admin` meets the DENY rule the running proxy
/// applies. Its twin: `--config` its `policy/` alone (no mesh.yaml) does not merge slashes.
#[test]
fn the_quickstart_mesh_folder_is_a_config_folder() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart");
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("r.yaml");
    std::fs::write(
        &req,
        "destination: {namespace: api, labels: {app: backend}, ip: 127.0.0.1, port: 8080}\n\
         source: {principal: spiffe://cluster.local/ns/web/sa/frontend, ip: 127.0.0.1}\n\
         protocol: http\n\
         request: {method: GET, path: '//admin', host: backend.api:8080, headers: {}}\n",
    )
    .unwrap();
    let run = |config: &Path| {
        let out = check_json_output(config, &req, &[]);
        assert!(out.status.success(), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        (v, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (v, err) = run(&root);
    assert!(!err.contains("workloads.yaml"), "{err}");
    assert!(!err.contains("document ignored"), "{err}");
    assert_eq!(v["decision"], "DENY", "{v}");
    assert_eq!(v["normalized_path"], "/admin", "{v}");
    assert_eq!(v["policy"]["name"], "backend-deny-admin", "{v}");
    let (v, _) = run(&root.join("policy"));
    assert_eq!(v["normalized_path"], "//admin", "{v}");
}

/// "Why was I denied": each ALLOW rule's first failing condition, in the text output and in
/// JSON `explanation`; a header's value is never shown. Twin: an allowed request has none.
#[test]
fn a_denial_is_explained_rule_by_rule() {
    let f = Fixture::new(None);
    let r = f.request(
        "d.yaml",
        &req(
            Some("spiffe://cluster.local/ns/ns1/sa/other"),
            "DELETE",
            "/api/items",
            "",
        )
        .replace("headers: {}", "headers: {x-api-key: sekrit}"),
    );
    let v = f.check_json(&r, &[]);
    assert_eq!(v["reason_code"], "no_allow_matched", "{v}");
    assert_eq!(
        v["explanation"],
        serde_json::json!([
            "ns1/allow-sleep rule 0: from.source.principals: peer spiffe://cluster.local/ns/ns1/sa/other not in [cluster.local/ns/ns1/sa/sleep]",
            "ns1/allow-sleep rule 1: from.source.requestPrincipals: no JWT sent",
        ]),
        "{v}"
    );
    let out = f.check(&r);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("  why: ns1/allow-sleep rule 1: from.source.requestPrincipals: no JWT sent"),
        "{text}"
    );
    assert!(!text.contains("sekrit"), "{text}");
    // The right identity, the wrong method: the method is named.
    let r = f.request(
        "d.yaml",
        &req(
            Some("spiffe://cluster.local/ns/ns1/sa/sleep"),
            "DELETE",
            "/api/items",
            "",
        ),
    );
    let v = f.check_json(&r, &[]);
    assert_eq!(
        v["explanation"][0], "ns1/allow-sleep rule 0: to.operation.methods: DELETE not in [GET]",
        "{v}"
    );
    // Twin: allowed, nothing to explain.
    let r = f.request(
        "d.yaml",
        &req(
            Some("spiffe://cluster.local/ns/ns1/sa/sleep"),
            "GET",
            "/api/items",
            "",
        ),
    );
    let v = f.check_json(&r, &[]);
    assert_eq!(v["decision"], "ALLOW");
    assert!(v.get("explanation").is_none(), "{v}");

    // A rule on a header's value: the explanation names the header, never the value sent
    // nor the values the policy lists (either may be a secret).
    std::fs::write(
        f.config().join("header.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-key, namespace: ns1}
spec:
  rules: [{when: [{key: 'request.headers[x-api-key]', values: [listed-secret-value]}]}]
",
    )
    .unwrap();
    let r = f.request(
        "d.yaml",
        &req(
            Some("spiffe://cluster.local/ns/ns1/sa/other"),
            "DELETE",
            "/api/items",
            "",
        )
        .replace("headers: {}", "headers: {x-api-key: sekrit}"),
    );
    let v = f.check_json(&r, &[]);
    let why = v["explanation"].to_string();
    assert!(
        why.contains("ns1/allow-key rule 0") && why.contains("x-api-key"),
        "{v}"
    );
    let out = f.check(&r);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("x-api-key"), "{text}");
    for secret in ["sekrit", "listed-secret-value"] {
        assert!(
            !text.contains(secret) && !why.contains(secret),
            "{secret}: {text}"
        );
    }
}
