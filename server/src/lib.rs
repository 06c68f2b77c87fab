//! moorline: drive CLI coding agents on your machine from anywhere on your tailnet.
//!
//! A loopback-bound server with a REST control plane (create, list, inspect, restart and delete
//! agent sessions) and a per-session WebSocket that pipes the agent's JSON Lines to any number of
//! clients, wire-compatible with amarre protocol v2. Output is journaled to disk with sequence
//! numbers, so clients can reconnect and replay without losing a line.
//!
//! # Layout
//! - [`config`]: layered configuration; the only module that reads the environment.
//! - [`api`]: the REST route table and the error type that maps to amarre's statuses.
//! - [`ws`]: the per-session WebSocket.
//! - [`security`]: Host/Origin checks and the bearer token.
//! - [`session`]: the session registry and lifecycle; talks to agents only through runtimes.
//! - [`runtime`]: where agents run, behind the [`runtime::Runtime`] trait.
//! - [`agentio`]: the loop owning an agent's stdio: framing, translation and approvals.
//! - [`framing`]: JSONL framing of agent output and client input.
//! - [`fsio`]: atomic, private file writes.
//! - [`journal`]: the durable per-session output log.
//! - [`fanout`]: delivery of output to clients, with replay.
//! - [`metrics`]: Prometheus metrics.
//! - [`client`]: the `moorline sessions` and `moorline attach` commands.
//!
//! [`run`] takes an already-bound listener and a shutdown future, so tests and the binary
//! start servers the same way.

pub mod agentio;
pub mod api;
pub mod client;
pub mod config;
pub mod fanout;
pub mod framing;
pub mod fsio;
pub mod journal;
pub mod metrics;
pub mod runtime;
pub mod security;
pub mod session;
pub mod ws;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
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

/// Serves on `listener` until `shutdown` completes, then closes every WebSocket with 1001,
/// stops the agents that do not outlive the server, and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let token = config.read_token()?;
    if !config.ignored_push_env.is_empty() {
        tracing::warn!(
            variables = %config.ignored_push_env.join(", "),
            "push notifications are not available in this version; these variables are ignored"
        );
    }
    let addr = listener.local_addr()?;
    let names = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || config.machine_names())
            .await
            .unwrap_or_default()
    };
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
    let state = api::AppState {
        sessions: sessions.clone(),
        limits: Arc::new(config.limits.clone()),
        metrics,
        shutdown: cancel.clone(),
        tracker: tracker.clone(),
    };
    let app = api::router(state, policy.clone());
    tracing::info!(%addr, token = policy.requires_token(), "moorline listening");
    let signal = {
        let cancel = cancel.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down");
            cancel.cancel();
        }
    };
    // Frames are small and latency matters more than packet count.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await?;
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
