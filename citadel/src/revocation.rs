//! Persisted revocations and the CRLs signed from them.
//!
//! A [`RevocationState`] is the list of serials a CA has revoked plus the last CRL number it
//! used. It is a small JSON file written atomically (`write_file_atomic`: temp file, fsync,
//! rename), so a revocation survives `kill -9` once [`RevocationState::save`] returned. Two
//! users:
//!
//! - `rampart certs revoke` / `rampart certs crl`: [`CRL_STATE_FILE`] beside the CA material
//!   made with `rampart certs`; the signed CRL goes to [`CRL_FILE`].
//! - the running CA: [`REVOCATIONS_FILE`] in its state directory, for the workload
//!   certificates it issued; the CA re-signs its CRL on a schedule and at every revocation.
//!
//! CRL numbers only go up: each CRL gets `max(last + 1, unix seconds now)`, so the CA can
//! re-sign on a schedule without writing the file, and a restart never reuses a number
//! (unless the clock went back further than the number of CRLs issued since).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rampart_certs::{
    Crl, CrlExpiry, CrlParams, CrlSet, RevocationCheck, RevocationReason, RevokedCert,
    UnknownStatus, parse_serial_hex,
};
use serde::{Deserialize, Serialize};

use crate::authority::Authority;
use crate::error::CitadelError;
use crate::signer::X509Signer;

/// Default lifetime (nextUpdate - thisUpdate) of the CRL the CA signs for its signing
/// certificate; it is re-signed when half of it is left and at every revocation.
pub const DEFAULT_CRL_VALIDITY: Duration = Duration::from_secs(10 * 60);

pub use crate::authority::CA_CRL;
/// Alias of [`CA_CRL`] for `rampart certs` directories.
pub const CRL_FILE: &str = CA_CRL;
/// `rampart certs`: the revoked serials and the last CRL number, beside the CA.
pub const CRL_STATE_FILE: &str = "ca-crl-state.json";
/// The running CA: revocations of the certificates it issued, in its state directory.
pub const REVOCATIONS_FILE: &str = "revocations.json";
/// The running CA: its local admin socket (0600, in the 0700 state directory).
pub const ADMIN_SOCKET: &str = "admin.sock";
/// The running CA: the CRL set it serves (its own CRL for the signing certificate, then the
/// plug-in CRLs), in its state directory (0644, rewritten at every re-signing). Not named
/// `ca-crl.pem` so that a state directory that is also the cacerts directory is not misread.
pub const PUBLISHED_CRLS: &str = "published-crls.pem";

/// Revoked entries are dropped from CRLs this long after the certificate expired (RFC 5280
/// allows removing expired certificates; the grace covers clock skew of verifiers).
pub const EXPIRED_ENTRY_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Revoked entries leave the running CA's list (`revocations.json`, and in Kubernetes mode
/// the shared ConfigMap) this long after the certificate expired: long after they left the
/// CRL ([`EXPIRED_ENTRY_GRACE`]), so that the list does not grow without end.
pub const PRUNE_AFTER_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Whether `not_after` (RFC 3339; absent or unreadable: unknown, kept for ever) is more than
/// [`PRUNE_AFTER_EXPIRY`] before `now`.
pub fn prunable(not_after: Option<&str>, now: SystemTime) -> bool {
    not_after
        .and_then(parse_time)
        .is_some_and(|na| na + PRUNE_AFTER_EXPIRY <= now)
}

/// Whether an entry with this not-after is on a CRL signed at `now` (unknown: always).
fn on_crl_at(not_after: Option<&str>, now: SystemTime) -> bool {
    not_after
        .and_then(parse_time)
        .is_none_or(|na| na + EXPIRED_ENTRY_GRACE > now)
}

/// Whether not-after `a` is later than `b`; an absent (unknown) not-after is the latest of
/// all, since it keeps its entry for ever.
pub fn later_not_after(a: Option<&str>, b: Option<&str>) -> bool {
    match (a.and_then(parse_time), b.and_then(parse_time)) {
        (None, Some(_)) => true,
        (Some(a), Some(b)) => a > b,
        (_, None) => false,
    }
}

/// One revoked serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRevocation {
    /// Serial, lowercase hex without the DER sign byte.
    pub serial: String,
    /// When it was revoked (RFC 3339).
    pub revoked_at: String,
    /// RFC 5280 reason name (`keyCompromise`), if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The SPIFFE ID it was issued to, when known (the CA's audit log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// The certificate's not-after (RFC 3339), when known; the entry leaves the CRL
    /// [`EXPIRED_ENTRY_GRACE`] after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
}

impl StoredRevocation {
    /// This entry checked and normalized, as it may enter a [`RevocationState`] that came
    /// from elsewhere (another CA replica, through the cluster): the serial is valid hex
    /// (stored normalized), `revoked_at` and `not_after` are RFC 3339, the reason is an
    /// RFC 5280 name and the identity a SPIFFE ID. Every check [`RevocationState::load`]
    /// makes is here, so a merged entry can never make the state file unreadable.
    pub fn validated(&self) -> Result<StoredRevocation, String> {
        let serial = normalize_serial(&self.serial).map_err(|e| format!("serial: {e}"))?;
        parse_time(&self.revoked_at)
            .ok_or_else(|| format!("revoked_at {:?} is not RFC 3339", self.revoked_at))?;
        if let Some(reason) = &self.reason {
            reason
                .parse::<RevocationReason>()
                .map_err(|e| format!("reason: {e}"))?;
        }
        if let Some(na) = &self.not_after {
            parse_time(na).ok_or_else(|| format!("not_after {na:?} is not RFC 3339"))?;
        }
        if let Some(id) = &self.spiffe_id {
            rampart_certs::SpiffeId::parse(id).map_err(|e| format!("spiffe_id: {e}"))?;
        }
        Ok(StoredRevocation {
            serial,
            ..self.clone()
        })
    }
}

/// How far past an identity revocation's time a certificate still counts as issued before
/// it ([`IdentityRevocation::covers`]).
pub const RULE_SKEW: Duration = Duration::from_secs(60);

/// A revocation of every certificate issued to one identity before a time, by whichever CA
/// replica issued it: each replica finds its own in its audit log (`rampart ca revoke
/// --spiffe-id` on one replica, shared through the cluster in Kubernetes mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRevocation {
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// Certificates issued before this time (RFC 3339) are revoked; later ones are not.
    pub issued_before: String,
    /// RFC 5280 reason name, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl IdentityRevocation {
    /// This rule checked and normalized (as it may come from another replica).
    pub fn validated(&self) -> Result<IdentityRevocation, String> {
        let id = rampart_certs::SpiffeId::parse(&self.spiffe_id)
            .map_err(|e| format!("spiffe_id: {e}"))?;
        let before = parse_time(&self.issued_before)
            .ok_or_else(|| format!("issued_before {:?} is not RFC 3339", self.issued_before))?;
        if let Some(reason) = &self.reason {
            reason
                .parse::<RevocationReason>()
                .map_err(|e| format!("reason: {e}"))?;
        }
        Ok(IdentityRevocation {
            spiffe_id: id.to_string(),
            issued_before: crate::audit::rfc3339(before),
            reason: self.reason.clone(),
        })
    }

    /// Whether its time is more than [`MAX_RULE_FUTURE`] after `now`.
    pub fn is_future(&self, now: SystemTime) -> bool {
        parse_time(&self.issued_before).is_some_and(|t| t > now + MAX_RULE_FUTURE)
    }

    /// What names the rule when waiting for it to be shared.
    pub fn key(&self) -> String {
        format!("{} issued before {}", self.spiffe_id, self.issued_before)
    }

    /// Whether every certificate the rule can cover left the lists already (issued before
    /// `issued_before`, so expired by `issued_before` + the longest workload lifetime).
    pub fn prunable(&self, now: SystemTime) -> bool {
        parse_time(&self.issued_before)
            .is_some_and(|t| t + rampart_certs::MAX_WORKLOAD_CERT_TTL + PRUNE_AFTER_EXPIRY <= now)
    }

    /// Whether an audit log line is a certificate this rule revokes (and still worth an
    /// entry: not past the prune horizon): issued to the identity up to [`RULE_SKEW`] after
    /// `issued_before`. The rule is applied once, when a replica first gets it, so what the
    /// margin adds is only what that replica issued between the revocation and then: it
    /// errs on revoking (those workloads renew), never on missing a certificate because
    /// the clocks of two replicas differ or the audit log counts whole seconds.
    pub fn covers(&self, e: &crate::audit::AuditEntry, now: SystemTime) -> bool {
        let (Some(issued), Some(before)) = (e.issued_at(), parse_time(&self.issued_before)) else {
            return false;
        };
        e.spiffe_id == self.spiffe_id
            && issued <= before + RULE_SKEW
            && !prunable(Some(&e.not_after), now)
    }
}

/// An identity revocation taken from elsewhere, and what it revoked here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedRule {
    /// The rule (validated).
    pub rule: IdentityRevocation,
    /// The certificates of this CA it revoked (filled by `CaState::merge_identity_rules`).
    pub revoked: Vec<RevokedSerial>,
}

/// What merging identity revocations from elsewhere did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleMergeOutcome {
    /// The rules new here (applied and recorded, once `CaState::merge_identity_rules`
    /// returned).
    pub applied: Vec<AppliedRule>,
    /// Rules refused, each alone: (identity as given, why).
    pub refused: Vec<(String, String)>,
    /// Rules that could not be applied now (not recorded: tried again when they come
    /// again): (identity, why).
    pub failed: Vec<(String, String)>,
}

/// How far in the future an identity revocation's time may be (clock skew between the
/// replica that made it and this one). A later time would revoke, on each replica, whatever
/// it issued until it first saw the rule: refused.
pub const MAX_RULE_FUTURE: Duration = Duration::from_secs(300);

/// What [`Revocations::merge`] did with entries from elsewhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeOutcome {
    /// Serials newly revoked here (persisted, and on the re-signed CRL).
    pub added: Vec<String>,
    /// Serials revoked here already whose entry now carries the later not-after given
    /// (a not-after only ever moves later, so nobody can take an entry off a CRL early).
    pub extended: Vec<String>,
    /// Whether the CRL was re-signed (its content changed).
    pub resigned: bool,
    /// Entries refused, each alone: (serial as given, why).
    pub refused: Vec<(String, String)>,
}

/// What a CA has revoked, and the last CRL number it used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationState {
    /// The number of the last CRL signed from this state.
    pub crl_number: u64,
    /// Revoked serials, in revocation order.
    pub revoked: Vec<StoredRevocation>,
    /// Identity revocations (every certificate of an identity issued before a time).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<IdentityRevocation>,
}

fn parse_time(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// Normalizes a serial given in hex (`serial=..`, colons, any case, leading zeros) to the
/// form the audit log and CRLs use.
pub fn normalize_serial(s: &str) -> Result<String, String> {
    parse_serial_hex(s).map(|v| rampart_certs::serial_hex(&v))
}

impl RevocationState {
    /// Reads the state; a missing file is an empty state. A file that does not parse is an
    /// error (never silently an empty list: that would un-revoke everything).
    pub fn load(path: &Path) -> Result<RevocationState, CitadelError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RevocationState::default());
            }
            Err(e) => return Err(CitadelError::io(path, e)),
        };
        let state: RevocationState =
            serde_json::from_str(&text).map_err(|e| CitadelError::invalid(path, e))?;
        for r in &state.revoked {
            normalize_serial(&r.serial).map_err(|e| CitadelError::invalid(path, e))?;
            parse_time(&r.revoked_at).ok_or_else(|| {
                CitadelError::invalid(
                    path,
                    format!("revoked_at {:?} is not RFC 3339", r.revoked_at),
                )
            })?;
            if let Some(reason) = &r.reason {
                reason
                    .parse::<RevocationReason>()
                    .map_err(|e| CitadelError::invalid(path, e))?;
            }
        }
        for r in &state.identities {
            r.validated().map_err(|e| CitadelError::invalid(path, e))?;
        }
        Ok(state)
    }

    /// Writes the state atomically (mode 0644: serials are public; the directory protects it).
    pub fn save(&self, path: &Path) -> Result<(), CitadelError> {
        let mut json =
            serde_json::to_vec_pretty(self).map_err(|e| CitadelError::invalid(path, e))?;
        json.push(b'\n');
        rampart_certs::write_file_atomic(path, &json, 0o644).map_err(|e| CitadelError::io(path, e))
    }

    /// Drops the entries whose certificate expired more than [`PRUNE_AFTER_EXPIRY`] before
    /// `now` (they left the CRL long ago); returns their serials.
    pub fn prune(&mut self, now: SystemTime) -> Vec<String> {
        let mut gone = Vec::new();
        self.revoked.retain(|r| {
            let keep = !prunable(r.not_after.as_deref(), now);
            if !keep {
                gone.push(r.serial.clone());
            }
            keep
        });
        self.identities.retain(|r| !r.prunable(now));
        gone
    }

    /// The entry for `serial` (any hex form), if revoked.
    pub fn find(&self, serial: &str) -> Option<&StoredRevocation> {
        let norm = normalize_serial(serial).ok()?;
        self.revoked.iter().find(|r| r.serial == norm)
    }

    /// Adds a revocation. Returns `Ok(false)` when the serial was already revoked (the first
    /// entry, its time and reason, is kept).
    pub fn revoke(
        &mut self,
        serial: &str,
        reason: Option<RevocationReason>,
        spiffe_id: Option<String>,
        not_after: Option<SystemTime>,
        now: SystemTime,
    ) -> Result<bool, String> {
        let serial = normalize_serial(serial)?;
        if self.revoked.iter().any(|r| r.serial == serial) {
            return Ok(false);
        }
        self.revoked.push(StoredRevocation {
            serial,
            revoked_at: crate::audit::rfc3339(now),
            reason: reason.map(|r| r.name().to_owned()),
            spiffe_id,
            not_after: not_after.map(crate::audit::rfc3339),
        });
        Ok(true)
    }

    /// The next CRL number: above the last one, and at least the Unix time of `now`.
    pub fn next_crl_number(&self, now: SystemTime) -> u64 {
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.crl_number.saturating_add(1).max(secs)
    }

    /// The CRL contents at `now`, valid for `validity`, numbered `crl_number`. Entries whose
    /// certificate expired more than [`EXPIRED_ENTRY_GRACE`] ago are left out.
    pub fn crl_params(&self, crl_number: u64, now: SystemTime, validity: Duration) -> CrlParams {
        let revoked = self
            .revoked
            .iter()
            .filter(|r| on_crl_at(r.not_after.as_deref(), now))
            .map(|r| RevokedCert {
                serial_hex: r.serial.clone(),
                revoked_at: parse_time(&r.revoked_at).unwrap_or(now),
                reason: r.reason.as_deref().and_then(|s| s.parse().ok()),
            })
            .collect();
        CrlParams {
            this_update: now,
            next_update: now + validity,
            crl_number,
            revoked,
        }
    }

    /// Signs the next CRL with `signer` and records its number (the caller saves the state
    /// when it wants the number persisted).
    pub fn sign_next(
        &mut self,
        signer: &dyn X509Signer,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Crl, rampart_certs::Error> {
        let number = self.next_crl_number(now);
        let crl = signer.sign_crl(&self.crl_params(number, now, validity))?;
        self.crl_number = number;
        Ok(crl)
    }
}

// === the running CA ===

/// The CRLs the CA serves right now.
#[derive(Debug)]
pub struct PublishedCrls {
    /// The CA's own CRL for its signing certificate (its revocations, plus the plug-in CRL's
    /// entries for that certificate); `None` if the signer cannot sign CRLs.
    pub own: Option<Crl>,
    /// What is served: the plug-in CRLs with the signing certificate's replaced by `own`.
    pub set: Arc<CrlSet>,
    /// `set` as the CA's own client-certificate check uses it (unknown status allowed).
    pub check: RevocationCheck,
    /// When `own` was signed.
    pub signed_at: SystemTime,
    /// Increases at every publication (also across restarts: at least the own CRL's number);
    /// 0 before the first.
    pub version: u64,
}

/// One revocation done through [`Revocations::revoke`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedSerial {
    /// Serial, lowercase hex.
    pub serial: String,
    /// The identity it was issued to (from the audit log); empty when this CA replica did
    /// not issue it (revoked for the other replicas, `--kubernetes`).
    pub spiffe_id: String,
    /// Its not-after (RFC 3339).
    pub not_after: String,
    /// False when it was revoked already (the first revocation stands).
    pub new: bool,
}

/// The CA's revocations (persisted in [`REVOCATIONS_FILE`]) and the CRLs published from them.
#[derive(Debug)]
pub struct Revocations {
    state_path: PathBuf,
    published_path: PathBuf,
    validity: Duration,
    state: Mutex<RevocationState>,
    current: ArcSwap<PublishedCrls>,
    /// Counts changes of the revoked list (a new revocation or a merge), for watchers.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Revocations {
    /// Loads the persisted revocations from `state_dir` (a broken file stops the CA: starting
    /// with an empty list would un-revoke). Nothing is published until [`Self::publish`].
    pub fn open(state_dir: &Path, validity: Duration) -> Result<Revocations, CitadelError> {
        let state_path = state_dir.join(REVOCATIONS_FILE);
        let state = RevocationState::load(&state_path)?;
        Ok(Revocations {
            state_path,
            published_path: state_dir.join(PUBLISHED_CRLS),
            validity,
            state: Mutex::new(state),
            current: ArcSwap::from_pointee(PublishedCrls {
                own: None,
                set: Arc::new(CrlSet::empty()),
                check: RevocationCheck::default(),
                signed_at: SystemTime::UNIX_EPOCH,
                version: 0,
            }),
            changes: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Changes when the revoked list changes (a new revocation, or entries merged): how the
    /// Kubernetes mode learns of a revocation made through the admin socket, to share it.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Adds the `entries` this CA lacks (another replica's revocations): each is checked with
    /// [`StoredRevocation::validated`] and an invalid one is refused alone. A serial revoked
    /// here already keeps its first entry, except that a known not-after moves to a later
    /// known one: who can feed entries can keep one on the CRL longer, never take it off
    /// sooner. Entries past [`PRUNE_AFTER_EXPIRY`] are not taken. When something changed the
    /// list is persisted (atomically, before anything is published); when that changes the
    /// CRL (an entry added, or put back on it by a later not-after) the CRL is re-signed and
    /// published at once, as for [`Self::revoke`]. Nothing is removed.
    pub fn merge(
        &self,
        authority: &Authority,
        entries: &[StoredRevocation],
        now: SystemTime,
    ) -> Result<MergeOutcome, CitadelError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = state.clone();
        let mut out = MergeOutcome::default();
        // Whether the CRL changes: an entry added that is on it, or an extension that puts an
        // entry back on it (entries carry no not-after on the CRL).
        let mut crl_changed = false;
        for e in entries {
            match e.validated() {
                Err(why) => out.refused.push((e.serial.clone(), why)),
                Ok(v) => match next.revoked.iter_mut().find(|r| r.serial == v.serial) {
                    Some(have) => {
                        // A known not-after moves to a later known one; an absent one never
                        // replaces a known one (it would keep the entry for ever).
                        let (Some(theirs), Some(ours)) =
                            (v.not_after.as_deref(), have.not_after.as_deref())
                        else {
                            continue;
                        };
                        if later_not_after(Some(theirs), Some(ours)) {
                            if !on_crl_at(Some(ours), now) && on_crl_at(Some(theirs), now) {
                                crl_changed = true;
                            }
                            have.not_after = v.not_after;
                            out.extended.push(v.serial);
                        }
                    }
                    None if prunable(v.not_after.as_deref(), now) => {}
                    None => {
                        crl_changed |= on_crl_at(v.not_after.as_deref(), now);
                        out.added.push(v.serial.clone());
                        next.revoked.push(v);
                    }
                },
            }
        }
        if !out.added.is_empty() || !out.extended.is_empty() {
            next.save(&self.state_path)?;
            *state = next;
        }
        // Re-signed only when the CRL's content changes: repeated extensions (whoever can
        // feed entries), or entries added that already left the CRL, cost a file write each,
        // not a CRL and every namespace's copy of it.
        if crl_changed {
            self.publish_locked(&mut state, authority, now);
            out.resigned = true;
        }
        if !out.added.is_empty() {
            self.changes.send_modify(|n| *n += 1);
        }
        Ok(out)
    }

    /// Records the identity revocation `rule` (persisted atomically) unless an equal one is
    /// there; returns whether it is new. Watchers are told, so that it is shared.
    pub fn add_identity_rule(&self, rule: IdentityRevocation) -> Result<bool, CitadelError> {
        let rule = rule.validated().map_err(CitadelError::Config)?;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.identities.contains(&rule) {
            return Ok(false);
        }
        let mut next = state.clone();
        next.identities.push(rule);
        next.save(&self.state_path)?;
        *state = next;
        self.changes.send_modify(|n| *n += 1);
        Ok(true)
    }

    /// The identity revocations of `rules` this CA lacks (checked one by one; an invalid one
    /// is refused alone; ones past their prune horizon are not taken), not yet recorded: the
    /// caller applies each to its audit log, then records it with
    /// [`Self::record_identity_rule`], so that a rule whose application failed (or was cut
    /// short by a crash) is applied again when it comes again.
    pub fn new_identity_rules(
        &self,
        rules: &[IdentityRevocation],
        now: SystemTime,
    ) -> RuleMergeOutcome {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = RuleMergeOutcome::default();
        for r in rules {
            let v = match r.validated() {
                Err(why) => {
                    out.refused.push((r.spiffe_id.clone(), why));
                    continue;
                }
                Ok(v) => v,
            };
            if v.is_future(now) {
                out.refused.push((
                    v.spiffe_id.clone(),
                    format!("issued_before {} is in the future", v.issued_before),
                ));
                continue;
            }
            // Every rule is applied once, even one for an identity a held rule with a later
            // time names: a rule covers what the audit log held when it was applied, not all
            // that its time would. Applying it again costs little (one audit log read per
            // batch; serials revoked already are skipped).
            if v.prunable(now)
                || state.identities.contains(&v)
                || out.applied.iter().any(|a| a.rule == v)
            {
                continue;
            }
            out.applied.push(AppliedRule {
                rule: v,
                revoked: Vec::new(),
            });
        }
        out
    }

    /// Records identity revocations taken from elsewhere after they were applied (persisted
    /// in one write; watchers are not told: they came from the shared object).
    pub fn record_identity_rules(&self, rules: &[IdentityRevocation]) -> Result<(), CitadelError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = state.clone();
        for r in rules {
            if !next.identities.contains(r) {
                next.identities.push(r.clone());
            }
        }
        if next.identities.len() == state.identities.len() {
            return Ok(());
        }
        next.save(&self.state_path)?;
        *state = next;
        Ok(())
    }

    /// What is served now.
    pub fn current(&self) -> Arc<PublishedCrls> {
        self.current.load_full()
    }

    /// The lifetime of the CA's own CRLs.
    pub fn validity(&self) -> Duration {
        self.validity
    }

    /// Whether the own CRL should be re-signed at `now` (half its lifetime gone).
    pub fn due(&self, now: SystemTime) -> bool {
        let cur = self.current.load();
        now >= cur.signed_at + self.validity / 2
    }

    /// A copy of the persisted revocations.
    pub fn state(&self) -> RevocationState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-signs the CA's CRL for `authority`'s signing certificate and rebuilds the served
    /// set. Returns whether the served content changed. A signer that cannot sign CRLs (or
    /// a CA certificate without cRLSign) serves the plug-in CRLs alone and logs why.
    pub fn publish(&self, authority: &Authority, now: SystemTime) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.prune_locked(&mut state, now);
        self.publish_locked(&mut state, authority, now)
    }

    /// Drops entries past [`PRUNE_AFTER_EXPIRY`] from the persisted list (they are on no
    /// CRL any more). If the smaller list cannot be saved, the entries stay.
    fn prune_locked(&self, state: &mut RevocationState, now: SystemTime) {
        let mut next = state.clone();
        let gone = next.prune(now);
        if gone.is_empty() && next.identities.len() == state.identities.len() {
            return;
        }
        match next.save(&self.state_path) {
            Ok(()) => {
                *state = next;
                tracing::info!(serials = ?gone, "dropped revocations of certificates that expired more than 7 days ago");
                self.changes.send_modify(|n| *n += 1);
            }
            Err(e) => tracing::warn!(error = %e, "could not drop expired revocations; kept"),
        }
    }

    fn publish_locked(
        &self,
        state: &mut RevocationState,
        authority: &Authority,
        now: SystemTime,
    ) -> bool {
        let signing = authority.signer().ca_cert().clone();
        let plugin = authority.plugin_crls();
        let number = state.next_crl_number(now);
        let mut params = state.crl_params(number, now, self.validity);
        // The plug-in CRL for the signing certificate, if any: its entries join ours (the
        // CA signs the one CRL for that certificate).
        if let Some(p) = plugin.and_then(|p| p.crl_for(&signing)) {
            for r in p.revoked_certs() {
                if !params.revoked.iter().any(|o| o.serial_hex == r.serial_hex) {
                    params.revoked.push(r.clone());
                }
            }
        }
        let own = match authority.signer().sign_crl(&params).and_then(|crl| {
            CrlSet::new(
                vec![crl.clone()],
                std::slice::from_ref(&signing),
                now,
                CrlExpiry::Refuse,
            )
            .map(|set| (crl, set))
            .map_err(|e| rampart_certs::Error::IssuedCertificateInvalid(e.to_string()))
        }) {
            Ok((crl, set)) => {
                state.crl_number = number;
                // Persisted with every CRL: a CA killed and restarted within the same second
                // would otherwise number its next CRL as the last one (numbers are at least
                // the Unix time, and the file kept only the number of the last revocation),
                // and RFC 5280 gives one number to one CRL.
                if let Err(e) = state.save(&self.state_path) {
                    tracing::warn!(error = %e, "could not persist the CRL number");
                }
                Some((crl, set))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot sign a CRL for the signing certificate; serving the plug-in CRLs only, revocations of issued certificates are not published");
                None
            }
        };
        let set = match (plugin, &own) {
            (Some(p), Some((_, o))) => p.merged_with(o),
            (Some(p), None) => (**p).clone(),
            (None, Some((_, o))) => o.clone(),
            (None, None) => CrlSet::empty(),
        };
        for crl in set.expired(now) {
            tracing::error!(
                issuer = %crl.issuer(),
                next_update = %crate::audit::rfc3339(crl.next_update()),
                "served CRL has EXPIRED (past its nextUpdate); still served and enforced"
            );
        }
        let previous = self.current.load();
        let changed = previous.set.etag() != set.etag();
        // Monotonic across restarts too: at least the own CRL's number (which is).
        let version = (previous.version + 1).max(own.as_ref().map_or(0, |_| number));
        let set = Arc::new(set);
        if let Err(e) =
            rampart_certs::write_file_atomic(&self.published_path, set.to_pem().as_bytes(), 0o644)
        {
            tracing::error!(file = %self.published_path.display(), error = %e, "writing the published CRLs failed");
        }
        self.current.store(Arc::new(PublishedCrls {
            own: own.map(|(c, _)| c),
            check: RevocationCheck {
                crls: set.clone(),
                unknown: UnknownStatus::Allow,
            },
            set,
            signed_at: now,
            version,
        }));
        changed
    }

    /// Revokes `entries` (serial, identity, not-after) with `reason`, persists the list
    /// (atomically, before anything is published), then re-signs and publishes at once.
    pub fn revoke(
        &self,
        authority: &Authority,
        entries: &[(String, String, SystemTime)],
        reason: Option<RevocationReason>,
        now: SystemTime,
    ) -> Result<Vec<RevokedSerial>, CitadelError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = state.clone();
        let mut out = Vec::with_capacity(entries.len());
        for (serial, id, not_after) in entries {
            let new = next
                .revoke(
                    serial,
                    reason,
                    Some(id.clone()).filter(|id| !id.is_empty()),
                    Some(*not_after),
                    now,
                )
                .map_err(CitadelError::Config)?;
            out.push(RevokedSerial {
                serial: normalize_serial(serial).map_err(CitadelError::Config)?,
                spiffe_id: id.clone(),
                not_after: crate::audit::rfc3339(*not_after),
                new,
            });
        }
        let changed = out.iter().any(|r| r.new);
        if changed {
            next.save(&self.state_path)?;
            *state = next;
        }
        self.publish_locked(&mut state, authority, now);
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
        if self.current.load().own.is_none() {
            return Err(CitadelError::Config(
                "the revocation is recorded, but this CA cannot sign a CRL for its signing \
                 certificate (see the CA's log), so it is not published"
                    .into(),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_is_idempotent_and_numbers_increase() {
        let now = SystemTime::now();
        let mut s = RevocationState::default();
        assert!(
            s.revoke(
                "serial=0A",
                Some(RevocationReason::KeyCompromise),
                None,
                None,
                now
            )
            .unwrap()
        );
        assert!(!s.revoke("0a", None, None, None, now).unwrap());
        assert_eq!(s.revoked.len(), 1);
        assert_eq!(
            s.find("00:0a").unwrap().reason.as_deref(),
            Some("keyCompromise")
        );
        let n1 = s.next_crl_number(now);
        s.crl_number = n1;
        assert!(s.next_crl_number(now) > n1);
        assert!(s.revoke("zz", None, None, None, now).is_err());
    }

    #[test]
    fn expired_entries_leave_the_crl_after_the_grace() {
        let now = SystemTime::now();
        let mut s = RevocationState::default();
        s.revoke("01", None, None, Some(now - 2 * EXPIRED_ENTRY_GRACE), now)
            .unwrap();
        s.revoke("02", None, None, Some(now + EXPIRED_ENTRY_GRACE), now)
            .unwrap();
        s.revoke("03", None, None, None, now).unwrap();
        let p = s.crl_params(1, now, Duration::from_secs(60));
        let serials: Vec<_> = p.revoked.iter().map(|r| r.serial_hex.as_str()).collect();
        assert_eq!(serials, ["02", "03"]);
    }

    #[test]
    fn entries_are_pruned_a_week_after_expiry_and_unknown_expiry_is_kept() {
        let now = SystemTime::now();
        let mut s = RevocationState::default();
        let day = Duration::from_secs(86400);
        s.revoke("01", None, None, Some(now - PRUNE_AFTER_EXPIRY - day), now)
            .unwrap();
        // Expired, off the CRL, but not yet past the prune horizon.
        s.revoke("02", None, None, Some(now - 2 * day), now)
            .unwrap();
        s.revoke("03", None, None, None, now).unwrap();
        s.revoke("04", None, None, Some(now + day), now).unwrap();
        assert_eq!(s.prune(now), ["01"]);
        let left: Vec<_> = s.revoked.iter().map(|r| r.serial.as_str()).collect();
        assert_eq!(left, ["02", "03", "04"]);
        assert!(s.prune(now).is_empty());
    }

    #[test]
    fn an_identity_rule_covers_its_identity_up_to_its_time_and_is_checked_on_load() {
        let rule = IdentityRevocation {
            spiffe_id: "spiffe://cluster.local/ns/a/sa/b".into(),
            issued_before: "2026-12-01T12:00:00Z".into(),
            reason: Some("keyCompromise".into()),
        };
        let now = parse_time("2026-12-01T13:00:00Z").unwrap();
        let line = |id: &str, time: &str| crate::audit::AuditEntry {
            time: time.into(),
            serial: "0a".into(),
            spiffe_id: id.into(),
            not_after: "2026-12-02T12:00:00Z".into(),
            caller: "x".into(),
            auth: String::new(),
            peer: String::new(),
        };
        assert!(rule.covers(&line(&rule.spiffe_id, "2026-12-01T11:00:00Z"), now));
        // Within the skew margin: still covered (errs on revoking).
        assert!(rule.covers(&line(&rule.spiffe_id, "2026-12-01T12:00:30Z"), now));
        // The twins: issued well after, or to another identity.
        assert!(!rule.covers(&line(&rule.spiffe_id, "2026-12-01T12:05:00Z"), now));
        assert!(!rule.covers(
            &line("spiffe://cluster.local/ns/a/sa/c", "2026-12-01T11:00:00Z"),
            now
        ));
        assert!(!rule.prunable(now));
        assert!(rule.prunable(now + rampart_certs::MAX_WORKLOAD_CERT_TTL + PRUNE_AFTER_EXPIRY));
        for bad in [
            IdentityRevocation {
                spiffe_id: "not-an-id".into(),
                ..rule.clone()
            },
            IdentityRevocation {
                issued_before: "yesterday".into(),
                ..rule.clone()
            },
            IdentityRevocation {
                reason: Some("whim".into()),
                ..rule.clone()
            },
        ] {
            assert!(bad.validated().is_err(), "{bad:?}");
        }
        // A state file with a broken rule is an error, not a state without it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REVOCATIONS_FILE);
        let mut s = RevocationState::default();
        s.identities.push(IdentityRevocation {
            issued_before: "x".into(),
            ..rule.clone()
        });
        s.save(&path).unwrap();
        assert!(RevocationState::load(&path).is_err());
        s.identities = vec![rule];
        s.save(&path).unwrap();
        assert_eq!(RevocationState::load(&path).unwrap(), s);
    }

    #[test]
    fn not_after_ordering_treats_unknown_as_latest() {
        let t1 = "2026-01-01T00:00:00Z";
        let t2 = "2026-02-01T00:00:00Z";
        assert!(later_not_after(Some(t2), Some(t1)));
        assert!(!later_not_after(Some(t1), Some(t2)));
        assert!(!later_not_after(Some(t1), Some(t1)));
        assert!(later_not_after(None, Some(t1)));
        assert!(!later_not_after(Some(t2), None));
        assert!(!later_not_after(None, None));
    }

    #[test]
    fn a_broken_state_file_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REVOCATIONS_FILE);
        assert_eq!(
            RevocationState::load(&path).unwrap(),
            RevocationState::default()
        );
        std::fs::write(&path, "{\"crl_number\": 1, \"revoked\": [").unwrap();
        assert!(RevocationState::load(&path).is_err());
        let mut s = RevocationState::default();
        s.revoke("ab", None, None, None, SystemTime::now()).unwrap();
        s.save(&path).unwrap();
        assert_eq!(RevocationState::load(&path).unwrap(), s);
    }
}
