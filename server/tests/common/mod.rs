//! Test harness: a real moorline server on 127.0.0.1:0, real agents, real sockets.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use moorline::config::{Config, InstanceConfig, RuntimeKind};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound for any single wait in a test; nothing normally comes close.
pub const WAIT: Duration = Duration::from_secs(20);

/// The fixture agent binary (built with the workspace).
pub fn fixture_agent() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join("fixture-agent");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so it is built",
        path.display()
    );
    path
}

/// The moorline binary.
pub fn moorline_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moorline"))
}

pub fn instance(id: &str, agent: &str) -> InstanceConfig {
    let mut inst = InstanceConfig::new(id, agent);
    inst.runtime = RuntimeKind::Process;
    inst
}

/// A config with the fixture agent (`fixture`, the default), `cat`, and the built-in `echo`.
pub fn test_config(state_dir: PathBuf) -> Config {
    let mut fixture = instance("fixture", "fixture");
    fixture.agent_path = Some(fixture_agent());
    // Tests choose working directories under /tmp and set variables named FROM_*.
    fixture.workspace_roots = vec![std::env::temp_dir()];
    fixture.allowed_env = vec!["FROM_*".into()];
    let mut cat = instance("cat", "command");
    cat.command = Some(vec!["/bin/cat".into()]);
    let mut config = Config {
        state_dir,
        detect_tailnet_names: false,
        instances: vec![fixture, cat, instance("echo", "echo")],
        moorline_exe: Some(moorline_exe()),
        ..Config::default()
    };
    config.limits.stop_grace_ms = 2_000;
    // Tests run as root, in root-owned directories: agents get an unprivileged user, as
    // moorline never runs them as root.
    config.runtime.agent_user = Some(format!("{TEST_UID}:{TEST_UID}"));
    config
}

/// The unprivileged user agents run as in tests (`nobody`).
pub const TEST_UID: u32 = 65534;

/// A temporary workspace an agent can work in: owned by [`TEST_UID`] when the tests run as
/// root (the agent runs as the workspace's owner), else by the test's own user.
pub fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("workspace");
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(dir.path(), Some(TEST_UID), Some(TEST_UID)).expect("chown");
    }
    dir
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: tempfile::TempDir,
    pub http: reqwest::Client,
    /// The server's Unix socket, when it listens on one ([`TestServer::start_unix`]).
    pub socket: Option<PathBuf>,
    /// Holds the socket's directory.
    _socket_dir: Option<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), moorline::ServerError>>>,
}

impl TestServer {
    /// The directory the server keeps session `id` in.
    pub fn session_dir(&self, id: &str) -> std::path::PathBuf {
        self.state.path().join("sessions").join(id)
    }

    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let state = tempfile::tempdir().expect("state dir");
        let mut config = test_config(state.path().to_owned());
        tweak(&mut config);
        Self::start_in(state, config).await
    }

    /// Starts a server listening on 127.0.0.1:0 and on a Unix socket in a fresh directory
    /// (`unix_socket` in the config is set to it before `tweak` runs).
    pub async fn start_unix(tweak: impl FnOnce(&mut Config)) -> Self {
        let state = tempfile::tempdir().expect("state dir");
        let dir = tempfile::tempdir().expect("socket dir");
        let mut config = test_config(state.path().to_owned());
        // The socket may not lie in a directory agents can see: keep the fixture's workspace
        // roots away from the temporary directory that holds it.
        config.instances[0].workspace_roots = vec![state.path().join("work")];
        config.unix_socket = Some(dir.path().join("moorline.sock"));
        tweak(&mut config);
        let mut server = Self::start_listening(state, config).await;
        server._socket_dir = Some(dir);
        server
    }

    /// Starts a server over an existing state directory (to test restarts).
    pub async fn start_in(state: tempfile::TempDir, config: Config) -> Self {
        Self::start_listening(state, config).await
    }

    /// Binds what `config` asks for (TCP on port 0 when `tcp` is on) and starts the server.
    async fn start_listening(state: tempfile::TempDir, mut config: Config) -> Self {
        static LOG: std::sync::Once = std::sync::Once::new();
        LOG.call_once(|| {
            if let Some(path) = std::env::var_os("DEBUG_TEST_LOG") {
                let file = std::fs::File::create(path).expect("log file");
                let _ = tracing_subscriber::fmt()
                    .with_env_filter("moorline=trace")
                    .with_ansi(false)
                    .with_writer(std::sync::Mutex::new(file))
                    .try_init();
            }
        });
        config.validate().expect("valid test config");
        config.port = 0;
        let socket = config.unix_socket.clone();
        let listeners = moorline::Listeners::bind(&config).await.expect("bind");
        let addr = listeners
            .tcp
            .as_ref()
            .map(|l| l.local_addr().expect("addr"))
            .unwrap_or_else(|| "127.0.0.1:9".parse().expect("addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(moorline::run(listeners, config, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            state,
            http: http(),
            socket,
            _socket_dir: None,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// An HTTP client that reaches the server through its Unix socket (use `http://localhost`
    /// URLs with it).
    pub fn unix_http(&self) -> reqwest::Client {
        moorline::client::install_tls_provider();
        reqwest::Client::builder()
            .unix_socket(self.socket.clone().expect("a unix socket"))
            .build()
            .expect("client")
    }

    /// A WebSocket through the Unix socket, with extra headers.
    pub async fn unix_ws(
        &self,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<Ws<tokio::net::UnixStream>, (u16, String)> {
        let socket = self.socket.as_ref().expect("a unix socket");
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .expect("connect");
        let request = ws_request(&format!("ws://localhost{path}"), headers);
        handshake(tokio_tungstenite::client_async(request, stream)).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let resp = self.http.get(self.url(path)).send().await.expect("GET");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.get(path).await;
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .body(body.to_owned())
            .send()
            .await
            .expect("POST");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn delete(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .delete(self.url(path))
            .send()
            .await
            .expect("DELETE");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    }

    /// Creates a session of `instance` and returns its id.
    pub async fn session(&self, instance: &str) -> String {
        let (status, body) = self
            .post("/sessions", &format!(r#"{{"instanceId":"{instance}"}}"#))
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().expect("id").to_owned()
    }

    pub async fn ws(&self, id: &str) -> Ws {
        self.ws_query(id, "").await
    }

    pub async fn ws_query(&self, id: &str, query: &str) -> Ws {
        Ws::connect(&self.ws_url(&format!("/sessions/{id}{query}"))).await
    }

    /// Stops the server the way SIGTERM does and waits for `run` to return.
    pub async fn stop(mut self) {
        self.stop_in_place().await;
    }

    pub async fn stop_in_place(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(WAIT, handle)
                .await
                .expect("server stops in time")
                .expect("server task")
                .expect("server result");
        }
    }

    /// Stops the server and hands back its state directory.
    pub async fn stop_keep_state(mut self) -> tempfile::TempDir {
        self.stop_in_place().await;

        std::mem::replace(&mut self.state, tempfile::tempdir().expect("tmp"))
    }
}

/// A plain HTTP client for tests.
pub fn http() -> reqwest::Client {
    moorline::client::install_tls_provider();
    reqwest::Client::new()
}

/// A WebSocket request for `url` with extra headers.
fn ws_request(
    url: &str,
    headers: &[(&'static str, &str)],
) -> tungstenite::handshake::client::Request {
    let mut request = url.into_client_request().expect("request");
    for (k, v) in headers {
        request.headers_mut().insert(*k, v.parse().expect("header"));
    }
    request
}

/// Finishes a client handshake in time: the socket, or the HTTP status and body of a refusal.
async fn handshake<S>(
    connect: impl Future<
        Output = Result<
            (WebSocketStream<S>, tungstenite::handshake::client::Response),
            tungstenite::Error,
        >,
    >,
) -> Result<Ws<S>, (u16, String)> {
    match tokio::time::timeout(WAIT, connect)
        .await
        .expect("connect in time")
    {
        Ok((socket, _)) => Ok(Ws {
            socket,
            record: None,
        }),
        Err(tungstenite::Error::Http(resp)) => Err((
            resp.status().as_u16(),
            resp.body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
        )),
        Err(e) => panic!("websocket error: {e}"),
    }
}

pub struct Ws<S = MaybeTlsStream<TcpStream>> {
    pub socket: WebSocketStream<S>,
    /// Every JSON frame read, when a test asks for them (`Some`).
    pub record: Option<Vec<Value>>,
}

impl Ws {
    pub async fn connect(url: &str) -> Self {
        Self::try_connect(url, &[])
            .await
            .expect("websocket connects")
    }

    /// Connects with extra headers; returns the HTTP status and body on refusal.
    pub async fn try_connect(
        url: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<Self, (u16, String)> {
        handshake(tokio_tungstenite::connect_async(ws_request(url, headers))).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Ws<S> {
    pub async fn send(&mut self, text: &str) {
        self.socket.send(Message::text(text)).await.expect("send");
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send(&format!("{value}\n")).await;
    }

    /// The next text frame.
    pub async fn text(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("frame in time")
                .expect("stream open")
                .expect("frame");
            match msg {
                Message::Text(t) => return t.to_string(),
                Message::Close(c) => panic!("unexpected close: {c:?}"),
                _ => {}
            }
        }
    }

    pub async fn json(&mut self) -> Value {
        let text = self.text().await;
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        if let Some(record) = self.record.as_mut() {
            record.push(v.clone());
        }
        v
    }

    /// Waits for the close frame and returns its code and reason; panics on data frames.
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            let msg = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("close in time");
            match msg {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) => {
                    return (u16::from(CloseCode::Status), String::new());
                }
                Some(Ok(Message::Text(t))) => panic!("expected close, got frame {t}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("connection broke instead of closing: {e}"),
                None => panic!("connection ended without a close frame"),
            }
        }
    }
}

/// Log lines of the `moorline::audit` target, as JSON objects, captured for the whole test
/// binary (tests running in parallel share it: pick lines by session id).
pub fn audit_lines() -> Vec<Value> {
    log_lines("moorline::audit")
}

/// Captured log lines (audit lines, and warnings of `moorline::security`) of one target.
pub fn log_lines(target: &str) -> Vec<Value> {
    let text = {
        let buf = AUDIT
            .get_or_init(install_audit_capture)
            .lock()
            .expect("lock");
        String::from_utf8_lossy(&buf).into_owned()
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == target)
        .collect()
}

/// Starts capturing log lines (call before the server starts, so nothing is missed).
pub fn capture_audit() {
    AUDIT.get_or_init(install_audit_capture);
}

static AUDIT: std::sync::OnceLock<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> =
    std::sync::OnceLock::new();

fn install_audit_capture() -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = buf.clone();
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter("moorline::audit=info,moorline::security=warn")
        .with_writer(move || AuditWriter(sink.clone()))
        .try_init();
    buf
}

struct AuditWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for AuditWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Polls `check` until it returns true (a condition with no event to wait on, such as another
/// process disappearing), failing after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether process `pid` is gone (or a zombie nobody has reaped yet).
pub fn process_gone(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Why the runc/tmux tests cannot run here, if they cannot (runc containers get the isolated
/// network by default, which needs slirp4netns).
pub fn durable_unavailable() -> Option<String> {
    if !nix::unistd::getuid().is_root() {
        return Some("not running as root".into());
    }
    for tool in ["runc", "tmux", "tini", "slirp4netns"] {
        let found = std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .any(|d| std::path::Path::new(d).join(tool).is_file());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// Skips a test (with the reason printed) when runc, tmux and tini cannot be used as root.
#[macro_export]
macro_rules! require_durable {
    () => {
        if let Some(why) = common::durable_unavailable() {
            eprintln!("SKIPPED: this test needs root, runc, tmux, tini and slirp4netns: {why}");
            return;
        }
    };
}

/// Passes `keys` of the test's environment on to agents, as `runtime.pass_env` does for a
/// server started from the command line.
pub fn pass_env(config: &mut Config, keys: &[&str]) {
    for key in keys {
        if let Ok(value) = std::env::var(key) {
            config.runtime.passed_env.insert((*key).into(), value);
        }
    }
}

/// A private tmux server and runc state directory for one test, cleaned up when dropped:
/// durable agents outlive servers by design, so tests must remove them explicitly.
pub struct Sandbox {
    pub tmux_socket: String,
    pub runc_root: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        let mut raw = [0u8; 4];
        getrandom::fill(&mut raw).expect("random");
        Self {
            tmux_socket: format!(
                "moorline-test-{:02x}{:02x}{:02x}{:02x}",
                raw[0], raw[1], raw[2], raw[3]
            ),
            runc_root: tempfile::tempdir().expect("runc root"),
        }
    }

    /// Points a configuration at this sandbox.
    pub fn apply(&self, config: &mut Config) {
        config.runtime.tmux_socket = self.tmux_socket.clone();
        config.runtime.runc_root = Some(self.runc_root.path().to_owned());
        pass_env(config, &["PATH"]);
    }

    /// Container ids in the runc state directory.
    pub fn containers(&self) -> Vec<String> {
        std::fs::read_dir(self.runc_root.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }

    /// Session names on the sandbox's tmux server.
    pub fn tmux_sessions(&self) -> Vec<String> {
        std::process::Command::new("tmux")
            .args([
                "-L",
                &self.tmux_socket,
                "list-sessions",
                "-F",
                "#{session_name}",
            ])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn tmux(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("tmux")
            .args(["-L", &self.tmux_socket])
            .args(args)
            .output()
            .expect("tmux")
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let root = self.runc_root.path().to_owned();
        for id in self.containers() {
            for args in [
                vec!["kill", id.as_str(), "KILL"],
                vec!["delete", "--force", id.as_str()],
            ] {
                let _ = std::process::Command::new("runc")
                    .arg("--root")
                    .arg(&root)
                    .args(&args)
                    .output();
            }
            moorline::runtime::runc::remove_cgroups(&id);
        }
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.tmux_socket, "kill-server"])
            .output();
    }
}

/// `program` as found in `PATH`, if it is there.
pub fn find_in_path(program: &str) -> Option<std::path::PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.is_file())
}

// Git repositories for project tests, owned by the user agents run as.

/// Runs git in `dir` as the test user agents run as (who owns the repository).
pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new("git");
    cmd.arg("-C")
        .arg(dir)
        .args(["-c", "user.name=T", "-c", "user.email=t@example.com"])
        .args(args)
        .env("HOME", "/nonexistent")
        .env("GIT_CONFIG_NOSYSTEM", "1");
    if nix::unistd::geteuid().is_root() {
        use std::os::unix::process::CommandExt;
        cmd.uid(TEST_UID).gid(TEST_UID);
    }
    let out = cmd.output().expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A repository with one commit on `main`, inside a workspace the agents' user owns.
pub fn repository() -> (tempfile::TempDir, PathBuf) {
    let root = workspace();
    let repo = root.path().join("app");
    std::fs::create_dir(&repo).expect("mkdir");
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(&repo, Some(TEST_UID), Some(TEST_UID)).expect("chown");
    }
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("story.txt"), "once\n").expect("write");
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(repo.join("story.txt"), Some(TEST_UID), Some(TEST_UID))
            .expect("chown");
    }
    git(&repo, &["add", "story.txt"]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    (root, repo)
}

/// Writes a file in a worktree as its owner would.
pub fn edit(dir: &std::path::Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(&path, Some(TEST_UID), Some(TEST_UID)).expect("chown");
    }
}

/// The scripted model API (`fixtures/`), on 127.0.0.1:0, killed when dropped.
pub struct MockModel {
    child: std::process::Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl MockModel {
    pub fn start() -> Self {
        let exe = fixture_agent().with_file_name("mock-model-api");
        let mut child = std::process::Command::new(exe)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mock-model-api");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("listening line");
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .expect("address")
            .to_owned();
        Self { child, addr }
    }
}

impl Drop for MockModel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
