//! Every refusal of the access policy, over real sockets: Origin, Host and the bearer token.

mod common;

use common::{TestServer, Ws};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_requests_are_refused_whatever_their_content_type() {
    let server = TestServer::start().await;
    // A form POST from a web page needs no CORS preflight: the Origin check must stop it.
    let resp = server
        .http
        .post(server.url("/sessions"))
        .header("origin", "http://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 403);
    assert_eq!(
        resp.json::<serde_json::Value>().await.expect("json"),
        json!({"error": "forbidden_origin", "origin": "http://evil.example"})
    );
    assert_eq!(
        server.get_json("/sessions").await.1,
        json!([]),
        "nothing was created"
    );
    let resp = server
        .http
        .get(server.url("/sessions"))
        .header("origin", "null")
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status().as_u16(), 403);

    let id = server.session("fixture").await;
    let refused = Ws::try_connect(
        &server.ws_url(&format!("/sessions/{id}")),
        &[("origin", "https://evil.example")],
    )
    .await
    .err();
    assert_eq!(
        refused.map(|r| r.0),
        Some(403),
        "cross-site WebSocket hijacking is refused"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_origin_allowed_origins_and_no_origin_are_accepted() {
    let server =
        TestServer::start_with(|c| c.allowed_origins = vec!["https://app.example".into()]).await;
    let id = server.session("fixture").await;
    let same = format!("http://{}", server.addr);
    for origin in [same.as_str(), "https://app.example"] {
        let mut ws = Ws::try_connect(
            &server.ws_url(&format!("/sessions/{id}")),
            &[("origin", origin)],
        )
        .await
        .unwrap_or_else(|e| panic!("{origin} refused: {e:?}"));
        ws.send(r#"{"id":"o"}"#).await;
        assert_eq!(ws.json().await["echo"]["id"], "o");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_rebinding_is_refused_by_the_host_check() {
    let server =
        TestServer::start_with(|c| c.allowed_hosts = vec!["box.tail1234.ts.net".into()]).await;
    let port = server.addr.port();
    for (host, status) in [
        (format!("evil.example:{port}"), 403),
        (format!("localhost:{port}"), 200),
        ("box.tail1234.ts.net".to_owned(), 200),
    ] {
        let resp = server
            .http
            .get(server.url("/sessions"))
            .header("host", &host)
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status().as_u16(), status, "{host}");
    }
    let id = server.session("fixture").await;
    let refused = Ws::try_connect(
        &server.ws_url(&format!("/sessions/{id}")),
        &[("host", "evil.example")],
    )
    .await
    .err();
    assert_eq!(refused.map(|r| r.0), Some(403));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_token_is_required_everywhere_but_healthz() {
    let secrets = tempfile::tempdir().expect("dir");
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, "0123-s3cret\n").expect("write");
    let server = TestServer::start_with(|c| c.token_file = Some(token_file)).await;

    let without = server
        .http
        .get(server.url("/sessions"))
        .send()
        .await
        .expect("get");
    assert_eq!(without.status().as_u16(), 401);
    assert_eq!(without.headers()["www-authenticate"], "Bearer");
    let wrong = server
        .http
        .get(server.url("/sessions"))
        .bearer_auth("0123-wrong")
        .send()
        .await
        .expect("get");
    assert_eq!(wrong.status().as_u16(), 401);
    // A token in the URL would end up in logs; it is not accepted there.
    let in_url = server
        .http
        .get(server.url("/sessions?token=0123-s3cret"))
        .send()
        .await
        .expect("get");
    assert_eq!(in_url.status().as_u16(), 401);
    assert_eq!(server.get("/healthz").await.0, 200);
    assert_eq!(server.get("/metrics").await.0, 401);

    let created = server
        .http
        .post(server.url("/sessions"))
        .bearer_auth("0123-s3cret")
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(created.status().as_u16(), 201);
    let id = created.json::<serde_json::Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let url = server.ws_url(&format!("/sessions/{id}"));
    assert_eq!(
        Ws::try_connect(&url, &[]).await.err().map(|r| r.0),
        Some(401)
    );
    let mut ws = Ws::try_connect(&url, &[("authorization", "Bearer 0123-s3cret")])
        .await
        .expect("token accepted");
    ws.send(r#"{"id":"t"}"#).await;
    assert_eq!(ws.json().await["echo"]["id"], "t");
    server.stop().await;
}
