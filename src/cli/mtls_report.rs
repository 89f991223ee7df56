//! `rampart mtls-report`.
use std::process::ExitCode;
pub(crate) const AFTER_HELP: &str = "";
#[derive(Debug, clap::Args)]
pub(crate) struct MtlsReportArgs {}
impl MtlsReportArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        Err(super::bad_input("not built yet"))
    }
}
