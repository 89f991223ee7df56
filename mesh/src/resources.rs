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
        "extensionProviders": m.extension_providers.iter().map(|n| json!({"name": n})).collect::<Vec<_>>(),
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
        "ports": w.ports.iter().map(|p| json!({
            "port": p.port,
            "protocol": p.protocol.as_str(),
            "app": p.app.to_string(),
            "inbound": p.inbound.to_string(),
        })).collect::<Vec<_>>(),
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
}
