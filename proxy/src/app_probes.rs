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
/// Connections held at once. At the limit the oldest is closed for the new one, and no
/// connection outlives one request (no keep-alive) or a [`HEAD_TIMEOUT`] wait for it, so
/// peers opening connections cannot keep the kubelet's probes waiting.
const MAX_CONNECTIONS: usize = 512;
/// A probe request's head must arrive within this (the kubelet sends it at once).
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// The kubelet's default probe timeout, when the probe names none (or 0, before defaulting).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// How much of the app's answer is read (the kubelet reads 10 KiB); the rest is dropped.
const MAX_BODY_READ: usize = 10 * 1024;
/// Redirects followed on the app's own host, as the kubelet follows them.
const MAX_REDIRECTS: usize = 10;
/// The sidecar's own loopback ports a probe may not target: the kubelet could never reach
/// them before, and through the probe port it would (the proxy's admin and outbound
/// listeners, and the probe port itself).
pub const RESERVED_PORTS: [u16; 3] = [15000, 15001, 15020];

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

/// The probes the listener answers, by path, and the entries it could not read (their
/// paths answer 500 with the reason, so one bad entry fails its own probe, not the proxy).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppProbers(BTreeMap<String, Prober>, BTreeMap<String, String>);

impl AppProbers {
    /// Reads `ISTIO_KUBE_APP_PROBERS`'s JSON. Only JSON that is not an object of path ->
    /// probe is an error; an entry the injector would not write (a path outside
    /// `/app-health/`, a port that is not a number in 1-65535 or is one of the sidecar's
    /// [`RESERVED_PORTS`], an HTTPS probe, neither `httpGet` nor `tcpSocket`, a path that is
    /// not a valid request target) is kept aside with the reason, see [`AppProbers::broken`].
    pub fn parse(json: &str) -> Result<AppProbers, String> {
        let v: Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
        let map = v.as_object().ok_or("expected an object of path -> probe")?;
        let mut out = AppProbers::default();
        for (path, probe) in map {
            match Self::entry(path, probe) {
                Ok(p) => {
                    out.0.insert(path.clone(), p);
                }
                Err(why) => {
                    out.1.insert(path.clone(), why);
                }
            }
        }
        Ok(out)
    }

    fn entry(path: &str, probe: &Value) -> Result<Prober, String> {
        if !path.starts_with(APP_HEALTH_PREFIX) || path.contains(['?', '#']) {
            return Err("the path must start with /app-health/ and have no query".into());
        }
        let timeout = match probe.get("timeoutSeconds").and_then(Value::as_u64) {
            None | Some(0) => DEFAULT_TIMEOUT,
            Some(secs) => Duration::from_secs(secs),
        };
        let port_of = |handler: &Value| {
            let port = handler
                .get("port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
                .ok_or("port must be a number in 1-65535")?;
            if RESERVED_PORTS.contains(&port) {
                return Err(format!("port {port} is the sidecar's own"));
            }
            Ok(port)
        };
        if let Some(h) = probe.get("httpGet") {
            let scheme = h.get("scheme").and_then(Value::as_str).unwrap_or("HTTP");
            if !scheme.eq_ignore_ascii_case("HTTP") {
                return Err(format!(
                    "httpGet.scheme {scheme}: only HTTP probes are passed through"
                ));
            }
            let target = h.get("path").and_then(Value::as_str).unwrap_or("/");
            let target = if target.starts_with('/') {
                target.to_owned()
            } else {
                format!("/{target}")
            };
            target
                .parse::<http::uri::PathAndQuery>()
                .map_err(|e| format!("httpGet.path: {e}"))?;
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
                    .map_err(|e| format!("httpHeaders name {name:?}: {e}"))?;
                let value = HeaderValue::from_str(value)
                    .map_err(|e| format!("httpHeaders {name} value: {e}"))?;
                headers.push((name, value));
            }
            Ok(Prober::Http {
                port: port_of(h)?,
                path: target,
                headers,
                timeout,
            })
        } else if let Some(t) = probe.get("tcpSocket") {
            Ok(Prober::Tcp {
                port: port_of(t)?,
                timeout,
            })
        } else {
            Err("neither httpGet nor tcpSocket".into())
        }
    }

    /// The entries that could not be read, with the reason.
    pub fn broken(&self) -> &BTreeMap<String, String> {
        &self.1
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
        if let Some(why) = probers.1.get(req.uri().path()) {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("this probe is misconfigured: {why}"),
            );
        }
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
            // The kubelet's Host is the Pod IP and the probe port: the app sees the Pod IP
            // with its own port, as it did before (not 127.0.0.1).
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
                .map(|a| a.host().to_owned());
            let probe = Probe {
                port: *port,
                headers,
                user_agent,
                host,
            };
            match tokio::time::timeout(*timeout, probe.run(path)).await {
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

/// One `httpGet` as the kubelet would make it, against the app on loopback.
struct Probe<'a> {
    port: u16,
    headers: &'a [(HeaderName, HeaderValue)],
    user_agent: Option<HeaderValue>,
    /// The host the kubelet asked for (the Pod IP), for the app's `Host` header.
    host: Option<String>,
}

impl Probe<'_> {
    /// The probe's status, following redirects on the app's own host (a relative
    /// `Location`, or one naming this host, localhost or 127.0.0.1) up to [`MAX_REDIRECTS`]
    /// times as the kubelet does; a redirect elsewhere, or one not followed, counts as
    /// success (200), as with the kubelet (and Istio).
    async fn run(&self, path: &str) -> Result<StatusCode, String> {
        let mut port = self.port;
        let mut target = path.to_owned();
        for _ in 0..=MAX_REDIRECTS {
            let (status, location) = self.once(port, &target).await?;
            if !status.is_redirection() {
                return Ok(status);
            }
            let Some(next) = location.and_then(|l| self.follow(port, &l)) else {
                return Ok(StatusCode::OK);
            };
            (port, target) = next;
        }
        Ok(StatusCode::OK)
    }

    /// Where a `Location` leads, if it stays on the app: (port, path and query).
    fn follow(&self, port: u16, location: &str) -> Option<(u16, String)> {
        if location.starts_with('/') && !location.starts_with("//") {
            return Some((port, location.to_owned()));
        }
        let uri: http::Uri = location.parse().ok()?;
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        let ours = ["127.0.0.1", "localhost", "::1"].contains(&host)
            || self
                .host
                .as_deref()
                .is_some_and(|h| h.trim_start_matches('[').trim_end_matches(']') == host);
        if !ours {
            return None;
        }
        let port = uri.port_u16().unwrap_or(80);
        if RESERVED_PORTS.contains(&port) {
            return None;
        }
        let target = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Some((port, target))
    }

    /// One GET: its status and `Location`. At most [`MAX_BODY_READ`] of the body is read.
    async fn once(&self, port: u16, target: &str) -> Result<(StatusCode, Option<String>), String> {
        let (mut sender, conn) = app_connection(port).await?;
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(target)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let h = req.headers_mut();
        let host = match &self.host {
            Some(ip) if ip.contains(':') => format!("[{ip}]:{port}"),
            Some(ip) => format!("{ip}:{port}"),
            None => format!("127.0.0.1:{port}"),
        };
        h.insert(
            header::HOST,
            HeaderValue::from_str(&host).map_err(|e| e.to_string())?,
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        if let Some(ua) = &self.user_agent {
            h.insert(header::USER_AGENT, ua.clone());
        }
        // The probe's own headers replace the defaults; repeated names are all sent.
        for (name, _) in self.headers {
            h.remove(name);
        }
        for (name, value) in self.headers {
            h.append(name.clone(), value.clone());
        }
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(str::to_owned);
        // Read a little of the body (so the app is not cut mid-answer), then drop it all.
        let mut body = resp.into_body();
        let mut read = 0;
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while read < MAX_BODY_READ {
                match body.frame().await {
                    Some(Ok(f)) => read += f.data_ref().map_or(0, Bytes::len),
                    _ => break,
                }
            }
        })
        .await;
        conn.abort();
        Ok((status, location))
    }
}

/// A fresh HTTP/1.1 connection to the app on 127.0.0.1:`port`: its sender, and its driver
/// task (aborted by the caller when done).
async fn app_connection(
    port: u16,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    ),
    String,
> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    Ok((sender, tokio::spawn(conn)))
}

/// The proxy's metrics in Prometheus' text format, as the status listener serves them.
type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// The environment variable with the app's own scrape settings (Istio's name and format:
/// `{"scrape": "true", "port": "9090", "path": "/metrics"}`), which the injector moves here
/// from the Pod's `prometheus.io/*` annotations.
pub const APP_METRICS_ENV: &str = "ISTIO_PROMETHEUS_ANNOTATIONS";

/// The most of the app's metrics read per scrape.
const MAX_APP_METRICS: usize = 32 << 20;
/// The longest wait for the app's metrics: one scrape of the app serves every scraper for
/// [`RENDER_REUSE`], so no scraper's own timeout decides it (Prometheus' default scrape
/// timeout is 10 s).
const APP_METRICS_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a scraper waits for a rendering under way (then the last page is served).
const MAX_SCRAPE_WAIT: Duration = Duration::from_secs(10);

/// The app's own metrics endpoint on 127.0.0.1, merged into the status listener's
/// `/stats/prometheus` (Istio's metrics merging): under STRICT, Prometheus cannot scrape the
/// app's port in plaintext, so the proxy does it for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppMetrics {
    /// The app's port.
    pub port: u16,
    /// Its metrics path (`/metrics` when the annotations name none).
    pub path: String,
}

impl AppMetrics {
    /// Read [`APP_METRICS_ENV`]: `None` when it says not to scrape; refused when the port is
    /// not a port the app may use (none named: 80, as istio-agent), or the path is not an
    /// origin-form target.
    pub fn parse(json: &str) -> Result<Option<AppMetrics>, String> {
        let v: serde_json::Map<String, Value> =
            serde_json::from_str(json).map_err(|e| format!("not a JSON object: {e}"))?;
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::trim);
        if text("scrape").and_then(rampart_authz::parse_go_bool) == Some(false) {
            return Ok(None);
        }
        // No port: 80, as istio-agent (and Prometheus, for an address without one).
        let port = text("port")
            .filter(|p| !p.is_empty())
            .unwrap_or("80")
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0 && !RESERVED_PORTS.contains(p))
            .ok_or("\"port\" is not a port the app may use")?;
        let path = text("path").filter(|p| !p.is_empty()).unwrap_or("/metrics");
        if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(format!("\"path\" {path:?} is not a request path"));
        }
        Ok(Some(AppMetrics {
            port,
            path: path.to_owned(),
        }))
    }

    /// One scrape of the app: its text (OpenMetrics' `# EOF` removed), or why not.
    async fn scrape(&self, timeout: Duration) -> Result<String, String> {
        let fetch = async {
            let (mut sender, conn) = app_connection(self.port).await?;
            let req = Request::builder()
                .method(Method::GET)
                .uri(self.path.as_str())
                .header(header::HOST, format!("127.0.0.1:{}", self.port))
                .header(header::ACCEPT, "text/plain;version=0.0.4;q=1,*/*;q=0.1")
                .header(header::CONNECTION, "close")
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            if resp.status() != StatusCode::OK {
                conn.abort();
                return Err(format!("status {}", resp.status().as_u16()));
            }
            // Only Prometheus' text format (0.0.4) goes on a page served as that: OpenMetrics'
            // own syntax (exemplars, `info`, `stateset` types) would make Prometheus reject
            // the whole page, the proxy's metrics with it.
            let ctype = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("text/plain")
                .to_ascii_lowercase();
            let media = ctype
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned();
            let version = ctype
                .split(';')
                .skip(1)
                .filter_map(|p| p.trim().strip_prefix("version="))
                .next()
                .map(str::to_owned);
            if media != "text/plain" || version.as_deref().is_some_and(|v| v != "0.0.4") {
                conn.abort();
                return Err(format!(
                    "the app answered {ctype:?}, not Prometheus' text format (version 0.0.4)"
                ));
            }
            let body = http_body_util::Limited::new(resp.into_body(), MAX_APP_METRICS)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            conn.abort();
            String::from_utf8(body.to_vec()).map_err(|_| "not UTF-8 text".to_owned())
        };
        let mut text = tokio::time::timeout(timeout, fetch)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))??;
        if let Some(cut) = text.trim_end().strip_suffix("# EOF") {
            text = cut.to_owned();
        }
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        Ok(text)
    }
}

/// Where the status listener finds the proxy's metrics. The listener answers the kubelet's
/// probes from the process's start, before the proxy has its configuration (which may come
/// from a control plane); until the proxy has started and filled this in, its
/// `/stats/prometheus` answers 503.
///
/// Anyone who reaches the Pod IP can ask for the metrics, and rendering them takes the
/// locks every request takes (and scraping the app costs it too): a rendering is reused for
/// [`RENDER_REUSE`], and renderings happen one at a time, so a flood of scrapes costs at
/// most one rendering (and one scrape of the app) a second.
#[derive(Clone, Default)]
pub struct MetricsSource(Arc<Sources>);

#[derive(Default)]
struct Sources {
    render: std::sync::Mutex<Option<MetricsText>>,
    /// The app's endpoint to merge, or why the settings given were refused.
    app: Option<Result<AppMetrics, String>>,
    last: tokio::sync::Mutex<Option<(std::time::Instant, Bytes)>>,
    /// The last page made, for a scraper that cannot wait for the next.
    page: std::sync::Mutex<Option<Bytes>>,
}

/// How long one rendering of the metrics serves later scrapes (Prometheus scrapes every
/// 15 s or more).
const RENDER_REUSE: Duration = Duration::from_secs(1);

impl MetricsSource {
    /// A source that also merges the app's own metrics from `app` (`Err`: the settings
    /// were refused, and the page says why).
    pub fn with_app(app: Option<Result<AppMetrics, String>>) -> MetricsSource {
        MetricsSource(Arc::new(Sources {
            app,
            ..Sources::default()
        }))
    }

    /// Serve `text` from now on.
    pub(crate) fn set(&self, text: MetricsText) {
        *self.0.render.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
    }

    /// The metrics, the app's first (when merged), then the proxy's; `timeout` bounds the
    /// wait for the app. `None` before the proxy has started.
    async fn text(&self, timeout: Duration) -> Option<Bytes> {
        let Ok(mut last) = tokio::time::timeout(timeout, self.0.last.lock()).await else {
            // Another scraper's rendering is under way (the app is slow): the last page.
            return self
                .0
                .page
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
        };
        if let Some((at, text)) = last.as_ref()
            && at.elapsed() < RENDER_REUSE
        {
            return Some(text.clone());
        }
        let render = self
            .0
            .render
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let mut out = String::new();
        match &self.0.app {
            None => {}
            Some(Err(e)) => out.push_str(&format!(
                "# rampart: the app's metrics were not merged: its settings were refused: {}\n",
                e.replace('\n', " ")
            )),
            Some(Ok(app)) => match app.scrape(APP_METRICS_TIMEOUT).await {
                Ok(t) => out.push_str(&t),
                Err(e) => {
                    tracing::debug!(port = app.port, path = %app.path, error = %e, "app metrics not merged");
                    // A comment: Prometheus skips it, a person reading the page sees why.
                    out.push_str(&format!(
                        "# rampart: the app's metrics (127.0.0.1:{}{}) were not merged: {}\n",
                        app.port,
                        app.path,
                        e.replace('\n', " ")
                    ));
                }
            },
        }
        out.push_str(&render());
        let text = Bytes::from(out);
        *last = Some((std::time::Instant::now(), text.clone()));
        *self.0.page.lock().unwrap_or_else(|p| p.into_inner()) = Some(text.clone());
        Some(text)
    }
}

impl std::fmt::Debug for MetricsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsSource")
            .field("ready", &self.0.render.lock().is_ok_and(|g| g.is_some()))
            .field("app", &self.0.app)
            .finish()
    }
}

/// Where Prometheus scrapes the status listener (Istio's path on its port 15020).
pub const METRICS_PATH: &str = "/stats/prometheus";

/// One request to the status listener: the proxy's metrics at [`METRICS_PATH`], else a
/// probe ([`answer`]).
async fn status_answer<B>(
    req: Request<B>,
    probers: &AppProbers,
    metrics: &MetricsSource,
) -> Response<Full<Bytes>> {
    if req.uri().path() != METRICS_PATH {
        return answer(req, probers).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "metrics are GET");
    }
    // Prometheus says how long it waits; a scraper waits at most that (and 10 s) for a
    // rendering under way, then gets the last page. It does not shorten the app's scrape,
    // which serves every scraper.
    let timeout = req
        .headers()
        .get("x-prometheus-scrape-timeout-seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|t| t.is_finite() && *t > 0.0)
        .map_or(MAX_SCRAPE_WAIT, |t| {
            Duration::from_secs_f64((t * 0.9).min(MAX_SCRAPE_WAIT.as_secs_f64()))
        });
    let Some(text) = metrics.text(timeout).await else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "the proxy has not started yet (no configuration)",
        );
    };
    let mut r = Response::new(Full::new(text));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::admin::PROMETHEUS_TEXT),
    );
    r
}

/// Serves the status listener on `listener` until the future is dropped: the probe paths
/// and the proxy's metrics, one request per connection, within the limits above.
pub async fn serve(listener: TcpListener, probers: Arc<AppProbers>, metrics: MetricsSource) {
    #[derive(Default)]
    struct Live {
        next: u64,
        open: BTreeMap<u64, tokio::task::AbortHandle>,
    }
    let live = Arc::new(std::sync::Mutex::new(Live::default()));
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "app probe listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (probers, metrics, registry) = (probers.clone(), metrics.clone(), live.clone());
        // Spawned and registered under the lock, so the task always finds itself to remove.
        let mut l = live.lock().unwrap_or_else(|p| p.into_inner());
        if l.open.len() >= MAX_CONNECTIONS
            && let Some((_, oldest)) = l.open.pop_first()
        {
            oldest.abort();
        }
        let id = l.next;
        l.next += 1;
        let task = tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (probers, metrics) = (probers.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(status_answer(req, &probers, &metrics).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            registry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .open
                .remove(&id);
        });
        l.open.insert(id, task.abort_handle());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The app's own metrics come first on the page; when the app cannot be scraped the
    /// proxy's are still served, after a comment that says why. The settings the injector
    /// writes are read, and wrong ones refused.
    #[tokio::test]
    async fn app_metrics_are_merged_or_their_absence_explained() {
        assert_eq!(
            AppMetrics::parse(r#"{"scrape": "true", "port": "9090"}"#),
            Ok(Some(AppMetrics {
                port: 9090,
                path: "/metrics".into()
            }))
        );
        assert_eq!(
            AppMetrics::parse(r#"{"scrape": "F", "port": "9090"}"#),
            Ok(None)
        );
        assert_eq!(
            AppMetrics::parse(r#"{"scrape": "true", "port": ""}"#),
            Ok(Some(AppMetrics {
                port: 80,
                path: "/metrics".into()
            }))
        );
        for bad in [
            r#"{"port": "15000"}"#,
            r#"{"port": "0"}"#,
            r#"{"port": "http"}"#,
            r#"{"port": "80", "path": "metrics"}"#,
            "[]",
        ] {
            assert!(AppMetrics::parse(bad).is_err(), "{bad}");
        }
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let open = req.uri().path() == "/open";
                        let body = match req.uri().path() {
                            "/metrics" => "app_up 1",
                            "/open" => "# TYPE x info\nx_info{a=\"b\"} 1\n# EOF\n",
                            _ => "",
                        };
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        if open {
                            r.headers_mut().insert(
                                header::CONTENT_TYPE,
                                HeaderValue::from_static(
                                    "application/openmetrics-text; version=1.0.0",
                                ),
                            );
                        }
                        Ok::<_, Infallible>(r)
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        let proxy: MetricsText = Arc::new(|| "istio_requests_total 3\n".to_owned());
        let src = MetricsSource::with_app(Some(Ok(AppMetrics {
            port,
            path: "/metrics".into(),
        })));
        src.set(proxy.clone());
        // A scraper with a tiny timeout does not shorten the app's scrape for the others.
        let page = src.text(Duration::from_micros(1)).await;
        assert!(
            page.as_ref().is_none_or(|p| p.starts_with(b"app_up 1\n")),
            "{page:?}"
        );
        let page = src.text(Duration::from_secs(2)).await.unwrap();
        assert_eq!(&page[..], b"app_up 1\nistio_requests_total 3\n");
        // OpenMetrics is not merged into a text/plain 0.0.4 page: a comment says why.
        let src = MetricsSource::with_app(Some(Ok(AppMetrics {
            port,
            path: "/open".into(),
        })));
        src.set(proxy.clone());
        let page =
            String::from_utf8(src.text(Duration::from_secs(2)).await.unwrap().to_vec()).unwrap();
        assert!(
            page.starts_with("# rampart: the app's metrics (127.0.0.1:")
                && page.contains("not Prometheus' text format")
                && !page.contains("x_info")
                && page.ends_with("\nistio_requests_total 3\n"),
            "{page}"
        );
        // Refused settings are said on the page too.
        let src = MetricsSource::with_app(Some(Err("no \"port\"".into())));
        src.set(proxy.clone());
        let page =
            String::from_utf8(src.text(Duration::from_secs(2)).await.unwrap().to_vec()).unwrap();
        assert!(page.starts_with("# rampart: the app's metrics were not merged: its settings were refused: no \"port\"\n"), "{page}");
        // Its twin: the app is not there.
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = gone.local_addr().unwrap().port();
        drop(gone);
        let src = MetricsSource::with_app(Some(Ok(AppMetrics {
            port: closed,
            path: "/metrics".into(),
        })));
        src.set(proxy);
        let page =
            String::from_utf8(src.text(Duration::from_secs(2)).await.unwrap().to_vec()).unwrap();
        assert!(
            page.starts_with(&format!(
                "# rampart: the app's metrics (127.0.0.1:{closed}/metrics) were not merged: "
            )) && page.ends_with("\nistio_requests_total 3\n"),
            "{page}"
        );
    }

    /// A flood of scrapes renders the metrics once a second, not once per scrape; before the
    /// proxy has started there is nothing to render (503).
    #[tokio::test]
    async fn scrapes_share_one_rendering_a_second() {
        let src = MetricsSource::default();
        let probers = AppProbers::default();
        let r = status_answer(get(METRICS_PATH), &probers, &src).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let renders = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = renders.clone();
        src.set(Arc::new(move || {
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            "istio_requests_total 1\n".to_owned()
        }));
        for _ in 0..200 {
            let r = status_answer(get(METRICS_PATH), &probers, &src).await;
            assert_eq!(r.status(), StatusCode::OK);
        }
        assert_eq!(renders.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Its twin: a later scrape sees fresh numbers.
        tokio::time::sleep(RENDER_REUSE + Duration::from_millis(50)).await;
        let r = status_answer(get(METRICS_PATH), &probers, &src).await;
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"istio_requests_total 1\n");
        assert_eq!(renders.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

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
                r#"{"/app-health/a/livez": {"tcpSocket": {"port": 15000}}}"#,
                "sidecar's own",
            ),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"port": 443, "scheme": "HTTPS"}}}"#,
                "HTTPS",
            ),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"port": 80, "path": "/a b"}}}"#,
                "path",
            ),
            (r#"{"/app-health/a/livez": {"exec": {}}}"#, "neither"),
        ] {
            // One bad entry is kept aside (its path will answer 500), never fatal.
            let p = AppProbers::parse(bad).unwrap();
            assert!(p.is_empty(), "{bad}");
            let why = p.broken().values().next().unwrap();
            assert!(why.contains(needle), "{bad}: {why}");
        }
        assert!(AppProbers::parse("[1]").unwrap_err().contains("object"));
        assert!(AppProbers::parse("{").is_err());
        // timeoutSeconds 0 (a raw manifest, before the API server's defaulting) is the
        // kubelet's default, not a refusal.
        let p = AppProbers::parse(
            r#"{"/app-health/a/livez": {"tcpSocket": {"port": 80}, "timeoutSeconds": 0}}"#,
        )
        .unwrap();
        assert_eq!(
            p.0["/app-health/a/livez"],
            Prober::Tcp {
                port: 80,
                timeout: DEFAULT_TIMEOUT
            }
        );
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
        let probers = AppProbers(
            BTreeMap::from([
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
            ]),
            BTreeMap::new(),
        );
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

    /// A tiny app on loopback: `answers(path)` -> (status, Location); records each request.
    async fn app(
        answers: fn(&str) -> (u16, Option<String>),
    ) -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                log.lock().unwrap().push(head);
                let (status, location) = answers(&path);
                let loc = location
                    .map(|l| format!("location: {l}\r\n"))
                    .unwrap_or_default();
                // A large body: the probe reads only a little of it.
                let body = vec![b'x'; 1 << 20];
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status} X\r\n{loc}content-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                let _ = s.write_all(&body).await;
            }
        });
        (port, seen)
    }

    fn http(port: u16, path: &str) -> AppProbers {
        AppProbers(
            BTreeMap::from([(
                "/app-health/a/readyz".to_owned(),
                Prober::Http {
                    port,
                    path: path.into(),
                    headers: vec![(
                        HeaderName::from_static("host"),
                        HeaderValue::from_static("web.local"),
                    )],
                    timeout: Duration::from_secs(2),
                },
            )]),
            BTreeMap::new(),
        )
    }

    /// Redirects on the app are followed as the kubelet follows them, so the final answer
    /// decides (a redirect to a failing page fails); one leading elsewhere is success.
    #[tokio::test]
    async fn redirects_are_followed_on_the_app_and_the_final_answer_counts() {
        let (port, seen) = app(|path| match path {
            "/healthz" => (301, Some("/healthz/".into())),
            "/healthz/" => (503, None),
            "/away" => (302, Some("http://example.com/".into())),
            _ => (200, None),
        })
        .await;
        let req = |path: &str| {
            Request::builder()
                .uri(path)
                .header(header::HOST, "10.1.2.3:15020")
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        let r = answer(req("/app-health/a/readyz"), &http(port, "/healthz")).await;
        assert_eq!(
            r.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "301 -> 503 fails"
        );
        let r = answer(req("/app-health/a/readyz"), &http(port, "/away")).await;
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "a redirect elsewhere is success"
        );
        let r = answer(req("/app-health/a/readyz"), &http(port, "/other")).await;
        assert_eq!(r.status(), StatusCode::OK, "no redirect: the app's own 200");
        let heads = seen.lock().unwrap().clone();
        assert!(
            heads.iter().any(|h| h.starts_with("GET /healthz/ ")),
            "{heads:?}"
        );
        // The probe's Host header replaced the default; Accept is sent.
        assert!(
            heads
                .iter()
                .all(|h| h.to_lowercase().contains("host: web.local")
                    && h.to_lowercase().contains("accept: */*")),
            "{heads:?}"
        );
    }

    /// Without a Host of its own, the app sees the Pod IP (the kubelet's Host) with its own
    /// port, as before the rewriting.
    #[tokio::test]
    async fn the_app_sees_the_pod_ip_as_host() {
        let (port, seen) = app(|_| (200, None)).await;
        let probers = AppProbers(
            BTreeMap::from([(
                "/app-health/a/readyz".to_owned(),
                Prober::Http {
                    port,
                    path: "/".into(),
                    headers: Vec::new(),
                    timeout: Duration::from_secs(2),
                },
            )]),
            BTreeMap::new(),
        );
        let req = Request::builder()
            .uri("/app-health/a/readyz")
            .header(header::HOST, "10.1.2.3:15020")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(answer(req, &probers).await.status(), StatusCode::OK);
        let head = seen.lock().unwrap()[0].to_lowercase();
        assert!(head.contains(&format!("host: 10.1.2.3:{port}")), "{head}");
    }

    #[tokio::test]
    async fn a_broken_entry_answers_500_with_its_reason() {
        let p = AppProbers::parse(
            r#"{"/app-health/a/livez": {"tcpSocket": {"port": 15001}},
                "/app-health/a/readyz": {"tcpSocket": {"port": 1}}}"#,
        )
        .unwrap();
        let r = answer(get("/app-health/a/livez"), &p).await;
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("sidecar's own"));
        assert_eq!(p.len(), 1, "the good entry is served");
    }
}
