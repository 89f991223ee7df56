//! Policy and registry from the API (issue #14 item 2, DESIGN §6): the Kubernetes
//! configuration source. kube-runtime watches of `security.istio.io` v1 and v1beta1
//! PeerAuthentication, RequestAuthentication and AuthorizationPolicy, and of Pods, Services
//! and Namespaces, turned into mesh snapshots by the pure [`rampart_mesh::kube::convert`] and
//! handed out as the same [`Updates`] stream the folder watcher gives.
//!
//! - **Fail closed at start**: no snapshot until every watch has listed its objects once (a
//!   proxy would otherwise start with no policy).
//! - **Debounced**: a burst of object events makes one snapshot, [`DEFAULT_DEBOUNCE`] after
//!   the last event; none when the registry and policy it would carry are unchanged.
//! - **Slim**: objects are held without `managedFields` and `kubectl apply`'s copy, Pods
//!   with only what [`convert`] reads; a Pod status heartbeat changes nothing stored.
//! - **Invalid objects** are left out alone (every other object still applies). Each is
//!   logged once per `resourceVersion` (namespace/name, field, reason), counted in
//!   `rampart_config_rejections_total{kind}` (one per refused object version) and
//!   `rampart_config_rejected_objects{kind}` (refused now), and a core/v1 Event (type
//!   `Warning`, reason [`EVENT_REASON_POLICY`] or [`EVENT_REASON_OBJECT`]) is posted
//!   regarding the object, once per `resourceVersion`.
//! - **Watch errors** (API down, RBAC) keep the last snapshot; the watch retries with
//!   kube-runtime's default backoff and re-lists.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{
    ConfigMap, Event as CoreEvent, Namespace, ObjectReference, Pod, Service,
};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rampart_authz::MeshConfig;
use rampart_mesh::kube::{KubeObjects, KubeSettings, MESH_CONFIGMAP, Refused, convert};
use rampart_mesh::watch::{Update, Updates};
use serde_json::Value;
use tokio::sync::mpsc;

/// Quiet time after the last object event before a snapshot is built.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
/// Event reason for a refused `security.istio.io` object.
pub const EVENT_REASON_POLICY: &str = "RampartInvalidPolicy";
/// Event reason for a refused Pod or Service.
pub const EVENT_REASON_OBJECT: &str = "RampartInvalidObject";
/// The Event source component.
pub const EVENT_COMPONENT: &str = "rampart";
/// The Event reason for a refused Secret `cacerts` (CA material the CA does not load).
pub const EVENT_REASON_CA_MATERIAL: &str = "RampartInvalidCAMaterial";

/// The policy kinds and versions watched.
const POLICY_KINDS: [&str; 3] = [
    "PeerAuthentication",
    "RequestAuthentication",
    "AuthorizationPolicy",
];
const POLICY_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

type KindLabel = Vec<(String, String)>;

/// The source's metrics (register them where the process serves `/metrics`).
#[derive(Debug, Default)]
pub struct SourceMetrics {
    rejections: Family<KindLabel, Counter>,
    rejected: Family<KindLabel, Gauge>,
    snapshots: Counter,
    watch_errors: Counter,
}

impl SourceMetrics {
    /// Register every metric in `registry`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "rampart_config_rejections",
            "Kubernetes objects refused (once per object and resourceVersion), by kind",
            self.rejections.clone(),
        );
        registry.register(
            "rampart_config_rejected_objects",
            "Kubernetes objects refused in the latest snapshot, by kind",
            self.rejected.clone(),
        );
        registry.register(
            "rampart_config_snapshots",
            "Snapshots sent from the Kubernetes API (one per change of the mesh model)",
            self.snapshots.clone(),
        );
        registry.register(
            "rampart_config_watch_errors",
            "Errors of the Kubernetes watches (each retried with backoff)",
            self.watch_errors.clone(),
        );
    }

    /// Refusals counted for `kind` so far (one per object version).
    pub fn rejections(&self, kind: &str) -> u64 {
        self.rejections.get_or_create(&label(kind)).get()
    }

    /// Objects of `kind` refused in the latest snapshot.
    pub fn rejected_now(&self, kind: &str) -> i64 {
        self.rejected.get_or_create(&label(kind)).get()
    }

    /// Snapshots sent so far.
    pub fn snapshots(&self) -> u64 {
        self.snapshots.get()
    }

    /// Watch errors so far (each retried with backoff).
    pub fn watch_errors(&self) -> u64 {
        self.watch_errors.get()
    }
}

fn label(kind: &str) -> KindLabel {
    vec![("kind".to_owned(), kind.to_owned())]
}

/// The Kubernetes configuration source.
pub struct KubeConfigSource {
    client: kube::Client,
    settings: KubeSettings,
    debounce: Duration,
    metrics: Arc<SourceMetrics>,
}

impl std::fmt::Debug for KubeConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeConfigSource")
            .field("settings", &self.settings)
            .field("debounce", &self.debounce)
            .finish_non_exhaustive()
    }
}

/// What one watch said, as JSON.
enum Change {
    Apply(Value),
    Delete(Value),
    Init,
    InitApply(Value),
    InitDone,
    Error(String),
}

/// Which collection a change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Coll {
    Policy(usize),
    Pods,
    Services,
    Namespaces,
    /// Istio's mesh config ConfigMap (one object at most).
    Mesh,
}

type ChangeStream = Pin<Box<dyn Stream<Item = (Coll, Change)> + Send>>;

fn key(v: &Value) -> (String, String) {
    let m = &v["metadata"];
    (
        m["namespace"].as_str().unwrap_or("").to_owned(),
        m["name"].as_str().unwrap_or("").to_owned(),
    )
}

/// Keeps of a Pod what [`convert`] reads (name, namespace, uid, resourceVersion, labels,
/// annotations, deletion; service account, host network, container port names and
/// numbers; phase, Pod IP). A cluster's Pods are held in memory, and their status changes
/// (conditions, container states) are most of the watch's events: slimmed, those leave
/// the object as it was, and [`Store::apply`] sees no change.
fn slim_pod(pod: &mut Pod) {
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec, PodStatus};
    let m = &mut pod.metadata;
    m.owner_references = None;
    m.finalizers = None;
    m.generate_name = None;
    m.creation_timestamp = None;
    m.generation = None;
    pod.spec = pod.spec.take().map(|s| PodSpec {
        service_account_name: s.service_account_name,
        host_network: s.host_network,
        containers: s
            .containers
            .into_iter()
            .map(|c| Container {
                name: c.name,
                ports: c.ports.map(|ps| {
                    ps.into_iter()
                        .map(|p| ContainerPort {
                            name: p.name,
                            container_port: p.container_port,
                            ..Default::default()
                        })
                        .collect()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
    pod.status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        ..Default::default()
    });
}

/// Whether `new` is `old` but for `metadata.resourceVersion`.
fn same_but_version(old: &Value, new: &Value) -> bool {
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return false;
    };
    o.len() == n.len()
        && o.iter().all(|(k, v)| match (k.as_str(), n.get(k)) {
            ("metadata", Some(nv)) => {
                let (Some(om), Some(nm)) = (v.as_object(), nv.as_object()) else {
                    return false;
                };
                om.len() == nm.len()
                    && om
                        .iter()
                        .all(|(k, v)| k == "resourceVersion" || nm.get(k) == Some(v))
            }
            (_, Some(nv)) => nv == v,
            (_, None) => false,
        })
}

/// One watched collection: its objects, and those of a re-list being gathered.
#[derive(Default)]
struct Store {
    objects: BTreeMap<(String, String), Value>,
    relist: Option<BTreeMap<(String, String), Value>>,
    synced: bool,
}

impl Store {
    /// Apply one change; whether the objects changed.
    fn apply(&mut self, c: Change) -> bool {
        match c {
            Change::Apply(v) => {
                let k = key(&v);
                // A change of nothing kept (a slimmed Pod's status) keeps the object as it
                // was, its resourceVersion too: refusals are reported once per version.
                if self
                    .objects
                    .get(&k)
                    .is_some_and(|old| same_but_version(old, &v))
                {
                    return false;
                }
                self.objects.insert(k, v);
                true
            }
            Change::Delete(v) => {
                self.objects.remove(&key(&v));
                true
            }
            Change::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Change::InitApply(v) => {
                self.relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key(&v), v);
                false
            }
            Change::InitDone => {
                self.objects = self.relist.take().unwrap_or_default();
                self.synced = true;
                true
            }
            Change::Error(_) => false,
        }
    }
}

/// The annotation `kubectl apply` keeps a whole copy of the object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A watch of `api` as [`Change`]s of JSON objects, each passed through `slim` first, and
/// without what no conversion reads (`managedFields`, `kubectl apply`'s copy of the object):
/// the source holds every watched object in memory.
fn watch<K>(api: Api<K>, coll: Coll, types: (String, String), slim: fn(&mut K)) -> ChangeStream
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    K: Send + 'static,
{
    watch_with(api, watcher::Config::default(), coll, types, slim)
}

/// [`watch`] with its own list/watch parameters (a field selector).
fn watch_with<K>(
    api: Api<K>,
    config: watcher::Config,
    coll: Coll,
    types: (String, String),
    slim: fn(&mut K),
) -> ChangeStream
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    K: Send + 'static,
{
    let to_value = move |mut k: K| {
        slim(&mut k);
        let meta = k.meta_mut();
        meta.managed_fields = None;
        if let Some(a) = meta.annotations.as_mut() {
            a.remove(LAST_APPLIED);
        }
        let mut v = serde_json::to_value(&k).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.insert("apiVersion".into(), Value::String(types.0.clone()));
            m.insert("kind".into(), Value::String(types.1.clone()));
        }
        v
    };
    Box::pin(
        watcher::watcher(api, config)
            .default_backoff()
            .map(move |e| {
                let c = match e {
                    Ok(Event::Apply(k)) => Change::Apply(to_value(k)),
                    Ok(Event::Delete(k)) => Change::Delete(to_value(k)),
                    Ok(Event::Init) => Change::Init,
                    Ok(Event::InitApply(k)) => Change::InitApply(to_value(k)),
                    Ok(Event::InitDone) => Change::InitDone,
                    Err(e) => Change::Error(e.to_string()),
                };
                (coll, c)
            }),
    )
}

impl KubeConfigSource {
    /// A source reading the cluster of `client` under the mesh `settings`.
    pub fn new(client: kube::Client, settings: KubeSettings) -> Self {
        KubeConfigSource {
            client,
            settings,
            debounce: DEFAULT_DEBOUNCE,
            metrics: Arc::default(),
        }
    }

    /// Quiet time after the last event before a snapshot is built.
    pub fn with_debounce(mut self, d: Duration) -> Self {
        self.debounce = d;
        self
    }

    /// The source's metrics.
    pub fn metrics(&self) -> Arc<SourceMetrics> {
        self.metrics.clone()
    }

    /// Start watching: the returned stream yields a snapshot after the first full sync of
    /// every watch, then one per (debounced) change. Dropping it stops the watches.
    pub fn start(self) -> Updates {
        let (tx, updates) = Updates::channel(4);
        tokio::spawn(self.run(tx));
        updates
    }

    fn streams(&self) -> Vec<ChangeStream> {
        let mut out = Vec::new();
        let mut i = 0;
        for kind in POLICY_KINDS {
            for version in POLICY_VERSIONS {
                let gvk = GroupVersionKind::gvk(rampart_authz::SECURITY_GROUP, version, kind);
                let ar = ApiResource::from_gvk(&gvk);
                let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
                out.push(watch(
                    api,
                    Coll::Policy(i),
                    (ar.api_version.clone(), kind.to_owned()),
                    |_| {},
                ));
                i += 1;
            }
        }
        let core = |k: &str| ("v1".to_owned(), k.to_owned());
        out.push(watch(
            Api::<Pod>::all(self.client.clone()),
            Coll::Pods,
            core("Pod"),
            slim_pod,
        ));
        out.push(watch(
            Api::<Service>::all(self.client.clone()),
            Coll::Services,
            core("Service"),
            |_| {},
        ));
        out.push(watch(
            Api::<Namespace>::all(self.client.clone()),
            Coll::Namespaces,
            core("Namespace"),
            |_| {},
        ));
        // Only the MeshConfig key of Istio's mesh ConfigMap (not meshNetworks and the like).
        out.push(watch_with(
            Api::<ConfigMap>::namespaced(self.client.clone(), &self.settings.root_namespace),
            watcher::Config::default()
                .fields(&format!("metadata.name={}", self.settings.mesh_configmap)),
            Coll::Mesh,
            core("ConfigMap"),
            |cm| {
                if let Some(d) = cm.data.as_mut() {
                    d.retain(|k, _| k == MESH_CONFIGMAP.1);
                }
                cm.binary_data = None;
            },
        ));
        out
    }

    async fn run(self, tx: mpsc::Sender<Update>) {
        let streams = self.streams();
        let count = streams.len();
        let mut merged = futures::stream::select_all(streams);
        let mut stores: BTreeMap<Coll, Store> = BTreeMap::new();
        let reporter = Reporter::new(self.client.clone(), self.metrics.clone());
        let mut dirty = false;
        let mut deadline = tokio::time::Instant::now();
        let mut waiting_logged = false;
        let mut last: Option<(
            rampart_mesh::Registry,
            Vec<rampart_authz::Resource>,
            MeshConfig,
        )> = None;
        // The last mesh ConfigMap that parsed: a broken edit keeps it serving.
        let mut mesh_good: GoodMesh = None;
        loop {
            let all_synced = stores.len() == count && stores.values().all(|s| s.synced);
            tokio::select! {
                next = merged.next() => {
                    let Some((coll, change)) = next else { return };
                    if let Change::Error(e) = &change {
                        self.metrics.watch_errors.inc();
                        tracing::warn!(watch = ?coll, error = %e, "kubernetes watch failed; the last snapshot keeps serving, retrying with backoff");
                    }
                    if stores.entry(coll).or_default().apply(change) {
                        dirty = true;
                        deadline = tokio::time::Instant::now() + self.debounce;
                    }
                }
                () = tokio::time::sleep_until(deadline), if dirty && all_synced => {
                    dirty = false;
                    let mut objects = objects(&stores);
                    let (mesh, refused_mesh) = match mesh_config(&self.settings, &stores, &mut mesh_good) {
                        Ok(m) => m,
                        Err(refused) => {
                            // Broken, and no good one seen since this process started (a
                            // restart, a new replica): no snapshot rather than Istio's
                            // defaults in its place (fail closed, as before the first list).
                            reporter.report(&refused);
                            tracing::warn!(
                                "no snapshot: Istio's mesh config ConfigMap does not parse and no earlier version did (fail closed until it is fixed)"
                            );
                            continue;
                        }
                    };
                    objects.mesh = mesh;
                    let mut conv = convert(&self.settings, &objects);
                    conv.refused.extend(refused_mesh);
                    reporter.report(&conv.refused);
                    // Pod status heartbeats and the like change nothing the mesh reads:
                    // no new snapshot for them.
                    let model = (
                        conv.snapshot.registry.clone(),
                        conv.snapshot.resources.clone(),
                        conv.snapshot.mesh.clone(),
                    );
                    if last.as_ref() == Some(&model) {
                        tracing::debug!("objects changed, the mesh model did not: no snapshot");
                        continue;
                    }
                    last = Some(model);
                    self.metrics.snapshots.inc();
                    tracing::info!(
                        policies = conv.snapshot.resources.len(),
                        workloads = conv.snapshot.registry.workloads.len(),
                        services = conv.snapshot.registry.services.len(),
                        refused = conv.refused.len(),
                        "snapshot from the Kubernetes API"
                    );
                    if tx.send(Ok(conv.snapshot)).await.is_err() {
                        return;
                    }
                }
                () = tx.closed() => return,
                () = tokio::time::sleep(Duration::from_secs(10)), if !all_synced && !waiting_logged => {
                    waiting_logged = true;
                    tracing::warn!(
                        synced = stores.values().filter(|s| s.synced).count(),
                        watches = count,
                        "waiting for every Kubernetes watch to list once before the first snapshot (fail closed)"
                    );
                }
            }
        }
    }
}

/// The last mesh config that served since this process started: the ConfigMap's text and
/// what it parsed to, or `(None, None)` when there was no ConfigMap (Istio's defaults).
type GoodMesh = Option<(Option<String>, Option<MeshConfig>)>;

/// The mesh config from Istio's ConfigMap: parsed, or the last one that served (with the
/// refusal of the broken one: an earlier version, or Istio's defaults when the ConfigMap did
/// not exist before), or Istio's defaults when there is none; `Err` (with the refusal) when
/// it is broken and nothing served before (a restart, a new replica). Identity settings in
/// it that differ from the CA's are reported (they are not used).
#[allow(clippy::type_complexity)]
fn mesh_config(
    settings: &KubeSettings,
    stores: &BTreeMap<Coll, Store>,
    good: &mut GoodMesh,
) -> Result<(Option<MeshConfig>, Vec<Refused>), Vec<Refused>> {
    let Some(cm) = stores
        .get(&Coll::Mesh)
        .and_then(|s| s.objects.values().next())
    else {
        *good = Some((None, None));
        return Ok((None, Vec::new()));
    };
    let meta = &cm["metadata"];
    let refusal = |field: &str, reason: String| {
        let s = |k: &str| meta[k].as_str().unwrap_or_default().to_string();
        Refused {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: s("namespace"),
            name: s("name"),
            uid: s("uid"),
            resource_version: s("resourceVersion"),
            field: format!("data.{}{field}", MESH_CONFIGMAP.1),
            reason,
        }
    };
    let text = cm["data"][MESH_CONFIGMAP.1].as_str().unwrap_or_default();
    let m = match good.as_ref() {
        Some((Some(t), Some(m))) if t == text => m.clone(),
        _ => match MeshConfig::from_yaml(text) {
            Ok(m) => {
                *good = Some((Some(text.to_string()), Some(m.clone())));
                m
            }
            Err(e) => {
                let (what, last) = match good.as_ref() {
                    Some((_, Some(m))) => ("the last mesh config that parsed", Some(m.clone())),
                    // No ConfigMap before this broken one: the defaults that served go on.
                    Some((_, None)) => (
                        "Istio's default mesh config, served before it existed,",
                        None,
                    ),
                    None => {
                        return Err(vec![refusal(
                            "",
                            format!(
                                "{e}; no snapshot is made until it parses (no earlier version did)"
                            ),
                        )]);
                    }
                };
                return Ok((
                    last,
                    vec![refusal("", format!("{e}; {what} keeps serving"))],
                ));
            }
        },
    };
    // Identity is the CA's: say so where Istio, reading this ConfigMap, would differ.
    let mut refused = Vec::new();
    let td = settings.trust_domain.to_string();
    if m.trust_domain != td {
        refused.push(refusal(
            ".trustDomain",
            format!(
                "not used: {:?} differs from the CA's trust domain {td:?} (--trust-domain), which identities and policies use",
                m.trust_domain
            ),
        ));
    }
    if m.root_namespace != settings.root_namespace {
        refused.push(refusal(
            ".rootNamespace",
            format!(
                "not used: {:?} differs from the CA's root namespace {:?} (--root-namespace); policies in {:?} are not mesh-wide here",
                m.root_namespace, settings.root_namespace, m.root_namespace
            ),
        ));
    }
    let aliases: Vec<String> = settings
        .trust_domain_aliases
        .iter()
        .map(ToString::to_string)
        .collect();
    if m.trust_domain_aliases.iter().any(|a| !aliases.contains(a)) {
        refused.push(refusal(
            ".trustDomainAliases",
            format!(
                "not used: {:?} names aliases the CA does not have (its aliases: {aliases:?})",
                m.trust_domain_aliases
            ),
        ));
    }
    Ok((Some(m), refused))
}

fn objects(stores: &BTreeMap<Coll, Store>) -> KubeObjects {
    let mut o = KubeObjects::default();
    for (coll, s) in stores {
        let vals = s.objects.values().cloned();
        match coll {
            Coll::Policy(_) => o.policies.extend(vals),
            Coll::Pods => o.pods.extend(vals),
            Coll::Services => o.services.extend(vals),
            Coll::Namespaces => o.namespaces.extend(vals),
            // Parsed separately (`mesh_config`), with the last good one kept.
            Coll::Mesh => {}
        }
    }
    o
}

/// Logs, counts and posts an Event for each refused object version, once.
/// (kind, namespace, name, resourceVersion, field) of a refusal.
type RefusalKey = (String, String, String, String, String);

struct Reporter {
    client: kube::Client,
    metrics: Arc<SourceMetrics>,
    /// (kind, namespace, name, resourceVersion, field) already reported: one object version
    /// can be refused for several fields, each reported once.
    seen: Mutex<BTreeSet<RefusalKey>>,
    kinds: Mutex<BTreeSet<String>>,
}

impl Reporter {
    fn new(client: kube::Client, metrics: Arc<SourceMetrics>) -> Self {
        Reporter {
            client,
            metrics,
            seen: Mutex::default(),
            kinds: Mutex::default(),
        }
    }

    fn report(&self, refused: &[Refused]) {
        let now: BTreeSet<_> = refused
            .iter()
            .map(|r| {
                (
                    r.kind.clone(),
                    r.namespace.clone(),
                    r.name.clone(),
                    r.resource_version.clone(),
                    r.field.clone(),
                )
            })
            .collect();
        let mut per_kind: BTreeMap<String, i64> = BTreeMap::new();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            for r in refused {
                *per_kind.entry(r.kind.clone()).or_default() += 1;
                let k = (
                    r.kind.clone(),
                    r.namespace.clone(),
                    r.name.clone(),
                    r.resource_version.clone(),
                    r.field.clone(),
                );
                if seen.contains(&k) {
                    continue;
                }
                seen.insert(k);
                tracing::warn!(
                    kind = %r.kind,
                    object = %format!("{}/{}", r.namespace, r.name),
                    resource_version = %r.resource_version,
                    field = %r.field,
                    reason = %r.reason,
                    "invalid object refused alone; the rest of the configuration applies"
                );
                self.metrics.rejections.get_or_create(&label(&r.kind)).inc();
                tokio::spawn(post_event(self.client.clone(), r.clone()));
            }
            // Forget versions no longer refused (fixed or deleted): bounded memory.
            seen.retain(|k| now.contains(k));
        }
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.extend(per_kind.keys().cloned());
        for k in kinds.iter() {
            self.metrics
                .rejected
                .get_or_create(&label(k))
                .set(per_kind.get(k).copied().unwrap_or(0));
        }
    }
}

/// Post a core/v1 Warning Event regarding the refused object (best effort: a failure is
/// logged, the refusal stands).
pub(crate) async fn post_event(client: kube::Client, r: Refused) {
    let ns = if r.namespace.is_empty() {
        "default".to_owned()
    } else {
        r.namespace.clone()
    };
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let suffix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let reason = if r.kind == "Secret" {
        EVENT_REASON_CA_MATERIAL
    } else if r.api_version.starts_with(rampart_authz::SECURITY_GROUP) {
        EVENT_REASON_POLICY
    } else {
        EVENT_REASON_OBJECT
    };
    let message = if r.field.is_empty() {
        format!("refused by Rampart: {}", r.reason)
    } else {
        format!("refused by Rampart: {}: {}", r.field, r.reason)
    };
    let ev = CoreEvent {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            // Event names are DNS subdomains (at most 253 characters) like kubectl's.
            name: Some(format!(
                "{}.{suffix:x}",
                r.name
                    .get(..200)
                    .unwrap_or(&r.name)
                    .trim_end_matches(['.', '-'])
            )),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some(r.api_version.clone()),
            kind: Some(r.kind.clone()),
            name: Some(r.name.clone()),
            namespace: Some(ns.clone()),
            uid: Some(r.uid.clone()).filter(|u| !u.is_empty()),
            resource_version: Some(r.resource_version.clone()).filter(|v| !v.is_empty()),
            ..Default::default()
        },
        reason: Some(reason.to_owned()),
        message: Some(message),
        type_: Some("Warning".to_owned()),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some(EVENT_COMPONENT.to_owned()),
            host: None,
        }),
        reporting_component: Some(EVENT_COMPONENT.to_owned()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Default::default()
    };
    let api: Api<CoreEvent> = Api::namespaced(client, &ns);
    if let Err(e) = api.create(&PostParams::default(), &ev).await {
        tracing::warn!(object = %r.object(), error = %e, "could not post the Event of a refused object (events create RBAC?)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_certs::TrustDomain;
    use serde_json::json;

    /// A Pod as the API server sends it: managed fields, `kubectl apply`'s copy, owner,
    /// container details and a full status.
    fn full_pod(rv: &str, ready: bool, labels: Value) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-1", "namespace": "shop", "uid": "u-1", "resourceVersion": rv,
                "generateName": "web-", "creationTimestamp": "2026-12-07T10:00:00Z",
                "labels": labels,
                "annotations": {
                    "proxy.rampart.io/admin": "127.0.0.1:15900",
                    LAST_APPLIED: "{\"a whole copy\": true}"
                },
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-abc", "uid": "rs-1"}],
                "managedFields": [{"manager": "kubectl", "operation": "Update",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
            },
            "spec": {
                "serviceAccountName": "web",
                "nodeName": "node-a",
                "containers": [{
                    "name": "app", "image": "example/web:1",
                    "env": [{"name": "A", "value": "b"}],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
                }]
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.7", "hostIP": "192.0.2.1",
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                "containerStatuses": [{"name": "app", "ready": ready, "restartCount": 0,
                    "image": "example/web:1", "imageID": "sha256:00"}]
            }
        }))
        .unwrap()
    }

    fn as_stored(mut pod: Pod) -> Value {
        slim_pod(&mut pod);
        pod.metadata.managed_fields = None;
        if let Some(a) = pod.metadata.annotations.as_mut() {
            a.remove(LAST_APPLIED);
        }
        let mut v = serde_json::to_value(pod).unwrap();
        v["apiVersion"] = "v1".into();
        v["kind"] = "Pod".into();
        v
    }

    fn service() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "uid": "s-1", "resourceVersion": "1"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80,
                "targetPort": "http"}]}
        })
    }

    /// The mesh model from a slimmed Pod is the one from the whole Pod, and what is dropped
    /// is gone (a named target port still resolves).
    #[test]
    fn a_slimmed_pod_converts_as_the_whole_one() {
        let settings = KubeSettings::new(TrustDomain::new("cluster.local").unwrap());
        let full = full_pod("5", true, json!({"app": "web"}));
        let mut whole = serde_json::to_value(&full).unwrap();
        whole["apiVersion"] = "v1".into();
        whole["kind"] = "Pod".into();
        let slim = as_stored(full);
        let snapshot = |pod: Value| {
            let objects = KubeObjects {
                pods: vec![pod],
                services: vec![service()],
                ..Default::default()
            };
            let conv = convert(&settings, &objects);
            assert!(conv.refused.is_empty(), "{:?}", conv.refused);
            conv.snapshot.registry
        };
        let registry = snapshot(slim.clone());
        assert_eq!(registry, snapshot(whole));
        assert_eq!(registry.workloads.len(), 1);
        assert_eq!(registry.workloads[0].ports[0].port, 8080);
        assert_eq!(
            registry.workloads[0].proxy.admin,
            Some("127.0.0.1:15900".parse().unwrap())
        );
        let text = slim.to_string();
        for gone in [
            "managedFields",
            "last-applied",
            "containerStatuses",
            "example/web",
            "env",
        ] {
            assert!(!text.contains(gone), "{gone} kept: {text}");
        }
    }

    /// A status-only change of a Pod (readiness) is no change of the stored objects, and the
    /// stored resourceVersion stays; a label change is one.
    #[test]
    fn status_heartbeats_change_nothing_stored() {
        let mut store = Store::default();
        assert!(store.apply(Change::Apply(as_stored(full_pod(
            "5",
            false,
            json!({"app": "web"})
        )))));
        assert!(!store.apply(Change::Apply(as_stored(full_pod(
            "6",
            true,
            json!({"app": "web"})
        )))));
        let k = ("shop".to_owned(), "web-1".to_owned());
        assert_eq!(store.objects[&k]["metadata"]["resourceVersion"], "5");
        assert!(store.apply(Change::Apply(as_stored(full_pod(
            "7",
            true,
            json!({"app": "api"})
        )))));
        assert_eq!(store.objects[&k]["metadata"]["resourceVersion"], "7");
        assert!(store.apply(Change::Delete(as_stored(full_pod("8", true, json!({}))))));
        assert!(store.objects.is_empty());
    }
}
