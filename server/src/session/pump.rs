//! The tasks that move bytes between an agent and its session.
//!
//! - the output pump reads stdout, frames it, appends it to the journal and publishes it;
//! - the stdin writer batches client lines into as few writes as possible;
//! - the stderr reader keeps the agent's diagnostics for humans.

use std::sync::Arc;

use bytes::BytesMut;
use moorline_adapters::pipeline::Resolution;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedMutexGuard, mpsc};

use tokio_util::sync::CancellationToken;

use super::Session;
use crate::agentio::{AgentIo, Input, OutputSink, Refused, write_pending};
use crate::journal::{JournalTail, JournalWriter};
use crate::metrics::Metrics;
use crate::runtime::keeper::user_marker;
use crate::runtime::{AgentControl, Bell, ExitFuture, ExitInfo, JournalFeed, Reader, Writer};

/// Upper bound on one batched write to an agent's stdin.
const STDIN_BATCH: usize = 256 * 1024;

/// Everything the output pump needs.
pub(super) struct OutputPump {
    pub(super) session: Arc<Session>,
    pub(super) generation: u64,
    /// The session's journal writer (`Some` when the server writes the journal itself). Held for
    /// the whole run, so two runs of a session never write at once.
    pub(super) writer: OwnedMutexGuard<Option<JournalWriter>>,
    pub(super) metrics: Arc<Metrics>,
    /// Cancelled when the server shuts down: a durable agent is left running.
    pub(super) cancel: CancellationToken,
    /// Lines published during this run, to tell a start failure from a crash.
    pub(super) lines: u64,
    /// At most how many published lines a run can have without its agent having written
    /// anything (the adapter's own greetings); `None` for an adopted run, whose start was
    /// seen by another server.
    pub(super) greeting_lines: Option<u64>,
}

/// Most bytes one poll of a followed journal publishes at once.
const FOLLOW_BATCH: usize = 1 << 20;

impl OutputPump {
    /// Follows a journal that the runtime's keeper writes, until the agent exits (or the server
    /// shuts down, leaving the agent running).
    pub(super) async fn follow(
        mut self,
        feed: JournalFeed,
        mut exit: ExitFuture,
        mut tail: JournalTail,
    ) {
        let JournalFeed {
            mut doorbell,
            mut resolutions,
            ..
        } = feed;
        let mut exit_info = None;
        let mut open = true;
        let mut settled_open = true;
        loop {
            tail = match self.drain_tail(tail).await {
                Some(t) => t,
                None => break,
            };
            if let Some(info) = exit_info {
                if self.cancel.is_cancelled() {
                    // A stopping server hangs up on the keeper, which then closes its end: that
                    // is no exit. The next server adopts the agent, or reads how it ended.
                    tracing::debug!(session = %self.session.id, "server stopping; the keeper stays");
                    return;
                }
                self.finish(info).await;
                return;
            }
            tokio::select! {
                ring = doorbell.recv(), if open => match ring {
                    None => open = false,
                    Some(Bell::Grew) => {}
                    Some(Bell::Held) => self.session.output_held(true, &self.metrics),
                    Some(Bell::Flowing) => self.session.output_held(false, &self.metrics),
                    Some(Bell::Lost(lines)) => self.session.output_lost(lines, &self.metrics),
                    Some(Bell::Pending) => self.session.pending_file_changed(),
                },
                settled = resolutions.recv(), if settled_open => match settled {
                    Some(r) => self.session.audit_approval(&r),
                    None => settled_open = false,
                },
                info = &mut exit => exit_info = Some(info),
                () = self.cancel.cancelled() => {
                    tracing::debug!(session = %self.session.id, "server stopping; the agent keeps running");
                    return;
                }
            }
        }
        // Reading the journal failed: the session can no longer be followed.
        let info = match exit_info {
            Some(info) => info,
            None => exit.await,
        };
        self.finish(info).await;
    }

    /// Publishes everything the keeper has appended. `None` if the journal cannot be read.
    async fn drain_tail(&mut self, mut tail: JournalTail) -> Option<JournalTail> {
        loop {
            let polled = tokio::task::spawn_blocking(move || {
                let r = tail.poll(FOLLOW_BATCH);
                (tail, r)
            })
            .await;
            let Ok((t, result)) = polled else {
                return None;
            };
            tail = t;
            match result {
                Ok((lines, changes)) => {
                    if lines.is_empty() && changes.is_empty() {
                        return Some(tail);
                    }
                    let n = lines.len() as u64;
                    self.lines += n;
                    self.metrics.lines_out.inc_by(n);
                    self.metrics
                        .bytes_out
                        .inc_by(lines.iter().map(|l| l.len() as u64 + 1).sum());
                    self.session.saw_output(lines.iter().map(|l| l.as_ref()));
                    self.session.hub.publish(lines, &changes);
                    self.session.note_activity();
                }
                Err(e) => {
                    tracing::error!(session = %self.session.id, error = %e, "cannot read the session journal");
                    return None;
                }
            }
        }
    }

    /// Runs the agent's stdio through its pipeline until it has exited (the `process`
    /// runtime: the server owns the pipes).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn pipe(
        mut self,
        io: AgentIo,
        stdout: Reader,
        input: mpsc::Receiver<Input>,
        stdin: Writer,
        exit: ExitFuture,
        control: Arc<dyn AgentControl>,
    ) {
        let mut sink = ServerSink {
            session: self.session.clone(),
            writer: &mut self.writer,
            metrics: self.metrics.clone(),
            lines: 0,
        };
        let (exit, totals) = io
            .run(stdout, input, stdin, exit, control.clone(), &mut sink)
            .await;
        self.lines += sink.lines;
        // Processes the agent left running in its group must not outlive the run.
        let _ = control.kill();
        if totals.dropped > 0 {
            tracing::debug!(session = %self.session.id, dropped = totals.dropped, "lines dropped");
        }
        self.finish(exit).await;
    }

    /// Reports the end of the run.
    async fn finish(self, exit: ExitInfo) {
        // A run that ends while its output is held does not leave the flag behind.
        self.session.output_held(false, &self.metrics);
        let kind = if exit.is_success() {
            "exited"
        } else {
            "crashed"
        };
        self.metrics
            .agent_exits
            .get_or_create(&[("kind", kind)])
            .inc();
        tracing::info!(session = %self.session.id, %exit, last_seq = self.session.hub.last_seq(), "agent finished");
        let generation = self.generation;
        let session = self.session.clone();
        let silent = self.greeting_lines.is_some_and(|n| self.lines <= n);
        drop(self);
        session.on_exit(generation, exit, silent).await;
    }
}

/// The server's end of an [`AgentIo`]: the journal, then the hub.
struct ServerSink<'a> {
    session: Arc<Session>,
    writer: &'a mut OwnedMutexGuard<Option<JournalWriter>>,
    metrics: Arc<Metrics>,
    lines: u64,
}

impl OutputSink for ServerSink<'_> {
    fn commit(&mut self, batch: BytesMut, ends: &[(usize, usize)]) -> Result<(), Refused> {
        let written = match self.writer.as_mut() {
            Some(w) => w.append(&batch, ends.len() as u64),
            None => Ok(Vec::new()),
        };
        let changes = match written {
            Ok(changes) => changes,
            // Lines the journal could not keep get no sequence numbers and reach nobody yet:
            // the loop holds them and offers them again.
            Err(error) => return Err(Refused { batch, error }),
        };
        self.lines += ends.len() as u64;
        self.metrics.lines_out.inc_by(ends.len() as u64);
        self.metrics.bytes_out.inc_by(batch.len() as u64);
        let bytes = batch.freeze();
        self.session
            .saw_output(ends.iter().map(|&(s, e)| &bytes[s..e]));
        self.session
            .hub
            .publish(ends.iter().map(|&(s, e)| bytes.slice(s..e)), &changes);
        self.session.note_activity();
        Ok(())
    }

    fn held(&mut self, error: Option<&std::io::Error>) {
        if let Some(e) = error {
            tracing::error!(session = %self.session.id, error = %e, "cannot write the output journal; the agent's output is held until it can");
        }
        self.session.output_held(error.is_some(), &self.metrics);
    }

    fn lost(&mut self, lines: u64) {
        self.session.output_lost(lines, &self.metrics);
    }

    fn pending_changed(&mut self, pending: &[serde_json::Value]) {
        write_pending(&self.session.dir.join(super::store::PENDING_FILE), pending);
        self.session.pending_now(pending);
    }

    fn auth_failed(&mut self) {
        tracing::warn!(session = %self.session.id, instance = %self.session.instance_id, "the agent reports that its credentials are missing or wrong");
        crate::agentio::mark_auth_failed(&self.session.dir.join(super::store::PENDING_FILE));
    }

    fn line_dropped(&mut self, reason: crate::framing::DropReason) {
        self.metrics
            .lines_dropped
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    fn resolved(&mut self, resolution: Resolution) {
        self.session.audit_approval(&resolution);
    }
}

impl Session {
    /// Writes the audit line of a settled approval request of this session.
    fn audit_approval(&self, resolution: &Resolution) {
        crate::audit::approval(&self.id, &self.instance_id, resolution);
        self.publish_resolved(resolution);
    }
}

/// Writes client lines to a keeper's socket, batching whatever has queued up. With
/// `user_markers`, a marker line naming the sender goes before the first line of each
/// different sender, so the keeper knows who answered an approval.
///
/// A write error (the agent exited: EPIPE) ends the writer; lines still queued are dropped and
/// senders see a closed channel. It never takes anything else down.
pub(super) async fn stdin_writer(
    session: String,
    mut rx: mpsc::Receiver<Input>,
    mut stdin: Writer,
    cancel: CancellationToken,
    user_markers: bool,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
    // The sender the keeper last heard of on this connection.
    let mut last_user: Option<std::sync::Arc<str>> = None;
    let mut add = |buf: &mut Vec<u8>, input: Input| {
        if user_markers
            && let Some(user) = input.user
            && last_user.as_ref() != Some(&user)
        {
            buf.extend_from_slice(&user_marker(&user));
            last_user = Some(user);
        }
        buf.extend_from_slice(&input.line);
        buf.push(b'\n');
    };
    loop {
        let first = tokio::select! {
            line = rx.recv() => match line {
                Some(line) => line,
                None => break,
            },
            // The server is stopping; a durable agent keeps running without us.
            () = cancel.cancelled() => return,
        };
        buf.clear();
        add(&mut buf, first);
        while buf.len() < STDIN_BATCH {
            match rx.try_recv() {
                Ok(line) => add(&mut buf, line),
                Err(_) => break,
            }
        }
        let written = async {
            stdin.write_all(&buf).await?;
            stdin.flush().await
        };
        if let Err(e) = written.await {
            tracing::debug!(session = %session, error = %e, "agent stdin closed");
            return;
        }
    }
    let _ = stdin.shutdown().await;
}

/// Keeps the agent's stderr: a capped file on disk (read back for error reports) and debug logs.
pub(super) async fn stderr_reader(session: Arc<Session>, mut stderr: Reader, file_cap: u64) {
    use std::io::Write;
    let path = session.dir.join(super::store::STDERR_FILE);
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
        tracing::debug!(session = %session.id, stderr = %String::from_utf8_lossy(chunk).trim_end(), "agent stderr");
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
