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
    let alg = verifier(&c.signature_algorithm, i.public_key())?;
    let key = i.public_key().subject_public_key.data.as_ref();
    ring::signature::UnparsedPublicKey::new(alg, key)
        .verify(c.tbs_certificate.as_ref(), c.signature_value.data.as_ref())
        .map_err(|_| "signature does not verify with its key".to_owned())
}

/// The ring algorithm for a signature `sig_alg` made with the key `issuer`: the curve is
/// the issuer key's, the hash the signature's (a P-384 CA signs with ecdsa-with-SHA256 by
/// OpenSSL's default; a P-256 one may use SHA-384). RSASSA-PSS as webpki accepts it: MGF1
/// with the same hash, SHA-256/384/512.
fn verifier(
    sig_alg: &x509_parser::x509::AlgorithmIdentifier<'_>,
    issuer: &x509_parser::x509::SubjectPublicKeyInfo<'_>,
) -> Result<&'static dyn ring::signature::VerificationAlgorithm, String> {
    use rampart_certs::SpkiKind;
    use x509_parser::signature_algorithm::SignatureAlgorithm;
    let kind = SpkiKind::of(issuer).map_err(|e| e.to_string())?;
    if let Ok(SignatureAlgorithm::RSASSA_PSS(params)) = SignatureAlgorithm::try_from(sig_alg) {
        if kind != SpkiKind::Rsa {
            return Err("an RSASSA-PSS signature by a key that is not RSA".into());
        }
        let hash = params.hash_algorithm_oid().to_id_string();
        let mgf_hash = params
            .mask_gen_algorithm()
            .ok()
            .map(|m| m.hash.to_id_string());
        if mgf_hash.as_deref() != Some(hash.as_str()) {
            return Err("an RSASSA-PSS signature whose MGF1 hash is not its hash".into());
        }
        return match hash.as_str() {
            "2.16.840.1.101.3.4.2.1" => Ok(&ring::signature::RSA_PSS_2048_8192_SHA256),
            "2.16.840.1.101.3.4.2.2" => Ok(&ring::signature::RSA_PSS_2048_8192_SHA384),
            "2.16.840.1.101.3.4.2.3" => Ok(&ring::signature::RSA_PSS_2048_8192_SHA512),
            other => Err(format!("unsupported RSASSA-PSS hash {other}")),
        };
    }
    kind.ring_verifier(sig_alg).map_err(|e| e.to_string())
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

    fn openssl(dir: &std::path::Path, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// An OpenSSL-made CA `name` (`name-key.pem`, `name-cert.pem`) with a key made by
    /// `genkey` (genpkey arguments), self-signed or signed by `issuer` with `sign` (x509
    /// arguments: digest, -sigopt).
    fn openssl_ca(
        d: &std::path::Path,
        name: &str,
        genkey: &[&str],
        issuer: Option<&str>,
        sign: &[&str],
    ) {
        std::fs::write(
            d.join("ext.cnf"),
            "[ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
        )
        .unwrap();
        let key = format!("{name}-key.pem");
        let cert = format!("{name}-cert.pem");
        let csr = format!("{name}.csr");
        let subj = format!("/O=cluster.local/CN={name}");
        let mut args = vec!["genpkey", "-out", key.as_str()];
        args.extend_from_slice(genkey);
        openssl(d, &args);
        openssl(
            d,
            &["req", "-new", "-key", &key, "-subj", &subj, "-out", &csr],
        );
        let issuer_cert = issuer.map(|i| format!("{i}-cert.pem"));
        let issuer_key = issuer.map_or(key.clone(), |i| format!("{i}-key.pem"));
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-days",
            "10",
            "-extfile",
            "ext.cnf",
            "-extensions",
            "ca",
            "-out",
            &cert,
        ];
        match &issuer_cert {
            Some(c) => {
                args.extend_from_slice(&["-CA", c, "-CAkey", &issuer_key, "-CAcreateserial"])
            }
            None => args.extend_from_slice(&["-key", &issuer_key]),
        }
        args.extend_from_slice(sign);
        openssl(d, &args);
    }

    const P256: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
    const P384: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"];
    const RSA: &[&str] = &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];

    /// The agent's response for a leaf issued by the OpenSSL CA `issuer` whose chain up to
    /// the root is `up` (names, root last).
    fn openssl_response(
        d: &std::path::Path,
        issuer: &str,
        up: &[&str],
    ) -> (Vec<String>, PrivateKey, SpiffeId, TrustBundle) {
        let read = |n: &str| std::fs::read_to_string(d.join(format!("{n}-cert.pem"))).unwrap();
        let cert = |n: &str| parse_certs_pem(&read(n)).unwrap().remove(0);
        let key = std::fs::read_to_string(d.join(format!("{issuer}-key.pem"))).unwrap();
        let ca = CertificateAuthority::new(
            cert(issuer),
            PrivateKey::from_pkcs8_pem(&key).unwrap(),
            up.iter().map(|n| cert(n)).collect(),
        )
        .unwrap();
        let id = SpiffeId::istio(&"cluster.local".parse().unwrap(), "ns", "sa").unwrap();
        let root = cert(up.last().unwrap());
        let mut inter = vec![ca.cert().clone()];
        inter.extend(up[..up.len() - 1].iter().map(|n| cert(n)));
        let (chain, key) = response(&ca, &id, &inter, std::slice::from_ref(&root));
        (chain, key, id, TrustBundle::from_der(vec![root]).unwrap())
    }

    /// Chains that verified before the issuer check of each link (32ea416) and were then
    /// refused because it took the curve from the signature's hash, not the issuer's key:
    /// OpenSSL-made root (P-384) -> P-384 intermediate -> P-256 intermediate signed with
    /// ecdsa-with-SHA256 (OpenSSL's default digest) -> leaf; a P-256 CA signing with
    /// SHA-384; an RSA root signing with RSASSA-PSS. All accepted. Twin: the same 3-tier
    /// chain with a look-alike P-384 intermediate (same name, another key) in the middle is
    /// refused (the unrelated and look-alike cases of `a_certificate_off_the_leafs_path_...`
    /// stay refused too).
    #[test]
    fn openssl_chains_mixing_curves_and_hashes_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        openssl_ca(d, "root384", P384, None, &["-sha384"]);
        openssl_ca(d, "int384", P384, Some("root384"), &["-sha384"]);
        openssl_ca(d, "int256", P256, Some("int384"), &["-sha256"]);
        let (chain, key, id, anchors) = openssl_response(d, "int256", &["int384", "root384"]);
        let got = check(&chain, key, &id, &anchors).unwrap();
        assert_eq!(got.svid.chain().len(), 3);

        openssl_ca(d, "root256", P256, None, &["-sha256"]);
        openssl_ca(d, "int256b", P256, Some("root256"), &["-sha384"]);
        let (chain, key, id, anchors) = openssl_response(d, "int256b", &["root256"]);
        check(&chain, key, &id, &anchors).unwrap();

        openssl_ca(d, "rootrsa", RSA, None, &["-sha256"]);
        openssl_ca(
            d,
            "intpss",
            P256,
            Some("rootrsa"),
            &[
                "-sha256",
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:digest",
            ],
        );
        let (chain, key, id, anchors) = openssl_response(d, "intpss", &["rootrsa"]);
        check(&chain, key, &id, &anchors).unwrap();

        // Twin: a look-alike of int384 (same subject, its own key, also under root384).
        let (mut chain, key, id, anchors) = openssl_response(d, "int256", &["int384", "root384"]);
        std::fs::rename(d.join("int384-key.pem"), d.join("real-int384-key.pem")).unwrap();
        openssl_ca(d, "int384", P384, Some("root384"), &["-sha384"]);
        chain[2] = std::fs::read_to_string(d.join("int384-cert.pem")).unwrap();
        let err = check(&chain, key, &id, &anchors)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("certificate 1 is not issued by certificate 2"),
            "{err}"
        );
    }
}
