//! `rampart mtls-report --mesh DIR` against stand-in proxy admin endpoints serving `/mtls`
//! as the mesh-folder contract describes: exit 0 when STRICT is safe, 3 with the plaintext
//! sources listed when it is not, 4 when STRICT refuses clients, 5 when a port saw nothing,
//! 1 when a proxy cannot be asked. (The real proxies' `/mtls` is checked against this
//! command in tests/quickstart_e2e.rs.)

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

/// Serve `body` as the answer to every request on a fresh port, from a thread.
fn admin_stub(body: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            // Request line and headers up to the blank line.
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

fn unused_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn mesh(dir: &Path, backend_admin: u16, frontend_admin: u16) {
    std::fs::write(dir.join("mesh.yaml"), "trustDomain: cluster.local\n").unwrap();
    std::fs::write(
        dir.join("workloads.yaml"),
        format!(
            "workloads:
- name: frontend
  namespace: web
  ports: [{{port: 8080, protocol: http, app: 127.0.0.1:18080, inbound: 127.0.0.1:15080}}]
  proxy: {{outbound: 127.0.0.1:15001, admin: 127.0.0.1:{frontend_admin}}}
- name: backend
  namespace: api
  ports: [{{port: 8080, protocol: http, app: 127.0.0.1:18180, inbound: 127.0.0.1:15180}}]
  proxy: {{outbound: 127.0.0.1:15101, admin: 127.0.0.1:{backend_admin}}}
"
        ),
    )
    .unwrap();
}

const BACKEND_PLAINTEXT: &str = r#"{"workload": "api/backend", "ports": [{"port": 8080, "protocol": "http", "mode": "PERMISSIVE",
  "since_start": {"mtls_connections": 10, "plaintext_connections": 2, "mtls_requests": 50, "plaintext_requests": 3},
  "recent": {"window_seconds": 300, "mtls_connections": 1, "plaintext_connections": 0, "mtls_requests": 4, "plaintext_requests": 0},
  "plaintext_sources": [{"ip": "127.0.0.9", "connections": 2, "requests": 3, "last_seen_unix": 1790000000}]}]}"#;

const FRONTEND_MTLS: &str = r#"{"workload": "web/frontend", "ports": [{"port": 8080, "protocol": "http", "mode": "PERMISSIVE",
  "since_start": {"mtls_connections": 4, "plaintext_connections": 0, "mtls_requests": 9, "plaintext_requests": 0},
  "recent": {"window_seconds": 300, "mtls_connections": 4, "plaintext_connections": 0, "mtls_requests": 9, "plaintext_requests": 0},
  "plaintext_sources": []}]}"#;

fn report(dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["mtls-report", "--mesh"])
        .arg(dir)
        .args(["--timeout", "5s"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn plaintext_source_makes_exit_3_and_is_named() {
    let d = tempfile::tempdir().unwrap();
    mesh(
        d.path(),
        admin_stub(BACKEND_PLAINTEXT),
        admin_stub(FRONTEND_MTLS),
    );
    let out = report(d.path(), &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}\n{out:?}");
    assert!(
        text.contains("api/backend: NOT safe to switch to STRICT: plaintext on port 8080 from 127.0.0.9 (2 connections, 3 requests"),
        "{text}"
    );
    assert!(
        text.contains("web/frontend: safe to switch to STRICT"),
        "{text}"
    );
    assert!(text.contains("PERMISSIVE"), "{text}");

    // JSON says the same.
    let out = report(d.path(), &["--output", "json"]);
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["safe_to_switch_to_strict"], false);
    let backend = v["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workload"] == "api/backend")
        .unwrap();
    assert_eq!(backend["verdict"], "plaintext");
    assert_eq!(backend["ports"][0]["result"]["verdict"], "plaintext");
    assert_eq!(
        backend["ports"][0]["result"]["sources"][0]["ip"],
        "127.0.0.9"
    );

    // Judged on the recent window (the plaintext client stopped): safe, exit 0.
    let out = report(d.path(), &["--window", "recent"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Only the frontend: safe.
    let out = report(d.path(), &["--workload", "web/frontend"]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn unreachable_proxy_is_an_error_not_a_pass() {
    let d = tempfile::tempdir().unwrap();
    let down = unused_port();
    mesh(d.path(), down, admin_stub(FRONTEND_MTLS));
    let out = report(d.path(), &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("api/backend: error:"), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{down}")), "{text}");
    assert!(
        text.contains("web/frontend: safe to switch to STRICT"),
        "{text}"
    );
}

#[test]
fn a_proxy_answering_for_another_workload_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    // The backend's admin address serves the frontend's report.
    mesh(
        d.path(),
        admin_stub(FRONTEND_MTLS),
        admin_stub(FRONTEND_MTLS),
    );
    let out = report(d.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("reports for workload \"web/frontend\""));
}

#[test]
fn bad_input_exits_2() {
    let d = tempfile::tempdir().unwrap();
    mesh(d.path(), unused_port(), unused_port());
    let out = report(d.path(), &["--workload", "nope/none"]);
    assert_eq!(out.status.code(), Some(2));
    let empty = tempfile::tempdir().unwrap();
    let out = report(empty.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("workloads.yaml"));
    let help = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["mtls-report", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("3  a port that is not STRICT receives plaintext"),
        "{help}"
    );
    assert!(
        help.contains("4  a STRICT port refuses plaintext"),
        "{help}"
    );
    // A workloads.yaml that does not load is still bad input: the proxies cannot be found.
    std::fs::write(d.path().join("workloads.yaml"), "workloads: [{name: x}]\n").unwrap();
    let out = report(d.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("workloads.yaml"),
        "{out:?}"
    );
}

/// A policy edit the proxies refused (a typo in a mode) is the moment an operator wants the
/// report most: it warns that the folder does not load, and reports what the proxies serve.
/// The negative twin: the same folder without the typo gives no warning.
#[test]
fn a_refused_policy_edit_does_not_stop_the_report() {
    let d = tempfile::tempdir().unwrap();
    mesh(
        d.path(),
        admin_stub(BACKEND_PLAINTEXT),
        admin_stub(FRONTEND_MTLS),
    );
    let out = report(d.path(), &[]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("does not load"),
        "{out:?}"
    );
    std::fs::create_dir(d.path().join("policy")).unwrap();
    std::fs::write(
        d.path().join("policy/pa.yaml"),
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: api}
spec: {mtls: {mode: PERMISIVE}}
",
    )
    .unwrap();
    let out = report(d.path(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("does not load (1 problem(s)"), "{stderr}");
    assert!(stderr.contains("policy/pa.yaml"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("api/backend: NOT safe to switch"),
        "{out:?}"
    );
}

const BACKEND_STRICT_REFUSING: &str = r#"{"workload": "api/backend", "ports": [{"port": 8080, "protocol": "http", "mode": "STRICT",
  "since_start": {"mtls_connections": 10, "plaintext_connections": 0, "mtls_requests": 50, "plaintext_requests": 0, "plaintext_refused": 2},
  "recent": {"window_seconds": 300, "mtls_connections": 1, "plaintext_connections": 0, "mtls_requests": 4, "plaintext_requests": 0, "plaintext_refused": 2},
  "plaintext_sources": [{"ip": "127.0.0.9", "connections": 0, "requests": 0, "refused": 2, "last_seen_unix": 1790000000}]}]}"#;

/// After the switch, clients refused by STRICT are cut off: exit 4 and named. Its twin, the
/// other workload alone (mutual TLS only), exits 0; a port with no traffic at all exits 5.
#[test]
fn plaintext_refused_by_strict_exits_4_and_silence_exits_5() {
    let d = tempfile::tempdir().unwrap();
    mesh(
        d.path(),
        admin_stub(BACKEND_STRICT_REFUSING),
        admin_stub(FRONTEND_MTLS),
    );
    let out = report(d.path(), &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains("api/backend: already STRICT on every port; plaintext REFUSED on port 8080 from 127.0.0.9 (0 connections, 0 requests, 2 refused by STRICT"),
        "{text}"
    );
    assert!(text.contains("STRICT (2 plaintext refused)"), "{text}");
    let out = report(d.path(), &["--workload", "web/frontend"]);
    assert_eq!(out.status.code(), Some(0));

    const QUIET: &str = r#"{"workload": "web/frontend", "ports": [{"port": 8080, "protocol": "http", "mode": "PERMISSIVE",
  "since_start": {"mtls_connections": 0, "plaintext_connections": 0, "mtls_requests": 0, "plaintext_requests": 0},
  "recent": {"window_seconds": 300, "mtls_connections": 0, "plaintext_connections": 0, "mtls_requests": 0, "plaintext_requests": 0},
  "plaintext_sources": []}]}"#;
    let d = tempfile::tempdir().unwrap();
    mesh(
        d.path(),
        admin_stub(BACKEND_STRICT_REFUSING),
        admin_stub(QUIET),
    );
    let out = report(d.path(), &["--workload", "web/frontend"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(5), "{text}");
    assert!(text.contains("silence is no proof"), "{text}");
}
