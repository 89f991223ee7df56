//! A minimal HTTP/1.1 GET for proxies' admin endpoints (plaintext, loopback), bounded in time.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;

/// Largest admin answer read.
const MAX_BODY: usize = 8 << 20;

/// `GET http://addr{path}`: the status and body, or a one-line reason.
pub(crate) async fn get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, Bytes), String> {
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let driver = tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("host", addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("{addr}{path}: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("GET http://{addr}{path}: reading the body: {e}"))?
            .to_bytes();
        driver.abort();
        Ok((status, body))
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "GET http://{addr}{path}: no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}
