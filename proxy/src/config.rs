//! The configuration in force: one mesh snapshot and what is compiled from it for this
//! proxy's workload. Built purely from the snapshot ([`Config::build`] does no I/O: the
//! files a snapshot refers to were read with it), replaced whole on every accepted update.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::header;
use rampart_authz::{EffectiveMtls, Engine, JwksCache, Kind as ResourceKind, Workload};
use rampart_certs::{SpiffeId, TrustDomainPolicy};
use rampart_mesh::{MeshFolder, PortProtocol, Problem, WorkloadEntry};

use crate::jwks_http::RemoteSettings;

/// The configuration handle every task reads (`load()` per connection or request).
pub(crate) type Handle = Arc<ArcSwap<Config>>;

/// The configuration in force: the snapshot and what is compiled from it.
pub(crate) struct Config {
    pub(crate) folder: MeshFolder,
    pub(crate) engine: Engine,
    /// Key sets of the `jwksUri`s read from local files, read with the snapshot.
    pub(crate) jwks: JwksCache,
    /// The `jwksUri`s read from local files (the rest are fetched; see `crate::jwks`).
    pub(crate) jwks_local: BTreeSet<String>,
    /// Remote JWKS settings (`rampart.jwksRefresh`, `rampart.jwksCaFile`).
    pub(crate) jwks_remote: RemoteSettings,
    pub(crate) me: WorkloadEntry,
    pub(crate) workload: Workload,
    /// Every `outputPayloadToHeader`/`outputClaimToHeaders` header of the
    /// RequestAuthentications applying to this workload (stripped from incoming requests).
    pub(crate) jwt_output_headers: Vec<header::HeaderName>,
    /// No AuthorizationPolicy nor RequestAuthentication can apply: requests skip the engine.
    pub(crate) fast_path: bool,
    /// A CUSTOM AuthorizationPolicy applies: requests are shown to it before authentication.
    pub(crate) has_custom: bool,
    pub(crate) loaded_at: SystemTime,
}

impl Config {
    /// Compile `folder` for workload `key` (`namespace/name`), or refuse it with every
    /// problem named.
    pub(crate) fn build(folder: MeshFolder, key: &str) -> Result<Config, Vec<Problem>> {
        let (ns, name) = key.split_once('/').unwrap_or(("", key));
        let Some(me) = folder.registry.get(ns, name).cloned() else {
            return Err(vec![Problem {
                file: rampart_mesh::WORKLOADS_FILE.into(),
                field: "workloads".into(),
                reason: format!("workload {key} (this proxy's) is not declared"),
            }]);
        };
        let engine = Engine::new(folder.resources.iter().cloned(), folder.mesh.clone());
        // Local JWKS come with the snapshot; remote ones are fetched by the JWKS task into
        // its own state, which outlives configurations.
        let jwks_remote = RemoteSettings::load(&folder).map_err(|p| vec![p])?;
        let jwks_local: BTreeSet<String> = folder.files.jwks.keys().cloned().collect();
        let mut jwks = JwksCache::new(Duration::from_secs(1200), Duration::from_secs(5));
        let now = SystemTime::now();
        for (uri, doc) in &folder.files.jwks {
            jwks.record(uri, doc.clone(), now);
        }
        let workload = me.authz_workload();
        let has_reqauthn = folder.resources.iter().any(|r| {
            r.kind() == ResourceKind::RequestAuthentication
                && (r.metadata().namespace() == me.namespace
                    || r.metadata().namespace() == folder.mesh.root_namespace)
        });
        let fast_path = !has_reqauthn && engine.policies_for(&workload).is_empty();
        let has_custom = engine.has_custom(&workload);
        let jwt_output_headers = engine
            .jwt_output_headers(&workload)
            .iter()
            .filter_map(|h| header::HeaderName::from_bytes(h.as_bytes()).ok())
            .collect();
        for w in engine.warnings() {
            tracing::warn!(warning = %w, "policy translation");
        }
        Ok(Config {
            folder,
            engine,
            jwks,
            jwks_local,
            jwks_remote,
            me,
            workload,
            jwt_output_headers,
            fast_path,
            has_custom,
            loaded_at: SystemTime::now(),
        })
    }

    /// The trust domains peers may come from (the local one and its aliases).
    pub(crate) fn trust_policy(&self) -> TrustDomainPolicy {
        TrustDomainPolicy::with_aliases(
            self.folder.trust_domain.clone(),
            self.folder.trust_domain_aliases.clone(),
        )
    }

    /// This workload's SPIFFE ID.
    pub(crate) fn my_id(&self) -> SpiffeId {
        self.me.spiffe_id(&self.folder.trust_domain)
    }

    /// The effective mode of each port (for `/config_dump` and `/mtls`).
    pub(crate) fn port_modes(&self) -> Vec<(u16, PortProtocol, EffectiveMtls)> {
        self.me
            .ports
            .iter()
            .map(|p| {
                (
                    p.port,
                    p.protocol,
                    self.engine.peer_authentication(&self.workload, p.port),
                )
            })
            .collect()
    }

    /// The registry workload whose identity is `principal`: (name, namespace), empty when
    /// unknown (for metric labels).
    pub(crate) fn workload_of(&self, principal: &str) -> (String, String) {
        let Some((ns, sa)) = SpiffeId::parse(principal).ok().and_then(|id| {
            id.istio_parts()
                .map(|(ns, sa)| (ns.to_string(), sa.to_string()))
        }) else {
            return (String::new(), String::new());
        };
        let w = self
            .folder
            .registry
            .workloads
            .iter()
            .find(|w| w.namespace == ns && w.service_account == sa);
        (w.map(|w| w.name.clone()).unwrap_or_default(), ns)
    }
}
