//! In-process end-to-end tests of the CA over TLS: issuance, every refusal, renewal with a
//! client certificate, impersonation, plug-in reload, rotation overlap, restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rampart_certs::jwt::JwtSigner;
use rampart_certs::{
    CertInfo, CertificateAuthority, CertificateDer, IntermediateParams, KeyAlgorithm, PrivateKey,
    RootParams, SpiffeId, TrustBundle, TrustDomain, TrustDomainPolicy, Usage,
};
use rampart_citadel::{CaConfig, JwtIssuerConfig, ReloadOutcome, RunningCa};
use rampart_proto::istio::v1::auth::IstioCertificateRequest;
use rampart_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::transport::Channel;

const ISSUER: &str = "https://issuer.test";

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    signer: JwtSigner,
    ca: RunningCa,
    td: TrustDomain,
}

fn td() -> TrustDomain {
    "cluster.local".parse().unwrap()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn start(tweak: impl FnOnce(&mut CaConfig, &Path)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let signer = JwtSigner::new(&key, "k1").unwrap();
    let jwks = root.join("jwks.json");
    std::fs::write(&jwks, signer.jwks().unwrap().to_json().to_string()).unwrap();
    let mut cfg = CaConfig::new(root.join("cacerts"), root.join("state"), td());
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.jwt_issuers = vec![JwtIssuerConfig {
        issuer: ISSUER.into(),
        jwks_path: jwks,
    }];
    cfg.reload_poll_interval = Duration::from_secs(3600);
    tweak(&mut cfg, &root);
    let ca = rampart_citadel::start(cfg).await.expect("CA starts");
    Env {
        _dir: dir,
        root,
        signer,
        ca,
        td: td(),
    }
}

fn token_with(signer: &JwtSigner, claims: serde_json::Value) -> String {
    signer.sign(&claims).unwrap()
}

fn token(env: &Env, ns: &str, sa: &str) -> String {
    let now = unix_now();
    token_with(
        &env.signer,
        serde_json::json!({"iss": ISSUER, "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": ["istio-ca"], "iat": now, "exp": now + 600}),
    )
}

impl Env {
    fn bundle(&self) -> TrustBundle {
        self.ca.state().authority().bundle().clone()
    }

    fn id(&self, ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::istio(&self.td, ns, sa).unwrap()
    }

    async fn client(
        &self,
        cert: Option<(Vec<CertificateDer<'static>>, &PrivateKey)>,
    ) -> Result<IstioCertificateServiceClient<Channel>, rampart_citadel::CitadelError> {
        let tls = rampart_citadel::client::config(&self.bundle(), cert).unwrap();
        rampart_citadel::client::connect(self.ca.local_addr, "127.0.0.1", Arc::new(tls)).await
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.root.join("state/audit.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

async fn call(
    client: &mut IstioCertificateServiceClient<Channel>,
    csr: &str,
    ttl: i64,
    token: Option<&str>,
    impersonate: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
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
        csr: csr.to_owned(),
        validity_duration: ttl,
        metadata,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    client
        .create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

fn csr_for(id: &SpiffeId) -> (PrivateKey, String) {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = rampart_certs::build_csr(&key, id).unwrap();
    (key, csr)
}

fn chain_der(chain: &[String]) -> Vec<CertificateDer<'static>> {
    chain
        .iter()
        .flat_map(|pem| rampart_certs::parse_certs_pem(pem).unwrap())
        .collect()
}

/// Leaf + intermediates (drops the trailing roots element).
fn presented(chain: &[String]) -> Vec<CertificateDer<'static>> {
    chain_der(&chain[..chain.len() - 1])
}

fn verify(chain: &[String], bundle: &TrustBundle) -> Result<SpiffeId, rampart_certs::ChainError> {
    rampart_certs::verify_workload_chain(
        &presented(chain),
        bundle,
        &TrustDomainPolicy::local(td()),
        SystemTime::now(),
        Usage::ClientAuth,
    )
}

fn assert_refused(r: Result<Vec<String>, tonic::Status>, code: tonic::Code, needle: &str) {
    match r {
        Ok(_) => panic!("expected refusal {code:?} ({needle}), got a certificate"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(
                s.message().contains(needle),
                "message {:?} should name {needle:?}",
                s.message()
            );
        }
    }
}

#[tokio::test]
async fn jwt_caller_gets_chain_that_verifies_with_its_identity() {
    let env = start(|_, _| {}).await;
    let mut c = env.client(None).await.unwrap();
    let id = env.id("default", "web");
    let (key, csr) = csr_for(&id);
    let chain = call(
        &mut c,
        &csr,
        3600,
        Some(&token(&env, "default", "web")),
        None,
    )
    .await
    .unwrap();
    // Self-signed mode: leaf, then the root(s).
    assert_eq!(chain.len(), 2);
    assert_eq!(verify(&chain, &env.bundle()).unwrap(), id);
    let leaf = CertInfo::parse(&chain_der(&chain)[0]).unwrap();
    assert_eq!(leaf.uri_sans, vec![id.to_string()]);
    assert!(!leaf.is_ca);
    let life = leaf.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(life <= Duration::from_secs(3600) && life > Duration::from_secs(3500));
    // Only the CSR's key is certified.
    let ders = chain_der(&chain);
    let (_, parsed) = x509_parser::parse_x509_certificate(ders[0].as_ref()).unwrap();
    assert_eq!(
        parsed.public_key().raw,
        key.public_key_spki_der().as_slice()
    );
    // Audited before the response.
    let audit = env.audit_lines();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["spiffe_id"], id.to_string());
    assert_eq!(audit[0]["serial"], leaf.serial_hex.to_lowercase());
    assert_eq!(audit[0]["auth"], "jwt");
    // The CA's serving certificate chains to the served root and names 127.0.0.1.
    let serving = env.ca.state().serving_chain();
    let info = CertInfo::parse(&serving[0]).unwrap();
    assert!(info.ip_sans.contains(&"127.0.0.1".parse().unwrap()));
    assert!(
        info.dns_sans
            .contains(&"istiod.istio-system.svc".to_owned())
    );
}

/// By default the serving certificate also names `localhost`, so a client on the same
/// machine may dial the CA by that name; a name it does not carry is still refused.
#[tokio::test]
async fn serving_certificate_names_localhost_by_default() {
    let env = start(|_, _| {}).await;
    let info = CertInfo::parse(&env.ca.state().serving_chain()[0]).unwrap();
    assert!(
        info.dns_sans.contains(&"localhost".to_owned()),
        "{:?}",
        info.dns_sans
    );
    let tls = Arc::new(rampart_citadel::client::config(&env.bundle(), None).unwrap());
    let mut c = rampart_citadel::client::connect(env.ca.local_addr, "localhost", tls.clone())
        .await
        .expect("TLS to the CA as localhost");
    let id = env.id("default", "web");
    let (_, csr) = csr_for(&id);
    call(
        &mut c,
        &csr,
        600,
        Some(&token(&env, "default", "web")),
        None,
    )
    .await
    .expect("issued over a connection verified for localhost");
    // Negative twin: a name the certificate does not carry fails the handshake.
    assert!(
        rampart_citadel::client::connect(env.ca.local_addr, "ca.example.com", tls)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn default_and_short_ttls_are_honoured() {
    let env = start(|_, _| {}).await;
    let mut c = env.client(None).await.unwrap();
    let id = env.id("default", "web");
    let t = token(&env, "default", "web");
    let (_, csr) = csr_for(&id);
    let chain = call(&mut c, &csr, 0, Some(&t), None).await.unwrap();
    let leaf = CertInfo::parse(&chain_der(&chain)[0]).unwrap();
    let life = leaf.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(life > Duration::from_secs(24 * 3600 - 60) && life <= Duration::from_secs(24 * 3600));
    let chain = call(&mut c, &csr, 5, Some(&t), None).await.unwrap();
    let leaf = CertInfo::parse(&chain_der(&chain)[0]).unwrap();
    let life = leaf.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(life <= Duration::from_secs(5), "{life:?}");
}

#[tokio::test]
async fn every_refusal_names_its_reason_and_issues_nothing() {
    let env = start(|cfg, _| {
        cfg.max_ttl = Duration::from_secs(48 * 3600);
        cfg.max_csr_bytes = 4096;
    })
    .await;
    let mut c = env.client(None).await.unwrap();
    let id = env.id("default", "web");
    let good = token(&env, "default", "web");
    let (_, csr) = csr_for(&id);
    let now = unix_now();
    use tonic::Code;

    // CSR for another identity.
    let (_, other) = csr_for(&env.id("default", "db"));
    assert_refused(
        call(&mut c, &other, 0, Some(&good), None).await,
        Code::PermissionDenied,
        "SAN mismatch",
    );
    // Expired token.
    let expired = token_with(
        &env.signer,
        serde_json::json!({"iss": ISSUER,
        "sub": "system:serviceaccount:default:web", "aud": "istio-ca", "exp": now - 3600}),
    );
    assert_refused(
        call(&mut c, &csr, 0, Some(&expired), None).await,
        Code::Unauthenticated,
        "token expired",
    );
    // Unknown issuer (a key we do not know, another iss).
    let stranger =
        JwtSigner::new(&PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), "x").unwrap();
    let foreign = token_with(
        &stranger,
        serde_json::json!({"iss": "https://evil.test",
        "sub": "system:serviceaccount:default:web", "aud": "istio-ca", "exp": now + 600}),
    );
    assert_refused(
        call(&mut c, &csr, 0, Some(&foreign), None).await,
        Code::Unauthenticated,
        "unknown issuer",
    );
    // Right issuer name, wrong key.
    let forged = token_with(
        &stranger,
        serde_json::json!({"iss": ISSUER,
        "sub": "system:serviceaccount:default:web", "aud": "istio-ca", "exp": now + 600}),
    );
    assert_refused(
        call(&mut c, &csr, 0, Some(&forged), None).await,
        Code::Unauthenticated,
        "invalid token",
    );
    // Wrong audience.
    let wrong_aud = token_with(
        &env.signer,
        serde_json::json!({"iss": ISSUER,
        "sub": "system:serviceaccount:default:web", "aud": "other", "exp": now + 600}),
    );
    assert_refused(
        call(&mut c, &csr, 0, Some(&wrong_aud), None).await,
        Code::Unauthenticated,
        "audience",
    );
    // kubernetes.io claims work instead of sub.
    let k8s = token_with(
        &env.signer,
        serde_json::json!({"iss": ISSUER, "aud": ["istio-ca"],
        "exp": now + 600, "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "web"}}}),
    );
    call(&mut c, &csr, 0, Some(&k8s), None)
        .await
        .expect("kubernetes.io claims identify the caller");
    // Garbage CSR.
    assert_refused(
        call(&mut c, "hello", 0, Some(&good), None).await,
        Code::InvalidArgument,
        "bad CSR PEM",
    );
    // Tampered CSR: flip a byte inside the signed part.
    let mut der = pem_body(&csr);
    let n = der.len();
    der[n / 2] ^= 0x01;
    let tampered = to_pem("CERTIFICATE REQUEST", &der);
    let r = call(&mut c, &tampered, 0, Some(&good), None).await;
    assert_eq!(
        r.as_ref().unwrap_err().code(),
        Code::InvalidArgument,
        "{r:?}"
    );
    // TTL above the maximum, negative TTL.
    assert_refused(
        call(&mut c, &csr, 49 * 3600, Some(&good), None).await,
        Code::InvalidArgument,
        "TTL too long",
    );
    assert_refused(
        call(&mut c, &csr, -5, Some(&good), None).await,
        Code::InvalidArgument,
        "TTL",
    );
    // No credentials at all.
    assert_refused(
        call(&mut c, &csr, 0, None, None).await,
        Code::Unauthenticated,
        "no bearer token",
    );
    // Oversized CSR.
    let big = format!("{csr}{}", "A".repeat(5000));
    assert_refused(
        call(&mut c, &big, 0, Some(&good), None).await,
        Code::InvalidArgument,
        "above the limit",
    );
    // Impersonation by a non node agent.
    assert_refused(
        call(
            &mut c,
            &other,
            0,
            Some(&good),
            Some("spiffe://cluster.local/ns/default/sa/db"),
        )
        .await,
        Code::PermissionDenied,
        "may not impersonate",
    );
    // Only the kubernetes.io success was issued and audited.
    assert_eq!(env.audit_lines().len(), 1);
    let metrics = env.ca.state().metrics().render(SystemTime::now());
    assert!(
        metrics.contains("citadel_server_success_cert_issuance_count 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("citadel_server_csr_sign_err_count{error=\"san_mismatch\"} 1\n"));
    assert!(metrics.contains("citadel_server_csr_sign_err_count{error=\"token_expired\"} 1\n"));
}

fn pem_body(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

fn to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[tokio::test]
async fn node_agent_may_impersonate_workloads() {
    let env = start(|cfg, _| {
        cfg.node_agents = vec![rampart_citadel::NodeAgentGrant {
            id: SpiffeId::parse("spiffe://cluster.local/ns/istio-system/sa/ztunnel").unwrap(),
            may_act_for: vec!["default/*".parse().unwrap(), "shop/cart".parse().unwrap()],
        }];
    })
    .await;
    let mut c = env.client(None).await.unwrap();
    let agent = token(&env, "istio-system", "ztunnel");
    let workload = env.id("default", "web");
    let (_, csr) = csr_for(&workload);
    let chain = call(&mut c, &csr, 600, Some(&agent), Some(&workload.to_string()))
        .await
        .expect("node agent impersonates");
    assert_eq!(verify(&chain, &env.bundle()).unwrap(), workload);
    let audit = env.audit_lines();
    assert_eq!(audit[0]["auth"], "impersonation");
    assert!(audit[0]["caller"].as_str().unwrap().contains("ztunnel"));
    // Another trust domain is not impersonable.
    let (_, csr2) = csr_for(&SpiffeId::parse("spiffe://other.td/ns/default/sa/web").unwrap());
    let r = call(
        &mut c,
        &csr2,
        600,
        Some(&agent),
        Some("spiffe://other.td/ns/default/sa/web"),
    )
    .await;
    assert_refused(r, tonic::Code::InvalidArgument, "trust domain");
    // Outside the agent's grant: refused, nothing issued, and the reason names both.
    let before = env.audit_lines().len();
    for target in ["shop/admin", "kube-system/web"] {
        let (ns, sa) = target.split_once('/').unwrap();
        let id = env.id(ns, sa);
        let (_, csr) = csr_for(&id);
        let r = call(&mut c, &csr, 600, Some(&agent), Some(&id.to_string())).await;
        assert_refused(r, tonic::Code::PermissionDenied, "may not act for");
    }
    assert_eq!(env.audit_lines().len(), before, "no certificate was issued");
    // Inside it: a single service account of another namespace.
    let cart = env.id("shop", "cart");
    let (_, csr) = csr_for(&cart);
    call(&mut c, &csr, 600, Some(&agent), Some(&cart.to_string()))
        .await
        .expect("granted service account");
}

/// Chaining: an agent allowed `ns1/*` must not get a certificate for another node agent that
/// lives in `ns1` (with it, it would renew as that agent and act with its wider grant). Its
/// own identity through ImpersonatedIdentity stays allowed (ztunnel's shared mode).
#[tokio::test]
async fn node_agent_may_not_impersonate_another_node_agent_but_may_ask_for_itself() {
    let env = start(|cfg, _| {
        cfg.node_agents = vec![
            rampart_citadel::NodeAgentGrant {
                id: SpiffeId::parse("spiffe://cluster.local/ns/ns1/sa/agent-a").unwrap(),
                may_act_for: vec!["ns1/*".parse().unwrap()],
            },
            rampart_citadel::NodeAgentGrant {
                id: SpiffeId::parse("spiffe://cluster.local/ns/ns1/sa/agent-b").unwrap(),
                may_act_for: vec!["*".parse().unwrap()],
            },
        ];
    })
    .await;
    let mut c = env.client(None).await.unwrap();
    let agent_a = token(&env, "ns1", "agent-a");
    let b = env.id("ns1", "agent-b");
    let (_, csr) = csr_for(&b);
    let r = call(&mut c, &csr, 600, Some(&agent_a), Some(&b.to_string())).await;
    assert_refused(r, tonic::Code::PermissionDenied, "itself a node agent");
    let r = call(&mut c, &csr, 600, Some(&agent_a), Some(&b.to_string())).await;
    let msg = r.unwrap_err().message().to_owned();
    assert!(
        msg.contains("spiffe://cluster.local/ns/ns1/sa/agent-a")
            && msg.contains("spiffe://cluster.local/ns/ns1/sa/agent-b"),
        "names both identities: {msg}"
    );
    // Even the agent with `*` may not take agent-a's identity.
    let a = env.id("ns1", "agent-a");
    let (_, csr_a) = csr_for(&a);
    let r = call(
        &mut c,
        &csr_a,
        600,
        Some(&token(&env, "ns1", "agent-b")),
        Some(&a.to_string()),
    )
    .await;
    assert_refused(r, tonic::Code::PermissionDenied, "itself a node agent");
    assert!(env.audit_lines().is_empty(), "nothing was issued");

    // Positive twins: its own identity through ImpersonatedIdentity, and an ordinary
    // workload of its namespace.
    let chain = call(&mut c, &csr_a, 600, Some(&agent_a), Some(&a.to_string()))
        .await
        .expect("a node agent may ask for its own identity");
    assert_eq!(verify(&chain, &env.bundle()).unwrap(), a);
    let web = env.id("ns1", "web");
    let (_, csr_w) = csr_for(&web);
    let chain = call(&mut c, &csr_w, 600, Some(&agent_a), Some(&web.to_string()))
        .await
        .expect("a workload of its grant");
    assert_eq!(verify(&chain, &env.bundle()).unwrap(), web);
    // The explicit `*` grant covers every workload (that is not a node agent).
    let other = env.id("kube-system", "dns");
    let (_, csr_o) = csr_for(&other);
    let chain = call(
        &mut c,
        &csr_o,
        600,
        Some(&token(&env, "ns1", "agent-b")),
        Some(&other.to_string()),
    )
    .await
    .expect("`*` grant");
    assert_eq!(verify(&chain, &env.bundle()).unwrap(), other);
    assert_eq!(env.audit_lines().len(), 3);
}

#[tokio::test]
async fn renewal_with_client_certificate_and_refusal_of_foreign_one() {
    let env = start(|_, _| {}).await;
    let id = env.id("default", "web");
    let (key, csr) = csr_for(&id);
    let mut c = env.client(None).await.unwrap();
    let chain = call(
        &mut c,
        &csr,
        600,
        Some(&token(&env, "default", "web")),
        None,
    )
    .await
    .unwrap();
    // Renew with the certificate only (no token).
    let mut mtls = env.client(Some((presented(&chain), &key))).await.unwrap();
    let (_, csr2) = csr_for(&id);
    let renewed = call(&mut mtls, &csr2, 600, None, None)
        .await
        .expect("renewal by mTLS");
    assert_eq!(verify(&renewed, &env.bundle()).unwrap(), id);
    assert_eq!(env.audit_lines()[1]["auth"], "mtls");
    // The certificate proves only its own identity.
    let (_, other) = csr_for(&env.id("default", "db"));
    assert_refused(
        call(&mut mtls, &other, 600, None, None).await,
        tonic::Code::PermissionDenied,
        "SAN mismatch",
    );

    // A client certificate from a CA we do not trust: refused with the reason named (the
    // handshake proves only possession of the key), and nothing is issued.
    let foreign_ca = CertificateAuthority::self_signed_root(
        &RootParams::default(),
        PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        SystemTime::now(),
    )
    .unwrap();
    let fkey = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let fleaf = foreign_ca
        .issue_workload(
            &fkey.public_key_spki_der(),
            &id,
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .unwrap();
    let mut fc = env.client(Some((vec![fleaf], &fkey))).await.unwrap();
    assert_refused(
        call(&mut fc, &csr2, 600, None, None).await,
        tonic::Code::Unauthenticated,
        "does not verify against the trust bundle",
    );
    assert_eq!(env.audit_lines().len(), 2);
}

struct PluginCa {
    root: CertificateAuthority,
    int_cert: CertificateDer<'static>,
    int_key: PrivateKey,
}

fn make_plugin_ca(name: &str) -> PluginCa {
    let now = SystemTime::now();
    let root = CertificateAuthority::self_signed_root(
        &RootParams {
            common_name: format!("{name} root"),
            organization: "test".into(),
            validity: Duration::from_secs(3650 * 86400),
        },
        PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        now,
    )
    .unwrap();
    let int_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let int_cert = root
        .issue_intermediate(
            &IntermediateParams {
                common_name: format!("{name} intermediate"),
                ..Default::default()
            },
            &int_key.public_key_spki_der(),
            now,
        )
        .unwrap();
    PluginCa {
        root,
        int_cert,
        int_key,
    }
}

fn write_plugin(dir: &Path, ca: &PluginCa, roots: &[&PluginCa]) {
    std::fs::create_dir_all(dir).unwrap();
    let pem = |c: &CertificateDer<'_>| rampart_certs::certs_to_pem(std::slice::from_ref(c));
    std::fs::write(dir.join("ca-cert.pem"), pem(&ca.int_cert)).unwrap();
    std::fs::write(dir.join("ca-key.pem"), ca.int_key.to_pkcs8_pem().as_bytes()).unwrap();
    std::fs::write(
        dir.join("cert-chain.pem"),
        format!("{}{}", pem(&ca.int_cert), pem(ca.root.cert())),
    )
    .unwrap();
    let roots: String = roots.iter().map(|r| pem(r.root.cert())).collect();
    std::fs::write(dir.join("root-cert.pem"), roots).unwrap();
}

#[tokio::test]
async fn plugin_reload_rotation_overlap_and_root_removal() {
    let a = make_plugin_ca("A");
    let b = make_plugin_ca("B");
    let env = start(|_, root| write_plugin(&root.join("cacerts"), &a, &[&a])).await;
    let cacerts = env.root.join("cacerts");
    let state = env.ca.state().clone();
    let id = env.id("default", "web");
    let t = token(&env, "default", "web");
    let mut c = env.client(None).await.unwrap();

    // Plug-in chain: leaf, intermediate, root.
    let (key_x, csr) = csr_for(&id);
    let x = call(&mut c, &csr, 3600, Some(&t), None).await.unwrap();
    assert_eq!(x.len(), 3);
    let bundle_a = env.bundle();
    verify(&x, &bundle_a).unwrap();
    assert_eq!(state.reload_now(), ReloadOutcome::Unchanged);

    // Bad change: B's intermediate with A's key. Refused, counted, A keeps signing.
    let bad_change = || {
        write_plugin(&cacerts, &b, &[&a, &b]);
        std::fs::write(
            cacerts.join("ca-key.pem"),
            a.int_key.to_pkcs8_pem().as_bytes(),
        )
        .unwrap();
    };
    bad_change();
    assert!(matches!(state.reload_now(), ReloadOutcome::Refused(_)));
    assert_eq!(state.metrics().reload_failure_count(), 1);
    let still = call(&mut c, &csr, 3600, Some(&t), None).await.unwrap();
    verify(&still, &bundle_a).unwrap();
    // The same bad content is not re-reported on every poll.
    assert_eq!(state.reload_now(), ReloadOutcome::Unchanged);
    // Put back as it was (nothing to load), then the same bad change again: refused and
    // reported again, not taken for the change already seen.
    write_plugin(&cacerts, &a, &[&a]);
    assert_eq!(state.reload_now(), ReloadOutcome::Unchanged);
    bad_change();
    assert!(matches!(state.reload_now(), ReloadOutcome::Refused(_)));
    assert_eq!(state.metrics().reload_failure_count(), 2);

    // Overlap step 1: A still signs, the bundle holds A and B.
    write_plugin(&cacerts, &a, &[&a, &b]);
    assert_eq!(state.reload_now(), ReloadOutcome::Reloaded);
    let bundle_ab = env.bundle();
    assert_eq!(bundle_ab.roots().len(), 2);
    // Overlap step 2: B signs; clients that picked up A+B verify new certificates, and
    // certificates from A still verify against the bundle.
    write_plugin(&cacerts, &b, &[&a, &b]);
    assert_eq!(state.reload_now(), ReloadOutcome::Reloaded);
    let mut c2 = env.client(None).await.unwrap();
    let y = call(&mut c2, &csr, 3600, Some(&t), None).await.unwrap();
    verify(&y, &bundle_ab).expect("new certificate verifies for clients holding A+B");
    verify(&x, &env.bundle()).expect("old certificate still verifies during overlap");
    assert!(
        verify(&y, &bundle_a).is_err(),
        "B-issued cert must not verify against A alone"
    );
    // mTLS renewal with the A-issued certificate still works during overlap.
    let mut renew_a = env.client(Some((presented(&x), &key_x))).await.unwrap();
    call(&mut renew_a, &csr, 600, None, None)
        .await
        .expect("A cert renews during overlap");

    // Step 3: A leaves the bundle. The A certificate is now "revoked": refused on the open
    // connection and on a new one.
    write_plugin(&cacerts, &b, &[&b]);
    assert_eq!(state.reload_now(), ReloadOutcome::Reloaded);
    assert_refused(
        call(&mut renew_a, &csr, 600, None, None).await,
        tonic::Code::Unauthenticated,
        "does not verify against the trust bundle",
    );
    let fresh = env.client(Some((presented(&x), &key_x))).await;
    let refused = match fresh {
        Err(_) => true,
        Ok(mut cl) => call(&mut cl, &csr, 600, None, None).await.is_err(),
    };
    assert!(
        refused,
        "a client certificate from a removed root must be refused"
    );
    assert_eq!(state.metrics().reload_success_count(), 3);
}

#[tokio::test]
async fn watcher_picks_up_changes_without_reload_call() {
    let a = make_plugin_ca("A");
    let b = make_plugin_ca("B");
    let env = start(|cfg, root| {
        write_plugin(&root.join("cacerts"), &a, &[&a]);
        cfg.reload_poll_interval = Duration::from_millis(500);
    })
    .await;
    write_plugin(&env.root.join("cacerts"), &b, &[&a, &b]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while env.bundle().roots().len() != 2 {
        assert!(std::time::Instant::now() < deadline, "reload not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn rotated_jwks_file_applies_without_restart_and_a_broken_one_is_refused() {
    let env = start(|cfg, _| cfg.reload_poll_interval = Duration::from_millis(300)).await;
    let mut c = env.client(None).await.unwrap();
    let id = env.id("default", "web");
    let old_token = token(&env, "default", "web");
    let (_, csr) = csr_for(&id);
    call(&mut c, &csr, 3600, Some(&old_token), None)
        .await
        .expect("token of the configured key");

    // The issuer rotates its key: the file now holds only the new one.
    let new_signer = JwtSigner::new(
        &PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        "k2",
    )
    .unwrap();
    let now = unix_now();
    let new_token = token_with(
        &new_signer,
        serde_json::json!({"iss": ISSUER, "sub": "system:serviceaccount:default:web",
            "aud": ["istio-ca"], "iat": now, "exp": now + 600}),
    );
    let jwks_path = env.root.join("jwks.json");
    let tmp = env.root.join("jwks.json.tmp");
    std::fs::write(&tmp, new_signer.jwks().unwrap().to_json().to_string()).unwrap();
    std::fs::rename(&tmp, &jwks_path).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if call(&mut c, &csr, 3600, Some(&new_token), None)
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rotated JWKS not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The removed key no longer proves anything, even for a token verified before.
    assert_refused(
        call(&mut c, &csr, 3600, Some(&old_token), None).await,
        tonic::Code::Unauthenticated,
        "",
    );

    // A broken file is refused; the keys in force keep working.
    std::fs::write(&jwks_path, "{not json").unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    call(&mut c, &csr, 3600, Some(&new_token), None)
        .await
        .expect("last good keys keep verifying");
}

#[tokio::test]
async fn self_signed_root_is_renewed_in_its_grace_period_with_the_same_key() {
    // A self-signed root of 20 min (2 min backdate: 22 min of life), made 932 s ago: its 20%
    // grace period starts 1056 s after its not-before, about 4 s after the CA starts, and it
    // still has 268 s to live.
    let make_old = |state: &Path| {
        std::fs::create_dir_all(state).unwrap();
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        key.write_pem_file(&state.join("root-key.pem")).unwrap();
        let params = RootParams {
            common_name: "Rampart self-signed root".into(),
            organization: "cluster.local".into(),
            validity: Duration::from_secs(1200),
        };
        let made = SystemTime::now() - Duration::from_secs(932);
        let old = CertificateAuthority::self_signed_root(&params, key, made).unwrap();
        std::fs::write(
            state.join("root-cert.pem"),
            rampart_certs::certs_to_pem(std::slice::from_ref(old.cert())),
        )
        .unwrap();
        old.cert().clone()
    };
    let mut old_root = None;
    let env = start(|cfg, root| {
        old_root = Some(make_old(&root.join("state")));
        cfg.default_ttl = Duration::from_secs(30);
        cfg.max_ttl = Duration::from_secs(60);
        cfg.self_signed_root_ttl = Duration::from_secs(2 * 3600);
        cfg.reload_poll_interval = Duration::from_millis(200);
    })
    .await;
    let old_root = old_root.unwrap();
    assert_eq!(env.bundle().roots().len(), 1, "not due yet at start");
    let mut c = env.client(None).await.unwrap();
    let id = env.id("default", "web");
    let (_, csr) = csr_for(&id);
    let tok = token(&env, "default", "web");
    let before = call(&mut c, &csr, 30, Some(&tok), None).await.unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while env.bundle().roots().len() != 2 {
        assert!(std::time::Instant::now() < deadline, "root not renewed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new_root = env.ca.state().authority().bundle().roots()[0].clone();
    assert_ne!(new_root, old_root, "the new root is signing");
    let new_info = CertInfo::parse(&new_root).unwrap();
    let old_info = CertInfo::parse(&old_root).unwrap();
    assert_eq!(new_info.subject, old_info.subject);
    assert!(new_info.not_after > old_info.not_after + Duration::from_secs(3600));
    assert!(env.root.join("state/root-cert-previous.pem").is_file());

    // Same key and subject: certificates from either root verify under the other alone.
    let only = |der: &CertificateDer<'static>| TrustBundle::from_der(vec![der.clone()]).unwrap();
    assert_eq!(verify(&before, &only(&new_root)).unwrap(), id);
    let (_, csr) = csr_for(&id);
    let c2 = env.client(None).await;
    let after = call(&mut c2.unwrap(), &csr, 30, Some(&tok), None)
        .await
        .unwrap();
    assert_eq!(verify(&after, &only(&old_root)).unwrap(), id);
    assert_eq!(verify(&after, &only(&new_root)).unwrap(), id);
}

/// A self-signed CA with its folders in `dir`, on an ephemeral port, no token issuers.
fn plain_config(dir: &Path) -> CaConfig {
    let mut cfg = CaConfig::new(dir.join("cacerts"), dir.join("state"), td());
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg
}

#[tokio::test]
async fn self_signed_root_persists_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mk = || plain_config(dir.path());
    let first = rampart_citadel::start(mk()).await.unwrap();
    let fp1 = first.state().authority().signing_root().fingerprint.clone();
    first.shutdown().await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("state/root-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let second = rampart_citadel::start(mk()).await.unwrap();
    assert_eq!(second.state().authority().signing_root().fingerprint, fp1);
    second.shutdown().await;
}

/// One CA per state directory: a second one is refused, naming the directory and the holder,
/// before it reads or makes anything there (two self-signed roots, one admin socket taken
/// over, two writers of one audit log); the first keeps serving; once it stops, the
/// directory is free.
#[tokio::test]
async fn a_second_ca_on_a_state_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mk = || plain_config(dir.path());
    let first = rampart_citadel::start(mk()).await.unwrap();
    let fp1 = first.state().authority().signing_root().fingerprint.clone();
    let audit = std::fs::read(dir.path().join("state/audit.jsonl")).unwrap();
    let err = rampart_citadel::start(mk()).await.unwrap_err().to_string();
    let state = dir.path().join("state");
    assert!(err.contains("is in use by process"), "{err}");
    assert!(err.contains(&std::process::id().to_string()), "{err}");
    assert!(err.contains(&state.display().to_string()), "{err}");
    assert!(err.contains("ca.lock"), "{err}");
    // Nothing of the first CA's was touched.
    assert_eq!(first.state().authority().signing_root().fingerprint, fp1);
    assert_eq!(std::fs::read(state.join("audit.jsonl")).unwrap(), audit);
    assert!(rampart_citadel::admin_socket_path(&state).exists());
    first.shutdown().await;
    // Stopped: the next one starts, with the same root.
    let second = rampart_citadel::start(mk()).await.expect("free again");
    assert_eq!(second.state().authority().signing_root().fingerprint, fp1);
    // A RunningCa dropped without shutdown frees it too.
    drop(second);
    let third = rampart_citadel::start(mk()).await.expect("free after drop");
    third.shutdown().await;
    // A lock file that is not the CA's own (a hard link to another file) is refused, and
    // that file is not truncated.
    let other = dir.path().join("other");
    std::fs::write(&other, "keep").unwrap();
    std::fs::remove_file(state.join("ca.lock")).unwrap();
    std::fs::hard_link(&other, state.join("ca.lock")).unwrap();
    let err = rampart_citadel::start(mk()).await.unwrap_err().to_string();
    assert!(err.contains("not a regular file of its own"), "{err}");
    assert_eq!(std::fs::read_to_string(&other).unwrap(), "keep");
}

/// The root certificate deleted beside its key (what an older `rampart up` did): the CA
/// makes the certificate again for the same key and subject, so certificates issued before
/// still verify. Without the key, a new root is made (nothing to keep).
#[tokio::test]
async fn self_signed_root_certificate_lost_beside_its_key_is_made_again_for_the_same_key() {
    let env = start(|_, _| {}).await;
    let id = env.id("default", "web");
    let (_, csr) = csr_for(&id);
    let mut c = env.client(None).await.unwrap();
    let before = call(
        &mut c,
        &csr,
        600,
        Some(&token(&env, "default", "web")),
        None,
    )
    .await
    .unwrap();
    let old_root = env.bundle().roots()[0].clone();
    let state = env.root.join("state");
    // Stopped first: a second CA on a state directory in use is refused (below).
    let Env { ca, root, _dir, .. } = env;
    ca.shutdown().await;
    std::fs::remove_file(state.join("root-cert.pem")).unwrap();
    let mk = || {
        let mut cfg = CaConfig::new(root.join("cacerts"), state.clone(), td());
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        cfg
    };
    let again = rampart_citadel::start(mk()).await.expect("restarts");
    let new_root = again.state().authority().bundle().roots()[0].clone();
    assert!(state.join("root-cert.pem").is_file());
    let only = |der: &CertificateDer<'static>| TrustBundle::from_der(vec![der.clone()]).unwrap();
    assert_eq!(
        verify(&before, &only(&new_root)).unwrap(),
        id,
        "old certificates verify under the re-made root"
    );
    assert_eq!(
        CertInfo::parse(&new_root).unwrap().subject,
        CertInfo::parse(&old_root).unwrap().subject
    );
    again.shutdown().await;
    // Negative twin: key and certificate both gone is a new root, which the old
    // certificates do not verify under.
    std::fs::remove_file(state.join("root-cert.pem")).unwrap();
    std::fs::remove_file(state.join("root-key.pem")).unwrap();
    let fresh = rampart_citadel::start(mk())
        .await
        .expect("starts with a new root");
    let fresh_root = fresh.state().authority().bundle().roots()[0].clone();
    assert!(verify(&before, &only(&fresh_root)).is_err());
    fresh.shutdown().await;
}

#[tokio::test]
async fn broken_plugin_dir_at_start_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let cacerts = dir.path().join("cacerts");
    std::fs::create_dir_all(&cacerts).unwrap();
    std::fs::write(cacerts.join("ca-cert.pem"), "not a cert").unwrap();
    let mut cfg = CaConfig::new(cacerts, dir.path().join("state"), td());
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let err = rampart_citadel::start(cfg).await.unwrap_err().to_string();
    assert!(
        err.contains("ca-key.pem") || err.contains("ca-cert.pem"),
        "{err}"
    );
}

// === cert-manager's kubernetes.io/tls layout (tls.crt, tls.key, ca.crt) ===

use rampart_certs::test_util::{CertManagerCa, CertManagerKey, CertManagerOptions};

fn cert_manager(name: &str, key: CertManagerKey, issuer_chain: bool) -> CertManagerCa {
    CertManagerCa::new(
        name,
        CertManagerOptions {
            key,
            issuer_chain,
            ..Default::default()
        },
    )
}

/// Runs `openssl verify -CAfile ca.crt -untrusted <intermediates sent> leaf` on an issued
/// chain; `Err` with openssl's output when it does not verify.
fn openssl_verify(chain: &[String], ca_crt: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let ders = chain_der(&chain[..1]);
    std::fs::write(
        dir.path().join("leaf.pem"),
        rampart_certs::certs_to_pem(&ders),
    )
    .unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca_crt).unwrap();
    let mut args = vec!["verify", "-CAfile", "ca.crt"];
    let intermediates: String = chain[1..chain.len() - 1].concat();
    if !intermediates.is_empty() {
        std::fs::write(dir.path().join("untrusted.pem"), intermediates).unwrap();
        args.extend(["-untrusted", "untrusted.pem"]);
    }
    args.push("leaf.pem");
    let out = std::process::Command::new("openssl")
        .args(&args)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

/// Loads `dir` with the CA's own plug-in loader; the error text on refusal.
fn load_dir(dir: &Path) -> Result<rampart_citadel::Authority, String> {
    let files = rampart_citadel::PluginFiles::read(dir).map_err(|e| e.to_string())?;
    rampart_citadel::load_plugin(dir, &files, &td(), SystemTime::now()).map_err(|e| e.to_string())
}

/// A CA started on a cert-manager folder issues a chain that `openssl verify` accepts with
/// just `ca.crt` as the anchor, and whose signer is the first certificate of `tls.crt`.
async fn issue_from_cert_manager_folder(cm: &CertManagerCa, key_label: &str) {
    assert!(
        cm.tls_key.contains(&format!("-----BEGIN {key_label}-----")),
        "cert-manager's encoding: {}",
        cm.tls_key.lines().next().unwrap_or_default()
    );
    let env = start(|_, root| cm.write_to(&root.join("cacerts")).unwrap()).await;
    let id = env.id("default", "web");
    let (_key, csr) = csr_for(&id);
    let mut c = env.client(None).await.unwrap();
    let chain = call(
        &mut c,
        &csr,
        3600,
        Some(&token(&env, "default", "web")),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        chain_der(&chain[1..2])[0],
        cm.signing_cert,
        "signed by tls.crt"
    );
    openssl_verify(&chain, &cm.ca_crt).expect("openssl verifies the issued chain");
    assert_eq!(verify(&chain, &env.bundle()).unwrap(), id);
    assert_eq!(
        env.ca.state().authority().bundle().to_pem(),
        cm.ca_crt,
        "ca.crt is the served root"
    );
    // Negative twin: another cert-manager root does not verify it.
    let other = cert_manager("other", CertManagerKey::EcSec1, false);
    assert!(openssl_verify(&chain, &other.ca_crt).is_err());
}

#[tokio::test]
async fn cert_manager_tls_layout_with_ec_sec1_key_issues_chains_openssl_verifies() {
    let cm = cert_manager("ec", CertManagerKey::EcSec1, false);
    issue_from_cert_manager_folder(&cm, "EC PRIVATE KEY").await;
}

#[tokio::test]
async fn cert_manager_tls_layout_with_rsa_pkcs1_key_issues_chains_openssl_verifies() {
    let cm = cert_manager("rsa", CertManagerKey::RsaPkcs1, false);
    issue_from_cert_manager_folder(&cm, "RSA PRIVATE KEY").await;
}

#[tokio::test]
async fn cert_manager_tls_layout_with_pkcs8_key_issues_chains_openssl_verifies() {
    let cm = cert_manager("pkcs8", CertManagerKey::EcPkcs8, false);
    issue_from_cert_manager_folder(&cm, "PRIVATE KEY").await;
}

#[tokio::test]
async fn cert_manager_tls_crt_with_its_issuer_chain_issues_full_chains() {
    let cm = cert_manager("chained", CertManagerKey::EcSec1, true);
    assert_eq!(
        rampart_certs::parse_certs_pem(&cm.tls_crt).unwrap().len(),
        2
    );
    issue_from_cert_manager_folder(&cm, "EC PRIVATE KEY").await;
    // The middle CA is sent after the signing certificate: the intermediates are both.
    let dir = tempfile::tempdir().unwrap();
    cm.write_to(dir.path()).unwrap();
    let authority = load_dir(dir.path()).unwrap();
    assert_eq!(
        authority.intermediates(),
        rampart_certs::parse_certs_pem(&cm.tls_crt).unwrap()
    );
}

#[tokio::test]
async fn cert_manager_ca_crt_holding_an_intermediate_is_the_anchor_as_in_istiod() {
    // cert-manager's ca.crt may be the issuing CA rather than a self-signed root: istiod
    // trusts it as the anchor, and so do we (the middle CA is then the served root).
    let cm = cert_manager("anchor", CertManagerKey::EcSec1, true);
    let dir = tempfile::tempdir().unwrap();
    cm.write_to(dir.path()).unwrap();
    std::fs::write(
        dir.path().join("tls.crt"),
        rampart_certs::certs_to_pem(std::slice::from_ref(&cm.signing_cert)),
    )
    .unwrap();
    std::fs::write(dir.path().join("ca.crt"), &cm.issuer_chain_pem).unwrap();
    let authority = load_dir(dir.path()).unwrap();
    assert_eq!(authority.bundle().to_pem(), cm.issuer_chain_pem);
    // Sent after a leaf: the signing certificate only; the middle CA is the anchor.
    assert_eq!(
        authority.intermediates(),
        std::slice::from_ref(&cm.signing_cert)
    );
    // Negative twin: the true root alone does not anchor tls.crt without the middle CA.
    std::fs::write(dir.path().join("ca.crt"), &cm.ca_crt).unwrap();
    let e = load_dir(dir.path()).unwrap_err();
    assert!(
        e.contains("ca.crt") && e.contains("no certificate in it issued"),
        "{e}"
    );
}

#[tokio::test]
async fn cert_manager_tls_layout_refusals_name_the_file_of_the_layout() {
    let a = cert_manager("A", CertManagerKey::EcSec1, false);
    let b = cert_manager("B", CertManagerKey::RsaPkcs1, false);
    let check = |prepare: &dyn Fn(&Path), needles: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        a.write_to(dir.path()).unwrap();
        prepare(dir.path());
        let e = load_dir(dir.path()).expect_err("refused");
        for n in needles {
            assert!(e.contains(n), "{e:?} should name {n:?}");
        }
        for istio in ["ca-key.pem", "ca-cert.pem", "root-cert.pem"] {
            assert!(!e.contains(istio), "{e:?} names an Istio file");
        }
    };
    // Positive twin: the untouched folder loads.
    let dir = tempfile::tempdir().unwrap();
    a.write_to(dir.path()).unwrap();
    load_dir(dir.path()).expect("A's folder loads");
    // And with two anchors in ca.crt (a root rotation), the one that issued tls.crt ends the
    // chain, both are served.
    std::fs::write(
        dir.path().join("ca.crt"),
        format!("{}{}", b.ca_crt, a.ca_crt),
    )
    .unwrap();
    let two = load_dir(dir.path()).expect("two anchors load");
    assert_eq!(two.roots().len(), 2);
    assert!(
        two.signing_root().subject.contains("A root"),
        "{:?}",
        two.signing_root()
    );
    assert_eq!(two.bundle().to_pem(), format!("{}{}", b.ca_crt, a.ca_crt));

    // tls.key of another CA.
    check(
        &|d| std::fs::write(d.join("tls.key"), &b.tls_key).unwrap(),
        &["tls.key", "tls.crt", "does not match"],
    );
    // Not a key at all.
    check(
        &|d| std::fs::write(d.join("tls.key"), "garbage").unwrap(),
        &["tls.key"],
    );
    // Incomplete: each missing file named.
    check(
        &|d| std::fs::remove_file(d.join("ca.crt")).unwrap(),
        &["missing ca.crt"],
    );
    check(
        &|d| std::fs::remove_file(d.join("tls.key")).unwrap(),
        &["missing tls.key"],
    );
    // An empty ca.crt (some cert-manager issuers leave it empty) anchors nothing.
    check(
        &|d| std::fs::write(d.join("ca.crt"), "").unwrap(),
        &["ca.crt", "no certificate"],
    );
    // The optional ca-crl.pem applies to this layout too: a broken one is refused.
    check(
        &|d| std::fs::write(d.join("ca-crl.pem"), "garbage").unwrap(),
        &["ca-crl.pem"],
    );
    // ca.crt of another CA: it did not issue tls.crt.
    check(
        &|d| std::fs::write(d.join("ca.crt"), &b.ca_crt).unwrap(),
        &["ca.crt", "no certificate in it issued"],
    );
    // tls.crt carrying a foreign root on top, ca.crt ours: still refused (the chain must end
    // under a served root).
    check(
        &|d| {
            std::fs::write(d.join("tls.crt"), format!("{}{}", b.tls_crt, b.ca_crt)).unwrap();
            std::fs::write(d.join("tls.key"), &b.tls_key).unwrap();
        },
        &["ca.crt"],
    );
    // A signing certificate that is not a CA (a cert-manager Certificate without isCA).
    let leaf = CertManagerCa::new(
        "leaf",
        CertManagerOptions {
            is_ca: false,
            ..Default::default()
        },
    );
    check(&|d| leaf.write_to(d).unwrap(), &["tls.crt", "not a CA"]);
    // A CA signing certificate whose issuer in tls.crt is not a CA (a leaf that signed it):
    // the chain links, but a client would not accept it, so the probe issuance refuses it.
    let bad_middle = CertManagerCa::new(
        "bad-middle",
        CertManagerOptions {
            issuer_chain: true,
            middle_is_ca: false,
            ..Default::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    bad_middle.write_to(dir.path()).unwrap();
    let e = load_dir(dir.path()).expect_err("refused");
    assert!(
        e.contains("probe certificate does not verify")
            && e.contains("end-entity certificate was used as an issuer"),
        "{e}"
    );

    // At start the CA fails closed with the same message.
    let dir = tempfile::tempdir().unwrap();
    let cacerts = dir.path().join("cacerts");
    a.write_to(&cacerts).unwrap();
    std::fs::write(cacerts.join("tls.key"), &b.tls_key).unwrap();
    let mut cfg = CaConfig::new(cacerts, dir.path().join("state"), td());
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let err = rampart_citadel::start(cfg).await.unwrap_err().to_string();
    assert!(
        err.contains("tls.key") && !err.contains("ca-key.pem"),
        "{err}"
    );
}

/// Log lines written while `f` runs on this thread.
fn logs_of<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let w = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || w.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    (out, text)
}

#[tokio::test]
async fn both_layouts_present_the_tls_layout_signs_and_the_istio_files_are_named_ignored() {
    let istio = make_plugin_ca("istio");
    let cm = cert_manager("cm", CertManagerKey::EcSec1, false);
    let dir = tempfile::tempdir().unwrap();
    write_plugin(dir.path(), &istio, &[&istio]);
    cm.write_to(dir.path()).unwrap();
    let (authority, log) = logs_of(|| load_dir(dir.path()).unwrap());
    assert_eq!(authority.signer().ca_cert(), &cm.signing_cert);
    assert_eq!(authority.bundle().to_pem(), cm.ca_crt);
    assert_eq!(log.matches("WARN").count(), 1, "{log}");
    assert!(
        log.contains("IGNORED")
            && log.contains("ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem"),
        "{log}"
    );
    // Negative twins: either layout alone loads without the warning.
    std::fs::remove_file(dir.path().join("tls.crt")).unwrap();
    let (authority, log) = logs_of(|| load_dir(dir.path()).unwrap());
    assert_eq!(authority.signer().ca_cert(), &istio.int_cert);
    assert!(!log.contains("WARN"), "{log}");
    let only_tls = tempfile::tempdir().unwrap();
    cm.write_to(only_tls.path()).unwrap();
    let (_, log) = logs_of(|| load_dir(only_tls.path()).unwrap());
    assert!(!log.contains("WARN"), "{log}");

    // The running CA signs with tls.crt when both are present.
    let env = start(|_, root| {
        write_plugin(&root.join("cacerts"), &istio, &[&istio]);
        cm.write_to(&root.join("cacerts")).unwrap();
    })
    .await;
    let (_key, csr) = csr_for(&env.id("default", "web"));
    let mut c = env.client(None).await.unwrap();
    let chain = call(
        &mut c,
        &csr,
        3600,
        Some(&token(&env, "default", "web")),
        None,
    )
    .await
    .unwrap();
    assert_eq!(chain_der(&chain[1..2])[0], cm.signing_cert);
    openssl_verify(&chain, &cm.ca_crt).unwrap();
}

#[tokio::test]
async fn hot_reload_switches_layouts_and_a_broken_tls_layout_keeps_the_last_good_material() {
    let istio = make_plugin_ca("istio");
    let cm = cert_manager("cm", CertManagerKey::RsaPkcs1, true);
    let other = cert_manager("other", CertManagerKey::EcSec1, false);
    let env = start(|_, root| write_plugin(&root.join("cacerts"), &istio, &[&istio])).await;
    let cacerts = env.root.join("cacerts");
    let state = env.ca.state().clone();
    let id = env.id("default", "web");
    let t = token(&env, "default", "web");
    let (_key, csr) = csr_for(&id);
    let mut c = env.client(None).await.unwrap();
    let signer_now = |chain: &[String]| chain_der(&chain[1..2])[0].clone();
    let refused = |outcome: ReloadOutcome, needle: &str| match outcome {
        ReloadOutcome::Refused(why) => assert!(why.contains(needle), "{why}"),
        other => panic!("expected a refusal naming {needle}, got {other:?}"),
    };

    // Istio -> broken tls layout (no tls.key yet): refused naming tls.key; Istio keeps signing.
    std::fs::write(cacerts.join("tls.crt"), &cm.tls_crt).unwrap();
    std::fs::write(cacerts.join("ca.crt"), &cm.ca_crt).unwrap();
    refused(state.reload_now(), "missing tls.key");
    let x = call(&mut c, &csr, 3600, Some(&t), None).await.unwrap();
    assert_eq!(signer_now(&x), istio.int_cert);

    // Completed: the tls layout takes over (the Istio files, still there, are ignored).
    cm.write_to(&cacerts).unwrap();
    assert_eq!(state.reload_now(), ReloadOutcome::Reloaded);
    let y = call(&mut c, &csr, 3600, Some(&t), None).await.unwrap();
    assert_eq!(signer_now(&y), cm.signing_cert);
    openssl_verify(&y, &cm.ca_crt).unwrap();
    assert_eq!(state.reload_now(), ReloadOutcome::Unchanged);

    // tls layout -> broken tls layout (another CA's key): refused, cm keeps signing.
    std::fs::write(cacerts.join("tls.key"), &other.tls_key).unwrap();
    refused(state.reload_now(), "tls.key");
    let z = call(&mut c, &csr, 3600, Some(&t), None).await.unwrap();
    assert_eq!(signer_now(&z), cm.signing_cert);
    // ... and a ca.crt that did not issue tls.crt, likewise.
    std::fs::write(cacerts.join("tls.key"), &cm.tls_key).unwrap();
    std::fs::write(cacerts.join("ca.crt"), &other.ca_crt).unwrap();
    refused(state.reload_now(), "ca.crt");
    std::fs::write(cacerts.join("ca.crt"), &cm.ca_crt).unwrap();
    // Back to the good content: the same fingerprint as the active material.
    assert_eq!(state.reload_now(), ReloadOutcome::Unchanged);

    // tls -> Istio: removing tls.crt switches back.
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::remove_file(cacerts.join(f)).unwrap();
    }
    assert_eq!(state.reload_now(), ReloadOutcome::Reloaded);
    let w = call(&mut c, &csr, 3600, Some(&t), None).await.unwrap();
    assert_eq!(signer_now(&w), istio.int_cert);

    // No material of either layout: refused naming both, Istio keeps signing.
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        std::fs::remove_file(cacerts.join(f)).unwrap();
    }
    refused(state.reload_now(), "neither tls.crt nor ca-cert.pem");
    let v = call(&mut c, &csr, 3600, Some(&t), None).await.unwrap();
    assert_eq!(signer_now(&v), istio.int_cert);
    assert_eq!(state.metrics().reload_success_count(), 2);
}

/// Readiness (`GET /ready`): a started CA can issue; the same CA asked about a time past
/// its plug-in intermediate's not-after names the signing certificate and when it expired,
/// and past the root's too, the root. A state whose gRPC server never started says so.
#[tokio::test]
async fn readiness_names_an_expired_signing_chain_and_a_server_not_started() {
    let a = make_plugin_ca("A");
    let env = start(|_, root| write_plugin(&root.join("cacerts"), &a, &[&a])).await;
    let state = env.ca.state().clone();
    // Ready once the spawned gRPC server task runs (at once, but not before `start` returns).
    let mut reasons = Vec::new();
    for _ in 0..100 {
        reasons = state.not_ready_reasons(SystemTime::now());
        if reasons.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(reasons, Vec::<String>::new());

    let int = rampart_certs::CertInfo::parse(&a.int_cert).unwrap();
    let reasons = state.not_ready_reasons(int.not_after);
    assert_eq!(
        reasons[0],
        format!(
            "signing certificate {} expired at {}",
            int.subject,
            rampart_certs::timestamp::rfc3339(int.not_after)
        ),
        "{reasons:?}"
    );
    assert!(reasons[0].contains("A intermediate"), "{reasons:?}");
    // The serving certificate (7 days) expired long before.
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("TLS serving certificate expired at")),
        "{reasons:?}"
    );
    // One second earlier the chain was still good.
    assert!(
        state
            .not_ready_reasons(int.not_after - Duration::from_secs(1))
            .iter()
            .all(|r| !r.contains("signing certificate")),
    );
    let root = rampart_certs::CertInfo::parse(a.root.cert()).unwrap();
    let reasons = state.not_ready_reasons(root.not_after);
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with(&format!("root certificate {} expired at", root.subject))),
        "{reasons:?}"
    );

    // A CA state whose server was never started is not ready, and says why.
    let dir = tempfile::tempdir().unwrap();
    let cfg = CaConfig::new(dir.path().join("cacerts"), dir.path().join("state"), td());
    let idle = rampart_citadel::CaState::new(cfg, rampart_citadel::Metrics::new()).unwrap();
    assert_eq!(
        idle.not_ready_reasons(SystemTime::now()),
        vec!["gRPC listener not serving yet".to_owned()]
    );
}
