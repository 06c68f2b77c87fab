//! The environment layer: `MOORLINE_<KEY>` and `MOORLINE_<TABLE>__<KEY>` for every key, and
//! amarre's `AMARRE_*` names, as figment providers over the environment [`Sources`] captured.
//!
//! Each variable is its own provider, named after the variable, so figment's errors say which
//! variable set a bad value, and later providers win (a `MOORLINE_*` name beats amarre's).
//! Values stay strings: figment turns them into numbers or booleans only where the key wants
//! one (`extract_lossy`), so `MOORLINE_TOKEN_FILE=0123` stays `"0123"` and
//! `MOORLINE_ALLOWED_HOSTS=[a]` is a host name, not a list. figment's own `Env` provider is not
//! used because it parses every value (`0123` becomes `123`) and reads the live process
//! environment, where loading must see only what [`Sources`] captured (`check-config --no-env`,
//! tests).
//!
//! [`Sources`]: super::Sources

use std::collections::BTreeMap;

use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};

use super::ConfigError;

/// Environment variables with the `MOORLINE_` prefix that are not configuration keys.
const RESERVED: &[&str] = &["MOORLINE_CONFIG", "MOORLINE_URL"];

/// amarre's variables that name one key each.
const AMARRE_KEYS: &[(&str, &str)] = &[
    ("AMARRE_HOST", "host"),
    ("AMARRE_PORT", "port"),
    ("AMARRE_MAX_SESSIONS", "limits.max_sessions"),
    ("AMARRE_PUSH_TOKENS_PATH", "notify.expo_tokens_path"),
    ("AMARRE_PUSH_GRACE_MS", "notify.grace_ms"),
    ("AMARRE_PUSH_EXPO_URL", "notify.expo_url"),
];

/// One variable's contribution: its value at its key.
#[derive(Debug)]
pub(super) struct Variable {
    name: String,
    dict: Dict,
}

impl Variable {
    fn new(name: &str, key: &str, value: Value) -> Self {
        let dict = figment::util::nest(key, value)
            .into_dict()
            .unwrap_or_default();
        Self {
            name: name.to_owned(),
            dict,
        }
    }
}

impl Provider for Variable {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// The providers of the environment `env`, in the order they are to be merged.
pub(super) fn variables(env: &BTreeMap<String, String>) -> Result<Vec<Variable>, ConfigError> {
    // amarre's names first, so that MOORLINE_* wins when both are set.
    let mut out: Vec<Variable> = AMARRE_KEYS
        .iter()
        .filter_map(|(var, key)| Some(Variable::new(var, key, env.get(*var)?.clone().into())))
        .collect();
    out.extend(amarre_instances(env)?);
    for (var, value) in env {
        let Some(rest) = var.strip_prefix("MOORLINE_") else {
            continue;
        };
        if RESERVED.contains(&var.as_str()) {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        // An empty part, or a dot (figment's key separator), names no key.
        if path.iter().any(|p| p.is_empty() || p.contains('.')) {
            return Err(ConfigError::new(format!("{var}: malformed variable name")));
        }
        out.push(Variable::new(var, &path.join("."), value.clone().into()));
    }
    Ok(out)
}

/// The `instances` amarre's variables describe: `AMARRE_INSTANCES_JSON`, or the legacy
/// single-agent `AMARRE_AGENT` / `AMARRE_AGENT_PATH`, which make one instance named `default`.
fn amarre_instances(env: &BTreeMap<String, String>) -> Result<Option<Variable>, ConfigError> {
    const JSON: &str = "AMARRE_INSTANCES_JSON";
    if let Some(json) = env.get(JSON) {
        return Ok(Some(Variable::new(
            JSON,
            "instances",
            instances_json(json)?,
        )));
    }
    let agent = env.get("AMARRE_AGENT");
    let path = env.get("AMARRE_AGENT_PATH");
    if agent.is_none() && path.is_none() {
        return Ok(None);
    }
    let mut inst = Dict::new();
    inst.insert("id".into(), "default".into());
    inst.insert(
        "agent".into(),
        agent.cloned().unwrap_or_else(|| "pi".into()).into(),
    );
    if let Some(path) = path {
        inst.insert("agent_path".into(), path.clone().into());
    }
    let var = if path.is_some() {
        "AMARRE_AGENT_PATH"
    } else {
        "AMARRE_AGENT"
    };
    Ok(Some(Variable::new(
        var,
        "instances",
        Value::from(vec![Value::from(inst)]),
    )))
}

/// Parses `AMARRE_INSTANCES_JSON` with amarre's error messages.
fn instances_json(json: &str) -> Result<Value, ConfigError> {
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
