//! End to end: `rampart up examples/quickstart` (a copy with free ports), driven with curl
//! as the quickstart README does: the documented request succeeds, the denied one gets 403,
//! JWT rules give 401/403/200, TCP policy closes the frontend's database connection, a
//! plaintext hit on an inbound port in PERMISSIVE shows up in `rampart mtls-report`, an
//! invalid edit is reported while the mesh keeps serving, a live switch to STRICT refuses
//! plaintext while mTLS keeps working, and SIGINT stops everything.
//!
//! This needs the CA, the node agent and the proxy in this binary. Until all three are built
//! (their `--help` shows their real flags), the test says which is missing and returns.

mod support;
use support::{Up, collect, processes_mentioning};

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn rampart() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn copy_dir(from: &Path, to: &Path, map: &dyn Fn(&str) -> String) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().filter_map(Result::ok) {
        let p = e.path();
        let dest = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &dest, map);
        } else if p.extension().is_some_and(|x| x == "yaml") {
            std::fs::write(&dest, map(&std::fs::read_to_string(&p).unwrap())).unwrap();
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// Every `127.0.0.1:PORT` of the quickstart mapped to a free port, consistently.
fn remap_ports(dir: &Path) -> BTreeMap<u16, u16> {
    let mut ports = BTreeMap::new();
    for f in ["mesh.yaml", "workloads.yaml"] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        for (i, _) in text.match_indices("127.0.0.1:") {
            let digits: String = text[i + 10..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let p: u16 = digits.parse().unwrap();
            ports.entry(p).or_insert_with(support::free_port);
        }
    }
    ports
}

fn map_text(text: &str, ports: &BTreeMap<u16, u16>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("127.0.0.1:") {
        out.push_str(&rest[..i + 10]);
        rest = &rest[i + 10..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let p: u16 = digits.parse().unwrap();
        out.push_str(&ports[&p].to_string());
        rest = &rest[digits.len()..];
    }
    out.push_str(rest);
    out
}

impl Up {
    fn wait_for(&mut self, what: &str, timeout: Duration, cond: impl Fn(&str, &str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let (o, e) = (self.stdout.lock().unwrap(), self.stderr.lock().unwrap());
                if cond(&o, &e) {
                    return;
                }
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(300));
                panic!(
                    "rampart up exited ({st}) while waiting for {what}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout.lock().unwrap(),
                    self.stderr.lock().unwrap()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout.lock().unwrap(),
                    self.stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `curl` through a proxy (or not); returns (status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl must be installed (.ci/test installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn tcp_echo(port: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(payload);
    let _ = s.shutdown(Shutdown::Write);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

#[test]
fn quickstart_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qs");
    let src = workspace().join("examples/quickstart");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["mesh.yaml", "workloads.yaml"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let ports = remap_ports(&dir);
    copy_dir(&src, &dir, &|t| map_text(t, &ports));
    let p = |orig: u16| ports[&orig];
    let state = tmp.path().join("s");
    // A user with umask 002 (the default for ordinary users on Debian, Ubuntu, Fedora), and
    // a state directory an earlier run left group-writable: `up` makes its directories
    // private, or its agents would refuse the socket directory.
    std::fs::create_dir_all(state.join("sds")).unwrap();
    std::fs::set_permissions(state.join("sds"), std::fs::Permissions::from_mode(0o775)).unwrap();
    // And the folders above it made under that umask: 0775, of the user's own private group
    // (root's here), which the agents accept above their socket directories.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o775)).unwrap();

    let mut child = Command::new("sh")
        .args(["-c", "umask 002 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_rampart"))
        .arg("up")
        .arg(&dir)
        .arg("--state-dir")
        .arg(&state)
        .args(["--ready-timeout", "60s", "--drain-timeout", "10s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (so, se) = (Arc::default(), Arc::default());
    collect(child.stdout.take().unwrap(), Arc::clone(&so));
    collect(child.stderr.take().unwrap(), Arc::clone(&se));
    let mut up = Up {
        child,
        stdout: so,
        stderr: se,
    };
    up.wait_for("the ready table", Duration::from_secs(150), |o, e| {
        o.contains("WORKLOAD") && e.contains("rampart up: ready")
    });
    {
        let table = up.stdout.lock().unwrap().clone();
        for needle in [
            "web/frontend",
            "spiffe://cluster.local/ns/api/sa/backend",
            &format!("8080/http -> 127.0.0.1:{}", p(15180)),
            &format!("5432/tcp -> 127.0.0.1:{}", p(15232)),
            &format!("CA metrics      http://127.0.0.1:{}/metrics", p(15014)),
        ] {
            assert!(table.contains(needle), "table lacks {needle:?}:\n{table}");
        }
    }
    // mesh.yaml's rampart.ca.metrics: the CA's readiness and Istio's citadel metrics.
    let ca_metrics = format!("http://127.0.0.1:{}", p(15014));
    assert_eq!(curl(&[&format!("{ca_metrics}/ready")]).0, 200);
    let (code, metrics) = curl(&[&format!("{ca_metrics}/metrics")]);
    assert_eq!(code, 200);
    assert!(metrics.contains("citadel_server_csr_count"), "{metrics}");
    let outbound = format!("http://127.0.0.1:{}", p(15001));
    let mode = |d: &str| {
        std::fs::metadata(state.join(d))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("sds"), 0o700);
    assert_eq!(mode("tokens"), 0o700);

    // The README's allowed request: 200 from the backend app, with the frontend's identity.
    let (code, body) = curl(&["-x", &outbound, "http://backend.api:8080/api/hello"]);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["service"], "backend");
    assert_eq!(v["path"], "/api/hello");
    let xfcc = v["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or("");
    assert!(
        xfcc.contains("URI=spiffe://cluster.local/ns/web/sa/frontend"),
        "xfcc {xfcc:?}"
    );

    // The README's denied request, and a normalization bypass attempt.
    let (code, body) = curl(&["-x", &outbound, "http://backend.api:8080/admin"]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("RBAC: access denied"), "{body}");
    let (code, _) = curl(&[
        "--path-as-is",
        "-x",
        &outbound,
        "http://backend.api:8080/api/../admin",
    ]);
    assert_eq!(code, 403);
    let (code, _) = curl(&["-x", &outbound, "http://backend.api:8080//admin"]);
    assert_eq!(code, 403);

    // JWT: none -> 403 (no request principal), bad -> 401, good -> 200.
    let post = [
        "-x",
        &outbound,
        "-X",
        "POST",
        "http://backend.api:8080/api/orders",
    ];
    assert_eq!(curl(&post).0, 403);
    let mut bad = post.to_vec();
    bad.extend(["-H", "authorization: Bearer not.a.token"]);
    assert_eq!(curl(&bad).0, 401);
    let token = rampart()
        .args(["token", "issue", "--key"])
        .arg(src.join("jwks/DEMO-ONLY-NOT-SECRET-signing-key.pem"))
        .args([
            "--kid",
            "demo-2026",
            "--issuer",
            "https://demo.rampart.local",
            "--aud",
            "quickstart",
            "--ns",
            "demo",
            "--sa",
            "alice",
        ])
        .output()
        .unwrap();
    assert!(token.status.success());
    let header = format!(
        "authorization: Bearer {}",
        String::from_utf8_lossy(&token.stdout).trim()
    );
    let mut good = post.to_vec();
    good.extend(["-H", header.as_str()]);
    assert_eq!(curl(&good).0, 200);
    // The token `up` minted from mesh.yaml rampart.demoToken works the same.
    assert!(
        up.stdout.lock().unwrap().contains("demo end-user token"),
        "{}",
        up.stdout.lock().unwrap()
    );
    let minted = std::fs::read_to_string(state.join("demo-token.jwt")).unwrap();
    let header = format!("authorization: Bearer {}", minted.trim());
    let mut good = post.to_vec();
    good.extend(["-H", header.as_str()]);
    let (code, body) = curl(&good);
    assert_eq!(code, 200);
    // The verified token is not forwarded (forwardOriginalToken defaults to false): neither
    // its header nor, given as ?access_token=, the query parameter reaches the app; the
    // rest of the query does.
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(seen["headers"].get("authorization").is_none(), "{body}");
    let url = format!(
        "http://backend.api:8080/api/orders?a=1&access_token={}&b=2",
        minted.trim()
    );
    let (code, body) = curl(&["-x", &outbound, "-X", "POST", &url]);
    assert_eq!(code, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["query"], "a=1&b=2", "{body}");
    // Its twin: a bad token in the parameter is still refused.
    let (code, _) = curl(&[
        "-x",
        &outbound,
        "-X",
        "POST",
        "http://backend.api:8080/api/orders?access_token=not.a.token",
    ]);
    assert_eq!(code, 401);

    // TCP: backend -> db allowed (echoed), frontend -> db closed.
    assert_eq!(tcp_echo(p(16532), b"hello db\n"), b"hello db\n");
    assert_eq!(tcp_echo(p(16432), b"hello db\n"), b"");

    // Plaintext straight at the backend's inbound port: accepted in PERMISSIVE (the policy
    // then denies it: no peer identity), and counted as plaintext.
    let (code, _) = curl(&[&format!("http://127.0.0.1:{}/api/hello", p(15180))]);
    assert!(code == 200 || code == 403, "plaintext answer {code}");
    let report = rampart()
        .args(["mtls-report", "--mesh"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&report.stdout);
    assert_eq!(report.status.code(), Some(3), "{text}");
    assert!(
        text.contains(
            "api/backend: NOT safe to switch to STRICT: plaintext on port 8080 from 127.0.0.1"
        ),
        "{text}"
    );

    // An invalid edit is reported; the mesh keeps serving.
    std::fs::write(
        dir.join("policy/broken.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: broken, namespace: api}\nspec: {action: DENY}\n",
    )
    .unwrap();
    up.wait_for(
        "the invalid-edit message",
        Duration::from_secs(20),
        |_, e| e.contains("invalid edit") && e.contains("broken.yaml"),
    );
    let (code, _) = curl(&["-x", &outbound, "http://backend.api:8080/api/hello"]);
    assert_eq!(code, 200);
    // The report still runs while the folder holds a refused edit: it says so, and shows
    // what the proxies serve.
    let report = rampart()
        .args(["mtls-report", "--mesh"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&report.stderr);
    assert_eq!(report.status.code(), Some(3), "{err}");
    assert!(
        err.contains("does not load") && err.contains("broken.yaml"),
        "{err}"
    );
    std::fs::remove_file(dir.join("policy/broken.yaml")).unwrap();

    // The runbook's switch: mesh-wide STRICT, applied live. The mesh keeps working, plaintext
    // is refused, and the report says so.
    let pa = dir.join("policy/mesh-peer-authentication.yaml");
    let text = std::fs::read_to_string(&pa).unwrap();
    assert!(text.contains("mode: PERMISSIVE"));
    std::fs::write(&pa, text.replace("mode: PERMISSIVE", "mode: STRICT")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = rampart()
            .args(["mtls-report", "--mesh"])
            .arg(&dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.matches("already STRICT on every port").count() == 3 {
            assert_eq!(out.status.code(), Some(0), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "STRICT not applied by every proxy within 30s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let (code, _) = curl(&["-x", &outbound, "http://backend.api:8080/api/hello"]);
    assert_eq!(code, 200, "mTLS through the mesh still works under STRICT");
    let (code, body) = curl(&[&format!("http://127.0.0.1:{}/api/hello", p(15180))]);
    assert_eq!(
        code, 0,
        "plaintext must get no HTTP answer under STRICT: {body}"
    );
    // The refused client is named, and the exit status (4) is the signal to fix it or roll
    // back.
    let report = rampart()
        .args(["mtls-report", "--mesh"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&report.stdout);
    assert_eq!(report.status.code(), Some(4), "{text}");
    assert!(
        text.contains(
            "api/backend: already STRICT on every port; plaintext REFUSED on port 8080 from 127.0.0.1"
        ),
        "{text}"
    );

    // SIGINT: everything stops, exit 0, nothing left behind.
    let needle = state.display().to_string();
    assert!(!processes_mentioning(&needle).is_empty());
    let pid = rustix::process::Pid::from_raw(up.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = up.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "rampart up did not stop within 60s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0), "{}", up.stderr.lock().unwrap());
    std::thread::sleep(Duration::from_millis(200));
    let left = processes_mentioning(&needle);
    assert!(left.is_empty(), "left running: {left:?}");
    for port in [
        p(15001),
        p(15180),
        p(18080),
        p(18180),
        p(18232),
        p(15012),
        p(15014),
    ] {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still accepts after shutdown"
        );
    }
}

/// Start `rampart up DIR --state-dir STATE` and wait for its ready table.
fn start_up(dir: &Path, state: &Path) -> Up {
    let mut child = rampart()
        .arg("up")
        .arg(dir)
        .arg("--state-dir")
        .arg(state)
        .args(["--ready-timeout", "60s", "--drain-timeout", "10s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (so, se) = (Arc::default(), Arc::default());
    collect(child.stdout.take().unwrap(), Arc::clone(&so));
    collect(child.stderr.take().unwrap(), Arc::clone(&se));
    let mut up = Up {
        child,
        stdout: so,
        stderr: se,
    };
    up.wait_for("the ready table", Duration::from_secs(150), |o, e| {
        o.contains("WORKLOAD") && e.contains("rampart up: ready")
    });
    up
}

/// SIGINT, then wait for exit 0.
fn interrupt(up: &mut Up) {
    let pid = rustix::process::Pid::from_raw(up.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = up.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "rampart up did not stop in 60s");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0), "{}", up.stderr.lock().unwrap());
}

/// sha256 of the DER of every certificate in a PEM file.
fn fingerprints(path: &Path) -> Vec<String> {
    let pem = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    rampart_certs::parse_certs_pem(&pem)
        .unwrap()
        .iter()
        .map(|c| {
            rampart_certs::CertInfo::parse(c)
                .unwrap()
                .sha256_fingerprint
        })
        .collect()
}

/// The README's main command run twice on the same state (Ctrl-C in between): the second run
/// starts, keeps the self-signed root (same fingerprint) and serves calls. It used to fail
/// with `ca/root-cert.pem: No such file`, because `up` pointed the CA's `--bundle-out` at the
/// CA's own persisted root and deleted it before each start.
#[test]
fn quickstart_restart_keeps_the_root_and_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qs");
    let src = workspace().join("examples/quickstart");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["mesh.yaml", "workloads.yaml"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let ports = remap_ports(&dir);
    copy_dir(&src, &dir, &|t| map_text(t, &ports));
    let state = tmp.path().join("s");
    let outbound = format!("http://127.0.0.1:{}", ports[&15001]);
    let root_file = state.join("ca/root-cert.pem");

    let mut up = start_up(&dir, &state);
    let (code, body) = curl(&["-x", &outbound, "http://backend.api:8080/api/hello"]);
    assert_eq!(code, 200, "first run: {body}");
    let root = fingerprints(&root_file);
    assert_eq!(root.len(), 1, "one self-signed root");
    let bundle = state.join("trust-bundle.pem");
    assert_eq!(
        fingerprints(&bundle),
        root,
        "the agents' bundle is that root"
    );
    interrupt(&mut up);
    assert!(root_file.exists(), "the root survives the shutdown");

    let mut up = start_up(&dir, &state);
    assert_eq!(
        fingerprints(&root_file),
        root,
        "same root after the restart"
    );
    assert_eq!(fingerprints(&bundle), root);
    let (code, body) = curl(&["-x", &outbound, "http://backend.api:8080/api/hello"]);
    assert_eq!(code, 200, "second run: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["service"], "backend");
    interrupt(&mut up);
}
