//! Kubernetes mode for the CA (issue #14, DESIGN §6): the contracts istiod's CA meets, on
//! kube-rs.
//!
//! - [`TokenReviewer`]: bearer tokens checked by the API server's TokenReview (audience
//!   `istio-ca` by default), cached until the token's `exp`, bounded.
//! - [`KubeAuthenticator`]: citadel's [`rampart_citadel::ExternalAuthenticator`] seam: the
//!   `clusterid` header, the identity `system:serviceaccount:<ns>:<sa>` as a SPIFFE ID, and node
//!   authorization of `ImpersonatedIdentity` as istiod's (trusted node accounts only, and only
//!   for service accounts with a Pod on the caller's node, read from a reflector cache of Pods).
//! - [`material`]: the CA's keys from Secret `cacerts` (plug-in, watched) or
//!   `istio-ca-secret` (self-signed, created once; a renewed root certificate written back
//!   by the Lease holder and followed by the other replicas).
//! - [`publish`]: the root bundle in ConfigMap `istio-ca-root-cert` in every namespace,
//!   written by the holder of a `coordination.k8s.io` Lease.
//! - [`revocations`]: every replica's revocations shared through ConfigMap
//!   `rampart-ca-revocations` (set union; each replica merges, persists and re-signs).
//! - [`source`]: policy and registry from the API: watches of `security.istio.io` policy,
//!   Pods, Services and Namespaces as a stream of mesh snapshots ([`KubeConfigSource`]),
//!   invalid objects refused alone (log, metric, Event).
//!
//! Every call goes through a [`kube::Client`], so tests build one over a fake API service
//! (`k8s/tests/support/fake_api.rs`).
//!
//! Layer 2.5 (tests/deps.rs): depends on certs, authz, mesh and citadel; only the `rampart` package
//! depends on it, and citadel knows nothing of Kubernetes.

mod authn;
pub mod injector;
pub mod material;
pub mod publish;

mod review;
pub mod revocations;
pub mod source;

pub use self::authn::{
    DEFAULT_POD_EVENT_GRACE, DEFAULT_POD_SYNC_WAIT, KubeAuthenticator, NodeAccount,
};
pub use self::review::{
    DEFAULT_REVIEW_CACHE, MAX_REVIEW_AGE, ReviewedToken, TokenReviewer, unverified_exp,
};
pub use self::source::{KubeConfigSource, SourceMetrics};
/// The Kubernetes client every part of this crate takes (re-exported so callers need no
/// direct `kube` dependency).
pub use kube::Client as KubeClient;

/// Why Kubernetes mode could not start or load its material.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// No usable client configuration (kubeconfig or in-cluster).
    #[error("kubernetes client configuration: {0}")]
    Config(String),
    /// The API server refused or could not be reached.
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
    /// CA material in a Secret is unusable, or could not be made.
    #[error("CA material: {0}")]
    Material(String),
}

/// Builds a client from `kubeconfig`, or from the environment when `None`: the in-cluster
/// configuration (service-account token and `KUBERNETES_SERVICE_HOST`) in a Pod, else
/// `$KUBECONFIG` / `~/.kube/config`.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, K8sError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| K8sError::Config(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| K8sError::Config(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| K8sError::Config(e.to_string()))?,
    };
    Ok(kube::Client::try_from(config)?)
}
