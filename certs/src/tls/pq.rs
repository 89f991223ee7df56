//! The `X25519MLKEM768` hybrid key-exchange group (TLS codepoint 0x11EC,
//! draft-ietf-tls-ecdhe-mlkem), on ring's X25519 and libcrux's ML-KEM-768.
//!
//! Wire layout (ML-KEM first for this group, unlike `SecP256r1MLKEM768`):
//! - client share: ML-KEM-768 encapsulation key (1184 bytes) || X25519 public key (32);
//! - server share: ML-KEM-768 ciphertext (1088) || X25519 public key (32);
//! - shared secret: ML-KEM shared secret (32) || X25519 shared secret (32).
//!
//! Secrets: the ML-KEM decapsulation key and the randomness fed to ML-KEM are zeroized when
//! dropped, and the combined secret is built in a zeroizing buffer before rustls takes its own
//! (zeroizing) copy. ring's X25519 private keys are ring's own ephemeral keys, as in rustls's
//! ring provider. No type here prints key material in `Debug`.

use std::fmt;

use libcrux_ml_kem::mlkem768::{self, MlKem768Ciphertext, MlKem768PrivateKey, MlKem768PublicKey};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::crypto::{ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::ffdhe_groups::FfdheGroup;
use rustls::{Error, NamedGroup, PeerMisbehaved, ProtocolVersion};
use zeroize::{Zeroize, Zeroizing};

/// ML-KEM-768 encapsulation key length.
pub const MLKEM768_ENCAPS_KEY_LEN: usize = 1184;
/// ML-KEM-768 ciphertext length.
pub const MLKEM768_CIPHERTEXT_LEN: usize = 1088;
/// X25519 public key length.
pub const X25519_PUBLIC_LEN: usize = 32;
/// A client's `X25519MLKEM768` key share length (1216).
pub const CLIENT_SHARE_LEN: usize = MLKEM768_ENCAPS_KEY_LEN + X25519_PUBLIC_LEN;
/// A server's `X25519MLKEM768` key share length (1120).
pub const SERVER_SHARE_LEN: usize = MLKEM768_CIPHERTEXT_LEN + X25519_PUBLIC_LEN;
/// The combined shared secret length (64).
pub const SHARED_SECRET_LEN: usize = 64;

/// The `X25519MLKEM768` group, for a rustls `CryptoProvider`'s `kx_groups`.
pub static X25519MLKEM768: &dyn SupportedKxGroup = &X25519MlKem768;

/// See [`X25519MLKEM768`].
#[derive(Debug, Clone, Copy)]
pub struct X25519MlKem768;

fn invalid_share() -> Error {
    Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare)
}

fn rng_failed() -> Error {
    Error::FailedToGetRandomBytes
}

/// X25519 with our ephemeral key and the peer's public key, into `out`. ring refuses a
/// malformed peer key and an all-zero result (a small-order point).
fn x25519_agree(ours: EphemeralPrivateKey, peer: &[u8], out: &mut [u8; 32]) -> Result<(), Error> {
    agreement::agree_ephemeral(ours, &UnparsedPublicKey::new(&X25519, peer), |k| {
        if k.len() == 32 {
            out.copy_from_slice(k);
            true
        } else {
            false
        }
    })
    .map_err(|_| invalid_share())?
    .then_some(())
    .ok_or_else(invalid_share)
}

fn combine(mlkem: &[u8; 32], x25519: &[u8; 32]) -> SharedSecret {
    let mut buf = Zeroizing::new([0u8; SHARED_SECRET_LEN]);
    buf[..32].copy_from_slice(mlkem);
    buf[32..].copy_from_slice(x25519);
    SharedSecret::from(&buf[..])
}

impl X25519MlKem768 {
    /// The client side with the given ML-KEM key-generation seed (d || z) and X25519 randomness.
    pub(crate) fn client_start(
        mlkem_seed: &[u8; 64],
        rng: &dyn SecureRandom,
    ) -> Result<ActiveX25519MlKem768, Error> {
        let (sk, pk) = mlkem768::generate_key_pair(*mlkem_seed).into_parts();
        let x_priv = EphemeralPrivateKey::generate(&X25519, rng).map_err(|_| rng_failed())?;
        let x_pub = x_priv.compute_public_key().map_err(|_| rng_failed())?;
        let mut share = Vec::with_capacity(CLIENT_SHARE_LEN);
        share.extend_from_slice(pk.as_slice());
        share.extend_from_slice(x_pub.as_ref());
        Ok(ActiveX25519MlKem768 {
            mlkem: DecapsulationKey(Box::new(sk)),
            x25519: x_priv,
            share,
        })
    }

    /// The server side with the given ML-KEM encapsulation randomness and X25519 randomness.
    pub(crate) fn server_complete(
        client_share: &[u8],
        mlkem_rand: &[u8; 32],
        rng: &dyn SecureRandom,
    ) -> Result<CompletedKeyExchange, Error> {
        if client_share.len() != CLIENT_SHARE_LEN {
            return Err(invalid_share());
        }
        let (ek, x_peer) = client_share.split_at(MLKEM768_ENCAPS_KEY_LEN);
        let ek = MlKem768PublicKey::try_from(ek).map_err(|_| invalid_share())?;
        // FIPS 203 §7.2 encapsulation-key check (every coefficient reduced mod q).
        if !mlkem768::validate_public_key(&ek) {
            return Err(invalid_share());
        }
        let x_priv = EphemeralPrivateKey::generate(&X25519, rng).map_err(|_| rng_failed())?;
        let x_pub = x_priv.compute_public_key().map_err(|_| rng_failed())?;
        let mut x_ss = Zeroizing::new([0u8; 32]);
        x25519_agree(x_priv, x_peer, &mut x_ss)?;
        let (ct, kem_ss) = mlkem768::encapsulate(&ek, *mlkem_rand);
        let kem_ss = Zeroizing::new(kem_ss);
        let mut share = Vec::with_capacity(SERVER_SHARE_LEN);
        share.extend_from_slice(ct.as_slice());
        share.extend_from_slice(x_pub.as_ref());
        Ok(CompletedKeyExchange {
            group: NamedGroup::X25519MLKEM768,
            pub_key: share,
            secret: combine(&kem_ss, &x_ss),
        })
    }
}

impl SupportedKxGroup for X25519MlKem768 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let rng = SystemRandom::new();
        let mut seed = Zeroizing::new([0u8; 64]);
        rng.fill(&mut seed[..]).map_err(|_| rng_failed())?;
        Ok(Box::new(X25519MlKem768::client_start(&seed, &rng)?))
    }

    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        let rng = SystemRandom::new();
        let mut m = Zeroizing::new([0u8; 32]);
        rng.fill(&mut m[..]).map_err(|_| rng_failed())?;
        X25519MlKem768::server_complete(client_share, &m, &rng)
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// An ML-KEM-768 decapsulation key, boxed so it is not copied around, zeroized on drop.
struct DecapsulationKey(Box<MlKem768PrivateKey>);

impl DecapsulationKey {
    fn wipe(&mut self) {
        self.0[0..].zeroize();
    }
}

impl Drop for DecapsulationKey {
    fn drop(&mut self) {
        self.wipe();
    }
}

/// A client's key exchange in progress: our ML-KEM decapsulation key and X25519 key.
pub(crate) struct ActiveX25519MlKem768 {
    mlkem: DecapsulationKey,
    x25519: EphemeralPrivateKey,
    share: Vec<u8>,
}

impl fmt::Debug for ActiveX25519MlKem768 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActiveX25519MlKem768")
            .field("share_len", &self.share.len())
            .finish_non_exhaustive()
    }
}

impl ActiveKeyExchange for ActiveX25519MlKem768 {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, Error> {
        if peer_pub_key.len() != SERVER_SHARE_LEN {
            return Err(invalid_share());
        }
        let (ct, x_peer) = peer_pub_key.split_at(MLKEM768_CIPHERTEXT_LEN);
        let ct = MlKem768Ciphertext::try_from(ct).map_err(|_| invalid_share())?;
        let this = *self;
        let mut x_ss = Zeroizing::new([0u8; 32]);
        x25519_agree(this.x25519, x_peer, &mut x_ss)?;
        // Implicit rejection: a wrong ciphertext yields an unrelated secret, and the
        // handshake then fails at Finished.
        let kem_ss = Zeroizing::new(mlkem768::decapsulate(&this.mlkem.0, &ct));
        Ok(combine(&kem_ss, &x_ss))
    }

    /// Offer the X25519 half as a plain X25519 share too (when X25519 is also in the
    /// provider's groups), so a classical-only server needs no HelloRetryRequest.
    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((NamedGroup::X25519, &self.share[MLKEM768_ENCAPS_KEY_LEN..]))
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        peer_pub_key: &[u8],
    ) -> Result<SharedSecret, Error> {
        let this = *self;
        let mut x_ss = Zeroizing::new([0u8; 32]);
        x25519_agree(this.x25519, peer_pub_key, &mut x_ss)?;
        Ok(SharedSecret::from(&x_ss[..]))
    }

    fn pub_key(&self) -> &[u8] {
        &self.share
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7748 §6.1: Alice's and Bob's X25519 keys and their shared secret K.
    const ALICE_PRIV: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
    const ALICE_PUB: &str = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";
    const BOB_PRIV: &str = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb";
    const BOB_PUB: &str = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f";
    const K: &str = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742";
    // SHA-256 of the ML-KEM-768 encapsulation key of draft-ietf-lamps-kyber-certificates'
    // example (seed d || z = 00 01 .. 3f; the SubjectPublicKeyInfo's key bytes).
    const LAMPS_EK_SHA256: &str =
        "0b7934c83125c788995e2ba6bd761e33046b3e40571be53e023309a29f398cc9";

    fn unhex<const N: usize>(s: &str) -> [u8; N] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    /// A fixed vector from published values: the client's share is the LAMPS example
    /// encapsulation key || Alice's X25519 key, the server's ends with Bob's, and the
    /// secret's second half is RFC 7748's K; both sides agree on all 64 bytes.
    #[test]
    #[allow(deprecated)] // ring's fixed test randomness lives in its deprecated `test` module
    fn fixed_vector_from_rfc7748_and_the_lamps_example_key() {
        use ring::test::rand::FixedSliceRandom;
        let seed: [u8; 64] = std::array::from_fn(|i| i as u8);
        let alice = unhex::<32>(ALICE_PRIV);
        let client =
            X25519MlKem768::client_start(&seed, &FixedSliceRandom { bytes: &alice }).unwrap();
        let share = client.pub_key().to_vec();
        assert_eq!(share.len(), CLIENT_SHARE_LEN);
        let ek_digest = ring::digest::digest(&ring::digest::SHA256, &share[..1184]);
        assert_eq!(hex::encode(ek_digest), LAMPS_EK_SHA256);
        assert_eq!(hex::encode(&share[1184..]), ALICE_PUB);

        let bob = unhex::<32>(BOB_PRIV);
        let server =
            X25519MlKem768::server_complete(&share, &[0x42; 32], &FixedSliceRandom { bytes: &bob })
                .unwrap();
        assert_eq!(server.pub_key.len(), SERVER_SHARE_LEN);
        assert_eq!(hex::encode(&server.pub_key[1088..]), BOB_PUB);
        let secret = server.secret.secret_bytes().to_vec();
        assert_eq!(hex::encode(&secret[32..]), K);

        let client_secret = Box::new(client).complete(&server.pub_key).unwrap();
        assert_eq!(client_secret.secret_bytes(), &secret[..]);
    }

    /// `wipe` is what `Drop` runs; observed here before the memory is freed.
    #[test]
    fn wipe_clears_every_byte_of_the_decapsulation_key() {
        let (sk, _) = mlkem768::generate_key_pair([7; 64]).into_parts();
        let mut key = DecapsulationKey(Box::new(sk));
        assert!(key.0.as_slice().iter().any(|b| *b != 0));
        key.wipe();
        assert!(key.0.as_slice().iter().all(|b| *b == 0));
    }
}
