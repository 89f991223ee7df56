//! Serving HTTP connections (inbound and the outbound HTTP proxy alike): the edge's timers
//! and limits, drain on the connection's signal, the request span, and the responses the
//! proxy writes itself (denials as Envoy writes them, gateway errors).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::drain::Drain;
use crate::edge::{Activity, EdgeLimits, H2_PREFACE_START, Tracked, TrackedService};
use crate::metrics::Metered;

/// A response body: the app's or peer's (metered), or one the proxy wrote.
pub(crate) type Body = Either<Metered<Incoming>, Full<Bytes>>;

/// Serve one HTTP connection (HTTP/1.1 or h2, sniffed) until it ends, its edge timer
/// expires, or drain asks it to finish (then the request in flight completes first).
/// `upgrades`: allow `CONNECT`/upgrades (the outbound HTTP proxy).
pub(crate) async fn serve<IO, S>(edge: &EdgeLimits, drain: &Drain, io: IO, svc: S, upgrades: bool)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let act = Activity::new(true);
    let builder = edge.server();
    let io = TokioIo::new(Tracked::new(io, act.clone()));
    let svc = TrackedService::new(svc, act.clone());
    if upgrades {
        drive(
            builder.serve_connection_with_upgrades(io, svc),
            &act,
            edge,
            drain,
        )
        .await;
    } else {
        drive(builder.serve_connection(io, svc), &act, edge, drain).await;
    }
}

async fn drive<C>(conn: C, act: &Activity, edge: &EdgeLimits, drain: &Drain)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(conn);
    let mut stop = drain.conn_signal();
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
        why = act.expired(edge) => {
            if why == crate::edge::RESET_FLOOD {
                tracing::warn!(reason = why, "HTTP/2 connection closed");
            } else {
                tracing::debug!(reason = why, "HTTP connection closed");
            }
            return;
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
        }
    }
    let _ = conn.await;
}

// === upgrades ===

/// What a request's `Upgrade` header asks for, as Istio's sidecars (Envoy with a
/// `websocket` upgrade config) treat it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum UpgradeAsk {
    /// No `Upgrade` header (HTTP/2 carries none).
    None,
    /// A WebSocket handshake: HTTP/1.1, `Connection: upgrade` and one `Upgrade` header
    /// whose whole value is `websocket` (as Envoy compares it).
    WebSocket,
    /// `Upgrade` without `Connection: upgrade`, or `h2c`: not an upgrade; the header (and
    /// `HTTP2-Settings`, and for `h2c` the `Connection` header naming them) is removed and the
    /// request served as the HTTP/1.1 request it also is, as Envoy does.
    Strip,
    /// Any other upgrade, `websocket, h2c` included (Envoy answers 403).
    Other,
}

impl UpgradeAsk {
    /// Remove what [`UpgradeAsk::Strip`] removes (the app must never be asked to switch).
    pub(crate) fn strip<B>(req: &mut Request<B>) {
        let h = req.headers_mut();
        h.remove(header::UPGRADE);
        h.remove(&HTTP2_SETTINGS);
        let names_them = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                let t = t.trim();
                t.eq_ignore_ascii_case("upgrade") || t.eq_ignore_ascii_case("http2-settings")
            });
        if names_them {
            h.remove(header::CONNECTION);
        }
    }
}

static HTTP2_SETTINGS: header::HeaderName = header::HeaderName::from_static("http2-settings");

pub(crate) fn upgrade_ask<B>(req: &Request<B>) -> UpgradeAsk {
    let mut ups = req.headers().get_all(header::UPGRADE).iter();
    let Some(proto) = ups.next() else {
        return if req.headers().contains_key(&HTTP2_SETTINGS) {
            UpgradeAsk::Strip
        } else {
            UpgradeAsk::None
        };
    };
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if req.version() != http::Version::HTTP_11 || !asks {
        return UpgradeAsk::Strip;
    }
    if ups.next().is_some() {
        return UpgradeAsk::Other;
    }
    let v = proto.to_str().unwrap_or_default().trim();
    if v.eq_ignore_ascii_case("websocket") {
        UpgradeAsk::WebSocket
    } else if v.eq_ignore_ascii_case("h2c") {
        UpgradeAsk::Strip
    } else {
        UpgradeAsk::Other
    }
}

/// Whether `resp` accepts a WebSocket handshake: 101 with `Upgrade: websocket`. A 101 to
/// anything else, or naming another protocol, is the app switching to something the proxy
/// would relay unjudged; the proxy answers 502 instead.
pub(crate) fn accepts_websocket<B>(resp: &Response<B>) -> bool {
    resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && resp
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
}

// === inbound: HTTP/1.1 connections parked while idle ===

/// Serve one inbound HTTP connection as [`serve`] does (no upgrades), except that an
/// HTTP/1.1 connection idle for [`EdgeLimits::park_idle_after`] is parked: hyper's
/// connection (its 8 KiB read and write buffers, its state) is ended without closing the
/// socket, `on_park` runs (the inbound side drops the connection's app connection), and the
/// task waits for the socket's next byte holding only the socket and the service; that byte
/// (and any hyper had read but not parsed) is replayed first to a fresh hyper connection on
/// the same socket. The service, and with it everything per connection (peer identity,
/// metrics labels), is the same before and after. HTTP/2 connections are served as before.
///
/// A connection is parked only when it has served a request, has none in flight and no
/// byte of a next one has arrived; hyper is driven by this task alone, so between that
/// check and the end of its connection it reads nothing, and a request arriving meanwhile
/// waits in the socket (or in hyper's read buffer, returned with the socket) for the next
/// hyper connection: never lost, reordered, nor answered `connection: close`.
///
/// An HTTP/1.1 request the service answered with 101 (a WebSocket handshake the app
/// accepted; `upgraded` says so once the connection has ended) ends the HTTP connection
/// without closing the socket: the socket is returned, with any bytes that followed the
/// request put back in front, for the caller to relay.
pub(crate) async fn serve_inbound<IO, S, P, U>(
    edge: &EdgeLimits,
    drain: &Drain,
    io: IO,
    svc: S,
    on_park: P,
    upgraded: U,
) -> Option<Rewind<Tracked<IO>>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + Unpin
        + 'static,
    S::Future: Send + 'static,
    P: Fn(),
    U: Fn() -> bool,
{
    let act = Activity::new(true);
    let mut stop = drain.conn_signal();
    let mut io = Rewind::new(Tracked::new(io, act.clone()));
    // HTTP/2 or HTTP/1.1: read until the first bytes match or rule out the HTTP/2 preface
    // (the header-read timeout and drain apply meanwhile).
    let mut first = BytesMut::new();
    while first.len() < H2_PREFACE_START.len() && H2_PREFACE_START.starts_with(&first) {
        tokio::select! {
            r = read_some(&mut io) => match r {
                Ok(b) if !b.is_empty() => first.extend_from_slice(&b),
                _ => return None,
            },
            why = act.expired(edge) => {
                tracing::debug!(reason = why, "HTTP connection closed");
                return None;
            }
            _ = stop.changed() => return None,
        }
    }
    let h2 = first.starts_with(H2_PREFACE_START);
    io.unread(first.freeze());
    let mut svc = TrackedService::new(svc, act.clone());
    if h2 {
        let builder = edge.server().http2_only();
        let io = TokioIo::new(io);
        // Boxed: the HTTP/1.1 path's parked state below is not sized for HTTP/2's.
        let driving = Box::pin(drive(builder.serve_connection(io, svc), &act, edge, drain));
        driving.await;
        return None;
    }
    let builder = edge.server_h1();
    loop {
        // hyper's connection lives in a box of its own (with its state: ~2 KiB), freed at the
        // end of this block, before the connection parks: a box moved out of is only freed
        // when it goes out of scope.
        let parts = {
            let mut conn = Box::new(builder.serve_connection(TokioIo::new(io), svc));
            if *stop.borrow() {
                Pin::new(&mut *conn).graceful_shutdown();
            }
            // Boxed with the connection: freed when it parks.
            let driving = Box::pin(drive_h1(&mut *conn, &act, edge, &mut stop));
            let end = driving.await;
            if end != H1End::Park {
                // Only a connection hyper ended cleanly has written the 101 it ended on; one
                // cut by a timer, an error or drain is closed, upgrade or not.
                if end != H1End::Done || !upgraded() {
                    return None;
                }
                // The 101 is written and hyper left the socket open: take it back with
                // whatever the client sent after its handshake.
                let hyper::server::conn::http1::Parts { io, read_buf, .. } = conn.into_parts();
                let mut io = io.into_inner();
                io.unread(Bytes::copy_from_slice(&read_buf));
                return Some(io);
            }
            // Idle: end hyper's connection (it is idle, so it closes at once, reading nothing
            // more) and take the socket back with any bytes hyper read but did not parse.
            // (Still under the connection's timers: should hyper have a last write to finish
            // for a peer that does not read, this cannot wait longer than the idle timeout.)
            Pin::new(&mut *conn).graceful_shutdown();
            let ended = tokio::select! {
                r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => r.map_err(|e| e.to_string()),
                why = act.expired(edge) => Err(why.to_string()),
                _ = stop.changed() => Err("draining".to_string()),
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "HTTP connection ended instead of parking");
                return None;
            }
            conn.into_parts()
        };
        let hyper::server::conn::http1::Parts {
            io: tokio_io,
            read_buf,
            service,
            ..
        } = parts;
        svc = service;
        io = tokio_io.into_inner();
        // `read_buf` is a view of hyper's whole read buffer (8 KiB, even when empty): keep a
        // copy of the unparsed bytes only, never the buffer, while parked.
        let unparsed = Bytes::copy_from_slice(&read_buf);
        drop(read_buf);
        on_park();
        let next = if unparsed.is_empty() {
            tracing::trace!("idle HTTP/1.1 connection parked");
            tokio::select! {
                r = read_some(&mut io) => match r {
                    Ok(b) if !b.is_empty() => b,
                    _ => return None, // the peer closed it (or it failed, or was revoked)
                },
                why = act.expired(edge) => {
                    tracing::debug!(reason = why, "HTTP connection closed");
                    return None;
                }
                _ = stop.changed() => {
                    // Drain: a parked connection has nothing in flight; close it.
                    let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
                    return None;
                }
            }
        } else {
            act.next_request_pending();
            unparsed
        };
        io.unread(next);
    }
}

/// How [`drive_h1`] left a connection.
#[derive(Debug, PartialEq, Eq)]
enum H1End {
    /// hyper finished it cleanly (the peer closed, or a 101 was written and flushed).
    Done,
    /// Cut: an error, a timer, drain.
    Cut,
    /// Idle long enough to be parked.
    Park,
}

/// Drive an HTTP/1.1 connection until it ends or may be parked: like [`drive`], plus a
/// coarse tick (every half park period) that checks whether the connection has been idle
/// long enough; nothing is added per request.
async fn drive_h1<C>(
    conn: &mut C,
    act: &Activity,
    edge: &EdgeLimits,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> H1End
where
    C: GracefulConnection + Unpin,
    C::Error: std::fmt::Display,
{
    let period = (edge.park_idle_after / 2).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = &mut *conn => {
                return match r {
                    Ok(()) => H1End::Done,
                    Err(e) => {
                        tracing::debug!(error = %e, "HTTP connection ended with an error");
                        H1End::Cut
                    }
                };
            }
            why = act.expired(edge) => {
                tracing::debug!(reason = why, "HTTP connection closed");
                return H1End::Cut;
            }
            _ = stop.changed() => {
                Pin::new(&mut *conn).graceful_shutdown();
                let _ = (&mut *conn).await;
                return H1End::Cut;
            }
            _ = tick.tick() => {
                if act.parkable(edge.park_idle_after) && !*stop.borrow() {
                    return H1End::Park;
                }
            }
        }
    }
}

/// One read of whatever `io` has (up to 4 KiB, through a buffer on the stack only while
/// polled, so that a parked connection's task holds none); empty at end of stream.
async fn read_some<IO: AsyncRead + Unpin>(io: &mut IO) -> std::io::Result<Bytes> {
    std::future::poll_fn(|cx| {
        let mut buf = [0u8; 4096];
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut *io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(Bytes::copy_from_slice(rb.filled()))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// A stream whose reads first return bytes already read from it (`unread`).
pub(crate) struct Rewind<IO> {
    pre: Bytes,
    io: IO,
}

impl<IO> Rewind<IO> {
    pub(crate) fn new(io: IO) -> Self {
        Rewind {
            pre: Bytes::new(),
            io,
        }
    }

    /// Put `bytes` back in front of what is still to be read.
    pub(crate) fn unread(&mut self, bytes: Bytes) {
        if self.pre.is_empty() {
            self.pre = bytes;
        } else if !bytes.is_empty() {
            let mut b = BytesMut::with_capacity(bytes.len() + self.pre.len());
            b.extend_from_slice(&bytes);
            b.extend_from_slice(&self.pre);
            self.pre = b.freeze();
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if !me.pre.is_empty() {
            let n = me.pre.len().min(buf.remaining());
            buf.put_slice(&me.pre[..n]);
            me.pre.advance(n);
            if me.pre.is_empty() {
                // Free the replayed bytes' allocation now, not on the next unread.
                me.pre = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
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

/// A plain-text response the proxy writes.
pub(crate) fn text_response(status: u16, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// [`text_response`] with a body made at run time.
pub(crate) fn owned_text_response(status: u16, body: String) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// A denial as Envoy answers it: HTTP status + body, or a gRPC trailers-only response
/// (with the gRPC status it carries).
pub(crate) fn denial(status: u16, grpc: bool, body: &str) -> (Response<Body>, Option<u16>) {
    if grpc {
        // Envoy's HTTP-to-gRPC status mapping for local replies.
        let code: u16 = match status {
            400 => 13,             // INTERNAL
            401 => 16,             // UNAUTHENTICATED
            403 => 7,              // PERMISSION_DENIED
            404 => 12,             // UNIMPLEMENTED
            429 | 502..=504 => 14, // UNAVAILABLE
            _ => 2,                // UNKNOWN
        };
        let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(code));
        if let Ok(v) = HeaderValue::from_str(&grpc_message(body)) {
            h.insert("grpc-message", v);
        }
        return (r, Some(code));
    }
    (owned_text_response(status, body.to_string()), None)
}

/// `text` as a `grpc-message` value: percent-encoded as gRPC asks (bytes outside printable
/// ASCII, and `%`), cut at 1 KiB.
fn grpc_message(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if out.len() >= 1024 {
            break;
        }
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether the request is gRPC (by content type).
pub(crate) fn is_grpc_request<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The request's authority as policy sees it (`:authority`, else Host).
pub(crate) fn authority_of<B>(req: &Request<B>) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    /// Bytes put back come out first, the latest put back first of all, then the stream's
    /// own; small reads take them a piece at a time.
    #[tokio::test]
    async fn rewind_replays_what_was_put_back_in_order() {
        let mut r = Rewind::new(&b" and then the socket"[..]);
        r.unread(Bytes::from_static(b"world"));
        r.unread(Bytes::from_static(b"hello "));
        let mut two = [0u8; 2];
        r.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"he");
        let mut rest = String::new();
        r.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "llo world and then the socket");
        // Nothing put back: the stream as it is.
        let mut plain = Rewind::new(&b"as is"[..]);
        plain.unread(Bytes::new());
        let mut all = String::new();
        plain.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "as is");
    }
}
