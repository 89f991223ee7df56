//! `rampart proxy` end to end with real clients: curl, openssl s_client, Python grpcio.
//!
//! Two real `rampart proxy` processes (backend in namespace `api`, frontend in `web`) from one
//! mesh folder. Certificates come from `rampart certs root|leaf` material through an **SDS
//! stand-in** (`proxy/tests/support/sds_standin.rs`, a small tonic server in this test): it
//! can push what a correct node agent never would (a certificate for another identity, a
//! mismatched key), so the proxy's NACK and fail-closed paths are exercised. The whole-mesh
//! test (`tests/quickstart_e2e.rs`, `rampart up`) runs the same proxy with the real
//! `rampart agent` and `rampart ca`. The app here is a tiny in-test HTTP/1.1 + TCP echo
//! server (std threads) whose behaviour the assertions control.

mod support;
use support::{Proc, forward, free_port, python};

#[path = "../proxy/tests/support/sds_standin.rs"]
mod sds_standin;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sds_standin::{Reply, TestCa};

const TD: &str = "cluster.local";

fn rampart_bin() -> &'static str {
    env!("CARGO_BIN_EXE_rampart")
}

fn rampart(args: &[&str]) -> Output {
    let out = Command::new(rampart_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "rampart {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child process killed on drop.
fn start_proxy(mesh: &Path, workload: &str, sds: &Path, log: PathBuf) -> Proc {
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(rampart_bin())
        .args(["proxy", "--mesh"])
        .arg(mesh)
        .args(["--workload", workload, "--sds-socket"])
        .arg(sds)
        .args(["--drain-timeout", "3s"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// The in-test app: HTTP/1.1 echo (keep-alive) answering with what it saw.
fn echo_http(port: u16) {
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                loop {
                    let mut head = Vec::new();
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        head.push(line.trim_end().to_string());
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let text = head.join("\n") + "\n";
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{}",
                        text.len(),
                        text
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn echo_tcp(port: u16) {
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = s;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "000"));
    (code.to_string(), body.to_string())
}

fn get(url: &str) -> String {
    curl(&[url]).1
}

fn wait_for(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    support::wait_for(what, timeout, f, String::new)
}

fn sha256_der_hex(dir: &Path, pem: &Path) -> String {
    let der = dir.join("leaf.der");
    let st = Command::new("openssl")
        .args(["x509", "-outform", "der", "-in"])
        .arg(pem)
        .arg("-out")
        .arg(&der)
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .arg(&der)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

struct Ports {
    app_http: u16,
    app_tcp: u16,
    app_grpc: u16,
    in_http: u16,
    in_tcp: u16,
    in_grpc: u16,
    admin_b: u16,
    fe_app: u16,
    fe_in: u16,
    fe_out: u16,
    fe_admin: u16,
    fe_up: u16,
    impostor_in: u16,
}

fn write_mesh(dir: &Path, p: &Ports) {
    std::fs::write(
        dir.join("mesh.yaml"),
        format!(
            "trustDomain: {TD}\npathNormalization: {{normalization: DECODE_AND_MERGE_SLASHES}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("workloads.yaml"),
        format!(
            r#"workloads:
- name: backend
  namespace: api
  labels: {{app: backend}}
  ports:
  - {{port: 8080, protocol: http, app: "127.0.0.1:{}", inbound: "127.0.0.1:{}"}}
  - {{port: 9000, protocol: tcp, app: "127.0.0.1:{}", inbound: "127.0.0.1:{}"}}
  - {{port: 7070, protocol: grpc, app: "127.0.0.1:{}", inbound: "127.0.0.1:{}"}}
  proxy: {{admin: "127.0.0.1:{}"}}
- name: impostor
  namespace: api
  ports:
  - {{port: 8080, protocol: http, app: "127.0.0.1:1", inbound: "127.0.0.1:{}"}}
- name: frontend
  namespace: web
  ports:
  - {{port: 80, protocol: http, app: "127.0.0.1:{}", inbound: "127.0.0.1:{}"}}
  proxy: {{outbound: "127.0.0.1:{}", admin: "127.0.0.1:{}"}}
  upstreams:
  - {{service: backend.api, port: 9000, listen: "127.0.0.1:{}"}}
"#,
            p.app_http,
            p.in_http,
            p.app_tcp,
            p.in_tcp,
            p.app_grpc,
            p.in_grpc,
            p.admin_b,
            p.impostor_in,
            p.fe_app,
            p.fe_in,
            p.fe_out,
            p.fe_admin,
            p.fe_up,
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("policy")).unwrap();
    std::fs::write(
        dir.join("policy/authz.yaml"),
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: api}
spec:
  selector: {matchLabels: {app: backend}}
  action: DENY
  rules:
  - to: [{operation: {ports: ["8080", "7070"], paths: ["/admin", "/admin/*", "/test.Echo/Forbidden"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: api}
spec:
  selector: {matchLabels: {app: backend}}
  action: DENY
  rules:
  - to: [{operation: {ports: ["8080"], paths: ["/jwt/*"]}}]
    from: [{source: {notRequestPrincipals: ["*"]}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: issuer, namespace: api}
spec:
  selector: {matchLabels: {app: backend}}
  jwtRules:
  - issuer: https://issuer.test
    jwksUri: https://issuer.test/.well-known/jwks.json
"#,
    )
    .unwrap();
}

#[test]
fn proxy_pair_with_real_clients() {
    let w = tempfile::tempdir().unwrap();
    let wp = w.path();
    let mesh = wp.join("mesh");
    std::fs::create_dir_all(mesh.join("jwks")).unwrap();
    let p = Ports {
        app_http: free_port(),
        app_tcp: free_port(),
        app_grpc: free_port(),
        in_http: free_port(),
        in_tcp: free_port(),
        in_grpc: free_port(),
        admin_b: free_port(),
        fe_app: free_port(),
        fe_in: free_port(),
        fe_out: free_port(),
        fe_admin: free_port(),
        fe_up: free_port(),
        impostor_in: free_port(),
    };
    write_mesh(&mesh, &p);
    echo_http(p.app_http);
    echo_tcp(p.app_tcp);
    echo_http(p.fe_app);

    // PKI from the CLI: our root, a foreign root, client leaves.
    let ca_dir = wp.join("ca");
    let other_ca = wp.join("other-ca");
    rampart(&["certs", "root", "--out", ca_dir.to_str().unwrap()]);
    rampart(&[
        "certs",
        "root",
        "--out",
        other_ca.to_str().unwrap(),
        "--cn",
        "Other Root",
    ]);
    let leaf = |ca: &Path, id: &str, name: &str| -> PathBuf {
        let out = wp.join(name);
        rampart(&[
            "certs",
            "leaf",
            "--ca",
            ca.to_str().unwrap(),
            "--spiffe-id",
            id,
            "--out",
            out.to_str().unwrap(),
        ]);
        out
    };
    let good = leaf(
        &ca_dir,
        &format!("spiffe://{TD}/ns/web/sa/frontend"),
        "good",
    );
    let foreign_td = leaf(
        &ca_dir,
        "spiffe://other.example/ns/web/sa/frontend",
        "foreign-td",
    );
    let foreign_ca = leaf(
        &other_ca,
        &format!("spiffe://{TD}/ns/web/sa/frontend"),
        "foreign-ca",
    );

    // JWT issuer key + JWKS in the mesh folder.
    let jwt_key = wp.join("jwt.pem");
    rampart(&["token", "keygen", "--out", jwt_key.to_str().unwrap()]);
    let jwks = rampart(&["token", "jwks", "--key", jwt_key.to_str().unwrap()]).stdout;
    std::fs::write(mesh.join("jwks/issuer.test.json"), jwks).unwrap();
    let token = String::from_utf8(
        rampart(&[
            "token",
            "issue",
            "--key",
            jwt_key.to_str().unwrap(),
            "--issuer",
            "https://issuer.test",
            "--ns",
            "web",
            "--sa",
            "frontend",
            "--aud",
            "backend",
        ])
        .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let other_key = wp.join("other-jwt.pem");
    rampart(&["token", "keygen", "--out", other_key.to_str().unwrap()]);
    let forged = String::from_utf8(
        rampart(&[
            "token",
            "issue",
            "--key",
            other_key.to_str().unwrap(),
            "--issuer",
            "https://issuer.test",
            "--ns",
            "web",
            "--sa",
            "frontend",
        ])
        .stdout,
    )
    .unwrap()
    .trim()
    .to_string();

    // SDS stand-ins (see the module docs), one socket per proxy, no secrets yet.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::from_dir(&ca_dir);
    let sds_b = wp.join("sds-backend.sock");
    let sds_f = wp.join("sds-frontend.sock");
    let (standin_b, _standin_f) = rt.block_on(async {
        (
            sds_standin::start(&sds_b, None),
            sds_standin::start(
                &sds_f,
                Some(ca.secrets(&format!("spiffe://{TD}/ns/web/sa/frontend"), 1)),
            ),
        )
    });

    let backend = start_proxy(&mesh, "api/backend", &sds_b, wp.join("backend.log"));
    let admin = format!("http://127.0.0.1:{}", p.admin_b);
    support::wait_for(
        "backend admin",
        Duration::from_secs(20),
        || curl(&[&format!("{admin}/ready")]).0 != "000",
        || backend.log(),
    );

    // --- fail closed before any certificate ---
    let (code, body) = curl(&[&format!("{admin}/ready")]);
    assert_eq!(code, "503", "{body}");
    let in_http = format!("127.0.0.1:{}", p.in_http);
    let (code, _) = curl(&[
        "-k",
        "--cert",
        good.join("cert-chain.pem").to_str().unwrap(),
        "--key",
        good.join("key.pem").to_str().unwrap(),
        &format!("https://{in_http}/hello"),
    ]);
    assert_eq!(
        code, "000",
        "no certificate yet: the TLS handshake must fail"
    );

    standin_b
        .tx
        .send(Some(
            ca.secrets(&format!("spiffe://{TD}/ns/api/sa/backend"), 1),
        ))
        .unwrap();
    support::wait_for(
        "backend ready",
        Duration::from_secs(10),
        || curl(&[&format!("{admin}/ready")]).0 == "200",
        || backend.log(),
    );
    assert!(standin_b.replies.lock().unwrap().iter().any(
        |r| matches!(r, Reply::Ack { resource, version } if resource == "default" && version == "1")
    ));
    let certs = get(&format!("{admin}/certs"));
    assert!(
        certs.contains("spiffe://cluster.local/ns/api/sa/backend"),
        "{certs}"
    );
    assert!(certs.contains("sha256_fingerprint"), "{certs}");

    // --- PERMISSIVE (default): plaintext accepted and counted as plaintext ---
    let (code, body) = curl(&[
        "-H",
        "x-forwarded-client-cert: By=spoofed",
        &format!("http://{in_http}/hello"),
    ]);
    assert_eq!(code, "200", "{body}");
    assert!(body.starts_with("GET /hello HTTP/1.1"), "{body}");
    assert!(
        !body
            .to_ascii_lowercase()
            .contains("x-forwarded-client-cert"),
        "client xfcc must be removed: {body}"
    );
    let mtls = get(&format!("{admin}/mtls"));
    let v: serde_json::Value = serde_json::from_str(&mtls).unwrap();
    let port = v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == 8080)
        .unwrap();
    assert_eq!(port["mode"], "PERMISSIVE");
    assert!(
        port["since_start"]["plaintext_requests"].as_u64().unwrap() >= 1,
        "{mtls}"
    );
    assert!(
        port["recent"]["plaintext_connections"].as_u64().unwrap() >= 1,
        "{mtls}"
    );
    assert_eq!(port["plaintext_sources"][0]["ip"], "127.0.0.1", "{mtls}");

    // --- mTLS with a `rampart certs leaf` client certificate ---
    let mtls_curl = |dir: &Path, extra: &[&str]| -> (String, String) {
        let mut a = vec![
            "-k".to_string(), // the server's identity is its URI SAN, which curl cannot check
            "--cert".into(),
            dir.join("cert-chain.pem").to_str().unwrap().into(),
            "--key".into(),
            dir.join("key.pem").to_str().unwrap().into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        curl(&refs)
    };
    let (code, body) = mtls_curl(
        &good,
        &[
            "-H",
            "x-forwarded-client-cert: By=spoofed",
            &format!("https://{in_http}/hello"),
        ],
    );
    assert_eq!(code, "200", "{body}");
    let hash = sha256_der_hex(wp, &good.join("cert-chain.pem"));
    let want = format!(
        "x-forwarded-client-cert: By=spiffe://{TD}/ns/api/sa/backend;Hash={hash};Subject=\"\";URI=spiffe://{TD}/ns/web/sa/frontend"
    );
    assert!(
        body.to_ascii_lowercase()
            .contains(&want.to_ascii_lowercase()),
        "want {want} in {body}"
    );
    assert!(!body.contains("spoofed"), "{body}");
    // HTTP/2: h2 over mTLS (ALPN) and h2c from a plaintext client, to an HTTP/1.1 app
    let version = |args: &[&str]| -> String {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{http_version}",
            ])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(
        version(&[
            "-k",
            "--http2",
            "--cert",
            good.join("cert-chain.pem").to_str().unwrap(),
            "--key",
            good.join("key.pem").to_str().unwrap(),
            &format!("https://{in_http}/h2"),
        ]),
        "200 2"
    );
    assert_eq!(
        version(&["--http2-prior-knowledge", &format!("http://{in_http}/h2c")]),
        "200 2"
    );
    // negative twins: another trust domain, another CA, no certificate
    assert_eq!(
        mtls_curl(&foreign_td, &[&format!("https://{in_http}/hello")]).0,
        "000"
    );
    assert_eq!(
        mtls_curl(&foreign_ca, &[&format!("https://{in_http}/hello")]).0,
        "000"
    );
    assert_eq!(curl(&["-k", &format!("https://{in_http}/hello")]).0, "000");
    assert!(
        backend.log().contains("mTLS handshake refused"),
        "{}",
        backend.log()
    );

    // --- openssl s_client: TLS 1.3 only, client certificate required ---
    let s_client = |args: &[&str]| -> String {
        let mut c = Command::new("openssl")
            .args(["s_client", "-connect", &in_http, "-ign_eof"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(b"GET /s HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
            .unwrap();
        let out = c.wait_with_output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let cert = good.join("cert-chain.pem");
    let key = good.join("key.pem");
    let ok = s_client(&[
        "-tls1_3",
        "-cert",
        cert.to_str().unwrap(),
        "-key",
        key.to_str().unwrap(),
    ]);
    assert!(
        ok.contains("TLSv1.3") && ok.contains("HTTP/1.1 200"),
        "{ok}"
    );
    let tls12 = s_client(&[
        "-tls1_2",
        "-cert",
        cert.to_str().unwrap(),
        "-key",
        key.to_str().unwrap(),
    ]);
    assert!(
        !tls12.contains("HTTP/1.1 200"),
        "TLS 1.2 must be refused: {tls12}"
    );
    let nocert = s_client(&["-tls1_3"]);
    assert!(
        !nocert.contains("HTTP/1.1 200"),
        "no client cert must be refused: {nocert}"
    );
    assert!(
        nocert.to_ascii_lowercase().contains("certificate required") || nocert.contains("alert"),
        "{nocert}"
    );

    // --- DENY policy: 403, the policy named in the log; normalization bypasses refused ---
    let (code, body) = curl(&[&format!("http://{in_http}/admin")]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("403", "RBAC: access denied")
    );
    assert!(
        backend.log().contains("api/deny-admin"),
        "{}",
        backend.log()
    );
    for path in [
        "//admin",
        "/admin/../admin",
        "/%2Fadmin",
        "/%2fadmin/",
        "/./admin",
        "/foo/..//admin",
    ] {
        let (code, body) = curl(&["--path-as-is", &format!("http://{in_http}{path}")]);
        assert!(code == "403" || code == "400", "{path}: {code} {body}");
    }
    // The denial's log line shows the path the rule matched beside the one sent; its twin,
    // a path sent already normal, shows no second path.
    let log = backend.log();
    let dotdot = log
        .lines()
        .find(|l| l.contains("request denied") && l.contains("path=/admin/../admin"))
        .unwrap_or_else(|| panic!("no denial of /admin/../admin logged\n{log}"));
    assert!(dotdot.contains("normalized_path=/admin "), "{dotdot}");
    let plain = log
        .lines()
        .find(|l| l.contains("request denied") && l.contains("path=/admin "))
        .unwrap_or_else(|| panic!("no denial of /admin logged\n{log}"));
    assert!(plain.contains("normalized_path=- "), "{plain}");

    // --- JWT: invalid 401, missing 403 (DENY notRequestPrincipals, as Istio), valid 200 ---
    let url = format!("http://{in_http}/jwt/data");
    assert_eq!(
        curl(&["-H", "authorization: Bearer not.a.jwt", &url]).0,
        "401"
    );
    assert_eq!(
        curl(&["-H", &format!("authorization: Bearer {forged}"), &url]).0,
        "401"
    );
    // Signed with the issuer's own key by PyJWT, but expired an hour ago (beyond the 60 s
    // clock-skew allowance), and one from an issuer no RequestAuthentication names.
    let jwks_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(mesh.join("jwks/issuer.test.json")).unwrap())
            .unwrap();
    let kid = jwks_json["keys"][0]["kid"].as_str().unwrap().to_owned();
    let pyjwt = |iss: &str, exp_offset: i64| -> String {
        let out = Command::new(python())
            .args([
                "-c",
                "import jwt, sys, time; now = int(time.time()); print(jwt.encode({'iss': sys.argv[2], \
                 'sub': 'spiffe://cluster.local/ns/web/sa/frontend', 'iat': now - 7200, \
                 'exp': now + int(sys.argv[3])}, open(sys.argv[1]).read(), algorithm='ES256', \
                 headers={'kid': sys.argv[4]}))",
                jwt_key.to_str().unwrap(),
                iss,
                &exp_offset.to_string(),
                &kid,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    for (what, bad) in [
        ("expired", pyjwt("https://issuer.test", -3600)),
        ("unknown issuer", pyjwt("https://elsewhere.test", 3600)),
    ] {
        let (code, body) = curl(&["-H", &format!("authorization: Bearer {bad}"), &url]);
        assert_eq!(code, "401", "{what}: {body}");
    }
    // The same PyJWT path with a valid expiry is accepted: the refusals above are about
    // expiry and issuer, not about PyJWT's encoding.
    let fresh = pyjwt("https://issuer.test", 3600);
    let (code, body) = curl(&["-H", &format!("authorization: Bearer {fresh}"), &url]);
    assert_eq!(code, "200", "PyJWT-signed valid token: {body}");
    let (code, body) = curl(&[&url]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("403", "RBAC: access denied")
    );
    let (code, body) = curl(&["-H", &format!("authorization: Bearer {token}"), &url]);
    assert_eq!(code, "200", "{body}");

    // --- gRPC deny with Python grpcio: status 7 (PERMISSION_DENIED) ---
    let script = format!(
        r#"
import grpc, sys
ch = grpc.insecure_channel("127.0.0.1:{}")
call = ch.unary_unary("/test.Echo/Forbidden", request_serializer=lambda b: b, response_deserializer=lambda b: b)
try:
    call(b"hi", timeout=5)
    print("UNEXPECTED_OK")
except grpc.RpcError as e:
    print(e.code().value[0], e.details())
"#,
        p.in_grpc
    );
    let out = Command::new(python())
        .args(["-c", &script])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.starts_with("7 RBAC: access denied"),
        "{s} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // --- gRPC allowed: h2c to the proxy, HTTP/2 to a Python grpcio app, status 0 ---
    let server = format!(
        r#"
import grpc, sys, time
from concurrent import futures
def echo(req, ctx):
    return req
h = grpc.method_handlers_generic_handler("test.Echo", {{"Say": grpc.unary_unary_rpc_method_handler(echo)}})
s = grpc.server(futures.ThreadPoolExecutor(2))
s.add_generic_rpc_handlers((h,))
s.add_insecure_port("127.0.0.1:{}")
s.start()
print("up", flush=True)
time.sleep(120)
"#,
        p.app_grpc
    );
    let mut grpc_app = Command::new(python())
        .args(["-c", &server])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(grpc_app.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "up");
    let script = format!(
        r#"
import grpc
ch = grpc.insecure_channel("127.0.0.1:{}")
call = ch.unary_unary("/test.Echo/Say", request_serializer=lambda b: b, response_deserializer=lambda b: b)
print(call(b"hello grpc", timeout=5).decode())
"#,
        p.in_grpc
    );
    let out = Command::new(python())
        .args(["-c", &script])
        .output()
        .unwrap();
    let _ = grpc_app.kill();
    let _ = grpc_app.wait();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello grpc",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // --- frontend proxy: outbound HTTP proxy and TCP upstream, mTLS to the backend ---
    let frontend = start_proxy(&mesh, "web/frontend", &sds_f, wp.join("frontend.log"));
    let fe_admin = format!("http://127.0.0.1:{}", p.fe_admin);
    support::wait_for(
        "frontend ready",
        Duration::from_secs(20),
        || curl(&[&format!("{fe_admin}/ready")]).0 == "200",
        || frontend.log(),
    );
    let proxy_arg = format!("http://127.0.0.1:{}", p.fe_out);
    let (code, body) = curl(&["-x", &proxy_arg, "http://backend.api:8080/via-mesh"]);
    assert_eq!(code, "200", "{body}\n{}", frontend.log());
    assert!(
        body.contains("URI=spiffe://cluster.local/ns/web/sa/frontend"),
        "{body}"
    );
    let (code, body) = curl(&[
        "-H",
        "Host: backend.api.svc.cluster.local:8080",
        &format!("{proxy_arg}/origin-form"),
    ]);
    assert_eq!(code, "200", "{body}");
    let (code, body) = curl(&["-x", &proxy_arg, "http://nosuch.api:8080/"]);
    assert_eq!(code, "502", "{body}");
    assert!(body.contains("unknown destination"), "{body}");
    // expected identity is checked: a forwarder makes the backend answer at the impostor's
    // inbound address; the frontend expects the impostor's SPIFFE ID and must refuse
    forward(p.impostor_in, p.in_http);
    let (code, body) = curl(&["-x", &proxy_arg, "http://impostor.api:8080/"]);
    assert_eq!(code, "503", "{body}");
    assert!(
        body.contains("is not the expected spiffe://cluster.local/ns/api/sa/impostor"),
        "{body}"
    );
    // TCP upstream: bytes echo through frontend -> mTLS -> backend -> app
    let mut s = TcpStream::connect(("127.0.0.1", p.fe_up)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"ping over mtls\n").unwrap();
    let mut buf = [0u8; 15];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping over mtls\n");
    drop(s);

    // metrics with Istio names and labels
    let stats = get(&format!("{admin}/stats/prometheus"));
    assert!(stats.contains("istio_requests_total{reporter=\"destination\",source_principal=\"spiffe://cluster.local/ns/web/sa/frontend\",source_workload=\"frontend\",source_workload_namespace=\"web\""), "{stats}");
    assert!(
        stats.contains("connection_security_policy=\"mutual_tls\""),
        "{stats}"
    );
    assert!(
        stats.contains("connection_security_policy=\"none\""),
        "{stats}"
    );
    assert!(stats.contains("response_code=\"403\""), "{stats}");
    assert!(
        stats.contains("istio_request_duration_milliseconds_bucket{"),
        "{stats}"
    );
    assert!(stats.contains("grpc_response_status=\"7\""), "{stats}");
    wait_for("tcp close counted", Duration::from_secs(5), || {
        get(&format!("{admin}/stats/prometheus"))
            .contains("istio_tcp_connections_closed_total{reporter=\"destination\"")
    });
    let fstats = get(&format!("{fe_admin}/stats/prometheus"));
    assert!(fstats.contains("reporter=\"source\""), "{fstats}");
    assert!(
        fstats.contains("istio_tcp_connections_opened_total{reporter=\"source\""),
        "{fstats}"
    );

    // --- SDS: a certificate for another identity is NACKed; the current one keeps serving ---
    standin_b
        .tx
        .send(Some(
            ca.secrets(&format!("spiffe://{TD}/ns/api/sa/someone-else"), 2),
        ))
        .unwrap();
    wait_for("NACK", Duration::from_secs(5), || {
        standin_b.replies.lock().unwrap().iter().any(|r| matches!(r, Reply::Nack { message, .. } if message.contains("is not this workload's")))
    });
    assert_eq!(
        curl(&["-x", &proxy_arg, "http://backend.api:8080/after-nack"]).0,
        "200"
    );
    // a valid rotation is installed (pooled connections keep working)
    standin_b
        .tx
        .send(Some(
            ca.secrets(&format!("spiffe://{TD}/ns/api/sa/backend"), 3),
        ))
        .unwrap();
    wait_for("ACK of v3", Duration::from_secs(5), || {
        standin_b.replies.lock().unwrap().iter().any(|r| matches!(r, Reply::Ack { resource, version } if resource == "default" && version == "3"))
    });
    assert_eq!(
        curl(&["-x", &proxy_arg, "http://backend.api:8080/after-rotation"]).0,
        "200"
    );

    // --- live policy edit, then an invalid edit keeps the last good config ---
    assert_eq!(curl(&[&format!("http://{in_http}/live")]).0, "200");
    std::fs::write(
        mesh.join("policy/live.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-live, namespace: api}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {ports: [\"8080\"], paths: [/live]}}]}]\n",
    )
    .unwrap();
    wait_for("live policy", Duration::from_secs(10), || {
        curl(&[&format!("http://{in_http}/live")]).0 == "403"
    });
    assert!(backend.log().contains("api/deny-live"));
    std::fs::write(
        mesh.join("policy/broken.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: broken, namespace: api}\nspec: {action: SOMETIMES}\n",
    )
    .unwrap();
    wait_for("refusal logged", Duration::from_secs(10), || {
        backend.log().contains("mesh folder edit refused")
    });
    assert!(backend.log().contains("broken.yaml"), "{}", backend.log());
    assert_eq!(
        curl(&[&format!("http://{in_http}/live")]).0,
        "403",
        "last good config keeps serving"
    );
    assert_eq!(curl(&[&format!("http://{in_http}/hello")]).0, "200");
    let dump = get(&format!("{admin}/config_dump"));
    assert!(
        dump.contains("broken.yaml") && dump.contains("deny-live"),
        "{dump}"
    );
    std::fs::remove_file(mesh.join("policy/broken.yaml")).unwrap();

    // --- TCP port: connection-level DENY closes the connection ---
    std::fs::write(
        mesh.join("policy/tcp.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-tcp, namespace: api}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {ports: [\"9000\"]}}]}]\n",
    )
    .unwrap();
    wait_for("tcp deny", Duration::from_secs(10), || {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", p.fe_up)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"x");
        let mut b = [0u8; 1];
        matches!(s.read(&mut b), Ok(0) | Err(_))
    });
    assert!(
        backend.log().contains("connection denied (closed)")
            && backend.log().contains("api/deny-tcp"),
        "{}",
        backend.log()
    );
    std::fs::remove_file(mesh.join("policy/tcp.yaml")).unwrap();

    // --- STRICT: plaintext refused, mTLS accepted, applied without restart ---
    std::fs::write(
        mesh.join("policy/strict.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: api}\nspec: {mtls: {mode: STRICT}}\n",
    )
    .unwrap();
    wait_for("STRICT in force", Duration::from_secs(10), || {
        curl(&[&format!("http://{in_http}/hello")]).0 == "000"
    });
    assert_eq!(
        mtls_curl(&good, &[&format!("https://{in_http}/hello")]).0,
        "200"
    );
    assert_eq!(
        curl(&["-x", &proxy_arg, "http://backend.api:8080/strict"]).0,
        "200"
    );
    let v: serde_json::Value = serde_json::from_str(&get(&format!("{admin}/mtls"))).unwrap();
    let port = v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == 8080)
        .unwrap();
    assert_eq!(port["mode"], "STRICT");
    assert!(port["since_start"]["mtls_requests"].as_u64().unwrap() >= 3);
    // A plaintext attempt now counts as refused, not as plaintext served (mtls-report's
    // "STRICT (n plaintext refused)").
    let port_8080 = || {
        let v: serde_json::Value = serde_json::from_str(&get(&format!("{admin}/mtls"))).unwrap();
        v["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["port"] == 8080)
            .unwrap()
            .clone()
    };
    let counts = || {
        let p = port_8080()["since_start"].clone();
        (
            p["plaintext_connections"].as_u64().unwrap(),
            p["plaintext_refused"].as_u64().unwrap(),
        )
    };
    let (served, refused) = counts();
    assert!(refused >= 1, "the refusals while waiting for STRICT");
    assert_eq!(curl(&[&format!("http://{in_http}/hello")]).0, "000");
    assert_eq!(counts(), (served, refused + 1));
    // ... and is charged to its source as refused.
    let src = port_8080()["plaintext_sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["ip"] == "127.0.0.1")
        .unwrap()
        .clone();
    assert!(src["refused"].as_u64().unwrap() > refused, "{src}");

    // --- an invalid registry edit is refused; the last good registry keeps routing ---
    let reg = std::fs::read_to_string(mesh.join("workloads.yaml")).unwrap();
    std::fs::write(
        mesh.join("workloads.yaml"),
        reg.replace("protocol: tcp", "protocol: smtp"),
    )
    .unwrap();
    wait_for("registry refusal", Duration::from_secs(10), || {
        frontend.log().contains("unknown protocol \"smtp\"")
    });
    assert!(
        frontend
            .log()
            .contains("workloads.yaml: workloads[0].ports[1].protocol"),
        "{}",
        frontend.log()
    );
    assert_eq!(
        curl(&["-x", &proxy_arg, "http://backend.api:8080/still"]).0,
        "200"
    );
    std::fs::write(mesh.join("workloads.yaml"), &reg).unwrap();

    // --- DISABLE: plaintext passes; TLS is not terminated (its bytes reach the app as-is) ---
    std::fs::write(
        mesh.join("policy/strict.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: api}\nspec: {mtls: {mode: DISABLE}}\n",
    )
    .unwrap();
    support::wait_for(
        "DISABLE in force",
        Duration::from_secs(10),
        || curl(&[&format!("http://{in_http}/hello")]).0 == "200",
        || backend.log(),
    );
    assert_eq!(
        mtls_curl(&good, &[&format!("https://{in_http}/hello")]).0,
        "000"
    );
    let v: serde_json::Value = serde_json::from_str(&get(&format!("{admin}/mtls"))).unwrap();
    assert_eq!(v["ports"][0]["mode"], "DISABLE");

    // --- SIGTERM: drain and exit 0 ---
    let mut backend = backend;
    let pid = backend.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = backend.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "proxy did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}\n{}", backend.log());
    assert!(backend.log().contains("draining"), "{}", backend.log());
    drop(frontend);
    drop(rt);
}
