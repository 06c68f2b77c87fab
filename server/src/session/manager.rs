//! The session registry: create, list, restart, delete, and persistence across server restarts.

use std::collections::BTreeMap;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use moorline_adapters::{Adapter, AdapterError, LaunchContext};
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pump::{OutputPump, stderr_reader, stdin_writer};
use super::store::{self, JOURNAL_DIR, Meta};
use super::{Lifecycle, NOTICES, Session, SessionSummary, State, Status, StopReason, now_ms};
use crate::agentio::AgentIo;
use crate::config::{Config, InstanceConfig, Limits, RuntimeConfig, Unusable};
use crate::credentials::CredentialsError;
use crate::fanout::Hub;
use crate::journal::{self, JournalLimits, JournalTail, JournalWriter};
use crate::metrics::Metrics;
use crate::runtime::workspace::{self, Anchor};
use crate::runtime::{Adoption, Agent, Output, Runtime, RuntimeError, SpawnSpec};
use moorline_adapters::pipeline::Pipeline;

/// A configured instance, ready to start agents.
#[derive(Debug)]
pub struct Instance {
    /// Its configuration.
    pub config: InstanceConfig,
    /// How to launch its agent.
    pub adapter: Arc<dyn Adapter>,
    /// Where its agents run.
    pub runtime: Arc<dyn Runtime>,
    /// The runtime settings its program is looked up with (`PATH`).
    runtime_config: Arc<RuntimeConfig>,
}

impl Instance {
    /// Whether sessions of this instance can start now, and if not why (checked afresh: a
    /// missing binary or credentials file may have been fixed since startup).
    pub fn usable(&self) -> Result<(), Unusable> {
        self.config.check_usable(&self.runtime_config)
    }
}

/// What a client asks for in `POST /sessions`.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    /// Instance to run; default: the instance named `default`, else the first.
    pub instance_id: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Environment on top of the instance's.
    pub env: BTreeMap<String, String>,
    /// Who asks (a tailnet login, `token` or `local`), recorded as the session's creator.
    pub created_by: Option<String>,
}

/// Why a session operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No session with that id.
    #[error("no such session")]
    NotFound,
    /// No instance with that id.
    #[error("unknown instance {id:?} (instances: {})", known.join(", "))]
    UnknownInstance {
        /// What was asked for.
        id: String,
        /// The instances that exist (those the client may use).
        known: Vec<String>,
    },
    /// The instance's credentials file is missing, unreadable or malformed.
    #[error("instance {instance:?}: {source}")]
    Credentials {
        /// The instance.
        instance: String,
        /// What is wrong with the file.
        source: CredentialsError,
    },
    /// `max_sessions` agents already run.
    #[error("{limit} sessions are already running")]
    MaxSessions {
        /// The limit.
        limit: usize,
    },
    /// Restart of a session whose agent runs.
    #[error("the session is already running")]
    AlreadyRunning,
    /// Restart of a session whose instance is no longer configured.
    #[error("instance {0:?} is no longer configured")]
    InstanceGone(String),
    /// A client asked for an environment variable it may not set.
    #[error("env {key}: {reason}")]
    EnvNotAllowed {
        /// The variable.
        key: String,
        /// Why not.
        reason: String,
    },
    /// The working directory is unusable.
    #[error("cwd {path}: {reason}")]
    InvalidCwd {
        /// What was asked for.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The adapter refused the launch.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The runtime could not start the agent.
    #[error(transparent)]
    Spawn(#[from] RuntimeError),
    /// Another server runs on the same state directory.
    #[error(
        "another moorline server is using the state directory {0} (two servers on one state directory would corrupt each other's sessions)"
    )]
    StateDirInUse(PathBuf),
    /// The state directory is unusable.
    #[error("state directory: {0}")]
    Io(#[from] io::Error),
}

/// All sessions of a server.
#[derive(Debug)]
pub struct SessionManager {
    limits: Limits,
    instances: IndexMap<String, Arc<Instance>>,
    sessions: RwLock<IndexMap<String, Arc<Session>>>,
    /// One permit per running agent.
    slots: Arc<Semaphore>,
    sessions_dir: PathBuf,
    /// Held for the manager's lifetime: one server per state directory.
    _lock: Flock<std::fs::File>,
    moorline_exe: PathBuf,
    /// Who agents run as when their workspace belongs to root (`[runtime] agent_user`).
    agent_user: Option<(u32, u32)>,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    /// Cancelled when the server shuts down.
    cancel: CancellationToken,
    /// Where sessions announce their changes.
    events: crate::events::EventBus,
}

impl SessionManager {
    /// Builds the instances and loads the sessions a previous server left in the state dir.
    ///
    /// `runtime_for` picks the runtime of each instance; session logic never looks behind the
    /// [`Runtime`] trait.
    pub async fn new(
        config: &Config,
        moorline_exe: PathBuf,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        cancel: CancellationToken,
        runtime_for: &(dyn Fn(&InstanceConfig) -> Arc<dyn Runtime> + Sync),
    ) -> Result<Arc<Self>, SessionError> {
        let mut instances = IndexMap::new();
        let runtime_config = Arc::new(config.runtime.clone());
        for inst in &config.instances {
            let adapter = moorline_adapters::build(&inst.adapter_config())?;
            let runtime = runtime_for(inst);
            let instance = Instance {
                config: inst.clone(),
                adapter,
                runtime,
                runtime_config: runtime_config.clone(),
            };
            match instance.usable() {
                Ok(()) => {
                    tracing::info!(instance = %inst.id, agent = instance.adapter.name(), runtime = instance.runtime.name(), "instance ready")
                }
                Err(why) => {
                    tracing::warn!(instance = %inst.id, agent = instance.adapter.name(), key = why.key, reason = %why.reason, "instance unusable: its sessions cannot start until this is fixed")
                }
            }
            instances.insert(inst.id.clone(), Arc::new(instance));
        }
        let agent_user = config
            .runtime
            .agent_ids()
            .map_err(|e| SessionError::Io(io::Error::other(e.to_string())))?;
        let sessions_dir = config.state_dir.join("sessions");
        std::fs::create_dir_all(&sessions_dir)?;
        let lock = lock_state_dir(&config.state_dir)?;
        // Runtimes mark what they start with this path: one spelling for it, whatever the cwd.
        let sessions_dir = std::fs::canonicalize(&sessions_dir)?;
        let manager = Arc::new(Self {
            limits: config.limits.clone(),
            instances,
            sessions: RwLock::new(IndexMap::new()),
            slots: Arc::new(Semaphore::new(config.limits.max_sessions)),
            sessions_dir,
            _lock: lock,
            moorline_exe,
            agent_user,
            metrics,
            tracker,
            cancel,
            events: crate::events::EventBus::new(config.limits.event_backlog),
        });
        manager.load_existing().await?;
        manager.prune_ended().await;
        manager.spawn_pruner();
        Ok(manager)
    }

    /// Instances in configuration order.
    pub fn instances(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.instances.values()
    }

    /// The server-wide event bus sessions publish their changes on.
    pub fn events(&self) -> &crate::events::EventBus {
        &self.events
    }

    /// Every session, oldest first.
    pub(crate) fn all(&self) -> Vec<Arc<Session>> {
        self.read().values().cloned().collect()
    }

    /// The session with `id`.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.read().get(id).cloned()
    }

    /// Summaries of every session, oldest first.
    pub fn list(&self) -> Vec<SessionSummary> {
        // Summaries read files: not under the registry's lock.
        let sessions: Vec<Arc<Session>> = self.read().values().cloned().collect();
        sessions.iter().map(|s| s.summary()).collect()
    }

    /// Counts of sessions by status, for metrics.
    pub fn count_by_status(&self) -> BTreeMap<&'static str, usize> {
        let mut counts: BTreeMap<&'static str, usize> =
            Status::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for s in self.read().values() {
            *counts.entry(s.status().as_str()).or_default() += 1;
        }
        counts
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, IndexMap<String, Arc<Session>>> {
        self.sessions.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, IndexMap<String, Arc<Session>>> {
        self.sessions.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The instance a create with `instance_id` would use (`None`: the default one).
    pub fn instance_for(&self, instance_id: Option<&str>) -> Option<&Arc<Instance>> {
        match instance_id {
            Some(id) => self.instances.get(id),
            None => self.default_instance(),
        }
    }

    fn default_instance(&self) -> Option<&Arc<Instance>> {
        self.instances
            .get("default")
            .or_else(|| self.instances.first().map(|(_, v)| v))
    }

    /// The error for an instance that does not exist, naming those that do.
    pub fn unknown_instance(&self, id: &str) -> SessionError {
        SessionError::UnknownInstance {
            id: id.to_owned(),
            known: self.instances.keys().cloned().collect(),
        }
    }

    /// Fails with [`SessionError::MaxSessions`] if no agent could be started now.
    pub fn check_capacity(&self) -> Result<(), SessionError> {
        if self.slots.available_permits() == 0 {
            return Err(SessionError::MaxSessions {
                limit: self.limits.max_sessions,
            });
        }
        Ok(())
    }

    /// Creates a session and starts its agent.
    pub async fn create(&self, req: CreateRequest) -> Result<SessionSummary, SessionError> {
        // Like amarre, the limit is checked before anything else.
        let permit = self.take_slot()?;
        let instance = match &req.instance_id {
            Some(id) => self
                .instances
                .get(id)
                .ok_or_else(|| self.unknown_instance(id))?,
            None => self
                .default_instance()
                .ok_or_else(|| self.unknown_instance("default"))?,
        }
        .clone();
        super::env::check(
            &req.env,
            &self.limits,
            instance.adapter.protected_env(),
            &instance.config.allowed_env,
            &instance.config.id,
        )
        .map_err(|r| SessionError::EnvNotAllowed {
            key: r.key,
            reason: r.reason,
        })?;
        let cwd = match &req.cwd {
            Some(asked) => workspace_cwd(&instance.config, asked)?,
            None => default_cwd(&instance.config)?,
        };
        let (id, dir) = self.allocate_id()?;
        let created_at = now_ms();
        let session = match self.open_session(
            Meta {
                id: id.clone(),
                name: req.name,
                instance_id: instance.config.id.clone(),
                cwd,
                env: req.env,
                created_at,
                created_by: req.created_by,
                spawned_at: created_at,
                status: Status::Crashed,
                exit_code: None,
                signal: None,
                pid: None,
                pid_start: None,
                ended_at: None,
                exit_reason: None,
            },
            dir.clone(),
        ) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        if let Err(e) = self.start(&session, permit).await {
            // A failed spawn leaves nothing behind: no session, no slot, no directory.
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.write().insert(id, session.clone());
        session.publish_created();
        let summary = session.summary();
        self.prune_ended().await;
        Ok(summary)
    }

    /// Removes ended sessions (their journals and directories with them), oldest first, beyond
    /// `limits.max_ended_sessions` or older than `limits.ended_session_ttl_ms`, so history
    /// cannot grow without bound.
    pub async fn prune_ended(&self) {
        let now = now_ms();
        let ttl = self.limits.ended_session_ttl_ms;
        let mut ended: Vec<(u64, String)> = self
            .read()
            .values()
            .filter_map(|s| Some((s.ended_at()?, s.id.clone())))
            .collect();
        ended.sort();
        let excess = ended.len().saturating_sub(self.limits.max_ended_sessions);
        for (i, (at, id)) in ended.into_iter().enumerate() {
            let expired = ttl > 0 && now.saturating_sub(at) >= ttl;
            if i >= excess && !expired {
                continue;
            }
            // It may have been restarted meanwhile.
            if self.get(&id).is_none_or(|s| s.ended_at().is_none()) {
                continue;
            }
            tracing::info!(session = %id, ended_at = at, expired, "removing an ended session");
            if let Err(e) = self.delete(&id).await {
                tracing::debug!(session = %id, error = %e, "ended session already gone");
            }
        }
    }

    /// Prunes ended sessions now and then, so a time to live holds without new sessions.
    fn spawn_pruner(self: &Arc<Self>) {
        let ttl = self.limits.ended_session_ttl_ms;
        let every = match ttl {
            0 => Duration::from_secs(60),
            ttl => Duration::from_millis((ttl / 4).clamp(100, 60_000)),
        };
        let manager = Arc::downgrade(self);
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = cancel.cancelled() => return,
                }
                let Some(manager) = manager.upgrade() else {
                    return;
                };
                manager.prune_ended().await;
            }
        });
    }

    /// Starts the agent of a session whose agent is not running.
    pub async fn restart(&self, id: &str) -> Result<SessionSummary, SessionError> {
        let session = self.get(id).ok_or(SessionError::NotFound)?;
        if session.instance.is_none() {
            return Err(SessionError::InstanceGone(session.instance_id.clone()));
        }
        {
            let state = session.lock();
            if state.status == Status::Running || state.starting {
                return Err(SessionError::AlreadyRunning);
            }
        }
        let permit = self.take_slot()?;
        self.start(&session, permit).await?;
        session.publish_status();
        Ok(session.summary())
    }

    /// Deletes a session: stops its agent (TERM, grace, KILL), closes its clients with 1000,
    /// and removes everything it stored.
    pub async fn delete(&self, id: &str) -> Result<(), SessionError> {
        let session = self
            .write()
            .shift_remove(id)
            .ok_or(SessionError::NotFound)?;
        session.lifecycle.send_replace(Lifecycle::Deleted);
        // An agent being started right now is started, then stopped like any other.
        let _start = session.start_lock.lock().await;
        let finished = session
            .stop_agent(StopReason::Delete, self.limits.stop_grace())
            .await;
        session.lock().status = Status::Stopped;
        if !finished && let Some(instance) = &session.instance {
            // The run's own cleanup (after its exit) never came.
            instance.runtime.cleanup(id, &session.dir).await;
        }
        if let Err(e) = std::fs::remove_dir_all(&session.dir) {
            tracing::warn!(session = %id, error = %e, "cannot remove session directory");
        }
        session.publish_deleted();
        tracing::info!(session = %id, "session deleted");
        Ok(())
    }

    /// Stops every agent that would not survive the server (TERM, grace, KILL), recording how
    /// each ended so the sessions are listed with that status after a restart. Agents of
    /// durable runtimes keep running, to be adopted by the next server.
    pub async fn shutdown(&self) {
        let sessions: Vec<Arc<Session>> = self
            .read()
            .values()
            .filter(|s| s.instance.as_ref().is_some_and(|i| !i.runtime.durable()))
            .cloned()
            .collect();
        let grace = self.limits.stop_grace();
        let stops = sessions
            .iter()
            .map(|s| s.stop_agent(StopReason::Shutdown, grace));
        futures_util::future::join_all(stops).await;
    }

    /// A running-agent slot, or the `max_sessions` error.
    fn take_slot(&self) -> Result<OwnedSemaphorePermit, SessionError> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| SessionError::MaxSessions {
                limit: self.limits.max_sessions,
            })
    }

    fn allocate_id(&self) -> Result<(String, PathBuf), SessionError> {
        loop {
            let mut raw = [0u8; 6];
            getrandom::fill(&mut raw).map_err(|e| io::Error::other(e.to_string()))?;
            let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let dir = self.sessions_dir.join(&id);
            // Ids are never reused, not even those of deleted sessions still on disk.
            if self.read().contains_key(&id) {
                continue;
            }
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok((id, dir)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn journal_limits(&self) -> JournalLimits {
        JournalLimits::with_max_bytes(self.limits.journal_max_bytes)
    }

    fn open_session(&self, meta: Meta, dir: PathBuf) -> Result<Arc<Session>, SessionError> {
        let journal_dir = dir.join(JOURNAL_DIR);
        // Only read the journal here: a keeper may be appending to it right now.
        let (index, next_seq) = journal::scan_index(&journal_dir)?;
        let hub = Hub::new(journal_dir, index, next_seq - 1, self.limits.backlog_bytes);
        let exit = match (meta.exit_code, meta.signal, meta.exit_reason) {
            (None, None, None) => None,
            (code, signal, reason) => Some(crate::runtime::ExitInfo {
                code,
                signal,
                reason,
            }),
        };
        // A session loaded as ended has ended as far as its clients can tell.
        let lifecycle = match meta.status {
            Status::Running => Lifecycle::Running { generation: 0 },
            _ => Lifecycle::Exited {
                generation: 0,
                exit: exit.unwrap_or(crate::runtime::ExitInfo::UNKNOWN),
                last_seq: hub.last_seq(),
            },
        };
        let session = Arc::new(Session {
            id: meta.id.clone(),
            name: meta.name.clone(),
            instance: self.instances.get(&meta.instance_id).cloned(),
            instance_id: meta.instance_id.clone(),
            cwd: meta.cwd.clone(),
            env: meta.env.clone(),
            created_at: meta.created_at,
            created_by: meta.created_by.clone(),
            dir,
            hub,
            writer: Arc::new(tokio::sync::Mutex::new(None)),
            state: Mutex::new(State {
                status: meta.status,
                spawned_at: meta.spawned_at,
                exit,
                generation: 0,
                starting: false,
                stopping: None,
                stdin: None,
                control: None,
                permit: None,
                pid: None,
                error: None,
                ended_at: meta.ended_at,
            }),
            lifecycle: watch::channel(lifecycle).0,
            start_lock: tokio::sync::Mutex::new(()),
            finished: watch::channel(0).0,
            clients: AtomicUsize::new(0),
            inputs: std::sync::atomic::AtomicU64::new(0),
            input_seq: std::sync::atomic::AtomicU64::new(0),
            notices: tokio::sync::broadcast::channel(NOTICES).0,
            output_held: std::sync::atomic::AtomicBool::new(false),
            lines_lost: std::sync::atomic::AtomicU64::new(0),
            activity: super::OutputActivity::default(),
            activity_window: self.limits.activity_window(),
            events: self.events.clone(),
        });
        Ok(session)
    }

    /// Launches the session's agent and the tasks around it.
    async fn start(
        &self,
        session: &Arc<Session>,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), SessionError> {
        let Some(instance) = session.instance.clone() else {
            return Err(SessionError::InstanceGone(session.instance_id.clone()));
        };
        {
            let mut state = session.lock();
            if state.starting || state.status == Status::Running {
                return Err(SessionError::AlreadyRunning);
            }
            state.starting = true;
        }
        let result = {
            // Held across the launch, so a delete waits for the start to finish.
            let _start = session.start_lock.lock().await;
            if matches!(*session.lifecycle.borrow(), Lifecycle::Deleted) {
                Err(SessionError::NotFound)
            } else {
                self.launch(session, &instance, permit).await
            }
        };
        session.lock().starting = false;
        result
    }

    async fn launch(
        &self,
        session: &Arc<Session>,
        instance: &Arc<Instance>,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), SessionError> {
        let started = Instant::now();
        let mut env = instance.config.env.clone();
        env.extend(session.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(file) = &instance.config.credentials_file {
            // Server-side secrets win over anything a client asked for.
            let secrets =
                crate::credentials::read(file).map_err(|source| SessionError::Credentials {
                    instance: instance.config.id.clone(),
                    source,
                })?;
            env.extend(secrets);
        }
        // Every start checks the working directory again: it may have been replaced since.
        let (workspace, user) = self.check_workspace(&instance.config, &session.cwd)?;
        let data_dir = session.dir.join(DATA_DIR);
        let spec = instance.adapter.launch(&LaunchContext {
            instance_id: &instance.config.id,
            session_id: &session.id,
            cwd: &session.cwd,
            env: &env,
            moorline_exe: &self.moorline_exe,
            data_dir: &data_dir,
        })?;
        std::fs::create_dir_all(&data_dir)?;
        for (relative, contents) in &spec.files {
            let path = data_dir.join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, contents)?;
        }
        agent_state_dir(&data_dir, user)?;
        // The previous run's pump may still be publishing its last lines.
        let mut writer = session.writer.clone().lock_owned().await;
        let journal_dir = session.dir.join(JOURNAL_DIR);
        if !instance.runtime.durable() && writer.is_none() {
            // The server writes this journal; opening it also cuts a torn last line.
            let (w, index) = JournalWriter::open(&journal_dir, self.journal_limits())?;
            session.hub.replace_index(index);
            *writer = Some(w);
        }
        let generation = session.lock().generation + 1;
        let agent = instance
            .runtime
            .spawn(SpawnSpec {
                instance_id: instance.config.id.clone(),
                session_id: session.id.clone(),
                generation,
                program: spec.program,
                args: spec.args,
                env: spec.env,
                workspace,
                user,
                session_dir: session.dir.clone(),
                journal_dir,
                journal: self.journal_limits(),
                max_line: self.limits.max_line_bytes,
                exit_drain: self.limits.exit_drain(),
                hold_after_exit: self.limits.output_hold_after_exit(),
                options: instance.config.runtime_options(),
                data_dir,
                adapter: instance.config.adapter_config(),
                approvals: instance.config.approval_policy(),
            })
            .await?;
        self.run_agent(session, instance, agent, Some(permit), writer, true);
        self.metrics
            .spawn_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Where a session's agent may work and who it runs as, checked now: the directory is
    /// opened beneath the workspace root it lies in (nothing may lead out of the root), or,
    /// outside every root (the instance's own `cwd`), without following any symlink. The
    /// runtime opens it again the same way; the owner of what was opened decides the user.
    fn check_workspace(
        &self,
        instance: &InstanceConfig,
        cwd: &Path,
    ) -> Result<(Anchor, Option<(u32, u32)>), SessionError> {
        let refuse = |reason: String| SessionError::InvalidCwd {
            path: cwd.to_owned(),
            reason,
        };
        let anchor = anchor_of(instance, cwd)?;
        let dir = anchor.open().map_err(|e| refuse(e.to_string()))?;
        let owner = workspace::owner(&dir).map_err(|e| refuse(e.to_string()))?;
        let user =
            workspace::agent_identity(owner, self.agent_user, nix::unistd::geteuid().is_root())
                .map_err(refuse)?;
        Ok((anchor, user))
    }

    /// Wires a started (or adopted) agent to its session.
    fn run_agent(
        &self,
        session: &Arc<Session>,
        instance: &Arc<Instance>,
        agent: Agent,
        permit: Option<OwnedSemaphorePermit>,
        writer: OwnedMutexGuard<Option<JournalWriter>>,
        fresh: bool,
    ) {
        let (tx, rx) = mpsc::channel(self.limits.inbound_queue);
        session
            .inputs
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let generation = {
            let mut state = session.lock();
            state.generation += 1;
            state.status = Status::Running;
            state.exit = None;
            state.error = None;
            state.stopping = None;
            if fresh {
                state.spawned_at = now_ms();
            }
            state.stdin = Some(tx);
            state.control = Some(agent.control.clone());
            state.permit = permit;
            state.pid = agent.pid;
            state.generation
        };
        if fresh {
            // The previous run's requests died with it.
            let _ = std::fs::remove_file(session.dir.join(store::PENDING_FILE));
            let _ = std::fs::remove_file(session.dir.join(store::AUTH_FAILED_FILE));
            session.activity.reset();
        }
        session.persist();
        session
            .lifecycle
            .send_replace(Lifecycle::Running { generation });
        if let Some(stderr) = agent.stderr {
            self.tracker
                .spawn(stderr_reader(session.clone(), stderr, STDERR_FILE_CAP));
        }
        let pump = OutputPump {
            session: session.clone(),
            generation,
            writer,
            metrics: self.metrics.clone(),
            cancel: self.cancel.clone(),
            lines: 0,
            greeting_lines: fresh.then(|| {
                let mut greeting = moorline_adapters::pipeline::Outputs::default();
                instance.adapter.translator().start(&mut greeting);
                greeting.to_clients.len() as u64
            }),
        };
        match agent.output {
            Output::Pipe(stdout) => {
                // The server owns this agent's stdio: its pipeline runs here. Its stdin stays
                // open until the agent is stopped, so a shutdown is a SIGTERM, never an
                // end-of-input the agent might take for a normal end.
                let pipeline = Pipeline::new(
                    instance.adapter.translator(),
                    instance.adapter.dialect(),
                    instance.config.approval_policy(),
                )
                .for_instance(&instance.config.id);
                let io = AgentIo::new(
                    self.limits.max_line_bytes,
                    pipeline,
                    self.limits.exit_drain(),
                )
                .hold_after_exit(self.limits.output_hold_after_exit());
                self.tracker.spawn(pump.pipe(
                    io,
                    stdout,
                    rx,
                    agent.stdin,
                    agent.exit,
                    agent.control,
                ));
            }
            Output::Journal(feed) => {
                // A keeper runs this agent's stdio; client lines go to it over its socket, and
                // the writer lets go on shutdown (the agent keeps running).
                self.tracker.spawn(stdin_writer(
                    session.id.clone(),
                    rx,
                    agent.stdin,
                    self.cancel.clone(),
                    feed.user_markers,
                ));
                let (index, next) = session.hub.index_snapshot();
                let tail = JournalTail::new(&session.dir.join(JOURNAL_DIR), &index, next);
                self.tracker.spawn(pump.follow(feed, agent.exit, tail));
            }
        }
        tracing::info!(session = %session.id, instance = %instance.config.id, runtime = instance.runtime.name(), pid = ?agent.pid, generation, adopted = !fresh, "agent running");
    }

    /// Loads sessions left by a previous server. Agents of durable runtimes are adopted again
    /// if they still run; agents of the process runtime did not survive it: any process of
    /// theirs still alive is killed, and the session is listed as crashed.
    async fn load_existing(&self) -> Result<(), SessionError> {
        let mut metas = Vec::new();
        let mut incomplete = Vec::new();
        for entry in std::fs::read_dir(&self.sessions_dir)? {
            let dir = entry?.path();
            match store::load(&dir) {
                Ok(meta) => metas.push((meta, dir)),
                Err(e) => {
                    // A directory without valid metadata is a create that never finished.
                    tracing::warn!(dir = %dir.display(), error = %e, "removing incomplete session directory");
                    incomplete.push(dir);
                }
            }
        }
        metas.sort_by_key(|(m, _)| m.created_at);
        let mut live = Vec::new();
        for (mut meta, dir) in metas {
            let instance = self.instances.get(&meta.instance_id).cloned();
            let was_running = matches!(meta.status, Status::Running | Status::Stopped);
            let mut adopted = None;
            match &instance {
                Some(inst) if inst.runtime.durable() && was_running => {
                    match inst.runtime.adopt(&meta.id, &dir).await {
                        Adoption::Running(agent) => adopted = Some(agent),
                        Adoption::Exited(exit) => {
                            meta.status = if exit.is_success() {
                                Status::Exited
                            } else {
                                Status::Crashed
                            };
                            meta.exit_code = exit.code;
                            meta.signal = exit.signal;
                            meta.exit_reason = exit.reason;
                        }
                        Adoption::Lost => {
                            meta.status = Status::Crashed;
                            meta.exit_code = None;
                            meta.signal = None;
                            meta.exit_reason = Some(crate::runtime::ExitReason::KeeperLost);
                        }
                    }
                    if adopted.is_none() {
                        inst.runtime.cleanup(&meta.id, &dir).await;
                    }
                }
                Some(inst) if inst.runtime.durable() => {}
                _ if was_running => {
                    if let (Some(pid), Some(start)) = (meta.pid, meta.pid_start) {
                        kill_orphan(pid, start);
                    }
                    meta.status = Status::Crashed;
                }
                _ => {}
            }
            if adopted.is_none() && was_running {
                meta.pid = None;
                meta.pid_start = None;
                store::save(&dir, &meta)?;
            }
            let session = self.open_session(meta, dir)?;
            if let (Some(agent), Some(inst)) = (adopted, &instance) {
                let permit = self.slots.clone().try_acquire_owned().ok();
                if permit.is_none() {
                    tracing::warn!(session = %session.id, "adopted beyond max_sessions");
                }
                let writer = session.writer.clone().lock_owned().await;
                self.run_agent(&session, inst, agent, permit, writer, false);
            }
            tracing::info!(session = %session.id, status = session.status().as_str(), last_seq = session.hub.last_seq(), "session loaded");
            live.push(session.id.clone());
            self.write().insert(session.id.clone(), session);
        }
        // Containers, terminal sessions and cgroups of sessions that no longer exist.
        let mut seen = std::collections::BTreeSet::new();
        for inst in self.instances.values() {
            if inst.runtime.durable() && seen.insert(inst.runtime.name()) {
                inst.runtime.reconcile(&self.sessions_dir, &live).await;
            }
        }
        // Only now: reconciliation knows a container as ours by its session's directory.
        for dir in incomplete {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(())
    }
}

/// Takes the state directory's lock file. The lock goes with the process (never inherited:
/// the file is close-on-exec), so a killed server never blocks the next one.
fn lock_state_dir(state_dir: &Path) -> Result<Flock<std::fs::File>, SessionError> {
    let path = state_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            SessionError::StateDirInUse(state_dir.to_owned())
        } else {
            SessionError::Io(errno.into())
        }
    })
}

/// The state directory's lock file.
const LOCK_FILE: &str = "lock";

/// Session-private files adapters ask for (visible to the agent, read-only in containers).
const DATA_DIR: &str = "data";

/// A working directory a client asked for: inside one of the instance's workspace roots
/// (after resolving `..` and symlinks), existing, or created when the instance says so.
fn workspace_cwd(instance: &InstanceConfig, asked: &Path) -> Result<PathBuf, SessionError> {
    let refuse = |reason: String| SessionError::InvalidCwd {
        path: asked.to_owned(),
        reason,
    };
    if instance.workspace_roots.is_empty() {
        return Err(refuse(format!(
            "instance {:?} does not let clients choose a working directory (set workspace_roots)",
            instance.id
        )));
    }
    if !asked.is_absolute() {
        return Err(refuse("must be an absolute path".into()));
    }
    let roots: Vec<PathBuf> = instance
        .workspace_roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    // Resolve the longest existing ancestor, so `..` and symlinks cannot escape a root.
    let mut existing = asked.to_owned();
    let mut missing = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                missing.push(name.to_owned());
                existing = parent.to_owned();
            }
            _ => return Err(refuse("no part of it exists".into())),
        }
    }
    let mut resolved = std::fs::canonicalize(&existing).map_err(|e| refuse(e.to_string()))?;
    for name in missing.iter().rev() {
        if name == ".." || name == "." {
            return Err(refuse(
                "must not contain . or .. in a part that does not exist".into(),
            ));
        }
        resolved.push(name);
    }
    let Some(anchor) = roots
        .iter()
        .find_map(|root| Anchor::beneath(root, &resolved))
    else {
        if let Some(root) = instance
            .workspace_roots
            .iter()
            .find(|r| asked.starts_with(r) && !r.is_dir())
        {
            return Err(refuse(format!(
                "the workspace root {} of instance {:?} does not exist",
                root.display(),
                instance.id
            )));
        }
        return Err(refuse(format!(
            "outside the workspace roots of instance {:?}",
            instance.id
        )));
    };
    if !missing.is_empty() {
        if !instance.create_cwd {
            return Err(refuse(
                "does not exist (the instance does not create_cwd)".into(),
            ));
        }
        // Beneath the root, step by step: a symlink put in the way leads nowhere else.
        anchor.create().map_err(|e| refuse(e.to_string()))?;
    }
    Ok(resolved)
}

/// Where a session's working directory is opened from at every start: the workspace root it
/// lies in; or, outside every root, `/`, following no symlink (the path was resolved when the
/// session was created, so a symlink in it now was put there since). With workspace roots,
/// a directory outside them is only accepted if it is the instance's own default.
fn anchor_of(instance: &InstanceConfig, cwd: &Path) -> Result<Anchor, SessionError> {
    let refuse = |reason: String| SessionError::InvalidCwd {
        path: cwd.to_owned(),
        reason,
    };
    if !cwd.is_absolute()
        || cwd
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(refuse("must be an absolute path without . or ..".into()));
    }
    let roots: Vec<PathBuf> = instance
        .workspace_roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    if let Some(anchor) = roots.iter().find_map(|root| Anchor::beneath(root, cwd)) {
        return Ok(anchor);
    }
    if !instance.workspace_roots.is_empty() && default_cwd(instance).ok().as_deref() != Some(cwd) {
        return Err(refuse(format!(
            "no longer inside the workspace roots of instance {:?}",
            instance.id
        )));
    }
    Ok(Anchor::literal(cwd))
}

/// Cap on the stderr file kept per session.
const STDERR_FILE_CAP: u64 = 8 << 20;

/// The one directory of the data directory the agent may write
/// ([`moorline_adapters::AGENT_STATE_DIR`]), given to the agent's user. The data directory
/// itself stays moorline's, so the agent cannot swap what moorline writes there for a symlink.
fn agent_state_dir(data_dir: &Path, user: Option<(u32, u32)>) -> io::Result<()> {
    let dir = data_dir.join(moorline_adapters::AGENT_STATE_DIR);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if let Some((uid, gid)) = user {
        std::os::unix::fs::lchown(&dir, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// The instance's own working directory (or the server's), without symlinks: that is how it
/// is stored, and how every start opens it.
fn default_cwd(instance: &InstanceConfig) -> Result<PathBuf, SessionError> {
    let path = match &instance.cwd {
        Some(p) => p.to_owned(),
        None => std::env::current_dir()?,
    };
    let refuse = |reason: String| SessionError::InvalidCwd {
        path: path.clone(),
        reason,
    };
    let resolved = std::fs::canonicalize(&path).map_err(|e| refuse(e.to_string()))?;
    match std::fs::metadata(&resolved) {
        Ok(m) if m.is_dir() => Ok(resolved),
        Ok(_) => Err(refuse("not a directory".into())),
        Err(e) => Err(refuse(e.to_string())),
    }
}

/// Kills the process group of an agent a crashed server left behind, if it is still the same
/// process (same start time), never a recycled pid.
fn kill_orphan(pid: u32, start: u64) {
    if store::process_start_time(pid) != Some(start) {
        return;
    }
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    let pgid = nix::unistd::Pid::from_raw(raw);
    tracing::warn!(pid, "killing agent left running by a previous server");
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
}
