//! Projects: git repositories moorline manages, and a git worktree per session.
//!
//! A project is an existing repository inside a workspace root of its instance, registered
//! with `POST /projects`. A session created in a project works in a worktree of its own, on a
//! new branch (or one the client names, never one checked out elsewhere), created with the real
//! `git` ([`git`]) before the agent starts and removed when the session is deleted, unless it
//! holds work that is not merged anywhere else (kept and reported; a forced delete removes it
//! anyway). It knows nothing of sessions or HTTP; its request
//! and answer bodies are the wire's ([`crate::wire`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

pub(crate) mod files;
pub(crate) mod git;

use crate::config::HelperEnv;
use git::{Git, GitError};

pub(crate) use crate::wire::{NewProject, Project};

/// A session's worktree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Worktree {
    /// The project it belongs to.
    pub project: String,
    /// Its branch.
    pub branch: String,
    /// The branch it started from (what `ahead` and the diff compare with).
    pub base: String,
    /// Its directory.
    pub path: PathBuf,
    /// The repository's common git directory, which git inside the worktree needs too.
    pub git_dir: PathBuf,
}

/// Whether a worktree holds work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TreeState {
    /// Uncommitted changes (untracked files included).
    pub dirty: bool,
    /// Commits on its branch that its base does not have.
    pub ahead: u64,
}

/// What became of a worktree when its session was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Removal {
    /// Removed (its branch too, when it held nothing the base lacks).
    Removed,
    /// Kept, with why: it holds uncommitted or unmerged work.
    Kept(String),
}

/// Why a project operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// No project has this id.
    #[error("no project {0:?}")]
    NotFound(String),
    /// A project with this id exists.
    #[error("a project {0:?} exists")]
    Exists(String),
    /// The request is not acceptable: `field` says which part.
    #[error("{field}: {message}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// The branch is checked out in another worktree.
    #[error("branch {0:?} is checked out elsewhere")]
    BranchInUse(String),
    /// git failed.
    #[error(transparent)]
    Git(#[from] GitError),
    /// The project list could not be read or written.
    #[error("projects file: {0}")]
    Io(#[from] std::io::Error),
}

/// The registered projects, kept in a file of the state directory.
#[derive(Debug)]
pub(crate) struct Projects {
    file: PathBuf,
    /// The server's git credential store, for clones.
    credentials: Option<PathBuf>,
    /// What git gets of the server's environment.
    env: Arc<HelperEnv>,
    map: Mutex<IndexMap<String, Project>>,
}

impl Projects {
    /// The projects recorded in `file` (none if it does not exist); clones read
    /// `credentials`; git runs with `env`.
    pub(crate) fn open(
        file: PathBuf,
        credentials: Option<PathBuf>,
        env: HelperEnv,
    ) -> Result<Self, ProjectError> {
        let map = match std::fs::read(&file) {
            Ok(body) => serde_json::from_slice::<Vec<Project>>(&body)
                .map_err(|e| ProjectError::Io(std::io::Error::other(e)))?
                .into_iter()
                .map(|p| (p.id.clone(), p))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => IndexMap::new(),
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            file,
            credentials,
            env: Arc::new(env),
            map: Mutex::new(map),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IndexMap<String, Project>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, map: &IndexMap<String, Project>) -> Result<(), ProjectError> {
        let list: Vec<&Project> = map.values().collect();
        let body = serde_json::to_vec_pretty(&list).map_err(std::io::Error::other)?;
        crate::keeper::fsio::write_private(&self.file, &body)?;
        Ok(())
    }

    /// Every project, in the order they were added.
    pub(crate) fn list(&self) -> Vec<Project> {
        self.lock().values().cloned().collect()
    }

    /// The project `id`.
    pub(crate) fn get(&self, id: &str) -> Result<Project, ProjectError> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| ProjectError::NotFound(id.to_owned()))
    }

    /// Registers an existing repository, which must lie (with its worktrees) inside one of
    /// `roots`.
    pub(crate) fn add(&self, req: NewProject, roots: &[PathBuf]) -> Result<Project, ProjectError> {
        let invalid = |field, message: String| ProjectError::Invalid { field, message };
        if !req.path.is_absolute() {
            return Err(invalid("path", "must be an absolute path".into()));
        }
        let roots: Vec<PathBuf> = roots
            .iter()
            .filter_map(|r| std::fs::canonicalize(r).ok())
            .collect();
        let cloned = match &req.url {
            Some(url) => {
                self.clone_for(url, &req.path, &roots)?;
                Some(req.path.clone())
            }
            None => None,
        };
        let registered = self.register(req, &roots);
        if let (Err(_), Some(clone)) = (&registered, cloned) {
            // A clone for a project that could not be registered is nobody's.
            let _ = std::fs::remove_dir_all(clone);
        }
        registered
    }

    /// Registers the existing repository `req.path`.
    fn register(&self, req: NewProject, roots: &[PathBuf]) -> Result<Project, ProjectError> {
        let invalid = |field, message: String| ProjectError::Invalid { field, message };
        let path = std::fs::canonicalize(&req.path)
            .map_err(|e| invalid("path", format!("{}: {e}", req.path.display())))?;
        if !roots.iter().any(|r| path.starts_with(r) && &path != r) {
            return Err(invalid(
                "path",
                "must lie inside one of the instance's workspace_roots".into(),
            ));
        }
        let git = self.git(&path)?;
        let top = git
            .toplevel()
            .map_err(|e| invalid("path", format!("not a git repository: {e}")))?;
        if top != path {
            return Err(invalid(
                "path",
                format!("not the top of a repository (that is {})", top.display()),
            ));
        }
        let default_branch = match req.default_branch {
            Some(b) if git.has_branch(&b) => b,
            Some(b) => return Err(invalid("defaultBranch", format!("no branch {b:?}"))),
            None => git.current_branch()?.ok_or_else(|| {
                invalid(
                    "defaultBranch",
                    "the repository has no branch checked out: name one".into(),
                )
            })?,
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let id = match req.id {
            Some(id) => id,
            None => name
                .to_lowercase()
                .chars()
                .map(|c| if valid_id_char(c) { c } else { '-' })
                .collect(),
        };
        if !valid_id(&id) {
            return Err(invalid(
                "id",
                "1 to 64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
                    .into(),
            ));
        }
        let worktrees_dir = match req.worktrees_dir {
            Some(dir) if dir.is_absolute() => dir,
            Some(_) => return Err(invalid("worktreesDir", "must be an absolute path".into())),
            None => path.with_file_name(format!("{name}.worktrees")),
        };
        if worktrees_dir
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
            || !roots.iter().any(|r| worktrees_dir.starts_with(r))
            || worktrees_dir.starts_with(&path)
        {
            return Err(invalid(
                "worktreesDir",
                "must lie inside the workspace roots, outside the repository, without '..'".into(),
            ));
        }
        let project = Project {
            id: id.clone(),
            path,
            default_branch,
            default_instance: req.default_instance,
            worktrees_dir,
        };
        let mut map = self.lock();
        if map.contains_key(&id) {
            return Err(ProjectError::Exists(id));
        }
        map.insert(id, project.clone());
        if let Err(e) = self.save(&map) {
            map.shift_remove(&project.id);
            return Err(e);
        }
        Ok(project)
    }

    /// Clones `url` into `path`, a new directory in an existing one inside `roots`, owned by
    /// whoever owns that directory.
    fn clone_for(&self, url: &str, path: &Path, roots: &[PathBuf]) -> Result<(), ProjectError> {
        let invalid = |field, message: String| ProjectError::Invalid { field, message };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("url", "must be a URL (https://…, ssh://…)".into()))?;
        if !["https", "http", "ssh", "git", "file"].contains(&scheme) {
            return Err(invalid(
                "url",
                format!("the {scheme}:// transport is not allowed"),
            ));
        }
        let authority = rest.split('/').next().unwrap_or("");
        if scheme != "ssh" && authority.contains('@') {
            return Err(invalid(
                "url",
                "credentials never come from clients: put them in the server's \
                 git_credentials_file"
                    .into(),
            ));
        }
        if scheme == "file" {
            // The server reads it: only what the instance's sessions could read anyway.
            let source =
                std::fs::canonicalize(rest).map_err(|e| invalid("url", format!("{rest}: {e}")))?;
            if !roots.iter().any(|r| source.starts_with(r)) {
                return Err(invalid(
                    "url",
                    "a file:// repository must lie inside the workspace roots".into(),
                ));
            }
        }
        let (Some(parent), Some(_)) = (path.parent(), path.file_name()) else {
            return Err(invalid("path", "names no directory to clone into".into()));
        };
        if path.exists() {
            return Err(invalid(
                "path",
                "exists already: a clone needs a new directory".into(),
            ));
        }
        let parent = std::fs::canonicalize(parent)
            .map_err(|e| invalid("path", format!("{}: {e}", parent.display())))?;
        if !roots.iter().any(|r| parent.starts_with(r)) {
            return Err(invalid(
                "path",
                "must lie inside one of the instance's workspace_roots".into(),
            ));
        }
        let owner = {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(&parent)?;
            nix::unistd::geteuid()
                .is_root()
                .then_some((meta.uid(), meta.gid()))
        };
        let target = parent.join(path.file_name().unwrap_or_default());
        git::clone_into(url, &target, self.credentials.as_deref(), owner, &self.env).map_err(|e| {
            // Nothing half-cloned stays behind.
            let _ = std::fs::remove_dir_all(&target);
            // git's own words only (the arguments name the credentials file).
            let why = match e {
                GitError::Failed { stderr, .. } => stderr,
                e => e.to_string(),
            };
            invalid("url", format!("cannot clone: {why}"))
        })
    }

    /// Forgets a project (its repository and worktrees stay on disk).
    pub(crate) fn remove(&self, id: &str) -> Result<Project, ProjectError> {
        let mut map = self.lock();
        let project = map
            .shift_remove(id)
            .ok_or_else(|| ProjectError::NotFound(id.to_owned()))?;
        if let Err(e) = self.save(&map) {
            map.insert(project.id.clone(), project);
            return Err(e);
        }
        Ok(project)
    }

    /// Creates the worktree of session `name`: on `branch` if the client named one (an
    /// existing branch not checked out elsewhere, or a new one from the default branch), else
    /// on a new branch `moorline/<name>`.
    pub(crate) fn create_worktree(
        &self,
        project: &Project,
        name: &str,
        branch: Option<&str>,
    ) -> Result<Worktree, ProjectError> {
        let git = self.git(&project.path)?;
        let branch = branch.map_or_else(|| format!("moorline/{name}"), str::to_owned);
        if !git.valid_branch_name(&branch) {
            return Err(ProjectError::Invalid {
                field: "branch",
                message: format!("{branch:?} is not a valid branch name"),
            });
        }
        let path = project.worktrees_dir.join(name);
        let existing = git.has_branch(&branch);
        let added = git.worktree_add(
            &path,
            &branch,
            (!existing).then_some(project.default_branch.as_str()),
        );
        if let Err(e) = added {
            return Err(match e {
                GitError::Failed { stderr, .. }
                    if stderr.contains("already checked out")
                        || stderr.contains("already used by worktree") =>
                {
                    ProjectError::BranchInUse(branch)
                }
                e => e.into(),
            });
        }
        Ok(Worktree {
            project: project.id.clone(),
            branch,
            base: project.default_branch.clone(),
            git_dir: git.common_dir()?,
            path,
        })
    }

    /// Whether the worktree holds uncommitted changes, and how far its branch is ahead of
    /// its base.
    pub(crate) fn state(&self, worktree: &Worktree) -> Result<TreeState, ProjectError> {
        let git = self.git(&worktree.path)?;
        Ok(TreeState {
            dirty: !git.status()?.is_empty(),
            ahead: git.ahead_of(&worktree.base)?,
        })
    }

    /// Removes a session's worktree unless it holds work (uncommitted changes, or commits its
    /// base does not have) and `force` is false. A removed worktree's branch goes with it when
    /// it holds nothing its base lacks.
    pub(crate) fn remove_worktree(
        &self,
        worktree: &Worktree,
        force: bool,
    ) -> Result<Removal, ProjectError> {
        if !worktree.path.exists() {
            return Ok(Removal::Removed);
        }
        let state = self.state(worktree)?;
        if !force && (state.dirty || state.ahead > 0) {
            return Ok(Removal::Kept(format!(
                "the worktree {} holds {}: kept (delete with ?force=1 to remove it)",
                worktree.path.display(),
                match (state.dirty, state.ahead) {
                    (true, 0) => "uncommitted changes".to_owned(),
                    (false, n) => format!("{n} commit(s) not on {}", worktree.base),
                    (true, n) => {
                        format!(
                            "uncommitted changes and {n} commit(s) not on {}",
                            worktree.base
                        )
                    }
                },
            )));
        }
        let main = worktree
            .git_dir
            .parent()
            .unwrap_or(&worktree.git_dir)
            .to_owned();
        let git = self.git(&main)?;
        git.worktree_remove(&worktree.path, force)?;
        if state.ahead == 0 && worktree.branch.starts_with("moorline/") {
            // Only branches moorline made, and only when nothing would be lost.
            let _ = git.run(&["branch", "-D", "--", &worktree.branch]);
        }
        Ok(Removal::Removed)
    }

    /// The worktree's changes: against its base (everything its branch and working tree add),
    /// or (`uncommitted`) only what is not committed yet.
    pub(crate) fn diff(
        &self,
        worktree: &Worktree,
        uncommitted: bool,
    ) -> Result<String, ProjectError> {
        let git = self.git(&worktree.path)?;
        Ok(git.diff((!uncommitted).then_some(worktree.base.as_str()))?)
    }

    /// Git in `dir`, as the owner of `dir`.
    fn git(&self, dir: &Path) -> Result<Git, GitError> {
        Git::as_owner(dir, self.env.clone())
    }
}

fn valid_id_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
}

/// Whether `id` can name a project.
pub(crate) fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.chars().all(valid_id_char)
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
}
