//! The one place that names the files of a session directory.
//!
//! A session directory (`<state>/sessions/<id>/`) is shared by the server (metadata, journal
//! replay), the process runtime, and a session's keeper (journal, pending approvals, stderr);
//! every reader and writer finds a file through these two types, never by a literal name.

use std::path::{Path, PathBuf};

/// How much of an agent's stderr is quoted when it fails to start.
pub(crate) const STDERR_TAIL_BYTES: u64 = 2048;

/// A session's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDir(PathBuf);

impl SessionDir {
    /// The session directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `meta.json`: the session's persistent record (the server's).
    pub fn meta(&self) -> PathBuf {
        self.0.join("meta.json")
    }

    /// `journal/`: the output journal.
    pub fn journal(&self) -> PathBuf {
        self.0.join("journal")
    }

    /// `stderr.log`: the agent's stderr, kept for diagnosis.
    pub fn stderr(&self) -> PathBuf {
        self.0.join("stderr.log")
    }

    /// The last `max_bytes` of the agent's stderr, lossily decoded and trimmed: what a user
    /// needs to see why an agent did not start.
    pub fn stderr_tail(&self, max_bytes: u64) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut file) = std::fs::File::open(self.stderr()) else {
            return String::new();
        };
        let len = file.metadata().map_or(0, |m| m.len());
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)));
        let mut tail = Vec::new();
        let _ = file.read_to_end(&mut tail);
        String::from_utf8_lossy(&tail).trim().to_owned()
    }

    /// `pending.json`: approval requests waiting for an answer, kept up to date by whoever runs
    /// the agent's stdio (the server or a keeper).
    pub fn pending(&self) -> PathBuf {
        self.0.join("pending.json")
    }

    /// `auth-failed`: present while the current run has reported an authentication failure.
    pub fn auth_failed(&self) -> PathBuf {
        self.0.join("auth-failed")
    }

    /// `conversation.json`: the agent's conversation the last run continued or began
    /// ([`ConversationRecord`](super::agentio::ConversationRecord)), so the next start can
    /// continue it.
    pub fn conversation(&self) -> PathBuf {
        self.0.join("conversation.json")
    }

    /// `data/`: session-private files adapters ask for (visible to the agent).
    pub fn data(&self) -> PathBuf {
        self.0.join("data")
    }

    /// `home/`: the per-session home of containers.
    pub fn home(&self) -> PathBuf {
        self.0.join("home")
    }

    /// `run/`: the keeper's run directory (durable runtimes).
    pub fn run(&self) -> RunDir {
        RunDir(self.0.join("run"))
    }
}

/// A keeper's run directory (`<session>/run/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir(PathBuf);

impl RunDir {
    /// The run directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The session directory this run directory is in.
    pub fn session(&self) -> SessionDir {
        SessionDir::new(self.0.parent().unwrap_or(&self.0))
    }

    /// `keeper.json`: what the keeper runs (holds the agent's environment).
    pub fn spec(&self) -> PathBuf {
        self.0.join("keeper.json")
    }

    /// `stdin.sock`: the socket the server connects to.
    pub fn socket(&self) -> PathBuf {
        self.0.join("stdin.sock")
    }

    /// `exit`: written atomically when the agent has exited.
    pub fn exit(&self) -> PathBuf {
        self.0.join("exit")
    }

    /// `keeper.pid`: the keeper's process id.
    pub fn keeper_pid(&self) -> PathBuf {
        self.0.join("keeper.pid")
    }

    /// `agent.pid`: the agent's process id (the leader of its group), for the `tmux` runtime.
    pub fn agent_pid(&self) -> PathBuf {
        self.0.join("agent.pid")
    }

    /// `container.id`: the container of the current run (`runc`).
    pub fn container_id(&self) -> PathBuf {
        self.0.join("container.id")
    }

    /// `container.pid`: the host pid of the container's init (`runc run --pid-file`).
    pub fn container_pid(&self) -> PathBuf {
        self.0.join("container.pid")
    }

    /// `bundle/`: the OCI bundle of the current run (`runc`).
    pub fn bundle(&self) -> PathBuf {
        self.0.join("bundle")
    }

    /// `network.json`: the isolated network's plan, for the hook.
    pub fn network_plan(&self) -> PathBuf {
        self.0.join("network.json")
    }

    /// `net.pid`: the network helper's process id.
    pub fn network_pid(&self) -> PathBuf {
        self.0.join("net.pid")
    }

    /// `net.log`: the network helper's log.
    pub fn network_log(&self) -> PathBuf {
        self.0.join("net.log")
    }

    /// `resolv.conf`: the container's resolver file, when the host's is on loopback.
    pub fn resolv_conf(&self) -> PathBuf {
        self.0.join("resolv.conf")
    }

    /// Files of a previous run that must not be mistaken for this one's.
    pub fn stale_files(&self) -> [PathBuf; 7] {
        [
            self.socket(),
            self.container_pid(),
            self.exit(),
            self.keeper_pid(),
            self.agent_pid(),
            self.container_id(),
            self.resolv_conf(),
        ]
    }
}

/// Reads a pid file, if it holds a pid.
pub(crate) fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}
