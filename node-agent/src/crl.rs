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

/// How long a workload without a certificate keeps CRLs of unknown issuers from being warned
/// about (its intermediate may be one of them); past it they are warned about and counted.
const QUIET_AT_MOST: Duration = Duration::from_secs(60);

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

/// Why one CRL was left out of the served set.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) text: String,
    /// No CA certificate held names its issuer: while a workload waits for its certificate
    /// (its revoked one dropped, say), its intermediate is not known yet.
    pub(crate) unknown_issuer: bool,
}

/// Validate each CRL on its own against `issuers`; the valid ones form the served set.
/// Returns the set and one refusal per CRL left out.
pub(crate) fn validate(
    crls: &[Crl],
    issuers: &[CertificateDer<'static>],
    now: std::time::SystemTime,
) -> (CrlSet, Vec<Refusal>) {
    let mut set = CrlSet::empty();
    let mut refused = Vec::new();
    for crl in crls {
        match CrlSet::new(vec![crl.clone()], issuers, now, CrlExpiry::Keep) {
            Ok(one) => {
                if issuers.iter().any(|i| set.covers(i) && one.covers(i)) {
                    refused.push(Refusal {
                        text: format!(
                            "CRL of {:?}: more than one CRL for this issuer; keeping the first",
                            crl.issuer()
                        ),
                        unknown_issuer: false,
                    });
                    continue;
                }
                set = set.merged_with(&one);
            }
            Err(e) => refused.push(Refusal {
                unknown_issuer: matches!(e, rampart_certs::CrlError::UnknownIssuer { .. }),
                text: format!("CRL of {:?}: {e}", crl.issuer()),
            }),
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

/// Most tokens one poll tries ([`fetch`]): a CA whose token reviews fail for a reason of its
/// own (its Kubernetes API unreachable) refuses every token alike, and each try costs it a
/// review; the rotation goes on at the next poll, under the poll's backoff.
const TOKENS_PER_POLL: usize = 3;

/// One `GetCrls` call, authenticated with the first token that works, starting at `*at`
/// (the one that worked last). The next token is tried when a token cannot be read or the
/// CA refuses it (`Unauthenticated`, `PermissionDenied`): one workload whose token expired,
/// or whose service account was deleted, must not stop the revocation updates of the
/// others. At most [`TOKENS_PER_POLL`] are tried; `*at` then points past the refused ones,
/// so the next poll goes on with the others. Any other error (the CA unreachable, not
/// serving CRLs) ends the attempt at once: another token would not change it.
async fn fetch(
    source: &dyn CrlSource,
    ask: &str,
    tokens: &[PathBuf],
    at: &mut usize,
) -> Result<crate::caclient::CrlPoll, Error> {
    let mut last = None;
    for _ in 0..tokens.len().min(TOKENS_PER_POLL) {
        let i = *at % tokens.len();
        match source.get_crls(ask, &tokens[i]).await {
            Ok(poll) => {
                *at = i;
                return Ok(poll);
            }
            Err(e) if token_refused(&e) => {
                *at = (i + 1) % tokens.len();
                if tokens.len() > 1 {
                    tracing::debug!(
                        token = %tokens[i].display(),
                        "CRL poll with this token failed, trying the next workload's: {e}"
                    );
                }
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::InvalidConfig {
        field: "workloads",
        reason: "no workload token to authenticate CRL polls with".into(),
    }))
}

/// Whether `e` is about the token used rather than the CA or the network.
fn token_refused(e: &Error) -> bool {
    match e {
        Error::ReadFile { .. } | Error::EmptyFile { .. } | Error::BadToken { .. } => true,
        Error::CaRefused { code, .. } => code == "Unauthenticated" || code == "PermissionDenied",
        _ => false,
    }
}

/// The CRL poller of one agent.
pub(crate) struct CrlPoller {
    pub(crate) source: Arc<dyn CrlSource>,
    /// Every workload's token, in the agent's order: the poll authenticates with the first
    /// one the CA accepts ([`fetch`]).
    pub(crate) token_paths: Vec<PathBuf>,
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
        let mut validated: Option<(String, Vec<Vec<u8>>, bool)> = None;
        // Since when some workload has had no certificate (see `QUIET_AT_MOST`).
        let mut missing_since: Option<tokio::time::Instant> = None;
        let mut receivers: Vec<_> = self.stores.iter().map(SecretStore::subscribe).collect();
        let mut next_poll = tokio::time::Instant::now();
        let mut unsupported_logged = false;
        // The token that worked last: tried first on the next poll.
        let mut token_at = 0;
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
                match fetch(&*self.source, &ask, &self.token_paths, &mut token_at).await {
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
            // While a workload lacks a certificate (for at most QUIET_AT_MOST), a CRL of an
            // issuer no held certificate names is not warned about: it may be that
            // workload's intermediate. Whether that holds is part of what was validated, so
            // the end of it (the certificate came, or the time is up) validates again.
            let missing = snaps.iter().any(|s| s.svid.is_none());
            let since = match (missing, missing_since) {
                (false, _) => None,
                (true, None) => Some(tokio::time::Instant::now()),
                (true, Some(t)) => Some(t),
            };
            missing_since = since;
            let quiet = since.is_some_and(|t| t.elapsed() < QUIET_AT_MOST);
            let key = (
                etag.clone(),
                iss.all
                    .iter()
                    .map(|c| c.as_ref().to_vec())
                    .collect::<Vec<_>>(),
                quiet,
            );
            if validated.as_ref() == Some(&key) {
                continue;
            }
            let now = self.clock.now();
            let (set, mut refused) = validate(crls, &iss.all, now);
            // A workload without a certificate (waiting for its first, or for the one that
            // replaces a revoked one) may be the one whose intermediate issued a CRL: that
            // CRL waits, and is validated again when the certificate arrives.
            if quiet {
                refused.retain(|r| {
                    if r.unknown_issuer {
                        tracing::debug!(
                            version,
                            "CRL waits for a certificate naming its issuer: {}",
                            r.text
                        );
                    }
                    !r.unknown_issuer
                });
            }
            for r in &refused {
                tracing::warn!(version, "CRL not served: {}", r.text);
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

    /// A CA that accepts only the token at `good` (and records which tokens it saw), or
    /// is unreachable.
    struct TokenCa {
        good: PathBuf,
        unreachable: bool,
        seen: std::sync::Mutex<Vec<PathBuf>>,
    }

    impl CrlSource for TokenCa {
        fn get_crls<'a>(
            &'a self,
            _if_none_match: &'a str,
            token_path: &'a std::path::Path,
        ) -> crate::caclient::BoxFuture<'a, Result<crate::caclient::CrlPoll, Error>> {
            self.seen.lock().unwrap().push(token_path.to_owned());
            Box::pin(async move {
                if self.unreachable {
                    return Err(Error::CaUnreachable {
                        addr: "127.0.0.1:1".into(),
                        reason: "connection refused".into(),
                    });
                }
                if token_path != self.good {
                    return Err(Error::CaRefused {
                        code: "Unauthenticated".into(),
                        message: "token rejected".into(),
                    });
                }
                Ok(crate::caclient::CrlPoll {
                    version: 1,
                    etag: "e1".into(),
                    crls: Some(vec![]),
                })
            })
        }
    }

    fn token_ca(good: &str, unreachable: bool) -> TokenCa {
        TokenCa {
            good: PathBuf::from(good),
            unreachable,
            seen: std::sync::Mutex::new(Vec::new()),
        }
    }

    #[tokio::test]
    async fn crl_poll_falls_back_to_another_workloads_token() {
        let tokens: Vec<PathBuf> = ["a", "b", "c"].iter().map(PathBuf::from).collect();
        // `a` is refused (an expired or deleted workload): `b` authenticates the poll and
        // is tried first from then on.
        let ca = token_ca("b", false);
        let mut at = 0;
        let poll = fetch(&ca, "", &tokens, &mut at).await.unwrap();
        assert_eq!(poll.etag, "e1");
        assert_eq!(at, 1);
        fetch(&ca, "e1", &tokens, &mut at).await.unwrap();
        let seen = ca.seen.lock().unwrap().clone();
        assert_eq!(seen, ["a", "b", "b"].map(PathBuf::from), "{seen:?}");
    }

    #[tokio::test]
    async fn crl_poll_fails_when_no_token_is_accepted_or_the_ca_is_unreachable() {
        let tokens: Vec<PathBuf> = ["a", "b"].iter().map(PathBuf::from).collect();
        // Every token refused: the CA's refusal is the error, each token tried once.
        let ca = token_ca("z", false);
        let mut at = 1;
        let e = fetch(&ca, "", &tokens, &mut at).await.unwrap_err();
        assert!(
            matches!(&e, Error::CaRefused { code, .. } if code == "Unauthenticated"),
            "{e}"
        );
        assert_eq!(
            ca.seen.lock().unwrap().clone(),
            ["b", "a"].map(PathBuf::from)
        );
        // A CA refusing everything (its token reviews failing) gets at most
        // TOKENS_PER_POLL tries per poll, and the next poll goes on where this one stopped.
        let many: Vec<PathBuf> = (0..7).map(|n| PathBuf::from(format!("t{n}"))).collect();
        let busy = token_ca("t5", false);
        let mut at = 0;
        assert!(fetch(&busy, "", &many, &mut at).await.is_err());
        assert_eq!(busy.seen.lock().unwrap().len(), TOKENS_PER_POLL);
        assert_eq!(at, 3);
        fetch(&busy, "", &many, &mut at).await.unwrap();
        assert_eq!(at, 5);
        let seen = busy.seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            ["t0", "t1", "t2", "t3", "t4", "t5"].map(PathBuf::from)
        );
        // The CA unreachable: no other token is tried (it would not help).
        let down = token_ca("a", true);
        let e = fetch(&down, "", &tokens, &mut at).await.unwrap_err();
        assert!(matches!(e, Error::CaUnreachable { .. }), "{e}");
        assert_eq!(down.seen.lock().unwrap().len(), 1);
        // No token at all: a configuration error, not a panic.
        let e = fetch(&ca, "", &[], &mut 0).await.unwrap_err();
        assert!(e.to_string().contains("no workload token"), "{e}");
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
            refused[0].text.contains("none of the CA certificates")
                || refused[0].text.contains("signature"),
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
