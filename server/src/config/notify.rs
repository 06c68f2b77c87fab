//! Notifications (`[notify]`): when they are sent, and through which channels.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// What the webhook channel posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// `ntfy` when the URL's host is `ntfy.sh` or starts with `ntfy.`, else `json`.
    #[default]
    Auto,
    /// moorline's JSON document (docs/PROTOCOL.md, Notifications).
    Json,
    /// ntfy's own: the text as the body, `Title`, `Priority`, `Tags` and `Click` headers.
    Ntfy,
}

/// Notifications (`[notify]`): the rules are the same for every channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// How long an approval request may wait, unanswered and with no client active on its
    /// session, before it is notified (`AMARRE_PUSH_GRACE_MS`).
    pub grace_ms: u64,
    /// Notify a finished turn (`agent_end`) when no client watches the session.
    pub turn_finished: bool,
    /// Notify an agent that exited with code 0 when no client watched it (crashes are always
    /// notified).
    pub exited: bool,
    /// amarre's Expo push API (`/push/tokens`); off, those routes answer 503 `push_disabled`.
    /// Setting `expo_tokens_path` (`AMARRE_PUSH_TOKENS_PATH`) turns it on.
    pub expo: bool,
    /// The Expo token store. Default: `<state_dir>/notify/expo-tokens.json`.
    pub expo_tokens_path: Option<PathBuf>,
    /// Expo's push endpoint (`AMARRE_PUSH_EXPO_URL`).
    pub expo_url: String,
    /// Web Push (`/push/web/*`) for the web app, with VAPID keys kept in the state directory.
    pub web_push: bool,
    /// The contact in VAPID tokens (`mailto:` or `https:`), which push services may use to reach
    /// whoever runs the server.
    pub vapid_subject: String,
    /// A URL that receives every notification as a POST (ntfy, Gotify, Home Assistant…).
    pub webhook_url: Option<String>,
    /// What the webhook receives.
    pub webhook_format: WebhookFormat,
    /// A file holding a token sent as `Authorization: Bearer` to the webhook.
    pub webhook_token_file: Option<PathBuf>,
    /// This server's URL as people open it (`https://host.tailnet.ts.net/`): notification
    /// links point there. Unset: Web Push links are relative to the web app, webhooks get none.
    pub public_url: Option<String>,
    /// Longest notification text, in characters (amarre's Expo body: 100).
    pub max_text_chars: usize,
    /// Notifications waiting for delivery; beyond it new ones are dropped (and counted).
    pub queue: usize,
    /// Attempts per delivery, the first included.
    pub attempts: u32,
    /// Wait before the first retry; it doubles after each.
    pub retry_base_ms: u64,
    /// Time limit of one delivery request.
    pub timeout_ms: u64,
    /// How long a stopping server still gives the notifications queued before the stop (and
    /// their retries) to go out.
    pub shutdown_grace_ms: u64,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            grace_ms: 15_000,
            turn_finished: true,
            exited: true,
            expo: false,
            expo_tokens_path: None,
            expo_url: "https://exp.host/--/api/v2/push/send".into(),
            web_push: true,
            vapid_subject: "https://github.com/moorline/moorline".into(),
            webhook_url: None,
            webhook_format: WebhookFormat::Auto,
            webhook_token_file: None,
            public_url: None,
            max_text_chars: 100,
            queue: 256,
            attempts: 4,
            retry_base_ms: 1_000,
            timeout_ms: 10_000,
            shutdown_grace_ms: 3_000,
        }
    }
}

impl NotifyConfig {
    /// Whether amarre's Expo push API is on.
    pub fn expo_enabled(&self) -> bool {
        self.expo || self.expo_tokens_path.is_some()
    }

    /// [`Self::grace_ms`] as a duration.
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("notify.queue", self.queue),
            ("notify.max_text_chars", self.max_text_chars),
            ("notify.attempts", self.attempts as usize),
        ] {
            if value == 0 {
                return Err(ConfigError::new(format!("{key}: must be at least 1")));
            }
        }
        let urls = [("notify.expo_url", Some(&self.expo_url))]
            .into_iter()
            .chain([("notify.webhook_url", self.webhook_url.as_ref())])
            .chain([("notify.public_url", self.public_url.as_ref())]);
        for (key, url) in urls {
            if let Some(url) = url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return Err(ConfigError::new(format!(
                    "{key}: {url:?} is not an http:// or https:// URL"
                )));
            }
        }
        if !(self.vapid_subject.starts_with("mailto:") || self.vapid_subject.starts_with("https:"))
        {
            return Err(ConfigError::new(
                "notify.vapid_subject: must be a mailto: or https: URL (RFC 8292)",
            ));
        }
        Ok(())
    }
}
