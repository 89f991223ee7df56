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
/// element). The trailing self-issued CA certificates are the roots. Checks, in order:
/// - at least one certificate, every element parses;
/// - the chain (leaf + intermediates) verifies to the response roots merged with the
///   configured roots (`--ca-root`), at `now`, for both client and server use;
/// - the verified SPIFFE ID is exactly `expected`;
/// - the leaf's public key is the one we generated;
/// - not already expired (part of verification) and not-after is after now.
pub(crate) fn check_response(
    cert_chain: &[String],
    key: PrivateKey,
    expected: &SpiffeId,
    configured_roots: Option<&TrustBundle>,
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

    let mut bundle = match configured_roots {
        Some(b) => b.clone(),
        None if roots.is_empty() => {
            return Err(Error::BadCaResponse(
                "no root in the response and no configured root to verify against".into(),
            ));
        }
        None => TrustBundle::from_der(roots.clone())?,
    };
    if !roots.is_empty() && configured_roots.is_some() {
        bundle = bundle.merge(&TrustBundle::from_der(roots)?);
    }

    let policy = TrustDomainPolicy {
        local: expected.trust_domain().clone(),
        aliases: Vec::new(),
        allow_any: false,
    };
    for usage in [Usage::ServerAuth, Usage::ClientAuth] {
        let got = verify_workload_chain(&chain, &bundle, &policy, now, usage)
            .map_err(|e| Error::BadCaResponse(format!("certificate chain rejected: {e}")))?;
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
    Ok(Checked {
        svid,
        bundle: Bundle::new(expected.trust_domain().clone(), bundle),
    })
}
