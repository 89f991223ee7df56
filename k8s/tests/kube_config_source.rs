//! Policy and registry from the API (issue #14 item 2), against a FAKE API server: no
//! cluster is involved. `rampart_k8s::KubeConfigSource` runs its real kube-runtime watches
//! through a real `kube::Client` over the in-process fake of `support/fake_api.rs`, which
//! answers lists and streams watch events (`?watch=true&resourceVersion=N`) as an API
//! server does. The snapshots feed in-process proxies (`Proxy::start` with the source's
//! update stream), their certificates from the proxy's SDS stand-in.
//!
//! - Initial sync → a snapshot (and none before every watch listed once: fail closed);
//!   calls spread over a Service's endpoints; an AuthorizationPolicy added through a watch
//!   event → a new snapshot → the proxies turn a 200 into a 403; an endpoint Pod deleted →
//!   calls go to the other one; the last deleted → no destination (502); a watch outage
//!   keeps the last objects.
//! - An invalid object is refused alone: Event posted (once per resourceVersion, once for
//!   an object served at v1 and v1beta1), metric counted, log line naming namespace/name,
//!   field and reason; the valid objects beside it still apply.

mod support;

#[path = "../../proxy/tests/support/sds_standin.rs"]
mod sds_standin;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rampart_certs::TrustDomain;
use rampart_k8s::{KubeConfigSource, SourceMetrics};
use rampart_mesh::MeshFolder;
use rampart_mesh::kube::{ANNOTATION_OUTBOUND, KubeSettings};
use rampart_mesh::watch::Updates;
use rampart_proxy::{Proxy, ProxyOptions};
use serde_json::{Value, json};
use support::fake_api::FakeApi;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "cluster.local";
const AP_V1: &str = "/apis/security.istio.io/v1/namespaces/api/authorizationpolicies";
const PA_V1: &str = "/apis/security.istio.io/v1/namespaces/api/peerauthentications";

// === log capture ===

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let w = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter("rampart_k8s=info,rampart_proxy=info")
            .with_ansi(false)
            .with_writer(move || w.clone())
            .init();
        logs
    })
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned()
}

// === the cluster ===

fn namespace(fake: &FakeApi, name: &str) {
    fake.put(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    );
}

fn pod(fake: &FakeApi, ns: &str, name: &str, sa: &str, ip: &str, labels: Value, ann: Value) {
    fake.put(
        &format!("/api/v1/namespaces/{ns}/pods"),
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": ann},
            "spec": {"serviceAccountName": sa, "nodeName": "node-1", "containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": ip}}),
    );
}

fn service(fake: &FakeApi, ns: &str, name: &str, selector: Value, ports: Value) {
    fake.put(
        &format!("/api/v1/namespaces/{ns}/services"),
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": selector, "ports": ports}}),
    );
}

fn policy(fake: &FakeApi, collection: &str, kind: &str, name: &str, spec: Value) {
    fake.put(
        collection,
        json!({"apiVersion": "security.istio.io/v1", "kind": kind,
            "metadata": {"name": name, "namespace": "api"}, "spec": spec}),
    );
}

fn start_source(fake: &FakeApi) -> (Updates, Arc<SourceMetrics>) {
    start_source_with(fake, |_| {})
}

fn start_source_with(
    fake: &FakeApi,
    change: impl FnOnce(&mut KubeSettings),
) -> (Updates, Arc<SourceMetrics>) {
    let mut settings = KubeSettings::new(TrustDomain::new(TD).unwrap());
    settings.proxy_outbound = None;
    settings.proxy_admin = None;
    change(&mut settings);
    let src =
        KubeConfigSource::new(fake.client(), settings).with_debounce(Duration::from_millis(50));
    let metrics = src.metrics();
    (src.start(), metrics)
}

/// The next snapshot satisfying `want` (earlier ones are skipped).
async fn snapshot_where(updates: &mut Updates, want: impl Fn(&MeshFolder) -> bool) -> MeshFolder {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let u = tokio::time::timeout_at(deadline, updates.next())
            .await
            .expect("no matching snapshot within 30 s")
            .expect("the source stopped");
        let snap = u.expect("the Kubernetes source sends snapshots, not refusals");
        if want(&snap) {
            return snap;
        }
    }
}

/// How many rules the AuthorizationPolicy `name` has in the snapshot.
fn rules_of(s: &MeshFolder, name: &str) -> Option<usize> {
    s.resources.iter().find_map(|r| match r {
        rampart_authz::Resource::AuthorizationPolicy(p) if r.name() == name => {
            Some(p.spec.rules.as_ref().map_or(0, Vec::len))
        }
        _ => None,
    })
}

fn policy_names(s: &MeshFolder) -> Vec<String> {
    let mut v: Vec<String> = s
        .resources
        .iter()
        .map(|r| format!("{}/{}", r.namespace(), r.name()))
        .collect();
    v.sort();
    v
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..300 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}")
}

// === the app and its calls ===

/// An HTTP/1.1 app on `127.0.0.1:0` answering `200 app <path>`.
async fn app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                while let Some(head) = read_head(&mut s).await {
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let body = format!("app {path}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(1) => buf.push(b[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// A call of the client app through its proxy's outbound listener: status and body.
async fn call(outbound: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(outbound).await.ok()?;
    let req =
        format!("GET http://{host}{path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

async fn until(want: u16, outbound: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    let mut last = None;
    for _ in 0..150 {
        last = call(outbound, host, path).await;
        if last.as_ref().is_some_and(|(s, _)| *s == want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// Start the proxy of `key` (`ns/pod`) with identity `ns`/`sa` from `snapshot`.
async fn proxy(
    dir: &std::path::Path,
    ca: &sds_standin::TestCa,
    key: &str,
    sa: &str,
    snapshot: MeshFolder,
    updates: Updates,
) -> (Proxy, sds_standin::StandIn) {
    let (ns, name) = key.split_once('/').unwrap();
    let socket = dir.join(format!("{name}.sock"));
    let secrets = ca.secrets(&format!("spiffe://{TD}/ns/{ns}/sa/{sa}"), 1);
    let standin = sds_standin::start(&socket, Some(secrets));
    let mut opts = ProxyOptions::new(dir.into(), key.to_string(), socket);
    opts.admin = Some("127.0.0.7:0".parse().unwrap());
    let p = Proxy::start(opts, snapshot, Some(updates)).await.unwrap();
    (p, standin)
}

/// A port free on 127.0.0.1 (the app) and on each of `ips` (the Pod IPs the proxies
/// listen on).
async fn app_and_pod_port(ips: &[&str]) -> (SocketAddr, u16) {
    for _ in 0..20 {
        let a = app().await;
        if ips
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, a.port())).is_ok())
        {
            return (a, a.port());
        }
    }
    panic!("no port free on 127.0.0.1 and {ips:?}");
}

/// Requests the proxy at `admin` counted as the destination (its inbound side).
async fn inbound_requests(admin: SocketAddr) -> u64 {
    let Some((200, text)) = get_path(admin, "/stats/prometheus").await else {
        return 0;
    };
    text.lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{") && l.contains("reporter=\"destination\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn get_path(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_string()))
}

/// Call until `n` answers in a row have status `want` (each proxy applies a snapshot on
/// its own time); the last answer.
async fn until_steady(
    want: u16,
    n: usize,
    out: SocketAddr,
    host: &str,
    path: &str,
) -> Option<(u16, String)> {
    let mut last = None;
    let mut streak = 0;
    for _ in 0..200 {
        last = call(out, host, path).await;
        if last.as_ref().is_some_and(|(s, _)| *s == want) {
            streak += 1;
            if streak == n {
                break;
            }
        } else {
            streak = 0;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_change_policy_and_endpoints_of_running_proxies() {
    let _ = logs();
    let fake = FakeApi::new();
    let (_app, port) = app_and_pod_port(&["127.0.0.2", "127.0.0.5"]).await;
    namespace(&fake, "api");
    namespace(&fake, "web");
    for (name, ip) in [("backend-1", "127.0.0.2"), ("backend-2", "127.0.0.5")] {
        pod(
            &fake,
            "api",
            name,
            "backend",
            ip,
            json!({"app": "backend"}),
            json!({}),
        );
    }
    pod(
        &fake,
        "web",
        "client-1",
        "client",
        "127.0.0.3",
        json!({"app": "client"}),
        json!({ANNOTATION_OUTBOUND: "127.0.0.4:0"}),
    );
    service(
        &fake,
        "api",
        "backend",
        json!({"app": "backend"}),
        json!([{"name": "http-web", "port": 80, "targetPort": port, "protocol": "TCP"}]),
    );
    let (mut source, metrics) = start_source(&fake);

    // Initial sync: one snapshot with the Pods, the Service and its endpoints.
    let first = snapshot_where(&mut source, |_| true).await;
    assert!(first.resources.is_empty());
    let reg = &first.registry;
    assert_eq!(reg.workloads.len(), 3, "{reg:?}");
    assert_eq!(
        reg.service("api", "backend").unwrap().endpoints,
        ["api/backend-1", "api/backend-2"]
    );
    let t = reg
        .resolve_target("backend.api.svc.cluster.local:80", "web")
        .unwrap();
    assert_eq!(t.workload.key(), "api/backend-1");
    assert_eq!(t.port.inbound, SocketAddr::from(([127, 0, 0, 2], port)));
    assert_eq!(t.port.app, SocketAddr::from(([127, 0, 0, 1], port)));
    assert_eq!(t.port.protocol, rampart_mesh::PortProtocol::Http);
    assert_eq!(metrics.snapshots(), 1);

    // Every proxy and the test read every later snapshot.
    let mut txs = Vec::new();
    let mut updates = Vec::new();
    for _ in 0..4 {
        let (tx, u) = Updates::channel(8);
        txs.push(tx);
        updates.push(u);
    }
    tokio::spawn(async move {
        while let Some(u) = source.next().await {
            for tx in &txs {
                let _ = tx.send(u.clone()).await;
            }
        }
    });
    let mut seen = updates.pop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = sds_standin::TestCa::new("kube-source-root");
    let mut proxies = Vec::new();
    for (key, sa) in [
        ("api/backend-1", "backend"),
        ("api/backend-2", "backend"),
        ("web/client-1", "client"),
    ] {
        let u = updates.remove(0);
        proxies.push(proxy(dir.path(), &ca, key, sa, first.clone(), u).await);
    }
    let admins: Vec<SocketAddr> = proxies[..2]
        .iter()
        .map(|(p, _)| p.admin_addr().expect("admin listener"))
        .collect();
    let out = proxies[2]
        .0
        .listeners()
        .into_iter()
        .find(|(w, _)| w.starts_with("outbound"))
        .expect("the client's outbound listener")
        .1;
    let host = "backend.api.svc.cluster.local";

    // Positive: allowed before any policy, and spread over both endpoints.
    let r = until_steady(200, 6, out, host, "/admin").await;
    assert_eq!(r, Some((200, "app /admin".to_string())));
    for a in &admins {
        assert!(
            inbound_requests(*a).await > 0,
            "endpoint {a} got no request"
        );
    }

    // An AuthorizationPolicy arrives through a watch event: a new snapshot, and the same
    // call is denied by the servers' proxies.
    policy(
        &fake,
        AP_V1,
        "AuthorizationPolicy",
        "deny-web-admin",
        json!({"selector": {"matchLabels": {"app": "backend"}}, "action": "DENY",
               "rules": [{"from": [{"source": {"namespaces": ["web"]}}], "to": [{"operation": {"paths": ["/admin"]}}]}]}),
    );
    let snap = snapshot_where(&mut seen, |s| !s.resources.is_empty()).await;
    assert_eq!(policy_names(&snap), ["api/deny-web-admin"]);
    // It came through a watch (not a re-list): the fake served watches of both versions.
    for v in ["v1", "v1beta1"] {
        let watches = fake.count(&format!(
            "GET /apis/security.istio.io/{v}/authorizationpolicies?"
        ));
        assert!(watches >= 2, "list + watch of {v}: {:?}", fake.calls());
    }
    assert!(
        fake.calls()
            .iter()
            .any(|c| c.contains("/authorizationpolicies?")
                && c.contains("watch=true")
                && c.contains("resourceVersion=")),
        "{:?}",
        fake.calls()
    );
    let r = until_steady(403, 4, out, host, "/admin").await;
    assert_eq!(r, Some((403, "RBAC: access denied".to_string())));
    // Its twin: a path the policy does not name still passes.
    assert_eq!(
        call(out, host, "/public").await,
        Some((200, "app /public".to_string()))
    );

    // backend-1's Pod is deleted and its proxy stops: calls go to backend-2 only (a call
    // routed to backend-1 would fail, 503).
    fake.delete("/api/v1/namespaces/api/pods", "backend-1")
        .unwrap();
    let snap = snapshot_where(&mut seen, |s| s.registry.get("api", "backend-1").is_none()).await;
    assert_eq!(
        snap.registry.service("api", "backend").unwrap().endpoints,
        ["api/backend-2"]
    );
    let (server1, _sds) = proxies.remove(0);
    server1.shutdown().await;
    let r = until_steady(200, 6, out, host, "/public").await;
    assert_eq!(r, Some((200, "app /public".to_string())));

    // The last endpoint Pod is deleted: the service has no endpoint left.
    fake.delete("/api/v1/namespaces/api/pods", "backend-2")
        .unwrap();
    let snap = snapshot_where(&mut seen, |s| s.registry.get("api", "backend-2").is_none()).await;
    assert!(
        snap.registry
            .service("api", "backend")
            .unwrap()
            .endpoints
            .is_empty()
    );
    assert!(
        snap.registry
            .resolve_target("backend.api:80", "web")
            .is_none()
    );
    let r = until(502, out, host, "/public").await;
    assert_eq!(
        r.map(|(s, _)| s),
        Some(502),
        "a deleted Pod is no destination"
    );
    assert_eq!(metrics.rejections("Pod"), 0);
    drop(proxies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_object_is_refused_alone_with_an_event_and_a_metric() {
    let _ = logs();
    let fake = FakeApi::new();
    // The API server serves each security.istio.io object at v1 and v1beta1.
    fake.alias_version(
        "/apis/security.istio.io/v1beta1",
        "/apis/security.istio.io/v1",
    );
    namespace(&fake, "api");
    pod(
        &fake,
        "api",
        "backend-1",
        "backend",
        "10.0.0.1",
        json!({"app": "backend"}),
        json!({}),
    );
    policy(
        &fake,
        AP_V1,
        "AuthorizationPolicy",
        "good",
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}),
    );
    policy(
        &fake,
        AP_V1,
        "AuthorizationPolicy",
        "bad-action",
        json!({"action": "MAYBE"}),
    );
    policy(
        &fake,
        PA_V1,
        "PeerAuthentication",
        "strict",
        json!({"mtls": {"mode": "STRICT"}}),
    );
    let (mut source, metrics) = start_source(&fake);

    // The valid objects apply (each once, though watched at two versions); the invalid
    // one is refused alone, its fail-closed stand-in (an ALLOW that allows nothing, no
    // rule) in its place.
    let snap = snapshot_where(&mut source, |_| true).await;
    assert_eq!(
        policy_names(&snap),
        ["api/bad-action", "api/good", "api/strict"]
    );
    assert_eq!(rules_of(&snap, "bad-action"), Some(0));
    assert_eq!(snap.registry.workloads.len(), 1);

    let events = |name: &str| -> Vec<Value> {
        fake.objects("/api/v1/namespaces/api/events")
            .into_iter()
            .filter(|e| e["involvedObject"]["name"] == name)
            .collect()
    };
    let ev = wait_for("the Event of bad-action", || {
        events("bad-action").into_iter().next()
    })
    .await;
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["reason"], "RampartInvalidPolicy");
    assert_eq!(ev["involvedObject"]["kind"], "AuthorizationPolicy");
    assert_eq!(ev["involvedObject"]["namespace"], "api");
    let rv1 = fake.get(AP_V1, "bad-action").unwrap()["metadata"]["resourceVersion"].clone();
    assert_eq!(ev["involvedObject"]["resourceVersion"], rv1);
    assert!(
        ev["message"].as_str().unwrap().contains("spec.action"),
        "{ev}"
    );
    assert_eq!(metrics.rejections("AuthorizationPolicy"), 1);
    assert_eq!(metrics.rejected_now("AuthorizationPolicy"), 1);
    let text = log_text();
    let line = text
        .lines()
        .find(|l| l.contains("invalid object refused") && l.contains("api/bad-action"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{text}"));
    assert!(
        line.contains("field=spec.action") && line.contains("MAYBE"),
        "{line}"
    );
    // Valid objects have no Event.
    assert!(events("good").is_empty() && events("strict").is_empty());

    // Another change makes another snapshot: the same object version is not reported again.
    pod(
        &fake,
        "api",
        "backend-2",
        "backend",
        "10.0.0.2",
        json!({"app": "backend"}),
        json!({}),
    );
    snapshot_where(&mut source, |s| s.registry.workloads.len() == 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        events("bad-action").len(),
        1,
        "one Event per resourceVersion"
    );
    assert_eq!(metrics.rejections("AuthorizationPolicy"), 1);

    // A new version, still invalid: reported again.
    policy(
        &fake,
        AP_V1,
        "AuthorizationPolicy",
        "bad-action",
        json!({"action": "SOMETIMES"}),
    );
    wait_for("a second Event", || {
        (events("bad-action").len() == 2).then_some(())
    })
    .await;
    assert_eq!(metrics.rejections("AuthorizationPolicy"), 2);

    // Fixed: it applies as written (one rule), and nothing is refused any more.
    policy(
        &fake,
        AP_V1,
        "AuthorizationPolicy",
        "bad-action",
        json!({"action": "ALLOW", "rules": [{}]}),
    );
    let snap = snapshot_where(&mut source, |s| rules_of(s, "bad-action") == Some(1)).await;
    assert_eq!(
        policy_names(&snap),
        ["api/bad-action", "api/good", "api/strict"]
    );
    assert_eq!(metrics.rejected_now("AuthorizationPolicy"), 0);
    assert_eq!(metrics.rejections("AuthorizationPolicy"), 2);

    // The metrics as Prometheus reads them.
    let mut reg = prometheus_client::registry::Registry::default();
    metrics.register(&mut reg);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
    assert!(
        out.contains("rampart_config_rejections_total{kind=\"AuthorizationPolicy\"} 2"),
        "{out}"
    );
    assert!(
        out.contains("rampart_config_rejected_objects{kind=\"AuthorizationPolicy\"} 0"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_snapshot_until_every_watch_listed_once() {
    let _ = logs();
    let fake = FakeApi::new();
    namespace(&fake, "api");
    policy(
        &fake,
        AP_V1,
        "AuthorizationPolicy",
        "deny-all",
        json!({"action": "DENY", "rules": [{}]}),
    );
    // The Pods watch cannot list: no snapshot, even though the policy watches synced (a
    // proxy must not start from a partial view).
    fake.fail_watches("/api/v1/pods", true);
    let (mut source, metrics) = start_source(&fake);
    let early = tokio::time::timeout(Duration::from_millis(1500), source.next()).await;
    assert!(
        early.is_err(),
        "a snapshot before every watch listed: {early:?}"
    );
    assert_eq!(metrics.snapshots(), 0);

    // Its twin: once Pods list, the first snapshot comes, with the policy.
    fake.fail_watches("/api/v1/pods", false);
    let snap = snapshot_where(&mut source, |_| true).await;
    assert_eq!(policy_names(&snap), ["api/deny-all"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_outage_keeps_the_last_objects_and_recovers() {
    let _ = logs();
    let fake = FakeApi::new();
    namespace(&fake, "api");
    pod(
        &fake,
        "api",
        "backend-1",
        "backend",
        "10.0.0.1",
        json!({"app": "backend"}),
        json!({}),
    );
    let (mut source, metrics) = start_source(&fake);
    let snap = snapshot_where(&mut source, |_| true).await;
    assert!(snap.registry.get("api", "backend-1").is_some());

    // The Pods watch breaks (cut, then 500s): later snapshots still have the Pods last
    // seen, not an empty registry.
    fake.fail_watches("/api/v1/pods", true);
    wait_for("a watch error", || {
        (metrics.watch_errors() > 0).then_some(())
    })
    .await;
    policy(
        &fake,
        AP_V1,
        "AuthorizationPolicy",
        "deny-all",
        json!({"action": "DENY", "rules": [{}]}),
    );
    let snap = snapshot_where(&mut source, |s| !s.resources.is_empty()).await;
    assert!(
        snap.registry.get("api", "backend-1").is_some(),
        "a broken watch emptied the registry"
    );
    // A Pod deleted during the outage is seen once the watch lists again.
    fake.delete("/api/v1/namespaces/api/pods", "backend-1")
        .unwrap();
    fake.fail_watches("/api/v1/pods", false);
    let snap = snapshot_where(&mut source, |s| s.registry.workloads.is_empty()).await;
    assert_eq!(policy_names(&snap), ["api/deny-all"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_changes_the_model_ignores_send_no_snapshot() {
    let _ = logs();
    let fake = FakeApi::new();
    namespace(&fake, "api");
    pod(
        &fake,
        "api",
        "backend-1",
        "backend",
        "10.0.0.1",
        json!({"app": "backend"}),
        json!({}),
    );
    let (mut source, metrics) = start_source(&fake);
    snapshot_where(&mut source, |_| true).await;

    // A status heartbeat (conditions) changes nothing the mesh reads: no snapshot.
    let pods = "/api/v1/namespaces/api/pods";
    let mut p = fake.get(pods, "backend-1").unwrap();
    p["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
    fake.put(pods, p.clone());
    let quiet = tokio::time::timeout(Duration::from_millis(800), source.next()).await;
    assert!(quiet.is_err(), "a heartbeat made a snapshot: {quiet:?}");
    assert_eq!(metrics.snapshots(), 1);

    // Its twin: a label change is a change of the model.
    p["metadata"]["labels"] = json!({"app": "backend", "version": "v2"});
    fake.put(pods, p);
    let snap = snapshot_where(&mut source, |_| true).await;
    let w = snap.registry.get("api", "backend-1").unwrap();
    assert_eq!(w.labels.get("version").map(String::as_str), Some("v2"));
}

/// Istio's mesh config ConfigMap (`istio-system/istio`, key `mesh`) gives the snapshot its
/// path normalization and extension providers (CUSTOM policies); an edit that does not parse
/// is refused with an Event and the last good one keeps serving; its removal brings Istio's
/// defaults back. The trust domain stays the CA's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_configmap_sets_providers_and_a_broken_edit_keeps_the_last_good() {
    let _ = logs();
    let fake = FakeApi::new();
    namespace(&fake, "api");
    namespace(&fake, "istio-system");
    let cms = "/api/v1/namespaces/istio-system/configmaps";
    let mesh_cm = |mesh: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "istio", "namespace": "istio-system"},
            "data": {"mesh": mesh, "meshNetworks": "networks: {}"}})
    };
    fake.put(
        cms,
        mesh_cm(
            "trustDomain: other.example\npathNormalization: {normalization: MERGE_SLASHES}\nextensionProviders:\n- name: opa\n  envoyExtAuthzGrpc: {service: opa.opa.svc.cluster.local, port: 9191}\n",
        ),
    );
    // Another ConfigMap of the root namespace is not the mesh config.
    fake.put(
        cms,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "istio-ca-root-cert", "namespace": "istio-system"},
            "data": {"mesh": "extensionProviders: [{name: wrong}]"}}),
    );
    let (mut source, _) = start_source(&fake);
    let snap = snapshot_where(&mut source, |s| !s.mesh.extension_providers.is_empty()).await;
    let names: Vec<&str> = snap
        .mesh
        .extension_providers
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["opa"]);
    assert!(snap.mesh.extension_providers[0].authz.is_ok());
    assert_eq!(
        snap.mesh.path_normalization,
        rampart_authz::PathNormalization::MergeSlashes
    );
    assert_eq!(
        snap.mesh.trust_domain, TD,
        "the CA's trust domain, not the ConfigMap's"
    );
    // ...and an Event says the ConfigMap's is not used.
    let td_event = wait_for("an Event for the ignored trustDomain", || {
        fake.objects("/api/v1/namespaces/istio-system/events")
            .into_iter()
            .find(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("trustDomain"))
            })
    })
    .await;
    assert!(
        td_event["message"].as_str().unwrap().contains("not used"),
        "{td_event}"
    );

    // A broken edit: refused with an Event, the last good config stays (a later edit of
    // anything else must not drop the providers).
    fake.put(cms, mesh_cm("extensionProviders: {not: a list}\n"));
    let refused = wait_for("an Event for the broken mesh config", || {
        fake.objects("/api/v1/namespaces/istio-system/events")
            .into_iter()
            .find(|e| {
                e["involvedObject"]["name"] == "istio"
                    && e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("keeps serving"))
            })
    })
    .await;
    let msg = refused["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("data.mesh") || msg.contains("mesh"),
        "{refused}"
    );
    assert!(
        msg.contains("last mesh config that parsed keeps serving"),
        "{refused}"
    );
    policy(
        &fake,
        AP_V1,
        "AuthorizationPolicy",
        "after",
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/x"]}}]}]}),
    );
    let snap = snapshot_where(&mut source, |s| {
        policy_names(s).contains(&"api/after".to_string())
    })
    .await;
    assert_eq!(
        snap.mesh.extension_providers.len(),
        1,
        "the last good mesh config serves"
    );

    // Removed: Istio's defaults.
    fake.delete(cms, "istio");
    let snap = snapshot_where(&mut source, |s| s.mesh.extension_providers.is_empty()).await;
    assert_eq!(
        snap.mesh.path_normalization,
        rampart_authz::PathNormalization::Base
    );
}

/// A mesh ConfigMap that is broken when the source starts (a CA restart, a new replica after
/// a bad edit) gives no snapshot, rather than Istio's defaults in its place; fixing it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_configmap_broken_at_start_gives_no_snapshot_until_fixed() {
    let _ = logs();
    let fake = FakeApi::new();
    namespace(&fake, "api");
    let cms = "/api/v1/namespaces/istio-system/configmaps";
    let mesh_cm = |mesh: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "istio", "namespace": "istio-system"},
            "data": {"mesh": mesh}})
    };
    fake.put(
        cms,
        mesh_cm("pathNormalization: {normalization: NOT_A_MODE}\n"),
    );
    let (mut source, metrics) = start_source(&fake);
    let early = tokio::time::timeout(Duration::from_millis(1500), source.next()).await;
    assert!(
        early.is_err(),
        "a snapshot from a broken mesh config: {early:?}"
    );
    assert_eq!(metrics.snapshots(), 0);
    let event = wait_for("an Event for the broken mesh config", || {
        fake.objects("/api/v1/namespaces/istio-system/events")
            .into_iter()
            .find(|e| e["involvedObject"]["name"] == "istio")
    })
    .await;
    assert!(
        event["message"]
            .as_str()
            .is_some_and(|m| m.contains("no snapshot")),
        "{event}"
    );
    // Its twin: fixed, the first snapshot comes with it.
    fake.put(
        cms,
        mesh_cm("pathNormalization: {normalization: MERGE_SLASHES}\n"),
    );
    let snap = snapshot_where(&mut source, |_| true).await;
    assert_eq!(
        snap.mesh.path_normalization,
        rampart_authz::PathNormalization::MergeSlashes
    );
}

/// A mesh ConfigMap created broken while Istio's defaults serve (there was none before)
/// leaves the defaults serving and snapshots going on, as an edit that breaks an existing
/// one leaves its last good version. Then one version refused for two fields gets an Event
/// for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_configmap_created_broken_keeps_the_defaults_and_snapshots_going() {
    let _ = logs();
    let fake = FakeApi::new();
    namespace(&fake, "api");
    namespace(&fake, "istio-system");
    let cms = "/api/v1/namespaces/istio-system/configmaps";
    let mesh_cm = |mesh: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "istio", "namespace": "istio-system"},
            "data": {"mesh": mesh}})
    };
    let (mut source, _) = start_source(&fake);
    let snap = snapshot_where(&mut source, |_| true).await;
    assert_eq!(
        snap.mesh.path_normalization,
        rampart_authz::PathNormalization::Base
    );
    fake.put(
        cms,
        mesh_cm("pathNormalization: {normalization: NOT_A_MODE}\n"),
    );
    let event = wait_for("an Event for the broken mesh config", || {
        fake.objects("/api/v1/namespaces/istio-system/events")
            .into_iter()
            .find(|e| e["involvedObject"]["name"] == "istio")
    })
    .await;
    assert!(
        event["message"]
            .as_str()
            .is_some_and(|m| m.contains("default mesh config") && m.contains("keeps serving")),
        "{event}"
    );
    // Snapshots go on: a new policy is served, with the defaults.
    policy(
        &fake,
        AP_V1,
        "AuthorizationPolicy",
        "later",
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/x"]}}]}]}),
    );
    let snap = snapshot_where(&mut source, |s| {
        policy_names(s).contains(&"api/later".to_string())
    })
    .await;
    assert_eq!(
        snap.mesh.path_normalization,
        rampart_authz::PathNormalization::Base
    );
    // Its twin: a fixed version serves, and two fields it sets that the CA does not use are
    // each named in an Event of their own.
    fake.put(
        cms,
        mesh_cm(
            "trustDomain: other.example\nrootNamespace: elsewhere\npathNormalization: {normalization: MERGE_SLASHES}\n",
        ),
    );
    let snap = snapshot_where(&mut source, |s| {
        s.mesh.path_normalization == rampart_authz::PathNormalization::MergeSlashes
    })
    .await;
    assert_eq!(snap.mesh.trust_domain, TD);
    for field in ["trustDomain", "rootNamespace"] {
        wait_for(&format!("an Event naming {field}"), || {
            fake.objects("/api/v1/namespaces/istio-system/events")
                .into_iter()
                .find(|e| {
                    e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(&format!("data.mesh.{field}")))
                })
        })
        .await;
    }
}

/// A revisioned istiod reads `istio-<revision>`: with `mesh_configmap` naming it, that
/// ConfigMap is the mesh config and the default revision's `istio` is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revisioned_mesh_configmap_is_read_when_named() {
    let _ = logs();
    let fake = FakeApi::new();
    namespace(&fake, "api");
    let cms = "/api/v1/namespaces/istio-system/configmaps";
    let mesh_cm = |name: &str, provider: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "istio-system"},
            "data": {"mesh": format!("extensionProviders:\n- name: {provider}\n  envoyExtAuthzGrpc: {{service: opa.opa.svc.cluster.local, port: 9191}}\n")}})
    };
    fake.put(cms, mesh_cm("istio", "from-default"));
    fake.put(cms, mesh_cm("istio-canary", "from-canary"));
    let (mut source, _) = start_source_with(&fake, |s| s.mesh_configmap = "istio-canary".into());
    let names = |s: &MeshFolder| -> Vec<String> {
        s.mesh
            .extension_providers
            .iter()
            .map(|p| p.name.clone())
            .collect()
    };
    let snap = snapshot_where(&mut source, |s| !s.mesh.extension_providers.is_empty()).await;
    assert_eq!(names(&snap), ["from-canary"]);
    // An edit of the default revision's ConfigMap changes nothing; one of the named does.
    fake.put(cms, mesh_cm("istio", "edited-default"));
    fake.put(cms, mesh_cm("istio-canary", "edited-canary"));
    let snap = snapshot_where(&mut source, |s| names(s) != ["from-canary"]).await;
    assert_eq!(names(&snap), ["edited-canary"]);
}
