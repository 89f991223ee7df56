//! Revocation: poll the CA's CRL set (`rampart.ca.v1.Revocation/GetCrls`), keep only the CRLs
//! whose signature verifies with a CA certificate the agent trusts, and publish them to every
//! identity's store (served in `ROOTCA`'s `crl`, written as `ca-crl.pem`, and checked against
//! the agent's own certificates by each lifecycle manager).
//!
//! - Polls every `interval` (default 3 s) over a kept connection with the etag of the set it
//!   holds (`if_none_match`), so an unchanged set costs a few bytes; an answer holding a CRL
//!   that does not parse is refused as a whole (the last good set stays) and not fetched
//!   again until the CA's etag changes; errors back off (capped) and the last good set keeps
//!   being served; a CA without the CRL service (istiod) is asked again rarely.
//! - Each CRL is validated on its own ([`CrlSet::new`]) against the issuers the agent trusts:
//!   the roots of the served bundle and the intermediates of the chains it holds (verified to
//!   those roots when they were installed). A CRL that does not validate (unknown issuer,
//!   wrong signature, not yet valid, duplicate) is logged and not served; the rest are. An
//!   expired CRL is served (its revocations stay in force, as the CA enforces them) and
//!   logged.
//! - Validation runs again whenever the issuers change (a new bundle, a new intermediate), so a
//!   CRL that arrived before the first certificate is served once it can be checked.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rampart_certs::{CertInfo, CertificateDer, Crl, CrlExpiry, CrlSet};
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::caclient::CrlSource;
use crate::manager::Clock;
use crate::metrics::Metrics;
use crate::rotation::{Backoff, random_unit};
use crate::state::{SecretStore, ServedCrls, Snapshot};

/// How often the agent asks the CA for its CRLs by default.
pub const DEFAULT_CRL_POLL_INTERVAL: Duration = Duration::from_secs(3);

/// How long to wait before asking again a CA that does not serve CRLs.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(300);

/// The CA certificates CRLs may speak for, and the ones a CRL set must cover for Envoy to
/// check whole chains, from what the stores serve.
struct Issuers {
    /// Roots of the bundles and intermediates of the held chains, deduplicated.
    all: Vec<CertificateDer<'static>>,
    /// The CA certificates of each held chain (intermediates and the root it ends in).
    chains: Vec<Vec<CertificateDer<'static>>>,
}

fn issuers(snaps: &[Snapshot]) -> Issuers {
    let mut seen = BTreeSet::new();
    let mut all = Vec::new();
    let mut chains = Vec::new();
    let mut add = |c: &CertificateDer<'static>, all: &mut Vec<CertificateDer<'static>>| {
        if seen.insert(c.as_ref().to_vec()) {
            all.push(c.clone());
        }
    };
    for s in snaps {
        if let Some(b) = &s.bundle {
            for r in b.trust_bundle().roots() {
                add(r, &mut all);
            }
        }
        if let Some(svid) = &s.svid {
            let mut cas: Vec<CertificateDer<'static>> =
                svid.chain().iter().skip(1).cloned().collect();
            for c in &cas {
                add(c, &mut all);
            }
            // The root the chain ends in: a bundle root whose subject is the last
            // certificate's issuer.
            let last = svid.chain().last().and_then(|c| CertInfo::parse(c).ok());
            if let (Some(last), Some(b)) = (last, &s.bundle) {
                cas.extend(
                    b.trust_bundle()
                        .roots()
                        .iter()
                        .filter(|r| CertInfo::parse(r).is_ok_and(|i| i.subject == last.issuer))
                        .cloned(),
                );
            }
            chains.push(cas);
        }
    }
    Issuers { all, chains }
}

/// Validate each CRL on its own against `issuers`; the valid ones form the served set.
/// Returns the set and one reason per refused CRL.
pub(crate) fn validate(
    crls: &[Crl],
    issuers: &[CertificateDer<'static>],
    now: std::time::SystemTime,
) -> (CrlSet, Vec<String>) {
    let mut set = CrlSet::empty();
    let mut refused = Vec::new();
    for crl in crls {
        match CrlSet::new(vec![crl.clone()], issuers, now, CrlExpiry::Keep) {
            Ok(one) => {
                if issuers.iter().any(|i| set.covers(i) && one.covers(i)) {
                    refused.push(format!(
                        "CRL of {:?}: more than one CRL for this issuer; keeping the first",
                        crl.issuer()
                    ));
                    continue;
                }
                set = set.merged_with(&one);
            }
            Err(e) => refused.push(format!("CRL of {:?}: {e}", crl.issuer())),
        }
    }
    (set, refused)
}

/// Whether `set` has a CRL for every CA certificate of every held chain (and there is one).
fn covers_chains(set: &CrlSet, chains: &[Vec<CertificateDer<'static>>]) -> bool {
    !set.is_empty()
        && !chains.is_empty()
        && chains.iter().all(|cas| cas.iter().all(|c| set.covers(c)))
}

/// The CRL poller of one agent.
pub(crate) struct CrlPoller {
    pub(crate) source: Arc<dyn CrlSource>,
    pub(crate) token_path: PathBuf,
    pub(crate) stores: Vec<SecretStore>,
    pub(crate) interval: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) clock: Clock,
    pub(crate) metrics: Arc<Metrics>,
}

// === impl CrlPoller ===

impl CrlPoller {
    /// Run until `shutdown`.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.interval, self.backoff_max.max(self.interval));
        // The last good set the CA sent (parsed, not yet validated) and its etag.
        let mut held: Option<(String, u64, Vec<Crl>)> = None;
        // The etag sent as `if_none_match`: the held set's, or that of a refused answer (so
        // the same bad set is not downloaded and logged again on every poll).
        let mut ask = String::new();
        // What was validated last: (etag, issuer DERs); validation reruns when either changes.
        let mut validated: Option<(String, Vec<Vec<u8>>)> = None;
        let mut receivers: Vec<_> = self.stores.iter().map(SecretStore::subscribe).collect();
        let mut next_poll = tokio::time::Instant::now();
        let mut unsupported_logged = false;
        loop {
            // Wait for the poll time, a store change (new issuers) or shutdown.
            let store_changed = async {
                if receivers.is_empty() {
                    return std::future::pending::<()>().await;
                }
                let futs = receivers.iter_mut().map(|rx| Box::pin(rx.changed()));
                let _ = futures::future::select_all(futs).await;
            };
            let poll_now = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next_poll) => true,
                _ = store_changed => false,
            };
            if poll_now {
                match self.source.get_crls(&ask, &self.token_path).await {
                    Ok(poll) => {
                        backoff.reset();
                        unsupported_logged = false;
                        next_poll = tokio::time::Instant::now() + self.interval;
                        if let Some(ders) = poll.crls {
                            match parse_all(&ders) {
                                Ok(crls) => {
                                    tracing::info!(
                                        version = poll.version,
                                        etag = %poll.etag,
                                        crls = crls.len(),
                                        "CRL set from the CA"
                                    );
                                    ask = poll.etag.clone();
                                    held = Some((poll.etag, poll.version, crls));
                                }
                                Err(e) => {
                                    // Keep the last good set until the CA's set changes.
                                    tracing::warn!(
                                        version = poll.version,
                                        etag = %poll.etag,
                                        "CRL set from the CA refused, keeping the last good \
                                         one: {e}"
                                    );
                                    self.metrics.crls_refused.inc();
                                    ask = poll.etag;
                                }
                            }
                        }
                    }
                    Err(Error::CrlsUnsupported { addr }) => {
                        if !unsupported_logged {
                            tracing::info!(
                                ca = %addr,
                                retry_in = ?UNSUPPORTED_RETRY,
                                "the CA does not serve CRLs; no revocation lists to serve"
                            );
                            unsupported_logged = true;
                        }
                        next_poll = tokio::time::Instant::now() + UNSUPPORTED_RETRY;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay(random_unit());
                        tracing::warn!(
                            retry_in = ?delay,
                            serving = held.as_ref().map(|(_, v, _)| *v).unwrap_or(0),
                            "CRL poll failed, keeping the last good set: {e}"
                        );
                        next_poll = tokio::time::Instant::now() + delay;
                    }
                }
            }
            let Some((etag, version, crls)) = &held else {
                continue;
            };
            let snaps: Vec<Snapshot> = self.stores.iter().map(SecretStore::current).collect();
            let iss = issuers(&snaps);
            if iss.all.is_empty() {
                // Nothing to check the CRLs against yet (no certificate issued).
                continue;
            }
            let key = (
                etag.clone(),
                iss.all
                    .iter()
                    .map(|c| c.as_ref().to_vec())
                    .collect::<Vec<_>>(),
            );
            if validated.as_ref() == Some(&key) {
                continue;
            }
            let now = self.clock.now();
            let (set, refused) = validate(crls, &iss.all, now);
            for r in &refused {
                tracing::warn!(version, "CRL not served: {r}");
            }
            self.metrics.crls_refused.inc_by(refused.len() as u64);
            self.metrics.crls_served.set(set.len() as i64);
            for c in set.expired(now) {
                tracing::warn!(
                    issuer = %c.issuer(),
                    next_update = %humantime::format_rfc3339_seconds(c.next_update()),
                    "CRL is past its nextUpdate; still served and enforced"
                );
            }
            let covers = covers_chains(&set, &iss.chains);
            tracing::info!(
                version,
                served = set.len(),
                refused = refused.len(),
                whole_chain = covers,
                "CRLs validated"
            );
            let served = Arc::new(ServedCrls::new(set, covers));
            for s in &self.stores {
                s.set_crls(served.clone());
            }
            validated = Some(key);
            // Our own publication changed the stores: do not wake on it.
            for rx in &mut receivers {
                rx.borrow_and_update();
            }
        }
    }
}

fn parse_all(ders: &[Vec<u8>]) -> Result<Vec<Crl>, rampart_certs::CrlError> {
    ders.iter().map(|d| Crl::from_der(d)).collect()
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use rampart_certs::test_util::TestPki;
    use rampart_certs::{CrlParams, RevocationReason, RevokedCert};

    use super::*;

    fn params(now: SystemTime, serial: &str) -> CrlParams {
        CrlParams {
            this_update: now,
            next_update: now + Duration::from_secs(600),
            crl_number: 1,
            revoked: vec![RevokedCert {
                serial_hex: serial.into(),
                revoked_at: now,
                reason: Some(RevocationReason::KeyCompromise),
            }],
        }
    }

    #[test]
    fn only_crls_signed_by_a_trusted_ca_are_kept() {
        let now = SystemTime::now();
        let ours = TestPki::new("cluster.local");
        let other = TestPki::new("cluster.local");
        let good = ours.intermediate.sign_crl(&params(now, "0a0b")).unwrap();
        let root_crl = ours.root.sign_crl(&params(now, "01")).unwrap();
        // Another CA's CRL naming the same serial: not ours to enforce.
        let foreign = other.intermediate.sign_crl(&params(now, "0a0b")).unwrap();
        let issuers = vec![ours.root.cert().clone(), ours.intermediate.cert().clone()];
        let (set, refused) = validate(&[good.clone(), foreign, root_crl.clone()], &issuers, now);
        assert_eq!(set.len(), 2, "{set:?}");
        assert!(set.crls().any(|c| *c == good) && set.crls().any(|c| *c == root_crl));
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].contains("none of the CA certificates") || refused[0].contains("signature"),
            "{refused:?}"
        );
        let chains = vec![issuers.clone()];
        assert!(covers_chains(&set, &chains));
        // Only the intermediate's CRL: Envoy must check the leaf only.
        let (only, _) = validate(&[good], &issuers, now);
        assert!(!covers_chains(&only, &chains));
        // Nothing validates: an empty set.
        let (none, refused) = validate(
            &[other.root.sign_crl(&params(now, "02")).unwrap()],
            &issuers,
            now,
        );
        assert!(none.is_empty() && refused.len() == 1);
    }
}
