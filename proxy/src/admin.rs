//! The admin listener: `/stats/prometheus`, `/certs`, `/config_dump`, `/ready`, `/mtls`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rampart_certs::CertInfo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::config::Handle;
use crate::edge::{Activity, Budget, Budgets, EdgeLimits, Tracked, TrackedService};
use crate::identity::IdentityHolder;
use crate::jwks::JwksState;
use crate::metrics::{Metrics, PortTable};
use crate::status::Status;

/// What the admin endpoint reads: handles to the proxy's state, nothing it can change.
pub(crate) struct View {
    pub(crate) cfg: Handle,
    pub(crate) identity: Arc<IdentityHolder>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) ports: Arc<PortTable>,
    pub(crate) budgets: Arc<Budgets>,
    pub(crate) status: Arc<Status>,
    pub(crate) jwks: Arc<JwksState>,
    pub(crate) workload_key: String,
    /// The admin listener's address (bound once, at start).
    pub(crate) admin_addr: Option<std::net::SocketAddr>,
    pub(crate) edge: EdgeLimits,
    /// The control-plane stream's state, when the configuration comes from one.
    pub(crate) control_plane: Option<Arc<crate::status::ControlPlaneStatus>>,
}

use rampart_certs::timestamp::{rfc3339, unix_secs_u64 as unix};

/// The content type of Prometheus' text exposition format.
pub(crate) const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

impl View {
    /// Every metric of this proxy in Prometheus' text format (the admin listener's and the
    /// status listener's `/stats/prometheus`).
    pub(crate) fn prometheus(&self) -> String {
        let mut out = self.metrics.render() + &self.identity.render_metrics();
        self.budgets.render(&mut out);
        if let Some(cp) = &self.control_plane {
            out.push_str(&cp.render());
        }
        out
    }
}

fn reply(status: u16, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn json_reply(v: serde_json::Value) -> Response<Full<Bytes>> {
    reply(
        200,
        "application/json",
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
    )
}

fn cert_json(c: &rampart_certs::CertificateDer<'_>) -> serde_json::Value {
    match CertInfo::parse(c) {
        Ok(i) => json!({
            "spiffe_id": i.uri_sans.first(),
            "subject": i.subject,
            "issuer": i.issuer,
            "serial": i.serial_hex,
            "not_before": rfc3339(i.not_before),
            "not_after": rfc3339(i.not_after),
            "not_after_unix": unix(i.not_after),
            "sha256_fingerprint": i.sha256_fingerprint,
        }),
        Err(e) => json!({"error": e.to_string()}),
    }
}

/// The admin paths that show more than counters: the policy and registry in force
/// (`/config_dump`), the identity (`/certs`), the plaintext clients seen (`/mtls`).
const LOCAL_ONLY: [&str; 3] = ["/config_dump", "/certs", "/mtls"];

/// Whether `peer` may read [`LOCAL_ONLY`] paths: loopback clients always (as Envoy's admin
/// listens on 127.0.0.1 only in Istio), others when `rampart.allowRemoteAdmin` says so.
fn local_only_refused(path: &str, peer: std::net::SocketAddr, allow_remote: bool) -> bool {
    LOCAL_ONLY.contains(&path) && !allow_remote && !peer.ip().to_canonical().is_loopback()
}

fn handle(sh: &View, req: &Request<Incoming>, peer: std::net::SocketAddr) -> Response<Full<Bytes>> {
    let allow_remote = sh.cfg.load().folder.local.allow_remote_admin;
    // `/ready`'s details (listener addresses and their bind errors, why the identity is
    // unusable) are for loopback clients too; others get its first line.
    let brief = !allow_remote && !peer.ip().to_canonical().is_loopback();
    if local_only_refused(req.uri().path(), peer, allow_remote) {
        return reply(
            403,
            "text/plain",
            format!(
                "rampart: {} answers loopback clients only; set rampart.allowRemoteAdmin: true \
                 in mesh.yaml to serve it to {}\n",
                req.uri().path(),
                peer.ip()
            ),
        );
    }
    match req.uri().path() {
        "/stats/prometheus" => reply(200, PROMETHEUS_TEXT, sh.prometheus()),
        "/ready" => {
            let identity = sh.identity.status();
            let cert = identity.is_ok();
            let up = sh.status.listeners_up();
            let jwks = sh.jwks.first_round_done();
            if cert && up && jwks {
                // A listener that failed to bind after a live edit does not make the proxy
                // unready (the others serve, as Envoy keeps serving when a listener update
                // is rejected); it is named here and in /config_dump.
                let mut body = "LIVE\n".to_string();
                for l in sh.status.listeners().iter() {
                    if let Some(e) = &l.error {
                        body.push_str(&format!(
                            "degraded: {} not listening on {}: {e}\n",
                            l.what, l.addr
                        ));
                    }
                }
                if brief {
                    body.truncate("LIVE\n".len());
                }
                reply(200, "text/plain", body)
            } else {
                let why = if brief {
                    "details for loopback clients".to_string()
                } else if !up {
                    "listeners not up".to_string()
                } else if !jwks {
                    "first fetch of the remote JWKS still running".to_string()
                } else {
                    identity.err().unwrap_or_default()
                };
                reply(503, "text/plain", format!("not ready: {why}\n"))
            }
        }
        "/certs" => {
            let st = match sh.identity.status() {
                Ok(st) => st,
                Err(why) => {
                    return json_reply(json!({
                        "workload": sh.workload_key,
                        "expected_spiffe_id": sh.identity.expected_id.to_string(),
                        "certificate": null,
                        "note": format!("{why}: every handshake is refused"),
                    }));
                }
            };
            json_reply(json!({
                "workload": sh.workload_key,
                "spiffe_id": st.id.to_string(),
                "installed_at": rfc3339(st.installed_at),
                "chain": st.chain.iter().map(|c| cert_json(c)).collect::<Vec<_>>(),
                "roots": st.bundle.roots().iter().map(|c| cert_json(c)).collect::<Vec<_>>(),
            }))
        }
        "/config_dump" => {
            let cfg = sh.cfg.load();
            let ports: Vec<_> = cfg
                .port_modes()
                .into_iter()
                .map(|(port, proto, m)| {
                    let e = cfg.me.port(port);
                    json!({
                        "port": port, "protocol": proto.as_str(),
                        "app": e.map(|e| e.app.to_string()),
                        "inbound": e.map(|e| e.inbound.to_string()),
                        "mtls": m,
                    })
                })
                .collect();
            let listeners: Vec<_> = sh.status.listeners().iter().map(|l| l.json()).collect();
            let refusal = sh.status.last_refusal();
            json_reply(json!({
                "workload": redacted_workload(&cfg.me),
                "spiffe_id": cfg.me.spiffe_id(&cfg.folder.trust_domain).to_string(),
                "trust_domain": cfg.folder.trust_domain.to_string(),
                "trust_domain_aliases": cfg.folder.trust_domain_aliases.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "root_namespace": cfg.folder.mesh.root_namespace,
                "path_normalization": cfg.folder.mesh.path_normalization,
                "ports": ports,
                "listeners": listeners,
                "admin": {
                    "address": sh.admin_addr.map(|a| a.to_string()),
                    "note": "the admin listener is bound at start; a changed proxy.admin applies when the proxy restarts",
                },
                "authorization_policies": cfg.engine.policies_for(&cfg.workload),
                "request_authentications": cfg.folder.resources.iter()
                    .filter(|r| r.kind() == rampart_authz::Kind::RequestAuthentication)
                    .filter(|r| r.metadata().namespace() == cfg.me.namespace || r.metadata().namespace() == cfg.folder.mesh.root_namespace)
                    .map(|r| format!("{}/{}", r.metadata().namespace(), r.metadata().name()))
                    .collect::<Vec<_>>(),
                "jwks": crate::jwks::dump(&sh.jwks, &cfg),
                "policy_warnings": cfg.engine.warnings(),
                "loaded_at": rfc3339(cfg.loaded_at),
                "last_refused_edit": refusal.map(|(t, p)| json!({"at": rfc3339(t), "problems": p})),
            }))
        }
        "/mtls" => {
            let cfg = sh.cfg.load();
            let modes = cfg.port_modes();
            // The ports in force; each port's counters live as long as the proxy (a port
            // removed and added again keeps its history).
            let report = rampart_mesh::mtls::MtlsReport {
                workload: sh.workload_key.clone(),
                ports: modes
                    .iter()
                    .map(|(port, proto, m)| {
                        sh.ports.get(*port).json(proto.as_str(), m.mode.as_str())
                    })
                    .collect(),
            };
            json_reply(serde_json::to_value(report).unwrap_or_default())
        }
        _ => reply(
            404,
            "text/plain",
            "endpoints: /stats/prometheus /certs /config_dump /ready /mtls\n".into(),
        ),
    }
}

/// The workload as `/config_dump` shows it: the app's command line (which may carry
/// secrets in its arguments) is replaced by a note that one is set.
fn redacted_workload(w: &rampart_mesh::WorkloadEntry) -> serde_json::Value {
    let mut v = serde_json::to_value(w).unwrap_or_default();
    if let (Some(obj), Some(cmd)) = (v.as_object_mut(), &w.command) {
        obj.insert(
            "command".into(),
            json!(format!("[redacted: set, {} arguments]", cmd.len())),
        );
    }
    v
}

/// How long an admin connection may sit idle.
const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Accept admin connections within the admin budget; on accept errors (EMFILE, ...) back
/// off, doubling from 5 ms to 1 s, instead of spinning.
pub(crate) async fn serve(sh: Arc<View>, l: TcpListener) {
    if let Ok(addr) = l.local_addr()
        && !addr.ip().is_loopback()
    {
        tracing::warn!(%addr, allow_remote_admin = sh.cfg.load().folder.local.allow_remote_admin,
            "admin listener not on loopback: /stats/prometheus and /ready answer anyone who \
             reaches it; /config_dump, /certs and /mtls only loopback clients unless \
             rampart.allowRemoteAdmin (for metrics alone, prefer --status-listen)");
    }
    let mut backoff = Duration::from_millis(5);
    loop {
        let (tcp, peer) = match l.accept().await {
            Ok(x) => {
                backoff = Duration::from_millis(5);
                x
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "admin accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Some(permit) = sh.budgets.acquire(Budget::Admin) else {
            tracing::warn!(%peer, "admin connection limit reached; closing new connection");
            continue;
        };
        let sh = sh.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let act = Activity::new(true);
            let svc_sh = sh.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = handle(&svc_sh, &req, peer);
                async move { Ok::<_, Infallible>(r) }
            });
            let builder = sh.edge.server();
            let conn = builder.serve_connection(
                TokioIo::new(Tracked::new(tcp, act.clone())),
                TrackedService::new(svc, act.clone()),
            );
            // Scrapes and probes are short: an idle admin connection is closed after 15 s
            // (not the data plane's hour), so idle keep-alives cannot hold the small budget.
            let limits = crate::edge::EdgeLimits {
                idle_timeout: sh.edge.idle_timeout.min(ADMIN_IDLE_TIMEOUT),
                ..sh.edge
            };
            tokio::select! {
                _ = conn => {}
                _ = act.expired(&limits) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the detail paths are loopback-only, and only without the opt-in; IPv4 clients
    /// of a dual-stack listener count by their IPv4 address.
    #[test]
    fn detail_paths_answer_loopback_only_unless_allowed() {
        let remote: std::net::SocketAddr = "192.0.2.9:40000".parse().unwrap();
        let mapped: std::net::SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        for path in LOCAL_ONLY {
            assert!(local_only_refused(path, remote, false), "{path}");
            assert!(!local_only_refused(path, remote, true), "{path}");
            assert!(!local_only_refused(path, mapped, false), "{path}");
            assert!(!local_only_refused(path, "[::1]:1".parse().unwrap(), false));
        }
        for path in ["/stats/prometheus", "/ready"] {
            assert!(!local_only_refused(path, remote, false), "{path}");
        }
    }
}
