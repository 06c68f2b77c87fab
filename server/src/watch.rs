//! `moorline watch`: follows a server's session events (`GET /events`) and prints one line per
//! event, reconnecting with `Last-Event-ID` when the connection drops, so nothing is missed
//! or printed twice (after a long absence or a server restart the server sends a fresh
//! snapshot instead, printed as such).

use std::time::Duration;

use crate::wire::{EventKind, EventsFrame};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::client::{Client, ClientError};

/// Longest wait between reconnection attempts.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// One server-sent event: its `id` and `data` (joined lines).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SseFrame {
    /// The `id:` field, if any.
    pub id: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// Splits a server-sent event stream into frames (comments and unknown fields are skipped).
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    frame: SseFrame,
    has_data: bool,
}

impl SseParser {
    /// Feeds bytes; returns the frames they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseFrame> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]);
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                if self.has_data {
                    out.push(std::mem::take(&mut self.frame));
                    self.has_data = false;
                }
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => self.frame.id = Some(value.to_owned()),
                "data" => {
                    if self.has_data {
                        self.frame.data.push('\n');
                    }
                    self.frame.data.push_str(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        out
    }
}

/// One line for a person: session, what happened.
pub fn describe(frame: &EventsFrame) -> String {
    let event = match frame {
        EventsFrame::Snapshot(snapshot) => {
            return format!("snapshot: {} sessions", snapshot.sessions.len());
        }
        EventsFrame::Other { kind, session_id } => {
            return format!("{}\t{kind}", session_id.as_deref().unwrap_or("?"));
        }
        EventsFrame::Event(event) => event,
    };
    let detail = match &event.kind {
        EventKind::SessionCreated { session } | EventKind::SessionStatus { session } => format!(
            "{} {} {}",
            session.agent,
            session.status.as_str(),
            session.name.as_deref().unwrap_or("")
        ),
        EventKind::SessionActivity { session } => session
            .activity
            .map_or_else(|| "-".to_owned(), |a| a.as_str().to_owned()),
        EventKind::ApprovalPending { request, .. } => crate::client::describe_request(request),
        EventKind::ApprovalResolved { resolution: r, .. } => {
            let mut d = format!("{} {} by {}", r.id, r.decision, r.by);
            if let Some(user) = &r.user {
                d.push_str(&format!(" ({user})"));
            }
            d
        }
        EventKind::TurnEnded { .. } | EventKind::SessionDeleted {} => String::new(),
    };
    format!(
        "{}\t{}\t{}",
        event.session_id,
        event.kind.name(),
        detail.trim_end()
    )
}

/// Follows the server's events until the connection fails for good (an HTTP error, such as
/// a refused token) or the output is closed. With `json`, prints each event's JSON as sent.
pub async fn watch(
    client: &Client,
    json: bool,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<(), ClientError> {
    let mut last_id: Option<String> = None;
    let mut retry = Duration::from_millis(500);
    let mut connected_once = false;
    loop {
        let mut resp = match client.events(last_id.as_deref()).await {
            Ok(resp) => resp,
            Err(e @ ClientError::Http { .. }) => return Err(e),
            // The first connection must work; later ones are retried (a server restart).
            Err(e) if !connected_once => return Err(e),
            Err(e) => {
                eprintln!("moorline watch: {e}; retrying in {}s", retry.as_secs_f32());
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        connected_once = true;
        retry = Duration::from_millis(500);
        let mut parser = SseParser::default();
        loop {
            let Ok(Some(chunk)) = resp.chunk().await else {
                break;
            };
            for frame in parser.feed(&chunk) {
                if frame.id.is_some() {
                    last_id = frame.id;
                }
                let line = if json {
                    frame.data
                } else {
                    match EventsFrame::parse(&frame.data) {
                        Some(event) => describe(&event),
                        None => continue,
                    }
                };
                let written = async {
                    out.write_all(line.as_bytes()).await?;
                    out.write_all(b"\n").await?;
                    out.flush().await
                };
                if written.await.is_err() {
                    // Nobody reads our output any more (a closed pipe).
                    return Ok(());
                }
            }
        }
        eprintln!("moorline watch: connection lost; reconnecting");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_frames_split_anywhere() {
        let mut p = SseParser::default();
        let mut frames = p.feed(b": keep-alive\n\nid: e-1\ndata: {\"a\"");
        assert!(frames.is_empty());
        frames = p.feed(b":1}\r\n\r\nid: e-2\ndata: x\ndata: y\n\n");
        assert_eq!(
            frames,
            [
                SseFrame {
                    id: Some("e-1".into()),
                    data: "{\"a\":1}".into()
                },
                SseFrame {
                    id: Some("e-2".into()),
                    data: "x\ny".into()
                }
            ]
        );
    }

    #[test]
    fn describes_events() {
        let frame = |v: serde_json::Value| EventsFrame::parse(&v.to_string()).expect("a frame");
        let summary = serde_json::json!({"id":"abc","instanceId":"echo","status":"running",
            "agent":"echo","spawnedAt":1,"clients":0,"activity":"waiting"});
        let e = frame(
            serde_json::json!({"seq":3,"at":1,"sessionId":"abc","instanceId":"echo",
            "type":"approval_resolved","session":summary,
            "resolution":{"id":"R1","decision":"deny","by":"client","user":"alice"}}),
        );
        assert_eq!(
            describe(&e),
            "abc\tapproval_resolved\tR1 deny by client (alice)"
        );
        let e = frame(
            serde_json::json!({"seq":4,"at":1,"sessionId":"abc","instanceId":"echo",
            "type":"session_activity","session":summary}),
        );
        assert_eq!(describe(&e), "abc\tsession_activity\twaiting");
        let e = frame(serde_json::json!({"type":"snapshot","seq":4,"sessions":[summary]}));
        assert_eq!(describe(&e), "snapshot: 1 sessions");
        // A newer server's event is still shown, by its type.
        let e = frame(serde_json::json!({"seq":5,"sessionId":"abc","type":"session_renamed"}));
        assert_eq!(describe(&e), "abc\tsession_renamed");
        assert_eq!(EventsFrame::parse("[1]"), None);
    }
}
