//! What a session keeps on disk besides its journal: `meta.json`, written atomically.
//!
//! The metadata lets a restarted server list every session with the same id, name and status,
//! and restart it with the same working directory and environment.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Status;

/// File name of the metadata inside a session directory.
pub const META_FILE: &str = "meta.json";
/// Directory of the output journal inside a session directory.
pub const JOURNAL_DIR: &str = "journal";
/// The agent's stderr, kept for diagnosis.
pub const STDERR_FILE: &str = "stderr.log";
/// Approval requests waiting for an answer, kept up to date by whoever runs the agent's stdio.
pub const PENDING_FILE: &str = "pending.json";

/// Present while the current run has reported an authentication failure (written by whoever
/// runs the agent's pipeline: the server or a keeper).
pub const AUTH_FAILED_FILE: &str = "auth-failed";

/// A session's persistent record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
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
}

/// Writes `meta` atomically (temporary file, then rename), readable only by the owner because
/// it holds the session's environment.
pub fn save(dir: &Path, meta: &Meta) -> io::Result<()> {
    let body = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
    crate::fsio::write_private(&dir.join(META_FILE), &body)
}

/// How much of an agent's stderr is quoted when it fails to start.
pub const STDERR_TAIL_BYTES: u64 = 2048;

/// The last `max_bytes` of a session's agent stderr, lossily decoded and trimmed: what a user
/// needs to see why an agent did not start.
pub fn stderr_tail(session_dir: &Path, max_bytes: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = fs::File::open(session_dir.join(STDERR_FILE)) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)));
    let mut tail = Vec::new();
    let _ = file.read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).trim().to_owned()
}

/// Reads a session's metadata.
pub fn load(dir: &Path) -> io::Result<Meta> {
    let body = fs::read(dir.join(META_FILE))?;
    serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Start time of process `pid` in clock ticks since boot, from `/proc/<pid>/stat`.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past its last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_is_private() {
        let tmp = tempfile::tempdir().expect("tmp");
        let meta = Meta {
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
        save(tmp.path(), &meta).expect("save");
        assert_eq!(load(tmp.path()).expect("load"), meta);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(tmp.path().join(META_FILE))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
    }

    #[test]
    fn meta_files_without_created_by_still_load() {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::write(
            tmp.path().join(META_FILE),
            r#"{"id":"0123456789ab","name":null,"instanceId":"echo","cwd":"/tmp","env":{},
               "createdAt":1,"spawnedAt":2,"status":"exited","exitCode":0,"signal":null,
               "pid":null,"pidStart":null}"#,
        )
        .expect("write");
        assert_eq!(load(tmp.path()).expect("load").created_by, None);
    }

    #[test]
    fn start_time_of_this_process_is_readable() {
        assert!(process_start_time(std::process::id()).is_some());
    }
}
