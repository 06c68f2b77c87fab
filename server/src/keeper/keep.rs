//! The session keeper: a small process that owns one agent and outlives the server.
//!
//! Durable runtimes (`tmux`, `runc`) do not run agents as children of the server. Each agent run
//! gets a keeper (`moorline keeper RUN_DIR`), started from a tmux pane but detached into a
//! session of its own, so neither a server restart, nor Ctrl-C, Ctrl-Z, `tmux kill-session` or
//! `tmux kill-server` in the pane reaches it. The keeper:
//!
//! - starts the agent (or `runc run`, which runs the agent in a container) with piped stdio;
//! - listens on `RUN_DIR/stdin.sock` and forwards to the agent's stdin only **complete** lines,
//!   so a server killed in the middle of sending a line never hands the agent half of it;
//!   a line starting with [`USER_MARKER`] is not for the agent: it names the client whose
//!   lines follow, so approval answers are recorded with who gave them;
//! - frames the agent's stdout and appends it to the session's journal (the same code the
//!   server uses), then sends the appended lines to the connected server
//!   ([`LINES`](super::protocol::LINES)), so the server never reads back what it could be
//!   told; lines no server could take are only rung ([`DOORBELL`](super::protocol::DOORBELL)),
//!   and the server reads them from the journal;
//! - reports every settled approval request to the server ([`RESOLUTION`](super::protocol::RESOLUTION), a JSON
//!   `Resolution` and a newline), which writes the audit log;
//! - appends the agent's stderr to the session's `stderr.log`;
//! - when the agent exits, writes `RUN_DIR/exit` atomically and leaves.
//!
//! The pane itself runs `moorline keeper-pane RUN_DIR`: it starts the keeper and shows the
//! agent's stderr to whoever attaches with `tmux attach`.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use moorline_adapters::pipeline::{Pipeline, Resolution};
use tokio::net::UnixListener;
use tokio::sync::{Notify, mpsc};

use super::agentio::{AgentIo, AgentPipes, Input, OutputSink, Refused, write_pending};
use super::exit::{ExitInfo, ExitReason};
use super::framing::{LineSplitter, Piece};
use super::group::{AgentControl, GroupControl};
use super::journal::{JournalLimits, JournalWriter};
use super::layout::RunDir;
use super::linequeue::{consume_parts, slices_of};
use super::protocol::{self, KeeperSpec, USER_MARKER};
use super::socket::{RoomWait, SocketReader, SocketWriter};

/// Settled approvals kept for a server that is not connected (the oldest go first).
const RESOLUTION_BACKLOG: usize = 1024;
/// Most bytes of lines waiting for the connected server; past that, lines are only rung and
/// the server reads them from the journal (so a slow server never grows the keeper).
const OUTBOX_LINES: usize = 4 << 20;

/// `moorline keeper RUN_DIR`: runs the keeper until its agent has exited.
pub fn keeper_main(run_dir: &Path) -> ExitCode {
    // Leave the pane's session: hang-ups and terminal signals in tmux must not reach us.
    let _ = nix::unistd::setsid();
    let run_dir = RunDir::new(run_dir);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moorline keeper: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(keep(&run_dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moorline keeper: {e}");
            // Whatever happened, say how the agent ended, or that it never started.
            let _ = protocol::write_exit(
                &run_dir,
                ExitInfo {
                    code: Some(127),
                    signal: None,
                    reason: None,
                },
            );
            ExitCode::from(1)
        }
    }
}

fn log(stderr: &mut std::fs::File, msg: &str) {
    use std::io::Write;
    let _ = writeln!(stderr, "[moorline keeper] {msg}");
}

async fn keep(run_dir: &RunDir) -> io::Result<()> {
    let spec = protocol::load_spec(run_dir)?;
    let mut stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.stderr_file)?;
    let limits = JournalLimits {
        max_bytes: spec.journal_max_bytes,
        segment_bytes: spec.journal_segment_bytes,
    };
    let (writer, _) = JournalWriter::open(&spec.journal_dir, limits)?;
    let io = AgentIo::new(
        spec.max_line,
        pipeline(&spec)?,
        Duration::from_millis(spec.exit_drain_ms),
    )
    .hold_after_exit(Duration::from_millis(spec.hold_after_exit_ms));
    let (pipes, control) = start_agent(&spec, run_dir, &mut stderr)?;
    // The socket appears only now, with the agent's and the keeper's pids on disk: the server
    // reads them as soon as it can connect.
    std::fs::write(run_dir.keeper_pid(), std::process::id().to_string())?;
    let listener = listen(run_dir)?;
    let oom = spec.oom_cgroup.as_deref().map(super::oom::OomWatch::start);
    let outbox = Arc::new(Outbox::default());
    let sink = KeeperSink {
        writer,
        outbox: outbox.clone(),
        pending_file: spec.pending_file.clone(),
        auth_failed_file: run_dir.session().auth_failed(),
        conversation_file: run_dir.session().conversation(),
        log: stderr.try_clone()?,
    };
    let served = serve(
        io,
        pipes,
        control.as_ref(),
        sink,
        Server {
            listener,
            outbox,
            max_input_line: spec.max_input_line,
            send_buffer: spec.pipe_bytes,
            log: stderr.try_clone()?,
        },
    )
    .await?;
    let (exit, connection, sink) = served;
    let exit = match oom {
        Some(oom) if oom.fired() => exit.because(ExitReason::OutOfMemory),
        _ => exit,
    };
    let _ = control.kill();
    // The container is gone: so must be its network helper (it normally leaves by itself).
    super::group::stop_network_helper(run_dir);
    drop(sink);
    record_exit(
        run_dir,
        exit,
        Duration::from_millis(spec.hold_after_exit_ms),
    )
    .await?;
    log(&mut stderr, &format!("agent finished: {exit}"));
    let _ = std::fs::remove_file(run_dir.socket());
    // The server learns of the exit when this connection closes, after the exit file exists.
    if let Some(conn) = connection {
        conn.abort();
    }
    Ok(())
}

/// The adapter's pipeline for this agent.
fn pipeline(spec: &KeeperSpec) -> io::Result<Pipeline> {
    let adapter = moorline_adapters::build(&spec.adapter).map_err(io::Error::other)?;
    let mut pipeline = Pipeline::new(
        adapter.translator(),
        adapter.dialect(),
        spec.approvals.clone(),
    );
    super::agentio::restore_history(&mut pipeline, &spec.journal_dir, &spec.adapter.continuation);
    Ok(if spec.instance_id.is_empty() {
        pipeline
    } else {
        pipeline.for_instance(&spec.instance_id)
    })
}

/// Starts the agent (or `runc run`) with piped stdio in a process group of its own, and
/// records its pid.
fn start_agent(
    spec: &KeeperSpec,
    run_dir: &RunDir,
    stderr: &mut std::fs::File,
) -> io::Result<(AgentPipes, Arc<dyn AgentControl>)> {
    if spec.detached_pid_file.is_some() {
        // Orphans among our descendants (the container's init, once runc has left) become
        // our children.
        nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)?;
    }
    let workspace = match &spec.workspace {
        Some(anchor) => Some(anchor.open().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("working directory {}: {e}", anchor.path().display()),
            )
        })?),
        None => None,
    };
    let mut command = tokio::process::Command::new(&spec.program);
    if let Some((uid, gid)) = spec.user {
        command.uid(uid).gid(gid);
    }
    match &workspace {
        Some(dir) => command.current_dir(super::workspace::fd_path(dir)),
        None => command.current_dir(&spec.cwd),
    };
    let mut child = command
        .args(&spec.args)
        .env_clear()
        .envs(&spec.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr.try_clone()?))
        .process_group(0)
        .spawn()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start {}: {e}", spec.program.display()),
            )
        })?;
    drop(workspace);
    let agent_pid = child.id();
    if let Some(pid) = agent_pid {
        std::fs::write(run_dir.agent_pid(), pid.to_string())?;
    }
    log(
        stderr,
        &format!(
            "started {} (pid {})",
            spec.program.display(),
            agent_pid.unwrap_or(0)
        ),
    );
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(io::Error::other("agent has no stdio pipes"));
    };
    {
        use std::os::fd::AsFd;
        if !super::agentio::widen_pipes(&[stdin.as_fd(), stdout.as_fd()], spec.pipe_bytes) {
            log(
                stderr,
                &format!("the kernel refused pipes of {} bytes", spec.pipe_bytes),
            );
        }
    }
    let (exit, control): (super::agentio::ExitFuture, Arc<dyn AgentControl>) =
        match &spec.detached_pid_file {
            Some(pid_file) => {
                let control = Arc::new(super::group::InitControl::default());
                let exit = container_exit(child, pid_file.clone(), control.clone());
                (Box::pin(exit), control)
            }
            None => {
                let control = Arc::new(GroupControl::new(agent_pid));
                let exit_control = control.clone();
                let container = spec.container;
                let exit = async move {
                    let info = match child.wait().await {
                        Ok(status) if container => ExitInfo::from_container_status(status),
                        Ok(status) => ExitInfo::from(status),
                        Err(_) => ExitInfo::UNKNOWN,
                    };
                    exit_control.leader_exited();
                    info
                };
                (Box::pin(exit), control)
            }
        };
    let pipes = AgentPipes {
        stdout: Box::new(stdout),
        stdin: Box::new(stdin),
        exit,
        control: control.clone(),
    };
    Ok((pipes, control))
}

/// How a detached container ends: `runc run --detach` fails (the container never ran), or its
/// init, our child since runc left, exits. Its status is read as `runc run` would report it.
async fn container_exit(
    mut runc: tokio::process::Child,
    pid_file: std::path::PathBuf,
    control: Arc<super::group::InitControl>,
) -> ExitInfo {
    match runc.wait().await {
        Ok(status) if status.success() => {}
        Ok(status) => return ExitInfo::from_container_status(status),
        Err(_) => return ExitInfo::UNKNOWN,
    }
    let Some(pid) = super::layout::read_pid(&pid_file).map(nix::unistd::Pid::from_raw) else {
        return ExitInfo::UNKNOWN;
    };
    control.started(pid);
    let info = match wait_child(pid).await {
        Ok(status) => ExitInfo::from_container_status(status),
        Err(_) => ExitInfo::UNKNOWN,
    };
    control.reaped();
    info
}

/// Waits for child `pid` to exit and reaps it (on a blocking thread: `waitpid` is the wait).
async fn wait_child(pid: nix::unistd::Pid) -> io::Result<std::process::ExitStatus> {
    use nix::sys::wait::{WaitStatus, waitpid};
    use std::os::unix::process::ExitStatusExt;
    let waited = tokio::task::spawn_blocking(move || {
        loop {
            match waitpid(pid, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(code << 8),
                Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(sig as i32),
                // Stopped or continued: not an end.
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            }
        }
    })
    .await
    .map_err(io::Error::other)??;
    Ok(std::process::ExitStatus::from_raw(waited))
}

/// Binds the server's socket, owner only.
fn listen(run_dir: &RunDir) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let socket = run_dir.socket();
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The server side of the keeper: who connects, and what it is told.
struct Server {
    listener: UnixListener,
    outbox: Arc<Outbox>,
    max_input_line: usize,
    /// Send buffer of each server connection (the agent's pipe size).
    send_buffer: usize,
    log: std::fs::File,
}

/// Runs the agent's stdio until it has exited, taking server connections (a new one replaces
/// the old) and keeping terminal signals away from the agent. Returns how it ended, the last
/// connection and the sink.
async fn serve(
    io: AgentIo,
    pipes: AgentPipes,
    control: &dyn AgentControl,
    mut sink: KeeperSink,
    server: Server,
) -> io::Result<(ExitInfo, Option<tokio::task::JoinHandle<()>>, KeeperSink)> {
    // Terminal signals are ignored; SIGTERM is passed on to the agent's process group.
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let (lines_tx, lines_rx) = mpsc::channel::<Input>(1024);
    let mut connection: Option<tokio::task::JoinHandle<()>> = None;
    // A task of its own, like the connection's: a line the connection task hands over wakes
    // it in the scheduler's queue, where the runtime's own future (this loop) would be woken
    // through the reactor (one more `epoll_wait` per line).
    let mut run = tokio::spawn(async move {
        let (exit, _) = io.run(pipes, lines_rx, &mut sink).await;
        (exit, sink)
    });
    let (exit, sink) = loop {
        tokio::select! {
            done = &mut run => break done.map_err(io::Error::other)?,
            accepted = server.listener.accept() => {
                let (stream, _) = accepted?;
                super::socket::widen_send_buffer(&stream, server.send_buffer);
                let (read, write) = match super::socket::split_tokio(stream) {
                    Ok(halves) => halves,
                    Err(e) => {
                        // Out of descriptors, say: refuse this server, keep the agent.
                        let mut log_file = server.log.try_clone()?;
                        log(&mut log_file, &format!("cannot take a server connection: {e}"));
                        continue;
                    }
                };
                if let Some(old) = connection.take() {
                    old.abort();
                }
                let write = Arc::new(write);
                server.outbox.connected(write.clone());
                let lines = lines_tx.clone();
                let mut log_file = server.log.try_clone()?;
                let max = server.max_input_line;
                let outbox = server.outbox.clone();
                connection = Some(tokio::spawn(async move {
                    let send = send_outbox(write, outbox.clone());
                    let read = forward_lines(read, lines, max, &mut log_file);
                    tokio::select! {
                        () = send => {}
                        () = read => {}
                    }
                    outbox.disconnected();
                }));
            }
            _ = hup.recv() => {}
            _ = int.recv() => {}
            _ = term.recv() => { let _ = control.terminate(); }
        }
    };
    Ok((exit, connection, sink))
}

/// Writes the exit file. The disk may still be full: the exit is worth retrying for `patience`
/// (a poll of the file system, which has nothing to wait on).
async fn record_exit(run_dir: &RunDir, exit: ExitInfo, patience: Duration) -> io::Result<()> {
    let mut wait = Duration::from_millis(20);
    let give_up = tokio::time::Instant::now() + patience;
    while let Err(e) = protocol::write_exit(run_dir, exit) {
        if tokio::time::Instant::now() >= give_up {
            return Err(e);
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
    Ok(())
}

/// What waits to be sent to the server: messages in order, and settled approvals (kept for the
/// next server when nobody is connected).
#[derive(Debug, Default)]
struct Outbox {
    notify: Notify,
    inner: Mutex<OutboxInner>,
}

#[derive(Debug, Default)]
struct OutboxInner {
    /// Encoded messages, in order; a [`protocol::LINES`] message is its head and the journal
    /// batch itself (never copied: both are written with one vectored write).
    queue: VecDeque<Bytes>,
    /// Bytes of [`protocol::LINES`] messages in `queue`.
    line_bytes: usize,
    /// Whether a server is connected (lines are only sent to one that is).
    connected: bool,
    /// Its socket, for lines written at once when nothing else is queued or being sent.
    socket: Option<Arc<SocketWriter>>,
    /// Whether the sending task holds bytes taken from the queue (then nothing may overtake
    /// them).
    sending: bool,
    /// Whether output is held now, for a server that connects later.
    held: bool,
    resolutions: VecDeque<Resolution>,
}

impl OutboxInner {
    fn push_tag(&mut self, tag: u8) {
        self.queue.push_back(Bytes::copy_from_slice(&[tag]));
    }

    fn last_is_doorbell(&self) -> bool {
        self.queue
            .back()
            .is_some_and(|b| b[..] == [protocol::DOORBELL])
    }
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A server connected: it is told the journal's state, and to read the journal, since
    /// lines appended before it was accepted were sent to nobody.
    fn connected(&self, socket: Arc<SocketWriter>) {
        {
            let mut inner = self.lock();
            inner.connected = true;
            inner.socket = Some(socket);
            inner.sending = false;
            if inner.held {
                inner.push_tag(protocol::HELD);
            }
            inner.push_tag(protocol::DOORBELL);
        }
        self.notify.notify_one();
    }

    fn disconnected(&self) {
        let mut inner = self.lock();
        inner.connected = false;
        inner.socket = None;
        inner.queue.clear();
        inner.line_bytes = 0;
    }

    /// Lines just appended to the journal from `first_seq` on, with the index changes of the
    /// append: queued until [`Outbox::flush`].
    fn lines(&self, first_seq: u64, changes: &[super::journal::IndexChange], lines: Bytes) {
        let mut inner = self.lock();
        if !inner.connected {
            return;
        }
        if inner.line_bytes + lines.len() <= OUTBOX_LINES {
            let mut head = Vec::new();
            protocol::encode_lines_header(&mut head, first_seq, changes, lines.len());
            inner.line_bytes += head.len() + lines.len();
            inner.queue.push_back(Bytes::from(head));
            inner.queue.push_back(lines);
        } else if !inner.last_is_doorbell() {
            // The server is behind: it reads these from the journal.
            inner.push_tag(protocol::DOORBELL);
        }
    }

    /// Sends what is queued: written to the socket at once when the sending task holds nothing
    /// (no task switch on the way to the server), else handed to that task.
    fn flush(&self) {
        let mut inner = self.lock();
        if inner.queue.is_empty() {
            return;
        }
        if !inner.sending
            && let Some(socket) = inner.socket.clone()
        {
            if let Ok(n) = socket.try_write_vectored(&slices_of(&inner.queue)) {
                consume_parts(&mut inner.queue, n);
            }
            if inner.queue.is_empty() {
                inner.line_bytes = 0;
                return;
            }
        }
        drop(inner);
        self.notify.notify_one();
    }

    fn tell(&self, bytes: &[u8]) {
        self.lock().queue.push_back(Bytes::copy_from_slice(bytes));
        self.notify.notify_one();
    }

    fn held(&self, held: bool) {
        let mut inner = self.lock();
        inner.held = held;
        inner.push_tag(if held {
            protocol::HELD
        } else {
            protocol::FLOWING
        });
        drop(inner);
        self.notify.notify_one();
    }

    fn resolved(&self, resolution: Resolution) {
        {
            let mut inner = self.lock();
            if inner.resolutions.len() >= RESOLUTION_BACKLOG {
                inner.resolutions.pop_front();
            }
            inner.resolutions.push_back(resolution);
        }
        self.notify.notify_one();
    }

    /// What to send now, and the settled approvals it carries.
    fn take(&self) -> (VecDeque<Bytes>, Vec<Resolution>) {
        let mut inner = self.lock();
        let mut out = std::mem::take(&mut inner.queue);
        inner.line_bytes = 0;
        inner.sending = true;
        let taken: Vec<Resolution> = inner.resolutions.drain(..).collect();
        for r in &taken {
            if let Ok(json) = serde_json::to_vec(r) {
                let mut record = Vec::with_capacity(json.len() + 2);
                record.push(protocol::RESOLUTION);
                record.extend_from_slice(&json);
                record.push(b'\n');
                out.push_back(Bytes::from(record));
            }
        }
        (out, taken)
    }

    /// The sending task has nothing left in hand: direct writes may go again.
    fn sent(&self) {
        self.lock().sending = false;
    }

    /// Settled approvals a server did not get: kept for the next one.
    fn give_back(&self, taken: Vec<Resolution>) {
        let mut inner = self.lock();
        for r in taken.into_iter().rev() {
            inner.resolutions.push_front(r);
        }
        inner.resolutions.truncate(RESOLUTION_BACKLOG);
    }
}

/// Writes all of `queue` to the socket, in order, waiting for room as needed.
async fn write_queue(write: &SocketWriter, mut queue: VecDeque<Bytes>) -> io::Result<()> {
    let mut wait = RoomWait::default();
    while !queue.is_empty() {
        let written = match write.try_write_vectored(&slices_of(&queue)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                write.room(&mut wait).await?;
                0
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        consume_parts(&mut queue, written);
    }
    Ok(())
}

/// The keeper's end of an [`AgentIo`]: the session journal, then the server.
struct KeeperSink {
    writer: JournalWriter,
    outbox: Arc<Outbox>,
    pending_file: std::path::PathBuf,
    auth_failed_file: std::path::PathBuf,
    conversation_file: std::path::PathBuf,
    log: std::fs::File,
}

impl OutputSink for KeeperSink {
    fn commit(&mut self, batch: BytesMut, ends: &[(usize, usize)]) -> Result<(), Refused> {
        let first_seq = self.writer.next_seq();
        match self.writer.append(&batch, ends.len() as u64) {
            Ok(changes) => {
                self.outbox.lines(first_seq, &changes, batch.freeze());
                Ok(())
            }
            Err(error) => Err(Refused { batch, error }),
        }
    }

    fn flush(&mut self) {
        // After the pending approvals and the authentication failure are on disk: a client
        // that sees a line may ask for the summary those files feed.
        self.outbox.flush();
    }

    fn held(&mut self, error: Option<&io::Error>) {
        match error {
            Some(e) => {
                eprintln!(
                    "moorline keeper: cannot write the journal ({e}); holding the agent's output"
                );
                self.outbox.held(true);
            }
            None => {
                eprintln!("moorline keeper: the journal takes output again");
                self.outbox.held(false);
            }
        }
    }

    fn lost(&mut self, lines: u64) {
        eprintln!(
            "moorline keeper: {lines} output lines lost: the journal stayed unwritable after the agent exited"
        );
        let mut news = vec![protocol::LOST];
        news.extend_from_slice(&lines.to_le_bytes());
        self.outbox.tell(&news);
    }

    fn pending_changed(&mut self, pending: &[serde_json::Value]) {
        write_pending(&self.pending_file, pending);
        self.outbox.tell(&[protocol::PENDING]);
    }

    fn auth_failed(&mut self) {
        log(
            &mut self.log,
            "the agent reports that its credentials are missing or wrong",
        );
        super::agentio::mark_auth_failed(&self.auth_failed_file);
    }

    fn conversation(&mut self, news: moorline_adapters::conversation::ConversationNews) {
        super::agentio::record_conversation_news(&self.conversation_file, news);
    }

    fn resolved(&mut self, resolution: Resolution) {
        // Also in the session's stderr log, in case no server hears of it.
        log(
            &mut self.log,
            &format!(
                "approval {} {} by {} ({})",
                resolution.id,
                resolution.decision,
                resolution.by,
                resolution.user.as_deref().unwrap_or("-")
            ),
        );
        self.outbox.resolved(resolution);
    }
}

impl Drop for KeeperSink {
    fn drop(&mut self) {
        let _ = self.writer.sync();
    }
}

/// Sends the connected server whatever the outbox holds, as it comes.
async fn send_outbox(write: Arc<SocketWriter>, outbox: Arc<Outbox>) {
    loop {
        outbox.notify.notified().await;
        loop {
            let (out, taken) = outbox.take();
            if out.is_empty() {
                outbox.sent();
                break;
            }
            if write_queue(&write, out).await.is_err() {
                // Not delivered: keep the approvals for the next server.
                outbox.give_back(taken);
                return;
            }
        }
    }
}

/// Reads the server's lines and passes on only complete ones. A partial line left when the
/// server goes away is dropped, never forwarded. [`USER_MARKER`] lines set who sends the
/// lines after them (until the next marker; nobody, on a new connection).
async fn forward_lines(
    read: SocketReader,
    lines: mpsc::Sender<Input>,
    max: usize,
    log_file: &mut std::fs::File,
) {
    // One read takes a whole 64 KiB line and its neighbours.
    let mut buf = vec![0u8; 256 * 1024];
    let mut splitter = LineSplitter::new(max);
    let mut forwarded = 0u64;
    let mut user: Option<Arc<str>> = None;
    let mut batch: Vec<Input> = Vec::new();
    loop {
        let n = match read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        splitter.feed(&buf[..n], &mut |piece| match piece {
            Piece::Line(line) => {
                if let Some((&USER_MARKER, name)) = line.split_first() {
                    user = Some(Arc::from(String::from_utf8_lossy(name).as_ref()));
                    return;
                }
                // The lines of one sender read at once travel together.
                let line = Bytes::copy_from_slice(line);
                match batch.last_mut() {
                    Some(last) if last.user == user && last.lines.len() < 256 => {
                        last.lines.push(line)
                    }
                    _ => batch.push(Input::line(line, user.clone())),
                }
            }
            Piece::TooLong { .. } => {
                log(
                    log_file,
                    &format!("dropping an input line longer than {max} bytes"),
                );
            }
        });
        for input in batch.drain(..) {
            forwarded += input.lines.len() as u64;
            if lines.send(input).await.is_err() {
                return;
            }
        }
    }
    let partial = splitter.discard();
    log(
        log_file,
        &format!(
            "server disconnected; forwarded {forwarded} lines, dropped a partial line of {partial} bytes"
        ),
    );
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use bytes::Bytes;

    use super::super::linequeue::{MAX_SLICES, consume_parts, slices_of};

    fn rest(queue: &VecDeque<Bytes>) -> Vec<u8> {
        queue.iter().flat_map(|b| b.iter().copied()).collect()
    }

    #[test]
    fn a_partial_write_leaves_exactly_the_unwritten_bytes_in_order() {
        let all = b"\x06head|lines one\nlines two\n\x01".to_vec();
        for written in 0..=all.len() {
            let mut queue: VecDeque<Bytes> =
                [&b"\x06head|"[..], b"lines one\nlines two\n", b"\x01"]
                    .into_iter()
                    .map(Bytes::from_static)
                    .collect();
            consume_parts(&mut queue, written);
            assert_eq!(
                rest(&queue),
                all[written..],
                "after writing {written} bytes"
            );
            assert!(
                queue.iter().all(|b| !b.is_empty()),
                "no empty buffer is left queued"
            );
        }
    }

    #[test]
    fn a_vectored_write_is_offered_the_queue_in_order() {
        let queue: VecDeque<Bytes> = (0..100u8).map(|i| Bytes::from(vec![i])).collect();
        let offered = slices_of(&queue);
        assert_eq!(offered.len(), MAX_SLICES);
        assert!(offered.iter().enumerate().all(|(i, s)| s[..] == [i as u8]));
    }
}
