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

/// Every listen address in the folder must be distinct (and not the CA's).
pub fn check_addresses(mesh: &MeshFolder) -> Result<(), String> {
    let mut seen: Vec<(SocketAddr, String)> = vec![(mesh.local.ca_address(), "the CA".into())];
    let mut add = |a: SocketAddr, what: String| -> Result<(), String> {
        if let Some((_, other)) = seen.iter().find(|(s, _)| *s == a) {
            return Err(format!(
                "workloads.yaml: {what} and {other} both listen on {a}"
            ));
        }
        seen.push((a, what));
        Ok(())
    };
    for w in &mesh.registry.workloads {
        let k = w.key();
        for p in &w.ports {
            add(p.app, format!("{k} port {} app", p.port))?;
            add(p.inbound, format!("{k} port {} inbound", p.port))?;
        }
        if let Some(a) = w.proxy.outbound {
            add(a, format!("{k} proxy.outbound"))?;
        }
        if let Some(a) = w.proxy.admin {
            add(a, format!("{k} proxy.admin"))?;
        }
        for u in &w.upstreams {
            add(u.listen, format!("{k} upstream {}:{}", u.service, u.port))?;
        }
    }
    Ok(())
}

/// Check the folder after an edit: the new mesh and its number of policy resources if it is
/// valid, else why it is refused (file, field, reason).
pub fn check_edit(dir: &Path, layout: &StateLayout) -> Result<(MeshFolder, usize), String> {
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
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(format!(
                "workloads.yaml: workload {}: its SDS socket path {} is longer than a Unix socket allows ({MAX_SOCKET_PATH} bytes); use shorter names or a shorter --state-dir",
                w.key(),
                sock.display()
            ));
        }
    }
    Ok((mesh, policy.resources))
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
        assert!(e.contains("longer than a Unix socket allows"), "{e}");
        let ok = folder("workloads:\n- {name: a, namespace: ns1}\n", None);
        let (mesh, resources) = check_edit(ok.path(), &layout).unwrap();
        assert_eq!(mesh.registry.workloads.len(), 1);
        assert_eq!(resources, 0);
    }
}
