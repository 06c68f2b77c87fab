//! The session's end of an agent run: lines the runtime has journaled are counted, noted for
//! the agent's activity and published to clients; the run's end is recorded.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moorline_adapters::pipeline::Resolution;
use tokio::sync::{OwnedMutexGuard, mpsc};
use tokio_util::sync::CancellationToken;

use super::{Session, StopReason};
use crate::keeper::framing::DropReason;
use crate::keeper::journal::{IndexChange, JournalIndex, JournalTail};
use crate::metrics::Metrics;
use crate::runtime::{AgentRun, Delivery, ExitInfo, Input, RunEnd, RunIo};

/// One run of a session's agent, wired to its session.
pub(super) struct Run {
    pub(super) session: Arc<Session>,
    pub(super) generation: u64,
    /// Held for the whole run, so two runs of a session never deliver at once.
    pub(super) run_lock: OwnedMutexGuard<()>,
    pub(super) metrics: Arc<Metrics>,
    /// Cancelled when the server shuts down.
    pub(super) shutdown: CancellationToken,
    /// How long the agent gets between SIGTERM and SIGKILL if the server stops it.
    pub(super) stop_grace: Duration,
    /// At most how many published lines a run can have without its agent having written
    /// anything (the adapter's own greetings); `None` for an adopted run, whose start was
    /// seen by another server.
    pub(super) greeting_lines: Option<u64>,
}

impl Run {
    /// Runs the agent's run to its end and records how it ended.
    pub(super) async fn drive(self, run: Box<dyn AgentRun>, input: mpsc::Receiver<Input>) {
        let mut delivery = SessionDelivery {
            session: self.session.clone(),
            metrics: self.metrics.clone(),
            lines: 0,
        };
        let end = run
            .run(RunIo {
                input,
                output: &mut delivery,
                shutdown: self.shutdown.clone(),
                stop_grace: self.stop_grace,
            })
            .await;
        match end {
            RunEnd::Detached => {
                tracing::debug!(session = %self.session.id, "server stopping; the agent keeps running");
                self.session.finished.send_replace(self.generation);
            }
            RunEnd::Exited { exit, by_shutdown } => {
                if by_shutdown {
                    self.session
                        .lock()
                        .stopping
                        .get_or_insert(StopReason::Shutdown);
                }
                let silent = self.greeting_lines.is_some_and(|n| delivery.lines <= n);
                self.finish(exit, silent).await;
            }
        }
    }

    /// Reports the end of the run.
    async fn finish(self, exit: ExitInfo, silent: bool) {
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
        let Self {
            session,
            generation,
            run_lock,
            ..
        } = self;
        drop(run_lock);
        session.on_exit(generation, exit, silent).await;
    }
}

/// What a run's output does to its session.
struct SessionDelivery {
    session: Arc<Session>,
    metrics: Arc<Metrics>,
    /// Lines published during this run, to tell a start failure from a crash.
    lines: u64,
}

impl Delivery for SessionDelivery {
    fn tail(&self) -> JournalTail {
        let (index, next) = self.session.hub.index_snapshot();
        JournalTail::new(&self.session.dir.journal(), &index, next)
    }

    fn journal_opened(&mut self, index: JournalIndex) {
        self.session.hub.replace_index(index);
    }

    fn publish(&mut self, lines: Vec<Bytes>, changes: &[IndexChange]) {
        let n = lines.len() as u64;
        self.lines += n;
        self.metrics.lines_out.inc_by(n);
        self.metrics
            .bytes_out
            .inc_by(lines.iter().map(|l| l.len() as u64 + 1).sum());
        self.session.saw_output(lines.iter().map(|l| l.as_ref()));
        self.session.hub.publish(lines, changes);
        self.session.note_output();
    }

    fn held(&mut self, held: bool) {
        self.session.output_held(held, &self.metrics);
    }

    fn lost(&mut self, lines: u64) {
        self.session.output_lost(lines, &self.metrics);
    }

    fn line_dropped(&mut self, reason: DropReason) {
        self.metrics
            .lines_dropped
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    fn resolved(&mut self, resolution: &Resolution) {
        crate::audit::approval(&self.session.id, &self.session.instance_id, resolution);
        self.session.publish_resolved(resolution);
    }

    fn pending_changed(&mut self) {
        self.session.pending_file_changed();
    }
}
