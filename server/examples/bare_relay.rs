//! Run with
//!
//! ```text
//! cargo run --release -p moorline --example bare_relay -- [PORT]
//! ```
//!
//! The ceiling that moorline's benchmarks are compared against: the least a relay between
//! WebSocket clients and `/bin/cat` can do, with none of moorline's guarantees. No journal, no
//! replay, no limits, no auth, no approvals; a client that falls behind silently loses lines;
//! `DELETE` does not wait for the agent to exit. It speaks just enough of the amarre protocol
//! for the load generator (`GET /instances`, `POST /sessions`, `DELETE /sessions/{id}`, the
//! session WebSocket),
//! on 127.0.0.1 only, on PORT (default: any free port; the address is printed).
//!
//! Running it and moorline in turn on the same machine gives the cost of moorline's
//! guarantees: see docs/BENCHMARKS.md.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::{broadcast, mpsc};

/// One session: the agent's input queue, its output broadcast, and the agent itself (killed
/// when the session is dropped).
struct Relay {
    input: mpsc::Sender<Bytes>,
    output: broadcast::Sender<Bytes>,
    _child: Child,
}

#[derive(Clone, Default)]
struct App {
    sessions: Arc<Mutex<HashMap<String, Relay>>>,
    next_id: Arc<AtomicU64>,
}

impl App {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Relay>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn create(State(app): State<App>) -> Response {
    let id = format!("{:012x}", app.next_id.fetch_add(1, Ordering::Relaxed) + 1);
    let spawned = Command::new("/bin/cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let (input, mut lines) = mpsc::channel::<Bytes>(1024);
    let (output, _) = broadcast::channel::<Bytes>(65536);
    // Input: whatever has queued up goes to cat in one write.
    tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(line) = lines.recv().await {
            buf.clear();
            buf.extend_from_slice(&line);
            buf.push(b'\n');
            while buf.len() < 256 * 1024 {
                let Ok(more) = lines.try_recv() else { break };
                buf.extend_from_slice(&more);
                buf.push(b'\n');
            }
            if stdin.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    // Output: read in 64 KiB chunks, split on newlines, broadcast.
    let publish = output.clone();
    tokio::spawn(async move {
        let mut pending = BytesMut::new();
        let mut chunk = BytesMut::with_capacity(64 * 1024);
        loop {
            chunk.clear();
            chunk.reserve(64 * 1024);
            match stdout.read_buf(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => pending.extend_from_slice(&chunk),
            }
            while let Some(i) = memchr::memchr(b'\n', &pending) {
                let line = pending.split_to(i + 1).freeze();
                let _ = publish.send(line.slice(..i));
            }
        }
    });
    let relay = Relay {
        input,
        output,
        _child: child,
    };
    app.sessions().insert(id.clone(), relay);
    let body = serde_json::json!({"id": id, "status": "running"});
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

async fn delete(State(app): State<App>, Path(id): Path<String>) -> StatusCode {
    match app.sessions().remove(&id) {
        Some(_) => StatusCode::NO_CONTENT,
        None => StatusCode::NOT_FOUND,
    }
}

async fn instances() -> Response {
    axum::Json(serde_json::json!([{"id": "cat", "agent": "command"}])).into_response()
}

async fn connect(State(app): State<App>, Path(id): Path<String>, ws: WebSocketUpgrade) -> Response {
    let Some((input, output)) = app
        .sessions()
        .get(&id)
        .map(|r| (r.input.clone(), r.output.subscribe()))
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    ws.read_buffer_size(16 * 1024)
        .on_upgrade(move |socket| client(socket, input, output))
}

async fn client(
    socket: WebSocket,
    input: mpsc::Sender<Bytes>,
    mut output: broadcast::Receiver<Bytes>,
) {
    let (mut sink, mut stream) = socket.split();
    let write = async move {
        loop {
            let first = match output.recv().await {
                Ok(line) => line,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let mut next = Some(first);
            while let Some(line) = next {
                let Ok(text) = Utf8Bytes::try_from(line) else {
                    return;
                };
                if sink.feed(Message::Text(text)).await.is_err() {
                    return;
                }
                next = output.try_recv().ok();
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    };
    let read = async move {
        while let Some(Ok(message)) = stream.next().await {
            if let Message::Text(text) = message {
                let line = Bytes::from(text);
                let end = line.len() - usize::from(line.ends_with(b"\n"));
                if input.send(line.slice(..end)).await.is_err() {
                    return;
                }
            }
        }
    };
    tokio::select! {
        () = write => {}
        () = read => {}
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = match std::env::args().nth(1) {
        Some(p) => p
            .parse()
            .map_err(|_| std::io::Error::other(format!("not a port: {p}")))?,
        None => 0,
    };
    let router = Router::new()
        .route("/instances", get(instances))
        .route("/sessions", post(create))
        .route("/sessions/{id}", get(connect).delete(delete))
        .with_state(App::default());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("bare relay on http://{}", listener.local_addr()?);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router).await
}
