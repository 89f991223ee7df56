//! Istio's standard metrics (names and labels as Istio's telemetry writes them) and the
//! per-port mTLS/plaintext accounting behind `/mtls`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Response};
use hyper::body::{Body, Frame, SizeHint};

/// Istio's duration buckets (milliseconds).
const BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// The recent window of `/mtls` (seconds) and its slot width.
pub(crate) const WINDOW_SECS: u64 = 300;
const SLOT_SECS: u64 = 10;
const SLOTS: usize = (WINDOW_SECS / SLOT_SECS) as usize;

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The connection-level labels of a metric series, rendered once per connection.
#[derive(Debug, Clone)]
pub(crate) struct Labels {
    pub(crate) reporter: &'static str,
    pub(crate) source_principal: String,
    pub(crate) source_workload: String,
    pub(crate) source_namespace: String,
    pub(crate) destination_principal: String,
    pub(crate) destination_workload: String,
    pub(crate) destination_namespace: String,
    pub(crate) destination_service: String,
    pub(crate) mtls: bool,
}

impl Labels {
    /// Render as `k="v",...` (without request-level labels).
    pub(crate) fn render(&self, protocol: &str) -> Arc<str> {
        let mut s = String::with_capacity(400);
        let _ = write!(
            s,
            "reporter=\"{}\",source_principal=\"{}\",source_workload=\"{}\",source_workload_namespace=\"{}\",destination_principal=\"{}\",destination_workload=\"{}\",destination_workload_namespace=\"{}\",destination_service=\"{}\",request_protocol=\"{}\",connection_security_policy=\"{}\"",
            self.reporter,
            esc(or_unknown(&self.source_principal)),
            esc(or_unknown(&self.source_workload)),
            esc(or_unknown(&self.source_namespace)),
            esc(or_unknown(&self.destination_principal)),
            esc(or_unknown(&self.destination_workload)),
            esc(or_unknown(&self.destination_namespace)),
            esc(or_unknown(&self.destination_service)),
            protocol,
            if self.mtls { "mutual_tls" } else { "none" },
        );
        s.into()
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "unknown" } else { s }
}

/// Request-level labels below one connection-level label set.
type ReqKey = (u16, Option<u16>, &'static str);

/// The request series of one connection-level label set; connections hold it, so a request
/// costs one small map update.
pub(crate) struct Series {
    base: Arc<str>,
    stats: Mutex<HashMap<ReqKey, ReqStats>>,
}

impl Series {
    /// The series' labels (shared: every connection counted here holds the same text).
    pub(crate) fn base(&self) -> Arc<str> {
        self.base.clone()
    }

    /// Count one request.
    pub(crate) fn request(
        &self,
        code: u16,
        grpc: Option<u16>,
        flags: &'static str,
        took: Duration,
    ) {
        let ms = took.as_secs_f64() * 1000.0;
        let mut m = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let s = m.entry((code, grpc, flags)).or_default();
        s.count += 1;
        s.sum_ms += ms;
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            if ms <= *b {
                s.buckets[i] += 1;
            }
        }
    }
}

/// Highest status code gRPC defines (`UNAUTHENTICATED`).
const GRPC_MAX_KNOWN: u16 = 16;
/// gRPC's `UNKNOWN`.
const GRPC_UNKNOWN: u16 = 2;

/// The gRPC status of `headers` (`grpc-status`), if any. A value gRPC does not define is
/// `UNKNOWN` (2), as gRPC clients read it: the peer chooses this label's value, so it must
/// not be able to mint a new metric series per request.
pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    let v = headers.get("grpc-status")?;
    Some(
        std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|v| v.parse::<u16>().ok())
            .filter(|c| *c <= GRPC_MAX_KNOWN)
            .unwrap_or(GRPC_UNKNOWN),
    )
}

/// The gRPC status a response without `grpc-status` stands for (gRPC's HTTP-to-gRPC status
/// mapping, as Envoy's `httpToGrpcStatus`).
pub(crate) fn http_to_grpc(code: u16) -> u16 {
    match code {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// One request whose response is still streaming: recorded in its series when the response
/// ends, as Istio does (`istio_request_duration_milliseconds` runs to the last byte of the
/// response, Envoy's `requestComplete`; `grpc_response_status` is Envoy's `getGrpcStatus`:
/// the trailers' `grpc-status`, else the headers' (trailers-only responses), else mapped from
/// the HTTP status).
pub(crate) struct Pending {
    series: Arc<Series>,
    start: Instant,
    code: u16,
    grpc: bool,
    header_status: Option<u16>,
    flags: &'static str,
}

impl Pending {
    /// A request of `series` started at `start` that got `resp` (`grpc`: a gRPC request).
    pub(crate) fn new<B>(
        series: Arc<Series>,
        start: Instant,
        grpc: bool,
        resp: &Response<B>,
        flags: &'static str,
    ) -> Pending {
        Pending {
            series,
            start,
            code: resp.status().as_u16(),
            grpc,
            header_status: if grpc {
                grpc_status(resp.headers())
            } else {
                None
            },
            flags,
        }
    }

    /// Record: `trailers` if the response had some; `flags` overrides the response flags.
    pub(crate) fn finish(self, trailers: Option<&HeaderMap>, flags: Option<&'static str>) {
        let g = self.grpc.then(|| {
            trailers
                .and_then(grpc_status)
                .or(self.header_status)
                .unwrap_or_else(|| http_to_grpc(self.code))
        });
        self.series.request(
            self.code,
            g,
            flags.unwrap_or(self.flags),
            self.start.elapsed(),
        );
    }
}

/// A response body streamed through that records its [`Pending`] request when it ends: at
/// the trailers, at the end of the stream, on an error (flags `UR`), or when dropped before
/// the end (the client went away: flags `DC`).
pub(crate) struct Metered<B: Body<Data = Bytes> + Unpin> {
    inner: B,
    pending: Option<Pending>,
}

impl<B: Body<Data = Bytes> + Unpin> Metered<B> {
    pub(crate) fn new(inner: B, pending: Pending) -> Metered<B> {
        Metered {
            inner,
            pending: Some(pending),
        }
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(t) = f.trailers_ref()
                    && let Some(p) = me.pending.take()
                {
                    p.finish(Some(t), None);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = me.pending.take() {
                    p.finish(None, Some("UR"));
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = me.pending.take() {
                    p.finish(None, None);
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body<Data = Bytes> + Unpin> Drop for Metered<B> {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            // An empty body hyper never polled ended normally.
            let flags = if self.inner.is_end_stream() {
                None
            } else {
                Some("DC")
            };
            p.finish(None, flags);
        }
    }
}

#[derive(Default)]
struct ReqStats {
    count: u64,
    buckets: [u64; BUCKETS_MS.len()],
    sum_ms: f64,
}

#[derive(Default)]
struct TcpStats {
    opened: u64,
    closed: u64,
    sent: u64,
    received: u64,
}

/// All metrics of one proxy.
#[derive(Default)]
pub(crate) struct Metrics {
    series: Mutex<HashMap<Arc<str>, Arc<Series>>>,
    tcp: Mutex<HashMap<Arc<str>, TcpStats>>,
}

impl Metrics {
    /// The series for a connection-level label set (created on first use).
    pub(crate) fn series(&self, base: Arc<str>) -> Arc<Series> {
        let mut m = self.series.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(base.clone())
            .or_insert_with(|| {
                Arc::new(Series {
                    base,
                    stats: Mutex::new(HashMap::new()),
                })
            })
            .clone()
    }

    pub(crate) fn tcp_opened(&self, base: &Arc<str>) {
        let mut m = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(base.clone()).or_default().opened += 1;
    }

    pub(crate) fn tcp_closed(&self, base: &Arc<str>, sent: u64, received: u64) {
        let mut m = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        let s = m.entry(base.clone()).or_default();
        s.closed += 1;
        s.sent += sent;
        s.received += received;
    }

    /// Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        {
            let all: Vec<Arc<Series>> = self
                .series
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            let mut rows = Vec::new();
            for se in &all {
                let m = se.stats.lock().unwrap_or_else(|e| e.into_inner());
                for ((code, grpc, flags), st) in m.iter() {
                    let l = format!(
                        "{},response_code=\"{}\",grpc_response_status=\"{}\",response_flags=\"{}\"",
                        se.base,
                        code,
                        grpc.map(|g| g.to_string()).unwrap_or_default(),
                        flags
                    );
                    rows.push((l, st.count, st.buckets, st.sum_ms));
                }
            }
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            out.push_str("# TYPE istio_requests_total counter\n");
            for (l, count, _, _) in &rows {
                let _ = writeln!(out, "istio_requests_total{{{l}}} {count}");
            }
            out.push_str("# TYPE istio_request_duration_milliseconds histogram\n");
            for (l, count, buckets, sum) in &rows {
                for (i, b) in BUCKETS_MS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "istio_request_duration_milliseconds_bucket{{{l},le=\"{b}\"}} {}",
                        buckets[i]
                    );
                }
                let _ = writeln!(
                    out,
                    "istio_request_duration_milliseconds_bucket{{{l},le=\"+Inf\"}} {count}"
                );
                let _ = writeln!(out, "istio_request_duration_milliseconds_sum{{{l}}} {sum}");
                let _ = writeln!(
                    out,
                    "istio_request_duration_milliseconds_count{{{l}}} {count}"
                );
            }
        }
        let m = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        for (name, f) in [
            ("istio_tcp_connections_opened_total", 0),
            ("istio_tcp_connections_closed_total", 1),
            ("istio_tcp_sent_bytes_total", 2),
            ("istio_tcp_received_bytes_total", 3),
        ] {
            let _ = writeln!(out, "# TYPE {name} counter");
            for (k, s) in m.iter() {
                let v = [s.opened, s.closed, s.sent, s.received][f];
                let _ = writeln!(out, "{name}{{{k},response_flags=\"-\"}} {v}");
            }
        }
        out
    }
}

// === /mtls accounting ===

fn now_unix() -> u64 {
    rampart_certs::timestamp::unix_secs_u64(SystemTime::now())
}

#[derive(Default, Clone, Copy)]
struct Slot {
    epoch: u64,
    counts: [u64; KINDS],
}

/// Which counter of a port to bump.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    MtlsConnection = 0,
    PlaintextConnection = 1,
    MtlsRequest = 2,
    PlaintextRequest = 3,
    /// A plaintext connection (at accept) or request (on a connection the port turned
    /// STRICT under) refused by STRICT: counted apart from the plaintext served, and its
    /// source remembered as a connection or request.
    PlaintextRefused = 4,
}

/// How many kinds of counter a port has.
const KINDS: usize = 5;

#[derive(Default, Clone, Copy, serde::Serialize)]
struct Source {
    connections: u64,
    requests: u64,
    refused: u64,
    last_seen_unix: u64,
}

/// The plaintext/mTLS counters of every workload port (made on first use and kept for the
/// proxy's life, so counters survive edits and re-adds of a port).
#[derive(Default)]
pub(crate) struct PortTable(std::sync::Mutex<std::collections::BTreeMap<u16, Arc<PortStats>>>);

impl PortTable {
    /// The counters of `port`.
    pub(crate) fn get(&self, port: u16) -> Arc<PortStats> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(port)
            .or_insert_with(|| Arc::new(PortStats::new(port)))
            .clone()
    }
}

/// Plaintext vs mTLS connections and requests of one inbound port.
pub(crate) struct PortStats {
    pub(crate) port: u16,
    totals: [AtomicU64; KINDS],
    window: Mutex<[Slot; SLOTS]>,
    sources: Mutex<HashMap<IpAddr, Source>>,
}

/// Plaintext source addresses remembered per port for `/mtls` (the most recently seen).
pub(crate) const MAX_PLAINTEXT_SOURCES: usize = 1024;

impl PortStats {
    pub(crate) fn new(port: u16) -> Self {
        PortStats {
            port,
            totals: Default::default(),
            window: Mutex::new([Slot::default(); SLOTS]),
            sources: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn count(&self, kind: Kind, src: Option<IpAddr>) {
        let i = kind as usize;
        self.totals[i].fetch_add(1, Ordering::Relaxed);
        let now = now_unix();
        let epoch = now / SLOT_SECS;
        {
            let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
            let slot = &mut w[(epoch as usize) % SLOTS];
            if slot.epoch != epoch {
                *slot = Slot {
                    epoch,
                    counts: [0; KINDS],
                };
            }
            slot.counts[i] += 1;
        }
        if let (
            Some(ip),
            Kind::PlaintextConnection | Kind::PlaintextRequest | Kind::PlaintextRefused,
        ) = (src, kind)
        {
            let mut s = self.sources.lock().unwrap_or_else(|e| e.into_inner());
            if s.len() >= MAX_PLAINTEXT_SOURCES && !s.contains_key(&ip) {
                // Peers choose their addresses: keep the most recently seen ones only.
                if let Some(oldest) = s
                    .iter()
                    .min_by_key(|(_, v)| v.last_seen_unix)
                    .map(|(k, _)| *k)
                {
                    s.remove(&oldest);
                }
            }
            let e = s.entry(ip).or_default();
            if matches!(kind, Kind::PlaintextRefused) {
                e.refused += 1;
            } else if matches!(kind, Kind::PlaintextConnection) {
                e.connections += 1;
            } else {
                e.requests += 1;
            }
            e.last_seen_unix = now;
        }
    }

    /// The `/mtls` entry of this port (`rampart_mesh::mtls`, shared with `mtls-report`).
    pub(crate) fn json(&self, protocol: &str, mode: &str) -> rampart_mesh::mtls::PortMtls {
        use rampart_mesh::mtls::{MtlsCounters, PlaintextSource, PortMtls, RecentMtls};
        let t: Vec<u64> = self
            .totals
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let epoch_now = now_unix() / SLOT_SECS;
        let mut r = [0u64; KINDS];
        {
            let w = self.window.lock().unwrap_or_else(|e| e.into_inner());
            for slot in w.iter() {
                if slot.epoch + (SLOTS as u64) > epoch_now {
                    for (sum, n) in r.iter_mut().zip(slot.counts) {
                        *sum += n;
                    }
                }
            }
        }
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<PlaintextSource> = sources
            .iter()
            .map(|(ip, s)| PlaintextSource {
                ip: ip.to_string(),
                connections: s.connections,
                requests: s.requests,
                refused: s.refused,
                last_seen_unix: s.last_seen_unix,
            })
            .collect();
        list.sort_by(|a, b| a.ip.cmp(&b.ip));
        let counters = |c: &[u64]| MtlsCounters {
            mtls_connections: c[0],
            plaintext_connections: c[1],
            mtls_requests: c[2],
            plaintext_requests: c[3],
            plaintext_refused: c[4],
        };
        PortMtls {
            port: self.port,
            protocol: protocol.to_string(),
            mode: mode.to_string(),
            since_start: counters(&t),
            recent: RecentMtls {
                window_seconds: WINDOW_SECS,
                counters: counters(&r),
            },
            plaintext_sources: list,
        }
    }
}

/// The `request_protocol` label of a port's series.
pub(crate) fn request_protocol(p: rampart_mesh::PortProtocol) -> &'static str {
    match p {
        rampart_mesh::PortProtocol::Grpc => "grpc",
        rampart_mesh::PortProtocol::Tcp => "tcp",
        _ => "http",
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt as _, Empty, StreamBody};

    use super::*;

    type Frames =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    fn body(frames: Vec<Frame<Bytes>>) -> Frames {
        StreamBody::new(futures::stream::iter(
            frames.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }

    fn recorded(s: &Series) -> Vec<(ReqKey, u64)> {
        let m = s.stats.lock().unwrap();
        let mut v: Vec<_> = m.iter().map(|(k, st)| (*k, st.count)).collect();
        v.sort();
        v
    }

    fn response(grpc_status: Option<&str>) -> Response<()> {
        let mut b = Response::builder()
            .status(200)
            .header("content-type", "application/grpc");
        if let Some(s) = grpc_status {
            b = b.header("grpc-status", s);
        }
        b.body(()).unwrap()
    }

    fn trailers(status: &str) -> Frame<Bytes> {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", status.parse().unwrap());
        Frame::trailers(t)
    }

    /// The peer picks `grpc-status`; only gRPC's 17 codes become label values, anything
    /// else counts as UNKNOWN, so a peer cannot grow the metrics without bound.
    #[test]
    fn grpc_status_values_are_bounded() {
        let of = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", v.parse().unwrap());
            grpc_status(&h)
        };
        assert_eq!(of("0"), Some(0));
        assert_eq!(of("16"), Some(16));
        for bad in ["17", "999", "65535", "70000", "-1", "ok", " 5", "5 "] {
            assert_eq!(of(bad), Some(GRPC_UNKNOWN), "{bad:?}");
        }
        assert_eq!(grpc_status(&HeaderMap::new()), None, "absent stays absent");
    }

    /// Peers choose their source addresses: the per-port list of plaintext sources stays
    /// bounded, keeping the newest.
    #[test]
    fn plaintext_sources_are_bounded() {
        let p = PortStats::new(80);
        for i in 0..(MAX_PLAINTEXT_SOURCES as u32 + 500) {
            let ip = IpAddr::from(std::net::Ipv6Addr::from(u128::from(i) + 1));
            p.count(Kind::PlaintextConnection, Some(ip));
        }
        let s = p.sources.lock().unwrap();
        assert_eq!(s.len(), MAX_PLAINTEXT_SOURCES);
        let newest = IpAddr::from(std::net::Ipv6Addr::from(u128::from(
            MAX_PLAINTEXT_SOURCES as u32 + 500,
        )));
        assert!(s.contains_key(&newest));
        drop(s);
        // Twin: a source already known is counted, not re-added.
        p.count(Kind::PlaintextRequest, Some(newest));
        let s = p.sources.lock().unwrap();
        assert_eq!(s.len(), MAX_PLAINTEXT_SOURCES);
        assert_eq!(s[&newest].requests, 1);
    }

    #[tokio::test]
    async fn grpc_status_comes_from_the_trailers_when_the_body_ends() {
        let m = Metrics::default();
        let s = m.series("a=\"b\"".into());
        let p = Pending::new(s.clone(), Instant::now(), true, &response(None), "-");
        let b = Metered::new(
            body(vec![Frame::data(Bytes::from_static(b"msg")), trailers("5")]),
            p,
        );
        assert!(recorded(&s).is_empty(), "nothing before the end");
        let collected = b.collect().await.unwrap();
        assert!(collected.trailers().is_some());
        assert_eq!(recorded(&s), vec![((200, Some(5), "-"), 1)]);
        let text = m.render();
        assert!(text.contains("grpc_response_status=\"5\""), "{text}");
    }

    #[tokio::test]
    async fn fallbacks_headers_then_http_status_and_not_grpc() {
        let m = Metrics::default();
        let s = m.series("a=\"b\"".into());
        // trailers-only (status in the headers), empty body hyper never polls
        let p = Pending::new(s.clone(), Instant::now(), true, &response(Some("7")), "-");
        drop(Metered::new(Empty::<Bytes>::new(), p));
        // gRPC body ending without any status: mapped from HTTP 200 (UNKNOWN)
        let p = Pending::new(s.clone(), Instant::now(), true, &response(None), "-");
        let b = Metered::new(body(vec![Frame::data(Bytes::from_static(b"x"))]), p);
        b.collect().await.unwrap();
        // not gRPC: no status at all
        let p = Pending::new(s.clone(), Instant::now(), false, &response(None), "-");
        Metered::new(body(vec![]), p).collect().await.unwrap();
        assert_eq!(
            recorded(&s),
            vec![
                ((200, None, "-"), 1),
                ((200, Some(2), "-"), 1),
                ((200, Some(7), "-"), 1)
            ]
        );
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_is_flagged_dc() {
        let m = Metrics::default();
        let s = m.series("a=\"b\"".into());
        let p = Pending::new(s.clone(), Instant::now(), true, &response(None), "-");
        let mut b = Metered::new(
            body(vec![Frame::data(Bytes::from_static(b"1")), trailers("0")]),
            p,
        );
        let _first = b.frame().await;
        drop(b);
        assert_eq!(recorded(&s), vec![((200, Some(2), "DC"), 1)]);
    }

    #[test]
    fn http_statuses_map_to_grpc_as_envoy_does() {
        for (http, grpc) in [
            (400, 13),
            (401, 16),
            (403, 7),
            (404, 12),
            (429, 14),
            (502, 14),
            (503, 14),
            (504, 14),
            (200, 2),
            (500, 2),
        ] {
            assert_eq!(http_to_grpc(http), grpc, "{http}");
        }
    }
}
