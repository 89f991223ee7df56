//! Command-line wiring. Each subcommand lives in its own module and owns its arguments.

mod admin_http;
mod agent;
mod app_guard;
mod authz;
mod bench;
mod ca;
mod ca_load;
mod certs;
mod echo;
mod inject;
mod mtls_report;
mod probe;
mod process;
mod proxy;
mod secrets;
mod token;
mod up;
mod validate;
mod webhook;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Rampart: Istio's security half (CA, SDS node agent, authn/authz, mTLS proxy) in Rust.
#[derive(Debug, Parser)]
#[command(name = "rampart", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// Log more (repeat for more detail). `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Root and intermediate CA material and test leaves (like Istio's tools/certs).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Workload tokens (JWT) for standalone CA callers, and their JWKS.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Run the CA (Istio's CreateCertificate API).
    Ca(ca::CaArgs),
    /// Run the node agent (SDS and SPIFFE Workload API).
    Agent(Box<agent::AgentArgs>),
    /// Run the mTLS proxy for one workload of a mesh folder.
    Proxy(proxy::ProxyArgs),
    /// Show what a node agent serves over SDS (like `istioctl proxy-config secret`).
    Secrets(secrets::SecretsArgs),
    /// Validate Istio security policy YAML files or folders.
    Validate(validate::ValidateArgs),
    /// Explain authorization decisions for a hypothetical request.
    #[command(subcommand)]
    Authz(authz::AuthzCommand),
    /// Run the whole mesh of a folder locally: CA, node agents, proxies and apps.
    Up(up::UpArgs),
    /// A tiny HTTP/1.1 + h2c + TCP echo app that answers with the request it saw.
    Echo(echo::EchoArgs),
    /// Per workload and port: plaintext vs mTLS traffic, and whether STRICT is safe.
    #[command(after_help = mtls_report::AFTER_HELP)]
    MtlsReport(mtls_report::MtlsReportArgs),
    /// Add the sidecar (node agent and proxy) to Kubernetes manifests (like `istioctl
    /// kube-inject`).
    Inject(inject::InjectArgs),
    /// HTTP GET that exits 0 on a 2xx answer (exec probes of loopback endpoints).
    Probe(probe::ProbeArgs),
    /// Load generators for what wrk cannot drive (mTLS handshakes).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// How `rampart up` runs an app that is not `rampart` (stops it when `up` is gone).
    #[command(hide = true)]
    AppGuard(app_guard::AppGuardArgs),
}

impl Command {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Command::Certs(cmd) => cmd.run(),
            Command::Token(cmd) => cmd.run(),
            Command::Ca(cmd) => cmd.run(),
            Command::Agent(cmd) => (*cmd).run(),
            Command::Proxy(cmd) => cmd.run(),
            Command::Secrets(cmd) => cmd.run(),
            Command::Validate(cmd) => cmd.run(),
            Command::Authz(cmd) => cmd.run(),
            Command::Up(cmd) => cmd.run(),
            Command::Echo(cmd) => cmd.run(),
            Command::MtlsReport(cmd) => cmd.run(),
            Command::Inject(cmd) => cmd.run(),
            Command::Probe(cmd) => cmd.run(),
            Command::Bench(cmd) => cmd.run(),
            Command::AppGuard(cmd) => cmd.run(),
        }
    }
}

/// `--compliance-policy` (env `COMPLIANCE_POLICY`, as Istio's) for the commands that run TLS
/// endpoints: `ca`, `agent`, `proxy`, `up`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ComplianceArgs {
    /// TLS key-exchange policy, as Istio's COMPLIANCE_POLICY: `pqc` offers and accepts only
    /// X25519MLKEM768 and refuses classical-only peers. Default: X25519MLKEM768 preferred,
    /// X25519, P-256 and P-384 accepted.
    #[arg(
        long = "compliance-policy",
        env = "COMPLIANCE_POLICY",
        value_name = "POLICY",
        default_value = "",
        hide_default_value = true,
        value_parser = rampart_certs::tls::CompliancePolicy::parse
    )]
    pub(crate) policy: rampart_certs::tls::CompliancePolicy,
}

impl ComplianceArgs {
    /// Make the policy this process's, before any TLS configuration is built.
    pub(crate) fn apply(&self) {
        rampart_certs::tls::set_compliance_policy(self.policy);
    }
}

/// An error caused by what the user gave us (bad flag value, bad file): exit code 2.
#[derive(Debug)]
pub(crate) struct BadInput(pub(crate) String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// Build a [`BadInput`] error (exit code 2) from a one-line reason.
pub(crate) fn bad_input(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(BadInput(msg.into()))
}

pub(crate) fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only for a person at a terminal: logs written to files (as `rampart up` does
    // for its children) stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}
