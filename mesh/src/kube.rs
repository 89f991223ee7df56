//! Kubernetes objects to the mesh model (DESIGN §6, issue #14): the pure half of the
//! Kubernetes [`crate::ConfigSource`]. The watching (kube-runtime), Events and metrics live
//! in `rampart-k8s`; this module takes the objects as JSON (what the API server serves) and
//! knows nothing of clients.
//!
//! - **Policy**: `security.istio.io` v1 and v1beta1 PeerAuthentication, RequestAuthentication
//!   and AuthorizationPolicy, parsed and validated exactly as the folder's policy YAML. The
//!   API server serves one object at both versions: an object seen at both is one object
//!   (kind, namespace, name), the newer view (higher `resourceVersion`, else v1) kept.
//! - **Registry**: a Pod is a workload `<namespace>/<pod-name>` (labels, service account,
//!   node, IP, phase). Sidecar convention (no iptables): for every port `P` →
//!   `targetPort T` of a Service selecting the Pod, the workload has port `T` with
//!   `app = 127.0.0.1:T` (the app listens on localhost) and `inbound = <podIP>:T` (the proxy
//!   listens on the Pod IP, where Istio clients dial, so Envoy sidecars and Rampart
//!   proxies interoperate). A Service is a registry service whose endpoints are its
//!   selected Running Pods with an IP (not host-network). Protocols are inferred as Istio does
//!   ([`infer_protocol`]).
//! - **Refusals**: an invalid object is left out alone ([`Refused`]: kind, namespace/name,
//!   resourceVersion, field, reason); every other object still applies.
//!
//! Mesh settings (trust domain, root namespace, ...) come from [`KubeSettings`] (the
//! command line), never from objects.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use rampart_authz::{MeshConfig, Resource};
use rampart_certs::{SpiffeId, TrustDomain};
use serde_json::Value;

use crate::{
    LocalSettings, MeshFolder, PortEntry, PortProtocol, Problem, ProxyEntry, ReferencedFiles,
    Registry, ServiceEntry, ServicePort, WorkloadEntry, WorkloadNetwork,
};

/// Pod annotation: the proxy's outbound HTTP-proxy listener (`127.0.0.1:15001`), overriding
/// [`KubeSettings::proxy_outbound`]; `none` for no outbound listener.
pub const ANNOTATION_OUTBOUND: &str = "proxy.rampart.io/outbound";
/// Pod annotation: the proxy's admin listener, overriding [`KubeSettings::proxy_admin`];
/// `none` for no admin listener.
pub const ANNOTATION_ADMIN: &str = "proxy.rampart.io/admin";

/// The mesh settings of Kubernetes mode (from the command line, not from objects).
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Trust-domain aliases.
    pub trust_domain_aliases: Vec<TrustDomain>,
    /// Policies in this namespace apply mesh-wide (Istio's default `istio-system`).
    pub root_namespace: String,
    /// Local settings (CA address, TTLs, compliance policy, ...).
    pub local: LocalSettings,
    /// Every Pod's outbound listener unless its [`ANNOTATION_OUTBOUND`] says otherwise.
    pub proxy_outbound: Option<SocketAddr>,
    /// Every Pod's admin listener unless its [`ANNOTATION_ADMIN`] says otherwise.
    pub proxy_admin: Option<SocketAddr>,
    /// The name of Istio's mesh config ConfigMap in the root namespace: `istio`, or a
    /// revisioned istiod's `istio-<revision>`.
    pub mesh_configmap: String,
}

impl KubeSettings {
    /// Istio's defaults for trust domain `td`: root namespace `istio-system`, outbound
    /// `127.0.0.1:15001`, admin `127.0.0.1:15000`, mesh config ConfigMap `istio`.
    pub fn new(td: TrustDomain) -> KubeSettings {
        KubeSettings {
            trust_domain: td,
            trust_domain_aliases: Vec::new(),
            root_namespace: "istio-system".into(),
            local: LocalSettings::default(),
            proxy_outbound: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15001)),
            proxy_admin: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000)),
            mesh_configmap: MESH_CONFIGMAP.0.into(),
        }
    }
}

/// The objects of one moment, as the API server serves them (JSON).
#[derive(Debug, Clone, Default)]
pub struct KubeObjects {
    /// `security.istio.io` v1 and v1beta1 objects of the three kinds (mixed).
    pub policies: Vec<Value>,
    /// core/v1 Pods.
    pub pods: Vec<Value>,
    /// core/v1 Services.
    pub services: Vec<Value>,
    /// core/v1 Namespaces.
    pub namespaces: Vec<Value>,
    /// The policy settings of Istio's mesh config (ConfigMap [`MESH_CONFIGMAP`], key `mesh`,
    /// in the root namespace): path normalization and extension providers. Its trust domain
    /// and root namespace are not read: [`KubeSettings`] (the CA's flags) decide those. `None`:
    /// Istio's defaults.
    pub mesh: Option<MeshConfig>,
}

/// Istio's mesh config ConfigMap in the root namespace (the default name: a revisioned
/// istiod reads `istio-<revision>`, [`KubeSettings::mesh_configmap`]), and its key holding
/// the MeshConfig.
pub const MESH_CONFIGMAP: (&str, &str) = ("istio", "mesh");

/// One object left out of the snapshot: which, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Refused {
    /// `apiVersion` as served (`security.istio.io/v1`, `v1`).
    pub api_version: String,
    /// `kind` (`AuthorizationPolicy`, `Pod`, ...).
    pub kind: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid` (what an Event regards).
    pub uid: String,
    /// `metadata.resourceVersion` (a refusal is reported once per version).
    pub resource_version: String,
    /// The field path (`spec.rules[0].from[0].source.principals[0]`), or empty.
    pub field: String,
    /// Why it is refused.
    pub reason: String,
}

impl Refused {
    /// `<Kind> <namespace>/<name>`: the "file" of the [`Problem`] form.
    pub fn object(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    /// As a [`Problem`] (file = `<Kind> <namespace>/<name>`).
    pub fn problem(&self) -> Problem {
        Problem {
            file: self.object(),
            field: self.field.clone(),
            reason: self.reason.clone(),
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.problem(), f)
    }
}

/// The snapshot built from the objects, and the objects left out of it.
#[derive(Debug, Clone)]
pub struct Conversion {
    /// The snapshot (everything valid).
    pub snapshot: MeshFolder,
    /// Every refused object (by kind, namespace, name), each alone.
    pub refused: Vec<Refused>,
}

/// The protocol of a Service port as Istio infers it ("protocol selection"): `appProtocol`
/// first (`kubernetes.io/h2c` is HTTP/2, `kubernetes.io/ws` HTTP, `kubernetes.io/wss`
/// TLS), else the port name; either is read as `<protocol>[-<suffix>]`, case-insensitive
/// (`grpc-web` whole). `http` is HTTP/1.1; `http2` HTTP/2; `grpc`, `grpc-web` gRPC;
/// everything else (`tcp`, `https`, `tls`, `mongo`, `redis`, `mysql`, unnamed, unknown) is
/// opaque TCP (Istio would sniff unnamed ports; Rampart does not). `None` for UDP and SCTP
/// ports, which are not proxied.
pub fn infer_protocol(
    transport: Option<&str>,
    name: Option<&str>,
    app_protocol: Option<&str>,
) -> Option<PortProtocol> {
    if matches!(transport, Some(t) if !t.eq_ignore_ascii_case("TCP")) {
        return None;
    }
    let raw = match app_protocol {
        Some("kubernetes.io/h2c") => return Some(PortProtocol::Http2),
        Some("kubernetes.io/ws") => return Some(PortProtocol::Http),
        Some("kubernetes.io/wss") => return Some(PortProtocol::Tcp),
        Some(a) => a,
        None => name.unwrap_or(""),
    };
    let lower = raw.to_ascii_lowercase();
    if lower.starts_with("grpc-web") {
        return Some(PortProtocol::Grpc);
    }
    let prefix = lower.split('-').next().unwrap_or("");
    Some(match prefix {
        "http" => PortProtocol::Http,
        "http2" => PortProtocol::Http2,
        "grpc" => PortProtocol::Grpc,
        _ => PortProtocol::Tcp,
    })
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn meta(v: &Value) -> (String, String, String, String) {
    (
        s(v, &["metadata", "namespace"]).unwrap_or("").to_string(),
        s(v, &["metadata", "name"]).unwrap_or("").to_string(),
        s(v, &["metadata", "uid"]).unwrap_or("").to_string(),
        s(v, &["metadata", "resourceVersion"])
            .unwrap_or("")
            .to_string(),
    )
}

fn refused(v: &Value, kind: &str, field: impl Into<String>, reason: impl Into<String>) -> Refused {
    let (namespace, name, uid, resource_version) = meta(v);
    Refused {
        api_version: s(v, &["apiVersion"]).unwrap_or("").to_string(),
        kind: s(v, &["kind"]).unwrap_or(kind).to_string(),
        namespace,
        name,
        uid,
        resource_version,
        field: field.into(),
        reason: reason.into(),
    }
}

/// [`refused`], boxed (the error of the per-object readers).
fn refusal(
    v: &Value,
    kind: &str,
    field: impl Into<String>,
    reason: impl Into<String>,
) -> Box<Refused> {
    Box::new(refused(v, kind, field, reason))
}

fn labels(v: &Value, path: &[&str]) -> BTreeMap<String, String> {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(x) => cur = x,
            None => return BTreeMap::new(),
        }
    }
    cur.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn rv_number(v: &Value) -> Option<u64> {
    s(v, &["metadata", "resourceVersion"])?.parse().ok()
}

/// The policies: v1/v1beta1 views merged, each parsed and validated alone.
fn policies(objs: &[Value], refused_out: &mut Vec<Refused>) -> Vec<Resource> {
    // (kind, namespace, name) -> the view kept
    let mut views: BTreeMap<(String, String, String), &Value> = BTreeMap::new();
    for o in objs {
        let (ns, name, _, _) = meta(o);
        let kind = s(o, &["kind"]).unwrap_or("").to_string();
        let key = (kind, ns, name);
        let keep_new = match views.get(&key) {
            None => true,
            Some(old) => match (rv_number(old), rv_number(o)) {
                (Some(a), Some(b)) if a != b => b > a,
                _ => s(o, &["apiVersion"]) == Some("security.istio.io/v1"),
            },
        };
        if keep_new {
            views.insert(key, o);
        }
    }
    let mut out = Vec::new();
    for ((kind, ns, name), o) in views {
        let text = serde_json::to_string(o).unwrap_or_default();
        let r = rampart_authz::load_str(&format!("{kind} {ns}/{name}"), &text);
        if let Some(p) = r.problems.first() {
            refused_out.push(refused(o, &kind, p.field_path.clone(), p.reason.clone()));
            out.extend(stand_in(o, &kind));
            continue;
        }
        if r.resources.is_empty() {
            refused_out.push(refused(
                o,
                &kind,
                "apiVersion",
                "not a security.istio.io PeerAuthentication, RequestAuthentication or AuthorizationPolicy",
            ));
        }
        out.extend(r.resources);
    }
    out
}

/// What takes a refused policy's place, so that refusing it never widens access (Istio's
/// admission webhook would have rejected the object and kept the version before it; nothing
/// here keeps versions): a refused ALLOW becomes allow-nothing and a refused DENY or CUSTOM
/// deny-all, a refused PeerAuthentication STRICT, each in the object's scope (its namespace
/// and, when that much of it reads, its `matchLabels` selector; else the whole namespace,
/// which is stricter). A refused AUDIT policy changes no decision, and a refused
/// RequestAuthentication leaves its tokens unverified, so requests carry no principal from
/// them (policies requiring one deny); neither gets a stand-in, nor does a policy that
/// could not have applied to a sidecar as written (`targetRef(s)`) or was a dry run. The
/// stand-in keeps the object's name, so a denial names the object to fix.
fn stand_in(o: &Value, kind: &str) -> Vec<Resource> {
    let (ns, name, _, _) = meta(o);
    if !is_dns_subdomain(&ns) || name.is_empty() || name.len() > 253 {
        return Vec::new();
    }
    let spec = o.get("spec");
    // A policy for gateways or waypoints (`targetRef`/`targetRefs`) never applies to a
    // sidecar, valid or not; a dry-run policy is never enforced: no stand-in for either
    // (one would deny where the object itself never could).
    let targeted = spec.is_some_and(|s| {
        s.get("targetRef").is_some_and(|t| !t.is_null())
            || s.get("targetRefs").is_some_and(|t| !t.is_null())
    });
    let dry_run = s(o, &["metadata", "annotations", "istio.io/dry-run"])
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if targeted || dry_run {
        return Vec::new();
    }
    let labels = spec
        .and_then(|s| s.get("selector"))
        .and_then(|s| s.get("matchLabels"))
        .and_then(Value::as_object)
        .filter(|m| m.iter().all(|(k, v)| !k.is_empty() && v.is_string()))
        .cloned();
    let mut new_spec = serde_json::Map::new();
    if let Some(l) = labels {
        new_spec.insert("selector".into(), serde_json::json!({ "matchLabels": l }));
    }
    match kind {
        "AuthorizationPolicy" => {
            let action = spec
                .and_then(|s| s.get("action"))
                .and_then(Value::as_str)
                .unwrap_or("ALLOW");
            match action {
                "AUDIT" => return Vec::new(),
                "DENY" | "CUSTOM" => {
                    new_spec.insert("action".into(), "DENY".into());
                    new_spec.insert("rules".into(), serde_json::json!([{}]));
                }
                // ALLOW, or an action that did not read: allow nothing.
                _ => {}
            }
        }
        "PeerAuthentication" => {
            new_spec.insert("mtls".into(), serde_json::json!({ "mode": "STRICT" }));
        }
        _ => return Vec::new(),
    }
    let obj = serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": { "namespace": ns, "name": name },
        "spec": new_spec,
    });
    let text = serde_json::to_string(&obj).unwrap_or_default();
    let r = rampart_authz::load_str(&format!("{kind} {ns}/{name} (refused: stand-in)"), &text);
    if r.problems.is_empty() {
        r.resources
    } else {
        // A selector that cannot be used: the namespace-wide form (stricter).
        let mut obj = obj;
        if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
            spec.remove("selector");
        }
        let text = serde_json::to_string(&obj).unwrap_or_default();
        rampart_authz::load_str(&format!("{kind} {ns}/{name} (refused: stand-in)"), &text).resources
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A Service, as read.
struct Svc {
    namespace: String,
    name: String,
    selector: BTreeMap<String, String>,
    /// (port, targetPort as written, protocol)
    ports: Vec<(u16, Value, PortProtocol)>,
}

fn read_service(o: &Value) -> Result<Svc, Box<Refused>> {
    let (namespace, name, _, _) = meta(o);
    if !is_dns_subdomain(&namespace) || !is_dns_subdomain(&name) {
        return Err(refusal(
            o,
            "Service",
            "metadata.name",
            "no valid namespace/name",
        ));
    }
    let mut ports = Vec::new();
    for (i, p) in o
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let Some(port) = p
            .get("port")
            .and_then(Value::as_u64)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0)
        else {
            return Err(refusal(
                o,
                "Service",
                format!("spec.ports[{i}].port"),
                "not a port number",
            ));
        };
        let Some(proto) = infer_protocol(
            p.get("protocol").and_then(Value::as_str),
            p.get("name").and_then(Value::as_str),
            p.get("appProtocol").and_then(Value::as_str),
        ) else {
            continue;
        };
        let target = p.get("targetPort").cloned().unwrap_or(Value::Null);
        ports.push((port, target, proto));
    }
    Ok(Svc {
        namespace,
        name,
        selector: labels(o, &["spec", "selector"]),
        ports,
    })
}

/// The container port a Service's `targetPort` names on `pod` (a number, a container port
/// name, or absent = the service port).
fn target_port(pod: &Value, port: u16, target: &Value) -> Option<u16> {
    match target {
        Value::Null => Some(port),
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Some(n);
            }
            pod.pointer("/spec/containers")?
                .as_array()?
                .iter()
                .flat_map(|c| {
                    c.get("ports")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                })
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
                .and_then(|p| p.get("containerPort")?.as_u64())
                .and_then(|n| u16::try_from(n).ok())
        }
        _ => None,
    }
}

fn listener_annotation(
    pod: &Value,
    key: &str,
    default: Option<SocketAddr>,
) -> Result<Option<SocketAddr>, Box<Refused>> {
    match s(pod, &["metadata", "annotations", key]) {
        None => Ok(default),
        Some("none") | Some("") => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            refusal(
                pod,
                "Pod",
                format!("metadata.annotations[{key}]"),
                format!("{v:?} is not an IP:port address (or none)"),
            )
        }),
    }
}

/// Build the snapshot of `objects` under `settings`; invalid objects are left out alone.
pub fn convert(settings: &KubeSettings, objects: &KubeObjects) -> Conversion {
    let mut refused_out = Vec::new();
    let resources = policies(&objects.policies, &mut refused_out);

    let mut services = Vec::new();
    for o in &objects.services {
        match read_service(o) {
            Ok(svc) => services.push(svc),
            Err(r) => refused_out.push(*r),
        }
    }
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let mut workloads = Vec::new();
    // service key -> endpoint workload keys
    let mut endpoints: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    // Selectors match within a namespace only: each Pod is checked against its own
    // namespace's Services (10,000 Pods x 1,000 Services would be 10 M checks).
    let mut services_by_ns: BTreeMap<&str, Vec<&Svc>> = BTreeMap::new();
    for svc in &services {
        services_by_ns
            .entry(svc.namespace.as_str())
            .or_default()
            .push(svc);
    }
    let mut pods: Vec<&Value> = objects.pods.iter().collect();
    pods.sort_by_cached_key(|p| meta(p));
    let mut seen = BTreeSet::new();
    for pod in pods {
        let ns = s(pod, &["metadata", "namespace"]).unwrap_or("");
        let in_ns = services_by_ns.get(ns).map_or(&[][..], Vec::as_slice);
        match pod_workload(settings, in_ns, pod) {
            Ok(Some((w, endpoint_of))) => {
                if !seen.insert(w.key()) {
                    continue;
                }
                for svc in endpoint_of {
                    endpoints.entry(svc).or_default().push(w.key());
                }
                workloads.push(w);
            }
            Ok(None) => {}
            Err(r) => refused_out.push(*r),
        }
    }
    // Endpoint Pods by key, for named targetPorts (resolved against the first endpoint).
    let pod_by_key: std::collections::HashMap<String, &Value> = objects
        .pods
        .iter()
        .map(|p| {
            let (ns, n, _, _) = meta(p);
            (format!("{ns}/{n}"), p)
        })
        .collect();
    let registry = Registry {
        workloads,
        services: services
            .iter()
            .map(|svc| {
                let mut seen_ports = BTreeSet::new();
                ServiceEntry {
                    name: svc.name.clone(),
                    namespace: svc.namespace.clone(),
                    ports: svc
                        .ports
                        .iter()
                        .filter(|(p, _, _)| seen_ports.insert(*p))
                        .map(|(port, target, protocol)| ServicePort {
                            port: *port,
                            // A named targetPort differs per Pod; the registry keeps the
                            // number when it is one, else the port of the first endpoint.
                            target_port: match target {
                                Value::Null => *port,
                                Value::Number(_) => {
                                    target_port(&Value::Null, *port, target).unwrap_or(*port)
                                }
                                t => endpoints
                                    .get(&(svc.namespace.clone(), svc.name.clone()))
                                    .and_then(|e| e.first())
                                    .and_then(|k| pod_by_key.get(k))
                                    .and_then(|p| target_port(p, *port, t))
                                    .unwrap_or(*port),
                            },
                            protocol: *protocol,
                        })
                        .collect(),
                    endpoints: endpoints
                        .get(&(svc.namespace.clone(), svc.name.clone()))
                        .cloned()
                        .unwrap_or_default(),
                }
            })
            .collect(),
    };
    refused_out.sort_by(|a, b| {
        (&a.kind, &a.namespace, &a.name, &a.resource_version).cmp(&(
            &b.kind,
            &b.namespace,
            &b.name,
            &b.resource_version,
        ))
    });
    let from_configmap = objects.mesh.clone().unwrap_or_default();
    let mesh = MeshConfig {
        path_normalization: from_configmap.path_normalization,
        extension_providers: from_configmap.extension_providers,
        root_namespace: settings.root_namespace.clone(),
        trust_domain: settings.trust_domain.to_string(),
        trust_domain_aliases: settings
            .trust_domain_aliases
            .iter()
            .map(ToString::to_string)
            .collect(),
    };
    Conversion {
        snapshot: MeshFolder {
            dir: PathBuf::from("kubernetes"),
            mesh,
            trust_domain: settings.trust_domain.clone(),
            trust_domain_aliases: settings.trust_domain_aliases.clone(),
            local: pod_network(&settings.local),
            registry,
            resources,
            files: ReferencedFiles::default(),
        },
        refused: refused_out,
    }
}

/// The local settings of a Kubernetes snapshot: every Pod has its own network namespace
/// (`rampart.workloadNetwork: pod`), so two Pods' `127.0.0.1:15001` do not collide. Set in
/// the typed settings and in the section as written, which is what a control plane streams.
fn pod_network(local: &LocalSettings) -> LocalSettings {
    let mut local = local.clone();
    local.workload_network = WorkloadNetwork::Pod;
    if !local.raw.is_object() {
        local.raw = Value::Object(serde_json::Map::new());
    }
    if let Some(section) = local.raw.as_object_mut() {
        section.insert(
            "workloadNetwork".into(),
            Value::String(WorkloadNetwork::Pod.as_str().into()),
        );
    }
    local
}

type EndpointOf = Vec<(String, String)>;

/// A Pod's workload and the services it is an endpoint of; `None` for Pods that are done
/// (Succeeded, Failed) or being deleted.
fn pod_workload(
    settings: &KubeSettings,
    services: &[&Svc],
    pod: &Value,
) -> Result<Option<(WorkloadEntry, EndpointOf)>, Box<Refused>> {
    let (namespace, name, _, _) = meta(pod);
    let phase = s(pod, &["status", "phase"]).unwrap_or("");
    if matches!(phase, "Succeeded" | "Failed")
        || pod
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|v| !v.is_null())
    {
        return Ok(None);
    }
    if !is_dns_subdomain(&namespace) || !is_dns_subdomain(&name) {
        return Err(refusal(
            pod,
            "Pod",
            "metadata.name",
            "no valid namespace/name",
        ));
    }
    let sa = s(pod, &["spec", "serviceAccountName"])
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_string();
    if !is_dns_subdomain(&sa) {
        return Err(refusal(
            pod,
            "Pod",
            "spec.serviceAccountName",
            format!("{sa:?} is not a valid service account name"),
        ));
    }
    if let Err(e) = SpiffeId::istio(&settings.trust_domain, &namespace, &sa) {
        return Err(refusal(
            pod,
            "Pod",
            "spec.serviceAccountName",
            format!("{sa:?} makes no SPIFFE ID: {e}"),
        ));
    }
    let pod_labels = labels(pod, &["metadata", "labels"]);
    let ip: Option<IpAddr> = match s(pod, &["status", "podIP"]) {
        None | Some("") => None,
        Some(v) => Some(v.parse().map_err(|_| {
            refusal(
                pod,
                "Pod",
                "status.podIP",
                format!("{v:?} is not an IP address"),
            )
        })?),
    };
    let outbound = listener_annotation(pod, ANNOTATION_OUTBOUND, settings.proxy_outbound)?;
    let admin = listener_annotation(pod, ANNOTATION_ADMIN, settings.proxy_admin)?;
    if let Some(a) = outbound
        && !a.ip().is_loopback()
        && !settings.local.allow_non_loopback_outbound
    {
        return Err(refusal(
            pod,
            "Pod",
            format!("metadata.annotations[{ANNOTATION_OUTBOUND}]"),
            format!(
                "{a} is not a loopback address: anyone who can reach it would call the mesh as this workload"
            ),
        ));
    }
    let mut ports: Vec<PortEntry> = Vec::new();
    let mut endpoint_of = Vec::new();
    let running = phase == "Running";
    // A host-network Pod shares the node's IP (no sidecar listens for it, as in Istio):
    // a workload without ports, no endpoint.
    let ip = ip.filter(|_| pod.pointer("/spec/hostNetwork") != Some(&Value::Bool(true)));
    for svc in services {
        if svc.namespace != namespace
            || svc.selector.is_empty()
            || !svc
                .selector
                .iter()
                .all(|(k, v)| pod_labels.get(k) == Some(v))
        {
            continue;
        }
        let Some(ip) = ip else { continue };
        let mut serves = false;
        for (port, target, protocol) in &svc.ports {
            let Some(t) = target_port(pod, *port, target).filter(|t| *t != 0) else {
                continue;
            };
            serves = true;
            if ports.iter().any(|p| p.port == t) {
                continue;
            }
            ports.push(PortEntry {
                port: t,
                protocol: *protocol,
                app: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), t),
                inbound: SocketAddr::new(ip, t),
                mtls: None,
            });
        }
        if serves && running {
            endpoint_of.push((svc.namespace.clone(), svc.name.clone()));
        }
    }
    ports.sort_by_key(|p| p.port);
    Ok(Some((
        WorkloadEntry {
            name,
            namespace,
            service_account: sa,
            labels: pod_labels,
            ports,
            command: None,
            proxy: ProxyEntry { outbound, admin },
            upstreams: Vec::new(),
        },
        endpoint_of,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> KubeSettings {
        let mut s = KubeSettings::new(TrustDomain::new("cluster.local").unwrap());
        s.proxy_outbound = None;
        s.proxy_admin = None;
        s
    }

    fn pod(ns: &str, name: &str, sa: &str, ip: &str, phase: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}"), "resourceVersion": "7", "labels": labels},
            "spec": {"serviceAccountName": sa, "nodeName": "node-1",
                     "containers": [{"name": "app", "ports": [{"name": "web", "containerPort": 8080}]}]},
            "status": {"phase": phase, "podIP": ip}})
    }

    fn service(ns: &str, name: &str, selector: Value, ports: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name, "resourceVersion": "3"},
            "spec": {"selector": selector, "ports": ports}})
    }

    fn policy(version: &str, kind: &str, ns: &str, name: &str, rv: &str, spec: Value) -> Value {
        json!({"apiVersion": format!("security.istio.io/{version}"), "kind": kind,
            "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}"), "resourceVersion": rv,
                         "managedFields": [{"manager": "kubectl"}], "generation": 1},
            "spec": spec, "status": {}})
    }

    #[test]
    fn protocol_inference_as_istio() {
        type Case<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            Option<PortProtocol>,
        );
        let cases: &[Case<'_>] = &[
            (None, Some("http"), None, Some(PortProtocol::Http)),
            (
                Some("TCP"),
                Some("http-web"),
                None,
                Some(PortProtocol::Http),
            ),
            (None, Some("HTTP-Web"), None, Some(PortProtocol::Http)),
            (None, Some("http2-api"), None, Some(PortProtocol::Http2)),
            (None, Some("grpc"), None, Some(PortProtocol::Grpc)),
            (None, Some("grpc-web-ui"), None, Some(PortProtocol::Grpc)),
            (None, Some("tcp-db"), None, Some(PortProtocol::Tcp)),
            (None, Some("https"), None, Some(PortProtocol::Tcp)),
            (None, Some("tls-x"), None, Some(PortProtocol::Tcp)),
            (None, Some("mongo"), None, Some(PortProtocol::Tcp)),
            (None, Some("web"), None, Some(PortProtocol::Tcp)),
            (None, Some("httpx"), None, Some(PortProtocol::Tcp)),
            (None, None, None, Some(PortProtocol::Tcp)),
            // appProtocol wins over the name
            (None, Some("tcp"), Some("http"), Some(PortProtocol::Http)),
            (None, Some("http"), Some("tcp"), Some(PortProtocol::Tcp)),
            (None, Some("http"), Some("grpc"), Some(PortProtocol::Grpc)),
            (
                None,
                None,
                Some("kubernetes.io/h2c"),
                Some(PortProtocol::Http2),
            ),
            (
                None,
                None,
                Some("kubernetes.io/ws"),
                Some(PortProtocol::Http),
            ),
            (
                None,
                Some("http"),
                Some("kubernetes.io/wss"),
                Some(PortProtocol::Tcp),
            ),
            (None, None, Some("HTTP2"), Some(PortProtocol::Http2)),
            (None, None, Some("https"), Some(PortProtocol::Tcp)),
            // not proxied
            (Some("UDP"), Some("http"), None, None),
            (Some("SCTP"), Some("grpc"), None, None),
        ];
        for (transport, name, app, want) in cases {
            assert_eq!(
                infer_protocol(*transport, *name, *app),
                *want,
                "{transport:?} {name:?} {app:?}"
            );
        }
    }

    fn objects() -> KubeObjects {
        KubeObjects {
            pods: vec![
                pod(
                    "api",
                    "backend-1",
                    "backend",
                    "10.0.0.1",
                    "Running",
                    json!({"app": "backend"}),
                ),
                pod(
                    "api",
                    "backend-2",
                    "backend",
                    "10.0.0.2",
                    "Running",
                    json!({"app": "backend"}),
                ),
                pod(
                    "api",
                    "backend-3",
                    "backend",
                    "10.0.0.3",
                    "Pending",
                    json!({"app": "backend"}),
                ),
                pod(
                    "api",
                    "done",
                    "backend",
                    "10.0.0.4",
                    "Succeeded",
                    json!({"app": "backend"}),
                ),
                pod(
                    "web",
                    "frontend-1",
                    "",
                    "10.0.1.1",
                    "Running",
                    json!({"app": "frontend"}),
                ),
            ],
            services: vec![
                service(
                    "api",
                    "backend",
                    json!({"app": "backend"}),
                    json!([
                        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                        {"name": "grpc-api", "port": 9090, "protocol": "TCP"},
                        {"name": "dns", "port": 53, "protocol": "UDP"},
                    ]),
                ),
                service(
                    "api",
                    "named",
                    json!({"app": "backend"}),
                    json!([
                        {"port": 81, "targetPort": "web", "appProtocol": "http"},
                    ]),
                ),
                service(
                    "web",
                    "frontend",
                    json!({"app": "frontend"}),
                    json!([{"name": "http", "port": 80}]),
                ),
            ],
            namespaces: vec![
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "api"}}),
            ],
            policies: vec![],
            mesh: None,
        }
    }

    #[test]
    fn the_mesh_configmap_gives_normalization_and_providers_not_identity() {
        let mut o = objects();
        o.mesh = Some(
            MeshConfig::from_yaml(
                "trustDomain: elsewhere.example\nrootNamespace: other\npathNormalization: {normalization: MERGE_SLASHES}\nextensionProviders:\n- {name: opa, envoyExtAuthzGrpc: {service: opa.opa.svc.cluster.local, port: 9191}}\n",
            )
            .unwrap(),
        );
        let c = convert(&settings(), &o);
        let m = &c.snapshot.mesh;
        assert_eq!(
            m.path_normalization,
            rampart_authz::PathNormalization::MergeSlashes
        );
        assert_eq!(m.extension_providers.len(), 1);
        assert!(m.extension_providers[0].authz.is_ok());
        // Identity stays the CA's.
        assert_eq!(m.trust_domain, settings().trust_domain.to_string());
        assert_eq!(m.root_namespace, settings().root_namespace);
        // And it reaches proxies in the snapshot's mesh.yaml unchanged.
        let doc = crate::resources::mesh_document(&c.snapshot);
        assert_eq!(
            doc["extensionProviders"][0]["envoyExtAuthzGrpc"]["port"],
            9191
        );
        // Without the ConfigMap: Istio's defaults.
        let c = convert(&settings(), &objects());
        assert!(c.snapshot.mesh.extension_providers.is_empty());
    }

    #[test]
    fn pods_and_services_make_the_registry_by_the_sidecar_convention() {
        let c = convert(&settings(), &objects());
        assert!(c.refused.is_empty(), "{:?}", c.refused);
        let r = &c.snapshot.registry;
        let keys: Vec<String> = r.workloads.iter().map(WorkloadEntry::key).collect();
        assert_eq!(
            keys,
            [
                "api/backend-1",
                "api/backend-2",
                "api/backend-3",
                "web/frontend-1"
            ]
        );
        let b1 = r.get("api", "backend-1").unwrap();
        assert_eq!(b1.service_account, "backend");
        assert_eq!(
            r.get("web", "frontend-1").unwrap().service_account,
            "default"
        );
        let p = b1.port(8080).unwrap();
        assert_eq!(p.protocol, PortProtocol::Http);
        assert_eq!(p.app, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(p.inbound, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(b1.port(9090).unwrap().protocol, PortProtocol::Grpc);
        assert!(b1.port(53).is_none(), "UDP is not proxied");
        // Only Running pods are endpoints; a Pending pod is still a workload (its proxy
        // starts before the pod is Running).
        let svc = r.service("api", "backend").unwrap();
        assert_eq!(svc.endpoints, ["api/backend-1", "api/backend-2"]);
        let t = r
            .resolve_target("backend.api.svc.cluster.local:80", "web")
            .unwrap();
        assert_eq!(t.workload.key(), "api/backend-1");
        assert_eq!(t.port.inbound, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(
            (t.service_host().as_str(), t.service_port),
            ("backend.api.svc.cluster.local", 80)
        );
        let all: Vec<String> = r
            .resolve_all("backend.api:9090", "web")
            .unwrap()
            .iter()
            .map(|t| t.workload.key())
            .collect();
        assert_eq!(all, ["api/backend-1", "api/backend-2"]);
        assert!(
            r.resolve_target("backend.api:8080", "web").is_none(),
            "8080 is a target port, not a service port"
        );
        // A named targetPort is the container port of that name.
        let n = r.resolve_target("named.api:81", "web").unwrap();
        assert_eq!((n.port.port, n.port.protocol), (8080, PortProtocol::Http));
        assert_eq!(
            r.resolve_target("frontend:80", "web").unwrap().port.inbound,
            "10.0.1.1:80".parse().unwrap()
        );
    }

    #[test]
    fn v1_and_v1beta1_views_are_one_object() {
        let allow =
            json!({"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["web"]}}]}]});
        let deny = json!({"action": "DENY", "rules": [{}]});
        let mut o = objects();
        o.policies = vec![
            policy("v1", "AuthorizationPolicy", "api", "p", "10", allow.clone()),
            policy(
                "v1beta1",
                "AuthorizationPolicy",
                "api",
                "p",
                "10",
                allow.clone(),
            ),
            // the v1beta1 view is newer (a watch raced): it wins
            policy("v1", "AuthorizationPolicy", "api", "q", "11", allow.clone()),
            policy("v1beta1", "AuthorizationPolicy", "api", "q", "12", deny),
            // same name, other kind: another object
            policy(
                "v1beta1",
                "PeerAuthentication",
                "api",
                "p",
                "13",
                json!({"mtls": {"mode": "STRICT"}}),
            ),
        ];
        let c = convert(&settings(), &o);
        assert!(c.refused.is_empty(), "{:?}", c.refused);
        let res = &c.snapshot.resources;
        assert_eq!(res.len(), 3, "{res:?}");
        let q = res.iter().find(|r| r.name() == "q").unwrap();
        let Resource::AuthorizationPolicy(q) = q else {
            panic!("{q:?}")
        };
        assert_eq!(q.spec.action, Some(rampart_authz::Action::Deny));
    }

    #[test]
    fn invalid_objects_are_refused_alone() {
        let mut o = objects();
        o.policies = vec![
            policy(
                "v1",
                "AuthorizationPolicy",
                "api",
                "good",
                "20",
                json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}),
            ),
            policy(
                "v1",
                "AuthorizationPolicy",
                "api",
                "bad-action",
                "21",
                json!({"action": "MAYBE"}),
            ),
            policy(
                "v1",
                "AuthorizationPolicy",
                "api",
                "bad-field",
                "22",
                json!({"rules": [{"from": [{"source": {"principalz": ["x"]}}]}]}),
            ),
            policy(
                "v1beta1",
                "PeerAuthentication",
                "api",
                "bad-mode",
                "23",
                json!({"mtls": {"mode": "SOMETIMES"}}),
            ),
            policy(
                "v1",
                "RequestAuthentication",
                "api",
                "bad-jwt",
                "24",
                json!({"jwtRules": [{"issuer": "i", "jwksUri": "ftp://x"}]}),
            ),
            policy(
                "v1",
                "PeerAuthentication",
                "api",
                "good-pa",
                "25",
                json!({"mtls": {"mode": "STRICT"}}),
            ),
        ];
        let mut bad_pod = pod("api", "weird", "Bad_SA", "10.0.0.9", "Running", json!({}));
        bad_pod["metadata"]["resourceVersion"] = json!("30");
        o.pods.push(bad_pod);
        let mut bad_ann = pod("api", "ann", "backend", "10.0.0.8", "Running", json!({}));
        bad_ann["metadata"]["annotations"] = json!({ANNOTATION_OUTBOUND: "0.0.0.0:15001"});
        o.pods.push(bad_ann);
        let c = convert(&settings(), &o);
        let names: Vec<(&str, &str)> = c
            .refused
            .iter()
            .map(|r| (r.kind.as_str(), r.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("AuthorizationPolicy", "bad-action"),
                ("AuthorizationPolicy", "bad-field"),
                ("PeerAuthentication", "bad-mode"),
                ("Pod", "ann"),
                ("Pod", "weird"),
                ("RequestAuthentication", "bad-jwt"),
            ]
        );
        let field = |n: &str| c.refused.iter().find(|r| r.name == n).unwrap();
        assert_eq!(field("bad-action").field, "spec.action");
        assert!(
            field("bad-field").field.contains("principalz"),
            "{:?}",
            field("bad-field")
        );
        assert_eq!(field("bad-mode").resource_version, "23");
        assert_eq!(field("bad-mode").uid, "uid-bad-mode");
        assert_eq!(field("weird").field, "spec.serviceAccountName");
        assert_eq!(field("weird").resource_version, "30");
        assert!(field("ann").field.contains(ANNOTATION_OUTBOUND));
        assert!(
            field("bad-jwt").field.contains("jwksUri"),
            "{:?}",
            field("bad-jwt")
        );
        assert_eq!(
            field("bad-action").to_string(),
            format!(
                "AuthorizationPolicy api/bad-action: spec.action: {}",
                field("bad-action").reason
            )
        );
        // Everything valid still applies; refused AuthorizationPolicies and
        // PeerAuthentications are replaced by their fail-closed stand-ins (tested below).
        let mut kept: Vec<&str> = c.snapshot.resources.iter().map(|r| r.name()).collect();
        kept.sort_unstable();
        assert_eq!(
            kept,
            ["bad-action", "bad-field", "bad-mode", "good", "good-pa"]
        );
        assert_eq!(c.snapshot.registry.workloads.len(), 4);
        assert!(c.snapshot.registry.get("api", "weird").is_none());
    }

    /// A refused policy never widens access (Istio's webhook would have kept the version
    /// before it): a refused ALLOW allows nothing in its scope, a refused DENY or CUSTOM denies
    /// everything there, a refused PeerAuthentication is STRICT; a refused AUDIT policy and
    /// scopes the object did not cover are untouched. Twins: the valid versions.
    #[test]
    fn a_refused_policy_never_widens_access() {
        use rampart_authz::{Engine, HttpRequest, MtlsMode, Peer, RequestContext, Workload};
        let mut o = objects();
        let web = json!({"matchLabels": {"app": "web"}});
        let bad_ip = json!([{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]);
        let good_ip = json!([{"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]}]);
        let case = |action: &str, rules: &Value| json!({"selector": web, "action": action, "rules": rules});
        let ctx = |ip: &str| RequestContext {
            source: Peer {
                principal: Some("spiffe://cluster.local/ns/api/sa/x".into()),
                ip: Some(ip.parse().unwrap()),
                remote_ip: None,
            },
            destination_port: 8080,
            http: Some(HttpRequest::new("GET", "/", "web")),
            ..RequestContext::default()
        };
        let (web_wl, other_wl) = (
            Workload::new("api", [("app", "web")]),
            Workload::new("api", [("app", "other")]),
        );
        for (action, allowed_from_10, allowed_from_192) in [
            // ALLOW from 10/8: refused → nobody; valid → only 10/8.
            ("ALLOW", false, false),
            // DENY from 10/8: refused → everybody denied; valid → only 10/8 denied.
            ("DENY", false, false),
            ("CUSTOM", false, false),
            // AUDIT decides nothing either way.
            ("AUDIT", true, true),
        ] {
            o.policies = vec![policy(
                "v1",
                "AuthorizationPolicy",
                "api",
                "p",
                "40",
                case(action, &bad_ip),
            )];
            if action == "CUSTOM" {
                o.policies[0]["spec"]["provider"] = json!({"name": "ext"});
            }
            let c = convert(&settings(), &o);
            assert_eq!(c.refused.len(), 1, "{action}: {:?}", c.refused);
            let e = Engine::new(c.snapshot.resources.clone(), MeshConfig::default());
            assert_eq!(
                e.authorize(&web_wl, &ctx("10.1.2.3")).is_allowed(),
                allowed_from_10,
                "{action} refused, from 10/8"
            );
            assert_eq!(
                e.authorize(&web_wl, &ctx("192.168.1.1")).is_allowed(),
                allowed_from_192,
                "{action} refused, from elsewhere"
            );
            // Only its scope: another workload of the namespace is untouched.
            assert!(e.authorize(&other_wl, &ctx("192.168.1.1")).is_allowed());
            if action == "CUSTOM" || action == "AUDIT" {
                continue;
            }
            // The twin: the valid policy decides as written.
            o.policies[0]["spec"]["rules"] = good_ip.clone();
            let c = convert(&settings(), &o);
            assert!(c.refused.is_empty());
            let e = Engine::new(c.snapshot.resources.clone(), MeshConfig::default());
            let from_10 = e.authorize(&web_wl, &ctx("10.1.2.3")).is_allowed();
            assert_eq!(from_10, action == "ALLOW", "{action} valid, from 10/8");
            assert!(e.authorize(&web_wl, &ctx("192.168.1.1")).is_allowed() == (action == "DENY"));
        }
        // No stand-in for what could not have applied: a targetRefs policy (gateways,
        // waypoints; even from the root namespace) or a dry run.
        for (extra, ns) in [
            (
                json!({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}]}),
                "istio-system",
            ),
            (
                json!({"targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}}),
                "api",
            ),
            (json!({}), "api"),
        ] {
            let mut spec = json!({"action": "DENY", "rules": bad_ip});
            for (k, v) in extra.as_object().unwrap() {
                spec[k] = v.clone();
            }
            let mut p = policy("v1", "AuthorizationPolicy", ns, "p", "42", spec);
            if extra.as_object().unwrap().is_empty() {
                p["metadata"]["annotations"] = json!({"istio.io/dry-run": "true"});
            }
            o.policies = vec![p];
            let c = convert(&settings(), &o);
            assert_eq!(c.refused.len(), 1, "{extra}: {:?}", c.refused);
            assert!(
                c.snapshot.resources.is_empty(),
                "{extra}: a stand-in was made"
            );
        }
        // A refused PeerAuthentication is STRICT in its scope; a valid PERMISSIVE is not.
        o.policies = vec![policy(
            "v1",
            "PeerAuthentication",
            "api",
            "pa",
            "41",
            json!({"selector": web, "mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"x": {"mode": "DISABLE"}}}),
        )];
        let c = convert(&settings(), &o);
        assert_eq!(c.refused.len(), 1, "{:?}", c.refused);
        let e = Engine::new(c.snapshot.resources.clone(), MeshConfig::default());
        assert_eq!(e.peer_authentication(&web_wl, 8080).mode, MtlsMode::Strict);
        assert_ne!(
            e.peer_authentication(&other_wl, 8080).mode,
            MtlsMode::Strict
        );
        o.policies[0]["spec"] = json!({"selector": web, "mtls": {"mode": "PERMISSIVE"}});
        let c = convert(&settings(), &o);
        assert!(c.refused.is_empty());
        let e = Engine::new(c.snapshot.resources.clone(), MeshConfig::default());
        assert_eq!(
            e.peer_authentication(&web_wl, 8080).mode,
            MtlsMode::Permissive
        );
    }

    #[test]
    fn settings_and_listener_annotations() {
        let mut st = settings();
        st.root_namespace = "mesh-root".into();
        st.proxy_outbound = Some("127.0.0.1:15001".parse().unwrap());
        let mut o = objects();
        o.pods[0]["metadata"]["annotations"] =
            json!({ANNOTATION_OUTBOUND: "127.0.0.1:25001", ANNOTATION_ADMIN: "127.0.0.1:25000"});
        o.pods[1]["metadata"]["annotations"] = json!({ANNOTATION_OUTBOUND: "none"});
        let c = convert(&st, &o);
        assert_eq!(c.snapshot.mesh.root_namespace, "mesh-root");
        assert_eq!(c.snapshot.mesh.trust_domain, "cluster.local");
        let r = &c.snapshot.registry;
        let b1 = &r.get("api", "backend-1").unwrap().proxy;
        assert_eq!(b1.outbound, Some("127.0.0.1:25001".parse().unwrap()));
        assert_eq!(b1.admin, Some("127.0.0.1:25000".parse().unwrap()));
        assert_eq!(r.get("api", "backend-2").unwrap().proxy.outbound, None);
        assert_eq!(
            r.get("api", "backend-3").unwrap().proxy.outbound,
            st.proxy_outbound
        );
    }

    /// Every Pod has the same loopback listeners (outbound `127.0.0.1:15001`, admin
    /// `127.0.0.1:15000`, apps on `127.0.0.1:T`), which is fine in Pods' own network
    /// namespaces: the streamed form of a Kubernetes snapshot (what a proxy re-validates)
    /// must assemble, and it says `workloadNetwork: pod`.
    #[test]
    fn a_snapshot_of_pods_sharing_loopback_addresses_assembles() {
        let c = convert(&settings(), &objects());
        let r = &c.snapshot.registry;
        let b1 = r.get("api", "backend-1").unwrap();
        let b2 = r.get("api", "backend-2").unwrap();
        assert_eq!(b1.proxy.outbound, b2.proxy.outbound);
        assert_eq!(b1.ports[0].app, b2.ports[0].app);
        assert_eq!(c.snapshot.local.workload_network, WorkloadNetwork::Pod);
        let resources = crate::resources::to_resources(&c.snapshot);
        let again = crate::resources::assemble(
            "control-plane",
            resources
                .iter()
                .map(|r| (r.name.as_str(), r.kind, r.body.as_slice())),
        )
        .unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(again.registry, c.snapshot.registry);
        assert_eq!(again.local.workload_network, WorkloadNetwork::Pod);

        // Its negative twin: two Pods claiming one Pod IP are still refused.
        let mut o = objects();
        let ip = o.pods[0]["status"]["podIP"].clone();
        o.pods[1]["status"]["podIP"] = ip;
        let clash = convert(&settings(), &o);
        let resources = crate::resources::to_resources(&clash.snapshot);
        let problems = crate::resources::assemble(
            "control-plane",
            resources
                .iter()
                .map(|r| (r.name.as_str(), r.kind, r.body.as_slice())),
        )
        .expect_err("two Pods on one IP");
        assert!(
            problems
                .iter()
                .any(|p| p.reason.contains("already used by")),
            "{problems:?}"
        );
    }

    #[test]
    fn host_network_pods_are_no_endpoints() {
        let mut o = objects();
        o.pods[1]["spec"]["hostNetwork"] = json!(true);
        let c = convert(&settings(), &o);
        let r = &c.snapshot.registry;
        assert!(r.get("api", "backend-2").unwrap().ports.is_empty());
        assert_eq!(
            r.service("api", "backend").unwrap().endpoints,
            ["api/backend-1"]
        );
    }

    #[test]
    fn a_deleted_pod_is_no_endpoint() {
        let mut o = objects();
        o.pods.retain(|p| p["metadata"]["name"] != "backend-1");
        let c = convert(&settings(), &o);
        let t = c
            .snapshot
            .registry
            .resolve_target("backend.api:80", "web")
            .unwrap();
        assert_eq!(t.workload.key(), "api/backend-2");
        o.pods.retain(|p| p["metadata"]["name"] != "backend-2");
        let c = convert(&settings(), &o);
        assert!(
            c.snapshot
                .registry
                .resolve_target("backend.api:80", "web")
                .is_none()
        );
    }
}
