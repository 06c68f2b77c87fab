//! The durable, per-session output log.
//!
//! Line *k* of the journal (1-based, counted across segments) is the frame with sequence number
//! *k*: exactly the bytes clients receive, one per line. That makes replay a plain read, lets a
//! restarted server recover its position by counting newlines, and keeps the file readable with
//! `tail -f`.
//!
//! The journal is split into segment files named after their first sequence number, so old output
//! can be dropped a segment at a time once the journal exceeds its byte budget. A sparse index of
//! checkpoints (one every [`CHECKPOINT_BYTES`]) lets a reader seek near any sequence number
//! without holding every line's offset in memory.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// Distance in bytes between two index checkpoints.
pub(crate) const CHECKPOINT_BYTES: u64 = 64 * 1024;

/// Disk space reserved ahead of the active segment's end, so a full disk fails the reservation
/// instead of a write: a write cut short would show a reader (a server following a keeper's
/// journal) lines that are then cut off again.
const RESERVE_BYTES: u64 = 256 * 1024;

const SEGMENT_SUFFIX: &str = ".jsonl";

/// Size limits of one journal.
#[derive(Debug, Clone, Copy)]
pub struct JournalLimits {
    /// Once the segments together exceed this, the oldest segments are deleted.
    pub max_bytes: u64,
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
}

impl JournalLimits {
    /// Limits for a journal of at most `max_bytes`, kept in about eight segments.
    pub fn with_max_bytes(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            segment_bytes: (max_bytes / 8).max(4096),
        }
    }
}

/// One segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Sequence number of its first line.
    pub first_seq: u64,
    /// Its size in bytes.
    pub bytes: u64,
}

/// A known position: the line with sequence `seq` starts at `offset` in segment `segment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Sequence number of the line that starts here.
    pub seq: u64,
    /// `first_seq` of the segment this position is in.
    pub segment: u64,
    /// Byte offset inside that segment.
    pub offset: u64,
}

/// What readers need to find lines on disk: the live segments and the checkpoints into them.
#[derive(Debug, Clone, Default)]
pub struct JournalIndex {
    segments: VecDeque<Segment>,
    checkpoints: VecDeque<Checkpoint>,
}

impl JournalIndex {
    /// Sequence number of the oldest line still on disk, if any segment exists.
    pub fn first_seq(&self) -> Option<u64> {
        self.segments.front().map(|s| s.first_seq)
    }

    /// Total size of all segments.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// The checkpoint to start reading from to reach `seq`.
    pub fn checkpoint_for(&self, seq: u64) -> Option<Checkpoint> {
        let idx = self.checkpoints.partition_point(|c| c.seq <= seq);
        idx.checked_sub(1).map(|i| self.checkpoints[i])
    }

    /// First sequence numbers of the segments, oldest first.
    pub fn segment_starts(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.first_seq).collect()
    }

    /// Applies one change. Applying one it already has (a follower told the same thing by the
    /// writer and by its own read of the files) changes nothing, so checkpoints stay in order.
    fn apply(&mut self, change: &IndexChange) {
        match change {
            IndexChange::Checkpoint(c) => {
                if self.checkpoints.back().is_none_or(|last| last.seq < c.seq) {
                    self.checkpoints.push_back(*c);
                }
            }
            IndexChange::NewSegment(s) => {
                if self
                    .segments
                    .back()
                    .is_none_or(|last| last.first_seq < s.first_seq)
                {
                    self.segments.push_back(*s);
                }
            }
            IndexChange::Grow { segment, bytes } => {
                if let Some(s) = self
                    .segments
                    .iter_mut()
                    .rev()
                    .find(|s| s.first_seq == *segment)
                {
                    s.bytes = *bytes;
                }
            }
            IndexChange::DropSegment(first) => {
                self.segments.retain(|s| s.first_seq != *first);
                self.checkpoints.retain(|c| c.segment != *first);
            }
        }
    }
}

/// A change the writer made that readers must learn about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexChange {
    /// A new checkpoint.
    Checkpoint(Checkpoint),
    /// A new (empty) segment was started.
    NewSegment(Segment),
    /// A segment grew to `bytes`.
    Grow {
        /// Its first sequence number.
        segment: u64,
        /// Its new size.
        bytes: u64,
    },
    /// A segment was deleted to stay within the byte budget.
    DropSegment(u64),
}

impl JournalIndex {
    /// Applies the changes the writer reported, in order.
    pub fn apply_all(&mut self, changes: &[IndexChange]) {
        for c in changes {
            self.apply(c);
        }
    }
}

/// The single writer of a journal.
#[derive(Debug)]
pub(crate) struct JournalWriter {
    dir: PathBuf,
    limits: JournalLimits,
    file: File,
    /// First sequence number of the active segment, and its size.
    active: Segment,
    /// Older segments, oldest first (first_seq, bytes), to enforce the byte budget.
    closed: VecDeque<Segment>,
    next_seq: u64,
    last_checkpoint_offset: Option<u64>,
    /// Index changes not yet returned because the append that made them failed.
    unreported: Vec<IndexChange>,
    /// The active segment has disk space reserved up to this offset.
    reserved: u64,
}

impl JournalWriter {
    /// Opens (or creates) the journal in `dir` for appending.
    ///
    /// A trailing partial line (the previous writer died in the middle of a write) is cut off,
    /// so every line in the journal is whole. Returns the writer and the index describing what is
    /// already on disk.
    pub(crate) fn open(dir: &Path, limits: JournalLimits) -> io::Result<(Self, JournalIndex)> {
        fs::create_dir_all(dir)?;
        let (mut index, next_seq) = scan(dir)?;
        let Some(last) = index.segments.back().copied() else {
            let active = Segment {
                first_seq: 1,
                bytes: 0,
            };
            let file = create_segment(dir, 1)?;
            let start = [
                IndexChange::NewSegment(active),
                IndexChange::Checkpoint(Checkpoint {
                    seq: 1,
                    segment: 1,
                    offset: 0,
                }),
            ];
            index.apply_all(&start);
            let writer = Self {
                dir: dir.to_owned(),
                limits,
                file,
                active,
                closed: VecDeque::new(),
                next_seq: 1,
                last_checkpoint_offset: Some(0),
                // A follower that only hears of appends (the server following a keeper) must
                // learn of the first segment and checkpoint too, or it could not find the first
                // lines on disk for a client that falls behind early.
                unreported: start.to_vec(),
                reserved: 0,
            };
            return Ok((writer, index));
        };
        let path = segment_path(dir, last.first_seq);
        let file = OpenOptions::new().append(true).open(&path)?;
        if file.metadata()?.len() > last.bytes {
            file.set_len(last.bytes)?;
        }
        let closed: VecDeque<Segment> = index
            .segments
            .iter()
            .filter(|s| s.first_seq != last.first_seq)
            .copied()
            .collect();
        let last_checkpoint_offset = index
            .checkpoints
            .back()
            .filter(|c| c.segment == last.first_seq)
            .map(|c| c.offset);
        let writer = Self {
            dir: dir.to_owned(),
            limits,
            file,
            active: last,
            closed,
            next_seq,
            last_checkpoint_offset,
            unreported: Vec::new(),
            reserved: last.bytes,
        };
        Ok((writer, index))
    }

    /// Sequence number the next appended line will get.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends `lines` whole lines, already joined with (and each ending in) `\n`.
    ///
    /// One `write` per batch keeps the cost per line low. The returned changes must be applied
    /// to the readers' [`JournalIndex`] before the new lines are announced.
    ///
    /// On an error nothing of the batch is kept (a partly written batch is cut off) and it gets
    /// no sequence numbers: the journal stays whole and numbered without gaps, and the caller
    /// must not announce the batch.
    pub(crate) fn append(&mut self, batch: &[u8], lines: u64) -> io::Result<Vec<IndexChange>> {
        // Changes made before a failed append (a rotation) still reach readers.
        let mut changes = std::mem::take(&mut self.unreported);
        if lines == 0 {
            return Ok(changes);
        }
        if self.active.bytes >= self.limits.segment_bytes
            && let Err(e) = self.rotate(&mut changes)
        {
            self.unreported = changes;
            return Err(e);
        }
        if let Err(e) = self.reserve(batch.len() as u64) {
            self.unreported = changes;
            return Err(e);
        }
        if let Err(e) = self.file.write_all(batch) {
            let _ = self.file.set_len(self.active.bytes);
            self.release();
            self.unreported = changes;
            return Err(e);
        }
        let due = self
            .last_checkpoint_offset
            .is_none_or(|o| self.active.bytes - o >= CHECKPOINT_BYTES);
        if due {
            changes.push(IndexChange::Checkpoint(Checkpoint {
                seq: self.next_seq,
                segment: self.active.first_seq,
                offset: self.active.bytes,
            }));
            self.last_checkpoint_offset = Some(self.active.bytes);
        }
        self.active.bytes += batch.len() as u64;
        self.next_seq += lines;
        changes.push(IndexChange::Grow {
            segment: self.active.first_seq,
            bytes: self.active.bytes,
        });
        self.enforce_budget(&mut changes);
        Ok(changes)
    }

    /// Flushes written data to stable storage (used before reporting an exit).
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Makes sure the next `len` bytes of the active segment have disk space, without changing
    /// its size. Filesystems that cannot reserve space are written to directly.
    fn reserve(&mut self, len: u64) -> io::Result<()> {
        use nix::errno::Errno;
        use nix::fcntl::{FallocateFlags, fallocate};
        let end = self.active.bytes + len;
        if end <= self.reserved {
            return Ok(());
        }
        let to = end.max(self.active.bytes + RESERVE_BYTES);
        let (Ok(offset), Ok(size)) = (
            i64::try_from(self.active.bytes),
            i64::try_from(to - self.active.bytes),
        ) else {
            return Ok(());
        };
        match fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            size,
        ) {
            Ok(()) => {
                self.reserved = to;
                Ok(())
            }
            // Too little room for the reservation ahead: ask for just this batch.
            Err(Errno::ENOSPC) if to > end => {
                let size = i64::try_from(len).unwrap_or(i64::MAX);
                fallocate(
                    &self.file,
                    FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    offset,
                    size,
                )
                .map_err(io::Error::from)?;
                self.reserved = end;
                Ok(())
            }
            Err(Errno::EOPNOTSUPP | Errno::ENOSYS) => {
                self.reserved = u64::MAX;
                Ok(())
            }
            Err(e) => Err(io::Error::from(e)),
        }
    }

    /// Frees the space reserved past the active segment's end.
    fn release(&mut self) {
        use nix::fcntl::{FallocateFlags, fallocate};
        if self.reserved == u64::MAX || self.reserved <= self.active.bytes {
            return;
        }
        if let (Ok(offset), Ok(size)) = (
            i64::try_from(self.active.bytes),
            i64::try_from(self.reserved - self.active.bytes),
        ) {
            let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            let _ = fallocate(&self.file, mode, offset, size);
        }
        self.reserved = self.active.bytes;
    }

    fn rotate(&mut self, changes: &mut Vec<IndexChange>) -> io::Result<()> {
        let file = create_segment(&self.dir, self.next_seq)?;
        // Give back the space reserved past the old segment's end.
        self.release();
        self.closed.push_back(self.active);
        self.file = file;
        if self.reserved != u64::MAX {
            self.reserved = 0;
        }
        self.active = Segment {
            first_seq: self.next_seq,
            bytes: 0,
        };
        self.last_checkpoint_offset = None;
        changes.push(IndexChange::NewSegment(self.active));
        Ok(())
    }

    fn enforce_budget(&mut self, changes: &mut Vec<IndexChange>) {
        let mut total: u64 = self.closed.iter().map(|s| s.bytes).sum::<u64>() + self.active.bytes;
        while total > self.limits.max_bytes {
            let Some(oldest) = self.closed.pop_front() else {
                break;
            };
            // If the file cannot be removed we still stop serving it: the budget is about what
            // clients may replay; a leftover file is logged by the caller's cleanup.
            let _ = fs::remove_file(segment_path(&self.dir, oldest.first_seq));
            total -= oldest.bytes;
            changes.push(IndexChange::DropSegment(oldest.first_seq));
        }
    }
}

impl Drop for JournalWriter {
    fn drop(&mut self) {
        self.release();
    }
}

/// Why a read from disk returned fewer lines than asked for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DiskRead {
    /// Lines starting at the requested sequence number.
    Lines(Vec<Bytes>),
    /// The requested line is no longer on disk (its segment was deleted).
    Gone,
}

/// Bytes of a segment read at a time by [`read_lines`]: a client's batch (1 MiB) in two reads.
const READ_CHUNK: usize = 512 * 1024;

/// Reads whole lines with sequence numbers `from..=upto`, at most `max_bytes` (but at least one
/// line), starting from `checkpoint`.
///
/// The lines returned share the chunks they were read in (one copy, from the page cache): a
/// client that fell behind the memory window is caught up from here, so this path is as busy
/// as the live one whenever the agent outruns a client.
///
/// Runs blocking file I/O: call it from a blocking thread.
pub(crate) fn read_lines(
    dir: &Path,
    segments: &[u64],
    checkpoint: Checkpoint,
    from: u64,
    upto: u64,
    max_bytes: usize,
) -> io::Result<DiskRead> {
    let mut out = Vec::new();
    let mut taken = 0usize;
    let mut seq = checkpoint.seq;
    let mut segment = checkpoint.segment;
    let mut offset = checkpoint.offset;
    let full = |out: &Vec<Bytes>, taken: usize, seq: u64| {
        seq > upto || (!out.is_empty() && taken >= max_bytes)
    };
    'segments: loop {
        let mut file = match File::open(segment_path(dir, segment)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if out.is_empty() {
                    return Ok(DiskRead::Gone);
                }
                break;
            }
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(offset))?;
        // What was read and not yet split: the start of a line.
        let mut buf: Vec<u8> = Vec::new();
        loop {
            if full(&out, taken, seq) {
                break 'segments;
            }
            let scanned = buf.len();
            buf.reserve(READ_CHUNK);
            let n = (&mut file).take(READ_CHUNK as u64).read_to_end(&mut buf)?;
            if n == 0 {
                // End of this segment (or a line still being written): go to the next one.
                let Some(next) = segments.iter().copied().find(|&s| s > segment) else {
                    break 'segments;
                };
                if next != seq {
                    // The index and the files disagree; stop rather than mislabel lines.
                    break 'segments;
                }
                segment = next;
                offset = 0;
                continue 'segments;
            }
            let Some(first) = memchr::memchr(b'\n', &buf[scanned..]) else {
                // A line longer than a chunk: read on.
                continue;
            };
            let chunk = Bytes::from(std::mem::take(&mut buf));
            let mut start = 0;
            let mut newline = Some(scanned + first);
            while let Some(end) = newline {
                if seq >= from {
                    taken += end - start;
                    out.push(chunk.slice(start..end));
                }
                seq += 1;
                start = end + 1;
                if full(&out, taken, seq) {
                    break 'segments;
                }
                newline = memchr::memchr(b'\n', &chunk[start..]).map(|i| start + i);
            }
            buf.extend_from_slice(&chunk[start..]);
        }
    }
    Ok(DiskRead::Lines(out))
}

/// Follows a journal that another process (a session keeper) writes.
///
/// Each [`JournalTail::poll`] returns the whole lines appended since the last one, and the index
/// changes a writer would have reported for them, so the hub's view stays identical to the
/// writer's. A line still being written is left for the next poll.
#[derive(Debug)]
pub struct JournalTail {
    dir: PathBuf,
    segment: u64,
    offset: u64,
    next_seq: u64,
    /// Offset of the newest checkpoint in the current segment, if it has one.
    last_checkpoint: Option<u64>,
    file: Option<File>,
    known: VecDeque<u64>,
}

impl JournalTail {
    /// A tail positioned after the last whole line described by `index`.
    pub fn new(dir: &Path, index: &JournalIndex, next_seq: u64) -> Self {
        let (segment, offset) = index
            .segments
            .back()
            .map_or((next_seq, 0), |s| (s.first_seq, s.bytes));
        let last_checkpoint = index
            .checkpoints
            .back()
            .filter(|c| c.segment == segment)
            .map(|c| c.offset);
        Self {
            dir: dir.to_owned(),
            segment,
            offset,
            next_seq,
            last_checkpoint,
            file: None,
            known: index.segments.iter().map(|s| s.first_seq).collect(),
        }
    }

    /// Sequence number of the next line to be read.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Reads whole lines appended since the last call: about `max_bytes` of them, but always
    /// whole lines. Blocking I/O.
    pub fn poll(&mut self, max_bytes: usize) -> io::Result<(Vec<Bytes>, Vec<IndexChange>)> {
        let mut lines = Vec::new();
        let mut changes = Vec::new();
        loop {
            let read = self.read_segment(max_bytes, &mut lines, &mut changes)?;
            if read || !self.advance_segment(&mut changes)? {
                break;
            }
        }
        Ok((lines, changes))
    }

    /// Reads whole lines from the current segment; true if any were read.
    fn read_segment(
        &mut self,
        max_bytes: usize,
        lines: &mut Vec<Bytes>,
        changes: &mut Vec<IndexChange>,
    ) -> io::Result<bool> {
        if self.file.is_none() {
            match File::open(segment_path(&self.dir, self.segment)) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            }
            if !self.known.contains(&self.segment) {
                self.known.push_back(self.segment);
                changes.push(IndexChange::NewSegment(Segment {
                    first_seq: self.segment,
                    bytes: 0,
                }));
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(false);
        };
        let len = file.metadata()?.len();
        if len <= self.offset {
            return Ok(false);
        }
        // Read what is there (at least up to the end of one line, however long).
        let mut want = (len - self.offset).min(max_bytes.max(64 * 1024) as u64) as usize;
        let mut buf = Vec::new();
        let end = loop {
            buf.resize(want, 0);
            file.seek(SeekFrom::Start(self.offset))?;
            let n = read_full(file, &mut buf)?;
            buf.truncate(n);
            if let Some(pos) = memchr::memrchr(b'\n', &buf) {
                break pos + 1;
            }
            if self.offset + (n as u64) >= len {
                // Only a line still being written.
                return Ok(false);
            }
            want = (want * 2).min((len - self.offset) as usize);
        };
        buf.truncate(end);
        let bytes = Bytes::from(buf);
        let mut start = 0usize;
        for pos in memchr::memchr_iter(b'\n', &bytes) {
            let line_offset = self.offset + start as u64;
            if self
                .last_checkpoint
                .is_none_or(|c| line_offset - c >= CHECKPOINT_BYTES)
            {
                changes.push(IndexChange::Checkpoint(Checkpoint {
                    seq: self.next_seq,
                    segment: self.segment,
                    offset: line_offset,
                }));
                self.last_checkpoint = Some(line_offset);
            }
            lines.push(bytes.slice(start..pos));
            self.next_seq += 1;
            start = pos + 1;
        }
        self.offset += end as u64;
        changes.push(IndexChange::Grow {
            segment: self.segment,
            bytes: self.offset,
        });
        Ok(true)
    }

    /// Moves to the next segment if the writer started one; reports deleted segments.
    fn advance_segment(&mut self, changes: &mut Vec<IndexChange>) -> io::Result<bool> {
        if !segment_path(&self.dir, self.next_seq).exists() || self.next_seq == self.segment {
            return Ok(false);
        }
        self.segment = self.next_seq;
        self.offset = 0;
        self.last_checkpoint = None;
        self.file = None;
        // The writer deletes old segments when it starts a new one.
        while let Some(&oldest) = self.known.front() {
            if segment_path(&self.dir, oldest).exists() {
                break;
            }
            self.known.pop_front();
            changes.push(IndexChange::DropSegment(oldest));
        }
        Ok(true)
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}{SEGMENT_SUFFIX}"))
}

fn create_segment(dir: &Path, first_seq: u64) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment_path(dir, first_seq))
}

/// Calls `visit` with every whole line of the journal in `dir` whose sequence number is `from`
/// or later, oldest first (what is still retained of them), until it says `Break`. Blocking I/O.
pub(crate) fn visit_from(
    dir: &Path,
    from: u64,
    mut visit: impl FnMut(&[u8]) -> std::ops::ControlFlow<()>,
) -> io::Result<()> {
    // Only the whole lines the index counts: a line still being written is left alone.
    let (index, next_seq) = scan(dir)?;
    let segments = index.segment_starts();
    let mut seq = index.first_seq().map_or(from, |first| from.max(first));
    while seq < next_seq {
        let Some(checkpoint) = index.checkpoint_for(seq) else {
            break;
        };
        let DiskRead::Lines(lines) =
            read_lines(dir, &segments, checkpoint, seq, next_seq - 1, 1 << 20)?
        else {
            break;
        };
        if lines.is_empty() {
            break;
        }
        for line in &lines {
            if visit(line).is_break() {
                return Ok(());
            }
        }
        seq += lines.len() as u64;
    }
    Ok(())
}

/// Reads the index of the journal in `dir` without changing anything, for a reader while
/// another process may be writing. Returns it and the next sequence number.
pub(crate) fn scan_index(dir: &Path) -> io::Result<(JournalIndex, u64)> {
    fs::create_dir_all(dir)?;
    scan(dir)
}

/// Rebuilds the index of the segments in `dir`; returns it and the next sequence number.
fn scan(dir: &Path) -> io::Result<(JournalIndex, u64)> {
    let mut starts: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            name.strip_suffix(SEGMENT_SUFFIX)?.parse().ok()
        })
        .collect();
    starts.sort_unstable();
    let mut index = JournalIndex::default();
    let mut next_seq = starts.first().copied().unwrap_or(1);
    for (i, &first) in starts.iter().enumerate() {
        // A gap between segments means lost files: keep only the contiguous tail.
        if i > 0 && first != next_seq {
            index = JournalIndex::default();
        }
        next_seq = first;
        let mut file = File::open(segment_path(dir, first))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut offset = 0u64;
        let mut line_start = 0u64;
        let mut last_cp: Option<u64> = None;
        index.segments.push_back(Segment {
            first_seq: first,
            bytes: 0,
        });
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            for pos in memchr::memchr_iter(b'\n', &buf[..n]) {
                if last_cp.is_none_or(|c| line_start - c >= CHECKPOINT_BYTES) {
                    index.checkpoints.push_back(Checkpoint {
                        seq: next_seq,
                        segment: first,
                        offset: line_start,
                    });
                    last_cp = Some(line_start);
                }
                next_seq += 1;
                line_start = offset + pos as u64 + 1;
            }
            offset += n as u64;
        }
        // A torn last line (its writer died mid-write, or is still writing) is not counted.
        if let Some(s) = index.segments.back_mut() {
            s.bytes = line_start;
        }
        if last_cp.is_none() {
            index.checkpoints.push_back(Checkpoint {
                seq: next_seq,
                segment: first,
                offset: 0,
            });
        }
    }
    Ok((index, next_seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(lines: &[String]) -> (Vec<u8>, u64) {
        let mut b = Vec::new();
        for l in lines {
            b.extend_from_slice(l.as_bytes());
            b.push(b'\n');
        }
        (b, lines.len() as u64)
    }

    fn read_all(dir: &Path, index: &JournalIndex, from: u64, upto: u64) -> DiskRead {
        let cp = index.checkpoint_for(from).expect("checkpoint");
        read_lines(dir, &index.segment_starts(), cp, from, upto, usize::MAX).expect("read")
    }

    #[test]
    fn lines_are_numbered_from_one_and_read_back_from_any_point() {
        let tmp = tempfile::tempdir().expect("tmp");
        let limits = JournalLimits {
            max_bytes: 1 << 30,
            segment_bytes: 4096,
        };
        let (mut w, mut index) = JournalWriter::open(tmp.path(), limits).expect("open");
        let lines: Vec<String> = (1..=2000).map(|i| format!("{{\"n\":{i}}}")).collect();
        for chunk in lines.chunks(37) {
            let (b, n) = batch(chunk);
            index.apply_all(&w.append(&b, n).expect("append"));
        }
        assert_eq!(w.next_seq(), 2001);
        assert!(index.segment_starts().len() > 3, "rotation happened");
        for from in [1, 2, 37, 38, 999, 1500, 2000] {
            let DiskRead::Lines(got) = read_all(tmp.path(), &index, from, 2000) else {
                panic!("gone")
            };
            assert_eq!(got.len() as u64, 2001 - from);
            assert_eq!(got[0], Bytes::from(format!("{{\"n\":{from}}}")));
        }
    }

    /// The server follows a keeper's journal only through the changes of its appends: those
    /// alone must let it read every line back from disk, including the first ones of a batch.
    #[test]
    fn a_follower_of_the_appends_alone_can_read_every_line_back() {
        let tmp = tempfile::tempdir().expect("tmp");
        let limits = JournalLimits {
            max_bytes: 1 << 30,
            segment_bytes: 1 << 20,
        };
        let (mut w, _) = JournalWriter::open(tmp.path(), limits).expect("open");
        let mut follower = JournalIndex::default();
        let big = "x".repeat(64 * 1024);
        let lines: Vec<String> = (1..=40).map(|i| format!("{i} {big}")).collect();
        // The first append carries two lines, as when the agent wrote them at once.
        for chunk in [&lines[..2], &lines[2..5], &lines[5..]] {
            let (b, n) = batch(chunk);
            follower.apply_all(&w.append(&b, n).expect("append"));
        }
        assert_eq!(follower.first_seq(), Some(1));
        for from in [1, 2, 3, 17, 40] {
            let DiskRead::Lines(got) = read_all(tmp.path(), &follower, from, from) else {
                panic!("line {from} gone")
            };
            assert!(
                got[0].starts_with(format!("{from} ").as_bytes()),
                "line {from}"
            );
        }
    }

    #[test]
    fn lines_are_visited_from_a_sequence_number_across_segments() {
        let tmp = tempfile::tempdir().expect("tmp");
        let limits = JournalLimits {
            max_bytes: 1 << 30,
            segment_bytes: 64,
        };
        let (mut w, _) = JournalWriter::open(tmp.path(), limits).expect("open");
        let lines: Vec<String> = (1..=50).map(|i| format!("line {i}")).collect();
        for chunk in lines.chunks(3) {
            let (b, n) = batch(chunk);
            w.append(&b, n).expect("append");
        }
        // A line still being written is not visited.
        let (b, _) = batch(&["torn".into()]);
        w.file.write_all(&b[..2]).expect("write");
        let mut seen = Vec::new();
        visit_from(tmp.path(), 17, |l| {
            seen.push(String::from_utf8_lossy(l).into_owned());
            std::ops::ControlFlow::Continue(())
        })
        .expect("visit");
        assert_eq!(seen, lines[16..].to_vec());
        let mut first = Vec::new();
        visit_from(tmp.path(), 17, |l| {
            first.push(l.to_vec());
            std::ops::ControlFlow::Break(())
        })
        .expect("visit");
        assert_eq!(first, vec![b"line 17".to_vec()], "a visit stops when told");
    }

    #[test]
    fn applying_a_change_twice_changes_nothing() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (mut w, mut index) =
            JournalWriter::open(tmp.path(), JournalLimits::with_max_bytes(1 << 20)).expect("open");
        let (b, n) = batch(&["a".into(), "b".into()]);
        let changes = w.append(&b, n).expect("append");
        // The writer's own index already holds the first segment and checkpoint.
        index.apply_all(&changes);
        index.apply_all(&changes);
        assert_eq!(index.segment_starts(), vec![1]);
        assert_eq!(index.checkpoints.len(), 1);
        assert_eq!(index.bytes(), 4);
    }

    #[test]
    fn reopening_recovers_position_and_cuts_a_torn_line() {
        let tmp = tempfile::tempdir().expect("tmp");
        let limits = JournalLimits::with_max_bytes(1 << 30);
        {
            let (mut w, _) = JournalWriter::open(tmp.path(), limits).expect("open");
            let (b, n) = batch(&["a".into(), "b".into()]);
            w.append(&b, n).expect("append");
        }
        // Simulate a writer killed in the middle of a line.
        let seg = segment_path(tmp.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&seg).expect("seg");
        f.write_all(b"{\"torn\":").expect("write");
        let (mut w, mut index) = JournalWriter::open(tmp.path(), limits).expect("reopen");
        assert_eq!(w.next_seq(), 3);
        let (b, n) = batch(&["c".into()]);
        index.apply_all(&w.append(&b, n).expect("append"));
        let DiskRead::Lines(got) = read_all(tmp.path(), &index, 1, 3) else {
            panic!("gone")
        };
        assert_eq!(
            got,
            vec![Bytes::from("a"), Bytes::from("b"), Bytes::from("c")]
        );
    }

    #[test]
    fn budget_drops_oldest_segments_and_reads_report_gone() {
        let tmp = tempfile::tempdir().expect("tmp");
        let limits = JournalLimits {
            max_bytes: 10_000,
            segment_bytes: 2_000,
        };
        let (mut w, mut index) = JournalWriter::open(tmp.path(), limits).expect("open");
        let lines: Vec<String> = (1..=1000).map(|i| format!("line-{i:05}")).collect();
        for chunk in lines.chunks(10) {
            let (b, n) = batch(chunk);
            index.apply_all(&w.append(&b, n).expect("append"));
        }
        assert!(index.bytes() <= 10_000 + 2_000);
        let first = index.first_seq().expect("first");
        assert!(first > 1);
        let cp = Checkpoint {
            seq: 1,
            segment: 1,
            offset: 0,
        };
        let got =
            read_lines(tmp.path(), &index.segment_starts(), cp, 1, 1000, 1 << 20).expect("read");
        assert_eq!(got, DiskRead::Gone);
        let DiskRead::Lines(tail) = read_all(tmp.path(), &index, first, 1000) else {
            panic!("gone")
        };
        assert_eq!(tail.len() as u64, 1001 - first);
        let (_, reindexed) = JournalWriter::open(tmp.path(), limits).expect("reopen");
        assert_eq!(reindexed.first_seq(), Some(first));
    }

    #[test]
    fn a_tail_sees_what_another_writer_appends_across_rotations_and_deletions() {
        let tmp = tempfile::tempdir().expect("tmp");
        let limits = JournalLimits {
            max_bytes: 3_000,
            segment_bytes: 1_000,
        };
        let (index, next) = scan_index(tmp.path()).expect("scan");
        let mut tail = JournalTail::new(tmp.path(), &index, next);
        let mut mirror = index;
        assert!(
            tail.poll(1 << 20).expect("poll").0.is_empty(),
            "nothing yet"
        );
        let (mut w, _) = JournalWriter::open(tmp.path(), limits).expect("open");
        let mut seen = Vec::new();
        for chunk in (1..=600).collect::<Vec<u32>>().chunks(13) {
            let lines: Vec<String> = chunk.iter().map(|i| format!("line-{i:04}")).collect();
            let (b, n) = batch(&lines);
            w.append(&b, n).expect("append");
            // A torn line in progress must not be read.
            let (got, changes) = tail.poll(1 << 20).expect("poll");
            mirror.apply_all(&changes);
            seen.extend(
                got.into_iter()
                    .map(|b| String::from_utf8(b.to_vec()).expect("utf8")),
            );
        }
        let want: Vec<String> = (1..=600).map(|i| format!("line-{i:04}")).collect();
        assert_eq!(seen, want);
        assert_eq!(tail.next_seq(), 601);
        // The mirrored index can serve reads exactly like the writer's own.
        let first = mirror.first_seq().expect("first");
        assert!(first > 1, "old segments were dropped and noticed");
        let DiskRead::Lines(got) = read_all(tmp.path(), &mirror, first, 600) else {
            panic!("gone")
        };
        assert_eq!(got.len() as u64, 601 - first);
        assert_eq!(got[0], Bytes::from(format!("line-{first:04}")));
    }

    #[test]
    fn a_failed_append_takes_no_sequence_number() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (mut w, mut index) =
            JournalWriter::open(tmp.path(), JournalLimits::with_max_bytes(1 << 20)).expect("open");
        index.apply_all(&w.append(b"one\n", 1).expect("append"));
        // The disk is full.
        let real = std::mem::replace(
            &mut w.file,
            OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .expect("/dev/full"),
        );
        assert!(w.append(b"lost\n", 1).is_err());
        w.file = real;
        assert_eq!(w.next_seq(), 2, "the lost line took no number");
        index.apply_all(&w.append(b"two\n", 1).expect("append"));
        let DiskRead::Lines(got) = read_all(tmp.path(), &index, 1, 2) else {
            panic!("gone")
        };
        assert_eq!(got, vec![Bytes::from("one"), Bytes::from("two")]);
    }

    #[test]
    fn a_tail_waits_for_a_line_being_written() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (mut w, index) =
            JournalWriter::open(tmp.path(), JournalLimits::with_max_bytes(1 << 20)).expect("open");
        let mut tail = JournalTail::new(tmp.path(), &index, 1);
        w.append(b"one\n", 1).expect("append");
        let mut f = OpenOptions::new()
            .append(true)
            .open(segment_path(tmp.path(), 1))
            .expect("seg");
        f.write_all(b"{\"half").expect("write");
        let (got, _) = tail.poll(1 << 20).expect("poll");
        assert_eq!(got, vec![Bytes::from("one")]);
        f.write_all(b"\":1}\n").expect("write");
        let (got, _) = tail.poll(1 << 20).expect("poll");
        assert_eq!(got, vec![Bytes::from("{\"half\":1}")]);
    }

    #[test]
    fn lines_longer_than_a_read_and_across_reads_come_back_whole() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (mut w, mut index) =
            JournalWriter::open(tmp.path(), JournalLimits::with_max_bytes(1 << 30)).expect("open");
        // Around and beyond READ_CHUNK, so lines end exactly at, just after and far after the
        // end of a read, and one spans three reads.
        let sizes = [
            1,
            READ_CHUNK - 1,
            0,
            3,
            READ_CHUNK,
            2 * READ_CHUNK + 17,
            64 << 10,
            5,
        ];
        let lines: Vec<String> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| char::from(b'a' + i as u8).to_string().repeat(n))
            .collect();
        for line in &lines {
            let (b, n) = batch(std::slice::from_ref(line));
            index.apply_all(&w.append(&b, n).expect("append"));
        }
        let count = lines.len() as u64;
        for from in 1..=count {
            let DiskRead::Lines(got) = read_all(tmp.path(), &index, from, count) else {
                panic!("gone")
            };
            let want: Vec<Bytes> = lines[from as usize - 1..]
                .iter()
                .map(|l| Bytes::from(l.clone()))
                .collect();
            assert_eq!(got.len(), want.len(), "from {from}");
            assert!(got == want, "from {from}: the lines differ");
        }
        // A byte limit still returns at least one line, and stops after crossing it.
        let cp = index.checkpoint_for(2).expect("cp");
        let DiskRead::Lines(got) =
            read_lines(tmp.path(), &index.segment_starts(), cp, 2, count, 10).expect("read")
        else {
            panic!("gone")
        };
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), READ_CHUNK - 1);
    }

    #[test]
    fn reads_stop_at_the_published_sequence_and_the_byte_limit() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (mut w, mut index) =
            JournalWriter::open(tmp.path(), JournalLimits::with_max_bytes(1 << 30)).expect("open");
        let lines: Vec<String> = (1..=100).map(|i| format!("{i:03}")).collect();
        let (b, n) = batch(&lines);
        index.apply_all(&w.append(&b, n).expect("append"));
        let cp = index.checkpoint_for(10).expect("cp");
        let DiskRead::Lines(got) =
            read_lines(tmp.path(), &index.segment_starts(), cp, 10, 20, usize::MAX).expect("read")
        else {
            panic!("gone")
        };
        assert_eq!(got.len(), 11);
        let DiskRead::Lines(got) =
            read_lines(tmp.path(), &index.segment_starts(), cp, 10, 100, 7).expect("read")
        else {
            panic!("gone")
        };
        assert_eq!(got.len(), 3, "stops once the byte limit is reached");
    }
}
