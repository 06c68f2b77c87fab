//! JSONL framing: agent stdout bytes in, whole lines out; client frames in, stdin lines out.
//!
//! Agents write JSON Lines, but a pipe hands us arbitrary chunks: a line may span many reads, a
//! multi-byte UTF-8 character may be cut in half, and an agent may print garbage. The framer
//! never fails on content. Every input line becomes exactly one [`Frame`]: either the line
//! itself, or a [`Frame::Dropped`] that says why it could not be forwarded. Splitting happens on
//! `\n` only, because U+2028/U+2029 are legal inside JSON strings and some readers (Node's
//! `readline`) wrongly split on them.

use std::fmt;

use bytes::BytesMut;
use memchr::memchr;

/// How many bytes of a dropped line are kept to show the user what was lost.
pub(crate) const PREVIEW_BYTES: usize = 120;

/// Why a line was not forwarded as-is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The line is not valid UTF-8, so it cannot travel in a WebSocket text frame.
    InvalidUtf8,
    /// The line is longer than the configured maximum.
    TooLong,
}

impl DropReason {
    /// The stable name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::InvalidUtf8 => "invalid_utf8",
            DropReason::TooLong => "line_too_long",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One framed line of agent output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    /// A non-empty line: valid UTF-8, no `\n`, no trailing `\r`, at most the maximum length.
    Line(&'a str),
    /// A line that could not be forwarded.
    Dropped {
        /// Why it was dropped.
        reason: DropReason,
        /// Its length in bytes, without the terminating `\n`.
        bytes: u64,
        /// Its first [`PREVIEW_BYTES`] bytes.
        preview: &'a [u8],
    },
}

/// A piece of a byte stream cut at `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    /// A complete line, without its `\n`, at most the splitter's limit long.
    Line(&'a [u8]),
    /// A line longer than the limit: only its length and first [`PREVIEW_BYTES`] were kept.
    TooLong {
        /// Its length in bytes, without the terminating `\n`.
        bytes: u64,
        /// Its first [`PREVIEW_BYTES`] bytes.
        preview: &'a [u8],
    },
}

/// The one incremental line splitter: cuts a byte stream at `\n`, with memory bounded by the
/// limit plus one read (a line that grows past the limit is discarded as it streams in).
/// Agent output goes through it inside [`LineFramer`]; a keeper splits client input with it.
#[derive(Debug)]
pub(crate) struct LineSplitter {
    limit: usize,
    /// Bytes of the current, still unterminated line.
    partial: BytesMut,
    /// Set while skipping the rest of an over-long line: bytes seen so far and its preview.
    discarding: Option<(u64, Vec<u8>)>,
}

impl LineSplitter {
    /// A splitter that reports lines longer than `limit` bytes as [`Piece::TooLong`].
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            partial: BytesMut::new(),
            discarding: None,
        }
    }

    /// Bytes currently buffered for an unterminated line.
    pub(crate) fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Splits `input` and calls `emit` for every line it completes.
    pub(crate) fn feed(&mut self, mut input: &[u8], emit: &mut impl FnMut(Piece<'_>)) {
        while !input.is_empty() {
            let Some(nl) = memchr(b'\n', input) else {
                self.accumulate(input);
                return;
            };
            let piece = &input[..nl];
            input = &input[nl + 1..];
            if let Some((seen, mut preview)) = self.discarding.take() {
                fill_preview(&mut preview, piece);
                emit(Piece::TooLong {
                    bytes: seen + piece.len() as u64,
                    preview: &preview,
                });
            } else if self.partial.is_empty() {
                self.emit_whole(piece, emit);
            } else if self.partial.len() + piece.len() > self.limit {
                let mut preview = std::mem::take(&mut self.partial);
                let seen = (preview.len() + piece.len()) as u64;
                if preview.len() < PREVIEW_BYTES {
                    let take = (PREVIEW_BYTES - preview.len()).min(piece.len());
                    preview.extend_from_slice(&piece[..take]);
                }
                preview.truncate(PREVIEW_BYTES);
                emit(Piece::TooLong {
                    bytes: seen,
                    preview: &preview,
                });
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(piece);
                emit(Piece::Line(&line));
                // Reuse the allocation for the next line.
                line.clear();
                self.partial = line;
            }
        }
    }

    /// Flushes an unterminated last line (the stream ended without a final `\n`).
    pub(crate) fn finish(&mut self, emit: &mut impl FnMut(Piece<'_>)) {
        if let Some((seen, preview)) = self.discarding.take() {
            emit(Piece::TooLong {
                bytes: seen,
                preview: &preview,
            });
        } else if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.emit_whole(&line, emit);
        }
    }

    /// Forgets an unterminated line (its stream went away mid-line); returns its length.
    pub(crate) fn discard(&mut self) -> u64 {
        let n = match self.discarding.take() {
            Some((seen, _)) => seen,
            None => self.partial.len() as u64,
        };
        self.partial.clear();
        n
    }

    fn emit_whole(&self, line: &[u8], emit: &mut impl FnMut(Piece<'_>)) {
        if line.len() > self.limit {
            emit(Piece::TooLong {
                bytes: line.len() as u64,
                preview: &line[..line.len().min(PREVIEW_BYTES)],
            });
        } else {
            emit(Piece::Line(line));
        }
    }

    fn accumulate(&mut self, chunk: &[u8]) {
        if let Some((seen, preview)) = &mut self.discarding {
            *seen += chunk.len() as u64;
            fill_preview(preview, chunk);
            return;
        }
        if self.partial.len() + chunk.len() > self.limit {
            let seen = (self.partial.len() + chunk.len()) as u64;
            let mut preview = Vec::with_capacity(PREVIEW_BYTES);
            preview.extend_from_slice(&self.partial[..self.partial.len().min(PREVIEW_BYTES)]);
            let take = (PREVIEW_BYTES - preview.len()).min(chunk.len());
            preview.extend_from_slice(&chunk[..take]);
            self.partial = BytesMut::new();
            self.discarding = Some((seen, preview));
        } else {
            self.partial.extend_from_slice(chunk);
        }
    }
}

/// Incremental splitter of agent output into [`Frame`]s: a [`LineSplitter`] whose lines are
/// then checked (UTF-8, length without a trailing `\r`, not empty).
#[derive(Debug)]
pub(crate) struct LineFramer {
    max_line: usize,
    splitter: LineSplitter,
}

impl LineFramer {
    /// A framer that drops lines longer than `max_line` bytes.
    pub(crate) fn new(max_line: usize) -> Self {
        Self {
            max_line,
            // A line of exactly `max_line` bytes may still be followed by a `\r`.
            splitter: LineSplitter::new(max_line + 1),
        }
    }

    /// Bytes currently buffered for an unterminated line.
    pub(crate) fn buffered(&self) -> usize {
        self.splitter.buffered()
    }

    /// Splits `input` and calls `emit` for every line it completes.
    pub(crate) fn feed(&mut self, input: &[u8], emit: &mut impl FnMut(Frame<'_>)) {
        let max_line = self.max_line;
        self.splitter
            .feed(input, &mut |piece| frame(max_line, piece, emit));
    }

    /// Flushes an unterminated last line (the agent exited without a final `\n`).
    pub(crate) fn finish(&mut self, emit: &mut impl FnMut(Frame<'_>)) {
        let max_line = self.max_line;
        self.splitter
            .finish(&mut |piece| frame(max_line, piece, emit));
    }
}

fn frame(max_line: usize, piece: Piece<'_>, emit: &mut impl FnMut(Frame<'_>)) {
    let raw = match piece {
        Piece::Line(raw) => raw,
        Piece::TooLong { bytes, preview } => {
            return emit(Frame::Dropped {
                reason: DropReason::TooLong,
                bytes,
                preview,
            });
        }
    };
    let line = raw.strip_suffix(b"\r").unwrap_or(raw);
    if line.is_empty() {
        return;
    }
    let dropped = |reason| Frame::Dropped {
        reason,
        bytes: raw.len() as u64,
        preview: &raw[..raw.len().min(PREVIEW_BYTES)],
    };
    if line.len() > max_line {
        emit(dropped(DropReason::TooLong));
        return;
    }
    match std::str::from_utf8(line) {
        Ok(text) => emit(Frame::Line(text)),
        Err(_) => emit(dropped(DropReason::InvalidUtf8)),
    }
}

/// Tops up a dropped line's preview from the next piece of it.
fn fill_preview(preview: &mut Vec<u8>, more: &[u8]) {
    let take = PREVIEW_BYTES.saturating_sub(preview.len()).min(more.len());
    preview.extend_from_slice(&more[..take]);
}

/// Renders the server frame that takes the place of a dropped line.
///
/// It is written into the session's output like any other line, so it has a sequence number
/// and replays the same way.
pub(crate) fn dropped_frame(reason: DropReason, bytes: u64, preview: &[u8]) -> String {
    serde_json::json!({
        "type": "amarre.line_dropped",
        "reason": reason.as_str(),
        "bytes": bytes,
        "preview": String::from_utf8_lossy(preview),
    })
    .to_string()
}

/// Turns one client frame into the line written to the agent's stdin.
///
/// amarre's rule, kept for compatibility: strip one trailing `\n` and then one trailing `\r`
/// (clients send `JSON.stringify(cmd) + "\n"`); the writer then appends exactly one `\n`.
pub(crate) fn inbound_line(frame: &[u8]) -> &[u8] {
    let frame = frame.strip_suffix(b"\n").unwrap_or(frame);
    frame.strip_suffix(b"\r").unwrap_or(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Owned {
        Line(String),
        Dropped(DropReason, u64, Vec<u8>),
    }

    fn run(max: usize, chunks: &[&[u8]]) -> Vec<Owned> {
        let mut framer = LineFramer::new(max);
        let mut out = Vec::new();
        let mut emit = |f: Frame<'_>| {
            out.push(match f {
                Frame::Line(s) => Owned::Line(s.to_owned()),
                Frame::Dropped {
                    reason,
                    bytes,
                    preview,
                } => Owned::Dropped(reason, bytes, preview.to_vec()),
            })
        };
        for c in chunks {
            framer.feed(c, &mut emit);
        }
        framer.finish(&mut emit);
        out
    }

    fn line(s: &str) -> Owned {
        Owned::Line(s.to_owned())
    }

    #[test]
    fn splits_on_newline_only_and_skips_empty_lines() {
        let out = run(1024, &[b"{\"a\":\"x\xe2\x80\xa8y\"}\n\n\r\n{\"b\":1}\r\n"]);
        assert_eq!(out, vec![line("{\"a\":\"x\u{2028}y\"}"), line("{\"b\":1}")]);
    }

    #[test]
    fn multibyte_character_split_across_reads_is_kept_whole() {
        let euro = "€".as_bytes();
        let out = run(1024, &[b"\"", &euro[..1], &euro[1..2], &euro[2..], b"\"\n"]);
        assert_eq!(out, vec![line("\"€\"")]);
    }

    #[test]
    fn invalid_utf8_becomes_a_drop_and_the_stream_continues() {
        let out = run(1024, &[b"ok\nbad \xff\xfe line\nafter\n"]);
        assert_eq!(out[0], line("ok"));
        assert!(
            matches!(&out[1], Owned::Dropped(DropReason::InvalidUtf8, 11, p) if p.starts_with(b"bad"))
        );
        assert_eq!(out[2], line("after"));
    }

    #[test]
    fn overlong_line_is_dropped_without_buffering_it() {
        let mut framer = LineFramer::new(10);
        let mut out = Vec::new();
        let mut emit = |f: Frame<'_>| out.push(format!("{f:?}"));
        framer.feed(b"0123456789abc", &mut emit);
        assert_eq!(
            framer.buffered(),
            0,
            "an over-long line must not stay in memory"
        );
        framer.feed(&[b'x'; 5000], &mut emit);
        framer.feed(b"\nshort\n", &mut emit);
        assert_eq!(out.len(), 2);
        assert!(
            out[0].contains("TooLong") && out[0].contains("bytes: 5013"),
            "{}",
            out[0]
        );
        assert!(out[1].contains("short"));
    }

    #[test]
    fn line_of_exactly_max_bytes_passes_even_with_crlf() {
        assert_eq!(run(3, &[b"abc\r", b"\n"]), vec![line("abc")]);
        assert!(matches!(
            run(3, &[b"abcd\n"])[0],
            Owned::Dropped(DropReason::TooLong, 4, _)
        ));
    }

    #[test]
    fn unterminated_last_line_is_delivered_at_finish() {
        assert_eq!(
            run(100, &[b"a\n{\"partial\":tr", b"ue}"]),
            vec![line("a"), line("{\"partial\":true}")]
        );
    }

    #[test]
    fn inbound_strips_one_newline_then_one_cr() {
        assert_eq!(inbound_line(b"{}\n"), b"{}");
        assert_eq!(inbound_line(b"{}\r\n"), b"{}");
        assert_eq!(inbound_line(b"{}\r"), b"{}");
        assert_eq!(inbound_line(b"{}\n\n"), b"{}\n");
        assert_eq!(inbound_line(b"a\n\r"), b"a\n");
        assert_eq!(inbound_line(b""), b"");
    }

    #[test]
    fn dropped_frame_is_one_json_line() {
        let f = dropped_frame(DropReason::InvalidUtf8, 3, b"a\n\xff");
        assert!(!f.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&f).expect("json");
        assert_eq!(v["type"], "amarre.line_dropped");
        assert_eq!(v["reason"], "invalid_utf8");
        assert_eq!(v["bytes"], 3);
    }

    fn chunked(data: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        points.sort_unstable();
        let mut out = Vec::new();
        let mut last = 0;
        for p in points {
            out.push(data[last..p].to_vec());
            last = p;
        }
        out.push(data[last..].to_vec());
        out
    }

    fn arb_stream() -> impl Strategy<Value = Vec<u8>> {
        // Bias towards the bytes that matter: newlines, CRs, multi-byte and invalid sequences.
        let piece = prop_oneof![
            Just(b"\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just("€".as_bytes().to_vec()),
            Just("\u{2028}".as_bytes().to_vec()),
            Just(vec![0xff]),
            Just(vec![0xe2, 0x82]),
            "[a-z{}\":,]{0,12}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..8),
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn chunking_never_changes_the_frames(data in arb_stream(), cuts in proptest::collection::vec(any::<usize>(), 0..12), max in 1usize..40) {
            let whole = run(max, &[&data]);
            let parts = chunked(&data, &cuts);
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(run(max, &refs), whole);
        }

        #[test]
        fn every_line_is_accounted_for(data in arb_stream(), max in 1usize..40) {
            let frames = run(max, &[&data]);
            let expected = data
                .split(|&b| b == b'\n')
                .filter(|l| !l.strip_suffix(b"\r").unwrap_or(l).is_empty())
                .count();
            prop_assert_eq!(frames.len(), expected);
            for f in frames {
                match f {
                    Owned::Line(s) => {
                        prop_assert!(!s.is_empty() && s.len() <= max);
                        // Only one \r before the \n is removed, so a line may still end in \r.
                        prop_assert!(!s.contains('\n'));
                    }
                    Owned::Dropped(_, bytes, preview) => {
                        prop_assert!(bytes > 0 && preview.len() <= PREVIEW_BYTES);
                    }
                }
            }
        }

        #[test]
        fn valid_lines_round_trip(lines in proptest::collection::vec("[^\n\r]{1,30}", 0..20), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
            let data: Vec<u8> = lines.iter().flat_map(|l| format!("{l}\n").into_bytes()).collect();
            let parts = chunked(&data, &cuts);
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            let got: Vec<String> = run(1 << 20, &refs).into_iter().map(|f| match f {
                Owned::Line(s) => s,
                Owned::Dropped(..) => String::from("<dropped>"),
            }).collect();
            prop_assert_eq!(got, lines);
        }

        #[test]
        fn memory_stays_bounded(data in proptest::collection::vec(any::<u8>(), 0..4096), max in 1usize..64) {
            let mut framer = LineFramer::new(max);
            for chunk in data.chunks(7) {
                framer.feed(chunk, &mut |_| {});
                prop_assert!(framer.buffered() <= max + 1);
            }
        }
    }
}
