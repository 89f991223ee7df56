//! The outbound side: the app's calls through the HTTP-proxy listener (routed by Host, or
//! `CONNECT host:port` tunnels) and through upstream ports, to a peer proxy's inbound
//! listener.
//!
//! Auto-mTLS as Istio does it: the connection to a destination port is mutual TLS (the
//! server's SPIFFE ID checked against the registry) unless that port's effective
//! PeerAuthentication is DISABLE, where the destination's inbound listener passes plaintext
//! and does not terminate TLS; then the proxy connects in plaintext and labels the metrics
//! `connection_security_policy="none"`.
//!
//! Each destination (authority as the app wrote it) is resolved once per configuration: the
//! [`Route`]s (target, mode, pool, metric series; one per endpoint of a service, taken in
//! turn per request or connection) are cached in a table tied to the [`Config`] they were
//! computed from, so a registry or policy edit (a new `Config`) makes the
//! next request resolve again and a mode change applies to new connections.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Response, Uri, Version, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rampart_authz::MtlsMode;
use rampart_certs::SpiffeId;
use tokio::net::TcpStream;

use crate::config::{Config, Handle};
use crate::conn::{PeerConnector, PeerStream, Target};
use crate::drain::Drain;
use crate::edge::{Budget, Budgets, EdgeLimits};
use crate::http::{Body, UpgradeAsk, is_grpc_request, owned_text_response, text_response};
use crate::identity::{Alpn, IdentityHolder};
use crate::metrics::{Labels, Metered, Metrics, Pending, Series, request_protocol};
use rampart_mesh::{PortEntry, PortProtocol, Resolved, WorkloadEntry};
use tracing::Instrument as _;

/// Most cached routes per configuration (authorities as apps write them).
const MAX_ROUTES: usize = 4096;

#[derive(Clone, PartialEq, Eq, Hash)]
struct PeerKey {
    addr: SocketAddr,
    expected: SpiffeId,
    h2: bool,
    mtls: bool,
    dest: String,
    port: u16,
    /// `<service host>:<service port>` (the SNI).
    service: String,
}

/// Pooled HTTP connections to one destination port, and its request series.
pub(crate) struct PeerPool {
    client: Client<PeerConnector, Incoming>,
    series: Arc<Series>,
}

/// A resolved destination port: where, how (mTLS or plaintext) and what to count under.
pub(crate) struct Route {
    /// `namespace/name:port` (for logs).
    pub(crate) name: String,
    pub(crate) protocol: PortProtocol,
    pub(crate) mtls: bool,
    pub(crate) target: Arc<Target>,
    pub(crate) pool: Arc<PeerPool>,
    /// Source-reporter labels of this destination's TCP series.
    pub(crate) tcp_labels: Arc<str>,
}

/// The routes of one authority: one per destination (a service's endpoints), taken in
/// turn (round robin per request or connection).
struct Balanced {
    routes: Vec<Arc<Route>>,
    next: AtomicUsize,
}

impl Balanced {
    fn pick(&self) -> Arc<Route> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.routes.len();
        self.routes[i].clone()
    }
}

struct RouteTable {
    cfg: Arc<Config>,
    map: HashMap<Box<str>, Arc<Balanced>>,
}

/// Why an authority has no route.
pub(crate) enum NoRoute {
    /// Not a service port of the registry.
    Unknown,
    /// The registry entry cannot be dialled (e.g. an SNI that is not a DNS name).
    Bad(String),
}

/// The outbound side of a proxy: what it reads (configuration, identity, limits), where it
/// counts, its connection pools (kept across configuration changes when nothing about the
/// destination changed) and the route table of the current configuration.
pub(crate) struct Outbound {
    pub(crate) cfg: Handle,
    pub(crate) identity: Arc<IdentityHolder>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) edge: EdgeLimits,
    pub(crate) budgets: Arc<Budgets>,
    pub(crate) drain: Drain,
    /// Longest wait for the peer's response headers.
    pub(crate) request_timeout: Duration,
    pools: Mutex<HashMap<PeerKey, Arc<PeerPool>>>,
    routes: ArcSwapOption<RouteTable>,
}

fn source_labels(cfg: &Config, dest: &WorkloadEntry, service_host: String, mtls: bool) -> Labels {
    Labels {
        reporter: "source",
        source_principal: cfg.me.spiffe_id(&cfg.folder.trust_domain).to_string(),
        source_workload: cfg.me.name.clone(),
        source_namespace: cfg.me.namespace.clone(),
        destination_principal: dest.spiffe_id(&cfg.folder.trust_domain).to_string(),
        destination_workload: dest.name.clone(),
        destination_namespace: dest.namespace.clone(),
        destination_service: service_host,
        mtls,
    }
}

/// Whether the proxy originates mTLS to `port` of `dest`: yes for STRICT and PERMISSIVE
/// (and unset, which is PERMISSIVE), no for DISABLE.
pub(crate) fn originate_mtls(cfg: &Config, dest: &WorkloadEntry, port: &PortEntry) -> bool {
    dest.mtls_mode_for_callers(&cfg.engine, port) != MtlsMode::Disable
}

impl Outbound {
    pub(crate) fn new(
        cfg: Handle,
        identity: Arc<IdentityHolder>,
        metrics: Arc<Metrics>,
        edge: EdgeLimits,
        budgets: Arc<Budgets>,
        drain: Drain,
        request_timeout: Duration,
    ) -> Outbound {
        Outbound {
            cfg,
            identity,
            metrics,
            edge,
            budgets,
            drain,
            request_timeout,
            pools: Mutex::default(),
            routes: ArcSwapOption::empty(),
        }
    }

    /// The route for `authority` (`host[:port]` as the app wrote it) under `cfg`: a
    /// service's endpoints in turn, one per call.
    pub(crate) fn route(&self, cfg: &Arc<Config>, authority: &str) -> Result<Arc<Route>, NoRoute> {
        if let Some(t) = &*self.routes.load()
            && Arc::ptr_eq(&t.cfg, cfg)
            && let Some(b) = t.map.get(authority)
        {
            return Ok(b.pick());
        }
        let all = cfg
            .folder
            .registry
            .resolve_all(authority, &cfg.me.namespace)
            .ok_or(NoRoute::Unknown)?;
        let routes = all
            .iter()
            .map(|r| self.build_route(cfg, r).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let balanced = Arc::new(Balanced {
            routes,
            next: AtomicUsize::new(0),
        });
        let route = balanced.pick();
        self.routes.rcu(|cur| {
            let mut map = match cur {
                Some(t) if Arc::ptr_eq(&t.cfg, cfg) && t.map.len() < MAX_ROUTES => t.map.clone(),
                _ => HashMap::new(),
            };
            map.insert(authority.into(), balanced.clone());
            Some(Arc::new(RouteTable {
                cfg: cfg.clone(),
                map,
            }))
        });
        Ok(route)
    }

    /// The route to one destination (a workload port, under its service's host and port).
    fn build_route(&self, cfg: &Config, resolved: &Resolved<'_>) -> Result<Route, NoRoute> {
        let (dest, port) = (resolved.workload, resolved.port);
        let service_host = resolved.service_host();
        let expected = dest.spiffe_id(&cfg.folder.trust_domain);
        let mtls = originate_mtls(cfg, dest, port);
        let h2 = port.protocol.is_h2();
        let target = Arc::new(
            Target::new(
                port.inbound,
                &service_host,
                resolved.service_port,
                expected.clone(),
                if h2 { Alpn::H2 } else { Alpn::Http1 },
            )
            .map_err(NoRoute::Bad)?,
        );
        let key = PeerKey {
            addr: port.inbound,
            expected,
            h2,
            mtls,
            dest: dest.key(),
            port: port.port,
            service: format!("{service_host}:{}", resolved.service_port),
        };
        let labels = source_labels(cfg, dest, service_host, mtls);
        let pool = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools
                .entry(key)
                .or_insert_with(|| {
                    let connector = PeerConnector {
                        identity: self.identity.clone(),
                        target: target.clone(),
                        mtls,
                        connect_timeout: None,
                    };
                    let mut b = Client::builder(TokioExecutor::new());
                    b.pool_idle_timeout(Duration::from_secs(60));
                    self.edge.client(&mut b);
                    if h2 {
                        b.http2_only(true);
                    }
                    Arc::new(PeerPool {
                        client: b.build(connector),
                        series: self
                            .metrics
                            .series(labels.render(request_protocol(port.protocol))),
                    })
                })
                .clone()
        };
        // Raw TCP (upstream ports, CONNECT): ALPN `istio` only.
        let mut tcp_target = (*target).clone();
        tcp_target.alpn = Alpn::Tcp;
        Ok(Route {
            name: format!("{}:{}", dest.key(), port.port),
            protocol: port.protocol,
            mtls,
            target: Arc::new(tcp_target),
            pool,
            tcp_labels: labels.render("tcp"),
        })
    }
}

fn no_route_response(authority: &str, e: NoRoute) -> Response<Body> {
    match e {
        NoRoute::Unknown => {
            // Host and port only: an absolute-form target may carry `user:password@`.
            let shown = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
            tracing::info!(host = %shown, "outbound request to an unknown destination (502)");
            owned_text_response(
                502,
                format!(
                    "rampart: unknown destination {authority:?}: not a service port in workloads.yaml\n"
                ),
            )
        }
        NoRoute::Bad(e) => owned_text_response(502, format!("rampart: {e}\n")),
    }
}

/// Serve one connection of the outbound HTTP-proxy listener (HTTP/1.1 with `CONNECT`, or
/// h2c).
pub(crate) async fn http_conn(ob: &Arc<Outbound>, tcp: TcpStream, _peer: SocketAddr) {
    let svc_ob = ob.clone();
    let conn_span = tracing::Span::current();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ob = svc_ob.clone();
        let span = crate::http::request_span(&conn_span, &req);
        async move { Ok::<_, Infallible>(request(&ob, req).await) }.instrument(span)
    });
    crate::http::serve(&ob.edge, &ob.drain, tcp, svc, true).await;
}

/// An upstream-port connection (`listen` is the upstream's address).
pub(crate) async fn upstream_conn(ob: &Arc<Outbound>, listen: SocketAddr, tcp: TcpStream) {
    let cfg = ob.cfg.load_full();
    let Some(u) = cfg.me.upstreams.iter().find(|u| u.listen == listen) else {
        return;
    };
    let authority = format!("{}:{}", u.service, u.port);
    upstream_tcp(ob, &cfg, &authority, tcp).await;
}

/// An error and its causes, as one line (a failed mTLS handshake names its reason).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    msg
}

async fn request(ob: &Arc<Outbound>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    if req.method() == Method::CONNECT {
        return connect_tunnel(ob, req).await;
    }
    // Route and Host agree: an absolute-form target's authority is the Host forwarded.
    if let Err(why) = crate::edge::align_host(&mut req) {
        tracing::info!(reason = why, "outbound request refused (400)");
        return text_response(400, "rampart: bad request\n");
    }
    let authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => match req
            .headers()
            .get(header::HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        {
            Some(a) => a,
            None => {
                return text_response(
                    400,
                    "rampart: request without a destination (no absolute URI, no Host)\n",
                );
            }
        },
    };
    let route = {
        let cfg = ob.cfg.load();
        match ob.route(&cfg, authority.as_str()) {
            Ok(r) => r,
            Err(e) => return no_route_response(authority.as_str(), e),
        }
    };
    let h2 = route.protocol.is_h2();
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    if req.headers().get(header::HOST).is_none()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    match Uri::from_parts(parts) {
        Ok(u) => *req.uri_mut() = u,
        Err(_) => return text_response(400, "rampart: bad request target\n"),
    }
    req.headers_mut().remove("proxy-connection");
    req.headers_mut().remove(header::PROXY_AUTHORIZATION);
    // The app's own x-forwarded-client-cert never leaves: the next hop's proxy (Rampart
    // replaces it; an Istio sidecar appends to it) would pass it on as if a proxy had
    // written it (Envoy's outbound side strips it the same way).
    req.headers_mut().remove("x-forwarded-client-cert");
    *req.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    // A WebSocket handshake on an HTTP/1.1 destination port is passed on as it is; if the
    // peer answers 101, the app's connection and the peer's are relayed (`websocket`).
    let mut ws = None;
    match crate::http::upgrade_ask(&req) {
        UpgradeAsk::WebSocket if !h2 => {
            // The relay outlives the HTTP exchange: it holds a connection slot of its own.
            let Some(permit) = ob.budgets.acquire(Budget::Outbound) else {
                tracing::warn!(destination = %route.name, "connection limit reached; WebSocket refused");
                return text_response(503, "rampart: connection limit reached\n");
            };
            ws = Some((hyper::upgrade::on(&mut req), permit));
        }
        UpgradeAsk::WebSocket => {
            tracing::info!(destination = %route.name,
                "outbound WebSocket refused (501): the destination port is HTTP/2");
            return text_response(
                501,
                "rampart: WebSocket needs an HTTP/1.1 destination port (this one is HTTP/2)\n",
            );
        }
        UpgradeAsk::None => {}
        UpgradeAsk::Strip => UpgradeAsk::strip(&mut req),
        UpgradeAsk::Other => {
            tracing::info!(destination = %route.name, upgrade = ?req.headers().get(header::UPGRADE),
                "outbound request refused (403): only WebSocket upgrades are passed on");
            let mut r = text_response(403, "rampart: upgrade not allowed\n");
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
    }
    let grpc = is_grpc_request(&req);
    let pool = &route.pool;
    match tokio::time::timeout(ob.request_timeout, pool.client.request(req)).await {
        Ok(Ok(r))
            if r.status() == http::StatusCode::SWITCHING_PROTOCOLS
                && !(ws.is_some() && crate::http::accepts_websocket(&r)) =>
        {
            tracing::warn!(destination = %route.name, upgrade = ?r.headers().get(header::UPGRADE),
                "peer answered 101 to something other than a WebSocket handshake (502)");
            let r = text_response(502, "upstream protocol error: unexpected 101\n");
            Pending::new(pool.series.clone(), start, grpc, &r, "UPE").finish(None, None);
            r
        }
        Ok(Ok(mut r)) => {
            if let Some((app_side, permit)) = ws
                && r.status() == http::StatusCode::SWITCHING_PROTOCOLS
            {
                let peer_side = hyper::upgrade::on(&mut r);
                let (ob2, name) = (ob.clone(), route.name.clone());
                tokio::spawn(async move {
                    let _inflight = ob2.drain.enter();
                    let _permit = permit;
                    match tokio::join!(app_side, peer_side) {
                        (Ok(a), Ok(p)) => {
                            websocket(&ob2, &name, TokioIo::new(a), TokioIo::new(p)).await;
                        }
                        (a, p) => tracing::debug!(destination = %name,
                            app = ?a.err(), peer = ?p.err(), "WebSocket: an upgrade failed"),
                    }
                });
            }
            let pending = Pending::new(pool.series.clone(), start, grpc, &r, "-");
            r.map(|b| Either::Left(Metered::new(b, pending)))
        }
        Ok(Err(e)) => {
            let msg = error_chain(&e);
            tracing::warn!(destination = %route.name, error = %msg, "outbound request failed");
            let r = owned_text_response(503, format!("upstream connect error: {msg}\n"));
            Pending::new(pool.series.clone(), start, grpc, &r, "UF").finish(None, None);
            r
        }
        Err(_) => {
            let r = text_response(504, "upstream request timeout\n");
            Pending::new(pool.series.clone(), start, grpc, &r, "UT").finish(None, None);
            r
        }
    }
}

/// Copy bytes between the app's stream and the peer until both sides are done; the TCP
/// series counts the connection (bytes sent = towards the app, received = from the app).
async fn relay<A>(ob: &Outbound, route: &Route, app: &mut A, mut peer: PeerStream)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ob.metrics.tcp_opened(&route.tcp_labels);
    // Closed after the idle timeout with no byte either way (Envoy tcp_proxy idle_timeout).
    let act = crate::edge::Activity::new(false);
    let mut app = crate::edge::Tracked::new(app, act.clone());
    let (sent, received) = tokio::select! {
        r = crate::relay::copy_bidirectional(&mut app, &mut peer) => match r {
            Ok((from_app, from_peer)) => (from_peer, from_app),
            Err(e) => {
                tracing::debug!(destination = %route.name, error = %e, "TCP relay ended with an error");
                (0, 0)
            }
        },
        why = act.expired(&ob.edge) => {
            tracing::debug!(destination = %route.name, reason = why, "TCP relay closed");
            (0, 0)
        }
    };
    ob.metrics.tcp_closed(&route.tcp_labels, sent, received);
}

/// Relay an upgraded WebSocket connection between the app and the peer until either side
/// closes or no byte moves for the idle timeout.
async fn websocket<A, P>(ob: &Outbound, name: &str, app: A, mut peer: P)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    P: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let act = crate::edge::Activity::new(false);
    let mut app = crate::edge::Tracked::new(app, act.clone());
    tokio::select! {
        r = crate::relay::copy_bidirectional(&mut app, &mut peer) => {
            if let Err(e) = r {
                tracing::debug!(destination = %name, error = %e, "WebSocket relay ended");
            }
        }
        why = act.expired(&ob.edge) => {
            tracing::debug!(destination = %name, reason = why, "WebSocket closed");
        }
    }
}

/// An upstream-port connection: raw TCP to the destination's inbound listener, mTLS unless
/// the destination port is DISABLE.
pub(crate) async fn upstream_tcp(
    ob: &Arc<Outbound>,
    cfg: &Arc<Config>,
    authority: &str,
    mut tcp: TcpStream,
) {
    let route = match ob.route(cfg, authority) {
        Ok(r) => r,
        Err(NoRoute::Unknown) => {
            tracing::warn!(upstream = %authority, "upstream no longer in the registry; closing");
            return;
        }
        Err(NoRoute::Bad(e)) => {
            tracing::warn!(upstream = %authority, error = %e, "bad upstream target");
            return;
        }
    };
    let peer = match PeerStream::connect(&ob.identity, &route.target, route.mtls).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(upstream = %authority, error = %e, "upstream connection failed");
            return;
        }
    };
    relay(ob, &route, &mut tcp, peer).await;
}

/// `CONNECT host:port`: resolve like a request, dial the destination's inbound listener as
/// raw TCP (mTLS unless DISABLE), answer 200 and relay bytes; unknown destination → 502.
async fn connect_tunnel(ob: &Arc<Outbound>, req: Request<Incoming>) -> Response<Body> {
    let Some(authority) = req.uri().authority().cloned() else {
        return text_response(400, "rampart: CONNECT needs host:port\n");
    };
    let route = {
        let cfg = ob.cfg.load();
        match ob.route(&cfg, authority.as_str()) {
            Ok(r) => r,
            Err(e) => return no_route_response(authority.as_str(), e),
        }
    };
    // The tunnel outlives the HTTP exchange: it holds a connection slot of its own.
    let Some(permit) = ob.budgets.acquire(Budget::Outbound) else {
        tracing::warn!(destination = %route.name, "connection limit reached; CONNECT refused");
        return text_response(503, "rampart: connection limit reached\n");
    };
    let peer = match PeerStream::connect(&ob.identity, &route.target, route.mtls).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(destination = %route.name, error = %e, "CONNECT: upstream connection failed");
            return owned_text_response(503, format!("upstream connect error: {e}\n"));
        }
    };
    let ob2 = ob.clone();
    tokio::spawn(async move {
        let _inflight = ob2.drain.enter();
        let _permit = permit;
        match hyper::upgrade::on(req).await {
            Ok(up) => relay(&ob2, &route, &mut TokioIo::new(up), peer).await,
            Err(e) => {
                tracing::debug!(destination = %route.name, error = %e, "CONNECT: no upgrade")
            }
        }
    });
    Response::new(Either::Right(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_mesh::MeshFolder;
    use rampart_mesh::resources::{assemble, slice_for, to_resources};

    /// `ns1/client` calls two workloads of `ns2`, one of which a PeerAuthentication of
    /// `ns2` sets to DISABLE.
    fn mesh() -> MeshFolder {
        MeshFolder::from_parts(
            std::path::PathBuf::from("test"),
            ("mesh.yaml", "trustDomain: example.org\n"),
            (
                "workloads.yaml",
                "workloads:\n\
                 - {name: client, namespace: ns1, ports: [{port: 80, app: '127.0.0.1:9000', inbound: '127.0.0.1:9001'}], proxy: {outbound: '127.0.0.1:9100'}}\n\
                 - {name: plain, namespace: ns2, labels: {app: plain}, ports: [{port: 80, protocol: http, app: '127.0.0.1:9002', inbound: '127.0.0.1:9003'}]}\n\
                 - {name: secure, namespace: ns2, labels: {app: secure}, ports: [{port: 80, protocol: http, app: '127.0.0.1:9004', inbound: '127.0.0.1:9005'}]}\n",
            ),
            &[(
                "pa.yaml".to_string(),
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: plain, namespace: ns2}\nspec:\n  selector: {matchLabels: {app: plain}}\n  mtls: {mode: DISABLE}\n".to_string(),
            )],
            Default::default(),
        )
        .unwrap()
    }

    fn config(rs: &[rampart_mesh::resources::ModelResource]) -> Config {
        let f = assemble(
            "cp",
            rs.iter()
                .map(|r| (r.name.as_str(), r.kind, r.body.as_slice())),
        )
        .unwrap();
        Config::build(f, "ns1/client").unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn originates(cfg: &Config, authority: &str) -> bool {
        let r = cfg
            .folder
            .registry
            .resolve_target(authority, "ns1")
            .unwrap();
        originate_mtls(cfg, r.workload, r.port)
    }

    /// Given its slice (no policy of `ns2`), the caller dials the DISABLE destination in
    /// plaintext and the other with mTLS, exactly as with the whole model. The twin: the
    /// same slice without the ports' `mtls` would originate mTLS to both.
    #[test]
    fn a_slice_originates_mtls_as_the_whole_model() {
        let f = mesh();
        let whole = config(&to_resources(&f));
        let sliced_rs = slice_for(&f, "ns1", "client");
        assert!(sliced_rs.iter().all(|r| !r.name.starts_with("policy/")));
        let sliced = config(&sliced_rs);
        for (cfg, what) in [(&whole, "whole"), (&sliced, "slice")] {
            assert!(!originates(cfg, "plain.ns2"), "{what}");
            assert!(originates(cfg, "secure.ns2"), "{what}");
        }
        let stripped: Vec<_> = sliced_rs
            .into_iter()
            .map(|mut r| {
                let text = String::from_utf8(r.body.clone()).unwrap();
                r.body = text
                    .replace(",\"mtls\":\"DISABLE\"", "")
                    .replace(",\"mtls\":\"PERMISSIVE\"", "")
                    .into_bytes();
                r
            })
            .collect();
        let stripped = config(&stripped);
        assert!(originates(&stripped, "plain.ns2"));
    }
}
