//! `rampart up DIR`: registry edits start, stop and restart workloads live.
//!
//! One `rampart up` (real CA, node agents, proxies, `rampart echo` apps) with one workload;
//! then, while it runs: a workload is added (it gets its certificate from the CA through its
//! own agent, shown by its proxy's `/certs`, and answers through the mesh over mTLS, its table
//! line printed); an invalid registry edit (and an emptied one) is refused with file, field
//! and reason and nothing is touched; a changed command restarts that app, a changed admin
//! address the proxy, a changed service account all three (new identity); a workload whose
//! proxy cannot start (address in use) is stopped again while the rest keeps running; a
//! removed workload's app, proxy and agent exit; Ctrl-C still stops everything, including
//! what was started live.

mod support;
use support::{Up, collect, free_port, processes_mentioning, write_atomic};

use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Up {
    fn err(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn out(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn wait_for(&mut self, what: &str, timeout: Duration, cond: impl Fn(&str, &str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(&self.out(), &self.err()) {
                return;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(300));
                panic!(
                    "rampart up exited ({st}) while waiting for {what}\nstdout:\n{}\nstderr:\n{}",
                    self.out(),
                    self.err()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nstdout:\n{}\nstderr:\n{}",
                self.out(),
                self.err()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn pids_mentioning(needle: &str) -> Vec<String> {
    processes_mentioning(needle)
        .into_iter()
        .map(|l| l.split(':').next().unwrap().to_string())
        .collect()
}

/// A workload with one HTTP port, a `rampart echo` app, and an admin (+ outbound) listener.
struct W {
    name: &'static str,
    ns: &'static str,
    port: u16,
    app: u16,
    inbound: u16,
    admin: u16,
    outbound: Option<u16>,
    echo_name: &'static str,
    service_account: Option<&'static str>,
}

impl W {
    fn new(name: &'static str, ns: &'static str, port: u16, outbound: bool) -> W {
        W {
            name,
            ns,
            port,
            app: free_port(),
            inbound: free_port(),
            admin: free_port(),
            outbound: outbound.then(free_port),
            echo_name: name,
            service_account: None,
        }
    }

    fn yaml(&self) -> String {
        let out = self
            .outbound
            .map(|o| format!(", outbound: \"127.0.0.1:{o}\""))
            .unwrap_or_default();
        let sa = self
            .service_account
            .map(|s| format!("  serviceAccount: {s}\n"))
            .unwrap_or_default();
        format!(
            "- name: {}
  namespace: {}
{sa}  ports:
  - {{port: {}, protocol: http, app: \"127.0.0.1:{}\", inbound: \"127.0.0.1:{}\"}}
  command: [rampart, echo, --listen, \"127.0.0.1:{}\", --name, {}]
  proxy: {{admin: \"127.0.0.1:{}\"{out}}}
",
            self.name,
            self.ns,
            self.port,
            self.app,
            self.inbound,
            self.app,
            self.echo_name,
            self.admin
        )
    }
}

fn registry(ws: &[&W]) -> String {
    let mut s = "workloads:\n".to_string();
    for w in ws {
        s.push_str(&w.yaml());
    }
    s
}

#[test]
fn registry_edits_start_stop_and_restart_workloads_live() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    let state = tmp.path().join("s");
    let ca = free_port();
    std::fs::write(
        dir.join("mesh.yaml"),
        format!("trustDomain: cluster.local\nrampart: {{ca: {{listen: 127.0.0.1:{ca}}}}}\n"),
    )
    .unwrap();
    let mut a = W::new("a", "ns1", 80, true);
    let mut b = W::new("b", "ns2", 8080, false);
    let c = W::new("c", "ns3", 8081, false);
    let workloads = dir.join("workloads.yaml");
    write_atomic(&workloads, &registry(&[&a]));

    let mut child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .arg("up")
        .arg(&dir)
        .arg("--state-dir")
        .arg(&state)
        .args(["--ready-timeout", "60s", "--drain-timeout", "5s"])
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
    up.wait_for("the ready table", Duration::from_secs(120), |o, e| {
        o.contains("WORKLOAD") && e.contains("rampart up: ready")
    });
    let outbound = format!("http://127.0.0.1:{}", a.outbound.unwrap());

    // --- add workload ns2/b: agent, app and proxy start; it has its certificate; it answers
    // through the mesh over mTLS with a's identity in x-forwarded-client-cert ---
    write_atomic(&workloads, &registry(&[&a, &b]));
    up.wait_for("ns2/b running", Duration::from_secs(60), |_, e| {
        e.contains("rampart up: workload ns2/b is running")
    });
    let err = up.err();
    assert!(
        err.contains(
            "workload ns2/b added to workloads.yaml: starting its node agent, app and proxy"
        ),
        "{err}"
    );
    // The edit is named by the file it touched.
    assert!(
        err.contains("rampart up: workloads.yaml changed: valid ("),
        "{err}"
    );
    let out = up.out();
    assert!(
        out.contains(&format!("8080/http -> 127.0.0.1:{}", b.inbound)),
        "no table line for ns2/b:\n{out}"
    );
    let (code, certs) = curl(&[&format!("http://127.0.0.1:{}/certs", b.admin)]);
    assert_eq!(code, 200, "{certs}");
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(certs["spiffe_id"], "spiffe://cluster.local/ns/ns2/sa/b");
    let (code, body) = curl(&["-x", &outbound, "http://b.ns2:8080/hello"]);
    assert_eq!(code, 200, "{body}\n{}", up.err());
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["service"], "b");
    assert!(
        v["headers"]["x-forwarded-client-cert"]
            .as_str()
            .unwrap_or_default()
            .contains("URI=spiffe://cluster.local/ns/ns1/sa/a"),
        "{body}"
    );
    let b_pids = pids_mentioning("ns2.b.sock");
    assert_eq!(b_pids.len(), 2, "agent and proxy of b: {b_pids:?}");

    // --- an invalid registry edit is refused, naming file, field and reason; nothing moves ---
    let good = registry(&[&a, &b]);
    write_atomic(
        &workloads,
        &good.replace("port: 8080, protocol: http", "port: 8080, protocol: smtp"),
    );
    up.wait_for("refusal", Duration::from_secs(20), |_, e| {
        e.contains("invalid edit in")
    });
    let err = up.err();
    assert!(
        err.contains("workloads.yaml: workloads[1].ports[0].protocol")
            && err.contains("smtp")
            && err.contains(
                "nothing was started or stopped; the running mesh keeps its last good config"
            ),
        "{err}"
    );
    assert_eq!(curl(&["-x", &outbound, "http://b.ns2:8080/still"]).0, 200);
    assert_eq!(pids_mentioning("ns2.b.sock"), b_pids);
    // An emptied registry (a truncated save) does not stop the whole mesh either.
    write_atomic(&workloads, "workloads: []\n");
    up.wait_for("second refusal", Duration::from_secs(20), |_, e| {
        e.matches("invalid edit in").count() >= 2
    });
    assert!(up.err().contains("declares no workloads"), "{}", up.err());
    assert_eq!(curl(&["-x", &outbound, "http://b.ns2:8080/still"]).0, 200);
    assert_eq!(pids_mentioning("ns2.b.sock"), b_pids);
    write_atomic(&workloads, &good);
    up.wait_for("valid again", Duration::from_secs(20), |_, e| {
        e.matches("changed: valid").count() >= 2
    });

    // --- a changed command restarts that app (and only it) ---
    let app_a_before = pids_mentioning(&format!("--listen 127.0.0.1:{}", a.app));
    assert_eq!(app_a_before.len(), 1, "{app_a_before:?}");
    a.echo_name = "a2";
    write_atomic(&workloads, &registry(&[&a, &b]));
    up.wait_for("app a restarted", Duration::from_secs(60), |_, e| {
        e.contains("rampart up: workload ns1/a restarted")
    });
    assert!(
        up.err()
            .contains("rampart up: workload ns1/a: command changed: restarting its app"),
        "{}",
        up.err()
    );
    let (code, body) = curl(&[&format!("http://127.0.0.1:{}/x", a.inbound)]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["service"],
        "a2"
    );
    assert_ne!(
        pids_mentioning(&format!("--listen 127.0.0.1:{}", a.app)),
        app_a_before
    );
    assert_eq!(pids_mentioning("ns2.b.sock"), b_pids, "b was not touched");

    // --- a workload whose proxy cannot start (its inbound address is taken) is stopped
    // again, app and agent included; the rest keeps running ---
    let squatter = TcpListener::bind(("127.0.0.1", c.inbound)).unwrap();
    write_atomic(&workloads, &registry(&[&a, &b, &c]));
    up.wait_for("ns3/c refused to start", Duration::from_secs(90), |_, e| {
        e.contains("rampart up: workload ns3/c could not start")
    });
    let err = up.err();
    assert!(
        err.contains("the rest of the mesh keeps running; save workloads.yaml again to retry"),
        "{err}"
    );
    assert!(err.contains("proxy ns3/c exited"), "{err}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(processes_mentioning("ns3.c.sock").is_empty());
    assert!(processes_mentioning(&format!("--listen 127.0.0.1:{}", c.app)).is_empty());
    assert_eq!(curl(&["-x", &outbound, "http://b.ns2:8080/after-c"]).0, 200);
    drop(squatter);

    // --- a changed proxy.admin restarts b's proxy (only) ---
    let old_admin = b.admin;
    b.admin = free_port();
    write_atomic(&workloads, &registry(&[&a, &b]));
    up.wait_for("b's proxy restarted", Duration::from_secs(60), |_, e| {
        e.contains("rampart up: workload ns2/b: proxy.admin changed")
            && e.contains("rampart up: workload ns2/b restarted")
    });
    assert_eq!(
        curl(&[&format!("http://127.0.0.1:{}/ready", b.admin)]).0,
        200
    );
    assert!(TcpStream::connect(("127.0.0.1", old_admin)).is_err());
    let out = up.out();
    assert!(
        out.lines()
            .any(|l| l.starts_with("ns2/b ") && l.ends_with(&format!("127.0.0.1:{}", b.admin))),
        "no updated table line for ns2/b:\n{out}"
    );
    assert_eq!(
        curl(&["-x", &outbound, "http://b.ns2:8080/new-admin"]).0,
        200
    );

    // --- a changed serviceAccount restarts b's agent, app and proxy under the new identity ---
    b.service_account = Some("b-sa");
    write_atomic(&workloads, &registry(&[&a, &b]));
    up.wait_for("b restarted as b-sa", Duration::from_secs(60), |_, e| {
        e.contains("serviceAccount changed (b -> b-sa)")
            && e.matches("rampart up: workload ns2/b restarted").count() >= 2
    });
    let (_, certs) = curl(&[&format!("http://127.0.0.1:{}/certs", b.admin)]);
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(certs["spiffe_id"], "spiffe://cluster.local/ns/ns2/sa/b-sa");
    let (code, body) = curl(&["-x", &outbound, "http://b.ns2:8080/new-identity"]);
    assert_eq!(code, 200, "{body}\n{}", up.err());

    // --- remove ns2/b (and c): its app, proxy and agent exit; a keeps serving ---
    write_atomic(&workloads, &registry(&[&a]));
    up.wait_for("ns2/b stopped", Duration::from_secs(30), |_, e| {
        e.contains("rampart up: workload ns2/b stopped")
    });
    assert!(
        up.err().contains(
            "rampart up: workload ns2/b removed from workloads.yaml: stopping its app, proxy and node agent"
        ),
        "{}",
        up.err()
    );
    assert!(
        !up.err().contains("workload ns3/c removed"),
        "c never ran, so it is not stopped: {}",
        up.err()
    );
    let left: Vec<String> = processes_mentioning("ns2.b.sock")
        .into_iter()
        .chain(processes_mentioning(&format!(
            "--listen 127.0.0.1:{}",
            b.app
        )))
        .collect();
    assert!(left.is_empty(), "b left running: {left:?}");
    assert!(TcpStream::connect(("127.0.0.1", b.inbound)).is_err());
    assert!(TcpStream::connect(("127.0.0.1", b.app)).is_err());
    assert!(!up.err().contains("exited unexpectedly"), "{}", up.err());
    let (code, body) = curl(&[&format!("http://127.0.0.1:{}/y", a.inbound)]);
    assert_eq!(code, 200, "{body}");

    // --- a policy edit that loads but warns is as loud as at start; a warning is printed
    // once, not again on every later edit; an edit without warnings prints none ---
    const TCP_WARNING: &str = "will deny all traffic to TCP ports under its scope";
    std::fs::create_dir_all(dir.join("policy")).unwrap();
    write_atomic(
        &dir.join("policy/deny-delete.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-delete, namespace: nsx}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
",
    );
    up.wait_for("the warning edit", Duration::from_secs(30), |_, e| {
        e.contains("policy/deny-delete.yaml changed: valid")
    });
    up.wait_for("its warning", Duration::from_secs(5), |_, e| {
        e.contains(TCP_WARNING)
    });
    let err = up.err();
    let line = err.lines().find(|l| l.contains(TCP_WARNING)).unwrap();
    assert!(
        line.starts_with("rampart up: warning: ") && line.contains("deny-delete.yaml"),
        "{line}"
    );
    write_atomic(
        &dir.join("policy/peer.yaml"),
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: nsx}
spec: {mtls: {mode: PERMISSIVE}}
",
    );
    up.wait_for("the quiet edit", Duration::from_secs(30), |_, e| {
        e.contains("policy/peer.yaml changed: valid")
    });
    std::thread::sleep(Duration::from_millis(300));
    let err = up.err();
    assert_eq!(err.matches(TCP_WARNING).count(), 1, "{err}");
    let after = &err[err.find("policy/peer.yaml changed").unwrap()..];
    assert!(!after.contains("warning"), "{after}");
    // A CUSTOM policy naming a provider mesh.yaml does not define: the proxies would deny
    // what it matches (fail closed); `up` names the file and the provider.
    write_atomic(
        &dir.join("policy/custom.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: ns1}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {paths: [/admin*]}}]}]
",
    );
    up.wait_for(
        "the CUSTOM edit's warning",
        Duration::from_secs(30),
        |_, e| {
            e.lines().any(|l| {
                l.starts_with("rampart up: warning: custom.yaml")
                    || (l.starts_with("rampart up: warning: ") && l.contains("policy/custom.yaml"))
            }) && e.contains("\"opa\"")
        },
    );

    // --- Ctrl-C stops everything, including the children started live ---
    let pid = rustix::process::Pid::from_raw(up.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = up.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "up did not stop after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status.code(), Some(0), "{}", up.err());
    let left = processes_mentioning(&state.display().to_string());
    assert!(left.is_empty(), "left running: {left:?}");
    assert!(
        processes_mentioning(&format!("--listen 127.0.0.1:{}", a.app)).is_empty(),
        "app a left running"
    );
}
