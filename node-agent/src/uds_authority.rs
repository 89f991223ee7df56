//! Accept gRPC C-core clients (Python `grpcio`, py-spiffe, ...) on Unix sockets.
//!
//! For a target `unix:/run/x/socket` gRPC C-core sends the HTTP/2 `:authority` pseudo-header
//! as the percent-encoded path (`run%2Fx%2Fsocket`). That is not a valid URI authority, and
//! the Rust HTTP/2 stack (h2) resets such streams with PROTOCOL_ERROR, so those clients could
//! not talk to a tonic server over a Unix socket at all. Go and Envoy clients send a valid
//! authority and are unaffected.
//!
//! [`AuthorityRewrite`] sits between the accepted socket and the HTTP/2 server. It decides
//! once per connection, on the client's first header block:
//!
//! - the `:authority` is valid (Go, Envoy, tonic clients): that block and everything after
//!   it pass through byte for byte; the shim stops parsing. A later invalid authority on such
//!   a connection reaches h2 unchanged and is refused there, as it would be without the shim.
//! - it is not (gRPC C-core): from then on every client header block is HPACK-decoded (with
//!   the client's compression context), an invalid `:authority` is replaced by `localhost`
//!   (the authority means nothing on a Unix socket), and the block is re-encoded with the
//!   shim's own HPACK context. Once the shim encodes one block it must encode all of them:
//!   the server's decoder follows the shim's context, not the client's.
//!
//! Every other frame, and the server to client direction, pass unchanged.
//!
//! What a client can make the shim hold is bounded: one partial frame of at most the 16 KiB
//! the server advertises, and for a header block being decided or rewritten 64 KiB of block,
//! its frames as received (64 KiB + 16 KiB), at most 32 CONTINUATION frames (2 of them
//! empty), for at most 10 s until END_HEADERS. Past any of these the connection is closed
//! (logged at WARN at most once per 10 s, otherwise at DEBUG).
//!
//! The shim relies on one setting of the HTTP/2 server behind it: the HPACK table size it
//! advertises (`SETTINGS_HEADER_TABLE_SIZE`, 4096, the default), which bounds both the
//! client's table (decoded here) and the shim's (decoded by the server).
//! `tests::server_settings_are_what_the_shim_assumes` fails if tonic's server changes it.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::conn::{ConnState, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, Tracked};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const TYPE_SETTINGS: u8 = 0x4;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE default (the server does not raise it:
/// `tests::server_settings_are_what_the_shim_assumes`).
const MAX_FRAME: usize = 16_384;
/// Largest frame payload accepted from the client: what the server advertises. A larger one
/// is a FRAME_SIZE_ERROR (RFC 9113 §4.2) the server would refuse anyway, so at most one
/// partial frame of `FRAME_HEADER_LEN + MAX_FRAME` bytes is ever buffered.
const MAX_IN_FRAME: usize = MAX_FRAME;
/// Largest header block accepted (h2's default max header list size is 16 KiB; allow slack).
const MAX_BLOCK: usize = 64 * 1024;
/// CONTINUATION frames accepted in one header block: a 64 KiB block needs 4 of 16 KiB; real
/// clients send one or none. Without a count an empty CONTINUATION (which adds nothing to
/// the block) could be repeated forever (the "CONTINUATION flood", CVE-2024-27316 and kin).
const MAX_CONTINUATIONS: usize = 32;
/// Empty CONTINUATION frames accepted in one header block (legal, but pointless).
const MAX_EMPTY_CONTINUATIONS: usize = 2;
/// Bytes of the first header block's frames kept as received (to forward unchanged): the
/// block itself plus frame headers, padding and priority.
const MAX_PENDING_FRAMES: usize = MAX_BLOCK + MAX_FRAME;
/// How long a header block may stay unfinished (HEADERS without END_HEADERS and its
/// CONTINUATIONs still to come); the proxy's request-head timeout is the same.
const HEADER_BLOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest decoded header list accepted (RFC 7541 §4.1 sizes: name + value + 32 each). HPACK
/// lets a small block expand a lot (one byte per repeat of a dynamic-table entry), so the
/// decoded size is bounded on its own.
const MAX_LIST: usize = 64 * 1024;
/// SETTINGS_HEADER_TABLE_SIZE the server advertises (the default: h2 does not change it); a
/// client's dynamic table size update above it is a COMPRESSION_ERROR (RFC 7541 §6.3).
const MAX_TABLE: usize = 4096;

struct Pending {
    stream_id: u32,
    end_stream: bool,
    /// The header block fragment(s), padding and priority removed.
    block: Vec<u8>,
    /// The frames as received, forwarded unchanged if the block needs no rewrite.
    frames: Vec<u8>,
    /// CONTINUATION frames so far, and how many of them were empty.
    continuations: usize,
    empty_continuations: usize,
}

/// What the shim does with the client's bytes on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No header block seen yet.
    Undecided,
    /// The first block needed no change: every byte passes unchanged.
    Passthrough,
    /// The first block was rewritten: every block is re-encoded.
    Rewrite,
}

/// A stream whose client-to-server HTTP/2 header blocks get a valid `:authority`.
pub(crate) struct AuthorityRewrite<S> {
    inner: S,
    raw: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    preface_done: bool,
    eof: bool,
    mode: Mode,
    pending: Option<Pending>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// Armed while a header block is unfinished ([`HEADER_BLOCK_TIMEOUT`]).
    block_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The server's connection slot, given back when the connection is dropped.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The connection as the server tracks it, and its deadlines (`crate::conn`): armed by
    /// [`AuthorityRewrite::tracked`].
    conn: Option<Arc<ConnState>>,
    /// Until the preface and the client's first frame (its SETTINGS) have arrived.
    handshake_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When to look again whether the connection has been idle too long.
    idle_check: Option<Pin<Box<tokio::time::Sleep>>>,
    evicted: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
}

/// Why the shim closed connections, logged at WARN at most once per 10 s (a local client can
/// provoke them at will).
static REFUSALS: crate::throttle::LogThrottle =
    crate::throttle::LogThrottle::new(std::time::Duration::from_secs(10));

fn log_refusal(e: &io::Error) {
    match REFUSALS.allow() {
        Some(dropped) => tracing::warn!(
            dropped,
            "closing a Unix-socket HTTP/2 connection: {e} (at most one such line per 10 s; \
             `dropped` counts those left out)"
        ),
        None => tracing::debug!("closing a Unix-socket HTTP/2 connection: {e}"),
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from client: {msg}"),
    )
}

fn valid_authority(v: &[u8]) -> bool {
    std::str::from_utf8(v).is_ok_and(|s| s.parse::<http::uri::Authority>().is_ok())
}

// === impl AuthorityRewrite ===

impl<S> AuthorityRewrite<S> {
    pub(crate) fn new(inner: S) -> Self {
        AuthorityRewrite {
            inner,
            raw: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            preface_done: false,
            eof: false,
            mode: Mode::Undecided,
            pending: None,
            decoder: {
                let mut d = loona_hpack::Decoder::new();
                d.set_max_allowed_table_size(MAX_TABLE);
                d
            },
            encoder: loona_hpack::Encoder::new(),
            block_deadline: None,
            _slot: None,
            conn: None,
            handshake_deadline: None,
            idle_check: None,
            evicted: None,
        }
    }

    /// Track the connection as `conn` and arm its deadlines: the handshake within
    /// [`HANDSHAKE_TIMEOUT`] from now, [`IDLE_TIMEOUT`] without an open stream, closed when
    /// `conn.evict` is cancelled. Needs the tokio runtime (timers).
    pub(crate) fn tracked(mut self, conn: Arc<ConnState>) -> Self {
        self.handshake_deadline = Some(Box::pin(tokio::time::sleep(HANDSHAKE_TIMEOUT)));
        self.idle_check = Some(Box::pin(tokio::time::sleep(IDLE_TIMEOUT)));
        self.evicted = Some(Box::pin(conn.evict.clone().cancelled_owned()));
        self.conn = Some(conn);
        self
    }

    /// Whether the connection must be closed now (evicted, handshake or idle deadline
    /// passed); registers for a wake-up when that may change.
    fn poll_limits(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if let Some(e) = self.evicted.as_mut()
            && e.as_mut().poll(cx).is_ready()
        {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room for a new connection (the socket is at its cap)",
            ));
        }
        if let Some(d) = self.handshake_deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            let e = io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "HTTP/2 from client: no connection preface and SETTINGS within {:?} of \
                     accept",
                    HANDSHAKE_TIMEOUT
                ),
            );
            log_refusal(&e);
            return Some(e);
        }
        let conn = self.conn.as_ref()?;
        let check = self.idle_check.as_mut()?;
        while check.as_mut().poll(cx).is_ready() {
            let now = tokio::time::Instant::now();
            let next = match conn.idle_since() {
                None => now + IDLE_TIMEOUT,
                Some(since) if since + IDLE_TIMEOUT <= now => {
                    return Some(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("closing a connection without an open stream for {IDLE_TIMEOUT:?}"),
                    ));
                }
                Some(since) => since + IDLE_TIMEOUT,
            };
            check.as_mut().reset(next);
        }
        None
    }

    /// Hold `slot` for as long as the connection lives.
    pub(crate) fn holding(mut self, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        self._slot = Some(slot);
        self
    }

    /// Bytes of the client's held in the shim (tests: bounded whatever the client sends).
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.raw.len()
            + (self.out.len() - self.out_pos)
            + self
                .pending
                .as_ref()
                .map_or(0, |p| p.block.len() + p.frames.len())
    }

    /// Move every complete unit (preface, frame) from `raw` to `out`, rewriting headers.
    fn process(&mut self) -> io::Result<()> {
        if !self.preface_done {
            if self.raw.len() < PREFACE_LEN {
                return Ok(());
            }
            self.out.extend(self.raw.drain(..PREFACE_LEN));
            self.preface_done = true;
        }
        loop {
            if self.mode == Mode::Passthrough {
                self.out.append(&mut self.raw);
                return Ok(());
            }
            if self.raw.len() < FRAME_HEADER_LEN {
                return Ok(());
            }
            let len = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
            if len > MAX_IN_FRAME {
                return Err(bad("frame too large"));
            }
            if self.raw.len() < FRAME_HEADER_LEN + len {
                return Ok(());
            }
            let kind = self.raw[3];
            let flags = self.raw[4];
            let sid = u32::from_be_bytes([self.raw[5], self.raw[6], self.raw[7], self.raw[8]])
                & 0x7fff_ffff;
            let frame: Vec<u8> = self.raw.drain(..FRAME_HEADER_LEN + len).collect();
            if kind == TYPE_SETTINGS {
                // The client's first frame (RFC 9113 §3.4); any other first frame is a
                // connection error the server reports.
                self.handshake_deadline = None;
            }
            let payload = &frame[FRAME_HEADER_LEN..];
            match kind {
                TYPE_HEADERS => {
                    if self.pending.is_some() {
                        return Err(bad("HEADERS while a header block is open"));
                    }
                    let mut p = payload;
                    if flags & FLAG_PADDED != 0 {
                        let pad = *p.first().ok_or_else(|| bad("short padded HEADERS"))? as usize;
                        if 1 + pad > p.len() {
                            return Err(bad("bad padding"));
                        }
                        p = &p[1..p.len() - pad];
                    }
                    if flags & FLAG_PRIORITY != 0 {
                        if p.len() < 5 {
                            return Err(bad("short HEADERS priority"));
                        }
                        p = &p[5..];
                    }
                    if p.len() > MAX_BLOCK {
                        return Err(bad("header block too large"));
                    }
                    self.pending = Some(Pending {
                        stream_id: sid,
                        end_stream: flags & FLAG_END_STREAM != 0,
                        block: p.to_vec(),
                        frames: if self.mode == Mode::Undecided {
                            frame.clone()
                        } else {
                            Vec::new()
                        },
                        continuations: 0,
                        empty_continuations: 0,
                    });
                    if flags & FLAG_END_HEADERS != 0 {
                        self.finish_block()?;
                    }
                }
                TYPE_CONTINUATION => {
                    let pend = self
                        .pending
                        .as_mut()
                        .filter(|p| p.stream_id == sid)
                        .ok_or_else(|| bad("CONTINUATION without HEADERS"))?;
                    pend.continuations += 1;
                    if pend.continuations > MAX_CONTINUATIONS {
                        return Err(bad("too many CONTINUATION frames in one header block"));
                    }
                    if payload.is_empty() {
                        pend.empty_continuations += 1;
                        if pend.empty_continuations > MAX_EMPTY_CONTINUATIONS {
                            return Err(bad("too many empty CONTINUATION frames"));
                        }
                    }
                    pend.block.extend_from_slice(payload);
                    if pend.block.len() > MAX_BLOCK {
                        return Err(bad("header block too large"));
                    }
                    if self.mode == Mode::Undecided {
                        pend.frames.extend_from_slice(&frame);
                        if pend.frames.len() > MAX_PENDING_FRAMES {
                            return Err(bad("header block frames too large"));
                        }
                    }
                    if flags & FLAG_END_HEADERS != 0 {
                        self.finish_block()?;
                    }
                }
                _ => {
                    if self.pending.is_some() {
                        return Err(bad("frame interleaved in a header block"));
                    }
                    self.out.extend_from_slice(&frame);
                }
            }
        }
    }

    fn finish_block(&mut self) -> io::Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(&p.block, |name, value| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_LIST {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| bad(&format!("HPACK: {e:?}")))?;
        if size > MAX_LIST {
            return Err(bad("header list too large"));
        }
        let mut changed = false;
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority" && !valid_authority(value) {
                *value = b"localhost".to_vec();
                changed = true;
            }
        }
        if self.mode == Mode::Undecided {
            if !changed {
                self.out.extend_from_slice(&p.frames);
                self.mode = Mode::Passthrough;
                return Ok(());
            }
            self.mode = Mode::Rewrite;
        }
        let block = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut chunks = block.chunks(MAX_FRAME).peekable();
        let mut first = true;
        if block.is_empty() {
            self.write_frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS | end(p.end_stream),
                p.stream_id,
                &[],
            );
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let kind = if first {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            let mut flags = if last { FLAG_END_HEADERS } else { 0 };
            if first {
                flags |= end(p.end_stream);
            }
            self.write_frame(kind, flags, p.stream_id, chunk);
            first = false;
        }
        Ok(())
    }

    fn write_frame(&mut self, kind: u8, flags: u8, sid: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        self.out.extend_from_slice(&len.to_be_bytes()[1..]);
        self.out.push(kind);
        self.out.push(flags);
        self.out.extend_from_slice(&sid.to_be_bytes());
        self.out.extend_from_slice(payload);
    }
}

/// Run the client-to-server rewrite over `chunks`, delivered in that order as socket reads,
/// then end of stream: the bytes the server would read, or the error that ends the
/// connection (used by regression tests and the `fuzzing` feature's entry point).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn rewrite_chunks(chunks: &[&[u8]]) -> io::Result<Vec<u8>> {
    let mut fix = AuthorityRewrite::new(());
    for chunk in chunks.iter().filter(|c| !c.is_empty()) {
        fix.raw.extend_from_slice(chunk);
        fix.process()?;
    }
    // End of stream: an incomplete tail passes through (as in `poll_read`).
    fix.out.append(&mut fix.raw);
    Ok(fix.out)
}

fn end(end_stream: bool) -> u8 {
    if end_stream { FLAG_END_STREAM } else { 0 }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityRewrite<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            if me.out_pos < me.out.len() {
                let n = buf.remaining().min(me.out.len() - me.out_pos);
                buf.put_slice(&me.out[me.out_pos..me.out_pos + n]);
                me.out_pos += n;
                if me.out_pos == me.out.len() {
                    me.out.clear();
                    me.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if me.eof {
                // Pass any incomplete tail through; the server reports the truncation.
                if !me.raw.is_empty() {
                    me.out.append(&mut me.raw);
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = me.poll_limits(cx) {
                return Poll::Ready(Err(e));
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    if let Some(deadline) = me.block_deadline.as_mut()
                        && deadline.as_mut().poll(cx).is_ready()
                    {
                        let e = io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "HTTP/2 from client: header block unfinished after {:?}",
                                HEADER_BLOCK_TIMEOUT
                            ),
                        );
                        log_refusal(&e);
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        me.eof = true;
                    } else {
                        me.raw.extend_from_slice(rb.filled());
                        if let Err(e) = me.process() {
                            log_refusal(&e);
                            return Poll::Ready(Err(e));
                        }
                        // A header block left open is given HEADER_BLOCK_TIMEOUT in all,
                        // however its frames trickle in.
                        match (&me.pending, &me.block_deadline) {
                            (Some(_), None) => {
                                me.block_deadline =
                                    Some(Box::pin(tokio::time::sleep(HEADER_BLOCK_TIMEOUT)));
                            }
                            (None, Some(_)) => me.block_deadline = None,
                            _ => {}
                        }
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityRewrite<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if let Some(e) = me.poll_limits(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut me.inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if let Some(e) = me.poll_limits(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut me.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S> tonic::transport::server::Connected for AuthorityRewrite<S> {
    type ConnectInfo = Tracked;
    fn connect_info(&self) -> Self::ConnectInfo {
        Tracked(self.conn.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(kind: u8, flags: u8, sid: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        v.push(kind);
        v.push(flags);
        v.extend_from_slice(&sid.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    async fn pump(input: Vec<u8>) -> Vec<u8> {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        tokio::io::AsyncWriteExt::write_all(&mut a, &input)
            .await
            .unwrap();
        drop(a);
        let mut fix = AuthorityRewrite::new(b);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        out
    }

    fn headers_of(out: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut dec = loona_hpack::Decoder::new();
        let mut rest = &out[PREFACE_LEN..];
        let mut blocks = Vec::new();
        while rest.len() >= FRAME_HEADER_LEN {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            if rest[3] == TYPE_HEADERS {
                blocks.push(dec.decode(&rest[9..9 + len]).unwrap());
            }
            rest = &rest[9 + len..];
        }
        blocks
    }

    #[tokio::test]
    async fn rewrites_invalid_authority_keeps_valid_one_and_other_frames() {
        let mut enc = loona_hpack::Encoder::new();
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let h1 = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"tmp%2Fx%2Fsocket"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b"workload.spiffe.io", b"true"),
        ]);
        // Same header again: the client's encoder now uses its dynamic table.
        let h2 = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"tmp%2Fx%2Fsocket"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
        ]);
        let h3 = enc.encode([(&b":authority"[..], &b"localhost:1234"[..])]);
        let mut input = preface.clone();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        // split the first block into HEADERS + CONTINUATION, padded
        let (a, b) = h1.split_at(h1.len() / 2);
        let mut padded = vec![3u8];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(TYPE_HEADERS, FLAG_PADDED, 1, &padded));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b));
        input.extend(frame(0x0, 0x1, 1, b"data"));
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            3,
            &h2,
        ));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 5, &h3));
        let out = pump(input).await;
        assert_eq!(&out[..PREFACE_LEN], &preface[..]);
        let blocks = headers_of(&out);
        assert_eq!(blocks.len(), 3);
        let auth = |b: &Vec<(Vec<u8>, Vec<u8>)>| {
            b.iter()
                .find(|(n, _)| n == b":authority")
                .unwrap()
                .1
                .clone()
        };
        assert_eq!(auth(&blocks[0]), b"localhost");
        assert_eq!(auth(&blocks[1]), b"localhost");
        assert_eq!(auth(&blocks[2]), b"localhost:1234");
        assert!(
            blocks[0]
                .iter()
                .any(|(n, v)| n == b"workload.spiffe.io" && v == b"true")
        );
        // the DATA frame passed unchanged
        assert!(out.windows(4).any(|w| w == b"data"));
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// A client whose first authority is valid (Go, Envoy, tonic) gets its bytes through
    /// unchanged: nothing is decoded or re-encoded after the first block. A later invalid
    /// authority on that connection passes unchanged too (h2 then refuses it, as it would
    /// without the shim), since re-encoding one block would desynchronize the server's HPACK
    /// context from the client's.
    #[test]
    fn valid_first_authority_passes_byte_for_byte() {
        let mut enc = loona_hpack::Encoder::new();
        let h1 = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"localhost"),
            (
                b":path",
                b"/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
            ),
        ]);
        let h2 = enc.encode([(&b":authority"[..], &b"tmp%2Fx%2Fsocket"[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        let (a, b) = h1.split_at(h1.len() / 2);
        input.extend(frame(TYPE_HEADERS, 0, 1, a));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b));
        input.extend(frame(0x0, 0x1, 1, b"data"));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &h2));
        // Past the first block the shim no longer parses: even bytes that are not HTTP/2
        // reach the server, which judges them.
        input.extend(b"not a frame");
        let out = rewrite_chunks(&[&input]).unwrap();
        assert_eq!(out, input);
        // Cut anywhere, same answer.
        for at in [1, PREFACE_LEN + 3, PREFACE_LEN + 9 + 5, input.len() - 4] {
            let (x, y) = input.split_at(at);
            assert_eq!(rewrite_chunks(&[x, y]).unwrap(), input, "cut at {at}");
        }
    }

    /// Twin: a first block with an invalid authority switches the connection to rewriting,
    /// so its bytes change (the authority) and later blocks are re-encoded as well.
    #[test]
    fn invalid_first_authority_rewrites_the_connection() {
        let mut enc = loona_hpack::Encoder::new();
        let h1 = enc.encode([(&b":authority"[..], &b"tmp%2Fx%2Fsocket"[..])]);
        let h2 = enc.encode([(&b":authority"[..], &b"tmp%2Fx%2Fsocket"[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &h1));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &h2));
        let out = rewrite_chunks(&[&input]).unwrap();
        assert_ne!(out, input);
        let blocks = headers_of(&out);
        assert_eq!(blocks.len(), 2);
        for b in &blocks {
            assert_eq!(b, &vec![(b":authority".to_vec(), b"localhost".to_vec())]);
        }
    }

    /// The one server setting the shim depends on: the HPACK table size the agent's HTTP/2
    /// server advertises. Read from the real server (tonic, as the agent serves SDS) over a
    /// Unix socket; fails if a tonic/h2 upgrade changes it.
    #[tokio::test]
    async fn server_settings_are_what_the_shim_assumes() {
        use std::sync::Arc;
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sds.sock");
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn({
            let (path, stop) = (path.clone(), stop.clone());
            async move {
                let store = crate::SecretStore::new();
                let metrics = Arc::new(crate::Metrics::new());
                crate::serve_sds(&path, store, metrics, stop).await
            }
        });
        let mut conn = loop {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        conn.write_all(PREFACE).await.unwrap();
        conn.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
        // The server's first frame is its SETTINGS (RFC 9113 §3.4).
        let mut head = [0u8; FRAME_HEADER_LEN];
        conn.read_exact(&mut head).await.unwrap();
        assert_eq!(head[3], 0x4, "first server frame is SETTINGS");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body).await.unwrap();
        let settings: Vec<(u16, u32)> = body
            .chunks_exact(6)
            .map(|c| {
                (
                    u16::from_be_bytes([c[0], c[1]]),
                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                )
            })
            .collect();
        let table = settings
            .iter()
            .find(|(id, _)| *id == 0x1)
            .map_or(4096, |(_, v)| *v as usize);
        assert_eq!(
            table, MAX_TABLE,
            "SETTINGS_HEADER_TABLE_SIZE changed ({settings:?}): revisit MAX_TABLE and the encoder"
        );
        let frame_size = settings
            .iter()
            .find(|(id, _)| *id == 0x5)
            .map_or(16_384, |(_, v)| *v as usize);
        assert_eq!(
            frame_size, MAX_IN_FRAME,
            "SETTINGS_MAX_FRAME_SIZE changed ({settings:?}): revisit MAX_IN_FRAME"
        );
        drop(conn);
        stop.cancel();
        let _ = server.await;
    }

    /// HPACK literal with incremental indexing, literal name (lengths < 127).
    fn indexed_literal(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut v = vec![0x40, name.len() as u8];
        v.extend_from_slice(name);
        v.extend(loona_hpack::encoder::encode_integer(value.len(), 7));
        v.extend_from_slice(value);
        v
    }

    /// A 20-byte HEADERS block naming a 3000-byte dynamic-table entry 2000 times decodes to
    /// about 6 MB of headers (a 64 KiB block would make it about 200 MB): refused, as the h2
    /// server behind would refuse the header list anyway.
    #[test]
    fn header_list_expanding_past_the_limit_is_refused() {
        let mut block = indexed_literal(b"x-big", &[b'a'; 3000]);
        block.extend(std::iter::repeat_n(0xbe, 2000)); // dynamic index 62
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        let err = rewrite_chunks(&[&input]).unwrap_err();
        assert!(err.to_string().contains("header list too large"), "{err}");
        // Under the limit the same shape is rewritten.
        let mut block = indexed_literal(b"x-big", &[b'a'; 3000]);
        block.extend(std::iter::repeat_n(0xbe, 10));
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        assert!(rewrite_chunks(&[&input]).is_ok());
    }

    /// A dynamic table size update above the 4096 octets the server advertises is a
    /// compression error (RFC 7541 §6.3); accepted, it let a client grow our table without
    /// bound.
    #[test]
    fn table_size_update_above_the_advertised_size_is_refused() {
        let mut block = vec![0x3f];
        block.extend(&loona_hpack::encoder::encode_integer(1 << 30, 5)[1..]);
        block.extend(indexed_literal(b"x-a", b"b"));
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        assert!(rewrite_chunks(&[&input]).is_err());
        // Shrinking it is allowed.
        let mut block = vec![0x3f];
        block.extend(&loona_hpack::encoder::encode_integer(100, 5)[1..]);
        block.extend(indexed_literal(b"x-a", b"b"));
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        assert!(rewrite_chunks(&[&input]).is_ok());
    }

    /// A frame longer than the 16 KiB the server advertises is refused as soon as its header
    /// arrives (before its payload is buffered); before, up to 1 MiB of a partial frame was
    /// held per connection. Twin: a 16 KiB HEADERS frame is fine.
    #[test]
    fn frame_longer_than_the_advertised_frame_size_is_refused() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &vec![0x82; MAX_FRAME + 1],
        ));
        let err = rewrite_chunks(&[&input[..PREFACE_LEN + FRAME_HEADER_LEN]]).unwrap_err();
        assert!(err.to_string().contains("frame too large"), "{err}");
        let mut block = vec![0x40, 5];
        block.extend_from_slice(b"x-big");
        let value_len = MAX_FRAME - block.len() - 3;
        block.extend(loona_hpack::encoder::encode_integer(value_len, 7));
        block.extend(std::iter::repeat_n(b'a', value_len));
        assert_eq!(block.len(), MAX_FRAME);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        assert!(rewrite_chunks(&[&input]).is_ok());
    }

    /// HEADERS without END_HEADERS, then empty CONTINUATIONs forever: each added 9 bytes to
    /// the frames kept for forwarding and nothing to the (size-checked) block, so one client
    /// grew the agent's memory without bound. Now the connection is refused after a few, and
    /// what the shim holds stays small however many arrive.
    #[test]
    fn continuation_flood_is_refused_and_buffering_stays_bounded() {
        let mut fix = AuthorityRewrite::new(());
        fix.raw.extend_from_slice(PREFACE);
        fix.raw
            .extend(frame(TYPE_HEADERS, 0, 1, &indexed_literal(b"x-a", b"b")));
        fix.process().unwrap();
        let mut refused = None;
        for i in 0..100_000 {
            fix.raw.extend(frame(TYPE_CONTINUATION, 0, 1, &[]));
            if let Err(e) = fix.process() {
                refused = Some((i, e));
                break;
            }
            assert!(fix.buffered() < 1024, "{} bytes held", fix.buffered());
        }
        let (i, err) = refused.expect("the flood is refused");
        assert_eq!(i, MAX_EMPTY_CONTINUATIONS, "{err}");
        assert!(err.to_string().contains("empty CONTINUATION"), "{err}");
        // One-byte CONTINUATIONs are counted too.
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, 0, 1, &[]));
        for _ in 0..=MAX_CONTINUATIONS {
            input.extend(frame(TYPE_CONTINUATION, 0, 1, &[0x82]));
        }
        let err = rewrite_chunks(&[&input]).unwrap_err();
        assert!(err.to_string().contains("too many CONTINUATION"), "{err}");
    }

    /// Twin: a block split over HEADERS, an empty CONTINUATION and a few more (as large
    /// blocks and odd clients do) is accepted and rewritten.
    #[test]
    fn a_block_over_a_few_continuations_is_accepted() {
        let mut enc = loona_hpack::Encoder::new();
        let h = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"tmp%2Fx%2Fsocket"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
        ]);
        let mut input = PREFACE.to_vec();
        let parts: Vec<&[u8]> = h.chunks(h.len().div_ceil(4)).collect();
        input.extend(frame(TYPE_HEADERS, 0, 1, parts[0]));
        input.extend(frame(TYPE_CONTINUATION, 0, 1, &[]));
        for (i, p) in parts[1..].iter().enumerate() {
            let flags = if i + 2 == parts.len() {
                FLAG_END_HEADERS
            } else {
                0
            };
            input.extend(frame(TYPE_CONTINUATION, flags, 1, p));
        }
        let out = rewrite_chunks(&[&input]).unwrap();
        let blocks = headers_of(&out);
        assert_eq!(blocks.len(), 1);
        assert!(blocks[0].contains(&(b":authority".to_vec(), b"localhost".to_vec())));
    }

    /// A header block left unfinished closes the connection after HEADER_BLOCK_TIMEOUT
    /// (paused time: no real wait). Twin: a finished block is delivered and the connection
    /// stays open however long the client then stays silent.
    #[tokio::test(start_paused = true)]
    async fn an_unfinished_header_block_times_out() {
        use tokio::io::AsyncWriteExt;
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, 0, 1, &indexed_literal(b"x-a", b"b")));
        a.write_all(&input).await.unwrap();
        let mut fix = AuthorityRewrite::new(b);
        let mut buf = vec![0u8; 1024];
        assert_eq!(fix.read(&mut buf).await.unwrap(), PREFACE_LEN);
        let err = tokio::time::timeout(HEADER_BLOCK_TIMEOUT * 2, fix.read(&mut buf))
            .await
            .expect("refused before the outer timeout")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");

        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &indexed_literal(b"x-a", b"b"),
        ));
        a.write_all(&input).await.unwrap();
        let mut fix = AuthorityRewrite::new(b);
        let mut got = 0;
        while got < input.len() {
            got += fix.read(&mut buf).await.unwrap();
        }
        assert!(
            tokio::time::timeout(HEADER_BLOCK_TIMEOUT * 10, fix.read(&mut buf))
                .await
                .is_err(),
            "a finished block arms no timer"
        );
    }

    /// The same flood against the real SDS server over its Unix socket: the agent closes
    /// the connection (so the client's writes fail or it reads end of stream) long before
    /// the client has sent 64 MiB of CONTINUATIONs.
    #[tokio::test]
    async fn a_flooding_client_is_disconnected_by_the_server() {
        use std::sync::Arc;
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sds.sock");
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn({
            let (path, stop) = (path.clone(), stop.clone());
            async move {
                let store = crate::SecretStore::new();
                let metrics = Arc::new(crate::Metrics::new());
                crate::serve_sds(&path, store, metrics, stop).await
            }
        });
        let conn = loop {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        let (mut rd, mut wr) = conn.into_split();
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        });
        let mut head = PREFACE.to_vec();
        head.extend(frame(0x4, 0, 0, &[]));
        head.extend(frame(TYPE_HEADERS, 0, 1, &indexed_literal(b"x-a", b"b")));
        wr.write_all(&head).await.unwrap();
        let chunk: Vec<u8> = std::iter::repeat_n(frame(TYPE_CONTINUATION, 0, 1, &[]), 7282)
            .flatten()
            .collect();
        let mut sent = 0usize;
        let mut closed = false;
        while sent < 64 << 20 {
            if wr.write_all(&chunk).await.is_err() {
                closed = true;
                break;
            }
            sent += chunk.len();
        }
        assert!(closed, "still accepted after {sent} bytes of CONTINUATIONs");
        tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("the server closed the connection")
            .unwrap();
        stop.cancel();
        let _ = server.await;
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b"xx"));
        let (mut a, b) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut a, &input)
            .await
            .unwrap();
        drop(a);
        let mut fix = AuthorityRewrite::new(b);
        let mut out = Vec::new();
        assert!(fix.read_to_end(&mut out).await.is_err());
    }
}
