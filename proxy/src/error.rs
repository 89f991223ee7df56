//! Errors of the proxy crate.

/// Why the proxy could not start or a piece of it failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The mesh folder has problems (each names file and field).
    #[error("mesh folder refused:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    MeshFolder(Vec<rampart_mesh::Problem>),
    /// The workload named on the command line is not in the registry.
    #[error("workload {0} is not in workloads.yaml")]
    UnknownWorkload(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Which listener.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The folder watcher could not start.
    #[error("cannot watch the mesh folder: {0}")]
    Watch(String),
}
