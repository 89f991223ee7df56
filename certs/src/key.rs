//! Private keys: made locally, never printed, zeroized on drop, written 0600 atomically.
//!
//! ECDSA and Ed25519 keys are generated with `ring`. `ring` cannot generate RSA keys and the
//! `rsa` crate carries an open RustSec advisory, so RSA keys (CA tooling only) are generated
//! by running `openssl genpkey` and reading the PKCS#8 PEM from its standard output straight
//! into a zeroizing buffer: the key never touches the disk except through our own 0600
//! write. Existing RSA keys in PKCS#8 (or PKCS#1) are imported with `ring`.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::{Zeroize, Zeroizing};

use crate::der;
use crate::error::Error;

/// Key algorithms we make and accept. Workloads use ECDSA P-256 (the default); RSA and
/// Ed25519 exist for CA tooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum KeyAlgorithm {
    /// ECDSA on NIST P-256, signatures with SHA-256 (the default).
    #[default]
    EcdsaP256,
    /// ECDSA on NIST P-384, signatures with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA 2048-bit, PKCS#1 v1.5 signatures with SHA-256.
    Rsa2048,
    /// RSA 3072-bit, PKCS#1 v1.5 signatures with SHA-256.
    Rsa3072,
    /// RSA 4096-bit, PKCS#1 v1.5 signatures with SHA-256.
    Rsa4096,
}

impl KeyAlgorithm {
    /// The rcgen signature algorithm certificates signed by this key use.
    pub(crate) fn rcgen_alg(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
                &rcgen::PKCS_RSA_SHA256
            }
        }
    }

    /// Whether this is one of the RSA variants.
    pub fn is_rsa(self) -> bool {
        matches!(
            self,
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096
        )
    }

    fn rsa_bits(self) -> Option<u32> {
        match self {
            KeyAlgorithm::Rsa2048 => Some(2048),
            KeyAlgorithm::Rsa3072 => Some(3072),
            KeyAlgorithm::Rsa4096 => Some(4096),
            _ => None,
        }
    }

    /// A short lowercase name: `ec-p256`, `ec-p384`, `ed25519`, `rsa-2048`, ...
    pub fn name(self) -> &'static str {
        match self {
            KeyAlgorithm::EcdsaP256 => "ec-p256",
            KeyAlgorithm::EcdsaP384 => "ec-p384",
            KeyAlgorithm::Ed25519 => "ed25519",
            KeyAlgorithm::Rsa2048 => "rsa-2048",
            KeyAlgorithm::Rsa3072 => "rsa-3072",
            KeyAlgorithm::Rsa4096 => "rsa-4096",
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "ec-p256" | "ecdsa-p256" | "p256" => KeyAlgorithm::EcdsaP256,
            "ec-p384" | "ecdsa-p384" | "p384" => KeyAlgorithm::EcdsaP384,
            "ed25519" => KeyAlgorithm::Ed25519,
            "rsa-2048" | "rsa2048" => KeyAlgorithm::Rsa2048,
            "rsa-3072" | "rsa3072" => KeyAlgorithm::Rsa3072,
            "rsa-4096" | "rsa4096" => KeyAlgorithm::Rsa4096,
            other => {
                return Err(Error::UnsupportedAlgorithm(format!(
                    "key type {other:?} (expected ec-p256, ec-p384, ed25519, rsa-2048, rsa-3072 or rsa-4096)"
                )));
            }
        })
    }
}

/// A private key. No `Debug` derive (it prints `[secret key elided]`), no `Clone` (use
/// [`PrivateKey::clone_key`]), no `Serialize`; the PKCS#8 bytes are zeroized on drop.
///
/// `ring`'s own parsed key state is not zeroized (ring offers no way to); the encoded
/// forms we hold are.
pub struct PrivateKey {
    alg: KeyAlgorithm,
    pkcs8: Zeroizing<Vec<u8>>,
    pair: rcgen::KeyPair,
}

// === impl PrivateKey ===

impl PrivateKey {
    /// Makes a new key. RSA keys come from `openssl genpkey` (see the module docs).
    pub fn generate(alg: KeyAlgorithm) -> Result<Self, Error> {
        let rng = SystemRandom::new();
        let pkcs8: Zeroizing<Vec<u8>> = match alg {
            KeyAlgorithm::EcdsaP256 => Zeroizing::new(
                EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
                    .map_err(|_| Error::KeyGeneration("ECDSA P-256".into()))?
                    .as_ref()
                    .to_vec(),
            ),
            KeyAlgorithm::EcdsaP384 => Zeroizing::new(
                EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, &rng)
                    .map_err(|_| Error::KeyGeneration("ECDSA P-384".into()))?
                    .as_ref()
                    .to_vec(),
            ),
            KeyAlgorithm::Ed25519 => Zeroizing::new(
                Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| Error::KeyGeneration("Ed25519".into()))?
                    .as_ref()
                    .to_vec(),
            ),
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
                let bits = alg.rsa_bits().unwrap_or(4096);
                generate_rsa_with_openssl(bits)?
            }
        };
        let key = Self::from_pkcs8_der(&pkcs8)?;
        if key.alg != alg {
            return Err(Error::KeyGeneration(format!(
                "asked for {alg}, got {}",
                key.alg
            )));
        }
        Ok(key)
    }

    /// Reads a PEM private key: PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`) or PKCS#1
    /// (`RSA PRIVATE KEY`). Encrypted keys are not supported.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, Error> {
        Self::from_pem(pem)
    }

    /// Reads a PEM private key (see [`PrivateKey::from_pkcs8_pem`]).
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        // The decoded DER is zeroized when this function returns.
        let der = Zeroizing::new(
            PrivateKeyDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| Error::InvalidKey(format!("no PEM private key found ({e})")))?,
        );
        match &*der {
            PrivateKeyDer::Pkcs8(k) => Self::from_pkcs8_der(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => {
                let pkcs8 = Zeroizing::new(der::pkcs1_to_pkcs8(k.secret_pkcs1_der()));
                Self::from_pkcs8_der(&pkcs8)
            }
            PrivateKeyDer::Sec1(k) => {
                let pkcs8 = Zeroizing::new(der::sec1_to_pkcs8(k.secret_sec1_der())?);
                Self::from_pkcs8_der(&pkcs8)
            }
            _ => Err(Error::InvalidKey("unsupported private key encoding".into())),
        }
    }

    /// Reads a DER PKCS#8 private key of a supported algorithm.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, Error> {
        let alg = detect_algorithm(der)?;
        let pkcs8 = Zeroizing::new(der.to_vec());
        let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(pkcs8.as_slice()),
            alg.rcgen_alg(),
        )
        .map_err(|e| Error::InvalidKey(e.to_string()))?;
        Ok(Self { alg, pkcs8, pair })
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.alg
    }

    /// The PKCS#8 DER bytes. Handle with care: this is the secret.
    pub fn secret_pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// PKCS#8 PEM (`PRIVATE KEY`), in a buffer zeroized on drop.
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(crate::pem::encode_pem("PRIVATE KEY", &self.pkcs8))
    }

    /// The public key as DER SubjectPublicKeyInfo.
    pub fn public_key_spki_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.pair)
    }

    /// The raw public key bits (what sits inside the SPKI's BIT STRING).
    pub(crate) fn public_key_raw(&self) -> &[u8] {
        self.pair.public_key_raw()
    }

    /// An explicit copy of the key.
    pub fn clone_key(&self) -> PrivateKey {
        // The bytes were accepted once; they are accepted again.
        Self::from_pkcs8_der(&self.pkcs8)
            .unwrap_or_else(|_| unreachable!("a key that parsed once parses again"))
    }

    /// Writes the key as PKCS#8 PEM to `path`, mode 0600, atomically (temp file + rename).
    pub fn write_pem_file(&self, path: &Path) -> Result<(), Error> {
        let pem = self.to_pkcs8_pem();
        write_file_atomic(path, pem.as_bytes(), 0o600).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// Reads a PEM private key file.
    pub fn read_pem_file(path: &Path) -> Result<Self, Error> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?);
        Self::from_pem(&text)
    }

    /// The rcgen key pair used for signing.
    pub(crate) fn rcgen_pair(&self) -> &rcgen::KeyPair {
        &self.pair
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("algorithm", &self.alg)
            .field("key", &"[secret key elided]")
            .finish()
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        // `pkcs8` zeroizes itself; rcgen keeps its own copy of the DER.
        self.pair.zeroize();
    }
}

/// Works out which supported algorithm a PKCS#8 key is, by asking ring to parse it.
fn detect_algorithm(der: &[u8]) -> Result<KeyAlgorithm, Error> {
    let rng = SystemRandom::new();
    if EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng).is_ok() {
        return Ok(KeyAlgorithm::EcdsaP256);
    }
    if EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, der, &rng).is_ok() {
        return Ok(KeyAlgorithm::EcdsaP384);
    }
    if Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).is_ok() {
        return Ok(KeyAlgorithm::Ed25519);
    }
    match RsaKeyPair::from_pkcs8(der) {
        Ok(pair) => match pair.public().modulus_len() * 8 {
            2048 => Ok(KeyAlgorithm::Rsa2048),
            3072 => Ok(KeyAlgorithm::Rsa3072),
            4096 => Ok(KeyAlgorithm::Rsa4096),
            bits => Err(Error::UnsupportedAlgorithm(format!(
                "RSA key of {bits} bits (2048, 3072 or 4096 are accepted)"
            ))),
        },
        Err(e) => Err(Error::InvalidKey(format!(
            "not a PKCS#8 ECDSA P-256/P-384, Ed25519 or RSA key ({e})"
        ))),
    }
}

/// Runs `openssl genpkey` and reads the PKCS#8 PEM from its stdout.
fn generate_rsa_with_openssl(bits: u32) -> Result<Zeroizing<Vec<u8>>, Error> {
    let mut child = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            &format!("rsa_keygen_bits:{bits}"),
            "-outform",
            "PEM",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::KeyGeneration(format!(
                "RSA keys are generated with `openssl genpkey`, which could not be run: {e}"
            ))
        })?;
    // Drain stderr (progress dots, errors) on a thread so neither pipe can fill and stall
    // openssl while we read the key from stdout.
    let stderr = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
            text
        })
    });
    // A 4096-bit key's PKCS#8 PEM is about 3.3 KB: one allocation, never reallocated, so
    // no stray copy of the key is left in freed memory.
    let mut pem = Zeroizing::new(Vec::with_capacity(8192));
    if let Some(mut out) = child.stdout.take() {
        std::io::Read::read_to_end(&mut out, &mut pem)
            .map_err(|e| Error::KeyGeneration(format!("reading openssl output: {e}")))?;
    }
    let status = child
        .wait()
        .map_err(|e| Error::KeyGeneration(format!("waiting for openssl: {e}")))?;
    let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    if !status.success() {
        return Err(Error::KeyGeneration(format!(
            "openssl genpkey failed ({status}): {}",
            stderr.trim()
        )));
    }
    let der = Zeroizing::new(
        PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| Error::KeyGeneration(format!("openssl output is not a PEM key: {e}")))?,
    );
    match &*der {
        PrivateKeyDer::Pkcs8(k) => Ok(Zeroizing::new(k.secret_pkcs8_der().to_vec())),
        _ => Err(Error::KeyGeneration(
            "openssl genpkey did not write PKCS#8".into(),
        )),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, created
/// with `mode` (no window with wider permissions), flushed and synced, then renamed.
pub fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;

    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    let rng = SystemRandom::new();
    let mut suffix = [0u8; 8];
    ring::rand::SecureRandom::fill(&rng, &mut suffix)
        .map_err(|_| std::io::Error::other("random source failed"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        hex::encode(suffix)
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; make it exact.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_and_reload_each_fast_algorithm() {
        for alg in [
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::EcdsaP384,
            KeyAlgorithm::Ed25519,
        ] {
            let key = PrivateKey::generate(alg).unwrap();
            assert_eq!(key.algorithm(), alg);
            let pem = key.to_pkcs8_pem();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
            let again = PrivateKey::from_pkcs8_pem(&pem).unwrap();
            assert_eq!(again.algorithm(), alg);
            assert_eq!(again.public_key_spki_der(), key.public_key_spki_der());
            let copy = key.clone_key();
            assert_eq!(copy.secret_pkcs8_der(), key.secret_pkcs8_der());
        }
    }

    #[test]
    fn rsa_via_openssl_and_import() {
        let key = PrivateKey::generate(KeyAlgorithm::Rsa2048).unwrap();
        assert_eq!(key.algorithm(), KeyAlgorithm::Rsa2048);
        let again = PrivateKey::from_pkcs8_der(key.secret_pkcs8_der()).unwrap();
        assert_eq!(again.public_key_spki_der(), key.public_key_spki_der());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains("[secret key elided]"), "{shown}");
        let b64 = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            key.secret_pkcs8_der(),
        );
        assert!(!shown.contains(&b64[..16]));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(PrivateKey::from_pkcs8_der(b"not a key").is_err());
        assert!(PrivateKey::from_pkcs8_pem("hello").is_err());
        let cert_only = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(PrivateKey::from_pkcs8_pem(cert_only).is_err());
    }

    #[test]
    fn key_file_is_0600_and_replaced_atomically() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        key.write_pem_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = PrivateKey::read_pem_file(&path).unwrap();
        assert_eq!(back.secret_pkcs8_der(), key.secret_pkcs8_der());
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
