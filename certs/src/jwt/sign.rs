//! Minting tokens with a key we hold (`rampart token issue`) and publishing its JWKS.

use std::fmt;

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, KeyPair as _};
use serde_json::{Value, json};

use super::JwtError;
use super::jwk::{Algorithm, B64, Jwk, Jwks};
use crate::{KeyAlgorithm, PrivateKey};

/// A signing key loaded into ring, and the JWS algorithm it signs with.
pub(crate) enum Signer {
    Ecdsa(signature::EcdsaKeyPair, Algorithm),
    Ed25519(signature::Ed25519KeyPair),
    Rsa(signature::RsaKeyPair),
}

/// The key families a PKCS#8 signing key can belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SignerKind {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    Rsa,
}

impl Signer {
    /// Load a PKCS#8 DER private key of the given family.
    pub(crate) fn from_pkcs8(kind: SignerKind, pkcs8: &[u8]) -> Result<Signer, JwtError> {
        let rng = SystemRandom::new();
        let bad = |reason| JwtError::UnusableSigningKey { reason };
        Ok(match kind {
            SignerKind::EcdsaP256 => Signer::Ecdsa(
                signature::EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    pkcs8,
                    &rng,
                )
                .map_err(|_| bad("not a PKCS#8 P-256 key"))?,
                Algorithm::Es256,
            ),
            SignerKind::EcdsaP384 => Signer::Ecdsa(
                signature::EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                    pkcs8,
                    &rng,
                )
                .map_err(|_| bad("not a PKCS#8 P-384 key"))?,
                Algorithm::Es384,
            ),
            SignerKind::Ed25519 => Signer::Ed25519(
                signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
                    .map_err(|_| bad("not a PKCS#8 Ed25519 key"))?,
            ),
            SignerKind::Rsa => Signer::Rsa(
                signature::RsaKeyPair::from_pkcs8(pkcs8)
                    .map_err(|_| bad("not a PKCS#8 RSA key of 2048 to 8192 bits"))?,
            ),
        })
    }

    /// The JWS algorithm this key signs with: ES256, ES384, EdDSA or RS256.
    pub(crate) fn algorithm(&self) -> Algorithm {
        match self {
            Signer::Ecdsa(_, alg) => *alg,
            Signer::Ed25519(_) => Algorithm::EdDsa,
            Signer::Rsa(_) => Algorithm::Rs256,
        }
    }

    /// The public half as a JWK (no kid).
    pub(crate) fn public_jwk(&self) -> Result<Jwk, JwtError> {
        match self {
            Signer::Ecdsa(kp, alg) => Jwk::from_ec_point(alg.key_type(), kp.public_key().as_ref()),
            Signer::Ed25519(kp) => Jwk::from_ed25519(kp.public_key().as_ref()),
            Signer::Rsa(kp) => {
                let c: signature::RsaPublicKeyComponents<Vec<u8>> = kp.public().into();
                Jwk::from_rsa_components(&c.n, &c.e)
            }
        }
    }

    /// Sign `claims` (a JSON object) into a compact JWS with header `{alg, kid, typ: JWT}`.
    pub(crate) fn sign(&self, claims: &Value, kid: &str) -> Result<String, JwtError> {
        if !claims.is_object() {
            return Err(JwtError::ClaimsNotObject);
        }
        let header = json!({ "alg": self.algorithm().as_str(), "kid": kid, "typ": "JWT" });
        let mut token = String::new();
        B64.encode_string(header.to_string(), &mut token);
        token.push('.');
        B64.encode_string(claims.to_string(), &mut token);
        let rng = SystemRandom::new();
        let failed = JwtError::UnusableSigningKey {
            reason: "signing failed",
        };
        let sig = match self {
            Signer::Ecdsa(kp, _) => kp
                .sign(&rng, token.as_bytes())
                .map_err(|_| failed.clone())?
                .as_ref()
                .to_vec(),
            Signer::Ed25519(kp) => kp.sign(token.as_bytes()).as_ref().to_vec(),
            Signer::Rsa(kp) => {
                let mut sig = vec![0; kp.public().modulus_len()];
                kp.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    token.as_bytes(),
                    &mut sig,
                )
                .map_err(|_| failed.clone())?;
                sig
            }
        };
        token.push('.');
        B64.encode_string(sig, &mut token);
        Ok(token)
    }

    /// The one-key JWK set that verifies this key's tokens: `kid`, `alg`, `use: sig`.
    pub(crate) fn jwks(&self, kid: &str) -> Result<Jwks, JwtError> {
        let mut jwk = self
            .public_jwk()?
            .with_kid(kid)
            .with_algorithm(self.algorithm())?;
        jwk = jwk.with_use_sig();
        Jwks::from_keys(vec![jwk])
    }
}

// === public API over `PrivateKey` ===

/// The JWS algorithm tokens signed by a key of this algorithm use: ES256 for P-256, ES384
/// for P-384, EdDSA for Ed25519, RS256 for every RSA size.
pub fn signing_algorithm(alg: KeyAlgorithm) -> Algorithm {
    match alg {
        KeyAlgorithm::EcdsaP256 => Algorithm::Es256,
        KeyAlgorithm::EcdsaP384 => Algorithm::Es384,
        KeyAlgorithm::Ed25519 => Algorithm::EdDsa,
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => Algorithm::Rs256,
    }
}

fn signer_kind(alg: KeyAlgorithm) -> SignerKind {
    match alg {
        KeyAlgorithm::EcdsaP256 => SignerKind::EcdsaP256,
        KeyAlgorithm::EcdsaP384 => SignerKind::EcdsaP384,
        KeyAlgorithm::Ed25519 => SignerKind::Ed25519,
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => SignerKind::Rsa,
    }
}

/// A private key loaded once for minting many tokens under one `kid`.
///
/// No `Debug` of the key, no `Clone`. ring's parsed key state is not zeroized (ring offers
/// no way to); the [`PrivateKey`] it came from zeroizes its bytes.
pub struct JwtSigner {
    signer: Signer,
    kid: String,
}

impl fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSigner")
            .field("alg", &self.signer.algorithm())
            .field("kid", &self.kid)
            .field("key", &"[secret key elided]")
            .finish()
    }
}

impl JwtSigner {
    /// Load `key` for signing with key id `kid`.
    pub fn new(key: &PrivateKey, kid: impl Into<String>) -> Result<JwtSigner, JwtError> {
        Ok(JwtSigner {
            signer: Signer::from_pkcs8(signer_kind(key.algorithm()), key.secret_pkcs8_der())?,
            kid: kid.into(),
        })
    }

    /// Load `key` with its RFC 7638 thumbprint as `kid`.
    pub fn with_thumbprint_kid(key: &PrivateKey) -> Result<JwtSigner, JwtError> {
        let signer = Signer::from_pkcs8(signer_kind(key.algorithm()), key.secret_pkcs8_der())?;
        let kid = signer.public_jwk()?.thumbprint();
        Ok(JwtSigner { signer, kid })
    }

    /// The JWS algorithm of the tokens this signs.
    pub fn algorithm(&self) -> Algorithm {
        self.signer.algorithm()
    }

    /// The `kid` put in every token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Sign `claims` (a JSON object) into a compact JWS, header `{alg, kid, typ: "JWT"}`.
    pub fn sign(&self, claims: &Value) -> Result<String, JwtError> {
        self.signer.sign(claims, &self.kid)
    }

    /// The public key set verifying this signer's tokens: one key with `kid`, `alg` and
    /// `use: sig`.
    pub fn jwks(&self) -> Result<Jwks, JwtError> {
        self.signer.jwks(&self.kid)
    }
}

/// Sign `claims` (a JSON object) with `key` into a compact JWS whose header carries `kid`.
/// The algorithm follows the key: see [`signing_algorithm`].
pub fn sign(claims: &Value, key: &PrivateKey, kid: &str) -> Result<String, JwtError> {
    JwtSigner::new(key, kid)?.sign(claims)
}

/// The JWK set (as JSON) that verifies tokens [`sign`]ed by `key` with `kid`.
pub fn jwks_for(key: &PrivateKey, kid: &str) -> Result<Value, JwtError> {
    Ok(JwtSigner::new(key, kid)?.jwks()?.to_json())
}

/// The public half of `key` as a JWK, without `kid`.
pub fn public_jwk(key: &PrivateKey) -> Result<Jwk, JwtError> {
    Signer::from_pkcs8(signer_kind(key.algorithm()), key.secret_pkcs8_der())?.public_jwk()
}

/// The RFC 7638 thumbprint of `key`'s public half: the default `kid`.
pub fn key_thumbprint(key: &PrivateKey) -> Result<String, JwtError> {
    Ok(public_jwk(key)?.thumbprint())
}
