//! Errors of the node agent, named after the condition.

use std::path::PathBuf;

/// What went wrong in the node agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is invalid (names the field and the reason).
    #[error("invalid agent configuration: {field}: {reason}")]
    InvalidConfig {
        /// The flag or field at fault.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// A file could not be read (token, CA root).
    #[error("cannot read {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file that must hold something was empty.
    #[error("{path} is empty")]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },
    /// A Unix socket could not be prepared or bound.
    #[error("cannot listen on {path}: {reason}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Asking an agent's socket as a client (`rampart secrets`) failed.
    #[error("asking {path}: {reason}")]
    SocketClient {
        /// The socket path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The CA could not be reached (connect, TLS handshake, transport).
    #[error("CA at {addr} unreachable: {reason}")]
    CaUnreachable {
        /// The dialled address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The CA answered with an error status (to a CSR or a CRL poll).
    #[error("the CA refused the request: {code}: {message}")]
    CaRefused {
        /// The gRPC status code name.
        code: String,
        /// The CA's message.
        message: String,
    },
    /// The CA answered, but what it returned is not usable; the old certificate is kept.
    #[error("CA response rejected: {0}")]
    BadCaResponse(String),
    /// The CA does not implement the CRL service (`rampart.ca.v1.Revocation`), e.g. istiod.
    #[error("CA at {addr} does not serve CRLs (rampart.ca.v1.Revocation/GetCrls unimplemented)")]
    CrlsUnsupported {
        /// The CA address.
        addr: String,
    },
    /// The bearer token could not be used.
    #[error("token {path}: {reason}")]
    BadToken {
        /// The token file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A certificate or key operation failed.
    #[error(transparent)]
    Certs(#[from] rampart_certs::Error),
    /// Writing the output files failed.
    #[error("cannot write {path}: {source}")]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The metrics listener failed.
    #[error("metrics listener on {addr}: {reason}")]
    Metrics {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
}
