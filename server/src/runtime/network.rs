//! The isolated container network (`network = "isolated"`, the default of the runc runtime).
//!
//! runc gives the container a network namespace of its own. Before the agent starts, an OCI
//! `createRuntime` hook (`moorline net-hook RUN_DIR`, run by runc in the host's namespaces) starts
//! a detached helper (`moorline net-helper RUN_DIR PID`) and waits until it says the network is
//! ready, so the agent never runs without its network and a failure fails the start with the
//! helper's message. The helper:
//!
//! - runs slirp4netns against the container: a user-mode TCP/IP stack that gives the namespace
//!   `tap0` (10.0.2.100/24, gateway 10.0.2.2, DNS 10.0.2.3) and makes the agent's outbound
//!   connections from the host as ordinary sockets, with the host's loopback switched off
//!   (`--disable-host-loopback`): nothing on the host's 127.0.0.1, moorline's port included,
//!   is reachable through it;
//! - for each of the instance's `host_ports`, has a short-lived `moorline net-listen` join the
//!   container's namespaces (its user namespace too when rootless: only a process inside may
//!   open sockets there), listen on 127.0.0.1 (and ::1) at that port, and pass the listening
//!   sockets back over a Unix socket; the helper, still in the host's namespaces, accepts on them
//!   and relays each connection to the same port on the host's loopback;
//! - watches the container's init through a pidfd and, when it is gone, stops slirp4netns and
//!   exits. slirp4netns also exits when the helper dies (its `--exit-fd` is a pipe only the
//!   helper holds), and the keeper and the runtime's cleanup kill the helper's process group
//!   (recorded in `RUN_DIR/net.pid`), so nothing outlives its session.
//!
//! The helper is not a child of the server: like the keeper, it survives a server restart.

use std::io::{self, BufRead, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::keeper::layout::RunDir;

/// slirp4netns' built-in DNS forwarder, as the container sees it.
pub const SLIRP_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// How long runc lets the hook run before it kills it and fails the start.
pub const HOOK_TIMEOUT_SECS: i64 = 30;
/// How long slirp4netns gets to configure the namespace.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The interface slirp4netns creates in the container.
const TAP: &str = "tap0";
/// slirp4netns' largest MTU: fewer, larger packets through the user-mode stack.
const MTU: &str = "65520";

/// Errors setting up or running an isolated network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A system call or file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The network could not be made ready.
    #[error("{0}")]
    Failed(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Io { what, source }
}

/// How one container's network is set up (written by the runtime, read by the hook's helper).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPlan {
    /// The slirp4netns program (absolute).
    pub slirp4netns: PathBuf,
    /// Host loopback ports forwarded into the container.
    pub host_ports: Vec<u16>,
    /// Whether the container has a user namespace (rootless): helpers must join it.
    pub rootless: bool,
}

/// The OCI hook that sets up a container's isolated network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkHook {
    /// The moorline executable.
    pub path: PathBuf,
    /// Its arguments, `argv[0]` included.
    pub args: Vec<String>,
}

impl NetworkHook {
    /// The hook for a session's run directory.
    pub fn new(moorline_exe: &Path, run_dir: &Path) -> Self {
        Self {
            path: moorline_exe.to_owned(),
            args: vec![
                moorline_exe.display().to_string(),
                "net-hook".into(),
                run_dir.display().to_string(),
            ],
        }
    }
}

/// Writes the plan the hook will read.
pub fn write_plan(run_dir: &Path, plan: &NetworkPlan) -> io::Result<()> {
    let body = serde_json::to_vec(plan).map_err(io::Error::other)?;
    crate::keeper::fsio::write_private(&RunDir::new(run_dir).network_plan(), &body)
}

/// The resolver configuration a container on the isolated network needs, when the host's
/// (`host`, the text of its `/etc/resolv.conf`) does not do: a loopback resolver (such as
/// systemd-resolved's 127.0.0.53) is out of reach, so its nameservers become slirp4netns'
/// forwarder, which asks the host's resolvers from the host. `None`: the host's file works.
pub fn container_resolv_conf(host: &str) -> Option<String> {
    let is_loopback_server = |line: &str| {
        let mut words = line.split_whitespace();
        words.next() == Some("nameserver")
            && words
                .next()
                .and_then(|a| a.split('%').next()?.parse::<std::net::IpAddr>().ok())
                .is_some_and(|ip| ip.is_loopback())
    };
    if !host.lines().any(is_loopback_server) {
        return None;
    }
    let mut out = String::new();
    let mut named = false;
    for line in host.lines() {
        if line.split_whitespace().next() == Some("nameserver") {
            if !named {
                out.push_str(&format!("nameserver {SLIRP_DNS}\n"));
                named = true;
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    Some(out)
}

/// The part of the OCI state runc gives hooks on stdin that the hook needs.
#[derive(Debug, Deserialize)]
struct HookState {
    pid: i32,
}

/// `moorline net-hook RUN_DIR`: the container's `createRuntime` hook. Starts the helper and
/// returns once the network is ready; a failure (exit 1, the reason on stderr) fails the start.
pub fn hook_main(run_dir: &Path, moorline_exe: &Path) -> ExitCode {
    match hook(run_dir, moorline_exe) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moorline: the isolated network did not start: {e}");
            ExitCode::from(1)
        }
    }
}

fn hook(run_dir: &Path, moorline_exe: &Path) -> Result<(), NetworkError> {
    let mut state = Vec::new();
    io::stdin()
        .read_to_end(&mut state)
        .map_err(io_err("reading the container state"))?;
    let state: HookState = serde_json::from_slice(&state)
        .map_err(|e| NetworkError::Failed(format!("bad container state from runc: {e}")))?;
    let log = open_log(run_dir)?;
    let start = log.metadata().map(|m| m.len()).unwrap_or(0);
    // The helper must not hold runc's pipes (runc waits for them to close): its stdout is a
    // pipe of its own that says "ready", its stderr the log.
    let mut helper = std::process::Command::new(moorline_exe)
        .arg("net-helper")
        .arg(run_dir)
        .arg(state.pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(io_err(format!("starting {}", moorline_exe.display())))?;
    let mut line = String::new();
    if let Some(out) = helper.stdout.take() {
        let _ = io::BufReader::new(out).read_line(&mut line);
    }
    if line.trim() == "ready" {
        return Ok(());
    }
    let _ = helper.wait();
    Err(NetworkError::Failed(log_since(run_dir, start)))
}

fn open_log(run_dir: &Path) -> Result<std::fs::File, NetworkError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(RunDir::new(run_dir).network_log())
        .map_err(io_err(format!(
            "opening {}",
            RunDir::new(run_dir).network_log().display()
        )))
}

/// What the log says since `start` (the helper's own words on why it failed).
fn log_since(run_dir: &Path, start: u64) -> String {
    let text = std::fs::read(RunDir::new(run_dir).network_log()).unwrap_or_default();
    let from = (start as usize).min(text.len());
    let tail = String::from_utf8_lossy(&text[from..]).trim().to_owned();
    if tail.is_empty() {
        "the network helper exited without a word".into()
    } else {
        tail.lines().collect::<Vec<_>>().join("; ")
    }
}

/// `moorline net-helper RUN_DIR PID`: runs slirp4netns and the port forwarder for the container
/// whose init is `PID`, until that init is gone.
pub fn helper_main(run_dir: &Path, pid: i32, moorline_exe: &Path) -> ExitCode {
    // A session of its own, like the keeper: nothing aimed at runc's or the keeper's group
    // reaches it, and its own group (slirp4netns included) can be killed at once.
    let _ = nix::unistd::setsid();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moorline net-helper: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(helper(run_dir, pid, moorline_exe)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moorline net-helper: {e}");
            ExitCode::from(1)
        }
    }
}

async fn helper(run_dir: &Path, pid: i32, moorline_exe: &Path) -> Result<(), NetworkError> {
    let plan: NetworkPlan = serde_json::from_slice(
        &std::fs::read(RunDir::new(run_dir).network_plan())
            .map_err(io_err("reading the network plan"))?,
    )
    .map_err(|e| NetworkError::Failed(format!("bad network plan: {e}")))?;
    let container = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| NetworkError::Failed(format!("bad container pid {pid}")))?;
    let pidfd = rustix::process::pidfd_open(container, rustix::process::PidfdFlags::empty())
        .map_err(|e| io_err(format!("watching the container (pid {pid})"))(e.into()))?;
    crate::keeper::fsio::write_private(
        &RunDir::new(run_dir).network_pid(),
        std::process::id().to_string().as_bytes(),
    )
    .map_err(io_err("writing net.pid"))?;

    let mut slirp = tokio::process::Command::new(&plan.slirp4netns);
    slirp.args([
        "--configure",
        "--mtu",
        MTU,
        "--disable-host-loopback",
        "--enable-sandbox",
        "--enable-seccomp",
        // slirp4netns says "1" on its stdout once the namespace is configured, and exits
        // when its stdin (a pipe only this helper holds) closes.
        "--ready-fd=1",
        "--exit-fd=0",
    ]);
    if plan.rootless {
        slirp.arg(format!("--userns-path=/proc/{pid}/ns/user"));
    }
    let mut slirp = slirp
        .arg(pid.to_string())
        .arg(TAP)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(io_err(format!("starting {}", plan.slirp4netns.display())))?;
    let _exit_fd = slirp.stdin.take();
    let ready = match slirp.stdout.take() {
        Some(out) => tokio::time::timeout(READY_TIMEOUT, slirp_ready(out)).await,
        None => Ok(false),
    };
    match ready {
        Ok(true) => {}
        Err(_) => {
            return Err(NetworkError::Failed(format!(
                "{} did not configure the network in {} s",
                plan.slirp4netns.display(),
                READY_TIMEOUT.as_secs()
            )));
        }
        Ok(false) => {
            let status = tokio::time::timeout(Duration::from_secs(1), slirp.wait()).await;
            return Err(NetworkError::Failed(format!(
                "{} failed ({}) before the network was ready",
                plan.slirp4netns.display(),
                match status {
                    Ok(Ok(s)) => s.to_string(),
                    _ => "it did not say why".into(),
                }
            )));
        }
    }

    let listeners = if plan.host_ports.is_empty() {
        Vec::new()
    } else {
        let exe = moorline_exe.to_owned();
        let ports = plan.host_ports.clone();
        let rootless = plan.rootless;
        let opened =
            tokio::task::spawn_blocking(move || listen_inside(&exe, pid, rootless, &ports));
        match tokio::time::timeout(READY_TIMEOUT, opened).await {
            Ok(Ok(result)) => result?,
            Ok(Err(e)) => return Err(NetworkError::Failed(format!("net-listen: {e}"))),
            Err(_) => {
                return Err(NetworkError::Failed(format!(
                    "the forwarded host_ports did not open in {} s",
                    READY_TIMEOUT.as_secs()
                )));
            }
        }
    };
    for listener in listeners {
        listener
            .set_nonblocking(true)
            .map_err(io_err("forwarded port"))?;
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(io_err("forwarded port"))?;
        tokio::spawn(forward(listener));
    }
    println!("ready");
    let _ = io::stdout().flush();

    // A pidfd becomes readable when its process has exited.
    let mut container_gone = tokio::task::spawn_blocking(move || {
        let mut fds = [rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        while let Err(rustix::io::Errno::INTR) = rustix::event::poll(&mut fds, None) {}
    });
    tokio::select! {
        _ = &mut container_gone => {}
        status = slirp.wait() => {
            // The container is cut off from the outside now; its forwarded ports still work.
            eprintln!("moorline net-helper: slirp4netns ended early ({status:?})");
            let _ = container_gone.await;
        }
    }
    let _ = slirp.start_kill();
    let _ = slirp.wait().await;
    let _ = std::fs::remove_file(RunDir::new(run_dir).network_pid());
    Ok(())
}

/// Whether slirp4netns says it is ready: "1" on its stdout, after any warnings it prints there
/// (whole lines, such as the one about seccomp being experimental).
async fn slirp_ready(mut out: tokio::process::ChildStdout) -> bool {
    use tokio::io::AsyncReadExt;
    let mut said = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match out.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => said.extend_from_slice(&buf[..n]),
        }
        let pending = match memchr::memrchr(b'\n', &said) {
            Some(i) => &said[i + 1..],
            None => &said[..],
        };
        if pending == b"1" {
            return true;
        }
        if said.len() > 64 * 1024 {
            return false;
        }
    }
}

/// Runs `moorline net-listen` to open the forwarded ports inside the container, and receives
/// the listening sockets it passes back.
fn listen_inside(
    moorline_exe: &Path,
    pid: i32,
    rootless: bool,
    ports: &[u16],
) -> Result<Vec<TcpListener>, NetworkError> {
    let (ours, theirs) = UnixStream::pair().map_err(io_err("socket pair"))?;
    let mut cmd = std::process::Command::new(moorline_exe);
    cmd.arg("net-listen").arg(pid.to_string());
    if rootless {
        cmd.arg("--userns");
    }
    cmd.args(ports.iter().map(u16::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::from(OwnedFd::from(theirs)))
        .stderr(Stdio::inherit());
    let spawned = cmd.spawn();
    // The command holds our copy of the child's end: without it, the end of the child is
    // the end of the stream.
    drop(cmd);
    let mut child = spawned.map_err(io_err("starting net-listen"))?;
    let mut listeners = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &ours,
            &mut [io::IoSliceMut::new(&mut byte)],
            &mut control,
            rustix::net::RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|e| io_err("receiving forwarded ports")(e.into()))?;
        for message in control.drain() {
            if let rustix::net::RecvAncillaryMessage::ScmRights(fds) = message {
                listeners.extend(fds.map(TcpListener::from));
            }
        }
        if got.bytes == 0 {
            break;
        }
    }
    let status = child.wait().map_err(io_err("net-listen"))?;
    if !status.success() {
        return Err(NetworkError::Failed(format!(
            "could not open the forwarded host_ports in the container ({status})"
        )));
    }
    Ok(listeners)
}

/// Accepts connections on a forwarded port and relays each to the same port on the host's
/// loopback.
async fn forward(listener: tokio::net::TcpListener) {
    let Ok(local) = listener.local_addr() else {
        return;
    };
    let port = local.port();
    loop {
        match listener.accept().await {
            Ok((inside, _)) => {
                tokio::spawn(relay(inside, port));
            }
            // Out of descriptors, most likely: the agent opened too many connections.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn relay(mut inside: tokio::net::TcpStream, port: u16) {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let mut outside = match tokio::net::TcpStream::connect(v4).await {
        Ok(s) => s,
        Err(_) => match tokio::net::TcpStream::connect(v6).await {
            Ok(s) => s,
            // Closing the inside connection tells the agent the port is not there.
            Err(_) => return,
        },
    };
    let _ = inside.set_nodelay(true);
    let _ = outside.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut inside, &mut outside).await;
}

/// `moorline net-listen PID [--userns] PORT...`: joins the network namespace of process `PID`
/// (and first its user namespace with `--userns`), listens on 127.0.0.1 and ::1 at each port,
/// and passes the sockets to the helper over stdout (a Unix socket). It must be
/// single-threaded to join a user namespace, so it does nothing else.
pub fn listen_main(pid: i32, userns: bool, ports: &[u16]) -> ExitCode {
    match listen(pid, userns, ports) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moorline net-listen: {e}");
            ExitCode::from(1)
        }
    }
}

fn listen(pid: i32, userns: bool, ports: &[u16]) -> Result<(), NetworkError> {
    use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
    let open = |ns: &str| {
        std::fs::File::open(format!("/proc/{pid}/ns/{ns}"))
            .map_err(io_err(format!("opening the container's {ns} namespace")))
    };
    // Both are opened before joining either: inside the user namespace the host's /proc may
    // no longer let us.
    let user = userns.then(|| open("user")).transpose()?;
    let net = open("net")?;
    if let Some(user) = &user {
        move_into_link_name_space(user.as_fd(), Some(LinkNameSpaceType::User))
            .map_err(|e| io_err("joining the container's user namespace")(e.into()))?;
    }
    move_into_link_name_space(net.as_fd(), Some(LinkNameSpaceType::Network))
        .map_err(|e| io_err("joining the container's network namespace")(e.into()))?;
    let out = io::stdout();
    for port in ports {
        let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, *port)).map_err(io_err(format!(
            "listening on 127.0.0.1:{port} in the container"
        )))?;
        send_fd(&out, v4.as_fd())?;
        // IPv6 loopback is there unless the kernel has IPv6 off; tools that try ::1 first then
        // find the port too.
        if let Ok(v6) = TcpListener::bind((Ipv6Addr::LOCALHOST, *port)) {
            send_fd(&out, v6.as_fd())?;
        }
    }
    Ok(())
}

fn send_fd(socket: &io::Stdout, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), NetworkError> {
    let fds = [fd];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
    rustix::net::sendmsg(
        socket,
        &[io::IoSlice::new(b"p")],
        &mut control,
        rustix::net::SendFlags::empty(),
    )
    .map_err(|e| io_err("passing a forwarded port")(e.into()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_resolver_is_replaced_by_slirp_dns() {
        let host = "# managed\nnameserver 127.0.0.53\nnameserver ::1\noptions edns0 trust-ad\nsearch example.com\n";
        assert_eq!(
            container_resolv_conf(host).expect("rewritten"),
            "# managed\nnameserver 10.0.2.3\noptions edns0 trust-ad\nsearch example.com\n"
        );
        assert_eq!(container_resolv_conf("nameserver 10.255.255.53\n"), None);
        assert_eq!(container_resolv_conf(""), None);
    }
}
