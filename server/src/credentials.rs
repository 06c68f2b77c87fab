//! Credentials files: the `KEY=VALUE` secrets (API keys) an instance gives its agents.
//!
//! They are read with the dotenv rules people already write them in (`export KEY=…`, single
//! and double quotes, `#` comments, blank lines), through `dotenvy`. Errors name the file and
//! the line number, never a value: the file holds secrets, and errors reach logs and clients.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Why a credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file is missing or unreadable.
    #[error("credentials file {}: {reason}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        reason: String,
    },
    /// A line is not `KEY=VALUE` in dotenv syntax.
    #[error(
        "credentials file {}: line {line} is not KEY=VALUE (dotenv syntax: `export` \
         is optional, values may be quoted, # starts a comment)", path.display()
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The line, counted from 1.
        line: usize,
    },
}

impl CredentialsError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            CredentialsError::Unreadable { path, .. }
            | CredentialsError::Malformed { path, .. } => path,
        }
    }
}

/// Reads a credentials file. `$NAME` in unquoted and double-quoted values is expanded (from
/// earlier lines, then the server's environment), as dotenv does; single quotes keep a value
/// literally.
pub(crate) fn read(path: &Path) -> Result<BTreeMap<String, String>, CredentialsError> {
    let unreadable = |reason: String| CredentialsError::Unreadable {
        path: path.to_owned(),
        reason,
    };
    // Read first: a missing file is told apart from a bad line, and the line number of a bad
    // line is looked up in this text.
    let text = std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))?;
    let mut vars = BTreeMap::new();
    for item in dotenvy::from_read_iter(text.as_bytes()) {
        match item {
            Ok((key, value)) => {
                vars.insert(key, value);
            }
            Err(dotenvy::Error::LineParse(bad, _)) => {
                return Err(CredentialsError::Malformed {
                    path: path.to_owned(),
                    line: line_number(&text, &bad),
                });
            }
            // Only I/O errors remain, and the text is in memory; say so without details.
            Err(_) => return Err(unreadable("cannot be parsed".into())),
        }
    }
    Ok(vars)
}

/// The line (from 1) where the logical line `bad` that dotenvy refused starts.
fn line_number(text: &str, bad: &str) -> usize {
    let first = bad.lines().next().unwrap_or("").trim();
    text.lines()
        .position(|l| !first.is_empty() && l.trim() == first)
        .or_else(|| {
            text.lines()
                .position(|l| !first.is_empty() && l.contains(first))
        })
        .map_or(0, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<BTreeMap<String, String>, CredentialsError> {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("c.env");
        std::fs::write(&path, text).expect("write");
        read(&path)
    }

    #[test]
    fn dotenv_rules() {
        let vars = parse(
            "# a comment\n\nexport ANTHROPIC_API_KEY=sk-1\nA='single $X'\nB=\"double\" # note\nC=plain\n",
        )
        .expect("parses");
        assert_eq!(vars["ANTHROPIC_API_KEY"], "sk-1");
        assert_eq!(vars["A"], "single $X");
        assert_eq!(vars["B"], "double");
        assert_eq!(vars["C"], "plain");
        assert_eq!(vars.len(), 4);
    }

    #[test]
    fn malformed_lines_are_named_by_number_without_their_value() {
        let e = parse("A=1\n\nthis-is-secret-and-not-an-assignment\n").expect_err("bad");
        assert!(
            matches!(e, CredentialsError::Malformed { line: 3, .. }),
            "{e:?}"
        );
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = parse("A=1\nB='unterminated\n").expect_err("bad");
        assert!(
            matches!(e, CredentialsError::Malformed { line: 2, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn a_missing_file_is_unreadable() {
        let e = read(Path::new("/nonexistent/c.env")).expect_err("missing");
        assert!(matches!(e, CredentialsError::Unreadable { .. }));
        assert!(e.to_string().contains("/nonexistent/c.env"), "{e}");
    }
}
