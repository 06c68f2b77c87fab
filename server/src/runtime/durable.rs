//! The durable runtimes, `tmux` and `runc`: agents that outlive the server.
//!
//! Both start a keeper ([`crate::keeper`]) from a pane of moorline's own tmux server; with
//! `runc` the keeper runs the agent in a container. The server talks to the keeper over a Unix
//! socket in the session's run directory: client lines go to the keeper, and the keeper sends
//! back every line right after appending it to the journal, so the server publishes it without
//! reading it back. Only what the keeper could not send (nobody was connected, or the server
//! fell behind) is read from the journal, from where the session's clients are; so a restarted
//! server adopts running agents by reconnecting, without losing or duplicating a line.
//!
//! The run directory's files are named in [`crate::keeper::layout::RunDir`].

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::network::{self, NetworkHook, NetworkPlan};
use super::runc::{self, BundleSpec, Runc};
use super::tmux::Tmux;
use super::{
    Adoption, Agent, AgentControl, AgentRun, Delivery, ExitInfo, ExitReason, Found, Input, RunEnd,
    RunIo, Runtime, RuntimeError, SpawnFailure, SpawnSpec,
};
use crate::config::{NetworkMode, RuntimeConfig, find_program};
use crate::keeper::agentio::Writer;
use crate::keeper::group::{GroupControl, stop_network_helper};
use crate::keeper::layout::{RunDir, STDERR_TAIL_BYTES, SessionDir};
use crate::keeper::linequeue::LineQueue;
use crate::keeper::protocol::{self, Decoder, KeeperSpec, Message, user_marker};

/// Longest Unix socket path the kernel accepts (`sockaddr_un.sun_path`, with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long a keeper gets to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Most bytes one read of a followed journal publishes at once.
const FOLLOW_BATCH: usize = 1 << 20;
/// Most bytes one read of a keeper's socket takes.
const READ_CHUNK: usize = 256 * 1024;
/// Upper bound on one batched write to a keeper's socket.
const STDIN_BATCH: usize = 256 * 1024;

/// Container settings that come from the machine rather than the instance.
#[derive(Debug, Clone)]
pub(crate) struct ContainerHost {
    /// runc with moorline's state directory.
    pub runc: Runc,
    /// Absolute path of the init program.
    pub tini: PathBuf,
    /// Absolute path of slirp4netns, when it is installed (`network = "isolated"` needs it).
    pub slirp4netns: Option<PathBuf>,
    /// `Some((uid, gid))` when the server is not root.
    pub rootless: Option<(u32, u32)>,
    /// Whether cgroup limits can be applied.
    pub limits_allowed: bool,
}

/// `tmux` (no container) or `runc` (container).
#[derive(Debug)]
pub(crate) struct DurableRuntime {
    tmux: Tmux,
    container: Option<ContainerHost>,
    moorline_exe: PathBuf,
    config: RuntimeConfig,
}

/// What the keeper is told to run: the agent itself, or `runc run` of its container.
struct Launch {
    program: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    /// The agent's workspace and user, when the keeper starts the agent itself (runc gets both
    /// from the bundle and runs in the run directory).
    workspace: Option<super::workspace::Anchor>,
    user: Option<(u32, u32)>,
    /// The container's cgroup, when its memory limit applies.
    oom_cgroup: Option<String>,
    /// Where `runc run --detach` writes the container init's pid.
    detached_pid_file: Option<PathBuf>,
}

impl DurableRuntime {
    /// A runtime that runs keepers (and, with `container`, containers).
    pub(crate) fn new(
        tmux: Tmux,
        container: Option<ContainerHost>,
        moorline_exe: PathBuf,
        config: RuntimeConfig,
    ) -> Self {
        Self {
            tmux,
            container,
            moorline_exe,
            config,
        }
    }

    /// Prepares the run directory, writes the keeper's spec and starts the keeper's pane.
    async fn start(&self, spec: &SpawnSpec) -> Result<RunDir, SpawnFailure> {
        let run_dir = spec.session_dir.run();
        let socket = run_dir.socket();
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(SpawnFailure::SocketPathTooLong {
                path: socket,
                max: MAX_SOCKET_PATH,
            });
        }
        std::fs::create_dir_all(run_dir.path())?;
        // A previous run's network helper leaves with its container; make sure.
        stop_network_helper(&run_dir);
        for stale in run_dir.stale_files() {
            let _ = std::fs::remove_file(stale);
        }
        let launch = match &self.container {
            None => self.plain_launch(spec),
            Some(host) => self.container_launch(host, spec, &run_dir)?,
        };
        protocol::write_spec(&run_dir, &self.keeper_spec(spec, &run_dir, launch))?;
        self.open_pane(spec, &run_dir).await?;
        Ok(run_dir)
    }

    /// Without a container the keeper starts the agent in its workspace, as its user.
    fn plain_launch(&self, spec: &SpawnSpec) -> Launch {
        let mut env = self.config.passed_env.clone();
        env.extend(spec.env.clone());
        Launch {
            program: spec.program.clone(),
            args: spec.args.clone(),
            env,
            workspace: Some(spec.workspace.clone()),
            user: spec.user,
            oom_cgroup: None,
            detached_pid_file: None,
        }
    }

    /// With a container, the keeper runs `runc run` of a fresh bundle.
    fn container_launch(
        &self,
        host: &ContainerHost,
        spec: &SpawnSpec,
        run_dir: &RunDir,
    ) -> Result<Launch, SpawnFailure> {
        let env = self.config.passed_env.clone();
        let program = find_program(&spec.program, env.get("PATH").map(String::as_str))
            .ok_or_else(|| SpawnFailure::NotFound(spec.program.clone()))?;
        let home = spec.session_dir.home();
        std::fs::create_dir_all(&home)?;
        let mut container_env = env.clone();
        container_env.insert("HOME".into(), runc::CONTAINER_HOME.into());
        container_env.extend(spec.env.clone());
        let id = container_id(&spec.session_id, spec.generation)?;
        let (hook, resolv) = self.isolated_network(host, spec, run_dir)?;
        let oom_cgroup = (spec.options.memory_limit.is_some() && host.limits_allowed)
            .then(|| runc::cgroups_path(&id));
        let bundle = run_dir.bundle();
        runc::write_bundle(
            &bundle,
            &BundleSpec {
                container_id: id.clone(),
                session_id: spec.session_id.clone(),
                generation: spec.generation,
                program,
                args: spec.args.clone(),
                env: container_env,
                workspace: spec.workspace.clone(),
                moorline_exe: self.moorline_exe.clone(),
                user: spec.user,
                home,
                tini: host.tini.clone(),
                system_dirs: self.config.system_dirs.clone(),
                extra_rw: [spec.session_dir.data()]
                    .into_iter()
                    .chain(spec.git_dir.clone())
                    .collect(),
                extra_ro: spec
                    .git_dir
                    .iter()
                    .flat_map(|g| [g.join("config"), g.join("hooks")])
                    .collect(),
                network: spec.options.network,
                network_hook: hook,
                resolv_conf: resolv,
                pids_limit: spec.options.pids_limit,
                memory_limit: spec.options.memory_limit,
                rootless: host.rootless,
                limits_allowed: host.limits_allowed,
            },
        )?;
        std::fs::write(run_dir.container_id(), &id)?;
        let pid_file = run_dir.container_pid();
        Ok(Launch {
            program: host.runc.program().to_owned(),
            args: host.runc.detached_run_args(&bundle, &id, &pid_file),
            env,
            workspace: None,
            user: None,
            oom_cgroup,
            detached_pid_file: Some(pid_file),
        })
    }

    fn keeper_spec(&self, spec: &SpawnSpec, run_dir: &RunDir, launch: Launch) -> KeeperSpec {
        KeeperSpec {
            session_id: spec.session_id.clone(),
            program: launch.program,
            args: launch.args,
            env: launch.env,
            cwd: run_dir.path().to_owned(),
            workspace: launch.workspace,
            user: launch.user,
            journal_dir: spec.session_dir.journal(),
            journal_max_bytes: spec.journal.max_bytes,
            journal_segment_bytes: spec.journal.segment_bytes,
            max_line: spec.max_line,
            pipe_bytes: spec.pipe_bytes,
            max_input_line: spec.max_line.max(16 << 20),
            stderr_file: spec.session_dir.stderr(),
            exit_drain_ms: spec.exit_drain.as_millis() as u64,
            hold_after_exit_ms: spec.hold_after_exit.as_millis() as u64,
            oom_cgroup: launch.oom_cgroup,
            adapter: spec.adapter.clone(),
            approvals: spec.approvals.clone(),
            pending_file: spec.session_dir.pending(),
            instance_id: spec.instance_id.clone(),
            user_markers: true,
            container: self.container.is_some(),
            detached_pid_file: launch.detached_pid_file,
        }
    }

    /// Starts the tmux session whose pane starts the keeper.
    async fn open_pane(&self, spec: &SpawnSpec, run_dir: &RunDir) -> io::Result<()> {
        let argv = vec![
            self.moorline_exe.display().to_string(),
            "keeper-pane".into(),
            run_dir.path().display().to_string(),
        ];
        let sessions_dir = spec.session_dir.path();
        let owner = owner(sessions_dir.parent().unwrap_or(sessions_dir));
        if self
            .tmux
            .new_session(&spec.session_id, &owner, &argv)
            .await
            .is_err()
        {
            // A previous run's pane may linger for a moment: free the name and try again.
            self.tmux.kill_session(&spec.session_id).await;
            self.tmux
                .new_session(&spec.session_id, &owner, &argv)
                .await?;
        }
        Ok(())
    }

    /// Waits until the keeper takes connections. Its socket is a file another process creates:
    /// polled (briefly, so a start costs little), until the keeper records an exit instead or
    /// [`START_TIMEOUT`] passes.
    async fn connect(
        &self,
        spec: &SpawnSpec,
        run_dir: &RunDir,
    ) -> Result<UnixStream, SpawnFailure> {
        let socket = run_dir.socket();
        let started = tokio::time::Instant::now();
        loop {
            match UnixStream::connect(&socket).await {
                Ok(stream) => return Ok(stream),
                Err(_) if protocol::read_exit(run_dir).is_some() => {
                    return Err(SpawnFailure::KeeperFailed(
                        spec.session_dir.stderr_tail(STDERR_TAIL_BYTES),
                    ));
                }
                Err(_) if started.elapsed() > START_TIMEOUT => {
                    return Err(SpawnFailure::KeeperTimeout(
                        spec.session_dir.stderr_tail(STDERR_TAIL_BYTES),
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    /// What an `isolated` container needs: its network plan written for the hook, the hook,
    /// and a resolver file when the host's resolver is on loopback. Fails (the session does not
    /// start) without slirp4netns: an isolated instance never gets the host's network instead.
    fn isolated_network(
        &self,
        host: &ContainerHost,
        spec: &SpawnSpec,
        run_dir: &RunDir,
    ) -> Result<(Option<NetworkHook>, Option<PathBuf>), SpawnFailure> {
        if spec.options.network != NetworkMode::Isolated {
            return Ok((None, None));
        }
        let Some(slirp4netns) = &host.slirp4netns else {
            return Err(SpawnFailure::NoSlirp4netns(self.config.slirp4netns.clone()));
        };
        network::write_plan(
            run_dir.path(),
            &NetworkPlan {
                slirp4netns: slirp4netns.clone(),
                host_ports: spec.options.host_ports.clone(),
                rootless: host.rootless.is_some(),
            },
        )?;
        let resolv = match std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|host| network::container_resolv_conf(&host))
        {
            Some(text) => {
                let path = run_dir.resolv_conf();
                std::fs::write(&path, text)?;
                Some(path)
            }
            None => None,
        };
        Ok((
            Some(NetworkHook::new(&self.moorline_exe, run_dir.path())),
            resolv,
        ))
    }

    /// Turns a connection to a keeper into an [`Agent`].
    fn agent(&self, session_id: &str, run_dir: RunDir, stream: UnixStream) -> Agent {
        let spec = protocol::read_spec(&run_dir);
        // Keepers of older servers neither understand user markers nor report approvals.
        let user_markers = spec.as_ref().is_some_and(|s| s.user_markers);
        if let Some(spec) = &spec {
            crate::keeper::socket::widen_send_buffer(&stream, spec.pipe_bytes);
        }
        let pid = crate::keeper::layout::read_pid(&run_dir.keeper_pid())
            .and_then(|p| u32::try_from(p).ok());
        let control: Arc<dyn AgentControl> = match &self.container {
            Some(host) => Arc::new(ContainerControl {
                runc: host.runc.clone(),
                id: std::fs::read_to_string(run_dir.container_id()).unwrap_or_default(),
            }),
            None => Arc::new(GroupControl::from_pid_file(&run_dir.agent_pid())),
        };
        Agent {
            pid,
            control,
            run: Box::new(KeeperRun {
                session_id: session_id.to_owned(),
                run_dir,
                stream,
                user_markers,
            }),
        }
    }
}

#[async_trait]
impl Runtime for DurableRuntime {
    fn name(&self) -> &'static str {
        if self.container.is_some() {
            "runc"
        } else {
            "tmux"
        }
    }

    fn agent_home(&self, session_dir: &SessionDir) -> Option<PathBuf> {
        match &self.container {
            // Containers get the session's own home.
            Some(_) => Some(session_dir.home()),
            None => self.config.passed_env.get("HOME").map(PathBuf::from),
        }
    }

    async fn spawn(&self, spec: SpawnSpec) -> Result<Agent, RuntimeError> {
        let started = match self.start(&spec).await {
            Ok(run_dir) => self.connect(&spec, &run_dir).await.map(|s| (run_dir, s)),
            Err(e) => Err(e),
        };
        match started {
            Ok((run_dir, stream)) => Ok(self.agent(&spec.session_id, run_dir, stream)),
            Err(e) => {
                if matches!(
                    e,
                    SpawnFailure::KeeperFailed(_) | SpawnFailure::KeeperTimeout(_)
                ) {
                    self.cleanup(&spec.session_id, &spec.session_dir).await;
                }
                Err(RuntimeError::spawn(&spec.program, e))
            }
        }
    }

    async fn adopt(&self, found: &Found) -> Adoption {
        let run_dir = found.session_dir.run();
        if let Ok(stream) = UnixStream::connect(run_dir.socket()).await {
            return Adoption::Running(self.agent(&found.session_id, run_dir, stream));
        }
        match protocol::read_exit(&run_dir) {
            Some(exit) => Adoption::Exited(exit),
            None => Adoption::Lost,
        }
    }

    async fn cleanup(&self, session_id: &str, session_dir: &SessionDir) {
        let run_dir = session_dir.run();
        if let Some(host) = &self.container {
            if let Ok(id) = std::fs::read_to_string(run_dir.container_id()) {
                host.runc.delete(id.trim()).await;
            }
            stop_network_helper(&run_dir);
            let _ = std::fs::remove_dir_all(run_dir.bundle());
        }
        self.tmux.kill_session(session_id).await;
    }

    async fn reconcile(&self, sessions_dir: &Path, live: &[String]) {
        for name in self.tmux.list_sessions(&owner(sessions_dir)).await {
            if !live.contains(&name) {
                tracing::info!(tmux_session = %name, "removing a tmux session of no known session");
                self.tmux.kill_session(&name).await;
            }
        }
        let Some(host) = &self.container else {
            return;
        };
        for id in host.runc.container_ids(sessions_dir).await {
            let Some(session) = runc::session_of(&id) else {
                continue;
            };
            if !live.iter().any(|l| l == session) {
                tracing::info!(container = %id, "removing a container of no known session");
                host.runc.delete(&id).await;
            }
        }
    }
}

/// One run of an agent under a keeper, seen through the keeper's socket.
struct KeeperRun {
    session_id: String,
    run_dir: RunDir,
    stream: UnixStream,
    user_markers: bool,
}

#[async_trait]
impl AgentRun for KeeperRun {
    async fn run(self: Box<Self>, io: RunIo<'_>) -> RunEnd {
        let Self {
            session_id,
            run_dir,
            stream,
            user_markers,
        } = *self;
        let RunIo {
            input,
            output,
            shutdown,
            ..
        } = io;
        let (read, write) = match crate::keeper::socket::split_tokio(stream) {
            Ok(halves) => halves,
            Err(e) => {
                tracing::error!(session = %session_id, error = %e, "cannot use the keeper's socket");
                return RunEnd::Exited {
                    exit: ExitInfo::UNKNOWN.because(ExitReason::KeeperLost),
                    by_shutdown: false,
                };
            }
        };
        // Client lines go to the keeper; the writer lets go on shutdown (the agent keeps
        // running).
        let writer = tokio::spawn(stdin_writer(
            session_id.clone(),
            input,
            Box::new(write),
            shutdown.clone(),
            user_markers,
        ));
        let mut follower = Follower {
            session_id: &session_id,
            next: 0,
            output,
            broken: false,
        };
        // Lines appended while no server listened are only in the journal.
        follower.catch_up().await;
        let mut decoder = Decoder::default();
        // Read into a buffer initialized once, then appended to the decoder's.
        let mut scratch = vec![0u8; READ_CHUNK];
        loop {
            loop {
                match decoder.decode() {
                    Ok(Some(message)) => follower.handle(message).await,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(session = %session_id, error = %e, "unreadable keeper message; following the journal alone");
                        decoder = Decoder::default();
                        follower.catch_up().await;
                        break;
                    }
                }
            }
            tokio::select! {
                read = read.read(&mut scratch) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => decoder.buffer().extend_from_slice(&scratch[..n]),
                },
                () = shutdown.cancelled() => break,
            }
        }
        writer.abort();
        if shutdown.is_cancelled() {
            // A stopping server hangs up on the keeper, which then closes its end: that is no
            // exit. The next server adopts the agent, or reads how it ended.
            tracing::debug!(session = %session_id, "server stopping; the agent keeps running");
            return RunEnd::Detached;
        }
        // The keeper closes the connection after writing the exit file, or it died; what it
        // appended but did not send is in the journal.
        follower.catch_up().await;
        let exit = protocol::read_exit(&run_dir)
            .unwrap_or_else(|| ExitInfo::UNKNOWN.because(ExitReason::KeeperLost));
        RunEnd::Exited {
            exit,
            by_shutdown: false,
        }
    }
}

/// Publishes a keeper's lines in order, exactly once: straight from its messages when they
/// continue what was published, else from the journal.
struct Follower<'a, 'o> {
    session_id: &'a str,
    /// Sequence number of the next line to publish.
    next: u64,
    output: &'a mut (dyn Delivery + 'o),
    /// The journal could not be read: nothing more can be published in order.
    broken: bool,
}

impl Follower<'_, '_> {
    async fn handle(&mut self, message: Message) {
        match message {
            Message::Lines {
                first_seq,
                changes,
                lines,
            } => self.lines(first_seq, &changes, lines).await,
            Message::Grew => self.catch_up().await,
            Message::Held => self.output.held(true),
            Message::Flowing => self.output.held(false),
            Message::Lost(lines) => self.output.lost(lines),
            Message::Resolved(r) => self.output.resolved(&r),
            Message::Pending => self.output.pending_changed(),
        }
    }

    async fn lines(
        &mut self,
        first_seq: u64,
        changes: &[crate::keeper::journal::IndexChange],
        payload: Bytes,
    ) {
        if self.broken {
            return;
        }
        let count = memchr::memchr_iter(b'\n', &payload).count() as u64;
        if first_seq + count <= self.next {
            // Already read from the journal.
            return;
        }
        if first_seq != self.next {
            // Lines were sent to nobody (or partly read already): the journal has them all.
            self.catch_up().await;
            return;
        }
        let mut lines = Vec::with_capacity(count as usize);
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', &payload) {
            lines.push(payload.slice(start..end));
            start = end + 1;
        }
        self.output.publish(lines, changes);
        self.next += count;
    }

    /// Publishes everything the journal holds beyond what was published.
    async fn catch_up(&mut self) {
        if self.broken {
            return;
        }
        let mut tail = self.output.tail();
        loop {
            let polled = tokio::task::spawn_blocking(move || {
                let r = tail.poll(FOLLOW_BATCH);
                (tail, r)
            })
            .await;
            let Ok((t, result)) = polled else {
                self.broken = true;
                return;
            };
            tail = t;
            match result {
                Ok((lines, changes)) => {
                    if lines.is_empty() && changes.is_empty() {
                        break;
                    }
                    self.output.publish(lines, &changes);
                }
                Err(e) => {
                    tracing::error!(session = %self.session_id, error = %e, "cannot read the session journal");
                    self.broken = true;
                    return;
                }
            }
        }
        self.next = tail.next_seq();
    }
}

/// Writes client lines to a keeper's socket, batching whatever has queued up. With
/// `user_markers`, a marker line naming the sender goes before the first line of each
/// different sender, so the keeper knows who answered an approval.
///
/// A write error (the agent exited: EPIPE) ends the writer; lines still queued are dropped and
/// senders see a closed channel. It never takes anything else down.
async fn stdin_writer(
    session: String,
    mut rx: mpsc::Receiver<Input>,
    mut stdin: Writer,
    cancel: CancellationToken,
    user_markers: bool,
) {
    // Large lines go to the socket as they came (vectored writes); small ones are gathered.
    let mut queue = LineQueue::default();
    // The sender the keeper last heard of on this connection.
    let mut last_user: Option<Arc<str>> = None;
    let mut add = |queue: &mut LineQueue, input: Input| {
        if user_markers
            && let Some(user) = input.user
            && last_user.as_ref() != Some(&user)
        {
            queue.push_raw(&user_marker(&user));
            last_user = Some(user);
        }
        for line in &input.lines {
            queue.push_line(line);
        }
    };
    loop {
        let first = tokio::select! {
            line = rx.recv() => match line {
                Some(line) => line,
                None => break,
            },
            // The server is stopping; a durable agent keeps running without us.
            () = cancel.cancelled() => return,
        };
        add(&mut queue, first);
        while queue.len() < STDIN_BATCH {
            match rx.try_recv() {
                Ok(line) => add(&mut queue, line),
                Err(_) => break,
            }
        }
        while !queue.is_empty() {
            let written = stdin.write_vectored(&queue.slices()).await;
            match written {
                Ok(0) => {
                    tracing::debug!(session = %session, "agent stdin closed");
                    return;
                }
                Err(e) => {
                    tracing::debug!(session = %session, error = %e, "agent stdin closed");
                    return;
                }
                Ok(n) => queue.consume(n),
            }
        }
    }
    let _ = stdin.shutdown().await;
}

/// How tmux sessions name the server they belong to: its sessions directory.
fn owner(sessions_dir: &Path) -> String {
    sessions_dir.display().to_string()
}

/// A fresh container id: never reused, even for the same session and start number.
fn container_id(session: &str, generation: u64) -> io::Result<String> {
    let suffix = crate::keeper::id::random_hex(3)?;
    Ok(format!(
        "{}{session}-{generation}-{suffix}",
        runc::ID_PREFIX
    ))
}

/// Signals a container through runc: its init (tini) passes SIGTERM on to the agent's group;
/// SIGKILL of the init ends the whole pid namespace.
#[derive(Debug)]
struct ContainerControl {
    runc: Runc,
    id: String,
}

impl ContainerControl {
    /// Sends `signal` through runc. A container may still be starting (a session deleted right
    /// after it was created): runc refuses to signal it until it runs, so keep trying for a
    /// while (polling: runc offers nothing to wait on).
    fn send(&self, signal: &'static str) {
        let runc = self.runc.clone();
        let id = self.id.trim().to_owned();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                match runc.kill(&id, signal).await {
                    Ok(()) => return,
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        tracing::debug!(container = %id, signal, error = %e, "runc kill");
                        return;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
    }
}

impl AgentControl for ContainerControl {
    fn terminate(&self) -> io::Result<()> {
        self.send("TERM");
        Ok(())
    }

    fn kill(&self) -> io::Result<()> {
        self.send("KILL");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use moorline_adapters::pipeline::Resolution;

    use super::Follower;
    use crate::keeper::framing::DropReason;
    use crate::keeper::journal::{
        IndexChange, JournalIndex, JournalLimits, JournalTail, JournalWriter,
    };
    use crate::runtime::Delivery;

    /// A session's end that keeps what it is given, as the hub does.
    struct Published {
        dir: std::path::PathBuf,
        index: JournalIndex,
        lines: Vec<Bytes>,
    }

    impl Delivery for Published {
        fn tail(&self) -> JournalTail {
            JournalTail::new(&self.dir, &self.index, self.lines.len() as u64 + 1)
        }
        fn journal_opened(&mut self, index: JournalIndex) {
            self.index = index;
        }
        fn publish(&mut self, lines: Vec<Bytes>, changes: &[IndexChange]) {
            self.index.apply_all(changes);
            self.lines.extend(lines);
        }
        fn held(&mut self, _held: bool) {}
        fn lost(&mut self, _lines: u64) {}
        fn line_dropped(&mut self, _reason: DropReason) {}
        fn resolved(&mut self, _resolution: &Resolution) {}
        fn pending_changed(&mut self) {}
    }

    fn batch(lines: &[&str]) -> Vec<u8> {
        lines
            .iter()
            .flat_map(|l| [l.as_bytes(), b"\n"].concat())
            .collect()
    }

    #[tokio::test]
    async fn keeper_lines_reach_the_session_once_and_in_order_whatever_was_missed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("journal");
        let (mut writer, index) =
            JournalWriter::open(&dir, JournalLimits::with_max_bytes(1 << 20)).expect("journal");
        let mut published = Published {
            dir: dir.clone(),
            index,
            lines: Vec::new(),
        };
        let batches = [batch(&["1", "2"]), batch(&["3", "4"]), batch(&["5"])];
        let mut sent = Vec::new();
        for b in &batches {
            let first_seq = writer.next_seq();
            let changes = writer.append(b, memchr::memchr_iter(b'\n', b).count() as u64);
            sent.push((first_seq, changes.expect("append"), Bytes::from(b.clone())));
        }
        let mut follower = Follower {
            session_id: "s",
            next: 1,
            output: &mut published,
            broken: false,
        };
        // The first batch was appended before the server connected: only the second is sent.
        // The gap is read from the journal, then the third batch (already read) is skipped.
        let (first, changes, lines) = sent[1].clone();
        follower.lines(first, &changes, lines).await;
        let (first, changes, lines) = sent[2].clone();
        follower.lines(first, &changes, lines).await;
        // A batch that continues what was published is taken as it comes.
        let more = batch(&["6", "7"]);
        let first_seq = writer.next_seq();
        let changes = writer.append(&more, 2).expect("append");
        follower.lines(first_seq, &changes, Bytes::from(more)).await;
        assert!(!follower.broken);
        let got: Vec<&[u8]> = published.lines.iter().map(|l| l.as_ref()).collect();
        assert_eq!(got, [&b"1"[..], b"2", b"3", b"4", b"5", b"6", b"7"]);
        // The session's view of the journal is the writer's: a tail from it finds nothing new.
        let mut tail = published.tail();
        let (rest, _) = tail.poll(1 << 20).expect("poll");
        assert!(rest.is_empty());
        assert_eq!(tail.next_seq(), 8);
    }
}
