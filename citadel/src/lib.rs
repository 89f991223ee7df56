//! Citadel: the certificate authority that issues SPIFFE X.509 identities over Istio's
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` API.
//!
//! Shape (SPIRE style): a request is authenticated ([`authenticate`]: bearer JWT, then client
//! certificate, then node-agent impersonation), the CA builds a [`WorkloadTemplate`] from the
//! proved identity and the CSR's public key only, an [`X509Signer`] signs it, and
//! [`validate_issued`] checks the result before it is audited ([`AuditLog`], fsync'd) and
//! returned. Root material ([`Authority`]) comes from a `cacerts` plug-in directory (Istio's
//! layout or cert-manager's `kubernetes.io/tls` one, [`PluginLayout`]) or a persisted
//! self-signed root, and is swapped atomically when the directory changes.
//!
//! [`client`] holds a CreateCertificate client for tools and tests ([`client::config`],
//! [`client::connect`]) (`rampart ca
//! bench`'s load generator, which lives in the binary); Istio's agents need none of it.

mod audit;
mod authn;
mod authority;
pub mod client;
mod config;
mod error;
mod issue;
mod metrics;
mod refusal;
mod server;
mod signer;
mod tls;

pub use self::{
    audit::{AuditLog, AuditRecord},
    authn::{
        AuthMethod, BearerEvidence, Caller, CallerEvidence, ExternalAuthFuture,
        ExternalAuthenticator, JwksReload, TOKEN_LEEWAY, TokenAuthenticator, authenticate,
        authenticate_with, bearer_token,
    },
    authority::{
        Authority, CA_CERT, CA_KEY, CERT_CHAIN, ChainCertValidity, MaterialSource, PluginFiles,
        PluginLayout, ROOT_CERT, RootInfo, SELF_SIGNED_CERT, SELF_SIGNED_KEY,
        SELF_SIGNED_PREVIOUS_CERT, SELF_SIGNED_ROOT_GRACE, SELF_SIGNED_ROOT_TTL, TLS_CA, TLS_CRT,
        TLS_KEY, load_initial, load_or_create_self_signed, load_plugin, self_signed_rotation_due,
    },
    config::{
        CaConfig, DEFAULT_AUDIENCE, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
        DEFAULT_MAX_HANDSHAKES, DEFAULT_SERVER_DNS_NAME, DEFAULT_SERVER_DNS_NAMES, JwtIssuerConfig,
        NodeAgentGrant, WorkloadPattern,
    },
    error::CitadelError,
    issue::{IssuePolicy, Issued, issue, resolve_ttl},
    metrics::{ConnectionRefusal, Metrics, ReadinessCheck, serve_metrics},
    refusal::Refusal,
    server::{
        CaService, CaState, IMPERSONATED_IDENTITY, PeerInfo, ReloadOutcome, RunningCa,
        SERVING_CERT_TTL, STATE_LOCK_FILE, StateLock, start, start_with_routes, start_with_state,
    },
    signer::{IssuedFacts, SigningCertFacts, WorkloadTemplate, X509Signer, validate_issued},
    tls::{certified_key, provider, server_config},
};

// Revocation (issue #13): persisted revocations and the CRLs made from them.
mod admin;
mod revocation;
pub use self::admin::{
    AdminRequest, AdminResponse, RevocationShare, SHARE_WAIT, ShareReport, ShareState,
    admin_request, admin_socket_path,
};
pub use self::audit::{AUDIT_RETRY, AuditEntry, AuditFailure, parse_rfc3339, read_audit_log};
pub use self::revocation::{
    ADMIN_SOCKET, AppliedRule, CA_CRL, CRL_FILE, CRL_STATE_FILE, DEFAULT_CRL_VALIDITY,
    EXPIRED_ENTRY_GRACE, IdentityRevocation, MAX_RULE_FUTURE, MergeOutcome, PRUNE_AFTER_EXPIRY,
    PUBLISHED_CRLS, PublishedCrls, REVOCATIONS_FILE, RULE_SKEW, RevocationState, Revocations,
    RevokedSerial, RuleMergeOutcome, StoredRevocation, later_not_after, normalize_serial, prunable,
};
pub use self::server::RevocationService;
