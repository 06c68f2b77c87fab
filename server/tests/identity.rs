//! The control plane on a Unix socket, and who each request comes from: tailnet identity
//! headers believed on the socket only, `allowed_users`, the user recorded with every approval
//! answer (process and durable runtimes), `createdBy`, the audit log, and no tailnet identity
//! for requests tailscale serve forwarded from this machine itself.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{TestServer, WAIT, Ws, audit_lines, capture_audit, eventually, log_lines};
use moorline::config::RuntimeKind;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};

const ALICE: (&str, &str) = ("tailscale-user-login", "alice@example.com");
const BOB: (&str, &str) = ("tailscale-user-login", "bob@example.com");

async fn next_of<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut Ws<S>, kind: &str) -> Value {
    loop {
        let v = ws.json().await;
        if v["type"] == kind {
            return v;
        }
    }
}

/// A request through the server's Unix socket: status and JSON body.
async fn unix(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Value) {
    let mut req = server
        .unix_http()
        .request(method, format!("http://localhost{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b.to_owned());
    }
    let resp = req.send().await.expect("request over the socket");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A request over TCP with extra headers.
async fn tcp(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = server.http.get(server.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_and_websockets_work_over_the_unix_socket_which_is_private() {
    let server = TestServer::start_unix(|_| {}).await;
    let socket = server.socket.clone().expect("socket");
    assert_eq!(mode(&socket), 0o600, "only the server's user may connect");

    let (status, list) = unix(&server, reqwest::Method::GET, "/sessions", &[], None).await;
    assert_eq!((status, list), (200, json!([])));
    let (status, me) = unix(&server, reqwest::Method::GET, "/me", &[], None).await;
    assert_eq!(status, 200);
    assert_eq!(
        me,
        json!({"user": "local", "name": null, "via": "unix", "source": "local"})
    );
    let (status, created) = unix(
        &server,
        reqwest::Method::POST,
        "/sessions",
        &[],
        Some(r#"{"instanceId":"fixture"}"#),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["createdBy"], "local");
    let id = created["id"].as_str().expect("id").to_owned();

    let mut ws = server
        .unix_ws(&format!("/sessions/{id}?hello=1"), &[])
        .await
        .expect("websocket over the socket");
    let hello = ws.json().await;
    assert_eq!(
        (hello["type"].as_str(), hello["user"].as_str()),
        (Some("amarre.hello"), Some("local"))
    );
    ws.send(r#"{"id":"over-unix"}"#).await;
    assert_eq!(
        next_of(&mut ws, "response").await["echo"]["id"],
        "over-unix"
    );

    // The same server still answers on loopback TCP, as amarre's clients expect.
    let mut tcp_ws = server.ws(&id).await;
    tcp_ws.send(r#"{"id":"over-tcp"}"#).await;
    assert_eq!(
        next_of(&mut tcp_ws, "response").await["echo"]["id"],
        "over-tcp"
    );
    server.stop().await;
    assert!(!socket.exists(), "the socket is removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_can_be_the_only_listener_with_its_configured_mode() {
    let dir = tempfile::tempdir().expect("dir");
    // A fresh directory is created private; a stale socket of a dead server is replaced.
    let socket = dir.path().join("run/moorline.sock");
    std::fs::create_dir(dir.path().join("run")).expect("mkdir");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));
    assert!(socket.exists());

    let state = tempfile::tempdir().expect("state");
    let mut config = common::test_config(state.path().to_owned());
    config.instances[0].workspace_roots = vec![state.path().join("work")];
    config.tcp = false;
    config.unix_socket = None;
    let err = config.validate().expect_err("nothing to listen on");
    assert!(
        err.to_string().contains("tcp") && err.to_string().contains("unix_socket"),
        "{err}"
    );
    config.unix_socket = Some(socket.clone());
    config.unix_socket_mode = "0660".into();
    config.validate().expect("valid");
    let listeners = moorline::Listeners::bind(&config).await.expect("bind");
    assert!(listeners.tcp.is_none(), "tcp = false: no TCP listener");
    assert_eq!(mode(&socket), 0o660);

    // A second server on the same socket is refused; the live socket is left alone.
    match moorline::Listeners::bind(&config).await {
        Err(e) => assert!(e.to_string().contains("another server"), "{e}"),
        Ok(_) => panic!("bound a live server's socket"),
    }

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(moorline::run(listeners, config, async move {
        let _ = rx.await;
    }));
    let http = reqwest::Client::builder()
        .unix_socket(socket.as_path())
        .build()
        .expect("client");
    let resp = http
        .get("http://localhost/healthz")
        .send()
        .await
        .expect("healthz over the socket");
    assert_eq!(resp.status().as_u16(), 200);
    let _ = tx.send(());
    tokio::time::timeout(WAIT, server)
        .await
        .expect("stops")
        .expect("task")
        .expect("run");
    assert!(!socket.exists());

    // A socket path inside a directory agents can see is refused.
    let mut config = common::test_config(state.path().to_owned());
    config.unix_socket = Some(state.path().join("moorline.sock"));
    let err = config.validate().expect_err("inside state_dir");
    assert!(err.to_string().contains("state_dir"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_users_admit_listed_tailnet_users_and_forged_headers_on_tcp_give_nothing() {
    let server = TestServer::start_unix(|c| {
        c.allowed_users = vec!["alice@example.com".into(), "bob@example.com".into()];
        // Only alice may use the fixture instance.
        c.instances[0].allowed_users = vec!["alice@example.com".into()];
    })
    .await;
    let get = reqwest::Method::GET;

    let (status, me) = unix(&server, get.clone(), "/me", &[ALICE], None).await;
    assert_eq!(status, 200);
    assert_eq!(me["user"], "alice@example.com");
    assert_eq!(
        (me["via"].as_str(), me["source"].as_str()),
        (Some("unix"), Some("tailnet"))
    );

    let mallory = ("tailscale-user-login", "mallory@example.com");
    let (status, body) = unix(&server, get.clone(), "/sessions", &[mallory], None).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "forbidden_user");
    assert_eq!(body["user"], "mallory@example.com");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("allowed_users")),
        "{body}"
    );

    // On TCP the header proves nothing: the request is "local", which is not listed.
    let (status, body) = tcp(&server, "/sessions", &[ALICE]).await;
    assert_eq!(
        (status, body["user"].as_str()),
        (403, Some("local")),
        "{body}"
    );
    let (status, _) = tcp(&server, "/me", &[]).await;
    assert_eq!(status, 403);
    // Nor does a request tailscale serve forwarded without a login (Funnel, tagged devices).
    let (status, body) = unix(
        &server,
        get.clone(),
        "/me",
        &[("x-forwarded-for", "100.64.0.9")],
        None,
    )
    .await;
    assert_eq!((status, body["user"].as_str()), (403, Some("anonymous")));

    // Per instance: bob may use the server but not the fixture instance.
    let create = |who: (&'static str, &'static str)| {
        let server = &server;
        async move {
            unix(
                server,
                reqwest::Method::POST,
                "/sessions",
                &[who],
                Some(r#"{"instanceId":"fixture"}"#),
            )
            .await
        }
    };
    let (status, body) = create(BOB).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        (body["error"].as_str(), body["instanceId"].as_str()),
        (Some("forbidden_user"), Some("fixture"))
    );
    let (status, created) = create(ALICE).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["createdBy"], "alice@example.com");
    let id = created["id"].as_str().expect("id").to_owned();
    let (_, list) = unix(&server, get.clone(), "/sessions", &[BOB], None).await;
    assert_eq!(list, json!([]), "bob does not see alice's fixture session");
    let (status, _) = unix(
        &server,
        get.clone(),
        &format!("/sessions/{id}"),
        &[BOB],
        None,
    )
    .await;
    assert_eq!(status, 403);
    let refused = server
        .unix_ws(&format!("/sessions/{id}"), &[BOB])
        .await
        .err()
        .expect("bob may not attach");
    assert_eq!(refused.0, 403, "{}", refused.1);
    let (status, summary) = unix(&server, get, &format!("/sessions/{id}"), &[ALICE], None).await;
    assert_eq!(
        (status, summary["createdBy"].as_str()),
        (200, Some("alice@example.com"))
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_headers_on_tcp_are_ignored_but_the_opt_in_believes_them() {
    let server = TestServer::start_with(|c| c.allowed_users = vec!["local".into()]).await;
    let (status, me) = tcp(&server, "/me", &[ALICE]).await;
    assert_eq!((status, me["user"].as_str()), (200, Some("local")));
    server.stop().await;

    let server = TestServer::start_with(|c| c.trust_tailscale_headers_on_tcp = true).await;
    let (status, me) = tcp(&server, "/me", &[ALICE]).await;
    assert_eq!(
        (status, me["user"].as_str()),
        (200, Some("alice@example.com"))
    );
    server.stop().await;
}

/// An address of a local interface other than loopback (else a loopback one), found the way
/// an operator would (`ip addr`), independently of the server.
fn an_interface_address() -> String {
    let local: Vec<std::net::IpAddr> = nix::ifaddrs::getifaddrs()
        .expect("getifaddrs")
        .filter_map(|ifa| {
            let addr = ifa.address?;
            addr.as_sockaddr_in()
                .map(|a| std::net::IpAddr::V4(a.ip()))
                .or_else(|| addr.as_sockaddr_in6().map(|a| std::net::IpAddr::V6(a.ip())))
        })
        .collect();
    assert!(
        !local.contains(&"100.64.0.9".parse().expect("ip")),
        "100.64.0.9 stands for another device in these tests"
    );
    local
        .iter()
        .find(|ip| !ip.is_loopback())
        .or(local.first())
        .expect("a local address")
        .to_string()
}

/// A contained agent cannot reach loopback but can reach this machine's tailnet address, where
/// tailscale serve stamps its request with this machine's login (the owner's). Such a request,
/// forwarded from one of this machine's addresses, gets no tailnet identity; one from another
/// device does. Headers only: no traffic leaves loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_tailscale_serve_stamped_on_a_request_from_this_machine_is_not_believed() {
    capture_audit();
    let server = TestServer::start_unix(|c| {
        c.allowed_users = vec!["owner-selfcall@example.com".into()];
    })
    .await;
    let get = reqwest::Method::GET;
    let owner = ("tailscale-user-login", "owner-selfcall@example.com");
    let here = an_interface_address();

    let (status, me) = unix(
        &server,
        get.clone(),
        "/me",
        &[owner, ("x-forwarded-for", "100.64.0.9")],
        None,
    )
    .await;
    assert_eq!(
        (status, me["user"].as_str(), me["source"].as_str()),
        (200, Some("owner-selfcall@example.com"), Some("tailnet")),
        "from another device the login is believed: {me}"
    );

    for from in ["127.0.0.1", here.as_str()] {
        let (status, body) = unix(
            &server,
            reqwest::Method::POST,
            "/sessions",
            &[owner, ("x-forwarded-for", from)],
            Some(r#"{"instanceId":"fixture"}"#),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str(), body["user"].as_str()),
            (403, Some("forbidden_user"), Some("anonymous")),
            "from {from}: {body}"
        );
    }
    let (status, list) = unix(
        &server,
        get.clone(),
        "/sessions",
        &[owner, ("x-forwarded-for", "100.64.0.9")],
        None,
    )
    .await;
    assert_eq!((status, list), (200, json!([])), "nothing was created");

    // A WebSocket is refused the same way (the upgrade request carries the same headers).
    let (_, created) = unix(
        &server,
        reqwest::Method::POST,
        "/sessions",
        &[owner, ("x-forwarded-for", "100.64.0.9")],
        Some(r#"{"instanceId":"fixture"}"#),
    )
    .await;
    let id = created["id"].as_str().expect("id").to_owned();
    let refused = server
        .unix_ws(
            &format!("/sessions/{id}"),
            &[owner, ("x-forwarded-for", &here)],
        )
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.0, 403, "{}", refused.1);

    // The operator is told why, once per request.
    let warnings: Vec<_> = log_lines("moorline::security")
        .into_iter()
        .filter(|l| l["fields"]["login"] == "owner-selfcall@example.com")
        .collect();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(
        warnings.iter().all(|w| w["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("from this machine through tailscale serve"))),
        "{warnings:?}"
    );
    assert_eq!(warnings[1]["fields"]["from"], here.as_str());
    server.stop().await;
}

/// Alice answers an approval request over the socket; bob's later answer loses. Both see who
/// answered, and the audit log names alice, the session, the request and the tool.
async fn approval_by_alice(server: &TestServer, instance: &str) {
    let (status, created) = unix(
        server,
        reqwest::Method::POST,
        "/sessions",
        &[ALICE],
        Some(&format!(r#"{{"instanceId":"{instance}"}}"#)),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    let path = format!("/sessions/{id}");
    let mut alice = server.unix_ws(&path, &[ALICE]).await.expect("alice");
    let mut bob = server.unix_ws(&path, &[BOB]).await.expect("bob");
    alice.send(r#"{"_emit":"ui_req","reqId":"R1"}"#).await;
    next_of(&mut bob, "extension_ui_request").await;
    alice
        .send(r#"{"type":"extension_ui_response","id":"R1","confirmed":true}"#)
        .await;
    for ws in [&mut alice, &mut bob] {
        let resolved = next_of(ws, "amarre.approval_resolved").await;
        assert_eq!(
            resolved,
            json!({"type": "amarre.approval_resolved", "id": "R1", "decision": "allow",
                   "by": "client", "user": "alice@example.com"})
        );
    }
    bob.send(r#"{"type":"extension_ui_response","id":"R1","confirmed":false}"#)
        .await;
    let echo = next_of(&mut alice, "response").await;
    assert_eq!(echo["echo"]["confirmed"], true);

    let mine = |action: &str| {
        let id = id.clone();
        let action = action.to_owned();
        move || {
            let found = audit_lines().into_iter().find(|l| {
                l["fields"]["session"] == id.as_str() && l["fields"]["action"] == action.as_str()
            });
            async move { found.is_some() }
        }
    };
    eventually("the approval's audit line", mine("approval")).await;
    let line = audit_lines()
        .into_iter()
        .find(|l| l["fields"]["session"] == id.as_str() && l["fields"]["action"] == "approval")
        .expect("audit line");
    let f = &line["fields"];
    assert_eq!(
        (
            f["user"].as_str(),
            f["by"].as_str(),
            f["request"].as_str(),
            f["tool"].as_str(),
            f["decision"].as_str(),
            f["instance"].as_str()
        ),
        (
            Some("alice@example.com"),
            Some("client"),
            Some("R1"),
            Some("bash"),
            Some("allow"),
            Some(instance)
        ),
        "{line}"
    );
    assert!(f["at_ms"].as_u64().is_some(), "{line}");
    let approvals = audit_lines()
        .into_iter()
        .filter(|l| l["fields"]["session"] == id.as_str() && l["fields"]["action"] == "approval")
        .count();
    assert_eq!(approvals, 1, "bob's late answer settled nothing");
    let created_line = audit_lines()
        .into_iter()
        .find(|l| l["fields"]["session"] == id.as_str() && l["fields"]["action"] == "create")
        .expect("create audit line");
    assert_eq!(created_line["fields"]["user"], "alice@example.com");

    let (status, _) = unix(server, reqwest::Method::DELETE, &path, &[BOB], None).await;
    assert_eq!(status, 204);
    let deleted = audit_lines()
        .into_iter()
        .find(|l| l["fields"]["session"] == id.as_str() && l["fields"]["action"] == "delete")
        .expect("delete audit line");
    assert_eq!(deleted["fields"]["user"], "bob@example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_record_who_answered_with_the_process_runtime() {
    capture_audit();
    let server = TestServer::start_unix(|_| {}).await;
    approval_by_alice(&server, "fixture").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_record_who_answered_in_a_keeper() {
    require_durable!();
    capture_audit();
    let sandbox = common::Sandbox::new();
    let server = TestServer::start_unix(|c| {
        sandbox.apply(c);
        c.instances[0].runtime = RuntimeKind::Tmux;
    })
    .await;
    approval_by_alice(&server, "fixture").await;

    // A restarted server adopts the running agent, and still learns who answered.
    let (_, created) = unix(
        &server,
        reqwest::Method::POST,
        "/sessions",
        &[ALICE],
        Some(r#"{"instanceId":"fixture"}"#),
    )
    .await;
    let id = created["id"].as_str().expect("id").to_owned();
    let socket_dir = tempfile::tempdir().expect("dir");
    let state = server.stop_keep_state().await;
    let mut config = common::test_config(state.path().to_owned());
    sandbox.apply(&mut config);
    config.instances[0].runtime = RuntimeKind::Tmux;
    config.instances[0].workspace_roots = vec![state.path().join("work")];
    config.unix_socket = Some(socket_dir.path().join("moorline.sock"));
    let server = TestServer::start_in(state, config).await;
    let path = format!("/sessions/{id}");
    let mut bob = server.unix_ws(&path, &[BOB]).await.expect("bob");
    bob.send(r#"{"_emit":"ui_req","reqId":"R9"}"#).await;
    next_of(&mut bob, "extension_ui_request").await;
    bob.send(r#"{"type":"extension_ui_response","id":"R9","confirmed":false}"#)
        .await;
    let resolved = next_of(&mut bob, "amarre.approval_resolved").await;
    assert_eq!(
        (resolved["user"].as_str(), resolved["decision"].as_str()),
        (Some("bob@example.com"), Some("deny"))
    );
    let bobs = {
        let id = id.clone();
        move || {
            let found = audit_lines().into_iter().any(|l| {
                l["fields"]["session"] == id.as_str()
                    && l["fields"]["request"] == "R9"
                    && l["fields"]["user"] == "bob@example.com"
            });
            async move { found }
        }
    };
    eventually("bob's answer in the audit log", bobs).await;
    server.stop().await;
}

/// Projects name paths on this machine: a user an instance leaves out neither sees nor removes
/// the projects whose sessions run by that instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_are_shown_only_to_users_of_their_instance() {
    let (root, repo) = common::repository();
    let server = TestServer::start_unix(|c| {
        c.allowed_users = vec!["alice@example.com".into(), "bob@example.com".into()];
        c.instances[0].allowed_users = vec!["alice@example.com".into()];
        // The repository's directory, apart from the one holding the socket.
        c.instances[0].workspace_roots = vec![root.path().to_owned()];
    })
    .await;
    let bob = ("tailscale-user-login", "bob@example.com");
    let body = serde_json::json!({"path": repo, "id": "app", "defaultInstance": "fixture"});
    let (status, created) = unix(
        &server,
        reqwest::Method::POST,
        "/projects",
        &[bob],
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(
        status, 403,
        "bob may not use the fixture instance: {created}"
    );
    let (status, created) = unix(
        &server,
        reqwest::Method::POST,
        "/projects",
        &[ALICE],
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let (_, listed) = unix(&server, reqwest::Method::GET, "/projects", &[ALICE], None).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let (_, listed) = unix(&server, reqwest::Method::GET, "/projects", &[bob], None).await;
    assert_eq!(listed, serde_json::json!([]));
    let (status, _) = unix(
        &server,
        reqwest::Method::DELETE,
        "/projects/app",
        &[bob],
        None,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = unix(
        &server,
        reqwest::Method::DELETE,
        "/projects/app",
        &[ALICE],
        None,
    )
    .await;
    assert_eq!(status, 204);
    server.stop().await;
}
