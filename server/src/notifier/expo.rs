//! amarre's Expo channel: messages POSTed as a JSON array to Expo's push service (or what
//! `notify.expo_url` names), at most 100 per request; tickets that say
//! `DeviceNotRegistered` make the token go.

use std::time::Duration;

use serde_json::{Value, json};

use super::Failure;
use super::message::Notification;

/// Expo's limit of messages per request.
pub(crate) const CHUNK: usize = 100;

/// The message for one token, in amarre's shape: `data.amarre` is `"1"`, `data.trigger` says
/// why.
pub(crate) fn message(n: &Notification, token: &str) -> Value {
    let mut data = json!({"amarre": "1", "trigger": n.trigger.as_str(), "sessionId": n.session_id});
    if let Some(name) = &n.session_name {
        data["sessionName"] = name.clone().into();
    }
    if let Some(id) = &n.request_id {
        data["requestId"] = id.clone().into();
    }
    if let Some(method) = &n.method {
        data["method"] = method.clone().into();
    }
    if let Some(tool) = &n.tool {
        data["tool"] = tool.clone().into();
    }
    if let Some(code) = n.exit_code {
        data["exitCode"] = code.into();
    }
    if let Some(signal) = &n.signal {
        data["signal"] = signal.clone().into();
    }
    json!({
        "to": token,
        "title": n.trigger.title(),
        "body": n.body,
        "sound": "default",
        "priority": if n.trigger.urgent() { "high" } else { "default" },
        "data": data,
    })
}

/// What Expo said about one chunk.
#[derive(Debug, Default)]
pub(crate) struct Tickets {
    /// Tickets with `status: "ok"`.
    pub(crate) ok: usize,
    /// Tokens Expo no longer knows.
    pub(crate) unregistered: Vec<String>,
}

/// Sends `n` to `tokens` (one chunk) and reads the tickets.
pub(crate) async fn send_chunk(
    http: &reqwest::Client,
    url: &str,
    tokens: &[String],
    n: &Notification,
    timeout: Duration,
) -> Result<Tickets, Failure> {
    let body: Vec<Value> = tokens.iter().map(|t| message(n, t)).collect();
    let resp = http
        .post(url)
        .header("accept", "application/json")
        .json(&body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| Failure::Retry(format!("cannot reach {url}: {}", e.without_url())))?;
    let status = resp.status();
    if !status.is_success() {
        let why = format!("{url} answered {status}");
        return Err(if status.as_u16() == 429 || status.is_server_error() {
            Failure::Retry(why)
        } else {
            Failure::Fail(why)
        });
    }
    let answer: Value = resp
        .json()
        .await
        .map_err(|e| Failure::Retry(format!("{url}: unreadable answer: {}", e.without_url())))?;
    let mut tickets = Tickets::default();
    let list = answer["data"].as_array().cloned().unwrap_or_default();
    for (token, ticket) in tokens.iter().zip(list.iter()) {
        if ticket["status"] == "ok" {
            tickets.ok += 1;
        } else if ticket["details"]["error"] == "DeviceNotRegistered" {
            tickets.unregistered.push(token.clone());
        } else {
            // Expo's message names the token: only its error code is logged.
            tracing::warn!(
                error = %ticket["details"]["error"].as_str().unwrap_or("?"),
                "Expo refused a notification"
            );
        }
    }
    Ok(tickets)
}
