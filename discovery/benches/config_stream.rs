//! The config stream at scale (docs/PERFORMANCE.md "Config streaming"): one control plane
//! (`ConfigService`) fed what the Kubernetes source makes (`rampart_mesh::kube::convert`,
//! run by `KubeConfigSource` after every watch event) of 10,000 Pods (ten per Service),
//! 1,000 Services (registry services whose endpoints are those Pods), 1,000
//! AuthorizationPolicies (10 in each of 100 namespaces, one of them in the root namespace)
//! and mesh settings; 1,000 proxy streams, each its own TCP connection and gRPC stream, each
//! a different Pod (10 per namespace), each receiving its own slice (its namespace's and the
//! root's policies, every service, its own entry and every other Pod reduced).
//!
//! Measures: time for the model to be built, time until every stream has received and
//! decoded its first full push, the process's memory then (control plane and the 1,000
//! client stubs, which keep only counters), the time for one edit of a root-namespace
//! policy (every stream's slice) to reach every stream, and the time for one edit of a
//! namespace's policy to reach that namespace's 10 streams (and the pushes it caused: 10,
//! none to the other 990 streams).
//!
//! Identity: instead of mTLS, each connection starts with one line naming its SPIFFE ID,
//! which the server takes as the connection's verified identity
//! (`tests/support/line_identity.rs`); the TLS handshakes themselves are the CA's cost,
//! measured in PERFORMANCE.md's CA sections. Not run in CI:
//! `cargo bench -p rampart-discovery --bench config_stream` on an idle machine.

#[path = "../tests/support/line_identity.rs"]
mod line_identity;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rampart_mesh::MeshFolder;
use rampart_mesh::kube::{KubeObjects, KubeSettings, convert};
use rampart_proto::rampart::config::v1 as pb;
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

/// The Pods and Services as the API server serves them (what the Kubernetes source watches):
/// Pod `pod-i` of service account `svc-N` (ten per service) with a unique Pod IP, and
/// Service `svc-N` selecting them, ports 80 -> 8080 (`http`) and 90 -> 9090 (`grpc`).
fn kube_workloads() -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let pods = (0..PODS)
        .map(|i| {
            let svc = i / PODS_PER_SERVICE;
            let ip = format!("10.{}.{}.{}", 1 + i / 65_536, (i / 256) % 256, i % 256);
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("pod-{i}"), "namespace": ns(svc),
                             "labels": {"app": format!("svc-{svc}"), "version": "v1"}},
                "spec": {"serviceAccountName": format!("svc-{svc}"), "nodeName": "node-1",
                         "containers": [{"name": "app"}]},
                "status": {"phase": "Running", "podIP": ip},
            })
        })
        .collect();
    let services = (0..PODS / PODS_PER_SERVICE)
        .map(|svc| {
            serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": format!("svc-{svc}"), "namespace": ns(svc)},
                "spec": {"selector": {"app": format!("svc-{svc}")}, "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "grpc", "port": 90, "targetPort": 9090},
                ]},
            })
        })
        .collect();
    (pods, services)
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

/// The policy edited in one namespace (`ns-5`: the 10 streams of Pods of that namespace).
const NS_POLICY: usize = 5;

/// The snapshot the Kubernetes source makes of the Pods, Services and policies (with the
/// two edit counters): the same pure conversion `KubeConfigSource` runs after every
/// (debounced) watch event, over every object it holds.
fn snapshot(
    workloads: &(Vec<serde_json::Value>, Vec<serde_json::Value>),
    root_edit: u32,
    ns_edit: u32,
) -> MeshFolder {
    let policies = (0..POLICIES)
        .map(|i| {
            let edit = match i {
                0 => root_edit,
                NS_POLICY => ns_edit,
                _ => 1,
            };
            serde_json::from_str(&policy(i, edit).1).expect("policy JSON")
        })
        .collect();
    let objects = KubeObjects {
        policies,
        pods: workloads.0.clone(),
        services: workloads.1.clone(),
        namespaces: Vec::new(),
        mesh: None,
    };
    let settings = KubeSettings::new("cluster.local".parse().expect("trust domain"));
    let conversion = convert(&settings, &objects);
    assert!(
        conversion.refused.is_empty(),
        "the synthetic objects are valid: {:?}",
        conversion.refused.first()
    );
    conversion.snapshot
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

/// Publish `folder` and wait until `want` streams report `kind` (1: first push complete,
/// 2: the root policy edit, 3: the namespace policy edit); the time from publishing to the
/// last report, and the model build time.
async fn publish_and_wait(
    feed: rampart_discovery::ModelFeed,
    folder: MeshFolder,
    done_rx: &mut mpsc::Receiver<(usize, Instant)>,
    kind: usize,
    want: usize,
) -> (rampart_discovery::ModelFeed, Duration, Duration) {
    let t0 = Instant::now();
    let feed = tokio::task::spawn_blocking(move || {
        feed.publish(&folder);
        feed
    })
    .await
    .unwrap();
    let built = t0.elapsed();
    let mut last = t0;
    let mut got = 0;
    while got < want {
        let (k, at) = tokio::time::timeout(Duration::from_secs(300), done_rx.recv())
            .await
            .expect("every stream within 5 minutes")
            .unwrap();
        if k == kind {
            got += 1;
            last = last.max(at);
        }
    }
    (feed, built, last - t0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    raise_nofile();
    let rss_start = rss_kib("VmRSS:");
    let workloads = kube_workloads();
    let t = Instant::now();
    let first = snapshot(&workloads, 1, 1);
    let load_time = t.elapsed();
    println!(
        "snapshot: {} pods, {} services in {} namespaces, {} AuthorizationPolicies; converted from Kubernetes objects (rampart_mesh::kube::convert) in {:?}",
        first.registry.workloads.len(),
        first.registry.services.len(),
        NAMESPACES,
        first.resources.len(),
        load_time
    );

    let (svc, feed) = line_identity::service();
    let stats = svc.stats().clone();
    let addr = line_identity::serve(svc).await;

    // 1,000 proxies, each its own connection: pod i*10 of every service i < 1,000 (ten per
    // namespace).
    let first_bytes = Arc::new(AtomicUsize::new(0));
    let first_resources = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = mpsc::channel::<(usize, Instant)>(STREAMS * 3);
    let root_policy = format!("policy/{ROOT_NS}/AuthorizationPolicy/policy-0");
    let ns_policy = format!(
        "policy/{}/AuthorizationPolicy/policy-{NS_POLICY}",
        ns(NS_POLICY)
    );
    for s in 0..STREAMS {
        let pod = s * PODS_PER_SERVICE;
        let svc_i = pod / PODS_PER_SERVICE;
        let id = format!("spiffe://cluster.local/ns/{}/sa/svc-{svc_i}", ns(svc_i));
        let workload = format!("{}/pod-{pod}", ns(svc_i));
        let first_bytes = first_bytes.clone();
        let first_resources = first_resources.clone();
        let done_tx = done_tx.clone();
        let (root_policy, ns_policy) = (root_policy.clone(), ns_policy.clone());
        tokio::spawn(async move {
            // Open the stream, retrying as a proxy does (1,000 connections arriving at once
            // on a loaded machine occasionally see one closed before its stream opens).
            let mut attempt = 0;
            let (tx, mut stream) = loop {
                attempt += 1;
                assert!(attempt <= 50, "stream for {workload} would not open");
                match line_identity::open(addr, &id, &workload).await {
                    Ok(Ok(s)) => break s,
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
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
                    first_resources.fetch_add(resp.resources.len(), Ordering::Relaxed);
                    if !resp.incomplete {
                        first_open = false;
                        let _ = done_tx.send((1, Instant::now())).await;
                    }
                    continue;
                }
                for r in &resp.resources {
                    if r.name == root_policy {
                        let _ = done_tx.send((2, Instant::now())).await;
                    } else if r.name == ns_policy {
                        let _ = done_tx.send((3, Instant::now())).await;
                    }
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
    let (feed, built, first_push) =
        publish_and_wait(feed, first.clone(), &mut done_rx, 1, STREAMS).await;
    let rss_after = rss_kib("VmRSS:");
    let hwm = rss_kib("VmHWM:");
    println!(
        "first full push: model built in {built:?}; all {STREAMS} streams had theirs in {first_push:?} \
         ({} resources, {:.0} per stream, {:.1} MiB of resource bodies in all; {} resource ids)",
        first_resources.load(Ordering::Relaxed),
        first_resources.load(Ordering::Relaxed) as f64 / STREAMS as f64,
        first_bytes.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0),
        stats.resource_ids.load(Ordering::Relaxed),
    );
    println!(
        "memory: RSS {:.0} MiB at start, {:.0} MiB with the snapshot and {STREAMS} idle streams, {:.0} MiB after the first push (peak {:.0} MiB)",
        rss_start as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        hwm as f64 / 1024.0
    );

    // Let the ACKs settle, then one root-namespace policy edit (every stream's slice).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent_before = stats.resources_sent.load(Ordering::Relaxed);
    let pushes_before = stats.pushes.load(Ordering::Relaxed);
    let (feed, rebuilt, edit) =
        publish_and_wait(feed, snapshot(&workloads, 2, 1), &mut done_rx, 2, STREAMS).await;
    println!(
        "one root-namespace policy edit: model rebuilt in {rebuilt:?}; on all {STREAMS} streams in {edit:?} ({} pushes, {} resources)",
        stats.pushes.load(Ordering::Relaxed) - pushes_before,
        stats.resources_sent.load(Ordering::Relaxed) - sent_before
    );

    // One policy edit in one namespace: its 10 streams, and no push to the 990 others (the
    // streams have all dealt with the model once `syncs` grew by 1,000).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent_before = stats.resources_sent.load(Ordering::Relaxed);
    let pushes_before = stats.pushes.load(Ordering::Relaxed);
    let syncs_before = stats.syncs.load(Ordering::SeqCst);
    let affected = STREAMS / NAMESPACES;
    let (feed, rebuilt, edit) =
        publish_and_wait(feed, snapshot(&workloads, 2, 2), &mut done_rx, 3, affected).await;
    let t = Instant::now();
    while stats.syncs.load(Ordering::SeqCst) < syncs_before + STREAMS as u64 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "streams did not sync"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_synced = t.elapsed() + edit;
    let pushes = stats.pushes.load(Ordering::Relaxed) - pushes_before;
    println!(
        "one policy edit in {}: model rebuilt in {rebuilt:?}; on its {affected} streams in {edit:?}, all {STREAMS} streams diffed it within {all_synced:?} ({pushes} pushes, {} resources)",
        ns(NS_POLICY),
        stats.resources_sent.load(Ordering::Relaxed) - sent_before
    );
    println!(
        "acks {}, nacks {}, pushes {}",
        stats.acks.load(Ordering::Relaxed),
        stats.nacks.load(Ordering::Relaxed),
        stats.pushes.load(Ordering::Relaxed)
    );
    assert_eq!(
        pushes, affected as u64,
        "the namespace edit reached other streams"
    );
    drop(feed);
    std::process::exit(0);
}
