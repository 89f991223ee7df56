//! SDS client: `StreamSecrets` for `default` and `ROOTCA` over the node agent's Unix socket
//! (one stream per resource, as Envoy does). Every response is ACKed (version + nonce) when
//! its secret is valid and installed, NACKed with `error_detail` otherwise; a broken stream is
//! reopened with capped exponential backoff.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prost::Message;
use rampart_proto::envoy::config::core::v3::{Node, data_source::Specifier};
use rampart_proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use rampart_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use rampart_proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use rampart_proto::google::rpc::Status;
use rampart_proto::sds::SECRET_TYPE_URL;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::identity::IdentityHolder;

/// The SDS resource names, defined once in `rampart_proto::sds` (re-exported here until the
/// crate root stops naming them).
pub use rampart_proto::sds::{ROOT_RESOURCE, WORKLOAD_RESOURCE as DEFAULT_RESOURCE};

/// Where the secrets of an SDS stream go: the proxy's identity, or the control-plane
/// client's. Each check refuses (NACK) with the reason, keeping what was there.
pub(crate) trait SecretSink: Send + Sync + 'static {
    /// A `default` certificate chain and key (PEM).
    fn offer_cert(&self, chain_pem: &str, key_pem: &str) -> Result<(), String>;
    /// A `ROOTCA` trust bundle and its CRLs (PEM, possibly empty).
    fn offer_bundle(&self, pem: &str, crl_pem: &str) -> Result<(), String>;
}

impl SecretSink for IdentityHolder {
    fn offer_cert(&self, chain_pem: &str, key_pem: &str) -> Result<(), String> {
        IdentityHolder::offer_cert(self, chain_pem, key_pem)
    }
    fn offer_bundle(&self, pem: &str, crl_pem: &str) -> Result<(), String> {
        IdentityHolder::offer_bundle(self, pem, crl_pem)
    }
}

/// Run both SDS streams forever.
pub(crate) async fn run<H: SecretSink>(socket: PathBuf, node_id: String, holder: Arc<H>) {
    let a = tokio::spawn(stream_forever(
        socket.clone(),
        node_id.clone(),
        DEFAULT_RESOURCE,
        holder.clone(),
    ));
    let b = tokio::spawn(stream_forever(socket, node_id, ROOT_RESOURCE, holder));
    let _ = tokio::join!(a, b);
}

async fn stream_forever<H: SecretSink>(
    socket: PathBuf,
    node_id: String,
    name: &'static str,
    holder: Arc<H>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match stream_once(&socket, &node_id, name, holder.as_ref()).await {
            Ok(()) => {
                tracing::warn!(resource = name, "SDS stream ended; reconnecting");
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                tracing::warn!(resource = name, socket = %socket.display(), error = %e, retry_in = ?backoff, "SDS stream failed");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn data(ds: &Option<rampart_proto::envoy::config::core::v3::DataSource>) -> Result<String, String> {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => {
            String::from_utf8(b.clone()).map_err(|_| "inline bytes are not UTF-8 PEM".to_string())
        }
        Some(Specifier::InlineString(s)) => Ok(s.clone()),
        Some(Specifier::Filename(f)) => std::fs::read_to_string(f).map_err(|e| format!("{f}: {e}")),
        _ => Err("no inline data".into()),
    }
}

/// Check and install the secrets of one response.
fn apply<H: SecretSink>(resp: &DiscoveryResponse, name: &str, holder: &H) -> Result<(), String> {
    if resp.type_url != SECRET_TYPE_URL {
        return Err(format!("unexpected type_url {:?}", resp.type_url));
    }
    let mut found = false;
    for any in &resp.resources {
        if any.type_url != SECRET_TYPE_URL {
            return Err(format!("resource of unexpected type {:?}", any.type_url));
        }
        let s = Secret::decode(any.value.as_slice())
            .map_err(|e| format!("cannot decode Secret: {e}"))?;
        if s.name != name {
            continue;
        }
        found = true;
        match (&s.r#type, name) {
            (Some(secret::Type::TlsCertificate(t)), DEFAULT_RESOURCE) => {
                let chain =
                    data(&t.certificate_chain).map_err(|e| format!("certificate_chain: {e}"))?;
                let key = zeroize::Zeroizing::new(
                    data(&t.private_key).map_err(|e| format!("private_key: {e}"))?,
                );
                holder.offer_cert(&chain, &key)?;
            }
            (Some(secret::Type::ValidationContext(v)), ROOT_RESOURCE) => {
                let pem = data(&v.trusted_ca).map_err(|e| format!("trusted_ca: {e}"))?;
                // CRLs as Istio's agent serves them to Envoy: `crl`, PEM, absent when none.
                let crl = match &v.crl {
                    None => String::new(),
                    Some(_) => data(&v.crl).map_err(|e| format!("crl: {e}"))?,
                };
                holder.offer_bundle(&pem, &crl)?;
            }
            _ => return Err(format!("secret {name} has the wrong type")),
        }
    }
    if !found {
        return Err(format!("response carries no secret named {name}"));
    }
    Ok(())
}

async fn stream_once<H: SecretSink>(
    socket: &std::path::Path,
    node_id: &str,
    name: &'static str,
    holder: &H,
) -> Result<(), String> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://sds.local")
        .connect_timeout(Duration::from_secs(3))
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(4);
    let node = Node {
        id: node_id.to_string(),
        ..Default::default()
    };
    let base = DiscoveryRequest {
        node: Some(node),
        resource_names: vec![name.to_string()],
        type_url: SECRET_TYPE_URL.to_string(),
        ..Default::default()
    };
    tx.send(base.clone()).await.map_err(|e| e.to_string())?;
    let mut stream = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("StreamSecrets: {e}"))?
        .into_inner();
    let mut accepted_version = String::new();
    while let Some(resp) = stream.message().await.map_err(|e| format!("stream: {e}"))? {
        let mut req = base.clone();
        req.node = None;
        req.response_nonce = resp.nonce.clone();
        match apply(&resp, name, holder) {
            Ok(()) => {
                accepted_version = resp.version_info.clone();
                req.version_info = accepted_version.clone();
                tracing::debug!(resource = name, version = %resp.version_info, "SDS ACK");
            }
            Err(e) => {
                tracing::error!(resource = name, version = %resp.version_info, error = %e, "SDS push refused (NACK); keeping the current secret");
                req.version_info = accepted_version.clone();
                req.error_detail = Some(Status {
                    code: 3, // INVALID_ARGUMENT
                    message: e,
                    details: vec![],
                });
            }
        }
        tx.send(req).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}
