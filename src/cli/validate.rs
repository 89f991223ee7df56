//! `rampart validate`: check Istio security policy YAML the way Istio would admit it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use rampart_authz::{LoadResult, load_paths};

#[derive(Debug, clap::Args)]
pub(crate) struct ValidateArgs {
    /// Files or folders (folders are searched recursively for .yaml/.yml files).
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Do not print warnings (accepted input that Istio also warns about).
    #[arg(long)]
    no_warnings: bool,
}

impl ValidateArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        let result = load_paths(&self.paths);
        if !self.no_warnings {
            for w in &result.warnings {
                eprintln!("warning: {w}");
            }
        }
        if result.problems.is_empty() {
            println!("{}", summary(&result));
            Ok(ExitCode::SUCCESS)
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
