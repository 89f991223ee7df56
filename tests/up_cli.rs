//! `rampart up DIR`: input checks and failure handling that need no running mesh. The full
//! mesh (CA, agents, proxies, apps) is exercised in `quickstart_e2e.rs`.

mod support;
use support::processes_mentioning;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn rampart_up(dir: &Path, state: &Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .arg("up")
        .arg(dir)
        .arg("--state-dir")
        .arg(state)
        .args(["--ready-timeout", "30s", "--drain-timeout", "5s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bound the run: `up` must give up on its own well before this.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("rampart up did not exit within 90s: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn folder(mesh: &str, workloads: &str, policy: Option<&str>) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("mesh.yaml"), mesh).unwrap();
    std::fs::write(d.path().join("workloads.yaml"), workloads).unwrap();
    if let Some(p) = policy {
        std::fs::create_dir(d.path().join("policy")).unwrap();
        std::fs::write(d.path().join("policy/bad.yaml"), p).unwrap();
    }
    d
}

const ONE_WORKLOAD: &str = "workloads:
- name: a
  namespace: ns1
  ports: [{port: 80, protocol: http, app: 127.0.0.1:1, inbound: 127.0.0.1:2}]
  proxy: {outbound: 127.0.0.1:3, admin: 127.0.0.1:4}
";

#[test]
fn invalid_policy_is_refused_before_anything_starts() {
    let d = folder(
        "",
        ONE_WORKLOAD,
        Some(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-nothing, namespace: ns1}\nspec: {action: DENY}\n",
        ),
    );
    let state = tempfile::tempdir().unwrap();
    let out = rampart_up(d.path(), state.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("policy/bad.yaml"), "{err}");
    assert!(err.contains("DENY action without `rules`"), "{err}");
    // Nothing was started.
    assert!(!state.path().join("logs").exists(), "{err}");
}

#[test]
fn bad_registry_and_clashing_addresses_are_refused() {
    let state = tempfile::tempdir().unwrap();
    let d = folder(
        "",
        "workloads:\n- {name: a, namespace: ns1, proxy: {admin: nowhere}}\n",
        None,
    );
    let out = rampart_up(d.path(), state.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("workloads[0].proxy.admin"));

    let d = folder(
        "",
        "workloads:\n- {name: a, namespace: ns1, proxy: {admin: 127.0.0.1:7000}}\n- {name: b, namespace: ns1, proxy: {admin: 127.0.0.1:7000}}\n",
        None,
    );
    let out = rampart_up(d.path(), state.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("127.0.0.1:7000"), "{err}");
    assert!(err.contains("proxy.admin"), "{err}");

    let d = folder("rampart: {ca: {listen: here}}\n", ONE_WORKLOAD, None);
    let out = rampart_up(d.path(), state.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rampart.ca.listen"));
}

#[test]
fn a_child_that_dies_is_named_with_its_status_and_log_and_the_rest_is_stopped() {
    // The CA's cacerts directory (the state dir's default) holds no certificate, so the CA
    // exits at start: `up` must say so and stop.
    let port = support::free_port();
    let d = folder(
        &format!(
            "rampart:\n  ca: {{listen: 127.0.0.1:{port}}}\n  demoToken: {{key: demo.pem, kid: k1, issuer: https://demo.example, audience: demo, namespace: people, serviceAccount: alice}}\n"
        ),
        &free_workload(),
        None,
    );
    let keygen = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["token", "keygen", "--out"])
        .arg(d.path().join("demo.pem"))
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{keygen:?}");
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir(state.path().join("cacerts")).unwrap();
    std::fs::write(
        state.path().join("cacerts/ca-cert.pem"),
        "not a certificate\n",
    )
    .unwrap();
    let out = rampart_up(d.path(), state.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("rampart up: ca exited unexpectedly (exit code"),
        "{err}"
    );
    assert!(err.contains("last lines of"), "{err}");
    assert!(err.contains("logs/ca.log"), "{err}");
    assert!(err.contains("rampart up: stopped"), "{err}");
    // The agents' tokens and the CA's JWKS were made; the JWT key is private.
    assert!(state.path().join("tokens/ns1.a.jwt").exists());
    assert!(state.path().join("jwt/jwks.json").exists());
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(state.path().join("jwt/up-signing-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "signing key mode {mode:o}");
    let token_mode = std::fs::metadata(state.path().join("tokens/ns1.a.jwt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(token_mode & 0o077, 0, "token mode {token_mode:o}");
    // The demo end-user token (mesh.yaml rampart.demoToken) was minted, 0600, and verifies
    // against the demo key's JWKS with the configured issuer and audience.
    let demo = state.path().join("demo-token.jwt");
    let demo_mode = std::fs::metadata(&demo).unwrap().permissions().mode();
    assert_eq!(demo_mode & 0o077, 0, "demo token mode {demo_mode:o}");
    let jwks = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["token", "jwks", "--kid", "k1", "--key"])
        .arg(d.path().join("demo.pem"))
        .output()
        .unwrap();
    std::fs::write(d.path().join("demo-jwks.json"), &jwks.stdout).unwrap();
    let verify = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["token", "verify", "--jwks"])
        .arg(d.path().join("demo-jwks.json"))
        .arg("--token")
        .arg(&demo)
        .args(["--issuer", "https://demo.example", "--aud", "demo"])
        .output()
        .unwrap();
    assert!(verify.status.success(), "{verify:?}");
    assert!(String::from_utf8_lossy(&verify.stdout).contains("system:serviceaccount:people:alice"));
    // No child is left behind.
    let left = processes_mentioning(&state.path().display().to_string());
    assert!(left.is_empty(), "left running: {left:?}");
}

/// ONE_WORKLOAD on free ports (its app is not started by `up`).
fn free_workload() -> String {
    let free = support::free_port;
    format!(
        "workloads:
- name: a
  namespace: ns1
  ports: [{{port: 80, protocol: http, app: 127.0.0.1:{}, inbound: 127.0.0.1:{}}}]
  proxy: {{outbound: 127.0.0.1:{}, admin: 127.0.0.1:{}}}
",
        free(),
        free(),
        free(),
        free()
    )
}

#[test]
fn a_taken_port_is_named_before_anything_is_made() {
    // Another process (here: this test) holds the CA's port and a proxy's admin port, as a
    // second `rampart up` on the same folder would meet them.
    let ca = TcpListener::bind("127.0.0.1:0").unwrap();
    let ca_port = ca.local_addr().unwrap().port();
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_port = admin.local_addr().unwrap().port();
    // The app's port is held too, but `up` starts no app here: that is how it should be.
    let app = TcpListener::bind("127.0.0.1:0").unwrap();
    let app_port = app.local_addr().unwrap().port();
    let free = support::free_port;
    let d = folder(
        &format!("rampart: {{ca: {{listen: 127.0.0.1:{ca_port}}}}}\n"),
        &format!(
            "workloads:
- name: a
  namespace: ns1
  ports: [{{port: 80, protocol: http, app: 127.0.0.1:{app_port}, inbound: 127.0.0.1:{}}}]
  proxy: {{admin: 127.0.0.1:{admin_port}}}
",
            free()
        ),
        None,
    );
    let state = tempfile::tempdir().unwrap();
    let out = rampart_up(d.path(), state.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{ca_port} (the CA) is in use")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "127.0.0.1:{admin_port} (ns1/a proxy.admin) is in use"
        )),
        "{err}"
    );
    assert!(!err.contains(&format!(":{app_port}")), "{err}");
    assert!(err.contains("another `rampart up` running"), "{err}");
    assert!(err.contains(&format!("sport = :{ca_port}")), "{err}");
    // Nothing was made: no root, no signing key, no logs.
    let made: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(made.is_empty(), "state dir got {made:?}: {err}");
    drop((ca, admin, app));
}

#[test]
fn quickstart_policy_validates_and_its_demo_keys_match() {
    let qs = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart");
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .arg("validate")
        .arg(qs.join("policy"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The published demo key signs what the demo JWKS verifies, and the RequestAuthentication
    // carries that same JWKS inline.
    let jwks = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["token", "jwks", "--kid", "demo-2026", "--key"])
        .arg(qs.join("jwks/DEMO-ONLY-NOT-SECRET-signing-key.pem"))
        .output()
        .unwrap();
    assert!(jwks.status.success());
    let from_key: serde_json::Value = serde_json::from_slice(&jwks.stdout).unwrap();
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(qs.join("jwks/demo-jwks.json")).unwrap())
            .unwrap();
    assert_eq!(from_key, file);
    let policy = std::fs::read_to_string(qs.join("policy/backend.yaml")).unwrap();
    let inline = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("jwks: '"))
        .and_then(|l| l.strip_suffix('\''))
        .expect("inline jwks in backend.yaml");
    let inline: serde_json::Value = serde_json::from_str(inline).unwrap();
    assert_eq!(inline, file);
}

#[test]
fn sigint_during_start_up_stops_app_agents_and_ca_in_order_and_exits_0() {
    let free = support::free_port;
    let (ca, app, inbound, admin) = (free(), free(), free(), free());
    // The app never opens its port, so `up` stays in the "apps" stage with the CA and the
    // agent running (the agent got its certificate from the CA with the token `up` minted).
    let d = folder(
        &format!("rampart: {{ca: {{listen: 127.0.0.1:{ca}}}}}\n"),
        &format!(
            "workloads:
- name: a
  namespace: ns1
  ports: [{{port: 80, protocol: http, app: 127.0.0.1:{app}, inbound: 127.0.0.1:{inbound}}}]
  command: [sleep, '312.25']
  proxy: {{admin: 127.0.0.1:{admin}}}
"
        ),
        None,
    );
    let state = tempfile::tempdir().unwrap();
    let mut child = start_up(d.path(), state.path(), None, true);
    // Wait until the app runs (its log exists) and the agent has a certificate.
    let deadline = Instant::now() + Duration::from_secs(60);
    let agent_log = state.path().join("logs/agent-ns1-a.log");
    loop {
        let agent = std::fs::read_to_string(&agent_log).unwrap_or_default();
        if state.path().join("logs/app-ns1-a.log").exists()
            && agent.contains("installed workload certificate")
        {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "up exited early ({st}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "agent/app not started within 60s: {}\nagent log: {agent}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let needle = state.path().display().to_string();
    assert!(!processes_mentioning(&needle).is_empty());
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "up did not stop within 60s of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let order: Vec<usize> = [
        "SIGINT received during start-up",
        "stopping the apps and proxies",
        "stopping the node agents",
        "stopping the CA",
        "rampart up: stopped",
    ]
    .iter()
    .map(|m| err.find(m).unwrap_or_else(|| panic!("no {m:?} in {err}")))
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{err}");
    assert!(!err.contains("did not stop within"), "{err}");
    std::thread::sleep(Duration::from_millis(200));
    let left = processes_mentioning(&needle);
    assert!(left.is_empty(), "left running: {left:?}");
    // The app (`sleep 312.25`, which does not mention the state dir) was stopped too: its
    // process group got SIGTERM.
    let sleepers: Vec<String> = processes_mentioning("sleep 312.25");
    assert!(sleepers.is_empty(), "app left running: {sleepers:?}");
    assert!(
        TcpListener::bind(("127.0.0.1", ca)).is_ok(),
        "CA port still held"
    );
}

/// Starts `rampart up` on a one-workload folder whose app is `rampart echo` and waits until
/// the CA, the agent (with its certificate) and the app run; returns the child, the state
/// dir's guard and the app's port.
/// `rampart up DIR --state-dir STATE` in the background (through `wrapper`, a command that
/// execs the arguments after its own, when given), its output piped or discarded.
fn start_up(
    dir: &Path,
    state: &Path,
    wrapper: Option<&[&str]>,
    piped: bool,
) -> std::process::Child {
    let mut cmd = match wrapper {
        Some([w, args @ ..]) => {
            let mut c = Command::new(w);
            c.args(args).arg(env!("CARGO_BIN_EXE_rampart"));
            c
        }
        _ => Command::new(env!("CARGO_BIN_EXE_rampart")),
    };
    let out = || if piped { Stdio::piped() } else { Stdio::null() };
    cmd.arg("up")
        .arg(dir)
        .arg("--state-dir")
        .arg(state)
        .args(["--ready-timeout", "120s", "--drain-timeout", "5s"])
        .stdin(Stdio::null())
        .stdout(out())
        .stderr(out())
        .spawn()
        .unwrap()
}

type Running = (
    std::process::Child,
    tempfile::TempDir,
    tempfile::TempDir,
    u16,
);

fn up_running() -> Running {
    up_running_under(None)
}

/// As `up_running`, with `up` started through `wrapper` (such as `nohup`).
fn up_running_under(wrapper: Option<&[&str]>) -> Running {
    up_running_app(wrapper, |app| {
        format!("[rampart, echo, --listen, '127.0.0.1:{app}', --name, lifeline]")
    })
}

/// As `up_running_under`, with the app's command (YAML flow list) made from its port.
fn up_running_app(wrapper: Option<&[&str]>, command: impl Fn(u16) -> String) -> Running {
    let free = support::free_port;
    let (ca, app, inbound, admin) = (free(), free(), free(), free());
    let command = command(app);
    let d = folder(
        &format!("rampart: {{ca: {{listen: 127.0.0.1:{ca}}}}}\n"),
        &format!(
            "workloads:
- name: a
  namespace: ns1
  ports: [{{port: 80, protocol: http, app: 127.0.0.1:{app}, inbound: 127.0.0.1:{inbound}}}]
  command: {command}
  proxy: {{admin: 127.0.0.1:{admin}}}
"
        ),
        None,
    );
    let state = tempfile::tempdir().unwrap();
    let mut child = start_up(d.path(), state.path(), wrapper, false);
    let deadline = Instant::now() + Duration::from_secs(60);
    let agent_log = state.path().join("logs/agent-ns1-a.log");
    loop {
        let agent = std::fs::read_to_string(&agent_log).unwrap_or_default();
        if agent.contains("installed workload certificate")
            && std::net::TcpStream::connect(("127.0.0.1", app)).is_ok()
        {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "up exited early");
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("agent/app not started within 60s: agent log: {agent}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, d, state, app)
}

/// Sends `sig` to `up` and waits (up to 60 s) for it to exit; its exit status.
fn signal_and_wait(
    child: &mut std::process::Child,
    sig: rustix::process::Signal,
    what: &str,
) -> std::process::ExitStatus {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "up did not stop within 60s of {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until no process mentions the state dir or runs the app, and the app's port is
/// free.
fn all_gone(state: &Path, app: u16, why: &str) {
    all_gone_but(state, app, &format!("127.0.0.1:{app} --name lifeline"), why);
}

/// As `all_gone`, with the app's processes found by `app_needle` in their command lines.
fn all_gone_but(state: &Path, app: u16, app_needle: &str, why: &str) {
    let needle = state.display().to_string();
    let echo = app_needle.to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<String> = processes_mentioning(&needle)
            .into_iter()
            .chain(processes_mentioning(&echo))
            .collect();
        if left.is_empty() && TcpListener::bind(("127.0.0.1", app)).is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{why}: left running 20s later: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `kill -9` of `up` gives it no chance to stop anything: the `rampart` processes it
/// started see their lifeline (stdin) close and stop themselves, so a second `up` finds no
/// CA holding the state dir and no ports taken.
#[test]
fn the_processes_up_started_stop_when_up_is_killed_with_sigkill() {
    let (mut child, _d, state, app) = up_running();
    let needle = state.path().display().to_string();
    assert!(!processes_mentioning(&needle).is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    all_gone(state.path(), app, "after kill -9 of up");
}

/// An app that is another program than `rampart` (here Python's http.server) runs under
/// `rampart app-guard`, which holds the lifeline for it: `kill -9` of `up` stops it too, so
/// its port is free for the next `up`.
#[test]
fn an_app_of_another_program_stops_when_up_is_killed_with_sigkill() {
    let python = support::python();
    let (mut child, _d, state, app) = up_running_app(None, |app| {
        format!(
            "['{}', -m, http.server, '{app}', --bind, 127.0.0.1]",
            python.display()
        )
    });
    let needle = format!("http.server {app}");
    assert_eq!(
        processes_mentioning(&needle).len(),
        2,
        "the guard and the app"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    all_gone_but(state.path(), app, &needle, "after kill -9 of up");
}

/// An app whose program does not exist: `up` names it, with the guard's reason from the log,
/// and stops the rest.
#[test]
fn an_app_program_that_does_not_exist_is_named() {
    let free = support::free_port;
    let (ca, app, inbound, admin) = (free(), free(), free(), free());
    let d = folder(
        &format!("rampart: {{ca: {{listen: 127.0.0.1:{ca}}}}}\n"),
        &format!(
            "workloads:
- name: a
  namespace: ns1
  ports: [{{port: 80, protocol: http, app: 127.0.0.1:{app}, inbound: 127.0.0.1:{inbound}}}]
  command: [/nonexistent/rampart-test-app, --flag]
  proxy: {{admin: 127.0.0.1:{admin}}}
"
        ),
        None,
    );
    let state = tempfile::tempdir().unwrap();
    let out = rampart_up(d.path(), state.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("app ns1/a exited unexpectedly (exit code 127)"),
        "{err}"
    );
    assert!(
        err.contains("cannot start /nonexistent/rampart-test-app: No such file or directory"),
        "{err}"
    );
    let left = processes_mentioning(&state.path().display().to_string());
    assert!(left.is_empty(), "left running: {left:?}");
}

/// Its twin: a normal stop (SIGINT) stops the guarded app with the rest, and `up` exits 0.
#[test]
fn an_app_of_another_program_stops_with_up() {
    let python = support::python();
    let (mut child, _d, state, app) = up_running_app(None, |app| {
        format!(
            "['{}', -m, http.server, '{app}', --bind, 127.0.0.1]",
            python.display()
        )
    });
    let status = signal_and_wait(&mut child, rustix::process::Signal::INT, "SIGINT");
    assert_eq!(status.code(), Some(0));
    all_gone_but(
        state.path(),
        app,
        &format!("http.server {app}"),
        "after SIGINT",
    );
}

/// A closed terminal (SIGHUP) stops the mesh as Ctrl-C does: `up` stops its children in
/// order and exits 0.
#[test]
fn sighup_stops_up_and_everything_it_started() {
    // SIGHUP at its default disposition, whatever this test runs under (`nohup .ci/run`
    // would hand `up` an ignored SIGHUP, which `up` then honours: the test below).
    let (mut child, _d, state, app) = up_running_under(Some(&["env", "--default-signal=HUP"]));
    let status = signal_and_wait(&mut child, rustix::process::Signal::HUP, "SIGHUP");
    assert_eq!(status.code(), Some(0));
    all_gone(state.path(), app, "after SIGHUP");
}

/// Its twin for `nohup rampart up &`: SIGHUP was ignored when `up` started, so a hang-up
/// leaves the mesh running (until SIGINT stops it).
#[test]
fn sighup_is_ignored_under_nohup() {
    let (mut child, _d, state, app) = up_running_under(Some(&["nohup"]));
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "up stopped on SIGHUP under nohup"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", app)).is_ok());
    signal_and_wait(&mut child, rustix::process::Signal::INT, "SIGINT");
    all_gone(state.path(), app, "after SIGINT");
}

/// The lifeline is a pipe or nothing: a `rampart` process that inherited the variable with
/// stdin at /dev/null keeps running.
#[test]
fn the_lifeline_variable_alone_stops_nothing() {
    let port = support::free_port();
    let mut echo = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["echo", "--listen", &format!("127.0.0.1:{port}")])
        .env("RAMPART_UP_LIFELINE", "stdin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(echo.try_wait().unwrap().is_none(), "echo stopped at once");
        assert!(Instant::now() < deadline, "echo never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        echo.try_wait().unwrap().is_none(),
        "echo stopped: stdin at /dev/null taken for a lifeline"
    );
    echo.kill().unwrap();
    echo.wait().unwrap();
}
