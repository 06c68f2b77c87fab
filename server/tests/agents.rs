//! The real agents (pi, Claude Code, Codex) driven through moorline against a scripted model
//! API on loopback (`fixtures`' mock-model-api): streaming to two clients, approvals (allow,
//! deny, first answer wins), and malformed client lines. They run in runc containers on the
//! isolated network (the mock's port forwarded with `host_ports`) when the machine allows it
//! (root with runc, tmux, tini and slirp4netns), else as plain processes. When an agent is
//! not installed, its test prints `SKIPPED:` and why.

mod common;

/// One test per agent for a scenario `async fn scenario(kind, program)`: each named test runs
/// it with its agent kind and program.
macro_rules! per_agent {
    ($scenario:ident: $($test:ident($kind:literal, $program:literal)),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                $scenario($kind, $program).await;
            }
        )+
    };
}

use std::path::Path;

use common::{Sandbox, TestServer, Ws, instance};
use moorline::config::{InstanceConfig, RuntimeKind};
use serde_json::{Value, json};

use common::find_in_path as find;

/// The agent's instance, in a container when possible.
fn agent_instance(
    kind: &str,
    mock: &common::MockModel,
    sandbox: Option<&Sandbox>,
) -> InstanceConfig {
    let mut inst = instance(kind, kind);
    inst.runtime = if sandbox.is_some() {
        RuntimeKind::Runc
    } else {
        RuntimeKind::Process
    };
    inst.workspace_roots = vec![std::env::temp_dir()];
    if sandbox.is_some() {
        // The container's own network cannot see the host's loopback: forward the mock's port.
        let port = mock.addr.rsplit(':').next().and_then(|p| p.parse().ok());
        inst.host_ports = vec![port.expect("mock port")];
    }
    match kind {
        "pi" => {
            inst.base_url = Some(format!("http://{}", mock.addr));
            inst.provider = Some("anthropic".into());
            inst.env
                .insert("ANTHROPIC_API_KEY".into(), "sk-ant-fake".into());
        }
        "claude-code" => {
            inst.base_url = Some(format!("http://{}", mock.addr));
            inst.env
                .insert("ANTHROPIC_API_KEY".into(), "sk-ant-fake".into());
        }
        "codex" => {
            inst.base_url = Some(format!("http://{}/v1", mock.addr));
            inst.model = Some("mock-model".into());
        }
        _ => {}
    }
    inst
}

/// Why the agent tests cannot run: the agent's program is not installed.
fn missing(program: &str) -> Option<String> {
    find(program)
        .is_none()
        .then(|| format!("{program} is not installed (see .ci/run for the pinned npm packages)"))
}

async fn start(
    kind: &str,
    program: &str,
) -> Option<(
    TestServer,
    common::MockModel,
    Option<Sandbox>,
    tempfile::TempDir,
)> {
    start_in(kind, program, None).await
}

/// [`start`], with clients speaking `dialect`.
async fn start_in(
    kind: &str,
    program: &str,
    dialect: Option<&str>,
) -> Option<(
    TestServer,
    common::MockModel,
    Option<Sandbox>,
    tempfile::TempDir,
)> {
    start_configured(kind, program, dialect, |_| {}).await
}

/// [`start_in`], with the server's configuration tweaked.
async fn start_configured(
    kind: &str,
    program: &str,
    dialect: Option<&str>,
    tweak: impl FnOnce(&mut moorline::Config),
) -> Option<(
    TestServer,
    common::MockModel,
    Option<Sandbox>,
    tempfile::TempDir,
)> {
    if let Some(why) = missing(program) {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let mock = common::MockModel::start();
    let sandbox = common::durable_unavailable().is_none().then(Sandbox::new);
    if sandbox.is_none() {
        eprintln!("note: runc is not usable here; running {kind} as a plain process");
    }
    let mut inst = agent_instance(kind, &mock, sandbox.as_ref());
    inst.dialect = dialect.map(str::to_owned);
    let server = TestServer::start_with(|c| {
        match &sandbox {
            Some(s) => s.apply(c),
            // A plain child needs to find node and a home.
            None => common::pass_env(c, &["PATH", "HOME"]),
        }
        c.instances.push(inst);
        tweak(c);
    })
    .await;
    let work = common::workspace();
    Some((server, mock, sandbox, work))
}

async fn create(server: &TestServer, kind: &str, work: &Path) -> String {
    let (status, body) = server
        .post(
            "/sessions",
            &json!({"instanceId": kind, "cwd": work}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

/// Reads frames until one satisfies `pred`, returning it (and failing on a session end).
async fn until(ws: &mut Ws, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        let v = ws.json().await;
        assert_ne!(
            v["type"], "amarre.session_event",
            "the agent ended while waiting for {what}: {v}"
        );
        if pred(&v) {
            return v;
        }
    }
}

/// The conversation so far, as `get_messages` answers (asked as `id`).
async fn messages(ws: &mut Ws, id: &str) -> Vec<Value> {
    ws.send_json(&json!({"id": id, "type": "get_messages"}))
        .await;
    let answer = until(ws, "the messages", |v| {
        v["type"] == "response" && v["id"] == id
    })
    .await;
    answer["data"]["messages"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("no messages: {answer}"))
}

/// Collects the streamed text of one turn, up to its `agent_end`.
async fn turn_text(ws: &mut Ws) -> String {
    let mut text = String::new();
    loop {
        let v = ws.json().await;
        assert_ne!(
            v["type"], "amarre.session_event",
            "the agent ended mid-turn: {v}"
        );
        if v["assistantMessageEvent"]["type"] == "text_delta" {
            text.push_str(v["assistantMessageEvent"]["delta"].as_str().unwrap_or(""));
        }
        if v["type"] == "agent_end" {
            return text;
        }
    }
}

fn is_confirm(v: &Value) -> bool {
    v["type"] == "extension_ui_request" && v["method"] == "confirm"
}

fn is_rejection(v: &Value) -> bool {
    v["type"] == "amarre.input_rejected"
}

fn is_resolution(v: &Value) -> bool {
    v["type"] == "amarre.approval_resolved"
}

fn answer(ask: &Value, yes: bool) -> Value {
    json!({"type": "extension_ui_response", "id": ask["id"], "confirmed": yes})
}

/// The frames of the rest of a turn, up to its `agent_end`.
async fn turn_text_frames(ws: &mut Ws) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let v = ws.json().await;
        assert_ne!(
            v["type"], "amarre.session_event",
            "the agent ended mid-turn: {v}"
        );
        let end = v["type"] == "agent_end";
        frames.push(v);
        if end {
            return frames;
        }
    }
}

fn prompt(id: &str, message: &str) -> Value {
    json!({"id": id, "type": "prompt", "message": message})
}

/// The scenario every adapter must pass, in the pi-rpc dialect clients share.
async fn drive(kind: &str, program: &str) {
    let Some((server, _mock, _sandbox, work)) = start(kind, program).await else {
        return;
    };
    let id = create(&server, kind, work.path()).await;
    let mut a = server.ws(&id).await;
    a.record = Some(Vec::new());
    let mut b = server.ws(&id).await;

    // A prompt streams a reply to both clients.
    a.send_json(&prompt("p1", "hello agent")).await;
    for ws in [&mut a, &mut b] {
        let text = turn_text(ws).await;
        assert!(
            text.contains("MOCK reply to: hello agent"),
            "{kind}: {text}"
        );
    }

    // A malformed line never kills the agent: it answers the next prompt.
    a.send("this is not json {").await;
    let err = until(&mut a, "the parse error", |v| {
        v["type"] == "response" && v["command"] == "parse"
    })
    .await;
    assert_eq!(err["success"], false, "{kind}: {err}");

    // pi's `bash` command would run a shell command with no approval: it never does.
    a.send_json(&json!({"id": "b1", "type": "bash", "command": "touch bash.txt"}))
        .await;
    let rejected = until(&mut a, "the rejection", is_rejection).await;
    assert_eq!(rejected["reason"], "runs_without_approval", "{kind}");
    let failed = until(&mut a, "the failed bash", |v| v["type"] == "response").await;
    assert_eq!(
        (failed["id"].as_str(), failed["success"].as_bool()),
        (Some("b1"), Some(false)),
        "{kind}"
    );

    // A tool call needs approval; allowed, it runs in the workspace. A late answer from the
    // other client changes nothing.
    a.send_json(&prompt("p2", "RUNBASH: touch approved.txt"))
        .await;
    let ask = until(&mut a, "an approval request", is_confirm).await;
    let ask_b = until(&mut b, "the same request", is_confirm).await;
    assert_eq!(
        ask["id"], ask_b["id"],
        "{kind}: both clients see the request"
    );
    assert!(
        ask["message"]
            .as_str()
            .unwrap_or("")
            .contains("approved.txt"),
        "{kind}: {ask}"
    );
    a.send_json(&answer(&ask, true)).await;
    for ws in [&mut a, &mut b] {
        let resolved = until(ws, "the resolution", is_resolution).await;
        assert_eq!(
            (resolved["decision"].as_str(), resolved["by"].as_str()),
            (Some("allow"), Some("client")),
            "{kind}"
        );
    }
    b.send_json(&answer(&ask, false)).await;
    let text = turn_text(&mut a).await;
    assert!(text.contains("MOCK saw tool_result"), "{kind}: {text}");
    assert!(
        work.path().join("approved.txt").exists(),
        "{kind}: the approved command ran in the workspace"
    );
    assert!(
        !work.path().join("bash.txt").exists(),
        "{kind}: the refused bash command never ran"
    );
    turn_text(&mut b).await;

    // Denied, it does not run, and the model is told.
    a.send_json(&prompt("p3", "RUNBASH: touch denied.txt"))
        .await;
    let ask = until(&mut a, "an approval request", is_confirm).await;
    b.send_json(&answer(&ask, false)).await;
    let resolved = until(&mut a, "the resolution", is_resolution).await;
    assert_eq!(
        resolved["decision"], "deny",
        "{kind}: a late answer was not taken for a new one"
    );
    let text = turn_text(&mut a).await;
    assert!(text.contains("MOCK saw tool_result"), "{kind}: {text}");
    assert!(
        !work.path().join("denied.txt").exists(),
        "{kind}: the denied command did not run"
    );
    let end = until(&mut b, "the tool result", |v| {
        v["type"] == "tool_execution_end"
    })
    .await;
    assert_eq!(
        end["isError"], true,
        "{kind}: the refusal is an error result: {end}"
    );
    turn_text(&mut b).await;

    // Both clients answer at once: whichever arrives first wins, for everyone, and the agent
    // does exactly that.
    a.send_json(&prompt("p4", "RUNBASH: touch raced.txt")).await;
    let ask = until(&mut a, "an approval request", is_confirm).await;
    until(&mut b, "the same request", is_confirm).await;
    let (yes, no) = (answer(&ask, true), answer(&ask, false));
    tokio::join!(a.send_json(&yes), b.send_json(&no));
    let first = until(&mut a, "the resolution", is_resolution).await;
    let second = until(&mut b, "the resolution", is_resolution).await;
    assert_eq!(
        first, second,
        "{kind}: one resolution, the same for every client"
    );
    turn_text(&mut a).await;
    let allowed = first["decision"] == "allow";
    assert_eq!(
        work.path().join("raced.txt").exists(),
        allowed,
        "{kind}: the agent did what was resolved"
    );
    // Exactly one resolution reached each client for that request.
    let rest = turn_text_frames(&mut b).await;
    assert!(
        !rest.iter().any(is_resolution),
        "{kind}: a second resolution: {rest:?}"
    );

    // Everything came in pi's order, whoever the agent.
    let seen = a.record.take().expect("recorded");
    moorline_adapters::pirpc::check_event_order(&seen).unwrap_or_else(|e| panic!("{kind}: {e}"));
    assert!(
        !seen
            .iter()
            .any(|f| f["assistantMessageEvent"]["type"] == "block_end"),
        "{kind}: block_end is not a pi event"
    );

    // The history holds the assistant message that called the tool, then the tool's result.
    let messages = messages(&mut a, "m").await;
    let answer = json!(messages);
    let call = messages
        .iter()
        .position(|m| {
            m["role"] == "assistant"
                && m["content"].as_array().into_iter().flatten().any(|b| {
                    b["type"] == "toolCall" && b["arguments"].to_string().contains("approved.txt")
                })
        })
        .unwrap_or_else(|| panic!("{kind}: no message carries the tool call: {answer}"));
    assert_eq!(messages[call + 1]["role"], "toolResult", "{kind}: {answer}");

    // Still alive after all that.
    let (_, summary) = server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(summary["status"], "running", "{kind}: {summary}");
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    server.stop().await;
}

per_agent! { drive:
    pi_streams_asks_and_obeys("pi", "pi"),
    claude_code_streams_asks_and_obeys("claude-code", "claude"),
    codex_streams_asks_and_obeys("codex", "codex"),
}

/// Claude retrying an overloaded model API: clients hear of every retry, and of its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_api_retries_reach_clients() {
    let Some(why) = missing("claude") else {
        let mock = common::MockModel::start();
        let sandbox = common::durable_unavailable().is_none().then(Sandbox::new);
        let mut inst = agent_instance("claude-code", &mock, sandbox.as_ref());
        // Claude's backoff starts near half a second and doubles: few retries, a short test.
        inst.env
            .insert("CLAUDE_CODE_MAX_RETRIES".into(), "3".into());
        let server = TestServer::start_with(|c| {
            match &sandbox {
                Some(s) => s.apply(c),
                None => common::pass_env(c, &["PATH", "HOME"]),
            }
            c.instances.push(inst);
        })
        .await;
        let work = tempfile::tempdir().expect("workspace");
        let id = create(&server, "claude-code", work.path()).await;
        let mut ws = server.ws(&id).await;
        // The mock answers 529 overloaded twice, then replies.
        ws.send_json(&prompt("p1", "OVERLOAD: 2 then answer")).await;
        let frames = turn_text_frames(&mut ws).await;
        let retries: Vec<&Value> = frames
            .iter()
            .filter(|f| {
                f["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("auto_retry"))
            })
            .collect();
        let kinds: Vec<(&str, Option<u64>)> = retries
            .iter()
            .map(|r| (r["type"].as_str().unwrap_or(""), r["attempt"].as_u64()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("auto_retry_start", Some(1)),
                ("auto_retry_start", Some(2)),
                ("auto_retry_end", Some(2))
            ],
            "{retries:?}"
        );
        assert_eq!(retries[0]["errorMessage"], "529 overloaded");
        assert_eq!(retries[0]["maxAttempts"], 3);
        assert!(retries[0]["delayMs"].as_u64().is_some());
        assert_eq!(retries[2]["success"], true);
        let text: String = frames
            .iter()
            .filter(|v| v["assistantMessageEvent"]["type"] == "text_delta")
            .filter_map(|v| v["assistantMessageEvent"]["delta"].as_str())
            .collect();
        assert!(text.contains("MOCK reply to: OVERLOAD: 2"), "{text}");
        assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
        server.stop().await;
        return;
    };
    eprintln!("SKIPPED: {why}");
}

/// Host processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(marker))
        .collect()
}

/// An abort stops Codex's approved command, not only its turn: the command (a shell running
/// `sleep`, then `touch`) is gone long before it would have finished, and never touches.
/// (Codex's own interrupt stops a command only in its first second or so; after that it runs
/// on in the background, which is what this test waits for.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_abort_stops_the_approved_command() {
    let Some((server, _mock, _sandbox, work)) = start("codex", "codex").await else {
        return;
    };
    let id = create(&server, "codex", work.path()).await;
    let mut ws = server.ws(&id).await;
    // Longer than any wait below: if it is gone, it was stopped.
    let marker = "sleep 31.4159";
    let command = format!("sleep 2; touch running.txt; {marker}; touch aborted.txt");
    ws.send_json(&prompt("p1", &format!("RUNBASH: {command}")))
        .await;
    let ask = until(&mut ws, "an approval request", is_confirm).await;
    ws.send_json(&answer(&ask, true)).await;
    common::eventually("the approved command runs past its start", || async {
        work.path().join("running.txt").exists()
    })
    .await;
    ws.send_json(&json!({"id": "stop", "type": "abort"})).await;
    let frames = turn_text_frames(&mut ws).await;
    let answer = frames
        .iter()
        .find(|f| f["id"] == "stop")
        .expect("the abort's answer");
    assert_eq!(answer["success"], true, "{answer}");
    let end = frames
        .iter()
        .find(|f| f["type"] == "tool_execution_end")
        .expect("the tool call ends with the turn");
    assert_eq!(end["isError"], true, "{end}");
    common::eventually("the command and its shell are gone", || async {
        processes_with(marker).is_empty()
    })
    .await;
    assert!(
        !work.path().join("aborted.txt").exists(),
        "the aborted command never finished"
    );
    // The session goes on.
    ws.send_json(&prompt("p2", "still there?")).await;
    assert!(
        turn_text(&mut ws)
            .await
            .contains("MOCK reply to: still there?")
    );
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_native_dialect_keeps_claudes_protocol_and_survives_garbage() {
    let Some(mock_check) = missing("claude") else {
        let mock = common::MockModel::start();
        let mut inst = agent_instance("claude-code", &mock, None);
        inst.id = "native".into();
        inst.dialect = Some("native".into());
        let server = TestServer::start_with(|c| {
            // Claude runs as a plain child here: it needs to find node and a home.
            common::pass_env(c, &["PATH", "HOME"]);
            c.instances.push(inst);
        })
        .await;
        let work = common::workspace();
        let id = create(&server, "native", work.path()).await;
        let mut ws = server.ws(&id).await;
        ws.send("{\"type\":\"user\"").await;
        let rejected = until(&mut ws, "the rejection", |v| {
            v["type"] == "amarre.input_rejected"
        })
        .await;
        assert_eq!(rejected["type"], "amarre.input_rejected", "{rejected}");
        ws.send_json(&json!({"type": "user", "message": {"role": "user", "content": "RUNBASH: touch native.txt"}}))
            .await;
        let ask = until(&mut ws, "a control request", |v| {
            v["type"] == "control_request"
        })
        .await;
        let answer = json!({"type": "control_response", "response": {"subtype": "success", "request_id": ask["request_id"],
            "response": {"behavior": "allow", "updatedInput": ask["request"]["input"]}}});
        ws.send_json(&answer).await;
        until(&mut ws, "the result", |v| v["type"] == "result").await;
        assert!(work.path().join("native.txt").exists());
        // Pending approvals are listed for clients that connect later.
        ws.send_json(&json!({"type": "user", "message": {"role": "user", "content": "RUNBASH: touch later.txt"}}))
            .await;
        let ask = until(&mut ws, "a control request", |v| {
            v["type"] == "control_request"
        })
        .await;
        let (_, summary) = server.get_json(&format!("/sessions/{id}")).await;
        let pending = summary["pendingApprovals"]
            .as_array()
            .expect("pending approvals listed");
        assert_eq!(pending[0]["request_id"], ask["request_id"]);
        let mut late = server.ws_query(&id, "?hello=1").await;
        let hello = late.json().await;
        assert_eq!(
            hello["pendingApprovals"][0]["request_id"],
            ask["request_id"]
        );
        server.stop().await;
        return;
    };
    eprintln!("SKIPPED: {mock_check}");
}

/// Reads frames until `rejection` arrives; checks its reason.
async fn rejected(ws: &mut Ws, reason: &str) -> Value {
    let frame = until(ws, "the rejection", is_rejection).await;
    assert_eq!(frame["reason"], reason, "{frame}");
    frame
}

fn claude_user(text: &str) -> Value {
    json!({"type": "user", "message": {"role": "user", "content": text}})
}

fn is_can_use_tool(v: &Value) -> bool {
    v["type"] == "control_request" && v["request"]["subtype"] == "can_use_tool"
}

fn claude_answer(ask: &Value, allow: bool) -> Value {
    let response = if allow {
        json!({"behavior": "allow", "updatedInput": ask["request"]["input"]})
    } else {
        json!({"behavior": "deny", "message": "no"})
    };
    json!({"type": "control_response", "response": {"subtype": "success",
        "request_id": ask["request_id"], "response": response}})
}

/// Claude Code, `native` dialect: a client cannot switch the permission mode, run a shell
/// command directly or answer "always allow"; the next tool call still asks, and does not run
/// until a person says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_native_clients_cannot_switch_the_gate_off() {
    let Some((server, _mock, _sandbox, work)) =
        start_in("claude-code", "claude", Some("native")).await
    else {
        return;
    };
    let id = create(&server, "claude-code", work.path()).await;
    let mut ws = server.ws(&id).await;
    let file = |name: &str| work.path().join(name);

    for (rid, mode) in [
        ("m1", "acceptEdits"),
        ("m2", "bypassPermissions"),
        ("m3", "auto"),
    ] {
        ws.send_json(&json!({"type": "control_request", "request_id": rid,
            "request": {"subtype": "set_permission_mode", "mode": mode}}))
            .await;
        let frame = rejected(&mut ws, "permission_change").await;
        assert!(
            frame["error"].as_str().unwrap_or("").contains(mode),
            "{frame}"
        );
        let reply = until(&mut ws, "the control response", |v| {
            v["type"] == "control_response"
        })
        .await;
        assert_eq!(
            (
                reply["response"]["request_id"].as_str(),
                reply["response"]["subtype"].as_str()
            ),
            (Some(rid), Some("error"))
        );
    }
    ws.send_json(&json!({"type": "bash_command", "command": "touch bash_command.txt"}))
        .await;
    rejected(&mut ws, "runs_without_approval").await;

    // The next tool call asks, and nothing has run while it waits.
    ws.send_json(&claude_user("RUNBASH: touch first.txt")).await;
    let ask = until(&mut ws, "a permission request", is_can_use_tool).await;
    assert!(!file("first.txt").exists(), "ran before any answer");
    assert!(!file("bash_command.txt").exists(), "bash_command ran");

    // "Allow, and switch to acceptEdits for the session": allowed once, mode unchanged.
    let mut always = claude_answer(&ask, true);
    always["response"]["response"]["updatedPermissions"] =
        json!([{"type": "setMode", "mode": "acceptEdits", "destination": "session"}]);
    ws.send_json(&always).await;
    let pinned = rejected(&mut ws, "permission_change").await;
    assert_eq!(pinned["forwarded"], true, "{pinned}");
    until(&mut ws, "the result", |v| v["type"] == "result").await;
    assert!(file("first.txt").exists(), "the one-time allow ran");

    ws.send_json(&claude_user("RUNBASH: touch second.txt"))
        .await;
    let ask = until(&mut ws, "a second permission request", is_can_use_tool).await;
    assert!(!file("second.txt").exists(), "ran before any answer");
    ws.send_json(&claude_answer(&ask, false)).await;
    until(&mut ws, "the result", |v| v["type"] == "result").await;
    assert!(!file("second.txt").exists(), "denied, yet it ran");
    server.stop().await;
}

/// Waits for the JSON-RPC response with `id`.
async fn rpc_response(ws: &mut Ws, id: i64) -> Value {
    until(ws, "a JSON-RPC response", |v| {
        v["id"] == id && v.get("method").is_none()
    })
    .await
}

/// Codex, `native` dialect: a thread or turn cannot lower the approval policy, commands cannot
/// be run around it, and a command still asks and waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_native_clients_cannot_switch_the_gate_off() {
    let Some((server, _mock, _sandbox, work)) = start_in("codex", "codex", Some("native")).await
    else {
        return;
    };
    let id = create(&server, "codex", work.path()).await;
    let mut ws = server.ws(&id).await;
    let file = |name: &str| work.path().join(name);

    ws.send_json(&json!({"id": 0, "method": "initialize", "params": {
        "clientInfo": {"name": "gate-test", "version": "1"}, "capabilities": null}}))
        .await;
    rpc_response(&mut ws, 0).await;
    ws.send_json(&json!({"method": "initialized"})).await;

    ws.send_json(&json!({"id": 1, "method": "thread/start",
        "params": {"approvalPolicy": "never", "sandbox": "danger-full-access"}}))
        .await;
    rejected(&mut ws, "permission_change").await;
    let err = rpc_response(&mut ws, 1).await;
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("approvalPolicy"),
        "{err}"
    );
    ws.send_json(&json!({"id": 2, "method": "command/exec",
        "params": {"command": ["touch", file("exec.txt")]}}))
        .await;
    rejected(&mut ws, "runs_without_approval").await;
    rpc_response(&mut ws, 2).await;

    // A thread that says nothing about approvals gets moorline's policy.
    ws.send_json(&json!({"id": 3, "method": "thread/start", "params": {}}))
        .await;
    let started = rpc_response(&mut ws, 3).await;
    let thread = started["result"]["thread"]["id"].clone();
    assert!(thread.is_string(), "{started}");
    let input = json!([{"type": "text", "text": "RUNBASH: touch gated.txt"}]);
    ws.send_json(&json!({"id": 4, "method": "turn/start", "params": {
        "threadId": thread, "input": input, "approvalPolicy": "never"}}))
        .await;
    rejected(&mut ws, "permission_change").await;
    rpc_response(&mut ws, 4).await;

    ws.send_json(&json!({"id": 5, "method": "turn/start", "params": {
        "threadId": thread, "input": input}}))
        .await;
    let ask = until(&mut ws, "an approval request", |v| {
        v["method"] == "item/commandExecution/requestApproval"
    })
    .await;
    assert!(!file("gated.txt").exists(), "ran before any answer");
    assert!(!file("exec.txt").exists(), "command/exec ran");
    ws.send_json(&json!({"id": ask["id"], "result": {"decision": "decline"}}))
        .await;
    until(&mut ws, "the end of the turn", |v| {
        v["method"] == "turn/completed"
    })
    .await;
    assert!(!file("gated.txt").exists(), "declined, yet it ran");
    server.stop().await;
}

/// pi's own RPC (its native dialect): `bash` is refused, and the agent's tool call still asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pi_clients_cannot_run_bash_around_the_gate() {
    let Some((server, _mock, _sandbox, work)) = start("pi", "pi").await else {
        return;
    };
    let id = create(&server, "pi", work.path()).await;
    let mut ws = server.ws(&id).await;
    let file = |name: &str| work.path().join(name);
    ws.send_json(&json!({"id": "b1", "type": "bash", "command": "touch bash.txt"}))
        .await;
    rejected(&mut ws, "runs_without_approval").await;
    ws.send_json(&json!({"id": "e1", "type": "export_html", "outputPath": file("out.html")}))
        .await;
    rejected(&mut ws, "runs_without_approval").await;
    ws.send_json(&prompt("p1", "RUNBASH: touch gated.txt"))
        .await;
    let ask = until(&mut ws, "an approval request", is_confirm).await;
    assert!(!file("gated.txt").exists(), "ran before any answer");
    assert!(!file("bash.txt").exists(), "bash ran");
    ws.send_json(&answer(&ask, false)).await;
    turn_text(&mut ws).await;
    assert!(!file("gated.txt").exists(), "denied, yet it ran");
    assert!(!file("out.html").exists());
    server.stop().await;
}

/// Wrong credentials, as the model API answers them (401): clients get one clear
/// `amarre.auth_failed` event naming the instance, and the session summary says so.
async fn auth_failure_is_reported(kind: &str, program: &str) {
    let Some((server, _mock, _sandbox, work)) = start(kind, program).await else {
        return;
    };
    let id = create(&server, kind, work.path()).await;
    let mut ws = server.ws(&id).await;
    ws.send_json(&prompt("p1", "UNAUTHORIZED hello")).await;
    let mut frames = Vec::new();
    let event = tokio::time::timeout(std::time::Duration::from_secs(90), async {
        loop {
            let v = ws.json().await;
            frames.push(v.clone());
            if v["type"] == "amarre.auth_failed" {
                return v;
            }
        }
    })
    .await
    .expect("an auth_failed event");
    assert_eq!(event["instanceId"], kind);
    assert!(
        event["message"]
            .as_str()
            .expect("message")
            .contains("credentials"),
        "{event}"
    );
    let (_, summary) = server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(summary["authFailed"], true, "{summary}");
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    server.stop().await;
}

per_agent! { auth_failure_is_reported:
    claude_code_auth_failure_is_reported("claude-code", "claude"),
    pi_auth_failure_is_reported("pi", "pi"),
    codex_auth_failure_is_reported("codex", "codex"),
}

/// Kills the session's agent the hard way (its container, or its process group) and waits
/// for clients to hear that it crashed.
async fn kill_agent(server: &TestServer, sandbox: Option<&Sandbox>, id: &str, ws: &mut Ws) {
    match sandbox {
        Some(sandbox) => {
            // A session just created may still be starting its container.
            let running = |id: &str| {
                std::process::Command::new("runc")
                    .arg("--root")
                    .arg(sandbox.runc_root.path())
                    .args(["state", id])
                    .output()
                    .ok()
                    .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
                    .is_some_and(|state| state["status"] == "running")
            };
            let deadline = std::time::Instant::now() + common::WAIT;
            let containers = loop {
                let containers = sandbox.containers();
                assert!(containers.len() <= 1, "one container: {containers:?}");
                if containers.first().is_some_and(|c| running(c)) {
                    break containers;
                }
                assert!(std::time::Instant::now() < deadline, "the container runs");
                tokio::task::yield_now().await;
            };
            let killed = std::process::Command::new("runc")
                .arg("--root")
                .arg(sandbox.runc_root.path())
                .args(["kill", &containers[0], "KILL"])
                .status()
                .expect("runc kill");
            assert!(killed.success(), "runc kill");
        }
        None => {
            let meta: Value = serde_json::from_slice(
                &std::fs::read(server.session_dir(id).join("meta.json")).expect("meta.json"),
            )
            .expect("meta");
            let pid = meta["pid"].as_i64().expect("pid") as i32;
            nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .expect("kill -9 the agent's group");
        }
    }
    loop {
        let v = ws.json().await;
        if v["type"] == "amarre.session_event" {
            assert_ne!(v["event"], "running", "{v}");
            return;
        }
    }
}

/// Restarts a session (`body`: the restart's request) and returns its summary and a client
/// that sees everything the new run wrote.
async fn restart(server: &TestServer, id: &str, body: &str) -> (Value, Ws) {
    let (_, before) = server.get_json(&format!("/sessions/{id}")).await;
    let since = before["lastSeq"].as_u64().expect("lastSeq");
    let (status, summary) = server.post(&format!("/sessions/{id}/restart"), body).await;
    assert_eq!(status, 200, "{summary}");
    let ws = server.ws_query(id, &format!("?since={since}")).await;
    (summary, ws)
}

/// "remember PINEAPPLE", the agent killed, the session restarted: the next model request
/// carries the earlier conversation (the mock answers `RECALL:` from what it was sent), and
/// the summary says `resumed`. Asking for a new conversation gives one without it.
async fn conversation_survives_a_restart(kind: &str, program: &str) {
    let Some((server, _mock, sandbox, work)) = start(kind, program).await else {
        return;
    };
    let id = create(&server, kind, work.path()).await;
    let (_, summary) = server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(summary["conversation"], "new", "{kind}: {summary}");
    let mut ws = server.ws(&id).await;
    ws.send_json(&prompt("p1", "remember PINEAPPLE")).await;
    let text = turn_text(&mut ws).await;
    assert!(text.contains("PINEAPPLE"), "{kind}: {text}");

    kill_agent(&server, sandbox.as_ref(), &id, &mut ws).await;
    let (summary, mut ws) = restart(&server, &id, "").await;
    assert_eq!(summary["conversation"], "resumed", "{kind}: {summary}");
    // A client that opens the session now sees the conversation so far.
    let so_far = messages(&mut ws, "m1").await;
    assert!(
        so_far
            .iter()
            .any(|m| m["role"] == "user" && m.to_string().contains("remember PINEAPPLE")),
        "{kind}: the resumed conversation's messages: {so_far:?}"
    );
    ws.send_json(&prompt("p2", "RECALL: PINEAPPLE")).await;
    let text = turn_text(&mut ws).await;
    assert!(
        text.contains("MOCK recall PINEAPPLE: yes"),
        "{kind}: the model was not sent the earlier conversation: {text}"
    );
    let (_, summary) = server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(summary["conversation"], "resumed", "{kind}: {summary}");

    // A fresh conversation, asked for.
    kill_agent(&server, sandbox.as_ref(), &id, &mut ws).await;
    let (summary, mut ws) = restart(&server, &id, r#"{"conversation":"new"}"#).await;
    assert_eq!(summary["conversation"], "new", "{kind}: {summary}");
    ws.send_json(&prompt("p3", "RECALL: PINEAPPLE")).await;
    let text = turn_text(&mut ws).await;
    assert!(
        text.contains("MOCK recall PINEAPPLE: no"),
        "{kind}: a new conversation carried the old one: {text}"
    );
    let (_, summary) = server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(summary["conversation"], "new", "{kind}: {summary}");
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    server.stop().await;
}

per_agent! { conversation_survives_a_restart:
    pi_conversation_survives_a_restart("pi", "pi"),
    claude_code_conversation_survives_a_restart("claude-code", "claude"),
    codex_conversation_survives_a_restart("codex", "codex"),
}

/// A conversation nobody said anything in has nothing to continue (Claude Code writes no
/// transcript before the first message): a restart starts a new one without telling clients
/// one was lost, and it works.
async fn empty_conversation_restarts_quietly(kind: &str, program: &str) {
    let Some((server, _mock, sandbox, work)) = start(kind, program).await else {
        return;
    };
    let id = create(&server, kind, work.path()).await;
    let mut ws = server.ws(&id).await;
    kill_agent(&server, sandbox.as_ref(), &id, &mut ws).await;
    let (summary, mut ws) = restart(&server, &id, "").await;
    assert_eq!(summary["conversation"], "new", "{kind}: {summary}");
    ws.send_json(&prompt("p1", "RECALL: PINEAPPLE")).await;
    // Everything the new run wrote, up to the end of its first turn.
    until(&mut ws, "the first turn's end", |v| {
        assert_ne!(v["type"], "amarre.resume_failed", "{kind}: {v}");
        v["type"] == "agent_end"
    })
    .await;
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    server.stop().await;
}

per_agent! { empty_conversation_restarts_quietly:
    claude_code_empty_conversation_restarts_quietly("claude-code", "claude"),
    codex_empty_conversation_restarts_quietly("codex", "codex"),
}

/// Removes where the agent kept the session's conversation (in a container, the session's
/// own home and data directory).
fn lose_conversation(server: &TestServer, kind: &str, id: &str) {
    let dir = server.session_dir(id);
    let gone = match kind {
        "claude-code" => dir.join("home/.claude/projects"),
        "pi" => dir.join("data/state/pi-sessions"),
        _ => dir.join("home/.codex/sessions"),
    };
    assert!(
        gone.is_dir(),
        "{kind}: {} holds the conversation",
        gone.display()
    );
    std::fs::remove_dir_all(&gone).expect("remove the conversation");
}

/// A conversation that cannot be continued any more: clients are told
/// (`amarre.resume_failed`), the agent starts a new one, and the summary says `new`.
async fn lost_conversation_is_told(kind: &str, program: &str) {
    let Some((server, _mock, sandbox, work)) = start(kind, program).await else {
        return;
    };
    if sandbox.is_none() {
        eprintln!("SKIPPED: the agent's home is the server's without runc");
        return;
    }
    let id = create(&server, kind, work.path()).await;
    let mut ws = server.ws(&id).await;
    ws.send_json(&prompt("p1", "remember PINEAPPLE")).await;
    turn_text(&mut ws).await;
    kill_agent(&server, sandbox.as_ref(), &id, &mut ws).await;
    lose_conversation(&server, kind, &id);

    let (_, mut ws) = restart(&server, &id, "").await;
    let told = until(&mut ws, "amarre.resume_failed", |v| {
        v["type"] == "amarre.resume_failed"
    })
    .await;
    assert!(
        told["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{kind}: {told}"
    );
    ws.send_json(&prompt("p2", "RECALL: PINEAPPLE")).await;
    let text = turn_text(&mut ws).await;
    assert!(text.contains("MOCK recall PINEAPPLE: no"), "{kind}: {text}");
    let (_, summary) = server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(summary["conversation"], "new", "{kind}: {summary}");
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    server.stop().await;
}

per_agent! { lost_conversation_is_told:
    pi_lost_conversation_is_told("pi", "pi"),
    claude_code_lost_conversation_is_told("claude-code", "claude"),
    codex_lost_conversation_is_told("codex", "codex"),
}

/// A session in a project: the agent (pi, in its container when runc works) works in its own
/// worktree, and `git commit` there lands on the session's branch of the repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_commits_in_its_worktree() {
    let Some((server, _mock, _sandbox, work)) = start("pi", "pi").await else {
        return;
    };
    let repo = work.path().join("app");
    std::fs::create_dir(&repo).expect("mkdir");
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(&repo, Some(common::TEST_UID), Some(common::TEST_UID))
            .expect("chown");
    }
    common::git(&repo, &["init", "-q", "-b", "main"]);
    common::git(&repo, &["commit", "-q", "--allow-empty", "-m", "first"]);
    let (status, body) = server
        .post(
            "/projects",
            &json!({"path": repo, "id": "app", "defaultInstance": "pi"}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, s) = server
        .post("/sessions", &json!({"project": "app"}).to_string())
        .await;
    assert_eq!(status, 201, "{s}");
    let id = s["id"].as_str().expect("id").to_owned();
    let mut ws = server.ws(&id).await;
    ws.send_json(&prompt(
        "p1",
        "RUNBASH: echo agent > made.txt && git add made.txt && git -c user.name=A -c user.email=a@example.com commit -qm by-the-agent && git status --porcelain && pwd",
    ))
    .await;
    let ask = until(&mut ws, "an approval request", is_confirm).await;
    ws.send_json(&answer(&ask, true)).await;
    let text = turn_text(&mut ws).await;
    assert!(text.contains("MOCK saw tool_result"), "{text}");
    assert!(
        text.contains(&id),
        "the command ran in the worktree: {text}"
    );
    assert_eq!(
        common::git(
            &repo,
            &["log", "-1", "--format=%s", &format!("moorline/{id}")]
        )
        .trim(),
        "by-the-agent",
        "the commit is on the session's branch: {text}"
    );
    assert!(
        !repo.join("made.txt").exists(),
        "the main tree is untouched"
    );
    let (_, s) = server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(
        (s["dirty"].as_bool(), s["ahead"].as_u64()),
        (Some(false), Some(1)),
        "{s}"
    );
    let (status, diff) = server.get(&format!("/sessions/{id}/diff")).await;
    assert!(status == 200 && diff.contains("+agent"), "{diff}");
    let (status, body) = server.delete(&format!("/sessions/{id}")).await;
    assert_eq!(status, 200, "committed work is kept: {body}");
    server.stop().await;
}

/// The conversation outlives the server too: a new server adopts the session (its agent still
/// runs in its container), and after the agent is killed, a restart continues the
/// conversation the first server's run recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pi_conversation_survives_a_server_restart() {
    let Some((server, mock, sandbox, work)) = start("pi", "pi").await else {
        return;
    };
    let Some(sandbox) = sandbox else {
        eprintln!("SKIPPED: without runc the agent ends with the server");
        return;
    };
    let id = create(&server, "pi", work.path()).await;
    let mut ws = server.ws(&id).await;
    ws.send_json(&prompt("p1", "remember PINEAPPLE")).await;
    turn_text(&mut ws).await;
    drop(ws);
    let state = server.stop_keep_state().await;

    let mut config = common::test_config(state.path().to_owned());
    sandbox.apply(&mut config);
    config
        .instances
        .push(agent_instance("pi", &mock, Some(&sandbox)));
    let server = TestServer::start_in(state, config).await;
    let (_, summary) = server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(summary["status"], "running", "adopted: {summary}");
    let mut ws = server.ws(&id).await;
    kill_agent(&server, Some(&sandbox), &id, &mut ws).await;
    let (summary, mut ws) = restart(&server, &id, "").await;
    assert_eq!(summary["conversation"], "resumed", "{summary}");
    ws.send_json(&prompt("p2", "RECALL: PINEAPPLE")).await;
    let text = turn_text(&mut ws).await;
    assert!(text.contains("MOCK recall PINEAPPLE: yes"), "{text}");
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    server.stop().await;
}

/// A real pi's tool call, unanswered past the grace period, is notified once: the text names
/// the tool and the command, with the API key on that command masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pi_approval_unanswered_is_notified_with_the_command_and_no_secret() {
    let (tx, mut posts) = tokio::sync::mpsc::channel::<Value>(8);
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hook_url = format!("http://{}/hook", hook.local_addr().expect("addr"));
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let tx = tx.clone();
        async move {
            let _ = tx
                .send(serde_json::from_slice(&body).unwrap_or(Value::Null))
                .await;
            "ok"
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(hook, app).await;
    });
    let Some((server, _mock, _sandbox, work)) = start_configured("pi", "pi", None, |c| {
        c.notify.webhook_url = Some(hook_url);
        c.notify.grace_ms = 300;
        c.notify.max_text_chars = 200;
    })
    .await
    else {
        return;
    };
    let id = create(&server, "pi", work.path()).await;
    let mut ws = server.ws(&id).await;
    let key = "sk-proj-0123456789abcdefghij";
    ws.send_json(&prompt(
        "p1",
        &format!("RUNBASH: curl -H 'Authorization: Bearer {key}' https://api.example/v1"),
    ))
    .await;
    let ask = until(&mut ws, "an approval request", is_confirm).await;
    let post = tokio::time::timeout(common::WAIT, posts.recv())
        .await
        .expect("a notification in time")
        .expect("a post");
    assert_eq!(post["trigger"], "awaiting_input");
    assert_eq!(post["sessionId"], id.as_str());
    assert_eq!(post["requestId"], ask["id"]);
    assert_eq!(post["tool"], "bash");
    let text = post["message"].as_str().expect("message");
    assert!(text.contains("bash wants to run curl"), "{text}");
    assert!(text.contains("https://api.example/v1"), "{text}");
    assert!(!text.contains(key), "the key leaked: {text}");
    // Answering now ends it; nothing more is sent for this request.
    ws.send_json(&answer(&ask, false)).await;
    turn_text(&mut ws).await;
    assert!(posts.try_recv().is_err());
    server.stop().await;
}
