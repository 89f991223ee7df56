//! The CA's sidecar injection webhook server (`rampart ca --inject-webhook`): TLS with the
//! CA's own serving certificate, HTTP/1.1 and HTTP/2; what it answers is
//! [`rampart::webhook`].

use std::sync::Arc;
use std::time::Duration;

use rampart::inject::Options;
use rampart::webhook::{InjectorStats, handle};

/// Connections held at once. At the limit the oldest is closed for the new one, so peers
/// holding idle connections cannot lock the API server out (it opens a new connection and
/// is answered within milliseconds).
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// A connection is shut down gracefully after this (requests in flight finish; the API
/// server reconnects): an idle or trickling peer holds its place no longer.
pub(crate) const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30);
/// How long a TLS handshake, a request's head, and then its body and answer may take; the
/// API server's own timeout for the webhook is 10 s (70-injector.yaml).
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests read and answered at once, over all connections. A review is parsed into a JSON
/// tree several times its size (up to ~30x for a body of tiny array elements), so two at
/// [`rampart::webhook::MAX_REVIEW_BYTES`] stay well under 100 MiB beside a CA whose limit is
/// 512 MiB; one review takes about a millisecond, so two keep up with any Pod creation rate.
pub(crate) const MAX_IN_FLIGHT: usize = 2;
/// How long a request waits for one of those slots before it is answered 503 (with
/// `Retry-After`, which the API server's client honours).
pub(crate) const SLOT_WAIT: Duration = Duration::from_secs(2);

/// The open connections, oldest first, so the oldest can be closed at the limit.
#[derive(Default)]
struct Live {
    next: u64,
    open: std::collections::BTreeMap<u64, tokio::task::AbortHandle>,
}

/// Serves the webhook on `listener` over TLS (`tls`: the CA's serving certificate, no
/// client certificate asked) until the future is dropped. HTTP/1.1 and HTTP/2 (ALPN), within
/// the limits above.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    opts: Arc<Options>,
    stats: InjectorStats,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let live = Arc::new(std::sync::Mutex::new(Live::default()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "injection webhook: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, opts, stats, in_flight, registry) = (
            acceptor.clone(),
            opts.clone(),
            stats.clone(),
            in_flight.clone(),
            live.clone(),
        );
        // Spawned and registered under the lock, so the task always finds itself to remove.
        let mut l = live.lock().unwrap_or_else(|p| p.into_inner());
        if l.open.len() >= MAX_CONNECTIONS
            && let Some((_, oldest)) = l.open.pop_first()
        {
            oldest.abort();
            tracing::debug!("injection webhook: connection limit reached; closed the oldest");
        }
        let id = l.next;
        l.next += 1;
        let task = tokio::spawn(async move {
            connection(tcp, peer, acceptor, opts, stats, in_flight).await;
            registry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .open
                .remove(&id);
        });
        l.open.insert(id, task.abort_handle());
    }
}

/// One connection: the TLS handshake within [`IO_TIMEOUT`], then HTTP until the peer closes
/// or [`MAX_CONNECTION_AGE`] (then a graceful shutdown, with [`IO_TIMEOUT`] for the requests
/// in flight).
async fn connection(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    opts: Arc<Options>,
    stats: InjectorStats,
    in_flight: Arc<tokio::sync::Semaphore>,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "injection webhook: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "injection webhook: TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req| {
        let (opts, stats, in_flight) = (opts.clone(), stats.clone(), in_flight.clone());
        async move {
            let limits = Limits {
                in_flight: &in_flight,
                slot_wait: SLOT_WAIT,
                io_timeout: IO_TIMEOUT,
            };
            Ok::<_, std::convert::Infallible>(bounded(req, &opts, &stats, limits).await)
        }
    });
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(IO_TIMEOUT);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(4)
        .initial_stream_window_size(256 * 1024)
        .initial_connection_window_size(256 * 1024)
        .max_header_list_size(16 * 1024);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = tokio::time::sleep(MAX_CONNECTION_AGE) => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(IO_TIMEOUT, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "injection webhook: connection ended");
    }
}

/// The webhook's TLS configuration: the shared policy (TLS 1.3, ring) with the serving
/// certificate `serving` (the CA's own, which follows its material), no client certificate,
/// ALPN `h2` and `http/1.1`.
pub(crate) fn tls_config(
    serving: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<rustls::ServerConfig, String> {
    let mut cfg = rampart_certs::tls::server_config_with(serving, None)
        .map_err(|e| format!("injection webhook TLS: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The process-wide limits on requests.
#[derive(Clone, Copy)]
struct Limits<'a> {
    /// [`MAX_IN_FLIGHT`] slots.
    in_flight: &'a Arc<tokio::sync::Semaphore>,
    /// [`SLOT_WAIT`].
    slot_wait: Duration,
    /// [`IO_TIMEOUT`].
    io_timeout: Duration,
}

/// [`handle`] within the process-wide limits: a slot (503 if none frees within
/// `slot_wait`) and `io_timeout` for reading the body and answering (408).
async fn bounded<B>(
    req: http::Request<B>,
    opts: &Options,
    stats: &InjectorStats,
    limits: Limits<'_>,
) -> http::Response<http_body_util::Full<bytes::Bytes>>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let status = |code: http::StatusCode, msg: &str| {
        let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(format!(
            "{msg}\n"
        ))));
        *r.status_mut() = code;
        r
    };
    let Ok(Ok(_slot)) =
        tokio::time::timeout(limits.slot_wait, limits.in_flight.clone().acquire_owned()).await
    else {
        tracing::warn!("injection webhook: every request slot busy; answered 503");
        let mut r = status(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "injection webhook busy; retry",
        );
        r.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        );
        return r;
    };
    match tokio::time::timeout(limits.io_timeout, handle(req, opts, stats)).await {
        Ok(r) => r,
        Err(_) => status(
            http::StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            image: "example/rampart:1".into(),
            ca_address: "rampart-ca.istio-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
            version: "0".into(),
        }
    }

    /// A body whose bytes never come (a peer that sent the head and stalls).
    struct Stalled;

    impl hyper::body::Body for Stalled {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
            std::task::Poll::Pending
        }
    }

    fn post<B>(body: B) -> http::Request<B> {
        http::Request::builder()
            .method(http::Method::POST)
            .uri(rampart::webhook::INJECT_PATH)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .unwrap()
    }

    #[tokio::test]
    async fn a_stalled_body_times_out_and_gives_its_slot_back() {
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let limits = Limits {
            in_flight: &slots,
            slot_wait: Duration::from_millis(50),
            io_timeout: Duration::from_millis(100),
        };
        let stats = InjectorStats::default();
        let r = bounded(post(Stalled), &opts(), &stats, limits).await;
        assert_eq!(r.status(), http::StatusCode::REQUEST_TIMEOUT);
        assert_eq!(slots.available_permits(), 1, "the slot was given back");
        // Its twin: a body that arrives is answered.
        let r = bounded(
            post(http_body_util::Full::new(bytes::Bytes::from_static(b"{}"))),
            &opts(),
            &stats,
            limits,
        )
        .await;
        assert_eq!(
            r.status(),
            http::StatusCode::BAD_REQUEST,
            "not a review, but read"
        );
    }

    #[tokio::test]
    async fn no_free_slot_is_answered_503() {
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let held = slots.clone().acquire_owned().await.unwrap();
        let limits = Limits {
            in_flight: &slots,
            slot_wait: Duration::from_millis(50),
            io_timeout: Duration::from_secs(5),
        };
        let stats = InjectorStats::default();
        let body = || http_body_util::Full::new(bytes::Bytes::from_static(b"{}"));
        let r = bounded(post(body()), &opts(), &stats, limits).await;
        assert_eq!(r.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[http::header::RETRY_AFTER], "1");
        drop(held);
        let r = bounded(post(body()), &opts(), &stats, limits).await;
        assert_eq!(r.status(), http::StatusCode::BAD_REQUEST);
    }
}
