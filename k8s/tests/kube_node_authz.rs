//! Node authorization of `ImpersonatedIdentity`, as istiod's: only trusted node accounts, only
//! for service accounts with a Pod on the caller's node.
//!
//! THE KUBERNETES API SERVER IS FAKED (`support/fake_api.rs`): TokenReviews and Pod look-ups
//! are answered in process through a real `kube::Client`. No cluster is involved.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

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
        let pod_lookups = fake.count("GET /api/v1/namespaces/istio-system/pods/ztunnel-node-a");
        assert_eq!(
            pod_lookups,
            usize::from(!node_claim),
            "the caller's Pod is looked up only without the node-name claim"
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

#[test]
fn node_account_syntax() {
    assert!("istio-system/ztunnel".parse::<NodeAccount>().is_ok());
    for bad in ["ztunnel", "/ztunnel", "istio-system/", "a/b/c"] {
        assert!(bad.parse::<NodeAccount>().is_err(), "{bad}");
    }
}
