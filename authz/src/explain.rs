//! Explainable decisions: every verdict names the policy (namespace/name), the rule index and
//! a reason. All types serialize to JSON for `rampart authz check --output json` and logs.

use std::sync::Arc;

use serde::Serialize;

/// A policy, by kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct PolicyRef {
    /// `AuthorizationPolicy`, `RequestAuthentication` or `PeerAuthentication`.
    pub kind: &'static str,
    /// Namespace of the policy.
    pub namespace: String,
    /// Name of the policy.
    pub name: String,
}

impl std::fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl PolicyRef {
    /// `file: document N: Kind ns/name`, or only `Kind ns/name` when the source is already
    /// named after the object (Kubernetes mode): where a warning about this policy points.
    pub(crate) fn located(&self, origin: &crate::model::Origin) -> String {
        let named = format!("{} {self}", self.kind);
        if origin.file == named {
            named
        } else {
            format!("{origin}: {named}")
        }
    }
}

use crate::model::Action;

fn ser_action<S: serde::Serializer>(a: &Action, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(a.as_str())
}

fn ser_opt_action<S: serde::Serializer>(a: &Option<Action>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.serialize_str(a.as_str()),
        None => s.serialize_none(),
    }
}

/// The verdict of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// Let the request through.
    Allow,
    /// Refuse it (HTTP 403 or 401, TCP close).
    Deny,
}

/// Why a decision came out the way it did (stable, machine-readable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReasonCode {
    /// No AuthorizationPolicy (ALLOW) applies to the workload: allowed.
    NoAllowPolicy,
    /// A rule of an ALLOW policy matched.
    AllowMatched,
    /// ALLOW policies apply but none matched (or they have no rules: `spec: {}`).
    NoAllowMatched,
    /// A rule of a DENY policy matched.
    DenyMatched,
    /// A CUSTOM rule matched and the extension provider allowed the request.
    CustomAllowed,
    /// A CUSTOM rule matched and the extension provider denied the request.
    CustomDenied,
    /// A CUSTOM rule matched but its provider is unknown, or several providers are used on one
    /// workload: denied, as Istio fails closed.
    CustomProviderInvalid,
    /// The request carried a JWT that failed verification (401).
    JwtInvalid,
    /// The JWT verified but its audience is not allowed (403).
    JwtAudienceMismatch,
    /// The request path was refused before authorization (400).
    BadPath,
    /// A PeerAuthentication requires mTLS and the connection is plaintext.
    MtlsRequired,
}

/// One matched rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleMatch {
    /// The policy.
    pub policy: Arc<PolicyRef>,
    /// Its action.
    #[serde(serialize_with = "ser_action")]
    pub action: Action,
    /// Index of the matching rule in `spec.rules`.
    pub rule: usize,
}

/// What the dry-run (`istio.io/dry-run: "true"`) policies would have done. Reported, never
/// enforced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DryRun {
    /// Dry-run DENY rule that matched (the shadow DENY engine would deny).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deny: Option<RuleMatch>,
    /// Shadow ALLOW engine result when dry-run ALLOW policies exist: `Allow` with the rule
    /// that matched, or `Deny`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow: Option<ShadowAllow>,
}

/// The shadow ALLOW engine's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShadowAllow {
    /// What the dry-run ALLOW policies alone would decide.
    pub verdict: Verdict,
    /// The dry-run rule that matched, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched: Option<RuleMatch>,
}

/// A header change the proxy applies to the request before forwarding it (JWT outputs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum HeaderMutation {
    /// Set (overwrite) a header.
    Set {
        /// Header name.
        name: String,
        /// Header value.
        value: String,
    },
    /// Remove a header.
    Remove {
        /// Header name.
        name: String,
    },
    /// Remove a query parameter (every occurrence) from the request target: a JWT taken
    /// from `fromParams` (or `access_token`) that is not forwarded.
    RemoveQueryParam {
        /// Parameter name (compared percent-decoded).
        name: String,
    },
}

/// `path_and_query` without the query parameter `name` (every occurrence; names compared
/// percent-decoded, `+` as space, as the token was read); the rest byte for byte, and no
/// `?` left when nothing remains of the query.
pub fn remove_query_param(path_and_query: &str, name: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_string();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| {
            let k = kv.split_once('=').map_or(*kv, |(k, _)| k);
            percent_encoding::percent_decode_str(&k.replace('+', " ")).decode_utf8_lossy() != name
        })
        .collect();
    let mut out = path.to_string();
    if kept.iter().any(|kv| !kv.is_empty()) {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// An explained authorization decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Allow or deny.
    pub decision: Verdict,
    /// HTTP status the proxy answers with: 200 (forward), 401, 403 or 400. On a TCP port a
    /// denial (403) means the connection is closed.
    pub status: u16,
    /// The policy that decided, if a policy did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<Arc<PolicyRef>>,
    /// The action of that policy.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_action"
    )]
    pub action: Option<Action>,
    /// Index of the rule in that policy that matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// Machine-readable reason.
    pub reason_code: ReasonCode,
    /// Human-readable reason.
    pub reason: String,
    /// Matching AUDIT rule, if any (the request should be audited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<RuleMatch>,
    /// What dry-run policies would have done.
    #[serde(skip_serializing_if = "is_empty_dry_run")]
    pub dry_run: DryRun,
    /// The ALLOW/DENY/CUSTOM policies that applied to the workload and were evaluated.
    pub considered: Vec<Arc<PolicyRef>>,
    /// Header changes to apply before forwarding (JWT outputs), only on allow.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMutation>,
    /// The normalized path that policies matched (and that is forwarded), for HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalized_path: Option<String>,
}

fn is_empty_dry_run(d: &DryRun) -> bool {
    d.deny.is_none() && d.allow.is_none()
}

impl Decision {
    /// Whether the request may proceed.
    pub fn is_allowed(&self) -> bool {
        self.decision == Verdict::Allow
    }

    pub(crate) fn new(decision: Verdict, status: u16, code: ReasonCode, reason: String) -> Self {
        Decision {
            decision,
            status,
            policy: None,
            action: None,
            rule: None,
            reason_code: code,
            reason,
            audit: None,
            dry_run: DryRun::default(),
            considered: Vec::new(),
            headers: Vec::new(),
            normalized_path: None,
        }
    }

    pub(crate) fn with_match(mut self, m: &RuleMatch) -> Self {
        self.policy = Some(m.policy.clone());
        self.action = Some(m.action);
        self.rule = Some(m.rule);
        self
    }

    /// A one-line human explanation (`ALLOW 200 ns/name rule 0: reason`).
    pub fn summary(&self) -> String {
        let d = match self.decision {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
        };
        match (&self.policy, self.rule) {
            (Some(p), Some(r)) => format!("{d} {} {p} rule {r}: {}", self.status, self.reason),
            (Some(p), None) => format!("{d} {} {p}: {}", self.status, self.reason),
            _ => format!("{d} {}: {}", self.status, self.reason),
        }
    }
}
