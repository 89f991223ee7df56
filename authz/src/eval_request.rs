//! What the engine is asked about: the destination workload and one connection or request.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;
use serde_json::{Map, Value};

/// A workload (the destination of traffic): what Kubernetes would say about a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Namespace of the workload.
    pub namespace: String,
    /// Labels of the workload, matched by policy `selector.matchLabels`.
    pub labels: BTreeMap<String, String>,
    /// Service account, if known (informational).
    pub service_account: Option<String>,
}

impl Workload {
    /// A workload in `namespace` with the given labels.
    pub fn new<K: Into<String>, V: Into<String>>(
        namespace: impl Into<String>,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Workload {
            namespace: namespace.into(),
            labels: labels
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            service_account: None,
        }
    }
}

/// The downstream peer of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Peer {
    /// The peer certificate's URI SAN (`spiffe://td/ns/x/sa/y`) when the connection is mTLS;
    /// `None` for plaintext (then `principals`, `namespaces`, `serviceAccounts` and
    /// `trustDomains` never match and their `not*` forms always do).
    pub principal: Option<String>,
    /// The direct downstream IP (`ipBlocks`, `source.ip`).
    pub ip: Option<IpAddr>,
    /// The original client IP (`remoteIpBlocks`, `remote.ip`) when the caller knows it
    /// (a PROXY-protocol header, say). When unset it is what an Istio sidecar takes: the
    /// last `X-Forwarded-For` entry of an HTTP request if that is an IP address, else `ip`
    /// (see [`RequestContext::remote_ip`]).
    pub remote_ip: Option<IpAddr>,
}

/// One HTTP request (HTTP/1.1, HTTP/2 or gRPC).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HttpRequest {
    /// `:method`.
    pub method: String,
    /// `:path` as received (query included, not yet normalized).
    pub path: String,
    /// `:authority` / `Host`.
    pub host: String,
    /// Other headers. Names compare case-insensitively; repeated names are joined with `,`.
    pub headers: Vec<(String, String)>,
}

impl HttpRequest {
    /// A request with no extra headers.
    pub fn new(method: &str, path: &str, host: &str) -> Self {
        HttpRequest {
            method: method.to_string(),
            path: path.to_string(),
            host: host.to_string(),
            headers: Vec::new(),
        }
    }

    /// Add a header (builder style).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Each value of header `name` (case-insensitive), in the order received.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The value of header `name` (case-insensitive), repeated headers joined with `,`.
    pub fn header(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        let mut it = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name));
        let first = it.next()?;
        match it.next() {
            None => Some(std::borrow::Cow::Borrowed(first.1.as_str())),
            Some(second) => {
                let mut s = format!("{},{}", first.1, second.1);
                for (_, v) in it {
                    s.push(',');
                    s.push_str(v);
                }
                Some(std::borrow::Cow::Owned(s))
            }
        }
    }
}

/// Verified JWT claims of the request (`request.auth.*`, `requestPrincipals`), as produced by
/// [`crate::Engine::authenticate_request`]. Space-delimited claims (`scope`, `permission` and
/// each rule's `spaceDelimitedClaims`) are already split into lists.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JwtClaims {
    /// The claims object.
    pub claims: Map<String, Value>,
}

impl JwtClaims {
    /// A string claim at the top level.
    pub fn str_claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// `<iss>/<sub>`, Istio's request principal, when both claims are strings.
    pub fn principal(&self) -> Option<String> {
        Some(format!(
            "{}/{}",
            self.str_claim("iss")?,
            self.str_claim("sub")?
        ))
    }

    /// The claim at a nested path (`["a", "b"]` is `claims.a.b`).
    pub fn path(&self, path: &[String]) -> Option<&Value> {
        let (first, rest) = path.split_first()?;
        let mut v = self.claims.get(first)?;
        for k in rest {
            v = v.as_object()?.get(k)?;
        }
        Some(v)
    }
}

/// Everything authorization looks at for one connection (TCP) or request (HTTP).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RequestContext {
    /// The downstream peer.
    pub source: Peer,
    /// The local (destination) IP (`destination.ip`).
    pub destination_ip: Option<IpAddr>,
    /// The destination (workload) port (`ports`, `destination.port`).
    pub destination_port: u16,
    /// TLS SNI of the downstream connection (`connection.sni`).
    pub sni: Option<String>,
    /// The HTTP request, `None` for a TCP (non-HTTP) port.
    pub http: Option<HttpRequest>,
    /// Verified JWT claims, `None` when the request carried no token.
    pub jwt: Option<JwtClaims>,
}

impl RequestContext {
    /// The protocol of this context.
    pub fn protocol(&self) -> Protocol {
        if self.http.is_some() {
            Protocol::Http
        } else {
            Protocol::Tcp
        }
    }

    /// The address `remoteIpBlocks` and `remote.ip` match, as an Istio sidecar's inbound
    /// decides it (Envoy with `use_remote_address: false` and no trusted hops): the last
    /// entry of `X-Forwarded-For` (repeated headers joined with `,`, whitespace trimmed)
    /// when it parses as an IP address, else the peer's address. Whoever sends the request
    /// chooses that header, so this is the client's claim, not a checked fact: `ipBlocks`
    /// is the peer itself.
    pub fn remote_ip(&self) -> Option<IpAddr> {
        if let Some(ip) = self.source.remote_ip {
            return Some(ip);
        }
        self.http
            .as_ref()
            .and_then(|h| h.header("x-forwarded-for"))
            .and_then(|xff| {
                let last = xff.rsplit(',').next().unwrap_or_default();
                let last = last.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b');
                // A scoped IPv6 address (`fe80::1%eth0`) is an address to Envoy too; the
                // zone plays no part in a CIDR match.
                let addr = match last.split_once('%') {
                    Some((a, zone)) if a.contains(':') && !zone.is_empty() => a,
                    _ => last,
                };
                addr.parse::<IpAddr>().ok()
            })
            .map(|ip| ip.to_canonical())
            .or(self.source.ip)
    }
}

/// How a port is handled: HTTP ports get request-level checks, others connection-level ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1, HTTP/2, gRPC.
    Http,
    /// Any other TCP traffic.
    Tcp,
}
