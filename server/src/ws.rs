//! The per-session WebSocket: client frames become agent stdin lines; agent lines become
//! frames, one per line, to every client.
//!
//! Opt-in extras (amarre clients never see them unless they ask):
//! - `?hello=1`: the first frame is `amarre.hello`, with the session's newest sequence number,
//!   the server's capabilities and who the server takes the client for (`user`);
//! - `?since=N`: the client first receives every retained line after sequence number N, then live
//!   lines, with no gap and no duplicate (implies `hello`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::api::AppState;
use crate::error::ApiError;
use crate::fanout::{DiskRead, Hub, Read, ReadLimit};
use crate::keeper::framing::inbound_line;
use crate::security::Identity;
use crate::session::{
    ClientGuard, ExitInfo, Input, InputSender, Lifecycle, Session, SessionError, Status,
};
use crate::wire::{Hello, HelloAgent, SessionEvent};

/// Protocol version announced in `amarre.hello`.
pub(crate) const PROTOCOL_VERSION: &str = "2.3.0";

/// Capabilities announced in `amarre.hello`.
pub(crate) const CAPABILITIES: &[&str] = &[
    "hello",
    "replay",
    "line_dropped",
    "exit_event",
    "lag_close",
    "approvals",
];

/// Close code for a client that fell behind further than the journal reaches.
pub(crate) const CLOSE_LAGGED: u16 = 1013;

/// Close codes used here (RFC 6455 §7.4.1).
mod close_code {
    pub(super) const NORMAL: u16 = 1000;
    pub(super) const AWAY: u16 = 1001;
    pub(super) const INVALID: u16 = 1007;
    pub(super) const SIZE: u16 = 1009;
    pub(super) const ERROR: u16 = 1011;
}

/// tungstenite's write buffer: frames are written out once this much has queued up. Pongs
/// owed to a client whose socket accepts nothing may not exceed it (see [`read_client`]).
const WRITE_BUFFER: usize = 256 * 1024;

/// The type of the upgraded socket.
type Socket = WebSocketStream<Metered<Box<dyn Io>>>;

/// A client's byte stream.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The upgraded connection as the socket it is, when it is TCP, so its send buffer can be
/// sized; with the bytes the HTTP server had already read past the request.
fn into_io(upgraded: hyper::upgrade::Upgraded, send_buffer: usize) -> (Box<dyn Io>, Bytes) {
    type Tcp = TokioIo<tokio::net::TcpStream>;
    let tcp = |io: Tcp| -> Box<dyn Io> {
        let tcp = io.into_inner();
        // The kernel reports a socket writable only once a good part of its send buffer is
        // free; with an autotuned buffer of megabytes a slow reader's progress would be
        // invisible for longer than the stall limit.
        if send_buffer > 0 {
            let _ =
                nix::sys::socket::setsockopt(&tcp, nix::sys::socket::sockopt::SndBuf, &send_buffer);
        }
        Box::new(tcp)
    };
    let upgraded = match hyper_util::server::conn::auto::upgrade::downcast::<Tcp>(upgraded) {
        Ok(parts) => return (tcp(parts.io), parts.read_buf),
        Err(u) => u,
    };
    match upgraded.downcast::<Tcp>() {
        Ok(parts) => (tcp(parts.io), parts.read_buf),
        Err(u) => (Box::new(TokioIo::new(u)), Bytes::new()),
    }
}

/// What a client asked for in the query string (`?since=N`, `?hello=1`); unknown keys are
/// ignored. Extracted only for an upgrade: REST routes ignore the query.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Options {
    since: Option<u64>,
    hello: bool,
}

/// The query string as sent.
#[derive(Debug, serde::Deserialize)]
struct Query {
    since: Option<u64>,
    hello: Option<String>,
}

impl From<Query> for Options {
    fn from(q: Query) -> Self {
        Self {
            since: q.since,
            // `hello`, `hello=1`: yes; `hello=0`, `hello=false`: no. Replay implies it.
            hello: q.since.is_some() || q.hello.is_some_and(|v| !matches!(&*v, "0" | "false")),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Options {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let axum::extract::Query(query) = axum::extract::Query::<Query>::try_from_uri(&parts.uri)
            .map_err(|e| ApiError::InvalidField {
            field: "query".into(),
            message: e.body_text(),
        })?;
        Ok(query.into())
    }
}

/// A request to upgrade to a WebSocket (HTTP/1.1), taken apart so the server owns the raw
/// socket: the stall rule needs to see the bytes it accepts, and a lingering close needs to
/// half-close it.
#[derive(Debug)]
pub(crate) struct Upgrade {
    accept: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

/// The request is not a WebSocket upgrade.
#[derive(Debug)]
pub(crate) struct NotUpgrade;

impl IntoResponse for NotUpgrade {
    fn into_response(self) -> Response {
        ApiError::InvalidField {
            field: "upgrade".into(),
            message: "not a WebSocket upgrade".into(),
        }
        .into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotUpgrade;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, NotUpgrade> {
        let has = |name: header::HeaderName, token: &str| {
            parts.headers.get_all(name).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            })
        };
        if parts.method != Method::GET
            || !has(header::CONNECTION, "upgrade")
            || !has(header::UPGRADE, "websocket")
            || !has(header::SEC_WEBSOCKET_VERSION, "13")
        {
            return Err(NotUpgrade);
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(NotUpgrade)?;
        let accept = HeaderValue::from_str(
            &tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()),
        )
        .map_err(|_| NotUpgrade)?;
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(NotUpgrade)?;
        Ok(Self { accept, on_upgrade })
    }
}

/// Checks everything that can be refused with a plain HTTP answer (as an [`ApiError`], like
/// every REST refusal), then upgrades.
pub(crate) fn connect(
    app: AppState,
    id: &str,
    opts: Options,
    upgrade: Upgrade,
    identity: Identity,
) -> Result<Response, ApiError> {
    let session = app.sessions.get(id).ok_or(SessionError::NotFound)?;
    let status = session.status();
    // A session that is not running can still be replayed by a client that asks for it.
    if status != Status::Running && opts.since.is_none() {
        return Err(ApiError::NotRunning(status));
    }
    let limit = app.limits.max_clients_per_session;
    let guard = session
        .try_add_client(limit)
        .ok_or(ApiError::MaxClients { limit })?;
    // Where live delivery starts: taken before the client can send anything, so the answer to
    // a line sent right after the handshake is never mistaken for older output.
    let newest = session.hub().last_seq();
    // Counted from before the upgrade completes: a server stopping right after the handshake
    // still closes this client with 1001 instead of dropping the connection.
    let in_flight = app.tracker.token();
    let max = app.limits.max_inbound_frame_bytes;
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        // tungstenite zeroes its read buffer before every read: keep it small.
        .read_buffer_size(16 * 1024)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(app.limits.max_line_bytes + (4 << 20));
    let send_buffer = app.limits.client_send_buffer_bytes;
    let Upgrade { accept, on_upgrade } = upgrade;
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        let progress = Arc::new(Progress::new());
        let (inner, read) = into_io(upgraded, send_buffer);
        let io = Metered {
            inner,
            prefix: read,
            progress: progress.clone(),
        };
        // Not `from_partially_read`: its read buffer, built from a `Vec`, forgets its size once
        // split, and every later read then asks the kernel for a few bytes (one `recv` per frame
        // or more). The bytes read past the request are served by `Metered` instead.
        let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        Client::new(app, session, guard, opts, newest, identity, progress)
            .run(socket)
            .await;
        // Held until the client is closed, so shutdown waits for its close frame.
        drop(in_flight);
    });
    Ok((
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, HeaderValue::from_static("websocket")),
            (header::SEC_WEBSOCKET_ACCEPT, accept),
        ],
    )
        .into_response())
}

/// What the client's socket has accepted: the stall rule measures progress, not speed.
#[derive(Debug)]
struct Progress {
    start: Instant,
    /// Bytes the socket has accepted.
    written: AtomicU64,
    /// Milliseconds after `start` (plus one) at which a write first found the socket full
    /// since it last accepted anything; 0 while writes go through.
    blocked_at: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            written: AtomicU64::new(0),
            blocked_at: AtomicU64::new(0),
        }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Whether data is waiting for a socket that accepts nothing.
    fn blocked(&self) -> bool {
        self.blocked_at.load(Ordering::Relaxed) != 0
    }

    /// Whether the socket has accepted nothing for `stall` while data waited.
    fn stalled(&self, stall: Duration) -> bool {
        match self.blocked_at.load(Ordering::Relaxed) {
            0 => false,
            at => {
                let since = self.start + Duration::from_millis(at - 1);
                since.elapsed() >= stall
            }
        }
    }

    fn on_write(&self, result: &Poll<std::io::Result<usize>>) {
        match result {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.written.fetch_add(*n as u64, Ordering::Relaxed);
                self.blocked_at.store(0, Ordering::Relaxed);
            }
            Poll::Pending if self.blocked_at.load(Ordering::Relaxed) == 0 => {
                let now = self.start.elapsed().as_millis() as u64 + 1;
                self.blocked_at.store(now, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// The client's socket, recording its [`Progress`].
#[derive(Debug)]
struct Metered<S> {
    inner: S,
    /// Bytes the HTTP server read past the upgrade request, read before the socket.
    prefix: Bytes,
    progress: Arc<Progress>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress.on_write(&result);
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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
    progress: Arc<Progress>,
}

impl Client {
    fn new(
        app: AppState,
        session: Arc<Session>,
        guard: ClientGuard,
        opts: Options,
        newest: u64,
        identity: Identity,
        progress: Arc<Progress>,
    ) -> Self {
        Self {
            app,
            session,
            _guard: guard,
            opts,
            newest,
            identity,
            progress,
        }
    }

    async fn run(self, socket: Socket) {
        self.app.metrics.clients.inc();
        let (mut sink, mut stream) = socket.split();
        let id = self.session.id().to_owned();
        let end = {
            let reader = read_client(&self, &mut stream);
            let writer = self.write_client(&mut sink);
            tokio::select! {
                end = reader => end,
                end = writer => end,
            }
        };
        if let End::Close(code, reason) = end {
            tracing::debug!(session = %id, code, %reason, "closing client");
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: Utf8Bytes::from(reason),
            };
            // The client may already be gone; nothing else to do then.
            let sent = tokio::time::timeout(
                Duration::from_secs(5),
                sink.send(Message::Close(Some(frame))),
            )
            .await;
            if let (Ok(Ok(())), Ok(mut socket)) = (sent, sink.reunite(stream)) {
                linger(socket.get_mut(), self.app.limits.close_linger()).await;
            }
        }
        self.app.metrics.clients.dec();
    }

    /// Feeds `frames` and flushes once. Fails only if the socket accepts no byte at all for
    /// `client_stall_ms` (a slow reader that keeps reading stays, however large the frames),
    /// or if the connection breaks.
    async fn send_batch(
        &self,
        sink: &mut SplitSink<Socket, Message>,
        frames: Vec<Message>,
    ) -> Result<(), End> {
        let stall = self.app.limits.client_stall();
        let send = async {
            for frame in frames {
                sink.feed(frame).await?;
            }
            sink.flush().await
        };
        tokio::pin!(send);
        let mut check = tokio::time::interval(check_every(stall));
        loop {
            tokio::select! {
                sent = &mut send => return sent.map_err(|_| End::Gone),
                _ = check.tick() => {
                    if self.progress.stalled(stall) {
                        return Err(self.stalled());
                    }
                }
            }
        }
    }

    /// Sends the hello (if asked), replay and live lines, and lifecycle events.
    async fn write_client(&self, sink: &mut SplitSink<Socket, Message>) -> End {
        let hub = self.session.hub().clone();
        let mut seq_rx = hub.subscribe();
        let mut lifecycle = self.session.lifecycle();
        let mut notices = self.session.notices();
        let mut notices_open = true;
        let limit = ReadLimit::default();
        let check = check_every(self.app.limits.client_stall());
        let newest = self.newest;
        let mut cursor = self.opts.since.map_or(newest + 1, |s| s.saturating_add(1));
        if self.opts.hello {
            let first = hub.first_retained();
            let missed = first.saturating_sub(cursor);
            cursor = cursor.max(first).min(newest + 1);
            let hello = self.hello_frame(newest, first, cursor, missed);
            if let Err(end) = self
                .send_batch(sink, vec![Message::Text(hello.into())])
                .await
            {
                return end;
            }
        }
        // The run whose end this client must report; an exit seen before we started counts.
        let mut exited: Option<(ExitInfo, u64)> = match *lifecycle.borrow_and_update() {
            Lifecycle::Exited { exit, last_seq, .. } => Some((exit, last_seq)),
            _ => None,
        };
        loop {
            if let Err(end) = self.deliver(sink, &hub, &mut cursor, limit).await {
                return end;
            }
            if let Some((exit, last_seq)) = exited
                && cursor > last_seq
            {
                return self.exit_event(sink, exit).await;
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
                notice = notices.recv(), if notices_open => match notice {
                    Ok(frame) => {
                        let frame = Message::Text(Utf8Bytes::from(&*frame));
                        if let Err(end) = self.send_batch(sink, vec![frame]).await {
                            return end;
                        }
                    }
                    // Missed notices are not worth a disconnection.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => notices_open = false,
                },
                () = self.app.shutdown.cancelled() => {
                    return End::Close(close_code::AWAY, "server shutting down".into());
                }
                // Pongs the reader queued wait for a writable socket: push them out, under
                // the same stall rule as output.
                () = tokio::time::sleep(check) => {
                    if self.progress.blocked()
                        && let Err(end) = self.send_batch(sink, Vec::new()).await
                    {
                        return end;
                    }
                }
            }
        }
    }

    /// Sends everything available from `cursor` on, from memory or the journal, and moves the
    /// cursor past it.
    async fn deliver(
        &self,
        sink: &mut SplitSink<Socket, Message>,
        hub: &Hub,
        cursor: &mut u64,
        limit: ReadLimit,
    ) -> Result<(), End> {
        loop {
            let lines = match hub.read(*cursor, limit) {
                Read::UpToDate => return Ok(()),
                Read::Lines(lines) => lines,
                Read::Disk(plan) => match tokio::task::spawn_blocking(move || plan.read()).await {
                    Ok(Ok(DiskRead::Lines(lines))) if !lines.is_empty() => lines,
                    Ok(Ok(_)) => return Err(self.lagged(*cursor, hub.first_retained())),
                    Ok(Err(e)) => {
                        tracing::error!(session = %self.session.id(), error = %e, "cannot read journal");
                        return Err(End::Close(
                            close_code::ERROR,
                            "cannot read session output".into(),
                        ));
                    }
                    Err(_) => {
                        return Err(End::Close(close_code::ERROR, "internal error".into()));
                    }
                },
                Read::Gone { first_retained } => return Err(self.lagged(*cursor, first_retained)),
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
            self.send_batch(sink, frames).await?;
            self.app.metrics.deliveries.inc_by(n);
            *cursor += n;
        }
    }

    fn hello_frame(&self, newest: u64, first: u64, replay_from: u64, missed: u64) -> String {
        let summary = self.session.summary();
        let hello = Hello {
            version: PROTOCOL_VERSION.to_owned(),
            server: concat!("moorline/", env!("CARGO_PKG_VERSION")).to_owned(),
            session_id: summary.id,
            instance_id: summary.instance_id,
            agent: HelloAgent {
                name: summary.agent,
            },
            status: summary.status,
            seq: newest,
            first_seq: first,
            replay_from,
            missed,
            capabilities: CAPABILITIES.iter().map(|c| (*c).to_owned()).collect(),
            pending_approvals: summary.pending_approvals,
            user: self.identity.user.to_string(),
        };
        serde_json::to_string(&hello).unwrap_or_default()
    }

    async fn exit_event(&self, sink: &mut SplitSink<Socket, Message>, exit: ExitInfo) -> End {
        let event = if exit.is_success() {
            "exited"
        } else {
            "crashed"
        };
        let frame = SessionEvent {
            event: event.to_owned(),
            exit_code: exit.code,
            signal: exit.signal_name(),
            // What else is known about the end: `out_of_memory`, `keeper_lost`.
            reason: exit.reason.map(|r| r.as_str().to_owned()),
            // A start failure says why, after amarre's keys.
            error: self.session.last_error(),
        };
        let frame = serde_json::to_string(&frame).unwrap_or_default();
        if let Err(end) = self
            .send_batch(sink, vec![Message::Text(frame.into())])
            .await
        {
            return end;
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

/// How often a waiting writer checks the stall rule.
fn check_every(stall: Duration) -> Duration {
    (stall / 4).max(Duration::from_millis(10))
}

/// A lingering close: after our close frame, the write side is shut and whatever the client
/// still sends is read and discarded for up to `linger`, so a client in the middle of a large
/// message reads the close code instead of a connection reset (which the kernel sends when a
/// socket is closed with unread data).
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, linger: Duration) {
    let _ = tokio::time::timeout(linger, async {
        let _ = io.shutdown().await;
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Most frames one batch of client input takes, and about the most bytes (a single larger frame
/// still goes alone): what a burst costs the agent's input queue stays bounded.
const INPUT_BATCH_LINES: usize = 256;
const INPUT_BATCH_BYTES: usize = 64 * 1024;

/// What one frame from a client comes to.
enum Frame {
    /// A line for the agent.
    Line(Bytes),
    /// Nothing to forward (a control frame).
    Skip,
    /// The client leaves or broke a rule.
    End(End),
}

/// Forwards client frames to the agent until the client leaves or breaks a rule. Frames that
/// have already arrived are forwarded together, as one [`Input`].
async fn read_client(client: &Client, stream: &mut SplitStream<Socket>) -> End {
    let stdin: Option<InputSender> = client.session.stdin();
    let metrics = &client.app.metrics;
    let mut pongs = PongDebt::new(client.progress.written());
    loop {
        let first = match stream.next().await {
            None => return End::Gone,
            Some(next) => client_frame(client, next, &mut pongs),
        };
        let mut lines = match first {
            Frame::Line(line) => vec![line],
            Frame::Skip => continue,
            Frame::End(end) => return end,
        };
        let mut bytes = lines[0].len();
        let mut end = None;
        // Whatever else is already buffered joins this batch, without waiting for more.
        while lines.len() < INPUT_BATCH_LINES && bytes < INPUT_BATCH_BYTES {
            use futures_util::FutureExt;
            let Some(next) = stream.next().now_or_never() else {
                break;
            };
            match next.map(|next| client_frame(client, next, &mut pongs)) {
                Some(Frame::Line(line)) => {
                    bytes += line.len();
                    lines.push(line);
                }
                Some(Frame::Skip) => {}
                Some(Frame::End(e)) => {
                    end = Some(e);
                    break;
                }
                None => {
                    end = Some(End::Gone);
                    break;
                }
            }
        }
        // Like amarre: frames for a session whose agent is not running are dropped.
        if let Some(tx) = &stdin {
            let n = lines.len() as u64;
            metrics.lines_in.inc_by(n);
            metrics.bytes_in.inc_by(bytes as u64 + n);
            client.session.count_inputs(n);
            let input = Input {
                lines,
                user: Some(client.identity.user.clone()),
                budget: None,
            };
            // An error means the agent exited; the writer half reports it.
            let _ = tx.send(input).await;
        }
        if let Some(end) = end {
            return end;
        }
    }
}

/// Pongs owed since the socket last accepted a byte. tungstenite queues one per ping in its
/// write buffer; a client that pings without reading would grow it without bound.
struct PongDebt {
    owed: usize,
    written: u64,
}

impl PongDebt {
    fn new(written: u64) -> Self {
        Self { owed: 0, written }
    }
}

/// Checks one frame from a client and says what it comes to.
fn client_frame(
    client: &Client,
    next: Result<Message, tokio_tungstenite::tungstenite::Error>,
    pongs: &mut PongDebt,
) -> Frame {
    let data: Bytes = match next {
        Err(e) => return Frame::End(read_error(client, e)),
        Ok(Message::Text(text)) => Bytes::from(text),
        // amarre forwards binary frames as text; only valid UTF-8 can be a JSON line.
        Ok(Message::Binary(bin)) => {
            if std::str::from_utf8(&bin).is_err() {
                return Frame::End(End::Close(
                    close_code::INVALID,
                    "binary frame is not valid UTF-8".into(),
                ));
            }
            bin
        }
        // tungstenite answers the close on the next read, which then ends the stream.
        Ok(Message::Close(_) | Message::Pong(_) | Message::Frame(_)) => return Frame::Skip,
        Ok(Message::Ping(payload)) => {
            let now = client.progress.written();
            if now != pongs.written {
                pongs.written = now;
                pongs.owed = 0;
            }
            pongs.owed += payload.len() + 2;
            if pongs.owed > WRITE_BUFFER {
                tracing::warn!(session = %client.session.id(), owed = pongs.owed, "client sends pings but reads no pongs; disconnecting it");
                client
                    .app
                    .metrics
                    .clients_dropped
                    .get_or_create(&[("reason", "unread_pongs")])
                    .inc();
                return Frame::End(End::Gone);
            }
            return Frame::Skip;
        }
    };
    Frame::Line(data.slice_ref(inbound_line(&data)))
}

fn read_error(client: &Client, err: tokio_tungstenite::tungstenite::Error) -> End {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::error::CapacityError;
    match err {
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            tracing::warn!(session = %client.session.id(), size, max_size, "client frame too large");
            End::Close(
                close_code::SIZE,
                format!("message of {size} bytes exceeds the limit of {max_size}"),
            )
        }
        WsError::Utf8(_) => End::Close(close_code::INVALID, "text frame is not valid UTF-8".into()),
        _ => End::Gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_options() {
        let parse = |uri: &str| {
            let uri: axum::http::Uri = uri.parse().expect("uri");
            axum::extract::Query::<Query>::try_from_uri(&uri).map(|q| Options::from(q.0))
        };
        assert_eq!(parse("/s").ok(), Some(Options::default()));
        assert_eq!(parse("/s?foo=1").ok(), Some(Options::default()));
        let replay = Options {
            since: Some(5),
            hello: true,
        };
        assert_eq!(parse("/s?since=5").ok(), Some(replay));
        let hello = Options {
            since: None,
            hello: true,
        };
        assert_eq!(parse("/s?hello=1").ok(), Some(hello));
        assert_eq!(parse("/s?hello").ok(), Some(hello));
        assert_eq!(parse("/s?hello=false").ok(), Some(Options::default()));
        assert!(parse("/s?since=x").is_err());
        assert!(parse("/s?since=").is_err());
    }
}
