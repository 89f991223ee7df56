//! `rampart up DIR`.
use std::process::ExitCode;
#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {}
impl UpArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        Err(super::bad_input("up: not built yet"))
    }
}
