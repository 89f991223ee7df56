//! The CA's local admin interface: a Unix socket, [`ADMIN_SOCKET`](crate::ADMIN_SOCKET) in the
//! state directory, for revocation.
//!
//! Who may use it: the socket is created mode 0600 inside the state directory (0700, which
//! also holds the root key and the audit log), and every connection's peer credentials
//! (`SO_PEERCRED`) must show the CA's own effective user or root; anyone else is refused
//! before a request is read. So exactly the principals who could already read the CA's key
//! can revoke; nothing is reachable from the network, and no extra credential exists to leak.
//!
//! Protocol: one JSON request line, one JSON response line ([`AdminRequest`],
//! [`AdminResponse`]), then the CA closes the connection. [`admin_request`] is the client.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rampart_certs::{RevocationReason, SpiffeId};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::audit::read_audit_log;
use crate::error::CitadelError;
use crate::revocation::{IdentityRevocation, PublishedCrls, RevokedSerial, normalize_serial};

/// What the admin socket needs from the CA (implemented by `CaState`).
pub(crate) trait AdminBackend: Send + Sync + 'static {
    /// The issuance audit log.
    fn audit_log(&self) -> PathBuf;
    /// Revokes `(serial, identity, not-after)` entries, persisting before publishing.
    fn revoke_entries(
        &self,
        entries: &[(String, String, SystemTime)],
        reason: Option<RevocationReason>,
    ) -> Result<Vec<RevokedSerial>, CitadelError>;
    /// What is published now.
    fn published(&self) -> Arc<PublishedCrls>;
    /// How revocations reach other CA replicas, when they are shared (Kubernetes mode).
    fn revocation_share(&self) -> Option<Arc<dyn RevocationShare>>;
    /// Records an identity revocation for the other replicas to apply to what they issued.
    fn add_identity_rule(&self, rule: IdentityRevocation) -> Result<bool, CitadelError>;
    /// Whether every serial of `entries` is in the revocation list.
    fn holds_all(&self, entries: &[(String, String, SystemTime)]) -> bool;
}

/// How long a revoke request waits for its serials to be shared with the other CA replicas
/// before it answers `pending` (the sharing goes on in the background).
pub const SHARE_WAIT: Duration = Duration::from_secs(10);

/// Where this CA's revocations are shared with other replicas (Kubernetes mode: ConfigMap
/// `rampart-ca-revocations`), so a revoke request can say whether they got there.
pub trait RevocationShare: Send + Sync + 'static {
    /// Blocks (at most `timeout`) until every one of `serials` (normalized hex) is shared,
    /// or an attempt to share made after the call started failed.
    fn wait_shared(&self, serials: &[String], timeout: Duration) -> ShareReport;
}

/// Whether the serials of a revoke request reached the other CA replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareState {
    /// Every serial is in the shared list: every replica merges it.
    Shared,
    /// An attempt to share them failed (retried in the background).
    Failing,
    /// Not confirmed within [`SHARE_WAIT`] (still being shared in the background).
    Pending,
}

/// The answer of [`RevocationShare::wait_shared`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareReport {
    /// Shared, failing or pending.
    pub state: ShareState,
    /// Where the revocations are shared (`ConfigMap istio-system/rampart-ca-revocations`).
    pub target: String,
    /// Why not shared (the last failure), when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Longest request line read.
const MAX_REQUEST: usize = 64 * 1024;

/// A request to the admin socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Revoke one serial, or every unexpired certificate issued to a SPIFFE ID (exactly one
    /// of the two), found in the audit log.
    Revoke {
        /// Serial (hex).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        serial: Option<String>,
        /// SPIFFE ID.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spiffe_id: Option<String>,
        /// RFC 5280 reason name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Report the published CRLs.
    Crls,
}

/// The answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminResponse {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What a revoke request revoked.
    #[serde(default)]
    pub revoked: Vec<RevokedSerial>,
    /// Version of the served CRL set after the request.
    pub crl_version: u64,
    /// Content hash of the served CRL set.
    pub crl_etag: String,
    /// The CA's own CRL: its number (hex) and nextUpdate (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl_number: Option<String>,
    /// nextUpdate of the CA's own CRL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_update: Option<String>,
    /// Revoked serials on the CA's own CRL.
    pub crl_entries: usize,
    /// A revoke by SPIFFE ID with other replicas (Kubernetes mode): the rule they apply to the
    /// certificates they issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_rule: Option<IdentityRevocation>,
    /// Whether a revoke request's serials reached the other CA replicas; absent when this
    /// CA shares its revocations with none (no Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<ShareReport>,
}

/// Binds the admin socket at `path` (replacing a stale socket file, never another kind of
/// file), mode 0600, and serves it until the task is aborted.
pub(crate) fn serve_admin<S: AdminBackend>(
    state: Arc<S>,
    path: &Path,
) -> Result<tokio::task::JoinHandle<()>, CitadelError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(CitadelError::Config(format!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| CitadelError::io(path, e))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| CitadelError::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| CitadelError::io(path, e))?;
    let owner = rustix::process::geteuid().as_raw();
    let path = path.to_path_buf();
    let bound = std::fs::symlink_metadata(&path).map_err(|e| CitadelError::io(&path, e))?;
    let socket = BoundSocket {
        listener,
        path: path.clone(),
        id: (
            std::os::unix::fs::MetadataExt::dev(&bound),
            std::os::unix::fs::MetadataExt::ino(&bound),
        ),
    };
    Ok(tokio::spawn(async move {
        // Dropped with the task (the CA's shutdown aborts it): the socket file goes too.
        let socket = socket;
        loop {
            let (stream, _) = match socket.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let st = state.clone();
            let path = path.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_one(st, stream, owner).await {
                    tracing::info!(socket = %path.display(), error = %e, "admin connection failed");
                }
            });
        }
    }))
}

/// The admin socket's listener with its file: when the task serving it ends, the file is
/// removed if it is still the socket bound here (same device and inode), while the listener
/// is still open, so its inode cannot have been reused by another CA's socket meanwhile. A
/// clean stop leaves no stale socket behind; after `kill -9` it stays, and the next CA on the
/// directory replaces it.
struct BoundSocket {
    listener: tokio::net::UnixListener,
    path: std::path::PathBuf,
    id: (u64, u64),
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && m.file_type().is_socket()
            && (m.dev(), m.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn serve_one<S: AdminBackend>(
    state: Arc<S>,
    stream: tokio::net::UnixStream,
    owner: u32,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let response = if !caller_allowed(cred.uid(), owner) {
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "admin socket: refused a caller that is neither the CA's user nor root");
        refuse(format!(
            "uid {} may not use the CA admin socket (only uid {owner} or root)",
            cred.uid()
        ))
    } else {
        let mut line = Vec::new();
        let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64 + 1);
        tokio::time::timeout(Duration::from_secs(10), reader.read_until(b'\n', &mut line))
            .await
            .map_err(|_| std::io::Error::other("no request within 10 s"))??;
        if line.len() > MAX_REQUEST {
            refuse("request too long".into())
        } else {
            match serde_json::from_slice::<AdminRequest>(&line) {
                Ok(req) => {
                    let st = state.clone();
                    tokio::task::spawn_blocking(move || handle(st.as_ref(), req, cred.uid()))
                        .await
                        .unwrap_or_else(|e| refuse(format!("internal error: {e}")))
                }
                Err(e) => refuse(format!("bad request: {e}")),
            }
        }
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Only the CA's own effective user, or root, may use the socket.
fn caller_allowed(peer_uid: u32, owner: u32) -> bool {
    peer_uid == owner || peer_uid == 0
}

fn refuse(error: String) -> AdminResponse {
    AdminResponse {
        ok: false,
        error: Some(error),
        ..AdminResponse::default()
    }
}

fn status<S: AdminBackend>(state: &S, mut r: AdminResponse) -> AdminResponse {
    let cur = state.published();
    r.crl_version = cur.version;
    r.crl_etag = cur.set.etag().to_owned();
    if let Some(own) = &cur.own {
        r.crl_number = own.crl_number_hex().map(str::to_owned);
        r.next_update = Some(crate::audit::rfc3339(own.next_update()));
        r.crl_entries = own.revoked_certs().count();
    }
    r
}

fn handle<S: AdminBackend>(state: &S, req: AdminRequest, uid: u32) -> AdminResponse {
    match req {
        AdminRequest::Crls => status(
            state,
            AdminResponse {
                ok: true,
                ..AdminResponse::default()
            },
        ),
        AdminRequest::Revoke {
            serial,
            spiffe_id,
            reason,
        } => match revoke(state, serial, spiffe_id, reason, uid) {
            Ok((revoked, identity_rule)) => {
                // Also the serials revoked before: a rerun of the command reports whether
                // they are shared by now.
                let shared = state.revocation_share().map(|share| {
                    let mut keys: Vec<String> = revoked.iter().map(|r| r.serial.clone()).collect();
                    keys.extend(identity_rule.as_ref().map(IdentityRevocation::key));
                    share.wait_shared(&keys, SHARE_WAIT)
                });
                status(
                    state,
                    AdminResponse {
                        ok: true,
                        revoked,
                        shared,
                        identity_rule,
                        ..AdminResponse::default()
                    },
                )
            }
            Err(e) => status(state, refuse(e)),
        },
    }
}

fn revoke<S: AdminBackend>(
    state: &S,
    serial: Option<String>,
    spiffe_id: Option<String>,
    reason: Option<String>,
    uid: u32,
) -> Result<(Vec<RevokedSerial>, Option<IdentityRevocation>), String> {
    let reason = reason
        .as_deref()
        .map(str::parse::<RevocationReason>)
        .transpose()?;
    let log = state.audit_log();
    let (entries, _) = read_audit_log(&log).map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    let targets: Vec<(String, String, SystemTime)> = match (serial, spiffe_id) {
        (Some(serial), None) => {
            let serial = normalize_serial(&serial)?;
            let Some(e) = entries.iter().rev().find(|e| e.serial == serial) else {
                if state.revocation_share().is_none() {
                    return Err(format!(
                        "serial {serial} is not in the audit log {} (not issued by this CA?)",
                        log.display()
                    ));
                }
                // Another replica may have issued it (each audit log holds only its own
                // replica's certificates): every replica signs under the same CA, so the
                // serial goes on every replica's CRL, identity unknown here, for as long as
                // any workload certificate issued now could live.
                tracing::info!(uid, %serial, "admin socket: revoking a serial this replica did not issue, for every replica");
                return state
                    .revoke_entries(
                        &[(
                            serial,
                            String::new(),
                            now + rampart_certs::MAX_WORKLOAD_CERT_TTL,
                        )],
                        reason,
                    )
                    .map(|r| (r, None))
                    .map_err(|e| e.to_string());
            };
            let not_after = e
                .expires_at()
                .unwrap_or(now + Duration::from_secs(90 * 24 * 3600));
            if crate::revocation::prunable(Some(&crate::audit::rfc3339(not_after)), now) {
                return Err(format!(
                    "serial {serial} expired at {} (more than 7 days ago): every verifier \
                     refuses it already, and revocations that old are not kept",
                    crate::audit::rfc3339(not_after)
                ));
            }
            vec![(serial, e.spiffe_id.clone(), not_after)]
        }
        (None, Some(id)) => {
            let id = SpiffeId::parse(&id).map_err(|e| e.to_string())?.to_string();
            let found: Vec<_> = entries
                .iter()
                .filter(|e| e.spiffe_id == id)
                .filter_map(|e| {
                    let na = e.expires_at()?;
                    (na > now).then(|| (e.serial.clone(), id.clone(), na))
                })
                .collect();
            if state.revocation_share().is_some() {
                // Other replicas issued certificates to it too, which only their audit
                // logs know: each revokes its own of those issued before now.
                let rule = IdentityRevocation {
                    spiffe_id: id.clone(),
                    issued_before: crate::audit::rfc3339(now),
                    reason: reason.map(|r| r.name().to_owned()),
                };
                // Its own certificates first: the rule, once recorded, is not applied here
                // again, so a failure in between must leave it unrecorded (a rerun does both).
                let revoked = if found.is_empty() {
                    Vec::new()
                } else {
                    match state.revoke_entries(&found, reason) {
                        Ok(r) => r,
                        Err(e) => {
                            // Recorded but not published (a CA that cannot sign CRLs): the
                            // rule still goes to the other replicas; the error is reported.
                            if state.holds_all(&found) {
                                state
                                    .add_identity_rule(rule.clone())
                                    .map_err(|e| e.to_string())?;
                            }
                            return Err(e.to_string());
                        }
                    }
                };
                state
                    .add_identity_rule(rule.clone())
                    .map_err(|e| e.to_string())?;
                tracing::info!(uid, identity = %id, "admin socket: identity revocation recorded for the other replicas");
                return Ok((revoked, Some(rule)));
            }
            if found.is_empty() {
                return Err(format!(
                    "no unexpired certificate issued to {id} in the audit log {}",
                    log.display()
                ));
            }
            found
        }
        _ => return Err("give exactly one of serial and spiffe_id".into()),
    };
    tracing::info!(
        uid,
        count = targets.len(),
        "admin socket: revocation requested"
    );
    state
        .revoke_entries(&targets, reason)
        .map(|r| (r, None))
        .map_err(|e| e.to_string())
}

/// Sends one request to the admin socket at `path` and returns the answer (blocking; for the
/// `rampart ca revoke` command).
pub fn admin_request(path: &Path, req: &AdminRequest) -> Result<AdminResponse, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        format!(
            "{}: {e} (is the CA running with this --state directory?)",
            path.display()
        )
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    std::io::BufReader::new(stream)
        .read_until(b'\n', &mut answer)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&answer).map_err(|e| format!("bad answer from the CA: {e}"))
}

/// The admin socket of a CA whose state directory is `state_dir`.
pub fn admin_socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(crate::revocation::ADMIN_SOCKET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_or_root_may_call() {
        assert!(caller_allowed(1000, 1000));
        assert!(caller_allowed(0, 1000));
        assert!(!caller_allowed(1001, 1000));
        assert!(!caller_allowed(65534, 0));
    }

    #[test]
    fn requests_round_trip_as_one_json_line() {
        let req = AdminRequest::Revoke {
            serial: Some("0a".into()),
            spiffe_id: None,
            reason: Some("keyCompromise".into()),
        };
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(
            text,
            r#"{"op":"revoke","serial":"0a","reason":"keyCompromise"}"#
        );
        assert_eq!(serde_json::from_str::<AdminRequest>(&text).unwrap(), req);
        assert!(serde_json::from_str::<AdminRequest>(r#"{"op":"shutdown"}"#).is_err());
    }
}
