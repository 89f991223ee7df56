//! Unix socket listeners: parent directories created, stale sockets removed, permissions
//! set before the socket becomes visible at its final path.

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
/// - the socket is bound under a temporary name, chmod-ed, then renamed into place, so it
///   never exists at `path` with looser permissions.
pub async fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, Error> {
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
    let tmp = temp_name(path);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| sock_err(path, e.to_string()))?;
    let done = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(sock_err(path, e.to_string()));
    }
    Ok(listener)
}

fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
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
