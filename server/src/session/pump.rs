//! The tasks that move bytes between an agent and its session.
//!
//! - the output pump reads stdout, frames it, appends it to the journal and publishes it;
//! - the stdin writer batches client lines into as few writes as possible;
//! - the stderr reader keeps the agent's diagnostics for humans.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedMutexGuard, mpsc};
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use super::Session;
use crate::framing::{Frame, LineFramer, dropped_frame};
use crate::journal::{JournalTail, JournalWriter};
use crate::metrics::Metrics;
use crate::runtime::{AgentControl, ExitFuture, ExitInfo, Reader, Writer};

/// Size of one read from an agent's stdout.
const READ_CHUNK: usize = 256 * 1024;
/// Batches of framed lines are carved out of blocks this large, so a busy session does not
/// allocate (and page-fault) a fresh buffer for every read.
const ARENA_BLOCK: usize = 1 << 20;
/// Upper bound on one batched write to an agent's stdin.
const STDIN_BATCH: usize = 256 * 1024;

/// Everything the output pump needs.
pub(super) struct OutputPump {
    pub(super) session: Arc<Session>,
    pub(super) generation: u64,
    /// The session's journal writer (`Some` when the server writes the journal itself). Held for
    /// the whole run, so two runs of a session never write at once.
    pub(super) writer: OwnedMutexGuard<Option<JournalWriter>>,
    pub(super) max_line: usize,
    pub(super) exit_drain: Duration,
    pub(super) metrics: Arc<Metrics>,
    /// Cancelled when the server shuts down: a durable agent is left running.
    pub(super) cancel: CancellationToken,
    /// Lines published during this run, to tell a start failure from a crash.
    pub(super) lines: u64,
    /// Where batches are built; each batch is split off and shared with the hub.
    pub(super) arena: BytesMut,
}

/// Most bytes one poll of a followed journal publishes at once.
const FOLLOW_BATCH: usize = 1 << 20;

impl OutputPump {
    /// Follows a journal that the runtime's keeper writes, until the agent exits (or the server
    /// shuts down, leaving the agent running).
    pub(super) async fn follow(
        mut self,
        mut doorbell: mpsc::Receiver<()>,
        mut exit: ExitFuture,
        mut tail: JournalTail,
    ) {
        let mut exit_info = None;
        let mut open = true;
        loop {
            tail = match self.drain_tail(tail).await {
                Some(t) => t,
                None => break,
            };
            if let Some(info) = exit_info {
                self.finish(info).await;
                return;
            }
            tokio::select! {
                ring = doorbell.recv(), if open => open = ring.is_some(),
                info = &mut exit => exit_info = Some(info),
                () = self.cancel.cancelled() => {
                    tracing::debug!(session = %self.session.id, "server stopping; the agent keeps running");
                    return;
                }
            }
        }
        // Reading the journal failed: the session can no longer be followed.
        let info = exit.await;
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
                    self.session.hub.publish(lines, &changes);
                }
                Err(e) => {
                    tracing::error!(session = %self.session.id, error = %e, "cannot read the session journal");
                    return None;
                }
            }
        }
    }

    /// Runs until the agent has exited and its output is fully published.
    ///
    /// Exit and end-of-output are awaited separately: a tool the agent started may keep stdout
    /// open after the agent exits. Such leftovers get `exit_drain` to finish, then the agent's
    /// process group is killed, then output is given up on after another `exit_drain`.
    pub(super) async fn pipe(
        mut self,
        mut stdout: Reader,
        mut exit: ExitFuture,
        control: Arc<dyn AgentControl>,
    ) {
        let mut framer = LineFramer::new(self.max_line);
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut stdout_open = true;
        let mut exit_info: Option<ExitInfo> = None;
        let mut deadline: Option<Instant> = None;
        let mut killed_leftovers = false;
        while stdout_open || exit_info.is_none() {
            tokio::select! {
                biased;
                read = stdout.read_buf(&mut buf), if stdout_open => match read {
                    Ok(0) => stdout_open = false,
                    Ok(_) => {
                        self.process(&mut framer, &buf);
                        buf.clear();
                        if buf.capacity() < READ_CHUNK {
                            buf.reserve(READ_CHUNK);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(session = %self.session.id, error = %e, "reading agent output failed");
                        stdout_open = false;
                    }
                },
                info = &mut exit, if exit_info.is_none() => {
                    exit_info = Some(info);
                    deadline = Some(Instant::now() + self.exit_drain);
                }
                () = sleep_until(deadline), if stdout_open && deadline.is_some() => {
                    if killed_leftovers {
                        tracing::warn!(session = %self.session.id, "agent output still open after its process group was killed; giving up on it");
                        stdout_open = false;
                    } else {
                        tracing::info!(session = %self.session.id, "agent exited but left processes holding its output; killing them");
                        let _ = control.kill();
                        killed_leftovers = true;
                        deadline = Some(Instant::now() + self.exit_drain);
                    }
                }
            }
        }
        // Processes the agent left running in its group must not outlive the session.
        let _ = control.kill();
        let mut last = BytesMut::new();
        let mut ends = Vec::new();
        framer.finish(&mut |f| push_frame(&mut last, &mut ends, &self.metrics, f));
        self.commit(last, &ends);
        let exit = exit_info.unwrap_or(ExitInfo {
            code: None,
            signal: None,
        });
        self.finish(exit).await;
    }

    /// Reports the end of the run.
    async fn finish(self, exit: ExitInfo) {
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
        let silent = self.lines == 0;
        drop(self);
        session.on_exit(generation, exit, silent).await;
    }

    fn process(&mut self, framer: &mut LineFramer, chunk: &[u8]) {
        let need = chunk.len() + framer.buffered() + 1;
        if self.arena.capacity() - self.arena.len() < need {
            // The old block stays alive only as long as the window still holds its lines.
            self.arena = BytesMut::with_capacity(need.max(ARENA_BLOCK));
        }
        let mut batch = std::mem::take(&mut self.arena);
        let mut ends = Vec::new();
        framer.feed(chunk, &mut |f| {
            push_frame(&mut batch, &mut ends, &self.metrics, f)
        });
        let rest = batch.split_off(batch.len());
        self.arena = rest;
        self.commit(batch, &ends);
    }

    /// Writes a batch of whole lines to the journal, then publishes it.
    fn commit(&mut self, batch: BytesMut, ends: &[(usize, usize)]) {
        if ends.is_empty() {
            return;
        }
        let written = match self.writer.as_mut() {
            Some(w) => w.append(&batch, ends.len() as u64),
            None => Ok(Vec::new()),
        };
        self.lines += ends.len() as u64;
        let changes = match written {
            Ok(changes) => changes,
            Err(e) => {
                // Live clients still get the lines; replay of them will be incomplete.
                tracing::error!(session = %self.session.id, error = %e, "cannot write output journal");
                Vec::new()
            }
        };
        self.metrics.lines_out.inc_by(ends.len() as u64);
        self.metrics.bytes_out.inc_by(batch.len() as u64);
        let bytes = batch.freeze();
        self.session
            .hub
            .publish(ends.iter().map(|&(s, e)| bytes.slice(s..e)), &changes);
    }
}

fn push_frame(
    batch: &mut BytesMut,
    ends: &mut Vec<(usize, usize)>,
    metrics: &Metrics,
    frame: Frame<'_>,
) {
    let start = batch.len();
    match frame {
        Frame::Line(text) => batch.extend_from_slice(text.as_bytes()),
        Frame::Dropped {
            reason,
            bytes,
            preview,
        } => {
            metrics
                .lines_dropped
                .get_or_create(&[("reason", reason.as_str())])
                .inc();
            batch.extend_from_slice(dropped_frame(reason, bytes, preview).as_bytes());
        }
    }
    ends.push((start, batch.len()));
    batch.put_u8(b'\n');
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Writes client lines to the agent's stdin, batching whatever has queued up.
///
/// A write error (the agent exited: EPIPE) ends the writer; lines still queued are dropped and
/// senders see a closed channel. It never takes anything else down.
pub(super) async fn stdin_writer(
    session: String,
    mut rx: mpsc::Receiver<Bytes>,
    mut stdin: Writer,
    cancel: CancellationToken,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
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
        buf.extend_from_slice(&first);
        buf.push(b'\n');
        while buf.len() < STDIN_BATCH {
            match rx.try_recv() {
                Ok(line) => {
                    buf.extend_from_slice(&line);
                    buf.push(b'\n');
                }
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
