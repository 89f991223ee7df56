//! The mesh folder (DESIGN §6): `mesh.yaml`, the workload registry `workloads.yaml`, Istio
//! security policy YAML and local JWKS files, loaded and checked as one unit.
//!
//! [`MeshFolder::load`] either returns a complete, consistent folder or every problem found,
//! each naming the file and the field (`workloads.yaml: workloads[1].ports[0].app: ...`).
//! `rampart proxy` and `rampart up` both read the folder through this module.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rampart_authz::{MeshConfig, MtlsMode, Resource, Workload};
use rampart_certs::{SpiffeId, TrustDomain};
use serde::Deserialize;

/// File name of the mesh settings inside the folder.
pub const MESH_FILE: &str = "mesh.yaml";
/// File name of the workload registry inside the folder.
pub const WORKLOADS_FILE: &str = "workloads.yaml";
/// The DNS suffix of service hosts (`<name>.<namespace>.svc.cluster.local`), independent of
/// the trust domain, as in Kubernetes.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The CA's listen address when `rampart.ca.listen` is not set (DESIGN §2; Istio's 15012).
pub const DEFAULT_CA_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15012);

/// One thing wrong with the folder: which file, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file, relative to the folder when it is inside it.
    pub file: String,
    /// The field path (`workloads[0].ports[1].inbound`), or empty for the whole file.
    pub field: String,
    /// Why it is refused.
    pub reason: String,
}

/// Where in a policy file a problem is: `document N`, then the field when there is one (a
/// YAML syntax error has none).
fn document_field(doc: usize, field: &str) -> String {
    if field.is_empty() {
        format!("document {doc}")
    } else {
        format!("document {doc}: {field}")
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file, self.field, self.reason)
        }
    }
}

/// The protocol of a workload port (Istio's port protocols, reduced to what the proxy
/// handles differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// HTTP/1.1 (HTTP/2 from clients that speak it is accepted too).
    Http,
    /// HTTP/2 (h2c from plaintext clients, h2 over mTLS).
    Http2,
    /// gRPC (HTTP/2; denials are gRPC status 7).
    Grpc,
    /// Opaque TCP: connection-level policy only.
    Tcp,
}

impl PortProtocol {
    /// The lowercase name (`http`, `http2`, `grpc`, `tcp`).
    pub fn as_str(self) -> &'static str {
        match self {
            PortProtocol::Http => "http",
            PortProtocol::Http2 => "http2",
            PortProtocol::Grpc => "grpc",
            PortProtocol::Tcp => "tcp",
        }
    }

    /// Whether requests are parsed (request-level authn/authz).
    pub fn is_http(self) -> bool {
        self != PortProtocol::Tcp
    }

    /// Whether the app and peers speak HTTP/2 on this port.
    pub fn is_h2(self) -> bool {
        matches!(self, PortProtocol::Http2 | PortProtocol::Grpc)
    }
}

/// One port of a workload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PortEntry {
    /// The workload port: what policy `ports` match and what clients address.
    pub port: u16,
    /// The protocol.
    pub protocol: PortProtocol,
    /// Where the app listens (plaintext, local).
    pub app: SocketAddr,
    /// Where this workload's inbound proxy listens for this port.
    pub inbound: SocketAddr,
    /// The port's effective PeerAuthentication mode as the control plane computed it for
    /// callers (`mtls` in the registry form): set only in the reduced entry a config stream
    /// sends for another workload, whose namespace's PeerAuthentications that proxy does not
    /// receive. `None`: callers evaluate the policies they hold
    /// ([`WorkloadEntry::mtls_mode_for_callers`]).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_mode"
    )]
    pub mtls: Option<MtlsMode>,
}

fn serialize_mode<S: serde::Serializer>(m: &Option<MtlsMode>, s: S) -> Result<S::Ok, S::Error> {
    match m {
        Some(m) => s.serialize_str(m.as_str()),
        None => s.serialize_none(),
    }
}

/// The proxy's own listeners for a workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProxyEntry {
    /// HTTP proxy listener for the app's calls (routed by Host).
    pub outbound: Option<SocketAddr>,
    /// Admin listener.
    pub admin: Option<SocketAddr>,
}

/// A local port forwarding to one upstream service port (Consul-Connect style).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UpstreamEntry {
    /// The service as written (`frontend.web`, `frontend.web.svc.cluster.local`, ...).
    pub service: String,
    /// The service port.
    pub port: u16,
    /// The local listen address.
    pub listen: SocketAddr,
}

/// A workload of the registry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadEntry {
    /// Workload (and service) name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account (default: the name).
    pub service_account: String,
    /// Labels, matched by policy selectors.
    pub labels: BTreeMap<String, String>,
    /// Ports.
    pub ports: Vec<PortEntry>,
    /// The command `rampart up` runs, if any (`rampart` means the current executable).
    pub command: Option<Vec<String>>,
    /// The proxy's listeners.
    pub proxy: ProxyEntry,
    /// Local upstream ports.
    pub upstreams: Vec<UpstreamEntry>,
}

impl WorkloadEntry {
    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `<name>.<namespace>.svc.cluster.local`.
    pub fn service_host(&self) -> String {
        format!("{}.{}.svc.{CLUSTER_DOMAIN}", self.name, self.namespace)
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<serviceAccount>`.
    pub fn spiffe_id(&self, trust_domain: &TrustDomain) -> SpiffeId {
        SpiffeId::istio(trust_domain, &self.namespace, &self.service_account)
            .expect("names were validated as DNS labels when the registry was loaded")
    }

    /// The workload as the authorization engine sees it.
    pub fn authz_workload(&self) -> Workload {
        Workload {
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            service_account: Some(self.service_account.clone()),
        }
    }

    /// The port entry for workload port `port`.
    pub fn port(&self, port: u16) -> Option<&PortEntry> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// The effective PeerAuthentication mode of `port` as a caller holding `engine` sees
    /// it: the mode the control plane wrote into the port (a streamed destination entry),
    /// else what `engine`'s PeerAuthentications say for this workload and port. A caller
    /// originates mTLS unless it is `DISABLE`.
    pub fn mtls_mode_for_callers(
        &self,
        engine: &rampart_authz::Engine,
        port: &PortEntry,
    ) -> MtlsMode {
        port.mtls.unwrap_or_else(|| {
            engine
                .peer_authentication(&self.authz_workload(), port.port)
                .mode
        })
    }
}

/// One port of a service: what clients dial (`port`), the workload port of every endpoint
/// it reaches (`targetPort`), and the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// The service port (what clients address, and the `outbound_.<port>_._.<host>` SNI).
    pub port: u16,
    /// The endpoints' workload port.
    pub target_port: u16,
    /// The protocol.
    pub protocol: PortProtocol,
}

/// A service of the registry (Kubernetes mode: a Service and its ready endpoints; a folder
/// may declare them too). Without services, every workload is its own service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceEntry {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// The workloads serving it (`<namespace>/<name>` keys of registry workloads), in the
    /// order connections prefer them.
    pub endpoints: Vec<String>,
}

impl ServiceEntry {
    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `<name>.<namespace>.svc.cluster.local`.
    pub fn host(&self) -> String {
        format!("{}.{}.svc.{CLUSTER_DOMAIN}", self.name, self.namespace)
    }

    /// The service port `port`.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// Where a client's authority leads: the destination workload and its port (where its
/// inbound proxy listens, and whose identity to expect), and the service host and port
/// as dialled (the SNI `outbound_.<service_port>_._.<service_host>`).
#[derive(Debug, Clone, Copy)]
pub struct Resolved<'a> {
    /// The destination workload (for a service, the endpoint chosen).
    pub workload: &'a WorkloadEntry,
    /// Its port that serves the request.
    pub port: &'a PortEntry,
    /// The service of the authority, if it named a declared service (else the workload
    /// is its own service).
    pub service: Option<&'a ServiceEntry>,
    /// The service port dialled.
    pub service_port: u16,
}

impl Resolved<'_> {
    /// The service host (`<name>.<namespace>.svc.cluster.local`).
    pub fn service_host(&self) -> String {
        match self.service {
            Some(s) => s.host(),
            None => self.workload.service_host(),
        }
    }
}

/// The workload registry (`workloads.yaml`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Registry {
    /// Workloads, in file order.
    pub workloads: Vec<WorkloadEntry>,
    /// Services, in file order (empty: every workload is its own service).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceEntry>,
}

impl Registry {
    /// The workload `namespace/name`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&WorkloadEntry> {
        self.workloads
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)
    }

    /// The service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceEntry> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
    }

    /// Resolve a service host as a client in `from_namespace` writes it: `<name>.<ns>.svc.
    /// cluster.local`, `<name>.<ns>.svc`, `<name>.<ns>` or (same namespace) `<name>`, with an
    /// optional `:port` (default 80, which must then be a declared port). The workload and
    /// its port of [`Registry::resolve_target`].
    pub fn resolve(
        &self,
        authority: &str,
        from_namespace: &str,
    ) -> Option<(&WorkloadEntry, &PortEntry)> {
        self.resolve_target(authority, from_namespace)
            .map(|r| (r.workload, r.port))
    }

    /// Resolve an authority (see [`Registry::resolve`]) to a destination. A declared service
    /// of that name wins: its port `P` leads to the first endpoint that has the workload
    /// port `targetPort` (`None` when it has no such endpoint). Otherwise a workload of that
    /// name is its own service, its port `P` the workload port.
    pub fn resolve_target(&self, authority: &str, from_namespace: &str) -> Option<Resolved<'_>> {
        self.resolve_all(authority, from_namespace)?
            .into_iter()
            .next()
    }

    /// Whether the host of `authority` is a service or workload of the registry, whatever
    /// its ports and endpoints: a caller that finds no destination for such a host knows it is
    /// a mesh host with nothing serving, not one outside the mesh.
    pub fn names_host(&self, authority: &str, from_namespace: &str) -> bool {
        name_ns_port(authority, from_namespace).is_some_and(|(name, ns, _)| {
            self.service(&ns, &name).is_some() || self.get(&ns, &name).is_some()
        })
    }

    /// Every destination of an authority, in preference order (a service's endpoints that
    /// serve its target port; a workload alone); `None` when there is none.
    pub fn resolve_all(&self, authority: &str, from_namespace: &str) -> Option<Vec<Resolved<'_>>> {
        let (name, ns, port) = name_ns_port(authority, from_namespace)?;
        let (name, ns) = (name.as_str(), ns.as_str());
        if let Some(svc) = self.service(ns, name) {
            let sp = *svc.port(port)?;
            let found: Vec<Resolved<'_>> = svc
                .endpoints
                .iter()
                .filter_map(|key| {
                    let (ens, ename) = key.split_once('/')?;
                    let w = self.get(ens, ename)?;
                    let p = w.port(sp.target_port)?;
                    Some(Resolved {
                        workload: w,
                        port: p,
                        service: Some(svc),
                        service_port: port,
                    })
                })
                .collect();
            if found.is_empty() {
                return None;
            }
            return Some(found);
        }
        let w = self.get(ns, name)?;
        let p = w.port(port)?;
        Some(vec![Resolved {
            workload: w,
            port: p,
            service: None,
            service_port: port,
        }])
    }
}

/// The `(name, namespace, port)` an authority names in the registry's terms (`name`,
/// `name.ns`, `name.ns.svc`, `name.ns.svc.cluster.local`; port 80 when absent). A name with a
/// trailing dot is absolute, as in DNS: only the full `name.ns.svc.cluster.local.` form is a
/// registry host (the short forms are what a resolver's search path completes, and it does not
/// complete an absolute name: `example.com.` is never service `example` of namespace `com`).
fn name_ns_port(authority: &str, from_namespace: &str) -> Option<(String, String, u16)> {
    let (host, port) = split_host_port(authority)?;
    let absolute = host.ends_with('.');
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let parts: Vec<&str> = host.split('.').collect();
    let (name, ns) = match parts.as_slice() {
        [name, ns, "svc", rest @ ..] if rest.join(".") == CLUSTER_DOMAIN => (*name, *ns),
        _ if absolute => return None,
        [name] => (*name, from_namespace),
        [name, ns] | [name, ns, "svc"] => (*name, *ns),
        _ => return None,
    };
    Some((name.to_string(), ns.to_string(), port.unwrap_or(80)))
}

/// Split `host[:port]` (IPv6 literals in brackets); `None` when the port is not a number.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        return match tail.strip_prefix(':') {
            Some(p) => Some((h, Some(p.parse().ok()?))),
            None if tail.is_empty() => Some((h, None)),
            None => None,
        };
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h, Some(p.parse().ok()?))),
        None => Some((s, None)),
    }
}

/// The `rampart:` section of `mesh.yaml` (local settings, not Istio's).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LocalSettings {
    /// CA listen address (`rampart.ca.listen`), default `127.0.0.1:15012` when unset.
    pub ca_listen: Option<SocketAddr>,
    /// Where the CA `rampart up` runs serves its metrics, `/ready` and `/healthz`
    /// (`rampart.ca.metrics`; none when unset).
    pub ca_metrics: Option<SocketAddr>,
    /// Workload certificate TTL (`rampart.ca.certTTL`).
    pub cert_ttl: Option<Duration>,
    /// Maximum workload certificate TTL (`rampart.ca.maxCertTTL`).
    pub max_cert_ttl: Option<Duration>,
    /// State directory (`rampart.stateDir`), relative to the cwd of `rampart up`.
    pub state_dir: Option<PathBuf>,
    /// How often remote `jwksUri` key sets are refetched (`rampart.jwksRefresh`, a Go
    /// duration; default 20m, Istio's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
    pub jwks_refresh: Option<Duration>,
    /// Extra CA certificates (PEM) trusted for `https` `jwksUri` besides the system roots
    /// (`rampart.jwksCaFile`), relative to the folder.
    pub jwks_ca_file: Option<PathBuf>,
    /// Whether outbound and upstream listeners may listen on a non-loopback address
    /// (`rampart.allowNonLoopbackOutbound`, default false): whoever reaches such a port acts
    /// as the workload, so a registry asking for one is refused unless this says it is meant.
    pub allow_non_loopback_outbound: bool,
    /// Whether a proxy's admin listener answers `/config_dump`, `/certs` and `/mtls` to
    /// clients that are not on loopback (`rampart.allowRemoteAdmin`, default false): they
    /// show the policy in force, the identity and the plaintext clients seen. Metrics and
    /// `/ready` answer anyone who reaches the listener either way.
    pub allow_remote_admin: bool,
    /// Key-exchange compliance policy (`rampart.compliancePolicy`, as Istio's
    /// `COMPLIANCE_POLICY`): `pqc` makes this mesh's proxies offer and accept
    /// `X25519MLKEM768` only. Read when a proxy starts.
    pub compliance_policy: rampart_certs::tls::CompliancePolicy,
    /// Peers whose issuer has no CRL (`rampart.crlUnknownStatus`): `allow` (default, as
    /// Istio and ztunnel) or `deny` (every issuer of a peer chain must be covered by a CRL).
    #[serde(skip)]
    pub crl_unknown_status: rampart_certs::UnknownStatus,
    /// Whose addresses the registry's listen addresses are (`rampart.workloadNetwork`):
    /// `host` (default: every workload shares one machine's addresses, so no two may listen
    /// on the same one) or `pod` (each workload has its own network namespace, as Pods do:
    /// loopback addresses are its own, and only non-loopback ones must be unique).
    pub workload_network: WorkloadNetwork,
    /// The whole section as written, for settings other components own.
    pub raw: serde_json::Value,
}

impl LocalSettings {
    /// The CA's listen address: `rampart.ca.listen`, else [`DEFAULT_CA_LISTEN`].
    pub fn ca_address(&self) -> SocketAddr {
        self.ca_listen.unwrap_or(DEFAULT_CA_LISTEN)
    }
}

/// Whose addresses a registry's listen addresses are (`rampart.workloadNetwork`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum WorkloadNetwork {
    /// One machine: every workload's proxy and app listen on the same host's addresses, so
    /// every listen address (loopback included) may be used by one workload only.
    #[default]
    Host,
    /// One network namespace per workload (Kubernetes Pods): `127.0.0.1:15001` in one Pod
    /// is not the same socket as in another, so loopback addresses are checked within a
    /// workload only; non-loopback addresses (Pod IPs) must still be unique mesh-wide.
    Pod,
}

impl WorkloadNetwork {
    /// The name `mesh.yaml` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadNetwork::Host => "host",
            WorkloadNetwork::Pod => "pod",
        }
    }
}

impl std::str::FromStr for WorkloadNetwork {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(WorkloadNetwork::Host),
            "pod" => Ok(WorkloadNetwork::Pod),
            other => Err(format!("{other:?} is not host or pod")),
        }
    }
}

/// A loaded, checked mesh folder.
#[derive(Debug, Clone)]
pub struct MeshFolder {
    /// The folder.
    pub dir: PathBuf,
    /// Policy-relevant mesh settings.
    pub mesh: MeshConfig,
    /// The trust domain, validated.
    pub trust_domain: TrustDomain,
    /// Trust-domain aliases, validated.
    pub trust_domain_aliases: Vec<TrustDomain>,
    /// The `rampart:` section.
    pub local: LocalSettings,
    /// The workload registry.
    pub registry: Registry,
    /// Security policies (every other `*.yaml`/`*.yml` under the folder).
    pub resources: Vec<Resource>,
    /// The files the configuration refers to, read with the snapshot: whoever builds from a
    /// snapshot does no I/O of its own.
    pub files: ReferencedFiles,
}

/// The contents of the files a snapshot refers to (local JWKS, the JWKS CA bundle), each
/// read when the snapshot was taken, or why it could not be read. An unreadable file is not
/// a refusal of the snapshot: what depends on it decides (a proxy refuses an unreadable
/// `rampart.jwksCaFile`; an unreadable local JWKS is that issuer's fetch failure).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReferencedFiles {
    /// `jwksUri` -> the key set document read from its local file (see
    /// [`MeshFolder::jwks_files`]), for every URI that is read locally rather than fetched.
    pub jwks: BTreeMap<String, Result<String, String>>,
    /// `rampart.jwksCaFile`: its PEM text, when set.
    pub jwks_ca: Option<Result<String, String>>,
}

impl ReferencedFiles {
    /// Read what `folder` refers to, now.
    pub fn read(folder: &MeshFolder) -> ReferencedFiles {
        let overrides = folder.jwks_files();
        let mut jwks = BTreeMap::new();
        for r in &folder.resources {
            let Resource::RequestAuthentication(ra) = r else {
                continue;
            };
            for rule in ra.spec.jwt_rules.iter().flatten() {
                let Some(uri) = &rule.jwks_uri else { continue };
                let remote = uri.starts_with("https://") || uri.starts_with("http://");
                let path = match overrides.get(uri) {
                    Some(p) => p.clone(),
                    None if remote => continue,
                    None => {
                        let p = PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri));
                        if p.is_relative() {
                            folder.dir.join(p)
                        } else {
                            p
                        }
                    }
                };
                let text =
                    std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()));
                jwks.insert(uri.clone(), text);
            }
        }
        // Key sets of issuers found by OpenID discovery, mapped to local files.
        for (uri, path) in &overrides {
            if !jwks.contains_key(uri) {
                let text =
                    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()));
                jwks.insert(uri.clone(), text);
            }
        }
        let jwks_ca = folder.local.jwks_ca_file.as_ref().map(|p| {
            let p = folder.dir.join(p);
            std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))
        });
        ReferencedFiles { jwks, jwks_ca }
    }
}

// --- raw forms (as written) ---

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    #[serde(default)]
    workloads: Vec<RawWorkload>,
    #[serde(default)]
    services: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    namespace: String,
    #[serde(default)]
    ports: Vec<RawServicePort>,
    #[serde(default)]
    endpoints: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawServicePort {
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawWorkload {
    name: String,
    namespace: String,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    proxy: Option<RawProxy>,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    port: u16,
    #[serde(default)]
    protocol: Option<String>,
    app: String,
    inbound: String,
    #[serde(default)]
    mtls: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    #[serde(default)]
    outbound: Option<String>,
    #[serde(default)]
    admin: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    service: String,
    port: u16,
    listen: String,
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

struct Collector {
    problems: Vec<Problem>,
}

impl Collector {
    fn push(&mut self, file: &str, field: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem {
            file: file.to_string(),
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn addr(&mut self, file: &str, field: &str, s: &str) -> Option<SocketAddr> {
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(
                    file,
                    field,
                    format!("{s:?} is not an IP:port address (e.g. 127.0.0.1:15081)"),
                );
                None
            }
        }
    }
}

fn parse_yaml(file: &str, text: &str, c: &mut Collector) -> Option<serde_json::Value> {
    if text.trim().is_empty() {
        return Some(serde_json::Value::Null);
    }
    // YAML 1.2 core booleans only: in these files `n`, `no`, `on`, `y` are names (a namespace
    // called `n`), never booleans, as Kubernetes manifests written for YAML 1.2 expect.
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    // A registry of 10,000 workloads is ~250,000 nodes, the parser's default cap: allow
    // meshes of ~150,000 workloads (aliases and depth keep their default caps).
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = 4_000_000;
    budget.max_events = 16_000_000;
    options.budget = Some(budget);
    match serde_saphyr::from_str_with_options::<serde_json::Value>(text, options) {
        Ok(v) => Some(v),
        Err(e) => {
            c.push(file, "", format!("not valid YAML: {e}"));
            None
        }
    }
}

/// Parse and check a registry text (`file` names it in problems).
pub fn parse_registry(file: &str, text: &str) -> Result<Registry, Vec<Problem>> {
    parse_registry_in(file, text, WorkloadNetwork::Host)
}

/// [`parse_registry`] for workloads on `network` (see [`WorkloadNetwork`]).
pub fn parse_registry_in(
    file: &str,
    text: &str,
    network: WorkloadNetwork,
) -> Result<Registry, Vec<Problem>> {
    let mut c = Collector {
        problems: Vec::new(),
    };
    let reg = parse_registry_into(file, text, network, &mut c);
    match reg {
        Some(r) if c.problems.is_empty() => Ok(r),
        _ => Err(c.problems),
    }
}

fn parse_registry_into(
    file: &str,
    text: &str,
    network: WorkloadNetwork,
    c: &mut Collector,
) -> Option<Registry> {
    let value = parse_yaml(file, text, c)?;
    let value = if value.is_null() {
        serde_json::json!({})
    } else {
        value
    };
    let raw: RawRegistry = match serde_path_to_error::deserialize(value) {
        Ok(r) => r,
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            c.push(file, field, e.into_inner().to_string());
            return None;
        }
    };
    let mut reg = Registry::default();
    let mut seen_workloads = BTreeSet::new();
    // Listen addresses taken: mesh-wide, and (with per-workload networks) this workload's
    // own loopback ones, which start empty for each workload.
    // A workload's own addresses are keyed by its index (`current`).
    let mut listen: BTreeMap<(Option<usize>, SocketAddr), String> = BTreeMap::new();
    let current = std::cell::Cell::new(0usize);
    let mut claim = |c: &mut Collector, addr: SocketAddr, field: String| {
        let scope =
            (network == WorkloadNetwork::Pod && addr.ip().is_loopback()).then(|| current.get());
        if let Some(prev) = listen.get(&(scope, addr)) {
            c.push(
                file,
                field.clone(),
                format!("address {addr} is already used by {prev}"),
            );
        } else {
            listen.insert((scope, addr), field);
        }
    };
    for (i, w) in raw.workloads.into_iter().enumerate() {
        let at = format!("workloads[{i}]");
        current.set(i);
        let before = c.problems.len();
        if !is_dns_label(&w.name) {
            c.push(
                file,
                format!("{at}.name"),
                format!(
                    "{:?} is not a DNS label (lowercase letters, digits, '-')",
                    w.name
                ),
            );
        }
        if !is_dns_label(&w.namespace) {
            c.push(
                file,
                format!("{at}.namespace"),
                format!("{:?} is not a DNS label", w.namespace),
            );
        }
        let sa = w.service_account.unwrap_or_else(|| w.name.clone());
        if !is_dns_label(&sa) && !sa.split('.').all(is_dns_label) {
            c.push(
                file,
                format!("{at}.serviceAccount"),
                format!("{sa:?} is not a valid service account name"),
            );
        }
        if !seen_workloads.insert((w.namespace.clone(), w.name.clone())) {
            c.push(
                file,
                format!("{at}.name"),
                format!("workload {}/{} is declared twice", w.namespace, w.name),
            );
        }
        let mut ports = Vec::new();
        let mut seen_ports = BTreeSet::new();
        for (j, p) in w.ports.into_iter().enumerate() {
            let pat = format!("{at}.ports[{j}]");
            if p.port == 0 {
                c.push(file, format!("{pat}.port"), "port 0 is not a port");
            }
            if !seen_ports.insert(p.port) {
                c.push(
                    file,
                    format!("{pat}.port"),
                    format!("port {} is declared twice", p.port),
                );
            }
            let protocol = parse_protocol(file, &format!("{pat}.protocol"), p.protocol, c);
            let app = c.addr(file, &format!("{pat}.app"), &p.app);
            let inbound = c.addr(file, &format!("{pat}.inbound"), &p.inbound);
            if let Some(a) = inbound {
                claim(c, a, format!("{pat}.inbound"));
            }
            if let (Some(a), Some(b)) = (app, inbound)
                && a == b
            {
                c.push(
                    file,
                    format!("{pat}.inbound"),
                    "the inbound address must differ from the app address",
                );
            }
            let mtls = match p.mtls.as_deref() {
                None => Some(None),
                Some("STRICT") => Some(Some(MtlsMode::Strict)),
                Some("PERMISSIVE") => Some(Some(MtlsMode::Permissive)),
                Some("DISABLE") => Some(Some(MtlsMode::Disable)),
                Some(other) => {
                    c.push(
                        file,
                        format!("{pat}.mtls"),
                        format!("unknown mTLS mode {other:?} (STRICT, PERMISSIVE or DISABLE)"),
                    );
                    None
                }
            };
            if let (Some(protocol), Some(app), Some(inbound), Some(mtls)) =
                (protocol, app, inbound, mtls)
            {
                ports.push(PortEntry {
                    port: p.port,
                    protocol,
                    app,
                    inbound,
                    mtls,
                });
            }
        }
        let raw_proxy = w.proxy.unwrap_or_default();
        let outbound = raw_proxy
            .outbound
            .as_deref()
            .and_then(|s| c.addr(file, &format!("{at}.proxy.outbound"), s));
        let admin = raw_proxy
            .admin
            .as_deref()
            .and_then(|s| c.addr(file, &format!("{at}.proxy.admin"), s));
        if let Some(a) = outbound {
            claim(c, a, format!("{at}.proxy.outbound"));
        }
        if let Some(a) = admin {
            claim(c, a, format!("{at}.proxy.admin"));
        }
        let mut upstreams = Vec::new();
        for (j, u) in w.upstreams.into_iter().enumerate() {
            let uat = format!("{at}.upstreams[{j}]");
            if let Some(l) = c.addr(file, &format!("{uat}.listen"), &u.listen) {
                claim(c, l, format!("{uat}.listen"));
                upstreams.push(UpstreamEntry {
                    service: u.service,
                    port: u.port,
                    listen: l,
                });
            }
        }
        if w.command.as_ref().is_some_and(Vec::is_empty) {
            c.push(
                file,
                format!("{at}.command"),
                "must not be empty (leave it out instead)",
            );
        }
        if c.problems.len() == before {
            reg.workloads.push(WorkloadEntry {
                name: w.name,
                namespace: w.namespace,
                service_account: sa,
                labels: w.labels,
                ports,
                command: w.command,
                proxy: ProxyEntry { outbound, admin },
                upstreams,
            });
        }
    }
    parse_services(file, raw.services, &mut reg, c);
    // Upstreams must name a registry service port.
    for (i, w) in reg.workloads.iter().enumerate() {
        for (j, u) in w.upstreams.iter().enumerate() {
            let authority = format!("{}:{}", u.service, u.port);
            if reg.resolve(&authority, &w.namespace).is_none() {
                c.push(
                    file,
                    format!("workloads[{i}].upstreams[{j}].service"),
                    format!("{authority} is not a port of any workload in the registry"),
                );
            }
        }
    }
    Some(reg)
}

fn parse_protocol(
    file: &str,
    field: &str,
    protocol: Option<String>,
    c: &mut Collector,
) -> Option<PortProtocol> {
    match protocol.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("tcp") => Some(PortProtocol::Tcp),
        Some("http") | Some("http1") | Some("http/1.1") => Some(PortProtocol::Http),
        Some("http2") | Some("h2") | Some("h2c") => Some(PortProtocol::Http2),
        Some("grpc") | Some("grpc-web") => Some(PortProtocol::Grpc),
        Some(other) => {
            c.push(
                file,
                field,
                format!("unknown protocol {other:?} (http, http2, grpc or tcp)"),
            );
            None
        }
    }
}

/// The `services:` of a registry: names, ports and endpoints checked against the
/// workloads already parsed (an endpoint must be a declared workload with the target port).
fn parse_services(file: &str, raw: Vec<RawService>, reg: &mut Registry, c: &mut Collector) {
    let mut seen = BTreeSet::new();
    for (i, s) in raw.into_iter().enumerate() {
        let at = format!("services[{i}]");
        let before = c.problems.len();
        if !is_dns_label(&s.name) {
            c.push(
                file,
                format!("{at}.name"),
                format!("{:?} is not a DNS label", s.name),
            );
        }
        if !is_dns_label(&s.namespace) {
            c.push(
                file,
                format!("{at}.namespace"),
                format!("{:?} is not a DNS label", s.namespace),
            );
        }
        if !seen.insert((s.namespace.clone(), s.name.clone())) {
            c.push(
                file,
                format!("{at}.name"),
                format!("service {}/{} is declared twice", s.namespace, s.name),
            );
        }
        let mut ports = Vec::new();
        let mut seen_ports = BTreeSet::new();
        for (j, p) in s.ports.into_iter().enumerate() {
            let pat = format!("{at}.ports[{j}]");
            let target_port = p.target_port.unwrap_or(p.port);
            if p.port == 0 || target_port == 0 {
                c.push(file, format!("{pat}.port"), "port 0 is not a port");
            }
            if !seen_ports.insert(p.port) {
                c.push(
                    file,
                    format!("{pat}.port"),
                    format!("port {} is declared twice", p.port),
                );
            }
            if let Some(protocol) = parse_protocol(file, &format!("{pat}.protocol"), p.protocol, c)
            {
                ports.push(ServicePort {
                    port: p.port,
                    target_port,
                    protocol,
                });
            }
        }
        for (j, e) in s.endpoints.iter().enumerate() {
            let field = format!("{at}.endpoints[{j}]");
            let Some(w) = e.split_once('/').and_then(|(ns, n)| reg.get(ns, n)) else {
                c.push(
                    file,
                    field,
                    format!("{e:?} is not a workload of the registry (namespace/name)"),
                );
                continue;
            };
            if w.namespace != s.namespace {
                c.push(
                    file,
                    field.clone(),
                    format!("endpoint {e} is not in the service's namespace"),
                );
            }
            for p in &ports {
                if w.port(p.target_port).is_none() {
                    c.push(
                        file,
                        field.clone(),
                        format!("endpoint {e} has no port {} (targetPort)", p.target_port),
                    );
                }
            }
        }
        if c.problems.len() == before {
            reg.services.push(ServiceEntry {
                name: s.name,
                namespace: s.namespace,
                ports,
                endpoints: s.endpoints,
            });
        }
    }
}

/// Outbound and upstream listeners act as their workload for whoever connects: refuse a
/// non-loopback address unless `rampart.allowNonLoopbackOutbound` says it is intended.
fn check_outbound_loopback(reg: &Registry, c: &mut Collector) {
    let why = |a: &SocketAddr| {
        format!(
            "{a} is not a loopback address: anyone who can reach it would call the mesh as \
             this workload; use 127.0.0.1/[::1], or set rampart.allowNonLoopbackOutbound: \
             true in {MESH_FILE} if that is intended"
        )
    };
    for (i, w) in reg.workloads.iter().enumerate() {
        if let Some(a) = w.proxy.outbound
            && !a.ip().is_loopback()
        {
            c.push(
                WORKLOADS_FILE,
                format!("workloads[{i}].proxy.outbound"),
                why(&a),
            );
        }
        for (j, u) in w.upstreams.iter().enumerate() {
            if !u.listen.ip().is_loopback() {
                c.push(
                    WORKLOADS_FILE,
                    format!("workloads[{i}].upstreams[{j}].listen"),
                    why(&u.listen),
                );
            }
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawLocal {
    #[serde(default)]
    ca: Option<RawCa>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    jwks_refresh: Option<String>,
    #[serde(default)]
    jwks_ca_file: Option<PathBuf>,
    #[serde(default)]
    allow_non_loopback_outbound: bool,
    #[serde(default)]
    allow_remote_admin: bool,
    #[serde(default)]
    compliance_policy: Option<String>,
    #[serde(default)]
    crl_unknown_status: Option<String>,
    #[serde(default)]
    workload_network: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawCa {
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    metrics: Option<String>,
    #[serde(default, rename = "certTTL")]
    cert_ttl: Option<String>,
    #[serde(default, rename = "maxCertTTL")]
    max_cert_ttl: Option<String>,
}

fn parse_local(file: &str, value: &serde_json::Value, c: &mut Collector) -> LocalSettings {
    let raw_value = value.get("rampart").cloned().unwrap_or_default();
    let mut out = LocalSettings {
        raw: raw_value.clone(),
        ..LocalSettings::default()
    };
    if raw_value.is_null() {
        return out;
    }
    let raw: RawLocal = match serde_path_to_error::deserialize(raw_value) {
        Ok(r) => r,
        Err(e) => {
            c.push(
                file,
                format!("rampart.{}", e.path()),
                e.into_inner().to_string(),
            );
            return out;
        }
    };
    out.state_dir = raw.state_dir;
    out.allow_non_loopback_outbound = raw.allow_non_loopback_outbound;
    out.allow_remote_admin = raw.allow_remote_admin;
    out.jwks_ca_file = raw.jwks_ca_file;
    if let Some(v) = raw.crl_unknown_status {
        match v.parse() {
            Ok(u) => out.crl_unknown_status = u,
            Err(e) => c.push(file, "rampart.crlUnknownStatus", e),
        }
    }
    if let Some(v) = raw.workload_network {
        match v.parse() {
            Ok(n) => out.workload_network = n,
            Err(e) => c.push(file, "rampart.workloadNetwork", e),
        }
    }
    if let Some(v) = raw.compliance_policy {
        match rampart_certs::tls::CompliancePolicy::parse(&v) {
            Ok(p) => out.compliance_policy = p,
            Err(e) => c.push(file, "rampart.compliancePolicy", e),
        }
    }
    if let Some(v) = raw.jwks_refresh {
        match rampart_authz::parse_duration(&v) {
            Ok(d) if d >= Duration::from_millis(100) => out.jwks_refresh = Some(d),
            Ok(_) => c.push(file, "rampart.jwksRefresh", "must be at least 100ms"),
            Err(e) => c.push(file, "rampart.jwksRefresh", e),
        }
    }
    if let Some(ca) = raw.ca {
        out.ca_listen = ca
            .listen
            .as_deref()
            .and_then(|s| c.addr(file, "rampart.ca.listen", s));
        out.ca_metrics = ca
            .metrics
            .as_deref()
            .and_then(|s| c.addr(file, "rampart.ca.metrics", s));
        for (field, v, slot) in [
            ("rampart.ca.certTTL", ca.cert_ttl, &mut out.cert_ttl),
            (
                "rampart.ca.maxCertTTL",
                ca.max_cert_ttl,
                &mut out.max_cert_ttl,
            ),
        ] {
            if let Some(v) = v {
                match parse_ttl(&v) {
                    Ok(d) => *slot = Some(d),
                    Err(e) => c.push(file, field, e),
                }
            }
        }
    }
    out
}

/// Go durations plus a `d` (days) unit, as Istio's `--max-workload-cert-ttl` flags write them.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    if let Some(days) = s.strip_suffix('d') {
        return days
            .parse::<u64>()
            .map(|d| Duration::from_secs(d * 86_400))
            .map_err(|_| format!("invalid duration {s:?}"));
    }
    rampart_authz::parse_duration(s)
}

/// `mesh.yaml`: the policy settings, the `rampart:` section, the trust domain and aliases.
fn parse_mesh(
    file: &str,
    mesh_text: &str,
    c: &mut Collector,
) -> (
    Option<MeshConfig>,
    LocalSettings,
    Option<TrustDomain>,
    Vec<TrustDomain>,
) {
    let mesh = match MeshConfig::from_yaml(mesh_text) {
        Ok(m) => Some(m),
        Err(e) => {
            c.push(file, "", e.to_string());
            None
        }
    };
    let local = parse_yaml(file, mesh_text, c)
        .map(|v| parse_local(file, &v, c))
        .unwrap_or_default();
    let mut trust_domain = None;
    let mut aliases = Vec::new();
    if let Some(m) = &mesh {
        match TrustDomain::new(&m.trust_domain) {
            Ok(td) => trust_domain = Some(td),
            Err(e) => c.push(file, "trustDomain", e.to_string()),
        }
        for (i, a) in m.trust_domain_aliases.iter().enumerate() {
            match TrustDomain::new(a) {
                Ok(td) => aliases.push(td),
                Err(e) => c.push(file, format!("trustDomainAliases[{i}]"), e.to_string()),
            }
        }
    }
    (mesh, local, trust_domain, aliases)
}

impl MeshFolder {
    /// Build and check a snapshot from texts rather than a folder (what a proxy fed by a
    /// control plane does with the resources it was sent): `mesh_text` as `mesh.yaml`,
    /// `registry_text` as `workloads.yaml`, each `(name, text)` of `policies` as a policy
    /// file, and the referenced files' contents as read by the sender. The same checks as
    /// [`MeshFolder::load`]; problems name `mesh_file`, `registry_file` and the policy names.
    pub fn from_parts(
        dir: PathBuf,
        (mesh_file, mesh_text): (&str, &str),
        (registry_file, registry_text): (&str, &str),
        policies: &[(String, String)],
        files: ReferencedFiles,
    ) -> Result<MeshFolder, Vec<Problem>> {
        let mut c = Collector {
            problems: Vec::new(),
        };
        let (mesh, local, trust_domain, aliases) = parse_mesh(mesh_file, mesh_text, &mut c);
        let registry =
            parse_registry_into(registry_file, registry_text, local.workload_network, &mut c);
        if let Some(reg) = &registry
            && !local.allow_non_loopback_outbound
        {
            check_outbound_loopback(reg, &mut c);
        }
        let mut resources = Vec::new();
        for (name, text) in policies {
            let r = rampart_authz::load_str(name, text);
            for p in r.problems {
                c.push(
                    &p.file,
                    document_field(p.doc_index, &p.field_path),
                    p.reason,
                );
            }
            resources.extend(r.resources);
        }
        match (mesh, trust_domain, registry) {
            (Some(mesh), Some(trust_domain), Some(registry)) if c.problems.is_empty() => {
                Ok(MeshFolder {
                    dir,
                    mesh,
                    trust_domain,
                    trust_domain_aliases: aliases,
                    local,
                    registry,
                    resources,
                    files,
                })
            }
            _ => Err(c.problems),
        }
    }

    /// Load and check the folder: `mesh.yaml` (optional; defaults as Istio), `workloads.yaml`
    /// (required), and every other `*.yaml`/`*.yml` below the folder as policy. Any problem
    /// refuses the whole folder (the caller keeps its last good one).
    pub fn load(dir: &Path) -> Result<MeshFolder, Vec<Problem>> {
        let mut c = Collector {
            problems: Vec::new(),
        };
        let dir_s = dir.display().to_string();
        if !dir.is_dir() {
            c.push(&dir_s, "", "is not a directory");
            return Err(c.problems);
        }
        // mesh.yaml
        let mesh_path = dir.join(MESH_FILE);
        let mesh_text = match std::fs::read_to_string(&mesh_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Without mesh.yaml the defaults apply, and a `mesh.yml` beside it would be
                // read as a policy file: its trust domain and settings silently lost.
                if dir.join("mesh.yml").is_file() {
                    c.push(
                        "mesh.yml",
                        "",
                        "the mesh config is read from mesh.yaml only; rename this file",
                    );
                }
                String::new()
            }
            Err(e) => {
                c.push(MESH_FILE, "", format!("cannot read: {e}"));
                String::new()
            }
        };
        let (mesh, local, trust_domain, aliases) = parse_mesh(MESH_FILE, &mesh_text, &mut c);
        // workloads.yaml
        let registry = match std::fs::read_to_string(dir.join(WORKLOADS_FILE)) {
            Ok(t) => parse_registry_into(WORKLOADS_FILE, &t, local.workload_network, &mut c),
            Err(e) => {
                c.push(WORKLOADS_FILE, "", format!("cannot read: {e}"));
                None
            }
        };
        if let Some(reg) = &registry
            && !local.allow_non_loopback_outbound
        {
            check_outbound_loopback(reg, &mut c);
        }
        // policy
        let mut policy_files = Vec::new();
        collect_yaml(dir, dir, &mut policy_files, &mut c);
        let mut resources = Vec::new();
        for f in &policy_files {
            let rel = f.strip_prefix(dir).unwrap_or(f).display().to_string();
            let text = match std::fs::read_to_string(f) {
                Ok(t) => t,
                Err(e) => {
                    c.push(&rel, "", format!("cannot read: {e}"));
                    continue;
                }
            };
            let r = rampart_authz::load_str(&rel, &text);
            for p in r.problems {
                c.push(
                    &p.file,
                    document_field(p.doc_index, &p.field_path),
                    p.reason,
                );
            }
            resources.extend(r.resources);
        }
        match (mesh, trust_domain, registry) {
            (Some(mesh), Some(trust_domain), Some(registry)) if c.problems.is_empty() => {
                let mut folder = MeshFolder {
                    dir: dir.to_path_buf(),
                    mesh,
                    trust_domain,
                    trust_domain_aliases: aliases,
                    local,
                    registry,
                    resources,
                    files: ReferencedFiles::default(),
                };
                folder.files = ReferencedFiles::read(&folder);
                Ok(folder)
            }
            _ => Err(c.problems),
        }
    }

    /// Only the folder's workload registry (`workloads.yaml`, with the network default of
    /// `mesh.yaml` as far as that file reads), with the same checks as [`MeshFolder::load`]
    /// for `workloads.yaml` and none of the policy's or `mesh.yaml`'s. For tools that only
    /// need to find the proxies (`rampart mtls-report`) and must keep working while an edit
    /// elsewhere in the folder is refused: the proxies then still serve their last good
    /// configuration, and that is what such a tool asks.
    pub fn load_registry(dir: &Path) -> Result<Registry, Vec<Problem>> {
        let mut c = Collector {
            problems: Vec::new(),
        };
        if !dir.is_dir() {
            c.push(&dir.display().to_string(), "", "is not a directory");
            return Err(c.problems);
        }
        let mesh_text = std::fs::read_to_string(dir.join(MESH_FILE)).unwrap_or_default();
        let mut mesh_problems = Collector {
            problems: Vec::new(),
        };
        let (_, local, _, _) = parse_mesh(MESH_FILE, &mesh_text, &mut mesh_problems);
        let registry = match std::fs::read_to_string(dir.join(WORKLOADS_FILE)) {
            Ok(t) => parse_registry_into(WORKLOADS_FILE, &t, local.workload_network, &mut c),
            Err(e) => {
                c.push(WORKLOADS_FILE, "", format!("cannot read: {e}"));
                None
            }
        };
        match registry {
            Some(r) if c.problems.is_empty() => Ok(r),
            _ => Err(c.problems),
        }
    }

    /// Local files standing in for the `jwksUri`s of RequestAuthentications (offline use):
    /// `rampart.jwks` in `mesh.yaml` maps a URI to a file relative to the folder; without an
    /// entry, `jwks/<host>.json` is used when it exists (`https://issuer.example/keys` →
    /// `jwks/issuer.example.json`). Istio's validation only accepts http(s) URIs in policy.
    /// A rule with neither `jwks` nor `jwksUri` gets its key set by OpenID discovery of its
    /// issuer: mapped by the issuer in `rampart.jwks` (not by its configuration's URL, which
    /// a `jwksUri` could name too),
    /// or `jwks/<issuer host>.json` for an issuer that is a bare host (one with a path, such
    /// as a Keycloak realm's, shares its host with other issuers: it needs an explicit
    /// mapping); keyed as the engine asks ([`rampart_authz::OPENID_KEY_PREFIX`]).
    pub fn jwks_files(&self) -> BTreeMap<String, PathBuf> {
        let mut out = BTreeMap::new();
        let mapped = |k: &str| {
            self.local
                .raw
                .get("jwks")
                .and_then(|m| m.get(k))
                .and_then(|v| v.as_str())
        };
        let host_of = |uri: &str| -> String {
            uri.split_once("://")
                .map(|(_, rest)| rest)
                .unwrap_or(uri)
                .split(['/', ':', '?'])
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        for r in &self.resources {
            let Resource::RequestAuthentication(ra) = r else {
                continue;
            };
            for rule in ra.spec.jwt_rules.iter().flatten() {
                let inline = rule.jwks.as_deref().is_some_and(|j| !j.is_empty());
                let (key, names, host) = match (&rule.jwks_uri, &rule.issuer) {
                    (Some(u), _) if !u.is_empty() => (u.clone(), vec![u.clone()], Some(host_of(u))),
                    (_, Some(i)) if !inline => {
                        let Some(doc) = rampart_authz::openid_discovery_uri(i) else {
                            continue;
                        };
                        let bare = i
                            .split_once("://")
                            .is_some_and(|(_, rest)| !rest.trim_end_matches('/').contains('/'));
                        (
                            format!("{}{doc}", rampart_authz::OPENID_KEY_PREFIX),
                            vec![i.clone(), format!("{}/", i.trim_end_matches('/'))],
                            bare.then(|| host_of(i)),
                        )
                    }
                    _ => continue,
                };
                if let Some(p) = names.iter().find_map(|n| mapped(n)) {
                    out.insert(key, self.dir.join(p));
                    continue;
                }
                if let Some(host) = host.filter(|h| !h.is_empty()) {
                    let candidate = self.dir.join("jwks").join(format!("{host}.json"));
                    if candidate.is_file() {
                        out.insert(key, candidate);
                    }
                }
            }
        }
        out
    }

    /// A fingerprint of every file the folder's configuration is made of (names, sizes,
    /// modification times): when it changes, the folder is reloaded.
    pub fn fingerprint(dir: &Path) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut files = Vec::new();
        walk(dir, &mut files);
        files.sort();
        for f in files {
            f.hash(&mut h);
            if let Ok(m) = std::fs::metadata(&f) {
                m.len().hash(&mut h);
                if let Ok(t) = m.modified() {
                    t.hash(&mut h);
                }
            }
            // Content too: editors may keep size and mtime within one tick.
            if let Ok(bytes) = std::fs::read(&f) {
                bytes.hash(&mut h);
            }
        }
        h.finish()
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            walk(&p, out);
        } else if name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json") {
            out.push(p);
        }
    }
}

fn collect_yaml(root: &Path, dir: &Path, out: &mut Vec<PathBuf>, c: &mut Collector) {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            c.push(&dir.display().to_string(), "", format!("cannot list: {e}"));
            return;
        }
    };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            collect_yaml(root, &p, out, c);
        } else if (name.ends_with(".yaml") || name.ends_with(".yml"))
            && !(dir == root && (name == MESH_FILE || name == WORKLOADS_FILE))
            // Refused by name when there is no mesh.yaml (`load`): not read as a policy too.
            && !(dir == root && name == "mesh.yml" && !root.join(MESH_FILE).exists())
        {
            out.push(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry of 12,000 workloads loads (the parser's default node cap would refuse it).
    #[test]
    fn large_registries_load() {
        let mut text = String::from("workloads:\n");
        for i in 0..12_000 {
            text.push_str(&format!(
                "- {{name: w{i}, namespace: ns{}, labels: {{app: a{i}, version: v1}}, ports: [{{port: 80, protocol: http, app: '127.0.0.1:8080', inbound: '127.2.{}.{}:15006'}}, {{port: 81, app: '127.0.0.1:8081', inbound: '127.3.{}.{}:15006'}}]}}\n",
                i % 100,
                i / 256,
                i % 256,
                i / 256,
                i % 256
            ));
        }
        let reg = parse_registry(WORKLOADS_FILE, &text).unwrap();
        assert_eq!(reg.workloads.len(), 12_000);
    }

    const REG: &str = r#"
workloads:
- name: backend
  namespace: api
  labels: {app: backend}
  ports:
  - {port: 8080, protocol: http, app: "127.0.0.1:18080", inbound: "127.0.0.1:15081"}
  - {port: 9000, app: "127.0.0.1:19000", inbound: "127.0.0.1:15082"}
  proxy: {admin: "127.0.0.1:15000"}
- name: frontend
  namespace: web
  serviceAccount: fe
  ports:
  - {port: 80, protocol: http, app: "127.0.0.1:18081", inbound: "127.0.0.1:15091"}
  proxy: {outbound: "127.0.0.1:15001"}
  upstreams:
  - {service: backend.api, port: 8080, listen: "127.0.0.1:16001"}
"#;

    #[test]
    fn yaml_11_boolean_spellings_are_names() {
        let text = "workloads:\n- name: y\n  namespace: n\n  labels: {app: on}\n  ports:\n  - {port: 80, app: \"127.0.0.1:18080\", inbound: \"127.0.0.1:15080\"}\n";
        let r = parse_registry("workloads.yaml", text).unwrap();
        let w = r.get("n", "y").expect("workload n/y");
        assert_eq!(w.labels.get("app").map(String::as_str), Some("on"));
    }

    #[test]
    fn registry_parses_and_resolves_every_host_form() {
        let r = parse_registry("workloads.yaml", REG).unwrap();
        assert_eq!(r.workloads.len(), 2);
        let fe = r.get("web", "frontend").unwrap();
        assert_eq!(fe.service_account, "fe");
        assert_eq!(r.get("api", "backend").unwrap().service_account, "backend");
        assert_eq!(r.workloads[0].ports[1].protocol, PortProtocol::Tcp);
        for host in [
            "backend.api:8080",
            "backend.api.svc:8080",
            "backend.api.svc.cluster.local:8080",
            "BACKEND.api.svc.cluster.local.:8080",
        ] {
            let (w, p) = r.resolve(host, "web").unwrap_or_else(|| panic!("{host}"));
            assert_eq!((w.name.as_str(), p.port), ("backend", 8080));
        }
        assert!(r.resolve("backend:8080", "api").is_some());
        assert!(
            r.resolve("backend:8080", "web").is_none(),
            "other namespace"
        );
        assert!(
            r.resolve("backend.api", "web").is_none(),
            "port 80 not declared"
        );
        assert_eq!(r.resolve("frontend.web", "api").unwrap().1.port, 80);
        assert!(
            r.resolve("backend.api.svc.other.local:8080", "web")
                .is_none()
        );
        assert!(r.resolve("backend.api:99x", "web").is_none());
        // A trailing dot makes a name absolute, as in DNS: only the full form resolves.
        for host in [
            "backend.api.:8080",
            "backend.api.svc.:8080",
            "backend.:8080",
            "backend..:8080",
        ] {
            assert!(r.resolve(host, "api").is_none(), "{host}");
        }
        let td = TrustDomain::new("cluster.local").unwrap();
        assert_eq!(
            fe.spiffe_id(&td).to_string(),
            "spiffe://cluster.local/ns/web/sa/fe"
        );
    }

    const SERVICES: &str = r#"
services:
- name: api
  namespace: api
  ports:
  - {port: 80, targetPort: 8080, protocol: http}
  - {port: 9000}
  endpoints: [api/backend]
"#;

    /// `services:` in the registry: a service port leads to an endpoint's target port with
    /// the service's host and port for the SNI; the form serializes back and parses again;
    /// without services a workload is its own service (unchanged).
    #[test]
    fn registry_services_resolve_and_round_trip() {
        let text = format!("{REG}{SERVICES}");
        let r = parse_registry("workloads.yaml", &text).unwrap();
        assert_eq!(r.services.len(), 1);
        let t = r
            .resolve_target("api.api.svc.cluster.local:80", "web")
            .unwrap();
        assert_eq!(
            (t.workload.key().as_str(), t.port.port),
            ("api/backend", 8080)
        );
        assert_eq!(t.port.inbound, "127.0.0.1:15081".parse().unwrap());
        assert_eq!(
            (t.service_host().as_str(), t.service_port),
            ("api.api.svc.cluster.local", 80)
        );
        assert_eq!(
            r.resolve_target("api.api:9000", "web").unwrap().port.port,
            9000
        );
        assert!(r.resolve_target("api.api:8080", "web").is_none());
        // The workload itself still resolves as its own service.
        let w = r.resolve_target("backend.api:8080", "web").unwrap();
        assert!(w.service.is_none());
        assert_eq!(w.service_host(), "backend.api.svc.cluster.local");
        // Serialized services parse back to the same entries.
        let json = serde_json::to_value(&r).unwrap();
        let again = format!("{REG}services: {}\n", json["services"]);
        assert_eq!(
            parse_registry("workloads.yaml", &again).unwrap().services,
            r.services
        );
        // No services: nothing serialized, the folder form unchanged.
        let plain = parse_registry("workloads.yaml", REG).unwrap();
        assert!(
            serde_json::to_value(&plain)
                .unwrap()
                .get("services")
                .is_none()
        );
        for (bad, field) in [
            (
                "services: [{name: x, namespace: api, endpoints: [api/nope]}]",
                "services[0].endpoints[0]",
            ),
            (
                "services: [{name: x, namespace: api, ports: [{port: 1}], endpoints: [api/backend]}]",
                "services[0].endpoints[0]",
            ),
            (
                "services: [{name: x, namespace: web, endpoints: [api/backend]}]",
                "services[0].endpoints[0]",
            ),
            (
                "services: [{name: x, namespace: api, ports: [{port: 1, protocol: smtp}]}]",
                "services[0].ports[0].protocol",
            ),
            ("services: [{name: X, namespace: api}]", "services[0].name"),
            (
                "services: [{name: x, namespace: api}, {name: x, namespace: api}]",
                "services[1].name",
            ),
            (
                "services: [{name: x, namespace: api, colour: red}]",
                "services[0]",
            ),
        ] {
            let p = parse_registry("workloads.yaml", &format!("{REG}{bad}\n")).expect_err(bad);
            assert!(p.iter().any(|p| p.field.starts_with(field)), "{bad}: {p:?}");
        }
    }

    #[test]
    fn registry_problems_name_file_and_field() {
        let cases = [
            (
                "workloads: [{name: Bad, namespace: a}]",
                "workloads[0].name",
            ),
            (
                "workloads: [{name: a, namespace: a, ports: [{port: 1, app: nope, inbound: \"127.0.0.1:1\"}]}]",
                "workloads[0].ports[0].app",
            ),
            (
                "workloads: [{name: a, namespace: a, ports: [{port: 1, protocol: smtp, app: \"127.0.0.1:2\", inbound: \"127.0.0.1:1\"}]}]",
                "workloads[0].ports[0].protocol",
            ),
            (
                "workloads: [{name: a, namespace: a, colour: red}]",
                "workloads[0]",
            ),
            (
                "workloads: [{name: a, namespace: a, ports: [{port: 1, app: \"127.0.0.1:2\", inbound: \"127.0.0.1:1\"}]}, {name: b, namespace: a, ports: [{port: 1, app: \"127.0.0.1:3\", inbound: \"127.0.0.1:1\"}]}]",
                "workloads[1].ports[0].inbound",
            ),
            (
                "workloads: [{name: a, namespace: a, upstreams: [{service: zz.a, port: 1, listen: \"127.0.0.1:5\"}]}]",
                "workloads[0].upstreams[0].service",
            ),
            (
                "workloads: [{name: a, namespace: a}, {name: a, namespace: a}]",
                "workloads[1].name",
            ),
            ("workloads: [", ""),
        ];
        for (text, field) in cases {
            let problems = parse_registry("workloads.yaml", text).expect_err(text);
            assert!(
                problems
                    .iter()
                    .any(|p| p.file == "workloads.yaml" && p.field.starts_with(field)),
                "{text}: {problems:?}"
            );
        }
    }

    /// A jwtRule found by OpenID discovery is read from a local file offline: mapped by
    /// its issuer in `rampart.jwks`, or `jwks/<issuer host>.json` for a bare-host issuer;
    /// keyed as the engine asks (`openid:` and the configuration's URL). An issuer with no
    /// mapping and no such file is left to be fetched, and so is one with a path whose
    /// host has a file (another issuer's keys).
    #[test]
    fn discovered_issuers_map_to_local_key_sets() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(WORKLOADS_FILE), REG).unwrap();
        std::fs::create_dir_all(d.path().join("policy")).unwrap();
        std::fs::create_dir_all(d.path().join("jwks")).unwrap();
        std::fs::write(
            d.path().join("policy/ra.yaml"),
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: api}\nspec:\n  jwtRules:\n  - {issuer: 'https://a.example/t'}\n  - {issuer: 'https://b.example'}\n  - {issuer: 'https://c.example'}\n  - {issuer: 'https://b.example/realm'}\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join(MESH_FILE),
            "rampart:\n  jwks: {'https://a.example/t': a.json}\n",
        )
        .unwrap();
        std::fs::write(d.path().join("a.json"), "A").unwrap();
        std::fs::write(d.path().join("jwks/b.example.json"), "B").unwrap();
        let f = MeshFolder::load(d.path()).unwrap();
        let doc = |i: &str| format!("openid:{i}/.well-known/openid-configuration");
        assert_eq!(
            f.files.jwks.get(&doc("https://a.example/t")),
            Some(&Ok("A".to_owned()))
        );
        assert_eq!(
            f.files.jwks.get(&doc("https://b.example")),
            Some(&Ok("B".to_owned()))
        );
        assert_eq!(f.files.jwks.get(&doc("https://c.example")), None);
        // An issuer with a path shares its host with others: no host file for it.
        assert_eq!(f.files.jwks.get(&doc("https://b.example/realm")), None);
        assert_eq!(f.files.jwks.len(), 2);
    }

    #[test]
    fn a_mesh_yml_without_mesh_yaml_is_refused_naming_the_rename() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(WORKLOADS_FILE), REG).unwrap();
        std::fs::write(d.path().join("mesh.yml"), "trustDomain: example.org\n").unwrap();
        let p = MeshFolder::load(d.path()).unwrap_err();
        assert!(
            p.iter()
                .any(|p| p.file == "mesh.yml" && p.reason.contains("read from mesh.yaml only")),
            "{p:?}"
        );
        // Said once: the file is not also read as a policy missing its apiVersion.
        assert_eq!(p.len(), 1, "{p:?}");
        // Its twin: with mesh.yaml there, the folder loads (mesh.yml is then a policy file,
        // here an empty one).
        std::fs::write(d.path().join(MESH_FILE), "trustDomain: example.org\n").unwrap();
        std::fs::write(d.path().join("mesh.yml"), "").unwrap();
        let f = MeshFolder::load(d.path()).unwrap();
        assert_eq!(f.trust_domain.as_str(), "example.org");
    }

    #[test]
    fn compliance_policy_pqc_is_read_and_unknown_values_refused() {
        use rampart_certs::tls::CompliancePolicy;
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(WORKLOADS_FILE), REG).unwrap();
        let f = MeshFolder::load(d.path()).unwrap();
        assert_eq!(f.local.compliance_policy, CompliancePolicy::Default);
        std::fs::write(
            d.path().join(MESH_FILE),
            "rampart: {compliancePolicy: pqc}\n",
        )
        .unwrap();
        let f = MeshFolder::load(d.path()).unwrap();
        assert_eq!(f.local.compliance_policy, CompliancePolicy::Pqc);
        std::fs::write(
            d.path().join(MESH_FILE),
            "rampart: {compliancePolicy: fips-140-2}\n",
        )
        .unwrap();
        let p = MeshFolder::load(d.path()).unwrap_err();
        assert!(
            p.iter().any(|p| p.file == MESH_FILE
                && p.field == "rampart.compliancePolicy"
                && p.reason.contains("pqc")),
            "{p:?}"
        );
    }

    #[test]
    fn folder_loads_policy_and_refuses_bad_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join(MESH_FILE),
            "trustDomain: example.org\ntrustDomainAliases: [old.example]\nrampart: {ca: {listen: \"127.0.0.1:15012\", certTTL: 1h, maxCertTTL: 90d}, stateDir: var/rampart}\n",
        )
        .unwrap();
        std::fs::write(d.path().join(WORKLOADS_FILE), REG).unwrap();
        std::fs::create_dir(d.path().join("policy")).unwrap();
        std::fs::write(
            d.path().join("policy/pa.yaml"),
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n",
        )
        .unwrap();
        let f = MeshFolder::load(d.path()).unwrap();
        assert_eq!(f.trust_domain.to_string(), "example.org");
        assert_eq!(f.trust_domain_aliases.len(), 1);
        assert_eq!(f.resources.len(), 1);
        assert_eq!(f.local.cert_ttl, Some(Duration::from_secs(3600)));
        assert_eq!(f.local.max_cert_ttl, Some(Duration::from_secs(90 * 86400)));
        assert_eq!(f.local.state_dir, Some(PathBuf::from("var/rampart")));

        std::fs::write(
            d.path().join("policy/bad.yaml"),
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: api}\nspec: {action: MAYBE}\n",
        )
        .unwrap();
        let p = MeshFolder::load(d.path()).unwrap_err();
        assert!(p.iter().any(|p| p.file.contains("bad.yaml")), "{p:?}");
        std::fs::remove_file(d.path().join("policy/bad.yaml")).unwrap();
        std::fs::write(d.path().join(MESH_FILE), "trustDomain: \"not a domain\"\n").unwrap();
        let p = MeshFolder::load(d.path()).unwrap_err();
        assert!(
            p.iter()
                .any(|p| p.file == MESH_FILE && p.field == "trustDomain"),
            "{p:?}"
        );
        std::fs::write(d.path().join(MESH_FILE), "rampart: {ca: {certTTL: soon}}\n").unwrap();
        let p = MeshFolder::load(d.path()).unwrap_err();
        assert!(p.iter().any(|p| p.field == "rampart.ca.certTTL"), "{p:?}");
    }

    /// `rampart.workloadNetwork: pod`: loopback listeners are per workload (two Pods may
    /// both use 127.0.0.1:15001), never within one workload, and non-loopback addresses
    /// stay unique mesh-wide. `host` (the default) keeps every address unique.
    #[test]
    fn workload_network_scopes_loopback_addresses() {
        let two = |a: &str, b: &str| {
            format!(
                "workloads:\n\
                 - {{name: a, namespace: ns, ports: [{{port: 80, app: '127.0.0.1:8080', inbound: '{a}'}}], proxy: {{outbound: '127.0.0.1:15001', admin: '127.0.0.1:15000'}}}}\n\
                 - {{name: b, namespace: ns, ports: [{{port: 80, app: '127.0.0.1:8080', inbound: '{b}'}}], proxy: {{outbound: '127.0.0.1:15001', admin: '127.0.0.1:15000'}}}}\n"
            )
        };
        let shared = two("10.0.0.1:8080", "10.0.0.2:8080");
        let host = parse_registry_in("workloads.yaml", &shared, WorkloadNetwork::Host)
            .expect_err("one host: 127.0.0.1:15001 twice");
        assert!(
            host.iter().any(|p| p.field == "workloads[1].proxy.outbound"
                && p.reason
                    .contains("already used by workloads[0].proxy.outbound")),
            "{host:?}"
        );
        let pods = parse_registry_in("workloads.yaml", &shared, WorkloadNetwork::Pod)
            .unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(pods.workloads.len(), 2);
        // One Pod IP used by two workloads: refused on either network.
        let clash = two("10.0.0.1:8080", "10.0.0.1:8080");
        for network in [WorkloadNetwork::Host, WorkloadNetwork::Pod] {
            let p = parse_registry_in("workloads.yaml", &clash, network).expect_err("one Pod IP");
            assert!(
                p.iter().any(|p| p.field == "workloads[1].ports[0].inbound"),
                "{network:?}: {p:?}"
            );
        }
        // Within one workload, loopback addresses still clash.
        let own = "workloads:\n- {name: a, namespace: ns, proxy: {outbound: '127.0.0.1:15001', admin: '127.0.0.1:15001'}}\n";
        let p = parse_registry_in("workloads.yaml", own, WorkloadNetwork::Pod)
            .expect_err("outbound and admin on one address");
        assert!(
            p.iter().any(|p| p.field == "workloads[0].proxy.admin"),
            "{p:?}"
        );

        // From mesh.yaml, and a bad value named.
        let folder = |mesh: &str| {
            MeshFolder::from_parts(
                PathBuf::from("t"),
                ("mesh.yaml", mesh),
                ("workloads.yaml", &shared),
                &[],
                ReferencedFiles::default(),
            )
        };
        let ok = folder("trustDomain: cluster.local\nrampart: {workloadNetwork: pod}\n")
            .unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(ok.local.workload_network, WorkloadNetwork::Pod);
        assert!(folder("trustDomain: cluster.local\n").is_err());
        let bad =
            folder("trustDomain: cluster.local\nrampart: {workloadNetwork: vm}\n").expect_err("vm");
        assert!(
            bad.iter().any(|p| p.file == "mesh.yaml"
                && p.field == "rampart.workloadNetwork"
                && p.reason.contains("\"vm\" is not host or pod")),
            "{bad:?}"
        );
    }
}
