//! Process-group control: the one way moorline signals an agent and the tools it started.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Stops an agent and everything it started.
pub trait AgentControl: Send + Sync + fmt::Debug {
    /// Asks the agent and its children to exit (SIGTERM to the whole group).
    fn terminate(&self) -> io::Result<()>;
    /// Kills the agent and its children (SIGKILL to the whole group).
    fn kill(&self) -> io::Result<()>;
}

/// Signals a process group (agents start as leaders of their own group).
#[derive(Debug)]
pub struct GroupControl {
    pgid: Option<Pid>,
    /// Set once the group is known to be empty, so a recycled id is never signalled.
    gone: AtomicBool,
}

impl GroupControl {
    /// Control of the group led by `pid`.
    pub fn new(pid: Option<u32>) -> Self {
        Self {
            pgid: pid.and_then(|p| i32::try_from(p).ok()).map(Pid::from_raw),
            gone: AtomicBool::new(false),
        }
    }

    /// Control of the group whose leader's pid a keeper wrote to `pid_file` (none if it wrote
    /// none: then there is nothing to signal).
    pub fn from_pid_file(pid_file: &Path) -> Self {
        let pid = super::layout::read_pid(pid_file).and_then(|p| u32::try_from(p).ok());
        Self::new(pid)
    }

    /// Call once the leader is reaped.
    pub fn leader_exited(&self) {
        // Other members (the agent's tools) may still run; the group id stays reserved while
        // they do. If none are left, killpg fails with ESRCH, which we treat as "gone".
        if let Some(pgid) = self.pgid
            && killpg(pgid, None).is_err()
        {
            self.gone.store(true, Ordering::SeqCst);
        }
    }

    fn signal(&self, sig: Signal) -> io::Result<()> {
        let Some(pgid) = self.pgid else {
            return Ok(());
        };
        if self.gone.load(Ordering::SeqCst) {
            return Ok(());
        }
        tracing::debug!(
            pgid = pgid.as_raw(),
            signal = sig.as_str(),
            "signalling the agent's process group"
        );
        match killpg(pgid, sig) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::ESRCH) => {
                self.gone.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => Err(io::Error::from(e)),
        }
    }
}

impl AgentControl for GroupControl {
    fn terminate(&self) -> io::Result<()> {
        self.signal(Signal::SIGTERM)
    }

    fn kill(&self) -> io::Result<()> {
        self.signal(Signal::SIGKILL)
    }
}

/// Signals a container's init (tini, pid 1 of its pid namespace), known once the container
/// runs: SIGTERM is passed on by tini to the agent's process group, SIGKILL ends the whole
/// namespace. The init is the keeper's own child (see
/// [`KeeperSpec::detached_pid_file`](super::protocol::KeeperSpec::detached_pid_file)), so its
/// pid cannot be reused before the keeper reaps it, after which it is not signalled again.
#[derive(Debug, Default)]
pub(crate) struct InitControl {
    pid: std::sync::OnceLock<Pid>,
    gone: AtomicBool,
}

impl InitControl {
    /// The container's init is `pid`.
    pub(crate) fn started(&self, pid: Pid) {
        let _ = self.pid.set(pid);
    }

    /// The init has been reaped.
    pub(crate) fn reaped(&self) {
        self.gone.store(true, Ordering::SeqCst);
    }

    fn signal(&self, sig: Signal) -> io::Result<()> {
        let Some(&pid) = self.pid.get() else {
            return Ok(());
        };
        if self.gone.load(Ordering::SeqCst) {
            return Ok(());
        }
        match nix::sys::signal::kill(pid, sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}

impl AgentControl for InitControl {
    fn terminate(&self) -> io::Result<()> {
        self.signal(Signal::SIGTERM)
    }

    fn kill(&self) -> io::Result<()> {
        self.signal(Signal::SIGKILL)
    }
}

/// Kills the process group of an agent a crashed server left behind, if `pid` is still the
/// same process (same start time), never a recycled pid.
pub(crate) fn kill_orphan(pid: u32, start: u64) -> bool {
    if process_start_time(pid) != Some(start) {
        return false;
    }
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    killpg(Pid::from_raw(raw), Signal::SIGKILL).is_ok()
}

/// Start time of process `pid` in clock ticks since boot, from `/proc/<pid>/stat`.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past its last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Kills the network helper of a container's run (`net.pid`), if it is still that helper and
/// not a process that reused its pid. The helper normally leaves with its container; the keeper
/// and the runtime make sure.
pub(crate) fn stop_network_helper(run_dir: &super::layout::RunDir) {
    let pid_file = run_dir.network_pid();
    let Some(pid) = super::layout::read_pid(&pid_file) else {
        return;
    };
    if is_network_helper(pid, run_dir.path()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = std::fs::remove_file(pid_file);
}

/// Whether `pid` is the network helper of `run_dir` (`moorline net-helper RUN_DIR PID`).
fn is_network_helper(pid: i32, run_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.get(1) == Some(&&b"net-helper"[..])
        && args.get(2) == Some(&run_dir.as_os_str().as_encoded_bytes())
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_named_network_helper_is_recognised() {
        let tmp = tempfile::tempdir().expect("tmp");
        assert!(!super::is_network_helper(
            std::process::id() as i32,
            tmp.path()
        ));
        // No pid file: nothing to do, nothing killed.
        super::stop_network_helper(&crate::keeper::layout::RunDir::new(tmp.path()));
    }

    #[test]
    fn start_time_of_this_process_is_readable() {
        assert!(super::process_start_time(std::process::id()).is_some());
    }
}
