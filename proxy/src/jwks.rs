//! Remote JWKS for RequestAuthentication `jwksUri`: an HTTP(S) fetcher and the key-set
//! state that outlives mesh-folder reloads, kept fresh by a background task.
//!
//! * Local files win: a `jwksUri` mapped to a file (`rampart.jwks` in `mesh.yaml`, or
//!   `jwks/<host>.json`) is read with every folder load and never fetched (offline use).
//! * Every other `http(s)` `jwksUri` is fetched by [`refresh_loop`] as soon as a configuration
//!   references it, then every `rampart.jwksRefresh` (default 20m, as Istio's
//!   `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`). Failures are retried after 1s, doubling up to
//!   [`MAX_RETRY`] (never later than the refresh interval).
//! * Fail closed: until a first fetch succeeds, tokens of that issuer get 401 naming the URI
//!   and the reason. A failed refresh keeps the last good keys.
//! * A token whose `kid` is not in the key set triggers one early refetch of that URI (at
//!   most once per [`KID_MISS_INTERVAL`]), and the request is checked again: an IdP key
//!   rotation is picked up without waiting for the next refresh.
//! * A rule with neither `jwks` nor `jwksUri` is found by OpenID discovery, as Istio does:
//!   its issuer's configuration document, then the `jwks_uri` it names (whose `issuer` must
//!   be the rule's, and which may not move an https fetch to http); cached under the
//!   document's URI.
//! * Fetching: the rule's `timeout` (Istio's default 5s) bounds connect, TLS, request and
//!   body; bodies over [`MAX_BODY`] are refused; only `200` is accepted (redirects are not
//!   followed); `https` is verified against the system roots plus `rampart.jwksCaFile`;
//!   plain `http` is fetched, as Istio does, with a warning.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rampart_authz::{Decision, JwksCache, JwksSource, OPENID_KEY_PREFIX};
use rampart_certs::jwt::Jwks;

use crate::config::{Config, Handle};
use crate::jwks_http::DEFAULT_REFRESH;

/// Longest wait between retries of a failing `jwksUri`.
pub(crate) const MAX_RETRY: Duration = Duration::from_secs(5 * 60);
/// First retry delay after a failure.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// At most one early (unknown `kid`) refetch per `jwksUri` in this interval.
pub(crate) const KID_MISS_INTERVAL: Duration = Duration::from_secs(30);
/// How often the refresh task looks for a new configuration (new `jwksUri`s).
const POLL: Duration = Duration::from_millis(250);

/// Whether `cfg` reads `uri` from a local file rather than fetching it.
pub(crate) fn is_local(cfg: &Config, uri: &str) -> bool {
    let url = uri.strip_prefix(OPENID_KEY_PREFIX).unwrap_or(uri);
    cfg.jwks_local.contains(uri) || !(url.starts_with("https://") || url.starts_with("http://"))
}

/// The URL behind a key-set key: the `jwksUri`, or a discovered issuer's configuration.
fn url_of(key: &str) -> &str {
    key.strip_prefix(OPENID_KEY_PREFIX).unwrap_or(key)
}

// === shared state ===

#[derive(Debug, Clone, Copy)]
struct Schedule {
    next: Instant,
    failures: u32,
}

/// Remote key sets and their schedule; lives as long as the proxy (across reloads).
#[derive(Debug)]
pub(crate) struct JwksState {
    cache: ArcSwap<JwksCache>,
    schedule: Mutex<HashMap<String, Schedule>>,
    /// Last early (unknown `kid`) refetch per URI; held while one runs.
    kid_miss: tokio::sync::Mutex<HashMap<String, Instant>>,
    warned_http: Mutex<BTreeSet<String>>,
    /// OpenID configuration URI → the `jwks_uri` it named at its last good fetch.
    discovered: Mutex<HashMap<String, String>>,
    /// Serializes writers of `cache` (the refresh task and early refetches).
    write: tokio::sync::Mutex<()>,
    first_round: AtomicBool,
}

impl Default for JwksState {
    fn default() -> Self {
        JwksState {
            cache: ArcSwap::from_pointee(JwksCache::new(DEFAULT_REFRESH, FIRST_RETRY)),
            schedule: Mutex::new(HashMap::new()),
            kid_miss: tokio::sync::Mutex::new(HashMap::new()),
            warned_http: Mutex::new(BTreeSet::new()),
            discovered: Mutex::new(HashMap::new()),
            write: tokio::sync::Mutex::new(()),
            first_round: AtomicBool::new(false),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn backoff(failures: u32, refresh: Duration) -> Duration {
    let d = FIRST_RETRY.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    d.min(MAX_RETRY).min(refresh)
}

impl JwksState {
    /// Whether the first fetch round after start has finished (every remote `jwksUri` of the
    /// configuration at start tried once), as Envoy activates listeners only then.
    pub(crate) fn first_round_done(&self) -> bool {
        self.first_round.load(Ordering::SeqCst)
    }

    /// The remote key sets now.
    pub(crate) fn snapshot(&self) -> Arc<JwksCache> {
        self.cache.load_full()
    }

    /// Fetch each `(uri, timeout)` now with `cfg`'s settings, record the results and
    /// schedule the next attempts.
    async fn fetch_all(&self, cfg: &Config, list: Vec<rampart_authz::JwksFetch>) {
        if list.is_empty() {
            return;
        }
        let fetcher = cfg.jwks_remote.fetcher.clone();
        for f in &list {
            if url_of(&f.uri).starts_with("http://")
                && lock(&self.warned_http).insert(f.uri.clone())
            {
                if f.discovery {
                    tracing::warn!(uri = %url_of(&f.uri), "issuer uses plain http (OpenID discovery): its keys could be altered in transit; use https");
                } else {
                    tracing::warn!(uri = %f.uri, "jwksUri uses plain http: its keys could be altered in transit; use https");
                }
            }
        }
        let results = futures::future::join_all(list.iter().map(|f| {
            let fetcher = fetcher.clone();
            async move {
                if !f.discovery {
                    return fetcher.fetch(&f.uri, f.timeout).await;
                }
                let (jwks_uri, body) = fetcher
                    .fetch_discovered(url_of(&f.uri), f.timeout)
                    .await?;
                let before = lock(&self.discovered).insert(f.uri.clone(), jwks_uri.clone());
                if before.as_deref() != Some(jwks_uri.as_str()) {
                    tracing::info!(configuration = %url_of(&f.uri), jwks_uri = %jwks_uri, "OpenID discovery found the issuer's key set");
                    if jwks_uri.starts_with("http://")
                        && lock(&self.warned_http).insert(jwks_uri.clone())
                    {
                        tracing::warn!(uri = %jwks_uri, "jwks_uri uses plain http: its keys could be altered in transit; use https");
                    }
                }
                Ok(body)
            }
        }))
        .await;
        let _w = self.write.lock().await;
        let mut cache = (*self.cache.load_full()).clone();
        let now = SystemTime::now();
        let mut sched = lock(&self.schedule);
        for (f, r) in list.iter().zip(results) {
            cache.record(&f.uri, r, now);
            let prev = sched.get(&f.uri).map_or(0, |s| s.failures);
            let st = cache.status(&f.uri);
            let entry = match st.as_ref().and_then(|s| s.last_error.as_deref()) {
                None => {
                    tracing::info!(
                        uri = %f.uri,
                        keys = st.as_ref().map_or(0, |s| s.keys),
                        "JWKS fetched"
                    );
                    Schedule {
                        next: Instant::now() + cfg.jwks_remote.refresh,
                        failures: 0,
                    }
                }
                Some(err) => {
                    let failures = prev.saturating_add(1);
                    let wait = backoff(failures, cfg.jwks_remote.refresh);
                    let serving = st.as_ref().is_some_and(|s| s.keys > 0);
                    tracing::warn!(
                        uri = %f.uri,
                        error = %err,
                        retry_in = %humantime::format_duration(wait),
                        "JWKS fetch failed; {}",
                        if serving {
                            "the last good keys keep serving"
                        } else {
                            "tokens of this issuer are refused (401) until a fetch succeeds"
                        }
                    );
                    Schedule {
                        next: Instant::now() + wait,
                        failures,
                    }
                }
            };
            sched.insert(f.uri.clone(), entry);
        }
        drop(sched);
        self.cache.store(Arc::new(cache));
    }

    /// The remote `jwksUri`s of `cfg` that are due at `now`, and when the next one is.
    fn due(&self, cfg: &Config, now: Instant) -> (Vec<rampart_authz::JwksFetch>, Option<Instant>) {
        let sched = lock(&self.schedule);
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for f in cfg.engine.jwks_uris() {
            if is_local(cfg, &f.uri) {
                continue;
            }
            match sched.get(&f.uri) {
                Some(s) if s.next > now => next = Some(next.map_or(s.next, |n| n.min(s.next))),
                _ => due.push(f),
            }
        }
        (due, next)
    }

    /// A new configuration is in force: forget URIs it no longer references, retry failing
    /// ones now (the edit may have fixed them, e.g. `rampart.jwksCaFile`), and bring the
    /// next refresh within a shortened `rampart.jwksRefresh`.
    async fn on_reload(&self, cfg: &Config) {
        let keep: BTreeSet<String> = cfg
            .engine
            .jwks_uris()
            .into_iter()
            .map(|f| f.uri)
            .filter(|u| !is_local(cfg, u))
            .collect();
        let _w = self.write.lock().await;
        let mut c = (*self.cache.load_full()).clone();
        c.retain(|u| keep.contains(u));
        self.cache.store(Arc::new(c));
        let now = Instant::now();
        lock(&self.discovered).retain(|u, _| keep.contains(u));
        let mut sched = lock(&self.schedule);
        sched.retain(|u, _| keep.contains(u));
        let latest = now + cfg.jwks_remote.refresh;
        for s in sched.values_mut() {
            s.next = if s.failures > 0 {
                now
            } else {
                s.next.min(latest)
            };
        }
    }

    /// After a 401 for an unknown `kid` from `miss.uris` (checked with the key sets in
    /// `miss.seen`): refetch those not refetched early in the last [`KID_MISS_INTERVAL`].
    /// Early refetches run one at a time, so a burst of requests after an IdP rotation waits
    /// for the first one's refetch instead of failing. True if the key sets changed since
    /// the request was checked (check it again).
    pub(crate) async fn refetch_on_kid_miss(&self, cfg: &Config, miss: KidMiss) -> bool {
        let mut misses = self.kid_miss.lock().await;
        if !Arc::ptr_eq(&self.cache.load_full(), &miss.seen) {
            return true;
        }
        let now = Instant::now();
        let list: Vec<rampart_authz::JwksFetch> = cfg
            .engine
            .jwks_uris()
            .into_iter()
            .filter(|f| miss.uris.contains(&f.uri) && !is_local(cfg, &f.uri))
            .filter(|f| {
                let recent = misses
                    .get(&f.uri)
                    .is_some_and(|t| now.duration_since(*t) < KID_MISS_INTERVAL);
                if !recent {
                    misses.insert(f.uri.clone(), now);
                }
                !recent
            })
            .collect();
        if list.is_empty() {
            return false;
        }
        for f in &list {
            tracing::info!(uri = %f.uri, "token signed with an unknown kid: refetching the JWKS early");
        }
        self.fetch_all(cfg, list).await;
        true
    }
}

/// Keeps the remote key sets of the configuration in force fresh: fetches new `jwksUri`s as
/// soon as a configuration references them, refreshes, retries with backoff. Runs until
/// aborted.
pub(crate) async fn refresh_loop(cfg_handle: Handle, state: Arc<JwksState>) {
    let mut last: Option<Arc<Config>> = None;
    loop {
        let cfg = cfg_handle.load_full();
        let changed = !last.as_ref().is_some_and(|l| Arc::ptr_eq(l, &cfg));
        if changed {
            state.on_reload(&cfg).await;
            last = Some(cfg.clone());
        }
        let (due, next) = state.due(&cfg, Instant::now());
        if !due.is_empty() {
            state.fetch_all(&cfg, due).await;
            continue;
        }
        state.first_round.store(true, Ordering::SeqCst);
        let wait = next
            .map(|n| n.saturating_duration_since(Instant::now()))
            .unwrap_or(POLL)
            .min(POLL);
        tokio::time::sleep(wait).await;
    }
}

// === request-time lookup ===

/// A token refused for an unknown `kid`: the remote URIs consulted and the key sets seen.
pub(crate) struct KidMiss {
    uris: Vec<String>,
    seen: Arc<JwksCache>,
}

/// The key sets one request is checked with: the configuration's local files first, then
/// the remote cache. Records which remote URIs were consulted (for unknown-`kid` refetch).
pub(crate) struct Lookup<'a> {
    cfg: &'a Config,
    remote: Arc<JwksCache>,
    used: Mutex<Vec<String>>,
}

impl<'a> Lookup<'a> {
    pub(crate) fn new(state: &JwksState, cfg: &'a Config) -> Lookup<'a> {
        Lookup {
            cfg,
            remote: state.snapshot(),
            used: Mutex::new(Vec::new()),
        }
    }

    /// What to refetch if `d` refused a token for an unknown `kid`.
    pub(crate) fn kid_miss(self, d: &Decision) -> Option<KidMiss> {
        let uris = self.used.into_inner().unwrap_or_else(|e| e.into_inner());
        (matches!(d.status, 401 | 403) && d.reason.contains("no key with kid") && !uris.is_empty())
            .then_some(KidMiss {
                uris,
                seen: self.remote,
            })
    }
}

impl JwksSource for Lookup<'_> {
    fn jwks(&self, uri: &str) -> Result<Arc<Jwks>, String> {
        if is_local(self.cfg, uri) {
            return self.cfg.jwks.jwks(uri);
        }
        let mut used = lock(&self.used);
        if !used.iter().any(|u| u == uri) {
            used.push(uri.to_string());
        }
        drop(used);
        self.remote.jwks(uri)
    }
}

/// `/config_dump` view of every `jwksUri` of `cfg`: source, last fetch, error, key count.
pub(crate) fn dump(state: &JwksState, cfg: &Config) -> serde_json::Value {
    let remote = state.snapshot();
    let sched = lock(&state.schedule).clone();
    let now = Instant::now();
    let t = |t: Option<SystemTime>| t.map(rampart_certs::timestamp::rfc3339);
    let list: Vec<serde_json::Value> = cfg
        .engine
        .jwks_uris()
        .into_iter()
        .map(|f| {
            let local = is_local(cfg, &f.uri);
            let st = if local {
                cfg.jwks.status(&f.uri)
            } else {
                remote.status(&f.uri)
            };
            let mut v = serde_json::json!({
                "uri": url_of(&f.uri),
                "source": if local { "file" } else { "remote" },
                "timeout": humantime::format_duration(f.timeout).to_string(),
                "state": match &st {
                    None => "pending",
                    Some(s) if s.last_error.is_none() => "ok",
                    Some(s) if s.keys > 0 => "stale",
                    Some(_) => "failed",
                },
                "last_fetch": st.as_ref().and_then(|s| t(s.fetched_at)),
                "last_attempt": st.as_ref().and_then(|s| t(s.last_attempt)),
                "last_error": st.as_ref().and_then(|s| s.last_error.clone()),
                "keys": st.as_ref().map_or(0, |s| s.keys),
                "kids": st.as_ref().map(|s| s.kids.clone()).unwrap_or_default(),
            });
            if f.discovery {
                v["openid_discovery"] = true.into();
                if !local {
                    v["jwks_uri"] = lock(&state.discovered).get(&f.uri).cloned().into();
                }
            }
            if !local {
                v["next_attempt_in_s"] = sched
                    .get(&f.uri)
                    .map(|s| s.next.saturating_duration_since(now).as_secs())
                    .into();
            }
            v
        })
        .collect();
    serde_json::json!({
        "refresh": humantime::format_duration(cfg.jwks_remote.refresh).to_string(),
        "ca_file": cfg.jwks_remote.ca_file.as_ref().map(|p| p.display().to_string()),
        "uris": list,
    })
}

#[cfg(test)]
mod tests;
