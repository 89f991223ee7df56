//! A small CreateCertificate client over TLS 1.3 (h2), for tools (`rampart ca bench`) and
//! tests. Istio's own agents need none of this: they speak the same wire.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rampart_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use rustls_pki_types::ServerName;
use tonic::transport::{Channel, Endpoint};

use crate::error::CitadelError;

/// The TLS client configuration for talking to the CA: the shared policy, the CA verified by
/// name or IP against a bundle, ALPN h2, optionally a client certificate.
pub use crate::tls::client_config as config;

/// Opens one HTTP/2 connection to the CA at `addr`, verifying its certificate for
/// `server_name` (e.g. `127.0.0.1` or `istiod.istio-system.svc`) with `tls`.
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<IstioCertificateServiceClient<Channel>, CitadelError> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| CitadelError::Config(format!("server name {server_name:?}: {e}")))?;
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let tls = tls.clone();
        let name = name.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| CitadelError::Config(e.to_string()))?
        .connect_with_connector(connector)
        .await
        .map_err(|e| CitadelError::Listen {
            addr,
            source: std::io::Error::other(format!("{e:?}")),
        })?;
    Ok(IstioCertificateServiceClient::new(channel))
}
