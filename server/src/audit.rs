//! The audit log: who did what to which session, one structured log line each, under the
//! target `moorline::audit` (filter on it, e.g. `log = "info,moorline::audit=info"`, or pick
//! the lines out of a JSON log by their `target`).
//!
//! Logged: every session create, restart and delete, and every settled approval request,
//! whether a person answered it (`by = "client"`, with `user`), the instance's policy allowed it
//! (`by = "policy"`) or its timeout answered (`by = "timeout"`). Approvals decided in a keeper
//! (durable runtimes) are reported to the server over the keeper's socket and logged here too.
//! Tool inputs are never logged (they may carry secrets): the tool's name and request id only.
//! Each line carries `at_ms` (milliseconds since the Unix epoch) besides the log's own time.

use moorline_adapters::pipeline::Resolution;

use crate::clock::now_ms;

/// A session was created, restarted or deleted (`action`) by `user`.
pub(crate) fn session(action: &str, user: &str, session: &str, instance: &str) {
    tracing::info!(
        target: "moorline::audit",
        action,
        user,
        session,
        instance,
        at_ms = now_ms(),
        "audit: session {action}"
    );
}

/// A project was added or removed.
pub(crate) fn project(action: &str, user: &str, project: &str) {
    tracing::info!(
        target: "moorline::audit",
        action,
        user,
        project,
        at_ms = now_ms(),
        "audit: project {action}"
    );
}

/// An approval request of `session` was settled.
pub(crate) fn approval(session: &str, instance: &str, r: &Resolution) {
    tracing::info!(
        target: "moorline::audit",
        action = "approval",
        user = r.user.as_deref().unwrap_or("-"),
        by = %r.by,
        session,
        instance,
        request = %r.id,
        tool = r.tool.as_deref().unwrap_or("-"),
        decision = %r.decision,
        at_ms = now_ms(),
        "audit: approval {}",
        r.decision
    );
}
