//! The parts of a mesh folder (`mesh.yaml`, `workloads.yaml`; contract in DESIGN §6 and the
//! proxy/up mesh-folder contract) that `up` and `mtls-report` need: addresses, identities and
//! commands. Policy is not read here (the proxies and `rampart_authz::load_path` do that).
//!
//! This is deliberately minimal and meant to be replaced by the proxy crate's `mesh` module,
//! the one registry parser, once it lands: the proxies are what enforce the registry, this only
//! tells `up` which processes to start and where they listen.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default CA listen address (DESIGN §2).
pub(crate) const DEFAULT_CA_LISTEN: &str = "127.0.0.1:15012";

/// What `up` and `mtls-report` need from a mesh folder.
#[derive(Debug, Clone)]
pub(crate) struct MeshFolder {
    pub(crate) trust_domain: String,
    pub(crate) ca_listen: SocketAddr,
    pub(crate) cert_ttl: Option<Duration>,
    pub(crate) max_cert_ttl: Option<Duration>,
    /// `rampart.stateDir` as written (relative to the cwd of `up`), if given.
    pub(crate) state_dir: Option<PathBuf>,
    pub(crate) workloads: Vec<Workload>,
}

#[derive(Debug, Clone)]
pub(crate) struct Workload {
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) service_account: String,
    pub(crate) ports: Vec<Port>,
    pub(crate) command: Option<Vec<String>>,
    pub(crate) outbound: Option<SocketAddr>,
    pub(crate) admin: Option<SocketAddr>,
    pub(crate) upstreams: Vec<Upstream>,
}

impl Workload {
    /// `namespace/name`, how the proxy CLI and reports name a workload.
    pub(crate) fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub(crate) fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Port {
    pub(crate) port: u16,
    pub(crate) protocol: String,
    pub(crate) app: Option<SocketAddr>,
    pub(crate) inbound: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    pub(crate) service: String,
    pub(crate) port: u16,
    pub(crate) listen: SocketAddr,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawMesh {
    rampart: RawRampart,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawRampart {
    ca: RawCa,
    state_dir: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawCa {
    listen: Option<String>,
    #[serde(rename = "certTTL")]
    cert_ttl: Option<String>,
    #[serde(rename = "maxCertTTL")]
    max_cert_ttl: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRegistry {
    workloads: Vec<RawWorkload>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawWorkload {
    name: String,
    namespace: String,
    service_account: Option<String>,
    ports: Vec<RawPort>,
    command: Option<Vec<String>>,
    proxy: RawProxy,
    upstreams: Vec<RawUpstream>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawPort {
    port: u32,
    protocol: Option<String>,
    app: Option<String>,
    inbound: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawProxy {
    outbound: Option<String>,
    admin: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawUpstream {
    service: String,
    port: u32,
    listen: String,
}

fn addr(file: &str, field: &str, s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|e| format!("{file}: {field}: {s:?} is not an IP:port address ({e})"))
}

fn opt_addr(file: &str, field: &str, s: &Option<String>) -> Result<Option<SocketAddr>, String> {
    s.as_deref().map(|s| addr(file, field, s)).transpose()
}

fn duration(file: &str, field: &str, s: &Option<String>) -> Result<Option<Duration>, String> {
    s.as_deref()
        .map(|s| {
            humantime::parse_duration(s)
                .map_err(|e| format!("{file}: {field}: {s:?} is not a duration ({e})"))
        })
        .transpose()
}

impl MeshFolder {
    /// Read `DIR/mesh.yaml` (optional) and `DIR/workloads.yaml` (required). Errors are one
    /// line naming the file and field.
    pub(crate) fn read(dir: &Path) -> Result<MeshFolder, String> {
        if !dir.is_dir() {
            return Err(format!("{}: not a folder", dir.display()));
        }
        let mesh_path = dir.join("mesh.yaml");
        let mesh_text = match std::fs::read_to_string(&mesh_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("{}: {e}", mesh_path.display())),
        };
        // The policy part (trust domain, root namespace, normalization, providers) is the
        // authz crate's to read; refuse here what it would refuse.
        let policy_mesh = rampart_authz::MeshConfig::from_yaml(&mesh_text)
            .map_err(|e| format!("{}: {}", mesh_path.display(), one_line(&e.to_string())))?;
        let mesh: RawMesh = if mesh_text.trim().is_empty() {
            RawMesh::default()
        } else {
            serde_saphyr::from_str(&mesh_text)
                .map_err(|e| format!("{}: {}", mesh_path.display(), one_line(&e.to_string())))?
        };
        let reg_path = dir.join("workloads.yaml");
        let text = std::fs::read_to_string(&reg_path)
            .map_err(|e| format!("{}: {e}", reg_path.display()))?;
        let reg: RawRegistry = if text.trim().is_empty() {
            RawRegistry::default()
        } else {
            serde_saphyr::from_str(&text)
                .map_err(|e| format!("{}: {}", reg_path.display(), one_line(&e.to_string())))?
        };
        let mf = "mesh.yaml";
        let trust_domain = policy_mesh.trust_domain;
        let ca_listen = addr(
            mf,
            "rampart.ca.listen",
            mesh.rampart
                .ca
                .listen
                .as_deref()
                .unwrap_or(DEFAULT_CA_LISTEN),
        )?;
        let cert_ttl = duration(mf, "rampart.ca.certTTL", &mesh.rampart.ca.cert_ttl)?;
        let max_cert_ttl = duration(mf, "rampart.ca.maxCertTTL", &mesh.rampart.ca.max_cert_ttl)?;
        let wf = "workloads.yaml";
        let mut seen = BTreeSet::new();
        let mut workloads = Vec::new();
        for (i, w) in reg.workloads.into_iter().enumerate() {
            let at = format!("workloads[{i}]");
            if !dns_label(&w.name) {
                return Err(format!(
                    "{wf}: {at}.name: {:?} must be a DNS label (lowercase letters, digits, '-')",
                    w.name
                ));
            }
            if !dns_label(&w.namespace) {
                return Err(format!(
                    "{wf}: {at}.namespace: {:?} must be a DNS label",
                    w.namespace
                ));
            }
            let sa = w.service_account.unwrap_or_else(|| w.name.clone());
            if sa.is_empty() || sa.contains('/') {
                return Err(format!("{wf}: {at}.serviceAccount: {sa:?} is not a name"));
            }
            if !seen.insert((w.namespace.clone(), w.name.clone())) {
                return Err(format!(
                    "{wf}: {at}: workload {}/{} is declared twice",
                    w.namespace, w.name
                ));
            }
            let mut ports = Vec::new();
            for (j, p) in w.ports.iter().enumerate() {
                let pat = format!("{at}.ports[{j}]");
                let port = u16::try_from(p.port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("{wf}: {pat}.port: {} is not a port", p.port))?;
                ports.push(Port {
                    port,
                    protocol: p.protocol.clone().unwrap_or_else(|| "tcp".into()),
                    app: opt_addr(wf, &format!("{pat}.app"), &p.app)?,
                    inbound: opt_addr(wf, &format!("{pat}.inbound"), &p.inbound)?,
                });
            }
            if w.command.as_ref().is_some_and(Vec::is_empty) {
                return Err(format!("{wf}: {at}.command: must not be empty when given"));
            }
            let mut upstreams = Vec::new();
            for (j, u) in w.upstreams.iter().enumerate() {
                let uat = format!("{at}.upstreams[{j}]");
                upstreams.push(Upstream {
                    service: u.service.clone(),
                    port: u16::try_from(u.port)
                        .map_err(|_| format!("{wf}: {uat}.port: {} is not a port", u.port))?,
                    listen: addr(wf, &format!("{uat}.listen"), &u.listen)?,
                });
            }
            workloads.push(Workload {
                name: w.name,
                namespace: w.namespace,
                service_account: sa,
                ports,
                command: w.command,
                outbound: opt_addr(wf, &format!("{at}.proxy.outbound"), &w.proxy.outbound)?,
                admin: opt_addr(wf, &format!("{at}.proxy.admin"), &w.proxy.admin)?,
                upstreams,
            });
        }
        Ok(MeshFolder {
            trust_domain,
            ca_listen,
            cert_ttl,
            max_cert_ttl,
            state_dir: mesh
                .rampart
                .state_dir
                .filter(|s| !s.is_empty())
                .map(Into::into),
            workloads,
        })
    }
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(mesh: &str, workloads: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("mesh.yaml"), mesh).unwrap();
        std::fs::write(d.path().join("workloads.yaml"), workloads).unwrap();
        d
    }

    #[test]
    fn reads_the_contract_example() {
        let d = folder(
            "trustDomain: example.org\nrampart: {ca: {listen: 127.0.0.1:25012, certTTL: 1h}, stateDir: var/x}\n",
            "workloads:\n- name: backend\n  namespace: api\n  labels: {app: backend}\n  ports:\n  - {port: 8080, protocol: http, app: 127.0.0.1:18080, inbound: 127.0.0.1:15081}\n  command: [rampart, echo, --listen, 127.0.0.1:18080]\n  proxy: {outbound: 127.0.0.1:15001, admin: 127.0.0.1:15000}\n  upstreams:\n  - {service: backend.api, port: 8080, listen: 127.0.0.1:16001}\n",
        );
        let m = MeshFolder::read(d.path()).unwrap();
        assert_eq!(m.trust_domain, "example.org");
        assert_eq!(m.ca_listen.port(), 25012);
        assert_eq!(m.cert_ttl, Some(Duration::from_secs(3600)));
        assert_eq!(m.state_dir.as_deref(), Some(Path::new("var/x")));
        let w = &m.workloads[0];
        assert_eq!(w.key(), "api/backend");
        assert_eq!(w.service_account, "backend");
        assert_eq!(
            w.spiffe_id(&m.trust_domain),
            "spiffe://example.org/ns/api/sa/backend"
        );
        assert_eq!(w.ports[0].inbound.unwrap().port(), 15081);
        assert_eq!(w.admin.unwrap().port(), 15000);
        assert_eq!(w.upstreams[0].listen.port(), 16001);
    }

    #[test]
    fn refuses_bad_fields_naming_them() {
        let bad_addr = folder(
            "",
            "workloads:\n- {name: a, namespace: ns1, proxy: {admin: localhost}}\n",
        );
        let e = MeshFolder::read(bad_addr.path()).unwrap_err();
        assert!(e.contains("workloads[0].proxy.admin"), "{e}");
        let dup = folder(
            "",
            "workloads:\n- {name: a, namespace: ns1}\n- {name: a, namespace: ns1}\n",
        );
        assert!(MeshFolder::read(dup.path()).unwrap_err().contains("twice"));
        let name = folder("", "workloads:\n- {name: A_b, namespace: ns1}\n");
        assert!(
            MeshFolder::read(name.path())
                .unwrap_err()
                .contains("workloads[0].name")
        );
        let port = folder(
            "",
            "workloads:\n- {name: a, namespace: ns1, ports: [{port: 70000}]}\n",
        );
        assert!(
            MeshFolder::read(port.path())
                .unwrap_err()
                .contains("ports[0].port")
        );
        let ttl = folder("rampart: {ca: {certTTL: soon}}", "workloads: []\n");
        assert!(
            MeshFolder::read(ttl.path())
                .unwrap_err()
                .contains("rampart.ca.certTTL")
        );
        let norm = folder(
            "pathNormalization: {normalization: SOMETIMES}",
            "workloads: []\n",
        );
        assert!(
            MeshFolder::read(norm.path())
                .unwrap_err()
                .contains("mesh.yaml")
        );
        let none = tempfile::tempdir().unwrap();
        assert!(
            MeshFolder::read(none.path())
                .unwrap_err()
                .contains("workloads.yaml")
        );
    }
}
