//! The `X25519MLKEM768` hybrid group (`rampart_certs::tls::X25519MLKEM768`): share sizes and
//! the draft's layout (ML-KEM first) checked against ML-KEM-768 and X25519 run separately,
//! both sides deriving the same 64-byte secret, malformed shares refused; and rustls
//! handshakes between Rampart's configurations negotiating it, with a classical-only client
//! still accepted under the default policy. (The `pqc` policy's refusals are in
//! `pq_policy.rs`: the policy is process-wide.)

mod pq_common;

use libcrux_ml_kem::mlkem768;
use rampart_certs::tls::{
    self, CLIENT_SHARE_LEN, ClientAuth, MLKEM768_CIPHERTEXT_LEN, MLKEM768_ENCAPS_KEY_LEN,
    SERVER_SHARE_LEN, SHARED_SECRET_LEN, X25519MLKEM768,
};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::NamedGroup;

use pq_common::{Pki, classical_client, handshake};

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new().fill(&mut b).unwrap();
    b
}

fn x25519_pair() -> (EphemeralPrivateKey, Vec<u8>) {
    let k = EphemeralPrivateKey::generate(&X25519, &SystemRandom::new()).unwrap();
    let p = k.compute_public_key().unwrap().as_ref().to_vec();
    (k, p)
}

fn x25519(ours: EphemeralPrivateKey, peer: &[u8]) -> Vec<u8> {
    agreement::agree_ephemeral(ours, &UnparsedPublicKey::new(&X25519, peer), |k| k.to_vec())
        .unwrap()
}

#[test]
fn the_group_is_0x11ec_for_tls13_only() {
    assert_eq!(X25519MLKEM768.name(), NamedGroup::X25519MLKEM768);
    assert_eq!(u16::from(X25519MLKEM768.name()), 0x11ec);
    assert!(X25519MLKEM768.usable_for_version(rustls::ProtocolVersion::TLSv1_3));
    assert!(!X25519MLKEM768.usable_for_version(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(
        (CLIENT_SHARE_LEN, SERVER_SHARE_LEN, SHARED_SECRET_LEN),
        (1184 + 32, 1088 + 32, 64)
    );
}

#[test]
fn both_sides_derive_the_same_secret_from_shares_of_the_right_size() {
    let client = X25519MLKEM768.start().unwrap();
    assert_eq!(client.group(), NamedGroup::X25519MLKEM768);
    assert_eq!(client.pub_key().len(), CLIENT_SHARE_LEN);
    let server = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap();
    assert_eq!(server.group, NamedGroup::X25519MLKEM768);
    assert_eq!(server.pub_key.len(), SERVER_SHARE_LEN);
    let server_secret = server.secret.secret_bytes().to_vec();
    assert_eq!(server_secret.len(), SHARED_SECRET_LEN);
    let client_secret = client.complete(&server.pub_key).unwrap();
    assert_eq!(client_secret.secret_bytes(), &server_secret[..]);
    // Fresh randomness every time.
    let again = X25519MLKEM768.start().unwrap();
    let again = X25519MLKEM768.start_and_complete(again.pub_key()).unwrap();
    assert_ne!(again.secret.secret_bytes(), &server_secret[..]);
}

/// Our server against a client built here from ML-KEM-768 and X25519 directly: the server's
/// share is ciphertext || X25519 key, and the secret is ML-KEM secret || X25519 secret.
#[test]
fn server_share_and_secret_follow_the_draft_layout() {
    let kp = mlkem768::generate_key_pair(random::<64>());
    let (x_priv, x_pub) = x25519_pair();
    let mut share = kp.pk().to_vec();
    share.extend_from_slice(&x_pub);
    let done = X25519MLKEM768.start_and_complete(&share).unwrap();
    let (ct, server_x) = done.pub_key.split_at(MLKEM768_CIPHERTEXT_LEN);
    let ct = mlkem768::MlKem768Ciphertext::try_from(ct).unwrap();
    let kem_ss = mlkem768::decapsulate(kp.private_key(), &ct);
    let x_ss = x25519(x_priv, server_x);
    let secret = done.secret.secret_bytes();
    assert_eq!(&secret[..32], &kem_ss[..], "ML-KEM secret first");
    assert_eq!(&secret[32..], &x_ss[..], "X25519 secret second");
}

/// Our client against a server built here: the client's share is encapsulation key ||
/// X25519 key, and it derives ML-KEM secret || X25519 secret from ciphertext || X25519 key.
#[test]
fn client_share_and_secret_follow_the_draft_layout() {
    let client = X25519MLKEM768.start().unwrap();
    let (ek, client_x) = client.pub_key().split_at(MLKEM768_ENCAPS_KEY_LEN);
    let ek = mlkem768::MlKem768PublicKey::try_from(ek).unwrap();
    assert!(mlkem768::validate_public_key(&ek));
    // The classical half is offered on its own too (no HelloRetryRequest for X25519 peers).
    assert_eq!(
        client.hybrid_component(),
        Some((NamedGroup::X25519, client_x))
    );
    let (ct, kem_ss) = mlkem768::encapsulate(&ek, random::<32>());
    let (x_priv, x_pub) = x25519_pair();
    let x_ss = x25519(x_priv, client_x);
    let mut server_share = ct.as_slice().to_vec();
    server_share.extend_from_slice(&x_pub);
    let secret = client.complete(&server_share).unwrap();
    let mut want = kem_ss.to_vec();
    want.extend_from_slice(&x_ss);
    assert_eq!(secret.secret_bytes(), &want[..]);
}

#[test]
fn the_classical_component_completes_alone() {
    let client = X25519MLKEM768.start().unwrap();
    let client_x = client.pub_key()[MLKEM768_ENCAPS_KEY_LEN..].to_vec();
    let (x_priv, x_pub) = x25519_pair();
    let want = x25519(x_priv, &client_x);
    let secret = client.complete_hybrid_component(&x_pub).unwrap();
    assert_eq!(secret.secret_bytes(), &want[..]);
}

fn invalid_share(e: rustls::Error) {
    assert_eq!(
        e,
        rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::InvalidKeyShare)
    );
}

#[test]
fn malformed_client_shares_are_refused() {
    let good = X25519MLKEM768.start().unwrap().pub_key().to_vec();
    assert!(X25519MLKEM768.start_and_complete(&good).is_ok());
    for bad in [
        Vec::new(),
        good[..32].to_vec(),
        good[..CLIENT_SHARE_LEN - 1].to_vec(),
        [&good[..], &[0u8]].concat(),
        // An X25519 share alone (a classical client's bytes under the hybrid codepoint).
        good[MLKEM768_ENCAPS_KEY_LEN..].to_vec(),
    ] {
        invalid_share(X25519MLKEM768.start_and_complete(&bad).err().unwrap());
    }
    // An encapsulation key whose first coefficient is 4095 >= q (FIPS 203 §7.2 check).
    let mut unreduced = good.clone();
    unreduced[0] = 0xff;
    unreduced[1] |= 0x0f;
    invalid_share(X25519MLKEM768.start_and_complete(&unreduced).err().unwrap());
    // An all-zero X25519 key (small order: the X25519 result would be zero).
    let mut zero_x = good.clone();
    zero_x[MLKEM768_ENCAPS_KEY_LEN..].fill(0);
    invalid_share(X25519MLKEM768.start_and_complete(&zero_x).err().unwrap());
}

#[test]
fn malformed_server_shares_are_refused() {
    let server_share = |client: &dyn rustls::crypto::ActiveKeyExchange| {
        X25519MLKEM768
            .start_and_complete(client.pub_key())
            .unwrap()
            .pub_key
    };
    let short = |s: Vec<u8>| s[..SERVER_SHARE_LEN - 1].to_vec();
    let long = |s: Vec<u8>| [&s[..], &[0u8]].concat();
    let zero_x = |mut s: Vec<u8>| {
        s[MLKEM768_CIPHERTEXT_LEN..].fill(0);
        s
    };
    let only_x = |s: Vec<u8>| s[MLKEM768_CIPHERTEXT_LEN..].to_vec();
    for mangle in [short, long, zero_x, only_x] {
        let client = X25519MLKEM768.start().unwrap();
        let share = mangle(server_share(client.as_ref()));
        invalid_share(client.complete(&share).err().unwrap());
    }
    // A tampered ciphertext is not an error here (ML-KEM's implicit rejection) but yields a
    // different secret, so the handshake fails at Finished.
    let client = X25519MLKEM768.start().unwrap();
    let done = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap();
    let mut tampered = done.pub_key.clone();
    tampered[0] ^= 1;
    let secret = client.complete(&tampered).unwrap();
    assert_ne!(
        &secret.secret_bytes()[..32],
        &done.secret.secret_bytes()[..32]
    );
    assert_eq!(
        &secret.secret_bytes()[32..],
        &done.secret.secret_bytes()[32..]
    );
}

#[test]
fn debug_output_shows_no_key_material() {
    let client = X25519MLKEM768.start().unwrap();
    let share_hex: String = client.pub_key()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dbg = format!("{:?} {:?}", X25519MLKEM768, tls::X25519MlKem768);
    assert!(!dbg.contains(&share_hex), "{dbg}");
}

// === handshakes ===

#[test]
fn rampart_client_and_server_negotiate_x25519mlkem768() {
    assert_eq!(tls::compliance_policy(), tls::CompliancePolicy::Default);
    let pki = Pki::new();
    let server_cfg = tls::server_config(
        pki.server.chain.clone(),
        &pki.server.key,
        ClientAuth::Required {
            bundle: pki.bundle(),
            trust_domains: pq_common::local(),
        },
    )
    .unwrap();
    let client_cfg = tls::client_config(
        pki.spiffe_auth(),
        Some((pki.client.chain.clone(), &pki.client.key)),
    )
    .unwrap();
    let (c, s) = handshake(client_cfg, server_cfg).unwrap();
    for conn in [&**c as &rustls::CommonState, &**s] {
        assert_eq!(
            conn.negotiated_key_exchange_group().unwrap().name(),
            NamedGroup::X25519MLKEM768
        );
        assert_eq!(
            tls::negotiated_group(conn).as_deref(),
            Some("X25519MLKEM768")
        );
    }
    assert_eq!(
        tls::peer_spiffe_id(&c).unwrap().unwrap().to_string(),
        pq_common::SERVER
    );
}

/// Negative twin of `pq_policy.rs`'s refusal: without the `pqc` policy a classical-only
/// client is still served, over X25519.
#[test]
fn without_pqc_a_classical_only_client_is_served_over_x25519() {
    let pki = Pki::new();
    let server_cfg =
        tls::server_config(pki.server.chain.clone(), &pki.server.key, ClientAuth::None).unwrap();
    let (c, s) = handshake(classical_client(&pki), server_cfg).unwrap();
    assert_eq!(
        s.negotiated_key_exchange_group().unwrap().name(),
        NamedGroup::X25519
    );
    assert_eq!(
        c.negotiated_key_exchange_group().unwrap().name(),
        NamedGroup::X25519
    );
}

/// Our client offering the hybrid first still reaches a classical-only server, without a
/// HelloRetryRequest (the X25519 half is sent as its own share).
#[test]
fn without_pqc_our_client_reaches_a_classical_only_server() {
    let pki = Pki::new();
    let server_cfg = pq_common::classical_server(&pki);
    let client_cfg = tls::client_config(pki.spiffe_auth(), None).unwrap();
    let (c, _s) = handshake(client_cfg, server_cfg).unwrap();
    assert_eq!(
        c.negotiated_key_exchange_group().unwrap().name(),
        NamedGroup::X25519
    );
    assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Full));
}
