//! The `ConfigSource` seam: where the mesh model comes from.

use std::path::{Path, PathBuf};

use crate::{MeshFolder, Problem};

/// A source of mesh snapshots. Every source hands out whole snapshots, validated as one unit:
/// a snapshot is complete and consistent, or it is refused with every problem found (file
/// or object, field, reason) and nothing of it is used. What a consumer does with a refusal
/// is the same for every source: log it, count it, and keep serving its last good snapshot.
///
/// Sources are synchronous and cheap to share; a consumer decides when to ask (a folder
/// watcher on file events, a Kubernetes watch on object events, a timer).
pub trait ConfigSource: Send + Sync {
    /// Names the source in logs (`folder examples/quickstart`).
    fn describe(&self) -> String;

    /// The whole configuration as it is now, or why it is refused.
    fn snapshot(&self) -> Result<MeshFolder, Vec<Problem>>;
}

/// The mesh folder as a [`ConfigSource`]: `mesh.yaml`, `workloads.yaml` and every other
/// `*.yaml`/`*.yml` below the folder as Istio policy.
#[derive(Debug, Clone)]
pub struct FolderSource {
    dir: PathBuf,
}

impl FolderSource {
    /// A source reading `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FolderSource { dir: dir.into() }
    }

    /// The folder (what a file watcher watches).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl ConfigSource for FolderSource {
    fn describe(&self) -> String {
        format!("folder {}", self.dir.display())
    }

    fn snapshot(&self) -> Result<MeshFolder, Vec<Problem>> {
        MeshFolder::load(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MESH_FILE, WORKLOADS_FILE};

    /// Through the seam: a valid folder is one snapshot; an edit that breaks it is refused
    /// with the file and field named, and the next valid edit is a snapshot again (the
    /// consumer's last good one in between is its own business).
    #[test]
    fn folder_snapshots_and_refusals() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(MESH_FILE), "trustDomain: example.org\n").unwrap();
        let reg = "workloads:\n- {name: a, namespace: ns1, ports: [{port: 80, app: '127.0.0.1:9000', inbound: '127.0.0.1:9001'}]}\n";
        std::fs::write(d.path().join(WORKLOADS_FILE), reg).unwrap();
        let src: Box<dyn ConfigSource> = Box::new(FolderSource::new(d.path()));
        assert!(src.describe().starts_with("folder "));
        let snap = src.snapshot().unwrap();
        assert_eq!(snap.trust_domain.to_string(), "example.org");
        assert_eq!(snap.registry.workloads.len(), 1);

        std::fs::write(
            d.path().join(WORKLOADS_FILE),
            "workloads:\n- {name: a, namespace: ns1, ports: [{port: 70000}]}\n",
        )
        .unwrap();
        let problems = src.snapshot().unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.file.contains(WORKLOADS_FILE) && p.field.contains("ports[0].port")),
            "{problems:?}"
        );

        std::fs::write(d.path().join(WORKLOADS_FILE), reg).unwrap();
        assert!(src.snapshot().is_ok());
    }
}
