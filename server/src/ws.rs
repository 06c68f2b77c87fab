//! The per-session WebSocket: client frames become agent stdin lines; agent lines become
//! frames, one per line, to every client.
//!
//! Opt-in extras (amarre clients never see them unless they ask):
//! - `?hello=1`: the first frame is `amarre.hello`, with the session's newest sequence number,
//!   the server's capabilities and who the server takes the client for (`user`);
//! - `?since=N`: the client first receives every retained line after sequence number N, then live
//!   lines, with no gap and no duplicate (implies `hello`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;

use crate::agentio::Input;
use crate::api::{AppState, text};
use crate::fanout::{Read, ReadLimit};
use crate::framing::inbound_line;
use crate::journal::DiskRead;
use crate::runtime::ExitInfo;
use crate::security::Identity;
use crate::session::{ClientGuard, Lifecycle, Session, Status};

/// Protocol version announced in `amarre.hello`.
pub const PROTOCOL_VERSION: &str = "2.3.0";

/// Capabilities announced in `amarre.hello`.
pub const CAPABILITIES: &[&str] = &[
    "hello",
    "replay",
    "line_dropped",
    "exit_event",
    "lag_close",
    "approvals",
];

/// Close code for a client that fell behind further than the journal reaches.
pub const CLOSE_LAGGED: u16 = close_code::AGAIN;

/// What a client asked for in the query string.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Options {
    since: Option<u64>,
    hello: bool,
}

fn parse_query(query: Option<&str>) -> Result<Options, &'static str> {
    let mut opts = Options::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "since" => {
                opts.since = Some(
                    value
                        .parse()
                        .map_err(|_| "since must be a sequence number\n")?,
                );
                opts.hello = true;
            }
            "hello" => opts.hello = !matches!(value, "0" | "false"),
            _ => {}
        }
    }
    Ok(opts)
}

/// Checks everything that can be refused with a plain HTTP answer, then upgrades.
pub fn connect(
    app: AppState,
    id: String,
    query: Option<&str>,
    upgrade: WebSocketUpgrade,
    identity: Identity,
) -> Response {
    let opts = match parse_query(query) {
        Ok(o) => o,
        Err(msg) => return text(StatusCode::BAD_REQUEST, msg),
    };
    let Some(session) = app.sessions.get(&id) else {
        return text(StatusCode::NOT_FOUND, "Session not found\n");
    };
    let status = session.status();
    // A session that is not running can still be replayed by a client that asks for it.
    if status != Status::Running && opts.since.is_none() {
        let body = format!("Session {}; restart it first\n", status.as_str());
        return (
            StatusCode::CONFLICT,
            [("content-type", "text/plain;charset=utf-8")],
            body,
        )
            .into_response();
    }
    let limit = app.limits.max_clients_per_session;
    let Some(guard) = session.try_add_client(limit) else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(json!({"error": "max_clients_reached", "limit": limit})),
        )
            .into_response();
    };
    // Where live delivery starts: taken before the client can send anything, so the answer to
    // a line sent right after the handshake is never mistaken for older output.
    let newest = session.hub().last_seq();
    // Counted from before the upgrade completes: a server stopping right after the handshake
    // still closes this client with 1001 instead of dropping the connection.
    let in_flight = app.tracker.token();
    let max = app.limits.max_inbound_frame_bytes;
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        // tungstenite zeroes its read buffer before every read: keep it small.
        .read_buffer_size(16 * 1024)
        .write_buffer_size(256 * 1024)
        .max_write_buffer_size(app.limits.max_line_bytes + (4 << 20))
        .on_upgrade(move |socket| async move {
            Client::new(app, session, guard, opts, newest, identity)
                .run(socket)
                .await;
            // Held until the client is closed, so shutdown waits for its close frame.
            drop(in_flight);
        })
}

/// How a connection ended, decided by either half.
#[derive(Debug)]
enum End {
    /// The client closed or vanished: nothing more to send.
    Gone,
    /// Send this close frame.
    Close(u16, String),
}

struct Client {
    app: AppState,
    session: Arc<Session>,
    _guard: ClientGuard,
    opts: Options,
    /// The session's newest sequence number when the client connected.
    newest: u64,
    /// Who the client is: its lines reach the agent's pipeline with this identity.
    identity: Identity,
}

impl Client {
    fn new(
        app: AppState,
        session: Arc<Session>,
        guard: ClientGuard,
        opts: Options,
        newest: u64,
        identity: Identity,
    ) -> Self {
        Self {
            app,
            session,
            _guard: guard,
            opts,
            newest,
            identity,
        }
    }

    async fn run(self, socket: WebSocket) {
        self.app.metrics.clients.inc();
        let (mut sink, stream) = socket.split();
        let id = self.session.id().to_owned();
        let end = {
            let reader = read_client(&self, stream);
            let writer = self.write_client(&mut sink);
            tokio::select! {
                end = reader => end,
                end = writer => end,
            }
        };
        if let End::Close(code, reason) = end {
            tracing::debug!(session = %id, code, %reason, "closing client");
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            };
            // The client may already be gone; nothing else to do then.
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                sink.send(Message::Close(Some(frame))),
            )
            .await;
        }
        self.app.metrics.clients.dec();
    }

    /// Sends the hello (if asked), replay and live lines, and lifecycle events.
    async fn write_client(&self, sink: &mut SplitSink<WebSocket, Message>) -> End {
        let hub = self.session.hub().clone();
        let mut seq_rx = hub.subscribe();
        let mut lifecycle = self.session.lifecycle();
        let limit = ReadLimit::default();
        let stall = self.app.limits.client_stall();
        let newest = self.newest;
        let mut cursor = self.opts.since.map_or(newest + 1, |s| s.saturating_add(1));
        if self.opts.hello {
            let first = hub.first_retained();
            let missed = first.saturating_sub(cursor);
            cursor = cursor.max(first).min(newest + 1);
            let hello = self.hello_frame(newest, first, cursor, missed);
            if send_batch(sink, vec![Message::Text(hello.into())], stall)
                .await
                .is_err()
            {
                return self.stalled();
            }
        }
        // The run whose end this client must report; an exit seen before we started counts.
        let mut exited: Option<(ExitInfo, u64)> = match *lifecycle.borrow_and_update() {
            Lifecycle::Exited { exit, last_seq, .. } => Some((exit, last_seq)),
            _ => None,
        };
        loop {
            // Deliver everything available from the cursor on.
            loop {
                let lines = match hub.read(cursor, limit) {
                    Read::UpToDate => break,
                    Read::Lines(lines) => lines,
                    Read::Disk(plan) => {
                        match tokio::task::spawn_blocking(move || plan.read()).await {
                            Ok(Ok(DiskRead::Lines(lines))) if !lines.is_empty() => lines,
                            Ok(Ok(_)) => return self.lagged(cursor, hub.first_retained()),
                            Ok(Err(e)) => {
                                tracing::error!(session = %self.session.id(), error = %e, "cannot read journal");
                                return End::Close(
                                    close_code::ERROR,
                                    "cannot read session output".into(),
                                );
                            }
                            Err(_) => {
                                return End::Close(close_code::ERROR, "internal error".into());
                            }
                        }
                    }
                    Read::Gone { first_retained } => return self.lagged(cursor, first_retained),
                };
                let n = lines.len() as u64;
                let mut frames = Vec::with_capacity(lines.len());
                for line in lines {
                    match Utf8Bytes::try_from(line) {
                        Ok(text) => frames.push(Message::Text(text)),
                        // Journal lines are validated when written; a corrupt file is not
                        // forwarded as a half-line.
                        Err(_) => frames.push(Message::Text(Utf8Bytes::from_static(
                            r#"{"type":"amarre.line_dropped","reason":"invalid_utf8","bytes":0,"preview":""}"#,
                        ))),
                    }
                }
                if send_batch(sink, frames, stall).await.is_err() {
                    return self.stalled();
                }
                self.app.metrics.deliveries.inc_by(n);
                cursor += n;
            }
            if let Some((exit, last_seq)) = exited
                && cursor > last_seq
            {
                return self.exit_event(sink, exit, stall).await;
            }
            tokio::select! {
                changed = seq_rx.changed() => {
                    if changed.is_err() {
                        return End::Close(close_code::AWAY, "session closed".into());
                    }
                }
                changed = lifecycle.changed() => {
                    if changed.is_err() {
                        return End::Close(close_code::AWAY, "session closed".into());
                    }
                    match *lifecycle.borrow_and_update() {
                        Lifecycle::Deleted => return End::Close(close_code::NORMAL, "session deleted".into()),
                        Lifecycle::Exited { exit, last_seq, .. } => exited = Some((exit, last_seq)),
                        Lifecycle::Running { .. } => {}
                    }
                }
                () = self.app.shutdown.cancelled() => {
                    return End::Close(close_code::AWAY, "server shutting down".into());
                }
            }
        }
    }

    fn hello_frame(&self, newest: u64, first: u64, replay_from: u64, missed: u64) -> String {
        let summary = self.session.summary();
        json!({
            "type": "amarre.hello",
            "version": PROTOCOL_VERSION,
            "server": concat!("moorline/", env!("CARGO_PKG_VERSION")),
            "sessionId": summary.id,
            "instanceId": summary.instance_id,
            "agent": {"name": summary.agent},
            "status": summary.status,
            "seq": newest,
            "firstSeq": first,
            "replayFrom": replay_from,
            "missed": missed,
            "capabilities": CAPABILITIES,
            "pendingApprovals": summary.pending_approvals,
            "user": &*self.identity.user,
        })
        .to_string()
    }

    async fn exit_event(
        &self,
        sink: &mut SplitSink<WebSocket, Message>,
        exit: ExitInfo,
        stall: Duration,
    ) -> End {
        let event = if exit.is_success() {
            "exited"
        } else {
            "crashed"
        };
        let mut frame = json!({
            "type": "amarre.session_event",
            "event": event,
            "exitCode": exit.code,
            "signal": exit.signal_name(),
        });
        // A start failure says why, after amarre's keys.
        if let Some(error) = self.session.last_error() {
            frame["error"] = error.into();
        }
        let frame = frame.to_string();
        if send_batch(sink, vec![Message::Text(frame.into())], stall)
            .await
            .is_err()
        {
            return self.stalled();
        }
        if exit.is_success() {
            End::Close(close_code::NORMAL, "agent exited".into())
        } else {
            End::Close(close_code::ERROR, "agent crashed".into())
        }
    }

    fn lagged(&self, cursor: u64, first_retained: u64) -> End {
        let last = cursor.saturating_sub(1);
        tracing::warn!(session = %self.session.id(), last_seq = last, first_retained, "client fell behind the journal");
        self.app
            .metrics
            .clients_dropped
            .get_or_create(&[("reason", "lagged")])
            .inc();
        End::Close(
            CLOSE_LAGGED,
            format!("lagged: last_seq={last} first_retained={first_retained}"),
        )
    }

    fn stalled(&self) -> End {
        tracing::warn!(session = %self.session.id(), "client stopped reading; disconnecting it");
        self.app
            .metrics
            .clients_dropped
            .get_or_create(&[("reason", "stalled")])
            .inc();
        End::Gone
    }
}

/// Feeds `frames` and flushes once. Fails if the client takes longer than `stall` to accept
/// any one frame or the final flush: a slow reader that keeps reading stays connected.
async fn send_batch(
    sink: &mut SplitSink<WebSocket, Message>,
    frames: Vec<Message>,
    stall: Duration,
) -> Result<(), ()> {
    // A feed only waits when the write buffer is full, so each timeout covers at most one
    // buffer's worth (or one frame) of progress.
    for frame in frames {
        match tokio::time::timeout(stall, sink.feed(frame)).await {
            Ok(Ok(())) => {}
            _ => return Err(()),
        }
    }
    match tokio::time::timeout(stall, sink.flush()).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Forwards client frames to the agent until the client leaves or breaks a rule.
async fn read_client(client: &Client, mut stream: SplitStream<WebSocket>) -> End {
    let stdin: Option<mpsc::Sender<Input>> = client.session.stdin();
    let metrics = &client.app.metrics;
    loop {
        let message = match stream.next().await {
            None => return End::Gone,
            Some(Ok(m)) => m,
            Some(Err(e)) => return read_error(client, e),
        };
        let data: Bytes = match message {
            Message::Text(text) => Bytes::from(text),
            // amarre forwards binary frames as text; only valid UTF-8 can be a JSON line.
            Message::Binary(bin) => {
                if std::str::from_utf8(&bin).is_err() {
                    return End::Close(
                        close_code::INVALID,
                        "binary frame is not valid UTF-8".into(),
                    );
                }
                bin
            }
            // tungstenite answers the close on the next read, which then ends the stream.
            Message::Close(_) => continue,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        let Some(tx) = &stdin else {
            // Like amarre: frames for a session whose agent is not running are dropped.
            continue;
        };
        let line = data.slice_ref(inbound_line(&data));
        metrics.lines_in.inc();
        metrics.bytes_in.inc_by(line.len() as u64 + 1);
        client.session.count_input();
        let input = Input {
            line,
            user: Some(client.identity.user.clone()),
        };
        if tx.send(input).await.is_err() {
            // The agent exited; the writer half reports it.
            continue;
        }
    }
}

fn read_error(client: &Client, err: axum::Error) -> End {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::error::CapacityError;
    let inner = err.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
            tracing::warn!(session = %client.session.id(), size, max_size, "client frame too large");
            End::Close(
                close_code::SIZE,
                format!("message of {size} bytes exceeds the limit of {max_size}"),
            )
        }
        Some(WsError::Utf8(_)) => {
            End::Close(close_code::INVALID, "text frame is not valid UTF-8".into())
        }
        _ => End::Gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_options() {
        assert_eq!(parse_query(None), Ok(Options::default()));
        assert_eq!(parse_query(Some("foo=1")), Ok(Options::default()));
        assert_eq!(
            parse_query(Some("since=5")),
            Ok(Options {
                since: Some(5),
                hello: true
            })
        );
        assert_eq!(
            parse_query(Some("hello=1")),
            Ok(Options {
                since: None,
                hello: true
            })
        );
        assert!(parse_query(Some("since=x")).is_err());
    }
}
