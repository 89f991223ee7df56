//! External authorization: Istio's CUSTOM action. A request that matches a CUSTOM policy's
//! rule is first shown to the mesh config's extension provider, over HTTP
//! (`envoyExtAuthzHttp`) or gRPC (`envoyExtAuthzGrpc`, Envoy's
//! `envoy.service.auth.v3.Authorization/Check`), as Envoy's ext_authz filter shows it; the
//! answer allows it (RequestAuthentication, DENY and ALLOW still apply, to the request as the
//! provider changed it), or denies it with the provider's status, headers and body. A TCP
//! connection a CUSTOM rule matches is shown to gRPC providers once, at accept (Envoy's
//! network ext_authz). A provider that cannot be asked (refused connection, timeout, a 5xx, a
//! malformed answer) denies with `statusOnError`, unless the provider is `failOpen`.
//!
//! How the provider is reached follows Istio's auto mTLS: a provider whose `service:port` is a
//! service port of the mesh registry (it has a proxy, Rampart's or an Istio sidecar) is
//! called through the mesh, to one of its endpoints' inbound listeners, with mutual TLS as
//! this proxy's identity and the endpoint's SPIFFE ID checked (plaintext only when that port's
//! PeerAuthentication is DISABLE, as for any mesh call). Anything else (loopback, an IP, a
//! host the registry does not know) is dialed directly, in plaintext, as Envoy dials a
//! provider outside the mesh: the check carries the request's credentials, so such a
//! provider belongs beside the app or on a network the operator trusts (docs/AUTHZ.md).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rampart_authz::{
    ExtAuthzBody, ExtAuthzHttp, ExtAuthzKind, ExtAuthzProvider, header_pattern_matches,
};
use rampart_certs::SpiffeId;
use rampart_proto::envoy::config::core::v3 as core;
use rampart_proto::envoy::service::auth::v3 as pb;

use crate::app::{AppBody, Replayed};
use crate::config::Config;
use crate::conn::{PeerConnector, Target};
use crate::identity::{Alpn, IdentityHolder};

/// The most of a provider's answer body that is read (HTTP) and passed to a denied client.
const MAX_ANSWER_BODY: usize = 64 * 1024;

/// Headers a provider's answer never passes to the client or the app: they describe the
/// answer's own message, not the request.
const ANSWER_ONLY: [&str; 9] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "content-length",
    "host",
];

/// Headers of a denying HTTP answer that reach the client even when
/// `headersToDownstreamOnDeny` does not list them (Envoy adds them to any list): a login
/// redirect and an authentication challenge.
const ALWAYS_ON_DENY: [&str; 2] = ["location", "www-authenticate"];

/// Which request headers always go to an HTTP provider (as Envoy's HTTP service sends them).
const ALWAYS_SENT: [&str; 3] = ["host", "authorization", "content-length"];

/// The response header in which an HTTP provider names request headers to remove.
const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

/// What the provider said.
#[derive(Debug)]
pub(crate) enum Answer {
    /// Go on (to DENY and ALLOW), with these changes.
    Allow(Changes),
    /// Answer the client with this.
    Deny(Denied),
}

/// Changes an allowing answer makes.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    /// Set on the request before it goes to the app.
    pub(crate) set: Vec<(HeaderName, HeaderValue)>,
    /// Added to the request when it has no such header.
    pub(crate) append: Vec<(HeaderName, HeaderValue)>,
    /// Set on the request only when it has such a header.
    pub(crate) replace: Vec<(HeaderName, HeaderValue)>,
    /// Joined to the first value of such a header of the request, if it has one (the
    /// deprecated `append: true`; see `join_first`).
    pub(crate) join: Vec<(HeaderName, HeaderValue)>,
    /// Removed from the request.
    pub(crate) remove: Vec<HeaderName>,
    /// Added to the app's response.
    pub(crate) response: Vec<(HeaderName, HeaderValue)>,
    /// Allowed because the provider could not be asked and is `failOpen`.
    pub(crate) failed_open: Option<String>,
}

/// A denial, as the provider shaped it.
#[derive(Debug)]
pub(crate) struct Denied {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) body: Bytes,
    /// For the log: why (the provider's answer, or why it could not be asked).
    pub(crate) reason: String,
    /// The provider did not judge: it could not be asked (and is not `failOpen`), or it
    /// cannot judge this kind of traffic. The log says so rather than "denied by".
    pub(crate) unasked: bool,
}

/// What the check tells the provider about the request besides its head.
pub(crate) struct Facts<'a> {
    /// The path and query the app will receive (normalized as the mesh config says): the
    /// provider judges the request the app gets, not the bytes the client sent.
    pub(crate) path: &'a str,
    pub(crate) peer: SocketAddr,
    pub(crate) peer_principal: Option<&'a str>,
    pub(crate) local: Option<SocketAddr>,
    pub(crate) local_principal: String,
    pub(crate) protocol: &'static str,
    /// The start of the body, for a provider that judges it (`includeRequestBodyInCheck`).
    pub(crate) body: Option<&'a HeldBody>,
    /// Whether the provider judges bodies: then the client's own `x-envoy-auth-partial-body`
    /// never reaches it, only the proxy's (or none, for a request without a body).
    pub(crate) judges_body: bool,
    /// gRPC: the body as bytes (`raw_body`), not text.
    pub(crate) pack_as_bytes: bool,
}

/// What of the request body a provider is shown.
pub(crate) struct HeldBody {
    /// At most `maxRequestBytes`.
    pub(crate) bytes: Bytes,
    /// Whether the body goes on past `bytes` (`x-envoy-auth-partial-body`).
    pub(crate) partial: bool,
}

/// The check request header that says whether the body shown is all of it (Envoy's).
const PARTIAL_BODY: &str = "x-envoy-auth-partial-body";

/// Why a body could not be held back for the provider: the client's answer instead.
pub(crate) enum NotHeld {
    /// Longer than the provider takes, and it takes no partial bodies (413).
    TooLarge,
    /// The client broke off (or sent a malformed body).
    Broken(hyper::Error),
    /// Holding it would take the proxy past its budget for held bodies (503).
    Overloaded,
}

/// A request's share of the held-body budget, grown as its body arrives.
#[derive(Default)]
struct Share(Option<tokio::sync::OwnedSemaphorePermit>);

impl Share {
    /// Take `n` more bytes of `budget`, at once or not at all.
    fn grow(&mut self, budget: &Arc<tokio::sync::Semaphore>, n: usize) -> Result<(), NotHeld> {
        if n == 0 {
            return Ok(());
        }
        let n = u32::try_from(n).map_err(|_| NotHeld::Overloaded)?;
        let more = budget
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| NotHeld::Overloaded)?;
        match &mut self.0 {
            Some(p) => p.merge(more),
            None => self.0 = Some(more),
        }
        Ok(())
    }

    fn bytes(&self) -> usize {
        self.0
            .as_ref()
            .map_or(0, tokio::sync::OwnedSemaphorePermit::num_permits)
    }
}

/// The held bytes and their share of the budget, together: the share is given back when
/// the last view of the bytes (the replayed head, the provider's copy) is dropped, that is
/// when the memory is.
struct HeldBytes {
    buf: Vec<u8>,
    _share: Share,
}

impl AsRef<[u8]> for HeldBytes {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

/// Room taken before any byte arrives: holding more costs the client the bytes themselves.
const FIRST_ROOM: usize = 16 * 1024;

/// Hold back the start of `body` for a provider that judges it, as Envoy's
/// `with_request_body` does: up to `maxRequestBytes` when partial bodies are allowed (the
/// provider then sees that much, marked partial if more follows), else all of it, refused
/// as too large past the limit (at once when `content_length` says so). Returns what the
/// provider is shown and the body to forward, every byte in order. Every byte of memory the
/// held bytes take (their allocation, not only what arrived) is taken from `budget` before
/// it is allocated; past the budget, `NotHeld::Overloaded`.
pub(crate) async fn hold_body(
    mut body: Incoming,
    content_length: Option<u64>,
    b: &ExtAuthzBody,
    budget: &Arc<tokio::sync::Semaphore>,
) -> Result<(HeldBody, AppBody), NotHeld> {
    let max = b.max_bytes as usize;
    if !b.allow_partial && content_length.is_some_and(|n| n > max as u64) {
        return Err(NotHeld::TooLarge);
    }
    // The most that will be held (the declared length, bounded by the limit) bounds each
    // allocation; the first is small and the next ones double, so that a client announcing
    // a large body holds budget only as it sends the bytes.
    let most = content_length.map_or(max.saturating_add(1), |n| {
        usize::try_from(n).unwrap_or(max).min(max.saturating_add(1))
    });
    let mut share = Share::default();
    let mut buf: Vec<u8> = Vec::new();
    let room = |buf: &mut Vec<u8>, share: &mut Share, need: usize| {
        if need <= buf.capacity() {
            return Ok(());
        }
        let cap = need
            .max(buf.capacity().saturating_mul(2).min(most))
            .max(FIRST_ROOM.min(most));
        share.grow(budget, cap.saturating_sub(share.bytes()))?;
        buf.reserve_exact(cap - buf.len());
        Ok(())
    };
    room(&mut buf, &mut share, 1)?;
    let mut trailers = None;
    let mut ended = body.is_end_stream();
    let full = |buf: &Vec<u8>| b.allow_partial && buf.len() >= max;
    while !ended && !full(&buf) {
        match body.frame().await {
            None => ended = true,
            Some(Err(e)) => return Err(NotHeld::Broken(e)),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => {
                    let need = buf.len() + d.len();
                    room(&mut buf, &mut share, need)?;
                    buf.extend_from_slice(&d);
                }
                Err(f) => {
                    trailers = f.into_trailers().ok();
                    ended = true;
                }
            },
        }
        if !b.allow_partial && buf.len() > max {
            return Err(NotHeld::TooLarge);
        }
    }
    // A body whose length was given ends with its last byte, before its end is read.
    ended = ended || body.is_end_stream();
    let head = Bytes::from_owner(HeldBytes { buf, _share: share });
    let held = HeldBody {
        bytes: head.slice(..head.len().min(max)),
        partial: !ended || head.len() > max,
    };
    let replay = Replayed {
        head,
        trailers,
        rest: (!ended).then_some(body),
    };
    Ok((held, AppBody::Replayed(Box::new(replay))))
}

/// Most mesh destinations (provider endpoints) kept with a client; past it the table starts
/// again (endpoints come and go with the registry).
const MAX_MESH_CLIENTS: usize = 256;

/// Longest wait for a provider connection (TCP, and the mTLS handshake in the mesh).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One provider endpoint in the mesh, as dialed: address, SNI, expected identity, whether
/// mTLS, and the protocol.
#[derive(Clone, PartialEq, Eq, Hash)]
struct MeshKey {
    addr: SocketAddr,
    sni: String,
    expected: SpiffeId,
    mtls: bool,
    grpc: bool,
}

/// Where one check goes.
enum Via {
    /// Straight to `service:port`, plaintext (a provider outside the mesh).
    Direct,
    /// Through the mesh to a provider endpoint's proxy.
    Mesh(MeshKey, Arc<Target>),
}

/// The clients that reach providers: for providers outside the mesh one HTTP/1.1 pool and
/// one gRPC channel per address; for providers in the mesh a client per endpoint, over the
/// proxy's own mTLS connector.
pub(crate) struct Clients {
    identity: Arc<IdentityHolder>,
    http: Client<HttpConnector, Full<Bytes>>,
    grpc: Mutex<HashMap<(String, u16), tonic::transport::Channel>>,
    mesh_http: Mutex<HashMap<MeshKey, Client<PeerConnector, Full<Bytes>>>>,
    mesh_grpc: Mutex<HashMap<MeshKey, tonic::transport::Channel>>,
    /// Turns through each provider's endpoints (by `service:port`).
    next: Mutex<HashMap<String, usize>>,
}

/// Whether `host` may name a mesh service: not an IP address, not `localhost`, and with a
/// dot (a single label would be looked up in the caller's own namespace).
fn mesh_candidate(host: &str) -> bool {
    let h = host.trim_end_matches('.');
    let bare = h.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_err() && !h.eq_ignore_ascii_case("localhost") && h.contains('.')
}

/// `host:port` as a URI authority (an IPv6 address in brackets).
fn authority(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(a)) => format!("[{a}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

impl Clients {
    /// Clients that call providers in the mesh as `identity`.
    pub(crate) fn new(identity: Arc<IdentityHolder>) -> Clients {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(Duration::from_secs(60));
        Clients {
            identity,
            http: b.build(conn),
            grpc: Mutex::new(HashMap::new()),
            mesh_http: Mutex::new(HashMap::new()),
            mesh_grpc: Mutex::new(HashMap::new()),
            next: Mutex::new(HashMap::new()),
        }
    }

    /// Ask `p` about `req` (its head; the body is not read). Never fails: a provider that
    /// cannot be asked gives `failOpen`'s answer.
    pub(crate) async fn check<B>(
        &self,
        cfg: &Config,
        name: &str,
        p: &ExtAuthzProvider,
        req: &Request<B>,
        facts: &Facts<'_>,
    ) -> Answer {
        self.ask(cfg, name, p, Some(req), facts).await
    }

    /// Ask `p` about a TCP connection (Envoy's network ext_authz: the peers, no request).
    /// Only gRPC providers can answer; an HTTP provider denies, naming why.
    pub(crate) async fn check_connection(
        &self,
        cfg: &Config,
        name: &str,
        p: &ExtAuthzProvider,
        facts: &Facts<'_>,
    ) -> Answer {
        self.ask(cfg, name, p, None::<&Request<()>>, facts).await
    }

    /// Where a check to `p` goes under `cfg`: through the mesh when `service:port` is a
    /// service port of the registry (its endpoints taken in turn), else directly. Loopback,
    /// IP addresses and single labels are never looked up in the registry: a Service named
    /// `localhost` in the caller's namespace must not receive the checks of a provider beside
    /// the app. A registry host with nothing serving the port is an error, never a plaintext
    /// call to whatever the name resolves to.
    fn via(&self, cfg: &Config, p: &ExtAuthzProvider) -> Result<Via, String> {
        let grpc = matches!(p.kind, ExtAuthzKind::Grpc);
        if !mesh_candidate(&p.host) {
            return Ok(Via::Direct);
        }
        let registry = &cfg.folder.registry;
        let hp = authority(&p.host, p.port);
        let Some(all) = registry.resolve_all(&hp, &cfg.me.namespace) else {
            if registry.names_host(&hp, &cfg.me.namespace) {
                return Err(format!(
                    "{hp} is a host of the mesh registry, but no endpoint of it serves port {} (not called outside the mesh)",
                    p.port
                ));
            }
            return Ok(Via::Direct);
        };
        let turn = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            if next.len() >= MAX_MESH_CLIENTS && !next.contains_key(&hp) {
                next.clear();
            }
            let n = next.entry(hp).or_insert(0);
            *n = n.wrapping_add(1);
            *n
        };
        let r = &all[turn % all.len()];
        let expected = r.workload.spiffe_id(&cfg.folder.trust_domain);
        let mtls = crate::outbound::originate_mtls(cfg, r.workload, r.port);
        let alpn = if grpc { Alpn::H2 } else { Alpn::Http1 };
        let target = Target::new(
            r.port.inbound,
            &r.service_host(),
            r.service_port,
            expected.clone(),
            alpn,
        )?;
        let key = MeshKey {
            addr: r.port.inbound,
            sni: format!("{}:{}", r.service_host(), r.service_port),
            expected,
            mtls,
            grpc,
        };
        Ok(Via::Mesh(key, Arc::new(target)))
    }

    async fn ask<B>(
        &self,
        cfg: &Config,
        name: &str,
        p: &ExtAuthzProvider,
        req: Option<&Request<B>>,
        facts: &Facts<'_>,
    ) -> Answer {
        let via = self.via(cfg, p);
        let shown = match &via {
            Ok(Via::Mesh(k, _)) => format!(
                "{} through the mesh, {} {}",
                authority(&p.host, p.port),
                if k.mtls { "mTLS to" } else { "plaintext to" },
                k.expected
            ),
            _ => authority(&p.host, p.port),
        };
        let asked = match (via, &p.kind, req) {
            (Err(e), _, _) => Ok(Err(e)),
            (Ok(via), ExtAuthzKind::Http(h), Some(req)) => {
                tokio::time::timeout(p.timeout, self.check_http(via, p, h, req, facts)).await
            }
            (Ok(_), ExtAuthzKind::Http(_), None) => {
                return Answer::Deny(Denied {
                    status: 403,
                    headers: Vec::new(),
                    body: Bytes::new(),
                    reason: format!(
                        "extension provider {name:?} is an HTTP provider: it cannot judge a TCP connection (Istio asks only gRPC providers about TCP)"
                    ),
                    unasked: true,
                });
            }
            (Ok(via), ExtAuthzKind::Grpc, req) => {
                tokio::time::timeout(p.timeout, self.check_grpc(via, p, req, facts)).await
            }
        };
        let failure = match asked {
            Ok(Ok(answer)) => return answer,
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {:?}", p.timeout),
        };
        let why = format!("extension provider {name:?} ({shown}) could not be asked: {failure}");
        if p.fail_open {
            Answer::Allow(Changes {
                failed_open: Some(why),
                ..Changes::default()
            })
        } else {
            Answer::Deny(Denied {
                status: p.status_on_error,
                headers: Vec::new(),
                body: Bytes::new(),
                reason: why,
                unasked: true,
            })
        }
    }

    async fn check_http<B>(
        &self,
        via: Via,
        p: &ExtAuthzProvider,
        h: &ExtAuthzHttp,
        req: &Request<B>,
        facts: &Facts<'_>,
    ) -> Result<Answer, String> {
        let target = facts.path;
        let uri: Uri = format!(
            "http://{}{}{target}",
            authority(&p.host, p.port),
            h.path_prefix
        )
        .parse()
        .map_err(|e| format!("check URI: {e}"))?;
        let body = facts.body.map(|h| h.bytes.clone()).unwrap_or_default();
        let length = HeaderValue::from(body.len());
        let mut check = Request::new(Full::new(body));
        *check.method_mut() = req.method().clone();
        *check.uri_mut() = uri;
        let heads = check.headers_mut();
        // Repeated headers go as one, joined as Envoy joins them (`,`; cookies with `; `):
        // a provider reading the first copy and an app reading the last must not disagree.
        for k in req.headers().keys() {
            if k == header::CONTENT_LENGTH
                || (facts.judges_body && k.as_str() == PARTIAL_BODY)
                || !(ALWAYS_SENT.contains(&k.as_str())
                    || header_pattern_matches(&h.request_headers, k.as_str()))
            {
                continue;
            }
            if let Ok(v) = HeaderValue::from_bytes(joined(req.headers(), k).as_bytes()) {
                heads.insert(k.clone(), v);
            }
        }
        heads.insert(header::CONTENT_LENGTH, length);
        if let Some(held) = facts.body {
            heads.insert(
                PARTIAL_BODY,
                HeaderValue::from_static(if held.partial { "true" } else { "false" }),
            );
        }
        for (k, v) in &h.additional_headers {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v)) {
                heads.insert(k, v);
            }
        }
        let resp = match via {
            Via::Direct => self.http.request(check).await,
            Via::Mesh(key, target) => self.mesh_http(key, target).request(check).await,
        }
        .map_err(|e| crate::outbound::error_chain(&e))?;
        let (parts, body) = resp.into_parts();
        let status = parts.status.as_u16();
        // As Envoy's HTTP client: a 5xx is the provider failing, not a verdict (its page may
        // carry internals, and failOpen decides), and so is a status no client can be given.
        if !(200..500).contains(&status) {
            return Err(format!("the provider answered {status}"));
        }
        if status == 200 {
            let pick = |patterns: &[String]| -> Vec<(HeaderName, HeaderValue)> {
                parts
                    .headers
                    .iter()
                    .filter(|(k, _)| {
                        !ANSWER_ONLY.contains(&k.as_str())
                            && header_pattern_matches(patterns, k.as_str())
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            };
            let remove = parts
                .headers
                .get_all(HEADERS_TO_REMOVE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|n| HeaderName::try_from(n.trim()).ok())
                .filter(|n| !ANSWER_ONLY.contains(&n.as_str()))
                .collect();
            // The body of an allowing answer is not read: nothing of it is used.
            return Ok(Answer::Allow(Changes {
                set: pick(&h.upstream_on_allow),
                remove,
                response: pick(&h.downstream_on_allow),
                ..Changes::default()
            }));
        }
        // A denial: the verdict is the status; its body is passed on as far as it could be
        // read, up to MAX_ANSWER_BODY (a long or broken page does not undo the denial).
        let body = read_some(body, MAX_ANSWER_BODY).await;
        let headers = parts
            .headers
            .iter()
            .filter(|(k, _)| {
                !ANSWER_ONLY.contains(&k.as_str())
                    && k.as_str() != HEADERS_TO_REMOVE
                    && (h.downstream_on_deny.is_empty()
                        || ALWAYS_ON_DENY.contains(&k.as_str())
                        || header_pattern_matches(&h.downstream_on_deny, k.as_str()))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Answer::Deny(Denied {
            status,
            headers,
            body,
            reason: format!("the provider answered {status}"),
            unasked: false,
        }))
    }

    /// The HTTP client of one provider endpoint in the mesh.
    fn mesh_http(&self, key: MeshKey, target: Arc<Target>) -> Client<PeerConnector, Full<Bytes>> {
        let mut map = self.mesh_http.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&key) {
            return c.clone();
        }
        if map.len() >= MAX_MESH_CLIENTS {
            map.clear();
        }
        let connector = PeerConnector {
            identity: self.identity.clone(),
            target,
            mtls: key.mtls,
            connect_timeout: Some(CONNECT_TIMEOUT),
        };
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(Duration::from_secs(60));
        let c = b.build(connector);
        map.insert(key, c.clone());
        c
    }

    fn channel(&self, via: Via, p: &ExtAuthzProvider) -> Result<tonic::transport::Channel, String> {
        let endpoint = || {
            tonic::transport::Endpoint::from_shared(format!(
                "http://{}",
                authority(&p.host, p.port)
            ))
            .map(|e| e.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true))
            .map_err(|e| e.to_string())
        };
        match via {
            Via::Direct => {
                let mut map = self.grpc.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(c) = map.get(&(p.host.clone(), p.port)) {
                    return Ok(c.clone());
                }
                let c = endpoint()?.connect_lazy();
                map.insert((p.host.clone(), p.port), c.clone());
                Ok(c)
            }
            Via::Mesh(key, target) => {
                let mut map = self.mesh_grpc.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(c) = map.get(&key) {
                    return Ok(c.clone());
                }
                if map.len() >= MAX_MESH_CLIENTS {
                    map.clear();
                }
                let c = endpoint()?.connect_with_connector_lazy(PeerConnector {
                    identity: self.identity.clone(),
                    target,
                    mtls: key.mtls,
                    connect_timeout: Some(CONNECT_TIMEOUT),
                });
                map.insert(key, c.clone());
                Ok(c)
            }
        }
    }

    async fn check_grpc<B>(
        &self,
        via: Via,
        p: &ExtAuthzProvider,
        req: Option<&Request<B>>,
        facts: &Facts<'_>,
    ) -> Result<Answer, String> {
        let mut client = pb::authorization_client::AuthorizationClient::new(self.channel(via, p)?);
        let resp = client.check(check_request(req, facts)).await.map_err(|s| {
            let cause = std::error::Error::source(&s)
                .map(|e| format!(" ({})", crate::outbound::error_chain(e)))
                .unwrap_or_default();
            format!("gRPC {:?}: {}{cause}", s.code(), s.message())
        })?;
        Ok(grpc_answer(resp.into_inner()))
    }
}

/// Every value of `name` in `headers`, joined as one (`; ` for cookies, `,` otherwise).
fn joined(headers: &HeaderMap, name: &HeaderName) -> String {
    let sep = if name == header::COOKIE { "; " } else { "," };
    headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
        .collect::<Vec<_>>()
        .join(sep)
}

/// Up to `max` bytes of `body`: what arrived before it ended, failed or reached `max`.
async fn read_some(mut body: hyper::body::Incoming, max: usize) -> Bytes {
    let mut out = bytes::BytesMut::new();
    while out.len() < max {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    let room = max - out.len();
                    out.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            _ => break,
        }
    }
    out.freeze()
}

fn socket(a: SocketAddr) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            protocol: 0,
            address: a.ip().to_canonical().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                a.port(),
            ))),
        })),
    }
}

/// The `CheckRequest` Envoy would send for this request head (HTTP), or for a connection
/// (`None`: TCP, the peers only).
pub(crate) fn check_request<B>(req: Option<&Request<B>>, facts: &Facts<'_>) -> pb::CheckRequest {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    pb::CheckRequest {
        attributes: Some(pb::AttributeContext {
            source: Some(pb::attribute_context::Peer {
                address: Some(socket(facts.peer)),
                principal: facts.peer_principal.unwrap_or_default().to_string(),
                ..Default::default()
            }),
            destination: Some(pb::attribute_context::Peer {
                address: facts.local.map(socket),
                principal: facts.local_principal.clone(),
                ..Default::default()
            }),
            request: Some(pb::attribute_context::Request {
                time: Some(prost_types::Timestamp {
                    seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
                }),
                http: req.map(|r| http_attributes(r, facts)),
            }),
            context_extensions: HashMap::new(),
        }),
    }
}

fn http_attributes<B>(req: &Request<B>, facts: &Facts<'_>) -> pb::attribute_context::HttpRequest {
    let mut headers: HashMap<String, String> = HashMap::new();
    for k in req.headers().keys() {
        // Host travels as `:authority`, as in Envoy's map (it keeps HTTP/1.1's Host there).
        if k != header::HOST {
            headers.insert(k.as_str().to_string(), joined(req.headers(), k));
        }
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_string();
    // As Envoy's HTTP/2 requests carry them: pseudo-headers in the map too.
    headers.insert(":method".into(), req.method().as_str().to_string());
    headers.insert(":path".into(), facts.path.to_string());
    headers.insert(":authority".into(), host.clone());
    headers.insert(":scheme".into(), "http".into());
    let size = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<i64>().ok())
        .unwrap_or(
            if req.method() == Method::GET || req.method() == Method::HEAD {
                0
            } else {
                -1
            },
        );
    let (mut body, mut raw_body) = (String::new(), Vec::new());
    if facts.judges_body {
        headers.remove(PARTIAL_BODY);
    }
    if let Some(held) = facts.body {
        let mut partial = held.partial;
        if facts.pack_as_bytes {
            raw_body = held.bytes.to_vec();
        } else {
            // A string field: bytes that are not UTF-8 are replaced (packAsBytes sends them
            // as they are). A replacement is 3 bytes: the text is cut back to the size of the
            // bytes it came from (at a character), and then marked partial, so a body of
            // invalid bytes cannot triple the check past what the provider accepts.
            body = String::from_utf8_lossy(&held.bytes).into_owned();
            if body.len() > held.bytes.len() {
                let mut cut = held.bytes.len();
                while !body.is_char_boundary(cut) {
                    cut -= 1;
                }
                body.truncate(cut);
                partial = true;
            }
        }
        headers.insert(PARTIAL_BODY.into(), partial.to_string());
    }
    pb::attribute_context::HttpRequest {
        id: req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        method: req.method().as_str().to_string(),
        path: facts.path.to_string(),
        host,
        scheme: "http".into(),
        size,
        protocol: facts.protocol.into(),
        headers,
        body,
        raw_body,
        ..Default::default()
    }
}

fn header_pair(o: &core::HeaderValueOption) -> Option<(HeaderName, HeaderValue)> {
    let h = o.header.as_ref()?;
    let v = if h.raw_value.is_empty() {
        HeaderValue::try_from(h.value.as_str()).ok()?
    } else {
        HeaderValue::from_bytes(&h.raw_value).ok()?
    };
    let k = HeaderName::try_from(h.key.as_str()).ok()?;
    (!ANSWER_ONLY.contains(&k.as_str())).then_some((k, v))
}

/// What a `CheckResponse` means.
pub(crate) fn grpc_answer(resp: pb::CheckResponse) -> Answer {
    let code = resp.status.as_ref().map_or(0, |s| s.code);
    if code == 0 {
        let mut c = Changes::default();
        if let Some(pb::check_response::HttpResponse::OkResponse(ok)) = resp.http_response {
            for o in &ok.headers {
                if let Some(pair) = header_pair(o) {
                    // The deprecated `append`, when present, decides (as in Envoy): true
                    // joins the value to an existing one, false replaces it. Without it, 0
                    // (APPEND_IF_EXISTS_OR_ADD, also what a sender that knows neither field
                    // leaves) sets the header, as Envoy does for this message.
                    match (o.append, o.append_action) {
                        (Some(true), _) => c.join.push(pair),
                        (Some(false), _) => c.set.push(pair),
                        (None, 1) => c.append.push(pair), // add only if absent: see `apply`
                        (None, 3) => c.replace.push(pair), // overwrite only if present
                        (None, _) => c.set.push(pair),
                    }
                }
            }
            c.remove = ok
                .headers_to_remove
                .iter()
                .filter_map(|n| HeaderName::try_from(n.as_str()).ok())
                .filter(|n| !ANSWER_ONLY.contains(&n.as_str()))
                .collect();
            c.response = ok
                .response_headers_to_add
                .iter()
                .filter_map(header_pair)
                .collect();
        }
        return Answer::Allow(c);
    }
    let (status, headers, body) = match resp.http_response {
        Some(pb::check_response::HttpResponse::DeniedResponse(d)) => (
            d.status
                .map(|s| s.code)
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| (200..=599).contains(c))
                .unwrap_or(403),
            d.headers.iter().filter_map(header_pair).collect(),
            Bytes::from(d.body),
        ),
        _ => (403, Vec::new(), Bytes::new()),
    };
    Answer::Deny(Denied {
        status,
        headers,
        body,
        reason: format!(
            "the provider answered gRPC code {code}{}",
            resp.status
                .as_ref()
                .filter(|s| !s.message.is_empty())
                .map(|s| format!(" ({})", s.message))
                .unwrap_or_default()
        ),
        unasked: false,
    })
}

impl Changes {
    /// Apply an allowing answer's changes to the request headers. Removals come last, as in
    /// Envoy: a header an answer both sets and removes does not reach the app.
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        for (k, v) in &self.set {
            headers.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.append {
            if !headers.contains_key(k) {
                headers.insert(k.clone(), v.clone());
            }
        }
        for (k, v) in &self.replace {
            if headers.contains_key(k) {
                headers.insert(k.clone(), v.clone());
            }
        }
        for (k, v) in &self.join {
            join_first(headers, k, v);
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

/// Envoy's append to a request header (the deprecated `append: true`): `v` joined to the
/// first value of `k` (`; ` for cookies, `,` otherwise), the other values kept; nothing for an
/// empty `v`, and nothing when the request has no `k` (Envoy appends only to a header that is
/// there).
fn join_first(headers: &mut HeaderMap, k: &HeaderName, v: &HeaderValue) {
    if v.is_empty() {
        return;
    }
    let mut all: Vec<HeaderValue> = headers.get_all(k).iter().cloned().collect();
    let Some(first) = all.first_mut() else {
        return;
    };
    let sep: &[u8] = if k == header::COOKIE { b"; " } else { b"," };
    let mut b = first.as_bytes().to_vec();
    b.extend_from_slice(sep);
    b.extend_from_slice(v.as_bytes());
    // Both parts are valid header values, so their join is one.
    if let Ok(joined) = HeaderValue::from_bytes(&b) {
        *first = joined;
    }
    headers.remove(k);
    for value in all {
        headers.append(k.clone(), value);
    }
}

/// See `crate::fuzzing::ext_authz_answer`.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_answer(data: &[u8]) -> Option<bool> {
    use prost::Message as _;
    let resp = pb::CheckResponse::decode(data).ok()?;
    Some(match grpc_answer(resp) {
        Answer::Allow(c) => {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("app"));
            h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
            c.apply(&mut h);
            assert_eq!(h.get(header::HOST).map(|v| v.as_bytes()), Some(&b"app"[..]));
            for (k, _) in c
                .set
                .iter()
                .chain(&c.append)
                .chain(&c.replace)
                .chain(&c.join)
                .chain(&c.response)
            {
                assert!(!ANSWER_ONLY.contains(&k.as_str()), "{k} passed");
            }
            true
        }
        Answer::Deny(d) => {
            assert!((200..=599).contains(&d.status), "status {}", d.status);
            assert!(
                d.headers
                    .iter()
                    .all(|(k, _)| !ANSWER_ONLY.contains(&k.as_str()))
            );
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hvo(k: &str, v: &str, action: i32) -> core::HeaderValueOption {
        core::HeaderValueOption {
            header: Some(core::HeaderValue {
                key: k.into(),
                value: v.into(),
                raw_value: Vec::new(),
            }),
            append: None,
            append_action: action,
            keep_empty_value: false,
        }
    }

    #[test]
    fn only_dotted_names_are_looked_up_in_the_registry() {
        for h in ["authz.authz.svc.cluster.local", "opa.opa", "opa.opa."] {
            assert!(mesh_candidate(h), "{h}");
        }
        for h in [
            "localhost",
            "LOCALHOST.",
            "127.0.0.1",
            "::1",
            "[::1]",
            "opa",
            "10.0.0.1",
        ] {
            assert!(!mesh_candidate(h), "{h}");
        }
    }

    #[test]
    fn the_deprecated_append_field_decides_when_present() {
        let with = |k: &str, v: &str, append: bool| core::HeaderValueOption {
            append: Some(append),
            // Ignored beside `append`, as in Envoy.
            append_action: 1,
            ..hvo(k, v, 0)
        };
        let ok = pb::CheckResponse {
            status: Some(rampart_proto::google::rpc::Status::default()),
            http_response: Some(pb::check_response::HttpResponse::OkResponse(
                pb::OkHttpResponse {
                    headers: vec![
                        with("x-list", "two", true),
                        with("x-new", "one", true),
                        with("x-keep", "provider", false),
                    ],
                    ..Default::default()
                },
            )),
        };
        let Answer::Allow(c) = grpc_answer(ok) else {
            panic!("allowed")
        };
        let mut h = HeaderMap::new();
        h.insert("x-list", HeaderValue::from_static("one"));
        h.insert("x-keep", HeaderValue::from_static("client"));
        c.apply(&mut h);
        assert_eq!(h["x-list"], "one,two");
        assert!(
            h.get("x-new").is_none(),
            "appends only to a header that is there"
        );
        assert_eq!(h["x-keep"], "provider");
        assert_eq!(h.get_all("x-list").iter().count(), 1);
        // Only the first of repeated values is joined; a cookie with `; `; empty: nothing.
        let mut h = HeaderMap::new();
        h.append("x-list", HeaderValue::from_static("one"));
        h.append("x-list", HeaderValue::from_static("1b"));
        h.insert("cookie", HeaderValue::from_static("a=1"));
        h.insert("x-e", HeaderValue::from_static("v"));
        let c = Changes {
            join: vec![
                (
                    HeaderName::from_static("x-list"),
                    HeaderValue::from_static("two"),
                ),
                (
                    HeaderName::from_static("cookie"),
                    HeaderValue::from_static("c=3"),
                ),
                (HeaderName::from_static("x-e"), HeaderValue::from_static("")),
            ],
            ..Changes::default()
        };
        c.apply(&mut h);
        let list: Vec<_> = h.get_all("x-list").iter().collect();
        assert_eq!(list, ["one,two", "1b"]);
        assert_eq!(h["cookie"], "a=1; c=3");
        assert_eq!(h["x-e"], "v");
    }

    #[test]
    fn a_grpc_ok_sets_and_removes_headers_and_a_denial_keeps_its_status() {
        let ok = pb::CheckResponse {
            status: Some(rampart_proto::google::rpc::Status::default()),
            http_response: Some(pb::check_response::HttpResponse::OkResponse(
                pb::OkHttpResponse {
                    headers: vec![
                        hvo("x-user", "alice", 0),
                        hvo("x-tier", "gold", 1),
                        hvo("x-only-if-there", "v", 3),
                        hvo("x-role", "user", 3),
                    ],
                    headers_to_remove: vec!["authorization".into(), "host".into()],
                    response_headers_to_add: vec![hvo("x-checked", "1", 0)],
                },
            )),
        };
        let Answer::Allow(c) = grpc_answer(ok) else {
            panic!("allowed")
        };
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("mallory"));
        h.insert("x-tier", HeaderValue::from_static("silver"));
        h.insert("authorization", HeaderValue::from_static("Bearer t"));
        h.insert("host", HeaderValue::from_static("app"));
        h.insert("x-role", HeaderValue::from_static("admin"));
        c.apply(&mut h);
        assert_eq!(h["x-role"], "user", "overwrite-if-present replaces");
        assert!(h.get("x-only-if-there").is_none(), "and adds nothing");
        assert_eq!(h["x-user"], "alice");
        assert_eq!(
            h["x-tier"], "silver",
            "add-if-absent keeps the request's value"
        );
        assert!(h.get("authorization").is_none());
        assert_eq!(h["host"], "app", "Host is never removed");
        assert_eq!(c.response.len(), 1);

        let denied = pb::CheckResponse {
            status: Some(rampart_proto::google::rpc::Status {
                code: 7,
                message: "no".into(),
                details: Vec::new(),
            }),
            http_response: Some(pb::check_response::HttpResponse::DeniedResponse(
                pb::DeniedHttpResponse {
                    status: Some(pb::HttpStatus { code: 418 }),
                    headers: vec![hvo("x-why", "teapot", 0), hvo("content-length", "99", 0)],
                    body: "short and stout".into(),
                },
            )),
        };
        let Answer::Deny(d) = grpc_answer(denied) else {
            panic!("denied")
        };
        assert_eq!(d.status, 418);
        assert_eq!(d.headers.len(), 1, "content-length is the answer's own");
        assert_eq!(&d.body[..], b"short and stout");
        // No code at all in a denial: 403. A non-OK status with no HTTP part: 403.
        let bare = pb::CheckResponse {
            status: Some(rampart_proto::google::rpc::Status {
                code: 16,
                ..Default::default()
            }),
            http_response: None,
        };
        let Answer::Deny(d) = grpc_answer(bare) else {
            panic!("denied")
        };
        assert_eq!(d.status, 403);
    }

    #[test]
    fn the_check_request_carries_the_peer_identity_and_the_request_head() {
        let req = Request::builder()
            .method("POST")
            .uri("/orders?id=1")
            .header("host", "shop.api")
            .header("x-a", "1")
            .header("x-a", "2")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("content-length", "12")
            .body(())
            .unwrap();
        let facts = Facts {
            path: "/orders?id=1",
            peer: "10.0.0.7:5000".parse().unwrap(),
            peer_principal: Some("spiffe://cluster.local/ns/web/sa/frontend"),
            local: Some("10.0.0.9:8080".parse().unwrap()),
            local_principal: "spiffe://cluster.local/ns/api/sa/shop".into(),
            protocol: "HTTP/1.1",
            body: None,
            judges_body: false,
            pack_as_bytes: false,
        };
        let c = check_request(Some(&req), &facts);
        let a = c.attributes.unwrap();
        assert_eq!(
            a.source.as_ref().unwrap().principal,
            "spiffe://cluster.local/ns/web/sa/frontend"
        );
        let http = a.request.unwrap().http.unwrap();
        assert_eq!(http.method, "POST");
        assert_eq!(http.path, "/orders?id=1");
        assert_eq!(http.host, "shop.api");
        assert_eq!(http.size, 12);
        assert_eq!(http.headers["x-a"], "1,2");
        assert_eq!(http.headers["cookie"], "a=1; b=2");
        assert_eq!(http.headers[":path"], "/orders?id=1");
        assert_eq!(http.headers[":authority"], "shop.api");
        assert!(!http.headers.contains_key("host"));
        assert!(http.body.is_empty() && http.raw_body.is_empty());
        assert!(
            !http.headers.contains_key(PARTIAL_BODY),
            "no body held, no mark"
        );

        // A held body: as text (bytes that are not UTF-8 replaced), or as bytes.
        let held = HeldBody {
            bytes: Bytes::from_static(b"{\"a\":1}\xff"),
            partial: true,
        };
        let mut facts = Facts {
            body: Some(&held),
            ..facts
        };
        let http = http_attributes(&req, &facts);
        // (`\xff` becomes U+FFFD, 3 bytes, cut back to the 8 bytes held.)
        assert_eq!(http.body, "{\"a\":1}");
        assert!(http.raw_body.is_empty());
        assert_eq!(http.headers[PARTIAL_BODY], "true");
        facts.pack_as_bytes = true;
        let http = http_attributes(&req, &facts);
        assert_eq!(http.raw_body, b"{\"a\":1}\xff");
        assert!(http.body.is_empty());

        // Invalid bytes as text never grow the check past the bytes held; the cut is marked.
        let held = HeldBody {
            bytes: Bytes::from(vec![0xff; 1000]),
            partial: false,
        };
        let facts = Facts {
            body: Some(&held),
            pack_as_bytes: false,
            ..facts
        };
        let http = http_attributes(&req, &facts);
        assert!(http.body.len() <= 1000 && !http.body.is_empty());
        assert_eq!(http.headers[PARTIAL_BODY], "true");

        // The client's own mark never reaches a provider that judges bodies.
        let forged = Request::builder()
            .uri("/")
            .header(PARTIAL_BODY, "false")
            .body(())
            .unwrap();
        let facts = Facts {
            body: None,
            judges_body: true,
            ..facts
        };
        assert!(
            !http_attributes(&forged, &facts)
                .headers
                .contains_key(PARTIAL_BODY)
        );
    }
}
