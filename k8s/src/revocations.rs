//! Revocations shared between CA replicas (issue #14 with issue #13): ConfigMap
//! [`REVOCATIONS_CONFIGMAP`] in the CA namespace, key [`REVOCATIONS_KEY`], holds every serial any
//! replica revoked, as JSON `{"revoked": [{"serial", "revoked_at", "reason"?, "spiffe_id"?,
//! "not_after"?}], "identities": [{"spiffe_id", "issued_before", "reason"?}]}` (the entries of
//! the CA's own `revocations.json`). An identity revocation (`rampart ca revoke --spiffe-id`)
//! is applied by each replica, once, to the certificates its own audit log shows it issued
//! to that identity before the time ([`rampart_citadel::IdentityRevocation::covers`]); the
//! serials it revokes are then shared like any other.
//!
//! [`RevocationSync::run`] keeps one replica and the object in step, both ways:
//!
//! - up: when the replica's revoked list changes (`rampart ca revoke` through its admin
//!   socket: [`rampart_citadel::Revocations::subscribe`]), the entries the object lacks are
//!   added to it: read, add, replace with the read `resourceVersion`; a 409 re-reads and
//!   retries. The merge is a set union: a live entry is never dropped (also entries this
//!   replica cannot parse stay as they are); an entry the object holds with an earlier
//!   not-after than this replica's is replaced by this replica's (moving a not-after into
//!   the past would take the entry off the CRLs); entries of certificates that expired more
//!   than [`rampart_citadel::PRUNE_AFTER_EXPIRY`] ago leave the object. If the API cannot be
//!   reached the local revocation stands (it was persisted and published before) and the
//!   upload is retried in the background with backoff (error log and
//!   `rampart_ca_revocation_share_failing` = 1 meanwhile).
//! - down: a watch of the object (field selector `metadata.name`) merges entries the replica
//!   lacks into its revocations ([`rampart_citadel::CaState::merge_revocations`]: persisted in
//!   `revocations.json`, CRL re-signed and published at once, so GetCrls and, on the Lease
//!   holder, `istio-ca-crl` carry them). An invalid entry is refused alone (error log,
//!   `rampart_ca_revocation_entries_refused`), the others apply.
//!
//! A full two-way pass ([`RevocationSync::sync_once`]) also runs at start, after the object was
//! deleted or changed to lack entries, on failure (with backoff) and every [`RESYNC`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rampart_citadel::{
    CaState, IdentityRevocation, RevocationShare, ShareReport, ShareState, StoredRevocation,
    later_not_after, normalize_serial, prunable,
};
use serde_json::{Value, json};

/// The ConfigMap holding every replica's revocations, in the CA namespace.
pub const REVOCATIONS_CONFIGMAP: &str = "rampart-ca-revocations";
/// Its key: JSON `{"revoked": [...]}`.
pub const REVOCATIONS_KEY: &str = "revocations.json";
/// First retry after a failed pass; doubles up to [`MAX_RETRY`].
pub const DEFAULT_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between retries of a failed pass.
pub const MAX_RETRY: Duration = Duration::from_secs(30);
/// A full pass at least this often, in case a watch event was missed.
pub const RESYNC: Duration = Duration::from_secs(300);
/// Conflicting writes (409) tolerated in one pass before it counts as failed and is retried.
const MAX_CONFLICTS: usize = 16;

/// Counters of the sharing, for the CA's `/metrics`.
#[derive(Debug, Default)]
pub struct RevocationSyncMetrics {
    uploaded: Counter,
    merged: Counter,
    failures: Counter,
    failing: Gauge,
    refused: Gauge,
    rules_failing: Gauge,
    watch_errors: Counter,
}

impl RevocationSyncMetrics {
    /// Register every metric in `registry`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "rampart_ca_revocations_uploaded",
            "Revocations of this replica added to ConfigMap rampart-ca-revocations",
            self.uploaded.clone(),
        );
        registry.register(
            "rampart_ca_revocations_merged",
            "Revocations of other replicas merged from ConfigMap rampart-ca-revocations",
            self.merged.clone(),
        );
        registry.register(
            "rampart_ca_revocation_share_failures",
            "Failed passes sharing revocations through the API (each retried with backoff)",
            self.failures.clone(),
        );
        registry.register(
            "rampart_ca_revocation_share_failing",
            "1 while the last pass sharing revocations failed (local revocations may not have reached the other replicas)",
            self.failing.clone(),
        );
        registry.register(
            "rampart_ca_revocation_entries_refused",
            "Invalid entries in ConfigMap rampart-ca-revocations at the last look (refused alone)",
            self.refused.clone(),
        );
        registry.register(
            "rampart_ca_identity_revocations_failing",
            "Identity revocations of other replicas this replica could not apply at the last look (retried; see the error log)",
            self.rules_failing.clone(),
        );
        registry.register(
            "rampart_ca_revocation_watch_errors",
            "Errors of the watch of ConfigMap rampart-ca-revocations (retried with backoff)",
            self.watch_errors.clone(),
        );
    }

    /// Local revocations added to the object so far.
    pub fn uploaded(&self) -> u64 {
        self.uploaded.get()
    }

    /// Entries merged from the object so far.
    pub fn merged(&self) -> u64 {
        self.merged.get()
    }

    /// Failed passes so far.
    pub fn failures(&self) -> u64 {
        self.failures.get()
    }

    /// Whether the last pass failed.
    pub fn failing(&self) -> bool {
        self.failing.get() != 0
    }

    /// Entries refused at the last look at the object.
    pub fn refused(&self) -> i64 {
        self.refused.get()
    }

    /// Identity revocations that could not be applied at the last look.
    pub fn rules_failing(&self) -> i64 {
        self.rules_failing.get()
    }
}

/// What one look at the object found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncPass {
    /// Serials merged into this replica.
    pub merged: Vec<String>,
    /// Entries of the object refused: (serial as given, why).
    pub refused: Vec<(String, String)>,
    /// Serials of this replica added to the object.
    pub uploaded: Vec<String>,
}

/// What this replica knows of the object, for `rampart ca revoke` to wait on
/// ([`RevocationShare`]): the serials seen in it, and the passes that failed.
#[derive(Debug)]
pub struct ShareTracker {
    target: String,
    seen: std::sync::Mutex<Seen>,
    changed: std::sync::Condvar,
    /// A waiter asks for a pass now instead of at the next retry of the backoff.
    poke: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Seen {
    /// Serials (normalized) known to be in the object: read from it, or written to it.
    serials: HashSet<String>,
    /// Passes started so far (the number of the last one).
    started: u64,
    /// The last pass that failed, and why; until one succeeds.
    failed: Option<(u64, String)>,
}

impl ShareTracker {
    fn new(namespace: &str) -> Self {
        ShareTracker {
            target: format!("ConfigMap {namespace}/{REVOCATIONS_CONFIGMAP}"),
            seen: Default::default(),
            changed: Default::default(),
            poke: tokio::sync::Notify::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Seen)) {
        f(&mut self.seen.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_all();
    }

    /// The object, as just read, holds exactly `serials` (its valid ones).
    fn read(&self, serials: &HashSet<String>) {
        self.update(|s| s.serials.clone_from(serials));
    }

    /// `serials` were just written to the object.
    fn wrote(&self, serials: &[String]) {
        self.update(|s| s.serials.extend(serials.iter().cloned()));
    }

    /// A pass starts; its number.
    fn start_pass(&self) -> u64 {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.started += 1;
        seen.started
    }

    fn succeeded(&self) {
        self.update(|s| s.failed = None);
    }

    fn failed(&self, pass: u64, why: &str) {
        self.update(|s| s.failed = Some((pass, why.to_owned())));
    }
}

impl RevocationShare for ShareTracker {
    fn wait_shared(&self, serials: &[String], timeout: Duration) -> ShareReport {
        let want: Vec<String> = serials
            .iter()
            .map(|s| normalize_serial(s).unwrap_or_else(|_| s.clone()))
            .collect();
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        // Only a pass that starts after this call can have tried to share these serials.
        let first = seen.started + 1;
        if !want.iter().all(|s| seen.serials.contains(s)) {
            // Already revoked here but not (known to be) shared: a rerun of `ca revoke`
            // after an outage gets its answer from a pass now, not after the backoff.
            self.poke.notify_one();
        }
        loop {
            let report = |state, error| ShareReport {
                state,
                target: self.target.clone(),
                error,
            };
            if want.iter().all(|s| seen.serials.contains(s)) {
                return report(ShareState::Shared, None);
            }
            match &seen.failed {
                Some((pass, why)) if *pass >= first => {
                    return report(ShareState::Failing, Some(why.clone()));
                }
                _ => {}
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                let why = seen.failed.as_ref().map(|(_, why)| why.clone());
                return report(ShareState::Pending, why);
            }
            seen = self
                .changed
                .wait_timeout(seen, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// One replica's side of the shared revocations.
pub struct RevocationSync {
    api: Api<ConfigMap>,
    state: Arc<CaState>,
    metrics: Arc<RevocationSyncMetrics>,
    tracker: Arc<ShareTracker>,
    retry: Duration,
}

impl std::fmt::Debug for RevocationSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationSync")
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// The object's entries: the JSON values as stored (kept as they are when written back) and
/// the serials among them that parse, each with the latest not-after the object gives it.
#[derive(Default)]
struct Shared {
    raw: Vec<Value>,
    serials: HashSet<String>,
    not_after: HashMap<String, Option<String>>,
    /// The identity revocations as stored, and the valid ones.
    rules_raw: Vec<Value>,
    rules: Vec<IdentityRevocation>,
}

impl Shared {
    /// What a revoke waits on: the serials and the identity rules the object holds.
    fn keys(&self) -> HashSet<String> {
        let mut keys = self.serials.clone();
        keys.extend(self.rules.iter().map(IdentityRevocation::key));
        keys
    }
}

fn entry_not_after(v: &Value) -> Option<&str> {
    v.get("not_after").and_then(Value::as_str)
}

fn entry_serial(v: &Value) -> Option<String> {
    normalize_serial(v.get("serial")?.as_str()?).ok()
}

/// Reads the object's entries. `Err` when the key holds something that is not the format.
fn read_shared(cm: Option<&ConfigMap>) -> Result<Shared, String> {
    let text = cm
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get(REVOCATIONS_KEY));
    let doc: Value = match text {
        None => Value::Null,
        Some(t) => serde_json::from_str(t).map_err(|e| format!("not JSON: {e}"))?,
    };
    let list = |key: &str| match doc.get(key) {
        Some(Value::Array(a)) => Ok(a.clone()),
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(_) => Err(format!("\"{key}\" is not a list")),
    };
    let raw = list("revoked")?;
    let rules_raw = list("identities")?;
    // Rules from the future are no rule any replica applies: not counted as present (and
    // dropped at the next write).
    let now = std::time::SystemTime::now();
    let rules = rules_raw
        .iter()
        .filter_map(|v| serde_json::from_value::<IdentityRevocation>(v.clone()).ok())
        .filter_map(|r| r.validated().ok())
        .filter(|r| !r.is_future(now))
        .collect();
    // Only entries every replica would merge count as present: an invalid copy of a serial
    // (a bad reason, a not_after that is no RFC 3339 string) must not hide that the valid
    // entry is missing or was moved into the past.
    let mut not_after: HashMap<String, Option<String>> = HashMap::new();
    for v in &raw {
        let Some(entry) = serde_json::from_value::<StoredRevocation>(v.clone())
            .ok()
            .and_then(|e| e.validated().ok())
        else {
            continue;
        };
        let (serial, na) = (entry.serial, entry.not_after.as_deref());
        match not_after.get_mut(&serial) {
            Some(have) => {
                if later_not_after(na, have.as_deref()) {
                    *have = na.map(str::to_owned);
                }
            }
            None => {
                not_after.insert(serial, na.map(str::to_owned));
            }
        }
    }
    let serials = not_after.keys().cloned().collect();
    Ok(Shared {
        raw,
        serials,
        not_after,
        rules_raw,
        rules,
    })
}

/// Parses each entry alone: the valid ones, and the refused ones with why.
fn parse_entries(raw: &[Value]) -> (Vec<StoredRevocation>, Vec<(String, String)>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for v in raw {
        match serde_json::from_value::<StoredRevocation>(v.clone()) {
            Ok(e) => ok.push(e),
            Err(e) => refused.push((
                v.get("serial")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_owned(),
                format!("not a revocation entry: {e}"),
            )),
        }
    }
    (ok, refused)
}

/// An API error as one line: the API server's status and message, not the whole object.
fn api_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
        e => e.to_string(),
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn document(raw: Vec<Value>, rules: Vec<Value>) -> String {
    let doc = if rules.is_empty() {
        json!({ "revoked": raw })
    } else {
        json!({ "revoked": raw, "identities": rules })
    };
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    text
}

impl RevocationSync {
    /// Shares the revocations of `state` through ConfigMap [`REVOCATIONS_CONFIGMAP`] in
    /// `namespace` (the CA's).
    /// `rampart ca revoke` on this replica waits (through [`CaState::set_revocation_share`])
    /// until its serials are in the object, and says so.
    pub fn new(client: kube::Client, namespace: &str, state: Arc<CaState>) -> Self {
        let tracker = Arc::new(ShareTracker::new(namespace));
        state.set_revocation_share(tracker.clone());
        RevocationSync {
            api: Api::namespaced(client, namespace),
            state,
            metrics: Arc::default(),
            tracker,
            retry: DEFAULT_RETRY,
        }
    }

    /// The first retry after a failed pass (doubling up to [`MAX_RETRY`]).
    pub fn with_retry(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    /// The metrics (register them with the CA's).
    pub fn metrics(&self) -> Arc<RevocationSyncMetrics> {
        self.metrics.clone()
    }

    /// Merges the valid entries of the object that this replica lacks (persisted, CRL
    /// re-signed at once); invalid entries are refused alone.
    async fn merge_from(&self, shared: &Shared, pass: &mut SyncPass) -> Result<(), String> {
        let (entries, mut refused) = parse_entries(&shared.raw);
        let rules = shared.rules.clone();
        let st = self.state.clone();
        let (out, applied) = tokio::task::spawn_blocking(move || {
            let out = st.merge_revocations(&entries)?;
            // Identity revocations of other replicas: each revokes here what this replica
            // issued to the identity before the rule's time (its audit log); those serials
            // are then shared like any revocation made here.
            let rules = st.merge_identity_rules(&rules);
            Ok::<_, rampart_citadel::CitadelError>((out, rules))
        })
        .await
        .map_err(|e| format!("merge task: {e}"))?
        .map_err(|e| format!("recording merged revocations: {e}"))?;
        self.metrics
            .rules_failing
            .set(i64::try_from(applied.failed.len()).unwrap_or(i64::MAX));
        for a in applied.applied {
            tracing::info!(identity = %a.rule.spiffe_id, issued_before = %a.rule.issued_before, revoked = a.revoked.len(), "applied another replica's identity revocation to this replica's certificates");
        }
        for (serial, why) in &refused {
            tracing::error!(%serial, reason = %why, configmap = REVOCATIONS_CONFIGMAP, "refused a shared revocation entry (the others apply)");
        }
        refused.extend(out.refused);
        self.metrics
            .refused
            .set(i64::try_from(refused.len()).unwrap_or(i64::MAX));
        self.metrics.merged.inc_by(out.added.len() as u64);
        pass.merged.extend(out.added);
        pass.refused = refused;
        Ok(())
    }

    /// This replica's identity revocations that `shared` lacks (not yet past their horizon).
    fn missing_rules_from(&self, shared: &Shared) -> Vec<IdentityRevocation> {
        let now = std::time::SystemTime::now();
        self.state
            .revocations()
            .state()
            .identities
            .into_iter()
            // A rule from the future (the clock stepped back since it was recorded) is not
            // shared: the object would drop it at every write and this replica write it back.
            .filter(|r| !r.prunable(now) && !r.is_future(now) && !shared.rules.contains(r))
            .collect()
    }

    /// This replica's revoked entries that `shared` lacks, or holds with an earlier
    /// not-after than this replica's (an entry changed to leave the CRLs early is written
    /// back as it was).
    fn missing_from(&self, shared: &Shared) -> Vec<StoredRevocation> {
        let now = std::time::SystemTime::now();
        self.state
            .revocations()
            .state()
            .revoked
            .into_iter()
            .filter_map(|mut r| {
                r.serial = normalize_serial(&r.serial).ok()?;
                if prunable(r.not_after.as_deref(), now) {
                    return None;
                }
                let lacking = match shared.not_after.get(&r.serial) {
                    None => true,
                    Some(theirs) => later_not_after(r.not_after.as_deref(), theirs.as_deref()),
                };
                lacking.then_some(r)
            })
            .collect()
    }

    /// One full pass: read the object, merge what this replica lacks, add what the object
    /// lacks (create it if absent; replace with the read `resourceVersion`; on a 409 read
    /// again). Live entries are only added or given a later not-after; expired ones leave.
    pub async fn sync_once(&self) -> Result<SyncPass, String> {
        let mut pass = SyncPass::default();
        for _ in 0..MAX_CONFLICTS {
            let current = self.api.get_opt(REVOCATIONS_CONFIGMAP).await.map_err(|e| {
                format!(
                    "reading ConfigMap {REVOCATIONS_CONFIGMAP}: {}",
                    api_error(&e)
                )
            })?;
            let shared = match read_shared(current.as_ref()) {
                Ok(s) => {
                    self.merge_from(&s, &mut pass).await?;
                    s
                }
                Err(why) => {
                    // Nothing in it can be read as an entry: rewritten with ours (the other
                    // replicas add theirs back the same way).
                    tracing::error!(configmap = REVOCATIONS_CONFIGMAP, key = REVOCATIONS_KEY, reason = %why, "shared revocations unreadable; rewriting them with this replica's");
                    Shared::default()
                }
            };
            self.tracker.read(&shared.keys());
            let missing = self.missing_from(&shared);
            let missing_rules = self.missing_rules_from(&shared);
            // Entries of certificates that expired more than a week ago leave the object too,
            // and identity revocations once every certificate they can cover did.
            let now = std::time::SystemTime::now();
            let expired = |v: &Value| prunable(entry_not_after(v), now);
            let rule_expired = |v: &Value| {
                serde_json::from_value::<IdentityRevocation>(v.clone()).is_ok_and(|r| {
                    r.validated()
                        .is_ok_and(|r| r.prunable(now) || r.is_future(now))
                })
            };
            if missing.is_empty()
                && missing_rules.is_empty()
                && !shared.raw.iter().any(expired)
                && !shared.rules_raw.iter().any(rule_expired)
            {
                return Ok(pass);
            }
            let serials: Vec<String> = missing.iter().map(|r| r.serial.clone()).collect();
            let replaced: HashSet<&String> = serials.iter().collect();
            let mut raw: Vec<Value> = shared
                .raw
                .into_iter()
                .filter(|v| !expired(v) && entry_serial(v).is_none_or(|s| !replaced.contains(&s)))
                .collect();
            raw.extend(missing.iter().filter_map(|r| serde_json::to_value(r).ok()));
            let mut rules: Vec<Value> = shared
                .rules_raw
                .into_iter()
                .filter(|v| !rule_expired(v))
                .collect();
            rules.extend(
                missing_rules
                    .iter()
                    .filter_map(|r| serde_json::to_value(r).ok()),
            );
            let mut written_keys = serials.clone();
            written_keys.extend(missing_rules.iter().map(IdentityRevocation::key));
            let data = BTreeMap::from([(REVOCATIONS_KEY.to_owned(), document(raw, rules))]);
            let written = match current {
                None => {
                    let cm = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(REVOCATIONS_CONFIGMAP.into()),
                            ..Default::default()
                        },
                        data: Some(data),
                        ..Default::default()
                    };
                    self.api.create(&PostParams::default(), &cm).await
                }
                Some(mut cm) => {
                    cm.data = Some(data);
                    // Carries the resourceVersion read: a 409 means another replica wrote.
                    self.api
                        .replace(REVOCATIONS_CONFIGMAP, &PostParams::default(), &cm)
                        .await
                }
            };
            match written {
                Ok(_) => {
                    self.tracker.wrote(&written_keys);
                    self.metrics.uploaded.inc_by(serials.len() as u64);
                    pass.uploaded = serials;
                    return Ok(pass);
                }
                Err(e) if is_conflict(&e) => {
                    tracing::debug!(
                        "ConfigMap {REVOCATIONS_CONFIGMAP} changed meanwhile; reading it again"
                    );
                }
                Err(e) => {
                    return Err(format!(
                        "writing ConfigMap {REVOCATIONS_CONFIGMAP}: {}",
                        api_error(&e)
                    ));
                }
            }
        }
        Err(format!(
            "ConfigMap {REVOCATIONS_CONFIGMAP}: {MAX_CONFLICTS} conflicting writes in a row"
        ))
    }

    /// Merges a watched object's entries; `true` when a full pass is due (the object lacks
    /// entries of this replica, or the merge failed).
    async fn on_object(&self, cm: &ConfigMap) -> bool {
        if cm.metadata.name.as_deref() != Some(REVOCATIONS_CONFIGMAP) {
            return false;
        }
        let shared = match read_shared(Some(cm)) {
            Ok(s) => s,
            Err(_) => return true,
        };
        self.tracker.read(&shared.keys());
        let mut pass = SyncPass::default();
        if let Err(e) = self.merge_from(&shared, &mut pass).await {
            tracing::error!(error = %e, "merging shared revocations failed; retrying");
            return true;
        }
        if !pass.merged.is_empty() {
            tracing::info!(merged = ?pass.merged, "merged revocations of other CA replicas");
        }
        !self.missing_from(&shared).is_empty() || !self.missing_rules_from(&shared).is_empty()
    }

    /// Watches the object, merging what it adds; pokes `due` when a full pass is needed.
    async fn watch(&self, due: Arc<tokio::sync::Notify>) {
        let config =
            watcher::Config::default().fields(&format!("metadata.name={REVOCATIONS_CONFIGMAP}"));
        let mut events = watcher::watcher(self.api.clone(), config)
            .default_backoff()
            .boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(Event::Apply(cm) | Event::InitApply(cm)) => {
                    if self.on_object(&cm).await {
                        due.notify_one();
                    }
                }
                Ok(Event::Delete(cm)) => {
                    if cm.metadata.name.as_deref() == Some(REVOCATIONS_CONFIGMAP) {
                        tracing::warn!(
                            "ConfigMap {REVOCATIONS_CONFIGMAP} was deleted; writing it again"
                        );
                        due.notify_one();
                    }
                }
                Ok(Event::Init | Event::InitDone) => {}
                Err(e) => {
                    self.metrics.watch_errors.inc();
                    tracing::warn!(error = %e, "watch of ConfigMap {REVOCATIONS_CONFIGMAP} failed; retrying");
                }
            }
        }
    }

    /// Runs until dropped: the watch, and a full pass at start, at every local revocation,
    /// when the watch asks, on failure (backoff from the retry interval up to [`MAX_RETRY`])
    /// and every [`RESYNC`].
    pub async fn run(self) {
        let this = Arc::new(self);
        let due = Arc::new(tokio::sync::Notify::new());
        let watch = {
            let (this, due) = (this.clone(), due.clone());
            tokio::spawn(async move { this.watch(due).await })
        };
        struct AbortOnDrop(tokio::task::JoinHandle<()>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _watch = AbortOnDrop(watch);
        let mut changes = this.state.revocations().subscribe();
        let mut backoff = this.retry;
        loop {
            changes.borrow_and_update();
            let pass_no = this.tracker.start_pass();
            let wait = match this.sync_once().await {
                Ok(pass) => {
                    if this.metrics.failing() {
                        tracing::info!(
                            "sharing revocations through ConfigMap {REVOCATIONS_CONFIGMAP} works again"
                        );
                    }
                    this.metrics.failing.set(0);
                    this.tracker.succeeded();
                    if !pass.uploaded.is_empty() {
                        tracing::info!(serials = ?pass.uploaded, "revocations shared with the other CA replicas");
                    }
                    if !pass.merged.is_empty() {
                        tracing::info!(merged = ?pass.merged, "merged revocations of other CA replicas");
                    }
                    backoff = this.retry;
                    RESYNC
                }
                Err(e) => {
                    this.metrics.failures.inc();
                    this.metrics.failing.set(1);
                    this.tracker.failed(pass_no, &e);
                    tracing::error!(error = %e, retry_in = ?backoff, "REVOCATIONS NOT SHARED with the other CA replicas (enforced by this replica only); retrying");
                    let wait = backoff;
                    backoff = (backoff * 2).min(MAX_RETRY);
                    wait
                }
            };
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                () = due.notified() => {}
                () = this.tracker.poke.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}
