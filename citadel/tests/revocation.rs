//! Revocation in the CA, in process over TLS: plug-in `ca-crl.pem` (one made by `openssl ca
//! -gencrl` accepted and enforced; wrong signer, truncated, another issuer's and a set that
//! does not cover the chain refused with the last good set kept; an expired one served and
//! reported), and the CA's own revocations through its admin socket (by serial and by SPIFFE
//! ID, persisted across a restart, published at once, enforced on renewal).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use rampart_certs::jwt::JwtSigner;
use rampart_certs::tls::ServerAuth;
use rampart_certs::{
    CertInfo, CertificateAuthority, CertificateDer, CrlParams, IntermediateParams, KeyAlgorithm,
    PrivateKey, RevocationReason, RevokedCert, RootParams, SpiffeId, TrustBundle,
};
use rampart_citadel::{
    AdminRequest, CaConfig, JwtIssuerConfig, ReloadOutcome, RunningCa, admin_request,
    admin_socket_path,
};
use rampart_proto::istio::v1::auth::IstioCertificateRequest;
use rampart_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::transport::{Channel, Endpoint};

const ISSUER: &str = "https://issuer.test";

// === fixtures ===

struct Env {
    dir: tempfile::TempDir,
    signer: JwtSigner,
    ca: Option<RunningCa>,
}

fn config(root: &Path) -> CaConfig {
    let mut cfg = CaConfig::new(
        root.join("cacerts"),
        root.join("state"),
        "cluster.local".parse().unwrap(),
    );
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.jwt_issuers = vec![JwtIssuerConfig {
        issuer: ISSUER.into(),
        jwks_path: root.join("jwks.json"),
    }];
    cfg.reload_poll_interval = Duration::from_secs(3600);
    cfg
}

async fn start(prepare: impl FnOnce(&Path)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let signer = JwtSigner::new(&key, "k1").unwrap();
    std::fs::write(
        dir.path().join("jwks.json"),
        signer.jwks().unwrap().to_json().to_string(),
    )
    .unwrap();
    prepare(dir.path());
    let ca = rampart_citadel::start(config(dir.path()))
        .await
        .expect("CA starts");
    Env {
        dir,
        signer,
        ca: Some(ca),
    }
}

impl Env {
    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn ca(&self) -> &RunningCa {
        self.ca.as_ref().unwrap()
    }

    fn bundle(&self) -> TrustBundle {
        self.ca().state().authority().bundle().clone()
    }

    async fn restart(&mut self) {
        if let Some(ca) = self.ca.take() {
            ca.shutdown().await;
        }
        self.ca = Some(rampart_citadel::start(config(self.root())).await.unwrap());
    }

    fn token(&self, sa: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        self.signer
            .sign(&serde_json::json!({"iss": ISSUER,
                "sub": format!("system:serviceaccount:default:{sa}"),
                "aud": ["istio-ca"], "iat": now, "exp": now + 600}))
            .unwrap()
    }

    async fn client(
        &self,
        cert: Option<(Vec<CertificateDer<'static>>, &PrivateKey)>,
    ) -> IstioCertificateServiceClient<Channel> {
        IstioCertificateServiceClient::new(self.channel(cert).await)
    }

    async fn channel(&self, cert: Option<(Vec<CertificateDer<'static>>, &PrivateKey)>) -> Channel {
        let mut tls = rampart_certs::tls::client_config(
            ServerAuth::Dns {
                bundle: self.bundle(),
            },
            cert,
        )
        .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tls = Arc::new(tls);
        let addr = self.ca().local_addr;
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let s = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        });
        Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_with_connector(connector)
            .await
            .unwrap()
    }

    /// Issues a certificate for default/`sa` with a token; returns (key, presented chain).
    async fn issue(&self, sa: &str) -> (PrivateKey, Vec<CertificateDer<'static>>) {
        let mut c = self.client(None).await;
        let id: SpiffeId = format!("spiffe://cluster.local/ns/default/sa/{sa}")
            .parse()
            .unwrap();
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let csr = rampart_certs::build_csr(&key, &id).unwrap();
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: 3600,
            metadata: None,
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.token(sa)).parse().unwrap(),
        );
        let chain = c
            .create_certificate(req)
            .await
            .unwrap()
            .into_inner()
            .cert_chain;
        (key, presented(&chain))
    }

    /// A renewal authenticated by the certificate `chain` alone.
    async fn renew(
        &self,
        key: &PrivateKey,
        chain: &[CertificateDer<'static>],
    ) -> Result<(), tonic::Status> {
        let id = rampart_certs::tls::leaf_spiffe_id(&chain[0]).unwrap();
        let mut c = self.client(Some((chain.to_vec(), key))).await;
        let (_, csr) = {
            let k = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
            let csr = rampart_certs::build_csr(&k, &id).unwrap();
            (k, csr)
        };
        c.create_certificate(tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: 600,
            metadata: None,
        }))
        .await
        .map(|_| ())
    }
}

/// Leaf + intermediates (drops the trailing roots element).
fn presented(chain: &[String]) -> Vec<CertificateDer<'static>> {
    chain[..chain.len() - 1]
        .iter()
        .flat_map(|pem| rampart_certs::parse_certs_pem(pem).unwrap())
        .collect()
}

fn serial(cert: &CertificateDer<'_>) -> String {
    CertInfo::parse(cert).unwrap().serial_hex
}

struct PluginCa {
    root: CertificateAuthority,
    int: CertificateAuthority,
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
    let int =
        CertificateAuthority::new(int_cert, int_key.clone_key(), root.chain_to_root()).unwrap();
    PluginCa { root, int, int_key }
}

fn pem(c: &CertificateDer<'_>) -> String {
    rampart_certs::certs_to_pem(std::slice::from_ref(c))
}

fn write_plugin(dir: &Path, ca: &PluginCa) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), pem(ca.int.cert())).unwrap();
    std::fs::write(dir.join("ca-key.pem"), ca.int_key.to_pkcs8_pem().as_bytes()).unwrap();
    std::fs::write(
        dir.join("cert-chain.pem"),
        format!("{}{}", pem(ca.int.cert()), pem(ca.root.cert())),
    )
    .unwrap();
    std::fs::write(dir.join("root-cert.pem"), pem(ca.root.cert())).unwrap();
}

fn crl(ca: &CertificateAuthority, revoked: &[&str], this_update: SystemTime) -> String {
    ca.sign_crl(&CrlParams {
        this_update,
        next_update: this_update + Duration::from_secs(600),
        crl_number: 1,
        revoked: revoked
            .iter()
            .map(|s| RevokedCert {
                serial_hex: (*s).into(),
                revoked_at: this_update,
                reason: Some(RevocationReason::KeyCompromise),
            })
            .collect(),
    })
    .unwrap()
    .to_pem()
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `openssl ca -gencrl` for the CA `cert`/`key` in its own directory under `dir`, after
/// `openssl ca -revoke` of each certificate in `revoke`.
fn openssl_gencrl(
    dir: &Path,
    name: &str,
    cert: &CertificateDer<'_>,
    key: &PrivateKey,
    revoke: &[&CertificateDer<'_>],
) -> String {
    let d = dir.join(format!("openssl-{name}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("ca.pem"), pem(cert)).unwrap();
    std::fs::write(d.join("key.pem"), key.to_pkcs8_pem().as_bytes()).unwrap();
    std::fs::write(d.join("index.txt"), "").unwrap();
    std::fs::write(d.join("crlnumber"), "1000\n").unwrap();
    std::fs::write(
        d.join("ca.cnf"),
        "[ ca ]\ndefault_ca = c\n[ c ]\ndatabase = index.txt\ncrlnumber = crlnumber\n\
         default_md = sha256\ndefault_crl_days = 1\n",
    )
    .unwrap();
    for (i, c) in revoke.iter().enumerate() {
        let f = format!("revoke-{i}.pem");
        std::fs::write(d.join(&f), pem(c)).unwrap();
        openssl(
            &d,
            &[
                "ca",
                "-config",
                "ca.cnf",
                "-cert",
                "ca.pem",
                "-keyfile",
                "key.pem",
                "-revoke",
                &f,
                "-crl_reason",
                "keyCompromise",
            ],
        );
    }
    openssl(
        &d,
        &[
            "ca", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "key.pem", "-gencrl", "-out",
            "crl.pem",
        ],
    );
    std::fs::read_to_string(d.join("crl.pem")).unwrap()
}

/// One request to the CA's admin socket at `sock` (from a blocking thread, as the CLI does).
async fn admin(sock: &Path, req: AdminRequest) -> rampart_citadel::AdminResponse {
    let sock = sock.to_path_buf();
    tokio::task::spawn_blocking(move || admin_request(&sock, &req))
        .await
        .unwrap()
        .unwrap()
}

/// Whether `serial` is on the CRL the CA signs for its signing certificate.
fn on_own_crl(state: &rampart_citadel::CaState, serial: &str) -> bool {
    state
        .revocations()
        .current()
        .own
        .as_ref()
        .expect("the CA signs its own CRL")
        .revoked_certs()
        .any(|r| r.serial_hex == serial)
}

fn metrics(env: &Env) -> String {
    env.ca().state().metrics().render(SystemTime::now())
}

// === plug-in CRLs ===

#[tokio::test]
async fn a_plugin_crl_made_by_openssl_is_accepted_and_enforced() {
    let a = make_plugin_ca("A");
    let env = start(|root| write_plugin(&root.join("cacerts"), &a)).await;
    let state = env.ca().state().clone();
    let cacerts = env.root().join("cacerts");
    let (bad_key, bad) = env.issue("web").await;
    let (good_key, good) = env.issue("db").await;
    // Before any CRL both renew.
    env.renew(&bad_key, &bad).await.unwrap();

    let int_crl = openssl_gencrl(env.root(), "int", a.int.cert(), &a.int_key, &[&bad[0]]);
    // The root's key is not kept apart from its CertificateAuthority here: its CRL is ours
    // (the point of this test is the intermediate's CRL from openssl).
    let root_crl = crl(&a.root, &[], SystemTime::now());
    std::fs::write(cacerts.join("ca-crl.pem"), format!("{int_crl}{root_crl}")).unwrap();
    assert_eq!(state.reload_now(), ReloadOutcome::Reloaded);

    let published = state.revocations().current();
    assert_eq!(published.set.len(), 2, "{:?}", published.set);
    // The CA's own CRL for its signing certificate carries openssl's entry.
    let own = published.own.as_ref().unwrap();
    let entry = own
        .revoked_certs()
        .find(|r| r.serial_hex == serial(&bad[0]))
        .expect("openssl's revocation is on the CA's CRL");
    assert_eq!(entry.reason, Some(RevocationReason::KeyCompromise));
    // Enforced: the revoked certificate cannot renew itself; another one can.
    let err = env.renew(&bad_key, &bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("revoked"), "{}", err.message());
    assert!(
        err.message().contains(&serial(&bad[0])),
        "{}",
        err.message()
    );
    env.renew(&good_key, &good).await.unwrap();
    // GetCrls (authenticated by a workload certificate) serves the same set with the issuer
    // certificates to check it against; a poll with the etag is "not modified".
    let mut rc = rampart_proto::rampart::ca::v1::revocation_client::RevocationClient::new(
        env.channel(Some((good.clone(), &good_key))).await,
    );
    let resp = rc
        .get_crls(rampart_proto::rampart::ca::v1::GetCrlsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.crls.len(), 2);
    assert_eq!(resp.etag, published.set.etag());
    let issuers: Vec<CertificateDer<'static>> = resp
        .issuers
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    assert_eq!(issuers, vec![a.int.cert().clone(), a.root.cert().clone()]);
    let set = rampart_certs::CrlSet::from_ders(
        &resp.crls,
        &issuers,
        SystemTime::now(),
        rampart_certs::CrlExpiry::Refuse,
    )
    .unwrap();
    let raw = x509_parser::parse_x509_certificate(bad[0].as_ref())
        .unwrap()
        .1
        .raw_serial()
        .to_vec();
    assert!(set.revoked(a.int.cert(), &raw).is_some());
    set.require_coverage(&issuers).unwrap();
    let again = rc
        .get_crls(rampart_proto::rampart::ca::v1::GetCrlsRequest {
            if_none_match: resp.etag.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.not_modified && again.crls.is_empty() && again.issuers.is_empty());
    // Without any credential: refused.
    let mut anon = rampart_proto::rampart::ca::v1::revocation_client::RevocationClient::new(
        env.channel(None).await,
    );
    let err = anon
        .get_crls(rampart_proto::rampart::ca::v1::GetCrlsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // The published file holds the served set and openssl verifies the CA's CRL in it.
    let published_pem =
        std::fs::read_to_string(env.root().join("state/published-crls.pem")).unwrap();
    assert_eq!(published_pem.matches("BEGIN X509 CRL").count(), 2);
    let own_path = env.root().join("own.crl");
    std::fs::write(&own_path, own.to_pem()).unwrap();
    std::fs::write(env.root().join("int.pem"), pem(a.int.cert())).unwrap();
    let out = Command::new("openssl")
        .current_dir(env.root())
        .args([
            "crl", "-in", "own.crl", "-noout", "-verify", "-CAfile", "int.pem",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("verify OK")
            || String::from_utf8_lossy(&out.stdout).contains("verify OK"),
        "{out:?}"
    );
}

#[tokio::test]
async fn bad_plugin_crls_are_refused_and_the_last_good_set_keeps_serving() {
    let a = make_plugin_ca("A");
    let imposter = make_plugin_ca("A"); // same names, other keys
    let b = make_plugin_ca("B");
    let env = start(|root| write_plugin(&root.join("cacerts"), &a)).await;
    let state = env.ca().state().clone();
    let cacerts = env.root().join("cacerts");
    let now = SystemTime::now();
    let (bad_key, bad) = env.issue("web").await;
    let good_set = format!(
        "{}{}",
        crl(&a.int, &[&serial(&bad[0])], now),
        crl(&a.root, &[], now)
    );
    std::fs::write(cacerts.join("ca-crl.pem"), &good_set).unwrap();
    assert_eq!(state.reload_now(), ReloadOutcome::Reloaded);
    let etag = state.revocations().current().set.etag().to_owned();
    let failures = state.metrics().reload_failure_count();

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong signer",
            format!("{}{}", crl(&imposter.int, &[], now), crl(&a.root, &[], now)),
            "wrong signer",
        ),
        (
            "truncated",
            good_set[..good_set.len() / 3].to_owned(),
            "truncated",
        ),
        (
            "another issuer",
            format!("{}{}", crl(&b.int, &[], now), crl(&a.root, &[], now)),
            "none of the CA certificates",
        ),
        (
            "not covering the chain",
            crl(&a.int, &[], now),
            "no CRL for CA certificate",
        ),
        (
            "garbage",
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n".into(),
            "CRL",
        ),
        ("empty", String::new(), "empty"),
    ];
    for (what, content, needle) in cases {
        std::fs::write(cacerts.join("ca-crl.pem"), &content).unwrap();
        match state.reload_now() {
            ReloadOutcome::Refused(reason) => {
                assert!(reason.contains("ca-crl.pem"), "{what}: {reason}");
                assert!(reason.contains(needle), "{what}: {reason} lacks {needle:?}");
            }
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
        // The last good set keeps serving and enforcing.
        assert_eq!(state.revocations().current().set.etag(), etag, "{what}");
        assert!(env.renew(&bad_key, &bad).await.is_err(), "{what}");
    }
    assert_eq!(state.metrics().reload_failure_count(), failures + 6);
    // Twins: the good set again is the material in force (nothing to reload), and a new
    // good set is accepted.
    std::fs::write(cacerts.join("ca-crl.pem"), &good_set).unwrap();
    assert_eq!(state.reload_now(), ReloadOutcome::Unchanged);
    let newer = format!(
        "{}{}",
        crl(&a.int, &[&serial(&bad[0]), "0a"], now),
        crl(&a.root, &[], now)
    );
    std::fs::write(cacerts.join("ca-crl.pem"), &newer).unwrap();
    assert_eq!(state.reload_now(), ReloadOutcome::Reloaded);
    assert_ne!(state.revocations().current().set.etag(), etag);
}

#[tokio::test]
async fn an_expired_plugin_crl_is_served_enforced_and_reported() {
    let a = make_plugin_ca("A");
    let env = start(|root| write_plugin(&root.join("cacerts"), &a)).await;
    let state = env.ca().state().clone();
    let (bad_key, bad) = env.issue("web").await;
    let now = SystemTime::now();
    let old = now - Duration::from_secs(3600);
    // The root's CRL expired an hour ago (nextUpdate = old + 10 min).
    std::fs::write(
        env.root().join("cacerts/ca-crl.pem"),
        format!(
            "{}{}",
            crl(&a.int, &[&serial(&bad[0])], now),
            crl(&a.root, &[], old)
        ),
    )
    .unwrap();
    assert_eq!(state.reload_now(), ReloadOutcome::Reloaded);
    let m = metrics(&env);
    assert!(
        m.contains("citadel_server_crl_expired{issuer=\"O=test, CN=A root\"} 1"),
        "{m}"
    );
    assert!(m.contains("citadel_server_crl_count 2"), "{m}");
    assert!(env.renew(&bad_key, &bad).await.is_err());
    // Twin: a fresh root CRL clears the report.
    std::fs::write(
        env.root().join("cacerts/ca-crl.pem"),
        format!(
            "{}{}",
            crl(&a.int, &[&serial(&bad[0])], now),
            crl(&a.root, &[], now)
        ),
    )
    .unwrap();
    assert_eq!(state.reload_now(), ReloadOutcome::Reloaded);
    let m = metrics(&env);
    assert!(
        m.contains("citadel_server_crl_expired{issuer=\"O=test, CN=A root\"} 0"),
        "{m}"
    );
}

// === the CA's own revocations ===

#[tokio::test]
async fn admin_revocation_by_serial_and_identity_is_published_enforced_and_persisted() {
    let mut env = start(|_| {}).await;
    let (web1_key, web1) = env.issue("web").await;
    let (_web2_key, web2) = env.issue("web").await;
    let (db_key, db) = env.issue("db").await;
    let (api_key, api) = env.issue("api").await;
    let sock = admin_socket_path(&env.root().join("state"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let state = env.ca().state().clone();
    let v0 = state.revocations().current().version;
    env.renew(&db_key, &db).await.unwrap();

    // By serial.
    let req = AdminRequest::Revoke {
        serial: Some(serial(&db[0]).to_uppercase()),
        spiffe_id: None,
        reason: Some("keyCompromise".into()),
    };
    let r = admin(&sock, req).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.revoked.len(), 1);
    assert!(r.revoked[0].new);
    assert_eq!(
        r.revoked[0].spiffe_id,
        "spiffe://cluster.local/ns/default/sa/db"
    );
    assert!(r.crl_version > v0);
    assert_eq!(r.crl_entries, 1);
    let err = env.renew(&db_key, &db).await.unwrap_err();
    assert!(err.message().contains("revoked"), "{}", err.message());
    // Twin: an unrelated certificate still renews.
    env.renew(&api_key, &api).await.unwrap();

    // Again: idempotent.
    let req = AdminRequest::Revoke {
        serial: Some(serial(&db[0])),
        spiffe_id: None,
        reason: None,
    };
    let r = admin(&sock, req).await;
    assert!(r.ok && !r.revoked[0].new, "{r:?}");
    assert_eq!(r.crl_entries, 1);

    // By SPIFFE ID: both web certificates.
    let req = AdminRequest::Revoke {
        serial: None,
        spiffe_id: Some("spiffe://cluster.local/ns/default/sa/web".into()),
        reason: Some("keyCompromise".into()),
    };
    let r = admin(&sock, req).await;
    assert!(r.ok, "{r:?}");
    let mut got: Vec<_> = r.revoked.iter().map(|x| x.serial.clone()).collect();
    got.sort();
    let mut want = vec![serial(&web1[0]), serial(&web2[0])];
    want.sort();
    assert_eq!(got, want);
    assert!(env.renew(&web1_key, &web1).await.is_err());

    // A certificate that expired years ago (an old line of the audit log): refused, with why.
    {
        use std::io::Write;
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(env.root().join("state/audit.jsonl"))
            .unwrap();
        writeln!(
            log,
            r#"{{"time":"2020-01-01T00:00:00Z","serial":"0e1d","spiffe_id":"spiffe://cluster.local/ns/default/sa/old","not_after":"2020-01-02T00:00:00Z","caller":"x"}}"#
        )
        .unwrap();
    }
    let req = AdminRequest::Revoke {
        serial: Some("0e1d".into()),
        spiffe_id: None,
        reason: None,
    };
    let r = admin(&sock, req).await;
    assert!(!r.ok, "{r:?}");
    let why = r.error.unwrap_or_default();
    assert!(
        why.contains("expired at 2020-01-02") && why.contains("more than 7 days"),
        "{why}"
    );

    // Refusals: an unknown serial, both selectors, an unknown identity.
    for req in [
        AdminRequest::Revoke {
            serial: Some("0badc0de".into()),
            spiffe_id: None,
            reason: None,
        },
        AdminRequest::Revoke {
            serial: Some(serial(&api[0])),
            spiffe_id: Some("spiffe://cluster.local/ns/default/sa/api".into()),
            reason: None,
        },
        AdminRequest::Revoke {
            serial: None,
            spiffe_id: Some("spiffe://cluster.local/ns/default/sa/nobody".into()),
            reason: None,
        },
    ] {
        let r = admin(&sock, req).await;
        assert!(!r.ok && r.error.is_some(), "{r:?}");
    }
    assert_eq!(
        state
            .revocations()
            .current()
            .own
            .as_ref()
            .unwrap()
            .revoked_certs()
            .count(),
        3
    );
    let m = metrics(&env);
    assert!(m.contains("citadel_server_revoked_cert_count 3"), "{m}");

    // Restart: the revocations are still there and published at once.
    env.restart().await;
    let state = env.ca().state().clone();
    let own = state.revocations().current().own.clone().unwrap();
    let serials: Vec<_> = own.revoked_certs().map(|r| r.serial_hex.clone()).collect();
    for s in [serial(&db[0]), serial(&web1[0]), serial(&web2[0])] {
        assert!(
            serials.contains(&s),
            "{s} missing after restart: {serials:?}"
        );
    }
    assert!(env.renew(&db_key, &db).await.is_err());
    env.renew(&api_key, &api).await.unwrap();
    // The published CRL is short-lived and verifies with the CA's root.
    let next = own.next_update().duration_since(own.this_update()).unwrap();
    assert_eq!(next, rampart_citadel::DEFAULT_CRL_VALIDITY);
    std::fs::write(
        env.root().join("root.pem"),
        std::fs::read_to_string(env.root().join("state/root-cert.pem")).unwrap(),
    )
    .unwrap();
    let out = Command::new("openssl")
        .current_dir(env.root())
        .args([
            "crl",
            "-in",
            "state/published-crls.pem",
            "-noout",
            "-verify",
            "-CAfile",
            "root.pem",
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("verify OK"), "{text}");
}

/// The seam Kubernetes mode shares revocations through (another replica's entries): valid
/// entries are added, persisted and published at once; an invalid one is refused alone; a
/// serial revoked here already keeps its first entry; nothing is ever removed.
#[tokio::test]
async fn merged_revocations_are_persisted_and_published_and_invalid_entries_refused_alone() {
    use rampart_citadel::{REVOCATIONS_FILE, RevocationState, StoredRevocation};
    let mut env = start(|_| {}).await;
    let state = env.ca().state().clone();
    let entry = |serial: &str, reason: Option<&str>| StoredRevocation {
        serial: serial.into(),
        revoked_at: "2026-01-01T00:00:00Z".into(),
        reason: reason.map(str::to_owned),
        spiffe_id: None,
        not_after: None,
    };
    let on_crl = |s: &str| on_own_crl(&state, s);
    // A local revocation first: its entry stands when the same serial is merged.
    state
        .revoke(
            &[(
                "0c".into(),
                "spiffe://cluster.local/ns/a/sa/a".into(),
                SystemTime::now() + Duration::from_secs(600),
            )],
            Some(RevocationReason::Superseded),
        )
        .unwrap();
    let mut changes = state.revocations().subscribe();
    changes.borrow_and_update();
    let version = state.revocations().current().version;
    let out = state
        .merge_revocations(&[
            entry("0A", Some("keyCompromise")),
            entry("not-hex", None),
            entry("0b", Some("noSuchReason")),
            entry("0c", Some("keyCompromise")),
            StoredRevocation {
                not_after: Some("tomorrow".into()),
                ..entry("0d", None)
            },
        ])
        .unwrap();
    assert_eq!(out.added, ["0a"]);
    let refused: Vec<_> = out.refused.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(refused, ["not-hex", "0b", "0d"]);
    assert!(changes.has_changed().unwrap(), "watchers see the merge");
    assert!(
        state.revocations().current().version > version,
        "re-signed at once"
    );
    assert!(on_crl("0a") && on_crl("0c"));
    for s in ["0b", "0d"] {
        assert!(!on_crl(s), "{s} refused");
    }
    let file = env.root().join("state").join(REVOCATIONS_FILE);
    let saved = RevocationState::load(&file).unwrap();
    assert_eq!(
        saved.find("0a").unwrap().reason.as_deref(),
        Some("keyCompromise")
    );
    assert_eq!(
        saved.find("0c").unwrap().reason.as_deref(),
        Some("superseded"),
        "the first entry of a serial stands"
    );
    assert_eq!(saved.revoked.len(), 2);

    // The twin: merging what is there already changes nothing and re-signs nothing.
    changes.borrow_and_update();
    let version = state.revocations().current().version;
    let again = state
        .merge_revocations(&[entry("0a", None), entry("0c", None)])
        .unwrap();
    assert!(again.added.is_empty() && again.refused.is_empty());
    assert!(!changes.has_changed().unwrap());
    assert_eq!(state.revocations().current().version, version);

    // Persisted: after a restart the merged serial is still revoked.
    env.restart().await;
    let state = env.ca().state().clone();
    let cur = state.revocations().current();
    assert!(
        cur.own
            .as_ref()
            .unwrap()
            .revoked_certs()
            .any(|r| r.serial_hex == "0a")
    );
}

/// Revocations do not pile up: an entry whose certificate expired more than a week ago
/// leaves `revocations.json` (here at start); one expired less long, or of unknown expiry,
/// stays. A merged entry can move a serial's not-after later, never earlier (so whoever
/// feeds entries cannot take one off the CRL early), and a merged entry already past the
/// horizon is not taken.
#[tokio::test]
async fn revocations_are_pruned_a_week_after_expiry_and_a_merge_only_extends() {
    use rampart_citadel::{
        PRUNE_AFTER_EXPIRY, REVOCATIONS_FILE, RevocationState, StoredRevocation,
    };
    let now = SystemTime::now();
    let day = Duration::from_secs(86400);
    let rfc = |t: SystemTime| {
        time::OffsetDateTime::from(t)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let entry = |serial: &str, not_after: Option<SystemTime>| StoredRevocation {
        serial: serial.into(),
        revoked_at: rfc(now - 10 * day),
        reason: Some("keyCompromise".into()),
        spiffe_id: None,
        not_after: not_after.map(rfc),
    };
    let mut env = start(|root| {
        use std::os::unix::fs::PermissionsExt;
        let state = root.join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        RevocationState {
            crl_number: 1,
            revoked: vec![
                entry("0e", Some(now - PRUNE_AFTER_EXPIRY - day)),
                entry("0f", Some(now - 2 * day)),
                entry("10", None),
                entry("11", Some(now + day)),
            ],
            identities: Vec::new(),
        }
        .save(&state.join(REVOCATIONS_FILE))
        .unwrap();
    })
    .await;
    let state = env.ca().state().clone();
    let file = env.root().join("state").join(REVOCATIONS_FILE);
    let serials = || -> Vec<String> {
        RevocationState::load(&file)
            .unwrap()
            .revoked
            .into_iter()
            .map(|r| r.serial)
            .collect()
    };
    assert_eq!(serials(), ["0f", "10", "11"]);
    let on_crl = |s: &str| on_own_crl(&state, s);
    // 0f expired two days ago: kept in the list, but off the CRL (24 h grace).
    assert!(!on_crl("0f") && on_crl("10") && on_crl("11"));

    // An earlier not-after for 11 is ignored: it stays on the CRL; so is an absent one (it
    // would keep the entry for ever).
    let out = state
        .merge_revocations(&[entry("11", Some(now - 2 * day)), entry("11", None)])
        .unwrap();
    assert!(out.added.is_empty() && out.extended.is_empty(), "{out:?}");
    assert!(on_crl("11"));
    let na = |s: &str| {
        RevocationState::load(&file)
            .unwrap()
            .find(s)
            .unwrap()
            .not_after
            .clone()
    };
    assert_eq!(na("11"), Some(rfc(now + day)));
    // A later one for an entry on the CRL is kept, without re-signing: the CRL does not
    // change (its entries carry no not-after), so repeated extensions cost no CRL.
    let version = state.revocations().current().version;
    let out = state
        .merge_revocations(&[entry("11", Some(now + 2 * day))])
        .unwrap();
    assert_eq!(out.extended, ["11"]);
    assert_eq!(na("11"), Some(rfc(now + 2 * day)));
    assert_eq!(state.revocations().current().version, version);
    // A later one that puts 0f back on the CRL: taken, and the CRL re-signed at once.
    let out = state
        .merge_revocations(&[entry("0f", Some(now + 3 * day))])
        .unwrap();
    assert_eq!(out.extended, ["0f"]);
    assert!(on_crl("0f"));
    assert!(state.revocations().current().version > version);
    assert_eq!(na("0f"), Some(rfc(now + 3 * day)));
    // A new entry already past the horizon is not taken; a fresh one is.
    let out = state
        .merge_revocations(&[
            entry("12", Some(now - PRUNE_AFTER_EXPIRY - day)),
            entry("13", Some(now + day)),
        ])
        .unwrap();
    assert_eq!(out.added, ["13"]);
    assert_eq!(serials(), ["0f", "10", "11", "13"]);
    drop(env.ca.take());
}
