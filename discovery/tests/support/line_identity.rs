//! A stand-in for the CA's mTLS listener, for the discovery tests and benchmark: each TCP
//! connection starts with one line naming its SPIFFE ID, which the server takes as the
//! connection's verified identity (what the CA's TLS listener hands the service in
//! production; the handshakes themselves are the CA's cost and are tested there).
#![allow(dead_code)] // each user takes what it needs

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rampart_certs::SpiffeId;
use rampart_discovery::{Authenticator, ConfigService};
use rampart_proto::rampart::config::v1 as pb;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The identity a connection's first line names (standing in for its TLS client
/// certificate).
#[derive(Clone, Debug)]
pub(crate) struct LineIdentity(pub(crate) SpiffeId);

/// A server connection whose identity came from its first line.
pub(crate) struct Conn {
    inner: BufReader<TcpStream>,
    id: LineIdentity,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = LineIdentity;
    fn connect_info(&self) -> LineIdentity {
        self.id.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(self.inner.get_mut()).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.inner.get_mut()).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.inner.get_mut()).poll_shutdown(cx)
    }
}

/// The service's authenticator: the connection's first line.
pub(crate) struct ByLine;

impl Authenticator for ByLine {
    fn caller(&self, extensions: &tonic::Extensions) -> Result<SpiffeId, String> {
        extensions
            .get::<LineIdentity>()
            .map(|l| l.0.clone())
            .ok_or_else(|| "no identity line".into())
    }
}

/// A service authenticating by first line, with its feed.
pub(crate) fn service() -> (ConfigService, rampart_discovery::ModelFeed) {
    ConfigService::new(Arc::new(ByLine))
}

/// Serve `svc` on a loopback port (tasks on the current runtime); its address.
pub(crate) async fn serve(svc: ConfigService) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (conn_tx, conn_rx) = mpsc::channel::<Result<Conn, std::io::Error>>(1024);
    tokio::spawn(async move {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let tx = conn_tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let mut r = BufReader::new(tcp);
                let mut line = String::new();
                if r.read_line(&mut line).await.is_err() {
                    return;
                }
                let Ok(id) = SpiffeId::parse(line.trim()) else {
                    return;
                };
                let _ = tx
                    .send(Ok(Conn {
                        inner: r,
                        id: LineIdentity(id),
                    }))
                    .await;
            });
        }
    });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(1024))
            .add_service(svc.into_server())
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(conn_rx))
            .await
            .unwrap();
    });
    addr
}

/// A client stream: where to send requests (ACKs), and the responses.
pub(crate) type Stream = (
    mpsc::Sender<pb::DeltaConfigRequest>,
    tonic::Streaming<pb::DeltaConfigResponse>,
);

/// Open a stream to `addr` as `id` for `workload` (its own connection). The outer error:
/// the connection failed; the inner: the server refused the stream.
pub(crate) async fn open(
    addr: SocketAddr,
    id: &str,
    workload: &str,
) -> Result<Result<Stream, tonic::Status>, tonic::transport::Error> {
    let id = id.to_string();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let id = id.clone();
            async move {
                let mut tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                tcp.write_all(format!("{id}\n").as_bytes()).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
            }
        }))
        .await?;
    let mut client = pb::config_discovery_client::ConfigDiscoveryClient::new(channel)
        .max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::DeltaConfigRequest {
        workload: workload.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    Ok(client
        .delta_config(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(|r| (tx, r.into_inner())))
}
