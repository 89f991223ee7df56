//! The end-to-end load generator behind `rampart ca bench`: many concurrent CreateCertificate
//! streams over a few TLS connections (`rampart_citadel::client::connect`), pre-made CSRs,
//! reporting certificates per second and latency percentiles.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rampart_proto::istio::v1::auth::IstioCertificateRequest;

use anyhow::{Context as _, bail};

/// What to run.
#[derive(Clone)]
pub(crate) struct LoadConfig {
    /// The CA.
    pub(crate) addr: SocketAddr,
    /// Name to verify the CA's certificate for.
    pub(crate) server_name: String,
    /// TLS client configuration (roots, optional client certificate).
    pub(crate) tls: Arc<rustls::ClientConfig>,
    /// Bearer token sent with every request, if any.
    pub(crate) token: Option<String>,
    /// Pre-made PEM CSRs, used round-robin.
    pub(crate) csrs: Arc<Vec<String>>,
    /// TLS connections to open.
    pub(crate) connections: usize,
    /// Requests in flight at once (spread over the connections).
    pub(crate) concurrency: usize,
    /// How long to run.
    pub(crate) duration: Duration,
    /// `validity_duration` to request (seconds; 0 = the CA default).
    pub(crate) ttl_secs: i64,
}

impl std::fmt::Debug for LoadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadConfig")
            .field("addr", &self.addr)
            .field("connections", &self.connections)
            .field("concurrency", &self.concurrency)
            .field("duration", &self.duration)
            .finish_non_exhaustive()
    }
}

/// What happened.
#[derive(Debug, Clone)]
pub(crate) struct LoadReport {
    /// Certificates issued.
    pub(crate) issued: u64,
    /// Failed requests.
    pub(crate) errors: u64,
    /// Wall time of the run.
    pub(crate) elapsed: Duration,
    /// Median latency of successful requests.
    pub(crate) p50: Duration,
    /// 99th percentile latency of successful requests.
    pub(crate) p99: Duration,
    /// The first error seen, if any.
    pub(crate) first_error: Option<String>,
}

impl LoadReport {
    /// Issued certificates per second.
    pub(crate) fn rate(&self) -> f64 {
        self.issued as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the load and reports.
pub(crate) async fn run_load(cfg: LoadConfig) -> anyhow::Result<LoadReport> {
    if cfg.csrs.is_empty() || cfg.connections == 0 || cfg.concurrency == 0 {
        bail!("load generator needs CSRs, connections and concurrency");
    }
    let mut clients = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections {
        clients.push(
            rampart_citadel::client::connect(cfg.addr, &cfg.server_name, cfg.tls.clone()).await?,
        );
    }
    let auth: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = match &cfg.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .ok()
                .context("token is not a valid header value")?,
        ),
        None => None,
    };
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut tasks = Vec::with_capacity(cfg.concurrency);
    for i in 0..cfg.concurrency {
        let mut client = clients[i % clients.len()].clone();
        let csrs = cfg.csrs.clone();
        let auth = auth.clone();
        let ttl = cfg.ttl_secs;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0u64;
            let mut first_error = None;
            let mut n = i;
            while Instant::now() < deadline {
                let mut req = tonic::Request::new(IstioCertificateRequest {
                    csr: csrs[n % csrs.len()].clone(),
                    validity_duration: ttl,
                    metadata: None,
                });
                n += 1;
                if let Some(a) = &auth {
                    req.metadata_mut().insert("authorization", a.clone());
                }
                let t0 = Instant::now();
                match client.create_certificate(req).await {
                    Ok(resp) if resp.get_ref().cert_chain.len() >= 2 => {
                        lat.push(t0.elapsed().as_micros() as u32)
                    }
                    Ok(_) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| "short chain".to_owned());
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (lat, e, fe) = t.await.context("load task failed")?;
        all.extend(lat);
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    let pct = |p: f64| -> Duration {
        if all.is_empty() {
            return Duration::ZERO;
        }
        let idx = ((all.len() as f64 - 1.0) * p).round() as usize;
        Duration::from_micros(u64::from(all[idx]))
    };
    Ok(LoadReport {
        issued: all.len() as u64,
        errors,
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        first_error,
    })
}
