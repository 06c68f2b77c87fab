//! Configuration: the only module that reads the process environment.
//!
//! Layers, later ones winning: built-in defaults < TOML file < environment < command-line flags.
//! Environment variables are taken as strings and only converted where the target is a number or
//! a boolean, so `MOORLINE_TOKEN_FILE=0123` stays `"0123"`. amarre's variable names are accepted
//! too, so an amarre deployment can switch binaries without touching its unit file.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use moorline_adapters::pipeline::{ApprovalPolicy, Decision};
use serde::{Deserialize, Deserializer, Serialize};

/// The commented example configuration, which is also the documentation of every key.
pub const EXAMPLE_CONFIG: &str = include_str!("../moorline.example.toml");

/// Exit code for configuration errors (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Environment variables with the `MOORLINE_` prefix that are not configuration keys.
const RESERVED_ENV: &[&str] = &["MOORLINE_CONFIG", "MOORLINE_URL"];

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

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

/// Settings shared by the tmux and runc runtimes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// The tmux program.
    pub tmux: PathBuf,
    /// Name of moorline's own tmux server (`tmux -L <name>`), never the user's default one.
    pub tmux_socket: String,
    /// The runc program.
    pub runc: PathBuf,
    /// runc's state directory. Default: `/run/moorline/runc` as root, else
    /// `$XDG_RUNTIME_DIR/moorline/runc`, else `<state_dir>/runc`.
    pub runc_root: Option<PathBuf>,
    /// The init process run as PID 1 in containers (it reaps zombies and forwards signals).
    pub tini: PathBuf,
    /// The user-mode network stack behind `network = "isolated"` containers.
    pub slirp4netns: PathBuf,
    /// Host directories bind-mounted read-only into containers (missing ones are skipped;
    /// symlinks, as on merged-/usr systems, are recreated as symlinks).
    #[serde(deserialize_with = "string_list_paths")]
    pub system_dirs: Vec<PathBuf>,
    /// Variables passed from the server's environment into containers, when set. Nothing
    /// else of the server's environment reaches a container.
    #[serde(deserialize_with = "string_list")]
    pub pass_env: Vec<String>,
    /// Values of `pass_env` found in the environment (filled in when loading).
    #[serde(skip)]
    pub passed_env: BTreeMap<String, String>,
    /// The unprivileged user (a name, or `uid:gid`) agents run as when moorline runs as root
    /// and a workspace belongs to root. A workspace of another user is worked in as that user.
    /// Unset: the system's `nobody` user where it exists (so a fresh install works as root),
    /// else such sessions are refused; moorline never runs an agent as root.
    pub agent_user: Option<String>,
}

impl RuntimeConfig {
    /// [`Self::agent_user`] as a uid and gid: looked up once, and never root.
    pub fn agent_ids(&self) -> Result<Option<(u32, u32)>, ConfigError> {
        let Some(user) = self.agent_user.as_deref() else {
            // The built-in default: `nobody`, which owns nothing, when the system has it.
            return Ok(match nix::unistd::User::from_name("nobody") {
                Ok(Some(u)) if !u.uid.is_root() && u.gid.as_raw() != 0 => {
                    Some((u.uid.as_raw(), u.gid.as_raw()))
                }
                _ => None,
            });
        };
        let err = |why: &str| ConfigError::new(format!("runtime.agent_user: {user:?} {why}"));
        let ids = match user.split_once(':') {
            Some((uid, gid)) => match (uid.parse::<u32>(), gid.parse::<u32>()) {
                (Ok(uid), Ok(gid)) => (uid, gid),
                _ => return Err(err("is neither a user name nor uid:gid")),
            },
            None => match nix::unistd::User::from_name(user) {
                Ok(Some(u)) => (u.uid.as_raw(), u.gid.as_raw()),
                Ok(None) => {
                    return Err(err(
                        "is not a user on this machine (create it, or give uid:gid)",
                    ));
                }
                Err(e) => return Err(err(&format!("cannot be looked up: {e}"))),
            },
        };
        if ids.0 == 0 || ids.1 == 0 {
            return Err(err("is root or in group root; agents never run as root"));
        }
        Ok(Some(ids))
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            tmux: "tmux".into(),
            tmux_socket: "moorline".into(),
            runc: "runc".into(),
            runc_root: None,
            tini: "tini".into(),
            slirp4netns: "slirp4netns".into(),
            system_dirs: [
                "/usr",
                "/bin",
                "/sbin",
                "/lib",
                "/lib32",
                "/lib64",
                "/libx32",
                "/etc",
                "/opt",
                "/nix/store",
                "/run/current-system",
            ]
            .into_iter()
            .map(PathBuf::from)
            .collect(),
            pass_env: [
                "PATH",
                "HOME",
                "USER",
                "LOGNAME",
                "LANG",
                "TZ",
                "NODE_EXTRA_CA_CERTS",
                "SSL_CERT_FILE",
                "SSL_CERT_DIR",
                "HTTPS_PROXY",
                "HTTP_PROXY",
                "NO_PROXY",
                "https_proxy",
                "http_proxy",
                "no_proxy",
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
            passed_env: BTreeMap::new(),
            agent_user: None,
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

/// The whole configuration. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on. Must be a loopback address unless `allow_non_loopback` is set.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Allow listening on a non-loopback address (moorline is meant to sit behind
    /// `tailscale serve`; exposing it directly is a deliberate choice).
    pub allow_non_loopback: bool,
    /// Where sessions (metadata and output journals) are stored.
    pub state_dir: PathBuf,
    /// File holding a bearer token that every request must carry. No file: no token.
    pub token_file: Option<PathBuf>,
    /// Credentials for cloning projects from URLs: a git credential store file
    /// (`https://user:token@host` lines), read by git at each clone. Clients never send
    /// credentials; none: only repositories that need none can be cloned.
    pub git_credentials_file: Option<PathBuf>,
    /// Extra names accepted in the `Host` header (loopback names, this machine's hostname and
    /// its tailnet names are always accepted).
    #[serde(deserialize_with = "string_list")]
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed to call the API (`https://app.example`). Requests without an
    /// `Origin` header, and same-origin requests, are always allowed.
    #[serde(deserialize_with = "string_list")]
    pub allowed_origins: Vec<String>,
    /// Ask `tailscale status` for this machine's tailnet names at startup.
    pub detect_tailnet_names: bool,
    /// Listen on TCP (`host`:`port`). At least one of `tcp` and `unix_socket` is required.
    pub tcp: bool,
    /// Also (or, with `tcp = false`, only) listen on this Unix socket: the target for
    /// `tailscale serve --bg unix:PATH`. Never inside a directory containers see.
    pub unix_socket: Option<PathBuf>,
    /// Permissions of the Unix socket, in octal (`"0600"`: the server's user only; `"0660"`:
    /// its group too).
    pub unix_socket_mode: String,
    /// Believe `Tailscale-User-Login` on TCP too. Off by default: any local process (agents of
    /// the `process` and `tmux` runtimes included) can send that header to a TCP port; on the
    /// Unix socket only tailscaled and the server's own user can.
    pub trust_tailscale_headers_on_tcp: bool,
    /// Who may use the server: tailnet logins, plus `local` for requests with no identity.
    /// A request carrying the bearer token is always let in. Empty: everyone, as before.
    #[serde(deserialize_with = "string_list")]
    pub allowed_users: Vec<String>,
    /// Log filter, in `RUST_LOG` syntax.
    pub log: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Limits.
    pub limits: Limits,
    /// Settings of the tmux and runc runtimes.
    pub runtime: RuntimeConfig,
    /// Named agent configurations. Empty: one built-in `echo` instance.
    pub instances: Vec<InstanceConfig>,
    /// The moorline executable, which built-in agents run (`echo-agent`). Not configurable in
    /// files; defaults to the running executable.
    #[serde(skip)]
    pub moorline_exe: Option<PathBuf>,
    /// amarre's push notification variables (`AMARRE_PUSH_*`) found in the environment. Push
    /// is not available yet, so the server says at startup that they are ignored.
    #[serde(skip)]
    pub ignored_push_env: Vec<String>,
}

/// Every limit moorline enforces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Sessions whose agent is running at the same time.
    pub max_sessions: usize,
    /// WebSocket clients on one session.
    pub max_clients_per_session: usize,
    /// Largest WebSocket message a client may send; larger ones close the socket with 1009.
    pub max_inbound_frame_bytes: usize,
    /// Longest agent output line forwarded; longer lines are replaced by a `line_dropped` frame.
    pub max_line_bytes: usize,
    /// Recent output kept in memory per session for fast fan-out; older output is read back
    /// from the session's journal on disk.
    pub backlog_bytes: usize,
    /// Output kept on disk per session for replay; the oldest output is deleted beyond it.
    pub journal_max_bytes: u64,
    /// Client lines queued for an agent's stdin before clients are slowed down.
    pub inbound_queue: usize,
    /// Time an agent gets to exit after SIGTERM before it is killed.
    pub stop_grace_ms: u64,
    /// A client that accepts no data for this long is disconnected.
    pub client_stall_ms: u64,
    /// After an agent exits, how long to wait for processes it left behind to close its output.
    pub exit_drain_ms: u64,
    /// Environment variables a client may set in one `POST /sessions`.
    pub max_env_vars: usize,
    /// Longest environment variable name a client may set (bytes).
    pub max_env_name_bytes: usize,
    /// Longest environment variable value a client may set (bytes).
    pub max_env_value_bytes: usize,
    /// Send buffer of a WebSocket client's TCP socket (the kernel doubles it; 0 leaves the
    /// system's autotuning). Small enough that a slow reader's progress is seen well within
    /// `client_stall_ms`.
    pub client_send_buffer_bytes: usize,
    /// How long output the journal cannot take (a full disk) is still held for, once the
    /// agent has exited; while it runs, its output is held (and the agent paused) as long as
    /// it takes.
    pub output_hold_after_exit_ms: u64,
    /// Longest session name accepted, in bytes; longer ones are refused with 400.
    pub max_name_bytes: usize,
    /// Largest `POST /sessions` body accepted (it bounds the working directory and
    /// environment a client can make the server store); larger ones are refused with 400.
    pub max_request_bytes: usize,
    /// Largest file (`GET /sessions/{id}/files`) or diff (`GET /sessions/{id}/diff`) returned;
    /// larger ones are refused with 413.
    pub max_file_bytes: usize,
    /// Ended (exited or crashed) sessions kept; beyond it the oldest are removed, with their
    /// journals.
    pub max_ended_sessions: usize,
    /// Ended sessions older than this are removed, with their journals (0: kept until
    /// `max_ended_sessions` pushes them out).
    pub ended_session_ttl_ms: u64,
    /// After sending a close frame, how long to keep reading (and discarding) what the client
    /// still sends, so it reads the close code instead of a connection reset.
    pub close_linger_ms: u64,
    /// A running agent that wrote output this recently counts as `working` in session
    /// summaries (`activity`), even outside a turn the server can see.
    pub activity_window_ms: u64,
}

impl Limits {
    /// [`Self::stop_grace_ms`] as a duration.
    pub fn stop_grace(&self) -> Duration {
        Duration::from_millis(self.stop_grace_ms)
    }

    /// [`Self::client_stall_ms`] as a duration.
    pub fn client_stall(&self) -> Duration {
        Duration::from_millis(self.client_stall_ms)
    }

    /// [`Self::output_hold_after_exit_ms`] as a duration.
    pub fn output_hold_after_exit(&self) -> Duration {
        Duration::from_millis(self.output_hold_after_exit_ms)
    }

    /// [`Self::close_linger_ms`] as a duration.
    pub fn close_linger(&self) -> Duration {
        Duration::from_millis(self.close_linger_ms)
    }

    /// [`Self::activity_window_ms`] as a duration.
    pub fn activity_window(&self) -> Duration {
        Duration::from_millis(self.activity_window_ms)
    }

    /// [`Self::exit_drain_ms`] as a duration.
    pub fn exit_drain(&self) -> Duration {
        Duration::from_millis(self.exit_drain_ms)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 8,
            max_clients_per_session: 32,
            max_inbound_frame_bytes: 16 << 20,
            max_line_bytes: 16 << 20,
            backlog_bytes: 4 << 20,
            journal_max_bytes: 256 << 20,
            inbound_queue: 1024,
            stop_grace_ms: 5_000,
            client_stall_ms: 30_000,
            exit_drain_ms: 500,
            max_env_vars: 64,
            max_env_name_bytes: 128,
            max_env_value_bytes: 32 << 10,
            close_linger_ms: 3_000,
            max_name_bytes: 256,
            max_request_bytes: 64 * 1024,
            max_file_bytes: 1 << 20,
            max_ended_sessions: 100,
            ended_session_ttl_ms: 0,
            output_hold_after_exit_ms: 10_000,
            client_send_buffer_bytes: 128 * 1024,
            activity_window_ms: 5_000,
        }
    }
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
    fn validate_host_ports(&self) -> Result<(), String> {
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
                .map_or("/usr/local/bin:/usr/bin:/bin", String::as_str);
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
fn check_program(program: &Path, search: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 {
        return match std::fs::metadata(program) {
            Err(e) => Err(format!("{}: {e}", program.display())),
            Ok(m) if !m.is_file() => Err(format!("{} is not a file", program.display())),
            Ok(_) if !executable(program) => {
                Err(format!("{} is not executable", program.display()))
            }
            Ok(_) => Ok(()),
        };
    }
    if search
        .split(':')
        .filter(|d| !d.is_empty())
        .any(|dir| executable(&Path::new(dir).join(program)))
    {
        return Ok(());
    }
    Err(format!(
        "{} is not an executable found in PATH ({search}); install it or set agent_path",
        program.display()
    ))
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: Ipv4Addr::LOCALHOST.to_string(),
            port: 8341,
            allow_non_loopback: false,
            state_dir: PathBuf::from("/var/lib/moorline"),
            token_file: None,
            git_credentials_file: None,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            detect_tailnet_names: true,
            tcp: true,
            unix_socket: None,
            unix_socket_mode: "0600".into(),
            trust_tailscale_headers_on_tcp: false,
            allowed_users: Vec::new(),
            log: "info".into(),
            log_format: LogFormat::Human,
            limits: Limits::default(),
            runtime: RuntimeConfig::default(),
            instances: Vec::new(),
            moorline_exe: None,
            ignored_push_env: Vec::new(),
        }
    }
}

/// A configuration error, with the key and where its value came from.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl ConfigError {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Values given on the command line (the top layer).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--host`.
    pub host: Option<String>,
    /// `--port`.
    pub port: Option<u16>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--allow-non-loopback`.
    pub allow_non_loopback: bool,
}

/// Everything configuration is read from, captured once so loading is a pure function.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// An explicit config file (`--config` or `MOORLINE_CONFIG`); it must exist.
    pub file: Option<PathBuf>,
    /// Whether to read the default config file if it exists.
    pub default_file: bool,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Command-line flags.
    pub overrides: Overrides,
}

impl Sources {
    /// Captures the process environment.
    pub fn from_process(file: Option<PathBuf>, overrides: Overrides) -> Self {
        let env: BTreeMap<String, String> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, os_to_string(v)?)))
            .collect();
        let file = file.or_else(|| env.get("MOORLINE_CONFIG").map(PathBuf::from));
        Self {
            default_file: file.is_none(),
            file,
            env,
            overrides,
        }
    }

    /// The same sources without the environment (used by `check-config --no-env`).
    pub fn without_env(mut self) -> Self {
        let keep = |k: &str| matches!(k, "HOME" | "XDG_CONFIG_HOME" | "XDG_STATE_HOME");
        self.env.retain(|k, _| keep(k));
        self
    }

    fn default_config_path(&self) -> Option<PathBuf> {
        let user = self
            .env
            .get("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| self.env.get("HOME").map(|h| Path::new(h).join(".config")))
            .map(|d| d.join("moorline/config.toml"));
        user.into_iter()
            .chain([PathBuf::from("/etc/moorline/config.toml")])
            .find(|p| p.is_file())
    }

    fn default_state_dir(&self) -> PathBuf {
        if let Some(dir) = self.env.get("STATE_DIRECTORY") {
            // systemd's StateDirectory= (may list several, colon-separated).
            return PathBuf::from(dir.split(':').next().unwrap_or(dir));
        }
        if let Some(dir) = self.env.get("XDG_STATE_HOME") {
            return Path::new(dir).join("moorline");
        }
        match self.env.get("HOME") {
            Some(home) if home != "/" => Path::new(home).join(".local/state/moorline"),
            _ => PathBuf::from("/var/lib/moorline"),
        }
    }
}

/// runc's state belongs on a tmpfs (gone after a reboot, like the containers it describes).
fn default_runc_root(sources: &Sources, state_dir: &Path) -> PathBuf {
    if nix::unistd::getuid().is_root() {
        return PathBuf::from("/run/moorline/runc");
    }
    match sources.env.get("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => Path::new(dir).join("moorline/runc"),
        _ => state_dir.join("runc"),
    }
}

fn os_to_string(v: OsString) -> Option<String> {
    v.into_string().ok()
}

impl Config {
    /// Loads and validates the configuration from `sources`.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let defaults = Config {
            state_dir: sources.default_state_dir(),
            ..Config::default()
        };
        let mut figment = Figment::new().merge(Layer::new("defaults", to_dict(&defaults)?));
        let file = match &sources.file {
            Some(path) if !path.is_file() => {
                return Err(ConfigError::new(format!(
                    "config file {} does not exist or is not a file",
                    path.display()
                )));
            }
            Some(path) => Some(path.clone()),
            None if sources.default_file => sources.default_config_path(),
            None => None,
        };
        if let Some(path) = &file {
            figment = figment
                .merge(<figment::providers::Toml as figment::providers::Format>::file_exact(path));
        }
        let (env_layer, env_names) = env_layer(&sources.env)?;
        figment = figment.merge(env_layer).merge(Layer::new(
            "command-line flags",
            overrides_dict(&sources.overrides),
        ));
        let mut config: Config = figment
            .extract_lossy()
            .map_err(|e| describe(e, &env_names))?;
        if config.instances.is_empty() {
            config.instances.push(InstanceConfig::new("echo", "echo"));
        }
        if config.runtime.runc_root.is_none() {
            config.runtime.runc_root = Some(default_runc_root(sources, &config.state_dir));
        }
        config.runtime.passed_env = config
            .runtime
            .pass_env
            .iter()
            .filter_map(|k| Some((k.clone(), sources.env.get(k)?.clone())))
            .collect();
        config.ignored_push_env = sources
            .env
            .keys()
            .filter(|k| k.starts_with("AMARRE_PUSH_"))
            .cloned()
            .collect();
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot: addresses, names, limits, agent kinds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ip = self.ip()?;
        if !ip.is_loopback() && !self.allow_non_loopback {
            return Err(ConfigError::new(format!(
                "host: {ip} is not a loopback address. moorline is meant to be reached through \
                 `tailscale serve`; set allow_non_loopback = true (or --allow-non-loopback) to \
                 listen on it anyway"
            )));
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_sessions", l.max_sessions),
            ("limits.max_clients_per_session", l.max_clients_per_session),
            ("limits.max_inbound_frame_bytes", l.max_inbound_frame_bytes),
            ("limits.max_line_bytes", l.max_line_bytes),
            ("limits.backlog_bytes", l.backlog_bytes),
            ("limits.inbound_queue", l.inbound_queue),
            ("limits.max_env_name_bytes", l.max_env_name_bytes),
            ("limits.max_name_bytes", l.max_name_bytes),
            ("limits.max_request_bytes", l.max_request_bytes),
            ("limits.max_file_bytes", l.max_file_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::new(format!("{key}: must be at least 1")));
            }
        }
        if l.journal_max_bytes < l.max_line_bytes as u64 {
            return Err(ConfigError::new(
                "limits.journal_max_bytes: must be at least limits.max_line_bytes, or a single \
                 line could not be replayed",
            ));
        }
        self.runtime.agent_ids()?;
        self.validate_listeners()?;
        let mut ids = BTreeSet::new();
        for (i, inst) in self.instances.iter().enumerate() {
            let valid = !inst.id.is_empty()
                && inst.id.len() <= 64
                && inst
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !valid {
                return Err(ConfigError::new(format!(
                    "instances[{i}].id: {:?} must be 1-64 characters of letters, digits, '-', '_' or '.'",
                    inst.id
                )));
            }
            if !ids.insert(inst.id.as_str()) {
                return Err(ConfigError::new(format!(
                    "instances[{i}].id: duplicate instance id {:?}",
                    inst.id
                )));
            }
            moorline_adapters::build(&inst.adapter_config())
                .map_err(|e| ConfigError::new(format!("instances[{i}] ({}): {e}", inst.id)))?;
            for (key, value) in [
                ("pids_limit", inst.pids_limit),
                ("memory_limit", inst.memory_limit),
            ] {
                if value.is_some_and(|v| v <= 0) {
                    return Err(ConfigError::new(format!(
                        "instances[{i}].{key}: must be positive (leave it out for no limit)"
                    )));
                }
            }
            inst.validate_host_ports()
                .map_err(|e| ConfigError::new(format!("instances[{i}].host_ports: {e}")))?;
        }
        Ok(())
    }

    /// The instances that cannot start sessions, and why (see
    /// [`InstanceConfig::check_usable`]).
    pub fn unusable_instances(&self) -> Vec<(&InstanceConfig, Unusable)> {
        self.instances
            .iter()
            .filter_map(|i| i.check_usable(&self.runtime).err().map(|u| (i, u)))
            .collect()
    }

    /// Checks that something is listened on, and that the Unix socket stays out of every
    /// directory an agent's container can see (a socket in a read-only mount still connects).
    fn validate_listeners(&self) -> Result<(), ConfigError> {
        if !self.tcp && self.unix_socket.is_none() {
            return Err(ConfigError::new(
                "tcp = false needs unix_socket: with neither, the server would listen nowhere",
            ));
        }
        self.socket_mode()?;
        let Some(socket) = &self.unix_socket else {
            return Ok(());
        };
        if !socket.is_absolute() {
            return Err(ConfigError::new(format!(
                "unix_socket: {} must be an absolute path",
                socket.display()
            )));
        }
        if socket.as_os_str().len() > 107 {
            return Err(ConfigError::new(format!(
                "unix_socket: {} is longer than the 107 bytes a socket path may have",
                socket.display()
            )));
        }
        let seen = [("state_dir", &self.state_dir)]
            .into_iter()
            .chain(
                self.runtime
                    .system_dirs
                    .iter()
                    .map(|d| ("runtime.system_dirs", d)),
            )
            .chain(self.instances.iter().flat_map(|i| {
                i.workspace_roots
                    .iter()
                    .map(|r| ("workspace_roots", r))
                    .chain(i.cwd.iter().map(|c| ("cwd", c)))
            }));
        for (key, dir) in seen {
            if socket.starts_with(dir) {
                return Err(ConfigError::new(format!(
                    "unix_socket: {} is inside {key} {}, which agents can see; put it in a \
                     directory of its own such as /run/moorline",
                    socket.display(),
                    dir.display()
                )));
            }
        }
        Ok(())
    }

    /// [`Self::unix_socket_mode`] as permission bits.
    pub fn socket_mode(&self) -> Result<u32, ConfigError> {
        let text = self.unix_socket_mode.trim();
        let digits = text.strip_prefix("0o").unwrap_or(text);
        match u32::from_str_radix(digits, 8) {
            Ok(mode) if !digits.is_empty() && mode <= 0o777 => Ok(mode),
            _ => Err(ConfigError::new(format!(
                "unix_socket_mode: {:?} is not an octal mode such as \"0600\" or \"0660\"",
                self.unix_socket_mode
            ))),
        }
    }

    /// The moorline executable built-in agents run.
    pub fn moorline_exe(&self) -> Result<PathBuf, ConfigError> {
        match &self.moorline_exe {
            Some(p) => Ok(p.clone()),
            None => std::env::current_exe()
                .map_err(|e| ConfigError::new(format!("cannot find the moorline executable: {e}"))),
        }
    }

    /// The listening address as an IP.
    pub fn ip(&self) -> Result<IpAddr, ConfigError> {
        if self.host == "localhost" {
            return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        self.host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| ConfigError::new(format!("host: {:?} is not an IP address", self.host)))
    }

    /// The socket address to bind.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        Ok(SocketAddr::new(self.ip()?, self.port))
    }

    /// Reads the bearer token, if one is configured.
    pub fn read_token(&self) -> Result<Option<Secret>, ConfigError> {
        self.token_file
            .as_deref()
            .map(|path| {
                read_token_file(path).map_err(|e| ConfigError::new(format!("token_file: {e}")))
            })
            .transpose()
    }

    /// The names this machine answers to: its hostname and, if asked, its tailnet names.
    pub fn machine_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if let Ok(host) = nix::unistd::gethostname()
            && let Some(h) = host.to_str()
        {
            names.push(h.to_owned());
        }
        if self.detect_tailnet_names {
            names.extend(tailnet_names());
        }
        names
    }
}

/// How long `tailscale status` may take at startup.
const TAILSCALE_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks the local tailscaled for this machine's DNS name, if tailscale is installed. Gives up
/// after [`TAILSCALE_TIMEOUT`]: a stuck tailscaled must not keep the server from serving.
fn tailnet_names() -> Vec<String> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("tailscale")
        .args(["status", "--json", "--peers=false"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return Vec::new();
    };
    let deadline = std::time::Instant::now() + TAILSCALE_TIMEOUT;
    // Its answer (one machine, no peers) fits in the pipe, so waiting first cannot block it.
    while matches!(child.try_wait(), Ok(None)) {
        if std::time::Instant::now() > deadline {
            tracing::warn!("`tailscale status` did not answer; not adding tailnet names");
            let _ = child.kill();
            let _ = child.wait();
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut stdout = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_end(&mut stdout);
    }
    let Ok(status) = serde_json::from_slice::<serde_json::Value>(&stdout) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Some(dns) = status["Self"]["DNSName"].as_str() {
        let dns = dns.trim_end_matches('.');
        if !dns.is_empty() {
            names.push(dns.to_owned());
            if let Some(short) = dns.split('.').next() {
                names.push(short.to_owned());
            }
        }
    }
    names
}

/// A figment layer built from a dictionary, with a name used in error messages.
struct Layer {
    name: String,
    dict: Dict,
}

impl Layer {
    fn new(name: &str, dict: Dict) -> Self {
        Self {
            name: name.to_owned(),
            dict,
        }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

fn to_dict(value: &impl Serialize) -> Result<Dict, ConfigError> {
    match Value::serialize(value) {
        Ok(Value::Dict(_, dict)) => Ok(dict),
        Ok(_) => Err(ConfigError::new("internal: defaults are not a table")),
        Err(e) => Err(ConfigError::new(format!("internal: {e}"))),
    }
}

fn overrides_dict(o: &Overrides) -> Dict {
    let mut d = Dict::new();
    if let Some(h) = &o.host {
        d.insert("host".into(), h.clone().into());
    }
    if let Some(p) = o.port {
        d.insert("port".into(), p.into());
    }
    if let Some(s) = &o.state_dir {
        d.insert("state_dir".into(), s.to_string_lossy().into_owned().into());
    }
    if let Some(t) = &o.token_file {
        d.insert("token_file".into(), t.to_string_lossy().into_owned().into());
    }
    if let Some(f) = o.log_format {
        let name = match f {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        };
        d.insert("log_format".into(), name.into());
    }
    if o.allow_non_loopback {
        d.insert("allow_non_loopback".into(), true.into());
    }
    d
}

/// Builds the environment layer. Values stay strings; the returned map remembers which
/// variable set which key, for error messages.
fn env_layer(
    env: &BTreeMap<String, String>,
) -> Result<(Layer, BTreeMap<String, String>), ConfigError> {
    let mut dict = Dict::new();
    let mut names = BTreeMap::new();
    let mut set = |dict: &mut Dict, path: &[&str], value: Value, var: &str| {
        names.insert(path.join("."), var.to_owned());
        let mut cur = dict;
        for key in &path[..path.len() - 1] {
            let entry = cur
                .entry((*key).to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            let Value::Dict(_, inner) = entry else {
                unreachable!("just made a dict")
            };
            cur = inner;
        }
        cur.insert(path[path.len() - 1].to_owned(), value);
    };

    // amarre's names first, so that MOORLINE_* wins when both are set.
    for (var, path) in [
        ("AMARRE_HOST", &["host"][..]),
        ("AMARRE_PORT", &["port"][..]),
        ("AMARRE_MAX_SESSIONS", &["limits", "max_sessions"][..]),
    ] {
        if let Some(v) = env.get(var) {
            set(&mut dict, path, v.clone().into(), var);
        }
    }
    if let Some(json) = env.get("AMARRE_INSTANCES_JSON") {
        let instances = amarre_instances(json)?;
        set(
            &mut dict,
            &["instances"],
            instances,
            "AMARRE_INSTANCES_JSON",
        );
    } else if env.contains_key("AMARRE_AGENT") || env.contains_key("AMARRE_AGENT_PATH") {
        // amarre's legacy single-agent variables make one instance named "default".
        let mut inst = Dict::new();
        inst.insert("id".into(), "default".into());
        let agent = env
            .get("AMARRE_AGENT")
            .cloned()
            .unwrap_or_else(|| "pi".into());
        inst.insert("agent".into(), agent.into());
        if let Some(path) = env.get("AMARRE_AGENT_PATH") {
            inst.insert("agent_path".into(), path.clone().into());
        }
        let var = if env.contains_key("AMARRE_AGENT_PATH") {
            "AMARRE_AGENT_PATH"
        } else {
            "AMARRE_AGENT"
        };
        set(
            &mut dict,
            &["instances"],
            Value::from(vec![Value::from(inst)]),
            var,
        );
    }

    for (var, value) in env {
        let Some(rest) = var.strip_prefix("MOORLINE_") else {
            continue;
        };
        if RESERVED_ENV.contains(&var.as_str()) {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::new(format!("{var}: malformed variable name")));
        }
        let refs: Vec<&str> = path.iter().map(String::as_str).collect();
        set(&mut dict, &refs, value.clone().into(), var);
    }
    Ok((Layer::new("environment", dict), names))
}

/// Parses `AMARRE_INSTANCES_JSON` with amarre's error messages.
fn amarre_instances(json: &str) -> Result<Value, ConfigError> {
    let err = |m: String| ConfigError::new(format!("AMARRE_INSTANCES_JSON: {m}"));
    let parsed: serde_json::Value =
        serde_json::from_str(json).map_err(|e| err(format!("invalid JSON ({e})")))?;
    let Some(items) = parsed.as_array().filter(|a| !a.is_empty()) else {
        return Err(err("must be a non-empty array".into()));
    };
    for (i, item) in items.iter().enumerate() {
        let Some(obj) = item.as_object() else {
            return Err(err(format!("[{i}]: not an object")));
        };
        for key in ["id", "agent"] {
            if !obj.get(key).is_some_and(serde_json::Value::is_string) {
                return Err(err(format!("[{i}]: missing '{key}'")));
            }
        }
    }
    Value::serialize(&parsed).map_err(|e| err(e.to_string()))
}

/// Turns figment's error into one message per problem, naming the key and its source.
fn describe(err: figment::Error, env_names: &BTreeMap<String, String>) -> ConfigError {
    let lines: Vec<String> = err
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let from = match (&e.metadata, env_names.get(&key)) {
                (Some(m), Some(var)) if m.name == "environment" => format!(" (from {var})"),
                (Some(m), _) => match &m.source {
                    Some(src) => format!(" (in {} {src})", m.name),
                    None => format!(" (from {})", m.name),
                },
                (None, _) => String::new(),
            };
            if key.is_empty() {
                format!("{}{from}", e.kind)
            } else {
                format!("{key}: {}{from}", e.kind)
            }
        })
        .collect();
    ConfigError::new(lines.join("\n"))
}

/// [`string_list`] for paths.
fn string_list_paths<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    Ok(string_list(d)?.into_iter().map(PathBuf::from).collect())
}

/// Accepts a list either as a sequence or as one comma-separated string (for the environment).
fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        One(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(v) => v,
        Either::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Sources {
        Sources {
            env: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Sources::default()
        }
    }

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(&env(pairs))
    }

    #[test]
    fn no_configuration_gives_loopback_8341_and_an_echo_instance() {
        let c = load(&[("HOME", "/home/u")]).expect("load");
        assert_eq!(
            c.listen_addr().expect("addr"),
            "127.0.0.1:8341".parse().expect("addr")
        );
        assert_eq!(c.instances.len(), 1);
        assert_eq!(c.instances[0].id, "echo");
        assert_eq!(c.state_dir, PathBuf::from("/home/u/.local/state/moorline"));
        assert_eq!(c.limits.max_sessions, 8);
    }

    #[test]
    fn the_example_file_documents_the_defaults() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("c.toml");
        std::fs::write(&path, EXAMPLE_CONFIG).expect("write");
        let from_file = Config::load(&Sources {
            file: Some(path),
            ..Sources::default()
        })
        .expect("example parses");
        let defaults = load(&[]).expect("defaults");
        assert_eq!(from_file.limits, defaults.limits);
        assert_eq!(from_file.port, defaults.port);
        assert_eq!(from_file.host, defaults.host);
        assert_eq!(
            (
                from_file.tcp,
                &from_file.unix_socket_mode,
                &from_file.allowed_users
            ),
            (
                defaults.tcp,
                &defaults.unix_socket_mode,
                &defaults.allowed_users
            )
        );
        assert_eq!(
            from_file.trust_tailscale_headers_on_tcp,
            defaults.trust_tailscale_headers_on_tcp
        );
    }

    #[test]
    fn listeners_identity_keys_and_their_errors() {
        let c = load(&[
            ("MOORLINE_TCP", "false"),
            ("MOORLINE_UNIX_SOCKET", "/run/moorline/moorline.sock"),
            ("MOORLINE_UNIX_SOCKET_MODE", "0660"),
            ("MOORLINE_ALLOWED_USERS", "alice@example.com, local"),
        ])
        .expect("load");
        assert!(!c.tcp);
        assert_eq!(c.socket_mode().expect("mode"), 0o660);
        assert_eq!(c.allowed_users, vec!["alice@example.com", "local"]);
        let e = load(&[("MOORLINE_TCP", "false")])
            .expect_err("nowhere")
            .to_string();
        assert!(e.contains("tcp") && e.contains("unix_socket"), "{e}");
        let e = load(&[
            ("MOORLINE_UNIX_SOCKET", "/run/moorline/moorline.sock"),
            ("MOORLINE_UNIX_SOCKET_MODE", "rw"),
        ])
        .expect_err("bad mode")
        .to_string();
        assert!(e.contains("unix_socket_mode"), "{e}");
        let e = load(&[("MOORLINE_UNIX_SOCKET", "moorline.sock")])
            .expect_err("relative")
            .to_string();
        assert!(e.contains("absolute"), "{e}");
        let e = load(&[
            ("MOORLINE_STATE_DIR", "/srv/moorline"),
            ("MOORLINE_UNIX_SOCKET", "/srv/moorline/api.sock"),
        ])
        .expect_err("visible to containers")
        .to_string();
        assert!(e.contains("state_dir"), "{e}");
        let e = load(&[("MOORLINE_UNIX_SOCKET", "/etc/moorline/api.sock")])
            .expect_err("a system dir")
            .to_string();
        assert!(e.contains("system_dirs"), "{e}");
    }

    #[test]
    fn amarre_variables_are_honoured_and_moorline_ones_win() {
        let c = load(&[("AMARRE_PORT", "9000"), ("AMARRE_MAX_SESSIONS", "3")]).expect("load");
        assert_eq!((c.port, c.limits.max_sessions), (9000, 3));
        let c = load(&[("AMARRE_PORT", "9000"), ("MOORLINE_PORT", "9001")]).expect("load");
        assert_eq!(c.port, 9001);
        let c = load(&[("MOORLINE_LIMITS__MAX_LINE_BYTES", "1024")]).expect("load");
        assert_eq!(c.limits.max_line_bytes, 1024);
    }

    #[test]
    fn environment_values_stay_strings() {
        let c = load(&[
            ("MOORLINE_TOKEN_FILE", "0123"),
            ("MOORLINE_ALLOWED_HOSTS", "a.ts.net, b"),
        ])
        .expect("load");
        assert_eq!(c.token_file, Some(PathBuf::from("0123")));
        assert_eq!(c.allowed_hosts, vec!["a.ts.net", "b"]);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_variable() {
        let e = load(&[("MOORLINE_PROT", "1")])
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("prot") && e.contains("MOORLINE_PROT"), "{e}");
        let e = load(&[("AMARRE_PORT", "eighty")])
            .expect_err("bad")
            .to_string();
        assert!(e.contains("port") && e.contains("AMARRE_PORT"), "{e}");
        let e = load(&[("MOORLINE_LIMITS__MAX_SESSIONS", "0")])
            .expect_err("zero")
            .to_string();
        assert!(e.contains("limits.max_sessions"), "{e}");
    }

    #[test]
    fn toml_errors_name_the_key_and_file() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("c.toml");
        std::fs::write(&path, "[limits]\nmax_sesions = 3\n").expect("write");
        let e = Config::load(&Sources {
            file: Some(path),
            ..Sources::default()
        })
        .expect_err("typo")
        .to_string();
        assert!(e.contains("max_sesions") && e.contains("c.toml"), "{e}");
    }

    #[test]
    fn instances_from_amarre_json_including_command_and_agent_path() {
        let c = load(&[(
            "AMARRE_INSTANCES_JSON",
            r#"[{"id":"cat","agent":"command","command":["/bin/cat"],"env":{"N":"0123"}},
                {"id":"alpha","agent":"echo","agentPath":"/opt/echo.sh","env":{}}]"#,
        )])
        .expect("load");
        assert_eq!(c.instances.len(), 2);
        assert_eq!(c.instances[0].command, Some(vec!["/bin/cat".to_owned()]));
        assert_eq!(c.instances[0].env["N"], "0123");
        assert_eq!(
            c.instances[1].agent_path,
            Some(PathBuf::from("/opt/echo.sh"))
        );
    }

    #[test]
    fn amarre_json_errors_use_amarre_wording() {
        for (json, want) in [
            ("{", "invalid JSON"),
            ("[]", "non-empty array"),
            ("[1]", "[0]: not an object"),
            (r#"[{"agent":"echo"}]"#, "[0]: missing 'id'"),
            (r#"[{"id":"a"}]"#, "[0]: missing 'agent'"),
            (
                r#"[{"id":"a","agent":"echo","env":{"X":1}}]"#,
                "instances.0.env.X",
            ),
        ] {
            let e = load(&[("AMARRE_INSTANCES_JSON", json)])
                .expect_err(json)
                .to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn legacy_agent_path_makes_a_default_instance() {
        let c = load(&[("AMARRE_AGENT_PATH", "/opt/agent")]).expect("load");
        assert_eq!(c.instances[0].id, "default");
        assert_eq!(c.instances[0].agent_path, Some(PathBuf::from("/opt/agent")));
    }

    #[test]
    fn non_loopback_needs_an_explicit_opt_in() {
        let e = load(&[("AMARRE_HOST", "0.0.0.0")])
            .expect_err("refused")
            .to_string();
        assert!(e.contains("not a loopback"), "{e}");
        let c = load(&[
            ("MOORLINE_HOST", "0.0.0.0"),
            ("MOORLINE_ALLOW_NON_LOOPBACK", "true"),
        ])
        .expect("allowed");
        assert_eq!(c.host, "0.0.0.0");
        assert!(load(&[("MOORLINE_HOST", "::1")]).is_ok());
    }

    #[test]
    fn host_ports_are_checked() {
        let with = |extra: &str| {
            load(&[(
                "AMARRE_INSTANCES_JSON",
                &format!(r#"[{{"id":"a","agent":"echo"{extra}}}]"#),
            )])
        };
        let c = with(r#","host_ports":[11434, 4000]"#).expect("valid");
        assert_eq!(c.instances[0].network, NetworkMode::Isolated, "the default");
        assert_eq!(
            c.instances[0].runtime_options().host_ports,
            vec![11434, 4000]
        );
        for (extra, want) in [
            (r#","host_ports":[0]"#, "0 is not a port"),
            (r#","host_ports":[70000]"#, "host_ports"),
            (r#","host_ports":[80,80]"#, "listed twice"),
            (
                r#","host_ports":[80],"network":"host""#,
                "only an isolated network",
            ),
            (r#","host_ports":[80],"runtime":"tmux""#, "only containers"),
        ] {
            let e = with(extra).expect_err(extra).to_string();
            assert!(e.contains(want) && e.contains("instances"), "{extra}: {e}");
        }
    }

    #[test]
    fn flags_beat_environment_and_duplicate_ids_are_refused() {
        let mut s = env(&[("MOORLINE_PORT", "9001")]);
        s.overrides.port = Some(9002);
        assert_eq!(Config::load(&s).expect("load").port, 9002);
        let e = load(&[(
            "AMARRE_INSTANCES_JSON",
            r#"[{"id":"a","agent":"echo"},{"id":"a","agent":"echo"}]"#,
        )])
        .expect_err("dup")
        .to_string();
        assert!(e.contains("duplicate"), "{e}");
    }
}

/// A bearer token: kept out of `Debug` output, so it never reaches a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Reads a token file: surrounding whitespace is not part of the token, and an empty file is
/// an error rather than an empty token. Used by the server and by every client.
pub fn read_token_file(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match text.trim() {
        "" => Err(format!("{} is empty", path.display())),
        token => Ok(Secret(token.to_owned())),
    }
}
