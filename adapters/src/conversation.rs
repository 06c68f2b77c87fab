//! Conversations that outlive a run of the agent.
//!
//! Each agent keeps its conversation on disk its own way (Claude Code a transcript under its
//! home, pi a session file, Codex a thread), so each adapter knows how to find the one a
//! session had ([`crate::Adapter::find_conversation`]) and how to continue it
//! ([`Continuation::resume`]). The server decides, for every start, whether to continue and
//! records what the run had (the session directory's `conversation.json`). A conversation
//! that cannot be continued is never dropped silently: clients get
//! [`resume_failed_frame`] and the agent starts a new one.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::pipeline::{Outputs, Translator};

/// What one start does with the agent's conversation. Decided by the server for each start
/// (never by configuration) and carried, inside [`crate::AdapterConfig`], to wherever the
/// agent's stdio is handled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Continuation {
    /// The conversation to continue, as its adapter names it; `None`: a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
    /// An id the server chose for a new conversation, for agents that let the caller name
    /// one (Claude Code's `--session-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fresh_id: Option<String>,
    /// Why the session's conversation could not be continued: clients are told when the
    /// agent starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
    /// With `resume`: the sequence number of the session's first journal line of the
    /// conversation, from where its messages can be read back for `get_messages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_from: Option<u64>,
}

/// Where an adapter looks for a session's conversation.
#[derive(Debug, Clone, Copy)]
pub struct ConversationPlace<'a> {
    /// The session's data directory (as in [`crate::LaunchContext::data_dir`]).
    pub data_dir: &'a Path,
    /// The directory the agent sees as `$HOME`, as a path on this machine, if known.
    pub home: Option<&'a Path>,
    /// The working directory of the agent.
    pub cwd: &'a Path,
    /// The conversation recorded for the session's last run, if any.
    pub recorded: Option<&'a str>,
}

/// A conversation a running agent reported (Codex names its thread only once started).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationNews {
    /// Its id, as its adapter names it.
    pub id: String,
    /// Whether this run continues an earlier conversation.
    pub resumed: bool,
}

/// `amarre.resume_failed`: the session's conversation could not be continued; the agent
/// starts a new one.
pub fn resume_failed_frame(conversation: Option<&str>, reason: &str) -> Value {
    let mut frame = json!({
        "type": "amarre.resume_failed",
        "reason": reason,
        "message": "the earlier conversation could not be continued: the agent starts a new one",
    });
    if let Some(id) = conversation {
        frame["conversation"] = id.into();
    }
    frame
}

/// Whether `id` looks like an id an agent gave (no path separators, no surprises), so a
/// record cannot point an adapter anywhere else.
pub fn plain_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A translator that first tells clients that the conversation was lost, then is `inner`.
pub(crate) struct Noticed {
    pub(crate) inner: Box<dyn Translator>,
    pub(crate) notice: Option<Value>,
}

impl Translator for Noticed {
    fn agent_line(&mut self, line: &str, out: &mut Outputs) {
        self.inner.agent_line(line, out);
    }

    fn client_line(&mut self, line: &[u8], out: &mut Outputs) {
        self.inner.client_line(line, out);
    }

    fn start(&mut self, out: &mut Outputs) {
        if let Some(notice) = self.notice.take() {
            out.client_json(&notice);
        }
        self.inner.start(out);
    }

    fn passes_through(&self) -> bool {
        self.inner.passes_through()
    }

    fn passes_agent_lines_through(&self) -> bool {
        self.inner.passes_agent_lines_through()
    }

    fn take_conversation(&mut self) -> Option<ConversationNews> {
        self.inner.take_conversation()
    }

    fn restore_messages(&mut self, messages: Vec<Value>) {
        self.inner.restore_messages(messages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ids_only() {
        assert!(plain_id("0198-abc_DEF"));
        assert!(!plain_id(""));
        assert!(!plain_id("../x"));
        assert!(!plain_id("a/b"));
    }

    #[test]
    fn the_notice_comes_first() {
        let mut t = Noticed {
            inner: Box::new(crate::pipeline::Passthrough),
            notice: Some(resume_failed_frame(Some("c1"), "gone")),
        };
        let mut out = Outputs::default();
        t.start(&mut out);
        t.start(&mut out);
        assert_eq!(out.to_clients.len(), 1, "told once");
        let v: Value = serde_json::from_slice(&out.to_clients[0]).expect("json");
        assert_eq!(v["type"], "amarre.resume_failed");
        assert_eq!(v["conversation"], "c1");
    }
}
