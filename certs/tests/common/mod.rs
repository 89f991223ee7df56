//! Helpers shared by the certs integration tests: a root, an intermediate, and leaves.
#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, SystemTime};

use rampart_certs::{
    CertificateAuthority, CertificateDer, IntermediateParams, KeyAlgorithm, PrivateKey, RootParams,
    SpiffeId, TrustBundle, TrustDomain, TrustDomainPolicy,
};

pub const HOUR: Duration = Duration::from_secs(3600);

pub fn key() -> PrivateKey {
    PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap()
}

pub fn root(now: SystemTime) -> CertificateAuthority {
    CertificateAuthority::self_signed_root(&RootParams::default(), key(), now).unwrap()
}

pub fn intermediate(root: &CertificateAuthority, now: SystemTime) -> CertificateAuthority {
    let k = key();
    let cert = root
        .issue_intermediate(
            &IntermediateParams::default(),
            &k.public_key_spki_der(),
            now,
        )
        .unwrap();
    CertificateAuthority::new(cert, k, root.chain_to_root()).unwrap()
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

pub fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

pub fn bundle(ca: &CertificateAuthority) -> TrustBundle {
    TrustBundle::from_der(vec![ca.root().clone()]).unwrap()
}

pub fn local_policy() -> TrustDomainPolicy {
    TrustDomainPolicy::local(td("cluster.local"))
}

/// A workload leaf for `id` from `ca`, returned as the chain a peer would present
/// (leaf, then the CA's chain without the root).
pub fn workload_chain(
    ca: &CertificateAuthority,
    id: &SpiffeId,
    ttl: Duration,
    now: SystemTime,
) -> Vec<CertificateDer<'static>> {
    let k = key();
    let leaf = ca
        .issue_workload(&k.public_key_spki_der(), id, ttl, now)
        .unwrap();
    let mut chain = vec![leaf];
    let mut up = ca.chain_to_root();
    up.pop(); // peers need not send the root
    chain.extend(up);
    chain
}

/// A root and a leaf made directly with rcgen, for leaves our CA refuses to make
/// (several URI SANs, odd key usages). Returns (root DER, leaf DER).
pub fn rcgen_leaf(
    sans: Vec<rcgen::SanType>,
    customize: impl FnOnce(&mut rcgen::CertificateParams),
) -> (CertificateDer<'static>, CertificateDer<'static>) {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let root_cert = root_params.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(root_params, root_key);

    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = sans;
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    customize(&mut p);
    let leaf = p.signed_by(&leaf_key, &issuer).unwrap();
    (root_cert.der().clone(), leaf.der().clone())
}

pub fn uri(s: &str) -> rcgen::SanType {
    rcgen::SanType::URI(rcgen::string::Ia5String::try_from(s).unwrap())
}
