//! The outbound side of `rampart proxy` end to end, with curl and Python grpcio:
//!
//! - auto-mTLS: a destination port whose PeerAuthentication is DISABLE is reached in
//!   plaintext (metrics `connection_security_policy="none"`), on the HTTP-proxy listener and
//!   on upstream ports; a STRICT destination still gets mTLS with its SPIFFE ID checked; a live
//!   mode edit applies to new connections;
//! - `grpc_response_status` from the response trailers (successful and failing calls), on
//!   both reporters;
//! - `CONNECT host:port` tunnels (curl `--proxytunnel`, raw TCP, grpcio through
//!   `grpc.http_proxy`), unknown destinations refused with 502.
//!
//! Four `rampart proxy` processes from one mesh folder, certificates from an SDS stand-in
//! (`proxy/tests/support/sds_standin.rs`), apps are `rampart echo` and a grpcio server.

mod support;
use support::{Proc, forward, free_port, python, wait_for};

#[path = "../proxy/tests/support/sds_standin.rs"]
mod sds_standin;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sds_standin::TestCa;

const TD: &str = "cluster.local";

/// Run `rampart ARGS` with its output in `log`.
fn spawn(args: &[&str], log: PathBuf) -> Proc {
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    Proc { child, log }
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

/// The lines of a Prometheus text that name `metric` and carry every one of `labels`.
fn series<'a>(stats: &'a str, metric: &str, labels: &[&str]) -> Vec<&'a str> {
    stats
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .collect()
}

/// The value of the first matching series (0 if none).
fn value(stats: &str, metric: &str, labels: &[&str]) -> u64 {
    series(stats, metric, labels)
        .first()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Send `CONNECT target` on a fresh connection to `proxy`; the status line and the stream.
fn connect(proxy: u16, target: &str) -> (String, String, TcpStream) {
    let mut s = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    assert!(
        r.buffer().is_empty(),
        "nothing may follow the CONNECT answer"
    );
    (
        status.trim().to_string(),
        String::from_utf8_lossy(&body).to_string(),
        s,
    )
}

fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, msg);
}

struct Ports {
    be_http: (u16, u16),
    be_tcp: (u16, u16),
    be_grpc: (u16, u16),
    be_admin: u16,
    old_http: (u16, u16),
    old_tcp: (u16, u16),
    old_admin: u16,
    impostor_in: u16,
    fe_out: u16,
    fe_admin: u16,
    fe_up_old: u16,
    fe_up_be: u16,
}

fn write_mesh(dir: &Path, p: &Ports) {
    std::fs::write(dir.join("mesh.yaml"), format!("trustDomain: {TD}\n")).unwrap();
    let port = |n: u16, proto: &str, (app, inbound): (u16, u16)| {
        format!(
            "  - {{port: {n}, protocol: {proto}, app: \"127.0.0.1:{app}\", inbound: \"127.0.0.1:{inbound}\"}}\n"
        )
    };
    let reg = format!(
        "workloads:\n\
         - name: backend\n  namespace: api\n  labels: {{app: backend}}\n  ports:\n{}{}{}  proxy: {{admin: \"127.0.0.1:{}\"}}\n\
         - name: impostor\n  namespace: api\n  ports:\n  - {{port: 8080, protocol: http, app: \"127.0.0.1:1\", inbound: \"127.0.0.1:{}\"}}\n\
         - name: legacy\n  namespace: old\n  ports:\n{}{}  proxy: {{admin: \"127.0.0.1:{}\"}}\n\
         - name: frontend\n  namespace: web\n  ports: []\n  proxy: {{outbound: \"127.0.0.1:{}\", admin: \"127.0.0.1:{}\"}}\n  upstreams:\n\
         \x20 - {{service: legacy.old, port: 9000, listen: \"127.0.0.1:{}\"}}\n\
         \x20 - {{service: backend.api, port: 9000, listen: \"127.0.0.1:{}\"}}\n",
        port(8080, "http", p.be_http),
        port(9000, "tcp", p.be_tcp),
        port(7070, "grpc", p.be_grpc),
        p.be_admin,
        p.impostor_in,
        port(8080, "http", p.old_http),
        port(9000, "tcp", p.old_tcp),
        p.old_admin,
        p.fe_out,
        p.fe_admin,
        p.fe_up_old,
        p.fe_up_be,
    );
    std::fs::write(dir.join("workloads.yaml"), reg).unwrap();
    std::fs::create_dir_all(dir.join("policy")).unwrap();
    std::fs::write(
        dir.join("policy/peer.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: api}\nspec: {mtls: {mode: STRICT}}\n",
    )
    .unwrap();
    set_old_mode(dir, "DISABLE");
}

fn set_old_mode(dir: &Path, mode: &str) {
    std::fs::write(
        dir.join("policy/old.yaml"),
        format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: old}}\nspec: {{mtls: {{mode: {mode}}}}}\n"),
    )
    .unwrap();
}

const GRPC_SERVER: &str = r#"
import grpc, sys, time
from concurrent import futures
def say(req, ctx):
    return req
def missing(req, ctx):
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
def stream(req, ctx):
    yield b"first"
    ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "enough")
h = grpc.method_handlers_generic_handler("test.Echo", {
    "Say": grpc.unary_unary_rpc_method_handler(say),
    "Missing": grpc.unary_unary_rpc_method_handler(missing),
    "Stream": grpc.unary_stream_rpc_method_handler(stream),
})
s = grpc.server(futures.ThreadPoolExecutor(4))
s.add_generic_rpc_handlers((h,))
s.add_insecure_port("127.0.0.1:" + sys.argv[1])
s.start()
print("up", flush=True)
time.sleep(300)
"#;

/// Calls Say, Missing, Stream on `channel` (Python expression); prints one line per call.
const GRPC_CLIENT: &str = r#"
import grpc, sys
ch = eval(sys.argv[1])
ident = lambda b: b
try:
    print("Say", ch.unary_unary("/test.Echo/Say", request_serializer=ident, response_deserializer=ident)(b"hello grpc", timeout=5).decode())
except grpc.RpcError as e:
    print("Say", e.code().value[0], e.details())
try:
    ch.unary_unary("/test.Echo/Missing", request_serializer=ident, response_deserializer=ident)(b"x", timeout=5)
    print("Missing UNEXPECTED_OK")
except grpc.RpcError as e:
    print("Missing", e.code().value[0], e.details())
got = []
try:
    for m in ch.unary_stream("/test.Echo/Stream", request_serializer=ident, response_deserializer=ident)(b"x", timeout=5):
        got.append(m.decode())
    print("Stream UNEXPECTED_OK", got)
except grpc.RpcError as e:
    print("Stream", ",".join(got), e.code().value[0], e.details())
"#;

#[test]
fn outbound_auto_mtls_grpc_status_and_connect() {
    let w = tempfile::tempdir().unwrap();
    let wp = w.path();
    let mesh = wp.join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    let pair = || (free_port(), free_port());
    let p = Ports {
        be_http: pair(),
        be_tcp: pair(),
        be_grpc: pair(),
        be_admin: free_port(),
        old_http: pair(),
        old_tcp: pair(),
        old_admin: free_port(),
        impostor_in: free_port(),
        fe_out: free_port(),
        fe_admin: free_port(),
        fe_up_old: free_port(),
        fe_up_be: free_port(),
    };
    write_mesh(&mesh, &p);

    // apps: rampart echo (HTTP/1.1 + TCP echo on one port) and a grpcio server
    let mut apps = Vec::new();
    for (name, port) in [
        ("be-http", p.be_http.0),
        ("be-tcp", p.be_tcp.0),
        ("old-http", p.old_http.0),
        ("old-tcp", p.old_tcp.0),
    ] {
        apps.push(spawn(
            &["echo", "--listen", &format!("127.0.0.1:{port}")],
            wp.join(format!("{name}.log")),
        ));
    }
    let mut grpc_app = Command::new(python())
        .args(["-c", GRPC_SERVER, &p.be_grpc.0.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(grpc_app.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "up");

    // SDS stand-ins with certificates for every proxy
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new("Outbound Test Root");
    let mut proxies = Vec::new();
    let _standins: Vec<_> = [
        ("api/backend", "ns/api/sa/backend", p.be_admin),
        ("old/legacy", "ns/old/sa/legacy", p.old_admin),
        ("web/frontend", "ns/web/sa/frontend", p.fe_admin),
    ]
    .into_iter()
    .map(|(workload, id, admin)| {
        let sock = wp.join(format!("{}.sock", workload.replace('/', "-")));
        let standin = rt.block_on(async {
            sds_standin::start(&sock, Some(ca.secrets(&format!("spiffe://{TD}/{id}"), 1)))
        });
        let log = wp.join(format!("{}.log", workload.replace('/', "-")));
        let proc = spawn(
            &[
                "proxy",
                "--mesh",
                mesh.to_str().unwrap(),
                "--workload",
                workload,
                "--sds-socket",
                sock.to_str().unwrap(),
                "--drain-timeout",
                "2s",
            ],
            log,
        );
        wait_for(
            &format!("{workload} ready"),
            Duration::from_secs(20),
            || curl(&[&format!("http://127.0.0.1:{admin}/ready")]).0 == "200",
            || proc.log(),
        );
        proxies.push(proc);
        standin
    })
    .collect();
    let logs = || {
        proxies
            .iter()
            .map(|p| format!("--- {}\n{}", p.log.display(), p.log()))
            .collect::<String>()
    };
    let proxy_arg = format!("http://127.0.0.1:{}", p.fe_out);
    let fe_stats = || get(&format!("http://127.0.0.1:{}/stats/prometheus", p.fe_admin));
    let be_stats = || get(&format!("http://127.0.0.1:{}/stats/prometheus", p.be_admin));

    // === 1. auto-mTLS: DISABLE destination in plaintext, STRICT destination in mTLS ===
    let (code, body) = curl(&["-x", &proxy_arg, "http://legacy.old:8080/plain"]);
    assert_eq!(code, "200", "{body}\n{}", logs());
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        seen["headers"].get("x-forwarded-client-cert").is_none(),
        "plaintext to a DISABLE port: no client identity to forward: {body}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&get(&format!("http://127.0.0.1:{}/mtls", p.old_admin))).unwrap();
    let port = &m["ports"][0];
    assert_eq!(port["mode"], "DISABLE", "{m}");
    assert!(port["since_start"]["plaintext_requests"].as_u64().unwrap() >= 1);
    assert_eq!(port["since_start"]["mtls_connections"], 0, "{m}");
    let legacy_http = [
        "reporter=\"source\"",
        "destination_workload=\"legacy\"",
        "request_protocol=\"http\"",
        "connection_security_policy=\"none\"",
        "response_code=\"200\"",
    ];
    let s = fe_stats();
    assert_eq!(value(&s, "istio_requests_total", &legacy_http), 1, "{s}");
    // upstream port (TCP) to the DISABLE port: plaintext too
    let mut t = TcpStream::connect(("127.0.0.1", p.fe_up_old)).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo_roundtrip(&mut t, b"plain tcp upstream\n");
    drop(t);
    let legacy_tcp = [
        "reporter=\"source\"",
        "destination_workload=\"legacy\"",
        "connection_security_policy=\"none\"",
    ];
    wait_for(
        "legacy tcp close counted",
        Duration::from_secs(5),
        || {
            value(
                &fe_stats(),
                "istio_tcp_connections_closed_total",
                &legacy_tcp,
            ) == 1
        },
        fe_stats,
    );
    let s = fe_stats();
    assert_eq!(
        value(&s, "istio_tcp_received_bytes_total", &legacy_tcp),
        19,
        "received = bytes from the app: {s}"
    );
    assert_eq!(value(&s, "istio_tcp_sent_bytes_total", &legacy_tcp), 19);

    // negative twin: the STRICT backend still gets mTLS with the SPIFFE ID checked
    let (code, body) = curl(&["-x", &proxy_arg, "http://backend.api:8080/strict"]);
    assert_eq!(code, "200", "{body}\n{}", logs());
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    let xfcc = seen["headers"]["x-forwarded-client-cert"].as_str().unwrap();
    assert!(
        xfcc.contains(&format!("URI=spiffe://{TD}/ns/web/sa/frontend")),
        "{xfcc}"
    );
    let s = fe_stats();
    assert_eq!(
        value(
            &s,
            "istio_requests_total",
            &[
                "reporter=\"source\"",
                "destination_workload=\"backend\"",
                "connection_security_policy=\"mutual_tls\"",
                "response_code=\"200\"",
            ]
        ),
        1,
        "{s}"
    );
    let mut t = TcpStream::connect(("127.0.0.1", p.fe_up_be)).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo_roundtrip(&mut t, b"mtls tcp upstream\n");
    drop(t);
    // the impostor's inbound address answers with the backend's identity: refused
    forward(p.impostor_in, p.be_http.1);
    let (code, body) = curl(&["-x", &proxy_arg, "http://impostor.api:8080/"]);
    assert_eq!(code, "503", "{body}");
    assert!(
        body.contains(&format!(
            "is not the expected spiffe://{TD}/ns/api/sa/impostor"
        )),
        "{body}"
    );

    // an app opening a connection per request: the upstream mTLS connection is reused
    let be_mtls_conns = || -> u64 {
        let m: serde_json::Value =
            serde_json::from_str(&get(&format!("http://127.0.0.1:{}/mtls", p.be_admin))).unwrap();
        m["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["port"] == 8080)
            .unwrap()["since_start"]["mtls_connections"]
            .as_u64()
            .unwrap()
    };
    let before = be_mtls_conns();
    for i in 0..4 {
        let (code, body) = curl(&[
            "-x",
            &proxy_arg,
            &format!("http://backend.api:8080/again/{i}"),
        ]);
        assert_eq!(code, "200", "{body}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let handshakes = be_mtls_conns() - before;
    assert!(
        handshakes <= 1,
        "4 client connections in a row made {handshakes} mTLS connections"
    );

    // a live mode edit applies to new connections: STRICT -> mTLS, back to DISABLE -> plaintext
    set_old_mode(&mesh, "STRICT");
    wait_for(
        "legacy reached over mTLS after the STRICT edit",
        Duration::from_secs(15),
        || {
            let (code, body) = curl(&["-x", &proxy_arg, "http://legacy.old:8080/now-strict"]);
            code == "200" && body.contains("URI=spiffe://cluster.local/ns/web/sa/frontend")
        },
        logs,
    );
    assert!(
        value(
            &fe_stats(),
            "istio_requests_total",
            &[
                "destination_workload=\"legacy\"",
                "connection_security_policy=\"mutual_tls\"",
                "response_code=\"200\"",
            ]
        ) >= 1
    );
    let mut t = TcpStream::connect(("127.0.0.1", p.fe_up_old)).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo_roundtrip(&mut t, b"now over mtls\n");
    drop(t);
    set_old_mode(&mesh, "DISABLE");
    wait_for(
        "legacy reached in plaintext after the DISABLE edit",
        Duration::from_secs(15),
        || {
            let (code, body) = curl(&["-x", &proxy_arg, "http://legacy.old:8080/plain-again"]);
            code == "200" && !body.contains("x-forwarded-client-cert")
        },
        logs,
    );

    // === 2. gRPC status from the trailers, both reporters ===
    let channel = format!(
        "grpc.insecure_channel('127.0.0.1:{}', options=[('grpc.default_authority', 'backend.api:7070')])",
        p.fe_out
    );
    let out = Command::new(python())
        .args(["-c", GRPC_CLIENT, &channel])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("Say hello grpc")
            && text.contains("Missing 5 no such thing")
            && text.contains("Stream first 8 enough"),
        "{text}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    for (who, stats, reporter) in [
        ("frontend", &fe_stats as &dyn Fn() -> String, "source"),
        ("backend", &be_stats, "destination"),
    ] {
        let base = |status: &'static str| {
            [
                format!("reporter=\"{reporter}\""),
                "request_protocol=\"grpc\"".to_string(),
                "connection_security_policy=\"mutual_tls\"".to_string(),
                "response_code=\"200\"".to_string(),
                format!("grpc_response_status=\"{status}\""),
            ]
        };
        for status in ["0", "5", "8"] {
            let labels = base(status);
            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
            wait_for(
                &format!("{who}: grpc_response_status={status}"),
                Duration::from_secs(5),
                || value(&stats(), "istio_requests_total", &refs) == 1,
                stats,
            );
            assert_eq!(
                value(&stats(), "istio_request_duration_milliseconds_count", &refs),
                1
            );
        }
        let empty = base("");
        let refs: Vec<&str> = empty.iter().map(String::as_str).collect();
        let s = stats();
        assert!(
            series(&s, "istio_requests_total", &refs).is_empty(),
            "no gRPC request may lack its status: {s}"
        );
    }

    // === 3. CONNECT ===
    // curl --proxytunnel: HTTP inside a tunnel, mTLS to the STRICT backend
    let (code, body) = curl(&["-p", "-x", &proxy_arg, "http://backend.api:8080/tunnelled"]);
    assert_eq!(code, "200", "{body}\n{}", logs());
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["path"], "/tunnelled", "{body}");
    assert!(
        seen["headers"]["x-forwarded-client-cert"]
            .as_str()
            .unwrap()
            .contains("URI=spiffe://cluster.local/ns/web/sa/frontend"),
        "{body}"
    );
    // raw TCP through CONNECT: mTLS to backend:9000, plaintext to legacy:9000 (DISABLE)
    let (status, _, mut t) = connect(p.fe_out, "backend.api:9000");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    echo_roundtrip(&mut t, b"through a tunnel\n");
    drop(t);
    let (status, _, mut t) = connect(p.fe_out, "legacy.old.svc.cluster.local:9000");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    echo_roundtrip(&mut t, b"plain tunnel\n");
    drop(t);
    wait_for(
        "tunnels counted as TCP",
        Duration::from_secs(5),
        || {
            let s = fe_stats();
            value(&s, "istio_tcp_connections_closed_total", &legacy_tcp) == 2
                && value(
                    &s,
                    "istio_tcp_connections_closed_total",
                    &[
                        "destination_workload=\"backend\"",
                        "connection_security_policy=\"mutual_tls\"",
                    ],
                ) >= 3
        },
        fe_stats,
    );
    // unknown destination: 502 naming it (fail closed)
    let (status, body, _) = connect(p.fe_out, "nosuch.api:9000");
    assert!(status.starts_with("HTTP/1.1 502"), "{status}");
    assert!(
        body.contains("unknown destination \"nosuch.api:9000\""),
        "{body}"
    );
    // grpcio through its HTTP proxy support (it tunnels with CONNECT)
    let channel = format!(
        "grpc.insecure_channel('backend.api:7070', options=[('grpc.http_proxy', 'http://127.0.0.1:{}')])",
        p.fe_out
    );
    let out = Command::new(python())
        .args(["-c", GRPC_CLIENT, &channel])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("Say hello grpc") && text.contains("Missing 5 no such thing"),
        "{text}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    // the backend saw those calls over mTLS from the frontend
    let s = be_stats();
    assert_eq!(
        value(
            &s,
            "istio_requests_total",
            &[
                "reporter=\"destination\"",
                "source_workload=\"frontend\"",
                "grpc_response_status=\"0\"",
            ]
        ),
        2,
        "{s}"
    );

    let _ = grpc_app.kill();
    let _ = grpc_app.wait();
    drop(proxies);
    drop(apps);
    drop(rt);
}
