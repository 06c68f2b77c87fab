//! Where configuration comes from: the captured environment, the file and the flags, merged
//! as figment layers (defaults < TOML < environment < flags) into a [`Config`].

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Serialize;

use super::{Config, ConfigError, InstanceConfig, LogFormat, env};

/// Values given on the command line (the top layer): the flags of `moorline serve` and
/// `check-config`, given to figment as they are (unset ones left out).
#[derive(Debug, Clone, Default, Serialize, clap::Args)]
pub struct Overrides {
    /// Address to listen on.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Port to listen on.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Where sessions are stored.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// File holding the bearer token clients must send.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Allow listening on a non-loopback address.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_non_loopback: bool,
}

/// Where the client commands (`moorline sessions`, `attach`, …) find the server. clap reads
/// the flags and, in their absence, the variables; declared here so every environment
/// variable moorline reads is named in this module.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// The server's URL: http://HOST:PORT, https://NAME, or unix:/PATH/TO/SOCKET.
    #[arg(
        long,
        env = "MOORLINE_URL",
        default_value = "http://127.0.0.1:8341",
        global = true
    )]
    pub url: String,
    /// File holding the bearer token.
    #[arg(long, env = "MOORLINE_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
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
        let defaults = to_dict(&defaults, "internal: defaults")?;
        let mut figment = Figment::new().merge(Layer::new("defaults", defaults));
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
        for variable in env::variables(&sources.env)? {
            figment = figment.merge(variable);
        }
        let flags = to_dict(&sources.overrides, "command-line flags")?;
        figment = figment.merge(Layer::new("command-line flags", flags));
        let mut config: Config = figment.extract_lossy().map_err(describe)?;
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
        config.helper_env = super::HelperEnv::from_env(&sources.env);
        config.validate()?;
        Ok(config)
    }
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

/// `value` as a figment dictionary (`what` names it in the error).
fn to_dict(value: &impl Serialize, what: &str) -> Result<Dict, ConfigError> {
    match Value::serialize(value) {
        Ok(Value::Dict(_, dict)) => Ok(dict),
        Ok(_) => Err(ConfigError::new(format!("{what}: not a table"))),
        Err(e) => Err(ConfigError::new(format!("{what}: {e}"))),
    }
}

/// Turns figment's error into one message per problem, naming the key and its source: the
/// file, the variable (each is a provider named after itself) or the flags.
fn describe(err: figment::Error) -> ConfigError {
    let lines: Vec<String> = err
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let from = match &e.metadata {
                Some(m) => match &m.source {
                    Some(src) => format!(" (in {} {src})", m.name),
                    None => format!(" (from {})", m.name),
                },
                None => String::new(),
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
