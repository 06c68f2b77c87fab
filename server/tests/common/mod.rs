//! Test harness: a real moorline server on 127.0.0.1:0, real agents, real sockets.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use moorline::config::{Config, InstanceConfig, RuntimeKind};
use serde_json::Value;
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
    config
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: tempfile::TempDir,
    pub http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), moorline::ServerError>>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let state = tempfile::tempdir().expect("state dir");
        let mut config = test_config(state.path().to_owned());
        tweak(&mut config);
        Self::start_in(state, config).await
    }

    /// Starts a server over an existing state directory (to test restarts).
    pub async fn start_in(state: tempfile::TempDir, config: Config) -> Self {
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(moorline::run(listener, config, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            state,
            http: http(),
            shutdown: Some(tx),
            handle: Some(handle),
        }
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

pub struct Ws {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
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
        let mut request = url.into_client_request().expect("request");
        for (k, v) in headers {
            request.headers_mut().insert(*k, v.parse().expect("header"));
        }
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect in time")
        {
            Ok((socket, _)) => Ok(Self { socket }),
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
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
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
