//! Config streaming end to end (docs/KUBERNETES.md "Config streaming"): a control plane in
//! this process (the CA's server, `rampart_citadel::start_with_routes`, serving
//! `rampart.config.v1.ConfigDiscovery` fed by an `Updates` channel of snapshots made here)
//! and a real `rampart proxy --control-plane` process whose certificates come from an SDS
//! stand-in (`proxy/tests/support/sds_standin.rs`) issuing from the same root as the CA.
//!
//! Each control-plane incarnation runs on its own tokio runtime, so killing it
//! (`shutdown_background`) drops every connection at once, as a crashed process would.

mod support;
use support::{Proc, free_port, wait_for, write_atomic};

#[path = "../proxy/tests/support/sds_standin.rs"]
mod sds_standin;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rampart_certs::tls::{ServerAuth, client_config};
use rampart_certs::{PrivateKey, SpiffeId, TrustBundle, TrustDomain};
use rampart_discovery::{Authenticator, ConfigService, Stats};
use rampart_mesh::MeshFolder;
use rampart_mesh::watch::{Update, Updates};
use rampart_proto::rampart::config::v1 as pb;
use sds_standin::TestCa;
use tokio::sync::mpsc;

const TD: &str = "cluster.local";
const BACKEND_ID: &str = "spiffe://cluster.local/ns/api/sa/backend";

fn rampart_bin() -> &'static str {
    env!("CARGO_BIN_EXE_rampart")
}

fn rampart(args: &[&str]) {
    let out = Command::new(rampart_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "rampart {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Ports {
    app: u16,
    inbound: u16,
    admin: u16,
    cp: u16,
    other_app: u16,
    other_in: u16,
}

/// The mesh the control plane serves: `api/backend` (this proxy) and `web/other`, STRICT
/// nowhere (plaintext test calls reach policy), one DENY policy on `deny_path`, and `extra`
/// appended to mesh.yaml.
fn snapshot(dir: &Path, p: &Ports, deny_path: &str, extra_mesh: &str) -> MeshFolder {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("mesh.yaml"),
        format!("trustDomain: {TD}\n{extra_mesh}"),
    )
    .unwrap();
    std::fs::write(
        dir.join("workloads.yaml"),
        format!(
            "workloads:\n\
             - name: backend\n  namespace: api\n  ports: [{{port: 80, protocol: http, app: '127.0.0.1:{}', inbound: '127.0.0.1:{}'}}]\n  proxy: {{admin: '127.0.0.1:{}'}}\n\
             - name: other\n  namespace: web\n  ports: [{{port: 80, protocol: http, app: '127.0.0.1:{}', inbound: '127.0.0.1:{}'}}]\n",
            p.app, p.inbound, p.admin, p.other_app, p.other_in
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("policy.yaml"),
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: api}}\nspec: {{mtls: {{mode: PERMISSIVE}}}}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-path, namespace: api}}\nspec:\n  action: DENY\n  rules:\n  - to: [{{operation: {{paths: ['{deny_path}']}}}}]\n"
        ),
    )
    .unwrap();
    MeshFolder::load(dir).unwrap()
}

/// The status code of a plaintext `GET path` to `port`, or `None` when nothing answers.
fn status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: backend.api\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1)?.parse().ok()
}

fn metric(port: u16, name: &str) -> Option<u64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /stats/prometheus HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

struct CaCallers(Arc<rampart_citadel::CaState>);

impl Authenticator for CaCallers {
    fn caller(&self, extensions: &tonic::Extensions) -> Result<SpiffeId, String> {
        self.0.caller_certificate_id(extensions)
    }
}

/// One incarnation of the control plane: the CA server with the config service, on its own
/// runtime, fed by `tx`.
struct ControlPlane {
    rt: Option<tokio::runtime::Runtime>,
    tx: mpsc::Sender<Update>,
    stats: Arc<Stats>,
}

impl ControlPlane {
    fn start(cacerts: &Path, state: &Path, port: u16) -> ControlPlane {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut cfg = rampart_citadel::CaConfig::new(
            cacerts.to_path_buf(),
            state.to_path_buf(),
            TD.parse::<TrustDomain>().unwrap(),
        );
        cfg.listen = SocketAddr::from(([127, 0, 0, 1], port));
        let (tx, updates) = Updates::channel(4);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let state =
                rampart_citadel::CaState::new(cfg, rampart_citadel::Metrics::new()).unwrap();
            let svc = ConfigService::spawn(Arc::new(CaCallers(state.clone())), None, updates);
            let stats = svc.stats().clone();
            // The port of the previous incarnation may take a moment to be free.
            let mut tries = 0;
            let ca = loop {
                match rampart_citadel::start_with_routes(
                    state.clone(),
                    tonic::service::Routes::new(svc.clone().into_server()),
                )
                .await
                {
                    Ok(ca) => break ca,
                    Err(e) if tries < 50 => {
                        tries += 1;
                        eprintln!("control plane not started yet: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("control plane: {e}"),
                }
            };
            done_tx.send(stats).unwrap();
            ca.wait().await;
        });
        let stats = done_rx.recv_timeout(Duration::from_secs(20)).unwrap();
        ControlPlane {
            rt: Some(rt),
            tx,
            stats,
        }
    }

    fn publish(&self, folder: MeshFolder) {
        self.tx.blocking_send(Ok(folder)).unwrap();
    }

    /// Kill it: every task and connection of its runtime ends now.
    fn kill(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn start_proxy(cp_port: u16, sds: &Path, san: Option<&str>, log: PathBuf) -> Proc {
    let f = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(rampart_bin());
    cmd.args(["proxy", "--control-plane", &format!("127.0.0.1:{cp_port}")])
        .args(["--workload", "api/backend", "--sds-socket"])
        .arg(sds)
        .args(["--drain-timeout", "1s"]);
    if let Some(s) = san {
        cmd.args(["--control-plane-san", s]);
    }
    let child = cmd
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// A config stream opened by this test (not a proxy): with the client certificate of `id`
/// (none when `None`), for `workload`; the first response or the refusal.
async fn open_stream(
    port: u16,
    ca: &TestCa,
    id: Option<&str>,
    workload: &str,
) -> Result<pb::DeltaConfigResponse, tonic::Status> {
    let bundle = TrustBundle::from_pem(&ca.root_pem()).unwrap();
    let identity = id.map(|id| {
        let (chain, key) = ca.issue(id, Duration::from_secs(600));
        (
            rampart_certs::parse_certs_pem(&chain).unwrap(),
            PrivateKey::from_pem(&key).unwrap(),
        )
    });
    let mut tls = client_config(
        ServerAuth::Dns { bundle },
        identity.as_ref().map(|(c, k)| (c.clone(), k)),
    )
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let name = rustls::pki_types::ServerName::try_from("istiod.istio-system.svc")
                    .unwrap()
                    .to_owned();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .unwrap();
    let mut client = pb::config_discovery_client::ConfigDiscoveryClient::new(channel)
        .max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(2);
    tx.send(pb::DeltaConfigRequest {
        workload: workload.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .delta_config(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an answer within 10 s")?;
    drop(tx);
    Ok(first.expect("a response"))
}

#[test]
fn proxy_follows_the_control_plane_through_edits_nacks_and_outages() {
    let w = tempfile::tempdir().unwrap();
    let wp = w.path();
    let root = wp.join("root");
    let cacerts = wp.join("cacerts");
    let state = wp.join("state");
    rampart(&["certs", "root", "--out", root.to_str().unwrap()]);
    rampart(&[
        "certs",
        "intermediate",
        "--root",
        root.to_str().unwrap(),
        "--name",
        "control-plane",
        "--out",
        cacerts.to_str().unwrap(),
    ]);
    let ca = TestCa::from_dir(&root);
    let p = Ports {
        app: free_port(),
        inbound: free_port(),
        admin: free_port(),
        cp: free_port(),
        other_app: free_port(),
        other_in: free_port(),
    };
    support::app_200(p.app);

    // The SDS stand-in lives on this test's own runtime for the whole test.
    let test_rt = tokio::runtime::Runtime::new().unwrap();
    let sds = wp.join("sds.sock");
    let _standin = {
        let _g = test_rt.enter();
        sds_standin::start(&sds, Some(ca.secrets(BACKEND_ID, 1)))
    };

    // The proxy starts before any control plane: nothing listens (fail closed).
    let proxy = start_proxy(p.cp, &sds, None, wp.join("proxy.log"));
    // Its twin expects another name on the control plane's certificate: it never connects.
    let wrong_san = start_proxy(p.cp, &sds, Some("wrong.example"), wp.join("wrong-san.log"));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(status(p.inbound, "/data"), None, "{}", proxy.log());

    // A control plane with no snapshot yet: the stream waits, still nothing listens.
    let cp = ControlPlane::start(&cacerts, &state, p.cp);
    wait_for(
        "the proxy's config stream to open",
        Duration::from_secs(20),
        || cp.stats.streams.load(Ordering::Relaxed) >= 1,
        || proxy.log(),
    );
    assert_eq!(status(p.inbound, "/data"), None, "{}", proxy.log());

    // First push: the proxy starts serving it.
    let snap_dir = wp.join("snap");
    cp.publish(snapshot(&snap_dir, &p, "/admin", ""));
    wait_for(
        "the first push to be served",
        Duration::from_secs(20),
        || status(p.inbound, "/data") == Some(200),
        || proxy.log(),
    );
    assert_eq!(status(p.inbound, "/admin"), Some(403));

    // A policy edit reaches the proxy: /data is now denied, /admin allowed.
    cp.publish(snapshot(&snap_dir, &p, "/data", ""));
    wait_for(
        "the edit to reach the proxy",
        Duration::from_secs(20),
        || status(p.inbound, "/data") == Some(403),
        || proxy.log(),
    );
    assert_eq!(status(p.inbound, "/admin"), Some(200));
    assert_eq!(
        metric(p.admin, "rampart_proxy_control_plane_connected"),
        Some(1)
    );

    // A push the proxy cannot use (its JWKS CA file was unreadable where the snapshot was
    // taken): NACKed, and the last good configuration keeps serving.
    cp.publish(snapshot(
        &snap_dir,
        &p,
        "/admin",
        "rampart:\n  jwksCaFile: missing-ca.pem\n",
    ));
    wait_for(
        "the NACK",
        Duration::from_secs(20),
        || cp.stats.nacks.load(Ordering::Relaxed) >= 1,
        || proxy.log(),
    );
    assert!(metric(p.admin, "rampart_proxy_control_plane_nacks_total") >= Some(1));
    assert_eq!(status(p.inbound, "/data"), Some(403), "{}", proxy.log());
    assert_eq!(status(p.inbound, "/admin"), Some(200));
    assert!(proxy.log().contains("NACK"), "{}", proxy.log());

    // Who may stream: a certificate of web/other asking for api/backend is refused naming
    // why; the same certificate gets its own workload's configuration; no certificate is
    // refused.
    let denied = test_rt
        .block_on(open_stream(
            p.cp,
            &ca,
            Some("spiffe://cluster.local/ns/web/sa/other"),
            "api/backend",
        ))
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("is not workload api/backend"),
        "{denied:?}"
    );
    let own = test_rt
        .block_on(open_stream(
            p.cp,
            &ca,
            Some("spiffe://cluster.local/ns/web/sa/other"),
            "web/other",
        ))
        .unwrap();
    assert!(own.resources.iter().any(|r| r.name == "mesh"));
    assert!(
        own.resources
            .iter()
            .all(|r| !r.name.starts_with("policy/api/")),
        "a web workload got api's policies"
    );
    let anonymous = test_rt
        .block_on(open_stream(p.cp, &ca, None, "api/backend"))
        .unwrap_err();
    assert_eq!(
        anonymous.code(),
        tonic::Code::Unauthenticated,
        "{anonymous:?}"
    );

    // Outage: the proxy keeps serving its last good configuration.
    cp.kill();
    wait_for(
        "the proxy to see the outage",
        Duration::from_secs(30),
        || metric(p.admin, "rampart_proxy_control_plane_connected") == Some(0),
        || proxy.log(),
    );
    assert_eq!(status(p.inbound, "/data"), Some(403));
    assert_eq!(status(p.inbound, "/admin"), Some(200));

    // An edit made while the control plane was down reaches the proxy when it is back.
    let cp = ControlPlane::start(&cacerts, &state, p.cp);
    cp.publish(snapshot(&snap_dir, &p, "/admin", ""));
    wait_for(
        "the resync to bring the edit made during the outage",
        Duration::from_secs(30),
        || status(p.inbound, "/data") == Some(200),
        || proxy.log(),
    );
    assert_eq!(status(p.inbound, "/admin"), Some(403));
    assert!(metric(p.admin, "rampart_proxy_control_plane_connects_total") >= Some(2));
    // The resync sent only the difference: the proxy said what it held, and only the mesh
    // settings changed since (the policy is back to what it held, the registry the same).
    assert_eq!(cp.stats.resources_sent.load(Ordering::Relaxed), 1);

    // The wrong-SAN twin never got a configuration: it never listened, and says why.
    let log = wrong_san.log();
    assert!(
        log.contains("config stream failed") && !log.contains("config push accepted"),
        "{log}"
    );
    drop(cp);
    drop(proxy);
    drop(wrong_san);
    test_rt.shutdown_background();
}

/// The binary wiring: `rampart ca --config-folder DIR` serves the watched folder on the CA
/// port; a folder edit reaches a `rampart proxy --control-plane`. Its twin: a folder that
/// is not a directory is refused at start, naming the flag.
#[test]
fn ca_binary_serves_its_config_folder() {
    let w = tempfile::tempdir().unwrap();
    let wp = w.path();
    let root = wp.join("root");
    let cacerts = wp.join("cacerts");
    rampart(&["certs", "root", "--out", root.to_str().unwrap()]);
    rampart(&[
        "certs",
        "intermediate",
        "--root",
        root.to_str().unwrap(),
        "--name",
        "control-plane",
        "--out",
        cacerts.to_str().unwrap(),
    ]);
    let ca = TestCa::from_dir(&root);
    let p = Ports {
        app: free_port(),
        inbound: free_port(),
        admin: free_port(),
        cp: free_port(),
        other_app: free_port(),
        other_in: free_port(),
    };
    support::app_200(p.app);
    let folder = wp.join("mesh");
    snapshot(&folder, &p, "/admin", "");

    let bad = Command::new(rampart_bin())
        .args(["ca", "--cacerts"])
        .arg(&cacerts)
        .arg("--state")
        .arg(wp.join("state-bad"))
        .args(["--listen", "127.0.0.1:0", "--config-folder"])
        .arg(wp.join("missing"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--config-folder"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    let log = wp.join("ca.log");
    let metrics_port = free_port();
    let ca_proc = Proc {
        child: Command::new(rampart_bin())
            .args(["ca", "--cacerts"])
            .arg(&cacerts)
            .arg("--state")
            .arg(wp.join("state"))
            .args([
                "--listen",
                &format!("127.0.0.1:{}", p.cp),
                "--metrics",
                &format!("127.0.0.1:{metrics_port}"),
                "--config-folder",
            ])
            .arg(&folder)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(wp.join("ca.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        log,
    };

    let test_rt = tokio::runtime::Runtime::new().unwrap();
    let sds = wp.join("sds.sock");
    let _standin = {
        let _g = test_rt.enter();
        sds_standin::start(&sds, Some(ca.secrets(BACKEND_ID, 1)))
    };
    let proxy = start_proxy(p.cp, &sds, None, wp.join("proxy.log"));
    let logs = || format!("{}\n--- ca ---\n{}", proxy.log(), ca_proc.log());
    wait_for(
        "the folder's configuration to be served",
        Duration::from_secs(30),
        || status(p.inbound, "/data") == Some(200),
        logs,
    );
    assert_eq!(status(p.inbound, "/admin"), Some(403));

    let policy = std::fs::read_to_string(folder.join("policy.yaml"))
        .unwrap()
        .replace("['/admin']", "['/data']");
    write_atomic(&folder.join("policy.yaml"), &policy);
    wait_for(
        "the folder edit to reach the proxy",
        Duration::from_secs(30),
        || status(p.inbound, "/data") == Some(403),
        logs,
    );
    assert_eq!(status(p.inbound, "/admin"), Some(200));

    // The config stream's counters on the CA's /metrics: one proxy connected, its first
    // push and the edit pushed and acknowledged, nothing refused.
    let scrape = || {
        let mut s = TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let value = |text: &str, name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    };
    wait_for(
        "the edit's ACK to be counted",
        Duration::from_secs(30),
        || value(&scrape(), "rampart_config_stream_acks_total").is_some_and(|n| n >= 2),
        logs,
    );
    let m = scrape();
    assert!(m.contains("citadel_server_csr_count"), "{m}");
    assert_eq!(value(&m, "rampart_config_streams"), Some(1), "{m}");
    assert!(
        value(&m, "rampart_config_stream_pushes_total").is_some_and(|n| n >= 2),
        "{m}"
    );
    assert!(
        value(&m, "rampart_config_stream_resources_sent_total").is_some_and(|n| n >= 3),
        "{m}"
    );
    assert_eq!(
        value(&m, "rampart_config_stream_nacks_total"),
        Some(0),
        "{m}"
    );
    assert_eq!(
        value(&m, "rampart_config_stream_refused_total"),
        Some(0),
        "{m}"
    );
    assert!(
        value(&m, "rampart_config_models_total").is_some_and(|n| n >= 2),
        "{m}"
    );
    drop(proxy);
    drop(ca_proc);
    test_rt.shutdown_background();
}
