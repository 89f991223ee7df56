//! The config stream at scale (docs/PERFORMANCE.md "Config streaming"): one control plane
//! (`ConfigService`) fed a synthetic snapshot of 10,000 Pods (registry items; 1,000
//! services of 10 Pods each, by label), 1,000 AuthorizationPolicies (10 in each of 100
//! namespaces, one of them in the root namespace) and mesh settings; 1,000 proxy streams,
//! each its own TCP connection and gRPC stream, each a different Pod (10 per namespace).
//!
//! Measures: time for the model to be built, time until every stream has received and
//! decoded its first full push, the process's memory then (control plane and the 1,000
//! client stubs, which keep only counters), and the time for one edit of a root-namespace
//! policy (which every stream gets) to reach every stream.
//!
//! Identity: instead of mTLS, each connection starts with one line naming its SPIFFE ID,
//! which the server takes as the connection's verified identity (what the CA's TLS
//! listener hands the service in production); the TLS handshakes themselves are the CA's
//! cost, measured in PERFORMANCE.md's CA sections. Not run in CI:
//! `cargo build --release -p rampart-discovery --bench config_stream` and run the binary.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rampart_certs::SpiffeId;
use rampart_discovery::{Authenticator, ConfigService};
use rampart_mesh::MeshFolder;
use rampart_proto::rampart::config::v1 as pb;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const PODS: usize = 10_000;
const PODS_PER_SERVICE: usize = 10;
const NAMESPACES: usize = 100;
const POLICIES: usize = 1_000;
const STREAMS: usize = 1_000;
const ROOT_NS: &str = "istio-system";

fn ns(i: usize) -> String {
    format!("ns-{}", i % NAMESPACES)
}

fn registry_text() -> String {
    let mut items = Vec::with_capacity(PODS);
    for i in 0..PODS {
        let svc = i / PODS_PER_SERVICE;
        let n = ns(svc);
        // Unique inbound addresses (the registry refuses two workloads on one).
        let ip = format!("127.{}.{}.{}", 1 + i / 65_536, (i / 256) % 256, i % 256);
        items.push(serde_json::json!({
            "name": format!("pod-{i}"),
            "namespace": n,
            "serviceAccount": format!("svc-{svc}"),
            "labels": {"app": format!("svc-{svc}"), "version": "v1"},
            "ports": [
                {"port": 8080, "protocol": "http", "app": "127.0.0.1:8080", "inbound": format!("{ip}:15006")},
                {"port": 9090, "protocol": "grpc", "app": "127.0.0.1:9090", "inbound": format!("{ip}:15007")},
            ],
        }));
    }
    serde_json::json!({ "workloads": items }).to_string()
}

fn policy(i: usize, edit: u32) -> (String, String) {
    let (n, selector) = if i == 0 {
        (ROOT_NS.to_string(), serde_json::Value::Null)
    } else {
        let svc = (i * 7) % (PODS / PODS_PER_SERVICE);
        (
            ns(i),
            serde_json::json!({"matchLabels": {"app": format!("svc-{svc}")}}),
        )
    };
    let mut spec = serde_json::json!({
        "action": "ALLOW",
        "rules": [{
            "from": [{"source": {"principals": [
                format!("cluster.local/ns/{}/sa/svc-{}", ns(i + 1), i % 500),
                format!("cluster.local/ns/{}/sa/svc-{}", ns(i + 2), (i + 1) % 500),
            ]}}],
            "to": [{"operation": {"methods": ["GET", "POST"], "paths": [format!("/api/v{edit}/*"), "/healthz"]}}],
        }],
    });
    if !selector.is_null() {
        spec["selector"] = selector;
    }
    let doc = serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": format!("policy-{i}"), "namespace": n},
        "spec": spec,
    });
    (format!("policy-{i}.yaml"), doc.to_string())
}

fn snapshot(registry: &str, edit: u32) -> MeshFolder {
    let policies: Vec<(String, String)> = (0..POLICIES)
        .map(|i| policy(i, if i == 0 { edit } else { 1 }))
        .collect();
    MeshFolder::from_parts(
        PathBuf::from("bench"),
        ("mesh.yaml", "trustDomain: cluster.local\n"),
        ("workloads.yaml", registry),
        &policies,
        Default::default(),
    )
    .expect("the synthetic snapshot is valid")
}

/// The identity a connection's first line names (standing in for its TLS client
/// certificate).
#[derive(Clone, Debug)]
struct LineIdentity(SpiffeId);

struct Conn {
    inner: BufReader<TcpStream>,
    id: LineIdentity,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = LineIdentity;
    fn connect_info(&self) -> LineIdentity {
        self.id.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(self.inner.get_mut()).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.inner.get_mut()).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.inner.get_mut()).poll_shutdown(cx)
    }
}

struct ByLine;

impl Authenticator for ByLine {
    fn caller(&self, extensions: &tonic::Extensions) -> Result<SpiffeId, String> {
        extensions
            .get::<LineIdentity>()
            .map(|l| l.0.clone())
            .ok_or_else(|| "no identity line".into())
    }
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn raise_nofile() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    l.current = Some(l.maximum.unwrap_or(65_536).min(65_536));
    if let Err(e) = setrlimit(Resource::Nofile, l) {
        eprintln!("could not raise the open-file limit: {e}");
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    raise_nofile();
    let rss_start = rss_kib("VmRSS:");
    let registry = registry_text();
    let t = Instant::now();
    let first = snapshot(&registry, 1);
    let load_time = t.elapsed();
    println!(
        "snapshot: {} pods in {} namespaces, {} AuthorizationPolicies; parsed and validated in {:?}",
        first.registry.workloads.len(),
        NAMESPACES,
        first.resources.len(),
        load_time
    );

    let (svc, feed) = ConfigService::new(Arc::new(ByLine));
    let stats = svc.stats().clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (conn_tx, conn_rx) = mpsc::channel::<Result<Conn, std::io::Error>>(1024);
    tokio::spawn(async move {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let tx = conn_tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let mut r = BufReader::new(tcp);
                let mut line = String::new();
                if r.read_line(&mut line).await.is_err() {
                    return;
                }
                let Ok(id) = SpiffeId::parse(line.trim()) else {
                    return;
                };
                let _ = tx
                    .send(Ok(Conn {
                        inner: r,
                        id: LineIdentity(id),
                    }))
                    .await;
            });
        }
    });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(1024))
            .add_service(svc.into_server())
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(conn_rx))
            .await
            .unwrap();
    });

    // 1,000 proxies, each its own connection: pod i*10 of every service i < 1,000 (ten per
    // namespace).
    let first_done = Arc::new(AtomicUsize::new(0));
    let edit_done = Arc::new(AtomicUsize::new(0));
    let first_bytes = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = mpsc::channel::<(usize, Instant)>(STREAMS * 2);
    for s in 0..STREAMS {
        let pod = s * PODS_PER_SERVICE;
        let svc_i = pod / PODS_PER_SERVICE;
        let id = format!("spiffe://cluster.local/ns/{}/sa/svc-{svc_i}", ns(svc_i));
        let workload = format!("{}/pod-{pod}", ns(svc_i));
        let first_done = first_done.clone();
        let edit_done = edit_done.clone();
        let first_bytes = first_bytes.clone();
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            // Open the stream, retrying as a proxy does (1,000 connections arriving at once
            // on a loaded machine occasionally see one closed before its stream opens).
            let mut attempt = 0;
            let (tx, mut stream) = loop {
                attempt += 1;
                assert!(attempt <= 50, "stream for {workload} would not open");
                let id = id.clone();
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                        let id = id.clone();
                        async move {
                            let mut tcp = TcpStream::connect(addr).await?;
                            tcp.set_nodelay(true)?;
                            tcp.write_all(format!("{id}\n").as_bytes()).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
                        }
                    }))
                    .await;
                let Ok(channel) = channel else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let mut client = pb::config_discovery_client::ConfigDiscoveryClient::new(channel)
                    .max_decoding_message_size(256 << 20);
                let (tx, rx) = mpsc::channel(4);
                tx.send(pb::DeltaConfigRequest {
                    workload: workload.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
                match client
                    .delta_config(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                {
                    Ok(r) => break (tx, r.into_inner()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            let mut first_open = true;
            while let Ok(Some(resp)) = stream.message().await {
                let _ = tx
                    .send(pb::DeltaConfigRequest {
                        response_nonce: resp.nonce.clone(),
                        ..Default::default()
                    })
                    .await;
                if first_open {
                    let bytes: usize = resp.resources.iter().map(|r| r.body.len()).sum();
                    first_bytes.fetch_add(bytes, Ordering::Relaxed);
                    if !resp.incomplete {
                        first_open = false;
                        first_done.fetch_add(1, Ordering::Relaxed);
                        let _ = done_tx.send((1, Instant::now())).await;
                    }
                } else if resp
                    .resources
                    .iter()
                    .any(|r| r.name == format!("policy/{ROOT_NS}/AuthorizationPolicy/policy-0"))
                {
                    edit_done.fetch_add(1, Ordering::Relaxed);
                    let _ = done_tx.send((2, Instant::now())).await;
                }
            }
        });
    }
    // Every stream open and waiting for the first model.
    let t = Instant::now();
    while stats.streams.load(Ordering::Relaxed) < STREAMS as i64 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "streams did not open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("{STREAMS} streams open in {:?}", t.elapsed());
    let rss_before = rss_kib("VmRSS:");

    // First full push.
    let t0 = Instant::now();
    let first_for_feed = first.clone();
    let feed = tokio::task::spawn_blocking(move || {
        feed.publish(&first_for_feed);
        feed
    })
    .await
    .unwrap();
    let built = t0.elapsed();
    let mut last = t0;
    let mut got = 0;
    while got < STREAMS {
        let (k, at) = tokio::time::timeout(Duration::from_secs(300), done_rx.recv())
            .await
            .expect("first pushes within 5 minutes")
            .unwrap();
        if k == 1 {
            got += 1;
            last = last.max(at);
        }
    }
    let first_push = last - t0;
    let rss_after = rss_kib("VmRSS:");
    let hwm = rss_kib("VmHWM:");
    let resources = stats.resources_sent.load(Ordering::Relaxed);
    println!(
        "first full push: model built in {built:?}; all {STREAMS} streams had theirs in {first_push:?} \
         ({resources} resources, {:.1} MiB of resource bodies in all)",
        first_bytes.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
    );
    println!(
        "memory: RSS {:.0} MiB at start, {:.0} MiB with the snapshot and {STREAMS} idle streams, {:.0} MiB after the first push (peak {:.0} MiB)",
        rss_start as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        hwm as f64 / 1024.0
    );

    // Let the ACKs settle, then one policy edit (root namespace: every stream's slice).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent_before = stats.resources_sent.load(Ordering::Relaxed);
    let second = snapshot(&registry, 2);
    let t1 = Instant::now();
    let feed = tokio::task::spawn_blocking(move || {
        feed.publish(&second);
        feed
    })
    .await
    .unwrap();
    let rebuilt = t1.elapsed();
    let mut last = t1;
    let mut got = 0;
    while got < STREAMS {
        let (k, at) = tokio::time::timeout(Duration::from_secs(120), done_rx.recv())
            .await
            .expect("the edit within 2 minutes")
            .unwrap();
        if k == 2 {
            got += 1;
            last = last.max(at);
        }
    }
    let edit = last - t1;
    println!(
        "one policy edit: model rebuilt in {rebuilt:?}; on all {STREAMS} streams in {edit:?} ({} resources sent for it)",
        stats.resources_sent.load(Ordering::Relaxed) - sent_before
    );
    println!(
        "acks {}, nacks {}, pushes {}",
        stats.acks.load(Ordering::Relaxed),
        stats.nacks.load(Ordering::Relaxed),
        stats.pushes.load(Ordering::Relaxed)
    );
    assert_eq!(edit_done.load(Ordering::Relaxed), STREAMS);
    assert_eq!(first_done.load(Ordering::Relaxed), STREAMS);
    drop(feed);
    std::process::exit(0);
}
