//! `rampart proxy`: the mTLS proxy for one workload of a mesh folder.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

#[derive(Debug, clap::Args)]
pub(crate) struct ProxyArgs {
    #[command(flatten)]
    compliance: super::ComplianceArgs,
    /// The mesh folder (mesh.yaml, workloads.yaml, policy YAML); watched for edits.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "control_plane",
        conflicts_with = "control_plane"
    )]
    mesh: Option<PathBuf>,
    /// Take the configuration from a control plane instead of a folder: the
    /// rampart.config.v1.ConfigDiscovery stream at HOST:PORT (the CA's port, `rampart ca
    /// --config-folder` or Kubernetes mode), over mTLS with this workload's SDS certificate.
    /// Nothing listens until the first complete push; through an outage the last good
    /// configuration keeps serving.
    #[arg(long, value_name = "HOST:PORT")]
    control_plane: Option<String>,
    /// The DNS name (or IP) the control plane's certificate must carry, checked against the
    /// SDS trust bundle.
    #[arg(long, value_name = "NAME", default_value = rampart_proxy::DEFAULT_CONTROL_PLANE_SAN, requires = "control_plane")]
    control_plane_san: String,
    /// The workload this proxy fronts, as NAMESPACE/NAME in workloads.yaml.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    workload: String,
    /// The node agent's SDS socket (certificates and trust bundle come from it).
    #[arg(long, value_name = "PATH")]
    sds_socket: PathBuf,
    /// Admin listener (/stats/prometheus /certs /config_dump /ready /mtls); default: the
    /// registry's proxy.admin.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Most inbound connections handled at once; more are closed on accept and counted in
    /// rampart_proxy_connections_refused_total{listener="inbound"}.
    #[arg(long, alias = "max-connections", default_value_t = 10_000)]
    max_inbound_connections: usize,
    /// Most outbound connections (outbound HTTP proxy, upstream ports, CONNECT tunnels);
    /// a separate budget, so an inbound flood cannot refuse the app's own calls.
    #[arg(long, default_value_t = 10_000)]
    max_outbound_connections: usize,
    /// Most admin connections.
    #[arg(long, default_value_t = 16)]
    max_admin_connections: usize,
    /// A connection must deliver each request's headers within this (then it is closed).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// No byte either way for this long while a request is in flight: the connection is
    /// closed (Envoy's stream_idle_timeout).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    stream_idle_timeout: Duration,
    /// No byte either way for this long with no request in flight (or on a TCP port): the
    /// connection is closed (Envoy's idle_timeout).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Largest request header block accepted, in KiB (Envoy's max_request_headers_kb).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(8..=8192))]
    max_request_headers_kb: u32,
    /// Most request-body bytes held at once, over all requests, for extension providers
    /// that judge bodies (includeRequestBodyInCheck), in KiB; past it such a request is
    /// answered 503 (overloaded).
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(64..=4194304))]
    max_held_body_kb: u32,
    /// Time allowed for a forwarded request's response headers (504 after).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// On SIGTERM/SIGINT: how long in-flight requests may take before they are cut.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// The status listener (Istio's port 15020), plaintext HTTP on this address, e.g.
    /// $(POD_IP):15020: `/stats/prometheus` (the admin listener's metrics, for Prometheus
    /// to scrape from outside the Pod) and the kubelet's rewritten app probes
    /// (`/app-health/<container>/<kind>`), each doing the original probe from --app-probers
    /// against the app on 127.0.0.1 (docs/KUBERNETES.md, "Probes" and "Metrics"). Nothing
    /// else is served there. An IPv6 Pod IP may be given bare (`fd00::5:15020`, as
    /// `$(POD_IP):15020` expands). `--app-probes-listen` is its earlier name.
    #[arg(long, value_name = "ADDR", alias = "app-probes-listen", value_parser = listen_addr)]
    status_listen: Option<std::net::SocketAddr>,
    /// The original probes, as JSON: `/app-health/...` path -> {"httpGet": {...}} or
    /// {"tcpSocket": {...}} with "timeoutSeconds" (what the injector writes; Istio's format).
    #[arg(
        long,
        value_name = "JSON",
        env = "ISTIO_KUBE_APP_PROBERS",
        hide_env_values = true
    )]
    app_probers: Option<String>,
    /// The app's own scrape settings, merged into the status listener's `/stats/prometheus`
    /// (Istio's metrics merging; JSON `{"scrape": "true", "port": "9090", "path":
    /// "/metrics"}`, what the injector moves here from the Pod's `prometheus.io/*`
    /// annotations): the proxy scrapes the app on 127.0.0.1 and serves both.
    #[arg(
        long,
        value_name = "JSON",
        env = "ISTIO_PROMETHEUS_ANNOTATIONS",
        hide_env_values = true
    )]
    app_metrics: Option<String>,
    /// Threads serving connections. One (as linkerd2-proxy defaults to) keeps a request's
    /// hand-offs between its connections on one thread; on the 2-core benchmark machine it
    /// beat two threads in req/s and p99 (docs/PERFORMANCE.md). Raise it for a proxy that
    /// must use more than one core.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
}

impl ProxyArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        self.compliance.apply();
        let Some((ns, name)) = self.workload.split_once('/') else {
            return Err(super::bad_input(format!(
                "--workload {:?}: expected NAMESPACE/NAME",
                self.workload
            )));
        };
        if ns.is_empty() || name.is_empty() {
            return Err(super::bad_input("--workload: expected NAMESPACE/NAME"));
        }
        if let Some(mesh) = &self.mesh
            && !mesh.is_dir()
        {
            return Err(super::bad_input(format!(
                "--mesh {}: not a directory",
                mesh.display()
            )));
        }
        let control_plane = match &self.control_plane {
            Some(addr) => {
                if !addr.contains(':') {
                    return Err(super::bad_input(format!(
                        "--control-plane {addr:?}: expected HOST:PORT"
                    )));
                }
                let mut cp = rampart_proxy::ControlPlaneOptions::new(addr.clone());
                cp.san = self.control_plane_san.clone();
                Some(cp)
            }
            None => None,
        };
        let mut opts = rampart_proxy::ProxyOptions::new(
            self.mesh.clone().unwrap_or_default(),
            self.workload,
            self.sds_socket,
        );
        opts.admin = self.admin;
        opts.max_inbound_connections = self.max_inbound_connections;
        opts.max_outbound_connections = self.max_outbound_connections;
        opts.max_admin_connections = self.max_admin_connections;
        opts.edge = rampart_proxy::EdgeLimits {
            header_read_timeout: self.header_read_timeout,
            stream_idle_timeout: self.stream_idle_timeout,
            idle_timeout: self.idle_timeout,
            max_header_bytes: self.max_request_headers_kb as usize * 1024,
            max_held_body_bytes: usize::try_from(u64::from(self.max_held_body_kb) * 1024)
                .unwrap_or(usize::MAX),
            ..rampart_proxy::EdgeLimits::default()
        };
        super::process::raise_nofile_limit();
        opts.request_timeout = self.request_timeout;
        opts.drain_timeout = self.drain_timeout;
        if let Some(addr) = self.status_listen {
            opts.reserved.push((
                addr,
                "status listener (--status-listen: app probes, /stats/prometheus)".to_string(),
            ));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(self.worker_threads))
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        // Bound and serving before the proxy starts: the kubelet probes the app from its
        // start, and the proxy may wait for its configuration.
        let status = match self.status_listen {
            Some(addr) => {
                let probers = match &self.app_probers {
                    Some(json) => rampart_proxy::app_probes::AppProbers::parse(json)
                        .map_err(|e| super::bad_input(format!("--app-probers: {e}")))?,
                    None => rampart_proxy::app_probes::AppProbers::default(),
                };
                let listener = rt
                    .block_on(tokio::net::TcpListener::bind(addr))
                    .map_err(|e| super::bad_input(format!("--status-listen {addr}: {e}")))?;
                for (path, why) in probers.broken() {
                    tracing::error!(%path, reason = %why, "app probe entry refused; that probe answers 500");
                }
                tracing::info!(%addr, probes = probers.len(),
                    "status listener: /stats/prometheus and the app's probes");
                let app_metrics = self
                    .app_metrics
                    .as_deref()
                    .map(rampart_proxy::app_probes::AppMetrics::parse)
                    .and_then(Result::transpose);
                match &app_metrics {
                    // The proxy's own metrics are still served; the page says why the app's
                    // are not.
                    Some(Err(e)) => tracing::error!(reason = %e,
                        "--app-metrics refused: the app's metrics are not merged"),
                    Some(Ok(m)) => tracing::info!(port = m.port, path = %m.path,
                        "merging the app's metrics into /stats/prometheus"),
                    None => {}
                }
                let metrics = rampart_proxy::app_probes::MetricsSource::with_app(app_metrics);
                opts.status_metrics = Some(metrics.clone());
                Some(rt.spawn(rampart_proxy::app_probes::serve(
                    listener,
                    std::sync::Arc::new(probers),
                    metrics,
                )))
            }
            None => None,
        };
        let result = match control_plane {
            Some(cp) => rt.block_on(rampart_proxy::run_control_plane(
                opts,
                cp,
                super::process::shutdown_signal(),
            )),
            None => rt.block_on(rampart_proxy::run(opts, super::process::shutdown_signal())),
        };
        if let Some(task) = status {
            task.abort();
        }
        rt.shutdown_timeout(Duration::from_millis(200));
        match result {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(
                e
                @ (rampart_proxy::Error::MeshFolder(_) | rampart_proxy::Error::UnknownWorkload(_)),
            ) => Err(super::bad_input(e.to_string())),
            Err(e) => Err(e.into()),
        }
    }
}

/// `IP:PORT`, `[IPv6]:PORT`, or a bare `IPv6:PORT` (what `$(POD_IP):PORT` expands to on an
/// IPv6 Pod: the last colon separates the port).
fn listen_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let (ip, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected IP:PORT"))?;
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|e| format!("{s:?}: {ip:?} is not an IP address: {e}"))?;
    let port: u16 = port
        .parse()
        .map_err(|e| format!("{s:?}: {port:?} is not a port: {e}"))?;
    Ok(std::net::SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    #[test]
    fn listen_addresses_of_ipv4_and_ipv6_pods() {
        use super::listen_addr;
        assert_eq!(
            listen_addr("10.0.0.5:15020").unwrap(),
            "10.0.0.5:15020".parse().unwrap()
        );
        assert_eq!(
            listen_addr("fd00::5:15020").unwrap(),
            "[fd00::5]:15020".parse().unwrap()
        );
        assert_eq!(
            listen_addr("[fd00::5]:15020").unwrap(),
            "[fd00::5]:15020".parse().unwrap()
        );
        for bad in ["15020", "pod:15020", "10.0.0.5:http", "$(POD_IP):15020"] {
            assert!(listen_addr(bad).is_err(), "{bad}");
        }
    }
}
