//! `GET /events` and `moorline watch`: a live list of sessions can be kept from the stream
//! alone: creation, approvals waiting and settled (with who answered), activity, deletion;
//! a client that reconnects gets exactly what it missed.

mod common;

use std::collections::VecDeque;

use common::{TestServer, WAIT};
use moorline::watch::{SseFrame, SseParser};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

/// An open `GET /events`.
struct Events {
    resp: reqwest::Response,
    parser: SseParser,
    ready: VecDeque<SseFrame>,
    /// The id of the last frame read.
    last_id: Option<String>,
}

impl Events {
    async fn open(server: &TestServer, last_id: Option<&str>) -> Self {
        let mut req = server.http.get(server.url("/events"));
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        Self::from(req).await
    }

    /// `GET /events` through the server's Unix socket as tailnet user `login`.
    async fn open_as(server: &TestServer, login: &str) -> Self {
        let req = server
            .unix_http()
            .get("http://localhost/events")
            .header("tailscale-user-login", login)
            .header("x-forwarded-for", "100.64.0.9");
        Self::from(req).await
    }

    async fn from(req: reqwest::RequestBuilder) -> Self {
        let resp = req.send().await.expect("GET /events");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().expect("type"),
            "text/event-stream"
        );
        Self {
            resp,
            parser: SseParser::default(),
            ready: VecDeque::new(),
            last_id: None,
        }
    }

    async fn next(&mut self) -> Value {
        self.try_next(WAIT).await.expect("an event in time")
    }

    /// The next event, if one comes within `wait`.
    async fn try_next(&mut self, wait: std::time::Duration) -> Option<Value> {
        let frame = tokio::time::timeout(wait, async {
            loop {
                if let Some(f) = self.ready.pop_front() {
                    return f;
                }
                let chunk = self
                    .resp
                    .chunk()
                    .await
                    .expect("stream")
                    .expect("stream ended");
                self.ready.extend(self.parser.feed(&chunk));
            }
        })
        .await
        .ok()?;
        self.last_id = frame.id.clone();
        Some(serde_json::from_str(&frame.data).expect("event JSON"))
    }

    /// The next event of type `kind` (others are skipped).
    async fn next_of(&mut self, kind: &str) -> Value {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(v) = self.try_next(left).await else {
                panic!("no {kind} event in time; saw {seen:?}");
            };
            if v["type"] == kind {
                return v;
            }
            seen.push(format!("{} {}", v["type"], v["session"]["activity"]));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_followed_from_creation_through_an_approval_to_deletion() {
    let server = TestServer::start().await;
    let mut events = Events::open(&server, None).await;
    let snapshot = events.next().await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["sessions"], serde_json::json!([]));

    let id = server.session("fixture").await;
    let created = events.next_of("session_created").await;
    assert_eq!(created["sessionId"], id.as_str());
    assert_eq!(created["instanceId"], "fixture");
    assert_eq!(created["session"]["status"], "running");
    assert_eq!(created["session"]["createdBy"], "local");

    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"ui_req","reqId":"R1"}"#).await;
    let pending = events.next_of("approval_pending").await;
    assert_eq!(pending["sessionId"], id.as_str());
    assert_eq!(pending["request"]["id"], "R1");
    assert_eq!(pending["session"]["activity"], "waiting", "{pending}");
    assert_eq!(pending["session"]["pendingApprovals"][0]["id"], "R1");

    ws.send(r#"{"type":"extension_ui_response","id":"R1","confirmed":false}"#)
        .await;
    let resolved = events.next_of("approval_resolved").await;
    assert_eq!(
        resolved["resolution"],
        serde_json::json!({"id": "R1", "decision": "deny", "by": "client", "user": "local", "tool": "bash"})
    );
    // Once the request is gone, the session is no longer waiting for anyone.
    let activity = events.next_of("session_activity").await;
    assert_ne!(activity["session"]["activity"], "waiting", "{activity}");
    assert!(activity["session"].get("pendingApprovals").is_none());

    let (status, _) = server.delete(&format!("/sessions/{id}")).await;
    assert_eq!(status, 204);
    let deleted = events.next_of("session_deleted").await;
    assert_eq!(deleted["sessionId"], id.as_str());
    assert!(deleted.get("session").is_none());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_and_a_restart_are_status_events() {
    let server = TestServer::start().await;
    let mut events = Events::open(&server, None).await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"die","code":3}"#).await;
    let ended = events.next_of("session_status").await;
    assert_eq!(ended["session"]["status"], "crashed", "{ended}");
    assert_eq!(ended["session"]["exitCode"], 3);
    let (status, _) = server.post(&format!("/sessions/{id}/restart"), "").await;
    assert_eq!(status, 200);
    let running = events.next_of("session_status").await;
    assert_eq!(running["session"]["status"], "running");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_gets_exactly_what_it_missed_or_a_snapshot() {
    let server = TestServer::start().await;
    let mut events = Events::open(&server, None).await;
    events.next().await;
    let first = server.session("echo").await;
    let created = events.next_of("session_created").await;
    assert_eq!(created["sessionId"], first.as_str());
    let resume = events.last_id.clone().expect("an id");
    drop(events);

    // Missed while away: one creation.
    let second = server.session("echo").await;
    let mut again = Events::open(&server, Some(&resume)).await;
    let next = again.next().await;
    assert_eq!(next["type"], "session_created", "no snapshot: {next}");
    assert_eq!(next["sessionId"], second.as_str());
    let third = server.session("echo").await;
    let live = again.next_of("session_created").await;
    assert_eq!(live["sessionId"], third.as_str());

    // An id from another run of the server (or too old) gets a snapshot of everything.
    let mut stale = Events::open(&server, Some("0badc0de-3")).await;
    let snapshot = stale.next().await;
    assert_eq!(snapshot["type"], "snapshot");
    let ids: Vec<&str> = snapshot["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, [&first, &second, &third]);

    // `?since=` works like the header; a malformed one is refused.
    let (status, body) = server.get_json("/events?since=nonsense").await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "since");
    server.stop().await;
}

/// `moorline watch` with `args` against `server`, and a reader of its next line.
struct Watch {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Watch {
    fn start(server: &TestServer, args: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(common::moorline_exe())
            .arg("watch")
            .args(args)
            .args(["--url", &server.url("")])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("moorline watch");
        let lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        Self { child, lines }
    }

    async fn next(&mut self) -> String {
        tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("a line in time")
            .expect("read")
            .expect("a line")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moorline_watch_prints_events_as_they_happen() {
    let server = TestServer::start().await;
    let mut watch = Watch::start(&server, &["--json"]);
    let snapshot: Value = serde_json::from_str(&watch.next().await).expect("JSON line");
    assert_eq!(snapshot["type"], "snapshot");
    let id = server.session("echo").await;
    let created: Value = serde_json::from_str(&watch.next().await).expect("JSON line");
    assert_eq!(
        (created["type"].as_str(), created["sessionId"].as_str()),
        (Some("session_created"), Some(id.as_str()))
    );
    watch.child.kill().await.expect("kill");

    // Without --json, a line a person reads: the session, what happened, what it is now.
    let mut watch = Watch::start(&server, &[]);
    assert_eq!(watch.next().await, "snapshot: 1 sessions");
    let second = server.session("echo").await;
    assert_eq!(
        watch.next().await,
        format!("{second}\tsession_created\techo running")
    );
    watch.child.kill().await.expect("kill");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keepers_approval_requests_are_events_too() {
    require_durable!();
    let sandbox = common::Sandbox::new();
    let server = TestServer::start_with(|c| {
        sandbox.apply(c);
        let mut tmux = common::instance("tmux", "fixture");
        tmux.agent_path = Some(common::fixture_agent());
        tmux.runtime = moorline::config::RuntimeKind::Tmux;
        c.instances.push(tmux);
    })
    .await;
    let mut events = Events::open(&server, None).await;
    let id = server.session("tmux").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"ui_req","reqId":"K1"}"#).await;
    // The keeper, in its own process, writes the pending file; its doorbell tells the server.
    let pending = events.next_of("approval_pending").await;
    assert_eq!(pending["request"]["id"], "K1");
    assert_eq!(pending["session"]["activity"], "waiting");
    ws.send(r#"{"type":"extension_ui_response","id":"K1","confirmed":true}"#)
        .await;
    let resolved = events.next_of("approval_resolved").await;
    assert_eq!(resolved["resolution"]["decision"], "allow");
    assert_eq!(resolved["resolution"]["user"], "local");
    let activity = events.next_of("session_activity").await;
    assert_ne!(activity["session"]["activity"], "waiting");
    let (status, _) = server.delete(&format!("/sessions/{id}")).await;
    assert_eq!(status, 204);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_hears_of_sessions_they_may_not_see() {
    let server = TestServer::start_unix(|c| {
        c.allowed_users = vec!["alice@example.com".into(), "bob@example.com".into()];
        // Only alice may use the fixture instance; both may use echo.
        c.instances[0].allowed_users = vec!["alice@example.com".into()];
    })
    .await;
    let mut alice = Events::open_as(&server, "alice@example.com").await;
    let mut bob = Events::open_as(&server, "bob@example.com").await;
    assert_eq!(alice.next().await["type"], "snapshot");
    assert_eq!(bob.next().await["type"], "snapshot");
    let create = |instance: &'static str| {
        let http = server.unix_http();
        async move {
            let resp = http
                .post("http://localhost/sessions")
                .header("tailscale-user-login", "alice@example.com")
                .header("x-forwarded-for", "100.64.0.9")
                .body(json!({"instanceId": instance}).to_string())
                .send()
                .await
                .expect("POST");
            assert_eq!(resp.status(), 201);
            let body: Value = resp.json().await.expect("json");
            body["id"].as_str().expect("id").to_owned()
        }
    };
    let hidden = create("fixture").await;
    let shared = create("echo").await;
    let seen = alice.next_of("session_created").await;
    assert_eq!(seen["sessionId"], hidden.as_str());
    assert_eq!(seen["session"]["createdBy"], "alice@example.com");
    assert_eq!(
        alice.next_of("session_created").await["sessionId"],
        shared.as_str()
    );
    // Bob's first event is the shared session: the fixture one never reached him.
    assert_eq!(bob.next().await["sessionId"], shared.as_str());
    // Nor is it in his snapshot.
    let mut late = Events::open_as(&server, "bob@example.com").await;
    let snapshot = late.next().await;
    let ids: Vec<&str> = snapshot["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, [shared.as_str()]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_request_leaves_the_summary_while_another_still_waits() {
    let server = TestServer::start().await;
    let mut events = Events::open(&server, None).await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"ui_req","reqId":"A"}"#).await;
    ws.send(r#"{"_emit":"ui_req","reqId":"B"}"#).await;
    assert_eq!(
        events.next_of("approval_pending").await["request"]["id"],
        "A"
    );
    let second = events.next_of("approval_pending").await;
    assert_eq!(second["request"]["id"], "B");
    assert_eq!(
        second["session"]["pendingApprovals"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    ws.send(r#"{"type":"extension_ui_response","id":"A","confirmed":true}"#)
        .await;
    let resolved = events.next_of("approval_resolved").await;
    assert_eq!(resolved["resolution"]["id"], "A");
    // Still waiting (for B), so no activity event follows: this summary must already be right.
    let pending: Vec<&str> = resolved["session"]["pendingApprovals"]
        .as_array()
        .expect("B still waits")
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(pending, ["B"], "{resolved}");
    assert_eq!(resolved["session"]["activity"], "waiting");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_limit_are_refused_until_one_closes() {
    let server = TestServer::start_with(|c| c.limits.max_event_streams = 2).await;
    let mut first = Events::open(&server, None).await;
    let mut second = Events::open(&server, None).await;
    assert_eq!(first.next().await["type"], "snapshot");
    assert_eq!(second.next().await["type"], "snapshot");

    let (status, body) = server.get_json("/events").await;
    assert_eq!(status, 429);
    assert_eq!(body["error"], "max_event_streams_reached");
    assert_eq!(body["limit"], 2);

    // A client that leaves gives its place back (once the server sees the connection close).
    drop(first);
    let admitted = tokio::time::timeout(WAIT, async {
        loop {
            let resp = server
                .http
                .get(server.url("/events"))
                .send()
                .await
                .expect("GET");
            if resp.status() == 200 {
                return;
            }
            assert_eq!(resp.status(), 429);
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(admitted.is_ok(), "a stream was admitted after one closed");
    drop(second);
    server.stop().await;
}
