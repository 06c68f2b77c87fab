//! Starting an agent as another user without forking the server.
//!
//! `Command::uid` makes std `fork` the whole calling process and switch users in the child:
//! for the server (several threads, tens of MiB mapped) the page-table copy and its teardown at
//! `exec` cost about 250 µs per agent on the project's VM, against `posix_spawn`'s vfork, which
//! copies nothing but cannot switch users. Linux keeps credentials per thread (glibc's `setuid`
//! is process-wide only because it signals every thread to switch too; the system calls
//! themselves are not), so one thread can take on the agent's identity, `posix_spawn` the
//! program (the child starts with the credentials of the thread that made it) and take back its
//! own. `execve` then sets the child's saved ids to its effective ones and clears its
//! capabilities, since none of its ids is root: the agent cannot switch back.
//!
//! Nothing else in the server runs as the agent: [`ThreadIdentity`] cannot leave its thread
//! (it is neither `Send` nor held across an `.await`, which would make the future `!Send`), and
//! a thread that cannot take back its own identity aborts the server rather than run on as
//! someone else. A side effect of the switch: the kernel marks the server's memory
//! non-dumpable, so it leaves no core dump, which suits a process holding tokens.

use std::io;
use std::marker::PhantomData;

use nix::unistd::{ResGid, ResUid, getresgid, getresuid};
use rustix::process::{Gid, Uid, getgroups};
use rustix::thread::{set_thread_groups, set_thread_res_gid, set_thread_res_uid};

/// The calling thread running as another user until this is dropped.
#[derive(Debug)]
#[must_use = "the thread takes back its own identity when this is dropped"]
pub(crate) struct ThreadIdentity {
    uids: ResUid,
    gids: ResGid,
    groups: Vec<Gid>,
    /// How many of the three switches (groups, group, user) were made: only those are undone.
    switched: u8,
    /// Credentials belong to the thread: the guard must be dropped where it was made.
    _this_thread: PhantomData<*const ()>,
}

impl ThreadIdentity {
    /// The calling thread takes on `uid` and `gid` with no supplementary groups, keeping only
    /// its saved user id so that it can return. Needs `CAP_SETUID` and `CAP_SETGID` (root).
    pub(crate) fn assume(uid: u32, gid: u32) -> io::Result<Self> {
        let mut own = Self {
            uids: getresuid()?,
            gids: getresgid()?,
            groups: getgroups()?,
            switched: 0,
            _this_thread: PhantomData,
        };
        // Groups and group first: both need the capabilities that switching the user drops.
        // On an error, dropping `own` undoes what was done.
        set_thread_groups(&[])?;
        own.switched = 1;
        let gid = Gid::from_raw(gid);
        set_thread_res_gid(gid, gid, gid)?;
        own.switched = 2;
        let uid = Uid::from_raw(uid);
        set_thread_res_uid(uid, uid, None)?;
        own.switched = 3;
        Ok(own)
    }

    fn restore(&self) -> io::Result<()> {
        let (uids, gids) = (&self.uids, &self.gids);
        // The user first: it brings back the capabilities the rest needs.
        if self.switched >= 3 {
            set_thread_res_uid(
                Uid::from_raw(uids.real.as_raw()),
                Uid::from_raw(uids.effective.as_raw()),
                Uid::from_raw(uids.saved.as_raw()),
            )?;
        }
        if self.switched >= 2 {
            set_thread_res_gid(
                Gid::from_raw(gids.real.as_raw()),
                Gid::from_raw(gids.effective.as_raw()),
                Gid::from_raw(gids.saved.as_raw()),
            )?;
        }
        if self.switched >= 1 {
            set_thread_groups(&self.groups)?;
        }
        Ok(())
    }
}

impl Drop for ThreadIdentity {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            // A server thread left running as an agent's user must not go on.
            eprintln!("moorline: a thread cannot take back its own identity ({e}); aborting");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (u32, u32, u32, usize) {
        let u = getresuid().expect("uids");
        let g = getresgid().expect("gids");
        (
            u.effective.as_raw(),
            u.saved.as_raw(),
            g.effective.as_raw(),
            getgroups().expect("groups").len(),
        )
    }

    #[test]
    fn one_thread_takes_on_a_user_and_returns() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        // A thread of its own, so no other test sees the switch.
        std::thread::spawn(|| {
            let before = ids();
            let other = std::thread::spawn(ids);
            {
                let _as = ThreadIdentity::assume(65534, 65533).expect("assume");
                let (euid, suid, egid, groups) = ids();
                assert_eq!((euid, egid, groups), (65534, 65533, 0));
                assert_eq!(suid, before.1, "the saved id stays, to return");
                // Files are made as the user.
                let dir = tempfile::tempdir_in("/tmp").expect("dir");
                std::fs::set_permissions(
                    dir.path(),
                    std::os::unix::fs::PermissionsExt::from_mode(0o777),
                )
                .expect("chmod");
                let file = dir.path().join("f");
                std::fs::write(&file, "x").expect("write");
                let meta = std::fs::metadata(&file).expect("meta");
                assert_eq!(
                    std::os::unix::fs::MetadataExt::uid(&meta),
                    65534,
                    "made as the user"
                );
            }
            assert_eq!(ids(), before, "back to its own identity");
            assert_eq!(other.join().expect("other"), before);
        })
        .join()
        .expect("thread");
        // The rest of the process never changed.
        assert!(nix::unistd::geteuid().is_root());
    }

    #[test]
    fn a_program_started_as_the_user_cannot_switch_back() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        std::thread::spawn(|| {
            let output = {
                let _as = ThreadIdentity::assume(65534, 65534).expect("assume");
                std::process::Command::new("/bin/sh")
                    .args([
                        "-c",
                        "grep -E '^(Uid|Gid|Groups|CapPrm|CapEff|CapAmb):' /proc/self/status",
                    ])
                    .env_clear()
                    .output()
                    .expect("run")
            };
            let status = String::from_utf8_lossy(&output.stdout).replace('\t', " ");
            for line in [
                "Uid: 65534 65534 65534 65534",
                "Gid: 65534 65534 65534 65534",
                "CapPrm: 0000000000000000",
                "CapEff: 0000000000000000",
                "CapAmb: 0000000000000000",
            ] {
                assert!(status.contains(line), "{line:?} in {status}");
            }
            let groups = status
                .lines()
                .find(|l| l.starts_with("Groups:"))
                .expect("groups line");
            assert_eq!(groups.trim(), "Groups:", "no supplementary groups");
        })
        .join()
        .expect("thread");
    }
}
