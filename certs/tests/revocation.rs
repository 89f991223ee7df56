//! Chain verification with CRLs: a revoked leaf or intermediate is refused naming serial and
//! issuer, each beside its positive twin; unknown status (no CRL, expired CRL) follows the
//! policy; a CRL only speaks for the CA whose name *and* key signed it.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use rampart_certs::{
    CertInfo, CertificateAuthority, CertificateDer, ChainError, CrlExpiry, CrlParams, CrlSet,
    RevocationCheck, RevocationReason, RevokedCert, UnknownStatus, Usage,
    verify_workload_chain_with_revocation,
};

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const OTHER: &str = "spiffe://cluster.local/ns/default/sa/other";

fn serial(cert: &CertificateDer<'_>) -> String {
    CertInfo::parse(cert).unwrap().serial_hex
}

fn crl_of(
    ca: &CertificateAuthority,
    revoked: &[&str],
    this_update: SystemTime,
) -> rampart_certs::Crl {
    ca.sign_crl(&CrlParams {
        this_update,
        next_update: this_update + Duration::from_secs(600),
        crl_number: 1,
        revoked: revoked
            .iter()
            .map(|s| RevokedCert {
                serial_hex: (*s).to_owned(),
                revoked_at: this_update,
                reason: Some(RevocationReason::KeyCompromise),
            })
            .collect(),
    })
    .unwrap()
}

fn check(
    crls: Vec<rampart_certs::Crl>,
    issuers: &[&CertificateAuthority],
    unknown: UnknownStatus,
) -> RevocationCheck {
    let certs: Vec<_> = issuers.iter().map(|c| c.cert().clone()).collect();
    let set = CrlSet::new(crls, &certs, SystemTime::now(), CrlExpiry::Keep).unwrap();
    RevocationCheck::new(set, unknown)
}

fn verify(
    chain: &[CertificateDer<'_>],
    root: &CertificateAuthority,
    rc: Option<&RevocationCheck>,
) -> Result<rampart_certs::SpiffeId, ChainError> {
    verify_workload_chain_with_revocation(
        chain,
        &bundle(root),
        &local_policy(),
        SystemTime::now(),
        Usage::ClientAuth,
        rc,
    )
}

#[test]
fn a_revoked_leaf_is_refused_naming_serial_and_issuer_and_another_leaf_passes() {
    let now = SystemTime::now();
    let root = root(now);
    let inter = intermediate(&root, now);
    let bad = workload_chain(&inter, &id(SLEEP), HOUR, now);
    let good = workload_chain(&inter, &id(OTHER), HOUR, now);
    let rc = check(
        vec![crl_of(&inter, &[&serial(&bad[0])], now)],
        &[&inter],
        UnknownStatus::Allow,
    );
    let err = verify(&bad, &root, Some(&rc)).unwrap_err();
    match &err {
        ChainError::Revoked {
            serial: s,
            issuer,
            subject,
            reason,
            ..
        } => {
            assert_eq!(*s, serial(&bad[0]));
            assert!(issuer.contains("Rampart Intermediate CA"), "{issuer}");
            assert_eq!(subject, SLEEP);
            assert_eq!(*reason, Some(RevocationReason::KeyCompromise));
        }
        other => panic!("expected Revoked, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&serial(&bad[0])) && msg.contains("keyCompromise"),
        "{msg}"
    );
    // Twins: another leaf of the same CA passes; the revoked one passes without the check.
    assert_eq!(verify(&good, &root, Some(&rc)).unwrap(), id(OTHER));
    assert_eq!(verify(&bad, &root, None).unwrap(), id(SLEEP));
}

#[test]
fn a_revoked_intermediate_is_refused_for_every_leaf_below_it() {
    let now = SystemTime::now();
    let root = root(now);
    let inter = intermediate(&root, now);
    let sibling = intermediate(&root, now);
    let chain = workload_chain(&inter, &id(SLEEP), HOUR, now);
    let sibling_chain = workload_chain(&sibling, &id(SLEEP), HOUR, now);
    let rc = check(
        vec![crl_of(&root, &[&serial(inter.cert())], now)],
        &[&root],
        UnknownStatus::Allow,
    );
    match verify(&chain, &root, Some(&rc)).unwrap_err() {
        ChainError::Revoked {
            serial: s, issuer, ..
        } => {
            assert_eq!(s, serial(inter.cert()));
            assert!(issuer.contains("Rampart Root CA"), "{issuer}");
        }
        other => panic!("expected Revoked, got {other:?}"),
    }
    verify(&sibling_chain, &root, Some(&rc)).unwrap();
}

#[test]
fn unknown_status_is_allowed_by_default_and_refused_under_deny() {
    let now = SystemTime::now();
    let root = root(now);
    let inter = intermediate(&root, now);
    let chain = workload_chain(&inter, &id(SLEEP), HOUR, now);
    // Only the intermediate's CRL: the intermediate itself (issued by the root) is unknown.
    let partial = vec![crl_of(&inter, &[], now)];
    let allow = check(partial.clone(), &[&inter], UnknownStatus::Allow);
    verify(&chain, &root, Some(&allow)).unwrap();
    let deny = check(partial, &[&inter], UnknownStatus::Deny);
    match verify(&chain, &root, Some(&deny)).unwrap_err() {
        ChainError::RevocationStatusUnknown { serial: s, why, .. } => {
            assert_eq!(s, serial(inter.cert()));
            assert!(why.contains("no CRL"), "{why}");
        }
        other => panic!("expected RevocationStatusUnknown, got {other:?}"),
    }
    // Twin: full coverage passes under deny.
    let full = check(
        vec![crl_of(&inter, &[], now), crl_of(&root, &[], now)],
        &[&inter, &root],
        UnknownStatus::Deny,
    );
    verify(&chain, &root, Some(&full)).unwrap();
    // An empty set under deny refuses everything; under allow it refuses nothing.
    let empty_deny = RevocationCheck::new(CrlSet::empty(), UnknownStatus::Deny);
    assert!(verify(&chain, &root, Some(&empty_deny)).is_err());
    let empty_allow = RevocationCheck::new(CrlSet::empty(), UnknownStatus::Allow);
    verify(&chain, &root, Some(&empty_allow)).unwrap();
}

#[test]
fn an_expired_crl_is_unknown_under_deny_but_its_entries_stay_revoked() {
    let now = SystemTime::now();
    let root = root(now - 2 * HOUR);
    let inter = intermediate(&root, now - 2 * HOUR);
    let bad = workload_chain(&inter, &id(SLEEP), 3 * HOUR, now - HOUR);
    let good = workload_chain(&inter, &id(OTHER), 3 * HOUR, now - HOUR);
    let old = now - HOUR; // nextUpdate = old + 10 min: expired
    let crls = vec![
        crl_of(&inter, &[&serial(&bad[0])], old),
        crl_of(&root, &[], now),
    ];
    let allow = check(crls.clone(), &[&inter, &root], UnknownStatus::Allow);
    assert!(matches!(
        verify(&bad, &root, Some(&allow)).unwrap_err(),
        ChainError::Revoked { .. }
    ));
    verify(&good, &root, Some(&allow)).unwrap();
    let deny = check(crls, &[&inter, &root], UnknownStatus::Deny);
    assert!(matches!(
        verify(&bad, &root, Some(&deny)).unwrap_err(),
        ChainError::Revoked { .. }
    ));
    match verify(&good, &root, Some(&deny)).unwrap_err() {
        ChainError::RevocationStatusUnknown { why, .. } => {
            assert!(why.contains("expired"), "{why}")
        }
        other => panic!("expected RevocationStatusUnknown, got {other:?}"),
    }
}

#[test]
fn a_crl_only_speaks_for_the_ca_key_that_signed_it() {
    let now = SystemTime::now();
    // Two hierarchies with identical names but different keys.
    let root_a = root(now);
    let inter_a = intermediate(&root_a, now);
    let root_b = root(now);
    let inter_b = intermediate(&root_b, now);
    let chain_a = workload_chain(&inter_a, &id(SLEEP), HOUR, now);
    // B's intermediate "revokes" A's leaf serial; the set is valid for B.
    let rc = check(
        vec![crl_of(&inter_b, &[&serial(&chain_a[0])], now)],
        &[&inter_b],
        UnknownStatus::Allow,
    );
    verify(&chain_a, &root_a, Some(&rc)).unwrap();
    // Twin: the same serial on A's own CRL is enforced.
    let rc_a = check(
        vec![crl_of(&inter_a, &[&serial(&chain_a[0])], now)],
        &[&inter_a],
        UnknownStatus::Allow,
    );
    assert!(matches!(
        verify(&chain_a, &root_a, Some(&rc_a)).unwrap_err(),
        ChainError::Revoked { .. }
    ));
    // And B's CRL cannot be validated against A's intermediate at all.
    let err = CrlSet::new(
        vec![crl_of(&inter_b, &[], now)],
        &[inter_a.cert().clone()],
        now,
        CrlExpiry::Refuse,
    )
    .unwrap_err();
    assert!(
        matches!(err, rampart_certs::CrlError::BadSignature { .. }),
        "{err}"
    );
}
