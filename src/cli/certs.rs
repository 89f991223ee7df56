//! `rampart certs`: root, intermediate and leaf material.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum CertsCommand {
    /// Write a self-signed root CA (`root-cert.pem`, `root-key.pem`).
    Root,
}

impl CertsCommand {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        Err(super::bad_input("certs: not built yet"))
    }
}
