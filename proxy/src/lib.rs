//! The mTLS data-plane proxy (DESIGN §5): inbound listeners in front of a local app, an
//! outbound HTTP proxy and upstream ports for the app's calls, certificates over SDS, Istio
//! policy per connection and per request, Istio-named metrics, and an admin endpoint.
//!
//! - [`run`] with [`ProxyOptions`]: one proxy for one workload of the registry.
//!
//! The mesh model it reads (registry, `mesh.yaml`, policy) comes from `rampart-mesh`.
//!
//! Fail closed everywhere: no certificate from SDS means every handshake is refused; a
//! folder edit that does not load is refused and the last good configuration keeps serving.

// Layers, lowest first (each imports only from the ones above it; `runtime` is wiring
// that no module imports; tests/module_cycles.rs keeps it so):
mod admin;
mod app;
pub mod app_probes;
mod config;
mod conn;
mod control;
mod drain;
mod edge;
mod error;
mod ext_authz;
mod http;
mod identity;
mod inbound;
mod jwks;
mod jwks_http;
mod listeners;
mod metrics;
mod outbound;
mod peers;
mod relay;
mod runtime;
mod sds;
mod sniff;
mod status;

pub use self::{
    control::{ControlPlaneOptions, DEFAULT_CONTROL_PLANE_SAN},
    edge::EdgeLimits,
    error::Error,
    runtime::{Proxy, ProxyOptions, run, run_control_plane},
    sds::{DEFAULT_RESOURCE, ROOT_RESOURCE},
    status::ControlPlaneStatus,
};

/// Entry points for the fuzz targets in `proxy/fuzz` (feature `fuzzing`); not part of the
/// supported API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// The inbound sniff and, for a TLS client, the proxy's mTLS server handshake over
    /// `data` cut into socket reads at `cuts`: `(taken for TLS, handshake completed)`.
    pub fn inbound_first_bytes(data: &[u8], cuts: &[usize]) -> (bool, bool) {
        crate::sniff::inbound_first_bytes(data, cuts)
    }

    /// An external authorization provider's gRPC answer (`CheckResponse` bytes) decoded
    /// and applied as the inbound applies it: `None` when the bytes do not decode, else
    /// whether it allowed. Panics if an answer removed `Host` or produced a status no client
    /// can be given.
    pub fn ext_authz_answer(data: &[u8]) -> Option<bool> {
        crate::ext_authz::fuzz_answer(data)
    }
}
