//! Prometheus metrics of the agent and the `/metrics` endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

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

    /// Serve `GET /metrics` on `addr` until `shutdown`.
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
        loop {
            let (tcp, _) = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => { tracing::warn!("metrics accept: {e}"); continue; }
                },
            };
            let me = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
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
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }
}
