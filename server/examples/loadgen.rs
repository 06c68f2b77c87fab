//! Run with
//!
//! ```text
//! cargo run --release -p moorline --example loadgen -- [options]
//! ```
//!
//! A load generator for moorline or any other amarre-compatible server (protocol v2). It talks
//! to a server that is already running, on a loopback address only, through the public
//! protocol: `POST /sessions`, `DELETE /sessions/{id}` and the per-session WebSocket
//! `ws://host:port/sessions/{id}`. It needs an instance whose agent echoes every stdin line on
//! stdout, such as `/bin/cat`:
//!
//! ```text
//! d=$(mktemp -d)
//! AMARRE_INSTANCES_JSON='[{"id":"cat","agent":"command","command":["/bin/cat"]}]' \
//!   MOORLINE_DETECT_TAILNET_NAMES=false target/release/moorline serve --port 18400 --state-dir "$d" &
//! cargo run --release -p moorline --example loadgen -- --url http://127.0.0.1:18400 --pid $!
//! kill %1; rm -r "$d"
//! ```
//!
//! # Workloads
//!
//! They run in this order; `--only` picks some of them. Each one creates its own session(s)
//! and deletes them at the end, also when it fails.
//!
//! - `spawn`: `--spawn-count` times (default 200), one after the other, `POST /sessions` then
//!   `DELETE /sessions/{id}`. Reports p50/p99 of the POST latency (the time to spawn an agent
//!   and answer, body included) in ms, and the DELETE latency for information.
//! - `first-line`: `--first-line-count` times (default 50): `POST /sessions`, open its
//!   WebSocket, send one 64-byte line and wait for its echo, the agent's first output line;
//!   then delete the session. Reports p50/p99 in ms of create → first line: what a user waits
//!   for, container start included when the instance runs in runc.
//! - `rtt`: one session, one client; `--rtt-warmup` (default 200) unmeasured round trips, then
//!   `--rtt-count` (default 5000) measured ones. A round trip sends one 64-byte frame and waits
//!   for its echo, which must be byte-for-byte the frame sent. Reports p50/p99 in µs.
//! - `pipelined`: one session, one client; `--pipelined-count` (default 200000) 64-byte frames
//!   sent as fast as possible (`feed`, and `flush` every `--flush-every` frames) while a reader
//!   task counts the echoes. Reports msgs/s = count / (time from the first send to the last
//!   echo received).
//! - `large`: like `pipelined` with `--large-count` (default 1000) frames of `--large-kib`
//!   KiB (default 64). Reports MiB/s of payload echoed.
//! - `fanout`: one session, `--fanout-clients` (default 20) clients. The writer is one of those
//!   clients (it is not an extra one): it sends `--fanout-count` (default 5000) 64-byte frames
//!   pipelined, and every client, the writer included, counts them until it has them all.
//!   Reports deliveries/s = clients × count / (time from the first send to the last frame
//!   received by the slowest client).
//!
//! Every data frame is a JSON object `{"seq":0000000042,"p":"xxx…"}` of exactly the stated
//! size, with its sequence number at a fixed place, so a reader checks cheaply that it gets
//! every frame, in order, with the right length (`rtt` compares whole frames). Before a
//! WebSocket workload sends data, the writer sends small `{"probe":N}` frames until every
//! client has received one: the server only forwards lines to clients that are attached, so
//! this proves all clients are attached without relying on any protocol extension. Probe
//! echoes are otherwise ignored.
//!
//! # Options
//!
//! - `--url URL`: the server (default `http://127.0.0.1:8341`). Only `http://` to
//!   `127.0.0.1`, `localhost` or `[::1]` is accepted: this tool never loads another machine.
//! - `--instance ID`: the instance to start sessions of (default `cat`); it must echo lines.
//! - `--token-file PATH`: a file holding the server's bearer token, sent as
//!   `Authorization: Bearer <token>` on every REST and WebSocket request.
//! - `--pid PID`: the server's process id; its VmRSS and VmHWM (peak RSS) are read from
//!   `/proc/PID/status` before the run (idle) and after it.
//! - `--only W,...`: run only these workloads (`spawn`, `first-line`, `rtt`, `pipelined`,
//!   `large`, `fanout`); default all.
//! - `--runs N`: run each workload N times in a row (default 1) and report, for every figure,
//!   the median (and min/max) over the runs.
//! - `--time-limit-secs S`: abort the whole run, deleting the sessions it created, once it has
//!   taken S seconds (default 60).
//! - `--wait-timeout-secs S`: the longest any single wait may take: an HTTP request, a
//!   WebSocket handshake, an echo, the next frame of a stream, a flush (default 10). On a
//!   timeout the tool says what it had received and exits non-zero.
//! - `--spawn-count`, `--rtt-count`, `--rtt-warmup`, `--pipelined-count`, `--large-count`,
//!   `--large-kib`, `--fanout-clients`, `--fanout-count`: the sizes of the workloads above.
//! - `--flush-every N`: in pipelined sends, flush after every N frames (default 64).
//!
//! Every count is bounded (see `--help` for the ranges), so a run is bounded both in the work
//! it asks of the server and in time.
//!
//! # Output
//!
//! One line per workload (and run), e.g.
//! `pipelined_64B   msgs/s=1234567  (200000 msgs in 0.162 s)`, then a Markdown table of every
//! figure (ready for docs/BENCHMARKS.md) and, with `--pid`, a table of the server's memory.
//! The exit status is 0 on success and 1 on any failure (refused target, HTTP error, timeout,
//! wrong echo, time limit).
//!
//! The client runs on a multi-threaded tokio runtime with 2 workers.

use std::error::Error;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hdrhistogram::Histogram;
use moorline::client::error_chain;
use moorline::wire::CreateSession;
use reqwest::header::AUTHORIZATION;
use reqwest::{Method, StatusCode};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Every error ends the run; it only has to say what happened.
type BoxError = Box<dyn Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

/// A client WebSocket connection.
type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Size of the small frames of `rtt`, `pipelined` and `fanout`.
const SMALL: usize = 64;

/// What the load generator reads of a session summary or an instance: its id. Only that is
/// read, because the bare relay it is compared with answers with a part of
/// [`moorline::wire::SessionSummary`] and [`moorline::wire::InstanceSummary`].
#[derive(Debug, serde::Deserialize)]
struct Named {
    id: String,
}

/// Returns an error with this message.
fn fail<T>(message: impl Into<String>) -> Result<T> {
    Err(message.into().into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    Spawn,
    FirstLine,
    Rtt,
    Pipelined,
    Large,
    Fanout,
}

const ALL_WORKLOADS: [Workload; 6] = [
    Workload::Spawn,
    Workload::FirstLine,
    Workload::Rtt,
    Workload::Pipelined,
    Workload::Large,
    Workload::Fanout,
];

/// Load generator for amarre-compatible servers (see the top of examples/loadgen.rs).
#[derive(Debug, Parser)]
#[command(name = "loadgen")]
struct Args {
    /// Server base URL; only http:// to 127.0.0.1, localhost or [::1] is accepted.
    #[arg(long, default_value = "http://127.0.0.1:8341")]
    url: String,
    /// Instance to start sessions of; its agent must echo each line (e.g. /bin/cat).
    #[arg(long, default_value = "cat")]
    instance: String,
    /// File holding the bearer token, sent on every REST and WebSocket request.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Server pid: report its VmRSS/VmHWM from /proc before (idle) and after the run.
    #[arg(long)]
    pid: Option<u32>,
    /// Workloads to run, comma-separated (default: all, in the order listed).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Workload>,
    /// Run each workload this many times and report the median.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    runs: u64,
    /// Abort the whole run after this many seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    time_limit_secs: u64,
    /// Longest single wait (HTTP request, handshake, echo, next frame, flush), in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    wait_timeout_secs: u64,
    /// spawn: sessions created and deleted, one after the other.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    spawn_count: u64,
    /// first-line: sessions created, each until its first output line, then deleted.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    first_line_count: u64,
    /// rtt: measured round trips of a 64-byte frame.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    rtt_count: u64,
    /// rtt: unmeasured round trips first.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    rtt_warmup: u64,
    /// pipelined: 64-byte frames sent back to back.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pipelined_count: u64,
    /// large: frames sent back to back.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    large_count: u64,
    /// large: frame size in KiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=8192))]
    large_kib: u64,
    /// fanout: clients of the one session, the writer included.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
    fanout_clients: u64,
    /// fanout: 64-byte frames the writer sends.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    fanout_count: u64,
    /// Pipelined sends flush after this many frames.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    flush_every: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let (base, ws_base) = loopback_base(&args.url)?;
    let auth = match &args.token_file {
        None => None,
        Some(path) => {
            let token = moorline::config::read_token_file(path)
                .map_err(|e| format!("--token-file: {e}"))?;
            Some(format!("Bearer {}", token.expose()))
        }
    };
    let wait = Duration::from_secs(args.wait_timeout_secs);
    moorline::client::install_tls_provider();
    let http = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(wait)
        .build()?;
    let target = Target {
        http,
        base,
        ws_base,
        auth,
        instance: args.instance.clone(),
        wait,
        live: Mutex::new(Vec::new()),
        current: Mutex::new(String::from("start")),
    };
    let workloads: Vec<Workload> = if args.only.is_empty() {
        ALL_WORKLOADS.to_vec()
    } else {
        ALL_WORKLOADS
            .into_iter()
            .filter(|w| args.only.contains(w))
            .collect()
    };

    // Fail early on a wrong pid, URL, token or instance.
    let rss_before = args.pid.map(read_rss).transpose()?;
    target.check_instance().await?;
    println!(
        "loadgen: {} instance {:?}, {} run(s) per workload, time limit {} s, wait timeout {} s",
        target.base, target.instance, args.runs, args.time_limit_secs, args.wait_timeout_secs
    );

    let limit = Duration::from_secs(args.time_limit_secs);
    let outcome = tokio::time::timeout(limit, run_workloads(&target, &args, &workloads)).await;
    let results = match outcome {
        Ok(Ok(results)) => results,
        Ok(Err(e)) => {
            let during = target.current();
            target.clean_up().await;
            return fail(format!("{during}: {e}"));
        }
        Err(_) => {
            let during = target.current();
            target.clean_up().await;
            return fail(format!(
                "time limit of {} s exceeded during {during}; aborted",
                args.time_limit_secs
            ));
        }
    };
    let rss_after = args.pid.map(read_rss).transpose()?;

    print_table(&results, args.runs);
    if let (Some(pid), Some(before), Some(after)) = (args.pid, rss_before, rss_after) {
        println!();
        println!("| Server memory (pid {pid}) | VmRSS | VmHWM (peak) |");
        println!("|---|---:|---:|");
        println!(
            "| before the run (idle) | {} | {} |",
            mib(before.rss_kib),
            mib(before.hwm_kib)
        );
        println!(
            "| after the run | {} | {} |",
            mib(after.rss_kib),
            mib(after.hwm_kib)
        );
    }
    Ok(())
}

/// Runs every selected workload `runs` times; returns, per workload, one measurement per run.
async fn run_workloads(
    target: &Target,
    args: &Args,
    workloads: &[Workload],
) -> Result<Vec<Vec<Measurement>>> {
    let mut all = Vec::new();
    for &workload in workloads {
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            target.set_current(format!("{workload:?} (run {run}/{})", args.runs).to_lowercase());
            let m = run_workload(target, args, workload).await?;
            let prefix = if args.runs > 1 {
                format!("[run {run}/{}] ", args.runs)
            } else {
                String::new()
            };
            println!("{prefix}{}", m.line());
            runs.push(m);
        }
        if args.runs > 1 {
            println!("{}", median(&runs).line());
        }
        all.push(runs);
    }
    Ok(all)
}

async fn run_workload(target: &Target, args: &Args, workload: Workload) -> Result<Measurement> {
    match workload {
        Workload::Spawn => spawn(target, args.spawn_count).await,
        Workload::FirstLine => first_line(target, args.first_line_count).await,
        Workload::Rtt => {
            let id = target.create_session().await?.0;
            let result = rtt(target, &id, args.rtt_warmup, args.rtt_count).await;
            target.finish(&id, result).await
        }
        Workload::Pipelined => {
            let count = args.pipelined_count;
            let id = target.create_session().await?.0;
            let result = pipeline(target, &id, 1, count, SMALL, args.flush_every).await;
            let secs = target.finish(&id, result).await?.as_secs_f64();
            Ok(Measurement {
                label: format!("pipelined_{SMALL}B"),
                figures: vec![Figure::new("msgs/s", count as f64 / secs, "", 0)],
                detail: format!("{count} msgs in {secs:.3} s"),
            })
        }
        Workload::Large => {
            let (count, kib) = (args.large_count, args.large_kib);
            let size = usize::try_from(kib * 1024)?;
            let id = target.create_session().await?.0;
            let result = pipeline(target, &id, 1, count, size, args.flush_every).await;
            let secs = target.finish(&id, result).await?.as_secs_f64();
            let mib = (count * kib) as f64 / 1024.0;
            Ok(Measurement {
                label: format!("large_{kib}KiB"),
                figures: vec![Figure::new("MiB/s", mib / secs, "", 1)],
                detail: format!(
                    "{count} msgs of {kib} KiB in {secs:.3} s, {:.0} msgs/s",
                    count as f64 / secs
                ),
            })
        }
        Workload::Fanout => {
            let (clients, count) = (args.fanout_clients, args.fanout_count);
            let id = target.create_session().await?.0;
            let result = pipeline(
                target,
                &id,
                usize::try_from(clients)?,
                count,
                SMALL,
                args.flush_every,
            )
            .await;
            let secs = target.finish(&id, result).await?.as_secs_f64();
            let deliveries = clients * count;
            Ok(Measurement {
                label: format!("fanout_{clients}x{SMALL}B"),
                figures: vec![Figure::new("deliveries/s", deliveries as f64 / secs, "", 0)],
                detail: format!(
                    "{clients} clients, the writer being one of them, x {count} msgs = {deliveries} deliveries in {secs:.3} s"
                ),
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------------

/// `spawn`: create and delete sessions one after the other.
async fn spawn(target: &Target, count: u64) -> Result<Measurement> {
    let mut post = histogram()?;
    let mut delete = histogram()?;
    for _ in 0..count {
        let (id, spawned) = target.create_session().await?;
        post.saturating_record(nanos(spawned));
        delete.saturating_record(nanos(target.delete_session(&id).await?));
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e6;
    Ok(Measurement {
        label: "spawn".into(),
        figures: vec![
            Figure::new("p50", ms(&post, 0.5), "ms", 3),
            Figure::new("p99", ms(&post, 0.99), "ms", 3),
        ],
        detail: format!(
            "{count} x POST /sessions; max {:.3} ms; DELETE p50 {:.3} ms, p99 {:.3} ms",
            ms(&post, 1.0),
            ms(&delete, 0.5),
            ms(&delete, 0.99)
        ),
    })
}

/// `first-line`: what a user waits for: from `POST /sessions` to the agent's first output line
/// (the echo of a line sent as soon as the WebSocket is open), then delete. For container
/// runtimes this includes starting the container.
async fn first_line(target: &Target, count: u64) -> Result<Measurement> {
    let mut hist = histogram()?;
    let maker = FrameMaker::new(SMALL);
    for seq in 0..count {
        let start = Instant::now();
        let (id, _) = target.create_session().await?;
        let result = async {
            let mut ws = target.connect(&id).await?;
            let frame = maker.frame(seq);
            tokio::time::timeout(target.wait, ws.send(Message::Text(frame.clone())))
                .await
                .map_err(|_| "first-line: sending did not complete".to_owned())?
                .map_err(|e| format!("first-line: sending: {e}"))?;
            let echo = next_text(&mut ws, target.wait)
                .await
                .map_err(|e| format!("first-line: waiting for the first line: {e}"))?;
            let elapsed = start.elapsed();
            if echo.as_str() != frame.as_str() {
                return fail(format!(
                    "first-line: expected the echo, got {}",
                    preview(&echo)
                ));
            }
            close(ws).await;
            Ok(elapsed)
        }
        .await;
        // `finish` deletes the session whatever happened.
        let elapsed = target.finish(&id, result).await?;
        hist.saturating_record(nanos(elapsed));
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1e6;
    Ok(Measurement {
        label: "first_line".into(),
        figures: vec![
            Figure::new("p50", ms(0.5), "ms", 2),
            Figure::new("p99", ms(0.99), "ms", 2),
        ],
        detail: format!(
            "{count} x POST /sessions until the first output line; max {:.2} ms",
            ms(1.0)
        ),
    })
}

/// `rtt`: sequential round trips of one 64-byte frame on one client.
async fn rtt(target: &Target, id: &str, warmup: u64, count: u64) -> Result<Measurement> {
    let mut clients = vec![target.connect(id).await?];
    sync(&mut clients, target.wait).await?;
    let mut ws = clients.pop().ok_or("no client")?;
    let maker = FrameMaker::new(SMALL);
    let mut hist = histogram()?;
    for seq in 0..warmup + count {
        let frame = maker.frame(seq);
        let start = Instant::now();
        tokio::time::timeout(target.wait, ws.send(Message::Text(frame.clone())))
            .await
            .map_err(|_| format!("round trip {seq}: sending did not complete"))?
            .map_err(|e| format!("round trip {seq}: sending: {e}"))?;
        // Skip late probe echoes; the next data frame must be our frame.
        let echo = loop {
            let text = next_text(&mut ws, target.wait).await.map_err(|e| {
                format!("round trip {seq}: waiting for the echo: {e}; {seq} echoes received")
            })?;
            if !is_probe(&text) {
                break text;
            }
        };
        let elapsed = start.elapsed();
        if echo.as_str() != frame.as_str() {
            return fail(format!(
                "round trip {seq}: expected the echo of {}, got {}",
                preview(&frame),
                preview(&echo)
            ));
        }
        if seq >= warmup {
            hist.saturating_record(nanos(elapsed));
        }
    }
    close(ws).await;
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    Ok(Measurement {
        label: format!("rtt_{SMALL}B"),
        figures: vec![
            Figure::new("p50", us(0.5), "µs", 1),
            Figure::new("p99", us(0.99), "µs", 1),
        ],
        detail: format!(
            "{count} round trips after {warmup} warm-up; max {:.1} µs",
            us(1.0)
        ),
    })
}

/// `pipelined`, `large` and `fanout`: `n_clients` clients of session `id`; the first one
/// sends `count` frames of `size` bytes back to back while every client (the sender included)
/// reads them. Returns the time from the first send to the last frame received by any client.
async fn pipeline(
    target: &Target,
    id: &str,
    n_clients: usize,
    count: u64,
    size: usize,
    flush_every: u64,
) -> Result<Duration> {
    let wait = target.wait;
    let mut clients = Vec::with_capacity(n_clients);
    for _ in 0..n_clients {
        clients.push(target.connect(id).await?);
    }
    sync(&mut clients, wait).await?;

    let mut clients = clients.into_iter();
    let (mut sink, mut writer_stream) = clients.next().ok_or("no client")?.split();
    let writer_label = if n_clients > 1 {
        "client 1 (the writer)"
    } else {
        "reader"
    };
    // Readers first, so they are already draining when the first frame comes back. Each one
    // returns when its last frame arrived, and its connection (if it owns a whole one) so it
    // is closed only after the measurement.
    let mut readers = vec![tokio::spawn(async move {
        let end = count_frames(&mut writer_stream, writer_label, count, size, wait).await?;
        Ok::<_, BoxError>((end, None))
    })];
    for (i, mut ws) in clients.enumerate() {
        readers.push(tokio::spawn(async move {
            let label = format!("client {}", i + 2);
            let end = count_frames(&mut ws, &label, count, size, wait).await?;
            Ok((end, Some(ws)))
        }));
    }
    let sender = tokio::spawn(async move {
        let start = send_frames(&mut sink, size, count, flush_every, wait).await?;
        Ok::<_, BoxError>((sink, start))
    });

    // Every task bounds its own waits, so these joins are bounded too.
    let (mut sink, start) = match sender.await? {
        Ok(done) => done,
        Err(e) => {
            readers.iter().for_each(|r| r.abort());
            return Err(e);
        }
    };
    let mut last = start;
    let mut finished = Vec::with_capacity(n_clients);
    let mut readers = readers.into_iter();
    while let Some(reader) = readers.next() {
        match reader.await? {
            Ok((end, ws)) => {
                last = last.max(end);
                finished.extend(ws);
            }
            Err(e) => {
                readers.for_each(|r| r.abort());
                return Err(e);
            }
        }
    }
    let elapsed = last - start;
    // Close politely; the writer's reader half was dropped, its sink half sends the close.
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    for ws in finished {
        close(ws).await;
    }
    Ok(elapsed)
}

/// Sends `count` frames of `size` bytes, flushing every `flush_every`; returns when the first
/// was sent.
async fn send_frames<S>(
    sink: &mut S,
    size: usize,
    count: u64,
    flush_every: u64,
    wait: Duration,
) -> Result<Instant>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let maker = FrameMaker::new(size);
    let start = Instant::now();
    let mut seq = 0;
    while seq < count {
        let batch_end = (seq + flush_every).min(count);
        let batch = async {
            for s in seq..batch_end {
                sink.feed(Message::Text(maker.frame(s))).await?;
            }
            sink.flush().await
        };
        match tokio::time::timeout(wait, batch).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return fail(format!("sending frames {seq}..{batch_end}: {e}")),
            Err(_) => {
                return fail(format!(
                    "sending frames {seq}..{batch_end}: no progress for {} s ({seq} of {count} sent)",
                    wait.as_secs()
                ));
            }
        }
        seq = batch_end;
    }
    Ok(start)
}

/// Reads until `expected` data frames have arrived, checking their order and size; returns
/// when the last one arrived. Probe echoes are skipped.
async fn count_frames<S>(
    stream: &mut S,
    label: &str,
    expected: u64,
    size: usize,
    wait: Duration,
) -> Result<Instant>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let mut got = 0u64;
    let mut last: Option<Utf8Bytes> = None;
    let received = |got: u64, last: &Option<Utf8Bytes>| {
        let last = last
            .as_ref()
            .map_or_else(|| "none".to_owned(), |t| preview(t));
        format!("received {got} of {expected} frames, the last one {last}")
    };
    while got < expected {
        let text = match next_text(stream, wait).await {
            Ok(text) => text,
            Err(e) => return fail(format!("{label}: {e}; {}", received(got, &last))),
        };
        if is_probe(&text) {
            continue;
        }
        if text.len() != size || FrameMaker::seq_of(&text) != Some(got) {
            return fail(format!(
                "{label}: expected frame {got} of {size} bytes, got {}; {}",
                preview(&text),
                received(got, &last)
            ));
        }
        got += 1;
        last = Some(text);
    }
    Ok(Instant::now())
}

/// Sends `{"probe":N}` frames from the first client until every client has received one, i.e.
/// is attached to the session and will receive every later line.
async fn sync(clients: &mut [Ws], wait: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut ready = vec![false; clients.len()];
    // Each round sends one probe and gives the clients 200 ms to receive one.
    let mut round = 0u64;
    loop {
        let missing = ready.iter().filter(|r| !**r).count();
        if missing == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return fail(format!(
                "{missing} of {} clients received none of the {round} probe frames sent in {} s",
                clients.len(),
                wait.as_secs()
            ));
        }
        let Some(writer) = clients.first_mut() else {
            return Ok(());
        };
        let probe = Message::text(format!("{{\"probe\":{round}}}"));
        tokio::time::timeout(wait, writer.send(probe))
            .await
            .map_err(|_| "sending a probe frame did not complete")?
            .map_err(|e| format!("sending a probe frame: {e}"))?;
        let round_end = (tokio::time::Instant::now() + Duration::from_millis(200)).min(deadline);
        for (i, ws) in clients.iter_mut().enumerate() {
            while !ready[i] {
                match tokio::time::timeout_at(round_end, next_text(ws, wait)).await {
                    Err(_) => break, // try again next round
                    Ok(Err(e)) => {
                        return fail(format!("client {}: waiting for a probe: {e}", i + 1));
                    }
                    Ok(Ok(text)) if is_probe(&text) => ready[i] = true,
                    Ok(Ok(text)) => {
                        return fail(format!(
                            "client {}: unexpected frame before any data was sent: {}",
                            i + 1,
                            preview(&text)
                        ));
                    }
                }
            }
        }
        round += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

/// Makes data frames `{"seq":0000000042,"p":"xxx…"}` of one size by copying a template and
/// writing the sequence number into it: cheap enough to do while sending, even at 64 KiB.
#[derive(Debug)]
struct FrameMaker {
    template: String,
}

impl FrameMaker {
    const PREFIX: &'static str = "{\"seq\":";
    const DIGITS: usize = 10;
    /// The smallest frame: prefix, digits, `,"p":"`, `"}`.
    const MIN_SIZE: usize = 7 + 10 + 6 + 2;

    fn new(size: usize) -> Self {
        let size = size.max(Self::MIN_SIZE);
        let mut template = String::with_capacity(size);
        template.push_str(Self::PREFIX);
        template.push_str(&"0".repeat(Self::DIGITS));
        template.push_str(",\"p\":\"");
        template.push_str(&"x".repeat(size - 2 - template.len()));
        template.push_str("\"}");
        Self { template }
    }

    fn frame(&self, seq: u64) -> Utf8Bytes {
        let mut text = self.template.clone();
        let start = Self::PREFIX.len();
        text.replace_range(
            start..start + Self::DIGITS,
            &format!("{seq:0width$}", width = Self::DIGITS),
        );
        text.into()
    }

    /// The sequence number of a data frame, `None` for anything else.
    fn seq_of(text: &str) -> Option<u64> {
        let digits = text
            .as_bytes()
            .strip_prefix(Self::PREFIX.as_bytes())?
            .get(..Self::DIGITS)?;
        digits.iter().try_fold(0u64, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
        })
    }
}

fn is_probe(text: &str) -> bool {
    text.starts_with("{\"probe\":")
}

/// The next text frame; pings and pongs are skipped, anything else is an error.
async fn next_text<S>(stream: &mut S, wait: Duration) -> Result<Utf8Bytes, String>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        let message = match tokio::time::timeout(wait, stream.next()).await {
            Err(_) => return Err(format!("no frame for {} s", wait.as_secs())),
            Ok(None) => return Err("the connection ended".into()),
            Ok(Some(Err(e))) => return Err(format!("WebSocket error: {e}")),
            Ok(Some(Ok(m))) => m,
        };
        match message {
            Message::Text(text) => return Ok(text),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            Message::Binary(b) => {
                return Err(format!("unexpected binary frame of {} bytes", b.len()));
            }
            Message::Close(Some(frame)) => {
                return Err(format!(
                    "the server closed the connection: {} {:?}",
                    frame.code,
                    frame.reason.as_str()
                ));
            }
            Message::Close(None) => return Err("the server closed the connection".into()),
        }
    }
}

/// The start of a frame, for messages.
fn preview(text: &str) -> String {
    let cut = text.char_indices().nth(48).map_or(text.len(), |(i, _)| i);
    if cut == text.len() {
        format!("{text:?}")
    } else {
        format!("{:?}… ({} bytes)", &text[..cut], text.len())
    }
}

/// Closes a connection politely; it is being dropped anyway, so errors do not matter.
async fn close(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// `http://host:port` and `ws://host:port` for a loopback `--url`; anything else is refused.
fn loopback_base(url: &str) -> Result<(String, String)> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("--url {url:?}: {e}"))?;
    if parsed.scheme() != "http" {
        return fail(format!("--url {url:?}: only http:// is supported"));
    }
    let host = parsed.host_str().unwrap_or_default();
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        return fail(format!(
            "--url {url:?}: refusing a non-loopback target; use 127.0.0.1, localhost or [::1]"
        ));
    }
    if parsed.path() != "/" || parsed.query().is_some() || !parsed.username().is_empty() {
        return fail(format!("--url {url:?}: give only scheme, host and port"));
    }
    let port = parsed.port_or_known_default().unwrap_or(80);
    Ok((
        format!("http://{host}:{port}"),
        format!("ws://{host}:{port}"),
    ))
}

#[derive(Debug)]
struct Target {
    http: reqwest::Client,
    /// `http://host:port`
    base: String,
    /// `ws://host:port`
    ws_base: String,
    /// `Bearer <token>`
    auth: Option<String>,
    instance: String,
    /// Longest single wait.
    wait: Duration,
    /// Sessions created and not deleted yet, deleted on failure.
    live: Mutex<Vec<String>>,
    /// What is running, for error messages.
    current: Mutex<String>,
}

impl Target {
    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.auth {
            Some(auth) => request.header(AUTHORIZATION, auth),
            None => request,
        }
    }

    /// Checks that the server answers and offers the instance.
    async fn check_instance(&self) -> Result<()> {
        let resp = self
            .request(Method::GET, "/instances")
            .send()
            .await
            .map_err(|e| format!("GET {}/instances: {}", self.base, error_chain(&e)))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| error_chain(&e))?;
        if status != StatusCode::OK {
            return fail(format!(
                "GET /instances: {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        let list: Vec<Named> = serde_json::from_slice(&body)?;
        let ids: Vec<&str> = list.iter().map(|i| i.id.as_str()).collect();
        if !ids.contains(&self.instance.as_str()) {
            return fail(format!(
                "the server has no instance {:?} (it has {ids:?}); start it with one that runs /bin/cat",
                self.instance
            ));
        }
        Ok(())
    }

    /// `POST /sessions`; returns the id and how long the request took.
    async fn create_session(&self) -> Result<(String, Duration)> {
        let body = CreateSession {
            instance_id: Some(self.instance.clone()),
            ..CreateSession::default()
        };
        let start = Instant::now();
        let resp = self
            .request(Method::POST, "/sessions")
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("POST /sessions: {}", error_chain(&e)))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("POST /sessions: {}", error_chain(&e)))?;
        let elapsed = start.elapsed();
        if status != StatusCode::CREATED {
            return fail(format!(
                "POST /sessions: expected 201, got {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        let Named { id } = serde_json::from_slice(&body)
            .map_err(|e| format!("POST /sessions: unexpected answer: {e}"))?;
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(id.clone());
        Ok((id, elapsed))
    }

    /// `DELETE /sessions/{id}`; returns how long it took.
    async fn delete_session(&self, id: &str) -> Result<Duration> {
        let start = Instant::now();
        let resp = self
            .request(Method::DELETE, &format!("/sessions/{id}"))
            .send()
            .await
            .map_err(|e| format!("DELETE /sessions/{id}: {}", error_chain(&e)))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| error_chain(&e))?;
        let elapsed = start.elapsed();
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|l| l != id);
        if status != StatusCode::NO_CONTENT {
            return fail(format!(
                "DELETE /sessions/{id}: expected 204, got {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        Ok(elapsed)
    }

    /// Deletes session `id` whatever `result` is; the workload's error comes first.
    async fn finish<T>(&self, id: &str, result: Result<T>) -> Result<T> {
        let deleted = self.delete_session(id).await;
        let value = result?;
        deleted?;
        Ok(value)
    }

    /// Deletes the sessions left behind by a failure; best effort.
    async fn clean_up(&self) {
        let live = std::mem::take(&mut *self.live.lock().unwrap_or_else(PoisonError::into_inner));
        for id in live {
            match self.delete_session(&id).await {
                Ok(_) => eprintln!("loadgen: deleted session {id}"),
                Err(e) => eprintln!("loadgen: could not delete session {id}: {e}"),
            }
        }
    }

    /// Opens a WebSocket to session `id`.
    async fn connect(&self, id: &str) -> Result<Ws> {
        let url = format!("{}/sessions/{id}", self.ws_base);
        let mut request = url.as_str().into_client_request()?;
        if let Some(auth) = &self.auth {
            request
                .headers_mut()
                .insert(AUTHORIZATION, HeaderValue::from_str(auth)?);
        }
        // Room for frames far above the 64 KiB of `large` (the defaults may change).
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
        let (ws, _response) = tokio::time::timeout(self.wait, connect)
            .await
            .map_err(|_| format!("connecting to {url}: no answer"))?
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        Ok(ws)
    }

    fn set_current(&self, what: String) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = what;
    }

    fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Resident memory of a process, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy)]
struct Rss {
    rss_kib: u64,
    hwm_kib: u64,
}

fn read_rss(pid: u32) -> Result<Rss> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("--pid {pid}: {path}: {e}"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .ok_or_else(|| format!("{path}: no {name} line"))?;
        let kib = line.trim().trim_end_matches("kB").trim();
        Ok(kib
            .parse()
            .map_err(|e| format!("{path}: {name} {kib:?}: {e}"))?)
    };
    Ok(Rss {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------------

fn histogram() -> Result<Histogram<u64>> {
    // Nanoseconds from 1 ns to 1 hour (far beyond any wait), 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| format!("histogram: {e:?}").into())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone)]
struct Figure {
    name: &'static str,
    value: f64,
    unit: &'static str,
    decimals: usize,
}

impl Figure {
    fn new(name: &'static str, value: f64, unit: &'static str, decimals: usize) -> Self {
        Self {
            name,
            value,
            unit,
            decimals,
        }
    }

    fn show(&self, value: f64) -> String {
        format!("{value:.prec$}", prec = self.decimals)
    }

    /// The table's "Figure" column.
    fn heading(&self) -> String {
        if self.unit.is_empty() {
            self.name.to_owned()
        } else {
            format!("{} ({})", self.name, self.unit)
        }
    }
}

/// What one run of one workload measured.
#[derive(Debug, Clone)]
struct Measurement {
    label: String,
    figures: Vec<Figure>,
    detail: String,
}

impl Measurement {
    fn line(&self) -> String {
        let mut line = format!("{:<15}", self.label);
        for f in &self.figures {
            let _ = write!(line, " {}={}{}", f.name, f.show(f.value), f.unit);
        }
        let _ = write!(line, "  ({})", self.detail);
        line
    }
}

/// The median of each figure over several runs of one workload.
fn median(runs: &[Measurement]) -> Measurement {
    let mut out = runs[0].clone();
    for (i, figure) in out.figures.iter_mut().enumerate() {
        figure.value = median_of(runs.iter().map(|r| r.figures[i].value).collect());
    }
    out.detail = format!("median of {} runs", runs.len());
    out
}

fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The Markdown table of every figure.
fn print_table(results: &[Vec<Measurement>], runs: u64) {
    println!();
    if runs > 1 {
        println!("| Workload | Figure | Median of {runs} runs | Min | Max |");
        println!("|---|---|---:|---:|---:|");
    } else {
        println!("| Workload | Figure | Value |");
        println!("|---|---|---:|");
    }
    for workload in results {
        let Some(first) = workload.first() else {
            continue;
        };
        for (i, figure) in first.figures.iter().enumerate() {
            let values: Vec<f64> = workload.iter().map(|m| m.figures[i].value).collect();
            let med = figure.show(median_of(values.clone()));
            if runs > 1 {
                let min = values.iter().copied().fold(f64::INFINITY, f64::min);
                let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                println!(
                    "| {} | {} | {med} | {} | {} |",
                    first.label,
                    figure.heading(),
                    figure.show(min),
                    figure.show(max)
                );
            } else {
                println!("| {} | {} | {med} |", first.label, figure.heading());
            }
        }
    }
}
