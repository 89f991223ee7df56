//! Unix socket listeners: parent directories created, stale sockets removed, permissions
//! set before the socket becomes reachable by anyone else (bound inside a private directory,
//! then renamed into place).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use crate::Error;

/// The flag that trusts a socket's own directory (named in the refusal).
const SOCKET_DIR_FLAG: &str = "--trust-socket-dir";
/// The flag that trusts the file-output directory itself.
const OUTPUT_DIR_FLAG: &str = "--trust-output-dir";

fn sock_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Socket {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Bind a Unix socket at `path` with permission bits `mode`.
///
/// - the directories on the way are judged first ([`check_ancestors`]: the nearest existing
///   one before anything is created), then missing ones are created one at a time (0755 by
///   the umask), each checked to be a directory of ours, then the whole chain is judged
///   again; only then is a stale socket removed;
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
    bind_unix_inspect(path, mode, false, |_| {}).await
}

/// [`bind_unix`]; with `pod_volume`, the socket's directory is a volume only the Pod's
/// sidecar containers mount (`--trust-socket-dir`): that directory's own mode and owner
/// are not checked (the kubelet makes an emptyDir 0777, owned by root); the directories
/// above it still are.
pub(crate) async fn bind_unix_in(
    path: &Path,
    mode: u32,
    pod_volume: bool,
) -> Result<UnixListener, Error> {
    bind_unix_inspect(path, mode, pod_volume, |_| {}).await
}

/// `bind_unix`, calling `inspect` with the temporary socket path after it is bound and
/// chmod-ed, before it is renamed into place (tests look at it there).
/// The longest path a Unix socket can be bound at (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The length of the temporary path the agent binds a socket at before renaming it to
/// `path` (`DIR/.bXXXXXXXX/s` beside it): both this and `path` must fit
/// [`MAX_SOCKET_PATH`]. The same for every run (no pid in it), so a path that works once
/// works again.
pub fn bind_path_len(path: &Path) -> usize {
    let name = path.file_name().map_or(0, |n| n.len());
    path.as_os_str().len() - name + PRIVATE_DIR_NAME_LEN + 2
}

/// `.b` and eight hex digits.
const PRIVATE_DIR_NAME_LEN: usize = 10;

async fn bind_unix_inspect(
    path: &Path,
    mode: u32,
    trust_own_dir: bool,
    inspect: impl FnOnce(&Path),
) -> Result<UnixListener, Error> {
    let longest = bind_path_len(path).max(path.as_os_str().len());
    if longest > MAX_SOCKET_PATH {
        return Err(sock_err(
            path,
            format!(
                "too long for a Unix socket: the agent binds it at a temporary path beside it first ({longest} bytes; at most {MAX_SOCKET_PATH}); use a shorter directory"
            ),
        ));
    }
    // Nothing is created or deleted before the directories it would happen in are judged:
    // with a path through a directory another user controls, a symlink of theirs could
    // otherwise point our mkdir or unlink anywhere (as root: anywhere at all).
    let ids = effective_ids().map_err(|e| sock_err(path, e))?;
    let parent = std::path::absolute(path)
        .map_err(|e| sock_err(path, e.to_string()))?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    create_parent(path, &parent, ids, trust_own_dir)?;
    check_ancestors(
        path,
        &parent,
        ids,
        true,
        trust_own_dir,
        Some(SOCKET_DIR_FLAG),
    )?;
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
        // The agent's own user and group, whatever the directory would hand down (a setgid
        // directory gives new files its group: with 0660 that group could connect).
        let (uid, gid) = ids;
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
            .map_err(|e| sock_err(path, format!("chown {uid}:{gid}: {e}")))?;
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

/// The socket is only as private as the directories above it: whoever can write to its
/// directory (or, without the sticky bit, to any directory above), whoever owns one of them,
/// and whoever owns a symlink on the way can rename our socket away (or point the path
/// elsewhere) and put their own in its place; the proxy would then take its trust bundle
/// from them. So, for every directory the path is resolved through (one component at a
/// time, each symlink followed where it is met: [`walk`]) and every symlink on the way:
/// - every directory and every symlink belongs to the agent's user (the owner of the private
///   directory just made, `mine`) or to root;
/// - the socket's own directory is writable by nobody else (no group, no others, sticky or
///   not: while the agent is down, anyone could create a socket at the name in a sticky
///   directory such as `/tmp`); unless `trust_own_dir` (a volume only the Pod's sidecars
///   mount, as the injector's emptyDir, which the kubelet makes 0777 and root's);
/// - no directory above it is writable by others or by its group, unless sticky (as `/tmp`
///   is): a member of that group (say `staff` on Debian's `/var/local`, 2775 root:staff)
///   could rename the socket's directory away. That holds for the agent's own group too
///   when it may be shared (`users`, gid 100). It does not when the group is the agent's
///   user-private group ([`private_group`]: no other account has it as its primary group,
///   and it lists no other member), which is what umask 002 on Debian, Ubuntu and Fedora
///   gives every directory a user makes: their project folder is 0775 `alice:alice`.
///
/// Directories the agent creates for the socket are made 0755 whatever the umask adds.
///
/// `dir` is the socket's directory (`own_last`), or, before it exists, the nearest existing
/// directory above it (judged as a directory above).
fn check_ancestors(
    path: &Path,
    dir: &Path,
    (me, my_gid): (u32, u32),
    own_last: bool,
    trust_own_dir: bool,
    own_dir_flag: Option<&str>,
) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let walk = walk(dir).map_err(|e| sock_err(path, e))?;
    let last = if own_last {
        walk.dirs.len().saturating_sub(1)
    } else {
        usize::MAX
    };
    let owner_ok = |md: &std::fs::Metadata| md.uid() == me || md.uid() == 0;
    // Read /etc/passwd and /etc/group once, and only if a directory needs it.
    let mine_alone = std::cell::OnceCell::new();
    let private = |gid: u32| gid == my_gid && *mine_alone.get_or_init(|| private_group(me, gid));
    let not_theirs = |p: &Path, md: &std::fs::Metadata| {
        sock_err(
            path,
            format!(
                "{} belongs to uid {}, not to the agent's user (uid {me}) or root: its owner could replace the socket",
                p.display(),
                md.uid()
            ),
        )
    };
    for link in &walk.links {
        let md = std::fs::symlink_metadata(link)
            .map_err(|e| sock_err(path, format!("{}: {e}", link.display())))?;
        if !owner_ok(&md) {
            return Err(not_theirs(link, &md));
        }
    }
    for (i, dir) in walk.dirs.iter().enumerate() {
        let own = i == last;
        if own && trust_own_dir {
            continue;
        }
        let md = std::fs::symlink_metadata(dir)
            .map_err(|e| sock_err(path, format!("{}: {e}", dir.display())))?;
        if !owner_ok(&md) {
            return Err(not_theirs(dir, &md));
        }
        let sticky = md.mode() & 0o1000 != 0;
        let others = md.mode() & 0o002 != 0;
        let group = md.mode() & 0o020 != 0 && !private(md.gid());
        let open = (others || group) && (own || !sticky);
        if open {
            let fix = match (others, group) {
                (true, true) => "go-w",
                (true, false) => "o-w",
                _ => "g-w",
            };
            let who = if own {
                "group or others".to_owned()
            } else if others {
                "others".to_owned()
            } else if md.gid() == my_gid {
                format!(
                    "group {} (the agent's own group, but not a private one: another account has it as its primary group or is listed in it)",
                    md.gid()
                )
            } else {
                format!("group {}", md.gid())
            };
            let how = if own {
                let flag = own_dir_flag.map_or(String::new(), |f| {
                    format!(
                        ", or pass `{f}` if it is a volume only the Pod's sidecar containers mount"
                    )
                });
                format!("`chmod {fix} {}`{flag}", dir.display())
            } else {
                format!(
                    "`chmod {fix} {}` (or `chmod +t` it, so nobody renames what is not theirs)",
                    dir.display()
                )
            };
            return Err(sock_err(
                path,
                format!(
                    "{} is writable by {who} (mode {:o}): another user could replace the socket; run {how}",
                    dir.display(),
                    md.mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

/// Whether `gid` is `uid`'s user-private group, from `/etc/passwd` and `/etc/group`: no
/// other account has it as its primary group, and the group lists no member but this user.
/// Unreadable files, or a user or group the files do not name (a directory service): not
/// private, so a group-writable directory is refused (fail closed) and the message says
/// `chmod g-w`. A POSIX ACL granting a named user write shows in the group bits as its
/// mask, which is judged like the group's write bit; its users are not seen here.
fn private_group(uid: u32, gid: u32) -> bool {
    match (
        std::fs::read_to_string("/etc/passwd"),
        std::fs::read_to_string("/etc/group"),
    ) {
        (Ok(passwd), Ok(group)) => private_group_in(&passwd, &group, uid, gid),
        _ => false,
    }
}

fn private_group_in(passwd: &str, group: &str, uid: u32, gid: u32) -> bool {
    let accounts = passwd.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        Some((
            f.first()?.to_owned(),
            f.get(2)?.parse::<u32>().ok()?,
            f.get(3)?.parse::<u32>().ok()?,
        ))
    });
    let mut name = None;
    for (n, u, g) in accounts {
        if u == uid && g == gid {
            name = Some(n);
        } else if g == gid {
            return false;
        }
    }
    let Some(name) = name else {
        return false;
    };
    let entry = group.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.get(2)?.parse::<u32>().ok()? == gid).then(|| f.get(3).copied().unwrap_or(""))
    });
    match entry {
        Some(members) => members
            .split(',')
            .map(str::trim)
            .all(|m| m.is_empty() || m == name),
        None => false,
    }
}

/// The agent's effective uid and gid (`/proc/self/status`: the agent runs on Linux).
fn effective_ids() -> Result<(u32, u32), String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot tell the agent's user and group: /proc/self/status: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u32>().ok())
    };
    match (field("Uid:"), field("Gid:")) {
        (Some(uid), Some(gid)) => Ok((uid, gid)),
        _ => Err("cannot tell the agent's user and group: no Uid/Gid in /proc/self/status".into()),
    }
}

/// Create the socket's directory `parent` (absolute) and the missing ones above it, one at a
/// time (0755), after judging the nearest existing directory as [`check_ancestors`] does;
/// each directory made is checked to be a directory of ours, not a symlink or anything
/// someone put there meanwhile.
fn create_parent(
    path: &Path,
    parent: &Path,
    ids: (u32, u32),
    trust_own_dir: bool,
) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let mut existing = parent.to_path_buf();
    let mut missing = Vec::new();
    loop {
        match std::fs::symlink_metadata(&existing) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match existing.file_name() {
                    Some(n) => missing.push(n.to_os_string()),
                    None => return Err(sock_err(path, format!("{}: {e}", existing.display()))),
                }
                existing.pop();
            }
            Err(e) => return Err(sock_err(path, format!("{}: {e}", existing.display()))),
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    check_ancestors(path, &existing, ids, false, trust_own_dir, None)?;
    let mut cur = existing;
    for name in missing.into_iter().rev() {
        cur.push(name);
        match std::fs::DirBuilder::new().mode(0o755).create(&cur) {
            // Exactly 0755 whatever the umask took away (under systemd's UMask=0077 it would
            // be 0700, and a 0660 socket's group could not reach the socket in it).
            Ok(()) => std::fs::set_permissions(&cur, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| sock_err(path, format!("chmod 755 {}: {e}", cur.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(sock_err(
                    path,
                    format!("cannot create {}: {e}", cur.display()),
                ));
            }
        }
        let md = std::fs::symlink_metadata(&cur)
            .map_err(|e| sock_err(path, format!("{}: {e}", cur.display())))?;
        if !md.is_dir() || (md.uid() != ids.0 && md.uid() != 0) {
            return Err(sock_err(
                path,
                format!(
                    "{} appeared as something else than a directory of the agent's user while it was being created; refusing",
                    cur.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Make the file-output directory `dir` (0755, missing parents too) as a socket's directory
/// is made, and judge it the same way ([`check_ancestors`]): whoever could write to it, or
/// rename it or a directory above it away, could replace `cert-chain.pem` and
/// `root-cert.pem` (and so what the reading app trusts) or read a `key.pem` placed in a
/// directory of theirs. Nothing is created before the existing directories passed. With
/// `trusted` (`--trust-output-dir`, a volume only the Pod's containers that read the files
/// mount, as Istio's `OUTPUT_CERTS` on an emptyDir, 0777) the directory's own mode and owner
/// are not judged; the directories above it still are.
pub(crate) fn prepare_output_dir(dir: &Path, trusted: bool) -> Result<(), Error> {
    let fail = |reason: String| Error::WriteFile {
        path: dir.to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            reason.replace("replace the socket", "replace the files"),
        ),
    };
    let unwrap = |e: Error| match e {
        Error::Socket { reason, .. } => fail(reason),
        other => other,
    };
    let ids = effective_ids().map_err(fail)?;
    let abs = std::path::absolute(dir).map_err(|e| fail(e.to_string()))?;
    create_parent(dir, &abs, ids, trusted).map_err(unwrap)?;
    check_ancestors(dir, &abs, ids, true, trusted, Some(OUTPUT_DIR_FLAG)).map_err(unwrap)
}

/// What resolving a path goes through: every directory whose entries it reads (in order,
/// the last being the path itself), and every symlink it follows.
struct Walk {
    dirs: Vec<PathBuf>,
    links: Vec<PathBuf>,
}

/// Resolve absolute `path` one component at a time, following each symlink where it is met
/// (at most 40, as the kernel), so that the directories holding intermediate links are seen
/// too, not only the path as written and its final form.
fn walk(path: &Path) -> Result<Walk, String> {
    use std::collections::VecDeque;
    use std::ffi::OsString;
    use std::path::Component;
    enum C {
        Root,
        Up,
        Name(OsString),
    }
    fn parts(p: &Path) -> Vec<C> {
        p.components()
            .filter_map(|c| match c {
                Component::RootDir => Some(C::Root),
                Component::ParentDir => Some(C::Up),
                Component::Normal(n) => Some(C::Name(n.to_os_string())),
                Component::CurDir | Component::Prefix(_) => None,
            })
            .collect()
    }
    let mut pending: VecDeque<C> = parts(path).into();
    let mut cur = PathBuf::from("/");
    let mut out = Walk {
        dirs: vec![cur.clone()],
        links: Vec::new(),
    };
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        match c {
            C::Root => cur = PathBuf::from("/"),
            C::Up => {
                cur.pop();
            }
            C::Name(n) => {
                let next = cur.join(&n);
                let md = std::fs::symlink_metadata(&next)
                    .map_err(|e| format!("{}: {e}", next.display()))?;
                if md.file_type().is_symlink() {
                    hops += 1;
                    if hops > 40 {
                        return Err(format!("{}: too many symlinks", path.display()));
                    }
                    let target = std::fs::read_link(&next)
                        .map_err(|e| format!("{}: {e}", next.display()))?;
                    out.links.push(next);
                    for c in parts(&target).into_iter().rev() {
                        pending.push_front(c);
                    }
                } else if md.is_dir() {
                    cur = next;
                    out.dirs.push(cur.clone());
                } else {
                    return Err(format!("{}: not a directory", next.display()));
                }
            }
        }
    }
    // The path itself last (a `..` may have led back to a directory seen before).
    if out.dirs.last() != Some(&cur) {
        out.dirs.push(cur);
    }
    Ok(out)
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
        let tag = (u64::from(nanos) ^ (n << 20) ^ u64::from(std::process::id())) & 0xffff_ffff;
        let name = format!(".b{tag:08x}");
        debug_assert_eq!(name.len(), PRIVATE_DIR_NAME_LEN);
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

    /// A socket directory others can write to is refused (they could swap the socket); the
    /// sticky bit (as on /tmp) makes an open directory safe again; a private one is fine.
    #[tokio::test]
    async fn socket_directory_writable_by_others_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = bind_unix(&open.join("sock"), 0o600).await.unwrap_err();
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );
        assert!(
            std::fs::read_dir(&open).unwrap().next().is_none(),
            "nothing left behind"
        );
        // Below a directory others can write is no better: it can be renamed away.
        let below = open.join("a");
        std::fs::create_dir(&below).unwrap();
        std::fs::set_permissions(&below, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(bind_unix(&below.join("sock"), 0o600).await.is_err());
        // A directory above writable by the agent's own group: fine when that group is the
        // agent's private one (umask 002's 0775 `alice:alice`), refused when it may be
        // shared (`users`): any member could rename the socket's directory away. The
        // refusal says what to do. (The files' group here decides which case runs.)
        let (uid, gid) = effective_ids().unwrap();
        let private = private_group(uid, gid);
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o775)).unwrap();
        let r = bind_unix(&below.join("sock"), 0o600).await;
        if private {
            drop(r.unwrap());
            std::fs::remove_file(below.join("sock")).unwrap();
        } else {
            let err = r.unwrap_err().to_string();
            assert!(
                err.contains("the agent's own group")
                    && err.contains(&format!("run `chmod g-w {}`", open.display())),
                "{err}"
            );
        }
        // The socket's own directory group-writable (by a shared group, or others): the fix
        // and the flag are named.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&below, std::fs::Permissions::from_mode(0o757)).unwrap();
        let err = bind_unix(&below.join("sock"), 0o600)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("run `chmod o-w {}`", below.display()))
                && err.contains("--trust-socket-dir"),
            "{err}"
        );
        // Twin: neither group-writable, it binds.
        std::fs::set_permissions(&below, std::fs::Permissions::from_mode(0o755)).unwrap();
        drop(bind_unix(&below.join("sock"), 0o600).await.unwrap());
        std::fs::remove_file(below.join("sock")).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        // Twins: sticky, and private.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let _l = bind_unix(&below.join("sock"), 0o600).await.unwrap();
        let private = d.path().join("private");
        let _l2 = bind_unix(&private.join("sock"), 0o600).await.unwrap();
    }

    /// The socket's own directory may not be open even when sticky (`/tmp`): while the agent
    /// is down anyone could make a socket at the name. Its twin: one level down, in a
    /// directory of the agent's own, it binds.
    #[tokio::test]
    async fn a_sticky_open_directory_is_no_place_for_the_socket_itself() {
        let d = tempfile::tempdir().unwrap();
        let tmp = d.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = bind_unix(&tmp.join("sds.sock"), 0o600).await.unwrap_err();
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );
        let _l = bind_unix(&tmp.join("mine/sds.sock"), 0o600).await.unwrap();
    }

    /// A symlink chain through a directory others can write: `l1 -> open/l2 -> real`. The
    /// path as written and its final form are both fine, but anyone could replace `l2`, so
    /// it is refused. Twin: the same chain with `open` private binds.
    #[tokio::test]
    async fn a_symlink_chain_through_an_open_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        let open = d.path().join("open");
        std::fs::create_dir(&real).unwrap();
        std::fs::create_dir(&open).unwrap();
        std::os::unix::fs::symlink(&real, open.join("l2")).unwrap();
        std::os::unix::fs::symlink(open.join("l2"), d.path().join("l1")).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let sock = d.path().join("l1/a.sock");
        let err = bind_unix(&sock, 0o600).await.unwrap_err();
        assert!(
            err.to_string().contains("open is writable by others"),
            "{err}"
        );
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let _l = bind_unix(&sock, 0o600).await.unwrap();
        assert!(
            std::fs::symlink_metadata(real.join("a.sock"))
                .unwrap()
                .file_type()
                .is_socket()
        );
    }

    /// `--trust-socket-dir` (the injector's emptyDir, 0777 as the kubelet makes it): the
    /// socket's own directory is not judged; the directories above it still are. Without the
    /// flag the same directory is refused.
    #[tokio::test]
    async fn a_pod_volume_directory_is_trusted_only_when_asked() {
        let d = tempfile::tempdir().unwrap();
        let vol = d.path().join("workload-spiffe-uds");
        std::fs::create_dir(&vol).unwrap();
        std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o777)).unwrap();
        let sock = vol.join("socket");
        let err = bind_unix(&sock, 0o600).await.unwrap_err();
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );
        let l = bind_unix_in(&sock, 0o600, true).await.unwrap();
        let md = std::fs::symlink_metadata(&sock).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        drop(l);
        std::fs::remove_file(&sock).unwrap();
        // An open directory above the volume is still refused.
        let open = d.path().join("open");
        let vol2 = open.join("vol");
        std::fs::create_dir_all(&vol2).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = bind_unix_in(&vol2.join("socket"), 0o600, true)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("writable by others"), "{err}");
    }

    /// Directories and symlinks on the way that belong to another user (not root) are
    /// refused: their owner could rename the socket's directory away or repoint the link.
    /// Needs root to give files away (CI runs as root); as another user it says so and
    /// checks only the twin.
    #[tokio::test]
    async fn another_users_directory_or_symlink_on_the_way_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mine = d.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        let _l = bind_unix(&mine.join("a/socket"), 0o600).await.unwrap();
        use std::os::unix::fs::MetadataExt as _;
        if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
            eprintln!("not root: cannot chown to another user; ownership cases not run");
            return;
        }
        let other = Some(4242);
        // A directory above the socket's, owned by uid 4242 (mode 0755: only its owner
        // writes).
        let theirs = d.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, other, other).unwrap();
        let err = bind_unix(&theirs.join("b/socket"), 0o600)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("belongs to uid 4242"), "{err}");
        // A symlink owned by uid 4242 pointing at a directory of ours.
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&mine, &link).unwrap();
        std::os::unix::fs::lchown(&link, other, other).unwrap();
        let err = bind_unix(&link.join("c/socket"), 0o600).await.unwrap_err();
        assert!(err.to_string().contains("belongs to uid 4242"), "{err}");
        // The same link owned by us is fine (only its owner can change it).
        std::os::unix::fs::lchown(&link, Some(0), Some(0)).unwrap();
        let _l2 = bind_unix(&link.join("c/socket"), 0o600).await.unwrap();
    }

    fn is_root() -> bool {
        effective_ids().is_ok_and(|(uid, _)| uid == 0)
    }

    /// A directory above the socket's that another group may write (Debian's `/var/local`,
    /// 2775 root:staff) is refused: a member of that group could rename the socket's
    /// directory away and bind their own socket. So is one of the agent's own group: that
    /// group may be shared (`users`, gid 100), and before, it was trusted. Twin: with the
    /// sticky bit it is fine. Needs root to give a directory another group (CI runs as
    /// root).
    #[tokio::test]
    async fn a_directory_above_writable_by_another_group_is_refused() {
        use std::os::unix::fs::MetadataExt as _;
        if !is_root() {
            eprintln!("not root: cannot chgrp to a group we are not in; case not run");
            return;
        }
        let (_, my_gid) = effective_ids().unwrap();
        let other = if my_gid == 50 { 51 } else { 50 };
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("local");
        std::fs::create_dir(&shared).unwrap();
        std::os::unix::fs::chown(&shared, Some(0), Some(other)).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o2775)).unwrap();
        let sock = shared.join("agent/sds.sock");
        std::fs::create_dir(shared.join("agent")).unwrap();
        let err = bind_unix(&sock, 0o600).await.unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("writable by group {other}")),
            "{err}"
        );
        assert!(!sock.exists());
        // Sticky: members of the group cannot rename what is not theirs.
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o3775)).unwrap();
        drop(bind_unix(&sock, 0o600).await.unwrap());
        std::fs::remove_file(&sock).unwrap();
        // The agent's own group: accepted when it is the agent's private group (root's
        // group on this machine, or umask 002's 0775 `alice:alice`), refused otherwise.
        std::os::unix::fs::chown(&shared, Some(0), Some(my_gid)).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o2775)).unwrap();
        assert_eq!(std::fs::metadata(&shared).unwrap().gid(), my_gid);
        let (my_uid, _) = effective_ids().unwrap();
        if private_group(my_uid, my_gid) {
            drop(bind_unix(&sock, 0o600).await.unwrap());
            std::fs::remove_file(&sock).unwrap();
        } else {
            let err = bind_unix(&sock, 0o600).await.unwrap_err().to_string();
            assert!(
                err.contains(&format!("writable by group {my_gid}")),
                "{err}"
            );
            assert!(!sock.exists());
        }
    }

    /// A user-private group is one no other account uses as its primary group and that lists
    /// no other member; `users` (shared primary group) and a group with members are not.
    #[test]
    fn a_private_group_is_the_users_alone() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\nbob:x:1001:100::/home/bob:/bin/sh\ncarol:x:1002:100::/home/carol:/bin/sh\ndave:x:1003:1003::/home/dave:/bin/sh\n";
        let group = "root:x:0:\nusers:x:100:\nalice:x:1000:\ndave:x:1003:eve\nstaff:x:50:alice\n";
        assert!(private_group_in(passwd, group, 1000, 1000));
        assert!(private_group_in(passwd, group, 0, 0));
        // Shared primary group.
        assert!(!private_group_in(passwd, group, 1001, 100));
        // A group listing another member.
        assert!(!private_group_in(passwd, group, 1003, 1003));
        // Not the user's primary group, or a user the files do not name.
        assert!(!private_group_in(passwd, group, 1000, 50));
        assert!(!private_group_in(passwd, group, 4242, 4242));
        // Listing the user itself is fine.
        let listed = group.replace("alice:x:1000:", "alice:x:1000:alice");
        assert!(private_group_in(passwd, &listed, 1000, 1000));
    }

    /// In a setgid directory of another group a new file takes that group; the socket is
    /// given the agent's own user and group before it is moved into place, so with 0660 the
    /// directory's group cannot connect. Twin: a plain file made there does get the
    /// directory's group (what the socket would have had). Needs root (chgrp).
    #[tokio::test]
    async fn the_socket_gets_the_agents_group_not_the_directorys() {
        use std::os::unix::fs::MetadataExt as _;
        if !is_root() {
            eprintln!("not root: cannot chgrp to a group we are not in; case not run");
            return;
        }
        let (my_uid, my_gid) = effective_ids().unwrap();
        let other = if my_gid == 50 { 51 } else { 50 };
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("sg");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(my_uid), Some(other)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2755)).unwrap();
        std::fs::write(dir.join("plain"), b"").unwrap();
        assert_eq!(std::fs::metadata(dir.join("plain")).unwrap().gid(), other);
        let sock = dir.join("sds.sock");
        let _l = bind_unix(&sock, 0o660).await.unwrap();
        let md = std::fs::symlink_metadata(&sock).unwrap();
        assert_eq!((md.uid(), md.gid()), (my_uid, my_gid));
        assert_eq!(md.mode() & 0o777, 0o660);
    }

    /// A path through a directory another user can write, where a symlink of theirs points
    /// at a directory of ours (the relative default socket path from a cwd they control):
    /// before, the agent created the missing directories and removed a "stale" socket
    /// through the link before refusing the path. Now it refuses first: nothing is created
    /// there and the socket at the link's target is left alone. Twin: the same link in a
    /// directory only we can write is followed, and the directories are made.
    #[tokio::test]
    async fn nothing_is_created_or_deleted_through_a_path_that_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        drop(bind_unix(&victim.join("sds.sock"), 0o600).await.unwrap()); // stale socket
        let open = d.path().join("cwd");
        std::fs::create_dir(&open).unwrap();
        std::os::unix::fs::symlink(&victim, open.join("run")).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();

        let err = bind_unix(&open.join("run/sds.sock"), 0o600)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("writable by others"), "{err}");
        let err = bind_unix(&open.join("run/new/sub/sds.sock"), 0o600)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("writable by others"), "{err}");
        assert_eq!(entries(&victim), vec!["sds.sock".to_string()]);
        // A missing directory right below the open one is not made either.
        let err = bind_unix(&open.join("made/sds.sock"), 0o600)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("writable by others"), "{err}");
        assert_eq!(entries(&open), vec!["run".to_string()]);

        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let _l = bind_unix(&open.join("run/new/sub/sds.sock"), 0o600)
            .await
            .unwrap();
        assert!(victim.join("new/sub/sds.sock").exists());
        let _l2 = bind_unix(&open.join("run/sds.sock"), 0o600).await.unwrap();
    }

    /// The file-output directory is judged as a socket's directory: refused below a
    /// directory others can write (nothing created there), and when it is itself writable
    /// by group or others. Twin: a fresh one is made 0755 whatever the umask, an existing
    /// private one is fine.
    #[test]
    fn the_output_directory_is_judged_like_a_socket_directory() {
        use std::os::unix::fs::MetadataExt as _;
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare_output_dir(&open.join("certs"), false).unwrap_err();
        assert!(err.to_string().contains("writable by others"), "{err}");
        assert!(entries(&open).is_empty());
        let err = prepare_output_dir(&open, false).unwrap_err();
        assert!(
            err.to_string().contains("writable by group or others")
                && err.to_string().contains("--trust-output-dir"),
            "{err}"
        );

        let out = d.path().join("a/certs");
        prepare_output_dir(&out, false).unwrap();
        assert_eq!(std::fs::metadata(&out).unwrap().mode() & 0o7777, 0o755);
        prepare_output_dir(&out, false).unwrap();
    }

    /// Istio's OUTPUT_CERTS on an emptyDir (0777): refused before this flag existed, now
    /// accepted with `--trust-output-dir` (`trusted`), which judges only the directories
    /// above it. Twin: below a directory others can write, still refused with the flag.
    #[test]
    fn a_trusted_output_directory_skips_only_its_own_check() {
        let d = tempfile::tempdir().unwrap();
        let vol = d.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(prepare_output_dir(&vol, false).is_err());
        prepare_output_dir(&vol, true).unwrap();
        let below = vol.join("certs");
        let err = prepare_output_dir(&below, true).unwrap_err();
        assert!(err.to_string().contains("writable by others"), "{err}");
        assert!(!below.exists());
    }

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
            let l = bind_unix_inspect(&p, mode, false, |tmp| {
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

    /// Negative twin: a path too long for a Unix socket is refused before anything is
    /// created. So is one that fits but whose temporary bind path beside it does not (it
    /// failed with "path must be shorter than SUN_LEN", and only on runs with a long pid);
    /// twin: a few bytes shorter, it binds.
    #[tokio::test]
    async fn a_path_too_long_to_bind_is_refused_before_anything_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("d".repeat(110));
        let p = parent.join("socket");
        let err = bind_unix(&p, 0o600).await.unwrap_err();
        assert!(
            err.to_string().contains("too long for a Unix socket"),
            "{err}"
        );
        assert!(!parent.exists());
        // "/socket" fits where the temporary "/.bXXXXXXXX/s" does not.
        let base = dir.path().as_os_str().len() + 1;
        let fits_not = dir.path().join("e".repeat(MAX_SOCKET_PATH - base - 9));
        let p = fits_not.join("socket");
        assert!(p.as_os_str().len() <= MAX_SOCKET_PATH);
        assert!(bind_path_len(&p) > MAX_SOCKET_PATH);
        let err = bind_unix(&p, 0o600).await.unwrap_err();
        assert!(err.to_string().contains("temporary path"), "{err}");
        assert!(!fits_not.exists());
        let fits = dir.path().join("f".repeat(MAX_SOCKET_PATH - base - 13));
        let p = fits.join("socket");
        assert!(bind_path_len(&p) <= MAX_SOCKET_PATH);
        drop(bind_unix(&p, 0o600).await.unwrap());
        assert_eq!(entries(&fits), vec!["socket".to_string()]);
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
