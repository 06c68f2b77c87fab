//! Stopping agents, shutting down, restarting the server, and surviving misbehaving agents.

mod common;

use common::{TestServer, Ws, eventually, process_gone, test_config};
use serde_json::{Value, json};

async fn pid_of(ws: &mut Ws) -> u64 {
    ws.send(r#"{"_emit":"pid"}"#).await;
    let v = ws.json().await;
    assert_eq!(v["pid"], v["pgid"], "the agent leads its own process group");
    v["pid"].as_u64().expect("pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_stops_the_whole_process_group() {
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    let agent = pid_of(&mut ws).await;
    ws.send(r#"{"_emit":"grandchild"}"#).await;
    let grandchild = ws.json().await["pid"].as_u64().expect("pid");
    assert!(!process_gone(grandchild));
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    // DELETE returns once the agent is reaped and its group signalled.
    assert!(process_gone(agent), "agent reaped");
    eventually("grandchild gone", || async { process_gone(grandchild) }).await;
    assert!(!server.session_dir(&id).exists(), "nothing left on disk");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_ignoring_sigterm_is_killed_after_the_grace() {
    let server = TestServer::start_with(|c| c.limits.stop_grace_ms = 200).await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    let agent = pid_of(&mut ws).await;
    ws.send(r#"{"_emit":"ignore_term"}"#).await;
    assert_eq!(ws.json().await["ignoring"], "SIGTERM");
    let started = std::time::Instant::now();
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(200),
        "grace was given"
    );
    assert!(process_gone(agent));
    // The freed slot is usable at once.
    assert_eq!(server.post("/sessions", "{}").await.0, 201);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_tools_hold_its_output_is_still_seen_to_exit() {
    let server = TestServer::start_with(|c| c.limits.exit_drain_ms = 100).await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"grandchild"}"#).await;
    let grandchild = ws.json().await["pid"].as_u64().expect("pid");
    ws.send(r#"{"_emit":"die","code":3}"#).await;
    let event = ws.json().await;
    assert_eq!(
        (event["event"].as_str(), event["exitCode"].as_i64()),
        (Some("crashed"), Some(3))
    );
    assert_eq!(ws.closed().await.0, 1011);
    eventually("leftover tool killed", || async {
        process_gone(grandchild)
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_an_agent_exit_never_take_the_server_down() {
    let server = TestServer::start().await;
    let victim = server.session("fixture").await;
    let other = server.session("fixture").await;
    let mut ws = server.ws(&victim).await;
    ws.send(r#"{"_emit":"die"}"#).await;
    let big = "x".repeat(1 << 20);
    for _ in 0..64 {
        // The agent is exiting or gone: these hit a closed pipe (EPIPE).
        let _ = futures_util::SinkExt::send(
            &mut ws.socket,
            tokio_tungstenite::tungstenite::Message::text(big.clone()),
        )
        .await;
    }
    assert_eq!(server.get("/healthz").await.0, 200);
    let mut ow = server.ws(&other).await;
    ow.send(r#"{"id":"alive"}"#).await;
    assert_eq!(ow.json().await["echo"]["id"], "alive");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_clients_with_1001_and_stops_agents() {
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    let agent = pid_of(&mut ws).await;
    let mut other = server.ws(&id).await;
    let stopping = tokio::spawn(server.stop_keep_state());
    for client in [&mut ws, &mut other] {
        assert_eq!(client.closed().await, (1001, "server shutting down".into()));
    }
    let _state = stopping.await.expect("stopped");
    assert!(
        process_gone(agent),
        "agents of the process runtime end with the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_state_directory_refuses_to_start() {
    let server = TestServer::start().await;
    let id = server.session("cat").await;
    let config = test_config(server.state.path().to_owned());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = moorline::run(listener, config, std::future::pending())
        .await
        .expect_err("a second server must not start");
    assert!(err.to_string().contains("another moorline server"), "{err}");
    // The first one did not notice.
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"still":"here"}"#).await;
    assert_eq!(ws.json().await["still"], "here");
    drop(ws);
    // Once it has stopped, the directory is free again.
    let state = server.stop_keep_state().await;
    let config = test_config(state.path().to_owned());
    let server = TestServer::start_in(state, config).await;
    assert_eq!(server.get_json(&format!("/sessions/{id}")).await.0, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_their_output_survive_a_server_restart() {
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"flood","n":50}"#).await;
    for i in 1..=50 {
        assert_eq!(ws.json().await["i"], i);
    }
    drop(ws);
    let state = server.stop_keep_state().await;

    let config = test_config(state.path().to_owned());
    let server = TestServer::start_in(state, config).await;
    let (status, summary) = server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        summary["status"], "crashed",
        "its agent did not survive: {summary}"
    );
    assert_eq!(summary["lastSeq"], 50);
    // The output is still there for replay.
    let mut replay = server.ws_query(&id, "?since=45").await;
    assert_eq!(replay.json().await["seq"], 50);
    for i in 46..=50 {
        assert_eq!(replay.json().await["i"], i);
    }
    assert_eq!(replay.json().await["type"], "amarre.session_event");
    // Restarting continues the sequence.
    assert_eq!(
        server.post(&format!("/sessions/{id}/restart"), "").await.0,
        200
    );
    let mut ws = server.ws_query(&id, "?since=50").await;
    assert_eq!(ws.json().await["replayFrom"], 51);
    ws.send(r#"{"id":"again"}"#).await;
    assert_eq!(ws.json().await["echo"]["id"], "again");
    assert_eq!(
        server.get_json(&format!("/sessions/{id}")).await.1["lastSeq"],
        51
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builtin_echo_instance_needs_nothing_installed() {
    let server = TestServer::start().await;
    let id = server.session("echo").await;
    let mut ws = server.ws(&id).await;
    ws.send("{\"id\":\"1\",\"type\":\"get_state\"}\n").await;
    let reply: Value = ws.json().await;
    assert_eq!(reply["echo"], json!({"id": "1", "type": "get_state"}));
    assert_eq!(
        (reply["id"].as_str(), reply["success"].as_bool()),
        (Some("1"), Some(true))
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_environment_and_cwd_reach_the_agent() {
    let dir = tempfile::tempdir().expect("dir");
    let server = TestServer::start_with(|c| {
        c.instances[0]
            .env
            .insert("FROM_INSTANCE".into(), "i".into());
        // As if `runtime.pass_env` had found FROM_SERVER in the server's environment.
        c.runtime
            .passed_env
            .insert("FROM_SERVER".into(), "s".into());
    })
    .await;
    let body = json!({"cwd": dir.path(), "env": {"FROM_SESSION": "0123"}}).to_string();
    let (status, created) = server.post("/sessions", &body).await;
    assert_eq!(status, 201);
    let mut ws = server.ws(created["id"].as_str().expect("id")).await;
    // PATH is in the server's (this test's) environment, but not passed on.
    for (key, want) in [
        ("FROM_INSTANCE", json!("i")),
        ("FROM_SESSION", json!("0123")),
        ("FROM_SERVER", json!("s")),
        ("PATH", Value::Null),
    ] {
        ws.send(&json!({"_emit": "env", "key": key}).to_string())
            .await;
        assert_eq!(ws.json().await["value"], want, "{key}");
    }
    ws.send(r#"{"_emit":"cwd"}"#).await;
    assert_eq!(ws.json().await["cwd"], dir.path().display().to_string());
    server.stop().await;
}

/// An agent whose adapter greets clients on its behalf (Claude Code's `amarre.agent_ready`)
/// and that dies before writing anything is still reported as failing to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_failure_is_reported_even_after_the_adapters_greeting() {
    let server = TestServer::start_with(|c| {
        let mut claude = common::instance("claude", "claude-code");
        claude.agent_path = Some("/bin/false".into());
        c.instances.push(claude);
    })
    .await;
    let (status, body) = server.post("/sessions", r#"{"instanceId":"claude"}"#).await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    eventually("the failure is reported", || async {
        server.get_json(&format!("/sessions/{id}")).await.1["status"] == "crashed"
    })
    .await;
    let summary = server.get_json(&format!("/sessions/{id}")).await.1;
    let error = summary["error"].as_str().unwrap_or_default();
    assert!(error.contains("before writing anything"), "{summary}");
    server.stop().await;
}
