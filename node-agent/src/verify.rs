//! Checking what the CA returned before anything is installed (fail closed).

use std::time::SystemTime;

use rampart_certs::{
    CertInfo, PrivateKey, SpiffeId, TrustBundle, TrustDomainPolicy, Usage, parse_certs_pem,
    verify_workload_chain,
};
use rustls_pki_types::CertificateDer;

use crate::Error;
use crate::state::{Bundle, Svid};

/// A CA response that passed every check.
pub(crate) struct Checked {
    pub(crate) svid: Svid,
    pub(crate) bundle: Bundle,
}

/// Split, verify and package a `CreateCertificate` response.
///
/// The response is `cert_chain` strings, each PEM with one or more certificates: leaf first,
/// then intermediates, then the root(s) (Istio puts the whole root bundle in the last
/// element). The trailing self-issued CA certificates are the roots.
///
/// Trust rule: the agent's configured trust anchors (`anchors`, the CA root file, read afresh
/// for every request; during a root rotation it holds the old and the new root) decide.
/// Roots the response carries are never anchors for verifying that same response: a forged
/// CA can always send a self-consistent chain to its own root. Checks, in order:
/// - at least one certificate, every element parses;
/// - the chain (leaf + intermediates) verifies to one of `anchors`, at `now`, for both client
///   and server use (a cross-signed intermediate issued by an anchored root is fine). If it
///   does not, the reason names the root it does end in when that root came with the response;
/// - the verified SPIFFE ID is exactly `expected`;
/// - the leaf's public key is the one we generated;
/// - not already expired (part of verification) and not-after is after now.
///
/// Only then are the response's roots added to the served bundle (anchors + response roots):
/// a new root announced by a CA whose signature already verified to a trusted root is how
/// workloads learn the next root before any peer presents a certificate under it (the overlap
/// phase of a rotation). A new root can never vouch for itself.
pub(crate) fn check_response(
    cert_chain: &[String],
    key: PrivateKey,
    expected: &SpiffeId,
    anchors: &TrustBundle,
    now: SystemTime,
) -> Result<Checked, Error> {
    let mut all: Vec<CertificateDer<'static>> = Vec::new();
    for (i, pem) in cert_chain.iter().enumerate() {
        let certs = parse_certs_pem(pem)
            .map_err(|e| Error::BadCaResponse(format!("cert_chain[{i}] is not PEM: {e}")))?;
        all.extend(certs);
    }
    if all.is_empty() {
        return Err(Error::BadCaResponse("empty cert_chain".into()));
    }
    let mut split = all.len();
    while split > 1 {
        let info = CertInfo::parse(&all[split - 1])?;
        if info.is_ca && info.subject == info.issuer {
            split -= 1;
        } else {
            break;
        }
    }
    let roots: Vec<CertificateDer<'static>> = all.split_off(split);
    let chain = all;
    // Each certificate must be issued by the next: the verifier below takes the
    // intermediates as a pool and would accept a chain with an unrelated CA certificate in
    // it, which would then be served and trusted as a CRL signer, and taken as the leaf's
    // issuer for the agent's own revocation check.
    for (i, pair) in chain.windows(2).enumerate() {
        issued_by(&pair[0], &pair[1]).map_err(|why| {
            Error::BadCaResponse(format!(
                "cert_chain is not one path: certificate {} is not issued by certificate {}: {why}",
                i,
                i + 1
            ))
        })?;
    }

    let policy = TrustDomainPolicy {
        local: expected.trust_domain().clone(),
        aliases: Vec::new(),
        allow_any: false,
    };
    for usage in [Usage::ServerAuth, Usage::ClientAuth] {
        let got = match verify_workload_chain(&chain, anchors, &policy, now, usage) {
            Ok(got) => got,
            Err(e) => return Err(untrusted(&chain, &roots, &policy, now, usage, e)),
        };
        if &got != expected {
            return Err(Error::BadCaResponse(format!(
                "certificate is for {got}, expected {expected}"
            )));
        }
    }
    let svid = Svid::new(expected.clone(), chain, key, now)?;
    if svid.leaf.not_after <= now {
        return Err(Error::BadCaResponse("certificate already expired".into()));
    }
    let bundle = if roots.is_empty() {
        anchors.clone()
    } else {
        anchors.merge(&TrustBundle::from_der(roots)?)
    };
    Ok(Checked {
        svid,
        bundle: Bundle::new(expected.trust_domain().clone(), bundle),
    })
}

/// `cert` names `issuer` as its issuer and carries a signature by `issuer`'s key.
fn issued_by(cert: &CertificateDer<'_>, issuer: &CertificateDer<'_>) -> Result<(), String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, c) = X509Certificate::from_der(cert).map_err(|e| e.to_string())?;
    let (_, i) = X509Certificate::from_der(issuer).map_err(|e| e.to_string())?;
    if c.issuer().as_raw() != i.subject().as_raw() {
        return Err(format!(
            "its issuer is {}, the next is {}",
            c.issuer(),
            i.subject()
        ));
    }
    let oid = c.signature_algorithm.algorithm.to_id_string();
    let alg: &dyn ring::signature::VerificationAlgorithm = match oid.as_str() {
        "1.2.840.10045.4.3.2" => &ring::signature::ECDSA_P256_SHA256_ASN1,
        "1.2.840.10045.4.3.3" => &ring::signature::ECDSA_P384_SHA384_ASN1,
        "1.2.840.113549.1.1.11" => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        "1.2.840.113549.1.1.12" => &ring::signature::RSA_PKCS1_2048_8192_SHA384,
        "1.2.840.113549.1.1.13" => &ring::signature::RSA_PKCS1_2048_8192_SHA512,
        "1.3.101.112" => &ring::signature::ED25519,
        other => return Err(format!("unsupported signature algorithm {other}")),
    };
    let key = i.public_key().subject_public_key.data.as_ref();
    ring::signature::UnparsedPublicKey::new(alg, key)
        .verify(c.tbs_certificate.as_ref(), c.signature_value.data.as_ref())
        .map_err(|_| "signature does not verify with its key".to_owned())
}

/// The refusal for a chain that does not verify to the configured anchors: when it does
/// verify to a root the response itself supplied, say which (the forged-CA / unannounced
/// rotation case), otherwise pass on the verification error.
fn untrusted(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    policy: &TrustDomainPolicy,
    now: SystemTime,
    usage: Usage,
    err: rampart_certs::ChainError,
) -> Error {
    for root in roots {
        let Ok(only) = TrustBundle::from_der(vec![root.clone()]) else {
            continue;
        };
        if verify_workload_chain(chain, &only, policy, now, usage).is_ok() {
            let subject = CertInfo::parse(root)
                .map(|i| i.subject)
                .unwrap_or_else(|_| "?".into());
            let fp = hex::encode(ring::digest::digest(&ring::digest::SHA256, root.as_ref()));
            return Error::BadCaResponse(format!(
                "certificate chain ends in a root the agent is not configured to trust \
                 ({subject}, sha256 {fp}); only the configured CA root file is a trust \
                 anchor, a root supplied by the response is not"
            ));
        }
    }
    Error::BadCaResponse(format!(
        "certificate chain does not verify to the configured CA root: {err}"
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rampart_certs::test_util::TestPki;
    use rampart_certs::{
        CertificateAuthority, IntermediateParams, KeyAlgorithm, RootParams, certs_to_pem,
    };

    use super::*;

    fn id(pki: &TestPki) -> SpiffeId {
        SpiffeId::istio(&pki.trust_domain, "ns", "sa").unwrap()
    }

    /// A fresh key and `cert_chain` strings as a CA would answer: leaf, `intermediates`,
    /// then `roots` in one element, leaf issued by `issuer`.
    fn response(
        issuer: &CertificateAuthority,
        id: &SpiffeId,
        intermediates: &[CertificateDer<'static>],
        roots: &[CertificateDer<'static>],
    ) -> (Vec<String>, PrivateKey) {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let leaf = issuer
            .issue_workload(
                &key.public_key_spki_der(),
                id,
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap();
        let mut out = vec![certs_to_pem(&[leaf])];
        for c in intermediates {
            out.push(certs_to_pem(std::slice::from_ref(c)));
        }
        out.push(certs_to_pem(roots));
        (out, key)
    }

    fn check(
        chain: &[String],
        key: PrivateKey,
        id: &SpiffeId,
        anchors: &TrustBundle,
    ) -> Result<Checked, Error> {
        check_response(chain, key, id, anchors, SystemTime::now())
    }

    #[test]
    fn real_ca_chaining_to_the_configured_root_is_accepted() {
        let pki = TestPki::new("cluster.local");
        let id = id(&pki);
        let (chain, key) = response(
            &pki.intermediate,
            &id,
            &[pki.intermediate.cert().clone()],
            &[pki.root.cert().clone()],
        );
        let got = check(&chain, key, &id, &pki.bundle()).unwrap();
        assert_eq!(got.svid.id, id);
        assert_eq!(got.bundle.bundle.roots(), [pki.root.cert().clone()]);
    }

    /// Negative twin: a forged CA answers with a self-consistent chain to its own root, which
    /// it includes in the response. The agent trusts only its configured root: refused, and
    /// the reason names the root.
    #[test]
    fn forged_ca_with_its_own_root_in_the_response_is_refused() {
        let real = TestPki::new("cluster.local");
        let forged = TestPki::new("cluster.local");
        let id = id(&real);
        let (chain, key) = response(
            &forged.intermediate,
            &id,
            &[forged.intermediate.cert().clone()],
            &[forged.root.cert().clone()],
        );
        let err = check(&chain, key, &id, &real.bundle())
            .err()
            .expect("must be refused")
            .to_string();
        assert!(
            err.contains("ends in a root the agent is not configured to trust")
                && err.contains("Test Root cluster.local"),
            "{err}"
        );
        // Even with the real root also listed in the response: still refused.
        let (chain, key) = response(
            &forged.intermediate,
            &id,
            &[forged.intermediate.cert().clone()],
            &[real.root.cert().clone(), forged.root.cert().clone()],
        );
        assert!(check(&chain, key, &id, &real.bundle()).is_err());
        // No root in the response at all: refused with the verification error.
        let (mut chain, key) = response(
            &forged.intermediate,
            &id,
            &[forged.intermediate.cert().clone()],
            &[],
        );
        chain.pop();
        let err = check(&chain, key, &id, &real.bundle())
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("does not verify to the configured CA root"),
            "{err}"
        );
    }

    /// A response with a CA certificate that is not on the leaf's path ([leaf, unrelated CA,
    /// real intermediate, root]) verified before (the verifier takes intermediates as a
    /// pool), and the unrelated certificate was then trusted as a CRL signer and taken as
    /// the leaf's issuer. Now every certificate must be issued by the next: refused, also
    /// for a look-alike with the same name and another key. Twin: the same chain without
    /// the extra certificate is accepted (and `real_ca_chaining_...` above).
    #[test]
    fn a_certificate_off_the_leafs_path_is_refused() {
        let pki = TestPki::new("cluster.local");
        let other = TestPki::new("other.example");
        let lookalike = TestPki::new("cluster.local");
        let id = id(&pki);
        for extra in [other.intermediate.cert(), lookalike.intermediate.cert()] {
            let (chain, key) = response(
                &pki.intermediate,
                &id,
                &[extra.clone(), pki.intermediate.cert().clone()],
                &[pki.root.cert().clone()],
            );
            let err = check(&chain, key, &id, &pki.bundle())
                .err()
                .expect("refused")
                .to_string();
            assert!(
                err.contains("certificate 0 is not issued by certificate 1"),
                "{err}"
            );
        }
        // The extra certificate after the real intermediate: the intermediate is not issued
        // by it either.
        let (chain, key) = response(
            &pki.intermediate,
            &id,
            &[
                pki.intermediate.cert().clone(),
                other.intermediate.cert().clone(),
            ],
            &[pki.root.cert().clone()],
        );
        let err = check(&chain, key, &id, &pki.bundle())
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("certificate 1 is not issued by certificate 2"),
            "{err}"
        );
        let (chain, key) = response(
            &pki.intermediate,
            &id,
            &[pki.intermediate.cert().clone()],
            &[pki.root.cert().clone()],
        );
        let got = check(&chain, key, &id, &pki.bundle()).unwrap();
        assert_eq!(got.svid.chain().len(), 2);
    }

    /// Rotation, overlap phase: the CA still signs under the trusted root and announces the
    /// next one. Accepted, and the next root is served to workloads.
    #[test]
    fn new_root_announced_by_a_trusted_chain_is_served() {
        let old = TestPki::new("cluster.local");
        let next = TestPki::new("cluster.local");
        let id = id(&old);
        let (chain, key) = response(
            &old.intermediate,
            &id,
            &[old.intermediate.cert().clone()],
            &[old.root.cert().clone(), next.root.cert().clone()],
        );
        let got = check(&chain, key, &id, &old.bundle()).unwrap();
        let roots = got.bundle.bundle.roots();
        assert!(roots.contains(old.root.cert()) && roots.contains(next.root.cert()));
    }

    /// Negative twin: the CA already signs under the new root, which the agent was never
    /// configured with. The new root cannot vouch for itself: refused until the operator adds
    /// it to the CA root file (then accepted).
    #[test]
    fn new_root_cannot_vouch_for_itself_until_configured() {
        let old = TestPki::new("cluster.local");
        let next = TestPki::new("cluster.local");
        let id = id(&old);
        let (chain, key) = response(
            &next.intermediate,
            &id,
            &[next.intermediate.cert().clone()],
            &[old.root.cert().clone(), next.root.cert().clone()],
        );
        let err = check(&chain, key, &id, &old.bundle())
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("not configured to trust"), "{err}");
        let (chain, key) = response(
            &next.intermediate,
            &id,
            &[next.intermediate.cert().clone()],
            &[old.root.cert().clone(), next.root.cert().clone()],
        );
        let both = old.bundle().merge(&next.bundle());
        check(&chain, key, &id, &both).unwrap();
    }

    /// A cross-signed intermediate: same subject and key, one copy signed by the new root and
    /// one by the trusted old root. The response carries the cross-signed copy and the new
    /// root: it verifies to the trusted root, so it is accepted and the new root served.
    #[test]
    fn cross_signed_intermediate_verifies_to_the_trusted_root() {
        let now = SystemTime::now();
        let old = TestPki::new("cluster.local");
        let new_root = CertificateAuthority::self_signed_root(
            &RootParams {
                common_name: "New Root".into(),
                ..RootParams::default()
            },
            PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
            now,
        )
        .unwrap();
        let k = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let params = IntermediateParams {
            common_name: "Cluster Intermediate".into(),
            ..IntermediateParams::default()
        };
        let under_new = new_root
            .issue_intermediate(&params, &k.public_key_spki_der(), now)
            .unwrap();
        let cross = old
            .root
            .issue_intermediate(&params, &k.public_key_spki_der(), now)
            .unwrap();
        let issuer =
            CertificateAuthority::new(under_new, k.clone_key(), new_root.chain_to_root()).unwrap();
        let id = id(&old);
        let (chain, key) = response(&issuer, &id, &[cross], &[new_root.cert().clone()]);
        let got = check(&chain, key, &id, &old.bundle()).unwrap();
        assert!(got.bundle.bundle.roots().contains(new_root.cert()));
    }
}
