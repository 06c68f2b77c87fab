//! File writes shared by sessions and runtimes.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `body` to `path` atomically (a temporary file beside it, then a rename), readable
/// only by its owner: readers never see half a file, and the files hold environments, approval
/// requests and exit statuses that are nobody else's business.
pub(crate) fn write_private(path: &Path, body: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(body)?;
    drop(file);
    std::fs::rename(tmp, path)
}
