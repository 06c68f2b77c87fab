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
//! - `native`: app-server JSON-RPC through [`NativeGuard`]'s allow-list, threads and turns
//!   pinned to moorline's policy (clients do the handshake themselves); approvals are
//!   `item/commandExecution/requestApproval` requests and their results;
//! - `pi-rpc` (default): [`PiRpcTranslator`] does the handshake and turns pi commands and
//!   events into Codex's and back, approvals becoming `extension_ui_request` confirms.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::{Value, json};

use crate::conversation::{self as conv, Continuation, ConversationPlace};
use crate::gate::{self, Rejection, Verdict};
use crate::pipeline::{Decision, Dialect, Outputs, Translator, codex_approval_answer};
use crate::pirpc::{self, Conversation};
use crate::{Adapter, AdapterConfig, AdapterError, LaunchContext, LaunchSettings, LaunchSpec};

/// Launches `codex app-server`.
#[derive(Debug, Clone)]
pub struct CodexAdapter {
    launch: LaunchSettings,
    /// Clients speak pi-rpc rather than the agent's own protocol.
    pi_rpc: bool,
    /// What this start does with the conversation.
    continuation: Continuation,
}

impl CodexAdapter {
    /// A Codex adapter for an instance (`dialect`: `pi-rpc`, the default, or `native`).
    pub fn new(config: &AdapterConfig) -> Result<Self, AdapterError> {
        Ok(Self {
            launch: LaunchSettings::new(config, "codex"),
            pi_rpc: pirpc::wants_pi_rpc(config, "codex")?,
            continuation: config.continuation.clone(),
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
            conversation: self.continuation.resume.clone(),
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
            Box::new(PiRpcTranslator {
                resuming: self.continuation.resume.clone(),
                ..PiRpcTranslator::default()
            })
        } else {
            Box::new(NativeGuard)
        }
    }

    fn protected_env(&self) -> &'static [&'static str] {
        // Another Codex home holds another configuration (approval policy, providers).
        &["CODEX_*", "OPENAI_*"]
    }

    /// The thread the last run reported (`thread/start`'s answer); whether Codex still has
    /// it shows when `thread/resume` answers. In `native`, clients start and resume threads
    /// themselves.
    fn find_conversation(&self, place: &ConversationPlace<'_>) -> Result<Option<String>, String> {
        match place.recorded {
            _ if !self.pi_rpc => Ok(None),
            None => Ok(None),
            Some(id) if conv::plain_id(id) => Ok(Some(id.to_owned())),
            Some(id) => Err(format!("the recorded thread id {id:?} is not Codex's")),
        }
    }
}

/// Codex's approval policy for every thread: ask before every command.
pub const APPROVAL_POLICY: &str = "untrusted";
/// Codex's sandbox for every thread: none of its own (moorline's container is the sandbox),
/// so an approved command runs exactly as approved, once.
pub const SANDBOX: &str = "danger-full-access";

/// Methods a `native` client may call as they are: the handshake, turns, and what only reads
/// or names conversations.
pub const METHODS: &[&str] = &[
    "initialize",
    "initialized",
    "turn/steer",
    "turn/interrupt",
    "thread/archive",
    "thread/unarchive",
    "thread/unsubscribe",
    "thread/name/set",
    "thread/goal/set",
    "thread/goal/get",
    "thread/goal/clear",
    "thread/metadata/update",
    "thread/compact/start",
    "thread/list",
    "thread/loaded/list",
    "thread/read",
    "thread/turns/list",
    "thread/items/list",
    "model/list",
    "modelProvider/list",
    "modelProvider/capabilities/read",
    "experimentalFeature/list",
    "permissionProfile/list",
    "mcpServerStatus/list",
    "skills/list",
    "hooks/list",
    "plugin/list",
    "plugin/installed",
    "plugin/read",
    "app/list",
    "app/read",
    "app/installed",
    "config/read",
    "configRequirements/read",
    "account/read",
    "account/rateLimits/read",
    "account/usage/read",
    "fuzzyFileSearch",
];

/// Methods that run commands or tools, or write files or configuration, with nobody approving.
pub const UNAPPROVED: &[&str] = &[
    "command/exec",
    "command/exec/write",
    "command/exec/terminate",
    "command/exec/resize",
    "thread/shellCommand",
    "thread/approveGuardianDeniedAction",
    "thread/inject_items",
    "mcpServer/tool/call",
    "fs/writeFile",
    "fs/createDirectory",
    "fs/remove",
    "fs/copy",
    "config/value/write",
    "config/batchWrite",
    "modelProvider/config/write",
    "skills/config/write",
    "skills/extraRoots/set",
    "experimentalFeature/enablement/set",
    "plugin/install",
    "plugin/uninstall",
    "marketplace/add",
    "externalAgentConfig/import",
];

/// Params of `thread/start`, `thread/resume` and `thread/fork` a client may set, besides the
/// pinned `approvalPolicy` and `sandbox`.
pub const THREAD_PARAMS: &[&str] = &[
    "threadId",
    "model",
    "modelProvider",
    "cwd",
    "baseInstructions",
    "developerInstructions",
    "ephemeral",
    "serviceName",
    "serviceTier",
    "personality",
    "threadSource",
    "sessionStartSource",
    "historyMode",
    "excludeTurns",
    "initialTurnsPage",
    "lastTurnId",
    "beforeTurnId",
    "approvalPolicy",
    "sandbox",
    "approvalsReviewer",
];

/// Params of `turn/start` a client may set, besides the pinned `approvalPolicy` and
/// `sandboxPolicy`.
pub const TURN_PARAMS: &[&str] = &[
    "threadId",
    "input",
    "model",
    "effort",
    "summary",
    "cwd",
    "personality",
    "outputSchema",
    "serviceTier",
    "serviceTierForTurn",
    "clientUserMessageId",
    "additionalContext",
    "approvalPolicy",
    "sandboxPolicy",
    "approvalsReviewer",
];

/// The `native` dialect: Codex's app-server JSON-RPC, through an allow-list (see
/// [`crate::gate`]). `thread/start`, `thread/resume`, `thread/fork` and `turn/start` are
/// pinned to [`APPROVAL_POLICY`] and [`SANDBOX`] (set when absent, refused when different),
/// [`METHODS`] pass, and every other request is refused with `amarre.input_rejected` and a
/// JSON-RPC error, [`UNAPPROVED`] ones as running without approval. Answers to Codex's
/// requests pass, except that a decision which would stop future approvals
/// (`acceptForSession`, policy amendments) is pinned to a one-time one.
#[derive(Debug, Default, Clone, Copy)]
pub struct NativeGuard;

impl NativeGuard {
    /// Decides what happens to one parsed client line.
    pub fn screen(mut v: Value) -> Verdict {
        let Some(method) = v.get("method").map(|m| m.as_str().map(str::to_owned)) else {
            if v.get("id").is_none() {
                return Verdict::Refuse(
                    Rejection::new(
                        gate::NOT_ALLOWED,
                        "a JSON-RPC message needs a method or an id",
                    ),
                    None,
                );
            }
            let note = Self::pin_decision(&mut v["result"]);
            return Verdict::Forward(v, note);
        };
        let method = method.unwrap_or_default();
        let refusal = match method.as_str() {
            m if METHODS.contains(&m) => None,
            "thread/start" | "thread/resume" | "thread/fork" => {
                Self::pin(&mut v, THREAD_PARAMS, "sandbox", json!(SANDBOX))
            }
            "turn/start" => Self::pin(
                &mut v,
                TURN_PARAMS,
                "sandboxPolicy",
                json!({"type": "dangerFullAccess"}),
            ),
            "review/start" => (!v["params"]["delivery"].is_null()
                && v["params"]["delivery"] != "inline")
                .then(|| {
                    Rejection::new(
                        gate::NOT_ALLOWED,
                        "review/start may only deliver inline (a detached review starts a thread moorline has not pinned)",
                    )
                }),
            m if UNAPPROVED.contains(&m) || m.starts_with("process/") => Some(Rejection::new(
                gate::RUNS_WITHOUT_APPROVAL,
                format!("{m} runs a command or changes files or configuration with nobody approving it"),
            )),
            m => Some(Rejection::new(
                gate::NOT_ALLOWED,
                format!("{m:?} is not a method moorline lets clients call (see docs/ADAPTERS.md)"),
            )),
        };
        match refusal {
            None => Verdict::Forward(v, None),
            Some(rejection) => {
                let reply = v.get("id").map(|id| {
                    json!({"id": id, "error": {"code": -32600,
                        "message": format!("moorline: {}", rejection.error)}})
                });
                Verdict::Refuse(rejection, reply)
            }
        }
    }

    /// Pins a thread or turn request to moorline's policy: `approvalPolicy` and the sandbox
    /// field must be absent, null or moorline's (and are set to moorline's), approvals go to
    /// the user, and no other param may touch permissions.
    fn pin(
        v: &mut Value,
        allowed: &[&str],
        sandbox_key: &str,
        sandbox: Value,
    ) -> Option<Rejection> {
        let params = &v["params"];
        if !params.is_null() && !params.is_object() {
            return Some(Rejection::new(
                gate::NOT_ALLOWED,
                "params must be an object",
            ));
        }
        let policy = &params["approvalPolicy"];
        if !policy.is_null() && *policy != APPROVAL_POLICY {
            return Some(Rejection::new(
                gate::PERMISSION_CHANGE,
                format!("approvalPolicy stays {APPROVAL_POLICY:?} (asked for {policy})"),
            ));
        }
        let asked = &params[sandbox_key];
        if !asked.is_null() && *asked != sandbox {
            return Some(Rejection::new(
                gate::PERMISSION_CHANGE,
                format!("{sandbox_key} stays {sandbox} (asked for {asked})"),
            ));
        }
        let reviewer = &params["approvalsReviewer"];
        if !reviewer.is_null() && *reviewer != "user" {
            return Some(Rejection::new(
                gate::PERMISSION_CHANGE,
                format!(
                    "approvalsReviewer stays \"user\" (asked for {reviewer}): a person answers approvals"
                ),
            ));
        }
        let extra = gate::unexpected_keys(params, allowed);
        if !extra.is_empty() {
            return Some(Rejection::new(
                gate::PERMISSION_CHANGE,
                format!(
                    "{} may not be set through moorline (they can change approvals, the sandbox, tools or configuration)",
                    extra.join(", ")
                ),
            ));
        }
        if !v["params"].is_object() {
            v["params"] = json!({});
        }
        v["params"]["approvalPolicy"] = json!(APPROVAL_POLICY);
        v["params"][sandbox_key] = sandbox;
        None
    }

    /// Keeps an approval answer to this one call: `acceptForSession` becomes `accept`; a
    /// decision carrying a policy amendment becomes `decline`, as the pipeline reported it.
    fn pin_decision(result: &mut Value) -> Option<Rejection> {
        let decision = result.get("decision")?;
        let pinned = match decision {
            Value::String(d) if matches!(d.as_str(), "accept" | "decline" | "cancel") => {
                return None;
            }
            Value::String(d) if d == "acceptForSession" => "accept",
            _ => "decline",
        };
        let note = Rejection::new(
            gate::PERMISSION_CHANGE,
            format!(
                "decision {decision} would let later calls run unasked; forwarded as {pinned:?} (moorline asks for every call)"
            ),
        );
        result["decision"] = json!(pinned);
        Some(note)
    }
}

impl Translator for NativeGuard {
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
    /// The thread to continue, until Codex has answered `thread/resume`.
    resuming: Option<String>,
    /// The thread Codex runs, not yet reported for the session's record.
    news: Option<conv::ConversationNews>,
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
    fn restore_messages(&mut self, messages: Vec<Value>) {
        self.conversation.restore(messages);
    }

    fn start(&mut self, out: &mut Outputs) {
        out.agent_json(&json!({"id": INIT, "method": "initialize",
            "params": {"clientInfo": {"name": "moorline", "title": "moorline", "version": env!("CARGO_PKG_VERSION")},
            // The background-terminal methods an abort needs are experimental.
            "capabilities": {"experimentalApi": true, "requestAttestation": false}}}));
        out.agent_json(&json!({"method": "initialized"}));
        match &self.resuming {
            Some(thread) => out.agent_json(&json!({"id": THREAD, "method": "thread/resume",
                "params": {"threadId": thread, "approvalPolicy": APPROVAL_POLICY, "sandbox": SANDBOX}})),
            None => out.agent_json(&json!({"id": THREAD, "method": "thread/start",
                "params": {"approvalPolicy": APPROVAL_POLICY, "sandbox": SANDBOX}})),
        }
    }

    fn take_conversation(&mut self) -> Option<conv::ConversationNews> {
        self.news.take()
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
                    let resumed = self.resuming.take();
                    if let (Some(thread), Some(err)) = (&resumed, v.get("error")) {
                        // The thread cannot be continued: say so, and start a new one.
                        let reason = err["message"].as_str().unwrap_or("thread/resume failed");
                        out.client_json(&conv::resume_failed_frame(Some(thread), reason));
                        out.agent_json(&json!({"id": THREAD, "method": "thread/start",
                            "params": {"approvalPolicy": APPROVAL_POLICY, "sandbox": SANDBOX}}));
                        return;
                    }
                    if let Some(err) = v.get("error") {
                        // Without a thread no prompt can run: say why, drop what waited.
                        self.queue.clear();
                        self.conversation
                            .turn_ended(out, Some(err["message"].clone()));
                        return;
                    }
                    self.thread = v["result"]["thread"]["id"].as_str().map(str::to_owned);
                    self.news = self.thread.clone().map(|id| conv::ConversationNews {
                        id,
                        resumed: resumed.is_some(),
                    });
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
        let Some((cmd, id, kind)) = self.conversation.take_command(line, out) else {
            return;
        };
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

    fn json_lines(lines: &[Vec<u8>]) -> Vec<Value> {
        lines
            .iter()
            .map(|l| serde_json::from_slice(l).expect("json"))
            .collect()
    }

    /// A start that continues a thread asks `thread/resume`; when Codex cannot, clients are
    /// told and a new thread starts; either way the thread is reported for the record.
    #[test]
    fn resuming_a_thread_and_falling_back_to_a_new_one() {
        let adapter = CodexAdapter::new(&AdapterConfig {
            agent: "codex".into(),
            continuation: Continuation {
                resume: Some("T0".into()),
                ..Continuation::default()
            },
            ..Default::default()
        })
        .expect("adapter");
        let mut t = adapter.translator();
        let mut out = Outputs::default();
        t.start(&mut out);
        let sent = json_lines(&out.to_agent);
        assert_eq!(sent[2]["method"], "thread/resume");
        assert_eq!(sent[2]["params"]["threadId"], "T0");
        assert_eq!(sent[2]["params"]["approvalPolicy"], APPROVAL_POLICY);

        let mut out = Outputs::default();
        t.agent_line(
            r#"{"id":"moorline-thread","error":{"code":-32600,"message":"no rollout found for thread id T0"}}"#,
            &mut out,
        );
        let told = json_lines(&out.to_clients);
        assert_eq!(told[0]["type"], "amarre.resume_failed");
        assert_eq!(told[0]["conversation"], "T0");
        assert!(
            told[0]["reason"]
                .as_str()
                .expect("reason")
                .contains("no rollout")
        );
        assert_eq!(json_lines(&out.to_agent)[0]["method"], "thread/start");
        assert_eq!(t.take_conversation(), None, "no thread yet");

        let mut out = Outputs::default();
        t.agent_line(
            r#"{"id":"moorline-thread","result":{"thread":{"id":"T1"},"model":"m"}}"#,
            &mut out,
        );
        assert_eq!(json_lines(&out.to_clients)[0]["type"], "amarre.agent_ready");
        assert_eq!(
            t.take_conversation(),
            Some(conv::ConversationNews {
                id: "T1".into(),
                resumed: false
            })
        );
        assert_eq!(t.take_conversation(), None, "reported once");
    }

    #[test]
    fn a_resumed_thread_is_reported_as_resumed() {
        let mut t = PiRpcTranslator {
            resuming: Some("T0".into()),
            ..PiRpcTranslator::default()
        };
        let mut out = Outputs::default();
        t.start(&mut out);
        t.agent_line(
            r#"{"id":"moorline-thread","result":{"thread":{"id":"T0"},"model":"m"}}"#,
            &mut out,
        );
        assert_eq!(
            t.take_conversation(),
            Some(conv::ConversationNews {
                id: "T0".into(),
                resumed: true
            })
        );
    }

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

    /// What a native client line becomes: (lines for Codex, frames for clients).
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

    fn refused(line: Value, reason: &str) {
        let (to_agent, to_clients) = guard(line.clone());
        assert!(to_agent.is_empty(), "{line} reached Codex");
        assert_eq!(to_clients[0]["type"], "amarre.input_rejected", "{line}");
        assert_eq!(to_clients[0]["reason"], reason, "{line}: {}", to_clients[0]);
        assert_eq!(
            to_clients[1]["id"], line["id"],
            "a JSON-RPC error answers the request"
        );
        assert_eq!(to_clients[1]["error"]["code"], -32600);
    }

    #[test]
    fn threads_and_turns_cannot_widen_the_policy() {
        for method in ["thread/start", "thread/resume", "thread/fork"] {
            refused(
                json!({"id": 1, "method": method, "params": {"approvalPolicy": "never", "sandbox": "danger-full-access"}}),
                gate::PERMISSION_CHANGE,
            );
            refused(
                json!({"id": 2, "method": method, "params": {"sandbox": "workspace-write"}}),
                gate::PERMISSION_CHANGE,
            );
            refused(
                json!({"id": 3, "method": method, "params": {"config": {"approval_policy": "never"}}}),
                gate::PERMISSION_CHANGE,
            );
            refused(
                json!({"id": 4, "method": method, "params": {"approvalsReviewer": "auto_review"}}),
                gate::PERMISSION_CHANGE,
            );
            refused(
                json!({"id": 5, "method": method, "params": {"permissions": "full"}}),
                gate::PERMISSION_CHANGE,
            );
            refused(
                json!({"id": 6, "method": method, "params": {"approvalPolicy": {"granular": {"rules": false, "mcp_elicitations": false, "sandbox_approval": false}}}}),
                gate::PERMISSION_CHANGE,
            );
        }
        refused(
            json!({"id": 7, "method": "turn/start", "params": {"threadId": "T", "input": [], "approvalPolicy": "on-request"}}),
            gate::PERMISSION_CHANGE,
        );
        refused(
            json!({"id": 8, "method": "turn/start", "params": {"threadId": "T", "input": [], "sandboxPolicy": {"type": "readOnly"}}}),
            gate::PERMISSION_CHANGE,
        );
        refused(
            json!({"id": 9, "method": "turn/start", "params": {"threadId": "T", "input": [], "permissions": "p"}}),
            gate::PERMISSION_CHANGE,
        );
    }

    #[test]
    fn threads_and_turns_are_pinned_to_moorlines_policy() {
        let (to_agent, to_clients) =
            guard(json!({"id": 1, "method": "thread/start", "params": {"model": "m"}}));
        assert!(to_clients.is_empty());
        assert_eq!(
            to_agent[0]["params"],
            json!({"model": "m", "approvalPolicy": "untrusted", "sandbox": "danger-full-access"})
        );
        let (to_agent, _) = guard(
            json!({"id": 2, "method": "thread/resume", "params": {"threadId": "T",
            "approvalPolicy": "untrusted", "sandbox": "danger-full-access"}}),
        );
        assert_eq!(to_agent[0]["params"]["approvalPolicy"], "untrusted");
        let (to_agent, _) = guard(
            json!({"id": 3, "method": "turn/start", "params": {"threadId": "T",
            "input": [{"type": "text", "text": "hi"}]}}),
        );
        assert_eq!(
            (
                &to_agent[0]["params"]["approvalPolicy"],
                &to_agent[0]["params"]["sandboxPolicy"]
            ),
            (&json!("untrusted"), &json!({"type": "dangerFullAccess"}))
        );
    }

    #[test]
    fn methods_that_run_or_write_without_approval_are_refused() {
        for method in [
            "command/exec",
            "thread/shellCommand",
            "config/value/write",
            "config/batchWrite",
            "fs/writeFile",
            "mcpServer/tool/call",
            "plugin/install",
            "process/spawn",
            "thread/approveGuardianDeniedAction",
        ] {
            refused(
                json!({"id": 1, "method": method, "params": {"command": ["touch", "x"]}}),
                gate::RUNS_WITHOUT_APPROVAL,
            );
        }
        for method in [
            "account/login/start",
            "account/logout",
            "fs/readFile",
            "execOneOffCommand",
            "newConversation",
        ] {
            refused(
                json!({"id": 1, "method": method, "params": {}}),
                gate::NOT_ALLOWED,
            );
        }
        refused(
            json!({"id": 1, "method": "review/start", "params": {"threadId": "T", "delivery": "detached"}}),
            gate::NOT_ALLOWED,
        );
    }

    #[test]
    fn chat_clients_still_work_and_answers_stay_one_time() {
        for line in [
            json!({"id": 0, "method": "initialize", "params": {"clientInfo": {"name": "c", "version": "1"}}}),
            json!({"method": "initialized"}),
            json!({"id": 1, "method": "turn/interrupt", "params": {"threadId": "T", "turnId": "U"}}),
            json!({"id": 2, "method": "thread/list", "params": {}}),
            json!({"id": 0, "result": {"decision": "accept"}}),
            json!({"id": 1, "result": {"decision": "decline"}}),
        ] {
            let (to_agent, to_clients) = guard(line.clone());
            assert_eq!(to_agent, vec![line.clone()], "{line}");
            assert!(to_clients.is_empty(), "{line}");
        }
        let (to_agent, to_clients) =
            guard(json!({"id": 3, "result": {"decision": "acceptForSession"}}));
        assert_eq!(to_agent[0]["result"]["decision"], "accept");
        assert_eq!(to_clients[0]["forwarded"], true);
        let (to_agent, to_clients) = guard(json!({"id": 4, "result": {"decision":
            {"acceptWithExecpolicyAmendment": {"execpolicy_amendment": ["touch"]}}}}));
        assert_eq!(
            to_agent[0]["result"]["decision"], "decline",
            "as the pipeline reported it"
        );
        assert_eq!(to_clients[0]["reason"], gate::PERMISSION_CHANGE);
    }

    #[test]
    fn pi_rpc_bash_is_refused_not_translated() {
        let mut t = PiRpcTranslator::default();
        let mut out = Outputs::default();
        t.client_line(br#"{"id":"b","type":"bash","command":"touch x"}"#, &mut out);
        assert!(out.to_agent.is_empty());
        let frame: Value = serde_json::from_slice(&out.to_clients[0]).expect("json");
        assert_eq!(frame["reason"], gate::RUNS_WITHOUT_APPROVAL);
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
