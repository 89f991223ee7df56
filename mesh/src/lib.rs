//! The mesh model every Rampart component reads (DESIGN §6, §8): mesh settings (trust
//! domain, aliases, root namespace, path normalization, the CA's address and TTLs), the
//! workload registry (what Kubernetes would otherwise say: names, service accounts, labels,
//! ports with protocol, addresses), and the validated Istio security policy.
//!
//! - [`MeshFolder`]: one complete, consistent snapshot of the model, or every problem that
//!   refuses it, each naming the file (or object), the field and the reason.
//! - [`ConfigSource`]: where snapshots come from. [`FolderSource`] reads a folder
//!   (`mesh.yaml`, `workloads.yaml`, policy YAML); the Kubernetes API is the next source.
//!   Consumers hold the last good snapshot and keep serving it when a new one is refused.
//!
//! - [`watch`] (feature `watch`): a folder as a stream of snapshots and refusals.
//! - [`kube`]: Kubernetes objects (Pods, Services, `security.istio.io` policy) to a
//!   snapshot, each invalid object refused alone (the watching is in `rampart-k8s`).
//! - [`resources`]: the model as named, versioned resources (what a control plane streams
//!   to proxies) and back.
//! - [`mtls`]: the proxies' `GET /mtls` answer, shared by the proxy that serves it and
//!   `rampart mtls-report` that reads it.
//!
//! Pure model types: no async runtime, no sockets (the watcher is behind its feature).
//! Depends on `rampart-certs` (trust
//! domains, SPIFFE IDs) and `rampart-authz` (policy resources and their validation) only.

mod folder;
pub mod kube;
pub mod mtls;
pub mod resources;
mod source;

pub use self::folder::*;
pub use self::source::{ConfigSource, FolderSource};

/// Watching a folder for new snapshots (feature `watch`: a tokio task and file
/// notifications).
#[cfg(feature = "watch")]
pub mod watch;
