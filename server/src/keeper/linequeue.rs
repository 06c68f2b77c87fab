//! Lines waiting for a vectored write, copied only when they are small.
//!
//! A 64 KiB client line used to be copied into one buffer (with its newline) before each
//! write on its way to an agent: twice on the durable path (the server's socket writer, the
//! keeper's stdin). Large lines now stay the `Bytes` they arrived in and go to the kernel with
//! `writev`; small ones are still gathered into one buffer, since an iovec per 64-byte line
//! costs more than copying it.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Lines shorter than this are copied into the queue's open buffer.
const GATHER_BELOW: usize = 4096;

/// Most buffers given to one vectored write.
pub(crate) const MAX_SLICES: usize = 64;

/// The buffers of one vectored write, kept on the stack.
#[derive(Debug)]
pub(crate) struct Slices<'a> {
    bufs: [IoSlice<'a>; MAX_SLICES],
    len: usize,
}

impl<'a> std::ops::Deref for Slices<'a> {
    type Target = [IoSlice<'a>];

    fn deref(&self) -> &Self::Target {
        &self.bufs[..self.len]
    }
}

/// Bytes to write, in order: sealed parts, then the open buffer of small lines.
#[derive(Debug, Default)]
pub(crate) struct LineQueue {
    parts: VecDeque<Bytes>,
    open: BytesMut,
    len: usize,
}

impl LineQueue {
    /// Queues `line` and its newline.
    pub(crate) fn push_line(&mut self, line: &Bytes) {
        if line.len() < GATHER_BELOW {
            self.open.extend_from_slice(line);
        } else {
            self.seal();
            self.parts.push_back(line.clone());
        }
        self.open.put_u8(b'\n');
        self.len += line.len() + 1;
    }

    /// Queues `line`, which the caller owns, and its newline.
    pub(crate) fn push_owned(&mut self, line: Vec<u8>) {
        if line.len() < GATHER_BELOW {
            self.push_raw(&line);
            self.open.put_u8(b'\n');
            self.len += 1;
        } else {
            self.push_line(&Bytes::from(line));
        }
    }

    /// Queues `bytes` as they are (a marker line already ending in a newline, say).
    pub(crate) fn push_raw(&mut self, bytes: &[u8]) {
        self.open.extend_from_slice(bytes);
        self.len += bytes.len();
    }

    fn seal(&mut self) {
        if !self.open.is_empty() {
            self.parts.push_back(self.open.split().freeze());
        }
    }

    /// Bytes queued.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops everything queued.
    pub(crate) fn clear(&mut self) {
        self.parts.clear();
        self.open.clear();
        self.len = 0;
    }

    /// The first buffers to write, in order (at most [`MAX_SLICES`]), without allocating:
    /// this is asked for before every write.
    pub(crate) fn slices(&self) -> Slices<'_> {
        let mut slices = slices_of(&self.parts);
        if slices.len < MAX_SLICES && slices.len == self.parts.len() && !self.open.is_empty() {
            slices.bufs[slices.len] = IoSlice::new(&self.open);
            slices.len += 1;
        }
        slices
    }

    /// Drops the first `n` bytes (written).
    pub(crate) fn consume(&mut self, n: usize) {
        self.len -= n.min(self.len);
        let rest = consume_parts(&mut self.parts, n);
        self.open.advance(rest.min(self.open.len()));
    }
}

/// The first buffers of `parts`, in order (at most [`MAX_SLICES`]), for a vectored write.
pub(crate) fn slices_of(parts: &VecDeque<Bytes>) -> Slices<'_> {
    let mut slices = Slices {
        bufs: [IoSlice::new(&[]); MAX_SLICES],
        len: 0,
    };
    for part in parts.iter().take(MAX_SLICES) {
        slices.bufs[slices.len] = IoSlice::new(part);
        slices.len += 1;
    }
    slices
}

/// Drops the first `n` bytes of `parts` (written); returns how many of `n` lay beyond them.
pub(crate) fn consume_parts(parts: &mut VecDeque<Bytes>, mut n: usize) -> usize {
    while n > 0 {
        let Some(front) = parts.front_mut() else {
            return n;
        };
        if front.len() <= n {
            n -= front.len();
            parts.pop_front();
        } else {
            front.advance(n);
            return 0;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a writer taking `step` bytes per call would send.
    fn drain(queue: &mut LineQueue, step: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while !queue.is_empty() {
            let slices = queue.slices();
            assert!(!slices.is_empty() && slices.len() <= MAX_SLICES);
            let mut taken = 0;
            for s in slices.iter() {
                let room = step - taken;
                let n = s.len().min(room);
                out.extend_from_slice(&s[..n]);
                taken += n;
                if taken == step {
                    break;
                }
            }
            queue.consume(taken);
        }
        out
    }

    #[test]
    fn small_and_large_lines_come_out_in_order_whatever_each_write_takes() {
        let big = Bytes::from(vec![b'x'; 70_000]);
        let mut want = Vec::new();
        for step in [1, 7, 4096, 65_536, 1 << 20] {
            let mut queue = LineQueue::default();
            want.clear();
            for i in 0..200 {
                if i % 50 == 7 {
                    queue.push_line(&big);
                    want.extend_from_slice(&big);
                } else if i % 50 == 9 {
                    let owned = vec![b'y'; 5000];
                    want.extend_from_slice(&owned);
                    queue.push_owned(owned);
                } else {
                    let small = format!("line {i}");
                    queue.push_line(&Bytes::from(small.clone()));
                    want.extend_from_slice(small.as_bytes());
                }
                want.push(b'\n');
                if i == 100 {
                    queue.push_raw(b"\x01marker\n");
                    want.extend_from_slice(b"\x01marker\n");
                }
            }
            assert_eq!(queue.len(), want.len());
            let got = drain(&mut queue, step);
            assert!(got == want, "step {step}: bytes differ");
            assert_eq!(queue.len(), 0);
        }
    }

    #[test]
    fn a_large_line_is_not_copied() {
        let big = Bytes::from(vec![b'z'; 10_000]);
        let mut queue = LineQueue::default();
        queue.push_line(&big);
        let slices = queue.slices();
        assert_eq!(
            slices[0].as_ptr(),
            big.as_ptr(),
            "the line itself, not a copy"
        );
        assert_eq!(&*slices[1], b"\n");
    }
}
