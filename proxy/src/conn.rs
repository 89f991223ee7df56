//! Connections the proxy originates to a peer proxy's inbound listener: mTLS (or plaintext
//! when the destination port's PeerAuthentication is DISABLE, as Istio's auto-mTLS does), as
//! a hyper client connector (pooled, kept alive) and as a plain stream for TCP upstreams.

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

use crate::peers::Revocable;
use rampart_certs::Usage;

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
) -> Result<(TlsStream<TcpStream>, Arc<crate::identity::TlsState>), String> {
    let state = identity
        .for_handshake()
        .map_err(|why| format!("own identity unusable (fail closed): {why}"))?;
    let config = state.client(&target.expected, target.alpn)?;
    let tcp = TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", target.addr))?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(target.sni.clone(), tcp)
        .await
        .map_err(|e| {
            let why = describe_tls_error(&e);
            format!(
                "mTLS handshake with {} (expecting {}): {why}",
                target.addr, target.expected
            )
        })?;
    tracing::debug!(
        peer = %target.addr,
        kx_group = %rampart_certs::tls::negotiated_group(tls.get_ref().1)
            .as_deref()
            .unwrap_or("-"),
        "outbound mTLS handshake done"
    );
    Ok((tls, state))
}

/// A handshake error, with the SPIFFE reason when a Rampart verifier refused the peer.
pub(crate) fn describe_tls_error(e: &std::io::Error) -> String {
    let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    tls.and_then(rampart_certs::tls::peer_error)
        .map(ToString::to_string)
        .or_else(|| tls.and_then(rampart_certs::tls::kx_refusal))
        .unwrap_or_else(|| e.to_string())
}

/// Dial `target` without TLS: only for a destination port whose PeerAuthentication is
/// DISABLE (its inbound listener passes plaintext and does not terminate TLS).
pub(crate) async fn connect_plain(target: &Target) -> Result<TcpStream, String> {
    let tcp = TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", target.addr))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// A stream to a peer proxy: mTLS, or plaintext to a DISABLE port.
pub(crate) enum PeerStream {
    /// Mutual TLS, the server's SPIFFE ID checked; closed if the server is revoked.
    Mtls(Box<Revocable<TlsStream<TcpStream>>>),
    /// Plaintext (destination port in PeerAuthentication DISABLE).
    Plain(TcpStream),
}

impl PeerStream {
    /// Dial `target`, with mTLS unless `mtls` is false.
    pub(crate) async fn connect(
        identity: &IdentityHolder,
        target: &Target,
        mtls: bool,
    ) -> Result<PeerStream, String> {
        if mtls {
            let (tls, seen) = connect_mtls(identity, target).await?;
            let chain = tls
                .get_ref()
                .1
                .peer_certificates()
                .unwrap_or_default()
                .to_vec();
            let peer = target.expected.to_string();
            let conn = identity
                .register(&seen, tls, &chain, Usage::ServerAuth, peer)
                .map_err(|why| format!("mTLS with {}: {why}", target.addr))?;
            Ok(PeerStream::Mtls(Box::new(conn)))
        } else {
            Ok(PeerStream::Plain(connect_plain(target).await?))
        }
    }
}

impl tokio::io::AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Mtls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            PeerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Mtls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            PeerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Mtls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            PeerStream::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Mtls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            PeerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PeerStream::Mtls(s) => s.is_write_vectored(),
            PeerStream::Plain(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Mtls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            PeerStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
}

/// A hyper connector that ignores the request URI and dials one fixed [`Target`], with mTLS
/// or (DISABLE destination port) plaintext.
#[derive(Clone)]
pub(crate) struct PeerConnector {
    pub(crate) identity: Arc<IdentityHolder>,
    pub(crate) target: Arc<Target>,
    pub(crate) mtls: bool,
    /// Longest wait for the connection and its handshake (`None`: the caller's own deadline
    /// bounds it).
    pub(crate) connect_timeout: Option<std::time::Duration>,
}

impl tower::Service<http::Uri> for PeerConnector {
    type Response = TlsConn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let connecting = PeerStream::connect(&me.identity, &me.target, me.mtls);
            let s = match me.connect_timeout {
                Some(t) => tokio::time::timeout(t, connecting).await.map_err(|_| {
                    format!(
                        "connect and handshake with {} took over {t:?}",
                        me.target.addr
                    )
                })??,
                None => connecting.await?,
            };
            let h2 = match &s {
                PeerStream::Mtls(t) => {
                    crate::identity::is_h2(t.get_ref().get_ref().1.alpn_protocol())
                }
                PeerStream::Plain(_) => false,
            };
            Ok(TlsConn {
                io: TokioIo::new(s),
                h2,
            })
        })
    }
}

/// An established connection to a peer proxy for hyper's client.
pub(crate) struct TlsConn {
    io: TokioIo<PeerStream>,
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
