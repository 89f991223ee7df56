//! JSON Web Keys (RFC 7517) for signature verification, and the algorithms they serve.

use std::fmt;

use base64::Engine as _;
use ring::signature::{self, UnparsedPublicKey};
use rustls_pki_types::pem::{PemObject as _, SectionKind};
use serde_json::{Map, Value, json};
use x509_parser::prelude::FromDer as _;

use super::JwtError;
use super::error::untrusted;

/// base64url without padding, strict (RFC 7515 §2): no `=`, canonical trailing bits.
pub(crate) const B64: base64::engine::GeneralPurpose =
    base64::engine::general_purpose::URL_SAFE_NO_PAD;

// === impl Algorithm ===

/// A JWS algorithm this module verifies (the set Istio's RequestAuthentication accepts,
/// minus HMAC, plus nothing else).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
    /// RSASSA-PSS with SHA-256 (MGF1 SHA-256, salt 32 bytes).
    Ps256,
    /// RSASSA-PSS with SHA-384.
    Ps384,
    /// RSASSA-PSS with SHA-512.
    Ps512,
    /// ECDSA P-256 with SHA-256; JOSE signature is raw `r || s` (64 bytes).
    Es256,
    /// ECDSA P-384 with SHA-384; JOSE signature is raw `r || s` (96 bytes).
    Es384,
    /// EdDSA over Ed25519 (RFC 8037).
    EdDsa,
}

impl Algorithm {
    /// Every accepted algorithm.
    pub const ALL: [Algorithm; 9] = [
        Algorithm::Rs256,
        Algorithm::Rs384,
        Algorithm::Rs512,
        Algorithm::Ps256,
        Algorithm::Ps384,
        Algorithm::Ps512,
        Algorithm::Es256,
        Algorithm::Es384,
        Algorithm::EdDsa,
    ];

    /// The JOSE name (`RS256`, `EdDSA`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Rs256 => "RS256",
            Algorithm::Rs384 => "RS384",
            Algorithm::Rs512 => "RS512",
            Algorithm::Ps256 => "PS256",
            Algorithm::Ps384 => "PS384",
            Algorithm::Ps512 => "PS512",
            Algorithm::Es256 => "ES256",
            Algorithm::Es384 => "ES384",
            Algorithm::EdDsa => "EdDSA",
        }
    }

    /// The algorithm with this exact (case-sensitive) JOSE name, if accepted.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.as_str() == name)
    }

    /// The kind of key that verifies this algorithm.
    pub fn key_type(self) -> KeyType {
        match self {
            Algorithm::Rs256
            | Algorithm::Rs384
            | Algorithm::Rs512
            | Algorithm::Ps256
            | Algorithm::Ps384
            | Algorithm::Ps512 => KeyType::Rsa,
            Algorithm::Es256 => KeyType::EcP256,
            Algorithm::Es384 => KeyType::EcP384,
            Algorithm::EdDsa => KeyType::Ed25519,
        }
    }

    fn rsa_parameters(self) -> Option<&'static signature::RsaParameters> {
        Some(match self {
            Algorithm::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Algorithm::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            Algorithm::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            Algorithm::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
            Algorithm::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
            Algorithm::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
            _ => return None,
        })
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl KeyType ===

/// The kind of a verification key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyType {
    /// RSA, 2048 to 8192 bits (`kty: RSA`).
    Rsa,
    /// ECDSA on P-256 (`kty: EC`, `crv: P-256`).
    EcP256,
    /// ECDSA on P-384 (`kty: EC`, `crv: P-384`).
    EcP384,
    /// Ed25519 (`kty: OKP`, `crv: Ed25519`).
    Ed25519,
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyType::Rsa => "RSA",
            KeyType::EcP256 => "EC P-256",
            KeyType::EcP384 => "EC P-384",
            KeyType::Ed25519 => "OKP Ed25519",
        })
    }
}

// === impl Jwk ===

#[derive(Clone, PartialEq, Eq)]
enum Material {
    /// Modulus and exponent, big-endian, no leading zero bytes.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Coordinates, each exactly the field size.
    Ec {
        key_type: KeyType,
        x: Vec<u8>,
        y: Vec<u8>,
    },
    Ed25519 {
        x: Vec<u8>,
    },
}

/// One public verification key from a JWK set (or a PEM public key).
#[derive(Clone, PartialEq, Eq)]
pub struct Jwk {
    kid: Option<String>,
    alg: Option<Algorithm>,
    key_use: Option<String>,
    material: Material,
}

impl fmt::Debug for Jwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwk")
            .field("kid", &self.kid)
            .field("type", &self.key_type())
            .field("alg", &self.alg)
            .field("use", &self.key_use)
            .field("thumbprint", &self.thumbprint())
            .finish()
    }
}

impl Jwk {
    /// Parse one JWK object (RFC 7517 §4, RFC 7518 §6, RFC 8037). Refuses private keys
    /// (members `d`, `p`, ...), unknown key types and curves, RSA moduli outside 2048-8192
    /// bits, EC coordinates of the wrong length, `use` other than `sig`, and an `alg` that
    /// is not an accepted algorithm for this key type.
    pub fn from_json(value: &Value) -> Result<Jwk, JwtError> {
        Jwk::parse_object(value).map_err(|reason| JwtError::InvalidKeySet { reason })
    }

    fn parse_object(value: &Value) -> Result<Jwk, String> {
        let obj = value.as_object().ok_or("JWK is not a JSON object")?;
        let kty = str_member(obj, "kty")?.ok_or("missing kty")?;
        if kty == "oct" {
            return Err("kty oct (shared secret) keys are not accepted".into());
        }
        for private in ["d", "p", "q", "dp", "dq", "qi", "oth", "k"] {
            if obj.contains_key(private) {
                return Err(format!(
                    "holds private or secret key material (member {private}); publish only public keys"
                ));
            }
        }
        let kid = str_member(obj, "kid")?.map(str::to_owned);
        let key_use = str_member(obj, "use")?.map(str::to_owned);
        if let Some(u) = key_use.as_deref().filter(|u| *u != "sig") {
            return Err(format!("use is {}, not sig", untrusted(u)));
        }
        let alg = match str_member(obj, "alg")? {
            None => None,
            Some(name) => Some(Algorithm::from_name(name).ok_or_else(|| {
                format!("alg {} is not an accepted JWS algorithm", untrusted(name))
            })?),
        };
        let material = match kty {
            "RSA" => {
                let n = strip_leading_zeros(b64_member(obj, "n")?);
                let e = strip_leading_zeros(b64_member(obj, "e")?);
                check_rsa(&n, &e)?;
                Material::Rsa { n, e }
            }
            "EC" => {
                let crv = match str_member(obj, "crv")? {
                    Some(crv) => crv,
                    None => return Err("EC key without crv".into()),
                };
                let (key_type, len) = match crv {
                    "P-256" => (KeyType::EcP256, 32),
                    "P-384" => (KeyType::EcP384, 48),
                    other => return Err(format!("EC curve {} not supported", untrusted(other))),
                };
                let x = b64_member(obj, "x")?;
                let y = b64_member(obj, "y")?;
                if x.len() != len || y.len() != len {
                    return Err(format!("{crv} coordinates must be {len} bytes each"));
                }
                check_ec_point(key_type, &x, &y)?;
                Material::Ec { key_type, x, y }
            }
            "OKP" => {
                match str_member(obj, "crv")? {
                    Some("Ed25519") => {}
                    Some(other) => {
                        return Err(format!("OKP curve {} not supported", untrusted(other)));
                    }
                    None => return Err("OKP key without crv".into()),
                }
                let x = b64_member(obj, "x")?;
                if x.len() != signature::ED25519_PUBLIC_KEY_LEN {
                    return Err("Ed25519 x must be 32 bytes".into());
                }
                Material::Ed25519 { x }
            }
            other => return Err(format!("kty {} not supported", untrusted(other))),
        };
        let jwk = Jwk {
            kid,
            alg,
            key_use,
            material,
        };
        if let Some(alg) = jwk.alg.filter(|a| a.key_type() != jwk.key_type()) {
            return Err(format!("alg {alg} does not fit a {} key", jwk.key_type()));
        }
        Ok(jwk)
    }

    /// A key from a DER SubjectPublicKeyInfo (RSA, EC P-256/P-384, Ed25519), with no kid.
    pub fn from_spki_der(der: &[u8]) -> Result<Jwk, JwtError> {
        let invalid = |reason: &str| JwtError::InvalidKeySet {
            reason: format!("public key: {reason}"),
        };
        let (rest, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der)
            .map_err(|_| invalid("not a DER SubjectPublicKeyInfo"))?;
        if !rest.is_empty() {
            return Err(invalid("trailing bytes after SubjectPublicKeyInfo"));
        }
        let oid = &spki.algorithm.algorithm;
        let material = if *oid == x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION {
            match spki.parsed() {
                Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => {
                    let n = strip_leading_zeros(rsa.modulus.to_vec());
                    let e = strip_leading_zeros(rsa.exponent.to_vec());
                    check_rsa(&n, &e).map_err(|r| invalid(&r))?;
                    Material::Rsa { n, e }
                }
                _ => return Err(invalid("bad RSA public key")),
            }
        } else if *oid == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or_else(|| invalid("EC key without named curve"))?;
            let (key_type, len) = if curve == x509_parser::oid_registry::OID_EC_P256 {
                (KeyType::EcP256, 32)
            } else if curve == x509_parser::oid_registry::OID_NIST_EC_P384 {
                (KeyType::EcP384, 48)
            } else {
                return Err(invalid("EC curve not supported (P-256 and P-384 are)"));
            };
            let point: &[u8] = &spki.subject_public_key.data;
            if point.len() != 1 + 2 * len || point[0] != 0x04 {
                return Err(invalid(
                    "EC point is not an uncompressed point of its curve",
                ));
            }
            let (x, y) = (point[1..=len].to_vec(), point[1 + len..].to_vec());
            check_ec_point(key_type, &x, &y).map_err(|r| invalid(&r))?;
            Material::Ec { key_type, x, y }
        } else if *oid == x509_parser::oid_registry::OID_SIG_ED25519 {
            let x = spki.subject_public_key.data.to_vec();
            if x.len() != signature::ED25519_PUBLIC_KEY_LEN {
                return Err(invalid("Ed25519 key must be 32 bytes"));
            }
            Material::Ed25519 { x }
        } else {
            return Err(invalid(
                "key algorithm not supported (RSA, EC, Ed25519 are)",
            ));
        };
        Ok(Jwk {
            kid: None,
            alg: None,
            key_use: None,
            material,
        })
    }

    /// This key with its `kid` set.
    pub fn with_kid(mut self, kid: impl Into<String>) -> Jwk {
        self.kid = Some(kid.into());
        self
    }

    /// This key restricted to one algorithm (`alg` member). Errors when the algorithm does
    /// not fit the key type.
    pub fn with_algorithm(mut self, alg: Algorithm) -> Result<Jwk, JwtError> {
        if alg.key_type() != self.key_type() {
            return Err(JwtError::InvalidKeySet {
                reason: format!("alg {alg} does not fit a {} key", self.key_type()),
            });
        }
        self.alg = Some(alg);
        Ok(self)
    }

    /// The key id (`kid`), if any.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The algorithm this key is restricted to (`alg`), if any.
    pub fn algorithm(&self) -> Option<Algorithm> {
        self.alg
    }

    /// The `use` member, if any (always `sig` for a parsed key).
    pub fn key_use(&self) -> Option<&str> {
        self.key_use.as_deref()
    }

    /// The key type.
    pub fn key_type(&self) -> KeyType {
        match &self.material {
            Material::Rsa { .. } => KeyType::Rsa,
            Material::Ec { key_type, .. } => *key_type,
            Material::Ed25519 { .. } => KeyType::Ed25519,
        }
    }

    /// The RFC 7638 JWK thumbprint: base64url(SHA-256) of the canonical JSON of the
    /// required public members. Stable across kid/alg/use changes; a good default `kid`.
    pub fn thumbprint(&self) -> String {
        // RFC 7638 §3: required members only, lexicographic order, no whitespace. Every
        // value here is base64url or a fixed name, so no JSON escaping is needed.
        let canonical = match &self.material {
            Material::Rsa { n, e } => format!(
                r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
                B64.encode(e),
                B64.encode(n)
            ),
            Material::Ec { key_type, x, y } => format!(
                r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
                curve_name(*key_type),
                B64.encode(x),
                B64.encode(y)
            ),
            Material::Ed25519 { x } => {
                format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, B64.encode(x))
            }
        };
        B64.encode(ring::digest::digest(
            &ring::digest::SHA256,
            canonical.as_bytes(),
        ))
    }

    /// The public JWK as JSON (`kty`, key members, and `kid`, `alg`, `use` when set).
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        match &self.material {
            Material::Rsa { n, e } => {
                obj.insert("kty".into(), "RSA".into());
                obj.insert("n".into(), B64.encode(n).into());
                obj.insert("e".into(), B64.encode(e).into());
            }
            Material::Ec { key_type, x, y } => {
                obj.insert("kty".into(), "EC".into());
                obj.insert("crv".into(), curve_name(*key_type).into());
                obj.insert("x".into(), B64.encode(x).into());
                obj.insert("y".into(), B64.encode(y).into());
            }
            Material::Ed25519 { x } => {
                obj.insert("kty".into(), "OKP".into());
                obj.insert("crv".into(), "Ed25519".into());
                obj.insert("x".into(), B64.encode(x).into());
            }
        }
        if let Some(kid) = &self.kid {
            obj.insert("kid".into(), kid.clone().into());
        }
        if let Some(alg) = self.alg {
            obj.insert("alg".into(), alg.as_str().into());
        }
        if let Some(u) = &self.key_use {
            obj.insert("use".into(), u.clone().into());
        }
        Value::Object(obj)
    }

    /// Whether this key may verify a token signed with `alg`.
    pub(crate) fn fits(&self, alg: Algorithm) -> bool {
        alg.key_type() == self.key_type() && self.alg.is_none_or(|a| a == alg)
    }

    /// Verify `signature` over `message` with this key. The caller checked [`Jwk::fits`].
    pub(crate) fn verify(&self, alg: Algorithm, message: &[u8], sig: &[u8]) -> bool {
        match (&self.material, alg) {
            (Material::Rsa { n, e }, _) => match alg.rsa_parameters() {
                Some(params) => signature::RsaPublicKeyComponents { n, e }
                    .verify(params, message, sig)
                    .is_ok(),
                None => false,
            },
            (Material::Ec { key_type, x, y }, Algorithm::Es256 | Algorithm::Es384) => {
                let verifier: &'static dyn signature::VerificationAlgorithm = match key_type {
                    KeyType::EcP256 if alg == Algorithm::Es256 => {
                        &signature::ECDSA_P256_SHA256_FIXED
                    }
                    KeyType::EcP384 if alg == Algorithm::Es384 => {
                        &signature::ECDSA_P384_SHA384_FIXED
                    }
                    _ => return false,
                };
                let point = uncompressed_point(x, y);
                UnparsedPublicKey::new(verifier, &point)
                    .verify(message, sig)
                    .is_ok()
            }
            (Material::Ed25519 { x }, Algorithm::EdDsa) => {
                UnparsedPublicKey::new(&signature::ED25519, x)
                    .verify(message, sig)
                    .is_ok()
            }
            _ => false,
        }
    }
}

fn curve_name(key_type: KeyType) -> &'static str {
    match key_type {
        KeyType::EcP384 => "P-384",
        _ => "P-256",
    }
}

fn uncompressed_point(x: &[u8], y: &[u8]) -> Vec<u8> {
    let mut point = Vec::with_capacity(1 + x.len() + y.len());
    point.push(0x04);
    point.extend_from_slice(x);
    point.extend_from_slice(y);
    point
}

fn str_member<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, String> {
    match obj.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("member {name} is not a string")),
    }
}

fn b64_member(obj: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let text = str_member(obj, name)?.ok_or_else(|| format!("missing {name}"))?;
    B64.decode(text)
        .map_err(|_| format!("member {name} is not unpadded base64url"))
}

fn strip_leading_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros);
    bytes
}

/// The checks ring makes when it verifies, made up front so a bad key is reported when the
/// key set is loaded rather than as a bad signature later.
fn check_rsa(n: &[u8], e: &[u8]) -> Result<(), String> {
    let bits = match n.first() {
        Some(top) => n.len() * 8 - top.leading_zeros() as usize,
        None => 0,
    };
    if !(2048..=8192).contains(&bits) {
        return Err(format!(
            "RSA modulus of {bits} bits (2048 to 8192 accepted)"
        ));
    }
    if e.is_empty() || e.len() > 5 {
        return Err("RSA exponent out of range".into());
    }
    let value = e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    if value < 3 || value % 2 == 0 || value > (1 << 33) - 1 {
        return Err("RSA exponent must be odd, at least 3 and below 2^33".into());
    }
    Ok(())
}

/// Check the point is on its curve, so a bad key is reported when the key set is loaded
/// rather than as a bad signature later. ring has no ECDSA public-key validation call, but
/// ECDH validates the peer's point, so agree with a throwaway ephemeral key.
fn check_ec_point(key_type: KeyType, x: &[u8], y: &[u8]) -> Result<(), String> {
    let alg = match key_type {
        KeyType::EcP256 => &ring::agreement::ECDH_P256,
        KeyType::EcP384 => &ring::agreement::ECDH_P384,
        _ => return Ok(()),
    };
    let rng = ring::rand::SystemRandom::new();
    let ours = ring::agreement::EphemeralPrivateKey::generate(alg, &rng)
        .map_err(|_| "cannot check EC point (no randomness)".to_string())?;
    let point = uncompressed_point(x, y);
    let peer = ring::agreement::UnparsedPublicKey::new(alg, &point);
    ring::agreement::agree_ephemeral(ours, &peer, |_| ())
        .map_err(|_| "EC point is not on its curve".to_string())
}

// === impl Jwks ===

/// A key that a JWK set held but that cannot be used, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedKey {
    /// Position of the key in the set's `keys` array (or PEM block index).
    pub index: usize,
    /// The key's `kid`, if it had a readable one.
    pub kid: Option<String>,
    /// Why it was skipped.
    pub reason: String,
}

impl fmt::Display for SkippedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key {}", self.index)?;
        if let Some(kid) = &self.kid {
            write!(f, " (kid {})", untrusted(kid))?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// A set of public verification keys with at least one usable key.
///
/// Keys that cannot be used (unknown `kty` or curve, weak RSA, `use: enc`, private
/// material...) are skipped, as RFC 7517 §5 asks, and listed in [`Jwks::skipped`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jwks {
    keys: Vec<Jwk>,
    skipped: Vec<SkippedKey>,
}

impl Jwks {
    /// Parse a key set from text: a JWK set (`{"keys": [...]}`), a single JWK (`{"kty":
    /// ...}`), or PEM `PUBLIC KEY` blocks.
    pub fn parse(text: &str) -> Result<Jwks, JwtError> {
        if text.trim_start().starts_with('{') {
            Jwks::from_json(text)
        } else {
            Jwks::from_pem(text)
        }
    }

    /// Parse a JWK set document, or a document holding a single JWK.
    pub fn from_json(text: &str) -> Result<Jwks, JwtError> {
        let doc: Value = serde_json::from_str(text).map_err(|e| JwtError::InvalidKeySet {
            reason: format!("not JSON (line {}, column {})", e.line(), e.column()),
        })?;
        let obj = doc.as_object().ok_or_else(|| JwtError::InvalidKeySet {
            reason: "not a JSON object".into(),
        })?;
        let entries: Vec<&Value> = match obj.get("keys") {
            Some(Value::Array(keys)) => keys.iter().collect(),
            Some(_) => {
                return Err(JwtError::InvalidKeySet {
                    reason: "keys is not an array".into(),
                });
            }
            None if obj.contains_key("kty") => vec![&doc],
            None => {
                return Err(JwtError::InvalidKeySet {
                    reason: "neither a JWK set (keys) nor a JWK (kty)".into(),
                });
            }
        };
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (index, entry) in entries.into_iter().enumerate() {
            match Jwk::parse_object(entry) {
                Ok(key) => keys.push(key),
                Err(reason) => skipped.push(SkippedKey {
                    index,
                    kid: entry.get("kid").and_then(Value::as_str).map(str::to_owned),
                    reason,
                }),
            }
        }
        Jwks::finish(keys, skipped)
    }

    /// Parse PEM `PUBLIC KEY` (SubjectPublicKeyInfo) blocks. Each key gets its RFC 7638
    /// thumbprint as `kid`. Private-key blocks are refused.
    pub fn from_pem(text: &str) -> Result<Jwks, JwtError> {
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (index, item) in <(SectionKind, Vec<u8>)>::pem_slice_iter(text.as_bytes()).enumerate() {
            let (kind, der) = item.map_err(|_| JwtError::InvalidKeySet {
                reason: format!("PEM block {index} is malformed"),
            })?;
            match kind {
                SectionKind::PublicKey => match Jwk::from_spki_der(&der) {
                    Ok(key) => {
                        let kid = key.thumbprint();
                        keys.push(key.with_kid(kid));
                    }
                    Err(err) => skipped.push(SkippedKey {
                        index,
                        kid: None,
                        reason: err.to_string(),
                    }),
                },
                SectionKind::PrivateKey
                | SectionKind::RsaPrivateKey
                | SectionKind::EcPrivateKey => {
                    return Err(JwtError::InvalidKeySet {
                        reason: "PEM holds a private key; give the public key".into(),
                    });
                }
                _ => skipped.push(SkippedKey {
                    index,
                    kid: None,
                    reason: "PEM block is not a PUBLIC KEY".into(),
                }),
            }
        }
        if keys.is_empty() && skipped.is_empty() {
            return Err(JwtError::InvalidKeySet {
                reason: "no PEM blocks and not JSON".into(),
            });
        }
        Jwks::finish(keys, skipped)
    }

    /// A key set of the given keys; errors when there are none.
    pub fn from_keys(keys: Vec<Jwk>) -> Result<Jwks, JwtError> {
        Jwks::finish(keys, Vec::new())
    }

    fn finish(keys: Vec<Jwk>, skipped: Vec<SkippedKey>) -> Result<Jwks, JwtError> {
        if keys.is_empty() {
            return Err(JwtError::NoUsableKeys {
                skipped: skipped.iter().map(ToString::to_string).collect(),
            });
        }
        Ok(Jwks { keys, skipped })
    }

    /// The usable keys, in document order.
    pub fn keys(&self) -> &[Jwk] {
        &self.keys
    }

    /// The keys that were skipped, with reasons.
    pub fn skipped(&self) -> &[SkippedKey] {
        &self.skipped
    }

    /// The usable keys as a JWK set document.
    pub fn to_json(&self) -> Value {
        json!({ "keys": self.keys.iter().map(Jwk::to_json).collect::<Vec<_>>() })
    }
}

// === raw constructors for keys we hold ourselves (signing side) ===

impl Jwk {
    /// An RSA public key from big-endian modulus and exponent.
    pub(crate) fn from_rsa_components(n: &[u8], e: &[u8]) -> Result<Jwk, JwtError> {
        let n = strip_leading_zeros(n.to_vec());
        let e = strip_leading_zeros(e.to_vec());
        check_rsa(&n, &e).map_err(|reason| JwtError::InvalidKeySet { reason })?;
        Ok(Jwk::bare(Material::Rsa { n, e }))
    }

    /// An EC public key from its uncompressed SEC1 point.
    pub(crate) fn from_ec_point(key_type: KeyType, point: &[u8]) -> Result<Jwk, JwtError> {
        let len = match key_type {
            KeyType::EcP256 => 32,
            KeyType::EcP384 => 48,
            _ => 0,
        };
        if len == 0 || point.len() != 1 + 2 * len || point[0] != 0x04 {
            return Err(JwtError::InvalidKeySet {
                reason: "not an uncompressed P-256/P-384 point".into(),
            });
        }
        Ok(Jwk::bare(Material::Ec {
            key_type,
            x: point[1..=len].to_vec(),
            y: point[1 + len..].to_vec(),
        }))
    }

    /// An Ed25519 public key.
    pub(crate) fn from_ed25519(x: &[u8]) -> Result<Jwk, JwtError> {
        if x.len() != signature::ED25519_PUBLIC_KEY_LEN {
            return Err(JwtError::InvalidKeySet {
                reason: "Ed25519 key must be 32 bytes".into(),
            });
        }
        Ok(Jwk::bare(Material::Ed25519 { x: x.to_vec() }))
    }

    fn bare(material: Material) -> Jwk {
        Jwk {
            kid: None,
            alg: None,
            key_use: None,
            material,
        }
    }
}

impl Jwk {
    /// This key marked `use: sig`.
    pub(crate) fn with_use_sig(mut self) -> Jwk {
        self.key_use = Some("sig".into());
        self
    }
}
