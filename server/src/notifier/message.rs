//! What a notification says: built from the session's summary and the approval request, with
//! anything that looks like a secret (or is a value of the session's environment) masked, and
//! cut to `notify.max_text_chars`. Notifications leave the machine through third-party push
//! services, so this is the one place that decides what they may carry.

use serde::Serialize;
use serde_json::Value;

use crate::session::SessionSummary;

/// Why a notification is sent. The names are amarre's (`awaiting_input`, `crashed`) plus
/// moorline's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Trigger {
    /// An approval request waits, unanswered past the grace period.
    AwaitingInput,
    /// A turn finished while no client watched.
    TurnFinished,
    /// The agent exited (code 0) while no client watched.
    Exited,
    /// The agent crashed (another code, a signal, or lost).
    Crashed,
}

impl Trigger {
    /// The name on the wire.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Trigger::AwaitingInput => "awaiting_input",
            Trigger::TurnFinished => "turn_finished",
            Trigger::Exited => "exited",
            Trigger::Crashed => "crashed",
        }
    }

    /// The title shown above the text.
    pub(crate) fn title(self) -> &'static str {
        match self {
            Trigger::AwaitingInput => "moorline · awaiting input",
            Trigger::TurnFinished => "moorline · turn finished",
            Trigger::Exited => "moorline · session exited",
            Trigger::Crashed => "moorline · session crashed",
        }
    }

    /// Whether the person should look now (push services' urgency, ntfy's priority).
    pub(crate) fn urgent(self) -> bool {
        matches!(self, Trigger::AwaitingInput | Trigger::Crashed)
    }
}

/// One notification, ready for every channel.
#[derive(Debug, Clone)]
pub(crate) struct Notification {
    /// Sent at most once, ever (`<session>/request/<id>`, `<session>/exit/<spawnedAt>`…).
    pub key: String,
    /// Why.
    pub trigger: Trigger,
    /// The session.
    pub session_id: String,
    /// Its name, if it has one.
    pub session_name: Option<String>,
    /// Its instance.
    pub instance_id: String,
    /// Who may use that instance (empty: everyone): who is notified.
    pub allowed_users: Vec<String>,
    /// The text: session, tool, what it wants to run. Masked and cut.
    pub body: String,
    /// The approval request's id (awaiting input).
    pub request_id: Option<String>,
    /// The dialog method (`confirm`, `select`…) of the request.
    pub method: Option<String>,
    /// The tool the request is about, when known.
    pub tool: Option<String>,
    /// How the agent ended (exited, crashed).
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<String>,
    /// When it was decided, ms since the epoch.
    pub at: u64,
}

impl Notification {
    /// Whether `user` may see this notification: the instance's `allowed_users` rule, as for
    /// the session itself (the bearer token may use every instance).
    pub(crate) fn for_user(&self, user: &str) -> bool {
        self.allowed_users.is_empty()
            || user == "token"
            || self
                .allowed_users
                .iter()
                .any(|a| a.eq_ignore_ascii_case(user))
    }

    /// The web app's link to the session, relative to the app.
    pub(crate) fn app_link(&self) -> String {
        format!("#/s/{}", self.session_id)
    }
}

/// How a session is named in a text: its name, else its id.
fn label(summary: &SessionSummary) -> String {
    summary.name.clone().unwrap_or_else(|| summary.id.clone())
}

/// What the request wants to do: pi's dialog text, Claude's tool input, Codex's command.
fn what(request: &Value) -> String {
    let value = [
        &request["request"]["input"]["command"],
        &request["params"]["command"],
        &request["message"],
        &request["request"]["input"],
    ]
    .into_iter()
    .find(|v| !v.is_null());
    match value {
        Some(Value::String(s)) => s.clone(),
        // pi's gate sends the tool input as JSON text: show the command if it has one.
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// The text of an approval request's notification.
pub(crate) fn awaiting(summary: &SessionSummary, request: &Value, tool: Option<&str>) -> String {
    let mut what = what(request);
    if let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(&what)
        && let Some(Value::String(command)) = obj.get("command")
    {
        what = command.clone();
    }
    let asks = match (tool, request["method"].as_str()) {
        (Some(tool), _) => format!("{tool} wants to run"),
        (None, Some(method)) if method != "confirm" => {
            let title = request["title"].as_str().unwrap_or(method);
            format!("{method}: {title}")
        }
        _ => request["title"]
            .as_str()
            .unwrap_or("approval needed")
            .to_owned(),
    };
    format!("{}: {asks} {what}", label(summary))
}

/// The text of a finished turn's notification.
pub(crate) fn turn_finished(summary: &SessionSummary) -> String {
    format!("{}: the agent finished its turn", label(summary))
}

/// The text of an ended run's notification.
pub(crate) fn ended(summary: &SessionSummary) -> String {
    let how = match (
        &summary.signal,
        summary.exit_code,
        summary.reason.as_deref(),
    ) {
        (_, _, Some(reason)) => format!("ended ({})", reason.replace('_', " ")),
        (Some(signal), _, None) => format!("was killed by {signal}"),
        (None, Some(0), None) => "exited".to_owned(),
        (None, Some(code), None) => format!("exited with code {code}"),
        (None, None, None) => "ended".to_owned(),
    };
    format!("{}: the agent {how}", label(summary))
}

/// Masks secrets in `text`, folds whitespace and cuts it to `max` characters (an ellipsis
/// marks a cut). `known` are values that must never appear (the session's environment).
pub(crate) fn clean<'a>(
    text: &str,
    known: impl IntoIterator<Item = &'a str>,
    max: usize,
) -> String {
    let mut text = text.to_owned();
    for value in known {
        // Short values (`1`, `true`) are not secrets and would mask half the text.
        if value.chars().count() >= 6 {
            text = text.replace(value, "***");
        }
    }
    let words: Vec<String> = text.split_whitespace().map(mask_word).collect();
    let folded = words.join(" ");
    if folded.chars().count() <= max {
        return folded;
    }
    let mut cut: String = folded.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Prefixes of well-known credentials (API keys, personal access tokens).
const SECRET_PREFIXES: &[&str] = &[
    "sk-",
    "ghp_",
    "gho_",
    "ghs_",
    "ghu_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "AKIA",
    "AIza",
    "hf_",
    "npm_",
];

/// Names that make an assignment's value a secret (`API_KEY=…`, `--token …` is not caught).
const SECRET_NAMES: &[&str] = &["key", "token", "secret", "passw", "auth", "credential"];

fn mask_word(word: &str) -> String {
    // NAME=value or NAME: value within one word.
    if let Some(at) = word.find(['=', ':']) {
        let (name, value) = word.split_at(at);
        let lower = name.to_ascii_lowercase();
        if value.len() > 1 && !name.contains('/') && SECRET_NAMES.iter().any(|s| lower.contains(s))
        {
            return format!("{name}{}***", &value[..1]);
        }
    }
    let bare = word.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_');
    if bare.len() >= 12 && SECRET_PREFIXES.iter().any(|p| bare.starts_with(p)) {
        return word.replace(bare, "***");
    }
    // A bearer token or a long opaque string (a key pasted into a command).
    if bare.len() >= 32
        && bare
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && bare.chars().any(|c| c.is_ascii_digit())
        && bare.chars().any(|c| c.is_ascii_alphabetic())
    {
        return word.replace(bare, "***");
    }
    word.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_and_text_is_cut() {
        let text =
            "curl -H Authorization:Bearer_x API_KEY=hunter2hunter2 sk-abcdefghijklmnop https://x/y";
        let out = clean(text, ["s3cr3tvalue"], 200);
        assert!(!out.contains("hunter2"), "{out}");
        assert!(!out.contains("sk-abcdefghijklmnop"), "{out}");
        assert!(out.contains("API_KEY=***"), "{out}");
        assert!(out.contains("https://x/y"), "{out}");
        let out = clean("echo s3cr3tvalue", ["s3cr3tvalue", "1"], 200);
        assert_eq!(out, "echo ***");
        let long = "a ".repeat(300);
        let out = clean(&long, [], 100);
        assert_eq!(out.chars().count(), 100);
        assert!(out.ends_with('…'));
        let key = "0123456789abcdef0123456789abcdef01";
        assert_eq!(clean(&format!("use {key}"), [], 100), "use ***");
    }

    #[test]
    fn texts_name_the_session_the_tool_and_the_command() {
        let summary = crate::notifier::tests::summary("demo");
        let pi = serde_json::json!({"type":"extension_ui_request","id":"1","method":"confirm","title":"Run bash?","message":"{\"command\":\"ls /tmp\"}"});
        assert_eq!(
            awaiting(&summary, &pi, Some("bash")),
            "demo: bash wants to run ls /tmp"
        );
        let claude = serde_json::json!({"type":"control_request","request_id":"r","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{"command":"rm -rf build"}}});
        assert_eq!(
            awaiting(&summary, &claude, Some("Bash")),
            "demo: Bash wants to run rm -rf build"
        );
    }
}
