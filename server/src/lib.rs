//! moorline: drive CLI coding agents on your machine from anywhere on your tailnet.
//!
//! A loopback-bound server with a REST control plane (create, list, inspect, restart and delete
//! agent sessions) and a per-session WebSocket that pipes the agent's JSON Lines to any number of
//! clients, wire-compatible with amarre protocol v2. Output is journaled to disk with sequence
//! numbers, so clients can reconnect and replay without losing a line.
//!
//! # Layout
//! Public because the binary, the examples or the tests use them:
//! - [`config`]: layered configuration; the only module that reads the environment.
//! - [`wire`]: the typed REST bodies, event frames and server WebSocket frames, shared by the
//!   server, the client and the load generator.
//! - [`client`]: the `moorline sessions`, `instances`, `approve`/`deny` and `attach` commands;
//!   [`watch`]: `moorline watch`.
//! - [`runtime`]: where agents run, behind the [`runtime::Runtime`] trait (and the network
//!   helpers the binary starts).
//! - [`keeper`]: the session keeper and the leaf modules it shares with the server: the agent's
//!   stdio loop, JSONL framing, the journal, process-group control, the session directory's
//!   layout. It imports nothing from the server above it.
//!
//! Private, the server's core:
//! - `session`: the session registry and lifecycle; talks to agents only through runtimes.
//! - `events`: the server-wide bus of session events (created, status, activity, approvals,
//!   deleted), for the edge's `/events` and the notifier.
//! - `fanout`, `credentials`, `audit`: delivery to clients with replay, instances' credentials
//!   files and the audit log.
//! - `notifier`: notifications (amarre's Expo push, Web Push, a webhook) from session events.
//! - `clock`, `tls`, `metrics`: the wall clock of every timestamp; TLS for moorline's own
//!   outgoing HTTPS (the client and the notifier); the Prometheus registry sessions count in
//!   and `/metrics` serves.
//! - `projects`: git repositories sessions work in, a worktree per session (through the real
//!   `git`), and the read-only diff and file views of a session's workspace.
//!
//! Private, the HTTP edge, which reaches agents only through sessions:
//! - `api`: the REST route table and its handlers.
//! - `ws`: the per-session WebSocket.
//! - `stream`: `GET /events`, the event bus as server-sent events.
//! - `web`: the web app, embedded at build time, served at `/` to browsers.
//! - `error`: the one error type of the edge and its one mapping to amarre's statuses and
//!   bodies, for REST and the WebSocket upgrade alike.
//! - `security`: Host/Origin checks, the bearer token, and who a request comes from.
//!
//! [`run`] takes already-bound [`Listeners`] (loopback TCP, a Unix socket, or both) and a
//! shutdown future, so tests and the binary start servers the same way.

mod audit;
pub mod client;
mod clock;
pub mod config;
mod credentials;
mod events;
mod fanout;
pub mod keeper;
mod notifier;
mod projects;
pub mod runtime;
mod session;
pub mod watch;
pub mod wire;

mod api;
mod error;
mod metrics;
mod security;
mod stream;
mod tls;
mod web;
mod ws;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Sessions could not be loaded.
    #[error(transparent)]
    Session(#[from] session::SessionError),
    /// Socket or file errors.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What the server listens on: loopback TCP, a Unix socket, or both.
#[derive(Debug, Default)]
pub struct Listeners {
    /// The TCP listener.
    pub tcp: Option<TcpListener>,
    /// The Unix socket listener and its path (removed when the server stops).
    pub unix: Option<(UnixListener, PathBuf)>,
}

impl From<TcpListener> for Listeners {
    fn from(tcp: TcpListener) -> Self {
        Self {
            tcp: Some(tcp),
            unix: None,
        }
    }
}

impl Listeners {
    /// Binds what `config` asks for: `host:port` unless `tcp = false`, and `unix_socket`.
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        let tcp = if config.tcp {
            let addr = config.listen_addr()?;
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
            })?;
            Some(listener)
        } else {
            None
        };
        let unix = match &config.unix_socket {
            Some(path) => Some((bind_unix(path, config.socket_mode()?)?, path.clone())),
            None => None,
        };
        Ok(Self { tcp, unix })
    }
}

/// The server's socket file, removed when dropped.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds a Unix socket at `path` with permissions `mode`.
///
/// The parent directory is created private (0700) if missing. A socket file left by a server
/// that did not stop cleanly is replaced, but only if it is a socket nobody answers on: a live
/// server's socket, or any other kind of file, is never removed.
pub fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let err = |what: &str, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    if let Some(parent) = path.parent()
        && !parent.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| err("cannot create the directory of", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::Io(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("another server is listening on {}", path.display()),
                )));
            }
            std::fs::remove_file(path).map_err(|e| err("cannot remove the stale socket", e))?;
        }
        Ok(_) => {
            return Err(ServerError::Io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            )));
        }
        Err(_) => {}
    }
    // Bound under a temporary name, given its mode, then renamed into place: clients never
    // see the socket with permissions other than `mode`.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let listener = UnixListener::bind(&temp).map_err(|e| err("cannot listen on", e))?;
    let placed = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temp);
        return Err(err("cannot set up the socket", e).into());
    }
    Ok(listener)
}

/// Serves on `listeners` until `shutdown` completes, then closes every WebSocket with 1001,
/// stops the agents that do not outlive the server, and returns. The Unix socket file is
/// removed on the way out.
pub async fn run(
    listeners: impl Into<Listeners>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let Listeners { tcp, unix } = listeners.into();
    // Removed however `run` ends, startup errors included.
    let socket_file = unix.as_ref().map(|(_, path)| SocketFile(path.clone()));
    if tcp.is_none() && unix.is_none() {
        return Err(ServerError::Config(config::ConfigError::new(
            "nothing to listen on: enable tcp or set unix_socket",
        )));
    }
    let token = config.read_token()?;
    let addr = tcp.as_ref().map(TcpListener::local_addr).transpose()?;
    let names = config.machine_names().await;
    let policy = Arc::new(security::AccessPolicy::new(&config, token, addr, names));
    let metrics = Arc::new(metrics::Metrics::default());
    let tracker = TaskTracker::new();
    let moorline_exe = config.moorline_exe()?;
    let cancel = CancellationToken::new();
    let runtimes = runtime::Runtimes::new(&config, moorline_exe.clone()).await;
    let sessions = session::SessionManager::new(
        &config,
        moorline_exe,
        metrics.clone(),
        tracker.clone(),
        cancel.clone(),
        &|inst| runtimes.for_instance(inst),
    )
    .await?;
    session::spawn_activity_sweeper(
        &sessions,
        config.limits.activity_window(),
        &tracker,
        cancel.clone(),
    );
    let notifier = notifier::Notifier::start(
        &config,
        sessions.clone(),
        metrics.clone(),
        &tracker,
        cancel.clone(),
    );
    let state = api::AppState {
        notifier,
        sessions: sessions.clone(),
        limits: Arc::new(config.limits.clone()),
        metrics,
        shutdown: cancel.clone(),
        tracker: tracker.clone(),
    };
    let socket = socket_file.as_ref().map(|f| f.0.clone());
    tracing::info!(
        addr = %addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        unix_socket = %socket.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into()),
        token = policy.requires_token(),
        "moorline listening"
    );
    let signal = {
        let cancel = cancel.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down");
            cancel.cancel();
            std::future::pending::<()>().await
        }
    };
    let serve_tcp = {
        let app = api::router(state.clone(), policy.clone(), security::Via::Tcp);
        let stop = cancel.clone().cancelled_owned();
        async move {
            let Some(listener) = tcp else {
                return Ok(());
            };
            // Frames are small and latency matters more than packet count.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }
    };
    let serve_unix = {
        let app = api::router(state, policy.clone(), security::Via::Unix);
        let stop = cancel.clone().cancelled_owned();
        async move {
            let Some((listener, _)) = unix else {
                return Ok(());
            };
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }
    };
    let served = tokio::select! {
        served = futures_util::future::try_join(serve_tcp, serve_unix) => served,
        () = signal => Ok(((), ())),
    };
    // No new client can connect while the sessions stop.
    drop(socket_file);
    served?;
    // axum does not wait for upgraded connections: WebSocket tasks are tracked separately and
    // close themselves with 1001 when `cancel` fires.
    sessions.shutdown().await;
    tracker.close();
    let deadline = config.limits.stop_grace() + Duration::from_secs(10);
    if tokio::time::timeout(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not finish before the shutdown deadline");
    }
    Ok(())
}
