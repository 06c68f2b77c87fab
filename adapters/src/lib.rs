//! Adapters: how moorline launches and talks to each kind of coding agent.
//!
//! An adapter turns an instance's configuration and a session's request (working directory,
//! environment) into a [`LaunchSpec`]: the program, its arguments, its environment and the
//! files it needs. Where an agent's wire format differs from what clients speak, the adapter
//! also provides a [`pipeline::Translator`]; the [`pipeline`] adds approval rules on
//! top, and the [`gate`] keeps clients from switching approvals off. Adapters know nothing about HTTP, WebSockets or how the process is isolated.
//!
//! Built-in adapters:
//! - [`echo`]: moorline's own echo agent, so a fresh install works with nothing else installed;
//! - [`command`]: any program that speaks JSON Lines on stdin/stdout;
//! - [`pi`]: pi's RPC mode, with a permission gate moorline ships;
//! - [`claude`]: Claude Code's stream-json mode, with permission prompts over the control
//!   protocol, spoken natively or translated to pi's RPC dialect;
//! - [`codex`]: Codex's app-server JSON-RPC, with command approvals, spoken natively or
//!   translated to pi's RPC dialect.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub mod auth;
pub mod claude;
pub mod codex;
pub mod command;
pub mod conversation;
pub mod echo;
pub mod gate;
pub mod pi;
pub mod pipeline;
pub mod pirpc;

use conversation::{ConversationPlace, Noticed};
use pipeline::{Dialect, Passthrough, Translator};

/// What an adapter needs to know to launch one session's agent.
#[derive(Debug, Clone)]
pub struct LaunchContext<'a> {
    /// The instance the session belongs to.
    pub instance_id: &'a str,
    /// The session's id (12 hex characters).
    pub session_id: &'a str,
    /// The agent's working directory, already validated by the server.
    pub cwd: &'a Path,
    /// Environment asked for by the instance configuration and the session request, merged.
    pub env: &'a BTreeMap<String, String>,
    /// Path of the running moorline executable, for built-in agents.
    pub moorline_exe: &'a Path,
    /// A private directory of the session, visible to the agent at this same path, where
    /// [`LaunchSpec::files`] are written (again at every start).
    pub data_dir: &'a Path,
}

/// A directory inside [`LaunchContext::data_dir`] that the agent itself may write (its own
/// state, such as pi's session files), owned by the agent's user. Everything else in the data
/// directory is written by moorline and only readable by the agent, so an agent cannot change
/// what its next start is given.
pub const AGENT_STATE_DIR: &str = "state";

/// The process an adapter wants started.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LaunchSpec {
    /// Program to run: an absolute path, or a name looked up in `PATH`.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Environment variables to set on top of what the runtime provides.
    pub env: BTreeMap<String, String>,
    /// Files to write before starting, relative to [`LaunchContext::data_dir`].
    pub files: Vec<(PathBuf, Vec<u8>)>,
    /// The conversation this run continues or begins, when known before it starts (the
    /// server records it).
    pub conversation: Option<String>,
}

/// Errors an adapter reports.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The instance names an agent kind moorline does not know.
    #[error(
        "unknown agent kind '{kind}' (known: {known}); to run any JSONL program use agent = \"command\" with command = [...]"
    )]
    UnknownKind {
        /// The kind that was asked for.
        kind: String,
        /// The kinds that exist.
        known: String,
    },
    /// The configuration is incomplete or contradictory.
    #[error("{0}")]
    Config(String),
}

/// One kind of agent.
pub trait Adapter: Send + Sync + fmt::Debug {
    /// The agent's name as reported to clients (`agent` in session summaries).
    fn name(&self) -> &str;

    /// The process to start for a session.
    fn launch(&self, ctx: &LaunchContext<'_>) -> Result<LaunchSpec, AdapterError>;

    /// The dialect clients speak to this agent (decides how approvals look).
    fn dialect(&self) -> Dialect {
        Dialect::PiRpc
    }

    /// A fresh translator for one run of the agent.
    fn translator(&self) -> Box<dyn Translator> {
        Box::new(Passthrough)
    }

    /// Environment variables a client may never set for this agent, whatever the instance
    /// allows, because they would switch off its permission gate or redirect it. Entries
    /// ending in `*` are prefixes.
    fn protected_env(&self) -> &'static [&'static str] {
        &[]
    }

    /// The conversation a start of this session would continue, found where the agent keeps
    /// it: `Ok(None)` when there is none to continue (or the agent cannot continue one),
    /// `Err(why)` when the session had one that cannot be continued any more.
    fn find_conversation(&self, _place: &ConversationPlace<'_>) -> Result<Option<String>, String> {
        Ok(None)
    }
}

/// An adapter whose translator first tells clients that the session's conversation was lost.
#[derive(Debug)]
struct LostConversation {
    inner: Arc<dyn Adapter>,
    notice: serde_json::Value,
}

impl Adapter for LostConversation {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn launch(&self, ctx: &LaunchContext<'_>) -> Result<LaunchSpec, AdapterError> {
        self.inner.launch(ctx)
    }

    fn dialect(&self) -> Dialect {
        self.inner.dialect()
    }

    fn translator(&self) -> Box<dyn Translator> {
        Box::new(Noticed {
            inner: self.inner.translator(),
            notice: Some(self.notice.clone()),
        })
    }

    fn protected_env(&self) -> &'static [&'static str] {
        self.inner.protected_env()
    }

    fn find_conversation(&self, place: &ConversationPlace<'_>) -> Result<Option<String>, String> {
        self.inner.find_conversation(place)
    }
}

/// The adapter-related part of an instance's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// The agent kind (`echo`, `command`, `pi`, `claude-code`, `codex`), or for amarre-style
    /// entries with `agent_path` any name.
    pub agent: String,
    /// Program and arguments, for the `command` kind.
    pub command: Option<Vec<String>>,
    /// An executable to run instead of the kind's default program (amarre's `agentPath`).
    pub agent_path: Option<PathBuf>,
    /// Extra arguments appended to the program's.
    pub args: Vec<String>,
    /// Model to ask for.
    pub model: Option<String>,
    /// Base URL of the model API (a proxy, a local gateway, or a test mock).
    pub base_url: Option<String>,
    /// The client dialect, for agents that offer several (`native`, `pi-rpc`).
    pub dialect: Option<String>,
    /// The model provider, for agents that support several (pi).
    pub provider: Option<String>,
    /// What this start does with the conversation (set by the server per start).
    #[serde(default)]
    pub continuation: conversation::Continuation,
}

/// What an instance says about how to launch an agent program.
#[derive(Debug, Clone)]
pub struct LaunchSettings {
    /// The program to run.
    pub program: PathBuf,
    /// Extra arguments, after the adapter's own.
    pub args: Vec<String>,
    /// Model to ask for.
    pub model: Option<String>,
    /// Base URL of the model API.
    pub base_url: Option<String>,
}

impl LaunchSettings {
    /// Reads `config`; the program is `default_program` (looked up on `PATH`) unless the
    /// instance names another.
    pub fn new(config: &AdapterConfig, default_program: &str) -> Self {
        Self {
            program: config
                .agent_path
                .clone()
                .unwrap_or_else(|| PathBuf::from(default_program)),
            args: config.args.clone(),
            model: config.model.clone(),
            base_url: config.base_url.clone(),
        }
    }
}

/// Agent kinds built into moorline.
pub const KINDS: &[&str] = &["echo", "command", "pi", "claude-code", "codex"];

/// Builds the adapter an instance asks for, for the start its `continuation` describes.
pub fn build(config: &AdapterConfig) -> Result<Arc<dyn Adapter>, AdapterError> {
    let adapter = build_kind(config)?;
    Ok(match &config.continuation.lost {
        Some(reason) => Arc::new(LostConversation {
            inner: adapter,
            notice: conversation::resume_failed_frame(
                config.continuation.resume.as_deref(),
                reason,
            ),
        }),
        None => adapter,
    })
}

fn build_kind(config: &AdapterConfig) -> Result<Arc<dyn Adapter>, AdapterError> {
    let known = matches!(config.agent.as_str(), "pi" | "claude-code" | "codex");
    if let (Some(path), false) = (&config.agent_path, known) {
        // amarre's agentPath names the adapter module to load; for moorline it names an
        // executable that speaks JSONL, run as-is under the instance's agent name.
        let mut argv = vec![path.to_string_lossy().into_owned()];
        argv.extend(config.args.iter().cloned());
        return Ok(Arc::new(command::CommandAdapter::new(&config.agent, argv)?));
    }
    match config.agent.as_str() {
        "echo" => Ok(Arc::new(echo::EchoAdapter)),
        "command" => {
            let Some(command) = &config.command else {
                return Err(AdapterError::Config(
                    "agent \"command\" needs command = [\"program\", \"arg\", ...]".into(),
                ));
            };
            let mut argv = command.clone();
            argv.extend(config.args.iter().cloned());
            Ok(Arc::new(command::CommandAdapter::new("command", argv)?))
        }
        "pi" => Ok(Arc::new(pi::PiAdapter::new(config))),
        "claude-code" => Ok(Arc::new(claude::ClaudeAdapter::new(config)?)),
        "codex" => Ok(Arc::new(codex::CodexAdapter::new(config)?)),
        other => Err(AdapterError::UnknownKind {
            kind: other.to_owned(),
            known: KINDS.join(", "),
        }),
    }
}

/// Whether `key` matches one of `patterns` (exact, or a prefix when the pattern ends in `*`).
pub fn env_matches(key: &str, patterns: &[impl AsRef<str>]) -> bool {
    patterns.iter().any(|p| {
        let p = p.as_ref();
        match p.strip_suffix('*') {
            Some(prefix) => key.starts_with(prefix),
            None => key == p,
        }
    })
}

/// A launch context for the adapters' tests: fixed ids and paths, the session's data in
/// `data_dir`.
#[cfg(test)]
pub(crate) fn test_context<'a>(
    env: &'a BTreeMap<String, String>,
    data_dir: &'a Path,
) -> LaunchContext<'a> {
    LaunchContext {
        instance_id: "i",
        session_id: "0123456789ab",
        cwd: Path::new("/tmp"),
        env,
        moorline_exe: Path::new("/usr/bin/moorline"),
        data_dir,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(env: &BTreeMap<String, String>) -> LaunchContext<'_> {
        test_context(env, Path::new("/state/sessions/0123456789ab/data"))
    }

    #[test]
    fn command_kind_runs_its_argv_with_the_merged_env() {
        let env = BTreeMap::from([("A".to_owned(), "1".to_owned())]);
        let adapter = build(&AdapterConfig {
            agent: "command".into(),
            command: Some(vec!["/bin/cat".into(), "-u".into()]),
            ..Default::default()
        })
        .expect("build");
        assert_eq!(adapter.name(), "command");
        let spec = adapter.launch(&ctx(&env)).expect("launch");
        assert_eq!(spec.program, PathBuf::from("/bin/cat"));
        assert_eq!(spec.args, vec!["-u"]);
        assert_eq!(spec.env, env);
    }

    #[test]
    fn agent_path_runs_that_executable_under_the_configured_name() {
        let env = BTreeMap::new();
        let adapter = build(&AdapterConfig {
            agent: "echo".into(),
            agent_path: Some("/opt/agent.sh".into()),
            ..Default::default()
        })
        .expect("build");
        assert_eq!(adapter.name(), "echo");
        assert_eq!(
            adapter.launch(&ctx(&env)).expect("launch").program,
            PathBuf::from("/opt/agent.sh")
        );
    }

    #[test]
    fn echo_kind_runs_moorline_itself() {
        let env = BTreeMap::new();
        let adapter = build(&AdapterConfig {
            agent: "echo".into(),
            ..Default::default()
        })
        .expect("build");
        let spec = adapter.launch(&ctx(&env)).expect("launch");
        assert_eq!(spec.program, PathBuf::from("/usr/bin/moorline"));
        assert_eq!(spec.args, vec![echo::SUBCOMMAND]);
    }

    #[test]
    fn unknown_kinds_and_empty_commands_are_refused_with_a_hint() {
        let err = build(&AdapterConfig {
            agent: "nope".into(),
            ..Default::default()
        })
        .expect_err("unknown");
        assert!(err.to_string().contains("known: echo, command"));
        let err = build(&AdapterConfig {
            agent: "command".into(),
            command: Some(vec![]),
            ..Default::default()
        })
        .expect_err("empty");
        assert!(err.to_string().contains("empty"));
    }

    #[test]
    fn env_patterns() {
        assert!(env_matches("CLAUDE_CODE_X", &["CLAUDE_CODE_*"]));
        assert!(env_matches("HOME", &["HOME"]));
        assert!(!env_matches("HOMEX", &["HOME"]));
    }
}
