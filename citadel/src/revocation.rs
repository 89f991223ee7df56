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

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rampart_certs::{Crl, CrlParams, RevocationReason, RevokedCert, parse_serial_hex};
use serde::{Deserialize, Serialize};

use crate::error::CitadelError;
use crate::signer::X509Signer;

/// The CRL file: in an Istio `cacerts` directory (plug-in CRLs, read by the CA) and beside CA
/// material made with `rampart certs` (written by `rampart certs revoke|crl`).
pub const CA_CRL: &str = "ca-crl.pem";
/// Alias of [`CA_CRL`] for `rampart certs` directories.
pub const CRL_FILE: &str = CA_CRL;
/// `rampart certs`: the revoked serials and the last CRL number, beside the CA.
pub const CRL_STATE_FILE: &str = "ca-crl-state.json";
/// The running CA: revocations of the certificates it issued, in its state directory.
pub const REVOCATIONS_FILE: &str = "revocations.json";
/// The running CA: the CRL it publishes for its signing certificate, in its state directory
/// (0644, rewritten at every re-signing).
pub const CA_OWN_CRL: &str = "ca-crl.pem";

/// Revoked entries are dropped from CRLs this long after the certificate expired (RFC 5280
/// allows removing expired certificates; the grace covers clock skew of verifiers).
pub const EXPIRED_ENTRY_GRACE: Duration = Duration::from_secs(24 * 3600);

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

/// What a CA has revoked, and the last CRL number it used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationState {
    /// The number of the last CRL signed from this state.
    pub crl_number: u64,
    /// Revoked serials, in revocation order.
    pub revoked: Vec<StoredRevocation>,
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
        Ok(state)
    }

    /// Writes the state atomically (mode 0644: serials are public; the directory protects it).
    pub fn save(&self, path: &Path) -> Result<(), CitadelError> {
        let mut json =
            serde_json::to_vec_pretty(self).map_err(|e| CitadelError::invalid(path, e))?;
        json.push(b'\n');
        rampart_certs::write_file_atomic(path, &json, 0o644).map_err(|e| CitadelError::io(path, e))
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
            .filter(|r| {
                r.not_after
                    .as_deref()
                    .and_then(parse_time)
                    .is_none_or(|na| na + EXPIRED_ENTRY_GRACE > now)
            })
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
