//! The durable runtimes, `tmux` and `runc`: agents that outlive the server.
//!
//! Both start a keeper ([`super::keeper`]) from a pane of moorline's own tmux server; with `runc`
//! the keeper runs the agent in a container. The server talks to the keeper over a Unix socket
//! in the session's run directory and follows the journal the keeper writes, so a restarted
//! server adopts running agents by reconnecting, without losing or duplicating a line.
//!
//! Run directory (`<session>/run/`): `keeper.json` (what to run), `stdin.sock`, `keeper.pid`,
//! `agent.pid`, `container.id` (runc), `bundle/` (runc), `network.json`, `net.pid`, `net.log` and
//! `resolv.conf` (runc, isolated network, see [`super::network`]), and `exit` once the agent has
//! ended.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use super::keeper::{self, KeeperSpec};
use super::network::{self, NetworkHook, NetworkPlan};
use super::runc::{self, BundleSpec, Runc};
use super::tmux::Tmux;
use super::{
    Adoption, Agent, AgentControl, Bell, ExitInfo, ExitReason, JournalFeed, Output, Runtime,
    RuntimeError, SpawnSpec,
};
use crate::config::{NetworkMode, RuntimeConfig};
use crate::session::store;

/// The run directory inside a session directory.
pub const RUN_DIR: &str = "run";
/// The per-session home of containers, inside a session directory.
pub const HOME_DIR: &str = "home";
const CONTAINER_ID_FILE: &str = "container.id";
/// Longest Unix socket path the kernel accepts (`sockaddr_un.sun_path`, with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long a keeper gets to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Container settings that come from the machine rather than the instance.
#[derive(Debug, Clone)]
pub struct ContainerHost {
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
pub struct DurableRuntime {
    tmux: Tmux,
    container: Option<ContainerHost>,
    moorline_exe: PathBuf,
    config: RuntimeConfig,
}

impl DurableRuntime {
    /// A runtime that runs keepers (and, with `container`, containers).
    pub fn new(
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

    fn spawn_error(program: &Path, msg: impl Into<String>) -> RuntimeError {
        RuntimeError::Spawn {
            program: program.display().to_string(),
            source: io::Error::other(msg.into()),
        }
    }

    /// The environment an agent starts with: only what was passed on purpose.
    fn base_env(&self) -> BTreeMap<String, String> {
        self.config.passed_env.clone()
    }

    async fn start(&self, spec: &SpawnSpec) -> io::Result<(PathBuf, Arc<dyn AgentControl>)> {
        let run_dir = spec.session_dir.join(RUN_DIR);
        let socket = run_dir.join(keeper::SOCKET_FILE);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(io::Error::other(format!(
                "the session socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter state_dir",
                socket.display()
            )));
        }
        std::fs::create_dir_all(&run_dir)?;
        // A previous run's network helper leaves with its container; make sure.
        network::stop_helper(&run_dir);
        for stale in [
            keeper::SOCKET_FILE,
            keeper::EXIT_FILE,
            keeper::KEEPER_PID_FILE,
            keeper::AGENT_PID_FILE,
            CONTAINER_ID_FILE,
            network::RESOLV_FILE,
        ] {
            let _ = std::fs::remove_file(run_dir.join(stale));
        }
        let mut env = self.base_env();
        let stderr_file = spec.session_dir.join(store::STDERR_FILE);
        // Without a container the keeper starts the agent in its workspace, as its user; runc
        // gets both from the bundle and runs in the run directory.
        let mut workspace = None;
        let mut user = None;
        let mut oom_cgroup = None;
        let (program, args, control): (PathBuf, Vec<String>, Arc<dyn AgentControl>) =
            match &self.container {
                None => {
                    env.extend(spec.env.clone());
                    workspace = Some(spec.workspace.clone());
                    user = spec.user;
                    let control = Arc::new(GroupControl {
                        pid_file: run_dir.join(keeper::AGENT_PID_FILE),
                    });
                    (spec.program.clone(), spec.args.clone(), control)
                }
                Some(host) => {
                    let program = resolve(&spec.program, env.get("PATH").map(String::as_str))
                        .ok_or_else(|| {
                            io::Error::other(format!(
                                "{} not found on this machine",
                                spec.program.display()
                            ))
                        })?;
                    let home = spec.session_dir.join(HOME_DIR);
                    std::fs::create_dir_all(&home)?;
                    let mut container_env = env.clone();
                    container_env.insert("HOME".into(), runc::CONTAINER_HOME.into());
                    container_env.extend(spec.env.clone());
                    let id = container_id(&spec.session_id, spec.generation)?;
                    let (hook, resolv) = self.isolated_network(host, spec, &run_dir)?;
                    if spec.options.memory_limit.is_some() && host.limits_allowed {
                        oom_cgroup = Some(runc::cgroups_path(&id));
                    }
                    let bundle = run_dir.join("bundle");
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
                            extra_rw: vec![spec.data_dir.clone()],
                            network: spec.options.network,
                            network_hook: hook,
                            resolv_conf: resolv,
                            pids_limit: spec.options.pids_limit,
                            memory_limit: spec.options.memory_limit,
                            rootless: host.rootless,
                            limits_allowed: host.limits_allowed,
                        },
                    )?;
                    std::fs::write(run_dir.join(CONTAINER_ID_FILE), &id)?;
                    let control = Arc::new(ContainerControl {
                        runc: host.runc.clone(),
                        id: id.clone(),
                    });
                    (
                        host.runc.program().to_owned(),
                        host.runc.run_args(&bundle, &id),
                        control,
                    )
                }
            };
        let keeper_spec = KeeperSpec {
            session_id: spec.session_id.clone(),
            program,
            args,
            env,
            cwd: run_dir.clone(),
            workspace,
            user,
            journal_dir: spec.journal_dir.clone(),
            journal_max_bytes: spec.journal.max_bytes,
            journal_segment_bytes: spec.journal.segment_bytes,
            max_line: spec.max_line,
            max_input_line: spec.max_line.max(16 << 20),
            stderr_file,
            exit_drain_ms: spec.exit_drain.as_millis() as u64,
            hold_after_exit_ms: spec.hold_after_exit.as_millis() as u64,
            oom_cgroup,
            adapter: spec.adapter.clone(),
            approvals: spec.approvals.clone(),
            pending_file: spec.session_dir.join(store::PENDING_FILE),
            instance_id: spec.instance_id.clone(),
            user_markers: true,
            container: self.container.is_some(),
        };
        // It holds the agent's environment (API keys): owner only.
        crate::fsio::write_private(
            &run_dir.join(keeper::SPEC_FILE),
            &serde_json::to_vec_pretty(&keeper_spec).map_err(io::Error::other)?,
        )?;
        let argv = vec![
            self.moorline_exe.display().to_string(),
            "keeper-pane".into(),
            run_dir.display().to_string(),
        ];
        let owner = owner(spec.session_dir.parent().unwrap_or(&spec.session_dir));
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
        Ok((run_dir, control))
    }

    /// What an `isolated` container needs: its network plan written for the hook, the hook,
    /// and a resolver file when the host's resolver is on loopback. Fails (the session does not
    /// start) without slirp4netns: an isolated instance never gets the host's network instead.
    fn isolated_network(
        &self,
        host: &ContainerHost,
        spec: &SpawnSpec,
        run_dir: &Path,
    ) -> io::Result<(Option<NetworkHook>, Option<PathBuf>)> {
        if spec.options.network != NetworkMode::Isolated {
            return Ok((None, None));
        }
        let Some(slirp4netns) = &host.slirp4netns else {
            return Err(io::Error::other(format!(
                "network = \"isolated\" needs slirp4netns, which was not found ({}); install it, \
                 set runtime.slirp4netns, or give the instance network = \"host\" or \"none\"",
                self.config.slirp4netns.display()
            )));
        };
        network::write_plan(
            run_dir,
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
                let path = run_dir.join(network::RESOLV_FILE);
                std::fs::write(&path, text)?;
                Some(path)
            }
            None => None,
        };
        Ok((Some(NetworkHook::new(&self.moorline_exe, run_dir)), resolv))
    }

    /// Connects to a keeper and turns the connection into an [`Agent`].
    fn agent(&self, run_dir: &Path, stream: UnixStream, control: Arc<dyn AgentControl>) -> Agent {
        let (mut read, write) = stream.into_split();
        // Every message also counts as a ring: the pump reads the journal after each.
        let (bell_tx, bell_rx) = mpsc::channel(4);
        let (settled_tx, settled_rx) = mpsc::channel(1024);
        let (exit_tx, exit_rx) = oneshot::channel();
        let dir = run_dir.to_owned();
        // Keepers of older servers neither understand user markers nor report approvals.
        let user_markers = keeper::read_spec(run_dir).is_some_and(|s| s.user_markers);
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            // A settled approval being read: bytes up to its newline.
            let mut record: Option<Vec<u8>> = None;
            // A `LOST` byte and the part of its count read so far.
            let mut lost: Option<Vec<u8>> = None;
            'read: loop {
                let n = match read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut grew = false;
                for &b in &buf[..n] {
                    if let Some(count) = lost.as_mut() {
                        count.push(b);
                        if count.len() == 8 {
                            let mut le = [0u8; 8];
                            le.copy_from_slice(count);
                            lost = None;
                            if bell_tx
                                .send(Bell::Lost(u64::from_le_bytes(le)))
                                .await
                                .is_err()
                            {
                                break 'read;
                            }
                        }
                        continue;
                    }
                    if let Some(r) = record.as_mut() {
                        if b == b'\n' {
                            if let Ok(resolution) = serde_json::from_slice(r) {
                                let _ = settled_tx.try_send(resolution);
                            }
                            record = None;
                        } else if r.len() > 64 * 1024 {
                            // A record is a few hundred bytes; anything far larger is not one.
                            record = None;
                        } else {
                            r.push(b);
                        }
                        continue;
                    }
                    let news = match b {
                        keeper::RESOLUTION => {
                            record = Some(Vec::new());
                            continue;
                        }
                        Bell::HELD => Bell::Held,
                        Bell::FLOWING => Bell::Flowing,
                        Bell::PENDING => Bell::Pending,
                        Bell::LOST => {
                            lost = Some(Vec::with_capacity(8));
                            continue;
                        }
                        _ => {
                            grew = true;
                            continue;
                        }
                    };
                    if bell_tx.send(news).await.is_err() {
                        break 'read;
                    }
                }
                // One pending ring is enough: the server reads everything new on it.
                if grew {
                    let _ = bell_tx.try_send(Bell::Grew);
                }
            }
            // The keeper closes the connection after writing the exit file, or it died.
            let _ = exit_tx.send(
                keeper::read_exit(&dir)
                    .unwrap_or_else(|| ExitInfo::UNKNOWN.because(ExitReason::KeeperLost)),
            );
        });
        let pid = std::fs::read_to_string(run_dir.join(keeper::KEEPER_PID_FILE))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        Agent {
            pid,
            stdin: Box::new(write),
            output: Output::Journal(JournalFeed {
                doorbell: bell_rx,
                resolutions: settled_rx,
                user_markers,
            }),
            stderr: None,
            exit: Box::pin(async move { exit_rx.await.unwrap_or(ExitInfo::UNKNOWN) }),
            control,
        }
    }

    fn control_for(&self, run_dir: &Path) -> Arc<dyn AgentControl> {
        match &self.container {
            Some(host) => Arc::new(ContainerControl {
                runc: host.runc.clone(),
                id: std::fs::read_to_string(run_dir.join(CONTAINER_ID_FILE)).unwrap_or_default(),
            }),
            None => Arc::new(GroupControl {
                pid_file: run_dir.join(keeper::AGENT_PID_FILE),
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

    fn durable(&self) -> bool {
        true
    }

    async fn spawn(&self, spec: SpawnSpec) -> Result<Agent, RuntimeError> {
        let (run_dir, control) = self
            .start(&spec)
            .await
            .map_err(|e| Self::spawn_error(&spec.program, e.to_string()))?;
        let socket = run_dir.join(keeper::SOCKET_FILE);
        let started = tokio::time::Instant::now();
        loop {
            match UnixStream::connect(&socket).await {
                Ok(stream) => return Ok(self.agent(&run_dir, stream, control)),
                Err(_) if keeper::read_exit(&run_dir).is_some() => {
                    let tail = store::stderr_tail(&spec.session_dir, store::STDERR_TAIL_BYTES);
                    self.cleanup(&spec.session_id, &spec.session_dir).await;
                    return Err(Self::spawn_error(
                        &spec.program,
                        format!("the keeper failed: {tail}"),
                    ));
                }
                Err(_) if started.elapsed() > START_TIMEOUT => {
                    let tail = store::stderr_tail(&spec.session_dir, store::STDERR_TAIL_BYTES);
                    self.cleanup(&spec.session_id, &spec.session_dir).await;
                    return Err(Self::spawn_error(
                        &spec.program,
                        format!("the keeper did not start: {tail}"),
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    async fn adopt(&self, _session_id: &str, session_dir: &Path) -> Adoption {
        let run_dir = session_dir.join(RUN_DIR);
        if let Ok(stream) = UnixStream::connect(run_dir.join(keeper::SOCKET_FILE)).await {
            let control = self.control_for(&run_dir);
            return Adoption::Running(self.agent(&run_dir, stream, control));
        }
        match keeper::read_exit(&run_dir) {
            Some(exit) => Adoption::Exited(exit),
            None => Adoption::Lost,
        }
    }

    async fn cleanup(&self, session_id: &str, session_dir: &Path) {
        let run_dir = session_dir.join(RUN_DIR);
        if let Some(host) = &self.container {
            if let Ok(id) = std::fs::read_to_string(run_dir.join(CONTAINER_ID_FILE)) {
                host.runc.delete(id.trim()).await;
            }
            network::stop_helper(&run_dir);
            let _ = std::fs::remove_dir_all(run_dir.join("bundle"));
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

/// How tmux sessions name the server they belong to: its sessions directory.
fn owner(sessions_dir: &Path) -> String {
    sessions_dir.display().to_string()
}

/// A fresh container id: never reused, even for the same session and start number.
fn container_id(session: &str, generation: u64) -> io::Result<String> {
    let mut raw = [0u8; 3];
    getrandom::fill(&mut raw).map_err(|e| io::Error::other(e.to_string()))?;
    let suffix: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}{session}-{generation}-{suffix}",
        runc::ID_PREFIX
    ))
}

/// Finds `program` in `path` (a `PATH` value) unless it is already a path.
pub fn resolve(program: &Path, path: Option<&str>) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_owned());
    }
    path.unwrap_or("/usr/local/bin:/usr/bin:/bin")
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
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
    /// while.
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

/// Signals the process group of an agent the keeper started (the `tmux` runtime).
#[derive(Debug)]
struct GroupControl {
    pid_file: PathBuf,
}

impl GroupControl {
    fn send(&self, signal: nix::sys::signal::Signal) -> io::Result<()> {
        let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        else {
            return Ok(());
        };
        match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl AgentControl for GroupControl {
    fn terminate(&self) -> io::Result<()> {
        self.send(nix::sys::signal::Signal::SIGTERM)
    }

    fn kill(&self) -> io::Result<()> {
        self.send(nix::sys::signal::Signal::SIGKILL)
    }
}
