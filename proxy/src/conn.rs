//! Connections the proxy originates: mTLS to a peer proxy's inbound listener, as a hyper
//! client connector (pooled, kept alive) and as a plain stream for TCP upstreams.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rampart_certs::SpiffeId;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::identity::{Alpn, IdentityHolder};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where and as whom to reach a destination port.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) sni: ServerName<'static>,
    pub(crate) expected: SpiffeId,
    pub(crate) alpn: Alpn,
}

impl Target {
    pub(crate) fn new(
        addr: SocketAddr,
        service_host: &str,
        port: u16,
        expected: SpiffeId,
        alpn: Alpn,
    ) -> Result<Target, String> {
        let sni = format!("outbound_.{port}_._.{service_host}");
        let sni = ServerName::try_from(sni.clone()).map_err(|e| format!("SNI {sni}: {e}"))?;
        Ok(Target {
            addr,
            sni,
            expected,
            alpn,
        })
    }
}

/// Dial `target` and run the mTLS handshake, checking the server's SPIFFE ID.
pub(crate) async fn connect_mtls(
    identity: &IdentityHolder,
    target: &Target,
) -> Result<TlsStream<TcpStream>, String> {
    let state = identity
        .current()
        .ok_or("no workload certificate installed yet (fail closed)")?;
    let config = state.client(&target.expected, target.alpn)?;
    let tcp = TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", target.addr))?;
    let _ = tcp.set_nodelay(true);
    tokio_rustls::TlsConnector::from(config)
        .connect(target.sni.clone(), tcp)
        .await
        .map_err(|e| {
            let why = describe_tls_error(&e);
            format!(
                "mTLS handshake with {} (expecting {}): {why}",
                target.addr, target.expected
            )
        })
}

/// A handshake error, with the SPIFFE reason when a Rampart verifier refused the peer.
pub(crate) fn describe_tls_error(e: &std::io::Error) -> String {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .and_then(rampart_certs::tls::peer_error)
        .map(ToString::to_string)
        .unwrap_or_else(|| e.to_string())
}

/// A hyper connector that ignores the request URI and dials one fixed [`Target`].
#[derive(Clone)]
pub(crate) struct MtlsConnector {
    pub(crate) identity: Arc<IdentityHolder>,
    pub(crate) target: Arc<Target>,
}

impl tower::Service<http::Uri> for MtlsConnector {
    type Response = TlsConn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let tls = connect_mtls(&me.identity, &me.target).await?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(TlsConn {
                io: TokioIo::new(tls),
                h2,
            })
        })
    }
}

/// An established mTLS connection for hyper's client.
pub(crate) struct TlsConn {
    io: TokioIo<TlsStream<TcpStream>>,
    h2: bool,
}

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl hyper::rt::Read for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}
