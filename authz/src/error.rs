//! Errors of the authz crate.

use std::fmt;

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

/// Why one document (or a whole file) was refused.
///
/// Displays as `file: document N: field.path: reason`; `document N` is left out when the
/// problem concerns the whole file (`doc_index == 0`, e.g. it cannot be read) and the field
/// path is left out when empty (e.g. a YAML syntax error).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Problem {
    /// File path or source name.
    pub file: String,
    /// 1-based document index; 0 = the whole file.
    pub doc_index: usize,
    /// Dotted field path, e.g. `spec.rules[0].from[0].source.principals[1]`; may be empty.
    pub field_path: String,
    /// Why it was refused (close to Istio's own wording).
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if self.doc_index > 0 {
            write!(f, ": document {}", self.doc_index)?;
        }
        if !self.field_path.is_empty() {
            write!(f, ": {}", self.field_path)?;
        }
        write!(f, ": {}", self.reason)
    }
}
