//! The proxy's HTTP edge against real clients (curl, openssl-made certificates, Python raw
//! sockets): header bytes policy must see, JWT output headers a client cannot forge, one
//! authority for policy and app, method case and header-name case, multi-value headers,
//! header-read timeouts, separate connection budgets under a flood of idle clients, and the
//! local surfaces (admin limit, `/config_dump` redaction, non-loopback outbound refused).
//!
//! Two `rampart proxy` processes (backend `api/backend`, frontend `web/frontend`) from one
//! mesh folder, certificates from the SDS stand-in of `proxy/tests/support`.

mod support;
use support::{Proc, free_port, python};

#[path = "../proxy/tests/support/sds_standin.rs"]
mod sds_standin;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sds_standin::TestCa;

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

/// The in-test app: HTTP/1.1 echo (keep-alive) answering with the request head it saw.
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
                        let mut line = Vec::new();
                        if r.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let line = String::from_utf8_lossy(&line).to_string();
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

struct Mesh {
    _dir: tempfile::TempDir,
    wp: PathBuf,
    mesh: PathBuf,
    app_b: u16,
    in_b: u16,
    admin_b: u16,
    in_f: u16,
    out_f: u16,
    admin_f: u16,
    ca: TestCa,
    ca_dir: PathBuf,
    token: String,
    _rt: tokio::runtime::Runtime,
    _standins: Vec<sds_standin::StandIn>,
    procs: Vec<Proc>,
}

const POLICY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-debug, namespace: api}
spec:
  selector: {matchLabels: {app: backend}}
  action: DENY
  rules:
  - when: [{key: "request.headers[x-debug]", values: ["*"]}]
  - when: [{key: "request.headers[x-stage]", values: ["canary"]}]
  - to: [{operation: {methods: ["GET"], paths: ["/no-get"]}}]
  - to: [{operation: {hosts: ["evil.example", "evil.example:*", "evil.*"]}}]
  - to: [{operation: {paths: ["/frontend-only"]}}]
    when: [{key: "request.headers[x-forwarded-client-cert]", notValues: ["*URI=spiffe://cluster.local/ns/web/sa/frontend"]}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: issuer, namespace: api}
spec:
  selector: {matchLabels: {app: backend}}
  jwtRules:
  - issuer: https://issuer.test
    jwksUri: https://issuer.test/.well-known/jwks.json
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]
"#;

impl Mesh {
    /// Write the folder and start both proxies; `backend_flags`/`frontend_flags` go to
    /// their `rampart proxy` command lines.
    fn start(backend_flags: &[&str], frontend_flags: &[&str]) -> Mesh {
        Mesh::start_with(backend_flags, frontend_flags, None)
    }

    /// As [`Mesh::start`], the backend's open-files limit (soft and hard) set to `nofile`.
    fn start_with(backend_flags: &[&str], frontend_flags: &[&str], nofile: Option<u32>) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let wp = dir.path().to_path_buf();
        let mesh = wp.join("mesh");
        std::fs::create_dir_all(mesh.join("jwks")).unwrap();
        std::fs::create_dir_all(mesh.join("policy")).unwrap();
        let (app_b, in_b, admin_b) = (free_port(), free_port(), free_port());
        let (app_f, in_f, out_f, admin_f) = (free_port(), free_port(), free_port(), free_port());
        std::fs::write(mesh.join("mesh.yaml"), format!("trustDomain: {TD}\n")).unwrap();
        std::fs::write(
            mesh.join("workloads.yaml"),
            format!(
                r#"workloads:
- name: backend
  namespace: api
  labels: {{app: backend}}
  command: ["rampart", "echo", "--api-key=hunter2-secret"]
  ports:
  - {{port: 8080, protocol: http, app: "127.0.0.1:{app_b}", inbound: "127.0.0.1:{in_b}"}}
  proxy: {{admin: "127.0.0.1:{admin_b}"}}
- name: frontend
  namespace: web
  ports:
  - {{port: 80, protocol: http, app: "127.0.0.1:{app_f}", inbound: "127.0.0.1:{in_f}"}}
  proxy: {{outbound: "127.0.0.1:{out_f}", admin: "127.0.0.1:{admin_f}"}}
"#
            ),
        )
        .unwrap();
        std::fs::write(mesh.join("policy/edge.yaml"), POLICY).unwrap();
        echo_http(app_b);
        echo_http(app_f);

        let ca_dir = wp.join("ca");
        rampart(&["certs", "root", "--out", ca_dir.to_str().unwrap()]);
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
            ])
            .stdout,
        )
        .unwrap()
        .trim()
        .to_string();

        let rt = tokio::runtime::Runtime::new().unwrap();
        let ca = TestCa::from_dir(&ca_dir);
        let sds_b = wp.join("sds-b.sock");
        let sds_f = wp.join("sds-f.sock");
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
            ]
        });
        let mut m = Mesh {
            _dir: dir,
            wp: wp.clone(),
            mesh: mesh.clone(),
            app_b,
            in_b,
            admin_b,
            in_f,
            out_f,
            admin_f,
            ca,
            ca_dir,
            token,
            _rt: rt,
            _standins: standins,
            procs: Vec::new(),
        };
        m.procs.push(start_proxy(
            &mesh,
            "api/backend",
            &sds_b,
            wp.join("backend.log"),
            backend_flags,
            nofile,
        ));
        m.procs.push(start_proxy(
            &mesh,
            "web/frontend",
            &sds_f,
            wp.join("frontend.log"),
            frontend_flags,
            None,
        ));
        for (admin, p) in [(admin_b, 0), (admin_f, 1)] {
            let log = m.procs[p].log.clone();
            support::wait_for(
                "proxy ready",
                Duration::from_secs(30),
                || curl(&[&format!("http://127.0.0.1:{admin}/ready")]).0 == "200",
                || std::fs::read_to_string(&log).unwrap_or_default(),
            );
        }
        m
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(Proc::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// A client certificate for `id` (cert-chain.pem, key.pem).
    fn leaf(&self, id: &str, name: &str) -> PathBuf {
        let out = self.wp.join(name);
        rampart(&[
            "certs",
            "leaf",
            "--ca",
            self.ca_dir.to_str().unwrap(),
            "--spiffe-id",
            id,
            "--out",
            out.to_str().unwrap(),
        ]);
        out
    }

    fn stats(&self, admin: u16) -> String {
        curl(&[&format!("http://127.0.0.1:{admin}/stats/prometheus")]).1
    }
}

fn start_proxy(
    mesh: &Path,
    workload: &str,
    sds: &Path,
    log: PathBuf,
    flags: &[&str],
    nofile: Option<u32>,
) -> Proc {
    let f = std::fs::File::create(&log).unwrap();
    let limit = match nofile {
        Some(n) => format!("ulimit -n {n}"),
        None => "ulimit -Sn 1024 2>/dev/null".to_string(),
    };
    // Started with the soft RLIMIT_NOFILE of a fresh machine (1024): the proxy must raise it
    // itself, or a flood of idle clients exhausts its descriptors before any budget.
    let child = Command::new("sh")
        .args(["-c", &format!("{limit} && exec \"$0\" \"$@\"")])
        .arg(rampart_bin())
        .args(["proxy", "--mesh"])
        .arg(mesh)
        .args(["--workload", workload, "--sds-socket"])
        .arg(sds)
        .args(["--drain-timeout", "1s"])
        .args(flags)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    Proc { child, log }
}

fn metric(stats: &str, line_prefix: &str) -> u64 {
    stats
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {line_prefix} in\n{stats}"))
}

// --- 1. header bytes, 2. JWT output headers, 4. authority, and the advisory checklist ---

/// HTTP/2 clients get at most 100 concurrent streams per connection (each stream may hold
/// an app connection, so hyper's default of 200 per connection multiplied a budget slot). Read
/// from the SETTINGS frame a plaintext h2c client receives on the PERMISSIVE inbound port.
#[test]
fn http2_streams_per_connection_are_bounded() {
    let m = Mesh::start(&[], &[]);
    let mut s = TcpStream::connect(("127.0.0.1", m.in_b)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let mut head = [0u8; 9];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[3], 0x4, "the server's first frame is SETTINGS");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    let max_streams = body
        .chunks_exact(6)
        .find(|c| u16::from_be_bytes([c[0], c[1]]) == 0x3)
        .map(|c| u32::from_be_bytes([c[2], c[3], c[4], c[5]]));
    assert_eq!(max_streams, Some(100), "{body:?}\n{}", m.logs());
}

#[test]
fn policy_sees_what_the_app_sees() {
    let m = Mesh::start(&[], &[]);
    let p = m.in_b;
    let req = |extra: &[u8]| -> (u16, String) {
        let mut r =
            b"GET /hello HTTP/1.1\r\nhost: backend.api:8080\r\nconnection: close\r\n".to_vec();
        r.extend_from_slice(extra);
        r.extend_from_slice(b"\r\n");
        support::raw_request(p, &r)
    };

    // 1. A value that is not visible ASCII is still a header for policy.
    assert_eq!(req(b"x-debug: 1\r\n").0, 403, "{}", m.logs());
    assert_eq!(
        req(b"x-debug: \x80\r\n").0,
        403,
        "obs-text value must not hide the header"
    );
    assert_eq!(req("x-debug: caf\u{e9}\r\n".as_bytes()).0, 403);
    let (code, body) = req(b"");
    assert_eq!(
        code, 200,
        "negative twin: no x-debug header is allowed: {body}"
    );
    // An exact match still compares the bytes: "canary\x80" is not "canary".
    assert_eq!(req(b"x-stage: canary\r\n").0, 403);
    assert_eq!(req(b"x-stage: canary\x80\r\n").0, 200);

    // Authorization with a non-ASCII byte is a (bad) token, not "no token".
    assert_eq!(req(b"authorization: Bearer \x80abc\r\n").0, 401);
    assert_eq!(req(b"authorization: Bearer abc\r\n").0, 401);

    // Header names are case-insensitive over HTTP/1.1.
    assert_eq!(req(b"X-DEBUG: 1\r\n").0, 403);
    assert_eq!(req(b"X-Debug: 1\r\n").0, 403);

    // Two x-debug / x-stage headers: a DENY matching one of them still denies.
    assert_eq!(req(b"x-debug: a\r\nx-debug: b\r\n").0, 403);
    // A DENY on one exact value among several (CVE-2026-26308): any copy triggers it.
    assert_eq!(req(b"x-stage: stable\r\nx-stage: canary\r\n").0, 403);
    assert_eq!(req(b"x-stage: canary\r\nx-stage: stable\r\n").0, 403);
    assert_eq!(req(b"x-stage: stable\r\nx-stage: beta\r\n").0, 200);

    // Request headers are limited to 60 KiB (Envoy's max_request_headers_kb).
    let big = format!("x-big: {}\r\n", "a".repeat(70 * 1024));
    assert_ne!(req(big.as_bytes()).0, 200, "70 KiB of headers refused");
    let fine = format!("x-big: {}\r\n", "a".repeat(20 * 1024));
    assert_eq!(
        req(fine.as_bytes()).0,
        200,
        "negative twin: 20 KiB accepted"
    );

    // 2. JWT output headers: a client's copy never reaches the app.
    let (code, body) = req(b"x-jwt-payload: forged\r\nx-jwt-sub: admin\r\n");
    assert_eq!(code, 200, "{body}");
    assert!(
        !body.to_ascii_lowercase().contains("x-jwt-payload"),
        "{body}"
    );
    assert!(!body.to_ascii_lowercase().contains("x-jwt-sub"), "{body}");
    // ... and with a verified token they carry the token's payload and claim.
    let auth = format!(
        "authorization: Bearer {}\r\nx-jwt-payload: forged\r\nx-jwt-sub: admin\r\n",
        m.token
    );
    let (code, body) = req(auth.as_bytes());
    assert_eq!(code, 200, "{body}");
    let payload = m.token.split('.').nth(1).unwrap();
    assert!(
        body.contains(&format!("x-jwt-payload: {payload}")),
        "{body}"
    );
    assert!(body.contains("x-jwt-sub: "), "{body}");
    assert!(
        !body.contains("forged") && !body.contains("x-jwt-sub: admin"),
        "{body}"
    );

    // 4. Absolute-form target vs Host: policy and app see one authority.
    let (code, body) = support::raw_request(
        p,
        b"GET http://good.example/x HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(code, 200, "{body}");
    assert!(
        body.to_ascii_lowercase().contains("host: good.example"),
        "{body}"
    );
    assert!(
        !body.contains("evil.example"),
        "app must see the authority policy saw: {body}"
    );
    let (code, _) = support::raw_request(
        p,
        b"GET http://evil.example/x HTTP/1.1\r\nhost: good.example\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(code, 403, "absolute-form evil.example is denied");
    let (code, _) = support::raw_request(
        p,
        b"GET /x HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(
        code, 403,
        "negative twin: origin-form Host evil.example is denied"
    );
    let (code, _) = support::raw_request(
        p,
        b"GET /x HTTP/1.1\r\nhost: good.example\r\nhost: evil.example\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(code, 400, "two Host headers are refused");
    // A Host with a non-ASCII byte is still a Host for policy.
    let (code, _) = support::raw_request(
        p,
        b"GET /x HTTP/1.1\r\nhost: evil.example\x80\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(
        code, 403,
        "obs-text in Host must not hide it from hosts: [evil.*]"
    );
    let (code, _) = support::raw_request(
        p,
        b"GET /x HTTP/1.1\r\nhost: good.example\x80\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(code, 200, "negative twin: good.example\\x80 is not denied");

    // The outbound listener routes by the absolute-form authority and forwards it as Host
    // (as Envoy rewrites it), not the app's stray Host header.
    let (code, body) = support::raw_request(
        m.out_f,
        b"GET http://backend.api:8080/x HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(code, 200, "{body}\n{}", m.logs());
    assert!(body.contains("host: backend.api:8080"), "{body}");
    let (code, _) = support::raw_request(
        m.out_f,
        b"GET /x HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(
        code, 502,
        "negative twin: origin-form routes by Host (unknown here)"
    );

    // x-forwarded-client-cert is the proxy's before policy runs: a plaintext client's forged
    // copy naming the frontend does not pass a rule that wants the frontend's certificate,
    // while the frontend itself, over mTLS, does.
    let forged = format!(
        "x-forwarded-client-cert: By=spiffe://{TD}/ns/api/sa/backend;URI=spiffe://{TD}/ns/web/sa/frontend\r\n"
    );
    assert_eq!(
        req(forged.as_bytes()).0,
        200,
        "elsewhere the header is harmless"
    );
    let (code, _) = support::raw_request(
        p,
        format!(
            "GET /frontend-only HTTP/1.1\r\nhost: backend.api:8080\r\nconnection: close\r\n{forged}\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(code, 403, "a forged XFCC reached policy\n{}", m.logs());
    let (code, body) = support::raw_request(
        m.out_f,
        b"GET http://backend.api:8080/frontend-only HTTP/1.1\r\nhost: backend.api:8080\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(code, 200, "the frontend over mTLS: {body}\n{}", m.logs());

    // HTTP/2 (h2c prior knowledge): :authority wins over a host header too.
    let url = format!("http://127.0.0.1:{p}/x");
    let (code, body) = curl(&["--http2-prior-knowledge", "-H", "host: evil.example", &url]);
    assert_eq!(code, "403", "curl sends host as :authority: {body}");
    let (code, body) = curl(&["--http2-prior-knowledge", &url]);
    assert_eq!(code, "200", "{body}");

    // Method case: DENY methods ["GET"] is not bypassed with `get` (HTTP/2 and HTTP/1.1).
    let url = format!("http://127.0.0.1:{p}/no-get");
    assert_eq!(curl(&["--http2-prior-knowledge", &url]).0, "403");
    let (code, _) = curl(&["--http2-prior-knowledge", "-X", "get", &url]);
    assert_ne!(
        code, "200",
        "lowercase get over HTTP/2 must not pass a GET DENY"
    );
    let (code, _) = support::raw_request(
        p,
        b"get /no-get HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    );
    assert_ne!(
        code, 200,
        "lowercase get over HTTP/1.1 must not pass a GET DENY"
    );
    assert_eq!(
        curl(&["--http2-prior-knowledge", "-X", "POST", &url]).0,
        "200",
        "negative twin: POST is not denied"
    );
}

// --- 3. timeouts and budgets ---

/// A Python helper that opens `n` connections to `port`, sends `data` on each, prints
/// `ready`, then holds them until its stdin closes; on exit it prints how many the server
/// had closed.
fn hold_connections(port: u16, n: usize, data: &str) -> std::process::Child {
    let script = r#"
import resource, socket, sys, select
n, port, data = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = min(hard, n + 256) if hard != resource.RLIM_INFINITY else n + 256
if soft < want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
socks = []
for i in range(n):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if data:
            s.sendall(data)
    except OSError:
        break
    socks.append(s)
print("ready", len(socks), flush=True)
sys.stdin.read()
closed = 0
for s in socks:
    s.setblocking(False)
    try:
        if s.recv(1) == b"":
            closed += 1
    except BlockingIOError:
        pass
    except OSError:
        closed += 1
print("closed", closed, flush=True)
"#;
    let mut child = Command::new(python())
        .args(["-c", script, &n.to_string(), &port.to_string(), data])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        format!("ready {n}"),
        "the Python client could not open {n} connections (the proxy stopped accepting?)"
    );
    child
}

/// Let the holder go; how many of its connections the server had closed.
fn release(mut child: std::process::Child) -> usize {
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("holder said {text:?}"))
}

/// 2,000 idle half-open plaintext connections on a PERMISSIVE port: mTLS clients still get
/// 200 within 1 s, and so do the app's outbound calls.
#[test]
fn idle_flood_does_not_starve_mtls_or_outbound() {
    let m = Mesh::start(&[], &[]);
    let client = m.leaf(&format!("spiffe://{TD}/ns/web/sa/frontend"), "client");
    let flood = hold_connections(m.in_b, 2000, "GET /hello HT");
    let start = Instant::now();
    let (code, body) = curl(&[
        "-k",
        "--cert",
        client.join("cert-chain.pem").to_str().unwrap(),
        "--key",
        client.join("key.pem").to_str().unwrap(),
        &format!("https://127.0.0.1:{}/hello", m.in_b),
    ]);
    let took = start.elapsed();
    assert_eq!(code, "200", "{body}\n{}", m.logs());
    assert!(took < Duration::from_secs(1), "mTLS request took {took:?}");
    // The app's outbound call: frontend outbound -> backend inbound over mTLS.
    let start = Instant::now();
    let (code, body) = curl(&[
        "-x",
        &format!("http://127.0.0.1:{}", m.out_f),
        "http://backend.api:8080/hello",
    ]);
    let took = start.elapsed();
    assert_eq!(code, "200", "{body}\n{}", m.logs());
    assert!(
        took < Duration::from_secs(1),
        "outbound request took {took:?}"
    );
    release(flood);
}

/// Inbound and outbound budgets are separate: a full inbound budget refuses inbound
/// connections (counted per listener) while the app's outbound calls go through; a
/// half-sent request line is closed after the header-read timeout, freeing the slots.
#[test]
fn budgets_are_per_listener_and_half_requests_time_out() {
    let m = Mesh::start(
        &[],
        &[
            "--max-inbound-connections",
            "20",
            "--header-read-timeout",
            "2s",
        ],
    );
    let flood = hold_connections(m.in_f, 20, "GET /hel");
    // The inbound budget is full: a new inbound connection is closed at once.
    let (code, _) = curl(&[&format!("http://127.0.0.1:{}/x", m.in_f)]);
    assert_eq!(code, "000", "inbound budget exhausted: refused");
    // ... the outbound listener has its own budget.
    let (code, body) = curl(&[
        "-x",
        &format!("http://127.0.0.1:{}", m.out_f),
        "http://backend.api:8080/hello",
    ]);
    assert_eq!(code, "200", "{body}\n{}", m.logs());
    let refused = metric(
        &m.stats(m.admin_f),
        "rampart_proxy_connections_refused_total{listener=\"inbound\"}",
    );
    assert!(refused >= 1, "refusal counted");
    assert_eq!(
        metric(
            &m.stats(m.admin_f),
            "rampart_proxy_connections_refused_total{listener=\"outbound\"}"
        ),
        0
    );
    // Header-read timeout: the 20 half requests are closed within a few seconds.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        release(flood),
        20,
        "half request lines closed after 2s\n{}",
        m.logs()
    );
    let (code, body) = curl(&[&format!("http://127.0.0.1:{}/x", m.in_f)]);
    assert_eq!(code, "200", "slots freed: {body}");

    // Negative twin: a connection that sent nothing yet but is within the timeout, then a
    // complete request, is served.
    let mut s = TcpStream::connect(("127.0.0.1", m.in_f)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    s.write_all(b"GET /x HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

// --- 5. local surfaces ---

#[test]
fn admin_is_limited_and_redacts_commands() {
    let m = Mesh::start(&["--max-admin-connections", "3"], &[]);
    let dump = curl(&[&format!("http://127.0.0.1:{}/config_dump", m.admin_b)]).1;
    assert!(!dump.contains("hunter2"), "command line shown:\n{dump}");
    assert!(dump.contains("[redacted: set, 3 arguments]"), "{dump}");
    // Negative twin: a workload without a command shows none.
    let dump_f = curl(&[&format!("http://127.0.0.1:{}/config_dump", m.admin_f)]).1;
    assert!(dump_f.contains("\"command\": null"), "{dump_f}");

    // Admin budget: three idle connections hold it; the fourth is refused.
    let hold = hold_connections(m.admin_b, 3, "");
    let (code, _) = curl(&[&format!("http://127.0.0.1:{}/ready", m.admin_b)]);
    assert_eq!(code, "000", "admin budget exhausted: refused");
    // The data plane is not affected by the admin budget.
    let (code, _) = support::raw_request(
        m.in_b,
        b"GET /hello HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(code, 200);
    release(hold);
    support::wait_for(
        "admin serving again",
        Duration::from_secs(10),
        || curl(&[&format!("http://127.0.0.1:{}/ready", m.admin_b)]).0 == "200",
        || m.logs(),
    );
    assert!(
        metric(
            &m.stats(m.admin_b),
            "rampart_proxy_connections_refused_total{listener=\"admin\"}"
        ) >= 1
    );
    let _ = (m.app_b, &m.mesh, m.in_f, &m.ca);
}

/// An idle keep-alive connection to the admin port is closed after 15 s (not the data
/// plane's hour), so idle scrapers cannot hold the admin budget; a busy one stays.
#[test]
fn idle_admin_connections_are_closed_after_fifteen_seconds() {
    let m = Mesh::start(&[], &[]);
    let req = b"GET /ready HTTP/1.1\r\nhost: admin\r\n\r\n";
    let mut idle = TcpStream::connect(("127.0.0.1", m.admin_b)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    idle.write_all(req).unwrap();
    assert_eq!(read_response(&mut idle), 200, "{}", m.logs());
    // Negative twin: a request every 5 s keeps another connection open past 15 s.
    let mut busy = TcpStream::connect(("127.0.0.1", m.admin_b)).unwrap();
    busy.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for _ in 0..4 {
        busy.write_all(req).unwrap();
        assert_eq!(read_response(&mut busy), 200, "{}", m.logs());
        std::thread::sleep(Duration::from_secs(5));
    }
    let start = Instant::now();
    let mut buf = [0u8; 1];
    let n = idle.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the idle admin connection is closed");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "closed about 15 s after its last request (20 s have passed)"
    );
}

#[test]
fn non_loopback_outbound_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path();
    let out = free_port();
    let write = |allow: bool| {
        std::fs::write(
            mesh.join("mesh.yaml"),
            if allow {
                format!("trustDomain: {TD}\nrampart: {{allowNonLoopbackOutbound: true}}\n")
            } else {
                format!("trustDomain: {TD}\n")
            },
        )
        .unwrap();
        std::fs::write(
            mesh.join("workloads.yaml"),
            format!(
                r#"workloads:
- name: frontend
  namespace: web
  ports:
  - {{port: 80, protocol: http, app: "127.0.0.1:{}", inbound: "127.0.0.1:{}"}}
  proxy: {{outbound: "0.0.0.0:{out}"}}
  upstreams:
  - {{service: frontend.web, port: 80, listen: "0.0.0.0:{}"}}
"#,
                free_port(),
                free_port(),
                free_port()
            ),
        )
        .unwrap();
    };
    write(false);
    let o = Command::new(rampart_bin())
        .args(["proxy", "--mesh"])
        .arg(mesh)
        .args(["--workload", "web/frontend", "--sds-socket", "/nonexistent"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "bad input: {err}");
    assert!(err.contains("workloads.yaml"), "{err}");
    assert!(err.contains("workloads[0].proxy.outbound"), "{err}");
    assert!(err.contains("workloads[0].upstreams[0].listen"), "{err}");
    assert!(err.contains("not a loopback address"), "{err}");

    // Negative twin: allowed on purpose, the proxy starts and listens there.
    write(true);
    let log = dir.path().join("proxy.log");
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(rampart_bin())
        .args(["proxy", "--mesh"])
        .arg(mesh)
        .args(["--workload", "web/frontend", "--sds-socket", "/nonexistent"])
        .stderr(f)
        .spawn()
        .unwrap();
    let p = Proc { child, log };
    support::wait_for(
        "outbound listening",
        Duration::from_secs(20),
        || TcpStream::connect(("127.0.0.1", out)).is_ok(),
        || p.log(),
    );
}

/// Read one HTTP/1.1 response (head + content-length body) from `s`; its status code.
fn read_response(s: &mut TcpStream) -> u16 {
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// A keep-alive connection with no request in flight is closed after the idle timeout;
/// one that keeps sending requests is not.
#[test]
fn idle_keepalive_connections_close_after_the_idle_timeout() {
    let m = Mesh::start(&["--idle-timeout", "2s"], &[]);
    let req = b"GET /hello HTTP/1.1\r\nhost: backend.api\r\n\r\n";
    // Negative twin first: a request every 500 ms for 3 s keeps one connection open.
    let mut busy = TcpStream::connect(("127.0.0.1", m.in_b)).unwrap();
    busy.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..6 {
        busy.write_all(req).unwrap();
        assert_eq!(read_response(&mut busy), 200, "{}", m.logs());
        std::thread::sleep(Duration::from_millis(500));
    }
    // An idle one: served, then closed by the proxy within a few seconds.
    let mut idle = TcpStream::connect(("127.0.0.1", m.in_b)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    idle.write_all(req).unwrap();
    assert_eq!(read_response(&mut idle), 200);
    let start = Instant::now();
    let mut buf = [0u8; 1];
    let r = idle.read(&mut buf);
    let took = start.elapsed();
    assert!(
        matches!(r, Ok(0)),
        "closed by the proxy, not timed out: {r:?} after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(9),
        "closed after {took:?} (idle timeout 2s)"
    );
}

/// CPU time (user + system, in clock ticks) the process `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Out of file descriptors (EMFILE), the accept loops back off instead of spinning, and
/// the proxy serves again once descriptors are free.
#[test]
fn accept_errors_back_off_and_recover() {
    let m = Mesh::start_with(&[], &[], Some(96));
    let pid = m.procs[0].child.id();
    // Negative twin: before the flood the admin answers.
    assert_eq!(
        curl(&[&format!("http://127.0.0.1:{}/ready", m.admin_b)]).0,
        "200"
    );
    let flood = hold_connections(m.in_b, 200, "GET /hel");
    // A connection waiting in the admin backlog keeps its listener readable while every
    // accept fails with EMFILE: the case that spins without a backoff.
    let waiting = TcpStream::connect(("127.0.0.1", m.admin_b)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(pid) - before;
    // A spinning accept loop burns the whole 3 s (about 300 ticks); backing off, a few.
    assert!(
        used < 150,
        "proxy used {used} CPU ticks in 3 s while out of descriptors\n{}",
        m.logs()
    );
    assert!(m.procs[0].log().contains("accept failed"), "{}", m.logs());
    drop(waiting);
    release(flood);
    support::wait_for(
        "admin serving again",
        Duration::from_secs(15),
        || curl(&[&format!("http://127.0.0.1:{}/ready", m.admin_b)]).0 == "200",
        || m.logs(),
    );
}

/// HTTP/1.1 keep-alive: a half-sent second request is closed after the header-read timeout,
/// while a connection that is merely idle between requests is kept (the idle timeout is 1 h).
#[test]
fn half_sent_next_request_times_out_but_idle_keepalive_stays() {
    let m = Mesh::start(&["--header-read-timeout", "2s"], &[]);
    let req = b"GET /hello HTTP/1.1\r\nhost: backend.api\r\n\r\n";
    let open = |p: u16| {
        let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        s.write_all(req).unwrap();
        assert_eq!(read_response(&mut s), 200);
        s
    };
    let mut half = open(m.in_b);
    let mut idle = open(m.in_b);
    half.write_all(b"GET /hello HT").unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 1];
    let r = half.read(&mut buf);
    let took = start.elapsed();
    assert!(
        matches!(r, Ok(0)),
        "half request closed: {r:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(7), "closed after {took:?}");
    // Negative twin: the idle keep-alive connection (older than the timeout by now) still
    // serves a request.
    std::thread::sleep(Duration::from_secs(1));
    idle.write_all(req).unwrap();
    assert_eq!(read_response(&mut idle), 200, "{}", m.logs());
}
