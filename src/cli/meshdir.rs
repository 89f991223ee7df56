//! The view of a mesh folder that `up` and `mtls-report` need (addresses, identities,
//! commands), read with `rampart_mesh`'s loader, the one parser of
//! `mesh.yaml` and `workloads.yaml`: `up` refuses exactly what the proxies would refuse.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// `rampart.compliancePolicy` (`pqc`: `up` runs its CA, agents and proxies under it).
    pub(crate) compliance_policy: rampart_certs::tls::CompliancePolicy,
    pub(crate) workloads: Vec<Workload>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Port {
    pub(crate) port: u16,
    pub(crate) protocol: String,
    pub(crate) app: Option<SocketAddr>,
    pub(crate) inbound: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Upstream {
    pub(crate) service: String,
    pub(crate) port: u16,
    pub(crate) listen: SocketAddr,
}

impl MeshFolder {
    /// Read the folder with the proxy crate's mesh loader (the one registry parser): the same
    /// checks the proxies apply, so `up` refuses what they would refuse. Errors list every
    /// problem, one per line, naming the file and field.
    pub(crate) fn read(dir: &Path) -> Result<MeshFolder, String> {
        let m = rampart_mesh::MeshFolder::load(dir).map_err(|problems| {
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n  ")
        })?;
        let ca_listen = match m.local.ca_listen {
            Some(a) => a,
            None => DEFAULT_CA_LISTEN
                .parse()
                .map_err(|e| format!("default CA address: {e}"))?,
        };
        let workloads = m
            .registry
            .workloads
            .iter()
            .map(|w| Workload {
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone(),
                ports: w
                    .ports
                    .iter()
                    .map(|p| Port {
                        port: p.port,
                        protocol: p.protocol.as_str().to_string(),
                        app: Some(p.app),
                        inbound: Some(p.inbound),
                    })
                    .collect(),
                command: w.command.clone(),
                outbound: w.proxy.outbound,
                admin: w.proxy.admin,
                upstreams: w
                    .upstreams
                    .iter()
                    .map(|u| Upstream {
                        service: u.service.clone(),
                        port: u.port,
                        listen: u.listen,
                    })
                    .collect(),
            })
            .collect();
        Ok(MeshFolder {
            trust_domain: m.trust_domain.to_string(),
            ca_listen,
            cert_ttl: m.local.cert_ttl,
            max_cert_ttl: m.local.max_cert_ttl,
            state_dir: m.local.state_dir.clone(),
            compliance_policy: m.local.compliance_policy,
            workloads,
        })
    }
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
