//! The CA's sidecar injection webhook server (`rampart ca --inject-webhook`): TLS with the
//! CA's own serving certificate, HTTP/1.1 and HTTP/2; what it answers is
//! [`rampart::webhook`].

use std::sync::Arc;
use std::time::Duration;

use rampart::inject::Options;
use rampart::webhook::{InjectorStats, handle};

/// Connections served at once; more wait in the kernel's backlog.
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// How long a TLS handshake, and then a request's head, may take.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(10);

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
        let (acceptor, opts, stats) = (acceptor.clone(), opts.clone(), stats.clone());
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
                let (opts, stats) = (opts.clone(), stats.clone());
                async move { Ok::<_, std::convert::Infallible>(handle(req, &opts, &stats).await) }
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
