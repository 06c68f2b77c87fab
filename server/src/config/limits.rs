//! `[limits]`: every limit moorline enforces, each configurable.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Every limit moorline enforces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Sessions whose agent is running at the same time.
    pub max_sessions: usize,
    /// WebSocket clients on one session.
    pub max_clients_per_session: usize,
    /// Largest WebSocket message a client may send; larger ones close the socket with 1009.
    pub max_inbound_frame_bytes: usize,
    /// Longest agent output line forwarded; longer lines are replaced by a `line_dropped` frame.
    pub max_line_bytes: usize,
    /// Recent output kept in memory per session for fast fan-out; older output is read back
    /// from the session's journal on disk.
    pub backlog_bytes: usize,
    /// Output kept on disk per session for replay; the oldest output is deleted beyond it.
    pub journal_max_bytes: u64,
    /// Batches of client lines queued for an agent's stdin before clients are slowed down.
    pub inbound_queue: usize,
    /// Bytes of client lines queued for an agent's stdin before clients are slowed down (their
    /// connections are no longer read, so TCP holds them back). A single larger frame still
    /// passes, alone.
    pub inbound_queue_bytes: usize,
    /// Time an agent gets to exit after SIGTERM before it is killed.
    pub stop_grace_ms: u64,
    /// A client that accepts no data for this long is disconnected.
    pub client_stall_ms: u64,
    /// After an agent exits, how long to wait for processes it left behind to close its output.
    pub exit_drain_ms: u64,
    /// Environment variables a client may set in one `POST /sessions`.
    pub max_env_vars: usize,
    /// Longest environment variable name a client may set (bytes).
    pub max_env_name_bytes: usize,
    /// Longest environment variable value a client may set (bytes).
    pub max_env_value_bytes: usize,
    /// Send buffer of a WebSocket client's TCP socket (the kernel doubles it; 0 leaves the
    /// system's autotuning). Small enough that a slow reader's progress is seen well within
    /// `client_stall_ms`.
    pub client_send_buffer_bytes: usize,
    /// Capacity of the pipes to and from each agent (0: the system's 64 KiB), and the send
    /// buffer of both ends of a keeper's socket, which extends them in the durable runtimes
    /// (capped by `net.core.wmem_max`). Larger pipes carry a long line in one write and one
    /// read instead of a wake-up per 64 KiB; they are charged to the server's user only as
    /// they fill. An unprivileged server gets at most
    /// `/proc/sys/fs/pipe-max-size` (1 MiB by default); a size the kernel refuses leaves the
    /// default.
    pub agent_pipe_bytes: usize,
    /// How long output the journal cannot take (a full disk) is still held for, once the
    /// agent has exited; while it runs, its output is held (and the agent paused) as long as
    /// it takes.
    pub output_hold_after_exit_ms: u64,
    /// Longest session name accepted, in bytes; longer ones are refused with 400.
    pub max_name_bytes: usize,
    /// Largest `POST /sessions` body accepted (it bounds the working directory and
    /// environment a client can make the server store); larger ones are refused with 400.
    pub max_request_bytes: usize,
    /// Largest file (`GET /sessions/{id}/files`) or diff (`GET /sessions/{id}/diff`) returned;
    /// larger ones are refused with 413.
    pub max_file_bytes: usize,
    /// Ended (exited or crashed) sessions kept; beyond it the oldest are removed, with their
    /// journals.
    pub max_ended_sessions: usize,
    /// Ended sessions older than this are removed, with their journals (0: kept until
    /// `max_ended_sessions` pushes them out).
    pub ended_session_ttl_ms: u64,
    /// After sending a close frame, how long to keep reading (and discarding) what the client
    /// still sends, so it reads the close code instead of a connection reset.
    pub close_linger_ms: u64,
    /// A running agent that wrote output this recently counts as `working` in session
    /// summaries (`activity`), even outside a turn the server can see.
    pub activity_window_ms: u64,
    /// Events kept for `GET /events` clients that reconnect (`Last-Event-ID`); also how far a
    /// connected one may fall behind before it is sent a fresh snapshot.
    pub event_backlog: usize,
    /// Most `GET /events` streams open at once; one more is refused with 429. Each open
    /// stream holds a task and a subscription for as long as its client stays.
    pub max_event_streams: usize,
}

impl Limits {
    /// [`Self::stop_grace_ms`] as a duration.
    pub fn stop_grace(&self) -> Duration {
        Duration::from_millis(self.stop_grace_ms)
    }

    /// [`Self::client_stall_ms`] as a duration.
    pub fn client_stall(&self) -> Duration {
        Duration::from_millis(self.client_stall_ms)
    }

    /// [`Self::output_hold_after_exit_ms`] as a duration.
    pub fn output_hold_after_exit(&self) -> Duration {
        Duration::from_millis(self.output_hold_after_exit_ms)
    }

    /// [`Self::close_linger_ms`] as a duration.
    pub fn close_linger(&self) -> Duration {
        Duration::from_millis(self.close_linger_ms)
    }

    /// [`Self::activity_window_ms`] as a duration.
    pub fn activity_window(&self) -> Duration {
        Duration::from_millis(self.activity_window_ms)
    }

    /// [`Self::exit_drain_ms`] as a duration.
    pub fn exit_drain(&self) -> Duration {
        Duration::from_millis(self.exit_drain_ms)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 8,
            max_clients_per_session: 32,
            max_inbound_frame_bytes: 16 << 20,
            max_line_bytes: 16 << 20,
            backlog_bytes: 4 << 20,
            journal_max_bytes: 256 << 20,
            inbound_queue: 1024,
            inbound_queue_bytes: 4 << 20,
            stop_grace_ms: 5_000,
            client_stall_ms: 30_000,
            exit_drain_ms: 500,
            max_env_vars: 64,
            max_env_name_bytes: 128,
            max_env_value_bytes: 32 << 10,
            close_linger_ms: 3_000,
            max_name_bytes: 256,
            max_request_bytes: 64 * 1024,
            max_file_bytes: 1 << 20,
            max_ended_sessions: 100,
            ended_session_ttl_ms: 0,
            output_hold_after_exit_ms: 10_000,
            client_send_buffer_bytes: 256 * 1024,
            agent_pipe_bytes: 1 << 20,
            activity_window_ms: 5_000,
            event_backlog: 1024,
            max_event_streams: 64,
        }
    }
}
