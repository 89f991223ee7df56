//! `rampart inject`: add the sidecar (node agent and proxy) to Kubernetes manifests, as
//! `istioctl kube-inject` does. The logic is in the library ([`rampart::inject`]).

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use rampart::inject::{DEFAULT_CA_ADDRESS, Options, inject};

/// The image both sidecars run by default: this build's version.
pub(crate) const DEFAULT_IMAGE: &str =
    concat!("ghcr.io/rampart-mesh/rampart:", env!("CARGO_PKG_VERSION"));

#[derive(Debug, clap::Args)]
pub(crate) struct InjectArgs {
    /// Manifests to inject (multi-document YAML): a file, or `-` for standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    filename: PathBuf,
    /// Write the injected manifests here instead of standard output (only if every document
    /// could be read).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Image of the agent and proxy containers (its entrypoint is `rampart`).
    #[arg(long, default_value = DEFAULT_IMAGE)]
    image: String,
    /// CA and control-plane address the sidecars dial (HOST:PORT); the agent verifies the
    /// CA's certificate for HOST. Use rampart-ca.istio-system.svc:15012 while istiod still
    /// owns the istiod Service.
    #[arg(long, value_name = "HOST:PORT", default_value = DEFAULT_CA_ADDRESS)]
    ca_address: String,
    /// Trust domain of the workload identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Print no notes (skipped documents, what the apps must do) on standard error.
    #[arg(short, long)]
    quiet: bool,
}

impl InjectArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        let input = if self.filename.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| super::bad_input(format!("reading standard input: {e}")))?;
            s
        } else {
            std::fs::read_to_string(&self.filename).map_err(|e| {
                super::bad_input(format!("--filename {}: {e}", self.filename.display()))
            })?
        };
        let opts = Options {
            image: self.image,
            ca_address: self.ca_address,
            trust_domain: self.trust_domain,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let name = if self.filename.as_os_str() == "-" {
            "<stdin>".to_owned()
        } else {
            self.filename.display().to_string()
        };
        let done = inject(&input, &opts).map_err(|e| super::bad_input(format!("{name}: {e}")))?;
        if !self.quiet {
            for n in &done.notes {
                eprintln!("note: {n}");
            }
            eprintln!("rampart inject: {} Pod template(s) injected", done.injected);
        }
        match &self.output {
            Some(path) => write_file(path, &done.output)
                .with_context(|| format!("write {}", path.display()))?,
            None => {
                let mut out = std::io::stdout().lock();
                out.write_all(done.output.as_bytes())?;
                out.flush()?;
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Written beside the target, then renamed over it: a reader never sees half a file.
fn write_file(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let file_name = path.file_name().context("not a file name")?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, text)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(())
}
