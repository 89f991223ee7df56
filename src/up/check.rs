//! Which folders and edits `up` accepts, beyond what the mesh loader refuses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rampart_mesh::MeshFolder;

use super::layout::{MAX_SOCKET_PATH, StateLayout};

/// The policy YAML of a mesh folder, validated as `rampart validate` does.
#[derive(Debug, Clone, Default)]
pub struct PolicyCheck {
    /// Problems (file, document, field, reason), one per line.
    pub problems: Vec<String>,
    /// Warnings (valid, but probably not what was meant).
    pub warnings: Vec<String>,
    /// How many resources were read.
    pub resources: usize,
}

/// Policy YAML of a mesh folder: every .yaml/.yml below DIR except the top-level mesh.yaml and
/// workloads.yaml, validated as `rampart validate` does.
pub fn check_policy(dir: &Path) -> PolicyCheck {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    if let Err(e) = policy_files(dir, dir, &mut files) {
        problems.push(e);
    }
    if files.is_empty() {
        return PolicyCheck {
            problems,
            warnings: Vec::new(),
            resources: 0,
        };
    }
    let r = rampart_authz::load_paths(&files);
    problems.extend(r.problems.iter().map(|p| p.to_string()));
    PolicyCheck {
        problems,
        warnings: r.warnings.iter().map(|w| w.to_string()).collect(),
        resources: r.resources.len(),
    }
}

fn policy_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = e.path();
        if path.is_dir() {
            policy_files(root, &path, out)?;
        } else if (name.ends_with(".yaml") || name.ends_with(".yml"))
            && !(dir == root
                && (name == rampart_mesh::MESH_FILE || name == rampart_mesh::WORKLOADS_FILE))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Who binds a listen address of the folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Binder {
    /// `up`'s own processes: the CA and the proxies.
    Up,
    /// An app `up` starts (with the workload's `command`).
    AppUpStarts,
    /// An app someone else runs.
    Elsewhere,
}

/// Every address `up` would listen on, or start an app on, with what it is for: the CA's,
/// then each workload's app ports (`started`: only those whose app `up` starts), inbound
/// ports, outbound port, admin port and upstream listeners.
fn listen_addresses(mesh: &MeshFolder) -> Vec<(SocketAddr, String, Binder)> {
    let mut all = vec![(mesh.local.ca_address(), "the CA".to_string(), Binder::Up)];
    if let Some(m) = mesh.local.ca_metrics {
        all.push((
            m,
            "the CA's metrics (rampart.ca.metrics)".to_string(),
            Binder::Up,
        ));
    }
    for w in &mesh.registry.workloads {
        let k = w.key();
        for p in &w.ports {
            let app = if w.command.is_some() {
                Binder::AppUpStarts
            } else {
                Binder::Elsewhere
            };
            all.push((p.app, format!("{k} port {} app", p.port), app));
            all.push((
                p.inbound,
                format!("{k} port {} inbound", p.port),
                Binder::Up,
            ));
        }
        if let Some(a) = w.proxy.outbound {
            all.push((a, format!("{k} proxy.outbound"), Binder::Up));
        }
        if let Some(a) = w.proxy.admin {
            all.push((a, format!("{k} proxy.admin"), Binder::Up));
        }
        for u in &w.upstreams {
            all.push((
                u.listen,
                format!("{k} upstream {}:{}", u.service, u.port),
                Binder::Up,
            ));
        }
    }
    all
}

/// Whether two listen addresses take the same port: equal, or one is an unspecified address
/// (`0.0.0.0` takes the port on every IPv4 address; `[::]`, dual-stack as the proxy binds
/// it, on every address).
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |w: std::net::IpAddr, other: std::net::IpAddr| match w {
        std::net::IpAddr::V4(w) => w.is_unspecified() && other.is_ipv4(),
        std::net::IpAddr::V6(w) => w.is_unspecified(),
    };
    a.port() == b.port() && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
}

/// Every listen address in the folder must be distinct (and not the CA's), and no two may
/// take the same port (`0.0.0.0:X` beside `127.0.0.1:X`).
pub fn check_addresses(mesh: &MeshFolder) -> Result<(), String> {
    let mut seen: Vec<(SocketAddr, String)> = Vec::new();
    for (a, what, _) in listen_addresses(mesh) {
        if let Some((_, other)) = seen.iter().find(|(s, _)| *s == a) {
            return Err(format!(
                "workloads.yaml: {what} and {other} both listen on {a}"
            ));
        }
        if let Some((b, other)) = seen.iter().find(|(s, _)| overlap(*s, a)) {
            return Err(format!(
                "workloads.yaml: {what} ({a}) and {other} ({b}) take the same port: an unspecified address listens on every address"
            ));
        }
        seen.push((a, what));
    }
    Ok(())
}

/// Before anything starts (no root, key or token is made): every address `up` itself will
/// listen on, or start an app on, can be bound now. A port another process holds (often a
/// `rampart up` still running on the same folder) is named with what it is for, instead of
/// a child dying on it after the CA made a root in a fresh state directory. Apps `up` does
/// not start are left out: their ports are meant to be held by someone else. For the apps
/// it starts only "in use" counts: an app may bind what `up` cannot (a container's address,
/// a privileged port through its own means).
///
/// The probes stay bound until all are made, then are let go; a port taken in between is
/// still reported, as the death of the child that could not bind it.
pub fn check_free(mesh: &MeshFolder) -> Result<(), String> {
    let mut lines = Vec::new();
    let mut in_use = None;
    let mut held = Vec::new();
    for (a, what, binder) in listen_addresses(mesh) {
        if binder == Binder::Elsewhere {
            continue;
        }
        let app = binder == Binder::AppUpStarts;
        match std::net::TcpListener::bind(a) {
            Ok(l) => held.push(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                lines.push(format!("{a} ({what}) is in use by another process"));
                in_use.get_or_insert(a.port());
            }
            Err(_) if app => {}
            Err(e) => lines.push(format!("{a} ({what}) cannot be listened on: {e}")),
        }
    }
    drop(held);
    if let Some(port) = in_use {
        lines.push(format!(
            "Is another `rampart up` running on this folder? `ss -ltnp 'sport = :{port}'` names what holds the port."
        ));
    }
    if lines.is_empty() {
        Ok(())
    } else {
        Err(lines.join("\n"))
    }
}

/// A valid edit: the new mesh, its number of policy resources, and what it warns about
/// (policies that load but may not do what was meant, CUSTOM providers that cannot be used:
/// [`crate::mesh_warnings::mesh_warnings`]).
#[derive(Debug)]
pub struct EditCheck {
    pub mesh: MeshFolder,
    pub resources: usize,
    pub warnings: Vec<String>,
}

/// Check the folder after an edit: the new mesh, its number of policy resources and its
/// warnings if it is valid, else why it is refused (file, field, reason).
pub fn check_edit(dir: &Path, layout: &StateLayout) -> Result<EditCheck, String> {
    let mesh = crate::read_mesh(dir)?;
    let policy = check_policy(dir);
    if !policy.problems.is_empty() {
        return Err(format!(
            "{} policy problem(s):\n  {}",
            policy.problems.len(),
            policy.problems.join("\n  ")
        ));
    }
    check_addresses(&mesh)?;
    if mesh.registry.workloads.is_empty() {
        return Err(
            "workloads.yaml: workloads: declares no workloads (to stop the whole mesh, stop `rampart up`)"
                .to_string(),
        );
    }
    for w in &mesh.registry.workloads {
        let sock = layout.sds_path(w);
        if sock
            .as_os_str()
            .len()
            .max(rampart_node_agent::bind_path_len(&sock))
            > MAX_SOCKET_PATH
        {
            return Err(format!(
                "workloads.yaml: workload {}: its SDS socket path {} is too long for a Unix socket (at most {MAX_SOCKET_PATH} bytes, also for the temporary path beside it the agent binds first); use shorter names or a shorter --state-dir",
                w.key(),
                sock.display()
            ));
        }
    }
    let warnings = crate::mesh_warnings::mesh_warnings(&mesh);
    Ok(EditCheck {
        mesh,
        resources: policy.resources,
        warnings,
    })
}

/// mesh.yaml `rampart.demoToken`: an end-user token `up` mints for demos.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DemoToken {
    /// Signing key file, relative to DIR (a published demo key, never a real one).
    pub key: PathBuf,
    /// The `kid`; default: the key's JWK thumbprint.
    pub kid: Option<String>,
    /// `iss`.
    pub issuer: String,
    /// `aud`.
    pub audience: String,
    /// The service account's namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
}

/// The `rampart.demoToken` section of DIR/mesh.yaml, if any.
pub fn read_demo_token(dir: &Path) -> Result<Option<DemoToken>, String> {
    #[derive(serde::Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    struct Mesh {
        rampart: Rampart,
    }
    #[derive(serde::Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    struct Rampart {
        demo_token: Option<DemoToken>,
    }
    let text = match std::fs::read_to_string(dir.join(rampart_mesh::MESH_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("mesh.yaml: {e}")),
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    let m: Mesh =
        serde_saphyr::from_str(&text).map_err(|e| format!("mesh.yaml: rampart.demoToken: {e}"))?;
    Ok(m.rampart.demo_token)
}

/// Paths, sizes and modification times of everything below DIR (dot entries skipped, and
/// the state directory `skip`, should it be inside DIR: its logs change all the time).
pub fn folder_fingerprint(dir: &Path, skip: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    fn walk(dir: &Path, skip: &Path, out: &mut Vec<(PathBuf, u64, Option<SystemTime>)>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() && p == skip => {}
                Ok(m) if m.is_dir() => walk(&p, skip, out),
                Ok(m) => out.push((p, m.len(), m.modified().ok())),
                Err(_) => {}
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, skip, &mut v);
    v.sort();
    v
}

/// The files (relative to `dir`) that differ between two fingerprints of it: added, removed
/// (named with "(removed)") or changed, in path order.
pub fn changed_files(
    dir: &Path,
    old: &[(PathBuf, u64, Option<SystemTime>)],
    new: &[(PathBuf, u64, Option<SystemTime>)],
) -> Vec<String> {
    let name = |p: &Path| p.strip_prefix(dir).unwrap_or(p).display().to_string();
    let mut out: Vec<(PathBuf, String)> = Vec::new();
    for n in new {
        if !old.contains(n) {
            out.push((n.0.clone(), name(&n.0)));
        }
    }
    for o in old {
        if !new.iter().any(|n| n.0 == o.0) {
            out.push((o.0.clone(), format!("{} (removed)", name(&o.0))));
        }
    }
    out.sort();
    out.into_iter().map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(workloads: &str, policy: Option<&str>) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("mesh.yaml"), "trustDomain: cluster.local\n").unwrap();
        std::fs::write(d.path().join("workloads.yaml"), workloads).unwrap();
        if let Some(p) = policy {
            std::fs::create_dir(d.path().join("policy")).unwrap();
            std::fs::write(d.path().join("policy/p.yaml"), p).unwrap();
        }
        d
    }

    #[test]
    fn duplicate_listen_addresses_are_refused() {
        let d = folder(
            "workloads:\n- name: a\n  namespace: ns1\n  ports: [{port: 80, app: 127.0.0.1:9000, inbound: 127.0.0.1:9001}]\n  proxy: {admin: 127.0.0.1:9000}\n",
            None,
        );
        let m = crate::read_mesh(d.path()).unwrap();
        let e = check_addresses(&m).unwrap_err();
        assert!(e.contains("127.0.0.1:9000"), "{e}");
        assert!(e.contains("ns1/a proxy.admin"), "{e}");
        let ca = folder(
            "workloads:\n- {name: a, namespace: ns1, proxy: {admin: 127.0.0.1:15012}}\n",
            None,
        );
        let e = check_addresses(&crate::read_mesh(ca.path()).unwrap()).unwrap_err();
        assert!(e.contains("the CA"), "{e}");
    }

    #[test]
    fn an_unspecified_address_clashes_with_its_port_anywhere() {
        let d = folder(
            "workloads:\n- name: a\n  namespace: ns1\n  ports: [{port: 80, app: 127.0.0.1:9000, inbound: 0.0.0.0:9001}]\n  proxy: {admin: 127.0.0.1:9001}\n",
            None,
        );
        let e = check_addresses(&crate::read_mesh(d.path()).unwrap()).unwrap_err();
        assert!(
            e.contains("0.0.0.0:9001") && e.contains("127.0.0.1:9001"),
            "{e}"
        );
        assert!(e.contains("take the same port"), "{e}");
        // [::] takes IPv4 addresses too; two specific addresses on one port do not clash.
        let d = folder(
            "workloads:\n- name: a\n  namespace: ns1\n  ports: [{port: 80, app: 127.0.0.1:9000, inbound: \"[::]:9001\"}]\n  proxy: {admin: 127.0.0.2:9001}\n",
            None,
        );
        assert!(check_addresses(&crate::read_mesh(d.path()).unwrap()).is_err());
        let d = folder(
            "workloads:\n- name: a\n  namespace: ns1\n  ports: [{port: 80, app: 127.0.0.1:9000, inbound: 127.0.0.3:9001}]\n  proxy: {admin: 127.0.0.2:9001}\n",
            None,
        );
        check_addresses(&crate::read_mesh(d.path()).unwrap()).unwrap();
    }

    #[test]
    fn an_app_address_up_cannot_bind_is_left_to_the_app() {
        // 192.0.2.1 (TEST-NET-1) is no address of this machine: an app `up` starts may still
        // listen there (a container's address), `up`'s own proxy may not.
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let write = |admin: &str| {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(
                d.path().join("mesh.yaml"),
                format!("rampart: {{ca: {{listen: 127.0.0.1:{}}}}}\n", free()),
            )
            .unwrap();
            std::fs::write(
                d.path().join("workloads.yaml"),
                format!(
                    "workloads:\n- name: a\n  namespace: ns1\n  command: [x]\n  ports: [{{port: 80, app: 192.0.2.1:80, inbound: 127.0.0.1:{}}}]\n  proxy: {{admin: \"{admin}\"}}\n",
                    free()
                ),
            )
            .unwrap();
            d
        };
        let ok = write(&format!("127.0.0.1:{}", free()));
        check_free(&crate::read_mesh(ok.path()).unwrap()).unwrap();
        let bad = write("192.0.2.1:15000");
        let e = check_free(&crate::read_mesh(bad.path()).unwrap()).unwrap_err();
        assert!(
            e.contains("192.0.2.1:15000 (ns1/a proxy.admin) cannot be listened on"),
            "{e}"
        );
        assert!(!e.contains("192.0.2.1:80"), "{e}");
    }

    #[test]
    fn changed_files_name_what_an_edit_touched() {
        let d = Path::new("/m");
        let t = |s: u64| Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s));
        let old = vec![
            (d.join("mesh.yaml"), 10, t(1)),
            (d.join("policy/a.yaml"), 20, t(1)),
            (d.join("workloads.yaml"), 30, t(1)),
        ];
        // Unchanged: nothing named.
        assert!(changed_files(d, &old, &old).is_empty());
        let new = vec![
            (d.join("mesh.yaml"), 10, t(1)),
            (d.join("policy/b.yaml"), 5, t(2)),
            (d.join("workloads.yaml"), 30, t(2)),
        ];
        assert_eq!(
            changed_files(d, &old, &new),
            ["policy/a.yaml (removed)", "policy/b.yaml", "workloads.yaml"]
        );
    }

    #[test]
    fn free_addresses_pass_and_a_held_one_is_named() {
        let port = |l: &std::net::TcpListener| l.local_addr().unwrap().port();
        let (ca, inbound) = (
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        );
        let (ca_port, inbound_port) = (port(&ca), port(&inbound));
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("mesh.yaml"),
            format!("rampart: {{ca: {{listen: 127.0.0.1:{ca_port}}}}}\n"),
        )
        .unwrap();
        std::fs::write(
            d.path().join("workloads.yaml"),
            format!(
                "workloads:\n- name: a\n  namespace: ns1\n  command: [x]\n  ports: [{{port: 80, app: 127.0.0.1:{}, inbound: 127.0.0.1:{inbound_port}}}]\n",
                port(&std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            ),
        )
        .unwrap();
        let m = crate::read_mesh(d.path()).unwrap();
        // Held: the CA's and the inbound port are both named, the hint names the first.
        let e = check_free(&m).unwrap_err();
        assert!(
            e.contains(&format!("127.0.0.1:{ca_port} (the CA) is in use")),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "127.0.0.1:{inbound_port} (ns1/a port 80 inbound) is in use"
            )),
            "{e}"
        );
        assert!(e.contains(&format!("sport = :{ca_port}")), "{e}");
        // Released: the same folder passes.
        drop((ca, inbound));
        check_free(&m).unwrap();
    }

    #[test]
    fn policy_check_skips_mesh_and_registry_and_reports_problems() {
        let good = folder(
            "workloads: []\n",
            Some(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: PERMISSIVE}}\n",
            ),
        );
        let r = check_policy(good.path());
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.resources, 1);
        let bad = folder(
            "workloads: []\n",
            Some(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: ns1}\nspec: {action: DENY}\n",
            ),
        );
        let r = check_policy(bad.path());
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(r.problems[0].contains("p.yaml"), "{:?}", r.problems);
    }

    #[test]
    fn fingerprint_changes_on_edit() {
        let d = folder("workloads: []\n", None);
        let state = d.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let a = folder_fingerprint(d.path(), &state);
        std::fs::write(state.join("x.log"), "log line\n").unwrap();
        assert_eq!(
            a,
            folder_fingerprint(d.path(), &state),
            "the state dir is skipped"
        );
        std::fs::write(d.path().join("new.yaml"), "x: 1\n").unwrap();
        assert_ne!(a, folder_fingerprint(d.path(), &state));
    }

    /// An edit the loader accepts can still be refused by `up`: no workloads left, or a
    /// workload whose SDS socket path would not fit; a valid one counts its policy.
    #[test]
    fn edits_up_cannot_run_are_refused() {
        let layout = StateLayout::new(std::path::PathBuf::from("/tmp/s"));
        let empty = folder("workloads: []\n", None);
        let e = check_edit(empty.path(), &layout).unwrap_err();
        assert!(e.contains("declares no workloads"), "{e}");
        let long = format!(
            "workloads:\n- {{name: {}, namespace: {}}}\n",
            "a".repeat(60),
            "b".repeat(60)
        );
        let long = folder(&long, None);
        let e = check_edit(long.path(), &layout).unwrap_err();
        assert!(e.contains("too long for a Unix socket"), "{e}");
        let ok = folder("workloads:\n- {name: a, namespace: ns1}\n", None);
        let EditCheck {
            mesh, resources, ..
        } = check_edit(ok.path(), &layout).unwrap();
        assert_eq!(mesh.registry.workloads.len(), 1);
        assert_eq!(resources, 0);
    }
}
