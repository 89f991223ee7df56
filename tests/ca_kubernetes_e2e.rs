//! `rampart ca --kubernetes` (the real binary) against a FAKE Kubernetes API server: the fake
//! of k8s/tests/support/fake_api.rs served over plain HTTP on loopback, named by a kubeconfig.
//! No cluster is involved; the CA process, its kube-rs client, TLS and gRPC are real.
//!
//! Shows: the first CA creates Secret istio-ca-secret and serves its root, a second one
//! loads it (one root); a reviewed token gets a certificate; a wrong clusterid or an unknown
//! token is refused; node impersonation passes for a Pod on the caller's node and fails for
//! one on another node; ConfigMap istio-ca-root-cert appears in every namespace (one new
//! after start too) and comes back when deleted; a `cacerts` Secret that appears while the CA
//! runs is picked up without a restart (new bundle served and published). And the config
//! stream: two host processes playing Pods take their configuration from the CA, which
//! builds it from the fake's Pods, Service and AuthorizationPolicy objects; a policy written
//! to the API turns their call from 200 into 403 and back, a broken policy object is refused
//! alone, and a proxy claiming another service account's workload gets nothing.

#[path = "../k8s/tests/support/fake_api.rs"]
mod fake_api;
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use fake_api::{FakeApi, FakeToken, fake_jwt};
use rampart_certs::{CertInfo, KeyAlgorithm, PrivateKey, SpiffeId, TrustBundle};
use rampart_proto::istio::v1::auth::IstioCertificateRequest;
use rampart_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use support::{Proc, wait_for};
use tonic::transport::Channel;

const SECRETS: &str = "/api/v1/namespaces/istio-system/secrets";

fn kubeconfig(dir: &Path, api: SocketAddr) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{api}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: ca\n\
             current-context: fake\nusers:\n- name: ca\n  user:\n    token: ca-token\n"
        ),
    )
    .unwrap();
    path
}

/// Starts `rampart ca --kubernetes`; returns it, its address and its stdout lines so far.
fn start_ca(dir: &Path, kc: &Path, name: &str, extra: &[&str]) -> (Proc, SocketAddr, Vec<String>) {
    let log = dir.join(format!("{name}.log"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args([
            "ca",
            "--listen",
            "127.0.0.1:0",
            "--kubernetes",
            "--kubeconfig",
        ])
        .arg(kc)
        .args(["--cluster-id", "Kubernetes"])
        .args(["--trusted-node-accounts", "istio-system/ztunnel"])
        .args([
            "--root-publish-interval",
            "300ms",
            "--reload-interval",
            "300ms",
        ])
        .arg("--cacerts")
        .arg(dir.join(name).join("cacerts"))
        .arg("--state")
        .arg(dir.join(name).join("state"))
        .arg("--bundle-out")
        .arg(dir.join(name).join("bundle.pem"))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start rampart ca");
    let rx = support::stdout_lines(&mut child);
    let proc = Proc { child, log };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("rampart ca did not start:\n{lines:?}\n{}", proc.log()));
        lines.push(line.clone());
        if let Some(rest) = line.strip_prefix("rampart ca: listening on ") {
            let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
            return (proc, addr, lines);
        }
    }
}

async fn client(bundle: &Path, addr: SocketAddr) -> IstioCertificateServiceClient<Channel> {
    let bundle = TrustBundle::from_pem(&std::fs::read_to_string(bundle).unwrap()).unwrap();
    let tls = rampart_citadel::client::config(&bundle, None).unwrap();
    rampart_citadel::client::connect(addr, "127.0.0.1", Arc::new(tls))
        .await
        .expect("connect to the CA")
}

async fn call(
    c: &mut IstioCertificateServiceClient<Channel>,
    id: &str,
    token: &str,
    cluster: Option<&str>,
    impersonate: Option<&str>,
) -> Result<String, tonic::Status> {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = rampart_certs::build_csr(&key, &SpiffeId::parse(id).unwrap()).unwrap();
    let metadata = impersonate.map(|id| prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.to_owned())),
            },
        )]
        .into_iter()
        .collect(),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    if let Some(c) = cluster {
        req.metadata_mut().insert("clusterid", c.parse().unwrap());
    }
    let chain = c.create_certificate(req).await?.into_inner().cert_chain;
    let leaf = rampart_certs::parse_certs_pem(&chain[0]).unwrap();
    Ok(CertInfo::parse(&leaf[0]).unwrap().uri_sans.join(","))
}

fn root_fingerprint_of_pem(pem: &str) -> String {
    let certs = rampart_certs::parse_certs_pem(pem).unwrap();
    CertInfo::parse(&certs[0]).unwrap().sha256_fingerprint
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_in_kubernetes_mode_against_a_fake_api_server() {
    let fake = FakeApi::new();
    let api = fake.serve_http().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), api);
    for ns in ["istio-system", "ns1"] {
        fake.put(
            "/api/v1/namespaces",
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        );
    }

    let (ca1, addr, lines) = start_ca(dir.path(), &kc, "one", &[]);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("Secret istio-ca-secret (created)")),
        "{lines:?}"
    );
    let secret = fake
        .get(SECRETS, "istio-ca-secret")
        .expect("Secret created");
    let secret_root = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(secret["data"]["ca-cert.pem"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let bundle1 = std::fs::read_to_string(dir.path().join("one/bundle.pem")).unwrap();
    assert_eq!(
        root_fingerprint_of_pem(&bundle1),
        root_fingerprint_of_pem(&secret_root),
        "the CA serves the Secret's root"
    );

    // A second replica loads the same root and writes nothing.
    let (ca2, _, lines2) = start_ca(dir.path(), &kc, "two", &[]);
    assert!(
        lines2
            .iter()
            .any(|l| l.contains("Secret istio-ca-secret (loaded)")),
        "{lines2:?}"
    );
    let bundle2 = std::fs::read_to_string(dir.path().join("two/bundle.pem")).unwrap();
    assert_eq!(
        root_fingerprint_of_pem(&bundle1),
        root_fingerprint_of_pem(&bundle2)
    );
    assert_eq!(fake.count(&format!("POST {SECRETS}")), 1);

    // The root ConfigMap: in every namespace, in a new one, and back after a delete, with
    // the Lease taken (one writer at a time is shown in k8s/tests/kube_root_publisher.rs).
    let published = |ns: &str| {
        fake.get(
            &format!("/api/v1/namespaces/{ns}/configmaps"),
            "istio-ca-root-cert",
        )
        .and_then(|cm| cm["data"]["root-cert.pem"].as_str().map(str::to_owned))
    };
    let log = || format!("{}\n{}", ca1.log(), ca2.log());
    wait_for(
        "istio-ca-root-cert in istio-system and ns1",
        Duration::from_secs(10),
        || published("istio-system").is_some() && published("ns1").is_some(),
        log,
    );
    let root_pem = published("ns1").unwrap();
    assert_eq!(
        root_fingerprint_of_pem(&root_pem),
        root_fingerprint_of_pem(&bundle1)
    );
    fake.put(
        "/api/v1/namespaces",
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "late"}}),
    );
    fake.delete("/api/v1/namespaces/ns1/configmaps", "istio-ca-root-cert");
    wait_for(
        "istio-ca-root-cert in a new namespace and back in ns1",
        Duration::from_secs(10),
        || published("late").is_some() && published("ns1").is_some(),
        log,
    );
    let lease = fake
        .get(
            "/apis/coordination.k8s.io/v1/namespaces/istio-system/leases",
            "istio-namespace-controller-election",
        )
        .expect("Lease");
    assert!(
        lease["spec"]["holderIdentity"]
            .as_str()
            .is_some_and(|h| !h.is_empty())
    );
    drop(ca2);

    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let app = "spiffe://cluster.local/ns/ns1/sa/app";
    let tok = fake_jwt(exp, "app");
    fake.add_token(
        &tok,
        FakeToken::service_account("ns1", "app", &["istio-ca"]),
    );
    let mut c = client(&dir.path().join("one/bundle.pem"), addr).await;
    assert_eq!(
        call(&mut c, app, &tok, Some("Kubernetes"), None)
            .await
            .unwrap(),
        app
    );

    let err = call(&mut c, app, &tok, Some("other"), None)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Unauthenticated,
        "{}",
        err.message()
    );
    assert!(err.message().contains("clusterid"), "{}", err.message());
    let err = call(&mut c, app, &fake_jwt(exp, "nobody"), None, None)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Unauthenticated,
        "{}",
        err.message()
    );

    let zt = fake_jwt(exp, "zt");
    fake.add_pod("istio-system", "zt-a", "ztunnel", "node-a", "uid-zt-a");
    fake.add_token(
        &zt,
        FakeToken::service_account("istio-system", "ztunnel", &["istio-ca"])
            .bound_to_pod("zt-a", "uid-zt-a"),
    );
    fake.add_pod("ns1", "app-1", "app", "node-a", "uid-app-1");
    fake.add_pod("ns2", "far-1", "far", "node-b", "uid-far-1");
    assert_eq!(call(&mut c, app, &zt, None, Some(app)).await.unwrap(), app);
    let far = "spiffe://cluster.local/ns/ns2/sa/far";
    let err = call(&mut c, far, &zt, None, Some(far)).await.unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "{}",
        err.message()
    );

    // Plug-in material appears in Secret cacerts: the running CA switches to it (its
    // --bundle-out and the published ConfigMaps follow) without a restart.
    let made = tempfile::tempdir().unwrap();
    rampart_citadel::load_initial(
        &made.path().join("none"),
        &made.path().join("root"),
        &"cluster.local".parse().unwrap(),
        Duration::from_secs(3600 * 24 * 365),
        SystemTime::now(),
    )
    .unwrap();
    let new_root = std::fs::read_to_string(made.path().join("root/root-cert.pem")).unwrap();
    let new_key = std::fs::read_to_string(made.path().join("root/root-key.pem")).unwrap();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    fake.put(
        SECRETS,
        serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "cacerts", "namespace": "istio-system"},
            "data": {"ca-cert.pem": b64(&new_root), "ca-key.pem": b64(&new_key),
                     "root-cert.pem": b64(&new_root)}}),
    );
    let want = root_fingerprint_of_pem(&new_root);
    let bundle_path = dir.path().join("one/bundle.pem");
    wait_for(
        "the CA to serve and publish the cacerts root",
        Duration::from_secs(15),
        || {
            let served = std::fs::read_to_string(&bundle_path).unwrap_or_default();
            let published_ns1 = published("ns1").unwrap_or_default();
            served.contains(new_root.trim()) && published_ns1.contains(new_root.trim())
        },
        || ca1.log(),
    );
    let mut c = client(&bundle_path, addr).await;
    let chain_root = root_fingerprint_of_pem(issue_chain(&mut c, app, &tok).await.last().unwrap());
    assert_eq!(chain_root, want, "issued under the new plug-in root");
    drop(ca1);
}

/// The CA in Kubernetes mode serves proxies their configuration from the cluster's objects
/// (as istiod serves certificates and config on one port): two host processes play Pods
/// `mesh/web-1` and `mesh/client-1` (`rampart agent` + `rampart proxy --control-plane`),
/// Service `web` selects web-1, and the call client -> web goes through both proxies. An
/// AuthorizationPolicy written to the (fake) API turns it into 403, and deleting it back
/// into 200; a policy object the CA cannot accept is refused alone (the last good
/// configuration keeps serving). The real API server version of this is in
/// tests/kubernetes_e2e.rs (opt-in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_policy_reaches_proxies_through_the_ca_stream() {
    let fake = FakeApi::new();
    // A real API server serves each security.istio.io object at v1 and v1beta1.
    fake.alias_version(
        "/apis/security.istio.io/v1beta1",
        "/apis/security.istio.io/v1",
    );
    let api = fake.serve_http().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), api);
    for ns in ["istio-system", "mesh"] {
        fake.put(
            "/api/v1/namespaces",
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        );
    }
    let target = support::free_port();
    let outbound = support::free_port();
    support::app_200(target);
    let pod = |name: &str, sa: &str, ip: &str, annotations: serde_json::Value| {
        fake.put(
            "/api/v1/namespaces/mesh/pods",
            serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "mesh", "labels": {"app": sa},
                             "annotations": annotations},
                "spec": {"serviceAccountName": sa, "nodeName": "node-1",
                         "containers": [{"name": "app"}]},
                "status": {"phase": "Running", "podIP": ip}}),
        );
    };
    pod(
        "web-1",
        "web",
        "127.0.0.51",
        serde_json::json!({"proxy.rampart.io/outbound": "none",
            "proxy.rampart.io/admin": format!("127.0.0.1:{}", support::free_port())}),
    );
    pod(
        "client-1",
        "client",
        "127.0.0.52",
        serde_json::json!({"proxy.rampart.io/outbound": format!("127.0.0.1:{outbound}"),
            "proxy.rampart.io/admin": format!("127.0.0.1:{}", support::free_port())}),
    );
    fake.put(
        "/api/v1/namespaces/mesh/services",
        serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "mesh"},
            "spec": {"selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": target}]}}),
    );
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let mut tokens = Vec::new();
    for sa in ["web", "client"] {
        let token = fake_jwt(exp, sa);
        fake.add_token(
            &token,
            FakeToken::service_account("mesh", sa, &["istio-ca"]),
        );
        tokens.push(token);
    }

    let metrics_port = support::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let (ca, addr, lines) = start_ca(dir.path(), &kc, "cp", &["--metrics", &metrics_addr]);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("serving proxy configuration") && l.contains("istio-system")),
        "{lines:?}"
    );
    let bundle = dir.path().join("cp/bundle.pem");
    let web = support::PodSidecar::start(
        &dir.path().join("web"),
        "mesh",
        "web",
        "web-1",
        &tokens[0],
        addr,
        &bundle,
    );
    let client = support::PodSidecar::start(
        &dir.path().join("client"),
        "mesh",
        "client",
        "client-1",
        &tokens[1],
        addr,
        &bundle,
    );
    let logs = || {
        format!(
            "--- client proxy\n{}\n--- client agent\n{}\n--- web proxy\n{}\n--- CA\n{}",
            client.proxy.log(),
            client.agent.log(),
            web.proxy.log(),
            ca.log()
        )
    };
    let proxy = SocketAddr::from(([127, 0, 0, 1], outbound));
    let host = "web.mesh.svc.cluster.local";
    let url = format!("http://{host}/");
    let call = || support::get_via(proxy, &url, host);
    wait_for(
        "client-1 -> web through two proxies configured by the CA's stream",
        Duration::from_secs(60),
        || call() == Some(200),
        logs,
    );

    let policies = "/apis/security.istio.io/v1/namespaces/mesh/authorizationpolicies";
    fake.put(
        policies,
        serde_json::json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-client", "namespace": "mesh"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
                     "rules": [{"from": [{"source": {
                         "principals": ["cluster.local/ns/mesh/sa/client"]}}]}]}}),
    );
    wait_for(
        "the DENY policy to turn 200 into 403",
        Duration::from_secs(30),
        || call() == Some(403),
        logs,
    );
    // An object the CA cannot accept is refused alone: the DENY keeps applying.
    fake.put(
        policies,
        serde_json::json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "broken", "namespace": "mesh"},
            "spec": {"action": "MAYBE"}}),
    );
    wait_for(
        "the broken policy to be refused",
        Duration::from_secs(30),
        || ca.log().contains("mesh/broken"),
        logs,
    );
    assert_eq!(call(), Some(403), "{}", logs());
    // The refusal and the two streams on the CA's /metrics.
    let metrics = || {
        let mut out = String::new();
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", metrics_port)) {
            use std::io::{Read as _, Write as _};
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n\r\n");
            let _ = s.read_to_string(&mut out);
        }
        out
    };
    wait_for(
        "the refused object and the streams in the CA's metrics",
        Duration::from_secs(30),
        || {
            let m = metrics();
            m.contains("rampart_config_rejected_objects{kind=\"AuthorizationPolicy\"} 1")
                && m.lines().any(|l| l == "rampart_config_streams 2")
        },
        metrics,
    );
    // The refused object leaves a fail-closed stand-in (an ALLOW that did not read allows
    // nothing in its namespace): with the DENY gone, the call is still refused...
    let reloads = || {
        web.proxy
            .log()
            .matches("new configuration in force")
            .count()
    };
    let before = reloads();
    fake.delete(policies, "deny-client").unwrap();
    wait_for(
        "the web proxy to apply the deletion",
        Duration::from_secs(30),
        || reloads() > before,
        logs,
    );
    assert_eq!(call(), Some(403), "{}", logs());
    // ...until the broken object is fixed or removed.
    fake.delete(policies, "broken").unwrap();
    wait_for(
        "the deleted policies to let the call through again",
        Duration::from_secs(30),
        || call() == Some(200),
        logs,
    );
    // Negative twin of the stream's authentication: a proxy claiming a workload of another
    // service account gets no configuration (its stream is refused), so it never listens.
    let impostor_out = support::free_port();
    pod(
        "impostor-1",
        "web",
        "127.0.0.53",
        serde_json::json!({"proxy.rampart.io/outbound": format!("127.0.0.1:{impostor_out}"),
            "proxy.rampart.io/admin": "none"}),
    );
    let impostor = support::PodSidecar::start(
        &dir.path().join("impostor"),
        "mesh",
        "client",
        "impostor-1",
        &tokens[1],
        addr,
        &bundle,
    );
    wait_for(
        "the impostor's stream to be refused",
        Duration::from_secs(30),
        || {
            impostor.proxy.log().contains("PermissionDenied")
                || impostor.proxy.log().contains("permission")
        },
        || impostor.proxy.log(),
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", impostor_out)).is_err(),
        "a proxy without its configuration listens"
    );
}

#[test]
fn kubernetes_flags_are_checked() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
            .arg("ca")
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should be refused");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--kubeconfig", "/nonexistent"]);
    assert!(err.contains("--kubernetes"), "{err}");
    let err = run(&["--kubernetes", "--trusted-node-accounts", "ztunnel"]);
    assert!(err.contains("NAMESPACE/SERVICE_ACCOUNT"), "{err}");
    let err = run(&["--kubernetes", "--jwt-issuer", "x", "--jwks", "/x"]);
    assert!(err.contains("TokenReview"), "{err}");
    // The ConfigMap name goes into a field selector: nothing that could add a term.
    let err = run(&[
        "--kubernetes",
        "--mesh-configmap",
        "istio,metadata.namespace=x",
    ]);
    assert!(err.contains("--mesh-configmap"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err = run(&[
        "--kubernetes",
        "--kubeconfig",
        "/nonexistent/kubeconfig",
        "--state",
        dir.path().join("s").to_str().unwrap(),
        "--cacerts",
        dir.path().join("c").to_str().unwrap(),
    ]);
    assert!(err.contains("/nonexistent/kubeconfig"), "{err}");
}

/// A certificate from `c` for `id` (token `tok`): its serial (lowercase hex).
/// A certificate for `id` with bearer token `tok`: the chain's PEMs, leaf first.
async fn issue_chain(
    c: &mut IstioCertificateServiceClient<Channel>,
    id: &str,
    tok: &str,
) -> Vec<String> {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = rampart_certs::build_csr(&key, &SpiffeId::parse(id).unwrap()).unwrap();
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata: None,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {tok}").parse().unwrap());
    c.create_certificate(req)
        .await
        .unwrap()
        .into_inner()
        .cert_chain
}

async fn issue_serial(
    c: &mut IstioCertificateServiceClient<Channel>,
    id: &str,
    tok: &str,
) -> String {
    let chain = issue_chain(c, id, tok).await;
    let leaf = rampart_certs::parse_certs_pem(&chain[0]).unwrap();
    CertInfo::parse(&leaf[0]).unwrap().serial_hex
}

/// The serials on the CRLs in `pem` (published-crls.pem, istio-ca-crl).
fn crl_serials(pem: &str) -> Vec<String> {
    rampart_certs::parse_crls_pem(pem)
        .map(|crls| {
            crls.iter()
                .flat_map(|c| c.revoked_certs().map(|r| r.serial_hex.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// Issue #14 with #13: `rampart ca revoke` on one replica (its admin socket) reaches the other
/// replica's CRL (its published-crls.pem, what GetCrls serves) and `istio-ca-crl` through
/// ConfigMap rampart-ca-revocations, whichever replica holds the Lease; a certificate not
/// revoked is on neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_reaches_the_other_and_istio_ca_crl() {
    let fake = FakeApi::new();
    let api = fake.serve_http().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), api);
    for ns in ["istio-system", "ns1"] {
        fake.put(
            "/api/v1/namespaces",
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        );
    }
    let (one, addr, _) = start_ca(dir.path(), &kc, "one", &[]);
    let (two, two_addr, _) = start_ca(dir.path(), &kc, "two", &[]);
    let log = || format!("{}\n{}", one.log(), two.log());
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let app = "spiffe://cluster.local/ns/ns1/sa/app";
    let tok = fake_jwt(exp, "app");
    fake.add_token(
        &tok,
        FakeToken::service_account("ns1", "app", &["istio-ca"]),
    );
    let mut c = client(&dir.path().join("one/bundle.pem"), addr).await;
    let revoked = issue_serial(&mut c, app, &tok).await;
    let kept = issue_serial(&mut c, app, &tok).await;
    let unshared = issue_serial(&mut c, app, &tok).await;
    let revoke = |serial: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["ca", "revoke", "--state"])
            .arg(dir.path().join("one/state"))
            .args(["--serial", serial, "--reason", "keyCompromise"])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };

    let (ok, out) = revoke(&revoked);
    assert!(ok, "{out}");
    // The command waited until the serial was in the shared object, and says so.
    assert!(
        out.contains(
            "shared with the other CA replicas through ConfigMap istio-system/rampart-ca-revocations"
        ),
        "{out}"
    );
    let two_crls = || {
        crl_serials(
            &std::fs::read_to_string(dir.path().join("two/state/published-crls.pem"))
                .unwrap_or_default(),
        )
    };
    let istio_ca_crl = || {
        fake.get("/api/v1/namespaces/ns1/configmaps", "istio-ca-crl")
            .and_then(|cm| cm["data"]["ca-crl.pem"].as_str().map(crl_serials))
            .unwrap_or_default()
    };
    wait_for(
        "the other replica's CRL and istio-ca-crl to carry the revoked serial",
        Duration::from_secs(15),
        || two_crls().contains(&revoked) && istio_ca_crl().contains(&revoked),
        log,
    );
    let shared = fake
        .get(
            "/api/v1/namespaces/istio-system/configmaps",
            "rampart-ca-revocations",
        )
        .expect("rampart-ca-revocations");
    let text = shared["data"]["revocations.json"].as_str().unwrap();
    assert!(
        text.contains(&revoked) && text.contains("keyCompromise"),
        "{text}"
    );
    // The twin: the certificate not revoked is on no CRL and not shared.
    assert!(!two_crls().contains(&kept));
    assert!(!istio_ca_crl().contains(&kept));
    assert!(!text.contains(&kept), "{text}");

    // When the object cannot be written (here: the Role lost `update`), the command says the
    // revocation is NOT shared, names why, and fails; replica one enforces it meanwhile.
    let cms = "/api/v1/namespaces/istio-system/configmaps";
    fake.refuse_writes(cms, true);
    let (ok, out) = revoke(&unshared);
    assert!(!ok, "{out}");
    assert!(
        out.contains("revoked serial")
            && out.contains("NOT YET SHARED")
            && out.contains("forbidden"),
        "{out}"
    );
    let one_crls = || {
        crl_serials(
            &std::fs::read_to_string(dir.path().join("one/state/published-crls.pem"))
                .unwrap_or_default(),
        )
    };
    assert!(one_crls().contains(&unshared));
    assert!(!two_crls().contains(&unshared));
    // Rerun once writes work again: already revoked, and now shared.
    fake.refuse_writes(cms, false);
    let (ok, out) = revoke(&unshared);
    assert!(ok, "{out}");
    assert!(
        out.contains("already revoked") && out.contains("shared with the other CA replicas"),
        "{out}"
    );
    wait_for(
        "the other replica's CRL to carry the serial shared late",
        Duration::from_secs(15),
        || two_crls().contains(&unshared),
        log,
    );

    // Revoking an identity on replica one reaches the certificates replica two issued to it
    // (only two's audit log knows them); one issued afterwards stays valid.
    let db = "spiffe://cluster.local/ns/ns1/sa/db";
    let db_tok = fake_jwt(exp, "db");
    fake.add_token(
        &db_tok,
        FakeToken::service_account("ns1", "db", &["istio-ca"]),
    );
    let mut c2 = client(&dir.path().join("two/bundle.pem"), two_addr).await;
    let by_two = issue_serial(&mut c2, db, &db_tok).await;
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["ca", "revoke", "--state"])
        .arg(dir.path().join("one/state"))
        .args(["--spiffe-id", db, "--reason", "keyCompromise"])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "this replica issued no unexpired certificate to {db}"
        )) && said.contains("identity revocation recorded")
            && said.contains("shared with the other CA replicas"),
        "{said}"
    );
    wait_for(
        "both replicas' CRLs to carry the certificate replica two issued to the identity",
        Duration::from_secs(15),
        || two_crls().contains(&by_two) && one_crls().contains(&by_two),
        log,
    );
    let after = issue_serial(&mut c2, db, &db_tok).await;
    std::thread::sleep(Duration::from_millis(500));
    assert!(!two_crls().contains(&after) && !one_crls().contains(&after));

    // Revoking by serial on the replica that did NOT issue it: replica one knows nothing of
    // `after` (replica two's audit log does), yet the serial goes on both CRLs, identity
    // unknown on one, and the command says so and that it is shared.
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["ca", "revoke", "--state"])
        .arg(dir.path().join("one/state"))
        .args(["--serial", &after])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "revoked serial {after} (not issued by this replica"
        )) && said.contains("shared with the other CA replicas"),
        "{said}"
    );
    wait_for(
        "both replicas' CRLs to carry the serial revoked on the replica that did not issue it",
        Duration::from_secs(15),
        || two_crls().contains(&after) && one_crls().contains(&after),
        log,
    );
    // Its twin: another certificate replica two issued stays off both CRLs.
    let untouched = issue_serial(&mut c2, db, &db_tok).await;
    std::thread::sleep(Duration::from_millis(500));
    assert!(!two_crls().contains(&untouched) && !one_crls().contains(&untouched));
    drop((one, two));
}
