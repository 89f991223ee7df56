//! `rampart ca`: run the CA; `rampart ca bench`: drive one with load; `rampart ca revoke`:
//! revoke issued certificates through the running CA's admin socket; `rampart ca audit`:
//! query the issuance audit log offline.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rampart_certs::{KeyAlgorithm, PrivateKey, SpiffeId, TrustBundle, TrustDomain};
use rampart_citadel::{CaConfig, JwtIssuerConfig};

use super::ca_load::{LoadConfig, run_load};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct CaArgs {
    #[command(subcommand)]
    command: Option<CaCommand>,
    #[command(flatten)]
    run: Box<RunArgs>,
}

#[derive(Debug, clap::Subcommand)]
enum CaCommand {
    /// Load generator: CreateCertificate over TLS from many concurrent streams.
    Bench(BenchArgs),
    /// Revoke certificates this CA issued (by serial, or every unexpired one of a SPIFFE
    /// ID) through the running CA's admin socket (<state>/admin.sock); the CA re-signs and
    /// publishes its CRL at once. With `--kubernetes` it also waits (up to 10 s) until the
    /// serials are shared with the other CA replicas, and exits 1 if they are not yet.
    Revoke(RevokeArgs),
    /// List issued certificates from the audit log (offline): serial, identity, not-after,
    /// caller.
    Audit(AuditArgs),
}

#[derive(Debug, clap::Args)]
struct RevokeArgs {
    /// The running CA's state directory (its admin socket is admin.sock in it).
    #[arg(long, default_value = "./var/lib/rampart/ca")]
    state: PathBuf,
    /// Serial number (hex) of one certificate. With `--kubernetes`, a serial this replica did
    /// not issue (another replica did: each audit log holds its own) is revoked too, for
    /// every replica, with its identity unknown here.
    #[arg(
        long,
        conflicts_with = "spiffe_id",
        required_unless_present = "spiffe_id"
    )]
    serial: Option<String>,
    /// Every unexpired certificate issued to this SPIFFE ID (with `--kubernetes`: by any
    /// replica; each revokes what its own audit log shows it issued up to now).
    #[arg(long)]
    spiffe_id: Option<String>,
    /// RFC 5280 reason (keyCompromise, superseded, ...).
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Debug, clap::Args)]
struct AuditArgs {
    /// The CA's state directory (audit.jsonl in it).
    #[arg(long, default_value = "./var/lib/rampart/ca")]
    state: PathBuf,
    /// Audit log file, when not <state>/audit.jsonl.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Only certificates of this SPIFFE ID.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Only certificates issued at or after this time: RFC 3339 (2026-12-06T08:00:00Z) or
    /// a duration ago (15m, 2h, 7d).
    #[arg(long)]
    since: Option<String>,
    /// Only certificates not expired yet.
    #[arg(long)]
    unexpired: bool,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    compliance: super::ComplianceArgs,
    /// gRPC (TLS) listen address.
    #[arg(long, default_value = "127.0.0.1:15012")]
    listen: SocketAddr,
    /// `cacerts` plug-in directory, watched: Istio's layout (ca-cert.pem, ca-key.pem,
    /// cert-chain.pem, root-cert.pem) or cert-manager's kubernetes.io/tls one (tls.crt,
    /// tls.key, ca.crt; a tls.crt selects it, as in istiod); optional ca-crl.pem. With neither
    /// tls.crt nor ca-cert.pem a self-signed root is used.
    #[arg(long, default_value = "./etc/cacerts")]
    cacerts: PathBuf,
    /// State directory: self-signed root (key 0600) and audit log.
    #[arg(long, default_value = "./var/lib/rampart/ca")]
    state: PathBuf,
    /// Accepted bearer-token issuer (repeatable; the n-th --jwks belongs to the n-th issuer).
    #[arg(long = "jwt-issuer", value_name = "ISS")]
    jwt_issuer: Vec<String>,
    /// JWKS file of the matching --jwt-issuer. Re-read with the plug-in directory (every
    /// reload poll): rotated keys apply without a restart; a broken file is refused and the
    /// previous keys stay.
    #[arg(long, value_name = "FILE")]
    jwks: Vec<PathBuf>,
    /// Token audience.
    #[arg(long, default_value = rampart_citadel::DEFAULT_AUDIENCE)]
    audience: String,
    /// Mesh trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime when a request asks for none [default: 24h, Istio's DEFAULT_WORKLOAD_CERT_TTL].
    #[arg(long, value_parser = humantime::parse_duration)]
    default_ttl: Option<Duration>,
    /// Requests for a longer lifetime are refused [default: 90d, Istio's
    /// MAX_WORKLOAD_CERT_TTL].
    #[arg(long, value_parser = humantime::parse_duration)]
    max_ttl: Option<Duration>,
    /// Lifetime of the self-signed root this CA makes when no plug-in material is given; it
    /// is renewed (same key and subject) with 20% of its life left.
    #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
    self_signed_root_ttl: Duration,
    /// Monitoring listen address (plain HTTP): GET /metrics (Prometheus), /ready (200
    /// `ready` while this CA can issue, else 503 with one `not ready: <reason>` line each:
    /// gRPC server not running, signing chain or serving certificate expired, last audit log
    /// write failed), /healthz (200 while the process answers); other paths 404.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// DNS SAN of the CA's serving certificate (repeatable).
    #[arg(long = "server-dns", default_values = rampart_citadel::DEFAULT_SERVER_DNS_NAMES)]
    server_dns: Vec<String>,
    /// IP SAN of the CA's serving certificate (repeatable).
    #[arg(long = "server-ip", default_value = "127.0.0.1")]
    server_ip: Vec<IpAddr>,
    /// A node agent allowed to request other identities via ImpersonatedIdentity
    /// (repeatable): `SPIFFE_ID=PATTERN[,PATTERN...]`, each pattern `NAMESPACE/SA`,
    /// `NAMESPACE/*` or `*` (every workload of the trust domain: must be spelled out; a bare
    /// SPIFFE_ID is refused). No node agent may ask for another node agent's identity; each may
    /// ask for its own.
    #[arg(long = "node-agent", value_name = "SPIFFE_ID=PATTERNS")]
    node_agent: Vec<String>,
    /// Audit log file (default <state>/audit.jsonl).
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Write the trust bundle (PEM) here at start and after every reload. Never one of the
    /// CA's own files (the self-signed root or key in --state, the audit log, the cacerts
    /// files of either layout): such a path is refused at startup.
    #[arg(long, value_name = "FILE")]
    bundle_out: Option<PathBuf>,
    /// Largest accepted CSR (bytes of PEM).
    #[arg(long, default_value_t = 16 * 1024)]
    max_csr_bytes: usize,
    /// Per-request deadline.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Requests processed at once.
    #[arg(long, default_value_t = 1024)]
    max_concurrency: usize,
    /// Open TCP connections at most (in handshake or established). At the limit the CA stops
    /// accepting until one closes (excess connections wait in the kernel's backlog). The
    /// soft open-file limit is raised to the hard one at start; if that is still too low
    /// for this, the limit is lowered to fit and a warning says so.
    #[arg(long, default_value_t = rampart_citadel::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// TLS handshakes in progress at most; a new connection beyond it drops the oldest
    /// pending handshake, so stalled handshakes cannot lock real clients out.
    #[arg(long, default_value_t = rampart_citadel::DEFAULT_MAX_HANDSHAKES)]
    max_handshakes: usize,
    /// Time a connection gets to finish its TLS handshake.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// Poll interval of the cacerts directory (in addition to change notifications).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    reload_interval: Duration,
    /// Lifetime (nextUpdate) of the CRL the CA signs for its signing certificate; it is
    /// re-signed with half of it left and at every revocation.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    crl_validity: Duration,
    /// Serve proxies their configuration (rampart.config.v1.ConfigDiscovery, on this port,
    /// mTLS) from this mesh folder (mesh.yaml, workloads.yaml, policy YAML), watched for
    /// edits: `rampart proxy --control-plane` reads it (docs/KUBERNETES.md "Config
    /// streaming").
    #[arg(long, value_name = "DIR")]
    config_folder: Option<PathBuf>,
    #[command(flatten)]
    kube: KubeArgs,
    #[command(flatten)]
    webhook: WebhookArgs,
}

/// The sidecar injection webhook (docs/KUBERNETES.md, "Automatic injection").
#[derive(Debug, clap::Args)]
struct WebhookArgs {
    /// Serve the sidecar injection webhook (POST /inject, an admission.k8s.io/v1
    /// AdmissionReview; HTTPS with the CA's own serving certificate, so --server-dns must
    /// name the Service the API server calls) on this address, e.g. 0.0.0.0:15017 (istiod's
    /// port). Pods are injected as `rampart inject` injects manifests.
    #[arg(long, value_name = "ADDR")]
    inject_webhook: Option<SocketAddr>,
    /// Image of the injected agent and proxy containers.
    #[arg(long, value_name = "IMAGE", default_value = super::inject::DEFAULT_IMAGE)]
    inject_image: String,
    /// CA address the injected sidecars dial (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT", default_value = rampart::inject::DEFAULT_CA_ADDRESS)]
    inject_ca_address: String,
    /// With --kubernetes: the MutatingWebhookConfiguration whose webhooks' caBundle the
    /// Lease holder keeps equal to the CA's roots (as istiod patches its injector's).
    #[arg(
        long,
        value_name = "NAME",
        default_value = rampart_k8s::injector::WEBHOOK_CONFIG
    )]
    inject_webhook_config: String,
}

/// Kubernetes mode (docs/KUBERNETES.md, "CA in Kubernetes mode").
#[derive(Debug, clap::Args)]
struct KubeArgs {
    /// Kubernetes mode: bearer tokens are checked by the API server's TokenReview (not
    /// --jwt-issuer), impersonation by node authorization, and the CA material comes from
    /// Secret `cacerts` or `istio-ca-secret` in --namespace (written into --cacerts / --state).
    #[arg(long)]
    kubernetes: bool,
    /// kubeconfig file; without it the in-cluster configuration (in a Pod) or
    /// $KUBECONFIG / ~/.kube/config.
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// The CA's namespace (its Secrets). Default istio-system.
    #[arg(long, value_name = "NS", requires = "kubernetes")]
    namespace: Option<String>,
    /// This cluster's id: a request whose `clusterid` header names another cluster is
    /// refused (a request without the header is taken as for this cluster, as istiod does).
    #[arg(long, value_name = "ID", requires = "kubernetes")]
    cluster_id: Option<String>,
    /// Service accounts (NAMESPACE/NAME, comma-separated or repeated) that may ask for the
    /// identity of workloads with a Pod on their own node via ImpersonatedIdentity, e.g.
    /// istio-system/ztunnel. None by default.
    #[arg(
        long = "trusted-node-accounts",
        value_name = "NS/SA",
        value_delimiter = ',',
        requires = "kubernetes"
    )]
    trusted_node_accounts: Vec<String>,
    /// The audience TokenReview checks tokens for (default: --audience, istio-ca).
    #[arg(long, value_name = "AUD", requires = "kubernetes")]
    token_audience: Option<String>,
    /// How often the holder of the Lease `istio-namespace-controller-election` makes
    /// ConfigMap istio-ca-root-cert current in every namespace (and how often the others try
    /// to take the Lease; it lasts three intervals).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, requires = "kubernetes")]
    root_publish_interval: Duration,
    /// The mesh's root namespace (Istio's MeshConfig `rootNamespace`): policies in it apply
    /// to every namespace. Used for the configuration streamed to proxies.
    #[arg(
        long,
        value_name = "NS",
        default_value = "istio-system",
        requires = "kubernetes"
    )]
    root_namespace: String,
    /// Istio's mesh config ConfigMap in --root-namespace (its `mesh` key: path normalization,
    /// extension providers): `istio`, or `istio-<revision>` to follow a revisioned istiod.
    #[arg(
        long,
        value_name = "NAME",
        default_value = rampart_mesh::kube::MESH_CONFIGMAP.0,
        requires = "kubernetes"
    )]
    mesh_configmap: String,
}

/// Kubernetes mode's settings, checked.
struct KubeMode {
    kubeconfig: Option<PathBuf>,
    namespace: String,
    cluster_id: Option<String>,
    trusted: Vec<rampart_k8s::NodeAccount>,
    audience: String,
    publish_interval: Duration,
    root_namespace: String,
    mesh_configmap: String,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    compliance: super::ComplianceArgs,
    /// CA to drive. Without it, an in-process CA (self-signed, temporary state) is started.
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// Root(s) to verify an external CA with (PEM).
    #[arg(long, value_name = "FILE", requires = "addr")]
    ca_root: Option<PathBuf>,
    /// Bearer token file for an external CA.
    #[arg(long, value_name = "FILE", requires = "addr")]
    token: Option<PathBuf>,
    /// The identity the token proves (CSRs are made for it) for an external CA.
    #[arg(long, value_name = "SPIFFE_ID", requires = "addr")]
    spiffe_id: Option<String>,
    /// Name to verify the CA's certificate for.
    #[arg(long, default_value = "127.0.0.1")]
    server_name: String,
    /// TLS connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Run time.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Pre-made CSRs (distinct keys), used round-robin.
    #[arg(long, default_value_t = 256)]
    csrs: usize,
    /// Requested lifetime.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Worker threads of the runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// The CA's process id (with --addr): report the CPU time it spent per certificate
    /// during the run, from /proc/PID/stat, so the load generator's share does not count.
    #[arg(long, requires = "addr")]
    pid: Option<u32>,
}

impl CaArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Some(CaCommand::Bench(b)) => b.run(),
            Some(CaCommand::Revoke(r)) => r.run(),
            Some(CaCommand::Audit(a)) => a.run(),
            None => self.run.run(),
        }
    }
}

impl RunArgs {
    fn kube_mode(&self) -> anyhow::Result<Option<KubeMode>> {
        let k = &self.kube;
        if !k.kubernetes {
            return Ok(None);
        }
        if !self.jwt_issuer.is_empty() {
            return Err(super::bad_input(
                "--jwt-issuer does not apply with --kubernetes: tokens are checked by TokenReview",
            ));
        }
        if !self.node_agent.is_empty() {
            return Err(super::bad_input(
                "--node-agent does not apply with --kubernetes: use --trusted-node-accounts NS/SA",
            ));
        }
        let trusted = k
            .trusted_node_accounts
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|e| super::bad_input(format!("--trusted-node-accounts: {e}")))
            })
            .collect::<anyhow::Result<_>>()?;
        let namespace = k.namespace.clone().unwrap_or_else(|| "istio-system".into());
        if namespace.is_empty() {
            return Err(super::bad_input("--namespace must not be empty"));
        }
        if k.root_namespace.is_empty() {
            return Err(super::bad_input("--root-namespace must not be empty"));
        }
        // A field selector value: a ConfigMap name (DNS subdomain), nothing that could add a
        // selector term.
        let cm = &k.mesh_configmap;
        if cm.is_empty()
            || cm.len() > 253
            || !cm
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(super::bad_input(format!(
                "--mesh-configmap {cm:?}: not a ConfigMap name (lower-case letters, digits, '-', '.')"
            )));
        }
        Ok(Some(KubeMode {
            kubeconfig: k.kubeconfig.clone(),
            namespace,
            cluster_id: k.cluster_id.clone().filter(|c| !c.is_empty()),
            trusted,
            audience: k
                .token_audience
                .clone()
                .unwrap_or_else(|| self.audience.clone()),
            publish_interval: k.root_publish_interval.max(Duration::from_millis(100)),
            root_namespace: k.root_namespace.clone(),
            mesh_configmap: k.mesh_configmap.clone(),
        }))
    }

    fn config(self) -> anyhow::Result<CaConfig> {
        let td: TrustDomain = self
            .trust_domain
            .parse()
            .map_err(|e| super::bad_input(format!("--trust-domain: {e}")))?;
        if self.jwt_issuer.len() != self.jwks.len() {
            return Err(super::bad_input(format!(
                "--jwt-issuer given {} times but --jwks {} times; give one JWKS file per issuer",
                self.jwt_issuer.len(),
                self.jwks.len()
            )));
        }
        let mut cfg = CaConfig::new(self.cacerts, self.state, td);
        cfg.listen = self.listen;
        cfg.jwt_issuers = self
            .jwt_issuer
            .into_iter()
            .zip(self.jwks)
            .map(|(issuer, jwks_path)| JwtIssuerConfig { issuer, jwks_path })
            .collect();
        cfg.audience = self.audience;
        // Unset: CaConfig's defaults, rampart_certs' DEFAULT/MAX_WORKLOAD_CERT_TTL.
        cfg.default_ttl = self.default_ttl.unwrap_or(cfg.default_ttl);
        cfg.self_signed_root_ttl = self.self_signed_root_ttl;
        cfg.max_ttl = self.max_ttl.unwrap_or(cfg.max_ttl);
        cfg.metrics = self.metrics;
        cfg.server_dns_names = self.server_dns;
        cfg.server_ips = self.server_ip;
        cfg.node_agents = self
            .node_agent
            .iter()
            .map(|s| node_agent_grant(s))
            .collect::<anyhow::Result<_>>()?;
        cfg.audit_log = self.audit_log;
        cfg.bundle_out = self.bundle_out;
        cfg.max_csr_bytes = self.max_csr_bytes;
        cfg.request_timeout = self.request_timeout;
        cfg.max_concurrency = self.max_concurrency;
        cfg.reload_poll_interval = self.reload_interval;
        cfg.max_connections = fit_connection_limit(self.max_connections);
        cfg.max_handshakes = self.max_handshakes.min(cfg.max_connections);
        cfg.handshake_timeout = self.handshake_timeout;
        cfg.crl_validity = self.crl_validity;
        cfg.validate()
            .map_err(|e| super::bad_input(e.to_string()))?;
        Ok(cfg)
    }

    fn run(self) -> anyhow::Result<ExitCode> {
        self.compliance.apply();
        let kube = self.kube_mode()?;
        let config_folder = self.config_folder.clone();
        if let Some(d) = &config_folder
            && !d.is_dir()
        {
            return Err(super::bad_input(format!(
                "--config-folder {}: not a directory",
                d.display()
            )));
        }
        let webhook = self.webhook_options()?;
        let cfg = self.config()?;
        // Ports first: a CA that cannot listen makes no root or audit log on its way out. The
        // probes stay bound until all are made, so two flags naming one port clash here too.
        let mut probes = Vec::new();
        let mut held = Vec::new();
        for (flag, addr) in std::iter::once(("--listen", cfg.listen))
            .chain(cfg.metrics.map(|m| ("--metrics", m)))
            .chain(webhook.as_ref().map(|w| ("--inject-webhook", w.0)))
        {
            if let Some((other, _)) = probes
                .iter()
                .find(|(_, a): &&(&str, SocketAddr)| *a == addr && addr.port() != 0)
            {
                return Err(super::bad_input(format!(
                    "{flag} {addr}: the same address as {other}"
                )));
            }
            match std::net::TcpListener::bind(addr) {
                Ok(l) => {
                    probes.push((flag, addr));
                    held.push(l);
                    continue;
                }
                Err(e) => {
                    let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                        format!(
                            " (another `rampart ca` or `rampart up`? `ss -ltnp 'sport = :{}'` names what holds it)",
                            addr.port()
                        )
                    } else {
                        String::new()
                    };
                    return Err(super::bad_input(format!("{flag} {addr}: {e}{hint}")));
                }
            }
        }
        drop(held);
        // Without an issuer (and outside Kubernetes) only a caller with a certificate this CA
        // issued can be served: say so, since nothing else will until a first caller fails.
        let no_issuer = kube.is_none() && cfg.jwt_issuers.is_empty();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("start tokio runtime")?;
        rt.block_on(async move {
            let (state, cluster) = match kube {
                None => (
                    rampart_citadel::CaState::new(cfg, rampart_citadel::Metrics::new())?,
                    None,
                ),
                Some(k) => {
                    let (state, cluster) = start_in_kubernetes(cfg, k).await?;
                    (state, Some(cluster))
                }
            };
            // Proxy configuration: the folder when given, else the cluster's objects in
            // Kubernetes mode (as istiod serves certificates and config on one port).
            let bundle_keeper = cluster
                .as_ref()
                .map(|c| (c.client.clone(), c.holding.clone()));
            let routes = match (config_folder, cluster) {
                (Some(dir), _) => config_routes(&state, dir).await?,
                (None, Some(cluster)) => kube_config_routes(&state, cluster),
                (None, None) => tonic::service::Routes::default(),
            };
            let ca = rampart_citadel::start_with_routes(state, routes).await?;
            let webhook_addr = match webhook {
                Some((addr, opts, config_name)) => Some(
                    start_webhook(ca.state(), addr, opts, config_name, bundle_keeper).await?,
                ),
                None => None,
            };
            let authority = ca.state().authority();
            println!(
                "rampart ca: listening on {} (gRPC istio.v1.auth.IstioCertificateService, TLS 1.3, h2)",
                ca.local_addr
            );
            println!("rampart ca: material: {}", authority.source());
            println!(
                "rampart ca: signing root sha256:{} ({})",
                authority.signing_root().fingerprint,
                authority.signing_root().subject
            );
            for r in authority.roots() {
                println!("rampart ca: serving root sha256:{} ({})", r.fingerprint, r.subject);
            }
            if no_issuer {
                tracing::warn!(
                    "no --jwt-issuer: only callers presenting a certificate this CA issued can \
                     get one; a first certificate needs a token of an issuer given with \
                     --jwt-issuer and --jwks"
                );
            }
            if let Some(m) = ca.metrics_addr {
                println!("rampart ca: metrics on http://{m}/metrics");
                println!(
                    "rampart ca: readiness on http://{m}/ready, liveness on http://{m}/healthz"
                );
            }
            if let Some(w) = webhook_addr {
                println!(
                    "rampart ca: sidecar injection webhook on https://{w}{}",
                    rampart::webhook::INJECT_PATH
                );
            }
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
            super::process::shutdown_signal().await;
            tracing::info!("shutting down");
            ca.shutdown().await;
            Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
        })
    }
}

impl RunArgs {
    /// The injection webhook's address, injection options and configuration name, checked.
    fn webhook_options(
        &self,
    ) -> anyhow::Result<Option<(SocketAddr, rampart::inject::Options, String)>> {
        let w = &self.webhook;
        let Some(addr) = w.inject_webhook else {
            return Ok(None);
        };
        let opts = rampart::inject::Options {
            image: w.inject_image.clone(),
            ca_address: w.inject_ca_address.clone(),
            trust_domain: self.trust_domain.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        rampart::inject::validate_options(&opts).map_err(|e| {
            super::bad_input(format!(
                "--inject-webhook: {}",
                e.replace("--ca-address", "--inject-ca-address")
                    .replace("--image", "--inject-image")
            ))
        })?;
        if w.inject_webhook_config.is_empty() {
            return Err(super::bad_input(
                "--inject-webhook-config must not be empty",
            ));
        }
        Ok(Some((addr, opts, w.inject_webhook_config.clone())))
    }
}

/// Binds and serves the injection webhook with the CA's serving certificate; in Kubernetes
/// mode the Lease holder also keeps the webhook configuration's caBundle equal to the CA's
/// roots. Returns the bound address.
async fn start_webhook(
    state: &Arc<rampart_citadel::CaState>,
    addr: SocketAddr,
    opts: rampart::inject::Options,
    config_name: String,
    bundle_keeper: Option<(rampart_k8s::KubeClient, Arc<std::sync::atomic::AtomicBool>)>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| super::bad_input(format!("--inject-webhook {addr}: {e}")))?;
    let bound = listener.local_addr()?;
    let tls = super::webhook::tls_config(state.serving_store()).map_err(anyhow::Error::msg)?;
    let stats = rampart::webhook::InjectorStats::default();
    state.metrics().register_extra(|r| stats.register(r));
    tokio::spawn(super::webhook::serve(
        listener,
        Arc::new(tls),
        Arc::new(opts),
        stats,
    ));
    if let Some((client, holding)) = bundle_keeper {
        let roots = state.clone();
        tokio::spawn(rampart_k8s::injector::keep_ca_bundle(
            client,
            config_name,
            rampart_k8s::injector::KeeperTiming::default(),
            move || roots.authority().bundle().to_pem(),
            move || holding.load(std::sync::atomic::Ordering::Relaxed),
            |_| {},
        ));
    }
    Ok(bound)
}

/// The CA's verified client certificates, as the config stream's callers.
struct CaCallers(Arc<rampart_citadel::CaState>);

impl rampart_discovery::Authenticator for CaCallers {
    fn caller(&self, extensions: &tonic::Extensions) -> Result<SpiffeId, String> {
        self.0.caller_certificate_id(extensions)
    }
}

/// The config stream (`ConfigDiscovery`) fed by the watched mesh folder `dir`, for the CA's
/// port. A folder that does not load at start is an error; later refused edits keep the
/// last good model.
async fn config_routes(
    state: &Arc<rampart_citadel::CaState>,
    dir: PathBuf,
) -> anyhow::Result<tonic::service::Routes> {
    let (first, updates) = rampart_mesh::watch::watch_folder(
        rampart_mesh::FolderSource::new(&dir),
        rampart_mesh::watch::DEFAULT_POLL,
    )
    .await;
    let first = first.map_err(|problems| {
        super::bad_input(format!(
            "--config-folder {}: {}",
            dir.display(),
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ))
    })?;
    let svc = rampart_discovery::ConfigService::spawn(
        Arc::new(CaCallers(state.clone())),
        Some(&first),
        updates,
    );
    state.metrics().register_extra(|r| svc.stats().register(r));
    println!(
        "rampart ca: serving proxy configuration (rampart.config.v1.ConfigDiscovery) from {}",
        dir.display()
    );
    Ok(tonic::service::Routes::new(svc.into_server()))
}

/// What Kubernetes mode hands on to the config stream: the client and the mesh settings.
struct Cluster {
    client: rampart_k8s::KubeClient,
    settings: rampart_mesh::kube::KubeSettings,
    /// Whether this replica holds the publisher's Lease, as of its last tick.
    holding: Arc<std::sync::atomic::AtomicBool>,
}

/// The config stream fed by the cluster: `security.istio.io` policy, Pods, Services and
/// Namespaces watched by [`rampart_k8s::KubeConfigSource`]. Streams wait (proxies fail
/// closed) until every watch has listed once; an invalid object is refused alone.
fn kube_config_routes(
    state: &Arc<rampart_citadel::CaState>,
    cluster: Cluster,
) -> tonic::service::Routes {
    let root = cluster.settings.root_namespace.clone();
    let source = rampart_k8s::KubeConfigSource::new(cluster.client, cluster.settings);
    // The source's refusals and watch errors, and the streams' counters, on the CA's /metrics.
    let source_metrics = source.metrics();
    state
        .metrics()
        .register_extra(|r| source_metrics.register(r));
    let updates = source.start();
    let svc =
        rampart_discovery::ConfigService::spawn(Arc::new(CaCallers(state.clone())), None, updates);
    state.metrics().register_extra(|r| svc.stats().register(r));
    println!(
        "rampart ca: serving proxy configuration (rampart.config.v1.ConfigDiscovery) from the \
         cluster's policy, Pods and Services (root namespace {root})"
    );
    tonic::service::Routes::new(svc.into_server())
}

/// Loads the CA material from the cluster's Secrets and prepares the CA with TokenReview and
/// node authorization judging bearer tokens.
async fn start_in_kubernetes(
    cfg: CaConfig,
    k: KubeMode,
) -> anyhow::Result<(Arc<rampart_citadel::CaState>, Cluster)> {
    let client = rampart_k8s::client(k.kubeconfig.as_deref())
        .await
        .map_err(|e| super::bad_input(e.to_string()))?;
    // Before the Secrets' material is written into the state directory.
    let lock = rampart_citadel::StateLock::acquire(&cfg.state_dir)?;
    let origin = rampart_k8s::material::sync_ca_material(
        &client,
        &k.namespace,
        &cfg.cacerts_dir,
        &cfg.state_dir,
        &cfg.trust_domain,
        cfg.self_signed_root_ttl,
    )
    .await
    .with_context(|| format!("CA material from Secrets in namespace {}", k.namespace))?;
    println!(
        "rampart ca: kubernetes mode, namespace {}, material from {}",
        k.namespace,
        match origin {
            rampart_k8s::material::Origin::Plugin => "Secret cacerts".to_owned(),
            rampart_k8s::material::Origin::SelfSigned { created } => format!(
                "Secret istio-ca-secret ({})",
                if created { "created" } else { "loaded" }
            ),
        }
    );
    // Changes to Secret cacerts (watched) land in the plug-in folder, which the CA hot-reloads
    // with the folder's refusal rules (broken material is refused before the folder is
    // touched); a deleted cacerts is logged and the CA keeps its material.
    tokio::spawn(rampart_k8s::material::follow_cacerts(
        client.clone(),
        k.namespace.clone(),
        cfg.cacerts_dir.clone(),
        cfg.trust_domain.clone(),
        rampart_k8s::material::CACERTS_RESYNC,
    ));
    let mut settings = rampart_mesh::kube::KubeSettings::new(cfg.trust_domain.clone());
    settings.root_namespace = k.root_namespace.clone();
    settings.mesh_configmap = k.mesh_configmap.clone();
    // Whether this replica holds the Lease, as of its last tick: the holder also writes a
    // renewed self-signed root back to istio-ca-secret and keeps the injection webhook's
    // caBundle.
    let holding = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cluster = Cluster {
        client: client.clone(),
        settings,
        holding: holding.clone(),
    };
    let self_signed = matches!(origin, rampart_k8s::material::Origin::SelfSigned { .. });
    let state_dir = cfg.state_dir.clone();
    let reload_interval = cfg.reload_poll_interval;
    let auth = rampart_k8s::KubeAuthenticator::new(
        client.clone(),
        rampart_k8s::TokenReviewer::new(
            client.clone(),
            &k.audience,
            rampart_k8s::DEFAULT_REVIEW_CACHE,
        ),
        cfg.trust_domain.clone(),
        k.cluster_id,
        k.trusted,
    );
    let state = rampart_citadel::CaState::new_locked(
        cfg,
        rampart_citadel::Metrics::new(),
        Some(Arc::new(auth)),
        lock,
    )?;
    // Revocations on any replica (its admin socket) shared through ConfigMap
    // rampart-ca-revocations; every replica merges the others', re-signs and publishes.
    let sync =
        rampart_k8s::revocations::RevocationSync::new(client.clone(), &k.namespace, state.clone());
    let sync_metrics = sync.metrics();
    state.metrics().register_extra(|r| sync_metrics.register(r));
    // Before serving: a new or restarted replica (emptyDir state) starts with every revocation.
    if let Err(e) = sync.sync_once().await {
        tracing::error!(error = %e, "revocations of the other CA replicas not loaded before serving; retrying in the background");
    }
    tokio::spawn(sync.run());
    // The root ConfigMap in every namespace, by whichever replica holds the Lease. The
    // identity must be unique per replica: the Pod name in a cluster, else host and pid.
    let identity = std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "rampart-ca".into());
            format!("{host}-{}", std::process::id())
        });
    let elector = rampart_k8s::publish::LeaseElector::new(
        client.clone(),
        &k.namespace,
        rampart_k8s::publish::PUBLISHER_LEASE,
        &identity,
        k.publish_interval * 3,
    );
    if self_signed {
        // A renewed self-signed root goes into istio-ca-secret (by the Lease holder, with
        // optimistic concurrency); the other replicas follow the Secret and load it, so all
        // sign and publish under one root after a renewal.
        let holder = holding.clone();
        let reload = state.clone();
        tokio::spawn(rampart_k8s::material::follow_ca_secret(
            client.clone(),
            k.namespace.clone(),
            state_dir,
            reload_interval,
            move || holder.load(std::sync::atomic::Ordering::Relaxed),
            move || {
                let reload = reload.clone();
                tokio::task::spawn_blocking(move || reload.reload_now());
            },
        ));
    }
    let publisher = rampart_k8s::publish::RootPublisher::new(client, String::new());
    let bundle_of = state.clone();
    tokio::spawn(rampart_k8s::publish::run_reporting(
        elector,
        publisher,
        k.publish_interval,
        move || {
            let crls = bundle_of.revocations().current().set.to_pem();
            (bundle_of.authority().bundle().to_pem(), Some(crls))
        },
        move |event| {
            if let rampart_k8s::publish::PublishEvent::Tick(outcome) = event {
                let held = matches!(outcome, Ok(Some(_)));
                holding.store(held, std::sync::atomic::Ordering::Relaxed);
            }
        },
    ));
    Ok((state, cluster))
}

impl RevokeArgs {
    fn run(self) -> anyhow::Result<ExitCode> {
        use rampart_citadel::{AdminRequest, admin_request, admin_socket_path};
        if let Some(r) = &self.reason {
            r.parse::<rampart_certs::RevocationReason>()
                .map_err(|e| super::bad_input(format!("--reason: {e}")))?;
        }
        let req = AdminRequest::Revoke {
            serial: self.serial,
            spiffe_id: self.spiffe_id,
            reason: self.reason,
        };
        let answer = admin_request(&admin_socket_path(&self.state), &req)
            .map_err(|e| super::bad_input(format!("CA admin socket: {e}")))?;
        if !answer.ok {
            return Err(super::bad_input(format!(
                "revocation refused: {}",
                answer.error.unwrap_or_default()
            )));
        }
        for r in &answer.revoked {
            let what = if r.new { "revoked" } else { "already revoked" };
            if r.spiffe_id.is_empty() {
                println!(
                    "{what} serial {} (not issued by this replica: identity unknown here; on \
                     every replica's CRL until {} at the latest, the longest a workload \
                     certificate can live; it takes effect if this CA's signing certificate \
                     issued it)",
                    r.serial, r.not_after
                );
            } else {
                println!(
                    "{what} serial {} ({}, not after {})",
                    r.serial, r.spiffe_id, r.not_after
                );
            }
        }
        if let Some(rule) = &answer.identity_rule {
            if answer.revoked.is_empty() {
                println!(
                    "this replica issued no unexpired certificate to {}",
                    rule.spiffe_id
                );
            }
            println!(
                "identity revocation recorded: every CA replica revokes the certificates it \
                 issued to {} before {}",
                rule.spiffe_id, rule.issued_before
            );
        }
        println!(
            "CRL published: version {}, {} revoked on the CA's CRL, next update {}",
            answer.crl_version,
            answer.crl_entries,
            answer.next_update.as_deref().unwrap_or("-")
        );
        // Kubernetes mode: did the serials reach the other CA replicas?
        let Some(share) = answer.shared else {
            return Ok(ExitCode::SUCCESS);
        };
        use rampart_citadel::ShareState;
        if share.state == ShareState::Shared {
            println!("shared with the other CA replicas through {}", share.target);
            return Ok(ExitCode::SUCCESS);
        }
        let why = match (share.state, share.error) {
            (ShareState::Failing, Some(e)) => e,
            (_, Some(e)) => format!(
                "not in {} after {} s; the last attempt failed: {e}",
                share.target,
                rampart_citadel::SHARE_WAIT.as_secs()
            ),
            (_, None) => format!(
                "not in {} after {} s",
                share.target,
                rampart_citadel::SHARE_WAIT.as_secs()
            ),
        };
        eprintln!(
            "rampart ca revoke: NOT YET SHARED with the other CA replicas: {why}. This replica \
             enforces the revocation and keeps retrying; the other replicas do not until it is \
             shared (see rampart_ca_revocation_share_failing). Run the same command again to \
             check."
        );
        Ok(ExitCode::FAILURE)
    }
}

impl AuditArgs {
    fn run(self) -> anyhow::Result<ExitCode> {
        let path = self
            .audit_log
            .clone()
            .unwrap_or_else(|| self.state.join("audit.jsonl"));
        let now = std::time::SystemTime::now();
        let since = match self.since.as_deref() {
            None => None,
            Some(s) => Some(
                rampart_citadel::parse_rfc3339(s)
                    .or_else(|| {
                        super::certs::parse_duration(s)
                            .ok()
                            .and_then(|d| now.checked_sub(d))
                    })
                    .ok_or_else(|| {
                        super::bad_input(format!(
                            "--since {s:?}: expected an RFC 3339 time or a duration such as 2h"
                        ))
                    })?,
            ),
        };
        let id = match self.spiffe_id.as_deref() {
            Some(s) => Some(
                SpiffeId::parse(s)
                    .map_err(|e| super::bad_input(format!("--spiffe-id: {e}")))?
                    .to_string(),
            ),
            None => None,
        };
        let (entries, skipped) =
            rampart_citadel::read_audit_log(&path).map_err(|e| super::bad_input(e.to_string()))?;
        if skipped > 0 {
            eprintln!(
                "warning: {skipped} line(s) of {} did not parse and were skipped",
                path.display()
            );
        }
        let selected = entries.iter().filter(|e| {
            id.as_ref().is_none_or(|id| e.spiffe_id == *id)
                && since.is_none_or(|s| e.issued_at().is_some_and(|t| t >= s))
                && (!self.unexpired || e.expires_at().is_some_and(|t| t > now))
        });
        let mut out = std::io::stdout().lock();
        use std::io::Write as _;
        if self.json {
            for e in selected {
                writeln!(out, "{}", serde_json::to_string(e)?)?;
            }
        } else {
            // The identity column as wide as its longest value, so CALLER lines up.
            let selected: Vec<_> = selected.collect();
            let w = selected
                .iter()
                .map(|e| e.spiffe_id.len())
                .max()
                .unwrap_or(0)
                .max("IDENTITY".len());
            writeln!(
                out,
                "{:<21} {:<33} {:<21} {:<w$}  CALLER",
                "ISSUED", "SERIAL", "NOT AFTER", "IDENTITY"
            )?;
            for e in selected {
                writeln!(
                    out,
                    "{:<21} {:<33} {:<21} {:<w$}  {}",
                    e.time, e.serial, e.not_after, e.spiffe_id, e.caller
                )?;
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

impl BenchArgs {
    fn run(self) -> anyhow::Result<ExitCode> {
        self.compliance.apply();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.threads.max(1))
            .enable_all()
            .build()
            .context("start tokio runtime")?;
        rt.block_on(self.run_async())
    }

    async fn run_async(self) -> anyhow::Result<ExitCode> {
        let mut _in_process = None;
        let mut _tmp = None;
        let (addr, bundle, token, id) = match self.addr {
            Some(addr) => {
                let root = self
                    .ca_root
                    .as_ref()
                    .ok_or_else(|| super::bad_input("--addr needs --ca-root"))?;
                let token_file = self
                    .token
                    .as_ref()
                    .ok_or_else(|| super::bad_input("--addr needs --token"))?;
                let id = self
                    .spiffe_id
                    .as_deref()
                    .ok_or_else(|| super::bad_input("--addr needs --spiffe-id"))?;
                let bundle = TrustBundle::from_pem(
                    &std::fs::read_to_string(root)
                        .with_context(|| format!("read {}", root.display()))?,
                )
                .map_err(|e| super::bad_input(format!("--ca-root: {e}")))?;
                let token = std::fs::read_to_string(token_file)
                    .with_context(|| format!("read {}", token_file.display()))?
                    .trim()
                    .to_owned();
                let id = SpiffeId::parse(id)
                    .map_err(|e| super::bad_input(format!("--spiffe-id: {e}")))?;
                (addr, bundle, token, id)
            }
            None => {
                let dir = TempDir::new()?;
                let (ca, token, id) = start_in_process(&dir.0).await?;
                let bundle = ca.state().authority().bundle().clone();
                let addr = ca.local_addr;
                _in_process = Some(ca);
                _tmp = Some(dir);
                (addr, bundle, token, id)
            }
        };
        eprintln!("rampart ca bench: making {} CSRs for {id}", self.csrs);
        let mut csrs = Vec::with_capacity(self.csrs);
        for _ in 0..self.csrs.max(1) {
            let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
            csrs.push(rampart_certs::build_csr(&key, &id)?);
        }
        let tls = Arc::new(rampart_citadel::client::config(&bundle, None)?);
        let cfg = LoadConfig {
            addr,
            server_name: self.server_name.clone(),
            tls,
            token: Some(token),
            csrs: Arc::new(csrs),
            connections: self.connections,
            concurrency: self.concurrency,
            duration: self.duration,
            ttl_secs: self.ttl.as_secs() as i64,
        };
        eprintln!(
            "rampart ca bench: {} connections, {} in flight, {:?} against {addr}{}",
            self.connections,
            self.concurrency,
            self.duration,
            if _in_process.is_some() {
                " (in-process CA)"
            } else {
                ""
            }
        );
        let cpu_before = self.pid.map(super::bench::process_cpu).transpose()?;
        let report = run_load(cfg).await?;
        let cpu_after = self.pid.map(super::bench::process_cpu).transpose()?;
        println!(
            "issued {} certs in {:.2}s: {:.0} certs/s, p50 {:.2} ms, p99 {:.2} ms, errors {}",
            report.issued,
            report.elapsed.as_secs_f64(),
            report.rate(),
            report.p50.as_secs_f64() * 1e3,
            report.p99.as_secs_f64() * 1e3,
            report.errors
        );
        if let (Some(pid), Some(a), Some(b), true) =
            (self.pid, cpu_before, cpu_after, report.issued > 0)
        {
            let cpu = b.saturating_sub(a);
            println!(
                "CA pid {pid}: {:.2}s CPU = {:.1} us per certificate",
                cpu.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / report.issued as f64
            );
        }
        if let Some(e) = &report.first_error {
            eprintln!("rampart ca bench: first error: {e}");
        }
        if let Some(ca) = _in_process.take() {
            ca.shutdown().await;
        }
        Ok(if report.errors == 0 && report.issued > 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

/// Starts a CA with a self-signed root in `dir`, a freshly made token issuer, and returns a
/// token for `spiffe://cluster.local/ns/bench/sa/load`.
async fn start_in_process(
    dir: &std::path::Path,
) -> anyhow::Result<(rampart_citadel::RunningCa, String, SpiffeId)> {
    let td: TrustDomain = "cluster.local".parse()?;
    let signer_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
    let signer = rampart_certs::jwt::JwtSigner::new(&signer_key, "bench")?;
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, signer.jwks()?.to_json().to_string())?;
    let now = rampart_certs::timestamp::unix_secs_u64(std::time::SystemTime::now());
    let token = signer.sign(&serde_json::json!({
        "iss": "rampart-bench",
        "sub": "system:serviceaccount:bench:load",
        "aud": ["istio-ca"],
        "iat": now,
        "exp": now + 3600,
    }))?;
    let mut cfg = CaConfig::new(dir.join("cacerts"), dir.join("state"), td.clone());
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.jwt_issuers = vec![JwtIssuerConfig {
        issuer: "rampart-bench".into(),
        jwks_path,
    }];
    let ca = rampart_citadel::start(cfg).await?;
    Ok((ca, token, SpiffeId::istio(&td, "bench", "load")?))
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let p =
            std::env::temp_dir().join(format!("rampart-ca-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&p).with_context(|| format!("create {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// File descriptors kept for everything but client connections (listeners, files, the
/// runtime, the metrics endpoint).
const RESERVED_FDS: u64 = 256;

/// Raises the open-file limit ([`super::process::raise_nofile_limit`]), then returns
/// `wanted` lowered, with a warning, if the descriptors still do not cover it.
fn fit_connection_limit(wanted: usize) -> usize {
    let Some(soft) = super::process::raise_nofile_limit() else {
        return wanted; // unlimited
    };
    let room = soft.saturating_sub(RESERVED_FDS).max(16) as usize;
    if room < wanted {
        tracing::warn!(
            wanted,
            allowed = room,
            open_file_limit = soft,
            "--max-connections lowered to fit the open-file limit (raise `ulimit -Hn` for more)"
        );
        return room;
    }
    wanted
}

/// `--node-agent SPIFFE_ID[=PATTERN,...]`.
fn node_agent_grant(arg: &str) -> anyhow::Result<rampart_citadel::NodeAgentGrant> {
    let (id, patterns) = match arg.split_once('=') {
        Some((id, p)) => (id, Some(p)),
        None => (arg, None),
    };
    let id =
        SpiffeId::parse(id).map_err(|e| super::bad_input(format!("--node-agent {arg}: {e}")))?;
    let may_act_for = match patterns {
        None => {
            return Err(super::bad_input(format!(
                "--node-agent {arg}: the grant must be explicit; spell out {id}=NAMESPACE/SA,... \
                 (or NAMESPACE/*), or {id}=* if it may really act for every workload of the \
                 trust domain"
            )));
        }
        Some(p) => p
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .map_err(|e| super::bad_input(format!("--node-agent {arg}: pattern {e}")))
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
    };
    Ok(rampart_citadel::NodeAgentGrant { id, may_act_for })
}
