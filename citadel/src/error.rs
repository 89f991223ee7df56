//! Errors of the CA outside the request path (start-up, root material, reload, audit).
//! Refusals of individual requests are [`crate::Refusal`]s.

use std::path::PathBuf;

/// Why the CA could not start, load root material or keep its audit log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CitadelError {
    /// A plug-in `cacerts` directory exists but lacks a required file.
    #[error("cacerts directory {}: missing {file}", dir.display())]
    CacertsIncomplete {
        /// The directory.
        dir: PathBuf,
        /// The file that is missing (`ca-cert.pem`, `ca-key.pem` or `root-cert.pem`; `tls.key`
        /// or `ca.crt` in the `kubernetes.io/tls` layout).
        file: &'static str,
    },
    /// A file of the root material could not be used.
    #[error("{}: {reason}", path.display())]
    InvalidMaterial {
        /// The file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// The root material parsed, but issuing and verifying a probe certificate with it failed:
    /// the signing certificate does not chain to any served root (`root-cert.pem`, `ca.crt`),
    /// or is expired.
    #[error("root material in {} does not work: {reason}", dir.display())]
    MaterialSelfTest {
        /// The directory holding the material.
        dir: PathBuf,
        /// What the probe issuance or verification said.
        reason: String,
    },
    /// Reading or writing a file or directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A certificate operation failed.
    #[error(transparent)]
    Certs(#[from] rampart_certs::Error),
    /// Building the TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A configuration value was invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The JWKS file of a token issuer could not be used.
    #[error("JWKS for issuer {issuer:?} ({}): {reason}", path.display())]
    Jwks {
        /// The issuer.
        issuer: String,
        /// The JWKS file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Binding or serving a socket failed.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The audit log could not be written; nothing is issued while this persists.
    #[error("audit log {}: {reason}", path.display())]
    Audit {
        /// The audit log file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl CitadelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CitadelError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        CitadelError::InvalidMaterial {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
