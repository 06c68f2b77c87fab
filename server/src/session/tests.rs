//! Session logic against a fake runtime: no processes, every event under the test's control.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::{CreateRequest, Lifecycle, SessionManager, Status};
use crate::config::{Config, InstanceConfig};
use crate::keeper::agentio::AgentPipes;
use crate::metrics::Metrics;
use crate::runtime::{Agent, AgentControl, ExitInfo, Runtime, RuntimeError, SpawnSpec};

/// The test's side of a fake agent.
struct FakeAgent {
    stdin: DuplexStream,
    stdout: Option<DuplexStream>,
    exit: Option<oneshot::Sender<ExitInfo>>,
    control: Arc<FakeControl>,
}

#[derive(Debug, Default)]
struct FakeControl {
    signals: Mutex<Vec<&'static str>>,
    /// Exits with 143 on SIGTERM (else only SIGKILL ends it).
    obeys_term: bool,
    exit: Mutex<Option<oneshot::Sender<ExitInfo>>>,
    stdout: Mutex<Option<DuplexStream>>,
}

impl FakeControl {
    fn die(&self, info: ExitInfo) {
        if let Some(tx) = self.exit.lock().expect("lock").take() {
            let _ = tx.send(info);
        }
        self.stdout.lock().expect("lock").take();
    }

    fn signals(&self) -> Vec<&'static str> {
        self.signals.lock().expect("lock").clone()
    }
}

impl AgentControl for FakeControl {
    fn terminate(&self) -> std::io::Result<()> {
        self.signals.lock().expect("lock").push("TERM");
        if self.obeys_term {
            self.die(ExitInfo {
                code: Some(143),
                signal: None,
                reason: None,
            });
        }
        Ok(())
    }

    fn kill(&self) -> std::io::Result<()> {
        self.signals.lock().expect("lock").push("KILL");
        self.die(ExitInfo {
            code: None,
            signal: Some(9),
            reason: None,
        });
        Ok(())
    }
}

#[derive(Debug)]
struct FakeRuntime {
    obeys_term: bool,
    agents: mpsc::UnboundedSender<FakeAgentParts>,
    /// Each spawn takes a permit: a test holds spawns back by taking them all.
    gate: Arc<tokio::sync::Semaphore>,
}

/// What the runtime hands the test: its ends of the pipes.
struct FakeAgentParts(FakeAgent);

impl std::fmt::Debug for FakeAgentParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeAgentParts")
    }
}

#[async_trait]
impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn spawn(&self, spec: SpawnSpec) -> Result<Agent, RuntimeError> {
        if let Ok(permit) = self.gate.acquire().await {
            permit.forget();
        }
        let (server_stdin, agent_stdin) = tokio::io::duplex(1 << 16);
        let (agent_stdout, server_stdout) = tokio::io::duplex(1 << 16);
        let (exit_tx, exit_rx) = oneshot::channel();
        let (test_exit_tx, test_exit_rx) = oneshot::channel::<ExitInfo>();
        let control = Arc::new(FakeControl {
            obeys_term: self.obeys_term,
            exit: Mutex::new(Some(exit_tx)),
            ..FakeControl::default()
        });
        // Either the test or a signal ends the agent.
        let c = control.clone();
        tokio::spawn(async move {
            if let Ok(info) = test_exit_rx.await {
                c.die(info);
            }
        });
        let _ = self.agents.send(FakeAgentParts(FakeAgent {
            stdin: agent_stdin,
            stdout: Some(agent_stdout),
            exit: Some(test_exit_tx),
            control: control.clone(),
        }));
        // The server's own stdio loop runs these pipes, as for the process runtime.
        let run = crate::runtime::process::prepare_run(&spec)
            .map_err(|e| RuntimeError::spawn(&spec.program, e))?
            .attach(
                AgentPipes {
                    stdout: Box::new(server_stdout),
                    stdin: Box::new(server_stdin),
                    exit: Box::pin(async move { exit_rx.await.unwrap_or(ExitInfo::UNKNOWN) }),
                    control: control.clone(),
                },
                None,
            );
        Ok(Agent {
            pid: None,
            control,
            run,
        })
    }
}

struct Harness {
    _state: tempfile::TempDir,
    manager: Arc<SessionManager>,
    agents: mpsc::UnboundedReceiver<FakeAgentParts>,
    gate: Arc<tokio::sync::Semaphore>,
}

async fn harness(obeys_term: bool, tweak: impl FnOnce(&mut Config)) -> Harness {
    let state = tempfile::tempdir().expect("tmp");
    let mut config = Config {
        state_dir: state.path().to_owned(),
        detect_tailnet_names: false,
        instances: vec![InstanceConfig {
            command: Some(vec!["fake-agent".into()]),
            ..InstanceConfig::new("fake", "command")
        }],
        ..Config::default()
    };
    // Tests run as root in root-owned directories: agents get an unprivileged user.
    config.runtime.agent_user = Some("65534:65534".into());
    tweak(&mut config);
    let (tx, rx) = mpsc::unbounded_channel();
    let gate = Arc::new(tokio::sync::Semaphore::new(1000));
    let runtime: Arc<dyn Runtime> = Arc::new(FakeRuntime {
        obeys_term,
        agents: tx,
        gate: gate.clone(),
    });
    let manager = SessionManager::new(
        &config,
        "/moorline".into(),
        Arc::new(Metrics::default()),
        TaskTracker::new(),
        tokio_util::sync::CancellationToken::new(),
        &|_| runtime.clone(),
    )
    .await
    .expect("manager");
    Harness {
        _state: state,
        manager,
        agents: rx,
        gate,
    }
}

impl Harness {
    async fn create(&mut self) -> (String, FakeAgent) {
        let summary = self
            .manager
            .create(CreateRequest::default())
            .await
            .expect("create");
        let agent = self.agents.recv().await.expect("agent").0;
        (summary.id, agent)
    }
}

#[tokio::test]
async fn lines_are_numbered_and_the_exit_follows_the_last_one() {
    let mut h = harness(true, |_| {}).await;
    let (id, mut agent) = h.create().await;
    let session = h.manager.get(&id).expect("session");
    let mut lifecycle = session.lifecycle();
    let mut out = agent.stdout.take().expect("stdout");
    out.write_all(b"{\"a\":1}\n{\"a\":2}\n{\"a\":")
        .await
        .expect("write");
    out.write_all(b"3}").await.expect("write");
    drop(out);
    let _ = agent.exit.take().expect("exit").send(ExitInfo {
        code: Some(0),
        signal: None,
        reason: None,
    });
    lifecycle
        .wait_for(|l| matches!(l, Lifecycle::Exited { .. }))
        .await
        .expect("exited");
    let Lifecycle::Exited { exit, last_seq, .. } = *lifecycle.borrow() else {
        panic!("not exited")
    };
    assert_eq!(last_seq, 3, "the unterminated last line counts");
    assert!(exit.is_success());
    assert_eq!(session.status(), Status::Exited);
    assert_eq!(session.hub().last_seq(), 3);
}

#[tokio::test]
async fn client_lines_reach_stdin_with_one_newline_each() {
    let mut h = harness(true, |_| {}).await;
    let (id, mut agent) = h.create().await;
    let stdin = h
        .manager
        .get(&id)
        .expect("session")
        .stdin()
        .expect("running");
    for line in ["one", "two", "three"] {
        let input = crate::runtime::Input::line(bytes::Bytes::from(line), Some("local".into()));
        stdin.send(input).await.expect("send");
    }
    let mut got = vec![0u8; 14];
    agent.stdin.read_exact(&mut got).await.expect("read");
    assert_eq!(got, b"one\ntwo\nthree\n");
}

#[tokio::test(start_paused = true)]
async fn delete_escalates_from_term_to_kill_after_the_grace() {
    let mut h = harness(false, |c| c.limits.stop_grace_ms = 5_000).await;
    let (id, agent) = h.create().await;
    let started = tokio::time::Instant::now();
    h.manager.delete(&id).await.expect("delete");
    let signals = agent.control.signals();
    let first_kill = signals.iter().position(|s| *s == "KILL").expect("killed");
    assert!(
        first_kill > 0 && signals[..first_kill].iter().all(|s| *s == "TERM"),
        "{signals:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "the grace was given"
    );
    assert!(h.manager.get(&id).is_none());

    let mut h = harness(true, |c| c.limits.stop_grace_ms = 5_000).await;
    let (id, agent) = h.create().await;
    let started = tokio::time::Instant::now();
    h.manager.delete(&id).await.expect("delete");
    assert_eq!(agent.control.signals()[0], "TERM");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an obedient agent is not waited on"
    );
}

#[tokio::test(start_paused = true)]
async fn output_held_open_after_exit_does_not_hide_the_exit() {
    let mut h = harness(true, |c| c.limits.exit_drain_ms = 300).await;
    let (id, mut agent) = h.create().await;
    let session = h.manager.get(&id).expect("session");
    let mut lifecycle = session.lifecycle();
    // The agent exits but something it started keeps stdout open.
    let held = agent.stdout.take();
    let _ = agent.exit.take().expect("exit").send(ExitInfo {
        code: Some(1),
        signal: None,
        reason: None,
    });
    tokio::time::timeout(
        Duration::from_secs(5),
        lifecycle.wait_for(|l| matches!(l, Lifecycle::Exited { .. })),
    )
    .await
    .expect("exit reported despite the open pipe")
    .expect("lifecycle");
    let signals = agent.control.signals();
    assert_eq!(signals.first(), Some(&"KILL"), "leftovers were killed");
    assert!(!signals.contains(&"TERM"));
    assert_eq!(session.status(), Status::Crashed);
    drop(held);
}

#[tokio::test]
async fn max_sessions_counts_running_agents_only() {
    let mut h = harness(true, |c| c.limits.max_sessions = 1).await;
    let (id, mut agent) = h.create().await;
    assert!(matches!(
        h.manager.create(CreateRequest::default()).await,
        Err(super::SessionError::MaxSessions { limit: 1 })
    ));
    let session = h.manager.get(&id).expect("session");
    let mut lifecycle = session.lifecycle();
    let _ = agent.exit.take().expect("exit").send(ExitInfo {
        code: Some(2),
        signal: None,
        reason: None,
    });
    lifecycle
        .wait_for(|l| matches!(l, Lifecycle::Exited { .. }))
        .await
        .expect("exited");
    let (_, _second) = h.create().await;
    assert!(matches!(
        h.manager
            .restart(&id, super::ConversationRequest::Resume)
            .await,
        Err(super::SessionError::MaxSessions { .. })
    ));
}

#[tokio::test]
async fn a_delete_during_a_restart_stops_the_agent_that_restart_started() {
    let mut h = harness(true, |c| c.limits.max_sessions = 1).await;
    let (id, mut agent) = h.create().await;
    let session = h.manager.get(&id).expect("session");
    let mut lifecycle = session.lifecycle();
    let _ = agent.exit.take().expect("exit").send(ExitInfo {
        code: Some(0),
        signal: None,
        reason: None,
    });
    lifecycle
        .wait_for(|l| matches!(l, Lifecycle::Exited { .. }))
        .await
        .expect("exited");
    // The restart's spawn is held back while the delete comes in.
    let all = u32::try_from(h.gate.available_permits()).expect("permits");
    let held = h.gate.acquire_many(all).await.expect("gate");
    let restart = tokio::spawn({
        let manager = h.manager.clone();
        let id = id.clone();
        async move {
            manager
                .restart(&id, super::ConversationRequest::Resume)
                .await
        }
    });
    while !session.lock().starting {
        assert!(!restart.is_finished(), "{:?}", restart.await);
        tokio::task::yield_now().await;
    }
    let delete = tokio::spawn({
        let manager = h.manager.clone();
        let id = id.clone();
        async move { manager.delete(&id).await }
    });
    drop(held);
    let restarted = h.agents.recv().await.expect("the restart's agent").0;
    delete.await.expect("task").expect("delete");
    let _ = restart.await.expect("task");
    assert_eq!(restarted.control.signals().first(), Some(&"TERM"));
    assert!(h.manager.get(&id).is_none());
    assert!(!session.dir.path().exists(), "nothing left on disk");
    // Its slot is free again.
    let (_, _next) = h.create().await;
}

/// Client input waits for room in the queue's byte budget (so a fast client is held back by
/// TCP, not buffered in memory); one input larger than the whole budget passes alone; a
/// sender waiting on an agent that exits is told, not left hanging.
#[tokio::test]
async fn client_input_queues_within_a_byte_budget() {
    use futures_util::FutureExt;

    use super::InputSender;
    use crate::runtime::Input;

    let line = |n: usize| Input::line(bytes::Bytes::from(vec![b'x'; n]), None);
    let (tx, mut rx) = mpsc::channel(1024);
    let sender = InputSender::new(tx, 100);
    sender.send(line(60)).await.expect("room for the first");
    let mut second = Box::pin(sender.send(line(60)));
    assert!(
        second.as_mut().now_or_never().is_none(),
        "40 bytes left: it waits"
    );
    let first = rx.recv().await.expect("queued");
    assert_eq!(first.bytes(), 60);
    drop(first);
    second.await.expect("room once the first was taken");
    drop(rx.recv().await);

    sender
        .send(line(500))
        .await
        .expect("a large input passes alone");
    let mut waiting = Box::pin(sender.send(line(1)));
    assert!(
        waiting.as_mut().now_or_never().is_none(),
        "the budget is spent"
    );
    drop(rx);
    assert!(waiting.await.is_err(), "the agent is gone");
}
