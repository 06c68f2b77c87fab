//! The session keeper and everything it needs: a leaf that imports nothing from the server
//! above it (only `moorline-adapters`, below).
//!
//! Durable runtimes (`tmux`, `runc`) do not run agents as children of the server. Each agent run
//! gets a keeper (`moorline keeper RUN_DIR`, `keep`), started from a tmux pane (`pane`) but
//! detached into a session of its own, so neither a server restart, nor Ctrl-C, Ctrl-Z,
//! `tmux kill-session` or `tmux kill-server` in the pane reaches it. The keeper runs the same
//! stdio loop (`agentio`) the server runs for the `process` runtime, writes the session's
//! journal (`journal`) and sends what it journaled to the connected server
//! (`protocol`).
//!
//! - `layout`: the names of every file of a session directory;
//! - `framing`: the one line splitter, and JSONL framing of agent output;
//! - `journal`: the durable per-session output log (writer, tail, replay reads);
//! - `agentio`: the loop owning an agent's stdio;
//! - `group`: process-group control of an agent;
//! - `exit`: how an agent ended;
//! - [`workspace`]: opening an agent's working directory without trusting a path twice;
//! - `identity`: a thread taking on an agent's user to start it without forking the server;
//! - `oom`: whether a container's agent was killed for its memory limit;
//! - `socket`: the keeper's socket, registered with the reactor only for what is awaited;
//! - `linequeue`: lines waiting for a vectored write, large ones not copied;
//! - `fsio`, `id`: atomic private writes, random ids.

pub(crate) mod agentio;
pub(crate) mod exit;
pub(crate) mod framing;
pub(crate) mod fsio;
pub(crate) mod group;
pub(crate) mod id;
pub(crate) mod identity;
pub(crate) mod journal;
pub(crate) mod keep;
pub(crate) mod layout;
pub(crate) mod linequeue;
pub(crate) mod oom;
pub(crate) mod pane;
pub(crate) mod protocol;
pub(crate) mod socket;
pub mod workspace;

pub use agentio::{ExitFuture, Input, Reader, Writer};
pub use exit::{ExitInfo, ExitReason};
pub use group::{AgentControl, GroupControl};
pub use keep::keeper_main;
pub use pane::pane_main;
