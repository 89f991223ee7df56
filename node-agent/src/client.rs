//! A small SDS client: what `rampart secrets` prints, and what tests use to look at an agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prost::Message;
use rampart_certs::{CertInfo, parse_certs_pem};
use rampart_proto::envoy::config::core::v3::{DataSource, Node, data_source::Specifier};
use rampart_proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use rampart_proto::envoy::service::discovery::v3::DiscoveryRequest;
use rampart_proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use rampart_proto::sds::{ROOT_RESOURCE, SECRET_TYPE_URL, WORKLOAD_RESOURCE};
use tonic::transport::Channel;

use crate::Error;

/// A gRPC channel over a Unix socket.
pub async fn connect_unix(path: &Path) -> Result<Channel, Error> {
    let p: PathBuf = path.to_owned();
    let unreachable = |reason: String| Error::SocketClient {
        path: path.to_owned(),
        reason,
    };
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(|e| {
            // tonic says only "transport error"; the cause (permission denied, connection
            // refused) is what the user needs.
            let mut why = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                let text = c.to_string();
                if !why.contains(&text) {
                    why = format!("{why}: {text}");
                }
                cur = c.source();
            }
            unreachable(why)
        })
}

/// What kind of secret a resource is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// `tls_certificate`: chain and key.
    CertChain,
    /// `validation_context`: trust bundle.
    Ca,
}

/// One served secret, decoded (the key is never kept: only whether it was present).
#[derive(Debug, Clone)]
pub struct ServedSecret {
    /// Resource name.
    pub name: String,
    /// Kind.
    pub kind: SecretKind,
    /// The version the server gave the response.
    pub version_info: String,
    /// Certificates in it (chain leaf first, or roots).
    pub certs: Vec<CertInfo>,
    /// Whether a private key was present (cert chains only).
    pub has_key: bool,
    /// The CRLs served with a trust bundle (`validation_context.crl`, PEM), if any.
    pub crl_pem: Option<String>,
    /// `validation_context.only_verify_leaf_cert_crl`.
    pub crl_leaf_only: bool,
}

fn inline_bytes(ds: Option<&DataSource>) -> Option<&[u8]> {
    match ds?.specifier.as_ref()? {
        Specifier::InlineBytes(b) => Some(b),
        Specifier::InlineString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// Decode one SDS resource.
pub fn decode_secret(any: &prost_types::Any, version_info: &str) -> Result<ServedSecret, Error> {
    let bad = |m: String| Error::BadCaResponse(format!("SDS resource: {m}"));
    if any.type_url != SECRET_TYPE_URL {
        return Err(bad(format!("type {:?}", any.type_url)));
    }
    let s = Secret::decode(any.value.as_slice()).map_err(|e| bad(e.to_string()))?;
    let mut crl_pem = None;
    let mut crl_leaf_only = false;
    let (kind, pem, has_key) = match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => (
            SecretKind::CertChain,
            inline_bytes(t.certificate_chain.as_ref()),
            inline_bytes(t.private_key.as_ref()).is_some_and(|k| !k.is_empty()),
        ),
        Some(secret::Type::ValidationContext(v)) => {
            if let Some(b) = inline_bytes(v.crl.as_ref()) {
                crl_pem = Some(String::from_utf8_lossy(b).into_owned());
            }
            crl_leaf_only = v.only_verify_leaf_cert_crl;
            (SecretKind::Ca, inline_bytes(v.trusted_ca.as_ref()), false)
        }
        _ => return Err(bad(format!("{} has no certificate or CA", s.name))),
    };
    let pem = std::str::from_utf8(pem.ok_or_else(|| bad("no inline data".into()))?)
        .map_err(|e| bad(e.to_string()))?;
    let certs = parse_certs_pem(pem)?
        .iter()
        .map(CertInfo::parse)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ServedSecret {
        name: s.name,
        kind,
        version_info: version_info.to_owned(),
        certs,
        has_key,
        crl_pem,
        crl_leaf_only,
    })
}

/// Ask the SDS server at `socket` for `default` and `ROOTCA` (one StreamSecrets request, first
/// response), as Envoy would. Works against any SDS server that serves those names.
pub async fn fetch_secrets(socket: &Path, timeout: Duration) -> Result<Vec<ServedSecret>, Error> {
    let fut = async {
        let channel = connect_unix(socket).await?;
        let mut client = SecretDiscoveryServiceClient::new(channel);
        let req = DiscoveryRequest {
            node: Some(Node {
                id: "rampart-secrets".into(),
                ..Default::default()
            }),
            resource_names: vec![WORKLOAD_RESOURCE.into(), ROOT_RESOURCE.into()],
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(req).await.ok();
        let mut stream = client
            .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| Error::SocketClient {
                path: socket.to_owned(),
                reason: format!("{:?}: {}", s.code(), s.message()),
            })?
            .into_inner();
        let resp = stream
            .message()
            .await
            .map_err(|s| Error::SocketClient {
                path: socket.to_owned(),
                reason: format!("{:?}: {}", s.code(), s.message()),
            })?
            .ok_or_else(|| Error::SocketClient {
                path: socket.to_owned(),
                reason: "stream ended without a response".into(),
            })?;
        drop(tx);
        resp.resources
            .iter()
            .map(|a| decode_secret(a, &resp.version_info))
            .collect()
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(Error::SocketClient {
                path: socket.to_owned(),
                reason: format!(
                    "no response within {timeout:?} (an agent serves nothing before its first certificate or after one expired: see its log)"
                ),
            })
        })
}
