//! `rampart authz`.

use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum AuthzCommand {
    /// Not built yet.
    Pending,
}

impl AuthzCommand {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        Err(super::bad_input("authz: not built yet"))
    }
}
