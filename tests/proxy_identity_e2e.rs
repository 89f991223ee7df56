//! The proxy's own identity fails closed (issue 11): a `rampart proxy` whose own certificate
//! has expired, or does not chain to the trust bundle it was given, presents nothing: inbound
//! mTLS handshakes and outbound mTLS originations are refused, `/ready` says why, a metric
//! counts it; a fresh push restores service with no restart. Certificates come from the SDS
//! stand-in (`proxy/tests/support/sds_standin.rs`), which can push what a correct node agent
//! would not (a certificate about to expire, a bundle without its root).

mod support;
use support::{Proc, free_port};

#[path = "../proxy/tests/support/sds_standin.rs"]
mod sds_standin;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sds_standin::{Secrets, TestCa};

const TD: &str = "cluster.local";

fn start_proxy(mesh: &Path, workload: &str, sds: &Path, log: PathBuf) -> Proc {
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["proxy", "--mesh"])
        .arg(mesh)
        .args(["--workload", workload, "--sds-socket"])
        .arg(sds)
        .args(["--drain-timeout", "1s"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// A tiny HTTP/1.1 app answering 200 "hello" to anything (one request per connection).
fn app(port: u16) {
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
                );
            });
        }
    });
}

/// (status code, body); "000" when no HTTP answer came (e.g. the TLS handshake failed).
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

fn wait_for(what: &str, timeout: Duration, f: impl FnMut() -> bool, p: &Proc) {
    support::wait_for(what, timeout, f, || p.log());
}

fn secrets(ca: &TestCa, id: &str, ttl: Duration, version: u64, bundle_pem: String) -> Secrets {
    let (chain_pem, key_pem) = ca.issue(id, ttl);
    Secrets {
        version,
        chain_pem,
        key_pem,
        bundle_pem,
        crl_pem: String::new(),
    }
}

#[test]
fn own_certificate_expired_or_untrusted_fails_closed_and_a_fresh_push_restores() {
    let w = tempfile::tempdir().unwrap();
    let wp = w.path();
    let mesh = wp.join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    let (be_app, be_in, be_admin) = (free_port(), free_port(), free_port());
    let (fe_app, fe_in, fe_out, fe_admin) = (free_port(), free_port(), free_port(), free_port());
    std::fs::write(mesh.join("mesh.yaml"), format!("trustDomain: {TD}\n")).unwrap();
    std::fs::write(
        mesh.join("workloads.yaml"),
        format!(
            r#"workloads:
- name: backend
  namespace: api
  ports:
  - {{port: 8080, protocol: http, app: "127.0.0.1:{be_app}", inbound: "127.0.0.1:{be_in}"}}
  proxy: {{admin: "127.0.0.1:{be_admin}"}}
- name: frontend
  namespace: web
  ports:
  - {{port: 80, protocol: http, app: "127.0.0.1:{fe_app}", inbound: "127.0.0.1:{fe_in}"}}
  proxy: {{outbound: "127.0.0.1:{fe_out}", admin: "127.0.0.1:{fe_admin}"}}
"#
        ),
    )
    .unwrap();
    app(be_app);
    app(fe_app);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new("Mesh Root");
    let other = TestCa::new("Other Root");
    let fe_id = format!("spiffe://{TD}/ns/web/sa/frontend");
    let sds_b = wp.join("sds-b.sock");
    let sds_f = wp.join("sds-f.sock");
    let (_standin_b, standin_f) = rt.block_on(async {
        (
            sds_standin::start(
                &sds_b,
                Some(ca.secrets(&format!("spiffe://{TD}/ns/api/sa/backend"), 1)),
            ),
            sds_standin::start(&sds_f, Some(ca.secrets(&fe_id, 1))),
        )
    });
    let backend = start_proxy(&mesh, "api/backend", &sds_b, wp.join("backend.log"));
    let frontend = start_proxy(&mesh, "web/frontend", &sds_f, wp.join("frontend.log"));
    let ready = |port: u16| curl(&[&format!("http://127.0.0.1:{port}/ready")]);
    wait_for(
        "backend ready",
        Duration::from_secs(20),
        || ready(be_admin).0 == "200",
        &backend,
    );
    wait_for(
        "frontend ready",
        Duration::from_secs(20),
        || ready(fe_admin).0 == "200",
        &frontend,
    );

    // A client certificate from the mesh CA, for calling the frontend's inbound port.
    let (cc, ck) = ca.issue(
        &format!("spiffe://{TD}/ns/api/sa/backend"),
        Duration::from_secs(3600),
    );
    let (cert, key) = (wp.join("client.pem"), wp.join("client.key"));
    std::fs::write(&cert, cc).unwrap();
    std::fs::write(&key, ck).unwrap();
    let inbound = || {
        curl(&[
            "-k",
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            &format!("https://127.0.0.1:{fe_in}/x"),
        ])
        .0
    };
    let outbound = || {
        curl(&[
            "-x",
            &format!("http://127.0.0.1:{fe_out}"),
            "http://backend.api:8080/x",
        ])
        .0
    };
    // Positive: both directions work with a valid certificate.
    assert_eq!(inbound(), "200", "{}", frontend.log());
    assert_eq!(outbound(), "200", "{}", frontend.log());

    // --- 1. our own certificate expires: nothing is presented any more ---
    standin_f
        .tx
        .send(Some(secrets(
            &ca,
            &fe_id,
            Duration::from_secs(4),
            2,
            ca.root_pem(),
        )))
        .unwrap();
    wait_for(
        "frontend not ready: own certificate expired",
        Duration::from_secs(20),
        || {
            let (code, body) = ready(fe_admin);
            code == "503" && body.contains("own certificate expired at")
        },
        &frontend,
    );
    assert_eq!(
        inbound(),
        "000",
        "inbound handshake must fail: {}",
        frontend.log()
    );
    assert_ne!(
        outbound(),
        "200",
        "outbound origination must fail: {}",
        frontend.log()
    );
    let log = frontend.log();
    assert!(
        log.contains("own certificate expired at") && log.contains("own identity unusable"),
        "{log}"
    );
    let metrics = curl(&[&format!("http://127.0.0.1:{fe_admin}/stats/prometheus")]).1;
    assert!(
        metrics.contains("rampart_proxy_own_identity_usable 0")
            && metrics.contains("rampart_proxy_own_identity_refusals_total{reason=\"expired\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("refusals_total{reason=\"expired\"} 0"),
        "{metrics}"
    );

    // A fresh push restores service, no restart.
    standin_f.tx.send(Some(ca.secrets(&fe_id, 3))).unwrap();
    wait_for(
        "frontend ready again",
        Duration::from_secs(10),
        || ready(fe_admin).0 == "200",
        &frontend,
    );
    assert_eq!(inbound(), "200", "{}", frontend.log());
    assert_eq!(outbound(), "200", "{}", frontend.log());

    // --- 2. the bundle rotates to a root our certificate does not chain to ---
    let mut s = ca.secrets(&fe_id, 4);
    s.bundle_pem = other.root_pem();
    standin_f.tx.send(Some(s)).unwrap();
    wait_for(
        "frontend not ready: certificate does not chain",
        Duration::from_secs(10),
        || {
            let (code, body) = ready(fe_admin);
            code == "503" && body.contains("does not chain to the current trust bundle")
        },
        &frontend,
    );
    assert_eq!(inbound(), "000", "{}", frontend.log());
    assert_ne!(outbound(), "200", "{}", frontend.log());
    // A matching certificate arrives: usable again.
    standin_f
        .tx
        .send(Some(secrets(
            &other,
            &fe_id,
            Duration::from_secs(3600),
            5,
            other.root_pem(),
        )))
        .unwrap();
    wait_for(
        "frontend ready under the new root",
        Duration::from_secs(10),
        || ready(fe_admin).0 == "200",
        &frontend,
    );
    drop(backend);
    drop(frontend);
}
