//! The in-process issuance path: limits, CSR verification, identity check, TTL rules,
//! template, sign, validate, encode. No I/O: the server adds authentication and the audit log.

use std::time::{Duration, SystemTime};

use rampart_certs::{SpiffeId, VerifiedCsr};

use crate::authority::Authority;
use crate::refusal::Refusal;
use crate::signer::{IssuedFacts, WorkloadTemplate, validate_issued};

/// The issuance rules.
#[derive(Debug, Clone)]
pub struct IssuePolicy {
    /// Lifetime when the request asks for none (`validity_duration` 0).
    pub default_ttl: Duration,
    /// Requests above this are refused.
    pub max_ttl: Duration,
    /// Largest accepted CSR PEM.
    pub max_csr_bytes: usize,
}

/// A signed certificate, ready to return.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM strings: the leaf, intermediates, then the root(s).
    pub cert_chain: Vec<String>,
    /// Serial and not-after of the leaf.
    pub facts: IssuedFacts,
}

/// Applies the TTL rules to a requested `validity_duration` (seconds).
pub fn resolve_ttl(policy: &IssuePolicy, requested_secs: i64) -> Result<Duration, Refusal> {
    match requested_secs {
        0 => Ok(policy.default_ttl),
        s if s < 0 => Err(Refusal::NegativeTtl(s)),
        s if s as u64 > policy.max_ttl.as_secs() => Err(Refusal::TtlTooLong {
            requested_secs: s,
            max_secs: policy.max_ttl.as_secs(),
        }),
        s => Ok(Duration::from_secs(s as u64)),
    }
}

/// Issues a certificate for `caller_id` from `csr_pem`, or says why not.
pub fn issue(
    authority: &Authority,
    policy: &IssuePolicy,
    csr_pem: &str,
    requested_ttl_secs: i64,
    caller_id: &SpiffeId,
    now: SystemTime,
) -> Result<Issued, Refusal> {
    if csr_pem.len() > policy.max_csr_bytes {
        return Err(Refusal::CsrTooLarge {
            size: csr_pem.len(),
            max: policy.max_csr_bytes,
        });
    }
    let ttl = resolve_ttl(policy, requested_ttl_secs)?;
    let csr = VerifiedCsr::from_pem(csr_pem).map_err(csr_refusal)?;
    let requested = csr
        .requested_spiffe_id()
        .map_err(|e| Refusal::BadCsrSan(e.to_string()))?;
    if requested != *caller_id {
        return Err(Refusal::SanMismatch {
            requested: requested.to_string(),
            caller: caller_id.to_string(),
        });
    }
    let template = WorkloadTemplate {
        spki_der: csr.public_key_spki_der(),
        id: caller_id,
        ttl,
        now,
    };
    let der = authority
        .signer()
        .sign_workload(&template)
        .map_err(|e| Refusal::SignFailed(e.to_string()))?;
    let facts = validate_issued(&der, &template, authority.signing_facts())
        .map_err(|e| Refusal::SignFailed(format!("issued certificate failed validation: {e}")))?;
    let tail = authority.chain_after_leaf();
    let mut cert_chain = Vec::with_capacity(1 + tail.len());
    cert_chain.push(rampart_certs::certs_to_pem(std::slice::from_ref(&der)));
    cert_chain.extend(tail.iter().cloned());
    Ok(Issued { cert_chain, facts })
}

fn csr_refusal(e: rampart_certs::Error) -> Refusal {
    use rampart_certs::Error as E;
    match e {
        E::CsrSignatureInvalid => Refusal::BadCsrSignature,
        E::UnsupportedAlgorithm(a) => Refusal::UnsupportedCsrAlgorithm(a),
        E::InvalidPem(r) => Refusal::BadCsrPem(r),
        E::InvalidCsr(r) => Refusal::BadCsrPem(format!("not a PKCS#10 CSR: {r}")),
        other => Refusal::BadCsrPem(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rules() {
        let p = IssuePolicy {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(7200),
            max_csr_bytes: 1024,
        };
        assert_eq!(resolve_ttl(&p, 0).unwrap(), Duration::from_secs(3600));
        assert_eq!(resolve_ttl(&p, 5).unwrap(), Duration::from_secs(5));
        assert_eq!(resolve_ttl(&p, 7200).unwrap(), Duration::from_secs(7200));
        assert!(matches!(
            resolve_ttl(&p, 7201),
            Err(Refusal::TtlTooLong { .. })
        ));
        assert!(matches!(resolve_ttl(&p, -1), Err(Refusal::NegativeTtl(-1))));
    }
}
