//! Errors of configuration loading: which file, which key, what is wrong.

use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration problem, displayed as `file: key: problem`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file that was read.
    pub file: PathBuf,
    /// The dotted key path (`cluster.nodes[1]`), empty when the problem is the whole file.
    pub key: String,
    /// What is wrong, in words.
    pub problem: String,
}

impl ConfigError {
    /// Builds an error for `file`.
    pub fn new(file: &Path, key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            key: key.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.problem)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.problem)
        }
    }
}

/// A validation problem of one field, before the file name is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The key path relative to the section that was validated.
    pub key: String,
    /// What is wrong, in words.
    pub problem: String,
}

impl FieldError {
    /// Builds a field error.
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// Prefixes the key with the name of the enclosing section.
    #[must_use]
    pub fn within(mut self, section: &str) -> Self {
        self.key = if self.key.is_empty() {
            section.to_owned()
        } else if self.key.starts_with('[') {
            format!("{section}{}", self.key)
        } else {
            format!("{section}.{}", self.key)
        };
        self
    }
}
