//! The pure parts of the `rampart` command line, as a library so they can be table-tested
//! without starting a process: what `rampart up` does about a folder and its edits
//! ([`up`]), how `rampart inject` adds the sidecar to Kubernetes manifests ([`inject`]) and the CA's
//! injection webhook does it to Pods as they are created ([`webhook`]), and
//! the tables `up` and `mtls-report` print ([`align_columns`]).
//!
//! The binary (`src/main.rs`, `src/cli/`) keeps process supervision, networking and
//! printing. Nothing in the workspace depends on this package (tests/deps.rs).

pub mod inject;
pub mod mesh_warnings;
pub mod up;
pub mod webhook;

/// Read a mesh folder with `rampart_mesh`'s loader (the one parser of `mesh.yaml` and
/// `workloads.yaml`: the same checks the proxies apply). A refusal lists every problem, one
/// per line, each naming the file and field.
pub fn read_mesh(dir: &std::path::Path) -> Result<rampart_mesh::MeshFolder, String> {
    rampart_mesh::MeshFolder::load(dir).map_err(|problems| {
        problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n  ")
    })
}

/// Rows of cells as left-aligned columns two spaces apart, one line per row (trailing
/// spaces trimmed), for the tables `up` and `mtls-report` print.
pub fn align_columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
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
        let m = read_mesh(d.path()).unwrap();
        assert_eq!(m.trust_domain.to_string(), "example.org");
        assert_eq!(m.local.ca_address().port(), 25012);
        assert_eq!(m.local.cert_ttl, Some(std::time::Duration::from_secs(3600)));
        assert_eq!(
            m.local.state_dir.as_deref(),
            Some(std::path::Path::new("var/x"))
        );
        let w = &m.registry.workloads[0];
        assert_eq!(w.key(), "api/backend");
        assert_eq!(w.service_account, "backend");
        assert_eq!(
            w.spiffe_id(&m.trust_domain).to_string(),
            "spiffe://example.org/ns/api/sa/backend"
        );
        assert_eq!(w.ports[0].inbound.port(), 15081);
        assert_eq!(w.proxy.admin.unwrap().port(), 15000);
        assert_eq!(w.upstreams[0].listen.port(), 16001);
        let default = folder("", "workloads: []\n");
        assert_eq!(
            read_mesh(default.path()).unwrap().local.ca_address(),
            rampart_mesh::DEFAULT_CA_LISTEN
        );
    }

    #[test]
    fn refuses_bad_fields_naming_them() {
        let bad_addr = folder(
            "",
            "workloads:\n- {name: a, namespace: ns1, proxy: {admin: localhost}}\n",
        );
        let e = read_mesh(bad_addr.path()).unwrap_err();
        assert!(e.contains("workloads[0].proxy.admin"), "{e}");
        let dup = folder(
            "",
            "workloads:\n- {name: a, namespace: ns1}\n- {name: a, namespace: ns1}\n",
        );
        assert!(read_mesh(dup.path()).unwrap_err().contains("twice"));
        let name = folder("", "workloads:\n- {name: A_b, namespace: ns1}\n");
        assert!(
            read_mesh(name.path())
                .unwrap_err()
                .contains("workloads[0].name")
        );
        let port = folder(
            "",
            "workloads:\n- {name: a, namespace: ns1, ports: [{port: 70000}]}\n",
        );
        assert!(
            read_mesh(port.path())
                .unwrap_err()
                .contains("ports[0].port")
        );
        let ttl = folder("rampart: {ca: {certTTL: soon}}", "workloads: []\n");
        assert!(
            read_mesh(ttl.path())
                .unwrap_err()
                .contains("rampart.ca.certTTL")
        );
        let norm = folder(
            "pathNormalization: {normalization: SOMETIMES}",
            "workloads: []\n",
        );
        assert!(read_mesh(norm.path()).unwrap_err().contains("mesh.yaml"));
        let none = tempfile::tempdir().unwrap();
        assert!(
            read_mesh(none.path())
                .unwrap_err()
                .contains("workloads.yaml")
        );
    }
}
