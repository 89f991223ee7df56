//! Prometheus metrics with Istio's names (`citadel_server_*`), rendered by hand in the text
//! exposition format so the names are exactly Istio's (no `_total` suffix added), and the
//! monitoring port that serves them with the CA's health: `GET /metrics`, `GET /ready`
//! (200 `ready` when the CA can issue now, else 503 with one `not ready: ...` line per
//! reason), `GET /healthz` (200 while the process's runtime answers); any other path 404.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::refusal::Refusal;

/// Counters of the CA. Cheap to update from the request path (relaxed atomics).
#[derive(Debug)]
pub struct Metrics {
    csr_count: AtomicU64,
    success: AtomicU64,
    auth_failures: AtomicU64,
    csr_parsing_errors: AtomicU64,
    id_extraction_errors: AtomicU64,
    refusals: Vec<AtomicU64>,
    reload_success: AtomicU64,
    reload_failure: AtomicU64,
    inflight: AtomicU64,
    connections_refused: [AtomicU64; ConnectionRefusal::ALL.len()],
    connections_open: AtomicU64,
    handshakes_in_progress: AtomicU64,
    expiry: std::sync::Mutex<Expiry>,
    /// (issuer, nextUpdate) of every served CRL.
    crls: std::sync::Mutex<Vec<(String, SystemTime)>>,
    revocations: AtomicU64,
    /// Metrics of what else the process serves on the CA's port (the config stream),
    /// rendered after the CA's own.
    extra: std::sync::Mutex<prometheus_client::registry::Registry>,
}

/// Why the CA's listener gave up on (or held back) a TCP connection, the `reason` label of
/// `citadel_server_connection_refused_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefusal {
    /// The TLS handshake did not finish within the handshake timeout.
    HandshakeTimeout,
    /// All handshake slots were taken by a newer arrival: the oldest pending handshake was
    /// dropped to make room.
    HandshakeEvicted,
    /// The TLS handshake failed (not TLS 1.3, bad client certificate, garbage).
    HandshakeFailed,
    /// The connection limit was reached: accepting paused (excess connections wait in the
    /// kernel's backlog); counted once per pause.
    ConnectionLimit,
    /// The metrics port was at its own connection limit: its oldest connection was closed to
    /// make room for a new one (so idle peers cannot lock the kubelet's probes out).
    MetricsConnectionLimit,
    /// An established connection that had moved no byte for a while, closed at the
    /// connection limit to make room.
    IdleEvicted,
}

impl ConnectionRefusal {
    const ALL: [ConnectionRefusal; 6] = [
        ConnectionRefusal::HandshakeTimeout,
        ConnectionRefusal::HandshakeEvicted,
        ConnectionRefusal::HandshakeFailed,
        ConnectionRefusal::ConnectionLimit,
        ConnectionRefusal::MetricsConnectionLimit,
        ConnectionRefusal::IdleEvicted,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            ConnectionRefusal::HandshakeTimeout => "handshake_timeout",
            ConnectionRefusal::HandshakeEvicted => "handshake_evicted",
            ConnectionRefusal::HandshakeFailed => "handshake_failed",
            ConnectionRefusal::ConnectionLimit => "connection_limit",
            ConnectionRefusal::MetricsConnectionLimit => "metrics_connection_limit",
            ConnectionRefusal::IdleEvicted => "idle_evicted",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Expiry {
    root_not_after: Option<SystemTime>,
    chain_not_after: Option<SystemTime>,
}

// === impl Metrics ===

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            csr_count: AtomicU64::new(0),
            success: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            csr_parsing_errors: AtomicU64::new(0),
            id_extraction_errors: AtomicU64::new(0),
            refusals: Refusal::LABELS.iter().map(|_| AtomicU64::new(0)).collect(),
            reload_success: AtomicU64::new(0),
            reload_failure: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            connections_refused: Default::default(),
            connections_open: AtomicU64::new(0),
            handshakes_in_progress: AtomicU64::new(0),
            expiry: std::sync::Mutex::new(Expiry::default()),
            crls: std::sync::Mutex::new(Vec::new()),
            revocations: AtomicU64::new(0),
            extra: std::sync::Mutex::default(),
        }
    }
}

impl Metrics {
    /// A fresh set of metrics.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Register more metrics (what else the process serves beside the CA) in the registry
    /// rendered on `/metrics` after the CA's own.
    pub fn register_extra(&self, f: impl FnOnce(&mut prometheus_client::registry::Registry)) {
        f(&mut self.extra.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub(crate) fn csr_received(&self) {
        self.csr_count.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn issued(&self) {
        self.success.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused(&self, r: &Refusal) {
        if r.is_authentication_failure() {
            self.auth_failures.fetch_add(1, Ordering::Relaxed);
        }
        match r {
            Refusal::BadCsrPem(_)
            | Refusal::BadCsrSignature
            | Refusal::UnsupportedCsrAlgorithm(_)
            | Refusal::CsrTooLarge { .. } => {
                self.csr_parsing_errors.fetch_add(1, Ordering::Relaxed);
            }
            Refusal::BadCsrSan(_) | Refusal::SanMismatch { .. } => {
                self.id_extraction_errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        let label = r.label();
        if let Some(i) = Refusal::LABELS.iter().position(|l| *l == label) {
            self.refusals[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn reload(&self, ok: bool) {
        if ok {
            self.reload_success.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reload_failure.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn inflight_add(&self, delta: i64) {
        if delta >= 0 {
            self.inflight.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.inflight.fetch_sub((-delta) as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn connection_refused(&self, why: ConnectionRefusal) {
        self.connections_refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connections_open_add(&self, delta: i64) {
        add_signed(&self.connections_open, delta);
    }

    pub(crate) fn handshakes_add(&self, delta: i64) {
        add_signed(&self.handshakes_in_progress, delta);
    }

    /// Connections given up on (or held back) for `why` so far.
    pub fn connection_refused_count(&self, why: ConnectionRefusal) -> u64 {
        self.connections_refused[why as usize].load(Ordering::Relaxed)
    }

    pub(crate) fn set_expiry(&self, root_not_after: SystemTime, chain_not_after: SystemTime) {
        let mut e = self.expiry.lock().unwrap_or_else(|p| p.into_inner());
        e.root_not_after = Some(root_not_after);
        e.chain_not_after = Some(chain_not_after);
    }

    pub(crate) fn set_crls(&self, set: &rampart_certs::CrlSet) {
        *self.crls.lock().unwrap_or_else(|p| p.into_inner()) = set
            .crls()
            .map(|c| (c.issuer().to_owned(), c.next_update()))
            .collect();
    }

    pub(crate) fn revoked(&self, new: bool) {
        if new {
            self.revocations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Number of certificates issued so far.
    pub fn issued_count(&self) -> u64 {
        self.success.load(Ordering::Relaxed)
    }

    /// Number of refused cacerts reloads so far.
    pub fn reload_failure_count(&self) -> u64 {
        self.reload_failure.load(Ordering::Relaxed)
    }

    /// Number of accepted cacerts reloads so far.
    pub fn reload_success_count(&self) -> u64 {
        self.reload_success.load(Ordering::Relaxed)
    }

    /// Renders every metric in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, now: SystemTime) -> String {
        self.render_with_readiness(now, None)
    }

    /// [`Metrics::render`], with `citadel_server_ready` (1 or 0) when `ready` is known.
    pub fn render_with_readiness(&self, now: SystemTime, ready: Option<bool>) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        };
        counter(
            &mut out,
            "citadel_server_csr_count",
            "The number of CSRs received by Citadel server.",
            &self.csr_count,
        );
        counter(
            &mut out,
            "citadel_server_success_cert_issuance_count",
            "The number of certificates issuances that have succeeded.",
            &self.success,
        );
        counter(
            &mut out,
            "citadel_server_authentication_failure_count",
            "The number of authentication failures.",
            &self.auth_failures,
        );
        counter(
            &mut out,
            "citadel_server_csr_parsing_err_count",
            "The number of errors occurred when parsing the CSR.",
            &self.csr_parsing_errors,
        );
        counter(
            &mut out,
            "citadel_server_id_extraction_err_count",
            "The number of errors occurred when extracting the ID from CSR.",
            &self.id_extraction_errors,
        );
        let _ = writeln!(
            out,
            "# HELP citadel_server_csr_sign_err_count The number of refused or failed CSR signings, by reason.\n# TYPE citadel_server_csr_sign_err_count counter"
        );
        for (label, v) in Refusal::LABELS.iter().zip(&self.refusals) {
            let n = v.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "citadel_server_csr_sign_err_count{{error=\"{label}\"}} {n}"
            );
        }
        counter(
            &mut out,
            "citadel_server_cacerts_reload_success_count",
            "The number of accepted changes of the plug-in cacerts directory.",
            &self.reload_success,
        );
        counter(
            &mut out,
            "citadel_server_cacerts_reload_failure_count",
            "The number of refused (invalid) changes of the plug-in cacerts directory; the old material keeps signing.",
            &self.reload_failure,
        );
        let _ = writeln!(
            out,
            "# HELP citadel_server_inflight_requests CreateCertificate requests in progress.\n# TYPE citadel_server_inflight_requests gauge\ncitadel_server_inflight_requests {}",
            self.inflight.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP citadel_server_connection_refused_count TCP connections the CA gave up on before a request, by reason (connection_limit: times accepting paused at the limit).\n# TYPE citadel_server_connection_refused_count counter"
        );
        for (why, v) in ConnectionRefusal::ALL.iter().zip(&self.connections_refused) {
            let _ = writeln!(
                out,
                "citadel_server_connection_refused_count{{reason=\"{}\"}} {}",
                why.label(),
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP citadel_server_connections Open TCP connections (in handshake or established).\n# TYPE citadel_server_connections gauge\ncitadel_server_connections {}",
            self.connections_open.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP citadel_server_handshakes_in_progress TLS handshakes in progress.\n# TYPE citadel_server_handshakes_in_progress gauge\ncitadel_server_handshakes_in_progress {}",
            self.handshakes_in_progress.load(Ordering::Relaxed)
        );
        let e = *self.expiry.lock().unwrap_or_else(|p| p.into_inner());
        let gauge_pair = |out: &mut String, base: &str, what: &str, t: Option<SystemTime>| {
            let Some(t) = t else { return };
            let ts = unix_secs(t);
            let left = ts - unix_secs(now);
            let _ = writeln!(
                out,
                "# HELP {base}_expiry_timestamp The unix timestamp, in seconds, when the {what} will expire.\n# TYPE {base}_expiry_timestamp gauge\n{base}_expiry_timestamp {ts}"
            );
            let _ = writeln!(
                out,
                "# HELP {base}_expiry_seconds The time remaining, in seconds, before the {what} will expire.\n# TYPE {base}_expiry_seconds gauge\n{base}_expiry_seconds {left}"
            );
        };
        gauge_pair(
            &mut out,
            "citadel_server_root_cert",
            "root cert",
            e.root_not_after,
        );
        gauge_pair(
            &mut out,
            "citadel_server_cert_chain",
            "cert in the CA cert chain",
            e.chain_not_after,
        );
        counter(
            &mut out,
            "citadel_server_revoked_cert_count",
            "The number of certificates revoked through the CA's admin interface.",
            &self.revocations,
        );
        let crls = self.crls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let _ = writeln!(
            out,
            "# HELP citadel_server_crl_count CRLs served (the CA's own and the plug-in ones).\n# TYPE citadel_server_crl_count gauge\ncitadel_server_crl_count {}",
            crls.len()
        );
        let _ = writeln!(
            out,
            "# HELP citadel_server_crl_next_update_timestamp The unix timestamp, in seconds, of a served CRL's nextUpdate.\n# TYPE citadel_server_crl_next_update_timestamp gauge"
        );
        for (issuer, next) in &crls {
            let _ = writeln!(
                out,
                "citadel_server_crl_next_update_timestamp{{issuer=\"{}\"}} {}",
                label_value(issuer),
                unix_secs(*next)
            );
        }
        let _ = writeln!(
            out,
            "# HELP citadel_server_crl_expired 1 when a served CRL is past its nextUpdate (still served and enforced: publish a fresh one).\n# TYPE citadel_server_crl_expired gauge"
        );
        for (issuer, next) in &crls {
            let _ = writeln!(
                out,
                "citadel_server_crl_expired{{issuer=\"{}\"}} {}",
                label_value(issuer),
                u8::from(now >= *next)
            );
        }
        if let Some(ready) = ready {
            let _ = writeln!(
                out,
                "# HELP citadel_server_ready 1 when this CA can issue now (GET /ready answers 200), else 0.\n# TYPE citadel_server_ready gauge\ncitadel_server_ready {}",
                u8::from(ready)
            );
        }
        let extra = self.extra.lock().unwrap_or_else(|e| e.into_inner());
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &extra);
        out
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn add_signed(v: &AtomicU64, delta: i64) {
    if delta >= 0 {
        v.fetch_add(delta as u64, Ordering::Relaxed);
    } else {
        v.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
    }
}

/// Whole seconds (certificate times are whole seconds; `now` is cut to match).
fn unix_secs(t: SystemTime) -> f64 {
    rampart_certs::timestamp::unix_secs_f64(t).trunc()
}

/// Scrapes served at once on the metrics port; more are closed on accept.
pub(crate) const METRICS_MAX_CONNECTIONS: usize = 16;
/// How long one metrics connection may live (a scrape takes milliseconds).
pub(crate) const METRICS_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the CA cannot issue now, one reason each (empty: it can), as of the given time:
/// [`CaState::not_ready_reasons`](crate::CaState::not_ready_reasons) for a running CA.
pub type ReadinessCheck = Arc<dyn Fn(SystemTime) -> Vec<String> + Send + Sync>;

/// The readiness reason of a gRPC server that stopped while the CA runs (a restart fixes it).
pub(crate) const GRPC_STOPPED_REASON: &str = "gRPC server stopped";

/// Readiness reasons a restart fixes (a part of the process stopped for good): `/healthz`
/// fails on them, so the kubelet restarts the replica instead of leaving it unready forever.
pub(crate) const RESTART_FIXES: [&str; 2] = [GRPC_STOPPED_REASON, crate::audit::WRITER_STOPPED];

/// What a request on the monitoring port asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics,
    Ready,
    Healthz,
    NotFound,
    MethodNotAllowed,
}

fn route(method: &http::Method, path: &str) -> Route {
    let known = match path {
        "/metrics" => Route::Metrics,
        "/ready" => Route::Ready,
        "/healthz" => Route::Healthz,
        _ => return Route::NotFound,
    };
    if method == http::Method::GET || method == http::Method::HEAD {
        known
    } else {
        Route::MethodNotAllowed
    }
}

/// The answer to one request on the monitoring port.
fn respond(
    method: &http::Method,
    path: &str,
    metrics: &Metrics,
    readiness: &ReadinessCheck,
    now: SystemTime,
) -> (http::StatusCode, &'static str, String) {
    use http::StatusCode;
    const TEXT: &str = "text/plain; charset=utf-8";
    match route(method, path) {
        Route::Metrics => {
            let ready = readiness(now).is_empty();
            (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics.render_with_readiness(now, Some(ready)),
            )
        }
        Route::Ready => {
            let reasons = readiness(now);
            if reasons.is_empty() {
                (StatusCode::OK, TEXT, "ready\n".to_owned())
            } else {
                let mut body = String::new();
                for r in reasons {
                    // One line per reason, whatever a reason holds.
                    let _ = writeln!(body, "not ready: {}", r.replace(['\r', '\n'], " "));
                }
                (StatusCode::SERVICE_UNAVAILABLE, TEXT, body)
            }
        }
        Route::Healthz => {
            // Liveness ignores what a restart cannot fix (expired material, a full disk), but
            // not a part of the process that stopped for good: a restart does fix that.
            let dead: Vec<String> = readiness(now)
                .into_iter()
                .filter(|r| RESTART_FIXES.iter().any(|m| r.contains(m)))
                .collect();
            if dead.is_empty() {
                (StatusCode::OK, TEXT, "ok\n".to_owned())
            } else {
                let mut body = String::new();
                for r in dead {
                    let _ = writeln!(body, "not live: {}", r.replace(['\r', '\n'], " "));
                }
                (StatusCode::SERVICE_UNAVAILABLE, TEXT, body)
            }
        }
        Route::NotFound => (
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: this port serves /metrics, /ready and /healthz\n".to_owned(),
        ),
        Route::MethodNotAllowed => (
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "method not allowed: GET or HEAD\n".to_owned(),
        ),
    }
}

/// Serves the monitoring port on `listener` until the future is dropped: `GET /metrics`
/// (the Prometheus text, with `citadel_server_ready`), `GET /ready` (200 `ready`, or 503
/// with one `not ready: <reason>` line per reason `readiness` gives), `GET /healthz` (200
/// `ok` while the process's runtime answers, 503 only for the readiness reasons a restart
/// fixes, [`RESTART_FIXES`]), anything else 404 (405 for another method on those paths).
///
/// The port shares the CA's descriptor table, so it is bounded on its own: at most
/// [`METRICS_MAX_CONNECTIONS`] at once, each for at most [`METRICS_CONNECTION_TIMEOUT`]
/// (request heads within 10 s), and accept errors (out of descriptors) back off instead of
/// spinning. At the limit a new connection closes the **oldest** one instead of being turned
/// away: peers that open connections and hold them idle cannot lock the kubelet's probes
/// out (which would take the replica out of the Service, then restart it), since a probe is
/// answered within a millisecond of its arrival.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    readiness: ReadinessCheck,
) {
    use hyper::service::service_fn;
    let open: Arc<std::sync::Mutex<OpenConnections>> = Arc::default();
    let mut backoff = Duration::from_millis(5);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(5);
                stream
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "metrics accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        // Registered under the lock before the task can deregister itself, so it always
        // finds (and removes) its own entry.
        let mut table = open.lock().unwrap_or_else(|p| p.into_inner());
        if table.live.len() >= METRICS_MAX_CONNECTIONS
            && let Some((_, oldest)) = table.live.pop_first()
        {
            oldest.abort();
            metrics.connection_refused(ConnectionRefusal::MetricsConnectionLimit);
        }
        let id = table.next;
        table.next += 1;
        let (metrics, readiness, gone) = (metrics.clone(), readiness.clone(), open.clone());
        let task = tokio::spawn(async move {
            let _gone = Deregister(gone, id);
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (status, content_type, body) = respond(
                    req.method(),
                    req.uri().path(),
                    &metrics,
                    &readiness,
                    SystemTime::now(),
                );
                async move {
                    http::Response::builder()
                        .status(status)
                        .header("content-type", content_type)
                        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, svc);
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
struct Deregister(Arc<std::sync::Mutex<OpenConnections>>, u64);

impl Drop for Deregister {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live
            .remove(&self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metrics port is bounded on its own, and idle peers cannot lock a probe out: with
    /// every slot held by an idle connection, a new connection closes the oldest (counted)
    /// and is served; however many idle connections arrive, at most the limit stay open.
    /// (Before, the new connection was the one closed: 16 idle peers made the kubelet's
    /// probes fail, the replica unready, then restarted.)
    #[tokio::test]
    async fn metrics_port_holds_a_bounded_number_of_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let m = Arc::new(Metrics::default());
        let server = tokio::spawn(serve_metrics(l, m.clone(), Arc::new(|_| Vec::new())));
        let mut idle = Vec::new();
        for _ in 0..METRICS_MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept (and register) all of them before the probe arrives.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(get(addr, "GET", "/ready").await, (200, "ready\n".into()));
        assert!(m.connection_refused_count(ConnectionRefusal::MetricsConnectionLimit) >= 1);
        // The oldest idle connection is the one that was closed.
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut buf))
            .await
            .expect("the oldest idle connection is closed, not left hanging")
            .unwrap_or(0);
        assert_eq!(n, 0);

        // Many more idle peers: at most the limit stay open.
        for _ in 0..3 * METRICS_MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut open = 0;
        for s in &mut idle {
            if tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf))
                .await
                .is_err()
            {
                open += 1;
            }
        }
        assert!(open <= METRICS_MAX_CONNECTIONS, "{open} still open");
        // And a scrape is still served, with the evictions counted.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: m\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body).await;
        let refused: u64 = body
            .lines()
            .find_map(|l| {
                l.strip_prefix(
                    "citadel_server_connection_refused_count{reason=\"metrics_connection_limit\"} ",
                )
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no eviction counter in {body}"));
        assert!(refused >= 3 * METRICS_MAX_CONNECTIONS as u64, "{body}");
        server.abort();
    }

    /// One HTTP/1.1 request on the monitoring port: (status, body).
    async fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nhost: m\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("an answer")
            .unwrap();
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {out:?}"));
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// The routes: /metrics (with citadel_server_ready), /ready 200 or 503 with one line per
    /// reason, /healthz 200 whatever readiness says, anything else 404, other methods 405.
    #[tokio::test]
    async fn monitoring_port_routes_metrics_ready_healthz_and_nothing_else() {
        let reasons: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let r = reasons.clone();
        let server = tokio::spawn(serve_metrics(
            l,
            Metrics::new(),
            Arc::new(move |_| r.lock().unwrap().clone()),
        ));

        assert_eq!(get(addr, "GET", "/ready").await, (200, "ready\n".into()));
        assert_eq!(get(addr, "GET", "/healthz").await, (200, "ok\n".into()));
        let (status, text) = get(addr, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(text.contains("\ncitadel_server_csr_count 0\n"), "{text}");
        assert!(text.contains("\ncitadel_server_ready 1\n"), "{text}");
        // A query string does not change the route.
        assert_eq!(get(addr, "GET", "/metrics?x=1").await.0, 200);
        for path in [
            "/",
            "/metric",
            "/metrics/",
            "/ready/x",
            "/readyz",
            "/healthz2",
            "/%2e",
        ] {
            let (status, body) = get(addr, "GET", path).await;
            assert_eq!(status, 404, "{path}: {body}");
            assert!(!body.contains("citadel_server"), "{path}: {body}");
        }
        assert_eq!(get(addr, "POST", "/ready").await.0, 405);
        assert_eq!(get(addr, "HEAD", "/ready").await.0, 200);

        // Negative twin: two reasons (one with a newline in it, kept on its line).
        *reasons.lock().unwrap() = vec![
            "gRPC listener not serving yet".into(),
            "audit log /x: last write failed:\nInjected: line".into(),
        ];
        assert_eq!(
            get(addr, "GET", "/ready").await,
            (
                503,
                "not ready: gRPC listener not serving yet\n\
                 not ready: audit log /x: last write failed: Injected: line\n"
                    .into()
            )
        );
        assert_eq!(get(addr, "GET", "/healthz").await, (200, "ok\n".into()));
        let (status, text) = get(addr, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(text.contains("\ncitadel_server_ready 0\n"), "{text}");

        // A part of the process stopped for good: a restart fixes that, so liveness fails
        // too (and only on those reasons).
        for dead in [
            GRPC_STOPPED_REASON.to_owned(),
            format!(
                "audit log /x: last write failed: {}",
                crate::audit::WRITER_STOPPED
            ),
        ] {
            *reasons.lock().unwrap() =
                vec!["signing certificate CN=x expired at t".into(), dead.clone()];
            let (status, body) = get(addr, "GET", "/healthz").await;
            assert_eq!(status, 503, "{dead}");
            assert_eq!(body, format!("not live: {dead}\n"));
        }
        server.abort();
    }

    #[test]
    fn renders_istio_names_and_labels() {
        let m = Metrics::default();
        m.csr_received();
        m.issued();
        m.refused(&Refusal::TokenExpired);
        m.refused(&Refusal::BadCsrSignature);
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        m.set_expiry(now + std::time::Duration::from_secs(50), now);
        let text = m.render(now);
        assert!(text.contains("\ncitadel_server_csr_count 1\n"), "{text}");
        assert!(text.contains("\ncitadel_server_success_cert_issuance_count 1\n"));
        assert!(text.contains("\ncitadel_server_authentication_failure_count 1\n"));
        assert!(text.contains("\ncitadel_server_csr_parsing_err_count 1\n"));
        assert!(text.contains("citadel_server_csr_sign_err_count{error=\"token_expired\"} 1\n"));
        assert!(
            text.contains("\ncitadel_server_root_cert_expiry_seconds 50\n"),
            "{text}"
        );
        assert!(text.contains("\ncitadel_server_cert_chain_expiry_seconds 0\n"));
        m.connection_refused(ConnectionRefusal::HandshakeEvicted);
        let text = m.render(now);
        assert!(
            text.contains(
                "citadel_server_connection_refused_count{reason=\"handshake_evicted\"} 1\n"
            )
        );
        assert!(
            text.contains(
                "citadel_server_connection_refused_count{reason=\"handshake_timeout\"} 0\n"
            )
        );
        assert!(!text.contains("_total"));
    }
}
