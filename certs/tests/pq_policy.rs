//! The `pqc` compliance policy (Istio's `COMPLIANCE_POLICY=pqc`): Rampart's configurations
//! offer and accept `X25519MLKEM768` only. The policy is process-wide, so this file (its
//! own test process) sets it; the default policy's twins are in `pq_kx.rs`.

mod pq_common;

use rampart_certs::tls::{self, ClientAuth, CompliancePolicy};
use rustls::NamedGroup;

use pq_common::{Failed, Pki, classical_client, classical_server, handshake};

fn pqc() {
    tls::set_compliance_policy(CompliancePolicy::Pqc);
    assert_eq!(tls::compliance_policy(), CompliancePolicy::Pqc);
}

#[test]
fn pqc_provider_offers_only_the_hybrid_group() {
    pqc();
    let groups: Vec<_> = tls::provider().kx_groups.iter().map(|g| g.name()).collect();
    assert_eq!(groups, [NamedGroup::X25519MLKEM768]);
    assert_eq!(CompliancePolicy::parse("pqc"), Ok(CompliancePolicy::Pqc));
    assert_eq!(CompliancePolicy::parse(""), Ok(CompliancePolicy::Default));
    assert!(
        CompliancePolicy::parse("fips-140-2")
            .unwrap_err()
            .contains("pqc")
    );
}

#[test]
fn pqc_rampart_peers_still_connect_over_x25519mlkem768() {
    pqc();
    let pki = Pki::new();
    let server =
        tls::server_config(pki.server.chain.clone(), &pki.server.key, ClientAuth::None).unwrap();
    let client = tls::client_config(pki.spiffe_auth(), None).unwrap();
    let (c, s) = handshake(client, server).unwrap();
    assert_eq!(
        c.negotiated_key_exchange_group().unwrap().name(),
        NamedGroup::X25519MLKEM768
    );
    assert_eq!(
        s.negotiated_key_exchange_group().unwrap().name(),
        NamedGroup::X25519MLKEM768
    );
}

#[test]
fn pqc_server_refuses_a_classical_only_client_and_says_why() {
    pqc();
    let pki = Pki::new();
    let server =
        tls::server_config(pki.server.chain.clone(), &pki.server.key, ClientAuth::None).unwrap();
    let err = match handshake(classical_client(&pki), server) {
        Err(Failed::Server(e)) => e,
        other => panic!("expected the server to refuse, got {other:?}"),
    };
    assert_eq!(
        err,
        rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoKxGroupsInCommon)
    );
    let why = tls::kx_refusal(&err).unwrap();
    assert!(
        why.contains("compliance policy pqc requires X25519MLKEM768"),
        "{why}"
    );
}

#[test]
fn pqc_client_refuses_a_classical_only_server_and_says_why() {
    pqc();
    let pki = Pki::new();
    let client = tls::client_config(pki.spiffe_auth(), None).unwrap();
    let err = match handshake(client, classical_server(&pki)) {
        Err(Failed::Server(e)) => e,
        other => panic!("expected the classical server to find no common group, got {other:?}"),
    };
    assert_eq!(
        err,
        rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoKxGroupsInCommon)
    );
}
