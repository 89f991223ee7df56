//! `rampart proxy`: registry edits apply live to the proxy's listeners, driven with curl and
//! plain TCP clients while two real proxy processes run.
//!
//! A port added to a workload gets its inbound listener within seconds (the old ports keep
//! serving and keep their `/mtls` counters); an outbound HTTP proxy and an upstream port added
//! to another workload carry mTLS to the new port; reordering ports moves nothing; a moved
//! inbound address is rebound; a removed port stops accepting while a request in flight on
//! it finishes; a new port whose address is taken is logged (address and workload), shown in
//! `/config_dump` and `/ready`, the rest keeps serving, and the bind is retried until it works.
//! Certificates come from the SDS stand-in (`proxy/tests/support/sds_standin.rs`).

mod support;
use support::{Proc, free_port, wait_for, write_atomic};

#[path = "../proxy/tests/support/sds_standin.rs"]
mod sds_standin;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sds_standin::TestCa;

const TD: &str = "cluster.local";

fn start_proxy(mesh: &Path, workload: &str, sds: &Path, log: PathBuf) -> Proc {
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["proxy", "--mesh"])
        .arg(mesh)
        .args(["--workload", workload, "--sds-socket"])
        .arg(sds)
        .args(["--drain-timeout", "3s"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// An HTTP/1.1 app answering `app=<name> path=<path>`; `/slow` answers after 6 s.
fn app(name: &'static str, port: u16) {
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                loop {
                    let mut request_line = String::new();
                    if r.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let path = request_line.split(' ').nth(1).unwrap_or("").to_string();
                    if path == "/slow" {
                        std::thread::sleep(Duration::from_secs(6));
                    }
                    let text = format!("app={name} path={path}\n");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// (status, body without trailing newlines) of a curl run; "000" when no HTTP answer came.
fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "8", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "000"));
    (code.to_string(), body.trim_end().to_string())
}

fn refused(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_err()
}

/// The `/mtls` entry of `port`, if listed.
fn mtls_port(admin: u16, port: u16) -> Option<serde_json::Value> {
    let (code, body) = curl(&[&format!("http://127.0.0.1:{admin}/mtls")]);
    assert_eq!(code, "200", "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == port)
        .cloned()
}

fn plaintext_requests(admin: u16, port: u16) -> u64 {
    mtls_port(admin, port).unwrap()["since_start"]["plaintext_requests"]
        .as_u64()
        .unwrap()
}

#[test]
fn registry_edits_reconcile_the_proxy_listeners_live() {
    let w = tempfile::tempdir().unwrap();
    let mesh = w.path().join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    std::fs::write(mesh.join("mesh.yaml"), format!("trustDomain: {TD}\n")).unwrap();
    let (app_a, app_b, app_c, fe_app) = (free_port(), free_port(), free_port(), free_port());
    let (in_a, in_a2, in_b, in_c) = (free_port(), free_port(), free_port(), free_port());
    let (admin_b, fe_in, fe_admin, fe_out, fe_up) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    app("a", app_a);
    app("b", app_b);
    app("c", app_c);
    app("fe", fe_app);
    // backend's ports (as YAML lines) and frontend's extra proxy lines vary between edits.
    let registry = |backend_ports: &[String], fe_extra: &str| {
        format!(
            "workloads:
- name: backend
  namespace: api
  ports:
{}
  proxy: {{admin: \"127.0.0.1:{admin_b}\"}}
- name: frontend
  namespace: web
  ports:
  - {{port: 80, protocol: http, app: \"127.0.0.1:{fe_app}\", inbound: \"127.0.0.1:{fe_in}\"}}
{fe_extra}",
            backend_ports.join("\n")
        )
    };
    let port_line = |port: u16, app: u16, inbound: u16| {
        format!(
            "  - {{port: {port}, protocol: http, app: \"127.0.0.1:{app}\", inbound: \"127.0.0.1:{inbound}\"}}"
        )
    };
    let only_fe_admin = format!("  proxy: {{admin: \"127.0.0.1:{fe_admin}\"}}\n");
    let fe_with_out_and_up = format!(
        "  proxy: {{admin: \"127.0.0.1:{fe_admin}\", outbound: \"127.0.0.1:{fe_out}\"}}\n  upstreams:\n  - {{service: backend.api, port: 9090, listen: \"127.0.0.1:{fe_up}\"}}\n"
    );
    let workloads = mesh.join("workloads.yaml");
    write_atomic(
        &workloads,
        &registry(&[port_line(8080, app_a, in_a)], &only_fe_admin),
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new("Reload Test Root");
    let (sds_b, sds_f) = (w.path().join("b.sock"), w.path().join("f.sock"));
    let (_standin_b, _standin_f) = rt.block_on(async {
        (
            sds_standin::start(
                &sds_b,
                Some(ca.secrets(&format!("spiffe://{TD}/ns/api/sa/backend"), 1)),
            ),
            sds_standin::start(
                &sds_f,
                Some(ca.secrets(&format!("spiffe://{TD}/ns/web/sa/frontend"), 1)),
            ),
        )
    });
    let backend = start_proxy(&mesh, "api/backend", &sds_b, w.path().join("backend.log"));
    let frontend = start_proxy(&mesh, "web/frontend", &sds_f, w.path().join("frontend.log"));
    for (admin, p) in [(admin_b, &backend), (fe_admin, &frontend)] {
        wait_for(
            "proxy ready",
            Duration::from_secs(20),
            || curl(&[&format!("http://127.0.0.1:{admin}/ready")]).0 == "200",
            || p.log(),
        );
    }
    let blog = || backend.log();
    let url = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");

    // --- before: port 8080 serves; counted as plaintext ---
    for _ in 0..3 {
        assert_eq!(
            curl(&[&url(in_a, "/a")]),
            ("200".into(), "app=a path=/a".into())
        );
    }
    let before = plaintext_requests(admin_b, 8080);
    assert!(before >= 3, "{before}");
    assert!(refused(in_b) && refused(fe_out) && refused(fe_up));

    // --- add port 9090 to backend, and an outbound proxy + upstream to frontend ---
    write_atomic(
        &workloads,
        &registry(
            &[port_line(8080, app_a, in_a), port_line(9090, app_b, in_b)],
            &fe_with_out_and_up,
        ),
    );
    wait_for(
        "new inbound port 9090 serving",
        Duration::from_secs(10),
        || curl(&[&url(in_b, "/new")]).0 == "200",
        blog,
    );
    assert_eq!(curl(&[&url(in_b, "/new")]).1, "app=b path=/new");
    assert_eq!(curl(&[&url(in_a, "/old")]).1, "app=a path=/old");
    assert!(
        plaintext_requests(admin_b, 8080) > before,
        "port 8080's counters must survive the reload"
    );
    assert!(plaintext_requests(admin_b, 9090) >= 2);
    assert!(
        blog().contains("listening (live registry edit)"),
        "{}",
        blog()
    );
    // The frontend's new outbound listener and upstream port carry mTLS to the new port.
    wait_for(
        "frontend outbound listener",
        Duration::from_secs(10),
        || !refused(fe_out) && !refused(fe_up),
        || frontend.log(),
    );
    let (code, body) = curl(&[
        "-x",
        &format!("http://127.0.0.1:{fe_out}"),
        "http://backend.api:9090/via-outbound",
    ]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", "app=b path=/via-outbound"),
        "{}",
        frontend.log()
    );
    let (code, body) = curl(&[&url(fe_up, "/via-upstream")]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", "app=b path=/via-upstream"),
        "{}",
        frontend.log()
    );
    let m = mtls_port(admin_b, 9090).unwrap();
    assert!(
        m["since_start"]["mtls_requests"].as_u64().unwrap() >= 2,
        "{m}"
    );

    // --- reorder the ports: nothing moves, counters stay ---
    let at_8080 = plaintext_requests(admin_b, 8080);
    write_atomic(
        &workloads,
        &registry(
            &[port_line(9090, app_b, in_b), port_line(8080, app_a, in_a)],
            &fe_with_out_and_up,
        ),
    );
    wait_for(
        "reordered registry in force",
        Duration::from_secs(10),
        || {
            let (_, dump) = curl(&[&url(admin_b, "/config_dump")]);
            let v: serde_json::Value = serde_json::from_str(&dump).unwrap_or_default();
            v["ports"][0]["port"] == 9090
        },
        blog,
    );
    assert_eq!(curl(&[&url(in_a, "/a")]).1, "app=a path=/a");
    assert_eq!(curl(&[&url(in_b, "/b")]).1, "app=b path=/b");
    assert_eq!(plaintext_requests(admin_b, 8080), at_8080 + 1);

    // --- move port 8080's inbound address: rebound; the counters stay with the port ---
    write_atomic(
        &workloads,
        &registry(
            &[port_line(9090, app_b, in_b), port_line(8080, app_a, in_a2)],
            &fe_with_out_and_up,
        ),
    );
    wait_for(
        "port 8080 on its new address",
        Duration::from_secs(10),
        || curl(&[&url(in_a2, "/moved")]).0 == "200",
        blog,
    );
    wait_for(
        "old address closed",
        Duration::from_secs(5),
        || refused(in_a),
        blog,
    );
    assert!(plaintext_requests(admin_b, 8080) >= at_8080 + 2);
    assert!(blog().contains("listener moves"), "{}", blog());

    // --- remove port 9090 (and the upstream to it) while a request on it is in flight ---
    let slow_done = Arc::new(AtomicBool::new(false));
    let slow = {
        let done = slow_done.clone();
        std::thread::spawn(move || {
            let r = curl(&[&format!("http://127.0.0.1:{in_b}/slow")]);
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    write_atomic(
        &workloads,
        &registry(&[port_line(8080, app_a, in_a2)], &only_fe_admin),
    );
    wait_for(
        "port 9090 closed",
        Duration::from_secs(10),
        || refused(in_b),
        blog,
    );
    assert!(
        !slow_done.load(Ordering::SeqCst),
        "the slow request finished before the port was removed: the test proves nothing"
    );
    assert_eq!(curl(&[&url(in_a2, "/still")]).1, "app=a path=/still");
    let (code, body) = slow.join().unwrap();
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", "app=b path=/slow"),
        "an in-flight request on a removed listener finishes\n{}",
        blog()
    );
    assert!(
        blog().contains("listener removed from workloads.yaml"),
        "{}",
        blog()
    );
    assert!(
        mtls_port(admin_b, 9090).is_none(),
        "removed port still in /mtls"
    );
    wait_for(
        "frontend outbound and upstream closed",
        Duration::from_secs(10),
        || refused(fe_out) && refused(fe_up),
        || frontend.log(),
    );

    // --- a new port whose address is taken: logged, reported, the rest serves; retried ---
    let squatter = TcpListener::bind(("127.0.0.1", in_c)).unwrap();
    write_atomic(
        &workloads,
        &registry(
            &[port_line(8080, app_a, in_a2), port_line(7070, app_c, in_c)],
            &only_fe_admin,
        ),
    );
    wait_for(
        "bind failure logged",
        Duration::from_secs(10),
        || blog().contains(&format!("cannot listen on 127.0.0.1:{in_c}")),
        blog,
    );
    let line = blog()
        .lines()
        .find(|l| l.contains(&format!("cannot listen on 127.0.0.1:{in_c}")))
        .unwrap()
        .to_string();
    assert!(
        line.contains("api/backend") && line.contains("inbound port 7070"),
        "{line}"
    );
    assert_eq!(curl(&[&url(in_a2, "/ok")]).1, "app=a path=/ok");
    let (code, ready) = curl(&[&url(admin_b, "/ready")]);
    assert_eq!(code, "200", "{ready}");
    assert!(
        ready.contains(&format!(
            "degraded: inbound port 7070 (http) not listening on 127.0.0.1:{in_c}"
        )),
        "{ready}"
    );
    let dump: serde_json::Value =
        serde_json::from_str(&curl(&[&url(admin_b, "/config_dump")]).1).unwrap();
    let failed: Vec<&serde_json::Value> = dump["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["state"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{dump}");
    assert_eq!(failed[0]["address"], format!("127.0.0.1:{in_c}"));
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("in use"),
        "{dump}"
    );
    // The squatter leaves: the proxy binds on its next poll, with no further edit.
    drop(squatter);
    wait_for(
        "bind retried",
        Duration::from_secs(10),
        || curl(&[&url(in_c, "/c")]).1 == "app=c path=/c",
        blog,
    );
    assert!(blog().contains("an earlier bind had failed"), "{}", blog());
    let (_, ready) = curl(&[&url(admin_b, "/ready")]);
    assert_eq!(ready, "LIVE");
    drop(frontend);
    drop(backend);
    drop(rt);
}

/// A workload port whose inbound address is the proxy's own app-probe listener (a Service
/// `targetPort: 15020` on an injected Pod) is skipped with its reason, not a start-up
/// failure: the proxy starts, the probe listener and the other ports serve, `/config_dump`
/// and `/ready` name the skip. Its twin: without the probe listener the same port is bound.
#[test]
fn a_port_on_the_app_probe_listener_is_skipped_not_fatal() {
    let w = tempfile::tempdir().unwrap();
    let mesh = w.path().join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    std::fs::write(mesh.join("mesh.yaml"), format!("trustDomain: {TD}\n")).unwrap();
    let (app_a, app_p, in_a, probe, admin) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    app("a", app_a);
    app("p", app_p);
    let a = format!(
        "  - {{port: 8080, protocol: http, app: \"127.0.0.1:{app_a}\", inbound: \"127.0.0.1:{in_a}\"}}"
    );
    let p = format!(
        "  - {{port: 15020, protocol: http, app: \"127.0.0.1:{app_p}\", inbound: \"127.0.0.1:{probe}\"}}"
    );
    let registry = |ports: [&str; 2]| {
        format!(
            "workloads:\n- name: backend\n  namespace: api\n  ports:\n{}\n  proxy: {{admin: \"127.0.0.1:{admin}\"}}\n",
            ports.join("\n")
        )
    };
    let workloads = mesh.join("workloads.yaml");
    write_atomic(&workloads, &registry([&a, &p]));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new("Reserved Port Root");
    let sds = w.path().join("b.sock");
    let _standin = rt.block_on(async {
        sds_standin::start(
            &sds,
            Some(ca.secrets(&format!("spiffe://{TD}/ns/api/sa/backend"), 1)),
        )
    });
    let url = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");
    // The app's own metrics (Prometheus' text format), merged by the status listener.
    let app_metrics = free_port();
    {
        let l = std::net::TcpListener::bind(("127.0.0.1", app_metrics)).unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut buf = [0u8; 2048];
                let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
                let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /m ");
                let body = "# TYPE app_jobs_total counter\napp_jobs_total 7\n";
                let status = if ok { "200 OK" } else { "404 Not Found" };
                let _ = std::io::Write::write_all(
                    &mut s,
                    format!(
                        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
    }
    let start = |probes: bool, log: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rampart"));
        cmd.args(["proxy", "--mesh"])
            .arg(&mesh)
            .args(["--workload", "api/backend", "--sds-socket"])
            .arg(&sds)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(w.path().join(log)).unwrap());
        if probes {
            // The flag's earlier name, as Pods injected before the rename carry it.
            cmd.args(["--app-probes-listen", &format!("127.0.0.1:{probe}")])
                .env("ISTIO_KUBE_APP_PROBERS", "{}")
                .env(
                    "ISTIO_PROMETHEUS_ANNOTATIONS",
                    format!(r#"{{"scrape": "true", "port": "{app_metrics}", "path": "/m"}}"#),
                );
        }
        let p = Proc {
            child: cmd.spawn().unwrap(),
            log: w.path().join(log),
        };
        wait_for(
            "proxy ready",
            Duration::from_secs(20),
            || curl(&[&url(admin, "/ready")]).0 == "200",
            || p.log(),
        );
        p
    };
    let listeners = || -> Vec<serde_json::Value> {
        let dump: serde_json::Value =
            serde_json::from_str(&curl(&[&url(admin, "/config_dump")]).1).unwrap();
        dump["listeners"].as_array().unwrap().clone()
    };
    let on = |ls: &[serde_json::Value], port: u16| -> serde_json::Value {
        ls.iter()
            .find(|l| l["address"] == format!("127.0.0.1:{port}"))
            .cloned()
            .unwrap_or_else(|| panic!("no listener on {port}: {ls:?}"))
    };

    let proxy = start(true, "with-probes.log");
    // The other port serves; the probe listener is the probe listener (404 off its paths).
    assert_eq!(
        curl(&[&url(in_a, "/a")]),
        ("200".into(), "app=a path=/a".into())
    );
    assert_eq!(curl(&[&url(probe, "/a")]).0, "404");
    // The status listener also serves the proxy's metrics (Prometheus scrapes it from
    // outside the Pod), the same series as the admin listener's.
    let (code, text) = curl(&[&url(probe, "/stats/prometheus")]);
    assert_eq!(code, "200");
    // With the app's own metrics in front (Istio's metrics merging).
    assert!(
        text.starts_with("# TYPE app_jobs_total counter\napp_jobs_total 7\n"),
        "{text}"
    );
    let requests = |t: &str| {
        t.lines()
            .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
            .map(|l| l.split_once("} ").map(|(k, _)| k.to_owned()))
            .unwrap_or_else(|| panic!("no istio_requests_total: {t}"))
    };
    assert_eq!(
        requests(&text),
        requests(&curl(&[&url(admin, "/stats/prometheus")]).1)
    );
    // Nothing else of the admin listener is there.
    for path in ["/config_dump", "/certs", "/mtls", "/ready"] {
        assert_eq!(curl(&[&url(probe, path)]).0, "404", "{path}");
    }
    assert_eq!(
        curl(&["-X", "POST", &url(probe, "/stats/prometheus")]).0,
        "405"
    );
    let ls = listeners();
    let skipped = on(&ls, probe);
    assert_eq!(skipped["state"], "skipped", "{ls:?}");
    let why = skipped["error"].as_str().unwrap();
    assert!(
        why.contains(&format!(
            "127.0.0.1:{probe} is this proxy's status listener"
        )),
        "{why}"
    );
    assert_eq!(on(&ls, in_a)["state"], "listening", "{ls:?}");
    let ready = curl(&[&url(admin, "/ready")]).1;
    assert!(
        ready.contains(&format!(
            "degraded: inbound port 15020 (http) not listening on 127.0.0.1:{probe}"
        )),
        "{ready}"
    );
    let warnings = proxy
        .log()
        .lines()
        .filter(|l| l.contains("listener skipped"))
        .count();
    assert_eq!(warnings, 1, "{}", proxy.log());
    // A reload that keeps the port keeps the skip, without another warning or a bind try.
    write_atomic(&workloads, &registry([&p, &a]));
    wait_for(
        "reload",
        Duration::from_secs(10),
        || proxy.log().contains("new configuration in force"),
        || proxy.log(),
    );
    assert_eq!(on(&listeners(), probe)["state"], "skipped");
    assert_eq!(
        proxy
            .log()
            .lines()
            .filter(|l| l.contains("listener skipped") || l.contains("cannot listen"))
            .count(),
        1,
        "{}",
        proxy.log()
    );
    drop(proxy);

    // The twin: no probe listener, so the port is the workload's and is served.
    let proxy = start(false, "without-probes.log");
    assert_eq!(on(&listeners(), probe)["state"], "listening");
    assert_eq!(
        curl(&[&url(probe, "/p")]),
        ("200".into(), "app=p path=/p".into())
    );
    drop(proxy);
}
