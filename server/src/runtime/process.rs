//! The `process` runtime: the agent is a direct child of the server, in its own process group.
//!
//! This is the simplest runtime and the fastest to start. It offers no isolation and its agents
//! end with the server (which stops them on its way out, and kills what a crashed server left
//! behind when it starts again). Its stdio is piped straight into the server: the same stdio
//! loop a keeper runs ([`AgentIo`]) frames stdout into the session's journal, then hands the
//! lines to the session; stderr is kept in the session's `stderr.log`.
//!
//! The design card suggested tokio-process-stream's chunk stream here. It is not used: that
//! stream reads 4 KiB chunks (a 64 KiB line takes 16 wake-ups and copies), and it reports the exit
//! status only after both pipes close, so an agent whose grandchild keeps stdout open would never
//! be seen to exit. Owning the [`tokio::process::Child`] directly lets the session wait on the
//! exit and on the pipes separately.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::BytesMut;
use moorline_adapters::pipeline::{Pipeline, Resolution};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::{
    Adoption, Agent, AgentRun, Delivery, ExitInfo, Found, RunEnd, RunIo, Runtime, RuntimeError,
    SpawnSpec,
};
use crate::config::find_program;
use crate::keeper::agentio::{
    AgentIo, AgentPipes, OutputSink, Reader, Refused, mark_auth_failed, restore_history,
    widen_pipes, write_pending,
};
use crate::keeper::framing::DropReason;
use crate::keeper::group::{GroupControl, kill_orphan};
use crate::keeper::identity::ThreadIdentity;
use crate::keeper::journal::{JournalIndex, JournalWriter};
use crate::keeper::layout::SessionDir;

/// Cap on the stderr file kept per session.
const STDERR_FILE_CAP: u64 = 8 << 20;

/// Runs agents as child processes.
#[derive(Debug, Default)]
pub(crate) struct ProcessRuntime {
    /// What agents get of the server's environment (`runtime.pass_env`), as in containers.
    base_env: BTreeMap<String, String>,
}

impl ProcessRuntime {
    /// A runtime whose agents start from `base_env`, never the server's whole environment
    /// (which may hold the server's own secrets).
    pub(crate) fn new(base_env: BTreeMap<String, String>) -> Self {
        Self { base_env }
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    fn agent_home(&self, _session_dir: &SessionDir) -> Option<PathBuf> {
        self.base_env.get("HOME").map(PathBuf::from)
    }

    async fn spawn(&self, spec: SpawnSpec) -> Result<Agent, RuntimeError> {
        let spawn_error = |source: io::Error| RuntimeError::spawn(&spec.program, source);
        let prepared = prepare_run(&spec).map_err(spawn_error)?;
        // The child starts in the directory opened here, not in whatever the path names when
        // it gets there. The fd stays open until the child has started.
        let workspace = spec.workspace.open().map_err(|e| {
            spawn_error(io::Error::new(
                e.kind(),
                format!("working directory {}: {e}", spec.workspace.path().display()),
            ))
        })?;
        // By its full path, found in the agent's PATH, as execvp would: then the standard
        // library can start it with posix_spawn. A program not found is left to fail the same
        // way as before (NotFound).
        let path = spec
            .env
            .get("PATH")
            .or_else(|| self.base_env.get("PATH"))
            .map(String::as_str);
        let program = find_program(&spec.program, path).unwrap_or_else(|| spec.program.clone());
        let mut command = Command::new(&program);
        command
            // The name it was given, as before (a multi-call program reads it).
            .arg0(&spec.program)
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
        let mut child = spawn_as(command, spec.user)
            .await
            .map_err(|e| match spec.user {
                // The agent runs as another user, who must reach the program through every
                // directory above it: say so, or "Permission denied" reads like a broken binary.
                Some((uid, _)) if e.kind() == io::ErrorKind::PermissionDenied => {
                    spawn_error(io::Error::new(
                        e.kind(),
                        format!(
                            "{e}; the agent runs as uid {uid}, which needs search permission on \
                         every directory above the program and read+execute on the program"
                        ),
                    ))
                }
                _ => spawn_error(e),
            })?;
        drop(workspace);
        let pid = child.id();
        let (Some(stdin), Some(stdout), stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(spawn_error(io::Error::other("child has no stdio pipes")));
        };
        {
            use std::os::fd::AsFd;
            if !widen_pipes(&[stdin.as_fd(), stdout.as_fd()], spec.pipe_bytes) {
                tracing::debug!(
                    bytes = spec.pipe_bytes,
                    "the kernel refused the agent's pipe size"
                );
            }
        }
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
        let pipes = AgentPipes {
            stdout: Box::new(stdout),
            stdin: Box::new(stdin),
            exit,
            control: control.clone(),
        };
        let stderr = stderr.map(|s| Box::new(s) as Reader);
        Ok(Agent {
            pid,
            control,
            run: prepared.attach(pipes, stderr),
        })
    }

    /// The agent did not survive the server that started it; whatever of its group a crashed
    /// server left running is killed.
    async fn adopt(&self, found: &Found) -> Adoption {
        if let Some((pid, start)) = found.pid
            && kill_orphan(pid, start)
        {
            tracing::warn!(session = %found.session_id, pid, "killed an agent left running by a previous server");
        }
        Adoption::Exited(ExitInfo::UNKNOWN)
    }
}

/// Starts `command` as `user` (uid, gid; no supplementary groups), or as the server.
///
/// Not with `Command::uid`, which forks the server: the thread that starts the agent takes on
/// its user for the moment of `posix_spawn` ([`ThreadIdentity`]). That thread is one of the
/// blocking pool's, so no async worker stops while the kernel starts the program (which
/// waits until the child has called `exec`).
async fn spawn_as(mut command: Command, user: Option<(u32, u32)>) -> io::Result<Child> {
    tokio::task::spawn_blocking(move || {
        let _as = user
            .map(|(uid, gid)| ThreadIdentity::assume(uid, gid))
            .transpose()?;
        command.spawn()
    })
    .await
    .map_err(io::Error::other)?
}

/// The run of an agent whose pipes the server holds: its stdio loop in the server, writing the
/// session's journal.
pub(crate) fn prepare_run(spec: &SpawnSpec) -> io::Result<PreparedRun> {
    // The server writes this journal; opening it also cuts a torn last line.
    let (journal, index) = JournalWriter::open(&spec.session_dir.journal(), spec.journal)?;
    let adapter = moorline_adapters::build(&spec.adapter).map_err(io::Error::other)?;
    let mut pipeline = Pipeline::new(
        adapter.translator(),
        adapter.dialect(),
        spec.approvals.clone(),
    )
    .for_instance(&spec.instance_id);
    restore_history(
        &mut pipeline,
        &spec.session_dir.journal(),
        &spec.adapter.continuation,
    );
    let io = AgentIo::new(spec.max_line, pipeline, spec.exit_drain)
        .hold_after_exit(spec.hold_after_exit);
    Ok(PreparedRun {
        session_id: spec.session_id.clone(),
        dir: spec.session_dir.clone(),
        io,
        journal,
        index,
    })
}

/// A run whose journal is open and whose pipeline is built, waiting for its agent's pipes.
pub(crate) struct PreparedRun {
    session_id: String,
    dir: SessionDir,
    io: AgentIo,
    journal: JournalWriter,
    index: JournalIndex,
}

impl PreparedRun {
    /// The run of the agent with these pipes.
    pub(crate) fn attach(self, pipes: AgentPipes, stderr: Option<Reader>) -> Box<dyn AgentRun> {
        Box::new(ProcessRun {
            session_id: self.session_id,
            dir: self.dir,
            io: self.io,
            pipes,
            stderr,
            journal: self.journal,
            index: self.index,
        })
    }
}

/// One run of a child process: its stdio loop, writing the session's journal.
struct ProcessRun {
    session_id: String,
    dir: SessionDir,
    io: AgentIo,
    pipes: AgentPipes,
    stderr: Option<Reader>,
    journal: JournalWriter,
    index: JournalIndex,
}

#[async_trait]
impl AgentRun for ProcessRun {
    async fn run(self: Box<Self>, io: RunIo<'_>) -> RunEnd {
        let Self {
            session_id,
            dir,
            io: agent_io,
            pipes,
            stderr,
            journal,
            index,
        } = *self;
        let RunIo {
            input,
            output,
            shutdown,
            stop_grace,
        } = io;
        output.journal_opened(index);
        if let Some(stderr) = stderr {
            tokio::spawn(keep_stderr(
                session_id.clone(),
                dir.stderr(),
                stderr,
                STDERR_FILE_CAP,
            ));
        }
        let control = pipes.control.clone();
        let done = CancellationToken::new();
        let mut sink = ProcessSink {
            session_id,
            dir,
            journal,
            output,
            unpublished: Vec::new(),
            changes: Vec::new(),
        };
        // The agent's stdin stays open until it is stopped, so a shutdown is a SIGTERM, never
        // an end of input the agent might take for a normal end.
        let run = async {
            let ended = agent_io.run(pipes, input, &mut sink).await;
            done.cancel();
            ended
        };
        let stop = async {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = done.cancelled() => return false,
            }
            super::stop_agent(control.as_ref(), stop_grace, done.cancelled()).await;
            true
        };
        let ((exit, totals), by_shutdown) = tokio::join!(run, stop);
        // Processes the agent left running in its group must not outlive the run.
        let _ = control.kill();
        if totals.dropped > 0 {
            tracing::debug!(session = %sink.session_id, dropped = totals.dropped, "lines dropped");
        }
        RunEnd::Exited { exit, by_shutdown }
    }
}

/// The process runtime's end of an [`AgentIo`]: the journal, then the session.
struct ProcessSink<'a> {
    session_id: String,
    dir: SessionDir,
    journal: JournalWriter,
    output: &'a mut dyn Delivery,
    /// Lines in the journal, published at the next flush.
    unpublished: Vec<bytes::Bytes>,
    /// The index changes of their appends.
    changes: Vec<crate::keeper::journal::IndexChange>,
}

impl OutputSink for ProcessSink<'_> {
    fn commit(&mut self, batch: BytesMut, ends: &[(usize, usize)]) -> Result<(), Refused> {
        let changes = match self.journal.append(&batch, ends.len() as u64) {
            Ok(changes) => changes,
            // Lines the journal could not keep get no sequence numbers and reach nobody yet:
            // the loop holds them and offers them again.
            Err(error) => return Err(Refused { batch, error }),
        };
        let bytes = batch.freeze();
        self.unpublished
            .extend(ends.iter().map(|&(s, e)| bytes.slice(s..e)));
        self.changes.extend(changes);
        Ok(())
    }

    fn flush(&mut self) {
        // After the pending approvals and the authentication failure are on disk: a client
        // that sees a line may ask for the summary those files feed.
        if !self.unpublished.is_empty() || !self.changes.is_empty() {
            let lines = std::mem::take(&mut self.unpublished);
            self.output.publish(lines, &self.changes);
            self.changes.clear();
        }
    }

    fn held(&mut self, error: Option<&io::Error>) {
        if let Some(e) = error {
            tracing::error!(session = %self.session_id, error = %e, "cannot write the output journal; the agent's output is held until it can");
        }
        self.output.held(error.is_some());
    }

    fn lost(&mut self, lines: u64) {
        self.output.lost(lines);
    }

    fn pending_changed(&mut self, pending: &[serde_json::Value]) {
        write_pending(&self.dir.pending(), pending);
        self.output.pending_changed();
    }

    fn auth_failed(&mut self) {
        tracing::warn!(session = %self.session_id, "the agent reports that its credentials are missing or wrong");
        mark_auth_failed(&self.dir.auth_failed());
    }

    fn conversation(&mut self, news: moorline_adapters::conversation::ConversationNews) {
        crate::keeper::agentio::record_conversation_news(&self.dir.conversation(), news);
    }

    fn line_dropped(&mut self, reason: DropReason) {
        self.output.line_dropped(reason);
    }

    fn resolved(&mut self, resolution: Resolution) {
        self.output.resolved(&resolution);
    }
}

/// Keeps the agent's stderr: a capped file on disk (read back for error reports) and debug logs.
async fn keep_stderr(session: String, path: PathBuf, mut stderr: Reader, file_cap: u64) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .ok();
    let mut written = file
        .as_ref()
        .and_then(|f| f.metadata().ok())
        .map_or(0, |m| m.len());
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        tracing::debug!(session = %session, stderr = %String::from_utf8_lossy(chunk).trim_end(), "agent stderr");
        if let Some(f) = file.as_mut()
            && written < file_cap
        {
            let take = chunk.len().min((file_cap - written) as usize);
            if f.write_all(&chunk[..take]).is_err() {
                file = None;
            }
            written += take as u64;
        }
    }
}
