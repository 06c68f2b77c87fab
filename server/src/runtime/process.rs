//! The `process` runtime: the agent is a direct child of the server, in its own process group.
//!
//! This is the simplest runtime and the fastest to start. It offers no isolation and its agents
//! end with the server. Its stdio is piped straight into the server: stdout carries JSONL, stderr
//! is logged.
//!
//! The design card suggested tokio-process-stream's chunk stream here. It is not used: that
//! stream reads 4 KiB chunks (a 64 KiB line takes 16 wake-ups and copies), and it reports the exit
//! status only after both pipes close, so an agent whose grandchild keeps stdout open would never
//! be seen to exit. Owning the [`tokio::process::Child`] directly lets the session wait on the
//! exit and on the pipes separately.

use std::collections::BTreeMap;
use std::io;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Command;

use super::{Agent, AgentControl, ExitInfo, Runtime, RuntimeError, SpawnSpec};

/// Runs agents as child processes.
#[derive(Debug, Default)]
pub struct ProcessRuntime {
    /// What agents get of the server's environment (`runtime.pass_env`), as in containers.
    base_env: BTreeMap<String, String>,
}

impl ProcessRuntime {
    /// A runtime whose agents start from `base_env`, never the server's whole environment
    /// (which may hold the server's own secrets).
    pub fn new(base_env: BTreeMap<String, String>) -> Self {
        Self { base_env }
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn spawn(&self, spec: SpawnSpec) -> Result<Agent, RuntimeError> {
        let spawn_error = |source: io::Error| RuntimeError::Spawn {
            program: spec.program.display().to_string(),
            source,
        };
        // The child starts in the directory opened here, not in whatever the path names when
        // it gets there. The fd stays open until the child has started.
        let workspace = spec.workspace.open().map_err(|e| {
            spawn_error(io::Error::new(
                e.kind(),
                format!("working directory {}: {e}", spec.workspace.path().display()),
            ))
        })?;
        let mut command = Command::new(&spec.program);
        if let Some((uid, gid)) = spec.user {
            // std drops the supplementary groups too.
            command.uid(uid).gid(gid);
        }
        command
            .args(&spec.args)
            .env_clear()
            .envs(&self.base_env)
            .envs(&spec.env)
            .current_dir(super::workspace::fd_path(&workspace))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so stopping it reaches the tools it started too.
            .process_group(0)
            // A safety net only: sessions stop agents explicitly with TERM, grace, KILL.
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(spawn_error)?;
        drop(workspace);
        let pid = child.id();
        let (Some(stdin), Some(stdout), stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(RuntimeError::Spawn {
                program: spec.program.display().to_string(),
                source: io::Error::other("child has no stdio pipes"),
            });
        };
        let control = Arc::new(GroupControl::new(pid));
        let exit_control = control.clone();
        let exit = Box::pin(async move {
            let info = match child.wait().await {
                Ok(status) => ExitInfo::from(status),
                Err(_) => ExitInfo::UNKNOWN,
            };
            // The leader is reaped; only signal the group while it may still have members.
            exit_control.leader_exited();
            info
        });
        Ok(Agent {
            pid,
            stdin: Box::new(stdin),
            output: super::Output::Pipe(Box::new(stdout)),
            stderr: stderr.map(|s| Box::new(s) as super::Reader),
            exit,
            control,
        })
    }
}

/// Signals a process group.
#[derive(Debug)]
pub(crate) struct GroupControl {
    pgid: Option<Pid>,
    /// Set once the group is known to be empty, so a recycled id is never signalled.
    gone: AtomicBool,
}

impl GroupControl {
    /// Control of the group led by `pid`.
    pub(crate) fn new(pid: Option<u32>) -> Self {
        Self {
            pgid: pid.and_then(|p| i32::try_from(p).ok()).map(Pid::from_raw),
            gone: AtomicBool::new(false),
        }
    }

    /// Call once the leader is reaped.
    pub(crate) fn leader_exited(&self) {
        // Other members (the agent's tools) may still run; the group id stays reserved while
        // they do. If none are left, killpg fails with ESRCH, which we treat as "gone".
        if let Some(pgid) = self.pgid
            && killpg(pgid, None).is_err()
        {
            self.gone.store(true, Ordering::SeqCst);
        }
    }

    fn signal(&self, sig: Signal) -> io::Result<()> {
        let Some(pgid) = self.pgid else {
            return Ok(());
        };
        if self.gone.load(Ordering::SeqCst) {
            return Ok(());
        }
        tracing::debug!(
            pgid = pgid.as_raw(),
            signal = sig.as_str(),
            "signalling the agent's process group"
        );
        match killpg(pgid, sig) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::ESRCH) => {
                self.gone.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => Err(io::Error::from(e)),
        }
    }
}

impl AgentControl for GroupControl {
    fn terminate(&self) -> io::Result<()> {
        self.signal(Signal::SIGTERM)
    }

    fn kill(&self) -> io::Result<()> {
        self.signal(Signal::SIGKILL)
    }
}
