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

/// Runs `moorline attach …` with `line` on its stdin; its first output frame.
async fn attach_once(mut cmd: Command, line: &str) -> Value {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut attach = cmd.spawn().expect("attach");
    let mut stdin = attach.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{line}\n").as_bytes())
        .await
        .expect("write");
    drop(stdin);
    let out = tokio::time::timeout(WAIT, attach.wait_with_output())
        .await
        .expect("in time")
        .expect("attach");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = out.stdout.split(|&b| b == b'\n').next().expect("line");
    serde_json::from_slice(first).expect("json")
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

    // Instances that could never start a session fail the check, named with the key at fault.
    let file = home.path().join("instances.toml");
    std::fs::write(
        &file,
        "[[instances]]\nid = \"ok\"\nagent = \"echo\"\n\n\
         [[instances]]\nid = \"claude\"\nagent = \"claude-code\"\n\
         agent_path = \"/nonexistent/claude\"\n\n\
         [[instances]]\nid = \"keys\"\nagent = \"echo\"\n\
         credentials_file = \"/nonexistent/keys.env\"\n\
         workspace_roots = [\"/nonexistent/projects\"]\n",
    )
    .expect("write");
    let mut cmd = moorline(home.path());
    cmd.arg("check-config").arg("--config").arg(&file);
    let (code, _, err) = output(cmd).await;
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("\"claude\"")
            && err.contains("agent_path")
            && err.contains("/nonexistent/claude"),
        "{err}"
    );
    assert!(
        err.contains("\"keys\"") && err.contains("credentials_file"),
        "{err}"
    );
    assert!(!err.contains("\"ok\""), "{err}");
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
    serve_with(|_| {}).await.0
}

/// `moorline serve` on a free port, with `tweak` applied to its command; also returns what it
/// logged before listening.
async fn serve_with(tweak: impl FnOnce(&mut Command)) -> (Served, Vec<String>) {
    let home = tempfile::tempdir().expect("home");
    let sandbox = common::Sandbox::new();
    let mut cmd = moorline(home.path());
    cmd.args(["serve", "--port", "0"])
        .env("MOORLINE_RUNTIME__TMUX_SOCKET", &sandbox.tmux_socket)
        .env("MOORLINE_RUNTIME__RUNC_ROOT", sandbox.runc_root.path())
        // As root, agents in root-owned directories need an unprivileged user.
        .env(
            "MOORLINE_RUNTIME__AGENT_USER",
            format!("{0}:{0}", common::TEST_UID),
        )
        .stderr(Stdio::piped());
    tweak(&mut cmd);
    let mut child = cmd.spawn().expect("serve");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut startup = Vec::new();
    let addr = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if let Some(rest) = line.split("addr=").nth(1) {
                return rest.split_whitespace().next().expect("addr").to_owned();
            }
            startup.push(line);
        }
        panic!("server exited before listening: {startup:?}");
    })
    .await
    .expect("listening in time");
    // Keep draining the log so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let served = Served {
        child,
        url: format!("http://{addr}"),
        _home: home,
        _sandbox: sandbox,
    };
    (served, startup)
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
        .env("MOORLINE_URL", &served.url);
    let reply = attach_once(cmd, r#"{"id":"1","type":"get_state"}"#).await;
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

    // Projects: none yet; a directory that is no repository is refused with the reason.
    let (code, out, _) = run(vec!["projects".into(), "list".into()]).await;
    assert_eq!((code, out.trim()), (0, "[]"));
    let (code, _, err) = run(vec!["projects".into(), "add".into(), "/".into()]).await;
    assert_ne!(code, 0);
    assert!(err.contains("path"), "{err}");

    // restart asks the server (here: the agent still runs), with or without a new
    // conversation.
    let (code, _, err) = run(vec![
        "sessions".into(),
        "restart".into(),
        id.clone(),
        "--new-conversation".into(),
    ])
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("already_running"), "{err}");

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
    // The same answer as over REST.
    assert!(err.contains("404") && err.contains("not_found"), "{err}");
    let _ = served.child.start_kill();
}

/// A TLS-terminating proxy in front of `backend`, as `tailscale serve` puts moorline on the
/// tailnet: its certificate for `localhost` is issued by a fresh CA, written to `ca_file`.
async fn https_proxy(backend: String, ca_file: &Path) -> u16 {
    use std::sync::Arc;
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
    std::fs::write(ca_file, ca.pem()).expect("CA file");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let backend = backend.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(&backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

/// The client commands reach a server on another machine through HTTPS (REST) and WSS
/// (attach), checking the certificate against the trusted roots; an untrusted certificate is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_work_over_https_and_check_the_certificate() {
    let served = serve().await;
    let home = tempfile::tempdir().expect("home");
    let ca_file = home.path().join("ca.pem");
    let backend = served.url.trim_start_matches("http://").to_owned();
    let port = https_proxy(backend, &ca_file).await;
    let url = format!("https://localhost:{port}");
    let trusting = |args: &[&str]| {
        let mut cmd = moorline(home.path());
        cmd.args(args)
            .env("MOORLINE_URL", &url)
            .env("SSL_CERT_FILE", &ca_file);
        cmd
    };

    let (code, out, err) = output(trusting(&["sessions", "new"])).await;
    assert_eq!(code, 0, "{err}");
    let id = serde_json::from_str::<Value>(&out).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();

    let attach = trusting(&["attach", &id, "--linger", "300"]);
    let reply = attach_once(attach, r#"{"id":"tls","type":"get_state"}"#).await;
    assert_eq!(reply["echo"]["id"], "tls");

    // Without the CA among the trusted roots, neither command goes through.
    let elsewhere = tempfile::tempdir().expect("other roots");
    let other_ca = elsewhere.path().join("other-ca.pem");
    https_proxy(String::new(), &other_ca).await;
    for args in [vec!["sessions", "list"], vec!["attach", id.as_str()]] {
        let mut cmd = trusting(&args);
        cmd.env("SSL_CERT_FILE", &other_ca)
            .env("SSL_CERT_DIR", elsewhere.path());
        let (code, _, err) = output(cmd).await;
        assert_eq!(code, 69, "{args:?}: {err}");
        assert!(
            err.contains("cannot reach moorline") && err.contains("invalid peer certificate"),
            "{err}"
        );
    }
}

/// `moorline serve` listening on a Unix socket only (`MOORLINE_TCP=false`), and the client
/// commands reaching it with `--url unix:...` and `MOORLINE_URL=unix:...`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_work_over_the_unix_socket() {
    let home = tempfile::tempdir().expect("home");
    let run_dir = tempfile::tempdir().expect("run dir");
    let socket = run_dir.path().join("moorline/moorline.sock");
    let sandbox = common::Sandbox::new();
    let mut cmd = moorline(home.path());
    cmd.arg("serve")
        .env("MOORLINE_TCP", "false")
        .env("MOORLINE_UNIX_SOCKET", &socket)
        .env("MOORLINE_RUNTIME__TMUX_SOCKET", &sandbox.tmux_socket)
        .env("MOORLINE_RUNTIME__RUNC_ROOT", sandbox.runc_root.path())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("serve");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let listening = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if line.contains("moorline listening") {
                return line;
            }
        }
        panic!("server exited before listening");
    })
    .await
    .expect("listening in time");
    assert!(listening.contains("addr=-"), "no TCP listener: {listening}");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let url = format!("unix:{}", socket.display());

    let mut cmd = moorline(home.path());
    cmd.args(["sessions", "new"]).env("MOORLINE_URL", &url);
    let (code, out, err) = output(cmd).await;
    assert_eq!(code, 0, "{err}");
    let created: Value = serde_json::from_str(&out).expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["createdBy"], "local");

    let mut cmd = moorline(home.path());
    cmd.args(["sessions", "list", "--url", &url]);
    let (code, table, err) = output(cmd).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("running")),
        "{table}"
    );

    let mut cmd = moorline(home.path());
    cmd.args(["attach", &id, "--hello", "--linger", "300", "--url", &url]);
    let hello = attach_once(cmd, r#"{"id":"sock","type":"get_state"}"#).await;
    assert_eq!(
        (hello["type"].as_str(), hello["user"].as_str()),
        (Some("amarre.hello"), Some("local"))
    );
    let mut cmd = moorline(home.path());
    cmd.args(["attach", &id, "--since", "0", "--linger", "200"])
        .env("MOORLINE_URL", &url);
    let (code, out, err) = output(cmd).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(r#""id":"sock""#), "{out}");

    // A socket nobody listens on is reported like an unreachable port.
    let mut cmd = moorline(home.path());
    cmd.args(["sessions", "list", "--url"]).arg(format!(
        "unix:{}",
        run_dir.path().join("nothing.sock").display()
    ));
    let (code, _, err) = output(cmd).await;
    assert_eq!(code, 69, "{err}");

    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the socket is removed on shutdown");
}

#[tokio::test]
async fn attach_reports_an_error_close_once() {
    let config = tempfile::tempdir().expect("config");
    let file = config.path().join("moorline.toml");
    std::fs::write(
        &file,
        format!(
            "[[instances]]\nid = \"fx\"\nagent = \"command\"\ncommand = [{:?}]\nruntime = \"process\"\n",
            common::fixture_agent().display().to_string()
        ),
    )
    .expect("write");
    let (mut served, _) = serve_with(|cmd| {
        cmd.arg("--config").arg(&file);
    })
    .await;
    let created: Value = common::http()
        .post(format!("{}/sessions", served.url))
        .body(r#"{"instanceId":"fx"}"#)
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    let home = tempfile::tempdir().expect("home");
    let mut cmd = moorline(home.path());
    cmd.args(["attach", &id])
        .env("MOORLINE_URL", &served.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut attach = cmd.spawn().expect("attach");
    let mut stdin = attach.stdin.take().expect("stdin");
    stdin
        .write_all(b"{\"_emit\":\"die\",\"code\":3}\n")
        .await
        .expect("write");
    let out = tokio::time::timeout(WAIT, attach.wait_with_output())
        .await
        .expect("in time")
        .expect("attach");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("connection closed: 1011").count(), 1, "{err}");
    drop(stdin);
    let _ = served.child.start_kill();
}

#[tokio::test]
async fn amarre_push_variables_turn_expo_push_on() {
    let dir = tempfile::tempdir().expect("dir");
    let tokens = dir.path().join("push/tokens.json");
    let (mut served, startup) = serve_with(|cmd| {
        cmd.env("AMARRE_PUSH_TOKENS_PATH", &tokens)
            .env("AMARRE_PUSH_GRACE_MS", "250");
    })
    .await;
    let line = startup
        .iter()
        .find(|l| l.contains("notifications"))
        .unwrap_or_else(|| panic!("no notifications line in {startup:?}"));
    assert!(
        line.contains("expo=true") && line.contains("grace_ms=250"),
        "{line}"
    );
    let resp = common::http()
        .post(format!("{}/push/tokens", served.url))
        .body(r#"{"token":"ExponentPushToken[abc]"}"#)
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status().as_u16(), 201);
    let stored = std::fs::read_to_string(&tokens).expect("the token store");
    assert!(stored.contains("ExponentPushToken[abc]"), "{stored}");
    let _ = served.child.start_kill();
}

/// A `moorline` client command against `server`, run in `dir`.
fn client(server: &common::TestServer, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = moorline(dir);
    cmd.args(args)
        .env("MOORLINE_URL", server.url(""))
        .current_dir(dir);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_are_answered_and_sessions_and_instances_listed_from_the_cli() {
    let server = common::TestServer::start_with(|c| c.limits.activity_window_ms = 300).await;
    let home = tempfile::tempdir().expect("home");
    let id = server.session("fixture").await;
    let mut ws = server.ws(&id).await;
    ws.send(r#"{"_emit":"ui_req","reqId":"R1"}"#).await;
    ws.send(r#"{"_emit":"ui_req","reqId":"R2"}"#).await;
    common::eventually("two pending requests", || async {
        let (_, s) = server.get_json(&format!("/sessions/{id}")).await;
        s["pendingApprovals"]
            .as_array()
            .is_some_and(|p| p.len() == 2)
    })
    .await;

    // The list says what the session is doing and where.
    let (code, table, err) = output(client(&server, home.path(), &["sessions", "list"])).await;
    assert_eq!(code, 0, "{err}");
    let row = table
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{table}"));
    for want in ["fixture", "running", "waiting for approval", "  2  "] {
        assert!(row.contains(want), "{want:?} in {table}");
    }
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.contains("CWD") && h.contains("AGE")),
        "{table}"
    );

    // With two pending, the request must be named: both are listed.
    let (code, _, err) = output(client(&server, home.path(), &["approve", &id])).await;
    assert_ne!(code, 0);
    assert!(err.contains("R1") && err.contains("R2"), "{err}");
    let (code, out, err) = output(client(&server, home.path(), &["approve", &id, "R1"])).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "R1: allow (by local)");
    let resolved = loop {
        let v = ws.json().await;
        if v["type"] == "amarre.approval_resolved" {
            break v;
        }
    };
    assert_eq!(
        (resolved["id"].as_str(), resolved["decision"].as_str()),
        (Some("R1"), Some("allow"))
    );
    // One left: no need to name it.
    let (code, out, err) = output(client(
        &server,
        home.path(),
        &["deny", &id, "--message", "not now"],
    ))
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "R2: deny (by local)");
    let (code, _, err) = output(client(&server, home.path(), &["approve", &id])).await;
    assert_ne!(code, 0);
    assert!(err.contains("no pending approval"), "{err}");
    // Nothing pending and no output for a while: idle.
    common::eventually("idle", || async {
        let (_, s) = server.get_json(&format!("/sessions/{id}")).await;
        s["activity"] == "idle"
    })
    .await;

    let (code, table, err) = output(client(&server, home.path(), &["instances"])).await;
    assert_eq!(code, 0, "{err}");
    let row = table
        .lines()
        .find(|l| l.starts_with("fixture"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("pi-rpc") && row.contains("process") && row.contains("yes"),
        "{table}"
    );
    assert!(
        row.contains(&std::env::temp_dir().display().to_string()),
        "{table}"
    );

    // `--cwd` relative to where the command runs.
    let base = tempfile::tempdir().expect("base");
    std::fs::create_dir(base.path().join("proj")).expect("mkdir");
    let (code, out, err) = output(client(
        &server,
        base.path(),
        &["sessions", "new", "--cwd", "proj"],
    ))
    .await;
    assert_eq!(code, 0, "{err}");
    let created: Value = serde_json::from_str(&out).expect("json");
    let want = std::fs::canonicalize(base.path().join("proj")).expect("canonical");
    assert_eq!(created["cwd"], want.display().to_string(), "{created}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_renders_pi_sessions_for_people_and_leaves_at_end_of_input() {
    let server = common::TestServer::start().await;
    let home = tempfile::tempdir().expect("home");
    let id = server.session("fixture").await;
    let mut cmd = client(&server, home.path(), &["attach", &id, "--render"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut attach = cmd.spawn().expect("attach");
    let mut stdin = attach.stdin.take().expect("stdin");
    let mut lines = BufReader::new(attach.stdout.take().expect("stdout")).lines();
    let mut until = async |want: &str| -> String {
        tokio::time::timeout(common::WAIT, async {
            while let Some(line) = lines.next_line().await.expect("read") {
                if line.contains(want) {
                    return line;
                }
            }
            panic!("attach ended before {want:?}");
        })
        .await
        .expect("in time")
    };
    // JSON lines still go through as they are; the turn comes out as text.
    stdin
        .write_all(b"{\"_emit\":\"pi_turn\"}\n")
        .await
        .expect("write");
    assert_eq!(until("Hello").await, "Hello world");
    assert_eq!(until("> bash").await, "> bash ls /tmp");
    assert_eq!(until("bash done").await, "  bash done: a (3 lines)");
    // Approvals are asked inline and answered with y.
    stdin
        .write_all(b"{\"_emit\":\"ui_req\",\"reqId\":\"R7\"}\n")
        .await
        .expect("write");
    assert_eq!(until("[y/n]").await, "? Run bash? ls /tmp [y/n]");
    stdin.write_all(b"y\n").await.expect("write");
    assert_eq!(until("R7").await, "  allow R7 (local)");
    // A plain line is a prompt.
    stdin.write_all(b"hello there\n").await.expect("write");
    // End of input: attach leaves (after its close is answered), like websocat.
    drop(stdin);
    let out = tokio::time::timeout(common::WAIT, attach.wait_with_output())
        .await
        .expect("leaves at end of input")
        .expect("status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Raw mode in a pipe leaves at end of input too (stdin is /dev/null here).
    let (code, _, err) = output(client(&server, home.path(), &["attach", &id])).await;
    assert_eq!(code, 0, "{err}");
    let mut ws = server.ws_query(&id, "?since=0").await;
    loop {
        let v = ws.json().await;
        if v["echo"]["type"] == "prompt" {
            assert_eq!(v["echo"]["message"], "hello there");
            break;
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn the_server_says_at_startup_which_instances_cannot_start() {
    let home = tempfile::tempdir().expect("home");
    let file = home.path().join("moorline.toml");
    std::fs::write(
        &file,
        "[[instances]]\nid = \"ok\"\nagent = \"echo\"\nruntime = \"process\"\n\n\
         [[instances]]\nid = \"broken\"\nagent = \"command\"\nruntime = \"process\"\n\
         command = [\"/nonexistent/agent\"]\n",
    )
    .expect("write");
    let mut cmd = moorline(home.path());
    cmd.args(["serve", "--port", "0", "--config"])
        .arg(&file)
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("serve");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let (mut ready, mut unusable) = (Vec::new(), Vec::new());
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if line.contains("instance ready") {
                ready.push(line);
            } else if line.contains("instance unusable") {
                unusable.push(line);
            } else if line.contains("addr=") {
                return;
            }
        }
        panic!("server exited before listening");
    })
    .await
    .expect("listening in time");
    assert!(ready.len() == 1 && ready[0].contains("ok"), "{ready:?}");
    assert!(
        unusable.len() == 1
            && unusable[0].contains("broken")
            && unusable[0].contains("command")
            && unusable[0].contains("/nonexistent/agent"),
        "{unusable:?}"
    );
    let _ = child.start_kill();
}
