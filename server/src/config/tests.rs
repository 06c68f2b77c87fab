//! Loading: layers, names, errors and the example file.

use std::path::PathBuf;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Sources {
    Sources {
        env: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Sources::default()
    }
}

fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::load(&env(pairs))
}

#[test]
fn no_configuration_gives_loopback_8341_and_an_echo_instance() {
    let c = load(&[("HOME", "/home/u")]).expect("load");
    assert_eq!(
        c.listen_addr().expect("addr"),
        "127.0.0.1:8341".parse().expect("addr")
    );
    assert_eq!(c.instances.len(), 1);
    assert_eq!(c.instances[0].id, "echo");
    assert_eq!(c.state_dir, PathBuf::from("/home/u/.local/state/moorline"));
    assert_eq!(c.limits.max_sessions, 8);
}

#[test]
fn the_example_file_documents_the_defaults() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("c.toml");
    std::fs::write(&path, EXAMPLE_CONFIG).expect("write");
    let from_file = Config::load(&Sources {
        file: Some(path),
        ..Sources::default()
    })
    .expect("example parses");
    let defaults = load(&[]).expect("defaults");
    assert_eq!(from_file.limits, defaults.limits);
    assert_eq!(from_file.port, defaults.port);
    assert_eq!(from_file.host, defaults.host);
    assert_eq!(
        (
            from_file.tcp,
            &from_file.unix_socket_mode,
            &from_file.allowed_users
        ),
        (
            defaults.tcp,
            &defaults.unix_socket_mode,
            &defaults.allowed_users
        )
    );
    assert_eq!(
        from_file.trust_tailscale_headers_on_tcp,
        defaults.trust_tailscale_headers_on_tcp
    );
}

#[test]
fn listeners_identity_keys_and_their_errors() {
    let c = load(&[
        ("MOORLINE_TCP", "false"),
        ("MOORLINE_UNIX_SOCKET", "/run/moorline/moorline.sock"),
        ("MOORLINE_UNIX_SOCKET_MODE", "0660"),
        ("MOORLINE_ALLOWED_USERS", "alice@example.com, local"),
    ])
    .expect("load");
    assert!(!c.tcp);
    assert_eq!(c.socket_mode().expect("mode"), 0o660);
    assert_eq!(c.allowed_users, vec!["alice@example.com", "local"]);
    let e = load(&[("MOORLINE_TCP", "false")])
        .expect_err("nowhere")
        .to_string();
    assert!(e.contains("tcp") && e.contains("unix_socket"), "{e}");
    let e = load(&[
        ("MOORLINE_UNIX_SOCKET", "/run/moorline/moorline.sock"),
        ("MOORLINE_UNIX_SOCKET_MODE", "rw"),
    ])
    .expect_err("bad mode")
    .to_string();
    assert!(e.contains("unix_socket_mode"), "{e}");
    let e = load(&[("MOORLINE_UNIX_SOCKET", "moorline.sock")])
        .expect_err("relative")
        .to_string();
    assert!(e.contains("absolute"), "{e}");
    let e = load(&[
        ("MOORLINE_STATE_DIR", "/srv/moorline"),
        ("MOORLINE_UNIX_SOCKET", "/srv/moorline/api.sock"),
    ])
    .expect_err("visible to containers")
    .to_string();
    assert!(e.contains("state_dir"), "{e}");
    let e = load(&[("MOORLINE_UNIX_SOCKET", "/etc/moorline/api.sock")])
        .expect_err("a system dir")
        .to_string();
    assert!(e.contains("system_dirs"), "{e}");
}

#[test]
fn amarre_variables_are_honoured_and_moorline_ones_win() {
    let c = load(&[("AMARRE_PORT", "9000"), ("AMARRE_MAX_SESSIONS", "3")]).expect("load");
    assert_eq!((c.port, c.limits.max_sessions), (9000, 3));
    let c = load(&[("AMARRE_PORT", "9000"), ("MOORLINE_PORT", "9001")]).expect("load");
    assert_eq!(c.port, 9001);
    let c = load(&[("MOORLINE_LIMITS__MAX_LINE_BYTES", "1024")]).expect("load");
    assert_eq!(c.limits.max_line_bytes, 1024);
}

#[test]
fn environment_values_stay_strings() {
    let c = load(&[
        ("MOORLINE_TOKEN_FILE", "0123"),
        ("MOORLINE_ALLOWED_HOSTS", "a.ts.net, b"),
    ])
    .expect("load");
    assert_eq!(c.token_file, Some(PathBuf::from("0123")));
    assert_eq!(c.allowed_hosts, vec!["a.ts.net", "b"]);
}

#[test]
fn unknown_keys_and_bad_values_name_the_key_and_variable() {
    let e = load(&[("MOORLINE_PROT", "1")])
        .expect_err("unknown")
        .to_string();
    assert!(e.contains("prot") && e.contains("MOORLINE_PROT"), "{e}");
    let e = load(&[("AMARRE_PORT", "eighty")])
        .expect_err("bad")
        .to_string();
    assert!(e.contains("port") && e.contains("AMARRE_PORT"), "{e}");
    let e = load(&[("MOORLINE_LIMITS__MAX_SESSIONS", "0")])
        .expect_err("zero")
        .to_string();
    assert!(e.contains("limits.max_sessions"), "{e}");
}

#[test]
fn toml_errors_name_the_key_and_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("c.toml");
    std::fs::write(&path, "[limits]\nmax_sesions = 3\n").expect("write");
    let e = Config::load(&Sources {
        file: Some(path),
        ..Sources::default()
    })
    .expect_err("typo")
    .to_string();
    assert!(e.contains("max_sesions") && e.contains("c.toml"), "{e}");
}

#[test]
fn instances_from_amarre_json_including_command_and_agent_path() {
    let c = load(&[(
        "AMARRE_INSTANCES_JSON",
        r#"[{"id":"cat","agent":"command","command":["/bin/cat"],"env":{"N":"0123"}},
            {"id":"alpha","agent":"echo","agentPath":"/opt/echo.sh","env":{}}]"#,
    )])
    .expect("load");
    assert_eq!(c.instances.len(), 2);
    assert_eq!(c.instances[0].command, Some(vec!["/bin/cat".to_owned()]));
    assert_eq!(c.instances[0].env["N"], "0123");
    assert_eq!(
        c.instances[1].agent_path,
        Some(PathBuf::from("/opt/echo.sh"))
    );
}

#[test]
fn amarre_json_errors_use_amarre_wording() {
    for (json, want) in [
        ("{", "invalid JSON"),
        ("[]", "non-empty array"),
        ("[1]", "[0]: not an object"),
        (r#"[{"agent":"echo"}]"#, "[0]: missing 'id'"),
        (r#"[{"id":"a"}]"#, "[0]: missing 'agent'"),
        (
            r#"[{"id":"a","agent":"echo","env":{"X":1}}]"#,
            "instances.0.env.X",
        ),
    ] {
        let e = load(&[("AMARRE_INSTANCES_JSON", json)])
            .expect_err(json)
            .to_string();
        assert!(e.contains(want), "{json}: {e}");
    }
}

#[test]
fn legacy_agent_path_makes_a_default_instance() {
    let c = load(&[("AMARRE_AGENT_PATH", "/opt/agent")]).expect("load");
    assert_eq!(c.instances[0].id, "default");
    assert_eq!(c.instances[0].agent_path, Some(PathBuf::from("/opt/agent")));
}

#[test]
fn non_loopback_needs_an_explicit_opt_in() {
    let e = load(&[("AMARRE_HOST", "0.0.0.0")])
        .expect_err("refused")
        .to_string();
    assert!(e.contains("not a loopback"), "{e}");
    let c = load(&[
        ("MOORLINE_HOST", "0.0.0.0"),
        ("MOORLINE_ALLOW_NON_LOOPBACK", "true"),
    ])
    .expect("allowed");
    assert_eq!(c.host, "0.0.0.0");
    assert!(load(&[("MOORLINE_HOST", "::1")]).is_ok());
}

#[test]
fn host_ports_are_checked() {
    let with = |extra: &str| {
        load(&[(
            "AMARRE_INSTANCES_JSON",
            &format!(r#"[{{"id":"a","agent":"echo"{extra}}}]"#),
        )])
    };
    let c = with(r#","host_ports":[11434, 4000]"#).expect("valid");
    assert_eq!(c.instances[0].network, NetworkMode::Isolated, "the default");
    assert_eq!(
        c.instances[0].runtime_options().host_ports,
        vec![11434, 4000]
    );
    for (extra, want) in [
        (r#","host_ports":[0]"#, "0 is not a port"),
        (r#","host_ports":[70000]"#, "host_ports"),
        (r#","host_ports":[80,80]"#, "listed twice"),
        (
            r#","host_ports":[80],"network":"host""#,
            "only an isolated network",
        ),
        (r#","host_ports":[80],"runtime":"tmux""#, "only containers"),
    ] {
        let e = with(extra).expect_err(extra).to_string();
        assert!(e.contains(want) && e.contains("instances"), "{extra}: {e}");
    }
}

#[test]
fn flags_beat_environment_and_duplicate_ids_are_refused() {
    let mut s = env(&[("MOORLINE_PORT", "9001")]);
    s.overrides.port = Some(9002);
    assert_eq!(Config::load(&s).expect("load").port, 9002);
    let e = load(&[(
        "AMARRE_INSTANCES_JSON",
        r#"[{"id":"a","agent":"echo"},{"id":"a","agent":"echo"}]"#,
    )])
    .expect_err("dup")
    .to_string();
    assert!(e.contains("duplicate"), "{e}");
    let mut s = env(&[("MOORLINE_LOG_FORMAT", "human")]);
    s.overrides.log_format = Some(LogFormat::Json);
    s.overrides.allow_non_loopback = true;
    s.overrides.host = Some("0.0.0.0".into());
    let c = Config::load(&s).expect("load");
    assert_eq!(
        (c.log_format, c.host.as_str()),
        (LogFormat::Json, "0.0.0.0")
    );
    // An unset flag leaves the layers below alone.
    let c = load(&[("MOORLINE_LOG_FORMAT", "json"), ("MOORLINE_HOST", "::1")]).expect("load");
    assert_eq!((c.log_format, c.host.as_str()), (LogFormat::Json, "::1"));
}

#[test]
fn environment_values_are_numbers_and_booleans_only_where_the_key_wants_one() {
    let c = load(&[
        ("MOORLINE_TCP", "false"),
        ("MOORLINE_UNIX_SOCKET", "/run/m/m.sock"),
        ("MOORLINE_DETECT_TAILNET_NAMES", "true"),
        ("MOORLINE_LIMITS__MAX_SESSIONS", "007"),
        ("MOORLINE_LOG", "1"),
        ("MOORLINE_ALLOWED_USERS", "[alice]"),
        ("MOORLINE_RUNTIME__PASS_ENV", "PATH, LANG"),
    ])
    .expect("load");
    assert!(!c.tcp && c.detect_tailnet_names);
    assert_eq!(c.limits.max_sessions, 7);
    // A string key keeps the text as written: no number, no JSON list.
    assert_eq!(c.log, "1");
    assert_eq!(c.allowed_users, ["[alice]"]);
    assert_eq!(c.runtime.pass_env, ["PATH", "LANG"]);
    let e = load(&[("MOORLINE_TCP", "yes please")])
        .expect_err("not a boolean")
        .to_string();
    assert!(e.contains("tcp") && e.contains("MOORLINE_TCP"), "{e}");
    // Only AMARRE_INSTANCES_JSON is JSON; a table or list key cannot come from a string.
    let e = load(&[("MOORLINE_INSTANCES", r#"[{"id":"a","agent":"echo"}]"#)])
        .expect_err("not JSON")
        .to_string();
    assert!(
        e.contains("instances") && e.contains("MOORLINE_INSTANCES"),
        "{e}"
    );
    let e = load(&[("MOORLINE_LIMITS____X", "1")])
        .expect_err("malformed")
        .to_string();
    assert!(e.contains("MOORLINE_LIMITS____X: malformed"), "{e}");
    // Not configuration keys.
    load(&[("MOORLINE_URL", "unix:/x"), ("MOORLINE_CONFIG", "/x")]).expect("reserved");
}

#[test]
fn the_legacy_amarre_agent_variables_and_push_variables() {
    let c = load(&[("AMARRE_AGENT", "echo"), ("AMARRE_PUSH_TOKENS_PATH", "/x")]).expect("load");
    assert_eq!(
        (
            c.instances.len(),
            c.instances[0].id.as_str(),
            c.instances[0].agent.as_str()
        ),
        (1, "default", "echo")
    );
    assert!(c.notify.expo_enabled());
    // MOORLINE_INSTANCES__… cannot build a list, but amarre's JSON beats the legacy pair.
    let c = load(&[
        ("AMARRE_AGENT", "pi"),
        ("AMARRE_INSTANCES_JSON", r#"[{"id":"x","agent":"echo"}]"#),
    ])
    .expect("load");
    assert_eq!(c.instances[0].id, "x");
}

#[test]
fn amarre_push_variables_and_notify_keys() {
    let c = load(&[
        ("AMARRE_PUSH_TOKENS_PATH", "/x/tokens.json"),
        ("AMARRE_PUSH_GRACE_MS", "200"),
        ("AMARRE_PUSH_EXPO_URL", "http://127.0.0.1:9/send"),
        ("MOORLINE_NOTIFY__WEBHOOK_URL", "https://ntfy.sh/topic"),
    ])
    .expect("load");
    assert!(c.notify.expo_enabled());
    assert_eq!(
        c.notify.expo_tokens_path.as_deref(),
        Some(Path::new("/x/tokens.json"))
    );
    assert_eq!(c.notify.grace_ms, 200);
    assert_eq!(c.notify.expo_url, "http://127.0.0.1:9/send");
    assert_eq!(
        c.notify.webhook_url.as_deref(),
        Some("https://ntfy.sh/topic")
    );
    assert!(!load(&[]).expect("defaults").notify.expo_enabled());
    let e = load(&[("MOORLINE_NOTIFY__WEBHOOK_URL", "ntfy.sh/topic")])
        .expect_err("not a URL")
        .to_string();
    assert!(e.contains("notify.webhook_url"), "{e}");
    let e = load(&[("AMARRE_PUSH_GRACE_MS", "soon")])
        .expect_err("not a number")
        .to_string();
    assert!(e.contains("AMARRE_PUSH_GRACE_MS"), "{e}");
}

#[test]
fn helper_programs_get_the_servers_path_and_temporary_directory_whatever_pass_env_says() {
    let c = load(&[
        ("PATH", "/opt/git/bin:/usr/bin"),
        ("TMPDIR", "/var/tmp/moorline"),
        ("MOORLINE_RUNTIME__PASS_ENV", "LANG"),
    ])
    .expect("load");
    assert_eq!(c.helper_env.path.as_deref(), Some("/opt/git/bin:/usr/bin"));
    assert_eq!(c.helper_env.temp_dir, PathBuf::from("/var/tmp/moorline"));
    // Agents get only what pass_env names; git still finds its programs.
    assert!(!c.runtime.passed_env.contains_key("PATH"));
    // A relative TMPDIR (or none) means /tmp: never a directory relative to the server's cwd.
    let c = load(&[("TMPDIR", "tmp")]).expect("load");
    assert_eq!(c.helper_env.temp_dir, PathBuf::from("/tmp"));
    assert_eq!(c.helper_env.path, None);
}

#[test]
fn programs_are_found_as_execvp_finds_them() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tmp");
    let (first, second) = (tmp.path().join("a"), tmp.path().join("b"));
    for dir in [&first, &second] {
        std::fs::create_dir(dir).expect("dir");
    }
    // Not executable in the first directory of PATH: passed over, as execvp does.
    std::fs::write(first.join("agent"), "#!/bin/sh\n").expect("write");
    std::fs::write(second.join("agent"), "#!/bin/sh\n").expect("write");
    std::fs::set_permissions(second.join("agent"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let path = format!("::{}:{}", first.display(), second.display());
    assert_eq!(
        find_program(std::path::Path::new("agent"), Some(&path)),
        Some(second.join("agent"))
    );
    // A path stands for itself, and only if it can be run.
    assert_eq!(find_program(&first.join("agent"), Some(&path)), None);
    assert_eq!(
        find_program(&second.join("agent"), None),
        Some(second.join("agent"))
    );
    assert_eq!(
        find_program(std::path::Path::new("no-such-agent"), Some(&path)),
        None
    );
}
