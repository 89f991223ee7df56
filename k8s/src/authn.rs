//! citadel's [`ExternalAuthenticator`] for Kubernetes: TokenReview, the `clusterid` header and
//! node authorization of impersonation, as istiod's CA.

use std::collections::BTreeSet;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
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

/// Judges bearer tokens for the CA in Kubernetes mode.
pub struct KubeAuthenticator {
    client: kube::Client,
    reviewer: TokenReviewer,
    trust_domain: TrustDomain,
    cluster_id: Option<String>,
    trusted_nodes: BTreeSet<NodeAccount>,
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
    pub fn new(
        client: kube::Client,
        reviewer: TokenReviewer,
        trust_domain: TrustDomain,
        cluster_id: Option<String>,
        trusted_nodes: impl IntoIterator<Item = NodeAccount>,
    ) -> Self {
        KubeAuthenticator {
            client,
            reviewer,
            trust_domain,
            cluster_id: cluster_id.filter(|c| !c.is_empty()),
            trusted_nodes: trusted_nodes.into_iter().collect(),
        }
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
        let node = self.caller_node(&reviewed).await.map_err(denied)?;
        self.has_pod_on_node(&target_account, &node)
            .await
            .map_err(denied)?;
        Ok(Caller {
            id: target,
            method: AuthMethod::Impersonation,
            on_behalf_of: Some(proved.id),
        })
    }

    /// The node the caller runs on: the API server's node-name claim, else the node of the
    /// Pod the token is bound to (checked against the bound Pod UID).
    async fn caller_node(&self, reviewed: &ReviewedToken) -> Result<String, String> {
        if let Some(node) = &reviewed.node_name {
            return Ok(node.clone());
        }
        let Some(pod_name) = &reviewed.pod_name else {
            return Err(
                "the caller's token is not bound to a Pod or node, so its node is unknown".into(),
            );
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &reviewed.namespace);
        let pod = pods
            .get_opt(pod_name)
            .await
            .map_err(|e| {
                format!(
                    "looking up the caller's Pod {}/{pod_name}: {e}",
                    reviewed.namespace
                )
            })?
            .ok_or_else(|| {
                format!(
                    "the caller's Pod {}/{pod_name} does not exist",
                    reviewed.namespace
                )
            })?;
        if let Some(uid) = &reviewed.pod_uid
            && pod.metadata.uid.as_deref() != Some(uid.as_str())
        {
            return Err(format!(
                "the caller's Pod {}/{pod_name} is not the one its token is bound to (UID differs)",
                reviewed.namespace
            ));
        }
        pod.spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                format!(
                    "the caller's Pod {}/{pod_name} has no node",
                    reviewed.namespace
                )
            })
    }

    /// Whether a running (not finished) Pod of `account` is scheduled on `node`.
    async fn has_pod_on_node(&self, account: &NodeAccount, node: &str) -> Result<(), String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &account.namespace);
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let list = pods
            .list(&lp)
            .await
            .map_err(|e| format!("listing Pods of {} on node {node}: {e}", account.namespace))?;
        let found = list.items.iter().any(|p| {
            let spec = p.spec.as_ref();
            let sa = spec
                .and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default");
            let on_node = spec.and_then(|s| s.node_name.as_deref()) == Some(node);
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            on_node && sa == account.name && !matches!(phase, Some("Succeeded" | "Failed"))
        });
        if found {
            Ok(())
        } else {
            Err(format!(
                "no Pod of service account {account} on node {node}"
            ))
        }
    }
}

impl ExternalAuthenticator for KubeAuthenticator {
    fn authenticate(&self, evidence: BearerEvidence, now: SystemTime) -> ExternalAuthFuture<'_> {
        Box::pin(async move { self.decide(&evidence, now).await })
    }
}

fn escape(s: &str) -> String {
    s.chars().take(128).flat_map(char::escape_default).collect()
}
