//! Relaying bytes both ways between two streams (TCP ports, upstream ports, CONNECT
//! tunnels) with buffers that exist only while bytes move.
//!
//! `tokio::io::copy_bidirectional` gives every relay two 8 KiB buffers for its whole life:
//! 16 KiB of heap per connection, idle or not. Here a direction takes a buffer when it reads
//! and gives it up as soon as it has nothing left to write and its reader has nothing to give
//! (`Pending`), so an idle relay holds none (the wake-up comes from the stream's own
//! readiness registration, as before).
//!
//! A buffer given up goes back to a one-slot spare of its worker thread, and the next read
//! on that thread takes it: a relay that wakes for a request and goes idle again costs no
//! allocation, and no buffer is zeroed (reads fill uninitialized capacity through
//! `tokio_util::io::poll_read_buf`; only the bytes a read wrote are ever looked at, so what
//! an earlier connection left in a reused buffer is never seen). Zeroing a fresh 8 KiB per
//! read attempt, four per proxied request, was two thirds of the client proxy's
//! instructions (issue #15, session 17).

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

/// Bytes read per call, as tokio's copy uses.
const BUF_SIZE: usize = 8 * 1024;

thread_local! {
    /// The last buffer given up on this thread, for the next read to take.
    static SPARE: RefCell<Option<BytesMut>> = const { RefCell::new(None) };
}

/// An empty buffer of `BUF_SIZE` capacity: this thread's spare, or a new (uninitialized)
/// allocation.
fn take_buf() -> BytesMut {
    SPARE
        .try_with(|s| s.borrow_mut().take())
        .ok()
        .flatten()
        .unwrap_or_else(|| BytesMut::with_capacity(BUF_SIZE))
}

/// Keeps `buf` as this thread's spare when the slot is free; frees it otherwise.
fn give_back(mut buf: BytesMut) {
    buf.clear();
    if buf.capacity() < BUF_SIZE {
        return;
    }
    let _ = SPARE.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.is_none() {
            *s = Some(buf);
        }
    });
}

/// One direction of a relay.
#[derive(Default)]
struct Half {
    /// `Some` only while bytes are in it or a read is being tried; bytes `pos..cap` are
    /// still to be written.
    buf: Option<BytesMut>,
    pos: usize,
    cap: usize,
    amt: u64,
    read_done: bool,
    need_flush: bool,
    /// The writer was shut down after the reader ended: this direction is finished.
    done: bool,
}

impl Half {
    /// Copy from `r` to `w` until `r` ends, then shut `w` down; the bytes copied.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.amt));
        }
        loop {
            if self.pos == self.cap && !self.read_done {
                let buf = self.buf.get_or_insert_with(take_buf);
                buf.clear();
                match tokio_util::io::poll_read_buf(Pin::new(&mut *r), cx, buf) {
                    Poll::Pending => {
                        // Nothing buffered and nothing to read: give the buffer back.
                        if let Some(b) = self.buf.take() {
                            give_back(b);
                        }
                        if self.need_flush {
                            ready!(Pin::new(&mut *w).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(n)) => {
                        self.pos = 0;
                        self.cap = n;
                        if n == 0 {
                            self.read_done = true;
                            if let Some(b) = self.buf.take() {
                                give_back(b);
                            }
                        }
                    }
                }
            }
            while self.pos < self.cap {
                let Some(buf) = self.buf.as_deref() else {
                    break;
                };
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "write zero bytes into writer",
                    )));
                }
                self.pos += n;
                self.amt += n as u64;
                self.need_flush = true;
            }
            if self.pos == self.cap && self.read_done {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.amt));
            }
        }
    }
}

/// Copy `a` → `b` and `b` → `a` until both ends have finished (each writer is shut down
/// when its reader ends), like `tokio::io::copy_bidirectional`: `(a to b, b to a)` bytes.
pub(crate) async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut ab = Half::default();
    let mut ba = Half::default();
    poll_fn(|cx| {
        let to_b = ab.poll_copy(cx, a, b)?;
        let to_a = ba.poll_copy(cx, b, a)?;
        match (to_b, to_a) {
            (Poll::Ready(x), Poll::Ready(y)) => Poll::Ready(Ok((x, y))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes cross both ways intact (more than a buffer's worth, in pieces), each side sees
    /// the other's end, and the counts are per direction.
    #[tokio::test]
    async fn relays_both_ways_and_ends_both_sides() {
        let (mut client, mut near) = tokio::io::duplex(1024);
        let (mut far, mut server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move { copy_bidirectional(&mut near, &mut far).await });
        let up: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..30_000u32).map(|i| (i % 13) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let c = tokio::spawn(async move {
            client.write_all(&up2).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let s = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(&down2).await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        assert_eq!(s.await.unwrap(), up);
        assert_eq!(c.await.unwrap(), down);
        let (ab, ba) = relay.await.unwrap().unwrap();
        assert_eq!((ab, ba), (up.len() as u64, down.len() as u64));
    }

    /// An idle direction holds no buffer; one with bytes in flight keeps them until written.
    #[tokio::test]
    async fn idle_directions_hold_no_buffer() {
        let (mut client, mut near) = tokio::io::duplex(1024);
        let (mut far, mut server) = tokio::io::duplex(64);
        let mut h = Half::default();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(h.poll_copy(&mut cx, &mut near, &mut far).is_pending());
        assert!(h.buf.is_none(), "an idle relay direction keeps a buffer");
        // 200 bytes into a 64-byte pipe: the rest waits in the buffer.
        client.write_all(&[7u8; 200]).await.unwrap();
        assert!(h.poll_copy(&mut cx, &mut near, &mut far).is_pending());
        assert!(
            h.buf.is_some(),
            "bytes not yet written were dropped with the buffer"
        );
        let mut got = vec![0u8; 200];
        let reader = tokio::spawn(async move {
            server.read_exact(&mut got).await.unwrap();
            got
        });
        let copied = poll_fn(|cx| match h.poll_copy(cx, &mut near, &mut far) {
            Poll::Pending if h.amt == 200 => Poll::Ready(h.buf.is_none()),
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => panic!("ended early: {r:?}"),
        })
        .await;
        assert!(copied, "the buffer outlived the bytes it carried");
        assert_eq!(reader.await.unwrap(), vec![7u8; 200]);
    }

    /// A buffer given up is the thread's spare and the next read takes it (no allocation),
    /// and the next relay sees only the bytes it read itself, never what the buffer held for
    /// an earlier one.
    #[tokio::test]
    async fn a_spare_buffer_is_reused_without_its_old_bytes() {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let (mut c1, mut near1) = tokio::io::duplex(16 * 1024);
        let (mut far1, mut s1) = tokio::io::duplex(16 * 1024);
        let mut first = Half::default();
        c1.write_all(&[0x5a; 4000]).await.unwrap();
        assert!(first.poll_copy(&mut cx, &mut near1, &mut far1).is_pending());
        assert!(first.buf.is_none());
        let mut got = vec![0u8; 4000];
        s1.read_exact(&mut got).await.unwrap();
        assert_eq!(got, vec![0x5a; 4000]);
        let spare = SPARE.with(|s| s.borrow().as_ref().map(|b| (b.as_ptr(), b.len())));
        let (ptr, len) = spare.expect("the buffer was not kept as the spare");
        assert_eq!(len, 0, "a spare buffer must be empty");

        let (mut c2, mut near2) = tokio::io::duplex(16 * 1024);
        let (mut far2, mut s2) = tokio::io::duplex(16 * 1024);
        let mut second = Half::default();
        c2.write_all(b"abc").await.unwrap();
        drop(c2);
        let n = poll_fn(|cx| second.poll_copy(cx, &mut near2, &mut far2))
            .await
            .unwrap();
        assert_eq!(n, 3);
        let mut out = Vec::new();
        s2.read_to_end(&mut out).await.unwrap();
        assert_eq!(
            out, b"abc",
            "bytes of the earlier relay leaked into this one"
        );
        let again = SPARE.with(|s| s.borrow().as_ref().map(|b| b.as_ptr()));
        assert_eq!(again, Some(ptr), "the spare was not the buffer reused");
    }
}
