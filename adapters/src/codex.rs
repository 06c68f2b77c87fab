//! OpenAI Codex (`@openai/codex`): placeholder until the app-server integration lands.

use std::path::PathBuf;

use crate::{Adapter, AdapterConfig, AdapterError, LaunchContext, LaunchSpec};

/// Launches `codex app-server`.
#[derive(Debug, Clone)]
pub struct CodexAdapter {
    program: PathBuf,
    args: Vec<String>,
}

impl CodexAdapter {
    /// A Codex adapter for an instance.
    pub fn new(config: &AdapterConfig) -> Self {
        Self {
            program: config
                .agent_path
                .clone()
                .unwrap_or_else(|| PathBuf::from("codex")),
            args: config.args.clone(),
        }
    }
}

impl Adapter for CodexAdapter {
    fn name(&self) -> &str {
        "codex"
    }

    fn launch(&self, ctx: &LaunchContext<'_>) -> Result<LaunchSpec, AdapterError> {
        let mut args = vec!["app-server".to_owned()];
        args.extend(self.args.iter().cloned());
        Ok(LaunchSpec {
            program: self.program.clone(),
            args,
            env: ctx.env.clone(),
            files: Vec::new(),
        })
    }
}
