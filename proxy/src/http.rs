//! Serving HTTP connections (inbound and the outbound HTTP proxy alike): the edge's timers
//! and limits, drain on the connection's signal, the request span, and the responses the
//! proxy writes itself (denials as Envoy writes them, gateway errors).

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::drain::Drain;
use crate::edge::{Activity, EdgeLimits, Tracked, TrackedService};
use crate::metrics::Metered;

/// A response body: the app's or peer's (metered), or one the proxy wrote.
pub(crate) type Body = Either<Metered<Incoming>, Full<Bytes>>;

/// Serve one HTTP connection (HTTP/1.1 or h2, sniffed) until it ends, its edge timer
/// expires, or drain asks it to finish (then the request in flight completes first).
/// `upgrades`: allow `CONNECT`/upgrades (the outbound HTTP proxy).
pub(crate) async fn serve<IO, S>(edge: &EdgeLimits, drain: &Drain, io: IO, svc: S, upgrades: bool)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let act = Activity::new(true);
    let builder = edge.server();
    let io = TokioIo::new(Tracked::new(io, act.clone()));
    let svc = TrackedService::new(svc, act.clone());
    if upgrades {
        drive(
            builder.serve_connection_with_upgrades(io, svc),
            &act,
            edge,
            drain,
        )
        .await;
    } else {
        drive(builder.serve_connection(io, svc), &act, edge, drain).await;
    }
}

async fn drive<C>(conn: C, act: &Activity, edge: &EdgeLimits, drain: &Drain)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(conn);
    let mut stop = drain.conn_signal();
    if *stop.borrow() {
        conn.as_mut().graceful_shutdown();
    }
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            return;
        }
        why = act.expired(edge) => {
            tracing::debug!(reason = why, "HTTP connection closed");
            return;
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
        }
    }
    let _ = conn.await;
}

/// A request's span (method, path, `x-request-id`), a child of its connection's; at the
/// default log level (info) requests get no span of their own and log under the connection's.
pub(crate) fn request_span<B>(conn: &tracing::Span, req: &Request<B>) -> tracing::Span {
    let span = tracing::debug_span!(
        parent: conn,
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-"),
    );
    if span.is_disabled() {
        conn.clone()
    } else {
        span
    }
}

/// A plain-text response the proxy writes.
pub(crate) fn text_response(status: u16, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// [`text_response`] with a body made at run time.
pub(crate) fn owned_text_response(status: u16, body: String) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// A denial as Envoy answers it: HTTP status + body, or a gRPC trailers-only response
/// (with the gRPC status it carries).
pub(crate) fn denial(status: u16, grpc: bool, body: &str) -> (Response<Body>, Option<u16>) {
    if grpc {
        let code: u16 = match status {
            401 => 16, // UNAUTHENTICATED
            400 => 13, // INTERNAL
            _ => 7,    // PERMISSION_DENIED
        };
        let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(code));
        if let Ok(v) = HeaderValue::from_str(body) {
            h.insert("grpc-message", v);
        }
        return (r, Some(code));
    }
    (owned_text_response(status, body.to_string()), None)
}

/// Whether the request is gRPC (by content type).
pub(crate) fn is_grpc_request<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The request's authority as policy sees it (`:authority`, else Host).
pub(crate) fn authority_of<B>(req: &Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            // Never "no Host" for a Host the app will see (see `edge::header_text`).
            req.headers()
                .get(header::HOST)
                .map(crate::edge::header_text)
        })
        .unwrap_or_default()
}
