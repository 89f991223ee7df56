//! `rampart validate`.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub(crate) struct ValidateArgs {}

impl ValidateArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        Err(super::bad_input("validate: not built yet"))
    }
}
