//! `rampart`: one binary for the CA, the node agent, the proxy and the people who run them.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_tracing(args.verbose);
    match args.command.run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("rampart: error: {err:#}");
            if err.is::<cli::BadInput>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
