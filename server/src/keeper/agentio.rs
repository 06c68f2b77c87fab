//! The loop that owns an agent's stdio: the one place where bytes become client lines and
//! client lines become agent input.
//!
//! It runs in the server for the `process` runtime and in the session keeper for the durable
//! runtimes, so both behave the same. One task does everything, without ever blocking one
//! direction on the other: stdout is read while stdin is written (an agent that stops reading
//! must not stop its own output), client lines are only taken in while the agent's input
//! backlog is small (backpressure to clients), and approval timeouts fire on time.
//!
//! Output goes through the framer, then the adapter's [`Pipeline`], then to an [`OutputSink`]
//! (journal and fan-out) in batches: one journal write per read of stdout.
//!
//! A sink that cannot store a batch (the journal's disk is full) refuses it, and the loop
//! holds it: it stops reading stdout, so the agent blocks on a full pipe instead of losing
//! output, and retries the batch with backoff until the journal takes it. Only when the agent
//! has exited and the journal stays unwritable for `hold_after_exit` is held output given up,
//! and then it is counted ([`OutputSink::lost`]).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;

use bytes::{BufMut, Bytes, BytesMut};
use moorline_adapters::conversation::ConversationNews;
use moorline_adapters::pipeline::{Outputs, Pipeline, Resolution};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::exit::ExitInfo;
use super::framing::{DropReason, Frame, LineFramer, dropped_frame};
use super::group::AgentControl;
use super::linequeue::LineQueue;

/// Boxed pipe ends, so runtimes can hand over whatever they use.
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// See [`Reader`].
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;
/// Resolves once the agent's main process has exited.
pub type ExitFuture = Pin<Box<dyn Future<Output = ExitInfo> + Send>>;

/// An agent's end of the loop: its pipes, its exit, and how to signal its group.
#[allow(missing_debug_implementations)] // pipes and a future: nothing to show
pub(crate) struct AgentPipes {
    /// The agent's stdout.
    pub stdout: Reader,
    /// The agent's stdin.
    pub stdin: Writer,
    /// Resolves when the agent's main process has exited.
    pub exit: ExitFuture,
    /// Kills leftovers that keep stdout open after the agent exited.
    pub control: Arc<dyn AgentControl>,
}

/// Size of one read from an agent's stdout.
const READ_CHUNK: usize = 256 * 1024;
/// Batches are carved out of blocks this large, so a busy session does not allocate (and
/// page-fault) a fresh buffer for every read.
const ARENA_BLOCK: usize = 1 << 20;
/// Stop taking client lines while this much input waits for the agent.
const INPUT_BACKLOG: usize = 1 << 20;
/// While output is held, stop taking client lines once this much output is held (what the
/// adapter answers them queues behind it).
const HELD_INPUT_OUTPUT: usize = 1 << 20;
/// First and longest wait before retrying a refused batch.
const RETRY_FIRST: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// A batch a sink could not store, handed back to be held and retried.
#[derive(Debug)]
pub(crate) struct Refused {
    /// The batch, unchanged.
    pub batch: BytesMut,
    /// Why it was refused.
    pub error: std::io::Error,
}

/// Where framed output goes.
pub(crate) trait OutputSink: Send {
    /// Takes a batch of whole lines (each followed by `\n` in `batch`); `ends` are the
    /// `(start, end)` offsets of each line without its `\n`. A batch it cannot store is
    /// handed back, untouched: it will be offered again.
    fn commit(&mut self, batch: BytesMut, ends: &[(usize, usize)]) -> Result<(), Refused>;

    /// Output is being held because a commit was refused (`Some`), or flows again (`None`).
    fn held(&mut self, _error: Option<&std::io::Error>) {}

    /// Held output was given up: the agent has exited and the sink still refuses it.
    fn lost(&mut self, _lines: u64) {}

    /// The set of pending approval requests changed.
    fn pending_changed(&mut self, _pending: &[serde_json::Value]) {}

    /// An output line could not be forwarded (it was replaced by a `line_dropped` frame).
    fn line_dropped(&mut self, _reason: DropReason) {}

    /// An approval request was settled (for the audit log).
    fn resolved(&mut self, _resolution: Resolution) {}

    /// The agent reported, for the first time this run, that its credentials are wrong.
    fn auth_failed(&mut self) {}

    /// The agent named the conversation it runs (once it had started).
    fn conversation(&mut self, _news: ConversationNews) {}

    /// Committed lines may now be shown to clients: what their processing changed (pending
    /// approvals, an authentication failure) has been reported.
    fn flush(&mut self) {}
}

/// Gives the pipes to and from an agent `bytes` of capacity, so a long line passes in one
/// write and one read rather than a wake-up per 64 KiB. True if the kernel agreed for all; a
/// refusal (beyond `/proc/sys/fs/pipe-max-size` for an unprivileged process, or past the user's
/// pipe budget) leaves a pipe as it was, which only costs speed. `0` changes nothing.
pub(crate) fn widen_pipes(pipes: &[std::os::fd::BorrowedFd<'_>], bytes: usize) -> bool {
    use nix::fcntl::{FcntlArg, fcntl};
    let Ok(size) = i32::try_from(bytes) else {
        return false;
    };
    // Every pipe is tried, whatever an earlier one got.
    let refused = pipes
        .iter()
        .filter(|fd| size != 0 && fcntl(fd, FcntlArg::F_SETPIPE_SZ(size)).is_err())
        .count();
    refused == 0
}

/// Lines from one client, in order, with who sent them.
///
/// A burst of frames travels as one batch: a queue operation per line cost more than the rest
/// of a short line's way to the agent.
#[derive(Debug)]
pub struct Input {
    /// The lines, each without its newline.
    pub lines: Vec<Bytes>,
    /// The sender's identity (a tailnet login, `token` or `local`); `None` when unknown.
    pub user: Option<Arc<str>>,
    /// Its share of the queue's byte budget, given back when the input is taken off it.
    pub budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Input {
    /// A single line.
    pub fn line(line: Bytes, user: Option<Arc<str>>) -> Self {
        Self {
            lines: vec![line],
            user,
            budget: None,
        }
    }

    /// Bytes of its lines.
    pub fn bytes(&self) -> usize {
        self.lines.iter().map(Bytes::len).sum()
    }
}

/// Counts what an agent run produced.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Totals {
    /// Lines committed.
    pub lines: u64,
    /// Lines dropped by the framer (invalid UTF-8, too long).
    pub dropped: u64,
}

/// An agent's stdio loop.
pub(crate) struct AgentIo {
    framer: LineFramer,
    pipeline: Pipeline,
    exit_drain: Duration,
    arena: BytesMut,
    batch_ends: Vec<(usize, usize)>,
    totals: Totals,
    /// Batches refused by the sink, oldest first, with their line offsets.
    held: VecDeque<(BytesMut, Vec<(usize, usize)>)>,
    held_bytes: usize,
    /// When to offer the oldest held batch again.
    retry_at: Option<Instant>,
    backoff: Duration,
    hold_after_exit: Duration,
}

impl std::fmt::Debug for AgentIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIo")
            .field("pipeline", &self.pipeline)
            .finish_non_exhaustive()
    }
}

impl AgentIo {
    /// A loop framing lines up to `max_line` bytes through `pipeline`.
    pub(crate) fn new(max_line: usize, pipeline: Pipeline, exit_drain: Duration) -> Self {
        Self {
            framer: LineFramer::new(max_line),
            pipeline,
            exit_drain,
            arena: BytesMut::new(),
            batch_ends: Vec::new(),
            totals: Totals::default(),
            held: VecDeque::new(),
            held_bytes: 0,
            retry_at: None,
            backoff: RETRY_FIRST,
            hold_after_exit: Duration::from_secs(10),
        }
    }

    /// How long output refused by the sink is still held after the agent has exited.
    pub(crate) fn hold_after_exit(mut self, hold: Duration) -> Self {
        self.hold_after_exit = hold;
        self
    }

    /// Commits a batch, or holds it behind batches already held (order is kept).
    fn commit(&mut self, batch: BytesMut, ends: &[(usize, usize)], sink: &mut dyn OutputSink) {
        if !self.held.is_empty() {
            self.hold(batch, ends);
        } else if let Err(refused) = sink.commit(batch, ends) {
            tracing::warn!(error = %refused.error, "cannot store agent output; holding it until the journal can be written");
            sink.held(Some(&refused.error));
            self.backoff = RETRY_FIRST;
            self.retry_at = Some(Instant::now() + self.backoff);
            self.hold(refused.batch, ends);
        }
    }

    fn hold(&mut self, batch: BytesMut, ends: &[(usize, usize)]) {
        self.held_bytes += batch.len();
        self.held.push_back((batch, ends.to_vec()));
    }

    /// Offers held batches again, oldest first. True once nothing is held.
    fn retry(&mut self, sink: &mut dyn OutputSink) -> bool {
        while let Some((batch, ends)) = self.held.pop_front() {
            let len = batch.len();
            match sink.commit(batch, &ends) {
                Ok(()) => self.held_bytes -= len,
                Err(refused) => {
                    self.held.push_front((refused.batch, ends));
                    self.backoff = (self.backoff * 2).min(RETRY_MAX);
                    self.retry_at = Some(Instant::now() + self.backoff);
                    sink.flush();
                    return false;
                }
            }
        }
        tracing::info!("the journal takes output again");
        sink.held(None);
        sink.flush();
        self.retry_at = None;
        true
    }

    /// Gives up held output (counted by the sink).
    fn give_up(&mut self, sink: &mut dyn OutputSink) {
        let lines: usize = self.held.iter().map(|(_, ends)| ends.len()).sum();
        tracing::error!(
            lines,
            "the agent has exited and its journal still cannot be written; output lost"
        );
        self.held.clear();
        self.held_bytes = 0;
        self.retry_at = None;
        sink.lost(lines as u64);
        sink.held(None);
    }

    /// Runs until the agent has exited and its output is fully committed.
    ///
    /// Exit and end-of-output are awaited separately: a tool the agent started may keep stdout
    /// open after the agent exits. Such leftovers get `exit_drain` to finish, then the agent's
    /// process group is killed, then output is given up on after another `exit_drain`.
    pub(crate) async fn run(
        mut self,
        pipes: AgentPipes,
        mut input: mpsc::Receiver<Input>,
        sink: &mut dyn OutputSink,
    ) -> (ExitInfo, Totals) {
        let AgentPipes {
            mut stdout,
            mut stdin,
            mut exit,
            control,
        } = pipes;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut to_agent = LineQueue::default();
        let mut stdout_open = true;
        let mut stdin_open = true;
        let mut input_open = true;
        let mut exit_info: Option<ExitInfo> = None;
        let mut drain_deadline: Option<Instant> = None;
        let mut killed_leftovers = false;
        // Once the agent has exited, held output is given up after this.
        let mut give_up_at: Option<Instant> = None;
        let mut hello = Outputs::default();
        self.pipeline.start(&mut hello);
        self.route(hello, stdin_open, &mut to_agent, sink);
        while stdout_open || exit_info.is_none() || !self.held.is_empty() {
            let approval_deadline = self.pipeline.next_deadline().map(Instant::from_std);
            // Unbiased: an agent that floods its output must not starve client input (an
            // abort, say) or approval timeouts.
            tokio::select! {
                // Not while output is held: the agent waits on its pipe (backpressure).
                read = stdout.read_buf(&mut buf), if stdout_open && self.held.is_empty() => match read {
                    Ok(0) => stdout_open = false,
                    Ok(_) => {
                        self.output(&buf, &mut to_agent, sink);
                        buf.clear();
                        if buf.capacity() < READ_CHUNK {
                            buf.reserve(READ_CHUNK);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading agent output failed");
                        stdout_open = false;
                    }
                },
                written = async {
                    let slices = to_agent.slices();
                    stdin.write_vectored(&slices).await
                }, if stdin_open && !to_agent.is_empty() => match written {
                    Ok(0) | Err(_) => {
                        // The agent closed its stdin or exited (EPIPE): drop what it cannot take.
                        tracing::debug!("agent stdin closed");
                        stdin_open = false;
                        to_agent.clear();
                    }
                    Ok(n) => to_agent.consume(n),
                },
                line = input.recv(), if input_open && to_agent.len() < INPUT_BACKLOG
                    && self.held_bytes < HELD_INPUT_OUTPUT => match line {
                    Some(line) => {
                        self.input(&line, stdin_open, &mut to_agent, sink);
                        // Take whatever else has queued, so a burst becomes one write.
                        while to_agent.len() < INPUT_BACKLOG {
                            match input.try_recv() {
                                Ok(line) => self.input(&line, stdin_open, &mut to_agent, sink),
                                Err(_) => break,
                            }
                        }
                    }
                    None => input_open = false,
                },
                () = sleep_until(approval_deadline), if approval_deadline.is_some() => {
                    let mut outs = Outputs::default();
                    self.pipeline.expire(std::time::Instant::now(), &mut outs);
                    self.route(outs, stdin_open, &mut to_agent, sink);
                }
                info = &mut exit, if exit_info.is_none() => {
                    exit_info = Some(info);
                    drain_deadline = Some(Instant::now() + self.exit_drain);
                    give_up_at = Some(Instant::now() + self.hold_after_exit);
                }
                () = sleep_until(self.retry_at), if self.retry_at.is_some() => {
                    if self.retry(sink) {
                        // Leftovers could not write while output was held: their time to
                        // finish starts now.
                        if drain_deadline.is_some() {
                            drain_deadline = Some(Instant::now() + self.exit_drain);
                        }
                    } else if give_up_at.is_some_and(|t| Instant::now() >= t) {
                        self.give_up(sink);
                        // What is still in the pipe has nowhere to go either.
                        stdout_open = false;
                    }
                }
                () = sleep_until(drain_deadline), if stdout_open && drain_deadline.is_some() && self.held.is_empty() => {
                    if killed_leftovers {
                        tracing::warn!("agent output still open after its process group was killed; giving up on it");
                        stdout_open = false;
                    } else {
                        tracing::info!("agent exited but left processes holding its output; killing them");
                        let _ = control.kill();
                        killed_leftovers = true;
                        drain_deadline = Some(Instant::now() + self.exit_drain);
                    }
                }
            }
        }
        // An unterminated last line is still a line.
        self.frame(None, &mut to_agent, sink);
        let give_up_at = Instant::now() + self.hold_after_exit;
        while self.retry_at.is_some() {
            sleep_until(self.retry_at).await;
            if !self.retry(sink) && Instant::now() >= give_up_at {
                self.give_up(sink);
            }
        }
        let _ = stdin.shutdown().await;
        let exit = exit_info.unwrap_or(ExitInfo::UNKNOWN);
        (exit, self.totals)
    }

    fn take_arena(&mut self, need: usize) -> BytesMut {
        if self.arena.capacity() - self.arena.len() < need {
            // The old block lives on only while the window still holds its lines.
            self.arena = BytesMut::with_capacity(need.max(ARENA_BLOCK));
        }
        std::mem::take(&mut self.arena)
    }

    /// Frames and translates a read of stdout (or, with `None`, what is left at the end),
    /// and commits the resulting lines.
    fn output(&mut self, chunk: &[u8], to_agent: &mut LineQueue, sink: &mut dyn OutputSink) {
        self.frame(Some(chunk), to_agent, sink);
    }

    fn frame(&mut self, chunk: Option<&[u8]>, to_agent: &mut LineQueue, sink: &mut dyn OutputSink) {
        let len = chunk.map_or(0, <[u8]>::len);
        let mut batch = self.take_arena(len + self.framer.buffered() + 1);
        let mut ends = std::mem::take(&mut self.batch_ends);
        ends.clear();
        let now = std::time::Instant::now();
        let pipeline = &mut self.pipeline;
        let mut dropped = Vec::new();
        let mut outs = Outputs::default();
        let mut handle = |f: Frame<'_>| match f {
            Frame::Line(text) => {
                if pipeline.passes_through_agent_line(text) {
                    push(&mut batch, &mut ends, text.as_bytes());
                } else {
                    pipeline.agent_line(text, now, &mut outs);
                    for line in outs.to_clients.drain(..) {
                        push(&mut batch, &mut ends, &line);
                    }
                    for line in outs.to_agent.drain(..) {
                        to_agent.push_owned(line);
                    }
                }
            }
            Frame::Dropped {
                reason,
                bytes,
                preview,
            } => {
                dropped.push(reason);
                push(
                    &mut batch,
                    &mut ends,
                    dropped_frame(reason, bytes, preview).as_bytes(),
                );
            }
        };
        match chunk {
            Some(chunk) => self.framer.feed(chunk, &mut handle),
            None => self.framer.finish(&mut handle),
        }
        self.totals.dropped += dropped.len() as u64;
        for reason in dropped {
            sink.line_dropped(reason);
        }
        self.totals.lines += ends.len() as u64;
        let rest = batch.split_off(batch.len());
        self.arena = rest;
        // Requests are listed as pending before any client can see them: a client that reacts
        // at once finds them in the summary, and its reaction counts as activity after them.
        self.report_pending(sink);
        if !ends.is_empty() {
            self.commit(batch, &ends, sink);
        }
        self.batch_ends = ends;
        self.report(sink);
    }

    /// Tells the sink whether the pending set changed.
    fn report_pending(&mut self, sink: &mut dyn OutputSink) {
        if self.pipeline.take_changed() {
            sink.pending_changed(&self.pipeline.pending());
        }
    }

    /// Tells the sink what the pipeline settled and whether the pending set changed.
    fn report(&mut self, sink: &mut dyn OutputSink) {
        for resolution in self.pipeline.take_resolutions() {
            sink.resolved(resolution);
        }
        self.report_pending(sink);
        if self.pipeline.take_auth_failed() {
            sink.auth_failed();
        }
        if let Some(news) = self.pipeline.take_conversation() {
            sink.conversation(news);
        }
        sink.flush();
    }

    /// A client line: through the pipeline to the agent (and maybe to clients).
    fn input(
        &mut self,
        input: &Input,
        stdin_open: bool,
        to_agent: &mut LineQueue,
        sink: &mut dyn OutputSink,
    ) {
        for line in &input.lines {
            if self.pipeline.passes_through_client_line(line) {
                if stdin_open {
                    to_agent.push_line(line);
                }
                continue;
            }
            let mut outs = Outputs::default();
            self.pipeline
                .client_line_from(line, input.user.as_deref(), &mut outs);
            self.route(outs, stdin_open, to_agent, sink);
        }
    }

    fn route(
        &mut self,
        outs: Outputs,
        stdin_open: bool,
        to_agent: &mut LineQueue,
        sink: &mut dyn OutputSink,
    ) {
        if stdin_open {
            for line in outs.to_agent {
                to_agent.push_owned(line);
            }
        }
        if !outs.to_clients.is_empty() {
            let need: usize = outs.to_clients.iter().map(|l| l.len() + 1).sum();
            let mut batch = self.take_arena(need);
            let mut ends = Vec::with_capacity(outs.to_clients.len());
            for line in &outs.to_clients {
                push(&mut batch, &mut ends, line);
            }
            self.arena = batch.split_off(batch.len());
            self.totals.lines += ends.len() as u64;
            self.commit(batch, &ends, sink);
        }
        self.report(sink);
    }
}

fn push(batch: &mut BytesMut, ends: &mut Vec<(usize, usize)>, line: &[u8]) {
    let start = batch.len();
    batch.extend_from_slice(line);
    ends.push((start, batch.len()));
    batch.put_u8(b'\n');
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Records that the run reported an authentication failure (the session's
/// [`auth_failed`](super::layout::SessionDir::auth_failed) file).
pub(crate) fn mark_auth_failed(path: &Path) {
    if let Err(e) = super::fsio::write_private(path, b"") {
        tracing::warn!(error = %e, "cannot record an authentication failure");
    }
}

/// What a session records of its agent's conversation (its
/// [`conversation`](super::layout::SessionDir::conversation) file).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ConversationRecord {
    /// The conversation's id as its adapter names it, once known.
    #[serde(default)]
    pub id: Option<String>,
    /// Whether the run that recorded it continued an earlier conversation.
    #[serde(default)]
    pub resumed: bool,
    /// Sequence number of the session's first journal line of this conversation: its messages
    /// are read back from there when a later run continues it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
}

impl From<ConversationNews> for ConversationRecord {
    fn from(news: ConversationNews) -> Self {
        Self {
            id: Some(news.id),
            first_seq: None,
            resumed: news.resumed,
        }
    }
}

/// Records the conversation of the current run (atomically).
pub(crate) fn record_conversation(path: &Path, record: &ConversationRecord) {
    let body = serde_json::to_vec(record).unwrap_or_default();
    if let Err(e) = super::fsio::write_private(path, &body) {
        tracing::warn!(error = %e, "cannot record the agent's conversation");
    }
}

/// Records what the agent said of its conversation, keeping where in the journal it began.
pub(crate) fn record_conversation_news(path: &Path, news: ConversationNews) {
    let first_seq = read_conversation(path).first_seq;
    record_conversation(
        path,
        &ConversationRecord {
            first_seq,
            ..news.into()
        },
    );
}

/// Gives a run that continues a conversation that conversation's messages, read back from the
/// session's journal, for translators that answer `get_messages` themselves (Claude Code's and
/// Codex's in the pi RPC dialect; pi answers from its own session file).
pub(crate) fn restore_history(
    pipeline: &mut Pipeline,
    journal_dir: &Path,
    continuation: &moorline_adapters::conversation::Continuation,
) {
    let (Some(_), Some(from)) = (&continuation.resume, continuation.history_from) else {
        return;
    };
    let mut messages = Vec::new();
    let read = super::journal::visit_from(journal_dir, from, |line| {
        messages.extend(moorline_adapters::pirpc::ended_message(line));
        std::ops::ControlFlow::Continue(())
    });
    if let Err(e) = read {
        tracing::warn!(error = %e, "cannot read the conversation back from the journal");
        return;
    }
    pipeline.restore_messages(messages);
}

/// True if the session's journal shows that nobody said anything in the conversation that
/// began at line `from` (no user message since), and still holds every line from there. Such a
/// conversation has nothing to continue: agents keep none of it (Claude Code writes its
/// transcript with the first message).
pub(crate) fn nothing_said_since(journal_dir: &Path, from: u64) -> bool {
    let retained = super::journal::scan_index(journal_dir)
        .is_ok_and(|(index, _)| index.first_seq().is_none_or(|first| first <= from));
    let mut said = false;
    // The first user message settles it: the rest is not read.
    let read = super::journal::visit_from(journal_dir, from, |line| {
        said = moorline_adapters::pirpc::ended_message(line).is_some_and(|m| m["role"] == "user");
        if said {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    });
    retained && read.is_ok() && !said
}

/// Reads a session's conversation record (none: a new conversation, no id).
pub(crate) fn read_conversation(path: &Path) -> ConversationRecord {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Writes the pending approval requests where the server can read them (atomically).
pub(crate) fn write_pending(path: &Path, pending: &[serde_json::Value]) {
    let body = serde_json::to_vec(pending).unwrap_or_default();
    if let Err(e) = super::fsio::write_private(path, &body) {
        tracing::warn!(error = %e, "cannot record pending approvals");
    }
}

/// Reads the pending approval requests of a session.
pub(crate) fn read_pending(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::fcntl::{FcntlArg, fcntl};

    use super::widen_pipes;

    fn capacity(fd: &std::os::fd::OwnedFd) -> i32 {
        fcntl(fd, FcntlArg::F_GETPIPE_SZ).expect("F_GETPIPE_SZ")
    }

    #[test]
    fn agent_pipes_get_the_configured_capacity_or_keep_theirs() {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        let before = capacity(&read);
        assert!(widen_pipes(&[read.as_fd(), write.as_fd()], 0));
        assert_eq!(capacity(&read), before, "0 keeps the system's size");
        assert!(widen_pipes(&[read.as_fd()], 256 * 1024));
        assert_eq!(capacity(&write), 256 * 1024, "both ends are one pipe");
        // A size no pipe can have (2 GiB): refused, and the pipe stays as it was.
        assert!(!widen_pipes(&[read.as_fd()], 1 << 31));
        assert_eq!(capacity(&read), 256 * 1024);
    }
}
