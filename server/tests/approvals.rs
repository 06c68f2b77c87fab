//! Approval rules with the fixture agent (which asks like pi's gate does): pending requests
//! are listed for clients that arrive late, the first answer wins, policies answer at once,
//! and timeouts answer with the default.

mod common;

use common::{TestServer, Ws};
use moorline::config::InstanceConfig;
use serde_json::{Value, json};

async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let v = ws.json().await;
        if v["type"] == kind {
            return v;
        }
    }
}

fn asking(tweak: impl FnOnce(&mut InstanceConfig)) -> impl FnOnce(&mut moorline::Config) {
    move |c| tweak(&mut c.instances[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_client_learns_of_pending_requests_and_the_first_answer_wins() {
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    let mut a = server.ws(&id).await;
    a.send(r#"{"_emit":"ui_req","reqId":"R1"}"#).await;
    let ask = next_of(&mut a, "extension_ui_request").await;
    assert_eq!(ask["id"], "R1");

    // A phone that reconnects now still sees the question.
    let (_, summary) = server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(summary["pendingApprovals"][0]["id"], "R1", "{summary}");
    let mut b = server.ws_query(&id, "?hello=1").await;
    let hello = b.json().await;
    assert_eq!(hello["pendingApprovals"][0]["id"], "R1", "{hello}");

    b.send(r#"{"type":"extension_ui_response","id":"R1","confirmed":true}"#)
        .await;
    for ws in [&mut a, &mut b] {
        let resolved = next_of(ws, "amarre.approval_resolved").await;
        assert_eq!(
            resolved,
            json!({"type": "amarre.approval_resolved", "id": "R1", "decision": "allow", "by": "client", "user": "local"})
        );
    }
    // The agent (which echoes its input) got exactly the one answer.
    let echo = next_of(&mut a, "response").await;
    assert_eq!(echo["echo"]["confirmed"], true);
    a.send(r#"{"type":"extension_ui_response","id":"R1","confirmed":false}"#)
        .await;
    a.send(r#"{"id":"after"}"#).await;
    let next = next_of(&mut a, "response").await;
    assert_eq!(
        next["echo"]["id"], "after",
        "the late answer never reached the agent"
    );
    let (_, summary) = server.get_json(&format!("/sessions/{id}")).await;
    assert!(summary.get("pendingApprovals").is_none(), "{summary}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_outside_the_policy_are_allowed_without_asking() {
    let server =
        TestServer::start_with(asking(|i| i.approval_tools = Some(vec!["edit".into()]))).await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    // The fixture asks "Run bash?": bash is not in the list.
    ws.send(r#"{"_emit":"ui_req","reqId":"R2"}"#).await;
    let resolved = next_of(&mut ws, "amarre.approval_resolved").await;
    assert_eq!(
        (resolved["by"].as_str(), resolved["tool"].as_str()),
        (Some("policy"), Some("bash"))
    );
    let echo = next_of(&mut ws, "response").await;
    assert_eq!(
        echo["echo"],
        json!({"type": "extension_ui_response", "id": "R2", "confirmed": true})
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_requests_get_the_default_after_the_timeout() {
    let server = TestServer::start_with(asking(|i| i.approval_timeout_ms = Some(100))).await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"ui_req","reqId":"R3"}"#).await;
    next_of(&mut ws, "extension_ui_request").await;
    let resolved = next_of(&mut ws, "amarre.approval_resolved").await;
    assert_eq!(
        (resolved["decision"].as_str(), resolved["by"].as_str()),
        (Some("deny"), Some("timeout"))
    );
    let echo = next_of(&mut ws, "response").await;
    assert_eq!(echo["echo"]["confirmed"], false);
    server.stop().await;
}
