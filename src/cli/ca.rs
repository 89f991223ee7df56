//! `rampart ca`.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub(crate) struct CaArgs {}

impl CaArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        Err(super::bad_input("ca: not built yet"))
    }
}
