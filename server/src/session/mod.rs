//! Sessions: one agent, its output journal, and the clients watching it.
//!
//! A [`Session`] outlives the agent process it runs: after the agent exits, its output stays
//! replayable and it can be restarted under the same id, continuing the same sequence numbers.
//! Sessions know runtimes only through the [`Runtime`](crate::runtime::Runtime) trait.
//!
//! - [`SessionManager`] (`registry`): the map of sessions, ids, limits, create/restart/delete;
//! - `launch`: instances and the policy of a start (environment, credentials, working
//!   directory), and wiring a started agent's run to its session;
//! - `recovery`: what a starting server finds of the last one (adoption, reconciliation);
//! - `delivery`: the session's end of an agent run (publishing journaled lines);
//! - `store`: the session's metadata file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::clock::now_ms;

use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};

use crate::fanout::Hub;
use crate::keeper::layout::{STDERR_TAIL_BYTES, SessionDir};
use crate::runtime::AgentControl;
/// What a client sends an agent, and how an agent's run ended: the edge speaks of these
/// through sessions, never through the runtime that carries them.
pub(crate) use crate::runtime::{ExitInfo, Input};

mod delivery;
pub(crate) mod env;
mod error;
mod launch;
mod notify;
mod recovery;
mod registry;
pub(crate) mod store;
#[cfg(test)]
mod tests;

pub(crate) use crate::wire::{
    Activity, ConversationRequest, ConversationState, SessionSummary, Status,
};
pub(crate) use error::SessionError;
pub(crate) use launch::{CreateRequest, Instance};
pub(crate) use notify::spawn_activity_sweeper;
pub(crate) use registry::SessionManager;

/// Client-only frames ([`Session::notify_clients`]) a slow client may have queued before it
/// misses some: they are rare (one per notification).
const NOTICES: usize = 16;

/// What clients of a session should know has happened. Sent on a `watch` channel: a client
/// only needs the latest state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    /// An agent is running; `generation` counts starts.
    Running {
        /// Which start this is.
        generation: u64,
    },
    /// The agent of `generation` exited; its last output line has sequence number `last_seq`.
    Exited {
        /// Which start ended.
        generation: u64,
        /// How it ended.
        exit: ExitInfo,
        /// Sequence number of its last output line.
        last_seq: u64,
    },
    /// The session was deleted.
    Deleted,
}

/// What the output pumps record for [`Activity`]: cheap to update on every batch.
#[derive(Debug, Default)]
pub(crate) struct OutputActivity {
    /// When the agent's output was last published (ms since the epoch).
    last_output_ms: std::sync::atomic::AtomicU64,
    /// Whether a pi RPC turn is open (`agent_start` seen, its `agent_end` not yet).
    turn_open: std::sync::atomic::AtomicBool,
    /// The activity last published on the event bus ([`notify`]).
    published: std::sync::atomic::AtomicU8,
    /// How many approval requests wait, and which (to announce only new ones).
    pending: AtomicUsize,
    known: Mutex<Vec<serde_json::Value>>,
}

impl OutputActivity {
    /// Notes a batch of output lines; true if a turn ended in it.
    pub(crate) fn saw<'a>(&self, lines: impl IntoIterator<Item = &'a [u8]>) -> bool {
        self.last_output_ms.store(now_ms(), Ordering::Relaxed);
        let mut ended = false;
        for line in lines {
            // pi RPC events start with their type (pi's own, and moorline's translations).
            if line.starts_with(br#"{"type":"agent_start""#) {
                self.turn_open.store(true, Ordering::Relaxed);
            } else if line.starts_with(br#"{"type":"agent_end""#) {
                self.turn_open.store(false, Ordering::Relaxed);
                ended = true;
            }
        }
        ended
    }

    /// A new run starts with no turn open.
    pub(crate) fn reset(&self) {
        self.turn_open.store(false, Ordering::Relaxed);
        self.pending.store(0, Ordering::Relaxed);
        self.known.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Why an agent is being stopped, which decides what clients are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Delete,
    Shutdown,
}

/// Mutable state of a session.
#[derive(Debug)]
struct State {
    status: Status,
    spawned_at: u64,
    exit: Option<ExitInfo>,
    generation: u64,
    /// True while a start is in progress, so concurrent restarts do not race.
    starting: bool,
    stopping: Option<StopReason>,
    stdin: Option<InputSender>,
    control: Option<Arc<dyn AgentControl>>,
    /// The slot this running agent holds against `max_sessions`; dropped when it exits.
    permit: Option<OwnedSemaphorePermit>,
    pid: Option<u32>,
    /// Set when the last run ended without writing a line: a start failure.
    error: Option<String>,
    /// When the last run ended, ms since the epoch.
    ended_at: Option<u64>,
}

/// One session.
#[derive(Debug)]
pub(crate) struct Session {
    id: String,
    name: Option<String>,
    instance_id: String,
    /// `None` when the session's instance is no longer configured.
    instance: Option<Arc<Instance>>,
    cwd: PathBuf,
    /// The session's own git worktree (its `cwd`), when it works in a project.
    pub(crate) worktree: Option<crate::projects::Worktree>,
    /// What git last said of the worktree (dirty, ahead), for summaries built where git must
    /// not run: events come from the output path. Refreshed by [`Session::fresh_summary`].
    pub(crate) tree: Mutex<Option<crate::projects::TreeState>>,
    env: BTreeMap<String, String>,
    created_at: u64,
    created_by: Option<String>,
    dir: SessionDir,
    hub: Arc<Hub>,
    /// Held by an agent's run for as long as it delivers output, so two runs of a session
    /// never write its journal at once.
    run_lock: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<State>,
    lifecycle: watch::Sender<Lifecycle>,
    /// Held while an agent is being started.
    start_lock: tokio::sync::Mutex<()>,
    /// Generation of the last agent that finished, for whoever waits on a stop.
    finished: watch::Sender<u64>,
    clients: AtomicUsize,
    /// Client lines sent to the current run; with no output either, an exit is a start failure.
    inputs: std::sync::atomic::AtomicU64,
    /// Client lines sent to the session over its whole life: a person at work moves it.
    input_seq: std::sync::atomic::AtomicU64,
    /// Frames for the connected clients only, never journaled (`amarre.push_sent`).
    notices: tokio::sync::broadcast::Sender<Arc<str>>,
    /// The agent's output is held: its journal cannot be written (a full disk).
    output_held: std::sync::atomic::AtomicBool,
    /// Output lines given up because the journal stayed unwritable after the agent exited.
    lines_lost: std::sync::atomic::AtomicU64,
    /// What the output says the agent is doing.
    pub(crate) activity: OutputActivity,
    /// How recent output must be for the agent to count as working.
    activity_window: Duration,
    /// Where the session announces its changes.
    events: crate::events::EventBus,
}

impl Session {
    /// The session id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The output hub, for clients.
    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The agent's name as reported to clients.
    pub(crate) fn agent_name(&self) -> &str {
        self.instance
            .as_ref()
            .map_or("unknown", |i| i.adapter.name())
    }

    /// The agent's working directory.
    pub(crate) fn cwd(&self) -> &std::path::Path {
        &self.cwd
    }

    /// The session's own worktree, when it works in a project.
    pub(crate) fn worktree(&self) -> Option<&crate::projects::Worktree> {
        self.worktree.as_ref()
    }

    /// The instance id.
    pub(crate) fn instance_id(&self) -> &str {
        &self.instance_id
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current status.
    pub(crate) fn status(&self) -> Status {
        self.lock().status
    }

    /// When the session's last run ended, if it has ended and nothing is starting it again.
    pub(crate) fn ended_at(&self) -> Option<u64> {
        let state = self.lock();
        let ended = matches!(state.status, Status::Exited | Status::Crashed) && !state.starting;
        ended.then(|| state.ended_at.unwrap_or(state.spawned_at))
    }

    /// Watches what happens to the session.
    pub(crate) fn lifecycle(&self) -> watch::Receiver<Lifecycle> {
        self.lifecycle.subscribe()
    }

    /// The instance, if it is still configured.
    pub(crate) fn instance(&self) -> Option<&Arc<Instance>> {
        self.instance.as_ref()
    }

    /// The sender for the running agent's stdin, if it runs.
    pub(crate) fn stdin(&self) -> Option<InputSender> {
        self.lock().stdin.clone()
    }

    /// Counts client lines sent to the agent.
    pub(crate) fn count_inputs(&self, lines: u64) {
        self.inputs.fetch_add(lines, Ordering::Relaxed);
        self.input_seq.fetch_add(lines, Ordering::SeqCst);
    }

    /// How many lines clients have sent the session, ever: compared with the count when an
    /// approval request appeared, it tells whether a client was active since.
    pub(crate) fn input_seq(&self) -> u64 {
        self.input_seq.load(Ordering::SeqCst)
    }

    /// Values of the environment the session was created with, which a client-visible text
    /// about it must not contain.
    pub(crate) fn env_values(&self) -> impl Iterator<Item = &str> {
        self.env.values().map(String::as_str)
    }

    /// Sends `frame` to the clients connected now (not journaled, not replayed). Returns how
    /// many will get it.
    pub(crate) fn notify_clients(&self, frame: impl Into<Arc<str>>) -> usize {
        self.notices.send(frame.into()).unwrap_or(0)
    }

    /// Frames sent with [`Self::notify_clients`] from now on.
    pub(crate) fn notices(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.notices.subscribe()
    }

    /// Approval requests of the running agent that wait for an answer.
    pub(crate) fn pending_approvals(&self) -> Vec<serde_json::Value> {
        crate::keeper::agentio::read_pending(&self.dir.pending())
    }

    /// The end of the agent's stderr (all runs), for a person finding out why it crashed.
    pub(crate) fn stderr_tail(&self) -> String {
        self.dir.stderr_tail(STDERR_TAIL_BYTES)
    }

    /// Why the last run failed to start, if it did.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.lock().error.clone()
    }

    /// Registers a client unless `limit` are already connected.
    pub(crate) fn try_add_client(self: &Arc<Self>, limit: usize) -> Option<ClientGuard> {
        self.clients
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| ClientGuard {
                session: self.clone(),
            })
    }

    /// Records whether the agent's output is held because the journal cannot be written.
    pub(crate) fn output_held(&self, held: bool, metrics: &crate::metrics::Metrics) {
        let was = self.output_held.swap(held, Ordering::SeqCst);
        match (was, held) {
            (false, true) => {
                metrics.output_holds.inc();
                metrics.output_held.inc();
            }
            (true, false) => {
                metrics.output_held.dec();
            }
            _ => {}
        }
    }

    /// Records output lines given up (never numbered, never delivered).
    pub(crate) fn output_lost(&self, lines: u64, metrics: &crate::metrics::Metrics) {
        self.lines_lost.fetch_add(lines, Ordering::SeqCst);
        metrics
            .lines_dropped
            .get_or_create(&[("reason", "journal_error")])
            .inc_by(lines);
    }

    /// The REST summary.
    pub(crate) fn summary(&self) -> SessionSummary {
        let mut summary = {
            let state = self.lock();
            self.summary_of(&state)
        };
        // Read outside the lock: it is a file.
        if summary.status == Status::Running {
            summary.pending_approvals = self.pending_approvals();
            let recent = now_ms()
                .saturating_sub(self.activity.last_output_ms.load(Ordering::Relaxed))
                < self.activity_window.as_millis() as u64;
            summary.activity = Some(if !summary.pending_approvals.is_empty() {
                Activity::Waiting
            } else if recent || self.activity.turn_open.load(Ordering::Relaxed) {
                Activity::Working
            } else {
                Activity::Idle
            });
        }
        summary.auth_failed = self.dir.auth_failed().exists();
        summary.conversation =
            match crate::keeper::agentio::read_conversation(&self.dir.conversation()).resumed {
                true => ConversationState::Resumed,
                false => ConversationState::New,
            };
        if let Some(worktree) = &self.worktree {
            summary.project = Some(worktree.project.clone());
            summary.branch = Some(worktree.branch.clone());
            if let Some(state) = *self.tree.lock().unwrap_or_else(|p| p.into_inner()) {
                summary.dirty = Some(state.dirty);
                summary.ahead = Some(state.ahead);
            }
        }
        summary
    }

    /// [`Session::summary`] with its worktree's state asked of git now (the agent changes the
    /// tree as it works). It runs git: call it off the async workers.
    pub(crate) fn fresh_summary(&self, projects: &crate::projects::Projects) -> SessionSummary {
        if let Some(worktree) = &self.worktree
            && let Ok(state) = projects.state(worktree)
        {
            *self.tree.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
        }
        self.summary()
    }

    fn summary_of(&self, state: &State) -> SessionSummary {
        SessionSummary {
            id: self.id.clone(),
            name: self.name.clone(),
            instance_id: self.instance_id.clone(),
            status: state.status,
            agent: self.agent_name().to_owned(),
            spawned_at: state.spawned_at,
            clients: self.clients.load(Ordering::SeqCst),
            exit_code: state.exit.and_then(|e| e.code),
            signal: state.exit.and_then(|e| e.signal_name()),
            reason: state.exit.and_then(|e| e.reason).map(|r| r.as_str().into()),
            last_seq: self.hub.last_seq(),
            runtime: self
                .instance
                .as_ref()
                .map_or("none", |i| i.runtime.name())
                .into(),
            error: state.error.clone(),
            pending_approvals: Vec::new(),
            created_by: self.created_by.clone(),
            output_held: self.output_held.load(Ordering::SeqCst),
            lines_lost: self.lines_lost.load(Ordering::SeqCst),
            auth_failed: false,
            cwd: self.cwd.clone(),
            created_at: self.created_at,
            activity: None,
            conversation: ConversationState::New,
            project: None,
            branch: None,
            dirty: None,
            ahead: None,
        }
    }

    fn meta(&self) -> store::Meta {
        let state = self.lock();
        store::Meta {
            id: self.id.clone(),
            name: self.name.clone(),
            instance_id: self.instance_id.clone(),
            cwd: self.cwd.clone(),
            env: self.env.clone(),
            created_at: self.created_at,
            created_by: self.created_by.clone(),
            spawned_at: state.spawned_at,
            status: state.status,
            exit_code: state.exit.and_then(|e| e.code),
            signal: state.exit.and_then(|e| e.signal),
            pid: state.pid,
            pid_start: state.pid.and_then(crate::keeper::group::process_start_time),
            ended_at: state.ended_at,
            exit_reason: state.exit.and_then(|e| e.reason),
            worktree: self.worktree.clone(),
        }
    }

    fn persist(&self) {
        if let Err(e) = store::save(&self.dir, &self.meta()) {
            tracing::error!(session = %self.id, error = %e, "cannot save session metadata");
        }
    }

    /// Stops the running agent: SIGTERM to its group, `grace`, then SIGKILL. False if it was
    /// running and its end was not seen in time.
    async fn stop_agent(&self, reason: StopReason, grace: Duration) -> bool {
        let (control, generation) = {
            let mut state = self.lock();
            if state.status != Status::Running {
                return true;
            }
            state.stopping = Some(reason);
            (state.control.clone(), state.generation)
        };
        let Some(control) = control else {
            return true;
        };
        let mut finished = self.finished.subscribe();
        let ended = async move {
            let _ = finished.wait_for(|g| *g >= generation).await;
        };
        let stopped = crate::runtime::stop_agent(control.as_ref(), grace, ended).await;
        if !stopped {
            tracing::error!(session = %self.id, "agent did not exit after SIGKILL");
        }
        stopped
    }

    /// Waits until the current run (if any) has ended or let go of its agent, up to `limit`.
    async fn wait_run_over(&self, limit: Duration) {
        let generation = {
            let state = self.lock();
            if state.status != Status::Running {
                return;
            }
            state.generation
        };
        let mut finished = self.finished.subscribe();
        let _ = tokio::time::timeout(limit, finished.wait_for(|g| *g >= generation)).await;
    }

    /// Records the end of an agent run and tells clients. `silent` means it never wrote a line:
    /// if it did not exit cleanly, that is a start failure, reported with its stderr.
    async fn on_exit(&self, generation: u64, exit: ExitInfo, silent: bool) {
        // Exiting without ever writing, before anyone asked anything (or asked it to stop), is
        // failing to start.
        let untouched = self.inputs.load(Ordering::Relaxed) == 0 && self.lock().stopping.is_none();
        let error = (silent && untouched && !exit.is_success()).then(|| {
            let tail = self.dir.stderr_tail(STDERR_TAIL_BYTES);
            if tail.is_empty() {
                format!("the agent exited before writing anything ({exit}) and wrote nothing to stderr")
            } else {
                format!("the agent exited before writing anything ({exit}); its stderr ends with:\n{tail}")
            }
        });
        if let Some(e) = &error {
            tracing::warn!(session = %self.id, error = %e, "agent failed to start");
        }
        if self.lock().generation != generation {
            return;
        }
        // Before the status changes: until then no new run can start and meet this cleanup.
        if let Some(instance) = &self.instance {
            instance.runtime.cleanup(&self.id, &self.dir).await;
        }
        let stopping = {
            let mut state = self.lock();
            state.exit = Some(exit);
            state.stdin = None;
            state.control = None;
            state.permit = None;
            state.pid = None;
            state.error = error;
            state.ended_at = Some(now_ms());
            state.status = match state.stopping {
                Some(StopReason::Delete) => Status::Stopped,
                _ if exit.is_success() => Status::Exited,
                _ => Status::Crashed,
            };
            state.stopping
        };
        self.hub.release_memory();
        if stopping != Some(StopReason::Delete) {
            self.persist();
        }
        // A deleted session's clients were told so; a stopping server's clients are closed
        // with 1001 (an exit event racing that close would be a lie about the agent).
        if stopping.is_none() {
            self.lifecycle.send_replace(Lifecycle::Exited {
                generation,
                exit,
                last_seq: self.hub.last_seq(),
            });
            self.publish_status();
        }
        self.finished.send_replace(generation);
    }
}

/// The way into a running agent's stdin: a queue bounded in batches (`limits.inbound_queue`)
/// and in bytes (`limits.inbound_queue_bytes`). A sender that finds it full waits, and so
/// stops reading its client's connection: a fast client is held back by TCP instead of
/// filling the server's memory.
#[derive(Debug, Clone)]
pub(crate) struct InputSender {
    tx: mpsc::Sender<Input>,
    budget: Arc<tokio::sync::Semaphore>,
    capacity: u32,
}

/// The agent's stdin is gone (it exited); the input was dropped.
#[derive(Debug, thiserror::Error)]
#[error("the agent no longer takes input")]
pub(crate) struct InputClosed;

impl InputSender {
    pub(crate) fn new(tx: mpsc::Sender<Input>, bytes: usize) -> Self {
        let capacity =
            u32::try_from(bytes.clamp(1, tokio::sync::Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        Self {
            tx,
            budget: Arc::new(tokio::sync::Semaphore::new(capacity as usize)),
            capacity,
        }
    }

    /// Queues `input` once the budget has room for it (all of it, for one larger than the
    /// whole budget).
    pub(crate) async fn send(&self, mut input: Input) -> Result<(), InputClosed> {
        let want = u32::try_from(input.bytes())
            .unwrap_or(u32::MAX)
            .clamp(1, self.capacity);
        let permit = tokio::select! {
            permit = self.budget.clone().acquire_many_owned(want) => {
                permit.map_err(|_| InputClosed)?
            }
            () = self.tx.closed() => return Err(InputClosed),
        };
        input.budget = Some(permit);
        self.tx.send(input).await.map_err(|_| InputClosed)
    }
}

/// Counts a connected client for as long as it lives.
#[derive(Debug)]
pub(crate) struct ClientGuard {
    session: Arc<Session>,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.session.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `tick` every `period` until `cancel` fires or the manager is dropped: the server's
/// periodic sweeps (quiet agents turning idle, pruning ended sessions). The task holds the
/// manager only while a tick runs.
fn periodically<F, Fut>(
    manager: &Arc<SessionManager>,
    tracker: &tokio_util::task::TaskTracker,
    period: Duration,
    cancel: tokio_util::sync::CancellationToken,
    tick: F,
) where
    F: Fn(Arc<SessionManager>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let manager = Arc::downgrade(manager);
    tracker.spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = cancel.cancelled() => return,
            }
            let Some(manager) = manager.upgrade() else {
                return;
            };
            tick(manager).await;
        }
    });
}
