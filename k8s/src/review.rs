//! TokenReview: the API server says whose a bearer token is.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use rampart_citadel::Refusal;

/// How many reviewed tokens are remembered at most.
pub const DEFAULT_REVIEW_CACHE: usize = 16 * 1024;
/// How long a review is trusted at most, even when the token's `exp` is later: a bound token
/// stops being valid when its Pod is deleted, and the API server is asked again after this.
pub const MAX_REVIEW_AGE: std::time::Duration = std::time::Duration::from_secs(300);

const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const SA_PREFIX: &str = "system:serviceaccount:";

/// What the API server said about an authenticated service-account token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewedToken {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account's name.
    pub service_account: String,
    /// The Pod the token is bound to (`authentication.kubernetes.io/pod-name`), if any.
    pub pod_name: Option<String>,
    /// That Pod's UID (`authentication.kubernetes.io/pod-uid`), if any.
    pub pod_uid: Option<String>,
    /// The node of the bound Pod (`authentication.kubernetes.io/node-name`, Kubernetes 1.32+),
    /// if the API server says so.
    pub node_name: Option<String>,
}

struct Cached {
    reviewed: ReviewedToken,
    exp: SystemTime,
}

/// Sends bearer tokens to the API server's TokenReview and remembers the accepted ones until
/// their `exp` (read from the JWT payload, trusted for nothing but ending the cache entry
/// early), and never longer than [`MAX_REVIEW_AGE`] (a Pod's deletion invalidates its bound
/// tokens). Refused tokens are not remembered: each try is reviewed again.
pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
    max_entries: usize,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .field("max_entries", &self.max_entries)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    /// Reviews for `audience` (Istio: `istio-ca`), remembering at most `max_entries` tokens.
    pub fn new(client: kube::Client, audience: &str, max_entries: usize) -> Self {
        TokenReviewer {
            client,
            audience: audience.to_owned(),
            max_entries: max_entries.max(1),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// How many reviewed tokens are remembered now.
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Who `token` belongs to, by the API server's word.
    pub async fn review(&self, token: &str, now: SystemTime) -> Result<ReviewedToken, Refusal> {
        let exp = unverified_exp(token);
        if exp.is_some_and(|exp| now >= exp) {
            // The API server would refuse it too; no need to ask.
            return Err(Refusal::TokenExpired);
        }
        let key = digest(token);
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(&key) {
                Some(hit) if now < hit.exp => return Ok(hit.reviewed.clone()),
                Some(_) => {
                    cache.remove(&key);
                }
                None => {}
            }
        }
        let reviewed = self.ask(token).await?;
        if let Some(exp) = exp {
            self.remember(key, reviewed.clone(), exp.min(now + MAX_REVIEW_AGE), now);
        }
        Ok(reviewed)
    }

    fn remember(&self, key: [u8; 32], reviewed: ReviewedToken, exp: SystemTime, now: SystemTime) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.max_entries && !cache.contains_key(&key) {
            cache.retain(|_, c| now < c.exp);
        }
        while cache.len() >= self.max_entries && !cache.contains_key(&key) {
            // Full of live entries: drop the one that expires first.
            let Some(first) = cache.iter().min_by_key(|(_, c)| c.exp).map(|(k, _)| *k) else {
                break;
            };
            cache.remove(&first);
        }
        cache.insert(key, Cached { reviewed, exp });
    }

    async fn ask(&self, token: &str) -> Result<ReviewedToken, Refusal> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = api
            .create(&PostParams::default(), &request)
            .await
            .map_err(|e| Refusal::TokenReviewFailed(format!("API server: {e}")))?;
        let status = answer
            .status
            .ok_or_else(|| Refusal::TokenReviewFailed("the review has no status".into()))?;
        if status.authenticated != Some(true) {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".into());
            return Err(Refusal::TokenReviewFailed(escape(&why)));
        }
        if let Some(error) = status.error.filter(|e| !e.is_empty()) {
            return Err(Refusal::TokenReviewFailed(escape(&error)));
        }
        // The API server answers with the requested audiences the token is valid for; a
        // token for anything else must not pass, and neither must an answer without them.
        if !status
            .audiences
            .as_deref()
            .unwrap_or_default()
            .contains(&self.audience)
        {
            return Err(Refusal::WrongAudience(self.audience.clone()));
        }
        let user = status
            .user
            .ok_or_else(|| Refusal::NoIdentityInToken("the review names no user".into()))?;
        let username = user.username.unwrap_or_default();
        let (namespace, service_account) = username
            .strip_prefix(SA_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
            .ok_or_else(|| {
                Refusal::NoIdentityInToken(format!(
                    "user {:?} is not system:serviceaccount:<namespace>:<name>",
                    escape(&username)
                ))
            })?;
        let extra = user.extra.unwrap_or_default();
        let one = |key: &str| {
            extra
                .get(key)
                .and_then(|v| v.first())
                .filter(|s| !s.is_empty())
                .cloned()
        };
        Ok(ReviewedToken {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod_name: one(EXTRA_POD_NAME),
            pod_uid: one(EXTRA_POD_UID),
            node_name: one(EXTRA_NODE_NAME),
        })
    }
}

/// The `exp` claim of a JWT, read without verifying anything: used only to stop remembering
/// a reviewed token (and to refuse an expired one without asking).
pub fn unverified_exp(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

fn digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    out
}

fn escape(s: &str) -> String {
    s.chars().take(256).flat_map(char::escape_default).collect()
}
