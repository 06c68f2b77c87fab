//! Runtimes: where and how an agent process runs.
//!
//! Session logic talks to agents only through the [`Runtime`] trait: it asks for an agent
//! with a [`SpawnSpec`] and gets back an [`Agent`]: a handle to signal it and its
//! [`AgentRun`], which moves client lines to the agent and the agent's journaled lines to the
//! session's [`Delivery`] until it ends. Each runtime owns the whole lifecycle of its agents:
//! starting them, delivering their output, adopting them after a server restart
//! ([`Runtime::adopt`]), reconciling what it finds at startup, and cleaning up. Whether the
//! agent is a plain child (`process`), or runs under a keeper that outlives the server,
//! possibly in a container (`durable`), is the runtime's business.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use moorline_adapters::pipeline::Resolution;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub(crate) mod durable;
pub mod network;
pub(crate) mod process;
pub mod runc;
pub(crate) mod seccomp;
pub(crate) mod tmux;

pub use crate::keeper::workspace;
pub use crate::keeper::{AgentControl, ExitInfo, ExitReason, Input};

use crate::config::{Config, InstanceConfig, InstanceRuntime, RuntimeKind, find_program};
use crate::keeper::framing::DropReason;
use crate::keeper::journal::{IndexChange, JournalIndex, JournalLimits, JournalTail};
use crate::keeper::layout::SessionDir;

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

/// Why runc cannot run containers here.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A program the container runtime needs is missing.
    #[error("{} not found", .0.display())]
    Missing(PathBuf),
    /// runc's state directory cannot be created.
    #[error("runc root {}: {source}", .path.display())]
    Root {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// runc does not run.
    #[error("runc: {0}")]
    Runc(io::Error),
    /// The probe container could not be prepared.
    #[error("preparing the probe container: {0}")]
    Probe(io::Error),
    /// The probe container failed.
    #[error("{0}")]
    ProbeFailed(String),
    /// The probe container did not finish.
    #[error("runc run did not finish in 20 s")]
    ProbeTimeout,
}

/// The machine side of containers: runc, tini, and whether we run rootless.
async fn container_host(config: &Config) -> Result<durable::ContainerHost, HostError> {
    let rc = &config.runtime;
    let path = rc.passed_env.get("PATH").map(String::as_str);
    let runc_bin =
        find_program(&rc.runc, path).ok_or_else(|| HostError::Missing(rc.runc.clone()))?;
    let tini = find_program(&rc.tini, path).ok_or_else(|| HostError::Missing(rc.tini.clone()))?;
    let root = rc
        .runc_root
        .clone()
        .unwrap_or_else(|| config.state_dir.join("runc"));
    std::fs::create_dir_all(&root).map_err(|source| HostError::Root {
        path: root.clone(),
        source,
    })?;
    let runc = runc::Runc::new(runc_bin, root);
    runc.version().await.map_err(HostError::Runc)?;
    let uid = nix::unistd::getuid();
    let rootless = (!uid.is_root()).then(|| (uid.as_raw(), nix::unistd::getgid().as_raw()));
    let slirp4netns = find_program(&rc.slirp4netns, path);
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
async fn probe(host: &durable::ContainerHost, config: &Config) -> Result<(), HostError> {
    let dir = config.state_dir.join("probe");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("home")).map_err(HostError::Probe)?;
    // The workspace is opened without following symlinks: name it without any.
    let dir = std::fs::canonicalize(&dir).map_err(HostError::Probe)?;
    let id = format!(
        "{}probe-{}",
        runc::ID_PREFIX,
        crate::keeper::id::random_hex(3).map_err(HostError::Probe)?
    );
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
            moorline_exe: config
                .moorline_exe()
                .map_err(|e| HostError::Probe(io::Error::other(e.to_string())))?,
            user: Some((65534, 65534)),
            home: dir.join("home"),
            tini: host.tini.clone(),
            system_dirs: config.runtime.system_dirs.clone(),
            extra_rw: Vec::new(),
            extra_ro: Vec::new(),
            network: crate::config::NetworkMode::Host,
            network_hook: None,
            resolv_conf: None,
            pids_limit: None,
            memory_limit: None,
            rootless: host.rootless,
            limits_allowed: false,
        },
    )
    .map_err(HostError::Probe)?;
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
        Ok(Ok(o)) => Err(HostError::ProbeFailed(
            String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        )),
        Ok(Err(e)) => Err(HostError::Runc(e)),
        Err(_) => Err(HostError::ProbeTimeout),
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
        Err(RuntimeError::spawn(
            &spec.program,
            SpawnFailure::Unavailable(self.0),
        ))
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
    /// The session's private directory: journal, state, logs.
    pub session_dir: SessionDir,
    /// The journal's size limits.
    pub journal: JournalLimits,
    /// Capacity of the agent's stdin and stdout pipes (`limits.agent_pipe_bytes`).
    pub pipe_bytes: usize,
    /// Longest output line forwarded.
    pub max_line: usize,
    /// After the agent exits, how long its leftovers get to close its output.
    pub exit_drain: std::time::Duration,
    /// After the agent exits, how long output its journal cannot take is still held.
    pub hold_after_exit: std::time::Duration,
    /// Container and resource settings of the instance.
    pub options: InstanceRuntime,
    /// The adapter, which translates the agent's lines.
    pub adapter: moorline_adapters::AdapterConfig,
    /// The approval rules.
    pub approvals: moorline_adapters::pipeline::ApprovalPolicy,
    /// The repository's common git directory when the workspace is a worktree of it: git in
    /// the worktree needs it (containers bind it read-write, its config and hooks read-only).
    pub git_dir: Option<PathBuf>,
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

/// What a starting server knows of a session whose agent was running when the last server
/// stopped.
#[derive(Debug, Clone)]
pub struct Found {
    /// The session.
    pub session_id: String,
    /// Its directory.
    pub session_dir: SessionDir,
    /// The pid the last server recorded for its agent and that process's start time, if any.
    pub pid: Option<(u32, u64)>,
}

/// A started (or adopted) agent.
pub struct Agent {
    /// Its process id, where it has one the server can see.
    pub pid: Option<u32>,
    /// Signals it.
    pub control: Arc<dyn AgentControl>,
    /// Moves its lines until it ends.
    pub run: Box<dyn AgentRun>,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("pid", &self.pid)
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

/// One agent run, as its runtime drives it: client lines in, journaled output out, until the
/// agent ends (or the server stops).
#[async_trait]
pub trait AgentRun: Send {
    /// Runs until the agent has ended and all its output is delivered, or until the server
    /// shuts down: then a runtime whose agents outlive the server lets go of it
    /// ([`RunEnd::Detached`]), and one whose agents do not stops it first.
    async fn run(self: Box<Self>, io: RunIo<'_>) -> RunEnd;
}

/// What a session gives an agent run.
#[allow(missing_debug_implementations)] // a channel and a trait object: nothing to show
pub struct RunIo<'a> {
    /// Lines from clients, for the agent.
    pub input: mpsc::Receiver<Input>,
    /// Where the output goes.
    pub output: &'a mut dyn Delivery,
    /// Cancelled when the server shuts down.
    pub shutdown: CancellationToken,
    /// How long an agent gets between SIGTERM and SIGKILL when the server stops it.
    pub stop_grace: Duration,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The agent ended; `by_shutdown` when the server stopped it on its way out.
    Exited {
        /// How.
        exit: ExitInfo,
        /// Whether the server's shutdown stopped it.
        by_shutdown: bool,
    },
    /// The server is stopping and the agent keeps running, for the next server to adopt.
    Detached,
}

/// The session's end of a run: every line reaches it only once it is in the journal.
pub trait Delivery: Send {
    /// Where the session's clients are: a reader of the journal from the first line not yet
    /// published (to catch up with lines another process appended).
    fn tail(&self) -> JournalTail;
    /// The journal was opened for writing (which may cut a torn last line): its index.
    fn journal_opened(&mut self, index: JournalIndex);
    /// Lines now in the journal, in order after those already published, and the index
    /// changes their append made.
    fn publish(&mut self, lines: Vec<Bytes>, changes: &[IndexChange]);
    /// The journal refuses output (`true`: the agent is paused on it) or takes it again.
    fn held(&mut self, held: bool);
    /// Held output was given up.
    fn lost(&mut self, lines: u64);
    /// An output line was replaced by a `line_dropped` frame.
    fn line_dropped(&mut self, reason: DropReason);
    /// An approval request was settled (for the audit log).
    fn resolved(&mut self, resolution: &Resolution);
    /// The session's pending approvals file was rewritten (new requests are announced).
    fn pending_changed(&mut self);
}

/// Stops an agent: SIGTERM to its group, then after `grace` SIGKILL, returning once `ended`
/// resolves. An agent that is still starting may lose the first SIGTERM (a container's init
/// ignores signals until it has set up its handlers): it is asked once more shortly after.
/// False if it did not end within ten seconds of the SIGKILL.
pub async fn stop_agent(
    control: &dyn AgentControl,
    grace: Duration,
    ended: impl Future<Output = ()>,
) -> bool {
    let mut ended = std::pin::pin!(ended);
    if let Err(e) = control.terminate() {
        tracing::warn!(error = %e, "SIGTERM failed");
    }
    let first = grace.min(Duration::from_millis(250));
    if tokio::time::timeout(first, &mut ended).await.is_ok() {
        return true;
    }
    let _ = control.terminate();
    if tokio::time::timeout(grace - first, &mut ended)
        .await
        .is_ok()
    {
        return true;
    }
    tracing::info!("agent ignored SIGTERM; killing it");
    if let Err(e) = control.kill() {
        tracing::warn!(error = %e, "SIGKILL failed");
    }
    tokio::time::timeout(Duration::from_secs(10), &mut ended)
        .await
        .is_ok()
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
        source: SpawnFailure,
    },
}

impl RuntimeError {
    /// Starting `program` failed for `source`.
    pub fn spawn(program: &Path, source: impl Into<SpawnFailure>) -> Self {
        Self::Spawn {
            program: program.display().to_string(),
            source: source.into(),
        }
    }
}

/// Why an agent could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnFailure {
    /// A system call failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The instance asked for a runtime this machine lacks.
    #[error("the {0} runtime is not usable on this machine (see the server log)")]
    Unavailable(&'static str),
    /// The program is nowhere in `PATH`.
    #[error("{} not found on this machine", .0.display())]
    NotFound(PathBuf),
    /// The keeper's socket path would not fit a Unix socket address.
    #[error(
        "the session socket path {} is longer than {max} bytes; use a shorter state_dir",
        .path.display()
    )]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
        /// The longest path the kernel takes.
        max: usize,
    },
    /// An isolated container needs slirp4netns, which is missing.
    #[error(
        "network = \"isolated\" needs slirp4netns, which was not found ({}); install it, set \
         runtime.slirp4netns, or give the instance network = \"host\" or \"none\"",
        .0.display()
    )]
    NoSlirp4netns(PathBuf),
    /// The keeper ended before it took connections.
    #[error("the keeper failed: {0}")]
    KeeperFailed(String),
    /// The keeper did not open its socket in time.
    #[error("the keeper did not start: {0}")]
    KeeperTimeout(String),
}

/// A place agents run. Each implementation owns its agents' whole lifecycle: starting them,
/// delivering their output ([`AgentRun`]), finding them again after a server restart,
/// and removing what they leave behind.
#[async_trait]
pub trait Runtime: Send + Sync + fmt::Debug {
    /// Short name reported to users (`process`, `tmux`, `runc`).
    fn name(&self) -> &'static str;

    /// Starts an agent.
    async fn spawn(&self, spec: SpawnSpec) -> Result<Agent, RuntimeError>;

    /// At startup: what became of the agent of a session that was running when the last
    /// server stopped. A runtime whose agents do not outlive the server makes sure nothing of
    /// it is left, and reports it ended unseen.
    async fn adopt(&self, _found: &Found) -> Adoption {
        Adoption::Exited(ExitInfo::UNKNOWN)
    }

    /// The directory a session's agent sees as `$HOME`, as a path on this machine (agents
    /// keep their conversations there), if it has one.
    fn agent_home(&self, _session_dir: &SessionDir) -> Option<PathBuf> {
        None
    }

    /// Removes whatever the runtime keeps for a session whose agent has ended (containers,
    /// terminal sessions, cgroups). Called on delete and after an exit.
    async fn cleanup(&self, _session_id: &str, _session_dir: &SessionDir) {}

    /// At startup, removes what the runtime finds of sessions not in `live` that belong to
    /// this server (whose session directories are in `sessions_dir`): other servers on the
    /// same machine may share the runtime's state.
    async fn reconcile(&self, _sessions_dir: &Path, _live: &[String]) {}
}
