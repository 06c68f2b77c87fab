//! Configuration: the only module that reads the process environment.
//!
//! Layers, later ones winning: built-in defaults < TOML file < environment < command-line flags
//! (`sources`, with the environment in `env`). Environment variables are taken as strings and
//! only converted where the target is a number or a boolean, so `MOORLINE_TOKEN_FILE=0123`
//! stays `"0123"`. amarre's variable names are accepted too, so an amarre deployment can switch
//! binaries without touching its unit file. The keys: [`Config`] (top level), [`Limits`],
//! [`RuntimeConfig`] and [`InstanceConfig`], each in its own file.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

mod env;
mod instance;
mod limits;
mod notify;
mod runtime;
mod sources;
mod tailnet;
#[cfg(test)]
mod tests;

pub use instance::{
    InstanceConfig, InstanceRuntime, NetworkMode, RuntimeKind, Unusable, find_program,
};
pub use limits::Limits;
pub use notify::{NotifyConfig, WebhookFormat};
pub use runtime::RuntimeConfig;
pub use sources::{Connection, Overrides, Sources};

/// The commented example configuration, which is also the documentation of every key.
pub const EXAMPLE_CONFIG: &str = include_str!("../../moorline.example.toml");

/// Exit code for configuration errors (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
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
    /// Notifications: when they are sent and through which channels.
    pub notify: NotifyConfig,
    /// What the server's own helper programs (git) take from its environment; filled in when
    /// loading, never from a file or flag.
    #[serde(skip)]
    pub helper_env: HelperEnv,
}

/// The part of the server's environment its own helper programs get (git, for projects):
/// captured by config, the one reader of the environment, and passed down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperEnv {
    /// The server's `PATH`, where git and the programs git runs (`ssh`, its remote helpers)
    /// are found.
    pub path: Option<String>,
    /// The server's temporary directory (`TMPDIR`, else `/tmp`).
    pub temp_dir: PathBuf,
}

/// The server process's own (a configuration built in code, not loaded, still runs git).
impl Default for HelperEnv {
    fn default() -> Self {
        let env = ["PATH", "TMPDIR"]
            .into_iter()
            .filter_map(|k| Some((k.to_owned(), std::env::var(k).ok()?)))
            .collect();
        Self::from_env(&env)
    }
}

impl HelperEnv {
    /// The helpers' environment out of the server's (`env`).
    pub fn from_env(env: &std::collections::BTreeMap<String, String>) -> Self {
        Self {
            path: env.get("PATH").cloned(),
            temp_dir: env
                .get("TMPDIR")
                .filter(|dir| dir.starts_with('/'))
                .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from),
        }
    }
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
            notify: NotifyConfig::default(),
            helper_env: HelperEnv::default(),
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

impl Config {
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
            ("limits.inbound_queue_bytes", l.inbound_queue_bytes),
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
        self.notify.validate()?;
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

    /// Where a session starts when neither the client nor its instance names a directory: the
    /// server's own working directory (`WorkingDirectory=` under systemd; the user's home in
    /// the NixOS module). Read at each use, like a shell's `$PWD`.
    pub fn server_cwd(&self) -> std::io::Result<PathBuf> {
        std::env::current_dir()
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
    pub async fn machine_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if let Ok(host) = nix::unistd::gethostname()
            && let Some(h) = host.to_str()
        {
            names.push(h.to_owned());
        }
        if self.detect_tailnet_names {
            names.extend(tailnet::names("tailscale".as_ref(), tailnet::TIMEOUT).await);
        }
        names
    }
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
