//! The REST control plane, route by route, against amarre protocol v2 and moorline's fixes.

mod common;

use common::{TestServer, instance};
use serde_json::{Value, json};

fn keys(v: &Value) -> Vec<&str> {
    v.as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_are_listed_in_config_order() {
    let server = TestServer::start().await;
    let (status, body) = server.get_json("/instances").await;
    assert_eq!(status, 200);
    let list = body.as_array().expect("array");
    let ids: Vec<&str> = list.iter().map(|i| i["id"].as_str().expect("id")).collect();
    assert_eq!(ids, ["fixture", "cat", "echo"]);
    assert_eq!(keys(&list[0])[..2], ["id", "agent"]);
    assert_eq!(list[1]["agent"], "command");
    assert_eq!(list[2]["agent"], "echo");
    assert_eq!(list[0]["runtime"], "process");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lifecycle_over_rest() {
    let server = TestServer::start().await;
    let (status, created) = server.post("/sessions", r#"{"name":"alpha"}"#).await;
    assert_eq!(status, 201);
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(id.len(), 12);
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    // amarre's SessionSummary key order; moorline's additions come last.
    assert_eq!(
        keys(&created),
        [
            "id",
            "name",
            "instanceId",
            "status",
            "agent",
            "spawnedAt",
            "clients",
            "lastSeq",
            "runtime",
            "createdBy",
            "cwd",
            "createdAt",
            "activity",
            "conversation"
        ]
    );
    // Just started and silent (the fixture writes nothing until asked): idle.
    assert_eq!(created["activity"], "idle");
    assert!(created["cwd"].as_str().is_some_and(|c| c.starts_with('/')));
    assert_eq!(created["createdBy"], "local", "who created it");
    assert_eq!(
        created["instanceId"], "fixture",
        "first instance is the default"
    );
    assert_eq!(created["status"], "running");
    assert_eq!(created["clients"], 0);

    let (_, unnamed) = server.post("/sessions", "{}").await;
    assert!(
        unnamed.get("name").is_none(),
        "name is omitted when not given"
    );

    let (status, list) = server.get_json("/sessions").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|s| s["id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        ids,
        [id.as_str(), unnamed["id"].as_str().expect("id")],
        "creation order"
    );

    let (status, one) = server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(one["name"], "alpha");

    let (status, body) = server.delete(&format!("/sessions/{id}")).await;
    assert_eq!((status, body.as_str()), (204, ""));
    assert_eq!(
        server.get_json(&format!("/sessions/{id}")).await,
        (404, json!({"error": "not_found"}))
    );
    assert_eq!(
        server
            .get_json("/sessions")
            .await
            .1
            .as_array()
            .expect("list")
            .len(),
        1
    );
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_instance_named_default_wins_and_instance_ids_are_honoured() {
    let server = TestServer::start_with(|c| {
        let mut default = instance("default", "command");
        default.command = Some(vec!["/bin/cat".into()]);
        c.instances.push(default);
    })
    .await;
    assert_eq!(
        server.post("/sessions", "").await.1["instanceId"],
        "default"
    );
    let (status, s) = server.post("/sessions", r#"{"instanceId":"cat"}"#).await;
    assert_eq!((status, s["instanceId"].as_str()), (201, Some("cat")));
    let listed = server.get_json("/sessions").await.1;
    assert!(
        listed
            .as_array()
            .expect("list")
            .iter()
            .any(|x| x["instanceId"] == "cat")
    );
    let (status, body) = server.post("/sessions", r#"{"instanceId":"ghost"}"#).await;
    assert_eq!(
        (status, &body["error"], &body["instanceId"]),
        (404, &json!("unknown_instance"), &json!("ghost"))
    );
    // The error names the instances that do exist.
    assert_eq!(
        body["instances"],
        json!(["fixture", "cat", "echo", "default"])
    );
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("fixture"),
        "{body}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_content_type_and_an_empty_body_are_accepted() {
    let server = TestServer::start().await;
    // What `curl -X POST .../sessions -d '{}'` sends.
    let resp = server
        .http
        .post(server.url("/sessions"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(server.post("/sessions", "").await.0, 201);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_400_with_a_reason_and_create_nothing() {
    let server = TestServer::start().await;
    let (status, body) = server.post("/sessions", "{not json").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_json"))
    );
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    let (status, body) = server.post("/sessions", r#"{"name":42}"#).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("name")));
    let (status, body) = server.post("/sessions", r#"{"env":{"A":1}}"#).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("env.A")));
    let (status, _) = server.post("/sessions", "[1,2]").await;
    assert_eq!(status, 400);
    assert_eq!(server.get_json("/sessions").await.1, json!([]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_failures_are_reported_and_hold_no_slot() {
    let server = TestServer::start_with(|c| {
        c.limits.max_sessions = 1;
        let mut missing = instance("missing", "command");
        missing.command = Some(vec!["/nonexistent/agent".into()]);
        c.instances.push(missing);
    })
    .await;
    for _ in 0..3 {
        let (status, body) = server
            .post("/sessions", r#"{"instanceId":"missing"}"#)
            .await;
        assert_eq!(status, 500, "{body}");
        assert_eq!(body["error"], "spawn_failed");
        assert!(
            body["message"]
                .as_str()
                .expect("message")
                .contains("/nonexistent/agent"),
            "{body}"
        );
    }
    let (status, body) = server
        .post("/sessions", r#"{"cwd":"/does/not/exist"}"#)
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_cwd")),
        "{body}"
    );
    assert_eq!(
        server.get_json("/sessions").await.1,
        json!([]),
        "no zombie sessions"
    );
    let dirs = std::fs::read_dir(server.state.path().join("sessions"))
        .expect("dir")
        .count();
    assert_eq!(dirs, 0, "nothing left on disk");
    // The single slot is still free.
    assert_eq!(server.post("/sessions", "{}").await.0, 201);
    server.stop().await;
}

/// As root, agents run as an unprivileged user: a program that user cannot reach is refused
/// with a message that says so, not a bare "Permission denied".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_the_agent_user_cannot_reach_is_explained() {
    if !nix::unistd::geteuid().is_root() {
        return; // Only root runs agents as another user.
    }
    use std::os::unix::fs::PermissionsExt;
    let private = tempfile::tempdir().expect("dir");
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    let program = private.path().join("agent");
    std::fs::copy("/bin/cat", &program).expect("copy");
    let server = TestServer::start_with(|c| {
        let mut hidden = instance("hidden", "command");
        hidden.command = Some(vec![program.display().to_string()]);
        c.instances.push(hidden);
    })
    .await;
    let (status, body) = server.post("/sessions", r#"{"instanceId":"hidden"}"#).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (500, Some("spawn_failed")),
        "{body}"
    );
    let message = body["message"].as_str().expect("message");
    assert!(
        message.contains("runs as uid 65534") && message.contains("every directory above"),
        "{body}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_counts_running_agents() {
    let server = TestServer::start_with(|c| c.limits.max_sessions = 1).await;
    let id = server.session("fixture").await;
    assert_eq!(
        server.post("/sessions", "{}").await,
        (429, json!({"error": "max_sessions_reached", "limit": 1}))
    );
    // When the agent exits its slot is free again, and restarting needs one.
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"die"}"#).await;
    assert_eq!(ws.json().await["type"], "amarre.session_event");
    let other = server.post("/sessions", "{}").await;
    assert_eq!(other.0, 201);
    assert_eq!(
        server.post(&format!("/sessions/{id}/restart"), "").await.0,
        429
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_rules() {
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    assert_eq!(
        server.post(&format!("/sessions/{id}/restart"), "").await,
        (409, json!({"error": "already_running"}))
    );
    assert_eq!(
        server.post("/sessions/000000000000/restart", "").await,
        (404, json!({"error": "not_found"}))
    );
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"die"}"#).await;
    ws.json().await;
    ws.closed().await;
    let (status, body) = server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(
        (status, body["status"].as_str(), body["exitCode"].as_i64()),
        (200, Some("crashed"), Some(7))
    );
    // What to do with the conversation is "resume" (the default) or "new", nothing else.
    let (status, body) = server
        .post(
            &format!("/sessions/{id}/restart"),
            r#"{"conversation":"old"}"#,
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str(), body["field"].as_str()),
        (400, Some("invalid_request"), Some("conversation")),
        "{body}"
    );
    let (status, body) = server.post(&format!("/sessions/{id}/restart"), "[]").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = server.post(&format!("/sessions/{id}/restart"), "").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("running")));
    assert!(
        body.get("exitCode").is_none(),
        "exit code cleared on restart"
    );
    // An agent moorline cannot continue a conversation of always starts a new one.
    assert_eq!(body["conversation"], "new", "{body}");
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"id":"2"}"#).await;
    assert_eq!(ws.json().await["echo"]["id"], "2");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amarre_route_quirks() {
    let server = TestServer::start().await;
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let resp = server
            .http
            .request(method, server.url("/"))
            .send()
            .await
            .expect("root");
        assert_eq!(resp.status().as_u16(), 426);
        assert_eq!(resp.headers()["upgrade"], "websocket");
        assert_eq!(resp.headers()["connection"], "Upgrade");
        assert_eq!(
            resp.text().await.expect("body"),
            "Use /sessions/<id>; see docs/PROTOCOL.md\n"
        );
    }
    assert_eq!(server.get("/nope").await, (404, "Not found\n".into()));
    assert_eq!(server.get("/sessions/").await, (404, "Not found\n".into()));
    let put = |path: String| server.http.put(server.url(&path)).send();
    let resp = put("/sessions/unknownid".into()).await.expect("put");
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(resp.text().await.expect("body"), r#"{"error":"not_found"}"#);
    let id = server.session("fixture").await;
    let resp = put(format!("/sessions/{id}")).await.expect("put");
    assert_eq!(
        (resp.status().as_u16(), resp.text().await.expect("body")),
        (404, "Not found\n".into())
    );
    assert_eq!(
        server.get(&format!("/sessions/{id}/restart")).await,
        (404, "Not found\n".into())
    );
    // An id that is not UTF-8 once decoded gets the API's error format, not axum's text.
    let (status, body) = server.get_json("/sessions/%FF").await;
    assert_eq!(
        (status, &body["error"], &body["field"]),
        (400, &json!("invalid_request"), &json!("id"))
    );
    assert_eq!(server.get("/healthz").await, (200, "ok\n".into()));
    assert_eq!(
        server.post("/push/tokens", "{}").await,
        (503, json!({"error": "push_disabled"}))
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_sessions_lines_and_spawns() {
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"invalid_utf8"}"#).await;
    ws.json().await;
    ws.json().await;
    let (status, text) = server.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains(r#"moorline_sessions{status="running"} 1"#),
        "{text}"
    );
    assert!(text.contains("moorline_clients 1"), "{text}");
    assert!(text.contains("moorline_lines_out_total 2"), "{text}");
    assert!(
        text.contains(r#"moorline_lines_dropped_total{reason="invalid_utf8"} 1"#),
        "{text}"
    );
    assert!(text.contains("moorline_spawn_seconds_count 1"), "{text}");
    assert!(text.contains("moorline_lines_in_total 1"), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_environment_is_limited_to_the_allow_list_and_never_weakens_the_agent() {
    let server = TestServer::start_with(|c| {
        c.instances[0].allowed_env = vec!["FROM_*".into(), "LD_PRELOAD".into()];
        let mut pi = instance("pi", "pi");
        pi.allowed_env = vec!["*".into()];
        c.instances.push(pi);
    })
    .await;
    let (status, body) = server.post("/sessions", r#"{"env":{"OTHER":"1"}}"#).await;
    assert_eq!(
        (status, body["error"].as_str(), body["key"].as_str()),
        (400, Some("env_not_allowed"), Some("OTHER")),
        "{body}"
    );
    // Allowed by the instance, still refused: it would change what code runs.
    let (status, body) = server
        .post("/sessions", r#"{"env":{"LD_PRELOAD":"/x.so"}}"#)
        .await;
    assert_eq!(
        (status, body["key"].as_str()),
        (400, Some("LD_PRELOAD")),
        "{body}"
    );
    // An adapter's own switches (here pi's configuration directory, which could load other
    // extensions than its permission gate) are refused even when everything is allowed.
    let (status, body) = server
        .post(
            "/sessions",
            r#"{"instanceId":"pi","env":{"PI_CODING_AGENT_DIR":"/tmp/x"}}"#,
        )
        .await;
    assert_eq!(
        (status, body["key"].as_str()),
        (400, Some("PI_CODING_AGENT_DIR")),
        "{body}"
    );
    assert_eq!(
        server
            .post("/sessions", r#"{"env":{"FROM_CLIENT":"1"}}"#)
            .await
            .0,
        201
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_working_directory_must_lie_in_a_workspace_root() {
    let root = tempfile::tempdir().expect("root");
    let outside = tempfile::tempdir().expect("outside");
    std::fs::create_dir(root.path().join("proj")).expect("proj");
    std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).expect("symlink");
    let r = root.path().to_owned();
    let server = TestServer::start_with(move |c| {
        c.instances[0].workspace_roots = vec![r];
        let mut strict = instance("strict", "command");
        strict.command = Some(vec!["/bin/cat".into()]);
        c.instances.push(strict);
    })
    .await;
    let post = |cwd: std::path::PathBuf| {
        let body = json!({"cwd": cwd}).to_string();
        let server = &server;
        async move { server.post("/sessions", &body).await }
    };
    assert_eq!(post(root.path().join("proj")).await.0, 201);
    for bad in [
        outside.path().to_owned(),
        root.path().join("proj/../../"),
        root.path().join("escape"),
        root.path().join("missing"),
    ] {
        let (status, body) = post(bad.clone()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_cwd")),
            "{}: {body}",
            bad.display()
        );
    }
    // Without workspace roots, clients cannot choose at all.
    let body = json!({"instanceId": "strict", "cwd": root.path()}).to_string();
    let (status, body) = server.post("/sessions", &body).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("workspace_roots"),
        "{body}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_working_directories_are_created_when_the_instance_says_so_and_secrets_stay_server_side()
 {
    let root = tempfile::tempdir().expect("root");
    let secrets = tempfile::tempdir().expect("secrets");
    let creds = secrets.path().join("agent.env");
    std::fs::write(&creds, "# API keys\n\nexport FROM_SECRET='s3cr3t-0123'\n").expect("write");
    let (r, c2) = (root.path().to_owned(), creds.clone());
    let server = TestServer::start_with(move |c| {
        c.instances[0].workspace_roots = vec![r];
        c.instances[0].create_cwd = true;
        c.instances[0].credentials_file = Some(c2);
    })
    .await;
    let cwd = root.path().join("new/project");
    // A client cannot override a server-side secret.
    let body = json!({"cwd": cwd, "env": {"FROM_SECRET": "client"}}).to_string();
    let (status, created) = server.post("/sessions", &body).await;
    assert_eq!(status, 201, "{created}");
    assert!(cwd.is_dir(), "created inside the root");
    let id = created["id"].as_str().expect("id");
    let mut ws = server.ws(id).await;
    ws.send(r#"{"_emit":"env","key":"FROM_SECRET"}"#).await;
    assert_eq!(ws.json().await["value"], "s3cr3t-0123");
    // The secret is in no summary and not in the session's stored metadata.
    let listed = server.get("/sessions").await.1;
    assert!(!listed.contains("s3cr3t"));
    let meta = std::fs::read_to_string(server.session_dir(id).join("meta.json")).expect("meta");
    assert!(!meta.contains("s3cr3t"), "{meta}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_that_cannot_start_are_marked_unavailable_with_the_reason() {
    let dir = tempfile::tempdir().expect("dir");
    let not_executable = dir.path().join("agent.sh");
    std::fs::write(&not_executable, "#!/bin/sh\n").expect("write");
    let creds = dir.path().join("gone.env");
    let (ne, cr, missing_root) = (
        not_executable.clone(),
        creds.clone(),
        dir.path().join("no-such-root"),
    );
    let server = TestServer::start_with(move |c| {
        let mut missing = instance("missing", "command");
        missing.command = Some(vec!["/nonexistent/agent".into()]);
        let mut not_exec = instance("not-exec", "thing");
        not_exec.agent_path = Some(ne);
        let mut nopath = instance("nopath", "claude-code");
        nopath.env.insert("PATH".into(), "/nonexistent".into());
        let mut no_creds = c.instances[0].clone();
        no_creds.id = "no-creds".into();
        no_creds.credentials_file = Some(cr);
        let mut no_root = c.instances[0].clone();
        no_root.id = "no-root".into();
        no_root.workspace_roots = vec![missing_root];
        c.instances
            .extend([missing, not_exec, nopath, no_creds, no_root]);
    })
    .await;
    let (status, body) = server.get_json("/instances").await;
    assert_eq!(status, 200);
    let by_id = |id: &str| {
        body.as_array()
            .expect("list")
            .iter()
            .find(|i| i["id"] == id)
            .cloned()
            .expect(id)
    };
    assert_eq!(by_id("fixture")["available"], true);
    assert!(by_id("fixture").get("reason").is_none());
    assert_eq!(by_id("fixture")["dialect"], "pi-rpc");
    for (id, want) in [
        ("missing", "command: /nonexistent/agent"),
        ("not-exec", "agent_path"),
        ("nopath", "agent: claude is not an executable found in PATH"),
        ("no-creds", "credentials_file"),
        ("no-root", "workspace_roots"),
    ] {
        let inst = by_id(id);
        assert_eq!(inst["available"], false, "{inst}");
        let reason = inst["reason"].as_str().expect("reason");
        assert!(reason.contains(want), "{id}: {reason}");
    }
    assert!(
        by_id("not-exec")["reason"]
            .as_str()
            .expect("reason")
            .contains("not executable")
    );

    // A missing credentials file at session creation is a specific error.
    let (status, body) = server
        .post("/sessions", r#"{"instanceId":"no-creds"}"#)
        .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"], "credentials_unavailable", "{body}");
    assert_eq!(body["instanceId"], "no-creds");
    assert_eq!(body["path"], json!(creds));
    // Once the file is there, the instance is available again and the session starts.
    std::fs::write(&creds, "FROM_X=1\n").expect("write");
    let (_, body) = server.get_json("/instances").await;
    assert!(
        body.as_array()
            .expect("list")
            .iter()
            .any(|i| i["id"] == "no-creds" && i["available"] == true),
        "{body}"
    );
    let (status, body) = server
        .post("/sessions", r#"{"instanceId":"no-creds"}"#)
        .await;
    assert_eq!(status, 201, "{body}");
    // A malformed line is refused with its number, and never its content.
    std::fs::write(&creds, "FROM_X=1\nnot-a-secret-assignment\n").expect("write");
    let (status, body) = server
        .post("/sessions", r#"{"instanceId":"no-creds"}"#)
        .await;
    assert_eq!(
        (status, &body["error"]),
        (500, &json!("credentials_unavailable"))
    );
    let message = body["message"].as_str().expect("message");
    assert!(
        message.contains("line 2") && !message.contains("not-a-secret"),
        "{message}"
    );

    // A workspace root that does not exist is said to be missing, not "outside".
    let cwd = dir.path().join("no-such-root/project");
    let body = json!({"instanceId": "no-root", "cwd": cwd}).to_string();
    let (status, body) = server.post("/sessions", &body).await;
    assert_eq!(status, 400, "{body}");
    let message = body["message"].as_str().expect("message");
    assert!(
        message.contains("does not exist") && !message.contains("outside"),
        "{message}"
    );
    server.stop().await;
}
