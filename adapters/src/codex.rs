//! OpenAI Codex (`@openai/codex`) through `codex app-server`: JSON-RPC over stdio, many turns
//! on one thread, and command approvals sent to the client as requests.
//!
//! Codex is started with its plugin sync off (it would otherwise call github.com and
//! chatgpt.com at every thread start) and, when a base URL is configured, a model provider
//! pointing at it. Every thread asks before **every** command (`approvalPolicy: "untrusted"`)
//! and runs exactly what was approved (`sandbox: "danger-full-access"`; moorline's container is
//! the sandbox), which is what makes remote approval meaningful.
//!
//! Two client dialects:
//! - `native`: app-server JSON-RPC, unchanged (clients do the handshake themselves);
//!   approvals are `item/commandExecution/requestApproval` requests and their results;
//! - `pi-rpc` (default): [`PiRpcTranslator`] does the handshake and turns pi commands and
//!   events into Codex's and back, approvals becoming `extension_ui_request` confirms.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::{Value, json};

use crate::pipeline::{Decision, Dialect, Outputs, Translator, codex_approval_answer};
use crate::pirpc::{self, Conversation};
use crate::{Adapter, AdapterConfig, AdapterError, LaunchContext, LaunchSettings, LaunchSpec};

/// Launches `codex app-server`.
#[derive(Debug, Clone)]
pub struct CodexAdapter {
    launch: LaunchSettings,
    /// Clients speak pi-rpc rather than the agent's own protocol.
    pi_rpc: bool,
}

impl CodexAdapter {
    /// A Codex adapter for an instance (`dialect`: `pi-rpc`, the default, or `native`).
    pub fn new(config: &AdapterConfig) -> Result<Self, AdapterError> {
        Ok(Self {
            launch: LaunchSettings::new(config, "codex"),
            pi_rpc: pirpc::wants_pi_rpc(config, "codex")?,
        })
    }
}

/// A TOML string literal (JSON's escaping is valid TOML for basic strings).
fn toml_str(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

impl Adapter for CodexAdapter {
    fn name(&self) -> &str {
        "codex"
    }

    fn launch(&self, ctx: &LaunchContext<'_>) -> Result<LaunchSpec, AdapterError> {
        let mut args: Vec<String> = vec![
            "app-server".into(),
            "-c".into(),
            "features.plugins=false".into(),
        ];
        if let Some(url) = &self.launch.base_url {
            let key = if ctx.env.contains_key("OPENAI_API_KEY") {
                ", env_key = \"OPENAI_API_KEY\""
            } else {
                ""
            };
            args.extend([
                "-c".into(),
                "model_provider=\"moorline\"".into(),
                "-c".into(),
                format!(
                    "model_providers.moorline={{name = \"moorline\", base_url = {}, wire_api = \"responses\"{key}}}",
                    toml_str(url)
                ),
            ]);
        }
        if let Some(m) = &self.launch.model {
            args.extend(["-c".into(), format!("model={}", toml_str(m))]);
        }
        args.extend(self.launch.args.iter().cloned());
        Ok(LaunchSpec {
            program: self.launch.program.clone(),
            args,
            env: ctx.env.clone(),
            files: Vec::new(),
        })
    }

    fn dialect(&self) -> Dialect {
        if self.pi_rpc {
            Dialect::PiRpc
        } else {
            Dialect::CodexNative
        }
    }

    fn translator(&self) -> Box<dyn Translator> {
        if self.pi_rpc {
            Box::new(PiRpcTranslator::default())
        } else {
            Box::new(crate::pipeline::Passthrough)
        }
    }

    fn protected_env(&self) -> &'static [&'static str] {
        // Another Codex home holds another configuration (approval policy, providers).
        &["CODEX_*", "OPENAI_*"]
    }
}

/// Ids moorline uses for its own requests to Codex (Codex numbers its requests from 0, so
/// string ids never collide with them).
const INIT: &str = "moorline-init";
const THREAD: &str = "moorline-thread";

/// Translates between pi's RPC protocol (clients) and Codex's app-server JSON-RPC (agent).
#[derive(Debug, Default)]
pub struct PiRpcTranslator {
    thread: Option<String>,
    turn: Option<String>,
    /// Prompts waiting for the thread to exist or the running turn to end.
    queue: VecDeque<Value>,
    conversation: Conversation,
    /// Text of agent messages being streamed, by item id.
    streaming_text: BTreeMap<String, String>,
    /// Codex's approval request ids, by the id clients see.
    approvals: BTreeMap<String, Value>,
    /// What moorline's requests in flight were for, by request id.
    requests: BTreeMap<String, Pending>,
    next: u64,
    model: Option<String>,
    /// Commands of the running turn that started and have not ended, by item id.
    running: BTreeSet<String>,
}

/// Why moorline sent Codex a request.
#[derive(Debug)]
enum Pending {
    /// For a client: its id and command, to answer it.
    Client(Value, String),
    /// After an abort, the thread's background terminals, to end those running these items.
    Terminals(BTreeSet<String>),
    /// Nothing waits for the answer.
    Quiet,
}

impl PiRpcTranslator {
    /// Sends Codex a request; `pending` says what its answer is for (`None`: a `turn/start`,
    /// whose failure ends the turn).
    fn request(
        &mut self,
        method: &str,
        params: Value,
        pending: Option<Pending>,
        out: &mut Outputs,
    ) {
        self.next += 1;
        let id = format!("moorline-{}", self.next);
        if let Some(pending) = pending {
            self.requests.insert(id.clone(), pending);
        }
        out.agent_json(&json!({"id": id, "method": method, "params": params}));
    }

    /// Ends the background terminals of the commands the aborted turn left running (Codex's
    /// `turn/interrupt` ends the turn but not them), from the list Codex answered with.
    fn end_terminals(&mut self, items: &BTreeSet<String>, list: &Value, out: &mut Outputs) {
        for terminal in list["data"].as_array().into_iter().flatten() {
            let ours = terminal["itemId"]
                .as_str()
                .is_some_and(|i| items.contains(i));
            if ours && let Some(thread) = self.thread.clone() {
                let params = json!({"threadId": thread, "processId": terminal["processId"]});
                self.request(
                    "thread/backgroundTerminals/terminate",
                    params,
                    Some(Pending::Quiet),
                    out,
                );
            }
        }
    }

    fn start_turn(&mut self, cmd: &Value, out: &mut Outputs) {
        let Some(thread) = self.thread.clone() else {
            self.queue.push_back(cmd.clone());
            return;
        };
        let text = cmd["message"].as_str().unwrap_or("").to_owned();
        self.conversation
            .user(json!([{"type": "text", "text": text}]));
        self.turn = Some(String::new());
        self.request(
            "turn/start",
            json!({"threadId": thread, "input": [{"type": "text", "text": text}]}),
            None,
            out,
        );
    }

    fn notification(&mut self, method: &str, params: &Value, out: &mut Outputs) {
        let item = &params["item"];
        match method {
            "turn/started" => {
                self.turn = params["turn"]["id"].as_str().map(str::to_owned);
                self.conversation.turn_started(out);
            }
            "item/started" if item["type"] == "agentMessage" => {
                let id = item["id"].as_str().unwrap_or("").to_owned();
                self.streaming_text.insert(id, String::new());
                self.conversation.message_started(out);
                self.conversation
                    .message_update(out, json!({"type": "text_start", "contentIndex": 0}));
            }
            "item/agentMessage/delta" => {
                let delta = params["delta"].as_str().unwrap_or("");
                if let Some(text) = params["itemId"]
                    .as_str()
                    .and_then(|id| self.streaming_text.get_mut(id))
                {
                    text.push_str(delta);
                }
                self.conversation.message_update(
                    out,
                    json!({"type": "text_delta", "contentIndex": 0, "delta": delta}),
                );
            }
            "item/completed" if item["type"] == "agentMessage" => {
                let id = item["id"].as_str().unwrap_or("");
                let text = item["text"]
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| self.streaming_text.remove(id))
                    .unwrap_or_default();
                self.conversation.message_update(
                    out,
                    json!({"type": "text_end", "contentIndex": 0, "content": text}),
                );
                let message = json!({"role": "assistant", "content": [{"type": "text", "text": text}],
                    "model": self.model, "stopReason": "stop"});
                self.conversation.message_ended(out, message);
            }
            // Codex reports a command as an item of its own; in pi it is a tool call the
            // assistant's message makes, so the message is made up here.
            "item/started" if item["type"] == "commandExecution" => {
                let args = json!({"command": item["command"]});
                let call = json!({"type": "toolCall", "id": item["id"], "name": "bash", "arguments": args});
                self.conversation.message_started(out);
                self.conversation.message_update(
                    out,
                    json!({"type": "toolcall_start", "contentIndex": 0,
                        "toolCall": {"id": item["id"], "name": "bash"}}),
                );
                self.conversation.message_update(
                    out,
                    json!({"type": "toolcall_end", "contentIndex": 0, "toolCall": call}),
                );
                let message = json!({"role": "assistant", "content": [call],
                    "model": self.model, "stopReason": "toolUse"});
                self.conversation.message_ended(out, message);
                if let Some(id) = item["id"].as_str() {
                    self.running.insert(id.to_owned());
                }
                self.conversation
                    .tool_started(out, &item["id"], "bash", &args);
            }
            "item/completed" if item["type"] == "commandExecution" => {
                // A command of an aborted turn was already reported as ended.
                if !item["id"]
                    .as_str()
                    .is_some_and(|id| self.running.remove(id))
                {
                    return;
                }
                let status = item["status"].as_str().unwrap_or("");
                let output = item["aggregatedOutput"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("({status})"));
                let is_error =
                    status != "completed" || item["exitCode"].as_i64().is_some_and(|c| c != 0);
                self.conversation
                    .tool_ended(out, &item["id"], "bash", &output, is_error);
            }
            "turn/completed" => {
                self.turn = None;
                // Commands still running when the turn ended were stopped with it.
                for id in std::mem::take(&mut self.running) {
                    let id = Value::String(id);
                    self.conversation
                        .tool_ended(out, &id, "bash", "(aborted)", true);
                }
                let turn = &params["turn"];
                let error = (turn["status"] == "failed").then(|| turn["error"]["message"].clone());
                self.conversation.turn_ended(out, error);
                if let Some(next) = self.queue.pop_front() {
                    self.start_turn(&next, out);
                }
            }
            _ => {}
        }
    }
}

impl Translator for PiRpcTranslator {
    fn start(&mut self, out: &mut Outputs) {
        out.agent_json(&json!({"id": INIT, "method": "initialize",
            "params": {"clientInfo": {"name": "moorline", "title": "moorline", "version": env!("CARGO_PKG_VERSION")},
            // The background-terminal methods an abort needs are experimental.
            "capabilities": {"experimentalApi": true, "requestAttestation": false}}}));
        out.agent_json(&json!({"method": "initialized"}));
        out.agent_json(&json!({"id": THREAD, "method": "thread/start",
            "params": {"approvalPolicy": "untrusted", "sandbox": "danger-full-access"}}));
    }

    fn agent_line(&mut self, line: &str, out: &mut Outputs) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return;
        };
        let method = v["method"].as_str();
        match (method, v.get("id")) {
            // A request from Codex: an approval.
            (Some(m), Some(id)) if m.ends_with("/requestApproval") => {
                let p = &v["params"];
                let client_id = format!("codex-{id}");
                self.approvals.insert(client_id.clone(), id.clone());
                let (tool, detail) = match m {
                    "item/commandExecution/requestApproval" => {
                        ("bash", json!({"command": p["command"], "cwd": p["cwd"]}))
                    }
                    "item/fileChange/requestApproval" => (
                        "apply_patch",
                        json!({"changes": p["changes"], "reason": p["reason"]}),
                    ),
                    _ => ("permissions", p.clone()),
                };
                pirpc::confirm_request(out, &client_id, tool, &detail);
            }
            // Any other request from Codex gets a clear refusal rather than silence.
            (Some(m), Some(id)) => {
                out.agent_json(&json!({"id": id, "error": {"code": -32601, "message": format!("moorline does not handle {m}")}}));
            }
            (Some(m), None) => self.notification(m, &v["params"], out),
            // A response to one of moorline's requests.
            (None, Some(id)) => {
                let id = id.as_str().unwrap_or("").to_owned();
                if id == THREAD {
                    if let Some(err) = v.get("error") {
                        // Without a thread no prompt can run: say why, drop what waited.
                        self.queue.clear();
                        self.conversation
                            .turn_ended(out, Some(err["message"].clone()));
                        return;
                    }
                    self.thread = v["result"]["thread"]["id"].as_str().map(str::to_owned);
                    self.model = v["result"]["model"].as_str().map(str::to_owned);
                    let mut ready = crate::pipeline::ready_frame();
                    ready["model"] = json!({"id": self.model});
                    out.client_json(&ready);
                    if let Some(next) = self.queue.pop_front() {
                        self.start_turn(&next, out);
                    }
                    return;
                }
                match self.requests.remove(&id) {
                    Some(Pending::Client(cid, command)) => {
                        let result = match v.get("error") {
                            None => Ok(None),
                            Some(e) => Err(e["message"].as_str().unwrap_or("failed").to_owned()),
                        };
                        pirpc::respond(out, &cid, &command, result);
                        return;
                    }
                    Some(Pending::Terminals(items)) => {
                        self.end_terminals(&items, &v["result"], out);
                        return;
                    }
                    Some(Pending::Quiet) => return,
                    None => {}
                }
                if let Some(err) = v.get("error") {
                    // A turn/start (no client waits for it) or the handshake failed.
                    let error = err["message"].clone();
                    match self.turn.as_deref() {
                        // A steer refused by the running turn: that turn goes on.
                        Some(turn) if !turn.is_empty() => out.client_json(&json!({
                            "type": "response", "command": "steer", "success": false, "error": error})),
                        // A turn that never started: end it, and go on with what is queued.
                        _ => {
                            self.turn = None;
                            self.conversation.turn_ended(out, Some(error));
                            if let Some(next) = self.queue.pop_front() {
                                self.start_turn(&next, out);
                            }
                        }
                    }
                }
            }
            (None, None) => {}
        }
    }

    fn client_line(&mut self, line: &[u8], out: &mut Outputs) {
        let Some(cmd) = pirpc::parse_command(line, out) else {
            return;
        };
        let id = cmd["id"].clone();
        let kind = cmd["type"].as_str().unwrap_or("").to_owned();
        if self.conversation.answer(out, &id, &kind) {
            return;
        }
        match kind.as_str() {
            "prompt" | "follow_up" | "steer" => {
                pirpc::respond(out, &id, &kind, Ok(None));
                match (&self.turn, kind.as_str()) {
                    // Codex folds a turn/start during a running turn into it: that is a steer.
                    (Some(turn), "steer") if !turn.is_empty() => {
                        let params = json!({"threadId": self.thread, "input": [{"type": "text", "text": cmd["message"]}]});
                        self.request("turn/start", params, None, out);
                    }
                    (Some(_), _) => self.queue.push_back(cmd),
                    (None, _) => self.start_turn(&cmd, out),
                }
            }
            "abort" => {
                self.queue.clear();
                match (&self.thread, &self.turn) {
                    (Some(thread), Some(turn)) if !turn.is_empty() => {
                        let thread = thread.clone();
                        let params = json!({"threadId": thread, "turnId": turn});
                        let pending = Pending::Client(id, "abort".into());
                        self.request("turn/interrupt", params, Some(pending), out);
                        // An approved command goes on after the turn ends: stop it too.
                        if !self.running.is_empty() {
                            let pending = Pending::Terminals(self.running.clone());
                            let params = json!({"threadId": thread});
                            self.request(
                                "thread/backgroundTerminals/list",
                                params,
                                Some(pending),
                                out,
                            );
                        }
                    }
                    _ => pirpc::respond(out, &id, "abort", Ok(None)),
                }
            }
            "get_state" => {
                let data = json!({
                    "model": {"id": self.model, "provider": "openai"},
                    "thinkingLevel": "off",
                    "isStreaming": self.turn.is_some(),
                    "isCompacting": false,
                    "sessionId": self.thread,
                    "messageCount": self.conversation.len(),
                    "pendingMessageCount": self.queue.len(),
                });
                pirpc::respond(out, &id, "get_state", Ok(Some(data)));
            }
            "extension_ui_response" => {
                let Some(codex_id) = cmd["id"].as_str().and_then(|i| self.approvals.remove(i))
                else {
                    return;
                };
                out.agent_json(&codex_approval_answer(
                    &codex_id,
                    Decision::from_confirmed(&cmd),
                ));
            }
            other => pirpc::unsupported(out, &id, "codex", other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays a recorded Codex session (fixtures/transcripts/codex.jsonl) through the
    /// translator and checks what clients would have seen.
    #[test]
    fn a_recorded_session_translates_to_pi_events() {
        let transcript = include_str!("../../fixtures/transcripts/codex.jsonl");
        let mut t = PiRpcTranslator::default();
        let mut seen: Vec<Value> = Vec::new();
        for line in transcript.lines() {
            let entry: Value = serde_json::from_str(line).expect("transcript entry");
            if entry["dir"] != "s2c" {
                continue;
            }
            let mut out = Outputs::default();
            t.agent_line(&entry["msg"].to_string(), &mut out);
            seen.extend(
                out.to_clients
                    .iter()
                    .map(|l| serde_json::from_slice::<Value>(l).expect("json")),
            );
        }
        pirpc::check_event_order(&seen).expect("pi's event order");
        let types: Vec<&str> = seen.iter().filter_map(|v| v["type"].as_str()).collect();
        assert_eq!(
            types.iter().filter(|t| **t == "agent_end").count(),
            3,
            "{types:?}"
        );
        // The history holds the tool call, as the assistant's message, before its result.
        let mut out = Outputs::default();
        t.client_line(br#"{"id":"m","type":"get_messages"}"#, &mut out);
        let answer: Value = serde_json::from_slice(&out.to_clients[0]).expect("json");
        let messages = answer["data"]["messages"].as_array().expect("messages");
        let call = messages
            .iter()
            .position(|m| m["role"] == "assistant" && m["content"][0]["type"] == "toolCall")
            .expect("the message carrying the tool call");
        let call_id = &messages[call]["content"][0]["id"];
        assert_eq!(
            messages[call]["content"][0]["arguments"]["command"],
            "/bin/bash -lc 'touch approved.txt'"
        );
        assert_eq!(messages[call + 1]["role"], "toolResult");
        assert_eq!(&messages[call + 1]["toolCallId"], call_id);
        let text: String = seen
            .iter()
            .filter(|v| v["assistantMessageEvent"]["type"] == "text_delta")
            .filter_map(|v| v["assistantMessageEvent"]["delta"].as_str())
            .collect();
        assert!(text.starts_with("MOCK reply to: hello codex"), "{text}");
        let asks: Vec<&Value> = seen
            .iter()
            .filter(|v| v["type"] == "extension_ui_request")
            .collect();
        assert_eq!(asks.len(), 2);
        assert_eq!(asks[0]["title"], "Run bash?");
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
        assert_eq!(
            (ends[0]["isError"].as_bool(), ends[1]["isError"].as_bool()),
            (Some(false), Some(true))
        );
    }

    #[test]
    fn the_handshake_and_prompts() {
        let mut t = PiRpcTranslator::default();
        let mut out = Outputs::default();
        t.start(&mut out);
        assert_eq!(out.to_agent.len(), 3);
        // A prompt before the thread exists waits for it.
        let mut out = Outputs::default();
        t.client_line(br#"{"id":"p1","type":"prompt","message":"hi"}"#, &mut out);
        assert!(out.to_agent.is_empty());
        let mut out = Outputs::default();
        t.agent_line(
            r#"{"id":"moorline-thread","result":{"thread":{"id":"T1"},"model":"m"}}"#,
            &mut out,
        );
        let sent: Value = serde_json::from_slice(&out.to_agent[0]).expect("json");
        assert_eq!(
            (sent["method"].as_str(), sent["params"]["threadId"].as_str()),
            (Some("turn/start"), Some("T1"))
        );
        // Approvals: the client's answer becomes Codex's decision, by Codex's own request id.
        let mut out = Outputs::default();
        t.agent_line(r#"{"method":"item/commandExecution/requestApproval","id":0,"params":{"command":"ls","cwd":"/w"}}"#, &mut out);
        let ask: Value = serde_json::from_slice(&out.to_clients[0]).expect("json");
        assert_eq!(ask["id"], "codex-0");
        let mut out = Outputs::default();
        t.client_line(
            br#"{"type":"extension_ui_response","id":"codex-0","confirmed":false}"#,
            &mut out,
        );
        let answer: Value = serde_json::from_slice(&out.to_agent[0]).expect("json");
        assert_eq!(answer, json!({"id": 0, "result": {"decision": "decline"}}));
    }

    #[test]
    fn an_abort_stops_the_approved_command_and_ends_its_tool_call() {
        let frames = |out: &Outputs, to_agent: bool| -> Vec<Value> {
            let lines = if to_agent {
                &out.to_agent
            } else {
                &out.to_clients
            };
            lines
                .iter()
                .map(|l| serde_json::from_slice(l).expect("json"))
                .collect()
        };
        let mut t = PiRpcTranslator::default();
        let mut seen = Vec::new();
        let mut out = Outputs::default();
        t.start(&mut out);
        t.agent_line(
            r#"{"id":"moorline-thread","result":{"thread":{"id":"T1"}}}"#,
            &mut out,
        );
        t.client_line(
            br#"{"id":"p","type":"prompt","message":"RUNBASH: sleep 8"}"#,
            &mut out,
        );
        t.agent_line(
            r#"{"method":"turn/started","params":{"turn":{"id":"U1"}}}"#,
            &mut out,
        );
        t.agent_line(
            r#"{"method":"item/started","params":{"item":{"type":"commandExecution","id":"call_1","command":"sleep 8"}}}"#,
            &mut out,
        );
        seen.extend(frames(&out, false));
        let mut out = Outputs::default();
        t.client_line(br#"{"id":"a","type":"abort"}"#, &mut out);
        let sent = frames(&out, true);
        assert_eq!(sent[0]["method"], "turn/interrupt");
        let interrupt = sent[0]["id"].clone();
        assert_eq!(sent[1]["method"], "thread/backgroundTerminals/list");
        let mut out = Outputs::default();
        let list = json!({"id": sent[1]["id"], "result": {"data": [
            {"itemId": "call_0", "processId": "7"}, {"itemId": "call_1", "processId": "8"}]}});
        t.agent_line(&list.to_string(), &mut out);
        let sent = frames(&out, true);
        assert_eq!(sent.len(), 1, "only the aborted turn's command: {sent:?}");
        assert_eq!(
            sent[0]["params"],
            json!({"threadId": "T1", "processId": "8"})
        );
        let mut out = Outputs::default();
        t.agent_line(
            &json!({"id": interrupt, "result": {}}).to_string(),
            &mut out,
        );
        let answer: Value = serde_json::from_slice(&out.to_clients[0]).expect("json");
        assert_eq!(
            (answer["id"].as_str(), answer["success"].as_bool()),
            (Some("a"), Some(true))
        );
        t.agent_line(
            r#"{"method":"turn/completed","params":{"turn":{"id":"U1","status":"interrupted"}}}"#,
            &mut out,
        );
        // Codex reports the killed command after the turn: clients heard of its end already.
        t.agent_line(
            r#"{"method":"item/completed","params":{"item":{"type":"commandExecution","id":"call_1","status":"failed","exitCode":-1}}}"#,
            &mut out,
        );
        seen.extend(
            frames(&out, false)
                .into_iter()
                .filter(|f| f["type"] != "response"),
        );
        pirpc::check_event_order(&seen).expect("pi's event order");
        let ends: Vec<&Value> = seen
            .iter()
            .filter(|f| f["type"] == "tool_execution_end")
            .collect();
        assert_eq!(ends.len(), 1, "{seen:#?}");
        assert_eq!(ends[0]["isError"], true);
        assert_eq!(seen.last().expect("frames")["type"], "agent_end");
    }

    #[test]
    fn a_turn_codex_refuses_to_start_ends_and_the_next_prompt_runs() {
        let mut t = PiRpcTranslator::default();
        t.start(&mut Outputs::default());
        t.agent_line(
            r#"{"id":"moorline-thread","result":{"thread":{"id":"T1"}}}"#,
            &mut Outputs::default(),
        );
        let mut out = Outputs::default();
        t.client_line(br#"{"id":"p1","type":"prompt","message":"one"}"#, &mut out);
        let start: Value = serde_json::from_slice(&out.to_agent[0]).expect("json");
        t.client_line(
            br#"{"id":"p2","type":"prompt","message":"two"}"#,
            &mut Outputs::default(),
        );
        let mut out = Outputs::default();
        let refusal = json!({"id": start["id"], "error": {"code": -1, "message": "quota"}});
        t.agent_line(&refusal.to_string(), &mut out);
        let end: Value = serde_json::from_slice(&out.to_clients[1]).expect("json");
        assert_eq!(
            (end["type"].as_str(), end["error"].as_str()),
            (Some("agent_end"), Some("quota"))
        );
        let next: Value = serde_json::from_slice(&out.to_agent[0]).expect("json");
        assert_eq!(
            next["params"]["input"][0]["text"], "two",
            "the queued prompt runs"
        );
    }
}
