//! A thin wrapper around the `tmux` command.
//!
//! moorline always talks to its own tmux server (`-L <socket>`), never the user's default one,
//! and ignores user configuration (`-f /dev/null`), so its sessions are predictable and a user's
//! `tmux kill-server` of their own server does not touch them.

use std::io;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::Command;

/// moorline's tmux server.
#[derive(Debug, Clone)]
pub(crate) struct Tmux {
    program: PathBuf,
    socket: String,
}

impl Tmux {
    /// A handle on the tmux server named `socket`.
    pub(crate) fn new(program: PathBuf, socket: String) -> Self {
        Self { program, socket }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg("-L")
            .arg(&self.socket)
            .arg("-f")
            .arg("/dev/null")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    async fn run(&self, args: &[&str]) -> io::Result<String> {
        let out = self.command().args(args).output().await?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "tmux {}: {}",
                args.first().copied().unwrap_or(""),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether tmux can be run at all.
    pub(crate) async fn usable(&self) -> bool {
        Command::new(&self.program)
            .arg("-V")
            .stdin(Stdio::null())
            .output()
            .await
            .is_ok_and(|o| o.status.success())
    }

    /// Starts moorline's tmux server and keeps it running while it has no sessions, so a new
    /// session never pays for starting a server (about 10 ms).
    pub(crate) async fn keep_server(&self) {
        if let Err(e) = self
            .run(&["start-server", ";", "set-option", "-g", "exit-empty", "off"])
            .await
        {
            tracing::debug!(error = %e, "cannot keep the tmux server running");
        }
    }

    /// Starts a detached session named `name` running `argv` (no shell involved), marked as
    /// belonging to `owner` (the server's sessions directory), so that a server only ever
    /// cleans up its own sessions when several share the tmux server.
    pub(crate) async fn new_session(
        &self,
        name: &str,
        owner: &str,
        argv: &[String],
    ) -> io::Result<()> {
        let mut args = vec![
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "200",
            "-y",
            "50",
            "--",
        ];
        args.extend(argv.iter().map(String::as_str));
        // In the same tmux command, so no session ever exists unmarked.
        args.extend([";", "set-option", OWNER_OPTION, owner]);
        self.run(&args).await.map(|_| ())
    }

    /// Ends the session named `name`, if it exists.
    pub(crate) async fn kill_session(&self, name: &str) {
        // `=name` matches exactly, never a prefix of another session's name.
        let _ = self.run(&["kill-session", "-t", &format!("={name}")]).await;
    }

    /// The sessions on moorline's tmux server that belong to `owner`.
    pub(crate) async fn list_sessions(&self, owner: &str) -> Vec<String> {
        let format = format!("#{{session_name}}\t#{{{OWNER_OPTION}}}");
        match self.run(&["list-sessions", "-F", &format]).await {
            Ok(out) => out
                .lines()
                .filter_map(|l| l.split_once('\t'))
                .filter(|(_, o)| *o == owner)
                .map(|(name, _)| name.to_owned())
                .collect(),
            // No server running means no sessions.
            Err(_) => Vec::new(),
        }
    }
}

/// The tmux user option naming the sessions directory a session belongs to.
const OWNER_OPTION: &str = "@moorline-sessions-dir";
