//! `rampart validate`: check Istio security policy YAML the way Istio would admit it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rampart_authz::{LoadResult, load_paths};
use rampart_mesh::{MeshFolder, WORKLOADS_FILE};

#[derive(Debug, clap::Args)]
pub(crate) struct ValidateArgs {
    /// Files or folders (folders are searched recursively for .yaml/.yml files). A folder
    /// holding `workloads.yaml` is a mesh folder (what `rampart up` runs): its `mesh.yaml`
    /// and workload registry are checked too, not mistaken for policy.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Do not print warnings (accepted input that Istio also warns about).
    #[arg(long)]
    no_warnings: bool,
}

impl ValidateArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        let (mesh_folders, policy_paths): (Vec<PathBuf>, Vec<PathBuf>) =
            self.paths.into_iter().partition(|p| is_mesh_folder(p));
        let mut failed = false;
        for dir in &mesh_folders {
            failed |= !check_mesh_folder(dir, !self.no_warnings);
        }
        if policy_paths.is_empty() {
            return Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            });
        }
        let result = load_paths(&policy_paths);
        if !self.no_warnings {
            for w in &result.warnings {
                eprintln!("warning: {w}");
            }
        }
        if result.problems.is_empty() {
            println!("{}", summary(&result));
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        } else {
            for p in &result.problems {
                println!("{p}");
            }
            eprintln!(
                "{} problem(s); {} resource(s) valid",
                result.problems.len(),
                result.resources.len()
            );
            Ok(ExitCode::from(1))
        }
    }
}

fn is_mesh_folder(path: &Path) -> bool {
    path.is_dir() && path.join(WORKLOADS_FILE).is_file()
}

/// Check a whole mesh folder (mesh.yaml, workloads.yaml, policy) as `rampart up` and the
/// proxies load it; print one line per problem, or a summary. True when valid.
///
/// Warnings (on stderr) include what only the folder as a whole shows: a CUSTOM provider
/// missing from mesh.yaml or unusable. They do not fail the check: the proxies serve such a
/// folder, denying the requests the affected rules match (fail closed), as Istio does.
fn check_mesh_folder(dir: &Path, warnings: bool) -> bool {
    match MeshFolder::load(dir) {
        Ok(m) => {
            if warnings {
                for w in rampart::mesh_warnings::mesh_warnings(&m) {
                    eprintln!("warning: {}: {w}", dir.display());
                }
            }
            println!(
                "valid mesh folder {}: {} workload(s), {} policy resource(s), trust domain {}",
                dir.display(),
                m.registry.workloads.len(),
                m.resources.len(),
                m.trust_domain
            );
            true
        }
        Err(problems) => {
            for p in &problems {
                println!("{}: {p}", dir.display());
            }
            eprintln!("{}: {} problem(s)", dir.display(), problems.len());
            false
        }
    }
}

/// One line: what loaded, from how many files.
fn summary(result: &LoadResult) -> String {
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &result.resources {
        *by_kind.entry(r.kind().as_str()).or_default() += 1;
    }
    let kinds = if by_kind.is_empty() {
        "no security.istio.io resources".to_string()
    } else {
        by_kind
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let files = match result.files {
        1 => "1 file".to_string(),
        n => format!("{n} files"),
    };
    let mut line = format!("valid: {kinds} in {files}");
    if !result.skipped.is_empty() {
        line.push_str(&format!(
            " ({} other document(s) skipped)",
            result.skipped.len()
        ));
    }
    line
}
