//! Reading a session's workspace for clients, read-only and never outside it: every path is
//! opened beneath the workspace with `openat2(2)` (`RESOLVE_BENEATH`, no symlinks at all), so
//! neither `..` nor a symlink an agent planted leads anywhere else.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag, fstat};

use crate::wire::{FileEntry, FileKind};

/// Why a path could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FileError {
    /// The path would leave the workspace (`..`, an absolute path, a symlink).
    #[error("{0}: outside the session's workspace (absolute paths, '..' and symlinks are refused)")]
    Escapes(String),
    /// Nothing there.
    #[error("{0}: no such file or directory")]
    NotFound(String),
    /// A file larger than the limit.
    #[error("{path}: {size} bytes exceeds limits.max_file_bytes ({limit})")]
    TooLarge {
        /// The path.
        path: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Anything else.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// What a path holds.
#[derive(Debug)]
pub(crate) enum Found {
    /// A directory's entries, sorted by name.
    Dir(Vec<FileEntry>),
    /// A file's contents.
    File(Vec<u8>),
}

/// Reads `relative` (empty: the workspace itself) beneath `root`: a directory's listing or
/// a file's contents of at most `max_bytes`.
pub(crate) fn read(root: &Path, relative: &str, max_bytes: u64) -> Result<Found, FileError> {
    let rel = Path::new(relative.trim_start_matches("./"));
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(FileError::Escapes(relative.to_owned()));
    }
    // The workspace's own path was resolved when the session was made: no symlink in it now.
    let root_fd = open(None, root, ResolveFlag::RESOLVE_NO_SYMLINKS).map_err(FileError::Io)?;
    let target = if rel.as_os_str().is_empty() {
        open(Some(&root_fd), Path::new("."), ResolveFlag::RESOLVE_BENEATH)?
    } else {
        let how = ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS;
        open(Some(&root_fd), rel, how).map_err(|e| match e.raw_os_error() {
            Some(code) if code == nix::libc::ENOENT || code == nix::libc::ENOTDIR => {
                FileError::NotFound(relative.to_owned())
            }
            Some(code) if code == nix::libc::EXDEV || code == nix::libc::ELOOP => {
                FileError::Escapes(relative.to_owned())
            }
            _ => FileError::Io(e),
        })?
    };
    let stat = fstat(&target).map_err(io::Error::from)?;
    let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    if kind == SFlag::S_IFDIR {
        // Listed through the descriptor just opened (procfs hands back that very directory),
        // never by its path again.
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/self/fd/{}", target.as_raw_fd()))? {
            let entry = entry?;
            let kind = match entry.file_type() {
                Ok(t) if t.is_dir() => FileKind::Dir,
                Ok(t) if t.is_file() => FileKind::File,
                Ok(t) if t.is_symlink() => FileKind::Symlink,
                _ => FileKind::Other,
            };
            entries.push(FileEntry {
                name: entry.file_name().to_string_lossy().into_owned(),
                kind,
                size: None,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        // Sizes of files, read beneath the same root (never through a symlink).
        for e in entries.iter_mut().filter(|e| e.kind == FileKind::File) {
            let path = rel.join(&e.name);
            if let Ok(fd) = open(
                Some(&root_fd),
                &path,
                ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS,
            ) {
                e.size = fstat(&fd).ok().map(|s| s.st_size as u64);
            }
        }
        return Ok(Found::Dir(entries));
    }
    if kind != SFlag::S_IFREG {
        return Err(FileError::NotFound(relative.to_owned()));
    }
    let size = stat.st_size as u64;
    if size > max_bytes {
        return Err(FileError::TooLarge {
            path: relative.to_owned(),
            size,
            limit: max_bytes,
        });
    }
    let mut body = Vec::with_capacity(size as usize);
    std::fs::File::from(target)
        .take(max_bytes + 1)
        .read_to_end(&mut body)?;
    if body.len() as u64 > max_bytes {
        return Err(FileError::TooLarge {
            path: relative.to_owned(),
            size: body.len() as u64,
            limit: max_bytes,
        });
    }
    Ok(Found::File(body))
}

/// Opens `path` (beneath `dir` with `resolve`, or absolute), for reading.
fn open(dir: Option<&OwnedFd>, path: &Path, resolve: ResolveFlag) -> io::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .mode(Mode::empty())
        .resolve(resolve);
    match dir {
        Some(dir) => openat2(dir, path, how),
        None => openat2(nix::fcntl::AT_FDCWD, path, how),
    }
    .map_err(io::Error::from)
}
