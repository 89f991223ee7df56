//! RequestAuthentication at request time: token extraction, verification against JWKS,
//! issuer/audience/time checks, and the header outputs, with Istio's (Envoy's) outcomes:
//! no token → no request principal; invalid token → 401; audience not allowed → 403.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rampart_certs::jwt::Jwks;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::eval_request::{HttpRequest, JwtClaims, Workload};
use crate::explain::{HeaderMutation, PolicyRef};
use crate::model::{JwtRule, RequestAuthentication};
use crate::resolve::{SelectorIndex, applies};
use rampart_certs::timestamp::unix_secs as unix;

/// Envoy's default clock skew for `exp`/`nbf` (Istio does not change it).
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Where JWKS documents come from at request time (`jwksUri` rules; inline `jwks` needs no
/// source). [`JwksCache`] is the standard implementation.
pub trait JwksSource {
    /// The current key set for `uri`, or why there is none (then tokens for the rule fail
    /// closed with 401 while requests without a token still pass, as Istio does).
    fn jwks(&self, uri: &str) -> Result<Arc<Jwks>, String>;
}

/// A source with no remote key sets (only inline `jwks` works).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRemoteJwks;

impl JwksSource for NoRemoteJwks {
    fn jwks(&self, uri: &str) -> Result<Arc<Jwks>, String> {
        Err(format!("JWKS {uri} has not been fetched"))
    }
}

/// Fetches a JWKS document. The proxy implements it over HTTP with the rule's timeout;
/// [`FileJwksFetcher`] reads local files for offline checks.
pub trait JwksFetcher {
    /// The body at `uri`, or why it could not be fetched within `timeout`.
    fn fetch(&self, uri: &str, timeout: Duration) -> Result<String, String>;
}

/// Reads `file://` URIs and plain paths, and maps other URIs to files through `overrides`
/// (relative paths resolve against `base_dir`). Never touches the network.
#[derive(Debug, Clone, Default)]
pub struct FileJwksFetcher {
    /// Directory relative paths resolve against.
    pub base_dir: Option<std::path::PathBuf>,
    /// URI → file to read instead.
    pub overrides: BTreeMap<String, std::path::PathBuf>,
}

impl JwksFetcher for FileJwksFetcher {
    fn fetch(&self, uri: &str, _timeout: Duration) -> Result<String, String> {
        // An issuer's OpenID discovery key set may be mapped by the issuer (not by its
        // configuration's URL, which a `jwksUri` could name too).
        let doc = uri.strip_prefix(OPENID_KEY_PREFIX);
        let issuer = doc.and_then(|d| d.strip_suffix(OPENID_CONFIGURATION));
        let mapped = self.overrides.get(uri).or_else(|| {
            let i = issuer?;
            self.overrides
                .get(i)
                .or_else(|| self.overrides.get(&format!("{i}/")))
        });
        let uri = doc.unwrap_or(uri);
        let path: std::path::PathBuf = if let Some(p) = mapped {
            p.clone()
        } else if let Some(p) = uri.strip_prefix("file://") {
            p.into()
        } else if uri.starts_with("http://") || uri.starts_with("https://") {
            return Err("remote JWKS are not fetched here (map it to a local file)".to_string());
        } else {
            uri.into()
        };
        let path = match (&self.base_dir, path.is_relative()) {
            (Some(b), true) => b.join(path),
            _ => path,
        };
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[derive(Debug, Clone, Default)]
struct CacheEntry {
    good: Option<Arc<Jwks>>,
    fetched_at: Option<SystemTime>,
    last_attempt: Option<SystemTime>,
    last_error: Option<String>,
}

/// JWKS cache with last-good-set semantics: a failed refresh keeps the previous key set; a
/// failed *first* fetch leaves no key set, so tokens for that issuer are refused (fail closed)
/// — never an empty set that would look like "no keys to check".
#[derive(Debug, Clone)]
pub struct JwksCache {
    refresh_every: Duration,
    retry_every: Duration,
    entries: HashMap<String, CacheEntry>,
}

/// One JWKS document to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksFetch {
    /// The `jwksUri`; for an issuer found by OpenID discovery, [`OPENID_KEY_PREFIX`] and
    /// its configuration document's URL ([`openid_discovery_uri`]), which names the key
    /// set: a key of its own, so that a `jwksUri` naming that document is another entry.
    pub uri: String,
    /// The rule's `timeout` (default 5s).
    pub timeout: Duration,
    /// `uri` is an OpenID configuration document: fetch it, then the `jwks_uri` it names.
    pub discovery: bool,
}

/// What the key of a key set found by OpenID discovery starts with, before the
/// configuration document's URL (`openid:https://idp.example/.well-known/...`).
pub const OPENID_KEY_PREFIX: &str = "openid:";

/// The path of an issuer's OpenID Provider configuration document (OpenID Connect
/// Discovery 1.0, section 4).
pub const OPENID_CONFIGURATION: &str = "/.well-known/openid-configuration";

/// Where OpenID discovery reads `issuer`'s configuration (`<issuer>` without a trailing
/// `/`, then [`OPENID_CONFIGURATION`]), as Istio does for a jwtRule with neither `jwks`
/// nor `jwksUri`: `None` for an issuer that is not an `http(s)` URL with a host and no
/// query or fragment (such an issuer has no discovery, and its tokens are refused).
pub fn openid_discovery_uri(issuer: &str) -> Option<String> {
    let rest = issuer
        .strip_prefix("https://")
        .or_else(|| issuer.strip_prefix("http://"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty()
        || host.contains('@')
        || issuer.contains(['?', '#'])
        || issuer.bytes().any(|b| b <= b' ' || b == 0x7f)
    {
        return None;
    }
    Some(format!(
        "{}{OPENID_CONFIGURATION}",
        issuer.trim_end_matches('/')
    ))
}

impl JwksCache {
    /// A cache that refreshes good sets every `refresh_every` (Istio/Envoy default: 20 min)
    /// and retries failures every `retry_every`.
    pub fn new(refresh_every: Duration, retry_every: Duration) -> Self {
        JwksCache {
            refresh_every,
            retry_every,
            entries: HashMap::new(),
        }
    }

    /// The URIs of `engine`'s rules that are due for a fetch at `now`.
    pub fn due(&self, engine: &crate::Engine, now: SystemTime) -> Vec<JwksFetch> {
        let mut out: Vec<JwksFetch> = Vec::new();
        for (uri, timeout, discovery) in engine.reqauthn.jwks_uris() {
            let e = self.entries.get(&uri);
            let due = match e {
                None => true,
                Some(e) => {
                    let every = if e.last_error.is_some() {
                        self.retry_every
                    } else {
                        self.refresh_every
                    };
                    e.last_attempt
                        .and_then(|t| now.duration_since(t).ok())
                        .is_none_or(|age| age >= every)
                }
            };
            if due && !out.iter().any(|f| f.uri == uri) {
                out.push(JwksFetch {
                    uri,
                    timeout,
                    discovery,
                });
            }
        }
        out
    }

    /// Record a fetch result. A body that is not a JWKS with at least one key counts as a
    /// failure. Failures keep the last good set.
    pub fn record(&mut self, uri: &str, result: Result<String, String>, now: SystemTime) {
        let e = self.entries.entry(uri.to_string()).or_default();
        e.last_attempt = Some(now);
        match result.and_then(|body| check_jwks(&body)) {
            Ok(set) => {
                e.good = Some(Arc::new(set));
                e.fetched_at = Some(now);
                e.last_error = None;
            }
            Err(why) => e.last_error = Some(why),
        }
    }

    /// Fetch everything due with `fetcher` (synchronously) and record the results.
    pub fn refresh(&mut self, engine: &crate::Engine, fetcher: &dyn JwksFetcher, now: SystemTime) {
        for f in self.due(engine, now) {
            let r = fetcher.fetch(&f.uri, f.timeout);
            self.record(&f.uri, r, now);
        }
    }

    /// The last error for `uri`, if its latest fetch failed.
    pub fn last_error(&self, uri: &str) -> Option<&str> {
        self.entries.get(uri)?.last_error.as_deref()
    }

    /// What the cache knows about `uri` (for status pages), or `None` if it was never
    /// fetched. Carries key ids and counts only, never key material.
    pub fn status(&self, uri: &str) -> Option<JwksStatus> {
        let e = self.entries.get(uri)?;
        Some(JwksStatus {
            fetched_at: e.fetched_at,
            last_attempt: e.last_attempt,
            last_error: e.last_error.clone(),
            keys: e.good.as_ref().map_or(0, |g| g.keys().len()),
            kids: e
                .good
                .as_ref()
                .map(|g| {
                    g.keys()
                        .iter()
                        .filter_map(|k| k.kid().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// Forget every URI for which `keep` is false (no longer referenced by any rule).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.entries.retain(|uri, _| keep(uri));
    }
}

/// The state of one cached `jwksUri` ([`JwksCache::status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JwksStatus {
    /// When the key set in use was fetched (the last successful fetch).
    pub fetched_at: Option<SystemTime>,
    /// When the latest fetch (successful or not) finished.
    pub last_attempt: Option<SystemTime>,
    /// Why the latest fetch failed, if it did (the last good set, if any, keeps serving).
    pub last_error: Option<String>,
    /// Number of usable keys in the set in use (0: none, tokens are refused).
    pub keys: usize,
    /// The `kid`s of those keys (keys without one are counted but not listed).
    pub kids: Vec<String>,
}

impl Default for JwksCache {
    fn default() -> Self {
        JwksCache::new(Duration::from_secs(20 * 60), Duration::from_secs(1))
    }
}

impl JwksSource for JwksCache {
    fn jwks(&self, uri: &str) -> Result<Arc<Jwks>, String> {
        match self.entries.get(uri) {
            Some(CacheEntry { good: Some(g), .. }) => Ok(g.clone()),
            Some(CacheEntry {
                last_error: Some(e),
                ..
            }) => Err(format!("JWKS {uri} unavailable: {e}")),
            _ => Err(format!("JWKS {uri} has not been fetched")),
        }
    }
}

/// Parse a JWKS document (or PEM public keys); it must hold at least one usable key.
pub(crate) fn check_jwks(body: &str) -> Result<Jwks, String> {
    let set = Jwks::parse(body).map_err(|e| format!("not a usable JWKS: {e}"))?;
    if set.keys().is_empty() {
        return Err("JWKS has no usable key".into());
    }
    Ok(set)
}

// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Header { name: String, prefix: String },
    Param(String),
    Cookie(String),
}

#[derive(Debug, Clone)]
enum Keys {
    Inline(Result<Arc<Jwks>, String>),
    Uri(String),
    /// OpenID discovery: the issuer's configuration document, which names the key set.
    Discovery(String),
}

#[derive(Debug, Clone)]
struct CompiledJwtRule {
    policy: PolicyRef,
    issuer: Option<String>,
    audiences: Vec<String>,
    keys: Keys,
    timeout: Duration,
    locations: Vec<Location>,
    output_payload_to_header: Option<String>,
    claim_to_headers: Vec<(String, String)>,
    forward_original_token: bool,
    space_delimited: Vec<String>,
}

#[derive(Debug)]
struct CompiledReqAuthn {
    policy: PolicyRef,
    selector: BTreeMap<String, String>,
    has_target_refs: bool,
    rules: Vec<CompiledJwtRule>,
}

/// All RequestAuthentications, indexed like AuthorizationPolicies.
#[derive(Debug, Default)]
pub(crate) struct ReqAuthnSet {
    policies: Vec<CompiledReqAuthn>,
    index: SelectorIndex,
}

fn compile_rule(
    policy: &PolicyRef,
    at: &str,
    r: &JwtRule,
    warnings: &mut Vec<String>,
) -> CompiledJwtRule {
    let mut locations = Vec::new();
    if r.uses_default_locations() {
        locations.push(Location::Header {
            name: "authorization".into(),
            prefix: "Bearer ".into(),
        });
        locations.push(Location::Param("access_token".into()));
    } else {
        for h in r.from_headers.iter().flatten() {
            locations.push(Location::Header {
                name: h.name.clone().unwrap_or_default().to_ascii_lowercase(),
                prefix: h.prefix.clone(),
            });
        }
        for p in r.from_params.iter().flatten() {
            locations.push(Location::Param(p.clone()));
        }
        for c in r.from_cookies.iter().flatten() {
            locations.push(Location::Cookie(c.clone()));
        }
    }
    let keys = match (&r.jwks, &r.jwks_uri) {
        (Some(inline), _) if !inline.is_empty() => Keys::Inline(
            check_jwks(inline)
                .map(Arc::new)
                .inspect_err(|e| warnings.push(format!("{at}: inline jwks: {e}"))),
        ),
        (_, Some(uri)) if !uri.is_empty() => Keys::Uri(uri.clone()),
        _ => match r.issuer.as_deref().and_then(openid_discovery_uri) {
            // Istio finds the key set through the issuer's OpenID configuration.
            Some(doc) => Keys::Discovery(format!("{OPENID_KEY_PREFIX}{doc}")),
            None => {
                warnings.push(format!(
                    "{at}: issuer {:?} has neither jwks nor jwksUri and is not an http(s) \
                     URL for OpenID discovery; its tokens are refused",
                    r.issuer.as_deref().unwrap_or("")
                ));
                Keys::Inline(Err(
                    "no jwks or jwksUri configured, and the issuer is not an http(s) URL for \
                     OpenID discovery"
                        .into(),
                ))
            }
        },
    };
    let mut space_delimited = vec!["scope".to_string(), "permission".to_string()];
    space_delimited.extend(r.space_delimited_claims.iter().cloned());
    CompiledJwtRule {
        policy: policy.clone(),
        issuer: r.issuer.clone().filter(|s| !s.is_empty()),
        audiences: r.audiences.clone(),
        keys,
        timeout: r.timeout(),
        locations,
        output_payload_to_header: r.output_payload_to_header.clone().filter(|s| !s.is_empty()),
        claim_to_headers: r
            .output_claim_to_headers
            .iter()
            .filter_map(|c| Some((c.header.clone()?, c.claim.clone()?)))
            .collect(),
        forward_original_token: r.forward_original_token,
        space_delimited,
    }
}

impl ReqAuthnSet {
    pub(crate) fn new(mut list: Vec<RequestAuthentication>, warnings: &mut Vec<String>) -> Self {
        list.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
        let mut set = ReqAuthnSet::default();
        for p in list {
            if p.spec.has_target_refs() {
                continue;
            }
            let policy = PolicyRef {
                kind: "RequestAuthentication",
                namespace: p.namespace().to_string(),
                name: p.name().to_string(),
            };
            let at = policy.located(&p.origin);
            let rules = p
                .spec
                .rules()
                .iter()
                .map(|r| compile_rule(&policy, &at, r, warnings))
                .collect();
            let selector = p
                .spec
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone())
                .unwrap_or_default();
            set.index
                .insert(set.policies.len(), &policy.namespace, &selector);
            set.policies.push(CompiledReqAuthn {
                policy,
                selector,
                has_target_refs: false,
                rules,
            });
        }
        set
    }

    /// Each remote key set: (URI, timeout, whether the URI is an OpenID configuration).
    pub(crate) fn jwks_uris(&self) -> Vec<(String, Duration, bool)> {
        self.policies
            .iter()
            .flat_map(|p| p.rules.iter())
            .filter_map(|r| match &r.keys {
                Keys::Uri(u) => Some((u.clone(), r.timeout, false)),
                Keys::Discovery(u) => Some((u.clone(), r.timeout, true)),
                Keys::Inline(_) => None,
            })
            .collect()
    }

    /// The output headers of every jwtRule applying to `w` (lowercased, deduplicated).
    pub(crate) fn output_headers(&self, root_ns: &str, w: &Workload) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in self.rules_for(root_ns, w) {
            let names = r
                .output_payload_to_header
                .iter()
                .chain(r.claim_to_headers.iter().map(|(h, _)| h));
            for h in names {
                let h = h.to_ascii_lowercase();
                if !out.contains(&h) {
                    out.push(h);
                }
            }
        }
        out
    }

    /// The jwtRules of every RequestAuthentication selecting `w`, merged and sorted by issuer.
    fn rules_for(&self, root_ns: &str, w: &Workload) -> Vec<&CompiledJwtRule> {
        let mut ids = Vec::new();
        self.index.candidates(root_ns, w, &mut ids);
        let mut rules: Vec<&CompiledJwtRule> = ids
            .into_iter()
            .map(|i| &self.policies[i])
            .filter(|p| {
                applies(
                    &p.policy.namespace,
                    &p.selector,
                    p.has_target_refs,
                    root_ns,
                    w,
                )
            })
            .flat_map(|p| p.rules.iter())
            .collect();
        rules.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        rules
    }
}

/// The result of request authentication.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AuthnOutcome {
    /// No token in any configured location (or no RequestAuthentication applies, or a CORS
    /// preflight): the request passes with no request principal.
    NoToken,
    /// Every token in the accepting rule's locations verified (other rules' locations are
    /// not looked at once one rule accepts, as with Envoy).
    Authenticated {
        /// `<iss>/<sub>`, if both claims are strings.
        principal: Option<String>,
        /// The verified claims (space-delimited claims split), for authorization.
        claims: JwtClaims,
        /// The RequestAuthentication whose rule verified the token.
        policy: PolicyRef,
        /// Header changes before forwarding (outputs, token removal).
        headers: Vec<HeaderMutation>,
    },
    /// A token is present but invalid: 401; or its audience is not allowed: 403.
    Rejected {
        /// 401 or 403.
        status: u16,
        /// Envoy-style reason (`Jwt is expired`, `Jwt verification fails`, ...).
        reason: String,
        /// The RequestAuthentication involved, if one was.
        policy: Option<PolicyRef>,
    },
}

impl AuthnOutcome {
    /// The verified claims, when authenticated.
    pub fn claims(&self) -> Option<&JwtClaims> {
        match self {
            AuthnOutcome::Authenticated { claims, .. } => Some(claims),
            _ => None,
        }
    }
}

fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

fn query_params(path: &str) -> Vec<(String, String)> {
    let Some(q) = path.split_once('?').map(|(_, q)| q) else {
        return Vec::new();
    };
    let q = q.split('#').next().unwrap_or("");
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

fn cookies(req: &HttpRequest) -> Vec<(String, String)> {
    req.headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("cookie"))
        .flat_map(|(_, v)| v.split(';'))
        .filter_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        })
        .collect()
}

/// The tokens present in `loc`.
fn extract(loc: &Location, req: &HttpRequest) -> Vec<String> {
    match loc {
        Location::Header { name, prefix } => req
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .filter_map(|(_, v)| {
                let t = if prefix.is_empty() {
                    v.trim()
                } else {
                    // As Envoy's extractor: the prefix anywhere in the value (`Basic x, Bearer
                    // <jwt>` carries a token), then the run of token characters after it.
                    let after = &v[v.find(prefix.as_str())? + prefix.len()..];
                    let is_jwt_char =
                        |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=');
                    let start = after.find(is_jwt_char)?;
                    let rest = &after[start..];
                    &rest[..rest.find(|c: char| !is_jwt_char(c)).unwrap_or(rest.len())]
                };
                (!t.is_empty()).then(|| t.to_string())
            })
            .collect(),
        Location::Param(p) => query_params(&req.path)
            .into_iter()
            .filter(|(k, v)| k == p && !v.is_empty())
            .map(|(_, v)| v)
            .collect(),
        Location::Cookie(c) => cookies(req)
            .into_iter()
            .filter(|(k, v)| k == c && !v.is_empty())
            .map(|(_, v)| v)
            .collect(),
    }
}

fn reject(status: u16, reason: impl Into<String>, policy: Option<&PolicyRef>) -> Box<AuthnOutcome> {
    Box::new(AuthnOutcome::Rejected {
        status,
        reason: reason.into(),
        policy: policy.cloned(),
    })
}

fn claim_to_header_value(claims: &Map<String, Value>, claim: &str) -> Option<String> {
    let mut parts = claim.split('.');
    let mut v = claims.get(parts.next()?)?;
    for p in parts {
        v = v.as_object()?.get(p)?;
    }
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        // A list or an object: its JSON, base64 (standard, padded), as Envoy 1.40 writes it.
        Value::Array(_) | Value::Object(_) => {
            Some(base64::engine::general_purpose::STANDARD.encode(v.to_string()))
        }
        Value::Null => None,
    }
}

/// An audience as Envoy compares it: without a leading `http://` or `https://` and a
/// trailing `/` (`https://api.example.com/` is the audience `api.example.com`).
fn audience_key(a: &str) -> &str {
    let a = a
        .strip_prefix("https://")
        .or_else(|| a.strip_prefix("http://"))
        .unwrap_or(a);
    a.strip_suffix('/').unwrap_or(a)
}

/// A token parsed as Envoy's jwt_verify_lib parses it, before any rule looks at it.
struct Parsed {
    claims: Map<String, Value>,
    iss: String,
    nbf: u64,
    exp: u64,
    audiences: Vec<String>,
}

/// The algorithms jwt_verify_lib knows; another `alg` is refused before any key is looked at.
const ENVOY_ALGS: [&str; 13] = [
    "ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256",
    "PS384", "PS512", "EdDSA",
];

/// Parse `token` in jwt_verify_lib's order, failing with its phrase (the body Envoy answers
/// with): segments, header, `alg`, `kid`, payload, registered claims' types, signature.
fn envoy_parse(token: &str) -> Result<Parsed, &'static str> {
    const BAD_FORMAT: &str =
        "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections";
    // Nothing larger is decoded (the verifier refuses it anyway).
    if token.len() > rampart_certs::jwt::MAX_TOKEN_LEN {
        return Err(BAD_FORMAT);
    }
    let parts: Vec<&str> = token.split('.').filter(|p| !p.is_empty()).collect();
    let [header, payload, signature] = parts[..] else {
        return Err(BAD_FORMAT);
    };
    let header = b64(header).ok_or("Jwt header is an invalid Base64url encoded")?;
    let header: Map<String, Value> =
        serde_json::from_slice(&header).map_err(|_| "Jwt header is an invalid JSON")?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or("Jwt header [alg] field is required and must be a string")?;
    if !ENVOY_ALGS.contains(&alg) {
        return Err("Jwt header [alg] is not supported");
    }
    if header.get("kid").is_some_and(|k| !k.is_string()) {
        return Err("Jwt header [kid] field is not a string");
    }
    let payload = b64(payload).ok_or("Jwt payload is an invalid Base64url encoded")?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&payload).map_err(|_| "Jwt payload is an invalid JSON")?;
    let string = |k: &str, e: &'static str| match claims.get(k) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(e),
    };
    let iss = string("iss", "Jwt payload [iss] field is not a string")?;
    string("sub", "Jwt payload [sub] field is not a string")?;
    // A NumericDate: a number, not negative, below 2^64 (fractions cut, as a cast does).
    let date = |k: &str, wrong: &'static str, range: &'static str| match claims.get(k) {
        None => Ok(0),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if (0.0..18_446_744_073_709_551_615.0).contains(&f) => {
                Ok(n.as_u64().unwrap_or(f as u64))
            }
            _ => Err(range),
        },
        Some(_) => Err(wrong),
    };
    date(
        "iat",
        "Jwt payload [iat] field is not an integer",
        "Jwt payload [iat] field is not a positive 64 bit integer",
    )?;
    let nbf = date(
        "nbf",
        "Jwt payload [nbf] field is not an integer",
        "Jwt payload [nbf] field is not a positive 64 bit integer",
    )?;
    let exp = date(
        "exp",
        "Jwt payload [exp] field is not an integer",
        "Jwt payload [exp] field is not a positive 64 bit integer",
    )?;
    string("jti", "Jwt payload [jti] field is not a string")?;
    const AUD: &str = "Jwt payload [aud] field is not a string or string list";
    let audiences = match claims.get("aud") {
        None => Vec::new(),
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|a| a.as_str().map(str::to_string).ok_or(AUD))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(AUD),
    };
    b64(signature).ok_or("Jwt signature is an invalid Base64url encoded")?;
    Ok(Parsed {
        claims,
        iss,
        nbf,
        exp,
        audiences,
    })
}

/// A token one rule verified.
struct Good<'a> {
    claims: Map<String, Value>,
    token: String,
    loc: &'a Location,
}

/// One rule's verdict on the tokens in its own locations: what Envoy's authenticator for
/// that rule's provider (`origins-N`) answers.
enum Verdict<'a> {
    /// No token in any of the rule's locations (JwtMissed).
    Missing,
    /// Every token there verified; in extraction order.
    Verified(Vec<Good<'a>>),
    /// A token there is another issuer's (JwtUnknownIssuer).
    OtherIssuer(Box<AuthnOutcome>),
    /// A token there failed: malformed, expired, audience, keys, signature.
    Refused(Box<AuthnOutcome>),
}

/// Judge the tokens in `rule`'s locations as Envoy's provider authenticator does: all of
/// them must verify, the last extracted first (Envoy pops them from the back); the first
/// failure is the verdict.
fn judge<'a>(
    rule: &'a CompiledJwtRule,
    req: &HttpRequest,
    now: SystemTime,
    keys: &dyn JwksSource,
) -> Verdict<'a> {
    let mut found: Vec<(String, &Location)> = Vec::new();
    for loc in &rule.locations {
        for token in extract(loc, req) {
            if !found.iter().any(|(t, l)| *t == token && *l == loc) {
                found.push((token, loc));
            }
        }
    }
    if found.is_empty() {
        return Verdict::Missing;
    }
    let mut good = Vec::with_capacity(found.len());
    for (token, loc) in found.into_iter().rev() {
        match verify_with_rule(&token, rule, now, keys) {
            Ok(claims) => good.push(Good { claims, token, loc }),
            Err(Refusal::OtherIssuer) => {
                return Verdict::OtherIssuer(reject(401, "Jwt issuer is not configured", None));
            }
            Err(Refusal::Failed(r)) => return Verdict::Refused(r),
        }
    }
    good.reverse();
    Verdict::Verified(good)
}

enum Refusal {
    OtherIssuer,
    Failed(Box<AuthnOutcome>),
}

/// Verify one token against one rule, in Envoy's order: parse, issuer, `nbf` then `exp`,
/// audiences, keys, signature. The claims come back with space-delimited claims split.
fn verify_with_rule(
    token: &str,
    rule: &CompiledJwtRule,
    now: SystemTime,
    keys: &dyn JwksSource,
) -> Result<Map<String, Value>, Refusal> {
    let p = Some(&rule.policy);
    let fail = |status: u16, reason: String| Refusal::Failed(reject(status, reason, p));
    let parsed = envoy_parse(token).map_err(|e| Refusal::Failed(reject(401, e, None)))?;
    if rule.issuer.as_deref().is_some_and(|i| i != parsed.iss) {
        return Err(Refusal::OtherIssuer);
    }
    let t = u64::try_from(unix(now)).unwrap_or(0);
    let skew = CLOCK_SKEW.as_secs();
    if t.saturating_add(skew) < parsed.nbf {
        return Err(fail(401, "Jwt not yet valid".into()));
    }
    if parsed.exp != 0 && t > parsed.exp.saturating_add(skew) {
        return Err(fail(401, "Jwt is expired".into()));
    }
    if !rule.audiences.is_empty() {
        let allowed = |a: &String| {
            rule.audiences
                .iter()
                .any(|x| audience_key(x) == audience_key(a))
        };
        if !parsed.audiences.iter().any(allowed) {
            return Err(fail(403, "Audiences in Jwt are not allowed".into()));
        }
    }
    let jwks = match &rule.keys {
        Keys::Inline(Ok(j)) => j.clone(),
        Keys::Inline(Err(e)) => {
            return Err(fail(
                401,
                format!("Jwks doesn't have any valid public key: {e}"),
            ));
        }
        Keys::Uri(u) | Keys::Discovery(u) => match keys.jwks(u) {
            Ok(j) => j,
            Err(e) => return Err(fail(401, format!("Jwks remote fetch is failed: {e}"))),
        },
    };
    if let Err(e) = rampart_certs::jwt::verify(token, &jwks, now, CLOCK_SKEW) {
        use rampart_certs::jwt::JwtError as E;
        let phrase = match e {
            E::UnknownKid { .. } | E::NoMatchingKey { .. } | E::SymmetricAlgorithm { .. } => {
                "Jwks doesn't have key to match kid or alg from Jwt"
            }
            _ => "Jwt verification fails",
        };
        return Err(fail(401, format!("{phrase}: {e}")));
    }
    let mut claims = parsed.claims;
    for name in &rule.space_delimited {
        if let Some(Value::String(s)) = claims.get(name) {
            let list: Vec<Value> = s
                .split(' ')
                .filter(|x| !x.is_empty())
                .map(|x| Value::String(x.to_string()))
                .collect();
            claims.insert(name.clone(), Value::Array(list));
        }
    }
    Ok(claims)
}

/// Authenticate `req` against the jwtRules that apply to `w`, as the `jwt_authn` filter
/// istiod writes decides. Rules sorted by issuer are providers P0..Pn-1 and the requirement
/// is `requires_any[P0, .., Pn-1, requires_all[any(P0, allow_missing), ..]]`:
///
/// - a rule whose locations hold tokens that all verify authenticates the request (the
///   first such rule, in order; tokens in other rules' locations are not looked at);
/// - otherwise a request where no rule finds a token passes without a principal;
/// - otherwise it is refused with the error of the first rule (in order) that found a bad or
///   another issuer's token, unless that error is "another issuer", in which case the last
///   real error of any rule wins, if there is one (Envoy's `requires_any` keeps the last
///   error that is not JwtMissed or JwtUnknownIssuer).
pub(crate) fn authenticate(
    set: &ReqAuthnSet,
    root_ns: &str,
    w: &Workload,
    req: &HttpRequest,
    now: SystemTime,
    keys: &dyn JwksSource,
) -> AuthnOutcome {
    let rules = set.rules_for(root_ns, w);
    if rules.is_empty() {
        return AuthnOutcome::NoToken;
    }
    // CORS preflight requests bypass JWT checks (Istio sets bypass_cors_preflight).
    if req.method == "OPTIONS"
        && req.header("origin").is_some_and(|v| !v.is_empty())
        && req
            .header("access-control-request-method")
            .is_some_and(|v| !v.is_empty())
    {
        return AuthnOutcome::NoToken;
    }
    let mut failures: Vec<(bool, Box<AuthnOutcome>)> = Vec::new();
    for rule in &rules {
        match judge(rule, req, now, keys) {
            Verdict::Missing => {}
            Verdict::Verified(good) => return authenticated(rule, good),
            Verdict::OtherIssuer(r) => failures.push((false, r)),
            Verdict::Refused(r) => failures.push((true, r)),
        }
    }
    // The `requires_all` branch: every rule missing its token is a pass.
    let Some((first_real, first)) = failures.first() else {
        return AuthnOutcome::NoToken;
    };
    let last_real = failures.iter().rev().find(|(real, _)| *real);
    let mut answer = if *first_real {
        (**first).clone()
    } else {
        (*last_real.map_or(first, |(_, r)| r)).as_ref().clone()
    };
    // A rule that lacked the token's key (a rotation the cached JWKS has not seen) is named
    // in the detail even when another rule's error answers, so that the proxy refetches.
    if let AuthnOutcome::Rejected { reason, .. } = &mut answer
        && !reason.contains(KID_MISS)
        && let Some(miss) = failures.iter().find_map(|(_, r)| match &**r {
            AuthnOutcome::Rejected { reason, .. } if reason.contains(KID_MISS) => Some(reason),
            _ => None,
        })
    {
        let sep = if reason.contains(": ") { "; " } else { ": " };
        reason.push_str(&format!("{sep}another rule: {miss}"));
    }
    answer
}

/// What the key-set error says of a `kid` it does not hold (the proxy's cue to refetch).
const KID_MISS: &str = "no key with kid";

/// The outcome of `rule` verifying `good` (non-empty): claims and principal from the first
/// token (Envoy verifies the last first, so the first one's payload is written last), the
/// output headers, and the removal of every token the rule does not forward.
fn authenticated(rule: &CompiledJwtRule, good: Vec<Good<'_>>) -> AuthnOutcome {
    let mut headers = Vec::new();
    let first = &good[0];
    if let Some(h) = &rule.output_payload_to_header {
        let payload = first.token.split('.').nth(1).unwrap_or("").to_string();
        headers.push(HeaderMutation::Set {
            name: h.clone(),
            value: payload,
        });
    }
    // Claims as the token carries them (before space-delimited splitting).
    let original: Map<String, Value> = first
        .token
        .split('.')
        .nth(1)
        .and_then(b64)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for (h, c) in &rule.claim_to_headers {
        if let Some(v) = claim_to_header_value(&original, c) {
            headers.push(HeaderMutation::Set {
                name: h.clone(),
                value: v,
            });
        }
    }
    // Every verified token the rule does not forward is taken out: from its header and
    // from the query (as Envoy 1.40 does). Cookies are left: one Cookie header carries the
    // app's other cookies too.
    if !rule.forward_original_token {
        for g in &good {
            let m = match g.loc {
                Location::Header { name, .. } => HeaderMutation::Remove { name: name.clone() },
                Location::Param(p) => HeaderMutation::RemoveQueryParam { name: p.clone() },
                Location::Cookie(_) => continue,
            };
            if !headers.contains(&m) {
                headers.push(m);
            }
        }
    }
    let claims = JwtClaims {
        claims: good
            .into_iter()
            .next()
            .map(|g| g.claims)
            .unwrap_or_default(),
    };
    AuthnOutcome::Authenticated {
        principal: claims.principal(),
        claims,
        policy: rule.policy.clone(),
        headers,
    }
}
