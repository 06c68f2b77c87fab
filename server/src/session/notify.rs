//! What sessions tell the event bus ([`crate::events`]): the one place that decides when a
//! change is worth an event, so the hooks elsewhere in the session layer stay one line each.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use moorline_adapters::pipeline::Resolution;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Activity, Session, SessionManager, Status, now_ms};
use crate::events::EventKind;

/// [`Activity`] as one byte, for the last value published (0: none, the agent does not run).
fn code(activity: Option<Activity>) -> u8 {
    match activity {
        None => 0,
        Some(Activity::Idle) => 1,
        Some(Activity::Working) => 2,
        Some(Activity::Waiting) => 3,
    }
}

impl Session {
    fn publish(&self, kind: EventKind) {
        self.events.publish(&self.id, &self.instance_id, kind);
    }

    /// The session was created.
    pub(crate) fn publish_created(&self) {
        let session = self.summary();
        self.activity
            .published
            .store(code(session.activity), Ordering::Relaxed);
        self.publish(EventKind::SessionCreated { session });
    }

    /// The session's status changed (its agent started or ended).
    pub(crate) fn publish_status(&self) {
        let session = self.summary();
        self.activity
            .published
            .store(code(session.activity), Ordering::Relaxed);
        self.publish(EventKind::SessionStatus { session });
    }

    /// The session was deleted.
    pub(crate) fn publish_deleted(&self) {
        self.publish(EventKind::SessionDeleted {});
    }

    /// Notes a batch of output lines, and announces a turn that ended in it.
    pub(crate) fn saw_output<'a>(&self, lines: impl IntoIterator<Item = &'a [u8]>) {
        if self.activity.saw(lines) {
            self.publish(EventKind::TurnEnded {
                session: self.summary(),
            });
        }
    }

    /// An approval request was settled.
    pub(crate) fn publish_resolved(&self, resolution: &Resolution) {
        self.publish(EventKind::ApprovalResolved {
            resolution: resolution.clone(),
            session: self.summary(),
        });
    }

    /// What the agent is doing, as far as atomics tell (no file read): cheap enough for every
    /// output batch.
    fn activity_hint(&self) -> Option<Activity> {
        if self.status() != Status::Running {
            return None;
        }
        let a = &self.activity;
        let recent = now_ms().saturating_sub(a.last_output_ms.load(Ordering::Relaxed))
            < self.activity_window.as_millis() as u64;
        Some(if a.pending.load(Ordering::Relaxed) > 0 {
            Activity::Waiting
        } else if recent || a.turn_open.load(Ordering::Relaxed) {
            Activity::Working
        } else {
            Activity::Idle
        })
    }

    /// Publishes a `session_activity` event if what the agent is doing changed since the
    /// last one. Called after output, approval changes and by the sweeper.
    pub(crate) fn note_activity(&self) {
        let hint = code(self.activity_hint());
        if self.activity.published.load(Ordering::Relaxed) == hint {
            return;
        }
        let session = self.summary();
        let now = code(session.activity);
        if self.activity.published.swap(now, Ordering::Relaxed) != now {
            self.publish(EventKind::SessionActivity { session });
        }
    }

    /// The set of pending approval requests is now `pending`: announces the new ones, then
    /// the activity that follows.
    pub(crate) fn pending_now(&self, pending: &[serde_json::Value]) {
        self.activity
            .pending
            .store(pending.len(), Ordering::Relaxed);
        let new: Vec<serde_json::Value> = {
            let mut known = self
                .activity
                .known
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let new = pending
                .iter()
                .filter(|r| !known.contains(r))
                .cloned()
                .collect();
            known.clear();
            known.extend(pending.iter().cloned());
            new
        };
        for request in new {
            let session = self.summary();
            self.activity
                .published
                .store(code(session.activity), Ordering::Relaxed);
            self.publish(EventKind::ApprovalPending {
                request,
                session,
                inputs: self.input_seq(),
            });
        }
        self.note_activity();
    }

    /// A runtime's keeper rewrote the pending file: read it and announce what changed.
    pub(crate) fn pending_file_changed(&self) {
        self.pending_now(&self.pending_approvals());
    }
}

/// Publishes the activity changes that no output marks: a running agent that stops writing
/// becomes `idle` once `limits.activity_window_ms` has passed. Checks every running session a
/// few times per window, with atomics only.
pub fn spawn_activity_sweeper(
    manager: &Arc<SessionManager>,
    window: Duration,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    let every = (window / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let manager = Arc::downgrade(manager);
    tracker.spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = cancel.cancelled() => return,
            }
            let Some(manager) = manager.upgrade() else {
                return;
            };
            for session in manager.all() {
                session.note_activity();
            }
        }
    });
}
