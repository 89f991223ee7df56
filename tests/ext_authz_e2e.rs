//! Istio's CUSTOM action: an AuthorizationPolicy hands matching requests to a mesh config
//! extension provider, and the provider's answer decides. The provider is
//! `tests/python/ext_authz_server.py`: Envoy's gRPC authorization API from PyPI's
//! `xds-protos`, served by `grpcio`, and the HTTP flavour on Python's `http.server`. Requests
//! go through a frontend proxy's outbound listener (mTLS between the proxies, so the check
//! carries the caller's SPIFFE ID) to a backend proxy in front of `rampart echo`.
//!
//! For each provider kind: allowed requests reach the app with the provider's header changes
//! (added, removed) and the client sees the headers the provider adds to the response;
//! denied ones get the provider's status, listed headers and body and never reach the app.
//! Requests no CUSTOM rule matches are not sent to the provider; a DENY policy still applies
//! to what the provider allowed. Failures: an unreachable provider answers `statusOnError`
//! (or lets the request through when `failOpen`), a provider the mesh config does not define,
//! or one Rampart cannot use, denies. The policy file is rewritten between phases and the
//! running proxies pick it up.
//!
//! The same provider is also a mesh workload (`authz.authz`, behind its own proxy, STRICT):
//! a provider named by its service host is called through the mesh with mTLS as the backend
//! (the provider's proxy vouches for the caller in `x-forwarded-client-cert`), as Istio's
//! auto mTLS calls it; its STRICT port dialed in plaintext refuses.

mod support;
use support::{Answer, Proc, curl, free_port, python};

#[path = "../proxy/tests/support/sds_standin.rs"]
mod sds_standin;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

const TD: &str = "cluster.local";

fn custom_policy(provider: &str) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext, namespace: api}}
spec:
  selector: {{matchLabels: {{app: backend}}}}
  action: CUSTOM
  provider: {{name: {provider}}}
  rules:
  - to: [{{operation: {{paths: ["/guarded/*"]}}}}]
  - to: [{{operation: {{ports: ["9000"]}}}}]
"#
    )
}

/// Only the provider's `x-authz-user: admin` opens `/guarded/admin`: DENY/ALLOW must read the
/// header as the provider set it, never the client's copy.
const ALLOW: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admin-by-provider, namespace: api}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
  - to: [{operation: {notPaths: ["/guarded/admin", "/guarded/jwt"]}}]
  - to: [{operation: {paths: ["/guarded/admin"]}}]
    when: [{key: "request.headers[x-authz-user]", values: [admin]}]
  - from: [{source: {requestPrincipals: ["*"]}}]
    to: [{operation: {paths: ["/guarded/jwt"]}}]
  - to: [{operation: {ports: ["9000"]}}]
"#;

/// The provider's own workload: mutual TLS only, and only the backend may ask it.
const AUTHZ_STRICT: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: authz}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-backend, namespace: authz}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/api/sa/backend"]}}]
"#;

const DENY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-denied, namespace: api}
spec:
  selector: {matchLabels: {app: backend}}
  action: DENY
  rules:
  # The port keeps this rule off the TCP port: on TCP a DENY rule loses its HTTP-only
  # fields (paths) and would deny every connection.
  - to: [{operation: {ports: ["8080"], paths: ["/guarded/denied"]}}]
"#;

struct Mesh {
    _dir: tempfile::TempDir,
    /// A token the RequestAuthentication accepts.
    token: String,
    in_t: u16,
    wp: PathBuf,
    app_b: String,
    http_p: u16,
    grpc_p: u16,
    mesh: PathBuf,
    checks: PathBuf,
    out_f: u16,
    /// The backend proxy's admin port (metrics).
    admin_b: u16,
    /// The backend's inbound HTTP port (PERMISSIVE: plaintext is served too).
    in_b: u16,
    _rt: tokio::runtime::Runtime,
    _standins: Vec<sds_standin::StandIn>,
    procs: Vec<Proc>,
}

impl Mesh {
    fn start() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let wp = dir.path().to_path_buf();
        let mesh = wp.join("mesh");
        std::fs::create_dir_all(mesh.join("policy")).unwrap();
        let (in_b, in_t, admin_b) = (free_port(), free_port(), free_port());
        let (app_f, in_f, out_f, admin_f) = (free_port(), free_port(), free_port(), free_port());
        let (http_p, grpc_p, closed, closed2) =
            (free_port(), free_port(), free_port(), free_port());
        let (in_ah, in_ag, admin_a) = (free_port(), free_port(), free_port());
        let checks = wp.join("checks.jsonl");
        std::fs::write(&checks, "").unwrap();
        let mut procs = Vec::new();

        // The provider.
        let log = wp.join("ext_authz.log");
        let mut ext = Command::new(python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/ext_authz_server.py"))
            .args([http_p.to_string(), grpc_p.to_string()])
            .arg(&checks)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(ext.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let ext = Proc { child: ext, log };
        assert_eq!(first.trim(), "ready", "{}", ext.log());
        procs.push(ext);

        // The app.
        let (echo, app_b) = support::echo_app(&wp);
        procs.push(echo);

        std::fs::write(
            mesh.join("mesh.yaml"),
            format!(
                r#"trustDomain: {TD}
extensionProviders:
- name: authz-http
  envoyExtAuthzHttp:
    service: authz/127.0.0.1
    port: {http_p}
    pathPrefix: /check
    includeRequestHeadersInCheck: [x-user]
    includeAdditionalHeadersInCheck: {{x-asked-by: rampart}}
    headersToUpstreamOnAllow: ["x-authz-*"]
    headersToDownstreamOnAllow: [x-checked]
    headersToDownstreamOnDeny: [x-deny-reason]
    includeRequestBodyInCheck: {{maxRequestBytes: 16, allowPartialMessage: true}}
- name: authz-http-open
  envoyExtAuthzHttp: {{service: 127.0.0.1, port: {http_p}, failOpen: true, includeRequestHeadersInCheck: [x-user]}}
- name: authz-grpc
  envoyExtAuthzGrpc:
    service: 127.0.0.1
    port: {grpc_p}
    timeout: 5s
    includeRequestBodyInCheck: {{maxRequestBytes: 16, allowPartialMessage: true}}
- name: down-closed
  envoyExtAuthzGrpc: {{service: 127.0.0.1, port: {closed}, statusOnError: "503"}}
- name: down-open
  envoyExtAuthzHttp: {{service: 127.0.0.1, port: {closed}, failOpen: true}}
- name: with-body
  envoyExtAuthzGrpc:
    service: 127.0.0.1
    port: {grpc_p}
    includeRequestBodyInCheck: {{allowPartialMessage: true}}
- name: body-grpc
  envoyExtAuthzGrpc:
    service: 127.0.0.1
    port: {grpc_p}
    includeRequestBodyInCheck: {{maxRequestBytes: 16, allowPartialMessage: true}}
- name: body-grpc-bytes
  envoyExtAuthzGrpc:
    service: 127.0.0.1
    port: {grpc_p}
    includeRequestBodyInCheck: {{maxRequestBytes: 16, packAsBytes: true}}
- name: body-http
  envoyExtAuthzHttp:
    service: 127.0.0.1
    port: {http_p}
    includeRequestHeadersInCheck: [x-user]
    headersToUpstreamOnAllow: ["x-authz-*"]
    includeRequestBodyInCheck: {{maxRequestBytes: 16}}
- name: mesh-http
  envoyExtAuthzHttp:
    service: authz.authz.svc.cluster.local
    port: 8000
    includeRequestHeadersInCheck: [x-user]
    headersToUpstreamOnAllow: ["x-authz-*"]
    headersToDownstreamOnDeny: [x-deny-reason]
- name: mesh-grpc
  envoyExtAuthzGrpc: {{service: authz/authz.authz.svc.cluster.local, port: 9191}}
- name: strict-in-plaintext
  envoyExtAuthzGrpc: {{service: 127.0.0.1, port: {in_ag}}}
- name: mesh-no-port
  envoyExtAuthzGrpc: {{service: authz.authz.svc.cluster.local, port: 7777}}
- name: beside-the-app
  envoyExtAuthzGrpc: {{service: localhost, port: {grpc_p}}}
"#
            ),
        )
        .unwrap();
        std::fs::write(
            mesh.join("workloads.yaml"),
            format!(
                r#"workloads:
- name: backend
  namespace: api
  labels: {{app: backend}}
  ports:
  - {{port: 8080, protocol: http, app: "{app_b}", inbound: "127.0.0.1:{in_b}"}}
  - {{port: 9000, protocol: tcp, app: "{app_b}", inbound: "127.0.0.1:{in_t}"}}
  proxy: {{admin: "127.0.0.1:{admin_b}"}}
- name: frontend
  namespace: web
  ports:
  - {{port: 80, protocol: http, app: "127.0.0.1:{app_f}", inbound: "127.0.0.1:{in_f}"}}
  proxy: {{outbound: "127.0.0.1:{out_f}", admin: "127.0.0.1:{admin_f}"}}
- name: authz
  namespace: authz
  ports:
  - {{port: 8000, protocol: http, app: "127.0.0.1:{http_p}", inbound: "127.0.0.1:{in_ah}"}}
  - {{port: 9191, protocol: grpc, app: "127.0.0.1:{grpc_p}", inbound: "127.0.0.1:{in_ag}"}}
  proxy: {{admin: "127.0.0.1:{admin_a}"}}
# A workload named `localhost` in the backend's namespace: a provider at `localhost` is the
# one beside the app, never this.
- name: localhost
  namespace: api
  ports:
  - {{port: {grpc_p}, protocol: grpc, app: "127.0.0.1:{closed}", inbound: "127.0.0.1:{closed2}"}}
"#
            ),
        )
        .unwrap();
        std::fs::write(mesh.join("policy/ext.yaml"), custom_policy("authz-http")).unwrap();
        std::fs::write(mesh.join("policy/deny.yaml"), DENY).unwrap();
        std::fs::write(mesh.join("policy/allow.yaml"), ALLOW).unwrap();
        std::fs::write(mesh.join("policy/authz-strict.yaml"), AUTHZ_STRICT).unwrap();
        // A RequestAuthentication: `/guarded/jwt` needs a verified token.
        let key = wp.join("idp.pem");
        let tool = |args: &[&str]| {
            let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        let key_s = key.to_str().unwrap();
        tool(&["token", "keygen", "--out", key_s]);
        let jwks: Value = serde_json::from_str(&tool(&["token", "jwks", "--key", key_s])).unwrap();
        let jwks = jwks.to_string();
        let token = tool(&[
            "token",
            "issue",
            "--key",
            key_s,
            "--issuer",
            "https://idp.test",
            "--ns",
            "web",
            "--sa",
            "frontend",
        ]);
        std::fs::write(
            mesh.join("policy/jwt.yaml"),
            format!(
                "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: idp, namespace: api}}\nspec:\n  selector: {{matchLabels: {{app: backend}}}}\n  jwtRules:\n  - issuer: https://idp.test\n    jwks: '{jwks}'\n"
            ),
        )
        .unwrap();

        let rt = tokio::runtime::Runtime::new().unwrap();
        let ca = sds_standin::TestCa::new("ext_authz Root");
        let sds_b = wp.join("sds-b.sock");
        let sds_f = wp.join("sds-f.sock");
        let sds_a = wp.join("sds-a.sock");
        let standins = rt.block_on(async {
            vec![
                sds_standin::start(
                    &sds_b,
                    Some(ca.secrets(&format!("spiffe://{TD}/ns/api/sa/backend"), 1)),
                ),
                sds_standin::start(
                    &sds_f,
                    Some(ca.secrets(&format!("spiffe://{TD}/ns/web/sa/frontend"), 1)),
                ),
                sds_standin::start(
                    &sds_a,
                    Some(ca.secrets(&format!("spiffe://{TD}/ns/authz/sa/authz"), 1)),
                ),
            ]
        });
        for (workload, sds, log, admin) in [
            ("api/backend", &sds_b, "backend.log", admin_b),
            ("web/frontend", &sds_f, "frontend.log", admin_f),
            ("authz/authz", &sds_a, "authz.log", admin_a),
        ] {
            let log = wp.join(log);
            let child = Command::new(env!("CARGO_BIN_EXE_rampart"))
                .args(["proxy", "--mesh"])
                .arg(&mesh)
                .args(["--workload", workload, "--sds-socket"])
                .arg(sds)
                .args(["--drain-timeout", "1s"])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let p = Proc { child, log };
            support::wait_for(
                "proxy ready",
                Duration::from_secs(30),
                || ready(admin),
                || p.log(),
            );
            procs.push(p);
        }
        Mesh {
            _dir: dir,
            token,
            in_t,
            wp,
            app_b,
            http_p,
            grpc_p,
            mesh,
            checks,
            out_f,
            admin_b,
            in_b,
            _rt: rt,
            _standins: standins,
            procs,
        }
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(Proc::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// `GET http://backend.api:8080<path>` through the frontend's outbound listener.
    fn get(&self, path: &str, headers: &[&str]) -> Answer {
        let proxy = format!("http://127.0.0.1:{}", self.out_f);
        curl(
            &["-x", &proxy, &format!("http://backend.api:8080{path}")],
            headers,
            || self.logs(),
        )
    }

    /// The backend proxy's Prometheus text.
    fn metrics(&self) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.admin_b)).unwrap();
        s.write_all(b"GET /stats/prometheus HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// `POST http://backend.api:8080<path>` with `body`, through the frontend's outbound
    /// listener.
    fn post(&self, path: &str, headers: &[&str], body: &str) -> Answer {
        let proxy = format!("http://127.0.0.1:{}", self.out_f);
        curl(
            &[
                "-x",
                &proxy,
                "--data-binary",
                body,
                &format!("http://backend.api:8080{path}"),
            ],
            headers,
            || self.logs(),
        )
    }

    /// The checks the provider has received so far.
    fn checks(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.checks)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Point the CUSTOM policy at `provider` and wait until `probe` says it is in force.
    fn use_provider(&self, provider: &str, probe: impl Fn(&Mesh) -> bool) {
        std::fs::write(self.mesh.join("policy/ext.yaml"), custom_policy(provider)).unwrap();
        support::wait_for(
            &format!("the CUSTOM policy to use {provider}"),
            Duration::from_secs(30),
            || probe(self),
            || self.logs(),
        );
    }
}

fn ready(admin: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", admin)) else {
        return false;
    };
    let _ = s.write_all(b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

/// Whether `ping` comes back over `s` (the echo app behind a TCP port), or the proxy closes.
fn tcp_echoes(mut s: TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if s.write_all(b"ping\n").is_err() {
        return false;
    }
    let mut got = [0u8; 5];
    s.read_exact(&mut got).is_ok() && &got == b"ping\n"
}

/// A TCP connection to backend.api:9000 through the frontend's outbound listener (CONNECT,
/// then mTLS between the proxies).
fn tcp_via_outbound(out: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", out)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"CONNECT backend.api:9000 HTTP/1.1\r\nHost: backend.api:9000\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "CONNECT answered {head:?}"
    );
    s
}

fn echoed(a: &Answer) -> Value {
    assert_eq!(a.status, 200, "{}", a.body);
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {}", a.body))
}

#[test]
fn custom_policies_ask_http_and_grpc_providers_and_fail_closed() {
    let m = Mesh::start();
    let alice = ["x-user: alice", "x-secret: s3cret", "x-authz-user: forged"];

    // --- HTTP provider ---
    let a = m.get("/guarded/a?q=1", &alice);
    let app = echoed(&a);
    assert_eq!(app["headers"]["x-authz-user"], "alice", "{app}");
    assert!(app["headers"].get("x-secret").is_none(), "{app}");
    assert_eq!(a.headers.get("x-checked").map(String::as_str), Some("yes"));
    assert!(!a.headers.contains_key("x-not-listed"));
    let checks = m.checks();
    assert_eq!(checks.len(), 1, "{checks:?}");
    let c = &checks[0];
    assert_eq!(c["kind"], "http");
    assert_eq!(c["method"], "GET");
    assert_eq!(c["path"], "/check/guarded/a?q=1");
    assert_eq!(c["headers"]["host"], "backend.api:8080");
    assert_eq!(c["headers"]["x-user"], "alice");
    assert_eq!(c["headers"]["x-asked-by"], "rampart");
    assert_eq!(c["headers"]["content-length"], "0");
    // Only the listed headers (and Host, Method, Path, Content-Length, Authorization) go to
    // the provider.
    assert!(c["headers"].get("x-secret").is_none(), "{c}");

    // Negative twin: the provider's denial, as it shaped it; the app is not reached.
    let a = m.get("/guarded/a", &["x-user: bob"]);
    assert_eq!(a.status, 418, "{}", a.body);
    assert_eq!(a.body, "who are you?");
    assert_eq!(
        a.headers.get("x-deny-reason").map(String::as_str),
        Some("not alice")
    );
    assert!(!a.headers.contains_key("x-not-listed"));
    assert_eq!(m.checks().len(), 2);
    // The provider judges the path the app would get (`..` resolved, as policy sees it), not
    // the one the client wrote: `/open/../guarded/x` is a guarded path.
    let a = m.get("/open/../guarded/x", &["x-user: bob"]);
    assert_eq!(a.status, 418, "{}", a.body);
    assert_eq!(m.checks().last().unwrap()["path"], "/check/guarded/x");

    // DENY and ALLOW read the headers as the provider set them: a client's own
    // `x-authz-user: admin` is replaced by the provider's `alice` before ALLOW looks...
    let a = m.get("/guarded/admin", &["x-user: alice", "x-authz-user: admin"]);
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(a.body, "RBAC: access denied");
    // ...and the provider's `admin` opens it.
    let app = echoed(&m.get("/guarded/admin", &["x-user: root"]));
    assert_eq!(app["headers"]["x-authz-user"], "admin");
    // A provider failing (5xx) is not a verdict: statusOnError (403 here), nothing of its page.
    let a = m.get("/guarded/a", &["x-user: crash"]);
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(!a.body.contains("10.0.0.5"), "{}", a.body);
    // A gRPC caller gets the denial as a gRPC status.
    let a = m.get(
        "/guarded/a",
        &["x-user: bob", "content-type: application/grpc"],
    );
    assert_eq!(
        a.headers.get("grpc-status").map(String::as_str),
        Some("2"), // 418 is UNKNOWN in Envoy's HTTP-to-gRPC mapping
        "{:?}",
        a.headers
    );
    assert_eq!(
        a.headers.get("x-deny-reason").map(String::as_str),
        Some("not alice")
    );
    let asked = m.checks().len();

    // An HTTP provider cannot judge a TCP connection (Istio asks only gRPC providers about
    // TCP): a CUSTOM rule matching the TCP port closes it, and the provider is not asked.
    let plain = TcpStream::connect(("127.0.0.1", m.in_t)).unwrap();
    assert!(
        !tcp_echoes(plain),
        "TCP passed a CUSTOM rule with an HTTP provider"
    );
    assert_eq!(m.checks().len(), asked);

    // No CUSTOM rule matches: the provider is not asked.
    echoed(&m.get("/open", &["x-user: bob"]));
    assert_eq!(m.checks().len(), asked);
    // The provider allows; DENY still applies.
    let a = m.get("/guarded/denied", &alice);
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(a.body, "RBAC: access denied");
    assert_eq!(m.checks().len(), asked + 1);

    // failOpen: a provider failing (5xx) lets the request through; a denial with a page too
    // long to pass on is still a denial (the page cut at 64 KiB).
    m.use_provider("authz-http-open", |m| {
        m.get("/guarded/a", &["x-user: crash"]).status == 200
    });
    let a = m.get("/guarded/a", &["x-user: big"]);
    assert_eq!(a.status, 403);
    assert_eq!(a.body.len(), 64 * 1024);

    // --- gRPC provider ---
    m.use_provider("authz-grpc", |m| {
        m.get("/guarded/probe", &["x-user: bob"]).status == 418
            && m.checks().last().is_some_and(|c| c["kind"] == "grpc")
    });
    let a = m.get("/guarded/b", &alice);
    let app = echoed(&a);
    assert_eq!(app["headers"]["x-authz-user"], "alice", "{app}");
    assert!(app["headers"].get("x-secret").is_none(), "{app}");
    // The provider cannot replace what the proxy vouches for: x-forwarded-client-cert is
    // the handshake's.
    let xfcc = app["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or_default();
    assert!(
        xfcc.contains(&format!("URI=spiffe://{TD}/ns/web/sa/frontend")) && !xfcc.contains("evil"),
        "{xfcc}"
    );
    assert_eq!(a.headers.get("x-checked").map(String::as_str), Some("yes"));
    let c = m.checks().pop().unwrap();
    assert_eq!(c["kind"], "grpc");
    assert_eq!(c["path"], "/guarded/b");
    assert_eq!(c["host"], "backend.api:8080");
    assert_eq!(c["method"], "GET");
    // The caller's identity, from the mTLS handshake, and the callee's.
    assert_eq!(
        c["source_principal"],
        format!("spiffe://{TD}/ns/web/sa/frontend")
    );
    assert_eq!(
        c["destination_principal"],
        format!("spiffe://{TD}/ns/api/sa/backend")
    );
    assert_eq!(c["source_address"], "127.0.0.1");
    assert_eq!(
        c["headers"]["x-secret"], "s3cret",
        "gRPC checks see every header"
    );
    let a = m.get("/guarded/b", &["x-user: bob"]);
    assert_eq!(a.status, 418);
    assert_eq!(a.body, "who are you?");
    assert_eq!(
        a.headers.get("x-deny-reason").map(String::as_str),
        Some("not alice")
    );

    // The deprecated `append` field of a header, when present, decides: true joins the
    // value to the request's, false replaces it.
    let app = echoed(&m.get(
        "/guarded/b",
        &["x-user: appender", "x-list: one", "x-keep: client"],
    ));
    assert_eq!(app["headers"]["x-list"], "one,two", "{app}");
    assert_eq!(app["headers"]["x-keep"], "provider", "{app}");

    // The provider runs before authentication (Istio's order: ext_authz, then jwt_authn): a
    // client's bad token that the provider replaces with a good one is never judged...
    let swap = format!("x-swap-token: {}", m.token);
    let app = echoed(&m.get("/guarded/jwt", &["authorization: Bearer not-a-jwt", &swap]));
    // (ALLOW needed its request principal; the verified token is then removed, Istio's
    // default `forwardOriginalToken: false`.)
    assert!(app["headers"].get("authorization").is_none(), "{app}");
    // ...while the token the provider puts there is: a bad one gets 401.
    let a = m.get("/guarded/jwt", &["x-swap-token: not-a-jwt"]);
    assert_eq!(a.status, 401, "{}", a.body);
    // No token at all: ALLOW needs a request principal.
    let a = m.get("/guarded/jwt", &["x-user: alice"]);
    assert_eq!(a.status, 403, "{}", a.body);

    // TCP (Envoy's network ext_authz): the gRPC provider is asked about the connection, with
    // the caller's SPIFFE ID. It allows the frontend's mTLS connection...
    assert!(tcp_echoes(tcp_via_outbound(m.out_f)), "{}", m.logs());
    let c = m.checks().pop().unwrap();
    assert_eq!(c["kind"], "tcp", "{c}");
    assert_eq!(
        c["source_principal"],
        format!("spiffe://{TD}/ns/web/sa/frontend")
    );
    // ...and refuses a plaintext one (no identity): the proxy closes it.
    let plain = TcpStream::connect(("127.0.0.1", m.in_t)).unwrap();
    assert!(
        !tcp_echoes(plain),
        "a connection the provider refused carried data"
    );
    assert_eq!(m.checks().pop().unwrap()["source_principal"], "");

    // --- the provider in the mesh ---
    // Named by its service host, it is called through the mesh: mTLS as the backend, which
    // the provider's proxy (STRICT, ALLOW only the backend) vouches for.
    let backend_id = format!("URI=spiffe://{TD}/ns/api/sa/backend");
    m.use_provider("mesh-http", |m| {
        m.get("/guarded/probe", &["x-user: bob"]).status == 418
            && m.checks().last().is_some_and(|c| {
                c["kind"] == "http" && c["headers"]["x-forwarded-client-cert"].is_string()
            })
    });
    let app = echoed(&m.get("/guarded/m", &alice));
    assert_eq!(app["headers"]["x-authz-user"], "alice", "{app}");
    let c = m.checks().pop().unwrap();
    assert_eq!(c["path"], "/guarded/m");
    let xfcc = c["headers"]["x-forwarded-client-cert"].as_str().unwrap();
    assert!(xfcc.contains(&backend_id), "{xfcc}");
    let a = m.get("/guarded/m", &["x-user: bob"]);
    assert_eq!(a.status, 418, "{}", a.body);
    assert_eq!(a.body, "who are you?");
    m.use_provider("mesh-grpc", |m| {
        m.get("/guarded/probe", &["x-user: bob"]).status == 418
            && m.checks().last().is_some_and(|c| c["kind"] == "grpc")
    });
    let app = echoed(&m.get("/guarded/m", &alice));
    assert_eq!(app["headers"]["x-authz-user"], "alice", "{app}");
    let c = m.checks().pop().unwrap();
    assert!(c["xfcc"].as_str().unwrap().contains(&backend_id), "{c}");
    assert_eq!(
        c["source_principal"],
        format!("spiffe://{TD}/ns/web/sa/frontend")
    );
    // TCP checks go the same way.
    assert!(tcp_echoes(tcp_via_outbound(m.out_f)), "{}", m.logs());
    assert_eq!(m.checks().pop().unwrap()["kind"], "tcp");
    // Negative twin: the provider's STRICT port dialed in plaintext (an address the registry
    // does not name) refuses, and the request gets statusOnError; the provider never sees it.
    m.use_provider("strict-in-plaintext", |m| {
        m.get("/guarded/m", &alice).status == 403
    });
    let before = m.checks().len();
    assert_eq!(m.get("/guarded/m", &alice).status, 403);
    assert_eq!(m.checks().len(), before, "{}", m.logs());
    assert!(
        m.logs()
            .contains("extension provider \"strict-in-plaintext\""),
        "{}",
        m.logs()
    );

    // A registry host with no endpoint serving the port: an error (statusOnError), never a
    // call outside the mesh.
    let before = m.checks().len();
    m.use_provider("mesh-no-port", |m| {
        m.get("/guarded/m", &alice).status == 403
            && m.logs().contains("no endpoint of it serves port 7777")
    });
    assert_eq!(m.checks().len(), before);
    // `localhost` is the provider beside the app, even with a workload of that name in the
    // caller's namespace.
    m.use_provider("beside-the-app", |m| {
        m.get("/guarded/m", &alice).status == 200
    });
    let c = m.checks().pop().unwrap();
    assert_eq!(c["kind"], "grpc");
    assert_eq!(c["xfcc"], "", "called directly, not through a proxy: {c}");

    // --- the body (includeRequestBodyInCheck) ---
    // gRPC, 16 bytes, partial bodies allowed: a longer body is shown cut and marked, and the
    // app still gets all of it.
    let alice_only = ["x-user: alice"];
    m.use_provider("body-grpc", |m| {
        m.post("/guarded/p", &alice_only, "0123456789abcdefXYZ")
            .status
            == 200
            && m.checks().last().is_some_and(|c| c["body"] != "")
    });
    let app = echoed(&m.post("/guarded/p", &alice_only, "0123456789abcdefXYZ"));
    assert_eq!(app["body_bytes"], 19, "{app}");
    let c = m.checks().pop().unwrap();
    assert_eq!(c["body"], "0123456789abcdef");
    assert_eq!(c["headers"]["x-envoy-auth-partial-body"], "true");
    assert_eq!(c["size"], 19);
    let app = echoed(&m.post("/guarded/p", &alice_only, "short body"));
    assert_eq!(app["body_bytes"], 10, "{app}");
    let c = m.checks().pop().unwrap();
    assert_eq!(c["body"], "short body");
    assert_eq!(c["headers"]["x-envoy-auth-partial-body"], "false");
    // A request without a body: nothing held, no mark.
    echoed(&m.get("/guarded/p", &alice_only));
    let c = m.checks().pop().unwrap();
    assert!(
        c["headers"].get("x-envoy-auth-partial-body").is_none(),
        "{c}"
    );
    // A body sent with WebSocket upgrade headers is shown too (a real handshake has none).
    echoed(&m.post(
        "/guarded/p",
        &["x-user: alice", "connection: upgrade", "upgrade: websocket"],
        "sent with upgrade headers",
    ));
    assert_eq!(m.checks().pop().unwrap()["body"], "sent with upgrad");
    // The client's own partial-body mark never reaches the provider.
    echoed(&m.get(
        "/guarded/p",
        &["x-user: alice", "x-envoy-auth-partial-body: false"],
    ));
    let c = m.checks().pop().unwrap();
    assert!(
        c["headers"].get("x-envoy-auth-partial-body").is_none(),
        "{c}"
    );
    // The provider still decides: a denial, the body never reaching the app.
    assert_eq!(m.post("/guarded/p", &["x-user: bob"], "abc").status, 418);
    // As bytes (packAsBytes), no partial bodies: too long is 413 before the provider is
    // asked.
    m.use_provider("body-grpc-bytes", |m| {
        m.post("/guarded/p", &alice_only, "0123456789abcdefXYZ")
            .status
            == 413
    });
    let before = m.checks().len();
    let a = m.post("/guarded/p", &alice_only, "0123456789abcdefXYZ");
    assert_eq!((a.status, a.body.as_str()), (413, "Payload Too Large"));
    assert_eq!(m.checks().len(), before, "a refused body is not shown");
    let app = echoed(&m.post("/guarded/p", &alice_only, "\u{e9}t\u{e9}"));
    assert_eq!(app["body_bytes"], 5);
    let c = m.checks().pop().unwrap();
    assert_eq!(c["raw_body_hex"], "c3a974c3a9");
    assert_eq!(c["body"], "");
    // HTTP: the body is the check's body.
    m.use_provider("body-http", |m| {
        m.post("/guarded/p", &alice_only, "abc").status == 200
            && m.checks().last().is_some_and(|c| c["kind"] == "http")
    });
    let app = echoed(&m.post("/guarded/p", &alice_only, "hello body"));
    assert_eq!(app["body_bytes"], 10);
    assert_eq!(app["headers"]["x-authz-user"], "alice");
    let c = m.checks().pop().unwrap();
    assert_eq!(c["body"], "hello body");
    assert_eq!(c["headers"]["content-length"], "10");
    assert_eq!(
        m.post("/guarded/p", &alice_only, "0123456789abcdefXYZ")
            .status,
        413
    );

    // A client that leaves mid-body is counted as Envoy counts it (code 0, DC), not as a 400
    // it never saw; the provider is not asked.
    m.use_provider("body-grpc", |m| {
        m.post("/guarded/p", &alice_only, "abc").status == 200
            && m.checks()
                .last()
                .is_some_and(|c| c["kind"] == "grpc" && c["body"] == "abc")
    });
    let before = m.checks().len();
    let dc = |m: &Mesh| {
        m.metrics()
            .lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("response_code=\"0\"")
                    && l.contains("response_flags=\"DC\"")
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum::<u64>()
    };
    let dc_before = dc(&m);
    // Straight to the backend's inbound port in plaintext (PERMISSIVE), then through the
    // frontend's outbound (which passes the break-off on over mTLS).
    for (n, port, target) in [
        (1, m.in_b, "/guarded/p"),
        (2, m.out_f, "http://backend.api:8080/guarded/p"),
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(
            format!(
                "POST {target} HTTP/1.1\r\nhost: backend.api:8080\r\nx-user: alice\r\n\
                 content-length: 100\r\n\r\nhello"
            )
            .as_bytes(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(s);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while dc(&m) < dc_before + n && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(dc(&m), dc_before + n, "{}\n{}", m.metrics(), m.logs());
    }
    // An HTTP/2 client that resets its stream mid-body (h2c to the PERMISSIVE port): DR.
    let dr = |m: &Mesh| {
        m.metrics()
            .lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("response_code=\"0\"")
                    && l.contains("response_flags=\"DR\"")
            })
            .count()
    };
    assert_eq!(dr(&m), 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", m.in_b))
            .await
            .unwrap();
        let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::post("http://backend.api:8080/guarded/p")
            .header("x-user", "alice")
            .header("content-length", "100")
            .body(())
            .unwrap();
        let (_resp, mut stream) = client.send_request(req, false).unwrap();
        stream
            .send_data(bytes::Bytes::from_static(b"hello"), false)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.send_reset(h2::Reason::CANCEL);
        // The connection stays open: only the stream ends.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while dr(&m) == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(client);
        driver.abort();
    });
    assert_eq!(dr(&m), 1, "{}\n{}", m.metrics(), m.logs());
    assert!(
        !m.metrics().contains("response_code=\"400\""),
        "a client that left is not a 400:\n{}",
        m.metrics()
    );
    assert_eq!(m.checks().len(), before, "a broken-off body is not shown");
    // Its twin: a body that arrives whole is still shown and allowed.
    assert_eq!(m.post("/guarded/p", &alice_only, "whole").status, 200);
    assert_eq!(m.checks().pop().unwrap()["body"], "whole");

    // --- failures ---
    // Unreachable, not failOpen: statusOnError.
    m.use_provider("down-closed", |m| m.get("/guarded/c", &alice).status == 503);
    echoed(&m.get("/open", &alice));
    // Unreachable, failOpen: the request goes on.
    m.use_provider("down-open", |m| {
        m.get("/guarded/c", &["x-user: bob"]).status == 200
    });
    // A provider Rampart cannot use (a body limit of 0, which Envoy refuses), and one nobody
    // defined: denied.
    m.use_provider("with-body", |m| {
        let a = m.get("/guarded/c", &alice);
        a.status == 403 && a.body == "RBAC: access denied"
    });
    let before = m.checks().len();
    m.use_provider("nobody", |m| {
        let a = m.get("/guarded/c", &alice);
        a.status == 403 && a.body == "RBAC: access denied"
    });
    echoed(&m.get("/open", &alice));
    assert_eq!(
        m.checks().len(),
        before,
        "unusable providers are never asked"
    );
    let logs = m.logs();
    assert!(
        logs.contains("includeRequestBodyInCheck.maxRequestBytes"),
        "the denial names why the provider cannot be used:\n{logs}"
    );
}

/// A real Envoy configured as istiod configures a sidecar's inbound for the CUSTOM policy
/// above with the `authz-*` providers (the shadow RBAC filter that marks matching requests, then ext_authz enabled by
/// that mark; see `authz-builder/http/custom-*-provider-out*.yaml` in the shared Istio
/// conformance data), one listener per provider kind, in front of the same app.
fn envoy_beside(m: &Mesh, http_l: u16, grpc_l: u16) -> support::envoy::Envoy {
    use serde_json::json;
    let addr = support::envoy::addr;
    let shadow = json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "shadow_rules": {"action": "DENY", "policies": {
                "istio-ext-authz-ns[api]-policy[ext]-rule[0]": {
                    "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [
                        {"url_path": {"path": {"prefix": "/guarded/"}}}
                    ]}}]}}],
                    "principals": [{"and_ids": {"ids": [{"any": true}]}}]
                }
            }},
            "shadow_rules_stat_prefix": "istio_ext_authz_"
        }
    });
    let enabled = json!({
        "filter": "envoy.filters.http.rbac",
        "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
        "value": {"string_match": {"prefix": "istio-ext-authz"}}
    });
    // The mesh's DENY policy `no-denied`, as istiod writes it: after ext_authz, so a request
    // the provider allowed can still be denied here.
    let deny = json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": {
                "ns[api]-policy[no-denied]-rule[0]": {
                    "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [
                        {"url_path": {"path": {"exact": "/guarded/denied"}}}
                    ]}}]}}],
                    "principals": [{"and_ids": {"ids": [{"any": true}]}}]
                }
            }}
        }
    });
    // As istiod writes `includeRequestBodyInCheck` (the `authz-*` providers).
    let body = json!({"max_request_bytes": 16, "allow_partial_message": true});
    let pattern = |p: &str| match (p.strip_suffix('*'), p.strip_prefix('*')) {
        (Some(prefix), _) => json!({"prefix": prefix, "ignore_case": true}),
        (_, Some(suffix)) => json!({"suffix": suffix, "ignore_case": true}),
        _ => json!({"exact": p, "ignore_case": true}),
    };
    let http_ext = json!({
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "status_on_error": {"code": "Forbidden"},
            "filter_enabled_metadata": enabled,
            "with_request_body": body,
            "allowed_headers": {"patterns": [pattern("x-user")]},
            "http_service": {
                "server_uri": {"uri": format!("http://127.0.0.1:{}", m.http_p), "cluster": "ext-http", "timeout": "10s"},
                "path_prefix": "/check",
                "authorization_request": {"headers_to_add": [{"key": "x-asked-by", "value": "rampart"}]},
                "authorization_response": {
                    "allowed_upstream_headers": {"patterns": [pattern("x-authz-*")]},
                    "allowed_client_headers": {"patterns": [pattern("x-deny-reason")]},
                    "allowed_client_headers_on_success": {"patterns": [pattern("x-checked")]}
                }
            }
        }
    });
    let grpc_ext = json!({
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "status_on_error": {"code": "Forbidden"},
            "filter_enabled_metadata": enabled,
            "with_request_body": body,
            "grpc_service": {"envoy_grpc": {"cluster_name": "ext-grpc", "authority": "127.0.0.1"}, "timeout": "5s"}
        }
    });
    let listener = |name: &str, port: u16, ext: &serde_json::Value| {
        json!({
            "name": name,
            "address": addr(port),
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": name,
                    // Istio's settings for pathNormalization BASE.
                    "normalize_path": true,
                    "merge_slashes": false,
                    "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
                    "http_filters": [
                        shadow,
                        ext,
                        deny,
                        {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                    ],
                    "route_config": {"virtual_hosts": [{
                        "name": "all", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}]
                    }]}
                }
            }]}]
        })
    };
    let (app_host, app_port) = m.app_b.rsplit_once(':').unwrap();
    assert_eq!(app_host, "127.0.0.1");
    let cluster = |name: &str, port: u16, h2: bool| {
        let mut c = json!({
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr(port)}}]}]}
        });
        if h2 {
            c["typed_extension_protocol_options"] = json!({
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}
                }
            });
        }
        c
    };
    let bootstrap = json!({
        "node": {"id": "sidecar~127.0.0.1~backend.api~api.svc.cluster.local", "cluster": "backend.api"},
        "admin": {"address": addr(0)},
        "static_resources": {
            "listeners": [listener("ext_http", http_l, &http_ext), listener("ext_grpc", grpc_l, &grpc_ext)],
            "clusters": [
                cluster("app", app_port.parse().unwrap(), false),
                cluster("ext-http", m.http_p, false),
                cluster("ext-grpc", m.grpc_p, true)
            ]
        }
    });
    let e = support::envoy::Envoy::start(&m.wp, "envoy", &bootstrap);
    e.wait_ready();
    e
}

#[test]
fn rampart_answers_custom_checks_as_a_real_envoy_does() {
    let m = Mesh::start();
    let (http_l, grpc_l) = (free_port(), free_port());
    let envoy = envoy_beside(&m, http_l, grpc_l);
    // The backend's RequestAuthentication verifies `authorization` (Envoy here has no
    // jwt_authn): a valid token passes both.
    let bearer = format!("authorization: Bearer {}", m.token);
    let cases: [(&str, &[&str], Option<&str>); 12] = [
        (
            "/guarded/a?q=1",
            &[
                "x-user: alice",
                "x-secret: s3cret",
                "x-authz-user: forged",
                &bearer,
            ],
            None,
        ),
        ("/guarded/a", &["x-user: bob", "x-secret: s3cret"], None),
        ("/open/../guarded/x", &["x-user: bob"], None),
        ("/guarded//a", &["x-user: alice"], None),
        // Repeated headers reach the provider as one value, as Envoy joins them.
        ("/guarded/a", &["x-user: alice", "x-user: bob"], None),
        ("/open", &["x-user: bob"], None),
        // Allowed by the provider (with a header for the client), then denied by DENY.
        ("/guarded/denied", &["x-user: alice"], None),
        // Headers the answer both sets and removes: Envoy removes after setting.
        ("/guarded/a", &["x-user: setremove", "x-keep: client"], None),
        // The deprecated `append` of a gRPC answer (the HTTP provider denies `appender`).
        (
            "/guarded/a",
            &[
                "x-user: appender",
                "x-list: one",
                "x-list: 1b",
                "x-keep: client",
                "cookie: a=1",
                "cookie: b=2",
                "x-empty: kept",
            ],
            None,
        ),
        // Bodies: cut and marked past 16 bytes, whole below; denied ones too.
        (
            "/guarded/a",
            &["x-user: alice"],
            Some("0123456789abcdefXYZ"),
        ),
        ("/guarded/a", &["x-user: alice"], Some("short")),
        ("/guarded/a", &["x-user: bob"], Some("0123456789abcdef")),
    ];
    for (provider, port, kind) in [
        ("authz-http", http_l, "http"),
        ("authz-grpc", grpc_l, "grpc"),
    ] {
        m.use_provider(provider, |m| {
            m.post("/guarded/probe", &["x-user: bob"], "probe").status == 418
                && m.checks()
                    .last()
                    .is_some_and(|c| c["kind"] == kind && c["body"] == "probe")
        });
        for (path, headers, body) in cases {
            let what = format!("{provider} {path} {headers:?} {body:?}");
            let before = m.checks().len();
            let ours = match body {
                Some(b) => m.post(path, headers, b),
                None => m.get(path, headers),
            };
            let mid = m.checks().len();
            let mut with_host = headers.to_vec();
            with_host.push("host: backend.api:8080");
            let url = format!("http://127.0.0.1:{port}{path}");
            let mut args = vec![url.as_str()];
            if let Some(b) = body {
                args.extend(["--data-binary", b]);
            }
            let theirs = curl(&args, &with_host, || envoy.proc.log());
            let after = m.checks().len();
            // The client's view.
            assert_eq!(ours.status, theirs.status, "{what}: {}", theirs.body);
            for h in ["x-checked", "x-deny-reason", "x-not-listed"] {
                assert_eq!(ours.headers.get(h), theirs.headers.get(h), "{what}: {h}");
            }
            if ours.status == 200 {
                // The app's view.
                let (a, b) = (echoed(&ours), echoed(&theirs));
                // (Not `authorization`: the backend's RequestAuthentication removes a verified
                // token, Istio's default `forwardOriginalToken: false`; this Envoy has no
                // jwt_authn.)
                for h in [
                    "x-authz-user",
                    "x-secret",
                    "x-user",
                    "x-list",
                    "x-keep",
                    "x-absent",
                    "cookie",
                    "x-empty",
                ] {
                    assert_eq!(
                        a["headers"].get(h),
                        b["headers"].get(h),
                        "{what}: app's {h}"
                    );
                }
                assert_eq!(a["path"], b["path"], "{what}");
                assert_eq!(a["body_bytes"], b["body_bytes"], "{what}");
            } else {
                assert_eq!(ours.body, theirs.body, "{what}");
            }
            // The provider's view: asked by both or by neither, about the same request.
            assert_eq!(mid - before, after - mid, "{what}: checks");
            if after > mid {
                let checks = m.checks();
                let (a, b) = (&checks[mid - 1], &checks[after - 1]);
                assert_eq!(a["method"], b["method"], "{what}");
                assert_eq!(a["path"], b["path"], "{what}");
                assert_eq!(a["body"], b["body"], "{what}: provider's body");
                assert_eq!(a.get("size"), b.get("size"), "{what}: provider's size");
                for h in [
                    "x-user",
                    "x-secret",
                    "x-asked-by",
                    "authorization",
                    "content-length",
                    "host",
                    ":authority",
                    "x-envoy-auth-partial-body",
                    "content-type",
                ] {
                    assert_eq!(
                        a["headers"].get(h),
                        b["headers"].get(h),
                        "{what}: provider's {h}\nours {a}\nEnvoy's {b}"
                    );
                }
            }
        }
    }
}
