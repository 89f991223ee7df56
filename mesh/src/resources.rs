//! The mesh model as named, versioned resources: what a control plane streams to proxies
//! (`rampart.config.v1`, docs/KUBERNETES.md "Config streaming") and what a proxy assembles
//! back into a [`MeshFolder`] with the same parsers and checks a folder goes through.
//!
//! - `mesh`: the `mesh.yaml` document (Istio MeshConfig names and the `rampart:` section)
//!   plus the contents of the files the snapshot refers to (local JWKS, the JWKS CA).
//! - `policy/<ns>/<Kind>/<name>`: one Istio object, as written.
//! - `registry/<section>/<ns>/<name>`: one entry of `workloads.yaml` (section `workloads`),
//!   in the file's own form; a new registry section (Services with endpoints) is one more
//!   section name, assembled into the same document and validated by [`parse_registry`].
//!
//! Bodies are JSON (a subset of YAML, so the YAML parsers read them as written); versions are
//! content hashes, equal for equal bodies.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Value, json};

use crate::{MeshFolder, Problem, ReferencedFiles, Registry, WorkloadEntry};

/// Name of the mesh settings resource.
pub const MESH_RESOURCE: &str = "mesh";
/// Prefix of policy resource names.
pub const POLICY_PREFIX: &str = "policy/";
/// Prefix of registry item names.
pub const REGISTRY_PREFIX: &str = "registry/";

/// What a resource is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// The mesh settings (one per snapshot).
    Mesh,
    /// An Istio security policy.
    Policy,
    /// A registry item.
    Registry,
}

/// One resource of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelResource {
    /// Unique name (see the module docs).
    pub name: String,
    /// What it is.
    pub kind: ResourceKind,
    /// The namespace it lives in (policies and registry items), for slicing.
    pub namespace: Option<String>,
    /// The JSON body.
    pub body: Vec<u8>,
    /// A content hash of the body.
    pub version: String,
}

impl ModelResource {
    fn new(name: String, kind: ResourceKind, namespace: Option<String>, value: &Value) -> Self {
        let body = serde_json::to_vec(value).expect("a JSON value serializes");
        let version = content_version(&body);
        ModelResource {
            name,
            kind,
            namespace,
            body,
            version,
        }
    }
}

/// A content hash of `body` (FNV-1a, 64 bits, hex): stable across processes and builds.
pub fn content_version(body: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The `mesh.yaml` document of a snapshot (what [`crate::MeshFolder::from_parts`] reads back).
pub fn mesh_document(folder: &MeshFolder) -> Value {
    let m = &folder.mesh;
    let mut doc = json!({
        "trustDomain": m.trust_domain,
        "trustDomainAliases": m.trust_domain_aliases,
        "rootNamespace": m.root_namespace,
        "pathNormalization": {"normalization": m.path_normalization},
        "extensionProviders": m.extension_providers.iter().map(|p| p.raw.clone()).collect::<Vec<_>>(),
    });
    if !folder.local.raw.is_null() {
        doc["rampart"] = folder.local.raw.clone();
    }
    doc
}

fn file_result(r: &Result<String, String>) -> Value {
    match r {
        Ok(t) => json!({"ok": t}),
        Err(e) => json!({"err": e}),
    }
}

fn files_document(files: &ReferencedFiles) -> Value {
    let jwks: serde_json::Map<String, Value> = files
        .jwks
        .iter()
        .map(|(k, v)| (k.clone(), file_result(v)))
        .collect();
    let mut doc = json!({ "jwks": jwks });
    if let Some(ca) = &files.jwks_ca {
        doc["jwksCa"] = file_result(ca);
    }
    doc
}

fn parse_file_result(v: &Value) -> Result<Result<String, String>, String> {
    if let Some(t) = v.get("ok").and_then(Value::as_str) {
        return Ok(Ok(t.to_string()));
    }
    if let Some(e) = v.get("err").and_then(Value::as_str) {
        return Ok(Err(e.to_string()));
    }
    Err("a referenced file must be {ok: text} or {err: reason}".into())
}

fn parse_files(v: &Value) -> Result<ReferencedFiles, String> {
    let mut out = ReferencedFiles::default();
    if let Some(map) = v.get("jwks") {
        let map = map.as_object().ok_or("files.jwks must be a mapping")?;
        for (k, f) in map {
            out.jwks.insert(k.clone(), parse_file_result(f)?);
        }
    }
    if let Some(ca) = v.get("jwksCa") {
        out.jwks_ca = Some(parse_file_result(ca)?);
    }
    Ok(out)
}

/// One workload as its `workloads.yaml` entry.
pub fn workload_document(w: &WorkloadEntry) -> Value {
    let mut doc = json!({
        "name": w.name,
        "namespace": w.namespace,
        "serviceAccount": w.service_account,
        "labels": w.labels,
        "ports": w.ports.iter().map(|p| {
            let mut port = json!({
                "port": p.port,
                "protocol": p.protocol.as_str(),
                "app": p.app.to_string(),
                "inbound": p.inbound.to_string(),
            });
            if let Some(m) = p.mtls {
                port["mtls"] = json!(m.as_str());
            }
            port
        }).collect::<Vec<_>>(),
        "upstreams": w.upstreams.iter().map(|u| json!({
            "service": u.service,
            "port": u.port,
            "listen": u.listen.to_string(),
        })).collect::<Vec<_>>(),
    });
    if let Some(cmd) = &w.command {
        doc["command"] = json!(cmd);
    }
    let mut proxy = serde_json::Map::new();
    if let Some(a) = w.proxy.outbound {
        proxy.insert("outbound".into(), json!(a.to_string()));
    }
    if let Some(a) = w.proxy.admin {
        proxy.insert("admin".into(), json!(a.to_string()));
    }
    if !proxy.is_empty() {
        doc["proxy"] = Value::Object(proxy);
    }
    doc
}

/// Every registry item: `(section, namespace, name, entry)`. A new section of the registry
/// adds its items here and nothing else changes: the proxy groups items by section.
pub fn registry_items(reg: &Registry) -> Vec<(&'static str, String, String, Value)> {
    let workloads = reg.workloads.iter().map(|w| {
        (
            "workloads",
            w.namespace.clone(),
            w.name.clone(),
            workload_document(w),
        )
    });
    // A service serializes in the registry's own `services:` form (see `ServiceEntry`).
    let services = reg.services.iter().map(|s| {
        (
            "services",
            s.namespace.clone(),
            s.name.clone(),
            serde_json::to_value(s).unwrap_or(Value::Null),
        )
    });
    workloads.chain(services).collect()
}

/// The whole snapshot as resources: `mesh`, then policies, then registry items.
pub fn to_resources(folder: &MeshFolder) -> Vec<ModelResource> {
    let mut out = Vec::with_capacity(1 + folder.resources.len() + folder.registry.workloads.len());
    let mesh = json!({
        "mesh": mesh_document(folder),
        "files": files_document(&folder.files),
    });
    out.push(ModelResource::new(
        MESH_RESOURCE.into(),
        ResourceKind::Mesh,
        None,
        &mesh,
    ));
    for r in &folder.resources {
        let meta = r.metadata();
        let ns = meta.namespace().to_string();
        out.push(ModelResource::new(
            format!("{POLICY_PREFIX}{ns}/{}/{}", r.kind().as_str(), meta.name()),
            ResourceKind::Policy,
            Some(ns),
            r.document(),
        ));
    }
    for (section, ns, name, doc) in registry_items(&folder.registry) {
        out.push(ModelResource::new(
            format!("{REGISTRY_PREFIX}{section}/{ns}/{name}"),
            ResourceKind::Registry,
            Some(ns),
            &doc,
        ));
    }
    out
}

/// Who a resource of [`scoped_resources`] goes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Audience {
    /// Every proxy: the mesh settings, registry services, policies of the root namespace,
    /// and a destination workload's reduced entry (to everyone but the workload itself,
    /// which gets its full entry instead).
    Everyone,
    /// The proxies of workloads in this namespace (its policies: only those can apply to
    /// them).
    Namespace(String),
    /// Only the proxy of this workload (`<ns>/<name>`): its full registry entry.
    Workload(String),
}

impl Audience {
    /// Whether the proxy of workload `namespace/name` gets a resource of this audience.
    pub fn includes(&self, namespace: &str, name: &str) -> bool {
        match self {
            Audience::Everyone => true,
            Audience::Namespace(ns) => ns == namespace,
            Audience::Workload(key) => key
                .split_once('/')
                .is_some_and(|(n, w)| n == namespace && w == name),
        }
    }
}

/// A resource and who gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopedResource {
    /// The resource.
    pub resource: ModelResource,
    /// Who gets it.
    pub audience: Audience,
}

/// A workload as a caller needs it (the registry item other proxies get): name, namespace,
/// service account (the identity a caller expects) and ports: port, protocol, the inbound
/// address it dials, and `mtls`, the port's effective PeerAuthentication mode under
/// `engine` (the whole model's policies), which decides whether a caller originates mTLS
/// without it holding the destination namespace's policies (`app` stays because the
/// registry requires it). Left out: labels (only PeerAuthentication selectors read them,
/// and the mode is computed here), and the workload's own business:
/// `proxy.outbound`/`proxy.admin` (equal across Pods, so two of them would collide in the
/// registry's address check), `upstreams` and `command`.
pub fn destination_document(w: &WorkloadEntry, engine: &rampart_authz::Engine) -> Value {
    json!({
        "name": w.name,
        "namespace": w.namespace,
        "serviceAccount": w.service_account,
        "ports": w.ports.iter().map(|p| json!({
            "port": p.port,
            "protocol": p.protocol.as_str(),
            "app": p.app.to_string(),
            "inbound": p.inbound.to_string(),
            "mtls": w.mtls_mode_for_callers(engine, p).as_str(),
        })).collect::<Vec<_>>(),
    })
}

/// The keys (`<ns>/<name>`) of the workloads some authority can lead a caller to
/// ([`Registry::resolve_all`]): the endpoints of every service, and every workload with a
/// port that no service of its name shadows (a workload is its own service). Workloads
/// without ports (Pods not selected by a Service, Pods without an IP) are no destination.
pub fn destinations(reg: &Registry) -> std::collections::HashSet<String> {
    let services: std::collections::HashSet<(&str, &str)> = reg
        .services
        .iter()
        .map(|s| (s.namespace.as_str(), s.name.as_str()))
        .collect();
    let mut out: std::collections::HashSet<String> = reg
        .services
        .iter()
        .flat_map(|s| s.endpoints.iter().cloned())
        .collect();
    for w in &reg.workloads {
        if !w.ports.is_empty() && !services.contains(&(w.namespace.as_str(), w.name.as_str())) {
            out.insert(w.key());
        }
    }
    out
}

/// The whole snapshot as resources with their audience (what a control plane slices per
/// proxy; [`slice_for`] is one proxy's slice). A workload appears twice under one name: its
/// full entry for itself, and, if it is a destination ([`destinations`]), its reduced entry
/// ([`destination_document`]) for everyone else.
pub fn scoped_resources(folder: &MeshFolder) -> Vec<ScopedResource> {
    let root = folder.mesh.root_namespace.as_str();
    let dests = destinations(&folder.registry);
    let engine = rampart_authz::Engine::new(folder.resources.iter().cloned(), folder.mesh.clone());
    let mut out = Vec::with_capacity(
        1 + folder.resources.len()
            + 2 * folder.registry.workloads.len()
            + folder.registry.services.len(),
    );
    for r in to_resources(folder) {
        let audience = match r.kind {
            ResourceKind::Mesh => Audience::Everyone,
            ResourceKind::Policy => {
                let ns = r.namespace.clone().unwrap_or_default();
                if ns == root {
                    Audience::Everyone
                } else {
                    Audience::Namespace(ns)
                }
            }
            ResourceKind::Registry => {
                if r.name.starts_with(&format!("{REGISTRY_PREFIX}workloads/")) {
                    continue; // below, in both forms
                }
                Audience::Everyone
            }
        };
        out.push(ScopedResource {
            resource: r,
            audience,
        });
    }
    for w in &folder.registry.workloads {
        let name = format!("{REGISTRY_PREFIX}workloads/{}/{}", w.namespace, w.name);
        let key = w.key();
        if dests.contains(&key) {
            out.push(ScopedResource {
                resource: ModelResource::new(
                    name.clone(),
                    ResourceKind::Registry,
                    Some(w.namespace.clone()),
                    &destination_document(w, &engine),
                ),
                audience: Audience::Everyone,
            });
        }
        out.push(ScopedResource {
            resource: ModelResource::new(
                name,
                ResourceKind::Registry,
                Some(w.namespace.clone()),
                &workload_document(w),
            ),
            audience: Audience::Workload(key),
        });
    }
    out
}

/// What the proxy of workload `namespace/name` receives: the mesh settings; the policies of
/// its namespace and of the root namespace; every registry service; its own full registry
/// entry; and every other destination workload reduced to what a caller needs
/// ([`destination_document`], with each port's effective mTLS mode). With this slice the proxy's inbound
/// (its entry, every policy that can apply to it) and outbound (every authority resolves
/// to the same destinations, with the same identities, addresses and mTLS modes) are what
/// they are with the whole model. A workload that is not in the registry gets the mesh
/// settings alone (fail closed: no entry, so no proxy builds from it).
pub fn slice_for(folder: &MeshFolder, namespace: &str, name: &str) -> Vec<ModelResource> {
    if folder.registry.get(namespace, name).is_none() {
        return to_resources(folder)
            .into_iter()
            .filter(|r| r.kind == ResourceKind::Mesh)
            .collect();
    }
    let own = format!("{REGISTRY_PREFIX}workloads/{namespace}/{name}");
    scoped_resources(folder)
        .into_iter()
        .filter(|s| {
            s.audience.includes(namespace, name)
                && !(s.resource.name == own && s.audience == Audience::Everyone)
        })
        .map(|s| s.resource)
        .collect()
}

fn problem(file: &str, reason: impl Into<String>) -> Problem {
    Problem {
        file: file.to_string(),
        field: String::new(),
        reason: reason.into(),
    }
}

/// Assemble a snapshot from resources `(name, kind, body)` and check it as a folder is
/// checked. `label` stands for the folder in the snapshot's `dir` (e.g. the control plane's
/// address). A missing `mesh` resource, a body that is not JSON, or anything the folder
/// checks refuse is a refusal naming the resource.
pub fn assemble<'a>(
    label: &str,
    resources: impl IntoIterator<Item = (&'a str, ResourceKind, &'a [u8])>,
) -> Result<MeshFolder, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut mesh: Option<(String, ReferencedFiles)> = None;
    let mut policies = Vec::new();
    let mut sections: BTreeMap<String, Vec<(String, Value)>> = BTreeMap::new();
    for (name, kind, body) in resources {
        let value: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                problems.push(problem(name, format!("not JSON: {e}")));
                continue;
            }
        };
        match kind {
            ResourceKind::Mesh => {
                let files = match value.get("files").map(parse_files).transpose() {
                    Ok(f) => f.unwrap_or_default(),
                    Err(e) => {
                        problems.push(problem(name, e));
                        continue;
                    }
                };
                let doc = value.get("mesh").cloned().unwrap_or(Value::Null);
                mesh = Some((doc.to_string(), files));
            }
            ResourceKind::Policy => policies.push((name.to_string(), value.to_string())),
            ResourceKind::Registry => {
                let section = name
                    .strip_prefix(REGISTRY_PREFIX)
                    .and_then(|rest| rest.split_once('/'))
                    .map(|(s, _)| s.to_string());
                match section {
                    Some(s) => sections
                        .entry(s)
                        .or_default()
                        .push((name.to_string(), value)),
                    None => problems.push(problem(
                        name,
                        format!("a registry item's name must be {REGISTRY_PREFIX}<section>/..."),
                    )),
                }
            }
        }
    }
    let Some((mesh_text, files)) = mesh else {
        problems.push(problem(
            MESH_RESOURCE,
            "no mesh settings resource: the configuration is incomplete",
        ));
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    // In name order, so a problem's index names the same item on every proxy.
    let mut registry = serde_json::Map::new();
    let mut index_names = Vec::new();
    for (section, mut items) in sections {
        items.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (n, _)) in items.iter().enumerate() {
            index_names.push((format!("{section}[{i}]"), n.clone()));
        }
        registry.insert(
            section,
            Value::Array(items.into_iter().map(|(_, v)| v).collect()),
        );
    }
    policies.sort();
    let registry_text = Value::Object(registry).to_string();
    MeshFolder::from_parts(
        PathBuf::from(label),
        (MESH_RESOURCE, &mesh_text),
        ("registry", &registry_text),
        &policies,
        files,
    )
    .map_err(|mut ps| {
        // Name the registry item a problem is about, not only its index.
        for p in &mut ps {
            if (p.file == "registry" || p.file == crate::WORKLOADS_FILE)
                && let Some((_, n)) = index_names
                    .iter()
                    .find(|(at, _)| p.field == *at || p.field.starts_with(&format!("{at}.")))
            {
                p.file = n.clone();
            }
        }
        ps
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "trustDomain: example.org\nrootNamespace: istio-config\nrampart:\n  crlUnknownStatus: deny\n";
    const REG: &str = "workloads:\n- {name: a, namespace: ns1, serviceAccount: sa-a, labels: {app: a}, ports: [{port: 80, protocol: http, app: '127.0.0.1:9000', inbound: '127.0.0.1:9001'}], proxy: {outbound: '127.0.0.1:9100'}}\n- {name: b, namespace: ns2, ports: [{port: 81, app: '127.0.0.1:9002', inbound: '127.0.0.1:9003'}], upstreams: [{service: a.ns1, port: 80, listen: '127.0.0.1:9200'}]}\n";
    const POLICY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: ns1}\nspec:\n  action: DENY\n  rules:\n  - to: [{operation: {paths: ['/admin']}}]\n";

    fn folder() -> MeshFolder {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(crate::MESH_FILE), MESH).unwrap();
        std::fs::write(d.path().join(crate::WORKLOADS_FILE), REG).unwrap();
        std::fs::write(d.path().join("p.yaml"), POLICY).unwrap();
        MeshFolder::load(d.path()).unwrap()
    }

    /// A snapshot survives the trip through resources: same settings, registry and policy.
    #[test]
    fn round_trip() {
        let f = folder();
        let rs = to_resources(&f);
        assert_eq!(rs.len(), 1 + 1 + 2);
        assert!(
            rs.iter()
                .any(|r| r.name == "policy/ns1/AuthorizationPolicy/deny-admin")
        );
        assert!(rs.iter().any(|r| r.name == "registry/workloads/ns2/b"));
        let back = assemble(
            "cp",
            rs.iter()
                .map(|r| (r.name.as_str(), r.kind, r.body.as_slice())),
        )
        .unwrap();
        assert_eq!(back.mesh, f.mesh);
        assert_eq!(back.trust_domain, f.trust_domain);
        assert_eq!(back.registry, f.registry);
        assert_eq!(back.local.crl_unknown_status, f.local.crl_unknown_status);
        assert_eq!(back.resources.len(), 1);
        assert_eq!(back.resources[0].document(), f.resources[0].document());
        // Equal content, equal versions.
        assert_eq!(to_resources(&back)[1..], rs[1..]);
    }

    /// Registry services (Kubernetes Services with their endpoints, or a folder's
    /// `services:`) travel as `registry/services/<ns>/<name>` and come back equal.
    #[test]
    fn services_round_trip() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(crate::MESH_FILE), MESH).unwrap();
        let reg = format!(
            "{REG}services:\n- {{name: api, namespace: ns1, ports: [{{port: 8080, targetPort: 80, protocol: http}}], endpoints: [ns1/a]}}\n"
        );
        std::fs::write(d.path().join(crate::WORKLOADS_FILE), reg).unwrap();
        let f = MeshFolder::load(d.path()).unwrap();
        assert_eq!(f.registry.services.len(), 1);
        let rs = to_resources(&f);
        assert!(rs.iter().any(|r| r.name == "registry/services/ns1/api"));
        let back = assemble(
            "cp",
            rs.iter()
                .map(|r| (r.name.as_str(), r.kind, r.body.as_slice())),
        )
        .unwrap();
        assert_eq!(back.registry, f.registry);
        // Twin: without the service item, the service is gone (nothing invents it).
        let back = assemble(
            "cp",
            rs.iter()
                .filter(|r| !r.name.starts_with("registry/services/"))
                .map(|r| (r.name.as_str(), r.kind, r.body.as_slice())),
        )
        .unwrap();
        assert!(back.registry.services.is_empty());
    }

    /// The negative twins: no mesh resource, a broken policy, a broken registry item: each
    /// refused naming the resource.
    #[test]
    fn refusals_name_the_resource() {
        let f = folder();
        let rs = to_resources(&f);
        let without_mesh = assemble(
            "cp",
            rs.iter()
                .filter(|r| r.kind != ResourceKind::Mesh)
                .map(|r| (r.name.as_str(), r.kind, r.body.as_slice())),
        )
        .unwrap_err();
        assert!(without_mesh[0].file == MESH_RESOURCE, "{without_mesh:?}");

        let bad_policy = br#"{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"x","namespace":"ns1"},"spec":{"action":"NOPE"}}"#;
        let e = assemble(
            "cp",
            rs.iter()
                .map(|r| (r.name.as_str(), r.kind, r.body.as_slice()))
                .chain([(
                    "policy/ns1/AuthorizationPolicy/x",
                    ResourceKind::Policy,
                    &bad_policy[..],
                )]),
        )
        .unwrap_err();
        assert!(
            e.iter()
                .any(|p| p.file == "policy/ns1/AuthorizationPolicy/x"),
            "{e:?}"
        );

        let bad_item = br#"{"name":"c","namespace":"ns1","ports":[{"port":0,"app":"127.0.0.1:1","inbound":"127.0.0.1:2"}]}"#;
        let e = assemble(
            "cp",
            rs.iter()
                .map(|r| (r.name.as_str(), r.kind, r.body.as_slice()))
                .chain([(
                    "registry/workloads/ns1/c",
                    ResourceKind::Registry,
                    &bad_item[..],
                )]),
        )
        .unwrap_err();
        assert!(
            e.iter().any(|p| p.file == "registry/workloads/ns1/c"),
            "{e:?}"
        );
    }

    const SLICE_MESH: &str = "trustDomain: example.org\nrootNamespace: istio-config\n";
    const SLICE_REG: &str = "workloads:
- {name: a, namespace: ns1, serviceAccount: sa-a, labels: {app: a}, ports: [{port: 80, protocol: http, app: '127.0.0.1:9000', inbound: '127.0.0.1:9001'}], proxy: {outbound: '127.0.0.1:9100', admin: '127.0.0.1:9101'}, upstreams: [{service: api.ns2, port: 8080, listen: '127.0.0.1:9200'}], command: [sleep, '1']}
- {name: client, namespace: ns1, proxy: {outbound: '127.0.0.1:9102'}}
- {name: b1, namespace: ns2, serviceAccount: sa-b, labels: {app: api}, ports: [{port: 80, protocol: http, app: '127.0.0.1:9002', inbound: '127.0.0.1:9003'}], proxy: {outbound: '127.0.0.1:9103', admin: '127.0.0.1:9104'}}
- {name: b2, namespace: ns2, serviceAccount: sa-b, labels: {app: api, track: canary}, ports: [{port: 80, protocol: http, app: '127.0.0.1:9004', inbound: '127.0.0.1:9005'}]}
- {name: api, namespace: ns2, labels: {app: shadowed}, ports: [{port: 8080, app: '127.0.0.1:9006', inbound: '127.0.0.1:9007'}]}
- {name: c, namespace: ns3, labels: {app: c}, ports: [{port: 81, app: '127.0.0.1:9008', inbound: '127.0.0.1:9009'}, {port: 82, protocol: grpc, app: '127.0.0.1:9010', inbound: '127.0.0.1:9011'}]}
services:
- {name: api, namespace: ns2, ports: [{port: 8080, targetPort: 80, protocol: http}], endpoints: [ns2/b1, ns2/b2]}
";
    const SLICE_POLICIES: &[(&str, &str)] = &[
        (
            "ns1-ap.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: ns1}\nspec:\n  action: DENY\n  rules:\n  - to: [{operation: {paths: ['/admin']}}]\n",
        ),
        (
            "ns2-ap.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-x, namespace: ns2}\nspec:\n  rules:\n  - to: [{operation: {paths: ['/x']}}]\n",
        ),
        (
            "ns2-ra.yaml",
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: ns2}\nspec:\n  jwtRules:\n  - issuer: https://issuer.example\n    jwks: '{\"keys\":[]}'\n    outputPayloadToHeader: x-jwt\n",
        ),
        (
            "ns2-pa.yaml",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: canary-plain, namespace: ns2}\nspec:\n  selector: {matchLabels: {track: canary}}\n  mtls: {mode: DISABLE}\n",
        ),
        (
            "ns3-pa.yaml",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: ns3}\nspec:\n  selector: {matchLabels: {app: c}}\n  mtls: {mode: STRICT}\n  portLevelMtls: {82: {mode: DISABLE}}\n",
        ),
        (
            "root-ap.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: root-deny, namespace: istio-config}\nspec:\n  action: DENY\n  rules:\n  - to: [{operation: {paths: ['/root-secret']}}]\n",
        ),
    ];

    fn slice_folder() -> MeshFolder {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(crate::MESH_FILE), SLICE_MESH).unwrap();
        std::fs::write(d.path().join(crate::WORKLOADS_FILE), SLICE_REG).unwrap();
        for (f, text) in SLICE_POLICIES {
            std::fs::write(d.path().join(f), text).unwrap();
        }
        MeshFolder::load(d.path()).unwrap()
    }

    fn assemble_all(rs: &[ModelResource]) -> Result<MeshFolder, Vec<Problem>> {
        assemble(
            "cp",
            rs.iter()
                .map(|r| (r.name.as_str(), r.kind, r.body.as_slice())),
        )
    }

    fn names(rs: &[ModelResource]) -> Vec<&str> {
        let mut v: Vec<&str> = rs.iter().map(|r| r.name.as_str()).collect();
        v.sort_unstable();
        v
    }

    /// A workload's slice: mesh, its namespace's and the root namespace's policies, the
    /// services, its own full entry and the other destinations reduced (each port with its
    /// effective mTLS mode). Twins: another namespace's policies (of every kind), a workload
    /// that is no destination (no ports; shadowed by a service of its name), and another
    /// workload's labels, proxy listeners, upstreams and command are not in it.
    #[test]
    fn slice_holds_what_the_workload_needs_and_nothing_else() {
        let f = slice_folder();
        let rs = slice_for(&f, "ns1", "a");
        assert_eq!(
            names(&rs),
            vec![
                "mesh",
                "policy/istio-config/AuthorizationPolicy/root-deny",
                "policy/ns1/AuthorizationPolicy/deny-admin",
                "registry/services/ns2/api",
                "registry/workloads/ns1/a",
                "registry/workloads/ns2/b1",
                "registry/workloads/ns2/b2",
                "registry/workloads/ns3/c",
            ]
        );
        let body = |n: &str| -> Value {
            serde_json::from_slice(&rs.iter().find(|r| r.name == n).unwrap().body).unwrap()
        };
        // Its own entry is whole.
        let own = body("registry/workloads/ns1/a");
        assert_eq!(own["proxy"]["outbound"], "127.0.0.1:9100");
        assert_eq!(own["upstreams"][0]["listen"], "127.0.0.1:9200");
        assert_eq!(own["command"][0], "sleep");
        // Another's is reduced to what a caller needs.
        let b1 = body("registry/workloads/ns2/b1");
        assert!(
            b1.get("proxy").is_none() && b1.get("upstreams").is_none(),
            "{b1}"
        );
        assert!(b1.get("command").is_none());
        assert_eq!(b1["serviceAccount"], "sa-b");
        assert_eq!(b1["ports"][0]["inbound"], "127.0.0.1:9003");
        assert_eq!(b1["ports"][0]["mtls"], "PERMISSIVE");
        assert!(b1.get("labels").is_none(), "{b1}");
        let b2 = body("registry/workloads/ns2/b2");
        assert_eq!(b2["ports"][0]["mtls"], "DISABLE", "{b2}");
        let c = body("registry/workloads/ns3/c");
        assert_eq!(c["ports"][0]["mtls"], "STRICT", "{c}");
        assert_eq!(c["ports"][1]["mtls"], "DISABLE", "{c}");
        let all = rs
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned());
        for text in all {
            for addr in ["9102", "9103", "9104"] {
                assert!(!text.contains(addr), "{addr} leaked: {text}");
            }
        }

        // From ns2's side: ns2's policies, not ns1's; a's entry reduced.
        let rs = slice_for(&f, "ns2", "b1");
        let n = names(&rs);
        assert!(n.contains(&"policy/ns2/AuthorizationPolicy/allow-x"));
        assert!(n.contains(&"policy/ns2/RequestAuthentication/jwt"));
        assert!(n.contains(&"policy/ns2/PeerAuthentication/canary-plain"));
        assert!(!n.contains(&"policy/ns3/PeerAuthentication/strict"));
        assert!(!n.contains(&"policy/ns1/AuthorizationPolicy/deny-admin"));
        assert!(n.contains(&"policy/istio-config/AuthorizationPolicy/root-deny"));
        assert!(!n.contains(&"registry/workloads/ns1/client"));
        assert!(!n.contains(&"registry/workloads/ns2/api"));
        let a: Value = serde_json::from_slice(
            &rs.iter()
                .find(|r| r.name == "registry/workloads/ns1/a")
                .unwrap()
                .body,
        )
        .unwrap();
        assert!(a.get("proxy").is_none() && a.get("upstreams").is_none());
        // Equal content, equal version: a's reduced entry is one resource for everyone.
        let again = slice_for(&f, "ns3", "c");
        let v = |rs: &[ModelResource]| {
            rs.iter()
                .find(|r| r.name == "registry/workloads/ns1/a")
                .unwrap()
                .version
                .clone()
        };
        assert_eq!(v(&rs), v(&again));
        assert_ne!(v(&rs), v(&slice_for(&f, "ns1", "a")));
    }

    /// What resolving an authority gives, comparable across two snapshots.
    fn routes(f: &MeshFolder, authority: &str, from: &str) -> Option<Vec<String>> {
        let engine = rampart_authz::Engine::new(f.resources.iter().cloned(), f.mesh.clone());
        f.registry.resolve_all(authority, from).map(|all| {
            all.iter()
                .map(|r| {
                    format!(
                        "{} {} {:?} {} {} {} {} {} {:?}",
                        r.workload.key(),
                        r.port.port,
                        r.port.protocol,
                        r.port.app,
                        r.port.inbound,
                        r.service_host(),
                        r.service_port,
                        r.workload.spiffe_id(&f.trust_domain),
                        r.workload.mtls_mode_for_callers(&engine, r.port)
                    )
                })
                .collect()
        })
    }

    /// Every workload's proxy, given its slice, has the same own entry, the same policies
    /// applying to it (authorization, JWT, mTLS per port), and resolves every authority to
    /// the same destinations (workload, port, inbound address, service, expected identity,
    /// whether to originate mTLS) as with the whole model; unknown authorities stay unknown.
    #[test]
    fn slice_behaves_as_the_whole_model() {
        let f = slice_folder();
        let whole = assemble_all(&to_resources(&f)).unwrap();
        let whole_engine =
            rampart_authz::Engine::new(whole.resources.iter().cloned(), whole.mesh.clone());
        let mut authorities = Vec::new();
        let hosts: Vec<(String, String)> = f
            .registry
            .workloads
            .iter()
            .map(|w| (w.name.clone(), w.namespace.clone()))
            .chain(
                f.registry
                    .services
                    .iter()
                    .map(|s| (s.name.clone(), s.namespace.clone())),
            )
            .chain([("nope".to_string(), "ns1".to_string())])
            .collect();
        for (name, ns) in &hosts {
            for host in [
                name.clone(),
                format!("{name}.{ns}"),
                format!("{name}.{ns}.svc"),
                format!("{name}.{ns}.svc.cluster.local"),
            ] {
                authorities.push(host.clone());
                for port in [80, 81, 82, 8080, 9999] {
                    authorities.push(format!("{host}:{port}"));
                }
            }
        }
        let mut resolved = 0;
        for w in &f.registry.workloads {
            let sliced = assemble_all(&slice_for(&f, &w.namespace, &w.name))
                .unwrap_or_else(|e| panic!("{}: {e:?}", w.key()));
            assert_eq!(sliced.registry.get(&w.namespace, &w.name), Some(w));
            assert_eq!(sliced.mesh, whole.mesh);
            let engine =
                rampart_authz::Engine::new(sliced.resources.iter().cloned(), sliced.mesh.clone());
            let me = w.authz_workload();
            assert_eq!(engine.policies_for(&me), whole_engine.policies_for(&me));
            assert_eq!(
                engine.jwt_output_headers(&me),
                whole_engine.jwt_output_headers(&me)
            );
            for p in &w.ports {
                assert_eq!(
                    engine.peer_authentication(&me, p.port),
                    whole_engine.peer_authentication(&me, p.port)
                );
            }
            for a in &authorities {
                let got = routes(&sliced, a, &w.namespace);
                assert_eq!(got, routes(&whole, a, &w.namespace), "{} -> {a}", w.key());
                resolved += usize::from(got.is_some());
            }
        }
        // The comparison is not vacuous: services, workloads as their own service, DISABLE
        // destinations and unknown names were all exercised.
        assert!(resolved > 50, "{resolved}");
        let canary = routes(&whole, "api.ns2:8080", "ns1").unwrap();
        assert_eq!(canary.len(), 2);
        assert!(canary[1].ends_with("Disable"), "{canary:?}");
        assert!(routes(&whole, "c.ns3:82", "ns1").unwrap()[0].ends_with("Disable"));
        assert!(routes(&whole, "c.ns3:81", "ns1").unwrap()[0].ends_with("Strict"));
        assert!(routes(&whole, "api.ns2:80", "ns1").is_none());
    }

    /// Pods share proxy listener addresses (every sidecar's outbound is 127.0.0.1:15001):
    /// the whole model then fails the registry's address check, while every workload's
    /// slice assembles (only its own listeners are in it).
    #[test]
    fn pods_sharing_proxy_addresses_assemble_sliced() {
        let mut f = slice_folder();
        for w in &mut f.registry.workloads {
            w.proxy.outbound = Some("127.0.0.1:15001".parse().unwrap());
            w.proxy.admin = Some("127.0.0.1:15000".parse().unwrap());
        }
        let e = assemble_all(&to_resources(&f)).unwrap_err();
        assert!(e.iter().any(|p| p.reason.contains("already used")), "{e:?}");
        for w in &f.registry.workloads {
            let s = assemble_all(&slice_for(&f, &w.namespace, &w.name))
                .unwrap_or_else(|e| panic!("{}: {e:?}", w.key()));
            assert_eq!(s.registry.get(&w.namespace, &w.name), Some(w));
        }
    }

    /// A workload that is not in the registry gets the mesh settings alone (no entry: no
    /// proxy builds from it), not the policies or registry.
    #[test]
    fn unknown_workload_gets_the_mesh_settings_alone() {
        let f = slice_folder();
        let rs = slice_for(&f, "ns1", "ghost");
        assert_eq!(names(&rs), vec!["mesh"]);
        let rs = slice_for(&f, "ns9", "a");
        assert_eq!(names(&rs), vec!["mesh"]);
    }

    /// A port's `mtls` (what a streamed destination entry carries) is read and travels
    /// through resources; an unknown mode is refused naming the field.
    #[test]
    fn port_mtls_mode_round_trips_and_bad_modes_are_refused() {
        let reg = "workloads:\n- {name: a, namespace: ns1, ports: [{port: 80, app: '127.0.0.1:9000', inbound: '127.0.0.1:9001', mtls: DISABLE}]}\n";
        let r = crate::parse_registry("w", reg).unwrap();
        assert_eq!(
            r.workloads[0].ports[0].mtls,
            Some(rampart_authz::MtlsMode::Disable)
        );
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(crate::MESH_FILE), MESH).unwrap();
        std::fs::write(d.path().join(crate::WORKLOADS_FILE), reg).unwrap();
        let f = MeshFolder::load(d.path()).unwrap();
        let back = assemble_all(&to_resources(&f)).unwrap();
        assert_eq!(back.registry, f.registry);
        let e = crate::parse_registry("w", &reg.replace("DISABLE", "OFF")).unwrap_err();
        assert!(
            e.iter().any(|p| p.field == "workloads[0].ports[0].mtls"),
            "{e:?}"
        );
    }
}
