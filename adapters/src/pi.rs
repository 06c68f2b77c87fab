//! pi (`@mariozechner/pi-coding-agent`) in RPC mode.
//!
//! pi already speaks the dialect moorline's clients speak (amarre was built on it), so lines
//! pass through. What the adapter adds is safety: pi runs with `--no-extensions` and only
//! moorline's permission gate (shipped as a data file, written into the session's data
//! directory), so every tool call becomes an `extension_ui_request` confirm that clients
//! answer. Telemetry, update checks and other startup network calls are off. Client commands
//! go through [`crate::gate::pi_rpc_command`]: `bash`, which pi runs with no tool call and so
//! no gate, never reaches it.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::conversation::{Continuation, ConversationNews, ConversationPlace};
use crate::pipeline::{Outputs, Translator, ready_frame};
use crate::{Adapter, AdapterConfig, AdapterError, LaunchContext, LaunchSettings, LaunchSpec};

/// The permission gate extension.
pub const GATE: &str = include_str!("../data/pi-permission-gate.ts");
/// Where the gate is written, relative to the session's data directory.
pub const GATE_FILE: &str = "pi/permission-gate.ts";

/// Launches `pi --mode rpc` with moorline's gate.
#[derive(Debug, Clone)]
pub struct PiAdapter {
    launch: LaunchSettings,
    provider: Option<String>,
    /// What this start does with the conversation.
    continuation: Continuation,
}

/// Where pi keeps a session's conversations (`--session-dir`).
fn sessions_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(crate::AGENT_STATE_DIR).join("pi-sessions")
}

impl PiAdapter {
    /// A pi adapter for an instance.
    pub fn new(config: &AdapterConfig) -> Self {
        Self {
            launch: LaunchSettings::new(config, "pi"),
            provider: config.provider.clone(),
            continuation: config.continuation.clone(),
        }
    }
}

impl Adapter for PiAdapter {
    fn name(&self) -> &str {
        "pi"
    }

    fn launch(&self, ctx: &LaunchContext<'_>) -> Result<LaunchSpec, AdapterError> {
        let gate = ctx.data_dir.join(GATE_FILE);
        let mut args: Vec<String> = vec![
            "--mode".into(),
            "rpc".into(),
            // Only moorline's gate: no extension found on disk can act before it or around it.
            "--no-extensions".into(),
            "-e".into(),
            gate.display().to_string(),
        ];
        if let Some(p) = &self.provider {
            args.extend(["--provider".into(), p.clone()]);
        }
        if let Some(m) = &self.launch.model {
            args.extend(["--model".into(), m.clone()]);
        }
        args.extend(self.launch.args.iter().cloned());
        let mut env = ctx.env.clone();
        for (k, v) in [
            ("PI_OFFLINE", "1"),
            ("PI_TELEMETRY", "0"),
            ("PI_SKIP_VERSION_CHECK", "1"),
        ] {
            env.insert(k.into(), v.into());
        }
        let mut files = vec![(PathBuf::from(GATE_FILE), GATE.as_bytes().to_vec())];
        if let Some(url) = &self.launch.base_url {
            // A custom API endpoint lives in pi's models.json; give this session its own
            // configuration directory holding one.
            let provider = self.provider.clone().unwrap_or_else(|| "anthropic".into());
            let models = serde_json::json!({"providers": {provider: {"baseUrl": url}}});
            files.push((
                PathBuf::from("pi/agent/models.json"),
                models.to_string().into_bytes(),
            ));
            env.insert(
                "PI_CODING_AGENT_DIR".into(),
                ctx.data_dir.join("pi/agent").display().to_string(),
            );
        }
        // pi keeps its sessions in the agent's own state directory (the configuration
        // directory is moorline's, read-only to the agent): one session's, so the newest file
        // there is this session's conversation.
        args.extend([
            "--session-dir".into(),
            sessions_dir(ctx.data_dir).display().to_string(),
        ]);
        if let Some(file) = &self.continuation.resume {
            args.extend(["--session".into(), file.clone()]);
        }
        Ok(LaunchSpec {
            program: self.launch.program.clone(),
            args,
            env,
            files,
            conversation: self.continuation.resume.clone(),
        })
    }

    /// The newest session file pi wrote in the session's directory for them.
    fn find_conversation(&self, place: &ConversationPlace<'_>) -> Result<Option<String>, String> {
        let dir = sessions_dir(place.data_dir);
        // Only regular files and real directories: the agent owns this directory.
        let entries = |dir: &Path| -> Vec<(std::fs::Metadata, PathBuf)> {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| Some((std::fs::symlink_metadata(e.path()).ok()?, e.path())))
                .collect()
        };
        let mut files = Vec::new();
        for (meta, path) in entries(&dir) {
            if meta.is_dir() {
                files.extend(entries(&path).into_iter().filter(|(m, _)| m.is_file()));
            } else if meta.is_file() {
                files.push((meta, path));
            }
        }
        let newest = files
            .into_iter()
            .filter(|(m, p)| m.len() > 0 && p.extension().is_some_and(|x| x == "jsonl"))
            .map(|(m, p)| (m.modified().ok(), p))
            .max();
        match (newest, place.recorded) {
            (Some((_, file)), _) => Ok(Some(file.display().to_string())),
            (None, None) => Ok(None),
            (None, Some(file)) => Err(format!(
                "pi's session file {file} is not there (pi writes it with the first message; \
                 or it was removed)"
            )),
        }
    }

    fn protected_env(&self) -> &'static [&'static str] {
        // Another configuration directory or package directory could load other extensions.
        &["PI_*"]
    }

    fn translator(&self) -> Box<dyn Translator> {
        Box::new(ReadyProbe {
            resumed: self.continuation.resume.is_some(),
            ..ReadyProbe::default()
        })
    }
}

/// Id of the `get_state` moorline sends to learn that pi is ready.
const PROBE_ID: &str = "moorline-ready";

/// pi prints nothing until asked: moorline asks `get_state` at start, keeps the answer to
/// itself, and tells clients `amarre.agent_ready`. After that, agent lines pass through
/// untouched; client lines are checked against the commands clients may send.
#[derive(Debug, Default)]
pub struct ReadyProbe {
    ready: bool,
    /// pi was started on an earlier session file.
    resumed: bool,
    /// The session file `get_state` named, not yet reported for the session's record.
    news: Option<ConversationNews>,
}

impl Translator for ReadyProbe {
    fn start(&mut self, out: &mut Outputs) {
        out.agent_json(&json!({"id": PROBE_ID, "type": "get_state"}));
    }

    fn agent_line(&mut self, line: &str, out: &mut Outputs) {
        if !self.ready
            && line.contains(PROBE_ID)
            && let Ok(v) = serde_json::from_str::<Value>(line)
            && v["id"] == PROBE_ID
            && v["type"] == "response"
        {
            self.ready = true;
            self.news = v["data"]["sessionFile"]
                .as_str()
                .map(|file| ConversationNews {
                    id: file.to_owned(),
                    resumed: self.resumed,
                });
            let mut ready = ready_frame();
            ready["model"] = v["data"]["model"].clone();
            out.client_json(&ready);
            return;
        }
        out.to_clients.push(line.as_bytes().to_vec());
    }

    fn client_line(&mut self, line: &[u8], out: &mut Outputs) {
        match crate::gate::parse_object(line) {
            // Blank lines: pi ignores them too.
            None => {}
            Some(Err(rejection)) => {
                // pi would answer with its own parse error; a line serde cannot read might
                // still be one JavaScript reads, so it never reaches pi.
                out.client_json(&rejection.frame());
                crate::pirpc::respond(
                    out,
                    &Value::Null,
                    "parse",
                    Err(format!("Failed to parse command: {}", rejection.error)),
                );
            }
            Some(Ok(cmd)) => match crate::gate::pi_rpc_command(&cmd) {
                Ok(()) => out.agent_json(&cmd),
                Err(rejection) => crate::gate::refuse_pi_rpc(&cmd, &rejection, out),
            },
        }
    }

    fn passes_agent_lines_through(&self) -> bool {
        self.ready
    }

    fn take_conversation(&mut self) -> Option<ConversationNews> {
        self.news.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The newest non-empty session file in the session's directory is continued with
    /// `--session`; none there while one was recorded is a lost conversation.
    #[test]
    fn continues_the_newest_session_file() {
        let data = std::env::temp_dir().join(format!("moorline-pi-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let sessions = sessions_dir(&data);
        std::fs::create_dir_all(&sessions).expect("mkdir");
        let adapter = PiAdapter::new(&AdapterConfig {
            agent: "pi".into(),
            ..Default::default()
        });
        let place = |recorded| ConversationPlace {
            data_dir: &data,
            home: None,
            cwd: Path::new("/w"),
            recorded,
        };
        assert_eq!(adapter.find_conversation(&place(None)), Ok(None));
        assert!(adapter.find_conversation(&place(Some("/x.jsonl"))).is_err());
        std::fs::write(sessions.join("empty.jsonl"), "").expect("write");
        let file = sessions.join("a.jsonl");
        std::fs::write(&file, "{}\n").expect("write");
        let found = adapter.find_conversation(&place(None)).expect("found");
        assert_eq!(found.as_deref(), Some(file.to_str().expect("utf-8")));

        let resumed = PiAdapter::new(&AdapterConfig {
            agent: "pi".into(),
            continuation: Continuation {
                resume: found.clone(),
                ..Continuation::default()
            },
            ..Default::default()
        });
        let env = BTreeMap::new();
        let spec = resumed
            .launch(&crate::test_context(&env, &data))
            .expect("launch");
        assert!(
            spec.args
                .windows(2)
                .any(|w| w[0] == "--session" && Some(w[1].as_str()) == found.as_deref())
        );
        let _ = std::fs::remove_dir_all(&data);
    }

    /// `get_state`'s session file is reported once, for the session's record.
    #[test]
    fn reports_the_session_file() {
        let mut probe = ReadyProbe {
            resumed: true,
            ..ReadyProbe::default()
        };
        let mut out = Outputs::default();
        probe.agent_line(
            r#"{"id":"moorline-ready","type":"response","command":"get_state","success":true,"data":{"model":null,"sessionFile":"/d/state/pi-sessions/x.jsonl"}}"#,
            &mut out,
        );
        assert_eq!(
            probe.take_conversation(),
            Some(ConversationNews {
                id: "/d/state/pi-sessions/x.jsonl".into(),
                resumed: true
            })
        );
        assert_eq!(probe.take_conversation(), None);
    }

    #[test]
    fn launches_rpc_mode_with_only_the_gate() {
        let adapter = PiAdapter::new(&AdapterConfig {
            agent: "pi".into(),
            base_url: Some("http://127.0.0.1:9/".into()),
            model: Some("m".into()),
            ..Default::default()
        });
        let env = BTreeMap::new();
        let spec = adapter
            .launch(&crate::test_context(&env, Path::new("/d")))
            .expect("launch");
        assert_eq!(spec.program, PathBuf::from("pi"));
        assert_eq!(
            &spec.args[..5],
            [
                "--mode",
                "rpc",
                "--no-extensions",
                "-e",
                "/d/pi/permission-gate.ts"
            ]
        );
        assert!(spec.args.windows(2).any(|w| w == ["--model", "m"]));
        assert_eq!(spec.env["PI_OFFLINE"], "1");
        assert_eq!(spec.env["PI_CODING_AGENT_DIR"], "/d/pi/agent");
        assert!(
            spec.args
                .windows(2)
                .any(|w| w == ["--session-dir", "/d/state/pi-sessions"])
        );
        assert!(
            spec.files
                .iter()
                .any(|(p, c)| p == Path::new(GATE_FILE) && c.starts_with(b"// moorline"))
        );
        let models = spec
            .files
            .iter()
            .find(|(p, _)| p.ends_with("models.json"))
            .expect("models");
        assert!(String::from_utf8_lossy(&models.1).contains("127.0.0.1:9"));
    }

    #[test]
    fn readiness_is_asked_for_and_the_answer_kept_from_clients() {
        let mut t = ReadyProbe::default();
        let mut out = Outputs::default();
        t.start(&mut out);
        assert!(String::from_utf8_lossy(&out.to_agent[0]).contains("get_state"));
        assert!(!t.passes_agent_lines_through());
        let mut out = Outputs::default();
        t.agent_line(r#"{"id":"moorline-ready","type":"response","command":"get_state","success":true,"data":{"model":{"id":"m"}}}"#, &mut out);
        let frame: Value = serde_json::from_slice(&out.to_clients[0]).expect("json");
        assert_eq!(
            (frame["type"].as_str(), frame["model"]["id"].as_str()),
            (Some("amarre.agent_ready"), Some("m"))
        );
        assert!(
            t.passes_agent_lines_through(),
            "then agent lines pass through untouched"
        );
        assert!(!t.passes_through(), "client lines are still checked");
        let mut out = Outputs::default();
        t.client_line(br#"{"id":"b","type":"bash","command":"touch x"}"#, &mut out);
        assert!(out.to_agent.is_empty(), "bash never reaches pi");
        let frame: Value = serde_json::from_slice(&out.to_clients[0]).expect("json");
        assert_eq!(frame["reason"], "runs_without_approval");
        let mut out = Outputs::default();
        t.client_line(br#"{"id":"p","type":"prompt","message":"hi"}"#, &mut out);
        assert_eq!(out.to_agent.len(), 1, "prompts do");
    }
}
