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

use std::collections::{HashMap, HashSet};
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
    /// The peer's chain, leaf first (shared by every connection that presented it).
    chain: Arc<[CertificateDer<'static>]>,
    /// Which way the peer was verified (inbound peers are clients).
    usage: Usage,
    peer_id: String,
    cancel: CancellationToken,
}

/// The registry of established mTLS connections.
#[derive(Default)]
pub(crate) struct LiveConns {
    next: AtomicU64,
    map: Mutex<Registry>,
    pub(crate) closed: AtomicU64,
}

/// The connections, and each distinct peer chain once: thousands of connections from one
/// peer proxy present the same chain, which is then held once, not once per connection.
#[derive(Default)]
struct Registry {
    conns: HashMap<u64, Live>,
    chains: HashSet<Arc<[CertificateDer<'static>]>>,
}

impl LiveConns {
    /// Register a connection whose peer (`peer_id`) presented `chain`; the returned guard
    /// wraps its stream.
    pub(crate) fn register<IO>(
        self: &Arc<Self>,
        io: IO,
        chain: &[CertificateDer<'static>],
        usage: Usage,
        peer_id: String,
    ) -> Revocable<IO> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let mut reg = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let chain = match reg.chains.get(chain) {
            Some(c) => c.clone(),
            None => {
                let c: Arc<[CertificateDer<'static>]> = Arc::from(chain);
                reg.chains.insert(c.clone());
                c
            }
        };
        reg.conns.insert(
            id,
            Live {
                chain,
                usage,
                peer_id,
                cancel: cancel.clone(),
            },
        );
        drop(reg);
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
        let reg = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for live in reg.conns.values() {
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

    /// Count a connection closed for revocation outside [`LiveConns::close_revoked`].
    pub(crate) fn count_closed(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections registered now.
    pub(crate) fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .conns
            .len()
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
        let mut reg = self.registry.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(live) = reg.conns.remove(&self.id)
            // The set's copy and this one: no other connection presented this chain.
            && Arc::strong_count(&live.chain) == 2
        {
            reg.chains.remove(&*live.chain);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections that present the same chain share one copy of it; a different chain is
    /// its own entry; the copy goes when its last connection does.
    #[test]
    fn chains_are_held_once_and_released_with_their_last_connection() {
        let live = Arc::new(LiveConns::default());
        let a = vec![CertificateDer::from(vec![1u8, 2, 3])];
        let b = vec![CertificateDer::from(vec![4u8, 5, 6])];
        let c1 = live.register((), &a, Usage::ClientAuth, "a".into());
        let c2 = live.register((), &a, Usage::ClientAuth, "a".into());
        let c3 = live.register((), &b, Usage::ClientAuth, "b".into());
        {
            let reg = live.map.lock().unwrap();
            assert_eq!(reg.conns.len(), 3);
            assert_eq!(reg.chains.len(), 2);
            assert!(Arc::ptr_eq(
                &reg.conns[&c1.id].chain,
                &reg.conns[&c2.id].chain
            ));
            assert_eq!(&*reg.conns[&c3.id].chain, b.as_slice());
        }
        drop(c1);
        assert_eq!(
            live.map.lock().unwrap().chains.len(),
            2,
            "c2 still uses chain a"
        );
        drop(c2);
        drop(c3);
        let reg = live.map.lock().unwrap();
        assert!(reg.conns.is_empty());
        assert!(reg.chains.is_empty(), "a chain outlived its connections");
    }
}
