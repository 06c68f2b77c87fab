//! Why a session operation failed.

use std::io;
use std::path::PathBuf;

use moorline_adapters::AdapterError;

use crate::credentials::CredentialsError;
use crate::runtime::RuntimeError;

/// Why a session operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No session with that id.
    #[error("no such session")]
    NotFound,
    /// No instance with that id.
    #[error("unknown instance {id:?} (instances: {})", known.join(", "))]
    UnknownInstance {
        /// What was asked for.
        id: String,
        /// The instances that exist (those the client may use).
        known: Vec<String>,
    },
    /// The instance's credentials file is missing, unreadable or malformed.
    #[error("instance {instance:?}: {source}")]
    Credentials {
        /// The instance.
        instance: String,
        /// What is wrong with the file.
        source: CredentialsError,
    },
    /// `max_sessions` agents already run.
    #[error("{limit} sessions are already running")]
    MaxSessions {
        /// The limit.
        limit: usize,
    },
    /// Restart of a session whose agent runs.
    #[error("the session is already running")]
    AlreadyRunning,
    /// Restart of a session whose instance is no longer configured.
    #[error("instance {0:?} is no longer configured")]
    InstanceGone(String),
    /// A client asked for an environment variable it may not set.
    #[error("env {key}: {reason}")]
    EnvNotAllowed {
        /// The variable.
        key: String,
        /// Why not.
        reason: String,
    },
    /// The working directory is unusable.
    #[error("cwd {path}: {reason}")]
    InvalidCwd {
        /// What was asked for.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The adapter refused the launch.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The runtime could not start the agent.
    #[error(transparent)]
    Spawn(#[from] RuntimeError),
    /// Another server runs on the same state directory.
    #[error(
        "another moorline server is using the state directory {0} (two servers on one state directory would corrupt each other's sessions)"
    )]
    StateDirInUse(PathBuf),
    /// The session's project or worktree.
    #[error(transparent)]
    Project(#[from] crate::projects::ProjectError),
    /// The state directory is unusable.
    #[error("state directory: {0}")]
    Io(#[from] io::Error),
}
