//! Errors of the authz crate.

use crate::load::Problem;

/// What can go wrong in this crate outside per-document problems (which the loader reports as
/// [`Problem`]s and never as errors).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration failed to load cleanly; every problem is listed.
    #[error("{} problem(s) in configuration: {}", .0.len(), first_problem(.0))]
    InvalidConfig(Vec<Problem>),
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path that could not be read.
        path: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn first_problem(problems: &[Problem]) -> String {
    match problems {
        [] => String::new(),
        [one] => one.to_string(),
        [first, ..] => format!("{first} (and more)"),
    }
}
