//! Wiring: one lifecycle manager, SDS server, Workload API server and file writer per
//! workload identity, plus the metrics endpoint.

use std::path::PathBuf;
use std::sync::Arc;

use rampart_certs::SpiffeId;
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::caclient::{CertificateSigner, CrlSource, IstioCaClient};
use crate::config::AgentConfig;
use crate::crl::CrlPoller;
use crate::manager::{Clock, Manager};
use crate::metrics::Metrics;
use crate::sds::SdsService;
use crate::state::SecretStore;
use crate::uds::{SocketGuard, bind_unix, bind_unix_in};
use crate::workload_api::WorkloadApiService;

/// The node agent, configured but not started.
pub struct Agent {
    config: AgentConfig,
    signer: Arc<dyn CertificateSigner>,
    crl_source: Arc<dyn CrlSource>,
    metrics: Arc<Metrics>,
    clock: Clock,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("config", &self.config)
            .finish()
    }
}

/// A started agent: sockets bound, tasks running.
#[derive(Debug)]
pub struct RunningAgent {
    stores: Vec<(SpiffeId, SecretStore)>,
    tasks: JoinSet<Result<(), Error>>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
}

// === impl Agent ===

impl Agent {
    /// An agent talking to the Istio CA described in `config`.
    pub fn new(config: AgentConfig) -> Result<Self, Error> {
        config.validate()?;
        let client = Arc::new(IstioCaClient::new(config.ca.clone()));
        Ok(Agent {
            config,
            signer: client.clone(),
            crl_source: client,
            metrics: Arc::new(Metrics::new()),
            clock: Clock::System,
        })
    }

    /// Use another signer (tests).
    pub fn with_signer(mut self, signer: Arc<dyn CertificateSigner>) -> Self {
        self.signer = signer;
        self
    }

    /// Use another CRL source (tests).
    pub fn with_crl_source(mut self, source: Arc<dyn CrlSource>) -> Self {
        self.crl_source = source;
        self
    }

    /// Use another clock (tests with paused tokio time).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Bind every socket (failing early if one cannot be bound), then start the lifecycle
    /// managers and servers. Everything stops when `shutdown` is cancelled.
    pub async fn start(self, shutdown: CancellationToken) -> Result<RunningAgent, Error> {
        let Agent {
            config,
            signer,
            crl_source,
            metrics,
            clock,
        } = self;
        let mut tasks = JoinSet::new();
        let mut stores = Vec::new();
        let mut servers = Vec::new();
        for w in &config.workloads {
            // A file-output directory that cannot be trusted is refused at start, as a
            // socket is (and judged again before every write).
            if let Some(dir) = &w.output_dir {
                crate::uds::prepare_output_dir(dir)?;
            }
            let store = SecretStore::new();
            let bind = |p| bind_unix_in(p, config.socket_mode, config.trust_socket_dir);
            if let Some(p) = &w.sds_socket {
                let l = bind(p).await?;
                let svc = SdsService::new(store.clone(), metrics.clone())
                    .with_shutdown(shutdown.clone())
                    .into_server();
                let router = tonic::transport::Server::builder().add_service(svc);
                servers.push((p.clone(), l, router, "SDS"));
            }
            if let Some(p) = &w.workload_api_socket {
                let l = bind(p).await?;
                let svc = WorkloadApiService::new(store.clone(), metrics.clone())
                    .with_shutdown(shutdown.clone())
                    .into_server();
                let router = tonic::transport::Server::builder().add_service(svc);
                servers.push((p.clone(), l, router, "SPIFFE Workload API"));
            }
            stores.push((w.spiffe_id.clone(), store.clone()));
            let manager = Manager {
                id: w.spiffe_id.clone(),
                token_path: w.token_path.clone(),
                ca_root_path: Some(config.ca.root_path.clone()),
                signer: signer.clone(),
                rotation: config.rotation.clone(),
                clock,
                store,
                output_dir: w.output_dir.clone(),
                metrics: metrics.clone(),
            };
            let sd = shutdown.clone();
            tasks.spawn(async move {
                manager.run(sd).await;
                Ok(())
            });
        }
        if let Some(interval) = config.crl_poll_interval
            && !config.workloads.is_empty()
        {
            let poller = CrlPoller {
                source: crl_source,
                token_paths: config
                    .workloads
                    .iter()
                    .map(|w| w.token_path.clone())
                    .collect(),
                stores: stores.iter().map(|(_, s)| s.clone()).collect(),
                interval,
                backoff_max: config.rotation.backoff_max,
                clock,
                metrics: metrics.clone(),
            };
            let sd = shutdown.clone();
            tasks.spawn(async move {
                poller.run(sd).await;
                Ok(())
            });
        }
        for (path, listener, router, what) in servers {
            tracing::info!(socket = %path.display(), "{what} listening");
            let sd = shutdown.clone();
            tasks.spawn(serve(path, listener, router, sd));
        }
        if let Some(addr) = config.metrics_addr {
            let m = metrics.clone();
            let sd = shutdown.clone();
            tasks.spawn(async move { m.serve(addr, sd).await });
        }
        Ok(RunningAgent {
            stores,
            tasks,
            shutdown,
            metrics,
        })
    }
}

/// Serve SDS for `store` on a Unix socket at `path` (0600) until `shutdown`: the SDS server
/// of the agent without the CA side, for tests, benchmarks and tools that bring their own
/// certificates.
pub async fn serve_sds(
    path: &std::path::Path,
    store: SecretStore,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let listener = bind_unix(path, 0o600).await?;
    let svc = SdsService::new(store, metrics)
        .with_shutdown(shutdown.clone())
        .into_server();
    let router = tonic::transport::Server::builder().add_service(svc);
    serve(path.to_owned(), listener, router, shutdown).await
}

async fn serve(
    path: PathBuf,
    listener: tokio::net::UnixListener,
    router: tonic::transport::server::Router,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let _guard = SocketGuard(path.clone());
    // gRPC C-core clients send an authority h2 rejects on Unix sockets: see uds_authority.
    let incoming = UnixListenerStream::new(listener)
        .map(|r| r.map(crate::uds_authority::AuthorityRewrite::new));
    let server = router.serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    tokio::pin!(server);
    // Graceful: streams are told to end at shutdown; give them a moment, then force.
    let result = tokio::select! {
        r = &mut server => r,
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        } => Ok(()),
    };
    result.map_err(|e| Error::Socket {
        path,
        reason: e.to_string(),
    })
}

// === impl RunningAgent ===

impl RunningAgent {
    /// The store of each identity (what its sockets serve).
    pub fn stores(&self) -> &[(SpiffeId, SecretStore)] {
        &self.stores
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stop everything and wait for the tasks (socket files are removed).
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Wait until a task fails (returns its error) or every task ends.
    pub async fn wait(&mut self) -> Result<(), Error> {
        while let Some(r) = self.tasks.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.shutdown.cancel();
                    return Err(e);
                }
                Err(join) => {
                    self.shutdown.cancel();
                    return Err(Error::Socket {
                        path: PathBuf::new(),
                        reason: format!("agent task died: {join}"),
                    });
                }
            }
        }
        Ok(())
    }
}
