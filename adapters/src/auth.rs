//! Recognises an agent's report that its credentials are missing or wrong: Claude Code's
//! "Not logged in · Please run /login" and "Invalid API key", and a `401` from the model API
//! as Claude, pi or Codex report it. A phone user cannot act on those words in the middle of
//! a transcript; moorline turns the first one of a run into an `amarre.auth_failed` event.
//!
//! Only error-bearing fields are looked at (`error`, `errorMessage`, `error_status`, and a
//! `result` marked `is_error`), so a tool's output or a model's text that merely mentions
//! "401" is never taken for one.

use std::sync::LazyLock;

use memchr::memmem;
use serde_json::Value;

/// Words that occur in every report this module recognises; a line without any of them is
/// passed by without parsing.
const MARKERS: &[&str] = &[
    "401",
    "uthenticat",
    "API key",
    "api_key",
    "api-key",
    "logged in",
    "Unauthorized",
];

/// The [`MARKERS`]' searchers, built once: building one costs more than searching a line, and
/// every output line of every agent is searched.
static FINDERS: LazyLock<Vec<memmem::Finder<'static>>> = LazyLock::new(|| {
    MARKERS
        .iter()
        .map(|m| memmem::Finder::new(m.as_bytes()))
        .collect()
});

/// Every key [`is_auth_failure`] looks at contains one of these (`error`, `errorMessage`,
/// `error_status`, `is_error`, `status`, `statusCode`, …): a line with neither is not searched
/// for the seven [`MARKERS`], which would be seven passes over every output line.
static KEY_FINDERS: LazyLock<[memmem::Finder<'static>; 2]> =
    LazyLock::new(|| [memmem::Finder::new("rror"), memmem::Finder::new("tatus")]);

/// True if `line` might report an authentication failure (a cheap check before parsing).
pub fn may_be_auth_failure(line: &[u8]) -> bool {
    KEY_FINDERS.iter().any(|f| f.find(line).is_some())
        && FINDERS.iter().any(|f| f.find(line).is_some())
}

/// True if `v`, an agent's output line, reports that its credentials are missing or wrong.
pub fn is_auth_failure(v: &Value) -> bool {
    match v {
        Value::Object(map) => map.iter().any(|(key, value)| match key.as_str() {
            "error" | "errorMessage" | "error_message" => error_says_auth(value),
            "error_status" | "status" | "statusCode" => {
                value.as_u64() == Some(401) && map.contains_key("error")
            }
            "result" => map.get("is_error") == Some(&Value::Bool(true)) && error_says_auth(value),
            _ => is_auth_failure(value),
        }),
        Value::Array(items) => items.iter().any(is_auth_failure),
        _ => false,
    }
}

/// Whether an error value (a message, or an object of them) is about credentials.
fn error_says_auth(v: &Value) -> bool {
    match v {
        Value::String(s) => says_auth(s),
        Value::Number(n) => n.as_u64() == Some(401),
        Value::Object(map) => map.values().any(error_says_auth),
        Value::Array(items) => items.iter().any(error_says_auth),
        _ => false,
    }
}

/// The words of authentication failures, as Anthropic, OpenAI and the agents phrase them.
fn says_auth(s: &str) -> bool {
    const PHRASES: &[&str] = &[
        "not logged in",
        "invalid api key",
        "incorrect api key",
        "invalid x-api-key",
        "invalid_api_key",
        "authentication_error",
        "authentication_failed",
        "failed to authenticate",
        "401 unauthorized",
        "status 401",
    ];
    let lower = s.to_ascii_lowercase();
    lower.starts_with("401") || PHRASES.iter().any(|p| lower.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_of_each_agent_are_recognised() {
        for v in [
            // Claude Code: an API retry on 401, and the turn's result.
            json!({"type":"system","subtype":"api_retry","error_status":401,"error":"authentication_failed"}),
            json!({"type":"result","is_error":true,"result":"Not logged in · Please run /login"}),
            json!({"type":"result","is_error":true,"result":"Invalid API key · Please run /login"}),
            // pi.
            json!({"type":"message_end","message":{"stopReason":"error","errorMessage":"401 {\"type\":\"error\",\"error\":{\"type\":\"authentication_error\"}}"}}),
            // Codex, native and translated.
            json!({"method":"error","params":{"error":{"message":"unexpected status 401 Unauthorized: Incorrect API key provided"}}}),
            json!({"type":"agent_end","error":"unexpected status 401 Unauthorized: Incorrect API key"}),
        ] {
            assert!(may_be_auth_failure(v.to_string().as_bytes()), "{v}");
            assert!(is_auth_failure(&v), "{v}");
        }
    }

    #[test]
    fn lines_without_an_error_or_status_key_are_not_parsed() {
        assert!(!may_be_auth_failure(
            br#"{"type":"text","text":"401 Unauthorized: Invalid API key"}"#
        ));
        assert!(may_be_auth_failure(
            br#"{"type":"text","error":"401 Unauthorized"}"#
        ));
    }

    #[test]
    fn text_that_only_mentions_it_is_not_a_failure() {
        for v in [
            json!({"type":"message_update","assistantMessageEvent":{"type":"text_delta","delta":"HTTP 401 means Not logged in"}}),
            json!({"type":"tool_execution_end","result":{"content":[{"type":"text","text":"401 Unauthorized"}]},"isError":true}),
            json!({"type":"result","is_error":false,"result":"Invalid API key handling is done"}),
            json!({"type":"system","subtype":"api_retry","error_status":529,"error":"overloaded"}),
        ] {
            assert!(!is_auth_failure(&v), "{v}");
        }
    }
}
