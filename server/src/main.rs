//! The `moorline` command: the server (`serve`, the default), configuration helpers, and client
//! commands for a running server. Everything of substance lives in the library.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use moorline::client::{Client, ClientError, format_instances, format_table};
use moorline::config::{
    Config, Connection, EXAMPLE_CONFIG, EXIT_CONFIG, LogFormat, Overrides, Sources,
};
use moorline::runtime::network;
use moorline::wire::{CreateSession, Decision, NewProject};

#[derive(Debug, Parser)]
#[command(
    name = "moorline",
    version,
    about = "Drive CLI coding agents on this machine from anywhere on your tailnet"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve(ServeArgs),
    /// Load and validate the configuration, then print it. Fails (exit 64) when an instance
    /// could not start sessions: its program, credentials file or workspace roots are missing.
    CheckConfig {
        #[command(flatten)]
        args: ServeArgs,
        /// Ignore the environment: validate the file alone (for build-time checks; instances'
        /// programs, credentials files and workspace roots are not looked for).
        #[arg(long)]
        no_env: bool,
    },
    /// Print a commented configuration file with every key and its default.
    PrintDefaultConfig,
    /// Manage sessions on a running server.
    Sessions {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        action: SessionsCommand,
    },
    /// Manage projects (git repositories sessions get worktrees of) on a running server.
    Projects {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        action: ProjectsCommand,
    },
    /// List the server's instances: agent, dialect, runtime, workspace roots, availability.
    Instances {
        #[command(flatten)]
        conn: Connection,
        /// Print the JSON the server returned instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending approval request of a session (the only one, if REQUEST is left out).
    Approve {
        #[command(flatten)]
        conn: Connection,
        /// Session id.
        id: String,
        /// The request's id (see `moorline sessions get ID`); needed when several are pending.
        request: Option<String>,
    },
    /// Deny a pending approval request of a session (the only one, if REQUEST is left out).
    Deny {
        #[command(flatten)]
        conn: Connection,
        /// Session id.
        id: String,
        /// The request's id; needed when several are pending.
        request: Option<String>,
        /// Why, for the agent (Claude's dialect passes it on).
        #[arg(long)]
        message: Option<String>,
    },
    /// Attach to a session: lines read on stdin are sent to the agent, frames are printed to
    /// stdout one per line.
    Attach {
        #[command(flatten)]
        conn: Connection,
        /// Session id.
        id: String,
        /// Replay every retained line after this sequence number first (0: everything).
        #[arg(long)]
        since: Option<u64>,
        /// Ask for the amarre.hello frame first.
        #[arg(long)]
        hello: bool,
        /// After stdin ends, stay until no frame has arrived for this many milliseconds
        /// (default: leave when stdin ends, as websocat does).
        #[arg(long, value_name = "MS")]
        linger: Option<u64>,
        /// Human mode (pi RPC dialect): streamed text joined, tools summarised, approvals
        /// asked inline (y/n), typed lines sent as prompts. The default on a terminal.
        #[arg(long, conflicts_with = "raw")]
        render: bool,
        /// One JSON frame per line, even on a terminal (the default in pipes).
        #[arg(long)]
        raw: bool,
    },
    /// Follow session events (created, status, activity, approvals, deleted), one line each;
    /// reconnects and resumes by itself.
    Watch {
        #[command(flatten)]
        conn: Connection,
        /// Print each event's JSON as the server sent it.
        #[arg(long)]
        json: bool,
    },
    /// moorline's built-in echo agent (used by the `echo` instance).
    #[command(name = "echo-agent", hide = true)]
    EchoAgent,
    /// Keeps one agent of a durable session (started by `keeper-pane`).
    #[command(hide = true)]
    Keeper {
        /// The session's run directory.
        run_dir: PathBuf,
    },
    /// What a session's tmux pane runs: starts the keeper, shows the agent's stderr.
    #[command(name = "keeper-pane", hide = true)]
    KeeperPane {
        /// The session's run directory.
        run_dir: PathBuf,
    },
    /// runc hook: bind-mounts a session's workspace into its container, opened beneath its
    /// workspace root.
    #[command(name = "mount-workspace", hide = true)]
    MountWorkspace {
        /// Where the workspace is (JSON).
        anchor: String,
        /// The container's root filesystem.
        rootfs: PathBuf,
    },
    /// The OCI hook that sets up a container's isolated network (run by runc).
    #[command(name = "net-hook", hide = true)]
    NetHook {
        /// The session's run directory.
        run_dir: PathBuf,
    },
    /// Runs slirp4netns and the host-port forwarder of one container.
    #[command(name = "net-helper", hide = true)]
    NetHelper {
        /// The session's run directory.
        run_dir: PathBuf,
        /// The container's init process (host pid).
        pid: i32,
    },
    /// Opens forwarded ports inside a container's network namespace.
    #[command(name = "net-listen", hide = true)]
    NetListen {
        /// The container's init process (host pid).
        pid: i32,
        /// Join the container's user namespace first (rootless).
        #[arg(long)]
        userns: bool,
        /// The ports.
        ports: Vec<u16>,
    },
}

#[derive(Debug, Subcommand)]
enum ProjectsCommand {
    /// List projects (JSON).
    List,
    /// Register an existing repository inside a workspace root.
    Add {
        /// The repository (a relative path is taken from the current directory).
        path: String,
        /// Its name (default: the directory's name).
        #[arg(long)]
        id: Option<String>,
        /// The branch sessions start from (default: the one checked out).
        #[arg(long)]
        default_branch: Option<String>,
        /// The instance its sessions run by default.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Forget a project (its repository and worktrees stay).
    Rm {
        /// Project id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum SessionsCommand {
    /// List sessions.
    List {
        /// Print the JSON the server returned instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create a session and start its agent.
    New {
        /// Instance to run (default: the server's default instance).
        #[arg(long)]
        instance: Option<String>,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Working directory for the agent (a relative path is taken from the current
        /// directory).
        #[arg(long)]
        cwd: Option<String>,
        /// Environment variable for the agent, KEY=VALUE (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Work in this project, in a git worktree of the session's own (instead of --cwd).
        #[arg(long, conflicts_with = "cwd")]
        project: Option<String>,
        /// With --project: the worktree's branch (default: a new moorline/<session id>).
        #[arg(long, requires = "project")]
        branch: Option<String>,
    },
    /// Show one session.
    Get {
        /// Session id.
        id: String,
    },
    /// Delete a session: stop its agent and remove its output (and its worktree, unless it
    /// holds work).
    Rm {
        /// Session id.
        id: String,
        /// Remove the session's worktree even when it holds uncommitted or unmerged work.
        #[arg(long)]
        force: bool,
    },
    /// Start the agent of a session that exited or crashed, on its earlier conversation.
    Restart {
        /// Session id.
        id: String,
        /// Start a new conversation instead of continuing the earlier one.
        #[arg(long)]
        new_conversation: bool,
    },
}

#[derive(Debug, Clone, Default, Args)]
struct ServeArgs {
    /// Configuration file (default: ~/.config/moorline/config.toml or /etc/moorline/config.toml).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

impl ServeArgs {
    fn sources(&self) -> Sources {
        Sources::from_process(self.config.clone(), self.overrides.clone())
    }
}

/// glibc gives threads that allocate at the same time arenas of their own (up to eight per
/// core) and keeps what is freed in each, so after a burst of output the server stayed 10–15
/// MiB above what it uses; with two arenas the same workloads ran as fast and that memory was
/// reused (docs/BENCHMARKS.md). Set before the runtime starts any thread.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_allocator_arenas() {
    // SAFETY: `mallopt` takes two integers, no pointers; it is called while the process has
    // one thread. Its result (0 if refused) changes nothing for correctness.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_allocator_arenas() {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => serve(&cli.serve),
        Some(Command::Serve(args)) => serve(&args),
        Some(Command::CheckConfig { args, no_env }) => check_config(&args, no_env),
        Some(Command::PrintDefaultConfig) => {
            print!("{EXAMPLE_CONFIG}");
            ExitCode::SUCCESS
        }
        Some(Command::EchoAgent) => {
            let stdin = std::io::stdin().lock();
            let stdout = std::io::stdout().lock();
            match moorline_adapters::echo::run(stdin, stdout) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(1),
            }
        }
        Some(Command::Keeper { run_dir }) => moorline::keeper::keeper_main(&run_dir),
        Some(Command::MountWorkspace { anchor, rootfs }) => {
            moorline::runtime::workspace::mount_main(&anchor, &rootfs)
        }
        Some(Command::KeeperPane { run_dir }) => match std::env::current_exe() {
            Ok(exe) => moorline::keeper::pane_main(&run_dir, &exe),
            Err(e) => {
                eprintln!("moorline: cannot find my own executable: {e}");
                ExitCode::from(1)
            }
        },
        Some(Command::NetHook { run_dir }) => with_exe(|exe| network::hook_main(&run_dir, exe)),
        Some(Command::NetHelper { run_dir, pid }) => {
            with_exe(|exe| network::helper_main(&run_dir, pid, exe))
        }
        Some(Command::NetListen { pid, userns, ports }) => {
            network::listen_main(pid, userns, &ports)
        }
        Some(Command::Sessions { conn, action }) => {
            client_command(|rt| rt.block_on(sessions(conn, action)))
        }
        Some(Command::Projects { conn, action }) => {
            client_command(|rt| rt.block_on(projects(conn, action)))
        }
        Some(Command::Instances { conn, json }) => client_command(|rt| {
            rt.block_on(async {
                let list = Client::new(&conn.url, conn.token_file.as_deref())?
                    .instances()
                    .await?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&list).unwrap_or_default()
                    );
                } else {
                    print!("{}", format_instances(&list));
                }
                Ok(())
            })
        }),
        Some(Command::Watch { conn, json }) => client_command(|rt| {
            rt.block_on(async {
                let client = Client::new(&conn.url, conn.token_file.as_deref())?;
                moorline::watch::watch(&client, json, &mut tokio::io::stdout()).await
            })
        }),
        Some(Command::Approve { conn, id, request }) => {
            answer(conn, id, request, Decision::Allow, None)
        }
        Some(Command::Deny {
            conn,
            id,
            request,
            message,
        }) => answer(conn, id, request, Decision::Deny, message),
        Some(Command::Attach {
            conn,
            id,
            since,
            hello,
            linger,
            render,
            raw,
        }) => client_command(|rt| {
            use std::io::IsTerminal;
            let render = render || (!raw && std::io::stdout().is_terminal());
            rt.block_on(async {
                let client = Client::new(&conn.url, conn.token_file.as_deref())?;
                client
                    .attach(&id, since, hello, linger.map(Duration::from_millis), render)
                    .await
            })
        }),
    }
}

/// `moorline approve` / `moorline deny`.
fn answer(
    conn: Connection,
    id: String,
    request: Option<String>,
    decision: Decision,
    message: Option<String>,
) -> ExitCode {
    client_command(|rt| {
        rt.block_on(async {
            let client = Client::new(&conn.url, conn.token_file.as_deref())?;
            let resolved = client
                .answer(&id, request.as_deref(), decision, message.as_deref())
                .await?;
            let by = resolved.settled_by();
            println!("{}: {} (by {by})", resolved.id, resolved.decision.as_str());
            if resolved.decision != decision {
                return Err(moorline::client::ClientError::Other(format!(
                    "the request was already settled: {} by {by}",
                    resolved.decision.as_str()
                )));
            }
            Ok(())
        })
    })
}

/// Runs `f` with the path of this executable, which helpers start again.
fn with_exe(f: impl FnOnce(&std::path::Path) -> ExitCode) -> ExitCode {
    match std::env::current_exe() {
        Ok(exe) => f(&exe),
        Err(e) => {
            eprintln!("moorline: cannot find my own executable: {e}");
            ExitCode::from(1)
        }
    }
}

fn load_config(sources: &Sources) -> Result<Config, ExitCode> {
    Config::load(sources).map_err(|e| {
        eprintln!("moorline: configuration error:\n{e}");
        ExitCode::from(EXIT_CONFIG as u8)
    })
}

fn check_config(args: &ServeArgs, no_env: bool) -> ExitCode {
    let mut sources = args.sources();
    if no_env {
        sources = sources.without_env();
    }
    let config = match load_config(&sources) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // At build time (`--no-env`) the machine the file is for is not this one: its binaries,
    // credentials and workspaces are checked where it runs.
    let unusable = if no_env {
        Vec::new()
    } else {
        config.unusable_instances()
    };
    if !unusable.is_empty() {
        eprintln!("moorline: configuration error: instances that cannot start sessions:");
        for (instance, why) in unusable {
            eprintln!("instance {:?}: {why}", instance.id);
        }
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    match toml::to_string_pretty(&config) {
        Ok(text) => {
            println!("# configuration is valid\n{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("moorline: cannot print configuration: {e}");
            ExitCode::from(1)
        }
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    limit_allocator_arenas();
    let config = match load_config(&args.sources()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_tracing(&config);
    let runtime = match async_runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let listeners = moorline::Listeners::bind(&config).await?;
        moorline::run(listeners, config, shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(moorline::ServerError::Config(e)) => {
            eprintln!("moorline: configuration error:\n{e}");
            ExitCode::from(EXIT_CONFIG as u8)
        }
        Err(e) => {
            eprintln!("moorline: {e}");
            ExitCode::from(1)
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the server can only be killed; run until then.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Builds the tokio runtime, or says why it cannot.
fn async_runtime(
    mut builder: tokio::runtime::Builder,
) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("moorline: cannot start the async runtime: {e}");
        ExitCode::from(1)
    })
}

fn client_command(f: impl FnOnce(&tokio::runtime::Runtime) -> Result<(), ClientError>) -> ExitCode {
    let runtime = match async_runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = f(&runtime);
    // A blocking read of stdin (attach) may still be waiting for a line: do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moorline: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

async fn projects(conn: Connection, action: ProjectsCommand) -> Result<(), ClientError> {
    let client = Client::new(&conn.url, conn.token_file.as_deref())?;
    fn print(v: &impl serde::Serialize) {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
    match action {
        ProjectsCommand::List => print(&client.projects().await?),
        ProjectsCommand::Add {
            path,
            id,
            default_branch,
            instance,
        } => {
            let path = std::path::absolute(&path)
                .map_err(|e| ClientError::Other(format!("{path}: {e}")))?;
            let body = NewProject {
                id,
                path,
                default_branch,
                default_instance: instance,
                ..NewProject::default()
            };
            print(&client.add_project(&body).await?);
        }
        ProjectsCommand::Rm { id } => client.remove_project(&id).await?,
    }
    Ok(())
}

async fn sessions(conn: Connection, action: SessionsCommand) -> Result<(), ClientError> {
    let client = Client::new(&conn.url, conn.token_file.as_deref())?;
    fn print(v: &impl serde::Serialize) {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
    match action {
        SessionsCommand::List { json } => {
            let list = client.list().await?;
            if json {
                print(&list);
            } else {
                print!("{}", format_table(&list));
            }
        }
        SessionsCommand::New {
            instance,
            name,
            cwd,
            env,
            project,
            branch,
        } => {
            let env: BTreeMap<String, String> = env.into_iter().collect();
            // A relative directory means one relative to where the command runs.
            let cwd = cwd
                .map(|c| {
                    std::path::absolute(&c)
                        .map(|p| p.display().to_string())
                        .map_err(|e| ClientError::Other(format!("--cwd {c}: {e}")))
                })
                .transpose()?;
            let body = CreateSession {
                instance_id: instance,
                name,
                cwd,
                env,
                project,
                branch,
            };
            print(&client.create(&body).await?);
        }
        SessionsCommand::Get { id } => print(&client.get(&id).await?),
        SessionsCommand::Rm { id, force } => {
            if let Some(kept) = client.delete_with(&id, force).await? {
                // Deleted, but its worktree was kept: say why.
                eprintln!("moorline: {}", kept.message);
            }
        }
        SessionsCommand::Restart {
            id,
            new_conversation,
        } => print(&client.restart(&id, new_conversation).await?),
    }
    Ok(())
}
