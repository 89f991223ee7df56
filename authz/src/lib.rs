//! Istio PeerAuthentication, RequestAuthentication and AuthorizationPolicy: loading,
//! validation, resolution and explainable decisions. Pure: no sockets, no async runtime.
#![warn(missing_docs)]

mod error;
mod load;
mod model;
mod validate;

mod eval;
mod eval_compile;
mod eval_match;
mod eval_mesh;
mod eval_request;
mod explain;
mod jwt;
mod normalize;
mod resolve;

pub use error::{Error, Problem};
pub use load::{
    LoadResult, SECURITY_GROUP, Skipped, load_path, load_paths, load_str, resource_warnings,
};
pub use model::{
    Action, ApiVersion, AuthorizationPolicy, AuthorizationPolicySpec, ClaimToHeader, Condition,
    DEFAULT_JWKS_TIMEOUT, DEFAULT_NAMESPACE, DRY_RUN_ANNOTATION, ExtensionProvider,
    IGNORED_METADATA_FIELDS, JwtHeader, JwtPresence, JwtRule, Kind, MtlsMode, MutualTls, Object,
    ObjectMeta, Operation, Origin, PeerAuthentication, PeerAuthenticationSpec,
    PolicyTargetReference, RequestAuthentication, RequestAuthenticationSpec, Resource, Rule,
    RuleFrom, RuleTo, Source, WorkloadSelector, parse_duration, parse_go_bool,
};
pub use validate::{
    ENVOY_METADATA_UNSUPPORTED, Finding, ValidationReport, is_path_template, validate,
};

pub use self::{
    eval::{Engine, ExtAuthz, NoExtAuthz},
    eval_mesh::{
        DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN, ExtAuthzBody, ExtAuthzHttp, ExtAuthzKind,
        ExtAuthzProvider, MeshConfig, MeshConfigError, MeshExtensionProvider,
        header_pattern_matches,
    },
    eval_request::{HttpRequest, JwtClaims, Peer, Protocol, RequestContext, Workload},
    explain::{
        Decision, DryRun, HeaderMutation, PolicyRef, ReasonCode, RuleMatch, ShadowAllow, Verdict,
        remove_query_param,
    },
    jwt::{
        AuthnOutcome, CLOCK_SKEW, FileJwksFetcher, JwksCache, JwksFetch, JwksFetcher, JwksSource,
        JwksStatus, NoRemoteJwks, OPENID_CONFIGURATION, OPENID_KEY_PREFIX, openid_discovery_uri,
    },
    normalize::{NormalizedPath, PathNormalization, PathRejected, normalize_path},
    resolve::{EffectiveMtls, MtlsLevel},
};
