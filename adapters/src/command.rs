//! The generic adapter: any program that reads JSON Lines on stdin and writes them on stdout.

use std::path::PathBuf;

use crate::{Adapter, AdapterError, LaunchContext, LaunchSpec};

/// Runs a fixed argv; lines pass through untouched.
#[derive(Debug, Clone)]
pub struct CommandAdapter {
    name: String,
    program: PathBuf,
    args: Vec<String>,
}

impl CommandAdapter {
    /// An adapter named `name` that runs `argv`.
    pub fn new(name: &str, argv: Vec<String>) -> Result<Self, AdapterError> {
        let mut argv = argv.into_iter();
        let program = argv.next().filter(|p| !p.is_empty()).ok_or_else(|| {
            AdapterError::Config("command is empty: give at least the program".into())
        })?;
        Ok(Self {
            name: name.to_owned(),
            program: PathBuf::from(program),
            args: argv.collect(),
        })
    }
}

impl Adapter for CommandAdapter {
    fn name(&self) -> &str {
        &self.name
    }

    fn launch(&self, ctx: &LaunchContext<'_>) -> Result<LaunchSpec, AdapterError> {
        Ok(LaunchSpec {
            program: self.program.clone(),
            args: self.args.clone(),
            env: ctx.env.clone(),
            files: Vec::new(),
            conversation: None,
        })
    }
}
