//! One named agent configuration (`[[instances]]`): what it runs, where, with what it may be
//! given, and whether it can start sessions on this machine.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use moorline_adapters::pipeline::{ApprovalPolicy, Decision};
use serde::{Deserialize, Serialize};

use super::{RuntimeConfig, string_list, string_list_paths};

/// Where a session's agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// Pick the best runtime available on this machine.
    #[default]
    Auto,
    /// A direct child process of the server, in its own process group.
    Process,
    /// A keeper process in a tmux session: survives server restarts; no isolation.
    Tmux,
    /// A runc container started by a keeper in a tmux session: isolated and durable.
    Runc,
}

impl RuntimeKind {
    /// The name used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Auto => "auto",
            RuntimeKind::Process => "process",
            RuntimeKind::Tmux => "tmux",
            RuntimeKind::Runc => "runc",
        }
    }
}

/// Network of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Its own network namespace with outbound access through slirp4netns (a user-mode network
    /// stack): agents reach their model APIs and the internet, but not the host's loopback
    /// (so not moorline's own port), except the ports an instance lists in `host_ports`.
    #[default]
    Isolated,
    /// The host's network, loopback included: agents reach every local service, moorline's
    /// control plane among them.
    Host,
    /// A network namespace with only loopback: no network at all.
    None,
}

impl NetworkMode {
    /// The name used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Isolated => "isolated",
            NetworkMode::Host => "host",
            NetworkMode::None => "none",
        }
    }
}

/// The runtime settings of one instance, handed to runtimes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceRuntime {
    /// Container network.
    pub network: NetworkMode,
    /// Host loopback ports reachable from an isolated container (at the same port on its own
    /// loopback).
    pub host_ports: Vec<u16>,
    /// Maximum number of processes in the container.
    pub pids_limit: Option<i64>,
    /// Maximum memory of the container, in bytes.
    pub memory_limit: Option<i64>,
}

/// One named agent configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct InstanceConfig {
    /// Name clients use in `POST /sessions {"instanceId": ...}`.
    pub id: String,
    /// Agent kind: `echo`, `command`, `pi`, `claude-code`, `codex`, or (with `agent_path`) any
    /// name.
    pub agent: String,
    /// Program and arguments, for `agent = "command"`.
    pub command: Option<Vec<String>>,
    /// The agent's executable (amarre's `agentPath`); for built-in kinds, instead of looking
    /// up `pi`, `claude` or `codex` in `PATH`.
    #[serde(alias = "agentPath")]
    pub agent_path: Option<PathBuf>,
    /// Extra arguments for the agent.
    pub args: Vec<String>,
    /// Environment for every session of this instance.
    pub env: BTreeMap<String, String>,
    /// A file of `KEY=VALUE` lines (API keys and other secrets) added to the agent's
    /// environment at each start; read by the server, never shown or logged.
    pub credentials_file: Option<PathBuf>,
    /// Environment variables clients may set in `POST /sessions` (`NAME`, or `PREFIX_*`).
    /// Anything else is refused. Variables that would switch off the agent's permission gate
    /// are refused whatever this says.
    #[serde(deserialize_with = "string_list")]
    pub allowed_env: Vec<String>,
    /// Where the agent runs.
    pub runtime: RuntimeKind,
    /// Working directory when a session does not ask for one (default: the server's).
    pub cwd: Option<PathBuf>,
    /// Directories a session's `cwd` may be in. Empty: clients may not choose a `cwd`.
    #[serde(deserialize_with = "string_list_paths")]
    pub workspace_roots: Vec<PathBuf>,
    /// Create a requested `cwd` (inside the workspace roots) if it does not exist.
    pub create_cwd: bool,
    /// Container network (`runc` runtime): `isolated` (default), `host` or `none`.
    pub network: NetworkMode,
    /// Host loopback ports forwarded into an `isolated` container (a local model gateway such
    /// as ollama on 11434): the agent reaches them at 127.0.0.1 on the same port. Nothing
    /// else on the host's loopback is reachable.
    pub host_ports: Vec<u16>,
    /// Maximum number of processes in the container (`runc` runtime).
    pub pids_limit: Option<i64>,
    /// Maximum memory of the container in bytes (`runc` runtime).
    pub memory_limit: Option<i64>,
    /// Model to ask for (pi, claude-code, codex).
    pub model: Option<String>,
    /// Base URL of the model API (pi, claude-code, codex): a gateway, proxy or test mock.
    pub base_url: Option<String>,
    /// Client dialect (claude-code, codex): `pi-rpc` (default) or `native`.
    pub dialect: Option<String>,
    /// Model provider (pi).
    pub provider: Option<String>,
    /// Tools that always need a person's approval. Unset: every tool. Others are allowed at
    /// once (`["*"]` also means every tool).
    pub approval_tools: Option<Vec<String>>,
    /// An approval request unanswered this long gets `approval_default`. Unset: it waits.
    pub approval_timeout_ms: Option<u64>,
    /// The answer given when an approval times out: `deny` (default) or `allow`.
    pub approval_default: Decision,
    /// Who may create, see, attach to and answer for sessions of this instance, on top of the
    /// top-level `allowed_users` (same names). Empty: whoever may use the server.
    #[serde(deserialize_with = "string_list")]
    pub allowed_users: Vec<String>,
}

impl InstanceConfig {
    /// A minimal instance: an id and an agent kind, everything else default.
    pub fn new(id: &str, agent: &str) -> Self {
        Self {
            id: id.to_owned(),
            agent: agent.to_owned(),
            ..Self::default()
        }
    }

    /// The runtime part of this instance.
    pub fn runtime_options(&self) -> InstanceRuntime {
        InstanceRuntime {
            network: self.network,
            host_ports: self.host_ports.clone(),
            pids_limit: self.pids_limit,
            memory_limit: self.memory_limit,
        }
    }

    /// `host_ports` must name real ports, once each, and only where they mean something.
    pub(super) fn validate_host_ports(&self) -> Result<(), String> {
        if self.host_ports.is_empty() {
            return Ok(());
        }
        if self.network != NetworkMode::Isolated {
            return Err(format!(
                "only an isolated network forwards host ports (this instance has network = {:?}; \
                 with \"host\" every host port is reachable anyway)",
                self.network.as_str()
            ));
        }
        if matches!(self.runtime, RuntimeKind::Process | RuntimeKind::Tmux) {
            return Err(format!(
                "only containers (runtime = \"runc\" or \"auto\") have a network of their own; \
                 the {} runtime shares the host's",
                self.runtime.as_str()
            ));
        }
        let mut seen = BTreeSet::new();
        for port in &self.host_ports {
            if *port == 0 {
                return Err("0 is not a port (use 1-65535)".into());
            }
            if !seen.insert(port) {
                return Err(format!("{port} is listed twice"));
            }
        }
        Ok(())
    }

    /// Whether sessions of this instance can start here: its agent's program exists and is
    /// executable (found through the instance's or the server's `PATH`), its credentials file
    /// reads, its workspace roots and `cwd` are directories. Checked by `check-config`, at
    /// startup (logged) and for every `GET /instances`, since files come and go.
    pub fn check_usable(&self, runtime: &RuntimeConfig) -> Result<(), Unusable> {
        let unusable = |key: &'static str, reason: String| Unusable { key, reason };
        if let Some((key, program)) = self.program() {
            let search = self
                .env
                .get("PATH")
                .or_else(|| runtime.passed_env.get("PATH"))
                .map(String::as_str);
            check_program(&program, search).map_err(|r| unusable(key, r))?;
        }
        if let Some(file) = &self.credentials_file {
            crate::credentials::read(file)
                .map_err(|e| unusable("credentials_file", e.to_string()))?;
        }
        for root in &self.workspace_roots {
            match std::fs::metadata(root) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(unusable(
                        "workspace_roots",
                        format!("{} is not a directory", root.display()),
                    ));
                }
                Err(e) => {
                    return Err(unusable(
                        "workspace_roots",
                        format!("{}: {e}", root.display()),
                    ));
                }
            }
        }
        if let Some(cwd) = &self.cwd
            && !cwd.is_dir()
        {
            return Err(unusable(
                "cwd",
                format!("{} does not exist or is not a directory", cwd.display()),
            ));
        }
        Ok(())
    }

    /// The program this instance runs and the key that names it (`None`: moorline itself).
    fn program(&self) -> Option<(&'static str, PathBuf)> {
        if let Some(path) = &self.agent_path {
            return Some(("agent_path", path.clone()));
        }
        match self.agent.as_str() {
            "command" => Some((
                "command",
                PathBuf::from(self.command.as_ref()?.first()?.as_str()),
            )),
            "echo" => None,
            _ => {
                // What the adapter would start, for kinds looked up in PATH (pi, claude, codex).
                let adapter = moorline_adapters::build(&self.adapter_config()).ok()?;
                let dir = Path::new("/");
                let env = BTreeMap::new();
                let spec = adapter
                    .launch(&moorline_adapters::LaunchContext {
                        instance_id: &self.id,
                        session_id: "000000000000",
                        cwd: dir,
                        env: &env,
                        moorline_exe: dir,
                        data_dir: dir,
                    })
                    .ok()?;
                Some(("agent", spec.program))
            }
        }
    }

    /// The adapter part of this instance.
    pub fn adapter_config(&self) -> moorline_adapters::AdapterConfig {
        moorline_adapters::AdapterConfig {
            agent: self.agent.clone(),
            command: self.command.clone(),
            agent_path: self.agent_path.clone(),
            args: self.args.clone(),
            model: self.model.clone(),
            base_url: self.base_url.clone(),
            dialect: self.dialect.clone(),
            provider: self.provider.clone(),
            // Decided per start, by the session.
            continuation: Default::default(),
        }
    }

    /// The approval rules of this instance.
    pub fn approval_policy(&self) -> ApprovalPolicy {
        ApprovalPolicy {
            tools: self.approval_tools.clone(),
            timeout: self.approval_timeout_ms.map(Duration::from_millis),
            default: self.approval_default,
        }
    }
}

/// Why an instance cannot start sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    /// The instance key at fault (`agent_path`, `command`, `agent`, `credentials_file`,
    /// `workspace_roots`, `cwd`).
    pub key: &'static str,
    /// What is wrong, in words (never a credential's value).
    pub reason: String,
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Whether `program` (a path, or a name looked up in `search`, a `PATH` value) is an
/// executable file.
fn check_program(program: &Path, search: Option<&str>) -> Result<(), String> {
    if program.components().count() > 1 {
        return match std::fs::metadata(program) {
            Err(e) => Err(format!("{}: {e}", program.display())),
            Ok(m) if !m.is_file() => Err(format!("{} is not a file", program.display())),
            Ok(_) if !is_executable(program) => {
                Err(format!("{} is not executable", program.display()))
            }
            Ok(_) => Ok(()),
        };
    }
    if find_program(program, search).is_some() {
        return Ok(());
    }
    Err(format!(
        "{} is not an executable found in PATH ({}); install it or set agent_path",
        program.display(),
        search.unwrap_or(DEFAULT_PATH)
    ))
}

/// Where programs are looked for when no `PATH` is given.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Finds `program` as `execvp` would: a path (a name with a `/`) stands for itself, a bare name
/// is looked for in `path` (a `PATH` value; none: `/usr/local/bin:/usr/bin:/bin`), passing over
/// what is not an executable file. The one lookup behind checking an instance's agent and
/// starting it, runc and their helpers: every runtime starts a program by its full path (the
/// process runtime so that the standard library can use `posix_spawn`, which it does not when
/// it would have to search `PATH` itself).
pub fn find_program(program: &Path, path: Option<&str>) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return is_executable(program).then(|| program.to_owned());
    }
    path.unwrap_or(DEFAULT_PATH)
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
