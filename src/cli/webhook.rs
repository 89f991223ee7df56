//! The CA's sidecar injection webhook server (`rampart ca --inject-webhook`): TLS with the
//! CA's own serving certificate, HTTP/1.1 and HTTP/2; what it answers is
//! [`rampart::webhook`].

use std::sync::Arc;
use std::time::Duration;

use rampart::inject::Options;
use rampart::webhook::{InjectorStats, handle};

/// Connections served at once; more wait in the kernel's backlog.
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// How long a TLS handshake, a request's head, and then its body may take.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests read and answered at once, over all connections (each holds at most
/// [`rampart::webhook::MAX_REVIEW_BYTES`] of body): the webhook's memory stays under 16 x 3
/// MiB whatever a caller sends, beside a CA whose limit is 512 MiB.
pub(crate) const MAX_IN_FLIGHT: usize = 16;
/// How long a request waits for one of those slots before it is answered 503.
pub(crate) const SLOT_WAIT: Duration = Duration::from_secs(5);

/// Serves the webhook on `listener` over TLS (`tls`: the CA's serving certificate, no
/// client certificate asked) until the future is dropped. HTTP/1.1 and HTTP/2 (ALPN); at
/// most [`MAX_CONNECTIONS`] at once; a handshake or request head slower than
/// [`IO_TIMEOUT`] is dropped.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    opts: Arc<Options>,
    stats: InjectorStats,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "injection webhook: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, opts, stats, in_flight) = (
            acceptor.clone(),
            opts.clone(),
            stats.clone(),
            in_flight.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
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
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .max_concurrent_streams(64);
            if let Err(e) = builder
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "injection webhook: connection ended");
            }
        });
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
        return status(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "injection webhook busy; retry",
        );
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
        drop(held);
        let r = bounded(post(body()), &opts(), &stats, limits).await;
        assert_eq!(r.status(), http::StatusCode::BAD_REQUEST);
    }
}
