//! The client side of the `pi-rpc` dialect, for translators that speak it on behalf of agents
//! that do not (Claude Code, Codex): parsing commands, answering them, and the conversation
//! events and record pi's clients expect. Sharing it keeps every translated agent looking the
//! same to a client.

use serde_json::{Value, json};

use crate::pipeline::Outputs;
use crate::{AdapterConfig, AdapterError};

/// Whether an instance of `kind` wants its clients to speak pi-rpc (`dialect = "pi-rpc"`, the
/// default) rather than the agent's own protocol (`"native"`).
pub fn wants_pi_rpc(config: &AdapterConfig, kind: &str) -> Result<bool, AdapterError> {
    match config.dialect.as_deref() {
        None | Some("pi-rpc") => Ok(true),
        Some("native") => Ok(false),
        Some(other) => Err(AdapterError::Config(format!(
            "{kind} dialect {other:?}: use \"native\" or \"pi-rpc\""
        ))),
    }
}

/// Longest approval message shown to a user, in characters.
const CONFIRM_MESSAGE_CHARS: usize = 400;

/// Answers a client command: `Ok(data)` is a success (with `data` if any), `Err` a failure.
pub fn respond(
    out: &mut Outputs,
    id: &Value,
    command: &str,
    result: Result<Option<Value>, String>,
) {
    let mut r = json!({"type": "response", "command": command, "success": result.is_ok()});
    if !id.is_null() {
        r["id"] = id.clone();
    }
    match result {
        Ok(Some(data)) => r["data"] = data,
        Ok(None) => {}
        Err(error) => r["error"] = error.into(),
    }
    out.client_json(&r);
}

/// Parses a client line into a command object. Blank lines are ignored; anything else that is
/// not a JSON object is answered with a `parse` failure, as pi does. `None` if there is no
/// command to act on.
pub fn parse_command(line: &[u8], out: &mut Outputs) -> Option<Value> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let error = match serde_json::from_slice(line) {
        Ok(v @ Value::Object(_)) => return Some(v),
        Ok(_) => "Failed to parse command: not a JSON object".to_owned(),
        Err(e) => parse_error(line, &e),
    };
    respond(out, &Value::Null, "parse", Err(error));
    None
}

/// A parse error with the start of the offending line, for a client to find its mistake.
pub fn parse_error(line: &[u8], e: &serde_json::Error) -> String {
    let preview: String = String::from_utf8_lossy(line).chars().take(80).collect();
    format!("Failed to parse command: {e} (in {preview:?})")
}

/// Asks clients to approve a tool call: pi's `confirm` dialog, titled with the tool and showing
/// what it would do (shortened).
pub fn confirm_request(out: &mut Outputs, id: &str, tool: &str, detail: &Value) {
    let mut message = detail.to_string();
    if message.chars().count() > CONFIRM_MESSAGE_CHARS {
        message = message
            .chars()
            .take(CONFIRM_MESSAGE_CHARS - 1)
            .collect::<String>()
            + "…";
    }
    out.client_json(
        &json!({"type": "extension_ui_request", "id": id, "method": "confirm",
        "title": format!("Run {tool}?"), "message": message}),
    );
}

/// The `unknown command` answer.
pub fn unsupported(out: &mut Outputs, id: &Value, agent: &str, command: &str) {
    let error = format!("{agent} (pi-rpc dialect) does not support '{command}'");
    respond(out, id, command, Err(error));
}

/// The conversation as pi's clients see it: every message so far (`get_messages`) and those of
/// the turn in flight (`agent_end`), kept in pi's message shapes.
#[derive(Debug, Default)]
pub struct Conversation {
    history: Vec<Value>,
    turn: Vec<Value>,
}

impl Conversation {
    /// Messages so far.
    pub fn len(&self) -> usize {
        self.history.len()
    }

    /// True before the first message.
    pub fn is_empty(&self) -> bool {
        self.history.is_empty()
    }

    fn record(&mut self, message: Value) {
        self.history.push(message.clone());
        self.turn.push(message);
    }

    /// A user message (pi content blocks) was sent to the agent.
    pub fn user(&mut self, content: Value) {
        self.record(json!({"role": "user", "content": content}));
    }

    /// The agent started working on a prompt.
    pub fn turn_started(&self, out: &mut Outputs) {
        out.client_json(&json!({"type": "agent_start"}));
        out.client_json(&json!({"type": "turn_start"}));
    }

    /// The agent started an assistant message.
    pub fn message_started(&self, out: &mut Outputs) {
        out.client_json(
            &json!({"type": "message_start", "message": {"role": "assistant", "content": []}}),
        );
    }

    /// A streamed piece of the assistant message (`text_delta`, `toolcall_start`, …).
    pub fn message_update(&self, out: &mut Outputs, event: Value) {
        out.client_json(
            &json!({"type": "message_update", "message": {"role": "assistant"},
            "assistantMessageEvent": event}),
        );
    }

    /// The assistant message is complete (`role`, `content`, `model`).
    pub fn message_ended(&mut self, out: &mut Outputs, message: Value) {
        out.client_json(&json!({"type": "message_end", "message": message}));
        self.record(message);
    }

    /// A tool started running.
    pub fn tool_started(&self, out: &mut Outputs, id: &Value, name: &str, args: &Value) {
        out.client_json(&json!({"type": "tool_execution_start", "toolCallId": id,
            "toolName": name, "args": args}));
    }

    /// A tool finished with `text` as its output.
    pub fn tool_ended(
        &mut self,
        out: &mut Outputs,
        id: &Value,
        name: &str,
        text: &str,
        is_error: bool,
    ) {
        let content = json!([{"type": "text", "text": text}]);
        out.client_json(&json!({"type": "tool_execution_end", "toolCallId": id,
            "toolName": name, "result": {"content": content}, "isError": is_error}));
        self.record(
            json!({"role": "toolResult", "toolCallId": id, "toolName": name,
            "content": content, "isError": is_error}),
        );
    }

    /// The turn is over (with `error` if it failed): `turn_end`, then `agent_end` with the
    /// turn's messages.
    pub fn turn_ended(&mut self, out: &mut Outputs, error: Option<Value>) {
        out.client_json(
            &json!({"type": "turn_end", "message": self.turn.last().cloned().unwrap_or(Value::Null)}),
        );
        let mut end = json!({"type": "agent_end", "messages": std::mem::take(&mut self.turn)});
        if let Some(error) = error {
            end["error"] = error;
        }
        out.client_json(&end);
    }

    /// Answers the commands that only read the conversation; false if `command` is not one.
    pub fn answer(&self, out: &mut Outputs, id: &Value, command: &str) -> bool {
        let data = match command {
            "get_messages" => json!({"messages": self.history}),
            "get_last_assistant_text" => {
                let text = self
                    .history
                    .iter()
                    .rev()
                    .find(|m| m["role"] == "assistant")
                    .map(|m| {
                        m["content"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|b| b["text"].as_str())
                            .collect::<String>()
                    });
                json!({"text": text})
            }
            _ => return false,
        };
        respond(out, id, command, Ok(Some(data)));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(out: &Outputs) -> Vec<Value> {
        out.to_clients
            .iter()
            .map(|l| serde_json::from_slice(l).expect("json"))
            .collect()
    }

    #[test]
    fn bad_commands_get_a_parse_failure_and_blank_lines_nothing() {
        let mut out = Outputs::default();
        assert!(parse_command(b"  ", &mut out).is_none());
        assert!(out.to_clients.is_empty());
        assert!(parse_command(b"[1]", &mut out).is_none());
        assert!(parse_command(b"{oops", &mut out).is_none());
        let got = frames(&out);
        assert_eq!(got.len(), 2);
        assert!(
            got.iter()
                .all(|f| f["command"] == "parse" && f["success"] == false)
        );
        assert!(got[1]["error"].as_str().expect("error").contains("{oops"));
        assert_eq!(
            parse_command(br#"{"type":"abort"}"#, &mut out),
            Some(json!({"type": "abort"}))
        );
    }

    #[test]
    fn long_approval_messages_are_shortened() {
        let mut out = Outputs::default();
        confirm_request(
            &mut out,
            "r1",
            "bash",
            &json!({"command": "x".repeat(1000)}),
        );
        let frame = &frames(&out)[0];
        assert_eq!(frame["title"], "Run bash?");
        let message = frame["message"].as_str().expect("message");
        assert_eq!(message.chars().count(), CONFIRM_MESSAGE_CHARS);
        assert!(message.ends_with('…'));
    }

    #[test]
    fn a_turn_reports_its_own_messages_and_history_keeps_all() {
        let mut c = Conversation::default();
        let mut out = Outputs::default();
        for text in ["one", "two"] {
            c.user(json!([{"type": "text", "text": text}]));
            c.message_ended(
                &mut out,
                json!({"role": "assistant", "content": [{"type": "text", "text": text.to_uppercase()}]}),
            );
            c.turn_ended(&mut out, None);
        }
        let ends: Vec<Value> = frames(&out)
            .into_iter()
            .filter(|f| f["type"] == "agent_end")
            .collect();
        assert_eq!(ends[1]["messages"].as_array().map(Vec::len), Some(2));
        assert_eq!(c.len(), 4);
        let mut out = Outputs::default();
        assert!(c.answer(&mut out, &json!(7), "get_last_assistant_text"));
        assert!(!c.answer(&mut out, &json!(8), "prompt"));
        let answer = &frames(&out)[0];
        assert_eq!(answer["id"], 7);
        assert_eq!(answer["data"]["text"], "TWO");
    }
}
