//! What sessions tell the event bus ([`crate::events`]): the one place that decides when a
//! change is worth an event, so the hooks elsewhere in the session layer stay one line each.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use moorline_adapters::pipeline::{Decision, Resolution, answer_request};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Activity, Session, SessionManager, Status};
use crate::clock::now_ms;
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
        let mut session = self.summary();
        // The pending file may not be rewritten yet: the summary never lists a settled request.
        session.pending_approvals.retain(|r| {
            answer_request(r, Decision::Deny, "").is_none_or(|(id, _)| id != resolution.id)
        });
        self.publish(EventKind::ApprovalResolved {
            resolution: resolution.clone(),
            session,
        });
    }

    /// What the agent is doing, as far as atomics tell (no file read, no lock): cheap enough
    /// for every output batch. `running`: whether the agent runs.
    fn activity_hint(&self, running: bool) -> Option<Activity> {
        if !running {
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
    /// last one. Called after approval changes and by the sweeper.
    pub(crate) fn note_activity(&self) {
        self.note_activity_if(self.status() == Status::Running);
    }

    /// [`Self::note_activity`] for the output pump, which only runs while the agent does: no
    /// lock on the common path. (A batch racing the agent's exit is harmless: the summary
    /// decides, and an ended session has no activity.)
    pub(crate) fn note_output(&self) {
        self.note_activity_if(true);
    }

    fn note_activity_if(&self, running: bool) {
        let hint = code(self.activity_hint(running));
        if self.activity.published.load(Ordering::Relaxed) == hint {
            return;
        }
        let session = self.summary();
        // The pending file can be ahead of what this server was told (a keeper's doorbell is
        // on its way; an adopted agent's requests from before a restart): count them now, so
        // the hint agrees and the next check costs no file read. They are still announced
        // (`pending_now`) when their news arrives.
        self.activity
            .pending
            .store(session.pending_approvals.len(), Ordering::Relaxed);
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
pub(crate) fn spawn_activity_sweeper(
    manager: &Arc<SessionManager>,
    window: Duration,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    let every = (window / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    super::periodically(manager, tracker, every, cancel, |manager| async move {
        for session in manager.all() {
            session.note_activity();
        }
    });
}
