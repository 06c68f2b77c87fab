//! Runtimes: where and how an agent process runs.
//!
//! Session logic talks to agents only through the [`Runtime`] trait: it asks for a process with
//! a [`SpawnSpec`] and gets back an [`Agent`]: pipes for stdin and stdout, an exit future and a
//! handle to signal it. Whether the agent is a plain child, a container, or something a human can
//! attach to is the runtime's business.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

pub mod durable;
pub mod keeper;
pub mod network;
pub mod oom;
pub mod process;
pub mod runc;
pub mod seccomp;
pub mod tmux;
pub mod workspace;

use crate::config::{Config, InstanceConfig, InstanceRuntime, RuntimeKind};
use crate::journal::JournalLimits;

/// The runtimes available on this machine, and which one each instance gets.
#[derive(Debug)]
pub struct Runtimes {
    process: Arc<dyn Runtime>,
    tmux: Option<Arc<dyn Runtime>>,
    runc: Option<Arc<dyn Runtime>>,
    /// What `auto` means here.
    auto: Arc<dyn Runtime>,
}

impl Runtimes {
    /// Finds out which runtimes work on this machine. `auto` becomes runc-in-tmux when runc,
    /// tmux and tini are usable (checked by starting a real container), else tmux alone when
    /// tmux is, else plain processes; the choice and its reasons are logged.
    pub async fn new(config: &Config, moorline_exe: PathBuf) -> Self {
        let process: Arc<dyn Runtime> = Arc::new(process::ProcessRuntime::new(
            config.runtime.passed_env.clone(),
        ));
        let wanted = |kind: RuntimeKind| {
            config
                .instances
                .iter()
                .any(|i| i.runtime == kind || i.runtime == RuntimeKind::Auto)
        };
        let rc = &config.runtime;
        let tmux = tmux::Tmux::new(rc.tmux.clone(), rc.tmux_socket.clone());
        let tmux_ok =
            (wanted(RuntimeKind::Tmux) || wanted(RuntimeKind::Runc)) && tmux.usable().await;
        if tmux_ok {
            tmux.keep_server().await;
        }
        let tmux_rt: Option<Arc<dyn Runtime>> = tmux_ok.then(|| {
            Arc::new(durable::DurableRuntime::new(
                tmux.clone(),
                None,
                moorline_exe.clone(),
                rc.clone(),
            )) as Arc<dyn Runtime>
        });
        let mut runc_rt: Option<Arc<dyn Runtime>> = None;
        let mut runc_works = false;
        if wanted(RuntimeKind::Runc) {
            match container_host(config).await {
                Ok(host) => {
                    if !tmux_ok {
                        tracing::warn!("runc runtime unavailable: tmux is not usable");
                    } else {
                        runc_works = match probe(&host, config).await {
                            Ok(()) => true,
                            Err(e) => {
                                tracing::warn!(error = %e, "runc cannot start containers here");
                                false
                            }
                        };
                        if host.rootless.is_some() {
                            tracing::warn!(
                                "rootless mode: containers map only this user (no other ids), and pids/memory \
                                 limits are not applied without cgroup delegation"
                            );
                        }
                        runc_rt = Some(Arc::new(durable::DurableRuntime::new(
                            tmux.clone(),
                            Some(host),
                            moorline_exe.clone(),
                            rc.clone(),
                        )));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "runc runtime unavailable"),
            }
        }
        let auto = match (&runc_rt, &tmux_rt) {
            (Some(r), _) if runc_works => r.clone(),
            (_, Some(t)) => t.clone(),
            _ => process.clone(),
        };
        Self {
            process,
            tmux: tmux_rt,
            runc: runc_rt,
            auto,
        }
    }

    /// The runtime for one instance. An instance that asks for a runtime this machine lacks
    /// still gets it, so its sessions fail with a clear error instead of running elsewhere.
    pub fn for_instance(&self, instance: &InstanceConfig) -> Arc<dyn Runtime> {
        match instance.runtime {
            RuntimeKind::Auto => self.auto.clone(),
            RuntimeKind::Process => self.process.clone(),
            RuntimeKind::Tmux => self
                .tmux
                .clone()
                .unwrap_or_else(|| Arc::new(Unavailable("tmux"))),
            RuntimeKind::Runc => self
                .runc
                .clone()
                .unwrap_or_else(|| Arc::new(Unavailable("runc"))),
        }
    }
}

/// The machine side of containers: runc, tini, and whether we run rootless.
async fn container_host(config: &Config) -> Result<durable::ContainerHost, String> {
    let rc = &config.runtime;
    let path = rc.passed_env.get("PATH").map(String::as_str);
    let runc_bin = durable::resolve(&rc.runc, path)
        .ok_or_else(|| format!("{} not found", rc.runc.display()))?;
    let tini = durable::resolve(&rc.tini, path)
        .ok_or_else(|| format!("{} not found", rc.tini.display()))?;
    let root = rc
        .runc_root
        .clone()
        .unwrap_or_else(|| config.state_dir.join("runc"));
    std::fs::create_dir_all(&root).map_err(|e| format!("runc root {}: {e}", root.display()))?;
    let runc = runc::Runc::new(runc_bin, root);
    runc.version().await.map_err(|e| format!("runc: {e}"))?;
    let uid = nix::unistd::getuid();
    let rootless = (!uid.is_root()).then(|| (uid.as_raw(), nix::unistd::getgid().as_raw()));
    let slirp4netns = durable::resolve(&rc.slirp4netns, path);
    let isolated = config.instances.iter().any(|i| {
        matches!(i.runtime, RuntimeKind::Runc | RuntimeKind::Auto)
            && i.network == crate::config::NetworkMode::Isolated
    });
    match &slirp4netns {
        Some(p) => {
            tracing::info!(slirp4netns = %p.display(), "isolated container network available")
        }
        None if isolated => tracing::warn!(
            "{} not found: sessions of instances with network = \"isolated\" (the default) will \
             fail to start in containers; install slirp4netns or set their network to \"host\" \
             or \"none\"",
            rc.slirp4netns.display()
        ),
        None => {}
    }
    if slirp4netns.is_some()
        && isolated
        && rootless.is_some()
        && nix::unistd::access(
            "/dev/net/tun",
            nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
        )
        .is_err()
    {
        tracing::warn!(
            "/dev/net/tun is not readable and writable by this user: rootless containers on the \
             isolated network will fail to start (it is usually mode 0666)"
        );
    }
    Ok(durable::ContainerHost {
        runc,
        tini,
        slirp4netns,
        limits_allowed: rootless.is_none(),
        rootless,
    })
}

/// Starts a throwaway container running `tini --version`, to know runc really works here.
async fn probe(host: &durable::ContainerHost, config: &Config) -> Result<(), String> {
    let dir = config.state_dir.join("probe");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("home")).map_err(|e| e.to_string())?;
    // The workspace is opened without following symlinks: name it without any.
    let dir = std::fs::canonicalize(&dir).map_err(|e| e.to_string())?;
    let mut raw = [0u8; 3];
    let _ = getrandom::fill(&mut raw);
    let id = format!("moorline-probe-{:02x}{:02x}{:02x}", raw[0], raw[1], raw[2]);
    let bundle = dir.join("bundle");
    runc::write_bundle(
        &bundle,
        &runc::BundleSpec {
            container_id: id.clone(),
            session_id: "probe".into(),
            generation: 0,
            program: host.tini.clone(),
            args: vec!["--version".into()],
            env: BTreeMap::new(),
            workspace: workspace::Anchor::literal(&dir),
            moorline_exe: config.moorline_exe().map_err(|e| e.to_string())?,
            user: Some((65534, 65534)),
            home: dir.join("home"),
            tini: host.tini.clone(),
            system_dirs: config.runtime.system_dirs.clone(),
            extra_rw: Vec::new(),
            network: crate::config::NetworkMode::Host,
            network_hook: None,
            resolv_conf: None,
            pids_limit: None,
            memory_limit: None,
            rootless: host.rootless,
            limits_allowed: false,
        },
    )
    .map_err(|e| e.to_string())?;
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::process::Command::new(host.runc.program())
            .args(host.runc.run_args(&bundle, &id))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    host.runc.delete(&id).await;
    let _ = std::fs::remove_dir_all(&dir);
    match out {
        Ok(Ok(o)) if o.status.success() => Ok(()),
        Ok(Ok(o)) => Err(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("runc run did not finish in 20 s".into()),
    }
}

/// Stands in for a runtime an instance asked for but this machine cannot provide.
#[derive(Debug)]
struct Unavailable(&'static str);

#[async_trait]
impl Runtime for Unavailable {
    fn name(&self) -> &'static str {
        self.0
    }

    async fn spawn(&self, spec: SpawnSpec) -> Result<Agent, RuntimeError> {
        Err(RuntimeError::Spawn {
            program: spec.program.display().to_string(),
            source: io::Error::other(format!(
                "the {} runtime is not usable on this machine (see the server log)",
                self.0
            )),
        })
    }
}

/// Everything a runtime needs to start one agent.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// The session's instance (named in events).
    pub instance_id: String,
    /// The session the agent belongs to.
    pub session_id: String,
    /// Counts the starts of this session (1 for the first).
    pub generation: u64,
    /// Program to run (absolute, or looked up in `PATH`).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Environment to set on top of the runtime's base environment.
    pub env: BTreeMap<String, String>,
    /// Working directory: checked by the session layer, and opened again from its anchor by
    /// whatever starts the agent (never looked up by path).
    pub workspace: workspace::Anchor,
    /// The agent's user and group, when moorline runs as root (never 0); `None`: moorline's
    /// own user.
    pub user: Option<(u32, u32)>,
    /// The session's private directory (state, logs).
    pub session_dir: PathBuf,
    /// Where the session's output journal lives, for runtimes that write it themselves.
    pub journal_dir: PathBuf,
    /// The journal's size limits.
    pub journal: JournalLimits,
    /// Longest output line forwarded.
    pub max_line: usize,
    /// After the agent exits, how long its leftovers get to close its output.
    pub exit_drain: std::time::Duration,
    /// After the agent exits, how long output its journal cannot take is still held.
    pub hold_after_exit: std::time::Duration,
    /// Container and resource settings of the instance.
    pub options: InstanceRuntime,
    /// The session's data directory (adapter files), visible to the agent at the same path.
    pub data_dir: PathBuf,
    /// The adapter, for runtimes whose keeper talks to the agent itself.
    pub adapter: moorline_adapters::AdapterConfig,
    /// The approval rules, likewise.
    pub approvals: moorline_adapters::pipeline::ApprovalPolicy,
}

/// How an agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Number of the signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Why it ended, when more is known than its code or signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ExitReason>,
}

/// Why an agent ended, beyond its exit code or signal (reported as `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The kernel killed it for going over its container's `memory_limit`.
    OutOfMemory,
    /// Its session keeper died: how the agent ended is unknown.
    KeeperLost,
}

impl ExitReason {
    /// The name clients see.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::OutOfMemory => "out_of_memory",
            ExitReason::KeeperLost => "keeper_lost",
        }
    }
}

impl ExitInfo {
    /// How an agent ended when nobody could see it end (its exit status was lost).
    pub const UNKNOWN: ExitInfo = ExitInfo {
        code: None,
        signal: None,
        reason: None,
    };

    /// The same exit, with a reason.
    pub fn because(self, reason: ExitReason) -> Self {
        Self {
            reason: Some(reason),
            ..self
        }
    }

    /// A clean exit: code 0.
    pub fn is_success(&self) -> bool {
        self.code == Some(0)
    }

    /// How a container ended, from the exit code of `runc run`: the container's init (tini)
    /// exits with 128 + n when the agent was killed by signal n, and runc does the same when
    /// init itself is killed. Such codes are read as signal deaths, as shells read them; a
    /// program that really calls `exit(137)` cannot be told apart and is reported as killed
    /// by SIGKILL.
    pub fn from_container_status(status: std::process::ExitStatus) -> Self {
        let info = Self::from(status);
        match info.code {
            Some(code @ 129..=192) => Self {
                code: None,
                signal: Some(code - 128),
                ..info
            },
            _ => info,
        }
    }

    /// The signal's name (`SIGKILL`), as amarre reports it.
    pub fn signal_name(&self) -> Option<String> {
        let sig = self.signal?;
        Some(match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => s.as_str().to_owned(),
            Err(_) => format!("SIG{sig}"),
        })
    }
}

impl From<std::process::ExitStatus> for ExitInfo {
    fn from(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Self {
            code: status.code(),
            signal: status.signal(),
            reason: None,
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal_name()) {
            (Some(code), _) => write!(f, "exit code {code}")?,
            (None, Some(sig)) => write!(f, "killed by {sig}")?,
            (None, None) => f.write_str("unknown exit")?,
        }
        match self.reason {
            Some(ExitReason::OutOfMemory) => f.write_str(" (out of memory)"),
            Some(ExitReason::KeeperLost) => f.write_str(" (its keeper died)"),
            None => Ok(()),
        }
    }
}

/// Boxed pipe ends, so runtimes can hand over whatever they use.
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// See [`Reader`].
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;
/// Resolves once the agent's main process has exited.
pub type ExitFuture = Pin<Box<dyn Future<Output = ExitInfo> + Send>>;

/// Where an agent's output comes from.
pub enum Output {
    /// The agent's stdout: the server frames it and writes the session's journal.
    Pipe(Reader),
    /// The runtime writes the session's journal itself (from a keeper process that outlives
    /// the server); it tells the server what happened to it through its [`JournalFeed`].
    Journal(JournalFeed),
}

/// What the server hears from a keeper that writes a session's journal.
#[derive(Debug)]
pub struct JournalFeed {
    /// What happened to the journal: new lines, held or flowing output.
    pub doorbell: tokio::sync::mpsc::Receiver<Bell>,
    /// Approval requests the keeper's pipeline settled, for the audit log.
    pub resolutions: tokio::sync::mpsc::Receiver<moorline_adapters::pipeline::Resolution>,
    /// Whether the keeper understands user marker lines
    /// ([`keeper::USER_MARKER`]) on its input.
    pub user_markers: bool,
}

/// News from a runtime that writes the session's journal itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bell {
    /// New lines may have been appended.
    Grew,
    /// The journal refused a write: the agent's output is held until it can be written.
    Held,
    /// The journal takes output again.
    Flowing,
    /// Held output was given up (the agent exited and the journal stayed unwritable).
    Lost(u64),
    /// The pending approvals file was rewritten.
    Pending,
}

impl Bell {
    /// The keeper's byte for a state change ([`Bell::Lost`] is followed by 8 bytes, the count
    /// in little-endian); any other byte means [`Bell::Grew`].
    pub const HELD: u8 = 2;
    /// See [`Bell::HELD`].
    pub const FLOWING: u8 = 3;
    /// See [`Bell::HELD`].
    pub const LOST: u8 = 4;
    /// See [`Bell::HELD`].
    pub const PENDING: u8 = 6;
}

/// How a session's agent looked to a server that starts up and finds it.
#[derive(Debug)]
pub enum Adoption {
    /// Still running: here it is again.
    Running(Agent),
    /// It ended while no server was watching.
    Exited(ExitInfo),
    /// Nothing is left of it, and nothing says how it ended.
    Lost,
}

/// A started agent.
pub struct Agent {
    /// Its process id, where it has one the server can see.
    pub pid: Option<u32>,
    /// Lines for the agent.
    pub stdin: Writer,
    /// The agent's JSONL output.
    pub output: Output,
    /// Its diagnostics, if the runtime passes them on.
    pub stderr: Option<Reader>,
    /// Resolves when it exits.
    pub exit: ExitFuture,
    /// Signals it.
    pub control: Arc<dyn AgentControl>,
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Output::Pipe(_) => "Pipe",
            Output::Journal(_) => "Journal",
        })
    }
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("pid", &self.pid)
            .field("output", &self.output)
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

/// Stops an agent and everything it started.
pub trait AgentControl: Send + Sync + fmt::Debug {
    /// Asks the agent and its children to exit (SIGTERM to the whole group).
    fn terminate(&self) -> io::Result<()>;
    /// Kills the agent and its children (SIGKILL to the whole group).
    fn kill(&self) -> io::Result<()>;
}

/// Errors starting an agent.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// What was run.
        program: String,
        /// Why it failed.
        source: io::Error,
    },
}

/// A place agents run.
#[async_trait]
pub trait Runtime: Send + Sync + fmt::Debug {
    /// Short name reported to users (`process`, `tmux`, `runc`).
    fn name(&self) -> &'static str;

    /// Whether agents keep running when the server stops (and can be adopted again).
    fn durable(&self) -> bool {
        false
    }

    /// Starts an agent.
    async fn spawn(&self, spec: SpawnSpec) -> Result<Agent, RuntimeError>;

    /// Finds the agent a previous server started for this session.
    async fn adopt(&self, _session_id: &str, _session_dir: &Path) -> Adoption {
        Adoption::Lost
    }

    /// Removes whatever the runtime keeps for a session whose agent has ended (containers,
    /// terminal sessions, cgroups). Called on delete and after an exit.
    async fn cleanup(&self, _session_id: &str, _session_dir: &Path) {}

    /// At startup, removes what the runtime finds of sessions not in `live` that belong to
    /// this server (whose session directories are in `sessions_dir`): other servers on the
    /// same machine may share the runtime's state.
    async fn reconcile(&self, _sessions_dir: &Path, _live: &[String]) {}
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::ExitInfo;

    #[test]
    fn a_container_exit_code_above_128_is_the_signal_that_ended_the_agent() {
        // Wait statuses: a normal exit with code c is c << 8; a death by signal n is n.
        let container = |raw| ExitInfo::from_container_status(ExitStatus::from_raw(raw));
        let killed = container(137 << 8);
        assert_eq!((killed.code, killed.signal), (None, Some(9)));
        assert_eq!(killed.signal_name().as_deref(), Some("SIGKILL"));
        assert_eq!(
            container(143 << 8).signal_name().as_deref(),
            Some("SIGTERM")
        );
        for code in [0, 1, 127, 128, 193, 255] {
            let info = container(code << 8);
            assert_eq!((info.code, info.signal), (Some(code), None), "{code}");
        }
        // runc itself killed by a signal keeps that signal.
        assert_eq!(container(9).signal, Some(9));
        // Outside containers, codes are what they are.
        let plain = ExitInfo::from(ExitStatus::from_raw(137 << 8));
        assert_eq!((plain.code, plain.signal), (Some(137), None));
    }
}
