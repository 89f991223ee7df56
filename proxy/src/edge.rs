//! The HTTP edge: what every connection the proxy serves is held to (header-read, idle and
//! stream-idle timeouts, header size), the per-listener connection budgets, and the request
//! normalizations that make policy see exactly what the app will see (header bytes, one
//! authority).
//!
//! Defaults follow Envoy's as Istio sets them where one exists: request headers at most
//! 60 KiB (`max_request_headers_kb`), a stream with no activity for 5 minutes is cut
//! (`stream_idle_timeout`), a connection with no request in flight is closed after 1 hour
//! (HCM `idle_timeout`). Envoy sets no header-read timeout by default; ours is 10 seconds
//! (`request_headers_timeout`) so a client that sends half a request cannot hold a
//! connection slot. An inbound HTTP/1.1 connection idle for `park_idle_after` (5 s) keeps
//! its socket but gives up its HTTP state and app connection until its next byte
//! (`http::serve_inbound`); every limit here applies to it as before.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, header};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;

/// Timeouts and sizes applied to every HTTP connection the proxy serves or originates.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLimits {
    /// A connection must deliver its first request's headers within this, and on HTTP/1.1
    /// each later request's headers within this of its first byte. Default 10 s.
    pub header_read_timeout: Duration,
    /// No byte either way for this long while a request is in flight: the connection is
    /// closed (Envoy `stream_idle_timeout`, default 5 min).
    pub stream_idle_timeout: Duration,
    /// No byte either way for this long with no request in flight: the connection is
    /// closed (Envoy HCM `idle_timeout`, default 1 h). Also applies to TCP ports.
    pub idle_timeout: Duration,
    /// Largest request header block accepted (Envoy `max_request_headers_kb`, 60 KiB).
    pub max_header_bytes: usize,
    /// An inbound HTTP/1.1 connection with no request in flight and no byte either way for
    /// this long is parked: it keeps its socket (TLS session, peer identity) but gives up
    /// its HTTP state and its app connection until its next byte arrives (memory per idle
    /// keep-alive connection; see `http::serve_inbound`). Checked on a coarse tick, so a
    /// connection parks between this and 1.5 times this after its last byte. Default 5 s.
    pub park_idle_after: Duration,
    /// The most request-body bytes held back at once, over all requests, for extension
    /// providers that judge bodies (`includeRequestBodyInCheck`). Past it a request that
    /// needs more is answered 503 at once (as Envoy's overload manager answers), so clients
    /// cannot grow the proxy's memory by holding many bodies open. Default 64 MiB.
    pub max_held_body_bytes: usize,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        EdgeLimits {
            header_read_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(3600),
            max_header_bytes: 60 * 1024,
            park_idle_after: PARK_IDLE_AFTER,
            max_held_body_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Default of [`EdgeLimits::park_idle_after`].
pub(crate) const PARK_IDLE_AFTER: Duration = Duration::from_secs(5);

/// HTTP/2 streams one client connection may have open at once.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 100;

impl EdgeLimits {
    /// A server builder (HTTP/1.1 and HTTP/2 auto-detected) held to these limits.
    pub(crate) fn server(&self) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
        let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        // The header-read timeout is ours (`Activity`): hyper's would also close an idle
        // keep-alive connection, since its timer starts while waiting for the next request.
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            // hyper's read buffer bounds the head; 8 KiB is its floor.
            .max_buf_size(self.max_header_bytes.max(8192));
        b.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX))
            // Each stream may hold an app connection: bound them per connection (hyper's
            // default is 200), as linkerd2-proxy and most HTTP/2 servers do.
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
        b
    }

    /// An HTTP/1.1-only server builder with the HTTP/1.1 settings of [`Self::server`] (the
    /// inbound side, once it has told HTTP/1.1 from HTTP/2 itself: hyper's own HTTP/1.1
    /// connection can give its socket back, which an idle connection needs to be parked).
    pub(crate) fn server_h1(&self) -> hyper::server::conn::http1::Builder {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(self.max_header_bytes.max(8192));
        b
    }

    /// Apply these limits to a client builder (the app's and the peers' pools).
    pub(crate) fn client(&self, b: &mut hyper_util::client::legacy::Builder) {
        b.timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http1_max_buf_size(self.max_header_bytes.max(8192))
            .http2_max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX));
    }
}

// === connection budgets ===

/// Which budget a connection is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Budget {
    /// Inbound listeners (peers and plaintext clients).
    Inbound = 0,
    /// The outbound HTTP proxy, upstream ports and CONNECT tunnels (the app's calls).
    Outbound = 1,
    /// The admin listener.
    Admin = 2,
}

impl Budget {
    pub(crate) const ALL: [Budget; 3] = [Budget::Inbound, Budget::Outbound, Budget::Admin];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Budget::Inbound => "inbound",
            Budget::Outbound => "outbound",
            Budget::Admin => "admin",
        }
    }
}

/// Separate connection limits for inbound, outbound and admin, so that a flood on one
/// (idle plaintext clients on a PERMISSIVE port, say) cannot refuse the others.
pub(crate) struct Budgets {
    sems: [Arc<Semaphore>; 3],
    refused: [AtomicU64; 3],
    /// Bytes of request bodies held back for extension providers, all requests together
    /// (one permit per byte), and its size.
    held: Arc<Semaphore>,
    held_limit: usize,
}

impl Budgets {
    /// Connection slots per listener kind, and `held` bytes for held request bodies.
    pub(crate) fn new(inbound: usize, outbound: usize, admin: usize, held: usize) -> Budgets {
        let held = held.min(Semaphore::MAX_PERMITS);
        Budgets {
            sems: [
                Arc::new(Semaphore::new(inbound)),
                Arc::new(Semaphore::new(outbound)),
                Arc::new(Semaphore::new(admin)),
            ],
            refused: Default::default(),
            held: Arc::new(Semaphore::new(held)),
            held_limit: held,
        }
    }

    /// The budget for request bodies held back for extension providers.
    pub(crate) fn held(&self) -> &Arc<Semaphore> {
        &self.held
    }

    /// A slot of budget `b`, or `None` (counted as refused) when it is exhausted.
    pub(crate) fn acquire(&self, b: Budget) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let p = self.sems[b as usize].clone().try_acquire_owned().ok();
        if p.is_none() {
            self.refused[b as usize].fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    /// Prometheus lines: `rampart_proxy_connections_refused_total{listener=...}`.
    pub(crate) fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# TYPE rampart_proxy_connections_refused_total counter"
        );
        for b in Budget::ALL {
            let _ = writeln!(
                out,
                "rampart_proxy_connections_refused_total{{listener=\"{}\"}} {}",
                b.as_str(),
                self.refused[b as usize].load(Ordering::Relaxed)
            );
        }
        // The held-body budget: in use (the held buffers' room, not only the bytes received)
        // and its size (`--max-held-body-kb`). Requests refused past it are the
        // `response_flags="OL"` series of the request counters.
        let in_use = self
            .held_limit
            .saturating_sub(self.held.available_permits());
        let _ = writeln!(out, "# TYPE rampart_proxy_held_body_bytes gauge");
        let _ = writeln!(out, "rampart_proxy_held_body_bytes {in_use}");
        let _ = writeln!(out, "# TYPE rampart_proxy_held_body_limit_bytes gauge");
        let _ = writeln!(
            out,
            "rampart_proxy_held_body_limit_bytes {}",
            self.held_limit
        );
    }
}

// === what policy sees ===

/// A header value as policy sees it: the value itself when it is UTF-8 (every visible-ASCII
/// value, and UTF-8 text), else a lossy decoding in which each invalid byte sequence becomes
/// U+FFFD. Never "absent": a header the app receives is a header policy matches, so
/// presence and `*` always match, and prefix/suffix/exact comparisons see the valid bytes
/// unchanged (a policy value cannot name an invalid byte, so it can never equal one).
pub(crate) fn header_text(v: &HeaderValue) -> String {
    String::from_utf8_lossy(v.as_bytes()).into_owned()
}

/// A request path as the proxy logs it: the query's values are replaced, since a query can
/// carry a bearer token (`?access_token=`, a jwtRule's `fromParams`), a signed URL's
/// signature or a password reset code, and a log line is read by many more people than
/// the request was meant for. Parameter names stay (they say which token was sent); a
/// parameter without `=` is replaced whole. The result is cut at 512 bytes so a 60 KiB
/// path does not flood the log.
pub(crate) fn loggable_path(path_and_query: &str) -> String {
    const MAX: usize = 512;
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let mut out = String::with_capacity(path_and_query.len().min(MAX) + 16);
    out.push_str(path);
    if let Some(q) = query {
        out.push('?');
        for (i, part) in q.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match part.split_once('=') {
                Some((name, _)) => {
                    out.push_str(name);
                    out.push_str("=<redacted>");
                }
                None if part.is_empty() => {}
                None => out.push_str("<redacted>"),
            }
        }
    }
    if out.len() > MAX {
        let mut cut = MAX;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        let total = out.len();
        out.truncate(cut);
        out.push_str(&format!("...({total} bytes)"));
    }
    out
}

/// Make the request carry one authority that policy and the app both see: an absolute-form
/// request-target (or HTTP/2 `:authority`) overrides the `Host` header, as Envoy rewrites
/// it. More than one `Host` header is refused (`Err`), as Envoy does.
///
/// A method that differs from a standard one only in case (`get` over HTTP/2 or
/// HTTP/1.1) is refused too: policy compares methods exactly, as Envoy does, while apps
/// often do not, so `get` could pass a `methods: ["GET"]` DENY and still be served as GET.
pub(crate) fn align_host<B>(req: &mut Request<B>) -> Result<(), &'static str> {
    let m = req.method().as_str();
    if m.bytes().any(|b| b.is_ascii_lowercase())
        && matches!(
            m.to_ascii_uppercase().as_str(),
            "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE" | "PATCH"
        )
    {
        return Err("method is a case variant of a standard method");
    }
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return Err("more than one Host header");
    }
    if let Some(a) = req.uri().authority() {
        let v = HeaderValue::from_str(a.as_str()).map_err(|_| "bad authority")?;
        req.headers_mut().insert(header::HOST, v);
    }
    Ok(())
}

// === per-connection activity ===

/// What one served connection has done: when it last moved a byte, how many requests it
/// has in flight, whether it has delivered a request at all.
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    active: AtomicUsize,
    requests: AtomicU64,
    /// HTTP/1.1: when (ms + 1) the first byte of a request not yet delivered arrived; 0: none.
    pending_since: AtomicU64,
    /// Whether the client opened with the HTTP/2 preface (no per-request header timer:
    /// pings and window updates arrive between streams).
    h2: std::sync::atomic::AtomicBool,
    /// An HTTP connection (requests, header timers); false for a byte stream (TCP ports,
    /// upstream ports, CONNECT tunnels), which only has the idle timeout.
    http: bool,
    /// The first bytes, until they match or rule out the HTTP/2 preface (`deciding`).
    prefix: std::sync::Mutex<Vec<u8>>,
    deciding: std::sync::atomic::AtomicBool,
    /// Requests the client cancelled before their answer, within [`PREMATURE_RESET_AGE`]
    /// of their start (HTTP/2 `RST_STREAM`, "rapid reset").
    premature_resets: AtomicU64,
    /// Set (and woken) when the premature resets pass Envoy's threshold.
    reset_flood: tokio::sync::Notify,
}

/// A request cancelled by its client sooner than this after it started counts as a premature
/// reset (Envoy's `overload.premature_reset_min_stream_lifetime_seconds`).
pub(crate) const PREMATURE_RESET_AGE: Duration = Duration::from_secs(1);
/// Envoy's `overload.premature_reset_total_stream_count`: a connection is closed once its
/// premature resets are half of its requests, or of this many while it has served fewer.
pub(crate) const PREMATURE_RESET_COUNT: u64 = 500;
/// Why a connection closed for [`PREMATURE_RESET_COUNT`].
pub(crate) const RESET_FLOOD: &str = "too many premature stream resets (HTTP/2 rapid reset)";

/// The start of the HTTP/2 client preface that tells it from an HTTP/1.1 request line (a
/// request with method `PRI` is still HTTP/1.1 and keeps its header timer).
pub(crate) const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0\r\n";

impl Activity {
    /// `header_phase`: the connection must deliver a request within the header-read timeout
    /// (HTTP); false for byte streams (TCP ports).
    pub(crate) fn new(header_phase: bool) -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            requests: AtomicU64::new(u64::from(!header_phase)),
            pending_since: AtomicU64::new(0),
            h2: std::sync::atomic::AtomicBool::new(false),
            http: header_phase,
            prefix: std::sync::Mutex::new(Vec::new()),
            deciding: std::sync::atomic::AtomicBool::new(header_phase),
            premature_resets: AtomicU64::new(0),
            reset_flood: tokio::sync::Notify::new(),
        })
    }

    /// A request was cancelled by its client `age` after it started, before its answer: an
    /// HTTP/2 stream reset (or the connection closing under it). Envoy's rule for
    /// CVE-2023-44487: once premature resets reach half of the connection's requests (of
    /// [`PREMATURE_RESET_COUNT`] while it has served fewer), the connection is closed.
    fn cancelled(&self, age: Duration) {
        if age >= PREMATURE_RESET_AGE {
            return;
        }
        let premature = self.premature_resets.fetch_add(1, Ordering::Relaxed) + 1;
        let requests = self.requests.load(Ordering::Relaxed);
        if premature.saturating_mul(2) >= requests.max(PREMATURE_RESET_COUNT) {
            self.reset_flood.notify_one();
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Bytes came in: `data` is what was read.
    fn read(&self, data: &[u8]) {
        let now = self.now_ms();
        self.last_ms.store(now, Ordering::Relaxed);
        if self.deciding.load(Ordering::Relaxed) {
            let mut p = self.prefix.lock().unwrap_or_else(|p| p.into_inner());
            let want = H2_PREFACE_START.len().saturating_sub(p.len());
            p.extend_from_slice(&data[..data.len().min(want)]);
            if p.as_slice() == H2_PREFACE_START {
                self.h2.store(true, Ordering::Relaxed);
                self.deciding.store(false, Ordering::Relaxed);
            } else if !H2_PREFACE_START.starts_with(&p) {
                self.deciding.store(false, Ordering::Relaxed);
            }
        }
        if self.http
            && !self.h2.load(Ordering::Relaxed)
            && self.requests.load(Ordering::Relaxed) > 0
            && self.active.load(Ordering::Relaxed) == 0
        {
            // The start of a next request: its headers are now on the clock.
            let _ = self.pending_since.compare_exchange(
                0,
                now.saturating_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Resolves, with the reason, when the connection has outlived its limits: no request
    /// headers within the header-read timeout, no byte for the stream-idle timeout while a
    /// request is in flight, or for the idle timeout while none is.
    pub(crate) async fn expired(&self, l: &EdgeLimits) -> &'static str {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        // The phase can change while we sleep (a request arrives, a response ends), making
        // the deadline earlier: never sleep longer than the shortest limit.
        let cap = ms(l
            .header_read_timeout
            .min(l.stream_idle_timeout)
            .min(l.idle_timeout))
        .max(1);
        loop {
            let (base, limit, why) = if self.requests.load(Ordering::Relaxed) == 0 {
                (
                    0,
                    l.header_read_timeout,
                    "no request headers within the header-read timeout",
                )
            } else if self.active.load(Ordering::Relaxed) > 0 {
                (
                    self.last_ms.load(Ordering::Relaxed),
                    l.stream_idle_timeout,
                    "stream idle timeout",
                )
            } else if let p @ 1.. = self.pending_since.load(Ordering::Relaxed) {
                (
                    p - 1,
                    l.header_read_timeout,
                    "request headers not complete within the header-read timeout",
                )
            } else {
                (
                    self.last_ms.load(Ordering::Relaxed),
                    l.idle_timeout,
                    "idle timeout",
                )
            };
            let deadline = base.saturating_add(ms(limit));
            let now = self.now_ms();
            if now >= deadline {
                return why;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis((deadline - now).min(cap))) => {}
                () = self.reset_flood.notified() => {
                    // Stays tripped for any later wait on this connection.
                    self.reset_flood.notify_one();
                    return RESET_FLOOD;
                }
            }
        }
    }

    /// Part of a next request is waiting (bytes replayed after parking: a head pipelined
    /// while the previous request was in flight, never completed): its headers are on the
    /// clock from now, so it cannot be parked and re-armed forever.
    pub(crate) fn next_request_pending(&self) {
        let now = self.now_ms();
        let _ = self.pending_since.compare_exchange(
            0,
            now.saturating_add(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Whether an HTTP/1.1 connection may be parked: it has served a request, none is in
    /// flight, no next request has started arriving, and no byte moved for `after`.
    pub(crate) fn parkable(&self, after: Duration) -> bool {
        let after = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        self.requests.load(Ordering::Relaxed) > 0
            && self.active.load(Ordering::Relaxed) == 0
            && self.pending_since.load(Ordering::Relaxed) == 0
            && self
                .now_ms()
                .saturating_sub(self.last_ms.load(Ordering::Relaxed))
                >= after
    }

    fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        self.pending_since.store(0, Ordering::Relaxed);
        let now = self.now_ms();
        self.last_ms.store(now, Ordering::Relaxed);
        ActiveGuard {
            act: self.clone(),
            start_ms: now,
            answered: false,
        }
    }
}

/// A request in flight on its connection (until its response body is dropped). Dropped
/// before it was `answered`, its client cancelled it: hyper drops a request's future when
/// an HTTP/2 client resets the stream.
pub(crate) struct ActiveGuard {
    act: Arc<Activity>,
    start_ms: u64,
    answered: bool,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let now = self.act.now_ms();
        self.act.last_ms.store(now, Ordering::Relaxed);
        self.act.active.fetch_sub(1, Ordering::Relaxed);
        if !self.answered {
            self.act
                .cancelled(Duration::from_millis(now.saturating_sub(self.start_ms)));
        }
    }
}

/// A stream that records its activity.
pub(crate) struct Tracked<IO> {
    io: IO,
    act: Arc<Activity>,
}

impl<IO> Tracked<IO> {
    pub(crate) fn new(io: IO, act: Arc<Activity>) -> Self {
        Tracked { io, act }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut me.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            me.act.read(&buf.filled()[before..]);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            me.act.touch();
        }
        r
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
        let me = self.get_mut();
        let r = Pin::new(&mut me.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            me.act.touch();
        }
        r
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
pub(crate) struct TrackedBody<B> {
    inner: B,
    _guard: ActiveGuard,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A service whose requests are counted on the connection's [`Activity`].
pub(crate) struct TrackedService<S> {
    inner: S,
    act: Arc<Activity>,
}

impl<S> TrackedService<S> {
    pub(crate) fn new(inner: S, act: Arc<Activity>) -> Self {
        TrackedService { inner, act }
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for TrackedService<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Body + Unpin + Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let mut guard = self.act.begin();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            guard.answered = true;
            Ok(resp.map(|inner| TrackedBody {
                inner,
                _guard: guard,
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Envoy's premature-reset rule: requests cancelled before their answer close the
    /// connection once they are half of its requests, or 250 while it has served under 500;
    /// answered requests are not counted.
    #[tokio::test]
    async fn premature_resets_trip_at_envoys_threshold() {
        let l = EdgeLimits::default();
        let tripped = |act: &Arc<Activity>| {
            futures::FutureExt::now_or_never(act.expired(&l)).is_some_and(|w| w == RESET_FLOOD)
        };
        let act = Activity::new(true);
        for _ in 0..249 {
            drop(act.begin());
        }
        assert!(!tripped(&act));
        drop(act.begin());
        assert!(tripped(&act));
        assert!(tripped(&act), "stays tripped");
        // Twin: among answered requests, the same resets are under half.
        let act = Activity::new(true);
        for _ in 0..600 {
            let mut g = act.begin();
            g.answered = true;
        }
        for _ in 0..300 {
            drop(act.begin());
        }
        assert!(!tripped(&act));
        for _ in 0..299 {
            drop(act.begin());
        }
        assert!(!tripped(&act), "599 of 1199");
        drop(act.begin());
        assert!(tripped(&act), "600 of 1200");
    }

    /// Query values never reach a log line: a token sent as `?access_token=` (the default
    /// jwtRule location) or any other parameter is replaced, its name kept.
    #[test]
    fn logged_paths_hide_query_values() {
        assert_eq!(
            loggable_path("/api/v1?access_token=eyJhbGciOi.x.y&page=2"),
            "/api/v1?access_token=<redacted>&page=<redacted>"
        );
        assert_eq!(loggable_path("/a?secret"), "/a?<redacted>");
        assert_eq!(loggable_path("/a?x=1&&y"), "/a?x=<redacted>&&<redacted>");
        assert_eq!(loggable_path("/a?"), "/a?");
        // Negative twin: a path without a query is logged as it is.
        assert_eq!(loggable_path("/api/v1/items%2F3"), "/api/v1/items%2F3");
        // Long paths are cut on a character boundary and say how long they were.
        let long = format!("/{}", "é".repeat(400));
        let l = loggable_path(&long);
        assert!(l.ends_with("...(801 bytes)"), "{l}");
        assert!(l.len() < 540);
    }

    /// A byte stream (TCP port, upstream port, CONNECT tunnel) that keeps moving bytes is
    /// never closed by the HTTP header timer (it was: every upstream-port connection died 10 s
    /// in, mid-traffic); an HTTP connection holding a partial next request is.
    #[tokio::test]
    async fn byte_streams_have_no_header_timer() {
        let l = EdgeLimits {
            header_read_timeout: Duration::from_millis(100),
            stream_idle_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            ..EdgeLimits::default()
        };
        let tcp = Activity::new(false);
        let http = Activity::new(true);
        drop(http.begin()); // one request served, none in flight
        let feed = async {
            for _ in 0..15 {
                tcp.read(b"bytes");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            why = tcp.expired(&l) => panic!("a busy byte stream was closed: {why}"),
            () = feed => {}
        }
        // Twin: the HTTP connection gets the first bytes of a next request, then nothing.
        http.read(b"GET / HT");
        let why = tokio::time::timeout(Duration::from_secs(2), http.expired(&l))
            .await
            .expect("closed by the header timer");
        assert_eq!(
            why,
            "request headers not complete within the header-read timeout"
        );
    }

    /// Only the HTTP/2 preface (however the reads cut it) turns the per-request header timer
    /// off; an HTTP/1.1 request with method `PRI` keeps it.
    #[test]
    fn only_the_real_preface_counts_as_http2() {
        let h2 = |reads: &[&[u8]]| {
            let a = Activity::new(true);
            for r in reads {
                a.read(r);
            }
            a.h2.load(Ordering::Relaxed)
        };
        assert!(h2(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]));
        assert!(h2(&[b"PRI * HT", b"TP/2.0\r\n\r\nSM"]));
        assert!(h2(&[b"P", b"R", b"I * HTTP/2.0\r\n"]));
        assert!(!h2(&[b"PRI /x HTTP/1.1\r\nhost: a\r\n\r\n"]));
        assert!(!h2(&[b"PRI ", b"/x HTTP/1.1\r\n"]));
        assert!(!h2(&[b"GET / HTTP/1.1\r\n", b"PRI * HTTP/2.0\r\n"]));
    }

    #[test]
    fn non_visible_ascii_values_are_seen_not_dropped() {
        let v = HeaderValue::from_bytes(b"\x80").unwrap();
        assert_eq!(header_text(&v), "\u{FFFD}");
        let v = HeaderValue::from_bytes("caf\u{e9}".as_bytes()).unwrap();
        assert_eq!(header_text(&v), "caf\u{e9}");
        let v = HeaderValue::from_static("plain");
        assert_eq!(header_text(&v), "plain");
    }

    #[test]
    fn absolute_form_authority_wins_over_host() {
        let mut r = Request::builder()
            .uri("http://allowed.example/x")
            .header("host", "other.example")
            .body(())
            .unwrap();
        align_host(&mut r).unwrap();
        assert_eq!(r.headers()["host"], "allowed.example");
        // Origin-form: Host stays.
        let mut r = Request::builder()
            .uri("/x")
            .header("host", "other.example")
            .body(())
            .unwrap();
        align_host(&mut r).unwrap();
        assert_eq!(r.headers()["host"], "other.example");
        // A lowercase standard method: refused.
        let mut r = Request::builder().method("get").uri("/x").body(()).unwrap();
        assert!(align_host(&mut r).is_err());
        // Two Host headers: refused.
        let mut r = Request::builder()
            .uri("/x")
            .header("host", "a")
            .header("host", "b")
            .body(())
            .unwrap();
        assert!(align_host(&mut r).is_err());
    }

    #[test]
    fn budgets_are_separate_and_count_refusals() {
        let b = Budgets::new(1, 1, 1, 1000);
        let _i = b.acquire(Budget::Inbound).unwrap();
        assert!(b.acquire(Budget::Inbound).is_none());
        assert!(b.acquire(Budget::Outbound).is_some());
        let mut out = String::new();
        b.render(&mut out);
        assert!(out.contains("rampart_proxy_connections_refused_total{listener=\"inbound\"} 1"));
        assert!(out.contains("rampart_proxy_connections_refused_total{listener=\"outbound\"} 0"));
    }

    #[test]
    fn the_held_body_budget_is_shown_in_use_and_whole() {
        let b = Budgets::new(1, 1, 1, 1000);
        let mut out = String::new();
        b.render(&mut out);
        assert!(out.contains("\nrampart_proxy_held_body_bytes 0\n"), "{out}");
        assert!(
            out.contains("\nrampart_proxy_held_body_limit_bytes 1000\n"),
            "{out}"
        );
        let held = b.held().clone().try_acquire_many_owned(300).unwrap();
        let mut out = String::new();
        b.render(&mut out);
        assert!(
            out.contains("\nrampart_proxy_held_body_bytes 300\n"),
            "{out}"
        );
        drop(held);
        let mut out = String::new();
        b.render(&mut out);
        assert!(out.contains("\nrampart_proxy_held_body_bytes 0\n"), "{out}");
    }
}
