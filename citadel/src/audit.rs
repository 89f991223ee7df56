//! The issuance audit log: one JSON line per issued certificate, on disk (fsync'd) before the
//! certificate is returned. Concurrent issuances share one write + `fdatasync` (group commit),
//! so durability costs one disk flush per batch, not per certificate.
//!
//! A failed batch is refused (no certificate of it is returned) and remembered
//! ([`AuditLog::last_failure`], the CA's `/ready`) until a write succeeds again: while failing,
//! the writer re-tries every [`AUDIT_RETRY`] with a probe (a block of blank lines, which
//! readers skip, flushed and cut off again), so a replica taken out of service for it comes
//! back by itself once the cause is fixed. The file at the path is checked before every
//! batch and, when idle, every [`AUDIT_RETRY`] (a `stat`, never following a symlink), and
//! the open file after every batch's flush: when the path no longer names the file the CA
//! opened (renamed, removed, replaced, a symlink put there), issuance **fails closed**
//! until the file is back at its path or the CA restarts. Following a new file instead would
//! let `rampart ca revoke --spiffe-id` and identity revocations, which read the log at its
//! path, silently miss every certificate recorded in the old one. The log is opened without
//! following a symlink and must be a regular file; a newly created one has its directory
//! flushed too. A full disk shows at the first write that fails.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::error::CitadelError;
/// The audit log's time format, `rampart_certs::timestamp::rfc3339` (RFC 3339, UTC,
/// seconds), named here for the crate's modules that write records.
pub(crate) use rampart_certs::timestamp::rfc3339;

/// One issuance, as written to the audit log.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// When the certificate was issued (RFC 3339, UTC).
    pub time: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// The SPIFFE ID in the certificate.
    pub spiffe_id: String,
    /// The certificate's not-after (RFC 3339, UTC).
    pub not_after: String,
    /// Who asked: the proved caller identity.
    pub caller: String,
    /// How the caller proved it: `jwt`, `mtls`, or `impersonation`.
    pub auth: &'static str,
    /// The remote address of the caller.
    pub peer: String,
}

/// One line of the audit log as read back ([`read_audit_log`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When the certificate was issued (RFC 3339).
    pub time: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// The SPIFFE ID in the certificate.
    pub spiffe_id: String,
    /// The certificate's not-after (RFC 3339).
    pub not_after: String,
    /// Who asked.
    pub caller: String,
    /// How the caller proved it.
    #[serde(default)]
    pub auth: String,
    /// The caller's address.
    #[serde(default)]
    pub peer: String,
}

impl AuditEntry {
    /// The issuance time.
    pub fn issued_at(&self) -> Option<SystemTime> {
        parse_rfc3339(&self.time)
    }

    /// The certificate's not-after.
    pub fn expires_at(&self) -> Option<SystemTime> {
        parse_rfc3339(&self.not_after)
    }
}

/// Parses an RFC 3339 time as the audit log writes it.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// Reads the audit log at `path` (it can be read while the CA appends). Returns the entries
/// in order and the number of lines that did not parse (a torn last line after a crash, or
/// damage), which are skipped.
pub fn read_audit_log(path: &Path) -> Result<(Vec<AuditEntry>, usize), CitadelError> {
    use std::io::BufRead;
    let file = File::open(path).map_err(|e| CitadelError::io(path, e))?;
    let mut entries = Vec::new();
    let mut skipped = 0;
    for line in std::io::BufReader::new(file).split(b'\n') {
        let line = line.map_err(|e| CitadelError::io(path, e))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<AuditEntry>(&line) {
            Ok(e) => entries.push(e),
            Err(_) => skipped += 1,
        }
    }
    Ok((entries, skipped))
}

/// A line and who waits for it on disk; or `None`: the CA stopped, the writer writes what
/// came before and ends (letting go of the file and its lock although handles remain).
type Pending = Option<(Vec<u8>, oneshot::Sender<Result<(), String>>)>;

/// How often the writer re-tries a failing audit log (a probe write) when no issuance does.
pub const AUDIT_RETRY: Duration = Duration::from_secs(1);

/// Bytes of the probe write (blank lines): a whole block, so a full disk does not pass it
/// by filling the last block's tail.
const PROBE_BYTES: usize = 4096;

/// The last audit write failed, and nothing has been written since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFailure {
    /// When it failed (the first failure of the streak).
    pub since: SystemTime,
    /// Why (the latest failure's error).
    pub error: String,
}

type Health = Arc<Mutex<Option<AuditFailure>>>;

/// Handle to the audit log writer thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Pending>,
    path: PathBuf,
    health: Health,
    /// Disconnected when the writer thread has ended (its file, and lock, let go).
    exited: Arc<Mutex<Option<mpsc::Receiver<()>>>>,
}

// === impl AuditLog ===

impl AuditLog {
    /// Opens (creating, mode 0600) `path` for appending and starts the writer thread.
    ///
    /// A last line without its newline (the CA was killed while writing a batch) is cut off
    /// with a warning before anything is appended: that batch's `fdatasync` never returned,
    /// so none of its certificates was handed out, and appending after it would glue the next
    /// record onto the fragment and leave an unparseable line in the middle of the log.
    pub fn open(path: &Path) -> Result<Self, CitadelError> {
        let existed = std::fs::symlink_metadata(path).is_ok();
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            // Never through a symlink: someone who can write the state directory must not
            // be able to point the CA's appends at another of its files.
            .custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC).bits() as i32,
            )
            .open(path)
            .map_err(|e| CitadelError::io(path, e))?;
        let meta = file.metadata().map_err(|e| CitadelError::io(path, e))?;
        if !meta.is_file() {
            return Err(CitadelError::io(
                path,
                std::io::Error::other("the audit log is not a regular file"),
            ));
        }
        lock_exclusive(&file, path)?;
        if !existed {
            // The new file's directory entry is durable before any line is acknowledged.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| CitadelError::io(dir, e))?;
            }
        }
        repair_torn_tail(&mut file, path).map_err(|e| CitadelError::io(path, e))?;
        let (tx, rx) = mpsc::channel::<Pending>();
        let thread_path = path.to_path_buf();
        let health = Health::default();
        let thread_health = health.clone();
        let (exit_tx, exit_rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("citadel-audit".into())
            .spawn(move || {
                let _exit = exit_tx;
                writer(file, rx, &thread_path, &thread_health);
            })
            .map_err(|e| CitadelError::io(path, e))?;
        Ok(AuditLog {
            tx,
            path: path.to_path_buf(),
            health,
            exited: Arc::new(Mutex::new(Some(exit_rx))),
        })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Some` while the audit log cannot be written: the last write (a batch or a retry
    /// probe) failed, or the writer thread stopped. Cheap (one uncontended lock, never held
    /// across I/O).
    pub fn last_failure(&self) -> Option<AuditFailure> {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Appends `record` and returns once it is on disk.
    pub async fn append(&self, record: &AuditRecord) -> Result<(), CitadelError> {
        let mut line = serde_json::to_vec(record).map_err(|e| self.err(e))?;
        line.push(b'\n');
        let (done_tx, done_rx) = oneshot::channel();
        self.tx
            .send(Some((line, done_tx)))
            .map_err(|_| self.err("writer thread stopped"))?;
        match done_rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.err(e)),
            Err(_) => Err(self.err("writer thread stopped")),
        }
    }

    /// Ends the writer thread once what was sent before is written, and waits (up to 5 s)
    /// for it to end: the file and its lock are let go now, not when the last handle is
    /// dropped (connections of a stopped CA can hold one for a while). Appends after this
    /// fail.
    pub fn close(&self) {
        let _ = self.tx.send(None);
        let exited = self.exited.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(rx) = exited
            && let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(5))
        {
            tracing::warn!(path = %self.path.display(), "the audit writer did not end within 5 s of the CA's shutdown");
        }
    }

    fn err(&self, reason: impl std::fmt::Display) -> CitadelError {
        CitadelError::Audit {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }
}

/// One writer per audit log: an exclusive `flock` on the open file, held by the writer
/// thread for as long as it writes (and let go by the kernel when the process ends). The
/// state directory's lock (`ca.lock`) already keeps two CAs off one directory; this covers an
/// `--audit-log` outside it, where two CAs would otherwise append to one file and each cut
/// the other's lines off when one of its own batches failed. A lock let go a moment ago (a
/// writer thread still finishing, a child forked before its exec) gets a second's retries.
fn lock_exclusive(file: &File, path: &Path) -> Result<(), CitadelError> {
    let mut waited = std::time::Duration::ZERO;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock)
                if waited < std::time::Duration::from_secs(1) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
                waited += std::time::Duration::from_millis(20);
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(CitadelError::Config(format!(
                    "audit log {} is in use by another CA process (it holds the file's lock): \
                     one CA per audit log; stop the other CA or give this one its own \
                     --audit-log",
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(CitadelError::io(path, e)),
        }
    }
}

/// Cuts a torn last line (no trailing newline) off the log, warning with what was cut.
fn repair_torn_tail(file: &mut File, path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    // Read backwards in chunks until the last newline (or the start of the file).
    const CHUNK: u64 = 64 * 1024;
    let mut end = len;
    let mut tail: Vec<u8> = Vec::new();
    let keep = loop {
        let start = end.saturating_sub(CHUNK);
        let mut buf = vec![0u8; (end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf)?;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            let cut = start + i as u64 + 1;
            tail.splice(0..0, buf[i + 1..].iter().copied());
            break cut;
        }
        tail.splice(0..0, buf);
        if start == 0 {
            break 0;
        }
        end = start;
    };
    if keep == len {
        return Ok(());
    }
    tracing::warn!(
        path = %path.display(),
        bytes = tail.len(),
        fragment = %String::from_utf8_lossy(&tail[..tail.len().min(512)]),
        "audit log ends with a torn line (the CA stopped while writing it, before it was \
         flushed, so no certificate of it was handed out); cutting it off"
    );
    file.set_len(keep)?;
    file.sync_all()
}

fn writer(mut file: File, rx: mpsc::Receiver<Pending>, path: &Path, health: &Health) {
    const MAX_BATCH: usize = 4096;
    // Whatever ends this thread (the CA dropping the log, or a panic) leaves it failing.
    let _stopped = StoppedGuard(health.clone());
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut waiters = Vec::with_capacity(MAX_BATCH);
    loop {
        let failing = health.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        let first = if failing {
            match rx.recv_timeout(AUDIT_RETRY) {
                Ok(Some(first)) => first,
                Ok(None) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let result = probe(&mut file, path);
                    record_outcome(health, path, &result, "retry");
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match rx.recv_timeout(AUDIT_RETRY) {
                Ok(Some(first)) => first,
                Ok(None) => return,
                // Idle: is the file at the path still ours (a stat, no write)? A replaced
                // or removed log is reported before an issuance meets it.
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let result = still_at_path(&file, path);
                    if let Err(e) = &result {
                        tracing::error!(path = %path.display(), error = %e, "audit log not writable; issuance will be refused until it is");
                    }
                    record_outcome(health, path, &result, "check");
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        buf.clear();
        buf.extend_from_slice(&first.0);
        waiters.push(first.1);
        let mut closing = false;
        while waiters.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Some((line, done))) => {
                    buf.extend_from_slice(&line);
                    waiters.push(done);
                }
                Ok(None) => {
                    closing = true;
                    break;
                }
                Err(_) => break,
            }
        }
        // Counting what reached the file (instead of asking the kernel for the file's length
        // before every batch) is enough to take a failed batch back off it.
        let mut written = 0usize;
        let result = still_at_path(&file, path).and_then(|()| {
            write_counted(&mut file, &buf, &mut written)
                .and_then(|()| file.sync_data())
                .map_err(|e| e.to_string())
                // Removed between the check and the write: the lines went nowhere anyone
                // can read, so the batch is not acknowledged.
                .and_then(|()| not_removed(&file))
        });
        if let Err(e) = &result {
            tracing::error!(path = %path.display(), error = %e, "audit log write failed; withholding certificates");
            cut_back(&mut file, path, written);
        }
        record_outcome(health, path, &result, "batch");
        for w in waiters.drain(..) {
            let _ = w.send(result.clone());
        }
        if closing {
            return;
        }
    }
}

/// The failure of a writer thread that ended (a restart fixes it).
pub(crate) const WRITER_STOPPED: &str = "the audit writer thread stopped";

/// Marks the log failing when the writer thread ends.
struct StoppedGuard(Health);

impl Drop for StoppedGuard {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(AuditFailure {
            since: SystemTime::now(),
            error: WRITER_STOPPED.into(),
        });
    }
}

/// Remembers a failure (keeping when the streak began) or clears it after a success. Logs
/// after the lock is released: a blocked log output must not block `/ready`.
fn record_outcome(health: &Health, path: &Path, result: &Result<(), String>, what: &str) {
    enum Log {
        None,
        Recovered(SystemTime),
        Changed(String),
        Same(String),
    }
    let log = {
        let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
        match (result, h.as_mut()) {
            (Ok(()), Some(failure)) => {
                let since = failure.since;
                *h = None;
                Log::Recovered(since)
            }
            (Ok(()), None) => Log::None,
            (Err(e), Some(failure)) => {
                let changed = failure.error != *e;
                failure.error = e.clone();
                if changed {
                    Log::Changed(e.clone())
                } else {
                    Log::Same(e.clone())
                }
            }
            (Err(e), None) => {
                *h = Some(AuditFailure {
                    since: SystemTime::now(),
                    error: e.clone(),
                });
                Log::None
            }
        }
    };
    match log {
        Log::None => {}
        Log::Recovered(since) => {
            tracing::info!(path = %path.display(), failing_since = %rfc3339(since), "audit log writable again ({what} succeeded); issuing again");
        }
        Log::Changed(e) => {
            tracing::error!(path = %path.display(), error = %e, "audit log still not writable");
        }
        Log::Same(e) => {
            tracing::debug!(path = %path.display(), error = %e, "audit log still not writable");
        }
    }
}

/// Takes back whatever part of a failed write reached the file, so the next batch does not
/// start in the middle of a line (nothing of the failed batch was acknowledged).
fn cut_back(file: &mut File, path: &Path, written: usize) {
    if written == 0 {
        return;
    }
    let cut = file
        .metadata()
        .and_then(|m| file.set_len(m.len().saturating_sub(written as u64)));
    if let Err(e) = cut {
        tracing::error!(path = %path.display(), error = %e, "could not cut the failed write off the audit log");
    }
}

/// A write the size of a block, of blank lines (which readers of the log skip), flushed,
/// then cut off again: does the log take writes again?
fn probe(file: &mut File, path: &Path) -> Result<(), String> {
    still_at_path(file, path)?;
    let mut written = 0usize;
    let result = write_counted(file, &[b'\n'; PROBE_BYTES], &mut written)
        .and_then(|()| file.sync_data())
        .map_err(|e| e.to_string());
    cut_back(file, path, written);
    result
}

/// Whether `path` still names the file the writer has open (compared by device and inode,
/// without following a symlink at `path`). A path that cannot be looked up for another
/// reason (a directory made unsearchable) keeps the open file: nothing says it was replaced.
fn still_at_path(file: &File, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let open = file.metadata().map_err(|e| e.to_string())?;
    let gone = |what: &str| {
        format!(
            "the audit log file was {what}: certificates are withheld until it is back at \
             its path or the CA restarts (a new file would hide the certificates recorded in \
             the old one from revocation by identity)"
        )
    };
    if open.nlink() == 0 {
        return Err(gone("removed"));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.dev() == open.dev() && m.ino() == open.ino() => Ok(()),
        Ok(_) => Err(gone("replaced by another file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(gone("renamed or removed")),
        Err(_) => Ok(()),
    }
}

/// The open file still has a name (was not removed while written).
fn not_removed(file: &File) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    match file.metadata() {
        Ok(m) if m.nlink() == 0 => Err(
            "the audit log file was removed while this batch was written: its certificates \
             are withheld"
                .into(),
        ),
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// `write_all` that tells how many bytes reached the file, also when it fails.
fn write_counted(file: &mut File, buf: &[u8], written: &mut usize) -> std::io::Result<()> {
    while *written < buf.len() {
        match file.write(&buf[*written..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => *written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> AuditRecord {
        AuditRecord {
            time: rfc3339(SystemTime::UNIX_EPOCH),
            serial: format!("{i:032x}"),
            spiffe_id: "spiffe://cluster.local/ns/a/sa/b".into(),
            not_after: rfc3339(SystemTime::UNIX_EPOCH),
            caller: "spiffe://cluster.local/ns/a/sa/b".into(),
            auth: "jwt",
            peer: "127.0.0.1:1".into(),
        }
    }

    fn serials(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("every line parses");
                v["serial"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    #[tokio::test]
    async fn torn_last_line_is_cut_off_and_complete_lines_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut text = String::new();
        for i in 0..3 {
            text.push_str(&serde_json::to_string(&record(i)).unwrap());
            text.push('\n');
        }
        let whole = text.len() as u64;
        // A kill -9 in the middle of writing the fourth record.
        text.push_str(&serde_json::to_string(&record(3)).unwrap()[..40]);
        std::fs::write(&path, &text).unwrap();
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            whole,
            "fragment cut"
        );
        log.append(&record(4)).await.unwrap();
        let expect: Vec<String> = [0, 1, 2, 4].iter().map(|i| format!("{i:032x}")).collect();
        assert_eq!(serials(&path), expect);
    }

    #[tokio::test]
    async fn intact_log_is_left_alone_and_a_lone_fragment_is_emptied() {
        // Negative twin: a log ending with its newline loses nothing.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let line = format!("{}\n", serde_json::to_string(&record(7)).unwrap());
        std::fs::write(&path, &line).unwrap();
        drop(AuditLog::open(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), line);
        // A file holding nothing but a fragment (killed during the first write).
        std::fs::write(&path, "{\"time\":\"19").unwrap();
        drop(AuditLog::open(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }

    /// Polls `f` every 50 ms for up to 10 s.
    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// The audit file moved away and a directory put at its path: the batch is refused and
    /// the failure reported (also while idle, before any issuance); removing the directory
    /// alone does not bring issuance back (a new, empty file would hide the old records);
    /// moving the file back does, by itself (the retry probe), and the records written
    /// before are intact, with no trace of the probe.
    #[tokio::test]
    async fn a_replaced_log_fails_closed_until_the_file_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let old = dir.path().join("audit.old");
        let log = AuditLog::open(&path).unwrap();
        log.append(&record(1)).await.unwrap();
        assert_eq!(log.last_failure(), None);
        let before = std::fs::read(&path).unwrap();

        std::fs::rename(&path, &old).unwrap();
        std::fs::create_dir(&path).unwrap();
        eventually("the idle check to report the replacement", || {
            log.last_failure().is_some()
        })
        .await;
        let err = log.append(&record(2)).await.unwrap_err().to_string();
        assert!(err.contains("replaced"), "{err}");
        let failure = log.last_failure().expect("the failure is reported");
        assert!(failure.error.contains("withheld"), "{failure:?}");

        // The directory gone, the path is empty: still failing (no new file is started).
        std::fs::remove_dir(&path).unwrap();
        tokio::time::sleep(AUDIT_RETRY * 2).await;
        assert!(log.last_failure().is_some());
        assert!(log.append(&record(3)).await.is_err());
        assert!(!path.exists(), "no new log was started");

        // The file back at its path: recovered by itself, the old lines byte for byte.
        std::fs::rename(&old, &path).unwrap();
        eventually("the retry to clear the failure", || {
            log.last_failure().is_none()
        })
        .await;
        assert_eq!(std::fs::read(&path).unwrap(), before, "probe cut off again");
        log.append(&record(4)).await.unwrap();
        assert_eq!(
            serials(&path),
            vec![format!("{:032x}", 1), format!("{:032x}", 4)]
        );
    }

    /// One writer per audit log: a second open of the same file (another CA given the same
    /// `--audit-log`) is refused while the first writes, and nothing it holds is touched;
    /// once the first is gone the file opens again.
    #[tokio::test]
    async fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let first = AuditLog::open(&path).unwrap();
        first.append(&record(1)).await.unwrap();
        let before = std::fs::read(&path).unwrap();
        let Err(refused) = AuditLog::open(&path) else {
            panic!("a second writer was let in");
        };
        let refused = refused.to_string();
        assert!(
            refused.contains("in use by another CA") && refused.contains("audit.jsonl"),
            "{refused}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before);
        first.append(&record(2)).await.unwrap();
        drop(first);
        // The writer thread lets go when it sees the last handle gone (within the retries).
        let again = AuditLog::open(&path).unwrap();
        again.append(&record(3)).await.unwrap();
        assert_eq!(
            serials(&path),
            (1..=3).map(|i| format!("{i:032x}")).collect::<Vec<_>>()
        );
    }

    /// A symlink is never followed: one put at the path while the CA runs fails issuance
    /// (the CA's appends cannot be pointed at another file); the CA does not start on one.
    #[tokio::test]
    async fn a_symlink_at_the_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let victim = dir.path().join("revocations.json");
        std::fs::write(&victim, b"{}").unwrap();
        let log = AuditLog::open(&path).unwrap();
        log.append(&record(1)).await.unwrap();
        std::fs::rename(&path, dir.path().join("audit.moved")).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let err = log.append(&record(2)).await.unwrap_err().to_string();
        assert!(err.contains("replaced"), "{err}");
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            b"{}",
            "nothing written through it"
        );
        drop(log);
        let Err(refused) = AuditLog::open(&path) else {
            panic!("the CA started on a symlink");
        };
        assert!(refused.to_string().contains("audit.jsonl"), "{refused}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"{}");
    }

    #[tokio::test]
    async fn lines_are_on_disk_when_append_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let rec = |i: usize| AuditRecord {
            time: rfc3339(SystemTime::UNIX_EPOCH),
            serial: format!("{i:032x}"),
            spiffe_id: "spiffe://cluster.local/ns/a/sa/b".into(),
            not_after: rfc3339(SystemTime::UNIX_EPOCH),
            caller: "spiffe://cluster.local/ns/a/sa/b".into(),
            auth: "jwt",
            peer: "127.0.0.1:1".into(),
        };
        let mut tasks = Vec::new();
        for i in 0..50 {
            let log = log.clone();
            let r = rec(i);
            tasks.push(tokio::spawn(async move { log.append(&r).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 50);
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["spiffe_id"], "spiffe://cluster.local/ns/a/sa/b");
            assert_eq!(v["time"], "1970-01-01T00:00:00Z");
        }
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
