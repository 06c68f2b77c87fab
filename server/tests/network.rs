//! The container networks with real runc and slirp4netns: an agent on the default (isolated)
//! network reaches a server in a network namespace the test makes (its stand-in for the
//! internet) and the host ports its instance forwards, but nothing else on the host's loopback:
//! not moorline's own port, so never the API that would let it start an agent outside a
//! container. Traffic goes only to loopback and the test's own namespace. These need root; they
//! print why and return when they cannot run.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;

use common::{Sandbox, TestServer, Ws, eventually, fixture_agent, instance};
use moorline::config::{InstanceConfig, NetworkMode, RuntimeKind};
use serde_json::{Value, json};

fn runc_instance(id: &str) -> InstanceConfig {
    let mut inst = instance(id, "fixture");
    inst.agent_path = Some(fixture_agent());
    inst.runtime = RuntimeKind::Runc;
    inst.workspace_roots = vec![std::env::temp_dir()];
    inst
}

fn find(program: &str) -> Option<std::path::PathBuf> {
    [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    .iter()
    .map(|d| Path::new(d).join(program))
    .find(|p| p.is_file())
}

/// Why these tests cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    if let Some(why) = common::durable_unavailable() {
        return Some(why);
    }
    for tool in ["slirp4netns", "ip"] {
        if find(tool).is_none() {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

macro_rules! require_network {
    () => {
        if let Some(why) = unavailable() {
            eprintln!("SKIPPED: this test needs root, runc, tmux, tini, slirp4netns and ip: {why}");
            return;
        }
    };
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new(find("ip").expect("ip"))
        .args(args)
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to the host by a veth pair with private addresses of its own
/// (10.251.x.y/30): the stand-in for the internet. Removed when dropped, even on failure.
struct TestNet {
    name: String,
    host_if: String,
    /// The address inside the namespace.
    addr: std::net::Ipv4Addr,
}

impl TestNet {
    fn new() -> Self {
        let mut raw = [0u8; 4];
        getrandom::fill(&mut raw).expect("random");
        let tag: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let net = Self {
            name: format!("mlnet-{tag}"),
            host_if: format!("mlh{tag}"),
            addr: std::net::Ipv4Addr::new(10, 251, raw[0], (raw[1] & 0xfc) + 2),
        };
        let peer = format!("mlp{tag}");
        let host_addr = std::net::Ipv4Addr::new(10, 251, raw[0], (raw[1] & 0xfc) + 1);
        ip(&["netns", "add", &net.name]);
        ip(&[
            "link",
            "add",
            &net.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &net.name]);
        ip(&[
            "addr",
            "add",
            &format!("{host_addr}/30"),
            "dev",
            &net.host_if,
        ]);
        ip(&["link", "set", &net.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &net.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("{}/30", net.addr), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);
        net
    }

    /// A server inside the namespace that answers every connection with `reply`.
    fn serve(&self, reply: &'static str) -> SocketAddr {
        let path = format!("/run/netns/{}", self.name);
        let addr = self.addr;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Only this thread joins the namespace; its socket stays there.
            let ns = std::fs::File::open(&path).expect("netns");
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("setns");
            let listener = TcpListener::bind((addr, 0)).expect("bind in the namespace");
            tx.send(listener.local_addr().expect("addr")).expect("send");
            answer(listener, reply);
        });
        rx.recv().expect("server address")
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        let ip = find("ip").unwrap_or_else(|| "ip".into());
        let _ = std::process::Command::new(&ip)
            .args(["link", "del", &self.host_if])
            .output();
        let _ = std::process::Command::new(&ip)
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A server on the host's loopback that answers every connection with `reply`.
fn loopback_server(reply: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || answer(listener, reply));
    addr
}

fn answer(listener: TcpListener, reply: &'static str) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf);
        let _ = stream.write_all(reply.as_bytes());
    }
}

async fn ask(ws: &mut Ws, request: Value) -> Value {
    ws.send_json(&request).await;
    ws.json().await
}

/// The agent's attempt to reach `addr`: `Ok(reply)` or `Err(error)`.
async fn reach(ws: &mut Ws, addr: &str, send: &str) -> Result<String, String> {
    let v = ask(ws, json!({"_emit": "connect", "addr": addr, "send": send})).await;
    assert_eq!(v["type"], "connect", "{v}");
    if v["ok"] == true {
        Ok(v["reply"].as_str().unwrap_or_default().to_owned())
    } else {
        Err(v["error"].as_str().unwrap_or_default().to_owned())
    }
}

async fn create(server: &TestServer, instance: &str, cwd: &Path) -> String {
    let (status, body) = server
        .post(
            "/sessions",
            &json!({"instanceId": instance, "cwd": cwd}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

/// Processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(pid)
        })
        .collect()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_agent_reaches_the_outside_and_its_forwarded_ports_only() {
    require_network!();
    let net = TestNet::new();
    let outside = net.serve("hello from outside");
    let gateway = loopback_server("hello from the gateway");
    let secret = loopback_server("a loopback secret");
    let sandbox = Sandbox::new();
    let server = TestServer::start_with(|c| {
        sandbox.apply(c);
        let mut boxed = runc_instance("box");
        boxed.host_ports = vec![gateway.port()];
        c.instances.push(boxed);
        let mut hostnet = runc_instance("hostnet");
        hostnet.network = NetworkMode::Host;
        c.instances.push(hostnet);
        let mut offline = runc_instance("offline");
        offline.network = NetworkMode::None;
        c.instances.push(offline);
        // What a contained agent would love to start: an agent with no container at all.
        let mut host_shell = instance("host-shell", "command");
        host_shell.command = Some(vec!["/bin/sh".into(), "-c".into(), "id".into()]);
        host_shell.runtime = RuntimeKind::Tmux;
        c.instances.push(host_shell);
    })
    .await;
    let work = tempfile::tempdir().expect("workspace");
    let id = create(&server, "box", work.path()).await;
    let mut ws = server.ws(&id).await;

    // Out through slirp4netns, to an address beyond the host.
    assert_eq!(
        reach(&mut ws, &outside.to_string(), "ping").await,
        Ok("hello from outside".into())
    );
    // A forwarded host port, at the same port on the container's own loopback.
    assert_eq!(
        reach(&mut ws, &format!("127.0.0.1:{}", gateway.port()), "ping").await,
        Ok("hello from the gateway".into())
    );
    // Nothing else of the host's loopback: not another port, not through the gateway address.
    for addr in [
        format!("127.0.0.1:{}", secret.port()),
        format!("10.0.2.2:{}", secret.port()),
        format!("10.0.2.2:{}", gateway.port()),
    ] {
        let got = reach(&mut ws, &addr, "ping").await;
        assert!(got.is_err(), "{addr} must be out of reach: {got:?}");
    }
    // Not moorline's port: the agent cannot start a session of the tmux instance (which would
    // run `id` on the host, outside any container).
    let create_body = json!({"instanceId": "host-shell"}).to_string();
    let request = format!(
        "POST /sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{create_body}",
        create_body.len()
    );
    for addr in [
        format!("127.0.0.1:{}", server.addr.port()),
        format!("10.0.2.2:{}", server.addr.port()),
    ] {
        let got = reach(&mut ws, &addr, &request).await;
        assert!(
            got.is_err(),
            "the API at {addr} must be out of reach: {got:?}"
        );
    }
    let sessions = server.get_json("/sessions").await.1;
    assert_eq!(
        sessions.as_array().map(Vec::len),
        Some(1),
        "no session was created from inside: {sessions}"
    );

    // The network helper and its slirp4netns run while the session does, and leave with it.
    let run_dir = server.session_dir(&id).join("run");
    let helper: u32 = std::fs::read_to_string(run_dir.join("net.pid"))
        .expect("net.pid")
        .trim()
        .parse()
        .expect("pid");
    assert!(
        cmdline(helper).contains("net-helper"),
        "{}",
        cmdline(helper)
    );
    let helpers: Vec<u32> = std::iter::once(helper).chain(children(helper)).collect();
    assert!(
        helpers.iter().any(|p| cmdline(*p).contains("slirp4netns")),
        "slirp4netns runs under the helper: {helpers:?}"
    );
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    for pid in &helpers {
        let pid = *pid;
        eventually(
            "the network helpers leave with the session",
            || async move { common::process_gone(u64::from(pid)) },
        )
        .await;
    }

    // For comparison: `host` shares everything, moorline's port included; `none` has nothing.
    let id = create(&server, "hostnet", work.path()).await;
    let mut ws = server.ws(&id).await;
    let healthz = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let got = reach(&mut ws, &server.addr.to_string(), healthz).await;
    assert!(
        got.as_deref().is_ok_and(|r| r.starts_with("HTTP/1.1 200")),
        "{got:?}"
    );
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    let id = create(&server, "offline", work.path()).await;
    let mut ws = server.ws(&id).await;
    assert!(reach(&mut ws, &outside.to_string(), "ping").await.is_err());
    assert!(
        reach(&mut ws, &server.addr.to_string(), healthz)
            .await
            .is_err()
    );
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_network_that_cannot_start_fails_the_session_and_never_falls_back() {
    require_network!();
    let sandbox = Sandbox::new();
    let server = TestServer::start_with(|c| {
        sandbox.apply(c);
        // A slirp4netns that exits at once, and one that is not installed.
        c.runtime.slirp4netns = "/bin/false".into();
        c.instances.push(runc_instance("broken"));
    })
    .await;
    let work = tempfile::tempdir().expect("workspace");
    let (status, body) = server
        .post(
            "/sessions",
            &json!({"instanceId": "broken", "cwd": work.path()}).to_string(),
        )
        .await;
    let reason = if status == 201 {
        let id = body["id"].as_str().expect("id").to_owned();
        eventually("the start failure is reported", || async {
            server.get_json(&format!("/sessions/{id}")).await.1["status"] == "crashed"
        })
        .await;
        server.get_json(&format!("/sessions/{id}")).await.1["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    } else {
        body["message"].as_str().unwrap_or_default().to_owned()
    };
    assert!(
        reason.contains("isolated network did not start") && reason.contains("/bin/false"),
        "{reason}"
    );
    assert!(
        sandbox.containers().is_empty(),
        "{:?}",
        sandbox.containers()
    );
    server.stop().await;

    let sandbox = Sandbox::new();
    let server = TestServer::start_with(|c| {
        sandbox.apply(c);
        c.runtime.slirp4netns = "/nonexistent/slirp4netns".into();
        c.instances.push(runc_instance("missing"));
    })
    .await;
    let (status, body) = server
        .post(
            "/sessions",
            &json!({"instanceId": "missing", "cwd": work.path()}).to_string(),
        )
        .await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("needs slirp4netns")),
        "{body}"
    );
    server.stop().await;
}
