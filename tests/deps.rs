//! Dependency direction, checked against `cargo metadata` (see STYLE.md §2):
//!
//! ```text
//! layer 0   certs      proto                (no workspace deps)
//! layer 1   authz ───► certs  (+ proto via an optional feature)
//!           mesh ────► certs, authz         (nothing else of ours; no networking)
//! layer 2   citadel, node-agent, proxy      (no arrows between them, normal, dev or build)
//! layer 2.5 k8s ─────► certs, proto, authz, mesh, citadel  (kube-rs lives only here;
//!                      only rampart depends on it; its tests may use proxy, dev-only)
//!           discovery ► certs, proto, authz, mesh  (the config stream's server; only
//!                      rampart depends on it)
//! layer 3   rampart (src/)                  (nothing depends on it, by any kind of edge:
//!                                            neither its binary nor its library, src/lib.rs)
//! ```
//! plus: certs, authz and mesh pull in no async runtime or networking (tokio, tonic, hyper,
//! mio, socket2, h2) through their normal, non-optional dependencies (mesh's folder watcher
//! is its optional feature `watch`), and the whole graph has one crypto
//! backend (no aws-lc-rs, no OpenSSL bindings) and none of the crates we ban.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use serde_json::Value;

const NETWORKING: &[&str] = &["tokio", "tonic", "hyper", "mio", "socket2", "h2"];
const BANNED_ANYWHERE: &[&str] = &[
    "aws-lc-rs",
    "aws-lc-sys",
    "aws-lc-fips-sys",
    "openssl",
    "openssl-sys",
    "rustls-pemfile",
    "serde_yaml",
    "serde_yml",
    "rsa",
];
const LAYER2: &[&str] = &["rampart-citadel", "rampart-node-agent", "rampart-proxy"];

struct Graph<'a> {
    /// package id -> crate name
    names: HashMap<&'a str, &'a str>,
    /// package id -> (dependency id, has a normal (non-dev, non-build) edge)
    edges: HashMap<&'a str, Vec<(&'a str, bool)>>,
    /// crate name -> package id, for workspace members
    members: HashMap<&'a str, &'a str>,
    /// (workspace crate, dependency name) -> optional?
    optional: HashMap<(&'a str, &'a str), bool>,
}

impl<'a> Graph<'a> {
    fn new(meta: &'a Value) -> Self {
        let mut names = HashMap::new();
        let mut optional = HashMap::new();
        for p in meta["packages"].as_array().expect("packages") {
            let name = p["name"].as_str().expect("name");
            names.insert(p["id"].as_str().expect("id"), name);
            // Normal dependencies only: a dev-dependency on the same crate (mesh's tests use
            // tokio) says nothing about whether the library needs it.
            for d in p["dependencies"].as_array().into_iter().flatten() {
                if !d["kind"].is_null() {
                    continue;
                }
                let dep = d["name"].as_str().unwrap_or_default();
                let opt = d["optional"].as_bool().unwrap_or(false);
                optional.insert((name, dep), opt);
            }
        }
        let members = meta["workspace_members"]
            .as_array()
            .expect("workspace_members")
            .iter()
            .filter_map(Value::as_str)
            .map(|id| (names[id], id))
            .collect();
        let mut edges = HashMap::new();
        for n in meta["resolve"]["nodes"].as_array().expect("resolve.nodes") {
            let id = n["id"].as_str().expect("node id");
            let deps = n["deps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| {
                    let normal = d["dep_kinds"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|k| k["kind"].is_null());
                    (d["pkg"].as_str().expect("dep pkg"), normal)
                })
                .collect();
            edges.insert(id, deps);
        }
        Graph {
            names,
            edges,
            members,
            optional,
        }
    }

    /// Names of everything reachable from `root` through normal edges, not entering
    /// the crates named in `stop`.
    fn normal_closure(&self, root: &str, stop: &[&str]) -> BTreeSet<&'a str> {
        let mut seen = BTreeSet::new();
        let root_id = self.members[root];
        let mut todo = vec![root_id];
        let mut visited = BTreeSet::new();
        while let Some(id) = todo.pop() {
            if !visited.insert(id) {
                continue;
            }
            for (dep, normal) in self.edges.get(id).into_iter().flatten() {
                let name = self.names[dep];
                // The root's optional dependencies come only with a feature that asks for
                // them (mesh's folder watcher, authz's proto); the resolved graph unifies
                // features across the workspace, so they are left out here by name.
                let optional_of_root =
                    id == root_id && self.optional.get(&(root, name)).copied().unwrap_or(false);
                if *normal && !stop.contains(&name) && !optional_of_root {
                    seen.insert(name);
                    todo.push(dep);
                }
            }
        }
        seen
    }

    /// Workspace crates `member` depends on directly, by any kind of edge.
    fn workspace_deps(&self, member: &str) -> BTreeSet<&'a str> {
        self.edges
            .get(self.members[member])
            .into_iter()
            .flatten()
            .map(|(dep, _)| self.names[dep])
            .filter(|n| self.members.contains_key(n))
            .collect()
    }

    /// Workspace crates `member` depends on directly through a normal (non-dev,
    /// non-build) edge.
    fn workspace_normal_deps(&self, member: &str) -> BTreeSet<&'a str> {
        self.edges
            .get(self.members[member])
            .into_iter()
            .flatten()
            .filter(|(_, normal)| *normal)
            .map(|(dep, _)| self.names[dep])
            .filter(|n| self.members.contains_key(n))
            .collect()
    }

    /// Workspace crates reachable from `member` through workspace crates, any edge kind.
    fn workspace_closure(&self, member: &str) -> BTreeSet<&'a str> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![member];
        while let Some(m) = todo.pop() {
            for dep in self.workspace_deps(m) {
                if seen.insert(dep) {
                    todo.push(dep);
                }
            }
        }
        seen
    }
}

/// Every rule broken by the graph in `meta`, one line each.
fn violations(meta: &Value) -> Vec<String> {
    let g = Graph::new(meta);
    let mut out = Vec::new();

    for krate in ["rampart-certs", "rampart-authz", "rampart-mesh"] {
        if !g.members.contains_key(krate) {
            out.push(format!("{krate} is not a workspace member"));
            continue;
        }
        // authz may reach proto (and whatever proto needs) only through its optional
        // feature; everything else it depends on must stay off the network.
        let stop: &[&str] = if krate != "rampart-certs" {
            &["rampart-proto"]
        } else {
            &[]
        };
        for bad in g.normal_closure(krate, stop) {
            if NETWORKING.contains(&bad) {
                out.push(format!("{krate} depends (normally, transitively) on {bad}"));
            }
        }
    }

    for a in LAYER2 {
        if !g.members.contains_key(a) {
            continue;
        }
        for b in g.workspace_closure(a) {
            if LAYER2.contains(&b) {
                out.push(format!(
                    "{a} depends on {b} (no arrows between layer-2 crates)"
                ));
            }
        }
    }

    for leaf in ["rampart-certs", "rampart-proto"] {
        if g.members.contains_key(leaf) {
            for dep in g.workspace_deps(leaf) {
                out.push(format!("{leaf} depends on workspace crate {dep}"));
            }
        }
    }

    if g.members.contains_key("rampart-authz") {
        for dep in g.workspace_deps("rampart-authz") {
            match dep {
                "rampart-certs" => {}
                "rampart-proto" => {
                    if !g
                        .optional
                        .get(&("rampart-authz", dep))
                        .copied()
                        .unwrap_or(false)
                    {
                        out.push(
                            "rampart-authz depends on rampart-proto, which must be optional".into(),
                        );
                    }
                }
                other => out.push(format!(
                    "rampart-authz depends on {other} (only certs, + optional proto)"
                )),
            }
        }
    }

    if g.members.contains_key("rampart-mesh") {
        for dep in g.workspace_deps("rampart-mesh") {
            if !matches!(dep, "rampart-certs" | "rampart-authz") {
                out.push(format!(
                    "rampart-mesh depends on {dep} (only certs and authz)"
                ));
            }
        }
    }

    // Kubernetes mode sits between the layer-2 crates and the binary: it may use certs,
    // proto, authz, mesh and citadel, and only the binary's package may use it.
    if g.members.contains_key("rampart-k8s") {
        // Its tests may run in-process proxies fed by the Kubernetes source (a dev-only
        // edge to rampart-proxy); the library itself never depends on a layer-2 crate
        // other than citadel.
        let normal = g.workspace_normal_deps("rampart-k8s");
        for dep in g.workspace_deps("rampart-k8s") {
            let dev_only_proxy = dep == "rampart-proxy" && !normal.contains(dep);
            if !dev_only_proxy
                && !matches!(
                    dep,
                    "rampart-certs"
                        | "rampart-proto"
                        | "rampart-authz"
                        | "rampart-mesh"
                        | "rampart-citadel"
                )
            {
                out.push(format!(
                    "rampart-k8s depends on {dep} (only certs, proto, authz, mesh, citadel)"
                ));
            }
        }
        for member in g.members.keys() {
            if !matches!(*member, "rampart" | "rampart-k8s")
                && g.workspace_deps(member).contains("rampart-k8s")
            {
                out.push(format!(
                    "{member} depends on rampart-k8s (only rampart may)"
                ));
            }
        }
    }
    // The config stream's server sits beside k8s: it reads the mesh model and serves the
    // proto; citadel (which hosts it on its port) and the proxy (its client) never see it,
    // and only the binary's package may use it.
    if g.members.contains_key("rampart-discovery") {
        for dep in g.workspace_deps("rampart-discovery") {
            if !matches!(
                dep,
                "rampart-certs" | "rampart-proto" | "rampart-authz" | "rampart-mesh"
            ) {
                out.push(format!(
                    "rampart-discovery depends on {dep} (only certs, proto, authz, mesh)"
                ));
            }
        }
        for member in g.members.keys() {
            if !matches!(*member, "rampart" | "rampart-discovery")
                && g.workspace_deps(member).contains("rampart-discovery")
            {
                out.push(format!(
                    "{member} depends on rampart-discovery (only rampart may)"
                ));
            }
        }
    }
    // kube-rs (and its Kubernetes types) only through rampart-k8s.
    for member in g.members.keys() {
        if matches!(*member, "rampart" | "rampart-k8s") {
            continue;
        }
        for bad in g.normal_closure(member, &[]) {
            if matches!(bad, "kube" | "kube-client" | "k8s-openapi") {
                out.push(format!(
                    "{member} depends (normally, transitively) on {bad}: Kubernetes code belongs in rampart-k8s"
                ));
            }
        }
    }

    // The binary's package is the top: no workspace crate may depend on it.
    for member in g.members.keys() {
        if *member != "rampart" && g.workspace_deps(member).contains("rampart") {
            out.push(format!(
                "{member} depends on rampart (src/ is the top layer)"
            ));
        }
    }

    let everything: BTreeSet<&str> = g.names.values().copied().collect();
    for bad in BANNED_ANYWHERE {
        if everything.contains(bad) {
            out.push(format!("{bad} is in the dependency graph"));
        }
    }
    if !everything.contains("ring") {
        out.push("ring (our one crypto backend) is missing".into());
    }
    out
}

fn cargo_metadata() -> Value {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--manifest-path",
            manifest,
        ])
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata JSON")
}

#[test]
fn workspace_dependency_direction_holds() {
    let meta = cargo_metadata();
    let found = violations(&meta);
    assert!(
        found.is_empty(),
        "dependency rules broken:\n{}",
        found.join("\n")
    );
}

/// The checker itself catches each kind of violation (the negative twin of the test
/// above): a synthetic graph breaking every rule once.
#[test]
fn checker_reports_each_violation() {
    fn pkg(name: &str, deps: &[(&str, bool)]) -> Value {
        serde_json::json!({
            "id": format!("{name}-id"),
            "name": name,
            "dependencies": deps.iter().map(|(d, opt)| serde_json::json!({"name": d, "optional": opt})).collect::<Vec<_>>(),
        })
    }
    fn node(name: &str, deps: &[(&str, Option<&str>)]) -> Value {
        serde_json::json!({
            "id": format!("{name}-id"),
            "deps": deps.iter().map(|(d, kind)| serde_json::json!({
                "name": d, "pkg": format!("{d}-id"), "dep_kinds": [{"kind": kind, "target": null}],
            })).collect::<Vec<_>>(),
        })
    }
    let meta = serde_json::json!({
        "packages": [
            pkg("rampart-certs", &[("mio", false), ("rampart-proto", false)]),
            pkg("rampart-proto", &[]),
            pkg("rampart-authz", &[("rampart-certs", false), ("rampart-proto", false), ("regex", false)]),
            pkg("rampart-citadel", &[("rampart-node-agent", false)]),
            pkg("rampart-node-agent", &[]),
            pkg("rampart-proxy", &[("rampart-citadel", false)]),
            pkg("rampart-mesh", &[("rampart-proxy", false), ("tokio", true), ("mio", false)]),
            pkg("rampart", &[]),
            pkg("mio", &[]),
            pkg("regex", &[("tokio", false)]),
            pkg("tokio", &[]),
            pkg("aws-lc-rs", &[]),
            pkg("criterion", &[("hyper", false)]),
            pkg("hyper", &[]),
        ],
        "workspace_members": [
            "rampart-certs-id", "rampart-proto-id", "rampart-authz-id",
            "rampart-citadel-id", "rampart-node-agent-id", "rampart-proxy-id",
            "rampart-mesh-id", "rampart-id",
        ],
        "resolve": { "nodes": [
            node("rampart-certs", &[("mio", None), ("rampart-proto", None), ("criterion", Some("dev"))]),
            node("rampart-proto", &[]),
            node("rampart-authz", &[("rampart-certs", None), ("rampart-proto", None), ("regex", None)]),
            node("rampart-citadel", &[("rampart-node-agent", Some("dev"))]),
            node("rampart-node-agent", &[("rampart", Some("dev"))]),
            node("rampart-proxy", &[("rampart-citadel", None)]),
            node("rampart-mesh", &[("rampart-proxy", None), ("tokio", None), ("mio", None)]),
            node("rampart", &[]),
            node("mio", &[]),
            node("regex", &[("tokio", None)]),
            node("tokio", &[]),
            node("aws-lc-rs", &[]),
            node("criterion", &[("hyper", None)]),
            node("hyper", &[]),
        ]},
    });
    let found = violations(&meta).join("\n");
    // An optional dependency (mesh's `watch` feature) is not a violation, whatever
    // feature unification put in the resolved graph.
    assert!(
        !found.contains("rampart-mesh depends (normally, transitively) on tokio"),
        "{found}"
    );

    for want in [
        "rampart-certs depends (normally, transitively) on mio",
        "rampart-authz depends (normally, transitively) on tokio",
        "rampart-citadel depends on rampart-node-agent",
        "rampart-proxy depends on rampart-citadel",
        "rampart-proxy depends on rampart-node-agent",
        "rampart-mesh depends on rampart-proxy (only certs and authz)",
        "rampart-mesh depends (normally, transitively) on mio",
        "rampart-node-agent depends on rampart (src/ is the top layer)",
        "rampart-certs depends on workspace crate rampart-proto",
        "rampart-proto, which must be optional",
        "aws-lc-rs is in the dependency graph",
        "ring (our one crypto backend) is missing",
    ] {
        assert!(found.contains(want), "missing {want:?} in:\n{found}");
    }
    // A dev-only path (certs -> criterion -> hyper) is not a normal dependency.
    assert!(!found.contains("on hyper"), "{found}");
}

#[test]
fn checker_reports_kubernetes_layer_violations_and_accepts_the_allowed_arrows() {
    fn graph(edges: &[(&str, &[&str])]) -> Value {
        let mut names: Vec<&str> = edges.iter().map(|(n, _)| *n).collect();
        for (_, deps) in edges {
            names.extend(deps.iter().copied());
        }
        names.sort_unstable();
        names.dedup();
        let members: Vec<String> = names
            .iter()
            .filter(|n| n.starts_with("rampart"))
            .map(|n| format!("{n}-id"))
            .collect();
        let deps_of = |n: &str| -> Vec<&str> {
            edges
                .iter()
                .find(|(m, _)| *m == n)
                .map(|(_, d)| d.to_vec())
                .unwrap_or_default()
        };
        serde_json::json!({
            "packages": names.iter().map(|n| serde_json::json!({
                "id": format!("{n}-id"), "name": n,
                "dependencies": deps_of(n).iter().map(|d| serde_json::json!({"name": d, "optional": false})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "workspace_members": members,
            "resolve": {"nodes": names.iter().map(|n| serde_json::json!({
                "id": format!("{n}-id"),
                "deps": deps_of(n).iter().map(|d| serde_json::json!({
                    "name": d, "pkg": format!("{d}-id"), "dep_kinds": [{"kind": null, "target": null}],
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()},
        })
    }
    let bad = graph(&[
        ("rampart", &["rampart-k8s", "ring"]),
        ("rampart-k8s", &["rampart-citadel", "rampart-proxy", "kube"]),
        ("rampart-node-agent", &["rampart-k8s"]),
        ("rampart-proxy", &["k8s-openapi", "rampart-discovery"]),
        ("rampart-citadel", &[]),
        ("rampart-discovery", &["rampart-citadel", "rampart-mesh"]),
    ]);
    let found = violations(&bad).join("\n");
    for want in [
        "rampart-discovery depends on rampart-citadel (only certs, proto, authz, mesh)",
        "rampart-proxy depends on rampart-discovery (only rampart may)",
        "rampart-k8s depends on rampart-proxy (only certs, proto, authz, mesh, citadel)",
        "rampart-node-agent depends on rampart-k8s (only rampart may)",
        "rampart-proxy depends (normally, transitively) on k8s-openapi",
        "rampart-node-agent depends (normally, transitively) on kube",
    ] {
        assert!(found.contains(want), "missing {want:?} in:\n{found}");
    }
    assert!(
        !found.contains("rampart-k8s depends on rampart-citadel"),
        "{found}"
    );

    // The twin: the allowed arrows report nothing.
    let good = graph(&[
        (
            "rampart",
            &[
                "rampart-k8s",
                "rampart-citadel",
                "rampart-discovery",
                "ring",
            ],
        ),
        (
            "rampart-discovery",
            &["rampart-mesh", "rampart-proto", "rampart-certs"],
        ),
        (
            "rampart-k8s",
            &["rampart-citadel", "rampart-certs", "kube", "k8s-openapi"],
        ),
        ("rampart-citadel", &["rampart-certs"]),
        ("rampart-authz", &["rampart-certs"]),
        ("rampart-mesh", &["rampart-certs", "rampart-authz"]),
        ("rampart-certs", &[]),
    ]);
    let found = violations(&good);
    assert!(found.is_empty(), "{found:?}");
}

/// rampart-k8s's tests may run proxies: a dev-only edge to rampart-proxy is allowed, a
/// normal one is not (the twin of the check above).
#[test]
fn checker_allows_k8s_a_dev_only_edge_to_proxy() {
    fn graph(kind: Value) -> Value {
        let names = ["rampart", "rampart-k8s", "rampart-proxy"];
        let edges: &[(&str, &[&str])] = &[
            ("rampart", &["rampart-k8s"]),
            ("rampart-k8s", &["rampart-proxy"]),
            ("rampart-proxy", &[]),
        ];
        let deps_of = |n: &str| edges.iter().find(|(m, _)| *m == n).unwrap().1.to_vec();
        serde_json::json!({
            "packages": names.iter().map(|n| serde_json::json!({
                "id": format!("{n}-id"), "name": n,
                "dependencies": deps_of(n).iter().map(|d| serde_json::json!({
                    "name": d, "optional": false, "kind": if *n == "rampart-k8s" { kind.clone() } else { Value::Null },
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "workspace_members": names.iter().map(|n| format!("{n}-id")).collect::<Vec<_>>(),
            "resolve": {"nodes": names.iter().map(|n| serde_json::json!({
                "id": format!("{n}-id"),
                "deps": deps_of(n).iter().map(|d| serde_json::json!({
                    "name": d, "pkg": format!("{d}-id"),
                    "dep_kinds": [{"kind": if *n == "rampart-k8s" { kind.clone() } else { Value::Null }, "target": null}],
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()},
        })
    }
    let dev = violations(&graph(Value::String("dev".into()))).join("\n");
    assert!(
        !dev.contains("rampart-k8s depends on rampart-proxy"),
        "{dev}"
    );
    let normal = violations(&graph(Value::Null)).join("\n");
    assert!(
        normal.contains("rampart-k8s depends on rampart-proxy"),
        "{normal}"
    );
}
