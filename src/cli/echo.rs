//! `rampart echo --listen ADDR`: a tiny app for demos and tests.
//!
//! One port speaks three things, told apart by the first bytes a client sends:
//! - the HTTP/2 connection preface (`PRI * HTTP/2.0...`): h2c with prior knowledge;
//! - an HTTP/1.x request line (`GET /path HTTP/1.1`): HTTP/1.1;
//! - anything else: raw TCP, every byte is sent back as it came.
//!
//! HTTP requests are answered `200` with a JSON body describing the request as it arrived
//! (method, path, query, headers including `x-forwarded-client-cert`, protocol version,
//! remote address), so a demo or a test can see what a proxy forwarded.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::task::{Context, Poll};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request methods recognised in an HTTP/1 request line.
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// Largest request body read (and counted) before answering.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, clap::Args)]
pub(crate) struct EchoArgs {
    /// Address to listen on (port 0 picks a free one; the bound address is printed).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Name put in every JSON answer as `service` (to see which app answered in a demo).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
}

impl EchoArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        rt.block_on(serve(self))
    }
}

async fn serve(args: EchoArgs) -> anyhow::Result<ExitCode> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    let local = listener.local_addr()?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "rampart echo listening on {local}")?;
        out.flush()?;
    }
    let name: Option<std::sync::Arc<str>> = args.name.map(Into::into);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let name = name.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, peer, name).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = super::process::shutdown_signal() => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// What the first bytes of a connection say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sniffed {
    /// HTTP/2 with prior knowledge (the preface).
    H2,
    /// An HTTP/1.x request line.
    Http1,
    /// Anything else.
    Tcp,
    /// Not enough bytes yet to tell.
    NeedMore,
}

/// Classify a connection from the bytes read so far.
pub(crate) fn sniff(buf: &[u8]) -> Sniffed {
    if buf.is_empty() {
        return Sniffed::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() {
            Sniffed::H2
        } else {
            Sniffed::NeedMore
        };
    }
    let mut could_be_method = false;
    for m in METHODS {
        let k = buf.len().min(m.len());
        if buf[..k] == m[..k] {
            if buf.len() >= m.len() {
                return Sniffed::Http1;
            }
            could_be_method = true;
        }
    }
    if could_be_method {
        Sniffed::NeedMore
    } else {
        Sniffed::Tcp
    }
}

async fn handle(
    mut stream: TcpStream,
    peer: SocketAddr,
    name: Option<std::sync::Arc<str>>,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(64);
    let kind = loop {
        let mut chunk = [0u8; 64];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // Closed before saying anything we could classify: echo what came, then done.
            stream.write_all(&buf).await?;
            return stream.shutdown().await;
        }
        buf.extend_from_slice(&chunk[..n]);
        match sniff(&buf) {
            Sniffed::NeedMore => continue,
            other => break other,
        }
    };
    let io = TokioIo::new(Prefixed::new(buf, stream));
    let svc = hyper::service::service_fn(move |req| answer(req, peer, name.clone()));
    match kind {
        Sniffed::H2 => hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc)
            .await
            .map_err(io::Error::other),
        Sniffed::Http1 => hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .with_upgrades()
            .await
            .map_err(io::Error::other),
        Sniffed::Tcp | Sniffed::NeedMore => {
            let mut s = io.into_inner();
            let (mut r, mut w) = tokio::io::split(&mut s);
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await
        }
    }
}

async fn answer(
    req: Request<Incoming>,
    peer: SocketAddr,
    name: Option<std::sync::Arc<str>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    let body_bytes = match limited.collect().await {
        Ok(c) => Some(c.to_bytes().len()),
        Err(_) => None,
    };
    let report = describe(&parts, peer, name.as_deref(), body_bytes);
    let mut text = serde_json::to_vec_pretty(&report).unwrap_or_default();
    text.push(b'\n');
    let resp = Response::builder()
        .status(if body_bytes.is_some() { 200 } else { 413 })
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
    Ok(resp)
}

/// The JSON answer for one request.
pub(crate) fn describe(
    parts: &http::request::Parts,
    peer: SocketAddr,
    name: Option<&str>,
    body_bytes: Option<usize>,
) -> Value {
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in &parts.headers {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        headers
            .entry(k.as_str().to_string())
            .and_modify(|old| {
                old.push_str(", ");
                old.push_str(&v);
            })
            .or_insert(v);
    }
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| headers.get("host").cloned());
    let mut out = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "authority": authority,
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "remote_addr": peer.to_string(),
        "body_bytes": body_bytes,
    });
    if let Some(n) = name {
        out["service"] = json!(n);
    }
    out
}

/// A stream that first yields bytes already read from it (the sniffed prefix).
struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl Prefixed {
    fn new(prefix: Vec<u8>, inner: TcpStream) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
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
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_h2_preface_only_when_complete() {
        assert_eq!(sniff(H2_PREFACE), Sniffed::H2);
        assert_eq!(sniff(&H2_PREFACE[..10]), Sniffed::NeedMore);
        // "PRI " is not an HTTP/1 method we answer; a wrong preface is raw TCP.
        assert_eq!(sniff(b"PRI * HTTP/1.1\r\n"), Sniffed::Tcp);
    }

    #[test]
    fn sniffs_http1_request_lines() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniffed::Http1);
        assert_eq!(sniff(b"POST /x"), Sniffed::Http1);
        assert_eq!(sniff(b"GE"), Sniffed::NeedMore);
        assert_eq!(sniff(b"P"), Sniffed::NeedMore);
        assert_eq!(sniff(b"OPTIONS * HTTP/1.1"), Sniffed::Http1);
    }

    #[test]
    fn anything_else_is_tcp() {
        assert_eq!(sniff(b"hello\n"), Sniffed::Tcp);
        assert_eq!(sniff(b"get / HTTP/1.1"), Sniffed::Tcp);
        assert_eq!(sniff(b"GETX"), Sniffed::Tcp);
        assert_eq!(sniff(&[0x16, 0x03, 0x01]), Sniffed::Tcp);
        assert_eq!(sniff(b""), Sniffed::NeedMore);
    }
}
