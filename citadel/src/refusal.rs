//! Why a CreateCertificate request was refused. Every refusal maps to one gRPC status whose
//! message names the reason, and to one metric label; nothing is issued.

/// A refused request. The `Display` text is the gRPC status message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// No bearer token and no client certificate: nothing proves who the caller is.
    #[error("unauthenticated: no bearer token and no client certificate")]
    NoCredentials,
    /// The `authorization` header is not `Bearer <token>`.
    #[error("unauthenticated: malformed authorization header: {0}")]
    MalformedAuthorization(String),
    /// The bearer token's issuer is not configured.
    #[error("unauthenticated: token from unknown issuer {0:?}")]
    UnknownIssuer(String),
    /// The bearer token has expired.
    #[error("unauthenticated: token expired")]
    TokenExpired,
    /// The bearer token is not valid yet (`nbf` / `iat` in the future).
    #[error("unauthenticated: token not valid yet")]
    TokenNotYetValid,
    /// The bearer token is not for audience `istio-ca`.
    #[error("unauthenticated: token audience does not include {0:?}")]
    WrongAudience(String),
    /// The bearer token is otherwise invalid (bad signature, bad encoding, unknown key).
    #[error("unauthenticated: invalid token: {0}")]
    InvalidToken(String),
    /// The token verified but names no Kubernetes service account.
    #[error("unauthenticated: token has no service account identity: {0}")]
    NoIdentityInToken(String),
    /// The `clusterid` header does not name the cluster this CA serves (Kubernetes mode).
    #[error("unauthenticated: {0}")]
    ClusterIdMismatch(String),
    /// The Kubernetes API did not accept the token (TokenReview), or could not be asked.
    #[error("unauthenticated: token review: {0}")]
    TokenReviewFailed(String),
    /// The client certificate carries no usable SPIFFE ID of our trust domain.
    #[error("unauthenticated: client certificate identity unusable: {0}")]
    BadClientCertificate(String),
    /// The CSR is larger than the configured limit.
    #[error("invalid argument: CSR is {size} bytes, above the limit of {max}")]
    CsrTooLarge {
        /// Size of the CSR.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// The CSR is not PEM or not a CSR.
    #[error("invalid argument: bad CSR PEM: {0}")]
    BadCsrPem(String),
    /// The CSR's self-signature does not verify.
    #[error("invalid argument: CSR signature does not verify")]
    BadCsrSignature,
    /// The CSR uses an unsupported key or signature algorithm.
    #[error("invalid argument: unsupported CSR algorithm: {0}")]
    UnsupportedCsrAlgorithm(String),
    /// The CSR does not ask for exactly one SPIFFE ID URI SAN.
    #[error("invalid argument: CSR SAN: {0}")]
    BadCsrSan(String),
    /// The CSR asks for another identity than the caller proved.
    #[error("permission denied: SAN mismatch: CSR asks for {requested}, caller is {caller}")]
    SanMismatch {
        /// The CSR's SPIFFE ID.
        requested: String,
        /// The caller's proved identity.
        caller: String,
    },
    /// The requested lifetime is above the maximum.
    #[error("invalid argument: TTL too long: requested {requested_secs}s, maximum {max_secs}s")]
    TtlTooLong {
        /// Requested, seconds.
        requested_secs: i64,
        /// Maximum, seconds.
        max_secs: u64,
    },
    /// The requested lifetime is negative.
    #[error("invalid argument: TTL must not be negative: {0}s")]
    NegativeTtl(i64),
    /// The `ImpersonatedIdentity` metadata is malformed.
    #[error("invalid argument: ImpersonatedIdentity: {0}")]
    BadImpersonation(String),
    /// The caller asked to act for another identity but is not an allow-listed node agent.
    #[error("permission denied: {caller} may not impersonate other identities")]
    ImpersonationDenied {
        /// The caller.
        caller: String,
    },
    /// An allow-listed node agent asked for a workload outside the ones it may act for.
    #[error("permission denied: node agent {caller} may not act for {target}")]
    ImpersonationOutOfScope {
        /// The node agent.
        caller: String,
        /// The identity it asked for.
        target: String,
    },
    /// A node agent asked for another node agent's identity: refused whatever its grant says,
    /// so one agent cannot take over another's (wider) grant by renewing with its certificate.
    #[error(
        "permission denied: node agent {caller} may not impersonate {target}, which is itself a node agent"
    )]
    ImpersonationOfNodeAgent {
        /// The node agent that asked.
        caller: String,
        /// The node-agent identity it asked for.
        target: String,
    },
    /// A trusted node agent asked for a service account with no Pod on its node (Kubernetes
    /// node authorization, as istiod's).
    #[error("permission denied: node agent {caller} may not act for {target}: {reason}")]
    NodeAuthorizationDenied {
        /// The node agent.
        caller: String,
        /// The identity it asked for.
        target: String,
        /// Why (names the node, or the failed look-up).
        reason: String,
    },
    /// Too many requests in flight; retry later.
    #[error("resource exhausted: CA at its concurrency limit")]
    Overloaded,
    /// The request did not finish within the per-request deadline.
    #[error("deadline exceeded: request took longer than {0:?}")]
    Deadline(std::time::Duration),
    /// Signing failed inside the CA (e.g. the CA certificate expired).
    #[error("internal: signing failed: {0}")]
    SignFailed(String),
    /// The audit log could not be written, so the certificate is withheld.
    #[error("internal: audit log write failed, certificate withheld: {0}")]
    AuditFailed(String),
}

// === impl Refusal ===

impl Refusal {
    /// The gRPC status code of this refusal.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Refusal::NoCredentials
            | Refusal::MalformedAuthorization(_)
            | Refusal::UnknownIssuer(_)
            | Refusal::TokenExpired
            | Refusal::TokenNotYetValid
            | Refusal::WrongAudience(_)
            | Refusal::InvalidToken(_)
            | Refusal::NoIdentityInToken(_)
            | Refusal::ClusterIdMismatch(_)
            | Refusal::TokenReviewFailed(_)
            | Refusal::BadClientCertificate(_) => Code::Unauthenticated,
            Refusal::CsrTooLarge { .. }
            | Refusal::BadCsrPem(_)
            | Refusal::BadCsrSignature
            | Refusal::UnsupportedCsrAlgorithm(_)
            | Refusal::BadCsrSan(_)
            | Refusal::TtlTooLong { .. }
            | Refusal::NegativeTtl(_)
            | Refusal::BadImpersonation(_) => Code::InvalidArgument,
            Refusal::SanMismatch { .. }
            | Refusal::ImpersonationDenied { .. }
            | Refusal::ImpersonationOutOfScope { .. }
            | Refusal::ImpersonationOfNodeAgent { .. }
            | Refusal::NodeAuthorizationDenied { .. } => Code::PermissionDenied,
            Refusal::Overloaded => Code::ResourceExhausted,
            Refusal::Deadline(_) => Code::DeadlineExceeded,
            Refusal::SignFailed(_) | Refusal::AuditFailed(_) => Code::Internal,
        }
    }

    /// Whether this is an authentication failure (`citadel_server_authentication_failure_count`).
    pub fn is_authentication_failure(&self) -> bool {
        self.code() == tonic::Code::Unauthenticated
    }

    /// The `error` label of `citadel_server_csr_sign_err_count` and
    /// `citadel_server_csr_refusal_count`.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NoCredentials => "no_credentials",
            Refusal::MalformedAuthorization(_) => "malformed_authorization",
            Refusal::UnknownIssuer(_) => "unknown_issuer",
            Refusal::TokenExpired => "token_expired",
            Refusal::TokenNotYetValid => "token_not_yet_valid",
            Refusal::WrongAudience(_) => "wrong_audience",
            Refusal::InvalidToken(_) => "invalid_token",
            Refusal::NoIdentityInToken(_) => "no_identity_in_token",
            Refusal::ClusterIdMismatch(_) => "cluster_id_mismatch",
            Refusal::TokenReviewFailed(_) => "token_review_failed",
            Refusal::BadClientCertificate(_) => "bad_client_certificate",
            Refusal::CsrTooLarge { .. } => "csr_too_large",
            Refusal::BadCsrPem(_) => "csr_bad_pem",
            Refusal::BadCsrSignature => "csr_bad_signature",
            Refusal::UnsupportedCsrAlgorithm(_) => "csr_unsupported_algorithm",
            Refusal::BadCsrSan(_) => "csr_bad_san",
            Refusal::SanMismatch { .. } => "san_mismatch",
            Refusal::TtlTooLong { .. } => "ttl_too_long",
            Refusal::NegativeTtl(_) => "ttl_negative",
            Refusal::BadImpersonation(_) => "bad_impersonation",
            Refusal::ImpersonationDenied { .. } => "impersonation_denied",
            Refusal::ImpersonationOutOfScope { .. } => "impersonation_out_of_scope",
            Refusal::ImpersonationOfNodeAgent { .. } => "impersonation_of_node_agent",
            Refusal::NodeAuthorizationDenied { .. } => "node_authorization_denied",
            Refusal::Overloaded => "overloaded",
            Refusal::Deadline(_) => "deadline",
            Refusal::SignFailed(_) => "sign_failed",
            Refusal::AuditFailed(_) => "audit_failed",
        }
    }

    /// Every label, for pre-registering metric series.
    pub(crate) const LABELS: &'static [&'static str] = &[
        "no_credentials",
        "malformed_authorization",
        "unknown_issuer",
        "token_expired",
        "token_not_yet_valid",
        "wrong_audience",
        "invalid_token",
        "no_identity_in_token",
        "cluster_id_mismatch",
        "token_review_failed",
        "bad_client_certificate",
        "csr_too_large",
        "csr_bad_pem",
        "csr_bad_signature",
        "csr_unsupported_algorithm",
        "csr_bad_san",
        "san_mismatch",
        "ttl_too_long",
        "ttl_negative",
        "bad_impersonation",
        "impersonation_denied",
        "impersonation_out_of_scope",
        "impersonation_of_node_agent",
        "node_authorization_denied",
        "overloaded",
        "deadline",
        "sign_failed",
        "audit_failed",
    ];
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        tonic::Status::new(r.code(), r.to_string())
    }
}
