//! The `git` binary, run for moorline: worktrees, status and diffs are what people trust git
//! itself for, so moorline never writes git's files itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::config::HelperEnv;

/// A git command that failed.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// `git` could not be run at all.
    #[error("cannot run git: {0}")]
    Spawn(#[source] std::io::Error),
    /// git ran and refused; `stderr` is what it said.
    #[error("git {args}: {stderr}")]
    Failed {
        /// The arguments, for the message.
        args: String,
        /// git's own explanation.
        stderr: String,
    },
}

/// Runs git commands in one repository or worktree, as the owner of what it works on.
#[derive(Debug, Clone)]
pub(crate) struct Git {
    dir: PathBuf,
    /// Who git runs as (uid, gid): the owner of the repository, so what git creates is theirs
    /// and git trusts the repository (`safe.directory`). `None`: as the server.
    user: Option<(u32, u32)>,
    /// The server's `PATH`, the one thing of its environment git gets.
    env: Arc<HelperEnv>,
}

impl Git {
    /// Git in `dir`, run as `user`.
    pub(crate) fn new(
        dir: impl Into<PathBuf>,
        user: Option<(u32, u32)>,
        env: Arc<HelperEnv>,
    ) -> Self {
        Self {
            dir: dir.into(),
            user,
            env,
        }
    }

    /// Git in `dir`, run as the owner of `dir` when the server is root.
    pub(crate) fn as_owner(dir: &Path, env: Arc<HelperEnv>) -> Result<Self, GitError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir).map_err(GitError::Spawn)?;
        let user = nix::unistd::geteuid()
            .is_root()
            .then_some((meta.uid(), meta.gid()))
            .filter(|&(uid, _)| uid != 0);
        Ok(Self::new(dir, user, env))
    }

    /// Runs `git <args>` and returns its standard output.
    pub(crate) fn run(&self, args: &[&str]) -> Result<String, GitError> {
        self.run_with(args, &[0])
    }

    /// Runs `git <args>`; an exit code in `ok` is success (`git diff --no-index` exits 1 when
    /// the files differ).
    fn run_with(&self, args: &[&str], ok: &[i32]) -> Result<String, GitError> {
        let mut cmd = Command::new("git");
        cmd.arg("-C")
            .arg(&self.dir)
            .args(args)
            // Nothing from the server's environment or a global configuration decides what
            // these commands do, and git never asks a question.
            .env_clear()
            .env("PATH", self.env.path.as_deref().unwrap_or_default())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("HOME", "/nonexistent")
            .env("LC_ALL", "C");
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().map_err(GitError::Spawn)?;
        if !out.status.code().is_some_and(|c| ok.contains(&c)) {
            return Err(GitError::Failed {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The top of the working tree `dir` is in.
    pub(crate) fn toplevel(&self) -> Result<PathBuf, GitError> {
        Ok(PathBuf::from(
            self.run(&["rev-parse", "--show-toplevel"])?.trim(),
        ))
    }

    /// The repository's common directory (`.git` of the main working tree), absolute.
    pub(crate) fn common_dir(&self) -> Result<PathBuf, GitError> {
        Ok(PathBuf::from(
            self.run(&["rev-parse", "--path-format=absolute", "--git-common-dir"])?
                .trim(),
        ))
    }

    /// The branch checked out, if any.
    pub(crate) fn current_branch(&self) -> Result<Option<String>, GitError> {
        let name = self.run(&["branch", "--show-current"])?.trim().to_owned();
        Ok((!name.is_empty()).then_some(name))
    }

    /// Whether `branch` names a local branch.
    pub(crate) fn has_branch(&self, branch: &str) -> bool {
        self.run(&[
            "show-ref",
            "--verify",
            "--quiet",
            &format!("refs/heads/{branch}"),
        ])
        .is_ok()
    }

    /// Whether `name` is a branch name git accepts.
    pub(crate) fn valid_branch_name(&self, name: &str) -> bool {
        !name.starts_with('-') && self.run(&["check-ref-format", "--branch", name]).is_ok()
    }

    /// Adds a worktree at `path` on `branch`: a new branch from `base`, or (`base` `None`) an
    /// existing one, which git refuses when it is checked out elsewhere.
    pub(crate) fn worktree_add(
        &self,
        path: &Path,
        branch: &str,
        base: Option<&str>,
    ) -> Result<(), GitError> {
        let path = path.to_string_lossy();
        match base {
            Some(base) => self.run(&["worktree", "add", "-b", branch, "--", &path, base]),
            None => self.run(&["worktree", "add", "--", &path, branch]),
        }
        .map(drop)
    }

    /// Removes the worktree at `path` (`force`: even with changes), and prunes git's record.
    pub(crate) fn worktree_remove(&self, path: &Path, force: bool) -> Result<(), GitError> {
        let path = path.to_string_lossy();
        let mut args = vec!["worktree", "remove"];
        if force {
            args.extend(["--force", "--force"]);
        }
        args.extend(["--", &path]);
        self.run(&args)?;
        self.run(&["worktree", "prune"]).map(drop)
    }

    /// Uncommitted changes (`git status --porcelain`), one per line; empty when clean.
    pub(crate) fn status(&self) -> Result<Vec<String>, GitError> {
        Ok(self
            .run(&["status", "--porcelain", "--untracked-files=all"])?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// How many commits `HEAD` has that `base` does not.
    pub(crate) fn ahead_of(&self, base: &str) -> Result<u64, GitError> {
        let range = format!("{base}..HEAD");
        Ok(self
            .run(&["rev-list", "--count", &range])?
            .trim()
            .parse()
            .unwrap_or(0))
    }

    /// The diff of the working tree against `base` (committed and uncommitted changes), or
    /// (`base` `None`) of the uncommitted changes against `HEAD`. Untracked files are shown
    /// as added (`git add --intent-to-add` is not used: nothing is written to the index).
    pub(crate) fn diff(&self, base: Option<&str>) -> Result<String, GitError> {
        let mut diff = match base {
            Some(base) => {
                let merge_base = self.run(&["merge-base", base, "HEAD"])?;
                self.run(&["diff", "--no-color", "--no-ext-diff", merge_base.trim()])?
            }
            None => self.run(&["diff", "--no-color", "--no-ext-diff", "HEAD"])?,
        };
        for file in self
            .run(&["ls-files", "--others", "--exclude-standard", "-z"])?
            .split('\0')
            .filter(|f| !f.is_empty())
        {
            diff.push_str(&self.run_with(
                &["diff", "--no-color", "--no-index", "--", "/dev/null", file],
                &[0, 1],
            )?);
        }
        Ok(diff)
    }
}

/// Clones `url` into `path` (which must not exist) as `owner` (who owns the directory it
/// goes in), so git trusts and owns everything it makes. Credentials (if any) come from
/// `credentials`, a git credential store file of the server's, copied for the clone's
/// duration into a private file of the owner's that is removed right after. Only `https`,
/// `http`, `ssh`, `git` and `file` transports are allowed.
pub(crate) fn clone_into(
    url: &str,
    path: &Path,
    credentials: Option<&Path>,
    owner: Option<(u32, u32)>,
    env: &Arc<HelperEnv>,
) -> Result<(), GitError> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let mut args: Vec<String> = vec![
        // No helper from anywhere else: the server's credentials only.
        "-c".into(),
        "credential.helper=".into(),
        "-c".into(),
        "protocol.allow=never".into(),
    ];
    for transport in ["https", "http", "ssh", "git", "file"] {
        args.extend(["-c".into(), format!("protocol.{transport}.allow=always")]);
    }
    let copy = match credentials {
        Some(file) => Some(private_copy(file, owner, &env.temp_dir).map_err(GitError::Spawn)?),
        None => None,
    };
    if let Some(copy) = &copy {
        args.extend([
            "-c".into(),
            format!("credential.helper=store --file={}", copy.display()),
        ]);
    }
    args.extend([
        "clone".into(),
        "--quiet".into(),
        "--".into(),
        url.into(),
        path.to_string_lossy().into_owned(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cloned = Git::new(parent, owner.filter(|&(uid, _)| uid != 0), env.clone()).run(&args);
    if let Some(copy) = copy {
        let _ = std::fs::remove_file(copy);
    }
    cloned.map(drop)
}

/// A copy of the credentials file only `owner` can read, in the server's temporary directory
/// (which containers do not see).
fn private_copy(
    file: &Path,
    owner: Option<(u32, u32)>,
    temp_dir: &Path,
) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let body = std::fs::read(file)?;
    let name = crate::keeper::id::random_hex(8)?;
    let copy = temp_dir.join(format!("moorline-git-credentials-{name}"));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&copy)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&out, Some(uid), Some(gid))?;
    }
    out.write_all(&body)?;
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Git, GitError};
    use crate::config::HelperEnv;

    fn env(path: Option<String>) -> Arc<HelperEnv> {
        Arc::new(HelperEnv {
            path,
            temp_dir: "/tmp".into(),
        })
    }

    #[test]
    fn git_is_found_through_the_path_config_captured_and_nowhere_else() {
        let dir = tempfile::tempdir().expect("tmp");
        let empty = tempfile::tempdir().expect("tmp");
        // The test process has git on its PATH; a configured PATH without it must not find it.
        let lost = Git::new(
            dir.path(),
            None,
            env(Some(empty.path().display().to_string())),
        )
        .run(&["--version"])
        .expect_err("no git on that PATH");
        assert!(matches!(lost, GitError::Spawn(_)), "{lost}");
        let path = std::env::var("PATH").expect("PATH");
        let found = Git::new(dir.path(), None, env(Some(path)))
            .run(&["--version"])
            .expect("git on the server's PATH");
        assert!(found.starts_with("git version"), "{found}");
    }
}
