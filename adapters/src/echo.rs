//! moorline's built-in echo agent.
//!
//! It exists so that `moorline serve` works on a machine with no coding agent installed: every
//! line it reads is answered with `{"type":"response","success":true,"echo":<line>}`, the shape
//! amarre's test agent uses. It runs as a hidden subcommand of the moorline binary, so it needs
//! nothing else on disk.

use std::io::{self, BufRead, Write};

use crate::{Adapter, AdapterError, LaunchContext, LaunchSpec};

/// The hidden moorline subcommand that runs [`run`].
pub const SUBCOMMAND: &str = "echo-agent";

/// Launches `moorline echo-agent`.
#[derive(Debug, Clone, Copy)]
pub struct EchoAdapter;

impl Adapter for EchoAdapter {
    fn name(&self) -> &str {
        "echo"
    }

    fn launch(&self, ctx: &LaunchContext<'_>) -> Result<LaunchSpec, AdapterError> {
        Ok(LaunchSpec {
            program: ctx.moorline_exe.to_owned(),
            args: vec![SUBCOMMAND.to_owned()],
            env: ctx.env.clone(),
            files: Vec::new(),
            conversation: None,
        })
    }
}

/// The echo agent's loop: answers every line until stdin closes.
pub fn run(input: impl BufRead, mut output: impl Write) -> io::Result<()> {
    let mut line = Vec::new();
    let mut input = input;
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        if text.is_empty() {
            continue;
        }
        let echo = serde_json::from_str::<serde_json::Value>(text)
            .unwrap_or_else(|_| serde_json::Value::String(text.to_owned()));
        let mut reply = serde_json::json!({"type": "response", "success": true, "echo": echo});
        if let Some(id) = echo.get("id") {
            reply["id"] = id.clone();
        }
        if let Some(command) = echo.get("type") {
            reply["command"] = command.clone();
        }
        serde_json::to_writer(&mut output, &reply)?;
        output.write_all(b"\n")?;
        output.flush()?;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn echoes_json_and_text_lines() {
        let mut out = Vec::new();
        super::run(
            &b"{\"id\":\"1\",\"type\":\"prompt\"}\n\nnot json\r\n"[..],
            &mut out,
        )
        .expect("run");
        let lines: Vec<serde_json::Value> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["echo"]["id"], "1");
        assert_eq!(lines[0]["id"], "1");
        assert_eq!(lines[0]["command"], "prompt");
        assert_eq!(lines[1]["echo"], "not json");
    }
}
