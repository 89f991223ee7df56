//! Compact JWS parsing, signature verification, time checks and claim policy.

use std::fmt;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde_json::{Map, Value};

use super::error::untrusted;
use super::jwk::{Algorithm, B64, Jwks};
use super::{JwtError, TokenPart};

/// The largest token accepted, in bytes. Kubernetes service-account tokens are ~1 KiB and
/// Envoy's default header limit is 60 KiB.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// Clock skew allowed on `exp` and `nbf` when nothing else is configured: 60 seconds, as
/// Envoy's `jwt_authn` (`JwtProvider.clock_skew_seconds`) and so Istio's
/// RequestAuthentication.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);

/// Latest NumericDate accepted for `exp`, `nbf` and `iat` (9999-12-31T23:59:59Z), so every
/// date converts to a `SystemTime` and arithmetic cannot overflow.
const MAX_NUMERIC_DATE: u64 = 253_402_300_799;

fn malformed(part: TokenPart, reason: &'static str) -> JwtError {
    JwtError::Malformed { part, reason }
}

// === impl Header ===

/// A JOSE header whose `alg` is an accepted algorithm and that has no `crit`.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    alg: Algorithm,
    kid: Option<String>,
    params: Map<String, Value>,
}

impl Header {
    fn parse(segment: &str) -> Result<Header, JwtError> {
        let params = decode_object(segment, TokenPart::Header)?;
        let alg = match params.get("alg") {
            None => return Err(malformed(TokenPart::Header, "missing alg")),
            Some(Value::String(alg)) => alg,
            Some(_) => return Err(malformed(TokenPart::Header, "alg is not a string")),
        };
        if alg.eq_ignore_ascii_case("none") {
            return Err(JwtError::UnsecuredToken);
        }
        let alg = match Algorithm::from_name(alg) {
            Some(alg) => alg,
            None if alg.starts_with("HS") => {
                return Err(JwtError::SymmetricAlgorithm {
                    alg: untrusted(alg),
                });
            }
            None => {
                return Err(JwtError::UnsupportedAlgorithm {
                    alg: untrusted(alg),
                });
            }
        };
        if params.contains_key("crit") {
            return Err(JwtError::CriticalHeader);
        }
        let kid = match params.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => return Err(malformed(TokenPart::Header, "kid is not a string")),
        };
        Ok(Header { alg, kid, params })
    }

    /// The signature algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The key id (`kid`), if any.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The media type (`typ`), if it is a string.
    pub fn typ(&self) -> Option<&str> {
        self.params.get("typ").and_then(Value::as_str)
    }

    /// Every header parameter.
    pub fn params(&self) -> &Map<String, Value> {
        &self.params
    }
}

fn decode_object(segment: &str, part: TokenPart) -> Result<Map<String, Value>, JwtError> {
    let bytes = B64
        .decode(segment)
        .map_err(|_| malformed(part, "not unpadded base64url"))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(malformed(part, "not a JSON object")),
        Err(_) => Err(malformed(part, "not JSON")),
    }
}

// === impl UnverifiedJwt ===

/// A token split and decoded but **not yet verified**: nothing in it can be trusted.
///
/// Useful to choose which issuer's key set to verify against (as Envoy picks a provider
/// by `iss`) before calling [`UnverifiedJwt::verify`]. Its `Debug` shows only the header.
pub struct UnverifiedJwt<'t> {
    header: Header,
    claims: Map<String, Value>,
    signing_input: &'t str,
    payload_b64: &'t str,
    signature: Vec<u8>,
}

impl fmt::Debug for UnverifiedJwt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnverifiedJwt")
            .field("alg", &self.header.alg)
            .field("kid", &self.header.kid)
            .finish_non_exhaustive()
    }
}

impl<'t> UnverifiedJwt<'t> {
    /// Split a compact JWS and decode its header and payload. Refuses tokens over
    /// [`MAX_TOKEN_LEN`], JWE (five segments), bad base64url or JSON, `alg: none`, HMAC and
    /// unknown algorithms, and `crit` headers.
    pub fn parse(token: &'t str) -> Result<UnverifiedJwt<'t>, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(malformed(TokenPart::Token, "larger than 64 KiB"));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(if token.split('.').count() == 5 {
                malformed(TokenPart::Token, "JWE (encrypted) tokens are not accepted")
            } else {
                malformed(TokenPart::Token, "not three dot-separated segments")
            });
        };
        let signing_input = &token[..header.len() + 1 + payload.len()];
        let header = Header::parse(header)?;
        let claims = decode_object(payload, TokenPart::Payload)?;
        if signature.is_empty() {
            return Err(malformed(TokenPart::Signature, "empty"));
        }
        let signature = B64
            .decode(signature)
            .map_err(|_| malformed(TokenPart::Signature, "not unpadded base64url"))?;
        Ok(UnverifiedJwt {
            header,
            claims,
            signing_input,
            payload_b64: payload,
            signature,
        })
    }

    /// The (unverified) header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The (unverified) `iss` claim, if it is a string. Use it only to pick a key set.
    pub fn unverified_issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }

    /// Verify the signature against `jwks`, then the registered claims' types, then `nbf`
    /// and `exp` at `now` with `leeway` of clock skew (Envoy's rule: expired when
    /// `now > exp + leeway`, not yet valid when `now + leeway < nbf`; `now` in whole seconds).
    ///
    /// Key choice: only keys whose type fits the algorithm (and whose `alg`, if set, is
    /// the token's). When the token names a `kid`, the keys with that `kid`, else (as
    /// Envoy) the keys that have no `kid`; without a `kid`, every fitting key is tried.
    pub fn verify(
        self,
        jwks: &Jwks,
        now: SystemTime,
        leeway: Duration,
    ) -> Result<VerifiedJwt, JwtError> {
        let alg = self.header.alg;
        let fitting: Vec<_> = jwks.keys().iter().filter(|k| k.fits(alg)).collect();
        if fitting.is_empty() {
            return Err(JwtError::NoMatchingKey { alg: alg.as_str() });
        }
        let candidates: Vec<_> = match &self.header.kid {
            None => fitting,
            Some(kid) => {
                let named: Vec<_> = fitting
                    .iter()
                    .copied()
                    .filter(|k| k.kid() == Some(kid.as_str()))
                    .collect();
                if named.is_empty() {
                    fitting.into_iter().filter(|k| k.kid().is_none()).collect()
                } else {
                    named
                }
            }
        };
        if candidates.is_empty() {
            let kid = self.header.kid.as_deref().unwrap_or_default();
            return Err(JwtError::UnknownKid {
                kid: untrusted(kid),
            });
        }
        let message = self.signing_input.as_bytes();
        let key = candidates
            .into_iter()
            .find(|k| k.verify(alg, message, &self.signature))
            .ok_or(JwtError::BadSignature)?;
        let registered = Registered::parse(&self.claims)?;
        registered.check_time(now, leeway)?;
        Ok(VerifiedJwt {
            header: self.header,
            key_kid: key.kid().map(str::to_owned),
            payload_b64: self.payload_b64.to_owned(),
            claims: self.claims,
            registered,
        })
    }
}

/// Verify a compact JWS against a key set at `now`, allowing `leeway` of clock skew.
/// Issuer and audience are not checked here: use [`Validation`].
pub fn verify(
    token: &str,
    jwks: &Jwks,
    now: SystemTime,
    leeway: Duration,
) -> Result<VerifiedJwt, JwtError> {
    UnverifiedJwt::parse(token)?.verify(jwks, now, leeway)
}

// === impl Registered ===

/// The registered claims, type-checked as Envoy's jwt_verify_lib does.
#[derive(Clone, Debug, PartialEq)]
struct Registered {
    iss: Option<String>,
    sub: Option<String>,
    aud: Vec<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
    iat: Option<u64>,
}

impl Registered {
    fn parse(claims: &Map<String, Value>) -> Result<Registered, JwtError> {
        let string = |claim: &'static str| match claims.get(claim) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(JwtError::InvalidClaim {
                claim,
                reason: "not a string",
            }),
        };
        let date = |claim: &'static str| match claims.get(claim) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(v) if v.is_finite() && v >= 0.0 && v <= MAX_NUMERIC_DATE as f64 => {
                    // NumericDate may carry fractions; whole seconds, as Envoy.
                    Ok(Some(v.floor() as u64))
                }
                _ => Err(JwtError::InvalidClaim {
                    claim,
                    reason: "date out of range (0 to year 9999)",
                }),
            },
            Some(_) => Err(JwtError::InvalidClaim {
                claim,
                reason: "not a number",
            }),
        };
        let aud = match claims.get("aud") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or(JwtError::InvalidClaim {
                    claim: "aud",
                    reason: "array holds a non-string",
                })?,
            Some(_) => {
                return Err(JwtError::InvalidClaim {
                    claim: "aud",
                    reason: "neither a string nor an array of strings",
                });
            }
        };
        string("jti")?;
        Ok(Registered {
            iss: string("iss")?,
            sub: string("sub")?,
            aud,
            exp: date("exp")?,
            nbf: date("nbf")?,
            iat: date("iat")?,
        })
    }

    fn check_time(&self, now: SystemTime, leeway: Duration) -> Result<(), JwtError> {
        let now = crate::timestamp::unix_secs_u64(now);
        let leeway_secs = leeway.as_secs();
        if let Some(nbf) = self
            .nbf
            .filter(|nbf| now.saturating_add(leeway_secs) < *nbf)
        {
            return Err(JwtError::NotYetValid { nbf, leeway_secs });
        }
        if let Some(exp) = self.exp.filter(|exp| now > exp.saturating_add(leeway_secs)) {
            return Err(JwtError::Expired { exp, leeway_secs });
        }
        Ok(())
    }
}

// === impl VerifiedJwt ===

/// A token whose signature verified against a key set and whose `exp`/`nbf` held at the
/// time given. Issuer and audience are checked by [`Validation::check`].
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedJwt {
    header: Header,
    claims: Map<String, Value>,
    payload_b64: String,
    key_kid: Option<String>,
    registered: Registered,
}

impl VerifiedJwt {
    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Every claim.
    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }

    /// The payload segment exactly as it was in the token (base64url), as Istio's
    /// `outputPayloadToHeader` forwards it.
    pub fn payload_base64url(&self) -> &str {
        &self.payload_b64
    }

    /// The `kid` of the key that verified the signature, if that key had one.
    pub fn verified_by_kid(&self) -> Option<&str> {
        self.key_kid.as_deref()
    }

    /// The `iss` claim.
    pub fn issuer(&self) -> Option<&str> {
        self.registered.iss.as_deref()
    }

    /// The `sub` claim.
    pub fn subject(&self) -> Option<&str> {
        self.registered.sub.as_deref()
    }

    /// The `aud` claim as a list (a string `aud` is a one-element list; none is empty).
    pub fn audiences(&self) -> &[String] {
        &self.registered.aud
    }

    /// The `exp` claim.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.registered.exp.map(from_unix)
    }

    /// The `nbf` claim.
    pub fn not_before(&self) -> Option<SystemTime> {
        self.registered.nbf.map(from_unix)
    }

    /// The `iat` claim.
    pub fn issued_at(&self) -> Option<SystemTime> {
        self.registered.iat.map(from_unix)
    }

    /// The Kubernetes service account the token speaks for, from the `sub` claim
    /// `system:serviceaccount:<namespace>:<name>` and/or the `kubernetes.io` claims
    /// (`namespace`, `serviceaccount.name`). When both are present they must agree.
    /// Names must be Kubernetes names (namespace: DNS label; account: DNS subdomain).
    pub fn service_account(&self) -> Result<ServiceAccount, JwtError> {
        let from_sub = self
            .subject()
            .and_then(|s| s.strip_prefix("system:serviceaccount:"))
            .map(|rest| match rest.split_once(':') {
                Some((ns, sa)) => ServiceAccount::new(ns, sa),
                None => Err(JwtError::MissingServiceAccount {
                    reason: "sub system:serviceaccount: without <namespace>:<name>",
                }),
            })
            .transpose()?;
        let from_claims = match self.claims.get("kubernetes.io") {
            None => None,
            Some(k8s) => {
                let ns = k8s.get("namespace").and_then(Value::as_str);
                let sa = k8s
                    .get("serviceaccount")
                    .and_then(|sa| sa.get("name"))
                    .and_then(Value::as_str);
                match (ns, sa) {
                    (Some(ns), Some(sa)) => Some(ServiceAccount::new(ns, sa)?),
                    _ => {
                        return Err(JwtError::MissingServiceAccount {
                            reason: "kubernetes.io claim without namespace and serviceaccount.name",
                        });
                    }
                }
            }
        };
        match (from_sub, from_claims) {
            (Some(a), Some(b)) if a != b => Err(JwtError::ConflictingServiceAccount),
            (Some(a), _) | (None, Some(a)) => Ok(a),
            (None, None) => Err(JwtError::MissingServiceAccount {
                reason: "no system:serviceaccount sub and no kubernetes.io claim",
            }),
        }
    }
}

/// A NumericDate claim (at most `MAX_NUMERIC_DATE`, so it fits an `i64`) as a `SystemTime`.
fn from_unix(secs: u64) -> SystemTime {
    crate::timestamp::from_unix_secs(i64::try_from(secs).unwrap_or(MAX_NUMERIC_DATE as i64))
}

// === impl ServiceAccount ===

/// A Kubernetes service account named by a token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAccount {
    /// The namespace.
    pub namespace: String,
    /// The service account name.
    pub name: String,
}

impl ServiceAccount {
    /// A service account from its namespace (an RFC 1123 label) and name (an RFC 1123
    /// subdomain), the rules Kubernetes applies; anything else is refused.
    pub fn new(namespace: &str, name: &str) -> Result<ServiceAccount, JwtError> {
        if !is_dns_label(namespace) {
            return Err(JwtError::MissingServiceAccount {
                reason: "namespace is not a Kubernetes namespace name",
            });
        }
        if name.len() > 253 || !name.split('.').all(is_dns_label) {
            return Err(JwtError::MissingServiceAccount {
                reason: "service account is not a Kubernetes object name",
            });
        }
        Ok(ServiceAccount {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// RFC 1123 label: 1-63 of `[a-z0-9-]`, starting and ending alphanumeric.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

// === impl Validation ===

/// What a verified token must also satisfy: issuer, audiences, expiry required or not,
/// and the clock skew used by [`Validation::verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validation {
    /// The exact `iss` required, if any.
    pub issuer: Option<String>,
    /// Accepted audiences; the token's `aud` must hold at least one. Empty: any audience
    /// (and none) is accepted, as Istio's `jwtRules.audiences`.
    pub audiences: Vec<String>,
    /// Allowed clock skew on `exp`/`nbf` (default [`DEFAULT_LEEWAY`]).
    pub leeway: Duration,
    /// Refuse tokens with no `exp` (default false, as Envoy's `require_expiration`). The CA
    /// sets this: a bearer token without expiry is a permanent credential.
    pub require_expiration: bool,
}

impl Default for Validation {
    fn default() -> Self {
        Validation {
            issuer: None,
            audiences: Vec::new(),
            leeway: DEFAULT_LEEWAY,
            require_expiration: false,
        }
    }
}

impl Validation {
    /// Verify `token` against `jwks` at `now` with this policy's leeway, then [`check`] it.
    ///
    /// [`check`]: Validation::check
    pub fn verify(
        &self,
        token: &str,
        jwks: &Jwks,
        now: SystemTime,
    ) -> Result<VerifiedJwt, JwtError> {
        let jwt = verify(token, jwks, now, self.leeway)?;
        self.check(&jwt)?;
        Ok(jwt)
    }

    /// Check a verified token's issuer, audiences and expiry presence against this policy.
    pub fn check(&self, jwt: &VerifiedJwt) -> Result<(), JwtError> {
        if self.require_expiration && jwt.registered.exp.is_none() {
            return Err(JwtError::MissingExpiration);
        }
        if let Some(expected) = self
            .issuer
            .as_ref()
            .filter(|iss| jwt.issuer() != Some(iss.as_str()))
        {
            return Err(JwtError::IssuerMismatch {
                expected: expected.clone(),
                found: jwt.issuer().map_or_else(|| "(none)".into(), untrusted),
            });
        }
        if !self.audiences.is_empty() && !jwt.audiences().iter().any(|a| self.audiences.contains(a))
        {
            return Err(JwtError::AudienceMismatch {
                expected: self.audiences.clone(),
                found: jwt.audiences().iter().map(|a| untrusted(a)).collect(),
            });
        }
        Ok(())
    }
}

// === impl IssuerSet ===

/// The issuers whose tokens are accepted, each with its key set and policy, as the CA's
/// `--jwt-issuer`/`--jwks` pairs or Envoy's providers: a token is verified against the entry
/// its (unverified) `iss` names, and refused when no entry matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IssuerSet {
    issuers: std::collections::BTreeMap<String, (Jwks, Validation)>,
}

impl IssuerSet {
    /// An empty set (refuses every token).
    pub fn new() -> IssuerSet {
        IssuerSet::default()
    }

    /// Accept tokens from `issuer`, verified with `jwks` and checked with `validation`
    /// (whose `issuer` is set to `issuer`). Replaces an earlier entry for the same issuer.
    pub fn insert(&mut self, issuer: impl Into<String>, jwks: Jwks, mut validation: Validation) {
        let issuer = issuer.into();
        validation.issuer = Some(issuer.clone());
        self.issuers.insert(issuer, (jwks, validation));
    }

    /// The configured issuers, sorted.
    pub fn issuers(&self) -> impl Iterator<Item = &str> {
        self.issuers.keys().map(String::as_str)
    }

    /// Whether no issuer is configured.
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Verify `token` with the key set and policy of the issuer it names.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<VerifiedJwt, JwtError> {
        self.verify_parsed(UnverifiedJwt::parse(token)?, now)
    }

    /// [`IssuerSet::verify`] for a token already parsed (a caller that reports the claimed
    /// issuer in its own words).
    pub fn verify_parsed(
        &self,
        parsed: UnverifiedJwt<'_>,
        now: SystemTime,
    ) -> Result<VerifiedJwt, JwtError> {
        let Some((jwks, validation)) = parsed
            .unverified_issuer()
            .and_then(|iss| self.issuers.get(iss))
        else {
            return Err(JwtError::UnknownIssuer {
                issuer: parsed
                    .unverified_issuer()
                    .map_or_else(|| "(none)".into(), untrusted),
            });
        };
        let jwt = parsed.verify(jwks, now, validation.leeway)?;
        validation.check(&jwt)?;
        Ok(jwt)
    }
}
