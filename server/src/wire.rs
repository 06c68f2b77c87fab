//! The wire: every request and response body of the control plane, the frames of
//! `GET /events`, and the WebSocket frames the server writes itself, as typed serde structs
//! shared by the server (`api`, `ws`, `stream`), the `moorline` client ([`crate::client`],
//! [`crate::watch`]) and the load generator, so a body is written down once.
//!
//! Field order and omissions are part of amarre compatibility (see docs/PROTOCOL.md): keys are
//! emitted in declaration order and optional moorline additions are left out when empty. This
//! module is a leaf: it knows nothing of sessions, HTTP or configuration.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

pub use moorline_adapters::pipeline::{Decision, Resolution};

/// A session's status, as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The agent is running.
    Running,
    /// The agent exited with code 0.
    Exited,
    /// The agent exited with another code, was killed, or was lost.
    Crashed,
    /// The session is being deleted.
    Stopped,
}

impl Status {
    /// Every status, for reports that list each one.
    pub const ALL: [Status; 4] = [
        Status::Running,
        Status::Exited,
        Status::Crashed,
        Status::Stopped,
    ];

    /// The lowercase name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Exited => "exited",
            Status::Crashed => "crashed",
            Status::Stopped => "stopped",
        }
    }
}

/// What a running agent is doing, from what the server sees of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activity {
    /// An approval request waits for an answer.
    Waiting,
    /// A turn is in progress (pi RPC `agent_start` without its `agent_end` yet), or the agent
    /// wrote output within `limits.activity_window_ms`.
    Working,
    /// Neither.
    Idle,
}

impl Activity {
    /// The lowercase name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Activity::Waiting => "waiting",
            Activity::Working => "working",
            Activity::Idle => "idle",
        }
    }
}

/// The summary clients get from the REST API (`GET /sessions`, `GET /sessions/{id}`, the
/// answers to `POST /sessions` and `POST /sessions/{id}/restart`). Field order and omissions
/// follow amarre's SessionSummary exactly; moorline's additions come last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionSummary {
    /// 12 hex characters.
    pub id: String,
    /// Display name, if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Instance the session runs.
    pub instance_id: String,
    /// Current status.
    pub status: Status,
    /// The agent's name (`unknown` if its instance is no longer configured).
    pub agent: String,
    /// Last start, ms since the epoch.
    pub spawned_at: u64,
    /// Connected WebSocket clients.
    pub clients: usize,
    /// Exit code of the last run, if it exited normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal that ended the last run, if any (`SIGKILL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// Why the last run ended, beyond its code or signal: `out_of_memory`, `keeper_lost`
    /// (moorline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Cow<'static, str>>,
    /// Sequence number of the newest output line (moorline).
    #[serde(default)]
    pub last_seq: u64,
    /// Runtime the agent runs in (moorline).
    #[serde(default)]
    pub runtime: Cow<'static, str>,
    /// Why the last run failed to start, with the end of its stderr (moorline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Approval requests waiting for an answer, as clients saw them, each in its session's
    /// dialect (moorline).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_approvals: Vec<serde_json::Value>,
    /// Who created the session: a tailnet login, `token` or `local` (moorline; absent for
    /// sessions created before moorline recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// The agent's output is held because the journal cannot be written (a full disk); the
    /// agent is paused on its output until it can (moorline).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub output_held: bool,
    /// Output lines lost because the journal stayed unwritable after the agent exited
    /// (moorline).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lines_lost: u64,
    /// The current run reported that the instance's credentials are missing or wrong
    /// (moorline; only present when true).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auth_failed: bool,
    /// The agent's working directory (moorline).
    #[serde(default)]
    pub cwd: PathBuf,
    /// When the session was created, ms since the epoch (moorline).
    #[serde(default)]
    pub created_at: u64,
    /// What a running agent is doing, as far as the server can tell (moorline; absent when
    /// the agent does not run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<Activity>,
    /// Whether the last start continued the agent's earlier conversation (moorline).
    #[serde(default)]
    pub conversation: ConversationState,
    /// The project the session works in (moorline; absent outside projects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The branch of its worktree (moorline; with `project`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Whether its worktree has uncommitted changes (moorline; with `project`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty: Option<bool>,
    /// How many commits its branch has that the project's default branch lacks (moorline;
    /// with `project`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ahead: Option<u64>,
}

/// Whether a run continues the agent's earlier conversation, as the summary says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConversationState {
    /// It continues the conversation of the session's earlier run.
    Resumed,
    /// It began a new conversation (a new session, a client asked for one, the agent cannot
    /// continue one, or continuing failed and clients were told).
    #[default]
    New,
}

/// What a start should do with the agent's earlier conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConversationRequest {
    /// Continue it when there is one (restarts do unless asked otherwise).
    #[default]
    Resume,
    /// Begin a new one.
    New,
}

/// The body of `POST /sessions/{id}/restart`: nothing, or `{"conversation": "resume" | "new"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    /// What to do with the agent's conversation; absent or `null`: resume it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<ConversationRequest>,
}

impl Restart {
    /// Reads a restart body: blank means `{}`, as for `POST /sessions`; unknown keys are
    /// ignored.
    pub fn from_body(body: &[u8]) -> Result<Self, BodyError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| BodyError::Json(e.to_string()))?;
        let serde_json::Value::Object(mut obj) = value else {
            return Err(field_error("body", "must be a JSON object"));
        };
        Ok(Self {
            conversation: take(&mut obj, "conversation", "must be \"resume\" or \"new\"")?,
        })
    }
}

/// The answer to `DELETE /sessions/{id}` when the session is gone but its worktree was kept
/// (it holds uncommitted or unmerged work); a full removal answers `204` with no body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedKeptWorktree {
    /// Always `true`: the session itself is deleted.
    pub deleted: bool,
    /// What became of the worktree.
    pub worktree: WorktreeFate,
    /// Why it was kept.
    pub message: String,
}

/// What became of a deleted session's worktree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorktreeFate {
    /// It stays on disk with its branch.
    Kept,
}

/// A registered project, as `GET /projects` and `POST /projects` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Project {
    /// Its name: lowercase letters, digits, `.`, `_` and `-`.
    pub id: String,
    /// The repository's main working tree.
    pub path: PathBuf,
    /// The branch new session branches start from.
    pub default_branch: String,
    /// The instance sessions of the project run when the client names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_instance: Option<String>,
    /// Where the sessions' worktrees are created (`<path>.worktrees` unless given).
    pub worktrees_dir: PathBuf,
}

/// The body of `POST /projects`; unknown keys are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewProject {
    /// Its name (default: the repository directory's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// An existing repository (the top of its main working tree), or with `url` where to
    /// clone it (a directory that does not exist yet).
    pub path: PathBuf,
    /// Clone this repository into `path` first (`https://`, `http://`, `ssh://`, `git://`,
    /// or `file://` inside the workspace roots; credentials come from the server's
    /// `git_credentials_file`, never from the URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Default: the branch checked out in `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_branch: Option<String>,
    /// The instance sessions run by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_instance: Option<String>,
    /// Where worktrees go (inside the same workspace roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worktrees_dir: Option<PathBuf>,
}

/// `GET /sessions/{id}/files` for a directory: its entries, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// The path asked for, relative to the session's working directory.
    pub path: String,
    /// What it holds.
    pub entries: Vec<FileEntry>,
}

/// One entry of a directory [`Listing`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Its name.
    pub name: String,
    /// What it is.
    #[serde(rename = "type")]
    pub kind: FileKind,
    /// Its size in bytes (files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// What a [`FileEntry`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (never followed).
    Symlink,
    /// Anything else.
    Other,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The body of `POST /sessions`. Every field is optional; an empty body means all defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateSession {
    /// Instance to run; default: the instance named `default`, else the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Environment on top of the instance's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The project to work in, in a worktree of its own (moorline; not with `cwd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The worktree's branch (moorline; with `project`; default: `moorline/<session id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
}

/// Why a `POST /sessions` body was refused, before any session code sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not JSON at all.
    #[error("request body is not valid JSON: {0}")]
    Json(String),
    /// A field has the wrong type.
    #[error("{field}: {message}")]
    Field {
        /// Which field (`env.KEY` for an environment value).
        field: String,
        /// What is wrong.
        message: &'static str,
    },
}

impl CreateSession {
    /// Reads a `POST /sessions` body. Any content type is accepted (`curl -d '{}'` sends a form
    /// type); a blank body means `{}`, `null` means an absent field and unknown keys are
    /// ignored, as amarre does. A field of the wrong type is refused with its name.
    pub fn from_body(body: &[u8]) -> Result<Self, BodyError> {
        use serde_json::Value;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let value: Value =
            serde_json::from_slice(body).map_err(|e| BodyError::Json(e.to_string()))?;
        let Value::Object(mut obj) = value else {
            return Err(field_error("body", "must be a JSON object"));
        };
        let env: Option<serde_json::Map<String, Value>> =
            take(&mut obj, "env", "must be an object of strings")?;
        let string = "must be a string";
        let instance_id = take(&mut obj, "instanceId", string)?;
        let name = take(&mut obj, "name", string)?;
        let cwd = take(&mut obj, "cwd", string)?;
        let project = take(&mut obj, "project", string)?;
        let branch = take(&mut obj, "branch", string)?;
        let env = env
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(v) => Ok((k, v)),
                _ => Err(field_error(
                    &format!("env.{k}"),
                    "environment values must be strings",
                )),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            instance_id,
            name,
            cwd,
            env,
            project,
            branch,
        })
    }
}

/// Field `key` of `obj` as a `T`; absent and `null` are `None`.
fn take<T: serde::de::DeserializeOwned>(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    key: &'static str,
    message: &'static str,
) -> Result<Option<T>, BodyError> {
    match obj.remove(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|_| field_error(key, message)),
    }
}

fn field_error(field: &str, message: &'static str) -> BodyError {
    BodyError::Field {
        field: field.to_owned(),
        message,
    }
}

/// One entry of `GET /instances`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSummary {
    /// The instance's id, as `POST /sessions` names it.
    pub id: String,
    /// The agent it runs.
    pub agent: String,
    /// The runtime its agents run in.
    pub runtime: String,
    /// The dialect clients speak to it: `pi-rpc` or `native`.
    pub dialect: String,
    /// Directories a session's `cwd` may be under (empty: anywhere).
    pub workspace_roots: Vec<PathBuf>,
    /// Whether a session can start now.
    pub available: bool,
    /// Why not, when it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `GET /me`: who the server takes the caller for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Me {
    /// A tailnet login, or `token`, `local` or `anonymous`.
    pub user: String,
    /// The display name, with a tailnet login (`null` otherwise).
    pub name: Option<String>,
    /// The listener: `tcp` or `unix`.
    pub via: String,
    /// What the identity rests on: `tailnet`, `token`, `local` or `anonymous`.
    pub source: String,
}

/// The `amarre.approval_resolved` frame: how an approval request was settled, and by whom
/// (another client may have answered first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalResolved {
    /// The request's id, as `pendingApprovals` names it.
    pub id: String,
    /// Allowed or denied.
    pub decision: Decision,
    /// `client` (a person), `policy` or `timeout`.
    pub by: String,
    /// Who answered, when a client did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl ApprovalResolved {
    /// The frame's `type`.
    pub const TYPE: &'static str = "amarre.approval_resolved";

    /// Who settled it: the user when a client did, else `by`.
    pub fn settled_by(&self) -> &str {
        match (&*self.by, &self.user) {
            ("client", Some(user)) => user,
            (by, _) => by,
        }
    }
}

/// What happened to a session (an event of `GET /events`), tagged by its `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A session was created (its agent has been started).
    SessionCreated {
        /// The session as it is now.
        session: SessionSummary,
    },
    /// The session's status changed: its agent started (a restart) or ended.
    SessionStatus {
        /// The session as it is now.
        session: SessionSummary,
    },
    /// What the running agent is doing changed (`working`, `idle`, `waiting`).
    SessionActivity {
        /// The session as it is now.
        session: SessionSummary,
    },
    /// An approval request waits for an answer.
    ApprovalPending {
        /// The request, as the session's clients saw it.
        request: serde_json::Value,
        /// The session as it is now.
        session: SessionSummary,
        /// Client lines the session had received when the request appeared
        /// (`Session::input_seq`): later input means a person is at work. The server's own
        /// bookkeeping, never on the wire.
        #[serde(skip)]
        inputs: u64,
    },
    /// An approval request was settled: by whom and how.
    ApprovalResolved {
        /// The settlement (request id, decision, `by`, `user`, tool; never the tool's input).
        resolution: Resolution,
        /// The session as it is now.
        session: SessionSummary,
    },
    /// The agent finished a turn (pi RPC `agent_end`, or its translation).
    TurnEnded {
        /// The session as it is now.
        session: SessionSummary,
    },
    /// The session was deleted (by a client, or pruned).
    SessionDeleted {},
}

impl EventKind {
    /// The event's `type` on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::SessionCreated { .. } => "session_created",
            EventKind::SessionStatus { .. } => "session_status",
            EventKind::SessionActivity { .. } => "session_activity",
            EventKind::ApprovalPending { .. } => "approval_pending",
            EventKind::ApprovalResolved { .. } => "approval_resolved",
            EventKind::TurnEnded { .. } => "turn_ended",
            EventKind::SessionDeleted {} => "session_deleted",
        }
    }

    /// The session's summary, unless it was deleted.
    pub fn session(&self) -> Option<&SessionSummary> {
        match self {
            EventKind::SessionCreated { session }
            | EventKind::SessionStatus { session }
            | EventKind::SessionActivity { session }
            | EventKind::ApprovalPending { session, .. }
            | EventKind::ApprovalResolved { session, .. }
            | EventKind::TurnEnded { session } => Some(session),
            EventKind::SessionDeleted {} => None,
        }
    }
}

/// One event of `GET /events` (and of the server's event bus, which the notifier follows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Position in this run's stream, from 1.
    pub seq: u64,
    /// When it was published, ms since the epoch.
    pub at: u64,
    /// The session it is about.
    pub session_id: String,
    /// That session's instance (what access checks look at).
    pub instance_id: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The first frame of every `GET /events` stream, and the one after a gap: every session the
/// caller may see, as of event `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "snapshot")]
pub struct Snapshot {
    /// The last event the snapshot includes.
    pub seq: u64,
    /// The sessions.
    pub sessions: Vec<SessionSummary>,
}

/// A frame of `GET /events` as a client reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum EventsFrame {
    /// Every session, as of an event.
    Snapshot(Snapshot),
    /// Something happened to one session.
    Event(Box<Event>),
    /// An event this client does not know (from a newer server): its `type` and session.
    Other {
        /// The event's `type`.
        kind: String,
        /// The session it is about, if it names one.
        session_id: Option<String>,
    },
}

impl EventsFrame {
    /// Reads an SSE frame's data; `None` if it is not a JSON object with a `type`.
    pub fn parse(data: &str) -> Option<Self> {
        let value: serde_json::Value = serde_json::from_str(data).ok()?;
        let kind = value.get("type")?.as_str()?.to_owned();
        let session_id = value
            .get("sessionId")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        let frame = if kind == "snapshot" {
            serde_json::from_value(value).map(Self::Snapshot)
        } else {
            serde_json::from_value(value).map(|e| Self::Event(Box::new(e)))
        };
        Some(frame.unwrap_or(Self::Other { kind, session_id }))
    }
}

/// The `amarre.hello` frame: the first frame on a session's WebSocket when the client asks for
/// it (`?hello=1`), before any replay. Keys in amarre's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "amarre.hello", rename_all = "camelCase")]
pub struct Hello {
    /// The protocol version (semver).
    pub version: String,
    /// `moorline/<version>`.
    pub server: String,
    /// The session.
    pub session_id: String,
    /// Its instance.
    pub instance_id: String,
    /// The agent, by name.
    pub agent: HelloAgent,
    /// The session's status now.
    pub status: Status,
    /// The newest sequence number.
    pub seq: u64,
    /// The oldest sequence number still retained.
    pub first_seq: u64,
    /// Where the replay that follows starts.
    pub replay_from: u64,
    /// Lines asked for that are no longer retained.
    pub missed: u64,
    /// What this server does beyond protocol v2's core.
    pub capabilities: Vec<String>,
    /// Approval requests waiting for an answer, as the agent sent them.
    pub pending_approvals: Vec<serde_json::Value>,
    /// Who the server takes the client for.
    pub user: String,
}

/// The agent named in [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAgent {
    /// Its adapter's name (`pi`, `claude`, `codex`, `command`, …).
    pub name: String,
}

/// The `amarre.session_event` frame: the agent's run ended; the last frame before the server
/// closes the socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename = "amarre.session_event",
    rename_all = "camelCase"
)]
pub struct SessionEvent {
    /// `exited` (exit code 0) or `crashed`.
    pub event: String,
    /// The exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, when one did (`SIGKILL`, …).
    pub signal: Option<String>,
    /// What else is known about the end: `out_of_memory`, `keeper_lost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why the agent could not start, for a start failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /push/tokens`: an Expo push token to register, read as amarre reads it: the body is
/// JSON whatever its content type, and a field that is missing or not a string is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewPushToken {
    /// `ExponentPushToken[…]` or `ExpoPushToken[…]`.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub token: Option<String>,
    /// The device's name.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub device_name: Option<String>,
    /// `ios`, `android` or `web`.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub platform: Option<String>,
}

/// One registered Expo push token, as `GET /push/tokens` lists it (never whose it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushToken {
    /// The token.
    pub token: String,
    /// The device's name, at most 64 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
    /// `ios`, `android` or `web`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// When it was registered, ms since the epoch.
    pub registered_at: u64,
}

/// `GET /push/web/key`: the VAPID public key browsers subscribe with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebPushKey {
    /// Base64url, uncompressed P-256 point: what `pushManager.subscribe` takes.
    pub public_key: String,
}

/// `POST /push/web/subscriptions`: a browser's `PushSubscription` in its JSON form (other keys,
/// such as `expirationTime`, are ignored); `DELETE` needs only the `endpoint`. Read leniently,
/// like the Expo body: a field of the wrong shape is absent, and the answer says which.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebSubscription {
    /// The push service's URL for this browser.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint: Option<String>,
    /// The browser's keys.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub keys: Option<WebPushKeys>,
}

/// The keys of a [`WebSubscription`], base64url as browsers give them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebPushKeys {
    /// The browser's P-256 public key (65 bytes, uncompressed).
    pub p256dh: String,
    /// The shared authentication secret (16 bytes).
    pub auth: String,
}

/// The answer to a Web Push subscription: its endpoint, and whose it now is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebSubscribed {
    /// The subscription's endpoint.
    pub endpoint: String,
    /// Who it belongs to: a tailnet login, `token` or `local`.
    pub user: String,
}

/// A field read as amarre reads the push bodies: of the expected shape, or absent.
fn lenient<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<T>, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(value).ok())
}

/// Every error body of the REST API and the WebSocket upgrade: `{"error": "<code>", ...}`,
/// the code first, then what a client needs to act on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum ErrorBody {
    /// No session with that id.
    NotFound,
    /// Not an Expo push token (amarre's `POST /push/tokens`).
    InvalidToken,
    /// A Web Push subscription that cannot be used.
    InvalidSubscription {
        /// What is wrong with it.
        message: String,
    },
    /// No instance with that id.
    UnknownInstance {
        /// What was asked for.
        #[serde(rename = "instanceId")]
        instance_id: String,
        /// The instances the client may use.
        instances: Vec<String>,
        /// A sentence for people.
        message: String,
    },
    /// The instance's credentials file cannot be read.
    CredentialsUnavailable {
        /// The instance.
        #[serde(rename = "instanceId")]
        instance_id: String,
        /// The file.
        path: PathBuf,
        /// A sentence for people.
        message: String,
    },
    /// `limits.max_sessions` agents already run.
    MaxSessionsReached {
        /// The limit.
        limit: usize,
    },
    /// `limits.max_clients_per_session` clients are already connected.
    MaxClientsReached {
        /// The limit.
        limit: usize,
    },
    /// `limits.max_event_streams` streams of `GET /events` are already open.
    MaxEventStreamsReached {
        /// The limit.
        limit: usize,
    },
    /// A restart of a running session.
    AlreadyRunning,
    /// A WebSocket to a session whose agent does not run, without `?since=`.
    NotRunning {
        /// The session's status.
        status: Status,
        /// A sentence for people.
        message: String,
    },
    /// The session's instance is no longer configured.
    InstanceGone {
        /// The instance.
        #[serde(rename = "instanceId")]
        instance_id: String,
    },
    /// An environment variable a client may not set.
    EnvNotAllowed {
        /// The variable.
        key: String,
        /// Why not.
        message: String,
    },
    /// A working directory that is refused.
    InvalidCwd {
        /// The directory asked for.
        cwd: PathBuf,
        /// Why not.
        message: String,
    },
    /// The agent could not be started.
    SpawnFailed {
        /// Why.
        message: String,
    },
    /// Anything else that is the server's fault.
    Internal {
        /// What.
        message: String,
    },
    /// The body is not JSON.
    InvalidJson {
        /// The parser's complaint.
        message: String,
    },
    /// A field of the body or the query has the wrong type or value.
    InvalidRequest {
        /// Which field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The `Host` header names a host this server does not answer to.
    ForbiddenHost {
        /// The host.
        host: String,
    },
    /// The `Origin` header names an origin that is not allowed.
    ForbiddenOrigin {
        /// The origin.
        origin: String,
    },
    /// `allowed_users` does not list the caller.
    ForbiddenUser {
        /// The identity refused.
        user: String,
        /// A sentence for people.
        message: String,
        /// The instance whose `allowed_users` refused it; absent: the server's.
        #[serde(
            rename = "instanceId",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        instance_id: Option<String>,
    },
    /// A token is required and was missing or wrong.
    Unauthorized,
    /// Push notifications are not offered.
    PushDisabled,
    /// No project with that id.
    UnknownProject {
        /// What was asked for.
        project: String,
        /// A sentence for people.
        message: String,
    },
    /// A project with that id exists.
    ProjectExists {
        /// The id.
        project: String,
        /// A sentence for people.
        message: String,
    },
    /// The branch asked for is checked out in another worktree.
    BranchInUse {
        /// The branch.
        branch: String,
        /// A sentence for people.
        message: String,
    },
    /// git failed (a worktree, a clone, a diff).
    GitFailed {
        /// What git said.
        message: String,
    },
    /// A diff of a session that does not work in a project's worktree.
    NotInProject {
        /// A sentence for people.
        message: String,
    },
    /// Files of a session whose working directory is neither a project's worktree nor inside
    /// a workspace root.
    NoWorkspace {
        /// A sentence for people.
        message: String,
    },
    /// A file or diff over `limits.max_file_bytes`.
    TooLarge {
        /// Its size in bytes.
        size: u64,
        /// The limit.
        limit: u64,
        /// A sentence for people.
        message: String,
    },
    /// A path that would leave the session's workspace (absolute, `..`, a symlink).
    PathOutsideWorkspace {
        /// The path asked for.
        path: String,
        /// A sentence for people.
        message: String,
    },
    /// Nothing at that path of the session's workspace.
    NoSuchFile {
        /// The path asked for.
        path: String,
        /// A sentence for people.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_own_frames_keep_amarres_key_order() {
        let hello = Hello {
            version: "2.3.0".into(),
            server: "moorline/0".into(),
            session_id: "s".into(),
            instance_id: "i".into(),
            agent: HelloAgent { name: "pi".into() },
            status: Status::Running,
            seq: 3,
            first_seq: 1,
            replay_from: 2,
            missed: 0,
            capabilities: vec!["hello".into()],
            pending_approvals: Vec::new(),
            user: "local".into(),
        };
        let text = serde_json::to_string(&hello).expect("json");
        assert_eq!(
            text,
            r#"{"type":"amarre.hello","version":"2.3.0","server":"moorline/0","sessionId":"s","instanceId":"i","agent":{"name":"pi"},"status":"running","seq":3,"firstSeq":1,"replayFrom":2,"missed":0,"capabilities":["hello"],"pendingApprovals":[],"user":"local"}"#
        );
        assert_eq!(serde_json::from_str::<Hello>(&text).expect("back"), hello);
        let ended = SessionEvent {
            event: "crashed".into(),
            exit_code: None,
            signal: Some("SIGKILL".into()),
            reason: Some("out_of_memory".into()),
            error: None,
        };
        assert_eq!(
            serde_json::to_string(&ended).expect("json"),
            r#"{"type":"amarre.session_event","event":"crashed","exitCode":null,"signal":"SIGKILL","reason":"out_of_memory"}"#
        );
    }

    #[test]
    fn create_bodies() {
        assert_eq!(CreateSession::from_body(b""), Ok(CreateSession::default()));
        assert_eq!(
            CreateSession::from_body(b"  \n"),
            Ok(CreateSession::default())
        );
        let r = CreateSession::from_body(
            br#"{"instanceId":"a","name":null,"cwd":"/tmp","env":{"K":"0123"},"extra":1}"#,
        )
        .expect("full");
        assert_eq!(r.instance_id.as_deref(), Some("a"));
        assert_eq!(r.name, None);
        assert_eq!(r.env["K"], "0123");
        assert!(matches!(
            CreateSession::from_body(b"{"),
            Err(BodyError::Json(_))
        ));
        let field = |body: &[u8]| match CreateSession::from_body(body) {
            Err(BodyError::Field { field, message }) => (field, message),
            other => panic!("{other:?}"),
        };
        assert_eq!(field(b"[]"), ("body".into(), "must be a JSON object"));
        assert_eq!(field(br#"{"name":5}"#), ("name".into(), "must be a string"));
        assert_eq!(
            field(br#"{"env":"A=1"}"#),
            ("env".into(), "must be an object of strings")
        );
        assert_eq!(
            field(br#"{"env":{"A":1}}"#),
            ("env.A".into(), "environment values must be strings")
        );
    }

    #[test]
    fn a_create_body_round_trips_and_leaves_out_what_is_unset() {
        let body = CreateSession {
            name: Some("n".into()),
            ..CreateSession::default()
        };
        let json = serde_json::to_string(&body).expect("json");
        assert_eq!(json, r#"{"name":"n"}"#);
        assert_eq!(CreateSession::from_body(json.as_bytes()), Ok(body));
    }

    #[test]
    fn error_bodies_put_the_code_first() {
        let text = |b: &ErrorBody| serde_json::to_string(b).expect("json");
        assert_eq!(text(&ErrorBody::NotFound), r#"{"error":"not_found"}"#);
        assert_eq!(
            text(&ErrorBody::MaxClientsReached { limit: 2 }),
            r#"{"error":"max_clients_reached","limit":2}"#
        );
        assert_eq!(
            text(&ErrorBody::UnknownInstance {
                instance_id: "ghost".into(),
                instances: vec!["a".into()],
                message: "m".into()
            }),
            r#"{"error":"unknown_instance","instanceId":"ghost","instances":["a"],"message":"m"}"#
        );
        let back: ErrorBody =
            serde_json::from_str(r#"{"error":"forbidden_user","user":"u","message":"m"}"#)
                .expect("parse");
        assert_eq!(
            back,
            ErrorBody::ForbiddenUser {
                user: "u".into(),
                message: "m".into(),
                instance_id: None
            }
        );
    }

    #[test]
    fn restart_bodies() {
        assert_eq!(Restart::from_body(b" "), Ok(Restart::default()));
        assert_eq!(
            Restart::from_body(br#"{"conversation":"new","x":1}"#),
            Ok(Restart {
                conversation: Some(ConversationRequest::New)
            })
        );
        assert_eq!(
            Restart::from_body(br#"{"conversation":null}"#),
            Ok(Restart::default())
        );
        assert_eq!(
            Restart::from_body(br#"{"conversation":"old"}"#),
            Err(field_error("conversation", "must be \"resume\" or \"new\""))
        );
        assert!(matches!(Restart::from_body(b"{"), Err(BodyError::Json(_))));
    }

    #[test]
    fn project_fields_of_a_summary_are_left_out_outside_projects() {
        let summary: SessionSummary = serde_json::from_str(
            r#"{"id":"a","instanceId":"i","status":"running","agent":"pi","spawnedAt":1,"clients":0}"#,
        )
        .expect("parse");
        assert_eq!(summary.conversation, ConversationState::New);
        let json = serde_json::to_string(&summary).expect("json");
        assert!(json.ends_with(r#""conversation":"new"}"#), "{json}");
        let kept = DeletedKeptWorktree {
            deleted: true,
            worktree: WorktreeFate::Kept,
            message: "m".into(),
        };
        assert_eq!(
            serde_json::to_string(&kept).expect("json"),
            r#"{"deleted":true,"worktree":"kept","message":"m"}"#
        );
    }

    #[test]
    fn approval_answers_carry_a_decision() {
        let r: ApprovalResolved = serde_json::from_str(
            r#"{"type":"amarre.approval_resolved","id":"r1","decision":"allow","by":"client","user":"alice"}"#,
        )
        .expect("parse");
        assert_eq!((r.decision, r.settled_by()), (Decision::Allow, "alice"));
    }

    #[test]
    fn push_bodies_take_a_field_of_the_wrong_shape_as_absent_and_keep_the_rest() {
        let new: NewPushToken = serde_json::from_str(
            r#"{"token":"ExpoPushToken[x]","deviceName":5,"platform":"ios","extra":[1]}"#,
        )
        .expect("an object always reads");
        assert_eq!(
            new,
            NewPushToken {
                token: Some("ExpoPushToken[x]".into()),
                device_name: None,
                platform: Some("ios".into()),
            }
        );
        let sub: WebSubscription = serde_json::from_str(
            r#"{"endpoint":"https://push.example/1","expirationTime":null,"keys":{"p256dh":"k"}}"#,
        )
        .expect("an object always reads");
        assert_eq!(sub.endpoint.as_deref(), Some("https://push.example/1"));
        assert_eq!(sub.keys, None, "keys without auth are no keys");
        // What the server answers reads back as the same value (one body, both sides).
        let token = PushToken {
            token: "ExpoPushToken[x]".into(),
            device_name: None,
            platform: Some("web".into()),
            registered_at: 7,
        };
        let text = serde_json::to_string(&token).expect("json");
        assert_eq!(
            text,
            r#"{"token":"ExpoPushToken[x]","platform":"web","registeredAt":7}"#
        );
        assert_eq!(
            serde_json::from_str::<PushToken>(&text).expect("back"),
            token
        );
    }
}
