//! Test helpers. `FakeCa` is a FAKE Istio CA: an in-process tonic server speaking the real
//! `istio.v1.auth.IstioCertificateService` wire protocol over TLS 1.3, signing with
//! `rampart_certs::CertificateAuthority` (root -> intermediate -> workload). It does NOT
//! authenticate callers (it records the bearer token it saw) and can be told to misbehave
//! (wrong SAN) or be stopped and restarted on the same port. It stands in for `rampart ca`
//! in fault tests that need a misbehaving CA.
#![allow(dead_code, unreachable_pub)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rampart_certs::{
    CertificateAuthority, CertificateDer, IntermediateParams, KeyAlgorithm, PrivateKey, RootParams,
    SpiffeId, VerifiedCsr, certs_to_pem,
};
use rampart_node_agent::{AgentConfig, CaConfig, RotationConfig, WorkloadConfig};
use rampart_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use rampart_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use rampart_proto::rampart::ca::v1::revocation_server::{Revocation, RevocationServer};
use rampart_proto::rampart::ca::v1::{GetCrlsRequest, GetCrlsResponse};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

pub const TD: &str = "cluster.local";

pub fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::istio(&TD.parse().unwrap(), ns, sa).unwrap()
}

/// An unsigned JWT-shaped token naming `ns`/`sa` (the fake CA does not verify it).
pub fn token_for(ns: &str, sa: &str) -> String {
    use base64::Engine as _;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.c2ln",
        e.encode(r#"{"alg":"ES256","typ":"JWT"}"#),
        e.encode(format!(
            r#"{{"iss":"test","aud":"istio-ca","sub":"system:serviceaccount:{ns}:{sa}"}}"#
        ))
    )
}

struct Signing {
    /// Signs workloads (an intermediate).
    ca: CertificateAuthority,
    /// Its root, as a CA (signs the root's CRL).
    root_ca: CertificateAuthority,
    /// What is returned after the chain as the root bundle (all roots still valid).
    roots: Vec<CertificateDer<'static>>,
}

fn new_hierarchy(name: &str) -> (CertificateAuthority, CertificateDer<'static>) {
    let (inter, root) = new_hierarchy_with_root(name);
    (inter, root.cert().clone())
}

/// A root and an intermediate under it, both as CAs (so both can sign CRLs).
pub fn new_hierarchy_with_root(name: &str) -> (CertificateAuthority, CertificateAuthority) {
    let now = SystemTime::now();
    let root = CertificateAuthority::self_signed_root(
        &RootParams {
            common_name: format!("{name} Root"),
            ..RootParams::default()
        },
        PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        now,
    )
    .unwrap();
    let ikey = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let icert = root
        .issue_intermediate(
            &IntermediateParams {
                common_name: format!("{name} Intermediate"),
                ..IntermediateParams::default()
            },
            &ikey.public_key_spki_der(),
            now,
        )
        .unwrap();
    let inter = CertificateAuthority::new(icert, ikey, vec![root.cert().clone()]).unwrap();
    (inter, root)
}

/// A CRL signed by `ca` revoking `serials` (hex), valid for an hour.
pub fn crl_by(ca: &CertificateAuthority, number: u64, serials: &[&str]) -> rampart_certs::Crl {
    let now = SystemTime::now();
    ca.sign_crl(&rampart_certs::CrlParams {
        this_update: now,
        next_update: now + Duration::from_secs(3600),
        crl_number: number,
        revoked: serials
            .iter()
            .map(|s| rampart_certs::RevokedCert {
                serial_hex: (*s).to_owned(),
                revoked_at: now,
                reason: Some(rampart_certs::RevocationReason::KeyCompromise),
            })
            .collect(),
    })
    .unwrap()
}

#[derive(Default)]
pub struct Observed {
    pub calls: usize,
    pub tokens: Vec<String>,
    pub cluster_ids: Vec<String>,
}

struct Shared {
    signing: Signing,
    wrong_san: bool,
    refuse: bool,
    observed: Observed,
    /// What `GetCrls` serves; `None`: the service answers UNIMPLEMENTED (like istiod).
    crls: Option<Vec<Vec<u8>>>,
    crl_down: bool,
    crl_calls: usize,
    crl_not_modified: usize,
}

fn etag_of(crls: &[Vec<u8>]) -> String {
    if crls.is_empty() {
        return String::new();
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for c in crls {
        ctx.update(&(c.len() as u64).to_be_bytes());
        ctx.update(c);
    }
    hex::encode(&ctx.finish().as_ref()[..16])
}

#[derive(Clone)]
struct CrlSvc(Arc<Mutex<Shared>>);

#[tonic::async_trait]
impl Revocation for CrlSvc {
    async fn get_crls(
        &self,
        req: Request<GetCrlsRequest>,
    ) -> Result<Response<GetCrlsResponse>, Status> {
        let mut s = self.0.lock().unwrap();
        s.crl_calls += 1;
        if s.crl_down {
            return Err(Status::unavailable("fake CA told to fail GetCrls"));
        }
        let Some(crls) = s.crls.clone() else {
            return Err(Status::unimplemented("fake CA serves no CRLs"));
        };
        let etag = etag_of(&crls);
        let not_modified = !etag.is_empty() && req.get_ref().if_none_match == etag;
        if not_modified {
            s.crl_not_modified += 1;
        }
        Ok(Response::new(GetCrlsResponse {
            version: s.crl_calls as u64,
            etag,
            not_modified,
            crls: if not_modified { Vec::new() } else { crls },
            next_update: 0,
            // The agent validates against the CAs it already trusts, never these.
            issuers: Vec::new(),
        }))
    }
}

#[derive(Clone)]
struct Svc(Arc<Mutex<Shared>>);

#[tonic::async_trait]
impl IstioCertificateService for Svc {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let mut s = self.0.lock().unwrap();
        s.observed.calls += 1;
        if let Some(t) = req.metadata().get("authorization") {
            s.observed.tokens.push(t.to_str().unwrap_or("").to_owned());
        }
        if let Some(t) = req.metadata().get("clusterid") {
            s.observed
                .cluster_ids
                .push(t.to_str().unwrap_or("").to_owned());
        }
        if s.refuse {
            return Err(Status::permission_denied("fake CA told to refuse"));
        }
        let req = req.into_inner();
        let csr = VerifiedCsr::from_pem(&req.csr)
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let mut sid = csr
            .requested_spiffe_id()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if s.wrong_san {
            sid = id("intruder", "someone-else");
        }
        let ttl = Duration::from_secs(req.validity_duration.max(1) as u64);
        let leaf = s
            .signing
            .ca
            .issue_workload(csr.public_key_spki_der(), &sid, ttl, SystemTime::now())
            .map_err(|e| Status::internal(e.to_string()))?;
        // Istio's layout: leaf, intermediates, then the whole root bundle as the last element.
        let mut chain = vec![certs_to_pem(&[leaf])];
        chain.push(certs_to_pem(&[s.signing.ca.cert().clone()]));
        chain.push(certs_to_pem(&s.signing.roots));
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

/// TLS stream that tonic can serve on.
struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}
impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}
impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

pub struct FakeCa {
    pub addr: SocketAddr,
    /// File with the root the CA's serving certificate chains to (`--ca-root`).
    pub root_file: PathBuf,
    pub first_root: CertificateDer<'static>,
    shared: Arc<Mutex<Shared>>,
    tls: Arc<rustls::ServerConfig>,
    running: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl FakeCa {
    pub async fn start(dir: &Path) -> FakeCa {
        let (inter, root_ca) = new_hierarchy_with_root("Fake CA");
        let root = root_ca.cert().clone();
        let skey = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let scert = inter
            .issue_server(
                &skey.public_key_spki_der(),
                &["istiod.istio-system.svc".to_owned()],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
                None,
                Duration::from_secs(24 * 3600),
                SystemTime::now(),
            )
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![scert, inter.cert().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(skey.secret_pkcs8_der().to_vec().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let root_file = dir.join("ca-root.pem");
        std::fs::write(&root_file, certs_to_pem(std::slice::from_ref(&root))).unwrap();
        let listener = bind_below_ephemeral().await;
        let addr = listener.local_addr().unwrap();
        let mut ca = FakeCa {
            addr,
            root_file,
            first_root: root.clone(),
            shared: Arc::new(Mutex::new(Shared {
                signing: Signing {
                    ca: inter,
                    root_ca,
                    roots: vec![root],
                },
                wrong_san: false,
                refuse: false,
                observed: Observed::default(),
                crls: None,
                crl_down: false,
                crl_calls: 0,
                crl_not_modified: 0,
            })),
            tls: Arc::new(tls),
            running: None,
        };
        ca.serve(listener);
        ca
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let token = CancellationToken::new();
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsConn>>(16);
        let t2 = token.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = t2.cancelled() => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = tx.send(Ok(TlsConn(tls))).await;
                    }
                });
            }
        });
        let svc = IstioCertificateServiceServer::new(Svc(self.shared.clone()));
        let crl_svc = RevocationServer::new(CrlSvc(self.shared.clone()));
        let t3 = token.clone();
        let handle = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .add_service(crl_svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    t3.cancelled_owned(),
                )
                .await;
        });
        self.running = Some((token, handle));
    }

    /// Stop listening and drop connections.
    pub async fn stop(&mut self) {
        if let Some((t, h)) = self.running.take() {
            t.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
    }

    /// Listen again on the same address. The port is below Linux's ephemeral range (see
    /// [`bind_below_ephemeral`]), so no outgoing connection can have taken it meanwhile.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut last = None;
        for _ in 0..50 {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => {
                    self.serve(l);
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot rebind {}: {last:?}", self.addr);
    }

    pub fn set_wrong_san(&self, on: bool) {
        self.shared.lock().unwrap().wrong_san = on;
    }

    pub fn set_refuse(&self, on: bool) {
        self.shared.lock().unwrap().refuse = on;
    }

    /// Root rotation: a new root + intermediate signs from now on; both roots are returned
    /// as the bundle (overlap). The serving certificate (old hierarchy) is unchanged.
    pub fn rotate_root(&self) -> CertificateDer<'static> {
        let (inter, root_ca) = new_hierarchy_with_root("Fake CA (new)");
        let root = root_ca.cert().clone();
        let mut s = self.shared.lock().unwrap();
        s.signing.ca = inter;
        s.signing.root_ca = root_ca;
        s.signing.roots.push(root.clone());
        root
    }

    /// Serve these DER CRLs from `GetCrls` (`None`: UNIMPLEMENTED).
    pub fn set_crls(&self, crls: Option<Vec<Vec<u8>>>) {
        self.shared.lock().unwrap().crls = crls;
    }

    /// Make `GetCrls` fail with UNAVAILABLE.
    pub fn set_crl_down(&self, on: bool) {
        self.shared.lock().unwrap().crl_down = on;
    }

    /// A CRL of the signing intermediate revoking `serials`.
    pub fn intermediate_crl(&self, number: u64, serials: &[&str]) -> rampart_certs::Crl {
        crl_by(&self.shared.lock().unwrap().signing.ca, number, serials)
    }

    /// A CRL of the root revoking `serials`.
    pub fn root_crl(&self, number: u64, serials: &[&str]) -> rampart_certs::Crl {
        crl_by(
            &self.shared.lock().unwrap().signing.root_ca,
            number,
            serials,
        )
    }

    /// (`GetCrls` calls, of which answered "not modified").
    pub fn crl_calls(&self) -> (usize, usize) {
        let s = self.shared.lock().unwrap();
        (s.crl_calls, s.crl_not_modified)
    }

    pub fn calls(&self) -> usize {
        self.shared.lock().unwrap().observed.calls
    }

    pub fn tokens(&self) -> Vec<String> {
        self.shared.lock().unwrap().observed.tokens.clone()
    }

    pub fn cluster_ids(&self) -> Vec<String> {
        self.shared.lock().unwrap().observed.cluster_ids.clone()
    }
}

/// Log to the test output (RUST_LOG=debug for details).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// An agent config for one workload `ns/sa` in `dir`, talking to `ca_addr` with root file
/// `ca_root`.
/// Binds 127.0.0.1 on a free port in 20000-32767, below Linux's default ephemeral range
/// (32768-60999). The fake CA gives its port up during an outage ([`FakeCa::stop`]) and binds
/// it again ([`FakeCa::restart`]); a port from `bind(:0)` is in the ephemeral range, where
/// the kernel may hand it to any outgoing connection (of this or another test) in between,
/// and the rebind failed.
pub async fn bind_below_ephemeral() -> tokio::net::TcpListener {
    use std::hash::{BuildHasher, Hasher};
    let state = std::collections::hash_map::RandomState::new();
    for attempt in 0u64..10_000 {
        let mut h = state.build_hasher();
        h.write_u64(attempt);
        let port = 20000 + (h.finish() % 12768) as u16;
        if let Ok(l) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            return l;
        }
    }
    panic!("no free port in 20000-32767 on 127.0.0.1");
}

pub fn agent_config(dir: &Path, ca_addr: &str, ca_root: &Path, ttl: Duration) -> AgentConfig {
    init_tracing();
    let token = dir.join("token");
    std::fs::write(&token, token_for("shop", "cart")).unwrap();
    AgentConfig {
        ca: CaConfig {
            addr: ca_addr.to_owned(),
            root_path: ca_root.to_owned(),
            server_name: "istiod.istio-system.svc".into(),
            cluster_id: Some("Kubernetes".into()),
            request_timeout: Duration::from_secs(5),
        },
        rotation: RotationConfig {
            ttl,
            min_refresh_interval: Duration::from_millis(500),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(1),
            ..RotationConfig::default()
        },
        workloads: vec![WorkloadConfig {
            spiffe_id: id("shop", "cart"),
            token_path: token,
            sds_socket: Some(dir.join("sds/socket")),
            workload_api_socket: Some(dir.join("wapi/socket")),
            output_dir: Some(dir.join("out")),
        }],
        metrics_addr: None,
        socket_mode: 0o600,
        trust_socket_dir: false,
        crl_poll_interval: Some(Duration::from_millis(300)),
    }
}

/// The Python interpreter with grpcio, xds-protos, py-spiffe, cryptography.
/// The usual test bed: a temporary directory holding a fresh fake CA and the configuration of
/// an agent serving one workload (`shop/cart`) with `ttl` certificates; `sock` is its SDS
/// socket.
pub struct Bed {
    pub dir: tempfile::TempDir,
    pub ca: FakeCa,
    pub cfg: AgentConfig,
    pub sock: PathBuf,
}

pub async fn bed(ttl: Duration) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let ca = FakeCa::start(dir.path()).await;
    let cfg = agent_config(dir.path(), &ca.addr.to_string(), &ca.root_file, ttl);
    let sock = cfg.workloads[0].sds_socket.clone().unwrap();
    Bed { dir, ca, cfg, sock }
}

pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("RAMPART_PYTHON") {
        return PathBuf::from(p);
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let p = ws.join("target/py/bin/python");
    assert!(
        p.exists(),
        "no Python test environment: run .ci/test (builds target/py from \
         tests/python/requirements.txt) or set RAMPART_PYTHON"
    );
    p
}

/// Run a Python script from tests/py with a hard timeout; return its JSON lines.
pub async fn run_py(script: &str, args: &[&str], timeout: Duration) -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let child = tokio::process::Command::new(python())
        .arg(&path)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, child)
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within {timeout:?}"))
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

pub fn event<'a>(lines: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|l| l["event"] == name)
        .unwrap_or_else(|| panic!("no {name:?} event in {lines:#?}"))
}

/// Wait until `f` is true, polling; panic with `what` after `timeout`.
pub async fn wait_for<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
