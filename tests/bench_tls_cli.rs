//! `rampart bench tls` against `rampart bench tls-server`: the handshake load generator and
//! its floor server agree on mTLS when they share a root and the identities match, and the
//! generator reports the refusal (and fails) when the server is not who it must be or the
//! client is not trusted. Correctness of the tool only: no figure is asserted.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Proc, free_port, wait_for};

fn rampart() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
}

fn make_root(dir: &std::path::Path) {
    let out = rampart()
        .args(["certs", "root", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn server(ca: &std::path::Path, work: &std::path::Path) -> (Proc, u16) {
    let port = free_port();
    let log = work.join(format!("server-{port}.log"));
    let child = rampart()
        .args(["bench", "tls-server", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--ca")
        .arg(ca)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let p = Proc { child, log };
    wait_for(
        "bench tls-server listening",
        Duration::from_secs(20),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        || p.log(),
    );
    (p, port)
}

fn bench(ca: &std::path::Path, port: u16, pid: u32, extra: &[&str]) -> std::process::Output {
    rampart()
        .args(["bench", "tls", "--target"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--ca")
        .arg(ca)
        .args([
            "--connections",
            "4",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
        ])
        .args(["--pid", &pid.to_string()])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn handshakes_complete_and_the_servers_cpu_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    make_root(&ca);
    let (srv, port) = server(&ca, d.path());
    let out = bench(&ca, port, srv.child.id(), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}\n{}", srv.log());
    let first = stdout.lines().next().unwrap_or_default();
    let n: u64 = first
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(n > 0, "{stdout}");
    assert!(first.contains("errors 0"), "{stdout}");
    assert!(
        stdout.contains(&format!("pid {}:", srv.child.id())) && stdout.contains("per handshake"),
        "{stdout}"
    );
}

#[test]
fn a_server_with_another_identity_is_refused_and_the_run_fails() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    make_root(&ca);
    let (srv, port) = server(&ca, d.path());
    let out = bench(
        &ca,
        port,
        srv.child.id(),
        &[
            "--server-id",
            "spiffe://cluster.local/ns/bench/sa/someone-else",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.starts_with("0 handshakes"), "{stdout}");
    assert!(stderr.contains("first error: handshake with"), "{stderr}");
}

#[test]
fn a_client_from_another_root_is_refused_by_the_server() {
    let d = tempfile::tempdir().unwrap();
    let (ca, other) = (d.path().join("ca"), d.path().join("other"));
    make_root(&ca);
    make_root(&other);
    let (srv, port) = server(&ca, d.path());
    // The client trusts the server's root (so its own check passes) but presents a leaf of
    // another root: the server must refuse it.
    let trust = ca.join("root-cert.pem");
    let out = bench(
        &other,
        port,
        srv.child.id(),
        &["--trust", trust.to_str().unwrap()],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.starts_with("0 handshakes"), "{stdout}");
    assert!(stderr.contains("first error:"), "{stderr}");
}
