//! Which environment variables a client may give an agent.
//!
//! An instance's `allowed_env` says what its clients may set. Whatever it says, variables that
//! change *what code runs* (loaders, shells, interpreters, build tools, git, editors), *where
//! trusted code and configuration come from* (config homes, package indexes, certificates,
//! proxies) or where a program writes what it should not (trace and key-log files, the
//! temporary directory) are refused: with them a client could run code in the agent's
//! workspace that no approval ever saw, or read its traffic. Names and values are checked
//! before anything starts, so a bad request is a 400, never a crashed session.

use std::collections::BTreeMap;

use crate::config::Limits;

/// Refused whatever `allowed_env` says. Entries ending in `*` are prefixes. Keep the table in
/// docs/RUNTIME.md ("Client environment") in step.
pub(crate) const PROTECTED: &[&str] = &[
    // The dynamic loader and libc: preloaded libraries, other modules, tunables.
    "LD_*",
    "DYLD_*",
    "GCONV_PATH",
    "GLIBC_TUNABLES",
    "MALLOC_*",
    "LOCPATH",
    "NLSPATH",
    "HOSTALIASES",
    "RES_OPTIONS",
    "LOCALDOMAIN",
    // Where programs and files are found.
    "PATH",
    "HOME",
    "SHELL",
    "TMPDIR",
    "TMP",
    "TEMP",
    "TEMPDIR",
    "XDG_*",
    "CDPATH",
    // Shells: startup files, exported functions, prompts (expanded, so they run commands),
    // options.
    "BASH_ENV",
    "ENV",
    "BASH_FUNC_*",
    "BASHOPTS",
    "SHELLOPTS",
    "PROMPT_COMMAND",
    "PS1",
    "PS2",
    "PS3",
    "PS4",
    "IFS",
    "ZDOTDIR",
    "INPUTRC",
    // Interpreters and runtimes: options, module paths, startup code.
    "NODE_*",
    "NPM_CONFIG_*",
    "npm_config_*",
    "PYTHON*",
    "PIP_*",
    "PERL*",
    "RUBY*",
    "GEM_*",
    "BUNDLE_*",
    "JAVA_*",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "CLASSPATH",
    "LUA_*",
    "TCLLIBPATH",
    "PHPRC",
    "PHP_INI_SCAN_DIR",
    "DOTNET_*",
    "CORECLR_*",
    "COMPlus_*",
    "ELECTRON_*",
    // Build tools: which compiler runs, with which plugins.
    "CC",
    "CXX",
    "CPP",
    "LD",
    "AR",
    "CFLAGS",
    "CXXFLAGS",
    "CPPFLAGS",
    "LDFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    "CARGO_*",
    "RUSTC*",
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "RUSTUP_*",
    "GOFLAGS",
    "GOTOOLCHAIN",
    "GOPROXY",
    "GOSUMDB",
    "GONOSUMDB",
    "GOINSECURE",
    "GOENV",
    // git reads dozens of variables that point it at other repositories, configuration,
    // hooks and programs (GIT_CONFIG_*, GIT_SSH_COMMAND, GIT_EXEC_PATH, GIT_DIR, ...): all of
    // them are refused except the author and committer identity (see GIT_ALLOWED).
    "GIT_*",
    // Programs other programs run.
    "EDITOR",
    "VISUAL",
    "PAGER",
    "MANPAGER",
    "BROWSER",
    "LESSOPEN",
    "LESSCLOSE",
    "LESSKEY",
    "SUDO_ASKPASS",
    "SSH_*",
    // Trust and traffic: certificates, proxies, key logs.
    "SSL_*",
    "SSLKEYLOGFILE",
    "CURL_CA_BUNDLE",
    "CURL_HOME",
    "REQUESTS_CA_BUNDLE",
    "WGETRC",
    "GNUPGHOME",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "FTP_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "ftp_proxy",
];

/// The git variables a client may set (when `allowed_env` allows them): identity only.
pub(crate) const GIT_ALLOWED: &[&str] = &[
    "GIT_AUTHOR_NAME",
    "GIT_AUTHOR_EMAIL",
    "GIT_AUTHOR_DATE",
    "GIT_COMMITTER_NAME",
    "GIT_COMMITTER_EMAIL",
    "GIT_COMMITTER_DATE",
];

/// Why a variable is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The variable (as sent, shortened if it was very long).
    pub key: String,
    /// Why, in words.
    pub reason: String,
}

/// Whether `key` is one of the variables no client may set.
pub(crate) fn protected(key: &str, adapter_protected: &[&str]) -> bool {
    (moorline_adapters::env_matches(key, PROTECTED) && !GIT_ALLOWED.contains(&key))
        || moorline_adapters::env_matches(key, adapter_protected)
}

/// Checks a client's environment: size, names, values, the protected list, then the
/// instance's `allowed_env`.
pub(crate) fn check(
    env: &BTreeMap<String, String>,
    limits: &Limits,
    adapter_protected: &[&str],
    allowed: &[String],
    instance_id: &str,
) -> Result<(), Refusal> {
    if env.len() > limits.max_env_vars {
        return Err(Refusal {
            key: String::new(),
            reason: format!(
                "{} variables given; at most {} are accepted (limits.max_env_vars)",
                env.len(),
                limits.max_env_vars
            ),
        });
    }
    for (key, value) in env {
        let refuse = |reason: String| Refusal {
            key: shorten(key),
            reason,
        };
        if key.len() > limits.max_env_name_bytes {
            return Err(refuse(format!(
                "a name may be at most {} bytes (limits.max_env_name_bytes)",
                limits.max_env_name_bytes
            )));
        }
        if !valid_name(key) {
            return Err(refuse(
                "a name must be a letter or `_` followed by letters, digits and `_`".into(),
            ));
        }
        if value.len() > limits.max_env_value_bytes {
            return Err(refuse(format!(
                "{key}: a value may be at most {} bytes (limits.max_env_value_bytes)",
                limits.max_env_value_bytes
            )));
        }
        if value.contains('\0') {
            return Err(refuse(format!(
                "{key}: a value must not contain a NUL byte"
            )));
        }
        if protected(key, adapter_protected) {
            return Err(refuse(format!(
                "{key} would change what code the agent runs, where it finds it, or switch off its \
                 permission gate; it is never accepted from clients"
            )));
        }
        if !moorline_adapters::env_matches(key, allowed) {
            return Err(refuse(format!(
                "instance {instance_id:?} does not let clients set {key} (see allowed_env)"
            )));
        }
    }
    Ok(())
}

/// `[A-Za-z_][A-Za-z0-9_]*`: what every shell can export, and nothing a program could
/// misparse (`=`, `%`, NUL, spaces).
fn valid_name(key: &str) -> bool {
    let mut bytes = key.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A name fit to echo back in an error.
fn shorten(key: &str) -> String {
    if key.len() <= 256 {
        return key.to_owned();
    }
    let mut end = 256;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &key[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_one(key: &str, value: &str, allowed: &[&str]) -> Result<(), Refusal> {
        let allowed: Vec<String> = allowed.iter().map(|s| (*s).to_owned()).collect();
        let env = BTreeMap::from([(key.to_owned(), value.to_owned())]);
        check(&env, &Limits::default(), &[], &allowed, "i")
    }

    #[test]
    fn code_changing_variables_are_refused_even_with_a_wildcard() {
        for key in [
            "BASH_FUNC_x%%",
            "GCONV_PATH",
            "GLIBC_TUNABLES",
            "PERL5OPT",
            "RUBYOPT",
            "JAVA_TOOL_OPTIONS",
            "GIT_CONFIG_COUNT",
            "GIT_CONFIG_KEY_0",
            "GIT_SSH_COMMAND",
            "GIT_EXEC_PATH",
            "SSL_CERT_FILE",
            "HTTPS_PROXY",
            "https_proxy",
            "TMPDIR",
            "PROMPT_COMMAND",
            "LD_PRELOAD",
            "NODE_OPTIONS",
            "PYTHONSTARTUP",
        ] {
            let err = check_one(key, "x", &["*"]).expect_err(key);
            assert_eq!(err.key, key);
        }
        assert!(check_one("GIT_AUTHOR_NAME", "a", &["GIT_*"]).is_ok());
        assert!(check_one("GIT_CONFIG_GLOBAL", "/x", &["GIT_*"]).is_err());
        assert!(check_one("FROM_X", "ok", &["*"]).is_ok());
    }

    #[test]
    fn names_values_and_sizes_are_checked() {
        assert!(check_one("A=B", "x", &["*"]).is_err());
        assert!(check_one("1A", "x", &["*"]).is_err());
        assert!(check_one("", "x", &["*"]).is_err());
        assert!(check_one("A", "x\0y", &["*"]).is_err());
        assert!(check_one("A", &"x".repeat(40_000), &["*"]).is_err());
        assert!(check_one(&"A".repeat(200), "x", &["*"]).is_err());
        let many: BTreeMap<String, String> =
            (0..65).map(|i| (format!("V{i}"), String::new())).collect();
        assert!(check(&many, &Limits::default(), &[], &["*".into()], "i").is_err());
    }
}
