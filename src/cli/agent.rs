//! `rampart agent`.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub(crate) struct AgentArgs {}

impl AgentArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        Err(super::bad_input("agent: not built yet"))
    }
}
