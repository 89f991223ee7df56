//! The opt-in suite against a REAL Kubernetes API server (issue #14): run it with
//! `RAMPART_TEST_KUBECONFIG=FILE cargo test --test kubernetes_e2e`. Without the variable the
//! one test prints that the suite did not run and passes, so CI stays green without a
//! cluster (docs/KUBERNETES.md, "Opt-in suite against a real API server", says how the
//! suite was run and how to get an API server on a laptop).
//!
//! The cluster needs no kubelet: Pods are API objects with `spec.nodeName` set and a
//! `status.podIP` patched in through the status subresource; nothing runs them. The suite
//! uses `kubectl` (on PATH, or `$RAMPART_TEST_KUBECTL`) with the kubeconfig's identity, which
//! must be allowed to do anything (cluster-admin), and runs the real `rampart ca --kubernetes`
//! binary as a ServiceAccount of its own holding exactly the RBAC docs/KUBERNETES.md lists
//! (a kubeconfig with that account's token, same server). It writes `istio-ca-root-cert` into every namespace of
//! the cluster (that is what the CA does): use a throwaway cluster. Its own namespaces are
//! named `re2e-<random>-*` and deleted at the end.
//!
//! Shows, each with its negative twin:
//! - a token from `kubectl create token SA --audience istio-ca` gets a certificate for
//!   `spiffe://cluster.local/ns/NS/sa/SA`; a token for another audience is refused;
//! - tokens that the API server no longer accepts are refused: `--duration` cannot go below
//!   10 minutes on a real server, so instead of an expired token the suite uses (a) a token of
//!   a ServiceAccount deleted after it was minted and (b) a token bound to a Pod that was
//!   deleted after it was minted;
//! - node impersonation (ztunnel's `ImpersonatedIdentity`): a trusted node account whose token
//!   is bound (`--bound-object-kind Pod`) to a Pod on node-a gets a certificate for a service
//!   account with a Pod on node-a, and is refused one for a service account whose only Pod is
//!   on node-b;
//! - ConfigMap `istio-ca-root-cert` appears in a namespace created while the CA runs within
//!   5 s; one whose content was changed by someone else is set back within 5 s;
//! - a change of Secret `cacerts` (new plug-in intermediate under a new root, made with
//!   `rampart certs`) is picked up without a restart: new certificates chain to it; a broken
//!   change (a key that does not match the certificate) is refused, posted as a Warning
//!   Event on the Secret, and the CA keeps signing with the last good material, and a second replica refuses to start on it (no fallback
//!   to a self-signed root);
//! - the `istio-namespace-controller-election` Lease: a second replica leaves it to the first
//!   while that one renews, and takes it (and publishes) once the first stops; meanwhile
//!   `rampart ca revoke --spiffe-id` on the first replica says the revocation is shared and
//!   the second revokes the certificate it issued to that identity within 5 s;
//! - automatic injection: the API server calls the CA's webhook (`--inject-webhook`, named by
//!   a MutatingWebhookConfiguration without caBundle, which the Lease holder sets to the CA's
//!   roots): a Pod created with kubectl in a namespace labelled `rampart-injection=enabled`
//!   gets the sidecar; Pods in another namespace or opted out (label, annotation) do not; a
//!   Pod that cannot be injected is refused with the webhook's reason; after a root rotation
//!   the caBundle follows and Pods are still injected;
//! - the CA's CRL is published in ConfigMap `istio-ca-crl` (key `ca-crl.pem`) beside the
//!   root; `rampart ca revoke` of one certificate reaches every namespace's copy within 5 s,
//!   and another certificate of the same identity is not listed;
//! - a CA whose RBAC binding is deleted refuses a fresh valid token, naming the API server's
//!   "forbidden" (fail closed);
//! - an AuthorizationPolicy applied with kubectl turns a call between two host processes
//!   playing Pods (`rampart agent` + `rampart proxy --control-plane`, configured by the CA's
//!   config stream from the Pods, Service and policy in the API) from 200 into 403 within
//!   5 s, and deleting it turns the call back into 200 within 5 s;
//! - `kubectl apply --dry-run=server -R -f deploy/kubernetes/` (or `$RAMPART_TEST_DEPLOY_DIR`)
//!   is accepted by the API server, and an invalid Service is refused by the same dry run,
//!   when that directory exists (the suite says so when it does not).

mod support;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rampart_certs::{CertInfo, KeyAlgorithm, PrivateKey, SpiffeId, TrustBundle};
use rampart_proto::istio::v1::auth::IstioCertificateRequest;
use rampart_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use support::{Proc, free_port, wait_for};
use tonic::transport::Channel;

const NOT_RUN: &str =
    "kubernetes_e2e: RAMPART_TEST_KUBECONFIG not set; the real-API-server suite did not run";

/// How long a change may take to show (the bound).
const FIVE_SECONDS: Duration = Duration::from_secs(5);

/// Writes a line past the test harness's output capture, so it shows in a plain
/// `cargo test` run.
fn say(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `kubectl --kubeconfig FILE ...`.
struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(&self.bin)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.bin.display()));
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Runs kubectl and returns its stdout; fails the test, showing stderr, if it fails.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, None);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` of a JSON object.
    fn apply(&self, object: &serde_json::Value) {
        let out = self.run(&["apply", "-f", "-"], Some(&object.to_string()));
        assert!(
            out.status.success(),
            "kubectl apply {object}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A token for service account `sa` in `ns` (`kubectl create token`), with extra flags.
    fn token(&self, ns: &str, sa: &str, extra: &[&str]) -> String {
        let mut args = vec!["create", "token", sa, "-n", ns];
        args.extend_from_slice(extra);
        self.ok(&args).trim().to_owned()
    }

    /// `data[key]` of ConfigMap `name` in `ns`, if the ConfigMap exists.
    fn configmap_value(&self, ns: &str, name: &str, key: &str) -> Option<String> {
        let out = self.run(&["get", "configmap", name, "-n", ns, "-o", "json"], None);
        if !out.status.success() {
            return None;
        }
        let cm: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        cm["data"][key].as_str().map(str::to_owned)
    }

    /// A Pod of `sa` on `node` that nothing runs: created, then given a Running status and
    /// `pod_ip` through the status subresource, as a kubelet would. Returns its UID.
    fn pod(&self, ns: &str, name: &str, sa: &str, node: &str, pod_ip: &str) -> String {
        self.apply(&serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": sa}},
            "spec": {
                "nodeName": node,
                "serviceAccountName": sa,
                "automountServiceAccountToken": false,
                "containers": [{"name": "app", "image": "registry.invalid/none:0"}],
            },
        }));
        let status = serde_json::json!({"status": {
            "phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
        }});
        self.ok(&[
            "patch",
            "pod",
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ]);
        let pod: serde_json::Value =
            serde_json::from_str(&self.ok(&["get", "pod", name, "-n", ns, "-o", "json"])).unwrap();
        assert_eq!(pod["status"]["podIP"], pod_ip, "status patched: {pod}");
        assert_eq!(pod["spec"]["nodeName"], node);
        pod["metadata"]["uid"].as_str().unwrap().to_owned()
    }

    /// Deletes a Pod at once (no kubelet will ever confirm a graceful deletion).
    fn delete_pod(&self, ns: &str, name: &str) {
        self.ok(&[
            "delete",
            "pod",
            name,
            "-n",
            ns,
            "--grace-period=0",
            "--force",
            "--wait=true",
        ]);
    }
}

/// Deletes the suite's namespaces (and, first, their Pods, which no kubelet would finish
/// deleting) when dropped, also when an assertion failed.
struct Namespaces<'a> {
    kubectl: &'a Kubectl,
    names: Vec<String>,
    /// Cluster-scoped objects (`kind/name`) to delete too.
    cluster_objects: Vec<String>,
}

impl Namespaces<'_> {
    fn create(&mut self, name: &str) {
        self.kubectl.ok(&["create", "namespace", name]);
        self.names.push(name.to_owned());
    }
}

impl Drop for Namespaces<'_> {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = self.kubectl.run(
                &[
                    "delete",
                    "pods",
                    "--all",
                    "-n",
                    ns,
                    "--grace-period=0",
                    "--force",
                ],
                None,
            );
        }
        for object in &self.cluster_objects {
            let _ = self
                .kubectl
                .run(&["delete", object, "--ignore-not-found"], None);
        }
        let mut args = vec!["delete", "namespace", "--wait=false", "--ignore-not-found"];
        args.extend(self.names.iter().map(String::as_str));
        let _ = self.kubectl.run(&args, None);
    }
}

/// The CA's own identity: ServiceAccount `rampart-ca` in `ns` with exactly the RBAC that
/// docs/KUBERNETES.md lists, and a kubeconfig (same server and CA as the suite's) holding
/// a token of it. Returns the kubeconfig's path.
fn ca_identity(
    kubectl: &Kubectl,
    guard: &mut Namespaces<'_>,
    ns: &str,
    tag: &str,
    dir: &Path,
) -> PathBuf {
    let cluster_role = format!("re2e-{tag}-rampart-ca");
    guard
        .cluster_objects
        .push(format!("clusterrolebinding/{cluster_role}"));
    guard
        .cluster_objects
        .push(format!("clusterrole/{cluster_role}"));
    let subject =
        serde_json::json!([{"kind": "ServiceAccount", "name": "rampart-ca", "namespace": ns}]);
    let rule = |group: &str, resource: &str, verbs: &[&str]| serde_json::json!({"apiGroups": [group], "resources": [resource], "verbs": verbs});
    kubectl.ok(&["create", "serviceaccount", "rampart-ca", "-n", ns]);
    kubectl.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": cluster_role},
             "rules": [
                rule("authentication.k8s.io", "tokenreviews", &["create"]),
                // deploy/kubernetes/20-rbac.yaml: node authorization and the mesh model
                // the config stream is built from.
                rule("", "pods", &["get", "list", "watch"]),
                rule("", "services", &["get", "list", "watch"]),
                rule("", "namespaces", &["get", "list", "watch"]),
                rule("security.istio.io", "peerauthentications", &["get", "list", "watch"]),
                rule("security.istio.io", "requestauthentications", &["get", "list", "watch"]),
                rule("security.istio.io", "authorizationpolicies", &["get", "list", "watch"]),
                rule("", "configmaps", &["get", "list", "watch", "create", "update"]),
                rule("", "events", &["create"]),
                // The injection webhook's caBundle: that one configuration, by name.
                serde_json::json!({"apiGroups": ["admissionregistration.k8s.io"],
                    "resources": ["mutatingwebhookconfigurations"],
                    "resourceNames": [rampart_k8s::injector::WEBHOOK_CONFIG],
                    "verbs": ["get", "patch"]}),
             ]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": cluster_role},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": cluster_role},
             "subjects": subject},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "rampart-ca", "namespace": ns},
             "rules": [
                rule("", "secrets", &["get", "create"]),
                // The watch of cacerts: list and watch by name (fieldSelector).
                {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["cacerts"],
                 "verbs": ["list", "watch"]},
                rule("coordination.k8s.io", "leases", &["get", "create", "update"]),
                // The shared revocations: one ConfigMap by name, and create.
                serde_json::json!({"apiGroups": [""], "resources": ["configmaps"],
                    "resourceNames": ["rampart-ca-revocations"],
                    "verbs": ["get", "list", "watch", "update"]}),
                rule("", "configmaps", &["create"]),
             ]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "rampart-ca", "namespace": ns},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                         "name": "rampart-ca"},
             "subjects": subject},
        ],
    }));
    let token = kubectl.token(ns, "rampart-ca", &["--duration", "1h"]);
    let mine: serde_json::Value = serde_json::from_str(&kubectl.ok(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "--flatten",
        "-o",
        "json",
    ]))
    .unwrap();
    let cluster = mine["clusters"][0]["cluster"].clone();
    let path = dir.join("ca-kubeconfig");
    std::fs::write(
        &path,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": cluster}],
            "users": [{"name": "rampart-ca", "user": {"token": token}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "rampart-ca"}}],
            "current-context": "c",
        })
        .to_string(),
    )
    .unwrap();
    path
}

/// `kubectl auth can-i VERB RESOURCE` as service account `ns/sa`, in `in_ns` if given.
fn can_i(kubectl: &Kubectl, ns: &str, sa: &str, verb: &str, resource: &str, in_ns: &str) -> bool {
    let who = format!("system:serviceaccount:{ns}:{sa}");
    let out = kubectl.run(
        &["auth", "can-i", verb, resource, "-n", in_ns, "--as", &who],
        None,
    );
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

/// `rampart certs root` + `rampart certs intermediate` in `dir`: returns the plug-in folder
/// (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem).
fn plugin_material(dir: &Path, name: &str) -> PathBuf {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rampart {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let root = format!("{name}-root");
    run(&["certs", "root", "--out", &root]);
    run(&[
        "certs",
        "intermediate",
        "--root",
        &root,
        "--name",
        name,
        "--out",
        name,
    ]);
    dir.join(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Secret `cacerts` in `ns` holding the plug-in files of `dir`, `ca-key.pem` taken from
/// `key_dir` (the same folder, or another one to make a broken Secret).
fn cacerts_secret(ns: &str, dir: &Path, key_dir: &Path) -> serde_json::Value {
    let b64 = |p: PathBuf| base64::engine::general_purpose::STANDARD.encode(read(&p));
    serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "cacerts", "namespace": ns},
        "data": {
            "ca-cert.pem": b64(dir.join("ca-cert.pem")),
            "ca-key.pem": b64(key_dir.join("ca-key.pem")),
            "cert-chain.pem": b64(dir.join("cert-chain.pem")),
            "root-cert.pem": b64(dir.join("root-cert.pem")),
        },
    })
}

fn fingerprint(pem: &str) -> String {
    let certs = rampart_certs::parse_certs_pem(pem).unwrap();
    CertInfo::parse(&certs[0]).unwrap().sha256_fingerprint
}

/// Every certificate's fingerprint in a PEM bundle.
fn fingerprints(pem: &str) -> Vec<String> {
    rampart_certs::parse_certs_pem(pem)
        .unwrap_or_default()
        .iter()
        .map(|c| CertInfo::parse(c).unwrap().sha256_fingerprint)
        .collect()
}

/// `rampart ca --kubernetes` on the kubeconfig, in namespace `ns`, as replica `pod_name`
/// (its Lease identity), with its files in `dir`; stdout goes to `dir/ca.stdout`.
fn spawn_ca(dir: &Path, kubeconfig: &Path, ns: &str, pod_name: &str) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let log = dir.join("ca.log");
    let child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .env("POD_NAME", pod_name)
        .args([
            "ca",
            "--listen",
            "127.0.0.1:0",
            "--kubernetes",
            "--kubeconfig",
        ])
        .arg(kubeconfig)
        .args(["--namespace", ns])
        .args(["--trusted-node-accounts", &format!("{ns}/ztunnel")])
        .args(["--reload-interval", "1s"])
        .arg("--cacerts")
        .arg(dir.join("cacerts"))
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--bundle-out")
        .arg(dir.join("bundle.pem"))
        .args(["--inject-webhook", &format!("127.0.0.1:{}", free_port())])
        .args(["--inject-image", "registry.invalid/rampart:e2e"])
        .stdout(std::fs::File::create(dir.join("ca.stdout")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start rampart ca");
    Proc { child, log }
}

/// Starts `rampart ca --kubernetes` (see [`spawn_ca`]); returns it and its address once it
/// listens.
fn start_ca(dir: &Path, kubeconfig: &Path, ns: &str, pod_name: &str) -> (Proc, SocketAddr) {
    let proc = spawn_ca(dir, kubeconfig, ns, pod_name);
    let stdout_path = dir.join("ca.stdout");
    let mut addr = None;
    wait_for(
        "rampart ca --kubernetes to listen",
        Duration::from_secs(60),
        || {
            addr = std::fs::read_to_string(&stdout_path)
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("rampart ca: listening on "))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok());
            addr.is_some()
        },
        || format!("{}\n{}", read(&stdout_path), proc.log()),
    );
    (proc, addr.unwrap())
}

async fn connect(bundle: &Path, addr: SocketAddr) -> IstioCertificateServiceClient<Channel> {
    let bundle = TrustBundle::from_pem(&read(bundle)).unwrap();
    let tls = rampart_citadel::client::config(&bundle, None).unwrap();
    rampart_citadel::client::connect(addr, "127.0.0.1", Arc::new(tls))
        .await
        .expect("connect to the CA")
}

/// Asks for a certificate for `id` with `token` (and ztunnel's `ImpersonatedIdentity`
/// when `impersonate`); returns the chain's PEMs (leaf first, root last).
async fn ask(
    ca: &mut IstioCertificateServiceClient<Channel>,
    id: &str,
    token: &str,
    impersonate: bool,
) -> Result<Vec<String>, tonic::Status> {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = rampart_certs::build_csr(&key, &SpiffeId::parse(id).unwrap()).unwrap();
    let metadata = impersonate.then(|| prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.to_owned())),
            },
        )]
        .into_iter()
        .collect(),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    Ok(ca.create_certificate(req).await?.into_inner().cert_chain)
}

fn leaf_ids(chain: &[String]) -> String {
    let leaf = rampart_certs::parse_certs_pem(&chain[0]).unwrap();
    CertInfo::parse(&leaf[0]).unwrap().uri_sans.join(",")
}

fn refused(result: Result<Vec<String>, tonic::Status>, code: tonic::Code, what: &str) -> String {
    match result {
        Ok(chain) => panic!("{what}: a certificate was issued: {}", leaf_ids(&chain)),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            say(&format!(
                "kubernetes_e2e: refused, as it should be: {what}: {:?}: {}",
                s.code(),
                s.message()
            ));
            s.message().to_owned()
        }
    }
}

/// A short random tag for this run's namespace names.
fn run_tag() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{:06x}",
        (nanos ^ std::process::id().rotate_left(20)) & 0xff_ffff
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_against_a_real_api_server() {
    let Some(kubeconfig) = std::env::var_os("RAMPART_TEST_KUBECONFIG").map(PathBuf::from) else {
        say(NOT_RUN);
        return;
    };
    assert!(
        kubeconfig.is_file(),
        "RAMPART_TEST_KUBECONFIG={} is not a file",
        kubeconfig.display()
    );
    let kubectl = Kubectl {
        bin: std::env::var_os("RAMPART_TEST_KUBECTL")
            .map_or_else(|| "kubectl".into(), PathBuf::from),
        kubeconfig: kubeconfig.clone(),
    };
    let version = kubectl.ok(&["version", "-o", "json"]);
    let version: serde_json::Value = serde_json::from_str(&version).unwrap();
    say(&format!(
        "kubernetes_e2e: API server {} (kubectl {})",
        version["serverVersion"]["gitVersion"], version["clientVersion"]["gitVersion"]
    ));

    let tag = run_tag();
    let sys = format!("re2e-{tag}-system");
    let app_ns = format!("re2e-{tag}-app");
    let far_ns = format!("re2e-{tag}-far");
    let late_ns = format!("re2e-{tag}-late");
    let mut namespaces = Namespaces {
        kubectl: &kubectl,
        names: Vec::new(),
        cluster_objects: Vec::new(),
    };
    dry_run_deploy_manifests(&kubectl, &mut namespaces);
    for ns in [&sys, &app_ns, &far_ns] {
        namespaces.create(ns);
    }
    for (ns, sa) in [
        (&sys, "ztunnel"),
        (&app_ns, "app"),
        (&app_ns, "ghost"),
        (&far_ns, "far"),
    ] {
        kubectl.ok(&["create", "serviceaccount", sa, "-n", ns]);
    }

    // Plug-in material A in Secret cacerts before the CA starts.
    let work = tempfile::tempdir().unwrap();
    let material_a = plugin_material(work.path(), "cluster-a");
    let material_b = plugin_material(work.path(), "cluster-b");
    kubectl.apply(&cacerts_secret(&sys, &material_a, &material_a));

    // Pods that nothing runs: ztunnel and app on node-a, far on node-b.
    let zt_uid = kubectl.pod(&sys, "ztunnel-a", "ztunnel", "node-a", "127.0.0.10");
    let app_uid = kubectl.pod(&app_ns, "app-1", "app", "node-a", "127.0.0.11");
    kubectl.pod(&far_ns, "far-1", "far", "node-b", "127.0.0.12");
    let gone_uid = kubectl.pod(&app_ns, "gone-1", "app", "node-a", "127.0.0.13");

    let ca_dir = work.path().join("ca");
    // The CA runs as its own service account with the documented RBAC, not as the admin.
    let ca_kubeconfig = ca_identity(&kubectl, &mut namespaces, &sys, &tag, work.path());
    for (verb, resource, ns, allowed) in [
        ("create", "tokenreviews", sys.as_str(), true),
        ("list", "pods", app_ns.as_str(), true),
        ("update", "configmaps", app_ns.as_str(), true),
        ("get", "secrets", sys.as_str(), true),
        ("get", "secrets", app_ns.as_str(), false),
        ("update", "secrets", sys.as_str(), false),
        ("delete", "configmaps", app_ns.as_str(), false),
        ("create", "pods", app_ns.as_str(), false),
    ] {
        assert_eq!(
            can_i(&kubectl, &sys, "rampart-ca", verb, resource, ns),
            allowed,
            "rampart-ca may {verb} {resource} in {ns}: expected {allowed}"
        );
    }
    let (ca, addr) = start_ca(&ca_dir, &ca_kubeconfig, &sys, "rampart-ca-1");
    let bundle = ca_dir.join("bundle.pem");
    let root_a = read(&material_a.join("root-cert.pem"));
    assert!(
        fingerprints(&read(&bundle)).contains(&fingerprint(&root_a)),
        "the CA serves the cacerts root\n{}",
        ca.log()
    );
    let mut c = connect(&bundle, addr).await;

    // A token for audience istio-ca gets a certificate; one for another audience does not.
    let app = format!("spiffe://cluster.local/ns/{app_ns}/sa/app");
    let good = kubectl.token(&app_ns, "app", &["--audience", "istio-ca"]);
    let chain = ask(&mut c, &app, &good, false)
        .await
        .unwrap_or_else(|s| panic!("token with audience istio-ca: {s:?}\n{}", ca.log()));
    assert_eq!(leaf_ids(&chain), app);
    assert_eq!(fingerprint(chain.last().unwrap()), fingerprint(&root_a));
    let wrong_audience = kubectl.token(&app_ns, "app", &["--audience", "not-istio-ca"]);
    refused(
        ask(&mut c, &app, &wrong_audience, false).await,
        tonic::Code::Unauthenticated,
        "token for another audience",
    );
    // The good token asks only for its own identity.
    let other = format!("spiffe://cluster.local/ns/{far_ns}/sa/far");
    refused(
        ask(&mut c, &other, &good, false).await,
        tonic::Code::PermissionDenied,
        "a token asking for another service account's identity",
    );

    // Tokens the API server stopped accepting (instead of expired ones, which a real server
    // cannot mint: --duration is at least 10 minutes). Neither was shown to the CA before, so
    // no accepted review is cached for them.
    let ghost_token = kubectl.token(&app_ns, "ghost", &["--audience", "istio-ca"]);
    kubectl.ok(&["delete", "serviceaccount", "ghost", "-n", &app_ns]);
    let ghost = format!("spiffe://cluster.local/ns/{app_ns}/sa/ghost");
    refused(
        ask(&mut c, &ghost, &ghost_token, false).await,
        tonic::Code::Unauthenticated,
        "token of a deleted ServiceAccount",
    );
    let bound = |pod: &str, uid: &str| {
        kubectl.token(
            &app_ns,
            "app",
            &[
                "--audience",
                "istio-ca",
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                pod,
                "--bound-object-uid",
                uid,
            ],
        )
    };
    // A token bound to a live Pod works (the twin of the deleted Pod's below).
    let chain = ask(&mut c, &app, &bound("app-1", &app_uid), false)
        .await
        .unwrap_or_else(|s| panic!("token bound to a live Pod: {s:?}\n{}", ca.log()));
    assert_eq!(leaf_ids(&chain), app);
    let gone_token = bound("gone-1", &gone_uid);
    kubectl.delete_pod(&app_ns, "gone-1");
    refused(
        ask(&mut c, &app, &gone_token, false).await,
        tonic::Code::Unauthenticated,
        "token bound to a deleted Pod",
    );

    // Node impersonation: ztunnel's token is bound to its Pod on node-a.
    let zt_token = kubectl.token(
        &sys,
        "ztunnel",
        &[
            "--audience",
            "istio-ca",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "ztunnel-a",
            "--bound-object-uid",
            &zt_uid,
        ],
    );
    let chain = ask(&mut c, &app, &zt_token, true)
        .await
        .unwrap_or_else(|s| panic!("impersonating app on node-a: {s:?}\n{}", ca.log()));
    assert_eq!(leaf_ids(&chain), app);
    let msg = refused(
        ask(&mut c, &other, &zt_token, true).await,
        tonic::Code::PermissionDenied,
        "impersonating far, whose Pod is on node-b",
    );
    assert!(msg.contains("node-a"), "{msg}");
    // An untrusted caller cannot impersonate even on its own node.
    refused(
        ask(&mut c, &other, &good, true).await,
        tonic::Code::PermissionDenied,
        "app impersonating far",
    );

    // The root ConfigMap: in a namespace created now, within 5 s; set back within 5 s when
    // someone else changed it.
    let published = |ns: &str| kubectl.configmap_value(ns, "istio-ca-root-cert", "root-cert.pem");
    wait_for(
        "istio-ca-root-cert in the suite's namespaces",
        Duration::from_secs(30),
        || published(&app_ns).is_some_and(|p| p.contains(root_a.trim())),
        || ca.log(),
    );
    namespaces.create(&late_ns);
    let created = Instant::now();
    wait_for(
        "istio-ca-root-cert in a new namespace",
        FIVE_SECONDS,
        || published(&late_ns).is_some_and(|p| p.contains(root_a.trim())),
        || ca.log(),
    );
    say(&format!(
        "kubernetes_e2e: istio-ca-root-cert in a new namespace after {:?}",
        created.elapsed()
    ));
    let version = |ns: &str| {
        let v = kubectl.ok(&[
            "get",
            "configmap",
            "istio-ca-root-cert",
            "-n",
            ns,
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ]);
        v.trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("resourceVersion {v:?}"))
    };
    let before = version(&far_ns);
    kubectl.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio-ca-root-cert", "namespace": far_ns},
        "data": {"root-cert.pem": "not the root"},
    }));
    // Our write landed: it is still there, or the CA (which watches the ConfigMap) has
    // already written it back, a second write after ours. (The CA can be quicker than this
    // read: the suite failed so once.)
    let now = published(&far_ns);
    assert!(
        now.as_deref() == Some("not the root") || version(&far_ns) >= before + 2,
        "the change did not land: {now:?}"
    );
    wait_for(
        "a changed istio-ca-root-cert to be set back",
        FIVE_SECONDS,
        || published(&far_ns).is_some_and(|p| p.contains(root_a.trim())),
        || ca.log(),
    );

    // Automatic injection: the API server itself calls the CA's webhook for Pods created in
    // a labelled namespace. The configuration comes without caBundle; the Lease holder sets
    // it to the CA's roots.
    let inj_ns = format!("re2e-{tag}-inj");
    namespaces.create(&inj_ns);
    kubectl.ok(&["label", "namespace", &inj_ns, "rampart-injection=enabled"]);
    let webhook_url = read(&ca_dir.join("ca.stdout"))
        .lines()
        .find_map(|l| l.strip_prefix("rampart ca: sidecar injection webhook on "))
        .expect("the webhook's address on the CA's stdout")
        .trim()
        .to_owned();
    injection_by_the_api_server(
        &kubectl,
        &mut namespaces,
        &webhook_url,
        &inj_ns,
        &app_ns,
        &root_a,
        &ca,
    );

    // The CA's CRL in ConfigMap istio-ca-crl beside the root: what the CA serves
    // (published-crls.pem in its state folder); a revocation reaches it within 5 s, and a
    // serial that was not revoked is not on it.
    let crl_path = ca_dir.join("state/published-crls.pem");
    let published_crl = |ns: &str| kubectl.configmap_value(ns, "istio-ca-crl", "ca-crl.pem");
    wait_for(
        "istio-ca-crl to say the CA's CRL",
        Duration::from_secs(30),
        || {
            let served = std::fs::read_to_string(&crl_path).unwrap_or_default();
            !served.is_empty() && published_crl(&app_ns).as_deref() == Some(served.as_str())
        },
        || ca.log(),
    );
    let revoked_serials = |pem: &str| -> Vec<String> {
        rampart_certs::parse_crls_pem(pem)
            .unwrap()
            .iter()
            .flat_map(|c| c.revoked_certs().map(|r| r.serial_hex.clone()))
            .collect()
    };
    let leaf_serial = |chain: &[String]| {
        let leaf = rampart_certs::parse_certs_pem(&chain[0]).unwrap();
        CertInfo::parse(&leaf[0]).unwrap().serial_hex
    };
    let doomed = ask(&mut c, &app, &good, false).await.unwrap();
    let kept = ask(&mut c, &app, &good, false).await.unwrap();
    let (doomed, kept) = (leaf_serial(&doomed), leaf_serial(&kept));
    let before = revoked_serials(&published_crl(&app_ns).unwrap());
    assert!(!before.contains(&doomed) && !before.contains(&kept));
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["ca", "revoke", "--state"])
        .arg(ca_dir.join("state"))
        .args(["--serial", &doomed])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rampart ca revoke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It waited until the real API server held the serial in rampart-ca-revocations.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!(
            "shared with the other CA replicas through ConfigMap {sys}/rampart-ca-revocations"
        )),
        "{said}"
    );
    let revoked_at = Instant::now();
    wait_for(
        "the revocation in istio-ca-crl of every namespace",
        FIVE_SECONDS,
        || {
            [&app_ns, &far_ns, &late_ns]
                .iter()
                .all(|ns| published_crl(ns).is_some_and(|p| revoked_serials(&p).contains(&doomed)))
        },
        || ca.log(),
    );
    say(&format!(
        "kubernetes_e2e: a revocation in istio-ca-crl after {:?}",
        revoked_at.elapsed()
    ));
    assert!(
        !revoked_serials(&published_crl(&app_ns).unwrap()).contains(&kept),
        "only the revoked serial is listed"
    );

    // Secret cacerts changes to material B: picked up without a restart.
    kubectl.apply(&cacerts_secret(&sys, &material_b, &material_b));
    let root_b = read(&material_b.join("root-cert.pem"));
    let inter_b = fingerprint(&read(&material_b.join("ca-cert.pem")));
    wait_for(
        "the CA to serve material B from Secret cacerts",
        Duration::from_secs(30),
        || {
            fingerprints(&std::fs::read_to_string(&bundle).unwrap_or_default())
                .contains(&fingerprint(&root_b))
        },
        || ca.log(),
    );
    let mut c = connect(&bundle, addr).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let chain = loop {
        let chain = ask(&mut c, &app, &good, false).await.unwrap();
        if fingerprints(&chain.concat()).contains(&inter_b) {
            break chain;
        }
        assert!(
            Instant::now() < deadline,
            "no certificate under material B\n{}",
            ca.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(fingerprint(chain.last().unwrap()), fingerprint(&root_b));
    wait_for(
        "the published root to include root B",
        Duration::from_secs(30),
        || published(&app_ns).is_some_and(|p| p.contains(root_b.trim())),
        || ca.log(),
    );

    // The webhook's caBundle follows the new root, and the API server still reaches the
    // webhook (its serving certificate is now under B).
    wait_for(
        "the injection webhook's caBundle to hold root B",
        Duration::from_secs(30),
        || webhook_ca_bundle(&kubectl).contains(root_b.trim()),
        || ca.log(),
    );
    expect_injected(
        &kubectl,
        create_pod(
            &kubectl,
            &inj_ns,
            "after-rotation",
            &serde_json::json!({}),
            None,
        ),
        &ca,
    );

    // A broken change (A's key beside B's certificate) is refused; the CA keeps B.
    kubectl.apply(&cacerts_secret(&sys, &material_b, &material_a));
    wait_for(
        "the CA to refuse the broken cacerts",
        Duration::from_secs(30),
        || ca.log().contains("plug-in Secret refused"),
        || ca.log(),
    );
    let chain = ask(&mut c, &app, &good, false).await.unwrap();
    assert!(
        fingerprints(&chain.concat()).contains(&inter_b),
        "still signing under B\n{}",
        ca.log()
    );
    assert_eq!(fingerprint(chain.last().unwrap()), fingerprint(&root_b));
    // …and says why on the Secret itself (what `kubectl describe secret cacerts` shows).
    let mut event = String::new();
    wait_for(
        "a RampartInvalidCAMaterial Event on Secret cacerts",
        Duration::from_secs(15),
        || {
            let out = kubectl.run(
                &[
                    "get",
                    "events",
                    "-n",
                    &sys,
                    "--field-selector",
                    "involvedObject.name=cacerts,reason=RampartInvalidCAMaterial",
                    "-o",
                    "jsonpath={.items[*].message}",
                ],
                None,
            );
            event = String::from_utf8_lossy(&out.stdout).into_owned();
            event.contains("ca-key.pem")
        },
        || ca.log(),
    );
    assert!(!event.contains(".check-"), "{event}");

    // A second replica cannot start on the broken Secret (no fallback to a self-signed root)…
    let ca2_dir = work.path().join("ca2");
    let mut broken = spawn_ca(&ca2_dir, &ca_kubeconfig, &sys, "rampart-ca-2");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = broken.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "a replica started on a broken cacerts\n{}",
            broken.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "{}", broken.log());
    let why = broken.log();
    let why = why.trim_end().lines().last().unwrap_or_default();
    say(&format!(
        "kubernetes_e2e: refused, as it should be: a replica on the broken cacerts: {why}"
    ));
    assert!(
        why.contains("cacerts") && why.contains("does not match"),
        "{}",
        broken.log()
    );
    drop(broken);
    // …and does on the repaired one. The Lease stays with the first replica while it renews;
    // when it stops, the second takes the Lease and publishes.
    kubectl.apply(&cacerts_secret(&sys, &material_b, &material_b));
    let (ca2, ca2_addr) = start_ca(&ca2_dir, &ca_kubeconfig, &sys, "rampart-ca-2");
    let holder = || {
        let lease = kubectl.ok(&[
            "get",
            "lease",
            "istio-namespace-controller-election",
            "-n",
            &sys,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        lease.trim().to_owned()
    };
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(holder(), "rampart-ca-1", "{}", ca2.log());

    // Revoking an identity on the first replica reaches the certificate the second issued to
    // it (only the second's audit log knows it), through the real API server.
    {
        let mut c2 = connect(&ca2_dir.join("bundle.pem"), ca2_addr).await;
        let tok = kubectl.token(&app_ns, "app", &["--audience", "istio-ca"]);
        let by_two = ask(&mut c2, &app, &tok, false)
            .await
            .unwrap_or_else(|s| panic!("the second replica issues: {s:?}\n{}", ca2.log()));
        let by_two = leaf_serial(&by_two);
        let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["ca", "revoke", "--state"])
            .arg(ca_dir.join("state"))
            .args(["--spiffe-id", &app])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "rampart ca revoke --spiffe-id: {said}"
        );
        assert!(
            said.contains("identity revocation recorded")
                && said.contains("shared with the other CA replicas"),
            "{said}"
        );
        let revoked_at = Instant::now();
        let two_crls = || {
            std::fs::read_to_string(ca2_dir.join("state/published-crls.pem"))
                .map(|p| revoked_serials(&p))
                .unwrap_or_default()
        };
        wait_for(
            "the second replica to revoke what it issued to the identity",
            FIVE_SECONDS,
            || two_crls().contains(&by_two),
            || ca2.log(),
        );
        say(&format!(
            "kubernetes_e2e: an identity revocation on one replica revoked the other's \
             certificate after {:?}",
            revoked_at.elapsed()
        ));
    }
    drop(ca);
    let stopped = Instant::now();
    wait_for(
        "the second replica to take the Lease",
        Duration::from_secs(30),
        || holder() == "rampart-ca-2",
        || ca2.log(),
    );
    let after_ns = format!("re2e-{tag}-after");
    namespaces.create(&after_ns);
    wait_for(
        "istio-ca-root-cert from the second replica",
        Duration::from_secs(10),
        || published(&after_ns).is_some_and(|p| p.contains(root_b.trim())),
        || ca2.log(),
    );
    say(&format!(
        "kubernetes_e2e: the second replica took the Lease and published {:?} after the first \
         stopped",
        stopped.elapsed()
    ));

    // Policy from the cluster reaches proxies through the CA's config stream.
    authorization_policy_turns_200_into_403(
        &kubectl,
        &mut namespaces,
        &tag,
        work.path(),
        ca2_addr,
        &ca2_dir.join("bundle.pem"),
        &ca2,
    );

    // Fail closed when the CA loses its RBAC: without tokenreviews create, a fresh valid
    // token is refused, with the API server's reason.
    let mut c2 = connect(&ca2_dir.join("bundle.pem"), ca2_addr).await;
    let fresh = kubectl.token(&app_ns, "app", &["--audience", "istio-ca"]);
    ask(&mut c2, &app, &fresh, false)
        .await
        .unwrap_or_else(|s| panic!("the second replica issues: {s:?}\n{}", ca2.log()));
    kubectl.ok(&[
        "delete",
        "clusterrolebinding",
        &format!("re2e-{tag}-rampart-ca"),
    ]);
    // Another lifetime, so not the same JWT as the one just reviewed (and cached) even
    // when minted within the same second.
    let fresh = kubectl.token(
        &app_ns,
        "app",
        &["--audience", "istio-ca", "--duration", "20m"],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let msg = loop {
        match ask(&mut c2, &app, &fresh, false).await {
            Err(s) => break refused(Err(s), tonic::Code::Unauthenticated, "the CA without RBAC"),
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "still issuing after its RBAC was removed"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(msg.contains("forbidden"), "{msg}");

    drop(ca2);
    drop(namespaces);
}

/// `kubectl apply --dry-run=server -R -f deploy/kubernetes/` (or `$RAMPART_TEST_DEPLOY_DIR`),
/// when the directory exists. A server-side dry run creates nothing, so what the other
/// documents need is made for real first: the CRDs of its `crds/` (applied; the ones this run
/// created are deleted at the end) and the Namespaces the documents name (created, and left
/// in place: they are what the manifests install). A built-in API version the server does
/// not serve (`policy/v1` PodDisruptionBudget before Kubernetes 1.21) is named plainly and
/// that document is not checked; every other refusal fails the test.
/// The caBundle of the injection webhook's configuration, decoded ("" while unset).
fn webhook_ca_bundle(kubectl: &Kubectl) -> String {
    let out = kubectl.run(
        &[
            "get",
            "mutatingwebhookconfiguration",
            rampart_k8s::injector::WEBHOOK_CONFIG,
            "-o",
            "json",
        ],
        None,
    );
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    config["webhooks"][0]["clientConfig"]["caBundle"]
        .as_str()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// `kubectl create` of a one-container Pod `name` in `ns` with `labels` and, if given, an
/// extra volume; the Pod as stored with kubectl's stderr (its warnings), or kubectl's error.
fn create_pod(
    kubectl: &Kubectl,
    ns: &str,
    name: &str,
    labels: &serde_json::Value,
    volume: Option<&str>,
) -> Result<(serde_json::Value, String), String> {
    let mut pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            // Set by the ServiceAccount admission plugin before webhooks run in a real
            // cluster; the suite's server runs without that plugin.
            "serviceAccountName": "default",
            "automountServiceAccountToken": false,
            // An HTTPS probe, which injection leaves as it was, with a note.
            "containers": [{"name": "app", "image": "registry.invalid/none:0",
                            "ports": [{"containerPort": 8080}],
                            "readinessProbe": {"httpGet": {"path": "/", "port": 8080, "scheme": "HTTPS"}}}],
        },
    });
    if let Some(v) = volume {
        pod["spec"]["volumes"] = serde_json::json!([{"name": v, "emptyDir": {}}]);
    }
    let out = kubectl.run(&["create", "-o", "json", "-f", "-"], Some(&pod.to_string()));
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok((
        serde_json::from_slice(&out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The outcome of creating a Pod the webhook should inject: stored with the sidecar; or, on
/// an API server older than native sidecars (Kubernetes 1.29), refused by the server's own
/// validation of exactly the injected init containers (init containers with probes), which
/// shows the server called the webhook and applied its patch (the Pod as sent has no init
/// containers) but cannot hold the result. Either way kubectl printed the webhook's notes as
/// admission warnings.
/// The API server's minor version (`kubectl version`): `None` when it does not say (a build
/// without a version stamp reports `v0.0.0-master`).
fn server_minor(kubectl: &Kubectl) -> Option<u32> {
    static MINOR: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *MINOR.get_or_init(|| {
        let out = kubectl.run(&["version", "-o", "json"], None);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let server = &v["serverVersion"];
        if server["major"].as_str() != Some("1") {
            return None;
        }
        server["minor"].as_str()?.trim_end_matches('+').parse().ok()
    })
}

/// The Pod was stored with the sidecar. On a server that predates native sidecars (1.29)
/// the API server refuses the injected init containers' probes instead, which is accepted
/// there (and only there: a server known to be 1.29 or later must store the Pod, with both
/// sidecars native, `restartPolicy: Always`).
fn expect_injected(
    kubectl: &Kubectl,
    result: Result<(serde_json::Value, String), String>,
    ca: &Proc,
) {
    let native = server_minor(kubectl).is_some_and(|m| m >= 29);
    let stderr = match &result {
        Ok((_, stderr)) => stderr,
        Err(e) => e,
    };
    assert!(
        stderr.contains(
            "Warning: rampart: container app readinessProbe: not rewritten (scheme HTTPS)"
        ),
        "kubectl shows the injection notes as warnings: {stderr}"
    );
    assert!(
        !stderr.contains("the app must listen on"),
        "the note every Pod gets is no warning: {stderr}"
    );
    match result {
        Ok((pod, _)) => {
            assert!(is_injected(&pod), "{pod}");
            for c in pod["spec"]["initContainers"]
                .as_array()
                .unwrap()
                .iter()
                .take(2)
            {
                assert_eq!(c["restartPolicy"], "Always", "not a native sidecar: {c}");
            }
        }
        Err(e) if native => panic!(
            "a {}.{} API server refused the injected Pod: {e}\n{}",
            1,
            server_minor(kubectl).unwrap_or_default(),
            ca.log()
        ),
        Err(e) => {
            let pre_native = e.contains("spec.initContainers[1].readinessProbe")
                && e.contains("must not be set for init containers");
            let only_that = e.lines().filter(|l| l.starts_with("* ")).all(|l| {
                l.contains("spec.initContainers[1].")
                    && l.contains("must not be set for init containers")
            });
            assert!(
                pre_native && only_that,
                "the Pod was refused for another reason: {e}\n{}",
                ca.log()
            );
            say(&format!(
                "kubernetes_e2e: this API server predates native sidecars (1.29): it applied the \
                 webhook's patch and refused the injected init containers' probes: {}",
                e.lines()
                    .find(|l| !l.starts_with("Warning:"))
                    .unwrap_or_default()
            ));
        }
    }
}

fn is_injected(pod: &serde_json::Value) -> bool {
    let init: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    init.starts_with(&["rampart-agent", "rampart-proxy"])
        && pod["metadata"]["annotations"][rampart::inject::STATUS_ANNOTATION].is_string()
}

/// The API server calls the webhook (`url` clientConfig, the CA's own address) once the
/// Lease holder set caBundle: a Pod in the labelled namespace gets the sidecar; its twins
/// (another namespace, the opt-out label, the opt-out annotation) do not; a Pod that cannot
/// be injected is refused with the webhook's reason.
fn injection_by_the_api_server(
    kubectl: &Kubectl,
    guard: &mut Namespaces<'_>,
    webhook_url: &str,
    inj_ns: &str,
    other_ns: &str,
    root: &str,
    ca: &Proc,
) {
    let name = rampart_k8s::injector::WEBHOOK_CONFIG;
    guard
        .cluster_objects
        .push(format!("mutatingwebhookconfiguration/{name}"));
    kubectl.apply(&serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "sidecar-injector.rampart.io",
            "clientConfig": {"url": webhook_url},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"rampart-injection": "enabled"}},
            "objectSelector": {"matchExpressions": [{"key": "sidecar.istio.io/inject",
                               "operator": "NotIn", "values": ["false"]}]},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
        }],
    }));
    let started = Instant::now();
    wait_for(
        "the Lease holder to set the webhook's caBundle to the CA's roots",
        Duration::from_secs(30),
        || webhook_ca_bundle(kubectl).contains(root.trim()),
        || ca.log(),
    );
    say(&format!(
        "kubernetes_e2e: the injection webhook's caBundle set after {:?}",
        started.elapsed()
    ));
    let none = serde_json::json!({});
    expect_injected(
        kubectl,
        create_pod(kubectl, inj_ns, "injected", &none, None),
        ca,
    );
    // Twins: not injected.
    let (plain, stderr) = create_pod(kubectl, other_ns, "not-labelled", &none, None).unwrap();
    assert!(!is_injected(&plain), "{plain}");
    assert!(
        !stderr.contains("rampart:"),
        "no injection, no warnings: {stderr}"
    );
    let opted_out = create_pod(
        kubectl,
        inj_ns,
        "opted-out",
        &serde_json::json!({"sidecar.istio.io/inject": "false"}),
        None,
    )
    .unwrap()
    .0;
    assert!(!is_injected(&opted_out), "{opted_out}");
    // A Pod the webhook cannot inject is refused, with the reason.
    let refused = create_pod(kubectl, inj_ns, "clash", &none, Some("istio-token")).unwrap_err();
    assert!(
        refused.contains("rampart sidecar injection failed") && refused.contains("istio-token"),
        "{refused}"
    );
    say(&format!(
        "kubernetes_e2e: refused, as it should be: {}",
        refused.trim()
    ));
}

fn dry_run_deploy_manifests(kubectl: &Kubectl, guard: &mut Namespaces<'_>) {
    let dir = std::env::var_os("RAMPART_TEST_DEPLOY_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes"),
        PathBuf::from,
    );
    if !dir.is_dir() {
        say(&format!(
            "kubernetes_e2e: {} does not exist; its server-side dry run did not run",
            dir.display()
        ));
        return;
    }
    let crds = dir.join("crds");
    if crds.is_dir() {
        let out = kubectl.ok(&["apply", "-R", "-f", crds.to_str().unwrap()]);
        for line in out.lines() {
            if let Some(name) = line
                .strip_suffix(" created")
                .and_then(|l| l.strip_prefix("customresourcedefinition.apiextensions.k8s.io/"))
            {
                guard.cluster_objects.push(format!("crd/{name}"));
            }
        }
        kubectl.ok(&[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "-R",
            "-f",
            crds.to_str().unwrap(),
        ]);
    }
    let dry_run = || {
        kubectl.run(
            &[
                "apply",
                "--dry-run=server",
                "-R",
                "-f",
                dir.to_str().unwrap(),
            ],
            None,
        )
    };
    let mut out = dry_run();
    let missing_namespaces: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| {
            let rest = l.split("namespaces \"").nth(1)?;
            let (name, tail) = rest.split_once('"')?;
            tail.trim().eq("not found").then(|| name.to_owned())
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if !missing_namespaces.is_empty() {
        for ns in &missing_namespaces {
            kubectl.ok(&["create", "namespace", ns, "--save-config"]);
        }
        say(&format!(
            "kubernetes_e2e: created namespace(s) {missing_namespaces:?} that the manifests \
             use, for the dry run (left in place)"
        ));
        out = dry_run();
    }
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        let served = kubectl.ok(&["api-versions"]);
        let served: Vec<&str> = served.lines().map(str::trim).collect();
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            // Warnings are not refusals; this line follows every unmapped kind.
            if line.starts_with("Warning:") || line.trim() == "ensure CRDs are installed first" {
                continue;
            }
            // `resource mapping not found for name: "N" namespace: "NS" from "FILE": no
            // matches for kind "K" in version "G/V"`
            let unserved = line
                .split("no matches for kind \"")
                .nth(1)
                .and_then(|rest| {
                    let (kind, rest) = rest.split_once('"')?;
                    let version = rest.split('"').nth(1)?;
                    let group = version.rsplit_once('/').map_or("", |(g, _)| g);
                    let built_in = !group.contains('.') || group.ends_with(".k8s.io");
                    (built_in && !served.contains(&version)).then(|| format!("{kind} {version}"))
                });
            match unserved {
                Some(what) => say(&format!(
                    "kubernetes_e2e: this API server does not serve {what}; that document was \
                     not checked: {line}"
                )),
                None => panic!(
                    "kubectl apply --dry-run=server -R -f {}: refused:\n{stderr}\n{stdout}",
                    dir.display()
                ),
            }
        }
    }
    // The dry run does check: an invalid object (a port out of range) is refused.
    let bad = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "rampart-dry-run-check", "namespace": "default"},
        "spec": {"ports": [{"name": "grpc", "port": 70000}]},
    });
    let refused = kubectl.run(
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&bad.to_string()),
    );
    assert!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("70000"),
        "an invalid Service passed the server-side dry run: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    say(&format!(
        "kubernetes_e2e: {} accepted by a server-side dry run:\n{}",
        dir.display(),
        stdout.trim_end()
    ));
}

/// Issue #14's last check: an AuthorizationPolicy applied with kubectl turns a call between
/// two host processes playing Pods from 200 into 403 within 5 s, and deleting it turns the
/// call back into 200 within 5 s. The configuration reaches both proxies through the CA's
/// config stream (`rampart ca --kubernetes` watches the policy, Pods and Services); the call
/// goes client app -> client proxy (HTTP proxy listener) -> mTLS -> server proxy on the
/// server Pod's IP -> server app, and the policy names the client by its SPIFFE principal.
#[allow(clippy::too_many_arguments)]
fn authorization_policy_turns_200_into_403(
    kubectl: &Kubectl,
    namespaces: &mut Namespaces<'_>,
    tag: &str,
    work: &Path,
    ca: SocketAddr,
    bundle: &Path,
    ca_proc: &Proc,
) {
    kubectl.ok(&["get", "crd", "authorizationpolicies.security.istio.io"]);
    let ns = format!("re2e-{tag}-mesh");
    namespaces.create(&ns);
    for sa in ["web", "client"] {
        kubectl.ok(&["create", "serviceaccount", sa, "-n", &ns]);
    }
    // The server Pod: its app on 127.0.0.1:T, its proxy on the Pod IP, port T. The client
    // Pod's listeners move off Istio's defaults (both Pods share this host's loopback).
    let target = support::free_port();
    let outbound = support::free_port();
    support::app_200(target);
    kubectl.pod(&ns, "web-1", "web", "node-a", "127.0.0.31");
    kubectl.pod(&ns, "client-1", "client", "node-a", "127.0.0.32");
    for (pod, annotations) in [
        (
            "web-1",
            vec![
                "proxy.rampart.io/outbound=none".to_owned(),
                format!("proxy.rampart.io/admin=127.0.0.1:{}", support::free_port()),
            ],
        ),
        (
            "client-1",
            vec![
                format!("proxy.rampart.io/outbound=127.0.0.1:{outbound}"),
                format!("proxy.rampart.io/admin=127.0.0.1:{}", support::free_port()),
            ],
        ),
    ] {
        let mut args = vec!["annotate", "pod", pod, "-n", ns.as_str(), "--overwrite"];
        args.extend(annotations.iter().map(String::as_str));
        kubectl.ok(&args);
    }
    kubectl.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {"selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": target}]},
    }));
    let dir = work.join("mesh");
    let token = |sa: &str| kubectl.token(&ns, sa, &["--audience", "istio-ca"]);
    let web = support::PodSidecar::start(
        &dir.join("web"),
        &ns,
        "web",
        "web-1",
        &token("web"),
        ca,
        bundle,
    );
    let client = support::PodSidecar::start(
        &dir.join("client"),
        &ns,
        "client",
        "client-1",
        &token("client"),
        ca,
        bundle,
    );
    let logs = || {
        format!(
            "--- client proxy\n{}\n--- web proxy\n{}\n--- CA\n{}",
            client.proxy.log(),
            web.proxy.log(),
            ca_proc.log()
        )
    };
    let proxy = SocketAddr::from(([127, 0, 0, 1], outbound));
    let host = format!("web.{ns}.svc.cluster.local");
    let url = format!("http://{host}/");
    wait_for(
        "a call from client-1 to Service web through both proxies",
        Duration::from_secs(60),
        || support::get_via(proxy, &url, &host) == Some(200),
        logs,
    );
    say("kubernetes_e2e: client-1 -> web through two proxies configured by the CA's stream: 200");

    let policy = serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-client", "namespace": ns},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
                 "rules": [{"from": [{"source": {
                     "principals": [format!("cluster.local/ns/{ns}/sa/client")]}}]}]},
    });
    kubectl.apply(&policy);
    let applied = Instant::now();
    wait_for(
        "the AuthorizationPolicy to turn 200 into 403",
        FIVE_SECONDS,
        || support::get_via(proxy, &url, &host) == Some(403),
        logs,
    );
    say(&format!(
        "kubernetes_e2e: AuthorizationPolicy applied with kubectl: 200 -> 403 after {:?}",
        applied.elapsed()
    ));
    kubectl.ok(&["delete", "authorizationpolicy", "deny-client", "-n", &ns]);
    let deleted = Instant::now();
    wait_for(
        "the deleted AuthorizationPolicy to let the call through again",
        FIVE_SECONDS,
        || support::get_via(proxy, &url, &host) == Some(200),
        logs,
    );
    say(&format!(
        "kubernetes_e2e: AuthorizationPolicy deleted: 403 -> 200 after {:?}",
        deleted.elapsed()
    ));
}
