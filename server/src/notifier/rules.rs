//! When to notify, the same for every channel: what the session event bus says, turned into
//! decisions. Pure bookkeeping (no I/O, no clock of its own) so every rule is unit-tested.
//!
//! - An approval request (a dialog: pi's `notify`/`setStatus` never reach the bus, unlike in
//!   amarre, its bug R8) is armed when it appears and due `grace` later; an answer, the end of
//!   the run or the deletion of the session disarms it. When it is due, the notifier still
//!   checks that it waits and that no client sent anything since it appeared.
//! - A finished turn is notified if no client watches the session.
//! - A crash is always notified; an exit with code 0 only if no client watched.

use std::collections::HashMap;

use serde_json::Value;

use super::message::Trigger;
use crate::events::{Event, EventKind};
use crate::session::{SessionSummary, Status};

/// What to do about an event.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Notify now (unless it was sent before).
    Notify {
        trigger: Trigger,
        key: String,
        summary: Box<SessionSummary>,
    },
    /// Nothing, for this reason (counted in `/metrics`).
    Skip {
        trigger: Trigger,
        outcome: &'static str,
    },
}

/// An armed approval request.
#[derive(Debug, Clone)]
pub(crate) struct Armed {
    pub(crate) session_id: String,
    pub(crate) request_id: String,
    /// The session's client line count when it appeared: more input since is activity.
    pub(crate) inputs: u64,
    pub(crate) due_ms: u64,
    pub(crate) request: Value,
}

impl Armed {
    /// The key that makes it notified at most once.
    pub(crate) fn key(&self) -> String {
        request_key(&self.session_id, &self.request_id)
    }
}

pub(crate) fn request_key(session: &str, request: &str) -> String {
    format!("{session}/request/{request}")
}

/// What [`Rules::arm`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Armament {
    /// Armed (or it already was).
    Armed,
    /// Notified before (by this or an earlier run of the server): never again.
    Sent,
    /// Not a dialog request.
    NotADialog,
}

/// The rules' state: the armed requests.
#[derive(Debug)]
pub(crate) struct Rules {
    grace_ms: u64,
    turn_finished: bool,
    exited: bool,
    armed: HashMap<(String, String), Armed>,
}

impl Rules {
    pub(crate) fn new(config: &crate::config::NotifyConfig) -> Self {
        Self {
            grace_ms: config.grace_ms,
            turn_finished: config.turn_finished,
            exited: config.exited,
            armed: HashMap::new(),
        }
    }

    /// Applies one event. `already_sent` tells requests notified before (by an earlier run of
    /// the server) apart, so they are not armed again.
    pub(crate) fn on_event(
        &mut self,
        event: &Event,
        already_sent: impl Fn(&str) -> bool,
    ) -> Vec<Decision> {
        let sid = &event.session_id;
        match &event.kind {
            EventKind::ApprovalPending {
                request, inputs, ..
            } => {
                if self.arm(sid, request, event.at, *inputs, &already_sent) == Armament::Sent {
                    return vec![Decision::Skip {
                        trigger: Trigger::AwaitingInput,
                        outcome: "duplicate",
                    }];
                }
                Vec::new()
            }
            EventKind::ApprovalResolved { resolution, .. } => {
                if self
                    .armed
                    .remove(&(sid.clone(), resolution.id.clone()))
                    .is_some()
                {
                    vec![Decision::Skip {
                        trigger: Trigger::AwaitingInput,
                        outcome: "answered",
                    }]
                } else {
                    Vec::new()
                }
            }
            EventKind::TurnEnded { session } => {
                if !self.turn_finished {
                    return Vec::new();
                }
                if session.clients > 0 {
                    return vec![Decision::Skip {
                        trigger: Trigger::TurnFinished,
                        outcome: "watched",
                    }];
                }
                vec![Decision::Notify {
                    trigger: Trigger::TurnFinished,
                    key: format!("{sid}/turn/{}/{}", session.spawned_at, session.last_seq),
                    summary: Box::new(session.clone()),
                }]
            }
            EventKind::SessionStatus { session } => {
                if session.status == Status::Running {
                    return Vec::new();
                }
                self.disarm_session(sid);
                let key = format!("{sid}/exit/{}", session.spawned_at);
                match session.status {
                    Status::Crashed => vec![Decision::Notify {
                        trigger: Trigger::Crashed,
                        key,
                        summary: Box::new(session.clone()),
                    }],
                    Status::Exited if !self.exited => Vec::new(),
                    Status::Exited if session.clients > 0 => vec![Decision::Skip {
                        trigger: Trigger::Exited,
                        outcome: "watched",
                    }],
                    Status::Exited => vec![Decision::Notify {
                        trigger: Trigger::Exited,
                        key,
                        summary: Box::new(session.clone()),
                    }],
                    Status::Running | Status::Stopped => Vec::new(),
                }
            }
            EventKind::SessionDeleted {} => {
                self.disarm_session(sid);
                Vec::new()
            }
            EventKind::SessionCreated { .. } | EventKind::SessionActivity { .. } => Vec::new(),
        }
    }

    /// Arms `request` of session `sid`, which appeared at `at` (ms) after the session had
    /// received `inputs` client lines, unless it is armed or was notified already.
    pub(crate) fn arm(
        &mut self,
        sid: &str,
        request: &Value,
        at: u64,
        inputs: u64,
        already_sent: &impl Fn(&str) -> bool,
    ) -> Armament {
        let Some((id, _)) = moorline_adapters::pipeline::answer_request(
            request,
            moorline_adapters::pipeline::Decision::Deny,
            "",
        ) else {
            return Armament::NotADialog;
        };
        if already_sent(&request_key(sid, &id)) {
            return Armament::Sent;
        }
        self.armed
            .entry((sid.to_owned(), id.clone()))
            .or_insert_with(|| Armed {
                session_id: sid.to_owned(),
                request_id: id,
                inputs,
                due_ms: at.saturating_add(self.grace_ms),
                request: request.clone(),
            });
        Armament::Armed
    }

    /// Forgets every armed request of `sid`.
    pub(crate) fn disarm_session(&mut self, sid: &str) {
        self.armed.retain(|(s, _), _| s != sid);
    }

    /// Keeps only the armed requests `keep` accepts (after a resynchronisation).
    pub(crate) fn retain(&mut self, keep: impl Fn(&Armed) -> bool) {
        self.armed.retain(|_, a| keep(a));
    }

    /// When the next armed request is due, ms since the epoch.
    pub(crate) fn next_due(&self) -> Option<u64> {
        self.armed.values().map(|a| a.due_ms).min()
    }

    /// Takes the requests due at `now_ms`.
    pub(crate) fn take_due(&mut self, now_ms: u64) -> Vec<Armed> {
        let due: Vec<(String, String)> = self
            .armed
            .iter()
            .filter(|(_, a)| a.due_ms <= now_ms)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out: Vec<Armed> = due
            .into_iter()
            .filter_map(|k| self.armed.remove(&k))
            .collect();
        out.sort_by_key(|a| a.due_ms);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use moorline_adapters::pipeline::Resolution;
    use serde_json::json;

    use super::*;
    use crate::notifier::tests::summary;

    fn event(kind: EventKind) -> Arc<Event> {
        Arc::new(Event {
            seq: 1,
            at: 1_000,
            session_id: "s1".into(),
            instance_id: "i".into(),
            kind,
        })
    }

    fn rules() -> Rules {
        Rules::new(&crate::config::NotifyConfig {
            grace_ms: 200,
            ..Default::default()
        })
    }

    fn ask(id: &str) -> EventKind {
        EventKind::ApprovalPending {
            request: json!({"type":"extension_ui_request","id":id,"method":"confirm","title":"Run bash?","message":"ls"}),
            session: summary("s"),
            inputs: 4,
        }
    }

    #[test]
    fn a_request_is_due_after_the_grace_period_unless_answered() {
        let mut r = rules();
        r.on_event(&event(ask("A")), |_| false);
        r.on_event(&event(ask("A")), |_| false);
        r.on_event(&event(ask("B")), |_| false);
        assert_eq!(r.next_due(), Some(1_200));
        assert!(r.take_due(1_199).is_empty());
        let answered = r.on_event(
            &event(EventKind::ApprovalResolved {
                resolution: Resolution {
                    id: "B".into(),
                    decision: "allow".into(),
                    by: "client".into(),
                    user: None,
                    tool: None,
                },
                session: summary("s"),
            }),
            |_| false,
        );
        assert!(matches!(
            answered[..],
            [Decision::Skip {
                outcome: "answered",
                ..
            }]
        ));
        let due = r.take_due(1_200);
        assert_eq!(due.len(), 1, "one per request, the answered one not at all");
        assert_eq!((due[0].request_id.as_str(), due[0].inputs), ("A", 4));
        assert_eq!(due[0].key(), "s1/request/A");
        assert!(r.take_due(5_000).is_empty() && r.next_due().is_none());
    }

    #[test]
    fn requests_sent_before_a_restart_are_not_armed_again() {
        let mut r = rules();
        let d = r.on_event(&event(ask("A")), |k| k == "s1/request/A");
        assert!(matches!(
            d[..],
            [Decision::Skip {
                outcome: "duplicate",
                ..
            }]
        ));
        assert!(r.next_due().is_none());
    }

    #[test]
    fn the_end_of_a_run_disarms_and_notifies_crashes_always_exits_when_unwatched() {
        let mut r = rules();
        r.on_event(&event(ask("A")), |_| false);
        let mut crashed = summary("s");
        crashed.status = Status::Crashed;
        crashed.clients = 3;
        let d = r.on_event(
            &event(EventKind::SessionStatus { session: crashed }),
            |_| false,
        );
        assert!(
            matches!(&d[..], [Decision::Notify { trigger: Trigger::Crashed, key, .. }] if key == "s1/exit/0")
        );
        assert!(r.next_due().is_none(), "the run's requests are gone");
        let mut exited = summary("s");
        exited.status = Status::Exited;
        exited.clients = 1;
        let d = r.on_event(
            &event(EventKind::SessionStatus {
                session: exited.clone(),
            }),
            |_| false,
        );
        assert!(matches!(
            d[..],
            [Decision::Skip {
                outcome: "watched",
                ..
            }]
        ));
        exited.clients = 0;
        let d = r.on_event(&event(EventKind::SessionStatus { session: exited }), |_| {
            false
        });
        assert!(matches!(
            d[..],
            [Decision::Notify {
                trigger: Trigger::Exited,
                ..
            }]
        ));
    }

    #[test]
    fn a_finished_turn_is_notified_only_when_nobody_watches() {
        let mut r = rules();
        let mut s = summary("s");
        s.clients = 1;
        let d = r.on_event(&event(EventKind::TurnEnded { session: s.clone() }), |_| {
            false
        });
        assert!(matches!(
            d[..],
            [Decision::Skip {
                outcome: "watched",
                ..
            }]
        ));
        s.clients = 0;
        let d = r.on_event(&event(EventKind::TurnEnded { session: s }), |_| false);
        assert!(matches!(
            d[..],
            [Decision::Notify {
                trigger: Trigger::TurnFinished,
                ..
            }]
        ));
    }

    #[test]
    fn fire_and_forget_ui_requests_are_never_armed() {
        let mut r = rules();
        let notify = EventKind::ApprovalPending {
            request: json!({"type":"extension_ui_request","id":"N","method":"notify","message":"hi"}),
            session: summary("s"),
            inputs: 0,
        };
        r.on_event(&event(notify), |_| false);
        assert!(r.next_due().is_none());
    }
}
