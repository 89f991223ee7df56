//! Prometheus metrics of the agent and the `/metrics` endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::throttle::{AcceptBackoff, LogThrottle, log_accept_error};
use rampart_certs::timestamp::unix_secs_f64 as unix_secs;

type Labels = Vec<(String, String)>;

/// The agent's metrics. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    expiry_ts: Family<Labels, Gauge<f64, AtomicU64>>,
    expiry_remaining: Family<Labels, Gauge<f64, AtomicU64>>,
    not_after: Mutex<HashMap<String, SystemTime>>,
    rotations: Family<Labels, Counter>,
    ca_errors: Family<Labels, Counter>,
    expired: Family<Labels, Counter>,
    revoked: Family<Labels, Counter>,
    pub(crate) crls_served: Gauge,
    pub(crate) crls_refused: Counter,
    pub(crate) sds_streams: Gauge,
    pub(crate) sds_pushes: Counter,
    pub(crate) sds_nacks: Counter,
    pub(crate) workload_api_streams: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn id_label(id: &str) -> Labels {
    vec![("spiffe_id".to_owned(), id.to_owned())]
}

// === impl Metrics ===

impl Metrics {
    /// Register every metric.
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            expiry_ts: Family::default(),
            expiry_remaining: Family::default(),
            not_after: Mutex::new(HashMap::new()),
            rotations: Family::default(),
            ca_errors: Family::default(),
            expired: Family::default(),
            revoked: Family::default(),
            crls_served: Gauge::default(),
            crls_refused: Counter::default(),
            sds_streams: Gauge::default(),
            sds_pushes: Counter::default(),
            sds_nacks: Counter::default(),
            workload_api_streams: Gauge::default(),
        };
        r.register(
            "rampart_agent_cert_expiry_timestamp_seconds",
            "Not-after of the served workload certificate (Unix seconds)",
            m.expiry_ts.clone(),
        );
        r.register(
            "rampart_agent_cert_expiry_seconds",
            "Seconds until the served workload certificate expires (negative: expired)",
            m.expiry_remaining.clone(),
        );
        r.register(
            "rampart_agent_cert_rotations",
            "Certificates obtained from the CA and installed",
            m.rotations.clone(),
        );
        r.register(
            "rampart_agent_ca_errors",
            "Failed CSR attempts by reason (unreachable, refused, bad_response, local)",
            m.ca_errors.clone(),
        );
        r.register(
            "rampart_agent_cert_expired",
            "Certificates that expired before renewal and were withdrawn (fail closed)",
            m.expired.clone(),
        );
        r.register(
            "rampart_agent_cert_revoked",
            "Certificates withdrawn because a CRL of their CA revoked them (then renewed)",
            m.revoked.clone(),
        );
        r.register(
            "rampart_agent_crls_served",
            "CRLs served in ROOTCA and ca-crl.pem (validated against trusted CAs)",
            m.crls_served.clone(),
        );
        r.register(
            "rampart_agent_crls_refused",
            "CRLs from the CA that did not validate and were not served",
            m.crls_refused.clone(),
        );
        r.register(
            "rampart_agent_sds_streams",
            "Open SDS streams",
            m.sds_streams.clone(),
        );
        r.register(
            "rampart_agent_sds_pushes",
            "SDS responses sent",
            m.sds_pushes.clone(),
        );
        r.register(
            "rampart_agent_sds_nacks",
            "SDS NACKs received",
            m.sds_nacks.clone(),
        );
        r.register(
            "rampart_agent_workload_api_streams",
            "Open SPIFFE Workload API streams",
            m.workload_api_streams.clone(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = r;
        m
    }

    pub(crate) fn cert_installed(&self, id: &str, not_after: SystemTime) {
        self.rotations.get_or_create(&id_label(id)).inc();
        let ts = unix_secs(not_after);
        self.expiry_ts.get_or_create(&id_label(id)).set(ts);
        self.not_after
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), not_after);
    }

    pub(crate) fn cert_expired(&self, id: &str) {
        self.expired.get_or_create(&id_label(id)).inc();
    }

    pub(crate) fn cert_revoked(&self, id: &str) {
        self.revoked.get_or_create(&id_label(id)).inc();
    }

    pub(crate) fn ca_error(&self, id: &str, err: &Error) {
        let reason = match err {
            Error::CaUnreachable { .. } => "unreachable",
            Error::CaRefused { .. } => "refused",
            Error::BadCaResponse(_) => "bad_response",
            _ => "local",
        };
        let mut l = id_label(id);
        l.push(("reason".to_owned(), reason.to_owned()));
        self.ca_errors.get_or_create(&l).inc();
    }

    /// The text exposition (remaining-time gauges computed now).
    pub fn render(&self) -> String {
        let now = unix_secs(SystemTime::now());
        for (id, na) in self
            .not_after
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            self.expiry_remaining
                .get_or_create(&id_label(id))
                .set(unix_secs(*na) - now);
        }
        let mut out = String::new();
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }

    /// Serve `GET /metrics` on `addr` until `shutdown`; see [`serve_metrics`] for the limits.
    pub async fn serve(
        self: Arc<Self>,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Metrics {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
        serve_metrics(listener, self, shutdown).await;
        Ok(())
    }
}

/// Connections served at once on the metrics port; at the limit a new one closes the oldest.
pub(crate) const METRICS_MAX_CONNECTIONS: usize = 16;
/// How long one metrics connection may live (a scrape takes milliseconds).
pub(crate) const METRICS_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request head may take to arrive.
const METRICS_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

static ACCEPT_ERRORS: LogThrottle = LogThrottle::new(Duration::from_secs(10));

/// Serve `GET /metrics` on `listener` until `shutdown`, with the CA metrics port's limits
/// (the agent's descriptors are shared with its SDS sockets and file output, so the port is
/// bounded on its own): at most [`METRICS_MAX_CONNECTIONS`] at once, each for at most
/// [`METRICS_CONNECTION_TIMEOUT`], request heads within 10 s, accept errors (out of
/// descriptors) backed off 5 ms to 1 s and logged at most once per 10 s. At the limit a new
/// connection closes the **oldest** one instead of being turned away, so peers holding idle
/// connections cannot lock a scrape out (a scrape is answered within a millisecond).
pub(crate) async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let open: Arc<Mutex<OpenConnections>> = Arc::default();
    let mut backoff = AcceptBackoff::default();
    let _abort_all = AbortAll(open.clone());
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => {
                    backoff.reset();
                    tcp
                }
                Err(e) => {
                    let wait = backoff.failed();
                    log_accept_error(&ACCEPT_ERRORS, "metrics", &e, wait);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            },
        };
        // Registered under the lock before the task can deregister itself, so it always
        // finds (and removes) its own entry.
        let mut table = open.lock().unwrap_or_else(|p| p.into_inner());
        if table.live.len() >= METRICS_MAX_CONNECTIONS
            && let Some((_, oldest)) = table.live.pop_first()
        {
            oldest.abort();
        }
        let id = table.next;
        table.next += 1;
        let (me, gone) = (metrics.clone(), open.clone());
        let task = tokio::spawn(async move {
            let _gone = Deregister(gone, id);
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let me = me.clone();
                    async move {
                        if req.uri().path() == "/metrics" {
                            hyper::Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(me.render())))
                        } else {
                            hyper::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"not found\n")))
                        }
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(METRICS_CONNECTION_TIMEOUT, conn).await;
        });
        table.live.insert(id, task.abort_handle());
    }
}

/// The metrics port's open connections, oldest first.
#[derive(Default)]
struct OpenConnections {
    next: u64,
    live: std::collections::BTreeMap<u64, tokio::task::AbortHandle>,
}

/// Removes a connection's entry when its task ends (served, timed out or aborted).
struct Deregister(Arc<Mutex<OpenConnections>>, u64);

impl Drop for Deregister {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live
            .remove(&self.1);
    }
}

/// Closes every open connection when the server stops.
struct AbortAll(Arc<Mutex<OpenConnections>>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        let live = std::mem::take(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()).live);
        for (_, task) in live {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn scrape(addr: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: m\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("an answer")
            .unwrap();
        out
    }

    /// Before, every idle connection was kept forever (no cap, no timeout): 371 of them
    /// exhausted a 256-descriptor limit and the agent could accept nothing else. Now, with
    /// three times the cap held idle, a scrape is still served, at most the cap stay open,
    /// and the oldest idle connection is the one closed. Twin: a scrape on a quiet port.
    #[tokio::test]
    async fn idle_connections_beyond_the_cap_do_not_stop_a_scrape() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let m = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve_metrics(l, m, stop.clone()));
        assert!(scrape(addr).await.starts_with("HTTP/1.1 200"));

        let mut idle = Vec::new();
        for _ in 0..3 * METRICS_MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            // Let the server register each one (in order) before the next.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let out = scrape(addr).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("rampart_agent_sds_streams"), "{out}");
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut buf))
            .await
            .expect("the oldest idle connection is closed, not left hanging")
            .unwrap_or(0);
        assert_eq!(n, 0);
        let mut open = 0;
        for s in &mut idle {
            if tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf))
                .await
                .is_err()
            {
                open += 1;
            }
        }
        assert!(
            open <= METRICS_MAX_CONNECTIONS,
            "{open} idle connections still open"
        );
        stop.cancel();
        server.await.unwrap();
    }

    /// A connection that never finishes its request head is closed after the header-read
    /// timeout (paused time), not held for ever. Twin: a complete request is answered.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_request_head_is_closed() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve_metrics(l, Arc::new(Metrics::new()), stop.clone()));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost:")
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(METRICS_CONNECTION_TIMEOUT * 2, s.read_to_end(&mut out))
            .await
            .expect("closed by the server")
            .unwrap();
        assert!(!String::from_utf8_lossy(&out).contains("200 OK"));
        assert!(scrape(addr).await.starts_with("HTTP/1.1 200"));
        stop.cancel();
        server.await.unwrap();
    }
}
