//! `[runtime]`: settings shared by the tmux and runc runtimes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, string_list, string_list_paths};

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
