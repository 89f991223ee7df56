//! What the comparisons with a real Envoy share (`jwt_envoy_e2e`, `path_envoy_e2e`,
//! `rbac_envoy_e2e`): one Rampart proxy for one workload of a fresh mesh folder, with its
//! certificate from an SDS stand-in, and the Envoy pieces around the filters under test (an
//! HTTP connection manager as istiod configures a sidecar's, the router, one app cluster).
//! Declared by those tests only (they also declare `sds_standin`); each uses a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::sds_standin::{StandIn, TestCa};
use crate::support::{Proc, free_port};

/// A running Rampart proxy and what keeps it served.
pub(crate) struct OneProxy {
    pub(crate) proc: Proc,
    /// Its inbound port (plaintext or mTLS: PERMISSIVE unless the policies say otherwise).
    pub(crate) inbound: u16,
    _standin: StandIn,
    _rt: tokio::runtime::Runtime,
}

/// The workload `ns/name` (labels as a YAML flow mapping) of a mesh folder made in `dir`
/// (`mesh_yaml`, `policy/<file>` for each of `policies`), with one HTTP port 8080 in front of
/// `app`; its proxy started, its certificate from `ca`, and ready.
pub(crate) fn one_proxy(
    dir: &Path,
    mesh_yaml: &str,
    (ns, name, labels): (&str, &str, &str),
    app: &str,
    policies: &[(&str, String)],
    ca: &TestCa,
) -> OneProxy {
    let mesh = dir.join("mesh");
    std::fs::create_dir_all(mesh.join("policy")).unwrap();
    let (inbound, admin) = (free_port(), free_port());
    std::fs::write(mesh.join("mesh.yaml"), mesh_yaml).unwrap();
    std::fs::write(
        mesh.join("workloads.yaml"),
        format!(
            "workloads:\n- name: {name}\n  namespace: {ns}\n  labels: {labels}\n  ports:\n  - {{port: 8080, protocol: http, app: \"{app}\", inbound: \"127.0.0.1:{inbound}\"}}\n  proxy: {{admin: \"127.0.0.1:{admin}\"}}\n"
        ),
    )
    .unwrap();
    for (file, text) in policies {
        std::fs::write(mesh.join("policy").join(file), text).unwrap();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sds = dir.join("sds.sock");
    let td = mesh_yaml
        .lines()
        .find_map(|l| l.strip_prefix("trustDomain: "))
        .unwrap_or("cluster.local")
        .trim();
    let standin = rt.block_on(async {
        crate::sds_standin::start(
            &sds,
            Some(ca.secrets(&format!("spiffe://{td}/ns/{ns}/sa/{name}"), 1)),
        )
    });
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rampart"));
    cmd.args(["proxy", "--mesh"])
        .arg(&mesh)
        .args(["--workload", &format!("{ns}/{name}"), "--sds-socket"])
        .arg(&sds);
    let proc = crate::support::envoy::spawn(cmd, dir.join("proxy.log"));
    crate::support::wait_for(
        &format!("proxy {} ready", dir.display()),
        Duration::from_secs(30),
        || crate::support::envoy::curl(&[&format!("http://127.0.0.1:{admin}/ready")]).0 == "200",
        || proc.log(),
    );
    OneProxy {
        proc,
        inbound,
        _standin: standin,
        _rt: rt,
    }
}

/// Envoy's router filter.
pub(crate) fn router() -> Value {
    json!({"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
}

/// An HTTP connection manager as istiod configures a sidecar's inbound one for a
/// `pathNormalization` mode (`normalize_path`, `merge_slashes`, the escaped-slashes action;
/// BASE is `(true, false, "KEEP_UNCHANGED")`), `filters` then the router, every request to
/// the cluster `app`.
pub(crate) fn hcm(stat: &str, normalization: (bool, bool, &str), filters: Vec<Value>) -> Value {
    let (normalize, merge, escaped) = normalization;
    let mut http_filters = filters;
    http_filters.push(router());
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat,
            "normalize_path": normalize,
            "merge_slashes": merge,
            "path_with_escaped_slashes_action": escaped,
            "http_filters": http_filters,
            "route_config": {"virtual_hosts": [{
                "name": "all", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}]
            }]}
        }
    })
}

/// A plaintext listener on `port` with one filter chain of `hcm`.
pub(crate) fn listener(name: &str, port: u16, hcm: Value) -> Value {
    json!({
        "name": name,
        "address": crate::support::envoy::addr(port),
        "filter_chains": [{"filters": [hcm]}]
    })
}

/// A bootstrap with `listeners` and the cluster `app` at 127.0.0.1:`app_port`.
pub(crate) fn bootstrap(listeners: Vec<Value>, app_port: u16) -> Value {
    let addr = crate::support::envoy::addr;
    json!({
        "node": {"id": "sidecar~127.0.0.1~app.test~test.svc.cluster.local", "cluster": "app.test"},
        "admin": {"address": addr(0)},
        "static_resources": {
            "listeners": listeners,
            "clusters": [{
                "name": "app",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr(app_port)}}]}]}
            }]
        }
    })
}

/// The port of an `ip:port` address.
pub(crate) fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}
