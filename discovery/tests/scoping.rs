//! Per-workload scoping of the config stream over real gRPC streams (loopback; the caller's
//! identity from its connection's first line, `support/line_identity.rs`): what each stream
//! receives, that an edit reaches only the streams whose slice it changes (checked with the
//! server's own counters and the stream order, not timing), refusals, and the metrics.

#[path = "support/line_identity.rs"]
mod line_identity;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rampart_discovery::Stats;
use rampart_mesh::MeshFolder;
use rampart_proto::rampart::config::v1 as pb;

const A_ID: &str = "spiffe://example.org/ns/ns-a/sa/a1";
const B_ID: &str = "spiffe://example.org/ns/ns-b/sa/b1";

/// Two namespaces, one workload each behind a service, each with its own proxy listeners;
/// a policy in each namespace and one in the root namespace, `ns-b`'s and the root's on
/// paths that name their edit.
fn mesh(b_edit: u32, root_edit: u32) -> MeshFolder {
    let ap = |ns: &str, name: &str, path: &str| {
        (
            format!("{ns}-{name}.yaml"),
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  action: DENY\n  rules:\n  - to: [{{operation: {{paths: ['{path}']}}}}]\n"
            ),
        )
    };
    MeshFolder::from_parts(
        PathBuf::from("test"),
        ("mesh.yaml", "trustDomain: example.org\nrootNamespace: istio-config\n"),
        (
            "workloads.yaml",
            "workloads:\n\
             - {name: a1, namespace: ns-a, labels: {app: a}, ports: [{port: 8080, protocol: http, app: '127.0.0.1:8080', inbound: '10.0.0.1:8080'}], proxy: {outbound: '127.0.0.1:15101', admin: '127.0.0.1:15100'}, upstreams: [{service: svc-b.ns-b, port: 80, listen: '127.0.0.1:15102'}]}\n\
             - {name: b1, namespace: ns-b, labels: {app: b}, ports: [{port: 8080, protocol: http, app: '127.0.0.1:8080', inbound: '10.0.0.2:8080'}], proxy: {outbound: '127.0.0.1:15201', admin: '127.0.0.1:15200'}, upstreams: [{service: svc-a.ns-a, port: 80, listen: '127.0.0.1:15202'}]}\n\
             services:\n\
             - {name: svc-a, namespace: ns-a, ports: [{port: 80, targetPort: 8080, protocol: http}], endpoints: [ns-a/a1]}\n\
             - {name: svc-b, namespace: ns-b, ports: [{port: 80, targetPort: 8080, protocol: http}], endpoints: [ns-b/b1]}\n",
        ),
        &[
            ap("ns-a", "pa", "/a"),
            ap("ns-b", "pb", &format!("/b-{b_edit}")),
            ap("istio-config", "root", &format!("/root-{root_edit}")),
        ],
        Default::default(),
    )
    .unwrap()
}

async fn next(s: &mut line_identity::Stream) -> pb::DeltaConfigResponse {
    let r = tokio::time::timeout(Duration::from_secs(20), s.1.message())
        .await
        .expect("a response within 20 s")
        .expect("a response, not an error")
        .expect("the stream stays open");
    s.0.send(pb::DeltaConfigRequest {
        response_nonce: r.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    r
}

/// Wait (bounded) until the server's counter `f` reaches `n`.
async fn until(stats: &Stats, what: &str, f: impl Fn(&Stats) -> u64, n: u64) {
    let t = Instant::now();
    while f(stats) < n {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what}: {} < {n}",
            f(stats)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn text(r: &pb::DeltaConfigResponse) -> String {
    r.resources
        .iter()
        .map(|x| format!("{} {}\n", x.name, String::from_utf8_lossy(&x.body)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stream_gets_its_slice_and_only_its_edits() {
    let (svc, feed) = line_identity::service();
    let stats = svc.stats().clone();
    let addr = line_identity::serve(svc).await;
    feed.publish(&mesh(1, 1));

    let mut a = line_identity::open(addr, A_ID, "ns-a/a1")
        .await
        .unwrap()
        .unwrap();
    let mut b = line_identity::open(addr, B_ID, "ns-b/b1")
        .await
        .unwrap()
        .unwrap();
    let a1 = next(&mut a).await;
    let b1 = next(&mut b).await;
    let names = |r: &pb::DeltaConfigResponse| {
        let mut v: Vec<String> = r.resources.iter().map(|x| x.name.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(
        names(&a1),
        vec![
            "mesh",
            "policy/istio-config/AuthorizationPolicy/root",
            "policy/ns-a/AuthorizationPolicy/pa",
            "registry/services/ns-a/svc-a",
            "registry/services/ns-b/svc-b",
            "registry/workloads/ns-a/a1",
            "registry/workloads/ns-b/b1",
        ]
    );
    // A's own listeners are in its slice; B's listeners and policy are not (the twin).
    let a_text = text(&a1);
    assert!(a_text.contains("127.0.0.1:15101"), "{a_text}");
    for b_only in ["15200", "15201", "15202", "policy/ns-b/"] {
        assert!(!a_text.contains(b_only), "{b_only} reached ns-a: {a_text}");
    }
    // B's entry as A sees it: where to dial it and whom to expect.
    assert!(a_text.contains("10.0.0.2:8080") && a_text.contains("\"serviceAccount\":\"b1\""));
    let b_text = text(&b1);
    assert!(b_text.contains("policy/ns-b/AuthorizationPolicy/pb"));
    assert!(!b_text.contains("policy/ns-a/") && !b_text.contains("15101"));
    until(&stats, "first syncs", |s| s.syncs.load(Ordering::SeqCst), 2).await;

    // An edit of ns-b's policy: B's stream gets it; A's stream gets nothing. Once both
    // streams have dealt with the model (the server's `syncs`), exactly one push was made.
    let pushes = stats.pushes.load(Ordering::SeqCst);
    let syncs = stats.syncs.load(Ordering::SeqCst);
    feed.publish(&mesh(2, 1));
    let b2 = next(&mut b).await;
    assert_eq!(names(&b2), vec!["policy/ns-b/AuthorizationPolicy/pb"]);
    until(
        &stats,
        "syncs of the ns-b edit",
        |s| s.syncs.load(Ordering::SeqCst),
        syncs + 2,
    )
    .await;
    assert_eq!(
        stats.pushes.load(Ordering::SeqCst),
        pushes + 1,
        "ns-a's stream was pushed the ns-b edit"
    );

    // The positive twin: a root-namespace edit reaches both, and A's next response is
    // that one (model 3), not one for the ns-b edit (model 2).
    feed.publish(&mesh(2, 2));
    let a3 = next(&mut a).await;
    let b3 = next(&mut b).await;
    assert_eq!(a3.system_version_info, "3");
    for r in [&a3, &b3] {
        assert_eq!(
            names(r),
            vec!["policy/istio-config/AuthorizationPolicy/root"]
        );
    }
    until(
        &stats,
        "syncs of the root edit",
        |s| s.syncs.load(Ordering::SeqCst),
        syncs + 4,
    )
    .await;
    assert_eq!(stats.pushes.load(Ordering::SeqCst), pushes + 3);
    assert_eq!(stats.nacks.load(Ordering::SeqCst), 0);
    assert_eq!(stats.streams.load(Ordering::SeqCst), 2);
}

/// A workload that is not in the registry is refused naming why (fail closed: nothing of
/// the mesh is sent), and so is another workload's identity; the workload's own identity
/// is served (the twin, above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_workloads_and_other_identities_are_refused() {
    let (svc, feed) = line_identity::service();
    let stats = svc.stats().clone();
    let addr = line_identity::serve(svc).await;
    feed.publish(&mesh(1, 1));
    for (id, workload, why) in [
        (A_ID, "ns-a/ghost", "not in the registry"),
        (A_ID, "ns-b/b1", "is not workload ns-b/b1"),
    ] {
        let mut s = line_identity::open(addr, id, workload)
            .await
            .unwrap()
            .unwrap();
        let e = tokio::time::timeout(Duration::from_secs(20), s.1.message())
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains(why), "{e:?}");
    }
    until(&stats, "refusals", |s| s.refused.load(Ordering::SeqCst), 2).await;
    assert_eq!(stats.pushes.load(Ordering::SeqCst), 0);
    assert_eq!(stats.resources_sent.load(Ordering::SeqCst), 0);
}

/// Round `round` of Pod churn: `ns-a/a1` stays; `ns-b`'s five Pods are new ones each round.
fn churn(round: usize) -> MeshFolder {
    let mut reg = String::from(
        "workloads:\n- {name: a1, namespace: ns-a, ports: [{port: 8080, app: '127.0.0.1:8080', inbound: '10.0.0.1:8080'}], proxy: {outbound: '127.0.0.1:15101'}}\n",
    );
    let mut endpoints = Vec::new();
    for i in 0..5 {
        reg.push_str(&format!(
            "- {{name: p-{round}-{i}, namespace: ns-b, ports: [{{port: 8080, app: '127.0.0.1:8080', inbound: '10.1.{}.{}:8080'}}]}}\n",
            round % 250,
            i + 1
        ));
        endpoints.push(format!("ns-b/p-{round}-{i}"));
    }
    reg.push_str(&format!(
        "services:\n- {{name: svc-b, namespace: ns-b, ports: [{{port: 80, targetPort: 8080}}], endpoints: [{}]}}\n",
        endpoints.join(", ")
    ));
    MeshFolder::from_parts(
        PathBuf::from("test"),
        ("mesh.yaml", "trustDomain: example.org\n"),
        ("workloads.yaml", &reg),
        &[],
        Default::default(),
    )
    .unwrap()
}

/// Pod churn with a live stream: 60 rounds, each replacing every Pod of `ns-b`. The
/// stream's view (every response applied) is its slice after each round, and the server's
/// resource ids stay at the model's size (ids of departed Pods are freed once the stream
/// has been told to remove them, and given to new ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_churn_keeps_views_exact_and_the_id_table_small() {
    let (svc, feed) = line_identity::service();
    let stats = svc.stats().clone();
    let addr = line_identity::serve(svc).await;
    feed.publish(&churn(0));
    let mut a = line_identity::open(addr, A_ID, "ns-a/a1")
        .await
        .unwrap()
        .unwrap();
    let mut view = std::collections::BTreeMap::new();
    let apply = |view: &mut std::collections::BTreeMap<String, String>,
                 r: pb::DeltaConfigResponse| {
        for x in r.resources {
            view.insert(x.name, x.version);
        }
        for n in r.removed_resources {
            assert!(
                view.remove(&n).is_some(),
                "removal of {n}, which the stream lacks"
            );
        }
    };
    apply(&mut view, next(&mut a).await);
    let slice = |f: &MeshFolder| -> std::collections::BTreeMap<String, String> {
        rampart_mesh::resources::slice_for(f, "ns-a", "a1")
            .into_iter()
            .map(|r| (r.name, r.version))
            .collect()
    };
    assert_eq!(view, slice(&churn(0)));
    for round in 1..60 {
        let f = churn(round);
        feed.publish(&f);
        apply(&mut view, next(&mut a).await);
        assert_eq!(view, slice(&f), "round {round}");
    }
    // 1 mesh + 1 service + 6 workloads in the model; at most one round of departed Pods
    // awaits its freeing.
    let ids = stats.resource_ids.load(Ordering::SeqCst);
    assert!(ids <= 8 + 5, "{ids} resource ids after 60 rounds of churn");
    assert_eq!(stats.nacks.load(Ordering::SeqCst), 0);
}
