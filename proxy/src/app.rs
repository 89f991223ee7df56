//! The app connection of one downstream HTTP/1.1 connection (inbound side).
//!
//! Requests on an HTTP/1.1 connection are serial, so the inbound side forwards each
//! downstream HTTP/1.1 connection's requests over one app connection of its own (what a
//! sidecar does): opened on the first request, reused while it is open and ready, opened
//! again when the app closed it, and closed when the downstream connection ends (the sender
//! is dropped with the connection's context). This replaces hyper_util's pooled client on
//! that path, whose pool-key hashing and per-request moves cost about 7–8% of the backend
//! proxy's instructions (docs/PERFORMANCE.md, issue #15). HTTP/2 downstream connections,
//! whose streams are concurrent, keep the pooled client.
//!
//! Behaviour kept from the pooled client: `Host` set from the target when the request has
//! none, origin-form request targets, `TCP_NODELAY`, the header buffer bound of the edge,
//! a request that never left (the app closed an idle connection under it) sent again on a
//! fresh connection, and no reuse of a connection idle for longer than the pool's idle
//! timeout.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Parts, Uri};
use http::{HeaderMap, HeaderValue, Request, Response, header};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::edge::EdgeLimits;

/// An idle app connection is not reused after this long (as the pooled client's
/// `pool_idle_timeout`): an app closing idle connections after a minute or more (nginx:
/// 75 s) does not race a request on a connection it is closing.
pub(crate) const APP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A request body on its way to the app: as the client sends it, or with its first bytes
/// already read (for an extension provider that judges the body) and given back first.
pub(crate) enum AppBody {
    /// Read from the client as the app reads it.
    Streamed(Incoming),
    /// Partly or wholly read already.
    Replayed(Box<Replayed>),
}

/// A body whose first bytes (and, when it ended, its trailers) were read before the app
/// asked for them.
#[derive(Default)]
pub(crate) struct Replayed {
    pub(crate) head: Bytes,
    pub(crate) trailers: Option<HeaderMap>,
    /// The rest, still with the client (`None`: the body ended within `head`).
    pub(crate) rest: Option<Incoming>,
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            AppBody::Streamed(b) => Pin::new(b).poll_frame(cx),
            AppBody::Replayed(r) => {
                if !r.head.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut r.head)))));
                }
                if let Some(rest) = r.rest.as_mut() {
                    match ready!(Pin::new(rest).poll_frame(cx)) {
                        Some(f) => return Poll::Ready(Some(f)),
                        None => r.rest = None,
                    }
                }
                Poll::Ready(r.trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AppBody::Streamed(b) => b.is_end_stream(),
            AppBody::Replayed(r) => {
                r.head.is_empty()
                    && r.trailers.is_none()
                    && r.rest.as_ref().is_none_or(Body::is_end_stream)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AppBody::Streamed(b) => b.size_hint(),
            AppBody::Replayed(r) => {
                let head = r.head.len() as u64;
                let rest = r
                    .rest
                    .as_ref()
                    .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
                let mut h = SizeHint::new();
                h.set_lower(head + rest.lower());
                if let Some(u) = rest.upper() {
                    h.set_upper(head + u);
                }
                h
            }
        }
    }
}

/// Why a request did not reach the app or got no response head.
#[derive(Debug)]
pub(crate) enum AppError {
    Connect(std::io::Error),
    Http(hyper::Error),
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppError::Connect(e) => write!(f, "connect: {e}"),
            AppError::Http(e) => write!(f, "{e}"),
        }
    }
}

/// A sender kept between requests, and when it was last given a request.
struct Idle {
    tx: http1::SendRequest<AppBody>,
    since: Instant,
}

/// One downstream connection's app connection (none until its first request).
pub(crate) struct AppConn {
    app: SocketAddr,
    max_buf_size: usize,
    /// The sender while no request uses it; taken for each request and put back when its
    /// response head came (a request cancelled or failed drops it, and with it the app
    /// connection once that has nothing left in flight).
    idle: Mutex<Option<Idle>>,
}

impl AppConn {
    pub(crate) fn new(app: SocketAddr, edge: &EdgeLimits) -> AppConn {
        AppConn {
            app,
            max_buf_size: edge.max_header_bytes.max(8192),
            idle: Mutex::new(None),
        }
    }

    /// The idle sender, taken out for one request (on HTTP/1.1 no other request can be
    /// using it: requests on one connection are serial).
    fn take(&self) -> Option<Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn put(&self, tx: http1::SendRequest<AppBody>) {
        *self.idle.lock().unwrap_or_else(|e| e.into_inner()) = Some(Idle {
            tx,
            since: Instant::now(),
        });
    }

    /// Close the idle app connection, if any (its downstream connection is parked: no
    /// request in flight). The next request opens a new one.
    pub(crate) fn release(&self) {
        drop(self.take());
    }

    /// Send `req` (absolute-form target naming the app) to the app; its response head.
    pub(crate) async fn send(
        &self,
        mut req: Request<AppBody>,
    ) -> Result<Response<Incoming>, AppError> {
        prepare(&mut req);
        let mut idle = self.take();
        loop {
            let reusable = idle
                .take()
                .filter(|i| i.since.elapsed() < APP_IDLE_TIMEOUT && !i.tx.is_closed());
            let (mut tx, reused) = match reusable {
                Some(mut i) => match i.tx.ready().await {
                    Ok(()) => (i.tx, true),
                    Err(_) => (self.open().await?, false),
                },
                None => (self.open().await?, false),
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    self.put(tx);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the app closed the reused connection under it. Once
                    // more on a fresh one (a fresh connection's failure is final).
                    Some(r) if reused => {
                        tracing::debug!(error = %e.error(), "app connection closed before the request; reconnecting");
                        req = r;
                    }
                    _ => return Err(AppError::Http(e.into_error())),
                },
            }
        }
    }

    /// A new connection to the app, its dispatcher running on its own task until the
    /// sender is dropped and nothing is left in flight, or the app closes it.
    async fn open(&self) -> Result<http1::SendRequest<AppBody>, AppError> {
        let tcp = TcpStream::connect(self.app)
            .await
            .map_err(AppError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let (mut tx, conn) = http1::Builder::new()
            .max_buf_size(self.max_buf_size)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(AppError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "app connection error");
            }
        });
        tx.ready().await.map_err(AppError::Http)?;
        Ok(tx)
    }
}

/// The request as the pooled client wrote it to an HTTP/1.1 app: `Host` from the target
/// when missing, then an origin-form target.
fn prepare<B>(req: &mut Request<B>) {
    if !req.headers().contains_key(header::HOST)
        && let Some(host) = req.uri().host()
    {
        let port = req.uri().port_u16().filter(|p| *p != 80);
        let v = match port {
            Some(p) => HeaderValue::from_str(&format!("{host}:{p}")),
            None => HeaderValue::from_str(host),
        };
        if let Ok(v) = v {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let mut parts = Parts::default();
    parts.path_and_query = req
        .uri()
        .path_and_query()
        .filter(|p| p.as_str() != "/")
        .cloned();
    *req.uri_mut() = match parts.path_and_query {
        Some(_) => Uri::from_parts(parts).unwrap_or_default(),
        None => Uri::default(),
    };
}
