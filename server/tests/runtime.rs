//! The durable runtimes with real runc, tmux and tini: isolation, limits, surviving a killed
//! server, tmux attach safety, cleanup, start failures and rootless mode. These need root; they
//! print why and return when they cannot run.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{Sandbox, TestServer, WAIT, Ws, eventually, fixture_agent, instance, moorline_exe};
use moorline::config::{Config, RuntimeKind};
use serde_json::{Value, json};

fn runc_instance(id: &str) -> moorline::config::InstanceConfig {
    let mut inst = instance(id, "fixture");
    inst.agent_path = Some(fixture_agent());
    inst.runtime = RuntimeKind::Runc;
    inst.workspace_roots = vec![std::env::temp_dir()];
    inst
}

async fn server_with(sandbox: &Sandbox, tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(|c| {
        sandbox.apply(c);
        c.instances.push(runc_instance("box"));
        let mut tmux = runc_instance("tmux");
        tmux.runtime = RuntimeKind::Tmux;
        c.instances.push(tmux);
        tweak(c);
    })
    .await
}

async fn create(server: &TestServer, instance: &str, cwd: &Path) -> String {
    let (status, body) = server
        .post(
            "/sessions",
            &json!({"instanceId": instance, "cwd": cwd}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["runtime"], instance_runtime(instance));
    body["id"].as_str().expect("id").to_owned()
}

fn instance_runtime(instance: &str) -> &str {
    if instance == "tmux" { "tmux" } else { "runc" }
}

async fn ask(ws: &mut Ws, request: Value) -> Value {
    ws.send_json(&request).await;
    ws.json().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_isolates_the_agent() {
    require_durable!();
    let sandbox = Sandbox::new();
    let server = server_with(&sandbox, |_| {}).await;
    let work = common::workspace();
    let id = create(&server, "box", work.path()).await;
    let mut ws = server.ws(&id).await;
    let pid = ask(&mut ws, json!({"_emit": "pid"})).await;
    assert!(
        pid["pid"].as_u64().expect("pid") < 10,
        "own pid namespace (tini is 1): {pid}"
    );
    let who = ask(&mut ws, json!({"_emit": "whoami"})).await;
    assert_eq!(who["hostname"], format!("moorline-{id}"));
    for path in ["/usr/moorline-test", "/etc/moorline-test", "/moorline-test"] {
        let w = ask(&mut ws, json!({"_emit": "write", "path": path})).await;
        assert_eq!(w["ok"], false, "{path} must not be writable: {w}");
        assert!(!Path::new(path).exists());
    }
    let inside = work.path().join("made-inside");
    let w = ask(&mut ws, json!({"_emit": "write", "path": inside})).await;
    assert_eq!(w["ok"], true, "{w}");
    assert!(inside.exists(), "the workspace is the host directory");
    let w = ask(&mut ws, json!({"_emit": "write", "path": "/tmp/scratch"})).await;
    assert_eq!(w["ok"], true, "a private /tmp: {w}");
    assert!(!Path::new("/tmp/scratch").exists());
    // Only an explicit environment gets in; the server's own variables do not.
    let env = ask(
        &mut ws,
        json!({"_emit": "env", "key": "CARGO_MANIFEST_DIR"}),
    )
    .await;
    assert_eq!(env["value"], Value::Null);
    let env = ask(&mut ws, json!({"_emit": "env", "key": "HOME"})).await;
    assert_eq!(env["value"], "/home/moorline");
    let tmux = sandbox.tmux_sessions();
    assert!(
        tmux.contains(&id),
        "one tmux session per moorline session: {tmux:?}"
    );

    // DELETE leaves nothing behind.
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    assert!(
        sandbox.containers().is_empty(),
        "{:?}",
        sandbox.containers()
    );
    assert!(!sandbox.tmux_sessions().contains(&id));
    assert!(!server.session_dir(&id).exists());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pids_and_memory_limits_take_effect() {
    require_durable!();
    let sandbox = Sandbox::new();
    let server = server_with(&sandbox, |c| {
        let mut limited = runc_instance("limited");
        limited.pids_limit = Some(32);
        limited.memory_limit = Some(64 << 20);
        c.instances.push(limited);
    })
    .await;
    let work = common::workspace();
    let (status, body) = server
        .post(
            "/sessions",
            &json!({"instanceId": "limited", "cwd": work.path()}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let mut ws = server.ws(&id).await;
    let bomb = ask(&mut ws, json!({"_emit": "forkbomb", "max": 500})).await;
    let started = bomb["started"].as_u64().expect("started");
    assert!(started < 32, "the pids limit stopped the fork bomb: {bomb}");
    assert!(bomb["error"].is_string());
    ws.send_json(&json!({"_emit": "hog", "mb": 512})).await;
    let end = loop {
        let v = ws.json().await;
        if v["type"] != "hog" {
            break v;
        }
        assert!(
            v["mb"].as_u64().unwrap_or(0) < 64,
            "allocated past the limit: {v}"
        );
    };
    assert_eq!(
        end["type"], "amarre.session_event",
        "the memory hog was killed: {end}"
    );
    // runc reports the kill as exit code 137; moorline reads it as the signal it stands for.
    assert_eq!(end["signal"], "SIGKILL", "{end}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tmux_pane_keystrokes_and_kills_do_not_reach_the_agent() {
    require_durable!();
    let sandbox = Sandbox::new();
    let server = server_with(&sandbox, |_| {}).await;
    let work = common::workspace();
    for inst in ["box", "tmux"] {
        let id = create(&server, inst, work.path()).await;
        let mut ws = server.ws(&id).await;
        ws.send_json(&json!({"_emit": "stderr", "text": "visible in the pane"}))
            .await;
        ws.json().await;
        // `=name:` is the exact session name (never a prefix) as a pane target.
        let target = format!("={id}:");
        eventually("the pane shows stderr", || async {
            let out = sandbox.tmux(&["capture-pane", "-p", "-t", &target]);
            String::from_utf8_lossy(&out.stdout).contains("visible in the pane")
        })
        .await;
        for keys in ["C-c", "C-z", "C-\\"] {
            sandbox.tmux(&["send-keys", "-t", &target, keys]);
        }
        assert_eq!(
            ask(&mut ws, json!({"id": "after-keys"})).await["echo"]["id"],
            "after-keys"
        );
        sandbox.tmux(&["kill-session", "-t", &format!("={id}")]);
        assert_eq!(
            ask(&mut ws, json!({"id": "after-kill-session"})).await["echo"]["id"],
            "after-kill-session"
        );
    }
    sandbox.tmux(&["kill-server"]);
    for s in server
        .get_json("/sessions")
        .await
        .1
        .as_array()
        .expect("list")
    {
        let id = s["id"].as_str().expect("id");
        let mut ws = server.ws(id).await;
        assert_eq!(
            ask(&mut ws, json!({"id": "after-kill-server"})).await["echo"]["id"],
            "after-kill-server"
        );
        // Durable agents outlive servers: end them explicitly.
        assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    }
    server.stop().await;
}

/// The agent's process id on the host: inside a container, the child of its init (tini).
fn host_pid_of_agent(sandbox: &Sandbox, runtime: &str, reported: u64) -> i32 {
    if runtime == "tmux" {
        return i32::try_from(reported).expect("pid");
    }
    let containers = sandbox.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    let state = std::process::Command::new("runc")
        .arg("--root")
        .arg(sandbox.runc_root.path())
        .args(["state", &containers[0]])
        .output()
        .expect("runc state");
    let state: Value = serde_json::from_slice(&state.stdout).expect("state json");
    let init = state["pid"].as_i64().expect("init pid");
    let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
        .expect("children of the container's init");
    let pids: Vec<i32> = children
        .split_whitespace()
        .map(|p| p.parse().expect("pid"))
        .collect();
    assert_eq!(pids.len(), 1, "tini runs one agent: {pids:?}");
    pids[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_by_a_signal_is_reported_with_the_signal_not_an_exit_code() {
    require_durable!();
    let sandbox = Sandbox::new();
    let server = server_with(&sandbox, |_| {}).await;
    let work = tempfile::tempdir().expect("workspace");
    for inst in ["box", "tmux"] {
        let id = create(&server, inst, work.path()).await;
        let mut ws = server.ws(&id).await;
        let reported = ask(&mut ws, json!({"_emit": "pid"})).await["pid"]
            .as_u64()
            .expect("pid");
        let pid = host_pid_of_agent(&sandbox, instance_runtime(inst), reported);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill -9 the agent");
        let end = ws.json().await;
        assert_eq!(
            (end["event"].as_str(), end["signal"].as_str()),
            (Some("crashed"), Some("SIGKILL")),
            "{inst}: {end}"
        );
        assert_eq!(end["exitCode"], Value::Null, "{inst}: {end}");
        let (_, summary) = server.get_json(&format!("/sessions/{id}")).await;
        assert_eq!(summary["signal"], "SIGKILL", "{inst}: {summary}");
        assert!(
            summary.get("exitCode").is_none(),
            "{inst}: a signal death has no exit code: {summary}"
        );
        assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    }
    // A real exit code below 129 stays an exit code in a container.
    let id = create(&server, "box", work.path()).await;
    let mut ws = server.ws(&id).await;
    ws.send_json(&json!({"_emit": "die", "code": 42})).await;
    let end = ws.json().await;
    assert_eq!(
        (end["exitCode"].as_i64(), end["signal"].as_str()),
        (Some(42), None),
        "{end}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_exits_before_writing_is_a_start_failure_with_its_stderr() {
    require_durable!();
    let sandbox = Sandbox::new();
    let server = server_with(&sandbox, |c| {
        let mut broken = runc_instance("broken");
        broken.args = vec![
            "--stderr".into(),
            "boom: cannot find my config".into(),
            "--exit-immediately".into(),
            "3".into(),
        ];
        c.instances.push(broken);
        let mut missing = instance("missing", "command");
        missing.command = Some(vec!["no-such-agent-binary".into()]);
        missing.runtime = RuntimeKind::Runc;
        missing.workspace_roots = vec![std::env::temp_dir()];
        c.instances.push(missing);
    })
    .await;
    let work = common::workspace();
    let (status, body) = server
        .post(
            "/sessions",
            &json!({"instanceId": "missing", "cwd": work.path()}).to_string(),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (500, Some("spawn_failed")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("no-such-agent-binary"),
        "{body}"
    );

    let (status, body) = server
        .post(
            "/sessions",
            &json!({"instanceId": "broken", "cwd": work.path()}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    eventually("the failure is reported", || async {
        server.get_json(&format!("/sessions/{id}")).await.1["status"] == "crashed"
    })
    .await;
    let summary = server.get_json(&format!("/sessions/{id}")).await.1;
    assert_eq!(summary["exitCode"], 3, "{summary}");
    let error = summary["error"].as_str().expect("error");
    assert!(
        error.contains("before writing anything") && error.contains("boom: cannot find my config"),
        "{error}"
    );
    assert!(
        sandbox.containers().is_empty(),
        "the failed container was removed"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_a_crash_mid_create_are_removed_at_startup() {
    require_durable!();
    let sandbox = Sandbox::new();
    let state = tempfile::tempdir().expect("state");
    let sessions = state.path().join("sessions");
    std::fs::create_dir(&sessions).expect("sessions");
    let sessions = std::fs::canonicalize(&sessions).expect("canonical");
    let work = common::workspace();
    std::fs::create_dir(work.path().join("home")).expect("home");
    // Interrupt real `runc run`s at random points of their start, as a crashing server would:
    // their session directories exist, their metadata was never written.
    for i in 0..12u64 {
        let session = format!("{:012x}", 0xdead_0000_0000u64 + i);
        let id = format!("moorline-{session}-1-{i:02x}");
        let bundle = sessions.join(&session).join("run/bundle");
        let mut child = start_container(&sandbox, &bundle, &id, work.path(), false);
        std::thread::sleep(Duration::from_millis(i * 2));
        let _ = child.kill();
        let _ = child.wait();
    }
    sandbox.tmux(&[
        "new-session",
        "-d",
        "-s",
        "feedfacecafe",
        "sleep",
        "100",
        ";",
        "set-option",
        "@moorline-sessions-dir",
        &sessions.display().to_string(),
    ]);
    assert!(
        !sandbox.containers().is_empty(),
        "the crashes left state behind"
    );
    // What another moorline server on this machine runs, sharing the tmux server and the runc
    // state directory: not ours to remove.
    let foreign = "moorline-f0f0f0f0f0f0-1-aaaaaa";
    let mut runc_run = start_container(
        &sandbox,
        &work.path().join("foreign-bundle"),
        foreign,
        work.path(),
        true,
    );
    assert!(runc_run.wait().expect("runc run -d").success());
    sandbox.tmux(&[
        "new-session",
        "-d",
        "-s",
        "0f0f0f0f0f0f",
        "sleep",
        "100",
        ";",
        "set-option",
        "@moorline-sessions-dir",
        "/elsewhere/sessions",
    ]);
    // A session whose keeper and container vanished (as after a reboot).
    let lost = state.path().join("sessions/0123456789ab");
    std::fs::create_dir_all(lost.join("run")).expect("dir");
    std::fs::write(
        lost.join("meta.json"),
        json!({"id":"0123456789ab","name":"lost","instanceId":"box","cwd":work.path(),"env":{},"createdAt":1,"spawnedAt":1,"status":"running","exitCode":null,"signal":null,"pid":null,"pidStart":null}).to_string(),
    )
    .expect("meta");
    std::fs::write(
        lost.join("run/container.id"),
        "moorline-0123456789ab-1-000000",
    )
    .expect("id");

    let mut config = common::test_config(state.path().to_owned());
    sandbox.apply(&mut config);
    config.instances.push(runc_instance("box"));
    let server = TestServer::start_in(state, config).await;
    server.get("/healthz").await;
    assert_eq!(sandbox.containers(), vec![foreign.to_owned()]);
    assert_eq!(sandbox.tmux_sessions(), vec!["0f0f0f0f0f0f".to_owned()]);
    assert!(
        !sessions
            .join(format!("{:012x}", 0xdead_0000_0000u64))
            .exists(),
        "an incomplete session directory is removed"
    );
    for i in 0..12u64 {
        let id = format!("moorline-{:012x}-1-{i:02x}", 0xdead_0000_0000u64 + i);
        for hierarchy in ["pids", "memory", "cpu", "devices"] {
            let dir = Path::new("/sys/fs/cgroup")
                .join(hierarchy)
                .join("moorline")
                .join(&id);
            assert!(!dir.exists(), "cgroup left: {}", dir.display());
        }
    }
    let summary = server.get_json("/sessions/0123456789ab").await.1;
    assert_eq!(summary["status"], "crashed", "{summary}");
    server.stop().await;
}

/// Writes a bundle running `sleep 100` and starts it with `runc run` (`-d`: detached).
fn start_container(
    sandbox: &Sandbox,
    bundle: &Path,
    id: &str,
    work: &Path,
    detached: bool,
) -> std::process::Child {
    moorline::runtime::runc::write_bundle(
        bundle,
        &moorline::runtime::runc::BundleSpec {
            container_id: id.to_owned(),
            session_id: id.split('-').nth(1).unwrap_or_default().to_owned(),
            generation: 1,
            program: which("sleep"),
            args: vec!["100".into()],
            env: Default::default(),
            workspace: moorline::runtime::workspace::Anchor::literal(
                &std::fs::canonicalize(work).expect("canonical"),
            ),
            moorline_exe: moorline_exe(),
            user: Some((common::TEST_UID, common::TEST_UID)),
            home: work.join("home"),
            tini: which("tini"),
            system_dirs: Config::default().runtime.system_dirs,
            extra_rw: Vec::new(),
            extra_ro: Vec::new(),
            network: moorline::config::NetworkMode::Host,
            network_hook: None,
            resolv_conf: None,
            pids_limit: Some(100),
            memory_limit: None,
            rootless: None,
            limits_allowed: true,
        },
    )
    .expect("bundle");
    let mut runc = std::process::Command::new("runc");
    runc.arg("--root").arg(sandbox.runc_root.path()).arg("run");
    if detached {
        runc.arg("-d");
    }
    runc.arg("--bundle")
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("runc")
}

fn which(name: &str) -> std::path::PathBuf {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found"))
}

/// `moorline serve` as a real process, so it can be killed with SIGKILL.
struct Served {
    child: tokio::process::Child,
    url: String,
}

async fn serve(config_file: &Path, port: u16) -> Served {
    let mut child = tokio::process::Command::new(moorline_exe())
        .args(["serve", "--port", &port.to_string(), "--config"])
        .arg(config_file)
        .env("MOORLINE_DETECT_TAILNET_NAMES", "false")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("serve");
    let url = format!("http://127.0.0.1:{port}");
    let http = common::http();
    eventually("the server listens", || {
        let http = http.clone();
        let url = url.clone();
        async move { http.get(format!("{url}/healthz")).send().await.is_ok() }
    })
    .await;
    let _ = &mut child;
    Served { child, url }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_killed_server_without_losing_or_duplicating_a_line() {
    require_durable!();
    let sandbox = Sandbox::new();
    let state = tempfile::tempdir().expect("state");
    let work = common::workspace();
    let config = state.path().join("moorline.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\n[runtime]\ntmux_socket = {sock:?}\nrunc_root = {root:?}\n\n\
             [[instances]]\nid = \"box\"\nagent = \"fixture\"\nagent_path = {agent:?}\nruntime = \"runc\"\n\
             workspace_roots = [{tmp:?}]\n",
            state = state.path().join("data"),
            sock = sandbox.tmux_socket,
            root = sandbox.runc_root.path(),
            agent = fixture_agent(),
            tmp = std::env::temp_dir(),
        ),
    )
    .expect("config");
    let port = free_port();
    let mut server = serve(&config, port).await;
    let http = common::http();
    let post = |body: Value| {
        let http = http.clone();
        let url = format!("{}/sessions", server.url);
        async move {
            let resp = http
                .post(url)
                .body(body.to_string())
                .send()
                .await
                .expect("post");
            assert_eq!(resp.status().as_u16(), 201);
            resp.json::<Value>().await.expect("json")["id"]
                .as_str()
                .expect("id")
                .to_owned()
        }
    };
    let busy = post(json!({"name": "busy", "cwd": work.path()})).await;
    let doomed = post(json!({"name": "doomed", "cwd": work.path()})).await;
    let ws_url = |id: &str, q: &str| format!("ws://127.0.0.1:{port}/sessions/{id}{q}");

    // The doomed agent exits while no server is running.
    let mut d = Ws::connect(&ws_url(&doomed, "")).await;
    d.send(r#"{"_emit":"die_after","ms":300,"code":5}"#).await;
    d.json().await;

    let n = 60_000u64;
    let mut ws = Ws::connect(&ws_url(&busy, "")).await;
    ws.send(&json!({"_emit": "flood", "n": n, "size": 200}).to_string())
        .await;
    // A client in the middle of sending a long line when the server dies.
    let mut sender = Ws::connect(&ws_url(&busy, "")).await;
    let mut received = 0u64;
    while received < 1000 {
        let v = ws.json().await;
        assert_eq!(v["i"], received + 1);
        received += 1;
    }
    futures_util::SinkExt::send(
        &mut sender.socket,
        tokio_tungstenite::tungstenite::Message::text("y".repeat(12 << 20)),
    )
    .await
    .expect("send");
    let pid = nix::unistd::Pid::from_raw(server.child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
    let _ = server.child.wait().await;
    drop((ws, sender, d));
    // Let the doomed agent end while no server is running.
    let exit_file = state
        .path()
        .join("data/sessions")
        .join(&doomed)
        .join("run/exit");
    eventually("the doomed agent exits", || async { exit_file.exists() }).await;

    let restarted = serve(&config, port).await;
    let list: Value = http
        .get(format!("{}/sessions", restarted.url))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let find = |id: &str| {
        list.as_array()
            .expect("list")
            .iter()
            .find(|s| s["id"] == id)
            .cloned()
            .expect("session kept")
    };
    let b = find(&busy);
    assert_eq!(
        (b["name"].as_str(), b["status"].as_str()),
        (Some("busy"), Some("running")),
        "{b}"
    );
    // Every flood line after the last one received arrives exactly once, in order.
    let mut ws = Ws::connect(&ws_url(&busy, &format!("?since={received}"))).await;
    let hello = ws.json().await;
    assert_eq!(
        (hello["replayFrom"].as_u64(), hello["missed"].as_u64()),
        (Some(received + 1), Some(0)),
        "{hello}"
    );
    while received < n {
        let v = ws.json().await;
        assert_eq!(v["i"], received + 1, "no line lost or duplicated");
        received += 1;
    }
    // The agent never saw half of the long line: the next line reaches it intact.
    ws.send(r#"{"id":"after-restart"}"#).await;
    loop {
        let v = ws.json().await;
        if v["echo"]["id"] == "after-restart" {
            break;
        }
        // The long line itself may have been forwarded whole before the kill.
        assert_eq!(
            v["echo"].as_str().map(|s| s.len()),
            Some(12 << 20),
            "unexpected frame {v}"
        );
    }
    eventually("the doomed agent's exit is known", || {
        let http = http.clone();
        let url = format!("{}/sessions/{doomed}", restarted.url);
        async move {
            let v: Value = http
                .get(url)
                .send()
                .await
                .expect("get")
                .json()
                .await
                .expect("json");
            v["status"] == "crashed" && v["exitCode"] == 5
        }
    })
    .await;
    for id in [&busy, &doomed] {
        let resp = http
            .delete(format!("{}/sessions/{id}", restarted.url))
            .send()
            .await
            .expect("delete");
        assert_eq!(resp.status().as_u16(), 204);
    }
    assert!(
        sandbox.containers().is_empty(),
        "{:?}",
        sandbox.containers()
    );
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rootless_mode_runs_containers_as_a_plain_user() {
    require_durable!();
    let user = format!("mlrl{}", std::process::id());
    let created = std::process::Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            &user,
        ])
        .status();
    if !created.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot create a throwaway user with useradd");
        return;
    }
    struct RemoveUser(String);
    impl Drop for RemoveUser {
        fn drop(&mut self) {
            let _ = std::process::Command::new("pkill")
                .args(["-9", "-u", &self.0])
                .status();
            let _ = std::process::Command::new("userdel").arg(&self.0).status();
        }
    }
    let _cleanup = RemoveUser(user.clone());
    let entry = nix::unistd::User::from_name(&user)
        .expect("lookup")
        .expect("user");
    let (uid, gid) = (entry.uid.as_raw(), entry.gid.as_raw());
    // Everything the server touches belongs to the user; it must reach the binaries too.
    let base = tempfile::Builder::new()
        .prefix("mlrl")
        .tempdir_in("/tmp")
        .expect("base");
    std::os::unix::fs::chown(base.path(), Some(uid), Some(gid)).expect("chown");
    std::fs::set_permissions(
        base.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let work = base.path().join("work");
    std::fs::create_dir(&work).expect("work");
    std::os::unix::fs::chown(&work, Some(uid), Some(gid)).expect("chown");
    let agent = base.path().join("fixture-agent");
    std::fs::copy(fixture_agent(), &agent).expect("copy agent");
    let exe = base.path().join("moorline");
    std::fs::copy(moorline_exe(), &exe).expect("copy moorline");
    let port = free_port();
    // The isolated network needs /dev/net/tun usable by the user (mode 0666, the usual).
    use std::os::unix::fs::PermissionsExt as _;
    let tun_usable =
        std::fs::metadata("/dev/net/tun").is_ok_and(|m| m.permissions().mode() & 0o006 == 0o006);
    let forwarded = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let forwarded_port = forwarded.local_addr().expect("addr").port();
    let network = if tun_usable {
        json!({"network": "isolated", "host_ports": [forwarded_port]})
    } else {
        eprintln!(
            "note: /dev/net/tun is not usable by unprivileged users here; the rootless isolated \
             network is not tested"
        );
        json!({"network": "none"})
    };
    std::thread::spawn(move || {
        for mut stream in forwarded.incoming().flatten() {
            use std::io::{Read, Write};
            let mut buf = [0u8; 64];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"forwarded");
        }
    });
    // Another test may fork while the copy is still open for writing, which makes exec fail
    // with ETXTBSY for a moment: try again.
    let spawn = || {
        tokio::process::Command::new(&exe)
        .args(["serve", "--port", &port.to_string(), "--state-dir"])
        .arg(base.path().join("state"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", base.path())
        .env("MOORLINE_DETECT_TAILNET_NAMES", "false")
        .env(
            "AMARRE_INSTANCES_JSON",
            json!([{"id": "box", "agent": "fixture", "agentPath": agent, "runtime": "runc", "workspace_roots": [base.path()], "network": network["network"], "host_ports": network.get("host_ports").cloned().unwrap_or(json!([]))}])
                .to_string(),
        )
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    };
    let mut child = loop {
        match spawn() {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("serve as the user: {e}"),
        }
    };
    let url = format!("http://127.0.0.1:{port}");
    let http = common::http();
    eventually("the rootless server listens", || {
        let http = http.clone();
        let url = url.clone();
        async move { http.get(format!("{url}/healthz")).send().await.is_ok() }
    })
    .await;
    let resp = http
        .post(format!("{url}/sessions"))
        .body(json!({"cwd": work}).to_string())
        .send()
        .await
        .expect("post");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["runtime"], "runc", "{body}");
    let id = body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_owned();
    let mut ws = Ws::connect(&format!("ws://127.0.0.1:{port}/sessions/{id}")).await;
    let who = ask(&mut ws, json!({"_emit": "whoami"})).await;
    assert_eq!(who["uid"], 0, "root inside a user namespace: {who}");
    let pid = ask(&mut ws, json!({"_emit": "pid"})).await;
    assert!(pid["pid"].as_u64().expect("pid") < 10, "{pid}");
    if tun_usable {
        let to = |port: u16| json!({"_emit": "connect", "addr": format!("127.0.0.1:{port}"), "send": "x"});
        let api = ask(&mut ws, to(port)).await;
        assert_eq!(api["ok"], false, "moorline's port is out of reach: {api}");
        let fwd = ask(&mut ws, to(forwarded_port)).await;
        assert_eq!(fwd["reply"], "forwarded", "{fwd}");
    }
    let file = work.join("rootless-file");
    assert_eq!(
        ask(&mut ws, json!({"_emit": "write", "path": file})).await["ok"],
        true
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&file).expect("file").uid(),
        uid,
        "files belong to the user on the host"
    );
    let resp = http
        .delete(format!("{url}/sessions/{id}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status().as_u16(), 204);
    let _ = child.start_kill();
    let _ = tokio::time::timeout(WAIT, child.wait()).await;
}
