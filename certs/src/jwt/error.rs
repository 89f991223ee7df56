//! Why a token, a key set or a signing request was refused.
//!
//! No variant ever carries the token itself. Values copied from a token or key set (an
//! algorithm name, a key id, an issuer) are shortened and escaped by [`untrusted`] so that a
//! hostile token cannot flood or forge log lines.

use std::fmt;

/// The part of a compact JWS that a [`JwtError::Malformed`] refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenPart {
    /// The token as a whole (size, number of segments).
    Token,
    /// The JOSE header (first segment).
    Header,
    /// The claims set (second segment).
    Payload,
    /// The signature (third segment).
    Signature,
}

impl fmt::Display for TokenPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenPart::Token => "token",
            TokenPart::Header => "header",
            TokenPart::Payload => "payload",
            TokenPart::Signature => "signature",
        })
    }
}

/// Errors from parsing key sets, verifying, validating and signing JWTs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The token is not a well-formed compact JWS: wrong number of segments, bad base64url,
    /// JSON that is not an object, a header parameter of the wrong type, or too large.
    #[error("malformed JWT {part}: {reason}")]
    Malformed {
        /// Which part of the token is malformed.
        part: TokenPart,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The header says `alg: none`: an unsecured JWT, never accepted.
    #[error("unsecured JWT (alg \"none\") refused")]
    UnsecuredToken,
    /// The header names an HMAC algorithm (`HS256`, ...). Shared-secret tokens are not
    /// accepted: a public JWKS must never be usable as an HMAC key.
    #[error("symmetric JWT algorithm {alg} refused: only public-key algorithms are accepted")]
    SymmetricAlgorithm {
        /// The algorithm named by the token (escaped).
        alg: String,
    },
    /// The header names an algorithm outside the accepted set (RS256/384/512,
    /// PS256/384/512, ES256, ES384, EdDSA).
    #[error("unsupported JWT algorithm {alg}")]
    UnsupportedAlgorithm {
        /// The algorithm named by the token (escaped).
        alg: String,
    },
    /// The header has a `crit` parameter. No JWS extension is understood here, so RFC 7515
    /// §4.1.11 requires refusing the token.
    #[error("JWT header lists critical extensions (crit), none are supported")]
    CriticalHeader,
    /// The token names a key id (`kid`) that no usable key in the key set has.
    #[error("no key with kid {kid} in the key set")]
    UnknownKid {
        /// The key id named by the token (escaped).
        kid: String,
    },
    /// The key set has no key that can verify this token's algorithm (for example an ES256
    /// token against a set of RSA keys, or keys restricted to another `alg` or `use`).
    #[error("no key in the key set can verify a {alg} signature")]
    NoMatchingKey {
        /// The token's algorithm.
        alg: &'static str,
    },
    /// The signature does not verify with any candidate key.
    #[error("JWT signature does not verify")]
    BadSignature,
    /// A registered claim has the wrong type or an out-of-range value (for example `exp`
    /// that is not a number, or `aud` that is neither a string nor an array of strings).
    #[error("JWT claim {claim}: {reason}")]
    InvalidClaim {
        /// The claim name.
        claim: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The token's `exp` (plus the allowed clock skew) is in the past.
    #[error("JWT expired at {exp} (unix seconds), allowed clock skew {leeway_secs}s")]
    Expired {
        /// The token's `exp` claim, seconds since the Unix epoch.
        exp: u64,
        /// The clock skew that was allowed, in seconds.
        leeway_secs: u64,
    },
    /// The token's `nbf` (minus the allowed clock skew) is in the future.
    #[error("JWT not valid before {nbf} (unix seconds), allowed clock skew {leeway_secs}s")]
    NotYetValid {
        /// The token's `nbf` claim, seconds since the Unix epoch.
        nbf: u64,
        /// The clock skew that was allowed, in seconds.
        leeway_secs: u64,
    },
    /// The validation policy requires an `exp` claim and the token has none.
    #[error("JWT has no exp claim and an expiry is required")]
    MissingExpiration,
    /// The token's issuer is not the expected one.
    #[error("JWT issuer {found} is not the expected issuer {expected}")]
    IssuerMismatch {
        /// The issuer the policy expects.
        expected: String,
        /// The token's issuer (escaped), or `(none)`.
        found: String,
    },
    /// The token's (unverified) issuer is not one of the configured issuers, so there is no
    /// key set to verify it with.
    #[error("JWT issuer {issuer} is not a configured issuer")]
    UnknownIssuer {
        /// The token's issuer (escaped), or `(none)`.
        issuer: String,
    },
    /// None of the token's audiences is an accepted audience.
    #[error(
        "JWT audiences [{}] do not include any accepted audience [{}]",
        found.join(", "),
        expected.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
    )]
    AudienceMismatch {
        /// The audiences the policy accepts.
        expected: Vec<String>,
        /// The token's audiences (escaped); empty when the token has no `aud`.
        found: Vec<String>,
    },
    /// The token proves no Kubernetes service account: neither a
    /// `system:serviceaccount:<ns>:<sa>` subject nor `kubernetes.io` claims.
    #[error("JWT names no Kubernetes service account: {reason}")]
    MissingServiceAccount {
        /// What was missing or wrong.
        reason: &'static str,
    },
    /// The `sub` claim and the `kubernetes.io` claims name different service accounts.
    #[error("JWT sub and kubernetes.io claims name different service accounts")]
    ConflictingServiceAccount,
    /// A key set document is not valid JSON / PEM or has no `keys` array.
    #[error("invalid key set: {reason}")]
    InvalidKeySet {
        /// What is wrong with it.
        reason: String,
    },
    /// A key set parsed, but none of its keys can be used. Each skipped key is listed with
    /// the reason it was skipped.
    #[error("key set has no usable key ({})", skipped.join("; "))]
    NoUsableKeys {
        /// One line per skipped key: its index, its kid if any, and why it was skipped.
        skipped: Vec<String>,
    },
    /// The private key given for signing cannot be used (wrong encoding for its algorithm,
    /// or an algorithm with no JWS equivalent).
    #[error("signing key unusable: {reason}")]
    UnusableSigningKey {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The claims to sign are not a JSON object.
    #[error("JWT claims to sign must be a JSON object")]
    ClaimsNotObject,
}

/// Shorten and escape a value taken from untrusted input before it goes into an error.
pub(crate) fn untrusted(value: &str) -> String {
    const MAX: usize = 64;
    let mut out = String::new();
    for (i, c) in value.chars().enumerate() {
        if i == MAX {
            out.push('…');
            break;
        }
        out.extend(c.escape_debug());
    }
    format!("\"{out}\"")
}

#[cfg(test)]
mod tests {
    use super::untrusted;

    #[test]
    fn untrusted_values_are_escaped_and_capped() {
        assert_eq!(untrusted("a\nb"), "\"a\\nb\"");
        let long = "x".repeat(500);
        let shown = untrusted(&long);
        assert!(shown.chars().count() < 70, "{shown}");
    }
}
