//! Where `up` keeps its state and how it starts each child: file paths and command lines,
//! computed from the mesh and the state directory only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rampart_mesh::{MeshFolder, WorkloadEntry};

/// Issuer of the tokens node agents present to the CA.
pub const DEFAULT_ISSUER: &str = "https://rampart.local/up";
/// Audience the CA expects in caller tokens (the CA's default).
pub const CA_AUDIENCE: &str = rampart_citadel::DEFAULT_AUDIENCE;
/// Lifetime of agent tokens; they are re-minted well before expiry.
pub const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often agent tokens are re-minted.
pub const TOKEN_REFRESH: Duration = Duration::from_secs(3600);
/// What `rampart ca` prints once its listener is bound.
pub const CA_READY_MARKER: &str = "rampart ca: listening on";
/// Longest Unix socket path (sockaddr_un.sun_path less the NUL).
pub const MAX_SOCKET_PATH: usize = rampart_node_agent::MAX_SOCKET_PATH;

/// The state directory of `up` and what lives in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    /// The directory itself.
    pub state: PathBuf,
}

impl StateLayout {
    /// The layout below `state`.
    pub fn new(state: PathBuf) -> StateLayout {
        StateLayout { state }
    }

    /// The subdirectories `up` creates.
    pub const SUBDIRS: [&'static str; 5] = ["logs", "jwt", "tokens", "sds", "ca"];

    /// Children's log files.
    pub fn logs(&self) -> PathBuf {
        self.state.join("logs")
    }

    /// Where the CA writes its trust bundle for the agents; never into `ca/`, where
    /// `root-cert.pem` is its persisted self-signed root (the CA refuses that).
    pub fn bundle(&self) -> PathBuf {
        self.state.join("trust-bundle.pem")
    }

    /// The CA's own state (`--state`).
    pub fn ca_state(&self) -> PathBuf {
        self.state.join("ca")
    }

    /// The default Istio `cacerts` plug-in directory.
    pub fn default_cacerts(&self) -> PathBuf {
        self.state.join("cacerts")
    }

    /// The key that signs agent tokens (0600).
    pub fn signing_key(&self) -> PathBuf {
        self.state.join("jwt/up-signing-key.pem")
    }

    /// The JWKS of that key, which the CA trusts.
    pub fn jwks(&self) -> PathBuf {
        self.state.join("jwt/jwks.json")
    }

    /// The demo end-user token (mesh.yaml `rampart.demoToken`).
    pub fn demo_token(&self) -> PathBuf {
        self.state.join("demo-token.jwt")
    }

    /// The token of `w`'s node agent.
    pub fn token_path(&self, w: &WorkloadEntry) -> PathBuf {
        self.state
            .join("tokens")
            .join(format!("{}.{}.jwt", w.namespace, w.name))
    }

    /// The SDS socket of `w`'s node agent.
    pub fn sds_path(&self, w: &WorkloadEntry) -> PathBuf {
        self.state
            .join("sds")
            .join(format!("{}.{}.sock", w.namespace, w.name))
    }

    /// The longest SDS socket path of `workloads`, if it (or the temporary path the agent
    /// binds it at first) is longer than a Unix socket allows.
    pub fn too_long_socket(&self, workloads: &[WorkloadEntry]) -> Option<PathBuf> {
        let len = |p: &PathBuf| {
            p.as_os_str()
                .len()
                .max(rampart_node_agent::bind_path_len(p))
        };
        workloads
            .iter()
            .map(|w| self.sds_path(w))
            .max_by_key(len)
            .filter(|p| len(p) > MAX_SOCKET_PATH)
    }
}

fn ttl(t: Duration) -> String {
    humantime::format_duration(t).to_string()
}

/// The arguments of `rampart ca` for this mesh: trusting `issuer`'s tokens (keys in the
/// layout's JWKS), writing its bundle where the agents read it.
pub fn ca_args(
    mesh: &MeshFolder,
    layout: &StateLayout,
    cacerts: &Path,
    issuer: &str,
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "ca".into(),
        "--listen".into(),
        mesh.local.ca_address().to_string(),
        "--cacerts".into(),
        cacerts.display().to_string(),
        "--state".into(),
        layout.ca_state().display().to_string(),
        "--trust-domain".into(),
        mesh.trust_domain.to_string(),
        "--jwt-issuer".into(),
        issuer.to_string(),
        "--jwks".into(),
        layout.jwks().display().to_string(),
        "--bundle-out".into(),
        layout.bundle().display().to_string(),
    ];
    if let Some(t) = mesh.local.cert_ttl {
        a.extend(["--default-ttl".into(), ttl(t)]);
    }
    if let Some(m) = mesh.local.ca_metrics {
        a.extend(["--metrics".into(), m.to_string()]);
    }
    if let Some(t) = mesh.local.max_cert_ttl {
        a.extend(["--max-ttl".into(), ttl(t)]);
    }
    a
}

/// The arguments of `rampart agent` for `w`.
pub fn agent_args(mesh: &MeshFolder, layout: &StateLayout, w: &WorkloadEntry) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "agent".into(),
        "--ca-addr".into(),
        mesh.local.ca_address().to_string(),
        "--ca-root".into(),
        layout.bundle().display().to_string(),
        "--token".into(),
        layout.token_path(w).display().to_string(),
        "--trust-domain".into(),
        mesh.trust_domain.to_string(),
        "--sds-socket".into(),
        layout.sds_path(w).display().to_string(),
    ];
    if let Some(t) = mesh.local.cert_ttl {
        a.extend(["--ttl".into(), ttl(t)]);
    }
    a
}

/// The arguments of `rampart proxy` for `w` of the folder `dir`.
pub fn proxy_args(dir: &Path, layout: &StateLayout, w: &WorkloadEntry) -> Vec<String> {
    vec![
        "proxy".into(),
        "--mesh".into(),
        dir.display().to_string(),
        "--workload".into(),
        w.key(),
        "--sds-socket".into(),
        layout.sds_path(w).display().to_string(),
    ]
}

/// How a workload's app is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppCommand {
    /// The program (`rampart` in the registry means `exe`).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its environment additions: who it is, and its proxy as `HTTP_PROXY`.
    pub env: Vec<(&'static str, String)>,
}

/// The app of `w`, if the registry gives it a command.
pub fn app_command(mesh: &MeshFolder, w: &WorkloadEntry, exe: &Path) -> Option<AppCommand> {
    let cmd = w.command.as_ref()?;
    let (first, args) = cmd.split_first()?;
    let program = if first == "rampart" {
        exe.to_path_buf()
    } else {
        PathBuf::from(first)
    };
    let mut env = vec![
        ("RAMPART_WORKLOAD", w.key()),
        ("SPIFFE_ID", w.spiffe_id(&mesh.trust_domain).to_string()),
    ];
    if let Some(o) = w.proxy.outbound {
        let url = format!("http://{o}");
        env.extend([
            ("HTTP_PROXY", url.clone()),
            ("http_proxy", url),
            ("NO_PROXY", "localhost,127.0.0.1,::1".into()),
            ("no_proxy", "localhost,127.0.0.1,::1".into()),
        ]);
    }
    Some(AppCommand {
        program,
        args: args.to_vec(),
        env,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(mesh_yaml: &str) -> MeshFolder {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("mesh.yaml"), mesh_yaml).unwrap();
        std::fs::write(
            d.path().join("workloads.yaml"),
            "workloads:\n- {name: a, namespace: ns1, command: [rampart, echo, --listen, '127.0.0.1:9000'], ports: [{port: 80, app: '127.0.0.1:9000', inbound: '127.0.0.1:9001'}], proxy: {outbound: '127.0.0.1:9003'}}\n- {name: b, namespace: ns1}\n",
        )
        .unwrap();
        crate::read_mesh(d.path()).unwrap()
    }

    #[test]
    fn command_lines_carry_the_mesh_settings() {
        let m = mesh(
            "trustDomain: example.org\nrampart: {ca: {listen: 127.0.0.1:25012, certTTL: 1h, maxCertTTL: 2h}}\n",
        );
        let l = StateLayout::new(PathBuf::from("/s"));
        let ca = ca_args(&m, &l, Path::new("/c"), DEFAULT_ISSUER).join(" ");
        assert_eq!(
            ca,
            "ca --listen 127.0.0.1:25012 --cacerts /c --state /s/ca --trust-domain example.org --jwt-issuer https://rampart.local/up --jwks /s/jwt/jwks.json --bundle-out /s/trust-bundle.pem --default-ttl 1h --max-ttl 2h"
        );
        let w = &m.registry.workloads[0];
        assert_eq!(
            agent_args(&m, &l, w).join(" "),
            "agent --ca-addr 127.0.0.1:25012 --ca-root /s/trust-bundle.pem --token /s/tokens/ns1.a.jwt --trust-domain example.org --sds-socket /s/sds/ns1.a.sock --ttl 1h"
        );
        assert_eq!(
            proxy_args(Path::new("/m"), &l, w).join(" "),
            "proxy --mesh /m --workload ns1/a --sds-socket /s/sds/ns1.a.sock"
        );
        let app = app_command(&m, w, Path::new("/bin/rampart")).unwrap();
        assert_eq!(app.program, PathBuf::from("/bin/rampart"));
        assert_eq!(app.args, ["echo", "--listen", "127.0.0.1:9000"]);
        assert!(
            app.env
                .contains(&("SPIFFE_ID", "spiffe://example.org/ns/ns1/sa/a".into()))
        );
        assert!(
            app.env
                .contains(&("HTTP_PROXY", "http://127.0.0.1:9003".into()))
        );
        assert!(app_command(&m, &m.registry.workloads[1], Path::new("/x")).is_none());
        // Defaults: the CA on 15012, no TTL flags.
        let d = mesh("");
        assert!(
            ca_args(&d, &l, Path::new("/c"), "i")
                .join(" ")
                .contains("--listen 127.0.0.1:15012 ")
        );
        assert!(!agent_args(&d, &l, &d.registry.workloads[0]).contains(&"--ttl".to_string()));
        assert_eq!(l.too_long_socket(&d.registry.workloads), None);
        let deep = StateLayout::new(PathBuf::from("/".to_string() + &"d".repeat(100)));
        assert!(deep.too_long_socket(&d.registry.workloads).is_some());
    }
}
