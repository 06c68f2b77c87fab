//! The keeper's Unix socket, as both ends use it: the reading side registered with the reactor
//! for reading only, the writing side only while a write waits for room.
//!
//! Why not tokio's `UnixStream`: it registers the socket for reading *and* writing, and the
//! kernel signals a Unix socket writable again each time the peer reads what was written to it.
//! Every line the keeper sends (and every line the server sends the keeper) then woke the
//! writer's process once more for nothing: one extra context switch per round trip on each side
//! (an strace of the keeper showed three blocking `epoll_wait`s per echoed line, one of them
//! woken by `EPOLLOUT` alone).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Splits a connected socket into its two directions.
pub(crate) fn split(stream: UnixStream) -> io::Result<(SocketReader, SocketWriter)> {
    stream.set_nonblocking(true)?;
    let writer = SocketWriter {
        waiting: None,
        sock: stream.try_clone()?,
    };
    let reader = SocketReader {
        fd: registered(stream, Interest::READABLE)?,
    };
    Ok((reader, writer))
}

/// Registers a socket with the reactor for `interest` only.
///
/// tokio deprecates this safe constructor for the `unsafe` one, because a `T` could close or
/// replace its descriptor while it is registered; a `UnixStream` owns its descriptor and
/// closes it only when dropped, after the registration (and this crate forbids `unsafe`).
#[allow(deprecated)]
fn registered(sock: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    AsyncFd::with_interest(sock, interest)
}

/// Gives this end of a keeper's socket a send buffer of `bytes` (the agent's pipe size,
/// `limits.agent_pipe_bytes`), so a 64 KiB line and its neighbours are in flight at once
/// instead of a wake-up each. The kernel caps it at `net.core.wmem_max`; `0` or a refusal
/// leaves the default, which only costs speed.
pub(crate) fn widen_send_buffer(stream: &impl std::os::fd::AsFd, bytes: usize) -> bool {
    use nix::sys::socket::{setsockopt, sockopt::SndBuf};
    bytes == 0 || setsockopt(stream, SndBuf, &bytes).is_ok()
}

/// Splits a connected tokio socket (taken off its reactor registration) into its directions.
pub(crate) fn split_tokio(
    stream: tokio::net::UnixStream,
) -> io::Result<(SocketReader, SocketWriter)> {
    split(stream.into_std()?)
}

/// The reading direction of a socket.
#[derive(Debug)]
pub(crate) struct SocketReader {
    fd: AsyncFd<UnixStream>,
}

impl SocketReader {
    /// Reads what has arrived into `buf` (0: the peer closed its end).
    pub(crate) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|s| s.get_ref().read(buf)) {
                Ok(Ok(n)) => {
                    // A short read emptied the socket: wait for the next edge rather than
                    // asking the kernel again only to hear `EAGAIN` (as tokio's own streams do).
                    if n > 0 && n < buf.len() {
                        guard.clear_ready();
                    }
                    return Ok(n);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }
}

/// The writing direction of a socket: writes go straight to the kernel, and the socket is
/// registered for writability only while a write waits for room.
#[derive(Debug)]
pub(crate) struct SocketWriter {
    /// The registration of a write waiting for room (declared first: dropped before `sock`).
    waiting: Option<AsyncFd<UnixStream>>,
    sock: UnixStream,
}

impl SocketWriter {
    /// Writes what the socket takes now (`WouldBlock` when it takes nothing).
    pub(crate) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.sock).write(buf)
    }

    /// Writes what the socket takes now of several buffers, in order, in one call.
    pub(crate) fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&self.sock).write_vectored(bufs)
    }

    /// Registers a duplicate of the socket for writability (edge-triggered: it reports at once
    /// when there is room already).
    fn register(&self) -> io::Result<AsyncFd<UnixStream>> {
        registered(self.sock.try_clone()?, Interest::WRITABLE)
    }

    /// Waits for room after a write found none. `wait` keeps the registration for the
    /// caller's next wait; dropping it stops listening.
    pub(crate) async fn room(&self, wait: &mut RoomWait) -> io::Result<()> {
        let fd = match &wait.0 {
            Some(fd) => fd,
            None => wait.0.insert(self.register()?),
        };
        fd.writable().await?.clear_ready();
        Ok(())
    }

    /// Writes all of `buf`, waiting for room as needed (the tests' writer; the server and the
    /// keeper write vectored).
    #[cfg(test)]
    pub(crate) async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        let mut wait = RoomWait::default();
        while !buf.is_empty() {
            match self.try_write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.room(&mut wait).await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A writer's registration for writability, kept while its owner waits for room.
#[derive(Debug, Default)]
pub(crate) struct RoomWait(Option<AsyncFd<UnixStream>>);

impl SocketWriter {
    /// Runs `write` until the socket takes something (or fails), registering for room while it
    /// takes nothing.
    fn poll_written(
        &mut self,
        cx: &mut Context<'_>,
        write: impl Fn(&Self) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match write(self) {
                Ok(n) => {
                    // Room again: stop listening for it.
                    self.waiting = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.waiting.is_none() {
                        self.waiting = Some(self.register()?);
                    }
                    let Some(fd) = &self.waiting else {
                        continue;
                    };
                    ready!(fd.poll_write_ready(cx))?.clear_ready();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl tokio::io::AsyncWrite for SocketWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_written(cx, |w| w.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_written(cx, |w| w.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.sock.shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[tokio::test]
    async fn bytes_cross_both_ways_including_past_a_full_socket() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (a_read, a_write) = split(a).expect("split");
        let (b_read, b_write) = split(b).expect("split");
        // Far more than a socket buffer holds: the writer must wait for room.
        let big: Vec<u8> = (0..4u32 << 20).map(|i| i as u8).collect();
        let expected = big.clone();
        let sender = tokio::spawn(async move {
            a_write.write_all(&big).await.expect("write");
            drop(a_write);
            drop(a_read);
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = b_read.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        sender.await.expect("sender");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes arrive whole and in order");
        drop(b_write);
    }

    #[test]
    fn the_send_buffer_grows_as_far_as_the_kernel_allows() {
        use nix::sys::socket::{getsockopt, sockopt::SndBuf};
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let before = getsockopt(&a, SndBuf).expect("SO_SNDBUF");
        assert!(super::widen_send_buffer(&a, 0));
        assert_eq!(
            getsockopt(&a, SndBuf).expect("SO_SNDBUF"),
            before,
            "0 keeps it"
        );
        // What an unprivileged process may ask for here (the kernel doubles what it grants).
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(before);
        let want = max.min(1 << 20);
        assert!(super::widen_send_buffer(&a, want));
        assert!(getsockopt(&a, SndBuf).expect("SO_SNDBUF") >= want);
    }
}
