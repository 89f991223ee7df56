//! The running proxy: configuration (mesh folder + compiled policy, swapped atomically on
//! valid edits), listeners, inbound and outbound request handling, drain.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rampart_authz::{
    Engine, HeaderMutation, HttpRequest, JwksCache, Kind as ResourceKind, MtlsMode, NoExtAuthz,
    Peer, RequestContext, Workload,
};
use rampart_certs::{SpiffeId, TrustDomainPolicy};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tracing::Instrument as _;

use crate::edge::{Activity, Budget, Budgets, EdgeLimits, Tracked, TrackedService};
use crate::identity::{IdentityHolder, cert_sha256_hex};
use crate::metrics::{Kind, Labels, Metered, Metrics, Pending, PortStats, Series};
use crate::{Error, admin};
use rampart_mesh::{ConfigSource, FolderSource, MeshFolder, PortProtocol, Problem, WorkloadEntry};

mod outbound;

/// Response body: the app's or peer's body streamed through (recording its request when it
/// ends), or one the proxy wrote.
pub(crate) type Body = Either<Metered<Incoming>, Full<Bytes>>;

/// How to run a proxy.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// The mesh folder.
    pub mesh_dir: PathBuf,
    /// `namespace/name` of the workload this proxy fronts.
    pub workload: String,
    /// The node agent's SDS socket.
    pub sds_socket: PathBuf,
    /// Admin listener; default: the registry's `proxy.admin`, else none.
    pub admin: Option<SocketAddr>,
    /// Most inbound connections handled at once; more are closed on accept and counted in
    /// `rampart_proxy_connections_refused_total{listener="inbound"}`.
    pub max_inbound_connections: usize,
    /// Most outbound connections (outbound HTTP proxy, upstream ports, CONNECT tunnels).
    pub max_outbound_connections: usize,
    /// Most admin connections.
    pub max_admin_connections: usize,
    /// Timeouts and header size limits of every HTTP connection (see [`EdgeLimits`]).
    pub edge: EdgeLimits,
    /// Time allowed for the response headers of a forwarded request (504 after).
    pub request_timeout: Duration,
    /// After a shutdown signal, how long in-flight work may take before it is cut.
    pub drain_timeout: Duration,
}

impl ProxyOptions {
    /// Defaults for everything but the three required settings.
    pub fn new(mesh_dir: PathBuf, workload: String, sds_socket: PathBuf) -> ProxyOptions {
        ProxyOptions {
            mesh_dir,
            workload,
            sds_socket,
            admin: None,
            max_inbound_connections: 10_000,
            max_outbound_connections: 10_000,
            max_admin_connections: 16,
            edge: EdgeLimits::default(),
            request_timeout: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// The configuration in force: the folder and what is compiled from it.
pub(crate) struct Config {
    pub(crate) folder: MeshFolder,
    pub(crate) engine: Engine,
    /// Key sets of the `jwksUri`s mapped to local files, read with this load.
    pub(crate) jwks: JwksCache,
    /// The `jwksUri`s read from local files (the rest are fetched; see `crate::jwks`).
    pub(crate) jwks_local: std::collections::BTreeSet<String>,
    /// Remote JWKS settings (`rampart.jwksRefresh`, `rampart.jwksCaFile`).
    pub(crate) jwks_remote: crate::jwks::RemoteSettings,
    pub(crate) me: WorkloadEntry,
    pub(crate) workload: Workload,
    /// Every `outputPayloadToHeader`/`outputClaimToHeaders` header of the
    /// RequestAuthentications applying to this workload (stripped from incoming requests).
    pub(crate) jwt_output_headers: Vec<header::HeaderName>,
    /// No AuthorizationPolicy nor RequestAuthentication can apply: requests skip the engine.
    pub(crate) fast_path: bool,
    pub(crate) loaded_at: SystemTime,
}

fn build_config(source: &dyn ConfigSource, key: &str) -> Result<Config, Vec<Problem>> {
    let folder = source.snapshot()?;
    let (ns, name) = key.split_once('/').unwrap_or(("", key));
    let Some(me) = folder.registry.get(ns, name).cloned() else {
        return Err(vec![Problem {
            file: rampart_mesh::WORKLOADS_FILE.into(),
            field: "workloads".into(),
            reason: format!("workload {key} (this proxy's) is not declared"),
        }]);
    };
    let engine = Engine::new(folder.resources.iter().cloned(), folder.mesh.clone());
    // Local JWKS files are read with every load; remote ones are fetched by the JWKS task
    // into `Shared::jwks`, which outlives reloads.
    let jwks_remote = crate::jwks::RemoteSettings::load(&folder).map_err(|p| vec![p])?;
    let fetcher = rampart_authz::FileJwksFetcher {
        base_dir: Some(folder.dir.clone()),
        overrides: folder.jwks_files(),
    };
    let jwks_local = fetcher.overrides.keys().cloned().collect();
    let mut jwks = JwksCache::new(Duration::from_secs(1200), Duration::from_secs(5));
    let now = SystemTime::now();
    for f in engine.jwks_uris() {
        if fetcher.overrides.contains_key(&f.uri)
            || !(f.uri.starts_with("https://") || f.uri.starts_with("http://"))
        {
            jwks.record(
                &f.uri,
                rampart_authz::JwksFetcher::fetch(&fetcher, &f.uri, f.timeout),
                now,
            );
        }
    }
    let workload = me.authz_workload();
    let has_reqauthn = folder.resources.iter().any(|r| {
        r.kind() == ResourceKind::RequestAuthentication
            && (r.metadata().namespace() == me.namespace
                || r.metadata().namespace() == folder.mesh.root_namespace)
    });
    let fast_path = !has_reqauthn && engine.policies_for(&workload).is_empty();
    let jwt_output_headers = engine
        .jwt_output_headers(&workload)
        .iter()
        .filter_map(|h| header::HeaderName::from_bytes(h.as_bytes()).ok())
        .collect();
    for w in engine.warnings() {
        tracing::warn!(warning = %w, "policy translation");
    }
    Ok(Config {
        folder,
        engine,
        jwks,
        jwks_local,
        jwks_remote,
        me,
        workload,
        jwt_output_headers,
        fast_path,
        loaded_at: SystemTime::now(),
    })
}

/// Everything the tasks of one proxy share.
pub(crate) struct Shared {
    pub(crate) cfg: ArcSwap<Config>,
    pub(crate) identity: Arc<IdentityHolder>,
    pub(crate) metrics: Metrics,
    /// Per workload port (kept across reloads, so counters survive edits and re-adds).
    pub(crate) ports: Mutex<BTreeMap<u16, Arc<PortStats>>>,
    pub(crate) listeners_up: AtomicBool,
    /// The data-plane listeners as last reconciled (for `/config_dump` and `/ready`).
    pub(crate) listener_status: Mutex<Vec<crate::listeners::ListenerStatus>>,
    pub(crate) last_refusal: Mutex<Option<(SystemTime, Vec<String>)>>,
    pub(crate) workload_key: String,
    /// Remote JWKS key sets (kept across reloads).
    pub(crate) jwks: crate::jwks::JwksState,
    /// The admin listener's address (bound once, at start).
    pub(crate) admin_addr: Option<SocketAddr>,
    pub(crate) budgets: Budgets,
    pub(crate) edge: EdgeLimits,
    request_timeout: Duration,
    app_h1: Client<HttpConnector, Incoming>,
    app_h2: Client<HttpConnector, Incoming>,
    peers: outbound::Outbound,
    pub(crate) shutdown: watch::Receiver<bool>,
    inflight: AtomicUsize,
    idle: Notify,
}

/// Counts a task as in flight until dropped (drain waits for zero).
struct InFlight<'a>(&'a Shared);

impl Shared {
    fn enter(&self) -> InFlight<'_> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        InFlight(self)
    }

    /// The plaintext/mTLS counters of workload port `port` (made on first use, kept).
    pub(crate) fn port_stats(&self, port: u16) -> Arc<PortStats> {
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(port)
            .or_insert_with(|| Arc::new(PortStats::new(port)))
            .clone()
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

fn trust_policy(f: &MeshFolder) -> TrustDomainPolicy {
    TrustDomainPolicy::with_aliases(f.trust_domain.clone(), f.trust_domain_aliases.clone())
}

/// Run a proxy until `shutdown` resolves, then drain.
pub async fn run(
    opts: ProxyOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let dir = opts.mesh_dir.clone();
    let key = opts.workload.clone();
    let cfg = {
        let (d, k) = (dir.clone(), key.clone());
        tokio::task::spawn_blocking(move || build_config(&FolderSource::new(d), &k))
            .await
            .map_err(|e| Error::Watch(e.to_string()))?
    };
    let cfg = cfg.map_err(|problems| {
        if problems.len() == 1 && problems[0].reason.contains("this proxy's") {
            Error::UnknownWorkload(key.clone())
        } else {
            Error::MeshFolder(problems)
        }
    })?;
    // `rampart.compliancePolicy: pqc` tightens the process-wide policy (a `pqc` flag or
    // COMPLIANCE_POLICY is never loosened by the folder); read once, before any TLS
    // configuration is built.
    if cfg.folder.local.compliance_policy == rampart_certs::tls::CompliancePolicy::Pqc {
        rampart_certs::tls::set_compliance_policy(rampart_certs::tls::CompliancePolicy::Pqc);
    }
    tracing::info!(
        compliance_policy = rampart_certs::tls::compliance_policy().as_str(),
        "mTLS key exchange: {}",
        match rampart_certs::tls::compliance_policy() {
            rampart_certs::tls::CompliancePolicy::Pqc => "X25519MLKEM768 only",
            _ => "X25519MLKEM768 preferred, then X25519, secp256r1, secp384r1",
        }
    );
    let my_id = cfg.me.spiffe_id(&cfg.folder.trust_domain);
    let identity = Arc::new(IdentityHolder::new(
        my_id.clone(),
        trust_policy(&cfg.folder),
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut app_conn = HttpConnector::new();
    app_conn.set_nodelay(true);
    let client = || {
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(Duration::from_secs(60));
        opts.edge.client(&mut b);
        b
    };
    let app_h1 = client().build(app_conn.clone());
    let app_h2 = client().http2_only(true).build(app_conn);
    let admin_addr = opts.admin.or(cfg.me.proxy.admin);
    let sh = Arc::new(Shared {
        cfg: ArcSwap::from_pointee(cfg),
        identity: identity.clone(),
        metrics: Metrics::default(),
        ports: Mutex::new(BTreeMap::new()),
        listeners_up: AtomicBool::new(false),
        listener_status: Mutex::new(Vec::new()),
        last_refusal: Mutex::new(None),
        workload_key: key.clone(),
        jwks: crate::jwks::JwksState::default(),
        admin_addr,
        budgets: Budgets::new(
            opts.max_inbound_connections,
            opts.max_outbound_connections,
            opts.max_admin_connections,
        ),
        edge: opts.edge,
        request_timeout: opts.request_timeout,
        app_h1,
        app_h2,
        peers: outbound::Outbound::default(),
        shutdown: stop_rx,
        inflight: AtomicUsize::new(0),
        idle: Notify::new(),
    });

    // Bind everything first: a port in use is a start-up error.
    let bind = |addr: SocketAddr, what: String| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, what, source })
    };
    let mut tasks = Vec::new();
    if let Some(a) = admin_addr {
        let l = bind(a, "admin".into()).await?;
        tasks.push(tokio::spawn(admin::serve(sh.clone(), l)));
    }
    // Data-plane listeners: later reconciled with every reload (listeners.rs).
    let listeners = crate::listeners::Listeners::start(&sh, &sh.cfg.load())
        .await
        .map_err(|f| Error::Bind {
            addr: f.addr,
            what: f.what,
            source: f.source,
        })?;
    sh.listeners_up.store(true, Ordering::SeqCst);
    let me = sh.cfg.load().me.clone();
    let node_id = format!(
        "sidecar~127.0.0.1~{}.{}~{}.svc.cluster.local",
        me.name, me.namespace, me.namespace
    );
    let sds = tokio::spawn(crate::sds::run(opts.sds_socket.clone(), node_id, identity));
    let watcher = tokio::spawn(watch_folder(sh.clone(), dir, listeners));
    let jwks_task = tokio::spawn(crate::jwks::refresh_loop(sh.clone()));
    tracing::info!(workload = %key, id = %my_id, "proxy started");

    shutdown.await;
    tracing::info!(
        inflight = sh.inflight.load(Ordering::SeqCst),
        "draining: no new connections; finishing in-flight work"
    );
    let _ = stop_tx.send(true);
    let deadline = tokio::time::sleep(opts.drain_timeout);
    tokio::pin!(deadline);
    loop {
        let notified = sh.idle.notified();
        if sh.inflight.load(Ordering::SeqCst) == 0 {
            tracing::info!("drained");
            break;
        }
        tokio::select! {
            _ = notified => {}
            _ = &mut deadline => {
                tracing::warn!(inflight = sh.inflight.load(Ordering::SeqCst), "drain deadline reached; closing the rest");
                break;
            }
        }
    }
    sds.abort();
    watcher.abort();
    jwks_task.abort();
    for t in tasks {
        t.abort();
    }
    Ok(())
}

async fn watch_folder(sh: Arc<Shared>, dir: PathBuf, mut listeners: crate::listeners::Listeners) {
    use notify::Watcher;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
    let watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        let _ = tx.try_send(());
    })
    .and_then(|mut w| w.watch(&dir, notify::RecursiveMode::Recursive).map(|()| w));
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "file notifications unavailable; polling the mesh folder every 2s");
            None
        }
    };
    let fp_dir = dir.clone();
    let mut last = tokio::task::spawn_blocking(move || MeshFolder::fingerprint(&fp_dir))
        .await
        .unwrap_or_default();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = rx.recv() => {
                tokio::time::sleep(Duration::from_millis(150)).await;
                while rx.try_recv().is_ok() {}
            }
            _ = tick.tick() => {}
        }
        let (d, k) = (dir.clone(), sh.workload_key.clone());
        let (fp, result) = match tokio::task::spawn_blocking(move || {
            let fp = MeshFolder::fingerprint(&d);
            (fp, build_config(&FolderSource::new(&d), &k))
        })
        .await
        {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "loading the mesh folder failed; the last good configuration keeps serving");
                continue;
            }
        };
        if fp == last {
            if listeners.has_failed() {
                listeners.reconcile(&sh, &sh.cfg.load_full()).await;
            }
            continue;
        }
        last = fp;
        match result {
            Ok(cfg) => {
                sh.identity.set_trust_domains(trust_policy(&cfg.folder));
                tracing::info!(
                    policies = cfg.folder.resources.len(),
                    workloads = cfg.folder.registry.workloads.len(),
                    "mesh folder reloaded; new configuration in force"
                );
                if cfg.me.proxy.admin != sh.cfg.load().me.proxy.admin
                    && cfg.me.proxy.admin != sh.admin_addr
                {
                    tracing::warn!(
                        now = ?cfg.me.proxy.admin,
                        serving = ?sh.admin_addr,
                        "proxy.admin changed in workloads.yaml: the admin listener moves only when the proxy restarts"
                    );
                }
                let cfg = Arc::new(cfg);
                sh.cfg.store(cfg.clone());
                *sh.last_refusal.lock().unwrap_or_else(|e| e.into_inner()) = None;
                listeners.reconcile(&sh, &cfg).await;
            }
            Err(problems) => {
                for p in &problems {
                    tracing::error!(problem = %p, "mesh folder edit refused; the last good configuration keeps serving");
                }
                *sh.last_refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some((
                    SystemTime::now(),
                    problems.iter().map(ToString::to_string).collect(),
                ));
            }
        }
    }
}

/// A data-plane listener, named by what it serves (never by position in the registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Listener {
    /// The inbound listener of this workload port.
    Inbound(u16),
    /// The outbound HTTP proxy.
    Outbound,
    /// The upstream whose `listen` address this is.
    Upstream(SocketAddr),
}

/// Accept until the proxy shuts down or `close` fires (listener removed or moved); then the
/// socket closes and this listener's connections are told to drain.
pub(crate) async fn accept_loop(
    sh: Arc<Shared>,
    l: TcpListener,
    kind: Listener,
    mut close: watch::Receiver<bool>,
) {
    let mut stop = sh.shutdown.clone();
    let (drain_tx, drain_rx) = watch::channel(false);
    loop {
        let (tcp, peer) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
            _ = close.changed() => break,
        };
        let budget = match kind {
            Listener::Inbound(_) => Budget::Inbound,
            Listener::Outbound | Listener::Upstream(_) => Budget::Outbound,
        };
        let Some(permit) = sh.budgets.acquire(budget) else {
            tracing::warn!(%peer, listener = budget.as_str(), "connection limit reached; closing new connection");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // One span per connection: every line it logs names the workload, the listener,
        // both addresses and (once the handshake proves it) the peer's identity.
        let span = tracing::info_span!(
            "conn",
            workload = %sh.workload_key,
            listener = budget.as_str(),
            local = %tcp.local_addr().map_or_else(|_| "-".into(), |a| a.to_string()),
            remote = %peer,
            peer_id = tracing::field::Empty,
        );
        let sh = sh.clone();
        let conn = async move {
            let _g = sh.enter();
            match kind {
                Listener::Inbound(port) => inbound_conn(&sh, port, tcp, peer).await,
                Listener::Outbound => outbound::outbound_http_conn(&sh, tcp, peer).await,
                Listener::Upstream(listen) => upstream_conn(&sh, listen, tcp).await,
            }
            drop(permit);
        };
        tokio::spawn(crate::listeners::CONN_DRAIN.scope(drain_rx.clone(), conn.instrument(span)));
    }
    let _ = drain_tx.send(true);
}

// === inbound ===

/// What request handling needs to know about its connection.
struct ConnCtx {
    port: u16,
    protocol: PortProtocol,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    principal: Option<String>,
    sni: Option<String>,
    xfcc: Option<HeaderValue>,
    labels: Arc<str>,
    series: Arc<Series>,
    stats: Arc<PortStats>,
    /// The app's address as a URI authority, fixed for the connection's life (an edit that
    /// moves or removes the port applies to new connections; this one finishes where it
    /// started).
    app: Option<http::uri::Authority>,
}

fn app_authority(app: SocketAddr) -> Option<http::uri::Authority> {
    http::uri::Authority::try_from(app.to_string().as_str()).ok()
}

fn request_protocol(p: PortProtocol) -> &'static str {
    match p {
        PortProtocol::Grpc => "grpc",
        PortProtocol::Tcp => "tcp",
        _ => "http",
    }
}

/// The registry workload whose identity is `principal` (for metric labels).
fn workload_of(cfg: &Config, principal: &str) -> (String, String) {
    let Ok(id) = SpiffeId::parse(principal) else {
        return (String::new(), String::new());
    };
    let path = id.path();
    let mut it = path.trim_start_matches('/').split('/');
    if let (Some("ns"), Some(ns), Some("sa"), Some(sa)) =
        (it.next(), it.next(), it.next(), it.next())
    {
        let w = cfg
            .folder
            .registry
            .workloads
            .iter()
            .find(|w| w.namespace == ns && w.service_account == sa);
        return (
            w.map(|w| w.name.clone()).unwrap_or_default(),
            ns.to_string(),
        );
    }
    (String::new(), String::new())
}

async fn inbound_conn(sh: &Arc<Shared>, port: u16, tcp: TcpStream, peer: SocketAddr) {
    let cfg = sh.cfg.load_full();
    let Some(pe) = cfg.me.port(port).cloned() else {
        tracing::warn!(port, "port no longer in the registry; closing connection");
        return;
    };
    let stats = sh.port_stats(port);
    let mode = cfg.engine.peer_authentication(&cfg.workload, port).mode;
    // Sniff: a TLS record starts with 0x16 (handshake).
    let mut first = [0u8; 1];
    let is_tls = match tokio::time::timeout(Duration::from_secs(5), tcp.peek(&mut first)).await {
        Ok(Ok(0)) | Ok(Err(_)) => return,
        Ok(Ok(_)) => crate::sniff::is_tls(first[0]),
        Err(_) => false, // client waits for the server: plaintext (server-first protocol)
    };
    let terminate_tls = match (mode, is_tls) {
        (MtlsMode::Disable, _) => false,
        (MtlsMode::Strict, false) => {
            stats.count(Kind::PlaintextConnection, Some(peer.ip()));
            tracing::info!(%peer, port, "plaintext connection refused: PeerAuthentication STRICT");
            return;
        }
        (_, tls) => tls,
    };
    let local = tcp.local_addr().ok();
    let me_principal = cfg.me.spiffe_id(&cfg.folder.trust_domain).to_string();
    let mut labels = Labels {
        reporter: "destination",
        source_principal: String::new(),
        source_workload: String::new(),
        source_namespace: String::new(),
        destination_principal: me_principal.clone(),
        destination_workload: cfg.me.name.clone(),
        destination_namespace: cfg.me.namespace.clone(),
        destination_service: cfg.me.service_host(),
        mtls: terminate_tls,
    };
    if !terminate_tls {
        stats.count(Kind::PlaintextConnection, Some(peer.ip()));
        // DISABLE does not terminate TLS: a TLS client's bytes go to the app as they are
        // (connection-level policy only, as for TCP).
        let protocol = if is_tls {
            PortProtocol::Tcp
        } else {
            pe.protocol
        };
        let cx = ConnCtx {
            port,
            protocol,
            peer,
            local,
            principal: None,
            sni: None,
            xfcc: None,
            series: sh
                .metrics
                .series(labels.render(request_protocol(pe.protocol))),
            labels: labels.render(request_protocol(pe.protocol)),
            stats,
            app: app_authority(pe.app),
        };
        serve_inbound(sh, cx, pe.app, tcp).await;
        return;
    }
    let state = match sh.identity.for_handshake() {
        Ok(s) => s,
        Err(reason) => {
            tracing::warn!(%peer, port, %reason, "mTLS handshake refused: own identity unusable (fail closed)");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(state.server.clone());
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let error = crate::conn::describe_tls_error(&e);
            tracing::info!(%peer, port, %error, "mTLS handshake refused");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, port, "mTLS handshake timed out");
            return;
        }
    };
    let (principal, hash, sni) = {
        let c = tls.get_ref().1;
        tracing::debug!(
            %peer,
            port,
            kx_group = %rampart_certs::tls::negotiated_group(c).as_deref().unwrap_or("-"),
            "inbound mTLS handshake done"
        );
        let leaf = c.peer_certificates().and_then(|c| c.first());
        let principal = leaf
            .and_then(|l| rampart_certs::tls::leaf_spiffe_id(l).ok())
            .map(|id| id.to_string());
        let hash = leaf.map(|l| cert_sha256_hex(l.as_ref()));
        (principal, hash, c.server_name().map(str::to_string))
    };
    if let Some(p) = &principal {
        tracing::Span::current().record("peer_id", tracing::field::display(p));
    }
    let Some(principal) = principal else {
        // Unreachable with a mandatory client verifier; refuse rather than trust.
        tracing::warn!(%peer, "mTLS peer without SPIFFE ID; closing");
        return;
    };
    stats.count(Kind::MtlsConnection, Some(peer.ip()));
    let xfcc = HeaderValue::from_str(&format!(
        "By={};Hash={};Subject=\"\";URI={}",
        me_principal,
        hash.unwrap_or_default(),
        principal
    ))
    .ok();
    let (sw, sns) = workload_of(&cfg, &principal);
    labels.source_principal = principal.clone();
    labels.source_workload = sw;
    labels.source_namespace = sns;
    let cx = ConnCtx {
        port,
        protocol: pe.protocol,
        peer,
        local,
        principal: Some(principal),
        sni,
        xfcc,
        series: sh
            .metrics
            .series(labels.render(request_protocol(pe.protocol))),
        labels: labels.render(request_protocol(pe.protocol)),
        stats,
        app: app_authority(pe.app),
    };
    drop(cfg);
    serve_inbound(sh, cx, pe.app, tls).await;
}

async fn serve_inbound<IO>(sh: &Arc<Shared>, cx: ConnCtx, app: SocketAddr, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if cx.protocol == PortProtocol::Tcp {
        inbound_tcp(sh, cx, app, io).await;
        return;
    }
    let cx = Arc::new(cx);
    let svc_sh = sh.clone();
    // HTTP/2 streams run as tasks of their own: each request's span names its connection's
    // as parent explicitly.
    let conn_span = tracing::Span::current();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let sh = svc_sh.clone();
        let cx = cx.clone();
        let span = request_span(&conn_span, &req);
        async move { Ok::<_, Infallible>(inbound_request(&sh, &cx, req).await) }.instrument(span)
    });
    serve_http(sh, io, svc).await;
}

/// A request's span (method, path, `x-request-id`), a child of its connection's; at the
/// default log level (info) requests get no span of their own and log under the connection's.
pub(crate) fn request_span<B>(conn: &tracing::Span, req: &Request<B>) -> tracing::Span {
    let span = tracing::debug_span!(
        parent: conn,
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-"),
    );
    if span.is_disabled() {
        conn.clone()
    } else {
        span
    }
}

async fn serve_http<IO, S>(sh: &Arc<Shared>, io: IO, svc: S)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let act = Activity::new(true);
    let builder = sh.edge.server();
    let conn = builder.serve_connection(
        TokioIo::new(Tracked::new(io, act.clone())),
        TrackedService::new(svc, act.clone()),
    );
    tokio::pin!(conn);
    let mut stop = crate::listeners::drain_signal(sh);
    if *stop.borrow() {
        conn.as_mut().graceful_shutdown();
    }
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            return;
        }
        why = act.expired(&sh.edge) => {
            tracing::debug!(reason = why, "HTTP connection closed");
            return;
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
        }
    }
    let _ = conn.await;
}

fn text_response(status: u16, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn owned_text_response(status: u16, body: String) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// A denial as Envoy answers it: HTTP status + body, or a gRPC trailers-only response.
fn denial(status: u16, grpc: bool, body: &str) -> (Response<Body>, Option<u16>) {
    if grpc {
        let code: u16 = match status {
            401 => 16, // UNAUTHENTICATED
            400 => 13, // INTERNAL
            _ => 7,    // PERMISSION_DENIED
        };
        let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(code));
        if let Ok(v) = HeaderValue::from_str(body) {
            h.insert("grpc-message", v);
        }
        return (r, Some(code));
    }
    (owned_text_response(status, body.to_string()), None)
}

fn is_grpc_request<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn authority_of<B>(req: &Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            // Never "no Host" for a Host the app will see (see `edge::header_text`).
            req.headers()
                .get(header::HOST)
                .map(crate::edge::header_text)
        })
        .unwrap_or_default()
}

static XFCC: header::HeaderName = header::HeaderName::from_static("x-forwarded-client-cert");

async fn inbound_request(
    sh: &Arc<Shared>,
    cx: &ConnCtx,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    let mtls = cx.principal.is_some();
    cx.stats.count(
        if mtls {
            Kind::MtlsRequest
        } else {
            Kind::PlaintextRequest
        },
        Some(cx.peer.ip()),
    );
    let grpc = cx.protocol == PortProtocol::Grpc || is_grpc_request(&req);
    // One authority for policy and app: an absolute-form target (or :authority) is the Host.
    if let Err(why) = crate::edge::align_host(&mut req) {
        tracing::info!(peer = %cx.peer, reason = why, "request refused (400)");
        let (r, g) = denial(400, grpc, "Bad Request");
        cx.series.request(400, g, "-", start.elapsed());
        return r;
    }
    let cfg = sh.cfg.load();
    // JWT output headers are the proxy's to write: a client's copy never reaches policy or
    // the app (as Envoy's jwt_authn); they are set below only from a verified token.
    for h in &cfg.jwt_output_headers {
        req.headers_mut().remove(h);
    }
    // x-forwarded-client-cert: never the client's; ours for mTLS peers. Set before policy,
    // so policy judges the value the app receives (Envoy sanitizes it before its filters).
    req.headers_mut().remove(&XFCC);
    if let Some(x) = &cx.xfcc {
        req.headers_mut().insert(XFCC.clone(), x.clone());
    }
    let raw_path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let normalized = match rampart_authz::normalize_path(
        &raw_path,
        cfg.folder.mesh.path_normalization,
    ) {
        Ok(n) => n.to_forward(),
        Err(e) => {
            tracing::info!(peer = %cx.peer, path = %raw_path, reason = %e.reason, "request refused: bad path (400)");
            let (r, g) = denial(400, grpc, "Bad Request");
            cx.series.request(400, g, "-", start.elapsed());
            return r;
        }
    };
    if !cfg.fast_path {
        // Every header the app will receive, none skipped (see `edge::header_text`).
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), crate::edge::header_text(v)))
            .collect();
        let http = HttpRequest {
            method: req.method().as_str().to_string(),
            path: raw_path.clone(),
            host: authority_of(&req),
            headers,
        };
        let ctx = RequestContext {
            source: Peer {
                principal: cx.principal.clone(),
                ip: Some(cx.peer.ip()),
                remote_ip: None,
            },
            destination_ip: cx.local.map(|a| a.ip()),
            destination_port: cx.port,
            sni: cx.sni.clone(),
            http: Some(http),
            jwt: None,
        };
        let keys = crate::jwks::Lookup::new(&sh.jwks, &cfg);
        let mut d = cfg
            .engine
            .check(&cfg.workload, &ctx, SystemTime::now(), &keys, &NoExtAuthz);
        // A token signed with a key the cached JWKS lacks: refetch early (rate-limited), retry.
        if let Some(miss) = keys.kid_miss(&d)
            && sh.jwks.refetch_on_kid_miss(&cfg, miss).await
        {
            let keys = crate::jwks::Lookup::new(&sh.jwks, &cfg);
            d = cfg
                .engine
                .check(&cfg.workload, &ctx, SystemTime::now(), &keys, &NoExtAuthz);
        }
        if !d.is_allowed() {
            let policy = d
                .policy
                .as_ref()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .unwrap_or_else(|| "-".into());
            tracing::warn!(
                peer = %cx.peer,
                principal = cx.principal.as_deref().unwrap_or("-"),
                method = %req.method(),
                path = %raw_path,
                status = d.status,
                policy = %policy,
                rule = ?d.rule,
                reason = %d.reason,
                "request denied: {}", d.summary()
            );
            let body = match d.status {
                401 => d.reason.clone(),
                400 => "Bad Request".to_string(),
                _ => "RBAC: access denied".to_string(),
            };
            let (r, g) = denial(d.status, grpc, &body);
            let flags = if d.status == 401 || d.status == 400 {
                "-"
            } else {
                "UAEX"
            };
            cx.series.request(d.status, g, flags, start.elapsed());
            return r;
        }
        for m in &d.headers {
            match m {
                HeaderMutation::Set { name, value } => {
                    if let (Ok(n), Ok(v)) = (
                        header::HeaderName::from_bytes(name.as_bytes()),
                        HeaderValue::from_str(value),
                    ) {
                        req.headers_mut().insert(n, v);
                    }
                }
                HeaderMutation::Remove { name } => {
                    req.headers_mut().remove(name.as_str());
                }
            }
        }
    }
    drop(cfg);
    let h2 = cx.protocol.is_h2();
    if req.headers().get(header::HOST).is_none()
        && let Some(a) = req.uri().authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    let target = cx.app.clone().and_then(|app| {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(app);
        parts.path_and_query = Some(http::uri::PathAndQuery::try_from(normalized).ok()?);
        Uri::from_parts(parts).ok()
    });
    match target {
        Some(u) => *req.uri_mut() = u,
        None => {
            let (r, g) = denial(400, grpc, "Bad Request");
            cx.series.request(400, g, "-", start.elapsed());
            return r;
        }
    }
    *req.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let client = if h2 { &sh.app_h2 } else { &sh.app_h1 };
    let (resp, flags) = match tokio::time::timeout(sh.request_timeout, client.request(req)).await {
        Ok(Ok(r)) => {
            // recorded when the response ends (trailers: gRPC status)
            let pending = Pending::new(cx.series.clone(), start, grpc, &r, "-");
            return r.map(|b| Either::Left(Metered::new(b, pending)));
        }
        Ok(Err(e)) => {
            tracing::warn!(app = cx.app.as_ref().map_or("-", |a| a.as_str()), error = %e, "app unreachable");
            (
                owned_text_response(
                    503,
                    "upstream connect error or disconnect/reset before headers".into(),
                ),
                "UF",
            )
        }
        Err(_) => (text_response(504, "upstream request timeout"), "UT"),
    };
    Pending::new(cx.series.clone(), start, grpc, &resp, flags).finish(None, None);
    resp
}

async fn inbound_tcp<IO>(sh: &Arc<Shared>, cx: ConnCtx, app: SocketAddr, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    {
        let cfg = sh.cfg.load();
        if !cfg.fast_path {
            let ctx = RequestContext {
                source: Peer {
                    principal: cx.principal.clone(),
                    ip: Some(cx.peer.ip()),
                    remote_ip: None,
                },
                destination_ip: cx.local.map(|a| a.ip()),
                destination_port: cx.port,
                sni: cx.sni.clone(),
                http: None,
                jwt: None,
            };
            let d = cfg.engine.authorize(&cfg.workload, &ctx);
            if !d.is_allowed() {
                let policy = d
                    .policy
                    .as_ref()
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .unwrap_or_else(|| "-".into());
                tracing::warn!(
                    peer = %cx.peer,
                    principal = cx.principal.as_deref().unwrap_or("-"),
                    port = cx.port,
                    policy = %policy,
                    rule = ?d.rule,
                    reason = %d.reason,
                    "connection denied (closed): {}", d.summary()
                );
                return;
            }
        }
    }
    sh.metrics.tcp_opened(&cx.labels);
    let (sent, received) = match TcpStream::connect(app).await {
        Ok(mut a) => {
            let _ = a.set_nodelay(true);
            // TCP ports: closed after the idle timeout with no byte either way.
            let act = Activity::new(false);
            let mut io = Tracked::new(io, act.clone());
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut io, &mut a) => match r {
                    Ok((from_client, from_app)) => (from_app, from_client),
                    Err(_) => (0, 0),
                },
                why = act.expired(&sh.edge) => {
                    tracing::debug!(%app, reason = why, "TCP connection closed");
                    (0, 0)
                }
            }
        }
        Err(e) => {
            tracing::warn!(%app, error = %e, "app unreachable");
            (0, 0)
        }
    };
    sh.metrics.tcp_closed(&cx.labels, sent, received);
}

// === outbound === (see outbound.rs)

async fn upstream_conn(sh: &Arc<Shared>, listen: SocketAddr, tcp: TcpStream) {
    let cfg = sh.cfg.load_full();
    let Some(u) = cfg.me.upstreams.iter().find(|u| u.listen == listen) else {
        return;
    };
    let authority = format!("{}:{}", u.service, u.port);
    outbound::upstream_tcp(sh, &cfg, &authority, tcp).await;
}

/// The effective mode of each port (for `/config_dump` and `/mtls`).
pub(crate) fn port_modes(cfg: &Config) -> Vec<(u16, PortProtocol, rampart_authz::EffectiveMtls)> {
    cfg.me
        .ports
        .iter()
        .map(|p| {
            (
                p.port,
                p.protocol,
                cfg.engine.peer_authentication(&cfg.workload, p.port),
            )
        })
        .collect()
}
