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
//!   server uses), ringing a "doorbell" byte ([`DOORBELL`]) on the socket so the server reads
//!   it at once;
//! - reports every settled approval request to the server ([`RESOLUTION`], a JSON
//!   [`Resolution`] and a newline), which writes the audit log;
//! - appends the agent's stderr to the session's `stderr.log`;
//! - when the agent exits, writes `RUN_DIR/exit` atomically and leaves.
//!
//! The pane itself runs `moorline keeper-pane RUN_DIR`: it starts the keeper and shows the
//! agent's stderr to whoever attaches with `tmux attach`.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use moorline_adapters::pipeline::{ApprovalPolicy, Pipeline, Resolution};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::{Notify, mpsc};

use super::{AgentControl, Bell, ExitInfo, ExitReason};
use crate::agentio::{AgentIo, Input, OutputSink, Refused, write_pending};
use crate::journal::{JournalLimits, JournalWriter};

/// The instructions file a keeper reads from its run directory.
pub const SPEC_FILE: &str = "keeper.json";
/// The socket the server connects to.
pub const SOCKET_FILE: &str = "stdin.sock";
/// Written atomically when the agent has exited.
pub const EXIT_FILE: &str = "exit";
/// The keeper's process id.
pub const KEEPER_PID_FILE: &str = "keeper.pid";
/// The agent's process id (the group leader of everything it starts), for the `tmux` runtime.
pub const AGENT_PID_FILE: &str = "agent.pid";

/// First byte of a server-to-keeper line that names the client whose lines follow (the rest
/// of the line, UTF-8). Client lines are UTF-8 (WebSocket text, or binary frames checked to
/// be UTF-8), and 0xFF never occurs in UTF-8: no client line can be taken for a marker.
pub const USER_MARKER: u8 = 0xFF;
/// Keeper-to-server byte: the journal has grown.
pub const DOORBELL: u8 = 1;
/// Keeper-to-server byte that starts a settled approval: a JSON [`Resolution`] up to `\n`.
pub const RESOLUTION: u8 = 5;
/// Settled approvals kept for a server that is not connected (the oldest go first).
const RESOLUTION_BACKLOG: usize = 1024;

/// The marker line (with its newline) announcing that `user` sends the lines that follow.
pub fn user_marker(user: &str) -> Vec<u8> {
    let mut line = Vec::with_capacity(user.len() + 2);
    line.push(USER_MARKER);
    // Identities never hold a newline; make sure one could not end the marker early.
    line.extend(user.bytes().filter(|&b| b != b'\n'));
    line.push(b'\n');
    line
}
/// What a keeper runs and where it writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeeperSpec {
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
}

/// Reads the spec of a run directory, if there is a valid one.
pub fn read_spec(run_dir: &Path) -> Option<KeeperSpec> {
    serde_json::from_slice(&std::fs::read(path(run_dir, SPEC_FILE)).ok()?).ok()
}

fn default_hold_after_exit_ms() -> u64 {
    10_000
}

/// Where a file of the run directory is.
pub fn path(run_dir: &Path, file: &str) -> PathBuf {
    run_dir.join(file)
}

/// Reads the exit file, if the agent's end was recorded.
pub fn read_exit(run_dir: &Path) -> Option<ExitInfo> {
    let body = std::fs::read(path(run_dir, EXIT_FILE)).ok()?;
    serde_json::from_slice(&body).ok()
}

/// `moorline keeper RUN_DIR`: runs the keeper until its agent has exited.
pub fn keeper_main(run_dir: &Path) -> ExitCode {
    // Leave the pane's session: hang-ups and terminal signals in tmux must not reach us.
    let _ = nix::unistd::setsid();
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
    match runtime.block_on(keep(run_dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moorline keeper: {e}");
            // Whatever happened, say how the agent ended, or that it never started.
            let _ = write_exit(
                run_dir,
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

async fn keep(run_dir: &Path) -> io::Result<()> {
    let spec: KeeperSpec = serde_json::from_slice(&std::fs::read(path(run_dir, SPEC_FILE))?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.stderr_file)?;
    let limits = JournalLimits {
        max_bytes: spec.journal_max_bytes,
        segment_bytes: spec.journal_segment_bytes,
    };
    let (writer, _) = JournalWriter::open(&spec.journal_dir, limits)?;
    let adapter = moorline_adapters::build(&spec.adapter).map_err(io::Error::other)?;
    let mut pipeline = Pipeline::new(
        adapter.translator(),
        adapter.dialect(),
        spec.approvals.clone(),
    );
    if !spec.instance_id.is_empty() {
        pipeline = pipeline.for_instance(&spec.instance_id);
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
        std::fs::write(path(run_dir, AGENT_PID_FILE), pid.to_string())?;
    }
    log(
        &mut stderr,
        &format!(
            "started {} (pid {})",
            spec.program.display(),
            agent_pid.unwrap_or(0)
        ),
    );
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(io::Error::other("agent has no stdio pipes"));
    };
    // The socket appears only now, with the agent's and the keeper's pids on disk: the server
    // reads them as soon as it can connect.
    std::fs::write(
        path(run_dir, KEEPER_PID_FILE),
        std::process::id().to_string(),
    )?;
    let socket = path(run_dir, SOCKET_FILE);
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    }
    let oom = spec.oom_cgroup.as_deref().map(super::oom::OomWatch::start);
    let control = Arc::new(super::process::GroupControl::new(agent_pid));
    let exit_control = control.clone();
    let container = spec.container;
    let exit = Box::pin(async move {
        let info = match child.wait().await {
            Ok(status) if container => ExitInfo::from_container_status(status),
            Ok(status) => ExitInfo::from(status),
            Err(_) => ExitInfo::UNKNOWN,
        };
        exit_control.leader_exited();
        info
    });

    // Terminal signals are ignored; SIGTERM is passed on to the agent's process group.
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;

    let doorbell = Arc::new(Doorbell::default());
    let (lines_tx, lines_rx) = mpsc::channel::<Input>(1024);
    let resolutions = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
    let mut sink = KeeperSink {
        writer,
        doorbell: doorbell.clone(),
        pending_file: spec.pending_file.clone(),
        resolutions: resolutions.clone(),
        log: stderr.try_clone()?,
    };
    let io = AgentIo::new(
        spec.max_line,
        pipeline,
        Duration::from_millis(spec.exit_drain_ms),
    )
    .hold_after_exit(Duration::from_millis(spec.hold_after_exit_ms));
    let mut connection: Option<tokio::task::JoinHandle<()>> = None;
    let mut run = Box::pin(io.run(
        Box::new(stdout),
        lines_rx,
        Box::new(stdin),
        exit,
        control.clone(),
        &mut sink,
    ));
    let (exit, _) = loop {
        tokio::select! {
            done = &mut run => break done,
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                if let Some(old) = connection.take() {
                    old.abort();
                }
                let (read, write) = stream.into_split();
                let bell = doorbell.clone();
                if bell.held.load(std::sync::atomic::Ordering::Relaxed) {
                    bell.tell(&[Bell::HELD]);
                }
                let lines = lines_tx.clone();
                let mut log_file = stderr.try_clone()?;
                let max = spec.max_input_line;
                let settled = resolutions.clone();
                // Whatever a previous connection left unsent goes out first.
                doorbell.ring();
                connection = Some(tokio::spawn(async move {
                    let ring = ring_doorbell(write, bell, settled);
                    let read = forward_lines(read, lines, max, &mut log_file);
                    tokio::select! {
                        () = ring => {}
                        () = read => {}
                    }
                }));
            }
            _ = hup.recv() => {}
            _ = int.recv() => {}
            _ = term.recv() => { let _ = control.terminate(); }
        }
    };
    drop(run);
    let exit = match oom {
        Some(oom) if oom.fired() => exit.because(ExitReason::OutOfMemory),
        _ => exit,
    };
    let _ = control.kill();
    // The container is gone: so must be its network helper (it normally leaves by itself).
    super::network::stop_helper(run_dir);
    drop(sink);
    // The disk may still be full: the exit is worth waiting for a while.
    let mut wait = Duration::from_millis(20);
    let give_up = tokio::time::Instant::now() + Duration::from_millis(spec.hold_after_exit_ms);
    while let Err(e) = write_exit(run_dir, exit) {
        if tokio::time::Instant::now() >= give_up {
            return Err(e);
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
    log(&mut stderr, &format!("agent finished: {exit}"));
    let _ = std::fs::remove_file(&socket);
    // The server learns of the exit when this connection closes, after the exit file exists.
    if let Some(conn) = connection {
        conn.abort();
    }
    Ok(())
}

/// Settled approvals waiting to be sent to the server.
type Settled = Arc<std::sync::Mutex<std::collections::VecDeque<Resolution>>>;
/// What the keeper tells the server: rings (the journal grew) and changes of the journal's
/// state, which must not be lost the way surplus rings may be.
#[derive(Debug, Default)]
struct Doorbell {
    notify: Notify,
    news: std::sync::Mutex<Vec<u8>>,
    /// Whether output is held now, for a server that connects later.
    held: std::sync::atomic::AtomicBool,
}

impl Doorbell {
    fn ring(&self) {
        self.notify.notify_one();
    }

    fn tell(&self, bytes: &[u8]) {
        if let Ok(mut news) = self.news.lock() {
            news.extend_from_slice(bytes);
        }
        self.notify.notify_one();
    }

    /// What to send now: the news, or a plain ring.
    fn take(&self) -> Vec<u8> {
        let news = self
            .news
            .lock()
            .map(|mut n| std::mem::take(&mut *n))
            .unwrap_or_default();
        if news.is_empty() {
            vec![DOORBELL]
        } else {
            news
        }
    }
}

/// The keeper's end of an [`AgentIo`]: the session journal, then a ring of the doorbell.
struct KeeperSink {
    writer: JournalWriter,
    doorbell: Arc<Doorbell>,
    pending_file: PathBuf,
    resolutions: Settled,
    log: std::fs::File,
}

impl OutputSink for KeeperSink {
    fn commit(&mut self, batch: BytesMut, ends: &[(usize, usize)]) -> Result<(), Refused> {
        // The changes need not be reported: the server follows the files themselves.
        if let Err(error) = self.writer.append(&batch, ends.len() as u64) {
            return Err(Refused { batch, error });
        }
        self.doorbell.ring();
        Ok(())
    }

    fn held(&mut self, error: Option<&io::Error>) {
        match error {
            Some(e) => {
                eprintln!(
                    "moorline keeper: cannot write the journal ({e}); holding the agent's output"
                );
                self.doorbell
                    .held
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                self.doorbell.tell(&[Bell::HELD]);
            }
            None => {
                eprintln!("moorline keeper: the journal takes output again");
                self.doorbell
                    .held
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                self.doorbell.tell(&[Bell::FLOWING]);
            }
        }
    }

    fn lost(&mut self, lines: u64) {
        eprintln!(
            "moorline keeper: {lines} output lines lost: the journal stayed unwritable after the agent exited"
        );
        let mut news = vec![Bell::LOST];
        news.extend_from_slice(&lines.to_le_bytes());
        self.doorbell.tell(&news);
    }

    fn pending_changed(&mut self, pending: &[serde_json::Value]) {
        write_pending(&self.pending_file, pending);
        self.doorbell.tell(&[Bell::PENDING]);
    }

    fn auth_failed(&mut self) {
        log(
            &mut self.log,
            "the agent reports that its credentials are missing or wrong",
        );
        crate::agentio::mark_auth_failed(&self.pending_file);
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
        {
            let mut queue = self.resolutions.lock().unwrap_or_else(|p| p.into_inner());
            if queue.len() >= RESOLUTION_BACKLOG {
                queue.pop_front();
            }
            queue.push_back(resolution);
        }
        self.doorbell.ring();
    }
}

impl Drop for KeeperSink {
    fn drop(&mut self) {
        let _ = self.writer.sync();
    }
}

/// Writes the exit file atomically.
fn write_exit(run_dir: &Path, exit: ExitInfo) -> io::Result<()> {
    let body = serde_json::to_vec(&exit).map_err(io::Error::other)?;
    crate::fsio::write_private(&path(run_dir, EXIT_FILE), &body)
}

/// Tells the connected server, with one byte, that the journal has grown, or that its state
/// changed (see [`Bell`]), and sends it the approvals settled since.
async fn ring_doorbell(
    mut write: tokio::net::unix::OwnedWriteHalf,
    bell: Arc<Doorbell>,
    settled: Settled,
) {
    loop {
        bell.notify.notified().await;
        let mut out = bell.take();
        let taken: Vec<Resolution> = settled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for r in &taken {
            if let Ok(json) = serde_json::to_vec(r) {
                out.push(RESOLUTION);
                out.extend_from_slice(&json);
                out.push(b'\n');
            }
        }
        if write.write_all(&out).await.is_err() {
            // Not delivered: keep them for the next server.
            let mut queue = settled.lock().unwrap_or_else(|p| p.into_inner());
            for r in taken.into_iter().rev() {
                queue.push_front(r);
            }
            queue.truncate(RESOLUTION_BACKLOG);
            return;
        }
    }
}

/// Reads the server's lines and passes on only complete ones. A partial line left when the
/// server goes away is dropped, never forwarded. [`USER_MARKER`] lines set who sends the
/// lines after them (until the next marker; nobody, on a new connection).
async fn forward_lines(
    mut read: OwnedReadHalf,
    lines: mpsc::Sender<Input>,
    max: usize,
    log_file: &mut std::fs::File,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut skipping = false;
    let mut forwarded = 0u64;
    let mut user: Option<Arc<str>> = None;
    loop {
        let n = match read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let _ = n;
        if skipping {
            match memchr::memchr(b'\n', &buf) {
                Some(i) => {
                    let _ = buf.split_to(i + 1);
                    skipping = false;
                }
                None => {
                    buf.clear();
                    continue;
                }
            }
        }
        if let Some(last) = memchr::memrchr(b'\n', &buf) {
            let complete = buf.split_to(last + 1).freeze();
            let mut start = 0;
            for end in memchr::memchr_iter(b'\n', &complete) {
                let line = complete.slice(start..end);
                start = end + 1;
                if let Some((&USER_MARKER, name)) = line.split_first() {
                    user = Some(Arc::from(String::from_utf8_lossy(name).as_ref()));
                    continue;
                }
                forwarded += 1;
                let input = Input {
                    line,
                    user: user.clone(),
                };
                if lines.send(input).await.is_err() {
                    return;
                }
            }
        }
        if buf.len() > max {
            log(
                log_file,
                &format!("dropping an input line longer than {max} bytes"),
            );
            buf.clear();
            skipping = true;
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
    }
    log(
        log_file,
        &format!(
            "server disconnected; forwarded {forwarded} lines, dropped a partial line of {} bytes",
            buf.len()
        ),
    );
}

/// `moorline keeper-pane RUN_DIR`: what a tmux pane shows. Starts the keeper detached, then
/// shows the agent's stderr until the keeper exits. Ctrl-C and Ctrl-Z are ignored here; the
/// agent never sees them.
pub fn pane_main(run_dir: &Path, moorline_exe: &Path) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moorline: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(pane(run_dir, moorline_exe)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moorline: {e}");
            // Keep the message readable for a moment if someone is attached.
            std::thread::sleep(Duration::from_secs(2));
            ExitCode::from(1)
        }
    }
}

async fn pane(run_dir: &Path, moorline_exe: &Path) -> io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut tstp = signal(SignalKind::from_raw(
        nix::sys::signal::Signal::SIGTSTP as i32,
    ))?;
    let mut quit = signal(SignalKind::quit())?;
    let spec: KeeperSpec = serde_json::from_slice(&std::fs::read(path(run_dir, SPEC_FILE))?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.stderr_file)?;
    let start = log.metadata()?.len();
    let mut keeper = tokio::process::Command::new(moorline_exe)
        .arg("keeper")
        .arg(run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()?;
    println!(
        "moorline session {}: the agent's stderr follows.\r\nCtrl-C does not stop the agent; detach with C-b d.\r",
        spec.session_id
    );
    let mut file = tokio::fs::File::open(&spec.stderr_file).await?;
    {
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(start)).await?;
    }
    let mut out = tokio::io::stdout();
    let mut buf = vec![0u8; 16 * 1024];
    let mut done = false;
    loop {
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            // The pane is a terminal: turn bare newlines into CRLF.
            let text = String::from_utf8_lossy(&buf[..n]).replace('\n', "\r\n");
            out.write_all(text.as_bytes()).await?;
            out.flush().await?;
        }
        if done {
            return Ok(());
        }
        tokio::select! {
            _ = keeper.wait() => done = true,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = int.recv() => { out.write_all(b"\r\n(Ctrl-C ignored: the agent keeps running; detach with C-b d)\r\n").await?; }
            _ = tstp.recv() => {}
            _ = quit.recv() => {}
        }
    }
}
