//! citadel's [`ExternalAuthenticator`] for Kubernetes: TokenReview, the `clusterid` header and
//! node authorization of impersonation, as istiod's CA.
//!
//! Node authorization reads Pods from an in-memory cache: a kube-runtime reflector over the
//! Pods of every namespace (list once, then watch), started with the authenticator and
//! stopped when it is dropped. Until that cache has listed once, impersonation is refused
//! (fail closed). A caller's Pod missing from the cache (created a moment ago) is looked up
//! with one GET; the target's Pods come from the cache only (no per-request LIST): a target
//! without a Pod on the node waits up to [`DEFAULT_POD_EVENT_GRACE`] for Pod watch events
//! that may bring one, then is refused.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use kube::api::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use rampart_certs::{SpiffeId, TrustDomain};
use rampart_citadel::{
    AuthMethod, BearerEvidence, Caller, ExternalAuthFuture, ExternalAuthenticator, Refusal,
};

use crate::review::{ReviewedToken, TokenReviewer};

/// A Kubernetes service account trusted to ask for other workloads' identities (ztunnel):
/// `NAMESPACE/NAME`, as `--trusted-node-accounts istio-system/ztunnel`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeAccount {
    /// Namespace.
    pub namespace: String,
    /// Service account name.
    pub name: String,
}

impl std::str::FromStr for NodeAccount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(NodeAccount {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!(
                "{s:?} is not NAMESPACE/SERVICE_ACCOUNT (e.g. istio-system/ztunnel)"
            )),
        }
    }
}

impl std::fmt::Display for NodeAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How long an impersonation waits for the Pod cache's first list before it is refused.
pub const DEFAULT_POD_SYNC_WAIT: Duration = Duration::from_secs(5);
/// How long an impersonation whose target has no Pod on the node in the cache waits for
/// Pod watch events that may bring one (a Pod scheduled a moment ago) before it is refused.
/// No API request is made meanwhile.
pub const DEFAULT_POD_EVENT_GRACE: Duration = Duration::from_secs(1);

/// The Pods node authorization reads: a reflector over every namespace's Pods, slimmed to
/// what the decision needs.
struct PodCache {
    store: reflector::Store<Pod>,
    synced: tokio::sync::watch::Receiver<bool>,
    /// Bumped after every watch event the store applied.
    changed: tokio::sync::watch::Receiver<u64>,
    task: Option<tokio::task::AbortHandle>,
}

impl PodCache {
    fn start(client: kube::Client) -> Self {
        let (store, writer) = reflector::store::<Pod>();
        let (synced_tx, synced) = tokio::sync::watch::channel(false);
        let (changed_tx, changed) = tokio::sync::watch::channel(0u64);
        let task = match tokio::runtime::Handle::try_current() {
            Ok(rt) => Some(
                rt.spawn(reflect_pods(
                    Api::all(client),
                    writer,
                    synced_tx,
                    changed_tx,
                ))
                .abort_handle(),
            ),
            Err(_) => {
                tracing::error!(
                    "no async runtime: the Pod cache cannot start, so node authorization refuses every impersonation"
                );
                None
            }
        };
        PodCache {
            store,
            synced,
            changed,
            task,
        }
    }

    /// Whether the cache holds a running (not finished) Pod of `account` scheduled on
    /// `node`; if not, checks again after each Pod watch event for up to `grace`.
    async fn has_pod_on_node(
        &self,
        account: &NodeAccount,
        node: &str,
        grace: Duration,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + grace;
        let mut changed = self.changed.clone();
        loop {
            changed.mark_unchanged();
            if has_pod_on_node(&self.store, account, node) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(format!(
                        "no Pod of service account {account} on node {node} (per the Pod cache)"
                    ));
                }
            }
        }
    }

    /// Waits up to `wait` for the first full list.
    async fn ready(&self, wait: Duration) -> Result<&reflector::Store<Pod>, String> {
        let mut synced = self.synced.clone();
        match tokio::time::timeout(wait, synced.wait_for(|s| *s)).await {
            Ok(Ok(_)) => Ok(&self.store),
            _ => Err(format!(
                "the Pod cache (a reflector over the Pods of every namespace) has not listed Pods yet (waited {wait:?}); node authorization fails closed"
            )),
        }
    }
}

impl Drop for PodCache {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Keeps only what node authorization reads (name, namespace, UID, service account, node,
/// phase): a cluster's Pods are held in memory.
fn slim_pod(pod: &mut Pod) {
    let m = &mut pod.metadata;
    m.managed_fields = None;
    m.annotations = None;
    m.labels = None;
    m.owner_references = None;
    m.finalizers = None;
    pod.spec = pod.spec.take().map(|s| PodSpec {
        service_account_name: s.service_account_name,
        node_name: s.node_name,
        ..Default::default()
    });
    pod.status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        ..Default::default()
    });
}

/// Runs the Pod reflector until aborted: list, watch, re-list after errors (kube-runtime's
/// default backoff). `synced` turns true at the first complete list. While the watch is
/// failing the cache keeps what it last saw.
async fn reflect_pods(
    api: Api<Pod>,
    writer: reflector::store::Writer<Pod>,
    synced: tokio::sync::watch::Sender<bool>,
    changed: tokio::sync::watch::Sender<u64>,
) {
    let stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(slim_pod)
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::InitDone) => {
                if !*synced.borrow() {
                    tracing::info!(
                        "Pod cache for node authorization listed every namespace's Pods; following the watch"
                    );
                }
                synced.send_replace(true);
                changed.send_modify(|n| *n = n.wrapping_add(1));
                failing = false;
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                changed.send_modify(|n| *n = n.wrapping_add(1));
                failing = false;
            }
            Ok(_) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "Pod watch for node authorization failed; the cache keeps what it last saw, retrying with backoff");
                    failing = true;
                }
            }
        }
    }
}

/// Judges bearer tokens for the CA in Kubernetes mode.
pub struct KubeAuthenticator {
    client: kube::Client,
    reviewer: TokenReviewer,
    trust_domain: TrustDomain,
    cluster_id: Option<String>,
    trusted_nodes: BTreeSet<NodeAccount>,
    pods: PodCache,
    pod_sync_wait: Duration,
    pod_event_grace: Duration,
}

impl std::fmt::Debug for KubeAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAuthenticator")
            .field("reviewer", &self.reviewer)
            .field("trust_domain", &self.trust_domain)
            .field("cluster_id", &self.cluster_id)
            .field("trusted_nodes", &self.trusted_nodes)
            .finish_non_exhaustive()
    }
}

impl KubeAuthenticator {
    /// Tokens reviewed by `reviewer`, identities in `trust_domain`; the `clusterid` header
    /// must name `cluster_id` when one is configured; `trusted_nodes` may impersonate.
    ///
    /// Starts the Pod cache (a task on the current tokio runtime, stopped when the
    /// authenticator is dropped); without a runtime every impersonation is refused.
    pub fn new(
        client: kube::Client,
        reviewer: TokenReviewer,
        trust_domain: TrustDomain,
        cluster_id: Option<String>,
        trusted_nodes: impl IntoIterator<Item = NodeAccount>,
    ) -> Self {
        KubeAuthenticator {
            pods: PodCache::start(client.clone()),
            client,
            reviewer,
            trust_domain,
            cluster_id: cluster_id.filter(|c| !c.is_empty()),
            trusted_nodes: trusted_nodes.into_iter().collect(),
            pod_sync_wait: DEFAULT_POD_SYNC_WAIT,
            pod_event_grace: DEFAULT_POD_EVENT_GRACE,
        }
    }

    /// How long an impersonation waits for the Pod cache's first list before it is
    /// refused (default [`DEFAULT_POD_SYNC_WAIT`]).
    pub fn with_pod_sync_wait(mut self, wait: Duration) -> Self {
        self.pod_sync_wait = wait;
        self
    }

    /// How long an impersonation whose target has no Pod on the node in the cache waits for
    /// Pod watch events before it is refused (default [`DEFAULT_POD_EVENT_GRACE`]).
    pub fn with_pod_event_grace(mut self, grace: Duration) -> Self {
        self.pod_event_grace = grace;
        self
    }

    /// Whether the Pod cache has listed every namespace's Pods once.
    pub fn pods_synced(&self) -> bool {
        *self.pods.synced.borrow()
    }

    /// The token reviewer (for its cache).
    pub fn reviewer(&self) -> &TokenReviewer {
        &self.reviewer
    }

    /// Who the caller is, and whom it may act for.
    pub async fn decide(&self, ev: &BearerEvidence, now: SystemTime) -> Result<Caller, Refusal> {
        // As istiod: a request without the header is for this cluster; one naming another
        // cluster is refused (this CA reviews tokens only with its own cluster's API server).
        if let (Some(ours), Some(theirs)) = (&self.cluster_id, &ev.cluster_id)
            && theirs != ours
        {
            return Err(Refusal::ClusterIdMismatch(format!(
                "clusterid header {:?} is not this CA's cluster {ours:?}",
                escape(theirs)
            )));
        }
        let reviewed = self.reviewer.review(&ev.token, now).await?;
        let id = SpiffeId::istio(
            &self.trust_domain,
            &reviewed.namespace,
            &reviewed.service_account,
        )
        .map_err(|e| Refusal::NoIdentityInToken(e.to_string()))?;
        let proved = Caller {
            id,
            method: AuthMethod::Jwt,
            on_behalf_of: None,
        };
        let Some(target) = ev.impersonate.as_deref().filter(|s| !s.is_empty()) else {
            return Ok(proved);
        };
        let target =
            SpiffeId::parse(target).map_err(|e| Refusal::BadImpersonation(e.to_string()))?;
        if target == proved.id {
            // A node agent may always ask for its own identity.
            return Ok(proved);
        }
        let caller_account = NodeAccount {
            namespace: reviewed.namespace.clone(),
            name: reviewed.service_account.clone(),
        };
        if !self.trusted_nodes.contains(&caller_account) {
            return Err(Refusal::ImpersonationDenied {
                caller: proved.id.to_string(),
            });
        }
        if target.trust_domain() != &self.trust_domain {
            return Err(Refusal::BadImpersonation(format!(
                "{target} is not in trust domain {}",
                self.trust_domain
            )));
        }
        let (Some(ns), Some(sa)) = (target.namespace(), target.service_account()) else {
            return Err(Refusal::BadImpersonation(format!(
                "{target} is not spiffe://<trust domain>/ns/<namespace>/sa/<service account>"
            )));
        };
        let target_account = NodeAccount {
            namespace: ns.to_owned(),
            name: sa.to_owned(),
        };
        if self.trusted_nodes.contains(&target_account) {
            return Err(Refusal::ImpersonationOfNodeAgent {
                caller: proved.id.to_string(),
                target: target.to_string(),
            });
        }
        let denied = |reason: String| Refusal::NodeAuthorizationDenied {
            caller: proved.id.to_string(),
            target: target.to_string(),
            reason,
        };
        let pods = self.pods.ready(self.pod_sync_wait).await.map_err(denied)?;
        let node = self.caller_node(&reviewed, pods).await.map_err(denied)?;
        self.pods
            .has_pod_on_node(&target_account, &node, self.pod_event_grace)
            .await
            .map_err(denied)?;
        Ok(Caller {
            id: target,
            method: AuthMethod::Impersonation,
            on_behalf_of: Some(proved.id),
        })
    }

    /// The node the caller runs on: the API server's node-name claim, else the node of the
    /// Pod the token is bound to (checked against the bound Pod UID). The Pod comes from the
    /// cache; when it is missing there, or has another UID (the cache may be a moment
    /// behind), one GET decides.
    async fn caller_node(
        &self,
        reviewed: &ReviewedToken,
        cache: &reflector::Store<Pod>,
    ) -> Result<String, String> {
        if let Some(node) = &reviewed.node_name {
            return Ok(node.clone());
        }
        let Some(pod_name) = &reviewed.pod_name else {
            return Err(
                "the caller's token is not bound to a Pod or node, so its node is unknown".into(),
            );
        };
        let ns = &reviewed.namespace;
        let bound = |pod: &Pod| {
            reviewed
                .pod_uid
                .as_ref()
                .is_none_or(|uid| pod.metadata.uid.as_deref() == Some(uid.as_str()))
        };
        let cached = cache
            .get(&ObjectRef::new(pod_name).within(ns))
            .filter(|p| bound(p));
        let pod = match cached {
            Some(pod) => pod,
            None => {
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
                let pod = pods
                    .get_opt(pod_name)
                    .await
                    .map_err(|e| format!("looking up the caller's Pod {ns}/{pod_name}: {e}"))?
                    .ok_or_else(|| format!("the caller's Pod {ns}/{pod_name} does not exist"))?;
                if !bound(&pod) {
                    return Err(format!(
                        "the caller's Pod {ns}/{pod_name} is not the one its token is bound to (UID differs)"
                    ));
                }
                std::sync::Arc::new(pod)
            }
        };
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("the caller's Pod {ns}/{pod_name} has no node"))
    }
}

/// Whether `cache` holds a running (not finished) Pod of `account` scheduled on `node`.
fn has_pod_on_node(cache: &reflector::Store<Pod>, account: &NodeAccount, node: &str) -> bool {
    cache
        .find(|p| {
            let spec = p.spec.as_ref();
            let sa = spec
                .and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default");
            let on_node = spec.and_then(|s| s.node_name.as_deref()) == Some(node);
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            p.metadata.namespace.as_deref() == Some(account.namespace.as_str())
                && on_node
                && sa == account.name
                && !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .is_some()
}

impl ExternalAuthenticator for KubeAuthenticator {
    fn authenticate(&self, evidence: BearerEvidence, now: SystemTime) -> ExternalAuthFuture<'_> {
        Box::pin(async move { self.decide(&evidence, now).await })
    }
}

fn escape(s: &str) -> String {
    s.chars().take(128).flat_map(char::escape_default).collect()
}
