//! `GET /events`: the session event bus ([`crate::events`]) as server-sent events.
//!
//! A new subscriber first gets a `snapshot` (every session it may see), then events. Each
//! frame's SSE `id` is `<epoch>-<seq>`; a client that reconnects with it (`Last-Event-ID`, as
//! browsers' `EventSource` do by themselves, or `?since=`) gets exactly the events it missed,
//! or a fresh snapshot when they are no longer retained or the server restarted. Nothing is
//! skipped silently: a subscriber that falls behind is sent a snapshot too.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use crate::wire::Snapshot;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, broadcast};

use crate::api::AppState;
use crate::error::ApiError;
use crate::events::{Event, Since};
use crate::security::Identity;

/// Where a client wants to resume: `(epoch, seq)`.
fn parse_token(token: &str) -> Option<(&str, u64)> {
    let (epoch, seq) = token.trim().rsplit_once('-')?;
    Some((epoch, seq.parse().ok()?))
}

/// The `since` query parameter, if present.
fn since_param(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("since="))
}

/// `GET /events`.
pub(crate) async fn events(
    State(app): State<AppState>,
    identity: Identity,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let bus = app.sessions.events().clone();
    let permit = bus.admit_stream().ok_or(ApiError::MaxEventStreams {
        limit: app.limits.max_event_streams,
    })?;
    // `Last-Event-ID` (what EventSource sends) wins over `?since=`; an unreadable header is
    // a fresh start, an unreadable parameter a client error.
    let header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let resume = match (header, since_param(query.as_deref())) {
        (Some(h), _) => parse_token(&h).map(|(e, s)| (e.to_owned(), s)),
        (None, Some(p)) => Some(parse_token(p).map(|(e, s)| (e.to_owned(), s)).ok_or_else(
            || ApiError::InvalidField {
                field: "since".into(),
                message: "must be an event id as sent in the stream (<epoch>-<seq>)".into(),
            },
        )?),
        (None, None) => None,
    };
    let mut queue = VecDeque::new();
    let rx = match resume.map(|(epoch, seq)| bus.subscribe_since(&epoch, seq)) {
        Some((Since::Replay(events), rx)) => {
            queue.extend(events.iter().filter_map(|e| frame(&app, &identity, e)));
            rx
        }
        Some((Since::Gap, rx)) => {
            // Everything after the subscription is on `rx`; the snapshot is at least as new.
            queue.push_back(snapshot(&app, &identity, bus.last_seq()));
            rx
        }
        None => {
            let (last, rx) = bus.subscribe_now();
            queue.push_back(snapshot(&app, &identity, last));
            rx
        }
    };
    let state = Stream {
        app,
        identity,
        rx,
        queue,
        _permit: permit,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        let frame = s.next().await?;
        Some((Ok::<_, Infallible>(frame), s))
    });
    let mut resp = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    // Proxies (tailscale serve included) must pass frames on as they come.
    resp.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    Ok(resp)
}

struct Stream {
    app: AppState,
    identity: Identity,
    rx: broadcast::Receiver<Arc<Event>>,
    queue: VecDeque<SseEvent>,
    /// This stream's place among `limits.max_event_streams`, given back when it ends.
    _permit: OwnedSemaphorePermit,
}

impl Stream {
    /// The next frame; `None` ends the stream (the server is shutting down).
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(frame) = self.queue.pop_front() {
                return Some(frame);
            }
            let received = tokio::select! {
                r = self.rx.recv() => r,
                () = self.app.shutdown.cancelled() => return None,
            };
            match received {
                Ok(event) => {
                    if let Some(frame) = frame(&self.app, &self.identity, &event) {
                        return Some(frame);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "event subscriber lagged; sending a snapshot");
                    let bus = self.app.sessions.events();
                    // Events still queued on `rx` are newer than nothing the snapshot holds
                    // back: applied on top of it, they converge on the current state.
                    let last = bus.last_seq();
                    return Some(snapshot(&self.app, &self.identity, last));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// Whether `identity` may see sessions of `instance_id` (one no longer configured falls under
/// the server's rule alone, which the request already passed).
fn visible(app: &AppState, identity: &Identity, instance_id: &str) -> bool {
    match app
        .sessions
        .instances()
        .find(|i| i.config.id == instance_id)
    {
        Some(instance) => identity.check_instance(instance).is_ok(),
        None => true,
    }
}

fn token(app: &AppState, seq: u64) -> String {
    format!("{}-{seq}", app.sessions.events().epoch())
}

/// An event as an SSE frame, unless `identity` may not see its session.
fn frame(app: &AppState, identity: &Identity, event: &Event) -> Option<SseEvent> {
    if !visible(app, identity, &event.instance_id) {
        return None;
    }
    let data = serde_json::to_string(event).ok()?;
    Some(SseEvent::default().id(token(app, event.seq)).data(data))
}

/// Every session `identity` may see, as of event `seq`.
fn snapshot(app: &AppState, identity: &Identity, seq: u64) -> SseEvent {
    let mut sessions = app.sessions.list();
    sessions.retain(|s| visible(app, identity, &s.instance_id));
    let data = serde_json::to_string(&Snapshot { seq, sessions }).unwrap_or_default();
    // Browsers wait 3 s by default before reconnecting; a restarted server is back sooner.
    SseEvent::default()
        .id(token(app, seq))
        .retry(std::time::Duration::from_secs(1))
        .data(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert_eq!(parse_token("ab12cd34-17"), Some(("ab12cd34", 17)));
        assert_eq!(parse_token(" ab-0 "), Some(("ab", 0)));
        assert_eq!(parse_token("17"), None);
        assert_eq!(parse_token("ab-x"), None);
        assert_eq!(since_param(Some("a=1&since=e-3")), Some("e-3"));
        assert_eq!(since_param(Some("a=1")), None);
    }
}
