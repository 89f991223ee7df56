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
            eprintln!("rampart: error: {}", describe(&err));
            if err.is::<cli::BadInput>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes, each said once: a cause whose text its parent's message already
/// shows (a message written as `"listen on {addr}: {source}"`) is not repeated.
fn describe(err: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut parent = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !out.is_empty() {
            if parent.contains(&text) {
                parent = text;
                continue;
            }
            out.push_str(": ");
        }
        out.push_str(&text);
        parent = text;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn causes_the_message_already_shows_are_not_repeated() {
        /// As thiserror writes `#[error("listen on {addr}: {source}")]`.
        #[derive(Debug)]
        struct Listen(std::io::Error);
        impl std::fmt::Display for Listen {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "listen on 127.0.0.1:1: {}", self.0)
            }
        }
        impl std::error::Error for Listen {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let os = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let e = anyhow::Error::new(Listen(os)).context("starting the CA");
        let text = describe(&e);
        assert_eq!(text.matches("address in use").count(), 1, "{text}");
        assert!(
            text.starts_with("starting the CA: listen on 127.0.0.1:1: "),
            "{text}"
        );
        // Causes the parent does not show are kept.
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe(&e), "outer: inner");
    }
}
