//! Unix socket listeners: parent directories created, stale sockets removed, permissions
//! set before the socket becomes reachable by anyone else (bound inside a private directory,
//! then renamed into place).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use crate::Error;

fn sock_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Socket {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Bind a Unix socket at `path` with permission bits `mode`.
///
/// - parent directories are created (0755 by the umask);
/// - an existing socket file that nobody accepts on is removed (a stale socket from a
///   crashed agent); one that accepts is left alone and the bind fails ("in use");
/// - anything else at the path (a regular file, a directory) is never deleted;
/// - the socket is bound inside a freshly created private directory (0700, created with that
///   mode, never pre-existing) next to `path`, chmod-ed to `mode`, then renamed into place and
///   the directory removed. Nobody else can reach the socket before it has its final mode: the
///   bind itself happens with the process umask (which is process-wide and so is never
///   touched), but no other user can traverse the private directory. The socket never exists
///   at `path` with looser permissions.
pub async fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, Error> {
    bind_unix_inspect(path, mode, |_| {}).await
}

/// `bind_unix`, calling `inspect` with the temporary socket path after it is bound and
/// chmod-ed, before it is renamed into place (tests look at it there).
async fn bind_unix_inspect(
    path: &Path,
    mode: u32,
    inspect: impl FnOnce(&Path),
) -> Result<UnixListener, Error> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| sock_err(path, format!("cannot create {}: {e}", parent.display())))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(sock_err(path, "in use by a running server"));
            }
            std::fs::remove_file(path)
                .map_err(|e| sock_err(path, format!("cannot remove stale socket: {e}")))?;
            tracing::info!(path = %path.display(), "removed stale socket");
        }
        Ok(_) => {
            return Err(sock_err(
                path,
                "exists and is not a socket; not removing it",
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(path, e.to_string())),
    }
    let dir = private_dir(path)?;
    let tmp = dir.join("s");
    let result = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&tmp)
            .map_err(|e| sock_err(path, format!("bind: {e}")))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(|e| sock_err(path, format!("chmod {mode:o}: {e}")))?;
        inspect(&tmp);
        std::fs::rename(&tmp, path).map_err(|e| sock_err(path, format!("rename: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| sock_err(path, e.to_string()))?;
        UnixListener::from_std(listener).map_err(|e| sock_err(path, e.to_string()))
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    result
}

/// Create a new directory with mode 0700 next to `path` (never reusing an existing one: a
/// directory someone else prepared could be traversable).
fn private_dir(path: &Path) -> Result<PathBuf, Error> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut last = None;
    for _ in 0..16 {
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Short (a Unix socket path is limited to ~108 bytes) and unpredictable enough that a
        // leftover directory of a crashed run with the same pid does not block us.
        let tag = (u64::from(nanos) ^ (n << 24)) & 0xff_ffff;
        let name = format!(".b{}-{tag:06x}", std::process::id());
        let dir = path.with_file_name(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                // The umask can only have taken bits away; check nobody else can enter.
                let md = std::fs::symlink_metadata(&dir)
                    .map_err(|e| sock_err(path, format!("{}: {e}", dir.display())))?;
                if !md.is_dir() || md.mode() & 0o077 != 0 {
                    let _ = std::fs::remove_dir(&dir);
                    return Err(sock_err(
                        path,
                        format!("{} is not a private directory", dir.display()),
                    ));
                }
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => {
                return Err(sock_err(
                    path,
                    format!("cannot create private directory {}: {e}", dir.display()),
                ));
            }
        }
    }
    Err(sock_err(
        path,
        format!(
            "cannot create a private directory next to it: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        ),
    ))
}

/// Removes the socket file when dropped (on clean shutdown).
#[derive(Debug)]
pub struct SocketGuard(pub PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn creates_dirs_sets_mode_and_replaces_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/socket");
        let l = bind_unix(&p, 0o600).await.unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        // live socket: refused
        let err = bind_unix(&p, 0o600).await.unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(l);
        // stale socket (listener gone, file remains): replaced, new mode applied
        let _l = bind_unix(&p, 0o660).await.unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o660);
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Before it is renamed into place, the socket sits in a directory only we can enter, and
    /// already has its final mode; afterwards nothing temporary is left. Twice (a restart
    /// over the stale socket of the first run), with a permissive umask-like mode (0666) and
    /// a strict one (0600).
    #[tokio::test]
    async fn temp_socket_is_inside_a_private_dir_and_rebinding_works() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("socket");
        for mode in [0o666, 0o600] {
            let mut seen = None;
            let l = bind_unix_inspect(&p, mode, |tmp| {
                let parent = tmp.parent().unwrap();
                let pmd = std::fs::symlink_metadata(parent).unwrap();
                let smd = std::fs::symlink_metadata(tmp).unwrap();
                seen = Some((
                    parent.to_owned(),
                    pmd.is_dir(),
                    pmd.mode() & 0o777,
                    smd.file_type().is_socket(),
                    smd.mode() & 0o777,
                ));
            })
            .await
            .unwrap();
            let (parent, is_dir, pmode, is_sock, smode) = seen.expect("inspect ran");
            assert_eq!(
                parent.parent().unwrap(),
                dir.path(),
                "private dir is next to the target"
            );
            assert!(is_dir);
            assert_eq!(
                pmode, 0o700,
                "temporary socket must sit in a 0700 directory"
            );
            assert!(is_sock);
            assert_eq!(smode, mode, "chmod-ed before it is renamed into place");
            let md = std::fs::symlink_metadata(&p).unwrap();
            assert!(md.file_type().is_socket());
            assert_eq!(md.mode() & 0o777, mode);
            assert!(!parent.exists(), "private directory removed");
            assert_eq!(entries(dir.path()), vec!["socket".to_string()]);
            // it really serves at the final path
            let (c, a) = tokio::join!(tokio::net::UnixStream::connect(&p), l.accept());
            c.unwrap();
            a.unwrap();
            drop(l); // leaves a stale socket for the next round
        }
    }

    /// Negative twin: a bind that fails (the path is too long for a Unix socket) leaves no
    /// temporary directory or socket behind and nothing at the target.
    #[tokio::test]
    async fn failed_bind_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("d".repeat(110));
        let p = parent.join("socket");
        let err = bind_unix(&p, 0o600).await.unwrap_err();
        assert!(err.to_string().contains("bind"), "{err}");
        assert!(entries(&parent).is_empty(), "{:?}", entries(&parent));
    }

    #[tokio::test]
    async fn never_deletes_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("socket");
        std::fs::write(&p, b"precious").unwrap();
        let err = bind_unix(&p, 0o600).await.unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
    }
}
