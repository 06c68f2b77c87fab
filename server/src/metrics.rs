//! Prometheus metrics, served at `GET /metrics`.
//!
//! One registry per server (no global recorder), so several servers in one test process do not
//! share counters. Hot paths touch only atomic counters.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// Every metric moorline exports.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// Sessions by status, refreshed at scrape time.
    pub sessions: Family<Labels, Gauge>,
    /// Connected WebSocket clients.
    pub clients: Gauge,
    /// Lines clients sent to agents.
    pub lines_in: Counter,
    /// Bytes clients sent to agents.
    pub bytes_in: Counter,
    /// Lines agents wrote (including replacements for dropped lines).
    pub lines_out: Counter,
    /// Bytes agents wrote.
    pub bytes_out: Counter,
    /// Frames delivered to clients (one line to one client is one delivery).
    pub deliveries: Counter,
    /// Agent lines that could not be forwarded, by reason.
    pub lines_dropped: Family<Labels, Counter>,
    /// Clients disconnected for falling behind, by reason.
    pub clients_dropped: Family<Labels, Counter>,
    /// Times a session's output was held because its journal refused a write (a full disk).
    pub output_holds: Counter,
    /// Sessions whose output is held because their journal cannot be written.
    pub output_held: Gauge,
    /// Agent exits, by kind (`exited` for code 0, `crashed` otherwise).
    pub agent_exits: Family<Labels, Counter>,
    /// Time from `POST /sessions` to a running agent.
    pub spawn_seconds: Histogram,
    /// Notification decisions, by trigger and outcome (`queued`, `dropped`, `answered`,
    /// `client_active`, `watched`, `duplicate`, `gone`).
    pub notifications: Family<Labels2, Counter>,
    /// Notification deliveries, by channel and result (`sent`, `retried`, `failed`, `gone`,
    /// `pruned`).
    pub notification_deliveries: Family<Labels2, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("moorline");
        let sessions = Family::<Labels, Gauge>::default();
        let clients = Gauge::default();
        let lines_in = Counter::default();
        let bytes_in = Counter::default();
        let lines_out = Counter::default();
        let bytes_out = Counter::default();
        let deliveries = Counter::default();
        let lines_dropped = Family::<Labels, Counter>::default();
        let clients_dropped = Family::<Labels, Counter>::default();
        let agent_exits = Family::<Labels, Counter>::default();
        let output_holds = Counter::default();
        let output_held = Gauge::default();
        let spawn_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let notifications = Family::<Labels2, Counter>::default();
        let notification_deliveries = Family::<Labels2, Counter>::default();
        registry.register(
            "notifications",
            "Notification decisions by trigger and outcome",
            notifications.clone(),
        );
        registry.register(
            "notification_deliveries",
            "Notification deliveries by channel and result",
            notification_deliveries.clone(),
        );
        registry.register("sessions", "Sessions by status", sessions.clone());
        registry.register("clients", "Connected WebSocket clients", clients.clone());
        registry.register(
            "lines_in",
            "Lines sent by clients to agents",
            lines_in.clone(),
        );
        registry.register(
            "bytes_in",
            "Bytes sent by clients to agents",
            bytes_in.clone(),
        );
        registry.register("lines_out", "Lines written by agents", lines_out.clone());
        registry.register("bytes_out", "Bytes written by agents", bytes_out.clone());
        registry.register(
            "deliveries",
            "Frames delivered to clients",
            deliveries.clone(),
        );
        registry.register(
            "lines_dropped",
            "Agent lines not forwarded (invalid UTF-8, too long, or lost to an unwritable journal)",
            lines_dropped.clone(),
        );
        registry.register(
            "clients_dropped",
            "Clients disconnected for falling behind",
            clients_dropped.clone(),
        );
        registry.register("agent_exits", "Agent exits by kind", agent_exits.clone());
        registry.register(
            "output_holds",
            "Times a session's output was held because its journal refused a write",
            output_holds.clone(),
        );
        registry.register(
            "output_held",
            "Sessions whose output is held because their journal cannot be written",
            output_held.clone(),
        );
        registry.register(
            "spawn_seconds",
            "Time to start an agent",
            spawn_seconds.clone(),
        );
        Self {
            registry,
            sessions,
            clients,
            lines_in,
            bytes_in,
            lines_out,
            bytes_out,
            deliveries,
            lines_dropped,
            clients_dropped,
            agent_exits,
            output_holds,
            output_held,
            spawn_seconds,
            notifications,
            notification_deliveries,
        }
    }
}

impl Metrics {
    /// The metrics in Prometheus text format.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
