//! TokenReview authentication and node authorization for the CA in Kubernetes mode.
//!
//! THE KUBERNETES API SERVER IS FAKED: every request goes through a real `kube::Client` to the
//! in-process fake of `support/fake_api.rs`, which answers TokenReviews and Pod look-ups as an
//! API server would. No cluster is involved.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rampart_certs::TrustDomain;
use rampart_citadel::{AuthMethod, BearerEvidence, Refusal};
use rampart_k8s::{KubeAuthenticator, NodeAccount, TokenReviewer};
use serde_json::json;
use support::fake_api::{FakeApi, FakeToken, fake_jwt};

const REVIEWS: &str = "POST /apis/authentication.k8s.io/v1/tokenreviews";

fn in_an_hour() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

fn authenticator(fake: &FakeApi, cluster_id: Option<&str>, cache: usize) -> KubeAuthenticator {
    let client = fake.client();
    KubeAuthenticator::new(
        client.clone(),
        TokenReviewer::new(client, "istio-ca", cache),
        TrustDomain::new("cluster.local").unwrap(),
        cluster_id.map(str::to_owned),
        ["istio-system/ztunnel".parse::<NodeAccount>().unwrap()],
    )
}

fn bearer(token: &str) -> BearerEvidence {
    BearerEvidence {
        token: token.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn reviewed_service_account_token_becomes_its_spiffe_id() {
    let fake = FakeApi::new();
    let tok = fake_jwt(in_an_hour(), "a");
    fake.add_token(
        &tok,
        FakeToken::service_account("ns1", "app", &["istio-ca"]),
    );
    let auth = authenticator(&fake, None, 16);
    let caller = auth.decide(&bearer(&tok), SystemTime::now()).await.unwrap();
    assert_eq!(
        caller.id.to_string(),
        "spiffe://cluster.local/ns/ns1/sa/app"
    );
    assert_eq!(caller.method, AuthMethod::Jwt);
    assert_eq!(fake.count(REVIEWS), 1);
}

#[tokio::test]
async fn unauthenticated_review_is_refused() {
    let fake = FakeApi::new();
    let tok = fake_jwt(in_an_hour(), "unknown");
    let auth = authenticator(&fake, None, 16);
    let err = auth
        .decide(&bearer(&tok), SystemTime::now())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Refusal::TokenReviewFailed(why) if why.contains("invalid bearer token")),
        "{err}"
    );
    assert_eq!(err.code(), tonic_code_unauthenticated());
}

#[tokio::test]
async fn token_for_another_audience_is_refused() {
    let fake = FakeApi::new();
    let tok = fake_jwt(in_an_hour(), "aud");
    // A real API server: no audience in common -> not authenticated.
    fake.add_token(&tok, FakeToken::service_account("ns1", "app", &["vault"]));
    let auth = authenticator(&fake, None, 16);
    let err = auth
        .decide(&bearer(&tok), SystemTime::now())
        .await
        .unwrap_err();
    assert!(matches!(err, Refusal::TokenReviewFailed(_)), "{err}");
}

#[tokio::test]
async fn authenticated_review_without_our_audience_is_refused() {
    let fake = FakeApi::new();
    let tok = fake_jwt(in_an_hour(), "aud2");
    // An API server that says "authenticated" but whose status.audiences lacks istio-ca.
    fake.add_token_status(
        &tok,
        json!({"authenticated": true, "audiences": ["https://kubernetes.default.svc"],
               "user": {"username": "system:serviceaccount:ns1:app"}}),
    );
    let auth = authenticator(&fake, None, 16);
    let err = auth
        .decide(&bearer(&tok), SystemTime::now())
        .await
        .unwrap_err();
    assert_eq!(err, Refusal::WrongAudience("istio-ca".into()));
    // ... and the twin: the same answer with istio-ca among the audiences passes.
    let tok2 = fake_jwt(in_an_hour(), "aud3");
    fake.add_token_status(
        &tok2,
        json!({"authenticated": true, "audiences": ["istio-ca"],
               "user": {"username": "system:serviceaccount:ns1:app"}}),
    );
    let caller = auth
        .decide(&bearer(&tok2), SystemTime::now())
        .await
        .unwrap();
    assert_eq!(
        caller.id.to_string(),
        "spiffe://cluster.local/ns/ns1/sa/app"
    );
}

#[tokio::test]
async fn non_service_account_user_is_refused() {
    let fake = FakeApi::new();
    let tok = fake_jwt(in_an_hour(), "user");
    fake.add_token_status(
        &tok,
        json!({"authenticated": true, "audiences": ["istio-ca"], "user": {"username": "alice"}}),
    );
    let auth = authenticator(&fake, None, 16);
    let err = auth
        .decide(&bearer(&tok), SystemTime::now())
        .await
        .unwrap_err();
    assert!(matches!(err, Refusal::NoIdentityInToken(_)), "{err}");
}

#[tokio::test]
async fn clusterid_header_must_name_our_cluster() {
    let fake = FakeApi::new();
    let tok = fake_jwt(in_an_hour(), "c");
    fake.add_token(
        &tok,
        FakeToken::service_account("ns1", "app", &["istio-ca"]),
    );
    let auth = authenticator(&fake, Some("Kubernetes"), 16);
    let mut ev = bearer(&tok);
    ev.cluster_id = Some("other-cluster".into());
    let err = auth.decide(&ev, SystemTime::now()).await.unwrap_err();
    assert!(
        matches!(&err, Refusal::ClusterIdMismatch(why) if why.contains("other-cluster") && why.contains("Kubernetes")),
        "{err}"
    );
    assert_eq!(
        fake.count(REVIEWS),
        0,
        "refused before the token is reviewed"
    );
    ev.cluster_id = Some("Kubernetes".into());
    assert!(auth.decide(&ev, SystemTime::now()).await.is_ok());
    ev.cluster_id = None;
    assert!(
        auth.decide(&ev, SystemTime::now()).await.is_ok(),
        "no header means this cluster, as istiod"
    );
}

#[tokio::test]
async fn cache_hit_does_not_ask_the_api_server_again_until_exp_or_max_age() {
    let fake = FakeApi::new();
    let exp = in_an_hour();
    let tok = fake_jwt(exp, "cached");
    fake.add_token(
        &tok,
        FakeToken::service_account("ns1", "app", &["istio-ca"]),
    );
    let auth = authenticator(&fake, None, 16);
    let now = SystemTime::now();
    for _ in 0..3 {
        auth.decide(&bearer(&tok), now).await.unwrap();
    }
    assert_eq!(fake.count(REVIEWS), 1, "one review, then the cache");
    // After MAX_REVIEW_AGE (before exp) the API server is asked again: a deleted Pod's bound
    // token must not live on in the cache until its exp.
    let aged = now + rampart_k8s::MAX_REVIEW_AGE + Duration::from_secs(1);
    auth.decide(&bearer(&tok), aged).await.unwrap();
    assert_eq!(
        fake.count(REVIEWS),
        2,
        "reviewed again after MAX_REVIEW_AGE"
    );
    fake.remove_token(&tok);
    let err = auth
        .decide(
            &bearer(&tok),
            aged + rampart_k8s::MAX_REVIEW_AGE + Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Refusal::TokenReviewFailed(_)), "{err}");
    // Past exp the token is refused without a review (the cache entry is no use any more).
    let after = UNIX_EPOCH + Duration::from_secs(exp + 1);
    let err = auth.decide(&bearer(&tok), after).await.unwrap_err();
    assert_eq!(err, Refusal::TokenExpired);
    assert_eq!(fake.count(REVIEWS), 3);
}

#[tokio::test]
async fn refused_tokens_are_not_cached() {
    let fake = FakeApi::new();
    let tok = fake_jwt(in_an_hour(), "later");
    let auth = authenticator(&fake, None, 16);
    assert!(auth.decide(&bearer(&tok), SystemTime::now()).await.is_err());
    // The token becomes valid (e.g. the API server's keys caught up): the next try is
    // reviewed again and passes.
    fake.add_token(
        &tok,
        FakeToken::service_account("ns1", "app", &["istio-ca"]),
    );
    assert!(auth.decide(&bearer(&tok), SystemTime::now()).await.is_ok());
    assert_eq!(fake.count(REVIEWS), 2);
}

#[tokio::test]
async fn cache_is_bounded() {
    let fake = FakeApi::new();
    let auth = authenticator(&fake, None, 4);
    let now = SystemTime::now();
    // Expiries inside MAX_REVIEW_AGE, one second apart, so "expires first" is well defined.
    let base = now.duration_since(UNIX_EPOCH).unwrap().as_secs() + 60;
    let tokens: Vec<String> = (0..10)
        .map(|i| {
            let t = fake_jwt(base + i, &format!("t{i}"));
            fake.add_token(&t, FakeToken::service_account("ns1", "app", &["istio-ca"]));
            t
        })
        .collect();
    for t in &tokens {
        auth.decide(&bearer(t), now).await.unwrap();
        assert!(
            auth.reviewer().cached() <= 4,
            "{}",
            auth.reviewer().cached()
        );
    }
    assert_eq!(auth.reviewer().cached(), 4);
    assert_eq!(fake.count(REVIEWS), 10);
    // The latest-expiring ones stay: the last token is a hit, the first is reviewed again.
    auth.decide(&bearer(&tokens[9]), now).await.unwrap();
    assert_eq!(fake.count(REVIEWS), 10);
    auth.decide(&bearer(&tokens[0]), now).await.unwrap();
    assert_eq!(fake.count(REVIEWS), 11);
}

fn tonic_code_unauthenticated() -> tonic::Code {
    tonic::Code::Unauthenticated
}
