//! The `moorline` binary as a user runs it: configuration commands, the quickstart, the client
//! subcommands and signal handling.

mod common;

use std::path::Path;
use std::process::Stdio;

use common::{WAIT, Ws, moorline_exe};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// A `moorline` command with a clean environment: no user config, no tailscale lookups.
fn moorline(home: &Path) -> Command {
    let mut cmd = Command::new(moorline_exe());
    cmd.env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MOORLINE_DETECT_TAILNET_NAMES", "false")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn output(mut cmd: Command) -> (i32, String, String) {
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("in time")
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn configuration_errors_name_the_key_and_exit_64() {
    let home = tempfile::tempdir().expect("home");
    let file = home.path().join("bad.toml");
    std::fs::write(&file, "port = 8341\n[limits]\nmax_sesions = 2\n").expect("write");
    let mut cmd = moorline(home.path());
    cmd.arg("check-config").arg("--config").arg(&file);
    let (code, _, err) = output(cmd).await;
    assert_eq!(code, 64);
    assert!(
        err.contains("max_sesions") && err.contains("bad.toml"),
        "{err}"
    );

    let mut cmd = moorline(home.path());
    cmd.arg("check-config").env("AMARRE_PORT", "eighty");
    let (code, _, err) = output(cmd).await;
    assert_eq!(code, 64);
    assert!(err.contains("AMARRE_PORT"), "{err}");

    let mut cmd = moorline(home.path());
    cmd.args(["serve", "--host", "0.0.0.0"]);
    let (code, _, err) = output(cmd).await;
    assert_eq!(code, 64, "non-loopback refused before binding: {err}");
    assert!(err.contains("loopback"), "{err}");

    let mut cmd = moorline(home.path());
    cmd.arg("check-config")
        .arg("--config")
        .arg(home.path().join("missing.toml"));
    assert_eq!(output(cmd).await.0, 64);
}

#[tokio::test]
async fn the_printed_default_config_is_valid() {
    let home = tempfile::tempdir().expect("home");
    let mut cmd = moorline(home.path());
    cmd.arg("print-default-config");
    let (code, text, _) = output(cmd).await;
    assert_eq!(code, 0);
    let file = home.path().join("moorline.toml");
    std::fs::write(&file, text).expect("write");
    let mut cmd = moorline(home.path());
    cmd.args(["check-config", "--no-env", "--config"])
        .arg(&file);
    cmd.env("MOORLINE_PORT", "not-a-port");
    let (code, out, err) = output(cmd).await;
    assert_eq!(code, 0, "--no-env ignores the environment: {err}");
    assert!(out.contains("port = 8341"), "{out}");
}

#[tokio::test]
async fn client_commands_report_an_unreachable_server() {
    let home = tempfile::tempdir().expect("home");
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut cmd = moorline(home.path());
    cmd.args([
        "sessions",
        "list",
        "--url",
        &format!("http://127.0.0.1:{port}"),
    ]);
    let (code, _, err) = output(cmd).await;
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("cannot reach moorline"), "{err}");
}

struct Served {
    child: Child,
    url: String,
    _home: tempfile::TempDir,
    /// With no configuration the echo instance may run in runc and tmux, which outlive the
    /// server: keep them in a sandbox that is cleaned up.
    _sandbox: common::Sandbox,
}

/// `moorline serve` with no configuration at all, on a free port.
async fn serve() -> Served {
    let home = tempfile::tempdir().expect("home");
    let sandbox = common::Sandbox::new();
    let mut cmd = moorline(home.path());
    cmd.args(["serve", "--port", "0"])
        .env("MOORLINE_RUNTIME__TMUX_SOCKET", &sandbox.tmux_socket)
        .env("MOORLINE_RUNTIME__RUNC_ROOT", sandbox.runc_root.path())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("serve");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if let Some(rest) = line.split("addr=").nth(1) {
                return rest.split_whitespace().next().expect("addr").to_owned();
            }
        }
        panic!("server exited before listening");
    })
    .await
    .expect("listening in time");
    // Keep draining the log so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Served {
        child,
        url: format!("http://{addr}"),
        _home: home,
        _sandbox: sandbox,
    }
}

#[tokio::test]
async fn quickstart_sessions_attach_and_sigterm() {
    let mut served = serve().await;
    let home = tempfile::tempdir().expect("home");
    let run = |args: Vec<String>| {
        let mut cmd = moorline(home.path());
        cmd.args(args).env("MOORLINE_URL", &served.url);
        output(cmd)
    };
    let (code, out, err) = run(vec![
        "sessions".into(),
        "new".into(),
        "--name".into(),
        "demo".into(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let created: Value = serde_json::from_str(&out).expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(
        (created["agent"].as_str(), created["name"].as_str()),
        (Some("echo"), Some("demo"))
    );

    let (code, table, _) = run(vec!["sessions".into(), "list".into()]).await;
    assert_eq!(code, 0);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("running")),
        "{table}"
    );

    // attach: stdin lines in, frames out, usable in a pipe.
    let mut cmd = moorline(home.path());
    cmd.args(["attach", &id, "--linger", "300"])
        .env("MOORLINE_URL", &served.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut attach = cmd.spawn().expect("attach");
    let mut stdin = attach.stdin.take().expect("stdin");
    stdin
        .write_all(b"{\"id\":\"1\",\"type\":\"get_state\"}\n")
        .await
        .expect("write");
    drop(stdin);
    let out = tokio::time::timeout(WAIT, attach.wait_with_output())
        .await
        .expect("in time")
        .expect("attach");
    assert!(out.status.success());
    let reply: Value =
        serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().expect("line"))
            .expect("json");
    assert_eq!(reply["echo"]["type"], "get_state");

    // Replay through attach.
    let (code, out, _) = run(vec![
        "attach".into(),
        id.clone(),
        "--since".into(),
        "0".into(),
        "--linger".into(),
        "200".into(),
    ])
    .await;
    assert_eq!(code, 0);
    let frames: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(frames[0]["type"], "amarre.hello");
    assert_eq!(frames[1]["echo"]["id"], "1");

    let (code, out, _) = run(vec!["sessions".into(), "get".into(), id.clone()]).await;
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).expect("json")["lastSeq"],
        1
    );

    // SIGTERM: clients are closed with 1001, never 1006, and the server exits 0.
    let ws_url = served.url.replacen("http://", "ws://", 1);
    let mut ws = Ws::connect(&format!("{ws_url}/sessions/{id}")).await;
    let pid = nix::unistd::Pid::from_raw(served.child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
    assert_eq!(ws.closed().await, (1001, "server shutting down".into()));
    let status = tokio::time::timeout(WAIT, served.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn client_errors_are_clear() {
    let mut served = serve().await;
    let home = tempfile::tempdir().expect("home");
    let mut cmd = moorline(home.path());
    cmd.args(["sessions", "get", "000000000000"])
        .env("MOORLINE_URL", &served.url);
    let (code, _, err) = output(cmd).await;
    assert_eq!(code, 1);
    assert!(err.contains("404") && err.contains("not_found"), "{err}");
    let mut cmd = moorline(home.path());
    cmd.args(["attach", "000000000000"])
        .env("MOORLINE_URL", &served.url);
    let (code, _, err) = output(cmd).await;
    assert_eq!(code, 1);
    assert!(err.contains("Session not found"), "{err}");
    let _ = served.child.start_kill();
}
