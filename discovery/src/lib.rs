//! The control plane's config stream (docs/KUBERNETES.md "Config streaming"):
//! `rampart.config.v1.ConfigDiscovery/DeltaConfig`, one bidirectional stream per proxy,
//! modelled on Envoy's delta xDS.
//!
//! - Input: the same [`Updates`] of mesh snapshots any `ConfigSource` produces (a watched
//!   folder, the Kubernetes source). Each accepted snapshot becomes a [`Model`]: every
//!   resource (`mesh`, policies, registry items; `rampart_mesh::resources`) serialized once
//!   per version, its bytes shared by every stream it goes to. A refused snapshot changes
//!   nothing: streams keep the last good model.
//! - A stream's slice: the mesh settings, the policies of its workload's namespace and of
//!   the root namespace (every policy that can apply; selectors are left to the proxy), and
//!   every registry item (what it may call, as Istio without a Sidecar resource, its own
//!   entry included).
//! - Per-stream state: the version of every resource the stream holds (a dense vector indexed
//!   by resource id), so each new model sends a stream only what changed in its slice, and
//!   names that left it as removals. A reconnecting proxy says what it holds
//!   (`initial_resource_versions`) and gets the difference.
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
use rampart_mesh::resources::{ModelResource, ResourceKind, to_resources};
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
}

/// One resource, serialized once for its version.
#[derive(Debug)]
struct Entry {
    kind: ResourceKind,
    namespace: Option<String>,
    version: u64,
    wire: pb::Resource,
}

/// One accepted snapshot as resources, ready to be sliced per stream.
#[derive(Debug)]
pub struct Model {
    generation: u64,
    root_namespace: String,
    /// Indexed by resource id; `None`: not in this model.
    entries: Vec<Option<Arc<Entry>>>,
    /// Every name ever given an id, by id (names that left the model keep theirs, so a
    /// stream can be told to remove them).
    names: Arc<Vec<Arc<str>>>,
    ids: Arc<HashMap<Arc<str>, u32>>,
    mesh: Vec<u32>,
    registry: Vec<u32>,
    policies: HashMap<String, Vec<u32>>,
    /// `<ns>/<name>` -> the workload's SPIFFE ID.
    workloads: HashMap<String, SpiffeId>,
}

impl Model {
    /// The model of `folder`, reusing `prev`'s entries (and their bytes) whose version did
    /// not change, and its resource ids.
    pub fn build(folder: &MeshFolder, prev: Option<&Model>) -> Model {
        let generation = prev.map_or(1, |p| p.generation + 1);
        let mut names: Vec<Arc<str>> = prev.map(|p| p.names.as_ref().clone()).unwrap_or_default();
        let mut ids: HashMap<Arc<str>, u32> =
            prev.map(|p| p.ids.as_ref().clone()).unwrap_or_default();
        let resources: Vec<ModelResource> = to_resources(folder);
        let mut entries: Vec<Option<Arc<Entry>>> = Vec::new();
        let mut mesh = Vec::new();
        let mut registry = Vec::new();
        let mut policies: HashMap<String, Vec<u32>> = HashMap::new();
        for r in resources {
            let id = match ids.get(r.name.as_str()) {
                Some(id) => *id,
                None => {
                    let id = u32::try_from(names.len()).expect("fewer than 2^32 resource names");
                    let name: Arc<str> = Arc::from(r.name.as_str());
                    names.push(name.clone());
                    ids.insert(name, id);
                    id
                }
            };
            let idx = id as usize;
            if entries.len() <= idx {
                entries.resize(idx + 1, None);
            }
            let version = u64::from_str_radix(&r.version, 16).unwrap_or(1).max(1);
            let reused = prev
                .and_then(|p| p.entries.get(idx).cloned().flatten())
                .filter(|e| e.version == version);
            let entry = reused.unwrap_or_else(|| {
                Arc::new(Entry {
                    kind: r.kind,
                    namespace: r.namespace.clone(),
                    version,
                    wire: pb::Resource {
                        name: r.name.clone(),
                        version: r.version.clone(),
                        r#type: type_of(r.kind).to_string(),
                        body: r.body.into(),
                    },
                })
            });
            match r.kind {
                ResourceKind::Mesh => mesh.push(id),
                ResourceKind::Registry => registry.push(id),
                ResourceKind::Policy => policies
                    .entry(r.namespace.clone().unwrap_or_default())
                    .or_default()
                    .push(id),
            }
            entries[idx] = Some(entry);
        }
        entries.resize(names.len(), None);
        let workloads = folder
            .registry
            .workloads
            .iter()
            .map(|w| (w.key(), w.spiffe_id(&folder.trust_domain)))
            .collect();
        Model {
            generation,
            root_namespace: folder.mesh.root_namespace.clone(),
            entries,
            names: Arc::new(names),
            ids: Arc::new(ids),
            mesh,
            registry,
            policies,
            workloads,
        }
    }

    /// How many resources the model holds.
    pub fn len(&self) -> usize {
        self.entries.iter().filter(|e| e.is_some()).count()
    }

    /// Whether the model holds no resource.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn in_slice(&self, id: usize, namespace: &str) -> bool {
        match self.entries.get(id).and_then(Option::as_ref) {
            None => false,
            Some(e) if e.kind == ResourceKind::Policy => {
                let ns = e.namespace.as_deref().unwrap_or_default();
                ns == namespace || ns == self.root_namespace
            }
            Some(_) => true,
        }
    }

    /// What a stream of a workload in `namespace` holding `have` (version by id, 0 for
    /// none) lacks: changed or new resources, and names to remove. `have` is updated to
    /// what the stream holds once the answer is sent.
    fn delta(&self, namespace: &str, have: &mut Vec<u64>) -> (Vec<pb::Resource>, Vec<String>) {
        if have.len() < self.entries.len() {
            have.resize(self.entries.len(), 0);
        }
        let mut out = Vec::new();
        let empty = Vec::new();
        let own = self.policies.get(namespace).unwrap_or(&empty);
        let root = if namespace == self.root_namespace {
            &empty
        } else {
            self.policies.get(&self.root_namespace).unwrap_or(&empty)
        };
        for id in self
            .mesh
            .iter()
            .chain(own)
            .chain(root)
            .chain(&self.registry)
        {
            let idx = *id as usize;
            if let Some(e) = &self.entries[idx]
                && have[idx] != e.version
            {
                out.push(e.wire.clone());
                have[idx] = e.version;
            }
        }
        let mut removed = Vec::new();
        for (idx, v) in have.iter_mut().enumerate() {
            if *v != 0 && !self.in_slice(idx, namespace) {
                *v = 0;
                removed.push(self.names[idx].to_string());
            }
        }
        (out, removed)
    }
}

/// Whether the next delta of a stream is large (more than [`LARGE_PUSH`] resources may
/// change in the mesh settings and registry; policies are bounded by a namespace's), counted
/// without building the delta.
fn model_is_large(model: &Model, have: &[u64]) -> bool {
    let mut changed = 0usize;
    for id in model.mesh.iter().chain(&model.registry) {
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
}

impl ModelFeed {
    /// Publish `folder` as the new model (entries whose version did not change keep their
    /// bytes); every stream gets its difference.
    pub fn publish(&self, folder: &MeshFolder) {
        let prev = self.tx.borrow().clone();
        self.install(Model::build(folder, prev.as_deref()));
    }

    fn install(&self, model: Model) {
        self.stats.models.fetch_add(1, Ordering::Relaxed);
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
                    match tokio::task::spawn_blocking(move || {
                        Model::build(&folder, prev.as_deref())
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
        (
            ConfigService {
                model: rx,
                auth,
                stats: stats.clone(),
                nonce: Arc::new(AtomicU64::new(0)),
                full_pushes: Arc::new(tokio::sync::Semaphore::new(MAX_FULL_PUSHES)),
            },
            ModelFeed { tx, stats },
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
    let Some(expected) = model.workloads.get(key) else {
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
            let (resources, mut removed) = model.delta(&namespace, &mut have);
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
        let (r, removed) = m1.delta("ns1", &mut have_a);
        assert_eq!(r.len(), 4, "{r:?}"); // mesh, policy, two registry items
        assert!(removed.is_empty());
        let mut have_b = Vec::new();
        let (r, _) = m1.delta("ns2", &mut have_b);
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|x| !x.name.starts_with("policy/")));
        // Nothing changed: nothing to send.
        assert_eq!(m1.delta("ns1", &mut have_a), (vec![], vec![]));

        let m2 = Model::build(&folder("ns1", "/secret"), Some(&m1));
        let mesh_id = m2.ids["mesh"] as usize;
        assert!(Arc::ptr_eq(
            m1.entries[mesh_id].as_ref().unwrap(),
            m2.entries[mesh_id].as_ref().unwrap()
        ));
        let (r, removed) = m2.delta("ns1", &mut have_a);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].name, "policy/ns1/AuthorizationPolicy/deny");
        assert!(removed.is_empty());
        assert_eq!(m2.delta("ns2", &mut have_b), (vec![], vec![]));

        let m3 = Model::build(&folder("ns2", "/secret"), Some(&m2));
        let (r, removed) = m3.delta("ns1", &mut have_a);
        assert!(r.is_empty());
        assert_eq!(
            removed,
            vec!["policy/ns1/AuthorizationPolicy/deny".to_string()]
        );
        let (r, removed) = m3.delta("ns2", &mut have_b);
        assert_eq!(r.len(), 1);
        assert!(removed.is_empty());
    }

    /// Root-namespace policies go to every stream.
    #[test]
    fn root_namespace_policies_reach_everyone() {
        let m = Model::build(&folder("istio-system", "/admin"), None);
        for ns in ["ns1", "ns2", "istio-system"] {
            let (r, _) = m.delta(ns, &mut Vec::new());
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
}
