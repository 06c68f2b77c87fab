//! The per-session WebSocket: amarre's wire behaviour, and moorline's stream guarantees.

mod common;

use common::{TestServer, Ws};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_fan_out_and_framing() {
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    let mut a = server.ws(&id).await;
    let mut b = server.ws(&id).await;
    a.send("{\"id\":\"1\",\"type\":\"prompt\",\"message\":\"hi\"}\n")
        .await;
    for ws in [&mut a, &mut b] {
        let r = ws.json().await;
        assert_eq!(
            (r["type"].as_str(), r["success"].as_bool()),
            (Some("response"), Some(true))
        );
        assert_eq!(
            (r["echo"]["id"].as_str(), r["echo"]["message"].as_str()),
            (Some("1"), Some("hi"))
        );
    }
    // Two lines in one write become two frames, for every client.
    b.send(r#"{"_emit":"chunk"}"#).await;
    for ws in [&mut a, &mut b] {
        assert_eq!(ws.json().await, json!({"type": "event", "n": 1}));
        assert_eq!(ws.json().await, json!({"type": "event", "n": 2}));
    }
    // A line written in two parts arrives whole.
    a.send(r#"{"_emit":"split"}"#).await;
    assert_eq!(a.text().await, r#"{"type":"split","part":"one"}"#);
    // So does a character cut in half between writes.
    a.send(r#"{"_emit":"utf8_split"}"#).await;
    assert_eq!(a.json().await["s"], "€");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_lines_are_split_on_newline_only() {
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"u2028"}"#).await;
    assert_eq!(
        ws.json().await["s"],
        "a\u{2028}b",
        "U+2028 does not split a line"
    );
    ws.send(r#"{"_emit":"crlf"}"#).await;
    assert_eq!(
        ws.text().await,
        r#"{"type":"crlf"}"#,
        "\\r stripped, empty lines skipped"
    );
    ws.send(r#"{"_emit":"invalid_utf8"}"#).await;
    let dropped = ws.json().await;
    assert_eq!(dropped["type"], "amarre.line_dropped");
    assert_eq!(dropped["reason"], "invalid_utf8");
    assert_eq!(dropped["bytes"], 23);
    assert_eq!(ws.json().await["type"], "after_bad", "the stream goes on");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lines_pass_up_to_the_limit_and_are_reported_beyond() {
    let server = TestServer::start_with(|c| c.limits.max_line_bytes = 8 << 20).await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(&json!({"_emit": "huge", "bytes": 8 << 20}).to_string())
        .await;
    let line = ws.text().await;
    assert_eq!(line.len(), 8 << 20, "a multi-megabyte line arrives intact");
    assert!(line.starts_with(r#"{"type":"huge""#));
    ws.send(&json!({"_emit": "huge", "bytes": (8 << 20) + 1}).to_string())
        .await;
    let dropped = ws.json().await;
    assert_eq!(
        (dropped["reason"].as_str(), dropped["bytes"].as_u64()),
        (Some("line_too_long"), Some((8 << 20) + 1))
    );
    assert!(
        dropped["preview"]
            .as_str()
            .expect("preview")
            .starts_with(r#"{"type":"huge""#)
    );
    ws.send(r#"{"id":"after"}"#).await;
    assert_eq!(ws.json().await["echo"]["id"], "after");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_frames_follow_amarres_rules() {
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    // One trailing \r\n is stripped and \n appended.
    ws.send("{\"id\":\"crlf\"}\r\n").await;
    assert_eq!(ws.json().await["echo"]["id"], "crlf");
    // A frame with an inner newline reaches the agent as two lines.
    ws.send("{\"id\":\"a\"}\n{\"id\":\"b\"}").await;
    assert_eq!(ws.json().await["echo"]["id"], "a");
    assert_eq!(ws.json().await["echo"]["id"], "b");
    // Binary frames carrying UTF-8 are forwarded like text.
    ws.socket
        .send(Message::binary(br#"{"id":"bin"}"#.to_vec()))
        .await
        .expect("send");
    assert_eq!(ws.json().await["echo"]["id"], "bin");
    // Invalid UTF-8 cannot be a JSON line: the client is told and disconnected.
    ws.socket
        .send(Message::binary(vec![0xff, 0xfe]))
        .await
        .expect("send");
    assert_eq!(ws.closed().await.0, 1007);
    // The session is unharmed.
    let mut again = server.ws(&id).await;
    again.send(r#"{"id":"ok"}"#).await;
    assert_eq!(again.json().await["echo"]["id"], "ok");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_close_with_1009() {
    let server = TestServer::start_with(|c| c.limits.max_inbound_frame_bytes = 1024).await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(&"x".repeat(1000)).await;
    assert_eq!(ws.json().await["echo"].as_str().map(str::len), Some(1000));
    ws.send(&"x".repeat(2000)).await;
    let (code, reason) = ws.closed().await;
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("1024"), "{reason}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refusals_before_the_upgrade() {
    let server = TestServer::start_with(|c| c.limits.max_clients_per_session = 2).await;
    // The same error as over REST: one status, one body.
    let (status, body) = Ws::try_connect(&server.ws_url("/sessions/does-not-exist"), &[])
        .await
        .err()
        .expect("unknown session refused");
    let rest = server.get_json("/sessions/does-not-exist").await;
    assert_eq!(rest, (404, json!({"error": "not_found"})));
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).expect("json")),
        rest
    );
    let id = server.session("fixture").await;
    let _a = server.ws(&id).await;
    let _b = server.ws(&id).await;
    let refused = Ws::try_connect(&server.ws_url(&format!("/sessions/{id}")), &[])
        .await
        .err();
    let (status, body) = refused.expect("third client refused");
    assert_eq!(status, 429);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json"),
        json!({"error": "max_clients_reached", "limit": 2})
    );
    let (status, body) = Ws::try_connect(&server.ws_url(&format!("/sessions/{id}?since=abc")), &[])
        .await
        .err()
        .expect("malformed since refused");
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (status, &body["error"], &body["field"]),
        (400, &json!("invalid_request"), &json!("query"))
    );
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("since")),
        "{body}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_has_the_same_status_and_body_over_rest_and_the_upgrade() {
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    let path = format!("/sessions/{id}");
    let evil = ("origin", "https://evil.example");
    let resp = server
        .http
        .get(server.url(&path))
        .header(evil.0, evil.1)
        .send()
        .await
        .expect("get");
    let rest = (
        resp.status().as_u16(),
        resp.json::<Value>().await.expect("json body"),
    );
    assert_eq!(
        rest,
        (
            403,
            json!({"error": "forbidden_origin", "origin": "https://evil.example"})
        )
    );
    let (status, body) = Ws::try_connect(&server.ws_url(&path), &[evil])
        .await
        .err()
        .expect("refused");
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).expect("json")),
        rest
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_is_an_event_then_1011_and_other_sessions_live_on() {
    let server = TestServer::start().await;
    let a = server.session("fixture").await;
    let b = server.session("fixture").await;
    let mut wa = server.ws(&a).await;
    let mut wb = server.ws(&b).await;
    wa.send(r#"{"_emit":"die"}"#).await;
    assert_eq!(
        wa.text().await,
        r#"{"type":"amarre.session_event","event":"crashed","exitCode":7,"signal":null}"#
    );
    assert_eq!(wa.closed().await, (1011, "agent crashed".into()));
    let (_, summary) = server.get_json(&format!("/sessions/{a}")).await;
    assert_eq!(
        (summary["status"].as_str(), summary["exitCode"].as_i64()),
        (Some("crashed"), Some(7))
    );
    let (status, body) = Ws::try_connect(&server.ws_url(&format!("/sessions/{a}")), &[])
        .await
        .err()
        .expect("crashed session refused");
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).expect("json")),
        (
            409,
            json!({
                "error": "not_running",
                "status": "crashed",
                "message": "Session crashed; restart it first"
            })
        )
    );
    // B never saw A's traffic: its next frame is its own answer.
    wb.send(r#"{"id":"b"}"#).await;
    assert_eq!(wb.json().await["echo"]["id"], "b");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_exit_is_reported_as_an_exit() {
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"partial_exit"}"#).await;
    assert_eq!(
        ws.text().await,
        r#"{"partial":true}"#,
        "an unterminated last line is delivered"
    );
    assert_eq!(
        ws.text().await,
        r#"{"type":"amarre.session_event","event":"exited","exitCode":0,"signal":null}"#
    );
    assert_eq!(ws.closed().await, (1000, "agent exited".into()));
    let (_, summary) = server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(
        (summary["status"].as_str(), summary["exitCode"].as_i64()),
        (Some("exited"), Some(0))
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_comes_before_the_exit_event() {
    let server = TestServer::start().await;
    let id = server.session("cat").await;
    let mut ws = server.ws(&id).await;
    let mut lines = String::new();
    for i in 1..=2000 {
        lines.push_str(&format!("{{\"i\":{i}}}\n"));
    }
    ws.send(&lines).await;
    for i in 1..=2000 {
        assert_eq!(ws.json().await["i"], i);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_closes_clients_with_1000() {
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    assert_eq!(ws.closed().await, (1000, "session deleted".into()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_without_clients_is_kept_and_replayed_with_sequence_numbers() {
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    {
        // Ask for output, then leave before it is produced.
        let mut ws = server.ws(&id).await;
        ws.send(r#"{"_emit":"flood","n":300}"#).await;
    }
    common::eventually("300 lines", || async {
        server.get_json(&format!("/sessions/{id}")).await.1["lastSeq"] == 300
    })
    .await;
    let mut ws = server.ws_query(&id, "?since=0").await;
    let hello = ws.json().await;
    assert_eq!(hello["type"], "amarre.hello");
    assert_eq!(
        (
            hello["seq"].as_u64(),
            hello["replayFrom"].as_u64(),
            hello["missed"].as_u64()
        ),
        (Some(300), Some(1), Some(0))
    );
    assert!(
        hello["capabilities"]
            .as_array()
            .expect("caps")
            .contains(&json!("replay"))
    );
    for i in 1..=300 {
        assert_eq!(ws.json().await["i"], i);
    }
    // Then live lines follow, without a gap or a duplicate.
    ws.send(r#"{"id":"live"}"#).await;
    assert_eq!(ws.json().await["echo"]["id"], "live");

    let mut tail = server.ws_query(&id, "?since=250").await;
    assert_eq!(tail.json().await["replayFrom"], 251);
    assert_eq!(tail.json().await["i"], 251);
    // A plain amarre client gets only what is produced after it connects.
    let mut plain = server.ws(&id).await;
    plain.send(r#"{"id":"new"}"#).await;
    assert_eq!(plain.json().await["echo"]["id"], "new");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_is_opt_in() {
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    let mut ws = server.ws_query(&id, "?hello=1").await;
    let hello = ws.json().await;
    assert_eq!(
        (hello["type"].as_str(), hello["sessionId"].as_str()),
        (Some("amarre.hello"), Some(id.as_str()))
    );
    assert_eq!(hello["agent"]["name"], "fixture");
    assert_eq!(hello["replayFrom"], 1);
    ws.send(r#"{"id":"x"}"#).await;
    assert_eq!(ws.json().await["echo"]["id"], "x");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_no_longer_retained_are_reported_in_the_hello() {
    let server = TestServer::start_with(|c| {
        c.limits.journal_max_bytes = 64 * 1024;
        c.limits.max_line_bytes = 16 * 1024;
        c.limits.backlog_bytes = 8 * 1024;
    })
    .await;
    let id = server.session("fixture").await;
    {
        let mut ws = server.ws(&id).await;
        ws.send(r#"{"_emit":"flood","n":5000,"size":100}"#).await;
    }
    common::eventually("5000 lines", || async {
        server.get_json(&format!("/sessions/{id}")).await.1["lastSeq"] == 5000
    })
    .await;
    let mut late = server.ws_query(&id, "?since=0").await;
    let hello = late.json().await;
    let from = hello["replayFrom"].as_u64().expect("replayFrom");
    assert!(from > 1, "old lines were dropped: {hello}");
    assert_eq!(hello["missed"].as_u64(), Some(from - 1));
    assert_eq!(
        late.json().await["i"],
        from,
        "replay starts at the oldest retained line"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_caught_up_from_disk_and_loses_nothing() {
    let server = TestServer::start_with(|c| c.limits.backlog_bytes = 64 * 1024).await;
    let id = server.session("fixture").await;
    let mut fast = server.ws(&id).await;
    let mut slow = server.ws(&id).await;
    let n = 20_000u64;
    fast.send(&json!({"_emit": "flood", "n": n, "size": 1024}).to_string())
        .await;
    // The fast client reads everything while the slow one reads nothing.
    for i in 1..=n {
        assert_eq!(fast.json().await["i"], i);
    }
    // 20 MB went by; the slow client now gets every line, in order.
    for i in 1..=n {
        assert_eq!(slow.json().await["i"], i, "no gap for the slow client");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_the_journal_is_closed_with_its_last_sequence() {
    let server = TestServer::start_with(|c| {
        c.limits.journal_max_bytes = 2 << 20;
        c.limits.max_line_bytes = 64 * 1024;
        c.limits.backlog_bytes = 64 * 1024;
    })
    .await;
    let id = server.session("fixture").await;
    let mut slow = server.ws(&id).await;
    let n = 40_000u64;
    slow.send(&json!({"_emit": "flood", "n": n, "size": 1024}).to_string())
        .await;
    common::eventually("the flood", || async {
        server.get_json(&format!("/sessions/{id}")).await.1["lastSeq"] == n
    })
    .await;
    // The slow client reads what it can, then is told exactly where it stopped.
    let mut next = 1u64;
    let (code, reason) = loop {
        match tokio::time::timeout(
            common::WAIT,
            futures_util::StreamExt::next(&mut slow.socket),
        )
        .await
        .expect("frame")
        .expect("open")
        .expect("frame")
        {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                assert_eq!(v["i"], next, "lines arrive in order until the close");
                next += 1;
            }
            Message::Close(Some(f)) => break (u16::from(f.code), f.reason.to_string()),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, 1013);
    assert!(
        reason.contains(&format!("last_seq={}", next - 1)),
        "{reason}"
    );
    assert!(next - 1 < n);
    server.stop().await;
}

/// A client that sends as soon as the handshake completes gets the answer, however quickly the
/// agent replies: delivery starts from the output as it was at the upgrade, not from whenever
/// the server gets round to the client's sending half. (Once, a busy server could skip it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_to_a_line_sent_at_once_is_never_skipped() {
    let server = TestServer::start().await;
    let id = server.session("cat").await;
    for i in 0..200 {
        let mut ws = server.ws(&id).await;
        let line = format!(r#"{{"n":{i}}}"#);
        ws.send(&line).await;
        assert_eq!(ws.text().await, line);
    }
    server.stop().await;
}

/// A client that closes gets the server's close frame back: a clean close on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_from_the_client_is_answered() {
    let server = TestServer::start().await;
    let id = server.session("cat").await;
    let mut ws = server.ws(&id).await;
    ws.socket.close(None).await.expect("close");
    let reply = tokio::time::timeout(common::WAIT, ws.socket.next())
        .await
        .expect("in time");
    assert!(
        matches!(reply, Some(Ok(Message::Close(_)))),
        "expected the close frame back, got {reply:?}"
    );
    server.stop().await;
}

/// A client in the middle of sending a message over the limit reads the 1009 close (the server
/// lingers, discarding the rest) instead of a connection reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_writing_an_oversized_message_reads_the_1009() {
    let server = TestServer::start_with(|c| c.limits.max_inbound_frame_bytes = 1024).await;
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.socket
        .send(Message::text("x".repeat(8 << 20)))
        .await
        .expect("the whole message is taken, not reset");
    let (code, reason) = ws.closed().await;
    assert_eq!(code, 1009, "{reason}");
    server.stop().await;
}

async fn metric(server: &TestServer, line: &str) -> bool {
    server.get("/metrics").await.1.contains(line)
}

/// A raw WebSocket client that never reads: the handshake is written by hand so nothing reads
/// the socket for us. Its receive buffer is small, so the server's writes block early.
async fn raw_client(server: &TestServer, path_and_query: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("rcvbuf");
    let mut tcp = socket.connect(server.addr).await.expect("connect");
    let request = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        server.addr
    );
    tcp.write_all(request.as_bytes()).await.expect("handshake");
    // Read the 101 answer byte by byte, so no frame after it is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.expect("answer");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// A client that sends pings and never reads is disconnected (the pongs it is owed are
/// bounded), and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pings_without_reading_is_dropped() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    let mut tcp = raw_client(&server, &format!("/sessions/{id}")).await;
    // A masked ping frame with a 125-byte payload.
    let mut ping = vec![0x89, 0x80 | 125, 1, 2, 3, 4];
    ping.extend((0..125u8).map(|i| i ^ [1, 2, 3, 4][usize::from(i % 4)]));
    let batch: Vec<u8> = ping.repeat(512);
    let mut sent = 0usize;
    let dropped = tokio::time::timeout(common::WAIT, async {
        loop {
            if tcp.write_all(&batch).await.is_err() {
                return;
            }
            sent += batch.len();
        }
    })
    .await;
    assert!(
        dropped.is_ok(),
        "still connected after {sent} bytes of pings"
    );
    // What it got to send before being dropped is bounded by socket buffers, not by the flood.
    assert!(sent < 64 << 20, "{sent} bytes of pings accepted");
    assert!(
        metric(
            &server,
            r#"moorline_clients_dropped_total{reason="unread_pongs"} 1"#
        )
        .await,
        "{}",
        server.get("/metrics").await.1
    );
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"id":"ok"}"#).await;
    assert_eq!(ws.json().await["echo"]["id"], "ok");
    server.stop().await;
}

/// A client on a slow link catching up on a backlog far larger than the socket buffers stays
/// connected as long as it keeps reading, even when one frame takes longer than
/// `client_stall_ms` to get through; a client that stops reading is still dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_but_steady_readers_catch_up_and_stopped_ones_are_dropped() {
    use tokio::io::AsyncReadExt;
    const LINE: u64 = 1 << 20;
    const LINES: u64 = 4;
    let server = TestServer::start_with(|c| c.limits.client_stall_ms = 500).await;
    let id = server.session("fixture").await;
    {
        let mut ws = server.ws(&id).await;
        ws.send(&format!(r#"{{"_emit":"flood","n":{LINES},"size":{LINE}}}"#))
            .await;
        for _ in 0..LINES {
            ws.json().await;
        }
    }
    // About 300 KB/s (a 16 KiB receive buffer read every 50 ms): each 1 MiB frame takes
    // several times the stall limit to get through.
    let mut slow = raw_client(&server, &format!("/sessions/{id}?since=0")).await;
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let caught_up = tokio::time::timeout(common::WAIT, async {
        while got < LINES * LINE {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => got += n as u64,
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        true
    })
    .await;
    assert_eq!(caught_up, Ok(true), "dropped after {got} bytes");
    assert!(!metric(&server, r#"reason="stalled""#).await);

    // Stopped entirely: dropped after the stall limit.
    let _stopped = raw_client(&server, &format!("/sessions/{id}?since=0")).await;
    common::eventually("the stopped client is dropped", || async {
        metric(
            &server,
            r#"moorline_clients_dropped_total{reason="stalled"} 1"#,
        )
        .await
    })
    .await;
    server.stop().await;
}
