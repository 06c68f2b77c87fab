//! Runtimes: where and how an agent process runs.
//!
//! Session logic talks to agents only through the [`Runtime`] trait: it asks for a process with
//! a [`SpawnSpec`] and gets back an [`Agent`]: pipes for stdin and stdout, an exit future and a
//! handle to signal it. Whether the agent is a plain child, a container, or something a human can
//! attach to is the runtime's business.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};

pub mod process;

use crate::config::{Config, InstanceConfig, RuntimeKind};

/// The runtimes available on this machine, and which one each instance gets.
#[derive(Debug)]
pub struct Runtimes {
    process: Arc<dyn Runtime>,
}

impl Runtimes {
    /// Sets up the runtimes the configuration can use.
    pub fn new(_config: &Config) -> Self {
        Self {
            process: Arc::new(process::ProcessRuntime),
        }
    }

    /// The runtime for one instance.
    pub fn for_instance(&self, instance: &InstanceConfig) -> Arc<dyn Runtime> {
        match instance.runtime {
            RuntimeKind::Auto | RuntimeKind::Process => self.process.clone(),
        }
    }
}

/// Everything a runtime needs to start one agent.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// The session the agent belongs to.
    pub session_id: String,
    /// Program to run (absolute, or looked up in `PATH`).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Environment to set on top of the runtime's base environment.
    pub env: BTreeMap<String, String>,
    /// Working directory (exists; checked by the session layer).
    pub cwd: PathBuf,
    /// The session's private directory (state, logs).
    pub session_dir: PathBuf,
}

/// How an agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExitInfo {
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Number of the signal that killed it, if one did.
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// A clean exit: code 0.
    pub fn is_success(&self) -> bool {
        self.code == Some(0)
    }

    /// The signal's name (`SIGKILL`), as amarre reports it.
    pub fn signal_name(&self) -> Option<String> {
        let sig = self.signal?;
        Some(match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => s.as_str().to_owned(),
            Err(_) => format!("SIG{sig}"),
        })
    }
}

impl From<std::process::ExitStatus> for ExitInfo {
    fn from(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Self {
            code: status.code(),
            signal: status.signal(),
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal_name()) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(sig)) => write!(f, "killed by {sig}"),
            (None, None) => f.write_str("unknown exit"),
        }
    }
}

/// Boxed pipe ends, so runtimes can hand over whatever they use.
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// See [`Reader`].
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;
/// Resolves once the agent's main process has exited.
pub type ExitFuture = Pin<Box<dyn Future<Output = ExitInfo> + Send>>;

/// A started agent.
pub struct Agent {
    /// Its process id, where it has one the server can see.
    pub pid: Option<u32>,
    /// Lines for the agent.
    pub stdin: Writer,
    /// The agent's JSONL output.
    pub stdout: Reader,
    /// Its diagnostics, if the runtime passes them on.
    pub stderr: Option<Reader>,
    /// Resolves when it exits.
    pub exit: ExitFuture,
    /// Signals it.
    pub control: Arc<dyn AgentControl>,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("pid", &self.pid)
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

/// Stops an agent and everything it started.
pub trait AgentControl: Send + Sync + fmt::Debug {
    /// Asks the agent and its children to exit (SIGTERM to the whole group).
    fn terminate(&self) -> io::Result<()>;
    /// Kills the agent and its children (SIGKILL to the whole group).
    fn kill(&self) -> io::Result<()>;
}

/// Errors starting an agent.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// What was run.
        program: String,
        /// Why it failed.
        source: io::Error,
    },
}

/// A place agents run.
#[async_trait]
pub trait Runtime: Send + Sync + fmt::Debug {
    /// Short name reported to users (`process`, ...).
    fn name(&self) -> &'static str;

    /// Starts an agent.
    async fn spawn(&self, spec: SpawnSpec) -> Result<Agent, RuntimeError>;
}
