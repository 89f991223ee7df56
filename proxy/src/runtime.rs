//! Wiring: builds the proxy's parts from the first snapshot, binds its listeners, starts the
//! SDS, JWKS and update tasks, and drains on shutdown. No module imports this one; each part
//! gets the handles it needs and nothing more.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rampart_mesh::watch::{DEFAULT_POLL, Updates, watch_folder};
use rampart_mesh::{FolderSource, MeshFolder, Problem};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::Error;
use crate::admin;
use crate::config::{Config, Handle};
use crate::control::ControlPlaneOptions;
use crate::drain::Drain;
use crate::edge::{Budgets, EdgeLimits};
use crate::identity::IdentityHolder;
use crate::inbound::Inbound;
use crate::jwks::JwksState;
use crate::listeners::{Handlers, Listeners};
use crate::metrics::{Metrics, PortTable};
use crate::outbound::Outbound;
use crate::status::{ControlPlaneStatus, Status};

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
    /// The control-plane stream's state, shown in `/stats/prometheus`, when the
    /// configuration comes from a control plane ([`run_control_plane`]).
    pub control_plane: Option<Arc<ControlPlaneStatus>>,
    /// Addresses the process listens on for other duties (the app-probe listener of an
    /// injected Pod), and what for: a data-plane listener that would overlap one is
    /// skipped with that reason instead of failing the start.
    pub reserved: Vec<(SocketAddr, String)>,
    /// Where the status listener (an injected Pod's `$(POD_IP):15020`, as Istio's) finds
    /// this proxy's metrics for its `/stats/prometheus`; filled once the proxy has started.
    pub status_metrics: Option<crate::app_probes::MetricsSource>,
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
            control_plane: None,
            reserved: Vec::new(),
            status_metrics: None,
        }
    }
}

/// A running proxy: its listeners serve until [`Proxy::shutdown`].
pub struct Proxy {
    cfg: Handle,
    status: Arc<Status>,
    drain: Drain,
    drain_timeout: Duration,
    admin_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("workload", &self.cfg.load().me.key())
            .field("admin", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

fn start_error(key: &str, problems: Vec<Problem>) -> Error {
    if problems.len() == 1 && problems[0].reason.contains("this proxy's") {
        Error::UnknownWorkload(key.to_string())
    } else {
        Error::MeshFolder(problems)
    }
}

impl Proxy {
    /// Start the proxy of `opts.workload` from `snapshot`: bind every listener (a bind
    /// failure is a start-up error), connect to the SDS socket, and apply `updates` as they
    /// come (a refused update keeps the last good configuration). `opts.mesh_dir` is not
    /// read: the snapshot and its updates are the configuration.
    pub async fn start(
        opts: ProxyOptions,
        snapshot: MeshFolder,
        updates: Option<Updates>,
    ) -> Result<Proxy, Error> {
        let key = opts.workload.clone();
        let cfg = Config::build(snapshot, &key).map_err(|p| start_error(&key, p))?;
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
        let my_id = cfg.my_id();
        let identity = Arc::new(IdentityHolder::new(my_id.clone(), cfg.trust_policy()));
        identity.set_unknown_status(cfg.folder.local.crl_unknown_status);
        let admin_wanted = opts.admin.or(cfg.me.proxy.admin);
        let me = cfg.me.clone();
        let cfg: Handle = Arc::new(ArcSwap::from_pointee(cfg));
        let metrics = Arc::new(Metrics::default());
        let ports = Arc::new(PortTable::default());
        let jwks = Arc::new(JwksState::default());
        let status = Arc::new(Status::default());
        let drain = Drain::default();
        let budgets = Arc::new(Budgets::new(
            opts.max_inbound_connections,
            opts.max_outbound_connections,
            opts.max_admin_connections,
            opts.edge.max_held_body_bytes,
        ));
        let mut app_conn = HttpConnector::new();
        app_conn.set_nodelay(true);
        let client = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(Duration::from_secs(60));
            opts.edge.client(&mut b);
            b
        };
        let inbound = Arc::new(Inbound {
            cfg: cfg.clone(),
            identity: identity.clone(),
            metrics: metrics.clone(),
            ports: ports.clone(),
            jwks: jwks.clone(),
            edge: opts.edge,
            drain: drain.clone(),
            request_timeout: opts.request_timeout,
            app_h1: client().build(app_conn.clone()),
            app_h2: client().http2_only(true).build(app_conn),
            ext_authz: crate::ext_authz::Clients::new(identity.clone()),
            held_budget: budgets.held().clone(),
            cfg_changed: tokio::sync::watch::Sender::new(0),
        });
        let outbound = Arc::new(Outbound::new(
            cfg.clone(),
            identity.clone(),
            metrics.clone(),
            opts.edge,
            budgets.clone(),
            drain.clone(),
            opts.request_timeout,
        ));
        let handlers = Arc::new(Handlers {
            inbound,
            outbound,
            budgets: budgets.clone(),
            drain: drain.clone(),
            status: status.clone(),
            workload_key: key.clone(),
        });

        // Bind everything first: a port in use is a start-up error.
        let mut tasks = Vec::new();
        let admin = match admin_wanted {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Bind {
                        addr,
                        what: "admin".into(),
                        source,
                    })?,
            ),
            None => None,
        };
        let admin_addr = admin
            .as_ref()
            .zip(admin_wanted)
            .map(|(l, a)| l.local_addr().unwrap_or(a));
        {
            let view = Arc::new(admin::View {
                cfg: cfg.clone(),
                identity: identity.clone(),
                metrics,
                ports,
                budgets,
                status: status.clone(),
                jwks: jwks.clone(),
                workload_key: key.clone(),
                admin_addr,
                edge: opts.edge,
                control_plane: opts.control_plane.clone(),
            });
            if let Some(src) = &opts.status_metrics {
                let v = view.clone();
                src.set(Arc::new(move || v.prometheus()));
            }
            if let Some(l) = admin {
                tasks.push(tokio::spawn(admin::serve(view, l)));
            }
        }
        // Data-plane listeners: later reconciled with every accepted update.
        let listeners = Listeners::start(&handlers, &cfg.load(), opts.reserved.clone())
            .await
            .map_err(|f| Error::Bind {
                addr: f.addr,
                what: f.what,
                source: f.source,
            })?;
        let node_id = format!(
            "sidecar~127.0.0.1~{}.{}~{}.svc.cluster.local",
            me.name, me.namespace, me.namespace
        );
        tasks.push(tokio::spawn(crate::sds::run(
            opts.sds_socket.clone(),
            node_id,
            identity.clone(),
        )));
        tasks.push(tokio::spawn(crate::jwks::refresh_loop(cfg.clone(), jwks)));
        tasks.push(tokio::spawn(apply_updates(
            updates, handlers, listeners, identity, admin_addr,
        )));
        tracing::info!(workload = %key, id = %my_id, "proxy started");
        Ok(Proxy {
            cfg,
            status,
            drain,
            drain_timeout: opts.drain_timeout,
            admin_addr,
            tasks,
        })
    }

    /// The data-plane listeners that are listening: what each serves, and its address.
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        self.status
            .listeners()
            .into_iter()
            .filter(|l| l.error.is_none())
            .map(|l| (l.what, l.addr))
            .collect()
    }

    /// The admin listener's address, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Stop accepting, let in-flight work finish within the drain timeout, then stop every
    /// task. `true` when everything in flight finished.
    pub async fn shutdown(self) -> bool {
        let done = self.drain.start_and_wait(self.drain_timeout).await;
        for t in &self.tasks {
            t.abort();
        }
        done
    }
}

/// Run the proxy of `opts.workload` on the mesh folder `opts.mesh_dir` (watched for edits)
/// until `shutdown` resolves, then drain.
pub async fn run(
    opts: ProxyOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let (first, updates) = watch_folder(FolderSource::new(&opts.mesh_dir), DEFAULT_POLL).await;
    let snapshot = first.map_err(|p| start_error(&opts.workload, p))?;
    let proxy = Proxy::start(opts, snapshot, Some(updates)).await?;
    shutdown.await;
    proxy.shutdown().await;
    Ok(())
}

/// Run the proxy of `opts.workload` on the configuration a control plane streams
/// (`rampart proxy --control-plane`) until `shutdown` resolves, then drain. Nothing listens
/// until the first complete, valid push has arrived (fail closed); after that an outage
/// keeps the last good configuration serving while the stream reconnects and resyncs.
pub async fn run_control_plane(
    mut opts: ProxyOptions,
    cp: ControlPlaneOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let status = opts
        .control_plane
        .get_or_insert_with(|| Arc::new(ControlPlaneStatus::default()))
        .clone();
    let mut updates =
        crate::control::spawn(cp, opts.workload.clone(), opts.sds_socket.clone(), status);
    tokio::pin!(shutdown);
    let snapshot = loop {
        tokio::select! {
            u = updates.next() => match u {
                Some(Ok(folder)) => break folder,
                Some(Err(_)) => continue,
                None => return Err(Error::MeshFolder(vec![Problem {
                    file: "control plane".into(),
                    field: String::new(),
                    reason: "the config stream task stopped".into(),
                }])),
            },
            () = &mut shutdown => return Ok(()),
        }
    };
    tracing::info!("first complete configuration from the control plane; starting listeners");
    let proxy = Proxy::start(opts, snapshot, Some(updates)).await?;
    shutdown.await;
    proxy.shutdown().await;
    Ok(())
}

/// Apply each update of the source: build the new configuration, swap it in, reconcile the
/// listeners; a refused one is logged and shown in `/config_dump`, and the last good
/// configuration keeps serving. Listeners that failed to bind are retried every poll.
async fn apply_updates(
    mut updates: Option<Updates>,
    h: Arc<Handlers>,
    mut listeners: Listeners,
    identity: Arc<IdentityHolder>,
    admin_addr: Option<SocketAddr>,
) {
    let key = h.workload_key.clone();
    let cfg = h.inbound.cfg.clone();
    let mut retry = tokio::time::interval(DEFAULT_POLL);
    loop {
        let update = tokio::select! {
            u = async {
                match updates.as_mut() {
                    Some(u) => u.next().await,
                    None => std::future::pending().await,
                }
            } => u,
            _ = retry.tick() => {
                if listeners.has_failed() {
                    listeners.reconcile(&h, &cfg.load_full()).await;
                }
                continue;
            }
        };
        let Some(update) = update else {
            tracing::warn!(
                "the configuration source stopped; the last good configuration keeps serving"
            );
            updates = None;
            continue;
        };
        match update.and_then(|folder| Config::build(folder, &key)) {
            Ok(new) => {
                identity.set_trust_domains(new.trust_policy());
                identity.set_unknown_status(new.folder.local.crl_unknown_status);
                tracing::info!(
                    policies = new.folder.resources.len(),
                    workloads = new.folder.registry.workloads.len(),
                    "mesh folder reloaded; new configuration in force"
                );
                if new.me.proxy.admin != cfg.load().me.proxy.admin
                    && new.me.proxy.admin != admin_addr
                {
                    tracing::warn!(
                        now = ?new.me.proxy.admin,
                        serving = ?admin_addr,
                        "proxy.admin changed in workloads.yaml: the admin listener moves only when the proxy restarts"
                    );
                }
                let new = Arc::new(new);
                cfg.store(new.clone());
                h.inbound.cfg_changed.send_modify(|g| *g += 1);
                h.status.set_refusal(None);
                listeners.reconcile(&h, &new).await;
            }
            Err(problems) => {
                for p in &problems {
                    tracing::error!(problem = %p, "mesh folder edit refused; the last good configuration keeps serving");
                }
                h.status
                    .set_refusal(Some(problems.iter().map(ToString::to_string).collect()));
            }
        }
    }
}
