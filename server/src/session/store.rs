//! What a session keeps on disk besides its journal: `meta.json`, written atomically.
//!
//! The metadata lets a restarted server list every session with the same id, name and status,
//! and restart it with the same working directory and environment.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Status;
use crate::keeper::layout::SessionDir;

/// A session's persistent record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Meta {
    /// Session id.
    pub id: String,
    /// Optional display name.
    pub name: Option<String>,
    /// Instance it runs.
    pub instance_id: String,
    /// Working directory.
    pub cwd: PathBuf,
    /// Environment asked for at creation (merged over the instance's at each start).
    pub env: BTreeMap<String, String>,
    /// Creation time, ms since the epoch (orders the session list).
    pub created_at: u64,
    /// Who created it (absent in files written before moorline recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// Last start time, ms since the epoch.
    pub spawned_at: u64,
    /// Status when last written.
    pub status: Status,
    /// Exit code of the last run.
    pub exit_code: Option<i32>,
    /// Signal that ended the last run.
    pub signal: Option<i32>,
    /// Process id of the running agent (process runtime), to clean up after a server crash.
    pub pid: Option<u32>,
    /// Start time of that process (from /proc), so a recycled pid is never signalled.
    pub pid_start: Option<u64>,
    /// When the last run ended, ms since the epoch: ended sessions are removed oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
    /// Why the last run ended, beyond its code or signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_reason: Option<crate::runtime::ExitReason>,
    /// The session's own worktree, when it works in a project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worktree: Option<crate::projects::Worktree>,
}

/// Writes `meta` atomically (temporary file, then rename), readable only by the owner because
/// it holds the session's environment.
pub(crate) fn save(dir: &SessionDir, meta: &Meta) -> io::Result<()> {
    let body = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
    crate::keeper::fsio::write_private(&dir.meta(), &body)
}

/// Reads a session's metadata.
pub(crate) fn load(dir: &SessionDir) -> io::Result<Meta> {
    let body = fs::read(dir.meta())?;
    serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_is_private() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = SessionDir::new(tmp.path());
        let meta = Meta {
            worktree: None,
            id: "0123456789ab".into(),
            name: Some("demo".into()),
            instance_id: "echo".into(),
            cwd: "/tmp".into(),
            env: BTreeMap::from([("K".into(), "0123".into())]),
            created_at: 1,
            created_by: Some("alice@example.com".into()),
            spawned_at: 2,
            status: Status::Crashed,
            exit_code: Some(7),
            signal: None,
            pid: None,
            pid_start: None,
            ended_at: None,
            exit_reason: None,
        };
        save(&dir, &meta).expect("save");
        assert_eq!(load(&dir).expect("load"), meta);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.meta()).expect("stat").permissions().mode();
        assert_eq!(mode & 0o077, 0);
    }

    #[test]
    fn meta_files_without_created_by_still_load() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = SessionDir::new(tmp.path());
        std::fs::write(
            dir.meta(),
            r#"{"id":"0123456789ab","name":null,"instanceId":"echo","cwd":"/tmp","env":{},
               "createdAt":1,"spawnedAt":2,"status":"exited","exitCode":0,"signal":null,
               "pid":null,"pidStart":null}"#,
        )
        .expect("write");
        assert_eq!(load(&dir).expect("load").created_by, None);
    }
}
