//! Wiring: one lifecycle manager, SDS server, Workload API server and file writer per
//! workload identity, plus the metrics endpoint.

use std::path::PathBuf;
use std::sync::Arc;

use rampart_certs::SpiffeId;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::caclient::{CertificateSigner, CrlSource, IstioCaClient};
use crate::config::AgentConfig;
use crate::conn::{CountStreams, Registry};
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
    trust_output_dir: bool,
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
            trust_output_dir: false,
        })
    }

    /// `--trust-output-dir`: every workload's output directory is a volume only the Pod's
    /// containers that read the files mount (Istio's `OUTPUT_CERTS` on an emptyDir, 0777):
    /// its own mode and owner are not judged; the directories above it still are.
    pub fn trust_output_dir(mut self, trusted: bool) -> Self {
        self.trust_output_dir = trusted;
        self
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
            trust_output_dir,
        } = self;
        let mut tasks = JoinSet::new();
        let mut stores = Vec::new();
        let mut servers = Vec::new();
        for w in &config.workloads {
            // A file-output directory that cannot be trusted is refused at start, as a
            // socket is (and judged again before every write).
            if let Some(dir) = &w.output_dir {
                crate::uds::prepare_output_dir(dir, trust_output_dir)?;
            }
            let store = SecretStore::new();
            let bind = |p| bind_unix_in(p, config.socket_mode, config.trust_socket_dir);
            if let Some(p) = &w.sds_socket {
                let l = bind(p).await?;
                let svc = SdsService::new(store.clone(), metrics.clone())
                    .with_shutdown(shutdown.clone())
                    .into_server()
                    .max_decoding_message_size(MAX_SDS_REQUEST);
                let router = grpc_server(MAX_STREAMS_PER_CONNECTION).add_service(CountStreams(svc));
                servers.push((p.clone(), l, router, "SDS", MAX_CONNECTIONS_PER_SOCKET));
            }
            if let Some(p) = &w.workload_api_socket {
                let l = bind(p).await?;
                let svc = WorkloadApiService::new(store.clone(), metrics.clone())
                    .with_shutdown(shutdown.clone())
                    .into_server()
                    .max_decoding_message_size(MAX_WORKLOAD_API_REQUEST);
                let router =
                    grpc_server(WORKLOAD_API_STREAMS_PER_CONNECTION).add_service(CountStreams(svc));
                servers.push((
                    p.clone(),
                    l,
                    router,
                    "SPIFFE Workload API",
                    WORKLOAD_API_CONNECTIONS,
                ));
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
                trust_output_dir,
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
        for (path, listener, router, what, cap) in servers {
            tracing::info!(socket = %path.display(), "{what} listening");
            let sd = shutdown.clone();
            tasks.spawn(serve(path, listener, router, cap, sd));
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
        .into_server()
        .max_decoding_message_size(MAX_SDS_REQUEST);
    let router = grpc_server(MAX_STREAMS_PER_CONNECTION).add_service(CountStreams(svc));
    serve(
        path.to_owned(),
        listener,
        router,
        MAX_CONNECTIONS_PER_SOCKET,
        shutdown,
    )
    .await
}

/// Concurrent streams one client connection may open on the SDS socket (Envoy opens a few
/// SDS streams per connection). Past it an HTTP/2 client waits for a stream to end (RFC 9113
/// §5.1.2), it is not refused.
pub(crate) const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Connections served at once on the SDS socket (Envoy or the proxy holds one or two); past
/// it a new one closes the oldest without an open stream (else the oldest), see
/// `crate::conn`.
pub(crate) const MAX_CONNECTIONS_PER_SOCKET: usize = 32;
/// The Workload API socket serves applications: one process may hold many `X509Source`s on
/// one connection (grpc multiplexes them; a walk-through's 20 hung at 16), and a pre-forking
/// server holds a connection per worker. Its requests are tiny
/// ([`MAX_WORKLOAD_API_REQUEST`]), so more streams and connections hold little: at most
/// 16 KiB × 64 × 64 (64 MiB).
pub(crate) const WORKLOAD_API_STREAMS_PER_CONNECTION: u32 = 64;
/// See [`WORKLOAD_API_STREAMS_PER_CONNECTION`].
pub(crate) const WORKLOAD_API_CONNECTIONS: usize = 64;
/// Largest gRPC request message the SDS server decodes (tonic's default is 4 MiB, and tonic
/// buffers a whole message before decoding it). Envoy's DiscoveryRequests are a few KiB; the
/// first on a stream carries the node metadata, which in Istio includes the pod's labels and
/// annotations (Kubernetes bounds annotations at 256 KiB in all). A larger message ends its
/// stream with OUT_OF_RANGE at its 5-byte gRPC header, before anything is buffered.
/// What clients can make the server hold is then at most this × [`MAX_STREAMS_PER_CONNECTION`]
/// × [`MAX_CONNECTIONS_PER_SOCKET`] (128 MiB) instead of 4 MiB × 16 × 128 (8 GiB).
pub(crate) const MAX_SDS_REQUEST: usize = 256 * 1024;
/// Largest gRPC request message the Workload API server decodes: X509SVIDRequest and
/// X509BundlesRequest are empty, JWTSVIDRequest carries audiences and an optional SPIFFE ID,
/// ValidateJWTSVIDRequest a token (a few KiB; JWT-SVIDs are not served anyway).
pub(crate) const MAX_WORKLOAD_API_REQUEST: usize = 16 * 1024;
/// HTTP/2 flow-control windows advertised to clients (request data; responses follow the
/// client's windows). Data the server has not yet read is held by h2 up to these.
const STREAM_WINDOW: u32 = 64 * 1024;
const CONNECTION_WINDOW: u32 = 256 * 1024;
/// SETTINGS_MAX_FRAME_SIZE: the HTTP/2 default, which the Unix-socket shim assumes.
const MAX_FRAME_SIZE: u32 = 16 * 1024;
/// HTTP/2 PING every this often on an idle connection; a peer that does not answer within
/// [`KEEPALIVE_TIMEOUT`] is dropped (a client that vanished without closing).
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

static ACCEPT_ERRORS: crate::throttle::LogThrottle =
    crate::throttle::LogThrottle::new(std::time::Duration::from_secs(10));

/// The gRPC server of every Unix socket, with the limits above.
fn grpc_server(streams: u32) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(streams))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// Accepted connections of `listener`: at most [`MAX_CONNECTIONS_PER_SOCKET`] open at once
/// (each holds a permit until it closes; at the cap a new one closes the oldest idle, else
/// the oldest, connection), each with the deadlines of `crate::conn`; accept errors (out of
/// descriptors) backed off 5 ms to 1 s and logged at most once per 10 s instead of retried
/// at once.
fn incoming(
    listener: tokio::net::UnixListener,
    cap: usize,
    shutdown: CancellationToken,
) -> impl futures::Stream<
    Item = std::io::Result<crate::uds_authority::AuthorityRewrite<tokio::net::UnixStream>>,
> {
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    let state = (
        listener,
        slots,
        Arc::new(Registry::default()),
        crate::throttle::AcceptBackoff::default(),
        shutdown,
    );
    futures::stream::unfold(
        state,
        move |(listener, slots, conns, mut backoff, shutdown)| async move {
            loop {
                let r = tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    r = listener.accept() => r,
                };
                let conn = match r {
                    Ok((conn, _)) => conn,
                    Err(e) => {
                        let wait = backoff.failed();
                        crate::throttle::log_accept_error(&ACCEPT_ERRORS, "Unix socket", &e, wait);
                        tokio::select! {
                            _ = shutdown.cancelled() => return None,
                            _ = tokio::time::sleep(wait) => {}
                        }
                        continue;
                    }
                };
                backoff.reset();
                let permit = match slots.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        // At the cap: make room (the closed connection gives its slot back
                        // as soon as the server drops it).
                        conns.evict_one(cap);
                        tokio::select! {
                            _ = shutdown.cancelled() => return None,
                            p = slots.clone().acquire_owned() => p.ok()?,
                        }
                    }
                };
                // gRPC C-core clients send an authority h2 rejects on Unix sockets: see
                // uds_authority.
                let conn = crate::uds_authority::AuthorityRewrite::new(conn)
                    .holding(permit)
                    .tracked(conns.register());
                return Some((Ok(conn), (listener, slots, conns, backoff, shutdown)));
            }
        },
    )
}

async fn serve(
    path: PathBuf,
    listener: tokio::net::UnixListener,
    router: tonic::transport::server::Router,
    cap: usize,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let _guard = SocketGuard(path.clone());
    let incoming = Box::pin(incoming(listener, cap, shutdown.clone()));
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rampart_proto::envoy::service::discovery::v3::DiscoveryRequest;
    use rampart_proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;

    use super::*;

    /// One client connection may have at most MAX_STREAMS_PER_CONNECTION streams open: the
    /// server advertises it, so an HTTP/2 client waits with the next one (RFC 9113 §5.1.2)
    /// until a stream ends; before, a client opened 20,000 on one connection. Twin: once
    /// one of the open streams ends, the waiting one is served.
    #[tokio::test]
    async fn a_connection_gets_at_most_the_stream_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sds.sock");
        let stop = CancellationToken::new();
        let server = tokio::spawn({
            let (path, stop) = (path.clone(), stop.clone());
            async move { serve_sds(&path, SecretStore::new(), Arc::new(Metrics::new()), stop).await }
        });
        let channel = loop {
            match crate::connect_unix(&path).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let open = |channel: tonic::transport::Channel| async move {
            let req = DiscoveryRequest {
                resource_names: vec!["ROOTCA".into()],
                ..Default::default()
            };
            // The request stream stays open (as Envoy's does) until the sender is dropped;
            // the store is empty, so the server never answers on it meanwhile.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(req).await.unwrap();
            let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
            SecretDiscoveryServiceClient::new(channel)
                .stream_secrets(requests)
                .await
                .map(|r| (tx, r))
        };
        let mut streams = Vec::new();
        for i in 0..MAX_STREAMS_PER_CONNECTION {
            let s = tokio::time::timeout(Duration::from_secs(5), open(channel.clone()))
                .await
                .unwrap_or_else(|_| panic!("stream {i} not opened"))
                .unwrap();
            streams.push(s);
        }
        let mut extra = tokio::spawn(open(channel.clone()));
        assert!(
            tokio::time::timeout(Duration::from_millis(500), &mut extra)
                .await
                .is_err(),
            "stream {} opened beside {MAX_STREAMS_PER_CONNECTION} others",
            MAX_STREAMS_PER_CONNECTION + 1
        );
        // The client ends one stream (as Envoy's closes): the waiting one goes ahead.
        drop(streams.pop());
        let s = tokio::time::timeout(Duration::from_secs(5), extra)
            .await
            .expect("the waiting stream is served once another ended")
            .unwrap();
        assert!(s.is_ok(), "{:?}", s.err());
        stop.cancel();
        drop(streams);
        let _ = server.await;
    }

    async fn sds_server(
        path: &std::path::Path,
        stop: &CancellationToken,
    ) -> tonic::transport::Channel {
        tokio::spawn({
            let (path, stop) = (path.to_owned(), stop.clone());
            async move { serve_sds(&path, SecretStore::new(), Arc::new(Metrics::new()), stop).await }
        });
        loop {
            match crate::connect_unix(path).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// A request message larger than MAX_SDS_REQUEST ends its call with OUT_OF_RANGE (tonic
    /// refuses it at its length prefix, before buffering it); before, tonic buffered up to
    /// 4 MiB per stream (+65 MiB per connection measured), and a 1 MiB request was served.
    /// The server keeps serving: the next call on the same connection is answered. Twin: a
    /// request just under the limit reaches the service (which refuses it for what it says).
    #[tokio::test]
    async fn a_request_over_the_message_limit_is_refused_and_others_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sds.sock");
        let stop = CancellationToken::new();
        let channel = sds_server(&path, &stop).await;
        let mut client = SecretDiscoveryServiceClient::new(channel);
        // No resource_names: the service answers INVALID_ARGUMENT once it sees the request.
        let sized = |n: usize| DiscoveryRequest {
            version_info: "v".repeat(n),
            ..Default::default()
        };
        for n in [MAX_SDS_REQUEST + 1, 1024 * 1024] {
            let e = client.fetch_secrets(sized(n)).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::OutOfRange, "{n} bytes: {e:?}");
        }
        for n in [100, MAX_SDS_REQUEST - 16] {
            let e = client.fetch_secrets(sized(n)).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{n} bytes: {e:?}");
        }
        stop.cancel();
    }

    /// The Workload API server's limit is smaller (its requests are empty or tiny): 16 KiB
    /// + 1 is OUT_OF_RANGE, just under it reaches the service (INVALID_ARGUMENT: no security
    /// header).
    #[tokio::test]
    async fn a_workload_api_request_over_its_limit_is_refused() {
        use rampart_proto::spiffe::workload::JwtsvidRequest;
        use rampart_proto::spiffe::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wl.sock");
        let stop = CancellationToken::new();
        let listener = bind_unix(&path, 0o600).await.unwrap();
        let svc = WorkloadApiService::new(SecretStore::new(), Arc::new(Metrics::new()))
            .into_server()
            .max_decoding_message_size(MAX_WORKLOAD_API_REQUEST);
        let router =
            grpc_server(WORKLOAD_API_STREAMS_PER_CONNECTION).add_service(CountStreams(svc));
        tokio::spawn(serve(
            path.clone(),
            listener,
            router,
            WORKLOAD_API_CONNECTIONS,
            stop.clone(),
        ));
        let channel = crate::connect_unix(&path).await.unwrap();
        let mut client = SpiffeWorkloadApiClient::new(channel);
        let sized = |n: usize| JwtsvidRequest {
            audience: vec!["a".repeat(n)],
            ..Default::default()
        };
        let e = client
            .fetch_jwtsvid(sized(MAX_WORKLOAD_API_REQUEST + 1))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
        let e = client
            .fetch_jwtsvid(sized(MAX_WORKLOAD_API_REQUEST - 16))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        stop.cancel();
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// A client that sends the HTTP/2 preface and an empty SETTINGS frame, nothing else.
    async fn raw_handshake(path: &std::path::Path) -> tokio::net::UnixStream {
        use tokio::io::AsyncWriteExt;
        let mut c = tokio::net::UnixStream::connect(path).await.unwrap();
        c.write_all(PREFACE).await.unwrap();
        c.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).await.unwrap();
        c
    }

    /// Read frames from the server (answering its PINGs, as a live client does) until it
    /// closes the connection or `limit` passes; the time it closed.
    async fn closed_within(
        mut c: tokio::net::UnixStream,
        limit: Duration,
    ) -> Option<tokio::time::Instant> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let run = async {
            loop {
                let mut head = [0u8; 9];
                if c.read_exact(&mut head).await.is_err() {
                    return tokio::time::Instant::now();
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut body = vec![0u8; len];
                if c.read_exact(&mut body).await.is_err() {
                    return tokio::time::Instant::now();
                }
                if head[3] == 0x6 && head[4] & 1 == 0 {
                    let mut pong = vec![0, 0, 8, 0x6, 1, 0, 0, 0, 0];
                    pong.extend_from_slice(&body);
                    let _ = c.write_all(&pong).await;
                }
            }
        };
        tokio::time::timeout(limit, run).await.ok()
    }

    /// A connection that sends nothing is closed HANDSHAKE_TIMEOUT after accept; before, it
    /// held its slot forever (hyper's keepalive starts after the handshake). Twin: one that
    /// sent the preface and SETTINGS is still open well past it.
    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_handshake_is_closed_after_the_deadline() {
        use crate::conn::HANDSHAKE_TIMEOUT;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sds.sock");
        let stop = CancellationToken::new();
        let _client = sds_server(&path, &stop).await;
        let start = tokio::time::Instant::now();
        let silent = tokio::net::UnixStream::connect(&path).await.unwrap();
        let at = closed_within(silent, Duration::from_secs(60))
            .await
            .expect("a silent connection is closed");
        let took = at - start;
        assert!(
            took >= HANDSHAKE_TIMEOUT && took < HANDSHAKE_TIMEOUT + Duration::from_secs(2),
            "{took:?}"
        );
        let greeted = raw_handshake(&path).await;
        assert!(
            closed_within(greeted, Duration::from_secs(60))
                .await
                .is_none(),
            "a connection that sent its preface and SETTINGS was closed"
        );
        stop.cancel();
    }

    /// A connection without an open stream is closed after IDLE_TIMEOUT (it answers the
    /// server's PINGs, so keepalive alone never closed it). Twin: a connection with an open
    /// SDS stream (as Envoy keeps) is not idle and stays open.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_and_one_with_a_stream_is_not() {
        use crate::conn::IDLE_TIMEOUT;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sds.sock");
        let stop = CancellationToken::new();
        let channel = sds_server(&path, &stop).await;
        let (_tx, mut stream) = open_stream(channel).await;
        let start = tokio::time::Instant::now();
        let idle = raw_handshake(&path).await;
        let at = closed_within(idle, IDLE_TIMEOUT * 2)
            .await
            .expect("an idle connection is closed");
        let took = at - start;
        assert!(
            took >= IDLE_TIMEOUT && took < IDLE_TIMEOUT + Duration::from_secs(5),
            "{took:?}"
        );
        tokio::time::sleep(IDLE_TIMEOUT).await;
        // Still open: no message (the store is empty), no error.
        assert!(
            tokio::time::timeout(Duration::from_secs(1), stream.message())
                .await
                .is_err(),
            "the connection with an open stream was closed"
        );
        stop.cancel();
    }

    async fn open_stream(
        channel: tonic::transport::Channel,
    ) -> (
        tokio::sync::mpsc::Sender<DiscoveryRequest>,
        tonic::Streaming<rampart_proto::envoy::service::discovery::v3::DiscoveryResponse>,
    ) {
        let req = DiscoveryRequest {
            resource_names: vec!["ROOTCA".into()],
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(req).await.unwrap();
        let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
        let r = SecretDiscoveryServiceClient::new(channel)
            .stream_secrets(requests)
            .await
            .unwrap();
        (tx, r.into_inner())
    }

    /// MAX_CONNECTIONS_PER_SOCKET connections that send nothing do not keep a real SDS
    /// client out: it closes the oldest idle one and is served at once (before, it waited
    /// in the backlog for as long as they stayed). Twin: the connection with an open stream,
    /// though the oldest, is not the one closed.
    #[tokio::test]
    async fn silent_connections_at_the_cap_do_not_keep_a_client_out() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sds.sock");
        let stop = CancellationToken::new();
        let channel = sds_server(&path, &stop).await;
        let (_tx, mut stream) = open_stream(channel).await;
        let mut silent = Vec::new();
        for _ in 1..MAX_CONNECTIONS_PER_SOCKET {
            silent.push(tokio::net::UnixStream::connect(&path).await.unwrap());
        }
        // Let the server accept them all (and fill the cap).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let served = async {
            let channel = crate::connect_unix(&path).await.unwrap();
            let e = SecretDiscoveryServiceClient::new(channel)
                .fetch_secrets(DiscoveryRequest::default())
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        };
        tokio::time::timeout(Duration::from_secs(3), served)
            .await
            .expect("a real client is served while silent connections fill the cap");
        // The oldest silent connection was closed for it...
        // (after the server's SETTINGS, which it sends at once).
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(1), silent[0].read_to_end(&mut buf))
            .await
            .expect("the oldest idle connection was closed");
        // ...not the older one with an open stream.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), stream.message())
                .await
                .is_err(),
            "the connection with an open stream was closed"
        );
        stop.cancel();
    }
}
