//! The container as a boundary: working directories checked again at every start (a symlink
//! swapped in is refused, and the container mounts what was opened), no agent as root, the
//! seccomp profile, and the client environment deny-list. The runc/tmux tests need root; they
//! print why and return when they cannot run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{Sandbox, TEST_UID, TestServer, Ws, fixture_agent, instance, moorline_exe};
use moorline::config::{Config, InstanceConfig, RuntimeKind};
use serde_json::{Value, json};

fn runtime_of(name: &str) -> RuntimeKind {
    match name {
        "runc" => RuntimeKind::Runc,
        "tmux" => RuntimeKind::Tmux,
        _ => RuntimeKind::Process,
    }
}

/// The fixture agent under each runtime, its cwd inside `root`.
fn fixtures(root: &Path) -> Vec<InstanceConfig> {
    ["runc", "tmux", "process"]
        .into_iter()
        .map(|rt| {
            let mut inst = instance(rt, "fixture");
            inst.agent_path = Some(fixture_agent());
            inst.runtime = runtime_of(rt);
            inst.workspace_roots = vec![root.to_owned()];
            inst
        })
        .collect()
}

/// A command agent that prints one JSON line made by `script` (a shell snippet that prints
/// the object's fields), then waits for input.
fn probe(id: &str, runtime: &str, root: &Path, script: &str) -> InstanceConfig {
    let mut inst = instance(id, "command");
    inst.command = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("printf '{{\"type\":\"probe\",%s}}\\n' \"$({script})\"; exec cat"),
    ]);
    inst.runtime = runtime_of(runtime);
    inst.workspace_roots = vec![root.to_owned()];
    inst
}

async fn server(sandbox: &Sandbox, tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(|c| {
        sandbox.apply(c);
        tweak(c);
    })
    .await
}

async fn create(server: &TestServer, instance: &str, cwd: &Path) -> (u16, Value) {
    server
        .post(
            "/sessions",
            &json!({"instanceId": instance, "cwd": cwd}).to_string(),
        )
        .await
}

/// The first frame of a type.
async fn frame(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let v = ws.json().await;
        if v["type"] == ty {
            return v;
        }
        assert_ne!(v["type"], "amarre.session_event", "ended first: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_a_symlink_swap_of_the_cwd_is_refused() {
    require_durable!();
    let sandbox = Sandbox::new();
    let root = common::workspace();
    let root_path = std::fs::canonicalize(root.path()).expect("canonical");
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("secret"), "host secret\n").expect("secret");
    std::fs::create_dir(outside.path().join("sub")).expect("sub");
    let server = server(&sandbox, |c| c.instances.extend(fixtures(&root_path))).await;

    for rt in ["runc", "tmux", "process"] {
        let a = root_path.join(format!("a-{rt}"));
        std::fs::create_dir(&a).expect("a");
        std::os::unix::fs::chown(&a, Some(TEST_UID), Some(TEST_UID)).expect("chown");
        let (status, body) = create(&server, rt, &a).await;
        assert_eq!(status, 201, "{rt}: {body}");
        let id = body["id"].as_str().expect("id").to_owned();
        let mut ws = server.ws(&id).await;
        ws.send_json(&json!({"_emit": "exit"})).await;
        let end = frame(&mut ws, "amarre.session_event").await;
        assert_eq!(end["event"], "exited", "{end}");

        // Another session, which can write in the root, swaps A's directory for a symlink
        // to a directory outside every root.
        std::fs::rename(&a, root_path.join(format!("a-{rt}.old"))).expect("rename");
        std::os::unix::fs::symlink(outside.path(), &a).expect("symlink");
        let containers = sandbox.containers();
        let (status, body) = server.post(&format!("/sessions/{id}/restart"), "").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_cwd")),
            "{rt}: {body}"
        );
        let message = body["message"].as_str().expect("message");
        assert!(message.contains("leads outside"), "{rt}: {message}");
        assert_ne!(
            server.get_json(&format!("/sessions/{id}")).await.1["status"],
            "running"
        );
        assert_eq!(
            sandbox.containers(),
            containers,
            "{rt}: nothing was started"
        );

        // Put back, the directory is accepted again.
        std::fs::remove_file(&a).expect("unlink");
        std::fs::rename(root_path.join(format!("a-{rt}.old")), &a).expect("rename back");
        let (status, body) = server.post(&format!("/sessions/{id}/restart"), "").await;
        assert_eq!(status, 200, "{rt}: {body}");
        assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    }

    // At create, a path with a symlink component leading out is refused too.
    std::os::unix::fs::symlink(outside.path(), root_path.join("escape")).expect("symlink");
    for rt in ["runc", "tmux", "process"] {
        let (status, body) = create(&server, rt, &root_path.join("escape/sub")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_cwd")),
            "{rt}: {body}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(outside.path().join("secret")).expect("secret"),
        "host secret\n"
    );
    server.stop().await;
}

/// Runs `program args` in a container whose workspace is `anchor`, returning its exit status
/// and runc's error output.
fn run_container(
    sandbox: &Sandbox,
    dir: &Path,
    anchor: moorline::runtime::workspace::Anchor,
    args: &[&str],
) -> (bool, String) {
    let id = format!(
        "moorline-0123456789ab-1-{:06x}",
        std::process::id() & 0xffffff
    );
    let bundle = dir.join("bundle");
    let home = dir.join("home");
    std::fs::create_dir_all(&home).expect("home");
    moorline::runtime::runc::write_bundle(
        &bundle,
        &moorline::runtime::runc::BundleSpec {
            container_id: id.clone(),
            session_id: "0123456789ab".into(),
            generation: 1,
            program: which("sh"),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            env: Default::default(),
            workspace: anchor,
            moorline_exe: moorline_exe(),
            user: Some((TEST_UID, TEST_UID)),
            home,
            tini: which("tini"),
            system_dirs: Config::default().runtime.system_dirs,
            extra_rw: Vec::new(),
            extra_ro: Vec::new(),
            network: moorline::config::NetworkMode::None,
            network_hook: None,
            resolv_conf: None,
            pids_limit: None,
            memory_limit: None,
            rootless: None,
            limits_allowed: false,
        },
    )
    .expect("bundle");
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(sandbox.runc_root.path())
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .output()
        .expect("runc");
    let _ = std::process::Command::new("runc")
        .arg("--root")
        .arg(sandbox.runc_root.path())
        .args(["delete", "--force", &id])
        .output();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn which(name: &str) -> PathBuf {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found"))
}

/// The container does not mount a path the server checked earlier: its hook opens the
/// workspace beneath the root again, so a swap after the server's check is caught there.
#[test]
fn the_container_mounts_what_it_opened_beneath_the_root() {
    if let Some(why) = common::durable_unavailable() {
        eprintln!("SKIPPED: this test needs root, runc, tmux and tini: {why}");
        return;
    }
    let sandbox = Sandbox::new();
    let root = common::workspace();
    let root_path = std::fs::canonicalize(root.path()).expect("canonical");
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("secret"), "host secret\n").expect("secret");
    let work = root_path.join("work");
    std::fs::create_dir(&work).expect("work");
    std::fs::write(work.join("marker"), "mine\n").expect("marker");
    let bundle_dir = tempfile::tempdir().expect("bundle");
    let anchor = moorline::runtime::workspace::Anchor::beneath(&root_path, &work).expect("under");
    let check = format!("test -f {0}/marker && test ! -e {0}/secret", work.display());
    let (ok, err) = run_container(&sandbox, bundle_dir.path(), anchor.clone(), &["-c", &check]);
    assert!(ok, "the workspace is mounted: {err}");

    std::fs::rename(&work, root_path.join("work.old")).expect("rename");
    std::os::unix::fs::symlink(outside.path(), &work).expect("symlink");
    let (ok, err) = run_container(&sandbox, bundle_dir.path(), anchor, &["-c", "true"]);
    assert!(!ok, "a swapped workspace must not start");
    assert!(err.contains("leads outside"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_runs_as_root() {
    require_durable!();
    let sandbox = Sandbox::new();
    // A root-owned workspace, which the agent may enter.
    let root = tempfile::tempdir().expect("root");
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let root_path = std::fs::canonicalize(root.path()).expect("canonical");
    let theirs = root_path.join("theirs");
    std::fs::create_dir(&theirs).expect("theirs");
    std::os::unix::fs::chown(&theirs, Some(4242), Some(4343)).expect("chown");
    // Its ids (real, effective, saved, filesystem) and capabilities too: the process runtime
    // starts agents from a server thread that took on their user, which must leave nothing of
    // root behind.
    let id_script = "printf '\"uid\":%s,\"groups\":\"%s\",\"ids\":\"%s\",\"caps\":\"%s\"' \"$(id -u)\" \"$(id -G)\" \"$(grep ^Uid: /proc/self/status | cut -f2- | tr '\\t' ' ')\" \"$(grep -E '^Cap(Prm|Eff|Amb):' /proc/self/status | cut -f2 | tr '\\n' ' ')\"";
    let probes = |c: &mut Config| {
        for rt in ["runc", "tmux", "process"] {
            c.instances.push(probe(rt, rt, &root_path, id_script));
        }
    };

    // Without an agent user, a root-owned workspace is worked in as the system's `nobody`, or
    // refused where there is none, whatever the runtime; never as root.
    let nobody = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .filter(|u| !u.uid.is_root());
    let default = server(&sandbox, |c| {
        c.runtime.agent_user = None;
        probes(c);
    })
    .await;
    for rt in ["runc", "tmux", "process"] {
        let (status, body) = create(&default, rt, &root_path).await;
        match &nobody {
            Some(nobody) => {
                assert_eq!(status, 201, "{rt}: {body}");
                let id = body["id"].as_str().expect("id");
                let mut ws = default.ws_query(id, "?since=0").await;
                let seen = frame(&mut ws, "probe").await;
                assert_eq!(seen["uid"], nobody.uid.as_raw(), "{rt}: {seen}");
                assert_eq!(default.delete(&format!("/sessions/{id}")).await.0, 204);
            }
            None => {
                assert_eq!(status, 400, "{rt}: {body}");
                assert_eq!(body["error"], "invalid_cwd");
                assert!(
                    body["message"]
                        .as_str()
                        .expect("message")
                        .contains("agent_user"),
                    "{rt}: {body}"
                );
            }
        }
    }
    default.stop().await;

    let server = server(&sandbox, |c| {
        c.runtime.agent_user = Some(format!("{TEST_UID}:{TEST_UID}"));
        probes(c);
    })
    .await;
    for rt in ["runc", "tmux", "process"] {
        for (cwd, uid, gid) in [(&root_path, TEST_UID, TEST_UID), (&theirs, 4242, 4343)] {
            let (status, body) = create(&server, rt, cwd).await;
            assert_eq!(status, 201, "{rt}: {body}");
            let id = body["id"].as_str().expect("id");
            let mut ws = server.ws_query(id, "?since=0").await;
            let seen = frame(&mut ws, "probe").await;
            assert_eq!(seen["uid"], uid, "{rt} in {}: {seen}", cwd.display());
            assert_eq!(
                seen["groups"],
                gid.to_string(),
                "{rt}: only the group: {seen}"
            );
            assert_eq!(
                seen["ids"],
                format!("{uid} {uid} {uid} {uid}"),
                "{rt}: no way back to root: {seen}"
            );
            assert_eq!(
                seen["caps"], "0000000000000000 0000000000000000 0000000000000000 ",
                "{rt}: no capabilities: {seen}"
            );
            assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
        }
    }
    // Every thread of the server (this test process) is root again.
    for task in std::fs::read_dir("/proc/self/task").expect("tasks") {
        let status =
            std::fs::read_to_string(task.expect("task").path().join("status")).unwrap_or_default();
        if let Some(uids) = status.lines().find(|l| l.starts_with("Uid:")) {
            assert_eq!(
                uids.split_whitespace().collect::<Vec<_>>(),
                ["Uid:", "0", "0", "0", "0"]
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_system_calls_fail_in_the_container_and_ordinary_work_goes_on() {
    require_durable!();
    let sandbox = Sandbox::new();
    let root = common::workspace();
    let root_path = std::fs::canonicalize(root.path()).expect("canonical");
    // Exit statuses of: a new user namespace (twice), a personality without address
    // randomisation, a shell, node writing a file.
    let script = "r() { \"$@\" >/dev/null 2>&1; echo $?; }; \
        printf '\"unshareU\":%s,\"unshareUr\":%s,\"setarchR\":%s,\"sh\":%s,\"node\":%s' \
        \"$(r unshare -U true)\" \"$(r unshare -Ur id)\" \"$(r setarch $(uname -m) -R true)\" \
        \"$(r sh -c 'echo hi > made-by-sh')\" \
        \"$(r node -e 'require(\"fs\").writeFileSync(\"made-by-node\", \"1\")')\"";
    let server = server(&sandbox, |c| {
        c.instances.push(probe("boxed", "runc", &root_path, script));
        c.instances.push(probe("bare", "tmux", &root_path, script));
    })
    .await;
    let run = |inst: &'static str| {
        let server = &server;
        let root_path = root_path.clone();
        async move {
            let cwd = root_path.join(inst);
            std::fs::create_dir(&cwd).expect("cwd");
            std::os::unix::fs::chown(&cwd, Some(TEST_UID), Some(TEST_UID)).expect("chown");
            let (status, body) = create(server, inst, &cwd).await;
            assert_eq!(status, 201, "{body}");
            let id = body["id"].as_str().expect("id").to_owned();
            let mut ws = server.ws_query(&id, "?since=0").await;
            let seen = frame(&mut ws, "probe").await;
            assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
            (seen, cwd)
        }
    };
    let (boxed, cwd) = run("boxed").await;
    assert_ne!(boxed["unshareU"], 0, "unshare -U must fail: {boxed}");
    assert_ne!(boxed["unshareUr"], 0, "unshare -Ur must fail: {boxed}");
    assert_ne!(
        boxed["setarchR"], 0,
        "personality(ADDR_NO_RANDOMIZE) must fail: {boxed}"
    );
    assert_eq!(boxed["sh"], 0, "{boxed}");
    assert_eq!(boxed["node"], 0, "{boxed}");
    assert!(cwd.join("made-by-sh").is_file() && cwd.join("made-by-node").is_file());
    // The same agent outside a container (no seccomp) shows the calls work on this machine.
    let (bare, _) = run("bare").await;
    if bare["unshareU"] != 0 {
        eprintln!("note: this kernel refuses unprivileged user namespaces anyway: {bare}");
    }
    assert_eq!(bare["setarchR"], 0, "the control: {bare}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_changing_environment_is_refused_whatever_allowed_env_says() {
    let server = TestServer::start_with(|c| {
        for (id, allowed) in [("wide", "*"), ("git", "GIT_*")] {
            let mut inst = instance(id, "command");
            inst.command = Some(vec!["/bin/cat".into()]);
            inst.allowed_env = vec![allowed.into()];
            c.instances.push(inst);
        }
    })
    .await;
    let post = |inst: &str, env: Value| {
        let body = json!({"instanceId": inst, "env": env}).to_string();
        let server = &server;
        async move { server.post("/sessions", &body).await }
    };
    for key in [
        "BASH_FUNC_x%%",
        "GCONV_PATH",
        "GLIBC_TUNABLES",
        "PERL5OPT",
        "RUBYOPT",
        "JAVA_TOOL_OPTIONS",
        "GIT_CONFIG_COUNT",
        "GIT_CONFIG_KEY_0",
        "GIT_SSH_COMMAND",
        "GIT_EXEC_PATH",
        "SSL_CERT_FILE",
        "HTTPS_PROXY",
        "TMPDIR",
        "PROMPT_COMMAND",
        "LD_PRELOAD",
        "NODE_OPTIONS",
        "PYTHONPATH",
        "BASH_ENV",
    ] {
        let inst = if key.starts_with("GIT_") {
            "git"
        } else {
            "wide"
        };
        let (status, body) = post(inst, json!({ key: "x" })).await;
        assert_eq!(
            (status, body["error"].as_str(), body["key"].as_str()),
            (400, Some("env_not_allowed"), Some(key)),
            "{key}: {body}"
        );
    }
    // Names and values are checked up front: a 400, never a 500 or a crashed session.
    for (env, key) in [
        (json!({"OK": "a\u{0}b"}), "OK"),
        (json!({"OK": "x".repeat(40_000)}), "OK"),
        (json!({"A=B": "x"}), "A=B"),
        (json!({"": "x"}), ""),
        (json!({"A".repeat(300): "x"}), ""),
    ] {
        let (status, body) = post("wide", env).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("env_not_allowed")),
            "{body}"
        );
        if !key.is_empty() {
            assert_eq!(body["key"], key, "{body}");
        }
    }
    let many: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("V{i}"), json!("x"))).collect();
    let (status, body) = post("wide", Value::Object(many)).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("max_env_vars")
    );
    // What is left passes.
    assert_eq!(post("git", json!({"GIT_AUTHOR_NAME": "A"})).await.0, 201);
    assert_eq!(post("wide", json!({"FROM_ANYWHERE": "ok"})).await.0, 201);
    server.stop().await;
}
