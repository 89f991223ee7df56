//! WebSockets through the mesh, against PyPI's `websockets` (client and app): the handshake
//! is judged by AuthorizationPolicy like any request, the app's 101 turns the connection
//! into a relay of frames both ways (over mTLS between the proxies, with the caller's
//! identity in `x-forwarded-client-cert`), and it is neither cut by the HTTP header timer
//! nor parked while silent. Both ways an app reaches a peer through the outbound listener
//! are covered: the handshake sent to it as an HTTP request (routed by `Host`), and a
//! `CONNECT` tunnel (what proxy-aware WebSocket clients do). Negative twins: a denied path
//! gets 403 and no connection; an `Upgrade` other than WebSocket gets 403 (as Envoy's
//! sidecars); a plaintext WebSocket is closed when its port turns STRICT while the mTLS one
//! stays.
//!
//! Two `rampart proxy` processes (backend `api/backend`, frontend `web/frontend`) from one
//! mesh folder, certificates from the SDS stand-in of `proxy/tests/support`. Needs the
//! Python venv (`.ci/test` builds it at target/py, or set RAMPART_PYTHON).

mod support;
use support::envoy::{Envoy, addr, bootstrap, sds};
use support::{Proc, free_port, python};

#[path = "../proxy/tests/support/sds_standin.rs"]
mod sds_standin;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sds_standin::TestCa;
use serde_json::json;

const TD: &str = "cluster.local";

const POLICY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-private, namespace: api}
spec:
  selector: {matchLabels: {app: backend}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/private"]}}]
"#;

const STRICT: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: api}
spec:
  mtls: {mode: STRICT}
"#;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// The client, run to the end: its JSON line.
fn client(url: &str, mode: &str, addr: &str, pause: f64) -> serde_json::Value {
    let out = spawn_client(url, mode, addr, pause)
        .wait_with_output()
        .unwrap();
    parse(&out.stdout, &out.stderr)
}

fn spawn_client(url: &str, mode: &str, addr: &str, pause: f64) -> Child {
    Command::new(python())
        .arg(script("ws_client.py"))
        .args([url, mode, addr, &pause.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn parse(stdout: &[u8], stderr: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "client output {text:?} ({e}); stderr: {}",
            String::from_utf8_lossy(stderr)
        )
    })
}

struct Mesh {
    _dir: tempfile::TempDir,
    wp: PathBuf,
    ca: TestCa,
    mesh: PathBuf,
    in_b: u16,
    in_raw: u16,
    raw_heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    admin_b: u16,
    out_f: u16,
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
        let (app_b, in_b, admin_b) = (free_port(), free_port(), free_port());
        let (app_raw, in_raw) = (free_port(), free_port());
        let (app_f, in_f, out_f, admin_f) = (free_port(), free_port(), free_port(), free_port());
        std::fs::write(mesh.join("mesh.yaml"), format!("trustDomain: {TD}\n")).unwrap();
        std::fs::write(
            mesh.join("workloads.yaml"),
            format!(
                r#"workloads:
- name: backend
  namespace: api
  labels: {{app: backend}}
  ports:
  - {{port: 8080, protocol: http, app: "127.0.0.1:{app_b}", inbound: "127.0.0.1:{in_b}"}}
  - {{port: 8081, protocol: http, app: "127.0.0.1:{app_raw}", inbound: "127.0.0.1:{in_raw}"}}
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
        std::fs::write(mesh.join("policy/deny.yaml"), POLICY).unwrap();

        let raw_heads = switching_app(app_raw);
        let mut procs = Vec::new();
        let app_log = wp.join("app.log");
        let mut app = Command::new(python())
            .arg(script("ws_app.py"))
            .arg(app_b.to_string())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&app_log).unwrap())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(app.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert_eq!(
            first.trim(),
            "ready",
            "{}",
            std::fs::read_to_string(&app_log).unwrap_or_default()
        );
        procs.push(Proc {
            child: app,
            log: app_log,
        });

        let rt = tokio::runtime::Runtime::new().unwrap();
        let ca = TestCa::new("WebSocket Root");
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
        for (workload, sds, log, admin) in [
            ("api/backend", &sds_b, "backend.log", admin_b),
            ("web/frontend", &sds_f, "frontend.log", admin_f),
        ] {
            let log = wp.join(log);
            // A 1 s header-read timeout: a WebSocket silent for longer must not be cut by it.
            let child = Command::new(env!("CARGO_BIN_EXE_rampart"))
                .args(["proxy", "--mesh"])
                .arg(&mesh)
                .args(["--workload", workload, "--sds-socket"])
                .arg(sds)
                .args(["--header-read-timeout", "1s", "--drain-timeout", "1s"])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let p = Proc { child, log };
            support::wait_for(
                "proxy ready",
                Duration::from_secs(30),
                || {
                    http_status(
                        admin,
                        "GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                    ) == 200
                },
                || p.log(),
            );
            procs.push(p);
        }
        Mesh {
            _dir: dir,
            wp,
            ca,
            mesh,
            in_b,
            in_raw,
            raw_heads,
            admin_b,
            out_f,
            _rt: rt,
            _standins: standins,
            procs,
        }
    }

    /// An SDS stand-in serving `id` (a third workload, such as an Envoy sidecar).
    fn sds_for(&self, id: &str, sock: &Path) -> sds_standin::StandIn {
        let _guard = self._rt.enter();
        sds_standin::start(sock, Some(self.ca.secrets(id, 1)))
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(Proc::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

/// An app that answers every request head with `101 Upgrade: h2c` and then echoes: what an
/// app behind `golang.org/x/net/http2/h2c` does when asked for h2c anywhere in `Upgrade`.
/// The heads it saw.
fn switching_app(port: u16) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let seen = heads.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                seen.lock().unwrap().push(head);
                let _ = w.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
                );
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    heads
}

/// The whole answer to `raw` on a fresh connection until the proxy closes it (or 3 s).
fn exchange(port: u16, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the answer to `raw`, sent on a fresh connection to 127.0.0.1:`port`.
fn http_status(port: u16, raw: &str) -> u16 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if s.write_all(raw.as_bytes()).is_err() {
        return 0;
    }
    let mut head = [0u8; 64];
    let n = s.read(&mut head).unwrap_or(0);
    String::from_utf8_lossy(&head[..n])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn stats(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /stats/prometheus HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn websockets_cross_the_mesh_under_policy() {
    let m = Mesh::start();
    let out = format!("127.0.0.1:{}", m.out_f);
    let frontend = format!("URI=spiffe://{TD}/ns/web/sa/frontend");
    let echoed = serde_json::json!(["hello", "big", "b'\\x00\\x01binary'"]);

    // Through the outbound listener, both ways a client uses an HTTP proxy; frames flow
    // both ways after a silence longer than the header-read timeout (1 s).
    for mode in ["direct", "connect"] {
        let r = client("ws://backend.api:8080/chat", mode, &out, 1.5);
        let greeting = r["greeting"]
            .as_str()
            .unwrap_or_else(|| panic!("{mode}: {r}\n{}", m.logs()));
        assert!(
            greeting.starts_with("path=/chat xfcc=By=spiffe://"),
            "{mode}: {greeting}"
        );
        assert!(
            greeting.ends_with(&frontend),
            "{mode}: the caller's identity: {greeting}"
        );
        assert_eq!(r["echo"], echoed, "{mode}: {r}");
        // Its twin: the DENY on /private refuses the handshake; nothing reaches the app.
        let r = client("ws://backend.api:8080/private", mode, &out, 0.0);
        assert_eq!(r["status"], 403, "{mode}: {r}\n{}", m.logs());
    }
    // Plaintext straight at the inbound port (PERMISSIVE): no identity.
    let inbound = format!("127.0.0.1:{}", m.in_b);
    let r = client("ws://backend.api:8080/plain", "direct", &inbound, 0.0);
    assert_eq!(r["greeting"], "path=/plain xfcc=-", "{r}");
    assert_eq!(r["echo"], echoed);
    let text = stats(m.admin_b);
    assert!(
        text.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("response_code=\"101\"")
            && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{text}"
    );

    // An upgrade to anything but WebSocket is refused, as Envoy's sidecars refuse it.
    let other = "GET /chat HTTP/1.1\r\nHost: backend.api:8080\r\nConnection: Upgrade\r\n\
                 Upgrade: foo/1\r\n\r\n";
    assert_eq!(http_status(m.in_b, other), 403);
    assert_eq!(http_status(m.out_f, other), 403);

    // The port turns STRICT while a plaintext and an mTLS WebSocket are open and silent:
    // the plaintext one is closed, the mTLS one goes on.
    let plain = spawn_client("ws://backend.api:8080/plain", "direct", &inbound, 6.0);
    let mtls = spawn_client("ws://backend.api:8080/chat", "direct", &out, 6.0);
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(m.mesh.join("policy/strict.yaml"), STRICT).unwrap();
    let backend = &m.procs[1];
    support::wait_for(
        "STRICT in force",
        Duration::from_secs(4),
        || backend.log().matches("new configuration in force").count() >= 1,
        || m.logs(),
    );
    let p = plain.wait_with_output().unwrap();
    let p = parse(&p.stdout, &p.stderr);
    assert!(
        p["error"].is_string(),
        "plaintext WebSocket after STRICT: {p}"
    );
    assert!(
        backend
            .log()
            .contains("plaintext WebSocket closed: the port is STRICT now"),
        "{}",
        backend.log()
    );
    let t = mtls.wait_with_output().unwrap();
    let t = parse(&t.stdout, &t.stderr);
    assert_eq!(t["echo"], echoed, "mTLS WebSocket after STRICT: {t}");
}

/// An Istio sidecar (real Envoy, configured as istiod configures its outbound side: mTLS
/// with SDS, Istio's SNI and ALPN, the peer's SPIFFE ID checked, `upgrade_configs:
/// websocket` on its HTTP connection manager) carries a WebSocket to Rampart's inbound: the
/// app sees the Envoy workload's identity and frames flow both ways. Its twin: the denied
/// path gets 403 through Envoy.
#[test]
fn envoy_sidecar_websocket_to_rampart_inbound() {
    let m = Mesh::start();
    let sock = m.wp.join("sds-legacy.sock");
    let _sds = m.sds_for(&format!("spiffe://{TD}/ns/old/sa/legacy"), &sock);
    let host = "backend.api.svc.cluster.local";
    let cluster = format!("outbound|8080||{host}");
    let listen = free_port();
    let hcm = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ws",
            "upgrade_configs": [{"upgrade_type": "websocket"}],
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            "route_config": {"virtual_hosts": [{
                "name": "all", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}]
            }]}
        }
    });
    let outbound = json!({
        "name": cluster,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr(m.in_b)}}]}]},
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": format!("outbound_.8080_._.{host}"),
                "common_tls_context": {
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
                    "alpn_protocols": ["istio-http/1.1", "istio", "http/1.1"],
                    "tls_certificate_sds_secret_configs": [sds("default", "GRPC")],
                    "combined_validation_context": {
                        "default_validation_context": {
                            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": format!("spiffe://{TD}/ns/api/sa/backend")}}]
                        },
                        "validation_context_sds_secret_config": sds("ROOTCA", "GRPC")
                    }
                }
            }
        }
    });
    let b = bootstrap(
        &sock,
        vec![json!({"name": "ws", "address": addr(listen), "filter_chains": [{"filters": [hcm]}]})],
        vec![outbound],
    );
    let e = Envoy::start(&m.wp, "sidecar-ws", &b);
    e.wait_ready();
    let via = format!("127.0.0.1:{listen}");
    let r = client("ws://backend.api:8080/chat", "direct", &via, 1.5);
    let greeting = r["greeting"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}\n{}\n{}", e.proc.log(), m.logs()));
    assert!(
        greeting.starts_with(&format!(
            "path=/chat xfcc=By=spiffe://{TD}/ns/api/sa/backend;"
        )) && greeting.ends_with(&format!("URI=spiffe://{TD}/ns/old/sa/legacy")),
        "{greeting}"
    );
    assert_eq!(
        r["echo"],
        json!(["hello", "big", "b'\\x00\\x01binary'"]),
        "{r}"
    );
    let r = client("ws://backend.api:8080/private", "direct", &via, 0.0);
    assert_eq!(r["status"], 403, "{r}");
    assert!(e.stat("http.ws.downstream_cx_upgrades_total").unwrap_or(0) >= 1);
}

/// The app cannot switch to a protocol the client did not ask for in full: `Upgrade:
/// websocket, h2c` is refused (403, connection closed, the app sees nothing), and an app's
/// `101 Upgrade: h2c` (to a WebSocket handshake, or to a request whose `h2c` ask was dropped)
/// becomes a 502 and nothing is relayed. A handshake sent together with the first frame
/// loses no byte of it.
#[test]
fn only_websocket_switches_and_nothing_is_lost() {
    let m = Mesh::start();
    let smuggle = "GET /healthz HTTP/1.1\r\nHost: backend.api:8081\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                   Upgrade: websocket, h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n\
                   GET /admin HTTP/1.1\r\nHost: backend.api:8081\r\n\r\n";
    let answer = exchange(m.in_raw, smuggle.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_eq!(
        answer.matches("HTTP/1.1").count(),
        1,
        "one answer, then closed: {answer}"
    );
    assert!(m.raw_heads.lock().unwrap().is_empty(), "the app saw it");
    assert_eq!(http_status(m.out_f, smuggle), 403);

    // The app switches to h2c on a WebSocket handshake: 502, nothing relayed.
    let ws = "GET /chat HTTP/1.1\r\nHost: backend.api:8081\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nPRI * HTTP/2.0";
    let answer = exchange(m.in_raw, ws.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(
        !answer.contains("PRI * HTTP/2.0"),
        "bytes were relayed: {answer}"
    );
    // The same through the outbound listener, over mTLS.
    let answer = exchange(m.out_f, ws.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    // An h2c ask is dropped (the app gets a plain request) and its 101 is a 502 too.
    let h2c = "GET /x HTTP/1.1\r\nHost: backend.api:8081\r\nConnection: Upgrade, HTTP2-Settings\r\n\
               Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
    let answer = exchange(m.in_raw, h2c.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    let heads = m.raw_heads.lock().unwrap().clone();
    let last = heads.last().unwrap().to_ascii_lowercase();
    assert!(last.starts_with("get /x "), "{heads:?}");
    assert!(
        !last.contains("upgrade") && !last.contains("http2-settings"),
        "{last}"
    );

    // A handshake and its first frame in one write: the frame reaches the app (it was in
    // hyper's read buffer when the connection was handed over) and comes back.
    let mut raw = b"GET /raw HTTP/1.1\r\nHost: backend.api:8080\r\nConnection: Upgrade\r\n\
                    Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        .to_vec();
    let mask = [7u8, 1, 2, 3];
    raw.extend([0x81, 0x80 | 2]);
    raw.extend(mask);
    raw.extend(b"hi".iter().zip(mask.iter().cycle()).map(|(b, k)| b ^ k));
    let mut s = TcpStream::connect(("127.0.0.1", m.in_b)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&raw).unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    let frame = |r: &mut BufReader<TcpStream>| -> String {
        let mut h = [0u8; 2];
        r.read_exact(&mut h).unwrap();
        assert_eq!(h[0], 0x81, "a final text frame");
        let mut payload = vec![0u8; usize::from(h[1] & 0x7f)];
        r.read_exact(&mut payload).unwrap();
        String::from_utf8(payload).unwrap()
    };
    assert_eq!(frame(&mut r), "path=/raw xfcc=-");
    assert_eq!(frame(&mut r), "hi");
}
