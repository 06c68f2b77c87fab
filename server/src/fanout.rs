//! Fan-out of a session's output to any number of clients, with replay.
//!
//! Clients *pull*: each one keeps a cursor (the next sequence number it wants) and reads from a
//! shared, bounded in-memory window of recent lines; whatever has left the window is read back
//! from the session's [`crate::keeper::journal`]. A single `watch` channel announces the newest
//! sequence number. So a slow client never slows the agent or other clients, costs no memory of
//! its own beyond the batch it is sending, and is never silently skipped over: it is either caught
//! up from disk or, if the journal no longer holds what it needs, told so and closed.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::watch;

/// What a [`DiskPlan`] reads: the lines, or word that the journal no longer has them.
pub(crate) use crate::keeper::journal::DiskRead;
use crate::keeper::journal::{self, Checkpoint, IndexChange, JournalIndex};

/// How much one read hands a client at most (it always gets at least one line).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadLimit {
    /// Maximum number of lines.
    pub lines: usize,
    /// Maximum total bytes.
    pub bytes: usize,
}

impl Default for ReadLimit {
    fn default() -> Self {
        Self {
            lines: 1024,
            bytes: 1 << 20,
        }
    }
}

/// The result of asking for lines from a cursor onwards.
#[derive(Debug)]
pub(crate) enum Read {
    /// Lines with consecutive sequence numbers starting at the cursor.
    Lines(Vec<Bytes>),
    /// Nothing newer than the cursor yet.
    UpToDate,
    /// The lines are only on disk: run [`DiskPlan::read`] on a blocking thread.
    Disk(DiskPlan),
    /// The line at the cursor is no longer retained; the oldest retained one is `first_retained`.
    Gone {
        /// Oldest sequence number still available.
        first_retained: u64,
    },
}

/// A read of lines from the journal, to be run off the async threads.
#[derive(Debug)]
pub(crate) struct DiskPlan {
    dir: PathBuf,
    segments: Vec<u64>,
    checkpoint: Checkpoint,
    from: u64,
    upto: u64,
    max_bytes: usize,
}

impl DiskPlan {
    /// Performs the read (blocking).
    pub(crate) fn read(self) -> std::io::Result<DiskRead> {
        journal::read_lines(
            &self.dir,
            &self.segments,
            self.checkpoint,
            self.from,
            self.upto,
            self.max_bytes,
        )
    }
}

/// Shared output state of one session.
#[derive(Debug)]
pub(crate) struct Hub {
    inner: Mutex<Inner>,
    last_seq: watch::Sender<u64>,
    journal_dir: PathBuf,
}

#[derive(Debug)]
struct Inner {
    window: VecDeque<Bytes>,
    /// Sequence number of `window[0]` (or of the next line when the window is empty).
    window_first: u64,
    window_bytes: usize,
    max_window_bytes: usize,
    last_seq: u64,
    index: JournalIndex,
}

impl Hub {
    /// A hub over the journal in `journal_dir`, whose lines up to `last_seq` are on disk.
    pub(crate) fn new(
        journal_dir: PathBuf,
        index: JournalIndex,
        last_seq: u64,
        max_window_bytes: usize,
    ) -> Arc<Self> {
        let (tx, _) = watch::channel(last_seq);
        Arc::new(Self {
            inner: Mutex::new(Inner {
                window: VecDeque::new(),
                window_first: last_seq + 1,
                window_bytes: 0,
                max_window_bytes,
                last_seq,
                index,
            }),
            last_seq: tx,
            journal_dir,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the window half-updated in a way that
        // matters to readers, so recover from poisoning rather than propagate it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Newest published sequence number (0 before the first line).
    pub(crate) fn last_seq(&self) -> u64 {
        *self.last_seq.borrow()
    }

    /// Oldest sequence number a client can still receive.
    pub(crate) fn first_retained(&self) -> u64 {
        let inner = self.lock();
        inner
            .index
            .first_seq()
            .unwrap_or(inner.window_first)
            .min(inner.window_first)
    }

    /// A receiver that wakes whenever new lines are published.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.last_seq.subscribe()
    }

    /// Publishes lines that the journal writer has just made durable.
    ///
    /// `changes` are the index updates the writer reported for them.
    pub(crate) fn publish(&self, lines: impl IntoIterator<Item = Bytes>, changes: &[IndexChange]) {
        let last = {
            let mut inner = self.lock();
            inner.index.apply_all(changes);
            for line in lines {
                inner.window_bytes += line.len();
                inner.window.push_back(line);
                inner.last_seq += 1;
            }
            while inner.window_bytes > inner.max_window_bytes {
                let Some(old) = inner.window.pop_front() else {
                    break;
                };
                inner.window_bytes -= old.len();
                inner.window_first += 1;
            }
            inner.last_seq
        };
        self.last_seq.send_replace(last);
    }

    /// A copy of the journal index and the next sequence number, to start following the journal.
    pub(crate) fn index_snapshot(&self) -> (JournalIndex, u64) {
        let inner = self.lock();
        (inner.index.clone(), inner.last_seq + 1)
    }

    /// Replaces the journal index (a writer reopened the journal and rebuilt it).
    pub(crate) fn replace_index(&self, index: JournalIndex) {
        self.lock().index = index;
    }

    /// Drops the in-memory window (the session ended; replay is served from disk).
    pub(crate) fn release_memory(&self) {
        let mut inner = self.lock();
        inner.window_first = inner.last_seq + 1;
        inner.window = VecDeque::new();
        inner.window_bytes = 0;
    }

    /// Lines from sequence number `from` onwards, within `limit`.
    pub(crate) fn read(&self, from: u64, limit: ReadLimit) -> Read {
        let inner = self.lock();
        if from > inner.last_seq {
            return Read::UpToDate;
        }
        if from >= inner.window_first {
            let start = (from - inner.window_first) as usize;
            let mut out = Vec::with_capacity((inner.window.len() - start).min(limit.lines));
            let mut bytes = 0usize;
            for line in inner.window.range(start..) {
                if !out.is_empty() && (out.len() >= limit.lines || bytes >= limit.bytes) {
                    break;
                }
                bytes += line.len();
                out.push(line.clone());
            }
            return Read::Lines(out);
        }
        let first_on_disk = inner.index.first_seq().unwrap_or(inner.window_first);
        match inner.index.checkpoint_for(from) {
            Some(checkpoint) if from >= first_on_disk => Read::Disk(DiskPlan {
                dir: self.journal_dir.clone(),
                segments: inner.index.segment_starts(),
                checkpoint,
                from,
                // Stop where the window starts: the rest is served from memory next time.
                upto: (inner.window_first - 1).min(inner.last_seq),
                max_bytes: limit.bytes,
            }),
            _ => Read::Gone {
                first_retained: first_on_disk.min(inner.window_first),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keeper::journal::{JournalLimits, JournalWriter};

    struct Fixture {
        _tmp: tempfile::TempDir,
        writer: JournalWriter,
        hub: Arc<Hub>,
    }

    fn fixture(window: usize, limits: JournalLimits) -> Fixture {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("out");
        let (writer, index) = JournalWriter::open(&dir, limits).expect("open");
        let hub = Hub::new(dir, index, writer.next_seq() - 1, window);
        Fixture {
            _tmp: tmp,
            writer,
            hub,
        }
    }

    impl Fixture {
        fn emit(&mut self, range: std::ops::RangeInclusive<u64>) {
            let mut batch = Vec::new();
            let lines: Vec<Bytes> = range.map(|i| Bytes::from(format!("L{i}"))).collect();
            for l in &lines {
                batch.extend_from_slice(l);
                batch.push(b'\n');
            }
            let changes = self
                .writer
                .append(&batch, lines.len() as u64)
                .expect("append");
            self.hub.publish(lines, &changes);
        }

        /// Reads everything from `from` like a client would, following disk plans.
        fn drain(&self, mut from: u64) -> Result<Vec<String>, u64> {
            let mut got = Vec::new();
            loop {
                let lines = match self.hub.read(
                    from,
                    ReadLimit {
                        lines: 7,
                        bytes: 64,
                    },
                ) {
                    Read::UpToDate => return Ok(got),
                    Read::Lines(l) => l,
                    Read::Disk(plan) => match plan.read().expect("disk") {
                        DiskRead::Lines(l) => l,
                        DiskRead::Gone => return Err(from),
                    },
                    Read::Gone { first_retained } => return Err(first_retained),
                };
                assert!(!lines.is_empty());
                from += lines.len() as u64;
                got.extend(
                    lines
                        .into_iter()
                        .map(|b| String::from_utf8(b.to_vec()).expect("utf8")),
                );
            }
        }
    }

    #[test]
    fn a_late_reader_gets_every_line_in_order_from_memory_and_disk() {
        let mut f = fixture(50, JournalLimits::with_max_bytes(1 << 30));
        for start in (1..=500).step_by(25) {
            f.emit(start..=start + 24);
        }
        assert_eq!(f.hub.last_seq(), 500);
        let got = f.drain(1).expect("all retained");
        let want: Vec<String> = (1..=500).map(|i| format!("L{i}")).collect();
        assert_eq!(got, want);
        assert_eq!(f.drain(480).expect("tail").len(), 21);
        assert!(f.drain(501).expect("none").is_empty());
    }

    #[test]
    fn lines_lost_to_the_journal_budget_are_reported_not_skipped() {
        let mut f = fixture(
            16,
            JournalLimits {
                max_bytes: 400,
                segment_bytes: 100,
            },
        );
        for start in (1..=300).step_by(10) {
            f.emit(start..=start + 9);
        }
        let first = f.hub.first_retained();
        assert!(first > 1);
        assert_eq!(f.drain(1), Err(first));
        assert_eq!(f.drain(first).expect("retained").len() as u64, 301 - first);
    }

    #[tokio::test]
    async fn subscribers_wake_on_publish() {
        let mut f = fixture(1024, JournalLimits::with_max_bytes(1 << 30));
        let mut rx = f.hub.subscribe();
        f.emit(1..=3);
        rx.changed().await.expect("changed");
        assert_eq!(*rx.borrow(), 3);
    }

    #[test]
    fn released_window_is_served_from_disk() {
        let mut f = fixture(1 << 20, JournalLimits::with_max_bytes(1 << 30));
        f.emit(1..=10);
        f.hub.release_memory();
        assert!(matches!(f.hub.read(1, ReadLimit::default()), Read::Disk(_)));
        assert_eq!(f.drain(1).expect("disk").len(), 10);
    }
}
