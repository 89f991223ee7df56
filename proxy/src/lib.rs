//! The mTLS data-plane proxy (DESIGN §5): inbound listeners in front of a local app, an
//! outbound HTTP proxy and upstream ports for the app's calls, certificates over SDS, Istio
//! policy per connection and per request, Istio-named metrics, and an admin endpoint.
//!
//! - [`mesh`]: the mesh folder (registry, `mesh.yaml`, policy), shared with `rampart up`.
//! - [`run`] with [`ProxyOptions`]: one proxy for one workload of the registry.
//!
//! Fail closed everywhere: no certificate from SDS means every handshake is refused; a
//! folder edit that does not load is refused and the last good configuration keeps serving.

mod admin;
mod conn;
mod error;
mod identity;
mod jwks;
mod listeners;
pub mod mesh;
mod metrics;
mod runtime;
mod sds;

pub use self::{
    error::Error,
    runtime::{ProxyOptions, run},
    sds::{DEFAULT_RESOURCE, ROOT_RESOURCE},
};
