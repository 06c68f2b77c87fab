//! The generic channel: one POST per notification to `notify.webhook_url`, as moorline's JSON
//! document (Gotify and Home Assistant take it as it is) or in ntfy's own format (the text as
//! the body, `Title`, `Priority`, `Tags` and `Click` headers).

use std::time::Duration;

use serde_json::json;

use super::Failure;
use super::message::{Notification, Trigger};
use crate::config::{Secret, WebhookFormat};

/// A configured webhook.
#[derive(Debug)]
pub(crate) struct Webhook {
    url: String,
    ntfy: bool,
    token: Option<Secret>,
    public_url: Option<String>,
}

impl Webhook {
    pub(crate) fn new(
        url: String,
        format: WebhookFormat,
        token: Option<Secret>,
        public_url: Option<String>,
    ) -> Self {
        let ntfy = match format {
            WebhookFormat::Ntfy => true,
            WebhookFormat::Json => false,
            WebhookFormat::Auto => is_ntfy(&url),
        };
        Self {
            url,
            ntfy,
            token,
            public_url,
        }
    }

    /// The link to the session in the web app, when the server's public URL is known.
    fn click(&self, n: &Notification) -> Option<String> {
        let base = self.public_url.as_deref()?;
        Some(format!("{}/{}", base.trim_end_matches('/'), n.app_link()))
    }

    pub(crate) async fn send(
        &self,
        http: &reqwest::Client,
        n: &Notification,
        timeout: Duration,
    ) -> Result<(), Failure> {
        let mut req = http.post(&self.url).timeout(timeout);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token.expose());
        }
        let click = self.click(n);
        req = if self.ntfy {
            let (priority, tags) = match n.trigger {
                Trigger::AwaitingInput => ("high", "question"),
                Trigger::Crashed => ("high", "rotating_light"),
                Trigger::TurnFinished => ("default", "white_check_mark"),
                Trigger::Exited => ("default", "stop_sign"),
            };
            // Header values must be ASCII: the title is the plain one.
            let title = format!("moorline: {}", n.trigger.as_str().replace('_', " "));
            let mut req = req
                .header("Title", title)
                .header("Priority", priority)
                .header("Tags", tags)
                .header("content-type", "text/plain; charset=utf-8");
            if let Some(click) = click {
                req = req.header("Click", click);
            }
            req.body(n.body.clone())
        } else {
            let mut doc = json!({
                "source": "moorline",
                "trigger": n.trigger.as_str(),
                "title": n.trigger.title(),
                "message": n.body,
                "priority": if n.trigger.urgent() { 8 } else { 5 },
                "sessionId": n.session_id,
                "instanceId": n.instance_id,
                "at": n.at,
            });
            for (key, value) in [
                ("sessionName", &n.session_name),
                ("requestId", &n.request_id),
                ("tool", &n.tool),
                ("signal", &n.signal),
                ("url", &click),
            ] {
                if let Some(v) = value {
                    doc[key] = v.clone().into();
                }
            }
            if let Some(code) = n.exit_code {
                doc["exitCode"] = code.into();
            }
            req.json(&doc)
        };
        let resp = req.send().await.map_err(|e| {
            Failure::Retry(format!("cannot reach the webhook: {}", e.without_url()))
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let why = format!("the webhook answered {status}");
        Err(if status.as_u16() == 429 || status.is_server_error() {
            Failure::Retry(why)
        } else {
            Failure::Fail(why)
        })
    }
}

/// `ntfy.sh`, or a host named `ntfy.…` (a self-hosted ntfy's usual name).
fn is_ntfy(url: &str) -> bool {
    let host = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split(['/', ':', '?']).next())
        .unwrap_or("");
    host == "ntfy.sh" || host.ends_with(".ntfy.sh") || host.starts_with("ntfy.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ntfy_urls_are_recognised() {
        assert!(is_ntfy("https://ntfy.sh/my-topic"));
        assert!(is_ntfy("https://ntfy.example.org/alerts"));
        assert!(!is_ntfy("https://hass.local/api/webhook/x"));
        assert!(!is_ntfy("http://127.0.0.1:9/ntfy.sh"));
    }
}
