//! `rampart agent`: the node agent (SDS + SPIFFE Workload API, keys made here, rotation).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use rampart_certs::TrustDomain;
use rampart_node_agent::{
    Agent, AgentConfig, CaConfig, DEFAULT_CA_SERVER_NAME, DEFAULT_GRACE_RATIO, DEFAULT_SDS_SOCKET,
    RotationConfig, WorkloadConfig, resolve_identity,
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub(crate) struct AgentArgs {
    #[command(flatten)]
    compliance: super::ComplianceArgs,
    /// CA address to dial (host:port), Istio's `CA_ADDR`.
    #[arg(long, env = "CA_ADDR", default_value = "127.0.0.1:15012")]
    ca_addr: String,
    /// PEM root(s) the CA's serving certificate must chain to; also trusted for issued
    /// certificates and served in ROOTCA with the roots the CA returns. Re-read per request.
    #[arg(long)]
    ca_root: PathBuf,
    /// Name the CA's serving certificate must carry (DNS SAN or IP).
    #[arg(long, default_value = DEFAULT_CA_SERVER_NAME)]
    ca_server_name: String,
    /// `clusterid` header sent to the CA (Istio multi-cluster).
    #[arg(long)]
    cluster_id: Option<String>,
    /// File with the bearer token (JWT) for the CA, read at each request. Names the
    /// identity too, unless --namespace and --service-account are given.
    #[arg(long)]
    token: Option<PathBuf>,
    /// Trust domain of the identity.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Namespace of the identity (default: from the token's claims).
    #[arg(long)]
    namespace: Option<String>,
    /// Service account of the identity (default: from the token's claims).
    #[arg(long)]
    service_account: Option<String>,
    /// Envoy SDS socket.
    #[arg(long, default_value = DEFAULT_SDS_SOCKET)]
    sds_socket: PathBuf,
    /// SPIFFE Workload API socket (off unless given); `unix:///path`, `unix:path` or a path.
    /// Not read from `SPIFFE_ENDPOINT_SOCKET`: that variable tells a workload where to
    /// connect (SPIRE's agent may be serving there), not where an agent listens.
    #[arg(long, value_parser = parse_endpoint)]
    workload_api_socket: Option<PathBuf>,
    /// Requested certificate lifetime (e.g. 24h, 90s) [default: 24h, Istio's
    /// DEFAULT_WORKLOAD_CERT_TTL].
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Renew when this fraction of the lifetime remains (Istio SECRET_GRACE_PERIOD_RATIO).
    #[arg(long, env = "SECRET_GRACE_PERIOD_RATIO", default_value_t = DEFAULT_GRACE_RATIO)]
    grace_ratio: f64,
    /// Write cert-chain.pem, key.pem (0600) and root-cert.pem here on every rotation, and
    /// ca-crl.pem whenever the CA's CRLs change (Istio OUTPUT_CERTS).
    #[arg(long, env = "OUTPUT_CERTS")]
    output_dir: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Permission bits of the sockets, octal (600: agent user only; 660: also its group).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// The sockets' directory is a volume only this Pod's sidecar containers mount (what
    /// the injector sets up: an emptyDir, which the kubelet makes 0777): its own mode and
    /// owner are not checked, the directories above it still are. Never for a directory
    /// other users of the machine can reach.
    #[arg(long)]
    trust_socket_dir: bool,
    /// The output directory (--output-dir) is a volume only this Pod's containers that read
    /// the files mount (Istio's OUTPUT_CERTS on an emptyDir, which the kubelet makes 0777):
    /// its own mode and owner are not checked, the directories above it still are. Never
    /// for a directory other users of the machine can reach.
    #[arg(long)]
    trust_output_dir: bool,
    /// Longest retry delay while the CA is unreachable.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    max_backoff: Duration,
    /// How often to ask the CA for its revocation lists (served in ROOTCA's `crl` and as
    /// ca-crl.pem; a revoked certificate of the agent's own is renewed at once). `0s`: off.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    crl_poll_interval: Duration,
    /// Another workload identity with its own sockets (repeatable):
    /// `token=FILE,sds=PATH[,workload-api=PATH][,output-dir=DIR][,ns=NS][,sa=SA]`.
    #[arg(long = "workload", value_name = "SPEC")]
    workloads: Vec<String>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|e| format!("{s:?}: {e}"))
}

/// A Workload API endpoint in SPIFFE's URI form (`unix:///path` or `unix:path`), or a plain
/// path.
fn parse_endpoint(s: &str) -> Result<PathBuf, String> {
    let p = s
        .strip_prefix("unix://")
        .or_else(|| s.strip_prefix("unix:"))
        .unwrap_or(s);
    if p.is_empty() {
        return Err(format!("{s:?} names no socket path"));
    }
    if s.contains("://") && !s.starts_with("unix://") {
        return Err(format!("{s:?}: only unix sockets are supported"));
    }
    Ok(PathBuf::from(p))
}

fn workload_spec(spec: &str, td: &TrustDomain) -> anyhow::Result<WorkloadConfig> {
    let mut token = None;
    let mut sds = None;
    let mut wapi = None;
    let mut out = None;
    let mut ns = None;
    let mut sa = None;
    for kv in spec.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            super::bad_input(format!("--workload {spec:?}: {kv:?} is not key=value"))
        })?;
        match k {
            "token" => token = Some(PathBuf::from(v)),
            "sds" => sds = Some(PathBuf::from(v)),
            "workload-api" => wapi = Some(parse_endpoint(v).map_err(super::bad_input)?),
            "output-dir" => out = Some(PathBuf::from(v)),
            "ns" | "namespace" => ns = Some(v.to_owned()),
            "sa" | "service-account" => sa = Some(v.to_owned()),
            _ => {
                return Err(super::bad_input(format!(
                    "--workload {spec:?}: unknown key {k:?} (token, sds, workload-api, output-dir, ns, sa)"
                )));
            }
        }
    }
    let token = token
        .ok_or_else(|| super::bad_input(format!("--workload {spec:?}: token=FILE is required")))?;
    let id = resolve_identity(td, ns.as_deref(), sa.as_deref(), &token)
        .map_err(|e| super::bad_input(format!("--workload {spec:?}: {e}")))?;
    Ok(WorkloadConfig {
        spiffe_id: id,
        token_path: token,
        sds_socket: sds,
        workload_api_socket: wapi,
        output_dir: out,
    })
}

impl AgentArgs {
    fn config(self) -> anyhow::Result<AgentConfig> {
        let td: TrustDomain = self.trust_domain.parse().map_err(|e| {
            super::bad_input(format!("--trust-domain {:?}: {e}", self.trust_domain))
        })?;
        if !self.ca_root.is_file() {
            return Err(super::bad_input(format!(
                "--ca-root {}: no such file",
                self.ca_root.display()
            )));
        }
        let mut workloads = Vec::new();
        if let Some(token) = &self.token {
            let id = resolve_identity(
                &td,
                self.namespace.as_deref(),
                self.service_account.as_deref(),
                token,
            )
            .map_err(|e| super::bad_input(e.to_string()))?;
            workloads.push(WorkloadConfig {
                spiffe_id: id,
                token_path: token.clone(),
                sds_socket: Some(self.sds_socket.clone()),
                workload_api_socket: self.workload_api_socket.clone(),
                output_dir: self.output_dir.clone(),
            });
        } else if self.workloads.is_empty() {
            return Err(super::bad_input(
                "--token FILE is required (or one or more --workload token=FILE,...)",
            ));
        }
        for spec in &self.workloads {
            workloads.push(workload_spec(spec, &td)?);
        }
        let config = AgentConfig {
            ca: CaConfig {
                addr: self.ca_addr,
                root_path: self.ca_root,
                server_name: self.ca_server_name,
                cluster_id: self.cluster_id,
                request_timeout: Duration::from_secs(10),
            },
            rotation: RotationConfig {
                ttl: self.ttl.unwrap_or(rampart_certs::DEFAULT_WORKLOAD_CERT_TTL),
                grace_ratio: self.grace_ratio,
                backoff_max: self.max_backoff,
                ..RotationConfig::default()
            },
            workloads,
            metrics_addr: self.metrics,
            socket_mode: self.socket_mode,
            trust_socket_dir: self.trust_socket_dir,
            crl_poll_interval: (!self.crl_poll_interval.is_zero())
                .then_some(self.crl_poll_interval),
        };
        config
            .validate()
            .map_err(|e| super::bad_input(e.to_string()))?;
        Ok(config)
    }

    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        self.compliance.apply();
        let trust_output_dir = self.trust_output_dir;
        let config = self.config()?;
        let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
        rt.block_on(async move {
            for w in &config.workloads {
                let mut where_ = Vec::new();
                if let Some(p) = &w.sds_socket {
                    where_.push(format!("SDS {}", p.display()));
                }
                if let Some(p) = &w.workload_api_socket {
                    where_.push(format!("Workload API {}", p.display()));
                }
                if let Some(p) = &w.output_dir {
                    where_.push(format!("files in {}", p.display()));
                }
                eprintln!("rampart agent: {} -> {}", w.spiffe_id, where_.join(", "));
            }
            eprintln!(
                "rampart agent: CA {} ({})",
                config.ca.addr, config.ca.server_name
            );
            let shutdown = CancellationToken::new();
            let mut running = Agent::new(config)?
                .trust_output_dir(trust_output_dir)
                .start(shutdown.clone())
                .await?;
            let sd = shutdown.clone();
            tokio::spawn(async move {
                super::process::shutdown_signal().await;
                tracing::info!("shutting down");
                sd.cancel();
            });
            running.wait().await?;
            Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
        })
    }
}
