//! The inbound side: connections to a workload port's inbound listener, from peer proxies
//! (mTLS) or plaintext clients (PERMISSIVE/DISABLE), checked against PeerAuthentication per
//! connection and AuthorizationPolicy/RequestAuthentication per request (HTTP) or per
//! connection (TCP), then forwarded to the app.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Request, Response, Uri, Version, header};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use rampart_authz::{
    ExtAuthz, HeaderMutation, HttpRequest, MtlsMode, Peer, ReasonCode, RequestContext, Workload,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::Instrument as _;

use crate::app::{AppBody, AppConn};
use crate::config::Handle;
use crate::drain::Drain;
use crate::edge::{Activity, EdgeLimits, Tracked};
use crate::http::{
    Body, UpgradeAsk, authority_of, denial, is_grpc_request, owned_text_response, text_response,
};
use crate::identity::{IdentityHolder, cert_sha256_hex};
use crate::jwks::{JwksState, Lookup};
use crate::metrics::{Kind, Labels, Metered, Metrics, Pending, PortStats, PortTable, Series};
use rampart_mesh::PortProtocol;

/// What the inbound side needs: the configuration, the proxy's identity, where to count,
/// the app clients and the JWKS key sets.
pub(crate) struct Inbound {
    pub(crate) cfg: Handle,
    pub(crate) identity: Arc<IdentityHolder>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) ports: Arc<PortTable>,
    pub(crate) jwks: Arc<JwksState>,
    pub(crate) edge: EdgeLimits,
    pub(crate) drain: Drain,
    /// Longest wait for the app's response headers.
    pub(crate) request_timeout: Duration,
    pub(crate) app_h1: Client<HttpConnector, AppBody>,
    pub(crate) app_h2: Client<HttpConnector, AppBody>,
    /// Clients of the extension providers CUSTOM policies name.
    pub(crate) ext_authz: crate::ext_authz::Clients,
    /// Bytes of request bodies that may still be held for providers (`EdgeLimits::
    /// max_held_body_bytes`), one permit a byte.
    pub(crate) held_budget: Arc<tokio::sync::Semaphore>,
    /// Bumped after every configuration change is in force: established TCP connections
    /// re-check their PeerAuthentication mode and policy then.
    pub(crate) cfg_changed: tokio::sync::watch::Sender<u64>,
}

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
    /// The app connection of this connection's HTTP/1.1 requests (HTTP/2 streams use the
    /// pooled `Inbound::app_h1`/`app_h2`).
    app_conn: AppConn,
    /// The app's side of a WebSocket upgrade it accepted (101): once the 101 is written the
    /// connection stops being HTTP and its bytes are relayed to this.
    upgraded: std::sync::Mutex<Option<hyper::upgrade::OnUpgrade>>,
}

impl ConnCtx {
    /// What policy knows of this connection, and of the request when there is one.
    fn request_context(&self, http: Option<HttpRequest>) -> RequestContext {
        RequestContext {
            source: Peer {
                principal: self.principal.clone(),
                // An IPv4 client of a dual-stack (`[::]`) listener arrives as
                // `::ffff:a.b.c.d`: policy's IPv4 ranges must see `a.b.c.d` (as Envoy's).
                ip: Some(self.peer.ip().to_canonical()),
                remote_ip: None,
            },
            destination_ip: self.local.map(|a| a.ip().to_canonical()),
            destination_port: self.port,
            sni: self.sni.clone(),
            http,
            jwt: None,
        }
    }
}

fn app_authority(app: SocketAddr) -> Option<http::uri::Authority> {
    http::uri::Authority::try_from(app.to_string().as_str()).ok()
}

/// A connection's serving future, boxed on its own.
type Serving<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

pub(crate) async fn conn(ib: &Arc<Inbound>, port: u16, tcp: TcpStream, peer: SocketAddr) {
    // The sniff, the handshake and everything built for them run in a future boxed on its
    // own and freed once the connection is accepted; serving runs in a second box. This
    // task lives as long as the connection (idle ones too): its own frame holds the two
    // pointers only.
    let serving = Box::pin(accept(ib, port, tcp, peer)).await;
    if let Some(serving) = serving {
        serving.await;
    }
}

/// Sniff, apply PeerAuthentication's mode, terminate mTLS: the connection's serving future,
/// or `None` once it is refused (logged and counted here).
async fn accept(
    ib: &Arc<Inbound>,
    port: u16,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<Serving<'_>> {
    let cfg = ib.cfg.load_full();
    let Some(pe) = cfg.me.port(port).cloned() else {
        tracing::warn!(port, "port no longer in the registry; closing connection");
        return None;
    };
    let stats = ib.ports.get(port);
    let mode = cfg.engine.peer_authentication(&cfg.workload, port).mode;
    // Sniff: a TLS record starts with 0x16 (handshake).
    let mut first = [0u8; 1];
    let is_tls = match tokio::time::timeout(Duration::from_secs(5), tcp.peek(&mut first)).await {
        Ok(Ok(0)) | Ok(Err(_)) => return None,
        Ok(Ok(_)) => crate::sniff::is_tls(first[0]),
        Err(_) => false, // client waits for the server: plaintext (server-first protocol)
    };
    let terminate_tls = match (mode, is_tls) {
        (MtlsMode::Disable, _) => false,
        (MtlsMode::Strict, false) => {
            stats.count(Kind::PlaintextRefused, Some(peer.ip()));
            tracing::info!(%peer, port, "plaintext connection refused: PeerAuthentication STRICT");
            return None;
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
        let series = ib
            .metrics
            .series(labels.render(crate::metrics::request_protocol(pe.protocol)));
        let cx = ConnCtx {
            port,
            protocol,
            peer,
            local,
            principal: None,
            sni: None,
            xfcc: None,
            labels: series.base(),
            series,
            stats,
            app: app_authority(pe.app),
            app_conn: AppConn::new(pe.app, &ib.edge),
            upgraded: std::sync::Mutex::new(None),
        };
        return Some(serve(ib, cx, pe.app, tcp));
    }
    let state = match ib.identity.for_handshake() {
        Ok(s) => s,
        Err(reason) => {
            tracing::warn!(%peer, port, %reason, "mTLS handshake refused: own identity unusable (fail closed)");
            return None;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(state.server.clone());
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let error = crate::conn::describe_tls_error(&e);
            tracing::info!(%peer, port, %error, "mTLS handshake refused");
            return None;
        }
        Err(_) => {
            tracing::info!(%peer, port, "mTLS handshake timed out");
            return None;
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
        return None;
    };
    // Closed at once if a later CRL revokes the peer's certificate.
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default()
        .to_vec();
    let tls = match ib.identity.register(
        &state,
        tls,
        &chain,
        rampart_certs::Usage::ClientAuth,
        principal.clone(),
    ) {
        Ok(t) => t,
        Err(why) => {
            tracing::warn!(%peer, port, peer_id = %principal, reason = %why, "mTLS connection closed");
            return None;
        }
    };
    stats.count(Kind::MtlsConnection, Some(peer.ip()));
    let xfcc = HeaderValue::from_str(&format!(
        "By={};Hash={};Subject=\"\";URI={}",
        me_principal,
        hash.unwrap_or_default(),
        principal
    ))
    .ok();
    let (sw, sns) = cfg.workload_of(&principal);
    labels.source_principal = principal.clone();
    labels.source_workload = sw;
    labels.source_namespace = sns;
    // One copy of the label text per series, not per connection.
    let series = ib
        .metrics
        .series(labels.render(crate::metrics::request_protocol(pe.protocol)));
    let cx = ConnCtx {
        port,
        protocol: pe.protocol,
        peer,
        local,
        principal: Some(principal),
        sni,
        xfcc,
        labels: series.base(),
        series,
        stats,
        app: app_authority(pe.app),
        app_conn: AppConn::new(pe.app, &ib.edge),
        upgraded: std::sync::Mutex::new(None),
    };
    // The stream (rustls' connection state is over a kilobyte) in a box of its own that the
    // serving futures point to, rather than moved into (and so copied in) each of them.
    let tls = Box::new(tls);
    Some(serve(ib, cx, pe.app, tls))
}

fn serve<IO>(ib: &Arc<Inbound>, cx: ConnCtx, app: SocketAddr, io: IO) -> Serving<'_>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if cx.protocol == PortProtocol::Tcp {
        return Box::pin(tcp(ib, cx, app, io));
    }
    let cx = Arc::new(cx);
    let park_cx = cx.clone();
    let ws_cx = cx.clone();
    let svc_ib = ib.clone();
    // HTTP/2 streams run as tasks of their own: each request's span names its connection's
    // as parent explicitly.
    let conn_span = tracing::Span::current();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ib = svc_ib.clone();
        let cx = cx.clone();
        let span = crate::http::request_span(&conn_span, &req);
        async move { Ok::<_, Infallible>(request(&ib, &cx, req).await) }.instrument(span)
    });
    let plaintext = ws_cx.principal.is_none();
    // A parked (idle) HTTP/1.1 connection gives up its app connection too; its next request
    // opens a new one.
    Box::pin(async move {
        let serving = crate::http::serve_inbound(
            &ib.edge,
            &ib.drain,
            io,
            svc,
            move || {
                park_cx.app_conn.release();
            },
            || ws_cx.has_upgrade(),
        );
        let upgraded = if plaintext {
            drained_when_strict(ib, &ws_cx, serving).await
        } else {
            serving.await
        };
        if let Some(client) = upgraded {
            websocket(ib, &ws_cx, client).await;
        }
    })
}

/// Serve a plaintext HTTP connection under a drain signal of its own that also fires when
/// its port turns STRICT: the connection then finishes the request in flight and closes
/// (HTTP/2: GOAWAY; an idle or parked HTTP/1.1 connection at once), as Envoy drains a
/// replaced filter chain. Without it an HTTP/2 connection, which cannot be told `Connection:
/// close`, stayed open with each new stream refused. The listener's and the proxy's drain
/// still apply through it.
async fn drained_when_strict<F: std::future::Future>(
    ib: &Inbound,
    cx: &ConnCtx,
    serving: F,
) -> F::Output {
    let (tx, rx) = tokio::sync::watch::channel(false);
    // Read outside the scope below: the listener's (or the proxy's) signal.
    let mut outer = ib.drain.conn_signal();
    let mut changes = ib.cfg_changed.subscribe();
    let fire = async {
        loop {
            if *outer.borrow_and_update() {
                break;
            }
            // Checked before every wait: the port may have turned STRICT between the
            // accept's check and the subscription above.
            if strict_now(&ib.cfg.load(), cx.port) {
                tracing::warn!(peer = %cx.peer, port = cx.port,
                    "established plaintext HTTP connection closing: the port is STRICT now");
                break;
            }
            tokio::select! {
                r = outer.changed() => if r.is_err() { break },
                r = changes.changed() => if r.is_err() { std::future::pending::<()>().await },
            }
        }
        let _ = tx.send(true);
    };
    let serving = crate::drain::CONN_DRAIN.scope(rx, serving);
    tokio::pin!(serving);
    tokio::pin!(fire);
    let mut fired = false;
    loop {
        tokio::select! {
            out = &mut serving => return out,
            () = &mut fire, if !fired => fired = true,
        }
    }
}

impl ConnCtx {
    fn has_upgrade(&self) -> bool {
        self.upgraded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// Relay a WebSocket connection after the app's 101 was written: the client's bytes (first
/// any that arrived with the handshake) to the app's upgraded connection and back, until
/// either side closes, the idle timeout passes with no byte either way, or a plaintext
/// connection's port turns STRICT. (A peer revoked meanwhile is closed by its TLS stream.)
async fn websocket<IO>(ib: &Inbound, cx: &ConnCtx, client: crate::http::Rewind<Tracked<IO>>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(on) = cx.upgraded.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return;
    };
    let mut changes = ib.cfg_changed.subscribe();
    // The port may have turned STRICT while the app answered the handshake (after the
    // request's check, before this subscription).
    if cx.principal.is_none() && strict_now(&ib.cfg.load(), cx.port) {
        tracing::warn!(peer = %cx.peer, port = cx.port,
            "plaintext WebSocket closed: the port is STRICT now");
        return;
    }
    let app = match on.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(peer = %cx.peer, error = %e, "WebSocket: the app's side of the upgrade failed");
            return;
        }
    };
    let mut app = hyper_util::rt::TokioIo::new(app);
    // Only the idle timeout from here: frames are not requests.
    let act = Activity::new(false);
    let mut client = Tracked::new(client, act.clone());
    let relay = crate::relay::copy_bidirectional(&mut client, &mut app);
    tokio::pin!(relay);
    loop {
        tokio::select! {
            r = &mut relay => {
                if let Err(e) = r {
                    tracing::debug!(peer = %cx.peer, error = %e, "WebSocket relay ended");
                }
                return;
            }
            why = act.expired(&ib.edge) => {
                tracing::debug!(peer = %cx.peer, reason = why, "WebSocket closed");
                return;
            }
            Ok(()) = changes.changed() => {
                if cx.principal.is_none() && strict_now(&ib.cfg.load(), cx.port) {
                    tracing::warn!(peer = %cx.peer, port = cx.port,
                        "plaintext WebSocket closed: the port is STRICT now");
                    return;
                }
            }
        }
    }
}

/// The CUSTOM hook of one evaluation. `Default`: records which provider the engine wants
/// asked (and the policy whose rule matched), answering "denied" meanwhile. `answered(p)`:
/// provider `p` allowed (a TCP connection re-judged after a change). `settled()`: CUSTOM was
/// decided before this evaluation, every provider counts as having allowed.
#[derive(Default)]
struct Custom {
    asked: std::sync::Mutex<Option<String>>,
    allowed: Option<String>,
    settled: bool,
}

impl Custom {
    fn answered(provider: String) -> Custom {
        Custom {
            allowed: Some(provider),
            ..Custom::default()
        }
    }

    fn settled() -> Custom {
        Custom {
            settled: true,
            ..Custom::default()
        }
    }

    fn asked(&self) -> Option<String> {
        self.asked.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ExtAuthz for Custom {
    fn check(&self, provider: &str, _: &Workload, _: &RequestContext) -> bool {
        *self.asked.lock().unwrap_or_else(|p| p.into_inner()) = Some(provider.to_string());
        self.settled || self.allowed.as_deref() == Some(provider)
    }

    fn settled(&self) -> bool {
        self.settled
    }
}

static XFCC: header::HeaderName = header::HeaderName::from_static("x-forwarded-client-cert");

async fn request(ib: &Arc<Inbound>, cx: &ConnCtx, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let mut req = req.map(AppBody::Streamed);
    let mtls = cx.principal.is_some();
    // A plaintext connection accepted before its port turned STRICT serves no more requests
    // (below); such a request counts as refused, not as plaintext served.
    let strict_refused = !mtls && strict_now(&ib.cfg.load(), cx.port);
    cx.stats.count(
        if mtls {
            Kind::MtlsRequest
        } else if strict_refused {
            Kind::PlaintextRefused
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
    // A header value with leading or trailing whitespace (HTTP/2 carries it as sent; RFC
    // 9113 §8.2.1 makes it malformed): policy would judge `" true"` while an HTTP/1.1 app,
    // trimming as its parser must, reads `true`.
    if let Some(name) = req.headers().iter().find_map(|(k, v)| {
        let b = v.as_bytes();
        let ws = |c: Option<&u8>| matches!(c, Some(b' ' | b'\t'));
        (ws(b.first()) || ws(b.last())).then(|| k.clone())
    }) {
        tracing::info!(peer = %cx.peer, header = %name, "request refused (400): header value with leading or trailing whitespace");
        let (r, g) = denial(400, grpc, "Bad Request");
        cx.series.request(400, g, "-", start.elapsed());
        return r;
    }
    let ask = crate::http::upgrade_ask(&req);
    match ask {
        UpgradeAsk::None | UpgradeAsk::WebSocket => {}
        // Served as the HTTP/1.1 request it also is: the app never switches protocol.
        UpgradeAsk::Strip => UpgradeAsk::strip(&mut req),
        UpgradeAsk::Other => {
            tracing::info!(peer = %cx.peer, upgrade = ?req.headers().get(header::UPGRADE),
                "request refused (403): only WebSocket upgrades are passed on; closing");
            let (mut r, g) = denial(403, grpc, "upgrade not allowed");
            // As Envoy: what follows may be the payload of the refused upgrade, not requests.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            cx.series.request(403, g, "-", start.elapsed());
            return r;
        }
    }
    let cfg = ib.cfg.load();
    // A plaintext connection accepted before its port turned STRICT serves no more requests
    // (Envoy drains the old filter chain; STRICT refuses plaintext at once here).
    if strict_refused {
        tracing::info!(peer = %cx.peer, port = cx.port, "plaintext request refused: the port is STRICT now; closing");
        let (mut r, g) = denial(403, grpc, "plaintext refused: PeerAuthentication STRICT");
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        cx.series.request(403, g, "-", start.elapsed());
        return r;
    }
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
    let mut normalized = match rampart_authz::normalize_path(
        &raw_path,
        cfg.folder.mesh.path_normalization,
    ) {
        Ok(n) => n.to_forward(),
        Err(e) => {
            tracing::info!(peer = %cx.peer, path = %crate::edge::loggable_path(&raw_path), reason = %e.reason, "request refused: bad path (400)");
            let (r, g) = denial(400, grpc, "Bad Request");
            cx.series.request(400, g, "-", start.elapsed());
            return r;
        }
    };
    // Headers an extension provider's allowing answer adds to the client's response: to
    // every response from here on, the app's or a later denial (Envoy's ext_authz adds them
    // as the response passes it, local replies of later filters included).
    let mut ext_response: Vec<(header::HeaderName, HeaderValue)> = Vec::new();
    if !cfg.fast_path {
        // Every header the app will receive, none skipped (see `edge::header_text`).
        let judged = |req: &Request<AppBody>| HttpRequest {
            method: req.method().as_str().to_string(),
            path: raw_path.clone(),
            host: authority_of(req),
            headers: req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), crate::edge::header_text(v)))
                .collect(),
        };
        let mut ctx = cx.request_context(Some(judged(&req)));
        // 1. CUSTOM, on the request as the client sent it and before authentication (Istio's
        // filter order: ext_authz, then jwt_authn, then RBAC; CUSTOM rules cannot name
        // request.auth). The engine names the provider its matching rule wants asked.
        let custom = Custom::default();
        let first = cfg
            .has_custom
            .then(|| cfg.engine.authorize_with(&cfg.workload, &ctx, &custom));
        let policy = first
            .as_ref()
            .and_then(|d| d.policy.as_ref())
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .unwrap_or_else(|| "-".into());
        let early = first
            .filter(|d| d.reason_code == ReasonCode::CustomProviderInvalid)
            .map(Box::new);
        if early.is_none()
            && let Some(name) = custom.asked()
            && let Some(Ok(provider)) = cfg.folder.mesh.provider(&name).map(|p| &p.authz)
        {
            // A provider that judges the body: its start is held back (up to the
            // provider's limit) and shown, then forwarded with the rest. A request without
            // a body (a WebSocket handshake has none: what follows its 101 is never in the
            // request body) holds nothing. Envoy also skips requests that ask for an
            // upgrade; here a body sent with upgrade headers is shown like any other, or it
            // would reach the app unjudged.
            let mut held = None;
            if let Some(b) = provider.body
                && !hyper::body::Body::is_end_stream(req.body())
                && let AppBody::Streamed(inc) =
                    std::mem::replace(req.body_mut(), AppBody::Replayed(Box::default()))
            {
                let length = req
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                let holding = crate::ext_authz::hold_body(inc, length, &b, &ib.held_budget);
                let (status, text, why, flags) = match tokio::time::timeout(
                    ib.request_timeout,
                    holding,
                )
                .await
                {
                    Ok(Ok((h, replay))) => {
                        *req.body_mut() = replay;
                        held = Some(h);
                        (0, "", String::new(), "-")
                    }
                    Ok(Err(crate::ext_authz::NotHeld::TooLarge)) => (
                        413,
                        "Payload Too Large",
                        format!(
                            "the body is longer than extension provider {name:?} takes ({} bytes, no partial bodies)",
                            b.max_bytes
                        ),
                        "-",
                    ),
                    // Envoy's flag for a request its overload manager refused.
                    Ok(Err(crate::ext_authz::NotHeld::Overloaded)) => (
                        503,
                        "overloaded",
                        format!(
                            "request bodies held for extension providers reached the proxy's limit ({} bytes, --max-held-body-kb)",
                            ib.edge.max_held_body_bytes
                        ),
                        "OL",
                    ),
                    Ok(Err(crate::ext_authz::NotHeld::Broken(e))) => {
                        // The client left mid-body (an HTTP/1.1 connection closed, an HTTP/2
                        // stream reset): nobody reads an answer, and it is counted as Envoy
                        // counts it, code 0 with DC/DR, not as a 400 the client never saw.
                        let gone = if client_reset_stream(&e) {
                            Some("DR")
                        } else if e.is_incomplete_message() || client_left(&e) {
                            Some("DC")
                        } else {
                            None
                        };
                        if let Some(flags) = gone {
                            tracing::info!(
                                peer = %cx.peer,
                                method = %req.method(),
                                path = %crate::edge::loggable_path(&raw_path),
                                flags,
                                "request ended: the client broke off while its body was held for extension provider {name:?}: {e}"
                            );
                            let (r, _) = denial(400, grpc, "Bad Request");
                            cx.series.request(0, None, flags, start.elapsed());
                            return r;
                        }
                        (
                            400,
                            "Bad Request",
                            format!("reading the body failed: {e}"),
                            "-",
                        )
                    }
                    Err(_) => (
                        408,
                        "request timeout",
                        "the body did not arrive in time".to_string(),
                        "-",
                    ),
                };
                if status != 0 {
                    tracing::info!(
                        peer = %cx.peer,
                        method = %req.method(),
                        path = %crate::edge::loggable_path(&raw_path),
                        status,
                        policy = %policy,
                        "request refused: {why}"
                    );
                    let (r, g) = denial(status, grpc, text);
                    cx.series.request(status, g, flags, start.elapsed());
                    return r;
                }
            }
            let facts = crate::ext_authz::Facts {
                path: &normalized,
                peer: cx.peer,
                peer_principal: cx.principal.as_deref(),
                local: cx.local,
                local_principal: cfg.my_id().to_string(),
                protocol: match req.version() {
                    Version::HTTP_2 => "HTTP/2",
                    Version::HTTP_10 => "HTTP/1.0",
                    _ => "HTTP/1.1",
                },
                body: held.as_ref(),
                judges_body: provider.body.is_some(),
                pack_as_bytes: provider.body.is_some_and(|b| b.pack_as_bytes),
            };
            // Boxed: the check's state (an HTTP or gRPC call) would otherwise widen every
            // request's future, CUSTOM or not.
            match Box::pin(ib.ext_authz.check(&cfg, &name, provider, &req, &facts)).await {
                crate::ext_authz::Answer::Deny(denied) => {
                    tracing::warn!(
                        peer = %cx.peer,
                        principal = cx.principal.as_deref().unwrap_or("-"),
                        method = %req.method(),
                        path = %crate::edge::loggable_path(&raw_path),
                        normalized_path = %judged_path(&raw_path, &normalized),
                        status = denied.status,
                        policy = %policy,
                        reason = %denied.reason,
                        "{}",
                        if denied.unasked {
                            format!("request denied: extension provider {name:?} did not judge it (fail closed)")
                        } else {
                            format!("request denied by extension provider {name:?}")
                        }
                    );
                    // A gRPC caller gets a gRPC status (as Envoy's local replies), the
                    // provider's headers beside it (not its own gRPC status).
                    let (mut r, g) = if grpc {
                        denial(denied.status, true, &String::from_utf8_lossy(&denied.body))
                    } else {
                        let mut r =
                            Response::new(Either::Right(http_body_util::Full::new(denied.body)));
                        *r.status_mut() = http::StatusCode::from_u16(denied.status)
                            .unwrap_or(http::StatusCode::FORBIDDEN);
                        (r, None)
                    };
                    for (k, v) in denied.headers {
                        let theirs = grpc
                            && (k == header::CONTENT_TYPE
                                || k.as_str() == "grpc-status"
                                || k.as_str() == "grpc-message");
                        if !theirs {
                            r.headers_mut().append(k, v);
                        }
                    }
                    cx.series.request(denied.status, g, "UAEX", start.elapsed());
                    return r;
                }
                crate::ext_authz::Answer::Allow(changes) => {
                    if let Some(why) = &changes.failed_open {
                        tracing::warn!(
                            peer = %cx.peer,
                            method = %req.method(),
                            path = %crate::edge::loggable_path(&raw_path),
                            policy = %policy,
                            "{why}; allowed (failOpen)"
                        );
                    }
                    // The provider's changes, then authentication and DENY/ALLOW judge the
                    // request as changed: a header the provider sets is the one policy reads
                    // and the app gets, never the client's copy of it. What the proxy itself
                    // vouches for is put back: JWT output headers come only from a verified
                    // token (below), x-forwarded-client-cert only from the handshake.
                    changes.apply(req.headers_mut());
                    for h in &cfg.jwt_output_headers {
                        req.headers_mut().remove(h);
                    }
                    req.headers_mut().remove(&XFCC);
                    if let Some(x) = &cx.xfcc {
                        req.headers_mut().insert(XFCC.clone(), x.clone());
                    }
                    ext_response = changes.response;
                    ctx = cx.request_context(Some(judged(&req)));
                }
            }
        }
        // 2. Authentication, DENY and ALLOW (CUSTOM was settled above).
        let d = match early {
            Some(d) => *d,
            None => {
                let keys = Lookup::new(&ib.jwks, &cfg);
                let settled = Custom::settled();
                let mut d =
                    cfg.engine
                        .check(&cfg.workload, &ctx, SystemTime::now(), &keys, &settled);
                // A token signed with a key the cached JWKS lacks: refetch early
                // (rate-limited), retry.
                if let Some(miss) = keys.kid_miss(&d)
                    && ib.jwks.refetch_on_kid_miss(&cfg, miss).await
                {
                    let keys = Lookup::new(&ib.jwks, &cfg);
                    d = cfg
                        .engine
                        .check(&cfg.workload, &ctx, SystemTime::now(), &keys, &settled);
                }
                d
            }
        };
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
                path = %crate::edge::loggable_path(&raw_path),
                normalized_path = %judged_path(&raw_path, &normalized),
                status = d.status,
                policy = %policy,
                rule = %rule_shown(d.rule),
                reason = %d.reason,
                "request denied"
            );
            let jwt = matches!(
                d.reason_code,
                ReasonCode::JwtInvalid | ReasonCode::JwtAudienceMismatch
            );
            let body = match d.status {
                // Envoy's fixed phrase ("Jwks remote fetch is failed", "Jwt verification
                // fails", "Audiences in Jwt are not allowed", ...): the detail after it (a
                // JWKS URI, a socket or TLS error) is for the log above, not for an
                // unauthenticated client.
                _ if jwt || d.status == 401 => d
                    .reason
                    .split_once(": ")
                    .map_or(d.reason.as_str(), |(phrase, _)| phrase)
                    .to_string(),
                400 => "Bad Request".to_string(),
                _ => "RBAC: access denied".to_string(),
            };
            let (mut r, g) = denial(d.status, grpc, &body);
            if jwt && let Some(v) = bearer_challenge(&req, mtls, &normalized) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                // The challenge is the token's: a provider's allowing answer adds no second.
                ext_response.retain(|(k, _)| k != header::WWW_AUTHENTICATE);
            }
            add_headers(&mut r, &ext_response, grpc);
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
                HeaderMutation::RemoveQueryParam { name } => {
                    normalized = rampart_authz::remove_query_param(&normalized, name);
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
            let (mut r, g) = denial(400, grpc, "Bad Request");
            add_headers(&mut r, &ext_response, grpc);
            cx.series.request(400, g, "-", start.elapsed());
            return r;
        }
    }
    // An HTTP/1.1 downstream connection's requests are serial: its own app connection
    // carries them (no pool); HTTP/2 streams are concurrent and share the pooled clients.
    let own_conn = !h2 && matches!(req.version(), Version::HTTP_10 | Version::HTTP_11);
    *req.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let sent = async {
        if own_conn {
            cx.app_conn.send(req).await.map_err(|e| e.to_string())
        } else {
            let client = if h2 { &ib.app_h2 } else { &ib.app_h1 };
            client.request(req).await.map_err(|e| e.to_string())
        }
    };
    let (mut resp, flags) = match tokio::time::timeout(ib.request_timeout, sent).await {
        Ok(Ok(mut r)) if r.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
            if ask == UpgradeAsk::WebSocket && crate::http::accepts_websocket(&r) {
                // The app took the WebSocket handshake: the connection is handed to the
                // relay once this 101 is written (`websocket`).
                *cx.upgraded.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(hyper::upgrade::on(&mut r));
                add_headers(&mut r, &ext_response, false);
                let pending = Pending::new(cx.series.clone(), start, grpc, &r, "-");
                return r.map(|b| Either::Left(Metered::new(b, pending)));
            }
            // A switch the client did not ask for, or to another protocol: its bytes would
            // pass unjudged. The app's connection is dropped with the response.
            tracing::warn!(app = cx.app.as_ref().map_or("-", |a| a.as_str()),
                upgrade = ?r.headers().get(header::UPGRADE),
                "app answered 101 to something other than a WebSocket handshake (502)");
            (
                text_response(502, "upstream protocol error: unexpected 101"),
                "UPE",
            )
        }
        Ok(Ok(mut r)) => {
            add_headers(&mut r, &ext_response, false);
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
    // Recorded as the proxy answered, before the provider's headers join it.
    Pending::new(cx.series.clone(), start, grpc, &resp, flags).finish(None, None);
    add_headers(&mut resp, &ext_response, grpc);
    resp
}

/// Whether reading a request body failed because the client's connection ended (closed
/// before the body was complete, or reset by the peer), not because the body was malformed.
/// (`ConnectionAborted` is the proxy's own close of a revoked peer: not the client leaving.)
fn client_left(e: &hyper::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        if let Some(h) = c.downcast_ref::<h2::Error>() {
            return h.is_io() || (h.is_go_away() && h.is_remote());
        }
        cause = c.source();
    }
    false
}

/// Whether an HTTP/2 request body ended because the client reset its stream (Envoy's `DR`).
fn client_reset_stream(e: &hyper::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<h2::Error>() {
            return h.is_reset() && h.is_remote();
        }
        cause = c.source();
    }
    false
}

/// Appends the headers an extension provider's allowing answer gave for the client. On the
/// proxy's own answer to a gRPC request (`local_grpc`) its `content-type`, `grpc-status` and
/// `grpc-message` are left out, as on a provider's denial: the client reads the proxy's
/// status, not a second one the provider added (grpc-go keeps the last).
fn add_headers<B>(
    r: &mut Response<B>,
    add: &[(header::HeaderName, HeaderValue)],
    local_grpc: bool,
) {
    for (k, v) in add {
        if local_grpc
            && (k == header::CONTENT_TYPE
                || k.as_str() == "grpc-status"
                || k.as_str() == "grpc-message")
        {
            continue;
        }
        r.headers_mut().append(k.clone(), v.clone());
    }
}

/// Whether `port` is STRICT in `cfg` (a port gone from the registry counts as STRICT: its
/// plaintext connections get nothing more either).
fn strict_now(cfg: &crate::config::Config, port: u16) -> bool {
    cfg.me.port(port).is_none()
        || cfg.engine.peer_authentication(&cfg.workload, port).mode == MtlsMode::Strict
}

/// Whether the configuration in force lets this TCP connection go on (at accept, and again
/// after every change: a port turned STRICT ends its plaintext connections, a policy that
/// now denies the peer ends its connections). Logs the reason when not. A CUSTOM rule that
/// matches asks its gRPC provider about the connection (Envoy's network ext_authz);
/// `provider_ok` remembers the provider that allowed it, so a later change that keeps that
/// provider does not ask again.
async fn tcp_allowed(
    ib: &Inbound,
    cx: &ConnCtx,
    established: bool,
    provider_ok: &mut Option<String>,
) -> bool {
    let cfg = ib.cfg.load_full();
    // Also at accept: the port may have turned STRICT while the sniff waited (up to 5 s for
    // a server-first protocol), after `accept` read its mode and before this task listened
    // for changes.
    if cx.principal.is_none() && strict_now(&cfg, cx.port) {
        tracing::warn!(peer = %cx.peer, port = cx.port,
            "established plaintext connection closed: the port is STRICT now");
        return false;
    }
    if cfg.fast_path {
        return true;
    }
    let ctx = cx.request_context(None);
    let custom = provider_ok
        .clone()
        .map_or_else(Custom::default, Custom::answered);
    let mut d = cfg.engine.authorize_with(&cfg.workload, &ctx, &custom);
    let mut why = None;
    if d.reason_code == ReasonCode::CustomDenied
        && let Some(name) = custom.asked()
        && let Some(Ok(provider)) = cfg.folder.mesh.provider(&name).map(|p| &p.authz)
    {
        let facts = crate::ext_authz::Facts {
            path: "",
            peer: cx.peer,
            peer_principal: cx.principal.as_deref(),
            local: cx.local,
            local_principal: cfg.my_id().to_string(),
            protocol: "",
            body: None,
            judges_body: false,
            pack_as_bytes: false,
        };
        match Box::pin(ib.ext_authz.check_connection(&cfg, &name, provider, &facts)).await {
            crate::ext_authz::Answer::Allow(changes) => {
                if let Some(why) = &changes.failed_open {
                    tracing::warn!(peer = %cx.peer, port = cx.port, "{why}; connection allowed (failOpen)");
                }
                let answered = Custom::answered(name.clone());
                d = cfg.engine.authorize_with(&cfg.workload, &ctx, &answered);
                *provider_ok = Some(name);
            }
            crate::ext_authz::Answer::Deny(denied) => why = Some(denied.reason),
        }
    }
    if d.is_allowed() {
        return true;
    }
    let policy = d
        .policy
        .as_ref()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .unwrap_or_else(|| "-".into());
    tracing::warn!(
        peer = %cx.peer,
        principal = cx.principal.as_deref().unwrap_or("-"),
        port = cx.port,
        status = d.status,
        policy = %policy,
        rule = %rule_shown(d.rule),
        reason = %why.as_deref().unwrap_or(&d.reason),
        "{} (closed)",
        if established { "established connection denied by the new policy" } else { "connection denied" },
    );
    false
}

/// A policy rule's index for the deny log, `-` when no rule decided (no ALLOW matched, or
/// no identity or token).
fn rule_shown(rule: Option<usize>) -> String {
    rule.map_or_else(|| "-".to_string(), |r| r.to_string())
}

async fn tcp<IO>(ib: &Arc<Inbound>, cx: ConnCtx, app: SocketAddr, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut changes = ib.cfg_changed.subscribe();
    let mut provider_ok = None;
    if !tcp_allowed(ib, &cx, false, &mut provider_ok).await {
        return;
    }
    ib.metrics.tcp_opened(&cx.labels);
    let (sent, received) = match TcpStream::connect(app).await {
        Ok(mut a) => {
            let _ = a.set_nodelay(true);
            // TCP ports: closed after the idle timeout with no byte either way.
            let act = Activity::new(false);
            let mut io = Tracked::new(io, act.clone());
            let relay = crate::relay::copy_bidirectional(&mut io, &mut a);
            tokio::pin!(relay);
            loop {
                tokio::select! {
                    r = &mut relay => break match r {
                        Ok((from_client, from_app)) => (from_app, from_client),
                        Err(_) => (0, 0),
                    },
                    why = act.expired(&ib.edge) => {
                        tracing::debug!(%app, reason = why, "TCP connection closed");
                        break (0, 0);
                    }
                    Ok(()) = changes.changed() => {
                        if !tcp_allowed(ib, &cx, true, &mut provider_ok).await {
                            break (0, 0);
                        }
                    }
                }
            }
        }
        Err(e) => {
            tracing::warn!(%app, error = %e, "app unreachable");
            (0, 0)
        }
    };
    ib.metrics.tcp_closed(&cx.labels, sent, received);
}

/// A denial's `normalized_path` log field: the path the rules matched, `-` when it is the
/// one the client sent (query values hidden as in `path`).
fn judged_path(raw: &str, normalized: &str) -> String {
    if raw == normalized {
        "-".to_string()
    } else {
        crate::edge::loggable_path(normalized)
    }
}

/// Envoy's `jwt_authn` challenge on a refused token: `Bearer realm="<scheme>://<host><path>",
/// error="invalid_token"`, the path (normalized, with its query) cut at 256 bytes. The scheme
/// is the request's own (HTTP/2), else `https` on an mTLS connection and `http` without.
fn bearer_challenge<B>(req: &Request<B>, mtls: bool, path: &str) -> Option<HeaderValue> {
    let scheme = req
        .uri()
        .scheme_str()
        .unwrap_or(if mtls { "https" } else { "http" });
    let mut cut = path.len().min(256);
    while !path.is_char_boundary(cut) {
        cut -= 1;
    }
    let realm = format!("{scheme}://{}{}", authority_of(req), &path[..cut]);
    // Quoted-string safe: `"`, `\` and any byte that is not visible ASCII percent-encoded,
    // so a client's path cannot add parameters to the challenge, and a non-ASCII path still
    // gets one.
    let mut quoted = String::with_capacity(realm.len());
    for b in realm.bytes() {
        if b.is_ascii_graphic() && b != b'"' && b != b'\\' {
            quoted.push(char::from(b));
        } else {
            quoted.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&format!(
        "Bearer realm=\"{quoted}\", error=\"invalid_token\""
    ))
    .ok()
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_challenge_quotes_what_the_client_wrote() {
        let req = |host: &str| {
            Request::builder()
                .uri("/x")
                .header(header::HOST, host)
                .body(())
                .unwrap()
        };
        let challenge = |r: &Request<()>, mtls, path: &str| {
            bearer_challenge(r, mtls, path)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        assert_eq!(
            challenge(&req("a.b:8080"), false, "/p?q=1"),
            r#"Bearer realm="http://a.b:8080/p?q=1", error="invalid_token""#
        );
        assert_eq!(
            challenge(&req("a.b"), true, "/p"),
            r#"Bearer realm="https://a.b/p", error="invalid_token""#
        );
        // A quote or backslash in the path cannot close the realm and add parameters; a
        // non-ASCII byte still gets a challenge.
        assert_eq!(
            challenge(&req("a.b"), false, r#"/x",error="insufficient_scope\é"#),
            r#"Bearer realm="http://a.b/x%22,error=%22insufficient_scope%5C%C3%A9", error="invalid_token""#
        );
        // The path is cut at 256 bytes, as Envoy cuts it.
        let long = format!("/{}", "a".repeat(300));
        let c = challenge(&req("h"), false, &long);
        assert!(
            c.contains(&format!("http://h/{}\"", "a".repeat(255))),
            "{c}"
        );
    }

    fn provider_headers() -> Vec<(header::HeaderName, HeaderValue)> {
        [
            ("x-checked", "yes"),
            ("grpc-status", "0"),
            ("grpc-message", "fine"),
            ("content-type", "text/plain"),
        ]
        .into_iter()
        .map(|(k, v)| {
            (
                header::HeaderName::from_static(k),
                HeaderValue::from_static(v),
            )
        })
        .collect()
    }

    /// On the proxy's own answer to a gRPC request the provider's gRPC status, message and
    /// content type are left out (one `grpc-status`, the proxy's); its other headers join.
    #[test]
    fn a_provider_cannot_add_a_grpc_status_to_a_local_grpc_reply() {
        let (mut r, _) = denial(403, true, "RBAC: access denied");
        add_headers(&mut r, &provider_headers(), true);
        let statuses: Vec<_> = r.headers().get_all("grpc-status").iter().collect();
        assert_eq!(statuses, ["7"]);
        assert_eq!(r.headers().get_all(header::CONTENT_TYPE).iter().count(), 1);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/grpc",
            "{:?}",
            r.headers()
        );
        assert!(r.headers().get("grpc-message").is_none_or(|m| m != "fine"));
        assert_eq!(r.headers()["x-checked"], "yes");
    }

    /// Its twin: an HTTP reply (or the app's answer) gets every header the provider gave.
    #[test]
    fn other_replies_get_every_provider_header() {
        let (mut r, _) = denial(403, false, "RBAC: access denied");
        add_headers(&mut r, &provider_headers(), false);
        assert_eq!(r.headers()["grpc-status"], "0");
        assert_eq!(r.headers()["x-checked"], "yes");
        assert_eq!(r.headers().get_all(header::CONTENT_TYPE).iter().count(), 2);
    }
}
