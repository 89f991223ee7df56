//! The mesh-wide settings policy evaluation depends on (a subset of Istio's MeshConfig).

use serde::Deserialize;

use crate::normalize::PathNormalization;

/// Default root namespace (MeshConfig `rootNamespace`).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// Default trust domain (MeshConfig `trustDomain`).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Mesh-wide settings: root namespace, trust domain and aliases, path normalization and the
/// extension providers CUSTOM policies may name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    /// Policies in this namespace apply mesh-wide (default `istio-system`).
    pub root_namespace: String,
    /// The local trust domain (default `cluster.local`).
    pub trust_domain: String,
    /// Trust domains treated as local for policy matching (`trustDomainAliases`).
    pub trust_domain_aliases: Vec<String>,
    /// Path normalization before matching (default `BASE`).
    pub path_normalization: PathNormalization,
    /// Names of configured extension providers (`extensionProviders[].name`).
    pub extension_providers: Vec<String>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            trust_domain_aliases: Vec::new(),
            path_normalization: PathNormalization::Base,
            extension_providers: Vec::new(),
        }
    }
}

/// `mesh.yaml` could not be read.
#[derive(Debug, thiserror::Error)]
#[error("mesh config: {0}")]
pub struct MeshConfigError(String);

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawMesh {
    root_namespace: Option<String>,
    trust_domain: Option<String>,
    trust_domain_aliases: Vec<String>,
    path_normalization: Option<RawNormalization>,
    extension_providers: Vec<RawProvider>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawNormalization {
    normalization: Option<PathNormalization>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawProvider {
    name: String,
}

impl MeshConfig {
    /// Parse the policy-relevant part of a `mesh.yaml` (Istio MeshConfig field names:
    /// `rootNamespace`, `trustDomain`, `trustDomainAliases`,
    /// `pathNormalization.normalization`, `extensionProviders[].name`). Other keys belong to
    /// other components and are ignored.
    pub fn from_yaml(text: &str) -> Result<MeshConfig, MeshConfigError> {
        let raw: RawMesh = if text.trim().is_empty() {
            RawMesh::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| MeshConfigError(e.to_string()))?
        };
        let mut m = MeshConfig::default();
        if let Some(r) = raw.root_namespace.filter(|s| !s.is_empty()) {
            m.root_namespace = r;
        }
        if let Some(t) = raw.trust_domain.filter(|s| !s.is_empty()) {
            m.trust_domain = t;
        }
        m.trust_domain_aliases = raw.trust_domain_aliases;
        if let Some(n) = raw.path_normalization.and_then(|p| p.normalization) {
            m.path_normalization = n;
        }
        for p in raw.extension_providers {
            if p.name.is_empty() {
                return Err(MeshConfigError(
                    "extensionProviders[].name must not be empty".into(),
                ));
            }
            m.extension_providers.push(p.name);
        }
        Ok(m)
    }

    /// The trust domain followed by its aliases (Istio's trust-domain bundle).
    pub(crate) fn trust_domains(&self) -> Vec<String> {
        let mut v = vec![self.trust_domain.clone()];
        for a in &self.trust_domain_aliases {
            if !v.contains(a) {
                v.push(a.clone());
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subset_and_ignores_others() {
        let m = MeshConfig::from_yaml(
            "trustDomain: td1\ntrustDomainAliases: [old]\nrootNamespace: mesh\npathNormalization:\n  normalization: MERGE_SLASHES\nextensionProviders:\n- name: ext\n  envoyExtAuthzHttp: {service: x, port: 9000}\ncaAddress: 127.0.0.1:15012\n",
        )
        .unwrap();
        assert_eq!(m.trust_domain, "td1");
        assert_eq!(m.trust_domain_aliases, vec!["old"]);
        assert_eq!(m.root_namespace, "mesh");
        assert_eq!(m.path_normalization, PathNormalization::MergeSlashes);
        assert_eq!(m.extension_providers, vec!["ext"]);
        assert_eq!(MeshConfig::from_yaml("").unwrap(), MeshConfig::default());
        let d = MeshConfig::from_yaml("pathNormalization: {normalization: DEFAULT}").unwrap();
        assert_eq!(d.path_normalization, PathNormalization::Base);
        assert!(MeshConfig::from_yaml("pathNormalization: {normalization: WEIRD}").is_err());
    }
}
