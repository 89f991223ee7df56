//! The kubelet's probes of the app, passed through the sidecar (Istio's probe rewriting).
//!
//! The kubelet probes a Pod from the node, in plaintext, at the Pod IP; with the app behind
//! the proxy under STRICT mTLS an `httpGet` or `tcpSocket` probe of the app's port would be
//! refused. The injector therefore rewrites each such probe into `httpGet` of
//! `/app-health/<container>/<livez|readyz|startupz>` on the proxy's probe port (15020, as
//! Istio's) and hands the proxy the original probes as JSON in `ISTIO_KUBE_APP_PROBERS`
//! (Istio's variable and format: path -> `{"httpGet": {...}}` or `{"tcpSocket": {...}}`,
//! with `timeoutSeconds`). This listener answers only those paths, by doing the original
//! probe against the app on 127.0.0.1 (where the app listens behind the proxy):
//!
//! - `httpGet`: a GET of the original path with the original headers; the app's status code
//!   is the answer (the kubelet takes 200-399 as success), 503 if the app cannot be reached,
//!   504 past the probe's timeout;
//! - `tcpSocket`: 200 if a TCP connection opens within the timeout, 503 otherwise.
//!
//! Every other path is 404 and nothing else is forwarded: the listener is no open proxy to
//! the app. Like Istio's, it is plaintext and answers anyone who reaches the Pod IP
//! (docs/THREAT_MODEL.md).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

/// The environment variable the injector sets (Istio's name).
pub const APP_PROBERS_ENV: &str = "ISTIO_KUBE_APP_PROBERS";
/// The prefix of every rewritten probe path.
pub const APP_HEALTH_PREFIX: &str = "/app-health/";
/// Connections served at once (the kubelet makes a few per Pod per period).
const MAX_CONNECTIONS: usize = 32;
/// A probe request's head must arrive within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The kubelet's default probe timeout, when the probe names none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest probe timeout taken.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// One original probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prober {
    /// `httpGet` of `path` on 127.0.0.1:`port` with `headers`.
    Http {
        /// The app's port.
        port: u16,
        /// The path and query the kubelet would have asked for.
        path: String,
        /// `httpHeaders` of the probe (a `Host` among them replaces the default).
        headers: Vec<(HeaderName, HeaderValue)>,
        /// `timeoutSeconds`.
        timeout: Duration,
    },
    /// `tcpSocket` on 127.0.0.1:`port`.
    Tcp {
        /// The app's port.
        port: u16,
        /// `timeoutSeconds`.
        timeout: Duration,
    },
}

/// The probes the listener answers, by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppProbers(BTreeMap<String, Prober>);

impl AppProbers {
    /// Reads `ISTIO_KUBE_APP_PROBERS`'s JSON. Refuses (naming the path and field) what the
    /// injector does not write: a path outside `/app-health/`, a port that is not a number in
    /// 1-65535, an HTTPS probe, a probe with neither `httpGet` nor `tcpSocket`.
    pub fn parse(json: &str) -> Result<AppProbers, String> {
        let v: Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
        let map = v.as_object().ok_or("expected an object of path -> probe")?;
        let mut out = BTreeMap::new();
        for (path, probe) in map {
            let at = |what: &str| format!("{path}: {what}");
            if !path.starts_with(APP_HEALTH_PREFIX) || path.contains(['?', '#']) {
                return Err(at(
                    "the path must start with /app-health/ and have no query",
                ));
            }
            let timeout = match probe.get("timeoutSeconds") {
                None | Some(Value::Null) => DEFAULT_TIMEOUT,
                Some(t) => {
                    let secs = t
                        .as_u64()
                        .filter(|s| *s > 0)
                        .ok_or_else(|| at("timeoutSeconds must be a positive number"))?;
                    Duration::from_secs(secs).min(MAX_TIMEOUT)
                }
            };
            let port_of = |handler: &Value| {
                handler
                    .get("port")
                    .and_then(Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p > 0)
                    .ok_or_else(|| at("port must be a number in 1-65535"))
            };
            let prober = if let Some(h) = probe.get("httpGet") {
                let scheme = h.get("scheme").and_then(Value::as_str).unwrap_or("HTTP");
                if !scheme.eq_ignore_ascii_case("HTTP") {
                    return Err(at(&format!(
                        "httpGet.scheme {scheme}: only HTTP probes are passed through"
                    )));
                }
                let target = h.get("path").and_then(Value::as_str).unwrap_or("/");
                let target = if target.starts_with('/') {
                    target.to_owned()
                } else {
                    format!("/{target}")
                };
                target
                    .parse::<http::uri::PathAndQuery>()
                    .map_err(|e| at(&format!("httpGet.path: {e}")))?;
                let mut headers = Vec::new();
                for hv in h
                    .get("httpHeaders")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                {
                    let name = hv.get("name").and_then(Value::as_str).unwrap_or_default();
                    let value = hv.get("value").and_then(Value::as_str).unwrap_or_default();
                    let name = HeaderName::from_bytes(name.as_bytes())
                        .map_err(|e| at(&format!("httpHeaders name {name:?}: {e}")))?;
                    let value = HeaderValue::from_str(value)
                        .map_err(|e| at(&format!("httpHeaders {name} value: {e}")))?;
                    headers.push((name, value));
                }
                Prober::Http {
                    port: port_of(h)?,
                    path: target,
                    headers,
                    timeout,
                }
            } else if let Some(t) = probe.get("tcpSocket") {
                Prober::Tcp {
                    port: port_of(t)?,
                    timeout,
                }
            } else {
                return Err(at("neither httpGet nor tcpSocket"));
            };
            out.insert(path.clone(), prober);
        }
        Ok(AppProbers(out))
    }

    /// How many probes there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn reply(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Answers one probe request.
pub async fn answer<B>(req: Request<B>, probers: &AppProbers) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "probes are GET");
    }
    let Some(prober) = probers.0.get(req.uri().path()) else {
        return reply(StatusCode::NOT_FOUND, "no such app probe");
    };
    match prober {
        Prober::Tcp { port, timeout } => {
            match tokio::time::timeout(*timeout, TcpStream::connect(("127.0.0.1", *port))).await {
                Ok(Ok(_)) => reply(StatusCode::OK, "app port open"),
                Ok(Err(e)) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("app port {port}: {e}"),
                ),
                Err(_) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("app port {port}: no connection within {timeout:?}"),
                ),
            }
        }
        Prober::Http {
            port,
            path,
            headers,
            timeout,
        } => {
            let user_agent = req.headers().get(header::USER_AGENT).cloned();
            match tokio::time::timeout(*timeout, http_probe(*port, path, headers, user_agent)).await
            {
                Ok(Ok(status)) => reply(status, &format!("app answered {}", status.as_u16())),
                Ok(Err(e)) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("app port {port}: {e}"),
                ),
                Err(_) => reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("app port {port}: no answer within {timeout:?}"),
                ),
            }
        }
    }
}

/// The original `httpGet`, against the app on loopback; its status code.
async fn http_probe(
    port: u16,
    path: &str,
    headers: &[(HeaderName, HeaderValue)],
    user_agent: Option<HeaderValue>,
) -> Result<StatusCode, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let h = req.headers_mut();
    h.insert(
        header::HOST,
        HeaderValue::from_str(&format!("127.0.0.1:{port}")).map_err(|e| e.to_string())?,
    );
    if let Some(ua) = user_agent {
        h.insert(header::USER_AGENT, ua);
    }
    for (name, value) in headers {
        h.insert(name.clone(), value.clone());
    }
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    // Read (at most a little of) the body so the app is not cut mid-answer, then drop it.
    let _ = tokio::time::timeout(Duration::from_millis(200), resp.into_body().collect()).await;
    conn.abort();
    Ok(status)
}

/// Serves the probe paths on `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, probers: Arc<AppProbers>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "app probe listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let probers = probers.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let probers = probers.clone();
                async move { Ok::<_, Infallible>(answer(req, &probers).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_injector_writes_and_refuses_the_rest() {
        let p = AppProbers::parse(
            r#"{
              "/app-health/web/readyz": {"httpGet": {"path": "/healthz?full=1", "port": 8080,
                 "scheme": "HTTP", "httpHeaders": [{"name": "X-Probe", "value": "yes"}]},
                 "timeoutSeconds": 3},
              "/app-health/web/livez": {"tcpSocket": {"port": 8080}}
            }"#,
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p.0["/app-health/web/readyz"],
            Prober::Http {
                port: 8080,
                path: "/healthz?full=1".into(),
                headers: vec![(
                    HeaderName::from_static("x-probe"),
                    HeaderValue::from_static("yes")
                )],
                timeout: Duration::from_secs(3),
            }
        );
        assert_eq!(
            p.0["/app-health/web/livez"],
            Prober::Tcp {
                port: 8080,
                timeout: DEFAULT_TIMEOUT
            }
        );
        for (bad, needle) in [
            (
                r#"{"/metrics": {"tcpSocket": {"port": 1}}}"#,
                "/app-health/",
            ),
            (
                r#"{"/app-health/a/livez": {"tcpSocket": {"port": 0}}}"#,
                "port",
            ),
            (
                r#"{"/app-health/a/livez": {"tcpSocket": {"port": "http"}}}"#,
                "port",
            ),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"port": 443, "scheme": "HTTPS"}}}"#,
                "HTTPS",
            ),
            (r#"{"/app-health/a/livez": {"exec": {}}}"#, "neither"),
            (r#"[1]"#, "object"),
        ] {
            let e = AppProbers::parse(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    fn get(path: &str) -> Request<Empty<Bytes>> {
        Request::builder().uri(path).body(Empty::new()).unwrap()
    }

    /// An app that accepts and never answers: the probe fails at its own timeout (504), not
    /// the kubelet's; a POST is refused; the twin, a port that answers, passes.
    #[tokio::test]
    async fn a_silent_app_times_out_at_the_probe_timeout() {
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let probers = AppProbers(BTreeMap::from([
            (
                "/app-health/a/readyz".to_owned(),
                Prober::Http {
                    port,
                    path: "/".into(),
                    headers: Vec::new(),
                    timeout: Duration::from_millis(200),
                },
            ),
            (
                "/app-health/a/livez".to_owned(),
                Prober::Tcp {
                    port,
                    timeout: Duration::from_millis(200),
                },
            ),
        ]));
        let started = std::time::Instant::now();
        let r = answer(get("/app-health/a/readyz"), &probers).await;
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(started.elapsed() < Duration::from_secs(5));
        // The port is open, so the TCP probe passes.
        let r = answer(get("/app-health/a/livez"), &probers).await;
        assert_eq!(r.status(), StatusCode::OK);
        let post = Request::builder()
            .method(Method::POST)
            .uri("/app-health/a/livez")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(
            answer(post, &probers).await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        hold.abort();
    }
}
