//! The root ConfigMap `istio-ca-root-cert` in every namespace, written by the Lease holder.
//!
//! THE KUBERNETES API SERVER IS FAKED (`support/fake_api.rs`): Namespaces, ConfigMaps and the
//! Lease live in the in-process fake, which enforces resourceVersions (409 Conflict on a
//! stale replace, 409 AlreadyExists on a second create). No cluster is involved.

mod support;

use std::time::{Duration, SystemTime};

use rampart_k8s::publish::{
    CRL_CONFIGMAP, LeaseElector, PUBLISHER_LEASE, PublishEvent, Published, ROOT_CONFIGMAP,
    RootPublisher, run_reporting, tick,
};
use serde_json::json;
use support::fake_api::FakeApi;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/istio-system/leases";

fn cms(ns: &str) -> String {
    format!("/api/v1/namespaces/{ns}/configmaps")
}

fn add_namespace(fake: &FakeApi, ns: &str) {
    fake.put(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
               "status": {"phase": "Active"}}),
    );
}

fn published_root(fake: &FakeApi, ns: &str) -> Option<String> {
    fake.get(&cms(ns), ROOT_CONFIGMAP)
        .and_then(|cm| cm["data"]["root-cert.pem"].as_str().map(str::to_owned))
}

fn elector(fake: &FakeApi, who: &str) -> LeaseElector {
    LeaseElector::new(
        fake.client(),
        "istio-system",
        PUBLISHER_LEASE,
        who,
        Duration::from_secs(15),
    )
}

#[tokio::test]
async fn publishes_in_every_namespace_recreates_and_follows_rotation() {
    let fake = FakeApi::new();
    for ns in ["istio-system", "ns1", "ns2"] {
        add_namespace(&fake, ns);
    }
    fake.put(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "going"},
               "status": {"phase": "Terminating"}}),
    );
    let p = RootPublisher::new(fake.client(), "ROOT-1".into());
    let first = p.publish_once().await.unwrap();
    assert_eq!(first.created, ["istio-system", "ns1", "ns2"]);
    for ns in ["istio-system", "ns1", "ns2"] {
        assert_eq!(published_root(&fake, ns).as_deref(), Some("ROOT-1"), "{ns}");
    }
    assert_eq!(
        published_root(&fake, "going"),
        None,
        "terminating namespace skipped"
    );

    // Nothing to do: no writes.
    let writes = fake.count("POST") + fake.count("PUT");
    assert_eq!(p.publish_once().await.unwrap(), Published::default());
    assert_eq!(fake.count("POST") + fake.count("PUT"), writes);

    // Deleted -> recreated; edited -> restored; a new namespace -> published.
    fake.delete(&cms("ns1"), ROOT_CONFIGMAP).unwrap();
    let mut edited = fake.get(&cms("ns2"), ROOT_CONFIGMAP).unwrap();
    edited["data"]["root-cert.pem"] = json!("FORGED");
    fake.put(&cms("ns2"), edited);
    add_namespace(&fake, "ns3");
    let again = p.publish_once().await.unwrap();
    assert_eq!(again.created, ["ns1", "ns3"]);
    assert_eq!(again.updated, ["ns2"]);
    for ns in ["ns1", "ns2", "ns3"] {
        assert_eq!(published_root(&fake, ns).as_deref(), Some("ROOT-1"), "{ns}");
    }

    // Rotation: the new bundle reaches every namespace.
    p.set_root("ROOT-1\nROOT-2".into());
    let rotated = p.publish_once().await.unwrap();
    assert_eq!(rotated.updated, ["istio-system", "ns1", "ns2", "ns3"]);
    assert_eq!(
        published_root(&fake, "ns3").as_deref(),
        Some("ROOT-1\nROOT-2")
    );
}

fn published_crl(fake: &FakeApi, ns: &str) -> Option<String> {
    fake.get(&cms(ns), CRL_CONFIGMAP)
        .and_then(|cm| cm["data"]["ca-crl.pem"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn publishes_the_crls_beside_the_root_once_there_are_some() {
    let fake = FakeApi::new();
    for ns in ["istio-system", "ns1"] {
        add_namespace(&fake, ns);
    }
    fake.put(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "going"},
               "status": {"phase": "Terminating"}}),
    );
    let p = RootPublisher::new(fake.client(), "ROOT-1".into());

    // No CRL (none set, or an empty one): no istio-ca-crl anywhere, the root as before.
    p.set_crl(Some("  \n".into()));
    let first = p.publish_once().await.unwrap();
    assert_eq!(first.created, ["istio-system", "ns1"]);
    assert!(first.crl_created.is_empty(), "{first:?}");
    assert_eq!(published_crl(&fake, "ns1"), None);

    // A CRL: created in every namespace but terminating ones, with the root's label.
    p.set_crl(Some("CRL-1".into()));
    let with_crl = p.publish_once().await.unwrap();
    assert_eq!(with_crl.crl_created, ["istio-system", "ns1"]);
    assert!(with_crl.created.is_empty() && with_crl.updated.is_empty());
    for ns in ["istio-system", "ns1"] {
        assert_eq!(published_crl(&fake, ns).as_deref(), Some("CRL-1"), "{ns}");
        let cm = fake.get(&cms(ns), CRL_CONFIGMAP).unwrap();
        assert_eq!(cm["metadata"]["labels"]["istio.io/config"], "true");
    }
    assert_eq!(published_crl(&fake, "going"), None, "terminating skipped");
    assert_eq!(p.publish_once().await.unwrap(), Published::default());

    // A new CRL (a revocation) is rewritten everywhere; a forged or deleted one is restored.
    p.set_crl(Some("CRL-2".into()));
    let revoked = p.publish_once().await.unwrap();
    assert_eq!(revoked.crl_updated, ["istio-system", "ns1"]);
    let mut forged = fake.get(&cms("ns1"), CRL_CONFIGMAP).unwrap();
    forged["data"]["ca-crl.pem"] = json!("FORGED");
    fake.put(&cms("ns1"), forged);
    fake.delete(&cms("istio-system"), CRL_CONFIGMAP).unwrap();
    let again = p.publish_once().await.unwrap();
    assert_eq!(again.crl_created, ["istio-system"]);
    assert_eq!(again.crl_updated, ["ns1"]);
    for ns in ["istio-system", "ns1"] {
        assert_eq!(published_crl(&fake, ns).as_deref(), Some("CRL-2"), "{ns}");
        assert_eq!(published_root(&fake, ns).as_deref(), Some("ROOT-1"), "{ns}");
    }

    // The CRL going away leaves the published ones alone (nothing is deleted).
    p.set_crl(None);
    assert_eq!(p.publish_once().await.unwrap(), Published::default());
    assert_eq!(published_crl(&fake, "ns1").as_deref(), Some("CRL-2"));
}

#[tokio::test]
async fn one_writer_and_lease_hand_over() {
    let fake = FakeApi::new();
    add_namespace(&fake, "ns1");
    let (a, b) = (elector(&fake, "ca-a"), elector(&fake, "ca-b"));
    let pa = RootPublisher::new(fake.client(), "ROOT-A".into());
    let pb = RootPublisher::new(fake.client(), "ROOT-B".into());
    let t0 = SystemTime::now();

    // A takes the free Lease and publishes; B does not write.
    assert!(tick(&a, &pa, t0).await.unwrap().is_some());
    assert_eq!(tick(&b, &pb, t0).await.unwrap(), None);
    assert_eq!(published_root(&fake, "ns1").as_deref(), Some("ROOT-A"));
    let lease = fake.get(LEASES, PUBLISHER_LEASE).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "ca-a");

    // A renews within the lease; B still may not take it.
    let t1 = t0 + Duration::from_secs(10);
    assert!(a.try_acquire_or_renew(t1).await.unwrap());
    assert!(
        !b.try_acquire_or_renew(t1 + Duration::from_secs(10))
            .await
            .unwrap()
    );

    // A stops renewing: after the lease duration B takes over and publishes; A then backs off.
    let t2 = t1 + Duration::from_secs(16);
    assert!(tick(&b, &pb, t2).await.unwrap().is_some());
    assert_eq!(published_root(&fake, "ns1").as_deref(), Some("ROOT-B"));
    let lease = fake.get(LEASES, PUBLISHER_LEASE).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "ca-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    assert_eq!(
        tick(&a, &pa, t2 + Duration::from_secs(1)).await.unwrap(),
        None
    );
    assert_eq!(published_root(&fake, "ns1").as_deref(), Some("ROOT-B"));
}

#[tokio::test]
async fn two_replicas_racing_for_a_free_lease_get_one_holder() {
    let fake = FakeApi::new();
    // Both read "no Lease" before either creates it.
    fake.hold_gets(LEASES, PUBLISHER_LEASE, 2);
    let (a, b) = (elector(&fake, "ca-a"), elector(&fake, "ca-b"));
    let now = SystemTime::now();
    let (ra, rb) = tokio::join!(a.try_acquire_or_renew(now), b.try_acquire_or_renew(now));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra ^ rb, "exactly one holder: {ra} {rb}");
    let holder = fake.get(LEASES, PUBLISHER_LEASE).unwrap()["spec"]["holderIdentity"].clone();
    assert_eq!(holder, if ra { "ca-a" } else { "ca-b" });
}

#[tokio::test]
async fn stale_replace_of_an_expired_lease_loses_to_the_first_taker() {
    let fake = FakeApi::new();
    let old = elector(&fake, "ca-old");
    let t0 = SystemTime::now();
    assert!(old.try_acquire_or_renew(t0).await.unwrap());
    // The Lease expires; B and C both read it, then both try to take it.
    fake.hold_gets(LEASES, PUBLISHER_LEASE, 2);
    let (b, c) = (elector(&fake, "ca-b"), elector(&fake, "ca-c"));
    let later = t0 + Duration::from_secs(60);
    let (rb, rc) = tokio::join!(b.try_acquire_or_renew(later), c.try_acquire_or_renew(later));
    let (rb, rc) = (rb.unwrap(), rc.unwrap());
    assert!(
        rb ^ rc,
        "the second replace carries a stale resourceVersion: {rb} {rc}"
    );
    assert_eq!(
        fake.get(LEASES, PUBLISHER_LEASE).unwrap()["spec"]["leaseTransitions"],
        1
    );
}

/// Runs the publisher as `who` with a tick of an hour (only the first tick happens in a
/// test), its events sent to the receiver; returns once its watches of Namespaces and root
/// ConfigMaps have listed (their watch requests follow the lists).
async fn run_publisher(
    fake: &FakeApi,
    who: &str,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<PublishEvent>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(run_reporting(
        elector(fake, who),
        RootPublisher::new(fake.client(), String::new()),
        Duration::from_secs(3600),
        || ("ROOT-1".to_owned(), Some("CRL-1".to_owned())),
        move |e| {
            let _ = tx.send(e.clone());
        },
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let watching = |c: &String, coll: &str| c.starts_with(coll) && c.contains("watch=true");
    loop {
        let calls = fake.calls();
        if calls.iter().any(|c| watching(c, "GET /api/v1/namespaces?"))
            && calls.iter().any(|c| watching(c, "GET /api/v1/configmaps?"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "watches never started: {calls:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (task, rx)
}

/// The next publisher event (bounded: 10 s).
async fn next_publish_event(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<PublishEvent>,
) -> PublishEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a publisher event within 10 s")
        .expect("publisher running")
}

/// The next `Watched` event, asserting that no tick happened before it.
async fn next_watched(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<PublishEvent>,
) -> (String, Option<Published>) {
    match next_publish_event(rx).await {
        PublishEvent::Watched {
            namespace,
            published,
        } => (namespace, published),
        other => panic!("expected a watch event, not {other:?}"),
    }
}

#[tokio::test]
async fn new_namespace_and_deleted_configmap_are_served_at_their_watch_events() {
    let fake = FakeApi::new();
    add_namespace(&fake, "ns1");
    let (task, mut rx) = run_publisher(&fake, "ca-a").await;
    match next_publish_event(&mut rx).await {
        PublishEvent::Tick(Ok(Some(p))) => assert_eq!(p.created, ["ns1"]),
        other => panic!("expected the first tick to publish, got {other:?}"),
    }

    // A new namespace: its ConfigMaps at its watch event, with no tick in between (the next
    // is an hour away).
    add_namespace(&fake, "ns-new");
    let (ns, published) = next_watched(&mut rx).await;
    assert_eq!(ns, "ns-new");
    let p = published.expect("the Lease holder publishes");
    assert_eq!((p.created, p.crl_created), (vec![ns.clone()], vec![ns]));
    assert_eq!(published_root(&fake, "ns-new").as_deref(), Some("ROOT-1"));
    assert_eq!(published_crl(&fake, "ns-new").as_deref(), Some("CRL-1"));

    // A deleted root ConfigMap: re-created at its watch event.
    fake.delete(&cms("ns1"), ROOT_CONFIGMAP).unwrap();
    let (ns, published) = next_watched(&mut rx).await;
    assert_eq!(ns, "ns1");
    assert_eq!(published.unwrap().created, ["ns1"]);
    assert_eq!(published_root(&fake, "ns1").as_deref(), Some("ROOT-1"));

    // A terminating namespace is no new namespace to publish into; its ConfigMaps going
    // with it are not re-created.
    fake.put(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "going"},
               "status": {"phase": "Terminating"}}),
    );
    fake.put(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns1"},
               "status": {"phase": "Terminating"}}),
    );
    // (The Namespace and ConfigMap watches are two streams: a new namespace marks when the
    // Namespace events before it were seen, as the namespace controller deletes a
    // terminating namespace's ConfigMaps well after its phase changed.)
    add_namespace(&fake, "ns-sync");
    assert_eq!(next_watched(&mut rx).await.0, "ns-sync");
    fake.delete(&cms("ns1"), ROOT_CONFIGMAP).unwrap();
    // Then one more new namespace: the next event is about it, not about the three above.
    add_namespace(&fake, "ns-last");
    let (ns, published) = next_watched(&mut rx).await;
    assert_eq!(ns, "ns-last");
    assert_eq!(published.unwrap().created, ["ns-last"]);
    // And a deletion in an active namespace: the ConfigMap stream's next event after ns1's.
    fake.delete(&cms("ns-new"), ROOT_CONFIGMAP).unwrap();
    let (ns, published) = next_watched(&mut rx).await;
    assert_eq!(ns, "ns-new", "ns1's deletion was not acted on");
    assert_eq!(published.unwrap().created, ["ns-new"]);
    assert_eq!(published_root(&fake, "going"), None);
    assert_eq!(published_root(&fake, "ns1"), None);
    task.abort();
}

#[tokio::test]
async fn a_replica_without_the_lease_does_not_publish_at_watch_events() {
    let fake = FakeApi::new();
    add_namespace(&fake, "ns1");
    // Another replica holds the Lease.
    assert!(
        elector(&fake, "ca-other")
            .try_acquire_or_renew(SystemTime::now())
            .await
            .unwrap()
    );
    let (task, mut rx) = run_publisher(&fake, "ca-b").await;
    assert_eq!(
        next_publish_event(&mut rx).await,
        PublishEvent::Tick(Ok(None))
    );
    add_namespace(&fake, "ns-new");
    let (ns, published) = next_watched(&mut rx).await;
    assert_eq!(ns, "ns-new");
    assert_eq!(published, None, "not the Lease holder: nothing written");
    assert_eq!(published_root(&fake, "ns-new"), None);
    assert_eq!(fake.count("POST /api/v1/namespaces/ns-new"), 0);
    task.abort();
}

/// With its watches in step, a tick of a quiet cluster costs the Lease renewal and nothing
/// else: no namespace list, no ConfigMap read, however many namespaces (before, every tick
/// listed namespaces and read two ConfigMaps in each). What differs is still set back by the
/// next tick: an edited root, a deleted CRL ConfigMap; and an unchanged one stays unwritten.
#[tokio::test]
async fn ticks_of_a_quiet_cluster_read_nothing_but_the_lease() {
    let fake = FakeApi::new();
    let names: Vec<String> = (0..20).map(|i| format!("ns{i}")).collect();
    for ns in &names {
        add_namespace(&fake, ns);
    }
    let task = publish_every_100ms(&fake);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !names
        .iter()
        .all(|ns| published_crl(&fake, ns).as_deref() == Some("CRL-1"))
    {
        assert!(tokio::time::Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the watches see the writes, then watch ten ticks.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = fake.calls().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls: Vec<String> = fake.calls()[before..].to_vec();
    let lease = calls.iter().filter(|c| c.contains("/leases/")).count();
    assert!(lease >= 10, "the Lease is renewed every tick: {calls:?}");
    let other: Vec<&String> = calls.iter().filter(|c| !c.contains("/leases/")).collect();
    assert!(
        other.iter().all(|c| c.contains("watch=true")),
        "a quiet tick reads nothing but the Lease: {other:?}"
    );

    // The twins: what differs is set back at the next ticks, and only that is written.
    let mut cm = fake.get(&cms("ns3"), ROOT_CONFIGMAP).unwrap();
    cm["data"]["root-cert.pem"] = json!("EDITED");
    fake.put(&cms("ns3"), cm);
    fake.delete(&cms("ns7"), CRL_CONFIGMAP).unwrap();
    let untouched =
        fake.get(&cms("ns5"), ROOT_CONFIGMAP).unwrap()["metadata"]["resourceVersion"].clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while published_root(&fake, "ns3").as_deref() != Some("ROOT-1")
        || published_crl(&fake, "ns7").as_deref() != Some("CRL-1")
    {
        assert!(tokio::time::Instant::now() < deadline, "never set back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        fake.get(&cms("ns5"), ROOT_CONFIGMAP).unwrap()["metadata"]["resourceVersion"],
        untouched
    );
    task.abort();
}

/// The publisher as `ca-a`, ticking every 100 ms, publishing `ROOT-1` and `CRL-1`.
fn publish_every_100ms(fake: &FakeApi) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run_reporting(
        elector(fake, "ca-a"),
        RootPublisher::new(fake.client(), String::new()),
        Duration::from_millis(100),
        || ("ROOT-1".to_owned(), Some("CRL-1".to_owned())),
        |_| {},
    ))
}

/// What a tick did to the API in one second of ticks (100 ms apart): the namespace lists
/// and the ConfigMap requests other than watches.
async fn requests_in_a_second(fake: &FakeApi) -> (usize, Vec<String>) {
    let before = fake.calls().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls: Vec<String> = fake.calls()[before..].to_vec();
    let lists = calls
        .iter()
        .filter(|c| c.starts_with("GET /api/v1/namespaces?") && !c.contains("watch=true"))
        .count();
    let configmaps = calls
        .iter()
        .filter(|c| c.contains("/configmaps") && !c.contains("watch=true"))
        .cloned()
        .collect();
    (lists, configmaps)
}

/// A watch that failed and resumed (the API server restarted; no re-list needed) brings one
/// full pass, then quiet ticks again; a namespace whose ConfigMaps cannot be written is
/// retried alone at each tick, without making every tick a full pass.
#[tokio::test]
async fn a_watch_error_costs_one_full_pass_and_a_failing_namespace_is_retried_alone() {
    let fake = FakeApi::new();
    for ns in ["ns0", "ns1", "ns2", "bad"] {
        add_namespace(&fake, ns);
    }
    fake.refuse_writes(&cms("bad"), true);
    let task = publish_every_100ms(&fake);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !["ns0", "ns1", "ns2"]
        .iter()
        .all(|ns| published_crl(&fake, ns).as_deref() == Some("CRL-1"))
    {
        assert!(tokio::time::Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (lists, configmaps) = requests_in_a_second(&fake).await;
    assert_eq!(lists, 0, "a failing namespace makes no tick a full pass");
    assert!(
        !configmaps.is_empty() && configmaps.iter().all(|c| c.contains("/namespaces/bad/")),
        "only the failing namespace is retried: {configmaps:?}"
    );
    assert!(published_root(&fake, "bad").is_none());

    // The ConfigMap watches fail for a while, then resume.
    fake.fail_watches("/api/v1/configmaps", true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.fail_watches("/api/v1/configmaps", false);
    // Writes meanwhile are seen once the watches resume: an edited root is set back.
    let mut cm = fake.get(&cms("ns1"), ROOT_CONFIGMAP).unwrap();
    cm["data"]["root-cert.pem"] = json!("EDITED");
    fake.put(&cms("ns1"), cm);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while published_root(&fake, "ns1").as_deref() != Some("ROOT-1") {
        assert!(tokio::time::Instant::now() < deadline, "never set back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Back to quiet ticks once the watches run again (kube-runtime's backoff: seconds).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (lists, configmaps) = requests_in_a_second(&fake).await;
        if lists == 0 && configmaps.iter().all(|c| c.contains("/namespaces/bad/")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ticks stayed full passes after the watches resumed: {lists} lists, {configmaps:?}"
        );
    }
    task.abort();
}
