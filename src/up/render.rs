//! What `up` prints: who listens where, and how a child ended.

use std::os::unix::process::ExitStatusExt as _;
use std::process::ExitStatus;

use rampart_certs::TrustDomain;
use rampart_mesh::{MeshFolder, WorkloadEntry};

use super::layout::StateLayout;

/// The table `up` prints once the mesh is ready: the CA, the state directory, then every
/// workload.
pub fn mesh_table(mesh: &MeshFolder, layout: &StateLayout) -> String {
    let mut out = format!(
        "CA              {} (trust domain {}, trust bundle {})\n",
        mesh.local.ca_address(),
        mesh.trust_domain,
        layout.bundle().display(),
    );
    if let Some(m) = mesh.local.ca_metrics {
        out.push_str(&format!(
            "CA metrics      http://{m}/metrics (and /ready, /healthz)\n"
        ));
    }
    out.push_str(&format!(
        "state, logs     {}, {}\n\n",
        layout.state.display(),
        layout.logs().display()
    ));
    out.push_str(&workload_table(
        &mesh.trust_domain,
        &mesh.registry.workloads,
    ));
    out
}

/// Who listens where, for `workloads` (with the header line).
pub fn workload_table(trust_domain: &TrustDomain, workloads: &[WorkloadEntry]) -> String {
    let mut rows: Vec<[String; 6]> = vec![[
        "WORKLOAD".into(),
        "IDENTITY".into(),
        "APP".into(),
        "INBOUND (port/protocol -> proxy)".into(),
        "OUTBOUND".into(),
        "ADMIN".into(),
    ]];
    let none = || "-".to_string();
    for w in workloads {
        let mut first = true;
        let ports = &w.ports;
        let n = ports.len().max(1) + w.upstreams.len();
        for i in 0..n {
            let (app, inbound) = if let Some(p) = ports.get(i) {
                (
                    p.app.to_string(),
                    format!("{}/{} -> {}", p.port, p.protocol.as_str(), p.inbound),
                )
            } else if i >= ports.len().max(1) {
                let u = &w.upstreams[i - ports.len().max(1)];
                (
                    String::new(),
                    format!("upstream {}:{} at {}", u.service, u.port, u.listen),
                )
            } else {
                (none(), none())
            };
            rows.push([
                if first { w.key() } else { String::new() },
                if first {
                    w.spiffe_id(trust_domain).to_string()
                } else {
                    String::new()
                },
                app,
                inbound,
                if first {
                    w.proxy.outbound.map(|a| a.to_string()).unwrap_or_else(none)
                } else {
                    String::new()
                },
                if first {
                    w.proxy.admin.map(|a| a.to_string()).unwrap_or_else(none)
                } else {
                    String::new()
                },
            ]);
            first = false;
        }
    }
    crate::align_columns(&rows)
}

/// How a child ended, for reports (`exit code 3`, `killed by signal 9`).
pub fn describe_status(s: &std::io::Result<ExitStatus>) -> String {
    match s {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_ports_then_upstreams_under_one_workload() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("mesh.yaml"), "").unwrap();
        std::fs::write(
            d.path().join("workloads.yaml"),
            "workloads:\n- {name: a, namespace: ns1, ports: [{port: 80, protocol: http, app: '127.0.0.1:9000', inbound: '127.0.0.1:9001'}], proxy: {admin: '127.0.0.1:9002'}, upstreams: [{service: b.ns1, port: 81, listen: '127.0.0.1:9005'}]}\n- {name: b, namespace: ns1, ports: [{port: 81, app: '127.0.0.1:9010', inbound: '127.0.0.1:9011'}]}\n",
        )
        .unwrap();
        let m = crate::read_mesh(d.path()).unwrap();
        let t = mesh_table(&m, &StateLayout::new("/s".into()));
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("CA              127.0.0.1:15012 (trust domain cluster.local, trust bundle /s/trust-bundle.pem)"), "{t}");
        assert_eq!(lines[1], "state, logs     /s, /s/logs");
        assert!(lines[3].starts_with("WORKLOAD"), "{t}");
        let row: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "ns1/a",
                "spiffe://cluster.local/ns/ns1/sa/a",
                "127.0.0.1:9000",
                "80/http",
                "->",
                "127.0.0.1:9001",
                "-",
                "127.0.0.1:9002"
            ]
        );
        assert_eq!(
            lines[5].split_whitespace().collect::<Vec<_>>(),
            ["upstream", "b.ns1:81", "at", "127.0.0.1:9005"]
        );
        assert_eq!(
            lines[6].split_whitespace().collect::<Vec<_>>(),
            [
                "ns1/b",
                "spiffe://cluster.local/ns/ns1/sa/b",
                "127.0.0.1:9010",
                "81/tcp",
                "->",
                "127.0.0.1:9011",
                "-",
                "-"
            ]
        );
        assert_eq!(
            describe_status(&Ok(ExitStatus::from_raw(3 << 8))),
            "exit code 3"
        );
        assert_eq!(
            describe_status(&Ok(ExitStatus::from_raw(9))),
            "killed by signal 9"
        );
    }
}
