//! JSON Web Tokens: key sets (RFC 7517), verification of compact JWS (RFC 7515/7519) for the
//! algorithms Istio accepts, claim policy, and minting tokens with a key we hold.
//!
//! Pure: no I/O, no clock (callers pass `now`), ring only.
//!
//! What is refused, always: `alg: none`, HMAC (`HS*`: a public key set must never become an
//! HMAC secret), any algorithm outside RS256/384/512, PS256/384/512, ES256, ES384 and EdDSA,
//! a token whose algorithm does not fit the key (no RSA key verifies an ES256 token), a
//! `crit` header, malformed base64url or JSON, and wrong-typed registered claims. Errors never
//! contain the token.
//!
//! Clock skew: Envoy's `jwt_authn` allows 60 s on `exp` and `nbf`
//! (`clock_skew_seconds`), so [`DEFAULT_LEEWAY`] is 60 s.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use rampart_certs::jwt::{Jwks, Validation};
//!
//! # fn check(token: &str, jwks_json: &str) -> Result<(), rampart_certs::jwt::JwtError> {
//! let jwks = Jwks::parse(jwks_json)?;
//! let policy = Validation {
//!     issuer: Some("https://issuer.example".into()),
//!     audiences: vec!["istio-ca".into()],
//!     require_expiration: true,
//!     ..Validation::default()
//! };
//! let jwt = policy.verify(token, &jwks, SystemTime::now())?;
//! let account = jwt.service_account()?;
//! println!("{}/{}", account.namespace, account.name);
//! # Ok(()) }
//! ```

mod error;
mod jwk;
mod sign;
mod verify;

#[cfg(test)]
mod tests;

pub use self::error::{JwtError, TokenPart};
pub use self::jwk::{Algorithm, Jwk, Jwks, KeyType, SkippedKey};
pub use self::sign::{JwtSigner, jwks_for, key_thumbprint, public_jwk, sign, signing_algorithm};
pub use self::verify::{
    DEFAULT_LEEWAY, Header, IssuerSet, MAX_TOKEN_LEN, ServiceAccount, UnverifiedJwt, Validation,
    VerifiedJwt, verify,
};
