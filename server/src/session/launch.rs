//! Launch policy: the instances, and everything a start decides (environment, credentials,
//! working directory, user), then the wiring of a started or adopted agent to its session.

use std::collections::BTreeMap;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indexmap::IndexMap;
use moorline_adapters::conversation::{Continuation, ConversationPlace};
use moorline_adapters::{Adapter, LaunchContext};
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::delivery::Run;
use super::{ConversationRequest, Lifecycle, Session, SessionError, Status};
use crate::clock::now_ms;
use crate::config::{Config, InstanceConfig, Limits, RuntimeConfig, Unusable};
use crate::keeper::agentio::{
    ConversationRecord, nothing_said_since, read_conversation, record_conversation,
};
use crate::keeper::journal::JournalLimits;
use crate::metrics::Metrics;
use crate::runtime::workspace::{self, Anchor};
use crate::runtime::{Agent, Runtime, SpawnSpec};

/// A configured instance, ready to start agents.
#[derive(Debug)]
pub(crate) struct Instance {
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
    pub(crate) fn usable(&self) -> Result<(), Unusable> {
        self.config.check_usable(&self.runtime_config)
    }
}

/// What a client asks for in `POST /sessions`.
#[derive(Debug, Clone, Default)]
pub(crate) struct CreateRequest {
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
    /// The project to work in: the session gets a worktree of its own as its `cwd`.
    pub project: Option<String>,
    /// The worktree's branch (default `moorline/<session id>`, new from the project's
    /// default branch).
    pub branch: Option<String>,
}

/// Starts agents for sessions: the part of session management that is policy, not
/// bookkeeping.
#[derive(Debug)]
pub(super) struct Launcher {
    pub(super) instances: IndexMap<String, Arc<Instance>>,
    pub(super) limits: Limits,
    moorline_exe: PathBuf,
    /// Who agents run as when their workspace belongs to root (`[runtime] agent_user`).
    agent_user: Option<(u32, u32)>,
    /// The server's working directory, where sessions of an instance without `cwd` start
    /// (`None`: it could not be read, and such creates are refused).
    server_cwd: Option<PathBuf>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) tracker: TaskTracker,
    /// Cancelled when the server stops its sessions: each run then stops its agent, or lets
    /// go of one that outlives the server.
    pub(super) stop_runs: CancellationToken,
}

impl Launcher {
    /// Builds the instances; `runtime_for` picks the runtime of each.
    pub(super) fn new(
        config: &Config,
        moorline_exe: PathBuf,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        runtime_for: &(dyn Fn(&InstanceConfig) -> Arc<dyn Runtime> + Sync),
    ) -> Result<Self, SessionError> {
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
        Ok(Self {
            instances,
            limits: config.limits.clone(),
            moorline_exe,
            agent_user,
            server_cwd: config.server_cwd().ok(),
            metrics,
            tracker,
            stop_runs: CancellationToken::new(),
        })
    }

    /// The instance a create with `instance_id` would use (`None`: the default one).
    pub(super) fn instance_for(&self, instance_id: Option<&str>) -> Option<&Arc<Instance>> {
        match instance_id {
            Some(id) => self.instances.get(id),
            None => self
                .instances
                .get("default")
                .or_else(|| self.instances.first().map(|(_, v)| v)),
        }
    }

    /// The error for an instance that does not exist, naming those that do.
    pub(super) fn unknown_instance(&self, id: &str) -> SessionError {
        SessionError::UnknownInstance {
            id: id.to_owned(),
            known: self.instances.keys().cloned().collect(),
        }
    }

    /// What a create may have: its instance, and its working directory resolved, once the
    /// environment it asks for is allowed.
    pub(super) fn admit(
        &self,
        req: &super::CreateRequest,
    ) -> Result<(Arc<Instance>, PathBuf), SessionError> {
        let instance = self
            .instance_for(req.instance_id.as_deref())
            .ok_or_else(|| self.unknown_instance(req.instance_id.as_deref().unwrap_or("default")))?
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
            None => default_cwd(&instance.config, self.server_cwd.as_deref())?,
        };
        Ok((instance, cwd))
    }

    pub(super) fn journal_limits(&self) -> JournalLimits {
        JournalLimits::with_max_bytes(self.limits.journal_max_bytes)
    }

    /// Launches the session's agent and the tasks around it.
    pub(super) async fn start(
        &self,
        session: &Arc<Session>,
        permit: OwnedSemaphorePermit,
        conversation: ConversationRequest,
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
                self.launch(session, &instance, permit, conversation).await
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
        conversation: ConversationRequest,
    ) -> Result<(), SessionError> {
        let started = Instant::now();
        let env = environment(instance, session)?;
        // Every start checks the working directory again: it may have been replaced since.
        let (workspace, user) = self.check_workspace(&instance.config, &session.cwd)?;
        let data_dir = session.dir.data();
        let continuation = continuation(session, instance, &data_dir, conversation)?;
        let resumed = continuation.resume.is_some();
        let mut adapter_config = instance.config.adapter_config();
        adapter_config.continuation = continuation;
        // This start's adapter: it knows which conversation it continues.
        let adapter = moorline_adapters::build(&adapter_config)?;
        let spec = adapter.launch(&LaunchContext {
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
        // A new conversation begins with this run's first line.
        let first_seq = match resumed {
            true => adapter_config.continuation.history_from,
            false => Some(session.hub().last_seq() + 1),
        };
        record_conversation(
            &session.dir.conversation(),
            &ConversationRecord {
                id: spec.conversation.clone(),
                resumed,
                first_seq,
            },
        );
        // The previous run may still be publishing its last lines.
        let run_lock = session.run_lock.clone().lock_owned().await;
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
                journal: self.journal_limits(),
                max_line: self.limits.max_line_bytes,
                pipe_bytes: self.limits.agent_pipe_bytes,
                exit_drain: self.limits.exit_drain(),
                hold_after_exit: self.limits.output_hold_after_exit(),
                options: instance.config.runtime_options(),
                adapter: adapter_config,
                approvals: instance.config.approval_policy(),
                git_dir: session.worktree.as_ref().map(|w| w.git_dir.clone()),
            })
            .await?;
        self.run_agent(
            session,
            instance,
            agent,
            Some(permit),
            run_lock,
            Some(adapter.as_ref()),
        );
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
        let anchor = anchor_of(instance, cwd, self.server_cwd.as_deref())?;
        let dir = anchor.open().map_err(|e| refuse(e.to_string()))?;
        let owner = workspace::owner(&dir).map_err(|e| refuse(e.to_string()))?;
        let user =
            workspace::agent_identity(owner, self.agent_user, nix::unistd::geteuid().is_root())
                .map_err(refuse)?;
        Ok((anchor, user))
    }

    /// Wires a started agent (`started`: the adapter of its start) or an adopted one
    /// (`None`) to its session: its input channel, the session's state, and its run.
    pub(super) fn run_agent(
        &self,
        session: &Arc<Session>,
        instance: &Arc<Instance>,
        agent: Agent,
        permit: Option<OwnedSemaphorePermit>,
        run_lock: OwnedMutexGuard<()>,
        started: Option<&dyn Adapter>,
    ) {
        let fresh = started.is_some();
        let (tx, rx) = mpsc::channel(self.limits.inbound_queue);
        let tx = super::InputSender::new(tx, self.limits.inbound_queue_bytes);
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
            let _ = std::fs::remove_file(session.dir.pending());
            let _ = std::fs::remove_file(session.dir.auth_failed());
            session.activity.reset();
        }
        session.persist();
        session
            .lifecycle
            .send_replace(Lifecycle::Running { generation });
        let run = Run {
            session: session.clone(),
            generation,
            run_lock,
            metrics: self.metrics.clone(),
            shutdown: self.stop_runs.clone(),
            stop_grace: self.limits.stop_grace(),
            greeting_lines: started.map(|adapter| {
                let mut greeting = moorline_adapters::pipeline::Outputs::default();
                adapter.translator().start(&mut greeting);
                greeting.to_clients.len() as u64
            }),
        };
        self.tracker.spawn(run.drive(agent.run, rx));
        tracing::info!(session = %session.id, instance = %instance.config.id, runtime = instance.runtime.name(), pid = ?agent.pid, generation, adopted = !fresh, "agent running");
    }
}

/// What a start does with the agent's conversation: continue the one its adapter finds for
/// the session (unless a new one was asked for), or begin a new one, with an id chosen here
/// for agents that take one. A conversation that cannot be continued is reported, never
/// dropped silently: the adapter tells clients when the agent starts.
fn continuation(
    session: &Session,
    instance: &Instance,
    data_dir: &Path,
    asked: ConversationRequest,
) -> Result<Continuation, SessionError> {
    let fresh = crate::keeper::id::random_hex(16)?;
    let mut continuation = Continuation {
        // A version 4 UUID, as Claude Code wants its session ids.
        fresh_id: Some(format!(
            "{}-{}-4{}-8{}-{}",
            &fresh[0..8],
            &fresh[8..12],
            &fresh[13..16],
            &fresh[17..20],
            &fresh[20..32]
        )),
        ..Continuation::default()
    };
    if asked == ConversationRequest::New {
        return Ok(continuation);
    }
    let recorded = read_conversation(&session.dir.conversation());
    // The journal speaks pi RPC for these: it shows whether anything was said.
    let pi_rpc = instance.adapter.dialect() == moorline_adapters::pipeline::Dialect::PiRpc;
    if let Some(from) = recorded.first_seq
        && pi_rpc
        && nothing_said_since(&session.dir.journal(), from)
    {
        // Nothing was said in it: a new conversation, without a word about a lost one.
        return Ok(continuation);
    }
    let home = instance.runtime.agent_home(&session.dir);
    match instance.adapter.find_conversation(&ConversationPlace {
        data_dir,
        home: home.as_deref(),
        cwd: &session.cwd,
        recorded: recorded.id.as_deref(),
    }) {
        Ok(found) => {
            // Its messages are in the journal from where it began (if that was recorded).
            continuation.history_from = found.as_ref().and(recorded.first_seq);
            continuation.resume = found;
        }
        Err(why) => {
            tracing::warn!(session = %session.id, reason = %why, "the agent's conversation cannot be continued: it starts a new one");
            continuation.lost = Some(why);
        }
    }
    Ok(continuation)
}

/// The environment of a start: the instance's, the session's, then the instance's
/// credentials file (server-side secrets win over anything a client asked for).
fn environment(
    instance: &Instance,
    session: &Session,
) -> Result<BTreeMap<String, String>, SessionError> {
    let mut env = instance.config.env.clone();
    env.extend(session.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    if let Some(file) = &instance.config.credentials_file {
        let secrets =
            crate::credentials::read(file).map_err(|source| SessionError::Credentials {
                instance: instance.config.id.clone(),
                source,
            })?;
        env.extend(secrets);
    }
    Ok(env)
}

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
fn anchor_of(
    instance: &InstanceConfig,
    cwd: &Path,
    server_cwd: Option<&Path>,
) -> Result<Anchor, SessionError> {
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
    if !instance.workspace_roots.is_empty()
        && default_cwd(instance, server_cwd).ok().as_deref() != Some(cwd)
    {
        return Err(refuse(format!(
            "no longer inside the workspace roots of instance {:?}",
            instance.id
        )));
    }
    Ok(Anchor::literal(cwd))
}

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
fn default_cwd(
    instance: &InstanceConfig,
    server_cwd: Option<&Path>,
) -> Result<PathBuf, SessionError> {
    let path = match (&instance.cwd, server_cwd) {
        (Some(p), _) => p.to_owned(),
        (None, Some(p)) => p.to_owned(),
        (None, None) => {
            return Err(SessionError::Io(io::Error::other(
                "the server's working directory cannot be read; give the instance a cwd",
            )));
        }
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
