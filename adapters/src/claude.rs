//! Claude Code (`@anthropic-ai/claude-code`) in stream-json mode.
//!
//! Launched as `claude -p --input-format stream-json --output-format stream-json --verbose
//! --include-partial-messages --permission-prompt-tool stdio --setting-sources ""`: every
//! permission prompt becomes a `control_request` (`can_use_tool`) on stdout, answered with a
//! `control_response` on stdin, instead of `--dangerously-skip-permissions`. No settings file
//! (user, project or local) is read, so a repository cannot pre-approve tools for itself.
//!
//! Two client dialects:
//! - `native`: Claude's own stream-json through [`NativeGuard`]'s allow-list (no permission
//!   mode but `default`, no `bash_command`, …); approvals are `control_request` /
//!   `control_response`;
//! - `pi-rpc`: translated both ways by [`PiRpcTranslator`], so the clients that drive pi (amarre's
//!   Expo app among them) drive Claude alike.
//!
//! Claude exits on the first malformed stdin line: in both dialects a line that is not a JSON
//! object never reaches it; the client gets an error instead.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};

use crate::conversation::{self as conv, Continuation, ConversationPlace};
use crate::gate::{self, Rejection, Verdict};
use crate::pipeline::{Decision, Dialect, Outputs, Translator, claude_permission_answer};
use crate::pirpc::{self, Conversation};
use crate::{Adapter, AdapterConfig, AdapterError, LaunchContext, LaunchSettings, LaunchSpec};

/// Launches Claude Code.
#[derive(Debug, Clone)]
pub struct ClaudeAdapter {
    launch: LaunchSettings,
    /// Clients speak pi-rpc rather than the agent's own protocol.
    pi_rpc: bool,
    /// What this start does with the conversation.
    continuation: Continuation,
}

impl ClaudeAdapter {
    /// A Claude Code adapter for an instance (`dialect`: `pi-rpc`, the default, or `native`).
    pub fn new(config: &AdapterConfig) -> Result<Self, AdapterError> {
        Ok(Self {
            launch: LaunchSettings::new(config, "claude"),
            pi_rpc: pirpc::wants_pi_rpc(config, "claude-code")?,
            continuation: config.continuation.clone(),
        })
    }
}

impl Adapter for ClaudeAdapter {
    fn name(&self) -> &str {
        "claude-code"
    }

    fn launch(&self, ctx: &LaunchContext<'_>) -> Result<LaunchSpec, AdapterError> {
        let mut args: Vec<String> = [
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--include-partial-messages",
            "--permission-mode",
            PERMISSION_MODE,
            "--permission-prompt-tool",
            "stdio",
            "--setting-sources",
            "",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        if let Some(m) = &self.launch.model {
            args.extend(["--model".into(), m.clone()]);
        }
        // Claude keeps its conversation under the id it is given: continue it, or name the
        // new one so the next start can find it.
        let conversation = match (&self.continuation.resume, &self.continuation.fresh_id) {
            (Some(id), _) => {
                args.extend(["--resume".into(), id.clone()]);
                Some(id.clone())
            }
            (None, Some(id)) => {
                args.extend(["--session-id".into(), id.clone()]);
                Some(id.clone())
            }
            (None, None) => None,
        };
        args.extend(self.launch.args.iter().cloned());
        let mut env = ctx.env.clone();
        for (k, v) in [
            ("DISABLE_TELEMETRY", "1"),
            ("DISABLE_AUTOUPDATER", "1"),
            ("DISABLE_ERROR_REPORTING", "1"),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
        ] {
            env.insert(k.into(), v.into());
        }
        if let Some(url) = &self.launch.base_url {
            env.insert("ANTHROPIC_BASE_URL".into(), url.clone());
        }
        Ok(LaunchSpec {
            program: self.launch.program.clone(),
            args,
            env,
            files: Vec::new(),
            conversation,
        })
    }

    fn dialect(&self) -> Dialect {
        if self.pi_rpc {
            Dialect::PiRpc
        } else {
            Dialect::ClaudeNative
        }
    }

    fn translator(&self) -> Box<dyn Translator> {
        if self.pi_rpc {
            Box::new(PiRpcTranslator::new(self.launch.model.clone()))
        } else {
            Box::new(NativeGuard)
        }
    }

    fn protected_env(&self) -> &'static [&'static str] {
        // Another API endpoint, key or configuration directory, or permission settings.
        &["ANTHROPIC_*", "CLAUDE_*", "DISABLE_*"]
    }

    /// Claude writes its transcript, once the conversation has a message, to
    /// `$HOME/.claude/projects/<the cwd, spelled with dashes>/<id>.jsonl`; without it,
    /// `--resume` fails.
    fn find_conversation(&self, place: &ConversationPlace<'_>) -> Result<Option<String>, String> {
        let Some(id) = place.recorded else {
            return Ok(None);
        };
        if !conv::plain_id(id) {
            return Err(format!(
                "the recorded conversation id {id:?} is not Claude Code's"
            ));
        }
        let Some(home) = place.home else {
            return Err("the agent's home directory is not known".into());
        };
        let projects = home.join(".claude").join("projects");
        let file = format!("{id}.jsonl");
        let found = std::fs::read_dir(&projects).ok().is_some_and(|dirs| {
            dirs.flatten()
                .any(|d| std::fs::symlink_metadata(d.path().join(&file)).is_ok_and(|m| m.is_file()))
        });
        if found {
            Ok(Some(id.to_owned()))
        } else {
            Err(format!(
                "Claude Code's transcript of conversation {id} is not in {} (Claude writes it \
                 with the first message; or it was removed)",
                projects.display()
            ))
        }
    }
}

/// The permission mode Claude is launched in, and the only one clients may set (`manual` is
/// Claude's other name for it).
pub const PERMISSION_MODE: &str = "default";
const PERMISSION_MODE_ALIAS: &str = "manual";

/// Slash commands a `native` client may put at the start of a user message: the others change
/// settings, directories, MCP servers or permissions, or run workflows.
pub const SLASH_COMMANDS: &[&str] = &[
    "compact", "clear", "context", "cost", "usage", "model", "effort", "rename", "recap",
];

/// `initialize` fields a `native` client may set; hooks (whose answers can allow a tool
/// outright), SDK MCP servers, agents, skills, plugins and the rest are refused.
pub const INITIALIZE_KEYS: &[&str] = &[
    "subtype",
    "jsonSchema",
    "systemPrompt",
    "appendSystemPrompt",
    "title",
    "promptSuggestions",
    "agentProgressSummaries",
    "forwardSubagentText",
];

/// The `native` dialect: Claude's stream-json, through an allow-list (see [`crate::gate`]).
/// Clients may send user messages (no slash commands but [`SLASH_COMMANDS`]),
/// `control_response` answers (without `updatedPermissions`, which would add standing
/// permission rules or switch the mode), `keep_alive`, `control_cancel_request`, and the
/// control requests `interrupt`, `set_model`, `set_permission_mode` to [`PERMISSION_MODE`] and
/// a plain `initialize`. Everything else, `bash_command` first (Claude runs it with no
/// permission check), is answered with `amarre.input_rejected` and never reaches Claude, and so
/// are lines Claude would die on (not JSON objects).
#[derive(Debug, Default, Clone, Copy)]
pub struct NativeGuard;

impl NativeGuard {
    /// Decides what happens to one parsed client line.
    pub fn screen(mut v: Value) -> Verdict {
        let refuse = |reason, error: String| Verdict::Refuse(Rejection::new(reason, error), None);
        match v["type"].as_str().unwrap_or("") {
            "user" => {
                if v["message"]["role"] != "user" {
                    return refuse(
                        gate::NOT_ALLOWED,
                        "a user message needs \"message\": {\"role\": \"user\", …}".into(),
                    );
                }
                match slash_command(&v["message"]["content"]) {
                    Some(cmd) if !SLASH_COMMANDS.contains(&cmd) => refuse(
                        gate::NOT_ALLOWED,
                        format!(
                            "the slash command /{cmd} is not allowed through moorline (allowed: /{})",
                            SLASH_COMMANDS.join(", /")
                        ),
                    ),
                    _ => Verdict::Forward(v, None),
                }
            }
            "control_response" => {
                let answer = &mut v["response"]["response"];
                let note = answer
                    .as_object_mut()
                    .and_then(|a| a.remove("updatedPermissions"))
                    .filter(|p| !p.is_null())
                    .map(|_| {
                        Rejection::new(
                            gate::PERMISSION_CHANGE,
                            "updatedPermissions was removed from the answer (moorline asks for every tool call); the answer itself was forwarded",
                        )
                    });
                Verdict::Forward(v, note)
            }
            "keep_alive" | "control_cancel_request" => Verdict::Forward(v, None),
            "control_request" => Self::control_request(v),
            "bash_command" => refuse(
                gate::RUNS_WITHOUT_APPROVAL,
                "bash_command runs a shell command with no permission check; ask the agent in a prompt instead, and approve its tool call".into(),
            ),
            other => refuse(
                gate::NOT_ALLOWED,
                format!("{other:?} messages are not allowed through moorline (user, control_request, control_response, keep_alive are)"),
            ),
        }
    }

    fn control_request(v: Value) -> Verdict {
        let request = &v["request"];
        let subtype = request["subtype"].as_str().unwrap_or("");
        let refusal = match subtype {
            "interrupt" | "set_model" => None,
            "set_permission_mode" => {
                let extra = gate::unexpected_keys(request, &["subtype", "mode"]);
                let mode = request["mode"].as_str().unwrap_or("");
                (!matches!(mode, PERMISSION_MODE | PERMISSION_MODE_ALIAS) || !extra.is_empty()).then(|| {
                    Rejection::new(
                        gate::PERMISSION_CHANGE,
                        format!(
                            "the permission mode stays {PERMISSION_MODE:?}: every tool call that needs permission asks a person (asked for {}{})",
                            request["mode"],
                            if extra.is_empty() { String::new() } else { format!(" with {}", extra.join(", ")) }
                        ),
                    )
                })
            }
            "initialize" => {
                let extra = gate::unexpected_keys(request, INITIALIZE_KEYS)
                    .into_iter()
                    .filter(|k| !is_empty(&request[*k]))
                    .collect::<Vec<_>>();
                (!extra.is_empty()).then(|| {
                    Rejection::new(
                        gate::PERMISSION_CHANGE,
                        format!(
                            "initialize may not set {} (hooks, MCP servers, agents and the like could run or allow tools without a person)",
                            extra.join(", ")
                        ),
                    )
                })
            }
            "apply_flag_settings"
            | "update_settings"
            | "add_directory"
            | "set_cwd"
            | "mcp_set_servers"
            | "register_device_hooks" => Some(Rejection::new(
                gate::PERMISSION_CHANGE,
                format!("{subtype} changes Claude's settings, directories or tools"),
            )),
            "start_shell_task" | "mcp_call" | "rewind_files" | "stage_file" => {
                Some(Rejection::new(
                    gate::RUNS_WITHOUT_APPROVAL,
                    format!(
                        "{subtype} runs a command, a tool or a file change with no permission check"
                    ),
                ))
            }
            other => Some(Rejection::new(
                gate::NOT_ALLOWED,
                format!(
                    "control request {other:?} is not allowed through moorline (interrupt, set_model, set_permission_mode to {PERMISSION_MODE:?} and initialize are)"
                ),
            )),
        };
        match refusal {
            None => Verdict::Forward(v, None),
            Some(rejection) => {
                // The client waits for Claude's answer: give it the error Claude would.
                let reply = json!({"type": "control_response", "response": {"subtype": "error",
                    "request_id": v["request_id"], "error": format!("moorline: {}", rejection.error)}});
                Verdict::Refuse(rejection, Some(reply))
            }
        }
    }
}

/// True for null, `{}`, `[]` and `""`.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// The slash command a user message starts with, if any: a text (or any text block) whose
/// first word is `/name` (letters, digits, `-`, `_`, `:`), so paths such as `/usr/bin` are
/// ordinary text.
fn slash_command(content: &Value) -> Option<&str> {
    let texts: Vec<&str> = match content {
        Value::String(s) => vec![s.as_str()],
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect(),
        _ => Vec::new(),
    };
    texts.into_iter().find_map(|t| {
        let word = t
            .trim_start()
            .strip_prefix('/')?
            .split_whitespace()
            .next()?;
        word.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':'))
            .then_some(word)
    })
}

impl Translator for NativeGuard {
    fn start(&mut self, out: &mut Outputs) {
        // Claude prints nothing before its first message: it is ready once it runs.
        out.client_json(&crate::pipeline::ready_frame());
    }

    fn agent_line(&mut self, line: &str, out: &mut Outputs) {
        out.to_clients.push(line.as_bytes().to_vec());
    }

    fn passes_agent_lines_through(&self) -> bool {
        true
    }

    fn client_line(&mut self, line: &[u8], out: &mut Outputs) {
        gate::guard_line(line, out, Self::screen);
    }
}

/// Translates between pi's RPC protocol (clients) and Claude's stream-json (agent).
#[derive(Debug, Default)]
pub struct PiRpcTranslator {
    model: Option<String>,
    session_id: Option<String>,
    /// A turn is in flight (between Claude's `init` and its `result`).
    streaming: bool,
    /// Prompts sent while a turn runs, sent when it ends.
    queue: VecDeque<Value>,
    conversation: Conversation,
    /// Inputs of pending permission requests, by request id (`updatedInput` on allow).
    pending_inputs: BTreeMap<String, Value>,
    /// Tool names by tool-use id, to label results.
    tool_names: BTreeMap<String, String>,
    /// Client ids of `abort` commands waiting for Claude's answer, by control request id.
    control_ids: BTreeMap<String, (Option<Value>, &'static str)>,
    next_control: u64,
    /// The assistant message being streamed.
    streamed: Option<Streamed>,
    /// The last API retry Claude announced, while it has not succeeded or given up.
    retry: Option<u64>,
}

/// An assistant message as Claude streams it, put together for pi's `message_end`.
#[derive(Debug, Default)]
struct Streamed {
    model: Value,
    /// Content blocks by Claude's index: pi's block, and for tool calls their JSON so far.
    blocks: BTreeMap<u64, (Value, String)>,
    stop_reason: Option<String>,
}

/// pi's name for why a message stopped.
fn stop_reason(claude: &str) -> &'static str {
    match claude {
        "tool_use" => "toolUse",
        "max_tokens" => "length",
        "refusal" => "error",
        _ => "stop",
    }
}

/// A pi content block from a complete Claude block, if pi has one like it.
fn pi_block(block: &Value) -> Option<Value> {
    Some(match block["type"].as_str()? {
        "text" => json!({"type": "text", "text": block["text"]}),
        "thinking" => json!({"type": "thinking", "thinking": block["thinking"]}),
        "tool_use" => json!({"type": "toolCall", "id": block["id"], "name": block["name"],
            "arguments": block["input"]}),
        _ => return None,
    })
}

/// pi's `*_end` event for a complete content block.
fn block_end(index: u64, block: &Value) -> Value {
    match block["type"].as_str() {
        Some("text") => {
            json!({"type": "text_end", "contentIndex": index, "content": block["text"]})
        }
        Some("thinking") => {
            json!({"type": "thinking_end", "contentIndex": index, "content": block["thinking"]})
        }
        _ => json!({"type": "toolcall_end", "contentIndex": index, "toolCall": block}),
    }
}

impl PiRpcTranslator {
    /// A translator; `model` is reported by `get_state`.
    pub fn new(model: Option<String>) -> Self {
        Self {
            model,
            ..Self::default()
        }
    }

    fn user_message(cmd: &Value) -> Value {
        let mut content =
            vec![json!({"type": "text", "text": cmd["message"].as_str().unwrap_or("")})];
        for img in cmd["images"].as_array().into_iter().flatten() {
            content.push(json!({"type": "image", "source": {"type": "base64",
                "media_type": img["mimeType"].as_str().unwrap_or("image/png"), "data": img["data"]}}));
        }
        json!({"type": "user", "message": {"role": "user", "content": content}})
    }

    fn send_prompt(&mut self, cmd: &Value, out: &mut Outputs) {
        let msg = Self::user_message(cmd);
        self.conversation.user(msg["message"]["content"].clone());
        out.agent_json(&msg);
        self.streaming = true;
    }

    fn control(
        &mut self,
        request: Value,
        client_id: Option<Value>,
        command: &'static str,
        out: &mut Outputs,
    ) {
        self.next_control += 1;
        let rid = format!("moorline-{}", self.next_control);
        self.control_ids.insert(rid.clone(), (client_id, command));
        out.agent_json(&json!({"type": "control_request", "request_id": rid, "request": request}));
    }

    /// Claude's API events become pi's message events, in pi's order: `message_start`, each
    /// block's `*_start`, deltas and `*_end`, then `message_end` (at Claude's `message_stop`)
    /// and the tools it calls.
    fn stream_event(&mut self, ev: &Value, out: &mut Outputs) {
        let index = ev["index"].as_u64().unwrap_or(0);
        match ev["type"].as_str() {
            Some("message_start") => {
                // An answer came: any retrying is over.
                if let Some(attempt) = self.retry.take() {
                    out.client_json(
                        &json!({"type": "auto_retry_end", "success": true, "attempt": attempt}),
                    );
                }
                self.finish_message(out, None);
                self.conversation.message_started(out);
                self.streamed = Some(Streamed {
                    model: ev["message"]["model"].clone(),
                    ..Streamed::default()
                });
            }
            Some("content_block_start") => {
                let Some(streamed) = self.streamed.as_mut() else {
                    return;
                };
                let block = &ev["content_block"];
                let (event, pi) = match block["type"].as_str() {
                    Some("text") => (
                        json!({"type": "text_start", "contentIndex": index}),
                        json!({"type": "text", "text": ""}),
                    ),
                    Some("thinking") => (
                        json!({"type": "thinking_start", "contentIndex": index}),
                        json!({"type": "thinking", "thinking": ""}),
                    ),
                    Some("tool_use") => (
                        json!({"type": "toolcall_start", "contentIndex": index,
                            "toolCall": {"id": block["id"], "name": block["name"]}}),
                        json!({"type": "toolCall", "id": block["id"], "name": block["name"],
                            "arguments": {}}),
                    ),
                    _ => return,
                };
                streamed.blocks.insert(index, (pi, String::new()));
                self.conversation.message_update(out, event);
            }
            Some("content_block_delta") => {
                let Some((block, json_so_far)) = self
                    .streamed
                    .as_mut()
                    .and_then(|m| m.blocks.get_mut(&index))
                else {
                    return;
                };
                let d = &ev["delta"];
                let (event, field, piece) = match d["type"].as_str() {
                    Some("text_delta") => ("text_delta", "text", &d["text"]),
                    Some("thinking_delta") => ("thinking_delta", "thinking", &d["thinking"]),
                    Some("input_json_delta") => {
                        json_so_far.push_str(d["partial_json"].as_str().unwrap_or(""));
                        ("toolcall_delta", "", &d["partial_json"])
                    }
                    _ => return,
                };
                if !field.is_empty() {
                    let text = block[field].as_str().unwrap_or("").to_owned()
                        + piece.as_str().unwrap_or("");
                    block[field] = text.into();
                }
                let event = json!({"type": event, "contentIndex": index, "delta": piece});
                self.conversation.message_update(out, event);
            }
            Some("content_block_stop") => {
                let Some((block, json_so_far)) = self
                    .streamed
                    .as_mut()
                    .and_then(|m| m.blocks.get_mut(&index))
                else {
                    return;
                };
                if block["type"] == "toolCall"
                    && let Ok(args) = serde_json::from_str::<Value>(json_so_far)
                {
                    block["arguments"] = args;
                }
                let event = block_end(index, block);
                self.conversation.message_update(out, event);
            }
            Some("message_delta") => {
                if let (Some(m), Some(reason)) =
                    (self.streamed.as_mut(), ev["delta"]["stop_reason"].as_str())
                {
                    m.stop_reason = Some(stop_reason(reason).to_owned());
                }
            }
            Some("message_stop") => self.finish_message(out, None),
            _ => {}
        }
    }

    /// Ends the streamed message, if one is open: `message_end`, then the tools it calls.
    /// `stop` overrides its stop reason (a turn that ended before the message did).
    fn finish_message(&mut self, out: &mut Outputs, stop: Option<&str>) {
        let Some(m) = self.streamed.take() else {
            return;
        };
        let content: Vec<Value> = m.blocks.into_values().map(|(block, _)| block).collect();
        let stop = stop.map(str::to_owned).or(m.stop_reason);
        let message = json!({"role": "assistant", "content": content, "model": m.model,
            "stopReason": stop.unwrap_or_else(|| "stop".into())});
        self.message_ended(message, out);
    }

    /// Records a complete assistant message and starts the tools it calls.
    fn message_ended(&mut self, message: Value, out: &mut Outputs) {
        let tools: Vec<(Value, String, Value)> = message["content"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["type"] == "toolCall")
            .map(|b| {
                let name = b["name"].as_str().unwrap_or("").to_owned();
                (b["id"].clone(), name, b["arguments"].clone())
            })
            .collect();
        self.conversation.message_ended(out, message);
        for (id, name, args) in tools {
            if let Some(id) = id.as_str() {
                self.tool_names.insert(id.to_owned(), name.clone());
            }
            self.conversation.tool_started(out, &id, &name, &args);
        }
    }

    /// A complete assistant message. Claude sends one per content block of the message it
    /// streams: those only confirm the block's final form (a tool call's input). One that was
    /// never streamed (Claude's own, such as an API error it gives up on) is announced whole.
    fn assistant(&mut self, msg: &Value, out: &mut Outputs) {
        let blocks: Vec<Value> = msg["content"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(pi_block)
            .collect();
        if let Some(streamed) = self.streamed.as_mut() {
            for block in blocks.iter().filter(|b| b["type"] == "toolCall") {
                if let Some((known, _)) = streamed
                    .blocks
                    .values_mut()
                    .find(|(b, _)| b["id"] == block["id"])
                {
                    known["arguments"] = block["arguments"].clone();
                }
            }
            return;
        }
        self.conversation.message_started(out);
        for (index, block) in (0u64..).zip(&blocks) {
            let kind = match block["type"].as_str() {
                Some("text") => "text_start",
                Some("thinking") => "thinking_start",
                _ => "toolcall_start",
            };
            self.conversation
                .message_update(out, json!({"type": kind, "contentIndex": index}));
            self.conversation
                .message_update(out, block_end(index, block));
        }
        let stop = msg["stop_reason"]
            .as_str()
            .map(stop_reason)
            .unwrap_or("stop");
        let message = json!({"role": "assistant", "content": blocks, "model": msg["model"],
            "stopReason": stop});
        self.message_ended(message, out);
    }

    fn tool_results(&mut self, msg: &Value, out: &mut Outputs) {
        for block in msg["content"].as_array().into_iter().flatten() {
            if block["type"] != "tool_result" {
                continue;
            }
            let id = block["tool_use_id"].as_str().unwrap_or("").to_owned();
            let name = self.tool_names.get(&id).cloned().unwrap_or_default();
            let text = match &block["content"] {
                Value::String(s) => s.clone(),
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => String::new(),
            };
            let is_error = block["is_error"] == true;
            self.conversation
                .tool_ended(out, &Value::String(id), &name, &text, is_error);
        }
    }

    fn end_turn(&mut self, result: &Value, out: &mut Outputs) {
        self.streaming = false;
        let failed = result["is_error"] == true || result["subtype"] != "success";
        self.finish_message(out, failed.then_some("aborted"));
        let error = failed.then(|| match &result["result"] {
            Value::String(s) => Value::String(s.clone()),
            _ => result["subtype"].clone(),
        });
        // Claude gave up retrying (or was stopped while it waited).
        if let Some(attempt) = self.retry.take() {
            out.client_json(&json!({"type": "auto_retry_end", "success": false,
                "attempt": attempt, "finalError": error.clone().unwrap_or(Value::Null)}));
        }
        self.conversation.turn_ended(out, error);
        if let Some(next) = self.queue.pop_front() {
            self.send_prompt(&next, out);
        }
    }
}

impl Translator for PiRpcTranslator {
    fn restore_messages(&mut self, messages: Vec<Value>) {
        self.conversation.restore(messages);
    }

    fn start(&mut self, out: &mut Outputs) {
        // Claude prints nothing before its first message: it is ready once it runs.
        out.client_json(&crate::pipeline::ready_frame());
    }

    fn agent_line(&mut self, line: &str, out: &mut Outputs) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return;
        };
        match v["type"].as_str() {
            Some("system") if v["subtype"] == "init" => {
                if let Some(s) = v["session_id"].as_str() {
                    self.session_id = Some(s.to_owned());
                }
                if self.model.is_none() {
                    self.model = v["model"].as_str().map(str::to_owned);
                }
                self.conversation.turn_started(out);
            }
            // A subagent's messages (Task tool) are its own, not the conversation's.
            Some("stream_event" | "assistant" | "user") if !v["parent_tool_use_id"].is_null() => {}
            Some("stream_event") => self.stream_event(&v["event"], out),
            Some("assistant") => self.assistant(&v["message"], out),
            Some("user") => self.tool_results(&v["message"], out),
            // Claude retries a failed API call by itself: pi announces the same.
            Some("system") if v["subtype"] == "api_retry" => {
                let attempt = v["attempt"].as_u64().unwrap_or(1);
                self.retry = Some(attempt);
                let error = v["error"].as_str().unwrap_or("error");
                let message = match v["error_status"].as_u64() {
                    Some(status) => format!("{status} {error}"),
                    None => format!("connection error: {error}"),
                };
                out.client_json(&json!({"type": "auto_retry_start", "attempt": attempt,
                    "maxAttempts": v["max_retries"], "delayMs": v["retry_delay_ms"],
                    "errorMessage": message}));
            }
            Some("result") => self.end_turn(&v, out),
            Some("control_request") if v["request"]["subtype"] == "can_use_tool" => {
                let id = v["request_id"].as_str().unwrap_or("").to_owned();
                let tool = v["request"]["tool_name"].as_str().unwrap_or("tool");
                let input = v["request"]["input"].clone();
                pirpc::confirm_request(out, &id, tool, &input);
                self.pending_inputs.insert(id, input);
            }
            Some("control_response") => {
                let rid = v["response"]["request_id"].as_str().unwrap_or("");
                if let Some((client_id, command)) = self.control_ids.remove(rid) {
                    let result = if v["response"]["subtype"] == "success" {
                        Ok(None)
                    } else {
                        Err(v["response"]["error"]
                            .as_str()
                            .unwrap_or("failed")
                            .to_owned())
                    };
                    pirpc::respond(out, &client_id.unwrap_or(Value::Null), command, result);
                }
            }
            // Any other request would leave Claude waiting: refuse it clearly.
            Some("control_request") => {
                let subtype = v["request"]["subtype"].as_str().unwrap_or("");
                out.agent_json(&json!({"type": "control_response", "response": {
                    "subtype": "error", "request_id": v["request_id"],
                    "error": format!("moorline (pi-rpc dialect) does not handle {subtype}")}}));
            }
            // Status notes and the like have no pi counterpart.
            _ => {}
        }
    }

    fn client_line(&mut self, line: &[u8], out: &mut Outputs) {
        let Some((cmd, id, kind)) = self.conversation.take_command(line, out) else {
            return;
        };
        match kind.as_str() {
            "prompt" | "steer" | "follow_up" => {
                pirpc::respond(out, &id, &kind, Ok(None));
                if self.streaming {
                    self.queue.push_back(cmd);
                } else {
                    self.send_prompt(&cmd, out);
                }
            }
            "abort" => {
                self.queue.clear();
                if self.streaming {
                    self.control(json!({"subtype": "interrupt"}), Some(id), "abort", out);
                } else {
                    pirpc::respond(out, &id, "abort", Ok(None));
                }
            }
            // Claude's retries cannot be cancelled alone: stopping them stops the turn.
            "abort_retry" => {
                if self.streaming && self.retry.is_some() {
                    self.control(
                        json!({"subtype": "interrupt"}),
                        Some(id),
                        "abort_retry",
                        out,
                    );
                } else {
                    pirpc::respond(out, &id, "abort_retry", Ok(None));
                }
            }
            "set_model" => match cmd["model"].as_str().or_else(|| cmd["modelId"].as_str()) {
                Some(model) => {
                    self.model = Some(model.to_owned());
                    self.control(
                        json!({"subtype": "set_model", "model": model}),
                        Some(id),
                        "set_model",
                        out,
                    );
                }
                None => pirpc::respond(out, &id, "set_model", Err("missing 'model' field".into())),
            },
            "get_state" => {
                let data = json!({
                    "model": {"id": self.model, "provider": "anthropic"},
                    "thinkingLevel": "off",
                    "isStreaming": self.streaming,
                    "isCompacting": false,
                    "sessionId": self.session_id,
                    "messageCount": self.conversation.len(),
                    "pendingMessageCount": self.queue.len(),
                });
                pirpc::respond(out, &id, "get_state", Ok(Some(data)));
            }
            "extension_ui_response" => {
                let rid = cmd["id"].as_str().unwrap_or("").to_owned();
                let Some(input) = self.pending_inputs.remove(&rid) else {
                    return;
                };
                out.agent_json(&claude_permission_answer(
                    &Value::String(rid),
                    &input,
                    Decision::from_confirmed(&cmd),
                    "denied by remote user",
                ));
            }
            other => pirpc::unsupported(out, &id, "claude-code", other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch_with(continuation: Continuation) -> LaunchSpec {
        let env = BTreeMap::new();
        ClaudeAdapter::new(&AdapterConfig {
            agent: "claude-code".into(),
            continuation,
            ..Default::default()
        })
        .expect("adapter")
        .launch(&crate::test_context(&env, std::path::Path::new("/d")))
        .expect("launch")
    }

    /// A new conversation gets the id the server chose; a continued one is resumed by id.
    #[test]
    fn names_new_conversations_and_resumes_old_ones() {
        let fresh = launch_with(Continuation {
            fresh_id: Some("N".into()),
            ..Continuation::default()
        });
        assert!(fresh.args.windows(2).any(|w| w == ["--session-id", "N"]));
        assert!(!fresh.args.iter().any(|a| a == "--resume"));
        assert_eq!(fresh.conversation.as_deref(), Some("N"));
        let resumed = launch_with(Continuation {
            resume: Some("R".into()),
            fresh_id: Some("N".into()),
            ..Continuation::default()
        });
        assert!(resumed.args.windows(2).any(|w| w == ["--resume", "R"]));
        assert!(!resumed.args.iter().any(|a| a == "--session-id"));
        assert_eq!(resumed.conversation.as_deref(), Some("R"));
    }

    /// The transcript decides: there, it is continued; gone, the reason says where it was
    /// looked for; a recorded id that could name a path is refused.
    #[test]
    fn finds_the_transcript_under_the_home() {
        let home = tempfile_dir();
        let adapter = ClaudeAdapter::new(&AdapterConfig {
            agent: "claude-code".into(),
            ..Default::default()
        })
        .expect("adapter");
        let place = |recorded| ConversationPlace {
            data_dir: std::path::Path::new("/d"),
            home: Some(home.as_path()),
            cwd: std::path::Path::new("/w"),
            recorded,
        };
        assert_eq!(adapter.find_conversation(&place(None)), Ok(None));
        let err = adapter
            .find_conversation(&place(Some("abc-1")))
            .expect_err("no transcript");
        assert!(err.contains(".claude/projects"), "{err}");
        let project = home.join(".claude/projects/-w");
        std::fs::create_dir_all(&project).expect("mkdir");
        std::fs::write(project.join("abc-1.jsonl"), "{}\n").expect("write");
        assert_eq!(
            adapter.find_conversation(&place(Some("abc-1"))),
            Ok(Some("abc-1".into()))
        );
        assert!(adapter.find_conversation(&place(Some("../x"))).is_err());
        let _ = std::fs::remove_dir_all(&home);
    }

    /// A fresh directory under the system's temporary directory.
    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "moorline-claude-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    /// What clients see of a recorded Claude Code session replayed through the translator:
    /// the prompts (`in` lines) go through `client_line` as pi prompts, Claude's lines through
    /// `agent_line`.
    fn replay(transcript: &str) -> Vec<Value> {
        let mut t = PiRpcTranslator::new(None);
        let mut seen: Vec<Value> = Vec::new();
        for line in transcript.lines() {
            let entry: Value = serde_json::from_str(line).expect("transcript entry");
            let text = entry["line"].as_str().expect("line");
            let mut out = Outputs::default();
            if entry["dir"] == "out" {
                t.agent_line(text, &mut out);
            } else if let Ok(sent) = serde_json::from_str::<Value>(text)
                && sent["type"] == "user"
            {
                let prompt = json!({"type": "prompt", "message": sent["message"]["content"]});
                t.client_line(prompt.to_string().as_bytes(), &mut out);
            }
            seen.extend(
                out.to_clients
                    .iter()
                    .map(|l| serde_json::from_slice::<Value>(l).expect("json"))
                    .filter(|v| v["type"] != "response"),
            );
        }
        seen
    }

    /// Replays a recorded Claude Code session (fixtures/transcripts/claude-code.jsonl) through
    /// the translator, in order, and checks what clients would have seen.
    #[test]
    fn a_recorded_session_translates_to_pi_events() {
        let seen = replay(include_str!("../../fixtures/transcripts/claude-code.jsonl"));
        pirpc::check_event_order(&seen).expect("pi's event order");
        let updates: Vec<&str> = seen
            .iter()
            .filter_map(|v| v["assistantMessageEvent"]["type"].as_str())
            .collect();
        assert!(updates.contains(&"text_end"), "{updates:?}");
        assert!(updates.contains(&"toolcall_end"), "{updates:?}");
        let call = seen
            .iter()
            .find(|v| v["assistantMessageEvent"]["type"] == "toolcall_end")
            .expect("toolcall_end");
        assert_eq!(
            call["assistantMessageEvent"]["toolCall"]["arguments"]["command"],
            "touch approved.txt"
        );
        let first_tool_turn = seen
            .iter()
            .find(|v| {
                v["type"] == "turn_end" && !v["toolResults"].as_array().expect("results").is_empty()
            })
            .expect("a turn with a tool result");
        assert_eq!(first_tool_turn["message"]["stopReason"], "toolUse");
        let types: Vec<&str> = seen.iter().filter_map(|v| v["type"].as_str()).collect();
        assert!(
            types.starts_with(&["agent_start", "turn_start", "message_start"]),
            "{types:?}"
        );
        let text: String = seen
            .iter()
            .filter(|v| v["assistantMessageEvent"]["type"] == "text_delta")
            .filter_map(|v| v["assistantMessageEvent"]["delta"].as_str())
            .collect();
        assert!(text.starts_with("MOCK reply to: hello there"), "{text}");
        let asks: Vec<&Value> = seen
            .iter()
            .filter(|v| v["type"] == "extension_ui_request")
            .collect();
        assert_eq!(asks.len(), 2, "one approval request per RUNBASH turn");
        assert_eq!(asks[0]["title"], "Run Bash?");
        assert!(
            asks[0]["message"]
                .as_str()
                .expect("message")
                .contains("touch approved.txt")
        );
        let ends: Vec<&Value> = seen
            .iter()
            .filter(|v| v["type"] == "tool_execution_end")
            .collect();
        assert_eq!(ends[0]["isError"], false);
        assert_eq!(ends[1]["isError"], true, "the denied call");
        assert_eq!(types.iter().filter(|t| **t == "agent_end").count(), 3);
    }

    /// Claude retrying an overloaded API (fixtures/transcripts/claude-code-retry.jsonl): twice
    /// and then an answer, then twice more and it gives up.
    #[test]
    fn api_retries_become_pis_auto_retry_events() {
        let seen = replay(include_str!(
            "../../fixtures/transcripts/claude-code-retry.jsonl"
        ));
        pirpc::check_event_order(&seen).expect("pi's event order");
        let retries: Vec<&Value> = seen
            .iter()
            .filter(|v| {
                v["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("auto_retry"))
            })
            .collect();
        assert_eq!(retries.len(), 6, "{retries:#?}");
        assert_eq!(
            retries[0],
            &json!({"type": "auto_retry_start", "attempt": 1, "maxAttempts": 3, "delayMs": 589,
                "errorMessage": "529 overloaded"})
        );
        assert_eq!(
            retries[2],
            &json!({"type": "auto_retry_end", "success": true, "attempt": 2})
        );
        assert_eq!(retries[5]["type"], "auto_retry_end");
        assert_eq!(retries[5]["success"], false);
        assert!(
            retries[5]["finalError"]
                .as_str()
                .expect("finalError")
                .contains("529"),
            "{}",
            retries[5]
        );
        // The answer after the retries streams as usual; giving up ends the run with the error.
        let ends: Vec<&Value> = seen.iter().filter(|v| v["type"] == "agent_end").collect();
        assert_eq!(ends.len(), 2);
        assert!(ends[0].get("error").is_none(), "{}", ends[0]);
        assert!(ends[1]["error"].as_str().expect("error").contains("529"));
        // The retry events come between the run's start and its first message.
        let start = seen.iter().position(|v| v["type"] == "agent_start");
        let first = seen.iter().position(|v| v["type"] == "auto_retry_start");
        assert!(start < first, "{seen:#?}");
    }

    #[test]
    fn control_requests_it_cannot_handle_are_refused_not_left_waiting() {
        let mut t = PiRpcTranslator::new(None);
        let mut out = Outputs::default();
        t.agent_line(
            r#"{"type":"control_request","request_id":"r9","request":{"subtype":"hook_callback"}}"#,
            &mut out,
        );
        let reply: Value = serde_json::from_slice(&out.to_agent[0]).expect("json");
        assert_eq!(reply["response"]["subtype"], "error");
        assert_eq!(reply["response"]["request_id"], "r9");
        assert!(out.to_clients.is_empty());
    }

    #[test]
    fn client_commands_become_claude_input_or_local_answers() {
        let mut t = PiRpcTranslator::new(Some("claude-x".into()));
        let mut out = Outputs::default();
        t.client_line(br#"{"id":"1","type":"prompt","message":"hi"}"#, &mut out);
        let sent: Value = serde_json::from_slice(&out.to_agent[0]).expect("json");
        assert_eq!(sent["message"]["content"][0]["text"], "hi");
        let reply: Value = serde_json::from_slice(&out.to_clients[0]).expect("json");
        assert_eq!(
            (reply["id"].as_str(), reply["success"].as_bool()),
            (Some("1"), Some(true))
        );

        // While the turn runs, further prompts wait.
        let mut out = Outputs::default();
        t.client_line(br#"{"id":"2","type":"prompt","message":"next"}"#, &mut out);
        assert!(out.to_agent.is_empty());
        let mut out = Outputs::default();
        t.client_line(br#"{"id":"3","type":"get_state"}"#, &mut out);
        let state: Value = serde_json::from_slice(&out.to_clients[0]).expect("json");
        assert_eq!(state["data"]["isStreaming"], true);
        assert_eq!(state["data"]["pendingMessageCount"], 1);
        let mut out = Outputs::default();
        t.agent_line(
            r#"{"type":"result","subtype":"success","is_error":false,"result":"ok"}"#,
            &mut out,
        );
        assert_eq!(
            out.to_agent.len(),
            1,
            "the queued prompt goes out when the turn ends"
        );

        // Never forward garbage: Claude would exit.
        let mut out = Outputs::default();
        t.client_line(b"this is not json", &mut out);
        assert!(out.to_agent.is_empty());
        let err: Value = serde_json::from_slice(&out.to_clients[0]).expect("json");
        assert_eq!(
            (err["command"].as_str(), err["success"].as_bool()),
            (Some("parse"), Some(false))
        );
    }

    #[test]
    fn approvals_become_control_responses_with_the_original_input() {
        let mut t = PiRpcTranslator::new(None);
        let mut out = Outputs::default();
        t.agent_line(
            r#"{"type":"control_request","request_id":"r1","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{"command":"ls"}}}"#,
            &mut out,
        );
        let ask: Value = serde_json::from_slice(&out.to_clients[0]).expect("json");
        assert_eq!(
            (ask["method"].as_str(), ask["id"].as_str()),
            (Some("confirm"), Some("r1"))
        );
        let mut out = Outputs::default();
        t.client_line(
            br#"{"type":"extension_ui_response","id":"r1","confirmed":true}"#,
            &mut out,
        );
        let answer: Value = serde_json::from_slice(&out.to_agent[0]).expect("json");
        assert_eq!(answer["response"]["response"]["behavior"], "allow");
        assert_eq!(
            answer["response"]["response"]["updatedInput"]["command"],
            "ls"
        );
    }

    /// What a native client line becomes: (lines for Claude, frames for clients).
    fn guard(line: Value) -> (Vec<Value>, Vec<Value>) {
        let mut out = Outputs::default();
        NativeGuard.client_line(line.to_string().as_bytes(), &mut out);
        let parse = |v: &Vec<Vec<u8>>| {
            v.iter()
                .map(|l| serde_json::from_slice(l).expect("json"))
                .collect::<Vec<Value>>()
        };
        (parse(&out.to_agent), parse(&out.to_clients))
    }

    fn refused(line: Value, reason: &str) -> Vec<Value> {
        let (to_agent, to_clients) = guard(line.clone());
        assert!(to_agent.is_empty(), "{line} reached Claude");
        assert_eq!(to_clients[0]["type"], "amarre.input_rejected", "{line}");
        assert_eq!(to_clients[0]["reason"], reason, "{line}: {}", to_clients[0]);
        to_clients
    }

    #[test]
    fn the_native_guard_keeps_the_permission_mode() {
        for mode in [
            "acceptEdits",
            "bypassPermissions",
            "auto",
            "dontAsk",
            "plan",
        ] {
            let frames = refused(
                json!({"type": "control_request", "request_id": "m1",
                    "request": {"subtype": "set_permission_mode", "mode": mode}}),
                gate::PERMISSION_CHANGE,
            );
            assert!(frames[0]["error"].as_str().expect("error").contains(mode));
            // The client waiting for Claude's answer gets one.
            assert_eq!(frames[1]["response"]["request_id"], "m1");
            assert_eq!(frames[1]["response"]["subtype"], "error");
        }
        refused(
            json!({"type": "control_request", "request_id": "m2", "request": {
                "subtype": "set_permission_mode", "mode": "default", "answers_bypass_switch_back": "bypass_always"}}),
            gate::PERMISSION_CHANGE,
        );
        for mode in ["default", "manual"] {
            let (to_agent, _) = guard(json!({"type": "control_request", "request_id": "m3",
                "request": {"subtype": "set_permission_mode", "mode": mode}}));
            assert_eq!(to_agent.len(), 1, "{mode} is the instance's mode");
        }
    }

    #[test]
    fn the_native_guard_refuses_direct_execution_and_settings() {
        refused(
            json!({"type": "bash_command", "command": "touch x"}),
            gate::RUNS_WITHOUT_APPROVAL,
        );
        for subtype in ["start_shell_task", "mcp_call", "rewind_files"] {
            refused(
                json!({"type": "control_request", "request_id": "r", "request": {"subtype": subtype}}),
                gate::RUNS_WITHOUT_APPROVAL,
            );
        }
        for subtype in [
            "apply_flag_settings",
            "update_settings",
            "add_directory",
            "mcp_set_servers",
        ] {
            refused(
                json!({"type": "control_request", "request_id": "r", "request": {"subtype": subtype}}),
                gate::PERMISSION_CHANGE,
            );
        }
        refused(
            json!({"type": "control_request", "request_id": "r", "request": {"subtype": "get_settings"}}),
            gate::NOT_ALLOWED,
        );
        refused(
            json!({"type": "control_request", "request_id": "i", "request": {"subtype": "initialize",
                "hooks": {"PreToolUse": [{"hookCallbackIds": ["h1"]}]}}}),
            gate::PERMISSION_CHANGE,
        );
        refused(
            json!({"type": "update_environment_variables", "variables": {"A": "1"}}),
            gate::NOT_ALLOWED,
        );
        refused(
            json!({"type": "user", "message": {"role": "user", "content": "/config set x"}}),
            gate::NOT_ALLOWED,
        );
        refused(
            json!({"type": "user", "message": {"role": "user", "content": [{"type": "text", "text": "  /add-dir /etc"}]}}),
            gate::NOT_ALLOWED,
        );
        refused(
            json!({"type": "user", "message": {"role": "assistant", "content": "x"}}),
            gate::NOT_ALLOWED,
        );
    }

    #[test]
    fn the_native_guard_lets_chat_clients_work() {
        for line in [
            json!({"type": "user", "message": {"role": "user", "content": "RUNBASH: ls"}}),
            json!({"type": "user", "message": {"role": "user", "content": "/usr/bin/env is odd"}}),
            json!({"type": "user", "message": {"role": "user", "content": "/compact"}}),
            json!({"type": "control_request", "request_id": "a", "request": {"subtype": "interrupt"}}),
            json!({"type": "control_request", "request_id": "b", "request": {"subtype": "set_model", "model": "x"}}),
            json!({"type": "control_request", "request_id": "c", "request": {"subtype": "initialize", "hooks": null, "systemPrompt": "be brief"}}),
            json!({"type": "keep_alive"}),
            json!({"type": "control_response", "response": {"subtype": "success", "request_id": "r1",
                "response": {"behavior": "allow", "updatedInput": {"command": "ls"}}}}),
        ] {
            let (to_agent, to_clients) = guard(line.clone());
            assert_eq!(to_agent, vec![line.clone()], "{line}");
            assert!(to_clients.is_empty(), "{line}");
        }
    }

    #[test]
    fn an_answer_that_adds_permission_rules_is_pinned_to_this_call() {
        let (to_agent, to_clients) = guard(json!({"type": "control_response", "response": {
            "subtype": "success", "request_id": "r1", "response": {"behavior": "allow",
            "updatedInput": {"command": "ls"},
            "updatedPermissions": [{"type": "setMode", "mode": "bypassPermissions", "destination": "session"}]}}}));
        assert_eq!(to_agent[0]["response"]["response"]["behavior"], "allow");
        assert!(
            to_agent[0]["response"]["response"]
                .get("updatedPermissions")
                .is_none()
        );
        assert_eq!(
            (
                to_clients[0]["reason"].as_str(),
                to_clients[0]["forwarded"].as_bool()
            ),
            (Some(gate::PERMISSION_CHANGE), Some(true))
        );
    }

    #[test]
    fn pi_rpc_bash_is_refused_not_translated() {
        let mut t = PiRpcTranslator::new(None);
        let mut out = Outputs::default();
        t.client_line(br#"{"id":"b","type":"bash","command":"touch x"}"#, &mut out);
        assert!(out.to_agent.is_empty());
        let frame: Value = serde_json::from_slice(&out.to_clients[0]).expect("json");
        assert_eq!(frame["reason"], gate::RUNS_WITHOUT_APPROVAL);
    }

    #[test]
    fn the_native_guard_rejects_what_claude_would_die_on() {
        let mut g = NativeGuard;
        let mut out = Outputs::default();
        g.client_line(b"{\"type\":\"user\"", &mut out);
        g.client_line(b"[1]", &mut out);
        g.client_line(
            br#"{"type":"user","message":{"role":"user","content":"x"}}"#,
            &mut out,
        );
        assert_eq!(out.to_agent.len(), 1);
        assert_eq!(out.to_clients.len(), 2);
    }
}
