//! `rampart secrets`.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub(crate) struct SecretsArgs {}

impl SecretsArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        Err(super::bad_input("secrets: not built yet"))
    }
}
