//! `rampart agent` (the real binary) against `rampart ca` (the real binary), with clients we
//! did not write: Python grpcio + xds-protos as an Envoy-style SDS client and py-spiffe on the
//! Workload API; `rampart secrets` printing what is served; and the faults that do not need
//! a misbehaving CA (CA stopped and restarted mid-life, agent killed and restarted). The
//! faults that need a CA to misbehave (wrong SAN) or root rotation with a hand-driven CA
//! are in node-agent/tests/agent.rs against an in-process fake CA.
//!
//! Needs the Python venv (`.ci/test` builds it at target/py, or set RAMPART_PYTHON).

mod support;
use support::python;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ISS: &str = "https://kubernetes.default.svc.cluster.local";
const ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";

fn rampart() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
}

/// Run a node-agent Python client script; its JSON lines.
fn py(script: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("node-agent/tests/py")
        .join(script);
    let mut child = Command::new(python())
        .arg(&path)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{script} did not finish within 60s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn event<'a>(lines: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|l| l["event"] == name)
        .unwrap_or_else(|| panic!("no {name:?} in {lines:#?}"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `rampart ca` on `listen`; returns it and the address it prints.
fn start_ca(dir: &Path, listen: &str) -> (Proc, String) {
    let mut ca = Proc(
        rampart()
            .args(["ca", "--listen", listen])
            .arg("--cacerts")
            .arg(dir.join("cacerts"))
            .arg("--state")
            .arg(dir.join("state"))
            .args(["--jwt-issuer", ISS, "--jwks"])
            .arg(dir.join("jwks.json"))
            .arg("--bundle-out")
            .arg(dir.join("bundle.pem"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rampart ca"),
    );
    let stdout = ca.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("rampart ca prints where it listens");
        if let Some(rest) = line.strip_prefix("rampart ca: listening on ") {
            let addr = rest.split_whitespace().next().unwrap().to_owned();
            return (ca, addr);
        }
    }
}

fn free_port() -> String {
    format!("127.0.0.1:{}", support::free_port())
}

fn start_agent(dir: &Path, ca_addr: &str, metrics: &str) -> Proc {
    start_agent_ttl(dir, ca_addr, metrics, "10s")
}

fn start_agent_ttl(dir: &Path, ca_addr: &str, metrics: &str, ttl: &str) -> Proc {
    let child = rampart()
        .args(["agent", "--ca-addr", ca_addr, "--ca-root"])
        .arg(dir.join("bundle.pem"))
        .arg("--token")
        .arg(dir.join("token"))
        .arg("--sds-socket")
        .arg(dir.join("sds/socket"))
        .arg("--workload-api-socket")
        .arg(dir.join("wapi/socket"))
        .arg("--output-dir")
        .arg(dir.join("out"))
        .args(["--ttl", ttl, "--metrics", metrics, "--max-backoff", "1s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rampart agent");
    Proc(child)
}

fn secrets_json(dir: &Path) -> Option<serde_json::Value> {
    let out = rampart()
        .args(["secrets", "--json", "--timeout", "3s", "--sds-socket"])
        .arg(dir.join("sds/socket"))
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn leaf_serial(v: &serde_json::Value) -> String {
    let d = v
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "default")
        .unwrap();
    d["certificates"][0]["serial"].as_str().unwrap().to_owned()
}

fn wait_secrets(dir: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = secrets_json(dir) {
            return v;
        }
        assert!(Instant::now() < deadline, "agent never served secrets");
        std::thread::sleep(Duration::from_millis(100));
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

fn setup(dir: &Path) {
    let key = dir.join("signing-key.pem");
    run_ok(rampart().args(["token", "keygen", "--out"]).arg(&key));
    let jwks = run_ok(rampart().args(["token", "jwks", "--key"]).arg(&key));
    std::fs::write(dir.join("jwks.json"), jwks).unwrap();
    let token = run_ok(rampart().args(["token", "issue", "--key"]).arg(&key).args([
        "--issuer", ISS, "--ns", "shop", "--sa", "cart", "--ttl", "1h",
    ]));
    std::fs::write(dir.join("token"), token.trim()).unwrap();
}

#[test]
fn agent_with_real_ca_serves_sds_and_workload_api_and_survives_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let (mut ca, ca_addr) = start_ca(dir, "127.0.0.1:0");
    let metrics = free_port();
    let mut agent = start_agent(dir, &ca_addr, &metrics);

    // `rampart secrets` shows what is served.
    let first = wait_secrets(dir);
    let text = run_ok(
        rampart()
            .args(["secrets", "--sds-socket"])
            .arg(dir.join("sds/socket")),
    );
    assert!(
        text.contains(ID) && text.contains("Cert Chain") && text.contains("ROOTCA"),
        "{text}"
    );
    let bundle = std::fs::read_to_string(dir.join("bundle.pem")).unwrap();
    let roots = first
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "ROOTCA")
        .unwrap();
    assert_eq!(
        roots["certificates"].as_array().unwrap().len(),
        bundle.matches("BEGIN CERTIFICATE").count()
    );

    // Envoy-style SDS client (grpcio + xds-protos): default + ROOTCA, then a pushed rotation.
    let sock = dir.join("sds/socket");
    let lines = py("sds_client.py", &[sock.to_str().unwrap(), "rotate"]);
    let f = event(&lines, "first");
    assert_eq!(f["secrets"]["default"]["uris"], serde_json::json!([ID]));
    assert_eq!(f["secrets"]["default"]["key_matches"], true);
    let p = event(&lines, "pushed");
    assert_ne!(
        p["secrets"]["default"]["serial"],
        f["secrets"]["default"]["serial"]
    );
    assert!(event(&lines, "after_nack")["responses"].as_u64().unwrap() <= 1);

    // py-spiffe on the Workload API.
    let wsock = dir.join("wapi/socket");
    let lines = py("workload_client.py", &[wsock.to_str().unwrap()]);
    assert_eq!(event(&lines, "svid")["spiffe_id"], ID);
    assert_eq!(event(&lines, "svid")["key_matches"], true);
    assert_eq!(event(&lines, "no_header")["code"], "INVALID_ARGUMENT");

    // Metrics.
    let m = scrape(&metrics);
    assert!(m.contains("rampart_agent_cert_expiry_seconds{spiffe_id=\"spiffe://cluster.local/ns/shop/sa/cart\"}"), "{m}");
    assert!(m.contains("rampart_agent_cert_rotations_total"), "{m}");

    // CA stopped mid-life: stop it right after a renewal, so the served certificate has
    // about 10 s left; wait past its refresh point (~5 s): still served, no renewal.
    let before = leaf_serial(&wait_secrets(dir));
    let deadline = Instant::now() + Duration::from_secs(15);
    let fresh = loop {
        let s = leaf_serial(&wait_secrets(dir));
        if s != before {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no renewal of a 10 s certificate"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(ca);
    std::thread::sleep(Duration::from_secs(6));
    let during = secrets_json(dir).expect("still serving while the CA is down");
    assert_eq!(
        leaf_serial(&during),
        fresh,
        "the current certificate is kept"
    );
    let d = during
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "default")
        .unwrap();
    assert_eq!(d["certificates"][0]["valid"], true, "and it is valid");
    assert!(scrape(&metrics).contains("reason=\"unreachable\""));
    // ... and renewal resumes when the CA returns (same address, state dir and root).
    let (ca2, _) = start_ca(dir, &ca_addr);
    ca = ca2;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = secrets_json(dir)
            && leaf_serial(&v) != fresh
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no renewal after the CA came back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Agent killed (stale socket left behind) and restarted: clients reconnect and get certs.
    let _ = agent.0.kill();
    let _ = agent.0.wait();
    assert!(sock.exists(), "SIGKILL leaves the socket file");
    agent = start_agent(dir, &ca_addr, &free_port());
    let again = wait_secrets(dir);
    assert!(!leaf_serial(&again).is_empty());
    let lines = py("workload_client.py", &[wsock.to_str().unwrap()]);
    assert_eq!(event(&lines, "svid")["spiffe_id"], ID);
    drop(agent);
    drop(ca);
}

#[test]
fn agent_and_secrets_bad_input_exit_2_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("root.pem");
    std::fs::write(&root, "not used").unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "a.eyJzdWIiOiJhbGljZSJ9.c").unwrap(); // sub: alice
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "agent".into(),
                "--ca-root".into(),
                root.display().to_string(),
            ],
            "--token",
        ),
        (
            vec![
                "agent".into(),
                "--ca-root".into(),
                dir.join("missing.pem").display().to_string(),
                "--token".into(),
                token.display().to_string(),
            ],
            "--ca-root",
        ),
        (
            vec![
                "agent".into(),
                "--ca-root".into(),
                root.display().to_string(),
                "--token".into(),
                token.display().to_string(),
            ],
            "system:serviceaccount",
        ),
        (
            vec![
                "agent".into(),
                "--ca-root".into(),
                root.display().to_string(),
                "--token".into(),
                token.display().to_string(),
                "--namespace".into(),
                "a".into(),
                "--service-account".into(),
                "b".into(),
                "--grace-ratio".into(),
                "1.5".into(),
            ],
            "grace-ratio",
        ),
        (
            // Every local user could fetch the key: refused (600 and 660 only).
            vec![
                "agent".into(),
                "--ca-root".into(),
                root.display().to_string(),
                "--token".into(),
                token.display().to_string(),
                "--namespace".into(),
                "a".into(),
                "--service-account".into(),
                "b".into(),
                "--socket-mode".into(),
                "666".into(),
            ],
            "lets every local user connect",
        ),
        (
            vec![
                "agent".into(),
                "--ca-root".into(),
                root.display().to_string(),
                "--workload".into(),
                "sds=/x".into(),
            ],
            "token=FILE",
        ),
        (
            vec![
                "secrets".into(),
                "--sds-socket".into(),
                dir.join("nope.sock").display().to_string(),
            ],
            "no such socket",
        ),
    ];
    for (args, reason) in cases {
        let out = rampart().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
}

/// Short TTLs renew near half-life, not in a loop (issue: a 5-minute backdate made ztunnel,
/// which renews at not-before + half the lifetime, renew any certificate of 5 minutes or
/// less on receipt, ~220 issuances in 8 s). 60 s certificates for 5 minutes, from the real
/// CA to the real agent: the CA's audit log counts the issuances for the identity, close to
/// 5 min / 30 s. Each certificate is backdated by a tenth of its life (6 s), so ztunnel's rule
/// (not-before + half) also lands 24 s after issuance; certs/src/authority.rs checks that
/// arithmetic for every lifetime.
#[test]
fn sixty_second_certificates_renew_near_half_life_for_five_minutes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let (_ca, ca_addr) = start_ca(dir, "127.0.0.1:0");
    let metrics = free_port();
    let _agent = start_agent_ttl(dir, &ca_addr, &metrics, "60s");
    let first = wait_secrets(dir);
    let leaf = first
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "default")
        .unwrap()["certificates"][0]
        .clone();
    let ts = |k: &str| {
        let v = leaf[k].as_str().unwrap_or_else(|| panic!("{k} in {leaf}"));
        humantime::parse_rfc3339(v).unwrap_or_else(|e| panic!("{k} {v}: {e}"))
    };
    let life = ts("not_after").duration_since(ts("not_before")).unwrap();
    assert!(
        life >= Duration::from_secs(60) && life <= Duration::from_secs(67),
        "60 s plus a backdate of at most a tenth: {life:?}"
    );

    let audit = dir.join("state/audit.jsonl");
    let issued = || {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .filter(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["spiffe_id"] == ID)
            .count()
    };
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_secs(10));
        let n = issued();
        seen.push(n);
        // Never a loop: at most one issuance per 20 s of run (plus the first).
        assert!(
            n <= 2 + start.elapsed().as_secs() as usize / 20,
            "renewing too often: {n} issuances after {:?} ({seen:?})",
            start.elapsed()
        );
    }
    let n = issued();
    // 1 at start + one every ~27-30 s (half-life minus up to 10% jitter): about 11.
    assert!(
        (9..=13).contains(&n),
        "{n} issuances of 60 s certificates in 5 min ({seen:?})"
    );
}

/// `rampart secrets` is a client: a path where nothing listens says the system's reason
/// (it read "cannot listen on ...: transport error"); a missing path says so. No agent is
/// needed for either.
#[test]
fn secrets_names_why_a_socket_cannot_be_asked() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("not-a-socket");
    std::fs::write(&file, "x").unwrap();
    let out = rampart()
        .args(["secrets", "--timeout", "2s", "--sds-socket"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("asking {}", file.display())) && err.contains("refused"),
        "{err}"
    );
    assert!(!err.contains("cannot listen"), "{err}");
    let out = rampart()
        .args(["secrets", "--sds-socket"])
        .arg(d.path().join("missing"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("no such socket"), "{err}");
}

/// Under a umask of 077 (systemd's `UMask=0077`) the directories the agent makes for its
/// socket and its output are still 0755, as NODE_AGENT.md says (they came out 0700, which
/// a 0660 socket's group cannot pass). No CA is needed: the socket is bound and the output
/// directory made before the first certificate is asked for.
#[test]
fn directories_the_agent_makes_are_0755_under_umask_077() {
    use std::os::unix::fs::PermissionsExt as _;
    let d = tempfile::tempdir().unwrap();
    setup(d.path());
    let ca = format!("127.0.0.1:{}", free_port());
    let root = rampart()
        .args(["certs", "root", "--out"])
        .arg(d.path().join("root"))
        .output()
        .unwrap();
    assert!(root.status.success(), "{root:?}");
    let child = Command::new("sh")
        .args(["-c", "umask 077 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_rampart"))
        .args(["agent", "--ca-addr", &ca, "--ca-root"])
        .arg(d.path().join("root/root-cert.pem"))
        .arg("--token")
        .arg(d.path().join("token"))
        .arg("--sds-socket")
        .arg(d.path().join("run/a/sds.sock"))
        .arg("--output-dir")
        .arg(d.path().join("out/a"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _agent = Proc(child);
    let sock = d.path().join("run/a/sds.sock");
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(sock.exists(), "the agent did not bind its socket");
    for dir in ["run", "run/a", "out", "out/a"] {
        let mode = std::fs::metadata(d.path().join(dir))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o755, "{dir}: {mode:o}");
    }
}
