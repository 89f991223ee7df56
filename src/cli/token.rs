//! `rampart token`.

use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TokenCommand {
    /// Not built yet.
    Pending,
}

impl TokenCommand {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        Err(super::bad_input("token: not built yet"))
    }
}
