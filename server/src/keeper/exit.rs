//! How an agent ended, as the keeper records it and the server reports it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How an agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Number of the signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Why it ended, when more is known than its code or signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ExitReason>,
}

/// Why an agent ended, beyond its exit code or signal (reported as `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The kernel killed it for going over its container's `memory_limit`.
    OutOfMemory,
    /// Its session keeper died: how the agent ended is unknown.
    KeeperLost,
}

impl ExitReason {
    /// The name clients see.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::OutOfMemory => "out_of_memory",
            ExitReason::KeeperLost => "keeper_lost",
        }
    }
}

impl ExitInfo {
    /// How an agent ended when nobody could see it end (its exit status was lost).
    pub const UNKNOWN: ExitInfo = ExitInfo {
        code: None,
        signal: None,
        reason: None,
    };

    /// The same exit, with a reason.
    pub fn because(self, reason: ExitReason) -> Self {
        Self {
            reason: Some(reason),
            ..self
        }
    }

    /// A clean exit: code 0.
    pub fn is_success(&self) -> bool {
        self.code == Some(0)
    }

    /// How a container ended, from the exit code of `runc run`: the container's init (tini)
    /// exits with 128 + n when the agent was killed by signal n, and runc does the same when
    /// init itself is killed. Such codes are read as signal deaths, as shells read them; a
    /// program that really calls `exit(137)` cannot be told apart and is reported as killed
    /// by SIGKILL.
    pub fn from_container_status(status: std::process::ExitStatus) -> Self {
        let info = Self::from(status);
        match info.code {
            Some(code @ 129..=192) => Self {
                code: None,
                signal: Some(code - 128),
                ..info
            },
            _ => info,
        }
    }

    /// The signal's name (`SIGKILL`), as amarre reports it.
    pub fn signal_name(&self) -> Option<String> {
        let sig = self.signal?;
        Some(match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => s.as_str().to_owned(),
            Err(_) => format!("SIG{sig}"),
        })
    }
}

impl From<std::process::ExitStatus> for ExitInfo {
    fn from(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Self {
            code: status.code(),
            signal: status.signal(),
            reason: None,
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal_name()) {
            (Some(code), _) => write!(f, "exit code {code}")?,
            (None, Some(sig)) => write!(f, "killed by {sig}")?,
            (None, None) => f.write_str("unknown exit")?,
        }
        match self.reason {
            Some(ExitReason::OutOfMemory) => f.write_str(" (out of memory)"),
            Some(ExitReason::KeeperLost) => f.write_str(" (its keeper died)"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::ExitInfo;

    #[test]
    fn a_container_exit_code_above_128_is_the_signal_that_ended_the_agent() {
        // Wait statuses: a normal exit with code c is c << 8; a death by signal n is n.
        let container = |raw| ExitInfo::from_container_status(ExitStatus::from_raw(raw));
        let killed = container(137 << 8);
        assert_eq!((killed.code, killed.signal), (None, Some(9)));
        assert_eq!(killed.signal_name().as_deref(), Some("SIGKILL"));
        assert_eq!(
            container(143 << 8).signal_name().as_deref(),
            Some("SIGTERM")
        );
        for code in [0, 1, 127, 128, 193, 255] {
            let info = container(code << 8);
            assert_eq!((info.code, info.signal), (Some(code), None), "{code}");
        }
        // runc itself killed by a signal keeps that signal.
        assert_eq!(container(9).signal, Some(9));
        // Outside containers, codes are what they are.
        let plain = ExitInfo::from(ExitStatus::from_raw(137 << 8));
        assert_eq!((plain.code, plain.signal), (Some(137), None));
    }
}
