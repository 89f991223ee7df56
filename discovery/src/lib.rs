//! The control plane's config stream (docs/KUBERNETES.md "Config streaming"):
//! `rampart.config.v1.ConfigDiscovery/DeltaConfig`, one bidirectional stream per proxy,
//! modelled on Envoy's delta xDS.
//!
//! - Input: the same [`Updates`] of mesh snapshots any `ConfigSource` produces (a watched
//!   folder, the Kubernetes source). Each accepted snapshot becomes a [`Model`]: every
//!   resource (`mesh`, policies, registry items; `rampart_mesh::resources`) serialized once
//!   per version, its bytes shared by every stream it goes to. A refused snapshot changes
//!   nothing: streams keep the last good model.
//! - A stream's slice ([`rampart_mesh::resources::slice_for`]): the mesh settings; the
//!   AuthorizationPolicies and RequestAuthentications of its workload's namespace and of the
//!   root namespace (every one that can apply; selectors are left to the proxy); every
//!   PeerAuthentication (a caller's mTLS origination follows the destination's mode); every
//!   registry service (what it may call, as Istio without a Sidecar resource); its own full
//!   registry entry; and every other destination workload reduced to what a caller needs
//!   (no proxy listeners, upstreams nor command). A workload not in the registry is refused.
//! - Per-stream state: the version of every resource the stream holds (a dense vector indexed
//!   by resource id), so each new model sends a stream only what changed in its slice, and
//!   names that left it as removals. A reconnecting proxy says what it holds
//!   (`initial_resource_versions`) and gets the difference.
//! - Resource ids: a name that left the model keeps its id until every open stream has
//!   diffed a model without it (so each is told to remove it); then the id is freed and
//!   given to the next new name, so Pod churn does not grow the table.
//! - Who may ask: the caller's verified client-certificate SPIFFE ID ([`Authenticator`]) must
//!   be the requested workload's (`spiffe://<td>/ns/<ns>/sa/<serviceAccount>` from the
//!   registry), else `PERMISSION_DENIED` naming why; no certificate is `UNAUTHENTICATED`. A
//!   later model that changes the workload's identity ends the stream the same way.
//!
//! Sits beside `rampart-k8s` (layer 2.5): it reads `rampart-mesh` and serves `rampart-proto`,
//! and citadel stays free of the mesh model: the binary adds this service to the CA's port
//! through `rampart_citadel::start_with_routes`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use rampart_certs::SpiffeId;
use rampart_mesh::MeshFolder;
use rampart_mesh::resources::{Audience, ResourceKind, ScopedResource, scoped_resources};
use rampart_mesh::watch::Updates;
use rampart_proto::rampart::config::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub use rampart_proto::rampart::config::v1::config_discovery_server::ConfigDiscoveryServer;

/// Most full pushes (a stream's first response, or any response of more than
/// [`LARGE_PUSH`] resources) in flight at once: each holds a permit until the proxy answers
/// it (ACK or NACK) or [`PUSH_PERMIT_TIMEOUT`] passes, so 1,000 proxies connecting at once
/// do not hold 1,000 encoded copies of the mesh in memory (istiod throttles pushes the same
/// way).
pub const MAX_FULL_PUSHES: usize = 32;
/// Most resources in one response: a larger push is sent in parts (`incomplete` on all but
/// the last), about 300 KB each for registry items.
pub const PART_RESOURCES: usize = 1_000;
/// A response with more resources than this counts as a full push.
pub const LARGE_PUSH: usize = 1_000;
/// How long a full push holds its permit without an answer.
pub const PUSH_PERMIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest message a stream sends or accepts: a whole first push of a large mesh (10,000
/// registry items are about 3 MB).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Who is calling: the SPIFFE ID of the client certificate verified for this request's
/// connection, or why there is none.
pub trait Authenticator: Send + Sync + 'static {
    /// The caller's verified identity.
    fn caller(&self, extensions: &tonic::Extensions) -> Result<SpiffeId, String>;
}

/// Counters of the service (what `rampart ca` logs and a benchmark reads).
#[derive(Debug, Default)]
pub struct Stats {
    /// Streams open now.
    pub streams: AtomicI64,
    /// Responses sent.
    pub pushes: AtomicU64,
    /// Resources sent, over all responses.
    pub resources_sent: AtomicU64,
    /// Responses acknowledged.
    pub acks: AtomicU64,
    /// Responses refused by the proxy (NACK).
    pub nacks: AtomicU64,
    /// Streams refused (no certificate, identity mismatch, unknown workload, bad request).
    pub refused: AtomicU64,
    /// Snapshots turned into models.
    pub models: AtomicU64,
    /// Models diffed by streams (pushed or not): a stream has dealt with a model once this
    /// counts it.
    pub syncs: AtomicU64,
    /// Resource ids in use in the latest model ([`Model::ids_in_use`]).
    pub resource_ids: AtomicU64,
}

impl Stats {
    /// Register the counters in `registry` (the CA's `/metrics`): `rampart_config_streams`
    /// (open now), `rampart_config_stream_pushes_total`, `_resources_sent_total`,
    /// `_acks_total`, `_nacks_total`, `_refused_total`, `rampart_config_models_total` and
    /// `rampart_config_resource_ids` (ids in use).
    pub fn register(self: &Arc<Self>, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(StatsCollector(self.clone())));
    }
}

#[derive(Debug)]
struct StatsCollector(Arc<Stats>);

impl prometheus_client::collector::Collector for StatsCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let s = &self.0;
        let gauges = [
            (
                "rampart_config_streams",
                "Config streams (proxies) connected now",
                s.streams.load(Ordering::Relaxed),
            ),
            (
                "rampart_config_resource_ids",
                "Resource ids in use in the latest configuration model",
                i64::try_from(s.resource_ids.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let counters = [
            (
                "rampart_config_stream_pushes",
                "Config responses pushed to proxies",
                &s.pushes,
            ),
            (
                "rampart_config_stream_resources_sent",
                "Resources sent to proxies, over all pushes",
                &s.resources_sent,
            ),
            (
                "rampart_config_stream_acks",
                "Config pushes acknowledged by proxies",
                &s.acks,
            ),
            (
                "rampart_config_stream_nacks",
                "Config pushes refused by proxies (NACK; they keep their last good configuration)",
                &s.nacks,
            ),
            (
                "rampart_config_stream_refused",
                "Config streams refused (no certificate, identity mismatch, unknown workload, bad request)",
                &s.refused,
            ),
            (
                "rampart_config_models",
                "Configuration snapshots turned into models for the proxies",
                &s.models,
            ),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v.load(Ordering::Relaxed));
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}

/// Who gets a shared entry (the full registry entry of a workload is kept apart: only its
/// own stream gets it).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    Everyone,
    Namespace(String),
}

/// One resource, serialized once for its version.
#[derive(Debug)]
struct Entry {
    scope: Scope,
    version: u64,
    wire: pb::Resource,
}

/// One accepted snapshot as resources, ready to be sliced per stream
/// ([`rampart_mesh::resources::scoped_resources`]).
#[derive(Debug)]
pub struct Model {
    generation: u64,
    /// The shared form of each resource, by resource id (a workload's reduced entry, for
    /// every stream but its own); `None`: no shared form in this model.
    entries: Vec<Option<Arc<Entry>>>,
    /// Each workload's full registry entry, by its resource id (its own stream only).
    own: HashMap<u32, Arc<Entry>>,
    /// The name of every id in use, by id: the names of this model and those that left it
    /// but may still be held by a stream (so it can be told to remove them). A freed id's
    /// name is empty until the id is given again.
    names: Arc<Vec<Arc<str>>>,
    ids: Arc<HashMap<Arc<str>, u32>>,
    /// Ids whose name left the model, and the generation of the first model without it.
    retired: HashMap<u32, u64>,
    /// Ids no stream can hold: given to the next new names.
    free: Vec<u32>,
    /// Shared entries every stream gets.
    everyone: Vec<u32>,
    /// Shared entries of one namespace's streams (its AuthorizationPolicies and
    /// RequestAuthentications).
    policies: HashMap<String, Vec<u32>>,
    /// `<ns>/<name>` -> the workload's resource id and SPIFFE ID.
    workloads: HashMap<String, (u32, SpiffeId)>,
}

impl Model {
    /// The model of `folder`, reusing `prev`'s entries (and their bytes) whose version did
    /// not change, and its resource ids. No stream is taken to hold anything: ids of names
    /// that left `prev` are freed (see [`Model::build_for_streams`]).
    pub fn build(folder: &MeshFolder, prev: Option<&Model>) -> Model {
        Model::build_for_streams(folder, prev, u64::MAX)
    }

    /// [`Model::build`] while every open stream has diffed a model of generation
    /// `synced` or later: the id of a name that left the model at generation `g` is
    /// freed once `g <= synced` (every stream has been told to remove it, or never had it)
    /// and `prev` is of generation `g` or later (a stream opening now diffs `prev` or a
    /// later model). So the id table follows the model's size, not every name it ever held
    /// (Pod churn), and an id is never given to a new name while a stream holds the old one.
    pub fn build_for_streams(folder: &MeshFolder, prev: Option<&Model>, synced: u64) -> Model {
        let generation = prev.map_or(1, |p| p.generation + 1);
        let mut names: Vec<Arc<str>> = prev.map(|p| p.names.as_ref().clone()).unwrap_or_default();
        let mut ids: HashMap<Arc<str>, u32> =
            prev.map(|p| p.ids.as_ref().clone()).unwrap_or_default();
        let mut retired = prev.map(|p| p.retired.clone()).unwrap_or_default();
        let mut free = prev.map(|p| p.free.clone()).unwrap_or_default();
        let published = prev.map_or(0, |p| p.generation);
        let bound = published.min(synced);
        retired.retain(|id, left_at| {
            if *left_at <= bound {
                let name = std::mem::replace(&mut names[*id as usize], Arc::from(""));
                ids.remove(&name);
                free.push(*id);
                false
            } else {
                true
            }
        });
        // Lowest free ids first: the table stays dense.
        free.sort_unstable_by(|a, b| b.cmp(a));
        let mut entries: Vec<Option<Arc<Entry>>> = Vec::new();
        let mut own: HashMap<u32, Arc<Entry>> = HashMap::new();
        let mut everyone = Vec::new();
        let mut policies: HashMap<String, Vec<u32>> = HashMap::new();
        let mut workloads = HashMap::new();
        let mut present = vec![false; names.len()];
        for ScopedResource {
            resource: r,
            audience,
        } in scoped_resources(folder)
        {
            let id = match ids.get(r.name.as_str()) {
                Some(id) => *id,
                None => {
                    let name: Arc<str> = Arc::from(r.name.as_str());
                    let id = match free.pop() {
                        Some(id) => {
                            names[id as usize] = name.clone();
                            id
                        }
                        None => {
                            names.push(name.clone());
                            u32::try_from(names.len() - 1).expect("fewer than 2^32 resources")
                        }
                    };
                    ids.insert(name, id);
                    id
                }
            };
            let idx = id as usize;
            if present.len() <= idx {
                present.resize(idx + 1, false);
            }
            present[idx] = true;
            retired.remove(&id);
            let version = u64::from_str_radix(&r.version, 16).unwrap_or(1).max(1);
            let (scope, slot_prev) = match &audience {
                Audience::Everyone => (
                    Scope::Everyone,
                    prev.and_then(|p| p.entries.get(idx).cloned().flatten()),
                ),
                Audience::Namespace(ns) => (
                    Scope::Namespace(ns.clone()),
                    prev.and_then(|p| p.entries.get(idx).cloned().flatten()),
                ),
                Audience::Workload(_) => {
                    (Scope::Everyone, prev.and_then(|p| p.own.get(&id).cloned()))
                }
            };
            let entry = slot_prev
                .filter(|e| e.version == version && e.scope == scope && e.wire.name == r.name)
                .unwrap_or_else(|| {
                    Arc::new(Entry {
                        scope: scope.clone(),
                        version,
                        wire: pb::Resource {
                            name: r.name.clone(),
                            version: r.version.clone(),
                            r#type: type_of(r.kind).to_string(),
                            body: r.body.into(),
                        },
                    })
                });
            match audience {
                Audience::Workload(key) => {
                    own.insert(id, entry);
                    let (ns, name) = key.split_once('/').unwrap_or_default();
                    if let Some(w) = folder.registry.get(ns, name) {
                        workloads.insert(key, (id, w.spiffe_id(&folder.trust_domain)));
                    }
                }
                Audience::Everyone => {
                    everyone.push(id);
                    if entries.len() <= idx {
                        entries.resize(idx + 1, None);
                    }
                    entries[idx] = Some(entry);
                }
                Audience::Namespace(ns) => {
                    policies.entry(ns).or_default().push(id);
                    if entries.len() <= idx {
                        entries.resize(idx + 1, None);
                    }
                    entries[idx] = Some(entry);
                }
            }
        }
        entries.resize(names.len(), None);
        present.resize(names.len(), false);
        let is_free: std::collections::HashSet<u32> = free.iter().copied().collect();
        for (idx, here) in present.iter().enumerate() {
            let id = u32::try_from(idx).expect("fewer than 2^32 resources");
            if !here && !is_free.contains(&id) {
                retired.entry(id).or_insert(generation);
            }
        }
        Model {
            generation,
            entries,
            own,
            names: Arc::new(names),
            ids: Arc::new(ids),
            retired,
            free,
            everyone,
            policies,
            workloads,
        }
    }

    /// How many resources the model holds (shared entries and full workload entries).
    pub fn len(&self) -> usize {
        self.entries.iter().filter(|e| e.is_some()).count() + self.own.len()
    }

    /// Whether the model holds no resource.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resource ids in use: the model's names and those that left it that a stream may
    /// still hold (freed ids are given again, so this follows the model's size).
    pub fn ids_in_use(&self) -> usize {
        self.names.len() - self.free.len()
    }

    /// The model's generation (1 for the first).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn in_slice(&self, idx: usize, namespace: &str, own: Option<u32>) -> bool {
        if own.is_some_and(|o| o as usize == idx) {
            return self.own.contains_key(&(idx as u32));
        }
        match self
            .entries
            .get(idx)
            .and_then(Option::as_ref)
            .map(|e| &e.scope)
        {
            None => false,
            Some(Scope::Everyone) => true,
            Some(Scope::Namespace(ns)) => ns == namespace,
        }
    }

    /// What the stream of workload `namespace/<name>` (resource id `own`) holding `have`
    /// (version by id, 0 for none) lacks: changed or new resources of its slice, and names
    /// to remove. `have` is updated to what the stream holds once the answer is sent.
    fn delta(
        &self,
        namespace: &str,
        own: Option<u32>,
        have: &mut Vec<u64>,
    ) -> (Vec<pb::Resource>, Vec<String>) {
        if have.len() < self.names.len() {
            have.resize(self.names.len(), 0);
        }
        let mut out = Vec::new();
        let mut send = |e: &Arc<Entry>, idx: usize, have: &mut Vec<u64>| {
            if have[idx] != e.version {
                out.push(e.wire.clone());
                have[idx] = e.version;
            }
        };
        let empty = Vec::new();
        let mine = self.policies.get(namespace).unwrap_or(&empty);
        for id in self.everyone.iter().chain(mine) {
            if Some(*id) == own {
                continue;
            }
            let idx = *id as usize;
            if let Some(e) = &self.entries[idx] {
                send(e, idx, have);
            }
        }
        if let Some(id) = own
            && let Some(e) = self.own.get(&id)
        {
            send(e, id as usize, have);
        }
        let mut removed = Vec::new();
        for (idx, v) in have.iter_mut().enumerate() {
            if *v != 0 && !self.in_slice(idx, namespace, own) {
                *v = 0;
                removed.push(self.names[idx].to_string());
            }
        }
        (out, removed)
    }
}

/// Whether the next delta of a stream is large (more than [`LARGE_PUSH`] resources may
/// change in what every stream gets; a namespace's policies are bounded), counted without
/// building the delta.
fn model_is_large(model: &Model, have: &[u64]) -> bool {
    let mut changed = 0usize;
    for id in &model.everyone {
        let idx = *id as usize;
        if let Some(e) = &model.entries[idx]
            && have.get(idx).copied().unwrap_or(0) != e.version
        {
            changed += 1;
            if changed > LARGE_PUSH {
                return true;
            }
        }
    }
    false
}

/// The generation each open stream last diffed (0 while it opens): the oldest bounds
/// which resource ids a new model may free.
#[derive(Debug, Default)]
struct Synced {
    slots: std::sync::Mutex<Vec<std::sync::Weak<AtomicU64>>>,
}

impl Synced {
    fn register(&self) -> Arc<AtomicU64> {
        let slot = Arc::new(AtomicU64::new(0));
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&slot));
        slot
    }

    /// The oldest generation an open stream has diffed (`u64::MAX`: no stream).
    fn oldest(&self) -> u64 {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut min = u64::MAX;
        slots.retain(|w| match w.upgrade() {
            Some(s) => {
                min = min.min(s.load(Ordering::SeqCst));
                true
            }
            None => false,
        });
        min
    }
}

fn type_of(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Mesh => pb::MESH_TYPE,
        ResourceKind::Policy => pb::POLICY_TYPE,
        ResourceKind::Registry => pb::REGISTRY_TYPE,
    }
}

/// The service: serves the latest model to every stream.
#[derive(Clone)]
pub struct ConfigService {
    model: watch::Receiver<Option<Arc<Model>>>,
    synced: Arc<Synced>,
    auth: Arc<dyn Authenticator>,
    stats: Arc<Stats>,
    nonce: Arc<AtomicU64>,
    full_pushes: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for ConfigService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigService")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Feeds models to a [`ConfigService`]: owned by whoever reads the snapshots.
#[derive(Debug)]
pub struct ModelFeed {
    tx: watch::Sender<Option<Arc<Model>>>,
    stats: Arc<Stats>,
    synced: Arc<Synced>,
}

impl ModelFeed {
    /// Publish `folder` as the new model (entries whose version did not change keep their
    /// bytes); every stream gets its difference.
    pub fn publish(&self, folder: &MeshFolder) {
        let prev = self.tx.borrow().clone();
        let synced = self.synced.oldest();
        self.install(Model::build_for_streams(folder, prev.as_deref(), synced));
    }

    fn install(&self, model: Model) {
        self.stats.models.fetch_add(1, Ordering::Relaxed);
        self.stats
            .resource_ids
            .store(model.ids_in_use() as u64, Ordering::Relaxed);
        tracing::info!(
            generation = model.generation,
            resources = model.len(),
            "configuration model published to proxy streams"
        );
        self.tx.send_replace(Some(Arc::new(model)));
    }

    /// Publish every accepted snapshot of `updates` until it ends; refusals are logged and
    /// the last good model keeps serving.
    pub async fn run(self, mut updates: Updates) {
        while let Some(update) = updates.next().await {
            match update {
                Ok(folder) => {
                    // Building serializes every changed resource: off the async workers.
                    let prev = self.tx.borrow().clone();
                    let synced = self.synced.oldest();
                    match tokio::task::spawn_blocking(move || {
                        Model::build_for_streams(&folder, prev.as_deref(), synced)
                    })
                    .await
                    {
                        Ok(model) => self.install(model),
                        Err(e) => {
                            tracing::error!(error = %e, "building the configuration model failed")
                        }
                    }
                }
                Err(problems) => {
                    for p in &problems {
                        tracing::error!(problem = %p, "configuration refused; proxies keep the last good one");
                    }
                }
            }
        }
        tracing::warn!("the configuration source stopped; proxies keep the last model");
    }
}

impl ConfigService {
    /// A service authenticating callers with `auth`, and the feed that gives it models
    /// (none yet: streams wait for the first).
    pub fn new(auth: Arc<dyn Authenticator>) -> (ConfigService, ModelFeed) {
        let (tx, rx) = watch::channel(None);
        let stats = Arc::new(Stats::default());
        let synced = Arc::new(Synced::default());
        (
            ConfigService {
                model: rx,
                synced: synced.clone(),
                auth,
                stats: stats.clone(),
                nonce: Arc::new(AtomicU64::new(0)),
                full_pushes: Arc::new(tokio::sync::Semaphore::new(MAX_FULL_PUSHES)),
            },
            ModelFeed { tx, stats, synced },
        )
    }

    /// A service fed by `updates` (spawned on the current runtime), with `first` as its
    /// first model when given.
    pub fn spawn(
        auth: Arc<dyn Authenticator>,
        first: Option<&MeshFolder>,
        updates: Updates,
    ) -> ConfigService {
        let (svc, feed) = ConfigService::new(auth);
        if let Some(f) = first {
            feed.publish(f);
        }
        tokio::spawn(feed.run(updates));
        svc
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The tonic service, to add to a server (the CA's port).
    pub fn into_server(self) -> ConfigDiscoveryServer<ConfigService> {
        ConfigDiscoveryServer::new(self)
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

type ResponseStream = ReceiverStream<Result<pb::DeltaConfigResponse, Status>>;

#[tonic::async_trait]
impl pb::config_discovery_server::ConfigDiscovery for ConfigService {
    type DeltaConfigStream = ResponseStream;

    async fn delta_config(
        &self,
        request: Request<Streaming<pb::DeltaConfigRequest>>,
    ) -> Result<Response<Self::DeltaConfigStream>, Status> {
        let caller = match self.auth.caller(request.extensions()) {
            Ok(id) => id,
            Err(why) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(reason = %why, "config stream refused: no verified client certificate");
                return Err(Status::unauthenticated(format!(
                    "a config stream needs a verified mesh client certificate: {why}"
                )));
            }
        };
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(2);
        let this = self.clone();
        tokio::spawn(async move {
            this.stats.streams.fetch_add(1, Ordering::Relaxed);
            let r = this.serve_stream(caller.clone(), inbound, &tx).await;
            this.stats.streams.fetch_sub(1, Ordering::Relaxed);
            if let Err(status) = r {
                if matches!(
                    status.code(),
                    tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
                ) {
                    this.stats.refused.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(caller = %caller, reason = %status.message(), "config stream ended");
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Whether `caller` may receive the configuration of workload `key` in `model`.
fn authorize(model: &Model, key: &str, caller: &SpiffeId) -> Result<(), Status> {
    let Some((_, expected)) = model.workloads.get(key) else {
        return Err(Status::permission_denied(format!(
            "workload {key} is not in the registry"
        )));
    };
    if expected != caller {
        return Err(Status::permission_denied(format!(
            "caller {caller} is not workload {key}, whose identity is {expected}"
        )));
    }
    Ok(())
}

impl ConfigService {
    async fn serve_stream(
        &self,
        caller: SpiffeId,
        mut inbound: Streaming<pb::DeltaConfigRequest>,
        tx: &mpsc::Sender<Result<pb::DeltaConfigResponse, Status>>,
    ) -> Result<(), Status> {
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before a request"))?;
        let key = first.workload.clone();
        let Some((namespace, name)) = key.split_once('/') else {
            return Err(Status::invalid_argument(format!(
                "workload {key:?} is not <namespace>/<name>"
            )));
        };
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return Err(Status::invalid_argument(format!(
                "workload {key:?} is not <namespace>/<name>"
            )));
        }
        let namespace = namespace.to_string();
        // Before any model is read: holds back the freeing of resource ids until this
        // stream has diffed a model (see `Model::build_for_streams`).
        let synced = self.synced.register();
        let mut models = self.model.clone();
        // Wait for the first model (a control plane still reading its source).
        let mut model = loop {
            if let Some(m) = models.borrow_and_update().clone() {
                break m;
            }
            if models.changed().await.is_err() {
                return Err(Status::unavailable("the control plane is shutting down"));
            }
        };
        authorize(&model, &key, &caller)?;
        synced.store(model.generation, Ordering::SeqCst);
        tracing::info!(caller = %caller, workload = %key, resumed = first.initial_resource_versions.len(), "config stream opened");
        // What the proxy says it holds.
        let mut have: Vec<u64> = vec![0; model.entries.len()];
        let mut unknown_removed = Vec::new();
        for (name, version) in &first.initial_resource_versions {
            match model.ids.get(name.as_str()) {
                Some(id) => {
                    have[*id as usize] = u64::from_str_radix(version, 16).unwrap_or(0);
                }
                None => unknown_removed.push(name.clone()),
            }
        }
        let mut first_push = true;
        // The permit of the full push awaiting its answer: (nonce, permit, deadline).
        let mut in_flight: Option<(
            String,
            tokio::sync::OwnedSemaphorePermit,
            tokio::time::Instant,
        )> = None;
        loop {
            // A full push waits for a permit (a stream's first push always counts as one).
            let permit = if first_push || model_is_large(&model, &have) {
                in_flight = None;
                Some(
                    self.full_pushes
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| Status::unavailable("the control plane is shutting down"))?,
                )
            } else {
                None
            };
            let own = model.workloads.get(&key).map(|(id, _)| *id);
            let (resources, mut removed) = model.delta(&namespace, own, &mut have);
            if first_push {
                removed.append(&mut unknown_removed);
            }
            if first_push || !resources.is_empty() || !removed.is_empty() {
                first_push = false;
                self.stats.pushes.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .resources_sent
                    .fetch_add(resources.len() as u64, Ordering::Relaxed);
                // A large push goes in parts of PART_RESOURCES: no message (nor tonic's
                // encode buffer, which keeps the capacity of the largest message it encoded)
                // holds the whole mesh. Removals ride on the last part.
                let parts = resources.len().div_ceil(PART_RESOURCES).max(1);
                let mut rest = resources.into_iter();
                let mut last_nonce = String::new();
                for i in 0..parts {
                    let nonce = (self.nonce.fetch_add(1, Ordering::Relaxed) + 1).to_string();
                    let last = i + 1 == parts;
                    let resp = pb::DeltaConfigResponse {
                        resources: rest.by_ref().take(PART_RESOURCES).collect(),
                        removed_resources: if last {
                            std::mem::take(&mut removed)
                        } else {
                            Vec::new()
                        },
                        nonce: nonce.clone(),
                        system_version_info: model.generation.to_string(),
                        incomplete: !last,
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return Ok(());
                    }
                    last_nonce = nonce;
                }
                if let Some(p) = permit {
                    in_flight = Some((
                        last_nonce,
                        p,
                        tokio::time::Instant::now() + PUSH_PERMIT_TIMEOUT,
                    ));
                }
            }
            self.stats.syncs.fetch_add(1, Ordering::SeqCst);
            // Wait for a new model or a request (ACK / NACK / end).
            loop {
                let deadline = in_flight.as_ref().map(|f| f.2);
                tokio::select! {
                    () = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(d).await,
                            None => std::future::pending().await,
                        }
                    } => {
                        in_flight = None;
                    }
                    changed = models.changed() => {
                        if changed.is_err() {
                            return Err(Status::unavailable("the control plane is shutting down"));
                        }
                        let Some(m) = models.borrow_and_update().clone() else { continue };
                        authorize(&m, &key, &caller)?;
                        model = m;
                        // Before the diff: the model's own names serve the removals of
                        // ids a later model may give again.
                        synced.store(model.generation, Ordering::SeqCst);
                        break;
                    }
                    msg = inbound.message() => {
                        let Some(req) = msg? else { return Ok(()) };
                        if in_flight.as_ref().is_some_and(|f| f.0 == req.response_nonce) {
                            in_flight = None;
                        }
                        if !req.workload.is_empty() && req.workload != key {
                            return Err(Status::invalid_argument(format!(
                                "the stream is for workload {key}, not {}", req.workload
                            )));
                        }
                        match req.error_detail {
                            Some(e) => {
                                self.stats.nacks.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(workload = %key, nonce = %req.response_nonce, reason = %e.message, "proxy refused a config push (NACK); it keeps its last good configuration");
                            }
                            None => {
                                self.stats.acks.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(m: &Model, key: &str) -> Option<u32> {
        m.workloads.get(key).map(|(id, _)| *id)
    }

    fn folder(policy_ns: &str, deny_path: &str) -> MeshFolder {
        // Unique per call: tests run in parallel in one process and may ask for the same
        // folder at once (one removing it while the other loads it was a flaky failure).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "rampart-discovery-{}-{}-{policy_ns}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            deny_path.trim_start_matches('/')
        ));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("mesh.yaml"), "trustDomain: example.org\n").unwrap();
        std::fs::write(
            d.join("workloads.yaml"),
            "workloads:\n- {name: a, namespace: ns1, ports: [{port: 80, app: '127.0.0.1:9000', inbound: '127.0.0.1:9001'}]}\n- {name: b, namespace: ns2, ports: [{port: 80, app: '127.0.0.1:9002', inbound: '127.0.0.1:9003'}]}\n",
        )
        .unwrap();
        std::fs::write(
            d.join("p.yaml"),
            format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny, namespace: {policy_ns}}}\nspec:\n  action: DENY\n  rules:\n  - to: [{{operation: {{paths: ['{deny_path}']}}}}]\n"),
        )
        .unwrap();
        let f = MeshFolder::load(&d).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        f
    }

    /// The slice: a workload of ns1 gets ns1's policy, one of ns2 does not; an edit sends
    /// only the changed policy, reusing the unchanged entries' bytes; a policy moved out of a
    /// namespace is a removal for that namespace's streams only.
    #[test]
    fn slices_and_deltas() {
        let m1 = Model::build(&folder("ns1", "/admin"), None);
        let mut have_a = Vec::new();
        let (r, removed) = m1.delta("ns1", own(&m1, "ns1/a"), &mut have_a);
        assert_eq!(r.len(), 4, "{r:?}"); // mesh, policy, two registry items
        assert!(removed.is_empty());
        let mut have_b = Vec::new();
        let (r, _) = m1.delta("ns2", own(&m1, "ns2/b"), &mut have_b);
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|x| !x.name.starts_with("policy/")));
        // Nothing changed: nothing to send.
        assert_eq!(
            m1.delta("ns1", own(&m1, "ns1/a"), &mut have_a),
            (vec![], vec![])
        );

        let m2 = Model::build(&folder("ns1", "/secret"), Some(&m1));
        let mesh_id = m2.ids["mesh"] as usize;
        assert!(Arc::ptr_eq(
            m1.entries[mesh_id].as_ref().unwrap(),
            m2.entries[mesh_id].as_ref().unwrap()
        ));
        let (r, removed) = m2.delta("ns1", own(&m2, "ns1/a"), &mut have_a);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].name, "policy/ns1/AuthorizationPolicy/deny");
        assert!(removed.is_empty());
        assert_eq!(
            m2.delta("ns2", own(&m2, "ns2/b"), &mut have_b),
            (vec![], vec![])
        );

        let m3 = Model::build(&folder("ns2", "/secret"), Some(&m2));
        let (r, removed) = m3.delta("ns1", own(&m3, "ns1/a"), &mut have_a);
        assert!(r.is_empty());
        assert_eq!(
            removed,
            vec!["policy/ns1/AuthorizationPolicy/deny".to_string()]
        );
        let (r, removed) = m3.delta("ns2", own(&m3, "ns2/b"), &mut have_b);
        assert_eq!(r.len(), 1);
        assert!(removed.is_empty());
    }

    /// Root-namespace policies go to every stream.
    #[test]
    fn root_namespace_policies_reach_everyone() {
        let m = Model::build(&folder("istio-system", "/admin"), None);
        for ns in ["ns1", "ns2", "istio-system"] {
            let (r, _) = m.delta(ns, None, &mut Vec::new());
            assert!(
                r.iter().any(|x| x.name.starts_with("policy/istio-system/")),
                "{ns}"
            );
        }
    }

    /// Authorization: the workload's own identity is served; another identity, an unknown
    /// workload, and an identity of another trust domain are refused naming why.
    #[test]
    fn authorize_matches_identity() {
        let m = Model::build(&folder("ns1", "/admin"), None);
        let a = SpiffeId::parse("spiffe://example.org/ns/ns1/sa/a").unwrap();
        assert!(authorize(&m, "ns1/a", &a).is_ok());
        let e = authorize(&m, "ns2/b", &a).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("is not workload ns2/b"), "{e:?}");
        let e = authorize(&m, "ns1/zzz", &a).unwrap_err();
        assert!(e.message().contains("not in the registry"), "{e:?}");
        let other_td = SpiffeId::parse("spiffe://other.org/ns/ns1/sa/a").unwrap();
        assert!(authorize(&m, "ns1/a", &other_td).is_err());
    }

    fn load(registry: &str, policies: &[(String, String)]) -> MeshFolder {
        MeshFolder::from_parts(
            std::path::PathBuf::from("test"),
            (
                "mesh.yaml",
                "trustDomain: example.org\nrootNamespace: istio-config\n",
            ),
            ("workloads.yaml", registry),
            policies,
            Default::default(),
        )
        .unwrap()
    }

    fn ap(ns: &str, name: &str, path: &str) -> (String, String) {
        (
            format!("{ns}-{name}.yaml"),
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  action: DENY\n  rules:\n  - to: [{{operation: {{paths: ['{path}']}}}}]\n"
            ),
        )
    }

    /// `round`'s mesh: `ns1/me` (with its own proxy listeners and an upstream), and ten
    /// Pods of round `round` behind service `ns2/svc`, each with the same proxy listener
    /// addresses (as sidecars have), and one policy per namespace.
    fn churn_folder(round: usize) -> MeshFolder {
        let mut reg = String::from(
            "workloads:\n- {name: me, namespace: ns1, ports: [{port: 80, app: '127.0.0.1:9000', inbound: '127.0.0.1:9001'}], proxy: {outbound: '127.0.0.1:15001', admin: '127.0.0.1:15000'}, upstreams: [{service: svc.ns2, port: 80, listen: '127.0.0.1:9300'}]}\n",
        );
        let mut endpoints = Vec::new();
        for i in 0..10 {
            reg.push_str(&format!(
                "- {{name: p-{round}-{i}, namespace: ns2, serviceAccount: svc, labels: {{app: svc}}, ports: [{{port: 8080, protocol: http, app: '127.0.0.1:8080', inbound: '10.0.{}.{}:8080'}}]}}\n",
                round % 200,
                i + 1
            ));
            endpoints.push(format!("ns2/p-{round}-{i}"));
        }
        reg.push_str(&format!(
            "services:\n- {{name: svc, namespace: ns2, ports: [{{port: 80, targetPort: 8080, protocol: http}}], endpoints: [{}]}}\n",
            endpoints.join(", ")
        ));
        load(
            &reg,
            &[
                ap("ns1", "p1", "/a"),
                ap("ns2", "p2", &format!("/round-{round}")),
                ap("istio-config", "root", "/root"),
            ],
        )
    }

    /// A proxy's view: name -> version, kept by applying deltas.
    fn apply(view: &mut HashMap<String, String>, delta: (Vec<pb::Resource>, Vec<String>)) {
        for r in delta.0 {
            view.insert(r.name, r.version);
        }
        for n in delta.1 {
            assert!(
                view.remove(&n).is_some(),
                "removal of {n}, which the proxy lacks"
            );
        }
    }

    fn slice_view(f: &MeshFolder, ns: &str, name: &str) -> HashMap<String, String> {
        rampart_mesh::resources::slice_for(f, ns, name)
            .into_iter()
            .map(|r| (r.name, r.version))
            .collect()
    }

    /// A stream's deltas add up to exactly its slice (`resources::slice_for`): its own full
    /// entry, other workloads reduced, its namespace's policies and the root's. The twins:
    /// ns2's policy and another workload's proxy listeners never reach ns1's stream, and an
    /// edit of ns2's policy is nothing for ns1's stream.
    #[test]
    fn deltas_add_up_to_the_slice() {
        let f = churn_folder(0);
        let m = Model::build(&f, None);
        let mut have = Vec::new();
        let mut view = HashMap::new();
        let d = m.delta("ns1", own(&m, "ns1/me"), &mut have);
        let bodies: Vec<String> =
            d.0.iter()
                .map(|r| String::from_utf8_lossy(&r.body).into_owned())
                .collect();
        apply(&mut view, d);
        assert_eq!(view, slice_view(&f, "ns1", "me"));
        assert!(view.contains_key("policy/ns1/AuthorizationPolicy/p1"));
        assert!(view.contains_key("policy/istio-config/AuthorizationPolicy/root"));
        assert!(!view.contains_key("policy/ns2/AuthorizationPolicy/p2"));
        // Its own listeners once (its own entry); no other workload's.
        assert_eq!(
            bodies.iter().filter(|b| b.contains("15001")).count(),
            1,
            "{bodies:?}"
        );
        assert!(bodies.iter().filter(|b| b.contains("\"proxy\"")).count() == 1);

        // A Pod's stream: its entry whole, `me` reduced.
        let mut pod_have = Vec::new();
        let mut pod_view = HashMap::new();
        apply(
            &mut pod_view,
            m.delta("ns2", own(&m, "ns2/p-0-3"), &mut pod_have),
        );
        assert_eq!(pod_view, slice_view(&f, "ns2", "p-0-3"));
        assert_ne!(
            pod_view["registry/workloads/ns1/me"],
            view["registry/workloads/ns1/me"]
        );

        // An edit in ns2 only: nothing for ns1's stream, the policy for the Pod's.
        let mut g = churn_folder(0);
        g.resources = churn_folder(1)
            .resources
            .into_iter()
            .filter(|r| r.metadata().namespace() == "ns2")
            .chain(
                f.resources
                    .iter()
                    .filter(|r| r.metadata().namespace() != "ns2")
                    .cloned(),
            )
            .collect();
        let m2 = Model::build(&g, Some(&m));
        assert_eq!(
            m2.delta("ns1", own(&m2, "ns1/me"), &mut have),
            (vec![], vec![])
        );
        let d = m2.delta("ns2", own(&m2, "ns2/p-0-3"), &mut pod_have);
        assert_eq!(d.0.len(), 1);
        assert_eq!(d.0[0].name, "policy/ns2/AuthorizationPolicy/p2");
    }

    /// Pod churn: 200 rounds, each replacing every Pod by new names. Without streams the id
    /// table stays at the model's size; a stream that lags holds back the freeing of the
    /// ids it may hold (its view stays exact: every old Pod is removed by name), and once it
    /// catches up they are freed and given to new names without corrupting any view.
    #[test]
    fn ids_are_freed_under_pod_churn() {
        let mut prev: Option<Model> = None;
        for round in 0..200 {
            let m = Model::build(&churn_folder(round), prev.as_ref());
            prev = Some(m);
        }
        let m = prev.unwrap();
        let size = m.len();
        // The model's names plus one round of departed Pods awaiting their freeing.
        assert!(
            m.ids_in_use() <= size + 10,
            "{} > {size} + 10",
            m.ids_in_use()
        );
        assert!(
            m.names.len() <= size + 12,
            "table {} for {size}",
            m.names.len()
        );

        // A stream of `me` and one of a Pod of round 0 that stays (in every round).
        let f0 = churn_folder(0);
        let m0 = Model::build(&f0, None);
        let mut have = Vec::new();
        let mut view = HashMap::new();
        apply(&mut view, m0.delta("ns1", own(&m0, "ns1/me"), &mut have));
        let mut synced = m0.generation;
        let mut model = m0;
        for round in 1..40 {
            let f = churn_folder(round);
            // The stream lags for rounds 1..20: what it holds stays reserved.
            model = Model::build_for_streams(&f, Some(&model), synced);
            if round >= 20 {
                synced = model.generation;
                apply(
                    &mut view,
                    model.delta("ns1", own(&model, "ns1/me"), &mut have),
                );
                assert_eq!(view, slice_view(&f, "ns1", "me"), "round {round}");
            } else {
                assert!(model.ids.contains_key("registry/workloads/ns2/p-0-0"));
            }
        }
        assert!(
            model.ids_in_use() <= model.len() + 10,
            "{} ids for {} resources",
            model.ids_in_use(),
            model.len()
        );
        assert!(!model.ids.contains_key("registry/workloads/ns2/p-0-0"));
        // Every id the stream holds names what the view holds.
        for (idx, v) in have.iter().enumerate() {
            if *v != 0 {
                assert!(view.contains_key(model.names[idx].as_ref()));
            }
        }
        assert_eq!(
            have.iter().filter(|v| **v != 0).count(),
            view.len(),
            "every held id is one name of the view"
        );
    }

    /// The twin of `ids_are_freed_under_pod_churn`: freeing ids without regard for a
    /// lagging stream (as if no stream were open) gives the ids it holds to new Pods, and
    /// its view then keeps Pods that are gone: the guard is what keeps views exact.
    #[test]
    fn freeing_ids_a_stream_holds_corrupts_its_view() {
        let f0 = churn_folder(0);
        let m0 = Model::build(&f0, None);
        let mut have = Vec::new();
        let mut view = HashMap::new();
        apply(&mut view, m0.delta("ns1", own(&m0, "ns1/me"), &mut have));
        let mut model = m0;
        let mut last = f0;
        for round in 1..20 {
            last = churn_folder(round);
            model = Model::build(&last, Some(&model));
        }
        let (add, removed) = model.delta("ns1", own(&model, "ns1/me"), &mut have);
        for r in add {
            view.insert(r.name, r.version);
        }
        for n in removed {
            view.remove(&n);
        }
        assert_ne!(view, slice_view(&last, "ns1", "me"));
        assert!(
            view.contains_key("registry/workloads/ns2/p-0-0"),
            "{view:?}"
        );
    }

    /// The counters as Prometheus metrics, with their values.
    #[test]
    fn stats_render_as_prometheus_metrics() {
        let stats = Arc::new(Stats::default());
        stats.streams.store(3, Ordering::Relaxed);
        stats.pushes.store(7, Ordering::Relaxed);
        stats.resources_sent.store(70, Ordering::Relaxed);
        stats.nacks.store(2, Ordering::Relaxed);
        stats.resource_ids.store(11, Ordering::Relaxed);
        let mut reg = prometheus_client::registry::Registry::default();
        stats.register(&mut reg);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        for line in [
            "rampart_config_streams 3",
            "rampart_config_stream_pushes_total 7",
            "rampart_config_stream_resources_sent_total 70",
            "rampart_config_stream_nacks_total 2",
            "rampart_config_stream_acks_total 0",
            "rampart_config_stream_refused_total 0",
            "rampart_config_resource_ids 11",
            "# TYPE rampart_config_stream_pushes counter",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} not in:\n{out}");
        }
        // Live: a later value shows in the next scrape.
        stats.pushes.fetch_add(1, Ordering::Relaxed);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.lines()
                .any(|l| l == "rampart_config_stream_pushes_total 8")
        );
    }
}
