//! `moorline watch`: follows a server's session events (`GET /events`) and prints one line per
//! event, reconnecting with `Last-Event-ID` when the connection drops, so nothing is missed
//! or printed twice (after a long absence or a server restart the server sends a fresh
//! snapshot instead, printed as such).

use std::time::Duration;

use serde_json::Value;
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

/// One line for a person: time, session, what happened.
pub fn describe(event: &Value) -> String {
    let kind = event["type"].as_str().unwrap_or("?");
    if kind == "snapshot" {
        let sessions = event["sessions"].as_array().map_or(0, Vec::len);
        return format!("snapshot: {sessions} sessions");
    }
    let id = event["sessionId"].as_str().unwrap_or("?");
    let s = &event["session"];
    let detail = match kind {
        "session_created" | "session_status" => format!(
            "{} {} {}",
            s["agent"].as_str().unwrap_or(""),
            s["status"].as_str().unwrap_or(""),
            s["name"].as_str().unwrap_or("")
        ),
        "session_activity" => s["activity"].as_str().unwrap_or("-").to_owned(),
        "approval_pending" => crate::client::describe_request(&event["request"]),
        "approval_resolved" => {
            let r = &event["resolution"];
            let mut d = format!(
                "{} {} by {}",
                r["id"].as_str().unwrap_or("?"),
                r["decision"].as_str().unwrap_or("?"),
                r["by"].as_str().unwrap_or("?")
            );
            if let Some(user) = r["user"].as_str() {
                d.push_str(&format!(" ({user})"));
            }
            d
        }
        _ => String::new(),
    };
    format!("{id}\t{kind}\t{}", detail.trim_end())
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
                    match serde_json::from_str::<Value>(&frame.data) {
                        Ok(v) => describe(&v),
                        Err(_) => continue,
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
        let e = serde_json::json!({"type":"approval_resolved","sessionId":"abc",
            "resolution":{"id":"R1","decision":"deny","by":"client","user":"alice"}});
        assert_eq!(
            describe(&e),
            "abc\tapproval_resolved\tR1 deny by client (alice)"
        );
        let e = serde_json::json!({"type":"session_activity","sessionId":"abc","session":{"activity":"waiting"}});
        assert_eq!(describe(&e), "abc\tsession_activity\twaiting");
    }
}
