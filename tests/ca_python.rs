//! `rampart ca` (the real binary) against a client we did not write: Python grpcio with stubs
//! generated at test time by grpc_tools.protoc from our .proto, `cryptography` for keys, CSRs,
//! tokens and an external plug-in CA, and `openssl verify` for the chains.
//!
//! Needs the Python venv (`.ci/test` builds it at target/py, or set RAMPART_PYTHON) and
//! `openssl` on PATH.

mod support;
use support::python;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ISS: &str = "https://kubernetes.default.svc.cluster.local";
const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/ca_client.py")
}

fn py(args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(script())
        .args(args)
        .output()
        .expect("run python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "python {args:?} failed:\n{text}");
    text
}

struct Ca {
    child: Child,
    addr: String,
    metrics: String,
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_ca(dir: &Path) -> Ca {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["ca", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .arg("--cacerts")
        .arg(dir.join("cacerts"))
        .arg("--state")
        .arg(dir.join("state"))
        .args(["--jwt-issuer", ISS, "--jwks"])
        .arg(dir.join("jwks.json"))
        .args(["--max-ttl", "48h", "--reload-interval", "1s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start rampart ca");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("[ca] {line}");
            let _ = tx.send(line);
        }
    });
    let (mut addr, mut metrics) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while addr.is_none() || metrics.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("rampart ca prints where it listens");
        if let Some(rest) = line.strip_prefix("rampart ca: listening on ") {
            addr = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(rest) = line.strip_prefix("rampart ca: metrics on http://") {
            metrics = rest.strip_suffix("/metrics").map(str::to_owned);
        }
        assert!(
            !line.contains("serving root") || line.contains("sha256:"),
            "root fingerprint printed: {line}"
        );
    }
    Ca {
        child,
        addr: addr.unwrap(),
        metrics: metrics.unwrap(),
    }
}

fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Waits until counter `name` reaches at least `min` (a poll may also see a half-written
/// directory and count one more refusal; the requests that follow check the real state).
fn wait_metric(ca: &Ca, name: &str, min: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(&ca.metrics);
        let value = text.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        if value.is_some_and(|v| v >= min) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "metric {name} never reached {min}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn write_cacerts(dir: &Path, signer: &Path, roots: &[&Path]) {
    let cacerts = dir.join("cacerts");
    std::fs::create_dir_all(&cacerts).unwrap();
    // Write to temp names, then rename: the CA never sees a half-written file.
    let put = |name: &str, data: Vec<u8>| {
        let tmp = cacerts.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, data).unwrap();
        std::fs::rename(&tmp, cacerts.join(name)).unwrap();
    };
    put(
        "ca-key.pem",
        std::fs::read(signer.join("ca-key.pem")).unwrap(),
    );
    put(
        "ca-cert.pem",
        std::fs::read(signer.join("ca-cert.pem")).unwrap(),
    );
    put(
        "cert-chain.pem",
        std::fs::read(signer.join("cert-chain.pem")).unwrap(),
    );
    let mut all = Vec::new();
    for r in roots {
        all.extend(std::fs::read(r.join("root-cert.pem")).unwrap());
    }
    put("root-cert.pem", all);
}

fn openssl_verify(roots: &Path, chain_file: &Path) -> bool {
    // chain file: leaf then intermediates.
    let text = std::fs::read_to_string(chain_file).unwrap();
    let end = "-----END CERTIFICATE-----\n";
    let split = text.find(end).unwrap() + end.len();
    let dir = chain_file.parent().unwrap();
    let leaf = dir.join("v-leaf.pem");
    let inter = dir.join("v-inter.pem");
    std::fs::write(&leaf, &text[..split]).unwrap();
    std::fs::write(&inter, &text[split..]).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(roots)
        .arg("-untrusted")
        .arg(&inter)
        .arg(&leaf)
        .output()
        .expect("openssl");
    out.status.success()
}

#[test]
fn python_grpcio_client_against_rampart_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p = |name: &str| d.join(name).to_string_lossy().into_owned();

    // Token issuers (trusted and unknown), and two external CAs: A (ECDSA, SEC1 key) and
    // B (RSA 2048, PKCS#1 key, as Istio's tools make).
    py(&[
        "issuer",
        "--out-key",
        &p("iss.key"),
        "--out-jwks",
        &p("jwks.json"),
    ]);
    py(&[
        "issuer",
        "--out-key",
        &p("evil.key"),
        "--out-jwks",
        &p("evil.jwks"),
    ]);
    py(&["ca", "--name", "A", "--out", &p("A")]);
    py(&["ca", "--name", "B", "--rsa", "--out", &p("B")]);
    let token = |key: &str, iss: &str, sub: &str, exp: &str, file: &str| {
        let t = py(&[
            "token",
            "--key",
            &p(key),
            "--iss",
            iss,
            "--sub",
            sub,
            "--exp-in",
            exp,
        ]);
        std::fs::write(d.join(file), t.trim()).unwrap();
        p(file)
    };
    let good = token(
        "iss.key",
        ISS,
        "system:serviceaccount:default:web",
        "600",
        "good.jwt",
    );
    let expired = token(
        "iss.key",
        ISS,
        "system:serviceaccount:default:web",
        "-3600",
        "expired.jwt",
    );
    let unknown = token(
        "evil.key",
        "https://evil.example",
        "system:serviceaccount:default:web",
        "600",
        "unknown.jwt",
    );

    write_cacerts(d, &d.join("A"), &[&d.join("A")]);
    let ca = start_ca(d);
    let root_a = p("A/root-cert.pem");
    let req = |extra: &[&str]| {
        let mut args = vec!["request", "--addr", ca.addr.as_str(), "--spiffe-id", WEB];
        args.extend_from_slice(extra);
        py(&args)
    };

    // Issued: a chain `openssl verify` accepts against the served root, with the right URI SAN.
    let out = req(&[
        "--root",
        &root_a,
        "--token",
        &good,
        "--ttl",
        "3600",
        "--out-chain",
        &p("web-a.pem"),
        "--out-key",
        &p("web-a.key"),
    ]);
    assert!(out.contains("issued:") && out.contains("chain=3"), "{out}");

    // Refusals, each with a status naming the reason.
    req(&[
        "--root",
        &root_a,
        "--token",
        &good,
        "--csr-id",
        "spiffe://cluster.local/ns/default/sa/db",
        "--expect",
        "PERMISSION_DENIED",
        "--message",
        "SAN mismatch",
    ]);
    req(&[
        "--root",
        &root_a,
        "--token",
        &expired,
        "--expect",
        "UNAUTHENTICATED",
        "--message",
        "token expired",
    ]);
    req(&[
        "--root",
        &root_a,
        "--token",
        &unknown,
        "--expect",
        "UNAUTHENTICATED",
        "--message",
        "unknown issuer",
    ]);
    req(&[
        "--root",
        &root_a,
        "--token",
        &good,
        "--csr-mode",
        "garbage",
        "--expect",
        "INVALID_ARGUMENT",
        "--message",
        "CSR",
    ]);
    req(&[
        "--root",
        &root_a,
        "--token",
        &good,
        "--ttl",
        &(49 * 3600).to_string(),
        "--expect",
        "INVALID_ARGUMENT",
        "--message",
        "TTL too long",
    ]);
    req(&[
        "--root",
        &root_a,
        "--expect",
        "UNAUTHENTICATED",
        "--message",
        "no bearer token",
    ]);

    // Renewal with the client certificate, no token; and its negative twins.
    req(&[
        "--root",
        &root_a,
        "--client-cert",
        &p("web-a.pem"),
        "--client-key",
        &p("web-a.key"),
        "--ttl",
        "600",
    ]);
    req(&[
        "--root",
        &root_a,
        "--client-cert",
        &p("web-a.pem"),
        "--client-key",
        &p("web-a.key"),
        "--csr-id",
        "spiffe://cluster.local/ns/default/sa/db",
        "--expect",
        "PERMISSION_DENIED",
        "--message",
        "SAN mismatch",
    ]);
    req(&[
        "--root",
        &root_a,
        "--foreign-client-cert",
        "--expect",
        "UNAUTHENTICATED",
        "--message",
        "does not verify against the trust bundle",
    ]);

    let audit = std::fs::read_to_string(d.join("state/audit.jsonl")).unwrap();
    assert_eq!(
        audit.lines().count(),
        2,
        "exactly the two issuances are audited:\n{audit}"
    );

    // Hot reload, bad change: B's certificate with A's key. Refused (metric), A keeps signing.
    write_cacerts(d, &d.join("B"), &[&d.join("A"), &d.join("B")]);
    std::fs::copy(d.join("A/ca-key.pem"), d.join("cacerts/ca-key.pem")).unwrap();
    wait_metric(&ca, "citadel_server_cacerts_reload_failure_count ", 1);
    req(&["--root", &root_a, "--token", &good]);

    // Good change, rotation step 1: A signs, the bundle holds A and B. Clients pick it up.
    write_cacerts(d, &d.join("A"), &[&d.join("A"), &d.join("B")]);
    wait_metric(&ca, "citadel_server_cacerts_reload_success_count ", 1);
    req(&[
        "--root",
        &root_a,
        "--token",
        &good,
        "--out-roots",
        &p("bundle-ab.pem"),
    ]);
    let bundle = std::fs::read_to_string(d.join("bundle-ab.pem")).unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");

    // Step 2: B signs. A client holding A+B verifies the new chain (and the CA's new serving
    // certificate); the A-issued certificate still verifies against A+B.
    write_cacerts(d, &d.join("B"), &[&d.join("A"), &d.join("B")]);
    wait_metric(&ca, "citadel_server_cacerts_reload_success_count ", 2);
    req(&[
        "--root",
        &p("bundle-ab.pem"),
        "--token",
        &good,
        "--out-chain",
        &p("web-b.pem"),
    ]);
    assert!(openssl_verify(
        &d.join("bundle-ab.pem"),
        &d.join("web-a.pem")
    ));
    assert!(openssl_verify(
        &d.join("bundle-ab.pem"),
        &d.join("web-b.pem")
    ));
    assert!(!openssl_verify(
        &d.join("A/root-cert.pem"),
        &d.join("web-b.pem")
    ));
    // Renewal with the A certificate still works during the overlap.
    req(&[
        "--root",
        &p("bundle-ab.pem"),
        "--client-cert",
        &p("web-a.pem"),
        "--client-key",
        &p("web-a.key"),
    ]);

    // Step 3: A leaves the bundle: certificates from A are revoked for renewal.
    write_cacerts(d, &d.join("B"), &[&d.join("B")]);
    wait_metric(&ca, "citadel_server_cacerts_reload_success_count ", 3);
    req(&[
        "--root",
        &p("B/root-cert.pem"),
        "--client-cert",
        &p("web-a.pem"),
        "--client-key",
        &p("web-a.key"),
        "--expect",
        "UNAUTHENTICATED",
        "--message",
        "does not verify against the trust bundle",
    ]);
    req(&["--root", &p("B/root-cert.pem"), "--token", &good]);

    let metrics = scrape(&ca.metrics);
    for name in [
        "citadel_server_csr_count ",
        "citadel_server_success_cert_issuance_count ",
        "citadel_server_authentication_failure_count ",
        "citadel_server_root_cert_expiry_seconds ",
        "citadel_server_cert_chain_expiry_seconds ",
        "citadel_server_csr_sign_err_count{error=\"ttl_too_long\"} 1",
    ] {
        assert!(metrics.contains(name), "missing {name:?} in\n{metrics}");
    }
}

/// A node agent's grant must be spelled out: a bare `--node-agent ID` (which used to mean
/// "every workload") is refused at startup naming the fix; the explicit `ID=*` starts.
#[test]
fn bare_node_agent_grant_is_refused_and_explicit_star_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agent = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
    let run = |grant: &str| {
        Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["ca", "--listen", "127.0.0.1:0"])
            .arg("--cacerts")
            .arg(dir.join("cacerts"))
            .arg("--state")
            .arg(dir.join("state"))
            .args(["--node-agent", grant])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rampart ca")
    };
    let out = run(agent).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "bad input exits 2: {err}");
    assert!(
        err.contains("must be explicit") && err.contains(&format!("{agent}=*")),
        "names the fix: {err}"
    );
    assert!(!dir.join("state").exists(), "refused before touching state");

    let mut child = run(&format!("{agent}=*"));
    let stdout = child.stdout.take().unwrap();
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        first.starts_with("rampart ca: listening on "),
        "explicit `*` grant starts: {first:?}"
    );
}
