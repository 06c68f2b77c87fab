//! What the server and a keeper say to each other: the spec file the keeper runs from, the
//! bytes on its socket, and the exit file it leaves.
//!
//! Server to keeper: client lines, each ending in `\n`; a line starting with [`USER_MARKER`]
//! names the client whose lines follow. Keeper to server, a stream of [`Message`]s, each one
//! tag byte and its body:
//!
//! - [`LINES`]: lines the keeper has just appended to the journal, with their first sequence
//!   number and the journal index changes the append made (see [`encode_lines_header`]): the server
//!   publishes them without reading the journal back;
//! - [`DOORBELL`]: the journal grew by lines not sent (nobody was connected, or the server fell
//!   behind): the server reads them from the journal;
//! - [`HELD`], [`FLOWING`], [`LOST`] (+ 8 bytes, the count): the journal refused a write, takes
//!   writes again, or held output was given up;
//! - [`RESOLUTION`] + JSON + `\n`: a settled approval, for the audit log;
//! - [`PENDING`]: the pending approvals file was rewritten (the server announces new requests).

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use moorline_adapters::pipeline::{ApprovalPolicy, Resolution};
use serde::{Deserialize, Serialize};

use super::exit::ExitInfo;
use super::journal::{Checkpoint, IndexChange, Segment};
use super::layout::RunDir;

/// First byte of a server-to-keeper line that names the client whose lines follow (the rest
/// of the line, UTF-8). Client lines are UTF-8 (WebSocket text, or binary frames checked to
/// be UTF-8), and 0xFF never occurs in UTF-8: no client line can be taken for a marker.
pub(crate) const USER_MARKER: u8 = 0xFF;
/// Keeper-to-server byte: the journal has grown by lines the server must read from it.
pub(crate) const DOORBELL: u8 = 1;
/// Keeper-to-server byte: the journal refused a write; output is held.
pub(crate) const HELD: u8 = 2;
/// Keeper-to-server byte: the journal takes output again.
pub(crate) const FLOWING: u8 = 3;
/// Keeper-to-server byte, then a little-endian `u64`: held output lines were given up.
pub(crate) const LOST: u8 = 4;
/// Keeper-to-server byte that starts a settled approval: a JSON [`Resolution`] up to `\n`.
pub(crate) const RESOLUTION: u8 = 5;
/// Keeper-to-server byte that starts a batch of journaled lines ([`encode_lines_header`]).
pub(crate) const LINES: u8 = 6;
/// Keeper-to-server byte: the session's pending approvals file was rewritten.
pub(crate) const PENDING: u8 = 7;

/// The marker line (with its newline) announcing that `user` sends the lines that follow.
pub(crate) fn user_marker(user: &str) -> Vec<u8> {
    let mut line = Vec::with_capacity(user.len() + 2);
    line.push(USER_MARKER);
    // Identities never hold a newline; make sure one could not end the marker early.
    line.extend(user.bytes().filter(|&b| b != b'\n'));
    line.push(b'\n');
    line
}

/// What a keeper runs and where it writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KeeperSpec {
    /// The session's id, for messages.
    pub session_id: String,
    /// Program to start (the agent, or `runc`).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its complete environment (nothing else is inherited).
    pub env: BTreeMap<String, String>,
    /// Its working directory, when it is not a workspace (runc runs in the run directory).
    pub cwd: PathBuf,
    /// The agent's workspace (the `tmux` runtime): opened beneath its anchor at start, and the
    /// agent started in what was opened.
    #[serde(default)]
    pub workspace: Option<super::workspace::Anchor>,
    /// The agent's user and group (the `tmux` runtime, as root).
    #[serde(default)]
    pub user: Option<(u32, u32)>,
    /// The session journal.
    pub journal_dir: PathBuf,
    /// The journal's byte budget.
    pub journal_max_bytes: u64,
    /// The journal's segment size.
    pub journal_segment_bytes: u64,
    /// Longest output line forwarded.
    pub max_line: usize,
    /// Capacity of the agent's stdin and stdout pipes (0: the system's default).
    #[serde(default)]
    pub pipe_bytes: usize,
    /// Longest input line accepted from the server.
    pub max_input_line: usize,
    /// The session's stderr log.
    pub stderr_file: PathBuf,
    /// After the agent exits, how long its leftovers get to close its stdout (ms).
    pub exit_drain_ms: u64,
    /// The container's cgroup (runc's `cgroupsPath`) when it has a memory limit: an agent
    /// killed for going over it is reported as out of memory.
    #[serde(default)]
    pub oom_cgroup: Option<String>,
    /// After the agent exits, how long output the journal cannot take is still held (ms).
    #[serde(default = "default_hold_after_exit_ms")]
    pub hold_after_exit_ms: u64,
    /// The adapter, which decides how lines are translated.
    pub adapter: moorline_adapters::AdapterConfig,
    /// The approval rules.
    pub approvals: ApprovalPolicy,
    /// Where pending approval requests are written for the server.
    pub pending_file: PathBuf,
    /// The session's instance, named in events (empty in specs of older servers).
    #[serde(default)]
    pub instance_id: String,
    /// Whether the server sends [`USER_MARKER`] lines (keepers of older servers did not
    /// understand them, and a server adopting such a keeper must not send them).
    #[serde(default)]
    pub user_markers: bool,
    /// The program is `runc run`, whose exit codes above 128 stand for the signal that ended
    /// the container's agent ([`ExitInfo::from_container_status`]).
    #[serde(default)]
    pub container: bool,
    /// The program is `runc run --detach --pid-file FILE`: it returns once the container runs,
    /// leaving the container's stdio on the keeper's pipes (no copying through runc), and
    /// the keeper, a child subreaper, takes over the container's init (whose pid runc writes
    /// to FILE) as its own child and waits for it. `None` (specs of older servers): the
    /// program runs as long as the agent.
    #[serde(default)]
    pub detached_pid_file: Option<PathBuf>,
}

/// Reads the spec of a run directory, if there is a valid one.
pub(crate) fn read_spec(run_dir: &RunDir) -> Option<KeeperSpec> {
    serde_json::from_slice(&std::fs::read(run_dir.spec()).ok()?).ok()
}

/// Reads the spec of a run directory, saying what is wrong with it.
pub(crate) fn load_spec(run_dir: &RunDir) -> io::Result<KeeperSpec> {
    serde_json::from_slice(&std::fs::read(run_dir.spec())?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes the spec (it holds the agent's environment: owner only).
pub(crate) fn write_spec(run_dir: &RunDir, spec: &KeeperSpec) -> io::Result<()> {
    let body = serde_json::to_vec_pretty(spec).map_err(io::Error::other)?;
    super::fsio::write_private(&run_dir.spec(), &body)
}

fn default_hold_after_exit_ms() -> u64 {
    10_000
}

/// Reads the exit file, if the agent's end was recorded.
pub(crate) fn read_exit(run_dir: &RunDir) -> Option<ExitInfo> {
    serde_json::from_slice(&std::fs::read(run_dir.exit()).ok()?).ok()
}

/// Writes the exit file atomically.
pub(crate) fn write_exit(run_dir: &RunDir, exit: ExitInfo) -> io::Result<()> {
    let body = serde_json::to_vec(&exit).map_err(io::Error::other)?;
    super::fsio::write_private(&run_dir.exit(), &body)
}

/// Appends the head of a [`LINES`] message: tag, first sequence number (`u64`), number of
/// index changes (`u32`), the changes (25 bytes each), payload length (`u32`); the lines follow,
/// each with its `\n` (exactly as in the journal), written by the sender from where they already
/// are. All integers little-endian.
pub(crate) fn encode_lines_header(
    out: &mut Vec<u8>,
    first_seq: u64,
    changes: &[IndexChange],
    payload_len: usize,
) {
    out.reserve(1 + 8 + 4 + changes.len() * 25 + 4);
    out.push(LINES);
    out.put_u64_le(first_seq);
    out.put_u32_le(changes.len() as u32);
    for change in changes {
        let (tag, a, b, c) = match *change {
            IndexChange::Checkpoint(cp) => (0u8, cp.seq, cp.segment, cp.offset),
            IndexChange::NewSegment(s) => (1, s.first_seq, s.bytes, 0),
            IndexChange::Grow { segment, bytes } => (2, segment, bytes, 0),
            IndexChange::DropSegment(first) => (3, first, 0, 0),
        };
        out.push(tag);
        out.put_u64_le(a);
        out.put_u64_le(b);
        out.put_u64_le(c);
    }
    out.put_u32_le(payload_len as u32);
}

/// What a keeper tells the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    /// Journaled lines, from `first_seq` on (each followed by `\n` in `lines`).
    Lines {
        /// Sequence number of the first line.
        first_seq: u64,
        /// The index changes their append made.
        changes: Vec<IndexChange>,
        /// The lines, each followed by `\n`.
        lines: Bytes,
    },
    /// The journal grew by lines the server must read from it.
    Grew,
    /// The journal refused a write: the agent's output is held until it can be written.
    Held,
    /// The journal takes output again.
    Flowing,
    /// Held output was given up (the agent exited and the journal stayed unwritable).
    Lost(u64),
    /// An approval request was settled.
    Resolved(Resolution),
    /// The pending approvals file was rewritten.
    Pending,
}

/// Why the keeper's stream cannot be read any further.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    /// A message announced a size no keeper writes.
    #[error("keeper message too large ({0} bytes)")]
    TooLarge(usize),
    /// An index change of an unknown kind.
    #[error("unknown journal index change {0}")]
    UnknownChange(u8),
}

/// Largest [`LINES`] payload accepted (a keeper sends at most one read of stdout at once).
const MAX_PAYLOAD: usize = 64 << 20;
/// Longest settled-approval record; a record is a few hundred bytes.
const MAX_RECORD: usize = 64 * 1024;

/// Splits the keeper's byte stream into [`Message`]s. Bytes other than the tags are read as
/// [`Message::Grew`], as keepers of older servers meant them.
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    /// The buffer to read into.
    pub(crate) fn buffer(&mut self) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < 64 * 1024 {
            self.buf.reserve(256 * 1024);
        }
        &mut self.buf
    }

    /// The next whole message, if one has arrived.
    pub(crate) fn decode(&mut self) -> Result<Option<Message>, DecodeError> {
        loop {
            let Some(&tag) = self.buf.first() else {
                return Ok(None);
            };
            match tag {
                LINES => return self.lines(),
                HELD | FLOWING | DOORBELL | PENDING => {
                    self.buf.advance(1);
                    return Ok(Some(match tag {
                        HELD => Message::Held,
                        FLOWING => Message::Flowing,
                        PENDING => Message::Pending,
                        _ => Message::Grew,
                    }));
                }
                LOST => {
                    if self.buf.len() < 9 {
                        return Ok(None);
                    }
                    self.buf.advance(1);
                    return Ok(Some(Message::Lost(self.buf.get_u64_le())));
                }
                RESOLUTION => {
                    let Some(end) = memchr::memchr(b'\n', &self.buf) else {
                        if self.buf.len() > MAX_RECORD {
                            return Err(DecodeError::TooLarge(self.buf.len()));
                        }
                        return Ok(None);
                    };
                    let record = self.buf.split_to(end + 1);
                    // A record that does not parse is skipped: it only feeds the audit log.
                    if let Ok(r) = serde_json::from_slice(&record[1..end]) {
                        return Ok(Some(Message::Resolved(r)));
                    }
                }
                _ => {
                    self.buf.advance(1);
                    return Ok(Some(Message::Grew));
                }
            }
        }
    }

    fn lines(&mut self) -> Result<Option<Message>, DecodeError> {
        let b = &self.buf[..];
        if b.len() < 13 {
            return Ok(None);
        }
        let n_changes = u32::from_le_bytes([b[9], b[10], b[11], b[12]]) as usize;
        let head = 13 + n_changes * 25;
        if head + 4 > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge(head));
        }
        if b.len() < head + 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([b[head], b[head + 1], b[head + 2], b[head + 3]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge(len));
        }
        if b.len() < head + 4 + len {
            self.buf.reserve(head + 4 + len - b.len());
            return Ok(None);
        }
        let mut msg = self.buf.split_to(head + 4 + len);
        msg.advance(1);
        let first_seq = msg.get_u64_le();
        let _ = msg.get_u32_le();
        let mut changes = Vec::with_capacity(n_changes);
        for _ in 0..n_changes {
            let tag = msg.get_u8();
            let (a, b, c) = (msg.get_u64_le(), msg.get_u64_le(), msg.get_u64_le());
            changes.push(match tag {
                0 => IndexChange::Checkpoint(Checkpoint {
                    seq: a,
                    segment: b,
                    offset: c,
                }),
                1 => IndexChange::NewSegment(Segment {
                    first_seq: a,
                    bytes: b,
                }),
                2 => IndexChange::Grow {
                    segment: a,
                    bytes: b,
                },
                3 => IndexChange::DropSegment(a),
                other => return Err(DecodeError::UnknownChange(other)),
            });
        }
        msg.advance(4);
        Ok(Some(Message::Lines {
            first_seq,
            changes,
            lines: msg.freeze(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole [`LINES`] message: its head, then the lines.
    fn encode_lines(out: &mut Vec<u8>, first_seq: u64, changes: &[IndexChange], lines: &[u8]) {
        encode_lines_header(out, first_seq, changes, lines.len());
        out.extend_from_slice(lines);
    }

    #[test]
    fn messages_survive_any_split_of_the_stream() {
        let mut stream = Vec::new();
        let changes = [
            IndexChange::NewSegment(Segment {
                first_seq: 1,
                bytes: 0,
            }),
            IndexChange::Checkpoint(Checkpoint {
                seq: 1,
                segment: 1,
                offset: 0,
            }),
            IndexChange::Grow {
                segment: 1,
                bytes: 8,
            },
            IndexChange::DropSegment(7),
        ];
        encode_lines(&mut stream, 1, &changes, b"{}\n{\"a\"}\n");
        stream.push(HELD);
        stream.push(LOST);
        stream.extend_from_slice(&3u64.to_le_bytes());
        stream.push(FLOWING);
        stream.push(DOORBELL);
        let want = vec![
            Message::Lines {
                first_seq: 1,
                changes: changes.to_vec(),
                lines: Bytes::from_static(b"{}\n{\"a\"}\n"),
            },
            Message::Held,
            Message::Lost(3),
            Message::Flowing,
            Message::Grew,
        ];
        for chunk in [1, 2, 7, 13, stream.len()] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                d.buffer().extend_from_slice(piece);
                while let Some(m) = d.decode().expect("decode") {
                    got.push(m);
                }
            }
            assert_eq!(got, want, "chunks of {chunk}");
        }
    }
}
