//! Configuration from a control plane (`rampart proxy --control-plane`, Kubernetes mode):
//! the `rampart.config.v1.ConfigDiscovery/DeltaConfig` stream over mutual TLS.
//!
//! - TLS: the proxy presents its workload certificate (from SDS, the same node agent that
//!   serves its identity) and verifies the control plane's certificate against the SDS trust
//!   bundle and the configured DNS name (default `istiod.istio-system.svc`, as ztunnel and
//!   Envoy verify istiod). No certificate or bundle yet: no connection.
//! - The stream: the first request names the workload and, after a reconnect, every resource
//!   held (name -> version), so the control plane sends only the difference. Each response
//!   updates the held resources; the whole set is assembled into a snapshot with the mesh
//!   folder's parsers and checked as the proxy would build it. Valid: ACK, and the snapshot
//!   goes to the proxy's update stream. Invalid: NACK naming the problems, and the last good
//!   configuration keeps serving (the refusal is also shown in `/config_dump`).
//! - Outages: the stream is reopened with capped exponential backoff; the held resources
//!   (and the proxy's configuration) survive it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rampart_certs::tls::{ServerAuth, client_config};
use rampart_certs::{PrivateKey, TrustBundle};
use rampart_mesh::Problem;
use rampart_mesh::resources::{ResourceKind, assemble};
use rampart_mesh::watch::{Update, Updates};
use rampart_proto::rampart::config::v1 as pb;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::Config;
use crate::sds::SecretSink;
use crate::status::ControlPlaneStatus;

/// The DNS name the control plane's certificate must carry by default (istiod's).
pub const DEFAULT_CONTROL_PLANE_SAN: &str = "istiod.istio-system.svc";

/// Where the control plane is and how it is verified.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// `host:port` of the control plane's gRPC (TLS) port.
    pub address: String,
    /// The DNS name (or IP) its certificate must carry.
    pub san: String,
    /// Longest wait between reconnects.
    pub max_backoff: Duration,
}

impl ControlPlaneOptions {
    /// `address`, verified as [`DEFAULT_CONTROL_PLANE_SAN`], reconnecting at most 5 s apart.
    pub fn new(address: String) -> ControlPlaneOptions {
        ControlPlaneOptions {
            address,
            san: DEFAULT_CONTROL_PLANE_SAN.into(),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// The workload certificate and trust bundle for the control-plane connection, from SDS.
#[derive(Default)]
struct Secrets {
    cert: Mutex<Option<(Vec<CertificateDer<'static>>, Arc<PrivateKey>)>>,
    bundle: Mutex<Option<TrustBundle>>,
}

impl SecretSink for Secrets {
    fn offer_cert(&self, chain_pem: &str, key_pem: &str) -> Result<(), String> {
        let chain = rampart_certs::parse_certs_pem(chain_pem)
            .map_err(|e| format!("certificate chain: {e}"))?;
        if chain.is_empty() {
            return Err("certificate chain is empty".into());
        }
        let key = PrivateKey::from_pem(key_pem).map_err(|e| format!("private key: {e}"))?;
        *self.cert.lock().unwrap_or_else(|e| e.into_inner()) = Some((chain, Arc::new(key)));
        Ok(())
    }

    fn offer_bundle(&self, pem: &str, _crl_pem: &str) -> Result<(), String> {
        let bundle = TrustBundle::from_pem(pem).map_err(|e| format!("trust bundle: {e}"))?;
        *self.bundle.lock().unwrap_or_else(|e| e.into_inner()) = Some(bundle);
        Ok(())
    }
}

impl Secrets {
    fn tls(&self) -> Result<rustls::ClientConfig, String> {
        let cert = self
            .cert
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or("no workload certificate from SDS yet")?;
        let bundle = self
            .bundle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or("no trust bundle from SDS yet")?;
        let mut cfg = client_config(ServerAuth::Dns { bundle }, Some((cert.0, &*cert.1)))
            .map_err(|e| format!("TLS configuration: {e}"))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }
}

/// The resources held: what the control plane last sent, whether or not it was accepted
/// (its view of this stream), kept across reconnects.
#[derive(Default)]
struct Held(BTreeMap<String, (ResourceKind, String, prost::bytes::Bytes)>);

fn kind_of(type_: &str) -> Option<ResourceKind> {
    match type_ {
        pb::MESH_TYPE => Some(ResourceKind::Mesh),
        pb::POLICY_TYPE => Some(ResourceKind::Policy),
        pb::REGISTRY_TYPE => Some(ResourceKind::Registry),
        _ => None,
    }
}

impl Held {
    /// Apply one response; `Err` names what could not be taken (an unknown type).
    fn apply(&mut self, resp: pb::DeltaConfigResponse) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        for name in resp.removed_resources {
            self.0.remove(&name);
        }
        for r in resp.resources {
            match kind_of(&r.r#type) {
                Some(k) => {
                    self.0.insert(r.name, (k, r.version, r.body));
                }
                None => problems.push(Problem {
                    file: r.name,
                    field: String::new(),
                    reason: format!("unknown resource type {:?}", r.r#type),
                }),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    fn versions(&self) -> std::collections::HashMap<String, String> {
        self.0
            .iter()
            .map(|(n, (_, v, _))| (n.clone(), v.clone()))
            .collect()
    }

    /// The snapshot the held resources make, checked as this proxy would build it.
    fn snapshot(&self, label: &str, workload: &str) -> Update {
        let folder = assemble(
            label,
            self.0.iter().map(|(n, (k, _, b))| (n.as_str(), *k, &b[..])),
        )?;
        Config::build(folder.clone(), workload)?;
        Ok(folder)
    }
}

/// Start the control-plane client of `workload`: its own SDS streams (for the mTLS
/// identity), then the config stream, forever. Accepted snapshots (and refusals) come out of
/// the returned [`Updates`], as from a watched folder.
pub(crate) fn spawn(
    cp: ControlPlaneOptions,
    workload: String,
    sds_socket: std::path::PathBuf,
    status: Arc<ControlPlaneStatus>,
) -> Updates {
    let secrets = Arc::new(Secrets::default());
    let (tx, updates) = Updates::channel(4);
    let node_id = format!(
        "sidecar~127.0.0.1~{}~control-plane",
        workload.replace('/', ".")
    );
    let sds = tokio::spawn(crate::sds::run(sds_socket, node_id, secrets.clone()));
    tokio::spawn(async move {
        run(cp, workload, secrets, tx, status).await;
        sds.abort();
    });
    updates
}

async fn run(
    cp: ControlPlaneOptions,
    workload: String,
    secrets: Arc<Secrets>,
    tx: mpsc::Sender<Update>,
    status: Arc<ControlPlaneStatus>,
) {
    let mut held = Held::default();
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&cp, &workload, &secrets, &mut held, &tx, &status).await {
            Ok(()) => {
                tracing::warn!(control_plane = %cp.address, "config stream ended; reconnecting (the last good configuration keeps serving)");
                backoff = Duration::from_millis(100);
            }
            Err(Stop) => return,
            Err(Retry(e)) => {
                tracing::warn!(control_plane = %cp.address, error = %e, retry_in = ?backoff, "config stream failed; the last good configuration keeps serving");
            }
        }
        status.set_connected(false);
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(cp.max_backoff);
    }
}

enum Ended {
    Retry(String),
    Stop,
}
use Ended::{Retry, Stop};

async fn session(
    cp: &ControlPlaneOptions,
    workload: &str,
    secrets: &Secrets,
    held: &mut Held,
    tx: &mpsc::Sender<Update>,
    status: &ControlPlaneStatus,
) -> Result<(), Ended> {
    let tls = Arc::new(secrets.tls().map_err(Retry)?);
    let name = ServerName::try_from(cp.san.clone())
        .map_err(|e| Retry(format!("control-plane name {:?}: {e}", cp.san)))?;
    let addr = cp.address.clone();
    let connector = tokio_rustls::TlsConnector::from(tls);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Retry(format!("address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            let name = name.clone();
            let addr = addr.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| Retry(format!("connect: {}", error_chain(&e))))?;
    let mut client = pb::config_discovery_client::ConfigDiscoveryClient::new(channel)
        .max_decoding_message_size(256 * 1024 * 1024);
    let (req_tx, req_rx) = mpsc::channel::<pb::DeltaConfigRequest>(4);
    let first = pb::DeltaConfigRequest {
        workload: workload.to_string(),
        initial_resource_versions: held.versions(),
        ..Default::default()
    };
    let _ = req_tx.send(first).await;
    let mut stream = client
        .delta_config(ReceiverStream::new(req_rx))
        .await
        .map_err(|s| Retry(format!("DeltaConfig: {:?}: {}", s.code(), s.message())))?
        .into_inner();
    status.set_connected(true);
    let label = format!("control plane {}", cp.address);
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(s) => return Err(Retry(format!("{:?}: {}", s.code(), s.message()))),
        };
        let nonce = resp.nonce.clone();
        let version = resp.system_version_info.clone();
        if resp.incomplete {
            // A part of a larger push: hold it, ACK it, apply the push with its last part.
            let ack = match held.apply(resp) {
                Ok(()) => pb::DeltaConfigRequest {
                    response_nonce: nonce,
                    ..Default::default()
                },
                Err(problems) => {
                    let reason = problems
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ");
                    tracing::error!(version = %version, reason = %reason, "config push part refused (NACK)");
                    pb::DeltaConfigRequest {
                        response_nonce: nonce,
                        error_detail: Some(rampart_proto::google::rpc::Status {
                            code: 3,
                            message: reason,
                            details: vec![],
                        }),
                        ..Default::default()
                    }
                }
            };
            if req_tx.send(ack).await.is_err() {
                return Ok(());
            }
            continue;
        }
        let update = held
            .apply(resp)
            .and_then(|()| held.snapshot(&label, workload));
        let accepted = update.is_ok();
        status.pushed(accepted);
        let mut ack = pb::DeltaConfigRequest {
            response_nonce: nonce,
            ..Default::default()
        };
        match &update {
            Ok(_) => {
                tracing::info!(version = %version, resources = held.0.len(), "config push accepted (ACK)");
            }
            Err(problems) => {
                let reason = problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                tracing::error!(version = %version, reason = %reason, "config push refused (NACK); the last good configuration keeps serving");
                ack.error_detail = Some(rampart_proto::google::rpc::Status {
                    code: 3, // INVALID_ARGUMENT
                    message: reason,
                    details: vec![],
                });
            }
        }
        if tx.send(update).await.is_err() {
            return Err(Stop);
        }
        if req_tx.send(ack).await.is_err() {
            return Ok(());
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(name: &str, type_: &str, body: &str) -> pb::Resource {
        pb::Resource {
            name: name.into(),
            version: rampart_mesh::resources::content_version(body.as_bytes()),
            r#type: type_.into(),
            body: body.as_bytes().to_vec().into(),
        }
    }

    const MESH: &str = r#"{"mesh":{"trustDomain":"cluster.local"},"files":{}}"#;
    const ME: &str = r#"{"name":"a","namespace":"ns1","ports":[{"port":80,"protocol":"http","app":"127.0.0.1:9000","inbound":"127.0.0.1:9001"}]}"#;

    /// A complete push assembles into this workload's snapshot; removals apply; what is
    /// held is what a reconnect announces.
    #[test]
    fn held_resources_make_a_snapshot() {
        let mut held = Held::default();
        held.apply(pb::DeltaConfigResponse {
            resources: vec![
                resource("mesh", pb::MESH_TYPE, MESH),
                resource("registry/workloads/ns1/a", pb::REGISTRY_TYPE, ME),
            ],
            ..Default::default()
        })
        .unwrap();
        let snap = held.snapshot("cp", "ns1/a").unwrap();
        assert_eq!(snap.registry.workloads.len(), 1);
        assert_eq!(held.versions().len(), 2);
        // Its own entry removed: refused (the proxy would NACK and keep its configuration).
        held.apply(pb::DeltaConfigResponse {
            removed_resources: vec!["registry/workloads/ns1/a".into()],
            ..Default::default()
        })
        .unwrap();
        let e = held.snapshot("cp", "ns1/a").unwrap_err();
        assert!(e[0].reason.contains("is not declared"), "{e:?}");
    }

    /// A push in parts: the parts are held, and only the whole makes the snapshot.
    #[test]
    fn parts_are_held_until_the_last() {
        let mut held = Held::default();
        held.apply(pb::DeltaConfigResponse {
            resources: vec![resource("registry/workloads/ns1/a", pb::REGISTRY_TYPE, ME)],
            incomplete: true,
            ..Default::default()
        })
        .unwrap();
        assert!(
            held.snapshot("cp", "ns1/a").is_err(),
            "no mesh settings yet"
        );
        held.apply(pb::DeltaConfigResponse {
            resources: vec![resource("mesh", pb::MESH_TYPE, MESH)],
            ..Default::default()
        })
        .unwrap();
        assert!(held.snapshot("cp", "ns1/a").is_ok());
    }

    /// The negative twins: an unknown resource type, a policy that does not validate, and a
    /// push without mesh settings are refused, each naming the resource.
    #[test]
    fn bad_pushes_are_refused_naming_the_resource() {
        let mut held = Held::default();
        let e = held
            .apply(pb::DeltaConfigResponse {
                resources: vec![resource("x", "rampart.config.v1.Other", "{}")],
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e[0].file, "x");

        let mut held = Held::default();
        held.apply(pb::DeltaConfigResponse {
            resources: vec![resource("registry/workloads/ns1/a", pb::REGISTRY_TYPE, ME)],
            ..Default::default()
        })
        .unwrap();
        let e = held.snapshot("cp", "ns1/a").unwrap_err();
        assert!(e.iter().any(|p| p.file == "mesh"), "{e:?}");

        let bad = r#"{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"p","namespace":"ns1"},"spec":{"action":"MAYBE"}}"#;
        held.apply(pb::DeltaConfigResponse {
            resources: vec![
                resource("mesh", pb::MESH_TYPE, MESH),
                resource("policy/ns1/AuthorizationPolicy/p", pb::POLICY_TYPE, bad),
            ],
            ..Default::default()
        })
        .unwrap();
        let e = held.snapshot("cp", "ns1/a").unwrap_err();
        assert!(
            e.iter()
                .any(|p| p.file == "policy/ns1/AuthorizationPolicy/p"),
            "{e:?}"
        );
    }
}
