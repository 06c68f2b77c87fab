//! The session registry: the map of sessions, their ids and the running-agent slots; create,
//! list, restart and delete.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use indexmap::IndexMap;
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::launch::{CreateRequest, Instance, Launcher};
use super::store::Meta;
use super::{
    ConversationRequest, Lifecycle, Session, SessionError, SessionSummary, State, Status,
    StopReason,
};
use crate::clock::now_ms;
use crate::config::{Config, InstanceConfig};
use crate::fanout::Hub;
use crate::keeper::journal;
use crate::keeper::layout::SessionDir;
use crate::metrics::Metrics;
use crate::projects::{ProjectError, Projects, Removal};
use crate::runtime::{ExitInfo, Runtime};

/// The state directory's lock file.
const LOCK_FILE: &str = "lock";
/// The registered projects, in the state directory.
const PROJECTS_FILE: &str = "projects.json";

/// All sessions of a server.
#[derive(Debug)]
pub(crate) struct SessionManager {
    pub(super) launcher: Launcher,
    sessions: RwLock<IndexMap<String, Arc<Session>>>,
    /// One permit per running agent.
    pub(super) slots: Arc<Semaphore>,
    pub(super) sessions_dir: PathBuf,
    /// The projects sessions can work in.
    projects: Arc<Projects>,
    /// Held for the manager's lifetime: one server per state directory.
    _lock: Flock<std::fs::File>,
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
    pub(crate) async fn new(
        config: &Config,
        moorline_exe: PathBuf,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        cancel: CancellationToken,
        runtime_for: &(dyn Fn(&InstanceConfig) -> Arc<dyn Runtime> + Sync),
    ) -> Result<Arc<Self>, SessionError> {
        let launcher = Launcher::new(config, moorline_exe, metrics, tracker, runtime_for)?;
        let sessions_dir = config.state_dir.join("sessions");
        std::fs::create_dir_all(&sessions_dir)?;
        let lock = lock_state_dir(&config.state_dir)?;
        // Runtimes mark what they start with this path: one spelling for it, whatever the cwd.
        let sessions_dir = std::fs::canonicalize(&sessions_dir)?;
        let projects = Arc::new(Projects::open(
            config.state_dir.join(PROJECTS_FILE),
            config.git_credentials_file.clone(),
            config.helper_env.clone(),
        )?);
        let manager = Arc::new(Self {
            projects,
            slots: Arc::new(Semaphore::new(config.limits.max_sessions)),
            launcher,
            sessions: RwLock::new(IndexMap::new()),
            sessions_dir,
            _lock: lock,
            cancel,
            events: crate::events::EventBus::new(
                config.limits.event_backlog,
                config.limits.max_event_streams,
            ),
        });
        manager.recover().await?;
        manager.prune_ended().await;
        manager.spawn_pruner();
        Ok(manager)
    }

    /// The projects.
    pub(crate) fn projects(&self) -> &Arc<Projects> {
        &self.projects
    }

    /// Forgets a project no session works in.
    pub(crate) fn remove_project(&self, id: &str) -> Result<(), SessionError> {
        let in_use = self
            .read()
            .values()
            .any(|s| s.worktree.as_ref().is_some_and(|w| w.project == id));
        if in_use {
            return Err(ProjectError::Invalid {
                field: "id",
                message: format!("sessions still work in project {id:?}: delete them first"),
            }
            .into());
        }
        self.projects.remove(id)?;
        Ok(())
    }

    /// Instances in configuration order.
    pub(crate) fn instances(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.launcher.instances.values()
    }

    /// The server-wide event bus sessions publish their changes on.
    pub(crate) fn events(&self) -> &crate::events::EventBus {
        &self.events
    }

    /// Every session, oldest first.
    pub(crate) fn all(&self) -> Vec<Arc<Session>> {
        self.read().values().cloned().collect()
    }

    /// The session with `id`.
    pub(crate) fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.read().get(id).cloned()
    }

    /// Summaries of every session, oldest first.
    pub(crate) fn list(&self) -> Vec<SessionSummary> {
        // Summaries read files: not under the registry's lock.
        let sessions: Vec<Arc<Session>> = self.read().values().cloned().collect();
        sessions.iter().map(|s| s.summary()).collect()
    }

    /// [`SessionManager::list`], asking git about the worktrees of sessions in projects
    /// ([`Session::fresh_summary`]): call it off the async workers.
    pub(crate) fn fresh_list(&self) -> Vec<SessionSummary> {
        let sessions: Vec<Arc<Session>> = self.read().values().cloned().collect();
        sessions
            .iter()
            .map(|s| s.fresh_summary(&self.projects))
            .collect()
    }

    /// Counts of sessions by status, for metrics.
    pub(crate) fn count_by_status(&self) -> BTreeMap<&'static str, usize> {
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

    /// Adds a loaded or created session to the registry.
    pub(super) fn insert(&self, session: Arc<Session>) {
        self.write().insert(session.id.clone(), session);
    }

    /// The instance a create with `instance_id` would use (`None`: the default one).
    pub(crate) fn instance_for(&self, instance_id: Option<&str>) -> Option<&Arc<Instance>> {
        self.launcher.instance_for(instance_id)
    }

    /// The error for an instance that does not exist, naming those that do.
    pub(crate) fn unknown_instance(&self, id: &str) -> SessionError {
        self.launcher.unknown_instance(id)
    }

    /// Fails with [`SessionError::MaxSessions`] if no agent could be started now.
    pub(crate) fn check_capacity(&self) -> Result<(), SessionError> {
        if self.slots.available_permits() == 0 {
            return Err(SessionError::MaxSessions {
                limit: self.launcher.limits.max_sessions,
            });
        }
        Ok(())
    }

    /// Creates a session and starts its agent.
    pub(crate) async fn create(
        &self,
        mut req: CreateRequest,
    ) -> Result<SessionSummary, SessionError> {
        // Like amarre, the limit is checked before anything else.
        let permit = self.take_slot()?;
        let project = match &req.project {
            Some(name) => {
                let project = self.projects.get(name)?;
                if req.cwd.is_some() {
                    return Err(ProjectError::Invalid {
                        field: "cwd",
                        message: "a session in a project works in its own worktree: give \
                                  project or cwd, not both"
                            .into(),
                    }
                    .into());
                }
                if req.instance_id.is_none() {
                    req.instance_id = project.default_instance.clone();
                }
                // The repository must be a place the instance's sessions may work in.
                req.cwd = Some(project.path.clone());
                Some(project)
            }
            None => None,
        };
        let (instance, cwd) = self.launcher.admit(&req)?;
        let (id, dir) = self.allocate_id()?;
        // What git says of a new worktree, for the summary answered below.
        let mut tree = None;
        let (cwd, worktree) = match project {
            Some(project) => {
                let branch = req.branch.clone();
                let name = id.clone();
                let projects = self.projects.clone();
                let made = tokio::task::spawn_blocking(move || {
                    projects
                        .create_worktree(&project, &name, branch.as_deref())
                        .map(|w| (projects.state(&w).ok(), w))
                })
                .await
                .map_err(|e| SessionError::Io(io::Error::other(e)))?;
                match made {
                    Ok((state, w)) => {
                        tree = state;
                        (w.path.clone(), Some(w))
                    }
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(dir.path());
                        return Err(e.into());
                    }
                }
            }
            None => (cwd, None),
        };
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
                worktree: worktree.clone(),
            },
            dir.clone(),
        ) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir.path());
                discard_worktree(&self.projects, worktree).await;
                return Err(e);
            }
        };
        *session.tree.lock().unwrap_or_else(|p| p.into_inner()) = tree;
        if let Err(e) = self
            .launcher
            .start(&session, permit, ConversationRequest::New)
            .await
        {
            // A failed spawn leaves nothing behind: no session, no slot, no directory, no
            // worktree.
            let _ = std::fs::remove_dir_all(dir.path());
            discard_worktree(&self.projects, worktree).await;
            return Err(e);
        }
        self.insert(session.clone());
        session.publish_created();
        let summary = session.summary();
        self.prune_ended().await;
        Ok(summary)
    }

    /// Removes ended sessions (their journals and directories with them), oldest first, beyond
    /// `limits.max_ended_sessions` or older than `limits.ended_session_ttl_ms`, so history
    /// cannot grow without bound.
    pub(crate) async fn prune_ended(&self) {
        let now = now_ms();
        let limits = &self.launcher.limits;
        let ttl = limits.ended_session_ttl_ms;
        let mut ended: Vec<(u64, String)> = self
            .read()
            .values()
            .filter_map(|s| Some((s.ended_at()?, s.id.clone())))
            .collect();
        ended.sort();
        let excess = ended.len().saturating_sub(limits.max_ended_sessions);
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
        let ttl = self.launcher.limits.ended_session_ttl_ms;
        let every = match ttl {
            0 => Duration::from_secs(60),
            ttl => Duration::from_millis((ttl / 4).clamp(100, 60_000)),
        };
        super::periodically(
            self,
            &self.launcher.tracker,
            every,
            self.cancel.clone(),
            |manager| async move { manager.prune_ended().await },
        );
    }

    /// Starts the agent of a session whose agent is not running, continuing its conversation
    /// unless `conversation` asks for a new one.
    pub(crate) async fn restart(
        &self,
        id: &str,
        conversation: ConversationRequest,
    ) -> Result<SessionSummary, SessionError> {
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
        self.launcher.start(&session, permit, conversation).await?;
        session.publish_status();
        Ok(session.summary())
    }

    /// Deletes a session: stops its agent (TERM, grace, KILL), closes its clients with 1000,
    /// and removes everything it stored, but a worktree holding work.
    pub(crate) async fn delete(&self, id: &str) -> Result<(), SessionError> {
        self.delete_with(id, false).await.map(drop)
    }

    /// [`SessionManager::delete`]; a worktree with uncommitted changes or commits its base
    /// lacks is kept (the answer says why) unless `force`.
    pub(crate) async fn delete_with(&self, id: &str, force: bool) -> Result<Removal, SessionError> {
        let session = self
            .write()
            .shift_remove(id)
            .ok_or(SessionError::NotFound)?;
        session.lifecycle.send_replace(Lifecycle::Deleted);
        // An agent being started right now is started, then stopped like any other.
        let _start = session.start_lock.lock().await;
        let finished = session
            .stop_agent(StopReason::Delete, self.launcher.limits.stop_grace())
            .await;
        session.lock().status = Status::Stopped;
        if !finished && let Some(instance) = &session.instance {
            // The run's own cleanup (after its exit) never came.
            instance.runtime.cleanup(id, &session.dir).await;
        }
        if let Err(e) = std::fs::remove_dir_all(session.dir.path()) {
            tracing::warn!(session = %id, error = %e, "cannot remove session directory");
        }
        let removal = match session.worktree.clone() {
            Some(worktree) => {
                let projects = self.projects.clone();
                let removed =
                    tokio::task::spawn_blocking(move || projects.remove_worktree(&worktree, force))
                        .await
                        .map_err(|e| SessionError::Io(io::Error::other(e)))?;
                match removed {
                    Ok(removal) => removal,
                    Err(e) => {
                        tracing::warn!(session = %id, error = %e, "cannot remove the session's worktree");
                        Removal::Kept(format!("the worktree could not be removed: {e}"))
                    }
                }
            }
            None => Removal::Removed,
        };
        if let Removal::Kept(why) = &removal {
            tracing::info!(session = %id, reason = %why, "worktree kept");
        }
        session.publish_deleted();
        tracing::info!(session = %id, "session deleted");
        Ok(removal)
    }

    /// Ends every agent run for the server's shutdown: each runtime stops the agents that would
    /// not survive the server (TERM, grace, KILL; how each ended is recorded, so the sessions are
    /// listed with that status after a restart) and lets go of those that do, for the next
    /// server to adopt. Returns once every run has ended or let go.
    pub(crate) async fn shutdown(&self) {
        self.launcher.stop_runs.cancel();
        let sessions: Vec<Arc<Session>> = self.read().values().cloned().collect();
        // The stop itself is bounded by the grace and SIGKILL's ten seconds.
        let limit = self.launcher.limits.stop_grace() + Duration::from_secs(11);
        futures_util::future::join_all(sessions.iter().map(|s| s.wait_run_over(limit))).await;
    }

    /// A running-agent slot, or the `max_sessions` error.
    fn take_slot(&self) -> Result<OwnedSemaphorePermit, SessionError> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| SessionError::MaxSessions {
                limit: self.launcher.limits.max_sessions,
            })
    }

    /// A fresh session id and its new directory.
    fn allocate_id(&self) -> Result<(String, SessionDir), SessionError> {
        loop {
            let id = crate::keeper::id::random_hex(6)?;
            let dir = self.sessions_dir.join(&id);
            // Ids are never reused, not even those of deleted sessions still on disk.
            if self.read().contains_key(&id) {
                continue;
            }
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok((id, SessionDir::new(dir))),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A session object for `meta`, its journal indexed.
    pub(super) fn open_session(
        &self,
        meta: Meta,
        dir: SessionDir,
    ) -> Result<Arc<Session>, SessionError> {
        let journal_dir = dir.journal();
        // Only read the journal here: a keeper may be appending to it right now.
        let (index, next_seq) = journal::scan_index(&journal_dir)?;
        let hub = Hub::new(
            journal_dir,
            index,
            next_seq - 1,
            self.launcher.limits.backlog_bytes,
        );
        let exit = match (meta.exit_code, meta.signal, meta.exit_reason) {
            (None, None, None) => None,
            (code, signal, reason) => Some(ExitInfo {
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
                exit: exit.unwrap_or(ExitInfo::UNKNOWN),
                last_seq: hub.last_seq(),
            },
        };
        let session = Arc::new(Session {
            id: meta.id.clone(),
            name: meta.name.clone(),
            instance: self.launcher.instances.get(&meta.instance_id).cloned(),
            instance_id: meta.instance_id.clone(),
            cwd: meta.cwd.clone(),
            worktree: meta.worktree.clone(),
            tree: Mutex::new(None),
            env: meta.env.clone(),
            created_at: meta.created_at,
            created_by: meta.created_by.clone(),
            dir,
            hub,
            run_lock: Arc::new(tokio::sync::Mutex::new(())),
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
            output_held: std::sync::atomic::AtomicBool::new(false),
            lines_lost: std::sync::atomic::AtomicU64::new(0),
            activity: super::OutputActivity::default(),
            input_seq: std::sync::atomic::AtomicU64::new(0),
            notices: tokio::sync::broadcast::channel(super::NOTICES).0,
            activity_window: self.launcher.limits.activity_window(),
            events: self.events.clone(),
        });
        Ok(session)
    }
}

/// Removes the worktree of a session that never started (nothing in it is anybody's work).
async fn discard_worktree(projects: &Arc<Projects>, worktree: Option<crate::projects::Worktree>) {
    if let Some(worktree) = worktree {
        let projects = projects.clone();
        let _ =
            tokio::task::spawn_blocking(move || projects.remove_worktree(&worktree, true)).await;
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
