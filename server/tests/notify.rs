//! Notifications, end to end: a real server and the fixture agent, with local stand-ins on
//! loopback for Expo's push service, a browser's push service (which decrypts what it gets with
//! the subscription's private key and checks the VAPID signature) and a webhook (JSON and
//! ntfy). amarre's push integration scenarios are here too.

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Uri};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::{TestServer, WAIT, Ws, eventually};
use moorline::Config;
use serde_json::{Value, json};

/// amarre's test token.
const VALID: &str = "ExponentPushToken[abcdef0123456789ABCDEF]";

/// One request a stand-in received.
#[derive(Debug, Clone)]
struct Call {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Call {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

type Reply = dyn Fn(&Call, usize) -> (u16, String) + Send + Sync;

/// An HTTP server on 127.0.0.1:0 that records every request and answers with `reply` (given
/// the request and how many came before it).
struct StandIn {
    url: String,
    calls: Arc<Mutex<Vec<Call>>>,
    arrived: Arc<tokio::sync::Notify>,
}

impl StandIn {
    async fn start(reply: impl Fn(&Call, usize) -> (u16, String) + Send + Sync + 'static) -> Self {
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let arrived = Arc::new(tokio::sync::Notify::new());
        let reply: Arc<Reply> = Arc::new(reply);
        let app = {
            let calls = calls.clone();
            let arrived = arrived.clone();
            axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
                let calls = calls.clone();
                let arrived = arrived.clone();
                let reply = reply.clone();
                async move {
                    let call = Call {
                        path: uri.path().to_owned(),
                        headers,
                        body,
                    };
                    let (status, body) = {
                        let mut calls = calls.lock().expect("lock");
                        let answer = reply(&call, calls.len());
                        calls.push(call);
                        answer
                    };
                    arrived.notify_waiters();
                    (
                        axum::http::StatusCode::from_u16(status).expect("status"),
                        [("content-type", "application/json")],
                        body,
                    )
                }
            })
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            calls,
            arrived,
        }
    }

    /// Answers like Expo: one ok ticket per message, `DeviceNotRegistered` for tokens with
    /// `Gone` in them.
    async fn expo() -> Self {
        Self::start(|call, _| {
            let tickets: Vec<Value> = call
                .json()
                .as_array()
                .expect("an array of messages")
                .iter()
                .map(|m| {
                    if m["to"].as_str().unwrap_or("").contains("Gone") {
                        json!({"status": "error", "message": "not registered", "details": {"error": "DeviceNotRegistered"}})
                    } else {
                        json!({"status": "ok", "id": "ticket"})
                    }
                })
                .collect();
            (200, json!({ "data": tickets }).to_string())
        })
        .await
    }

    async fn ok() -> Self {
        Self::start(|_, _| (201, String::new())).await
    }

    /// A service that is down for the first request (503) and takes the others.
    async fn down_once() -> Self {
        Self::start(|_, n| {
            if n == 0 {
                (503, String::new())
            } else {
                (200, "{}".into())
            }
        })
        .await
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }

    /// Waits until at least `n` requests came, and returns them all.
    async fn wait_for(&self, n: usize) -> Vec<Call> {
        tokio::time::timeout(WAIT, async {
            loop {
                let notified = self.arrived.notified();
                let calls = self.calls();
                if calls.len() >= n {
                    return calls;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {n} requests; got {:?}", self.calls()))
    }
}

/// Expo push on, pointed at `expo`, with a short grace period and quick retries.
fn with_expo(expo: &StandIn, grace_ms: u64) -> impl FnOnce(&mut Config) + use<> {
    let url = format!("{}/--/api/v2/push/send", expo.url);
    move |c| {
        c.notify.expo = true;
        c.notify.expo_url = url;
        c.notify.grace_ms = grace_ms;
        c.notify.retry_base_ms = 50;
    }
}

async fn register(server: &TestServer, token: &str) {
    let (status, body) = server
        .post(
            "/push/tokens",
            &json!({"token": token, "platform": "ios"}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let v = ws.json().await;
        if v["type"] == kind {
            return v;
        }
    }
}

/// A counter from `/metrics` (0 when absent).
async fn metric(server: &TestServer, name: &str, labels: &str) -> u64 {
    let (_, text) = server.get("/metrics").await;
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn decided(server: &TestServer, trigger: &str, outcome: &str) -> u64 {
    metric(
        server,
        "moorline_notifications_total",
        &format!(r#"trigger="{trigger}",outcome="{outcome}""#),
    )
    .await
}

// ----- amarre's push API -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_is_off_unless_configured_and_says_so_like_amarre() {
    let server = TestServer::start_with(|c| c.notify.web_push = false).await;
    let (status, body) = server
        .post("/push/tokens", &json!({"token": VALID}).to_string())
        .await;
    assert_eq!((status, body), (503, json!({"error": "push_disabled"})));
    assert_eq!(server.get_json("/push/tokens").await.0, 503);
    assert_eq!(server.delete("/push/tokens/x").await.0, 503);
    assert_eq!(
        server.get_json("/push/web/key").await,
        (503, json!({"error": "push_disabled"}))
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_registered_listed_and_deleted_like_amarre() {
    let expo = StandIn::expo().await;
    let server = TestServer::start_with(with_expo(&expo, 15_000)).await;
    let (status, first) = server
        .post(
            "/push/tokens",
            &json!({"token": VALID, "deviceName": "phone", "platform": "ios"}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(
        first
            .as_object()
            .expect("object")
            .keys()
            .collect::<Vec<_>>(),
        ["token", "deviceName", "platform", "registeredAt"]
    );
    // First registration wins: the repeat gets the stored entry back.
    let (status, again) = server
        .post(
            "/push/tokens",
            &json!({"token": VALID, "deviceName": "other", "platform": "android"}).to_string(),
        )
        .await;
    assert_eq!((status, &again), (200, &first));
    let (status, list) = server.get_json("/push/tokens").await;
    assert_eq!((status, list), (200, json!([first])));
    // The store is a private file in the state directory.
    let path = server.state.path().join("notify/expo-tokens.json");
    let stored = std::fs::read_to_string(&path).expect("token store");
    assert!(stored.contains(VALID), "{stored}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let encoded = VALID.replace('[', "%5B").replace(']', "%5D");
    assert_eq!(
        server.delete(&format!("/push/tokens/{encoded}")).await.0,
        204
    );
    assert_eq!(server.get_json("/push/tokens").await.1, json!([]));
    // Idempotent.
    assert_eq!(
        server.delete(&format!("/push/tokens/{encoded}")).await.0,
        204
    );

    for bad in [
        json!({"token": "garbage"}),
        json!({"token": 5}),
        json!({}),
        json!("ExponentPushToken[x]"),
    ] {
        let (status, body) = server.post("/push/tokens", &bad.to_string()).await;
        assert_eq!(
            (status, body),
            (400, json!({"error": "invalid_token"})),
            "{bad}"
        );
    }
    let (status, _) = server.post("/push/tokens", "not json").await;
    assert_eq!(status, 400);
    server.stop().await;
}

// ----- the rules, on every channel -----

/// A browser's Web Push subscription: its private key and auth secret decrypt what it gets.
struct Browser {
    secret: p256::SecretKey,
    auth: [u8; 16],
    endpoint: String,
}

impl Browser {
    fn new(push_service: &StandIn, name: &str) -> Self {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).expect("random");
        let secret = p256::SecretKey::from_slice(&raw).expect("key");
        let mut auth = [0u8; 16];
        getrandom::fill(&mut auth).expect("random");
        Self {
            secret,
            auth,
            endpoint: format!("{}/push/{name}", push_service.url),
        }
    }

    fn public(&self) -> Vec<u8> {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        self.secret
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    fn subscription(&self) -> Value {
        json!({
            "endpoint": self.endpoint,
            "expirationTime": null,
            "keys": {"p256dh": B64.encode(self.public()), "auth": B64.encode(self.auth)},
        })
    }

    /// Decrypts an `aes128gcm` body (RFC 8291 over RFC 8188), written here from the RFCs with
    /// ring's primitives, not with the crate the server encrypts with.
    fn decrypt(&self, body: &[u8]) -> Value {
        use ring::{aead, hkdf};
        struct Len(usize);
        impl hkdf::KeyType for Len {
            fn len(&self) -> usize {
                self.0
            }
        }
        let expand = |prk: &hkdf::Prk, info: &[u8], n: usize| -> Vec<u8> {
            let mut out = vec![0u8; n];
            prk.expand(&[info], Len(n))
                .expect("expand")
                .fill(&mut out)
                .expect("fill");
            out
        };
        let salt = &body[..16];
        let record_size = u32::from_be_bytes(body[16..20].try_into().expect("rs"));
        let id_len = body[20] as usize;
        let server_public = &body[21..21 + id_len];
        let mut ciphertext = body[21 + id_len..].to_vec();
        assert!(ciphertext.len() <= record_size as usize, "one record");
        assert_eq!(
            id_len, 65,
            "the key id is the server's uncompressed public key"
        );
        let their = p256::PublicKey::from_sec1_bytes(server_public).expect("server key");
        let shared = p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), their.as_affine());
        // RFC 8291 §3.3-3.4.
        let prk_key = hkdf::Salt::new(hkdf::HKDF_SHA256, &self.auth)
            .extract(shared.raw_secret_bytes().as_slice());
        let mut key_info = b"WebPush: info\0".to_vec();
        key_info.extend_from_slice(&self.public());
        key_info.extend_from_slice(server_public);
        let ikm = expand(&prk_key, &key_info, 32);
        // RFC 8188 §2.2-2.3.
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&ikm);
        let cek = expand(&prk, b"Content-Encoding: aes128gcm\0", 16);
        let nonce = expand(&prk, b"Content-Encoding: nonce\0", 12);
        let key =
            aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_128_GCM, &cek).expect("cek"));
        let nonce = aead::Nonce::try_assume_unique_for_key(&nonce).expect("nonce");
        let plain = key
            .open_in_place(nonce, aead::Aad::empty(), &mut ciphertext)
            .expect("the payload decrypts with the subscription's keys");
        // The last record ends with the delimiter 2, then padding zeros.
        let end = plain.iter().rposition(|&b| b != 0).expect("delimiter");
        assert_eq!(plain[end], 2, "last-record delimiter");
        serde_json::from_slice(&plain[..end]).expect("a JSON payload")
    }
}

/// Checks a push request's VAPID header (RFC 8292): signed with the server's key (the one it
/// publishes), for the push service's origin, with the configured contact.
fn check_vapid(call: &Call, server_key: &str, audience: &str, subject: &str) {
    let auth = call.header("authorization");
    let rest = auth.strip_prefix("vapid ").expect("vapid scheme");
    let (t, k) = rest.split_once(", ").expect("t and k");
    let jwt = t.strip_prefix("t=").expect("t=");
    assert_eq!(k.strip_prefix("k=").expect("k="), server_key);
    let mut parts = jwt.split('.');
    let (header, claims, sig) = (
        parts.next().expect("header"),
        parts.next().expect("claims"),
        parts.next().expect("signature"),
    );
    let header: Value = serde_json::from_slice(&B64.decode(header).expect("b64")).expect("json");
    assert_eq!(header["alg"], "ES256");
    let claims: Value = serde_json::from_slice(&B64.decode(claims).expect("b64")).expect("json");
    assert_eq!(claims["aud"], audience);
    assert_eq!(claims["sub"], subject);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    let exp = claims["exp"].as_u64().expect("exp");
    assert!(exp > now && exp <= now + 24 * 3600, "exp within 24 h");
    let key = B64.decode(server_key).expect("key");
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, key)
        .verify(
            format!(
                "{}.{}",
                jwt.split('.').next().unwrap_or(""),
                jwt.split('.').nth(1).unwrap_or("")
            )
            .as_bytes(),
            &B64.decode(sig).expect("sig"),
        )
        .expect("the VAPID signature verifies with the server's public key");
    assert_eq!(call.header("content-encoding"), "aes128gcm");
    assert!(call.header("ttl").parse::<u64>().is_ok_and(|t| t > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_request_is_notified_once_on_every_channel() {
    let expo = StandIn::expo().await;
    let push_service = StandIn::ok().await;
    let hook = StandIn::ok().await;
    let hook_url = format!("{}/hook", hook.url);
    let server = TestServer::start_with(|c| {
        with_expo(&expo, 200)(c);
        c.notify.webhook_url = Some(hook_url);
        c.notify.vapid_subject = "mailto:ops@example.org".into();
    })
    .await;
    register(&server, VALID).await;
    let browser = Browser::new(&push_service, "b1");
    let (status, body) = server
        .post(
            "/push/web/subscriptions",
            &browser.subscription().to_string(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (_, key) = server.get_json("/push/web/key").await;
    let server_key = key["publicKey"].as_str().expect("publicKey").to_owned();

    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"ui_req","reqId":"req-A"}"#).await;
    next_of(&mut ws, "extension_ui_request").await;
    // amarre's frame, with amarre's keys in amarre's order.
    let sent = next_of(&mut ws, "amarre.push_sent").await;
    assert_eq!(
        serde_json::to_string(&sent).expect("json"),
        r#"{"type":"amarre.push_sent","trigger":"awaiting_input","tokens":1,"requestId":"req-A"}"#
    );

    let calls = expo.wait_for(1).await;
    let messages = calls[0].json();
    assert_eq!(calls[0].path, "/--/api/v2/push/send");
    let m = &messages[0];
    assert_eq!(m["to"], VALID);
    assert_eq!(m["data"]["amarre"], "1");
    assert_eq!(m["data"]["trigger"], "awaiting_input");
    assert_eq!(m["data"]["requestId"], "req-A");
    assert_eq!(m["data"]["sessionId"], id.as_str());
    assert_eq!(m["data"]["method"], "confirm");
    let text = m["body"].as_str().expect("body");
    assert!(
        text.contains(&id) && text.contains("bash") && text.contains("ls /tmp"),
        "{text}"
    );
    assert!(text.chars().count() <= 100);

    let pushes = push_service.wait_for(1).await;
    assert_eq!(pushes[0].path, "/push/b1");
    check_vapid(
        &pushes[0],
        &server_key,
        &push_service.url,
        "mailto:ops@example.org",
    );
    assert_eq!(pushes[0].header("urgency"), "high");
    let payload = browser.decrypt(&pushes[0].body);
    assert_eq!(payload["trigger"], "awaiting_input");
    assert_eq!(payload["sessionId"], id.as_str());
    assert_eq!(payload["url"], format!("#/s/{id}"));
    assert_eq!(payload["body"], text);

    let hooks = hook.wait_for(1).await;
    assert_eq!(hooks[0].path, "/hook");
    let doc = hooks[0].json();
    assert_eq!(doc["trigger"], "awaiting_input");
    assert_eq!(doc["sessionId"], id.as_str());
    assert_eq!(doc["requestId"], "req-A");
    assert_eq!(doc["tool"], "bash");
    assert_eq!(doc["message"], text);

    // Exactly one per channel: a crash afterwards is the next (and only other) notification.
    ws.send(r#"{"_emit":"die"}"#).await;
    let calls = expo.wait_for(2).await;
    assert_eq!(calls[1].json()[0]["data"]["trigger"], "crashed");
    assert_eq!(expo.calls().len(), 2);
    assert_eq!(push_service.wait_for(2).await.len(), 2);
    assert_eq!(hook.wait_for(2).await.len(), 2);
    assert_eq!(decided(&server, "awaiting_input", "queued").await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_answered_in_time_sends_nothing() {
    let expo = StandIn::expo().await;
    let server = TestServer::start_with(with_expo(&expo, 300)).await;
    register(&server, VALID).await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"ui_req","reqId":"R1"}"#).await;
    next_of(&mut ws, "extension_ui_request").await;
    ws.send(r#"{"type":"extension_ui_response","id":"R1","confirmed":true}"#)
        .await;
    next_of(&mut ws, "amarre.approval_resolved").await;
    eventually("the answer to be seen", || async {
        decided(&server, "awaiting_input", "answered").await == 1
    })
    .await;
    // A second request nobody answers is due later than the first would have been: it is the
    // only notification.
    ws.send(r#"{"_emit":"ui_req","reqId":"R2"}"#).await;
    let sent = next_of(&mut ws, "amarre.push_sent").await;
    assert_eq!(sent["requestId"], "R2");
    let calls = expo.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].json()[0]["data"]["requestId"], "R2");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_client_input_within_the_grace_period_suppresses_the_notification() {
    let expo = StandIn::expo().await;
    let server = TestServer::start_with(with_expo(&expo, 300)).await;
    register(&server, VALID).await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"ui_req","reqId":"R1"}"#).await;
    next_of(&mut ws, "extension_ui_request").await;
    ws.send(r#"{"type":"get_state","id":"s"}"#).await;
    eventually("the due request to be suppressed", || async {
        decided(&server, "awaiting_input", "client_active").await == 1
    })
    .await;
    assert!(expo.calls().is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_session_cancels_its_pending_notification() {
    let expo = StandIn::expo().await;
    let server = TestServer::start_with(with_expo(&expo, 300)).await;
    register(&server, VALID).await;
    let doomed = server.session("fixture").await;
    let mut ws = server.ws(&doomed).await;
    ws.send(r#"{"_emit":"ui_req","reqId":"R1"}"#).await;
    next_of(&mut ws, "extension_ui_request").await;
    assert_eq!(server.delete(&format!("/sessions/{doomed}")).await.0, 204);
    // Another session's request, due after the deleted one's would have been.
    let other = server.session("fixture").await;
    let mut ws = server.ws(&other).await;
    ws.send(r#"{"_emit":"ui_req","reqId":"R2"}"#).await;
    next_of(&mut ws, "amarre.push_sent").await;
    let calls = expo.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].json()[0]["data"]["sessionId"], other.as_str());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_is_notified_once_and_ntfy_gets_its_own_format_after_a_retry() {
    let expo = StandIn::expo().await;
    // ntfy is down once, then takes it.
    let ntfy = StandIn::down_once().await;
    let topic = format!("{}/moorline-alerts", ntfy.url);
    let server = TestServer::start_with(|c| {
        with_expo(&expo, 15_000)(c);
        c.notify.webhook_url = Some(topic);
        c.notify.webhook_format = moorline::config::WebhookFormat::Ntfy;
        c.notify.public_url = Some("https://box.tail0.ts.net/".into());
    })
    .await;
    register(&server, VALID).await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"die"}"#).await;
    let event = next_of(&mut ws, "amarre.session_event").await;
    assert_eq!(event["exitCode"], 7);

    let calls = expo.wait_for(1).await;
    let m = &calls[0].json()[0];
    assert_eq!(m["data"]["trigger"], "crashed");
    assert_eq!(m["data"]["sessionId"], id.as_str());
    assert_eq!(m["data"]["exitCode"], 7);
    assert!(m["body"].as_str().expect("body").contains("code 7"), "{m}");

    let posts = ntfy.wait_for(2).await;
    let post = &posts[1];
    assert_eq!(post.path, "/moorline-alerts");
    assert_eq!(post.header("title"), "moorline: crashed");
    assert_eq!(post.header("priority"), "high");
    assert_eq!(
        post.header("click"),
        format!("https://box.tail0.ts.net/#/s/{id}")
    );
    assert_eq!(
        std::str::from_utf8(&post.body).expect("text"),
        m["body"].as_str().expect("body")
    );
    eventually("the retry to be counted", || async {
        metric(
            &server,
            "moorline_notification_deliveries_total",
            r#"channel="webhook",result="sent""#,
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        metric(
            &server,
            "moorline_notification_deliveries_total",
            r#"channel="webhook",result="retried""#
        )
        .await,
        1
    );
    assert_eq!(expo.calls().len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_turn_and_an_exit_are_notified_when_nobody_watches() {
    let hook = StandIn::ok().await;
    let hook_url = hook.url.clone();
    let server = TestServer::start_with(|c| c.notify.webhook_url = Some(hook_url)).await;
    let id = server.session("fixture").await;
    // Watched: nothing.
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"pi_turn"}"#).await;
    next_of(&mut ws, "agent_end").await;
    eventually("the watched turn to be seen", || async {
        decided(&server, "turn_finished", "watched").await == 1
    })
    .await;
    // Unwatched: the agent finishes a turn, then exits, after the client has left.
    ws.send(r#"{"_emit":"stall","ms":1500}"#).await;
    ws.send(r#"{"_emit":"pi_turn"}"#).await;
    ws.send(r#"{"_emit":"die_after","ms":100,"code":0}"#).await;
    next_of(&mut ws, "stalling").await;
    drop(ws);
    eventually("the client to be gone", || async {
        server.get_json(&format!("/sessions/{id}")).await.1["clients"] == 0
    })
    .await;
    let posts = hook.wait_for(2).await;
    let triggers: Vec<Value> = posts.iter().map(|p| p.json()["trigger"].clone()).collect();
    assert_eq!(triggers, [json!("turn_finished"), json!("exited")]);
    assert_eq!(posts[0].json()["sessionId"], id.as_str());
    assert_eq!(hook.calls().len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expo_gets_chunks_of_100_and_unregistered_tokens_are_pruned() {
    let expo = StandIn::expo().await;
    let server = TestServer::start_with(with_expo(&expo, 15_000)).await;
    for i in 0..150 {
        let token = if i % 50 == 7 {
            format!("ExponentPushToken[Gone{i}]")
        } else {
            format!("ExponentPushToken[t{i}]")
        };
        register(&server, &token).await;
    }
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"die"}"#).await;
    let calls = expo.wait_for(2).await;
    let sizes: Vec<usize> = calls
        .iter()
        .map(|c| c.json().as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(sizes, [100, 50]);
    eventually("the unregistered tokens to be pruned", || async {
        server
            .get_json("/push/tokens")
            .await
            .1
            .as_array()
            .map_or(0, Vec::len)
            == 147
    })
    .await;
    let (_, list) = server.get_json("/push/tokens").await;
    assert!(!list.to_string().contains("Gone"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_is_gone_is_removed_and_bad_ones_are_refused() {
    let push_service = StandIn::start(|_, _| (410, String::new())).await;
    let server = TestServer::start().await;
    let browser = Browser::new(&push_service, "gone");
    let sub = browser.subscription();
    assert_eq!(
        server
            .post("/push/web/subscriptions", &sub.to_string())
            .await
            .0,
        201
    );
    assert_eq!(
        server
            .post("/push/web/subscriptions", &sub.to_string())
            .await
            .0,
        200
    );
    for (bad, why) in [
        (
            json!({"endpoint": "http://push.example/x", "keys": sub["keys"]}),
            "https",
        ),
        (
            json!({"endpoint": browser.endpoint, "keys": {"p256dh": "AAAA", "auth": sub["keys"]["auth"]}}),
            "p256dh",
        ),
        (json!({"endpoint": browser.endpoint}), "keys"),
    ] {
        let (status, body) = server
            .post("/push/web/subscriptions", &bad.to_string())
            .await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["error"], "invalid_subscription");
        assert!(
            body["message"].as_str().unwrap_or("").contains(why),
            "{body}"
        );
    }
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"die"}"#).await;
    push_service.wait_for(1).await;
    let path = server.state.path().join("notify/web-subscriptions.json");
    eventually("the subscription to be removed", || async {
        std::fs::read_to_string(&path).is_ok_and(|s| !s.contains("/push/gone"))
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_identity_notifications_go_to_the_users_allowed_on_the_instance() {
    const ALICE: (&str, &str) = ("tailscale-user-login", "alice@example.com");
    const BOB: (&str, &str) = ("tailscale-user-login", "bob@example.com");
    let expo = StandIn::expo().await;
    let server = TestServer::start_with(|c| {
        with_expo(&expo, 15_000)(c);
        c.trust_tailscale_headers_on_tcp = true;
        c.instances[0].allowed_users = vec!["alice@example.com".into()];
    })
    .await;
    let request = |method: reqwest::Method, path: &str, who: (&str, &str), body: Option<Value>| {
        let mut req = server
            .http
            .request(method, server.url(path))
            .header(who.0, who.1);
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        async move {
            let resp = req.send().await.expect("request");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let alice_token = "ExponentPushToken[alice]";
    let bob_token = "ExponentPushToken[bob]";
    for (who, token) in [(ALICE, alice_token), (BOB, bob_token)] {
        let (status, _) = request(
            reqwest::Method::POST,
            "/push/tokens",
            who,
            Some(json!({ "token": token })),
        )
        .await;
        assert_eq!(status, 201);
    }
    // Each sees (and can remove) only their own.
    let (_, mine) = request(reqwest::Method::GET, "/push/tokens", BOB, None).await;
    assert_eq!(mine.as_array().map(Vec::len), Some(1));
    assert_eq!(mine[0]["token"], bob_token);
    assert!(mine[0].get("user").is_none(), "owners are never listed");
    let encoded = alice_token.replace('[', "%5B").replace(']', "%5D");
    let (status, _) = request(
        reqwest::Method::DELETE,
        &format!("/push/tokens/{encoded}"),
        BOB,
        None,
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(
        server
            .get_json("/push/tokens")
            .await
            .1
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // Alice's session crashes: only Alice, who may use its instance, hears of it.
    let (status, created) = request(
        reqwest::Method::POST,
        "/sessions",
        ALICE,
        Some(json!({"instanceId": "fixture"})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id");
    let mut ws = Ws::try_connect(&server.ws_url(&format!("/sessions/{id}")), &[ALICE])
        .await
        .expect("alice connects");
    ws.send(r#"{"_emit":"die"}"#).await;
    let calls = expo.wait_for(1).await;
    let to: Vec<Value> = calls[0]
        .json()
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["to"].clone())
        .collect();
    assert_eq!(to, [json!(alice_token)]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_is_never_sent_again_after_a_restart() {
    require_durable!();
    let sandbox = common::Sandbox::new();
    let hook = StandIn::ok().await;
    let tweak = |c: &mut Config| {
        sandbox.apply(c);
        // An agent in tmux outlives the server, its request still waiting.
        let mut durable = common::instance("durable", "fixture");
        durable.agent_path = Some(common::fixture_agent());
        durable.runtime = moorline::config::RuntimeKind::Tmux;
        durable.workspace_roots = vec![std::env::temp_dir()];
        c.instances.push(durable);
        c.notify.webhook_url = Some(hook.url.clone());
        c.notify.grace_ms = 200;
    };
    let server = TestServer::start_with(tweak).await;
    let work = common::workspace();
    let (status, body) = server
        .post(
            "/sessions",
            &json!({"instanceId": "durable", "cwd": work.path()}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"ui_req","reqId":"R1"}"#).await;
    let first = hook.wait_for(1).await;
    assert_eq!(first[0].json()["requestId"], "R1");
    drop(ws);

    let state = server.stop_keep_state().await;
    let mut config = common::test_config(state.path().to_owned());
    tweak(&mut config);
    let server = TestServer::start_in(state, config).await;
    // The adopted agent's request still waits; the new server knows it was notified.
    eventually("the request to be seen again, as notified", || async {
        decided(&server, "awaiting_input", "duplicate").await >= 1
    })
    .await;
    let (_, summary) = server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(summary["pendingApprovals"][0]["id"], "R1", "{summary}");
    // Another session's request, due after R1 would have been: the only one this server sends.
    let other = server.session("fixture").await;
    let mut ws = server.ws(&other).await;
    ws.send(r#"{"_emit":"ui_req","reqId":"R2"}"#).await;
    let calls = hook.wait_for(2).await;
    assert_eq!(calls[1].json()["requestId"], "R2");
    assert_eq!(decided(&server, "awaiting_input", "queued").await, 1);
    assert_eq!(hook.calls().len(), 2);
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    server.stop().await;
}

/// A notification already queued when the server is told to stop still goes out (here: its
/// retry), within `notify.shutdown_grace_ms`; the stop waits for it, not longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_server_still_delivers_what_it_had_queued() {
    let hook = StandIn::down_once().await;
    let url = hook.url.clone();
    let server = TestServer::start_with(move |c| {
        c.notify.webhook_url = Some(url);
        // Long enough that the stop below comes first.
        c.notify.retry_base_ms = 500;
        c.notify.shutdown_grace_ms = 5_000;
    })
    .await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"die"}"#).await;
    next_of(&mut ws, "amarre.session_event").await;
    // The first attempt failed; the retry is due in 500 ms. Stop now.
    assert_eq!(hook.wait_for(1).await.len(), 1);
    drop(ws);
    server.stop().await;
    let calls = hook.calls();
    assert_eq!(
        calls.len(),
        2,
        "the retry went out before the server stopped"
    );
    assert_eq!(calls[1].json()["trigger"], "crashed");
}
