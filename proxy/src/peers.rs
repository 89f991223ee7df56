//! Established mTLS connections and the peer certificates they were accepted with, so a
//! revocation can close the ones it concerns.
//!
//! Every mTLS connection (inbound, and outbound to a peer proxy) is wrapped in a
//! [`Revocable`] registered here with the chain its peer presented. When the CRL set (from
//! the `ROOTCA` secret) changes, [`LiveConns::close_revoked`] re-checks each chain against
//! it and closes the connections whose peer certificate (or an intermediate of it) is now
//! revoked: reads and writes fail at once, whichever task drives the connection. A handshake
//! checks revocation by itself (the verifiers carry the CRLs); this covers what was
//! accepted before.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use rampart_certs::{
    CertificateDer, ChainError, RevocationCheck, TrustBundle, TrustDomainPolicy, Usage,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// One registered connection.
struct Live {
    /// The peer's chain, leaf first.
    chain: Vec<CertificateDer<'static>>,
    /// Which way the peer was verified (inbound peers are clients).
    usage: Usage,
    peer_id: String,
    cancel: CancellationToken,
}

/// The registry of established mTLS connections.
#[derive(Default)]
pub(crate) struct LiveConns {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Live>>,
    closed: AtomicU64,
}

impl LiveConns {
    /// Register a connection whose peer (`peer_id`) presented `chain`; the returned guard
    /// wraps its stream.
    pub(crate) fn register<IO>(
        self: &Arc<Self>,
        io: IO,
        chain: Vec<CertificateDer<'static>>,
        usage: Usage,
        peer_id: String,
    ) -> Revocable<IO> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Live {
                chain,
                usage,
                peer_id,
                cancel: cancel.clone(),
            },
        );
        Revocable {
            io,
            cancelled: Box::pin(cancel.cancelled_owned()),
            registry: self.clone(),
            id,
        }
    }

    /// Close every connection whose peer chain `check` now refuses as revoked (verified
    /// against `bundle` and `td` as at its handshake); returns how many were closed.
    pub(crate) fn close_revoked(
        &self,
        check: &RevocationCheck,
        bundle: &TrustBundle,
        td: &TrustDomainPolicy,
        now: SystemTime,
    ) -> usize {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for live in map.values() {
            let Some((leaf, intermediates)) = live.chain.split_first() else {
                continue;
            };
            let r = rampart_certs::verify_workload_cert_with_revocation(
                leaf,
                intermediates,
                bundle,
                td,
                now,
                live.usage,
                Some(check),
            );
            if let Err(ChainError::Revoked { serial, issuer, .. }) = r {
                tracing::warn!(
                    peer_id = %live.peer_id,
                    %serial,
                    %issuer,
                    "closing an established connection: the peer's certificate is revoked"
                );
                live.cancel.cancel();
                n += 1;
            }
        }
        self.closed.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Connections registered now.
    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Prometheus lines.
    pub(crate) fn render_metrics(&self, out: &mut String) {
        out.push_str("# TYPE rampart_proxy_revoked_connections_closed_total counter\n");
        out.push_str(&format!(
            "rampart_proxy_revoked_connections_closed_total {}\n",
            self.closed.load(Ordering::Relaxed)
        ));
        out.push_str("# TYPE rampart_proxy_mtls_connections_open gauge\n");
        out.push_str(&format!(
            "rampart_proxy_mtls_connections_open {}\n",
            self.len()
        ));
    }
}

/// A stream that fails every read and write once its connection is revoked, and leaves the
/// registry when dropped.
pub(crate) struct Revocable<IO> {
    io: IO,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    registry: Arc<LiveConns>,
    id: u64,
}

impl<IO> Drop for Revocable<IO> {
    fn drop(&mut self) {
        self.registry
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

fn revoked() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "peer certificate revoked",
    )
}

impl<IO> Revocable<IO> {
    /// Whether the connection was revoked (registers the task's waker).
    fn poll_revoked(&mut self, cx: &mut Context<'_>) -> bool {
        self.cancelled.as_mut().poll(cx).is_ready()
    }

    /// The wrapped stream.
    pub(crate) fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Revocable<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.poll_revoked(cx) {
            return Poll::Ready(Err(revoked()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Revocable<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.poll_revoked(cx) {
            return Poll::Ready(Err(revoked()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.poll_revoked(cx) {
            return Poll::Ready(Err(revoked()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
