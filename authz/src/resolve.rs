//! Which policies apply to a workload, and the effective PeerAuthentication mode for a port.
//!
//! Attachment (field reference §0): a policy applies to the workloads of its own namespace
//! whose labels include its `selector.matchLabels` (no selector: all of them); a policy in the
//! root namespace applies to matching workloads of every namespace. Policies with
//! `targetRef`/`targetRefs` are for gateways and waypoints: they never apply to a
//! sidecar-style workload.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::eval_request::Workload;
use crate::explain::PolicyRef;
use crate::model::{MtlsMode, PeerAuthentication};

/// Whether a policy (namespace, selector, target refs) applies to `w`.
pub(crate) fn applies(
    policy_ns: &str,
    selector: &BTreeMap<String, String>,
    has_target_refs: bool,
    root_ns: &str,
    w: &Workload,
) -> bool {
    if has_target_refs {
        return false;
    }
    if policy_ns != root_ns && policy_ns != w.namespace {
        return false;
    }
    selector
        .iter()
        .all(|(k, v)| w.labels.get(k).is_some_and(|have| have == v))
}

/// An index of policies by namespace and by one selector label, so finding the policies of a
/// workload costs a few hash lookups instead of a scan of every policy.
#[derive(Debug, Default)]
pub(crate) struct SelectorIndex {
    by_ns: HashMap<String, NsBucket>,
}

#[derive(Debug, Default)]
struct NsBucket {
    /// Policies without selector labels.
    all: Vec<usize>,
    /// Policies with labels, filed under their first label: key → value → ids.
    by_label: HashMap<String, HashMap<String, Vec<usize>>>,
}

impl SelectorIndex {
    /// File policy `id` (ids must be inserted in ascending order).
    pub(crate) fn insert(&mut self, id: usize, ns: &str, selector: &BTreeMap<String, String>) {
        let b = self.by_ns.entry(ns.to_string()).or_default();
        match selector.iter().next() {
            None => b.all.push(id),
            Some((k, v)) => b
                .by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .push(id),
        }
    }

    /// Candidate ids for `w` (a superset: the caller checks the full selector), sorted.
    pub(crate) fn candidates(&self, root_ns: &str, w: &Workload, out: &mut Vec<usize>) {
        out.clear();
        let mut add = |ns: &str| {
            if let Some(b) = self.by_ns.get(ns) {
                out.extend_from_slice(&b.all);
                for (k, v) in &w.labels {
                    if let Some(ids) = b.by_label.get(k).and_then(|m| m.get(v)) {
                        out.extend_from_slice(ids);
                    }
                }
            }
        };
        add(&w.namespace);
        if root_ns != w.namespace {
            add(root_ns);
        }
        out.sort_unstable();
    }
}

/// At which level the effective mTLS mode was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MtlsLevel {
    /// No policy sets a mode: Istio's default, PERMISSIVE.
    Default,
    /// Mesh-wide policy (root namespace, no selector).
    Mesh,
    /// Namespace-wide policy.
    Namespace,
    /// Workload policy (selector).
    Workload,
    /// A `portLevelMtls` entry of the workload policy.
    Port,
}

/// The effective PeerAuthentication mode for a (workload, port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectiveMtls {
    /// `STRICT`, `PERMISSIVE` or `DISABLE` (never `UNSET`).
    #[serde(serialize_with = "ser_mode")]
    pub mode: MtlsMode,
    /// The level that decided.
    pub level: MtlsLevel,
    /// The policy that decided, if any.
    pub policy: Option<PolicyRef>,
}

fn ser_mode<S: serde::Serializer>(m: &MtlsMode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

impl EffectiveMtls {
    /// Whether a plaintext connection is acceptable on this port.
    pub fn allows_plaintext(&self) -> bool {
        self.mode != MtlsMode::Strict
    }

    /// Whether the proxy terminates mTLS on this port (STRICT or PERMISSIVE).
    pub fn accepts_mtls(&self) -> bool {
        self.mode != MtlsMode::Disable
    }
}

/// PeerAuthentications grouped by namespace, each group ordered oldest first.
#[derive(Debug, Default)]
pub(crate) struct PeerAuthnSet {
    by_ns: HashMap<String, Vec<PeerAuthentication>>,
}

impl PeerAuthnSet {
    pub(crate) fn new(list: Vec<PeerAuthentication>) -> Self {
        let mut by_ns: HashMap<String, Vec<(usize, PeerAuthentication)>> = HashMap::new();
        for (i, p) in list.into_iter().enumerate() {
            by_ns
                .entry(p.namespace().to_string())
                .or_default()
                .push((i, p));
        }
        let by_ns = by_ns
            .into_iter()
            .map(|(ns, mut v)| {
                // Oldest creationTimestamp first (absent counts as oldest, as Go's zero time);
                // ties keep list order.
                v.sort_by_key(|(i, p)| (p.metadata.creation_time(), *i));
                (ns, v.into_iter().map(|(_, p)| p).collect())
            })
            .collect();
        PeerAuthnSet { by_ns }
    }

    /// Istio's `ComposePeerAuthentication` for one port (field reference §1).
    pub(crate) fn effective(&self, root_ns: &str, w: &Workload, port: u16) -> EffectiveMtls {
        let has_labels =
            |p: &PeerAuthentication| p.spec.selector.as_ref().is_some_and(|s| s.has_labels());
        let pref = |p: &PeerAuthentication| PolicyRef {
            kind: "PeerAuthentication",
            namespace: p.namespace().to_string(),
            name: p.name().to_string(),
        };
        let empty = Vec::new();
        let root = self.by_ns.get(root_ns).unwrap_or(&empty);
        let mesh = root.iter().find(|p| !has_labels(p));
        let (namespace, workload) = if w.namespace == root_ns {
            // Workloads in the root namespace: its selector-less policies are mesh-level and
            // its selector policies are ignored.
            (None, None)
        } else {
            let list = self.by_ns.get(&w.namespace).unwrap_or(&empty);
            (
                list.iter().find(|p| !has_labels(p)),
                list.iter().find(|p| {
                    has_labels(p)
                        && p.spec
                            .selector
                            .as_ref()
                            .is_some_and(|s| s.matches(&w.labels))
                }),
            )
        };
        let mut eff = EffectiveMtls {
            mode: MtlsMode::Permissive,
            level: MtlsLevel::Default,
            policy: None,
        };
        for (p, level) in [
            (mesh, MtlsLevel::Mesh),
            (namespace, MtlsLevel::Namespace),
            (workload, MtlsLevel::Workload),
        ] {
            if let Some(p) = p {
                let m = p.spec.mode();
                if m != MtlsMode::Unset {
                    eff = EffectiveMtls {
                        mode: m,
                        level,
                        policy: Some(pref(p)),
                    };
                }
            }
        }
        let port_level = workload.and_then(|p| {
            let pl = p.spec.port_level_mtls.as_ref()?.get(&u32::from(port))?;
            Some((p, pl.mode))
        });
        // UNSET at port level: the result above stands.
        if let Some((p, mode)) = port_level.filter(|(_, m)| *m != MtlsMode::Unset) {
            eff = EffectiveMtls {
                mode,
                level: MtlsLevel::Port,
                policy: Some(pref(p)),
            };
        }
        eff
    }
}
