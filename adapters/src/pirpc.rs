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

/// The message of a pi RPC `message_end` event line (what `get_messages` lists), if `line` is
/// one: what a session's journal holds of its conversation, read back when a run continues it.
pub fn ended_message(line: &[u8]) -> Option<Value> {
    static MARKER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"message_end"));
    MARKER.find(line)?;
    let mut event: Value = serde_json::from_slice(line).ok()?;
    if event["type"] != "message_end" {
        return None;
    }
    Some(event["message"].take()).filter(Value::is_object)
}

/// The conversation as pi's clients see it: every message so far (`get_messages`) and those of
/// the run in flight (`agent_end`), kept in pi's message shapes, and the events announcing them
/// in pi's order. A run (`agent_start` … `agent_end`) holds one or more turns; as in pi, a turn
/// is one assistant response and the tool calls it made, and a response after tool results
/// begins a new turn.
#[derive(Debug, Default)]
pub struct Conversation {
    history: Vec<Value>,
    run: Vec<Value>,
    /// The user message of the run about to start, announced at its start.
    unannounced: Option<Value>,
    /// The last assistant message of the current turn, and the tool results of that turn.
    turn_message: Option<Value>,
    turn_results: Vec<Value>,
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

    /// Takes the messages of the conversation a run continues as its history.
    pub fn restore(&mut self, messages: Vec<Value>) {
        self.history = messages;
    }

    fn record(&mut self, message: Value) {
        self.history.push(message.clone());
        self.run.push(message);
    }

    /// A user message (pi content blocks) was sent to the agent; clients see it when the run
    /// it starts begins.
    pub fn user(&mut self, content: Value) {
        let message = json!({"role": "user", "content": content});
        self.record(message.clone());
        self.unannounced = Some(message);
    }

    /// The agent started working on a prompt: `agent_start`, `turn_start`, and the prompt as
    /// a user message.
    pub fn turn_started(&mut self, out: &mut Outputs) {
        self.turn_message = None;
        self.turn_results.clear();
        out.client_json(&json!({"type": "agent_start"}));
        out.client_json(&json!({"type": "turn_start"}));
        if let Some(message) = self.unannounced.take() {
            out.client_json(&json!({"type": "message_start", "message": message}));
            out.client_json(&json!({"type": "message_end", "message": message}));
        }
    }

    /// The agent started an assistant message (after tool results, in a new turn).
    pub fn message_started(&mut self, out: &mut Outputs) {
        if !self.turn_results.is_empty() {
            self.end_turn(out);
            out.client_json(&json!({"type": "turn_start"}));
        }
        out.client_json(
            &json!({"type": "message_start", "message": {"role": "assistant", "content": []}}),
        );
    }

    /// A streamed piece of the assistant message (`text_delta`, `toolcall_end`, …).
    pub fn message_update(&self, out: &mut Outputs, event: Value) {
        out.client_json(
            &json!({"type": "message_update", "message": {"role": "assistant"},
            "assistantMessageEvent": event}),
        );
    }

    /// The assistant message is complete (`role`, `content`, `model`, `stopReason`).
    pub fn message_ended(&mut self, out: &mut Outputs, message: Value) {
        out.client_json(&json!({"type": "message_end", "message": message}));
        self.record(message.clone());
        self.turn_message = Some(message);
    }

    /// A tool started running.
    pub fn tool_started(&self, out: &mut Outputs, id: &Value, name: &str, args: &Value) {
        out.client_json(&json!({"type": "tool_execution_start", "toolCallId": id,
            "toolName": name, "args": args}));
    }

    /// A tool finished with `text` as its output: `tool_execution_end`, then its result as a
    /// `toolResult` message.
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
        let message = json!({"role": "toolResult", "toolCallId": id, "toolName": name,
            "content": content, "isError": is_error});
        out.client_json(&json!({"type": "message_start", "message": message}));
        out.client_json(&json!({"type": "message_end", "message": message}));
        self.record(message.clone());
        self.turn_results.push(message);
    }

    fn end_turn(&mut self, out: &mut Outputs) {
        out.client_json(&json!({"type": "turn_end",
            "message": self.turn_message.take().unwrap_or(Value::Null),
            "toolResults": std::mem::take(&mut self.turn_results)}));
    }

    /// The run is over (with `error` if it failed): `turn_end`, then `agent_end` with the
    /// run's messages.
    pub fn turn_ended(&mut self, out: &mut Outputs, error: Option<Value>) {
        self.unannounced = None;
        self.end_turn(out);
        let mut end = json!({"type": "agent_end", "messages": std::mem::take(&mut self.run)});
        if let Some(error) = error {
            end["error"] = error;
        }
        out.client_json(&end);
    }

    /// The first steps of a translator with a client line, whatever agent it translates for:
    /// the line parsed as a command; refused if it would run without approval; answered here
    /// if it only reads the conversation. `Some((command, id, type))` when the translator
    /// must act on it.
    pub fn take_command(&self, line: &[u8], out: &mut Outputs) -> Option<(Value, Value, String)> {
        let cmd = parse_command(line, out)?;
        if let Err(rejection) = crate::gate::pi_rpc_command(&cmd)
            && rejection.reason == crate::gate::RUNS_WITHOUT_APPROVAL
        {
            // `bash` and the like would bypass approval in pi; they are never translated.
            crate::gate::refuse_pi_rpc(&cmd, &rejection, out);
            return None;
        }
        let id = cmd["id"].clone();
        let kind = cmd["type"].as_str().unwrap_or("").to_owned();
        if self.answer(out, &id, &kind) {
            return None;
        }
        Some((cmd, id, kind))
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

/// Checks that `frames` (what a client received, in order) follow pi's event order: runs of
/// turns, assistant messages whose content blocks open and close inside them (`text_start` …
/// `text_end` before `message_end`), tools that run after the message that called them and end
/// before their turn does. Frames that are not conversation events (responses, approvals,
/// moorline's own) are skipped. Translators are tested against it, and so is a recording of pi.
pub fn check_event_order(frames: &[Value]) -> Result<(), String> {
    const BLOCK_EVENTS: &[&str] = &[
        "text_start",
        "text_delta",
        "text_end",
        "thinking_start",
        "thinking_delta",
        "thinking_end",
        "toolcall_start",
        "toolcall_delta",
        "toolcall_end",
    ];
    let (mut in_run, mut in_turn) = (false, false);
    // The open message's role, and the content blocks it opened (index, still open).
    let mut open: Option<String> = None;
    let mut blocks: Vec<(Value, bool)> = Vec::new();
    let mut called: Vec<Value> = Vec::new();
    let mut running: Vec<Value> = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let kind = f["type"].as_str().unwrap_or("");
        let fail = |why: &str| Err(format!("frame {i} ({kind}): {why}: {f}"));
        match kind {
            "agent_start" if in_run => return fail("a run is already going"),
            "agent_start" => in_run = true,
            "turn_start" if !in_run || in_turn => return fail("not between turns of a run"),
            "turn_start" => in_turn = true,
            "message_start" if !in_turn || open.is_some() => {
                return fail("not in a turn, or inside another message");
            }
            "message_start" => {
                open = Some(f["message"]["role"].as_str().unwrap_or("").to_owned());
                blocks.clear();
            }
            "message_update" => {
                if open.as_deref() != Some("assistant") {
                    return fail("outside an assistant message");
                }
                let ev = &f["assistantMessageEvent"];
                let ev_kind = ev["type"].as_str().unwrap_or("");
                if !BLOCK_EVENTS.contains(&ev_kind) {
                    return fail("not one of pi's assistant message events");
                }
                let index = &ev["contentIndex"];
                let known = blocks.iter().position(|(b, _)| b == index);
                if ev_kind.ends_with("_start") {
                    if known.is_some() {
                        return fail("content block started twice");
                    }
                    blocks.push((index.clone(), true));
                    continue;
                }
                let Some(k) = known.filter(|k| blocks[*k].1) else {
                    return fail("content block not open");
                };
                if ev_kind.ends_with("_end") {
                    blocks[k].1 = false;
                    if ev_kind == "toolcall_end" {
                        called.push(ev["toolCall"]["id"].clone());
                    }
                }
            }
            "message_end" => {
                if open.as_deref() != f["message"]["role"].as_str() {
                    return fail("ends a message that is not open");
                }
                if blocks.iter().any(|(_, still)| *still) {
                    return fail("content blocks still open");
                }
                for block in f["message"]["content"].as_array().into_iter().flatten() {
                    if block["type"] == "toolCall" && !called.contains(&block["id"]) {
                        called.push(block["id"].clone());
                    }
                }
                open = None;
            }
            "tool_execution_start" => {
                if !in_turn || open.is_some() || !called.contains(&f["toolCallId"]) {
                    return fail("no ended assistant message called this tool in this turn");
                }
                running.push(f["toolCallId"].clone());
            }
            "tool_execution_update" | "tool_execution_end" => {
                let Some(k) = running.iter().position(|r| *r == f["toolCallId"]) else {
                    return fail("tool not running");
                };
                if kind == "tool_execution_end" {
                    running.remove(k);
                }
            }
            "turn_end" => {
                if !in_turn || open.is_some() || !running.is_empty() {
                    return fail("not in a turn, or with a message open or a tool running");
                }
                in_turn = false;
                called.clear();
            }
            "agent_end" => {
                if !in_run || in_turn {
                    return fail("not at the end of a run's last turn");
                }
                in_run = false;
            }
            _ => {}
        }
    }
    if in_run {
        return Err("a run never ended".into());
    }
    Ok(())
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

    /// What pi 0.73.1 itself printed in RPC mode against fixtures' mock model API: a text
    /// reply, then a bash call, its result and the reply to it (fixtures/transcripts/pi-rpc.jsonl).
    #[test]
    fn a_recording_of_pi_follows_pis_event_order() {
        let frames: Vec<Value> = include_str!("../../fixtures/transcripts/pi-rpc.jsonl")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert!(frames.iter().any(|f| f["type"] == "tool_execution_end"));
        check_event_order(&frames).expect("pi's own order");
        let mut shuffled = frames;
        let text_end = shuffled
            .iter()
            .position(|f| f["assistantMessageEvent"]["type"] == "text_end")
            .expect("text_end");
        let moved = shuffled.remove(text_end);
        shuffled.insert(text_end + 1, moved);
        assert!(
            check_event_order(&shuffled).is_err(),
            "text_end after message_end"
        );
    }

    #[test]
    fn a_turn_reports_its_own_messages_and_history_keeps_all() {
        let mut c = Conversation::default();
        let mut out = Outputs::default();
        for text in ["one", "two"] {
            c.user(json!([{"type": "text", "text": text}]));
            c.turn_started(&mut out);
            c.message_started(&mut out);
            c.message_ended(
                &mut out,
                json!({"role": "assistant", "content": [{"type": "text", "text": text.to_uppercase()}]}),
            );
            c.turn_ended(&mut out, None);
        }
        check_event_order(&frames(&out)).expect("pi's order");
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

#[cfg(test)]
mod history_tests {
    use super::*;

    /// What a resumed run's translator is given back: the messages of `message_end` events,
    /// in order; other lines (and look-alikes) are not messages.
    #[test]
    fn ended_messages_are_read_back_and_answer_get_messages() {
        let user = json!({"role": "user", "content": [{"type": "text", "text": "remember X"}]});
        let reply = json!({"role": "assistant", "content": [{"type": "text", "text": "ok"}]});
        let lines = [
            json!({"type": "agent_start"}).to_string(),
            json!({"type": "message_end", "message": user}).to_string(),
            json!({"type": "message_update", "note": "message_end"}).to_string(),
            json!({"type": "message_end", "message": reply}).to_string(),
            "not json, message_end".to_owned(),
        ];
        let messages: Vec<Value> = lines
            .iter()
            .filter_map(|l| ended_message(l.as_bytes()))
            .collect();
        assert_eq!(messages, vec![user.clone(), reply.clone()]);

        let mut conversation = Conversation::default();
        conversation.restore(messages);
        let mut out = Outputs::default();
        assert!(conversation.answer(&mut out, &json!("m"), "get_messages"));
        let answer: Value = serde_json::from_slice(&out.to_clients[0]).expect("json");
        assert_eq!(answer["data"]["messages"], json!([user, reply]));
    }
}
