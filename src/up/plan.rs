//! What `rampart up` does about an edit of the mesh folder, decided without touching a
//! process: `plan(old, new)` compares the running registry with the edited one and returns
//! the actions, in the order `up` carries them out. The binary's `up` only executes them
//! (signals, spawns, waits) and prints.

use rampart_mesh::{MeshFolder, WorkloadEntry};

/// A process `up` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The CA (one for the mesh).
    Ca,
    /// A workload's node agent.
    Agent,
    /// A workload's app (its `command`).
    App,
    /// A workload's proxy.
    Proxy,
}

/// One step of applying an edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The edit is invalid: nothing is started or stopped (the reason names file and field).
    Refuse(String),
    /// mesh.yaml settings that the CA and node agents keep until the next `up`.
    KeepSettings(Vec<String>),
    /// A workload removed from the registry: stop its app, proxy and node agent.
    Stop(String),
    /// A changed workload whose change needs these processes restarted; `why` is what `up`
    /// prints after `workload KEY: `.
    Restart {
        /// The workload, `namespace/name`.
        workload: String,
        /// The processes to restart.
        roles: Vec<Role>,
        /// Why, for the user.
        why: String,
    },
    /// A changed workload whose proxy applies the change itself (ports, listener addresses,
    /// upstreams): nothing restarts; `up` prints its new table line.
    ApplyLive(String),
    /// A workload added to the registry: start its node agent, app and proxy.
    Start(String),
}

/// The actions that bring a mesh running `old` to `new` (or to nothing, when the edit was
/// refused): settings notes first, then removed workloads (they may free addresses the others
/// now use), then changed and added ones in file order. Unchanged workloads get no action.
pub fn plan(old: &MeshFolder, new: Result<&MeshFolder, &str>) -> Vec<Action> {
    let new = match new {
        Ok(n) => n,
        Err(why) => return vec![Action::Refuse(why.to_string())],
    };
    let mut actions = Vec::new();
    let mut notes = Vec::new();
    if new.trust_domain != old.trust_domain {
        notes.push(format!(
            "trustDomain ({} -> {})",
            old.trust_domain, new.trust_domain
        ));
    }
    let (old_ca, new_ca) = (old.local.ca_address(), new.local.ca_address());
    if new_ca != old_ca {
        notes.push(format!("rampart.ca.listen ({old_ca} -> {new_ca})"));
    }
    if new.local.ca_metrics != old.local.ca_metrics {
        notes.push("rampart.ca.metrics".to_string());
    }
    if new.local.cert_ttl != old.local.cert_ttl || new.local.max_cert_ttl != old.local.max_cert_ttl
    {
        notes.push("rampart.ca.certTTL/maxCertTTL".to_string());
    }
    if !notes.is_empty() {
        actions.push(Action::KeepSettings(notes));
    }
    let (old_w, new_w) = (&old.registry.workloads, &new.registry.workloads);
    for w in old_w {
        if !new_w.iter().any(|n| n.key() == w.key()) {
            actions.push(Action::Stop(w.key()));
        }
    }
    for w in new_w {
        match old_w.iter().find(|o| o.key() == w.key()) {
            None => actions.push(Action::Start(w.key())),
            Some(o) if same_but_labels(o, w) => {}
            Some(o) => actions.push(change(o, w)),
        }
    }
    actions
}

/// Equal in everything `up` shows or starts processes with. Labels only select policy,
/// which the proxies apply themselves: a label edit needs nothing from `up`.
fn same_but_labels(a: &WorkloadEntry, b: &WorkloadEntry) -> bool {
    a.name == b.name
        && a.namespace == b.namespace
        && a.service_account == b.service_account
        && a.ports == b.ports
        && a.command == b.command
        && a.proxy == b.proxy
        && a.upstreams == b.upstreams
}

/// What a change to an existing workload needs: a new service account is a new identity
/// (agent, app and proxy restart); a new command, or a new outbound address the app was
/// started with as HTTP_PROXY, restarts the app (and the proxy too if its admin address
/// moved); a new admin address alone restarts the proxy. Anything else the proxy applies
/// live.
fn change(old: &WorkloadEntry, new: &WorkloadEntry) -> Action {
    let workload = new.key();
    let (roles, why) = if old.service_account != new.service_account {
        (
            vec![Role::Agent, Role::App, Role::Proxy],
            format!(
                "serviceAccount changed ({} -> {}): restarting its node agent, app and proxy under the new identity",
                old.service_account, new.service_account
            ),
        )
    } else if old.command != new.command
        || (new.command.is_some() && old.proxy.outbound != new.proxy.outbound)
    {
        let what = if old.command != new.command {
            "command changed"
        } else {
            "proxy.outbound (its HTTP_PROXY) changed"
        };
        if old.proxy.admin != new.proxy.admin {
            (
                vec![Role::App, Role::Proxy],
                format!("{what} and proxy.admin changed: restarting its app and proxy"),
            )
        } else {
            (vec![Role::App], format!("{what}: restarting its app"))
        }
    } else if old.proxy.admin != new.proxy.admin {
        let show =
            |a: Option<std::net::SocketAddr>| a.map_or_else(|| "-".into(), |a| a.to_string());
        (
            vec![Role::Proxy],
            format!(
                "proxy.admin changed ({} -> {}): restarting its proxy",
                show(old.proxy.admin),
                show(new.proxy.admin)
            ),
        )
    } else {
        return Action::ApplyLive(workload);
    };
    Action::Restart {
        workload,
        roles,
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(workloads: &str) -> MeshFolder {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("mesh.yaml"), "trustDomain: cluster.local\n").unwrap();
        std::fs::write(d.path().join("workloads.yaml"), workloads).unwrap();
        MeshFolder::load(d.path()).unwrap()
    }

    const A: &str = "- {name: a, namespace: ns1, serviceAccount: a, command: [app, --port, '9000'], ports: [{port: 80, app: '127.0.0.1:9000', inbound: '127.0.0.1:9001'}], proxy: {admin: '127.0.0.1:9002', outbound: '127.0.0.1:9003'}}\n";
    const B: &str = "- {name: b, namespace: ns1, serviceAccount: b, ports: [{port: 80, app: '127.0.0.1:9100', inbound: '127.0.0.1:9101'}], proxy: {admin: '127.0.0.1:9102'}}\n";

    fn reg(items: &[&str]) -> MeshFolder {
        mesh(&format!("workloads:\n{}", items.concat()))
    }

    fn restart(w: &str, roles: &[Role], why: &str) -> Action {
        Action::Restart {
            workload: w.into(),
            roles: roles.to_vec(),
            why: why.into(),
        }
    }

    #[test]
    fn plan_table() {
        let base = reg(&[A, B]);
        let cases: Vec<(&str, MeshFolder, Vec<Action>)> = vec![
            ("unchanged", reg(&[A, B]), vec![]),
            (
                "added",
                reg(&[A, B, &B.replace("name: b", "name: c").replace("91", "92")]),
                vec![Action::Start("ns1/c".into())],
            ),
            ("removed", reg(&[A]), vec![Action::Stop("ns1/b".into())]),
            (
                "changed command",
                reg(&[&A.replace("'9000']", "'9000', --verbose]"), B]),
                vec![restart(
                    "ns1/a",
                    &[Role::App],
                    "command changed: restarting its app",
                )],
            ),
            (
                "changed service account",
                reg(&[&A.replace("serviceAccount: a", "serviceAccount: a2"), B]),
                vec![restart(
                    "ns1/a",
                    &[Role::Agent, Role::App, Role::Proxy],
                    "serviceAccount changed (a -> a2): restarting its node agent, app and proxy under the new identity",
                )],
            ),
            (
                "changed admin address",
                reg(&[A, &B.replace("9102", "9199")]),
                vec![restart(
                    "ns1/b",
                    &[Role::Proxy],
                    "proxy.admin changed (127.0.0.1:9102 -> 127.0.0.1:9199): restarting its proxy",
                )],
            ),
            (
                "changed command and admin address",
                reg(&[
                    &A.replace("'9000']", "'9000', -v]").replace("9002", "9098"),
                    B,
                ]),
                vec![restart(
                    "ns1/a",
                    &[Role::App, Role::Proxy],
                    "command changed and proxy.admin changed: restarting its app and proxy",
                )],
            ),
            (
                "changed outbound of an app that uses it",
                reg(&[&A.replace("9003", "9097"), B]),
                vec![restart(
                    "ns1/a",
                    &[Role::App],
                    "proxy.outbound (its HTTP_PROXY) changed: restarting its app",
                )],
            ),
            (
                "changed labels only: policy selection, the proxies' business",
                reg(&[
                    &A.replace("serviceAccount: a,", "serviceAccount: a, labels: {v: '2'},"),
                    B,
                ]),
                vec![],
            ),
            (
                "changed inbound address: the proxy applies it",
                reg(&[A, &B.replace("9101", "9111")]),
                vec![Action::ApplyLive("ns1/b".into())],
            ),
            (
                "removed, changed and added at once, in that order",
                reg(&[&B.replace("9101", "9111"), &A.replace("name: a", "name: d")]),
                vec![
                    Action::Stop("ns1/a".into()),
                    Action::ApplyLive("ns1/b".into()),
                    Action::Start("ns1/d".into()),
                ],
            ),
        ];
        for (what, new, want) in cases {
            assert_eq!(plan(&base, Ok(&new)), want, "{what}");
        }
    }

    #[test]
    fn invalid_edit_starts_and_stops_nothing() {
        let base = reg(&[A, B]);
        assert_eq!(
            plan(&base, Err("workloads.yaml: workloads[0].name: required")),
            vec![Action::Refuse(
                "workloads.yaml: workloads[0].name: required".into()
            )]
        );
    }

    #[test]
    fn mesh_settings_the_ca_keeps_are_noted_first() {
        let base = reg(&[A]);
        let mut new = reg(&[A, B]);
        new.trust_domain = rampart_certs::TrustDomain::new("other.local").unwrap();
        new.local.cert_ttl = Some(std::time::Duration::from_secs(60));
        let p = plan(&base, Ok(&new));
        assert_eq!(
            p,
            vec![
                Action::KeepSettings(vec![
                    "trustDomain (cluster.local -> other.local)".into(),
                    "rampart.ca.certTTL/maxCertTTL".into()
                ]),
                Action::Start("ns1/b".into()),
            ]
        );
    }
}
