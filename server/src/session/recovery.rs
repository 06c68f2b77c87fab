//! Recovery: what a starting server finds of the last one. Every session on disk is loaded;
//! the runtime of each session whose agent was running says what became of it (running again,
//! adopted; ended unseen; lost); then each runtime removes what it finds of sessions that no
//! longer exist.

use std::collections::BTreeSet;

use super::registry::SessionManager;
use super::store::{self, Meta};
use super::{SessionError, Status};
use crate::keeper::layout::SessionDir;
use crate::runtime::{Adoption, Agent, ExitReason, Found};

impl SessionManager {
    /// Loads the sessions a previous server left, adopting the agents that still run.
    pub(super) async fn recover(&self) -> Result<(), SessionError> {
        let mut metas = Vec::new();
        let mut incomplete = Vec::new();
        for entry in std::fs::read_dir(&self.sessions_dir)? {
            let dir = SessionDir::new(entry?.path());
            match store::load(&dir) {
                Ok(meta) => metas.push((meta, dir)),
                Err(e) => {
                    // A directory without valid metadata is a create that never finished.
                    tracing::warn!(dir = %dir.path().display(), error = %e, "removing incomplete session directory");
                    incomplete.push(dir);
                }
            }
        }
        metas.sort_by_key(|(m, _)| m.created_at);
        let mut live = Vec::new();
        for (mut meta, dir) in metas {
            let was_running = matches!(meta.status, Status::Running | Status::Stopped);
            let adopted = match was_running {
                true => self.find_agent(&mut meta, &dir).await,
                false => None,
            };
            if was_running && adopted.is_none() {
                store::save(&dir, &meta)?;
            }
            let session = self.open_session(meta, dir)?;
            if let (Some(agent), Some(inst)) = (adopted, &session.instance) {
                let permit = self.slots.clone().try_acquire_owned().ok();
                if permit.is_none() {
                    tracing::warn!(session = %session.id, "adopted beyond max_sessions");
                }
                let run_lock = session.run_lock.clone().lock_owned().await;
                self.launcher
                    .run_agent(&session, inst, agent, permit, run_lock, None);
            }
            tracing::info!(session = %session.id, status = session.status().as_str(), last_seq = session.hub.last_seq(), "session loaded");
            live.push(session.id.clone());
            self.insert(session);
        }
        // Containers, terminal sessions and cgroups of sessions that no longer exist.
        let mut seen = BTreeSet::new();
        for inst in self.launcher.instances.values() {
            if seen.insert(inst.runtime.name()) {
                inst.runtime.reconcile(&self.sessions_dir, &live).await;
            }
        }
        // Only now: reconciliation knows a container as ours by its session's directory.
        for dir in incomplete {
            let _ = std::fs::remove_dir_all(dir.path());
        }
        Ok(())
    }

    /// Asks the runtime of a session whose agent was running what became of it. Returns the
    /// agent if it still runs; otherwise records in `meta` how it ended.
    async fn find_agent(&self, meta: &mut Meta, dir: &SessionDir) -> Option<Agent> {
        let pid = meta.pid.zip(meta.pid_start);
        meta.pid = None;
        meta.pid_start = None;
        let Some(instance) = self.launcher.instances.get(&meta.instance_id) else {
            // No runtime is left to ask: whatever the last server recorded of the agent is
            // killed, so nothing runs unmanaged.
            if let Some((pid, start)) = pid {
                crate::keeper::group::kill_orphan(pid, start);
            }
            meta.status = Status::Crashed;
            return None;
        };
        let found = Found {
            session_id: meta.id.clone(),
            session_dir: dir.clone(),
            pid,
        };
        let adoption = instance.runtime.adopt(&found).await;
        let exit = match adoption {
            Adoption::Running(agent) => return Some(agent),
            Adoption::Exited(exit) => exit,
            Adoption::Lost => crate::runtime::ExitInfo::UNKNOWN.because(ExitReason::KeeperLost),
        };
        meta.status = if exit.is_success() {
            Status::Exited
        } else {
            Status::Crashed
        };
        meta.exit_code = exit.code;
        meta.signal = exit.signal;
        meta.exit_reason = exit.reason;
        instance.runtime.cleanup(&meta.id, dir).await;
        None
    }
}
