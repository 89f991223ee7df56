//! The root bundle in ConfigMap `istio-ca-root-cert` (key `root-cert.pem`) in every
//! namespace, as istiod publishes it, and the CA's CRLs beside it in ConfigMap `istio-ca-crl`
//! (key `ca-crl.pem`, as istiod publishes a plug-in CA's CRL), written by one CA replica at a
//! time: the holder of a `coordination.k8s.io` Lease.
//!
//! [`LeaseElector`] takes or renews the Lease with optimistic concurrency (create; replace with
//! the read `resourceVersion`; a 409 means another replica moved first). [`RootPublisher`]
//! makes every namespace's ConfigMaps say the current root and CRLs: creates missing ones (so a
//! deleted ConfigMap comes back), rewrites changed ones, leaves equal ones alone. While the CA
//! has no CRL to publish, no `istio-ca-crl` is created and existing ones are left as they are. [`run`] ticks both.
//! [`run`] also watches Namespaces and the `istio-ca-root-cert` ConfigMaps of every namespace
//! (`fieldSelector=metadata.name=istio-ca-root-cert`): while this replica holds the Lease, a
//! new namespace gets its ConfigMaps at its watch event, and a deleted root ConfigMap is
//! re-created at its own, not at the next tick (an edited one is set back by the tick).
//! It also watches the `istio-ca-crl` ConfigMaps, and a tick works from what the watches
//! show: it renews the Lease and reads and writes only the ConfigMaps that are missing or
//! differ, so a quiet cluster costs one Lease renewal per tick, however many namespaces it
//! has. A full pass (namespaces listed, every ConfigMap read) runs while a watch is not in
//! step, and at least every [`FULL_PASS`], as the safety net.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;

/// The ConfigMap istiod publishes the root in.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
/// Its key.
pub const ROOT_CONFIGMAP_KEY: &str = "root-cert.pem";
/// The ConfigMap the CRLs are published in (beside [`ROOT_CONFIGMAP`]).
pub const CRL_CONFIGMAP: &str = "istio-ca-crl";
/// Its key: the CRLs as concatenated PEM, the name of the plug-in file (`ca-crl.pem`).
pub const CRL_CONFIGMAP_KEY: &str = "ca-crl.pem";
/// The Lease that elects the one writer (istiod's namespace controller's name, so Rampart
/// and istiod replicas in one cluster never both write).
pub const PUBLISHER_LEASE: &str = "istio-namespace-controller-election";

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn micro(t: SystemTime) -> Option<MicroTime> {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .ok()
        .map(MicroTime)
}

/// One replica's side of the Lease.
pub struct LeaseElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl std::fmt::Debug for LeaseElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseElector")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("duration", &self.duration)
            .finish_non_exhaustive()
    }
}

impl LeaseElector {
    /// Lease `name` in `namespace`, held as `identity` (unique per replica: the Pod name) for
    /// `duration` after each renewal.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        LeaseElector {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    /// How long the Lease lasts after each renewal.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Takes the Lease if it is free or expired, renews it if ours; `true` while we hold it.
    pub async fn try_acquire_or_renew(&self, now: SystemTime) -> Result<bool, kube::Error> {
        let secs = i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: micro(now),
                    renew_time: micro(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != self.identity {
            let held_until = spec.renew_time.as_ref().map(|t| {
                SystemTime::from(t.0)
                    + Duration::from_secs(
                        u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
                    )
            });
            let free = holder.is_empty() || held_until.is_none_or(|until| now >= until);
            if !free {
                return Ok(false);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = micro(now);
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.renew_time = micro(now);
        spec.lease_duration_seconds = Some(secs);
        // Replace carries the resourceVersion we read: a 409 means someone else wrote first.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// What one publishing pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Published {
    /// Namespaces whose ConfigMap was created.
    pub created: Vec<String>,
    /// Namespaces whose ConfigMap was rewritten to the current root.
    pub updated: Vec<String>,
    /// Namespaces whose `istio-ca-crl` was created.
    pub crl_created: Vec<String>,
    /// Namespaces whose `istio-ca-crl` was rewritten to the current CRLs.
    pub crl_updated: Vec<String>,
    /// Namespaces that could not be written this pass (conflict or error; retried next).
    pub failed: Vec<String>,
}

/// Keeps `istio-ca-root-cert` (and `istio-ca-crl`, once there is a CRL) current in every
/// namespace.
pub struct RootPublisher {
    client: kube::Client,
    root_pem: Mutex<String>,
    crl_pem: Mutex<Option<String>>,
}

impl std::fmt::Debug for RootPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootPublisher").finish_non_exhaustive()
    }
}

impl RootPublisher {
    /// Publishes `root_pem` (the CA's trust bundle, PEM).
    pub fn new(client: kube::Client, root_pem: String) -> Self {
        RootPublisher {
            client,
            root_pem: Mutex::new(root_pem),
            crl_pem: Mutex::new(None),
        }
    }

    /// The CRLs (concatenated PEM) to publish from now on; `None` or an empty string: none.
    pub fn set_crl(&self, crl_pem: Option<String>) {
        *self.crl_pem.lock().unwrap_or_else(|p| p.into_inner()) =
            crl_pem.filter(|c| !c.trim().is_empty());
    }

    fn crl(&self) -> Option<String> {
        self.crl_pem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The bundle to publish from now on (after a rotation or reload).
    pub fn set_root(&self, root_pem: String) {
        *self.root_pem.lock().unwrap_or_else(|p| p.into_inner()) = root_pem;
    }

    fn root(&self) -> String {
        self.root_pem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// One pass over every namespace (except terminating ones).
    pub async fn publish_once(&self) -> Result<Published, kube::Error> {
        let root = self.root();
        let crl = self.crl();
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let mut out = Published::default();
        for ns in namespaces.list(&ListParams::default()).await?.items {
            let Some(name) = ns.metadata.name.clone() else {
                continue;
            };
            if ns.status.and_then(|s| s.phase).as_deref() == Some("Terminating") {
                continue;
            }
            self.publish_namespace_into(&name, &root, crl.as_deref(), &mut out)
                .await;
        }
        Ok(out)
    }

    /// A pass from the watches' view instead of the API: writes (after reading each to be
    /// sure) only where `seen` shows a ConfigMap missing or different from the current root
    /// or CRLs, in the `active` namespaces. No request at all when everything is current.
    async fn publish_seen(&self, active: &[String], seen: &Seen) -> Published {
        let (root, crl) = (self.root(), self.crl());
        let mut out = Published::default();
        let (root_digest, crl_digest) = (digest(&root), crl.as_deref().map(digest));
        for ns in active {
            let current = |m: &BTreeMap<String, Option<Digest>>, want: &Digest| {
                m.get(ns).and_then(Option::as_ref) == Some(want)
            };
            let root_ok = current(&seen.roots, &root_digest);
            let crl_ok = crl_digest.as_ref().is_none_or(|c| current(&seen.crls, c));
            if !root_ok || !crl_ok {
                self.publish_namespace_into(ns, &root, crl.as_deref(), &mut out)
                    .await;
            }
        }
        out
    }

    /// Makes `namespace`'s ConfigMaps say the current root (and CRLs): one namespace of
    /// [`RootPublisher::publish_once`], for a watch event.
    pub async fn publish_namespace(&self, namespace: &str) -> Published {
        let (root, crl) = (self.root(), self.crl());
        let mut out = Published::default();
        self.publish_namespace_into(namespace, &root, crl.as_deref(), &mut out)
            .await;
        out
    }

    async fn publish_namespace_into(
        &self,
        name: &str,
        root: &str,
        crl: Option<&str>,
        out: &mut Published,
    ) {
        let mut failed = false;
        match self
            .publish_in(name, ROOT_CONFIGMAP, ROOT_CONFIGMAP_KEY, root)
            .await
        {
            Ok(Some(true)) => out.created.push(name.to_owned()),
            Ok(Some(false)) => out.updated.push(name.to_owned()),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(namespace = %name, error = %e, "could not publish {ROOT_CONFIGMAP}; retrying next pass");
                failed = true;
            }
        }
        if let Some(crl) = crl {
            match self
                .publish_in(name, CRL_CONFIGMAP, CRL_CONFIGMAP_KEY, crl)
                .await
            {
                Ok(Some(true)) => out.crl_created.push(name.to_owned()),
                Ok(Some(false)) => out.crl_updated.push(name.to_owned()),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(namespace = %name, error = %e, "could not publish {CRL_CONFIGMAP}; retrying next pass");
                    failed = true;
                }
            }
        }
        if failed {
            out.failed.push(name.to_owned());
        }
    }

    /// Makes ConfigMap `name` in `namespace` say `value` under `key`: `Some(true)` created,
    /// `Some(false)` rewritten, `None` already current.
    async fn publish_in(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        value: &str,
    ) -> Result<Option<bool>, kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let data = BTreeMap::from([(key.to_owned(), value.to_owned())]);
        match api.get_opt(name).await? {
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.into()),
                        namespace: Some(namespace.into()),
                        labels: Some(BTreeMap::from([(
                            "istio.io/config".to_owned(),
                            "true".to_owned(),
                        )])),
                        ..Default::default()
                    },
                    data: Some(data),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &cm).await?;
                Ok(Some(true))
            }
            Some(mut cm) => {
                let current = cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(String::as_str);
                if current == Some(value) {
                    return Ok(None);
                }
                cm.data
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key.to_owned(), value.to_owned());
                api.replace(name, &PostParams::default(), &cm).await?;
                Ok(Some(false))
            }
        }
    }
}

/// A full pass (every namespace listed, each ConfigMap read) at least this often; between
/// them a tick writes only where the watches show a ConfigMap missing or different.
pub const FULL_PASS: Duration = Duration::from_secs(300);

/// SHA-256 of a published value: what the watch view keeps instead of the value, so that
/// a thousand namespaces' copies of a large CRL cost 32 bytes each.
type Digest = [u8; 32];

fn digest(value: &str) -> Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, value.as_bytes()).as_ref());
    out
}

/// The root and CRL ConfigMaps as the watches last saw them: namespace -> the digest of the
/// published value (`None`: the ConfigMap exists without the key).
#[derive(Debug, Default)]
struct Seen {
    roots: BTreeMap<String, Option<Digest>>,
    crls: BTreeMap<String, Option<Digest>>,
}

/// Pages of the ConfigMap watches' lists: each ConfigMap may be up to 1 MiB (a tenant can
/// fill its own namespace's copy), so a page is held whole in memory.
const CONFIGMAP_PAGE: u32 = 50;

/// One watch of ConfigMaps named alike in every namespace, as a map kept current.
#[derive(Debug, Default)]
struct ConfigMapView {
    /// Listed, and not re-listing now. A watch error does not unsync it: the watcher
    /// resumes from the last resourceVersion without losing events, and re-lists (Init ...
    /// InitDone) only when that is gone.
    synced: bool,
    relist: Option<BTreeMap<String, Option<Digest>>>,
}

impl ConfigMapView {
    /// Applies one watch event to `map` (values under `key`); returns the namespace of a
    /// deleted ConfigMap.
    fn apply(
        &mut self,
        map: &mut BTreeMap<String, Option<Digest>>,
        key: &str,
        event: Result<watcher::Event<ConfigMap>, watcher::Error>,
    ) -> Result<Option<String>, watcher::Error> {
        use watcher::Event;
        let entry = |cm: &ConfigMap| {
            let ns = cm.metadata.namespace.clone()?;
            let value = cm.data.as_ref().and_then(|d| d.get(key)).map(|v| digest(v));
            Some((ns, value))
        };
        match event {
            Ok(Event::Apply(cm)) => {
                if let Some((ns, v)) = entry(&cm) {
                    map.insert(ns, v);
                }
            }
            Ok(Event::Delete(cm)) => {
                if let Some(ns) = &cm.metadata.namespace {
                    map.remove(ns);
                }
                return Ok(cm.metadata.namespace);
            }
            Ok(Event::Init) => {
                self.relist = Some(BTreeMap::new());
                self.synced = false;
            }
            Ok(Event::InitApply(cm)) => {
                if let Some((ns, v)) = entry(&cm) {
                    self.relist.get_or_insert_with(BTreeMap::new).insert(ns, v);
                }
            }
            Ok(Event::InitDone) => {
                *map = self.relist.take().unwrap_or_default();
                self.synced = true;
            }
            Err(e) => return Err(e),
        }
        Ok(None)
    }
}

/// One tick: renew or take the Lease; if held, publish. `Ok(None)` when another replica holds
/// the Lease.
pub async fn tick(
    elector: &LeaseElector,
    publisher: &RootPublisher,
    now: SystemTime,
) -> Result<Option<Published>, kube::Error> {
    if !elector.try_acquire_or_renew(now).await? {
        return Ok(None);
    }
    publisher.publish_once().await.map(Some)
}

/// What [`run_reporting`] did (for logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishEvent {
    /// A tick: `Ok(None)` when another replica holds the Lease.
    Tick(Result<Option<Published>, String>),
    /// A watch event about `namespace` (a new namespace, or its root ConfigMap deleted):
    /// what was written, `None` when this replica does not hold the Lease.
    Watched {
        /// The namespace.
        namespace: String,
        /// What was written; `None`: not the Lease holder, nothing written.
        published: Option<Published>,
    },
}

/// Ticks every `interval` until the task is dropped, publishing what `current` returns at
/// each tick: the trust bundle and the CRLs, if any (so a rotation, reload or revocation
/// reaches the ConfigMaps within one interval). Errors are logged and retried. Between
/// ticks, Namespace and root ConfigMap watch events are served at once while this replica
/// holds the Lease.
pub async fn run(
    elector: LeaseElector,
    publisher: RootPublisher,
    interval: Duration,
    current: impl Fn() -> (String, Option<String>) + Send,
) {
    run_reporting(elector, publisher, interval, current, |_| {}).await;
}

/// [`run`], telling `report` what each tick and watch event did.
pub async fn run_reporting(
    elector: LeaseElector,
    publisher: RootPublisher,
    interval: Duration,
    current: impl Fn() -> (String, Option<String>) + Send,
    mut report: impl FnMut(&PublishEvent) + Send,
) {
    use futures::StreamExt as _;
    use watcher::Event;

    let namespaces = watcher::watcher(
        Api::<Namespace>::all(publisher.client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let config_maps = watcher::watcher(
        Api::<ConfigMap>::all(publisher.client.clone()),
        watcher::Config::default()
            .fields(&format!("metadata.name={ROOT_CONFIGMAP}"))
            .page_size(CONFIGMAP_PAGE),
    )
    .default_backoff();
    let crl_maps = watcher::watcher(
        Api::<ConfigMap>::all(publisher.client.clone()),
        watcher::Config::default()
            .fields(&format!("metadata.name={CRL_CONFIGMAP}"))
            .page_size(CONFIGMAP_PAGE),
    )
    .default_backoff();
    let mut namespaces = std::pin::pin!(namespaces);
    let mut config_maps = std::pin::pin!(config_maps);
    let mut crl_maps = std::pin::pin!(crl_maps);
    // What the ConfigMap watches show, so that a tick reads and writes only what differs.
    let mut seen = Seen::default();
    let (mut root_view, mut crl_view) = (ConfigMapView::default(), ConfigMapView::default());
    let mut ns_synced = false;
    let mut last_full: Option<tokio::time::Instant> = None;
    // Namespaces seen so far, and whether each is active (not terminating). The first list is
    // the tick's business; later unseen ones are new.
    let mut known: BTreeMap<String, bool> = BTreeMap::new();
    let mut listed = false;
    let mut relist: Option<BTreeMap<String, bool>> = None;
    let active = |ns: &Namespace| {
        ns.metadata.deletion_timestamp.is_none()
            && ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating")
    };
    let mut leading = false;
    // Until when this replica holds the Lease, from its last renewal.
    let mut held_until = tokio::time::Instant::now();
    let mut next_tick = tokio::time::Instant::now();
    // Whether each watch's (Namespaces, root and CRL ConfigMaps) current run of errors was
    // logged: once per run, again after the watch delivered something.
    let mut errors_logged = [false; 3];
    loop {
        // The namespace an event asks to publish into, if any.
        let mut wanted: Option<String> = None;
        tokio::select! {
            () = tokio::time::sleep_until(next_tick) => {
                next_tick = tokio::time::Instant::now() + interval;
                let (root, crl) = current();
                publisher.set_root(root);
                publisher.set_crl(crl);
                let renewed = tokio::time::Instant::now();
                // A full pass when a watch is not in step, and every FULL_PASS; else only
                // what the watches show missing or different.
                let full = !(ns_synced && root_view.synced && crl_view.synced)
                    || last_full.is_none_or(|t| renewed >= t + FULL_PASS);
                let outcome = if full {
                    let o = tick(&elector, &publisher, SystemTime::now()).await;
                    // Namespaces that failed are retried by the next ticks anyway (the
                    // watches show them different); they do not make every tick a full pass.
                    if matches!(o, Ok(Some(_))) {
                        last_full = Some(renewed);
                    }
                    o
                } else {
                    match elector.try_acquire_or_renew(SystemTime::now()).await {
                        Ok(true) => {
                            let active: Vec<String> = known
                                .iter()
                                .filter(|(_, a)| **a)
                                .map(|(n, _)| n.clone())
                                .collect();
                            Ok(Some(publisher.publish_seen(&active, &seen).await))
                        }
                        Ok(false) => Ok(None),
                        Err(e) => Err(e),
                    }
                };
                match &outcome {
                    Ok(Some(p)) => {
                        held_until = renewed + elector.duration();
                        if !leading {
                            tracing::info!(lease = ?elector, "publishing {ROOT_CONFIGMAP}: this replica holds the Lease");
                            leading = true;
                        }
                        if !p.created.is_empty() || !p.updated.is_empty() {
                            tracing::info!(created = ?p.created, updated = ?p.updated, "published {ROOT_CONFIGMAP}");
                        }
                        if !p.crl_created.is_empty() || !p.crl_updated.is_empty() {
                            tracing::info!(created = ?p.crl_created, updated = ?p.crl_updated, "published {CRL_CONFIGMAP}");
                        }
                    }
                    Ok(None) => {
                        if leading {
                            tracing::info!("lost the {PUBLISHER_LEASE} Lease; another replica publishes");
                            leading = false;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "publishing {ROOT_CONFIGMAP} failed; retrying"),
                }
                report(&PublishEvent::Tick(outcome.map_err(|e| e.to_string())));
            }
            Some(event) = namespaces.next() => match event.inspect(|_| errors_logged[0] = false) {
                Ok(Event::Apply(ns)) => {
                    if let Some(name) = ns.metadata.name.clone() {
                        let is_active = active(&ns);
                        if known.insert(name.clone(), is_active).is_none() && listed && is_active {
                            wanted = Some(name);
                        }
                    }
                }
                Ok(Event::Delete(ns)) => {
                    if let Some(name) = &ns.metadata.name {
                        known.remove(name);
                    }
                }
                Ok(Event::Init) => {
                    relist = Some(BTreeMap::new());
                    ns_synced = false;
                }
                Ok(Event::InitApply(ns)) => {
                    if let Some(name) = ns.metadata.name.clone() {
                        relist.get_or_insert_with(BTreeMap::new).insert(name, active(&ns));
                    }
                }
                Ok(Event::InitDone) => {
                    // A re-list after an outage: namespaces made meanwhile are new. The tick
                    // serves them too; the first list is left to the tick entirely.
                    let now_known = relist.take().unwrap_or_default();
                    let fresh: Vec<String> = now_known
                        .iter()
                        .filter(|(n, a)| **a && !known.contains_key(*n))
                        .map(|(n, _)| n.clone())
                        .collect();
                    known = now_known;
                    if listed {
                        for name in fresh {
                            publish_watched(&publisher, &name, leading && tokio::time::Instant::now() < held_until, &mut report).await;
                        }
                    }
                    listed = true;
                    ns_synced = true;
                }
                Err(e) => {
                    // The watch resumes where it stopped, losing nothing; the next tick makes
                    // a full pass anyway, for what happened while it could not reach the API.
                    last_full = None;
                    if !std::mem::replace(&mut errors_logged[0], true) {
                        tracing::warn!(error = %e, "watch of Namespaces for {ROOT_CONFIGMAP} failed; the tick still publishes, retrying with backoff");
                    }
                }
            },
            Some(event) = config_maps.next() => match root_view.apply(&mut seen.roots, ROOT_CONFIGMAP_KEY, event) {
                // Deleted: re-created at once. An edit is set back by the next tick (acting on
                // every change would let two replicas that both believe they hold the Lease,
                // for a moment at a hand-over, rewrite each other at event speed).
                // Not in a terminating namespace, whose ConfigMaps go with it.
                Ok(deleted) => {
                    errors_logged[1] = false;
                    wanted = deleted.filter(|ns| known.get(ns) == Some(&true));
                }
                Err(e) => {
                    last_full = None;
                    if !std::mem::replace(&mut errors_logged[1], true) {
                        tracing::warn!(error = %e, "watch of {ROOT_CONFIGMAP} ConfigMaps failed; the tick still publishes, retrying with backoff");
                    }
                }
            },
            // CRL ConfigMaps: only followed (a deleted or edited one is set back by the tick).
            Some(event) = crl_maps.next() => match crl_view.apply(&mut seen.crls, CRL_CONFIGMAP_KEY, event) {
                Ok(_) => errors_logged[2] = false,
                Err(e) => {
                    last_full = None;
                    if !std::mem::replace(&mut errors_logged[2], true) {
                        tracing::warn!(error = %e, "watch of {CRL_CONFIGMAP} ConfigMaps failed; the tick still publishes, retrying with backoff");
                    }
                }
            }
        }
        if let Some(name) = wanted {
            let holding = leading && tokio::time::Instant::now() < held_until;
            publish_watched(&publisher, &name, holding, &mut report).await;
        }
    }
}

/// Publishes into `namespace` for a watch event if this replica holds the Lease.
async fn publish_watched(
    publisher: &RootPublisher,
    namespace: &str,
    holding: bool,
    report: &mut (impl FnMut(&PublishEvent) + Send),
) {
    let published = if holding {
        let p = publisher.publish_namespace(namespace).await;
        if !p.created.is_empty() || !p.updated.is_empty() {
            tracing::info!(namespace = %namespace, "published {ROOT_CONFIGMAP} at a watch event");
        }
        Some(p)
    } else {
        None
    };
    report(&PublishEvent::Watched {
        namespace: namespace.to_owned(),
        published,
    });
}
