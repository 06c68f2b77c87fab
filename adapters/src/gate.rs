//! What clients of the `native` dialects may send: the gate that keeps a person's approval
//! between an agent and every tool the instance's approval policy says needs one.
//!
//! In the `native` dialects client lines are the agent's own protocol, which offers far more
//! than prompts and approval answers: switching the permission mode, running a shell command
//! directly, writing configuration. Each adapter's guard therefore lets through an
//! **allow-list** of what a chat client needs, pins the permission-related fields of what it
//! lets through to moorline's policy, and refuses the rest with an `amarre.input_rejected`
//! frame naming the reason (see docs/ADAPTERS.md for the lists). Lines are parsed once and the
//! checked value is what reaches the agent, re-serialised, so the agent can never read a line
//! differently from the guard (duplicate keys, odd escapes).

use serde_json::{Value, json};

use crate::pipeline::Outputs;

/// The line would change the agent's permission mode, approval policy or sandbox.
pub const PERMISSION_CHANGE: &str = "permission_change";
/// The line would run a command, call a tool or write files or configuration with nobody
/// approving it.
pub const RUNS_WITHOUT_APPROVAL: &str = "runs_without_approval";
/// The line is something native clients may not send through moorline.
pub const NOT_ALLOWED: &str = "not_allowed";
/// The line is not JSON.
pub const INVALID_JSON: &str = "invalid_json";
/// The line is JSON but not an object.
pub const NOT_AN_OBJECT: &str = "not_an_object";

/// Why a client line was refused (or changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// One of the reason constants of this module.
    pub reason: &'static str,
    /// A sentence for the person reading it.
    pub error: String,
}

impl Rejection {
    /// A rejection for `reason`.
    pub fn new(reason: &'static str, error: impl Into<String>) -> Self {
        Self {
            reason,
            error: error.into(),
        }
    }

    /// The `amarre.input_rejected` frame clients get: the line did not reach the agent.
    pub fn frame(&self) -> Value {
        json!({"type": "amarre.input_rejected", "reason": self.reason, "error": self.error})
    }

    /// The frame clients get when only part of a line was dropped and the rest forwarded
    /// (`"forwarded": true`).
    pub fn pinned_frame(&self) -> Value {
        let mut frame = self.frame();
        frame["forwarded"] = true.into();
        frame
    }
}

/// What a guard decided about one client line.
#[derive(Debug)]
pub enum Verdict {
    /// Forward this value (possibly pinned), telling clients about any part dropped.
    Forward(Value, Option<Rejection>),
    /// Refuse the line; `reply` is the agent-protocol answer a waiting client expects, if any.
    Refuse(Rejection, Option<Value>),
}

/// Parses a client line as a JSON object; `None` for a blank line.
pub fn parse_object(line: &[u8]) -> Option<Result<Value, Rejection>> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(match serde_json::from_slice::<Value>(line) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(Rejection::new(
            NOT_AN_OBJECT,
            "the agent accepts only JSON objects",
        )),
        Err(e) => Err(Rejection::new(
            INVALID_JSON,
            crate::pirpc::parse_error(line, &e),
        )),
    })
}

/// A native-dialect client line: parsed once, judged by `screen`, the verdict applied; blank
/// lines are ignored and lines that are not JSON objects are refused.
pub fn guard_line(line: &[u8], out: &mut Outputs, screen: impl FnOnce(Value) -> Verdict) {
    match parse_object(line) {
        None => {}
        Some(Err(rejection)) => out.client_json(&rejection.frame()),
        Some(Ok(v)) => apply(screen(v), out),
    }
}

/// Applies a verdict: the forwarded value goes to the agent, rejections and replies to clients.
pub fn apply(verdict: Verdict, out: &mut Outputs) {
    match verdict {
        Verdict::Forward(v, note) => {
            out.agent_json(&v);
            if let Some(note) = note {
                out.client_json(&note.pinned_frame());
            }
        }
        Verdict::Refuse(rejection, reply) => {
            out.client_json(&rejection.frame());
            if let Some(reply) = reply {
                out.client_json(&reply);
            }
        }
    }
}

/// The keys of `params` (an object, or null/absent) that are not in `allowed`.
pub fn unexpected_keys<'a>(params: &'a Value, allowed: &[&str]) -> Vec<&'a str> {
    params
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| !v.is_null() && !allowed.contains(&k.as_str()))
        .map(|(k, _)| k.as_str())
        .collect()
}

/// pi RPC commands a client may send (pi 0.73.1's `--mode rpc`); `bash` (runs a shell command
/// with no tool call, so no approval), `export_html` (writes a file where the client says) and
/// `switch_session` (reads and then appends to a file where the client says) are not among
/// them.
pub const PI_RPC_COMMANDS: &[&str] = &[
    "prompt",
    "steer",
    "follow_up",
    "abort",
    "new_session",
    "get_state",
    "set_model",
    "cycle_model",
    "get_available_models",
    "set_thinking_level",
    "cycle_thinking_level",
    "set_steering_mode",
    "set_follow_up_mode",
    "compact",
    "set_auto_compaction",
    "set_auto_retry",
    "abort_retry",
    "abort_bash",
    "get_session_stats",
    "fork",
    "clone",
    "get_fork_messages",
    "get_last_assistant_text",
    "set_session_name",
    "get_messages",
    "get_commands",
    "extension_ui_response",
];

/// Checks a pi RPC command against [`PI_RPC_COMMANDS`].
pub fn pi_rpc_command(cmd: &Value) -> Result<(), Rejection> {
    let kind = cmd["type"].as_str().unwrap_or("");
    match kind {
        k if PI_RPC_COMMANDS.contains(&k) => Ok(()),
        "bash" => Err(Rejection::new(
            RUNS_WITHOUT_APPROVAL,
            "'bash' runs a shell command without asking anyone; ask the agent in a prompt instead, and approve its tool call",
        )),
        "export_html" | "switch_session" => Err(Rejection::new(
            RUNS_WITHOUT_APPROVAL,
            format!("'{kind}' reads or writes a file of the client's choosing without approval"),
        )),
        other => Err(Rejection::new(
            NOT_ALLOWED,
            format!("'{other}' is not a pi RPC command moorline lets clients send"),
        )),
    }
}

/// Refuses a pi RPC command the way pi answers a failed one, plus `amarre.input_rejected`.
pub fn refuse_pi_rpc(cmd: &Value, rejection: &Rejection, out: &mut Outputs) {
    out.client_json(&rejection.frame());
    let command = cmd["type"].as_str().unwrap_or("");
    crate::pirpc::respond(
        out,
        &cmd["id"],
        command,
        Err(format!("moorline: {}", rejection.error)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pi_rpc_direct_execution_is_refused_and_the_rest_allowed() {
        for bad in ["bash", "export_html", "switch_session"] {
            let err = pi_rpc_command(&json!({"type": bad, "command": "touch x"})).expect_err(bad);
            assert_eq!(err.reason, RUNS_WITHOUT_APPROVAL, "{bad}");
        }
        assert_eq!(
            pi_rpc_command(&json!({"type": "mystery"}))
                .expect_err("unknown")
                .reason,
            NOT_ALLOWED
        );
        for ok in ["prompt", "abort", "extension_ui_response", "get_state"] {
            assert!(pi_rpc_command(&json!({"type": ok})).is_ok(), "{ok}");
        }
        let mut out = Outputs::default();
        let cmd = json!({"id": "b1", "type": "bash", "command": "touch x"});
        refuse_pi_rpc(&cmd, &pi_rpc_command(&cmd).expect_err("bash"), &mut out);
        let frames: Vec<Value> = out
            .to_clients
            .iter()
            .map(|l| serde_json::from_slice(l).expect("json"))
            .collect();
        assert_eq!(frames[0]["type"], "amarre.input_rejected");
        assert_eq!(frames[0]["reason"], RUNS_WITHOUT_APPROVAL);
        assert_eq!(
            (frames[1]["id"].as_str(), frames[1]["success"].as_bool()),
            (Some("b1"), Some(false))
        );
        assert!(out.to_agent.is_empty());
    }

    #[test]
    fn lines_that_are_not_objects_are_refused_and_blank_ones_ignored() {
        assert!(parse_object(b"  ").is_none());
        assert_eq!(
            parse_object(b"[1]").and_then(Result::err).map(|r| r.reason),
            Some(NOT_AN_OBJECT)
        );
        assert_eq!(
            parse_object(b"{oops")
                .and_then(Result::err)
                .map(|r| r.reason),
            Some(INVALID_JSON)
        );
        // A lone surrogate that JavaScript would accept cannot slip past unparsed.
        assert_eq!(
            parse_object(br#"{"type":"bash","x":"\ud800"}"#)
                .and_then(Result::err)
                .map(|r| r.reason),
            Some(INVALID_JSON)
        );
    }
}
