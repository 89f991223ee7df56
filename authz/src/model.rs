//! Typed `security.istio.io` resources, exactly as users write them for Istio.
//!
//! Field names are Istio's lowerCamelCase YAML names. Every struct refuses unknown fields, so a
//! typo (`rule:` for `rules:`) is an error instead of a silently different policy. Where Istio's
//! meaning depends on whether a field was written at all, the field is an `Option` (for example
//! `rules` absent vs `rules: []`, `from` absent vs `from: []`, `issuer` absent vs `issuer: ""`);
//! plain string lists whose empty and absent forms mean the same thing are `Vec`s.
//!
//! A YAML `null` for a field (`rules: ~`) counts as absent, as the Kubernetes apiserver treats
//! it; a `null` list item (`rules: [~]`) is an error.
//!
//! The structs only describe shape; [`crate::load_str`] also runs Istio's validation, so a
//! [`Resource`] handed out by the loader is known to be valid.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer};

/// Accepts `null` as "absent" and yields the type's default.
fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// The `security.istio.io` API version a resource was written with. `v1` and `v1beta1` have
/// identical schemas; `v1` is the Kubernetes storage version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ApiVersion {
    /// `security.istio.io/v1`.
    V1,
    /// `security.istio.io/v1beta1`.
    V1beta1,
}

impl ApiVersion {
    /// The full `apiVersion` string, e.g. `security.istio.io/v1`.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V1 => "security.istio.io/v1",
            ApiVersion::V1beta1 => "security.istio.io/v1beta1",
        }
    }

    /// Parses a full `apiVersion` string; `None` for anything but the two supported versions.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "security.istio.io/v1" => Some(ApiVersion::V1),
            "security.istio.io/v1beta1" => Some(ApiVersion::V1beta1),
            _ => None,
        }
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The three resource kinds this crate understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `PeerAuthentication`: inbound mTLS mode.
    PeerAuthentication,
    /// `RequestAuthentication`: JWT verification rules.
    RequestAuthentication,
    /// `AuthorizationPolicy`: access control.
    AuthorizationPolicy,
}

impl Kind {
    /// The Kubernetes `kind` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// Parses a `kind` string (case-sensitive, as Kubernetes); `None` if not one of the three.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "PeerAuthentication" => Some(Kind::PeerAuthentication),
            "RequestAuthentication" => Some(Kind::RequestAuthentication),
            "AuthorizationPolicy" => Some(Kind::AuthorizationPolicy),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a resource came from: the file (or source name given to [`crate::load_str`]) and the
/// 1-based index of the YAML document inside it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin {
    /// File path or source name.
    pub file: String,
    /// 1-based index of the YAML document in the file.
    pub doc_index: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file, self.doc_index)
    }
}

/// Kubernetes object metadata. Only `name`, `namespace`, `labels`, `annotations` and
/// `creationTimestamp` carry meaning here; the loader accepts and drops the other standard
/// fields that `kubectl get -o yaml` prints ([`IGNORED_METADATA_FIELDS`]) so exported objects
/// load unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// `metadata.name` (required by validation).
    #[serde(default)]
    pub name: Option<String>,
    /// `metadata.namespace`; absent means `default` (see [`ObjectMeta::namespace`]).
    #[serde(default)]
    pub namespace: Option<String>,
    /// `metadata.labels`.
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations` (e.g. `istio.io/dry-run: "true"`).
    #[serde(default, deserialize_with = "nullable")]
    pub annotations: BTreeMap<String, String>,
    /// `metadata.creationTimestamp` as written (RFC 3339); decides which of several
    /// PeerAuthentications of one level wins (oldest first). Checked by validation.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

/// Standard Kubernetes metadata fields that are accepted and ignored.
pub const IGNORED_METADATA_FIELDS: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "managedFields",
    "selfLink",
    "finalizers",
    "ownerReferences",
    "generateName",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// The namespace used when `metadata.namespace` is absent (as `kubectl apply` without `-n`).
pub const DEFAULT_NAMESPACE: &str = "default";

impl ObjectMeta {
    /// The name, or `""` when absent (validation refuses that).
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    /// The namespace, or [`DEFAULT_NAMESPACE`] when absent or empty.
    pub fn namespace(&self) -> &str {
        match self.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => ns,
            _ => DEFAULT_NAMESPACE,
        }
    }

    /// `metadata.creationTimestamp` parsed; `None` when absent. (Validation refuses a value that
    /// does not parse, so for a loaded resource `None` really means absent.)
    pub fn creation_time(&self) -> Option<time::OffsetDateTime> {
        let text = self.creation_timestamp.as_deref()?;
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
    }
}

/// A complete `security.istio.io` object: `apiVersion`, `metadata`, `spec`, plus where it was
/// loaded from. The `kind` is given by the spec type (see the aliases below).
#[derive(Debug, Clone, PartialEq)]
pub struct Object<S> {
    /// The `apiVersion` it was written with.
    pub api_version: ApiVersion,
    /// `metadata`.
    pub metadata: ObjectMeta,
    /// `spec`; an absent `spec` is the same as `spec: {}`.
    pub spec: S,
    /// Where it was loaded from.
    pub origin: Origin,
    /// The object as written (a JSON tree; the ignored metadata fields removed): what a
    /// control plane streams to proxies, which load it again with [`crate::load_str`].
    pub document: std::sync::Arc<serde_json::Value>,
}

impl<S> Object<S> {
    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.metadata.name()
    }

    /// Effective namespace (see [`ObjectMeta::namespace`]).
    pub fn namespace(&self) -> &str {
        self.metadata.namespace()
    }
}

impl Object<AuthorizationPolicySpec> {
    /// True when the `istio.io/dry-run` annotation is set to a true value (Go `ParseBool`
    /// spelling). Validation only admits it on ALLOW and DENY policies, with a valid boolean.
    pub fn is_dry_run(&self) -> bool {
        self.metadata
            .annotations
            .get(DRY_RUN_ANNOTATION)
            .and_then(|v| parse_go_bool(v))
            .unwrap_or(false)
    }
}

/// A `PeerAuthentication` object.
pub type PeerAuthentication = Object<PeerAuthenticationSpec>;
/// A `RequestAuthentication` object.
pub type RequestAuthentication = Object<RequestAuthenticationSpec>;
/// An `AuthorizationPolicy` object.
pub type AuthorizationPolicy = Object<AuthorizationPolicySpec>;

/// One loaded and validated resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    /// A PeerAuthentication.
    PeerAuthentication(PeerAuthentication),
    /// A RequestAuthentication.
    RequestAuthentication(RequestAuthentication),
    /// An AuthorizationPolicy.
    AuthorizationPolicy(AuthorizationPolicy),
}

impl Resource {
    /// Which kind this is.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::PeerAuthentication(_) => Kind::PeerAuthentication,
            Resource::RequestAuthentication(_) => Kind::RequestAuthentication,
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    /// The `apiVersion` it was written with.
    pub fn api_version(&self) -> ApiVersion {
        match self {
            Resource::PeerAuthentication(o) => o.api_version,
            Resource::RequestAuthentication(o) => o.api_version,
            Resource::AuthorizationPolicy(o) => o.api_version,
        }
    }

    /// The object as written (see [`Object::document`]).
    pub fn document(&self) -> &std::sync::Arc<serde_json::Value> {
        match self {
            Resource::PeerAuthentication(o) => &o.document,
            Resource::RequestAuthentication(o) => &o.document,
            Resource::AuthorizationPolicy(o) => &o.document,
        }
    }

    /// `metadata`.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::PeerAuthentication(o) => &o.metadata,
            Resource::RequestAuthentication(o) => &o.metadata,
            Resource::AuthorizationPolicy(o) => &o.metadata,
        }
    }

    /// Where it was loaded from.
    pub fn origin(&self) -> &Origin {
        match self {
            Resource::PeerAuthentication(o) => &o.origin,
            Resource::RequestAuthentication(o) => &o.origin,
            Resource::AuthorizationPolicy(o) => &o.origin,
        }
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.metadata().name()
    }

    /// Effective namespace (see [`ObjectMeta::namespace`]).
    pub fn namespace(&self) -> &str {
        self.metadata().namespace()
    }

    /// The PeerAuthentication, if this is one.
    pub fn as_peer_authentication(&self) -> Option<&PeerAuthentication> {
        match self {
            Resource::PeerAuthentication(o) => Some(o),
            _ => None,
        }
    }

    /// The RequestAuthentication, if this is one.
    pub fn as_request_authentication(&self) -> Option<&RequestAuthentication> {
        match self {
            Resource::RequestAuthentication(o) => Some(o),
            _ => None,
        }
    }

    /// The AuthorizationPolicy, if this is one.
    pub fn as_authorization_policy(&self) -> Option<&AuthorizationPolicy> {
        match self {
            Resource::AuthorizationPolicy(o) => Some(o),
            _ => None,
        }
    }
}

// ------------------------------------------------------------------------------------------
// Common types

/// `selector` (istio.type.v1beta1.WorkloadSelector).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// `matchLabels`: every listed label must be present on the workload with an equal value.
    /// Empty (or absent) selects every workload in scope; PeerAuthentication treats it as no
    /// selector at all.
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// True when the selector lists at least one label.
    pub fn has_labels(&self) -> bool {
        !self.match_labels.is_empty()
    }

    /// Subset match: every selector label is on `labels` with the same value.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
    }
}

/// `targetRef` / `targetRefs[]` (istio.type.v1beta1.PolicyTargetReference). Policies with any
/// target reference do not apply to sidecar-style workloads (Istio's attachment rule).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    /// API group; empty or absent means the core group.
    #[serde(default)]
    pub group: Option<String>,
    /// Kind, e.g. `Service`, `Gateway` (required).
    #[serde(default)]
    pub kind: Option<String>,
    /// Name (required).
    #[serde(default)]
    pub name: Option<String>,
    /// Namespace; must not be set (cross-namespace references are refused).
    #[serde(default)]
    pub namespace: Option<String>,
}

// ------------------------------------------------------------------------------------------
// PeerAuthentication

/// `PeerAuthentication.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// `selector`; absent (or without labels) = namespace-wide, or mesh-wide in the root namespace.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// `mtls`; absent = mode UNSET (inherit).
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// `portLevelMtls`: workload (container) port -> mode. Absent vs `{}` is kept apart because
    /// validation refuses `{}`. Keys may be written as YAML integers or decimal strings.
    #[serde(default, deserialize_with = "port_map")]
    pub port_level_mtls: Option<BTreeMap<u32, MutualTls>>,
}

impl PeerAuthenticationSpec {
    /// The top-level mode (`UNSET` when `mtls` or `mtls.mode` is absent).
    pub fn mode(&self) -> MtlsMode {
        self.mtls.as_ref().map(|m| m.mode).unwrap_or_default()
    }
}

/// Reads `portLevelMtls` keys (strings after YAML parsing) as decimal port numbers.
fn port_map<'de, D>(deserializer: D) -> Result<Option<BTreeMap<u32, MutualTls>>, D::Error>
where
    D: Deserializer<'de>,
{
    let Some(raw) = Option::<BTreeMap<String, MutualTls>>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let mut out = BTreeMap::new();
    for (key, value) in raw {
        let port: u32 = key.trim().parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "type conversion error from string to int: port key {key:?} is not a decimal port number"
            ))
        })?;
        if out.insert(port, value).is_some() {
            return Err(serde::de::Error::custom(format!(
                "port {port} is listed more than once"
            )));
        }
    }
    Ok(Some(out))
}

/// `mtls` / a `portLevelMtls` value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    /// `mode`; absent = `UNSET`.
    #[serde(default, deserialize_with = "nullable")]
    pub mode: MtlsMode,
}

/// `mtls.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent level; PERMISSIVE if nothing sets a mode.
    #[default]
    Unset,
    /// Plaintext only; the proxy does not terminate TLS.
    Disable,
    /// Both mTLS and plaintext on the same port.
    Permissive,
    /// mTLS with a client certificate required.
    Strict,
}

impl MtlsMode {
    /// Istio's enum name (`UNSET`, `DISABLE`, `PERMISSIVE`, `STRICT`).
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ------------------------------------------------------------------------------------------
// RequestAuthentication

/// `RequestAuthentication.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    /// `selector`.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// `targetRef` (legacy single reference).
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    /// `targetRefs`.
    #[serde(default)]
    pub target_refs: Option<Vec<PolicyTargetReference>>,
    /// `jwtRules`; absent or empty = no JWT processing.
    #[serde(default)]
    pub jwt_rules: Option<Vec<JwtRule>>,
}

impl RequestAuthenticationSpec {
    /// The JWT rules (empty when absent).
    pub fn rules(&self) -> &[JwtRule] {
        self.jwt_rules.as_deref().unwrap_or(&[])
    }

    /// True if `targetRef` or a non-empty `targetRefs` is set (such policies do not apply to
    /// sidecar-style workloads).
    pub fn has_target_refs(&self) -> bool {
        self.target_ref.is_some() || self.target_refs.as_ref().is_some_and(|t| !t.is_empty())
    }
}

/// One `jwtRules[]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// `issuer`: the expected `iss`. May be omitted only when `jwksUri` is set (then `iss` is
    /// not checked).
    #[serde(default)]
    pub issuer: Option<String>,
    /// `audiences`: accept a token whose `aud` contains any of these; empty = not checked.
    #[serde(default, deserialize_with = "nullable")]
    pub audiences: Vec<String>,
    /// `jwksUri` (also accepted as `jwks_uri`, as Istio's CRD does): where to fetch the JWKS.
    #[serde(default, alias = "jwks_uri")]
    pub jwks_uri: Option<String>,
    /// `jwks`: inline JWKS JSON.
    #[serde(default)]
    pub jwks: Option<String>,
    /// `fromHeaders`: header locations. When none of `fromHeaders`/`fromParams`/`fromCookies`
    /// is set, the defaults are `Authorization: Bearer` and the `access_token` query parameter.
    #[serde(default)]
    pub from_headers: Option<Vec<JwtHeader>>,
    /// `fromParams`: query parameter names.
    #[serde(default)]
    pub from_params: Option<Vec<String>>,
    /// `fromCookies`: cookie names.
    #[serde(default)]
    pub from_cookies: Option<Vec<String>>,
    /// `outputPayloadToHeader`: header to receive the base64url payload on success.
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    /// `outputClaimToHeaders`: copy claims to headers on success.
    #[serde(default, deserialize_with = "nullable")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// `forwardOriginalToken`: keep the token header upstream (default false: removed).
    #[serde(default, deserialize_with = "nullable")]
    pub forward_original_token: bool,
    /// `timeout`: JWKS fetch timeout as written (e.g. `5s`); see [`JwtRule::timeout`].
    #[serde(default, rename = "timeout")]
    pub timeout_text: Option<String>,
    /// `spaceDelimitedClaims`: extra claims split on spaces for matching (`scope` and
    /// `permission` always are).
    #[serde(default, deserialize_with = "nullable")]
    pub space_delimited_claims: Vec<String>,
    /// `presence` (newest Istio CRD only; accepted and validated, no effect yet in Istio).
    #[serde(default)]
    pub presence: Option<JwtPresence>,
}

/// Default JWKS fetch timeout when `timeout` is absent.
pub const DEFAULT_JWKS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl JwtRule {
    /// True when the rule names no explicit token location (defaults apply).
    pub fn uses_default_locations(&self) -> bool {
        self.from_headers.is_none() && self.from_params.is_none() && self.from_cookies.is_none()
    }

    /// The JWKS fetch timeout: `timeout` parsed, or [`DEFAULT_JWKS_TIMEOUT`] when absent.
    /// (Validation refuses a value that does not parse.)
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout_text
            .as_deref()
            .and_then(|t| parse_duration(t).ok())
            .unwrap_or(DEFAULT_JWKS_TIMEOUT)
    }
}

/// Parses a duration as Istio accepts it: Go `time.ParseDuration` syntax (`5s`, `1.5s`,
/// `300ms`, `1m30s`, `2h`; units `ns`, `us`, `µs`, `ms`, `s`, `m`, `h`). Negative durations are
/// refused.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("invalid duration {text:?}");
    let mut s = text;
    if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    } else if s.starts_with('-') {
        return Err(format!("negative duration {text:?}"));
    }
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        let num_end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, rest) = s.split_at(num_end);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(bad());
        }
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let (unit, rest) = rest.split_at(unit_end);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad()),
        };
        let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| bad())?
        };
        let mut frac_ns: u128 = 0;
        let mut div: u128 = 1;
        for c in frac_part.chars().take(18) {
            frac_ns = frac_ns * 10 + u128::from(c.to_digit(10).ok_or_else(bad)?);
            div *= 10;
        }
        total = total
            .checked_add(int.checked_mul(scale).ok_or_else(bad)?)
            .and_then(|t| t.checked_add(frac_ns * scale / div))
            .ok_or_else(bad)?;
        s = rest;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| bad())?;
    let nanos = u32::try_from(total % 1_000_000_000).map_err(|_| bad())?;
    Ok(std::time::Duration::new(secs, nanos))
}

/// `jwtRules[].presence`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JwtPresence {
    /// A token is optional.
    Optional,
    /// A token is required.
    Required,
}

/// `fromHeaders[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    /// `name`: header name (required, non-empty).
    #[serde(default)]
    pub name: Option<String>,
    /// `prefix`: the value must start with exactly this (e.g. `"Bearer "`); it is stripped.
    #[serde(default, deserialize_with = "nullable")]
    pub prefix: String,
}

/// `outputClaimToHeaders[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    /// `header`: header to set (required, `^[-_A-Za-z0-9]+$`).
    #[serde(default)]
    pub header: Option<String>,
    /// `claim`: claim to copy (required; nested claims with `.`).
    #[serde(default)]
    pub claim: Option<String>,
}

// ------------------------------------------------------------------------------------------
// AuthorizationPolicy

/// `AuthorizationPolicy.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// `selector`.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// `targetRef` (legacy single reference).
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    /// `targetRefs`.
    #[serde(default)]
    pub target_refs: Option<Vec<PolicyTargetReference>>,
    /// `rules`. Absent and `[]` mean the same in Istio (no rule: the policy never matches, so
    /// an ALLOW policy without rules allows nothing); `[{}]` is one rule that matches
    /// everything. Kept as written for explanations.
    #[serde(default)]
    pub rules: Option<Vec<Rule>>,
    /// `action`; absent = ALLOW (see [`AuthorizationPolicySpec::action`]).
    #[serde(default)]
    pub action: Option<Action>,
    /// `provider` (only with `action: CUSTOM`).
    #[serde(default)]
    pub provider: Option<ExtensionProvider>,
}

impl AuthorizationPolicySpec {
    /// The action, ALLOW when absent.
    pub fn action(&self) -> Action {
        self.action.unwrap_or_default()
    }

    /// The rules (empty when absent).
    pub fn rules(&self) -> &[Rule] {
        self.rules.as_deref().unwrap_or(&[])
    }

    /// True if `targetRef` or a non-empty `targetRefs` is set (such policies do not apply to
    /// sidecar-style workloads).
    pub fn has_target_refs(&self) -> bool {
        self.target_ref.is_some() || self.target_refs.as_ref().is_some_and(|t| !t.is_empty())
    }
}

/// `action`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Allow matching requests (the default).
    #[default]
    Allow,
    /// Deny matching requests.
    Deny,
    /// Mark matching requests for auditing; never changes the decision.
    Audit,
    /// Delegate matching requests to an extension provider.
    Custom,
}

impl Action {
    /// Istio's enum name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `provider` (for `action: CUSTOM`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    /// `name` of a mesh extension provider (required, non-empty).
    #[serde(default)]
    pub name: Option<String>,
}

/// `rules[]`. A rule matches when `from` (if present) has a matching entry, `to` (if present)
/// has a matching entry and every `when` condition matches; `{}` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// `from`; absent = any source. `[]` is refused by validation.
    #[serde(default)]
    pub from: Option<Vec<RuleFrom>>,
    /// `to`; absent = any operation. `[]` is refused by validation.
    #[serde(default)]
    pub to: Option<Vec<RuleTo>>,
    /// `when`; absent or empty = no conditions.
    #[serde(default, deserialize_with = "nullable")]
    pub when: Vec<Condition>,
}

/// `from[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    /// `source` (required and non-empty after validation).
    #[serde(default)]
    pub source: Option<Source>,
}

/// `to[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    /// `operation` (required and non-empty after validation).
    #[serde(default)]
    pub operation: Option<Operation>,
}

/// `source`: peer attributes. Set fields are ANDed; values of one field are ORed. An empty list
/// is the same as an absent one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// `principals` (peer SPIFFE ID without `spiffe://`).
    #[serde(default, deserialize_with = "nullable")]
    pub principals: Vec<String>,
    /// `notPrincipals`.
    #[serde(default, deserialize_with = "nullable")]
    pub not_principals: Vec<String>,
    /// `requestPrincipals` (`<iss>/<sub>` of the JWT).
    #[serde(default, deserialize_with = "nullable")]
    pub request_principals: Vec<String>,
    /// `notRequestPrincipals`.
    #[serde(default, deserialize_with = "nullable")]
    pub not_request_principals: Vec<String>,
    /// `namespaces` (namespace of the peer identity).
    #[serde(default, deserialize_with = "nullable")]
    pub namespaces: Vec<String>,
    /// `notNamespaces`.
    #[serde(default, deserialize_with = "nullable")]
    pub not_namespaces: Vec<String>,
    /// `ipBlocks` (downstream peer IP, IP or CIDR).
    #[serde(default, deserialize_with = "nullable")]
    pub ip_blocks: Vec<String>,
    /// `notIpBlocks`.
    #[serde(default, deserialize_with = "nullable")]
    pub not_ip_blocks: Vec<String>,
    /// `remoteIpBlocks` (original client IP, IP or CIDR).
    #[serde(default, deserialize_with = "nullable")]
    pub remote_ip_blocks: Vec<String>,
    /// `notRemoteIpBlocks`.
    #[serde(default, deserialize_with = "nullable")]
    pub not_remote_ip_blocks: Vec<String>,
    /// `serviceAccounts` (`sa` or `ns/sa`).
    #[serde(default, deserialize_with = "nullable")]
    pub service_accounts: Vec<String>,
    /// `notServiceAccounts`.
    #[serde(default, deserialize_with = "nullable")]
    pub not_service_accounts: Vec<String>,
    /// `trustDomains` (trust domain of the peer identity).
    #[serde(default, deserialize_with = "nullable")]
    pub trust_domains: Vec<String>,
    /// `notTrustDomains`.
    #[serde(default, deserialize_with = "nullable")]
    pub not_trust_domains: Vec<String>,
}

impl Source {
    /// True when no field has a value (validation refuses such a source).
    pub fn is_empty(&self) -> bool {
        self.fields().iter().all(|(_, v)| v.is_empty())
    }

    /// Every field with its YAML name, in declaration order.
    pub fn fields(&self) -> [(&'static str, &[String]); 14] {
        [
            ("principals", &self.principals),
            ("notPrincipals", &self.not_principals),
            ("requestPrincipals", &self.request_principals),
            ("notRequestPrincipals", &self.not_request_principals),
            ("namespaces", &self.namespaces),
            ("notNamespaces", &self.not_namespaces),
            ("ipBlocks", &self.ip_blocks),
            ("notIpBlocks", &self.not_ip_blocks),
            ("remoteIpBlocks", &self.remote_ip_blocks),
            ("notRemoteIpBlocks", &self.not_remote_ip_blocks),
            ("serviceAccounts", &self.service_accounts),
            ("notServiceAccounts", &self.not_service_accounts),
            ("trustDomains", &self.trust_domains),
            ("notTrustDomains", &self.not_trust_domains),
        ]
    }
}

/// `operation`: request attributes. Set fields are ANDed; values of one field are ORed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// `hosts` (`:authority`, case-insensitive). HTTP only.
    #[serde(default, deserialize_with = "nullable")]
    pub hosts: Vec<String>,
    /// `notHosts`.
    #[serde(default, deserialize_with = "nullable")]
    pub not_hosts: Vec<String>,
    /// `ports` (destination port, decimal strings).
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<String>,
    /// `notPorts`.
    #[serde(default, deserialize_with = "nullable")]
    pub not_ports: Vec<String>,
    /// `methods`. HTTP only.
    #[serde(default, deserialize_with = "nullable")]
    pub methods: Vec<String>,
    /// `notMethods`.
    #[serde(default, deserialize_with = "nullable")]
    pub not_methods: Vec<String>,
    /// `paths` (normalized path without query; exact/prefix/suffix/presence or a `{*}`/`{**}`
    /// template). HTTP only.
    #[serde(default, deserialize_with = "nullable")]
    pub paths: Vec<String>,
    /// `notPaths`.
    #[serde(default, deserialize_with = "nullable")]
    pub not_paths: Vec<String>,
}

impl Operation {
    /// True when no field has a value (validation refuses such an operation).
    pub fn is_empty(&self) -> bool {
        self.fields().iter().all(|(_, v)| v.is_empty())
    }

    /// Every field with its YAML name, in declaration order.
    pub fn fields(&self) -> [(&'static str, &[String]); 8] {
        [
            ("hosts", &self.hosts),
            ("notHosts", &self.not_hosts),
            ("ports", &self.ports),
            ("notPorts", &self.not_ports),
            ("methods", &self.methods),
            ("notMethods", &self.not_methods),
            ("paths", &self.paths),
            ("notPaths", &self.not_paths),
        ]
    }
}

/// `when[]`: `values` (any matches) and not any of `notValues`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// `key`, e.g. `request.headers[x-foo]`, `source.ip` (required).
    #[serde(default)]
    pub key: Option<String>,
    /// `values`.
    #[serde(default, deserialize_with = "nullable")]
    pub values: Vec<String>,
    /// `notValues`.
    #[serde(default, deserialize_with = "nullable")]
    pub not_values: Vec<String>,
}

impl Condition {
    /// The key (`""` when absent; validation refuses that).
    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or("")
    }
}

/// The annotation that turns an ALLOW/DENY AuthorizationPolicy into a shadow (dry-run) policy.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Parses the dry-run annotation value as Go's `strconv.ParseBool` does.
pub fn parse_go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_go_does() {
        let ms = std::time::Duration::from_millis;
        assert_eq!(parse_duration("5s"), Ok(ms(5000)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        assert_eq!(
            parse_duration("0.0005s"),
            Ok(std::time::Duration::from_micros(500))
        );
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration("300ms"), Ok(ms(300)));
        assert_eq!(parse_duration("0"), Ok(ms(0)));
        for bad in ["", "apple", "5", "s", "-1s", "1.2.3s", "5 s", ".s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
