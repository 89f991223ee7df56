//! Node authorization of `ImpersonatedIdentity`, as istiod's: only trusted node accounts, only
//! for service accounts with a Pod on the caller's node.
//!
//! THE KUBERNETES API SERVER IS FAKED (`support/fake_api.rs`): TokenReviews, the Pod list and
//! watch of the authenticator's Pod cache and Pod look-ups are answered in process through a
//! real `kube::Client`. No cluster is involved.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rampart_certs::TrustDomain;
use rampart_citadel::{AuthMethod, BearerEvidence, Refusal};
use rampart_k8s::{KubeAuthenticator, NodeAccount, TokenReviewer};
use support::fake_api::{FakeApi, FakeToken, fake_jwt};

const ZTUNNEL_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
const APP_ID: &str = "spiffe://cluster.local/ns/ns1/sa/app";

fn in_an_hour() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

fn authenticator(fake: &FakeApi) -> KubeAuthenticator {
    let client = fake.client();
    KubeAuthenticator::new(
        client.clone(),
        TokenReviewer::new(client, "istio-ca", 64),
        TrustDomain::new("cluster.local").unwrap(),
        None,
        ["istio-system/ztunnel".parse::<NodeAccount>().unwrap()],
    )
}

fn impersonating(token: &str, target: &str) -> BearerEvidence {
    BearerEvidence {
        token: token.into(),
        cluster_id: None,
        impersonate: Some(target.into()),
    }
}

/// A ztunnel token bound to its Pod on `node`; the Pod exists. `node_claim` adds the
/// node-name claim of Kubernetes 1.32+ (otherwise the node comes from the Pod).
fn ztunnel_on(fake: &FakeApi, node: &str, node_claim: bool) -> String {
    let tok = fake_jwt(in_an_hour(), &format!("ztunnel-{node}-{node_claim}"));
    let pod = format!("ztunnel-{node}");
    let uid = format!("uid-ztunnel-{node}");
    fake.add_pod("istio-system", &pod, "ztunnel", node, &uid);
    let mut t = FakeToken::service_account("istio-system", "ztunnel", &["istio-ca"])
        .bound_to_pod(&pod, &uid);
    if node_claim {
        t = t.on_node(node);
    }
    fake.add_token(&tok, t);
    tok
}

#[tokio::test]
async fn node_agent_may_act_for_a_pod_on_its_node() {
    for node_claim in [true, false] {
        let fake = FakeApi::new();
        let tok = ztunnel_on(&fake, "node-a", node_claim);
        fake.add_pod("ns1", "app-1", "app", "node-a", "uid-app-1");
        let caller = authenticator(&fake)
            .decide(&impersonating(&tok, APP_ID), SystemTime::now())
            .await
            .unwrap_or_else(|e| panic!("node_claim={node_claim}: {e}"));
        assert_eq!(caller.id.to_string(), APP_ID);
        assert_eq!(caller.method, AuthMethod::Impersonation);
        assert_eq!(caller.on_behalf_of.unwrap().to_string(), ZTUNNEL_ID);
        // Without the node-name claim the caller's Pod is read from the Pod cache (it was
        // there when the cache listed): no GET either way.
        let pod_lookups = fake.count("GET /api/v1/namespaces/istio-system/pods/ztunnel-node-a");
        assert_eq!(
            pod_lookups, 0,
            "node_claim={node_claim}: the caller's Pod comes from the cache"
        );
    }
}

#[tokio::test]
async fn node_agent_may_not_act_for_a_pod_on_another_node() {
    let fake = FakeApi::new();
    let tok = ztunnel_on(&fake, "node-a", true);
    fake.add_pod("ns1", "app-1", "app", "node-b", "uid-app-1");
    let err = authenticator(&fake)
        .decide(&impersonating(&tok, APP_ID), SystemTime::now())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Refusal::NodeAuthorizationDenied { reason, .. }
            if reason.contains("no Pod of service account ns1/app on node node-a")),
        "{err}"
    );
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn node_agent_may_not_act_for_a_service_account_without_pods() {
    let fake = FakeApi::new();
    let tok = ztunnel_on(&fake, "node-a", false);
    // Another service account's Pod on the node does not count.
    fake.add_pod("ns1", "other-1", "other", "node-a", "uid-other-1");
    let err = authenticator(&fake)
        .decide(&impersonating(&tok, APP_ID), SystemTime::now())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Refusal::NodeAuthorizationDenied { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn finished_pods_do_not_authorize() {
    let fake = FakeApi::new();
    let tok = ztunnel_on(&fake, "node-a", true);
    fake.put(
        "/api/v1/namespaces/ns1/pods",
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "job-1", "namespace": "ns1"},
            "spec": {"serviceAccountName": "app", "nodeName": "node-a", "containers": [{"name": "c"}]},
            "status": {"phase": "Succeeded"}}),
    );
    let err = authenticator(&fake)
        .decide(&impersonating(&tok, APP_ID), SystemTime::now())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Refusal::NodeAuthorizationDenied { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn untrusted_caller_may_not_impersonate_even_with_a_pod_on_its_node() {
    let fake = FakeApi::new();
    let tok = fake_jwt(in_an_hour(), "intruder");
    fake.add_pod("ns2", "intruder-1", "intruder", "node-a", "uid-i");
    fake.add_token(
        &tok,
        FakeToken::service_account("ns2", "intruder", &["istio-ca"])
            .bound_to_pod("intruder-1", "uid-i")
            .on_node("node-a"),
    );
    fake.add_pod("ns1", "app-1", "app", "node-a", "uid-app-1");
    let err = authenticator(&fake)
        .decide(&impersonating(&tok, APP_ID), SystemTime::now())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Refusal::ImpersonationDenied {
            caller: "spiffe://cluster.local/ns/ns2/sa/intruder".into()
        }
    );
    assert_eq!(
        fake.count("GET /api/v1/namespaces/ns1/pods"),
        0,
        "no Pod look-up"
    );
}

#[tokio::test]
async fn node_agent_may_always_ask_for_its_own_identity() {
    let fake = FakeApi::new();
    // Not bound to any Pod: its node is unknown, yet its own identity needs no node check.
    let tok = fake_jwt(in_an_hour(), "own");
    fake.add_token(
        &tok,
        FakeToken::service_account("istio-system", "ztunnel", &["istio-ca"]),
    );
    let auth = authenticator(&fake);
    let caller = auth
        .decide(&impersonating(&tok, ZTUNNEL_ID), SystemTime::now())
        .await
        .unwrap();
    assert_eq!(caller.id.to_string(), ZTUNNEL_ID);
    assert_eq!(caller.method, AuthMethod::Jwt);
    // The twin: the same unbound token asking for someone else is refused (node unknown).
    fake.add_pod("ns1", "app-1", "app", "node-a", "uid-app-1");
    let err = auth
        .decide(&impersonating(&tok, APP_ID), SystemTime::now())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Refusal::NodeAuthorizationDenied { reason, .. } if reason.contains("not bound to a Pod")),
        "{err}"
    );
}

#[tokio::test]
async fn bound_pod_replaced_under_the_same_name_does_not_count() {
    let fake = FakeApi::new();
    let tok = fake_jwt(in_an_hour(), "stale");
    // The token names Pod ztunnel-x with UID uid-old; the Pod of that name now has another UID.
    fake.add_pod("istio-system", "ztunnel-x", "ztunnel", "node-a", "uid-new");
    fake.add_token(
        &tok,
        FakeToken::service_account("istio-system", "ztunnel", &["istio-ca"])
            .bound_to_pod("ztunnel-x", "uid-old"),
    );
    fake.add_pod("ns1", "app-1", "app", "node-a", "uid-app-1");
    let err = authenticator(&fake)
        .decide(&impersonating(&tok, APP_ID), SystemTime::now())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Refusal::NodeAuthorizationDenied { reason, .. } if reason.contains("UID differs")),
        "{err}"
    );
}

#[tokio::test]
async fn node_agent_may_not_impersonate_another_node_agent() {
    let fake = FakeApi::new();
    let tok = ztunnel_on(&fake, "node-a", true);
    let other = "spiffe://cluster.local/ns/istio-system/sa/ztunnel-other";
    // Make the target a trusted node account too.
    let client = fake.client();
    let auth = KubeAuthenticator::new(
        client.clone(),
        TokenReviewer::new(client, "istio-ca", 64),
        TrustDomain::new("cluster.local").unwrap(),
        None,
        [
            "istio-system/ztunnel".parse::<NodeAccount>().unwrap(),
            "istio-system/ztunnel-other".parse().unwrap(),
        ],
    );
    fake.add_pod("istio-system", "zo", "ztunnel-other", "node-a", "uid-zo");
    let err = auth
        .decide(&impersonating(&tok, other), SystemTime::now())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Refusal::ImpersonationOfNodeAgent { .. }),
        "{err}"
    );
}

/// Requests that read Pods: (cluster-wide lists, per-namespace requests: GETs and LISTs).
fn pod_requests(fake: &FakeApi) -> (usize, usize) {
    let calls = fake.calls();
    let lists = calls
        .iter()
        .filter(|c| c.starts_with("GET /api/v1/pods") && !c.contains("watch=true"))
        .count();
    let namespaced = calls
        .iter()
        .filter(|c| c.starts_with("GET /api/v1/namespaces/") && c.contains("/pods"))
        .count();
    (lists, namespaced)
}

/// Decides again until `done` holds for the outcome (bounded: 10 s).
async fn until(
    auth: &KubeAuthenticator,
    ev: &BearerEvidence,
    what: &str,
    done: impl Fn(&Result<rampart_citadel::Caller, Refusal>) -> bool,
) -> Result<rampart_citadel::Caller, Refusal> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = auth.decide(ev, SystemTime::now()).await;
        if done(&r) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last outcome {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn decisions_come_from_the_pod_cache_not_a_list_per_request() {
    let fake = FakeApi::new();
    // No node-name claim: the caller's node comes from its Pod, in the cache too.
    let tok = ztunnel_on(&fake, "node-a", false);
    fake.add_pod("ns1", "app-1", "app", "node-a", "uid-app-1");
    fake.add_pod("ns2", "far-1", "far", "node-b", "uid-far-1");
    let auth = authenticator(&fake).with_pod_event_grace(Duration::from_millis(50));
    for _ in 0..5 {
        let caller = auth
            .decide(&impersonating(&tok, APP_ID), SystemTime::now())
            .await
            .unwrap();
        assert_eq!(caller.id.to_string(), APP_ID);
        // The twin: a service account whose only Pod is on another node is refused, also
        // from the cache.
        let err = auth
            .decide(
                &impersonating(&tok, "spiffe://cluster.local/ns/ns2/sa/far"),
                SystemTime::now(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Refusal::NodeAuthorizationDenied { reason, .. }
                if reason.contains("no Pod of service account ns2/far on node node-a")),
            "{err}"
        );
    }
    let (lists, namespaced) = pod_requests(&fake);
    assert_eq!(lists, 1, "one list of every namespace's Pods, by the cache");
    assert_eq!(namespaced, 0, "no Pod GET or LIST per request");
    assert!(auth.pods_synced());
}

#[tokio::test]
async fn caller_pod_missing_from_the_cache_is_looked_up_once() {
    let fake = FakeApi::new();
    fake.add_pod("ns1", "app-1", "app", "node-a", "uid-app-1");
    let auth = authenticator(&fake);
    let tok = fake_jwt(in_an_hour(), "late");
    fake.add_token(
        &tok,
        FakeToken::service_account("istio-system", "ztunnel", &["istio-ca"])
            .bound_to_pod("ztunnel-late", "uid-late"),
    );
    // The cache has listed; then the Pod watch goes down, so the caller's Pod created now
    // cannot reach the cache (as a Pod created a moment ago may not have yet).
    let _ = auth
        .decide(&impersonating(&tok, APP_ID), SystemTime::now())
        .await;
    assert!(auth.pods_synced());
    fake.fail_watches("/api/v1/pods", true);
    // Not there at all: refused after one GET.
    let err = auth
        .decide(&impersonating(&tok, APP_ID), SystemTime::now())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Refusal::NodeAuthorizationDenied { reason, .. }
            if reason.contains("Pod istio-system/ztunnel-late does not exist")),
        "{err}"
    );
    let gets = || fake.count("GET /api/v1/namespaces/istio-system/pods/ztunnel-late");
    let before = gets();
    fake.add_pod(
        "istio-system",
        "ztunnel-late",
        "ztunnel",
        "node-a",
        "uid-late",
    );
    let caller = auth
        .decide(&impersonating(&tok, APP_ID), SystemTime::now())
        .await
        .unwrap();
    assert_eq!(caller.id.to_string(), APP_ID);
    assert_eq!(gets(), before + 1, "one GET of the caller's Pod");
    // The bound UID still holds on the GET path: the same name with another UID is refused.
    fake.add_pod(
        "istio-system",
        "ztunnel-late",
        "ztunnel",
        "node-a",
        "uid-other",
    );
    let err = auth
        .decide(&impersonating(&tok, APP_ID), SystemTime::now())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Refusal::NodeAuthorizationDenied { reason, .. } if reason.contains("UID differs")),
        "{err}"
    );
}

#[tokio::test]
async fn deleted_pod_stops_authorizing_after_its_watch_event() {
    let fake = FakeApi::new();
    let tok = ztunnel_on(&fake, "node-a", true);
    fake.add_pod("ns1", "app-1", "app", "node-a", "uid-app-1");
    let auth = authenticator(&fake);
    let ev = impersonating(&tok, APP_ID);
    let caller = auth.decide(&ev, SystemTime::now()).await.unwrap();
    assert_eq!(caller.id.to_string(), APP_ID);
    fake.delete("/api/v1/namespaces/ns1/pods", "app-1");
    let err = until(
        &auth,
        &ev,
        "the deletion to reach the cache",
        Result::is_err,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, Refusal::NodeAuthorizationDenied { reason, .. }
            if reason.contains("no Pod of service account ns1/app on node node-a")),
        "{err}"
    );
    // The twin: a new Pod of the account on the node authorizes again, by its watch event.
    fake.add_pod("ns1", "app-2", "app", "node-a", "uid-app-2");
    until(&auth, &ev, "the new Pod to reach the cache", Result::is_ok)
        .await
        .unwrap();
    let (lists, namespaced) = pod_requests(&fake);
    assert_eq!(
        (lists, namespaced),
        (1, 0),
        "watch events, no re-list, no LIST per request"
    );
}

#[tokio::test]
async fn target_pod_arriving_within_the_grace_authorizes_without_an_api_request() {
    for grace in [Duration::ZERO, Duration::from_secs(15)] {
        let fake = FakeApi::new();
        let tok = ztunnel_on(&fake, "node-a", true);
        let auth = authenticator(&fake).with_pod_event_grace(grace);
        let ev = impersonating(&tok, APP_ID);
        // Synced, then the Pod watch goes down: the target's Pod, created now, reaches the
        // cache only when the watch is back (the re-list after kube-runtime's backoff).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !auth.pods_synced() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cache never listed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        fake.fail_watches("/api/v1/pods", true);
        fake.add_pod("ns1", "app-1", "app", "node-a", "uid-app-1");
        let restore = {
            let fake = fake.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                fake.fail_watches("/api/v1/pods", false);
            })
        };
        let r = auth.decide(&ev, SystemTime::now()).await;
        if grace.is_zero() {
            // The twin: without the grace the cache's answer stands.
            assert!(
                matches!(&r, Err(Refusal::NodeAuthorizationDenied { reason, .. })
                    if reason.contains("no Pod of service account ns1/app on node node-a")),
                "{r:?}"
            );
        } else {
            assert_eq!(
                r.unwrap().id.to_string(),
                APP_ID,
                "the Pod came by the re-list"
            );
        }
        restore.await.unwrap();
        assert_eq!(pod_requests(&fake).1, 0, "no per-request Pod look-up");
    }
}

#[tokio::test]
async fn impersonation_is_refused_until_the_pod_cache_has_listed() {
    let fake = FakeApi::new();
    let tok = ztunnel_on(&fake, "node-a", true);
    fake.add_pod("ns1", "app-1", "app", "node-a", "uid-app-1");
    // The API server cannot list Pods: the cache never syncs.
    fake.fail_watches("/api/v1/pods", true);
    let auth = authenticator(&fake).with_pod_sync_wait(Duration::from_millis(300));
    let ev = impersonating(&tok, APP_ID);
    let err = auth.decide(&ev, SystemTime::now()).await.unwrap_err();
    assert!(
        matches!(&err, Refusal::NodeAuthorizationDenied { reason, .. }
            if reason.contains("Pod cache") && reason.contains("has not listed Pods yet")),
        "{err}"
    );
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(!auth.pods_synced());
    assert_eq!(
        pod_requests(&fake).1,
        0,
        "no per-request Pod look-up stands in for the cache"
    );
    // The caller's own identity needs no Pod: still served while the cache is not ready.
    let own = auth
        .decide(&impersonating(&tok, ZTUNNEL_ID), SystemTime::now())
        .await
        .unwrap();
    assert_eq!(own.id.to_string(), ZTUNNEL_ID);
    // The twin: once the API server lists again, the cache syncs and the same request passes.
    fake.fail_watches("/api/v1/pods", false);
    let caller = until(&auth, &ev, "the cache to list", Result::is_ok)
        .await
        .unwrap();
    assert_eq!(caller.id.to_string(), APP_ID);
}

#[test]
fn node_account_syntax() {
    assert!("istio-system/ztunnel".parse::<NodeAccount>().is_ok());
    for bad in ["ztunnel", "/ztunnel", "istio-system/", "a/b/c"] {
        assert!(bad.parse::<NodeAccount>().is_err(), "{bad}");
    }
}
