//! Whether a container's agent was killed for going over its memory limit.
//!
//! The kernel counts OOM kills per cgroup (`oom_kill` in `memory.events` on cgroup v2, in
//! `memory.oom_control` on v1), but runc removes the container's cgroup as soon as the
//! container is gone, counter and all. So the keeper watches the counter while the container
//! runs, woken by the kernel's notification (inotify on v2, an eventfd registered through
//! `cgroup.event_control` on v1), or by a short poll where neither can be had.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long the container's cgroup may take to appear.
const APPEAR: Duration = Duration::from_secs(60);
/// Poll interval when the kernel's notification cannot be had.
const POLL: Duration = Duration::from_millis(50);

/// Watches one container's cgroup from a thread of its own (the notifications are blocking
/// reads); see the module docs.
#[derive(Debug)]
pub(crate) struct OomWatch {
    counter: PathBuf,
    fired: Arc<AtomicBool>,
}

impl OomWatch {
    /// Starts watching the cgroup at `cgroup` (runc's `cgroupsPath`, such as `/moorline/ID`)
    /// once it appears.
    pub(crate) fn start(cgroup: &str) -> Self {
        let root = Path::new("/sys/fs/cgroup");
        let rel = cgroup.trim_start_matches('/');
        // A unified (v2) tree has cgroup.controllers at its root; otherwise the memory
        // controller has its own v1 hierarchy.
        let (dir, file) = if root.join("cgroup.controllers").exists() {
            (root.join(rel), "memory.events")
        } else {
            (root.join("memory").join(rel), "memory.oom_control")
        };
        let counter = dir.join(file);
        let fired = Arc::new(AtomicBool::new(false));
        let (c, f) = (counter.clone(), fired.clone());
        // Ends when the cgroup goes away (both notifications fire then too).
        let _ = std::thread::Builder::new()
            .name("oom-watch".into())
            .spawn(move || watch(&dir, &c, &f));
        Self { counter, fired }
    }

    /// Whether an OOM kill was seen in the container. Call once it has exited.
    pub(crate) fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst) || oom_kills(&self.counter).is_some_and(|n| n > 0)
    }
}

/// The `oom_kill` count in `file`; `None` if it cannot be read (the cgroup is gone).
fn oom_kills(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    Some(
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0),
    )
}

fn watch(dir: &Path, counter: &Path, fired: &AtomicBool) {
    let appear = Instant::now() + APPEAR;
    while !counter.exists() {
        if Instant::now() >= appear {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let notifier = Notifier::new(dir, counter);
    loop {
        match oom_kills(counter) {
            None => return,
            Some(n) if n > 0 => {
                fired.store(true, Ordering::SeqCst);
                return;
            }
            Some(_) => {}
        }
        match &notifier {
            Some(n) => {
                if !n.wait() {
                    return;
                }
                // v1 notifies before it kills (and the count may be read before it grows), or
                // when the cgroup is removed, after which nothing can be read. With the kill
                // enabled, an OOM notification while the cgroup lives means a kill.
                if matches!(n, Notifier::Event(..)) && oom_kills(counter).is_some() {
                    fired.store(true, Ordering::SeqCst);
                    return;
                }
            }
            None => std::thread::sleep(POLL),
        }
    }
}

/// A descriptor the kernel makes readable when the OOM counter may have changed, or the
/// cgroup was removed.
enum Notifier {
    /// cgroup v2: inotify on `memory.events`.
    Inotify(nix::sys::inotify::Inotify),
    /// cgroup v1: an eventfd registered for `memory.oom_control` (kept open with it).
    Event(
        nix::sys::eventfd::EventFd,
        #[allow(dead_code)] std::fs::File,
    ),
}

impl Notifier {
    fn new(dir: &Path, counter: &Path) -> Option<Self> {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        if counter.ends_with("memory.events") {
            let inotify = Inotify::init(InitFlags::IN_CLOEXEC).ok()?;
            inotify.add_watch(counter, AddWatchFlags::IN_MODIFY).ok()?;
            Some(Self::Inotify(inotify))
        } else {
            let event = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).ok()?;
            let file = std::fs::File::open(counter).ok()?;
            let line = format!("{} {}", event.as_raw_fd(), file.as_raw_fd());
            std::fs::write(dir.join("cgroup.event_control"), line).ok()?;
            Some(Self::Event(event, file))
        }
    }

    /// Blocks until the kernel says something changed. False if the descriptor failed.
    fn wait(&self) -> bool {
        match self {
            Self::Inotify(i) => i.read_events().is_ok(),
            Self::Event(e, _) => e.read().is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_read_from_either_file() {
        let dir = tempfile::tempdir().expect("dir");
        let v2 = dir.path().join("memory.events");
        std::fs::write(&v2, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").expect("write");
        assert_eq!(oom_kills(&v2), Some(1));
        let v1 = dir.path().join("memory.oom_control");
        std::fs::write(&v1, "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n").expect("write");
        assert_eq!(oom_kills(&v1), Some(0));
        assert_eq!(oom_kills(&dir.path().join("gone")), None);
    }
}
