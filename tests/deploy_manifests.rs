//! deploy/kubernetes/: every document is a Kubernetes object of a known kind whose every field
//! is one Kubernetes has (typed round trip through k8s-openapi: a misspelt field would be
//! dropped and fail the comparison); RBAC is least privilege; the CA Deployment runs two
//! replicas with probes on a real endpoint, non-root with a read-only root filesystem, and a
//! PodDisruptionBudget; and every flag the manifests pass to `rampart` is accepted by the
//! real binary's parser.
//!
//! No cluster here: `kubectl apply --dry-run=client` needs an API server for discovery, so the
//! server-side dry run is left to the suite run against a real cluster (docs/KUBERNETES.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

const NS: &str = "istio-system";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// (file name, document) for every YAML file in deploy/kubernetes and its crds/ folder.
fn manifests() -> Vec<(String, Value)> {
    let mut files = Vec::new();
    for dir in [deploy_dir(), deploy_dir().join("crds")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 7, "manifests missing: {files:?}");
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.strip_prefix(deploy_dir()).unwrap().display().to_string();
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{name}: not YAML: {e}"));
        assert!(!docs.is_empty(), "{name}: no documents");
        for d in docs {
            out.push((name.clone(), d));
        }
    }
    out
}

fn of_kind<'a>(all: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    all.iter()
        .filter(|(_, d)| d["kind"] == kind)
        .map(|(_, d)| d)
        .collect()
}

fn one<'a>(all: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    let found: Vec<_> = of_kind(all, kind)
        .into_iter()
        .filter(|d| d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "{kind} {name}: found {}", found.len());
    found[0]
}

/// `value` through the typed struct and back must be `value` itself.
fn round_trip<T>(file: &str, value: &Value)
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let typed: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| {
        panic!(
            "{file}: {} {}: {e}",
            value["kind"], value["metadata"]["name"]
        )
    });
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &back, value,
        "{file}: {} {}: a field is not Kubernetes' (lost in a typed round trip)",
        value["kind"], value["metadata"]["name"]
    );
}

#[test]
fn every_manifest_is_a_kubernetes_object_with_known_fields() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let all = manifests();
    let mut kinds = BTreeSet::new();
    for (file, d) in &all {
        let kind = d["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: no kind"));
        kinds.insert(kind.to_owned());
        assert!(
            d["metadata"]["name"].is_string(),
            "{file}: {kind} without a name"
        );
        match kind {
            "Namespace" => round_trip::<Namespace>(file, d),
            "ServiceAccount" => round_trip::<ServiceAccount>(file, d),
            "ClusterRole" => round_trip::<ClusterRole>(file, d),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(file, d),
            "Role" => round_trip::<Role>(file, d),
            "RoleBinding" => round_trip::<RoleBinding>(file, d),
            "Deployment" => round_trip::<Deployment>(file, d),
            "Service" => round_trip::<Service>(file, d),
            "PodDisruptionBudget" => round_trip::<PodDisruptionBudget>(file, d),
            "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(file, d),
            "MutatingWebhookConfiguration" => round_trip::<MutatingWebhookConfiguration>(file, d),
            other => panic!("{file}: unexpected kind {other}"),
        }
        // Namespaced objects live in the CA's namespace; cluster-scoped ones name none.
        let cluster_scoped = matches!(
            kind,
            "Namespace"
                | "ClusterRole"
                | "ClusterRoleBinding"
                | "CustomResourceDefinition"
                | "MutatingWebhookConfiguration"
        );
        if cluster_scoped {
            assert!(
                d["metadata"]["namespace"].is_null(),
                "{file}: {kind} has a namespace"
            );
        } else {
            assert_eq!(d["metadata"]["namespace"], NS, "{file}: {kind}");
        }
        // CRDs only in crds/ (so `kubectl apply -f deploy/kubernetes/` never replaces Istio's).
        assert_eq!(
            kind == "CustomResourceDefinition",
            file.starts_with("crds/"),
            "{file}: {kind}"
        );
    }
    for k in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "CustomResourceDefinition",
    ] {
        assert!(kinds.contains(k), "no {k} in deploy/kubernetes");
    }
}

/// The three security.istio.io kinds, v1 (stored) and v1beta1 served, permissive schemas.
#[test]
fn crds_serve_istio_security_kinds_v1_and_v1beta1() {
    let all = manifests();
    let crds = of_kind(&all, "CustomResourceDefinition");
    let names: BTreeSet<&str> = crds
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "authorizationpolicies.security.istio.io",
            "peerauthentications.security.istio.io",
            "requestauthentications.security.istio.io",
        ])
    );
    for c in crds {
        assert_eq!(c["spec"]["group"], "security.istio.io");
        assert_eq!(c["spec"]["scope"], "Namespaced");
        let versions = c["spec"]["versions"].as_array().unwrap();
        let served: BTreeMap<&str, (bool, bool)> = versions
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap(),
                    (v["served"] == true, v["storage"] == true),
                )
            })
            .collect();
        assert_eq!(
            served,
            BTreeMap::from([("v1", (true, true)), ("v1beta1", (true, false))])
        );
        for v in versions {
            assert_eq!(
                v["schema"]["openAPIV3Schema"]["x-kubernetes-preserve-unknown-fields"],
                true
            );
        }
    }
}

/// (api group, resource, namespace or "" for cluster-wide) -> verbs, with resourceNames.
type Grants = BTreeMap<(String, String, String), BTreeSet<String>>;

/// Everything the manifests' Roles and ClusterRoles grant to the CA's ServiceAccount, and
/// the problems found on the way (wildcards, rules bound to nobody).
fn grants(all: &[(String, Value)]) -> (Grants, Vec<String>) {
    let mut problems = Vec::new();
    let mut g = Grants::new();
    let bound = |kind: &str, binding_kind: &str, name: &str, ns: &str| {
        of_kind(all, binding_kind).iter().any(|b| {
            b["roleRef"]["kind"] == kind
                && b["roleRef"]["name"] == name
                && (binding_kind == "ClusterRoleBinding" || b["metadata"]["namespace"] == ns)
                && b["subjects"].as_array().is_some_and(|s| {
                    s.iter().any(|s| {
                        s["kind"] == "ServiceAccount"
                            && s["name"] == "rampart-ca"
                            && s["namespace"] == NS
                    })
                })
        })
    };
    for (kind, binding) in [
        ("ClusterRole", "ClusterRoleBinding"),
        ("Role", "RoleBinding"),
    ] {
        for role in of_kind(all, kind) {
            let name = role["metadata"]["name"].as_str().unwrap();
            let ns = role["metadata"]["namespace"].as_str().unwrap_or("");
            if !bound(kind, binding, name, ns) {
                problems.push(format!("{kind} {name} is bound to no rampart-ca account"));
            }
            for rule in role["rules"].as_array().unwrap() {
                let list = |k: &str| -> Vec<String> {
                    rule[k]
                        .as_array()
                        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
                        .unwrap_or_default()
                };
                if rule.get("nonResourceURLs").is_some() {
                    problems.push(format!("{kind} {name}: nonResourceURLs granted"));
                }
                let (groups, resources, verbs, rnames) = (
                    list("apiGroups"),
                    list("resources"),
                    list("verbs"),
                    list("resourceNames"),
                );
                for w in groups.iter().chain(&resources).chain(&verbs) {
                    if w.contains('*') {
                        problems.push(format!("{kind} {name}: wildcard {w:?}"));
                    }
                }
                for group in &groups {
                    for res in &resources {
                        let key = (group.clone(), res.clone(), ns.to_owned());
                        for v in &verbs {
                            let shown = if rnames.is_empty() {
                                v.clone()
                            } else {
                                format!("{v}[{}]", rnames.join(","))
                            };
                            g.entry(key.clone()).or_default().insert(shown);
                        }
                    }
                }
            }
        }
    }
    (g, problems)
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// The problems with a grant set: anything beyond `expected_grants`, or missing from it, and
/// Secrets readable outside the CA's namespace.
fn rbac_problems(g: &Grants) -> Vec<String> {
    let mut problems = Vec::new();
    let expected = expected_grants();
    for (key, verbs) in g {
        if key.1 == "secrets" && key.2 != NS {
            problems.push(format!(
                "secrets granted {} (only a Role in {NS} may)",
                if key.2.is_empty() {
                    "cluster-wide".to_owned()
                } else {
                    format!("in {}", key.2)
                }
            ));
        }
        match expected.get(key) {
            None => problems.push(format!("unexpected grant {key:?}: {verbs:?}")),
            Some(want) if want != verbs => problems.push(format!(
                "{key:?}: granted {verbs:?}, least privilege is {want:?}"
            )),
            Some(_) => {}
        }
    }
    for key in expected.keys() {
        if !g.contains_key(key) {
            problems.push(format!("missing grant {key:?}"));
        }
    }
    problems
}

/// Least privilege, exactly: what the CA (and the config stream built on it) calls.
fn expected_grants() -> Grants {
    let mut e = Grants::new();
    let mut put = |group: &str, res: &str, ns: &str, verbs: &[&str]| {
        e.insert((group.into(), res.into(), ns.into()), set(verbs));
    };
    put("authentication.k8s.io", "tokenreviews", "", &["create"]);
    for r in ["pods", "services", "namespaces"] {
        put("", r, "", &["get", "list", "watch"]);
    }
    for r in [
        "peerauthentications",
        "requestauthentications",
        "authorizationpolicies",
    ] {
        put("security.istio.io", r, "", &["get", "list", "watch"]);
    }
    put(
        "",
        "configmaps",
        "",
        &["get", "list", "watch", "create", "update"],
    );
    // The injection webhook's configuration: its caBundle, by name.
    put(
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        "",
        &[
            "get[rampart-sidecar-injector]",
            "patch[rampart-sidecar-injector]",
        ],
    );
    put("", "events", "", &["create"]);
    put("events.k8s.io", "events", "", &["create"]);
    put(
        "",
        "secrets",
        NS,
        &[
            "get[cacerts,istio-ca-secret]",
            "list[cacerts,istio-ca-secret]",
            "watch[cacerts,istio-ca-secret]",
            "create",
            "update[istio-ca-secret]",
        ],
    );
    put(
        "coordination.k8s.io",
        "leases",
        NS,
        &["get", "create", "update"],
    );
    // The shared revocations (rampart_k8s::revocations): one ConfigMap by name, and create.
    put(
        "",
        "configmaps",
        NS,
        &[
            "get[rampart-ca-revocations]",
            "list[rampart-ca-revocations]",
            "watch[rampart-ca-revocations]",
            "update[rampart-ca-revocations]",
            "create",
        ],
    );
    e
}

#[test]
fn rbac_is_least_privilege() {
    let all = manifests();
    let (g, problems) = grants(&all);
    assert!(problems.is_empty(), "{problems:#?}");
    let problems = rbac_problems(&g);
    assert!(problems.is_empty(), "{problems:#?}");
    // The ClusterRole names no Secrets at all.
    let cr = one(&all, "ClusterRole", "rampart-ca");
    assert!(!cr.to_string().contains("secrets"));
}

/// The twin: the checker refuses cluster-wide Secrets, wildcards, extra verbs, and rules
/// bound to no one.
#[test]
fn rbac_checker_refuses_broader_grants() {
    let all = manifests();
    let with = |f: &dyn Fn(&mut Value)| -> Vec<(String, Value)> {
        let mut all = all.clone();
        for (_, d) in all.iter_mut() {
            f(d);
        }
        all
    };
    let problems_of = |all: &[(String, Value)]| {
        let (g, mut p) = grants(all);
        p.extend(rbac_problems(&g));
        p.join("\n")
    };

    let cluster_secrets = with(&|d| {
        if d["kind"] == "ClusterRole" {
            d["rules"].as_array_mut().unwrap().push(serde_json::json!(
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
            ));
        }
    });
    assert!(problems_of(&cluster_secrets).contains("secrets granted cluster-wide"));

    let wildcard = with(&|d| {
        if d["kind"] == "ClusterRole" {
            d["rules"][0]["verbs"] = serde_json::json!(["*"]);
        }
    });
    assert!(problems_of(&wildcard).contains("wildcard \"*\""));

    let extra_verb = with(&|d| {
        if d["kind"] == "Role" {
            d["rules"][2]["verbs"] = serde_json::json!(["get", "create", "update", "delete"]);
        }
    });
    assert!(problems_of(&extra_verb).contains("least privilege"));

    let all_secrets = with(&|d| {
        if d["kind"] == "Role" {
            d["rules"][0]
                .as_object_mut()
                .unwrap()
                .remove("resourceNames");
        }
    });
    assert!(problems_of(&all_secrets).contains("least privilege"));

    // Update of istio-ca-secret (the renewed root) only by name: on every Secret it is refused.
    let update_any_secret = with(&|d| {
        if d["kind"] == "Role" {
            d["rules"][3]
                .as_object_mut()
                .unwrap()
                .remove("resourceNames");
        }
    });
    assert!(problems_of(&update_any_secret).contains("least privilege"));
    let any_configmap = with(&|d| {
        if d["kind"] == "Role" {
            for rule in d["rules"].as_array_mut().unwrap() {
                if rule["resources"][0] == "configmaps" {
                    rule.as_object_mut().unwrap().remove("resourceNames");
                }
            }
        }
    });
    assert!(problems_of(&any_configmap).contains("least privilege"));

    let unbound = with(&|d| {
        if d["kind"] == "RoleBinding" {
            d["subjects"][0]["name"] = "someone-else".into();
        }
    });
    assert!(problems_of(&unbound).contains("bound to no rampart-ca account"));
}

fn container(d: &Value) -> &Value {
    let cs = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(cs.len(), 1);
    &cs[0]
}

fn args(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

fn flag_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag}"));
    &args[i + 1]
}

#[test]
fn ca_deployment_is_two_replicas_with_probes_non_root_and_a_pdb() {
    let all = manifests();
    let d = one(&all, "Deployment", "rampart-ca");
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    // The selector picks the template's Pods.
    for (k, v) in d["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&labels[k], v);
    }
    let spec = &pod["spec"];
    assert_eq!(spec["serviceAccountName"], "rampart-ca");
    one(&all, "ServiceAccount", "rampart-ca");
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_ne!(spec["securityContext"]["runAsUser"], 0);
    let c = container(d);
    assert_eq!(
        c["image"],
        format!("ghcr.io/rampart-mesh/rampart:{}", env!("CARGO_PKG_VERSION"))
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());

    // POD_NAME from the downward API (the Lease identity of each replica).
    let env = c["env"].as_array().unwrap();
    let pod_name = env.iter().find(|e| e["name"] == "POD_NAME").unwrap();
    assert_eq!(
        pod_name["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );

    let a = args(c);
    assert_eq!(a[0], "ca");
    assert!(a.contains(&"--kubernetes".to_owned()));
    assert_eq!(flag_value(&a, "--namespace"), NS);
    // The probes hit the CA's monitoring port: readiness its /ready (200 only while the
    // replica can issue), liveness its /healthz (independent of readiness).
    let metrics_port: u16 = flag_value(&a, "--metrics")
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/healthz")] {
        let p = &c[probe]["httpGet"];
        assert_eq!(p["port"], metrics_port, "{probe}");
        assert_eq!(p["path"], path, "{probe}");
    }
    // --state and --cacerts are on the emptyDir (the root filesystem is read-only).
    let mount = c["volumeMounts"][0]["mountPath"].as_str().unwrap();
    let vol = c["volumeMounts"][0]["name"].as_str().unwrap();
    let volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == vol)
        .unwrap();
    assert!(volume["emptyDir"].is_object());
    for f in ["--state", "--cacerts"] {
        assert!(
            flag_value(&a, f).starts_with(&format!("{mount}/")),
            "{f} is not on the emptyDir"
        );
    }
    // Every Service port targets a port the container declares; Services select the Pods.
    let declared: BTreeSet<u64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert!(declared.contains(&15012));
    let grpc_port: u64 = flag_value(&a, "--listen")
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert_eq!(grpc_port, 15012);
    for name in ["rampart-ca", "istiod"] {
        let s = one(&all, "Service", name);
        for (k, v) in s["spec"]["selector"].as_object().unwrap() {
            assert_eq!(&labels[k], v, "Service {name}");
        }
        let ports: Vec<u64> = s["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["targetPort"].as_u64().unwrap())
            .collect();
        assert!(ports.contains(&15012), "Service {name}");
        for p in ports {
            assert!(
                declared.contains(&p),
                "Service {name} targets undeclared port {p}"
            );
        }
    }
    // The Service names are names the CA's serving certificate carries.
    let dns: Vec<&str> = a
        .iter()
        .enumerate()
        .filter(|(_, x)| *x == "--server-dns")
        .map(|(i, _)| a[i + 1].as_str())
        .collect();
    assert!(dns.contains(&"istiod.istio-system.svc"));
    assert!(dns.contains(&"rampart-ca.istio-system.svc"));

    let pdb = one(&all, "PodDisruptionBudget", "rampart-ca");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "the PDB selects the CA Pods");
    }
}

fn rampart(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run rampart");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The CA's arguments, exactly as the Deployment passes them, go through the real parser
/// (clap reads and checks every argument and value before it reaches a trailing --help), and
/// each flag is listed in `rampart ca --help`. The twin: a made-up flag is refused.
#[test]
fn ca_arguments_are_accepted_by_the_binary() {
    let all = manifests();
    let a = args(container(one(&all, "Deployment", "rampart-ca")));
    let mut with_help: Vec<&str> = a.iter().map(String::as_str).collect();
    with_help.push("--help");
    let (ok, text) = rampart(&with_help);
    assert!(ok, "rampart {a:?}: {text}");
    let (_, help) = rampart(&["ca", "--help"]);
    for f in a.iter().filter(|x| x.starts_with("--")) {
        assert!(help.contains(f.as_str()), "{f} not in `rampart ca --help`");
    }
    let mut bad = with_help.clone();
    bad.insert(bad.len() - 1, "--no-such-flag");
    let (ok, text) = rampart(&bad);
    assert!(!ok && text.contains("--no-such-flag"), "{text}");
    let mut bad_value = a.clone();
    let i = bad_value.iter().position(|x| x == "--listen").unwrap();
    bad_value[i + 1] = "not-an-address".into();
    let mut bad_value: Vec<&str> = bad_value.iter().map(String::as_str).collect();
    bad_value.push("--help");
    let (ok, text) = rampart(&bad_value);
    assert!(!ok && text.contains("not-an-address"), "{text}");
}

/// The injection webhook as the API server will call it: the configuration's Service, port
/// and path lead to the CA's `--inject-webhook` port, under a name the CA's serving
/// certificate carries; the Lease holder fills in caBundle (so the file has none); Pods are
/// refused, not let through uninjected, while the webhook cannot be called.
#[test]
fn injection_webhook_reaches_the_ca_port_under_a_served_name() {
    let all = manifests();
    let w = one(
        &all,
        "MutatingWebhookConfiguration",
        rampart_k8s::injector::WEBHOOK_CONFIG,
    );
    let hooks = w["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 1);
    let h = &hooks[0];
    let svc = &h["clientConfig"]["service"];
    assert_eq!(svc["namespace"], NS);
    assert_eq!(svc["path"], rampart::webhook::INJECT_PATH);
    assert!(
        h["clientConfig"].get("caBundle").is_none(),
        "caBundle is the Lease holder's to set"
    );
    assert_eq!(h["failurePolicy"], "Fail");
    assert_eq!(h["sideEffects"], "None");
    assert_eq!(h["admissionReviewVersions"], serde_json::json!(["v1"]));
    assert_eq!(h["rules"][0]["operations"], serde_json::json!(["CREATE"]));
    assert_eq!(h["rules"][0]["resources"], serde_json::json!(["pods"]));
    // Namespaces labelled rampart-injection=enabled, never the CA's own (a CA Pod that
    // needed the CA to be created could never come back) nor one istiod also injects.
    let selects = |labels: &[(&str, &str)]| {
        h["namespaceSelector"]["matchExpressions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| {
                let key = e["key"].as_str().unwrap();
                let value = labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
                let values: Vec<&str> = e["values"]
                    .as_array()
                    .map(|a| a.iter().map(|v| v.as_str().unwrap()).collect())
                    .unwrap_or_default();
                match e["operator"].as_str().unwrap() {
                    "In" => value.is_some_and(|v| values.contains(&v)),
                    "NotIn" => !value.is_some_and(|v| values.contains(&v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    other => panic!("operator {other}"),
                }
            })
    };
    let ns = |name: &'static str, extra: &[(&'static str, &'static str)]| {
        let mut l = vec![("kubernetes.io/metadata.name", name)];
        l.extend_from_slice(extra);
        l
    };
    assert!(selects(&ns("shop", &[("rampart-injection", "enabled")])));
    assert!(selects(&ns(
        "shop",
        &[
            ("rampart-injection", "enabled"),
            ("istio-injection", "disabled")
        ]
    )));
    assert!(!selects(&ns("shop", &[])));
    assert!(!selects(&ns(NS, &[("rampart-injection", "enabled")])));
    assert!(!selects(&ns(
        "kube-system",
        &[("rampart-injection", "enabled")]
    )));
    assert!(!selects(&ns(
        "shop",
        &[
            ("rampart-injection", "enabled"),
            ("istio-injection", "enabled")
        ]
    )));
    assert!(!selects(&ns(
        "shop",
        &[("rampart-injection", "enabled"), ("istio.io/rev", "canary")]
    )));
    // The CA's own Pods are skipped by the object selector too (a label, not only the
    // annotation: object selectors see labels).
    let d = one(&all, "Deployment", "rampart-ca");
    let pod_labels = &d["spec"]["template"]["metadata"]["labels"];
    assert_eq!(pod_labels["sidecar.istio.io/inject"], "false");
    let obj = &h["objectSelector"]["matchExpressions"][0];
    assert_eq!(obj["key"], "sidecar.istio.io/inject");
    assert_eq!(obj["operator"], "NotIn");
    assert_eq!(obj["values"], serde_json::json!(["false"]));

    let a = args(container(one(&all, "Deployment", "rampart-ca")));
    let webhook_port: u64 = flag_value(&a, "--inject-webhook")
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    let service_name = svc["name"].as_str().unwrap();
    let s = one(&all, "Service", service_name);
    let port = s["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == svc["port"])
        .unwrap_or_else(|| panic!("Service {service_name} has no port {}", svc["port"]));
    assert_eq!(port["targetPort"], webhook_port);
    let dns: Vec<&str> = a
        .iter()
        .enumerate()
        .filter(|(_, x)| *x == "--server-dns")
        .map(|(i, _)| a[i + 1].as_str())
        .collect();
    assert!(dns.contains(&format!("{service_name}.{NS}.svc").as_str()));
    // Injected sidecars dial a name the serving certificate carries.
    let ca_host = flag_value(&a, "--inject-ca-address")
        .rsplit_once(':')
        .unwrap()
        .0;
    assert!(dns.contains(&ca_host), "{ca_host} not in --server-dns");
}
