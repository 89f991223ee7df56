//! Time conversions, once: `SystemTime` to and from Unix seconds, rustls/webpki's
//! [`UnixTime`], the `time` crate's [`OffsetDateTime`] (what certificate builders take), and
//! RFC 3339 text (logs, audit records, admin JSON).
//!
//! Certificates and tokens carry whole seconds; so do these conversions, except
//! [`unix_secs_f64`] (gauges).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::UnixTime;
use time::OffsetDateTime;

/// Seconds since the Unix epoch (possibly negative) as a `SystemTime`.
pub fn from_unix_secs(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Whole seconds since the Unix epoch, negative before it (truncated toward the epoch).
pub fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Whole seconds since the Unix epoch; 0 for a time before it.
pub fn unix_secs_u64(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Seconds since the Unix epoch with their fraction, negative before it (for gauges).
pub fn unix_secs_f64(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// rustls/webpki's time as a `SystemTime` (whole seconds).
pub fn from_unix_time(t: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.as_secs())
}

/// A `SystemTime` as rustls/webpki's time; the epoch for a time before it.
pub fn to_unix_time(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

/// A `SystemTime` as an `OffsetDateTime` (UTC) in whole seconds, rounded down, as
/// certificates carry it.
pub fn to_offset_date_time(t: SystemTime) -> OffsetDateTime {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
    };
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// An `OffsetDateTime` as a `SystemTime` (whole seconds).
pub fn from_offset_date_time(t: OffsetDateTime) -> SystemTime {
    from_unix_secs(t.unix_timestamp())
}

/// RFC 3339 in UTC with second precision (`2026-12-06T06:42:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "invalid-time".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip_in_whole_seconds() {
        let t = UNIX_EPOCH + Duration::from_millis(1_790_000_000_750);
        assert_eq!(unix_secs(t), 1_790_000_000);
        assert_eq!(unix_secs_u64(t), 1_790_000_000);
        assert_eq!(unix_secs_f64(t), 1_790_000_000.75);
        assert_eq!(from_unix_secs(unix_secs(t)), t - Duration::from_millis(750));
        assert_eq!(
            from_unix_time(to_unix_time(t)),
            from_unix_secs(1_790_000_000)
        );
        assert_eq!(
            from_offset_date_time(to_offset_date_time(t)),
            from_unix_secs(1_790_000_000)
        );
        assert_eq!(rfc3339(t), "2026-09-21T14:13:20Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        // Before the epoch.
        let before = UNIX_EPOCH - Duration::from_millis(1500);
        assert_eq!(unix_secs(before), -1);
        assert_eq!(unix_secs_u64(before), 0);
        assert_eq!(unix_secs_f64(before), -1.5);
        assert_eq!(from_unix_secs(-2), UNIX_EPOCH - Duration::from_secs(2));
        assert_eq!(to_offset_date_time(before).unix_timestamp(), -2);
        assert_eq!(to_unix_time(before).as_secs(), 0);
    }
}
