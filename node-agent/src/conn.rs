//! The connections of one Unix-socket gRPC server: how many streams each has open, which to
//! close when the socket is at its connection cap, and when one has been idle too long.
//!
//! A connection must send the HTTP/2 preface and its first SETTINGS frame within
//! [`HANDSHAKE_TIMEOUT`] of being accepted, and is closed after [`IDLE_TIMEOUT`] without an
//! open stream (Envoy keeps its SDS streams open, so its connection is never idle). When the
//! socket is at its cap a new connection closes the oldest one without an open stream, or, if
//! every one has a stream open, the oldest. The deadlines are enforced by the shim every
//! accepted connection passes through (`uds_authority`); streams are counted by
//! [`CountStreams`] around each gRPC service.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// From accept until the client's HTTP/2 preface and first SETTINGS frame have arrived.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may stay open without an open stream.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// One accepted connection.
#[derive(Debug)]
pub(crate) struct ConnState {
    /// Accept order on its socket (lower: older).
    seq: u64,
    streams: AtomicUsize,
    /// When the last stream ended (or the connection was accepted).
    idle_since: Mutex<tokio::time::Instant>,
    /// Cancelled to close the connection (to make room for a new one).
    pub(crate) evict: CancellationToken,
}

impl ConnState {
    /// Open streams.
    pub(crate) fn streams(&self) -> usize {
        self.streams.load(Ordering::Acquire)
    }

    /// When the connection became idle, if it is (no open stream).
    pub(crate) fn idle_since(&self) -> Option<tokio::time::Instant> {
        let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        (self.streams() == 0).then_some(since)
    }
}

/// What the gRPC services see of their connection (tonic puts it in every request's
/// extensions).
#[derive(Debug, Clone, Default)]
pub(crate) struct Tracked(pub(crate) Option<Arc<ConnState>>);

/// The open connections of one socket.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    conns: Mutex<Vec<Weak<ConnState>>>,
    seq: AtomicU64,
}

static EVICTIONS: crate::throttle::LogThrottle =
    crate::throttle::LogThrottle::new(Duration::from_secs(10));

impl Registry {
    /// Track a newly accepted connection.
    pub(crate) fn register(&self) -> Arc<ConnState> {
        let c = Arc::new(ConnState {
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            streams: AtomicUsize::new(0),
            idle_since: Mutex::new(tokio::time::Instant::now()),
            evict: CancellationToken::new(),
        });
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|w| w.strong_count() > 0);
        conns.push(Arc::downgrade(&c));
        c
    }

    /// Close one connection to make room: the oldest without an open stream, else the
    /// oldest. False if there is none left to close (all already closing).
    pub(crate) fn evict_one(&self, cap: usize) -> bool {
        let victim = {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.retain(|w| w.strong_count() > 0);
            conns
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|c| !c.evict.is_cancelled())
                .min_by_key(|c| (c.streams() > 0, c.seq))
        };
        let Some(v) = victim else {
            return false;
        };
        let streams = v.streams();
        match EVICTIONS.allow() {
            Some(dropped) => tracing::warn!(
                dropped,
                streams,
                "a Unix socket is at its cap of {cap} connections: closing its oldest {} \
                 connection for a new one (at most one such line per 10 s; `dropped` counts \
                 those left out)",
                if streams == 0 { "idle" } else { "busy" }
            ),
            None => tracing::debug!(streams, "closing a connection for a new one"),
        }
        v.evict.cancel();
        true
    }
}

/// Counts a stream of a connection while it is open.
#[derive(Debug)]
struct StreamGuard(Arc<ConnState>);

impl StreamGuard {
    fn new(c: Arc<ConnState>) -> Self {
        c.streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard(c)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        // Mark the time first, so an observer that sees 0 streams sees the new time.
        if self.0.streams.load(Ordering::Acquire) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) =
                tokio::time::Instant::now();
        }
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A gRPC service whose calls count as open streams of their connection until their
/// response body ends or is dropped (the stream ended or was reset).
#[derive(Debug, Clone)]
pub(crate) struct CountStreams<S>(pub(crate) S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for CountStreams<S> {
    const NAME: &'static str = S::NAME;
}

type Body = tonic::body::Body;

impl<S> tower::Service<http::Request<Body>> for CountStreams<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = crate::BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<Tracked>()
            .and_then(|t| t.0.clone())
            .map(StreamGuard::new);
        let fut = self.0.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(match guard {
                Some(g) => resp.map(|inner| Body::new(Guarded { inner, _guard: g })),
                None => resp,
            })
        })
    }
}

struct Guarded {
    inner: Body,
    _guard: StreamGuard,
}

impl hyper::body::Body for Guarded {
    type Data = hyper::body::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
