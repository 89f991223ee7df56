//! The CA in Kubernetes mode over gRPC: a real CA server whose bearer tokens go through the
//! `ExternalAuthenticator` seam to TokenReview and node authorization.
//!
//! THE KUBERNETES API SERVER IS FAKED (`support/fake_api.rs`); the CA, its TLS and gRPC are
//! real, on loopback. No cluster is involved.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rampart_certs::{KeyAlgorithm, PrivateKey, SpiffeId, TrustDomain};
use rampart_citadel::{CaConfig, CaState, Metrics, RunningCa};
use rampart_k8s::{KubeAuthenticator, NodeAccount, TokenReviewer};
use rampart_proto::istio::v1::auth::IstioCertificateRequest;
use rampart_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use support::fake_api::{FakeApi, FakeToken, fake_jwt};
use tonic::transport::Channel;

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

async fn start(fake: &FakeApi, dir: &std::path::Path) -> RunningCa {
    let mut cfg = CaConfig::new(dir.join("cacerts"), dir.join("state"), td());
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.reload_poll_interval = Duration::from_secs(3600);
    let client = fake.client();
    let auth = KubeAuthenticator::new(
        client.clone(),
        TokenReviewer::new(client, "istio-ca", 64),
        td(),
        Some("Kubernetes".into()),
        ["istio-system/ztunnel".parse::<NodeAccount>().unwrap()],
    );
    let state = CaState::new_with_external(cfg, Metrics::new(), Some(Arc::new(auth))).unwrap();
    rampart_citadel::start_with_state(state).await.unwrap()
}

async fn client(ca: &RunningCa) -> IstioCertificateServiceClient<Channel> {
    let bundle = ca.state().authority().bundle().clone();
    let tls = rampart_citadel::client::config(&bundle, None).unwrap();
    rampart_citadel::client::connect(ca.local_addr, "127.0.0.1", Arc::new(tls))
        .await
        .unwrap()
}

async fn call(
    c: &mut IstioCertificateServiceClient<Channel>,
    id: &str,
    token: &str,
    cluster: Option<&str>,
    impersonate: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
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
    c.create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

fn exp() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

#[tokio::test]
async fn reviewed_token_gets_a_certificate_and_wrong_cluster_or_token_is_refused() {
    let fake = FakeApi::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = start(&fake, dir.path()).await;
    let mut c = client(&ca).await;
    let app = "spiffe://cluster.local/ns/ns1/sa/app";
    let tok = fake_jwt(exp(), "app");
    fake.add_token(
        &tok,
        FakeToken::service_account("ns1", "app", &["istio-ca"]),
    );

    let chain = call(&mut c, app, &tok, Some("Kubernetes"), None)
        .await
        .expect("reviewed token is certified");
    let leaf = rampart_certs::parse_certs_pem(&chain[0]).unwrap();
    let info = rampart_certs::CertInfo::parse(&leaf[0]).unwrap();
    assert_eq!(info.uri_sans, vec![app.to_owned()]);

    let err = call(&mut c, app, &tok, Some("elsewhere"), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("clusterid"), "{}", err.message());

    let unknown = fake_jwt(exp(), "unknown");
    let err = call(&mut c, app, &unknown, None, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("token review"), "{}", err.message());

    // Impersonation through the seam: a trusted node agent for a Pod on its node passes,
    // for a Pod elsewhere it does not.
    let zt = fake_jwt(exp(), "zt");
    fake.add_pod("istio-system", "zt-a", "ztunnel", "node-a", "uid-zt-a");
    fake.add_token(
        &zt,
        FakeToken::service_account("istio-system", "ztunnel", &["istio-ca"])
            .bound_to_pod("zt-a", "uid-zt-a")
            .on_node("node-a"),
    );
    fake.add_pod("ns1", "app-1", "app", "node-a", "uid-app-1");
    call(&mut c, app, &zt, None, Some(app))
        .await
        .expect("pod of that service account on the caller's node");
    let far = "spiffe://cluster.local/ns/ns2/sa/far";
    fake.add_pod("ns2", "far-1", "far", "node-b", "uid-far-1");
    let err = call(&mut c, far, &zt, None, Some(far)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("node-a"), "{}", err.message());
    ca.shutdown().await;
}
