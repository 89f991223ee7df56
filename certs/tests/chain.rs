//! Chain verification: every rejection the issue lists, each beside its positive twin.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use rampart_certs::{ChainError, TrustBundle, TrustDomainPolicy, Usage, verify_workload_chain};

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";

#[test]
fn leaf_from_root_and_from_intermediate_verify() {
    let now = SystemTime::now();
    let root = root(now);
    let inter = intermediate(&root, now);
    let policy = local_policy();
    for ca in [&root, &inter] {
        let chain = workload_chain(ca, &id(SLEEP), HOUR, now);
        for usage in [Usage::ClientAuth, Usage::ServerAuth] {
            let got = verify_workload_chain(&chain, &bundle(&root), &policy, now, usage).unwrap();
            assert_eq!(got, id(SLEEP));
            // The same through the split form rustls verifiers use.
            let got = rampart_certs::verify_workload_cert(
                &chain[0],
                &chain[1..],
                &bundle(&root),
                &policy,
                now,
                usage,
            )
            .unwrap();
            assert_eq!(got, id(SLEEP));
        }
    }
}

#[test]
fn wrong_root_is_unknown_issuer() {
    let now = SystemTime::now();
    let ours = root(now);
    let theirs = rampart_certs::CertificateAuthority::self_signed_root(
        &rampart_certs::RootParams {
            common_name: "Someone Else's Root".into(),
            ..Default::default()
        },
        key(),
        now,
    )
    .unwrap();
    let chain = workload_chain(&ours, &id(SLEEP), HOUR, now);
    // twin: the right root accepts it.
    verify_workload_chain(
        &chain,
        &bundle(&ours),
        &local_policy(),
        now,
        Usage::ClientAuth,
    )
    .unwrap();
    let err = verify_workload_chain(
        &chain,
        &bundle(&theirs),
        &local_policy(),
        now,
        Usage::ClientAuth,
    )
    .unwrap_err();
    assert_eq!(err, ChainError::UnknownIssuer);

    // An impostor root with our root's exact name but another key: the name matches, the
    // signature does not.
    let impostor = root(now);
    let err = verify_workload_chain(
        &chain,
        &bundle(&impostor),
        &local_policy(),
        now,
        Usage::ClientAuth,
    )
    .unwrap_err();
    assert_eq!(err, ChainError::BadSignature);

    // Same with an intermediate: a chain through another root's intermediate is refused.
    let inter = intermediate(&theirs, now);
    let chain = workload_chain(&inter, &id(SLEEP), HOUR, now);
    verify_workload_chain(
        &chain,
        &bundle(&theirs),
        &local_policy(),
        now,
        Usage::ClientAuth,
    )
    .unwrap();
    let err = verify_workload_chain(
        &chain,
        &bundle(&ours),
        &local_policy(),
        now,
        Usage::ClientAuth,
    )
    .unwrap_err();
    assert_eq!(err, ChainError::UnknownIssuer);
}

#[test]
fn missing_intermediate_is_unknown_issuer() {
    let now = SystemTime::now();
    let root = root(now);
    let inter = intermediate(&root, now);
    let chain = workload_chain(&inter, &id(SLEEP), HOUR, now);
    verify_workload_chain(
        &chain,
        &bundle(&root),
        &local_policy(),
        now,
        Usage::ClientAuth,
    )
    .unwrap();
    let err = verify_workload_chain(
        &chain[..1],
        &bundle(&root),
        &local_policy(),
        now,
        Usage::ClientAuth,
    )
    .unwrap_err();
    assert_eq!(err, ChainError::UnknownIssuer);
}

#[test]
fn expired_leaf_is_refused() {
    let now = SystemTime::now();
    let root = root(now);
    let chain = workload_chain(&root, &id(SLEEP), HOUR, now);
    let b = bundle(&root);
    // twin: within its lifetime.
    verify_workload_chain(
        &chain,
        &b,
        &local_policy(),
        now + HOUR - Duration::from_secs(5),
        Usage::ClientAuth,
    )
    .unwrap();
    let err = verify_workload_chain(
        &chain,
        &b,
        &local_policy(),
        now + 2 * HOUR,
        Usage::ClientAuth,
    )
    .unwrap_err();
    assert!(matches!(err, ChainError::Expired { .. }), "{err:?}");
}

#[test]
fn expired_intermediate_is_refused() {
    let now = SystemTime::now();
    let root = root(now);
    let k = key();
    let params = rampart_certs::IntermediateParams {
        validity: 2 * HOUR,
        ..Default::default()
    };
    let cert = root
        .issue_intermediate(&params, &k.public_key_spki_der(), now)
        .unwrap();
    let inter = rampart_certs::CertificateAuthority::new(cert, k, root.chain_to_root()).unwrap();
    // The leaf asks for 24h but is capped at the intermediate's not-after.
    let chain = workload_chain(&inter, &id(SLEEP), 24 * HOUR, now);
    let info = rampart_certs::CertInfo::parse(&chain[0]).unwrap();
    assert!(info.not_after <= inter.not_after());
    verify_workload_chain(
        &chain,
        &bundle(&root),
        &local_policy(),
        now + HOUR,
        Usage::ClientAuth,
    )
    .unwrap();
    let err = verify_workload_chain(
        &chain,
        &bundle(&root),
        &local_policy(),
        now + 3 * HOUR,
        Usage::ClientAuth,
    )
    .unwrap_err();
    assert!(matches!(err, ChainError::Expired { .. }), "{err:?}");
}

#[test]
fn not_yet_valid_leaf_is_refused() {
    let now = SystemTime::now();
    let root = root(now - 24 * HOUR);
    // Issued "in the future" relative to the verifier's clock.
    let chain = workload_chain(&root, &id(SLEEP), HOUR, now);
    let b = bundle(&root);
    // twin: the 2 minute backdate absorbs a verifier 100 s behind.
    verify_workload_chain(
        &chain,
        &b,
        &local_policy(),
        now - Duration::from_secs(100),
        Usage::ClientAuth,
    )
    .unwrap();
    let err = verify_workload_chain(
        &chain,
        &b,
        &local_policy(),
        now - Duration::from_secs(600),
        Usage::ClientAuth,
    )
    .unwrap_err();
    assert!(matches!(err, ChainError::NotYetValid { .. }), "{err:?}");
}

#[test]
fn ca_presented_as_leaf_is_refused() {
    let now = SystemTime::now();
    let root = root(now);
    let inter = intermediate(&root, now);
    let b = bundle(&root);
    // twin: a real leaf under the intermediate.
    let chain = workload_chain(&inter, &id(SLEEP), HOUR, now);
    verify_workload_chain(&chain, &b, &local_policy(), now, Usage::ClientAuth).unwrap();
    // The intermediate itself as the leaf.
    let err = verify_workload_chain(
        &[inter.cert().clone()],
        &b,
        &local_policy(),
        now,
        Usage::ClientAuth,
    )
    .unwrap_err();
    assert_eq!(err, ChainError::CaUsedAsLeaf);
    // The root itself as the leaf.
    let err = verify_workload_chain(
        &[root.cert().clone()],
        &b,
        &local_policy(),
        now,
        Usage::ClientAuth,
    )
    .unwrap_err();
    assert_eq!(err, ChainError::CaUsedAsLeaf);
}

#[test]
fn leaf_without_uri_san_is_refused() {
    let now = SystemTime::now();
    let root = root(now);
    let b = bundle(&root);
    let k = key();
    let dns = vec!["istiod.istio-system.svc".to_string()];
    // twin: the same profile with a SPIFFE ID.
    let with_id = root
        .issue_server(
            &k.public_key_spki_der(),
            &dns,
            &[],
            Some(&id(SLEEP)),
            HOUR,
            now,
        )
        .unwrap();
    assert_eq!(
        verify_workload_chain(&[with_id], &b, &local_policy(), now, Usage::ServerAuth).unwrap(),
        id(SLEEP)
    );
    let without = root
        .issue_server(&k.public_key_spki_der(), &dns, &[], None, HOUR, now)
        .unwrap();
    let err =
        verify_workload_chain(&[without], &b, &local_policy(), now, Usage::ServerAuth).unwrap_err();
    assert_eq!(err, ChainError::NoSpiffeId);
}

#[test]
fn leaf_with_two_uri_sans_is_refused() {
    let now = SystemTime::now();
    // twin: one URI SAN, same construction.
    let (root, leaf) = rcgen_leaf(vec![uri(SLEEP)], |_| {});
    let b = TrustBundle::from_der(vec![root]).unwrap();
    assert_eq!(
        verify_workload_chain(&[leaf], &b, &local_policy(), now, Usage::ClientAuth).unwrap(),
        id(SLEEP)
    );
    let (root, leaf) = rcgen_leaf(
        vec![
            uri(SLEEP),
            uri("spiffe://cluster.local/ns/kube-system/sa/admin"),
        ],
        |_| {},
    );
    let b = TrustBundle::from_der(vec![root]).unwrap();
    let err =
        verify_workload_chain(&[leaf], &b, &local_policy(), now, Usage::ClientAuth).unwrap_err();
    assert_eq!(err, ChainError::MultipleUriSans { count: 2 });
}

#[test]
fn non_spiffe_uri_san_is_refused() {
    let now = SystemTime::now();
    let (root, leaf) = rcgen_leaf(
        vec![uri("https://cluster.local/ns/default/sa/sleep")],
        |_| {},
    );
    let b = TrustBundle::from_der(vec![root]).unwrap();
    let err =
        verify_workload_chain(&[leaf], &b, &local_policy(), now, Usage::ClientAuth).unwrap_err();
    assert!(matches!(err, ChainError::InvalidSpiffeId { .. }), "{err:?}");
}

#[test]
fn leaf_that_can_sign_certificates_is_refused() {
    let now = SystemTime::now();
    let (root, leaf) = rcgen_leaf(vec![uri(SLEEP)], |p| {
        p.key_usages.push(rcgen::KeyUsagePurpose::KeyCertSign);
    });
    let b = TrustBundle::from_der(vec![root]).unwrap();
    let err =
        verify_workload_chain(&[leaf], &b, &local_policy(), now, Usage::ClientAuth).unwrap_err();
    assert_eq!(err, ChainError::LeafCanSignCertificates);
}

#[test]
fn leaf_without_digital_signature_is_refused() {
    let now = SystemTime::now();
    for usages in [vec![], vec![rcgen::KeyUsagePurpose::KeyEncipherment]] {
        let (root, leaf) = rcgen_leaf(vec![uri(SLEEP)], |p| p.key_usages = usages.clone());
        let b = TrustBundle::from_der(vec![root]).unwrap();
        let err = verify_workload_chain(&[leaf], &b, &local_policy(), now, Usage::ClientAuth)
            .unwrap_err();
        assert_eq!(err, ChainError::LeafLacksDigitalSignature, "{usages:?}");
    }
    // twin: digitalSignature + keyEncipherment (an RSA-style leaf) is fine.
    let (root, leaf) = rcgen_leaf(vec![uri(SLEEP)], |p| {
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ]
    });
    let b = TrustBundle::from_der(vec![root]).unwrap();
    verify_workload_chain(&[leaf], &b, &local_policy(), now, Usage::ClientAuth).unwrap();
}

#[test]
fn wrong_extended_key_usage_is_refused() {
    let now = SystemTime::now();
    let (root, leaf) = rcgen_leaf(vec![uri(SLEEP)], |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    });
    let b = TrustBundle::from_der(vec![root]).unwrap();
    // twin: fine as a client.
    verify_workload_chain(
        std::slice::from_ref(&leaf),
        &b,
        &local_policy(),
        now,
        Usage::ClientAuth,
    )
    .unwrap();
    let err =
        verify_workload_chain(&[leaf], &b, &local_policy(), now, Usage::ServerAuth).unwrap_err();
    assert_eq!(err, ChainError::WrongUsage(Usage::ServerAuth));
}

#[test]
fn other_trust_domain_is_refused_unless_aliased_or_allowed() {
    let now = SystemTime::now();
    let root = root(now);
    let b = bundle(&root);
    let other = id("spiffe://other.example/ns/default/sa/sleep");
    let chain = workload_chain(&root, &other, HOUR, now);

    let err =
        verify_workload_chain(&chain, &b, &local_policy(), now, Usage::ClientAuth).unwrap_err();
    assert_eq!(
        err,
        ChainError::ForeignTrustDomain {
            trust_domain: td("other.example"),
            local: td("cluster.local"),
        }
    );
    // twin 1: an alias makes it acceptable.
    let aliased = TrustDomainPolicy::with_aliases(td("cluster.local"), vec![td("other.example")]);
    assert_eq!(
        verify_workload_chain(&chain, &b, &aliased, now, Usage::ClientAuth).unwrap(),
        other
    );
    assert!(aliased.is_local(&td("other.example")));
    // twin 2: allow_any.
    let any = TrustDomainPolicy {
        allow_any: true,
        ..local_policy()
    };
    assert_eq!(
        verify_workload_chain(&chain, &b, &any, now, Usage::ClientAuth).unwrap(),
        other
    );
    // An unrelated alias does not help.
    let unrelated = TrustDomainPolicy::with_aliases(td("cluster.local"), vec![td("third.example")]);
    assert!(verify_workload_chain(&chain, &b, &unrelated, now, Usage::ClientAuth).is_err());
}

#[test]
fn tampered_leaf_signature_is_refused() {
    let now = SystemTime::now();
    let root = root(now);
    let mut chain = workload_chain(&root, &id(SLEEP), HOUR, now);
    let mut der = chain[0].to_vec();
    let last = der.len() - 3;
    der[last] ^= 0x01;
    chain[0] = der.into();
    let err = verify_workload_chain(
        &chain,
        &bundle(&root),
        &local_policy(),
        now,
        Usage::ClientAuth,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ChainError::BadSignature | ChainError::UnknownIssuer | ChainError::BadEncoding(_)
        ),
        "{err:?}"
    );
}

#[test]
fn empty_and_garbage_chains_are_refused() {
    let now = SystemTime::now();
    let root = root(now);
    let b = bundle(&root);
    assert_eq!(
        verify_workload_chain(&[], &b, &local_policy(), now, Usage::ClientAuth).unwrap_err(),
        ChainError::EmptyChain
    );
    let junk = rampart_certs::CertificateDer::from(vec![0x30, 0x03, 0x01, 0x01, 0xff]);
    let err =
        verify_workload_chain(&[junk], &b, &local_policy(), now, Usage::ClientAuth).unwrap_err();
    assert!(matches!(err, ChainError::BadEncoding(_)), "{err:?}");
}

#[test]
fn merged_bundle_accepts_both_roots_during_rotation() {
    let now = SystemTime::now();
    let old = root(now);
    let new = root(now);
    let merged = bundle(&old).merge(&bundle(&new));
    assert_eq!(merged.roots().len(), 2);
    assert_eq!(
        merged.merge(&bundle(&new)).roots().len(),
        2,
        "merge is a union"
    );
    for ca in [&old, &new] {
        let chain = workload_chain(ca, &id(SLEEP), HOUR, now);
        verify_workload_chain(&chain, &merged, &local_policy(), now, Usage::ClientAuth).unwrap();
        let only_other = if std::ptr::eq(ca, &old) {
            bundle(&new)
        } else {
            bundle(&old)
        };
        assert!(
            verify_workload_chain(&chain, &only_other, &local_policy(), now, Usage::ClientAuth)
                .is_err()
        );
    }
    // PEM round trip keeps both, in order.
    let again = TrustBundle::from_pem(&merged.to_pem()).unwrap();
    assert_eq!(again, merged);
    let shown = format!("{merged:?}");
    assert!(
        shown.contains("Rampart Root CA") && shown.contains("sha256:"),
        "{shown}"
    );
}

/// A second subjectAltName extension cannot smuggle in a second identity.
#[test]
fn second_san_extension_is_refused() {
    let now = SystemTime::now();
    let admin = b"spiffe://cluster.local/ns/kube-system/sa/admin";
    let mut names = vec![0x86, admin.len() as u8];
    names.extend_from_slice(admin);
    let mut content = vec![0x30, names.len() as u8];
    content.extend(names);
    let (root, leaf) = rcgen_leaf(vec![uri(SLEEP)], |p| {
        p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
            &[2, 5, 29, 17],
            content,
        )];
    });
    let b = TrustBundle::from_der(vec![root]).unwrap();
    let got = verify_workload_chain(&[leaf], &b, &local_policy(), now, Usage::ClientAuth);
    assert!(got.is_err(), "accepted as {got:?}");
}
