//! What happens to each line between an agent and its clients: translation between the agent's
//! wire format and the dialect clients speak, and the approval rules.
//!
//! A [`Pipeline`] runs wherever an agent's stdio is: in the server for the `process` runtime,
//! in the session keeper for the durable ones. It sees every line in both directions, in order:
//!
//! - [`Pipeline::agent_line`]: an output line of the agent → lines for clients (and, sometimes,
//!   lines straight back to the agent, such as an automatic approval);
//! - [`Pipeline::client_line`]: a line from a client → lines for the agent (and, sometimes,
//!   lines for clients, such as the answer to a command the translator handles itself);
//! - [`Pipeline::expire`]: approval requests whose time is up get the configured answer.
//!
//! Approval requests (in the client dialect) are tracked until answered. The **first** answer
//! wins: it is forwarded to the agent and every client gets an `amarre.approval_resolved`
//! frame saying how the request was settled (and, for a person's answer, who gave it: the
//! `user` passed to [`Pipeline::client_line_from`]); later answers to the same request are
//! dropped. Each settlement is also kept as a [`Resolution`] for the audit log
//! ([`Pipeline::take_resolutions`]).

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use memchr::memmem;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Lines produced by one step of the pipeline.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outputs {
    /// Lines for the agent's stdin (without their final `\n`).
    pub to_agent: Vec<Vec<u8>>,
    /// Lines for clients (without their final `\n`), in order.
    pub to_clients: Vec<Vec<u8>>,
}

impl Outputs {
    /// Adds a JSON line for clients.
    pub fn client_json(&mut self, value: &Value) {
        self.to_clients.push(value.to_string().into_bytes());
    }

    /// Adds a JSON line for the agent.
    pub fn agent_json(&mut self, value: &Value) {
        self.to_agent.push(value.to_string().into_bytes());
    }
}

/// Translates between an agent's wire format and the dialect its clients speak. It keeps
/// whatever state that needs (turns in flight, history, pending tool inputs).
pub trait Translator: Send {
    /// An output line of the agent (valid UTF-8, no newline).
    fn agent_line(&mut self, line: &str, out: &mut Outputs);

    /// A line from a client (any bytes; never forward a malformed one to an agent that dies
    /// on it).
    fn client_line(&mut self, line: &[u8], out: &mut Outputs);

    /// Lines to send the agent as soon as it starts (a handshake), and lines for clients.
    fn start(&mut self, _out: &mut Outputs) {}

    /// True if this translator leaves every line unchanged (enables a fast path).
    fn passes_through(&self) -> bool {
        false
    }

    /// True if it leaves every agent line unchanged (though it may change client lines).
    fn passes_agent_lines_through(&self) -> bool {
        self.passes_through()
    }

    /// A conversation the agent reported since the last call (for the session's record).
    fn take_conversation(&mut self) -> Option<crate::conversation::ConversationNews> {
        None
    }

    /// The messages (pi's shapes) of the conversation this run continues, oldest first, for a
    /// translator that answers `get_messages` itself. Agents that keep their history answer
    /// from it and ignore this.
    fn restore_messages(&mut self, _messages: Vec<Value>) {}
}

/// Lines pass through untouched: for agents that speak the client dialect themselves.
#[derive(Debug, Default, Clone, Copy)]
pub struct Passthrough;

impl Translator for Passthrough {
    fn agent_line(&mut self, line: &str, out: &mut Outputs) {
        out.to_clients.push(line.as_bytes().to_vec());
    }

    fn client_line(&mut self, line: &[u8], out: &mut Outputs) {
        out.to_agent.push(line.to_vec());
    }

    fn passes_through(&self) -> bool {
        true
    }
}

/// How approval requests and answers look in the dialect clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Dialect {
    /// pi's RPC protocol: `extension_ui_request` / `extension_ui_response` (what amarre's
    /// clients speak).
    #[default]
    PiRpc,
    /// Claude Code's stream-json: `control_request` `can_use_tool` / `control_response`.
    ClaudeNative,
    /// Codex's app-server JSON-RPC: `…/requestApproval` requests and their results.
    CodexNative,
}

/// An answer to an approval request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Let the tool run.
    Allow,
    /// Refuse it.
    #[default]
    Deny,
}

impl Decision {
    /// The decision in a pi `extension_ui_response`: allow only on `"confirmed": true`.
    pub fn from_confirmed(response: &Value) -> Self {
        if response["confirmed"] == true {
            Decision::Allow
        } else {
            Decision::Deny
        }
    }

    /// The name used in frames.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

/// Which tool calls need a person's approval, and what happens when nobody answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ApprovalPolicy {
    /// Tools that always need approval; `None` means every tool. Others are allowed at once.
    pub tools: Option<Vec<String>>,
    /// How long a request may stay unanswered.
    pub timeout: Option<Duration>,
    /// The answer given when the timeout passes.
    pub default: Decision,
}

impl ApprovalPolicy {
    fn needs_approval(&self, tool: Option<&str>) -> bool {
        match (&self.tools, tool) {
            (None, _) | (Some(_), None) => true,
            (Some(list), Some(tool)) => list
                .iter()
                .any(|t| t == "*" || t.eq_ignore_ascii_case(tool)),
        }
    }
}

/// A request waiting for an answer.
#[derive(Debug, Clone)]
struct Pending {
    request: Value,
    tool: Option<String>,
    deadline: Option<Instant>,
}

/// How one approval request was settled, for the audit log. Holds no tool input (it may carry
/// secrets): the tool's name and the request id only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    /// The request id, as clients saw it.
    pub id: String,
    /// `allow`, `deny` or `answered` (a non yes/no dialog).
    pub decision: String,
    /// `client` (a person), `policy` or `timeout`.
    pub by: String,
    /// Who answered, for a client's answer: a tailnet login, `token` or `local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The tool the request was about, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
}

/// A parsed approval request.
#[derive(Debug, Clone, PartialEq)]
struct Request {
    id: String,
    tool: Option<String>,
    /// A yes/no question (an answer can be synthesised for it).
    yes_no: bool,
}

/// Substrings that every approval request or answer of a dialect contains: a line without one
/// is passed on without being parsed. Built once, since building a searcher costs more than
/// searching one line.
struct Markers {
    pi_request: memmem::Finder<'static>,
    pi_response: memmem::Finder<'static>,
    claude_request: memmem::Finder<'static>,
    claude_response: memmem::Finder<'static>,
    codex_request: memmem::Finder<'static>,
    codex_response: memmem::Finder<'static>,
}

static MARKERS: LazyLock<Markers> = LazyLock::new(|| Markers {
    pi_request: memmem::Finder::new(b"extension_ui_request"),
    pi_response: memmem::Finder::new(b"extension_ui_response"),
    claude_request: memmem::Finder::new(b"can_use_tool"),
    claude_response: memmem::Finder::new(b"control_response"),
    codex_request: memmem::Finder::new(b"requestApproval"),
    codex_response: memmem::Finder::new(b"decision"),
});

impl Dialect {
    /// Cheap test before parsing: could this line be an approval request?
    fn may_be_request(self, line: &[u8]) -> bool {
        let finder = match self {
            Dialect::PiRpc => &MARKERS.pi_request,
            Dialect::ClaudeNative => &MARKERS.claude_request,
            Dialect::CodexNative => &MARKERS.codex_request,
        };
        finder.find(line).is_some()
    }

    fn may_be_response(self, line: &[u8]) -> bool {
        let finder = match self {
            Dialect::PiRpc => &MARKERS.pi_response,
            Dialect::ClaudeNative => &MARKERS.claude_response,
            Dialect::CodexNative => &MARKERS.codex_response,
        };
        finder.find(line).is_some()
    }

    fn request(self, v: &Value) -> Option<Request> {
        match self {
            Dialect::PiRpc => {
                if v["type"] != "extension_ui_request" {
                    return None;
                }
                let method = v["method"].as_str()?;
                // Only dialogs wait for an answer; notify/setStatus/... are fire-and-forget.
                if !matches!(method, "confirm" | "select" | "input" | "editor") {
                    return None;
                }
                let id = v["id"].as_str()?.to_owned();
                let tool = v["title"]
                    .as_str()
                    .and_then(|t| t.strip_prefix("Run "))
                    .and_then(|t| t.strip_suffix('?'))
                    .filter(|t| !t.contains(' '))
                    .map(str::to_owned);
                Some(Request {
                    id,
                    tool,
                    yes_no: method == "confirm",
                })
            }
            Dialect::ClaudeNative => {
                if v["type"] != "control_request" || v["request"]["subtype"] != "can_use_tool" {
                    return None;
                }
                Some(Request {
                    id: v["request_id"].as_str()?.to_owned(),
                    tool: v["request"]["tool_name"].as_str().map(str::to_owned),
                    yes_no: true,
                })
            }
            Dialect::CodexNative => {
                let method = v["method"].as_str()?;
                if !method.ends_with("/requestApproval") {
                    return None;
                }
                let tool = match method {
                    "item/commandExecution/requestApproval" => "bash",
                    "item/fileChange/requestApproval" => "apply_patch",
                    _ => "permissions",
                };
                Some(Request {
                    id: v.get("id")?.to_string(),
                    tool: Some(tool.to_owned()),
                    yes_no: true,
                })
            }
        }
    }

    /// The id a response answers, and how.
    fn response(self, v: &Value) -> Option<(String, &'static str)> {
        match self {
            Dialect::PiRpc => {
                if v["type"] != "extension_ui_response" {
                    return None;
                }
                let id = v["id"].as_str()?.to_owned();
                let decision = if v["confirmed"] == true {
                    "allow"
                } else if v["confirmed"] == false || v["cancelled"] == true {
                    "deny"
                } else {
                    "answered"
                };
                Some((id, decision))
            }
            Dialect::ClaudeNative => {
                if v["type"] != "control_response" {
                    return None;
                }
                let r = &v["response"];
                let id = r["request_id"].as_str()?.to_owned();
                let decision = match r["response"]["behavior"].as_str() {
                    Some("allow") => "allow",
                    _ => "deny",
                };
                Some((id, decision))
            }
            Dialect::CodexNative => {
                // A response has an id and a result, and no method.
                if v.get("method").is_some() {
                    return None;
                }
                let id = v.get("id")?.to_string();
                let decision = match v["result"]["decision"].as_str() {
                    Some("accept" | "acceptForSession") => "allow",
                    _ => "deny",
                };
                Some((id, decision))
            }
        }
    }

    /// The answer a client would send, for automatic and default answers.
    fn answer(self, request: &Value, decision: Decision, reason: &str) -> Value {
        match self {
            Dialect::PiRpc => json!({
                "type": "extension_ui_response",
                "id": request["id"],
                "confirmed": decision == Decision::Allow,
            }),
            Dialect::ClaudeNative => claude_permission_answer(
                &request["request_id"],
                &request["request"]["input"],
                decision,
                reason,
            ),
            Dialect::CodexNative => codex_approval_answer(&request["id"], decision),
        }
    }
}

/// For a client answering an approval request it was shown, whatever the dialect: the
/// request's id (as `amarre.approval_resolved` and the pending lists name it) and the line that
/// answers it with `decision` (`reason` tells a denied Claude why). `None`: not a request.
pub fn answer_request(
    request: &Value,
    decision: Decision,
    reason: &str,
) -> Option<(String, Value)> {
    [Dialect::PiRpc, Dialect::ClaudeNative, Dialect::CodexNative]
        .into_iter()
        .find_map(|d| {
            let r = d.request(request)?;
            Some((r.id, d.answer(request, decision, reason)))
        })
}

/// The tool an approval request is about, if it says (whatever the dialect).
pub fn request_tool(request: &Value) -> Option<String> {
    [Dialect::PiRpc, Dialect::ClaudeNative, Dialect::CodexNative]
        .into_iter()
        .find_map(|d| d.request(request))
        .and_then(|r| r.tool)
}

/// Claude Code's answer to a `can_use_tool` request: an allow runs the tool with its original
/// input; a deny tells Claude why.
pub(crate) fn claude_permission_answer(
    request_id: &Value,
    input: &Value,
    decision: Decision,
    reason: &str,
) -> Value {
    let response = match decision {
        Decision::Allow => json!({"behavior": "allow", "updatedInput": input}),
        Decision::Deny => json!({"behavior": "deny", "message": reason}),
    };
    json!({
        "type": "control_response",
        "response": {"subtype": "success", "request_id": request_id, "response": response},
    })
}

/// Codex's answer to one of its approval requests.
pub(crate) fn codex_approval_answer(id: &Value, decision: Decision) -> Value {
    let decision = match decision {
        Decision::Allow => "accept",
        Decision::Deny => "decline",
    };
    json!({"id": id, "result": {"decision": decision}})
}

/// The frame that tells clients the agent is ready for its first command.
pub fn ready_frame() -> Value {
    json!({"type": "amarre.agent_ready"})
}

/// The frame every client gets when an approval request is settled.
pub fn resolved_frame(id: &str, decision: &str, by: &str) -> Value {
    json!({"type": "amarre.approval_resolved", "id": id, "decision": decision, "by": by})
}

/// `amarre.auth_failed`: the agent reported that its credentials are missing or wrong.
pub fn auth_failed_frame(instance_id: Option<&str>) -> Value {
    let mut frame = json!({
        "type": "amarre.auth_failed",
        "message": "the instance's credentials are missing or wrong: the agent could not log in \
                    to its model API (check the instance's credentials_file or its login)",
    });
    if let Some(id) = instance_id {
        frame["instanceId"] = id.into();
    }
    frame
}

/// Translation plus approval rules for one agent run.
pub struct Pipeline {
    translator: Box<dyn Translator>,
    dialect: Dialect,
    policy: ApprovalPolicy,
    pending: BTreeMap<String, Pending>,
    /// Ids already settled, so late answers are recognised and dropped (bounded).
    settled: std::collections::VecDeque<String>,
    /// Set when the pending set changed since the last call to [`Pipeline::take_changed`].
    changed: bool,
    /// Settlements not yet taken by [`Pipeline::take_resolutions`].
    resolutions: Vec<Resolution>,
    /// The instance, named in `amarre.auth_failed`.
    instance_id: Option<String>,
    /// Whether this run reported an authentication failure (told to clients once).
    auth_failed: bool,
    /// Set when it did, until [`Pipeline::take_auth_failed`].
    auth_news: bool,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("dialect", &self.dialect)
            .field("pending", &self.pending.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

const SETTLED_MEMORY: usize = 1024;

impl Pipeline {
    /// A pipeline with `translator`, tracking approvals in the client `dialect`.
    pub fn new(translator: Box<dyn Translator>, dialect: Dialect, policy: ApprovalPolicy) -> Self {
        Self {
            translator,
            dialect,
            policy,
            pending: BTreeMap::new(),
            settled: std::collections::VecDeque::new(),
            changed: false,
            resolutions: Vec::new(),
            instance_id: None,
            auth_failed: false,
            auth_news: false,
        }
    }

    /// Names the instance in the events this pipeline emits.
    pub fn for_instance(mut self, instance_id: &str) -> Self {
        self.instance_id = Some(instance_id.to_owned());
        self
    }

    /// True once after the run first reported an authentication failure.
    pub fn take_auth_failed(&mut self) -> bool {
        std::mem::take(&mut self.auth_news)
    }

    /// A conversation the agent reported since the last call, for the session's record.
    pub fn take_conversation(&mut self) -> Option<crate::conversation::ConversationNews> {
        self.translator.take_conversation()
    }

    /// The messages of the conversation this run continues (see
    /// [`Translator::restore_messages`]).
    pub fn restore_messages(&mut self, messages: Vec<Value>) {
        self.translator.restore_messages(messages);
    }

    /// Starts a run: the translator's handshake, if it has one.
    pub fn start(&mut self, out: &mut Outputs) {
        self.translator.start(out);
    }

    /// True if `line` would reach clients unchanged and cannot be an approval request, so the
    /// caller may skip [`Pipeline::agent_line`] (the common case, kept cheap).
    pub fn passes_through_agent_line(&self, line: &str) -> bool {
        self.translator.passes_agent_lines_through()
            && !self.dialect.may_be_request(line.as_bytes())
            && (self.auth_failed || !crate::auth::may_be_auth_failure(line.as_bytes()))
    }

    /// True if a client line would reach the agent unchanged and cannot be an approval answer.
    pub fn passes_through_client_line(&self, line: &[u8]) -> bool {
        self.translator.passes_through() && !self.dialect.may_be_response(line)
    }

    /// An output line of the agent.
    pub fn agent_line(&mut self, line: &str, now: Instant, out: &mut Outputs) {
        let first = out.to_clients.len();
        self.translator.agent_line(line, out);
        let translated = out.to_clients.split_off(first);
        for client_line in translated {
            self.observe(client_line, now, out);
        }
        if !self.auth_failed
            && crate::auth::may_be_auth_failure(line.as_bytes())
            && serde_json::from_str::<Value>(line).is_ok_and(|v| crate::auth::is_auth_failure(&v))
        {
            self.auth_failed = true;
            self.auth_news = true;
            out.client_json(&auth_failed_frame(self.instance_id.as_deref()));
        }
    }

    /// A line from a client whose identity is unknown.
    pub fn client_line(&mut self, line: &[u8], out: &mut Outputs) {
        self.client_line_from(line, None, out);
    }

    /// A line from the client `user` (a tailnet login, `token` or `local`): an answer it
    /// gives to an approval request is recorded as its answer.
    pub fn client_line_from(&mut self, line: &[u8], user: Option<&str>, out: &mut Outputs) {
        if self.dialect.may_be_response(line)
            && let Ok(v) = serde_json::from_slice::<Value>(line)
            && let Some((id, decision)) = self.dialect.response(&v)
        {
            if let Some(p) = self.pending.remove(&id) {
                self.settle(id.clone());
                let mut frame = resolved_frame(&id, decision, "client");
                if let Some(user) = user {
                    frame["user"] = user.into();
                }
                out.client_json(&frame);
                self.resolutions.push(Resolution {
                    id,
                    decision: decision.to_owned(),
                    by: "client".into(),
                    user: user.map(str::to_owned),
                    tool: p.tool,
                });
            } else if self.settled.contains(&id) {
                // Already answered: the first answer stands.
                return;
            }
            // Otherwise it answers something moorline does not track (say, a hook callback of
            // Claude's control protocol): it goes to the agent unchanged.
        }
        self.translator.client_line(line, out);
    }

    /// Answers the requests whose timeout has passed with the policy's default.
    pub fn expire(&mut self, now: Instant, out: &mut Outputs) {
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(p) = self.pending.remove(&id) {
                self.settle(id.clone());
                self.answer(&p.request, self.policy.default, "no answer in time", out);
                out.client_json(&resolved_frame(
                    &id,
                    self.policy.default.as_str(),
                    "timeout",
                ));
                self.resolutions.push(Resolution {
                    id,
                    decision: self.policy.default.as_str().to_owned(),
                    by: "timeout".into(),
                    user: None,
                    tool: p.tool,
                });
            }
        }
    }

    /// When [`Pipeline::expire`] next has work, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().filter_map(|p| p.deadline).min()
    }

    /// The requests waiting for an answer, as clients saw them.
    pub fn pending(&self) -> Vec<Value> {
        self.pending.values().map(|p| p.request.clone()).collect()
    }

    /// The settlements since the last call, oldest first.
    pub fn take_resolutions(&mut self) -> Vec<Resolution> {
        std::mem::take(&mut self.resolutions)
    }

    /// Whether the pending set changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    fn settle(&mut self, id: String) {
        self.changed = true;
        self.settled.push_back(id);
        if self.settled.len() > SETTLED_MEMORY {
            self.settled.pop_front();
        }
    }

    /// Sends `decision` to the agent as if a client had answered `request`.
    fn answer(&mut self, request: &Value, decision: Decision, reason: &str, out: &mut Outputs) {
        let reply = self.dialect.answer(request, decision, reason);
        let mut via = Outputs::default();
        self.translator
            .client_line(reply.to_string().as_bytes(), &mut via);
        out.to_agent.append(&mut via.to_agent);
    }

    /// A line about to reach clients: tracks approval requests, answers those the policy
    /// allows outright.
    fn observe(&mut self, line: Vec<u8>, now: Instant, out: &mut Outputs) {
        if !self.dialect.may_be_request(&line) {
            out.to_clients.push(line);
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(&line) else {
            out.to_clients.push(line);
            return;
        };
        let Some(req) = self.dialect.request(&v) else {
            out.to_clients.push(line);
            return;
        };
        if req.yes_no && !self.policy.needs_approval(req.tool.as_deref()) {
            self.answer(&v, Decision::Allow, "allowed by policy", out);
            let mut frame = resolved_frame(&req.id, "allow", "policy");
            frame["tool"] = req.tool.clone().into();
            out.client_json(&frame);
            self.resolutions.push(Resolution {
                id: req.id,
                decision: "allow".into(),
                by: "policy".into(),
                user: None,
                tool: req.tool,
            });
            return;
        }
        let deadline = if req.yes_no {
            self.policy.timeout.map(|t| now + t)
        } else {
            None
        };
        self.pending.insert(
            req.id,
            Pending {
                request: v,
                tool: req.tool,
                deadline,
            },
        );
        self.changed = true;
        out.to_clients.push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pi() -> Pipeline {
        Pipeline::new(
            Box::new(Passthrough),
            Dialect::PiRpc,
            ApprovalPolicy::default(),
        )
    }

    fn confirm(id: &str, tool: &str) -> String {
        json!({"type":"extension_ui_request","id":id,"method":"confirm","title":format!("Run {tool}?"),"message":"{}"}).to_string()
    }

    fn lines(v: &[Vec<u8>]) -> Vec<Value> {
        v.iter()
            .map(|l| serde_json::from_slice(l).expect("json"))
            .collect()
    }

    /// Only lines that neither the request nor the authentication checks could want skip the
    /// pipeline, for every dialect.
    #[test]
    fn only_lines_without_any_marker_skip_the_pipeline() {
        let auth = r#"{"type":"message_end","error":"401 Unauthorized: invalid API key"}"#;
        for (dialect, request) in [
            (Dialect::PiRpc, confirm("r1", "bash")),
            (
                Dialect::ClaudeNative,
                r#"{"type":"control_request","request_id":"c1","request":{"subtype":"can_use_tool","tool_name":"Bash"}}"#.to_owned(),
            ),
            (
                Dialect::CodexNative,
                r#"{"id":3,"method":"item/commandExecution/requestApproval","params":{}}"#.to_owned(),
            ),
        ] {
            let p = Pipeline::new(Box::new(Passthrough), dialect, ApprovalPolicy::default());
            assert!(p.passes_through_agent_line(r#"{"type":"message_update","text":"hello"}"#));
            // Another dialect's marker alone does not stop a line.
            let others: Vec<&str> = ["extension_ui_request", "can_use_tool", "requestApproval"]
                .into_iter()
                .filter(|m| !request.contains(m))
                .collect();
            let note = json!({ "note": others.join(" ") }).to_string();
            assert!(p.passes_through_agent_line(&note), "{dialect:?}: {note}");
            assert!(!p.passes_through_agent_line(&request), "{dialect:?} request");
            assert!(!p.passes_through_agent_line(auth), "{dialect:?} auth failure");
        }
    }

    #[test]
    fn the_first_answer_wins_and_everyone_is_told() {
        let mut p = pi();
        let now = Instant::now();
        let mut out = Outputs::default();
        p.agent_line(&confirm("r1", "bash"), now, &mut out);
        assert_eq!(out.to_clients.len(), 1, "the request reaches clients");
        assert_eq!(p.pending().len(), 1);
        assert!(p.take_changed());

        let mut first = Outputs::default();
        p.client_line_from(
            br#"{"type":"extension_ui_response","id":"r1","confirmed":true}"#,
            Some("alice@example.com"),
            &mut first,
        );
        assert_eq!(first.to_agent.len(), 1, "forwarded to the agent");
        assert_eq!(
            lines(&first.to_clients),
            vec![
                json!({"type":"amarre.approval_resolved","id":"r1","decision":"allow","by":"client","user":"alice@example.com"})
            ]
        );
        assert_eq!(
            p.take_resolutions(),
            vec![Resolution {
                id: "r1".into(),
                decision: "allow".into(),
                by: "client".into(),
                user: Some("alice@example.com".into()),
                tool: Some("bash".into()),
            }]
        );
        let mut second = Outputs::default();
        p.client_line(
            br#"{"type":"extension_ui_response","id":"r1","confirmed":false}"#,
            &mut second,
        );
        assert_eq!(second, Outputs::default(), "a late answer goes nowhere");
        assert!(p.take_resolutions().is_empty(), "and is not recorded");
        assert!(p.pending().is_empty());
    }

    #[test]
    fn answers_to_untracked_requests_reach_the_agent() {
        let mut p = Pipeline::new(
            Box::new(Passthrough),
            Dialect::ClaudeNative,
            ApprovalPolicy::default(),
        );
        let mut out = Outputs::default();
        let hook = br#"{"type":"control_response","response":{"subtype":"success","request_id":"hook-1","response":{}}}"#;
        p.client_line(hook, &mut out);
        assert_eq!(
            out.to_agent,
            vec![hook.to_vec()],
            "not mistaken for a late answer"
        );
        assert!(out.to_clients.is_empty());
    }

    #[test]
    fn fire_and_forget_requests_are_not_tracked() {
        let mut p = pi();
        let mut out = Outputs::default();
        p.agent_line(
            r#"{"type":"extension_ui_request","id":"n","method":"notify","message":"hi"}"#,
            Instant::now(),
            &mut out,
        );
        assert!(p.pending().is_empty());
        assert_eq!(out.to_clients.len(), 1);
    }

    #[test]
    fn tools_outside_the_policy_are_allowed_at_once() {
        let mut p = Pipeline::new(
            Box::new(Passthrough),
            Dialect::PiRpc,
            ApprovalPolicy {
                tools: Some(vec!["bash".into()]),
                ..Default::default()
            },
        );
        let mut out = Outputs::default();
        p.agent_line(&confirm("r1", "read"), Instant::now(), &mut out);
        assert_eq!(
            lines(&out.to_agent),
            vec![json!({"type":"extension_ui_response","id":"r1","confirmed":true})]
        );
        assert_eq!(lines(&out.to_clients)[0]["by"], "policy");
        let mut out = Outputs::default();
        p.agent_line(&confirm("r2", "bash"), Instant::now(), &mut out);
        assert!(out.to_agent.is_empty(), "bash needs a person");
    }

    #[test]
    fn unanswered_requests_get_the_default_after_the_timeout() {
        let mut p = Pipeline::new(
            Box::new(Passthrough),
            Dialect::ClaudeNative,
            ApprovalPolicy {
                tools: None,
                timeout: Some(Duration::from_secs(30)),
                default: Decision::Deny,
            },
        );
        let now = Instant::now();
        let req = json!({"type":"control_request","request_id":"c1","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{"command":"ls"}}});
        let mut out = Outputs::default();
        p.agent_line(&req.to_string(), now, &mut out);
        assert_eq!(p.next_deadline(), Some(now + Duration::from_secs(30)));
        let mut out = Outputs::default();
        p.expire(now + Duration::from_secs(10), &mut out);
        assert_eq!(out, Outputs::default());
        p.expire(now + Duration::from_secs(31), &mut out);
        let to_agent = lines(&out.to_agent);
        assert_eq!(to_agent[0]["response"]["request_id"], "c1");
        assert_eq!(to_agent[0]["response"]["response"]["behavior"], "deny");
        assert_eq!(lines(&out.to_clients)[0]["by"], "timeout");
        assert!(p.pending().is_empty());
    }

    #[test]
    fn claude_native_answers_are_matched_by_request_id() {
        let mut p = Pipeline::new(
            Box::new(Passthrough),
            Dialect::ClaudeNative,
            ApprovalPolicy::default(),
        );
        let req = json!({"type":"control_request","request_id":"c1","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{}}});
        p.agent_line(&req.to_string(), Instant::now(), &mut Outputs::default());
        let mut out = Outputs::default();
        let answer = json!({"type":"control_response","response":{"subtype":"success","request_id":"c1","response":{"behavior":"allow","updatedInput":{}}}});
        p.client_line(answer.to_string().as_bytes(), &mut out);
        assert_eq!(out.to_agent.len(), 1);
        assert_eq!(lines(&out.to_clients)[0]["decision"], "allow");
    }
}
