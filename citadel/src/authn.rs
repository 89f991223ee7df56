//! Caller authentication, in DESIGN §2 order: bearer JWT, then client certificate, then
//! (for allow-listed node agents only) `ImpersonatedIdentity`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use std::time::{Duration, SystemTime};

use rampart_certs::jwt::{IssuerSet, Jwks, JwtError, UnverifiedJwt, Validation};
use rampart_certs::{SpiffeId, TrustDomain};

use crate::config::{JwtIssuerConfig, NodeAgentGrant};
use crate::error::CitadelError;
use crate::refusal::Refusal;

/// Clock skew allowed on token `exp`/`nbf` (Envoy's default).
pub const TOKEN_LEEWAY: Duration = Duration::from_secs(60);
/// How long a verified token is remembered (it is still re-checked against `exp`).
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(300);
const TOKEN_CACHE_MAX: usize = 16 * 1024;

/// How a caller proved its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A bearer JWT from a configured issuer.
    Jwt,
    /// A client certificate chaining to the trust bundle.
    Mtls,
    /// A node agent asking for a workload's identity.
    Impersonation,
}

impl AuthMethod {
    /// The name used in the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Jwt => "jwt",
            AuthMethod::Mtls => "mtls",
            AuthMethod::Impersonation => "impersonation",
        }
    }
}

/// Who the certificate will be for, and who asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The identity to certify.
    pub id: SpiffeId,
    /// How it was proved.
    pub method: AuthMethod,
    /// For impersonation: the node agent that asked.
    pub on_behalf_of: Option<SpiffeId>,
}

impl Caller {
    /// The audit log's `caller` field: the proving identity.
    pub fn audit_name(&self) -> String {
        match &self.on_behalf_of {
            Some(agent) => format!("{agent} (for {})", self.id),
            None => self.id.to_string(),
        }
    }
}

struct JwksSource {
    issuer: String,
    path: PathBuf,
    digest: [u8; 32],
    /// The last refusal reported, so a file that stays broken is reported once.
    refused: Option<String>,
}

/// What one look at an issuer's JWKS file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksReload {
    /// New keys are in force.
    Reloaded {
        /// The issuer whose keys changed.
        issuer: String,
    },
    /// The file could not be used; the previous keys stay in force.
    Refused {
        /// The issuer whose file is broken.
        issuer: String,
        /// Why (names the file).
        reason: String,
    },
}

struct CachedToken {
    id: SpiffeId,
    exp: Option<SystemTime>,
    nbf: Option<SystemTime>,
    cached_at: SystemTime,
}

/// Verifies bearer tokens against per-issuer JWKS files (a `rampart_certs` [`IssuerSet`]:
/// the issuer's keys, `exp` required, the CA audience); remembers verified tokens so a
/// caller that reuses its token costs a hash and a lookup, not a signature check.
///
/// The files are re-read by [`TokenAuthenticator::reload_jwks`] (the CA calls it from its
/// reload loop): an issuer's rotated keys take effect without a restart, a broken file is
/// refused and the last good keys keep verifying.
pub struct TokenAuthenticator {
    issuers: ArcSwap<IssuerSet>,
    /// Where each issuer's keys come from, and the digest of the text in force.
    sources: Mutex<Vec<JwksSource>>,
    audience: String,
    trust_domain: TrustDomain,
    cache: Mutex<HashMap<[u8; 32], CachedToken>>,
}

impl std::fmt::Debug for TokenAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuthenticator")
            .field(
                "issuers",
                &self.issuers.load().issuers().collect::<Vec<_>>(),
            )
            .field("audience", &self.audience)
            .finish()
    }
}

// === impl TokenAuthenticator ===

impl TokenAuthenticator {
    /// Reads every issuer's JWKS file.
    pub fn from_config(
        issuers: &[JwtIssuerConfig],
        audience: &str,
        trust_domain: &TrustDomain,
    ) -> Result<Self, CitadelError> {
        let mut map = HashMap::new();
        let mut sources = Vec::new();
        for iss in issuers {
            let (jwks, digest) = read_jwks(&iss.issuer, &iss.jwks_path)?;
            map.insert(iss.issuer.clone(), jwks);
            sources.push(JwksSource {
                issuer: iss.issuer.clone(),
                path: iss.jwks_path.clone(),
                digest,
                refused: None,
            });
        }
        let auth = Self::new(map, audience, trust_domain);
        *auth.sources.lock().unwrap_or_else(|p| p.into_inner()) = sources;
        Ok(auth)
    }

    /// Re-reads every issuer's JWKS file. Changed, valid files replace that issuer's keys
    /// (and forget remembered tokens, so a removed key stops working at once); unreadable
    /// or invalid files are reported (once while they stay broken) and the old keys stay.
    /// Unchanged files cost a read and a hash.
    pub fn reload_jwks(&self) -> Vec<JwksReload> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let mut outcomes = Vec::new();
        let mut next: Option<IssuerSet> = None;
        for src in sources.iter_mut() {
            // The file's bytes are hashed before they are parsed: an unchanged file (the
            // common case, every poll) is not parsed again (its EC points checked again).
            let read = read_jwks_text(&src.issuer, &src.path).and_then(|(text, digest)| {
                if digest == src.digest {
                    Ok(None)
                } else {
                    parse_jwks(&src.issuer, &src.path, &text).map(|j| Some((j, digest)))
                }
            });
            match read {
                Ok(None) => src.refused = None,
                Ok(Some((jwks, digest))) => {
                    src.digest = digest;
                    src.refused = None;
                    next.get_or_insert_with(|| (**self.issuers.load()).clone())
                        .insert(src.issuer.clone(), jwks, self.validation());
                    outcomes.push(JwksReload::Reloaded {
                        issuer: src.issuer.clone(),
                    });
                }
                Err(e) => {
                    let reason = e.to_string();
                    if src.refused.as_deref() != Some(reason.as_str()) {
                        src.refused = Some(reason.clone());
                        outcomes.push(JwksReload::Refused {
                            issuer: src.issuer.clone(),
                            reason,
                        });
                    }
                }
            }
        }
        if let Some(map) = next {
            self.issuers.store(Arc::new(map));
            self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
        outcomes
    }

    /// From already-parsed key sets, keyed by issuer.
    pub fn new(issuers: HashMap<String, Jwks>, audience: &str, trust_domain: &TrustDomain) -> Self {
        let auth = TokenAuthenticator {
            issuers: ArcSwap::from_pointee(IssuerSet::new()),
            sources: Mutex::new(Vec::new()),
            audience: audience.to_owned(),
            trust_domain: trust_domain.clone(),
            cache: Mutex::new(HashMap::new()),
        };
        let mut set = IssuerSet::new();
        for (issuer, jwks) in issuers {
            set.insert(issuer, jwks, auth.validation());
        }
        auth.issuers.store(Arc::new(set));
        auth
    }

    /// What every caller token must satisfy besides its issuer's signature: an `exp` (a
    /// bearer token without one is a permanent credential), the CA audience, and
    /// [`TOKEN_LEEWAY`] of clock skew.
    fn validation(&self) -> Validation {
        Validation {
            issuer: None,
            audiences: vec![self.audience.clone()],
            leeway: TOKEN_LEEWAY,
            require_expiration: true,
        }
    }

    /// Verifies `token` and returns the workload identity it proves.
    pub fn authenticate(&self, token: &str, now: SystemTime) -> Result<SpiffeId, Refusal> {
        let key = sha256(token);
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hit) = cache.get(&key)
                && now < hit.cached_at + TOKEN_CACHE_TTL
            {
                if hit.exp.is_some_and(|exp| now > exp + TOKEN_LEEWAY) {
                    return Err(Refusal::TokenExpired);
                }
                if hit.nbf.is_some_and(|nbf| now + TOKEN_LEEWAY < nbf) {
                    return Err(Refusal::TokenNotYetValid);
                }
                return Ok(hit.id.clone());
            }
        }
        let (id, exp, nbf) = self.verify(token, now)?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= TOKEN_CACHE_MAX {
            cache.clear();
        }
        cache.insert(
            key,
            CachedToken {
                id: id.clone(),
                exp,
                nbf,
                cached_at: now,
            },
        );
        Ok(id)
    }

    fn verify(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<(SpiffeId, Option<SystemTime>, Option<SystemTime>), Refusal> {
        let parsed = UnverifiedJwt::parse(token).map_err(jwt_refusal)?;
        let iss = parsed.unverified_issuer().unwrap_or("").to_owned();
        let verified = self
            .issuers
            .load()
            .verify_parsed(parsed, now)
            .map_err(|e| match e {
                JwtError::UnknownIssuer { .. } => Refusal::UnknownIssuer(escape(&iss)),
                JwtError::MissingExpiration => {
                    Refusal::InvalidToken("token has no exp claim".into())
                }
                JwtError::AudienceMismatch { .. } => Refusal::WrongAudience(self.audience.clone()),
                other => jwt_refusal(other),
            })?;
        let sa = verified
            .service_account()
            .map_err(|e| Refusal::NoIdentityInToken(e.to_string()))?;
        let id = SpiffeId::istio(&self.trust_domain, &sa.namespace, &sa.name)
            .map_err(|e| Refusal::NoIdentityInToken(e.to_string()))?;
        Ok((id, verified.expires_at(), verified.not_before()))
    }
}

fn read_jwks(issuer: &str, path: &Path) -> Result<(Jwks, [u8; 32]), CitadelError> {
    let (text, digest) = read_jwks_text(issuer, path)?;
    Ok((parse_jwks(issuer, path, &text)?, digest))
}

fn jwks_err(issuer: &str, path: &Path, reason: String) -> CitadelError {
    CitadelError::Jwks {
        issuer: issuer.to_owned(),
        path: path.to_path_buf(),
        reason,
    }
}

/// The JWKS file's text (refused when empty) and its SHA-256.
fn read_jwks_text(issuer: &str, path: &Path) -> Result<(String, [u8; 32]), CitadelError> {
    let text = std::fs::read_to_string(path).map_err(|e| jwks_err(issuer, path, e.to_string()))?;
    if text.trim().is_empty() {
        return Err(jwks_err(issuer, path, "file is empty".into()));
    }
    let digest = sha256(&text);
    Ok((text, digest))
}

fn parse_jwks(issuer: &str, path: &Path, text: &str) -> Result<Jwks, CitadelError> {
    Jwks::parse(text).map_err(|e| jwks_err(issuer, path, e.to_string()))
}

fn sha256(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    out
}

fn jwt_refusal(e: JwtError) -> Refusal {
    match e {
        JwtError::Expired { .. } => Refusal::TokenExpired,
        JwtError::NotYetValid { .. } => Refusal::TokenNotYetValid,
        other => Refusal::InvalidToken(other.to_string()),
    }
}

fn escape(s: &str) -> String {
    s.chars().take(128).flat_map(char::escape_default).collect()
}

/// Extracts the token from an `authorization` header value.
pub fn bearer_token(header: &str) -> Result<&str, Refusal> {
    let (scheme, token) = header
        .split_once(' ')
        .ok_or_else(|| Refusal::MalformedAuthorization("expected `Bearer <token>`".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Refusal::MalformedAuthorization(format!(
            "scheme {:?} is not Bearer",
            escape(scheme)
        )));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(Refusal::MalformedAuthorization("empty token".into()));
    }
    Ok(token)
}

/// What the transport says about the caller.
#[derive(Debug, Clone, Default)]
pub struct CallerEvidence<'a> {
    /// The `authorization` header, if any.
    pub authorization: Option<&'a str>,
    /// The client certificate identity, if the TLS handshake verified a client certificate:
    /// `Ok(id)` or why it is unusable.
    pub client_cert: Option<Result<SpiffeId, String>>,
    /// The `ImpersonatedIdentity` metadata value, if any.
    pub impersonate: Option<&'a str>,
    /// The `clusterid` gRPC header, if any (checked only by an [`ExternalAuthenticator`]).
    pub cluster_id: Option<&'a str>,
}

/// What an [`ExternalAuthenticator`] is asked to judge: a bearer token and what came with it.
#[derive(Clone, Default)]
pub struct BearerEvidence {
    /// The token (without `Bearer `).
    pub token: String,
    /// The `clusterid` gRPC header, if any.
    pub cluster_id: Option<String>,
    /// The `ImpersonatedIdentity` metadata value, if any and not empty.
    pub impersonate: Option<String>,
}

impl std::fmt::Debug for BearerEvidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerEvidence")
            .field("token", &"<redacted>")
            .field("cluster_id", &self.cluster_id)
            .field("impersonate", &self.impersonate)
            .finish()
    }
}

/// The future an [`ExternalAuthenticator`] returns.
pub type ExternalAuthFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Caller, Refusal>> + Send + 'a>>;

/// The seam through which a platform (Kubernetes: TokenReview, node authorization) judges
/// bearer tokens instead of the configured JWKS files. citadel knows nothing of the platform;
/// `rampart-k8s` implements this. When a CA has one, every request that carries a bearer
/// token is decided by it alone (including impersonation); client-certificate callers keep
/// the static rules.
pub trait ExternalAuthenticator: Send + Sync + 'static {
    /// Decides who the token's bearer is (and, with `impersonate`, whom it may act for).
    fn authenticate(&self, evidence: BearerEvidence, now: SystemTime) -> ExternalAuthFuture<'_>;
}

/// [`authenticate`], except that a bearer token goes to `external` when there is one.
pub async fn authenticate_with(
    external: Option<&dyn ExternalAuthenticator>,
    tokens: &TokenAuthenticator,
    node_agents: &HashMap<SpiffeId, NodeAgentGrant>,
    trust_domain: &TrustDomain,
    ev: &CallerEvidence<'_>,
    now: SystemTime,
) -> Result<Caller, Refusal> {
    match (external, ev.authorization) {
        (Some(ext), Some(header)) => {
            let token = bearer_token(header)?;
            ext.authenticate(
                BearerEvidence {
                    token: token.to_owned(),
                    cluster_id: ev.cluster_id.map(str::to_owned),
                    impersonate: ev.impersonate.filter(|s| !s.is_empty()).map(str::to_owned),
                },
                now,
            )
            .await
        }
        _ => authenticate(tokens, node_agents, trust_domain, ev, now),
    }
}

/// Decides who the caller is: bearer token first, then the client certificate; then applies
/// impersonation for allow-listed node agents.
pub fn authenticate(
    tokens: &TokenAuthenticator,
    node_agents: &HashMap<SpiffeId, NodeAgentGrant>,
    trust_domain: &TrustDomain,
    ev: &CallerEvidence<'_>,
    now: SystemTime,
) -> Result<Caller, Refusal> {
    let token_result = ev
        .authorization
        .map(|h| bearer_token(h).and_then(|t| tokens.authenticate(t, now)));
    let proved = match (token_result, &ev.client_cert) {
        (Some(Ok(id)), _) => Caller {
            id,
            method: AuthMethod::Jwt,
            on_behalf_of: None,
        },
        (_, Some(Ok(id))) => Caller {
            id: id.clone(),
            method: AuthMethod::Mtls,
            on_behalf_of: None,
        },
        (Some(Err(token_refusal)), _) => return Err(token_refusal),
        (None, Some(Err(why))) => return Err(Refusal::BadClientCertificate(why.clone())),
        (None, None) => return Err(Refusal::NoCredentials),
    };
    let Some(target) = ev.impersonate.filter(|s| !s.is_empty()) else {
        return Ok(proved);
    };
    let Some(grant) = node_agents.get(&proved.id) else {
        return Err(Refusal::ImpersonationDenied {
            caller: proved.id.to_string(),
        });
    };
    let target = SpiffeId::parse(target).map_err(|e| Refusal::BadImpersonation(e.to_string()))?;
    if target == proved.id {
        // A node agent asking for its own identity (ztunnel does in shared mode; Istio
        // allows it): nothing is impersonated, the caller proved this identity itself.
        return Ok(proved);
    }
    if node_agents.contains_key(&target) {
        // Never another node agent, whatever the grant's patterns say: with that agent's
        // certificate the caller could renew as it and act with its grant (chaining).
        return Err(Refusal::ImpersonationOfNodeAgent {
            caller: proved.id.to_string(),
            target: target.to_string(),
        });
    }
    if target.trust_domain() != trust_domain {
        return Err(Refusal::BadImpersonation(format!(
            "{target} is not in trust domain {trust_domain}"
        )));
    }
    if !grant.allows(&target) {
        return Err(Refusal::ImpersonationOutOfScope {
            caller: proved.id.to_string(),
            target: target.to_string(),
        });
    }
    Ok(Caller {
        id: target,
        method: AuthMethod::Impersonation,
        on_behalf_of: Some(proved.id),
    })
}

#[cfg(test)]
mod tests {
    use rampart_certs::jwt::JwtSigner;
    use rampart_certs::{KeyAlgorithm, PrivateKey};

    use super::*;

    fn signer(kid: &str) -> JwtSigner {
        JwtSigner::new(&PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), kid).unwrap()
    }

    /// The issuer, audience and expiry rules of caller tokens (now checked by certs'
    /// IssuerSet), each refusal with its own reason, and the accepted token beside them.
    #[test]
    fn tokens_need_a_known_issuer_the_ca_audience_and_an_expiry() {
        let a = signer("a");
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let auth = TokenAuthenticator::new(
            HashMap::from([("https://iss".to_string(), a.jwks().unwrap())]),
            "istio-ca",
            &td,
        );
        let now = SystemTime::now();
        let unix = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = |iss: &str, aud: &str, exp: Option<u64>| {
            let mut c = serde_json::json!({
                "iss": iss, "aud": aud, "iat": unix,
                "sub": "system:serviceaccount:ns1:sa1",
            });
            if let Some(exp) = exp {
                c["exp"] = exp.into();
            }
            a.sign(&c).unwrap()
        };
        assert_eq!(
            auth.authenticate(&token("https://iss", "istio-ca", Some(unix + 600)), now)
                .unwrap()
                .to_string(),
            "spiffe://cluster.local/ns/ns1/sa/sa1"
        );
        assert_eq!(
            auth.authenticate(&token("https://other", "istio-ca", Some(unix + 600)), now),
            Err(Refusal::UnknownIssuer("https://other".into()))
        );
        assert_eq!(
            auth.authenticate(&token("https://iss", "other", Some(unix + 600)), now),
            Err(Refusal::WrongAudience("istio-ca".into()))
        );
        assert_eq!(
            auth.authenticate(&token("https://iss", "istio-ca", None), now),
            Err(Refusal::InvalidToken("token has no exp claim".into()))
        );
        assert_eq!(
            auth.authenticate(&token("https://iss", "istio-ca", Some(unix - 3600)), now),
            Err(Refusal::TokenExpired)
        );
    }

    #[test]
    fn reload_reports_changes_once_and_keeps_last_good_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let write = |text: &str| std::fs::write(&path, text).unwrap();
        let a = signer("a");
        write(&a.jwks().unwrap().to_json().to_string());
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let cfg = [JwtIssuerConfig {
            issuer: "iss".into(),
            jwks_path: path.clone(),
        }];
        let auth = TokenAuthenticator::from_config(&cfg, "istio-ca", &td).unwrap();
        assert!(auth.reload_jwks().is_empty(), "unchanged file");

        write("{broken");
        let refused = auth.reload_jwks();
        assert!(
            matches!(refused.as_slice(), [JwksReload::Refused { issuer, reason }]
                if issuer == "iss" && reason.contains("jwks.json")),
            "{refused:?}"
        );
        assert!(
            auth.reload_jwks().is_empty(),
            "a broken file is reported once"
        );
        assert!(
            auth.issuers.load().issuers().any(|i| i == "iss"),
            "old keys stay"
        );

        let b = signer("b");
        write(&b.jwks().unwrap().to_json().to_string());
        assert_eq!(
            auth.reload_jwks(),
            vec![JwksReload::Reloaded {
                issuer: "iss".into()
            }]
        );
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            auth.reload_jwks().as_slice(),
            [JwksReload::Refused { .. }]
        ));
    }
}
