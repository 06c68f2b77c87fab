//! Workspaces: the directory an agent works in, opened without trusting a path twice, and the
//! user the agent runs as.
//!
//! A session's working directory is a path, but paths change: a session whose agent can write
//! in a workspace root can replace another session's directory with a symlink to anywhere. So
//! every start resolves the directory again from a directory the operator configured (an
//! [`Anchor`]), with `openat2(2)`: beneath a workspace root (`RESOLVE_BENEATH`: symlinks that
//! stay inside the root are followed, nothing may lead out of it, magic links never), or, for
//! a directory outside any root (the instance's own `cwd`), from `/` following no symlink at
//! all. Whatever runs the agent then uses *what was opened*: the process and tmux runtimes
//! start it in `/proc/self/fd/N`, and a runc container gets the directory bind-mounted by a
//! hook ([`mount_main`]) that opens it again the same way inside the container's mount
//! namespace. A path is never looked up a second time.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

/// Where a workspace is found: a directory the operator configured, and a path beneath it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// A workspace root (or `/`), opened as configured: the operator's path is trusted.
    pub root: PathBuf,
    /// The workspace, relative to `root` (empty: the root itself).
    pub relative: PathBuf,
    /// Whether symlinks may be followed while they stay beneath `root` (workspace roots);
    /// otherwise no symlink is followed at all.
    pub symlinks: bool,
}

impl Anchor {
    /// A directory beneath a workspace root.
    pub fn beneath(root: &Path, path: &Path) -> Option<Self> {
        let relative = path.strip_prefix(root).ok()?;
        Some(Self {
            root: root.to_owned(),
            relative: relative.to_owned(),
            symlinks: true,
        })
    }

    /// An absolute path taken literally: no symlink anywhere in it.
    pub fn literal(path: &Path) -> Self {
        Self {
            root: PathBuf::from("/"),
            relative: path.strip_prefix("/").unwrap_or(path).to_owned(),
            symlinks: false,
        }
    }

    /// The path the workspace has, as far as anyone can tell from names alone.
    pub fn path(&self) -> PathBuf {
        self.root.join(&self.relative)
    }

    fn resolve(&self) -> ResolveFlag {
        if self.symlinks {
            ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS
        } else {
            ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS
        }
    }

    /// Opens the workspace (`O_PATH`), or says in words why it cannot be.
    pub fn open(&self) -> io::Result<OwnedFd> {
        let root = open_dir(&self.root)?;
        open_under(&root, &self.relative, self.resolve()).map_err(|e| self.explain(e))
    }

    /// Creates the missing directories of the workspace beneath its root. New directories
    /// belong to the owner of the directory they are made in, so a project created in
    /// alice's tree is alice's (and her agent runs as her, not as root).
    pub fn create(&self) -> io::Result<()> {
        let root = open_dir(&self.root)?;
        create_under(&root, &self.relative, self.resolve(), true)
            .map(drop)
            .map_err(|e| self.explain(e))
    }

    fn explain(&self, e: io::Error) -> io::Error {
        let what = match e.raw_os_error().map(Errno::from_raw) {
            Some(Errno::EXDEV) => format!(
                "leads outside {} (through a symlink or `..`); moorline refuses it",
                self.root.display()
            ),
            Some(Errno::ELOOP) if !self.symlinks => {
                "contains a symlink; a working directory outside the workspace roots is opened only without following symlinks".into()
            }
            Some(Errno::ELOOP) => "too many levels of symlinks, or a magic link".into(),
            Some(Errno::ENOTDIR) => "is not a directory".into(),
            Some(Errno::ENOSYS) => {
                "this kernel lacks openat2(2) (Linux 5.6 or later is needed to open workspaces safely)".into()
            }
            _ => return e,
        };
        io::Error::new(e.kind(), what)
    }
}

/// Opens a directory the operator configured, following its symlinks.
fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("{}: {e}", path.display()),
        )
    })
}

/// Opens directory `relative` beneath `dir` with `resolve`.
fn open_under(dir: &OwnedFd, relative: &Path, resolve: ResolveFlag) -> io::Result<OwnedFd> {
    let relative: &Path = if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(resolve);
    Ok(openat2(dir.as_fd(), relative, how)?)
}

/// Creates each missing component of `relative` beneath `dir`, resolving every step with
/// `resolve` (so no step leaves `dir`), and returns the last one opened. With `inherit_owner`
/// (and the right to), a new directory gets the owner and group of its parent.
fn create_under(
    dir: &OwnedFd,
    relative: &Path,
    resolve: ResolveFlag,
    inherit_owner: bool,
) -> io::Result<OwnedFd> {
    let mut done = PathBuf::new();
    let mut parent = open_under(dir, &done, resolve)?;
    for part in relative.components() {
        let name: &OsStr = match part {
            Component::Normal(name) => name,
            Component::CurDir => continue,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a path to create must not contain `..` or be absolute",
                ));
            }
        };
        done.push(name);
        match open_under(dir, &done, resolve) {
            Ok(fd) => parent = fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match nix::sys::stat::mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o755))
                {
                    Ok(()) => {
                        if inherit_owner && nix::unistd::geteuid().is_root() {
                            let st = nix::sys::stat::fstat(parent.as_fd())?;
                            nix::unistd::fchownat(
                                parent.as_fd(),
                                name,
                                Some(nix::unistd::Uid::from_raw(st.st_uid)),
                                Some(nix::unistd::Gid::from_raw(st.st_gid)),
                                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                            )?;
                        }
                    }
                    Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                parent = open_under(dir, &done, resolve)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(parent)
}

/// The path through which a process reaches what `fd` opened: a magic link that `chdir(2)`
/// and `mount(2)` follow to the very directory, whatever its name has become since.
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Owner and group of an opened directory.
pub fn owner(fd: &OwnedFd) -> io::Result<(u32, u32)> {
    let st = nix::sys::stat::fstat(fd.as_fd())?;
    Ok((st.st_uid, st.st_gid))
}

/// Who runs an agent whose workspace is owned by `owner`, when moorline runs as root: the
/// owner when that is not root, else `agent_user`; never uid or gid 0. When moorline is not
/// root it cannot choose (`Ok(None)`: the agent runs as moorline's user; in a rootless
/// container that user appears as uid 0, mapped to no host privilege).
pub fn agent_identity(
    owner: (u32, u32),
    agent_user: Option<(u32, u32)>,
    server_is_root: bool,
) -> Result<Option<(u32, u32)>, String> {
    if !server_is_root {
        return Ok(None);
    }
    let (uid, gid) = owner;
    if uid != 0 {
        let gid = if gid != 0 {
            gid
        } else {
            // A user's file in group root: the agent gets the user's own group instead.
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| u.gid.as_raw())
                .filter(|g| *g != 0)
                .or(agent_user.map(|(_, g)| g))
                .ok_or_else(|| {
                    format!(
                        "belongs to uid {uid} in group root, and uid {uid} has no other group; \
                         moorline never runs an agent with gid 0: change the directory's group \
                         or set [runtime] agent_user"
                    )
                })?
        };
        return Ok(Some((uid, gid)));
    }
    agent_user.map(Some).ok_or_else(|| {
        "belongs to root, and moorline never runs an agent as root: set [runtime] agent_user \
         (an unprivileged user, for example \"moorline-agent\") or give the directory to the \
         user whose agent works there"
            .to_owned()
    })
}

/// `moorline mount-workspace`: a runc `createContainer` hook. It runs in the container's mount
/// namespace before `pivot_root`, opens the workspace beneath its anchor exactly as the server
/// checked it, and bind-mounts what it opened at the workspace's path inside the container's
/// root filesystem (resolved as the container will see it, creating missing directories).
pub fn mount_main(anchor_json: &str, rootfs: &Path) -> ExitCode {
    match mount(anchor_json, rootfs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moorline mount-workspace: {e}");
            ExitCode::from(1)
        }
    }
}

fn mount(anchor_json: &str, rootfs: &Path) -> io::Result<()> {
    use nix::mount::MsFlags;
    let anchor: Anchor = serde_json::from_str(anchor_json)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let source = anchor
        .open()
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", anchor.path().display())))?;
    let inside = anchor.path();
    let (Some(parent), Some(name)) = (inside.parent(), inside.file_name()) else {
        return Err(io::Error::other("the workspace / is not mounted"));
    };
    let rootfs = open_dir(rootfs)?;
    // The mount point's parent, resolved as the container will see it.
    let parent_rel = parent.strip_prefix("/").unwrap_or(parent);
    let parent = create_under(&rootfs, parent_rel, ResolveFlag::RESOLVE_IN_ROOT, false)?;
    let single = ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS;
    match nix::sys::stat::mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let target = open_under(&parent, Path::new(name), single)?;
    nix::mount::mount(
        Some(&fd_path(&source)),
        &fd_path(&target),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    // Bind flags only take effect on a remount of the new mount, reached from the same parent.
    let mounted = open_under(&parent, Path::new(name), single)?;
    nix::mount::mount(
        None::<&str>,
        &fd_path(&mounted),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_out_of_the_root_is_refused_and_one_inside_is_followed() {
        let root = tempfile::tempdir().expect("root");
        let outside = tempfile::tempdir().expect("outside");
        std::fs::create_dir(root.path().join("proj")).expect("proj");
        std::os::unix::fs::symlink(outside.path(), root.path().join("out")).expect("link");
        std::os::unix::fs::symlink("proj", root.path().join("in")).expect("link");
        let at = |rel: &str| Anchor::beneath(root.path(), &root.path().join(rel)).expect("under");
        assert!(at("proj").open().is_ok());
        assert!(at("in").open().is_ok());
        let err = at("out").open().expect_err("escapes");
        assert!(err.to_string().contains("leads outside"), "{err}");
        assert!(at("missing").open().is_err());
        // Taken literally, not even a symlink inside is followed.
        let err = Anchor::literal(&root.path().join("in"))
            .open()
            .expect_err("symlink");
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(Anchor::literal(&root.path().join("proj")).open().is_ok());
    }

    #[test]
    fn directories_are_created_beneath_the_root_only() {
        let root = tempfile::tempdir().expect("root");
        let outside = tempfile::tempdir().expect("outside");
        std::os::unix::fs::symlink(outside.path(), root.path().join("out")).expect("link");
        let at = |rel: &str| Anchor::beneath(root.path(), &root.path().join(rel)).expect("under");
        at("a/b/c").create().expect("created");
        assert!(root.path().join("a/b/c").is_dir());
        assert!(at("out/x").create().is_err());
        assert!(!outside.path().join("x").exists());
    }

    #[test]
    fn no_agent_runs_as_root() {
        assert_eq!(agent_identity((0, 0), None, false), Ok(None));
        assert_eq!(
            agent_identity((1000, 100), None, true),
            Ok(Some((1000, 100)))
        );
        assert_eq!(
            agent_identity((0, 0), Some((999, 999)), true),
            Ok(Some((999, 999)))
        );
        let err = agent_identity((0, 0), None, true).expect_err("refused");
        assert!(err.contains("agent_user"), "{err}");
    }
}
